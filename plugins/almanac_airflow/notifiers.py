"""The one failure notifier every Almanac task uses after its last retry.

Always: one structured log line (``almanac.task_failed {json}``) for log-based alerting.
When the connections exist: an email through ``smtp_default`` to the addresses in the
Airflow Variable ``almanac_alert_emails`` (comma-separated), and a Slack message through the
incoming-webhook URL held in the ``host`` of connection ``slack_webhook_default``.
A failing channel is logged and never masks the task's own failure.
"""

from __future__ import annotations

import json
import logging

from airflow.sdk import BaseNotifier

__all__ = ["AlmanacFailureNotifier", "failure_summary"]

log = logging.getLogger(__name__)

SMTP_CONN_ID = "smtp_default"
SLACK_CONN_ID = "slack_webhook_default"
ALERT_EMAILS_VARIABLE = "almanac_alert_emails"


def failure_summary(context) -> dict:
    """The small, secret-free facts of a failed task instance."""
    ti = context.get("ti") or context.get("task_instance")
    exception = context.get("exception")
    return {
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(ti, "run_id", None),
        "map_index": getattr(ti, "map_index", -1),
        "try_number": getattr(ti, "try_number", None),
        "error_type": type(exception).__name__ if exception else None,
        "error": str(exception)[:500] if exception else None,
    }


def _connection(conn_id: str):
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception:  # not defined: that channel is simply off
        return None


class AlmanacFailureNotifier(BaseNotifier):
    """Log, and email/Slack where configured, that a task failed for good."""

    def notify(self, context) -> None:
        summary = failure_summary(context)
        log.error("almanac.task_failed %s", json.dumps(summary, sort_keys=True, default=str))
        text = (
            f"Almanac task failed: {summary['dag_id']}.{summary['task_id']} "
            f"(run {summary['run_id']}, map {summary['map_index']}, try {summary['try_number']}): "
            f"{summary['error_type']}: {summary['error']}"
        )
        for channel in (self._email, self._slack):
            try:
                channel(summary, text, context)
            except Exception:
                log.exception("failure notification through %s failed", channel.__name__.strip("_"))

    @staticmethod
    def _email(summary: dict, text: str, context) -> None:
        if _connection(SMTP_CONN_ID) is None:
            return
        from airflow.sdk import Variable

        recipients = [a.strip() for a in (Variable.get(ALERT_EMAILS_VARIABLE, default="") or "").split(",")]
        recipients = [a for a in recipients if a]
        if not recipients:
            return
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        SmtpNotifier(
            to=recipients,
            smtp_conn_id=SMTP_CONN_ID,
            subject=f"[almanac] {summary['dag_id']}.{summary['task_id']} failed",
            html_content=f"<p>{text}</p>",
        ).notify(context)

    @staticmethod
    def _slack(summary: dict, text: str, context) -> None:
        conn = _connection(SLACK_CONN_ID)
        if conn is None or not conn.host:
            return
        import requests

        url = conn.host if conn.host.startswith("http") else f"https://{conn.host}"
        requests.post(url, json={"text": text}, timeout=10).raise_for_status()

"""The one failure notifier every Almanac task uses after its last retry.

Always: one structured log line (``almanac.task_failed {json}``) for log-based alerting.
When the connections exist: an email through ``smtp_default`` to the addresses in the
Airflow Variable ``almanac_alert_emails`` (comma-separated), and a Slack message through the
incoming-webhook URL held in the ``host`` of connection ``slack_webhook_default``.
A failing channel is logged and never masks the task's own failure.

The text comes partly from outside (an error message can quote a feed's Content-Type or the
start of its body): it is HTML-escaped in the email and Slack-escaped in the message. The
webhook URL is a secret: it is registered with Airflow's secrets masker before it is used, and
a failed post is reported by status or exception type only, never with the URL.
"""

from __future__ import annotations

import html
import json
import logging
import re
from urllib.parse import urlsplit

from airflow.sdk import BaseNotifier

from almanac.errors import PermanentError, RetryableError

__all__ = ["AlmanacFailureNotifier", "failure_summary", "post_slack_webhook", "slack_escape"]

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


# Slack answers a failed webhook post with a short code (``invalid_token``, ``no_service``, ...).
_SLACK_ERROR_CODE = re.compile(r"[a-z][a-z_]{0,63}")


def slack_escape(text: str) -> str:
    """Text for a Slack message with ``&``, ``<`` and ``>`` escaped, as Slack asks, so that text
    from outside cannot mention ``<!channel>`` or disguise a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _mask_webhook(url: str) -> None:
    """Register the webhook URL, and its path (which is the secret part), with the secrets masker."""
    from airflow.sdk.log import mask_secret

    mask_secret(url)
    path = urlsplit(url).path
    if len(path) > 1:
        mask_secret(path)


def post_slack_webhook(url: str, text: str, *, timeout: float = 10) -> None:
    """POST ``text`` to a Slack incoming webhook.

    Raises:
        PermanentError: Slack refused the post (4xx other than 429), e.g. a revoked webhook.
        RetryableError: a connection fault, a timeout, 429 or 5xx.
    Neither carries the URL, nor chains the ``requests`` exception that does (its message and its
    urllib3 cause name the URL), so logging the error with its traceback cannot leak it.
    """
    import requests

    _mask_webhook(url)
    status = code = fault = None
    try:
        with requests.post(url, json={"text": text}, timeout=timeout) as response:
            status = response.status_code
            if status >= 400:
                body = response.text.strip()[:64]
                code = body if _SLACK_ERROR_CODE.fullmatch(body) else None
    except requests.RequestException as exc:
        fault = type(exc).__name__
    # Raised outside the except block, so the requests exception is not the __context__ either.
    if fault is not None:
        raise RetryableError(f"Slack webhook post failed: {fault} (connection {SLACK_CONN_ID})")
    if status is not None and status >= 400:
        message = f"Slack webhook answered HTTP {status}" + (f" ({code})" if code else "")
        message += f"; check the webhook URL in connection {SLACK_CONN_ID}"
        if 400 <= status < 500 and status != 429:
            raise PermanentError(message)
        raise RetryableError(message)


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
            html_content=f"<p>{html.escape(text)}</p>",
        ).notify(context)

    @staticmethod
    def _slack(summary: dict, text: str, context) -> None:
        conn = _connection(SLACK_CONN_ID)
        if conn is None or not conn.host:
            return
        url = conn.host if conn.host.startswith("http") else f"https://{conn.host}"
        post_slack_webhook(url, slack_escape(text))

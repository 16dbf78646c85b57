"""notification_dispatch glue: the wake-up Asset, the channels' pools and connections, the plan,
the per-channel worker and the run's summary.

Connections (README, "Notifications"):

- ``smtp_default``: the SMTP provider's connection, read through its ``SmtpHook`` (host, port,
  login, password; extras ``from_email``, ``disable_ssl``, ``disable_tls``, ``timeout``).
- ``sms_default``: an HTTP connection to a provider with Twilio's Messages API: host = base URL
  (``https://api.twilio.com``), login = Account SID, password = auth token, extra
  ``from_number`` or ``messaging_service_sid``.
- ``fcm_default``: an HTTP connection to FCM HTTP v1: host = base URL
  (``https://fcm.googleapis.com``), extra ``project_id`` and the service-account key as
  ``service_account_file`` (a path) or ``service_account_info`` (the JSON object).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from almanac.notify.types import CHANNELS

__all__ = [
    "CONNECTIONS",
    "POOLS",
    "notification_wakeups",
    "owner_of",
    "plan_dispatch",
    "run_dispatch",
    "sender_factory",
    "summarize_dispatch",
]

log = logging.getLogger(__name__)

#: Airflow pools, one per channel (slots: ``./dev up`` and the compose init create them with 5;
#: production: 10). Each dispatch task takes one slot of its channel's pool.
POOLS = {channel: f"notifications_{channel}" for channel in CHANNELS}
CONNECTIONS = {"email": "smtp_default", "sms": "sms_default", "push": "fcm_default"}
#: Run types whose first worker per channel stays for the run's budget, sending what arrives.
_LINGERING_RUN_TYPES = frozenset({"scheduled", "asset_triggered"})


def notification_wakeups():
    """The Asset the backend's wake-ups feed (``almanac.notify.wakeups``), with its watcher.
    Built on call, so only ``notification_dispatch`` creates the watcher."""
    from airflow.sdk import Asset, AssetWatcher

    from almanac.notify import wakeups
    from almanac_airflow.triggers import RedisStreamTrigger

    trigger = RedisStreamTrigger(
        stream=wakeups.STREAM_KEY,
        group=wakeups.CONSUMER_GROUP,
        parser=wakeups.PARSER,
        dead_letter_stream=wakeups.DEAD_LETTER_STREAM,
    )
    return Asset(
        "almanac://notify/wakeups", watchers=[AssetWatcher(name="notification_wakeups", trigger=trigger)]
    )


def plan_dispatch(channel: str, context) -> list[dict]:
    """Settle expired claims of ``channel``, then its workers: one per ``notify_claim_batch`` due
    rows, at most ``notify_workers_per_channel``; a scheduled or asset-triggered run keeps one even
    when nothing is due (it waits for arrivals until its budget is spent)."""
    from almanac.notify.outbox import due_count, release_expired
    from almanac_airflow.hooks import app_db
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    linger = context["dag_run"].run_type in _LINGERING_RUN_TYPES
    with app_db() as conn:
        expired = release_expired(conn, channel=channel)
        due = due_count(conn, channel)
    workers = min(settings.notify_workers_per_channel, math.ceil(due / settings.notify_claim_batch))
    if linger:
        workers = max(workers, 1)
    log.info("%s: %d due now; expired claims %s; %d worker(s)", channel, due, expired, workers)
    return [
        {"channel": channel, "worker": i, "linger": linger and i == 0, "label": f"{channel} #{i}"}
        for i in range(workers)
    ]


def _connection(conn_id: str):
    from almanac_airflow.hooks import _connection as lookup

    return lookup(conn_id)


def _extra(conn) -> dict[str, Any]:
    return conn.extra_dejson if conn.extra else {}


def sender_factory(channel: str):
    """A function that makes one sender for ``channel`` from its Airflow connection (looked up
    once, here)."""
    from almanac.notify import channels

    if channel == "email":
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        hook = SmtpHook(CONNECTIONS["email"])
        hook.smtp_connection = _connection(CONNECTIONS["email"])
        if not hook.from_email:
            from almanac.errors import ConfigError

            raise ConfigError("connection smtp_default has no extra 'from_email' (the sender address)")
        config = channels.SmtpConfig(
            host=hook.host,
            port=hook.port or (465 if hook.use_ssl else 25),
            username=hook.smtp_user or None,
            password=hook.smtp_password or None,
            starttls=hook.smtp_starttls and not hook.use_ssl,
            ssl=hook.use_ssl,
            from_addr=hook.from_email,
            timeout_s=hook.timeout,
        )
        return lambda: channels.EmailSender(config)
    if channel == "sms":
        conn = _connection(CONNECTIONS["sms"])
        extra = _extra(conn)
        config = channels.SmsConfig(
            base_url=_base_url(conn, "https://api.twilio.com"),
            account_sid=conn.login,
            auth_token=conn.password,
            from_number=extra.get("from_number"),
            messaging_service_sid=extra.get("messaging_service_sid"),
        )
        return lambda: channels.SmsSender(config)
    if channel == "push":
        conn = _connection(CONNECTIONS["push"])
        extra = _extra(conn)
        info = extra.get("service_account_info")
        if isinstance(info, str):
            info = json.loads(info)
        if info is None and extra.get("service_account_file"):
            with open(extra["service_account_file"], encoding="utf-8") as f:
                info = json.load(f)
        if not info:
            from almanac.errors import ConfigError

            raise ConfigError(
                "connection fcm_default needs extra 'service_account_file' or 'service_account_info'"
            )
        config = channels.FcmConfig(
            base_url=_base_url(conn, "https://fcm.googleapis.com"),
            project_id=extra.get("project_id") or info.get("project_id"),
            service_account_info=info,
        )
        return lambda: channels.PushSender(config)
    raise ValueError(f"unknown channel {channel!r}")


def _base_url(conn, default: str) -> str:
    """``host`` as a base URL: a full URL as it is, a bare host with the connection's schema/port."""
    host = (conn.host or "").rstrip("/")
    if not host:
        return default
    if "://" in host:
        return host
    scheme = conn.schema or "https"
    return f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")


def owner_of(context) -> str:
    ti = context["ti"]
    return f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}/try{ti.try_number}"


def run_dispatch(worker: dict, context) -> dict:
    """One dispatch task: send what is due on ``worker["channel"]`` (see ``almanac.notify.dispatch``)."""
    from almanac.notify.dispatch import dispatch_channel
    from almanac.notify.ratelimit import NotifyLimiter
    from almanac_airflow.hooks import app_db, redis_client
    from almanac_airflow.settings import load_settings

    channel = worker["channel"]
    settings = load_settings()
    factory = sender_factory(channel)
    rds = redis_client()
    try:
        with app_db() as conn:
            counts = dispatch_channel(
                conn,
                channel,
                factory,
                owner=owner_of(context),
                settings=settings,
                limiter=NotifyLimiter(rds, settings),
                linger=bool(worker.get("linger")),
                wakeups=rds,
            )
    finally:
        rds.close()
    return {"channel": channel, "worker": worker.get("worker", 0), **counts}


def summarize_dispatch(context) -> dict:
    """The run's result per channel and in total; fails the run when a plan failed or a worker
    left no result (crashed, timed out)."""
    from airflow.sdk.exceptions import AirflowFailException

    from almanac.notify.dispatch import COUNTERS

    ti = context["ti"]
    result: dict[str, Any] = {}
    missing = 0
    failed_plans = []
    for channel in CHANNELS:
        plan = ti.xcom_pull(task_ids=f"plan_{channel}")
        if plan is None:
            failed_plans.append(channel)
            plan = []
        pulled = ti.xcom_pull(task_ids=f"send_{channel}") if plan else []
        found = [p for p in ([pulled] if isinstance(pulled, dict) else list(pulled or [])) if p]
        missing += len(plan) - len(found)
        result[channel] = {name: sum(p.get(name, 0) for p in found) for name in COUNTERS}
    result["total"] = {name: sum(result[c][name] for c in CHANNELS) for name in COUNTERS}
    result["failedWorkers"] = missing
    result["failedPlans"] = failed_plans
    log.info("notification_dispatch: %s", json.dumps(result, sort_keys=True))
    if failed_plans:
        raise AirflowFailException(
            f"plan of {', '.join(failed_plans)} did not succeed; nothing of it was sent"
        )
    if missing:
        raise AirflowFailException(
            f"{missing} dispatch task(s) left no result (failed or timed out); rows they held are "
            "settled by the next run once their lease expires"
        )
    return result

"""Google glue: the OAuth client from connection ``google_oauth``, the token key from a Variable,
the run's scope from params or triggering asset events, and the push task body.

- Connection ``google_oauth``: login = OAuth client id, password = client secret, extra
  ``{"token_uri": "...", "api_endpoint": "..."}`` (both optional; Google's by default, a
  local fake in tests).
- Variable ``almanac_token_fernet_key``: the Fernet key(s) tokens are encrypted with
  (``new,old`` while rotating).

Read inside tasks only; nothing here does I/O at import time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from almanac.errors import ConfigError, RetryableError

__all__ = [
    "FERNET_KEY_VARIABLE",
    "OAUTH_CONN_ID",
    "PushBatchFailedError",
    "oauth_client",
    "push_members",
    "push_scope",
    "token_cipher",
]

log = logging.getLogger(__name__)

OAUTH_CONN_ID = "google_oauth"
FERNET_KEY_VARIABLE = "almanac_token_fernet_key"


class PushBatchFailedError(RetryableError):
    """More members of a batch failed than ``google_batch_failure_percent`` allows.

    What to do: read the batch's ``summary`` XCom (each failed member with its error). The
    same error everywhere usually means the ``google_oauth`` connection, the Fernet key
    Variable, or Google itself.
    """


def token_cipher():
    """The ``TokenCipher`` for the key(s) in Variable ``almanac_token_fernet_key``."""
    from airflow.sdk import Variable

    from almanac.google.crypto import TokenCipher

    keys = Variable.get(FERNET_KEY_VARIABLE, default=None)
    if not keys:
        raise ConfigError(
            f"Variable {FERNET_KEY_VARIABLE!r} is not set (dev/CI: AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY)"
        )
    return TokenCipher(keys)


def oauth_client():
    """The ``OAuthClient`` from connection ``google_oauth``."""
    from airflow.sdk import BaseHook

    from almanac.google.client import GOOGLE_TOKEN_URI, OAuthClient

    try:
        conn = BaseHook.get_connection(OAUTH_CONN_ID)
    except Exception as exc:  # AirflowNotFoundException and friends: say which connection
        raise ConfigError(
            f"connection {OAUTH_CONN_ID!r} is missing (login = client id, password = secret)"
        ) from exc
    extra = conn.extra_dejson or {}
    return OAuthClient(
        client_id=conn.login or "",
        client_secret=conn.password or "",
        token_uri=extra.get("token_uri") or GOOGLE_TOKEN_URI,
        api_endpoint=extra.get("api_endpoint") or None,
    )


def push_scope(context, asset) -> list[int] | None:
    """The calendars this run pushes; ``None`` means every calendar.

    A manual run's ``calendar_ids`` param wins when it is not empty. Otherwise the union of
    ``calendar_ids`` in the extras of the asset events that triggered the run (Airflow 3:
    ``context["triggering_asset_events"][asset]`` is a list of events with ``.extra``; one
    run may consume several events). An asset event without ``calendar_ids`` (e.g. created
    by hand in the UI) asks for a full reconciliation.
    """
    requested = (context.get("params") or {}).get("calendar_ids")
    if requested:
        return sorted({int(c) for c in requested})
    events = list((context.get("triggering_asset_events") or {}).get(asset, []) or [])
    if not events:
        return None
    ids: set[int] = set()
    for event in events:
        found = (event.extra or {}).get("calendar_ids")
        if not isinstance(found, list):
            log.warning("asset event without calendar_ids in its extra: pushing every calendar")
            return None
        ids.update(int(c) for c in found)
    return sorted(ids)


def push_members(batch: dict, context, *, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Push one batch of members; push its summary to XCom (key ``summary``) and return it.

    Raises:
        PushBatchFailedError: more than ``google_batch_failure_percent`` of the members failed
            (after the summary is pushed, so a failed batch still reports every member).
    """
    from almanac.google.calendar_push import push_batch
    from almanac.google.client import RetryPolicy
    from almanac_airflow.hooks import app_db
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    policy = RetryPolicy(
        attempts=settings.google_request_attempts,
        max_wait_s=float(settings.google_retry_max_wait_s),
        timeout_s=float(settings.google_request_timeout_s),
    )
    cipher, oauth = token_cipher(), oauth_client()
    with app_db() as conn:
        result = push_batch(
            conn,
            batch["user_ids"],
            calendar_ids=batch.get("calendar_ids"),
            cipher=cipher,
            oauth=oauth,
            policy=policy,
            sleep=sleep,
        )
    summary = result.summary()
    limit = settings.google_batch_failure_percent
    failed_percent = 100 * summary["errorCount"] / max(1, summary["totalMembers"])
    summary["batchFailed"] = failed_percent > limit
    context["ti"].xcom_push(key="summary", value=summary)
    log.info(
        "batch: %d members, %d ok, %d failed, %d skipped; Google events +%d ~%d -%d",
        summary["totalMembers"],
        summary["successCount"],
        summary["errorCount"],
        summary["skippedCount"],
        summary["eventsCreated"],
        summary["eventsUpdated"],
        summary["eventsDeleted"],
    )
    if summary["batchFailed"]:
        first = next((r for r in summary["results"] if r["status"] == "error"), None)
        raise PushBatchFailedError(
            f"{summary['errorCount']} of {summary['totalMembers']} members failed "
            f"({failed_percent:.0f}% > {limit}%); first: {first}"
        )
    return summary

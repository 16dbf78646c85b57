"""Google glue: the Google provider from connection ``oauth_google`` (``google_oauth`` before it),
the run's scope from params, triggering asset events and pending calendars, and the task bodies.

- Connection ``oauth_google``: login = OAuth client id, password = client secret, extra
  ``{"token_url": "...", "health_url": "...", "api_endpoint": "..."}`` (all optional; Google's by
  default, a local fake in tests). The older ``google_oauth`` (extra ``token_uri``) still works.
- Variable ``almanac_token_fernet_key``: the Fernet key(s) tokens are encrypted with.

Tokens come from the integrations store (``almanac.integrations``): every refresh the push
needs goes through its one refresh path, under the integration's lease.

Read inside tasks only; nothing here does I/O at import time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = [
    "mark_pushed",
    "oauth_client",
    "plan_push",
    "push_scope",
    "push_work",
]

log = logging.getLogger(__name__)


def oauth_client(providers=None):
    """The ``OAuthClient`` (client, token URL, Calendar endpoint) of the ``google`` provider."""
    from almanac.google.client import OAuthClient
    from almanac.integrations.providers import GOOGLE
    from almanac_airflow.integrations import Providers

    google = (providers or Providers())(GOOGLE)
    return OAuthClient(
        client_id=google.client_id,
        client_secret=google.client_secret,
        token_uri=google.token_url,
        api_endpoint=google.extra.get("api_endpoint") or None,
    )


def push_scope(context, asset) -> list[int] | None:
    """The calendars this run pushes, before pending ones are added; ``None`` means every calendar.

    A manual run's ``calendar_ids`` param wins when it is not empty. Otherwise the union of
    ``calendar_ids`` in the extras of the asset events that triggered the run (Airflow 3:
    ``context["triggering_asset_events"][asset]`` is a list of events with ``.extra``; one
    run may consume several events). A run with neither — the periodic one, or a manual run
    without params — and an asset event without ``calendar_ids`` (e.g. created by hand in
    the UI) reconcile everything.
    """
    from almanac.batches import as_entity_id

    requested = (context.get("params") or {}).get("calendar_ids")
    if requested:
        return sorted({as_entity_id(c) for c in requested})
    events = list((context.get("triggering_asset_events") or {}).get(asset, []) or [])
    if not events:
        return None
    ids: set[int] = set()
    for event in events:
        found = (event.extra or {}).get("calendar_ids")
        if not isinstance(found, list):
            log.warning("asset event without calendar_ids in its extra: pushing every calendar")
            return None
        for value in found:
            try:
                ids.add(as_entity_id(value))
            except ValueError:
                log.warning("asset event with a malformed calendar id %r: ignored", value)
    return sorted(ids)


def plan_push(context, asset) -> list[dict]:
    """Plan a push run: its scope (plus every calendar still pending), cut into member batches.

    Each batch carries the run's scope and its window (``["start", "end"]``, ISO 8601: the
    sync window of the run's instant). Pushes the pending snapshot
    ``[[calendar_id, generation], ...]`` to XCom key ``pending`` so ``mark_pushed`` clears
    exactly what this run covered.
    """
    from almanac.batches import plan_batches
    from almanac.google.calendar_push import member_ids_to_push, pending_pushes
    from almanac.ics.sync import sync_window
    from almanac_airflow.hooks import app_db
    from almanac_airflow.runs import interval_end
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    start, end = sync_window(interval_end(context), settings)  # the window ics_sync keeps
    scope = push_scope(context, asset)
    with app_db() as conn:
        pending = pending_pushes(conn)  # every pending calendar is in this run's scope
        if scope is not None:
            scope = sorted(set(scope) | set(pending))
        user_ids = member_ids_to_push(conn, scope)
    context["ti"].xcom_push(key="pending", value=[[cid, gen] for cid, gen in sorted(pending.items())])
    return plan_batches(
        user_ids,
        noun="members",
        min_size=1,
        max_size=settings.google_push_batch_size,
        target_count=1,
        extra={"calendar_ids": scope, "window": [start.isoformat(), end.isoformat()]},
    )


def push_work(batch: dict, context, *, sleep: Callable[[float], None] = time.sleep):
    """Push one batch of members (``batch["ids"]``) over the run's scope and window (the batch's
    ``window``; a batch planned without one gets the sync window of the run's instant); one
    result per member. Calls go ``google_batch_size`` per batch request."""
    from datetime import datetime

    from almanac.google.calendar_push import push_batch
    from almanac.ics.sync import sync_window
    from almanac.retry import RetryPolicy
    from almanac_airflow.hooks import app_db
    from almanac_airflow.runs import interval_end
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    policy = RetryPolicy(
        attempts=settings.google_request_attempts,
        max_wait_s=float(settings.google_retry_max_wait_s),
        timeout_s=float(settings.google_request_timeout_s),
    )
    planned = batch.get("window")
    if planned:
        window = (datetime.fromisoformat(planned[0]), datetime.fromisoformat(planned[1]))
    else:
        window = sync_window(interval_end(context), settings)
    from almanac.integrations.google import google_credentials
    from almanac.leases import LeaseKeeper
    from almanac_airflow.hooks import redis_client
    from almanac_airflow.integrations import Providers, lease_owner, refresher

    providers = Providers()
    oauth = oauth_client(providers)
    redis = redis_client()
    try:
        with LeaseKeeper(redis, lease_owner(context)) as leases, app_db() as conn, app_db() as token_conn:
            tokens = refresher(leases, settings, providers=providers, sleep=sleep)
            return push_batch(
                conn,
                batch["ids"],
                calendar_ids=batch.get("calendar_ids"),
                credentials=lambda integration_id: google_credentials(tokens, token_conn, integration_id),
                oauth=oauth,
                policy=policy,
                sleep=sleep,
                window=window,
                batch_size=settings.google_batch_size,
            )
    finally:
        redis.close()


def mark_pushed(context, *, plan_task_id: str = "plan_batches", summary_task_id: str = "summarize") -> int:
    """Clear the pending calendars this run pushed to every member (not the failed members' ones)."""
    from almanac.google.calendar_push import clear_pushed
    from almanac_airflow.hooks import app_db

    ti = context["ti"]
    snapshot = {int(cid): int(gen) for cid, gen in (ti.xcom_pull(task_ids=plan_task_id, key="pending") or [])}
    total = ti.xcom_pull(task_ids=summary_task_id) or {}
    failed = [r["userId"] for r in total.get("results", []) if r.get("status") in ("error", "busy")]
    if not snapshot:
        return 0
    with app_db() as conn:
        cleared = clear_pushed(conn, snapshot, failed)
        conn.commit()
    log.info(
        "%d pending calendar(s) pushed to every member; %d still pending", cleared, len(snapshot) - cleared
    )
    return cleared

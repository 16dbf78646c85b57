"""The ICS sync DAGs' shared wiring: the per-batch work and the mapped-batch pipeline."""

from __future__ import annotations

import logging

from almanac.batches import ItemResult

__all__ = ["lease_owner", "sync_pipeline", "sync_work"]

log = logging.getLogger(__name__)


def lease_owner(context) -> str:
    """The lease owner of the running task instance: every try of it is the same owner."""
    ti = context["ti"]
    return f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}"


def sync_work(batch: dict, context) -> list[ItemResult]:
    """Sync one batch of calendars for the current run (``batch["ids"]``)."""
    from almanac.ics.sync import sync_batch
    from almanac.leases import LeaseKeeper
    from almanac_airflow.hooks import app_db, redis_client
    from almanac_airflow.runs import interval_end
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    redis = redis_client()
    try:
        with (
            LeaseKeeper(redis, lease_owner(context), ttl_s=settings.ics_lock_ttl_s) as leases,
            app_db() as conn,
        ):
            return sync_batch(
                conn,
                batch["ids"],
                instant=interval_end(context),
                settings=settings,
                leases=leases,
                allow_hosts=settings.ics_allow_host_set,
            )
    finally:
        redis.close()


def sync_pipeline(plan):
    """``sync_batch`` mapped over ``plan``, then ``summarize`` and ``announce_changes``
    (emits ``almanac://ics/calendars-changed``). Call inside a ``@dag``."""
    from almanac_airflow.assets import ICS_CALENDARS_CHANGED
    from almanac_airflow.batches import mapped_batches

    return mapped_batches(
        plan,
        kind="almanac.ics.sync:ICS_KIND",
        work=sync_work,
        failure_percent=lambda settings: settings.ics_batch_failure_percent,
        task_id="sync_batch",
        announce=ICS_CALENDARS_CHANGED,
        announce_key="calendar_ids",
    )

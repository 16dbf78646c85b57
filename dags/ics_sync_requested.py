"""Sync the calendars the product's backend asked for on Redis, within seconds.

### What it does
Each entry the backend appends to the Redis Stream `almanac:ics_sync:requests`
(`XADD almanac:ics_sync:requests * calendar_id 42`) becomes an asset event of
`almanac://ics/sync-requests` through the `RedisStreamTrigger` watcher (consumer group,
acknowledged only once Airflow stored the event: no request is lost, also across a
triggerer restart). A run syncs every calendar requested since the previous run, in the
same batches and with the same code as `ics_sync`, and announces the calendars that changed.

### Schedule and triggers
Asset-driven: `schedule=[almanac://ics/sync-requests]`. Needs the triggerer running and the
DAG unpaused. For a one-off by hand, trigger `ics_sync` with its `calendar_id` param instead.

### Params
None (the calendar ids come from the triggering asset events).

### Assets
In: `almanac://ics/sync-requests` (extra `payload`: `{"calendar_id", "request_id"}`).
Out: `almanac://ics/calendars-changed` (extra `{"calendar_ids": [...]}`), when something changed.

### Idempotency
As `ics_sync`; a request delivered twice syncs the calendar twice with no further change.

### Side effects
As `ics_sync`. An unknown calendar id is reported "skipped" in the summary.

### Retries and limits
`max_active_runs=1`: requests arriving during a run are folded into the next one. A run
syncs the requests of its triggering events and every request stored since its `run_after`
(the scheduler alone would leave requests that arrive while a run is being queued
unconsumed until a later request), so a request can be synced by two runs.
Per-calendar Redis lease shared with `ics_sync`: never two syncs of one calendar at once; a
calendar `ics_sync` is syncing right then is waited for, then reported `busy` (the batch is
retried when too many are).

### Failure handling
As `ics_sync`. A malformed request is moved by the trigger to the dead-letter stream
`almanac:ics_sync:requests:dead` with the reason (README, "Dead letters").
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

from almanac_airflow.assets import ics_sync_requests
from almanac_airflow.defaults import default_args
from almanac_airflow.ics import sync_pipeline

ICS_SYNC_REQUESTS = ics_sync_requests()


@dag(
    dag_id=Path(__file__).stem,
    description=__doc__.partition(".")[0],
    doc_md=__doc__,
    schedule=[ICS_SYNC_REQUESTS],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(every=timedelta(minutes=5), execution_timeout=timedelta(minutes=10)),
    tags=["almanac", "ics"],
)
def ics_sync_requested():
    @task(inlets=[ICS_SYNC_REQUESTS])
    def plan_batches() -> list[dict]:
        from airflow.sdk import get_current_context

        from almanac.ics.plan import calendar_batches
        from almanac.ics.requests import requested_calendar_ids
        from almanac_airflow.settings import load_settings

        context = get_current_context()
        # The scheduler hands a run only the events up to its queue row's creation (the
        # first request since the previous run); requests stored after that but before the
        # run was created queue nothing and would wait for a later request (Airflow 3.3,
        # apache/airflow#56050). So also read every event from this run's run_after on;
        # a later run may see some of them again, which the per-calendar sync absorbs.
        run_after = context["dag_run"].run_after.isoformat()
        events = [
            *context["triggering_asset_events"].get(ICS_SYNC_REQUESTS, []),
            *context["inlet_events"][ICS_SYNC_REQUESTS].after(run_after),
        ]
        ids = requested_calendar_ids(event.extra for event in events)
        settings = load_settings()
        return calendar_batches(ids, settings)

    sync_pipeline(plan_batches())


ics_sync_requested()

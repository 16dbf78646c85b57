"""Sync every calendar's ICS feed into the events table, or one calendar on demand.

### What it does
Lists the calendars due (a feed URL and sync enabled), cuts them into batches of 125 to 500
(`plan_batches`), and syncs each batch in a mapped task: fetch (conditional GET, address
guard, size and time limits), parse and expand the feed over the window (30 days back to
365 ahead of the run's instant), then write only what changed. `summarize` returns
`{totalCalendars, successCount, errorCount, skippedCount, busyCount, eventsAdded,
eventsUpdated, eventsDeleted, changedCalendarIds, results, batches, failedBatches, complete}`
(`results` lists calendars that changed, failed, were busy or skipped; unchanged ones are only
counted; `complete` is false when any calendar failed or was busy) and `announce_changes` emits the Asset
`almanac://ics/calendars-changed` naming the calendars that changed.

### Schedule and triggers
- Every 5 minutes (`CronTriggerTimetable`, UTC), first run as soon as it is unpaused.
- One calendar: Trigger with the `calendar_id` param (UI form, or REST:
  `POST /api/v2/dags/ics_sync/dagRuns` with `{"logical_date": null, "conf": {"calendar_id": 42}}`).
- Event-driven: `ics_sync_requested` syncs the calendars the product's backend pushes on Redis.

### Params
- `calendar_id` (integer or null): sync only this calendar; null syncs every calendar due.

### Assets
Out: `almanac://ics/calendars-changed` (extra: `{"calendar_ids": [...]}`), only when something changed.

### Idempotency
Key: `(calendar_id, uid, recurrence_id)` with a content hash. An unchanged feed (304 or the
same body hash) is neither parsed nor written; a rerun writes nothing more.

### Side effects
Writes `events`, the sync state columns of `calendars` and, in the same transaction as a
change, `calendar_push_pending` (so `google_calendar_push` pushes every committed change even
if this try fails later). Per-calendar lease in Redis (`almanac:lease:ics_sync:<id>`, TTL
`ics_lock_ttl_s` = 30 s, renewed while the task lives; a retry of the same task instance takes
it over at once): a calendar another run is syncing is waited for up to `ics_lease_wait_s`,
then reported `busy` — counted as failed (retryable), never as a clean success.

### Retries and limits
`max_active_runs=1`. Transient feed errors are retried inside the task (`ics_fetch_attempts`,
honouring Retry-After, the shared `almanac.retry` policy). Task retries fit the 5-minute
schedule: 2 retries after ~30 s and ~60 s. Permanent errors (an unknown `calendar_id`, a
missing setting, a batch whose failures are all permanent) fail at once, without retries.

### Failure handling
A calendar's failure — any exception from fetch, parse or store — is recorded on it
(`sync_status`, `last_error`, `consecutive_failures`) and never fails the others; only
database and Redis faults fail the batch. A batch task fails — so Airflow retries and alerts —
only when more than `ics_batch_failure_percent` of its calendars failed. `summarize` fails the
run when the plan or any batch failed; its result says `complete: false` when any calendar
failed or was busy. An unknown `calendar_id` fails the run at once with a clear message.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import CronTriggerTimetable, Param, dag, task

from almanac_airflow.defaults import default_args
from almanac_airflow.ics import sync_pipeline


@dag(
    dag_id=Path(__file__).stem,
    description=__doc__.partition(".")[0],
    doc_md=__doc__,
    schedule=CronTriggerTimetable("*/5 * * * *", timezone="UTC", run_immediately=True),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(every=timedelta(minutes=5), execution_timeout=timedelta(minutes=10)),
    params={
        "calendar_id": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Calendar id",
            description="Sync only this calendar (its id in the calendars table). Leave empty for all.",
        ),
    },
    tags=["almanac", "ics"],
)
def ics_sync():
    @task
    def plan_batches() -> list[dict]:
        from airflow.sdk import get_current_context

        from almanac.batches import as_entity_id
        from almanac.errors import PermanentError
        from almanac.ics.plan import calendar_batches, due_calendar_ids, existing_calendar_ids
        from almanac_airflow.hooks import app_db
        from almanac_airflow.settings import load_settings

        settings = load_settings()
        raw = get_current_context()["params"].get("calendar_id")
        with app_db() as conn:
            if raw is not None:
                try:
                    calendar_id = as_entity_id(raw)
                except ValueError as exc:
                    raise PermanentError(f"calendar_id {raw!r}: {exc}") from exc
                if not existing_calendar_ids(conn, [calendar_id]):
                    raise PermanentError(f"calendar_id {calendar_id} does not exist")
                ids = [calendar_id]
            else:
                ids = due_calendar_ids(conn)
        return calendar_batches(ids, settings)

    sync_pipeline(plan_batches())


ics_sync()

"""Push changed calendar events to the Google Calendar of every member who connected Google.

### What it does
Works out the run's scope (the calendars that changed plus every calendar still pending in
`calendar_push_pending`, or every calendar), lists the members
with an active Google account who have something in that scope, cuts them into batches
(`google_push_batch_size`, default 100) and reconciles each batch in a mapped task: per
member, the instances of their calendars (`events`, cancelled ones excluded) that start inside
the run's sync window (`ics_window_days_back/ahead` around the run's data interval end, the
window `ics_sync` keeps) are compared with
what was pushed to the member's *current* Google account (`google_event_links`) — new ones
are inserted, changed ones (other `content_hash`) patched, vanished ones deleted on Google.
`summarize` returns `{totalMembers, successCount, errorCount, skippedCount, busyCount,
eventsCreated, eventsUpdated, eventsDeleted, eventsRejected, results, batches, failedBatches,
complete}` (`results` lists members that changed, failed or were skipped); then
`mark_pending_pushed` clears the pending calendars this run pushed to every member.

### Schedule and triggers
- Data-aware: on every event of the Asset `almanac://ics/calendars-changed` (emitted by
  `ics_sync`); the calendars come from the events' extra `{"calendar_ids": [...]}`. Several
  events consumed by one run are merged, and every pending calendar is added.
- Hourly at :17 (`AssetOrTimeSchedule`, UTC): a full reconciliation of every member.
- Manual: Trigger with the `calendar_ids` param (UI form, or REST:
  `POST /api/v2/dags/google_calendar_push/dagRuns` with
  `{"logical_date": null, "conf": {"calendar_ids": [42]}}`);
  empty reconciles every connected member against all their calendars.

### Params
- `calendar_ids` (list of integers, optional): push these calendars (and any pending); empty
  or null = all.
  Ids of deleted calendars are fine: their Google copies are removed.

### Assets
In: `almanac://ics/calendars-changed`. Out: none.

### Idempotency
Key: `(user_id, calendar_id, uid, recurrence_id)` in `google_event_links`, plus a Google event id
derived from that key, so even a crash between Google's answer and the link write cannot
duplicate (insert answers 409 and is turned into a patch). A rerun makes no Google call that
changes anything; reruns and manual full runs converge.

### Side effects
Google Calendar API v3 `events.insert/patch/delete` on each member's target calendar
(`google_accounts.target_calendar_id`, default `primary`), with `sendUpdates=none`, in Calendar
batch requests of `google_batch_size` (at most 50) calls. Writes
`google_event_links`, `google_push_rejections` (events Google refused, with its reason),
deletes from `calendar_push_pending`, and in `google_accounts` `last_error`, `last_push_at`.
Tokens come from the member's `google` integration (`almanac.integrations`): a refresh the push
needs goes through the store's one refresh path, under the integration's lease, and is kept there.

### Retries and limits
`max_active_runs=1` (runs never overlap, so one member is never pushed twice at once). At most
4 batches at a time. Each Google call: a 401 refreshes the token once and retries once; 429
and 5xx are retried `google_request_attempts` times honouring Retry-After (each wait capped at
`google_retry_max_wait_s`; the shared `almanac.retry` policy; a call answered 429/5xx goes again
in a later batch request). Task retries: 2, after ~30 s
and ~60 s; permanent errors are not retried.

### Failure handling
An event Google refuses (a 4xx about that event) is recorded in `google_push_rejections` and
not re-sent until its content changes; the member's other events are pushed. A member's
failure is recorded (`google_accounts.last_error`) and never stops the others. A revoked
grant (`invalid_grant`) marks the integration `revoked` (its owner is told once) and reports the
member `skipped`.
A failed plan or batch fails the run; a calendar whose push did not reach every member stays
pending for the next run.
A batch task fails — so Airflow retries and alerts — only when more than
`google_batch_failure_percent` (default 50) of its members failed; a missing `oauth_google`
connection (or the older `google_oauth`) or `almanac_token_fernet_key` Variable fails the task
with a message naming it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from almanac_airflow.assets import ICS_CALENDARS_CHANGED
from almanac_airflow.batches import mapped_batches
from almanac_airflow.defaults import default_args
from almanac_airflow.google_push import mark_pushed, plan_push, push_work


@dag(
    dag_id=Path(__file__).stem,
    description=__doc__.partition(".")[0],
    doc_md=__doc__,
    # On every calendars-changed event, and hourly a full reconciliation (catches anything a
    # lost event, a failed run or an edit on Google left behind).
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("17 * * * *", timezone="UTC"),
        assets=[ICS_CALENDARS_CHANGED],
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(every=timedelta(minutes=5), execution_timeout=timedelta(minutes=30)),
    params={
        "calendar_ids": Param(
            None,
            type=["null", "array"],
            items={"type": "integer", "minimum": 1},
            title="Calendar ids",
            description=(
                "Push only these calendars (ids in the calendars table), plus any still pending. "
                "Leave empty to reconcile every calendar of every member who connected Google."
            ),
        ),
    },
    tags=["almanac", "google"],
)
def google_calendar_push():
    @task
    def plan_batches() -> list[dict]:
        from airflow.sdk import get_current_context

        return plan_push(get_current_context(), ICS_CALENDARS_CHANGED)

    @task
    def mark_pending_pushed() -> int:
        from airflow.sdk import get_current_context

        return mark_pushed(get_current_context())

    total = mapped_batches(
        plan_batches(),
        kind="almanac.google.calendar_push:PUSH_KIND",
        work=push_work,
        failure_percent=lambda settings: settings.google_batch_failure_percent,
        task_id="push_batch",
        max_active_tis_per_dag=4,
    )
    total >> mark_pending_pushed()


google_calendar_push()

"""Push changed calendar events to the Google Calendar of every member who connected Google.

### What it does
Works out the run's scope (the calendars that changed, or every calendar), lists the members
with an active Google account who have something in that scope, cuts them into batches
(`google_push_batch_size`, default 100) and reconciles each batch in a mapped task: per
member, the instances of their calendars (`events`, cancelled ones excluded) are compared with
what was pushed (`google_event_links`) — new ones are inserted, changed ones (other
`content_hash`) patched, vanished ones deleted on Google. `summarize` returns
`{totalMembers, successCount, errorCount, skippedCount, eventsCreated, eventsUpdated,
eventsDeleted, results}` (`results` lists members that changed, failed or were skipped).

### Schedule and triggers
- Data-aware: on every event of the Asset `almanac://ics/calendars-changed` (emitted by
  `ics_sync`); the calendars come from the events' extra `{"calendar_ids": [...]}`. Several
  events consumed by one run are merged.
- Manual: Trigger with the `calendar_ids` param (UI form, or REST:
  `POST /api/v2/dags/google_calendar_push/dagRuns` with
  `{"logical_date": null, "conf": {"calendar_ids": [42]}}`);
  empty reconciles every connected member against all their calendars.

### Params
- `calendar_ids` (list of integers, optional): push only these calendars; empty or null = all.
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
(`google_accounts.target_calendar_id`, default `primary`), with `sendUpdates=none`. Writes
`google_event_links`, and in `google_accounts` the refreshed access token (Fernet-encrypted),
`status`, `last_error`, `last_push_at`.

### Retries and limits
`max_active_runs=1` (runs never overlap, so one member is never pushed twice at once). At most
4 batches at a time. Each Google call: a 401 refreshes the token once and retries once; 429
and 5xx are retried `google_request_attempts` times honouring Retry-After (each wait capped at
`google_retry_max_wait_s`). Batch tasks have the shared retries.

### Failure handling
A member's failure is recorded (`google_accounts.last_error`) and never stops the others. A
revoked grant (`invalid_grant`) marks the account `revoked` and reports the member `skipped`.
A batch task fails — so Airflow retries and alerts — only when more than
`google_batch_failure_percent` (default 50) of its members failed; a missing `google_oauth`
connection or `almanac_token_fernet_key` Variable fails the task with a message naming it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, task

from almanac_airflow.assets import ICS_CALENDARS_CHANGED
from almanac_airflow.defaults import default_args


@dag(
    dag_id=Path(__file__).stem,
    description=__doc__.partition(".")[0],
    doc_md=__doc__,
    schedule=[ICS_CALENDARS_CHANGED],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=timedelta(minutes=30)),
    params={
        "calendar_ids": Param(
            None,
            type=["null", "array"],
            items={"type": "integer", "minimum": 1},
            title="Calendar ids",
            description=(
                "Push only these calendars (ids in the calendars table). "
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

        from almanac.google.calendar_push import member_ids_to_push, plan_member_batches
        from almanac_airflow.google_push import push_scope
        from almanac_airflow.hooks import app_db
        from almanac_airflow.settings import load_settings

        settings = load_settings()
        scope = push_scope(get_current_context(), ICS_CALENDARS_CHANGED)
        with app_db() as conn:
            user_ids = member_ids_to_push(conn, scope)
        batches = plan_member_batches(user_ids, size=settings.google_push_batch_size)
        return [{**batch, "calendar_ids": scope} for batch in batches]

    @task(map_index_template="{{ batch_label }}", max_active_tis_per_dag=4)
    def push_batch(batch: dict) -> dict:
        from airflow.sdk import get_current_context

        from almanac_airflow.google_push import push_members

        context = get_current_context()
        context["batch_label"] = batch["label"]
        return push_members(batch, context)

    # Shared retries (a transient fault while reading XComs is retried); failed batches raise
    # AirflowFailException, which is never retried.
    @task(trigger_rule="all_done")
    def summarize() -> dict:
        import logging

        from airflow.sdk import get_current_context
        from airflow.sdk.exceptions import AirflowFailException

        from almanac.google.calendar_push import combine_summaries

        ti = get_current_context()["ti"]
        planned = len(ti.xcom_pull(task_ids="plan_batches") or [])
        summaries = [s for s in _as_list(ti.xcom_pull(task_ids="push_batch", key="summary")) if s]
        total = combine_summaries(summaries)
        total["failedBatches"] = planned - len(summaries) + sum(s["batchFailed"] for s in summaries)
        logging.getLogger("almanac.google_calendar_push").info(
            "google_calendar_push: %d members, %d ok, %d failed, %d skipped; Google events +%d ~%d -%d; "
            "%d failed batch(es)",
            total["totalMembers"],
            total["successCount"],
            total["errorCount"],
            total["skippedCount"],
            total["eventsCreated"],
            total["eventsUpdated"],
            total["eventsDeleted"],
            total["failedBatches"],
        )
        if total["failedBatches"]:
            raise AirflowFailException(f"{total['failedBatches']} of {planned} batches failed")
        return total

    push_batch.expand(batch=plan_batches()) >> summarize()


def _as_list(value) -> list:
    """xcom_pull over a mapped task gives a list (or one value when it mapped once)."""
    if value is None:
        return []
    return [value] if isinstance(value, dict) else list(value)


google_calendar_push()

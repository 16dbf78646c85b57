"""Send what the notification outbox holds — email, SMS and push — each message exactly once.

### What it does
Every job and the product's backend put messages in the outbox (`almanac.notify.outbox.enqueue`,
one row per idempotency key). This DAG claims due rows per channel (`FOR UPDATE SKIP LOCKED`, a
lease of `notify_lease_s`), sends them — email over SMTP (`smtp_default`), SMS through a
Twilio-shaped Messages API (`sms_default`), push through FCM HTTP v1 (`fcm_default`) — and records
each outcome: `sent`, `failed` (transient: due again after a backoff that honours `Retry-After`),
`dead` (permanent, or out of attempts), `skipped` (nobody to send to, opted out) or `uncertain`.

### Schedule and triggers
- Every minute (`* * * * *`, UTC). The first worker of each channel stays up to
  `notify_run_budget_s` and sends what arrives meanwhile (it wakes on the Redis stream below, or
  looks at the outbox every `notify_idle_poll_ms`).
- Within seconds of a wake-up: `XADD almanac:notify:wakeups '*' notification_id 42` (or any
  entry) — the `RedisStreamTrigger` watcher turns it into an event of `almanac://notify/wakeups`,
  which also schedules this DAG (`AssetOrTimeSchedule`).
- Manual / REST: `POST /api/v2/dags/notification_dispatch/dagRuns` `{"logical_date": null}`:
  one pass over what is due (manual and backfill runs do not wait for arrivals).

### Params
None: what is sent is what the outbox holds.

### Assets
In: `almanac://notify/wakeups` (wake-ups only; their content is not trusted).

### Idempotency
The outbox row is the key: a row is handed to a provider only while its claim holds, the
hand-over is committed before the call and the outcome right after. A task retry, a rerun or a
backfill finds nothing due that was sent. A dispatcher killed between hand-over and outcome
leaves the row `uncertain` (never resent by itself: `almanac notifications retry ID`), except on
push, where FCM's collapse key makes a resend replace the first message.

### Side effects
Messages to people; FCM tokens answered `UNREGISTERED` disable their `push_devices` row.

### Retries and limits
Pools `notifications_email`, `notifications_sms`, `notifications_push` (one slot per dispatch
task; `./dev up` creates them with 5 slots, production 10). `notify_parallel_sends` sends in
flight per task. Rate limits in Redis across all workers: per channel per second and per user
per hour (a limited message waits, it is not failed). Attempts per channel
`notify_<channel>_attempts`, exponential from `notify_backoff_base_s`. `max_active_runs=1`.

### Failure handling
A provider's answer or a network fault is a row outcome, never a task failure; only the
database or Redis failing fails a task. The run fails when its plan failed or a dispatch task left
no result. `almanac notifications dead|stats|retry ID` for operators.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task

from almanac_airflow.defaults import default_args
from almanac_airflow.notify import POOLS, notification_wakeups

WAKEUPS = notification_wakeups()


@dag(
    dag_id=Path(__file__).stem,
    description=__doc__.partition(".")[0],
    doc_md=__doc__,
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("* * * * *", timezone="UTC"), assets=[WAKEUPS]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(every=timedelta(minutes=1), execution_timeout=timedelta(minutes=3)),
    tags=["almanac", "notifications"],
)
def notification_dispatch():
    def channel_tasks(channel: str):
        @task(task_id=f"plan_{channel}")
        def plan() -> list[dict]:
            from airflow.sdk import get_current_context

            from almanac_airflow.notify import plan_dispatch

            return plan_dispatch(channel, get_current_context())

        @task(task_id=f"send_{channel}", pool=POOLS[channel], map_index_template="{{ worker.label }}")
        def send(worker: dict) -> dict:
            from airflow.sdk import get_current_context

            from almanac_airflow.notify import run_dispatch

            return run_dispatch(worker, get_current_context())

        return send.expand(worker=plan())

    sends = [channel_tasks(channel) for channel in POOLS]

    @task(trigger_rule="all_done")
    def summarize() -> dict:
        from airflow.sdk import get_current_context

        from almanac_airflow.notify import summarize_dispatch

        return summarize_dispatch(get_current_context())

    sends >> summarize()


notification_dispatch()

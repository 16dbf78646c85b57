"""Check every connected account's health every 4 hours, with one cheap authenticated call each.

### What it does
For each `active` or `expired` integration not checked since the run's **data interval end**,
one `GET` of its provider's `health_url` (connection `oauth_<provider>`; Google: OpenID
userinfo) with the stored access token, in mapped batches:
- 200 → `healthy`, recorded;
- 401 (or no unexpired token stored) with a refresh token → `expired`: the integration becomes
  `expired`, and task `refresh_expired` triggers `oauth_token_refresh` at once for all of them
  (one run, conf `{"integration_ids": [...]}`, priority 10, as `TriggerDagRunOperator` does);
- 401 without a refresh token → `revoked`: tokens erased, the tenant's owner told **once per
  revocation** through the notification outbox (key: integration + revocation time);
- anything else (403, 429, 5xx, timeout) → `error`: recorded and logged, **not retried**.

Result (`summarize`): counts per health (`healthy`, `expired`, `revoked`, `error`) and the list
of changes (`results`: `healthFrom` → `healthTo`, with the reason).

### Schedule and triggers
`0 */4 * * *` UTC (`CronDataIntervalTimetable`). Manual: Trigger, or
`POST /api/v2/dags/integration_health/dagRuns` `{"logical_date": null}` (checks what was not
checked since the trigger). Backfill: a missed window's run checks only what no later run did.

### Params
None.

### Assets
None.

### Idempotency
A check recorded at or after the interval end is not made again by a retry or rerun. The
refresh trigger's run id is `integration_health__<this run id>`: a retried trigger task does
not start a second refresh run. A revocation notifies once whatever runs find it.

### Side effects
`integrations` (`health_status`, `last_health_check_at`, `status`, `last_error`,
`next_refresh_at`); one outbox row per revocation; one `oauth_token_refresh` run per sweep that
found expired integrations.

### Retries and limits
Health checks never loop: one call per integration per run, no in-task retries, and a batch
does not fail for providers' errors (they are outcomes). Task retries (3) cover our own
database or Redis faults; a retried batch skips what it already checked. `max_active_runs=1`.

### Failure handling
A provider error is that integration's outcome; an unknown provider or an undecryptable token
is an `error` result naming it. The run fails only when its plan or a batch failed.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, task

from almanac_airflow.batches import mapped_batches
from almanac_airflow.defaults import default_args


@dag(
    dag_id=Path(__file__).stem,
    description=__doc__.partition(".")[0],
    doc_md=__doc__,
    schedule=CronDataIntervalTimetable("0 */4 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    tags=["almanac", "integrations", "oauth"],
)
def integration_health():
    @task
    def plan_batches() -> list[dict]:
        from airflow.sdk import get_current_context

        from almanac_airflow.integrations import plan_health

        return plan_health(get_current_context())

    # Priority 10, as oauth_token_refresh's own tasks: the spec's high-priority refresh.
    @task(trigger_rule="all_done", priority_weight=10, weight_rule="absolute")
    def refresh_expired() -> None:
        from airflow.sdk import get_current_context

        from almanac_airflow.integrations import trigger_refresh_of_expired

        trigger_refresh_of_expired(get_current_context())

    mapped_batches(
        plan_batches(),
        kind="almanac.integrations.health:HEALTH_KIND",
        work="almanac_airflow.integrations:health_work",
        failure_percent=lambda settings: 100,  # a provider's answer is an outcome, never a batch failure
        task_id="check_batch",
        also=[refresh_expired()],  # a leaf beside summarize: the run's state stays summarize's
    )


integration_health()

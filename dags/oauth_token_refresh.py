"""Refresh connected accounts' OAuth access tokens before they expire.

### What it does
Every integration (`integrations` table, `almanac.integrations`) whose access token expires
before the run's **data interval end** + `oauth_refresh_lead_s` (default 5 minutes) — its
`next_refresh_at` is before the interval end — is refreshed at its provider's token endpoint
(connection `oauth_<provider>`), in mapped batches, `oauth_parallel_requests` at a time. A new
access token is stored encrypted, a refresh token the provider rotated replaces the old one,
and `next_refresh_at` moves to the new expiry minus the lead time.

### Schedule and triggers
- Every minute (`* * * * *`, UTC, `CronDataIntervalTimetable`): the run at 10:01 covers
  `[10:00, 10:01)` and refreshes what expires before 10:06.
- On demand for one integration: the Trigger button with Param `integration_id` (or
  `integration_ids`), `POST /api/v2/dags/oauth_token_refresh/dagRuns` with
  `{"logical_date": null, "conf": {"integration_id": 42}}`, or Redis:
  `XADD almanac:oauth_refresh:requests '*' integration_id 42` (the `RedisStreamTrigger` watcher
  turns it into an event of `almanac://oauth/refresh-requests`, which also schedules this DAG).
  An asked-for integration is refreshed whether due or not (`active`, `expired` or `error`).
- `integration_health` triggers it for the integrations it found expired.
- Backfill: `airflow backfill create --dag-id oauth_token_refresh --from-date ... --to-date ...`
  gives each missed minute its run, which refreshes what was due then and is still not refreshed.

### Params
`integration_id` (integer) or `integration_ids` (list): refresh just these now. Empty: the
scheduled selection. `requested_at` (ISO 8601 with offset, optional): with those, skip an
integration refreshed at or after it (default: the trigger time); `integration_health` passes
the start of its checks, so a refresh made meanwhile is not made twice.

### Assets
In: `almanac://oauth/refresh-requests` (extra `payload`: `{"integration_id", "request_id"}`).

### Idempotency
One refresh per integration at a time, across this DAG, other jobs' request-time refreshes and
the product's backend: the Redis lease `almanac:lease:oauth_refresh:<id>`, and the row is read
again once it is held. A refreshed integration's `next_refresh_at` is past the interval end, so
a retry, a rerun or a backfill does not refresh it again; an asked-for integration already
refreshed since the request (`run_after`) is not refreshed again.

### Side effects
`integrations` rows (tokens, status, `last_refresh_at`, `next_refresh_at`, `last_error`). A
revocation (`invalid_grant`) erases the tokens, sets `revoked` and enqueues one notification to
the tenant's owner (`tenants.owner_user_id`, else the integration's user) in the outbox.

### Retries and limits
Priority 10 (`priority_weight`, absolute): ahead of every other Almanac task. Each refresh is
tried `oauth_request_attempts` times on 429/5xx/timeouts (honouring `Retry-After` up to
`oauth_retry_max_wait_s`) within the task; task retries as every minute-DAG (2, within 20 s).
`max_active_runs=1`: requests arriving during a run are served by the next one.

### Failure handling
A failed refresh (after the in-task retries) makes the integration `expired` with the reason,
due again after a backoff (`oauth_refresh_backoff_base_s`, doubling, at most
`oauth_refresh_backoff_max_s`), `error` after `oauth_refresh_max_failures` in a row; a batch is
not retried for it (it would change nothing). When more than `oauth_refresh_failure_percent`
(20) of the run's integrations failed, `summarize` fails the run — the shared failure notifier
alerts. One integration's failure never stops the others.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable, Param, dag, task

from almanac_airflow.assets import oauth_refresh_requests
from almanac_airflow.batches import mapped_batches
from almanac_airflow.defaults import default_args

REFRESH_REQUESTS = oauth_refresh_requests()


@dag(
    dag_id=Path(__file__).stem,
    description=__doc__.partition(".")[0],
    doc_md=__doc__,
    schedule=AssetOrTimeSchedule(
        timetable=CronDataIntervalTimetable("* * * * *", timezone="UTC"), assets=[REFRESH_REQUESTS]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(
        every=timedelta(minutes=1),
        execution_timeout=timedelta(minutes=10),
        priority_weight=10,
        weight_rule="absolute",
    ),
    params={
        "integration_id": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Integration id",
            description="Refresh this integration now (an id in the integrations table), due or not.",
        ),
        "requested_at": Param(
            None,
            type=["null", "string"],
            format="date-time",
            title="Not refreshed since",
            description=(
                "With integration_id(s): skip those refreshed at or after this instant (default: "
                "when the run was triggered). integration_health passes the start of its checks."
            ),
        ),
        "integration_ids": Param(
            None,
            type=["null", "array"],
            items={"type": "integer", "minimum": 1},
            title="Integration ids",
            description="Refresh these integrations now. Leave both empty for the scheduled selection.",
        ),
    },
    tags=["almanac", "integrations", "oauth"],
)
def oauth_token_refresh():
    @task(inlets=[REFRESH_REQUESTS])
    def plan_batches() -> list[dict]:
        from airflow.sdk import get_current_context

        from almanac_airflow.integrations import plan_refresh

        return plan_refresh(get_current_context(), REFRESH_REQUESTS)

    mapped_batches(
        plan_batches(),
        kind="almanac.integrations.refresh:REFRESH_KIND",
        work="almanac_airflow.integrations:refresh_work",
        # A failed refresh is recorded and due again after its backoff: retrying the batch would
        # change nothing. The run fails (and the notifier alerts) past the share of failures.
        failure_percent=lambda settings: 100,
        alert_percent=lambda settings: settings.oauth_refresh_failure_percent,
        task_id="refresh_batch",
    )


oauth_token_refresh()

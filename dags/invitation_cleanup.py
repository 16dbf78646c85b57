"""Delete pending calendar invitations that expired before the run's data interval end.

### What it does
Removes `pending` rows of `invitations` whose expiry — `expires_at`, or `created_at` +
`invitation_ttl_days` (default 30) when `expires_at` is NULL — is before the **data interval
end** of the run (never "now"). Accepted and declined invitations are history and stay.
Returns `{"deleted": N, "cutoff": "<ISO instant>"}` (see the task's XCom) and logs the count.

### Schedule and triggers
- Daily at 02:00 in `ALMANAC_INVITATION_CLEANUP_TZ` (default `UTC`), with
  `CronDataIntervalTimetable`: the run at 02:00 on day D covers `[D-1 02:00, D 02:00)`.
- Manual: the Trigger button, or `POST /api/v2/dags/invitation_cleanup/dagRuns`. With a
  logical date the run covers the last complete day before it; without one it works up to
  the instant it was triggered.
- Backfill: `POST /api/v2/backfills` (or `airflow backfill create --dag-id invitation_cleanup
  --from-date ... --to-date ...`) gives each missed day its own run and cutoff.

### Params
None.

### Assets
None in or out.

### Idempotency
Key: the cutoff (data interval end). Deleting "expired before cutoff" twice deletes nothing
the second time; a backfill leaves what the on-time runs would have left.

### Side effects
Deletes rows in `invitations` (application DB, connection `app_db`), in one transaction, in
chunks of `invitation_cleanup_chunk_size` rows so no statement holds many locks.

### Retries and limits
Shared defaults (3 retries, exponential backoff, 30 min timeout). `max_active_runs=1`.
Statements carry `lock_timeout` and `statement_timeout` from settings.

### Failure handling
A failure rolls the whole delete back (nothing half-done), is retried, and after the last try
is reported by the shared failure notifier (log line, email/Slack when configured).
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, task

from almanac.settings import schedule_timezone
from almanac_airflow.defaults import default_args


@dag(
    dag_id=Path(__file__).stem,
    description=__doc__.partition(".")[0],
    doc_md=__doc__,
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone=schedule_timezone("invitation_cleanup")),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    tags=["almanac", "invitations", "cleanup"],
)
def invitation_cleanup():
    @task
    def delete_expired_invitations() -> dict:
        from datetime import timedelta

        from airflow.sdk import get_current_context

        from almanac.invitations.cleanup import delete_expired_invitations as delete_expired
        from almanac_airflow.hooks import app_db
        from almanac_airflow.runs import interval_end
        from almanac_airflow.settings import load_settings

        settings = load_settings()
        with app_db() as conn:
            result = delete_expired(
                conn,
                cutoff=interval_end(get_current_context()),
                ttl=timedelta(days=settings.invitation_ttl_days),
                chunk_size=settings.invitation_cleanup_chunk_size,
                lock_timeout_ms=settings.cleanup_lock_timeout_ms,
                statement_timeout_ms=settings.cleanup_statement_timeout_ms,
            )
        return result.as_dict()

    delete_expired_invitations()


invitation_cleanup()

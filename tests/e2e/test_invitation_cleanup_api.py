"""invitation_cleanup end to end: real scheduler and workers, driven over the REST API
with the official Python client, checked in the real application DB."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e

DAG_ID = "invitation_cleanup"
TASK_ID = "delete_expired_invitations"


def _seed(db, token: str, expires: datetime) -> None:
    db.execute(
        "INSERT INTO invitations (calendar_id, invitee_email, token, status, created_at, expires_at) "
        "VALUES (1, %s, %s, 'pending', %s, %s)",
        (f"{token}@x.test", token, expires - timedelta(days=3), expires),
    )


def _tokens(db) -> set[str]:
    db.commit()  # end our snapshot: see what the workers committed
    return {row[0] for row in db.execute("SELECT token FROM invitations")}


def _all_runs_finished(runs_api):
    runs = runs_api.get_dag_runs(DAG_ID, limit=100).dag_runs
    if runs and all(run.state in ("success", "failed") for run in runs):
        return runs
    return None


def _no_backfill_running(backfills) -> bool:
    """A stack stopped right after an earlier session's backfill leaves it marked running until the
    scheduler sees its runs done; only one backfill per DAG may run at a time."""
    return all(b.completed_at is not None for b in backfills.list_backfills(DAG_ID).backfills)


def _returned(xcom_api, run_id: str) -> dict:
    entry = xcom_api.get_xcom_entry(DAG_ID, TASK_ID, run_id, "return_value", deserialize=True)
    return entry.actual_instance.value  # the response is a oneOf wrapper


@pytest.fixture
def calendar(db):
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    db.execute("INSERT INTO calendars (id, tenant_id, name) VALUES (1, 1, 'c')")
    db.commit()
    return db


def test_trigger_then_backfill_over_the_rest_api(api_client, wait_for_dag, calendar):
    from airflow_client.client.api.backfill_api import BackfillApi
    from airflow_client.client.api.dag_run_api import DagRunApi
    from airflow_client.client.api.x_com_api import XComApi
    from airflow_client.client.models import BackfillPostBody, ReprocessBehavior, TriggerDAGRunPostBody

    db = calendar
    runs_api, xcom_api, backfills = DagRunApi(api_client), XComApi(api_client), BackfillApi(api_client)
    now = datetime.now(UTC)
    _seed(db, "long-expired", now - timedelta(days=20))
    _seed(db, "expires-next-week", now + timedelta(days=7))
    db.commit()

    # 1. Trigger through the REST API, as the product's backend would.
    wait_for_dag(DAG_ID)  # unpaused: the scheduler may also start the latest scheduled run
    triggered = runs_api.trigger_dag_run(DAG_ID, TriggerDAGRunPostBody(logical_date=None))
    runs = wait_for(lambda: _all_runs_finished(runs_api), timeout=300, what="the triggered run to finish")
    manual = next(run for run in runs if run.dag_run_id == triggered.dag_run_id)
    assert manual.state == "success"
    assert [run.state for run in runs] == ["success"] * len(runs)
    assert _tokens(db) == {"expires-next-week"}
    # No data interval on a manual run without a logical date: it works up to run_after.
    assert datetime.fromisoformat(_returned(xcom_api, manual.dag_run_id)["cutoff"]) == manual.run_after

    # 2. Backfill 3 past days: each run deletes what expired before *its* interval end.
    boundary = now.replace(hour=2, minute=0, second=0, microsecond=0)
    if boundary > now:
        boundary -= timedelta(days=1)  # the latest 02:00 UTC that has passed
    first, last = boundary - timedelta(days=5), boundary - timedelta(days=3)
    # reprocess_behavior=completed: a stack that ran this test earlier today has runs on those dates
    # already (a backfill skips them by default); deleting them instead makes the scheduler create
    # its latest scheduled run again, which would then race the backfill.
    again = ReprocessBehavior.COMPLETED
    wait_for(lambda: _no_backfill_running(backfills), timeout=120, what="an earlier backfill to complete")
    plan = backfills.create_backfill_dry_run(
        BackfillPostBody(dag_id=DAG_ID, from_date=first, to_date=last, reprocess_behavior=again)
    )
    assert [b.logical_date for b in plan.backfills] == [first, first + timedelta(days=1), last]
    for day in range(3):  # one expiry in each backfilled interval ...
        _seed(db, f"backfill-day-{day}", first + timedelta(days=day, hours=12))
    _seed(db, "after-the-backfill", last + timedelta(days=1, hours=12))  # ... and one after them all
    db.commit()

    backfill = backfills.create_backfill(
        BackfillPostBody(
            dag_id=DAG_ID, from_date=first, to_date=last, max_active_runs=1, reprocess_behavior=again
        )
    )
    runs = wait_for(lambda: _all_runs_finished(runs_api), timeout=300, what="the backfill runs to finish")
    backfilled = sorted((run for run in runs if run.run_type == "backfill"), key=lambda run: run.logical_date)
    assert len(backfilled) == 3, [run.dag_run_id for run in runs]
    for day, run in enumerate(backfilled):
        assert run.state == "success"
        assert run.data_interval_start == first + timedelta(days=day)
        assert run.data_interval_end == first + timedelta(days=day + 1)
        result = _returned(xcom_api, run.dag_run_id)
        assert result == {"deleted": 1, "cutoff": run.data_interval_end.isoformat()}, run.dag_run_id
    assert backfills.get_backfill(backfill.id).dag_id == DAG_ID
    wait_for(
        lambda: backfills.get_backfill(backfill.id).completed_at, timeout=120, what="the backfill to complete"
    )
    # The backfill went no further than its last interval end, whatever "now" is.
    assert _tokens(db) == {"expires-next-week", "after-the-backfill"}

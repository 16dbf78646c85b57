"""The invitation_cleanup DAG run in-process with ``dag.test()`` on the real databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest


@pytest.fixture(scope="module")
def cleanup_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder="dags/invitation_cleanup.py")
    assert not bag.import_errors
    return bag.get_dag("invitation_cleanup")


def _seed(db) -> None:
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    db.execute("INSERT INTO calendars (id, tenant_id, name) VALUES (1, 1, 'c')")
    for token, expires in [
        ("before-interval-end", datetime(2026, 3, 10, 1, 59, tzinfo=UTC)),
        ("after-interval-end", datetime(2026, 3, 10, 2, 1, tzinfo=UTC)),
    ]:
        db.execute(
            "INSERT INTO invitations (calendar_id, invitee_email, token, created_at, expires_at) "
            "VALUES (1, %s, %s, %s, %s)",
            (f"{token}@x.test", token, expires - timedelta(days=1), expires),
        )
    db.commit()


def _tokens(db) -> set[str]:
    db.commit()
    return {row[0] for row in db.execute("SELECT token FROM invitations")}


def test_a_run_deletes_up_to_its_interval_end_and_a_rerun_changes_nothing(cleanup_dag, db):
    _seed(db)
    # logical date 2026-03-10 03:00 -> data interval [2026-03-09 02:00, 2026-03-10 02:00)
    run = cleanup_dag.test(logical_date=datetime(2026, 3, 10, 3, 0, tzinfo=UTC))
    assert run.state == "success"
    assert run.data_interval_end == datetime(2026, 3, 10, 2, 0, tzinfo=UTC)
    assert _tokens(db) == {"after-interval-end"}
    again = cleanup_dag.test(logical_date=datetime(2026, 3, 10, 3, 0, tzinfo=UTC))
    assert again.state == "success"
    assert _tokens(db) == {"after-interval-end"}

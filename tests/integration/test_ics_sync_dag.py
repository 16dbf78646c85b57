"""ics_sync and google_calendar_push on the shared mapped-batch pattern, run in-process with
``dag.test()`` against the real databases, Redis and a local feed server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.feed_server import FeedServer, Route


def _dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=f"dags/{dag_id}.py")
    assert not bag.import_errors
    return bag.get_dag(dag_id)


def _feed(calendar_id: int, at: datetime) -> bytes:
    start = at + timedelta(days=1)
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//almanac//test//EN\r\nBEGIN:VEVENT\r\n"
        f"UID:dag-{calendar_id}@almanac.test\r\nDTSTAMP:20260101T000000Z\r\n"
        f"DTSTART:{start:%Y%m%dT%H%M%SZ}\r\nDTEND:{start + timedelta(hours=1):%Y%m%dT%H%M%SZ}\r\n"
        f"SUMMARY:calendar {calendar_id}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    ).encode()


LOGICAL = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.fixture
def feeds(db, monkeypatch):
    with FeedServer() as server:
        db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
        for cid in (1, 2, 3):
            db.execute("INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (%s, 1, %s, %s)",
                       (cid, f"c{cid}", server.url(f"/cal{cid}.ics")))
            server.routes[f"/cal{cid}.ics"] = Route(body=_feed(cid, LOGICAL))
        db.commit()
        monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_SETTINGS", json.dumps({"ics_allow_hosts": server.host_port}))
        yield server


def _xcom(run, task_id: str, key: str = "return_value"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id, key=key)
        return [XComModel.deserialize_value(row) for row in session.scalars(query)]


def _states(run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in run.get_task_instances()}


def test_a_run_with_one_bad_feed_succeeds_but_says_it_is_not_complete(db, feeds):
    feeds.routes["/cal2.ics"] = Route(status=404, body=b"gone")
    run = _dag("ics_sync").test(logical_date=LOGICAL)
    assert run.state == "success"
    (total,) = _xcom(run, "summarize")
    assert (total["totalCalendars"], total["successCount"], total["errorCount"]) == (3, 2, 1)
    assert total["complete"] is False and total["changedCalendarIds"] == [1, 3]
    assert _xcom(run, "announce_changes") == [[1, 3]]
    assert sorted(db.execute("SELECT calendar_id FROM calendar_push_pending").fetchall()) == [(1,), (3,)]


def test_an_unknown_calendar_id_fails_the_run_at_once_without_retries(db, feeds):
    run = _dag("ics_sync").test(logical_date=LOGICAL, run_conf={"calendar_id": 999})
    assert run.state == "failed"
    plan = next(ti for ti in run.get_task_instances() if ti.task_id == "plan_batches")
    assert (plan.state, plan.try_number) == ("failed", 1)  # permanent: the retry policy failed it
    assert _states(run)["summarize"] == "failed"


def test_an_integral_float_calendar_id_is_the_integer_id(db, feeds):
    run = _dag("ics_sync").test(logical_date=LOGICAL, run_conf={"calendar_id": 2.0})
    assert run.state == "success"
    (total,) = _xcom(run, "summarize")
    assert total["changedCalendarIds"] == [2]


def test_a_failed_plan_fails_the_google_push_run(db, monkeypatch):
    """Regression: google_calendar_push's summary had no plan-failed guard, so the run succeeded."""
    dag = _dag("google_calendar_push")
    dag.get_task("plan_batches").retries = 0  # fail fast; the fault is a database that does not answer
    monkeypatch.setenv("AIRFLOW_CONN_APP_DB", "postgresql://nobody:x@127.0.0.1:9/none")
    run = dag.test(logical_date=LOGICAL)
    assert run.state == "failed"
    states = _states(run)
    assert (states["plan_batches"], states["summarize"]) == ("failed", "failed")
    assert states["mark_pending_pushed"] == "upstream_failed"

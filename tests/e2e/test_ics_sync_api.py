"""ICS sync end to end: real Airflow (scheduler, triggerer, workers), a real feed server,
requests pushed on Redis and triggers over the REST API, results checked in the DB."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import redis

from almanac.ics.requests import push_sync_request
from tests.e2e.conftest import wait_for
from tests.support.feed_server import FeedServer, Route

pytestmark = pytest.mark.e2e
CALENDARS = 20


def feed(calendar_id: int, events: int = 1) -> bytes:
    """A feed whose events are in the sync window of a run now."""
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//almanac//e2e//EN"]
    for n in range(events):
        at = start + timedelta(days=n)
        lines += ["BEGIN:VEVENT", f"UID:e2e-{calendar_id}-{n}@almanac.test", f"DTSTAMP:{at:%Y%m%dT%H%M%SZ}",
                  f"DTSTART:{at:%Y%m%dT%H%M%SZ}", f"DTEND:{at + timedelta(hours=1):%Y%m%dT%H%M%SZ}",
                  f"SUMMARY:Event {n} of calendar {calendar_id}", "END:VEVENT"]
    return ("\r\n".join(lines + ["END:VCALENDAR"]) + "\r\n").encode()


def event_counts(db) -> dict[int, int]:
    db.commit()
    return dict(db.execute("SELECT calendar_id, count(*) FROM events GROUP BY 1").fetchall())


@pytest.fixture
def feeds(db, api_client):
    from airflow_client.client.api.variable_api import VariableApi
    from airflow_client.client.exceptions import NotFoundException
    from airflow_client.client.models import VariableBody

    with FeedServer({f"/cal{c}.ics": Route(body=feed(c)) for c in range(1, CALENDARS + 1)}) as server:
        db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
        for c in range(1, CALENDARS + 1):
            db.execute("INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (%s, 1, %s, %s)",
                       (c, f"c{c}", server.url(f"/cal{c}.ics")))
        db.commit()
        variables = VariableApi(api_client)
        body = VariableBody(key="almanac_settings", value=json.dumps({"ics_allow_hosts": server.host_port}))
        try:
            variables.patch_variable("almanac_settings", body)
        except NotFoundException:
            variables.post_variable(body)
        yield server


def test_requests_pushed_on_redis_are_all_synced_also_across_a_triggerer_restart(
    feeds, db, wait_for_dag, airflow_stack, restart_component
):
    client = redis.Redis.from_url(airflow_stack["ALMANAC_REDIS_URL"])
    wait_for_dag("ics_sync_requested")

    # A burst of 20 requests, one per calendar, as fast as the backend can push them.
    for c in range(1, CALENDARS + 1):
        push_sync_request(client, c)
    wait_for(lambda: len(event_counts(db)) == CALENDARS, timeout=240, what="all 20 calendars to be synced")
    assert set(event_counts(db)) == set(range(1, CALENDARS + 1))

    # A request pushed while the triggerer is down is synced once it is back.
    start_again = restart_component("triggerer")
    feeds.routes["/cal3.ics"] = Route(body=feed(3, events=2))
    push_sync_request(client, 3)
    client.xadd("almanac:ics_sync:requests", {"calendar_id": "not-a-number"})  # malformed: dropped
    start_again()
    wait_for(lambda: event_counts(db).get(3) == 2, timeout=240, what="calendar 3's request after the restart")


def test_trigger_one_calendar_over_the_rest_api(feeds, db, api_client, wait_for_dag):
    from airflow_client.client.api.dag_run_api import DagRunApi
    from airflow_client.client.api.x_com_api import XComApi
    from airflow_client.client.exceptions import BadRequestException
    from airflow_client.client.models import TriggerDAGRunPostBody

    runs = DagRunApi(api_client)
    _quiesce(api_client, runs, "ics_sync_requested")  # its syncs would hold calendar locks here
    wait_for_dag("ics_sync")  # unpausing starts a scheduled run of every calendar: let it finish
    wait_for(lambda: _finished(runs, "ics_sync"), timeout=300, what="the first scheduled ics_sync run")

    feeds.routes["/cal5.ics"] = Route(body=feed(5, events=3))
    run = runs.trigger_dag_run("ics_sync", TriggerDAGRunPostBody(logical_date=None, conf={"calendar_id": 5}))
    done = wait_for(
        lambda: _finished(runs, "ics_sync", run.dag_run_id), timeout=300, what="the calendar_id run"
    )
    assert done.state == "success"
    total = XComApi(api_client).get_xcom_entry("ics_sync", "summarize", run.dag_run_id, "return_value",
                                               deserialize=True).actual_instance.value
    assert (total["totalCalendars"], total["successCount"], total["errorCount"]) == (1, 1, 0)
    assert event_counts(db)[5] == 3

    unknown = runs.trigger_dag_run(
        "ics_sync", TriggerDAGRunPostBody(logical_date=None, conf={"calendar_id": 999})
    )
    failed = wait_for(
        lambda: _finished(runs, "ics_sync", unknown.dag_run_id), timeout=300, what="the unknown id run"
    )
    assert failed.state == "failed"
    with pytest.raises(BadRequestException):  # the Param's JSON schema refuses a non-integer
        runs.trigger_dag_run(
            "ics_sync", TriggerDAGRunPostBody(logical_date=None, conf={"calendar_id": "five"})
        )


def _finished(runs, dag_id, run_id=None):
    if run_id is not None:
        run = runs.get_dag_run(dag_id, run_id)
        return run if run.state in ("success", "failed") else None
    listed = runs.get_dag_runs(dag_id, limit=100).dag_runs
    return listed if listed and all(r.state in ("success", "failed") for r in listed) else None


def _quiesce(api_client, runs, dag_id):
    """Wait until no run of ``dag_id`` is queued or running, then pause it.

    Not the other way round: the scheduler does not move a paused Dag's runs on.
    """
    from airflow_client.client.api.dag_api import DAGApi
    from airflow_client.client.exceptions import NotFoundException
    from airflow_client.client.models import DAGPatchBody

    def all_finished():
        return all(r.state in ("success", "failed") for r in runs.get_dag_runs(dag_id, limit=100).dag_runs)

    try:
        wait_for(all_finished, timeout=300, what=f"{dag_id} runs to finish")
        DAGApi(api_client).patch_dag(dag_id, DAGPatchBody(is_paused=True))
    except NotFoundException:
        return

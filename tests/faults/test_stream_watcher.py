"""The Redis stream watcher of ``ics_sync_requested`` (``RedisStreamTrigger`` in the triggerer)
across a Redis restart and a triggerer restart in the middle of a burst: every requested
calendar is synced, once in the DB, and nothing is left pending in the consumer group."""

from __future__ import annotations

import contextlib

import pytest

from almanac.ics.requests import CONSUMER_GROUP, DEAD_LETTER_STREAM, STREAM_KEY, push_sync_request
from tests.e2e.conftest import wait_for
from tests.faults.helpers import duplicate_events, event_counts, feed
from tests.support.feed_server import Route

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CALENDARS = 20
DAG = "ics_sync_requested"


@pytest.fixture
def calendars(feeds, db, airflow):
    airflow.set_settings(ics_allow_hosts=feeds.host_port)
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for c in range(1, CALENDARS + 1):
        feeds.routes[f"/cal{c}.ics"] = Route(body=feed(c, 1))
        db.execute("INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (%s, 1, %s, %s)",
                   (c, f"c{c}", feeds.url(f"/cal{c}.ics")))
    db.commit()
    return list(range(1, CALENDARS + 1))


def _consumers(redis_conn) -> list[dict]:
    try:
        return redis_conn.xinfo_consumers(STREAM_KEY, CONSUMER_GROUP)
    except Exception:  # no stream or group yet
        return []


def _pending(redis_conn) -> int:
    try:
        return int(redis_conn.xpending(STREAM_KEY, CONSUMER_GROUP)["pending"])
    except Exception:
        return -1


def _reading(redis_conn, besides: frozenset[str] = frozenset()) -> str | None:
    """The name of a consumer other than ``besides`` that is reading now (idle < 10 s)."""
    for consumer in _consumers(redis_conn):
        name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
        if name not in besides and consumer["idle"] < 10_000:
            return name
    return None


def _most_recent(redis_conn) -> str | None:
    """The consumer of the group seen last (Redis 6.2 counts a quiet BLOCK as idle time)."""
    consumers = sorted(_consumers(redis_conn), key=lambda c: c["idle"])
    if not consumers:
        return None
    name = consumers[0]["name"]
    return name.decode() if isinstance(name, bytes) else name


def _synced(app_db_url, ids) -> bool:
    counts = event_counts(app_db_url)
    return all(counts.get(c) == 1 for c in ids)


def _drained(airflow, redis_conn) -> bool:
    """Nothing pending in the group, nothing left in the stream, no asset event waiting for the
    scheduler to make it a run (the watcher acknowledges an entry once its event is stored, a
    scheduler loop before the run exists), no run of the DAG still going."""
    return (
        _pending(redis_conn) == 0
        and redis_conn.xlen(STREAM_KEY) == 0
        and airflow.queued_asset_events(DAG) == 0
        and not airflow.active_runs(DAG)
    )


def _report(airflow, redis_conn, app_db_url, profile, ids) -> str:
    """What an operator would look at when requests are not synced: the group, the runs, the
    triggerer's log. Printed when a wait of these tests times out (a CI run leaves no logs)."""
    lines = [f"stream {STREAM_KEY}: length {redis_conn.xlen(STREAM_KEY)}, "
             f"dead letters {redis_conn.xlen(DEAD_LETTER_STREAM)}"]
    try:
        for row in redis_conn.xpending_range(STREAM_KEY, CONSUMER_GROUP, "-", "+", 100):
            lines.append(f"  pending {row['message_id']} on {row['consumer']}"
                         f" idle {row['time_since_delivered']} ms delivered {row['times_delivered']}x")
    except Exception as exc:
        lines.append(f"  XPENDING failed: {exc}")
    for consumer in _consumers(redis_conn):
        lines.append(f"  consumer {consumer}")
    for entry_id, fields in redis_conn.xrevrange(DEAD_LETTER_STREAM, count=5):
        lines.append(f"  dead letter {entry_id}: {fields}")
    counts = event_counts(app_db_url)
    lines.append(f"calendars not at 1 event: { {c: counts.get(c) for c in ids if counts.get(c) != 1} }")
    lines.append(f"asset events queued for {DAG}: {airflow.queued_asset_events(DAG)}")
    for run in airflow.runs.get_dag_runs(DAG, limit=100).dag_runs:
        lines.append(f"  run {run.dag_run_id} {run.state} run_after={run.run_after} "
                     f"start={run.start_date} end={run.end_date}")
    log = profile.var / "logs" / "triggerer.log"
    if log.exists():
        lines.append(f"--- last lines of {log}")
        lines.extend(log.read_text(errors="replace").splitlines()[-80:])
    return "\n".join(lines)


@pytest.fixture
def report(airflow, redis_conn, app_db_url, profile, calendars):
    """``report()``: ``_report`` of this test's calendars."""
    return lambda: _report(airflow, redis_conn, app_db_url, profile, calendars)


def _wait(predicate, report, **kwargs):
    """``wait_for``, printing ``report()`` (the state of the group and the runs) if it times out."""
    try:
        return wait_for(predicate, **kwargs)
    except pytest.fail.Exception:
        with contextlib.suppress(Exception):
            print(report())
        raise


def _run_ids(airflow) -> set[str]:
    return {r.dag_run_id for r in airflow.runs.get_dag_runs(DAG, limit=100).dag_runs}


def _runs_told_the_truth(airflow, before: set[str]) -> None:
    """Every run this test caused succeeded, and its summary says complete with no error."""
    runs = [r for r in airflow.runs.get_dag_runs(DAG, limit=100).dag_runs if r.dag_run_id not in before]
    assert runs and all(r.state == "success" for r in runs), [(r.dag_run_id, r.state) for r in runs]
    for run in runs:
        total = airflow.summary(DAG, run.dag_run_id)
        assert total is not None and total["complete"] and total["errorCount"] == 0, (run.dag_run_id, total)


def test_stream_watcher_reconnects_after_redis_restarts_and_syncs_every_request(
    calendars, app_db_url, airflow, dag_on, redis_conn, restart_service, report
):
    dead_before = redis_conn.xlen(DEAD_LETTER_STREAM)
    dag_on(DAG)
    runs_before = _run_ids(airflow)
    # The watcher has joined the group (requests pushed before it reads are delivered anyway:
    # the group reads from id 0). Not "idle < 10 s": Redis 6.2 counts a quiet BLOCK as idle.
    wait_for(lambda: _consumers(redis_conn), timeout=120, interval=0.5, what="the stream watcher to join")
    for c in calendars[:5]:
        push_sync_request(redis_conn, c)
    _wait(lambda: _synced(app_db_url, calendars[:5]), report, timeout=180, what="the first 5 requests")

    restart_service("redis", down_s=3)
    for c in calendars[5:]:
        push_sync_request(redis_conn, c)
    _wait(lambda: _synced(app_db_url, calendars), report, timeout=240,
          what="the 15 requests pushed after the restart")
    _wait(lambda: _drained(airflow, redis_conn), report, timeout=180,
          what="the consumer group to have nothing pending")

    assert event_counts(app_db_url) == dict.fromkeys(calendars, 1)
    assert duplicate_events(app_db_url) == []
    assert redis_conn.xlen(DEAD_LETTER_STREAM) == dead_before  # nothing refused on the way
    _runs_told_the_truth(airflow, runs_before)


def test_triggerer_restarted_mid_burst_loses_no_request(
    calendars, app_db_url, airflow, dag_on, redis_conn, restart_component, report
):
    dead_before = redis_conn.xlen(DEAD_LETTER_STREAM)
    dag_on(DAG)
    runs_before = _run_ids(airflow)
    first = wait_for(lambda: _most_recent(redis_conn), timeout=120, interval=0.5,
                     what="the stream watcher to read")

    # The first half of the burst; the triggerer stops as soon as it has taken some of it.
    for c in calendars[:10]:
        push_sync_request(redis_conn, c)
    wait_for(lambda: _pending(redis_conn) > 0 or redis_conn.xlen(STREAM_KEY) < 10, timeout=60, interval=0.05,
             what="the watcher to take entries of the burst")
    start_again = restart_component("triggerer")
    in_flight_at_stop = (_pending(redis_conn), 10 - redis_conn.xlen(STREAM_KEY))  # (unacked, acked)
    for c in calendars[10:]:  # the second half arrives while no triggerer runs
        push_sync_request(redis_conn, c)
    start_again()
    _wait(lambda: _reading(redis_conn, besides=frozenset({first})), report, timeout=120, interval=0.5,
          what="the restarted triggerer's watcher to read")

    # Entries the old consumer took but never acknowledged are claimed after claim_min_idle_seconds (60 s).
    _wait(lambda: _synced(app_db_url, calendars), report, timeout=300,
          what="every request of the burst to be synced")
    _wait(lambda: _drained(airflow, redis_conn), report, timeout=180,
          what="the consumer group to have nothing pending")
    print("(pending, acknowledged) when the triggerer stopped:", in_flight_at_stop)

    assert event_counts(app_db_url) == dict.fromkeys(calendars, 1)
    assert duplicate_events(app_db_url) == []
    assert redis_conn.xlen(DEAD_LETTER_STREAM) == dead_before
    _runs_told_the_truth(airflow, runs_before)

"""PostgreSQL or Redis restarted while an ics_sync run is syncing slow feeds: the run ends in
a state that tells the truth, nothing committed is lost or stored twice, no lease outlives
its TTL, and a later run converges."""

from __future__ import annotations

import psycopg
import pytest

from tests.e2e.conftest import wait_for
from tests.faults.helpers import (
    connected_to,
    duplicate_events,
    event_counts,
    feed,
    lease_keys,
    leases,
)
from tests.support.feed_server import Route

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CALENDARS = 20
EVENTS_PER_FEED = 2


def _calendars(feeds, db, slow: dict[int, float]) -> None:
    """Calendars 1..20 on ``feeds``; each calendar in ``slow`` trickles its feed over that many seconds."""
    for c in range(1, CALENDARS + 1):
        body = feed(c, EVENTS_PER_FEED)
        if c in slow:
            feeds.routes[f"/cal{c}.ics"] = Route(body=body, chunk_size=max(1, len(body) // 10),
                                                 chunk_delay=slow[c] / 10)
        else:
            feeds.routes[f"/cal{c}.ics"] = Route(body=body)
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for c in range(1, CALENDARS + 1):
        db.execute("INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (%s, 1, %s, %s)",
                   (c, f"c{c}", feeds.url(f"/cal{c}.ics")))
    db.commit()


def _fast(feeds) -> None:
    for c in range(1, CALENDARS + 1):
        feeds.routes[f"/cal{c}.ics"] = Route(body=feed(c, EVENTS_PER_FEED))


def _consistent(app_db_url) -> dict[int, int]:
    """No identity stored twice, and every calendar the DB says synced holds exactly its events."""
    assert duplicate_events(app_db_url) == []
    counts = event_counts(app_db_url)
    with psycopg.connect(app_db_url) as conn:
        synced = conn.execute(
            "SELECT id, event_count FROM calendars WHERE sync_status = 'ok' AND last_success_at IS NOT NULL"
        ).fetchall()
    for calendar_id, event_count in synced:
        assert counts.get(calendar_id, 0) == event_count == EVENTS_PER_FEED, (calendar_id, counts)
    return counts


def _truthful(airflow, run_id: str, state: str) -> dict | None:
    """The run's summary agrees with its state: success = complete and counted; failed = says why."""
    total = airflow.summary("ics_sync", run_id)
    batch_tries = airflow.tries("ics_sync", run_id, "sync_batch", 0)
    if state == "success":
        assert total is not None
        counts = (total["totalCalendars"], total["successCount"], total["errorCount"])
        assert counts == (CALENDARS, CALENDARS, 0)
        assert (total["busyCount"], total["failedBatches"], total["complete"]) == (0, 0, True)
        assert batch_tries[-1].state == "success"
    else:
        # Failed: either summarize says which batches failed, or it never ran because the
        # batch exhausted its retries (then the batch's own state says it).
        assert (total is not None and (total["failedBatches"] or not total["complete"])) or (
            batch_tries and batch_tries[-1].state == "failed"
        ), (total, [(t.try_number, t.state) for t in batch_tries])
    return total


def test_postgres_restarted_mid_run_ends_truthfully_and_a_later_run_converges(
    feeds, db, app_db_url, airflow, dag_on, restart_service, supervised, redis_conn
):
    airflow.set_settings(ics_allow_hosts=feeds.host_port)
    dag_on("ics_sync")
    _calendars(feeds, db, slow={5: 6.0, 10: 10.0, 15: 6.0})
    db.close()  # the restart breaks it; checks below use fresh connections

    run_id = airflow.trigger("ics_sync")
    ti, proc = airflow.wait_running_process("ics_sync", run_id, "sync_batch", 0)
    wait_for(lambda: feeds.hits("/cal10.ics") and connected_to(proc, feeds.port), timeout=120,
             interval=0.2, what="the task to be fetching calendar 10")
    restart_service("postgres", down_s=3)
    _fast(feeds)

    run = airflow.wait_finished("ics_sync", run_id, timeout=400)
    tries = airflow.tries("ics_sync", run_id, "sync_batch", 0)
    # Airflow's scheduler, dag-processor and triggerer exit when their metadata DB goes away (or
    # the scheduler hangs, and its liveness probe stops it); tools/supervise.py restarts them.
    print("postgres restart:", run.state, [(t.try_number, t.state) for t in tries], "restarted:", supervised)
    _truthful(airflow, run_id, run.state)
    counts = _consistent(app_db_url)
    assert set(range(1, 10)) <= set(counts)  # committed before the restart: kept
    if run.state == "success":
        assert counts == dict.fromkeys(range(1, CALENDARS + 1), EVENTS_PER_FEED)
    wait_for(lambda: not lease_keys(redis_conn), timeout=35, interval=0.5, what="every lease to be gone")

    again = airflow.trigger("ics_sync")
    assert airflow.wait_finished("ics_sync", again, timeout=300).state == "success"
    _truthful(airflow, again, "success")
    assert _consistent(app_db_url) == dict.fromkeys(range(1, CALENDARS + 1), EVENTS_PER_FEED)


def test_redis_restarted_while_leases_are_held_the_run_finishes_and_no_lease_outlives_it(
    feeds, db, app_db_url, airflow, dag_on, restart_service, redis_conn
):
    airflow.set_settings(ics_allow_hosts=feeds.host_port)
    dag_on("ics_sync")
    _calendars(feeds, db, slow={10: 16.0})

    run_id = airflow.trigger("ics_sync")
    ti, proc = airflow.wait_running_process("ics_sync", run_id, "sync_batch", 0)
    wait_for(lambda: feeds.hits("/cal10.ics") and connected_to(proc, feeds.port), timeout=120,
             interval=0.2, what="the task to be fetching calendar 10")
    owner = f"ics_sync/{run_id}/sync_batch/0"
    assert leases(redis_conn)["almanac:lease:ics_sync:10"][0] == owner
    # Down for longer than the renewal interval (ttl/3 = 10 s): one renewal fails; the
    # lease (kept by Redis's append-only file, TTL and all) is renewed once Redis is back.
    restart_service("redis", down_s=11)
    _fast(feeds)

    run = airflow.wait_finished("ics_sync", run_id, timeout=300)
    tries = airflow.tries("ics_sync", run_id, "sync_batch", 0)
    print("redis restart:", run.state, [(t.try_number, t.state) for t in tries])
    assert run.state == "success", [(t.try_number, t.state) for t in tries]
    _truthful(airflow, run_id, "success")
    assert _consistent(app_db_url) == dict.fromkeys(range(1, CALENDARS + 1), EVENTS_PER_FEED)
    # Released by the run, or at the latest expired within its TTL after the run.
    wait_for(lambda: not lease_keys(redis_conn), timeout=35, interval=0.5, what="every lease to be gone")

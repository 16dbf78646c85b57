"""SIGKILL of a task process in the middle of its batch (ics_sync, google_calendar_push): the
retry of the same task instance finishes the work, nothing is stored or sent twice, the dead
try's lease does not outlive it, and the run's state and summary tell what happened."""

from __future__ import annotations

import json

import psycopg
import pytest

from almanac.google.accounts import connect_account
from almanac.google.crypto import TokenCipher
from almanac.google.mapping import google_event_id
from tests.e2e.conftest import wait_for
from tests.faults.helpers import (
    connected_to,
    duplicate_events,
    event_counts,
    feed,
    kill_task_process,
    lease_keys,
    leases,
    slow_google,
)
from tests.support.feed_server import Route

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CALENDARS = 20
SLOW = 10  # the calendar whose feed trickles in: its fetch is where the task dies
EVENTS_PER_FEED = 2


def test_ics_sync_task_killed_mid_batch_is_retried_and_stores_every_event_once(
    feeds, db, app_db_url, airflow, dag_on, redis_conn
):
    airflow.set_settings(ics_allow_hosts=feeds.host_port)
    dag_on("ics_sync")  # before the calendars exist: the run it owes finds nothing to do
    for c in range(1, CALENDARS + 1):
        feeds.routes[f"/cal{c}.ics"] = Route(body=feed(c, EVENTS_PER_FEED))
    body = feed(SLOW, EVENTS_PER_FEED)
    feeds.routes[f"/cal{SLOW}.ics"] = Route(body=body, chunk_size=max(1, len(body) // 20), chunk_delay=1.0)
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for c in range(1, CALENDARS + 1):
        db.execute("INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (%s, 1, %s, %s)",
                   (c, f"c{c}", feeds.url(f"/cal{c}.ics")))
    db.commit()

    run_id = airflow.trigger("ics_sync")
    ti, proc = airflow.wait_running_process("ics_sync", run_id, "sync_batch", 0)
    wait_for(lambda: feeds.hits(f"/cal{SLOW}.ics") and connected_to(proc, feeds.port), timeout=120,
             interval=0.2, what=f"the task to be fetching calendar {SLOW}")
    owner = f"ics_sync/{run_id}/sync_batch/0"
    assert leases(redis_conn)[f"almanac:lease:ics_sync:{SLOW}"][0] == owner

    kill_task_process(proc)
    feeds.routes[f"/cal{SLOW}.ics"] = Route(body=body)  # the retry need not wait as long
    committed = event_counts(app_db_url)  # what the dead try had committed, calendar by calendar
    assert set(committed) == set(range(1, SLOW)), committed
    held = leases(redis_conn).get(f"almanac:lease:ics_sync:{SLOW}")
    assert held is not None and held[0] == owner and 0 < held[1] <= 30_000  # left behind, bounded by its TTL

    run = airflow.wait_finished("ics_sync", run_id, timeout=300)
    tries = airflow.tries("ics_sync", run_id, "sync_batch", 0)
    assert run.state == "success", [(t.try_number, t.state) for t in tries]
    assert [t.try_number for t in tries] == [1, 2] and tries[-1].state == "success"
    assert tries[0].state in ("failed", "up_for_retry")

    # Every calendar's events exactly once; the dead try's commits kept, not rewritten.
    assert event_counts(app_db_url) == dict.fromkeys(range(1, CALENDARS + 1), EVENTS_PER_FEED)
    assert duplicate_events(app_db_url) == []
    with psycopg.connect(app_db_url) as conn:
        states = conn.execute(
            "SELECT sync_status, event_count, count(*) FROM calendars GROUP BY 1, 2"
        ).fetchall()
    assert states == [("ok", EVENTS_PER_FEED, CALENDARS)]

    total = airflow.summary("ics_sync", run_id)
    assert (total["totalCalendars"], total["successCount"], total["errorCount"], total["busyCount"]) == (
        CALENDARS, CALENDARS, 0, 0)
    assert (total["batches"], total["failedBatches"], total["complete"]) == (1, 0, True)
    assert total["eventsAdded"] == CALENDARS * EVENTS_PER_FEED - sum(committed.values())
    assert total["eventsUpdated"] == total["eventsDeleted"] == 0
    assert sorted(total["changedCalendarIds"]) == list(range(SLOW, CALENDARS + 1))

    # The retry took the lease over and released it: none is left (bounded by the TTL anyway).
    wait_for(lambda: not lease_keys(redis_conn), timeout=35, interval=0.5, what="every lease to be gone")


ALICE, BOB = 1, 2
CALENDAR = 7
EVENTS = 120  # per member; the push commits its links every 50


def _insert_events(db, calendar_id: int, count: int) -> None:
    """``count`` daily events from tomorrow on: inside the push window (the sync window of a run now)."""
    db.execute(
        """
        INSERT INTO events (calendar_id, uid, summary, starts_at, ends_at, content_hash)
        SELECT %s, 'push-' || n || '@almanac.test', 'Practice ' || n,
               date_trunc('hour', now()) + n * interval '1 day',
               date_trunc('hour', now()) + n * interval '1 day' + interval '1 hour', 'h' || n
          FROM generate_series(1, %s) AS n
        """,
        (calendar_id, count),
    )


@pytest.fixture
def google():
    """A fake Google whose every call takes 80 ms; it outlives ``dag_on`` (requested first), so
    a scheduled reconciliation still finishing at teardown can reach it."""
    with slow_google(delay_s=0.08) as fake:
        yield fake


def test_google_push_task_killed_mid_batch_creates_each_google_event_exactly_once(
    google, db, app_db_url, airflow, airflow_stack, dag_on
):
    airflow.set_settings()
    dag_on("google_calendar_push")  # before the data exists: the scheduled run it owes finds nothing
    airflow.set_connection(
        "google_oauth", conn_type="generic", login="almanac-faults", password="secret",
        extra=json.dumps({"token_uri": google.token_uri, "api_endpoint": google.api_endpoint}),
    )
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    owners = {ALICE: "alice", BOB: "bob"}
    for user_id, name in owners.items():
        db.execute("INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
                   (user_id, name, f"{name}@x.test"))
    db.execute("INSERT INTO calendars (id, tenant_id, name) VALUES (%s, 1, 'team')", (CALENDAR,))
    for user_id in owners:
        db.execute("INSERT INTO calendar_members (calendar_id, user_id) VALUES (%s, %s)", (CALENDAR, user_id))
    _insert_events(db, CALENDAR, EVENTS)
    db.execute("INSERT INTO calendar_push_pending (calendar_id) VALUES (%s)", (CALENDAR,))
    cipher = TokenCipher(airflow_stack["AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY"])
    for user_id, name in owners.items():
        connect_account(db, cipher, user_id, google.grant(name), account_subject=f"sub-{name}")
    db.commit()

    run_id = airflow.trigger("google_calendar_push", {"calendar_ids": [CALENDAR]})
    ti, proc = airflow.wait_running_process("google_calendar_push", run_id, "push_batch", 0)
    # Past Alice's first commit of 50 links, well before her last event.
    wait_for(lambda: len(google.calls("POST")) >= 70, timeout=120, interval=0.05,
             what="70 events.insert calls")
    kill_task_process(proc)
    google.delay = 0.0
    with psycopg.connect(app_db_url) as conn:
        links_at_kill = conn.execute("SELECT count(*) FROM google_event_links").fetchone()[0]
    on_google_at_kill = sum(len(google.live_events(name)) for name in owners.values())
    # The crash window this test is about: events on Google whose link row was never committed.
    assert on_google_at_kill > links_at_kill, (on_google_at_kill, links_at_kill)

    run = airflow.wait_finished("google_calendar_push", run_id, timeout=300)
    tries = airflow.tries("google_calendar_push", run_id, "push_batch", 0)
    assert run.state == "success", [(t.try_number, t.state) for t in tries]
    assert [t.try_number for t in tries] == [1, 2] and tries[-1].state == "success"

    with psycopg.connect(app_db_url) as conn:
        links = conn.execute(
            "SELECT user_id, uid, recurrence_id, google_event_id FROM google_event_links"
        ).fetchall()
        pending = conn.execute("SELECT count(*) FROM calendar_push_pending").fetchone()[0]
        rejections = conn.execute("SELECT count(*) FROM google_push_rejections").fetchone()[0]
    for user_id, name in owners.items():
        live = google.live_events(name)
        expected = {google_event_id(user_id, CALENDAR, f"push-{n}@almanac.test", "")
                    for n in range(1, EVENTS + 1)}
        assert set(live) == expected  # each desired event once, under its deterministic id
        assert len({(e["summary"], json.dumps(e["start"], sort_keys=True)) for e in live.values()}) == EVENTS
        assert {row[3] for row in links if row[0] == user_id} == expected  # links match Google
    assert len(links) == 2 * EVENTS and rejections == 0

    total = airflow.summary("google_calendar_push", run_id)
    assert (total["totalMembers"], total["successCount"], total["errorCount"], total["complete"]) == (
        2, 2, 0, True)
    assert total["eventsCreated"] == 2 * EVENTS - links_at_kill  # the retry did the rest, once
    assert pending == 0  # mark_pending_pushed cleared the calendar after the successful run

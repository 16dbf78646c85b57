"""sync_batch: fetch (real HTTP), parse and store, per calendar, against the real DB and Redis."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from almanac.batches import summarize_batch
from almanac.ics.sync import ICS_KIND, LEASE_JOB
from almanac.leases import LeaseKeeper, lease_key
from almanac.settings import Settings
from tests.support.feed_server import Route
from tests.support.ics_sync import sync_by_id

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"
# The corpus's DST feed is from 2019: anchor the run there so its events are in the window.
INSTANT = datetime(2019, 3, 1, 12, tzinfo=UTC)
FAST = Settings(ics_fetch_attempts=2, ics_retry_max_wait_s=1)


def feed(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


class Run(list):
    """The per-calendar results of one sync_batch, with the batch summary at hand."""

    @property
    def results(self):
        return self

    def by_id(self):
        return {r.item_id: r for r in self}

    def summary(self):
        return summarize_batch(ICS_KIND, self)


def run(db, server, ids, **kw):
    kw.setdefault("settings", FAST)
    kw.setdefault("instant", INSTANT)
    return Run(sync_by_id(db, server, ids, **kw).values())


def counts(result):
    return tuple(result.counts.get(k, 0) for k in ("eventsAdded", "eventsUpdated", "eventsDeleted"))


def events(db, cid):
    db.commit()
    return db.execute(
        "SELECT uid, recurrence_id, content_hash, xmin::text FROM events"
        " WHERE calendar_id = %s ORDER BY 1, 2",
        (cid,),
    ).fetchall()


def state(db, cid):
    db.commit()
    return db.execute(
        "SELECT sync_status, last_error, consecutive_failures, etag IS NOT NULL, body_sha256 IS NOT NULL "
        "FROM calendars WHERE id = %s",
        (cid,),
    ).fetchone()


def test_first_sync_stores_the_feed_and_records_success(db, server, calendars):
    calendars(1, Route(body=feed("rie_daylight_saving_time.ics"), etag='"v1"'))
    result = run(db, server, [1])
    (only,) = result.results
    assert only.status == "updated" and only.counts["eventsAdded"] > 0
    assert len(events(db, 1)) == only.counts["eventsAdded"]
    assert state(db, 1) == ("ok", None, 0, True, True)


def test_unchanged_feed_is_neither_parsed_nor_written(db, server, calendars):
    calendars(1, Route(body=feed("rie_daylight_saving_time.ics"), etag='"v1"'))
    run(db, server, [1])
    before = events(db, 1)
    again = run(db, server, [1])
    assert again.results[0].status == "unchanged"
    assert events(db, 1) == before  # xmin unchanged: not a single row rewritten
    assert server.requests[-1].headers.get("If-None-Match") == '"v1"'


def test_dtstamp_only_change_writes_no_event(db, server, calendars):
    """Google rewrites DTSTAMP on every fetch: the two corpus files differ only there."""
    calendars(1, Route(body=feed("rie_daylight_saving_time.ics")))
    run(db, server, [1])
    before = events(db, 1)
    calendars(1, Route(body=feed("rie_machbar_16_feb_2019.ics")))
    result = run(db, server, [1])
    assert counts(result[0]) == (0, 0, 0)
    assert events(db, 1) == before


def test_one_bad_feed_never_fails_the_others(db, server, calendars):
    calendars(1, Route(body=feed("rie_three_events.ics")))
    calendars(2, Route(body=b"<html>login</html>", content_type="text/html"))
    calendars(3, Route(status=404, body=b"gone"))
    calendars(4, Route(status=503, body=b"busy", headers={"Retry-After": "1"}))
    # calendar 5 has no route: 404
    result = run(db, server, [1, 2, 3, 4, 5], instant=datetime(2019, 3, 3, tzinfo=UTC)).by_id()
    assert result[1].status == "updated"
    assert [result[c].status for c in (2, 3, 4, 5)] == ["error"] * 4
    assert "FeedNotICalendarError" in result[2].error
    assert "FeedHttpError" in result[3].error and "404" in result[3].error
    assert "FeedUnavailableError" in result[4].error
    assert state(db, 2)[:3] == ("error", result[2].error, 1)
    assert server.hits("/cal4.ics") == FAST.ics_fetch_attempts  # transient: retried inside the task
    assert [result[c].permanent for c in (2, 3, 4)] == [True, True, False]


def test_an_emptied_feed_is_held_back(db, server, calendars):
    calendars(1, Route(body=feed("rie_daylight_saving_time.ics")))
    run(db, server, [1])
    kept = events(db, 1)
    assert len(kept) >= 10
    calendars(1, Route(body=b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nEND:VCALENDAR\r\n"))
    result = run(db, server, [1])
    assert result.results[0].status == "held"
    assert events(db, 1) == kept
    assert state(db, 1)[0] == "held"


def test_a_calendar_leased_by_another_run_is_busy_not_a_success(db, server, calendars, redis_client):
    calendars(1, Route(body=feed("rie_three_events.ics")))
    with (
        LeaseKeeper(redis_client, "ics_sync/other-run/sync_batch/0") as other,
        other.hold(lease_key(LEASE_JOB, 1)),
    ):
        with LeaseKeeper(redis_client, "ics_sync_requested/run/sync_batch/0") as mine:
            result = run(db, server, [1], leases=mine, settings=Settings(ics_lease_wait_s=1))
    assert result[0].status == "busy" and not result[0].permanent
    assert result.summary()["errorCount"] == 1 and result.summary()["busyCount"] == 1
    assert server.hits("/cal1.ics") == 0


def test_a_busy_calendar_is_synced_once_the_other_run_lets_go(db, server, calendars, redis_client):
    calendars(1, Route(body=feed("rie_three_events.ics")))
    calendars(2, Route(body=feed("rie_three_events.ics")))
    other = LeaseKeeper(redis_client, "ics_sync/other-run/sync_batch/0")
    held = other.acquire(lease_key(LEASE_JOB, 1))
    waits = []

    def sleep(seconds):  # the other run finishes while this one waits at the end of its batch
        waits.append(seconds)
        other.release(held)

    with LeaseKeeper(redis_client, "ics_sync_requested/run/sync_batch/0") as mine:
        result = run(db, server, [1, 2], leases=mine, settings=Settings(ics_lease_wait_s=5), sleep=sleep)
    other.close()
    assert [r.status for r in result] == ["updated", "updated"] and waits
    assert redis_client.exists(lease_key(LEASE_JOB, 1)) == 0  # released after the sync


def test_a_retry_of_the_same_task_takes_over_the_lease_its_killed_try_left(
    db, server, calendars, redis_client
):
    """Regression (kill -9 mid-batch): the dead try's lock made its own retry skip the calendar."""
    calendars(1, Route(body=feed("rie_three_events.ics")))
    owner = "ics_sync/scheduled__2026/sync_batch/3"
    dead_try = LeaseKeeper(redis_client, owner)
    dead_try.acquire(lease_key(LEASE_JOB, 1))
    dead_try._stop.set()  # as after SIGKILL: never renewed, never released
    with LeaseKeeper(redis_client, owner) as retry:
        result = run(db, server, [1], leases=retry)
    assert result[0].status == "updated"


def test_a_stored_change_is_marked_pending_for_google_in_the_same_transaction(db, server, calendars):
    calendars(1, Route(body=feed("rie_three_events.ics")))
    calendars(2, Route(status=404))
    run(db, server, [1, 2], instant=datetime(2019, 3, 3, tzinfo=UTC))
    assert db.execute("SELECT calendar_id, generation FROM calendar_push_pending").fetchall() == [(1, 1)]
    run(db, server, [1, 2], instant=datetime(2019, 3, 3, tzinfo=UTC))  # unchanged: no new generation
    assert db.execute("SELECT calendar_id, generation FROM calendar_push_pending").fetchall() == [(1, 1)]
    calendars(1, Route(body=feed("rie_three_events_one_edited.ics")))
    run(db, server, [1], instant=datetime(2019, 3, 3, tzinfo=UTC))
    assert db.execute("SELECT calendar_id, generation FROM calendar_push_pending").fetchall() == [(1, 2)]


def test_an_exception_that_is_not_ours_costs_only_its_calendar(db, server, calendars):
    """The parse raises a third-party OverflowError (``tests.support.slow_targets`` wraps the real
    parse_feed in the real worker process and raises it for a feed that asks for it)."""
    from almanac.ics.budget import ParsePool

    calendars(1, Route(body=feed("rie_three_events.ics")))
    calendars(
        2,
        Route(
            body=feed("rie_three_events.ics").replace(
                b"VERSION:2.0", b"VERSION:2.0\r\nX-ALMANAC-TEST-MISBEHAVE:overflow", 1
            )
        ),
    )
    calendars(3, Route(body=feed("rie_three_events.ics")))
    with ParsePool(parse_target="tests.support.slow_targets:parse_feed_or_misbehave") as pool:
        result = run(db, server, [1, 2, 3], instant=datetime(2019, 3, 3, tzinfo=UTC), parse_pool=pool).by_id()
    assert [result[c].status for c in (1, 2, 3)] == ["updated", "error", "updated"]
    assert "OverflowError" in result[2].error
    assert state(db, 2)[:3] == ("error", result[2].error, 1)

"""sync_batch: fetch (real HTTP), parse and store, per calendar, against the real DB and Redis."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from almanac.ics.sync import LOCK_KEY, sync_batch
from almanac.settings import Settings
from tests.support.feed_server import FeedServer, Route

UTC = timezone.utc
CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"
# The corpus's DST feed is from 2019: anchor the run there so its events are in the window.
INSTANT = datetime(2019, 3, 1, 12, tzinfo=UTC)
FAST = Settings(ics_fetch_attempts=2, ics_retry_max_wait_s=1)


def feed(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


@pytest.fixture
def server():
    with FeedServer() as srv:
        yield srv


@pytest.fixture
def calendars(db, server):
    """Five calendars on the local feed server; returns a function to point one at a route."""
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for cid in range(1, 6):
        db.execute(
            "INSERT INTO calendars (id, tenant_id, name, time_zone, source_url) VALUES (%s, 1, %s, 'Europe/Berlin', %s)",
            (cid, f"c{cid}", server.url(f"/cal{cid}.ics")),
        )
    db.commit()

    def route(cid: int, r: Route) -> None:
        server.routes[f"/cal{cid}.ics"] = r

    return route


def run(db, server, ids, **kw):
    kw.setdefault("settings", FAST)
    return sync_batch(db, ids, instant=kw.pop("instant", INSTANT), allow_hosts=server.allow_hosts,
                      sleep=lambda s: None, **kw)


def events(db, cid):
    db.commit()
    return db.execute(
        "SELECT uid, recurrence_id, content_hash, xmin::text FROM events WHERE calendar_id = %s ORDER BY 1, 2",
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
    assert only.status == "updated" and only.eventsAdded > 0
    assert len(events(db, 1)) == only.eventsAdded
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
    assert (result.results[0].eventsAdded, result.results[0].eventsUpdated, result.results[0].eventsDeleted) == (0, 0, 0)
    assert events(db, 1) == before


def test_one_bad_feed_never_fails_the_others(db, server, calendars):
    calendars(1, Route(body=feed("rie_three_events.ics")))
    calendars(2, Route(body=b"<html>login</html>", content_type="text/html"))
    calendars(3, Route(status=404, body=b"gone"))
    calendars(4, Route(status=503, body=b"busy", headers={"Retry-After": "1"}))
    # calendar 5 has no route: 404
    result = {r.calendarId: r for r in run(db, server, [1, 2, 3, 4, 5], instant=datetime(2019, 3, 3, tzinfo=UTC)).results}
    assert result[1].status == "updated"
    assert [result[c].status for c in (2, 3, 4, 5)] == ["error"] * 4
    assert "FeedNotICalendarError" in result[2].error
    assert "FeedHttpError" in result[3].error and "404" in result[3].error
    assert "FeedUnavailableError" in result[4].error
    assert state(db, 2)[:3] == ("error", result[2].error, 1)
    assert server.hits("/cal4.ics") == FAST.ics_fetch_attempts  # transient: retried inside the task


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


def test_a_calendar_locked_by_another_run_is_skipped(db, server, calendars, redis_client):
    calendars(1, Route(body=feed("rie_three_events.ics")))
    redis_client.set(LOCK_KEY.format(calendar_id=1), "other-run", ex=60)
    result = run(db, server, [1], redis=redis_client)
    assert result.results[0].status == "skipped"
    assert server.hits("/cal1.ics") == 0


def test_unknown_calendar_is_skipped_not_failed(db, server, calendars):
    result = run(db, server, [999])
    assert result.results[0].status == "skipped"
    assert result.summary()["errorCount"] == 0


def test_summary_has_the_spec_shape(db, server, calendars):
    calendars(1, Route(body=feed("rie_three_events.ics")))
    calendars(2, Route(status=404))
    summary = run(db, server, [1, 2], instant=datetime(2019, 3, 3, tzinfo=UTC)).summary()
    assert {k: summary[k] for k in ("totalCalendars", "successCount", "errorCount")} == {
        "totalCalendars": 2, "successCount": 1, "errorCount": 1,
    }
    assert summary["eventsAdded"] == 3 and summary["changedCalendarIds"] == [1]
    assert {r["calendarId"] for r in summary["results"]} == {1, 2}

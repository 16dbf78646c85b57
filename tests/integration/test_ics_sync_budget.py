"""A hard budget per calendar: hostile feeds, served over real HTTP, cost only their own calendar.

Each batch puts a hostile feed between good ones and syncs it with ``sync_batch`` against the
real database: the good calendars are synced, the hostile one is recorded with a message that
names the limit it hit (or, where ``parse.py`` already defuses that kind of feed, synced with
a warning), the parse worker is replaced after a kill, and no worker process is left behind.
Feeds that really loop come from ``tests/support/slow_targets.py`` (the real ``parse_feed``
unless the feed asks it to misbehave) so the kill is tested even when ``parse.py`` refuses every
hostile rule we know. No assertion is on a duration.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
import pytest

from almanac.batches import summarize_batch
from almanac.ics.budget import ParsePool
from almanac.ics.sync import ICS_KIND, MAX_STORED_WARNINGS, MAX_WARNING_CHARS, sync_batch
from almanac.settings import Settings
from tests.support.feed_server import Route
from tests.support.ics_sync import sync_by_id

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"
INSTANT = datetime(2019, 3, 3, tzinfo=UTC)
GOOD = (CORPUS / "rie_three_events.ics").read_bytes()
#: Small budgets, so hostile feeds hit them quickly; far above what the good feeds need.
HOSTILE = Settings(
    ics_fetch_attempts=1,
    ics_parse_cpu_s=3,
    ics_parse_memory_mb=256,
    ics_calendar_budget_s=120,
    ics_max_bytes=64 * 1024 * 1024,
)
MISBEHAVING = "tests.support.slow_targets:parse_feed_or_misbehave"
NAMES_A_LIMIT = re.compile(
    r"FeedBudgetExceededError: calendar \d+: .*budget of [\d.]+ ?(s|MiB) (CPU time|memory|wall time) "
    r"\((ics_parse_cpu_s|ics_parse_memory_mb|ics_calendar_budget_s)\)"
)

H = b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//almanac//hostile//EN\r\n"
F = b"END:VCALENDAR\r\n"


def event(uid: bytes, *lines: bytes, start: bytes = b"20190310T100000Z") -> bytes:
    return (
        b"BEGIN:VEVENT\r\nUID:"
        + uid
        + b"\r\nDTSTART:"
        + start
        + b"\r\nDURATION:PT1H\r\n"
        + b"".join(line + b"\r\n" for line in lines)
        + b"SUMMARY:hostile\r\nEND:VEVENT\r\n"
    )


def _hostile_feeds() -> dict[str, tuple[bytes, str]]:
    """name -> (body, expectation): ``limit`` (must hit one) or ``isolated`` (any outcome of its own)."""
    tiny = b"BEGIN:VEVENT\r\nDTSTART:20190301\r\nEND:VEVENT\r\n"
    expensive_rule = b"RRULE:FREQ=SECONDLY;BYSETPOS=-1;BYMONTHDAY=29;BYMONTH=2"
    return {
        # Reading a million components is CPU and memory no parser can avoid.
        "a million tiny events": (H + tiny * 1_000_000 + F, "limit"),
        "a rule that never advances": (H + event(b"i0", b"RRULE:FREQ=DAILY;INTERVAL=0") + F, "isolated"),
        "a secondly rule on a date that does not exist": (
            H + event(b"s30", b"RRULE:FREQ=SECONDLY;BYMONTH=2;BYMONTHDAY=30") + F,
            "isolated",
        ),
        "forty expensive series": (
            H + b"".join(event(b"x%d" % i, expensive_rule) for i in range(40)) + F,
            "isolated",
        ),
        "components nested 400,000 deep": (
            H
            + b"BEGIN:VEVENT\r\nUID:deep\r\nDTSTART:20190310T100000Z\r\n"
            + b"BEGIN:X\r\n" * 400_000
            + b"END:X\r\n" * 400_000
            + b"END:VEVENT\r\n"
            + F,
            "isolated",
        ),
        "BEGIN lines that never end": (H + b"BEGIN:VEVENT\r\n" * 300_000 + F, "isolated"),
        "a 9 MB line": (H + event(b"line", b"DESCRIPTION:" + b"a" * 9_000_000) + F, "isolated"),
        "a 1 MB description on every day of the year": (
            H + event(b"daily", b"RRULE:FREQ=DAILY", b"DESCRIPTION:" + b"d" * 1_000_000) + F,
            "isolated",
        ),
        "NUL bytes": (H + event(b"nul\x00uid", b"DESCRIPTION:a\x00b", b"LOCATION:\x00") + F, "isolated"),
        "invalid UTF-8": (
            H + event(b"utf8", b"DESCRIPTION:\xff\xfe\xc3\x28 \xed\xa0\x80 \xf8\x88") + F,
            "isolated",
        ),
        "a date at the edge of the range under X-WR-TIMEZONE": (
            H
            + b"X-WR-TIMEZONE:Pacific/Kiritimati\r\n"
            + event(b"edge", b"DTEND:00010101T000000Z", start=b"00010101T000000Z")
            + F,
            "isolated",
        ),
        "200,000 parameters on one property": (
            H + event(b"params", b"X-A;" + b";".join(b"P%d=v" % i for i in range(200_000)) + b":v") + F,
            "isolated",
        ),
        "an RDATE of 100,000 dates": (
            H
            + event(
                b"rdate",
                b"RDATE:"
                + b",".join(b"2019%02d%02dT100000Z" % (m, d) for m in range(1, 13) for d in range(1, 29))
                * 300,
            )
            + F,
            "isolated",
        ),
        "an unterminated feed of junk": (H + b"\x00\xff" * 4_000_000, "isolated"),
    }


HOSTILE_FEEDS = _hostile_feeds()


def sync(db, server, ids, *, settings=HOSTILE, **kw):
    return sync_by_id(db, server, ids, instant=INSTANT, settings=settings, **kw)


def state(db, cid):
    db.commit()
    return db.execute(
        "SELECT sync_status, last_error, consecutive_failures, sync_warnings, sync_warning_count"
        " FROM calendars WHERE id = %s",
        (cid,),
    ).fetchone()


def workers_of_this_process() -> list[int]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("almanac.ics.budget" in part for part in child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def assert_good(db, result) -> None:
    assert result.status == "updated", result.error
    assert state(db, result.item_id)[0] == "ok"


@pytest.mark.parametrize("name", list(HOSTILE_FEEDS))
def test_a_hostile_feed_costs_only_its_own_calendar(db, server, calendars, name):
    body, expectation = HOSTILE_FEEDS[name]
    calendars(1, Route(body=GOOD))
    calendars(2, Route(body=body))
    calendars(3, Route(body=GOOD))
    with ParsePool.from_settings(HOSTILE) as pool:
        result = sync(db, server, [1, 2, 3], parse_pool=pool)
        killed = pool.started - 1
    assert_good(db, result[1])
    assert_good(db, result[3])
    hostile = result[2]
    status, last_error, failures, _, _ = state(db, 2)
    if expectation == "limit":
        assert hostile.status == "error" and hostile.permanent
        assert NAMES_A_LIMIT.search(hostile.error), hostile.error
        assert killed == 1  # the worker was killed and a fresh one parsed calendar 3
    assert hostile.status in ("updated", "unchanged", "error"), hostile.error
    if hostile.status == "error":
        assert (status, last_error, failures) == ("error", hostile.error, 1)
        assert "\x00" not in last_error
    else:
        assert (status, last_error) == ("ok", None)
    assert workers_of_this_process() == []


def test_the_text_of_a_feed_is_bounded_in_the_database_by_the_settings(db, server, calendars):
    """Instances x a 1 MB DESCRIPTION must not multiply into gigabytes of rows."""
    body, _ = HOSTILE_FEEDS["a 1 MB description on every day of the year"]
    calendars(1, Route(body=body))
    settings = Settings(ics_max_event_text_chars=10_000, ics_max_feed_text_chars=1_000_000)
    result = sync(db, server, [1], settings=settings)
    assert result[1].status == "updated", result[1].error
    rows, longest, total = db.execute(
        "SELECT count(*), max(length(description)),"
        " sum(length(summary) + length(description) + length(location)) FROM events WHERE calendar_id = 1"
    ).fetchone()
    assert rows > 300 and longest <= 10_000 and total <= 1_000_000
    assert result[1].detail["warningCount"] >= 1 and state(db, 1)[4] == result[1].detail["warningCount"]


@pytest.mark.parametrize(
    ("how", "limit"),
    [("spin", "CPU time"), ("grow", "memory"), ("sleep", "wall time"), ("crash", "SIGSEGV")],
)
def test_a_parse_that_really_misbehaves_is_killed_and_the_batch_goes_on(db, server, calendars, how, limit):
    settings = Settings(
        ics_fetch_attempts=1, ics_parse_cpu_s=2, ics_parse_memory_mb=96, ics_calendar_budget_s=8
    )
    calendars(1, Route(body=GOOD))
    calendars(
        2,
        Route(
            body=GOOD.replace(
                b"BEGIN:VEVENT", b"X-ALMANAC-TEST-MISBEHAVE:" + how.encode() + b"\r\nBEGIN:VEVENT", 1
            )
        ),
    )
    calendars(3, Route(body=GOOD))
    with ParsePool.from_settings(settings, parse_target=MISBEHAVING) as pool:
        result = sync(db, server, [1, 2, 3], settings=settings, parse_pool=pool)
        assert pool.started == 2  # one worker for calendar 1, a fresh one after the kill
    assert_good(db, result[1])
    assert_good(db, result[3])
    assert result[2].status == "error" and result[2].permanent
    assert limit in result[2].error
    if how == "crash":
        assert result[2].error.startswith("FeedParserCrashedError: calendar 2: the parse worker was killed")
    else:
        assert NAMES_A_LIMIT.search(result[2].error), result[2].error
    assert state(db, 2)[:3] == ("error", result[2].error, 1)
    assert workers_of_this_process() == []


def test_several_hostile_feeds_in_one_batch_each_cost_only_their_calendar(db, server, calendars):
    settings = Settings(
        ics_fetch_attempts=1, ics_parse_cpu_s=2, ics_parse_memory_mb=96, ics_calendar_budget_s=8
    )
    misbehave = {2: b"spin", 4: b"grow", 6: b"crash", 8: b"sleep"}
    for cid in range(1, 10):
        body = GOOD
        if cid in misbehave:
            body = GOOD.replace(
                b"BEGIN:VEVENT", b"X-ALMANAC-TEST-MISBEHAVE:" + misbehave[cid] + b"\r\nBEGIN:VEVENT", 1
            )
        calendars(cid, Route(body=body))
    with ParsePool.from_settings(settings, parse_target=MISBEHAVING) as pool:
        results = sync_batch(
            db,
            range(1, 10),
            instant=INSTANT,
            settings=settings,
            allow_hosts=server.allow_hosts,
            parse_pool=pool,
        )
        assert pool.started == 5
    summary = summarize_batch(ICS_KIND, results)
    assert (summary["successCount"], summary["errorCount"]) == (5, 4)
    assert [r.status for r in results] == ["updated", "error"] * 4 + ["updated"]
    assert summary["permanentOnly"] is True  # a retry would fail the same way: no Airflow retries
    assert workers_of_this_process() == []


def test_a_batch_stops_its_own_worker_when_it_ends(db, server, calendars):
    calendars(1, Route(body=GOOD))
    result = sync(db, server, [1])
    assert result[1].status == "updated"
    assert workers_of_this_process() == []


def test_an_unchanged_feed_never_reaches_the_parse_worker(db, server, calendars):
    calendars(1, Route(body=GOOD, etag='"v1"'))
    sync(db, server, [1])
    with ParsePool.from_settings(HOSTILE) as pool:
        again = sync(db, server, [1], parse_pool=pool)
        assert again[1].status == "unchanged"
        assert pool.started == 0 and pool.worker_pid is None


def test_a_slow_feed_stops_at_the_calendar_budget_during_fetch(db, server, calendars):
    settings = Settings(ics_fetch_attempts=3, ics_read_timeout_s=20, ics_calendar_budget_s=2)
    calendars(1, Route(body=GOOD))
    calendars(2, Route(body=GOOD, delay=6))
    calendars(3, Route(body=GOOD))
    result = sync(db, server, [1, 2, 3], settings=settings)
    assert_good(db, result[1])
    assert_good(db, result[3])
    assert result[2].status == "error" and result[2].permanent
    assert "budget of 2s wall time (ics_calendar_budget_s) during fetch" in result[2].error
    assert server.hits("/cal2.ics") == 1  # the retries the budget could not afford were not made


def test_a_store_that_cannot_finish_stops_at_the_calendar_budget(db, server, calendars, migrated):
    """A row lock held elsewhere makes calendar 2's write wait: the statement timeout ends it."""
    settings = Settings(ics_fetch_attempts=1, ics_calendar_budget_s=3)
    calendars(1, Route(body=GOOD))
    calendars(2, Route(body=GOOD))
    calendars(3, Route(body=GOOD))
    sync(db, server, [2], settings=settings)
    db.execute("UPDATE calendars SET body_sha256 = NULL, parse_groups = NULL WHERE id = 2")  # all again
    db.execute("UPDATE events SET content_hash = 'stale' WHERE calendar_id = 2")
    db.commit()
    with psycopg.connect(migrated) as other:
        other.execute("SELECT 1 FROM events WHERE calendar_id = 2 FOR UPDATE").fetchall()
        result = sync(db, server, [1, 2, 3], settings=settings)
        other.rollback()
    assert_good(db, result[1])
    assert_good(db, result[3])
    assert result[2].status == "error"
    assert "budget of 3s wall time (ics_calendar_budget_s) during store" in result[2].error
    assert db.execute(
        "SELECT count(*) FROM events WHERE calendar_id = 2 AND content_hash = 'stale'"
    ).fetchone()[0]
    assert db.execute("SHOW statement_timeout").fetchone()[0] == "0"  # only that transaction had one


def _unknown_zones(n: int) -> bytes:
    return (
        H
        + b"".join(
            event(b"z%d" % i, start=b"20190310T100000").replace(
                b"DTSTART:", b"DTSTART;TZID=Nowhere/Zone%03d" % i + b"x" * 400 + b":"
            )
            for i in range(n)
        )
        + F
    )


def test_parse_warnings_are_stored_on_the_calendar_and_shown_in_the_result(db, server, calendars):
    calendars(1, Route(body=_unknown_zones(30)))
    result = sync(db, server, [1])[1]
    assert result.status == "updated"
    _, _, _, warnings, count = state(db, 1)
    assert count >= 30 and len(warnings) == MAX_STORED_WARNINGS
    assert all(len(w) <= MAX_WARNING_CHARS for w in warnings) and "Nowhere/Zone" in warnings[0]
    assert result.detail == {"warningCount": count, "firstWarning": warnings[0]}
    assert summarize_batch(ICS_KIND, [result])["results"][0]["warningCount"] == count


def test_parse_warnings_are_cleared_by_a_sync_without_any(db, server, calendars):
    calendars(1, Route(body=_unknown_zones(2)))
    sync(db, server, [1])
    assert state(db, 1)[4] >= 2
    calendars(1, Route(body=GOOD))
    result = sync(db, server, [1])[1]
    assert result.detail == {}
    assert state(db, 1)[3:] == (None, 0)


def test_a_failed_sync_keeps_the_warnings_of_the_last_parse(db, server, calendars):
    calendars(1, Route(body=_unknown_zones(2)))
    sync(db, server, [1])
    before = state(db, 1)[3:]
    calendars(1, Route(status=404, body=b"gone"))
    assert sync(db, server, [1])[1].status == "error"
    assert state(db, 1)[3:] == before

"""sync_batch: a changed feed re-expands only its changed events; the rows are what a full sync gives.

Whether the stored instances of unchanged events were kept shows in ``calendars.window_anchor``:
a sync that kept some leaves the anchor of the expansion they came from (so the feed is expanded
in full once that is a day old); a full expansion moves it to the run's instant.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from almanac.settings import Settings
from tests.support.feed_server import Route
from tests.support.ics_sync import sync_by_id

INSTANT = datetime(2019, 3, 1, 12, tzinfo=UTC)
FAST = Settings(ics_fetch_attempts=1)


def body(summaries: dict[str, str], weekly_summary: str = "Standup", extra: str = "") -> bytes:
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//test//EN"]
    lines += [
        "BEGIN:VEVENT", "UID:standup", "DTSTART;TZID=Europe/Berlin:20190304T093000",
        "DTEND;TZID=Europe/Berlin:20190304T094500", "RRULE:FREQ=WEEKLY;COUNT=20",
        f"SUMMARY:{weekly_summary}", "END:VEVENT",
    ]
    for uid, summary in summaries.items():
        n = int(uid[1:])  # its time depends on its UID only
        day = f"201903{10 + n % 18:02d}T1{n % 10}"
        lines += [
            "BEGIN:VEVENT", f"UID:{uid}", "DTSTAMP:20190101T000000Z", f"DTSTART:{day}0000Z",
            f"DTEND:{day}3000Z", f"SUMMARY:{summary}", "END:VEVENT",
        ]
    return ("\r\n".join(lines) + "\r\n" + extra + "END:VCALENDAR\r\n").encode()


EVENTS = {f"e{n}": f"Event {n}" for n in range(20)}


def run(db, server, ids, instant=INSTANT, settings=FAST):
    return sync_by_id(db, server, ids, instant=instant, settings=settings)


def rows(db, cid):
    db.commit()
    return db.execute(
        "SELECT uid, recurrence_id, content_hash, summary, starts_at, ends_at, xmin::text FROM events"
        " WHERE calendar_id = %s ORDER BY 1, 2",
        (cid,),
    ).fetchall()


def content(db, cid):
    return [row[:6] for row in rows(db, cid)]


def anchor(db, cid):
    db.commit()
    return db.execute("SELECT window_anchor FROM calendars WHERE id = %s", (cid,)).fetchone()[0]


def test_a_changed_feed_rewrites_only_its_changed_events_and_ends_as_a_full_sync_would(db, server, calendars):
    calendars(1, Route(body=body(EVENTS)))
    run(db, server, [1])
    before = {row[:2]: row for row in rows(db, 1)}
    changed = {**EVENTS, "e3": "Renamed"}
    del changed["e7"]
    changed["e99"] = "New"
    calendars(1, Route(body=body(changed)))
    later = INSTANT + timedelta(minutes=5)
    result = run(db, server, [1], instant=later)[1]
    assert result.status == "updated"
    assert [result.counts[k] for k in ("eventsAdded", "eventsUpdated", "eventsDeleted")] == [1, 1, 1]
    assert anchor(db, 1) == INSTANT  # the unchanged events were kept, not expanded again
    after = rows(db, 1)
    assert [row for row in after if row[0] not in ("e3", "e99")] == [
        row for key, row in sorted(before.items()) if key[0] not in ("e3", "e7")
    ]  # xmin included: not one of them rewritten
    calendars(2, Route(body=body(changed)))
    run(db, server, [2], instant=later)
    assert content(db, 1) == content(db, 2)  # the same rows a calendar synced in full has
    state = db.execute("SELECT event_count FROM calendars WHERE id = 1").fetchone()[0]
    assert state == len(after)


def test_a_day_after_its_last_full_expansion_the_feed_is_expanded_in_full(db, server, calendars):
    calendars(1, Route(body=body(EVENTS)))
    run(db, server, [1])
    calendars(1, Route(body=body({**EVENTS, "e1": "Changed"})))
    run(db, server, [1], instant=INSTANT + timedelta(hours=23))
    assert anchor(db, 1) == INSTANT
    calendars(1, Route(body=body({**EVENTS, "e1": "Changed again"})))
    next_day = INSTANT + timedelta(days=1, minutes=5)
    run(db, server, [1], instant=next_day)
    assert anchor(db, 1) == next_day


def test_nothing_is_kept_after_a_parse_with_warnings(db, server, calendars):
    warned = "BEGIN:VEVENT\r\nUID:bad\r\nDTSTART:20190305T100000Z\r\nRRULE:FREQ=DAILY;INTERVAL=0\r\n"
    warned += "END:VEVENT\r\n"
    calendars(1, Route(body=body(EVENTS, extra=warned)))
    run(db, server, [1])
    assert db.execute("SELECT sync_warning_count FROM calendars WHERE id = 1").fetchone()[0] > 0
    calendars(1, Route(body=body({**EVENTS, "e1": "Changed"}, extra=warned)))
    later = INSTANT + timedelta(minutes=5)
    run(db, server, [1], instant=later)
    assert anchor(db, 1) == later
    assert db.execute("SELECT sync_warning_count FROM calendars WHERE id = 1").fetchone()[0] > 0


def test_kept_events_that_could_reach_the_feed_instance_cap_make_a_full_parse(db, server, calendars):
    settings = Settings(ics_fetch_attempts=1, ics_max_instances=40)
    calendars(1, Route(body=body(EVENTS)))
    run(db, server, [1], settings=settings)  # 20 + 20 standups: at the cap, not over it
    calendars(1, Route(body=body({**EVENTS, "e1": "Changed"})))
    later = INSTANT + timedelta(minutes=5)
    run(db, server, [1], instant=later, settings=settings)
    assert anchor(db, 1) == later
    calendars(2, Route(body=body({**EVENTS, "e1": "Changed"})))
    run(db, server, [2], instant=later, settings=settings)
    assert content(db, 1) == content(db, 2)


def test_the_setting_turns_reuse_off(db, server, calendars):
    settings = Settings(ics_fetch_attempts=1, ics_reuse_unchanged_events=False)
    calendars(1, Route(body=body(EVENTS)))
    run(db, server, [1], settings=settings)
    calendars(1, Route(body=body({**EVENTS, "e1": "Changed"})))
    later = INSTANT + timedelta(minutes=5)
    run(db, server, [1], instant=later, settings=settings)
    assert anchor(db, 1) == later


def test_a_change_that_leaves_no_new_instance_is_not_held_as_an_emptied_feed(db, server, calendars):
    outside = "BEGIN:VEVENT\r\nUID:old\r\nDTSTART:20100101T100000Z\r\nSUMMARY:Long ago\r\nEND:VEVENT\r\n"
    calendars(1, Route(body=body(EVENTS)))
    run(db, server, [1])
    before = content(db, 1)
    calendars(1, Route(body=body(EVENTS, extra=outside)))  # a change with no instance in the window
    result = run(db, server, [1], instant=INSTANT + timedelta(minutes=5))[1]
    assert result.status == "unchanged" and result.error is None
    assert content(db, 1) == before
    assert db.execute("SELECT sync_status, event_count FROM calendars WHERE id = 1").fetchone() == (
        "ok", len(before)
    )

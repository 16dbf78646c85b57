"""almanac.google.mapping: an Almanac event instance as a Google Calendar v3 event resource."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from almanac.google.mapping import EventRow, event_body, google_event_id
from almanac.ics.parse import Instance, parse_feed
from almanac.timeconv import all_day_instant

ZONES = ["America/New_York", "Pacific/Honolulu", "Asia/Tokyo", "Pacific/Kiritimati"]
WINDOW = {"window_start": datetime(2026, 1, 1, tzinfo=UTC), "window_end": datetime(2027, 1, 1, tzinfo=UTC)}


def _feed(*lines: str) -> bytes:
    body = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//test//EN", "BEGIN:VEVENT", *lines, "END:VEVENT"]
    return ("\r\n".join([*body, "END:VCALENDAR"]) + "\r\n").encode()


def _row(instance: Instance, zone: str, calendar_id: int = 10) -> EventRow:
    """The row ics_sync stores for ``instance`` (``almanac.ics.store``), with its calendar's zone."""
    return EventRow(
        calendar_id=calendar_id,
        uid=instance.uid,
        recurrence_id=instance.recurrence_id,
        summary=instance.summary,
        description=instance.description,
        location=instance.location,
        status=instance.status,
        all_day=instance.all_day,
        starts_at=instance.starts_at,
        ends_at=instance.ends_at,
        content_hash=instance.content_hash,
        time_zone=zone,
    )


@pytest.mark.parametrize("zone", ZONES)
def test_all_day_event_reaches_google_on_its_ics_date_west_and_east_of_utc(zone):
    """Regression: the stored 00:00 UTC was read in the calendar's zone, so an America/New_York
    calendar's 2026-03-12 reached Google as 2026-03-11."""
    body = _feed(
        "UID:bday",
        "DTSTAMP:20260101T000000Z",
        "DTSTART;VALUE=DATE:20260312",
        "DTEND;VALUE=DATE:20260313",
        "SUMMARY:Birthday",
    )
    [instance] = parse_feed(body, calendar_tz=zone, **WINDOW).instances

    resource = event_body(_row(instance, zone))

    assert resource["start"] == {"date": "2026-03-12"}
    assert resource["end"] == {"date": "2026-03-13"}
    assert resource["transparency"] == "transparent"


@pytest.mark.parametrize("zone", ZONES)
def test_a_recurring_multi_day_all_day_series_keeps_its_dates(zone):
    body = _feed(
        "UID:camp",
        "DTSTAMP:20260101T000000Z",
        "DTSTART;VALUE=DATE:20260301",
        "DTEND;VALUE=DATE:20260303",
        "RRULE:FREQ=MONTHLY;COUNT=3",
        "SUMMARY:Camp",
    )
    instances = parse_feed(body, calendar_tz=zone, **WINDOW).instances

    dates = [
        (event_body(_row(i, zone))["start"]["date"], event_body(_row(i, zone))["end"]["date"])
        for i in instances
    ]

    assert dates == [("2026-03-01", "2026-03-03"), ("2026-04-01", "2026-04-03"), ("2026-05-01", "2026-05-03")]
    assert [i.recurrence_id for i in instances] == ["20260301", "20260401", "20260501"]


@pytest.mark.parametrize("zone", ZONES)
def test_a_stored_all_day_row_read_in_another_session_zone_keeps_its_date(zone):
    """psycopg returns timestamptz in the session's zone (not the calendar's)."""
    shown = ZoneInfo(zone)
    row = EventRow(
        10,
        "u",
        "",
        "s",
        "",
        "",
        "confirmed",
        True,
        all_day_instant(date(2026, 12, 31)).astimezone(shown),
        all_day_instant(date(2027, 1, 1)).astimezone(shown),
        "h",
        "UTC",
    )

    resource = event_body(row)

    assert (resource["start"], resource["end"]) == ({"date": "2026-12-31"}, {"date": "2027-01-01"})


def test_a_zero_length_all_day_event_lasts_one_day():
    start = all_day_instant(date(2026, 3, 12))
    row = EventRow(10, "u", "", "s", "", "", "confirmed", True, start, start, "h", "America/New_York")
    assert event_body(row)["end"] == {"date": "2026-03-13"}


def test_a_timed_event_is_an_utc_instant_labelled_with_its_calendars_zone():
    body = _feed(
        "UID:standup",
        "DTSTAMP:20260101T000000Z",
        "DTSTART;TZID=America/New_York:20260310T090000",
        "DTEND;TZID=America/New_York:20260310T093000",
        "SUMMARY:Standup",
        "STATUS:TENTATIVE",
    )
    [instance] = parse_feed(body, calendar_tz="America/New_York", **WINDOW).instances

    resource = event_body(_row(instance, "America/New_York"))

    assert resource["start"] == {"dateTime": "2026-03-10T13:00:00+00:00", "timeZone": "America/New_York"}
    assert resource["end"] == {"dateTime": "2026-03-10T13:30:00+00:00", "timeZone": "America/New_York"}
    assert (resource["status"], resource["transparency"]) == ("tentative", "opaque")
    assert resource["extendedProperties"]["private"] == {
        "almanacCalendarId": "10",
        "almanacContentHash": instance.content_hash,
    }


def test_an_unknown_calendar_zone_leaves_the_instant_unlabelled():
    t = datetime(2026, 3, 10, 9, tzinfo=UTC)
    row = EventRow(10, "u", "", "s", "", "", "confirmed", False, t, t, "h", "Mars/Olympus_Mons")
    assert event_body(row)["start"] == {"dateTime": "2026-03-10T09:00:00+00:00"}


def test_the_google_event_id_is_stable_base32hex_and_per_member():
    first = google_event_id(1, 10, "bday@x", "")
    assert first == google_event_id(1, 10, "bday@x", "")
    assert re.fullmatch(r"[a-v0-9]{5,1024}", first)
    assert (
        len({first, google_event_id(2, 10, "bday@x", ""), google_event_id(1, 10, "bday@x", "20260312")}) == 3
    )

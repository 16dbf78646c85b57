"""almanac.timeconv: an all-day date is 00:00 UTC of that date (end exclusive), read back in UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from almanac.ics.parse import parse_feed
from almanac.timeconv import all_day_date, all_day_end_date, all_day_instant, as_utc

#: West of UTC (the day starts later than in UTC) and east (earlier), to the extremes.
ZONES = ["America/New_York", "Pacific/Honolulu", "Asia/Tokyo", "Pacific/Kiritimati"]


def test_an_all_day_date_is_stored_as_midnight_utc():
    assert all_day_instant(date(2026, 3, 12)) == datetime(2026, 3, 12, tzinfo=UTC)
    assert all_day_instant(date(2026, 3, 12)).utcoffset() == timedelta(0)


@pytest.mark.parametrize("zone", ZONES)
def test_the_date_survives_an_instant_shown_in_any_zone(zone):
    """Postgres returns timestamptz in the session's zone; the date is read in UTC regardless."""
    stored = all_day_instant(date(2026, 3, 12))
    assert all_day_date(stored.astimezone(ZoneInfo(zone))) == date(2026, 3, 12)


def test_the_end_date_is_exclusive_and_at_least_the_next_day():
    start, end = all_day_instant(date(2026, 3, 12)), all_day_instant(date(2026, 3, 15))
    assert all_day_end_date(start, end) == date(2026, 3, 15)
    assert all_day_end_date(start, start) == date(2026, 3, 13)  # a zero-length all-day event is one day


def test_as_utc_takes_dates_and_aware_datetimes_only():
    assert as_utc(date(2026, 1, 1)) == datetime(2026, 1, 1, tzinfo=UTC)
    tokyo = datetime(2026, 1, 1, 9, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert as_utc(tokyo) == datetime(2026, 1, 1, 0, tzinfo=UTC) and as_utc(tokyo).tzinfo is UTC
    with pytest.raises(ValueError):
        as_utc(datetime(2026, 1, 1, 9))  # floating: resolved against a zone when parsing, never here
    with pytest.raises(ValueError):
        all_day_date(datetime(2026, 1, 1))
    with pytest.raises(TypeError):
        all_day_instant(datetime(2026, 1, 1, tzinfo=UTC))


def _feed(*lines: str) -> bytes:
    body = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//test//EN", "BEGIN:VEVENT", *lines, "END:VEVENT"]
    return ("\r\n".join([*body, "END:VCALENDAR"]) + "\r\n").encode()


@pytest.mark.parametrize("zone", ZONES)
def test_parsing_stores_an_all_day_event_at_midnight_utc_in_every_calendar_zone(zone):
    body = _feed(
        "UID:bday",
        "DTSTAMP:20260101T000000Z",
        "DTSTART;VALUE=DATE:20260312",
        "DTEND;VALUE=DATE:20260314",
        "SUMMARY:Birthday",
    )

    [instance] = parse_feed(
        body,
        window_start=datetime(2026, 1, 1, tzinfo=UTC),
        window_end=datetime(2027, 1, 1, tzinfo=UTC),
        calendar_tz=zone,
    ).instances

    assert instance.all_day
    assert (instance.starts_at, instance.ends_at) == (
        all_day_instant(date(2026, 3, 12)),
        all_day_instant(date(2026, 3, 14)),
    )
    assert (all_day_date(instance.starts_at), all_day_date(instance.ends_at)) == (
        date(2026, 3, 12),
        date(2026, 3, 14),
    )

"""The one time convention for all-day dates and instants (ics_sync parsing, storage, every API mapping).

- An **instant** is an aware ``datetime`` in UTC (``timestamptz`` in Postgres).
- An **all-day date** is stored as the instant 00:00 UTC of that date, in ``events.starts_at``
  and ``events.ends_at`` with ``all_day = true``. The end is exclusive: a one-day event on
  2026-03-12 is ``[2026-03-12T00:00Z, 2026-03-13T00:00Z)``, like iCalendar's ``DTEND`` and
  Google's ``end.date``.
- An all-day date has no zone: it is read back with ``all_day_date`` (in UTC), never in a
  calendar's or a user's zone, so the same date comes out on both sides of Greenwich.

Parsing (``almanac.ics.parse``) writes with ``as_utc``/``all_day_instant``; every API mapping
(``almanac.google.mapping``) reads with ``all_day_date``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

__all__ = ["UTC", "all_day_date", "all_day_end_date", "all_day_instant", "as_utc"]


def all_day_instant(day: date) -> datetime:
    """The stored instant of an all-day date: 00:00 UTC of ``day``."""
    if isinstance(day, datetime):
        raise TypeError("all_day_instant takes a date, not a datetime (use as_utc)")
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def all_day_date(instant: datetime) -> date:
    """The all-day date a stored instant stands for: its date in UTC.

    Raises:
        ValueError: a naive datetime (the convention has no floating instants).
    """
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError("all_day_date needs an aware datetime")
    return instant.astimezone(UTC).date()


def all_day_end_date(start: datetime, end: datetime) -> date:
    """The exclusive end date of an all-day span; at least the day after its start."""
    first = all_day_date(start)
    return max(all_day_date(end), first + timedelta(days=1))


def as_utc(value: date | datetime) -> datetime:
    """The stored instant of a value: an aware datetime in UTC, or an all-day date's 00:00 UTC.

    Raises:
        ValueError: a naive datetime (resolve floating times against a zone first).
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("as_utc needs an aware datetime (floating times are resolved when parsing)")
        return value.astimezone(UTC)
    return all_day_instant(value)

"""google_calendar_push: an Almanac event instance as a Google Calendar v3 event resource."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from almanac.timeconv import all_day_date, all_day_end_date, as_utc

__all__ = ["EventRow", "event_body", "google_event_id"]


@dataclass(frozen=True)
class EventRow:
    """One row of ``events`` with its calendar's time zone (columns bound by name).

    ``starts_at``/``ends_at`` are aware UTC instants; for an all-day row they are 00:00 UTC of
    its dates, end exclusive (``almanac.timeconv``).
    """

    calendar_id: int
    uid: str
    recurrence_id: str
    summary: str
    description: str
    location: str
    status: str
    all_day: bool
    starts_at: datetime
    ends_at: datetime
    content_hash: str
    time_zone: str


def google_event_id(user_id: int, calendar_id: int, uid: str, recurrence_id: str) -> str:
    """The Google event id for this member's copy of this instance: the same on every run.

    Calendar accepts client-chosen ids in base32hex (``[a-v0-9]``, 5-1024 chars). Deriving it
    from the domain key makes ``events.insert`` itself idempotent: a rerun after a crash that
    lost the link row gets 409 "already exists" instead of creating a duplicate.
    """
    key = f"almanac:v1:{user_id}:{calendar_id}:{uid}:{recurrence_id}".encode()
    return base64.b32hexencode(hashlib.sha256(key).digest()).decode("ascii").rstrip("=").lower()


def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def event_body(row: EventRow) -> dict:
    """The resource for events.insert/patch (without ``id``).

    All-day events become Google dates with the exclusive end date, read from the stored
    instants by the one convention (``almanac.timeconv.all_day_date``: their UTC date, never
    the calendar's zone, which would move them a day west of Greenwich). Timed events are
    RFC 3339 instants, labelled with the calendar's zone when it is a known one.
    """
    zone = _zone(row.time_zone)
    if row.all_day:
        start = {"date": all_day_date(row.starts_at).isoformat()}
        end = {"date": all_day_end_date(row.starts_at, row.ends_at).isoformat()}
    else:
        start = {"dateTime": as_utc(row.starts_at).isoformat()}
        end = {"dateTime": as_utc(row.ends_at).isoformat()}
        if zone:
            start["timeZone"] = end["timeZone"] = row.time_zone
    return {
        "summary": row.summary,
        "description": row.description,
        "location": row.location,
        "status": "tentative" if row.status == "tentative" else "confirmed",
        "start": start,
        "end": end,
        "transparency": "transparent" if row.all_day else "opaque",
        "extendedProperties": {
            "private": {
                "almanacCalendarId": str(row.calendar_id),
                "almanacContentHash": row.content_hash[:256],
            }
        },
    }

"""google_calendar_push: an Almanac event instance as a Google Calendar v3 event resource."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["EventRow", "event_body", "google_event_id"]


@dataclass(frozen=True)
class EventRow:
    """One row of ``events`` with its calendar's time zone."""

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
    """The resource for events.insert/patch (without ``id``). All-day events become dates in
    the calendar's zone with Google's exclusive end date; timed ones RFC 3339 instants."""
    zone = _zone(row.time_zone)
    if row.all_day:
        local_start = row.starts_at.astimezone(zone) if zone else row.starts_at
        local_end = row.ends_at.astimezone(zone) if zone else row.ends_at
        start_date = local_start.date()
        end_date = max(local_end.date(), start_date + timedelta(days=1))
        start, end = {"date": start_date.isoformat()}, {"date": end_date.isoformat()}
    else:
        start = {"dateTime": row.starts_at.isoformat()}
        end = {"dateTime": row.ends_at.isoformat()}
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

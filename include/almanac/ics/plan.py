"""ics_sync: which calendars are due (cut into batches by ``almanac.batches.plan_batches``)."""

from __future__ import annotations

__all__ = ["due_calendar_ids", "existing_calendar_ids"]


def due_calendar_ids(conn) -> list[int]:
    """Every calendar with a feed and sync enabled, in id order."""
    rows = conn.execute(
        "SELECT id FROM calendars WHERE source_url IS NOT NULL AND sync_enabled ORDER BY id"
    ).fetchall()
    return [row[0] for row in rows]


def existing_calendar_ids(conn, calendar_ids: list[int]) -> set[int]:
    rows = conn.execute("SELECT id FROM calendars WHERE id = ANY(%s)", (calendar_ids,)).fetchall()
    return {row[0] for row in rows}

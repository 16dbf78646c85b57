"""ics_sync: which calendars are due, and their batches (``almanac.batches.plan_batches``)."""

from __future__ import annotations

__all__ = ["calendar_batches", "due_calendar_ids", "existing_calendar_ids"]


def calendar_batches(ids, settings) -> list[dict]:
    """``ids`` cut into the mapped batches of ics_sync and ics_sync_requested, sized by the
    ``ics_batch_min`` / ``ics_batch_max`` / ``ics_batch_target_count`` settings."""
    from almanac.batches import plan_batches

    return plan_batches(
        ids,
        noun="calendars",
        min_size=settings.ics_batch_min,
        max_size=settings.ics_batch_max,
        target_count=settings.ics_batch_target_count,
    )


def due_calendar_ids(conn) -> list[int]:
    """Every calendar with a feed and sync enabled, in id order."""
    rows = conn.execute(
        "SELECT id FROM calendars WHERE source_url IS NOT NULL AND sync_enabled ORDER BY id"
    ).fetchall()
    return [row[0] for row in rows]


def existing_calendar_ids(conn, calendar_ids: list[int]) -> set[int]:
    rows = conn.execute("SELECT id FROM calendars WHERE id = ANY(%s)", (calendar_ids,)).fetchall()
    return {row[0] for row in rows}

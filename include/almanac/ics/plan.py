"""ics_sync: which calendars are due, and how they are cut into batches for mapped tasks."""

from __future__ import annotations

import math

__all__ = ["due_calendar_ids", "existing_calendar_ids", "plan_batches"]


def due_calendar_ids(conn) -> list[int]:
    """Every calendar with a feed and sync enabled, in id order."""
    rows = conn.execute(
        "SELECT id FROM calendars WHERE source_url IS NOT NULL AND sync_enabled ORDER BY id"
    ).fetchall()
    return [row[0] for row in rows]


def existing_calendar_ids(conn, calendar_ids: list[int]) -> set[int]:
    rows = conn.execute("SELECT id FROM calendars WHERE id = ANY(%s)", (calendar_ids,)).fetchall()
    return {row[0] for row in rows}


def plan_batches(
    calendar_ids: list[int], *, min_size: int = 50, max_size: int = 500, target_count: int = 16
) -> list[dict]:
    """Cut ``calendar_ids`` into batches of ``min_size``..``max_size`` calendars.

    Aims at ``target_count`` batches (enough to keep every worker busy) and grows batches up
    to ``max_size`` before adding more, since each task instance costs Airflow overhead:
    10,000 calendars make 20 batches of 500; 1,000 make 16 of 63; 100 make 2 of 50.

    Returns:
        ``[{"label": "calendars 1-500 (500)", "calendar_ids": [...]}, ...]``
    """
    if not calendar_ids:
        return []
    size = min(max_size, max(min_size, math.ceil(len(calendar_ids) / target_count)))
    batches = []
    for start in range(0, len(calendar_ids), size):
        ids = calendar_ids[start : start + size]
        batches.append({"label": f"calendars {ids[0]}-{ids[-1]} ({len(ids)})", "calendar_ids": ids})
    return batches

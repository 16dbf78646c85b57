"""ics_sync: write only what changed in a calendar's events, in bulk, in one transaction.

The events of a calendar inside the sync window are compared with the feed's instances by
identity ``(uid, recurrence_id)`` and ``content_hash``: new ones are inserted, changed ones
updated, vanished ones deleted, equal ones not touched (binary COPY into a temporary table, one
``INSERT ... ON CONFLICT``, one ``DELETE``; a calendar without any row yet: COPY straight in).
Rows outside the window are left alone (history is the retention job's business), and so are
the rows of the UIDs the parse kept (``keep_uids``: their text had not changed since it was
expanded). A feed that suddenly has no instances while the calendar had many is held back
instead of wiping it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from almanac.errors import PermanentError

__all__ = ["EmptyFeedHeldError", "StoreResult", "mark_push_pending", "store_instances"]

log = logging.getLogger(__name__)

_COLUMNS = (
    "uid", "recurrence_id", "summary", "description", "location", "status", "all_day",
    "starts_at", "ends_at", "content_hash",
)


class EmptyFeedHeldError(PermanentError):
    """The feed returned no events while the calendar had many: nothing was deleted.

    What to do: check the feed by hand (``almanac ics inspect URL``). If it really is empty
    now, lower ``ics_empty_feed_guard_min_events`` or delete the calendar's events.
    """

    def __init__(self, calendar_id: int, had: int) -> None:
        super().__init__(
            f"calendar {calendar_id}: feed has no events in the window but the calendar had {had}; "
            "held back instead of deleting them"
        )
        self.calendar_id = calendar_id
        self.had = had


@dataclass(frozen=True)
class StoreResult:
    added: int
    updated: int
    deleted: int
    total: int

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.deleted)


def store_instances(
    conn,
    calendar_id: int,
    instances,
    *,
    window_start: datetime,
    window_end: datetime,
    empty_guard_min: int = 10,
    keep_uids: frozenset[str] = frozenset(),
) -> StoreResult:
    """Bring ``events`` of ``calendar_id`` in ``[window_start, window_end)`` to ``instances``.

    Runs inside the caller's transaction (the caller commits), so a calendar's events change
    all at once or not at all.

    Parameters:
        instances: objects with the attributes in ``_COLUMNS`` (``almanac.ics.parse.Instance``).
        keep_uids: UIDs whose rows stay as they are (the parse kept them: ``ParseResult.kept_uids``);
            they count in ``total`` and against the empty-feed guard, and are never deleted.
    Raises:
        EmptyFeedHeldError: no instances while at least ``empty_guard_min`` rows exist.
    """
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT uid, recurrence_id, content_hash
              FROM events
             WHERE calendar_id = %s AND starts_at >= %s AND starts_at < %s
            """,
            (calendar_id, window_start, window_end),
        )
        existing = {(uid, rid): digest for uid, rid, digest in cur}
        kept = 0
        if keep_uids:
            kept = sum(1 for uid, _ in existing if uid in keep_uids)
            existing = {key: digest for key, digest in existing.items() if key[0] not in keep_uids}

        if not instances and not kept and len(existing) >= empty_guard_min:
            raise EmptyFeedHeldError(calendar_id, len(existing))

        seen: set[tuple[str, str]] = set()
        changed_rows = []
        added = updated = 0
        for inst in instances:
            key = (inst.uid, inst.recurrence_id)
            seen.add(key)
            old = existing.get(key)
            if old == inst.content_hash:
                continue
            if old is None:
                added += 1
            else:
                updated += 1
            changed_rows.append(
                (calendar_id, inst.uid, inst.recurrence_id, inst.summary, inst.description, inst.location,
                 inst.status, inst.all_day, inst.starts_at, inst.ends_at, inst.content_hash)
            )
        gone = [key for key in existing if key not in seen]

        if changed_rows and not existing and not _has_rows(cur, calendar_id):
            _copy_in(cur, changed_rows)  # a calendar's first sync: nothing to compare or update
        elif changed_rows:
            _upsert(cur, changed_rows)
        if gone:
            cur.execute(
                """
                DELETE FROM events AS e
                 USING unnest(%s::text[], %s::text[]) AS gone(uid, recurrence_id)
                 WHERE e.calendar_id = %s
                   AND e.uid = gone.uid
                   AND e.recurrence_id = gone.recurrence_id
                """,
                ([uid for uid, _ in gone], [rid for _, rid in gone], calendar_id),
            )
    return StoreResult(added=added, updated=updated, deleted=len(gone), total=len(seen) + kept)


#: The types of ``calendar_id`` and ``_COLUMNS``, for binary COPY (half the client CPU of text).
_TYPES = (
    "int8", "text", "text", "text", "text", "text", "text", "bool", "timestamptz", "timestamptz", "text"
)


def _has_rows(cur, calendar_id: int) -> bool:
    """Whether the calendar has any event row, in the window or not."""
    cur.execute("SELECT EXISTS (SELECT 1 FROM events WHERE calendar_id = %s)", (calendar_id,))
    return cur.fetchone()[0]


def _copy_in(cur, rows: list[tuple]) -> None:
    """COPY the rows straight into ``events``: for a calendar without any row (no conflict)."""
    columns = "calendar_id, " + ", ".join(_COLUMNS)
    with cur.copy(f"COPY events ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_TYPES)
        for row in rows:
            copy.write_row(row)


def _upsert(cur, rows: list[tuple]) -> None:
    """COPY the changed rows into a temporary table, then one INSERT ... ON CONFLICT."""
    cur.execute(
        """
        CREATE TEMPORARY TABLE IF NOT EXISTS incoming_events
            (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
        """
    )
    cur.execute("TRUNCATE incoming_events")
    columns = "calendar_id, " + ", ".join(_COLUMNS)
    with cur.copy(f"COPY incoming_events ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_TYPES)
        for row in rows:
            copy.write_row(row)
    cur.execute(
        f"""
        INSERT INTO events AS e ({columns})
        SELECT {columns} FROM incoming_events
        ON CONFLICT (calendar_id, uid, recurrence_id) DO UPDATE
           SET summary      = EXCLUDED.summary,
               description  = EXCLUDED.description,
               location     = EXCLUDED.location,
               status       = EXCLUDED.status,
               all_day      = EXCLUDED.all_day,
               starts_at    = EXCLUDED.starts_at,
               ends_at      = EXCLUDED.ends_at,
               content_hash = EXCLUDED.content_hash,
               updated_at   = now()
         WHERE e.content_hash IS DISTINCT FROM EXCLUDED.content_hash
        """
    )


def mark_push_pending(conn, calendar_ids: list[int]) -> None:
    """Record that these calendars' events changed and are not yet pushed to Google.

    Call in the same transaction as the change (the caller commits), so a change that is
    committed is never forgotten by google_calendar_push, even when the task try that made
    it fails afterwards and its asset event is never emitted.
    """
    conn.execute(
        """
        INSERT INTO calendar_push_pending AS p (calendar_id)
        SELECT unnest(%s::bigint[])
        ON CONFLICT (calendar_id) DO UPDATE
           SET generation = p.generation + 1, changed_at = now()
        """,
        (list(calendar_ids),),
    )

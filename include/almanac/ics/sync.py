"""ics_sync: fetch, parse and store a batch of calendars' ICS feeds, each calendar on its own.

One calendar's failure never fails the others: feed problems (bad feed, refused URL, 4xx,
too large, not iCalendar) are recorded on the calendar with a clear message; transient ones
(timeouts, 429, 5xx) are retried here with backoff first. Only infrastructure faults (the
application database) raise. The sync window is anchored at the run's instant, never "now".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from almanac.batches import ItemResult, Kind
from almanac.errors import PermanentError, RetryableError
from almanac.leases import LeaseKeeper, lease_key
from almanac.retry import RetryPolicy, retry_call
from almanac.settings import Settings

__all__ = ["ICS_KIND", "LEASE_JOB", "fetch_policy", "sync_batch", "sync_window"]

log = logging.getLogger(__name__)

#: Leases are ``almanac:lease:ics_sync:<calendar_id>``, shared by every DAG and the CLI.
LEASE_JOB = "ics_sync"

#: What ICS sync results are called in summaries (the spec's shape).
ICS_KIND = Kind(
    "Calendars", "calendarId", ("eventsAdded", "eventsUpdated", "eventsDeleted"), "changedCalendarIds"
)

_INFRA_ERRORS: tuple[type[BaseException], ...] = ()


def _infra_errors() -> tuple[type[BaseException], ...]:
    """Faults of our own infrastructure (database, Redis): they fail the batch, not the item."""
    global _INFRA_ERRORS
    if not _INFRA_ERRORS:
        import psycopg
        import redis

        _INFRA_ERRORS = (psycopg.Error, redis.RedisError)
    return _INFRA_ERRORS


def sync_window(instant: datetime, settings: Settings) -> tuple[datetime, datetime]:
    """The window of instances kept for a run at ``instant``."""
    return (
        instant - timedelta(days=settings.ics_window_days_back),
        instant + timedelta(days=settings.ics_window_days_ahead),
    )


def fetch_policy(settings: Settings) -> RetryPolicy:
    """The retry policy of one feed fetch inside a task."""
    return RetryPolicy(
        attempts=settings.ics_fetch_attempts,
        base_wait_s=1.0,
        max_wait_s=float(settings.ics_retry_max_wait_s),
        timeout_s=float(settings.ics_read_timeout_s),
    )


@dataclass
class _Calendar:
    id: int
    source_url: str | None
    time_zone: str
    etag: str | None
    last_modified: str | None
    body_sha256: str | None
    window_anchor: datetime | None


def _load_calendars(conn, calendar_ids: list[int]) -> dict[int, _Calendar]:
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(_Calendar)) as cur:
        rows = cur.execute(
            """
            SELECT id, source_url, time_zone, etag, last_modified, body_sha256, window_anchor
              FROM calendars
             WHERE id = ANY(%s) AND sync_enabled
            """,
            (calendar_ids,),
        ).fetchall()
    conn.commit()
    return {row.id: row for row in rows}


def sync_batch(
    conn,
    calendar_ids: Iterable[int],
    *,
    instant: datetime,
    settings: Settings | None = None,
    leases: LeaseKeeper | None = None,
    session=None,
    allow_hosts: frozenset[str] = frozenset(),
    sleep: Callable[[float], None] = time.sleep,
) -> list[ItemResult]:
    """Sync each calendar of the batch; return one ``ItemResult`` per calendar. Commits per calendar.

    Parameters:
        conn: psycopg connection to the application DB.
        instant: the run's instant (data interval end or logical date); anchors the window.
        leases: the task's ``LeaseKeeper`` (None: no leasing, e.g. a test). A calendar whose
            lease another live run holds is tried again at the end of the batch, after up to
            ``ics_lease_wait_s``; still held, it is reported ``busy`` (retryable).
        session: ``requests.Session`` to reuse connections (one is made if None).
        allow_hosts: hosts the address guard lets through (dev and test feed servers).
    Raises:
        Only infrastructure faults (database, Redis); every feed problem is a per-calendar result.
    """
    import requests

    settings = settings or Settings()
    session = session or requests.Session()
    ids = list(dict.fromkeys(calendar_ids))
    calendars = _load_calendars(conn, ids)
    results: dict[int, ItemResult] = {}
    unchanged: list[tuple[int, str | None, str | None]] = []
    busy: list[int] = []

    def attempt(calendar: _Calendar) -> ItemResult | None:
        if leases is None:
            return _sync_one(conn, calendar, instant, settings, session, allow_hosts, sleep, unchanged, None)
        with leases.hold(lease_key(LEASE_JOB, calendar.id)) as lease:
            if not lease.taken:
                return None
            return _sync_one(conn, calendar, instant, settings, session, allow_hosts, sleep, unchanged, lease)

    for calendar_id in ids:
        calendar = calendars.get(calendar_id)
        if calendar is None:
            results[calendar_id] = ItemResult(
                calendar_id, "skipped", error="calendar not found or sync disabled"
            )
        elif not calendar.source_url:
            results[calendar_id] = ItemResult(calendar_id, "skipped", error="calendar has no feed URL")
        else:
            result = attempt(calendar)
            if result is None:
                busy.append(calendar_id)
            else:
                results[calendar_id] = result
    deadline = time.monotonic() + settings.ics_lease_wait_s
    while busy and time.monotonic() < deadline:
        sleep(1.0)
        still = []
        for calendar_id in busy:
            result = attempt(calendars[calendar_id])
            if result is None:
                still.append(calendar_id)
            else:
                results[calendar_id] = result
        busy = still
    for calendar_id in busy:
        results[calendar_id] = ItemResult(
            calendar_id,
            "busy",
            error=(
                f"another run held this calendar's lease for more than {settings.ics_lease_wait_s}s; "
                "not synced"
            ),
        )
    if unchanged:
        _record_unchanged(conn, unchanged)
    return [results[calendar_id] for calendar_id in ids]


def _fetch_result(
    calendar_id: int, status: str, stored=None, error: str | None = None, permanent: bool = False
) -> ItemResult:
    counts = {}
    if stored is not None:
        counts = {
            "eventsAdded": stored.added,
            "eventsUpdated": stored.updated,
            "eventsDeleted": stored.deleted,
        }
    return ItemResult(calendar_id, status, counts, error=error, permanent=permanent)


def _sync_one(
    conn, calendar: _Calendar, instant, settings, session, allow_hosts, sleep, unchanged, lease
) -> ItemResult:
    from almanac.ics.fetch import fetch_feed
    from almanac.ics.parse import parse_feed
    from almanac.ics.store import EmptyFeedHeldError, mark_push_pending, store_instances

    host = urlsplit(calendar.source_url).hostname or "?"
    policy = fetch_policy(settings)

    def fetch(etag, last_modified):
        return retry_call(
            lambda: fetch_feed(
                calendar.source_url,
                etag=etag,
                last_modified=last_modified,
                session=session,
                connect_timeout=settings.ics_connect_timeout_s,
                read_timeout=settings.ics_read_timeout_s,
                deadline=settings.ics_fetch_deadline_s,
                max_bytes=settings.ics_max_bytes,
                max_redirects=settings.ics_max_redirects,
                allow_hosts=allow_hosts,
            ),
            policy,
            sleep=sleep,
        )

    try:
        fetched = fetch(calendar.etag, calendar.last_modified)
        same_body = fetched.not_modified or (
            fetched.body_sha256 is not None and fetched.body_sha256 == calendar.body_sha256
        )
        # An unchanged feed is neither parsed nor written, unless its window has moved on by
        # a day since it was last expanded (new occurrences of open-ended rules come into it).
        window_fresh = calendar.window_anchor is not None and instant - calendar.window_anchor < timedelta(
            days=1
        )
        if same_body and window_fresh:
            unchanged.append(
                (calendar.id, fetched.etag or calendar.etag, fetched.last_modified or calendar.last_modified)
            )
            return _fetch_result(calendar.id, "unchanged")
        if fetched.body is None:  # 304, but the window must move on: fetch without validators
            fetched = fetch(None, None)
        window_start, window_end = sync_window(instant, settings)
        parsed = parse_feed(
            fetched.body,
            window_start=window_start,
            window_end=window_end,
            calendar_tz=calendar.time_zone,
            max_instances=settings.ics_max_instances,
        )
        if parsed.problems:
            log.warning(
                "calendar %s: %d feed problem(s), first: %s",
                calendar.id,
                len(parsed.problems),
                parsed.problems[0],
            )
        stored = store_instances(
            conn,
            calendar.id,
            parsed.instances,
            window_start=window_start,
            window_end=window_end,
            empty_guard_min=settings.ics_empty_feed_guard_min_events,
        )
        if stored.changed:
            mark_push_pending(conn, [calendar.id])
        conn.execute(
            """
            UPDATE calendars
               SET last_attempt_at = now(), last_success_at = now(), etag = %s, last_modified = %s,
                   body_sha256 = %s, window_anchor = %s, sync_status = 'ok', last_error = NULL,
                   consecutive_failures = 0, event_count = %s
             WHERE id = %s
            """,
            (fetched.etag, fetched.last_modified, fetched.body_sha256, instant, stored.total, calendar.id),
        )
        if lease is not None and lease.lost:
            conn.rollback()
            return _fetch_result(
                calendar.id, "busy", error="lease lost to another run before commit; not stored"
            )
        conn.commit()
        log.info(
            "calendar %s (%s): +%d ~%d -%d of %d",
            calendar.id,
            host,
            stored.added,
            stored.updated,
            stored.deleted,
            stored.total,
        )
        return _fetch_result(calendar.id, "updated" if stored.changed else "unchanged", stored)
    except Exception as exc:
        if isinstance(exc, _infra_errors()):
            raise
        conn.rollback()
        status = "held" if isinstance(exc, EmptyFeedHeldError) else "error"
        known = isinstance(exc, PermanentError | RetryableError)
        message = f"{type(exc).__name__}: {exc}" if known else f"unexpected {type(exc).__name__}: {exc}"
        if not known:
            log.exception("calendar %s (%s): unexpected error", calendar.id, host)
        conn.execute(
            """
            UPDATE calendars
               SET last_attempt_at = now(), sync_status = %s, last_error = %s,
                   consecutive_failures = consecutive_failures + 1
             WHERE id = %s
            """,
            (status, message[:1000], calendar.id),
        )
        conn.commit()
        log.warning("calendar %s (%s): %s", calendar.id, host, message)
        return _fetch_result(calendar.id, status, error=message, permanent=isinstance(exc, PermanentError))


def _record_unchanged(conn, unchanged) -> None:
    """One statement for every calendar whose feed had not changed."""
    conn.execute(
        """
        UPDATE calendars AS c
           SET last_attempt_at = now(), last_success_at = now(), etag = u.etag,
               last_modified = u.last_modified, sync_status = 'ok', last_error = NULL,
               consecutive_failures = 0
          FROM unnest(%(ids)s::bigint[], %(etags)s::text[], %(lms)s::text[]) AS u(id, etag, last_modified)
         WHERE c.id = u.id
        """,
        {
            "ids": [row[0] for row in unchanged],
            "etags": [row[1] for row in unchanged],
            "lms": [row[2] for row in unchanged],
        },
    )
    conn.commit()

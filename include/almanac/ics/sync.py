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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from almanac.errors import PermanentError, RetryableError
from almanac.locks import entity_lock
from almanac.settings import Settings

__all__ = ["BatchResult", "CalendarResult", "combine_summaries", "sync_batch", "sync_window"]

log = logging.getLogger(__name__)

LOCK_KEY = "almanac:lock:ics_sync:{calendar_id}"


@dataclass
class CalendarResult:
    calendarId: int  # noqa: N815 (the spec's result shape)
    status: str  # updated | unchanged | error | held | skipped
    eventsAdded: int = 0  # noqa: N815
    eventsUpdated: int = 0  # noqa: N815
    eventsDeleted: int = 0  # noqa: N815
    error: str | None = None


@dataclass
class BatchResult:
    results: list[CalendarResult] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(r.status in ("error", "held") for r in self.results)

    def summary(self, *, keep_unchanged: bool = False) -> dict:
        """The spec's shape. Unchanged calendars are counted but not listed unless asked."""
        listed = [r for r in self.results if keep_unchanged or r.status != "unchanged"]
        return {
            "totalCalendars": len(self.results),
            "successCount": sum(r.status in ("updated", "unchanged") for r in self.results),
            "errorCount": self.error_count,
            "skippedCount": sum(r.status == "skipped" for r in self.results),
            "eventsAdded": sum(r.eventsAdded for r in self.results),
            "eventsUpdated": sum(r.eventsUpdated for r in self.results),
            "eventsDeleted": sum(r.eventsDeleted for r in self.results),
            "changedCalendarIds": [r.calendarId for r in self.results if r.status == "updated"],
            "results": [asdict(r) for r in listed],
        }


def sync_window(instant: datetime, settings: Settings) -> tuple[datetime, datetime]:
    """The window of instances kept for a run at ``instant``."""
    return (
        instant - timedelta(days=settings.ics_window_days_back),
        instant + timedelta(days=settings.ics_window_days_ahead),
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
    rows = conn.execute(
        """
        SELECT id, source_url, time_zone, etag, last_modified, body_sha256, window_anchor
          FROM calendars
         WHERE id = ANY(%s) AND sync_enabled
        """,
        (calendar_ids,),
    ).fetchall()
    conn.commit()
    return {row[0]: _Calendar(*row) for row in rows}


def sync_batch(
    conn,
    calendar_ids: Iterable[int],
    *,
    instant: datetime,
    settings: Settings | None = None,
    redis=None,
    session=None,
    allow_hosts: frozenset[str] = frozenset(),
    sleep: Callable[[float], None] = time.sleep,
) -> BatchResult:
    """Sync each calendar of the batch; return per-calendar results.

    Parameters:
        conn: psycopg connection to the application DB (committed per calendar).
        instant: the run's instant (data interval end or logical date); anchors the window.
        redis: redis-py client for per-calendar locks (None: no locking, e.g. the CLI).
        session: ``requests.Session`` to reuse connections (one is made if None).
        allow_hosts: hosts the address guard lets through (dev and test feed servers).
    """
    import requests

    settings = settings or Settings()
    session = session or requests.Session()
    ids = list(dict.fromkeys(calendar_ids))
    calendars = _load_calendars(conn, ids)
    batch = BatchResult()
    unchanged: list[tuple[int, str | None, str | None]] = []
    for calendar_id in ids:
        calendar = calendars.get(calendar_id)
        if calendar is None:
            batch.results.append(CalendarResult(calendar_id, "skipped", error="calendar not found or sync disabled"))
            continue
        if not calendar.source_url:
            batch.results.append(CalendarResult(calendar_id, "skipped", error="calendar has no feed URL"))
            continue
        if redis is None:
            result = _sync_one(conn, calendar, instant, settings, session, allow_hosts, sleep, unchanged)
        else:
            key = LOCK_KEY.format(calendar_id=calendar_id)
            with entity_lock(redis, key, settings.ics_lock_ttl_s) as taken:
                if taken:
                    result = _sync_one(conn, calendar, instant, settings, session, allow_hosts, sleep, unchanged)
                else:
                    result = CalendarResult(calendar_id, "skipped", error="another run is syncing this calendar")
        batch.results.append(result)
    if unchanged:
        _record_unchanged(conn, unchanged)
    return batch


def _sync_one(conn, calendar: _Calendar, instant, settings, session, allow_hosts, sleep, unchanged) -> CalendarResult:
    from almanac.ics.fetch import fetch_feed
    from almanac.ics.parse import parse_feed
    from almanac.ics.store import EmptyFeedHeldError, store_instances

    host = urlsplit(calendar.source_url).hostname or "?"

    def fetch(etag, last_modified):
        return fetch_feed(
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
        )

    try:
        fetched = _fetch_with_retries(lambda: fetch(calendar.etag, calendar.last_modified), settings, sleep)
        same_body = fetched.not_modified or (
            fetched.body_sha256 is not None and fetched.body_sha256 == calendar.body_sha256
        )
        # An unchanged feed is neither parsed nor written, unless its window has moved on by
        # a day since it was last expanded (new occurrences of open-ended rules come into it).
        window_fresh = calendar.window_anchor is not None and instant - calendar.window_anchor < timedelta(days=1)
        if same_body and window_fresh:
            unchanged.append((calendar.id, fetched.etag or calendar.etag, fetched.last_modified or calendar.last_modified))
            return CalendarResult(calendar.id, "unchanged")
        if fetched.body is None:  # 304, but the window must move on: fetch without validators
            fetched = _fetch_with_retries(lambda: fetch(etag=None, last_modified=None), settings, sleep)
        window_start, window_end = sync_window(instant, settings)
        parsed = parse_feed(
            fetched.body,
            window_start=window_start,
            window_end=window_end,
            calendar_tz=calendar.time_zone,
            max_instances=settings.ics_max_instances,
        )
        if parsed.problems:
            log.warning("calendar %s: %d feed problem(s), first: %s", calendar.id, len(parsed.problems), parsed.problems[0])
        stored = store_instances(
            conn,
            calendar.id,
            parsed.instances,
            window_start=window_start,
            window_end=window_end,
            empty_guard_min=settings.ics_empty_feed_guard_min_events,
        )
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
        conn.commit()
        log.info(
            "calendar %s (%s): +%d ~%d -%d of %d", calendar.id, host, stored.added, stored.updated,
            stored.deleted, stored.total,
        )
        return CalendarResult(
            calendar.id, "updated" if stored.changed else "unchanged",
            stored.added, stored.updated, stored.deleted,
        )
    except (PermanentError, RetryableError) as exc:
        conn.rollback()
        status = "held" if isinstance(exc, EmptyFeedHeldError) else "error"
        message = f"{type(exc).__name__}: {exc}"
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
        return CalendarResult(calendar.id, status, error=message)


def _fetch_with_retries(fetch, settings: Settings, sleep):
    for attempt in range(1, settings.ics_fetch_attempts + 1):
        try:
            return fetch()
        except RetryableError as exc:
            if attempt == settings.ics_fetch_attempts:
                raise
            wait = getattr(exc, "retry_after", None) or 2 ** (attempt - 1)
            sleep(min(float(wait), settings.ics_retry_max_wait_s))
    raise AssertionError("unreachable")


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


def combine_summaries(summaries: Iterable[dict | None]) -> dict:
    """One run's result from its batches' summaries (a batch that failed may be missing)."""
    total = {
        "totalCalendars": 0, "successCount": 0, "errorCount": 0, "skippedCount": 0,
        "eventsAdded": 0, "eventsUpdated": 0, "eventsDeleted": 0,
        "changedCalendarIds": [], "results": [], "batches": 0,
    }
    for summary in summaries:
        if not summary:
            continue
        total["batches"] += 1
        for key in ("totalCalendars", "successCount", "errorCount", "skippedCount",
                    "eventsAdded", "eventsUpdated", "eventsDeleted"):
            total[key] += summary[key]
        total["changedCalendarIds"] += summary["changedCalendarIds"]
        total["results"] += summary["results"]
    return total

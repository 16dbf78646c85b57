"""ics_sync: fetch, parse and store a batch of calendars' ICS feeds, each calendar on its own.

One calendar's failure never fails the others: feed problems (bad feed, refused URL, 4xx,
too large, not iCalendar, a budget overrun) are recorded on the calendar with a clear message;
transient ones (timeouts, 429, 5xx) are retried here with backoff first. Every calendar has a
hard budget (``almanac.ics.budget``): ``ics_calendar_budget_s`` of wall time for fetch, parse
and store together, and the parse runs in a worker process with CPU and memory limits that is
killed when one is hit. Only infrastructure faults (the application database, Redis, a parse
worker that cannot start) raise. The sync window is anchored at the run's instant, never "now".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from almanac.batches import ItemResult, Kind, infrastructure_errors
from almanac.errors import PermanentError, RetryableError
from almanac.ics.budget import CalendarClock, ParsePool, ParseWorkerUnavailableError
from almanac.leases import LeaseKeeper, lease_key
from almanac.settings import Settings

__all__ = [
    "ICS_KIND",
    "LEASE_JOB",
    "MAX_STORED_WARNINGS",
    "MAX_WARNING_CHARS",
    "FeedDataRefusedError",
    "sync_batch",
    "sync_window",
]

log = logging.getLogger(__name__)

#: Leases are ``almanac:lease:ics_sync:<calendar_id>``, shared by every DAG and the CLI.
LEASE_JOB = "ics_sync"

#: What ICS sync results are called in summaries (the spec's shape).
ICS_KIND = Kind(
    "Calendars", "calendarId", ("eventsAdded", "eventsUpdated", "eventsDeleted"), "changedCalendarIds"
)

#: Parse warnings kept in ``calendars.sync_warnings`` (all are counted in ``sync_warning_count``).
MAX_STORED_WARNINGS = 20
#: Characters kept of each stored warning (and of the first warning in a result's detail).
MAX_WARNING_CHARS = 300

#: Calendars whose leases are taken (and released) together, in one Redis round trip each way.
#: A calendar's lease is so held at most this many calendars' sync time longer than its own.
LEASE_CHUNK = 25


class FeedDataRefusedError(PermanentError):
    """The database refused the feed's data (PostgreSQL class 22: a NUL character, text it
    cannot encode, a value out of range; or a CHECK constraint such as an event ending before it
    starts); nothing of this sync was stored.

    What to do: look at the feed (``almanac ics inspect URL``) for the value named in the
    message; the feed's owner has to fix it. The other calendars are not affected.
    """


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
    parse_pool: ParsePool | None = None,
) -> list[ItemResult]:
    """Sync each calendar of the batch; return one ``ItemResult`` per calendar. Commits per calendar.

    Parameters:
        conn: psycopg connection to the application DB.
        instant: the run's instant (data interval end or logical date); anchors the window.
        leases: the task's ``LeaseKeeper`` (None: no leasing, e.g. a test). A calendar whose
            lease another live run holds is tried again at the end of the batch, after up to
            ``ics_lease_wait_s``; still held, it is reported ``busy`` (retryable). Leases are
            taken and released ``LEASE_CHUNK`` calendars at a time (one Redis round trip each).
        session: ``requests.Session`` to reuse connections (one is made and closed if None).
        allow_hosts: hosts the address guard lets through (dev and test feed servers).
        parse_pool: the ``ParsePool`` feeds are parsed in (kept open for the caller); None: the
            batch starts its own when the first feed needs parsing, and stops it at the end.
    Raises:
        Only infrastructure faults (database, Redis, a parse worker that cannot start); every
        feed problem, budget overruns included, is a per-calendar result.
    """
    from almanac.ics.fetch import new_session

    settings = settings or Settings()
    ids = list(dict.fromkeys(calendar_ids))
    calendars = _load_calendars(conn, ids)
    results: dict[int, ItemResult] = {}
    unchanged: list[tuple[int, str | None, str | None]] = []
    busy: list[int] = []
    with (
        nullcontext(session) if session is not None else new_session() as session,
        nullcontext(parse_pool) if parse_pool is not None else ParsePool.from_settings(settings) as pool,
    ):

        def attempt(calendar: _Calendar) -> ItemResult | None:
            args = (conn, calendar, instant, settings, session, allow_hosts, sleep, unchanged, pool)
            if leases is None:
                return _sync_one(*args, None)
            with leases.hold(lease_key(LEASE_JOB, calendar.id)) as lease:
                if not lease.taken:
                    return None
                return _sync_one(*args, lease)

        todo: list[_Calendar] = []
        for calendar_id in ids:
            calendar = calendars.get(calendar_id)
            if calendar is None:
                results[calendar_id] = ItemResult(
                    calendar_id, "skipped", error="calendar not found or sync disabled"
                )
            elif not calendar.source_url:
                results[calendar_id] = ItemResult(calendar_id, "skipped", error="calendar has no feed URL")
            else:
                todo.append(calendar)
        for start in range(0, len(todo), LEASE_CHUNK):
            chunk = todo[start : start + LEASE_CHUNK]
            held = (
                leases.acquire_many([lease_key(LEASE_JOB, calendar.id) for calendar in chunk])
                if leases is not None
                else [None] * len(chunk)
            )
            try:
                for calendar, lease in zip(chunk, held, strict=True):
                    if lease is not None and not lease.taken:
                        busy.append(calendar.id)
                    else:
                        args = (conn, calendar, instant, settings, session, allow_hosts, sleep, unchanged)
                        results[calendar.id] = _sync_one(*args, pool, lease)
            finally:
                if leases is not None:
                    leases.release_many(held)
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
    calendar_id: int,
    status: str,
    stored=None,
    error: str | None = None,
    permanent: bool = False,
    detail: dict | None = None,
) -> ItemResult:
    counts = {}
    if stored is not None:
        counts = {
            "eventsAdded": stored.added,
            "eventsUpdated": stored.updated,
            "eventsDeleted": stored.deleted,
        }
    return ItemResult(calendar_id, status, counts, error=error, permanent=permanent, detail=detail or {})


def _clean(text: str, limit: int) -> str:
    """``text`` fit for a text column: no NUL (PostgreSQL refuses it), at most ``limit`` characters."""
    return text.replace("\x00", "\\x00")[:limit]


class _BudgetedFetchSettings:
    """``settings`` whose per-attempt fetch deadline is cut to what is left of the calendar's
    budget (``fetch_with_settings`` reads ``ics_fetch_deadline_s`` at every attempt)."""

    def __init__(self, settings: Settings, clock: CalendarClock) -> None:
        self._settings = settings
        self._clock = clock

    def __getattr__(self, name: str):
        return getattr(self._settings, name)

    @property
    def ics_fetch_deadline_s(self) -> float:
        return self._clock.left("fetch", float(self._settings.ics_fetch_deadline_s))


def _sync_one(
    conn, calendar: _Calendar, instant, settings, session, allow_hosts, sleep, unchanged, pool, lease
) -> ItemResult:
    import psycopg

    from almanac.ics.fetch import fetch_with_settings
    from almanac.ics.store import EmptyFeedHeldError, mark_push_pending, store_instances

    host = urlsplit(calendar.source_url).hostname or "?"
    clock = CalendarClock(calendar.id, settings.ics_calendar_budget_s)
    fetch_settings = _BudgetedFetchSettings(settings, clock)

    def fetch(etag, last_modified):
        return fetch_with_settings(
            calendar.source_url,
            fetch_settings,
            etag=etag,
            last_modified=last_modified,
            session=session,
            allow_hosts=allow_hosts,
            sleep=clock.sleeper(sleep, "fetch"),
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

        def parse(reuse: frozenset[bytes]):
            return pool.parse_feed(
                fetched.body,
                calendar_id=calendar.id,
                clock=clock,
                window_start=window_start,
                window_end=window_end,
                calendar_tz=calendar.time_zone,
                reuse=reuse,
                **settings.ics_parse_limits,
            )

        from almanac.ics.parse import feed_text_chars  # loaded already: the parse result is its type

        prior = _ParseState()
        if window_fresh and settings.ics_reuse_unchanged_events:
            prior = _parse_state(conn, calendar.id)
        parsed = parse(prior.groups)
        text_chars = feed_text_chars(parsed.instances)
        if parsed.kept_uids and (
            prior.event_count + len(parsed.instances) > settings.ics_max_instances
            or prior.text_chars + text_chars > settings.ics_max_feed_text_chars
        ):  # the feed-wide limits might cut: they need every group's instances
            parsed = parse(frozenset())
            text_chars = feed_text_chars(parsed.instances)
        if parsed.kept_uids:  # the kept rows were expanded at the old anchor, and hold at most this
            anchor, text_chars = calendar.window_anchor, prior.text_chars + text_chars
        else:
            anchor = instant
        problems = parsed.problems
        warnings = [_clean(p, MAX_WARNING_CHARS) for p in problems[:MAX_STORED_WARNINGS]]
        if problems:
            log.warning("calendar %s: %d feed problem(s), first: %s", calendar.id, len(problems), warnings[0])
        # The store may take what is left of the budget, no more (the whole transaction).
        timeout_ms = max(1, math.floor(clock.left("store") * 1000))
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{timeout_ms}ms",))
        try:
            stored = store_instances(
                conn,
                calendar.id,
                parsed.instances,
                window_start=window_start,
                window_end=window_end,
                empty_guard_min=settings.ics_empty_feed_guard_min_events,
                keep_uids=parsed.kept_uids,
            )
            if stored.changed:
                mark_push_pending(conn, [calendar.id])
            conn.execute(
                """
                UPDATE calendars
                   SET last_attempt_at = now(), last_success_at = now(), etag = %s, last_modified = %s,
                       body_sha256 = %s, window_anchor = %s, sync_status = 'ok', last_error = NULL,
                       consecutive_failures = 0, event_count = %s,
                       sync_warnings = %s, sync_warning_count = %s,
                       parse_groups = %s, parse_text_chars = %s
                 WHERE id = %s
                """,
                (
                    fetched.etag,
                    fetched.last_modified,
                    fetched.body_sha256,
                    anchor,
                    stored.total,
                    warnings or None,
                    len(problems),
                    None if parsed.groups is None else b"".join(parsed.groups),
                    text_chars,
                    calendar.id,
                ),
            )
        except psycopg.errors.QueryCanceled as e:
            if "statement timeout" not in str(e):
                raise
            raise clock.exceeded("store") from e
        except (psycopg.DataError, psycopg.errors.CheckViolation) as e:  # the feed's data is at fault
            primary = e.diag.message_primary or str(e)
            raise FeedDataRefusedError(
                f"calendar {calendar.id}: the database refused the feed's data ({primary})"
            ) from e
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
        detail = {"warningCount": len(problems), "firstWarning": warnings[0]} if problems else None
        return _fetch_result(calendar.id, "updated" if stored.changed else "unchanged", stored, detail=detail)
    except Exception as exc:
        if isinstance(exc, infrastructure_errors() + (ParseWorkerUnavailableError,)):
            raise
        conn.rollback()
        status = "held" if isinstance(exc, EmptyFeedHeldError) else "error"
        known = isinstance(exc, PermanentError | RetryableError)
        message = f"{type(exc).__name__}: {exc}" if known else f"unexpected {type(exc).__name__}: {exc}"
        message = _clean(message, 1000)
        if not known:
            log.exception("calendar %s (%s): unexpected error", calendar.id, host)
        conn.execute(
            """
            UPDATE calendars
               SET last_attempt_at = now(), sync_status = %s, last_error = %s,
                   consecutive_failures = consecutive_failures + 1
             WHERE id = %s
            """,
            (status, message, calendar.id),
        )
        conn.commit()
        log.warning("calendar %s (%s): %s", calendar.id, host, message)
        return _fetch_result(calendar.id, status, error=message, permanent=isinstance(exc, PermanentError))


@dataclass(frozen=True)
class _ParseState:
    """What the calendar's last parse left (``ParseResult.groups``) for the next one's ``reuse``."""

    groups: frozenset[bytes] = frozenset()
    event_count: int = 0
    text_chars: int = 0


def _parse_state(conn, calendar_id: int) -> _ParseState:
    """The groups of the last parse that may be kept: none after a parse with warnings (they
    would be lost with the groups that caused them, and the feed-wide limits may have cut)."""
    from almanac.ics.parse import GROUP_DIGEST_BYTES as size  # the feed is parsed next anyway

    row = conn.execute(
        "SELECT parse_groups, event_count, parse_text_chars, sync_warning_count FROM calendars WHERE id = %s",
        (calendar_id,),
    ).fetchone()
    conn.commit()  # no transaction stays open while the feed is parsed
    if row is None or row[0] is None or row[3]:
        return _ParseState()
    blob = bytes(row[0])
    groups = frozenset(blob[i : i + size] for i in range(0, len(blob), size))
    return _ParseState(groups, row[1] or 0, row[2])


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

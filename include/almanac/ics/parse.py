"""ics_sync: read an ICS feed and expand its events into instances inside a window (RFC 5545).

Reading is lenient (BOM, bare CR, invalid UTF-8, junk lines, several VCALENDARs, a bare VEVENT);
expansion uses ``recurring_ical_events`` one series at a time, so one bad series is skipped and
noted in ``ParseResult.problems`` instead of losing the feed. Only a body that is not iCalendar
at all raises ``FeedParseError``.

Lengths follow RFC 5545 (3.3.6, 3.8.2.5, 3.8.5.3): DTEND - DTSTART is an exact (elapsed) duration
that every instance of the series keeps; a DURATION is exact in hours, minutes and seconds and
nominal (same wall-clock time) in days and weeks. Lines are unfolded on octets before decoding
(3.1: a fold may split a multi-octet character).

Hostile feeds are bounded here, series by series: a degenerate rule (INTERVAL=0, a date that
cannot exist, absurd COUNT or BYxxx values, far too many occurrences before the window) is
skipped before it reaches the expansion library; a runaway series keeps its first
``max_instances_per_series`` instances; ``max_instances`` is shared fairly between series;
each SUMMARY/DESCRIPTION/LOCATION is cut to ``max_event_text_chars`` and the feed's text over all
its instances to ``max_feed_text_chars``. Each of these adds one warning to ``problems``.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import x_wr_timezone
from dateutil.rrule import rrulestr
from icalendar.prop import vDDDLists, vDDDTypes, vRecur
from icalendar.prop.broken import vBroken
from recurring_ical_events import EventAdapter, Series
from recurring_ical_events.util import to_recurrence_ids

from almanac.errors import PermanentError
from almanac.ics import fastread
from almanac.ics.timezones import ZoneResolver, zone_name
from almanac.timeconv import UTC, all_day_instant, as_utc

__all__ = [
    "CUT_MARK",
    "GROUP_DIGEST_BYTES",
    "MAX_PROBLEMS",
    "FeedParseError",
    "Instance",
    "ParseResult",
    "feed_text_chars",
    "parse_feed",
]

log = logging.getLogger(__name__)

#: A longer UID is replaced by ``almanac-<sha1 of it>`` (stable, so the event keeps one identity).
MAX_UID_CHARS = 255

_DATE_PROPS = ("DTSTART", "DTEND", "RDATE", "EXDATE", "RECURRENCE-ID")
_LIST_PROPS = ("RDATE", "EXDATE")
_ICAL_START = re.compile(r"^BEGIN:(VCALENDAR|VEVENT)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_CONTENT_LINE = re.compile(r"^[A-Za-z0-9-]+[;:]")
_RANGE_STASH = "X-ALMANAC-RANGE"
_VALUE_IN_TZID = re.compile(r"^(.+):(\d{8}(?:T\d{6}Z?)?)$")
_FOLD = re.compile(rb"\n[ \t]")
# DURATION lines, and RDATE lines with a PERIOD given as start/duration: their value is kept as
# written in a parameter, because icalendar reads PT24H and P1D as the same timedelta.
_RAW_LINE = re.compile(r"^(DURATION|RDATE)([;:].*)$", re.IGNORECASE | re.MULTILINE)
_PERIOD_WITH_DURATION = re.compile(r"/[+-]?P", re.IGNORECASE)
_RAW_PARAM = "X-ALMANAC-RAW"
_NEGATIVE_COUNT = re.compile(r"COUNT=-\d+;?")  # as recurring_ical_events drops it
# The properties anything below reads (ours, icalendar's zone building, recurring_ical_events,
# x_wr_timezone). Every other well-formed content line is dropped before icalendar parses the
# feed: on real feeds most lines are DTSTAMP, ATTENDEE, ORGANIZER, X-... that cost parse time
# (their parameters above all) and whose breakage would only cost us the event.
_READ_PROPERTIES = (
    "BEGIN|END|UID|DTSTART|DTEND|DURATION|RRULE|RDATE|EXDATE|EXRULE|RECURRENCE-ID|SEQUENCE"
    "|SUMMARY|DESCRIPTION|LOCATION|STATUS"
    "|TZID|TZURL|TZOFFSETFROM|TZOFFSETTO|TZNAME"
    "|VERSION|PRODID|CALSCALE|METHOD|X-WR-TIMEZONE|X-WR-CALNAME|X-LIC-LOCATION"
)
_UNREAD_LINE = re.compile(
    rf"^(?!(?:{_READ_PROPERTIES})[;:])[A-Za-z0-9-]+[;:][^\n]*\n", re.IGNORECASE | re.MULTILINE
)
_PERIODS_STASH = "X-ALMANAC-PERIOD-DURATIONS"
_DURATION = re.compile(
    r"^([+-])?P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$", re.IGNORECASE
)
#: What a cut text ends with.
CUT_MARK = "\u2026 [truncated]"
#: At most this many problems are listed; the last line then says how many more there were.
MAX_PROBLEMS = 200
# A rule that would produce more occurrences than this between its DTSTART and the window is
# refused: the expansion library walks (and caches) every one of them before the window starts.
_MAX_STEPS_BEFORE_WINDOW = 2_000_000
_MAX_COUNT = 1_000_000
# Rules expected to produce more than this many starts in the window are expanded piece by piece.
_CHUNK_TARGET = 5_000
_MIN_CHUNK = timedelta(hours=1)
_FREQ_SECONDS = {
    "SECONDLY": 1,
    "MINUTELY": 60,
    "HOURLY": 3_600,
    "DAILY": 86_400,
    "WEEKLY": 7 * 86_400,
    "MONTHLY": 28 * 86_400,
    "YEARLY": 365 * 86_400,
}
_FREQ_RANK = {name: rank for rank, name in enumerate(_FREQ_SECONDS)}
# RFC 5545 3.3.10 value ranges (a leap second is allowed).
_RANGES = {
    "BYSECOND": (0, 60, False),
    "BYMINUTE": (0, 59, False),
    "BYHOUR": (0, 23, False),
    "BYMONTHDAY": (1, 31, True),
    "BYYEARDAY": (1, 366, True),
    "BYWEEKNO": (1, 53, True),
    "BYMONTH": (1, 12, False),
    "BYSETPOS": (1, 366, True),
}
_BYDAY = re.compile(r"^([+-]?\d{1,3})?(MO|TU|WE|TH|FR|SA|SU)$", re.IGNORECASE)
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February: in a leap year


class FeedParseError(PermanentError):
    """The body is not an iCalendar feed at all (empty, HTML, binary, no VCALENDAR).

    What to do: open the calendar's feed URL by hand (``almanac ics inspect``); the source
    probably serves an error page or a login form. Retrying the same body fails the same way.
    """


@dataclass(frozen=True, slots=True)
class Instance:
    """One occurrence of an event, identified by ``(uid, recurrence_id)``. Picklable.

    ``status`` is ``confirmed`` or ``tentative`` (``confirmed`` when the feed says nothing);
    ``status_stated`` is the feed's STATUS as written, lower-cased, or None when it has none.
    """

    uid: str
    recurrence_id: str
    summary: str
    description: str
    location: str
    status: str
    all_day: bool
    start: datetime | date
    end: datetime | date
    content_hash: str
    status_stated: str | None = None

    @property
    def starts_at(self) -> datetime:
        """The start in UTC; an all-day instance starts at 00:00 UTC of its date (``almanac.timeconv``)."""
        return as_utc(self.start)

    @property
    def ends_at(self) -> datetime:
        """The (exclusive) end in UTC; an all-day instance ends at 00:00 UTC of its end date."""
        return as_utc(self.end)


@dataclass
class ParseResult:
    """The instances of a feed and its problems: one operator-readable warning per skipped or cut
    thing (series skipped, series or feed capped, text cut), at most ``MAX_PROBLEMS`` lines."""

    instances: list[Instance] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: The digest of each UID group of the feed (a UID's blocks, with the calendar's own lines,
    #: its zones and the parse settings), for the next parse's ``reuse``; None: the feed's
    #: structure is not one whose groups are digested (``fastread`` could not split it, or it
    #: was read by icalendar as a whole).
    groups: list[bytes] | None = None
    #: The UIDs of the groups found in ``reuse``: they were not expanded, and ``instances``
    #: holds none of theirs (the caller keeps the instances it has of them).
    kept_uids: frozenset[str] = frozenset()


def parse_feed(
    body: bytes,
    *,
    window_start: datetime,
    window_end: datetime,
    calendar_tz: str = "UTC",
    max_instances: int = 200_000,
    max_instances_per_series: int = 20_000,
    max_event_text_chars: int = 50_000,
    max_feed_text_chars: int = 50_000_000,
    reuse: frozenset[bytes] = frozenset(),
) -> ParseResult:
    """Expand a feed's events into the instances that START in ``[window_start, window_end)``.

    Parameters:
        body: the feed as fetched (any line endings, BOM, invalid UTF-8 tolerated).
        window_start, window_end: aware datetimes; compared in UTC (all-day: their 00:00 UTC).
        calendar_tz: IANA zone for floating times and unknown TZIDs.
        max_instances: instances returned at most. When the series together have more, every
            series keeps its first ``k`` instances, ``k`` as large as fits (one warning each).
        max_instances_per_series: instances of one series (one UID) kept at most: its first ones.
        max_event_text_chars: SUMMARY, DESCRIPTION and LOCATION are each cut to this many
            characters, ending in ``CUT_MARK``.
        max_feed_text_chars: those three texts summed over all instances returned are cut to
            this: every text longer than some ``L`` is cut to ``L`` characters, ``L`` as large as fits.
        reuse: ``groups`` digests of an earlier parse whose instances the caller holds. A UID
            group of this feed with one of them is the same text read in the same context, so
            it is not expanded again (``kept_uids``). The feed-wide limits (``max_instances``,
            ``max_feed_text_chars``) then apply to the other groups only: the caller checks the
            kept ones' share (``almanac.ics.sync`` does), or passes no ``reuse``.

    Returns:
        ``ParseResult`` with instances sorted by ``(starts_at, uid, recurrence_id)``, the
        problems (what was skipped, capped or cut), the feed's group digests and the kept UIDs.

    Raises:
        FeedParseError: the body is not iCalendar at all.
    """
    if window_start.tzinfo is None or window_end.tzinfo is None:
        raise ValueError("window_start and window_end must be timezone-aware")
    limits = _Limits(max_instances, max_instances_per_series, max_event_text_chars, max_feed_text_chars)
    problems: list[str] = []
    default_tz = ZoneResolver().resolve(calendar_tz) if calendar_tz else None
    if default_tz is None:
        problems.append(f"calendar time zone {calendar_tz!r} is unknown; using UTC")
        default_tz = UTC
    text = _decode(body)
    if "\x00" in text:  # PostgreSQL text cannot hold NUL: drop them, keep the feed
        text = text.replace("\x00", "")
        problems.append("the feed contains NUL characters; they were removed")
    groups = _Groups(_group_salt(calendar_tz, limits, window_end - window_start), reuse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # icalendar warns on guessed TZIDs; we note our own problems
        events = (
            _read_plain_first(text, default_tz, window_start, window_end, problems, groups)
            if _FAST_READ and _FAST_PATHS
            else None
        )
        if events is None:  # the whole feed, every group, by icalendar: nothing kept or digested
            groups = _Groups(b"", frozenset())
            tops = _read_components(text, problems)
            events = _prepare_events(tops, default_tz, problems)
        instances = _expand(
            events,
            window_start.astimezone(UTC),
            window_end.astimezone(UTC),
            default_tz,
            limits,
            problems,
        )
    instances = _apply_text_budget(instances, max_feed_text_chars, problems)
    if len(problems) > MAX_PROBLEMS:
        more = len(problems) - (MAX_PROBLEMS - 1)
        problems[MAX_PROBLEMS - 1 :] = [f"... and {more} more problem(s) not listed"]
    return ParseResult(
        instances=instances, problems=problems, groups=groups.digests, kept_uids=frozenset(groups.kept)
    )


@dataclass(frozen=True, slots=True)
class _Limits:
    instances: int
    per_series: int
    event_text: int
    feed_text: int

    def __post_init__(self) -> None:
        for name in ("instances", "per_series", "event_text", "feed_text"):
            if getattr(self, name) < 1:
                raise ValueError(f"parse_feed limits must be at least 1 (max {name})")


# --- reading -------------------------------------------------------------------------------


def _decode(body: bytes) -> str:
    if not body or not body.strip():
        raise FeedParseError("the feed is empty")
    if body.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = body.decode("utf-16", errors="replace")
        text = re.sub(r"\n[ \t]", "", text.replace("\r\n", "\n").replace("\r", "\n"))
    else:
        # CRLF, LF and old-Mac bare CR alike, then unfold on octets (RFC 5545 3.1: a fold may split
        # a multi-octet UTF-8 character) and only then decode. CR and LF never occur inside one.
        raw = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        text = _FOLD.sub(b"", raw).decode("utf-8-sig", errors="replace")
    if not _ICAL_START.search(text):
        start = "".join(c if c.isprintable() else "?" for c in text.lstrip()[:40])
        raise FeedParseError(f"the feed is not iCalendar: no BEGIN:VCALENDAR line (it starts with {start!r})")
    text = _UNREAD_LINE.sub("", text)
    text = _RAW_LINE.sub(_keep_raw_value, text)
    # A trailing newline also keeps icalendar from probing a one-line body as a file path.
    return text if text.endswith("\n") else text + "\n"


def _keep_raw_value(match: re.Match) -> str:
    """``DURATION:PT24H`` -> ``DURATION;X-ALMANAC-RAW="PT24H":PT24H`` (and RDATE periods with durations)."""
    name, rest = match.group(1), match.group(2)
    colon = _value_colon(rest)
    if colon < 0:
        return match.group(0)
    value = rest[colon + 1 :].strip()
    if '"' in value or (name.upper() == "RDATE" and not _PERIOD_WITH_DURATION.search(value)):
        return match.group(0)
    return f'{name}{rest[:colon]};{_RAW_PARAM}="{value}"{rest[colon:]}'


def _value_colon(rest: str) -> int:
    """The index of the colon that starts a content line's value (colons in quoted parameters skipped)."""
    quoted = False
    for index, char in enumerate(rest):
        if char == '"':
            quoted = not quoted
        elif char == ":" and not quoted:
            return index
    return -1


def _read_components(text: str, problems: list[str]) -> list[icalendar.Component]:
    try:
        components = icalendar.Component.from_ical(text, multiple=True)
    except Exception as e:  # any parser failure: fall back to reading per component
        problems.append(f"the feed is malformed ({_short(e)}); read it component by component")
        components = _read_leniently(text, problems)
    components = [c for c in components if c.name in ("VCALENDAR", "VEVENT")]
    if not components:
        raise FeedParseError("the feed holds no readable VCALENDAR or VEVENT")
    return components


def _read_leniently(text: str, problems: list[str]) -> list[icalendar.Component]:
    """Drop lines that are not content lines, then parse each VEVENT/VTIMEZONE on its own."""
    lines = re.sub(r"\n[ \t]", "", text).split("\n")
    calendars: list[tuple[list[str], list[tuple[str, list[str]]]]] = []  # (calendar props, blocks)
    loose: list[tuple[str, list[str]]] = []
    dropped = 0
    depth = 0
    block: list[str] | None = None
    block_name = ""
    for line in lines:
        if not line.strip():
            continue
        if not _CONTENT_LINE.match(line):
            dropped += 1
            continue
        upper = line.upper().rstrip()
        if upper.startswith("BEGIN:"):
            name = upper[6:].strip()
            if depth == 0 and name == "VCALENDAR":
                calendars.append(([], []))
            elif block is None and (depth == 1 or (depth == 0 and name == "VEVENT")):
                block, block_name, block_depth = [], name, depth
            depth += 1
            if block is not None:
                block.append(line)
            continue
        if upper.startswith("END:"):
            if depth == 0:
                continue
            depth -= 1
            if block is not None:
                block.append(line)
                if depth == block_depth:
                    target = calendars[-1][1] if block_depth == 1 and calendars else loose
                    target.append((block_name, block))
                    block = None
            continue
        if block is not None:
            block.append(line)
        elif depth == 1 and calendars:
            calendars[-1][0].append(line)
    if dropped:
        problems.append(f"dropped {dropped} line(s) that are not iCalendar content lines")
    result: list[icalendar.Component] = []
    for props, blocks in [*calendars, ([], loose)] if loose else calendars:
        try:
            calendar = icalendar.Calendar.from_ical(
                "BEGIN:VCALENDAR\n" + "\n".join(props) + "\nEND:VCALENDAR\n"
            )
        except Exception:  # calendar properties are optional for us
            calendar = icalendar.Calendar()
        for name, block_lines in blocks:
            try:
                calendar.add_component(icalendar.Component.from_ical("\n".join(block_lines) + "\n"))
            except Exception as e:  # one unreadable component must not lose the rest
                problems.append(f"skipped a {name} that could not be read ({_short(e)})")
        result.append(calendar)
    return result


# --- normalising events ----------------------------------------------------------------------


def _prepare_events(
    tops: list[icalendar.Component],
    default_tz: tzinfo,
    problems: list[str],
    resolver: ZoneResolver | None = None,
) -> list[icalendar.Event]:
    """Every VEVENT with a UID, our own zones on TZID values, X-WR-TIMEZONE applied, no floating times.

    ``resolver``: the feed's, when the caller built it already (``_read_plain_first``)."""
    calendars: list[icalendar.Component] = []
    loose = icalendar.Calendar()
    for component in tops:
        if component.name == "VCALENDAR":
            calendars.append(component)
        else:
            loose.add_component(component)
    if loose.subcomponents:
        calendars.append(loose)
    if resolver is None:
        resolver = ZoneResolver(_vtimezones(calendars))
    unknown: set[str] = set()
    events: list[icalendar.Event] = []
    for calendar in calendars:
        for event in calendar.walk("VEVENT"):
            _set_uid(event)
            _repair_broken(event, problems)
            _apply_tzids(event, resolver, default_tz, unknown)
            _stash_period_durations(event)
            if "RECURRENCE-ID" in event and "RANGE" in event["RECURRENCE-ID"].params:
                event[_RANGE_STASH] = event["RECURRENCE-ID"].params["RANGE"]
        x_wr = _x_wr_timezone(calendar, resolver, problems)
        if x_wr is not None:
            try:
                calendar = x_wr_timezone.to_standard(calendar, timezone=x_wr)
            except (OverflowError, ValueError) as e:  # e.g. a date at the edge of the range
                problems.append(
                    f"X-WR-TIMEZONE could not be applied ({type(e).__name__}: {str(e)[:80]}); "
                    "times kept as the feed states them"
                )
        for event in calendar.walk("VEVENT"):
            if _finish_event(event, default_tz, problems):
                events.append(event)
    for tzid in sorted(unknown):
        problems.append(f"unknown time zone {tzid[:80]!r}; its times are read in {zone_name(default_tz)}")
    problems.extend(resolver.problems)
    return events


def _vtimezones(calendars: list[icalendar.Component]) -> dict[str, icalendar.Component]:
    return {
        str(tz["TZID"]): tz for calendar in calendars for tz in calendar.walk("VTIMEZONE") if "TZID" in tz
    }


def _short_form(uid: str) -> str:
    """A UID as kept: a longer one than ``MAX_UID_CHARS`` becomes ``almanac-<sha1 of it>``."""
    if len(uid) > MAX_UID_CHARS:  # a UID is repeated on every instance row and key: keep it short
        return (
            "almanac-" + hashlib.sha1(uid.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()
        )
    return uid


def _set_uid(event: icalendar.Event) -> None:
    uid = _short_form(str(event.get("UID", "") or "").strip())
    if uid:
        if uid != event.get("UID"):
            event["UID"] = uid
        return
    digest = hashlib.sha1(usedforsecurity=False)
    for name in ("DTSTART", "DTEND", "DURATION", "SUMMARY", "RRULE", "RDATE", "RECURRENCE-ID", "LOCATION"):
        for value in _as_list(event.get(name)):
            digest.update(name.encode())
            digest.update(str(getattr(value, "params", {}).get("TZID", "")).encode())
            digest.update(value.to_ical() if hasattr(value, "to_ical") else str(value).encode())
    event["UID"] = "almanac-" + digest.hexdigest()


def _repair_broken(event: icalendar.Event, problems: list[str]) -> None:
    """Repair what real feeds get wrong in RRULE/RDATE/EXDATE text; drop what cannot be repaired."""
    uid = _short_uid(event)
    rules = []
    for rule in _as_list(event.get("RRULE")):
        if isinstance(rule, vRecur):
            rules.append(rule)
            continue
        raw = str(rule)
        try:  # e.g. "BYDAY=MO, TU, WE" (Exchange CDO)
            rules.append(vRecur.from_ical(re.sub(r"\s+", "", raw)))
        except Exception:  # unrepairable: the series is skipped when expanded
            rules.append(rule)
    if rules:
        event["RRULE"] = rules if len(rules) > 1 else rules[0]
    for name in _LIST_PROPS:
        values = _as_list(event.get(name))
        if not any(not isinstance(v, vDDDLists) for v in values):
            continue
        kept = [v for v in values if isinstance(v, vDDDLists)]
        for value in values:
            if isinstance(value, vDDDLists):
                continue
            dts = []
            for text in str(value).split(","):
                text = text.strip()
                if len(text) == 9 and text.endswith("Z"):  # "20131210Z": a DATE with a Z (Google)
                    text = text[:8]
                try:
                    dts.append(vDDDTypes.from_ical(text) if text else None)
                except Exception:
                    dts.append(None)
            good = [dt for dt in dts if dt is not None]
            if len(good) != len(dts):
                problems.append(f"event {uid}: ignored an unreadable {name} value")
            if good:
                kept.append(vDDDLists(good, params=dict(getattr(value, "params", {}))))
        if kept:
            event[name] = kept if len(kept) > 1 else kept[0]
        else:
            del event[name]
    for name in ("DTSTART", "DTEND", "RECURRENCE-ID"):
        value = event.get(name)
        tzid = str(getattr(value, "params", {}).get("TZID", "")) if isinstance(value, vBroken) else ""
        match = _VALUE_IN_TZID.match(tzid)
        if match:  # DTSTART;TZID="W. Europe Standard Time:20200609T090000" (Exchange)
            try:
                repaired = vDDDTypes(vDDDTypes.from_ical(match.group(2)))
            except Exception:  # left broken: the event is skipped with a problem
                continue
            repaired.params.update({k: v for k, v in value.params.items() if k != "TZID"})
            repaired.params["TZID"] = match.group(1)
            event[name] = repaired
    for name in ("DTEND", "DURATION"):
        if any(isinstance(v, vBroken) for v in _as_list(event.get(name))):
            problems.append(f"event {uid}: ignored an unreadable {name}")
            del event[name]


def _apply_tzids(
    event: icalendar.Event, resolver: ZoneResolver, default_tz: tzinfo, unknown: set[str]
) -> None:
    """Attach OUR zone (per feed) to every value written with a TZID, keeping its wall time."""

    def zone(tzid: str) -> tzinfo:
        tz = resolver.resolve(tzid)
        if tz is None:
            unknown.add(tzid)
            return default_tz
        return tz

    for name in _DATE_PROPS:
        if name not in event:
            continue
        values = _as_list(event[name])
        changed = []
        for value in values:
            tzid = None if isinstance(value, vBroken) else value.params.get("TZID")
            if not tzid or not _has_datetime(value):
                changed.append(value)
                continue
            tz = zone(str(tzid))
            changed.append(_map_value(value, lambda dt, tz=tz: dt.replace(tzinfo=tz)))
        event[name] = changed if isinstance(event[name], list) else changed[0]


def _stash_period_durations(event: icalendar.Event) -> None:
    """Note, by position, the DURATION text of each RDATE PERIOD (x_wr_timezone rebuilds RDATE lists
    without their parameters)."""
    entries = []
    index = 0
    for value in _as_list(event.get("RDATE")):
        if not isinstance(value, vDDDLists):
            continue
        raw = value.params.get(_RAW_PARAM)
        parts = str(raw).split(",") if raw else []
        aligned = len(parts) == len(value.dts)
        for position, item in enumerate(value.dts):
            dt = item.dt
            if aligned and isinstance(dt, tuple) and isinstance(dt[1], timedelta) and "/" in parts[position]:
                entries.append(f"{index}={parts[position].split('/', 1)[1].strip()}")
            index += 1
    if entries:
        event[_PERIODS_STASH] = ";".join(entries)


def _x_wr_timezone(
    calendar: icalendar.Component, resolver: ZoneResolver, problems: list[str]
) -> tzinfo | None:
    value = calendar.get("X-WR-TIMEZONE")
    if value is None or calendar.name != "VCALENDAR":
        return None
    tz = resolver.resolve(str(value))
    if tz is None:
        problems.append(f"X-WR-TIMEZONE {str(value)[:80]!r} is unknown; ignored")
    return tz


def _finish_event(event: icalendar.Event, default_tz: tzinfo, problems: list[str]) -> bool:
    """Floating times to the calendar's zone, RANGE restored, UNTIL made consistent; False: skip it."""
    for name in ("DTSTART", "RECURRENCE-ID"):
        if isinstance(event.get(name), (vBroken, list)) or (name == "DTSTART" and name not in event):
            problems.append(f"event {_short_uid(event)}: no readable {name}; skipped")
            return False
    for name in _DATE_PROPS:
        if name not in event:
            continue
        values = _as_list(event[name])
        if not any(_has_floating(v) for v in values):
            continue
        changed = [
            _map_value(v, lambda dt: dt.replace(tzinfo=default_tz) if dt.tzinfo is None else dt)
            for v in values
        ]
        event[name] = changed if isinstance(event[name], list) else changed[0]
    if _RANGE_STASH in event:
        # x_wr_timezone rebuilds RECURRENCE-ID without its parameters: RANGE=THISANDFUTURE was lost.
        event["RECURRENCE-ID"].params["RANGE"] = str(event.pop(_RANGE_STASH))
    start = event["DTSTART"].dt
    for rule in _as_list(event.get("RRULE")):
        if isinstance(rule, vRecur) and rule.get("UNTIL"):
            rule["UNTIL"] = [_consistent_until(start, rule["UNTIL"][0], default_tz)]
    return True


def _consistent_until(start: date | datetime, until: date | datetime, default_tz: tzinfo) -> date | datetime:
    """UNTIL of the same kind as DTSTART (RFC 5545 3.3.10), read the way producers mean it.

    recurring_ical_events reads a floating UNTIL on a zoned DTSTART as UTC, so a weekly
    10:00 New York series with UNTIL=...T100000 loses its last instance; a DATE UNTIL on a timed
    series is taken as the end of that day in the series' zone.
    """
    if isinstance(start, datetime):
        if isinstance(until, datetime):
            if until.tzinfo is None:
                until = until.replace(tzinfo=start.tzinfo)
            return until.astimezone(UTC)
        return datetime.combine(until, time(23, 59, 59), start.tzinfo).astimezone(UTC)
    if isinstance(until, datetime):
        if until.tzinfo is None:
            return until.date()
        return until.astimezone(default_tz).date()
    return until


# --- plain events, read without icalendar ----------------------------------------------------

#: Plain VEVENTs (see ``_read_plain_first``) are read from ``almanac.ics.fastread``'s lexing;
#: False reads every feed with icalendar (tests compare the two over the corpus).
_FAST_READ = True
_ICAL_UTC = ZoneInfo("UTC")  # what icalendar gives a DATE-TIME ending in Z
_PLAIN_PROPERTIES = frozenset(
    (
        "UID",
        "DTSTART",
        "DTEND",
        "DURATION",
        "RRULE",
        "EXDATE",
        "SEQUENCE",
        "SUMMARY",
        "DESCRIPTION",
        "LOCATION",
        "STATUS",
    )
)
_MEMBER_PROPERTIES = _PLAIN_PROPERTIES | {"RECURRENCE-ID"}
_PLAIN_TEXTS = ("SUMMARY", "DESCRIPTION", "LOCATION", "STATUS")
_DATE_TIME_TEXT = re.compile(r"\d{8}T\d{6}Z?")
_DATE_TEXT = re.compile(r"\d{8}")
_PLAIN_TZID = re.compile(r"[^\"^:;,\\]+")
#: Where each block re-read by icalendar stood among the feed's VEVENTs (``_calendar_text``).
_POS_STASH = "X-ALMANAC-POS"


class _NotPlain(Exception):
    """This block is read by icalendar."""


class _Value:
    """A DTSTART/DTEND/DURATION as ``_Plain`` holds it (icalendar's: ``.dt`` and ``.params``)."""

    __slots__ = ("dt", "params")

    def __init__(self, dt, params: dict | None = None) -> None:
        self.dt = dt
        self.params = params or {}


class _Dates:
    """An EXDATE line as ``_Plain`` holds it (icalendar's vDDDLists: ``.dts``)."""

    __slots__ = ("dts",)

    def __init__(self, dts: list[_Value]) -> None:
        self.dts = dts


class _Plain:
    """A plain VEVENT read without icalendar, holding what ``_prepare_events`` leaves in an
    icalendar Event (our zones, X-WR-TIMEZONE applied, no floating time, UNTIL consistent), and
    answering the same ``get``/``in``/``[]`` the expansion below uses. ``plan``: its instances
    in the window, computed when it was read (None: its rule is degenerate and it is skipped)."""

    __slots__ = ("_props", "group_plan", "plan", "pos")

    def __init__(self, props: dict[str, Any], pos: int) -> None:
        self._props = props
        self.pos = pos
        self.plan: _Planned | None = None
        #: On the master of a series with overrides: (ids of the series' members, their plans).
        self.group_plan: tuple[frozenset[int], list] | None = None

    def get(self, name: str, default: Any = None) -> Any:
        return self._props.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self._props

    def __getitem__(self, name: str) -> Any:
        return self._props[name]


def _read_plain_first(
    text: str,
    default_tz: tzinfo,
    window_start: datetime,
    window_end: datetime,
    problems: list[str],
    groups: _Groups | None = None,
) -> list[icalendar.Event | _Plain] | None:
    """The feed's events, the plain ones read from ``fastread``'s lexing and the others (every
    block of a UID that appears more than once, overrides, RDATE, quoted
    parameters, anything our expansion would hand to the library...) by icalendar together with
    the calendar's own lines and VTIMEZONEs, exactly as ``_prepare_events`` reads a whole feed.
    None: the feed is read by icalendar as a whole (its structure is unusual, or X-WR-TIMEZONE
    cannot be applied to some time). ``groups``: digests the feed's UID groups, and leaves out
    the blocks of those it finds in its ``reuse``."""
    split = fastread.split(text)
    if split is None:
        return None
    try:
        calendar = icalendar.Calendar.from_ical(_calendar_text(split.header, split.zones, []))
    except Exception:  # the calendar's own lines or zones are odd: icalendar reads the feed
        return None
    resolver = ZoneResolver(_vtimezones([calendar]))
    x_wr = _x_wr_timezone(calendar, resolver, [])  # its problem is noted by _prepare_events
    window = (window_start.astimezone(UTC), window_end.astimezone(UTC))
    uses = Counter(_short_form(uid) for block in split.events for uid in set(block.uids))
    blocks_left = split.events if groups is None else groups.digest(split, uses)
    plains: list[_Plain] = []
    others: list[fastread.Block] = []
    series: dict[str, list[fastread.Block]] = {}  # a series with overrides: its blocks
    for block in blocks_left:
        plain = None
        uid = _short_form(block.uids[0]) if len(block.uids) == 1 else None
        if block.props is not None and uid is not None:
            if uses[uid] > 1:
                series.setdefault(uid, []).append(block)
                continue
            try:
                plain = _plain_event(block, uid, resolver, x_wr, default_tz, window)
            except _NotPlain:
                pass
            except Exception:  # e.g. X-WR-TIMEZONE overflows on this time: icalendar reads the feed
                return None
        if plain is None:
            others.append(block)
        else:
            plains.append(plain)
    for uid, blocks in series.items():
        members = None
        if len(blocks) == uses[uid]:  # else a block of that UID is for icalendar: all of them are
            try:
                members = _plain_group(blocks, uid, resolver, x_wr, default_tz, window)
            except _NotPlain:
                pass
            except Exception:  # as above
                return None
        if members is None:
            others.extend(blocks)
        else:
            plains.extend(members)
    others.sort(key=lambda block: block.pos)
    noted: list[str] = []
    tops = [calendar]
    if others:
        tops = _read_components(_calendar_text(split.header, split.zones, others), noted)
    events = _prepare_events(tops, default_tz, noted, resolver=resolver)
    if x_wr is not None and any(p.startswith("X-WR-TIMEZONE could not be applied") for p in noted):
        return None  # that applies to the whole feed (or to none of it)
    problems.extend(noted)
    if not plains:
        return events
    merged: list[tuple[int, icalendar.Event | _Plain]] = [(p.pos, p) for p in plains]
    merged.extend((_int(event.get(_POS_STASH)), event) for event in events)
    merged.sort(key=lambda pair: pair[0])  # the feed's order, as icalendar walks it
    return [event for _, event in merged]


#: Part of every group digest: raise it when a change to this module changes the instances of
#: any feed, so that groups digested before are expanded again (not only after a day).
_GROUPS_VERSION = 1
#: Bytes of one group digest (``ParseResult.groups``).
GROUP_DIGEST_BYTES = 16


def feed_text_chars(instances) -> int:
    """What ``max_feed_text_chars`` counts of these instances: SUMMARY, DESCRIPTION and LOCATION."""
    return sum(len(i.summary) + len(i.description) + len(i.location) for i in instances)


def _group_salt(calendar_tz: str, limits: _Limits, window: timedelta) -> bytes:
    """What a group's instances depend on besides its text, the calendar's lines and its zones
    (and the window's place, which the caller bounds: ``almanac.ics.sync`` keeps rows a day)."""
    return repr((_GROUPS_VERSION, calendar_tz, dataclasses.astuple(limits), window)).encode()


class _Groups:
    """A feed's UID groups: their digests, and which of them an earlier parse already expanded.

    A group is every block of one UID, when each of them is plain enough for ``fastread`` to
    know it has exactly that UID (so no other block can add instances or overrides to it). Its
    digest covers the group's lines (unread properties such as DTSTAMP are gone already), the
    calendar's own lines, its VTIMEZONEs and ``_group_salt``; what its instances are made of.
    """

    def __init__(self, salt: bytes, reuse: frozenset[bytes]) -> None:
        self.salt = salt
        self.reuse = reuse
        self.digests: list[bytes] | None = None
        self.kept: set[str] = set()

    def digest(self, split: fastread.Split, uses: Counter) -> list[fastread.Block]:
        """Digest the groups of ``split``; return its blocks but those of the kept groups."""
        members: dict[str, list[fastread.Block]] = {}
        of: dict[int, str] = {}  # id(block) -> its group's UID
        for block in split.events:
            if block.props is not None and len(block.uids) == 1:
                uid = _short_form(block.uids[0])
                if uid:
                    members.setdefault(uid, []).append(block)
                    of[id(block)] = uid
        context = hashlib.blake2b(self.salt, digest_size=GROUP_DIGEST_BYTES)
        for line in split.header:
            context.update(line.encode("utf-8", "surrogatepass") + b"\n")
        for zone in split.zones:
            context.update("\n".join(zone).encode("utf-8", "surrogatepass") + b"\n\x00")
        digests = []
        for uid, blocks in members.items():
            if len(blocks) != uses[uid]:  # a block not plain enough may be of this UID too
                continue
            digest = context.copy()
            for block in blocks:
                digest.update(b"\x01" + "\n".join(block.lines).encode("utf-8", "surrogatepass"))
            value = digest.digest()
            digests.append(value)
            if value in self.reuse:
                self.kept.add(uid)
        self.digests = sorted(digests)
        if not self.kept:
            return split.events
        return [block for block in split.events if of.get(id(block)) not in self.kept]


def _calendar_text(header: list[str], zones: list[list[str]], blocks: list[fastread.Block]) -> str:
    lines = ["BEGIN:VCALENDAR", *header]
    for zone in zones:
        lines.extend(zone)
    for block in blocks:
        lines.append(block.lines[0])
        lines.append(f"{_POS_STASH}:{block.pos}")
        lines.extend(block.lines[1:])
    lines.append("END:VCALENDAR\n")
    return "\n".join(lines)


def _plain_group(
    blocks: list[fastread.Block],
    uid: str,
    resolver: ZoneResolver,
    x_wr: tzinfo | None,
    default_tz: tzinfo,
    window: tuple[datetime, datetime],
) -> list[_Plain] | None:
    """The blocks of one UID (a master and its overrides) read as plain events, planned together
    by ``_plan_group``; None (or ``_NotPlain``) when the series is for icalendar and the library."""
    members = []
    for block in blocks:
        plain = _plain_event(block, uid, resolver, x_wr, default_tz, window, member=True)
        if plain is None:
            return None
        members.append(plain)
    masters = [member for member in members if "RECURRENCE-ID" not in member]
    if len(masters) != 1 or "RRULE" not in masters[0] or _degenerate(masters[0], *window) is not None:
        return None
    plans = _plan_group(members, *window, default_tz)
    if plans is _NOT_SIMPLE:
        return None
    masters[0].group_plan = (frozenset(map(id, members)), plans)
    return members


def _plain_event(
    block: fastread.Block,
    uid: str,
    resolver: ZoneResolver,
    x_wr: tzinfo | None,
    default_tz: tzinfo,
    window: tuple[datetime, datetime],
    *,
    member: bool = False,
) -> _Plain | None:
    """A block of one-line properties read as ``_prepare_events`` reads it, with its instances
    planned; None (or ``_NotPlain``) when anything in it is for icalendar and the library.
    ``uid``: its one UID as kept (``_short_form``). ``member``: one block of a series with
    overrides (RECURRENCE-ID allowed), not planned here (see ``_plain_group``)."""
    props = block.props
    allowed = _MEMBER_PROPERTIES if member else _PLAIN_PROPERTIES
    if "DTSTART" not in props or not props.keys() <= allowed:
        return None
    if any(len(values) > 1 for name, values in props.items() if name != "EXDATE"):
        return None
    if not uid or uid.startswith("almanac-"):  # ours: a UID-less event's digest, a long UID's
        return None

    def instant(params: dict[str, str], value: str, dates: bool = False) -> date | datetime:
        if dates and _DATE_TEXT.fullmatch(value):
            return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
        if not _DATE_TIME_TEXT.fullmatch(value):
            raise _NotPlain
        dt = datetime(
            int(value[:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[9:11]),
            int(value[11:13]),
            int(value[13:15]),
        )
        tzid = params.get("TZID")
        if tzid is not None:
            if len(value) != 15 or not _PLAIN_TZID.fullmatch(tzid):
                raise _NotPlain
            tz = resolver.resolve(tzid)
            if tz is None:  # unknown: _prepare_events notes it
                raise _NotPlain
            dt = dt.replace(tzinfo=tz)
        elif len(value) == 16:
            dt = dt.replace(tzinfo=_ICAL_UTC)
        if x_wr is not None:  # as x_wr_timezone's walker: UTC shown in that zone, floating in it
            if dt.tzinfo is None:
                return dt.replace(tzinfo=x_wr)
            if (dt.tzname() or "").upper() == "UTC":
                return dt.astimezone(x_wr)
            return dt
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=default_tz)

    def one(name: str, allowed: tuple[str, ...] = ("TZID",)) -> tuple[dict[str, str], str] | None:
        values = props.get(name)
        if values is None:
            return None
        params, value = values[0]
        if not params.keys() <= {*allowed, "VALUE"} or params.get("VALUE", "DATE-TIME") != "DATE-TIME":
            raise _NotPlain
        return params, value

    def day_or_instant(name: str) -> date | datetime | None:
        """DTSTART/DTEND: a DATE-TIME, or a DATE (``VALUE=DATE``, or eight digits as icalendar
        reads them) without TZID."""
        values = props.get(name)
        if values is None:
            return None
        params, value = values[0]
        kind = params.get("VALUE")
        if kind == "DATE" or (kind is None and _DATE_TEXT.fullmatch(value)):
            if not params.keys() <= {"VALUE"} or not _DATE_TEXT.fullmatch(value):
                raise _NotPlain
            return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
        return instant(*one(name))

    out: dict[str, Any] = {"UID": uid}
    try:
        start = day_or_instant("DTSTART")
        out["DTSTART"] = _Value(start)
        end = day_or_instant("DTEND")
        if end is not None:
            out["DTEND"] = _Value(end)
        recurrence_id = day_or_instant("RECURRENCE-ID")  # its parameters: TZID and VALUE only
        if recurrence_id is not None:
            out["RECURRENCE-ID"] = _Value(recurrence_id)
        duration = one("DURATION", ())
        if duration is not None:
            length = vDDDTypes.from_ical(duration[1])
            if not isinstance(length, timedelta):
                raise _NotPlain
            raw = {_RAW_PARAM: duration[1].strip()} if block.raw_duration else {}
            out["DURATION"] = _Value(length, raw)
        rule = props.get("RRULE")
        if rule is not None:
            params, value = rule[0]
            if params or "\\" in value:
                raise _NotPlain
            recur = vRecur.from_ical(value)
            if recur.get("UNTIL"):
                recur["UNTIL"] = [_consistent_until(start, recur["UNTIL"][0], default_tz)]
            out["RRULE"] = recur
        exdates = []
        for params, value in props.get("EXDATE", ()):
            kind = params.get("VALUE", "DATE-TIME")
            if not params.keys() <= {"TZID", "VALUE"} or kind not in ("DATE", "DATE-TIME"):
                raise _NotPlain
            items = [instant(params, item, dates=True) for item in value.split(",")]
            if any(isinstance(item, datetime) == (kind == "DATE") for item in items):
                raise _NotPlain
            exdates.append(_Dates([_Value(item) for item in items]))
        if exdates:
            out["EXDATE"] = exdates if len(exdates) > 1 else exdates[0]
    except (TypeError, ValueError):  # an impossible date, an unreadable rule or duration
        raise _NotPlain from None
    for name in _PLAIN_TEXTS:
        values = props.get(name)
        if values is not None:
            params, value = values[0]
            if not params.keys() <= {"LANGUAGE"}:
                return None
            out[name] = fastread.unescape(value)
    plain = _Plain(out, block.pos)
    if member:
        return plain
    if "RRULE" in out and _degenerate(plain, *window) is not None:
        return plain  # skipped with its reason by _expand, as any degenerate series
    plan = _fast_plan(plain, *window, default_tz)
    if plan is _NOT_SIMPLE:
        return None
    plain.plan = plan
    return plain


# --- expanding -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fields:
    """What every instance of one component shares: its texts (already cut) and status."""

    summary: str
    description: str
    location: str
    status: str
    status_stated: str | None
    #: The content hash's state after the texts and status: each instance only adds its times.
    digest: Any = field(default=None, compare=False, repr=False)


def _expand(
    events: list[icalendar.Event],
    window_start: datetime,
    window_end: datetime,
    default_tz: tzinfo,
    limits: _Limits,
    problems: list[str],
) -> list[Instance]:
    # For one (UID, RECURRENCE-ID) the highest SEQUENCE wins; on a tie the LAST in the file
    # (recurring_ical_events keeps the first).
    series: dict[str, dict[object, tuple[int, icalendar.Event]]] = {}
    for event in events:
        rid = event.get("RECURRENCE-ID")
        key = to_recurrence_ids(rid.dt)[0] if rid is not None else None
        sequence = _int(event.get("SEQUENCE"))
        kept = series.setdefault(str(event["UID"]), {})
        if key not in kept or sequence >= kept[key][0]:
            kept[key] = (sequence, event)
    fields = _field_reader(limits.event_text, problems)
    by_series: dict[str, list[Instance]] = {}
    more: set[str] = set()  # series that had more instances in the window than they keep
    level = limits.per_series  # instances each series may keep; lowered when the feed is full
    total = 0
    for uid, by_rid in series.items():
        components = [e for _, e in by_rid.values()]
        master = by_rid.get(None, (0, None))[1]
        reason = _degenerate(master, window_start, window_end) if master is not None else None
        if reason is not None:
            problems.append(f"event {uid[:80]}: {reason}; series skipped")
            continue
        limit = min(limits.per_series, level)
        found: dict[str, Instance] = {}
        try:
            for batch in _expand_series(uid, components, window_start, window_end, default_tz, fields):
                for instance in batch:
                    if instance.recurrence_id in found:
                        if found[instance.recurrence_id] != instance:
                            problems.append(
                                f"event {uid[:80]}: two instances with recurrence id "
                                f"{instance.recurrence_id!r}; kept one"
                            )
                        continue
                    found[instance.recurrence_id] = instance
                if len(found) > limit:  # later pieces of the window only hold later starts
                    break
        except Exception as e:  # one bad series must not lose the rest of the feed
            problems.append(f"event {uid[:80]}: skipped ({_short(e)})")
            continue
        instances = sorted(found.values(), key=_order)
        if len(instances) > limit:
            more.add(uid)
            del instances[limit:]
        if uid in more and limit == limits.per_series:
            problems.append(
                f"event {uid[:80]}: more than {limits.per_series} instances in the window; "
                f"kept the first {limits.per_series}"
            )
        by_series[uid] = instances
        total += len(instances)
        # Lower the level with some slack (half the cap) so that a feed of very many series is
        # not recounted after each one; the last trim below makes it exact.
        if total > limits.instances + limits.instances // 2 and level > 1:
            level, total = _trim(by_series, more, limits.instances)
    if total > limits.instances and level > 1:
        level, total = _trim(by_series, more, limits.instances)
    result = sorted((i for v in by_series.values() for i in v), key=_order)
    cut = sorted(uid for uid, v in by_series.items() if uid in more and len(v) == level)
    if level < limits.per_series and cut:
        problems.append(
            f"more than {limits.instances} instances in the window over {len(by_series)} series; "
            f"kept the first {level} of each ({len(cut)} series cut)"
        )
        problems.extend(
            f"event {uid[:80]}: kept only its first {level} instances (the feed is over its cap)"
            for uid in cut
        )
    if len(result) > limits.instances:  # more series than instances allowed: keep the earliest
        problems.append(
            f"{len(by_series)} series in the window, more than the {limits.instances} instances allowed; "
            f"kept the earliest {limits.instances}"
        )
        del result[limits.instances :]
    return result


def _order(instance: Instance) -> tuple:
    return (instance.starts_at, instance.uid, instance.recurrence_id)


def _trim(by_series: dict[str, list[Instance]], more: set[str], budget: int) -> tuple[int, int]:
    """Keep the first ``level`` instances of every series, ``level`` as large as ``budget`` allows."""
    level = _water_level([len(v) for v in by_series.values()], budget)
    for uid, instances in by_series.items():
        if len(instances) > level:
            more.add(uid)
            del instances[level:]
    return level, sum(len(v) for v in by_series.values())


def _water_level(counts: list[int], budget: int) -> int:
    """The largest ``k >= 1`` with ``sum(min(c, k)) <= budget`` (1 when even that is too many)."""
    low, high = 1, max(counts, default=1)
    while low < high:
        middle = (low + high + 1) // 2
        if sum(min(c, middle) for c in counts) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def _field_reader(max_chars: int, problems: list[str]) -> Callable[[icalendar.Event], _Fields]:
    """Read a component's texts and status once (cut to ``max_chars`` each, a problem per cut)."""
    cache: dict[int, _Fields] = {}

    def read(component: icalendar.Event) -> _Fields:
        known = cache.get(id(component))
        if known is not None:
            return known
        texts = {}
        for name in ("SUMMARY", "DESCRIPTION", "LOCATION"):
            text = _text(component.get(name))
            if len(text) > max_chars:
                problems.append(
                    f"event {_short_uid(component)}: {name} has {len(text)} characters; "
                    f"cut to {max_chars} (ends in {CUT_MARK!r})"
                )
                text = _cut(text, max_chars)
            texts[name] = text
        stated = _text(component.get("STATUS")).strip().lower() or None
        status = "tentative" if stated == "tentative" else "confirmed"
        fields = _Fields(
            summary=texts["SUMMARY"],
            description=texts["DESCRIPTION"],
            location=texts["LOCATION"],
            status=status,
            status_stated=stated,
            digest=_hash_base(texts["SUMMARY"], texts["DESCRIPTION"], texts["LOCATION"], status),
        )
        cache[id(component)] = fields
        return fields

    return read


def _cut(text: str, length: int) -> str:
    """``text`` cut to ``length`` characters, the last ones being ``CUT_MARK`` when it fits."""
    if len(text) <= length:
        return text
    if length <= len(CUT_MARK):
        return text[:length]
    return text[: length - len(CUT_MARK)] + CUT_MARK


def _expand_series(
    uid: str,
    components: list[icalendar.Event],
    window_start: datetime,
    window_end: datetime,
    default_tz: tzinfo,
    fields: Callable[[icalendar.Event], _Fields],
) -> Iterator[list[Instance]]:
    """The instances of one series, one list per piece of the window, pieces in time order."""
    if len(components) == 1 and _FAST_PATHS:
        plan = _fast_plan(components[0], window_start, window_end, default_tz)
        if plan is not _NOT_SIMPLE:
            yield _build(uid, plan, components[0], fields)
            return
    elif _FAST_PATHS:
        plans = _plan_group(components, window_start, window_end, default_tz)
        if plans is not _NOT_SIMPLE:
            yield [instance for component, plan in plans for instance in _build(uid, plan, component, fields)]
            return
    adapters = [EventAdapter(c) for c in components]
    master = next((a for a in adapters if not a.is_modification()), None)
    recurring = master is not None and ("RRULE" in master._component or "RDATE" in master._component)
    all_day_series = master is not None and not isinstance(master._component["DTSTART"].dt, datetime)
    periods = _period_lengths(master._component) if master is not None else {}
    lengths: dict[int, _Length | None] = {}
    series = Series(adapters)
    for chunk_start, chunk_end in _chunks(master, window_start, window_end):
        batch = []
        for occurrence in series.between(chunk_start, chunk_end):
            adapter = occurrence._adapter  # the source component, without a copy per instance
            component = adapter._component
            shared = fields(component)
            if shared.status_stated == "cancelled":
                continue
            start, end = occurrence.start, occurrence.end
            if not chunk_start <= as_utc(start) < chunk_end:
                continue
            original = start
            if adapter.is_modification():
                original = component["RECURRENCE-ID"].dt
                if adapter.this_and_future:
                    original = start - adapter.move_recurrences_by
                rid_all_day = all_day_series if master is not None else not isinstance(original, datetime)
                recurrence_id = _format_rid(original, rid_all_day, default_tz)
            elif recurring:
                recurrence_id = _format_rid(start, all_day_series, default_tz)
            else:
                recurrence_id = ""
            if isinstance(start, datetime):
                length = None
                if periods and (not adapter.is_modification() or adapter.this_and_future):
                    length = next((periods[r] for r in to_recurrence_ids(original) if r in periods), None)
                if length is None:
                    if id(adapter) not in lengths:
                        lengths[id(adapter)] = _length_of(adapter)
                    length = lengths[id(adapter)]
                if length is not None:
                    end = length.end(start)
            batch.append(_instance(uid, recurrence_id, shared, start, end))
        yield batch


_NOT_SIMPLE = object()
#: The direct paths below give what the library gives, faster (tests compare the two over the
#: corpus); False sends every series through recurring_ical_events.
_FAST_PATHS = True


@dataclass(frozen=True, slots=True)
class _Planned:
    """The instances of a component the direct paths below expand: ``(recurrence id, start, end)``
    in the window. ``read_fields``: its texts are read (and their cuts noted) even when none is in
    the window, as for a series; a one-off outside the window is not read at all."""

    items: list[tuple[str, datetime, datetime]]
    read_fields: bool


def _fast_plan(
    component: icalendar.Event | _Plain, window_start: datetime, window_end: datetime, default_tz: tzinfo
) -> _Planned | object:
    """The direct expansion of a component alone in its series, or ``_NOT_SIMPLE`` (the library's)."""
    if isinstance(component, _Plain) and component.plan is not None:
        return component.plan
    plan = _plan_single(component, window_start, window_end)
    if plan is _NOT_SIMPLE:
        plan = _plan_series(component, window_start, window_end, default_tz)
    return plan


def _build(uid: str, plan: _Planned, component, fields: Callable[[Any], _Fields]) -> list[Instance]:
    if not plan.items and not plan.read_fields:
        return []
    shared = fields(component)
    if shared.status_stated == "cancelled":
        return []
    return [_instance(uid, rid, shared, start, end) for rid, start, end in plan.items]


def _plan_single(component, window_start: datetime, window_end: datetime) -> _Planned | object:
    """The one instance of an event that does not recur, computed from its own DTSTART and
    DTEND/DURATION as instants (an all-day one from its dates, see ``_day_length``);
    ``_NOT_SIMPLE`` for anything else (the library expands those).

    recurring_ical_events orders DTSTART and DTEND by wall time, so an event that starts in the
    first and ends in the repeated hour of a DST fall-back (01:30 PDT to 01:00 PST, written in
    UTC under an X-WR-TIMEZONE) came out as ending before it starts."""
    if any(name in component for name in ("RRULE", "RDATE", "EXDATE", "EXRULE", "RECURRENCE-ID")):
        return _NOT_SIMPLE
    start = component["DTSTART"].dt
    if type(start) is date:
        days = _day_length(component, start)
        if days is _NOT_SIMPLE:
            return _NOT_SIMPLE
        if not window_start <= all_day_instant(start) < window_end:
            return _Planned([], read_fields=False)
        return _Planned([("", start, start + days)], read_fields=False)
    if not isinstance(start, datetime) or start.tzinfo is None:
        return _NOT_SIMPLE
    dtend = component["DTEND"].dt if "DTEND" in component else None
    aware_end = isinstance(dtend, datetime) and dtend.tzinfo is not None
    if aware_end and dtend.astimezone(UTC) < start.astimezone(UTC):
        start, end = dtend, start  # swapped in the feed: read the other way round, as the library does
    else:
        length = _own_length(component, start)  # no DTEND or DURATION: no time (RFC 5545 3.6.1)
        if length is _NOT_SIMPLE:
            return _NOT_SIMPLE
        end = length.end(start)
    if not window_start <= start.astimezone(UTC) < window_end:
        return _Planned([], read_fields=False)
    return _Planned([("", start, end)], read_fields=False)


def _plan_series(
    component, window_start: datetime, window_end: datetime, default_tz: tzinfo
) -> _Planned | object:
    """The instances in the window of a timed series with one RRULE (EXDATEs allowed), no RDATE,
    EXRULE or overrides, and few enough starts for one piece of the window: the rule expanded
    by dateutil as recurring_ical_events does it (DTSTART always one instance, EXDATE matched by
    instant or by date), without its per-occurrence objects. ``_NOT_SIMPLE`` for anything else."""
    if any(name in component for name in ("RDATE", "EXRULE", "RECURRENCE-ID")):
        return _NOT_SIMPLE
    rules = _as_list(component.get("RRULE"))
    start = component["DTSTART"].dt
    if len(rules) != 1 or not isinstance(rules[0], vRecur):
        return _NOT_SIMPLE
    if _rate(rules[0]) * (window_end - window_start).total_seconds() > _CHUNK_TARGET:
        return _NOT_SIMPLE
    if type(start) is date:
        return _plan_day_series(component, rules[0], start, window_start, window_end, default_tz)
    if not isinstance(start, datetime) or start.tzinfo is None:
        return _NOT_SIMPLE
    length = _own_length(component, start)
    if length is _NOT_SIMPLE:
        return _NOT_SIMPLE
    exdates = []
    for value in _as_list(component.get("EXDATE")):
        if not isinstance(value, (vDDDLists, _Dates)):
            return _NOT_SIMPLE
        exdates.extend(item.dt for item in value.dts)
    if any(isinstance(ex, tuple) or (isinstance(ex, datetime) and ex.tzinfo is None) for ex in exdates):
        return _NOT_SIMPLE
    try:
        rule_text = _dateutil_text(rules[0])
        rule = rrulestr(rule_text, dtstart=start, cache=False)
        until = rules[0].get("UNTIL")
        until = until[0] if until else None
        if until is not None and not (isinstance(until, datetime) and until.tzinfo is not None):
            return _NOT_SIMPLE
        # A day either side: dateutil compares in wall time in the series' zone; the window is
        # then applied exactly, by instant.
        lo = (window_start - timedelta(days=1)).astimezone(start.tzinfo)
        hi = (window_end + timedelta(days=1)).astimezone(start.tzinfo)
        starts = list(rule.between(lo, hi, inc=True))
    except Exception:  # whatever dateutil refuses, the library path reports
        return _NOT_SIMPLE
    if until is None or start <= until:  # RFC 5545 3.8.5.3: DTSTART is the first instance
        starts.append(start)
    ex_instants = set()
    ex_days = set()
    for ex in exdates:
        ex_instants.update(to_recurrence_ids(ex))
        if not isinstance(ex, datetime):
            ex_days.add(ex)
        else:
            ex_instants.add(ex)
    items: list[tuple[str, datetime, datetime]] = []
    found: set[str] = set()
    seen = set()  # as the library's set of starts (two wall times may be one instant in a DST gap)
    for occurrence in starts:
        if occurrence in seen:
            continue
        seen.add(occurrence)
        utc = occurrence.astimezone(UTC)
        if until is not None and utc > until:
            continue
        if not window_start <= utc < window_end:
            continue
        if ex_days and date(occurrence.year, occurrence.month, occurrence.day) in ex_days:
            continue
        # to_recurrence_ids(occurrence): its UTC and its wall time, both without a zone
        if ex_instants and ex_instants & {utc.replace(tzinfo=None), occurrence.replace(tzinfo=None)}:
            continue
        rid = _utc_rid(utc)
        if rid not in found:
            found.add(rid)
            items.append((rid, occurrence, length.end(occurrence, utc)))
    return _Planned(items, read_fields=True)


_RULE_PROPERTIES = ("RRULE", "RDATE", "EXDATE", "EXRULE")


def _plan_group(
    components: list, window_start: datetime, window_end: datetime, default_tz: tzinfo
) -> list[tuple[Any, _Planned]] | object:
    """The direct expansion of a series with overrides: one master that ``_plan_series`` expands
    and overrides (RECURRENCE-ID without RANGE, no rules of their own) whose RECURRENCE-ID has
    the master's kind and zone; ``_NOT_SIMPLE`` for anything else.

    As recurring_ical_events does it: a master instance is replaced by the override its
    recurrence ids (UTC and wall time) find; every override not excluded by an EXDATE is an
    instance of its own at its own DTSTART, whether or not it matches an instance of the rule.
    Returns ``(component, plan)`` pairs, the master first."""
    masters = [c for c in components if "RECURRENCE-ID" not in c]
    if len(masters) != 1 or "RRULE" not in masters[0]:
        return _NOT_SIMPLE
    master = masters[0]
    known = getattr(master, "group_plan", None)  # planned when the reader read the series
    if known is not None and known[0] == frozenset(map(id, components)):
        return known[1]
    start = master["DTSTART"].dt
    all_day = type(start) is date
    plan = _fast_plan(master, window_start, window_end, default_tz)
    if plan is _NOT_SIMPLE:
        return _NOT_SIMPLE
    excluded = set()
    for value in _as_list(master.get("EXDATE")):
        for item in value.dts:
            excluded.update(to_recurrence_ids(item.dt))
    by_key: dict[object, Any] = {}
    planned: list[tuple[Any, _Planned]] = []
    for override in components:
        if override is master:
            continue
        if "DTSTART" not in override or any(name in override for name in _RULE_PROPERTIES):
            return _NOT_SIMPLE
        rid_property = override["RECURRENCE-ID"]
        rid, own_start = rid_property.dt, override["DTSTART"].dt
        if rid_property.params.get("RANGE"):
            return _NOT_SIMPLE
        if all_day:
            if type(rid) is not date or type(own_start) is not date:
                return _NOT_SIMPLE
            days = _day_length(override, own_start)
            if days is _NOT_SIMPLE:
                return _NOT_SIMPLE
            own_end = own_start + days
        else:
            if not isinstance(rid, datetime) or rid.tzinfo is not start.tzinfo:
                return _NOT_SIMPLE
            if not isinstance(own_start, datetime) or own_start.tzinfo is None:
                return _NOT_SIMPLE
            length = _own_length(override, own_start)
            if length is _NOT_SIMPLE:
                return _NOT_SIMPLE
            own_end = length.end(own_start)
        begins, ends = as_utc(own_start), as_utc(own_end)
        inside = window_start <= begins < window_end
        keys = to_recurrence_ids(rid)
        if any(key in by_key for key in keys):
            return _NOT_SIMPLE
        by_key.update(dict.fromkeys(keys, override))
        if excluded & set(keys):
            continue
        items = [(_format_rid(rid, all_day, default_tz), own_start, own_end)] if inside else []
        # its texts are read when the library yields it: when it overlaps the window (a
        # zero-length one when it starts inside), even if it starts before
        overlaps = inside or (begins < window_end and ends > window_start)
        planned.append((override, _Planned(items, read_fields=overlaps)))
    kept = []
    for item in plan.items:
        found = None
        for key in to_recurrence_ids(item[1]):
            found = by_key.get(key, found)
        if found is None:
            kept.append(item)
        elif found["RECURRENCE-ID"].dt != item[1] or _format_rid(item[1], all_day, default_tz) != item[0]:
            return _NOT_SIMPLE  # an override found by another instance's key: the library's reading
    return [(master, _Planned(kept, read_fields=plan.read_fields)), *planned]


def _dateutil_text(rule: vRecur) -> str:
    """A rule's text as the library gives it to dateutil (a negative COUNT dropped)."""
    return _NEGATIVE_COUNT.sub("", rule.to_ical().decode())


def _day_length(component, start: date) -> timedelta | object:
    """How many days an all-day component lasts, as the library reads it: DTEND - DTSTART, one
    day without DTEND or DURATION; ``_NOT_SIMPLE`` for a DURATION, or a DTEND that is not a
    later date."""
    if "DURATION" in component:
        return _NOT_SIMPLE
    dtend = component.get("DTEND")
    if dtend is None:
        return timedelta(days=1)
    end = dtend.dt
    if type(end) is not date or end <= start:
        return _NOT_SIMPLE
    return end - start


def _plan_day_series(
    component, rule: vRecur, start: date, window_start: datetime, window_end: datetime, default_tz: tzinfo
) -> _Planned | object:
    """``_plan_series`` for an all-day series (DATE DTSTART, DTEND, EXDATEs and UNTIL), as
    recurring_ical_events computes it: the rule over midnights without a zone, the window read
    as UTC wall time, each start turned back into its date."""
    days = _day_length(component, start)
    if days is _NOT_SIMPLE:
        return _NOT_SIMPLE
    ex_days = set()
    for value in _as_list(component.get("EXDATE")):
        if not isinstance(value, (vDDDLists, _Dates)):
            return _NOT_SIMPLE
        for item in value.dts:
            if type(item.dt) is not date:
                return _NOT_SIMPLE
            ex_days.add(item.dt)
    until = rule.get("UNTIL")
    until = until[0] if until else None
    if until is not None and type(until) is not date:
        return _NOT_SIMPLE
    first = datetime(start.year, start.month, start.day)
    try:
        rule_text = _dateutil_text(rule)
        expanded = rrulestr(rule_text, dtstart=first, cache=False)
        lo = (window_start - timedelta(days=1)).astimezone(UTC).replace(tzinfo=None)
        hi = (window_end + timedelta(days=1)).astimezone(UTC).replace(tzinfo=None)
        starts = [occurrence.date() for occurrence in expanded.between(lo, hi, inc=True)]
    except Exception:  # whatever dateutil refuses, the library path reports
        return _NOT_SIMPLE
    if until is None or start <= until:  # RFC 5545 3.8.5.3: DTSTART is the first instance
        starts.append(start)
    items: list[tuple[str, date, date]] = []
    seen: set[date] = set()
    for day in sorted(starts):
        if day in seen or day in ex_days or (until is not None and day > until):
            continue
        seen.add(day)
        if window_start <= all_day_instant(day) < window_end:
            items.append((_format_rid(day, True, default_tz), day, day + days))
    return _Planned(items, read_fields=True)


def _own_length(component: icalendar.Event, start: datetime):
    """The exact/nominal length of a timed component from its DTEND or DURATION (``_Length``), or
    ``_NOT_SIMPLE`` when it has a form only the library path reads."""
    dtend, duration = component.get("DTEND"), component.get("DURATION")
    if dtend is not None:
        end = dtend.dt
        if not isinstance(end, datetime) or end.tzinfo is None or end.astimezone(UTC) < start.astimezone(UTC):
            return _NOT_SIMPLE
        return _Length(exact=end.astimezone(UTC) - start.astimezone(UTC))
    if duration is not None:
        if not isinstance(duration.dt, timedelta) or duration.dt < timedelta(0):
            return _NOT_SIMPLE
        length = _parse_duration(duration.params.get(_RAW_PARAM))
        if length is None or timedelta(days=length.days) + length.exact != duration.dt:
            length = _from_timedelta(duration.dt)
        return length
    return _Length()


@dataclass(frozen=True, slots=True)
class _Length:
    """How long an instance lasts (RFC 5545 3.3.6): nominal days, then exact elapsed time."""

    days: int = 0
    exact: timedelta = timedelta(0)

    def end(self, start: datetime, utc: datetime | None = None) -> datetime:
        """The end of an instance that starts at ``start`` (a nonexistent wall time moves forward).
        ``utc``: ``start`` in UTC, when the caller has it."""
        tz = start.tzinfo
        base = start.astimezone(UTC) if utc is None else utc
        if self.days:  # the same wall-clock time, ``days`` later (fold=0 in a gap or overlap)
            wall = base.astimezone(tz).replace(tzinfo=None) + timedelta(days=self.days)
            base = wall.replace(tzinfo=tz).astimezone(UTC)
        return (base + self.exact).astimezone(tz)


def _parse_duration(raw: object) -> _Length | None:
    match = _DURATION.match(str(raw).strip()) if raw else None
    if match is None or not any(match.groups()[1:]):
        return None
    sign = -1 if match.group(1) == "-" else 1
    weeks, days, hours, minutes, seconds = (int(g or 0) for g in match.groups()[1:])
    return _Length(
        days=sign * (weeks * 7 + days),
        exact=sign * timedelta(hours=hours, minutes=minutes, seconds=seconds),
    )


def _from_timedelta(value: timedelta) -> _Length:
    """When the text is gone: whole days nominal, the rest exact (PT24H then reads as P1D)."""
    return _Length(days=value.days, exact=value - timedelta(days=value.days))


def _length_of(adapter: EventAdapter) -> _Length | None:
    """The length every instance of this component keeps; None: leave the library's end.

    DTEND - DTSTART is exact (3.8.5.3: "the same exact duration will apply to all the members of
    the generated recurrence set"); a DURATION is nominal in days and weeks and exact in hours,
    minutes and seconds (3.3.6). All-day starts keep the library's date arithmetic.
    """
    component = adapter._component
    start, end = adapter.start, adapter.end  # put in order by the library (swapped start and end)
    if not isinstance(start, datetime) or start.tzinfo is None:
        return None
    duration = component.get("DURATION")
    if "DTEND" not in component and duration is not None and isinstance(duration.dt, timedelta):
        if duration.dt >= timedelta(0):
            length = _parse_duration(duration.params.get(_RAW_PARAM))
            if length is None or timedelta(days=length.days) + length.exact != duration.dt:
                length = _from_timedelta(duration.dt)
            return length
    if isinstance(end, datetime) and end.tzinfo is not None:
        return _Length(exact=end.astimezone(UTC) - start.astimezone(UTC))
    return None


def _period_lengths(component: icalendar.Event) -> dict[object, _Length]:
    """The length of each RDATE PERIOD of a master, by the recurrence ids of its start."""
    stash = {}
    for entry in str(component.get(_PERIODS_STASH, "") or "").split(";"):
        index, _, text = entry.partition("=")
        if index.isdigit():
            stash[int(index)] = text
    result: dict[object, _Length] = {}
    index = -1
    for value in _as_list(component.get("RDATE")):
        for item in getattr(value, "dts", ()):
            index += 1
            dt = item.dt
            if not (isinstance(dt, tuple) and isinstance(dt[0], datetime) and dt[0].tzinfo is not None):
                continue
            start, other = dt
            if isinstance(other, timedelta):
                length = _parse_duration(stash.get(index))
                if length is None or timedelta(days=length.days) + length.exact != other:
                    length = _from_timedelta(other)
            elif isinstance(other, datetime) and other.tzinfo is not None:
                length = _Length(exact=other.astimezone(UTC) - start.astimezone(UTC))
            else:
                continue
            for rid in to_recurrence_ids(start):
                result[rid] = length
    return result


def _chunks(
    master: EventAdapter | None, start: datetime, end: datetime
) -> Iterator[tuple[datetime, datetime]]:
    """The window, cut into pieces for rules that produce very many starts (dateutil lists them)."""
    rules = _as_list(master._component.get("RRULE")) if master is not None else []
    rate = sum(_rate(rule) for rule in rules if isinstance(rule, vRecur))
    if rate * (end - start).total_seconds() <= _CHUNK_TARGET:
        yield start, end
        return
    step = max(_MIN_CHUNK, timedelta(seconds=_CHUNK_TARGET / rate))
    while start < end:
        yield start, min(start + step, end)
        start += step


# --- degenerate rules ------------------------------------------------------------------------


def _degenerate(event: icalendar.Event, window_start: datetime, window_end: datetime) -> str | None:
    """Why a master's RRULE must not be expanded (cheap checks before the library sees it), or None."""
    for rule in _as_list(event.get("RRULE")):
        if not isinstance(rule, vRecur):
            continue  # unreadable text: the library refuses it and the series is skipped
        reason = _rule_problem(rule)
        if reason is None:
            reason = _too_many_before(rule, event["DTSTART"].dt, window_start)
        if reason is not None:
            return f"RRULE {rule.to_ical().decode(errors='replace')[:120]} {reason}"
    return None


def _rule_problem(rule: vRecur) -> str | None:
    freq = [str(v).upper() for v in rule.get("FREQ", [])]
    if len(freq) != 1 or freq[0] not in _FREQ_SECONDS:
        return "has no valid FREQ"
    for name in ("INTERVAL", "COUNT"):
        values = rule.get(name, [])
        if not all(isinstance(v, int) for v in values) or len(values) > 1:
            return f"has an unreadable {name}"
    if any(v < 1 for v in rule.get("INTERVAL", [])):
        return "has INTERVAL below 1 (it would never advance)"
    if any(v > _MAX_COUNT for v in rule.get("COUNT", [])):
        return f"has an absurd COUNT (more than {_MAX_COUNT})"
    for name, (low, high, signed) in _RANGES.items():
        for value in rule.get(name, []):
            number = _rule_int(value)
            if number is None or not (low <= number <= high or (signed and -high <= number <= -low)):
                return f"has {name}={value}, out of range"
    for value in rule.get("BYDAY", []):
        match = _BYDAY.match(str(value).strip())
        if match is None:
            return f"has BYDAY={value}, not a weekday"
        ordinal = int(match.group(1)) if match.group(1) else None
        if ordinal is not None and not 1 <= abs(ordinal) <= (5 if freq[0] == "MONTHLY" else 53):
            return f"has BYDAY={value}, out of range"
    monthdays = [_rule_int(v) for v in rule.get("BYMONTHDAY", [])]
    if monthdays:
        months = [_rule_int(v) for v in rule.get("BYMONTH", [])] or list(range(1, 13))
        if not any(abs(day) <= _DAYS_IN_MONTH[month - 1] for day in monthdays for month in months):
            return "names only dates that do not exist (such as 30 February); it has no instances"
    return None


def _rule_int(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _rate(rule: vRecur) -> float:
    """An upper bound on the starts a rule produces per second."""
    try:
        freq = str(rule["FREQ"][0]).upper()
        interval = max(1, int(rule.get("INTERVAL", [1])[0]))
    except (KeyError, IndexError, TypeError, ValueError):
        return 0.0
    if freq not in _FREQ_SECONDS:
        return 0.0
    rank = _FREQ_RANK[freq]
    per_period = 1
    if freq == "YEARLY" and any(k in rule for k in ("BYYEARDAY", "BYMONTHDAY", "BYDAY", "BYWEEKNO")):
        per_period = 366
    elif freq == "YEARLY" and "BYMONTH" in rule:
        per_period = len(rule["BYMONTH"])
    elif freq == "MONTHLY" and any(k in rule for k in ("BYMONTHDAY", "BYDAY")):
        per_period = 31
    elif freq == "WEEKLY" and "BYDAY" in rule:
        per_period = min(7, len(rule["BYDAY"]))
    for name, finer in (("BYHOUR", "HOURLY"), ("BYMINUTE", "MINUTELY"), ("BYSECOND", "SECONDLY")):
        if name in rule and rank > _FREQ_RANK[finer]:
            per_period *= max(1, len(rule[name]))
    if "BYSETPOS" in rule:
        per_period = min(per_period, len(rule["BYSETPOS"]))
    return per_period / (_FREQ_SECONDS[freq] * interval)


def _too_many_before(rule: vRecur, dtstart: date | datetime, window_start: datetime) -> str | None:
    """A rule that produces millions of starts before the window is refused: the library walks them all."""
    if isinstance(dtstart, datetime) and dtstart.tzinfo is None:
        dtstart = dtstart.replace(tzinfo=UTC)
    first = as_utc(dtstart)
    stop = window_start
    until = rule.get("UNTIL", [None])[0]
    if isinstance(until, datetime) and until.tzinfo is not None:
        stop = min(stop, until)
    elif isinstance(until, date) and not isinstance(until, datetime):
        stop = min(stop, as_utc(until))
    steps = _rate(rule) * max(0.0, (stop - first).total_seconds())
    count = rule.get("COUNT", [None])[0]
    if isinstance(count, int) and count > 0:
        steps = min(steps, count)
    if steps > _MAX_STEPS_BEFORE_WINDOW:
        return (
            f"would produce about {int(steps)} occurrences before the window starts "
            f"(more than {_MAX_STEPS_BEFORE_WINDOW}); its DTSTART is too far back for its frequency"
        )
    return None


def _instance(
    uid: str,
    recurrence_id: str,
    shared: _Fields,
    start: date | datetime,
    end: date | datetime,
) -> Instance:
    all_day = not isinstance(start, datetime)
    if all_day and isinstance(end, datetime):  # DATE start with a DATE-TIME end (seen in the wild)
        end = end.date() if end.time() == time(0) else end.date() + timedelta(days=1)
    if not all_day:
        if not isinstance(end, datetime):
            end = datetime.combine(end, time(0), start.tzinfo)
        # RFC 5545 3.3.5: a nonexistent local time moves forward by the gap; an ambiguous one
        # is the first occurrence. zoneinfo reads fold=0 that way; normalise the wall time.
        start = start.astimezone(UTC).astimezone(start.tzinfo)
        end = end.astimezone(UTC).astimezone(start.tzinfo)
    return Instance(
        uid=uid,
        recurrence_id=recurrence_id,
        summary=shared.summary,
        description=shared.description,
        location=shared.location,
        status=shared.status,
        all_day=all_day,
        start=start,
        end=end,
        content_hash=_content_hash(
            shared.summary,
            shared.description,
            shared.location,
            shared.status,
            shared.status_stated,
            all_day,
            start,
            end,
            base=shared.digest,
        ),
        status_stated=shared.status_stated,
    )


def _content_hash(
    summary: str,
    description: str,
    location: str,
    status: str,
    status_stated: str | None,
    all_day: bool,
    start: date | datetime,
    end: date | datetime,
    *,
    base: Any = None,
) -> str:
    """What a stored row is compared by: the SHA-256 of the JSON list ``[summary, description,
    location, status, all_day, start, end, zone]``, plus ``status_stated`` only when it says more
    than ``status`` (absent, ``confirmed`` and ``tentative`` hash as before it existed).

    ``base``: ``_hash_base`` of the same four texts, so that the instances of a series hash their
    shared texts once (the digest is the same)."""
    if base is None:
        base = _hash_base(summary, description, location, status)
    zone = "" if all_day else zone_name(start.tzinfo)
    # What json.dumps([all_day, start, end, zone, ...])[1:] writes: ISO times need no escaping.
    tail = f'{"true" if all_day else "false"},"{start.isoformat()}","{end.isoformat()}",{_json_text(zone)}'
    if status_stated is not None and status_stated != status:
        tail += "," + _json_text(status_stated)
    digest = base.copy()
    digest.update((tail + "]").encode("utf-8"))
    return digest.hexdigest()


@functools.lru_cache(maxsize=4096)
def _json_text(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _hash_base(summary: str, description: str, location: str, status: str):
    """The content hash's SHA-256 state after ``[summary,description,location,status,``."""
    head = json.dumps([summary, description, location, status], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(head[:-1].encode("utf-8") + b",")


def _apply_text_budget(instances: list[Instance], budget: int, problems: list[str]) -> list[Instance]:
    """Cut the texts of the feed's instances so that together they hold at most ``budget`` characters.

    Every text longer than ``L`` is cut to ``L`` characters (``CUT_MARK`` included), ``L`` the
    largest that fits: short texts are kept whole, the longest ones are cut the most.
    """
    total = feed_text_chars(instances)
    if total <= budget:
        return instances
    lengths = sorted(len(t) for i in instances for t in (i.summary, i.description, i.location))
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)

    def cost(level: int) -> int:
        j = bisect.bisect_right(lengths, level)
        return prefix[j] + level * (len(lengths) - j)

    low, high = 0, lengths[-1]
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    level = low
    cut_texts: dict[int, str] = {}

    def cut(text: str) -> str:
        if len(text) <= level:
            return text
        if id(text) not in cut_texts:
            cut_texts[id(text)] = _cut(text, level)
        return cut_texts[id(text)]

    fields_cut = 0
    result = []
    for instance in instances:
        texts = (instance.summary, instance.description, instance.location)
        if max(len(t) for t in texts) <= level:
            result.append(instance)
            continue
        summary, description, location = (cut(t) for t in texts)
        fields_cut += sum(len(t) > level for t in texts)
        result.append(
            dataclasses.replace(
                instance,
                summary=summary,
                description=description,
                location=location,
                content_hash=_content_hash(
                    summary,
                    description,
                    location,
                    instance.status,
                    instance.status_stated,
                    instance.all_day,
                    instance.start,
                    instance.end,
                ),
            )
        )
    problems.append(
        f"the feed's texts over its {len(instances)} instances have {total} characters, more than "
        f"{budget}; cut {fields_cut} text(s) longer than {level} characters (ending in {CUT_MARK!r})"
    )
    return result


# --- small helpers -------------------------------------------------------------------------


def _format_rid(value: date | datetime, all_day: bool, default_tz: tzinfo) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=default_tz)
        if all_day:
            day = value.astimezone(default_tz).date() if value.utcoffset() == timedelta(0) else value.date()
            return f"{day.year:04d}{day.month:02d}{day.day:02d}"
        return _utc_rid(value.astimezone(UTC))
    return f"{value.year:04d}{value.month:02d}{value.day:02d}"


def _utc_rid(v: datetime) -> str:
    """The recurrence id of a timed instance from its start in UTC."""
    return f"{v.year:04d}{v.month:02d}{v.day:02d}T{v.hour:02d}{v.minute:02d}{v.second:02d}Z"


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _text(value) -> str:
    if isinstance(value, list):
        value = value[0] if value else None
    return "" if value is None else str(value)


def _int(value) -> int:
    try:
        return int(_as_list(value)[0]) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _has_datetime(value) -> bool:
    if isinstance(value, vBroken):
        return False
    if isinstance(value, vDDDLists):
        return any(_has_datetime(v) for v in value.dts)
    dt = getattr(value, "dt", None)
    if isinstance(dt, tuple):
        return any(isinstance(x, datetime) for x in dt)
    return isinstance(dt, datetime)


def _has_floating(value) -> bool:
    if isinstance(value, vBroken):
        return False
    if isinstance(value, vDDDLists):
        return any(_has_floating(v) for v in value.dts)
    dt = getattr(value, "dt", None)
    parts = dt if isinstance(dt, tuple) else (dt,)
    return any(isinstance(x, datetime) and x.tzinfo is None for x in parts)


def _map_value(value, convert):
    """A copy of a DTSTART-like or RDATE/EXDATE-like value with ``convert`` applied to its datetimes."""

    def one(dt):
        if isinstance(dt, tuple):
            return tuple(one(x) for x in dt)
        return convert(dt) if isinstance(dt, datetime) else dt

    params = {k: v for k, v in value.params.items() if k != "TZID"}
    if isinstance(value, vDDDLists):
        new = vDDDLists([one(v.dt) for v in value.dts])
        new.params.update(params)
        return new
    new = vDDDTypes(one(value.dt))
    new.params.update(params)
    return new


def _short_uid(event: icalendar.Event) -> str:
    return str(event.get("UID", "?"))[:80]


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:160]}"

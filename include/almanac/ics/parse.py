"""ics_sync: read an ICS feed and expand its events into instances inside a window (RFC 5545).

Reading is lenient (BOM, bare CR, invalid UTF-8, junk lines, several VCALENDARs, a bare VEVENT);
expansion uses ``recurring_ical_events`` one series at a time, so one bad series is skipped and
noted in ``ParseResult.problems`` instead of losing the feed. Only a body that is not iCalendar
at all raises ``FeedParseError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo

import icalendar
import x_wr_timezone
from icalendar.prop import vDDDLists, vDDDTypes, vRecur
from icalendar.prop.broken import vBroken
from recurring_ical_events import EventAdapter, Series
from recurring_ical_events.util import to_recurrence_ids

from almanac.errors import PermanentError
from almanac.ics.timezones import ZoneResolver, zone_name
from almanac.timeconv import UTC, as_utc

__all__ = ["FeedParseError", "Instance", "ParseResult", "parse_feed"]

log = logging.getLogger(__name__)

_DATE_PROPS = ("DTSTART", "DTEND", "RDATE", "EXDATE", "RECURRENCE-ID")
_LIST_PROPS = ("RDATE", "EXDATE")
_ICAL_START = re.compile(r"^BEGIN:(VCALENDAR|VEVENT)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_CONTENT_LINE = re.compile(r"^[A-Za-z0-9-]+[;:]")
_RANGE_STASH = "X-ALMANAC-RANGE"
_VALUE_IN_TZID = re.compile(r"^(.+):(\d{8}(?:T\d{6}Z?)?)$")
# Frequencies whose rule lists can get huge inside a long window; they are expanded a day at a time.
_CHUNKED_FREQS = {"SECONDLY": timedelta(hours=1), "MINUTELY": timedelta(days=1), "HOURLY": timedelta(days=30)}


class FeedParseError(PermanentError):
    """The body is not an iCalendar feed at all (empty, HTML, binary, no VCALENDAR).

    What to do: open the calendar's feed URL by hand (``almanac ics inspect``); the source
    probably serves an error page or a login form. Retrying the same body fails the same way.
    """


@dataclass(frozen=True, slots=True)
class Instance:
    """One occurrence of an event, identified by ``(uid, recurrence_id)``."""

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
    instances: list[Instance] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_feed(
    body: bytes,
    *,
    window_start: datetime,
    window_end: datetime,
    calendar_tz: str = "UTC",
    max_instances: int = 200_000,
) -> ParseResult:
    """Expand a feed's events into the instances that START in ``[window_start, window_end)``.

    Parameters:
        body: the feed as fetched (any line endings, BOM, invalid UTF-8 tolerated).
        window_start, window_end: aware datetimes; compared in UTC (all-day: their 00:00 UTC).
        calendar_tz: IANA zone for floating times and unknown TZIDs.
        max_instances: cap on the number of instances returned (a problem is noted when hit).

    Returns:
        ``ParseResult`` with instances sorted by ``(starts_at, uid, recurrence_id)`` and the
        per-series problems that were skipped.

    Raises:
        FeedParseError: the body is not iCalendar at all.
    """
    if window_start.tzinfo is None or window_end.tzinfo is None:
        raise ValueError("window_start and window_end must be timezone-aware")
    problems: list[str] = []
    default_tz = ZoneResolver().resolve(calendar_tz) if calendar_tz else None
    if default_tz is None:
        problems.append(f"calendar time zone {calendar_tz!r} is unknown; using UTC")
        default_tz = UTC
    text = _decode(body)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # icalendar warns on guessed TZIDs; we note our own problems
        tops = _read_components(text, problems)
        events = _prepare_events(tops, default_tz, problems)
        instances = _expand(
            events,
            window_start.astimezone(UTC),
            window_end.astimezone(UTC),
            default_tz,
            max_instances,
            problems,
        )
    return ParseResult(instances=instances, problems=problems)


# --- reading -------------------------------------------------------------------------------


def _decode(body: bytes) -> str:
    if not body or not body.strip():
        raise FeedParseError("the feed is empty")
    if body.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = body.decode("utf-16", errors="replace")
    else:
        text = body.decode("utf-8-sig", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # CRLF, LF and old-Mac bare CR alike
    if not _ICAL_START.search(text):
        start = "".join(c if c.isprintable() else "?" for c in text.lstrip()[:40])
        raise FeedParseError(f"the feed is not iCalendar: no BEGIN:VCALENDAR line (it starts with {start!r})")
    # A trailing newline also keeps icalendar from probing a one-line body as a file path.
    return text if text.endswith("\n") else text + "\n"


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
    tops: list[icalendar.Component], default_tz: tzinfo, problems: list[str]
) -> list[icalendar.Event]:
    """Every VEVENT with a UID, our own zones on TZID values, X-WR-TIMEZONE applied, no floating times."""
    calendars: list[icalendar.Component] = []
    loose = icalendar.Calendar()
    for component in tops:
        if component.name == "VCALENDAR":
            calendars.append(component)
        else:
            loose.add_component(component)
    if loose.subcomponents:
        calendars.append(loose)
    vtimezones = {
        str(tz["TZID"]): tz for calendar in calendars for tz in calendar.walk("VTIMEZONE") if "TZID" in tz
    }
    resolver = ZoneResolver(vtimezones)
    unknown: set[str] = set()
    events: list[icalendar.Event] = []
    for calendar in calendars:
        for event in calendar.walk("VEVENT"):
            _set_uid(event)
            _repair_broken(event, problems)
            _apply_tzids(event, resolver, default_tz, unknown)
            if "RECURRENCE-ID" in event and "RANGE" in event["RECURRENCE-ID"].params:
                event[_RANGE_STASH] = event["RECURRENCE-ID"].params["RANGE"]
        x_wr = _x_wr_timezone(calendar, resolver, problems)
        if x_wr is not None:
            calendar = x_wr_timezone.to_standard(calendar, timezone=x_wr)
        for event in calendar.walk("VEVENT"):
            if _finish_event(event, default_tz, problems):
                events.append(event)
    for tzid in sorted(unknown):
        problems.append(f"unknown time zone {tzid[:80]!r}; its times are read in {zone_name(default_tz)}")
    problems.extend(resolver.problems)
    return events


def _set_uid(event: icalendar.Event) -> None:
    uid = str(event.get("UID", "") or "").strip()
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


# --- expanding -----------------------------------------------------------------------------


def _expand(
    events: list[icalendar.Event],
    window_start: datetime,
    window_end: datetime,
    default_tz: tzinfo,
    max_instances: int,
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
    found: dict[tuple[str, str], Instance] = {}
    capped = False
    for uid, by_rid in series.items():
        try:
            for instance in _expand_series(
                uid, [e for _, e in by_rid.values()], window_start, window_end, default_tz
            ):
                key = (instance.uid, instance.recurrence_id)
                if key in found:
                    if found[key] != instance:
                        problems.append(
                            f"event {uid[:80]}: two instances with recurrence id {key[1]!r}; kept one"
                        )
                    continue
                found[key] = instance
                if len(found) > max_instances:
                    capped = True
                    break
        except Exception as e:  # one bad series must not lose the rest of the feed
            problems.append(f"event {uid[:80]}: skipped ({_short(e)})")
        if capped:
            break
    instances = sorted(found.values(), key=lambda i: (i.starts_at, i.uid, i.recurrence_id))
    if capped:
        problems.append(f"more than {max_instances} instances in the window; kept {max_instances}")
        instances = instances[:max_instances]
    return instances


def _expand_series(
    uid: str,
    components: list[icalendar.Event],
    window_start: datetime,
    window_end: datetime,
    default_tz: tzinfo,
) -> Iterator[Instance]:
    adapters = [EventAdapter(c) for c in components]
    master = next((a for a in adapters if not a.is_modification()), None)
    recurring = master is not None and ("RRULE" in master._component or "RDATE" in master._component)
    all_day_series = master is not None and not isinstance(master._component["DTSTART"].dt, datetime)
    series = Series(adapters)
    for chunk_start, chunk_end in _chunks(master, window_start, window_end):
        for occurrence in series.between(chunk_start, chunk_end):
            adapter = occurrence._adapter  # the source component, without a copy per instance
            component = adapter._component
            status = str(component.get("STATUS", "") or "").strip().upper()
            if status == "CANCELLED":
                continue
            start, end = occurrence.start, occurrence.end
            if not chunk_start <= as_utc(start) < chunk_end:
                continue
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
            yield _instance(uid, recurrence_id, component, status, start, end)


def _chunks(
    master: EventAdapter | None, start: datetime, end: datetime
) -> Iterator[tuple[datetime, datetime]]:
    """The window, cut into pieces for rules that produce very many starts (dateutil lists them)."""
    step = None
    if master is not None:
        for rule in _as_list(master._component.get("RRULE")):
            if isinstance(rule, vRecur) and rule.get("FREQ"):
                step = _CHUNKED_FREQS.get(str(rule["FREQ"][0]).upper(), step)
    if step is None:
        yield start, end
        return
    while start < end:
        yield start, min(start + step, end)
        start += step


def _instance(
    uid: str,
    recurrence_id: str,
    component: icalendar.Event,
    status: str,
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
    summary = _text(component.get("SUMMARY"))
    description = _text(component.get("DESCRIPTION"))
    location = _text(component.get("LOCATION"))
    status = "tentative" if status == "TENTATIVE" else "confirmed"
    zone = "" if all_day else zone_name(start.tzinfo)
    payload = json.dumps(
        [summary, description, location, status, all_day, start.isoformat(), end.isoformat(), zone],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return Instance(
        uid=uid,
        recurrence_id=recurrence_id,
        summary=summary,
        description=description,
        location=location,
        status=status,
        all_day=all_day,
        start=start,
        end=end,
        content_hash=hashlib.sha256(payload.encode("utf-8")).hexdigest(),
    )


# --- small helpers -------------------------------------------------------------------------


def _format_rid(value: date | datetime, all_day: bool, default_tz: tzinfo) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=default_tz)
        if all_day:
            day = value.astimezone(default_tz).date() if value.utcoffset() == timedelta(0) else value.date()
            return f"{day.year:04d}{day.month:02d}{day.day:02d}"
        v = value.astimezone(UTC)
        return f"{v.year:04d}{v.month:02d}{v.day:02d}T{v.hour:02d}{v.minute:02d}{v.second:02d}Z"
    return f"{value.year:04d}{value.month:02d}{value.day:02d}"


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

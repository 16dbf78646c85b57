"""ics_sync: split a decoded feed into its VEVENT blocks, lexing the plain ones, without icalendar.

``almanac.ics.parse`` reads most events of a real feed (one-off timed events and timed series
with one RRULE) from this lexing, and hands every other block to icalendar as before. This module
only splits and lexes; what counts as plain *semantically* (dates, zones, rules) is decided in
``parse``. Anything unusual in the structure of the feed (several calendars, a component outside
the calendar, a line that is not a content line, a VEVENT inside another component, a VTODO...)
makes ``split`` return None: the whole feed is then read by icalendar, exactly as before.

The text given is what ``parse._decode`` returns: unfolded, LF line ends, unread lines dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Block", "Split", "split", "unescape"]

_CONTENT_LINE = re.compile(r"[A-Za-z0-9-]+[;:]")
# parse._decode writes a DURATION's text into this parameter (icalendar reads PT24H and P1D alike).
_RAW_DURATION = re.compile(r'(DURATION(?:;[^";:\\]*)*);X-ALMANAC-RAW="[^"]*"', re.IGNORECASE)
_UNESCAPE = re.compile(r"\\([\\,;:nN])")


@dataclass(slots=True)
class Block:
    """One top-level VEVENT of the calendar."""

    #: Its place among the feed's VEVENTs (0, 1, ...).
    pos: int
    #: Its lines, BEGIN:VEVENT to END:VEVENT, nested components (VALARM) included.
    lines: list[str]
    #: Its own properties, name (upper case) -> [(parameters, raw value)], parameter names in
    #: upper case; None when a line of its own has a form only icalendar reads (quoted or escaped
    #: parameters, a parameter without ``=``).
    props: dict[str, list[tuple[dict[str, str], str]]] | None
    #: Every UID it may have, as icalendar would read it (unescaped, stripped), over-approximated
    #: for a block that is not plain.
    uids: list[str] = field(default_factory=list)
    #: Whether its DURATION line carried the raw text ``parse._decode`` keeps.
    raw_duration: bool = False


@dataclass(slots=True)
class Split:
    header: list[str]
    zones: list[list[str]]
    events: list[Block]


class _NotSimple(Exception):
    pass


def split(text: str) -> Split | None:
    """The calendar's own lines, its VTIMEZONE blocks and its VEVENT blocks; None: not simple."""
    try:
        return _split(text)
    except _NotSimple:
        return None


def unescape(value: str) -> str:
    r"""A TEXT value as icalendar reads it: ``\\ \, \; \:`` unescaped, ``\n``/``\N`` a newline."""
    return (
        _UNESCAPE.sub(lambda m: "\n" if m.group(1) in "nN" else m.group(1), value) if "\\" in value else value
    )


def _split(text: str) -> Split:
    header: list[str] = []
    zones: list[list[str]] = []
    events: list[Block] = []
    state = 0  # 0 before the calendar, 1 inside it, 2 after it
    lines = text.split("\n")
    index = 0
    while (step := _next_line(lines, index)) is not None:
        line, index = step
        upper = line.upper()
        if state == 0:
            if upper != "BEGIN:VCALENDAR":
                raise _NotSimple
            state = 1
            continue
        if state == 2:
            raise _NotSimple  # a second calendar, or a component after it
        if upper == "END:VCALENDAR":
            state = 2
            continue
        if upper == "BEGIN:VEVENT":
            index = _event(lines, index, len(events), events)
            continue
        if upper == "BEGIN:VTIMEZONE":
            start = index - 1
            index = _skip_component(lines, index, "VTIMEZONE")
            zones.append(lines[start:index])
            continue
        if upper.startswith(("BEGIN:", "END:")):
            raise _NotSimple  # VTODO, VJOURNAL, stray END...: icalendar reads the feed
        header.append(line)
    if state != 2:
        raise _NotSimple
    return Split(header=header, zones=zones, events=events)


def _next_line(lines: list[str], index: int) -> tuple[str, int] | None:
    """The next non-empty line from ``index`` and the index after it; None at the end of the text.
    A line that is not a content line makes the feed not simple."""
    count = len(lines)
    while index < count:
        line = lines[index]
        index += 1
        if line:
            if not _CONTENT_LINE.match(line):
                raise _NotSimple
            return line, index
    return None


def _skip_component(lines: list[str], index: int, name: str) -> int:
    """The index after the END of the component opened just before ``index`` (nested ones skipped)."""
    depth = 1
    while (step := _next_line(lines, index)) is not None:
        line, index = step
        upper = line.upper()
        if upper.startswith("BEGIN:"):
            if upper in ("BEGIN:VEVENT", "BEGIN:VCALENDAR"):
                raise _NotSimple
            depth += 1
        elif upper.startswith("END:"):
            depth -= 1
            if depth == 0:
                if upper != "END:" + name:
                    raise _NotSimple
                return index
    raise _NotSimple


def _event(lines: list[str], index: int, pos: int, events: list[Block]) -> int:
    start = index - 1
    props: dict[str, list[tuple[dict[str, str], str]]] | None = {}
    uids: list[str] = []
    raw_duration = False
    while True:
        if (step := _next_line(lines, index)) is None:
            raise _NotSimple  # no END:VEVENT
        line, index = step
        upper = line[:16].upper()
        if upper.startswith("BEGIN:"):
            if line.upper() in ("BEGIN:VEVENT", "BEGIN:VCALENDAR"):
                raise _NotSimple
            index = _skip_component(lines, index, line[6:].upper())
            continue
        if upper.startswith("END:"):
            if line.upper() != "END:VEVENT":
                raise _NotSimple
            break
        colon = line.find(":")
        if colon < 0:  # "NAME;PARAM" with no value: icalendar's leniency decides
            raise _NotSimple
        head, value = line[:colon], line[colon + 1 :]
        if '"' in head or "\\" in head:
            match = _RAW_DURATION.fullmatch(head)
            if match is None:
                if head[:3].upper() == "UID":
                    uids.extend(_uid_candidates(line))
                props = None
                continue
            head = match.group(1)
            raw_duration = True
        parts = head.split(";")
        name = parts[0].upper()
        if name == "UID":
            uids.append(_uid(value))
        if props is None:
            continue
        params: dict[str, str] = {}
        for part in parts[1:]:
            key, eq, param_value = part.partition("=")
            if not eq:
                props = None
                break
            params[key.upper()] = param_value
        else:
            props.setdefault(name, []).append((params, value))
    events.append(Block(pos=pos, lines=lines[start:index], props=props, uids=uids, raw_duration=raw_duration))
    return index


def _uid(value: str) -> str:
    return unescape(value).strip()


def _uid_candidates(line: str) -> list[str]:
    """What a UID line with quoted or escaped parameters may read as: the text after any colon."""
    return [_uid(line[index + 1 :]) for index, char in enumerate(line) if char == ":"]

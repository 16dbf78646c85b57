"""almanac.ics.parse: the direct paths (one-off timed events, simple recurring series) give exactly
what the expansion library gives — over the real corpus and over generated series across DST
changes, EXDATE forms, UNTIL/COUNT and zones east and west of UTC."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import almanac.ics.parse as parse_module
from almanac.ics.parse import parse_feed

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"
CORPUS_FILES = sorted(
    CORPUS / name
    for name in re.findall(r"^\| \d+ \| `([^`]+\.ics)`", (CORPUS / "MANIFEST.md").read_text(), re.M)
)
WINDOWS = [
    (datetime(1990, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC)),
    (datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 11, 15, tzinfo=UTC)),  # cuts through series
]


def both_ways(body: bytes, monkeypatch, **kw):
    """(direct paths, library): the direct paths once with the plain events read without
    icalendar and once with icalendar reading the whole feed, which must agree exactly."""
    results = []
    for fast_read, fast in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(parse_module, "_FAST_READ", fast_read)
        monkeypatch.setattr(parse_module, "_FAST_PATHS", fast)
        try:
            results.append(parse_feed(body, **kw))
        except Exception as exc:  # every way must fail alike too
            results.append(type(exc))
    read_plain, read_by_icalendar, library = results
    if isinstance(read_plain, type) or isinstance(read_by_icalendar, type):
        assert read_plain == read_by_icalendar
    else:
        assert read_plain.instances == read_by_icalendar.instances
        assert read_plain.problems == read_by_icalendar.problems
    return read_plain, library


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("window", "tz"),
    list(zip(WINDOWS, ["UTC", "America/New_York"], strict=True)),
    ids=["wide-utc", "narrow-new-york"],
)
def test_the_direct_paths_agree_with_the_library_on_the_corpus(path, window, tz, monkeypatch):
    fast, library = both_ways(
        path.read_bytes(), monkeypatch, window_start=window[0], window_end=window[1], calendar_tz=tz
    )
    if isinstance(fast, type):
        assert fast is library
        return
    assert fast.instances == library.instances
    assert fast.problems == library.problems


ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]
STARTS = ["20240310T023000", "20241103T013000", "20240331T020000", "20241027T023000", "20240115T090000"]
RULES = [
    "FREQ=WEEKLY;BYDAY=SU",
    "FREQ=DAILY;INTERVAL=3;COUNT=40",
    "FREQ=MONTHLY;BYDAY=1SU",
    "FREQ=YEARLY;BYMONTH=3,10;BYDAY=-1SU",
    "FREQ=WEEKLY;BYDAY=MO,TH;UNTIL=20240901T000000Z",
    "FREQ=DAILY;UNTIL=20240420",
    "FREQ=HOURLY;INTERVAL=7;COUNT=60",
    "FREQ=MONTHLY;BYMONTHDAY=31",
    "FREQ=WEEKLY;COUNT=-3",
]
ENDS = ["DTEND;TZID={tz}:{day}T{later}", "DURATION:PT90M", "DURATION:P1D", "DTEND:{day}T235959Z", ""]


def generated_feed(zone: str, start: str, rule: str, end: str, exdates: list[str]) -> bytes:
    day, clock = start.split("T")
    later = f"{(int(clock[:2]) + 2) % 24:02d}{clock[2:]}"
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//almanac tests//EN",
        "BEGIN:VEVENT",
        "UID:series",
        f"DTSTART;TZID={zone}:{start}",
        f"RRULE:{rule}",
        "SUMMARY:S",
    ]
    if end:
        lines.append(end.format(tz=zone, day=day, later=later))
    lines += exdates + ["END:VEVENT", "END:VCALENDAR"]
    return ("\r\n".join(lines) + "\r\n").encode()


def exdate_forms(zone: str, start: str) -> list[list[str]]:
    day = start.split("T")[0]
    next_week = f"{day[:6]}{min(28, int(day[6:]) + 7):02d}"
    return [
        [],
        [f"EXDATE;TZID={zone}:{start}"],  # the first instance, by its wall time
        [f"EXDATE;TZID={zone}:{next_week}T{start.split('T')[1]}"],
        [f"EXDATE;VALUE=DATE:{next_week}"],  # a whole day
        ["EXDATE:20240707T000000Z,20240714T000000Z"],  # in UTC, likely matching nothing
    ]


def _cases() -> list[tuple]:
    """Every zone x start x rule, each with two (end, EXDATE) forms in rotation: ~450 series."""
    cases = []
    for n, (zone, start, rule) in enumerate(itertools.product(ZONES, STARTS, RULES)):
        forms = exdate_forms(zone, start)
        for turn in (0, 2):
            cases.append((zone, start, rule, ENDS[(n + turn) % len(ENDS)], forms[(n + turn) % len(forms)]))
    return cases


CASES = _cases()


def test_most_generated_series_take_the_direct_path(monkeypatch):
    """Else the comparison below would compare the library with itself."""
    direct = parse_module._plan_series
    taken = []

    def counting(*args, **kwargs):
        result = direct(*args, **kwargs)
        taken.append(result is not parse_module._NOT_SIMPLE)
        return result

    monkeypatch.setattr(parse_module, "_plan_series", counting)
    direct_cases = 0
    for case in CASES:
        taken.clear()  # a series the reader planned without success is planned again by _expand
        parse_feed(
            generated_feed(*case),
            window_start=datetime(2024, 2, 1, tzinfo=UTC),
            window_end=datetime(2025, 2, 1, tzinfo=UTC),
        )
        assert taken
        direct_cases += any(taken)
    assert direct_cases > 0.8 * len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "|".join([c[0], c[1], c[2], c[3][:8], str(len(c[4]))]))
def test_the_simple_series_path_agrees_with_the_library(case, monkeypatch):
    zone, start, rule, end, ex = case
    fast, library = both_ways(
        generated_feed(zone, start, rule, end, ex),
        monkeypatch,
        window_start=datetime(2024, 2, 1, tzinfo=UTC),
        window_end=datetime(2025, 2, 1, tzinfo=UTC),
        calendar_tz="Europe/Berlin",
    )
    if isinstance(fast, type):
        assert fast is library
        return
    assert [(i.recurrence_id, i.start, i.end) for i in fast.instances] == [
        (i.recurrence_id, i.start, i.end) for i in library.instances
    ]
    assert fast.instances == library.instances and fast.problems == library.problems


DAY_STARTS = ["20240131", "20240229", "20240331", "20241027", "20231201"]
DAY_RULES = [
    "FREQ=DAILY;COUNT=10",
    "FREQ=WEEKLY;BYDAY=MO,WE,FR;UNTIL=20240930",
    "FREQ=WEEKLY;INTERVAL=2",
    "FREQ=MONTHLY;BYMONTHDAY=31",
    "FREQ=MONTHLY;BYDAY=-1FR;COUNT=12",
    "FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29",
    "FREQ=MONTHLY;BYSETPOS=-1;BYDAY=MO,TU,WE,TH,FR",
    "FREQ=DAILY;UNTIL=20240101",  # before some starts: DTSTART alone, or nothing
]
DAY_ENDS = ["", "DTEND;VALUE=DATE:{next}", "DTEND;VALUE=DATE:{week}", "DTEND:{next}"]


def day_series_feed(start: str, rule: str, end: str, exdates: list[str]) -> bytes:
    day = datetime.strptime(start, "%Y%m%d").date()
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//almanac tests//EN", "X-WR-TIMEZONE:Asia/Tokyo"]
    lines += ["BEGIN:VEVENT", "UID:day-series", f"DTSTART;VALUE=DATE:{start}", f"RRULE:{rule}"]
    if end:
        later = {"next": day + timedelta(days=1), "week": day + timedelta(days=7)}
        lines.append(end.format(**{name: value.strftime("%Y%m%d") for name, value in later.items()}))
    lines += exdates + ["SUMMARY:D", "END:VEVENT", "END:VCALENDAR"]
    return ("\r\n".join(lines) + "\r\n").encode()


DAY_CASES = [
    (start, rule, DAY_ENDS[n % len(DAY_ENDS)], forms)
    for n, (start, rule) in enumerate(itertools.product(DAY_STARTS, DAY_RULES))
    for forms in (
        [],
        [f"EXDATE;VALUE=DATE:{start}"],
        ["EXDATE;VALUE=DATE:20240304,20240401"],
        ["EXDATE:20240304T000000Z"],  # a DATE-TIME on an all-day series: the library's reading
    )
]


@pytest.mark.parametrize("case", DAY_CASES, ids=lambda c: "|".join([c[0], c[1], c[2][:9], str(c[3])[:30]]))
def test_the_all_day_series_path_agrees_with_the_library(case, monkeypatch):
    fast, library = both_ways(
        day_series_feed(*case),
        monkeypatch,
        window_start=datetime(2024, 3, 1, 15, tzinfo=UTC),  # not at a midnight: the window is exact
        window_end=datetime(2025, 1, 1, tzinfo=UTC),
        calendar_tz="America/Los_Angeles",
    )
    assert_same_instances(fast, library)


def assert_same_instances(fast, library) -> None:
    if isinstance(fast, type):
        assert fast is library
        return
    assert [(i.recurrence_id, i.start, i.end, i.summary) for i in fast.instances] == [
        (i.recurrence_id, i.start, i.end, i.summary) for i in library.instances
    ]
    assert fast.instances == library.instances and fast.problems == library.problems


def share_planned_directly(monkeypatch, planner: str, feeds, **window) -> float:
    """The share of calls to ``parse.<planner>`` that did not hand the series to the library."""
    direct = getattr(parse_module, planner)
    taken = []

    def counting(*args, **kwargs):
        result = direct(*args, **kwargs)
        taken.append(result is not parse_module._NOT_SIMPLE)
        return result

    monkeypatch.setattr(parse_module, planner, counting)
    for body in feeds:
        parse_feed(body, **window)
    return sum(taken) / len(taken)


def test_most_all_day_series_take_the_direct_path(monkeypatch):
    """Else the comparison above would compare the library with itself."""
    feeds = [day_series_feed(*case) for case in DAY_CASES]
    window = dict(window_start=datetime(2024, 3, 1, tzinfo=UTC), window_end=datetime(2025, 1, 1, tzinfo=UTC))
    assert share_planned_directly(monkeypatch, "_plan_day_series", feeds, **window) >= 0.5


# --- plain events read without icalendar ----------------------------------------------------

PLAIN_FEEDS = {
    "plain-only": ["X-WR-CALNAME:Plain"],
    "x-wr-utc-and-floating": ["X-WR-TIMEZONE:America/New_York"],
    "x-wr-unknown": ["X-WR-TIMEZONE:Mars/Olympus"],
}
PLAIN_EVENTS = [
    "UID:one\nDTSTART:20240601T100000Z\nDTEND:20240601T110000Z\nSUMMARY;LANGUAGE=en:a\\, b\\nc\\:d\\x ",
    "UID:floating\nDTSTART:20240602T100000\nDURATION:PT24H\nSTATUS:TENTATIVE",
    "UID:zoned\nDTSTART;TZID=Europe/Berlin:20240331T023000\nDURATION:P1D\nLOCATION:gap",
    "UID:utc-zone\nDTSTART;TZID=UTC:20240603T100000\nDTEND;TZID=UTC:20240603T090000",  # swapped
    "UID:series\nDTSTART;TZID=America/New_York:20240301T013000\nDTEND;TZID=America/New_York:20240301T023000"
    "\nRRULE:FREQ=WEEKLY;UNTIL=20240601T013000\nEXDATE;TZID=America/New_York:20240308T013000,20240315T013000"
    "\nEXDATE;VALUE=DATE:20240322\nBEGIN:VALARM\nDESCRIPTION:not the event's\nEND:VALARM",
    "UID:bad-rule\nDTSTART:20240601T100000Z\nRRULE:FREQ=DAILY;INTERVAL=0",
    "UID:unknown-zone\nDTSTART;TZID=Nowhere/Land:20240601T100000",
    "UID:dup\nDTSTART:20240601T100000Z\nSUMMARY:first",
    "UID:dup\nDTSTART:20240601T100000Z\nSEQUENCE:1\nSUMMARY:second",
    "UID:all-day\nDTSTART;VALUE=DATE:20240601\nDTEND;VALUE=DATE:20240602",
    'UID:quoted\nDTSTART;TZID="Europe/Berlin":20240601T100000\nDESCRIPTION;ALTREP="cid:x":d',
    "UID:master\nDTSTART:20240601T100000Z\nRRULE:FREQ=DAILY;COUNT=3",
    "UID:master\nRECURRENCE-ID:20240602T100000Z\nDTSTART:20240602T120000Z\nSUMMARY:moved",
    "UID: " + "long" * 80 + "\nDTSTART:20240601T100000Z",
    "UID:leap\nDTSTART:20240230T100000Z",
    "UID:edge\nDTSTART:99991231T230000Z\nDTEND:99991231T233000Z",
    "DTSTART:20240601T100000Z\nSUMMARY:no uid",
    # all-day forms: read by our reader where the library's reading is plain, else by icalendar
    "UID:day-bare\nDTSTART:20240605\nDTEND:20240607",  # eight digits: icalendar reads a DATE
    "UID:day-no-end\nDTSTART;VALUE=DATE:20240608",
    "UID:day-same-end\nDTSTART;VALUE=DATE:20240609\nDTEND;VALUE=DATE:20240609",
    "UID:day-before\nDTSTART;VALUE=DATE:20240610\nDTEND;VALUE=DATE:20240608",
    "UID:day-duration\nDTSTART;VALUE=DATE:20240611\nDURATION:P2D",
    "UID:day-zoned\nDTSTART;VALUE=DATE;TZID=Europe/Berlin:20240612",
    "UID:day-timed-end\nDTSTART;VALUE=DATE:20240613\nDTEND:20240613T120000Z",
    "UID:day-series\nDTSTART;VALUE=DATE:20240301\nDTEND;VALUE=DATE:20240303\nRRULE:FREQ=WEEKLY;UNTIL=20240601"
    "\nEXDATE;VALUE=DATE:20240308,20240315",
    "UID:day-series-timed-until\nDTSTART;VALUE=DATE:20240301\nRRULE:FREQ=MONTHLY;UNTIL=20240901T000000Z",
    "UID:day-series-count\nDTSTART;VALUE=DATE:20231231\nRRULE:FREQ=YEARLY;COUNT=3",
    "UID:day-series-timed-exdate\nDTSTART;VALUE=DATE:20240401\nRRULE:FREQ=DAILY;COUNT=5"
    "\nEXDATE:20240402T000000Z",
    "UID:day-series-until-before\nDTSTART;VALUE=DATE:20240501\nRRULE:FREQ=DAILY;UNTIL=20240401",
]


def plain_feed(header: list[str], events: list[str]) -> bytes:
    blocks = [f"BEGIN:VEVENT\n{event}\nEND:VEVENT" for event in events]
    return (
        "\r\n".join(["BEGIN:VCALENDAR", "VERSION:2.0", *header, *blocks, "END:VCALENDAR"]) + "\r\n"
    ).encode()


@pytest.mark.parametrize("header", list(PLAIN_FEEDS.values()), ids=list(PLAIN_FEEDS))
@pytest.mark.parametrize(
    "events", [PLAIN_EVENTS, PLAIN_EVENTS[:5], PLAIN_EVENTS[-2:]], ids=["all", "plain", "few"]
)
def test_reading_plain_events_without_icalendar_gives_what_icalendar_gives(header, events, monkeypatch):
    # both_ways asserts that the reader and icalendar agree exactly (instances and problems)
    fast, library = both_ways(
        plain_feed(header, events),
        monkeypatch,
        window_start=datetime(2024, 1, 1, tzinfo=UTC),
        window_end=datetime(2025, 1, 1, tzinfo=UTC),
        calendar_tz="Europe/Paris",
    )
    assert not isinstance(fast, type)


def icalendar_reads(monkeypatch) -> list[int]:
    """Filled with the number of VEVENTs of each text icalendar is given to read."""
    read: list[int] = []
    original = parse_module._read_components

    def recording(text, problems):
        read.append(text.count("BEGIN:VEVENT"))
        return original(text, problems)

    monkeypatch.setattr(parse_module, "_read_components", recording)
    return read


def test_a_feed_of_plain_events_is_read_without_icalendar_parsing_its_events(monkeypatch):
    read = icalendar_reads(monkeypatch)
    window = dict(window_start=datetime(2024, 1, 1, tzinfo=UTC), window_end=datetime(2025, 1, 1, tzinfo=UTC))
    result = parse_feed(plain_feed([], PLAIN_EVENTS[:5]), **window)
    assert read == [] and {i.uid for i in result.instances} == {
        "one",
        "floating",
        "zoned",
        "utc-zone",
        "series",
    }
    parse_feed(plain_feed([], PLAIN_EVENTS[:5] + PLAIN_EVENTS[9:11]), **window)
    assert read == [1]  # the all-day event is read too; only the quoted parameters went to icalendar


def test_all_day_events_read_without_icalendar_give_what_the_library_gives(monkeypatch):
    days = [event for event in PLAIN_EVENTS if event.startswith("UID:day-")] + [PLAIN_EVENTS[9]]
    fast, library = both_ways(
        plain_feed(["X-WR-TIMEZONE:America/New_York"], days),
        monkeypatch,
        window_start=datetime(2024, 3, 4, 12, tzinfo=UTC),
        window_end=datetime(2025, 1, 1, tzinfo=UTC),
        calendar_tz="Pacific/Auckland",
    )
    assert not isinstance(fast, type)
    assert len({i.uid for i in fast.instances}) >= 8
    assert fast.instances == library.instances and fast.problems == library.problems


# --- series with overrides (RECURRENCE-ID) ----------------------------------------------------

GROUP_MASTERS = [
    ("Europe/Berlin", "DTSTART;TZID={tz}:20240301T100000", "DTEND;TZID={tz}:20240301T110000", "FREQ=WEEKLY"),
    ("America/New_York", "DTSTART;TZID={tz}:20240310T013000", "DURATION:PT90M", "FREQ=DAILY;COUNT=30"),
    ("Australia/Lord_Howe", "DTSTART;TZID={tz}:20240401T020000", "", "FREQ=WEEKLY;BYDAY=SU,WE;UNTIL=20240601"),  # noqa: E501
    ("UTC", "DTSTART:20240301T100000Z", "DTEND:20240301T103000Z", "FREQ=MONTHLY;BYDAY=1FR"),
    ("", "DTSTART;VALUE=DATE:20240301", "DTEND;VALUE=DATE:20240302", "FREQ=WEEKLY;COUNT=20"),
]


def group_overrides(tz: str, all_day: bool) -> list[list[str]]:
    """Override sets: moved, cancelled, on an EXDATE, matching no instance, from outside the window
    into it, with a UTC RECURRENCE-ID (another zone: the library's path), with RANGE, duplicated."""
    if all_day:
        rid = lambda day: f"RECURRENCE-ID;VALUE=DATE:{day}"  # noqa: E731
        at = lambda day: f"DTSTART;VALUE=DATE:{day}"  # noqa: E731
        moved, other, outside, exdated = "20240308", "20240309", "20240223", "20240315"
    else:
        zone = f";TZID={tz}" if tz != "UTC" else ""
        z = "Z" if tz == "UTC" else ""
        first = {"Europe/Berlin": "20240308T100000", "America/New_York": "20240312T013000",
                 "Australia/Lord_Howe": "20240403T020000", "UTC": "20240405T100000"}[tz]
        rid = lambda value: f"RECURRENCE-ID{zone}:{value}{z}"  # noqa: E731
        at = lambda value: f"DTSTART{zone}:{value}{z}"  # noqa: E731
        moved, other, outside, exdated = first, first[:9] + "151500", "20240201T100000", first
    sets = [
        [[rid(moved), at(other), "SUMMARY:moved"]],
        [[rid(moved), at(other), "DURATION:P1D" if all_day else "DURATION:PT2H", "SUMMARY:moved, longer"]],
        [[rid(moved), at(moved), "STATUS:CANCELLED"]],
        [[rid(exdated), at(other), "SUMMARY:on an exdate"]],
        [[rid(other), at(other), "SUMMARY:no such instance"]],
        [[rid(outside), at(moved), "SUMMARY:moved into the window"]],
        [[rid(moved), at(other)], [rid(outside), at(outside)]],
    ]
    if not all_day and tz != "UTC":
        sets.append([["RECURRENCE-ID:20240308T090000Z", at(other)]])
        sets.append([[rid(moved).replace(":", ";RANGE=THISANDFUTURE:", 1), at(other)]])
    return sets


def group_feed(
    tz: str, dtstart: str, end: str, rule: str, overrides: list[list[str]], exdate: bool, header: str = ""
) -> bytes:
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//almanac tests//EN", *([header] if header else [])]
    master = ["BEGIN:VEVENT", "UID:group", dtstart.format(tz=tz), f"RRULE:{rule}", "SUMMARY:M"]
    if end:
        master.append(end.format(tz=tz))
    if exdate:
        all_day = "VALUE=DATE" in dtstart
        master.append(
            "EXDATE;VALUE=DATE:20240315" if all_day else dtstart.format(tz=tz).replace("DTSTART", "EXDATE", 1)
        )
    lines += [*master, "END:VEVENT"]
    for override in overrides:
        lines += ["BEGIN:VEVENT", "UID:group", "SEQUENCE:1", *override, "END:VEVENT"]
    lines.append("END:VCALENDAR")
    return ("\r\n".join(lines) + "\r\n").encode()


GROUP_CASES = [
    (tz, dtstart, end, rule, overrides, exdate, header)
    for tz, dtstart, end, rule in GROUP_MASTERS
    for overrides in group_overrides(tz or "UTC", "VALUE=DATE" in dtstart)
    for exdate, header in ((False, ""), (True, ""), (False, "X-WR-TIMEZONE:America/Chicago"))
]


def _group_id(case) -> str:
    return f"{case[0] or 'date'}|{case[3][:9]}|{str(case[4])[:30]}|{case[5]}|{case[6][-7:]}"


@pytest.mark.parametrize("case", GROUP_CASES, ids=_group_id)
def test_the_override_series_path_agrees_with_the_library(case, monkeypatch):
    fast, library = both_ways(
        group_feed(*case),
        monkeypatch,
        window_start=datetime(2024, 3, 5, tzinfo=UTC),
        window_end=datetime(2024, 12, 1, tzinfo=UTC),
        calendar_tz="Asia/Kolkata",
    )
    assert not isinstance(fast, type)
    assert_same_instances(fast, library)


def test_most_override_series_take_the_direct_path(monkeypatch):
    """Else the comparison above would compare the library with itself."""
    feeds = [group_feed(*case) for case in GROUP_CASES]
    window = dict(window_start=datetime(2024, 3, 5, tzinfo=UTC), window_end=datetime(2024, 12, 1, tzinfo=UTC))
    assert share_planned_directly(monkeypatch, "_plan_group", feeds, **window) > 0.7


def test_series_with_overrides_are_read_without_icalendar(monkeypatch):
    read = icalendar_reads(monkeypatch)
    tz, dtstart, end, rule = GROUP_MASTERS[0]
    moved, cancelled = group_overrides(tz, False)[:2]
    window = dict(window_start=datetime(2024, 3, 5, tzinfo=UTC), window_end=datetime(2024, 12, 1, tzinfo=UTC))
    result = parse_feed(group_feed(tz, dtstart, end, rule, moved + cancelled[1:], False), **window)
    assert read == [] and "moved" in {i.summary for i in result.instances}
    ranged = [[group_overrides(tz, False)[-1][0][0], "DTSTART;TZID=Europe/Berlin:20240308T120000"]]
    parse_feed(group_feed(tz, dtstart, end, rule, ranged, False), **window)
    assert read == [2]  # RANGE=THISANDFUTURE: the whole series went to icalendar

"""almanac.ics.parse on hostile feeds: whatever one series does, the rest of the feed is kept.

Runaway series are capped per series, the feed's instance cap is shared between series, text is
bounded per event and per feed, and degenerate rules are refused before the expansion library
sees them. Every cut or skip is one operator-readable line in ``problems``. The feeds are written
here; nothing is mocked except that the expansion library's ``Series`` is wrapped to record (and
refuse) what reaches it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
import recurring_ical_events

import almanac.ics.parse as parse_module
from almanac.ics.parse import CUT_MARK, MAX_PROBLEMS, parse_feed

WINDOW = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))


def feed(*events: str) -> bytes:
    body = "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//almanac tests//EN\n"
    for event in events:
        body += "BEGIN:VEVENT\n" + event.strip() + "\nEND:VEVENT\n"
    return (body + "END:VCALENDAR\n").replace("\n", "\r\n").encode()


def parse(body: bytes, start=WINDOW[0], end=WINDOW[1], **kw):
    return parse_feed(body, window_start=start, window_end=end, **kw)


NORMAL = (
    "UID:dentist\nDTSTART:20241201T090000Z\nDTEND:20241201T100000Z\nSUMMARY:Dentist",
    "UID:standup\nDTSTART:20240603T080000Z\nDTEND:20240603T081500Z\nRRULE:FREQ=WEEKLY;COUNT=10\nSUMMARY:Standup",
)
RUNAWAY = "UID:runaway\nDTSTART:20240101T000000Z\nRRULE:FREQ=MINUTELY\nSUMMARY:Every minute"


def by_uid(result) -> dict[str, list]:
    out: dict[str, list] = {}
    for i in result.instances:
        out.setdefault(i.uid, []).append(i)
    return out


@pytest.fixture
def reached(monkeypatch) -> list[str]:
    """The UIDs handed to the expansion (series that recur: the library, or the direct path over
    dateutil); a degenerate series that reaches it fails fast."""
    seen: list[str] = []

    class RecordingSeries(recurring_ical_events.Series):
        def __init__(self, components):
            uid = str(components[0].uid)
            seen.append(uid)
            if uid.startswith("bad"):
                raise AssertionError(f"{uid} reached the expansion library")
            super().__init__(components)

    direct = parse_module._plan_series

    def recording_plan_series(component, *args, **kwargs):  # the direct path expands with dateutil
        uid = str(component.get("UID"))
        seen.append(uid)
        if uid.startswith("bad"):
            raise AssertionError(f"{uid} reached the expansion")
        return direct(component, *args, **kwargs)

    monkeypatch.setattr(parse_module, "Series", RecordingSeries)
    monkeypatch.setattr(parse_module, "_plan_series", recording_plan_series)
    return seen


# --- a runaway series must not starve the rest of its feed ---------------------------------


def test_runaway_series_is_capped_per_series_and_every_other_event_is_kept():
    result = parse(feed(RUNAWAY, *NORMAL), max_instances_per_series=500)
    series = by_uid(result)
    assert len(series["runaway"]) == 500
    assert len(series["dentist"]) == 1 and len(series["standup"]) == 10
    assert [p for p in result.problems if "runaway" in p] == [
        "event runaway: more than 500 instances in the window; kept the first 500"
    ]
    assert len(result.problems) == 1


def test_per_series_cap_keeps_the_first_instances_of_that_series_in_time_order():
    moved_earlier = (
        "UID:runaway\nRECURRENCE-ID:20240101T002000Z\nDTSTART:20231231T235959Z\nSUMMARY:Moved before all"
    )
    result = parse(
        feed(RUNAWAY, moved_earlier), start=datetime(2023, 12, 31, tzinfo=UTC), max_instances_per_series=5
    )
    kept = by_uid(result)["runaway"]
    assert [i.starts_at for i in kept] == [
        datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC),
        *(datetime(2024, 1, 1, 0, m, tzinfo=UTC) for m in range(4)),
    ]


def test_feed_instance_cap_is_shared_between_series_so_every_series_keeps_its_first_instances():
    hourly = "UID:hourly\nDTSTART:20240101T000000Z\nRRULE:FREQ=HOURLY;COUNT=300"
    result = parse(feed(RUNAWAY, hourly, NORMAL[0]), max_instances=500, max_instances_per_series=1000)
    counts = {uid: len(v) for uid, v in by_uid(result).items()}
    assert counts == {"runaway": 249, "hourly": 249, "dentist": 1}  # 249 + 249 + 1 <= 500 < 250 + 250 + 1
    assert by_uid(result)["hourly"][-1].starts_at == datetime(2024, 1, 11, 8, tzinfo=UTC)
    assert any(p.startswith("more than 500 instances in the window over 3 series") for p in result.problems)
    assert sorted(p for p in result.problems if "kept only its first 249" in p) == [
        "event hourly: kept only its first 249 instances (the feed is over its cap)",
        "event runaway: kept only its first 249 instances (the feed is over its cap)",
    ]


def test_feed_with_more_series_than_the_instance_cap_keeps_its_earliest_instances():
    events = [f"UID:single-{n:03d}\nDTSTART:202403{1 + n % 28:02d}T{n % 24:02d}0000Z" for n in range(60)]
    result = parse(feed(*events), max_instances=25)
    everything = parse(feed(*events))
    assert result.instances == everything.instances[:25]
    assert result.problems == [
        "60 series in the window, more than the 25 instances allowed; kept the earliest 25"
    ]


def test_series_within_the_caps_are_not_reported():
    result = parse(feed(*NORMAL), max_instances=11, max_instances_per_series=10)
    assert len(result.instances) == 11 and result.problems == []


# --- stored text is bounded per event and per feed -----------------------------------------


def test_summary_location_and_description_are_cut_per_event_with_a_marker_and_a_warning_each():
    huge = "é" * 5000
    event = (
        f"UID:long\nDTSTART:20240301T100000Z\nRRULE:FREQ=DAILY;COUNT=3\nSUMMARY:{huge}\n"
        f"LOCATION:{huge}\nDESCRIPTION:{huge}"
    )
    result = parse(feed(event, NORMAL[0]), max_event_text_chars=1000)
    long = by_uid(result)["long"]
    assert len(long) == 3
    for i in long:
        for text in (i.summary, i.location, i.description):
            assert len(text) == 1000 and text.endswith(CUT_MARK) and text.startswith("é" * 900)
    assert by_uid(result)["dentist"][0].summary == "Dentist"
    assert sorted(result.problems) == [
        f"event long: {name} has 5000 characters; cut to 1000 (ends in {CUT_MARK!r})"
        for name in ("DESCRIPTION", "LOCATION", "SUMMARY")
    ]


def test_a_megabyte_description_on_every_instance_stays_inside_the_feed_text_budget():
    megabyte = "x" * 1_000_000
    event = f"UID:big\nDTSTART:20240101T120000Z\nRRULE:FREQ=DAILY\nSUMMARY:Big\nDESCRIPTION:{megabyte}"
    result = parse(feed(event, *NORMAL), max_feed_text_chars=200_000)
    total = sum(len(i.summary) + len(i.description) + len(i.location) for i in result.instances)
    assert len(result.instances) == 366 + 1 + 10
    assert 190_000 < total <= 200_000
    assert {i.summary for i in result.instances} == {"Big", "Dentist", "Standup"}  # short texts kept whole
    assert all(i.description.endswith(CUT_MARK) for i in result.instances if i.uid == "big")
    assert any("DESCRIPTION has 1000000 characters" in p for p in result.problems)
    [budget] = [p for p in result.problems if p.startswith("the feed's texts")]
    assert "more than 200000" in budget


def test_feed_text_budget_cuts_the_longest_texts_first_and_keeps_the_short_ones_whole():
    events = [f"UID:e{n}\nDTSTART:20240301T10{n:02d}00Z\nDESCRIPTION:{'d' * (100 * n)}" for n in range(1, 11)]
    result = parse(feed(*events), max_feed_text_chars=3000)
    lengths = {i.uid: len(i.description) for i in result.instances}
    # 100 + 200 + 300 + 7 * 342 = 2994 <= 3000: e1..e3 are whole, e4..e10 are cut to 342 characters.
    assert [lengths[f"e{n}"] for n in range(1, 11)] == [100, 200, 300] + [342] * 7
    assert all(i.description.endswith(CUT_MARK) for i in result.instances if i.uid not in ("e1", "e2", "e3"))


def test_text_cuts_and_their_content_hashes_are_the_same_on_every_parse():
    event = f"UID:big\nDTSTART:20240101T120000Z\nRRULE:FREQ=DAILY;COUNT=20\nDESCRIPTION:{'y' * 10_000}"
    first = parse(feed(event), max_event_text_chars=5000, max_feed_text_chars=20_000)
    again = parse(feed(event), max_event_text_chars=5000, max_feed_text_chars=20_000)
    assert [i.content_hash for i in first.instances] == [i.content_hash for i in again.instances]
    whole = parse(feed(event))
    assert first.instances[0].content_hash != whole.instances[0].content_hash


# --- degenerate rules are refused before the expansion library sees them --------------------


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ("FREQ=DAILY;INTERVAL=0", "INTERVAL below 1"),
        ("FREQ=SECONDLY;BYMONTH=2;BYMONTHDAY=30", "dates that do not exist"),
        ("FREQ=YEARLY;BYMONTH=4,6,9,11;BYMONTHDAY=31,-31", "dates that do not exist"),
        ("FREQ=DAILY;COUNT=1000000000", "absurd COUNT"),
        ("FREQ=MONTHLY;BYDAY=MO;BYSETPOS=1000000", "BYSETPOS=1000000, out of range"),
        ("FREQ=MONTHLY;BYDAY=MO;BYSETPOS=0", "BYSETPOS=0, out of range"),
        ("FREQ=MONTHLY;BYDAY=6MO", "BYDAY=6MO, out of range"),
        ("FREQ=YEARLY;BYDAY=54MO", "BYDAY=54MO, out of range"),
        ("FREQ=HOURLY;BYHOUR=25", "BYHOUR=25, out of range"),
        ("FREQ=YEARLY;BYMONTH=13", "BYMONTH=13, out of range"),
        ("FREQ=DAILY;BYMONTHDAY=0", "BYMONTHDAY=0, out of range"),
        ("FREQ=MINUTELY;BYSECOND=61", "BYSECOND=61, out of range"),
        ("FREQ=YEARLY;BYYEARDAY=367", "BYYEARDAY=367, out of range"),
        ("FREQ=YEARLY;BYWEEKNO=-54", "BYWEEKNO=-54, out of range"),
    ],
)
def test_degenerate_rule_is_skipped_with_a_warning_before_expansion_and_the_rest_is_kept(
    rule, reason, reached
):
    bad = f"UID:bad-series\nDTSTART:20240101T000000Z\nRRULE:{rule}\nSUMMARY:Bad"
    result = parse(feed(bad, *NORMAL))
    assert {i.uid for i in result.instances} == {"dentist", "standup"}
    [problem] = result.problems
    assert problem.startswith("event bad-series: RRULE ") and reason in problem
    assert problem.endswith("; series skipped")
    # The recurring series still goes through the library (a one-off event never needs it).
    assert "bad-series" not in reached and "standup" in reached


def test_rule_with_millions_of_occurrences_before_the_window_is_refused_before_expansion(reached):
    bad = "UID:bad-old-minutely\nDTSTART:20150101T000000Z\nRRULE:FREQ=MINUTELY"
    result = parse(feed(bad, *NORMAL))
    assert {i.uid for i in result.instances} == {"dentist", "standup"}
    [problem] = result.problems
    assert "occurrences before the window starts" in problem and "bad-old-minutely" in problem
    assert "bad-old-minutely" not in reached


def test_high_frequency_rule_near_its_window_is_expanded_not_refused():
    near = "UID:minutely\nDTSTART:20231201T000000Z\nRRULE:FREQ=MINUTELY;INTERVAL=30"
    result = parse(feed(near), end=datetime(2024, 1, 2, tzinfo=UTC))
    assert len(result.instances) == 48 and result.problems == []


@pytest.mark.parametrize(
    ("rule", "count"),
    [
        ("FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29", 1),  # only in leap years: 2024
        ("FREQ=MONTHLY;BYMONTHDAY=-1", 12),
        ("FREQ=MONTHLY;BYMONTHDAY=31", 7),
        ("FREQ=MONTHLY;BYDAY=FR;BYSETPOS=-1", 12),
        ("FREQ=MONTHLY;BYDAY=-5FR", 4),  # months with five Fridays in 2024
        ("FREQ=YEARLY;BYYEARDAY=366", 1),
        ("FREQ=YEARLY;BYWEEKNO=1;BYDAY=MO", 1),  # 2024-12-30, in ISO week 1 of 2025
        ("FREQ=DAILY;BYHOUR=0,23;BYMINUTE=0;BYSECOND=0", 731),
        ("FREQ=DAILY;COUNT=1000", 365),
    ],
)
def test_rules_at_the_edges_of_their_ranges_are_not_degenerate(rule, count):
    body = feed(f"UID:edge\nDTSTART:20240101T000000Z\nRRULE:{rule}")
    result = parse(body)
    after_dtstart = [i for i in result.instances if i.starts_at != WINDOW[0]]  # DTSTART is always one
    assert len(after_dtstart) == count and result.problems == []


def test_dense_rule_is_expanded_piece_by_piece_completely_and_in_order():
    """96 starts a day from a DAILY rule: the window is expanded in pieces; nothing lost or doubled."""
    dense = "UID:dense\nDTSTART:20240101T000000Z\nRRULE:FREQ=DAILY;BYHOUR=" + ",".join(map(str, range(24)))
    dense += ";BYMINUTE=0,15,30,45"
    result = parse(feed(dense), end=datetime(2024, 4, 1, tzinfo=UTC))
    starts = [i.starts_at for i in result.instances]
    expected_days = (date(2024, 4, 1) - date(2024, 1, 1)).days
    assert len(starts) == 96 * expected_days == len(set(starts))
    assert starts == sorted(starts) and starts[1] - starts[0] == timedelta(minutes=15)


def test_problems_are_bounded_and_say_how_many_more_there_were(reached):
    events = [f"UID:bad-{n}\nDTSTART:20240101T000000Z\nRRULE:FREQ=DAILY;INTERVAL=0" for n in range(300)]
    result = parse(feed(*events, *NORMAL))
    assert len(result.problems) == MAX_PROBLEMS
    assert result.problems[-1] == f"... and {300 - MAX_PROBLEMS + 1} more problem(s) not listed"
    assert {i.uid for i in result.instances} == {"dentist", "standup"}


def test_nul_characters_are_removed_with_a_warning_and_the_feed_kept():
    body = (
        b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:nul\x00uid\r\nDTSTART:20240101T100000Z\r\n"
        b"DTEND:20240101T110000Z\r\nSUMMARY:a\x00b\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    result = parse_feed(
        body, window_start=datetime(2023, 1, 1, tzinfo=UTC), window_end=datetime(2025, 1, 1, tzinfo=UTC)
    )
    (only,) = result.instances
    assert (only.uid, only.summary) == ("nuluid", "ab")
    assert any("NUL" in p for p in result.problems)


def test_a_date_at_the_edge_of_the_range_under_x_wr_timezone_is_a_warning_not_an_exception():
    body = (
        b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nX-WR-TIMEZONE:Pacific/Kiritimati\r\nBEGIN:VEVENT\r\nUID:edge\r\n"
        b"DTSTART:00010101T000000Z\r\nDTEND:00010101T000000Z\r\nEND:VEVENT\r\nBEGIN:VEVENT\r\nUID:ok\r\n"
        b"DTSTART:20240101T100000Z\r\nDTEND:20240101T110000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    result = parse_feed(
        body, window_start=datetime(2023, 1, 1, tzinfo=UTC), window_end=datetime(2025, 1, 1, tzinfo=UTC)
    )
    assert [i.uid for i in result.instances] == ["ok"]
    assert any("X-WR-TIMEZONE could not be applied" in p for p in result.problems)


def test_a_huge_uid_becomes_a_short_stable_one():
    uid = b"u" * 100_000
    body = (
        b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:" + uid + b"\r\nDTSTART:20240101T100000Z\r\n"
        b"DTEND:20240101T110000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    window = {
        "window_start": datetime(2023, 1, 1, tzinfo=UTC),
        "window_end": datetime(2025, 1, 1, tzinfo=UTC),
    }
    first, again = parse_feed(body, **window), parse_feed(body, **window)
    assert len(first.instances[0].uid) <= 255 and first.instances[0].uid == again.instances[0].uid

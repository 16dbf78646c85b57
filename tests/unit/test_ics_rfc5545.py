"""almanac.ics.parse against the letter of RFC 5545: each test is named after the rule it checks.

Lengths (3.3.6, 3.8.2.5, 3.8.5.3): DTEND - DTSTART is an exact duration that every instance keeps;
a DURATION is exact in hours/minutes/seconds and nominal in days/weeks. Folding (3.1) is by
octets. Every feed here is written for the test; the zones are real IANA zones whose DST
changes are known: Europe/Berlin (2024-03-31 02:00 -> 03:00, 2024-10-27 03:00 -> 02:00) and
Australia/Lord_Howe (30 minutes: 2024-04-07 02:00 -> 01:30, 2024-10-06 02:00 -> 02:30).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from almanac.ics.parse import Instance, parse_feed

BERLIN = ZoneInfo("Europe/Berlin")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def feed(*events: str, header: str = "") -> bytes:
    body = "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//almanac tests//EN\n" + header
    for event in events:
        body += "BEGIN:VEVENT\n" + event.strip() + "\nEND:VEVENT\n"
    return (body + "END:VCALENDAR\n").replace("\n", "\r\n").encode()


def parse(body: bytes, tz: str = "UTC", **kw):
    return parse_feed(body, window_start=utc(2024, 1, 1), window_end=utc(2025, 1, 1), calendar_tz=tz, **kw)


def lengths(result) -> dict[str, timedelta]:
    return {i.recurrence_id: i.ends_at - i.starts_at for i in result.instances}


def ends(result) -> dict[str, datetime]:
    return {i.recurrence_id: i.end for i in result.instances}


# --- 3.8.5.3: DTEND - DTSTART is the same EXACT duration for every instance ----------------


def test_dtend_minus_dtstart_is_an_exact_duration_for_an_instance_across_spring_forward():
    """01:30-03:30 CET is 2 h; on 2024-03-31 the instance 01:30 CET lasts 2 h too: until 04:30 CEST."""
    result = parse(
        feed(
            "UID:s\nDTSTART;TZID=Europe/Berlin:20240330T013000\nDTEND;TZID=Europe/Berlin:20240330T033000\n"
            "RRULE:FREQ=DAILY;COUNT=3"
        )
    )
    assert set(lengths(result).values()) == {timedelta(hours=2)}
    assert ends(result)["20240331T003000Z"] == datetime(2024, 3, 31, 4, 30, tzinfo=BERLIN)


def test_dtend_minus_dtstart_is_an_exact_duration_for_an_instance_across_fall_back():
    """01:30-03:30 CEST is 2 h; on 2024-10-27 the instance ends at 02:30 CET, the second 02:30."""
    result = parse(
        feed(
            "UID:f\nDTSTART;TZID=Europe/Berlin:20241026T013000\nDTEND;TZID=Europe/Berlin:20241026T033000\n"
            "RRULE:FREQ=DAILY;COUNT=3"
        )
    )
    assert set(lengths(result).values()) == {timedelta(hours=2)}
    [sunday] = [i for i in result.instances if i.recurrence_id == "20241026T233000Z"]
    assert sunday.ends_at == utc(2024, 10, 27, 1, 30)
    assert (sunday.end.hour, sunday.end.minute, sunday.end.utcoffset()) == (2, 30, timedelta(hours=1))


def test_an_event_from_the_first_into_the_repeated_hour_of_a_fall_back_keeps_its_instants():
    """RFC 5545 3.3.5: DATE-TIME values in UTC are instants. Under X-WR-TIMEZONE they read
    01:30 PDT to 01:00 PST (the repeated hour): the end is later than the start."""
    [i] = parse(
        feed(
            "UID:fold\nDTSTART:20241103T083000Z\nDTEND:20241103T090000Z",
            header="X-WR-TIMEZONE:America/Los_Angeles\n",
        )
    ).instances
    assert (i.starts_at, i.ends_at) == (utc(2024, 11, 3, 8, 30), utc(2024, 11, 3, 9))
    assert i.start.utcoffset() == timedelta(hours=-7) and i.end.utcoffset() == timedelta(hours=-8)


def test_an_event_whose_end_precedes_its_start_is_read_the_other_way_round():
    [i] = parse(feed("UID:swapped\nDTSTART:20240301T110000Z\nDTEND:20240301T100000Z")).instances
    assert (i.starts_at, i.ends_at) == (utc(2024, 3, 1, 10), utc(2024, 3, 1, 11))


def test_exact_duration_of_the_first_instance_spanning_dst_is_kept_by_every_instance():
    """Saturday 12:00 CET to Sunday 12:00 CEST is 23 h elapsed; the next weekend lasts 23 h as well."""
    result = parse(
        feed(
            "UID:w\nDTSTART;TZID=Europe/Berlin:20240330T120000\nDTEND;TZID=Europe/Berlin:20240331T120000\n"
            "RRULE:FREQ=WEEKLY;COUNT=2"
        )
    )
    assert list(lengths(result).values()) == [timedelta(hours=23), timedelta(hours=23)]
    assert result.instances[1].end == datetime(2024, 4, 7, 11, tzinfo=BERLIN)


def test_dtend_in_another_zone_is_an_exact_duration():
    result = parse(
        feed(
            "UID:z\nDTSTART;TZID=Europe/Berlin:20240330T013000\nDTEND:20240330T023000Z\n"
            "RRULE:FREQ=DAILY;COUNT=2"
        )
    )
    assert set(lengths(result).values()) == {timedelta(hours=2)}


# --- 3.3.5 with 3.8.5.3: instances starting in a gap or an overlap -------------------------


def test_instance_starting_in_a_dst_gap_moves_forward_and_keeps_the_exact_duration():
    """02:30 does not exist on 2024-03-31: the instance starts 03:30 CEST and still lasts 1 h."""
    result = parse(
        feed(
            "UID:g\nDTSTART;TZID=Europe/Berlin:20240330T023000\nDTEND;TZID=Europe/Berlin:20240330T033000\n"
            "RRULE:FREQ=DAILY;COUNT=2"
        )
    )
    gap = result.instances[1]
    assert (gap.start, gap.end) == (
        datetime(2024, 3, 31, 3, 30, tzinfo=BERLIN),
        datetime(2024, 3, 31, 4, 30, tzinfo=BERLIN),
    )
    assert gap.ends_at - gap.starts_at == timedelta(hours=1)


def test_instance_starting_in_a_dst_overlap_takes_the_first_and_keeps_the_exact_duration():
    """02:30 happens twice on 2024-10-27: the first (CEST) is the start, and 1 h later is 02:30 CET."""
    result = parse(
        feed(
            "UID:o\nDTSTART;TZID=Europe/Berlin:20241026T023000\nDTEND;TZID=Europe/Berlin:20241026T033000\n"
            "RRULE:FREQ=DAILY;COUNT=2"
        )
    )
    overlap = result.instances[1]
    assert (overlap.starts_at, overlap.ends_at) == (utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 1, 30))


@pytest.mark.parametrize(
    ("day", "start_utc", "end_local"),
    [
        # 2024-10-06 02:00 -> 02:30: 01:00 (+10:30) + 2 h elapsed = 03:30 (+11).
        ("20241005", utc(2024, 10, 5, 14, 30), datetime(2024, 10, 6, 3, 30, tzinfo=LORD_HOWE)),
        # 2024-04-07 02:00 -> 01:30: 01:00 (+11) + 2 h elapsed = 02:30 (+10:30).
        ("20240406", utc(2024, 4, 6, 14), datetime(2024, 4, 7, 2, 30, tzinfo=LORD_HOWE)),
    ],
)
def test_exact_duration_holds_in_a_30_minute_dst_zone(day, start_utc, end_local):
    result = parse(
        feed(
            f"UID:lh\nDTSTART;TZID=Australia/Lord_Howe:{day}T010000\n"
            f"DTEND;TZID=Australia/Lord_Howe:{day}T030000\nRRULE:FREQ=DAILY;COUNT=2"
        )
    )
    crossing = result.instances[1]
    assert crossing.starts_at == start_utc
    assert crossing.end == end_local
    assert crossing.ends_at - crossing.starts_at == timedelta(hours=2)


# --- 3.3.6 / 3.8.2.5: DURATION is exact in H/M/S, nominal in D/W ----------------------------


def test_duration_in_hours_is_exact_elapsed_time():
    [i] = parse(feed("UID:h\nDTSTART;TZID=Europe/Berlin:20240330T120000\nDURATION:PT24H")).instances
    assert i.end == datetime(2024, 3, 31, 13, tzinfo=BERLIN)
    assert i.ends_at - i.starts_at == timedelta(hours=24)


def test_duration_in_days_is_nominal_the_same_wall_clock_time():
    [i] = parse(feed("UID:d\nDTSTART;TZID=Europe/Berlin:20240330T120000\nDURATION:P1D")).instances
    assert i.end == datetime(2024, 3, 31, 12, tzinfo=BERLIN)
    assert i.ends_at - i.starts_at == timedelta(hours=23)


def test_duration_in_weeks_is_nominal():
    [i] = parse(feed("UID:w\nDTSTART;TZID=Europe/Berlin:20241020T120000\nDURATION:P1W")).instances
    assert i.end == datetime(2024, 10, 27, 12, tzinfo=BERLIN)
    assert i.ends_at - i.starts_at == timedelta(days=7, hours=1)


def test_duration_with_days_and_hours_adds_the_days_nominally_then_the_hours_exactly():
    """01:30 CEST + P1D = 01:30 CEST on 2024-10-27; + PT2H elapsed = 02:30 CET (not 03:30)."""
    [i] = parse(feed("UID:dh\nDTSTART;TZID=Europe/Berlin:20241026T013000\nDURATION:P1DT2H")).instances
    assert i.ends_at == utc(2024, 10, 27, 1, 30)
    assert (i.end.hour, i.end.minute, i.end.utcoffset()) == (2, 30, timedelta(hours=1))


@pytest.mark.parametrize(
    ("duration", "length_on_the_dst_day"),
    [("PT24H", timedelta(hours=24)), ("PT1440M", timedelta(hours=24)), ("P1D", timedelta(hours=23))],
)
def test_every_instance_of_a_series_with_a_duration_applies_it_from_its_own_start(
    duration, length_on_the_dst_day
):
    result = parse(
        feed(
            f"UID:r\nDTSTART;TZID=Europe/Berlin:20240329T120000\nDURATION:{duration}\nRRULE:FREQ=DAILY;COUNT=3"
        )
    )
    assert list(lengths(result).values()) == [timedelta(hours=24), length_on_the_dst_day, timedelta(hours=24)]


def test_duration_in_days_starting_in_a_gap_ends_at_the_moved_wall_clock_time_next_day():
    """The instance at the nonexistent 02:30 starts 03:30 CEST (3.3.5); P1D ends 03:30 the next day."""
    result = parse(
        feed("UID:g\nDTSTART;TZID=Europe/Berlin:20240330T023000\nDURATION:P1D\nRRULE:FREQ=DAILY;COUNT=2")
    )
    assert result.instances[1].end == datetime(2024, 4, 1, 3, 30, tzinfo=BERLIN)


def test_rdate_period_with_an_explicit_end_is_that_end():
    result = parse(
        feed(
            "UID:p\nDTSTART;TZID=Europe/Berlin:20240323T120000\nDTEND;TZID=Europe/Berlin:20240323T130000\n"
            "RDATE;VALUE=PERIOD;TZID=Europe/Berlin:20240330T120000/20240331T120000"
        )
    )
    assert ends(result)["20240330T110000Z"] == datetime(2024, 3, 31, 12, tzinfo=BERLIN)


@pytest.mark.parametrize(("duration", "end_hour"), [("PT24H", 13), ("P1D", 12)])
def test_rdate_period_duration_is_exact_in_hours_and_nominal_in_days(duration, end_hour):
    result = parse(
        feed(
            "UID:p\nDTSTART;TZID=Europe/Berlin:20240323T120000\nDTEND;TZID=Europe/Berlin:20240323T130000\n"
            f"RDATE;VALUE=PERIOD;TZID=Europe/Berlin:20240330T120000/{duration}"
        )
    )
    assert ends(result)["20240330T110000Z"] == datetime(2024, 3, 31, end_hour, tzinfo=BERLIN)
    assert ends(result)["20240323T110000Z"] == datetime(2024, 3, 23, 13, tzinfo=BERLIN)


def test_override_keeps_its_own_dtend():
    master = (
        "UID:m\nDTSTART;TZID=Europe/Berlin:20240323T013000\nDTEND;TZID=Europe/Berlin:20240323T023000\n"
        "RRULE:FREQ=WEEKLY;COUNT=2"
    )
    override = (
        "UID:m\nRECURRENCE-ID;TZID=Europe/Berlin:20240330T013000\n"
        "DTSTART;TZID=Europe/Berlin:20240331T013000\nDTEND;TZID=Europe/Berlin:20240331T040000"
    )
    result = parse(feed(master, override))
    assert ends(result)["20240330T003000Z"] == datetime(2024, 3, 31, 4, tzinfo=BERLIN)


def test_thisandfuture_override_gives_later_instances_its_exact_duration():
    master = (
        "UID:t\nDTSTART;TZID=Europe/Berlin:20240316T013000\nDTEND;TZID=Europe/Berlin:20240316T023000\n"
        "RRULE:FREQ=DAILY;COUNT=20"
    )
    override = (
        "UID:t\nRECURRENCE-ID;RANGE=THISANDFUTURE;TZID=Europe/Berlin:20240329T013000\n"
        "DTSTART;TZID=Europe/Berlin:20240329T013000\nDTEND;TZID=Europe/Berlin:20240329T033000\nSUMMARY:Longer"
    )
    result = parse(feed(master, override))
    later = [i for i in result.instances if i.summary == "Longer"]
    assert len(later) == 7
    assert {i.ends_at - i.starts_at for i in later} == {timedelta(hours=2)}
    earlier = [i for i in result.instances if i.summary != "Longer"]
    assert {i.ends_at - i.starts_at for i in earlier} == {timedelta(hours=1)}


def test_all_day_series_keeps_whole_days_across_dst():
    result = parse(
        feed("UID:a\nDTSTART;VALUE=DATE:20240330\nDTEND;VALUE=DATE:20240331\nRRULE:FREQ=DAILY;COUNT=2"),
        tz="Europe/Berlin",
    )
    assert [(i.start.isoformat(), i.end.isoformat()) for i in result.instances] == [
        ("2024-03-30", "2024-03-31"),
        ("2024-03-31", "2024-04-01"),
    ]


# --- 3.1: folding is by octets; a multi-octet character MAY be split -----------------------


@pytest.mark.parametrize("line_end", [b"\r\n", b"\n", b"\r"])
def test_folding_may_split_a_multi_octet_utf8_character(line_end):
    body = (
        b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\nBEGIN:VEVENT\r\nUID:fold\r\n"
        b"DTSTART:20240301T100000Z\r\n"
        b"SUMMARY:Caf\xc3\r\n \xa9 \xe2\x98\r\n\t\x83 \xf0\x9f\r\n \x8e\x89\r\n"
        b"LOCATION:Gen\xc3\r\n \xa8ve\r\n"
        b"END:VEVENT\r\nEND:VCALENDAR\r\n"
    ).replace(b"\r\n", line_end)
    [i] = parse(body).instances
    assert i.summary == "Café ☃ 🎉"
    assert i.location == "Genève"


def test_folding_split_character_is_read_in_an_otherwise_malformed_feed():
    body = (
        b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:fold\r\nDTSTART:20240301T100000Z\r\n"
        b"SUMMARY:Gr\xc3\r\n \xbc\xc3\r\n \x9fe\r\nEND:VEVENT\r\njunk line\r\nEND:VCALENDAR\r\n"
    )
    result = parse(body)
    assert [i.summary for i in result.instances] == ["Grüße"]


# --- STATUS as stated (3.8.1.11) --------------------------------------------------------------


def test_status_stated_is_the_feeds_status_lower_cased_and_none_when_absent():
    result = parse(
        feed(
            "UID:a\nDTSTART:20240301T100000Z",
            "UID:b\nDTSTART:20240301T100000Z\nSTATUS:CONFIRMED",
            "UID:c\nDTSTART:20240301T100000Z\nSTATUS:Tentative",
            "UID:d\nDTSTART:20240301T100000Z\nSTATUS:X-ON-HOLD",
        )
    )
    assert {i.uid: (i.status, i.status_stated) for i in result.instances} == {
        "a": ("confirmed", None),
        "b": ("confirmed", "confirmed"),
        "c": ("tentative", "tentative"),
        "d": ("confirmed", "x-on-hold"),
    }


def _hash_as_stored_before_status_stated(i: Instance) -> str:
    """The content hash recipe rows in the database were written with (do not change it lightly)."""
    zone = "" if i.all_day else i.start.tzinfo.key
    payload = [i.summary, i.description, i.location, i.status, i.all_day]
    payload += [i.start.isoformat(), i.end.isoformat(), zone]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def test_status_stated_leaves_stored_content_hashes_of_events_without_status_unchanged():
    result = parse(
        feed(
            "UID:a\nDTSTART;TZID=Europe/Berlin:20240301T100000\nDTEND;TZID=Europe/Berlin:20240301T110000\n"
            "SUMMARY:No status\nDESCRIPTION:d\nLOCATION:l",
            "UID:b\nDTSTART;TZID=Europe/Berlin:20240301T100000\nSTATUS:CONFIRMED\nSUMMARY:Google writes it",
            "UID:c\nDTSTART;VALUE=DATE:20240301\nSTATUS:TENTATIVE",
        )
    )
    assert [i.content_hash for i in result.instances] == [
        _hash_as_stored_before_status_stated(i) for i in result.instances
    ]


def test_status_stated_that_status_cannot_say_changes_the_content_hash():
    plain = parse(feed("UID:a\nDTSTART:20240301T100000Z")).instances[0]
    on_hold = parse(feed("UID:a\nDTSTART:20240301T100000Z\nSTATUS:X-ON-HOLD")).instances[0]
    assert plain.status == on_hold.status and plain.content_hash != on_hold.content_hash


# --- instances cross a process boundary ------------------------------------------------------


def test_instances_of_every_kind_of_zone_survive_pickling():
    custom = (
        "BEGIN:VTIMEZONE\nTZID:Custom Zone\nBEGIN:STANDARD\nDTSTART:16010101T000000\n"
        "TZOFFSETFROM:+0300\nTZOFFSETTO:+0300\nEND:STANDARD\nEND:VTIMEZONE\n"
    )
    result = parse(
        feed(
            "UID:iana\nDTSTART;TZID=Europe/Berlin:20240301T100000\nRRULE:FREQ=DAILY;COUNT=2",
            "UID:custom\nDTSTART;TZID=Custom Zone:20240301T100000\nSTATUS:TENTATIVE",
            "UID:utc\nDTSTART:20240301T100000Z\nDURATION:PT1H",
            "UID:day\nDTSTART;VALUE=DATE:20240301",
            header=custom,
        )
    )
    again = pickle.loads(pickle.dumps(result))
    assert len(result.instances) == 5
    assert again.instances == result.instances and again.problems == result.problems
    assert [(i.start.isoformat(), i.end.isoformat(), i.status_stated) for i in again.instances] == [
        (i.start.isoformat(), i.end.isoformat(), i.status_stated) for i in result.instances
    ]

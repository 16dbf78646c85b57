"""almanac.ics.parse: one small inline feed per behaviour (RFC 5545 and real-world quirks)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from almanac.errors import PermanentError
from almanac.ics.parse import FeedParseError, parse_feed

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def feed(*events: str, header: str = "") -> bytes:
    body = "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//test//EN\n" + header
    for event in events:
        body += "BEGIN:VEVENT\n" + event.strip() + "\nEND:VEVENT\n"
    return (body + "END:VCALENDAR\n").replace("\n", "\r\n").encode()


WINDOW_START, WINDOW_END = utc(2020, 1, 1), utc(2031, 1, 1)


def parse(body: bytes, start=WINDOW_START, end=WINDOW_END, tz="UTC", **kw):
    return parse_feed(body, window_start=start, window_end=end, calendar_tz=tz, **kw)


WEEKLY = """
UID:w1
DTSTAMP:20240101T000000Z
DTSTART;TZID=Europe/Berlin:20240101T100000
DTEND;TZID=Europe/Berlin:20240101T110000
RRULE:FREQ=WEEKLY;COUNT=4
SUMMARY:Weekly
"""


def test_single_event_has_empty_recurrence_id_and_aware_start_in_its_zone():
    [i] = parse(
        feed(
            "UID:a\nDTSTART;TZID=Europe/Berlin:20240301T100000\nDTEND;TZID=Europe/Berlin:20240301T113000\nSUMMARY:One"
        )
    ).instances
    assert (i.uid, i.recurrence_id, i.summary, i.status, i.all_day) == ("a", "", "One", "confirmed", False)
    assert i.start == datetime(2024, 3, 1, 10, tzinfo=BERLIN) and i.start.tzinfo == BERLIN
    assert (i.starts_at, i.ends_at) == (utc(2024, 3, 1, 9), utc(2024, 3, 1, 10, 30))


def test_rrule_instances_have_utc_recurrence_ids_of_their_original_start():
    result = parse(feed(WEEKLY))
    assert [i.recurrence_id for i in result.instances] == [
        "20240101T090000Z",
        "20240108T090000Z",
        "20240115T090000Z",
        "20240122T090000Z",
    ]


def test_dtstamp_only_change_keeps_every_content_hash():
    before = parse(feed(WEEKLY))
    after = parse(
        feed(
            WEEKLY.replace(
                "DTSTAMP:20240101T000000Z",
                "DTSTAMP:20250505T050505Z\nSEQUENCE:3\nLAST-MODIFIED:20250101T000000Z",
            )
        )
    )
    assert [(i.uid, i.recurrence_id, i.content_hash) for i in before.instances] == [
        (i.uid, i.recurrence_id, i.content_hash) for i in after.instances
    ]


def test_summary_change_changes_every_content_hash():
    before = parse(feed(WEEKLY))
    after = parse(feed(WEEKLY.replace("SUMMARY:Weekly", "SUMMARY:Weekly!")))
    assert all(
        a.content_hash != b.content_hash for a, b in zip(before.instances, after.instances, strict=True)
    )


def test_window_keeps_instances_starting_inside_it_only():
    result = parse(feed(WEEKLY), start=utc(2024, 1, 8, 9), end=utc(2024, 1, 22, 9))
    assert [i.starts_at for i in result.instances] == [utc(2024, 1, 8, 9), utc(2024, 1, 15, 9)]


def test_exdate_removes_an_instance():
    result = parse(feed(WEEKLY + "EXDATE;TZID=Europe/Berlin:20240108T100000"))
    assert len(result.instances) == 3 and "20240108T090000Z" not in {
        i.recurrence_id for i in result.instances
    }


def test_rdate_adds_an_instance():
    result = parse(feed(WEEKLY + "RDATE;TZID=Europe/Berlin:20240103T150000"))
    assert "20240103T140000Z" in {i.recurrence_id for i in result.instances}


def test_rdate_period_gives_the_instance_its_own_end():
    result = parse(feed(WEEKLY + "RDATE;VALUE=PERIOD:20240103T140000Z/20240103T170000Z"))
    [i] = [i for i in result.instances if i.recurrence_id == "20240103T140000Z"]
    assert (i.starts_at, i.ends_at) == (utc(2024, 1, 3, 14), utc(2024, 1, 3, 17))


def test_override_moves_one_instance_and_keeps_its_original_recurrence_id():
    override = (
        "UID:w1\nRECURRENCE-ID;TZID=Europe/Berlin:20240108T100000\n"
        "DTSTART;TZID=Europe/Berlin:20240109T120000\nDTEND;TZID=Europe/Berlin:20240109T130000\n"
        "SUMMARY:Moved\nSEQUENCE:1"
    )
    result = parse(feed(WEEKLY, override))
    moved = {i.recurrence_id: i for i in result.instances}["20240108T090000Z"]
    assert (moved.summary, moved.starts_at) == ("Moved", utc(2024, 1, 9, 11))
    assert len(result.instances) == 4


def test_override_before_its_master_in_the_file_still_applies():
    override = (
        "UID:w1\nRECURRENCE-ID:20240108T090000Z\nDTSTART:20240108T150000Z\n"
        "DTEND:20240108T160000Z\nSUMMARY:Moved"
    )
    result = parse(feed(override, WEEKLY))
    assert {i.recurrence_id: i.summary for i in result.instances}["20240108T090000Z"] == "Moved"


def test_range_thisandfuture_moves_later_instances_too():
    override = (
        "UID:w1\nRECURRENCE-ID;RANGE=THISANDFUTURE:20240115T090000Z\nDTSTART:20240115T120000Z\n"
        "DTEND:20240115T130000Z\nSUMMARY:Later"
    )
    result = parse(feed(WEEKLY, override))
    by_rid = {i.recurrence_id: i for i in result.instances}
    assert by_rid["20240108T090000Z"].starts_at == utc(2024, 1, 8, 9)
    assert (by_rid["20240115T090000Z"].summary, by_rid["20240115T090000Z"].starts_at) == (
        "Later",
        utc(2024, 1, 15, 12),
    )
    assert (by_rid["20240122T090000Z"].summary, by_rid["20240122T090000Z"].starts_at) == (
        "Later",
        utc(2024, 1, 22, 12),
    )


def test_x_wr_timezone_keeps_range_thisandfuture_on_a_utc_recurrence_id():
    """x_wr_timezone rebuilds a UTC RECURRENCE-ID in the calendar zone and drops its RANGE parameter."""
    master = "UID:r\nDTSTART:20240101T090000Z\nDTEND:20240101T100000Z\nRRULE:FREQ=WEEKLY;COUNT=4\nSUMMARY:A"
    override = (
        "UID:r\nRECURRENCE-ID;RANGE=THISANDFUTURE:20240115T090000Z\nDTSTART:20240115T120000Z\n"
        "DTEND:20240115T130000Z\nSUMMARY:B"
    )
    result = parse(feed(master, override, header="X-WR-TIMEZONE:Europe/Berlin\n"))
    assert [i.summary for i in result.instances] == ["A", "A", "B", "B"]
    assert result.instances[-1].starts_at == utc(2024, 1, 22, 12)


def test_cancelled_override_omits_that_instance():
    override = (
        "UID:w1\nRECURRENCE-ID:20240108T090000Z\nDTSTART:20240108T090000Z\n"
        "DTEND:20240108T100000Z\nSTATUS:CANCELLED\nSEQUENCE:2"
    )
    result = parse(feed(WEEKLY, override))
    assert "20240108T090000Z" not in {i.recurrence_id for i in result.instances}
    assert len(result.instances) == 3


def test_cancelled_event_is_omitted_and_tentative_is_kept():
    result = parse(
        feed(
            "UID:c\nDTSTART:20240101T100000Z\nSTATUS:CANCELLED",
            "UID:t\nDTSTART:20240101T100000Z\nSTATUS:TENTATIVE",
        )
    )
    assert [(i.uid, i.status) for i in result.instances] == [("t", "tentative")]


def test_all_day_event_is_a_date_with_exclusive_end():
    [i] = parse(feed("UID:d\nDTSTART;VALUE=DATE:20240301\nDTEND;VALUE=DATE:20240304\nSUMMARY:Trip")).instances
    assert (i.all_day, i.start, i.end) == (True, date(2024, 3, 1), date(2024, 3, 4))
    assert (i.starts_at, i.ends_at) == (utc(2024, 3, 1), utc(2024, 3, 4))


def test_recurring_all_day_event_has_date_recurrence_ids():
    result = parse(feed("UID:d\nDTSTART;VALUE=DATE:20240301\nRRULE:FREQ=DAILY;COUNT=2"))
    assert [(i.recurrence_id, i.end) for i in result.instances] == [
        ("20240301", date(2024, 3, 2)),
        ("20240302", date(2024, 3, 3)),
    ]


def test_missing_dtend_on_a_timed_event_means_zero_length():
    [i] = parse(feed("UID:z\nDTSTART:20240301T100000Z")).instances
    assert i.end == i.start


def test_duration_gives_the_end():
    [i] = parse(feed("UID:z\nDTSTART:20240301T100000Z\nDURATION:PT1H30M")).instances
    assert i.ends_at == utc(2024, 3, 1, 11, 30)


def test_floating_time_is_read_in_the_calendar_zone():
    [i] = parse(
        feed("UID:f\nDTSTART:20240301T100000\nDTEND:20240301T110000"), tz="America/New_York"
    ).instances
    assert i.start == datetime(2024, 3, 1, 10, tzinfo=NEW_YORK)


def test_floating_until_is_read_in_the_zone_of_the_start():
    """recurring_ical_events reads a floating UNTIL as UTC: 10:00 New York (15:00Z) > 10:00Z
    loses the last one."""
    body = feed("UID:f\nDTSTART:20240101T100000\nRRULE:FREQ=DAILY;UNTIL=20240103T100000")
    assert len(parse(body, tz="America/New_York").instances) == 3


def test_date_until_on_a_timed_series_includes_that_day():
    body = feed("UID:f\nDTSTART;TZID=America/New_York:20240101T200000\nRRULE:FREQ=DAILY;UNTIL=20240103")
    assert len(parse(body).instances) == 3


def test_windows_zone_name_is_mapped_to_iana():
    [i] = parse(feed("UID:w\nDTSTART;TZID=W. Europe Standard Time:20240701T100000")).instances
    assert i.start.tzinfo == BERLIN and i.starts_at == utc(2024, 7, 1, 8)


def test_outlook_display_name_is_mapped_to_iana():
    [i] = parse(
        feed('UID:w\nDTSTART;TZID="(UTC-05:00) Eastern Time (US & Canada)":20240701T100000')
    ).instances
    assert i.start.tzinfo == NEW_YORK


def test_unknown_tzid_falls_back_to_the_calendar_zone_with_a_problem():
    result = parse(feed("UID:u\nDTSTART;TZID=Mars/Olympus:20240701T100000"), tz="Europe/Berlin")
    assert result.instances[0].start == datetime(2024, 7, 1, 10, tzinfo=BERLIN)
    assert any("Mars/Olympus" in p for p in result.problems)


def test_custom_vtimezone_is_per_feed_not_shared_between_feeds():
    """icalendar caches a custom VTIMEZONE process-wide by TZID: the first feed's definition would win."""

    def custom(offset: str) -> bytes:
        tz = (
            f"BEGIN:VTIMEZONE\nTZID:Customized Time Zone\nBEGIN:STANDARD\n"
            f"DTSTART:16010101T000000\nTZOFFSETFROM:{offset}\nTZOFFSETTO:{offset}\nEND:STANDARD\n"
            f"END:VTIMEZONE\n"
        )
        return feed("UID:c\nDTSTART;TZID=Customized Time Zone:20240701T100000", header=tz)

    assert parse(custom("+0300")).instances[0].starts_at == utc(2024, 7, 1, 7)
    assert parse(custom("-0700")).instances[0].starts_at == utc(2024, 7, 1, 17)


def test_nonexistent_local_time_moves_forward_by_the_gap():
    [i] = parse(
        feed("UID:g\nDTSTART;TZID=Europe/Berlin:20240331T023000\nDTEND;TZID=Europe/Berlin:20240331T033000")
    ).instances
    assert i.starts_at == utc(2024, 3, 31, 1, 30)
    assert (i.start.hour, i.start.minute, i.start.utcoffset()) == (3, 30, timedelta(hours=2))


def test_ambiguous_local_time_takes_the_first_occurrence():
    [i] = parse(feed("UID:g\nDTSTART;TZID=Europe/Berlin:20241027T023000")).instances
    assert i.starts_at == utc(2024, 10, 27, 0, 30)  # 02:30 CEST, not 02:30 CET


def test_daily_series_keeps_wall_time_across_dst():
    result = parse(feed("UID:d\nDTSTART;TZID=Europe/Berlin:20240330T090000\nRRULE:FREQ=DAILY;COUNT=2"))
    assert [i.starts_at for i in result.instances] == [utc(2024, 3, 30, 8), utc(2024, 3, 31, 7)]


def test_event_without_uid_gets_a_stable_derived_uid():
    body = feed("DTSTART:20240301T100000Z\nSUMMARY:No uid")
    first, second = parse(body).instances[0].uid, parse(body).instances[0].uid
    assert first == second and first.startswith("almanac-")
    other = parse(feed("DTSTART:20240301T100000Z\nSUMMARY:Other")).instances[0].uid
    assert other != first


def test_duplicate_uid_highest_sequence_wins():
    result = parse(
        feed(
            "UID:d\nDTSTART:20240301T100000Z\nSUMMARY:new\nSEQUENCE:2",
            "UID:d\nDTSTART:20240301T100000Z\nSUMMARY:old\nSEQUENCE:1",
        )
    )
    assert [i.summary for i in result.instances] == ["new"]


def test_duplicate_uid_same_sequence_last_in_file_wins():
    """recurring_ical_events keeps the FIRST of equal SEQUENCE; Almanac keeps the last."""
    result = parse(
        feed(
            "UID:d\nDTSTART:20240301T100000Z\nSUMMARY:first", "UID:d\nDTSTART:20240301T100000Z\nSUMMARY:last"
        )
    )
    assert [i.summary for i in result.instances] == ["last"]


def test_override_without_master_is_an_instance():
    [i] = parse(
        feed("UID:o\nRECURRENCE-ID:20240301T100000Z\nDTSTART:20240301T120000Z\nSUMMARY:Orphan")
    ).instances
    assert (i.recurrence_id, i.starts_at) == ("20240301T100000Z", utc(2024, 3, 1, 12))


def test_bad_rrule_skips_that_series_only_and_notes_a_problem():
    result = parse(
        feed(
            "UID:bad\nDTSTART:20240301T100000Z\nRRULE:FREQ=WEEKLY;UNTL=2024",
            "UID:good\nDTSTART:20240301T100000Z",
        )
    )
    assert [i.uid for i in result.instances] == ["good"]
    assert any("bad" in p for p in result.problems)


def test_max_instances_caps_the_output_with_a_problem():
    result = parse(feed("UID:many\nDTSTART:20240101T000000Z\nRRULE:FREQ=DAILY"), max_instances=10)
    assert len(result.instances) == 10
    assert any("more than 10" in p for p in result.problems)


def test_bom_bare_cr_and_invalid_utf8_are_read():
    body = feed("UID:x\nDTSTART:20240301T100000Z\nSUMMARY:café BAD").replace(b"BAD", b"\xff")
    body = b"\xef\xbb\xbf" + body.replace(b"\r\n", b"\r")
    [i] = parse(body).instances
    assert i.summary == "café \ufffd"


def test_two_vcalendars_in_one_body_are_both_read():
    body = feed("UID:a\nDTSTART:20240301T100000Z") + feed("UID:b\nDTSTART:20240302T100000Z")
    assert [i.uid for i in parse(body).instances] == ["a", "b"]


def test_bare_vevent_without_vcalendar_is_read():
    body = b"BEGIN:VEVENT\r\nUID:bare\r\nDTSTART:20240301T100000Z\r\nEND:VEVENT\r\n"
    assert [i.uid for i in parse(body).instances] == ["bare"]


def test_junk_line_is_dropped_and_the_rest_kept():
    body = feed("UID:a\nDTSTART:20240301T100000Z").replace(b"END:VCALENDAR", b"X\r\nEND:VCALENDAR")
    result = parse(body)
    assert [i.uid for i in result.instances] == ["a"] and result.problems


@pytest.mark.parametrize("body", [b"", b"   ", b"<!DOCTYPE html><html>Sign in</html>", b"\x00\x01\x02binary"])
def test_a_body_that_is_not_icalendar_raises_feed_parse_error(body):
    with pytest.raises(FeedParseError) as raised:
        parse(body)
    assert isinstance(raised.value, PermanentError) and str(raised.value)


def test_instances_are_sorted_and_unique():
    result = parse(feed(WEEKLY, "UID:b\nDTSTART:20240101T080000Z", "UID:a\nDTSTART:20240101T080000Z"))
    keys = [(i.starts_at, i.uid, i.recurrence_id) for i in result.instances]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert [i.uid for i in result.instances[:2]] == ["a", "b"]


# --- properties no code reads are dropped before icalendar parses the feed ---------------------

PLAIN = (
    "UID:p\nDTSTART;TZID=Europe/Berlin:20240301T100000\nDTEND;TZID=Europe/Berlin:20240301T110000\nSUMMARY:P"
)


def test_properties_no_code_reads_change_nothing_in_the_result():
    noisy = PLAIN + (
        '\nATTENDEE;CN="never closed:mailto:a@example.com'
        "\nORGANIZER;" + ";".join(f"X-P{i}=v" for i in range(5_000)) + ":mailto:o@example.com"
        "\nDTSTAMP:not a date\nCREATED:2024\nX-MICROSOFT-CDO-BUSYSTATUS;X=\"\":BUSY\nCATEGORIES:a,b"
        "\nBEGIN:VALARM\nACTION:DISPLAY\nTRIGGER:-PT15M\nEND:VALARM"
    )
    clean, dirty = parse(feed(PLAIN)), parse(feed(noisy))
    assert dirty.problems == [] and dirty.instances == clean.instances


def test_property_names_are_read_case_insensitively():
    lower = (
        "uid:p\ndtstart;tzid=Europe/Berlin:20240301T100000\n"
        "dtend;tzid=Europe/Berlin:20240301T110000\nsummary:P"
    )
    assert parse(feed(lower)).instances == parse(feed(PLAIN)).instances


def test_what_a_vtimezone_and_the_calendar_say_is_kept():
    vtimezone = (
        "BEGIN:VTIMEZONE\nTZID:Custom/Zone\nX-LIC-LOCATION:Custom/Zone\nBEGIN:STANDARD\n"
        "DTSTART:19700101T000000\nTZOFFSETFROM:+0300\nTZOFFSETTO:+0300\nTZNAME:C3\nEND:STANDARD\n"
        "END:VTIMEZONE\nX-WR-TIMEZONE:America/New_York\n"
    )
    [zoned, floating] = parse(
        feed(
            "UID:z\nDTSTART;TZID=Custom/Zone:20240301T100000",
            "UID:f\nDTSTART:20240302T100000",
            header=vtimezone,
        )
    ).instances
    assert zoned.starts_at == utc(2024, 3, 1, 7)
    assert floating.start == datetime(2024, 3, 2, 10, tzinfo=NEW_YORK)

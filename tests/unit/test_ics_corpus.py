"""almanac.ics.parse over the real corpus in tests/fixtures/ics-corpus (see its MANIFEST.md).

Each check reproduces an "Upstream expectation" row of the manifest; where Almanac decides
differently the test asserts Almanac's behaviour and its docstring says why.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import re
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from almanac.ics.parse import FeedParseError, ParseResult, parse_feed
from almanac.ics.timezones import ZoneResolver

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"
#: The files MANIFEST.md lists, read at collection: a missing manifest is a collection error, and a
#: missing file fails its test, so an absent fixture can never turn into an empty, skipped parametrize.
CORPUS_FILES = sorted(
    CORPUS / name
    for name in re.findall(r"^\| \d+ \| `([^`]+\.ics)`", (CORPUS / "MANIFEST.md").read_text(), re.M)
)
WIDE = (datetime(1990, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC))
BERLIN = ZoneInfo("Europe/Berlin")


def parse(name: str, start=None, end=None, tz: str = "UTC") -> ParseResult:
    start = start or WIDE[0]
    end = end or WIDE[1]
    return parse_feed((CORPUS / name).read_bytes(), window_start=start, window_end=end, calendar_tz=tz)


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local_dates(instances, tz=UTC) -> list[date]:
    return [i.start if i.all_day else i.start.astimezone(tz).date() for i in instances]


# --- (a) every file parses or raises FeedParseError, nothing else --------------------------


def test_corpus_folder_holds_exactly_the_files_its_manifest_lists():
    assert len(CORPUS_FILES) == 80, "MANIFEST.md lists 80 files"
    assert sorted(CORPUS.glob("*.ics")) == CORPUS_FILES


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_every_corpus_file_parses_or_raises_feed_parse_error(path: Path):
    try:
        result = parse_feed(path.read_bytes(), window_start=WIDE[0], window_end=WIDE[1])
    except FeedParseError as e:
        assert str(e)
        return
    assert isinstance(result, ParseResult)
    keys = [(i.uid, i.recurrence_id) for i in result.instances]
    assert len(keys) == len(set(keys))
    assert [i.starts_at for i in result.instances] == sorted(i.starts_at for i in result.instances)
    for i in result.instances:
        assert WIDE[0] <= i.starts_at < WIDE[1]
        assert i.status in ("confirmed", "tentative")
        assert i.starts_at.tzinfo is not None and i.ends_at.tzinfo is not None


def test_corpus_parse_is_deterministic():
    for path in CORPUS_FILES:
        try:
            first = parse_feed(path.read_bytes(), window_start=WIDE[0], window_end=WIDE[1])
        except FeedParseError:
            continue
        again = parse_feed(path.read_bytes(), window_start=WIDE[0], window_end=WIDE[1])
        assert first.instances == again.instances, path.name


# --- (b) upstream expectations ---------------------------------------------------------------


def test_rie_daylight_saving_time_weekly_event_keeps_local_time_across_dst():
    result = parse("rie_daylight_saving_time.ics")
    starts = {i.start for i in result.instances if i.uid == "7uartkcnhf0elbvs8md0itrf6c@google.com"}
    march = datetime(2019, 3, 20, 19, 0, tzinfo=BERLIN)
    april = datetime(2019, 4, 24, 19, 0, tzinfo=BERLIN)
    assert march in starts and april in starts
    assert march.utcoffset() == timedelta(hours=1) and april.utcoffset() == timedelta(hours=2)


def test_rie_machbar_one_event_on_each_listed_day_and_none_else_in_those_months():
    days = [date(2018, 9, 22), date(2018, 10, 20), date(2018, 11, 17), date(2018, 12, 8), date(2019, 1, 12),
            date(2019, 1, 27), date(2019, 2, 9), date(2019, 2, 24), date(2019, 3, 23), date(2019, 4, 27),
            date(2019, 5, 25), date(2019, 6, 22)]
    result = parse("rie_machbar_16_feb_2019.ics", tz="Europe/Berlin")
    on_tour = [i for i in result.instances if "mB-onTour" in i.summary]
    months = {(d.year, d.month) for d in days} | {(2019, 7)}
    found = sorted(d for d in local_dates(on_tour, BERLIN) if (d.year, d.month) in months)
    assert found == days


def test_rie_dtstamp_only_change_between_two_fetches_gives_identical_instances():
    before = parse("rie_daylight_saving_time.ics")
    after = parse("rie_machbar_16_feb_2019.ics")
    assert (CORPUS / "rie_daylight_saving_time.ics").read_bytes() != (
        CORPUS / "rie_machbar_16_feb_2019.ics"
    ).read_bytes()
    assert {(i.uid, i.recurrence_id, i.content_hash) for i in before.instances} == {
        (i.uid, i.recurrence_id, i.content_hash) for i in after.instances
    }
    assert before.instances


def test_rie_issue_48_dst_three_instances_on_the_afternoon_in_chicago():
    chicago = ZoneInfo("America/Chicago")
    result = parse(
        "rie_issue_48_dst.ics",
        datetime(2020, 12, 11, 10, tzinfo=chicago),
        datetime(2020, 12, 11, 15, tzinfo=chicago),
    )
    assert len(result.instances) == 3


def test_rie_issue_62_moved_event_lands_on_the_17th_not_the_31st():
    result = parse("rie_issue_62_moved_event.ics", utc(2021, 12, 1), utc(2022, 1, 1))
    assert local_dates(result.instances) == [date(2021, 12, 17)]


def test_rie_issue_62_two_series_each_with_a_moved_instance():
    result = parse("rie_issue_62_moved_event_2.ics", utc(2023, 8, 1), utc(2023, 9, 1))
    by_summary = {}
    for i in result.instances:
        by_summary.setdefault(i.summary, []).append(i.start if i.all_day else i.start.date())
    assert by_summary == {
        "All Day": [date(2023, 8, 10), date(2023, 8, 16), date(2023, 8, 24)],
        "Datetime": [date(2023, 8, 8), date(2023, 8, 14), date(2023, 8, 22)],
    }


def test_rie_issue_59_utc_times_are_shown_in_the_x_wr_timezone():
    ny = ZoneInfo("America/New_York")
    result = parse("rie_x_wr_timezone_simple_events_issue_59.ics")
    spans = sorted((i.start, i.end) for i in result.instances)
    assert spans == [
        (datetime(2021, 12, 22, 12, tzinfo=ny), datetime(2021, 12, 22, 13, tzinfo=ny)),
        (datetime(2021, 12, 22, 21, tzinfo=ny), datetime(2021, 12, 22, 22, tzinfo=ny)),
    ]
    assert all(i.start.tzinfo == ny for i in result.instances)


def test_rie_issue_86_floating_time_is_read_in_the_x_wr_timezone():
    [instance] = parse("rie_issue_86_x_wr_timezone_without_time_zone_in_dt.ics").instances
    assert instance.start == datetime(2021, 9, 16, 21, tzinfo=BERLIN)
    assert instance.start.utcoffset() == timedelta(hours=2)


def test_rie_hackerpublicradio_rdate_only_series_has_twelve_instances():
    result = parse("rie_rdate_hackerpublicradio.ics")
    assert [i.starts_at.date() for i in result.instances] == [
        date(2013, 8, 3), date(2013, 8, 31), date(2013, 10, 5), date(2013, 11, 2), date(2013, 11, 30),
        date(2014, 1, 4), date(2014, 2, 1), date(2014, 3, 1), date(2014, 4, 5), date(2014, 5, 3),
        date(2014, 5, 31), date(2014, 7, 5),
    ]
    first = result.instances[0]
    assert (first.starts_at, first.ends_at) == (utc(2013, 8, 3, 19), utc(2013, 8, 3, 21))
    assert len({i.uid for i in result.instances}) == 1 and first.uid.startswith("almanac-")


def test_rie_issue_173_override_without_master_is_kept():
    result = parse("rie_issue_173_only_modifications_error.ics", utc(2024, 1, 8), utc(2024, 1, 9))
    uid = "_6krj2dhl74q34b9j60sj4b9k8h238b9p6gok2ba68gojgchl6cpj0h1o88_R20231009T130000@google.com"
    assert (uid, "20240108T140000Z") in {(i.uid, i.recurrence_id) for i in result.instances}


def test_rie_issue_27_exdate_in_utc_removes_one_of_three():
    result = parse("rie_issue_27_t1.ics", utc(2020, 4, 25), utc(2020, 4, 30))
    assert len(result.instances) == 2


def test_rie_issue_28_outlook_all_day_biweekly_with_utc_until():
    name = "rie_issue_28_rrule_with_UTC_endinginZ.ics"
    assert len(parse(name, utc(2020, 5, 25), utc(2020, 9, 5)).instances) == 15
    assert len(parse(name, utc(2020, 9, 3), utc(2020, 9, 5)).instances) == 1


def test_rie_issue_107_last_instance_in_pdt_is_kept():
    start = utc(2023, 1, 30)
    result = parse("rie_issue_107_omitting_last_event.ics", start, start + timedelta(days=365))
    dates = [i.start.date() for i in result.instances]
    assert date(2023, 6, 1) in dates and dates[-1] == date(2023, 6, 8)


def test_rie_issue_18_cancelled_override_is_omitted():
    """Upstream returns the 01-29 instance with STATUS:CANCELLED; Almanac never returns cancelled ones."""
    result = parse("rie_issue_18_cancel_status.ics")
    assert [i.start.date() for i in result.instances] == [date(2020, 1, 28), date(2020, 1, 30)]


def test_rie_each_week_but_one_deleted_has_seven_instances():
    assert len(parse("rie_each_week_but_one_deleted.ics").instances) == 7


def test_rie_issue_20_utc_exdates_and_until_one_second_early():
    result = parse("rie_issue_20_exdate_ignored.ics")
    assert [i.starts_at.date() for i in result.instances] == [
        date(2019, 10, 29), date(2019, 11, 12), date(2019, 12, 10), date(2020, 1, 7), date(2020, 1, 14),
        date(2020, 1, 21), date(2020, 1, 28),
    ]


def test_rie_issue_113_rdate_period_has_its_own_length():
    vancouver = ZoneInfo("America/Vancouver")
    result = parse("rie_issue_113_period_in_rdate.ics")
    [rdate] = [i for i in result.instances if i.start.date() == date(2023, 12, 13)]
    assert (rdate.start, rdate.end) == (
        datetime(2023, 12, 13, 12, tzinfo=vancouver),
        datetime(2023, 12, 13, 15, tzinfo=vancouver),
    )


def test_rie_issue_75_range_thisandfuture_moves_all_later_instances():
    """RFC 5545 3.8.4.4: later instances move by the same difference and take the same length.
    (The RDATE at 09-14 09:00Z is moved -3h too, to 06:00Z, as upstream's implementation does.)"""
    result = parse("rie_issue_75_range_parameter.ics", utc(2024, 9, 1), utc(2024, 9, 25, 23, 59, 59))
    assert len(result.instances) == 13
    spans = {
        i.start.date(): (i.summary, i.start.strftime("%H:%M"), i.end.strftime("%H:%M"))
        for i in result.instances
    }
    for day in (1, 3, 5, 7, 9, 11):
        assert spans[date(2024, 9, day)] == ("ORIGINAL EVENT", "12:00", "14:00")
    for day in (13, 17, 19):
        assert spans[date(2024, 9, day)] == ("MODIFIED EVENT", "09:00", "16:00")
    assert spans[date(2024, 9, 14)] == ("MODIFIED EVENT", "06:00", "13:00")
    assert spans[date(2024, 9, 15)] == ("MODIFIED EVENT", "17:00", "19:00")
    for day in (22, 24):
        assert spans[date(2024, 9, day)] == ("EDITED EVENT", "14:22", "16:13")
    # moved instances keep their ORIGINAL start as identity
    assert "20240921T120000Z" in {i.recurrence_id for i in result.instances}
    assert len({i.recurrence_id for i in result.instances}) == 13


def test_rie_issue_36_recurrence_id_of_another_value_type_still_replaces_the_instance():
    result = parse("rie_issue_36_recurrence_ID_format.ics", utc(2020, 9, 7), utc(2020, 9, 28))
    by_day = {}
    for i in result.instances:
        by_day.setdefault(i.start if i.all_day else i.start.date(), []).append(i.summary)
    assert by_day[date(2020, 9, 17)] == ["Modified event"]
    assert by_day[date(2020, 9, 14)] == ["Modified event 1"]
    assert by_day[date(2020, 9, 21)] == ["Modified event 2"]


def test_rie_issue_148_new_master_with_higher_sequence_wins():
    before = parse("rie_issue_148_exdate_and_rdate_unedited.ics")
    after = parse("rie_issue_148_exdate_and_rdate_updated.ics")
    assert local_dates(before.instances) == [date(2024, 7, 1), date(2024, 7, 17), date(2024, 7, 29)]
    assert local_dates(after.instances) == [date(2024, 7, 1), date(2024, 7, 15), date(2024, 7, 30)]
    old = {i.recurrence_id: i.content_hash for i in before.instances}
    new = {i.recurrence_id: i.content_hash for i in after.instances}
    kept = old.keys() & new.keys()
    assert len(kept) == 1 and all(old[k] != new[k] for k in kept)  # 07-01 updated (summary edited)


def test_rie_three_events_count_with_interval():
    result = parse("rie_three_events.ics")
    starts = [i.starts_at for i in result.instances]
    assert len(starts) == 3
    assert sum(s < utc(2019, 3, 3) for s in starts) == 0
    assert sum(s < utc(2019, 3, 5) for s in starts) == 1
    assert sum(s < utc(2019, 3, 8) for s in starts) == 2


def test_rie_three_events_one_edited_override_replaces_one_instance():
    result = parse("rie_three_events_one_edited.ics")
    summaries = sorted((i.summary, i.location) for i in result.instances)
    assert summaries == [("test7", ""), ("test7", ""), ("test7 - edited", "location")]
    assert len({i.start for i in result.instances}) == 3 and len({i.end for i in result.instances}) == 3


def test_rie_duration_and_missing_dtend():
    result = parse("rie_duration.ics")
    spans = sorted((i.start, i.end) for i in result.instances if not i.all_day)
    days = sorted((i.start, i.end) for i in result.instances if i.all_day)
    # floating times read in calendar_tz (UTC here)
    assert (utc(2018, 1, 15, 10), utc(2018, 1, 15, 13)) in spans
    three_day = [d for d in days + [(s.date(), e.date()) for s, e in spans] if d[0] == date(2018, 1, 10)]
    assert three_day and three_day[0][1] == date(2018, 1, 13)  # covers 01-10..01-12, end exclusive
    assert any(s.date() == date(2018, 1, 20) for s, _ in spans + days) or any(
        d == date(2018, 1, 20) for d, _ in days
    )


def test_rie_discourse_event_without_dtend_gets_an_end():
    result = parse("rie_discourse_no_dtend.ics")
    on_17th = [i for i in result.instances if i.starts_at.date() == date(2019, 1, 17)]
    assert len(on_17th) == 1
    assert on_17th[0].end == on_17th[0].start  # RFC 5545: DTSTART-only DATE-TIME event has no length


def test_rie_issue_179_all_day_without_dtend_lasts_one_day():
    result = parse("rie_issue_179_example.ics", utc(1997, 11, 1), utc(1997, 11, 3))
    [i] = result.instances
    assert (i.start, i.end, i.all_day) == (date(1997, 11, 2), date(1997, 11, 3), True)


def test_rie_issue_44_google_all_day_event_is_on_one_day():
    result = parse("rie_issue_44_double_event.ics", utc(2020, 8, 13), utc(2020, 8, 16))
    assert [(i.summary, i.start) for i in result.instances] == [("test2", date(2020, 8, 14))]


def test_rie_issue_117_until_before_dtstart_gives_nothing():
    assert parse("rie_issue_117_until_before_dtstart.ics").instances == []


def test_rie_issue_128_negative_count_is_ignored():
    assert len(parse("rie_issue_128_only_first_event.ics").instances) == 7


def test_rie_bad_rrule_is_skipped_with_a_problem():
    """Upstream raises BadRuleStringFormat; Almanac skips the series and notes it (the feed lives on)."""
    result = parse("rie_bad_rrule_missing_until_event.ics")
    assert result.instances == []
    assert any("UNTIL" in p for p in result.problems)


def test_rie_multiple_rrule_lines_are_all_expanded():
    result = parse("rie_multiple_rrule.ics", utc(2023, 1, 1), utc(2024, 1, 1))
    dates = [i.start.date() for i in result.instances]
    assert len(dates) == 22
    assert {date(2023, 2, 9), date(2023, 2, 13), date(2023, 2, 16), date(2023, 3, 13)} <= set(dates)


def test_rie_issue_132_swapped_start_and_end_are_put_right():
    [i] = parse("rie_issue_132_swapped_start_and_end.ics").instances
    assert (i.start.hour, i.start.minute, i.end.hour, i.end.minute) == (23, 30, 23, 45)
    assert i.start.date() == date(2023, 12, 18)


def test_rie_germany_mothers_day_is_an_all_day_event():
    result = parse("rie_Germany.ics", utc(2014, 5, 11), utc(2014, 5, 12))
    assert [(i.summary, i.start, i.all_day) for i in result.instances] == [
        ("Germany: Mother's Day [Not a public holiday]", date(2014, 5, 11), True)
    ]


def test_rie_fablab_mixed_naive_and_aware_times_do_not_break_expansion():
    result = parse("rie_fablab_cottbus.ics", utc(2018, 3, 4), utc(2020, 3, 4))
    assert result.instances and not result.problems


def test_rie_issue_201_date_start_with_datetime_end_is_all_day():
    [i] = parse("rie_issue_201_mixed_datetime_and_date.ics").instances
    assert (i.starts_at, i.ends_at) == (utc(2023, 7, 24), utc(2023, 8, 17))


def test_icalendar_bom_calendar_parses():
    assert parse("icalendar_bom_calendar.ics").instances == []


def test_icalendar_issue_104_stray_line_is_dropped_not_fatal():
    """Upstream (Calendar.from_ical) raises ValueError; Almanac drops the junk line, keeps the event,
    notes it."""
    result = parse("icalendar_issue_104_broken_calendar.ics")
    assert [i.summary for i in result.instances] == ["Broken Eevnt"]
    assert any("not iCalendar content lines" in p for p in result.problems)


def test_icalendar_issue_165_exchange_rrule_with_spaces_is_repaired():
    """Upstream only asserts the VEVENT is read; Almanac also repairs "BYDAY=MO, TU, ..." and expands it."""
    result = parse("icalendar_issue_165_missing_event.ics")
    assert len({i.uid for i in result.instances}) == 1
    assert len(result.instances) > 1
    assert all(i.start.weekday() < 5 for i in result.instances)


def test_icalendar_issue_313_globally_unique_tzids():
    result = parse("icalendar_issue_313_globally_unique_tzid.ics")
    offsets = sorted(i.start.utcoffset() for i in result.instances)
    assert offsets == [timedelta(hours=-4), timedelta(hours=-3), timedelta(hours=2)]


def test_icalendar_issue_526_reordered_events_are_equal_and_subset_differs():
    def keys(name):
        return {(i.uid, i.recurrence_id, i.content_hash) for i in parse(name).instances}

    events = keys("icalendar_issue_526_calendar_with_events.ics")
    assert events == keys("icalendar_issue_526_calendar_with_shuffeled_events.ics")
    subset = keys("icalendar_issue_526_calendar_with_event_subset.ics")
    assert subset < events and len(events - subset) == 1


def test_icalendar_issue_350_junk_after_end_vcalendar_is_ignored():
    assert len(parse("icalendar_issue_350.ics").instances) == 1


def test_icalendar_bare_vevent_with_utc_exdates():
    result = parse("icalendar_event_with_recurrence.ics")
    starts = {i.starts_at for i in result.instances}
    assert len(starts) == 97
    assert not starts & {utc(1996, 4, 2, 1), utc(1996, 4, 3, 1), utc(1996, 4, 4, 1)}


def test_icalendar_lone_cr_fuzz_case_is_a_feed_parse_error():
    """Upstream: must not crash. Almanac: a lone VTIMEZONE is not a calendar feed -> FeedParseError."""
    with pytest.raises(FeedParseError):
        parse("icalendar_fuzz_testcase_vtimezone_lone_cr.ics")


def test_icalendar_issue_1050_both_calendars_are_read():
    """Upstream: two VCALENDARs. Their events have no DTSTART, so both are skipped with a problem each."""
    result = parse("icalendar_issue_1050_multiple_calendars.ics")
    assert any("event1@example.com" in p for p in result.problems)
    assert any("event2@example.com" in p for p in result.problems)


def test_icalendar_issue_722_ambiguous_and_nonexistent_times_in_a_custom_vtimezone():
    body = (CORPUS / "icalendar_issue_722_timezone_transition_ambiguity.ics").read_text()
    result = parse("icalendar_issue_722_timezone_transition_ambiguity.ics")
    expected = {"0": "winter", "1": "summer", "2": "summer", "3": "winter"}
    assert "X-TZNAME" in body
    assert {i.uid: i.start.tzname() for i in result.instances} == expected


def test_icalendar_issue_237_outlook_display_name_with_accent():
    [i] = parse("icalendar_issue_237_fail_to_parse_timezone_with_non_ascii_tzid.ics").instances
    assert i.start.replace(tzinfo=None) == datetime(2017, 5, 11, 13, 30)
    assert i.start.utcoffset() == timedelta(hours=-3)


def test_icaljs_google_birthday_rdates_with_a_stray_z():
    result = parse("icaljs_google_birthday.ics")
    master = [i.start for i in result.instances if i.uid.startswith("2014_")]
    assert master == [date(2012, 12, 10), date(2013, 12, 10), date(2014, 12, 10)]
    assert {i.start for i in result.instances} == set(master)


def test_icaljs_recur_instances_first_six_recurrence_starts():
    """ical.js lists the ORIGINAL starts of the recurrence: that is our recurrence_id."""
    result = parse("icaljs_recur_instances.ics")
    assert sorted(i.recurrence_id for i in result.instances)[:6] == [
        "20121002T170000Z", "20121105T180000Z", "20121106T180000Z", "20121110T180000Z", "20121130T180000Z",
        "20130101T180000Z",
    ]
    moved = {i.recurrence_id: i.starts_at for i in result.instances}
    assert moved["20121002T170000Z"] == utc(2012, 10, 2, 22)  # the override moved it to 15:00 Los Angeles


def test_icaljs_negative_zero_offset_is_utc():
    [i] = parse("icaljs_utc_negative_zero.ics").instances
    assert i.start.utcoffset() == timedelta(0)


def test_khal_cancelled_override_is_omitted():
    result = parse("khal_event_rrule_recuid_cancelled.ics")
    assert date(2014, 7, 14) not in [i.start.astimezone(BERLIN).date() for i in result.instances]


def test_khal_override_without_master():
    result = parse("khal_event_dt_recuid_no_master.ics", utc(2017, 3, 1), utc(2017, 4, 1))
    [i] = result.instances
    assert (i.summary, i.start, i.end) == (
        "Infrastructure Planning",
        utc(2017, 3, 29, 16),
        utc(2017, 3, 29, 16, 25),
    )
    assert i.recurrence_id != ""


def test_khal_event_without_uid_gets_the_same_derived_uid_every_time():
    first = parse("khal_without_uid.ics").instances
    second = parse("khal_without_uid.ics").instances
    assert len(first) == 1 and first[0].uid.startswith("almanac-")
    assert first[0].uid == second[0].uid


def test_khal_unknown_outlook_tzid_falls_back_to_the_calendar_zone():
    ny = ZoneInfo("America/New_York")
    result = parse("khal_event_dtr_notz_untilz.ics", tz="America/New_York")
    assert [i.start for i in result.instances] == [
        datetime(2012, m, d, 13, tzinfo=ny)
        for m, d in ((7, 26), (8, 9), (8, 23), (9, 6), (9, 20), (10, 4), (10, 18))
    ]
    assert any("GMT-05.00/-04.00" in p for p in result.problems)


def test_khal_invalid_vtimezone_offset_still_shows_the_event():
    """Upstream (khal) warns and shows it; Almanac skips the broken VTIMEZONE (problem noted), uses
    IANA Berlin."""
    result = parse("khal_invalid_tzoffset.ics")
    [i] = result.instances
    assert (i.start, i.end) == (
        datetime(2012, 12, 2, 8, tzinfo=BERLIN),
        datetime(2012, 12, 2, 9, 30, tzinfo=BERLIN),
    )
    assert any("VTIMEZONE" in p for p in result.problems)


def test_nodeical_ms_timezones_windows_zone_names():
    result = parse("nodeical_ms_timezones.ics", utc(2020, 6, 1), utc(2020, 7, 1))
    jira = [i for i in result.instances if i.summary == "Log Yesterday's Jira time"]
    assert jira
    assert all(i.starts_at.hour == 7 and i.ends_at.minute == 30 for i in jira)


def test_nodeical_office_owa_display_name_tzids():
    result = parse("nodeical_Office-2012-owa.ics")
    ends = {}
    for i in result.instances:
        ends.setdefault(i.summary, i.ends_at.date())
    assert ends[" TEST"] == date(2020, 10, 28)
    assert ends[" TEST 3"] == date(2020, 11, 2)
    assert not any("unknown time zone" in p for p in result.problems)


def test_nodeical_bad_custom_ms_tz():
    """Upstream: negative DURATION ends 03-23. icalendar cannot read "-PT1W1D2H3M4S" (W mixed with D/H):
    Almanac drops the DURATION (problem noted), so that all-day event lasts one day."""
    result = parse("nodeical_bad_custom_ms_tz.ics")
    by_summary = {i.summary: i for i in result.instances}
    assert by_summary["[private]"].starts_at.date() == date(2021, 3, 25)
    assert by_summary["*masked-away*"].end == by_summary["*masked-away*"].start
    assert by_summary["*masked-away2*"].end == date(2021, 4, 2)
    assert any("DURATION" in p for p in result.problems)


def test_nodeical_exchange_whole_day_moved_recurrence_stays_all_day():
    result = parse("nodeical_exchange_whole_day_moved_recurrence.ics")
    assert all(i.all_day for i in result.instances)
    assert "20260226" in {i.recurrence_id for i in result.instances}


def test_nodeical_tentative_apple_calendar_statuses():
    result = parse("nodeical_tentative-apple-calendar.ics")
    assert {i.uid: i.status for i in result.instances} == {
        "31a1ffc9-9b76-465b-ae4a-cadb694c9d37": "tentative",
        "F00F3710-BF4D-46D3-9A2C-1037AB24C6AC": "confirmed",
        "99F615DE-82C6-4CEF-97B8-CD0D3E1EE0D3": "confirmed",
    }


def test_nodeical_google_override_before_master():
    result = parse("nodeical_google-recurrence-order.ics")
    summaries = [i.summary for i in result.instances if i.uid == "aaaaaaaaaa888se1rr0b24sm4p@google.com"]
    assert "TEST RECURR 3" in summaries and len(set(summaries)) >= 2


def test_nodeical_city_list_tzid_resolves_to_berlin():
    tzid = "Amsterdam, Belgrade, Berlin, Brussels, Budapest, Madrid, Paris, Prague, Stockholm"
    assert ZoneResolver().resolve(tzid) == ZoneInfo("Europe/Berlin")
    assert parse("nodeical_test_with_tz_list.ics").instances == []  # UNTIL (2021) before DTSTART (2024)


def test_nodeical_vtimezone_defined_after_its_event():
    result = parse("nodeical_test_with_int_tzid.ics")
    assert result.instances[0].summary == "test export import"
    assert not any("unknown time zone" in p for p in result.problems)


def test_nodeical_vtimezone_year_0001():
    [i] = parse("nodeical_vtimezone-year-0001-dtstart.ics").instances
    assert i.starts_at == utc(2024, 6, 1, 8)


def test_nodeical_whole_day_override_across_dst_stays_a_date():
    result = parse("nodeical_whole_day_moved_over_dst_change_berlin.ics")
    assert date(2024, 10, 30) in [i.start for i in result.instances]
    assert all(i.all_day for i in result.instances)


def test_nodeical_invalid_tzid_falls_back_to_the_calendar_zone():
    result = parse("nodeical_germany_at_end_of_day_repeating.ics", tz="Europe/Berlin")
    assert result.instances[0].start == datetime(2024, 10, 22, 23, tzinfo=BERLIN)


def test_nodeical_biweekly_exdates_are_recognised():
    """Upstream (node-ical) keys EXDATEs by day, so the "bad time" EXDATEs 12-18/12-19 06:00 remove the
    17:00 (Kiev) instances. Almanac follows RFC 5545: an EXDATE removes only the instance it names,
    so those two stay; the well-formed comma-list EXDATEs of the first series are all applied."""
    result = parse("nodeical_biweekly-exdate-until.ics")
    first = {i.start.date() for i in result.instances if i.uid.startswith("98765432")}
    second = {i.start.date() for i in result.instances if i.uid.startswith("1234567-")}
    assert first and not first & {date(2017, 7, 6), date(2017, 7, 17), date(2017, 7, 20), date(2017, 8, 3)}
    assert {date(2017, 12, 18), date(2017, 12, 19)} <= second


def test_ical4j_invalid_utf8_is_replaced_not_fatal():
    [i] = parse("ical4j_1106817412.ics").instances
    assert "\ufffd" in i.summary + i.description + i.location


@pytest.mark.parametrize(
    "name", ["ical4j_tmeher.ics", "ical4j_2207678.ics", "icalendar_timezone_same_start.ics"]
)
def test_escaped_comma_in_vtimezone_tzid_matches_its_parameter(name):
    result = parse(name)
    assert result.instances
    assert not any("unknown time zone" in p for p in result.problems)


# --- speed -------------------------------------------------------------------------------------


def test_speed_of_the_big_google_export(capsys):
    """Prints instances/second for rie_issue42.ics (30 days back, 365 ahead of 2019-06-01).

    Asserts nothing on time."""
    body = (CORPUS / "rie_issue42.ics").read_bytes()
    anchor = utc(2019, 6, 1)
    kwargs = dict(window_start=anchor - timedelta(days=30), window_end=anchor + timedelta(days=365))
    began = time.perf_counter()
    result = parse_feed(body, **kwargs)
    took = time.perf_counter() - began
    profile = cProfile.Profile()
    profile.runcall(parse_feed, body, **kwargs)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(25)
    with capsys.disabled():
        count = len(result.instances)
        print(f"\nrie_issue42.ics: {count} instances in {took:.2f}s = {count / took:,.0f}/s")
        print(out.getvalue())
    assert result.instances

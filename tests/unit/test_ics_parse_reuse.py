"""almanac.ics.parse: a changed feed re-expands only the UID groups whose text changed (``reuse``).

The property that matters: for every feed, a parse with an earlier parse's group digests gives
exactly the full parse's instances minus those of the kept UIDs, and the kept UIDs' instances
are what the earlier parse gave (so the stored rows the caller keeps are right).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from almanac.ics.parse import FeedParseError, parse_feed

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.ics"))
WIDE = (datetime(1990, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC))
WINDOW = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))


def parse(body: bytes, window=WINDOW, tz="UTC", **kw):
    return parse_feed(body, window_start=window[0], window_end=window[1], calendar_tz=tz, **kw)


def feed(*events: str, header: str = "") -> bytes:
    body = "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//test//EN\n" + header
    for event in events:
        body += "BEGIN:VEVENT\n" + event.strip() + "\nEND:VEVENT\n"
    return (body + "END:VCALENDAR\n").replace("\n", "\r\n").encode()


def weekly(uid: str, summary: str = "Weekly", stamp: str = "20240101T000000Z", extra: str = "") -> str:
    return (
        f"UID:{uid}\nDTSTAMP:{stamp}\nDTSTART;TZID=Europe/Berlin:20240101T100000\n"
        f"DTEND;TZID=Europe/Berlin:20240101T110000\nRRULE:FREQ=WEEKLY;COUNT=10\nSUMMARY:{summary}\n{extra}"
    )


def single(uid: str, summary: str = "One") -> str:
    return f"UID:{uid}\nDTSTART:20240301T100000Z\nDTEND:20240301T110000Z\nSUMMARY:{summary}"


def uids(instances) -> set[str]:
    return {i.uid for i in instances}


def assert_equivalent(before: bytes, after: bytes, **kw) -> frozenset[str]:
    """The reuse property for one feed change; returns the kept UIDs."""
    old = parse(before, **kw)
    full = parse(after, **kw)
    if old.groups is None:
        assert parse(after, reuse=frozenset(), **kw).kept_uids == frozenset()
        return frozenset()
    again = parse(after, reuse=frozenset(old.groups), **kw)
    kept = again.kept_uids
    assert again.groups == full.groups
    assert again.instances == [i for i in full.instances if i.uid not in kept]
    assert [i for i in old.instances if i.uid in kept] == [i for i in full.instances if i.uid in kept]
    assert not uids(again.instances) & kept
    return kept


def test_an_unchanged_feed_keeps_every_group_and_expands_nothing():
    body = feed(weekly("w1"), single("s1"), single("s2"))
    first = parse(body)
    assert len(first.groups) == 3 and first.kept_uids == frozenset()
    again = parse(body, reuse=frozenset(first.groups))
    assert again.kept_uids == {"w1", "s1", "s2"}
    assert again.instances == [] and again.groups == first.groups


def test_only_the_edited_event_is_expanded_again():
    before = feed(weekly("w1"), single("s1"), single("s2"))
    after = feed(weekly("w1"), single("s1", "Renamed"), single("s2"))
    assert assert_equivalent(before, after) == {"w1", "s2"}
    assert uids(parse(after, reuse=frozenset(parse(before).groups)).instances) == {"s1"}


def test_an_added_override_makes_its_series_one_changed_group():
    override = "UID:w1\nRECURRENCE-ID;TZID=Europe/Berlin:20240108T100000\nDTSTART;TZID=Europe/Berlin:20240108T120000\nDTEND;TZID=Europe/Berlin:20240108T130000\nSUMMARY:Moved"  # noqa: E501
    before = feed(weekly("w1"), single("s1"))
    after = feed(weekly("w1"), override, single("s1"))
    assert assert_equivalent(before, after) == {"s1"}


def test_deleted_and_added_events_are_not_kept():
    before = feed(weekly("w1"), single("s1"), single("s2"))
    after = feed(weekly("w1"), single("s2"), single("s3"))
    assert assert_equivalent(before, after) == {"w1", "s2"}


def test_a_changed_dtstamp_alone_changes_no_group():
    before = feed(weekly("w1", stamp="20240101T000000Z"), single("s1"))
    after = feed(weekly("w1", stamp="20241201T093000Z"), single("s1"))
    assert assert_equivalent(before, after) == {"w1", "s1"}


@pytest.mark.parametrize(
    ("change", "kw_before", "kw_after"),
    [
        ("the calendar's zone", {"tz": "UTC"}, {"tz": "Asia/Tokyo"}),
        ("a limit", {"max_event_text_chars": 100}, {"max_event_text_chars": 101}),
        ("the window's length", {"window": WINDOW}, {"window": (WINDOW[0], WINDOW[1] + timedelta(days=1))}),
    ],
)
def test_a_changed_context_keeps_nothing(change, kw_before, kw_after):
    body = feed(weekly("w1"), "UID:f1\nDTSTART:20240301T100000\nSUMMARY:Floating")
    first = parse(body, **kw_before)
    assert parse(body, reuse=frozenset(first.groups), **kw_after).kept_uids == frozenset(), change


def test_a_changed_vtimezone_or_calendar_line_keeps_nothing():
    zone = (
        "BEGIN:VTIMEZONE\nTZID:Office\nBEGIN:STANDARD\nDTSTART:19700101T000000\n"
        "TZOFFSETFROM:{o}\nTZOFFSETTO:{o}\nEND:STANDARD\nEND:VTIMEZONE\n"
    )
    event = "UID:o1\nDTSTART;TZID=Office:20240301T100000\nDTEND;TZID=Office:20240301T110000\nSUMMARY:Office"
    before = feed(event, single("s1"), header=zone.format(o="+0100"))
    for after in (
        feed(event, single("s1"), header=zone.format(o="+0200")),
        feed(event, single("s1"), header=zone.format(o="+0100") + "X-WR-TIMEZONE:Asia/Tokyo\n"),
    ):
        assert assert_equivalent(before, after) == frozenset()


def test_a_block_with_several_uids_is_never_kept():
    twice = "UID:d1\nUID:d2\nDTSTART:20240301T100000Z\nSUMMARY:Two UIDs"
    body = feed(twice, single("s1"))
    first = parse(body)
    again = parse(body, reuse=frozenset(first.groups))
    assert again.kept_uids == {"s1"}
    assert uids(again.instances) == uids(first.instances) - {"s1"}


def test_a_feed_icalendar_reads_as_a_whole_has_no_groups():
    body = feed(single("s1")).replace(b"END:VCALENDAR", b"BEGIN:VTODO\r\nUID:t\r\nEND:VTODO\r\nEND:VCALENDAR")
    assert parse(body).groups is None
    assert parse(body, reuse=frozenset([b"x" * 16])).kept_uids == frozenset()


def _edit_every_third_summary(body: bytes) -> bytes:
    parts = body.split(b"BEGIN:VEVENT")
    for k in range(1, len(parts), 3):
        parts[k] = re.sub(rb"\nSUMMARY:", b"\nSUMMARY:Edited ", parts[k], count=1)
    return b"BEGIN:VEVENT".join(parts)


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_reuse_gives_the_full_parse_on_every_corpus_file(path: Path):
    body = path.read_bytes()
    try:
        assert_equivalent(body, _edit_every_third_summary(body), window=WIDE)
    except FeedParseError:
        return
    assert_equivalent(body, body, window=WIDE)  # nothing changed: the same, and mostly kept


def test_most_corpus_files_have_groups_that_can_be_kept():
    kept = 0
    for path in CORPUS_FILES:
        try:
            first = parse(path.read_bytes(), window=WIDE)
        except FeedParseError:
            continue
        if first.groups and parse(path.read_bytes(), window=WIDE, reuse=frozenset(first.groups)).kept_uids:
            kept += 1
    assert kept >= 40, f"only {kept} of {len(CORPUS_FILES)} files keep anything"

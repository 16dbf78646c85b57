"""Storing a calendar's instances: only what changed is written, in one transaction."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from almanac.ics.store import EmptyFeedHeldError, store_instances

WINDOW = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


@dataclass(frozen=True)
class Inst:  # the attributes store_instances reads (almanac.ics.parse.Instance has them all)
    uid: str
    recurrence_id: str = ""
    summary: str = "s"
    description: str = ""
    location: str = ""
    status: str = "confirmed"
    all_day: bool = False
    starts_at: datetime = datetime(2026, 6, 1, 9, tzinfo=UTC)
    ends_at: datetime = datetime(2026, 6, 1, 10, tzinfo=UTC)
    content_hash: str = "h1"


@pytest.fixture
def calendar(db):
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    db.execute("INSERT INTO calendars (id, tenant_id, name) VALUES (1, 1, 'c')")
    db.commit()
    return db


def _store(db, instances, **kw):
    result = store_instances(db, 1, instances, window_start=WINDOW[0], window_end=WINDOW[1], **kw)
    db.commit()
    return result


def _rows(db):
    return db.execute(
        "SELECT uid, recurrence_id, summary, content_hash, xmin::text FROM events ORDER BY uid, recurrence_id"
    ).fetchall()


def test_first_sync_inserts_everything(calendar):
    result = _store(calendar, [Inst("a"), Inst("b", "20260601T090000Z")])
    assert (result.added, result.updated, result.deleted, result.total) == (2, 0, 0, 2)
    assert [r[:2] for r in _rows(calendar)] == [("a", ""), ("b", "20260601T090000Z")]


def test_same_instances_again_write_nothing(calendar):
    _store(calendar, [Inst("a"), Inst("b")])
    before = _rows(calendar)  # xmin changes on any write to a row
    result = _store(calendar, [Inst("a"), Inst("b")])
    assert not result.changed
    assert _rows(calendar) == before


def test_changed_hash_updates_only_that_row(calendar):
    _store(calendar, [Inst("a"), Inst("b")])
    before = {r[0]: r for r in _rows(calendar)}
    result = _store(calendar, [Inst("a"), Inst("b", summary="moved", content_hash="h2")])
    assert (result.added, result.updated, result.deleted) == (0, 1, 0)
    after = {r[0]: r for r in _rows(calendar)}
    assert after["a"] == before["a"]
    assert after["b"][2:4] == ("moved", "h2")


def test_vanished_instances_are_deleted(calendar):
    _store(calendar, [Inst("a"), Inst("b"), Inst("c")])
    result = _store(calendar, [Inst("a")])
    assert result.deleted == 2
    assert [r[0] for r in _rows(calendar)] == ["a"]


def test_rows_outside_the_window_are_left_alone(calendar):
    old = Inst("old", starts_at=datetime(2025, 1, 1, tzinfo=UTC), ends_at=datetime(2025, 1, 1, 1, tzinfo=UTC))
    store_instances(calendar, 1, [old], window_start=datetime(2024, 1, 1, tzinfo=UTC), window_end=WINDOW[1])
    calendar.commit()
    _store(calendar, [Inst("a")])
    assert [r[0] for r in _rows(calendar)] == ["a", "old"]


def test_a_feed_that_suddenly_is_empty_is_held_back(calendar):
    _store(calendar, [Inst(f"e{i}") for i in range(12)])
    with pytest.raises(EmptyFeedHeldError, match="had 12"):
        _store(calendar, [], empty_guard_min=10)
    calendar.rollback()
    assert len(_rows(calendar)) == 12


def test_a_small_calendar_may_become_empty(calendar):
    _store(calendar, [Inst("a"), Inst("b")])
    assert _store(calendar, [], empty_guard_min=10).deleted == 2


def test_many_instances_go_in_bulk(calendar):
    start = datetime(2026, 2, 1, tzinfo=UTC)
    many = [
        Inst(
            "series",
            f"{i:05d}",
            starts_at=start + timedelta(hours=i),
            ends_at=start + timedelta(hours=i, minutes=30),
        )
        for i in range(5000)
    ]
    assert _store(calendar, many).added == 5000
    changed = [replace(m, content_hash="h2") if i % 10 == 0 else m for i, m in enumerate(many)]
    result = _store(calendar, changed)
    assert (result.added, result.updated, result.deleted) == (0, 500, 0)


def test_an_instance_moved_into_the_window_updates_its_row_from_before_the_window(calendar):
    """The calendar's only row is outside the window, so the window looks empty: the store must
    still update that row (same identity), not COPY a second one in as for a calendar's first sync."""
    before = datetime(2025, 6, 1, 9, tzinfo=UTC)
    moved = Inst("m", "20250601T090000Z", starts_at=before, ends_at=before + timedelta(hours=1))
    store_instances(calendar, 1, [moved], window_start=datetime(2025, 1, 1, tzinfo=UTC), window_end=WINDOW[1])
    calendar.commit()
    result = _store(calendar, [replace(moved, starts_at=datetime(2026, 6, 1, 9, tzinfo=UTC),
                                       ends_at=datetime(2026, 6, 1, 10, tzinfo=UTC), content_hash="h2")])
    assert (result.added, result.updated, result.total) == (1, 0, 1)  # new in the window's terms
    assert [r[:4] for r in _rows(calendar)] == [("m", "20250601T090000Z", "s", "h2")]


def test_a_kept_uid_s_rows_are_counted_and_never_deleted(calendar):
    _store(calendar, [Inst("a"), Inst("k", "1"), Inst("k", "2")])
    before = _rows(calendar)
    result = _store(calendar, [], keep_uids=frozenset({"k"}), empty_guard_min=1)
    assert (result.added, result.updated, result.deleted, result.total) == (0, 0, 1, 2)
    assert _rows(calendar) == [row for row in before if row[0] == "k"]

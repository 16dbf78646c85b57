"""ics_sync's batch plan: the shared ``almanac.batches.plan_batches`` cutting calendar ids.

``almanac.ics.plan`` says which calendars are due (a database query) and cuts them with the
shared planner and the ics_sync settings (``calendar_batches``, what both ICS DAGs call); the
planner's own shape is checked with its generic defaults.
"""

from __future__ import annotations

import pytest

from almanac.batches import plan_batches
from almanac.ics.plan import calendar_batches
from almanac.settings import Settings


def plan(ids, **kwargs):
    return plan_batches(ids, noun="calendars", **kwargs)


@pytest.mark.parametrize(
    ("calendars", "batches", "largest"),
    [(10_000, 20, 500), (1_000, 16, 63), (100, 2, 50), (7, 1, 7), (0, 0, 0)],
)
def test_batches_grow_to_the_cap_before_multiplying(calendars, batches, largest):
    planned = plan(list(range(1, calendars + 1)))
    assert len(planned) == batches
    assert max((len(b["ids"]) for b in planned), default=0) == largest


def test_every_calendar_is_in_exactly_one_batch_in_order():
    ids = list(range(5, 2_005, 2))
    planned = plan(ids, min_size=10, max_size=100, target_count=8)
    assert [i for b in planned for i in b["ids"]] == ids


def test_labels_name_the_id_range_and_size():
    (only,) = plan([3, 9, 27])
    assert only["label"] == "calendars 3-27 (3)"


def test_a_huge_catalogue_stays_under_airflows_map_length():
    # max_map_length is 1024 by default: 500,000 calendars at the 500 cap make 1,000 batches.
    assert len(plan(list(range(500_000)))) == 1000


@pytest.mark.parametrize(
    ("calendars", "sizes"),
    [(500, [125] * 4), (2_000, [125] * 16), (10_000, [500] * 20), (130, [125, 5])],
)
def test_the_ics_dags_cut_calendars_by_the_ics_batch_settings(calendars, sizes):
    planned = calendar_batches(list(range(1, calendars + 1)), Settings())
    assert [len(b["ids"]) for b in planned] == sizes
    assert planned[0]["label"].startswith("calendars 1-")


def test_the_ics_batch_settings_are_what_the_cut_follows():
    settings = Settings(ics_batch_min=10, ics_batch_max=20, ics_batch_target_count=2)
    assert [len(b["ids"]) for b in calendar_batches(list(range(100)), settings)] == [20] * 5

"""almanac.batches: the shared result types, summaries, planner and id check."""

from __future__ import annotations

import pytest

from almanac.batches import ItemResult, Kind, as_entity_id, combine_summaries, plan_batches, summarize_batch

KIND = Kind("Calendars", "calendarId", ("eventsAdded",), "changedCalendarIds")


def test_summary_counts_each_status_and_lists_all_but_unchanged():
    results = [
        ItemResult(1, "updated", {"eventsAdded": 3}),
        ItemResult(2, "unchanged"),
        ItemResult(3, "skipped", error="gone"),
        ItemResult(4, "busy", error="held"),
        ItemResult(5, "error", error="bad", permanent=True),
    ]
    summary = summarize_batch(KIND, results, failure_percent=50)
    assert {
        k: summary[k]
        for k in (
            "totalCalendars",
            "successCount",
            "errorCount",
            "skippedCount",
            "busyCount",
            "eventsAdded",
            "changedCalendarIds",
        )
    } == {
        "totalCalendars": 5,
        "successCount": 2,
        "errorCount": 2,
        "skippedCount": 1,
        "busyCount": 1,
        "eventsAdded": 3,
        "changedCalendarIds": [1],
    }
    assert [r["calendarId"] for r in summary["results"]] == [1, 3, 4, 5]
    assert summary["results"][0] == {"calendarId": 1, "status": "updated", "eventsAdded": 3, "error": None}
    assert not summary["batchFailed"] and not summary["permanentOnly"]  # busy is retryable


def test_an_unchanged_item_with_something_to_show_is_listed():
    results = [ItemResult(1, "unchanged"), ItemResult(2, "unchanged", detail={"warningCount": 1})]
    assert [r["calendarId"] for r in summarize_batch(KIND, results)["results"]] == [2]


def test_a_batch_fails_past_the_threshold_and_says_whether_a_retry_can_help():
    permanent = [ItemResult(i, "error", permanent=True) for i in (1, 2)] + [ItemResult(3, "unchanged")]
    summary = summarize_batch(KIND, permanent, failure_percent=50)
    assert summary["batchFailed"] and summary["permanentOnly"]
    mixed = permanent + [ItemResult(4, "error", permanent=False), ItemResult(5, "error", permanent=True)]
    summary = summarize_batch(KIND, mixed, failure_percent=50)
    assert summary["batchFailed"] and not summary["permanentOnly"]


def test_combine_counts_missing_batches_as_failed_and_says_when_incomplete():
    a = summarize_batch(KIND, [ItemResult(1, "updated", {"eventsAdded": 1})])
    b = summarize_batch(KIND, [ItemResult(2, "busy"), ItemResult(3, "unchanged")])  # 50%: not failed
    total = combine_summaries(KIND, [a, b, None], planned=3)
    assert (total["totalCalendars"], total["busyCount"], total["batches"], total["failedBatches"]) == (
        3,
        1,
        2,
        1,
    )
    assert total["changedCalendarIds"] == [1] and total["complete"] is False
    clean = combine_summaries(KIND, [a], planned=1)
    assert clean["complete"] is True and clean["failedBatches"] == 0


def test_plan_grows_batches_before_adding_more():
    assert [len(b["ids"]) for b in plan_batches(list(range(1, 10_001)), max_size=500)] == [500] * 20
    assert len(plan_batches(list(range(1, 1001)))) == 16
    assert [len(b["ids"]) for b in plan_batches(list(range(1, 101)))] == [50, 50]
    (only,) = plan_batches([7, 9], noun="members", extra={"scope": None})
    assert only == {"label": "members 7-9 (2)", "ids": [7, 9], "scope": None}
    assert plan_batches([]) == []


@pytest.mark.parametrize(
    "value, expected", [(1, 1), (1.0, 1), ("42", 42), (" 7 ", 7), (2**63 - 1, 2**63 - 1)]
)
def test_integer_ids_are_exact_integers(value, expected):
    got = as_entity_id(value)
    assert got == expected and type(got) is int


@pytest.mark.parametrize(
    "value",
    [
        True,
        0,
        -3,
        1.5,
        "1.0",
        "x",
        "٣",
        pytest.param("9" * 5000, id="5000-digit-text"),
        pytest.param(10**5000, id="5000-digit-int"),
        2**63,
        None,
        [1],
        {"a": 1},
    ],
)
def test_anything_else_is_refused_with_a_value_error(value):
    with pytest.raises(ValueError):
        as_entity_id(value)

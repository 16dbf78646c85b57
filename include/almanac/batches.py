"""The mapped-batch pattern, domain half: per-item results, batch summaries, one planner, one combiner.

Every per-entity job (ICS sync over calendars, Google push over members, and the jobs after
them) has the same shape: a planner cuts entity ids into batches, a mapped task works each
batch item by item — every item isolated, one ``ItemResult`` each — and a summary step adds
the batches up. This module is that shape without Airflow; ``almanac_airflow.batches`` wires
it into a DAG.

Statuses of an item:

- ``updated`` / ``unchanged``: done (success);
- ``skipped``: nothing to do — vanished state (deleted calendar, revoked grant), not a failure;
- ``busy``: another live run holds the item's lease, so this run did not do it (counted as an
  error, retryable: a retry of the batch does it);
- ``error`` / ``held``: failed; ``permanent`` says whether a retry could help.

Summary shape (``Kind`` names the nouns)::

    {"total<Noun>": N, "successCount", "errorCount", "skippedCount", "busyCount",
     <counters...>, "changed<Noun singular>Ids": [...], "results": [...],
     "batchFailed": bool, "permanentOnly": bool}
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FAILED_STATUSES",
    "SUCCESS_STATUSES",
    "ItemResult",
    "Kind",
    "as_entity_id",
    "combine_summaries",
    "infrastructure_errors",
    "map_items",
    "plan_batches",
    "rollback_quietly",
    "summarize_batch",
]

SUCCESS_STATUSES = frozenset({"updated", "unchanged"})
FAILED_STATUSES = frozenset({"error", "held", "busy"})


def as_entity_id(value: Any) -> int:
    """A positive integer entity id from a Param, an XCom or a message; raises ValueError otherwise.

    JSON Schema's ``integer`` admits ``1.0``; ids are exact integers everywhere (lock keys,
    SQL), so an integral float becomes an int and anything else (bool, fraction, text,
    absurdly long digit strings) is refused.
    """
    if isinstance(value, bool):
        raise ValueError(f"not an integer id: {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"not an integer id: {value!r}")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdecimal() or not text.isascii() or len(text) > 19:
            raise ValueError(f"not an integer id: {value[:40]!r}")
        value = int(text)
    if not isinstance(value, int):
        raise ValueError(f"not an integer id: {type(value).__name__}")
    if not 0 < value < 2**63:
        raise ValueError(f"id out of range: {value}")
    return value


@dataclass(frozen=True)
class Kind:
    """What a job's items are called in its summaries.

    Parameters:
        noun: plural, capitalised (``"Calendars"``) -> ``totalCalendars``.
        id_key: the id field of one result (``"calendarId"``).
        counters: per-item counts summed over the run (``("eventsAdded", ...)``).
        changed_key: list of the ids whose status is ``updated`` (``"changedCalendarIds"``).
    """

    noun: str
    id_key: str
    counters: tuple[str, ...] = ()
    changed_key: str | None = None
    #: whether ``updated`` items are listed in ``results`` (False for jobs that update most items
    #: every run, e.g. token refreshes: the counters say it, failures are still listed).
    list_updated: bool = True
    #: at most this many entries in ``results`` (the rest counted in ``resultsOmitted``): a run
    #: total lives in XCom, in the metadata database.
    max_results: int | None = None

    @property
    def total_key(self) -> str:
        return f"total{self.noun}"


@dataclass
class ItemResult:
    """The outcome of one item of a batch."""

    item_id: int
    status: str
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    permanent: bool = False  # for failures: a retry of the same input fails the same way
    detail: dict[str, Any] = field(default_factory=dict)  # small extras shown in ``results``

    def as_dict(self, kind: Kind) -> dict:
        return {
            kind.id_key: self.item_id,
            "status": self.status,
            **{name: self.counts.get(name, 0) for name in kind.counters},
            "error": self.error,
            **self.detail,
        }


def summarize_batch(
    kind: Kind, results: Sequence[ItemResult], *, failure_percent: int = 50, keep_unchanged: bool = False
) -> dict:
    """One batch's summary; ``batchFailed`` when more than ``failure_percent`` of its items failed.

    ``permanentOnly`` is true when every failure was permanent, so retrying the batch would
    change nothing (the caller then fails it without retries).
    """
    failed = [r for r in results if r.status in FAILED_STATUSES]
    # Unchanged items are only counted, unless they carry something to show (warnings...).
    listed = [
        r
        for r in results
        if keep_unchanged
        or r.detail
        or (r.status != "unchanged" and (kind.list_updated or r.status != "updated"))
    ]
    summary: dict[str, Any] = {
        kind.total_key: len(results),
        "successCount": sum(r.status in SUCCESS_STATUSES for r in results),
        "errorCount": len(failed),
        "skippedCount": sum(r.status == "skipped" for r in results),
        "busyCount": sum(r.status == "busy" for r in results),
    }
    for name in kind.counters:
        summary[name] = sum(r.counts.get(name, 0) for r in results)
    if kind.changed_key:
        summary[kind.changed_key] = [r.item_id for r in results if r.status == "updated"]
    summary["results"] = [r.as_dict(kind) for r in listed[: kind.max_results]]
    if kind.max_results is not None and len(listed) > kind.max_results:
        summary["resultsOmitted"] = len(listed) - kind.max_results
    summary["batchFailed"] = 100 * len(failed) / max(1, len(results)) > failure_percent
    summary["permanentOnly"] = bool(failed) and all(r.permanent for r in failed)
    return summary


def combine_summaries(kind: Kind, summaries: Iterable[dict | None], *, planned: int | None = None) -> dict:
    """One run's result from its batches' summaries (a batch that crashed has none).

    Parameters:
        planned: how many batches the plan made; the ones without a summary count as failed.
    Returns:
        The summary shape above plus ``batches`` (summaries seen), ``failedBatches`` and
        ``complete`` (no failed item, no busy item, no failed batch).
    """
    total: dict[str, Any] = {
        kind.total_key: 0,
        "successCount": 0,
        "errorCount": 0,
        "skippedCount": 0,
        "busyCount": 0,
        **{name: 0 for name in kind.counters},
    }
    if kind.changed_key:
        total[kind.changed_key] = []
    total["results"] = []
    seen = failed = 0
    for summary in summaries:
        if not summary:
            continue
        seen += 1
        failed += bool(summary.get("batchFailed"))
        for key in (
            kind.total_key,
            "successCount",
            "errorCount",
            "skippedCount",
            "busyCount",
            *kind.counters,
        ):
            total[key] += summary.get(key, 0)
        if kind.changed_key:
            total[kind.changed_key] += summary.get(kind.changed_key, [])
        total["results"] += summary.get("results", [])
        total["resultsOmitted"] = total.get("resultsOmitted", 0) + summary.get("resultsOmitted", 0)
    if kind.changed_key:
        total[kind.changed_key] = sorted(set(total[kind.changed_key]))
    if kind.max_results is not None and len(total["results"]) > kind.max_results:
        total["resultsOmitted"] += len(total["results"]) - kind.max_results
        total["results"] = total["results"][: kind.max_results]
    if not total.get("resultsOmitted"):
        total.pop("resultsOmitted", None)
    total["batches"] = seen
    total["failedBatches"] = failed + max(0, (planned if planned is not None else seen) - seen)
    total["complete"] = not (total["errorCount"] or total["busyCount"] or total["failedBatches"])
    return total


def plan_batches(
    ids: Sequence[int],
    *,
    noun: str = "items",
    min_size: int = 50,
    max_size: int = 500,
    target_count: int = 16,
    extra: dict[str, Any] | None = None,
) -> list[dict]:
    """Cut ``ids`` into batches of ``min_size``..``max_size`` items, labelled for the UI.

    Aims at ``target_count`` batches (enough to keep every worker busy) and grows batches up
    to ``max_size`` before adding more, since each task instance costs Airflow overhead:
    10,000 ids make 20 batches of 500; 1,000 make 16 of 63; 100 make 2 of 50.

    Returns:
        ``[{"label": "calendars 1-500 (500)", "ids": [...], **extra}, ...]``
    """
    if not ids:
        return []
    size = min(max_size, max(min_size, math.ceil(len(ids) / target_count)))
    batches = []
    for start in range(0, len(ids), size):
        chunk = list(ids[start : start + size])
        batches.append(
            {"label": f"{noun} {chunk[0]}-{chunk[-1]} ({len(chunk)})", "ids": chunk, **(extra or {})}
        )
    return batches


_INFRA_ERRORS: tuple[type[BaseException], ...] = ()


def infrastructure_errors() -> tuple[type[BaseException], ...]:
    """Faults of our own database and Redis (``psycopg.Error``, ``redis.RedisError``): at the item
    boundary they are re-raised, failing the batch (retried), never counted against one item."""
    global _INFRA_ERRORS
    if not _INFRA_ERRORS:
        import psycopg
        import redis

        _INFRA_ERRORS = (psycopg.Error, redis.RedisError)
    return _INFRA_ERRORS


def map_items(
    connect: Callable[[], AbstractContextManager],
    ids: Sequence[int],
    work: Callable[[Any, int], ItemResult],
    *,
    parallel: int,
    name: str = "item",
) -> list[ItemResult]:
    """``work(conn, id)`` for each of ``ids``, up to ``parallel`` at once (threads: the work is
    network-bound), each thread on its own database connection from ``connect()`` (a context
    manager), opened on first use and closed at the end. One result per id, in order; an
    exception ``work`` raises (only infrastructure faults should) propagates after the others end.
    """
    local = threading.local()
    opened: list[AbstractContextManager] = []
    lock = threading.Lock()

    def one(item_id: int) -> ItemResult:
        conn = getattr(local, "conn", None)
        if conn is None:
            manager = connect()
            conn = local.conn = manager.__enter__()
            with lock:
                opened.append(manager)
        return work(conn, item_id)

    try:
        workers = max(1, min(parallel, len(ids) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
            return list(pool.map(one, ids))
    finally:
        for manager in opened:
            manager.__exit__(None, None, None)


def rollback_quietly(conn) -> None:
    """Roll back after an item's failure; a connection that is gone says so at its next statement."""
    try:
        conn.rollback()
    except Exception:  # noqa: BLE001 - the connection itself failed: nothing to roll back
        pass

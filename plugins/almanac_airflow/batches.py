"""The mapped-batch pattern, Airflow half: plan -> mapped work over batches -> summary (+ Asset).

A per-entity job is a planner task plus a per-item domain function::

    @dag(...)
    def my_job():
        @task
        def plan_batches() -> list[dict]:
            ids = ...                                   # who is due (domain query)
            return plan_batches_of(ids, noun="members", ...)   # almanac.batches.plan_batches

        mapped_batches(plan_batches(), kind="almanac.my_job:MY_KIND", work="almanac_airflow.my_job:work",
                       failure_percent=lambda settings: settings.my_job_failure_percent)

``work(batch, context)`` returns one ``almanac.batches.ItemResult`` per item and never raises
for an item's own fault. Wiring:

- ``<task_id>`` mapped over the plan, one task instance per batch, labelled in the UI by the
  batch's ``label``. It pushes its summary to XCom key ``summary`` *before* judging it, so a
  failed batch still reports every item. It fails when more than ``failure_percent`` of its
  items failed: with ``BatchPermanentlyFailedError`` (a ``PermanentError``: the shared retry
  policy fails it at once) when every failure was permanent, with a retryable error otherwise.
- ``summarize`` (``all_done``): fails the run when the plan failed, or any batch failed or
  left no summary; otherwise returns the run total (``almanac.batches.combine_summaries``),
  also pushed under XCom key ``total``. ``total["complete"]`` is false when any item failed
  or was busy, and its log line says so.
- ``announce_changes`` (``all_done``, optional): emits ``announce`` with
  ``{"<ids key>": [...]}`` naming the items whose status is ``updated``, and skips when
  none. Both are leaves, so the run's state is ``summarize``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from almanac.batches import ItemResult, Kind, combine_summaries, summarize_batch
from almanac.errors import PermanentError, RetryableError
from almanac.imports import resolve

__all__ = [
    "BatchFailedError",
    "BatchPermanentlyFailedError",
    "batch_summaries",
    "mapped_batches",
    "run_batch",
    "summarize_run",
]

log = logging.getLogger(__name__)


class BatchFailedError(RetryableError):
    """More items of a batch failed than the job's failure threshold allows (some retryable).

    What to do: read the batch's ``summary`` XCom (each failed item with its error). The same
    error everywhere usually means a shared cause: DNS, a proxy, a provider down.
    """


class BatchPermanentlyFailedError(PermanentError):
    """More items of a batch failed than allowed, and every failure was permanent: not retried.

    What to do: fix the inputs named in the batch's ``summary`` XCom (feeds, grants, settings).
    """


def _counts_line(kind: Kind, summary: dict) -> str:
    counters = " ".join(f"{name}={summary.get(name, 0)}" for name in kind.counters)
    return (
        f"{summary[kind.total_key]} {kind.noun.lower()}: {summary['successCount']} ok, "
        f"{summary['errorCount']} failed ({summary['busyCount']} busy), "
        f"{summary['skippedCount']} skipped; {counters}"
    )


def run_batch(
    kind: Kind, batch: dict, context, work: Callable[[dict, Any], list[ItemResult]], *, failure_percent: int
) -> dict:
    """Run ``work`` over one batch; push and return its summary; fail the task if too many failed."""
    results = work(batch, context)
    summary = summarize_batch(kind, results, failure_percent=failure_percent)
    context["ti"].xcom_push(key="summary", value=summary)
    log.info("batch %s: %s", batch.get("label"), _counts_line(kind, summary))
    if summary["batchFailed"]:
        first = next((r for r in summary["results"] if r["status"] in ("error", "held", "busy")), None)
        message = (
            f"{summary['errorCount']} of {summary[kind.total_key]} {kind.noun.lower()} failed "
            f"(> {failure_percent}%); first: {first}"
        )
        if summary["permanentOnly"]:  # the shared retry policy fails it without retries
            raise BatchPermanentlyFailedError(f"{message}; every failure is permanent, not retrying")
        raise BatchFailedError(message)
    return summary


def batch_summaries(ti, task_id: str) -> list[dict]:
    """The summaries the mapped task ``task_id`` of this run pushed (one per batch that got that far)."""
    pulled = ti.xcom_pull(task_ids=task_id, key="summary")
    return [s for s in ([pulled] if isinstance(pulled, dict) else list(pulled or [])) if s]


def summarize_run(
    kind: Kind, context, *, plan_task_id: str, work_task_id: str, alert_percent: int | None = None
) -> dict:
    """Sum the run's batch summaries; raise when the plan or any batch failed, or (with
    ``alert_percent``) when more than that share of the run's items failed (after pushing ``total``)."""
    from airflow.sdk.exceptions import AirflowFailException

    ti = context["ti"]
    plan = ti.xcom_pull(task_ids=plan_task_id)
    if plan is None:  # the planner failed (or was skipped): nothing was done, the run must show it
        raise AirflowFailException(f"{plan_task_id} did not succeed; nothing was done")
    total = combine_summaries(kind, batch_summaries(ti, work_task_id), planned=len(plan))
    ti.xcom_push(key="total", value=total)
    log.info(
        "%s: %s; %d of %d batch(es) failed; %s",
        ti.dag_id,
        _counts_line(kind, total),
        total["failedBatches"],
        len(plan),
        "complete" if total["complete"] else "NOT complete: see results",
    )
    if total["failedBatches"]:
        raise AirflowFailException(f"{total['failedBatches']} of {len(plan)} batches failed")
    failed = total["errorCount"] - total["busyCount"]
    if alert_percent is not None and failed and 100 * failed / max(1, total[kind.total_key]) > alert_percent:
        raise AirflowFailException(
            f"{failed} of {total[kind.total_key]} {kind.noun.lower()} failed (> {alert_percent}%): "
            "see this task's 'total' XCom for each one's error"
        )
    return total


def announced_ids(kind: Kind, context, *, work_task_id: str) -> list[int]:
    """The ids every batch of this run reported ``updated`` (failed batches included)."""
    return sorted(
        {i for s in batch_summaries(context["ti"], work_task_id) for i in s.get(kind.changed_key, [])}
    )


def mapped_batches(
    plan,
    *,
    kind: Kind | str,
    work: Callable[[dict, Any], list[ItemResult]] | str,
    failure_percent: Callable[[Any], int],
    task_id: str = "work_batch",
    alert_percent: Callable[[Any], int] | None = None,
    also: list | None = None,
    announce=None,
    announce_key: str | None = None,
    **work_task_kwargs: Any,
):
    """Wire the shared tasks after a DAG's planner task (call inside a ``@dag``).

    Parameters:
        plan: the planner's XComArg (a list of batch dicts with ``label``).
        kind: names of the job's items (``almanac.batches.Kind``), or its import path
            ``"almanac.x.y:KIND"``, imported only when a task runs (domain modules may import
            database drivers; DAG files must not).
        work: ``(batch, context) -> list[ItemResult]``, or its import path; runs inside the
            mapped task.
        failure_percent: ``settings -> int``, the batch failure threshold.
        alert_percent: ``settings -> int``, optional: ``summarize`` fails the run (no retry: the
            failure notifier alerts) when more than this share of all items failed. For jobs
            whose failed items are recorded and retried by a later run, so a batch is not
            retried for them (use ``failure_percent=lambda s: 100`` with it).
        task_id: the mapped task's id (``sync_batch``, ``push_batch`` ...).
        announce: an Asset to emit naming the changed ids (``kind.changed_key`` needed).
        announce_key: the key of the ids in the asset event's extra (default ``calendar_ids``).
        also: more tasks (``all_done``, reading ``batch_summaries``) to run after the batches as
            leaves of their own, beside ``summarize`` (not after it: the run's state stays
            ``summarize``'s, whatever they end as).
        work_task_kwargs: per-task limits for the mapped task (``pool``, ``max_active_tis_per_dag``...).
    Returns:
        The ``summarize`` XComArg.
    """
    from airflow.sdk import get_current_context, task

    from almanac_airflow.settings import load_settings

    plan_task_id = plan.operator.task_id

    @task(task_id=task_id, map_index_template="{{ batch_label }}", **work_task_kwargs)
    def work_batch(batch: dict) -> dict:
        context = get_current_context()
        context["batch_label"] = batch.get("label", "")
        threshold = failure_percent(load_settings())
        return run_batch(resolve(kind), batch, context, resolve(work), failure_percent=threshold)

    @task(trigger_rule="all_done")
    def summarize() -> dict:
        alert = alert_percent(load_settings()) if alert_percent is not None else None
        return summarize_run(
            resolve(kind),
            get_current_context(),
            plan_task_id=plan_task_id,
            work_task_id=task_id,
            alert_percent=alert,
        )

    batches = work_batch.expand(batch=plan)
    total = summarize()
    leaves = [total]
    if announce is not None:
        key = announce_key or "calendar_ids"

        @task(task_id="announce_changes", outlets=[announce], trigger_rule="all_done")
        def announce_changes() -> list[int]:
            from airflow.sdk.exceptions import AirflowSkipException

            context = get_current_context()
            changed = announced_ids(resolve(kind), context, work_task_id=task_id)
            if not changed:
                raise AirflowSkipException("nothing changed: no asset event")
            context["outlet_events"][announce].extra = {key: changed}
            return changed

        leaves.append(announce_changes())
    leaves += list(also or [])
    batches >> leaves
    return total

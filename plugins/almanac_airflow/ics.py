"""The task bodies every ICS sync DAG shares: sync a batch of calendars, sum up a run."""

from __future__ import annotations

import logging

from almanac.errors import RetryableError

__all__ = ["BatchFailedError", "announce_changes", "summarize_run", "sync_calendars", "sync_pipeline"]

log = logging.getLogger(__name__)


class BatchFailedError(RetryableError):
    """More calendars of a batch failed than ``ics_batch_failure_percent`` allows.

    What to do: read the batch's ``summary`` XCom (each failed calendar with its error). A
    shared cause (DNS, proxy, a feed host down) usually shows in the first few.
    """


def sync_calendars(calendar_ids: list[int], context) -> dict:
    """Sync ``calendar_ids`` for the current task's run; push and return the batch summary.

    The summary is pushed under XCom key ``summary`` before the failure check, so a failed
    batch still reports what happened to each of its calendars.
    """
    from almanac.ics.sync import sync_batch
    from almanac_airflow.hooks import app_db, redis_client
    from almanac_airflow.runs import interval_end
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    redis = redis_client()
    with app_db() as conn:
        result = sync_batch(
            conn,
            calendar_ids,
            instant=interval_end(context),
            settings=settings,
            redis=redis,
            allow_hosts=settings.ics_allow_host_set,
        )
    summary = result.summary()
    failed_percent = 100 * summary["errorCount"] / max(1, summary["totalCalendars"])
    summary["batchFailed"] = failed_percent > settings.ics_batch_failure_percent
    context["ti"].xcom_push(key="summary", value=summary)
    log.info(
        "batch: %d calendars, %d ok, %d failed, %d skipped; events +%d ~%d -%d",
        summary["totalCalendars"], summary["successCount"], summary["errorCount"], summary["skippedCount"],
        summary["eventsAdded"], summary["eventsUpdated"], summary["eventsDeleted"],
    )
    if summary["batchFailed"]:
        first = next((r for r in summary["results"] if r["status"] in ("error", "held")), None)
        raise BatchFailedError(
            f"{summary['errorCount']} of {summary['totalCalendars']} calendars failed "
            f"({failed_percent:.0f}% > {settings.ics_batch_failure_percent}%); first: {first}"
        )
    return summary


def summarize_run(context) -> dict:
    """Sum the run's batch summaries (XCom key ``summary``) into the spec's result shape.

    Runs with ``trigger_rule="all_done"``: a batch that failed still pushed its summary; one
    that crashed is counted in ``failedBatches``. Raises after pushing ``total`` when any
    batch (or the plan) failed: it is a leaf task, so the run shows failed.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from almanac.ics.sync import combine_summaries

    ti = context["ti"]
    plan = ti.xcom_pull(task_ids="plan_batches")
    if plan is None:  # planning failed (e.g. an unknown calendar_id): the run must show failed
        raise AirflowFailException("plan_batches did not succeed; nothing was synced")
    planned = len(plan)
    summaries = _batch_summaries(ti)
    total = combine_summaries(summaries)
    total["failedBatches"] = planned - len(summaries) + sum(bool(s.get("batchFailed")) for s in summaries)
    ti.xcom_push(key="total", value=total)
    log.info(
        "%s: %d calendars, %d ok, %d failed, %d skipped; events +%d ~%d -%d; %d failed batch(es)",
        ti.dag_id, total["totalCalendars"], total["successCount"], total["errorCount"], total["skippedCount"],
        total["eventsAdded"], total["eventsUpdated"], total["eventsDeleted"], total["failedBatches"],
    )
    if total["failedBatches"]:
        raise AirflowFailException(f"{total['failedBatches']} of {planned} batches failed")
    return total


def _batch_summaries(ti) -> list[dict]:
    """The ``summary`` XComs of this run's ``sync_batch`` task instances (failed ones too)."""
    pulled = ti.xcom_pull(task_ids="sync_batch", key="summary")
    return [s for s in ([pulled] if isinstance(pulled, dict) else list(pulled or [])) if s]


def announce_changes(context, asset) -> list[int]:
    """Emit ``asset`` naming the calendars whose events changed; skip when none did."""
    from airflow.sdk.exceptions import AirflowSkipException

    changed = sorted({cid for summary in _batch_summaries(context["ti"]) for cid in summary["changedCalendarIds"]})
    if not changed:
        raise AirflowSkipException("no calendar changed: no asset event")
    context["outlet_events"][asset].extra = {"calendar_ids": changed}
    return changed


def sync_pipeline(batches) -> None:
    """Wire the tasks every ICS sync DAG shares after its ``plan_batches`` task.

    ``sync_batch`` (mapped over ``batches``, one task instance per batch) >> both
    ``summarize`` and ``announce_changes`` (emits ``ICS_CALENDARS_CHANGED``). Both are leaves
    with ``trigger_rule="all_done"``: a failed batch or plan fails ``summarize`` and so the
    run, while the calendars that did change are still announced. Call inside a ``@dag``.
    """
    from airflow.sdk import get_current_context, task

    from almanac_airflow.assets import ICS_CALENDARS_CHANGED

    @task(map_index_template="{{ batch_label }}")
    def sync_batch(batch: dict) -> dict:
        context = get_current_context()
        context["batch_label"] = batch["label"]
        return sync_calendars(batch["calendar_ids"], context)

    @task(trigger_rule="all_done")  # AirflowFailException inside: fails without retrying
    def summarize() -> dict:
        return summarize_run(get_current_context())

    @task(task_id="announce_changes", outlets=[ICS_CALENDARS_CHANGED], trigger_rule="all_done")
    def announce() -> list[int]:
        return announce_changes(get_current_context(), ICS_CALENDARS_CHANGED)

    sync_batch.expand(batch=batches) >> [summarize(), announce()]

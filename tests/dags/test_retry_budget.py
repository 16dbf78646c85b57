"""Every task has the shared retry policy, and every scheduled DAG's retries end inside one period.

``ics_sync`` runs every 5 minutes: its old 1/2/4-minute backoff outlived the window it was
syncing. The budget is the worst case of Airflow's exponential backoff (each wait at most
``retry_delay * 2**n``, capped by ``max_retry_delay``), summed over the retries.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(p for p in (ROOT / "dags").glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors
    return bag


def worst_case_retry_wait(task) -> timedelta:
    total = timedelta()
    for n in range(task.retries):
        wait = task.retry_delay * (2**n if task.retry_exponential_backoff else 1)
        if task.max_retry_delay:
            wait = min(wait, task.max_retry_delay)
        total += wait
    return total


def schedule_period(dag) -> timedelta | None:
    """The shortest gap between two scheduled runs, from the timetable itself (None: not time-based)."""
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.base import DataInterval, TimeRestriction

    timetable = coerce_to_core_timetable(dag.timetable)  # the scheduler's view of the DAG's schedule
    inner = getattr(timetable, "timetable", timetable)  # AssetOrTimeSchedule wraps a time table
    if not getattr(inner, "periodic", False) or not hasattr(inner, "next_dagrun_info"):
        return None
    import pendulum

    start = pendulum.datetime(2026, 6, 1, tz="UTC")
    restriction = TimeRestriction(earliest=start, latest=None, catchup=True)
    first = inner.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    second = inner.next_dagrun_info(
        last_automated_data_interval=DataInterval(first.data_interval.start, first.data_interval.end),
        restriction=restriction,
    )
    if first is None or second is None:
        return None
    return second.run_after - first.run_after


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=[p.stem for p in DAG_FILES])
def test_every_task_has_the_shared_retry_policy(dagbag, dag_file):
    from almanac_airflow.defaults import RETRY_POLICY

    dag = dagbag.get_dag(dag_file.stem)
    missing = [t.task_id for t in dag.tasks if getattr(t, "retry_policy", None) is not RETRY_POLICY]
    assert not missing, f"{dag.dag_id}: tasks without the shared retry_policy: {missing}"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=[p.stem for p in DAG_FILES])
def test_retries_end_inside_one_schedule_period(dagbag, dag_file):
    dag = dagbag.get_dag(dag_file.stem)
    period = schedule_period(dag)
    if period is None:
        pytest.skip(f"{dag.dag_id} is not time-scheduled")
    too_long = {
        t.task_id: str(worst_case_retry_wait(t)) for t in dag.tasks if worst_case_retry_wait(t) > period / 2
    }
    assert not too_long, f"{dag.dag_id} runs every {period}; retry waits exceed half of it: {too_long}"


def test_the_budget_check_can_fail():
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG, CronTriggerTimetable

    with DAG(
        "too_slow",
        schedule=CronTriggerTimetable("*/5 * * * *", timezone="UTC"),
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
    ) as dag:
        task = EmptyOperator(
            task_id="t", retries=3, retry_delay=timedelta(minutes=1), retry_exponential_backoff=True
        )
    assert schedule_period(dag) == timedelta(minutes=5)
    assert worst_case_retry_wait(task) == timedelta(minutes=7) > schedule_period(dag) / 2

"""What a task needs to know about its DAG run, read from the Airflow context."""

from __future__ import annotations

from datetime import datetime

__all__ = ["interval_end"]


def interval_end(context) -> datetime:
    """The instant a job works up to: the run's data interval end.

    A manual run triggered without a logical date has no data interval; it works up to its
    ``run_after`` (the instant it was triggered), which a retry or rerun of that run keeps,
    so the result stays repeatable. Never the wall clock.
    """
    end = context.get("data_interval_end")
    if end is None:
        end = context["dag_run"].run_after
    return end

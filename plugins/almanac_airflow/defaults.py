"""Default task arguments and tags every Almanac DAG uses."""

from __future__ import annotations

from datetime import timedelta

from almanac_airflow.notifiers import AlmanacFailureNotifier

__all__ = ["DEFAULT_ARGS", "OWNER", "default_args"]

OWNER = "almanac"

#: Every task: 3 retries with exponential backoff (1 min, 2 min, 4 min ... capped at 30 min),
#: a 30-minute ceiling per try, and one failure notifier after the last try.
DEFAULT_ARGS: dict = {
    "owner": OWNER,
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(minutes=30),
    "on_failure_callback": AlmanacFailureNotifier(),
}


def default_args(**overrides) -> dict:
    """``DEFAULT_ARGS`` with per-DAG overrides (e.g. a shorter ``execution_timeout``)."""
    return {**DEFAULT_ARGS, **overrides}

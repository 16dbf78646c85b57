"""Default task arguments every Almanac DAG uses, with a retry budget that fits its schedule."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

from almanac_airflow.notifiers import AlmanacFailureNotifier

__all__ = ["DEFAULT_ARGS", "OWNER", "RETRY_POLICY", "default_args", "retry_budget"]

OWNER = "almanac"

#: The one place Almanac's errors meet Airflow's retries (Airflow 3.3 ``retry_policy``): a
#: ``PermanentError`` (bad input, missing setting or connection, revoked grant, a batch whose
#: failures are all permanent) fails the task at once; retrying it would fail the same way.
#: Everything else (``RetryableError``, database and Redis faults) gets the task's retries.
RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(
            exception="almanac.errors.PermanentError",
            action=RetryAction.FAIL,
            reason="permanent error: a retry of the same input fails the same way",
        ),
    ],
)

#: Every task: 3 retries with exponential backoff (1 min, 2 min, 4 min ... capped at 30 min),
#: a 30-minute ceiling per try, no retry for permanent errors, and one failure notifier after
#: the last try. DAGs that run
#: often pass ``every=`` so their retries end well inside one schedule period.
DEFAULT_ARGS: dict = {
    "owner": OWNER,
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(minutes=30),
    "on_failure_callback": AlmanacFailureNotifier(),
    "retry_policy": RETRY_POLICY,
}


def retry_budget(every: timedelta) -> dict:
    """Retry arguments whose waits add up to at most a third of ``every`` (the schedule period).

    Two retries, the first after a tenth of the period (at most a minute), the second after
    twice that (at most a quarter of the period): 5 minutes -> 30 s then 60 s; 1 minute ->
    6 s then 12 s. Longer periods keep ``DEFAULT_ARGS``. Airflow adds up to ~10% jitter.
    """
    if every >= timedelta(hours=2):
        return {}
    first = min(timedelta(minutes=1), every / 10)
    return {
        "retries": 2,
        "retry_delay": first,
        "retry_exponential_backoff": True,
        "max_retry_delay": min(first * 2, every / 4),
    }


def default_args(*, every: timedelta | None = None, **overrides) -> dict:
    """``DEFAULT_ARGS`` with the retry budget of a DAG run ``every`` period, then ``overrides``."""
    return {**DEFAULT_ARGS, **(retry_budget(every) if every else {}), **overrides}

"""The one retry policy: attempts, exponential backoff, and one ``Retry-After`` parser.

Used by every client that calls a service over the network (the ICS fetcher, the Google
client, and the providers after them). Inside one task an item is retried a few times with
short waits; the task's own Airflow retries (``almanac_airflow.defaults``) sit on top and
must fit the DAG's schedule.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from almanac.errors import RetryableError

__all__ = ["MAX_RETRY_AFTER_S", "RetryPolicy", "parse_retry_after", "retry_call"]

T = TypeVar("T")

#: Longest ``Retry-After`` we ever read (a day); a larger value is clamped, never an overflow.
MAX_RETRY_AFTER_S = 86_400.0


def parse_retry_after(value: object, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3); None if absent or unreadable.

    Delta-seconds or an HTTP-date. Defensive: hundreds of digits, negative numbers,
    fractions, garbage and dates beyond the representable range give None or a clamped
    value, never an exception. A date in the past gives 0; anything above a day is a day.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).strip()
    if not text or len(text) > 64:
        return MAX_RETRY_AFTER_S if text.isdigit() else None
    if text.isdigit() and text.isascii():
        return min(float(int(text)), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    try:
        seconds = (when - now).total_seconds()
    except OverflowError:
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


@dataclass(frozen=True)
class RetryPolicy:
    """How one call is retried inside a task.

    Parameters:
        attempts: tries in all (1 = no retry).
        base_wait_s: first backoff; doubled each attempt.
        max_wait_s: longest single wait; a server's ``Retry-After`` is capped to it.
        timeout_s: per-request socket timeout the client applies.
    """

    attempts: int = 3
    base_wait_s: float = 1.0
    max_wait_s: float = 30.0
    timeout_s: float = 30.0

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        if retry_after is None:
            wait = self.base_wait_s * 2 ** min(attempt - 1, 30)
        else:
            wait = retry_after
        return min(max(wait, 0.0), self.max_wait_s)


def retry_call(
    call: Callable[[], T], policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, RetryableError, float], None] | None = None,
) -> T:
    """``call()``, retried on ``RetryableError`` per ``policy``; the last error propagates.

    The error's ``retry_after`` attribute (seconds), when set, replaces the backoff.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except RetryableError as exc:
            if attempt >= policy.attempts:
                raise
            wait = policy.wait(attempt, getattr(exc, "retry_after", None))
            if on_retry is not None:
                on_retry(attempt, exc, wait)
            sleep(wait)
    raise AssertionError("unreachable")

"""almanac.retry: the one Retry-After parser and backoff policy, defensive against hostile headers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from almanac.errors import PermanentError, RetryableError
from almanac.retry import MAX_RETRY_AFTER_S, RetryPolicy, parse_retry_after, retry_call

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        (b"5", 5.0),
        ("Tue, 01 Dec 2026 12:00:30 GMT", 30.0),
        ("Tue, 01 Dec 2026 11:00:00 GMT", 0.0),  # in the past
        ("9" * 400, MAX_RETRY_AFTER_S),  # hundreds of digits: clamped, no OverflowError
        ("99999999999", MAX_RETRY_AFTER_S),
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER_S),
        (None, None),
        ("", None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("Mon, 99 Foo 0000 99:99:99 GMT", None),
        ("٣", None),  # a non-ASCII digit
        ("x" * 10_000, None),
    ],
)
def test_parse_retry_after_never_raises(value, expected):
    assert parse_retry_after(value, now=NOW) == expected


def test_policy_backs_off_exponentially_and_caps_every_wait():
    policy = RetryPolicy(attempts=5, base_wait_s=1, max_wait_s=5)
    assert [policy.wait(n) for n in (1, 2, 3, 4, 100)] == [1, 2, 4, 5, 5]
    assert policy.wait(1, retry_after=3600) == 5 and policy.wait(1, retry_after=0) == 0


class Flaky(RetryableError):
    def __init__(self, retry_after=None):
        super().__init__("flaky")
        self.retry_after = retry_after


def test_retry_call_retries_retryable_errors_then_gives_up():
    calls, waits = [], []

    def call():
        calls.append(1)
        raise Flaky(retry_after=2 if len(calls) == 1 else None)

    with pytest.raises(Flaky):
        retry_call(call, RetryPolicy(attempts=3, base_wait_s=1, max_wait_s=10), sleep=waits.append)
    assert len(calls) == 3 and waits == [2, 2]  # Retry-After first, then backoff (attempt 2 -> 2 s)


def test_retry_call_never_retries_a_permanent_error():
    calls = []

    def call():
        calls.append(1)
        raise PermanentError("no")

    with pytest.raises(PermanentError):
        retry_call(call, RetryPolicy(attempts=3), sleep=lambda s: None)
    assert calls == [1]

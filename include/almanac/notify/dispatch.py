"""Notifications: dispatch — claim due rows of one channel, send them through its sender, record
what each came to. ``notification_dispatch`` runs this per channel in mapped tasks.

Per row the steps are: resolve the recipient (or settle it ``skipped``), the user's rate limit
(limited: back to the outbox, due when the window allows), the provider's rate limit (wait),
``mark_started`` (committed), the send, ``record_outcomes`` (committed). Sends run
``notify_parallel_sends`` at a time, each thread with its own sender (an SMTP session is not
shared). A sender that raises instead of answering is treated as an unknown outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from almanac.notify.outbox import (
    RESEND_SAFE_CHANNELS,
    Claimed,
    claim,
    disable_devices,
    mark_started,
    record_outcomes,
    release,
    release_expired,
    resolve,
)
from almanac.notify.types import Message, SendResult
from almanac.retry import RetryPolicy
from almanac.settings import Settings

__all__ = ["COUNTERS", "Sender", "dispatch_channel", "empty_counts"]

log = logging.getLogger(__name__)

#: The per-channel result of a run (the issue's shape).
_GONE = "the provider answered UNREGISTERED (the app was removed or the token expired)"
COUNTERS = ("sent", "failed", "dead", "skipped", "uncertain", "rateLimited")


class Sender(Protocol):
    def send(self, message: Message) -> SendResult: ...

    def close(self) -> None: ...


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def _policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(base_wait_s=settings.notify_backoff_base_s, max_wait_s=settings.notify_backoff_max_s)


def dispatch_channel(
    conn,
    channel: str,
    sender_factory: Callable[[], Sender],
    *,
    owner: str,
    settings: Settings,
    limiter: Any = None,
    linger: bool = False,
    wakeups: Any = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, int]:
    """Send what is due on ``channel`` until nothing is due or ``notify_run_budget_s`` is spent.

    Parameters:
        conn: psycopg connection to the application DB (committed row by row group).
        sender_factory: makes one sender (called once per sending thread; closed at the end).
        owner: who claims (task instance and try), written on claimed rows.
        limiter: a ``NotifyLimiter`` (None: no rate limits).
        linger: when nothing is due, keep waiting for arrivals until the budget is spent (the
            first worker of a scheduled run), rather than returning.
        wakeups: a Redis client: a lingering worker wakes on ``almanac.notify.wakeups`` entries
            at once (it reads the stream without consuming it); it also looks at the outbox every
            ``notify_idle_poll_ms``, so a message enqueued without a wake-up is not left waiting.
    Returns:
        ``{sent, failed, dead, skipped, uncertain, rateLimited}`` for this task.
    Raises:
        Only infrastructure faults (database, Redis); every provider answer is a row outcome.
    """
    counts = empty_counts()
    max_attempts = getattr(settings, f"notify_{channel}_attempts")
    policy = _policy(settings)
    deadline = clock() + settings.notify_run_budget_s
    parallel = max(1, settings.notify_parallel_sends)
    local = threading.local()
    senders: list[Sender] = []
    lock = threading.Lock()

    def send(message: Message) -> SendResult:
        sender = getattr(local, "sender", None)
        try:
            if sender is None:
                sender = local.sender = sender_factory()
                with lock:
                    senders.append(sender)
            return sender.send(message)
        except Exception as exc:  # a sender bug or a library surprise: the outcome is unknown
            log.exception("notification %s: the %s sender raised", message.notification_id, channel)
            outcome = "failed" if channel in RESEND_SAFE_CHANNELS else "uncertain"
            return SendResult(outcome, error=f"unexpected {type(exc).__name__} in the sender: {exc}"[:500])

    def settle(pairs: list[tuple[Claimed, SendResult]]) -> None:
        for status, n in record_outcomes(
            conn, pairs, owner=owner, policy=policy, max_attempts=max_attempts
        ).items():
            counts[status] = counts.get(status, 0) + n
        dead = [t for _, result in pairs for t in result.dead_tokens]
        if dead:
            disabled = disable_devices(conn, dead, _GONE)
            log.info("%s: disabled %d push device(s) the provider no longer knows", channel, disabled)

    def admit(wave: list[Claimed]) -> list[Claimed]:
        """The rows of ``wave`` the rate limits let go now; the others go back to the outbox."""
        if limiter is None:
            return wave
        admitted = []
        for row, wait in zip(wave, limiter.user_waits(channel, [r.user_id for r in wave]), strict=True):
            if wait > 0:
                counts["rateLimited"] += release(
                    conn,
                    [row.id],
                    owner=owner,
                    not_before_s=wait,
                    reason=f"rate limited: at most {_per_user(settings, channel)} {channel} "
                    "per user per hour; due again when the window allows",
                )
            else:
                admitted.append(row)
        if admitted:
            granted = limiter.provider_slots(
                channel, len(admitted), deadline=deadline, clock=clock, sleep=sleep
            )
            if granted < len(admitted):  # the run's time is up while waiting for the window
                late = [r.id for r in admitted[granted:]]
                counts["rateLimited"] += release(conn, late, owner=owner, not_before_s=1)
                admitted = admitted[:granted]
        return admitted

    # Waves of ``parallel`` sends, pipelined: while one wave is with the providers, the next is
    # admitted and the previous one's outcomes are written. A wave is handed over (committed)
    # only once the wave before it has answered, so at most one wave is in flight at a time.
    in_flight: tuple[list[Claimed], list[Future]] | None = None

    def collect() -> list[tuple[Claimed, SendResult]]:
        nonlocal in_flight
        if in_flight is None:
            return []
        rows, futures = in_flight
        in_flight = None
        return list(zip(rows, [f.result() for f in futures], strict=True))

    release_expired(conn, channel=channel)
    last_seen = "$"
    with ThreadPoolExecutor(parallel, thread_name_prefix=f"notify-{channel}") as pool:
        try:
            while clock() < deadline:
                rows = claim(
                    conn,
                    channel,
                    limit=settings.notify_claim_batch,
                    owner=owner,
                    lease_s=settings.notify_lease_s,
                )
                if not rows:
                    settle(collect())
                    if not linger:
                        break
                    last_seen = _wait_for_work(
                        wakeups,
                        min(settings.notify_idle_poll_ms / 1000, deadline - clock()),
                        last_seen,
                        sleep,
                    )
                    continue
                resolved = resolve(conn, rows)
                settle([(r, resolved[r.id]) for r in rows if isinstance(resolved[r.id], SendResult)])
                todo = [r for r in rows if isinstance(resolved[r.id], Message)]
                while todo:
                    wave, todo = todo[:parallel], todo[parallel:]
                    if clock() >= deadline:
                        release(conn, [r.id for r in wave + todo], owner=owner, not_before_s=0)
                        todo = []
                        break
                    admitted = admit(wave)
                    answered = collect()  # the wave in flight has answered ...
                    started = set(mark_started(conn, [r.id for r in admitted], owner=owner))
                    admitted = [r for r in admitted if r.id in started]
                    if admitted:  # ... so the next one is handed over, and the answers written
                        in_flight = (admitted, [pool.submit(send, resolved[r.id]) for r in admitted])
                    settle(answered)
            settle(collect())
        finally:
            for sender in senders:
                try:
                    sender.close()
                except Exception:  # closing a dead session must not hide the run's result
                    log.debug("closing a %s sender failed", channel, exc_info=True)
    log.info("%s: %s", channel, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def _wait_for_work(wakeups, timeout_s: float, last_seen: str, sleep: Callable[[float], None]) -> str:
    """Block until a wake-up entry arrives or ``timeout_s`` passes; returns the last entry id seen."""
    if timeout_s <= 0:
        return last_seen
    if wakeups is None:
        sleep(timeout_s)
        return last_seen
    from almanac.notify.wakeups import STREAM_KEY

    reply = wakeups.xread({STREAM_KEY: last_seen}, count=100, block=max(1, int(timeout_s * 1000)))
    for _stream, entries in reply or []:
        if entries:
            last = entries[-1][0]
            last_seen = last.decode() if isinstance(last, bytes) else last
    return last_seen


def _per_user(settings: Settings, channel: str) -> int:
    return getattr(settings, f"notify_{channel}_per_user_per_hour")

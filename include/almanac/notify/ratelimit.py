"""Notifications: rate limits held in Redis across every worker (the ``limits`` library).

Two limits per channel, both from ``Settings``: the provider's (``notify_<channel>_per_second``, all
users together) and each user's (``notify_<channel>_per_user_per_hour``). A limited notification
waits: the dispatcher gives it back to the outbox due again when the user's window allows, or
sleeps briefly for the provider's window. Each send attempt counts against both limits.

A wave's per-user hits go to Redis in one pipeline (``user_waits``): the same ``limits`` script,
keys and arguments as ``SlidingWindowCounterRateLimiter.hit``, one round trip instead of one per
message (``tests/integration/test_notify_ratelimit.py`` checks the two agree, key for key).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from limits import RateLimitItemPerHour, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter
from redis.exceptions import NoScriptError

from almanac.notify.types import CHANNELS
from almanac.settings import Settings

__all__ = ["KEY_PREFIX", "NotifyLimiter"]

KEY_PREFIX = "almanac:notify-limit"


class NotifyLimiter:
    """The two limits of each channel, over one Redis client (``redis.Redis``)."""

    def __init__(self, redis_client, settings: Settings, *, key_prefix: str = KEY_PREFIX) -> None:
        storage = RedisStorage(
            "redis://", connection_pool=redis_client.connection_pool, key_prefix=key_prefix
        )
        self._storage = storage
        # Provider limits: fixed one-second windows (one INCR each); per user: a sliding window,
        # so an hour's allowance cannot be spent twice across a window boundary.
        self._provider = FixedWindowRateLimiter(storage)
        self._user = SlidingWindowCounterRateLimiter(storage)
        self._per_second = {
            channel: RateLimitItemPerSecond(getattr(settings, f"notify_{channel}_per_second"))
            for channel in CHANNELS
        }
        self._per_user = {
            channel: RateLimitItemPerHour(getattr(settings, f"notify_{channel}_per_user_per_hour"))
            for channel in CHANNELS
        }

    def user_waits(self, channel: str, user_ids: list[int | None]) -> list[float]:
        """For each of ``user_ids`` in turn: 0 when that user may get one more ``channel`` message
        now (and counts it), else the seconds until their window allows one. A user twice counts
        twice, in order. Messages to an explicit address (``None``: no user) are only under the
        provider limit. The hits go to Redis in one pipeline."""
        item = self._per_user[channel]
        storage = self._storage
        script = storage.lua_acquire_sliding_window
        args = (item.amount, item.get_expiry(), 1)
        asked = [(i, str(uid)) for i, uid in enumerate(user_ids) if uid is not None]
        waits = [0.0] * len(user_ids)
        if not asked:
            return waits
        client = storage.get_connection()
        acquired: list = [None] * len(asked)
        pending = list(range(len(asked)))
        for attempt in (1, 2):
            with client.pipeline(transaction=False) as pipe:
                for j in pending:
                    key = item.key_for(channel, asked[j][1])
                    pipe.evalsha(
                        script.sha,
                        2,
                        storage.prefixed_key(storage._previous_window_key(key)),
                        storage.prefixed_key(storage._current_window_key(key)),
                        *args,
                    )
                replies = pipe.execute(raise_on_error=False)
            refused = []
            for j, reply in zip(pending, replies, strict=True):
                if isinstance(reply, NoScriptError):  # Redis restarted or flushed its scripts
                    refused.append(j)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    acquired[j] = reply
            if not refused:
                break
            if attempt == 2:
                raise NoScriptError(f"the limits script is still not loaded in Redis ({len(refused)} hits)")
            # Only the refused hits go again: the others counted (the pipeline is not atomic, so
            # another client may load the script between two of ours).
            client.script_load(script.script)
            pending = refused
        for (i, uid), ok in zip(asked, acquired, strict=True):
            if not ok:
                reset = self._user.get_window_stats(item, channel, uid).reset_time
                waits[i] = max(1.0, reset - time.time())
        return waits

    def provider_slot(
        self,
        channel: str,
        *,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> bool:
        """Wait for one send of ``channel`` under the provider limit; False if ``deadline``
        (a ``clock`` value) comes first."""
        item = self._per_second[channel]
        while not self._provider.hit(item, channel):
            reset = self._provider.get_window_stats(item, channel).reset_time
            pause = min(max(0.01, reset - time.time()), 1.0)
            if clock() + pause >= deadline:
                return False
            sleep(pause)
        return True

    def provider_slots(
        self,
        channel: str,
        n: int,
        *,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> int:
        """How many of ``n`` sends of ``channel`` may go now under the provider limit: all of them
        in one Redis call when the window has room, else one at a time, waiting for the window,
        until ``deadline``."""
        if n <= 0:
            return 0
        if self._provider.hit(self._per_second[channel], channel, cost=n):
            return n
        granted = 0
        while granted < n and self.provider_slot(channel, deadline=deadline, clock=clock, sleep=sleep):
            granted += 1
        return granted

"""almanac.notify.ratelimit against real Redis: a wave's per-user hits, sent in one pipeline, count
exactly as ``limits``' own ``SlidingWindowCounterRateLimiter.hit`` would, on the same keys."""

from __future__ import annotations

import dataclasses

from limits import RateLimitItemPerHour
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from almanac.notify.ratelimit import NotifyLimiter
from almanac.settings import Settings

THREE = dataclasses.replace(Settings(), notify_sms_per_user_per_hour=3)


def _limits_own(redis_client, prefix: str) -> SlidingWindowCounterRateLimiter:
    return SlidingWindowCounterRateLimiter(
        RedisStorage("redis://", connection_pool=redis_client.connection_pool, key_prefix=prefix)
    )


def test_a_wave_counts_each_user_in_order_and_skips_messages_without_a_user(redis_client):
    limiter = NotifyLimiter(redis_client, THREE, key_prefix="t-wave")
    waits = limiter.user_waits("sms", [1, 1, 2, None, 1, 1, 2])
    allowed = [w == 0 for w in waits]
    # user 1: three allowed, the fourth waits; user 2 twice; no user: never limited
    assert allowed == [True, True, True, True, True, False, True]
    assert 1.0 <= waits[5] <= 3600


def test_the_pipeline_uses_limits_keys_so_limits_sees_the_same_counts(redis_client):
    limiter = NotifyLimiter(redis_client, THREE, key_prefix="t-same")
    limiter.user_waits("sms", [7, 7])
    own = _limits_own(redis_client, "t-same")
    item = RateLimitItemPerHour(3)
    assert own.get_window_stats(item, "sms", "7").remaining == 1
    assert own.hit(item, "sms", "7")  # the third, through limits itself
    assert limiter.user_waits("sms", [7]) != [0.0]  # the fourth, through the pipeline: limited
    assert own.get_window_stats(item, "sms", "8").remaining == 3  # another user is untouched


def test_channels_are_limited_apart(redis_client):
    settings = dataclasses.replace(THREE, notify_email_per_user_per_hour=1)
    limiter = NotifyLimiter(redis_client, settings, key_prefix="t-chan")
    assert limiter.user_waits("email", [5, 5])[1] > 0
    assert limiter.user_waits("sms", [5, 5, 5]) == [0.0, 0.0, 0.0]


def test_a_flushed_script_cache_is_reloaded_and_nothing_is_counted_twice(redis_client):
    limiter = NotifyLimiter(redis_client, THREE, key_prefix="t-flush")
    redis_client.script_flush()  # as after a Redis restart: the pipeline's EVALSHA is refused
    assert limiter.user_waits("sms", [9, 9]) == [0.0, 0.0]
    own = _limits_own(redis_client, "t-flush")
    assert own.get_window_stats(RateLimitItemPerHour(3), "sms", "9").remaining == 1


def test_hits_refused_mid_pipeline_go_again_alone_and_the_others_count_once(redis_client):
    """The pipeline is not atomic: the script cache can be flushed (or loaded by another client)
    between two of its hits. Only the refused hits are sent again."""
    import redis

    class FlushAfterFirstHit(redis.client.Pipeline):
        def evalsha(self, *args, **kwargs):
            result = super().evalsha(*args, **kwargs)
            if not getattr(self, "_flushed", False):
                self._flushed = True
                self.script_flush()  # runs in Redis between the first hit and the second
            return result

        def execute(self, raise_on_error=True):
            replies = super().execute(raise_on_error=raise_on_error)
            if getattr(self, "_flushed", False):
                del replies[1]  # the flush's own "OK"
            return replies

    class Client(redis.Redis):
        flushes_left = 1

        def pipeline(self, transaction=True, shard_hint=None):
            if Client.flushes_left:
                Client.flushes_left -= 1
                return FlushAfterFirstHit(
                    self.connection_pool, self.response_callbacks, transaction, shard_hint
                )
            return super().pipeline(transaction, shard_hint)

    client = Client(connection_pool=redis_client.connection_pool)
    limiter = NotifyLimiter(client, THREE, key_prefix="t-mid")
    limiter._storage.storage = client  # limits' storage talks through this client (same pool)
    client.script_load(limiter._storage.lua_acquire_sliding_window.script)
    assert limiter.user_waits("sms", [11, 12, 13]) == [0.0, 0.0, 0.0]
    assert Client.flushes_left == 0  # the flush did happen mid-pipeline
    own = _limits_own(redis_client, "t-mid")
    item = RateLimitItemPerHour(3)
    remaining = [own.get_window_stats(item, "sms", u).remaining for u in ("11", "12", "13")]
    assert remaining == [2, 2, 2]  # one hit each: the first not counted again

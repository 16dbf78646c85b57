"""The one way Almanac opens a Redis client (events, leases, rate limits), from a URL.

Inside Airflow the URL comes from the ``redis_default`` connection
(``almanac_airflow.hooks.redis_client`` / ``async_redis_client``); outside it from
``ALMANAC_REDIS_URL``. Sync and asyncio clients share the options below.
"""

from __future__ import annotations

import os
from typing import Any

from almanac.errors import ConfigError

__all__ = ["connect_redis", "connect_redis_async", "redis_url"]

#: Seconds to connect; reads default to ``socket_timeout`` (callers that BLOCK pass a longer one).
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 10.0


def redis_url(url: str | None = None) -> str:
    """The Redis URL outside Airflow: ``url``, else ``ALMANAC_REDIS_URL``."""
    found = url or os.environ.get("ALMANAC_REDIS_URL")
    if not found:
        raise ConfigError("no Redis: set ALMANAC_REDIS_URL")
    return found


def _options(overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": 30,
        **overrides,
    }


def connect_redis(url: str | None = None, **options: Any):
    """A synchronous ``redis.Redis`` (bytes replies unless ``decode_responses=True``)."""
    import redis

    return redis.Redis.from_url(redis_url(url), **_options(options))


def connect_redis_async(url: str | None = None, **options: Any):
    """A ``redis.asyncio.Redis`` with the same options (for triggers)."""
    from redis.asyncio import Redis

    return Redis.from_url(redis_url(url), **_options(options))

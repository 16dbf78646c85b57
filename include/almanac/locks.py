"""Per-entity locks in Redis: two runs never work on the same calendar at the same time."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["entity_lock"]

# Delete the key only if it still holds our token: never free a lock someone else took
# after ours expired.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


@contextmanager
def entity_lock(client, key: str, ttl_seconds: int) -> Iterator[bool]:
    """Try to take ``key`` for ``ttl_seconds``; yield True if taken, False if someone holds it.

    The TTL frees the lock if the holder dies. The caller reports a False as "skipped".
    """
    token = secrets.token_hex(16)
    taken = bool(client.set(key, token, nx=True, ex=ttl_seconds))
    try:
        yield taken
    finally:
        if taken:
            client.eval(_RELEASE, 1, key, token)

"""Per-entity leases in Redis: two runs never work on the same entity at once, and a dead holder
never blocks it for long.

A lease is a Redis key ``almanac:lease:<job>:<id>`` holding ``<owner>|<token>`` with a short
TTL (``ttl_s``, default 30 s). While its holder lives, a background thread renews every lease
it holds every ``ttl_s / 3``; a holder killed with SIGKILL stops renewing, so the lease is
free again within ``ttl_s``. ``owner`` names the unit of work that may hold it — for a task,
``dag_id/run_id/task_id/map_index`` without the try number — so a *retry of the same task
instance* takes over the lease its killed predecessor left behind at once, while any other
owner sees it as busy.

If Redis loses the key (a restart without persistence), the next renewal takes it again when
nobody else did; if somebody else holds it by then, the lease is marked lost and
``Lease.lost`` tells the holder before it commits.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Lease", "LeaseKeeper", "lease_key"]

log = logging.getLogger(__name__)

# KEYS[1] lease key; ARGV[1] owner, ARGV[2] owner|token, ARGV[3] ttl ms.
# 1 = taken, 2 = taken over from a dead try of the same owner, 0 = held by another owner.
_ACQUIRE = """
local current = redis.call('get', KEYS[1])
if not current then
    redis.call('set', KEYS[1], ARGV[2], 'px', ARGV[3])
    return 1
end
local sep = string.find(current, '|', 1, true)
if sep and string.sub(current, 1, sep - 1) == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[2], 'px', ARGV[3])
    return 2
end
return 0
"""

# 1 = renewed, 2 = re-taken (the key had vanished), 0 = someone else holds it now.
_RENEW = """
local current = redis.call('get', KEYS[1])
if current == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[2])
    return 1
end
if not current then
    redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
    return 2
end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def lease_key(job: str, entity_id: int) -> str:
    """The Redis key of one entity's lease, e.g. ``almanac:lease:ics_sync:42``."""
    return f"almanac:lease:{job}:{int(entity_id)}"


@dataclass
class Lease:
    """One held lease. ``taken`` is False when another owner holds the entity."""

    key: str
    value: str
    taken: bool
    taken_over: bool = False
    lost: bool = False
    _keeper: LeaseKeeper | None = field(default=None, repr=False)


class LeaseKeeper:
    """Takes, renews and releases leases for one owner (one task instance).

    Parameters:
        client: a redis-py client.
        owner: who holds (``dag_id/run_id/task_id/map_index``); a later try of the same owner
            may take over a lease an earlier, dead try left behind.
        ttl_s: lease lifetime without renewal; a crashed holder frees it after this long.
    """

    def __init__(self, client, owner: str, *, ttl_s: float = 30.0) -> None:
        if "|" in owner:
            raise ValueError("a lease owner may not contain '|'")
        self.client = client
        self.owner = owner
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ one lease
    def acquire(self, key: str) -> Lease:
        value = f"{self.owner}|{secrets.token_hex(8)}"
        answer = int(self.client.eval(_ACQUIRE, 1, key, self.owner, value, self.ttl_ms))
        lease = Lease(key, value, taken=answer > 0, taken_over=answer == 2, _keeper=self)
        if lease.taken:
            if lease.taken_over:
                log.info("lease %s taken over from an earlier try of %s", key, self.owner)
            with self._lock:
                self._held[key] = lease
            self._ensure_renewer()
        return lease

    def release(self, lease: Lease) -> None:
        if not lease.taken:
            return
        with self._lock:
            self._held.pop(lease.key, None)
        try:
            self.client.eval(_RELEASE, 1, lease.key, lease.value)
        except Exception as exc:  # Redis away: the TTL frees it
            log.warning(
                "could not release lease %s (%s); it expires in %.0fs", lease.key, exc, self.ttl_ms / 1000
            )

    @contextmanager
    def hold(self, key: str) -> Iterator[Lease]:
        """Take ``key`` for the block; yields the ``Lease`` (check ``.taken``)."""
        lease = self.acquire(key)
        try:
            yield lease
        finally:
            self.release(lease)

    # ------------------------------------------------------------------ renewing
    def renew_all(self) -> None:
        """Renew every held lease once (the background thread calls this every ttl/3)."""
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            try:
                answer = int(self.client.eval(_RENEW, 1, lease.key, lease.value, self.ttl_ms))
            except Exception as exc:  # Redis restarting: try again next round
                log.warning("could not renew lease %s (%s)", lease.key, exc)
                continue
            if answer == 0:
                lease.lost = True
                with self._lock:
                    self._held.pop(lease.key, None)
                log.warning("lease %s was lost to another holder", lease.key)
            elif answer == 2:
                log.warning("lease %s had vanished from Redis; taken again", lease.key)

    def _ensure_renewer(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"lease-renewer:{self.owner}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            self.renew_all()

    def close(self) -> None:
        """Stop renewing and release whatever is still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            self.release(lease)

    def __enter__(self) -> LeaseKeeper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

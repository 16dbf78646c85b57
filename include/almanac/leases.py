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

# One script per operation, over any number of keys (a batch's chunk in one call: one round
# trip, one script run, instead of a script call per key). Each key is decided on its own.

# KEYS lease keys; ARGV[1] owner, ARGV[2] ttl ms, ARGV[2 + i] the value ("owner|token") for KEYS[i].
# Per key: 1 = taken, 2 = taken over from a dead try of the same owner, 0 = held by another owner.
_ACQUIRE = """
local answers = {}
for i, key in ipairs(KEYS) do
    local current = redis.call('get', key)
    local answer = 0
    if not current then
        answer = 1
    else
        local sep = string.find(current, '|', 1, true)
        if sep and string.sub(current, 1, sep - 1) == ARGV[1] then
            answer = 2
        end
    end
    if answer > 0 then
        redis.call('set', key, ARGV[2 + i], 'px', ARGV[2])
    end
    answers[i] = answer
end
return answers
"""

# KEYS lease keys; ARGV[1] ttl ms, ARGV[1 + i] the holder's value for KEYS[i].
# Per key: 1 = renewed, 2 = re-taken (the key had vanished), 0 = someone else holds it now.
_RENEW = """
local answers = {}
for i, key in ipairs(KEYS) do
    local current = redis.call('get', key)
    if current == ARGV[1 + i] then
        redis.call('pexpire', key, ARGV[1])
        answers[i] = 1
    elseif not current then
        redis.call('set', key, ARGV[1 + i], 'px', ARGV[1])
        answers[i] = 2
    else
        answers[i] = 0
    end
end
return answers
"""

# KEYS lease keys; ARGV[i] the holder's value for KEYS[i]: deleted only while still that value.
_RELEASE = """
local released = 0
for i, key in ipairs(KEYS) do
    if redis.call('get', key) == ARGV[i] then
        released = released + redis.call('del', key)
    end
end
return released
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
        # Held across a renewal's snapshot and its script, and across a release: otherwise a
        # lease released while the renewer holds a snapshot with it is seen as "vanished" by that
        # renewal and taken again, holding the entity for a TTL after its holder let it go.
        self._io_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # EVALSHA, falling back to EVAL (once per Redis) when the script is not cached there.
        self._acquire_script = client.register_script(_ACQUIRE)
        self._renew_script = client.register_script(_RENEW)
        self._release_script = client.register_script(_RELEASE)

    # ------------------------------------------------------------------ one lease
    def acquire(self, key: str) -> Lease:
        return self.acquire_many([key])[0]

    def acquire_many(self, keys: list[str]) -> list[Lease]:
        """Try to take each of ``keys``, in one round trip to Redis; one ``Lease`` per key, in order
        (check each ``.taken``). Each key is taken or refused on its own, exactly as ``acquire``."""
        if not keys:
            return []
        values = [f"{self.owner}|{secrets.token_hex(8)}" for _ in keys]
        answers = self._acquire_script(keys=keys, args=[self.owner, self.ttl_ms, *values])
        leases = []
        for key, value, raw in zip(keys, values, answers, strict=True):
            answer = int(raw)
            lease = Lease(key, value, taken=answer > 0, taken_over=answer == 2, _keeper=self)
            if lease.taken_over:
                log.info("lease %s taken over from an earlier try of %s", key, self.owner)
            leases.append(lease)
        taken = [lease for lease in leases if lease.taken]
        if taken:
            with self._lock:
                for lease in taken:
                    self._held[lease.key] = lease
            self._ensure_renewer()
        return leases

    def release(self, lease: Lease) -> None:
        self.release_many([lease])

    def release_many(self, leases: list[Lease]) -> None:
        """Release every taken lease of ``leases`` in one round trip (a lease another holder has
        taken since is left alone). Never raises: if Redis is away, the TTL frees them."""
        taken = [lease for lease in leases if lease.taken]
        if not taken:
            return
        with self._io_lock:
            with self._lock:
                for lease in taken:
                    self._held.pop(lease.key, None)
            try:
                self._release_script(
                    keys=[lease.key for lease in taken], args=[lease.value for lease in taken]
                )
            except Exception as exc:  # Redis away: the TTL frees it
                log.warning(
                    "could not release %d lease(s), first %s (%s); they expire in %.0fs",
                    len(taken),
                    taken[0].key,
                    exc,
                    self.ttl_ms / 1000,
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
        with self._io_lock:
            with self._lock:
                held = list(self._held.values())
            if not held:
                return
            try:
                answers = self._renew_script(
                    keys=[lease.key for lease in held],
                    args=[self.ttl_ms, *(lease.value for lease in held)],
                )
            except Exception as exc:  # Redis restarting: try again next round
                log.warning("could not renew %d lease(s), first %s (%s)", len(held), held[0].key, exc)
                return
        for lease, raw in zip(held, answers, strict=True):
            answer = int(raw)
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

"""Leases against the real Redis: taken once, renewed while alive, taken over by the same owner's retry."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from almanac.leases import LeaseKeeper, lease_key

KEY = lease_key("test", 1)

_DIE_HOLDING = """
import os, signal, redis
from almanac.leases import LeaseKeeper
keeper = LeaseKeeper(redis.Redis.from_url(os.environ["ALMANAC_REDIS_URL"]), os.environ["OWNER"], ttl_s=1)
assert keeper.acquire(os.environ["KEY"]).taken
os.kill(os.getpid(), signal.SIGKILL)
"""


def die_holding(owner: str) -> None:
    """A real process takes the lease and is killed with SIGKILL (no release, no more renewals)."""
    done = subprocess.run(
        [sys.executable, "-c", _DIE_HOLDING], env={**os.environ, "OWNER": owner, "KEY": KEY}
    )
    assert done.returncode == -9


def test_another_owner_is_refused_until_the_holder_releases(redis_client):
    with LeaseKeeper(redis_client, "dag/run/a/0") as a, LeaseKeeper(redis_client, "dag/run/b/0") as b:
        with a.hold(KEY) as first:
            assert first.taken
            with b.hold(KEY) as second:
                assert not second.taken
            assert redis_client.exists(KEY)  # the refused one freed nothing
        with b.hold(KEY) as again:
            assert again.taken and not again.taken_over


def test_a_retry_of_the_same_owner_takes_over_a_dead_tries_lease(redis_client):
    die_holding("dag/run/task/7")
    with LeaseKeeper(redis_client, "dag/run/task/7") as retry, retry.hold(KEY) as lease:
        assert lease.taken and lease.taken_over
    assert not redis_client.exists(KEY)


def test_a_dead_holders_lease_expires_within_its_ttl(redis_client):
    die_holding("dag/run/task/0")
    assert 0 < redis_client.pttl(KEY) <= 1000
    with LeaseKeeper(redis_client, "other/run/task/0") as other, other.hold(KEY) as lease:
        assert not lease.taken
    time.sleep(1.2)
    with LeaseKeeper(redis_client, "other/run/task/0") as other, other.hold(KEY) as lease:
        assert lease.taken


def test_a_live_holder_keeps_its_lease_past_the_ttl(redis_client):
    with LeaseKeeper(redis_client, "dag/run/task/0", ttl_s=1) as keeper, keeper.hold(KEY) as lease:
        time.sleep(2.5)  # renewed every third of a second
        assert redis_client.exists(KEY) and not lease.lost
        with LeaseKeeper(redis_client, "other/run/task/0") as other, other.hold(KEY) as theirs:
            assert not theirs.taken


def test_a_lease_that_vanished_from_redis_is_taken_again(redis_client):
    with LeaseKeeper(redis_client, "dag/run/task/0", ttl_s=1) as keeper, keeper.hold(KEY) as lease:
        redis_client.delete(KEY)  # a Redis restart without persistence
        keeper.renew_all()
        assert redis_client.get(KEY).decode() == lease.value and not lease.lost


def test_a_lease_taken_by_someone_else_meanwhile_is_marked_lost(redis_client):
    with LeaseKeeper(redis_client, "dag/run/task/0", ttl_s=1) as keeper, keeper.hold(KEY) as lease:
        redis_client.set(KEY, "other/run/task/0|x")
        keeper.renew_all()
        assert lease.lost
    assert redis_client.get(KEY) == b"other/run/task/0|x"  # never freed someone else's lease


def test_acquire_many_decides_each_key_on_its_own_in_one_round_trip(redis_client):
    free, theirs, dead = lease_key("test", 11), lease_key("test", 12), lease_key("test", 13)
    with LeaseKeeper(redis_client, "other/run/task/0") as other:
        other.acquire(theirs)
        stale = LeaseKeeper(redis_client, "dag/run/task/0")
        stale.acquire(dead)
        stale._stop.set()  # as after SIGKILL
        with LeaseKeeper(redis_client, "dag/run/task/0") as retry:
            got = retry.acquire_many([free, theirs, dead])
            assert [(lease.taken, lease.taken_over) for lease in got] == [
                (True, False),
                (False, False),
                (True, True),
            ]
            redis_client.set(free, "someone/else/x/0|y")  # ours expired and another took it
            retry.release_many(got)
        assert redis_client.get(free) == b"someone/else/x/0|y" and not redis_client.exists(dead)
        assert redis_client.get(theirs).decode().startswith("other/run/task/0|")


def _script_calls(redis_client) -> int:
    """Script runs Redis executed (an EVALSHA refused with NOSCRIPT, before redis-py loads the
    script and sends it again, is a failed call: not counted, so the script cache's state does not
    matter)."""
    stats = redis_client.info("commandstats")
    runs = 0
    for name in ("eval", "evalsha"):
        command = stats.get(f"cmdstat_{name}", {})
        runs += command.get("calls", 0) - command.get("failed_calls", 0)
    return runs


def test_renewal_decides_each_held_lease_on_its_own_in_one_script_call(redis_client):
    kept, vanished, stolen = lease_key("test", 21), lease_key("test", 22), lease_key("test", 23)
    with LeaseKeeper(redis_client, "dag/run/task/0", ttl_s=60) as keeper:
        leases = keeper.acquire_many([kept, vanished, stolen])
        keeper._stop.set()  # no background renewal: this test renews by hand
        redis_client.pexpire(kept, 5_000)
        redis_client.delete(vanished)
        redis_client.set(stolen, "other/run/task/0|x")
        redis_client.script_flush()  # as after a Redis restart: the scripts are loaded again
        before = _script_calls(redis_client)
        keeper.renew_all()
        assert _script_calls(redis_client) - before == 1
        assert redis_client.pttl(kept) > 50_000  # renewed to the full ttl
        assert redis_client.get(vanished).decode() == leases[1].value  # taken again
        assert [lease.lost for lease in leases] == [False, False, True]
        assert redis_client.get(stolen) == b"other/run/task/0|x"
        before = _script_calls(redis_client)
        keeper.release_many(leases)
        assert _script_calls(redis_client) - before == 1
    assert not redis_client.exists(kept) and not redis_client.exists(vanished)


def test_a_lease_released_while_a_renewal_is_under_way_stays_released(redis_client):
    """The renewer snapshots the held leases, then runs its script. A release in between must not
    leave the key to that renewal, which would see it gone and take it again for a whole TTL."""
    import threading

    keeper = LeaseKeeper(redis_client, "run/a", ttl_s=30)
    lease = keeper.acquire(lease_key("race", 1))
    real_script = keeper._renew_script
    in_renewal = threading.Event()

    def slow_renewal(*args, **kwargs):  # the real script, reached a moment after the snapshot
        in_renewal.set()
        time.sleep(0.3)
        return real_script(*args, **kwargs)

    keeper._renew_script = slow_renewal
    renewer = threading.Thread(target=keeper.renew_all)
    renewer.start()
    assert in_renewal.wait(5)
    keeper.release(lease)
    renewer.join(5)
    keeper._renew_script = real_script
    assert redis_client.get(lease_key("race", 1)) is None
    assert LeaseKeeper(redis_client, "run/b").acquire(lease_key("race", 1)).taken
    keeper.close()

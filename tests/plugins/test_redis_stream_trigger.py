"""RedisStreamTrigger: entries of a Redis Stream as asset events, acknowledged only once stored.

Runs against the real Redis ``./dev test`` provides (``ALMANAC_REDIS_URL``, and
``AIRFLOW_CONN_REDIS_DEFAULT`` for the trigger's own connection). Each test uses its own
stream key. The producer is driven directly, and through Airflow's own
``SharedStreamManager`` (the ack-mode machinery the triggerer runs), with
``confirm_persisted`` standing in for the metadata-database write. Hostile entries are
written as raw bytes (``redis_client``); the parsers are the ICS one
(``almanac.ics.requests``) and a second format (``tests/support/stream_parsers.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid

import pytest
import redis
from airflow.sdk import Asset, AssetWatcher
from airflow.triggers.shared_stream import AdvanceItem, AdvanceOutcome, SharedStreamManager

from almanac.ics.requests import CONSUMER_GROUP, STREAM_KEY, push_sync_request
from almanac_airflow.triggers import RedisStreamProducer, RedisStreamTrigger
from tests.support import stream_parsers


@pytest.fixture
def rds():
    url = os.environ.get("ALMANAC_REDIS_URL")
    if not url:
        pytest.fail("ALMANAC_REDIS_URL is not set: run the tests through `./dev test`", pytrace=False)
    client = redis.Redis.from_url(url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def stream(rds):
    key = f"test:{STREAM_KEY}:{uuid.uuid4().hex}"
    yield key
    rds.delete(key, f"{key}:dead")


def _dead(rds, stream: str) -> list[dict]:
    """The dead-letter entries of ``stream``, oldest first."""
    return [fields for _, fields in rds.xrange(f"{stream}:dead")]


def _deliveries(rds, stream: str, entry_id: str) -> int:
    [row] = rds.xpending_range(stream, CONSUMER_GROUP, entry_id, entry_id, 1)
    return row["times_delivered"]


def _pending(rds, stream: str) -> int:
    try:
        return rds.xpending(stream, CONSUMER_GROUP)["pending"]
    except redis.ResponseError:  # no group yet
        return 0


async def _take(agen, n: int, timeout: float = 15.0) -> list:
    items = []
    async with asyncio.timeout(timeout):
        while len(items) < n:
            items.append(await anext(agen))
    return items


async def _nothing_more(agen, wait: float = 0.7) -> bool:
    """True when the stream yields nothing within ``wait`` seconds (the generator is spent after)."""
    try:
        async with asyncio.timeout(wait):
            await anext(agen)
    except TimeoutError:
        return True
    return False


def _producer(stream: str, **kwargs) -> RedisStreamProducer:
    kwargs.setdefault("block_seconds", 0.2)
    return RedisStreamProducer(stream=stream, **kwargs)


async def _close(producer: RedisStreamProducer, agen) -> None:
    await agen.aclose()
    await producer.aclose()


def _take_once(stream: str, n: int, *, then_nothing: bool = False, **kwargs) -> list:
    """Open a producer, take ``n`` entries (and, with ``then_nothing``, check nothing follows), close it."""

    async def main():
        producer = _producer(stream, **kwargs)
        agen = producer.open_stream()
        try:
            got = await _take(agen, n)
            if then_nothing:
                assert await _nothing_more(agen)
        finally:
            await _close(producer, agen)
        return got

    return asyncio.run(main())


# --------------------------------------------------------------------------- trigger


def test_trigger_serializes_to_an_importable_classpath_and_kwargs():
    trigger = RedisStreamTrigger(stream="s", group="g")
    classpath, kwargs = trigger.serialize()
    assert classpath == "almanac_airflow.triggers.RedisStreamTrigger"
    assert kwargs["redis_conn_id"] == "redis_default" and kwargs["stream"] == "s" and kwargs["group"] == "g"
    again = RedisStreamTrigger(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert again.shared_stream_key() == trigger.shared_stream_key()
    # The defaults are the product's stream and group; no per-process value in the kwargs,
    # so the watcher's trigger hash is stable across DAG parses.
    defaults = RedisStreamTrigger().serialize()[1]
    assert defaults["stream"] == STREAM_KEY
    assert defaults["parser"] == "almanac.ics.requests.parse_request"
    assert defaults["dead_letter_stream"] == STREAM_KEY + ":dead"
    assert defaults["consumer"] is None
    json.dumps(defaults)  # a trigger's kwargs are stored as JSON


def test_trigger_takes_a_parser_function_and_stores_its_path():
    trigger = RedisStreamTrigger(stream="almanac:notifications:wake", parser=stream_parsers.parse_wake)
    kwargs = trigger.serialize()[1]
    assert kwargs["parser"] == "tests.support.stream_parsers.parse_wake"
    assert kwargs["dead_letter_stream"] == "almanac:notifications:wake:dead"
    for bad in ("parse_wake", lambda fields: {}):
        with pytest.raises(ValueError):
            RedisStreamTrigger(parser=bad)
    with pytest.raises(ValueError):
        RedisStreamTrigger(stream="s", dead_letter_stream="s")


def test_ics_asset_keeps_the_ics_defaults():
    from almanac_airflow.assets import ics_sync_requests

    [watcher] = ics_sync_requests().watchers
    assert watcher.trigger.serialize() == RedisStreamTrigger().serialize()


def test_requests_stream_module_re_exports_the_ics_names():
    from almanac.ics import requests
    from almanac_airflow import requests_stream

    assert requests_stream.push_sync_request is requests.push_sync_request
    assert (requests_stream.STREAM_KEY, requests_stream.CONSUMER_GROUP) == (STREAM_KEY, CONSUMER_GROUP)


def test_trigger_is_accepted_by_an_asset_watcher():
    asset = Asset("almanac://ics-sync-requests",
                  watchers=[AssetWatcher(name="ics_sync_requests", trigger=RedisStreamTrigger())])
    assert isinstance(asset.watchers[0].trigger, RedisStreamTrigger)


def test_push_sync_request_refuses_a_non_integer_calendar_id(rds, stream):
    for bad in ("42", 0, -1, True, 4.2):
        with pytest.raises(ValueError):
            push_sync_request(rds, bad, stream=stream)
    assert rds.exists(stream) == 0


# --------------------------------------------------------------------------- producer


def test_burst_of_20_requests_yields_20_events(rds, stream):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    ids = {push_sync_request(rds, calendar_id, stream=stream): calendar_id for calendar_id in range(1, 21)}

    got = _take_once(stream, 20, then_nothing=True, consumer="t1")
    assert sorted(request["calendar_id"] for request, _ in got) == list(range(1, 21))
    assert {request["request_id"]: request["calendar_id"] for request, _ in got} == ids
    assert all(request["request_id"] == entry_id for request, entry_id in got)


def test_requests_pushed_before_the_group_exists_are_delivered(rds, stream):
    first = push_sync_request(rds, 7, stream=stream)  # no consumer group yet

    [(request, _)] = _take_once(stream, 1, consumer="t1")
    assert request == {"calendar_id": 7, "request_id": first}


def test_unacknowledged_requests_are_redelivered_after_a_restart(rds, stream):
    """The triggerer died (or was stopped) between reading requests and storing their events."""
    pushed = [push_sync_request(rds, calendar_id, stream=stream) for calendar_id in (1, 2, 3)]

    async def main():
        before = _producer(stream, consumer="host:100")
        agen = before.open_stream()
        taken = await _take(agen, 3)
        await _close(before, agen)  # no advance: nothing stored, nothing acknowledged
        assert _pending(rds, stream) == 3

        # Pushed while no triggerer runs.
        pushed.append(push_sync_request(rds, 4, stream=stream))

        # A new triggerer process: another pid, so another consumer name. It claims the
        # entries idle on the old consumer, then reads the new one.
        await asyncio.sleep(0.3)
        after = _producer(stream, consumer="host:200", claim_min_idle_seconds=0.2)
        agen = after.open_stream()
        try:
            again = await _take(agen, 4)
            await after.advance([_clean(entry_id) for _, entry_id in again])
        finally:
            await _close(after, agen)
        return taken, again

    taken, again = asyncio.run(main())
    assert [r["request_id"] for r, _ in taken] == pushed[:3]
    assert sorted(r["request_id"] for r, _ in again) == sorted(pushed)
    assert _pending(rds, stream) == 0


def test_own_unacknowledged_requests_are_redelivered_at_once_by_the_same_consumer(rds, stream):
    pushed = [push_sync_request(rds, calendar_id, stream=stream) for calendar_id in (5, 6)]

    async def main():
        before = _producer(stream, consumer="host:100")
        agen = before.open_stream()
        await _take(agen, 2)
        await _close(before, agen)
        # Same consumer name (the shared-stream group restarted in the same process):
        # its own pending entries come back first, with no idle wait.
        after = _producer(stream, consumer="host:100", claim_min_idle_seconds=3600)
        agen = after.open_stream()
        try:
            return await _take(agen, 2, timeout=3)
        finally:
            await _close(after, agen)

    again = asyncio.run(main())
    assert [r["request_id"] for r, _ in again] == pushed


def test_malformed_request_is_dead_lettered_with_a_log_line_and_the_next_one_arrives(rds, stream, caplog):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    bad = {
        rds.xadd(stream, {"calendar_id": "abc"}): "calendar_id",
        rds.xadd(stream, {"payload": "{not json"}): "not JSON",
        rds.xadd(stream, {"payload": '{"calendar": 1}'}): "no calendar_id",
        rds.xadd(stream, {"hello": "world"}): "no calendar_id or payload",
    }
    good = push_sync_request(rds, 9, stream=stream)

    with caplog.at_level(logging.WARNING, logger="almanac_airflow.triggers"):
        [(request, _)] = _take_once(stream, 1, then_nothing=True, consumer="t1")
    assert request == {"calendar_id": 9, "request_id": good}
    messages = [r.getMessage() for r in caplog.records if r.name == "almanac_airflow.triggers"]
    for entry_id in bad:
        assert any(entry_id in m and f"{stream}:dead" in m for m in messages), (entry_id, messages)
    dead = _dead(rds, stream)
    assert [d["entry_id"] for d in dead] == list(bad)
    for letter, reason in zip(dead, bad.values(), strict=True):
        assert reason in letter["reason"]
        assert letter["stream"] == stream and letter["group"] == CONSUMER_GROUP
        assert letter["deliveries"] == "1" and letter["truncated"] == "0"
    assert json.loads(dead[0]["fields"]) == {"calendar_id": "abc"}  # replayable as it was
    # The malformed ones are acknowledged and gone; only the good one is pending.
    assert _pending(rds, stream) == 1
    assert [entry_id for entry_id, _ in rds.xrange(stream)] == [good]


def test_advance_acknowledges_and_deletes_clean_entries_and_keeps_failed_ones(rds, stream):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    ok, failed, rejected, nobody = (push_sync_request(rds, n, stream=stream) for n in (1, 2, 3, 4))

    async def main():
        producer = _producer(stream, consumer="t1")
        agen = producer.open_stream()
        try:
            await _take(agen, 4)
            await producer.advance([
                AdvanceItem(ok, AdvanceOutcome(acked=1, failed=0)),
                AdvanceItem(failed, AdvanceOutcome(acked=0, failed=1)),
                AdvanceItem(rejected, AdvanceOutcome(acked=0, failed=0, rejected=1)),
                AdvanceItem(nobody, AdvanceOutcome(acked=0, failed=0)),  # no subscriber online
            ])
        finally:
            await _close(producer, agen)

    asyncio.run(main())
    pending = {p["message_id"] for p in rds.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10)}
    assert pending == {failed, nobody}
    assert {entry_id for entry_id, _ in rds.xrange(stream)} == {failed, nobody}
    # A reject is terminal: dead-lettered, not redelivered.
    [letter] = _dead(rds, stream)
    assert letter["entry_id"] == rejected and letter["reason"] == "rejected by the watcher"
    assert json.loads(letter["fields"]) == {"calendar_id": "3"}


def _xadd_raw(client, stream: str, fields: dict) -> str:
    return client.xadd(stream, fields).decode()


def test_hostile_entries_are_dead_lettered_with_their_reason_and_the_valid_ones_around_them_arrive(
        rds, redis_client, stream):
    """Issue 6: each of these used to raise outside the reader's error handling."""
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    raw = redis_client
    good = [push_sync_request(rds, 1, stream=stream)]
    bad = {_xadd_raw(raw, stream, {b"calendar_id": b"\xff\xfe42"}): "field 'calendar_id' is not UTF-8"}
    good.append(push_sync_request(rds, 2, stream=stream))
    bad[_xadd_raw(raw, stream, {"calendar_id": "9" * 5000})] = "calendar_id: not an integer id"
    bad[_xadd_raw(raw, stream, {"payload": "[" * 1020})] = "payload is nested too deeply"
    bad[_xadd_raw(raw, stream, {"payload": "[" * 100_000})] = "entry too large (100007 bytes"
    one_point_oh = _xadd_raw(raw, stream, {"payload": '{"calendar_id": 1.0}'})
    bad[_xadd_raw(raw, stream, {"payload": '{"calendar_id": true}'})] = "calendar_id: not an integer id"
    bad[_xadd_raw(raw, stream, {f"f{n}": "1" for n in range(40)})] = "too many fields (40 > max_fields=32)"
    bad[_xadd_raw(raw, stream, {b"\xc3\x28": b"1", b"calendar_id": b"3"})] = (
        "field name '\\xc3(' is not UTF-8")
    good.append(push_sync_request(rds, 3, stream=stream))

    async def main():
        producer = _producer(stream, consumer="t1", max_entry_bytes=16_384)
        agen = producer.open_stream()
        try:
            got = await _take(agen, 4)
            assert await _nothing_more(agen)
            await producer.advance([_clean(entry_id) for _, entry_id in got])
        finally:
            await _close(producer, agen)
        return got

    got = asyncio.run(main())
    assert [(r["calendar_id"], r["request_id"]) for r, _ in got] == [
        (1, good[0]), (2, good[1]), (1, one_point_oh), (3, good[2])]
    assert all(type(r["calendar_id"]) is int for r, _ in got)  # 1.0 -> 1: lock key ...:1, not ...:1.0
    dead = {d["entry_id"]: d for d in _dead(rds, stream)}
    assert set(dead) == set(bad)
    for entry_id, reason in bad.items():
        assert dead[entry_id]["reason"].startswith(reason), (reason, dead[entry_id]["reason"])
        assert len(dead[entry_id]["fields"]) < 16_384 * 2
    first_bad = next(iter(bad))
    assert json.loads(dead[first_bad]["fields"]) == {"calendar_id": "\\xff\\xfe42"}  # escaped, not raw
    huge = dead[next(k for k, v in bad.items() if v.startswith("entry too large"))]
    assert huge["truncated"] == "1" and len(json.loads(huge["fields"])["payload"]) == 16_384 - len("payload")
    assert rds.xlen(stream) == 0 and _pending(rds, stream) == 0


def test_hostile_entries_with_the_default_limits_are_refused_by_size(rds, stream):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    huge = rds.xadd(stream, {"calendar_id": "9" * 5000})
    good = push_sync_request(rds, 4, stream=stream)

    [(request, _)] = _take_once(stream, 1, consumer="t1")
    assert request == {"calendar_id": 4, "request_id": good}
    [letter] = _dead(rds, stream)
    assert letter["entry_id"] == huge and letter["reason"].startswith("entry too large (5011 bytes")


def test_restart_after_a_poison_entry_does_not_crash_loop(rds, redis_client, stream):
    """The old reader took a poison entry and died on it; the next one (same name) reads it first."""
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    poison = _xadd_raw(redis_client, stream, {b"calendar_id": b"\xff"})
    good = push_sync_request(rds, 8, stream=stream)
    redis_client.xreadgroup(CONSUMER_GROUP, "host:1", {stream: ">"})  # both pending on host:1

    async def once():
        producer = _producer(stream, consumer="host:1", claim_min_idle_seconds=3600)
        agen = producer.open_stream()
        try:
            got = await _take(agen, 1, timeout=3)
            assert await _nothing_more(agen)
        finally:
            await _close(producer, agen)  # no advance: the good one stays pending
        return got

    for _ in range(3):  # restart, restart again: the same good entry, the poison never again
        [(request, _)] = asyncio.run(once())
        assert request == {"calendar_id": 8, "request_id": good}
    [letter] = _dead(rds, stream)
    assert letter["entry_id"] == poison and "not UTF-8" in letter["reason"]
    assert [entry_id.decode() for entry_id, _ in redis_client.xrange(stream)] == [good]


def test_entry_that_keeps_failing_to_store_is_dead_lettered_after_max_deliveries(rds, stream):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    entry = push_sync_request(rds, 21, stream=stream)
    push_sync_request(rds, 22, stream=stream)

    async def main():
        producer = _producer(stream, consumer="t1", claim_min_idle_seconds=0.1, max_deliveries=3)
        agen = producer.open_stream()
        delivered = []
        try:
            for _ in range(10):
                try:
                    async with asyncio.timeout(1.0):
                        request, entry_id = await anext(agen)
                except TimeoutError:
                    break
                delivered.append(request["calendar_id"])
                if request["calendar_id"] == 22:
                    await producer.advance([_clean(entry_id)])
                else:
                    await producer.advance([_failed(entry_id)])  # the metadata DB write failed
        finally:
            await _close(producer, agen)
        return delivered

    delivered = asyncio.run(main())
    assert delivered.count(21) == 3 and delivered.count(22) == 1
    [letter] = _dead(rds, stream)
    assert letter["entry_id"] == entry and letter["deliveries"] == "4"
    assert letter["reason"] == "delivered 4 times without being stored (max_deliveries=3)"
    assert json.loads(letter["fields"]) == {"calendar_id": "21"}  # replayable
    assert rds.xlen(stream) == 0 and _pending(rds, stream) == 0


def test_entry_that_kills_the_reader_is_set_aside_after_max_deliveries(rds, stream):
    """Valid, but every reader that took it died before the event was stored (OOM, segfault)."""
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    entry = push_sync_request(rds, 31, stream=stream)
    rds.xreadgroup(CONSUMER_GROUP, "host:1", {stream: ">"})
    for _ in range(4):  # four restarts, each re-reading its pending list and dying
        rds.xreadgroup(CONSUMER_GROUP, "host:1", {stream: "0"})
    assert _deliveries(rds, stream, entry) == 5

    async def main():
        producer = _producer(stream, consumer="host:1", max_deliveries=5)
        agen = producer.open_stream()
        try:
            assert await _nothing_more(agen)
        finally:
            await _close(producer, agen)

    asyncio.run(main())
    [letter] = _dead(rds, stream)
    assert letter["entry_id"] == entry and letter["reason"].startswith("delivered 6 times")
    assert _pending(rds, stream) == 0


def test_entries_out_with_airflow_are_renewed_not_claimed_or_counted(rds, stream):
    """A slow store (up to the ack timeout) must not count as redeliveries."""
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    entry = push_sync_request(rds, 41, stream=stream)

    async def main():
        producer = _producer(stream, consumer="t1", claim_min_idle_seconds=0.5, max_deliveries=1)
        agen = producer.open_stream()
        try:
            [(_, entry_id)] = await _take(agen, 1)
            # Four claim passes; unrenewed, the entry would be claimed (and counted) by each.
            assert await _nothing_more(agen, 2.0)
            # Nor can another triggerer's consumer claim it (last renewed < 0.5 s ago).
            claimed = rds.xautoclaim(stream, CONSUMER_GROUP, "other:1", 1000, "0-0")[1]
            assert claimed == [] and _deliveries(rds, stream, entry) == 1
        finally:
            await agen.aclose()
        await producer.advance([_clean(entry_id)])
        await producer.aclose()

    asyncio.run(main())
    assert _dead(rds, stream) == [] and rds.xlen(stream) == 0


def test_entry_deleted_while_pending_is_acknowledged_not_dead_lettered(rds, stream):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    gone = push_sync_request(rds, 51, stream=stream)
    good = push_sync_request(rds, 52, stream=stream)
    rds.xreadgroup(CONSUMER_GROUP, "host:1", {stream: ">"})
    rds.xdel(stream, gone)  # by hand: pending, but no longer in the stream

    [(request, _)] = _take_once(stream, 1, consumer="host:1")
    assert request["request_id"] == good
    assert _dead(rds, stream) == []
    assert [p["message_id"] for p in rds.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10)] == [good]


def test_stale_consumers_without_pending_entries_are_removed(rds, stream):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    rds.xreadgroup(CONSUMER_GROUP, "gone:1", {stream: ">"})  # a triggerer that restarted: nothing pending
    push_sync_request(rds, 61, stream=stream)
    rds.xreadgroup(CONSUMER_GROUP, "gone:2", {stream: ">"})  # died with an entry: kept until claimed
    time.sleep(0.4)

    async def main():
        producer = _producer(stream, consumer="me:1", stale_consumer_idle_seconds=0.2,
                             claim_min_idle_seconds=3600)
        agen = producer.open_stream()
        try:
            assert await _nothing_more(agen)  # the sweep runs first
            after_start = {c["name"] for c in rds.xinfo_consumers(stream, CONSUMER_GROUP)}
            await asyncio.sleep(0.4)  # now this consumer is idle past the limit too (it is not reading)
            removed_later = await producer.remove_stale_consumers()
        finally:
            await _close(producer, agen)
        return after_start, removed_later

    after_start, removed_later = asyncio.run(main())
    assert after_start == {"gone:2", "me:1"}
    assert removed_later == []  # never itself; gone:2 still owns an entry
    assert _pending(rds, stream) == 1


def test_a_second_stream_with_its_own_parser_uses_the_same_trigger(rds, stream):
    """Generic: the notification dispatcher's wake-ups, through Airflow's ack machinery."""
    wake = f"{stream}:notifications:wake"
    rds.xgroup_create(wake, CONSUMER_GROUP, id="0", mkstream=True)
    ics = push_sync_request(rds, 71, stream=stream)  # another stream: not read
    one = rds.xadd(wake, {"notification_id": "7"})
    bare = rds.xadd(wake, {"wake": "1"})
    bad = rds.xadd(wake, {"notification_id": "seven"})
    last = rds.xadd(wake, {"notification_id": "8"})
    trigger = RedisStreamTrigger(stream=wake, parser=stream_parsers.PARSER, block_seconds=0.2)
    key = trigger.shared_stream_key()
    assert key != RedisStreamTrigger(stream=stream).shared_stream_key()

    async def main():
        manager = SharedStreamManager()
        events_gen, events, _ = await _events_via_manager(manager, trigger, 1, 3, confirm=True)
        await events_gen.aclose()
        await manager.unsubscribe(1, key)
        return events

    try:
        events = asyncio.run(main())
        assert [e.payload for e in events] == [
            {"notification_id": 7, "request_id": one},
            {"request_id": bare},
            {"notification_id": 8, "request_id": last},
        ]
        [letter] = _dead(rds, wake)
        assert letter["entry_id"] == bad and letter["reason"].startswith("not an integer id")
        assert rds.xlen(wake) == 0
        assert [entry_id for entry_id, _ in rds.xrange(stream)] == [ics]
    finally:
        rds.delete(wake, f"{wake}:dead")


def test_a_parser_bug_dead_letters_only_the_entries_it_fails_on(rds, stream, caplog):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    no_x = rds.xadd(stream, {"y": "1"})  # KeyError in the parser
    a_list = rds.xadd(stream, {"x": "list"})  # not a dict
    fine = rds.xadd(stream, {"x": "ok"})

    with caplog.at_level(logging.WARNING, logger="almanac_airflow.triggers"):
        [(request, _)] = _take_once(
            stream, 1, consumer="t1", parser="tests.support.stream_parsers.parse_buggy"
        )
    assert request == {"x": "ok", "request_id": fine}
    reasons = {d["entry_id"]: d["reason"] for d in _dead(rds, stream)}
    assert reasons == {
        no_x: "parser tests.support.stream_parsers.parse_buggy failed: KeyError: 'x'",
        a_list: "parser returned list, not a dict",
    }


def test_an_unknown_parser_fails_the_stream_loudly(stream):
    from almanac.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be imported"):
        RedisStreamProducer(stream=stream, parser="tests.support.stream_parsers.nope")


def _clean(entry_id):
    return AdvanceItem(entry_id, AdvanceOutcome(acked=1, failed=0))


def _failed(entry_id):
    return AdvanceItem(entry_id, AdvanceOutcome(acked=0, failed=1))


# --------------------------------------------------------------------------- Airflow's ack machinery


async def _events_via_manager(manager, trigger, trigger_id, n, *, confirm: bool):
    """Subscribe like the triggerer's run_trigger does and take ``n`` trigger events."""
    key = trigger.shared_stream_key()
    raw = manager.subscribe(trigger_id=trigger_id, trigger=trigger, key=key)
    events_gen = trigger.filter_shared_stream(raw)
    events, seqs = [], []
    async with asyncio.timeout(15):
        while len(events) < n:
            event = await anext(events_gen)
            # run_trigger binds with no await between taking the event and queueing it.
            seqs.append(manager.bind_pending_event(trigger_id=trigger_id, key=key))
            events.append(event)
    if confirm:
        manager.confirm_persisted(seqs)  # what the supervisor reports after the DB write
    return events_gen, events, seqs


def test_through_airflow_shared_stream_burst_is_acked_only_after_persist(rds, stream):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    ids = {push_sync_request(rds, n, stream=stream): n for n in range(101, 121)}
    trigger = RedisStreamTrigger(stream=stream, block_seconds=0.2)
    key = trigger.shared_stream_key()

    async def main():
        manager = SharedStreamManager()
        events_gen, events, seqs = await _events_via_manager(manager, trigger, 1, 20, confirm=False)
        assert all(seq is not None for seq in seqs)  # ack mode is on
        await asyncio.sleep(0.3)
        assert _pending(rds, stream) == 20  # taken but not stored: nothing acknowledged
        manager.confirm_persisted(seqs)
        await events_gen.aclose()
        await manager.unsubscribe(1, key)  # group stops; resolved advances are drained first
        return events

    events = asyncio.run(main())
    assert {e.payload["request_id"]: e.payload["calendar_id"] for e in events} == ids
    assert _pending(rds, stream) == 0
    assert rds.xlen(stream) == 0


def test_through_airflow_shared_stream_unpersisted_event_is_redelivered(rds, stream):
    """The persist confirmation never comes (DB write failed): ack timeout, entry stays pending."""
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    entry = push_sync_request(rds, 55, stream=stream)
    trigger = RedisStreamTrigger(stream=stream, block_seconds=0.2)
    key = trigger.shared_stream_key()

    async def main():
        manager = SharedStreamManager(ack_timeout=0.5)
        events_gen, [event], _ = await _events_via_manager(manager, trigger, 1, 1, confirm=False)
        assert event.payload == {"calendar_id": 55, "request_id": entry}
        # The ack timeout force-fails the subscriber; the next pull raises AckTimeout.
        with pytest.raises(Exception, match="did not finish processing"):
            async with asyncio.timeout(5):
                await anext(events_gen)
        await manager.unsubscribe(1, key)
        assert _pending(rds, stream) == 1

        # The triggerer restarts the trigger: a new group in the same process.
        events_gen, [again], _ = await _events_via_manager(manager, trigger, 2, 1, confirm=True)
        await events_gen.aclose()
        await manager.unsubscribe(2, key)
        return again

    again = asyncio.run(main())
    assert again.payload == {"calendar_id": 55, "request_id": entry}
    assert _pending(rds, stream) == 0


def test_standalone_run_yields_events_and_acknowledges_taken_ones(rds, stream):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    first, second = (push_sync_request(rds, n, stream=stream) for n in (1, 2))

    async def main():
        agen = RedisStreamTrigger(stream=stream, block_seconds=0.2).run()
        try:
            events = await _take(agen, 2)
        finally:
            await agen.aclose()
        return events

    events = asyncio.run(main())
    assert [e.payload["request_id"] for e in events] == [first, second]
    # The first was acknowledged when the second was asked for; the second was still out.
    assert [p["message_id"] for p in rds.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10)] == [second]

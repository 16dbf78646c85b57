"""RedisStreamTrigger: on-demand ICS sync requests from a Redis Stream, acknowledged only once stored.

Runs against the real Redis ``./dev test`` provides (``ALMANAC_REDIS_URL``, and
``AIRFLOW_CONN_REDIS_DEFAULT`` for the trigger's own connection). Each test uses its own
stream key. The producer is driven directly, and through Airflow's own
``SharedStreamManager`` (the ack-mode machinery the triggerer runs), with
``confirm_persisted`` standing in for the metadata-database write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import pytest
import redis
from airflow.sdk import Asset, AssetWatcher
from airflow.triggers.shared_stream import SharedStreamManager

from almanac_airflow.requests_stream import CONSUMER_GROUP, STREAM_KEY, push_sync_request
from almanac_airflow.triggers import RedisStreamProducer, RedisStreamTrigger, parse_request


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
    rds.delete(key)


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


# --------------------------------------------------------------------------- message format


@pytest.mark.parametrize(("fields", "expected"), [
    ({"calendar_id": "42"}, 42),
    ({"payload": '{"calendar_id": 42}'}, 42),
    ({"payload": '{"calendar_id": "42"}'}, 42),
    ({"calendar_id": "abc"}, None),
    ({"calendar_id": "-3"}, None),
    ({"calendar_id": "0"}, None),
    ({"calendar_id": "4.2"}, None),
    ({"payload": "{not json"}, None),
    ({"payload": '{"calendar": 42}'}, None),
    ({"payload": '{"calendar_id": true}'}, None),
    ({"payload": "[42]"}, None),
    ({"other": "x"}, None),
    ({}, None),
])
def test_request_fields_parse_to_a_calendar_id_or_a_reason(fields, expected):
    calendar_id, reason = parse_request(fields)
    assert calendar_id == expected
    assert (reason is None) == (expected is not None)


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
    assert RedisStreamTrigger().serialize()[1]["stream"] == STREAM_KEY
    assert RedisStreamTrigger().serialize()[1]["consumer"] is None


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

    async def main():
        producer = _producer(stream, consumer="t1")
        agen = producer.open_stream()
        try:
            got = await _take(agen, 20)
            assert await _nothing_more(agen)
        finally:
            await _close(producer, agen)
        return got

    got = asyncio.run(main())
    assert sorted(request["calendar_id"] for request, _ in got) == list(range(1, 21))
    assert {request["request_id"]: request["calendar_id"] for request, _ in got} == ids
    assert all(request["request_id"] == entry_id for request, entry_id in got)


def test_requests_pushed_before_the_group_exists_are_delivered(rds, stream):
    first = push_sync_request(rds, 7, stream=stream)  # no consumer group yet

    async def main():
        producer = _producer(stream, consumer="t1")
        agen = producer.open_stream()
        try:
            return await _take(agen, 1)
        finally:
            await _close(producer, agen)

    [(request, _)] = asyncio.run(main())
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


def test_malformed_request_is_dropped_with_a_log_line_and_the_next_one_arrives(rds, stream, caplog):
    rds.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    bad = [
        rds.xadd(stream, {"calendar_id": "abc"}),
        rds.xadd(stream, {"payload": "{not json"}),
        rds.xadd(stream, {"payload": '{"calendar": 1}'}),
        rds.xadd(stream, {"hello": "world"}),
    ]
    good = push_sync_request(rds, 9, stream=stream)

    async def main():
        producer = _producer(stream, consumer="t1")
        agen = producer.open_stream()
        try:
            got = await _take(agen, 1)
            assert await _nothing_more(agen)
        finally:
            await _close(producer, agen)
        return got

    with caplog.at_level(logging.WARNING, logger="almanac_airflow.triggers"):
        [(request, _)] = asyncio.run(main())
    assert request == {"calendar_id": 9, "request_id": good}
    messages = [r.getMessage() for r in caplog.records if r.name == "almanac_airflow.triggers"]
    for entry_id in bad:
        assert any(entry_id in m and "malformed" in m for m in messages), (entry_id, messages)
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
            from airflow.triggers.shared_stream import AdvanceItem, AdvanceOutcome
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


def _clean(entry_id):
    from airflow.triggers.shared_stream import AdvanceItem, AdvanceOutcome

    return AdvanceItem(entry_id, AdvanceOutcome(acked=1, failed=0))


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

"""Asset-watcher triggers: ``RedisStreamTrigger`` turns on-demand ICS sync requests into asset events.

## Why not the Redis provider

``apache-airflow-providers-redis`` (4.7.1) only offers pub/sub (``AwaitMessageTrigger``):
one message per trigger run, and anything published while nobody is subscribed is gone.
This trigger reads a Redis **Stream** with a **consumer group** instead, and runs in
Airflow 3.3's shared-stream **ack mode**: an entry is acknowledged (``XACK``, then
``XDEL``) only after the asset event made from it is stored in Airflow's metadata
database. An entry whose event was not stored stays in the group's pending list and is
delivered again — to this producer after ``claim_min_idle_seconds``, or to the next one
after a triggerer restart. Delivery is therefore *at least once*: the DAG must be
idempotent per calendar (it is: syncs are keyed by calendar id).

## How the backend asks for a sync

Append one entry per request to ``almanac:ics_sync:requests`` (names and a helper in
``almanac_airflow.requests_stream``)::

    redis-cli XADD almanac:ics_sync:requests '*' calendar_id 42

    client = redis.Redis.from_url(url)                        # redis-py
    client.xadd("almanac:ics_sync:requests", {"calendar_id": "42"})
    # or: almanac_airflow.requests_stream.push_sync_request(client, 42)

A field ``payload`` holding JSON ``{"calendar_id": 42}`` is accepted too. A malformed
entry (no or non-integer ``calendar_id``, bad JSON) is logged with its entry id,
acknowledged and dropped; it never blocks the stream.

## How a DAG is wired

```python
from airflow.sdk import Asset, AssetWatcher
from almanac_airflow.triggers import RedisStreamTrigger

ICS_SYNC_REQUESTS = Asset(
    "almanac://ics-sync-requests",
    watchers=[AssetWatcher(name="ics_sync_requests", trigger=RedisStreamTrigger())],
)

# @dag(schedule=[ICS_SYNC_REQUESTS], ...); in a task:
@task(inlets=[ICS_SYNC_REQUESTS])
def requested_calendar_ids(*, triggering_asset_events, inlet_events, dag_run) -> list[int]:
    events = [*triggering_asset_events.get(ICS_SYNC_REQUESTS, []),
              *inlet_events[ICS_SYNC_REQUESTS].after(dag_run.run_after.isoformat())]
    return sorted({
        int(e.extra["payload"]["calendar_id"])
        for e in events
        if isinstance(e.extra.get("payload"), dict) and "calendar_id" in e.extra["payload"]
    })
```

Each request becomes one ``AssetEvent`` whose ``extra`` is
``{"from_trigger": True, "payload": {"calendar_id": 42, "request_id": "<entry id>"}}``
(``Trigger.submit_event`` in ``airflow/models/trigger.py``), stored in its own
transaction. One run can carry many requests: always iterate over all of them. But the
Airflow 3.3 scheduler gives a run only the events up to the creation of its
``asset_dag_run_queue`` row, i.e. up to the *first* request since the previous run;
requests stored after that and before the run is created (a burst, or anything arriving
while ``max_active_runs`` holds the run back) queue no run and are consumed only when a
later request arrives (apache/airflow#56050). Hence the DAG also reads the events stored
from its own ``run_after`` on, as above; a request may then be seen by two runs.

## Operational notes

* A paused DAG does not lose requests from Redis's point of view (they are acked once
  the asset event is stored), but Airflow queues no run for a paused DAG. The events
  are consumed by the first run after it is unpaused, which needs one new request to
  be created (``AssetDagRunQueue`` rows are only written for unpaused DAGs).
* Back-pressure: at most ``max_in_flight`` entries are handed to Airflow and not yet
  acknowledged; keep it below ``[triggerer] shared_stream_subscriber_queue_size``
  (default 1024), or a backlog would overflow the subscriber queue.
* Consumer names are ``<host>:<pid>``; entries pending on a consumer that went away are
  claimed (``XAUTOCLAIM``) once idle for ``claim_min_idle_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Hashable, Sequence
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from airflow.triggers.shared_stream import AdvanceItem, AdvanceOutcome, SharedStreamProducer

from almanac_airflow.requests_stream import CONSUMER_GROUP, STREAM_KEY

__all__ = ["RedisStreamProducer", "RedisStreamTrigger", "parse_request"]

log = logging.getLogger(__name__)

_CLASSPATH = "almanac_airflow.triggers.RedisStreamTrigger"
# Pending entries are looked for every this many seconds while the stream is quiet.
_CLAIM_INTERVAL_SECONDS = 5.0
# Reconnect back-off after a Redis connection error (seconds, doubled up to the cap).
_RETRY_FIRST, _RETRY_MAX = 1.0, 30.0
# XACK/XDEL attempts before the entries are left pending (they are then redelivered).
_ADVANCE_ATTEMPTS = 3
# Socket read timeout beyond the XREADGROUP BLOCK time, and the connect timeout (seconds).
# redis-py 8 defaults socket_timeout to 5 s, the same as our default BLOCK: a reply sent
# as the block ends raced the client's read timeout and dropped the connection.
_READ_TIMEOUT_MARGIN, _CONNECT_TIMEOUT = 10.0, 5.0


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation of the current task that a client library swallowed.

    Seen with redis-py 8.1: a cancel that lands while ``XREADGROUP BLOCK`` returns is
    absorbed and the command returns normally, so the shared-stream group's ``stop()``
    would wait forever for this poll to end.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def parse_request(fields: dict[str, str]) -> tuple[int | None, str | None]:
    """Read the calendar id out of one stream entry's fields.

    Returns:
        ``(calendar_id, None)`` for a valid request, ``(None, reason)`` for a malformed one.
    """
    if "calendar_id" in fields:
        raw: Any = fields["calendar_id"]
    elif "payload" in fields:
        try:
            body = json.loads(fields["payload"])
        except ValueError:
            return None, "payload is not JSON"
        if not isinstance(body, dict) or "calendar_id" not in body:
            return None, "payload has no calendar_id"
        raw = body["calendar_id"]
    else:
        return None, "no calendar_id or payload field"
    if isinstance(raw, bool):
        return None, "calendar_id is not an integer"
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.strip().isdecimal():
        value = int(raw.strip())
    else:
        return None, "calendar_id is not an integer"
    if value <= 0:
        return None, "calendar_id is not positive"
    return value, None


class RedisStreamProducer(SharedStreamProducer):
    """Broker side of ``RedisStreamTrigger``: one consumer of the group, for one shared-stream poll.

    ``open_stream`` yields ``({"calendar_id": N, "request_id": entry_id}, entry_id)``:
    first this consumer's own unacknowledged entries, then entries idle on other
    consumers (``XAUTOCLAIM``), then new ones (``XREADGROUP >``), re-checking for idle
    pending entries every few seconds. ``advance`` acknowledges and deletes the entries
    whose events every subscriber accepted (or rejected) and leaves the rest pending.
    """

    def __init__(
        self,
        *,
        redis_conn_id: str = "redis_default",
        stream: str = STREAM_KEY,
        group: str = CONSUMER_GROUP,
        consumer: str | None = None,
        claim_min_idle_seconds: float = 60.0,
        block_seconds: float = 5.0,
        max_in_flight: int = 100,
        client: Any = None,
    ) -> None:
        self.redis_conn_id = redis_conn_id
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.claim_min_idle_ms = max(0, int(claim_min_idle_seconds * 1000))
        self.block_ms = max(1, int(block_seconds * 1000))
        self.max_in_flight = max(1, int(max_in_flight))
        self._client = client  # tests may inject a redis.asyncio client
        self._owns_client = client is None
        # Entry ids yielded and not yet passed to advance(); never yielded twice meanwhile.
        self._in_flight: set[str] = set()
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._own_cursor: str | None = "0"  # XREADGROUP history cursor; None once read through
        self._claim_cursor = "0-0"  # XAUTOCLAIM scan cursor

    # ------------------------------------------------------------------ connection

    async def _connect(self) -> Any:
        """An asyncio Redis client from the Airflow connection, as ``RedisHook.get_conn`` reads it."""
        from airflow.providers.redis.hooks.redis import DEFAULT_REDIS_PORT, RedisHook
        from redis.asyncio import Redis

        # aget_connection/aextra_dejson: the sync variants would block (or deadlock on)
        # the triggerer's event loop; this runs in the shared-stream poll task.
        conn = await RedisHook.aget_connection(self.redis_conn_id)
        extra = await conn.aextra_dejson()
        if extra.get("cluster"):
            raise ValueError(f"Redis connection {self.redis_conn_id!r} is in cluster mode; "
                             "RedisStreamTrigger supports a single Redis server only")
        password = None if str(conn.password).lower() in ("none", "false", "") else conn.password
        ssl_args = {k: v for k, v in extra.items() if k in (
            "ssl", "ssl_cert_reqs", "ssl_ca_certs", "ssl_keyfile", "ssl_certfile", "ssl_check_hostname")}
        db = extra.get("db")
        return Redis(
            host=conn.host or "localhost",
            port=conn.port or DEFAULT_REDIS_PORT,
            username=conn.login or None,
            password=password,
            db=int(db) if db not in (None, "") else 0,
            decode_responses=True,
            protocol=2,  # fixed reply shapes for XREADGROUP/XAUTOCLAIM
            socket_timeout=self.block_ms / 1000 + _READ_TIMEOUT_MARGIN,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            **ssl_args,
        )

    async def _ensure_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            # id 0: entries appended before the group existed are delivered too.
            await self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on stream %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ------------------------------------------------------------------ reading

    async def _read_own_pending(self, count: int) -> list[tuple[str | None, dict]]:
        """The next page of entries delivered to this consumer name earlier and never acknowledged."""
        reply = await self._client.xreadgroup(
            self.group, self.consumer, {self.stream: self._own_cursor}, count=count)
        batch = reply[0][1] if reply else []
        self._own_cursor = batch[-1][0] if batch else None
        return batch

    async def _claim_idle(self, count: int) -> list[tuple[str | None, dict]]:
        """Take over up to ``count`` entries pending (on any consumer) for ``claim_min_idle_seconds``."""
        reply = await self._client.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_min_idle_ms,
            start_id=self._claim_cursor, count=count)
        cursor, batch = reply[0], reply[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        return batch

    async def _read_new(self, count: int, block_ms: int) -> list[tuple[str | None, dict]]:
        reply = await self._client.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
        return reply[0][1] if reply else []

    async def _drop(self, entry_id: str, reason: str) -> None:
        log.warning("dropping malformed ICS sync request %s on %s: %s", entry_id, self.stream, reason)
        try:
            await self._ack([entry_id])
        except Exception as exc:  # stays pending; dropped again when redelivered
            log.warning("could not acknowledge malformed request %s (%s)", entry_id, exc)

    async def _ack(self, entry_ids: list[str]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            await pipe.execute()

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        """Yield ``(request, entry_id)`` forever; raise only on a non-transient Redis error.

        Order of sources: this consumer's own unacknowledged entries (``XREADGROUP 0``),
        then entries idle on any consumer (``XAUTOCLAIM``, re-checked every few seconds),
        then new entries (``XREADGROUP > BLOCK``). Never more than ``max_in_flight``
        entries are out between ``open_stream`` and ``advance``.
        """
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if self._client is None:
            self._client = await self._connect()
        loop = asyncio.get_running_loop()
        retry = _RETRY_FIRST
        group_ready = False
        next_claim = 0.0  # look for idle pending entries straight away
        log.info("reading %s as %s/%s", self.stream, self.group, self.consumer)
        while True:
            _raise_if_cancelled()
            try:
                if not group_ready:
                    await self._ensure_group()
                    group_ready = True
                await self._capacity.wait()
                room = self.max_in_flight - len(self._in_flight)
                entries: list[tuple[str | None, dict]] = []
                if self._own_cursor is not None:
                    entries = await self._read_own_pending(room)
                elif loop.time() >= next_claim:
                    entries = await self._claim_idle(room)
                    more = self._claim_cursor not in ("0-0", "0")
                    if not more:
                        self._claim_cursor = "0-0"
                    next_claim = loop.time() + (0.0 if more else _CLAIM_INTERVAL_SECONDS)
                    entries = [e for e in entries if e[0] not in self._in_flight]
                    if not entries and not more:
                        wait_ms = int(max(0.0, next_claim - loop.time()) * 1000)
                        entries = await self._read_new(room, max(1, min(self.block_ms, wait_ms)))
                else:
                    wait_ms = int(max(0.0, next_claim - loop.time()) * 1000)
                    entries = await self._read_new(room, max(1, min(self.block_ms, wait_ms)))
                retry = _RETRY_FIRST
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("Redis unavailable reading %s (%s); retrying in %.0fs", self.stream, exc, retry)
                # A reply lost with the connection may have delivered entries to this
                # consumer: re-read its own pending list first (in-flight ones are skipped).
                self._own_cursor = "0"
                await asyncio.sleep(retry)
                retry = min(retry * 2, _RETRY_MAX)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("stream %s or group %s vanished; recreating", self.stream, self.group)
                group_ready = False
                continue

            _raise_if_cancelled()
            for entry_id, fields in entries:
                if entry_id is None or entry_id in self._in_flight:
                    continue
                calendar_id, problem = parse_request(fields or {})
                if calendar_id is None:
                    await self._drop(entry_id, problem or "malformed")
                    continue
                self._in_flight.add(entry_id)
                if len(self._in_flight) >= self.max_in_flight:
                    self._capacity.clear()
                yield {"calendar_id": calendar_id, "request_id": entry_id}, entry_id

    # ------------------------------------------------------------------ acknowledging

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        """Acknowledge what every subscriber accepted (or rejected); leave the rest pending."""
        done: list[str] = []
        for item in batch:
            entry_id = item.broker_payload
            self._in_flight.discard(entry_id)
            outcome = item.outcome
            if outcome.is_clean:
                done.append(entry_id)
            elif outcome.rejected and not outcome.failed:
                log.warning("ICS sync request %s rejected by the watcher; dropping it", entry_id)
                done.append(entry_id)
            else:
                # Not stored (ack timeout, overflow, or no subscriber online): stays pending,
                # claimed again after claim_min_idle_seconds.
                log.warning("ICS sync request %s not confirmed (acked=%d failed=%d); left for redelivery",
                            entry_id, outcome.acked, outcome.failed)
        if len(self._in_flight) < self.max_in_flight:
            self._capacity.set()
        if not done:
            return
        for attempt in range(1, _ADVANCE_ATTEMPTS + 1):
            try:
                await self._ack(done)
                return
            except Exception as exc:  # a failed ack only means a redelivery later
                if attempt == _ADVANCE_ATTEMPTS:
                    log.warning("could not acknowledge %d ICS sync requests on %s (%s); "
                                "they will be delivered again", len(done), self.stream, exc)
                    return
                await asyncio.sleep(0.5 * attempt)

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None


class RedisStreamTrigger(BaseEventTrigger):
    """Fire one event per ICS sync request appended to a Redis Stream (ack mode; see the module docstring).

    Parameters:
        redis_conn_id: Airflow connection of the Redis server.
        stream: stream key.
        group: consumer group (created with ``MKSTREAM`` from id ``0`` if missing).
        consumer: consumer name; default ``<host>:<pid>`` of the triggerer.
        claim_min_idle_seconds: how long an entry must have been pending before another
            consumer (or this one, after a failed store) takes it over.
        block_seconds: ``XREADGROUP BLOCK`` time.
        max_in_flight: entries handed to Airflow and not yet acknowledged, at most.
    """

    def __init__(
        self,
        *,
        redis_conn_id: str = "redis_default",
        stream: str = STREAM_KEY,
        group: str = CONSUMER_GROUP,
        consumer: str | None = None,
        claim_min_idle_seconds: float = 60.0,
        block_seconds: float = 5.0,
        max_in_flight: int = 100,
    ) -> None:
        super().__init__()
        self.redis_conn_id = redis_conn_id
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.claim_min_idle_seconds = claim_min_idle_seconds
        self.block_seconds = block_seconds
        self.max_in_flight = max_in_flight

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (_CLASSPATH, {
            "redis_conn_id": self.redis_conn_id,
            "stream": self.stream,
            "group": self.group,
            "consumer": self.consumer,
            "claim_min_idle_seconds": self.claim_min_idle_seconds,
            "block_seconds": self.block_seconds,
            "max_in_flight": self.max_in_flight,
        })

    def shared_stream_key(self) -> Hashable | None:
        """One consumer per (connection, stream, group) in a triggerer, however many watchers use it."""
        return ("almanac-redis-stream", self.redis_conn_id, self.stream, self.group)

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        return RedisStreamProducer(**kwargs)

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        # Yield before pulling the next raw event: that binds the event to its entry.
        async for request in shared_stream:
            yield TriggerEvent({"calendar_id": request["calendar_id"], "request_id": request["request_id"]})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Standalone fallback (the triggerer uses the shared stream instead).

        Not persistence-gated: an entry is acknowledged when the caller asks for the
        next event after it.
        """
        producer = RedisStreamProducer(**self.serialize()[1])
        stream = producer.open_stream()
        try:
            async for request, entry_id in stream:
                yield TriggerEvent(request)
                await producer.advance([AdvanceItem(entry_id, AdvanceOutcome(acked=1, failed=0))])
        finally:
            await stream.aclose()
            await producer.aclose()

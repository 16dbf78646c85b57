"""Asset-watcher triggers: ``RedisStreamTrigger`` turns the entries of a Redis Stream into asset events.

## Why not the Redis provider

``apache-airflow-providers-redis`` (4.7.1) only offers pub/sub (``AwaitMessageTrigger``):
one message per trigger run, and anything published while nobody is subscribed is gone.
This trigger reads a Redis **Stream** with a **consumer group** instead, and runs in
Airflow 3.3's shared-stream **ack mode**: an entry is acknowledged (``XACK``, then
``XDEL``) only after the asset event made from it is stored in Airflow's metadata
database. An entry whose event was not stored stays in the group's pending list and is
delivered again — to this producer after ``claim_min_idle_seconds``, or to the next one
after a triggerer restart. Delivery is therefore *at least once*: the DAG must be
idempotent per entity (ICS syncs are keyed by calendar id).

## Wiring a stream to a DAG

The trigger is generic: a stream, a consumer group and a **parser**, the dotted import
path of a module-level function ``parser(fields: dict[str, str]) -> dict``. It gets an
entry's fields already decoded (UTF-8) and size-checked, returns the event payload (a
JSON-able dict), and raises ``ValueError`` (or a subclass) with an operator-readable
reason for an entry it refuses. The event payload is the parser's dict plus
``request_id`` (the stream entry id). Keep the parser in ``include/`` (plain Python,
testable without Airflow); use ``almanac.batches.as_entity_id`` for ids.

```python
from airflow.sdk import Asset, AssetWatcher
from almanac_airflow.triggers import RedisStreamTrigger

NOTIFICATIONS_WAKE = Asset(
    "almanac://notifications/wake",
    watchers=[AssetWatcher(name="notifications_wake", trigger=RedisStreamTrigger(
        stream="almanac:notifications:wake",
        parser="almanac.notify.wake.parse_wake",   # e.g.: fields -> {"notification_id": N} or {}
    ))],
)
# @dag(schedule=[NOTIFICATIONS_WAKE], ...); a task reads
#   [e.extra["payload"] for e in triggering_asset_events[NOTIFICATIONS_WAKE]]
```

Build the Asset in a function called by the one DAG that watches it (as
``almanac_airflow.assets.ics_sync_requests()`` does): one watcher, one consumer of the
stream. Use one parser per (stream, group). The ICS sync requests are the defaults
(``almanac.ics.requests``: ``STREAM_KEY``, ``CONSUMER_GROUP``, ``parse_request``), so
``RedisStreamTrigger()`` is the ICS watcher; ``requested_calendar_ids`` reads the ids
back from the events' ``extra``
(``{"from_trigger": True, "payload": {"calendar_id": 42, "request_id": "<entry id>"}}``).

One run can carry many events: always iterate over all of them. The Airflow 3.3
scheduler gives a run only the events up to the creation of its ``asset_dag_run_queue``
row, i.e. up to the *first* event since the previous run; events stored after that and
before the run is created queue no run and are consumed only when a later one arrives
(apache/airflow#56050). So a DAG also reads its inlet's events stored from its own
``run_after`` on (see ``dags/ics_sync_requested.py``); an event may then be seen by two runs.

## Hostile entries and the dead-letter stream

Every entry is read as bytes and checked, one by one, inside the reader's error
handling: at most ``max_fields`` fields and ``max_entry_bytes`` bytes, UTF-8 names and
values, then the parser (whose ``ValueError``, ``RecursionError`` or any other exception
refuses only that entry), and a JSON-able result. An entry that fails is **moved to the
dead-letter stream** (default ``<stream>:dead``, capped with ``MAXLEN ~ dead_letter_maxlen``,
10,000) and then acknowledged and deleted from the stream, so one bad entry never stops
the reader and never comes back after a restart. A dead-letter entry has the fields
``reason``, ``stream``, ``group``, ``entry_id`` (the original id), ``deliveries``,
``consumer``, ``fields`` (the original fields as a JSON object; bytes that are not UTF-8
shown as ``\\xNN``; cut to ``max_entry_bytes``) and ``truncated`` (``1`` if cut).

Inspect, replay, discard (redis-cli)::

    redis-cli XLEN almanac:ics_sync:requests:dead
    redis-cli XREVRANGE almanac:ics_sync:requests:dead + - COUNT 20
    # replay one, after fixing what its reason names:
    redis-cli XADD almanac:ics_sync:requests '*' calendar_id 42
    redis-cli XDEL almanac:ics_sync:requests:dead 1719830000000-0
    redis-cli XTRIM almanac:ics_sync:requests:dead MAXLEN 0          # discard all

## Redeliveries

An entry whose asset event Airflow did not store (ack timeout, subscriber overflow, no
watcher online, triggerer crash) stays pending and is delivered again. Redis counts the
deliveries (``XREADGROUP`` of the pending list and ``XAUTOCLAIM`` both add one); before
handing a redelivered entry to Airflow the reader looks its count up (``XPENDING`` in the
extended form) and dead-letters it, reason ``delivered N times without being stored``,
once it exceeds ``max_deliveries`` (5). So an entry that keeps failing — or that kills
the triggerer process itself — is set aside instead of looping. Entries already handed to
Airflow are renewed on every claim pass (``XCLAIM ... JUSTID``: resets their idle time
without counting a delivery), so a slow store is neither claimed by another consumer nor
counted against the cap.

## Stale consumers

Consumer names are ``<host>:<pid>``, so every triggerer restart adds one. At start and
then every ``stale_consumer_idle_seconds / 4`` (1 s to 5 min) the reader deletes, in one
Lua script (atomic), the group's consumers idle for longer than
``stale_consumer_idle_seconds`` (1 h) **with no pending entries** (``XGROUP
DELCONSUMER``); never itself, never one that still owns entries (those are claimed
first, after ``claim_min_idle_seconds``). Look at them with
``redis-cli XINFO CONSUMERS almanac:ics_sync:requests almanac-airflow``.

## Operational notes

* A paused DAG does not lose entries from Redis's point of view (they are acked once
  the asset event is stored), but Airflow queues no run for a paused DAG. The events
  are consumed by the first run after it is unpaused, which needs one new entry to
  be created (``AssetDagRunQueue`` rows are only written for unpaused DAGs).
* Back-pressure: at most ``max_in_flight`` entries are handed to Airflow and not yet
  acknowledged; keep it below ``[triggerer] shared_stream_subscriber_queue_size``
  (default 1024), or a backlog would overflow the subscriber queue.
* A single Redis server only: a server with ``cluster_enabled:1`` is refused.
* A Redis outage is retried with back-off (1 s doubling to 30 s); after it, this
  consumer's own pending list is read again first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from airflow.triggers.shared_stream import AdvanceItem, AdvanceOutcome, SharedStreamProducer

from almanac.errors import ConfigError
from almanac.ics.requests import CONSUMER_GROUP, PARSER, STREAM_KEY
from almanac.imports import import_object
from almanac_airflow.hooks import REDIS_CONN_ID, async_redis_client

__all__ = ["RedisStreamProducer", "RedisStreamTrigger"]

log = logging.getLogger(__name__)

_CLASSPATH = "almanac_airflow.triggers.RedisStreamTrigger"
#: Defaults of the entry limits and the dead-letter cap.
DEFAULT_MAX_ENTRY_BYTES = 4096
DEFAULT_MAX_FIELDS = 32
DEFAULT_DEAD_LETTER_MAXLEN = 10_000
# Pending entries are looked for at most every this many seconds while the stream is quiet
# (more often when claim_min_idle_seconds is shorter).
_CLAIM_INTERVAL_SECONDS = 5.0
# The stale-consumer sweep runs every stale_consumer_idle_seconds / 4, within these bounds.
_SWEEP_INTERVAL_MIN, _SWEEP_INTERVAL_MAX = 1.0, 300.0
# Reconnect back-off after a Redis connection error (seconds, doubled up to the cap).
_RETRY_FIRST, _RETRY_MAX = 1.0, 30.0
# XACK/XDEL attempts before the entries are left pending (they are then redelivered).
_ADVANCE_ATTEMPTS = 3
# Socket read timeout beyond the XREADGROUP BLOCK time. redis-py 8 defaults socket_timeout
# to 5 s, the same as our default BLOCK: a reply sent as the block ends raced the client's
# read timeout and dropped the connection.
_READ_TIMEOUT_MARGIN = 10.0
# Longest reason and field name kept in a dead-letter entry.
_REASON_MAX, _NAME_MAX = 300, 256

# KEYS[1] stream; ARGV: group, idle threshold (ms), the caller's own consumer name.
# Checks and deletes in one step, so a consumer that reads between the check and the
# delete cannot lose its pending entries (DELCONSUMER drops them).
_SWEEP_SCRIPT = """
local removed = {}
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, consumer in ipairs(consumers) do
  local f = {}
  for i = 1, #consumer, 2 do f[consumer[i]] = consumer[i + 1] end
  if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0
      and tonumber(f['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed[#removed + 1] = f['name']
  end
end
return removed
"""


class _EntryRefusedError(ValueError):
    """An entry failed the reader's own checks (size, fields, encoding, parser result)."""


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation of the current task that a client library swallowed.

    Seen with redis-py 8.1: a cancel that lands while ``XREADGROUP BLOCK`` returns is
    absorbed and the command returns normally, so the shared-stream group's ``stop()``
    would wait forever for this poll to end.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _size(value: bytes | str) -> int:
    return len(value) if isinstance(value, bytes) else len(value.encode("utf-8", "surrogatepass"))


def _escaped(value: bytes | str) -> str:
    """Any bytes as safe text: UTF-8 where valid, ``\\xNN`` for the rest."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _parser_path(parser: str | Callable[..., Any]) -> str:
    """The dotted path of a parser given as a path or as a module-level function."""
    if callable(parser):
        path = f"{parser.__module__}.{parser.__qualname__}"
        if "<" in path or "." in parser.__qualname__ or parser.__module__ == "__main__":
            raise ValueError(f"parser must be a module-level function, got {path}")
        return path
    if not isinstance(parser, str) or "." not in parser.strip("."):
        raise ValueError(f"parser must be a dotted path 'package.module.function', got {parser!r}")
    return parser


def _load_parser(path: str) -> Callable[[dict[str, str]], dict]:
    try:
        function = import_object(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"RedisStreamTrigger parser {path!r} cannot be imported: {exc}") from exc
    if not callable(function):
        raise ConfigError(f"RedisStreamTrigger parser {path!r} is not a function")
    return function


class RedisStreamProducer(SharedStreamProducer):
    """Broker side of ``RedisStreamTrigger``: one consumer of the group, for one shared-stream poll.

    ``open_stream`` yields ``({**parser(fields), "request_id": entry_id}, entry_id)``:
    first this consumer's own unacknowledged entries, then entries idle on other
    consumers (``XAUTOCLAIM``), then new ones (``XREADGROUP >``), re-checking for idle
    pending entries every few seconds. Entries that fail validation or were delivered
    more than ``max_deliveries`` times go to the dead-letter stream instead. ``advance``
    acknowledges and deletes the entries whose events every subscriber accepted,
    dead-letters the rejected ones and leaves the rest pending.

    Takes the keyword arguments of ``RedisStreamTrigger``, plus ``client`` (an injected
    ``redis.asyncio`` client, bytes replies, RESP2; not closed by ``aclose``).
    """

    def __init__(
        self,
        *,
        redis_conn_id: str = REDIS_CONN_ID,
        stream: str = STREAM_KEY,
        group: str = CONSUMER_GROUP,
        parser: str = PARSER,
        dead_letter_stream: str | None = None,
        consumer: str | None = None,
        claim_min_idle_seconds: float = 20.0,
        block_seconds: float = 5.0,
        max_in_flight: int = 100,
        max_deliveries: int = 5,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_fields: int = DEFAULT_MAX_FIELDS,
        stale_consumer_idle_seconds: float = 3600.0,
        dead_letter_maxlen: int = DEFAULT_DEAD_LETTER_MAXLEN,
        client: Any = None,
    ) -> None:
        self.redis_conn_id = redis_conn_id
        self.stream = stream
        self.group = group
        self.parser = _parser_path(parser)
        self._parse = _load_parser(self.parser)
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        if self.dead_letter_stream == stream:
            raise ConfigError(f"dead_letter_stream must differ from stream {stream!r}")
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.claim_min_idle_ms = max(0, int(claim_min_idle_seconds * 1000))
        self.block_ms = max(1, int(block_seconds * 1000))
        self.max_in_flight = max(1, int(max_in_flight))
        self.max_deliveries = max(1, int(max_deliveries))
        self.max_entry_bytes = max(1, int(max_entry_bytes))
        self.max_fields = max(1, int(max_fields))
        self.stale_idle_ms = max(0, int(stale_consumer_idle_seconds * 1000))
        self.dead_letter_maxlen = max(1, int(dead_letter_maxlen))
        self._claim_interval = min(_CLAIM_INTERVAL_SECONDS, max(0.05, claim_min_idle_seconds))
        self._sweep_interval = min(_SWEEP_INTERVAL_MAX,
                                   max(_SWEEP_INTERVAL_MIN, stale_consumer_idle_seconds / 4))
        self._client = client  # tests may inject a redis.asyncio client
        self._owns_client = client is None
        self._sweep: Any = None  # the registered Lua script
        # Entries yielded and not yet passed to advance(), with (fields, deliveries) for a
        # dead letter if a watcher rejects them; never yielded twice meanwhile.
        self._in_flight: dict[str, tuple[Mapping, int]] = {}
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._own_cursor: str | None = "0"  # XREADGROUP history cursor; None once read through
        self._claim_cursor = "0-0"  # XAUTOCLAIM scan cursor

    # ------------------------------------------------------------------ connection

    async def _connect(self) -> Any:
        """A ``redis.asyncio`` client on the Airflow connection (bytes replies, RESP2 reply shapes)."""
        return await async_redis_client(
            self.redis_conn_id,
            decode_responses=False,  # entries are decoded (and refused) one by one
            protocol=2,  # fixed reply shapes for XREADGROUP/XAUTOCLAIM/XPENDING
            socket_timeout=self.block_ms / 1000 + _READ_TIMEOUT_MARGIN,
        )

    async def _check_server(self) -> None:
        from redis.exceptions import ResponseError

        try:
            info = await self._client.info("cluster")
        except ResponseError:  # INFO disallowed (ACL): nothing to check
            return
        if str(info.get("cluster_enabled", "0")) == "1":
            raise ConfigError(f"Redis connection {self.redis_conn_id!r} is a cluster; "
                              "RedisStreamTrigger supports a single Redis server only")

    async def _ensure_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            # id 0: entries appended before the group existed are delivered too.
            await self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on stream %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def remove_stale_consumers(self) -> list[str]:
        """Delete the group's consumers idle past ``stale_consumer_idle_seconds`` with nothing pending.

        Returns:
            The names removed (never this consumer's own).
        """
        if self._sweep is None:
            self._sweep = self._client.register_script(_SWEEP_SCRIPT)
        removed = [_text(name) for name in await self._sweep(
            keys=[self.stream], args=[self.group, self.stale_idle_ms, self.consumer])]
        if removed:
            log.info("removed %d stale consumers of %s/%s: %s", len(removed), self.stream, self.group,
                     ", ".join(removed[:20]))
        return removed

    # ------------------------------------------------------------------ reading

    @staticmethod
    def _entries(batch: list) -> list[tuple[str | None, Mapping | None]]:
        return [(None if entry_id is None else _text(entry_id), fields) for entry_id, fields in batch]

    async def _read_own_pending(self, count: int) -> list[tuple[str | None, Mapping | None]]:
        """The next page of entries delivered to this consumer name earlier and never acknowledged."""
        reply = await self._client.xreadgroup(
            self.group, self.consumer, {self.stream: self._own_cursor}, count=count)
        batch = self._entries(reply[0][1] if reply else [])
        self._own_cursor = batch[-1][0] if batch else None
        return batch

    async def _claim_idle(self, count: int) -> list[tuple[str | None, Mapping | None]]:
        """Take over up to ``count`` entries pending (on any consumer) for ``claim_min_idle_seconds``."""
        reply = await self._client.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_min_idle_ms,
            start_id=self._claim_cursor, count=count)
        self._claim_cursor = _text(reply[0])
        batch = self._entries(reply[1])
        if any(entry_id is None for entry_id, _ in batch):
            # Redis 6.2 claims an entry deleted while pending as nil, and keeps it pending;
            # reading the own pending list shows it with its id (no fields): acked there.
            self._own_cursor = "0"
        return batch

    async def _read_new(self, count: int, block_ms: int) -> list[tuple[str | None, Mapping | None]]:
        reply = await self._client.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
        return self._entries(reply[0][1] if reply else [])

    async def _renew_in_flight(self) -> None:
        """Reset the idle time of the entries out with Airflow, without counting a delivery."""
        if self._in_flight:
            await self._client.xclaim(self.stream, self.group, self.consumer, 0,
                                      list(self._in_flight), justid=True)

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        """``times_delivered`` of each pending entry (``XPENDING`` extended form, one per id)."""
        if not entry_ids:
            return {}
        async with self._client.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        return {entry_id: int(rows[0]["times_delivered"])
                for entry_id, rows in zip(entry_ids, replies, strict=True) if rows}

    # ------------------------------------------------------------------ one entry

    def _parse_entry(self, entry_id: str, raw: Mapping) -> dict:
        """Decode and check one entry, then parse it; raises ValueError (or anything the parser raises)."""
        if len(raw) > self.max_fields:
            raise _EntryRefusedError(f"too many fields ({len(raw)} > max_fields={self.max_fields})")
        size = sum(_size(name) + _size(value) for name, value in raw.items())
        if size > self.max_entry_bytes:
            raise _EntryRefusedError(
                f"entry too large ({size} bytes > max_entry_bytes={self.max_entry_bytes})")
        fields: dict[str, str] = {}
        for name, value in raw.items():
            try:
                key = name.decode("utf-8") if isinstance(name, bytes) else name
            except UnicodeDecodeError:
                raise _EntryRefusedError(f"field name '{_escaped(name)[:64]}' is not UTF-8") from None
            try:
                fields[key] = value.decode("utf-8") if isinstance(value, bytes) else value
            except UnicodeDecodeError as exc:
                raise _EntryRefusedError(f"field {key[:64]!r} is not UTF-8 (byte {exc.start})") from None
        result = self._parse(fields)
        if not isinstance(result, dict):
            raise _EntryRefusedError(f"parser returned {type(result).__name__}, not a dict")
        payload = {**result, "request_id": entry_id}
        try:
            json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _EntryRefusedError(f"parser result is not JSON ({str(exc)[:80]})") from None
        return payload

    async def _admit(self, entry_id: str, raw: Mapping | None, deliveries: int) -> dict | None:
        """The event payload of one entry, or None once it is dead-lettered. Never raises (but cancels)."""
        if not raw:
            # XREADGROUP of the pending list shows an entry deleted while pending with no
            # fields (an XADD always has one): nothing to deliver or keep.
            log.info("entry %s of %s was deleted while pending; acknowledging it", entry_id, self.stream)
            await self._ack_quietly([entry_id])
            return None
        if deliveries > self.max_deliveries:
            reason = (f"delivered {deliveries} times without being stored "
                      f"(max_deliveries={self.max_deliveries})")
        else:
            try:
                return self._parse_entry(entry_id, raw)
            except ValueError as exc:
                reason = str(exc) or type(exc).__name__
            except RecursionError:
                reason = "nested too deeply"
            except Exception as exc:  # a parser bug refuses this entry only; it is kept for replay
                log.exception("parser %s failed on entry %s of %s", self.parser, entry_id, self.stream)
                reason = f"parser {self.parser} failed: {type(exc).__name__}: {exc}"
        await self._dead_letter(entry_id, raw, reason, deliveries)
        return None

    def _dead_letter_record(self, entry_id: str, raw: Mapping, reason: str, deliveries: int) -> dict:
        shown: dict[str, str] = {}
        truncated = False
        left = self.max_entry_bytes
        for number, (name, value) in enumerate(raw.items()):
            if left <= 0 or number >= self.max_fields:
                truncated = True
                break
            key, text = _escaped(name), _escaped(value)
            room = max(0, left - min(len(key), _NAME_MAX))
            if len(key) > _NAME_MAX or len(text) > room:
                key, text, truncated = key[:_NAME_MAX], text[:room], True
            shown[key] = text
            left -= len(key) + len(text)
        return {
            "reason": reason[:_REASON_MAX],
            "stream": self.stream,
            "group": self.group,
            "entry_id": entry_id,
            "deliveries": str(deliveries),
            "consumer": self.consumer,
            "fields": json.dumps(shown),
            "truncated": "1" if truncated else "0",
        }

    async def _dead_letter(self, entry_id: str, raw: Mapping, reason: str, deliveries: int) -> bool:
        """Copy one entry to the dead-letter stream, then acknowledge and delete it; never raises.

        Returns:
            Whether it was dead-lettered; if not, it stays pending and is redelivered.
        """
        record = self._dead_letter_record(entry_id, raw, reason, deliveries)
        try:
            await self._client.xadd(self.dead_letter_stream, record,
                                    maxlen=self.dead_letter_maxlen, approximate=True)
        except Exception as exc:  # Redis down, or the dead-letter key is not a stream
            log.error("could not dead-letter entry %s of %s to %s (%s); it stays pending",
                      entry_id, self.stream, self.dead_letter_stream, exc)
            return False
        log.warning("moved entry %s of %s to %s: %s", entry_id, self.stream, self.dead_letter_stream,
                    record["reason"])
        await self._ack_quietly([entry_id])
        return True

    async def _ack(self, entry_ids: list[str]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            await pipe.execute()

    async def _ack_quietly(self, entry_ids: list[str]) -> None:
        try:
            await self._ack(entry_ids)
        except Exception as exc:  # stays pending; handled again when redelivered
            log.warning("could not acknowledge %s on %s (%s); it will come back", entry_ids, self.stream, exc)

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        """Yield ``(payload, entry_id)`` forever; raise only on a non-transient Redis error.

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
        next_sweep = 0.0  # and for stale consumers
        log.info("reading %s as %s/%s (parser %s, dead letters to %s)",
                 self.stream, self.group, self.consumer, self.parser, self.dead_letter_stream)
        while True:
            _raise_if_cancelled()
            deliveries: dict[str, int] = {}
            try:
                if not group_ready:
                    await self._check_server()
                    await self._ensure_group()
                    group_ready = True
                if loop.time() >= next_sweep:
                    try:
                        await self.remove_stale_consumers()
                    except ResponseError as exc:  # EVAL refused (ACL), or no group yet
                        if "NOGROUP" in str(exc):
                            raise
                        log.warning("could not remove stale consumers of %s (%s)", self.stream, exc)
                    next_sweep = loop.time() + self._sweep_interval
                await self._capacity.wait()
                room = self.max_in_flight - len(self._in_flight)
                redelivered = True
                if self._own_cursor is not None:
                    entries = await self._read_own_pending(room)
                elif loop.time() >= next_claim:
                    await self._renew_in_flight()
                    entries = await self._claim_idle(room)
                    more = self._claim_cursor not in ("0-0", "0")
                    if not more:
                        self._claim_cursor = "0-0"
                    next_claim = loop.time() + (0.0 if more else self._claim_interval)
                    entries = [e for e in entries if e[0] is not None and e[0] not in self._in_flight]
                    if not entries and not more:
                        wait_ms = int(max(0.0, next_claim - loop.time()) * 1000)
                        entries = await self._read_new(room, max(1, min(self.block_ms, wait_ms)))
                        redelivered = False
                else:
                    wait_ms = int(max(0.0, next_claim - loop.time()) * 1000)
                    entries = await self._read_new(room, max(1, min(self.block_ms, wait_ms)))
                    redelivered = False
                entries = [e for e in entries if e[0] is not None and e[0] not in self._in_flight]
                if redelivered:
                    deliveries = await self._delivery_counts([entry_id for entry_id, _ in entries])
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
            for entry_id, raw in entries:
                count = deliveries.get(entry_id, 1)
                payload = await self._admit(entry_id, raw, count)
                _raise_if_cancelled()
                if payload is None:
                    continue
                self._in_flight[entry_id] = (raw, count)
                if len(self._in_flight) >= self.max_in_flight:
                    self._capacity.clear()
                yield payload, entry_id

    # ------------------------------------------------------------------ acknowledging

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        """Acknowledge what every subscriber accepted, dead-letter rejects, leave the rest pending."""
        done: list[str] = []
        rejected: list[tuple[str, Mapping, int]] = []
        for item in batch:
            entry_id = item.broker_payload
            raw, deliveries = self._in_flight.pop(entry_id, ({}, 0))
            outcome = item.outcome
            if outcome.is_clean:
                done.append(entry_id)
            elif outcome.rejected and not outcome.failed:
                rejected.append((entry_id, raw, deliveries))
            else:
                # Not stored (ack timeout, overflow, or no subscriber online): stays pending,
                # claimed again after claim_min_idle_seconds, up to max_deliveries times.
                log.warning("entry %s of %s not confirmed (acked=%d failed=%d); left for redelivery",
                            entry_id, self.stream, outcome.acked, outcome.failed)
        if len(self._in_flight) < self.max_in_flight:
            self._capacity.set()
        for entry_id, raw, deliveries in rejected:
            await self._dead_letter(entry_id, raw, "rejected by the watcher", deliveries)
        if not done:
            return
        for attempt in range(1, _ADVANCE_ATTEMPTS + 1):
            try:
                await self._ack(done)
                return
            except Exception as exc:  # a failed ack only means a redelivery later
                if attempt == _ADVANCE_ATTEMPTS:
                    log.warning("could not acknowledge %d entries of %s (%s); they will be delivered again",
                                len(done), self.stream, exc)
                    return
                await asyncio.sleep(0.5 * attempt)

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None


class RedisStreamTrigger(BaseEventTrigger):
    """Fire one event per entry appended to a Redis Stream (ack mode; see the module docstring).

    The defaults read the ICS sync requests (``almanac.ics.requests``).

    Parameters:
        redis_conn_id: Airflow connection of the Redis server.
        stream: stream key.
        group: consumer group (created with ``MKSTREAM`` from id ``0`` if missing).
        parser: dotted path of a module-level ``fields -> dict`` function (or the function
            itself, stored as its path); raises ``ValueError`` to refuse an entry.
        dead_letter_stream: where refused entries go; default ``<stream>:dead``.
        consumer: consumer name; default ``<host>:<pid>`` of the triggerer.
        claim_min_idle_seconds: how long an entry must have been pending before another
            consumer (or this one, after a failed store) takes it over.
        block_seconds: ``XREADGROUP BLOCK`` time.
        max_in_flight: entries handed to Airflow and not yet acknowledged, at most.
        max_deliveries: deliveries after which a still unstored entry is dead-lettered.
        max_entry_bytes: largest entry (names and values) read; larger is dead-lettered.
        max_fields: most fields per entry; more is dead-lettered.
        stale_consumer_idle_seconds: idle time after which a consumer of the group with
            nothing pending is deleted.
        dead_letter_maxlen: approximate cap of the dead-letter stream (``MAXLEN ~``).
    """

    def __init__(
        self,
        *,
        redis_conn_id: str = REDIS_CONN_ID,
        stream: str = STREAM_KEY,
        group: str = CONSUMER_GROUP,
        parser: str | Callable[..., dict] = PARSER,
        dead_letter_stream: str | None = None,
        consumer: str | None = None,
        claim_min_idle_seconds: float = 20.0,
        block_seconds: float = 5.0,
        max_in_flight: int = 100,
        max_deliveries: int = 5,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_fields: int = DEFAULT_MAX_FIELDS,
        stale_consumer_idle_seconds: float = 3600.0,
        dead_letter_maxlen: int = DEFAULT_DEAD_LETTER_MAXLEN,
    ) -> None:
        super().__init__()
        self.redis_conn_id = redis_conn_id
        self.stream = stream
        self.group = group
        self.parser = _parser_path(parser)  # imported by the producer, not at DAG parse time
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        if self.dead_letter_stream == stream:
            raise ValueError(f"dead_letter_stream must differ from stream {stream!r}")
        self.consumer = consumer
        self.claim_min_idle_seconds = claim_min_idle_seconds
        self.block_seconds = block_seconds
        self.max_in_flight = max_in_flight
        self.max_deliveries = max_deliveries
        self.max_entry_bytes = max_entry_bytes
        self.max_fields = max_fields
        self.stale_consumer_idle_seconds = stale_consumer_idle_seconds
        self.dead_letter_maxlen = dead_letter_maxlen

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (_CLASSPATH, {
            "redis_conn_id": self.redis_conn_id,
            "stream": self.stream,
            "group": self.group,
            "parser": self.parser,
            "dead_letter_stream": self.dead_letter_stream,
            "consumer": self.consumer,
            "claim_min_idle_seconds": self.claim_min_idle_seconds,
            "block_seconds": self.block_seconds,
            "max_in_flight": self.max_in_flight,
            "max_deliveries": self.max_deliveries,
            "max_entry_bytes": self.max_entry_bytes,
            "max_fields": self.max_fields,
            "stale_consumer_idle_seconds": self.stale_consumer_idle_seconds,
            "dead_letter_maxlen": self.dead_letter_maxlen,
        })

    def shared_stream_key(self) -> Hashable | None:
        """One consumer per (connection, stream, group) in a triggerer, however many watchers use it."""
        return ("almanac-redis-stream", self.redis_conn_id, self.stream, self.group)

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        return RedisStreamProducer(**kwargs)

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        # Yield before pulling the next raw event: that binds the event to its entry. A copy:
        # the raw event is shared by every subscriber.
        async for payload in shared_stream:
            yield TriggerEvent(dict(payload))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Standalone fallback (the triggerer uses the shared stream instead).

        Not persistence-gated: an entry is acknowledged when the caller asks for the
        next event after it.
        """
        producer = RedisStreamProducer(**self.serialize()[1])
        stream = producer.open_stream()
        try:
            async for payload, entry_id in stream:
                yield TriggerEvent(payload)
                await producer.advance([AdvanceItem(entry_id, AdvanceOutcome(acked=1, failed=0))])
        finally:
            await stream.aclose()
            await producer.aclose()

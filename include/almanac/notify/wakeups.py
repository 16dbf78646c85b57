"""Notifications: the Redis stream the backend wakes ``notification_dispatch`` with.

After enqueueing (and committing), the backend may append an entry to ``STREAM_KEY`` so the
message goes out within seconds instead of at the next minute::

    redis-cli XADD almanac:notify:wakeups '*' notification_id 42    # or just: ... '*' wake 1

    from almanac.notify.wakeups import push_wakeup
    push_wakeup(redis.Redis.from_url(url), 42)

The entry only wakes the dispatcher: what is sent is always what the outbox holds (an id that is
not in the outbox sends nothing). Airflow's ``RedisStreamTrigger`` reads the stream with
``CONSUMER_GROUP`` and parses each entry with ``parse_wakeup``; an entry it cannot read goes to
``DEAD_LETTER_STREAM`` with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from almanac.batches import as_entity_id
from almanac.errors import PermanentError

__all__ = ["CONSUMER_GROUP", "DEAD_LETTER_STREAM", "PARSER", "STREAM_KEY", "parse_wakeup", "push_wakeup"]

STREAM_KEY = "almanac:notify:wakeups"
CONSUMER_GROUP = "almanac-airflow"
DEAD_LETTER_STREAM = STREAM_KEY + ":dead"
PARSER = f"{__name__}.parse_wakeup"


class InvalidWakeupError(PermanentError, ValueError):
    """A wake-up entry's ``notification_id`` is not an id. Fix the producer; the entry is in the
    dead-letter stream with this reason."""


def parse_wakeup(fields: Mapping[str, str]) -> dict:
    """``{"notification_id": N}``, or ``{}`` for a bare wake-up (any other fields)."""
    raw = fields.get("notification_id")
    if raw is None:
        return {}
    try:
        return {"notification_id": as_entity_id(raw)}
    except ValueError as exc:
        raise InvalidWakeupError(f"notification_id: {exc}") from exc


def push_wakeup(redis_client, notification_id: int | None = None, *, stream: str = STREAM_KEY) -> str:
    """Append one wake-up; returns its entry id."""
    fields = {"notification_id": str(notification_id)} if notification_id is not None else {"wake": "1"}
    entry = redis_client.xadd(stream, fields)
    return entry.decode() if isinstance(entry, bytes) else entry

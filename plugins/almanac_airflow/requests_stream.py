"""The Redis Stream on which the product's backend asks for an on-demand ICS sync of one calendar.

The backend appends one entry per request; Airflow's ``RedisStreamTrigger``
(``almanac_airflow.triggers``) reads it with the ``almanac-airflow`` consumer group and
turns every entry into an asset event. The wire format, shared by both sides:

* field ``calendar_id`` — the calendar's id as a decimal integer (preferred), or
* field ``payload`` — JSON ``{"calendar_id": N}``.

Anything else is logged with its entry id, acknowledged and dropped by the reader.

Push from any backend (no Airflow needed; this module imports only the stdlib)::

    redis-cli XADD almanac:ics_sync:requests '*' calendar_id 42

    import redis
    from almanac_airflow.requests_stream import push_sync_request
    push_sync_request(redis.Redis.from_url(url), 42)   # -> "1719830000000-0", the request id

Entries are removed from the stream once Airflow has recorded them, so the stream only
ever holds requests not yet handed to Airflow. Do not trim it (``MAXLEN``) and do not
attach other consumer groups to it: it is a work queue, not a log.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONSUMER_GROUP", "STREAM_KEY", "push_sync_request"]

#: The stream the backend appends to.
STREAM_KEY = "almanac:ics_sync:requests"
#: The consumer group Airflow's triggerer reads it with.
CONSUMER_GROUP = "almanac-airflow"


def push_sync_request(client: Any, calendar_id: int, *, stream: str = STREAM_KEY) -> str:
    """Ask Airflow to sync one calendar's ICS feed now.

    Parameters:
        client: a synchronous ``redis.Redis`` client on the database Airflow's
            ``redis_default`` connection points at.
        calendar_id: the calendar to sync (a positive integer).
        stream: the stream key; only tests pass another one.

    Returns:
        The stream entry id, which Airflow carries on as the event's ``request_id``.

    Raises:
        ValueError: ``calendar_id`` is not a positive integer (never written).
    """
    if isinstance(calendar_id, bool) or not isinstance(calendar_id, int) or calendar_id <= 0:
        raise ValueError(f"calendar_id must be a positive integer, got {calendar_id!r}")
    entry_id = client.xadd(stream, {"calendar_id": str(calendar_id)})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

"""On-demand ICS sync requests: the Redis stream format the backend writes and ``ics_sync_requested`` reads.

The product's backend appends one entry per request to ``STREAM_KEY``; Airflow's
``RedisStreamTrigger`` (``almanac_airflow.triggers``) reads it with ``CONSUMER_GROUP``,
parses every entry with ``parse_request`` and turns it into one asset event. An entry
carries either

* field ``calendar_id`` — the calendar's id as a decimal integer (preferred), or
* field ``payload`` — JSON ``{"calendar_id": N}`` (``N`` an integer; ``42.0`` is read as 42).

Other fields are ignored. An entry that does not parse is moved to ``DEAD_LETTER_STREAM``
with the reason (see ``almanac_airflow.triggers`` for inspecting and replaying them).

Push from any backend (this module needs only the stdlib and a redis-py client)::

    redis-cli XADD almanac:ics_sync:requests '*' calendar_id 42

    from almanac.ics.requests import push_sync_request
    push_sync_request(redis.Redis.from_url(url), 42)   # -> "1719830000000-0", the request id

Entries are removed from the stream once Airflow has recorded them, so the stream only
holds requests not yet handed to Airflow. Do not trim it (``MAXLEN``) and do not attach
other consumer groups to it: it is a work queue, not a log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from almanac.stream_requests import MAX_PAYLOAD_CHARS, EntityRequests, InvalidRequestError

__all__ = [
    "CONSUMER_GROUP",
    "DEAD_LETTER_STREAM",
    "MAX_PAYLOAD_CHARS",
    "PARSER",
    "REQUESTS",
    "STREAM_KEY",
    "InvalidRequestError",
    "parse_request",
    "push_sync_request",
    "requested_calendar_ids",
]

#: The format: entries naming one calendar (``almanac.stream_requests`` reads and writes it).
REQUESTS = EntityRequests(stream="almanac:ics_sync:requests", field="calendar_id", logger=__name__)
#: The stream the backend appends to.
STREAM_KEY = REQUESTS.stream
#: The consumer group Airflow's triggerer reads it with.
CONSUMER_GROUP = REQUESTS.group
#: Where entries that cannot be read are moved, with the reason.
DEAD_LETTER_STREAM = REQUESTS.dead_letter_stream
#: Dotted path of ``parse_request``, as ``RedisStreamTrigger(parser=...)`` takes it.
PARSER = f"{__name__}.parse_request"


def parse_request(fields: Mapping[str, str]) -> dict:
    """Read one stream entry's (decoded) fields as a sync request: ``{"calendar_id": N}``.

    Raises:
        InvalidRequestError: no ``calendar_id``/``payload`` field, bad or oversized JSON
            (over ``MAX_PAYLOAD_CHARS``), or an id that is not a positive integer.
    """
    return REQUESTS.parse(fields)


def push_sync_request(client: Any, calendar_id: int, *, stream: str = STREAM_KEY) -> str:
    """Ask Airflow to sync one calendar's ICS feed now; returns the stream entry id (the event's
    ``request_id``). ``client``: a ``redis.Redis`` on ``redis_default``'s database.

    Raises:
        InvalidRequestError: ``calendar_id`` is not a positive ``int`` (nothing is written).
    """
    return REQUESTS.push(client, calendar_id, stream=stream)


def requested_calendar_ids(extras: Iterable[Any]) -> list[int]:
    """The calendar ids asked for by a run's asset events (their ``extra``), sorted and unique;
    an event without a valid ``calendar_id`` is logged and skipped."""
    return REQUESTS.requested_ids(extras)

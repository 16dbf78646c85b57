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

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from almanac.batches import as_entity_id
from almanac.errors import PermanentError

__all__ = [
    "CONSUMER_GROUP",
    "DEAD_LETTER_STREAM",
    "MAX_PAYLOAD_CHARS",
    "PARSER",
    "STREAM_KEY",
    "InvalidRequestError",
    "parse_request",
    "push_sync_request",
    "requested_calendar_ids",
]

log = logging.getLogger(__name__)

#: The stream the backend appends to.
STREAM_KEY = "almanac:ics_sync:requests"
#: The consumer group Airflow's triggerer reads it with.
CONSUMER_GROUP = "almanac-airflow"
#: Where entries that cannot be read are moved, with the reason.
DEAD_LETTER_STREAM = STREAM_KEY + ":dead"
#: Dotted path of ``parse_request``, as ``RedisStreamTrigger(parser=...)`` takes it.
PARSER = f"{__name__}.parse_request"
#: Longest ``payload`` field read as JSON (a request is ~20 characters); longer is refused
#: before parsing, so a huge or deeply nested document never reaches the JSON parser.
MAX_PAYLOAD_CHARS = 1024


class InvalidRequestError(PermanentError, ValueError):
    """A stream entry is not a valid sync request; ``reason`` says why in operator terms.

    What to do: fix the producer that wrote it (the entry is in the dead-letter stream
    with this reason); replaying the same entry fails the same way.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _json_object(text: str) -> dict:
    if len(text) > MAX_PAYLOAD_CHARS:
        raise InvalidRequestError(f"payload is too long ({len(text)} > {MAX_PAYLOAD_CHARS} characters)")
    try:
        body = json.loads(text)
    except RecursionError:
        raise InvalidRequestError("payload is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers past int_max_str_digits
        raise InvalidRequestError(f"payload is not JSON ({str(exc)[:80]})") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"payload is not a JSON object (got {type(body).__name__})")
    return body


def parse_request(fields: Mapping[str, str]) -> dict:
    """Read one stream entry's (decoded) fields as a sync request.

    Parameters:
        fields: the entry's field names and values, as text.

    Returns:
        ``{"calendar_id": N}`` with ``N`` a positive ``int``.

    Raises:
        InvalidRequestError: no ``calendar_id``/``payload`` field, bad or oversized JSON, or
            an id that is not a positive integer (``True``, ``"1.5"``, ``-3``, 5,000 digits).
    """
    if "calendar_id" in fields:
        raw: Any = fields["calendar_id"]
    elif "payload" in fields:
        body = _json_object(fields["payload"])
        if "calendar_id" not in body:
            raise InvalidRequestError("payload has no calendar_id")
        raw = body["calendar_id"]
    else:
        raise InvalidRequestError("no calendar_id or payload field")
    try:
        return {"calendar_id": as_entity_id(raw)}
    except ValueError as exc:
        raise InvalidRequestError(f"calendar_id: {str(exc)[:80]}") from None


def push_sync_request(client: Any, calendar_id: int, *, stream: str = STREAM_KEY) -> str:
    """Ask Airflow to sync one calendar's ICS feed now.

    Parameters:
        client: a synchronous ``redis.Redis`` client on the database Airflow's
            ``redis_default`` connection points at.
        calendar_id: the calendar to sync (a positive ``int``).
        stream: the stream key; only tests pass another one.

    Returns:
        The stream entry id, which Airflow carries on as the event's ``request_id``.

    Raises:
        InvalidRequestError: ``calendar_id`` is not a positive ``int`` (nothing is written).
    """
    if isinstance(calendar_id, bool) or not isinstance(calendar_id, int):
        raise InvalidRequestError(f"calendar_id must be an int, got {type(calendar_id).__name__}")
    try:
        calendar_id = as_entity_id(calendar_id)
    except ValueError as exc:
        raise InvalidRequestError(f"calendar_id: {exc}") from None
    entry_id = client.xadd(stream, {"calendar_id": str(calendar_id)})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def requested_calendar_ids(extras: Iterable[Any]) -> list[int]:
    """The calendar ids asked for by a run's asset events, sorted and unique.

    Parameters:
        extras: the ``extra`` of each asset event, as the trigger stores it:
            ``{"from_trigger": True, "payload": {"calendar_id": 42, "request_id": "..."}}``.

    Returns:
        The valid ids; an event without a valid ``calendar_id`` is logged and skipped.
    """
    ids: set[int] = set()
    for extra in extras:
        payload = extra.get("payload") if isinstance(extra, Mapping) else None
        if not isinstance(payload, Mapping) or "calendar_id" not in payload:
            log.warning("ignoring an asset event without a calendar_id (extra keys: %s)",
                        sorted(map(str, extra))[:10] if isinstance(extra, Mapping) else type(extra).__name__)
            continue
        try:
            ids.add(as_entity_id(payload["calendar_id"]))
        except ValueError as exc:
            log.warning("ignoring request %.40s: calendar_id %.80s", payload.get("request_id"), exc)
    return sorted(ids)

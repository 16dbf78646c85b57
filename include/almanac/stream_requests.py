"""Requests on a Redis stream that name one entity: the format the product's backend writes and
Airflow's ``RedisStreamTrigger`` (``almanac_airflow.triggers``) reads.

One format per job, e.g. ICS sync requests (``almanac.ics.requests``: ``calendar_id``) and token
refresh requests (``almanac.integrations.requests``: ``integration_id``). An entry carries either

* the id field itself — the entity's id as a decimal integer (preferred), or
* field ``payload`` — JSON ``{"<id field>": N}`` (``N`` an integer; ``42.0`` is read as 42).

Other fields are ignored. An entry that does not parse is moved to the dead-letter stream
(``<stream>:dead``) with the reason. Entries are removed from the stream once Airflow has
recorded them, so the stream only holds requests not yet handed to Airflow: do not trim it
(``MAXLEN``) and do not attach other consumer groups to it — it is a work queue, not a log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from almanac.batches import as_entity_id
from almanac.errors import PermanentError

__all__ = ["CONSUMER_GROUP", "MAX_PAYLOAD_CHARS", "EntityRequests", "InvalidRequestError"]

#: The consumer group Airflow's triggerer reads every request stream with.
CONSUMER_GROUP = "almanac-airflow"
#: Longest ``payload`` field read as JSON (a request is ~20 characters); longer is refused
#: before parsing, so a huge or deeply nested document never reaches the JSON parser.
MAX_PAYLOAD_CHARS = 1024


class InvalidRequestError(PermanentError, ValueError):
    """A stream entry is not a valid request; ``reason`` says why in operator terms.

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


@dataclass(frozen=True)
class EntityRequests:
    """One request stream: its key, the id field, and how to read, write and collect requests."""

    stream: str
    field: str
    logger: str = __name__
    group: str = CONSUMER_GROUP

    @property
    def dead_letter_stream(self) -> str:
        return self.stream + ":dead"

    def parse(self, fields: Mapping[str, str]) -> dict:
        """One entry's (decoded) fields as ``{<field>: N}``, ``N`` a positive ``int``.

        Raises:
            InvalidRequestError: no id/``payload`` field, bad or oversized JSON, or an id that
                is not a positive integer (``True``, ``"1.5"``, ``-3``, 5,000 digits).
        """
        name = self.field
        if name in fields:
            raw: Any = fields[name]
        elif "payload" in fields:
            body = _json_object(fields["payload"])
            if name not in body:
                raise InvalidRequestError(f"payload has no {name}")
            raw = body[name]
        else:
            raise InvalidRequestError(f"no {name} or payload field")
        try:
            return {name: as_entity_id(raw)}
        except ValueError as exc:
            raise InvalidRequestError(f"{name}: {str(exc)[:80]}") from None

    def push(self, client: Any, entity_id: int, *, stream: str | None = None) -> str:
        """Append one request (``XADD <stream> * <field> <id>``); returns the entry id, which
        Airflow carries on as the event's ``request_id``.

        Parameters:
            client: a synchronous ``redis.Redis`` client on ``redis_default``'s database.
            stream: another stream key; only tests pass one.
        Raises:
            InvalidRequestError: ``entity_id`` is not a positive ``int`` (nothing is written).
        """
        if isinstance(entity_id, bool) or not isinstance(entity_id, int):
            raise InvalidRequestError(f"{self.field} must be an int, got {type(entity_id).__name__}")
        try:
            entity_id = as_entity_id(entity_id)
        except ValueError as exc:
            raise InvalidRequestError(f"{self.field}: {exc}") from None
        entry_id = client.xadd(stream or self.stream, {self.field: str(entity_id)})
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def requested_ids(self, extras: Iterable[Any]) -> list[int]:
        """The ids asked for by a run's asset events, sorted and unique.

        Parameters:
            extras: the ``extra`` of each asset event, as the trigger stores it:
                ``{"from_trigger": True, "payload": {<field>: 42, "request_id": "..."}}``.
        Returns:
            The valid ids; an event without a valid id is logged and skipped.
        """
        log = logging.getLogger(self.logger)
        ids: set[int] = set()
        for extra in extras:
            payload = extra.get("payload") if isinstance(extra, Mapping) else None
            if not isinstance(payload, Mapping) or self.field not in payload:
                log.warning(
                    "ignoring an asset event without a %s (extra keys: %s)", self.field,
                    sorted(map(str, extra))[:10] if isinstance(extra, Mapping) else type(extra).__name__,
                )
                continue
            try:
                ids.add(as_entity_id(payload[self.field]))
            except ValueError as exc:
                log.warning("ignoring request %.40s: %s %.80s", payload.get("request_id"), self.field, exc)
        return sorted(ids)

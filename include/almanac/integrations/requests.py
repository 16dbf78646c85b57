"""On-demand token refresh requests on Redis: what the product's backend writes and
``oauth_token_refresh`` reads (the format is ``almanac.stream_requests``'s, with ``integration_id``).

    redis-cli XADD almanac:oauth_refresh:requests '*' integration_id 42

    from almanac.integrations.requests import push_refresh_request
    push_refresh_request(redis.Redis.from_url(url), 42)   # -> the request id

Refused entries go to ``almanac:oauth_refresh:requests:dead`` with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from almanac.stream_requests import EntityRequests, InvalidRequestError

__all__ = [
    "CONSUMER_GROUP",
    "DEAD_LETTER_STREAM",
    "PARSER",
    "REQUESTS",
    "STREAM_KEY",
    "InvalidRequestError",
    "parse_request",
    "push_refresh_request",
    "requested_integration_ids",
]

REQUESTS = EntityRequests(stream="almanac:oauth_refresh:requests", field="integration_id", logger=__name__)
STREAM_KEY = REQUESTS.stream
CONSUMER_GROUP = REQUESTS.group
DEAD_LETTER_STREAM = REQUESTS.dead_letter_stream
#: Dotted path of ``parse_request``, as ``RedisStreamTrigger(parser=...)`` takes it.
PARSER = f"{__name__}.parse_request"


def parse_request(fields: Mapping[str, str]) -> dict:
    """One entry's fields as ``{"integration_id": N}``; raises ``InvalidRequestError``."""
    return REQUESTS.parse(fields)


def push_refresh_request(client: Any, integration_id: int) -> str:
    """Ask Airflow to refresh one integration's tokens now; returns the stream entry id."""
    return REQUESTS.push(client, integration_id)


def requested_integration_ids(extras: Iterable[Any]) -> list[int]:
    """The integration ids asked for by a run's asset events, sorted and unique."""
    return REQUESTS.requested_ids(extras)

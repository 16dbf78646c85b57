"""The Assets Almanac's DAGs produce and consume (data-aware scheduling)."""

from __future__ import annotations

from airflow.sdk import Asset

__all__ = ["ICS_CALENDARS_CHANGED"]

#: Emitted by ics_sync when calendars' events changed; the event's extra carries
#: ``{"calendar_ids": [...]}``. google_calendar_push is scheduled on it.
ICS_CALENDARS_CHANGED = Asset("almanac://ics/calendars-changed")


def _stream_asset(requests, uri: str, watcher_name: str):
    """An Asset watched on the Redis request stream of ``requests`` (an ``almanac.*.requests``
    module: ``STREAM_KEY``, ``CONSUMER_GROUP``, ``PARSER``, ``DEAD_LETTER_STREAM``)."""
    from airflow.sdk import AssetWatcher

    from almanac_airflow.triggers import RedisStreamTrigger

    trigger = RedisStreamTrigger(
        stream=requests.STREAM_KEY,
        group=requests.CONSUMER_GROUP,
        parser=requests.PARSER,
        dead_letter_stream=requests.DEAD_LETTER_STREAM,
    )
    return Asset(uri, watchers=[AssetWatcher(name=watcher_name, trigger=trigger)])


def ics_sync_requests():
    """The Asset the product's backend feeds through Redis (see ``almanac_airflow.triggers``).

    One event per entry of ``almanac.ics.requests.STREAM_KEY``; the event's extra carries
    ``{"payload": {"calendar_id": N, "request_id": "<entry id>"}}`` (read it back with
    ``almanac.ics.requests.requested_calendar_ids``); refused entries go to
    ``DEAD_LETTER_STREAM``. Built on call rather than at import so that only the DAG that
    watches it creates the watcher (one watcher, one consumer of the stream).
    """
    from almanac.ics import requests

    return _stream_asset(requests, "almanac://ics/sync-requests", "ics_sync_requests")


def oauth_refresh_requests():
    """The Asset of on-demand token refresh requests on Redis (``almanac.integrations.requests``).

    One event per entry of ``almanac:oauth_refresh:requests``; the extra carries
    ``{"payload": {"integration_id": N, "request_id": "<entry id>"}}``. Built on call, like
    ``ics_sync_requests``, so only ``oauth_token_refresh`` creates the watcher.
    """
    from almanac.integrations import requests

    return _stream_asset(requests, "almanac://oauth/refresh-requests", "oauth_refresh_requests")

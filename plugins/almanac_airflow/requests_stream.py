"""Deprecated home of the ICS sync request stream names; they live in ``almanac.ics.requests``.

Kept as a re-export so existing imports (README, e2e tests, backends) keep working; new
code imports ``almanac.ics.requests`` (no Airflow needed).
"""

from __future__ import annotations

from almanac.ics.requests import CONSUMER_GROUP, DEAD_LETTER_STREAM, STREAM_KEY, push_sync_request

__all__ = ["CONSUMER_GROUP", "DEAD_LETTER_STREAM", "STREAM_KEY", "push_sync_request"]

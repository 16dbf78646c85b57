"""A second RedisStreamTrigger parser for the tests: notification wake-ups (``almanac:notifications:wake``).

Stands in for the notification dispatcher's format: ``notification_id N`` wakes the
dispatcher for one notification, any other entry (``wake 1``) is a plain wake-up.
"""

from __future__ import annotations

from almanac.batches import as_entity_id

__all__ = ["PARSER", "parse_buggy", "parse_wake"]

PARSER = f"{__name__}.parse_wake"


def parse_wake(fields: dict[str, str]) -> dict:
    """``{"notification_id": N}``, or ``{}`` for an empty wake-up; ValueError for a bad id."""
    if "notification_id" not in fields:
        return {}
    return {"notification_id": as_entity_id(fields["notification_id"])}


def parse_buggy(fields: dict[str, str]) -> dict:
    """A parser with bugs: a KeyError without field ``x``, a list for ``x=list``."""
    if fields["x"] == "list":
        return [fields["x"]]  # type: ignore[return-value]
    return {"x": fields["x"]}

"""Running ``sync_batch`` in tests: against a local feed server, without waiting between retries."""

from __future__ import annotations

from almanac.batches import ItemResult
from almanac.ics.sync import sync_batch


def sync_by_id(db, server, ids, *, instant, settings, sleep=lambda s: None, **kw) -> dict[int, ItemResult]:
    """``sync_batch`` over ``ids`` with the server's hosts let through; results by calendar id,
    in the batch's order."""
    results = sync_batch(
        db, ids, instant=instant, settings=settings, allow_hosts=server.allow_hosts, sleep=sleep, **kw
    )
    return {r.item_id: r for r in results}

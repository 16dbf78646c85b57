"""Connected accounts: OAuth 2 grants of third-party providers, kept fresh and checked (issue 9)."""

from __future__ import annotations

__all__ = ["plan_integration_batches"]


def plan_integration_batches(ids: list[int], settings, extra: dict) -> list[dict]:
    """Integrations cut into mapped batches (settings ``oauth_batch_*``), each carrying ``extra``:
    the one planner of oauth_token_refresh, integration_health and their benchmark."""
    from almanac.batches import plan_batches

    return plan_batches(
        ids, noun="integrations", min_size=settings.oauth_batch_min, max_size=settings.oauth_batch_max,
        target_count=settings.oauth_batch_target_count, extra=extra,
    )

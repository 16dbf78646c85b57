"""Integration health: one cheap authenticated call per integration, never retried.

For each ``active`` or ``expired`` integration, ``check`` makes one ``GET`` of the provider's
``health_url`` with the stored access token (``almanac.integrations.oauth.probe_health``):

- 200 → ``healthy``;
- 401 with a refresh token → ``expired``: the integration becomes ``expired`` and due for
  refresh at once, and its id is listed so ``integration_health`` triggers ``oauth_token_refresh``
  for it; a missing or expired stored access token counts the same, without a call;
- 401 without a refresh token → ``revoked`` (nothing can renew it): ``store.mark_revoked``, and
  the tenant's owner is told once;
- anything else (403, 429, 5xx, a timeout, a refused connection) → ``error``: recorded and
  logged, not retried — the next sweep looks again.

Outcomes per integration (``HEALTH_KIND``): ``updated`` when its health changed (``detail``
says from what to what), ``unchanged`` otherwise, ``skipped`` when it is gone or was revoked
meanwhile or this run already checked it; ``error`` only for our own faults (an unknown
provider, an undecryptable token), which are permanent. Counters: one per health state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime

from almanac.batches import ItemResult, Kind, infrastructure_errors, map_items, rollback_quietly
from almanac.errors import AlmanacError
from almanac.google.crypto import TokenCipher
from almanac.integrations import store
from almanac.integrations.oauth import probe_health
from almanac.integrations.providers import ProviderConfig

__all__ = ["HEALTH_KIND", "HealthChecker"]

log = logging.getLogger(__name__)

HEALTH_KIND = Kind(
    noun="Integrations",
    id_key="integrationId",
    counters=("healthy", "expired", "revoked", "error"),
    max_results=1000,  # a first sweep lists every integration (none -> healthy)
)


class HealthChecker:
    """Checks integrations' health; one per task.

    Parameters:
        cipher: the token key(s).
        provider: ``name -> ProviderConfig``.
        session: ``() -> requests.Session``, one per thread.
        clock: the wall clock a check is recorded at.
        timeout_s: the budget of the one call (connect, and each read).
    """

    def __init__(
        self,
        cipher: TokenCipher,
        provider: Callable[[str], ProviderConfig],
        *,
        session: Callable[[], object],
        clock: Callable[[], datetime],
        timeout_s: float = 10.0,
    ) -> None:
        import threading

        self.cipher = cipher
        self.provider = provider
        self._new_session = session
        self._sessions = threading.local()
        self.clock = clock
        self.timeout_s = timeout_s

    def check_many(
        self,
        connect: Callable[[], AbstractContextManager],
        ids: Sequence[int],
        *,
        checked_since: datetime,
        parallel: int = 8,
    ) -> list[ItemResult]:
        """``check`` each of ``ids``, ``parallel`` at once; one result per id, in order."""
        return map_items(
            connect,
            ids,
            lambda conn, i: self.check(conn, i, checked_since=checked_since),
            parallel=parallel,
            name="integration-health",
        )

    def check(self, conn, integration_id: int, *, checked_since: datetime) -> ItemResult:
        """One integration's health check. ``checked_since``: a check recorded at or after it (by
        this run's earlier try) is not made again. Raises only database faults."""
        try:
            return self._check(conn, integration_id, checked_since)
        except infrastructure_errors():
            raise
        except Exception as exc:  # the item boundary
            log.exception("integration %s: unexpected failure during the health check", integration_id)
            rollback_quietly(conn)
            return ItemResult(
                integration_id, "error", error=f"unexpected {type(exc).__name__}: {str(exc)[:200]}"
            )

    def _check(self, conn, integration_id: int, checked_since: datetime) -> ItemResult:
        row = store.load(conn, [integration_id]).get(integration_id)
        conn.commit()
        if row is None or row.status not in ("active", "expired"):
            reason = "no such integration" if row is None else f"integration {row.status}"
            return ItemResult(integration_id, "skipped", error=reason)
        if row.last_health_check_at is not None and row.last_health_check_at >= checked_since:
            # Checked by this run's earlier try (or a later run): its recorded outcome, not a new call.
            health = row.health_status or "healthy"
            again = {"healthFrom": health, "healthTo": health} if health == "expired" else {}
            return ItemResult(row.id, "unchanged", {health: 1}, detail=again)
        now = self.clock()
        try:
            provider = self.provider(row.provider)
            health, detail = self._probe(row, provider, now)
        except AlmanacError as exc:  # unknown provider, undecryptable token: ours to fix
            reason = f"{type(exc).__name__}: {exc}"
            store.record_health(conn, row.id, "error", reason, now=now)
            conn.commit()
            return ItemResult(row.id, "error", {"error": 1}, error=reason, permanent=True)
        # Judged on the tokens it read: a refresh or reconnect committed meanwhile is not judged.
        if health == "revoked":
            recorded = store.mark_revoked(
                conn, row.id, detail, now=now, health_check=True, seen=row.refresh_token_enc
            )
        else:
            recorded = store.record_health(conn, row.id, health, detail, now=now, probed=row.access_token_enc)
        conn.commit()
        if not recorded:
            return ItemResult(
                row.id, "skipped", error="refreshed or reconnected during the check: not judged"
            )
        if health == "error":
            log.warning("integration %s (%s): health check failed: %s", row.id, row.provider, detail)
        changed = row.health_status != health
        detail_out: dict = {}
        if changed or health == "expired":  # expired: listed every time (a refresh is triggered)
            detail_out = {"healthFrom": row.health_status, "healthTo": health}
            if health != "healthy":
                detail_out["reason"] = detail
        return ItemResult(row.id, "updated" if changed else "unchanged", {health: 1}, detail=detail_out)

    def _probe(self, row: store.Integration, provider: ProviderConfig, now: datetime) -> tuple[str, str]:
        """``(health, detail)`` for one integration: one call at most."""
        refreshable = row.refresh_token_enc is not None
        usable = row.access_token_enc is not None and (
            row.access_token_expires_at is None or row.access_token_expires_at > now
        )
        if not usable:
            if refreshable:
                return "expired", "no unexpired access token stored"
            return "revoked", "no usable access token and no refresh token: the user must connect it again"
        answer = probe_health(
            provider,
            self.cipher.decrypt(row.access_token_enc, what="access token"),
            session=self._session(),
            timeout=self.timeout_s,
        )
        if answer.state == "healthy":
            return "healthy", answer.detail
        if answer.state == "unauthorized":
            if refreshable:
                return "expired", answer.detail
            return "revoked", f"{answer.detail}, and no refresh token: the user must connect it again"
        return "error", answer.detail

    def _session(self):
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = self._new_session()
        return session

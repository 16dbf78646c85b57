"""Refreshing OAuth tokens: the one code path every caller uses.

``Refresher.refresh`` is the only code that decrypts a refresh token, calls a provider's token
endpoint, stores the new tokens (and a rotated refresh token) and records a revocation. It runs
for the scheduled ``oauth_token_refresh`` (what is due by the run's data-interval end), for
on-demand requests (one integration, from the UI, REST, Redis or ``integration_health``) and
at request time inside other jobs (``Refresher.access_token``, e.g. google_calendar_push).

One refresh per integration at a time, across all of them and the product's backend: each
holds the Redis lease ``almanac:lease:oauth_refresh:<id>`` (``almanac.leases``) while it
refreshes, and re-reads the row once it holds it, so a refresh that another holder has just
made is not made again. A holder that finds the lease taken reports ``busy`` (scheduled) or
waits for it and uses the token the other holder stored (request time).

Outcomes per integration (``ItemResult`` of ``REFRESH_KIND``):

- ``updated``: refreshed (``refreshed``; ``rotated`` when the provider replaced the refresh token);
- ``unchanged``: not due any more (refreshed meanwhile), or already refreshed for this request;
- ``skipped``: gone, revoked, no refresh token — or revoked now (``invalid_grant``: ``revoked``
  counted; the tenant's owner is told once through the outbox);
- ``error``: failed after the in-task retries (429/5xx/timeouts) or refused (``invalid_client``,
  an undecryptable token): ``expired`` with the reason, due again after a backoff, ``error``
  after ``max_failures`` failures in a row.

Transactions: ``refresh`` commits on the connection it is given, after each step (a refreshed
token is durable before the call returns: a rotated refresh token must never be lost).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from almanac.batches import ItemResult, Kind, infrastructure_errors, map_items, rollback_quietly
from almanac.errors import AlmanacError, ConfigError, PermanentError, RetryableError
from almanac.google.crypto import TokenCipher
from almanac.integrations import store
from almanac.integrations.oauth import GrantRevokedError, ProviderRefusedError, TokenGrant, refresh_grant
from almanac.integrations.providers import ProviderConfig
from almanac.leases import LeaseKeeper, lease_key
from almanac.retry import RetryPolicy, retry_call

__all__ = ["LEASE_JOB", "REFRESH_KIND", "RefreshBusyError", "RefreshOptions", "Refresher"]

log = logging.getLogger(__name__)

#: ``almanac:lease:oauth_refresh:<integration id>``: the product's own refresh takes it too.
LEASE_JOB = "oauth_refresh"
REFRESH_KIND = Kind(
    noun="Integrations",
    id_key="integrationId",
    counters=("refreshed", "rotated", "revoked", "failed"),
    list_updated=False,  # 10% of all integrations every minute: counted, not listed
    max_results=1000,
)


class RefreshBusyError(RetryableError):
    """Another holder kept refreshing this integration for longer than we could wait. What to do:
    nothing; the next call finds the token it stored."""


class IntegrationUnusableError(PermanentError):
    """The integration cannot give an access token (revoked, gone, never had a refresh token).
    What to do: the user connects the account again."""


@dataclass(frozen=True)
class RefreshOptions:
    """The settings a refresh follows (``Settings.oauth_*``, see ``from_settings``)."""

    lead: timedelta = timedelta(minutes=5)
    backoff_base: timedelta = timedelta(minutes=1)
    backoff_max: timedelta = timedelta(hours=1)
    max_failures: int = 10
    default_lifetime: timedelta = timedelta(hours=1)  # when a provider gives no expires_in
    policy: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(attempts=3, base_wait_s=1.0, max_wait_s=10.0, timeout_s=10.0)
    )
    lease_wait_s: float = 15.0

    @classmethod
    def from_settings(cls, settings) -> RefreshOptions:
        return cls(
            lead=timedelta(seconds=settings.oauth_refresh_lead_s),
            backoff_base=timedelta(seconds=settings.oauth_refresh_backoff_base_s),
            backoff_max=timedelta(seconds=settings.oauth_refresh_backoff_max_s),
            max_failures=settings.oauth_refresh_max_failures,
            default_lifetime=timedelta(seconds=settings.oauth_default_token_lifetime_s),
            policy=RetryPolicy(
                attempts=settings.oauth_request_attempts,
                base_wait_s=1.0,
                max_wait_s=float(settings.oauth_retry_max_wait_s),
                timeout_s=float(settings.oauth_request_timeout_s),
            ),
            lease_wait_s=float(settings.oauth_refresh_lease_wait_s),
        )

    def backoff(self, failures: int) -> timedelta:
        """The wait before the next scheduled try after ``failures`` failures in a row (>= 1)."""
        return min(self.backoff_max, self.backoff_base * 2 ** min(max(failures, 1) - 1, 20))


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Refresher:
    """Refreshes integrations' tokens; one per task (or per request-time user of tokens).

    Parameters:
        cipher: the token key(s).
        provider: ``name -> ProviderConfig`` (the Airflow glue reads connection ``oauth_<name>``);
            raises ``ConfigError`` for an unknown provider.
        leases: the caller's ``LeaseKeeper`` (its owner names the task).
        options: lead time, backoff, retries (``RefreshOptions.from_settings``).
        session: ``() -> requests.Session``; one per thread.
        sleep: waits between in-task retries (tests pass a recorder).
        clock: the wall clock tokens' lifetimes count from (they are physical instants).
    """

    def __init__(
        self,
        cipher: TokenCipher,
        provider: Callable[[str], ProviderConfig],
        leases: LeaseKeeper,
        options: RefreshOptions | None = None,
        *,
        session: Callable[[], object] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.cipher = cipher
        self.provider = provider
        self.leases = leases
        self.options = options or RefreshOptions()
        self._new_session = session or plain_session
        self._sessions = threading.local()
        self.sleep = sleep
        self.clock = clock

    # --- one integration ---------------------------------------------------------------
    def refresh(
        self,
        conn,
        integration_id: int,
        *,
        due_before: datetime | None = None,
        requested_at: datetime | None = None,
        wait_s: float = 0.0,
    ) -> ItemResult:
        """Refresh one integration if it still needs it; never raises for the item's own fault.

        Parameters:
            due_before: scheduled mode: only if ``next_refresh_at`` is before this instant (the
                run's data-interval end) when the lease is held.
            requested_at: on-demand mode: not again if it was refreshed at or after this
                instant (the request's time: a retry or rerun of the request refreshes once).
                Neither: refresh now (request time: the caller's token was refused).
            wait_s: how long to wait for a lease another holder has; 0: report ``busy``.
        Raises:
            Only faults of the database or Redis (the batch is retried).
        """
        try:
            return self._refresh(conn, integration_id, due_before, requested_at, wait_s)
        except infrastructure_errors():
            raise
        except Exception as exc:  # the item boundary: third-party code may fail in any way
            log.exception("integration %s: unexpected failure during refresh", integration_id)
            rollback_quietly(conn)
            return ItemResult(
                integration_id, "error", error=f"unexpected {type(exc).__name__}: {str(exc)[:200]}"
            )

    def _refresh(self, conn, integration_id, due_before, requested_at, wait_s) -> ItemResult:
        lease = self._acquire(integration_id, wait_s)
        if not lease.taken:
            return ItemResult(integration_id, "busy", error="another refresh of this integration is running")
        try:
            row = store.load(conn, [integration_id]).get(integration_id)
            conn.commit()
            skip = self._not_to_refresh(row, due_before, requested_at)
            if skip is not None:
                return ItemResult(integration_id, *skip)
            return self._call_provider(conn, row)
        finally:
            self.leases.release(lease)

    def _acquire(self, integration_id: int, wait_s: float):
        key = lease_key(LEASE_JOB, integration_id)
        deadline = time.monotonic() + wait_s
        while True:
            lease = self.leases.acquire(key)
            if lease.taken or time.monotonic() >= deadline:
                return lease
            time.sleep(0.2)

    @staticmethod
    def _not_to_refresh(row, due_before, requested_at) -> tuple[str, dict, str | None] | None:
        """``(status, counts, reason)`` when the row is not to be refreshed now; None to refresh."""
        if row is None:
            return "skipped", {}, "no such integration"
        if row.status == "revoked":
            return "skipped", {}, "integration revoked: the user must connect it again"
        if row.refresh_token_enc is None:
            return "skipped", {}, "no refresh token stored: the user must connect it again"
        if due_before is not None:
            if row.status not in ("active", "expired"):
                return "skipped", {}, f"integration {row.status}: not refreshed by schedule"
            if row.last_refresh_at is not None and row.last_refresh_at >= due_before:
                return "unchanged", {}, None  # refreshed by this run (a retry, a rerun) or a later one
            if row.next_refresh_at is None or row.next_refresh_at >= due_before:
                if row.status == "expired":  # failed earlier: waiting out its backoff
                    return "skipped", {}, f"waiting to retry until {row.next_refresh_at}: {row.last_error}"
                return "unchanged", {}, None  # refreshed meanwhile
        if (
            requested_at is not None
            and row.last_refresh_at is not None
            and row.last_refresh_at >= requested_at
        ):
            return "unchanged", {}, None  # this request was served already
        return None

    def _call_provider(self, conn, row: store.Integration) -> ItemResult:
        now = self.clock()
        seen = row.refresh_token_enc  # every write below is conditioned on this grant
        try:
            provider = self.provider(row.provider)
            refresh_token = self.cipher.decrypt(row.refresh_token_enc, what="refresh token")
            grant = retry_call(
                lambda: refresh_grant(
                    provider,
                    refresh_token,
                    session=self._session(),
                    now=self.clock(),
                    timeout=self.options.policy.timeout_s,
                ),
                self.options.policy,
                sleep=self.sleep,
                on_retry=lambda attempt, exc, wait: log.info(
                    "integration %s: refresh attempt %d failed (%s); retrying in %.1fs",
                    row.id,
                    attempt,
                    exc,
                    wait,
                ),
            )
        except GrantRevokedError as exc:
            if not store.mark_revoked(conn, row.id, str(exc), now=now, seen=seen):
                conn.commit()
                return self._reconnected(row)
            conn.commit()
            log.warning("integration %s (%s): %s; marked revoked, owner told", row.id, row.provider, exc)
            return ItemResult(
                row.id,
                "skipped",
                {"revoked": 1},
                error=f"revoked: {exc}",
                detail={"integrationStatus": "revoked"},
            )
        except infrastructure_errors():
            raise
        except Exception as exc:  # refused, misconfigured, undecryptable, after the retries, or unexpected
            return self._failed(conn, row, exc, now, seen)
        next_at = self._store(conn, row, grant, seen)
        if next_at is None:
            return self._reconnected(row)
        return ItemResult(
            row.id, "updated", {"refreshed": 1, "rotated": int(grant.refresh_token is not None)}
        )

    def _failed(self, conn, row: store.Integration, exc: Exception, now: datetime, seen) -> ItemResult:
        """Record a failed refresh: the reason, a backoff; counted against the integration unless
        the fault is ours (no or a refused client, an undecryptable token: fixing it is ours)."""
        known = isinstance(exc, AlmanacError)
        if not known:
            log.exception("integration %s: unexpected failure during refresh", row.id)
            rollback_quietly(conn)
        reason = (
            f"{type(exc).__name__}: {exc}" if known else f"unexpected {type(exc).__name__}: {str(exc)[:200]}"
        )
        if isinstance(exc, RetryableError) and self.options.policy.attempts > 1:
            reason += f" (after {self.options.policy.attempts} attempts)"
        ours = isinstance(exc, ConfigError) or (
            isinstance(exc, ProviderRefusedError) and exc.code in ("invalid_client", "unauthorized_client")
        )
        status = store.record_refresh_failure(
            conn,
            row.id,
            reason,
            now=now,
            backoff=self.options.backoff(row.consecutive_failures + 1),
            max_failures=self.options.max_failures,
            counts=not ours,
            seen=seen,
        )
        conn.commit()
        if status == "reconnected":
            return self._reconnected(row)
        log.warning("integration %s (%s): refresh failed, now %s: %s", row.id, row.provider, status, reason)
        return ItemResult(
            row.id,
            "error",
            {"failed": 1},
            error=reason,
            permanent=known and not isinstance(exc, RetryableError),
            detail={"integrationStatus": status},
        )

    @staticmethod
    def _reconnected(row: store.Integration) -> ItemResult:
        log.info("integration %s: reconnected during the refresh; the new grant is kept as it is", row.id)
        return ItemResult(row.id, "unchanged", error="reconnected during the refresh: the new grant is kept")

    def _store(self, conn, row: store.Integration, grant: TokenGrant, seen) -> datetime | None:
        next_at = store.record_refresh(
            conn,
            self.cipher,
            row.id,
            grant,
            now=self.clock(),
            lead=self.options.lead,
            default_lifetime=self.options.default_lifetime,
            seen=seen,
        )
        conn.commit()
        return next_at

    def _session(self):
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = self._new_session()
        return session

    # --- many integrations (a mapped batch) ----------------------------------------------
    def refresh_many(
        self,
        connect: Callable[[], AbstractContextManager],
        ids: Sequence[int],
        *,
        parallel: int = 8,
        due_before: datetime | None = None,
        requested_at: datetime | None = None,
    ) -> list[ItemResult]:
        """``refresh`` each of ``ids`` with up to ``parallel`` in flight, one database connection
        (``connect()``) per worker thread; one result per id, in order."""
        return map_items(
            connect,
            ids,
            lambda conn, i: self.refresh(conn, i, due_before=due_before, requested_at=requested_at),
            parallel=parallel,
            name="oauth-refresh",
        )

    # --- request time --------------------------------------------------------------------
    def access_token(
        self, conn, integration_id: int, *, min_valid: timedelta = timedelta(seconds=60), force: bool = False
    ) -> tuple[str, datetime | None]:
        """A usable access token of the integration and its expiry, refreshed first when it is
        missing, expires within ``min_valid`` or ``force`` (the provider just refused it).

        Raises:
            IntegrationUnusableError: revoked (now or before), gone, no refresh token.
            RetryableError / PermanentError: the refresh failed (recorded on the integration).
        """
        asked = self.clock()
        row = store.load(conn, [integration_id]).get(integration_id)
        conn.commit()
        if not force and row is not None and self._usable(row, min_valid):
            return self.cipher.decrypt(row.access_token_enc, what="access token"), row.access_token_expires_at
        if row is not None and row.status == "error":
            raise IntegrationUnusableError(
                f"integration {integration_id}: refreshes failed {row.consecutive_failures} times in a row "
                f"(last: {row.last_error}); retry it once fixed: almanac integrations retry {integration_id}"
            )
        if (
            row is not None
            and row.status == "expired"
            and row.next_refresh_at
            and row.next_refresh_at > asked
        ):
            raise RetryableError(  # its backoff holds at request time too
                f"integration {integration_id}: the last refresh failed, next try at {row.next_refresh_at}: "
                f"{row.last_error}"
            )
        before = row.access_token_enc if row is not None else None
        # A refresh another holder makes from now on serves this request too ("unchanged").
        result = self.refresh(conn, integration_id, requested_at=asked, wait_s=self.options.lease_wait_s)
        row = store.load(conn, [integration_id]).get(integration_id)
        conn.commit()
        if row is None or row.status == "revoked" or row.refresh_token_enc is None:
            raise IntegrationUnusableError(
                f"integration {integration_id}: {result.error or 'revoked'}"
                if row
                else f"no integration {integration_id}"
            )
        if result.status == "busy" and row.access_token_enc == before:
            raise RefreshBusyError(
                f"integration {integration_id}: another refresh held the lease for "
                f"{self.options.lease_wait_s:.0f}s"
            )
        if result.status == "error":
            error = RetryableError if not result.permanent else PermanentError
            raise error(f"integration {integration_id}: {result.error}")
        if row.access_token_enc is None:
            raise IntegrationUnusableError(f"integration {integration_id}: no access token after refresh")
        return self.cipher.decrypt(row.access_token_enc, what="access token"), row.access_token_expires_at

    def _usable(self, row: store.Integration, min_valid: timedelta) -> bool:
        return (
            row.status in ("active", "expired")
            and row.access_token_enc is not None
            and row.access_token_expires_at is not None
            and row.access_token_expires_at > self.clock() + min_valid
        )


def plain_session():
    """A ``requests.Session`` for provider calls: no proxy, netrc or CA settings from the environment."""
    import requests

    session = requests.Session()
    session.trust_env = False  # no proxy or netrc from the environment for provider calls
    return session

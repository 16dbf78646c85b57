"""The ``integrations`` table: connected accounts, their encrypted tokens, status and health.

Statuses (``integrations.status``)::

    active ──refresh failed (after the in-task retries)──> expired ──refresh ok──> active
      │  └──health check: 401──────────────────────────────> expired
      │                                   expired ──``oauth_refresh_max_failures`` in a row──> error
      └──invalid_grant (refresh), or 401 with no refresh token (health)──> revoked (owner told once)

A reconnect (``connect``) makes any of them ``active`` again and forgets the revocation.
``next_refresh_at`` is when ``oauth_token_refresh`` refreshes next: the expiry minus the lead
time after a refresh, a backoff after a failure, at once after a 401 or a new grant.

Transactions: every function here runs in the caller's transaction and leaves the commit to
the caller (``almanac.integrations.refresh`` commits after each step it takes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from psycopg.rows import class_row, dict_row

from almanac.google.crypto import TokenCipher
from almanac.integrations.oauth import TokenGrant
from almanac.integrations.providers import conn_id

__all__ = [
    "HEALTH_STATES",
    "STATUSES",
    "Integration",
    "connect",
    "due_for_health_check",
    "due_for_refresh",
    "load",
    "mark_revoked",
    "next_refresh_after",
    "record_health",
    "record_refresh",
    "record_refresh_failure",
    "reencrypt",
    "retry_errored",
    "states",
]

STATUSES = ("active", "expired", "revoked", "error")
HEALTH_STATES = ("healthy", "expired", "revoked", "error")
MAX_ERROR_CHARS = 1000
#: ``refresh_token_enc`` as read before a refresh: writes that follow are conditioned on it, so a
#: reconnect committed meanwhile (a new grant) is never overwritten by the old grant's outcome.
ANY_GRANT = object()


def _text(reason: str | None) -> str | None:
    """An operator-readable reason as stored: NUL-free (PostgreSQL text refuses it), bounded."""
    return reason.replace("\x00", "")[:MAX_ERROR_CHARS] if reason is not None else None


def _grant_clause(seen) -> str:
    return "" if seen is ANY_GRANT else " AND refresh_token_enc IS NOT DISTINCT FROM %(seen)s"
_COLUMNS = (
    "id, tenant_id, user_id, provider, account_subject, scopes, status, refresh_token_enc, "
    "access_token_enc, access_token_expires_at, last_refresh_at, next_refresh_at, "
    "consecutive_failures, revoked_at, last_error, health_status, last_health_check_at"
)


@dataclass(frozen=True)
class Integration:
    """One connected account, tokens still encrypted (only ``almanac.integrations`` decrypts)."""

    id: int
    tenant_id: int
    user_id: int | None
    provider: str
    account_subject: str | None
    scopes: list[str] | None
    status: str
    refresh_token_enc: str | None = field(repr=False)
    access_token_enc: str | None = field(repr=False)
    access_token_expires_at: datetime | None
    last_refresh_at: datetime | None
    next_refresh_at: datetime | None
    consecutive_failures: int
    revoked_at: datetime | None
    last_error: str | None = None
    health_status: str | None = None
    last_health_check_at: datetime | None = None


def next_refresh_after(expires_at: datetime, lead: timedelta) -> datetime:
    """When to refresh a token valid until ``expires_at``: ``lead`` before it (a token living
    shorter than the lead is due at every run, which is what it needs)."""
    return expires_at - lead


def connect(
    conn,
    cipher: TokenCipher,
    *,
    tenant_id: int,
    provider: str,
    refresh_token: str | None,
    user_id: int | None = None,
    access_token: str | None = None,
    expires_at: datetime | None = None,
    scopes: Sequence[str] | None = None,
    account_subject: str | None = None,
    now: datetime,
    lead: timedelta = timedelta(minutes=5),
) -> int:
    """Store (or replace) a grant, as the product does after the OAuth consent; returns its id.

    One integration per (user, provider), or per (tenant, provider) when ``user_id`` is None.
    A reconnect replaces the tokens and makes it ``active`` again (a later revocation is a new
    one, told to the owner again). Does not commit.
    """
    conn_id(provider)  # a provider name the connection id can be made of
    if access_token and expires_at is not None:
        next_at = next_refresh_after(expires_at, lead)
    else:
        next_at = now  # nothing usable yet: refresh at the next run
    target = (
        "(user_id, provider) WHERE user_id IS NOT NULL"
        if user_id is not None
        else ("(tenant_id, provider) WHERE user_id IS NULL")
    )
    row = conn.execute(
        f"""
        INSERT INTO integrations (tenant_id, user_id, provider, account_subject, scopes, refresh_token_enc,
                                  access_token_enc, access_token_expires_at, next_refresh_at,
                                  connected_at, updated_at)
        VALUES (%(tenant)s, %(user)s, %(provider)s, %(subject)s, %(scopes)s, %(refresh)s,
                %(access)s, %(expires)s, %(next)s, %(now)s, %(now)s)
        ON CONFLICT {target} DO UPDATE
           SET tenant_id = EXCLUDED.tenant_id, account_subject = EXCLUDED.account_subject,
               scopes = EXCLUDED.scopes, refresh_token_enc = EXCLUDED.refresh_token_enc,
               access_token_enc = EXCLUDED.access_token_enc,
               access_token_expires_at = EXCLUDED.access_token_expires_at,
               next_refresh_at = EXCLUDED.next_refresh_at, status = 'active', health_status = NULL,
               last_error = NULL, consecutive_failures = 0, revoked_at = NULL,
               connected_at = EXCLUDED.connected_at, updated_at = EXCLUDED.updated_at
        RETURNING id
        """,
        {
            "tenant": tenant_id,
            "user": user_id,
            "provider": provider,
            "subject": account_subject,
            "scopes": list(scopes) if scopes is not None else None,
            "refresh": cipher.encrypt(refresh_token) if refresh_token else None,
            "access": cipher.encrypt(access_token) if access_token else None,
            "expires": expires_at if access_token else None,
            "next": next_at,
            "now": now,
        },
    ).fetchone()
    return row[0]


def load(conn, ids: Sequence[int]) -> dict[int, Integration]:
    """The integrations of ``ids`` that exist, by id."""
    with conn.cursor(row_factory=class_row(Integration)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM integrations WHERE id = ANY(%s)", (list(ids),))
        return {row.id: row for row in cur.fetchall()}


def due_for_refresh(conn, before: datetime) -> list[int]:
    """Integrations to refresh by ``before`` (a run's data-interval end): ``active`` or ``expired``,
    refreshable, ``next_refresh_at`` earlier. A refresh moves ``next_refresh_at`` past any
    earlier ``before``, so a backfill finds only what is still not refreshed."""
    rows = conn.execute(
        """
        SELECT id FROM integrations
         WHERE status IN ('active', 'expired') AND refresh_token_enc IS NOT NULL
           AND next_refresh_at < %s
         ORDER BY id
        """,
        (before,),
    ).fetchall()
    return [row[0] for row in rows]


def due_for_health_check(conn, checked_before: datetime) -> list[int]:
    """``active`` and ``expired`` integrations not checked since ``checked_before``."""
    rows = conn.execute(
        """
        SELECT id FROM integrations
         WHERE status IN ('active', 'expired')
           AND (last_health_check_at IS NULL OR last_health_check_at < %s)
         ORDER BY id
        """,
        (checked_before,),
    ).fetchall()
    return [row[0] for row in rows]


def record_refresh(
    conn,
    cipher: TokenCipher,
    integration_id: int,
    grant: TokenGrant,
    *,
    now: datetime,
    lead: timedelta,
    default_lifetime: timedelta,
    seen=ANY_GRANT,
) -> datetime | None:
    """Keep a refreshed grant: the new access token, the rotated refresh token when the provider
    replaced it, the granted scopes when it listed them; ``active``. Returns ``next_refresh_at``,
    or None when ``seen`` (the ``refresh_token_enc`` the refresh started from) is no longer stored:
    the user reconnected meanwhile, and the new grant is left as it is."""
    expires_at = grant.expires_at or now + default_lifetime
    next_at = next_refresh_after(expires_at, lead)
    row = conn.execute(
        """
        UPDATE integrations
           SET access_token_enc = %(access)s, access_token_expires_at = %(expires)s,
               refresh_token_enc = coalesce(%(refresh)s, refresh_token_enc),
               scopes = coalesce(%(scopes)s, scopes), status = 'active', last_refresh_at = %(now)s,
               next_refresh_at = %(next)s, consecutive_failures = 0, last_error = NULL,
               health_status = CASE WHEN health_status = 'expired' THEN NULL ELSE health_status END,
               updated_at = %(now)s
         WHERE id = %(id)s AND status <> 'revoked'""" + _grant_clause(seen) + """
        RETURNING id
        """,
        {
            "seen": None if seen is ANY_GRANT else seen,
            "access": cipher.encrypt(grant.access_token),
            "expires": expires_at,
            "refresh": cipher.encrypt(grant.refresh_token) if grant.refresh_token else None,
            "scopes": list(grant.scopes) if grant.scopes is not None else None,
            "now": now,
            "next": next_at,
            "id": integration_id,
        },
    ).fetchone()
    return next_at if row else None


def record_refresh_failure(
    conn,
    integration_id: int,
    reason: str,
    *,
    now: datetime,
    backoff: timedelta,
    max_failures: int,
    counts: bool = True,
    seen=ANY_GRANT,
) -> str:
    """A refresh failed for another reason than a revocation: ``expired`` with the reason, due
    again after ``backoff``; ``error`` (not refreshed by schedule any more, ``next_refresh_at``
    NULL) after ``max_failures`` in a row. ``counts=False`` for our own faults (a missing or
    refused client, an undecryptable token): recorded and backed off, never counted against the
    integration. Returns the new status (``reconnected`` when ``seen`` is no longer stored)."""
    row = conn.execute(
        """
        UPDATE integrations
           SET consecutive_failures = consecutive_failures + %(step)s,
               status = CASE WHEN consecutive_failures + %(step)s >= %(max)s THEN 'error' ELSE 'expired' END,
               next_refresh_at = CASE WHEN consecutive_failures + %(step)s >= %(max)s THEN NULL
                                      ELSE %(next)s END,
               last_error = %(reason)s, updated_at = %(now)s
         WHERE id = %(id)s AND status <> 'revoked'""" + _grant_clause(seen) + """
        RETURNING status
        """,
        {
            "step": 1 if counts else 0,
            "max": max_failures,
            "reason": _text(reason),
            "next": now + backoff,
            "now": now,
            "id": integration_id,
            "seen": None if seen is ANY_GRANT else seen,
        },
    ).fetchone()
    return row[0] if row else "reconnected"


def retry_errored(conn, *, ids: Sequence[int] | None = None, now: datetime) -> list[int]:
    """Make ``error`` integrations (all, or ``ids``) ``expired`` and due at once, their failure
    count reset — after the cause was fixed (a connection, a key). Returns the ids. Does not commit."""
    rows = conn.execute(
        """
        UPDATE integrations
           SET status = 'expired', consecutive_failures = 0, next_refresh_at = %(now)s, updated_at = %(now)s
         WHERE status = 'error' AND refresh_token_enc IS NOT NULL
           AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
        RETURNING id
        """,
        {"now": now, "ids": list(ids) if ids is not None else None},
    ).fetchall()
    return sorted(row[0] for row in rows)


def mark_revoked(
    conn, integration_id: int, reason: str, *, now: datetime, health_check: bool = False, seen=ANY_GRANT
) -> bool:
    """The provider refused the grant for good: ``revoked``, tokens erased, and the tenant's owner
    told through the notification outbox — in the same transaction, once per revocation (the
    idempotency key is the integration and its ``revoked_at``). Already revoked: nothing changes.
    ``health_check``: found by a health check (recorded as one). ``seen``: the grant the finding is
    about (a reconnect since then is not revoked). Returns whether it was revoked now."""
    from almanac.notify.outbox import enqueue

    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """
            UPDATE integrations i
               SET status = 'revoked', revoked_at = %(now)s, last_error = %(reason)s,
                   refresh_token_enc = NULL, access_token_enc = NULL, access_token_expires_at = NULL,
                   next_refresh_at = NULL, health_status = 'revoked', updated_at = %(now)s,
                   last_health_check_at = CASE WHEN %(checked)s THEN %(now)s ELSE last_health_check_at END
             WHERE id = %(id)s AND status <> 'revoked'""" + _grant_clause(seen) + """
            RETURNING i.id, i.tenant_id, i.user_id, i.provider, i.revoked_at
            """,
            {"now": now, "reason": _text(reason), "id": integration_id, "checked": health_check,
             "seen": None if seen is ANY_GRANT else seen},
        ).fetchone()
        if row is None:
            return False
        who = cur.execute(
            """
            SELECT u.id, u.name, u.contact_channels[1] AS channel, t.name AS tenant,
                   owner.name AS account_user
              FROM tenants t
              LEFT JOIN users owner ON owner.id = %(user)s
              JOIN users u ON u.id = coalesce(t.owner_user_id, %(user)s)
             WHERE t.id = %(tenant)s
            """,
            {"tenant": row["tenant_id"], "user": row["user_id"]},
        ).fetchone()
    if who is None:
        import logging

        logging.getLogger(__name__).warning(
            "integration %s revoked; tenant %s has no owner and the integration no user: nobody told",
            integration_id,
            row["tenant_id"],
        )
        return True
    whose = f"{who['account_user']}'s " if who["account_user"] else "the shared "
    provider = row["provider"].replace("_", " ").title()
    enqueue(
        conn,
        tenant_id=row["tenant_id"],
        user_id=who["id"],
        channel=who["channel"] or "email",
        kind="integration_revoked",
        idempotency_key=f"integration-revoked:{integration_id}:{row['revoked_at'].isoformat()}",
        subject=f"{provider} is no longer connected",
        body=(
            f"Almanac can no longer reach {whose}{provider} account for {who['tenant']}: the access "
            f"was revoked or has expired. Connect it again in Settings > Connected accounts to "
            f"resume syncing."
        ),
        data={"integration_id": str(integration_id), "provider": row["provider"]},
    )
    return True


def record_health(
    conn, integration_id: int, health: str, detail: str | None, *, now: datetime, probed=ANY_GRANT
) -> bool:
    """One health check's outcome (``healthy``, ``expired``, ``error``; ``revoked`` goes through
    ``mark_revoked``). ``expired`` also makes an ``active`` integration ``expired`` and due for
    refresh at once. ``probed``: the ``access_token_enc`` the check used; a token refreshed (or
    reconnected) meanwhile is not judged by it. Returns whether it was recorded."""
    if health not in ("healthy", "expired", "error"):
        raise ValueError(f"not a health state for record_health: {health!r}")
    probed_clause = "" if probed is ANY_GRANT else " AND access_token_enc IS NOT DISTINCT FROM %(probed)s"
    row = conn.execute(
        """
        UPDATE integrations
           SET last_health_check_at = %(now)s, health_status = %(health)s,
               status = CASE WHEN %(health)s = 'expired' AND status = 'active' THEN 'expired' ELSE status END,
               next_refresh_at = CASE WHEN %(health)s = 'expired' THEN %(now)s ELSE next_refresh_at END,
               last_error = CASE WHEN %(health)s = 'healthy' THEN last_error ELSE %(detail)s END,
               updated_at = %(now)s
         WHERE id = %(id)s AND status IN ('active', 'expired')""" + probed_clause + """
        RETURNING id
        """,
        {
            "now": now,
            "health": health,
            "detail": _text(detail) or None,
            "id": integration_id,
            "probed": None if probed is ANY_GRANT else probed,
        },
    ).fetchone()
    return row is not None


def states(conn, *, tenant_id: int | None = None, ids: Sequence[int] | None = None) -> list[dict]:
    """Rows of the view ``integration_states`` (what the product's backend shows), no tokens."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT * FROM integration_states
             WHERE (%(tenant)s::bigint IS NULL OR tenant_id = %(tenant)s)
               AND (%(ids)s::bigint[] IS NULL OR integration_id = ANY(%(ids)s))
             ORDER BY integration_id
            """,
            {"tenant": tenant_id, "ids": list(ids) if ids is not None else None},
        )
        return cur.fetchall()


def reencrypt(conn, cipher: TokenCipher, *, batch_size: int = 500) -> int:
    """Re-encrypt every stored token with ``cipher``'s first key (after a key rotation: the
    Variable holds ``new_key,old_key``; once this has run, the old key can be dropped). Batches of
    ``batch_size`` rows, each row locked and committed; idempotent. Returns the rows rewritten.
    Raises ``TokenDecryptError`` for a token none of the keys decrypts (nothing of its batch written).
    """
    done, after = 0, 0
    while True:
        rows = conn.execute(
            """
            SELECT id, refresh_token_enc, access_token_enc FROM integrations
             WHERE id > %s AND (refresh_token_enc IS NOT NULL OR access_token_enc IS NOT NULL)
             ORDER BY id LIMIT %s FOR UPDATE
            """,
            (after, batch_size),
        ).fetchall()
        if not rows:
            conn.commit()
            return done
        with conn.cursor() as cur:
            cur.executemany(
                "UPDATE integrations SET refresh_token_enc = %s, access_token_enc = %s WHERE id = %s",
                [
                    (
                        cipher.rotate(refresh) if refresh else None,
                        cipher.rotate(access) if access else None,
                        iid,
                    )
                    for iid, refresh, access in rows
                ],
            )
        conn.commit()
        done += len(rows)
        after = rows[-1][0]

"""google_calendar_push: the ``google_accounts`` table — each user's Google Calendar push settings.

The grant itself (tokens, status, the account's subject) is the user's ``google`` integration in
``integrations`` (``almanac.integrations``); a ``google_accounts`` row adds what the push needs:
the target calendar and the push's own last outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from psycopg.rows import class_row

from almanac.google.crypto import TokenCipher

__all__ = ["GoogleAccount", "connect_account", "load_accounts", "record_push"]

#: The scope the push needs (``events`` on the user's calendars).
CALENDAR_EVENTS_SCOPE = "https://www.googleapis.com/auth/calendar.events"


@dataclass(frozen=True)
class GoogleAccount:
    """A user's push settings and their integration's state (no tokens).

    ``account_subject`` is Google's id of the account (OpenID ``sub``); None for legacy rows.
    ``status`` is the integration's (``active``, ``expired``, ``revoked``, ``error``).
    """

    user_id: int
    integration_id: int
    status: str
    target_calendar_id: str
    account_subject: str | None = None


def connect_account(
    conn,
    cipher: TokenCipher,
    user_id: int,
    refresh_token: str,
    *,
    target_calendar_id: str = "primary",
    account_subject: str | None = None,
    access_token: str | None = None,
    expires_at: datetime | None = None,
    scopes: Sequence[str] | None = (CALENDAR_EVENTS_SCOPE,),
    now: datetime | None = None,
) -> int:
    """Store (or replace) a user's Google grant and push settings, as the product does after the
    OAuth consent; returns the integration's id.

    Parameters:
        account_subject: Google's id of the account granted (the ID token's ``sub``). Links
            pushed under another subject are another account's: the next push drops them
            and creates every event in this account. Reconnecting the same subject keeps
            them. None (unknown) counts as a subject of its own, so pass it whenever known.

    A reconnect makes a revoked integration active again. The caller commits.
    """
    from almanac.integrations import store

    tenant_id = conn.execute("SELECT tenant_id FROM users WHERE id = %s", (user_id,)).fetchone()[0]
    integration_id = store.connect(
        conn, cipher, tenant_id=tenant_id, user_id=user_id, provider="google", refresh_token=refresh_token,
        access_token=access_token, expires_at=expires_at, scopes=scopes, account_subject=account_subject,
        now=now or datetime.now(UTC),
    )
    conn.execute(
        """
        INSERT INTO google_accounts (user_id, integration_id, target_calendar_id)
        VALUES (%s, %s, %s)
        ON CONFLICT (user_id) DO UPDATE
           SET integration_id = EXCLUDED.integration_id, target_calendar_id = EXCLUDED.target_calendar_id,
               last_error = NULL, updated_at = now()
        """,
        (user_id, integration_id, target_calendar_id),
    )
    return integration_id


def load_accounts(conn, user_ids: list[int]) -> dict[int, GoogleAccount]:
    """The push settings of ``user_ids`` that exist, with their integration's state, by user id."""
    with conn.cursor(row_factory=class_row(GoogleAccount)) as cur:
        cur.execute(
            """
            SELECT a.user_id, a.integration_id, i.status, a.target_calendar_id, i.account_subject
              FROM google_accounts a
              JOIN integrations i ON i.id = a.integration_id
             WHERE a.user_id = ANY(%s)
            """,
            (list(user_ids),),
        )
        return {account.user_id: account for account in cur.fetchall()}


def record_push(conn, user_id: int, error: str | None) -> None:
    """The outcome of a push for this account: ``last_error`` NULL on success. The caller commits."""
    if error is None:
        conn.execute(
            "UPDATE google_accounts SET last_push_at = now(), last_error = NULL, updated_at = now() "
            "WHERE user_id = %s",
            (user_id,),
        )
    else:
        conn.execute(
            "UPDATE google_accounts SET last_error = %s, updated_at = now() WHERE user_id = %s",
            (error[:1000], user_id),
        )

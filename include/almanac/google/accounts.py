"""google_calendar_push: the ``google_accounts`` table — connected accounts and their encrypted tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from psycopg.rows import class_row

from almanac.google.crypto import TokenCipher

__all__ = [
    "GoogleAccount",
    "connect_account",
    "load_accounts",
    "mark_revoked",
    "record_push",
    "save_access_token",
]


@dataclass(frozen=True)
class GoogleAccount:
    """A connected account with its tokens still encrypted (decrypt only where they are used).

    ``account_subject`` is Google's id of the account (OpenID ``sub``); None for legacy rows.
    """

    user_id: int
    status: str
    target_calendar_id: str
    refresh_token_enc: str = field(repr=False)
    access_token_enc: str | None = field(repr=False, default=None)
    access_token_expires_at: datetime | None = None
    account_subject: str | None = None


def connect_account(
    conn,
    cipher: TokenCipher,
    user_id: int,
    refresh_token: str,
    *,
    target_calendar_id: str = "primary",
    account_subject: str | None = None,
) -> None:
    """Store (or replace) a user's Google grant, as the product does after the OAuth consent.

    Parameters:
        account_subject: Google's id of the account granted (the ID token's ``sub``). Links
            pushed under another subject are another account's: the next push drops them
            and creates every event in this account. Reconnecting the same subject keeps
            them. None (unknown) counts as a subject of its own, so pass it whenever known.

    A reconnect makes a revoked account active again and forgets the old access token.
    The caller commits.
    """
    conn.execute(
        """
        INSERT INTO google_accounts (user_id, refresh_token_enc, target_calendar_id, account_subject)
        VALUES (%s, %s, %s, %s)
        ON CONFLICT (user_id) DO UPDATE
           SET refresh_token_enc = EXCLUDED.refresh_token_enc,
               target_calendar_id = EXCLUDED.target_calendar_id,
               account_subject = EXCLUDED.account_subject,
               access_token_enc = NULL, access_token_expires_at = NULL,
               status = 'active', last_error = NULL, updated_at = now()
        """,
        (user_id, cipher.encrypt(refresh_token), target_calendar_id, account_subject),
    )


def load_accounts(conn, user_ids: list[int]) -> dict[int, GoogleAccount]:
    """The accounts of ``user_ids`` that exist, by user id (tokens still encrypted)."""
    with conn.cursor(row_factory=class_row(GoogleAccount)) as cur:
        cur.execute(
            """
            SELECT user_id, status, target_calendar_id, refresh_token_enc, access_token_enc,
                   access_token_expires_at, account_subject
              FROM google_accounts
             WHERE user_id = ANY(%s)
            """,
            (list(user_ids),),
        )
        return {account.user_id: account for account in cur.fetchall()}


def save_access_token(
    conn, cipher: TokenCipher, user_id: int, access_token: str, expires_at: datetime | None
) -> None:
    """Keep a refreshed access token (encrypted) so the next run need not refresh again.

    The caller commits.
    """
    conn.execute(
        """
        UPDATE google_accounts
           SET access_token_enc = %s, access_token_expires_at = %s, updated_at = now()
         WHERE user_id = %s
        """,
        (cipher.encrypt(access_token), expires_at, user_id),
    )


def mark_revoked(conn, user_id: int, reason: str) -> None:
    """Google refused the grant: stop using it until the user reconnects. The caller commits."""
    conn.execute(
        """
        UPDATE google_accounts
           SET status = 'revoked', last_error = %s, access_token_enc = NULL,
               access_token_expires_at = NULL, updated_at = now()
         WHERE user_id = %s
        """,
        (reason[:1000], user_id),
    )


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

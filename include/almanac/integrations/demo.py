"""Demo connected accounts for ``./dev up``: grants of the local fake provider ``demo``.

Each demo tenant gets an owner (its first user), and its users one ``demo`` integration each, with
refresh tokens minted by an ``OAuthState`` that shares the fake runner's signing secret (so the
runner, ``python -m almanac.integrations.fakes serve``, accepts them). None has an access token
yet: the first ``oauth_token_refresh`` run refreshes them all. One user per tenant has a grant the
provider refuses (``revoked-``: the run marks it revoked and the tenant's owner gets one email in the
outbox) and one a provider that keeps answering 429 (``ratelimited-``: ``expired`` with the reason,
retried after a backoff). Idempotent: users who already have a ``demo`` integration are left alone.
"""

from __future__ import annotations

from datetime import UTC, datetime

from almanac.google.crypto import TokenCipher
from almanac.integrations import store

__all__ = ["DEMO_PROVIDER", "connect_demo_integrations"]

DEMO_PROVIDER = "demo"
_PREFIXES = ("revoked-", "ratelimited-")  # given to the 2nd and 3rd user of each tenant


def connect_demo_integrations(conn, cipher: TokenCipher, *, secret: str, now: datetime | None = None) -> int:
    """Connect the demo integrations that are missing; returns how many were added. Commits."""
    from almanac.integrations.fakes import OAuthState

    state = OAuthState(secret=secret)
    now = now or datetime.now(UTC)
    conn.execute(
        "UPDATE tenants t SET owner_user_id = (SELECT min(id) FROM users u WHERE u.tenant_id = t.id)"
        " WHERE owner_user_id IS NULL"
    )
    users = conn.execute(
        """
        SELECT u.id, u.tenant_id, row_number() OVER (PARTITION BY u.tenant_id ORDER BY u.id)
          FROM users u
         WHERE NOT EXISTS (SELECT 1 FROM integrations i WHERE i.user_id = u.id AND i.provider = %s)
         ORDER BY u.id
        """,
        (DEMO_PROVIDER,),
    ).fetchall()
    for user_id, tenant_id, position in users:
        prefix = _PREFIXES[position - 2] if 2 <= position <= 1 + len(_PREFIXES) else ""
        subject = f"demo-user-{user_id}"
        store.connect(
            conn,
            cipher,
            tenant_id=tenant_id,
            user_id=user_id,
            provider=DEMO_PROVIDER,
            refresh_token=state.grant(subject, prefix=prefix),
            scopes=["openid", "email"],
            account_subject=subject,
            now=now,
        )
    conn.commit()
    return len(users)

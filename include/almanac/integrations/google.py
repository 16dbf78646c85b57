"""Google credentials from the integrations store, for Google's own client libraries.

``google_credentials`` gives a ``google.oauth2.credentials.Credentials`` that holds only an
access token; when google-auth wants a new one (the token is about to expire, or Google answered
401) it asks its ``refresh_handler``, which goes through ``Refresher.access_token`` — the one
refresh path, under the integration's lease. google-auth never sees the refresh token.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["REFRESH_MARGIN", "google_credentials"]

#: A token expiring sooner than this is refreshed before use; more than google-auth's own
#: threshold (3 min 45 s), so a token we hand it is never one it considers expired.
REFRESH_MARGIN = timedelta(minutes=5)


def _naive_utc(instant: datetime | None) -> datetime | None:  # google-auth compares naive UTC
    return instant.astimezone(UTC).replace(tzinfo=None) if instant is not None else None


def google_credentials(refresher, conn, integration_id: int):
    """Credentials of one integration, refreshed through ``refresher`` on ``conn`` (a connection
    of its own: the refresher commits on it).

    Raises (now, or later from a Google call that needed a new token):
        almanac.integrations.refresh.IntegrationUnusableError: revoked, gone, no refresh token.
        RetryableError / PermanentError: the refresh failed (recorded on the integration).
    """
    from google.oauth2.credentials import Credentials

    token, expiry = refresher.access_token(conn, integration_id, min_valid=REFRESH_MARGIN)
    credentials = Credentials(token=token, expiry=_naive_utc(expiry))

    def refresh_handler(request, scopes):
        stored, expires = refresher.access_token(conn, integration_id, min_valid=REFRESH_MARGIN)
        if stored == credentials.token:  # the token google-auth holds was refused or is expiring
            stored, expires = refresher.access_token(conn, integration_id, force=True)
        return stored, _naive_utc(expires)

    credentials.refresh_handler = refresh_handler
    return credentials

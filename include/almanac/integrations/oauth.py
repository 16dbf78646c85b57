"""The two provider calls, on the wire: the token refresh (RFC 6749 §6) and the health probe.

One try each, through a ``requests`` session; retries belong to the caller (``almanac.retry``).
Errors name the provider and the OAuth error code, never a token or a response body verbatim
(a description can echo request details).

- ``refresh_grant``: ``POST token_url`` with ``grant_type=refresh_token`` and the client's
  credentials (``client_secret_post`` or ``client_secret_basic``). ``invalid_grant`` →
  ``GrantRevokedError`` (revoked by the user, or expired); 429, 5xx, timeouts and connection
  faults → ``ProviderRetryableError`` (with ``Retry-After``); anything else refused →
  ``ProviderRefusedError`` (e.g. ``invalid_client``: our connection is wrong).
- ``probe_health``: ``GET health_url`` with the bearer access token: 200 healthy, 401 the
  token is no longer accepted, anything else (403, 429, 5xx, a timeout) an error. Never raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from almanac.errors import PermanentError, RetryableError
from almanac.integrations.providers import ProviderConfig
from almanac.retry import parse_retry_after

__all__ = [
    "GrantRevokedError",
    "HealthAnswer",
    "ProviderRefusedError",
    "ProviderRetryableError",
    "TokenGrant",
    "probe_health",
    "refresh_grant",
]

MAX_ANSWER_BYTES = 256 * 1024  # a token answer is < 4 KB; a bigger one is not read whole
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class GrantRevokedError(PermanentError):
    """The provider refused the refresh token (``invalid_grant``): the user revoked access, or the
    grant expired. What to do: nothing for the job — the integration is marked ``revoked`` and
    the tenant's owner is told once; the user must connect the account again."""


class ProviderRetryableError(RetryableError):
    """The provider answered 429/5xx or could not be reached. What to do: nothing; it is retried
    within the task, then by the next run. ``retry_after``: the provider's ``Retry-After`` (s)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class ProviderRefusedError(PermanentError):
    """The provider refused the refresh for another reason than the grant (``invalid_client``,
    ``unauthorized_client``, ``invalid_scope``, an unreadable answer). What to do: check the
    connection ``oauth_<provider>`` (client id and secret, token_url) and the provider's console."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class TokenGrant:
    """A successful refresh. ``refresh_token`` is set when the provider rotated it (keep the new
    one: the old one may no longer work); ``scopes`` when the answer listed them."""

    access_token: str = field(repr=False)
    expires_at: datetime | None
    refresh_token: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class HealthAnswer:
    """What one health probe found: ``healthy``, ``unauthorized`` (401) or ``error``."""

    state: str
    detail: str
    subject: str | None = None


def _read(resp) -> bytes:
    """The body (at most ``MAX_ANSWER_BYTES`` + 1), read under the request's timeouts. A body
    that stalls, breaks off or does not decompress raises urllib3's errors, not requests'."""
    try:
        return resp.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
    finally:
        resp.close()


def _transport_errors() -> tuple[type[BaseException], ...]:
    import requests
    import urllib3

    return (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def _json(data: bytes) -> dict | None:
    if len(data) > MAX_ANSWER_BYTES:
        return None
    try:
        body = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _code(body: dict | None) -> str:
    code = (body or {}).get("error")
    ok = isinstance(code, str) and code.isascii() and code.isprintable() and 0 < len(code) <= 60
    return code if ok else "unknown_error"


def refresh_grant(
    provider: ProviderConfig, refresh_token: str, *, session, now: datetime, timeout: float = 10.0
) -> TokenGrant:
    """One refresh of ``refresh_token`` at ``provider``'s token endpoint.

    Parameters:
        session: a ``requests.Session`` (``trust_env=False`` is the caller's choice).
        now: the instant the answer's ``expires_in`` counts from (aware).
        timeout: seconds to connect and to wait for each read.
    Raises:
        GrantRevokedError, ProviderRetryableError, ProviderRefusedError (see the module).
    """

    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    auth = None
    if provider.client_auth == "basic":
        auth = (provider.client_id, provider.client_secret)
    else:
        form |= {"client_id": provider.client_id, "client_secret": provider.client_secret}
    where = f"{provider.name} token endpoint"
    try:
        resp = session.post(
            provider.token_url,
            data=form,
            auth=auth,
            timeout=timeout,
            stream=True,
            headers={"Accept": "application/json"},
            allow_redirects=False,
        )
        data = _read(resp)
    except _transport_errors() as exc:
        raise ProviderRetryableError(f"{where} unreachable: {type(exc).__name__}") from None
    body = _json(data)
    status = resp.status_code
    if status in _RETRYABLE_STATUS:
        raise ProviderRetryableError(
            f"{where} answered {status} {_code(body)}",
            status=status,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )
    if status != 200:
        code = _code(body)
        if code == "invalid_grant":
            raise GrantRevokedError(
                f"{where} refused the refresh token (invalid_grant): access revoked or expired"
            )
        raise ProviderRefusedError(f"{where} answered {status} {code}", status=status, code=code)
    token = (body or {}).get("access_token")
    if not isinstance(token, str) or not token:
        raise ProviderRefusedError(
            f"{where} answered 200 without an access_token", status=status, code="bad_answer"
        )
    expires_in = (body or {}).get("expires_in")
    expires_at = None
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and 0 < expires_in < 10**8:
        expires_at = now + timedelta(seconds=float(expires_in))
    elif isinstance(expires_in, str) and expires_in.isdigit() and len(expires_in) < 9:
        expires_at = now + timedelta(seconds=int(expires_in))
    rotated = body.get("refresh_token")
    scope = body.get("scope")
    return TokenGrant(
        access_token=token,
        expires_at=expires_at,
        refresh_token=rotated if isinstance(rotated, str) and rotated and rotated != refresh_token else None,
        scopes=tuple(scope.split()) if isinstance(scope, str) else None,
    )


def probe_health(
    provider: ProviderConfig, access_token: str, *, session, timeout: float = 10.0
) -> HealthAnswer:
    """One authenticated ``GET`` of ``provider.health_url``; never raises, never retries."""

    if not provider.health_url:
        return HealthAnswer("error", f"connection oauth_{provider.name} has no health_url")
    try:
        resp = session.get(
            provider.health_url,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            timeout=timeout,
            stream=True,
            allow_redirects=False,
        )
        data = _read(resp)
    except _transport_errors() as exc:
        return HealthAnswer("error", f"{provider.name} health check unreachable: {type(exc).__name__}")
    status = resp.status_code
    if status == 200:
        sub = (_json(data) or {}).get("sub")
        return HealthAnswer("healthy", "200", str(sub)[:255] if isinstance(sub, (str, int)) else None)
    if status == 401:
        return HealthAnswer(
            "unauthorized", f"{provider.name} health check answered 401: access token refused"
        )
    return HealthAnswer("error", f"{provider.name} health check answered {status} {_code(_json(data))}")

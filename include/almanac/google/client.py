"""google_calendar_push: one member's Google Calendar, through google-api-python-client.

Wraps ``googleapiclient`` (static discovery, no network at build) behind three calls —
insert, patch, delete — with the behaviour the job needs:

- An expired access token is refreshed before the call; a 401 refreshes once and retries
  once (``google_auth_httplib2.AuthorizedHttp(max_refresh_attempts=1)``).
- A refresh answered ``invalid_grant`` raises ``GoogleGrantRevokedError`` (the user revoked
  access or the grant expired): the caller marks the account revoked.
- 429, 403 rate-limit reasons, 5xx and connection faults are retried by the one retry policy
  (``almanac.retry.RetryPolicy``/``retry_call``): exponential backoff, or the server's
  ``Retry-After`` (``almanac.retry.parse_retry_after``), each wait capped at ``max_wait_s``;
  after the last attempt ``GoogleRetryableError``.
- Other HTTP errors raise ``GoogleApiError`` with the status, Google's reason and message
  (never a token in the message); the caller decides whether it is about one event or the member.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from almanac.errors import ConfigError, PermanentError, RetryableError
from almanac.retry import RetryPolicy, parse_retry_after, retry_call

__all__ = [
    "DEFAULT_POLICY",
    "CalendarClient",
    "GoogleApiError",
    "GoogleGrantRevokedError",
    "GoogleRetryableError",
    "OAuthClient",
]

log = logging.getLogger(__name__)

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
#: The settings' defaults (``google_request_attempts`` / ``google_retry_max_wait_s``).
DEFAULT_POLICY = RetryPolicy(attempts=4, max_wait_s=60.0)


class GoogleGrantRevokedError(PermanentError):
    """Google refused the refresh token (``invalid_grant``): revoked by the user, or expired.

    What to do: nothing for the job — the account is marked ``revoked`` and skipped until
    the user connects Google again in the product.
    """

    def __init__(self, user_id: int | None = None) -> None:
        super().__init__(
            f"user {user_id}: Google refused the refresh token (invalid_grant): access revoked or expired"
        )
        self.user_id = user_id


class GoogleRetryableError(RetryableError):
    """Google kept answering 429/5xx (or the connection failed) through every attempt.

    ``retry_after`` (seconds) is the server's ``Retry-After`` of the last answer, if any.

    What to do: nothing; the next run converges. If it persists, check Google's status page and
    the project's Calendar API quota.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        reason: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class GoogleApiError(PermanentError):
    """Google refused a call for good (400 bad event, 403 no access to the target calendar...).

    What to do: read ``status`` and the reason; a 403/404 on the target calendar means the
    account's ``target_calendar_id`` is wrong or the user lost access to it.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        reason: str | None = None,
        *,
        google_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.google_message = google_message  # Google's own words ("Invalid start time."), if any


@dataclass(frozen=True)
class OAuthClient:
    """The product's OAuth client, and where Google is (tests point both at a fake)."""

    client_id: str
    client_secret: str = field(repr=False)
    token_uri: str = GOOGLE_TOKEN_URI
    api_endpoint: str | None = None  # None: Google's own (https://www.googleapis.com/calendar/v3/)

    def __post_init__(self) -> None:
        if not self.client_id or not self.client_secret:
            raise ConfigError("the Google OAuth client needs a client id and a client secret")


@dataclass
class _Tokens:
    access_token: str | None
    expiry: datetime | None  # aware UTC


class CalendarClient:
    """One member's Google Calendar.

    Parameters:
        oauth: the product's OAuth client.
        refresh_token, access_token, expiry: the member's (decrypted) tokens; ``expiry`` aware.
        policy: retries and timeouts.
        sleep: how to wait between attempts (tests pass a recorder).
    """

    def __init__(
        self,
        oauth: OAuthClient,
        *,
        refresh_token: str,
        access_token: str | None = None,
        expiry: datetime | None = None,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        user_id: int | None = None,
    ) -> None:
        import google_auth_httplib2
        import httplib2
        from google.oauth2.credentials import Credentials
        from googleapiclient.discovery import build

        self.user_id = user_id
        self.policy = policy or DEFAULT_POLICY
        self._sleep = sleep
        self._initial = _Tokens(access_token, expiry)
        self._credentials = Credentials(
            token=access_token,
            refresh_token=refresh_token,
            token_uri=oauth.token_uri,
            client_id=oauth.client_id,
            client_secret=oauth.client_secret,
            # google-auth compares naive UTC datetimes
            expiry=expiry.astimezone(UTC).replace(tzinfo=None) if expiry else None,
        )
        http = google_auth_httplib2.AuthorizedHttp(
            self._credentials, http=httplib2.Http(timeout=self.policy.timeout_s), max_refresh_attempts=1
        )
        options = {"api_endpoint": oauth.api_endpoint} if oauth.api_endpoint else None
        self._service = build(
            "calendar", "v3", http=http, client_options=options, static_discovery=True, cache_discovery=False
        )
        self._events = self._service.events()

    # --- tokens ------------------------------------------------------------------
    @property
    def tokens(self) -> tuple[str | None, datetime | None]:
        """The current access token and its expiry (aware UTC), after any refresh."""
        expiry = self._credentials.expiry
        return self._credentials.token, expiry.replace(tzinfo=UTC) if expiry else None

    @property
    def refreshed(self) -> bool:
        return self._credentials.token != self._initial.access_token

    # --- calls -------------------------------------------------------------------
    def insert(self, calendar_id: str, body: dict) -> dict:
        """events.insert; ``body["id"]`` may be a client-chosen id (409 if it exists)."""
        return self._call(
            "insert", lambda: self._events.insert(calendarId=calendar_id, body=body, sendUpdates="none")
        )

    def patch(self, calendar_id: str, event_id: str, body: dict) -> dict:
        return self._call(
            "patch",
            lambda: self._events.patch(
                calendarId=calendar_id, eventId=event_id, body=body, sendUpdates="none"
            ),
        )

    def delete(self, calendar_id: str, event_id: str) -> bool:
        """events.delete; False when the event was already gone (404/410), which counts as done."""
        try:
            self._call(
                "delete",
                lambda: self._events.delete(calendarId=calendar_id, eventId=event_id, sendUpdates="none"),
            )
        except GoogleApiError as exc:
            if exc.status in (404, 410):
                return False
            raise
        return True

    def _call(self, op: str, make_request: Callable):
        """One request, retried per ``self.policy`` (``almanac.retry``) on 429/5xx/rate limits/faults."""
        try:
            return retry_call(
                lambda: self._once(op, make_request), self.policy, sleep=self._sleep, on_retry=self._on_retry
            )
        except GoogleRetryableError as exc:
            if self.policy.attempts <= 1:
                raise
            raise GoogleRetryableError(
                f"{exc} (after {self.policy.attempts} attempts)", exc.status, exc.reason
            ) from exc

    def _on_retry(self, attempt: int, exc: Exception, wait: float) -> None:
        log.info(
            "user %s: Google call attempt %d failed (%s); retrying in %.1fs",
            self.user_id,
            attempt,
            getattr(exc, "status", None) or type(exc).__name__,
            wait,
        )

    def _once(self, op: str, make_request: Callable):
        """One try: Google's answer, or the error it maps to (retryable or not)."""
        import httplib2
        from google.auth.exceptions import RefreshError, TransportError
        from googleapiclient.errors import HttpError

        try:
            return make_request().execute(num_retries=0)
        except HttpError as exc:
            status = exc.resp.status
            reason, message = _reason(exc)
            if status in _RETRYABLE_STATUS or (status == 403 and reason in _RATE_LIMIT_REASONS):
                raise GoogleRetryableError(
                    f"user {self.user_id}: Google {op} answered {status} {reason or ''}".rstrip(),
                    status,
                    reason,
                    retry_after=parse_retry_after(exc.resp.get("retry-after")),
                ) from exc
            raise GoogleApiError(
                f"user {self.user_id}: Google {op} answered {status} {reason or ''}".rstrip(),
                status,
                reason,
                google_message=message,
            ) from exc
        except RefreshError as exc:
            if _is_invalid_grant(exc):
                raise GoogleGrantRevokedError(self.user_id) from exc
            if getattr(exc, "retryable", False):
                raise GoogleRetryableError(f"user {self.user_id}: token refresh failed") from exc
            raise GoogleApiError(
                f"user {self.user_id}: token refresh refused: {_refresh_error(exc)}"
            ) from exc
        except (TimeoutError, OSError, httplib2.HttpLib2Error, TransportError) as exc:
            raise GoogleRetryableError(
                f"user {self.user_id}: Google {op} unreachable: {type(exc).__name__}"
            ) from exc


def _reason(exc) -> tuple[str | None, str | None]:
    """Google's error reason and message from an error body (``{"error": {"errors": [...]}}``)."""
    try:
        payload = json.loads(exc.content.decode("utf-8"))
        error = payload.get("error", {})
        errors = error.get("errors") or []
        first = errors[0] if errors and isinstance(errors[0], dict) else {}
        message = first.get("message") or error.get("message")
        return first.get("reason") or error.get("status"), str(message)[:300] if message else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None, None


def _refresh_data(exc) -> dict:
    for arg in getattr(exc, "args", ())[1:]:
        if isinstance(arg, dict):
            return arg
    return {}


def _is_invalid_grant(exc) -> bool:
    data = _refresh_data(exc)
    if data:
        return data.get("error") == "invalid_grant"
    return str(exc.args[0] if exc.args else "").startswith("invalid_grant")


def _refresh_error(exc) -> str:
    """The OAuth error code only (descriptions can echo request details)."""
    return str(_refresh_data(exc).get("error") or "unknown error")

"""google_calendar_push: one member's Google Calendar, through google-api-python-client.

Wraps ``googleapiclient`` (static discovery, no network at build) behind three calls —
insert, patch, delete — made one at a time (``insert``/``patch``/``delete``) or many per
HTTP request (``run``: Calendar's batch endpoint, ``POST /batch/calendar/v3``, multipart/mixed,
up to 50 calls per request, through ``BatchHttpRequest``), with the behaviour the job needs:

- An expired access token is refreshed before the call; a 401 refreshes once and retries
  once (``google_auth_httplib2.AuthorizedHttp(max_refresh_attempts=1)``; inside a batch the
  client library refreshes once and re-sends the calls that got 401 in a second batch).
- A refresh answered ``invalid_grant`` raises ``GoogleGrantRevokedError`` (the user revoked
  access or the grant expired): the caller marks the account revoked.
- 429, 403 rate-limit reasons, 5xx and connection faults are retried by the one retry policy
  (``almanac.retry.RetryPolicy``/``retry_call``): exponential backoff, or the server's
  ``Retry-After`` (``almanac.retry.parse_retry_after``), each wait capped at ``max_wait_s``;
  after the last attempt ``GoogleRetryableError``. In a batch each call is retried on its
  own: the calls that got 429/5xx go again in a later batch, after the wait.
- Other HTTP errors raise ``GoogleApiError`` with the status, Google's reason and message
  (never a token in the message); the caller decides whether it is about one event or the member.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from almanac.errors import ConfigError, PermanentError, RetryableError
from almanac.retry import RetryPolicy, parse_retry_after, retry_call

__all__ = [
    "DEFAULT_POLICY",
    "MAX_BATCH_SIZE",
    "Call",
    "CalendarClient",
    "GoogleApiError",
    "GoogleGrantRevokedError",
    "GoogleRetryableError",
    "OAuthClient",
    "Outcome",
    "batch_uri",
]

log = logging.getLogger(__name__)

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
#: The settings' defaults (``google_request_attempts`` / ``google_retry_max_wait_s``).
DEFAULT_POLICY = RetryPolicy(attempts=4, max_wait_s=60.0)
#: Calendar API v3 takes at most 50 calls in one batch request.
MAX_BATCH_SIZE = 50
# From the Calendar v3 discovery document (``servicePath``, ``batchPath``): the batch endpoint
# sits beside the API under the same root. The client library builds the batch URI from the
# document's ``rootUrl`` and ignores ``api_endpoint``, so we build it ourselves.
_SERVICE_PATH = "calendar/v3/"
_BATCH_PATH = "batch/calendar/v3"


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


@dataclass(frozen=True, eq=False)
class Call:
    """One Calendar API call for ``CalendarClient.run``.

    ``op``: ``insert`` (``body`` may carry a client-chosen ``id``), ``patch`` (``event_id``,
    ``body``) or ``delete`` (``event_id``). ``tag`` is the caller's, handed back with the outcome.
    """

    op: Literal["insert", "patch", "delete"]
    calendar_id: str
    event_id: str | None = None
    body: dict | None = None
    tag: Any = None


#: What one call came to: Google's answer (``{}`` for a delete), or the error it maps to.
Outcome = dict | GoogleApiError | GoogleRetryableError


def batch_uri(api_endpoint: str | None) -> str | None:
    """The batch endpoint for an ``api_endpoint`` override; None for Google's own.

    ``http://host:port/calendar/v3/`` -> ``http://host:port/batch/calendar/v3``: the API's
    service path is replaced by the batch path under the same root (an endpoint without the
    service path is taken as the root itself).
    """
    if not api_endpoint:
        return None
    base = api_endpoint if api_endpoint.endswith("/") else api_endpoint + "/"
    root = base[: -len(_SERVICE_PATH)] if base.endswith("/" + _SERVICE_PATH) else base
    return root + _BATCH_PATH


@dataclass
class _Tokens:
    access_token: str | None
    expiry: datetime | None  # aware UTC


class CalendarClient:
    """One member's Google Calendar.

    Parameters:
        oauth: the product's OAuth client.
        credentials: the member's google-auth credentials from the integrations store
            (``almanac.integrations.google.google_credentials``: refreshed through the one
            refresh path). The job passes these.
        refresh_token, access_token, expiry: or the member's (decrypted) tokens, ``expiry``
            aware, for google-auth to refresh by itself (tools and tests of this client only).
        policy: retries and timeouts.
        sleep: how to wait between attempts (tests pass a recorder).
        batch_size: calls per HTTP request in ``run`` (1..``MAX_BATCH_SIZE``).
    """

    def __init__(
        self,
        oauth: OAuthClient,
        *,
        credentials=None,
        refresh_token: str | None = None,
        access_token: str | None = None,
        expiry: datetime | None = None,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        user_id: int | None = None,
        batch_size: int = MAX_BATCH_SIZE,
    ) -> None:
        import google_auth_httplib2
        import httplib2
        from google.oauth2.credentials import Credentials
        from googleapiclient.discovery import build

        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"google_batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}")
        self.user_id = user_id
        self.policy = policy or DEFAULT_POLICY
        self.batch_size = batch_size
        #: HTTP requests made by ``run``: ``{"batch": n, "single": n}`` (benchmarks, logs).
        self.http_requests = {"batch": 0, "single": 0}
        self._batch_uri = batch_uri(oauth.api_endpoint)
        self._sleep = sleep
        if credentials is None:
            if not refresh_token:
                raise ConfigError("CalendarClient needs credentials or a refresh token")
            credentials = Credentials(
                token=access_token,
                refresh_token=refresh_token,
                token_uri=oauth.token_uri,
                client_id=oauth.client_id,
                client_secret=oauth.client_secret,
                # google-auth compares naive UTC datetimes
                expiry=expiry.astimezone(UTC).replace(tzinfo=None) if expiry else None,
            )
        self._initial = _Tokens(credentials.token, expiry)
        self._credentials = credentials
        http = google_auth_httplib2.AuthorizedHttp(
            self._credentials, http=httplib2.Http(timeout=self.policy.timeout_s), max_refresh_attempts=1
        )
        options = {"api_endpoint": oauth.api_endpoint} if oauth.api_endpoint else None
        self._service = build(
            "calendar", "v3", http=http, client_options=options, static_discovery=True, cache_discovery=False
        )
        self._events = self._service.events()
        self._http = http

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

    def _on_retry(self, attempt: int, exc: Exception, wait: float, *, calls: int = 1) -> None:
        log.info(
            "user %s: Google call attempt %d failed (%s) for %d call(s); retrying in %.1fs",
            self.user_id,
            attempt,
            getattr(exc, "status", None) or type(exc).__name__,
            calls,
            wait,
        )

    # --- many calls, in batch requests ---------------------------------------------
    def run(
        self,
        calls: Iterable[Call],
        handle: Callable[[Call, dict | GoogleApiError], Iterable[Call] | None],
        *,
        after_request: Callable[[], None] | None = None,
    ) -> None:
        """Make ``calls``, ``batch_size`` per HTTP request (a batch request when two or more go).

        Every call ends in exactly one ``handle(call, outcome)``: Google's answer (a dict; ``{}``
        for a delete) or a ``GoogleApiError`` (the status says what Google refused; the caller
        decides). ``handle`` returns follow-up calls (e.g. a patch after a 409), made in later
        requests. Calls answered 429/5xx (or a rate-limit 403), and every call of a request that
        failed as a whole (429/5xx on the batch, a connection fault), go again in a later request
        after the policy's wait (backoff, or the longest ``Retry-After`` among them, capped),
        each up to ``policy.attempts`` tries. ``after_request`` runs after each request's
        outcomes are handled (the caller commits there).

        Raises:
            GoogleRetryableError: a call's tries ran out — after the other outcomes of that
                request were handled.
            PermanentError, RetryableError: raised by ``handle`` — likewise after the rest
                of that request's outcomes were handled (the first one wins).
            GoogleApiError, GoogleGrantRevokedError: the request as a whole was refused (a
                token refresh refused or revoked, a 4xx on the batch endpoint itself).
        """
        queue: deque[tuple[Call, int]] = deque((call, 1) for call in calls)
        while queue:
            chunk = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            try:
                outcomes = self.send([call for call, _ in chunk])
            except GoogleRetryableError as exc:  # the request as a whole: every call in it again
                outcomes = [exc] * len(chunk)
            failure: Exception | None = None
            again: list[tuple[Call, int, GoogleRetryableError]] = []
            for (call, attempt), outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, GoogleRetryableError):
                    if attempt < self.policy.attempts:
                        again.append((call, attempt, outcome))
                    elif failure is None:
                        failure = (
                            GoogleRetryableError(
                                f"{outcome} (after {attempt} attempts)", outcome.status, outcome.reason
                            )
                            if attempt > 1
                            else outcome
                        )
                    continue
                try:
                    follow = handle(call, outcome)
                except (PermanentError, RetryableError) as exc:
                    failure = failure or exc
                    continue
                queue.extend((f, 1) for f in follow or ())
            if after_request is not None:
                after_request()
            if failure is not None:
                raise failure
            if again:
                wait = max(self.policy.wait(attempt, exc.retry_after) for _, attempt, exc in again)
                self._on_retry(again[0][1], again[0][2], wait, calls=len(again))
                self._sleep(wait)
                queue.extendleft((call, attempt + 1) for call, attempt, _ in reversed(again))

    def send(self, calls: Sequence[Call]) -> list[Outcome]:
        """One HTTP request for ``calls`` (a batch request for two or more, one plain call for
        one): each call's answer or error, in order. No retries (``run`` retries).

        Raises:
            GoogleRetryableError, GoogleApiError, GoogleGrantRevokedError: the request as a
                whole failed (connection fault, token refresh, the batch endpoint's own answer).
        """
        if len(calls) == 1:
            call = calls[0]
            self.http_requests["single"] += 1
            try:
                answer = self._once(call.op, lambda: self._request(call))
            except (GoogleApiError, GoogleRetryableError) as exc:
                if exc.status is None:
                    raise  # the token or the connection, not the call
                return [exc]
            return [answer if isinstance(answer, dict) else {}]
        if len(calls) > MAX_BATCH_SIZE:
            raise ValueError(f"at most {MAX_BATCH_SIZE} calls per batch request, got {len(calls)}")
        from googleapiclient.http import BatchHttpRequest

        outcomes: list[Outcome | None] = [None] * len(calls)

        def collect(request_id: str, response, exception) -> None:
            index = int(request_id)
            if exception is None:
                outcomes[index] = response if isinstance(response, dict) else {}
            else:
                outcomes[index] = self._http_error(calls[index].op, exception)

        if self._batch_uri is None:  # Google's own endpoint, from the discovery document
            batch = self._service.new_batch_http_request(callback=collect)
        else:
            batch = BatchHttpRequest(callback=collect, batch_uri=self._batch_uri)
        for index, call in enumerate(calls):
            batch.add(self._request(call), request_id=str(index))
        self.http_requests["batch"] += 1
        try:
            self._guard("batch", lambda: batch.execute(http=self._http))
        except KeyError as exc:  # the library looks up each part's answer: one was missing
            raise GoogleRetryableError(f"user {self.user_id}: Google batch answer lacks a part") from exc
        return outcomes  # type: ignore[return-value]  # every part was called back

    def _request(self, call: Call):
        """The ``HttpRequest`` for one call (not sent)."""
        if call.op == "insert":
            return self._events.insert(calendarId=call.calendar_id, body=call.body, sendUpdates="none")
        if call.op == "patch":
            return self._events.patch(
                calendarId=call.calendar_id, eventId=call.event_id, body=call.body, sendUpdates="none"
            )
        if call.op == "delete":
            return self._events.delete(calendarId=call.calendar_id, eventId=call.event_id, sendUpdates="none")
        raise ValueError(f"unknown Calendar call {call.op!r}")

    # --- one try --------------------------------------------------------------------
    def _once(self, op: str, make_request: Callable):
        """One try: Google's answer, or the error it maps to (retryable or not)."""
        return self._guard(op, lambda: make_request().execute(num_retries=0))

    def _guard(self, op: str, send: Callable):
        """``send()``, with Google's HTTP, token and connection faults mapped to our errors."""
        import httplib2
        from google.auth.exceptions import RefreshError, TransportError
        from googleapiclient.errors import BatchError, HttpError

        try:
            return send()
        except HttpError as exc:
            raise self._http_error(op, exc) from exc
        except RefreshError as exc:
            if _is_invalid_grant(exc):
                raise GoogleGrantRevokedError(self.user_id) from exc
            if getattr(exc, "retryable", False):
                raise GoogleRetryableError(f"user {self.user_id}: token refresh failed") from exc
            raise GoogleApiError(
                f"user {self.user_id}: token refresh refused: {_refresh_error(exc)}"
            ) from exc
        except BatchError as exc:  # an answer that is not multipart/mixed, or a bad Content-ID
            raise GoogleRetryableError(f"user {self.user_id}: Google {op} answer unreadable") from exc
        except (TimeoutError, OSError, httplib2.HttpLib2Error, TransportError) as exc:
            raise GoogleRetryableError(
                f"user {self.user_id}: Google {op} unreachable: {type(exc).__name__}"
            ) from exc

    def _http_error(self, op: str, exc) -> GoogleApiError | GoogleRetryableError:
        """The error an ``HttpError`` (of a call, a batch part or a whole batch) stands for."""
        status = exc.resp.status
        reason, message = _reason(exc)
        text = f"user {self.user_id}: Google {op} answered {status} {reason or ''}".rstrip()
        if status in _RETRYABLE_STATUS or (status == 403 and reason in _RATE_LIMIT_REASONS):
            return GoogleRetryableError(
                text, status, reason, retry_after=parse_retry_after(exc.resp.get("retry-after"))
            )
        error = GoogleApiError(text, status, reason, google_message=message)
        error.__cause__ = exc
        return error


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

"""A local fake of an OAuth 2 provider, wire-exact: the refresh grant, userinfo and token revocation.

Used by the tests (in-process, on 127.0.0.1 and an OS-chosen port) and by ``./dev up``
(``python -m almanac.integrations.fakes serve --port P ...``). ``OAuthState`` is the bookkeeping of
one provider's grants and answers its two endpoints, so any HTTP fake can serve them
(``tests/support/fake_google.py`` does, for Google's); ``FakeOAuthProvider`` serves one over HTTP:

- ``POST /oauth/token`` — RFC 6749 §6: form ``grant_type=refresh_token``, ``refresh_token``, optional
  ``scope`` (a subset of the granted ones); the client authenticates with ``client_secret_post``
  (form ``client_id`` + ``client_secret``) or ``client_secret_basic`` (HTTP Basic), never both.
  ``200 {"access_token", "expires_in", "token_type": "Bearer", "scope"}`` (+ ``"refresh_token"``
  when it rotates), ``Cache-Control: no-store`` (§5.1); errors as §5.2: ``invalid_request``,
  ``invalid_client`` (401, ``WWW-Authenticate: Basic``), ``unsupported_grant_type``,
  ``invalid_scope``, and for an unknown, revoked, rotated-away or forged refresh token
  ``400 {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}``
  (Google's text).
- ``GET`` / ``POST /userinfo`` with ``Authorization: Bearer <access token>`` — OpenID Connect
  userinfo: ``200 {"sub", "email", "email_verified": true, "name"}``; a missing, expired, revoked
  or garbled token ``401 {"error": "invalid_token", ...}`` with ``WWW-Authenticate: Bearer
  error="invalid_token", error_description="..."`` (RFC 6750 §3).
- ``POST /oauth/revoke`` — RFC 7009: form ``token`` (a refresh or an access token); always 200.
- For a test in another process (JSON bodies): ``POST /_grant {"subject", "scopes", "prefix"}`` ->
  ``{"refresh_token"}``, ``POST /_revoke {"refresh_token"}`` or ``{"subject"}``, ``POST /_expire
  {"subject"?}``, ``POST /_fail_next {"n", "status", "retry_after", "endpoint"}``, ``POST /_reset``,
  ``GET /_stats`` -> ``{"token_requests": n, "userinfo_requests": n, "refreshes": n}``.

Tokens are signed, self-validating strings (HMAC-SHA256 under the state's ``secret``: a runner
restarted with the same secret still accepts the tokens it gave before), never stored:

- refresh ``<prefix>rt.<subject b64>.<scopes b64>.<grant>.<serial>.<sig>`` — ``grant`` is the serial
  of the consent that started the chain (rotation keeps it; ``revoke`` revokes the whole grant);
- access ``at.<subject b64>.<expires epoch s>.<serial>.<sig>`` — ``serial`` is the issue instant (ns,
  strictly increasing within a process), which ``revoke`` and ``expire_access_tokens`` compare
  with the instant they were called ("every token issued before now").

What is kept in memory only: revoked grants, rotated-away refresh tokens, each subject's "not
before" instants, injected faults and the request logs (which hold fingerprints, never tokens).

Behaviours by refresh-token prefix (``grant(subject, prefix=...)``; deterministic, so they work
across processes; words combine, e.g. ``slow-rotate-``): ``revoked-`` always ``invalid_grant``;
``ratelimited-`` ``429 rate_limit_exceeded`` with ``Retry-After: 1``; ``unavailable-`` ``503
server_error``; ``slow-`` the refresh is done at once (counted, rotated) but answered after
``slow_seconds`` — a client that gives up first has lost a rotated token; ``badjson-`` 200 with an
HTML body (nothing issued); ``rotate-`` rotates even when the state does not; ``noexpiry-``
success without ``expires_in``.

Faults: ``fail_next(n, status, retry_after=, endpoint="token" | "userinfo" | "any")`` — the next
``n`` requests to that endpoint answer ``status`` (429 ``rate_limit_exceeded``, 5xx
``server_error``, 400 ``invalid_request``, 401 ``invalid_client`` / ``invalid_token``, 403
``access_denied`` / ``insufficient_scope``) before anything else is looked at.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import string
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

from almanac.signals import StopSignals

__all__ = [
    "BAD_JSON_BODY",
    "BEHAVIOURS",
    "CLIENT_SECRET_ENV",
    "ENDPOINTS",
    "INVALID_GRANT_DESCRIPTION",
    "SECRET_ENV",
    "Answer",
    "FakeOAuthProvider",
    "OAuthState",
    "fingerprint",
    "main",
    "oauth_error",
    "write_answer",
]

log = logging.getLogger(__name__)

#: Google's ``error_description`` of ``invalid_grant`` (what a revoked or unknown refresh token gets).
INVALID_GRANT_DESCRIPTION = "Token has been expired or revoked."
#: The refresh-token prefix words with a fixed behaviour (see the module docstring).
BEHAVIOURS = frozenset({"revoked", "ratelimited", "unavailable", "slow", "badjson", "rotate", "noexpiry"})
#: Where ``fail_next`` can inject answers.
ENDPOINTS = ("token", "userinfo", "any")
#: What ``badjson-`` tokens get with their 200: a proxy's error page, not JSON.
BAD_JSON_BODY = b"<html><head><title>Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>\n"
#: The runner reads the signing secret from here when ``--secret`` is not given (not visible in ps).
SECRET_ENV = "ALMANAC_FAKE_OAUTH_SECRET"
#: ... and the client secret it requires when ``--client-secret`` is not given.
CLIENT_SECRET_ENV = "ALMANAC_FAKE_OAUTH_CLIENT_SECRET"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_B64URL = frozenset(string.ascii_letters + string.digits + "-_")

#: What an endpoint answers: (HTTP status, body, headers). The body is a dict (sent as JSON),
#: bytes (sent as they are; the headers give their Content-Type) or None (no body).
Answer = tuple[int, dict[str, Any] | bytes | None, dict[str, str]]


def fingerprint(token: str) -> str:
    """A token's stand-in in logs and counters: 12 hex digits of its SHA-256 (never the token)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def oauth_error(status: int, error: str, description: str | None = None, headers=None) -> Answer:
    """An RFC 6749 §5.2 error answer: ``{"error", "error_description"}``."""
    body: dict[str, Any] = {"error": error}
    if description:
        body["error_description"] = description
    return status, body, dict(headers or {})


def _retry_headers(retry_after: float | None) -> dict[str, str]:
    if retry_after is None:
        return {}
    return {"Retry-After": str(int(retry_after) if float(retry_after).is_integer() else retry_after)}


def write_answer(handler: BaseHTTPRequestHandler, status: int, body, headers: Mapping[str, str]) -> None:
    """Send one ``Answer`` on ``handler`` (``http.server``), with its Content-Length (keep-alive)."""
    headers = dict(headers)
    if body is None:
        data = b""
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json; charset=utf-8")
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _unb64(part: str) -> str:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


@dataclass(frozen=True, slots=True)
class _Refresh:
    prefix: str
    subject: str
    scopes: tuple[str, ...]
    grant: int
    serial: int

    @property
    def behaviours(self) -> frozenset[str]:
        return BEHAVIOURS.intersection(self.prefix.lower().split("-"))


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What a token request came to: the answer, the grant's subject, ``outcome`` (when the answer
    is not an error code: ``refreshed``, ``badjson``, ``injected``), whether to answer slowly."""

    answer: Answer
    subject: str | None = None
    outcome: str | None = None
    slow: bool = False


@dataclass(frozen=True, slots=True)
class _Access:
    subject: str
    expires: int
    serial: int


class OAuthState:
    """One provider's grants, thread-safe: issues and checks tokens, answers the token and userinfo
    endpoints (``token_answer``, ``userinfo_answer``) and counts what it was asked.

    ``client_id`` / ``client_secret``: when given, the client must present them (else any non-empty
    pair is accepted). ``access_token_ttl``: seconds (``expires_in``). ``rotate_refresh_tokens``:
    every refresh answers a new refresh token and the used one is refused afterwards (RFC 6819
    §5.2.2.3). ``secret``: the signing key (str or bytes; random per instance unless given).
    ``refresh_marker`` / ``access_marker``: what a token starts with (after the prefix): each
    must hold a character outside base64url, e.g. Google's ``1//`` and ``ya29.``."""

    def __init__(
        self,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        access_token_ttl: int = 3600,
        rotate_refresh_tokens: bool = False,
        slow_seconds: float = 3.0,
        secret: str | bytes | None = None,
        refresh_marker: str = "rt.",
        access_marker: str = "at.",
    ) -> None:
        for marker in (refresh_marker, access_marker):
            if not set(marker) - _B64URL:
                raise ValueError(f"a token marker needs a character outside base64url: {marker!r}")
        self.client_id = client_id
        self.client_secret = client_secret
        self.access_token_ttl = access_token_ttl
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.slow_seconds = slow_seconds
        self.refresh_marker = refresh_marker
        self.access_marker = access_marker
        secret = secret if secret else secrets.token_hex(32)
        self._key = secret.encode() if isinstance(secret, str) else bytes(secret)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._last_tick = 0
        self._revoked_grants: set[tuple[str, int]] = set()  # (subject, grant)
        self._used: set[str] = set()  # fingerprints of rotated-away refresh tokens
        self._revoked_access: set[str] = set()  # fingerprints of access tokens revoked one by one
        self._refresh_not_before: dict[str, int] = {}  # subject -> tick: grants before it are revoked
        self._access_not_before: dict[str | None, int] = {}  # subject (None: all) -> tick
        self._faults: list[tuple[str, int, float | None]] = []  # (endpoint, status, retry_after)
        self._token_log: list[dict[str, Any]] = []
        self._userinfo_log: list[dict[str, Any]] = []

    @property
    def secret(self) -> bytes:
        """The signing key: give it to a new instance (or ``serve --secret``) to keep tokens valid."""
        return self._key

    # tokens ----------------------------------------------------------------
    def _tick(self) -> int:  # under the lock: now in ns, strictly increasing
        self._last_tick = max(time.time_ns(), self._last_tick + 1)
        return self._last_tick

    def _sign(self, kind: str, body: str) -> str:
        mac = hmac.new(self._key, f"{kind}\n{body}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def _verified(self, kind: str, token: str) -> str | None:
        body, dot, signature = token.rpartition(".")
        if not dot or not hmac.compare_digest(signature.encode(), self._sign(kind, body).encode()):
            return None
        return body

    def _refresh_token(
        self, prefix: str, subject: str, scopes: tuple[str, ...], grant: int, serial: int
    ) -> str:
        body = f"{prefix}{self.refresh_marker}{_b64(subject)}.{_b64(' '.join(scopes))}.{grant:x}.{serial:x}"
        return f"{body}.{self._sign('refresh', body)}"

    def _access_token(self, subject: str, ttl: float | None, serial: int) -> str:
        expires = int(time.time() + (self.access_token_ttl if ttl is None else ttl))
        body = f"{self.access_marker}{_b64(subject)}.{expires}.{serial:x}"
        return f"{body}.{self._sign('access', body)}"

    def _parse_refresh(self, token: str) -> _Refresh | None:
        body = self._verified("refresh", token)
        if body is None:
            return None
        try:
            head, scopes, grant, serial = body.rsplit(".", 3)
            prefix, marker, subject = head.rpartition(self.refresh_marker)
            if not marker:
                return None
            scope_list = tuple(_unb64(scopes).split())
            return _Refresh(prefix, _unb64(subject), scope_list, int(grant, 16), int(serial, 16))
        except (ValueError, binascii.Error, UnicodeDecodeError):  # signed by us, but another marker
            return None

    def _parse_access(self, token: str) -> _Access | None:
        body = self._verified("access", token)
        if body is None:
            return None
        try:
            head, expires, serial = body.rsplit(".", 2)
            prefix, marker, subject = head.rpartition(self.access_marker)
            if prefix or not marker:
                return None
            return _Access(_unb64(subject), int(expires), int(serial, 16))
        except (ValueError, binascii.Error, UnicodeDecodeError):  # signed by us, but another marker
            return None

    def grant(self, subject: str, *, scopes: Iterable[str] = ("openid", "email"), prefix: str = "") -> str:
        """A new refresh token for ``subject`` (the account's ``sub``): what the consent flow gives.
        ``prefix``: behaviour words in front (``"slow-"``, ``"rotate-noexpiry-"``; module docstring)."""
        scopes = tuple(scopes)
        if not isinstance(subject, str) or not subject:
            raise ValueError("subject must be a non-empty string")
        if not isinstance(prefix, str) or any(not isinstance(s, str) or s.split() != [s] for s in scopes):
            raise ValueError("prefix must be a string and each scope a non-empty word")
        with self._lock:
            serial = self._tick()
        return self._refresh_token(prefix, subject, scopes, serial, serial)

    def issue_access_token(self, subject: str, ttl: float | None = None) -> str:
        """An access token for ``subject``, valid ``ttl`` seconds (default ``access_token_ttl``)."""
        with self._lock:
            serial = self._tick()
        return self._access_token(subject, ttl, serial)

    def revoke(self, token: str) -> None:
        """The user revoked access. A refresh token: its grant (every token rotated from it too)
        answers ``invalid_grant`` from now on, and every access token of its subject issued before
        now is refused. An access token: that one is refused. ValueError: not a token of ours."""
        refresh = self._parse_refresh(token)
        if refresh is not None:
            with self._lock:
                self._revoked_grants.add((refresh.subject, refresh.grant))
                self._access_not_before[refresh.subject] = self._tick()
            return
        if self._parse_access(token) is None:
            raise ValueError("not a token this provider issued")
        with self._lock:
            self._revoked_access.add(fingerprint(token))

    def revoke_subject(self, subject: str) -> None:
        """Every grant and access token of ``subject`` issued before now is refused."""
        with self._lock:
            tick = self._tick()
            self._refresh_not_before[subject] = tick
            self._access_not_before[subject] = tick

    def expire_access_tokens(self, subject: str | None = None) -> None:
        """Access tokens (of ``subject``, or everyone's) issued before now are refused (401): a
        client must refresh, which still works."""
        with self._lock:
            self._access_not_before[subject] = self._tick()

    def access_token_subject(self, token: str) -> str | None:
        """The subject of a live access token of ours; None for an expired, revoked or foreign one."""
        access = self._parse_access(token)
        return access.subject if access is not None and self._access_problem(token, access) is None else None

    def _access_problem(self, token: str, access: _Access) -> str | None:
        with self._lock:
            not_before = max(self._access_not_before.get(key, 0) for key in (access.subject, None))
            revoked = fingerprint(token) in self._revoked_access or access.serial < not_before
        if revoked:
            return "The access token was revoked."
        if access.expires <= time.time():
            return "The access token expired."
        return None

    def _refresh_refused(self, presented: str, refresh: _Refresh) -> bool:  # under the lock
        return (
            (refresh.subject, refresh.grant) in self._revoked_grants
            or fingerprint(presented) in self._used
            or refresh.grant < self._refresh_not_before.get(refresh.subject, 0)
        )

    # faults ----------------------------------------------------------------
    def fail_next(
        self, n: int = 1, status: int = 429, *, retry_after: float | None = None, endpoint: str = "token"
    ) -> None:
        """The next ``n`` requests to ``endpoint`` (``token``, ``userinfo``, ``any``: whichever
        comes) answer ``status`` in the OAuth error shape, ``Retry-After`` when given."""
        if not isinstance(n, int) or n < 0:
            raise ValueError("n must be an integer >= 0")
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError("status must be a 4xx or 5xx HTTP status")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if retry_after is not None and float(retry_after) < 0:
            raise ValueError("retry_after must be >= 0")
        with self._lock:
            self._faults += [(endpoint, status, retry_after)] * n

    def _take_fault(self, endpoint: str) -> tuple[int, float | None] | None:
        with self._lock:
            for index, (where, status, retry_after) in enumerate(self._faults):
                if where in (endpoint, "any"):
                    del self._faults[index]
                    return status, retry_after
        return None

    def _fault_answer(self, endpoint: str, status: int, retry_after: float | None) -> Answer:
        headers = _retry_headers(retry_after)
        if status == 401 and endpoint == "userinfo":
            answer = self.invalid_token_answer("Injected fault.")
            return answer[0], answer[1], {**answer[2], **headers}
        if status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="oauth"'
        if status == 429:
            error = "rate_limit_exceeded"
        elif status >= 500:
            error = "server_error"
        elif status == 403:
            error = "access_denied" if endpoint == "token" else "insufficient_scope"
        else:
            error = "invalid_client" if status == 401 else "invalid_request"
        return oauth_error(status, error, "Injected fault.", headers)

    def set_stopping(self, stopping: bool) -> None:
        """``True`` wakes every ``slow-`` answer now (the server is stopping); ``False`` re-arms."""
        if stopping:
            self._stopping.set()
        else:
            self._stopping.clear()

    # the token endpoint ----------------------------------------------------------
    def token_answer(self, form: Mapping[str, list[str]], authorization: str | None = None) -> Answer:
        """The token endpoint's answer to one request: ``form`` as ``urllib.parse.parse_qs`` gives
        it (keep_blank_values), ``authorization`` the ``Authorization`` header (or None). A
        ``slow-`` refresh blocks here for ``slow_seconds`` (or until ``set_stopping(True)``)."""
        presented = (form.get("refresh_token") or [""])[-1]
        fault = self._take_fault("token")
        if fault is not None:
            done = _Outcome(self._fault_answer("token", *fault), outcome="injected")
        else:
            done = self._refresh(form, presented, authorization)
        status, body, headers = done.answer
        entry = {
            "time": time.time(),
            "fingerprint": fingerprint(presented) if presented else None,
            "subject": done.subject,
            "status": status,
            "outcome": done.outcome or (body.get("error") if isinstance(body, dict) else None),
            "client_auth": _client_auth_kind(form, authorization),
        }
        with self._lock:
            self._token_log.append(entry)
        if done.slow:
            self._stopping.wait(self.slow_seconds)
        return status, body, {**_NO_STORE, **headers}

    def _refresh(self, form: Mapping[str, list[str]], presented: str, authorization: str | None) -> _Outcome:
        if any(len(values) > 1 for values in form.values()):
            return _Outcome(oauth_error(400, "invalid_request", "A parameter was sent more than once."))
        grant_type = (form.get("grant_type") or [""])[0]
        if grant_type != "refresh_token":
            unsupported = f"Invalid grant_type: {grant_type[:60]}"
            return _Outcome(oauth_error(400, "unsupported_grant_type", unsupported))
        refused = self._client_problem(form, authorization)
        if refused is not None:
            return _Outcome(refused)
        if not presented:
            return _Outcome(oauth_error(400, "invalid_request", "Missing required parameter: refresh_token"))
        invalid_grant = oauth_error(400, "invalid_grant", INVALID_GRANT_DESCRIPTION)
        refresh = self._parse_refresh(presented)
        if refresh is None:
            return _Outcome(invalid_grant)
        behaviours, subject = refresh.behaviours, refresh.subject
        if "revoked" in behaviours:
            return _Outcome(invalid_grant, subject)
        if "ratelimited" in behaviours:
            limited = oauth_error(429, "rate_limit_exceeded", "Rate limit exceeded.", {"Retry-After": "1"})
            return _Outcome(limited, subject)
        if "unavailable" in behaviours:
            down = oauth_error(503, "server_error", "The service is currently unavailable.")
            return _Outcome(down, subject)
        scopes = refresh.scopes
        if "scope" in form:
            asked = set(form["scope"][0].split())
            if not asked <= set(scopes):
                too_wide = oauth_error(400, "invalid_scope", "The requested scope exceeds the grant.")
                return _Outcome(too_wide, subject)
            scopes = tuple(s for s in scopes if s in asked)
        if "badjson" in behaviours:
            html = (200, BAD_JSON_BODY, {"Content-Type": "text/html; charset=utf-8"})
            return _Outcome(html, subject, "badjson")
        rotate = self.rotate_refresh_tokens or "rotate" in behaviours
        with self._lock:
            if self._refresh_refused(presented, refresh):
                return _Outcome(invalid_grant, subject)
            if rotate:
                self._used.add(fingerprint(presented))
                rotated = self._refresh_token(
                    refresh.prefix, subject, refresh.scopes, refresh.grant, self._tick()
                )
            access = self._access_token(subject, None, self._tick())
        payload: dict[str, Any] = {
            "access_token": access,
            "expires_in": self.access_token_ttl,
            "token_type": "Bearer",
            "scope": " ".join(scopes),
        }
        if "noexpiry" in behaviours:
            del payload["expires_in"]
        if rotate:
            payload["refresh_token"] = rotated
        return _Outcome((200, payload, {}), subject, "refreshed", slow="slow" in behaviours)

    def _client_problem(self, form: Mapping[str, list[str]], authorization: str | None) -> Answer | None:
        """None when the client authenticated (RFC 6749 §2.3.1), else the 400/401 to answer."""
        unauthorized = {"WWW-Authenticate": 'Basic realm="oauth"'}
        basic = _basic_credentials(authorization)
        posted_id = (form.get("client_id") or [None])[0]
        posted_secret = (form.get("client_secret") or [None])[0]
        if basic is not None and posted_secret is not None:
            return oauth_error(400, "invalid_request", "More than one client authentication method was used.")
        if basic == ():
            return oauth_error(401, "invalid_client", "Malformed HTTP Basic credentials.", unauthorized)
        if basic is not None:
            ids, given_secrets = basic
            if posted_id is not None and posted_id not in ids:
                return oauth_error(400, "invalid_request", "client_id differs from the authenticated client.")
        else:
            ids, given_secrets = (posted_id,), (posted_secret,)
        if not any(ids) or not any(given_secrets):
            return oauth_error(401, "invalid_client", "The OAuth client was not found.", unauthorized)
        if self.client_id is not None and self.client_id not in ids:
            return oauth_error(401, "invalid_client", "The OAuth client was not found.", unauthorized)
        if self.client_secret is not None and not any(
            hmac.compare_digest(s.encode(), self.client_secret.encode()) for s in given_secrets if s
        ):
            return oauth_error(401, "invalid_client", "Unauthorized", unauthorized)
        return None

    # the userinfo endpoint -------------------------------------------------------
    def claims(self, subject: str) -> dict[str, Any]:
        """What userinfo answers for ``subject``."""
        email = subject if "@" in subject else f"{subject}@example.com"
        return {"sub": subject, "email": email, "email_verified": True, "name": subject}

    def invalid_token_answer(self, description: str) -> Answer:
        """The 401 of userinfo (RFC 6750 §3.1)."""
        challenge = f'Bearer error="invalid_token", error_description="{description}"'
        return oauth_error(401, "invalid_token", description, {"WWW-Authenticate": challenge})

    def userinfo_answer(self, authorization: str | None) -> Answer:
        """Userinfo's answer to a request with this ``Authorization`` header (or None)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        subject = None
        fault = self._take_fault("userinfo")
        if fault is not None:
            answer = self._fault_answer("userinfo", *fault)
        elif scheme.lower() != "bearer" or not token:
            answer = self.invalid_token_answer("Missing access token.")
        else:
            access = self._parse_access(token)
            problem = "Invalid access token." if access is None else self._access_problem(token, access)
            if problem is not None:
                answer = self.invalid_token_answer(problem)
            else:
                subject = access.subject  # type: ignore[union-attr]
                answer = (200, self.claims(subject), {})
        entry = {
            "time": time.time(),
            "fingerprint": fingerprint(token) if token else None,
            "subject": subject,
            "status": answer[0],
        }
        with self._lock:
            self._userinfo_log.append(entry)
        return answer

    # what happened ----------------------------------------------------------------
    @property
    def token_requests(self) -> list[dict[str, Any]]:
        """Every token request so far (a copy): ``time`` (epoch s), ``fingerprint`` of the refresh
        token sent (``fingerprint()``, None if none), ``subject`` (None if unknown), ``status``,
        ``outcome`` (``refreshed``, ``badjson``, ``injected`` or the error code), ``client_auth``
        (``basic``, ``post``, ``both`` or None)."""
        with self._lock:
            return [dict(entry) for entry in self._token_log]

    @property
    def userinfo_requests(self) -> list[dict[str, Any]]:
        """Every userinfo request so far: ``time``, ``fingerprint`` of the bearer token, ``subject``
        (None unless answered 200), ``status``."""
        with self._lock:
            return [dict(entry) for entry in self._userinfo_log]

    def refreshes(self, refresh_token: str | None = None) -> int:
        """How many refreshes succeeded (an access token was issued), or those with ``refresh_token``."""
        wanted = fingerprint(refresh_token) if refresh_token is not None else None
        with self._lock:
            return sum(
                1 for entry in self._token_log
                if entry["outcome"] == "refreshed" and wanted in (None, entry["fingerprint"])
            )

    def reset(self) -> None:
        """Forget revocations, rotations, expiries, injected faults and the logs (tokens stay valid)."""
        with self._lock:
            for kept in (self._revoked_grants, self._used, self._revoked_access, self._refresh_not_before,
                         self._access_not_before, self._faults, self._token_log, self._userinfo_log):
                kept.clear()


def _basic_credentials(authorization: str | None) -> tuple[tuple[str, ...], tuple[str, ...]] | tuple | None:
    """``None``: no Basic header; ``()``: a malformed one; else (client id, secret) candidates, as
    sent and form-decoded (RFC 6749 §2.3.1 asks for form encoding; many clients skip it)."""
    scheme, _, encoded = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ()
    user, colon, password = decoded.partition(":")
    if not colon:
        return ()
    return (user, unquote_plus(user)), (password, unquote_plus(password))


def _client_auth_kind(form: Mapping[str, list[str]], authorization: str | None) -> str | None:
    basic, post = _basic_credentials(authorization) is not None, "client_secret" in form
    return "both" if basic and post else "basic" if basic else "post" if post else None


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall each
    timeout = 60  # an idle keep-alive connection is closed after this

    def log_message(self, format: str, *args) -> None:
        log.debug("fake oauth: " + format, *args)

    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.connections.discard(self.connection)

    def _handle(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return write_answer(self, *oauth_error(400, "invalid_request", "Bad Content-Length."))
        body = self.rfile.read(length) if length else b""
        try:
            answer = self.server.fake._route(self.command, urlsplit(self.path).path, self.headers, body)
        except Exception:  # a bug in the fake: answer 500 rather than hang the client
            log.exception("fake oauth: error handling %s %s", self.command, self.path)
            answer = oauth_error(500, "server_error", "fake provider error")
        try:
            write_answer(self, *answer)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a slow answer)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle  # noqa: N815 - http.server's names


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for keep-alive connections to go idle
    fake: FakeOAuthProvider
    connections: set
    conn_lock: threading.Lock


def _json_object(body: bytes) -> dict[str, Any]:
    value = json.loads(body.decode("utf-8")) if body.strip() else {}
    if not isinstance(value, dict):
        raise ValueError("the body must be a JSON object")
    return value


class FakeOAuthProvider:
    """An OAuth 2 provider on ``host``:``port`` (0: OS-chosen) serving one ``OAuthState``
    (``.state``); a context manager with ``start()`` / ``stop()``. Endpoints: module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        access_token_ttl: int = 3600,
        rotate_refresh_tokens: bool = False,
        slow_seconds: float = 3.0,
        secret: str | bytes | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.state = OAuthState(
            client_id=client_id, client_secret=client_secret, access_token_ttl=access_token_ttl,
            rotate_refresh_tokens=rotate_refresh_tokens, slow_seconds=slow_seconds, secret=secret,
        )
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle ------------------------------------------------------------
    def start(self) -> FakeOAuthProvider:
        if self._server is not None:
            return self
        server = _Server((self.host, self._port), _Handler)
        server.fake, server.connections, server.conn_lock = self, set(), threading.Lock()
        self._port = server.server_address[1]  # kept: a restart binds the same port again
        self.state.set_stopping(False)
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fake-oauth-http", daemon=True
        )
        self._server = server
        self._thread.start()
        log.info("fake OAuth provider on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (a client then sees the provider gone)."""
        server, self._server = self._server, None
        if server is None:
            return
        self.state.set_stopping(True)  # wakes the slow answers
        server.shutdown()
        server.server_close()
        with server.conn_lock:
            for conn in list(server.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOAuthProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # addresses -------------------------------------------------------------
    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the fake OAuth provider is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, no trailing slash: ``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    @property
    def userinfo_url(self) -> str:
        return f"{self.url}/userinfo"

    @property
    def revoke_url(self) -> str:
        return f"{self.url}/oauth/revoke"

    # the state's controls ------------------------------------------------------
    def grant(self, subject: str, *, scopes: Iterable[str] = ("openid", "email"), prefix: str = "") -> str:
        return self.state.grant(subject, scopes=scopes, prefix=prefix)

    def revoke(self, token: str) -> None:
        self.state.revoke(token)

    def expire_access_tokens(self, subject: str | None = None) -> None:
        self.state.expire_access_tokens(subject)

    def fail_next(
        self, n: int = 1, status: int = 429, *, retry_after: float | None = None, endpoint: str = "token"
    ) -> None:
        self.state.fail_next(n, status, retry_after=retry_after, endpoint=endpoint)

    # routing ---------------------------------------------------------------
    def _route(self, method: str, path: str, headers, body: bytes) -> Answer:
        state = self.state
        if path == "/oauth/token":
            if method != "POST":
                return oauth_error(405, "invalid_request", "POST only.", {"Allow": "POST"})
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            return state.token_answer(form, headers.get("Authorization"))
        if path == "/userinfo":
            if method not in ("GET", "POST"):
                return oauth_error(405, "invalid_request", "GET or POST only.", {"Allow": "GET, POST"})
            return state.userinfo_answer(headers.get("Authorization"))
        if path == "/oauth/revoke" and method == "POST":
            for token in parse_qs(body.decode("utf-8", "replace")).get("token", [])[:1]:
                try:
                    state.revoke(token)
                except ValueError:  # RFC 7009 §2.2: an invalid token is not an error
                    pass
            return 200, None, {}
        if path.startswith("/_"):
            try:
                return self._admin(method, path, body)
            except (ValueError, TypeError, KeyError, AttributeError) as error:
                return 400, {"error": f"{type(error).__name__}: {error}"}, {}
        return oauth_error(404, "not_found", f"No such endpoint: {path[:100]}")

    def _admin(self, method: str, path: str, body: bytes) -> Answer:
        state = self.state
        if path == "/_stats" and method == "GET":
            return 200, {
                "token_requests": len(state.token_requests),
                "userinfo_requests": len(state.userinfo_requests),
                "refreshes": state.refreshes(),
            }, {}
        if method != "POST":
            return oauth_error(405, "invalid_request", "POST only.", {"Allow": "POST"})
        spec = _json_object(body)
        if path == "/_grant":
            scopes = spec.get("scopes") or ("openid", "email")
            if isinstance(scopes, str):
                scopes = scopes.split()
            token = state.grant(spec["subject"], scopes=scopes, prefix=spec.get("prefix") or "")
            return 200, {"refresh_token": token}, {}
        if path == "/_revoke":
            if spec.get("refresh_token"):
                state.revoke(spec["refresh_token"])
            elif spec.get("subject"):
                state.revoke_subject(spec["subject"])
            else:
                raise ValueError("give a refresh_token or a subject")
        elif path == "/_expire":
            state.expire_access_tokens(spec.get("subject"))
        elif path == "/_fail_next":
            retry_after = spec.get("retry_after")
            state.fail_next(
                int(spec.get("n", 1)), int(spec.get("status", 429)),
                retry_after=float(retry_after) if retry_after is not None else None,
                endpoint=spec.get("endpoint", "token"),
            )
        elif path == "/_reset":
            state.reset()
        else:
            return oauth_error(404, "not_found", f"No such endpoint: {path[:100]}")
        return 204, None, {}


# --------------------------------------------------------------------------- runner


def _serve(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get(SECRET_ENV) or None
    fake = FakeOAuthProvider(
        args.host, args.port, client_id=args.client_id,
        client_secret=args.client_secret or os.environ.get(CLIENT_SECRET_ENV) or None,
        access_token_ttl=args.access_token_ttl, rotate_refresh_tokens=args.rotate,
        slow_seconds=args.slow_seconds, secret=secret,
    )
    stop = StopSignals()
    with fake:
        stop.wait()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m almanac.integrations.fakes", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a fake OAuth 2 provider until SIGTERM",
        description=(
            "Serve a fake OAuth 2 provider (token endpoint /oauth/token, /userinfo, /oauth/revoke and the "
            "/_grant, /_revoke, /_expire, /_fail_next, /_reset, /_stats controls) until SIGTERM or SIGINT. "
            f"Tokens are signed with --secret (else ${SECRET_ENV}, else a random one): the same secret "
            "keeps the tokens of an earlier run valid."
        ),
    )
    serve.add_argument("--port", type=int, required=True, help="0: an OS-chosen port (logged)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--client-id", help="the only client id accepted (default: any)")
    serve.add_argument(
        "--client-secret", help=f"the only client secret accepted (default: ${CLIENT_SECRET_ENV}, else any)"
    )
    serve.add_argument("--secret", help=f"the token signing secret (default: ${SECRET_ENV}, else random)")
    serve.add_argument("--access-token-ttl", type=int, default=3600, help="expires_in, seconds")
    serve.add_argument("--rotate", action="store_true", help="rotate refresh tokens at every refresh")
    serve.add_argument("--slow-seconds", type=float, default=3.0, help="how long slow- tokens wait")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())

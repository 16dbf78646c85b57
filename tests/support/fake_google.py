"""A local fake of Google's OAuth2 token endpoint, userinfo and Calendar API v3 events, on the wire format.

Enough for ``google-auth`` and ``google-api-python-client`` to talk to it unchanged. The grants are
an ``almanac.integrations.fakes.OAuthState`` (``.state``; owners are its subjects) with Google's
token shapes (``1//refresh-...``, ``ya29.fake-...``) and Google's userinfo errors:

- ``POST /token`` (form ``grant_type=refresh_token``, client credentials posted or HTTP Basic):
  ``{"access_token", "expires_in", "token_type", "scope"}``, plus a new ``refresh_token`` when it
  rotates (``FakeGoogle(rotate_refresh_tokens=True)``, or a grant with prefix ``rotate-``; the used
  one then gets ``invalid_grant``); a revoked, rotated-away or unknown refresh token gets
  ``400 {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}``.
  The refresh-token prefixes of ``OAuthState`` work here too: ``grant("alice", prefix="slow-")``.
- ``GET /oauth2/v3/userinfo`` (``.userinfo_url``) and ``GET /v1/userinfo`` (OpenID Connect's,
  ``.oidc_userinfo_url``): ``200 {"sub": owner, "email", "email_verified": true}`` for a live
  access token; else ``401 {"error": "invalid_request", "error_description": "Invalid
  Credentials"}`` with ``WWW-Authenticate: Bearer realm="https://accounts.google.com/",
  error="invalid_token"``. Not logged in ``requests`` (``state.userinfo_requests`` has them).
Under ``/calendar/v3/calendars/{calendarId}``:

- ``POST   /events``            events.insert (client-chosen ids allowed; 409 when the id is taken)
- ``PATCH  /events/{eventId}``  events.patch (404 unknown; a patch with a status revives a cancelled one)
- ``DELETE /events/{eventId}``  events.delete (204; 410 when already deleted; 404 unknown)
- ``GET    /events``            events.list (``pageToken``/``maxResults``, ``showDeleted``)

``POST /batch/calendar/v3`` is Calendar's batch endpoint, as Google speaks it: a
``multipart/mixed`` body whose parts are ``application/http`` requests (request line, headers,
body) with a ``Content-ID``; each part goes to the same handlers as a single call (its own
``Authorization``, or the outer request's when it has none) and the answer is
``multipart/mixed`` with one ``application/http`` response per part, ``Content-ID:
<response-{id}>``, in order. More than 50 parts is a 400, as on Google.

API calls need ``Authorization: Bearer <access token>``; an unknown or expired token gets 401
(so clients exercise their refresh path). Each token belongs to an *owner* — one Google
account (its ``sub``): ``grant("alice")`` and ``grant("alice-work")`` are two accounts, with
separate calendars, even when one Almanac user connects both in turn.

Faults: ``fail_next`` makes the next N API requests answer 429 (with ``Retry-After``) or 5xx
(a batch request as a whole, with all its calls); ``fail_next_token(n, status, retry_after,
endpoint="token" | "userinfo" | "any")`` the same for the next N token (or userinfo) requests,
in the OAuth error shape (429 ``rate_limit_exceeded``, 5xx ``server_error``); ``reject`` makes
the calls about one event (by id or summary) answer a 4xx — or, with ``times``, a 429/5xx a few
times — in Google's error shape until ``clear_rejections``; ``remove_calendar`` makes a calendar
404 (as when the user deleted it); ``delay`` waits before answering each call (each part of a
batch too).
Events are kept per (owner, calendar id) for assertions; every API call (a batch's parts one
by one) is logged in ``requests`` as ``(method, path, owner)``, and every HTTP request to the
API in ``http_requests`` as ``(method, path, calls)`` (no tokens).
"""

from __future__ import annotations

import email.parser
import json
import re
import secrets
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from almanac.integrations.fakes import Answer, OAuthState, write_answer

__all__ = ["CALENDAR_EVENTS_SCOPE", "FakeGoogle", "GoogleOAuthState"]

_EVENTS = re.compile(r"^/calendar/v3/calendars/(?P<cal>[^/]+)/events(?:/(?P<event>[^/]+))?$")
_ID = re.compile(r"^[a-v0-9]{5,1024}$")  # base32hex, as Calendar requires of client-chosen ids
BATCH_PATH = "/batch/calendar/v3"
MAX_BATCH_CALLS = 50  # Calendar's limit per batch request
CALENDAR_EVENTS_SCOPE = "https://www.googleapis.com/auth/calendar.events"
USERINFO_PATH, OIDC_USERINFO_PATH = "/oauth2/v3/userinfo", "/v1/userinfo"


def _error(code: int, reason: str, message: str) -> dict:
    return {
        "error": {
            "errors": [{"domain": "global", "reason": reason, "message": message}],
            "code": code,
            "message": message,
        }
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httplib2 expects
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall each
    server: FakeGoogle

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict | bytes | None = None, headers: dict | None = None) -> None:
        write_answer(self, status, payload, headers or {})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_POST(self) -> None:  # http.server's naming
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._body()
        fake = self.server
        if url.path == "/token" and method == "POST":
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            answer = fake.state.token_answer(form, self.headers.get("Authorization"))
            with fake.lock:
                fake.requests.append((method, url.path, None))
            return self._send(*answer)
        if url.path in (USERINFO_PATH, OIDC_USERINFO_PATH) and method in ("GET", "POST"):
            return self._send(*fake.state.userinfo_answer(self.headers.get("Authorization")))
        if url.path == BATCH_PATH and method == "POST":
            return self._batch(body)
        if not _EVENTS.match(url.path):
            return self._send(404, _error(404, "notFound", "Not Found"))
        with fake.lock:
            fake.http_requests.append((method, url.path, 1))
        status, payload, headers = fake._api_call(
            method, self.path, self.headers.get("Authorization", ""), body, faults=True
        )
        return self._send(status, payload, headers)

    def _batch(self, body: bytes) -> None:
        """Calendar's batch endpoint: parse the multipart/mixed request, answer each part."""
        fake = self.server
        content_type = self.headers.get("Content-Type", "")
        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        parts = message.get_payload() if message.is_multipart() else None
        calls = []
        for part in parts or ():
            request_line, _, rest = str(part.get_payload()).partition("\n")
            words = request_line.strip().split(" ")
            if part.get_content_type() != "application/http" or len(words) != 3:
                calls = []
                break
            inner = email.parser.Parser().parsestr(rest)
            calls.append((part.get("Content-ID"), words[0], words[1], inner))
        if not calls:
            return self._send(400, _error(400, "badRequest", "Not a multipart/mixed body of HTTP requests"))
        if len(calls) > MAX_BATCH_CALLS:
            too_many = f"More than {MAX_BATCH_CALLS} calls in one batch request"
            return self._send(400, _error(400, "badRequest", too_many))
        with fake.lock:
            fake.http_requests.append(("POST", BATCH_PATH, len(calls)))
            fault = fake._faults.pop(0) if fake._faults else None
        if fault is not None:  # the batch request as a whole
            return self._send(*_fault_answer(*fault))
        outer_auth = self.headers.get("Authorization", "")
        boundary = "batch_" + secrets.token_hex(12)
        out = []
        for content_id, method, target, inner in calls:
            inner_body = (inner.get_payload() or "").encode()
            auth = inner.get("Authorization") or outer_auth  # a part's header wins over the outer one
            status, payload, headers = fake._api_call(method, target, auth, inner_body, faults=False)
            data = b"" if payload is None else json.dumps(payload).encode()
            head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
            head += [f"{key}: {value}" for key, value in headers.items()]
            if payload is not None:
                head.append("Content-Type: application/json; charset=UTF-8")
            head.append(f"Content-Length: {len(data)}")
            part_head = ["Content-Type: application/http"]
            content_id = (content_id or "").strip()
            if content_id:
                part_head.append(f"Content-ID: <response-{content_id.removeprefix('<').removesuffix('>')}>")
            out.append(
                f"--{boundary}\r\n".encode()
                + "\r\n".join(part_head).encode()
                + b"\r\n\r\n"
                + "\r\n".join(head).encode()
                + b"\r\n\r\n"
                + data
                + b"\r\n"
            )
        answer = b"".join(out) + f"--{boundary}--\r\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/mixed; boundary={boundary}")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def _fault_answer(status: int, retry_after: int | None) -> tuple[int, dict, dict]:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    reason = "rateLimitExceeded" if status == 429 else "backendError"
    return status, _error(status, reason, "injected fault"), headers


class GoogleOAuthState(OAuthState):
    """``OAuthState`` with Google's token shapes, userinfo claims and userinfo 401."""

    def __init__(self, **kwargs) -> None:
        super().__init__(refresh_marker="1//refresh-", access_marker="ya29.fake-", **kwargs)

    def claims(self, subject: str) -> dict:
        claims = super().claims(subject)
        del claims["name"]  # Google adds it only with the ``profile`` scope
        return claims

    def invalid_token_answer(self, description: str) -> Answer:
        return (
            401,
            {"error": "invalid_request", "error_description": "Invalid Credentials"},
            {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'},
        )


class FakeGoogle(ThreadingHTTPServer):
    """The fake, as a context manager: ``with FakeGoogle() as g: ... g.url ...``.

    ``rotate_refresh_tokens``: every refresh answers a new refresh token and the used one is
    refused afterwards. ``slow_seconds``: how long ``slow-`` grants wait (``OAuthState``)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, *, access_token_ttl: int = 3600, rotate_refresh_tokens: bool = False, slow_seconds: float = 3.0
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.state = GoogleOAuthState(
            access_token_ttl=access_token_ttl, rotate_refresh_tokens=rotate_refresh_tokens,
            slow_seconds=slow_seconds,
        )
        self.requests: list[tuple[str, str, str | None]] = []  # every call, a batch's parts one by one
        self.http_requests: list[tuple[str, str, int]] = []  # every API request: (method, path, calls)
        self.delay = 0.0  # seconds to wait before answering each call (each part of a batch too)
        self.events: dict[tuple[str, str], dict[str, dict]] = {}  # (owner, calendar) -> id -> event
        self._faults: list[tuple[int, int | None]] = []
        self._rejections: list[dict] = []  # under lock
        self.rejected: list[tuple[str, str, str | None]] = []  # requests answered by a rejection
        self.removed_calendars: set[tuple[str, str]] = set()
        self._seq = 0

    # --- addresses ---------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def api_endpoint(self) -> str:
        return f"{self.url}/calendar/v3/"

    @property
    def userinfo_url(self) -> str:
        """``https://www.googleapis.com/oauth2/v3/userinfo`` here."""
        return f"{self.url}{USERINFO_PATH}"

    @property
    def oidc_userinfo_url(self) -> str:
        """``https://openidconnect.googleapis.com/v1/userinfo`` here."""
        return f"{self.url}{OIDC_USERINFO_PATH}"

    @property
    def access_token_ttl(self) -> int:
        return self.state.access_token_ttl

    @access_token_ttl.setter
    def access_token_ttl(self, seconds: int) -> None:
        self.state.access_token_ttl = seconds

    def __enter__(self) -> FakeGoogle:
        self.state.set_stopping(False)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.set_stopping(True)  # wakes slow token answers
        self.shutdown()
        self.server_close()

    # --- test controls -----------------------------------------------------------
    def grant(self, owner: str, *, scopes=(CALENDAR_EVENTS_SCOPE,), prefix: str = "") -> str:
        """A new refresh token for ``owner`` (what the OAuth consent flow would give); ``prefix``:
        an ``OAuthState`` behaviour (``"revoked-"``, ``"slow-"``, ``"rotate-"``...)."""
        return self.state.grant(owner, scopes=scopes, prefix=prefix)

    def issue_access_token(self, owner: str, ttl: int | None = None) -> str:
        return self.state.issue_access_token(owner, ttl)

    def revoke(self, refresh_token: str) -> None:
        """The user revoked access: the refresh token (its grant) and the owner's access tokens
        stop working."""
        self.state.revoke(refresh_token)

    def expire_access_tokens(self) -> None:
        self.state.expire_access_tokens()

    def fail_next_token(
        self, count: int, status: int = 429, retry_after: int | None = None, *, endpoint: str = "token"
    ) -> None:
        """The next ``count`` token requests (``endpoint="userinfo"``: userinfo requests; ``"any"``:
        either) answer ``status``, with ``Retry-After`` when given."""
        self.state.fail_next(count, status, retry_after=retry_after, endpoint=endpoint)

    def fail_next(self, count: int, status: int = 429, retry_after: int | None = None) -> None:
        """The next ``count`` API requests (not token calls) answer ``status``: a single call,
        or a batch request as a whole (none of its calls is made)."""
        with self.lock:
            self._faults += [(status, retry_after)] * count

    def reject(
        self,
        status: int = 400,
        reason: str = "invalid",
        message: str = "Invalid value.",
        *,
        event_id: str | None = None,
        summary: str | None = None,
        owner: str | None = None,
        methods: tuple[str, ...] = ("POST", "PATCH", "DELETE"),
        times: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Refuse every call about one event — the event ``event_id``, or whose (sent or stored)
        summary is ``summary`` — with ``status`` and Google's error JSON, until ``clear_rejections``
        (or, with ``times``, that many times: e.g. a 429 once). ``retry_after``: a ``Retry-After``
        header on the answer."""
        if event_id is None and summary is None:
            raise ValueError("reject needs an event_id or a summary")
        with self.lock:
            self._rejections.append(
                {
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "event_id": event_id,
                    "summary": summary,
                    "owner": owner,
                    "methods": methods,
                    "times": times,
                    "retry_after": retry_after,
                }
            )

    def clear_rejections(self) -> None:
        with self.lock:
            self._rejections.clear()

    def remove_calendar(self, owner: str, calendar: str = "primary") -> None:
        """The user deleted that calendar (or the account cannot see it): every call answers 404."""
        with self.lock:
            self.removed_calendars.add((owner, calendar))

    def live_events(self, owner: str, calendar: str = "primary") -> dict[str, dict]:
        """Events of ``owner``'s calendar that are not deleted (status != cancelled)."""
        with self.lock:
            found = self.events.get((owner, calendar), {})
            return {k: dict(v) for k, v in found.items() if v.get("status") != "cancelled"}

    def calls(self, *methods: str, path_part: str = "/events") -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.requests if r[0] in methods and path_part in r[1]]

    def token_calls(self) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r[1] == "/token")

    def batch_requests(self) -> list[int]:
        """The number of calls in each batch request so far, in order."""
        with self.lock:
            return [calls for _, path, calls in self.http_requests if path == BATCH_PATH]

    def single_requests(self) -> int:
        """API requests that were one call (not a batch)."""
        with self.lock:
            return sum(1 for _, path, _ in self.http_requests if path != BATCH_PATH)

    def delete_behind_our_back(self, owner: str, event_id: str, calendar: str = "primary") -> None:
        """The user deleted (or another client purged) the event on Google."""
        with self.lock:
            self.events.get((owner, calendar), {}).pop(event_id, None)

    # --- protocol (called with or without the lock as noted) -------------------------
    def _api_call(
        self, method: str, target: str, auth: str, body: bytes, *, faults: bool
    ) -> tuple[int, dict | None, dict]:
        """One Calendar API call, single or a batch's part: ``(status, payload, headers)``."""
        if self.delay:
            time.sleep(self.delay)
        url = urlsplit(target)
        match = _EVENTS.match(url.path)
        if not match:
            return 404, _error(404, "notFound", "Not Found"), {}
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        with self.lock:
            owner = self._owner_of(token)
            self.requests.append((method, url.path, owner))
            if owner is None:
                return (
                    401,
                    _error(401, "authError", "Invalid Credentials"),
                    {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
                )
            if faults and self._faults:
                return _fault_answer(*self._faults.pop(0))
            calendar, event_id = unquote(match["cal"]), match["event"] and unquote(match["event"])
            if (owner, calendar) in self.removed_calendars:
                return 404, _error(404, "notFound", "Not Found"), {}
            refusal = self._rejection_for(method, owner, calendar, event_id, body)
            if refusal is not None:
                status, reason, message, headers = refusal
                self.rejected.append((method, url.path, owner))
                return status, _error(status, reason, message), headers
            status, payload = self._events_call(method, owner, calendar, event_id, body, parse_qs(url.query))
            return status, payload, {}

    def _rejection_for(
        self, method, owner, calendar, event_id, body
    ) -> tuple[int, str, str, dict] | None:  # under lock
        if not self._rejections:
            return None
        try:
            sent = json.loads(body) if body else {}
        except ValueError:
            sent = {}
        target = event_id or sent.get("id")
        stored = self.events.get((owner, calendar), {}).get(target or "", {})
        summaries = {sent.get("summary"), stored.get("summary")} - {None}
        for rule in self._rejections:
            if method not in rule["methods"] or rule["owner"] not in (None, owner):
                continue
            if (rule["event_id"] is not None and rule["event_id"] == target) or (
                rule["summary"] is not None and rule["summary"] in summaries
            ):
                if rule["times"] is not None:
                    rule["times"] -= 1
                    if rule["times"] <= 0:
                        self._rejections.remove(rule)
                headers = {"Retry-After": str(rule["retry_after"])} if rule["retry_after"] is not None else {}
                return rule["status"], rule["reason"], rule["message"], headers
        return None

    def _owner_of(self, token: str) -> str | None:  # under lock (the state has its own)
        return self.state.access_token_subject(token) if token else None

    def _events_call(
        self, method, owner, calendar, event_id, body, query
    ) -> tuple[int, dict | None]:  # under lock
        store = self.events.setdefault((owner, calendar), {})
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        if method == "POST" and event_id is None:
            resource = json.loads(body or b"{}")
            new_id = resource.get("id")
            if new_id is None:
                self._seq += 1
                new_id = f"fakeevent{self._seq:08d}"
            elif not _ID.match(new_id):
                return 400, _error(400, "invalid", "Invalid resource id value.")
            if new_id in store:
                return 409, _error(409, "duplicate", "The requested identifier already exists.")
            if "start" not in resource or "end" not in resource:
                return 400, _error(400, "required", "Missing time range.")
            resource.update(
                kind="calendar#event",
                id=new_id,
                created=now,
                updated=now,
                etag=f'"{secrets.randbits(40)}"',
                status=resource.get("status", "confirmed"),
            )
            store[new_id] = resource
            return 200, resource
        if event_id is None and method == "GET":
            show_deleted = query.get("showDeleted", ["false"])[0] == "true"
            items = [e for e in store.values() if show_deleted or e.get("status") != "cancelled"]
            start = int(query.get("pageToken", ["0"])[0])
            size = int(query.get("maxResults", ["250"])[0])
            page = {"kind": "calendar#events", "items": items[start : start + size]}
            if start + size < len(items):
                page["nextPageToken"] = str(start + size)
            return 200, page
        if event_id is None:
            return 405, _error(405, "methodNotAllowed", "Method Not Allowed")
        current = store.get(event_id)
        if current is None:
            return 404, _error(404, "notFound", "Not Found")
        if method == "DELETE":
            if current.get("status") == "cancelled":
                return 410, _error(410, "deleted", "Resource has been deleted")
            current.update(status="cancelled", updated=now)
            return 204, None
        if method == "PATCH":
            patch = json.loads(body or b"{}")
            patch.pop("id", None)
            current.update(patch)  # a cancelled event comes back only if the patch sets a status
            current["updated"] = now
            return 200, current
        if method == "GET":
            return 200, current
        return 405, _error(405, "methodNotAllowed", "Method Not Allowed")

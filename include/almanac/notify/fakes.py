"""Local fakes of the notification providers, wire-exact: an SMTP server, Twilio's Messages API, FCM HTTP v1.

Used by the tests (each fake in-process, on 127.0.0.1 and an OS-chosen port) and by ``./dev up``
(``python -m almanac.notify.fakes serve ...``, fixed ports, what was "sent" written to a folder).
Each fake is a context manager with ``start()`` / ``stop()``, ``.port`` (and ``.url`` for HTTP),
a thread-safe ``.received`` (a snapshot list of what it accepted), ``wait_received(n)``,
``fail_next(n, ...)`` (the next n sends get that answer whatever the recipient) and ``reset()``.
The HTTP fakes also answer ``GET /_received`` (JSON list), ``POST /_reset`` and
``POST /_fail_next`` (JSON ``{"n", "status", "retry_after", "code"}``) for a test in another process.

Behaviour by recipient (deterministic, so it works across processes):

- SMTP, by the local part of ``RCPT TO``: ``reject+...@`` 550 5.1.1 at RCPT, ``busy+...@`` 451
  4.3.0 at RCPT, ``slow+...@`` DATA answered after ``slow_seconds``, ``drop+...@`` DATA read,
  recorded, and the connection closed without an answer; anything else ``250 OK queued as <id>``.
- Twilio, by ``To``: ``+15550100001`` 400/21211 (invalid number), ``+15550100002`` 400/21610
  (unsubscribed), ``+15550100003`` 429/20429 with ``Retry-After: 2``, ``+15550100004`` 503/20503,
  ``+15550100005`` slow, ``+15550100006`` recorded then the socket closed without a response.
- FCM, by registration-token prefix: ``unregistered-`` 404 UNREGISTERED, ``invalid-`` 400
  INVALID_ARGUMENT, ``quota-`` 429 QUOTA_EXCEEDED with ``Retry-After: 2``, ``unavailable-`` 503
  UNAVAILABLE, ``slow-`` slow, ``drop-`` recorded then closed without a response.

"Slow" and "drop" messages are recorded as received: they reached the provider, which is what
makes them the ambiguous case a sender must report as ``uncertain``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from almanac.signals import StopSignals

__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "FCM_SCOPE",
    "GOOGLE_TOKEN_AUDIENCE",
    "FakeFcm",
    "FakeSmtpServer",
    "FakeTwilio",
    "ReceivedEmail",
    "load_or_create_service_account",
    "main",
]

log = logging.getLogger(__name__)

#: The account SID a ``FakeTwilio`` serves unless told otherwise ("AC" + 32 hex, fixed).
DEFAULT_ACCOUNT_SID = "AC" + hashlib.sha256(b"almanac fake twilio account").hexdigest()[:32]
#: The OAuth scope an FCM v1 send needs.
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
#: The ``aud`` google-auth puts in every service-account assertion, whatever the key's
#: ``token_uri`` says (Google's endpoint accepts it too): the fake accepts it or its own URI.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_DROP = "drop"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _mask(value: str) -> str:
    """An address, number or token shortened for a log line (never logged in full)."""
    if "@" in value:
        local, _, domain = value.rpartition("@")
        return f"{local[:1]}***@{domain}"
    return f"{value[:4]}***{value[-2:]}" if len(value) > 8 else "***"


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``data`` to ``path`` through a temporary file created with ``mode``: never seen half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Log:
    """What a fake accepted (thread-safe), optionally appended to a JSON-lines file."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[Any] = []

    def add(self, item: Any, jsonl: Path | None = None) -> None:
        with self._cond:
            self._items.append(item)
            if jsonl is not None:
                jsonl.parent.mkdir(parents=True, exist_ok=True)
                with open(jsonl, "a", encoding="utf-8") as file:
                    file.write(json.dumps(item, sort_keys=True) + "\n")
            self._cond.notify_all()

    def snapshot(self) -> list[Any]:
        with self._cond:
            return list(self._items)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def wait(self, n: int, timeout: float) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= n, timeout):
                raise TimeoutError(f"{len(self._items)} received within {timeout}s, wanted {n}")
            return list(self._items)


class _Injected:
    """Answers queued by ``fail_next``: taken one per send, whatever the recipient."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Any] = deque()

    def push(self, n: int, answer: Any) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._queue.extend([answer] * n)

    def take(self, accept: Callable[[Any], bool] = lambda _answer: True) -> Any | None:
        with self._lock:
            if self._queue and accept(self._queue[0]):
                return self._queue.popleft()
            return None

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()


# --------------------------------------------------------------------------- SMTP


@dataclass(frozen=True, slots=True)
class ReceivedEmail:
    """One message the fake SMTP server accepted: the envelope, the raw bytes as sent after
    DATA, the queue id it answered (or would have, for ``drop+``), the AUTH login if the client
    authenticated (never the password), and how it was answered: ``queued``, ``slow`` (queued
    after a wait) or ``dropped`` (no answer). ``message_id`` is parsed from ``raw`` when asked
    for, not while the server answers (parsing a header block costs the fake ~0.4 ms a message,
    a quarter of what it spends per message under the notification benchmark)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    queue_id: str
    auth_user: str | None
    answer: str
    received_at: str

    @property
    def message_id(self) -> str | None:
        """The ``Message-ID`` header of ``raw`` (None without one)."""
        return BytesHeaderParser(policy=default_policy).parsebytes(self.raw).get("Message-ID")


@dataclass(frozen=True, slots=True)
class _SmtpFailure:
    code: int | str
    message: str
    at: str  # "rcpt" | "data"


_SMTP_TEXTS = {
    421: "4.3.0 service not available, closing transmission channel",
    450: "4.2.1 mailbox temporarily unavailable",
    451: "4.3.0 try again later",
    452: "4.3.1 insufficient system storage",
    550: "5.1.1 mailbox unavailable",
    552: "5.3.4 message too big",
    554: "5.7.1 message rejected",
}


def _smtp_local(address: str) -> str:
    return address.rpartition("@")[0].lower() if "@" in address else address.lower()


class _SmtpHandler:
    """aiosmtpd hooks: RCPT and DATA decide the answer from the recipient or an injected one."""

    def __init__(self, fake: FakeSmtpServer) -> None:
        self.fake = fake

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802 - aiosmtpd's name
        failure = self.fake._injected.take(lambda f: f.at == "rcpt")
        if failure is not None:
            return f"{failure.code} {failure.message}"
        local = _smtp_local(address)
        if local.startswith("reject+"):
            return "550 5.1.1 mailbox unavailable"
        if local.startswith("busy+"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        failure = self.fake._injected.take(lambda f: f.at == "data")
        if failure is not None and failure.code != _DROP:
            return f"{failure.code} {failure.message}"
        locals_ = [_smtp_local(a) for a in envelope.rcpt_tos]
        if failure is not None or any(p.startswith("drop+") for p in locals_):
            answer = "dropped"
        elif any(p.startswith("slow+") for p in locals_):
            answer = "slow"
        else:
            answer = "queued"
        queue_id = secrets.token_hex(6).upper()
        login = getattr(session.auth_data, "login", None)
        raw = envelope.original_content if envelope.original_content is not None else envelope.content
        self.fake._record(
            ReceivedEmail(
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=bytes(raw),
                queue_id=queue_id,
                auth_user=login.decode(errors="replace") if isinstance(login, bytes) else login,
                answer=answer,
                received_at=_now_iso(),
            )
        )
        if answer == "dropped":
            log.info("fake smtp: %s read, closing without an answer", queue_id)
            server.transport.close()  # connection_lost() cancels this coroutine: nothing is answered
            await asyncio.sleep(3600)
        if answer == "slow":
            await asyncio.sleep(self.fake.slow_seconds)
        log.info("fake smtp: queued %s for %d recipient(s)", queue_id, len(envelope.rcpt_tos))
        return f"250 OK queued as {queue_id}"


def _authenticate(server, session, envelope, mechanism, auth_data):
    """Any user and password is accepted (AUTH PLAIN / LOGIN over plain TCP)."""
    from aiosmtpd.smtp import AuthResult

    return AuthResult(success=True, auth_data=auth_data)


class _Fake:
    """What every fake shares: where it listens, what it accepted, the answers injected for it."""

    name = "fake"

    def __init__(self, host: str, port: int, store_dir, slow_seconds: float) -> None:
        self.host = host
        self._port = port
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.slow_seconds = slow_seconds
        self._log = _Log()
        self._injected = _Injected()

    def start(self):  # pragma: no cover - subclasses
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"the {self.name} is not started")
        return self._port

    # what arrived --------------------------------------------------------
    @property
    def received(self) -> list:
        return self._log.snapshot()

    def wait_received(self, n: int = 1, timeout: float = 10.0) -> list:
        """Block until at least ``n`` messages arrived; all of them. Raises TimeoutError."""
        return self._log.wait(n, timeout)

    def reset(self) -> None:
        """Forget what was received and any injected answers (files in ``store_dir`` stay)."""
        self._log.clear()
        self._injected.clear()


class FakeSmtpServer(_Fake):
    """A real SMTP server (aiosmtpd) on ``host``:``port`` (0: OS-chosen) that accepts mail for
    anyone, AUTH PLAIN/LOGIN with any credentials or none, no TLS.

    ``store_dir``: each accepted message is also written there as ``<time>-<queue id>.eml``
    (``Return-Path`` and ``Delivered-To`` lines added in front, as a mailbox would)."""

    name = "fake SMTP server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        store_dir: str | os.PathLike | None = None,
        *,
        slow_seconds: float = 5.0,
    ) -> None:
        super().__init__(host, port, store_dir, slow_seconds)
        self._controller = None

    # lifecycle ------------------------------------------------------------
    def start(self) -> FakeSmtpServer:
        if self._controller is not None:
            return self
        from aiosmtpd.controller import Controller

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]  # kept: a restart binds the same port again

        class _BoundController(Controller):
            def _create_server(self):  # listen on the socket bound above (port 0 works)
                return self.loop.create_server(self._factory_invoker, sock=sock)

        controller = _BoundController(
            _SmtpHandler(self),
            hostname=self.host,
            port=self._port,
            server_hostname="fake-smtp.almanac.test",
            authenticator=_authenticate,
            auth_require_tls=False,
            auth_required=False,
        )
        controller.start()
        self._controller = controller
        log.info("fake smtp listening on %s:%s", self.host, self._port)
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    # what arrived: ``received`` is a list of ``ReceivedEmail`` --------------
    def fail_next(
        self, n: int = 1, code: int | str = 451, message: str | None = None, *, at: str = "rcpt"
    ) -> None:
        """The next ``n`` recipients (``at="rcpt"``) or messages (``at="data"``) get ``code``
        (e.g. 451, 550) whatever the address; ``code="drop"`` (DATA only) reads the message and
        closes the connection without answering."""
        if code == _DROP:
            at = "data"
        elif not isinstance(code, int) or not 400 <= code <= 599:
            raise ValueError("code must be a 4xx/5xx SMTP reply code or 'drop'")
        if at not in ("rcpt", "data"):
            raise ValueError("at must be 'rcpt' or 'data'")
        text = message or (_SMTP_TEXTS.get(code, "4.0.0 temporary failure") if code != _DROP else "")
        self._injected.push(n, _SmtpFailure(code, text, at))

    def _record(self, email: ReceivedEmail) -> None:
        self._log.add(email)
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            head = f"Return-Path: <{email.mail_from}>\r\n" + "".join(
                f"Delivered-To: {rcpt}\r\n" for rcpt in email.rcpt_tos
            )
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            _write_atomic(self.store_dir / f"{stamp}-{email.queue_id}.eml", head.encode() + email.raw)


# --------------------------------------------------------------------------- HTTP fakes


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: Any  # http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    def form(self) -> dict[str, str]:
        fields = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        return {key: values[0] for key, values in fields.items()}


@dataclass(slots=True)
class _Reply:
    status: int
    body: Any = None  # JSON-able; None: no body
    headers: dict[str, str] | None = None


class _HttpHandler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection is closed after this

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.server.fake.name, format % args)

    def setup(self) -> None:
        super().setup()
        # Headers and body are two writes: without NODELAY, Nagle holds the body until the
        # client's delayed ACK of the headers (40 ms per answer), which real providers do not cost.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.connections.discard(self.connection)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = _Request(self.command, urlsplit(self.path).path, self.headers, body)
        try:
            reply = self.server.fake._dispatch(request)
        except Exception:  # a bug in the fake: answer 500 rather than hang the client
            log.exception("%s: error handling %s %s", self.server.fake.name, self.command, request.path)
            reply = _Reply(500, {"error": "fake provider error"})
        if reply is None:  # the "drop" behaviour: no status line, the connection is closed
            self.close_connection = True
            return
        data = b"" if reply.body is None else json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            for key, value in (reply.headers or {}).items():
                self.send_header(key, value)
            if reply.body is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a slow answer)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle  # noqa: N815 - http.server's names


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: fifty senders connecting at once (ten
    # dispatchers of five threads) overflow it, and the kernel then holds connections back by
    # SYN retransmits (1 s, 3 s, ...) or drops them. Providers' front ends take far more.
    request_queue_size = 128
    block_on_close = False  # stop() must not wait for keep-alive connections to go idle
    fake: _HttpFake
    connections: set
    conn_lock: threading.Lock


class _HttpFake(_Fake):
    """What the HTTP fakes share: the threaded server, the received log, injected answers and
    the ``/_received``, ``/_reset``, ``/_fail_next`` control endpoints."""

    jsonl_name = "received.jsonl"

    def __init__(self, host: str, port: int, store_dir, slow_seconds: float) -> None:
        super().__init__(host, port, store_dir, slow_seconds)
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # lifecycle ------------------------------------------------------------
    def start(self):
        if self._server is not None:
            return self
        server = _HttpServer((self.host, self._port), _HttpHandler)
        server.fake = self
        server.connections = set()
        server.conn_lock = threading.Lock()
        self._port = server.server_address[1]  # kept: a restart binds the same port again
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"{self.name}-http", daemon=True
        )
        self._server = server
        self._thread.start()
        log.info("%s listening on %s", self.name, self.url)
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (a client then sees the provider gone)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes the slow answers
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

    @property
    def url(self) -> str:
        """Base URL, no trailing slash: ``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.port}"

    def fail_next(
        self, n: int = 1, status: int | str = 503, retry_after: float | None = None, code: Any = None
    ) -> None:
        """The next ``n`` sends (authenticated, well-formed) get HTTP ``status`` in the provider's
        error shape, whatever the recipient, with ``Retry-After`` when given; ``code`` overrides
        the provider's error code (Twilio: an int, FCM: an ``errorCode``). ``status="drop"``:
        record the message and close the connection without a response."""
        if status != _DROP and not (isinstance(status, int) and 400 <= status <= 599):
            raise ValueError("status must be a 4xx/5xx HTTP status or 'drop'")
        self._injected.push(n, (status, retry_after, code))

    # internals -----------------------------------------------------------
    def _record(self, item: dict) -> None:
        jsonl = self.store_dir / self.jsonl_name if self.store_dir is not None else None
        self._log.add(item, jsonl)

    def _sleep_slow(self) -> None:
        self._stopping.wait(self.slow_seconds)

    def _take_injected(self) -> tuple[int | str, float | None, Any] | None:
        return self._injected.take()

    def _dispatch(self, request: _Request) -> _Reply | None:
        if request.path == "/_received" and request.method == "GET":
            return _Reply(200, self._log.snapshot())
        if request.path == "/_reset" and request.method == "POST":
            self.reset()
            return _Reply(204)
        if request.path == "/_fail_next" and request.method == "POST":
            try:
                spec = request.json() if request.body else {}
                self.fail_next(
                    int(spec.get("n", 1)), spec.get("status", 503), spec.get("retry_after"), spec.get("code")
                )
            except (ValueError, TypeError, AttributeError) as error:
                return _Reply(400, {"error": str(error)})
            return _Reply(204)
        return self._route(request)

    def _route(self, request: _Request) -> _Reply | None:  # pragma: no cover - subclasses
        raise NotImplementedError


def _retry_headers(retry_after: float | None) -> dict[str, str]:
    if retry_after is None:
        return {}
    return {"Retry-After": str(int(retry_after) if float(retry_after).is_integer() else retry_after)}


# --------------------------------------------------------------------------- Twilio

_E164 = re.compile(r"\+[1-9]\d{1,14}")
_SENDER = re.compile(r"\+[1-9]\d{1,14}|\d{3,8}|[A-Za-z0-9 ]*[A-Za-z][A-Za-z0-9 ]*")
_MESSAGES = re.compile(r"/2010-04-01/Accounts/([^/]+)/Messages\.json")
_TWILIO_ERRORS = {  # HTTP status -> (Twilio error code, message) for injected answers
    400: (21211, "Invalid 'To' Phone Number"),
    401: (20003, "Authenticate"),
    403: (20003, "Permission Denied"),
    404: (20404, "The requested resource was not found"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    502: (20500, "Bad Gateway"),
    503: (20503, "Service Unavailable"),
}


def _twilio_error(status: int, code: int, message: str, retry_after: float | None = None) -> _Reply:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    headers = _retry_headers(retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
    return _Reply(status, body, headers)


class FakeTwilio(_HttpFake):
    """Twilio's Messages API: ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP
    basic auth (account SID, auth token) and form fields ``To``, ``From`` or
    ``MessagingServiceSid``, ``Body``; ``201`` with Twilio's Message resource, or Twilio's error
    JSON. ``auth_token``: 32 hex generated per instance unless given. ``store_dir``: each
    accepted message is appended to ``store_dir/sms.jsonl``."""

    name = "fake twilio"
    jsonl_name = "sms.jsonl"
    #: ``To`` numbers with a fixed behaviour (see the module docstring).
    INVALID, UNSUBSCRIBED, RATE_LIMITED, UNAVAILABLE, SLOW, DROP = (f"+1555010000{i}" for i in range(1, 7))

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str | None = None,
        store_dir: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        slow_seconds: float = 5.0,
    ) -> None:
        super().__init__(host, port, store_dir, slow_seconds)
        self.account_sid = account_sid
        self.auth_token = auth_token or secrets.token_hex(16)

    @property
    def messages_url(self) -> str:
        return f"{self.url}/2010-04-01/Accounts/{self.account_sid}/Messages.json"

    def _authorized(self, request: _Request) -> bool:
        header = request.headers.get("Authorization") or ""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user, self.account_sid) and hmac.compare_digest(password, self.auth_token)

    def _route(self, request: _Request) -> _Reply | None:
        match = _MESSAGES.fullmatch(request.path)
        if not match:
            return _twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        if not self._authorized(request):
            return _twilio_error(401, 20003, "Authenticate")
        if match.group(1) != self.account_sid:
            return _twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        if request.method != "POST":
            return _twilio_error(405, 20004, "Method not allowed")
        form = request.form()
        to, sender, service = form.get("To", ""), form.get("From", ""), form.get("MessagingServiceSid", "")
        body = form.get("Body", "")
        if not to:
            return _twilio_error(400, 21604, "A 'To' phone number is required.")
        if not sender and not service:
            return _twilio_error(400, 21603, "A 'From' phone number is required.")
        if not body and not form.get("MediaUrl"):
            return _twilio_error(400, 21602, "Message body is required.")
        if len(body) > 1600:
            return _twilio_error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if not _E164.fullmatch(to):
            return _twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if sender and not _SENDER.fullmatch(sender):
            return _twilio_error(
                400,
                21212,
                f"The 'From' number {sender} is not a valid phone number, shortcode, "
                "or alphanumeric sender ID.",
            )
        injected = self._take_injected()
        if injected is not None and injected[0] != _DROP:
            status, retry_after, code = injected
            default_code, message = _TWILIO_ERRORS.get(status, (20500, "Internal Server Error"))
            return _twilio_error(status, code or default_code, message, retry_after)
        if to == self.INVALID:
            return _twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if to == self.UNSUBSCRIBED:
            return _twilio_error(400, 21610, "Attempt to send to unsubscribed recipient")
        if to == self.RATE_LIMITED:
            return _twilio_error(429, 20429, "Too Many Requests", retry_after=2)
        if to == self.UNAVAILABLE:
            return _twilio_error(503, 20503, "Service Unavailable")
        resource = self._message_resource(to, sender, service, body)
        self._record(resource)
        log.info("fake twilio: accepted %s to %s", resource["sid"], _mask(to))
        if injected is not None or to == self.DROP:
            return None
        if to == self.SLOW:
            self._sleep_slow()
        return _Reply(201, resource, {"Twilio-Request-Id": "RQ" + secrets.token_hex(16)})

    def _message_resource(self, to: str, sender: str, service: str, body: str) -> dict:
        sid = "SM" + secrets.token_hex(16)
        now = format_datetime(datetime.now(UTC))
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}"
        return {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender or None,
            "messaging_service_sid": service or None,
            "num_media": "0",
            "num_segments": str(max(1, -(-len(body) // 160))),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued" if sender else "accepted",
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": to,
            "uri": f"{uri}.json",
        }


# --------------------------------------------------------------------------- FCM

_SEND = re.compile(r"/v1/projects/([^/]+)/messages:send")
_MESSAGE_FIELDS = {
    "name", "data", "notification", "android", "webpush", "apns",
    "fcm_options", "fcmOptions", "token", "topic", "condition",
}
_NOTIFICATION_FIELDS = {"title", "body", "image"}
_FCM_ERRORS = {  # HTTP status -> (google.rpc status, FcmError errorCode or None, message)
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", None, "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    404: ("NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded for quota metric 'Send requests'."),
    500: ("INTERNAL", "INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}
_TOKEN_BEHAVIOURS = {
    "unregistered-": 404,
    "invalid-": 400,
    "quota-": 429,
    "unavailable-": 503,
}


def _google_error(
    status: int,
    message: str | None = None,
    *,
    error_code: str | None = None,
    rpc_status: str | None = None,
    retry_after: float | None = None,
    field_violation: tuple[str, str] | None = None,
) -> _Reply:
    """Google's error shape, with the FcmError detail when there is an ``errorCode``."""
    default_status, default_code, default_message = _FCM_ERRORS.get(
        status, ("UNKNOWN", None, "Unknown error.")
    )
    code = error_code if error_code is not None else default_code
    error: dict[str, Any] = {
        "code": status,
        "message": message or default_message,
        "status": rpc_status or default_status,
    }
    details = []
    if code:
        details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code})
    if field_violation:
        details.append({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": field_violation[0], "description": field_violation[1]}],
        })
    if details:
        error["details"] = details
    headers = _retry_headers(retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="https://accounts.google.com/"'
    return _Reply(status, {"error": error}, headers)


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _new_private_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class FakeFcm(_HttpFake):
    """FCM HTTP v1 and its OAuth token endpoint on one server.

    ``POST /token``: the JWT-bearer grant of a service account (``service_account_info()``);
    the assertion's RS256 signature is verified against this fake's key, its ``aud`` must be
    this ``token_uri`` (or ``GOOGLE_TOKEN_AUDIENCE``, which google-auth always sends) and its
    ``scope`` must hold ``FCM_SCOPE``; answers an access token.
    ``POST /v1/projects/{project}/messages:send`` with ``Authorization: Bearer <that token>``
    and ``{"message": {...}, "validate_only": bool}``: ``200 {"name": ...}`` or Google's error
    JSON. ``validate_only`` sends are checked and answered but not recorded (nothing is
    delivered). ``private_key_pem`` / ``private_key_id``: the service account's key (generated
    per instance unless given, so a runner can keep it across restarts). ``store_dir``: each
    accepted message is appended to ``store_dir/push.jsonl``."""

    name = "fake fcm"
    jsonl_name = "push.jsonl"

    def __init__(
        self,
        project_id: str = "almanac-demo",
        store_dir: str | os.PathLike | None = None,
        *,
        private_key_pem: str | None = None,
        private_key_id: str | None = None,
        client_email: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        slow_seconds: float = 5.0,
        token_lifetime_s: int = 3600,
    ) -> None:
        from cryptography.hazmat.primitives import serialization

        super().__init__(host, port, store_dir, slow_seconds)
        self.project_id = project_id
        self.private_key_pem = private_key_pem or _new_private_key_pem()
        self.private_key_id = private_key_id or secrets.token_hex(20)
        self.client_email = client_email or f"almanac-notify@{project_id}.iam.gserviceaccount.com"
        self.token_lifetime_s = token_lifetime_s
        key = serialization.load_pem_private_key(self.private_key_pem.encode(), password=None)
        self._public_key = key.public_key()
        self._tokens: dict[str, float] = {}  # access token -> expiry (monotonic)
        self._tokens_lock = threading.Lock()
        self.tokens_issued = 0

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def send_url(self) -> str:
        return f"{self.url}/v1/projects/{self.project_id}/messages:send"

    def service_account_info(self) -> dict[str, str]:
        """A service-account JSON key for this fake (``token_uri`` points here): usable with
        ``google.oauth2.service_account.Credentials.from_service_account_info``. The fake must
        be started (the URI holds its port)."""
        client_id = str(int(hashlib.sha256(self.client_email.encode()).hexdigest()[:16], 16)).zfill(21)[:21]
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": (
                "https://www.googleapis.com/robot/v1/metadata/x509/" + self.client_email.replace("@", "%40")
            ),
            "universe_domain": "googleapis.com",
        }

    def expire_tokens(self) -> None:
        """Make every access token issued so far invalid (a client must fetch a new one)."""
        with self._tokens_lock:
            self._tokens.clear()

    def _route(self, request: _Request) -> _Reply | None:
        if request.path == "/token":
            if request.method != "POST":
                return _Reply(405, {"error": "invalid_request", "error_description": "POST only"})
            return self._token(request)
        match = _SEND.fullmatch(request.path)
        if not match:
            return _google_error(404, f"The requested URL {request.path} was not found on this server.",
                                 error_code="", rpc_status="NOT_FOUND")
        if request.method != "POST":
            return _google_error(405, "Method not allowed.", error_code="", rpc_status="UNIMPLEMENTED")
        return self._send(request, match.group(1))

    # OAuth ---------------------------------------------------------------
    def _token(self, request: _Request) -> _Reply:
        form = request.form()
        if form.get("grant_type") != _JWT_BEARER:
            return _Reply(400, {"error": "unsupported_grant_type",
                                "error_description": f"Invalid grant_type: {form.get('grant_type', '')}"})
        problem = self._check_assertion(form.get("assertion", ""))
        if problem is not None:
            error, description = problem
            return _Reply(400, {"error": error, "error_description": description})
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._tokens_lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime_s
            self.tokens_issued += 1
        return _Reply(
            200,
            {"access_token": token, "expires_in": self.token_lifetime_s, "token_type": "Bearer"},
            {"Cache-Control": "no-cache, no-store, max-age=0, must-revalidate", "Pragma": "no-cache"},
        )

    def _check_assertion(self, assertion: str) -> tuple[str, str] | None:
        """None when the JWT is this service account's, for this token URI and the FCM scope."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        parts = assertion.split(".")
        if len(parts) != 3:
            return "invalid_grant", "Invalid JWT: not a compact JWS."
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error):
            return "invalid_grant", "Invalid JWT: malformed."
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return "invalid_grant", "Invalid JWT: malformed."
        if header.get("alg") != "RS256":
            return "invalid_grant", "Invalid JWT Signature."
        if header.get("kid") not in (None, self.private_key_id):
            return "invalid_grant", "Invalid JWT Signature."
        try:
            self._public_key.verify(
                signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return "invalid_grant", "Invalid JWT Signature."
        if claims.get("iss") != self.client_email:
            return "invalid_grant", "Invalid JWT: the issuer is not this service account."
        if claims.get("aud") not in (self.token_uri, GOOGLE_TOKEN_AUDIENCE):
            return "invalid_grant", "Invalid JWT: Failed audience check."
        now = time.time()
        try:
            iat, exp = float(claims["iat"]), float(claims["exp"])
        except (KeyError, TypeError, ValueError):
            return "invalid_grant", "Invalid JWT: iat and exp are required."
        if not (iat - 300 <= now <= exp + 300) or exp - iat > 3600:
            return "invalid_grant", (
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                "timeframe. Check your iat and exp values in the JWT claim."
            )
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return "invalid_scope", "Invalid OAuth scope or ID token audience provided."
        return None

    def _token_valid(self, request: _Request) -> bool | None:
        """True: a live issued token; False: a wrong or expired one; None: no bearer token."""
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        with self._tokens_lock:
            expiry = self._tokens.get(token.strip())
        return expiry is not None and expiry > time.monotonic()

    # messages:send -------------------------------------------------------
    def _send(self, request: _Request, project: str) -> _Reply | None:
        valid = self._token_valid(request)
        if valid is None:
            return _google_error(
                401,
                "Request is missing required authentication credential. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential. See "
                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
            )
        if not valid:
            return _google_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
                "cookie or other valid authentication credential. See "
                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
            )
        if project != self.project_id:
            return _google_error(
                403,
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist).",
                error_code="",
            )
        try:
            payload = request.json()
        except (ValueError, UnicodeDecodeError):
            return _google_error(400, "Invalid JSON payload received. Unexpected token.")
        problem = _check_message(payload)
        if problem is not None:
            field, description = problem
            return _google_error(400, description, field_violation=(field, description) if field else None)
        message, validate_only = payload["message"], bool(payload.get("validate_only", False))
        token = message.get("token") or ""
        if validate_only:
            return _Reply(200, {"name": f"projects/{self.project_id}/messages/fake_message_id"})
        injected = self._take_injected()
        if injected is not None and injected[0] != _DROP:
            status, retry_after, code = injected
            return _google_error(status, error_code=code, retry_after=retry_after)
        for prefix, status in _TOKEN_BEHAVIOURS.items():
            if token.startswith(prefix):
                if status == 400:
                    return _google_error(
                        400,
                        "The registration token is not a valid FCM registration token",
                        field_violation=("message.token", "Invalid registration token"),
                    )
                return _google_error(status, retry_after=2 if status == 429 else None)
        name = f"projects/{self.project_id}/messages/0:{int(time.time() * 1000)}%{secrets.token_hex(8)}"
        self._record({"name": name, "message": message, "received_at": _now_iso()})
        log.info("fake fcm: accepted %s for %s", name.rpartition("/")[2], _mask(token or "topic"))
        if injected is not None or token.startswith("drop-"):
            return None
        if token.startswith("slow-"):
            self._sleep_slow()
        return _Reply(200, {"name": name})


def _check_message(payload: Any) -> tuple[str, str] | None:
    """FCM's validation of a send request body: (field, description) of the first problem."""
    if not isinstance(payload, dict):
        return "", "Invalid JSON payload received. Expected an object."
    for key in payload:
        if key not in ("message", "validate_only", "validateOnly"):
            return "", f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
    message = payload.get("message")
    if not isinstance(message, dict):
        return "message", "Request contains an invalid argument."
    for key in message:
        if key not in _MESSAGE_FIELDS:
            return "", (
                f"Invalid JSON payload received. Unknown name \"{key}\" at 'message': Cannot find field."
            )
    targets = [key for key in ("token", "topic", "condition") if key in message]
    if not targets:
        return "message", "Recipient of the message is not set."
    if len(targets) > 1:
        return "message", (
            f"Invalid value at 'message' (oneof), oneof field 'target' is already set. "
            f"Cannot overwrite with '{targets[1]}'"
        )
    if not isinstance(message[targets[0]], str) or not message[targets[0]]:
        return f"message.{targets[0]}", f"Invalid value at 'message.{targets[0]}' (TYPE_STRING)"
    data = message.get("data", {})
    if not isinstance(data, dict):
        return "message.data", "Invalid value at 'message.data' (map)"
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            return f"message.data[{index}].value", (
                f"Invalid value at 'message.data[{index}].value' (TYPE_STRING), {json.dumps(value)}"
            )
        if key in ("from", "notification", "message_type") or key.startswith(("google", "gcm")):
            return "message.data", f"Invalid data payload key: {key}"
    notification = message.get("notification", {})
    if not isinstance(notification, dict):
        return "message.notification", "Invalid value at 'message.notification'"
    for key, value in notification.items():
        if key not in _NOTIFICATION_FIELDS:
            return "", (
                f"Invalid JSON payload received. Unknown name \"{key}\" at 'message.notification': "
                "Cannot find field."
            )
        if not isinstance(value, str):
            field = f"message.notification.{key}"
            return field, f"Invalid value at '{field}' (TYPE_STRING)"
    for key in ("android", "apns", "webpush", "fcm_options", "fcmOptions"):
        if key in message and not isinstance(message[key], dict):
            return f"message.{key}", f"Invalid value at 'message.{key}'"
    return None


# --------------------------------------------------------------------------- runner


def load_or_create_service_account(path: Path, fake_url: str, project_id: str) -> dict[str, str]:
    """The service-account key kept at ``path`` (mode 0600): its key pair is reused when the
    file exists, and the file is (re)written so its ``token_uri`` points at ``fake_url``."""
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        info = {}
    fake = FakeFcm(
        info.get("project_id", project_id),
        private_key_pem=info.get("private_key"),
        private_key_id=info.get("private_key_id"),
        client_email=info.get("client_email"),
    )
    split = urlsplit(fake_url)
    fake.host, fake._port = split.hostname, split.port
    fresh = fake.service_account_info()
    if fresh != info:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, (json.dumps(fresh, indent=2) + "\n").encode(), mode=0o600)
    return fresh


def _serve(args: argparse.Namespace) -> int:
    folder: Path = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    token = os.environ.get("ALMANAC_FAKES_SMS_AUTH_TOKEN")
    credentials = folder / "sms-account.json"
    if not token:  # none given: the one kept from an earlier start, else a new one
        try:
            token = json.loads(credentials.read_text()).get("auth_token")
        except (FileNotFoundError, ValueError):
            token = None
        token = token or secrets.token_hex(16)
    account = {"account_sid": args.sms_account_sid, "auth_token": token}
    if not credentials.exists() or json.loads(credentials.read_text() or "{}") != account:
        _write_atomic(credentials, (json.dumps(account, indent=2) + "\n").encode(), mode=0o600)
    key_file = folder / "fcm-service-account.json"
    info = load_or_create_service_account(key_file, f"http://{args.host}:{args.fcm_port}", args.fcm_project)
    smtp = FakeSmtpServer(args.host, args.smtp_port, folder / "email", slow_seconds=args.slow_seconds)
    sms = FakeTwilio(args.sms_account_sid, token, folder, host=args.host, port=args.sms_port,
                     slow_seconds=args.slow_seconds)
    fcm = FakeFcm(info["project_id"], folder, private_key_pem=info["private_key"],
                  private_key_id=info["private_key_id"], client_email=info["client_email"],
                  host=args.host, port=args.fcm_port, slow_seconds=args.slow_seconds)
    stop = StopSignals()  # before starting: a signal meanwhile still stops them cleanly
    started = []
    try:
        for fake in (smtp, sms, fcm):
            fake.start()
            started.append(fake)
        log.info(
            "serving: smtp %s:%s, sms %s (account %s), fcm %s (project %s); writing to %s",
            args.host, smtp.port, sms.url, args.sms_account_sid, fcm.url, fcm.project_id, folder,
        )
        stop.wait()
    finally:
        for fake in reversed(started):
            fake.stop()
        log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m almanac.notify.fakes", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the three fakes until SIGTERM",
        description=(
            "Serve the fake SMTP server, Twilio API and FCM API until SIGTERM, writing what they accept "
            "to DIR/email/*.eml, DIR/sms.jsonl and DIR/push.jsonl. The Twilio auth token comes from "
            "$ALMANAC_FAKES_SMS_AUTH_TOKEN (else the one in DIR/sms-account.json, else a new one); the "
            "FCM service-account key is kept in DIR/fcm-service-account.json (0600)."
        ),
    )
    serve.add_argument("--dir", type=Path, required=True, help="folder for what was sent and the keys")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--smtp-port", type=int, required=True)
    serve.add_argument("--sms-port", type=int, required=True)
    serve.add_argument("--fcm-port", type=int, required=True)
    serve.add_argument("--sms-account-sid", default=DEFAULT_ACCOUNT_SID)
    serve.add_argument("--fcm-project", default="almanac-demo")
    serve.add_argument("--slow-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiosmtpd's own log: every address at INFO, and a deprecation warning of its own per AUTH.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    if 0 in (args.smtp_port, args.sms_port, args.fcm_port):
        parser.error("the runner needs fixed ports (its connections and key file name them)")
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())

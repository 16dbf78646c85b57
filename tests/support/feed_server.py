"""A local HTTP feed server (stdlib ``ThreadingHTTPServer`` on 127.0.0.1) for ICS feed tests.

Routes are a dict of path -> ``Route`` (or a callable taking the request handler), editable
while the server runs::

    with FeedServer({"/cal.ics": Route(body=ics, etag='"v1"')}) as server:
        fetch_feed(server.url("/cal.ics"), allow_hosts=server.allow_hosts)
        assert server.requests[0].headers["If-None-Match"] is None

A ``Route`` serves its body (optionally gzip-encoded, repeated, trickled slowly, without a
Content-Length), answers 304 to a matching ``If-None-Match`` / ``If-Modified-Since``, and covers
redirects and error statuses through ``status`` and ``headers``. Unknown paths give 404.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FeedServer", "RecordedRequest", "Route", "gzip_bomb", "redirect"]

ICS_TYPE = "text/calendar; charset=utf-8"


@dataclass
class Route:
    """How one path answers."""

    body: bytes = b""
    status: int = 200
    content_type: str | None = ICS_TYPE
    #: Extra response headers (Location, Retry-After, ...).
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None
    last_modified: str | None = None
    #: Compress ``body`` (repeated) with gzip and send ``Content-Encoding: gzip``.
    gzip: bool = False
    #: Send ``body`` this many times (a huge body without holding it in memory).
    repeat: int = 1
    #: Already gzip-compressed bytes sent as is with ``Content-Encoding: gzip`` (see gzip_bomb).
    raw_gzip: bytes | None = None
    #: Write the body in chunks of this size, sleeping ``chunk_delay`` seconds between them.
    chunk_size: int = 64 * 1024
    chunk_delay: float = 0.0
    #: Seconds to sleep before sending the status line (to trip read timeouts).
    delay: float = 0.0
    #: Send Content-Length (else the body is delimited by closing the connection).
    content_length: bool = True


def redirect(location: str, status: int = 302) -> Route:
    return Route(status=status, headers={"Location": location}, content_type=None)


def gzip_bomb(decompressed_size: int, prefix: bytes = b"BEGIN:VCALENDAR\r\n") -> bytes:
    """A small gzip stream that expands to ``decompressed_size`` bytes starting with ``prefix``."""
    compressor_input = prefix + b"\0" * (decompressed_size - len(prefix))
    return gzip.compress(compressor_input, compresslevel=9)


#: A route: a Route, or a callable that answers through the request handler itself.
RouteSpec = Route | Callable[[BaseHTTPRequestHandler], None]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    #: The client's source port: one per TCP connection (keep-alive reuses it).
    client_port: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FeedServer._Server

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        owner.requests.append(
            RecordedRequest("GET", self.path, dict(self.headers.items()), client_port=self.client_address[1])
        )
        route = owner.routes.get(self.path.split("?", 1)[0])
        try:
            if route is None:
                self._send_simple(404, b"not found")
            elif callable(route):
                route(self)
            else:
                self._serve(route)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client stopped reading (limits): expected

    def _send_simple(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _not_modified(self, route: Route) -> bool:
        inm = self.headers.get("If-None-Match")
        if inm is not None:
            tags = {t.strip() for t in inm.split(",")}
            return route.etag is not None and ("*" in tags or route.etag in tags)
        ims = self.headers.get("If-Modified-Since")
        return ims is not None and route.last_modified is not None and ims == route.last_modified

    def _serve(self, route: Route) -> None:
        if route.delay:
            time.sleep(route.delay)
        validators = {"ETag": route.etag, "Last-Modified": route.last_modified}
        if route.status == 200 and self._not_modified(route):
            self.send_response(304)
            for name, value in validators.items():
                if value is not None:
                    self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.raw_gzip is not None:
            parts, length, encoding = [route.raw_gzip], len(route.raw_gzip), "gzip"
        elif route.gzip:
            data = gzip.compress(route.body * route.repeat)
            parts, length, encoding = [data], len(data), "gzip"
        else:
            parts, length, encoding = _Repeat(route.body, route.repeat), len(route.body) * route.repeat, None
        self.send_response(route.status)
        if route.content_type:
            self.send_header("Content-Type", route.content_type)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        for name, value in {**validators, **route.headers}.items():
            if value is not None:
                self.send_header(name, value)
        if route.content_length:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        first = True
        for part in parts:
            for start in range(0, len(part), route.chunk_size):
                if route.chunk_delay and not first:
                    time.sleep(route.chunk_delay)
                first = False
                self.wfile.write(part[start : start + route.chunk_size])
                self.wfile.flush()


class _Repeat:
    """``body`` ``times`` times, as an iterable of parts."""

    def __init__(self, body: bytes, times: int) -> None:
        self.body, self.times = body, times

    def __iter__(self):
        for _ in range(self.times):
            yield self.body


class FeedServer:
    """Context manager running the server on 127.0.0.1 and a free port."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: FeedServer

    def __init__(self, routes: dict[str, RouteSpec] | None = None) -> None:
        self.routes: dict[str, RouteSpec] = dict(routes or {})
        self.requests: list[RecordedRequest] = []
        self._server: FeedServer._Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FeedServer:
        self._server = self._Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="feed-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._server is not None, "use FeedServer as a context manager"
        return self._server.server_address[1]

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def allow_hosts(self) -> frozenset[str]:
        """The allow-list entry that lets the address guard through to this server."""
        return frozenset({self.host_port})

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://{self.host_port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path.split("?", 1)[0] == path)

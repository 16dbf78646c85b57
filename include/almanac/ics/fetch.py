"""ics_sync: fetch one calendar's ICS feed over HTTP(S), guarded against SSRF, bombs and stalls.

``fetch_with_settings`` is the one fetch path (the DAG's sync and the ``almanac`` CLI): the guarded
``fetch_feed`` under the shared retry policy, every limit taken from ``Settings``.
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import ipaddress
import logging
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, unquote, urljoin, urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.ssl_match_hostname import CertificateError as _HostnameCertificateError

from almanac.errors import PermanentError, RetryableError
from almanac.retry import RetryPolicy, parse_retry_after, retry_call

if TYPE_CHECKING:
    from almanac.settings import Settings

__all__ = [
    "FeedHttpError",
    "FeedNotICalendarError",
    "FeedRefusedError",
    "FeedTimeoutError",
    "FeedTlsError",
    "FeedTooLargeError",
    "FeedTooManyRedirectsError",
    "FeedUnavailableError",
    "FetchResult",
    "check_address",
    "fetch_feed",
    "fetch_policy",
    "fetch_with_settings",
    "new_session",
    "normalise_feed_url",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Cloud instance-metadata endpoints (AWS/GCP/Azure/OpenStack IPv4, AWS IPv6).
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
#: Networks refused although Python's ``ipaddress`` may call (parts of) them global.
EXTRA_REFUSED_NETWORKS = (
    ("deprecated site-local", ipaddress.ip_network("fec0::/10")),  # RFC 3879
    ("IETF protocol assignments", ipaddress.ip_network("192.0.0.0/24")),  # RFC 6890, incl. .9 and .10
)
_CHUNK_SIZE = 16 * 1024  # bytes decoded per read: bounds what a gzip bomb can expand to at once
_USER_AGENT = "Almanac-ICS-Sync/1 (+calendar feed sync)"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- errors -----------------------------------------------------------------------------------
# Every error takes its message first and its fields as keywords with defaults, so that it
# pickles (BaseException re-creates it from ``args`` and restores the fields from ``__dict__``).


class FeedRefusedError(PermanentError):
    """The feed URL was refused before any connection: bad scheme, or the host resolves to a
    loopback/private/link-local/metadata/... address (server-side request forgery guard).

    ``redirected_from`` names the hop (host and path, no query) whose redirect led here, or is
    empty when the calendar's own URL was refused.

    What to do: ask the calendar's owner for a public http(s)/webcal feed URL. For a dev or test
    feed server, add its ``host`` or ``host:port`` to the allow-list (setting ``ics_allow_hosts``).
    A refusal after a redirect means the feed's server sent us to an internal address: store the
    feed's final public address, or report the redirecting server.
    """

    def __init__(
        self, message: str = "", *, host: str = "", reason: str = "", redirected_from: str = ""
    ) -> None:
        super().__init__(message)
        self.host = host
        self.reason = reason
        self.redirected_from = redirected_from


class FeedTlsError(PermanentError):
    """The TLS handshake with the feed server failed for a reason a retry will not fix: the
    certificate does not verify (expired, self-signed, unknown issuer), is for another host name,
    or client and server share no TLS version or cipher (``reason`` says which). ``webcal`` is True
    when the URL was ``webcal://``, which is read as ``https://``.

    What to do: for a ``webcal://`` URL whose server only speaks plain HTTP ("wrong version
    number"), store the feed as ``http://``. Otherwise the server's TLS setup is broken or the URL
    names the wrong host: ask the calendar's owner to fix it or for another feed URL. A connection
    reset during the handshake is not this error; it is ``FeedUnavailableError`` and retried.
    """

    def __init__(self, message: str = "", *, host: str = "", reason: str = "", webcal: bool = False) -> None:
        super().__init__(message)
        self.host = host
        self.reason = reason
        self.webcal = webcal


class FeedTooManyRedirectsError(PermanentError):
    """The feed redirected more than ``max_redirects`` times (or in a loop).

    What to do: open the feed URL by hand and store its final address as the calendar's URL.
    """

    def __init__(self, message: str = "", *, host: str = "", max_redirects: int = 0) -> None:
        super().__init__(message)
        self.host = host
        self.max_redirects = max_redirects


class FeedHttpError(PermanentError):
    """The feed server answered with a client error (4xx other than 429) or an unusable reply.

    What to do: 401/403/404/410 mean the URL is wrong, private or gone; ask the calendar's owner
    for a current feed URL. Retrying the same URL fails the same way.
    """

    def __init__(self, message: str = "", *, host: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.status = status


class FeedNotICalendarError(PermanentError):
    """The body is not iCalendar (does not start with ``BEGIN:VCALENDAR``), e.g. an HTML login
    page, or it could not be decompressed.

    What to do: the URL most likely points at a web page, not the calendar's export/subscription
    link, or the feed now needs a login; ask the calendar's owner for the ICS link.
    """

    def __init__(
        self, message: str = "", *, host: str = "", status: int | None = None, content_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.host = host
        self.status = status
        self.content_type = content_type


class FeedTooLargeError(PermanentError):
    """The feed body is larger than ``max_bytes`` once decompressed (huge feed or gzip bomb).

    What to do: ask the owner to publish a smaller feed (fewer past events), or raise the limit
    (setting ``ics_max_bytes``) if the feed is legitimate.
    """

    def __init__(self, message: str = "", *, host: str = "", max_bytes: int = 0) -> None:
        super().__init__(message)
        self.host = host
        self.max_bytes = max_bytes


class FeedTimeoutError(RetryableError):
    """Connecting to or reading the feed took too long (connect/read timeout or total deadline).

    What to do: nothing; it is retried. If one host keeps timing out, it is slow or down; the
    limits are settings ``ics_connect_timeout_s``, ``ics_read_timeout_s``, ``ics_fetch_deadline_s``.
    """

    def __init__(self, message: str = "", *, host: str = "", seconds: float | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.seconds = seconds


class FeedUnavailableError(RetryableError):
    """The feed server is unavailable: HTTP 429 or 5xx (``status``), or no connection could be
    made (``status`` None: DNS failure, refused, reset, closed during the TLS handshake; other TLS
    failures are ``FeedTlsError``).

    What to do: nothing; it is retried, after ``retry_after`` seconds when the server said so.
    If it persists, the feed's host is down or blocking us.
    """

    def __init__(
        self,
        message: str = "",
        *,
        host: str = "",
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.host = host
        self.status = status
        self.retry_after = retry_after


# --- result -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    """What one fetch returned.

    ``url`` is the final URL after redirects; ``body`` is the decompressed body (None when
    ``not_modified``); ``etag`` / ``last_modified`` are the validators to send next time.
    """

    url: str
    status: int
    body: bytes | None
    etag: str | None
    last_modified: str | None
    not_modified: bool
    body_sha256: str | None


# --- URL and address checks -------------------------------------------------------------------


def normalise_feed_url(url: str) -> str:
    """``webcal://``/``webcals://`` read as ``https://``; only http and https are accepted.

    Raises:
        FeedRefusedError: another scheme, or no host.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme in ("webcal", "webcals"):
        scheme = "https"
    host = parts.hostname or ""
    if scheme not in ("http", "https"):
        reason = f"scheme {parts.scheme or '(none)'!r} is not http, https or webcal"
        raise FeedRefusedError(f"feed URL refused: {reason}", host=host, reason=reason)
    if not host:
        raise FeedRefusedError("feed URL refused: it has no host", host="", reason="no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise FeedRefusedError(f"feed URL refused: bad port ({exc})", host=host, reason="bad port") from exc
    return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))


def _is_webcal(url: str) -> bool:
    return urlsplit(url.strip()).scheme.lower() in ("webcal", "webcals")


def _refusal_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be fetched from, or None if it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            inner = _refusal_reason(embedded)
            if inner:
                return f"{inner} (embedded in {ip})"
    if ip in METADATA_ADDRESSES:
        return "cloud metadata address"
    for reason, network in EXTRA_REFUSED_NETWORKS:
        if ip.version == network.version and ip in network:
            return f"{reason} address"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    for reason, hit in checks:
        if hit:
            return f"{reason} address"
    return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to, in resolver order (indirection for tests). A host
    that is an address in its canonical spelling is that address (no resolver call); any
    other spelling (``127.1``, ``0x7f.1``, a zone id) goes to the resolver as before."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if str(literal) == host:
            return [literal]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[IPAddress, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        seen[ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])] = None  # drop IPv6 zone id
    return list(seen)


def check_address(url: str, *, allow_hosts: frozenset[str] = frozenset()) -> IPAddress:
    """Resolve ``url``'s host and return the address to connect to (the first resolved one).

    Every resolved address must be public unless the host (``host`` or ``host:port``) is in
    ``allow_hosts``.

    Raises:
        FeedRefusedError: an address is not public (nothing has been sent to it).
        FeedUnavailableError: the host does not resolve.
    """
    return _check_parts(urlsplit(url), allow_hosts)


def _check_parts(parts: SplitResult, allow_hosts: frozenset[str]) -> IPAddress:
    """``check_address`` of an already split URL (a fetch splits each hop's URL once)."""
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise FeedUnavailableError(f"feed host {host} does not resolve: {exc}", host=host) from exc
    if not addresses:
        raise FeedUnavailableError(f"feed host {host} does not resolve", host=host)
    allowed = (
        host in allow_hosts
        or f"{host}:{port}" in allow_hosts
        or (parts.port is not None and f"{host}:{parts.port}" in allow_hosts)
    )
    if not allowed:
        for ip in addresses:
            reason = _refusal_reason(ip)
            if reason:
                raise FeedRefusedError(
                    f"feed host {host} refused: it resolves to {ip}, a {reason}", host=host, reason=reason
                )
    return addresses[0]


# --- connecting to the checked address ---------------------------------------------------------


class _PinnedAdapter(HTTPAdapter):
    """Sends a request whose URL names an IP literal, with the real name in ``Host``, so the
    connection goes to the address that was checked (no second DNS lookup, so no DNS
    rebinding between check and connect) while TLS still uses the name for SNI and for
    certificate verification."""

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        server_name = getattr(request, "almanac_server_hostname", None)
        if server_name and host_params.get("scheme") == "https":
            pool_kwargs["server_hostname"] = server_name
            pool_kwargs["assert_hostname"] = server_name
        return host_params, pool_kwargs


def _pinned_url(parts: SplitResult, ip: IPAddress) -> str:
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{literal}" if userinfo else literal
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _prepare_session(session: requests.Session) -> None:
    """Mount the pinning adapter (once) and stop ``requests`` reading the environment: proxy
    variables (``HTTPS_PROXY``...) and ``~/.netrc`` never change where, or as whom, a feed is fetched,
    and no cookie is kept."""
    session.trust_env = False
    if getattr(session, "_almanac_prepared", False):  # every fetch of a batch passes here
        return
    # A session is reused across a batch's calendars: a cookie one feed host sets must never be
    # sent with another calendar's request (feeds are fetched anonymously).
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    if not isinstance(session.get_adapter("https://x/"), _PinnedAdapter):
        adapter = _PinnedAdapter()
        session.mount("https://", adapter)
        session.mount("http://", adapter)
    session._almanac_prepared = True


def new_session() -> requests.Session:
    """A ``requests.Session`` for feed fetches: address-pinning adapter, ``trust_env=False``.

    Reuse one per batch (connections are kept alive per checked address); close it after.
    """
    session = requests.Session()
    _prepare_session(session)
    return session


# --- fetching ---------------------------------------------------------------------------------


def _looks_like_icalendar(body: bytes) -> bool:
    head = body[:64].removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:15].upper() == b"BEGIN:VCALENDAR"


def fetch_feed(
    url: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    session: requests.Session | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 20.0,
    deadline: float = 60.0,
    max_bytes: int = 10 * 1024 * 1024,
    max_redirects: int = 5,
    allow_hosts: frozenset[str] = frozenset(),
) -> FetchResult:
    """GET an ICS feed, conditionally, following redirects by hand with every hop re-checked.

    Each hop's host is resolved once, every address checked (see ``check_address``), and the
    connection made to the checked address itself, so a DNS answer that changes between check
    and connect (DNS rebinding) cannot reach an internal address. Proxy variables and ``.netrc``
    in the environment are ignored. Limitations: the DNS lookup itself is not bounded by
    ``deadline``; only the first resolved address is tried. One attempt: ``fetch_with_settings``
    adds the retries.

    Parameters:
        url: the feed URL; ``webcal://`` and ``webcals://`` are read as ``https://``.
        etag, last_modified: validators from the previous fetch, sent as ``If-None-Match`` /
            ``If-Modified-Since``.
        session: ``requests.Session`` to reuse connections (best from ``new_session``); its
            http/https adapters are replaced (once) by the address-pinning adapter and its
            ``trust_env`` set to False. One is made if None.
        connect_timeout, read_timeout: per connection / per socket read, in seconds.
        deadline: total seconds for the whole fetch, redirects and body included.
        max_bytes: largest body accepted, counted after decompression.
        max_redirects: redirect hops followed.
        allow_hosts: ``host`` or ``host:port`` entries let through although they resolve to
            non-public addresses (dev and test feed servers only).

    Returns:
        FetchResult; ``not_modified`` with ``body`` None on HTTP 304.

    Raises:
        FeedRefusedError, FeedTooManyRedirectsError, FeedHttpError, FeedNotICalendarError,
        FeedTooLargeError, FeedTlsError (permanent); FeedTimeoutError, FeedUnavailableError
        (retryable: timeouts, 429/5xx, refused or reset connections, DNS failures).
    """
    own_session = session is None
    session = session or new_session()
    _prepare_session(session)
    started = time.monotonic()
    current = normalise_feed_url(url)
    webcal = _is_webcal(url)  # this hop's URL was webcal:// read as https://
    previous: str | None = None  # the hop whose redirect led to ``current``
    headers = {
        "User-Agent": _USER_AGENT,
        "Accept": "text/calendar, */*;q=0.5",
        "Accept-Encoding": "gzip, deflate",
    }
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        for _hop in range(max_redirects + 1):
            parts = urlsplit(current)
            host = parts.hostname or ""
            try:
                ip = _check_parts(parts, allow_hosts)
            except FeedRefusedError as exc:
                if previous is None:  # the calendar's own URL
                    raise
                raise _after_redirect(exc, previous, host) from exc
            remaining = _remaining(started, deadline, host)
            response = _send(
                session,
                parts,
                ip,
                headers,
                timeout=(min(connect_timeout, remaining), min(read_timeout, remaining)),
                host=host,
                webcal=webcal,
            )
            with response:
                status = response.status
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise FeedHttpError(
                            f"feed host {host} answered {status} without a Location", host=host, status=status
                        )
                    target = urljoin(current, location.strip())
                    try:
                        next_url = normalise_feed_url(target)
                    except FeedRefusedError as exc:
                        raise _after_redirect(exc, current, exc.host) from exc
                    previous, current, webcal = current, next_url, _is_webcal(target)
                    next_host = urlsplit(current).hostname
                    log.info("feed host %s redirects (%s) to host %s", host, status, next_host)
                    continue
                return _finish(response, current, host, etag, last_modified, started, deadline, max_bytes)
        host = urlsplit(current).hostname or ""
        raise FeedTooManyRedirectsError(
            f"feed redirected more than {max_redirects} times (last host {host})",
            host=host,
            max_redirects=max_redirects,
        )
    finally:
        if own_session:
            session.close()


def fetch_policy(settings: Settings) -> RetryPolicy:
    """The retry policy of one feed fetch: ``ics_fetch_attempts`` tries, backoff from 1 s, waits
    (and a server's ``Retry-After``) capped at ``ics_retry_max_wait_s``."""
    return RetryPolicy(
        attempts=settings.ics_fetch_attempts,
        base_wait_s=1.0,
        max_wait_s=float(settings.ics_retry_max_wait_s),
        timeout_s=float(settings.ics_read_timeout_s),
    )


def fetch_with_settings(
    url: str,
    settings: Settings,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    session: requests.Session | None = None,
    allow_hosts: frozenset[str] = frozenset(),
    sleep: Callable[[float], None] = time.sleep,
) -> FetchResult:
    """The one feed fetch path, for the ics_sync DAGs and the ``almanac`` CLI alike.

    ``fetch_feed`` with every limit from ``settings`` (``ics_connect_timeout_s``,
    ``ics_read_timeout_s``, ``ics_fetch_deadline_s`` per attempt, ``ics_max_bytes``,
    ``ics_max_redirects``), retried on retryable errors by the shared policy (``fetch_policy``:
    ``ics_fetch_attempts``, ``ics_retry_max_wait_s``, ``Retry-After`` honoured). Each retry is
    logged as a warning (host and cause, never the URL) before its wait. The limits are read from
    ``settings`` at every attempt, so an object whose ``ics_fetch_deadline_s`` shrinks (a
    per-calendar budget) bounds each later attempt by what is left.

    Parameters:
        allow_hosts: let through besides the hosts of setting ``ics_allow_hosts``.
        session: reused across calls when given (see ``fetch_feed``); else one is made and closed.
        sleep: how to wait between attempts (tests pass a recorder).

    Raises:
        the errors of ``fetch_feed``; a retryable one only after the last attempt.
    """
    policy = fetch_policy(settings)
    allowed = frozenset(allow_hosts) | settings.ics_allow_host_set
    host = urlsplit(url.strip()).hostname or "?"

    def on_retry(attempt: int, exc: RetryableError, wait: float) -> None:
        log.warning(
            "feed host %s: try %d of %d failed (%s); retrying in %gs",
            host,
            attempt,
            policy.attempts,
            " ".join(str(exc).split()),
            wait,
        )

    own_session = session is None
    session = session or new_session()
    try:
        return retry_call(
            lambda: fetch_feed(
                url,
                etag=etag,
                last_modified=last_modified,
                session=session,
                connect_timeout=settings.ics_connect_timeout_s,
                read_timeout=settings.ics_read_timeout_s,
                deadline=settings.ics_fetch_deadline_s,
                max_bytes=settings.ics_max_bytes,
                max_redirects=settings.ics_max_redirects,
                allow_hosts=allowed,
            ),
            policy,
            sleep=sleep,
            on_retry=on_retry,
        )
    finally:
        if own_session:
            session.close()


def _where(url: str) -> str:
    """``host[:port]/path`` of ``url`` for messages: no query or user info, and path segments
    longer than 24 characters (the usual shape of secret tokens in feed URLs) shown as ``…``."""
    parts = urlsplit(url)
    segments = ["…" if len(seg) > 24 else seg for seg in parts.path.split("/")]
    return parts.netloc.rpartition("@")[2] + "/".join(segments)


def _after_redirect(exc: FeedRefusedError, previous: str, host: str) -> FeedRefusedError:
    """``exc`` for a hop reached by a redirect, naming the hop (``previous``) that sent us there."""
    where = _where(previous)
    return FeedRefusedError(
        f"{exc} (redirect from {where} to {host or 'a URL without host'})",
        host=exc.host,
        reason=exc.reason,
        redirected_from=where,
    )


#: ``ssl.SSLError.reason`` values meaning client and server share no TLS version / no cipher.
_TLS_VERSION_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNSUPPORTED_PROTOCOL",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "VERSION_TOO_HIGH",
        "UNKNOWN_PROTOCOL",
        "HTTP_REQUEST",
    }
)
_TLS_CIPHER_REASONS = frozenset(
    {"NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE", "SSLV3_ALERT_HANDSHAKE_FAILURE", "INSUFFICIENT_SECURITY"}
)
#: X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH
_HOSTNAME_MISMATCH_CODES = frozenset({62, 64})


def _causes(exc: BaseException):
    """``exc`` and everything it wraps: causes, contexts, exception args, urllib3's ``reason``."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        stack.extend(item for item in reversed(linked) if isinstance(item, BaseException))


def _tls_failure(exc: BaseException, host: str) -> str | None:
    """The cause, when ``exc`` is a TLS failure a retry will not fix; else None.

    Certificate problems and version/cipher mismatches are permanent; a connection closed or reset
    during the handshake is not (None: the caller treats it as a connection failure, retried).
    """
    chain = list(_causes(exc))
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            if cause.verify_code in _HOSTNAME_MISMATCH_CODES:
                return f"hostname mismatch: the certificate is not for {host}"
            return f"certificate verify failed: {cause.verify_message or cause.reason}"
        if isinstance(cause, _HostnameCertificateError):  # urllib3's own check (pinned assert_hostname)
            return f"hostname mismatch: {cause}"
    for cause in chain:
        if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
            return None
        if isinstance(cause, ssl.SSLError):
            reason = str(cause.reason or "")
            text = reason.lower().replace("_", " ") or str(cause)
            if "UNEXPECTED_EOF" in reason:
                return None
            if reason in _TLS_VERSION_REASONS:
                hint = (
                    " (the server does not speak TLS on this port)"
                    if reason == "WRONG_VERSION_NUMBER"
                    else ""
                )
                return f"protocol version mismatch: {text}{hint}"
            if reason in _TLS_CIPHER_REASONS:
                return f"no shared cipher: {text}"
            return f"TLS error: {text}"
    for cause in chain:
        if isinstance(cause, urllib3.exceptions.SSLError):
            return f"TLS error: {cause}"
    return None


def _remaining(started: float, deadline: float, host: str) -> float:
    remaining = deadline - (time.monotonic() - started)
    if remaining <= 0:
        raise FeedTimeoutError(
            f"feed host {host}: fetch deadline of {deadline:g}s passed", host=host, seconds=deadline
        )
    return remaining


class _PoolRequest:
    """What the adapter's pool-key logic reads from a request: its URL and the name to verify."""

    __slots__ = ("almanac_server_hostname", "url")

    def __init__(self, url: str, server_hostname: str) -> None:
        self.url = url
        self.almanac_server_hostname = server_hostname


#: No retries inside urllib3 (the shared retry policy retries), redirects followed by hand.
_NO_RETRIES = urllib3.util.Retry(0, read=False, redirect=False)


def _send(
    session, parts: SplitResult, ip: IPAddress, headers: dict, *, timeout, host: str, webcal: bool = False
) -> urllib3.BaseHTTPResponse:
    """One GET on the session's pinned connection pool for ``ip``, straight through urllib3.

    The session supplies the pools (kept alive across a batch), ``verify`` and ``cert``; what
    ``requests`` would add per call (preparing a request, merging environment settings, cookies,
    building its own response object) is skipped: on a batch of unchanged feeds that was most of
    the client's time per 304. URL credentials are sent as HTTP Basic auth, as ``requests`` does.
    """
    pinned = _pinned_url(parts, ip)
    headers = {**headers, "Host": parts.netloc.rpartition("@")[2]}
    if parts.username is not None and parts.password is not None:  # what requests sends
        username, password = unquote(parts.username), unquote(parts.password)
        if username or password:
            basic = urllib3.util.make_headers(basic_auth=f"{username}:{password}")
            headers["Authorization"] = basic["authorization"]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        pool = _pool_for(session, pinned, parts, ip, host)
        return pool.urlopen(
            "GET",
            target,
            headers=headers,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=False,
            retries=_NO_RETRIES,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
        )
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        if _timed_out(exc):
            kind = type(getattr(exc, "reason", None) or exc).__name__
            raise FeedTimeoutError(f"feed host {host}: timed out ({kind})", host=host) from exc
        raise _connection_failed(exc, host, webcal) from exc


#: Connection pools a session keeps at hand (the most recently used; as many as requests'
#: adapter keeps by default, so no more connections stay open than without this shortcut).
_POOLS_KEPT = 10


def _pool_for(session, pinned: str, parts: SplitResult, ip: IPAddress, host: str):
    """The session adapter's connection pool for this checked address and name. The lookup
    (pool-key building in requests and urllib3) cost ~50 µs per 304, so the last
    ``_POOLS_KEPT`` pools are kept on the session, least recently used first out."""
    pools: OrderedDict = session.__dict__.setdefault("_almanac_pools", OrderedDict())
    key = (parts.scheme, ip, parts.port, host, session.verify, session.cert)
    pool = pools.get(key)
    if pool is None:
        pool = session.get_adapter(pinned).get_connection_with_tls_context(
            _PoolRequest(pinned, host), session.verify, cert=session.cert
        )
        pools[key] = pool
        while len(pools) > _POOLS_KEPT:
            pools.popitem(last=False)
    else:
        pools.move_to_end(key)
    return pool


def _timed_out(exc: BaseException) -> bool:
    """A connect or read timeout (urllib3 wraps a failed connect in ``MaxRetryError``); a refused
    connection is not one, although urllib3's ``NewConnectionError`` subclasses its timeout."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return False
    return isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError)


def _connection_failed(exc: BaseException, host: str, webcal: bool) -> FeedTlsError | FeedUnavailableError:
    cause = _tls_failure(exc, host)
    read_as = " (webcal:// is read as https://)" if webcal else ""
    if cause is not None:
        return FeedTlsError(
            f"feed host {host}: TLS handshake failed{read_as}: {cause}",
            host=host,
            reason=cause,
            webcal=webcal,
        )
    detail = _connection_detail(exc)
    return FeedUnavailableError(f"feed host {host}: connection failed{read_as} ({detail})", host=host)


def _connection_detail(exc: BaseException) -> str:
    """A short, URL-free cause of a connection failure: the innermost OS or TLS error."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {str(cause.reason or type(cause).__name__).lower().replace('_', ' ')}"
        if isinstance(cause, OSError) and cause.strerror:
            return f"{type(cause).__name__}: {cause.strerror}"
    return type(exc).__name__


def _finish(response, url, host, etag, last_modified, started, deadline, max_bytes) -> FetchResult:
    status = response.status
    new_etag = response.headers.get("ETag")
    new_last_modified = response.headers.get("Last-Modified")
    if status == 304:
        if not (etag or last_modified):
            raise FeedHttpError(
                f"feed host {host} answered 304 to an unconditional GET", host=host, status=status
            )
        log.info("feed host %s: not modified", host)
        _keep_alive(response)
        return FetchResult(
            url=url,
            status=status,
            body=None,
            etag=new_etag or etag,
            last_modified=new_last_modified or last_modified,
            not_modified=True,
            body_sha256=None,
        )
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise FeedUnavailableError(
            f"feed host {host} answered {status}"
            + (f", retry after {retry_after:g}s" if retry_after is not None else ""),
            host=host,
            status=status,
            retry_after=retry_after,
        )
    if not 200 <= status < 300:
        raise FeedHttpError(f"feed host {host} answered {status}", host=host, status=status)
    _ack_now(response)
    body = _read_body(response, host, started, deadline, max_bytes)
    content_type = response.headers.get("Content-Type")
    if not _looks_like_icalendar(body):
        raise FeedNotICalendarError(
            f"feed host {host}: body is not iCalendar (Content-Type {content_type or 'absent'}, "
            f"{len(body)} bytes)",
            host=host,
            status=status,
            content_type=content_type,
        )
    log.info("feed host %s: %d bytes", host, len(body))
    return FetchResult(
        url=url,
        status=status,
        body=body,
        etag=new_etag,
        last_modified=new_last_modified,
        not_modified=False,
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


def _ack_now(response) -> None:
    """Acknowledge the response head at once (Linux ``TCP_QUICKACK``) on a kept-alive connection.

    A server that writes the head and the body separately without ``TCP_NODELAY`` (Python's
    ``http.server``, many small ones) holds the body back until the head is acknowledged, and on
    a connection in request/response rhythm the kernel delays that ACK by up to 40 ms: every
    feed would cost 40 ms of idle waiting."""
    quickack = getattr(socket, "TCP_QUICKACK", None)
    sock = getattr(getattr(response, "_connection", None), "sock", None)
    if quickack is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
    except OSError:  # not TCP (a test double) or already closed: only a lost optimisation
        pass


def _keep_alive(response) -> None:
    """Hand a bodiless (304) response's connection back to the session's pool, so the batch's
    next calendar on the same address reuses it instead of opening a new TCP connection (closing
    an unread streamed response closes its connection). A body read to its end is released by
    urllib3 itself."""
    try:
        response.drain_conn()  # a 304 has no body: nothing is read but the end of the message
        response.release_conn()
    except Exception:  # the pool keeps a connection only when it is reusable; never fail a fetch
        log.debug("feed connection not kept alive", exc_info=True)


def _read_body(response, host: str, started: float, deadline: float, max_bytes: int) -> bytes:
    def too_large() -> FeedTooLargeError:
        return FeedTooLargeError(
            f"feed host {host}: body exceeds {max_bytes} bytes (decompressed)", host=host, max_bytes=max_bytes
        )

    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and not response.headers.get("Content-Encoding") and int(declared) > max_bytes:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    try:
        # read1: at most one socket read per call (each bounded by the read timeout), so the
        # deadline is checked at least every ``read_timeout`` seconds however slowly bytes
        # trickle in; decoding is capped at _CHUNK_SIZE per call, so a gzip bomb never
        # expands in memory past ``max_bytes + _CHUNK_SIZE``.
        while chunk := response.read1(_CHUNK_SIZE, decode_content=True):
            size += len(chunk)
            if size > max_bytes:
                raise too_large()
            chunks.append(chunk)
            _remaining(started, deadline, host)
    except urllib3.exceptions.DecodeError as exc:
        raise FeedNotICalendarError(
            f"feed host {host}: body could not be decompressed "
            f"(Content-Encoding {response.headers.get('Content-Encoding')})",
            host=host,
            status=response.status,
            content_type=response.headers.get("Content-Type"),
        ) from exc
    except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as exc:
        raise FeedTimeoutError(f"feed host {host}: body read timed out", host=host) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # reset, truncated body
        raise FeedUnavailableError(
            f"feed host {host}: connection lost reading body ({type(exc).__name__})", host=host
        ) from exc
    return b"".join(chunks)

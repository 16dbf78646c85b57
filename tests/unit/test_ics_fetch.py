"""almanac.ics.fetch through the real requests client against a local feed server."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import pickle
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from almanac.errors import PermanentError, RetryableError
from almanac.ics import fetch as fetch_mod
from almanac.ics.fetch import (
    FeedHttpError,
    FeedNotICalendarError,
    FeedRefusedError,
    FeedTimeoutError,
    FeedTooLargeError,
    FeedTooManyRedirectsError,
    FeedUnavailableError,
    fetch_feed,
    normalise_feed_url,
    parse_retry_after,
)
from tests.support.feed_server import FeedServer, Route, gzip_bomb, redirect

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"
ICS = b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//almanac//test//EN\r\nEND:VCALENDAR\r\n"
SECRET_PATH = "/feeds/private-token-s3cr3t/cal.ics"


def corpus(name: str) -> bytes:
    """A corpus file's bytes; a missing fixture fails the test (never a skip)."""
    path = CORPUS / name
    if not path.is_file():
        pytest.fail(f"ICS corpus fixture {path} is missing (see tests/fixtures/README.md)")
    return path.read_bytes()


@pytest.fixture
def server():
    with FeedServer() as srv:
        yield srv


@pytest.fixture
def no_outbound(monkeypatch):
    """Records every outgoing socket connect; the guard must refuse before any."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        attempts.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def get(server: FeedServer, path: str, **kwargs):
    kwargs.setdefault("allow_hosts", server.allow_hosts)
    return fetch_feed(server.url(path), **kwargs)


# --- happy path and conditional GET ------------------------------------------------------------


def test_corpus_feed_is_returned_with_validators_and_hash(server):
    body = corpus("rie_three_events.ics")
    server.routes["/cal.ics"] = Route(body=body, etag='"v1"', last_modified="Sat, 01 Mar 2025 10:00:00 GMT")
    result = get(server, "/cal.ics")
    assert result.status == 200
    assert result.body == body
    assert result.body_sha256 == hashlib.sha256(body).hexdigest()
    assert (result.etag, result.last_modified) == ('"v1"', "Sat, 01 Mar 2025 10:00:00 GMT")
    assert result.not_modified is False
    assert result.url == server.url("/cal.ics")


def test_gzip_encoded_corpus_feed_is_decompressed(server):
    body = corpus("rie_Germany.ics")
    server.routes["/cal.ics"] = Route(body=body, gzip=True)
    result = get(server, "/cal.ics")
    assert result.body == body
    assert result.body_sha256 == hashlib.sha256(body).hexdigest()


def test_matching_etag_gives_not_modified_without_body(server):
    server.routes["/cal.ics"] = Route(body=ICS, etag='"v1"')
    result = get(server, "/cal.ics", etag='"v1"')
    assert server.requests[-1].headers["If-None-Match"] == '"v1"'
    assert result.not_modified is True
    assert (result.status, result.body, result.body_sha256, result.etag) == (304, None, None, '"v1"')


def test_changed_etag_gives_full_body(server):
    server.routes["/cal.ics"] = Route(body=ICS, etag='"v2"')
    result = get(server, "/cal.ics", etag='"v1"')
    assert (result.not_modified, result.body, result.etag) == (False, ICS, '"v2"')


def test_matching_last_modified_gives_not_modified(server):
    stamp = "Sat, 01 Mar 2025 10:00:00 GMT"
    server.routes["/cal.ics"] = Route(body=ICS, last_modified=stamp)
    result = get(server, "/cal.ics", last_modified=stamp)
    assert server.requests[-1].headers["If-Modified-Since"] == stamp
    assert "If-None-Match" not in server.requests[-1].headers
    assert result.not_modified and result.last_modified == stamp


def test_304_to_unconditional_request_is_http_error(server):
    server.routes["/cal.ics"] = Route(status=304, content_type=None)
    with pytest.raises(FeedHttpError) as info:
        get(server, "/cal.ics")
    assert info.value.status == 304


def test_bom_whitespace_and_lowercase_begin_are_icalendar(server):
    body = b"\xef\xbb\xbf \r\n begin:vcalendar\r\nEND:VCALENDAR\r\n"
    server.routes["/cal.ics"] = Route(body=body)
    assert get(server, "/cal.ics").body == body


def test_given_session_is_reused_across_fetches(server):
    server.routes["/cal.ics"] = Route(body=ICS)
    with requests.Session() as session:
        for _ in range(2):
            assert get(server, "/cal.ics", session=session).body == ICS


# --- schemes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("webcal://example.com/cal.ics", "https://example.com/cal.ics"),
        ("WEBCALS://example.com:8443/a?b=c", "https://example.com:8443/a?b=c"),
        ("http://example.com", "http://example.com/"),
        ("https://example.com/x#frag", "https://example.com/x"),
    ],
)
def test_webcal_is_read_as_https(given, expected):
    assert normalise_feed_url(given) == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/cal.ics",
        "file:///etc/passwd",
        "gopher://x/",
        "example.com/cal.ics",
        "http:///nohost",
    ],
)
def test_other_schemes_and_hostless_urls_are_refused(url, no_outbound):
    with pytest.raises(FeedRefusedError):
        fetch_feed(url)
    assert no_outbound == []


def test_webcal_to_local_server_speaks_tls_not_plain_http(server):
    server.routes["/cal.ics"] = Route(body=ICS)
    with pytest.raises(FeedUnavailableError):
        fetch_feed(server.url("/cal.ics", scheme="webcal"), allow_hosts=server.allow_hosts)
    assert server.hits("/cal.ics") == 0  # a TLS hello is not a GET


# --- address guard -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("10.0.0.1", "private"),
        ("169.254.169.254", "metadata"),
        ("[fd00:ec2::254]", "metadata"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("[::ffff:169.254.169.254]", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not globally routable"),
        ("192.168.1.1", "private"),
        ("localhost", "loopback"),
    ],
)
def test_non_public_addresses_are_refused_before_connecting(host, reason, no_outbound):
    with pytest.raises(FeedRefusedError) as info:
        fetch_feed(f"http://{host}:8080/cal.ics")
    assert reason in info.value.reason
    assert info.value.host == host.strip("[]")
    assert no_outbound == []


def test_own_server_is_refused_without_allow_list(server, no_outbound):
    server.routes["/cal.ics"] = Route(body=ICS)
    with pytest.raises(FeedRefusedError, match="loopback"):
        fetch_feed(server.url("/cal.ics"))
    assert no_outbound == [] and server.hits("/cal.ics") == 0


def test_allow_list_entry_for_another_port_does_not_allow(server):
    server.routes["/cal.ics"] = Route(body=ICS)
    with pytest.raises(FeedRefusedError):
        fetch_feed(server.url("/cal.ics"), allow_hosts=frozenset({"127.0.0.1:1"}))


def test_host_only_allow_list_entry_allows_any_port(server):
    server.routes["/cal.ics"] = Route(body=ICS)
    assert fetch_feed(server.url("/cal.ics"), allow_hosts=frozenset({"127.0.0.1"})).body == ICS


def test_any_bad_address_among_several_refuses(monkeypatch, no_outbound):
    public = ipaddress.ip_address("93.184.215.14")
    monkeypatch.setattr(fetch_mod, "_resolve", lambda host, port: [public, ipaddress.ip_address("10.1.2.3")])
    with pytest.raises(FeedRefusedError, match="10.1.2.3"):
        fetch_feed("https://feed.example/cal.ics")
    assert no_outbound == []


def test_connection_goes_to_the_checked_address_with_the_real_host_header(server, monkeypatch):
    """DNS rebinding: the name is resolved once and the connection made to that address."""
    calls = []

    def resolve(host, port):
        calls.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(fetch_mod, "_resolve", resolve)
    server.routes["/cal.ics"] = Route(body=ICS)
    # .invalid never resolves in real DNS: success proves requests did not look it up again.
    url = f"http://feed.invalid:{server.port}/cal.ics"
    result = fetch_feed(url, allow_hosts=frozenset({f"feed.invalid:{server.port}"}))
    assert result.body == ICS and result.url == url
    assert calls == ["feed.invalid"]
    assert server.requests[-1].headers["Host"] == f"feed.invalid:{server.port}"


def test_https_to_pinned_address_keeps_name_for_sni_and_certificate():
    adapter = fetch_mod._PinnedAdapter()
    request = requests.Request("GET", "https://93.184.215.14/cal.ics", headers={"Host": "feed.example"})
    prepared = request.prepare()
    prepared.almanac_server_hostname = "feed.example"
    host_params, pool_kwargs = adapter.build_connection_pool_key_attributes(prepared, True)
    assert host_params["host"] == "93.184.215.14"
    assert pool_kwargs["server_hostname"] == pool_kwargs["assert_hostname"] == "feed.example"


def test_unresolvable_host_is_retryable(monkeypatch):
    def fail(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(fetch_mod, "_resolve", fail)
    with pytest.raises(FeedUnavailableError) as info:
        fetch_feed("https://feed.invalid/cal.ics")
    assert info.value.host == "feed.invalid"


# --- redirects ---------------------------------------------------------------------------------


def test_relative_redirect_is_followed(server):
    server.routes["/old/cal.ics"] = redirect("../new/cal.ics", status=301)
    server.routes["/new/cal.ics"] = Route(body=ICS, etag='"n"')
    result = get(server, "/old/cal.ics")
    assert (result.body, result.url, result.etag) == (ICS, server.url("/new/cal.ics"), '"n"')


def test_absolute_redirect_chain_is_followed_with_validators_on_every_hop(server):
    server.routes["/a"] = redirect(server.url("/b"), status=307)
    server.routes["/b"] = redirect(server.url("/c"), status=308)
    server.routes["/c"] = Route(body=ICS, etag='"v1"')
    result = get(server, "/a", etag='"v1"')
    assert result.not_modified and result.url == server.url("/c")
    assert [r.headers.get("If-None-Match") for r in server.requests] == ['"v1"'] * 3


def test_redirects_beyond_the_limit_are_permanent(server):
    for i in range(4):
        server.routes[f"/r{i}"] = redirect(f"/r{i + 1}")
    server.routes["/r4"] = Route(body=ICS)
    assert get(server, "/r0", max_redirects=4).body == ICS
    with pytest.raises(FeedTooManyRedirectsError) as info:
        get(server, "/r0", max_redirects=3)
    assert info.value.max_redirects == 3


def test_redirect_loop_stops(server):
    server.routes["/loop"] = redirect("/loop")
    with pytest.raises(FeedTooManyRedirectsError):
        get(server, "/loop")
    assert server.hits("/loop") == 6  # first request + 5 redirects


@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[::1]/", "file:///etc/passwd"],
)
def test_redirect_to_forbidden_target_is_refused_before_connecting(server, no_outbound, location):
    server.routes["/cal.ics"] = redirect(location)
    with pytest.raises(FeedRefusedError):
        get(server, "/cal.ics")
    assert all(addr[0] == "127.0.0.1" for addr in no_outbound)  # only the allowed feed server


def test_redirect_without_location_is_http_error(server):
    server.routes["/cal.ics"] = Route(status=302, content_type=None)
    with pytest.raises(FeedHttpError) as info:
        get(server, "/cal.ics")
    assert info.value.status == 302


# --- limits ------------------------------------------------------------------------------------


def test_body_over_limit_is_too_large(server):
    server.routes["/huge.ics"] = Route(body=ICS, repeat=20_000)  # ~1.4 MB
    with pytest.raises(FeedTooLargeError) as info:
        get(server, "/huge.ics", max_bytes=1024 * 1024)
    assert info.value.max_bytes == 1024 * 1024


def test_body_without_content_length_is_counted_while_streaming(server):
    server.routes["/huge.ics"] = Route(body=ICS, repeat=20_000, content_length=False)
    with pytest.raises(FeedTooLargeError):
        get(server, "/huge.ics", max_bytes=1024 * 1024)


def test_gzip_bomb_is_stopped_by_decompressed_size(server):
    bomb = gzip_bomb(16 * 1024 * 1024)
    assert len(bomb) < 64 * 1024  # small on the wire
    server.routes["/bomb.ics"] = Route(raw_gzip=bomb)
    with pytest.raises(FeedTooLargeError):
        get(server, "/bomb.ics", max_bytes=1024 * 1024)


def test_body_exactly_at_limit_is_accepted(server):
    server.routes["/cal.ics"] = Route(body=ICS)
    assert get(server, "/cal.ics", max_bytes=len(ICS)).body == ICS


def test_slow_body_hits_total_deadline(server):
    server.routes["/slow.ics"] = Route(body=ICS * 20, chunk_size=64, chunk_delay=0.2)
    with pytest.raises(FeedTimeoutError) as info:
        get(server, "/slow.ics", deadline=0.6, read_timeout=5)
    assert isinstance(info.value, RetryableError)


def test_silent_server_hits_read_timeout(server):
    server.routes["/stall.ics"] = Route(body=ICS, delay=1.0)
    with pytest.raises(FeedTimeoutError):
        get(server, "/stall.ics", read_timeout=0.2)


def test_stalled_body_hits_read_timeout(server):
    server.routes["/stall.ics"] = Route(body=ICS * 4, chunk_size=len(ICS), chunk_delay=1.0)
    with pytest.raises(FeedTimeoutError):
        get(server, "/stall.ics", read_timeout=0.2)


def test_refused_connection_is_retryable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FeedUnavailableError) as info:
        fetch_feed(f"http://127.0.0.1:{port}/cal.ics", allow_hosts=frozenset({f"127.0.0.1:{port}"}))
    assert info.value.status is None


# --- statuses and content ----------------------------------------------------------------------


def test_429_carries_retry_after_seconds(server):
    server.routes["/cal.ics"] = Route(status=429, headers={"Retry-After": "120"})
    with pytest.raises(FeedUnavailableError) as info:
        get(server, "/cal.ics")
    assert (info.value.status, info.value.retry_after) == (429, 120.0)


def test_503_with_http_date_retry_after(server):
    server.routes["/cal.ics"] = Route(status=503, headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    with pytest.raises(FeedUnavailableError) as info:
        get(server, "/cal.ics")
    # Decades away: at least a day (the shared Retry-After parser may cap it at exactly a day).
    assert info.value.status == 503 and info.value.retry_after >= 86_400


def test_500_is_retryable_without_retry_after(server):
    server.routes["/cal.ics"] = Route(status=500, body=b"oops", content_type="text/plain")
    with pytest.raises(FeedUnavailableError) as info:
        get(server, "/cal.ics")
    assert (info.value.status, info.value.retry_after) == (500, None)


@pytest.mark.parametrize("status", [404, 403, 410])
def test_client_errors_are_permanent(server, status):
    if status != 404:
        server.routes["/cal.ics"] = Route(status=status, body=b"no", content_type="text/plain")
    with pytest.raises(FeedHttpError) as info:
        get(server, "/cal.ics")
    assert info.value.status == status
    assert isinstance(info.value, PermanentError)


def test_html_login_page_is_not_icalendar(server):
    html = b"<!doctype html><title>Sign in</title>"
    server.routes["/cal.ics"] = Route(body=html, content_type="text/html; charset=utf-8")
    with pytest.raises(FeedNotICalendarError, match="text/html") as info:
        get(server, "/cal.ics")
    assert info.value.content_type == "text/html; charset=utf-8"


def test_corrupt_gzip_is_not_icalendar(server):
    server.routes["/cal.ics"] = Route(raw_gzip=b"\x1f\x8b\x08\x00garbage-garbage-garbage")
    with pytest.raises(FeedNotICalendarError, match="decompressed"):
        get(server, "/cal.ics")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("Sat, 01 Mar 2025 10:02:00 GMT", 120.0),
        ("Sat, 01 Mar 2025 09:00:00 GMT", 0.0),
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value, expected):
    now = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected


# --- errors and logs ---------------------------------------------------------------------------


def test_errors_pickle_with_their_fields():
    exc = FeedUnavailableError("feed host h answered 429", host="h", status=429, retry_after=3.0)
    back = pickle.loads(pickle.dumps(exc))
    assert (str(back), back.host, back.status, back.retry_after) == (str(exc), "h", 429, 3.0)


def test_logs_and_messages_name_the_host_never_the_full_url(server, caplog):
    caplog.set_level(logging.DEBUG, logger="almanac.ics.fetch")
    server.routes["/start"] = redirect(SECRET_PATH)
    server.routes[SECRET_PATH] = Route(body=ICS)
    get(server, "/start")
    server.routes[SECRET_PATH] = Route(status=404)
    with pytest.raises(FeedHttpError) as info:
        get(server, "/start")
    assert "127.0.0.1" in caplog.text
    assert "s3cr3t" not in caplog.text and "s3cr3t" not in str(info.value)

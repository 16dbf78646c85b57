"""almanac.ics.fetch (urllib3 pools from a requests session) against a local feed server."""

from __future__ import annotations

import base64
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
    FeedTlsError,
    FeedTooLargeError,
    FeedTooManyRedirectsError,
    FeedUnavailableError,
    fetch_feed,
    fetch_policy,
    fetch_with_settings,
    new_session,
    normalise_feed_url,
    parse_retry_after,
)
from almanac.settings import Settings
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
    with pytest.raises(FeedTlsError) as info:  # the TLS cases: tests/unit/test_ics_fetch_tls.py
        fetch_feed(server.url("/cal.ics", scheme="webcal"), allow_hosts=server.allow_hosts)
    assert server.hits("/cal.ics") == 0  # a TLS hello is not a GET
    assert info.value.webcal is True


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
        ("[fec0::1]", "site-local"),  # deprecated site-local: Python calls it global
        ("[fec0:1234::5]", "site-local"),
        ("[feff::1]", "site-local"),  # the top of fec0::/10
        ("192.0.0.9", "IETF protocol assignments"),  # Python calls .9 and .10 global
        ("192.0.0.10", "IETF protocol assignments"),
        ("192.0.0.200", "IETF protocol assignments"),
        ("[::ffff:192.0.0.9]", "IETF protocol assignments"),
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


def test_refusal_after_a_redirect_names_the_hop_it_came_from_without_secrets(server, no_outbound):
    token = "private-0123456789abcdef0123456789abcdef"
    server.routes[f"/feeds/{token}/cal.ics"] = redirect("http://10.0.0.1/internal")
    with pytest.raises(FeedRefusedError) as info:
        get(server, f"/feeds/{token}/cal.ics?key=s3cr3t")
    message = str(info.value)
    assert f"redirect from {server.host_port}/feeds/…/cal.ics to 10.0.0.1" in message
    assert "private address" in message
    assert info.value.redirected_from == f"{server.host_port}/feeds/…/cal.ics"
    assert (info.value.host, info.value.reason) == ("10.0.0.1", "private address")
    assert token not in message and "s3cr3t" not in message and "internal" not in message
    assert [addr[0] for addr in no_outbound] == ["127.0.0.1"]  # nothing sent to 10.0.0.1


def test_refusal_of_a_redirect_to_another_scheme_names_the_hop(server):
    server.routes["/start"] = redirect("file:///etc/passwd")
    with pytest.raises(FeedRefusedError) as info:
        get(server, "/start")
    assert f"redirect from {server.host_port}/start to a URL without host" in str(info.value)
    assert "scheme 'file'" in str(info.value)


def test_refusal_of_the_calendars_own_url_names_no_redirect(no_outbound):
    with pytest.raises(FeedRefusedError) as info:
        fetch_feed("http://10.0.0.1/cal.ics")
    assert "redirect" not in str(info.value) and info.value.redirected_from == ""


def test_refused_error_pickles_with_the_hop():
    exc = FeedRefusedError("m", host="10.0.0.1", reason="private address", redirected_from="h/p")
    back = pickle.loads(pickle.dumps(exc))
    assert (back.host, back.reason, back.redirected_from) == ("10.0.0.1", "private address", "h/p")


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


# --- the environment never redirects a fetch ---------------------------------------------------


@pytest.fixture
def hostile_env(monkeypatch, tmp_path):
    """Proxy variables pointing at a recording "proxy", and a .netrc with credentials for 127.0.0.1."""
    proxy = FeedServer()
    proxy.__enter__()
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://{proxy.host_port}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    yield proxy
    proxy.__exit__(None, None, None)


def test_requests_itself_would_follow_the_environment(server, hostile_env):
    """The control for the tests below: this environment does reroute a plain requests.Session."""
    server.routes["/cal.ics"] = Route(body=ICS)
    with requests.Session() as session:
        session.get(server.url("/cal.ics"), timeout=5)
    assert len(hostile_env.requests) == 1 and server.hits("/cal.ics") == 0


@pytest.mark.parametrize("make_session", [None, new_session, requests.Session], ids=["own", "new", "plain"])
def test_proxy_variables_and_netrc_are_ignored(server, hostile_env, make_session):
    server.routes["/cal.ics"] = Route(body=ICS)
    session = make_session() if make_session else None
    try:
        assert get(server, "/cal.ics", session=session).body == ICS
    finally:
        if session is not None:
            session.close()
    assert hostile_env.requests == []
    assert "Authorization" not in server.requests[-1].headers


def test_new_session_does_not_trust_the_environment_and_pins_addresses():
    with new_session() as session:
        assert session.trust_env is False
        assert isinstance(session.get_adapter("https://feed.example/"), fetch_mod._PinnedAdapter)
        assert isinstance(session.get_adapter("http://feed.example/"), fetch_mod._PinnedAdapter)


def test_a_cookie_one_feed_sets_is_never_sent_with_another_calendars_request(server):
    """A batch reuses one session for all its calendars, and many share a feed host."""
    server.routes["/a.ics"] = Route(body=ICS, headers={"Set-Cookie": "session=calendar-a; Path=/"})
    server.routes["/b.ics"] = Route(body=ICS)
    with new_session() as session:
        get(server, "/a.ics", session=session)
        get(server, "/b.ics", session=session)
    assert "Cookie" not in server.requests[-1].headers


def test_credentials_in_the_feed_url_are_sent_as_basic_auth_to_that_host_only(server):
    """A private feed URL may carry ``user:password@``: sent as HTTP Basic auth (as browsers and
    ``requests`` do), never kept for the next calendar's request on the same session."""
    server.routes["/private.ics"] = Route(body=ICS)
    server.routes["/public.ics"] = Route(body=ICS)
    with_credentials = server.url("/private.ics").replace("://", "://ann%40home:s3cr%3At@", 1)
    with new_session() as session:
        assert fetch_feed(with_credentials, session=session, allow_hosts=server.allow_hosts).body == ICS
        sent = server.requests[-1].headers["Authorization"]
        get(server, "/public.ics", session=session)
    assert base64.b64decode(sent.removeprefix("Basic ")) == b"ann@home:s3cr:t"
    assert "Authorization" not in server.requests[-1].headers


def test_304_keeps_the_connection_alive_for_the_next_calendar(server):
    """Regression: an unread streamed 304 closed its connection, so every unchanged calendar of a
    batch paid a new TCP connection and the unchanged cycle grew worse than linearly."""
    server.routes["/a.ics"] = Route(body=ICS, etag='"v1"')
    ports = set()
    with new_session() as session:
        for _ in range(5):
            result = get(server, "/a.ics", session=session, etag='"v1"')
            assert result.not_modified
            ports.add(server.requests[-1].client_port)
    assert len(ports) == 1


def test_a_session_keeps_no_more_pools_than_requests_would():
    """One pool (and its open connection) per feed address: a batch over many hosts must not
    keep a connection open to each of them."""
    servers = [FeedServer() for _ in range(fetch_mod._POOLS_KEPT + 3)]
    try:
        with new_session() as session:
            for srv in servers:
                srv.__enter__()
                srv.routes["/a.ics"] = Route(body=ICS)
                assert get(srv, "/a.ics", session=session).body == ICS
            assert len(session._almanac_pools) == fetch_mod._POOLS_KEPT
            assert get(servers[-1], "/a.ics", session=session).body == ICS  # kept: same connection
        assert len({request.client_port for request in servers[-1].requests}) == 1
    finally:
        for srv in servers:
            srv.__exit__(None, None, None)


# --- fetch_with_settings: the one fetch path ---------------------------------------------------


def fast(**overrides) -> Settings:
    return Settings.from_mapping({"ics_retry_max_wait_s": 5, **overrides})


def flaky(status: int, times: int, *, retry_after: str | None = None, body: bytes = ICS):
    """A route answering ``status`` the first ``times`` requests, then ``body``."""
    calls = []

    def route(handler):
        calls.append(handler.path)
        if len(calls) <= times:
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            handler._serve(Route(status=status, body=b"busy", content_type="text/plain", headers=headers))
        else:
            handler._serve(Route(body=body))

    return route


def test_fetch_policy_comes_from_the_settings():
    policy = fetch_policy(Settings(ics_fetch_attempts=7, ics_retry_max_wait_s=9, ics_read_timeout_s=4))
    assert (policy.attempts, policy.base_wait_s, policy.max_wait_s, policy.timeout_s) == (7, 1.0, 9.0, 4.0)


@pytest.mark.parametrize("status", [503, 429])
def test_transient_statuses_are_retried_with_retry_after(server, status):
    server.routes["/cal.ics"] = flaky(status, 2, retry_after="2")
    waits: list[float] = []
    result = fetch_with_settings(
        server.url("/cal.ics"), fast(ics_fetch_attempts=3), allow_hosts=server.allow_hosts, sleep=waits.append
    )
    assert result.body == ICS
    assert server.hits("/cal.ics") == 3 and waits == [2.0, 2.0]


def test_retry_after_is_capped_by_the_longest_wait_setting(server):
    server.routes["/cal.ics"] = flaky(503, 1, retry_after="3600")
    waits: list[float] = []
    fetch_with_settings(
        server.url("/cal.ics"),
        fast(ics_retry_max_wait_s=7),
        allow_hosts=server.allow_hosts,
        sleep=waits.append,
    )
    assert waits == [7.0]


def test_attempts_setting_bounds_the_tries_and_the_last_error_propagates(server):
    server.routes["/cal.ics"] = flaky(503, 10)
    waits: list[float] = []
    with pytest.raises(FeedUnavailableError) as info:
        fetch_with_settings(
            server.url("/cal.ics"),
            fast(ics_fetch_attempts=2),
            allow_hosts=server.allow_hosts,
            sleep=waits.append,
        )
    assert info.value.status == 503
    assert server.hits("/cal.ics") == 2 and waits == [1.0]  # backoff from 1 s without Retry-After


def test_permanent_errors_are_not_retried(server):
    waits: list[float] = []
    with pytest.raises(FeedHttpError):
        fetch_with_settings(
            server.url("/gone.ics"), fast(), allow_hosts=server.allow_hosts, sleep=waits.append
        )
    assert server.hits("/gone.ics") == 1 and waits == []


def test_each_retry_is_logged_with_host_and_cause_never_the_url(server, caplog):
    caplog.set_level(logging.WARNING, logger="almanac.ics.fetch")
    server.routes[SECRET_PATH] = flaky(503, 1, retry_after="0")
    fetch_with_settings(server.url(SECRET_PATH), fast(), allow_hosts=server.allow_hosts, sleep=lambda s: None)
    (line,) = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert line == (
        "feed host 127.0.0.1: try 1 of 3 failed (feed host 127.0.0.1 answered 503, retry after 0s);"
        " retrying in 0s"
    )
    assert "s3cr3t" not in caplog.text


def test_allow_hosts_setting_lets_the_guard_through(server, no_outbound):
    server.routes["/cal.ics"] = Route(body=ICS)
    with pytest.raises(FeedRefusedError):
        fetch_with_settings(server.url("/cal.ics"), fast())
    assert no_outbound == []
    result = fetch_with_settings(server.url("/cal.ics"), fast(ics_allow_hosts=f"x.test, {server.host_port}"))
    assert result.body == ICS


def test_max_redirects_setting(server):
    server.routes["/a"] = redirect("/b")
    server.routes["/b"] = redirect("/c")
    server.routes["/c"] = Route(body=ICS)
    assert fetch_with_settings(
        server.url("/a"), fast(ics_max_redirects=2), allow_hosts=server.allow_hosts
    ).body
    with pytest.raises(FeedTooManyRedirectsError) as info:
        fetch_with_settings(server.url("/a"), fast(ics_max_redirects=1), allow_hosts=server.allow_hosts)
    assert info.value.max_redirects == 1


def test_max_bytes_setting(server):
    server.routes["/cal.ics"] = Route(body=ICS)
    assert fetch_with_settings(
        server.url("/cal.ics"), fast(ics_max_bytes=len(ICS)), allow_hosts=server.allow_hosts
    )
    with pytest.raises(FeedTooLargeError):
        fetch_with_settings(
            server.url("/cal.ics"), fast(ics_max_bytes=len(ICS) - 1), allow_hosts=server.allow_hosts
        )


def test_read_timeout_setting_and_timeouts_are_retried(server):
    server.routes["/stall.ics"] = Route(body=ICS, delay=1.5)
    waits: list[float] = []
    with pytest.raises(FeedTimeoutError):
        fetch_with_settings(
            server.url("/stall.ics"),
            fast(ics_read_timeout_s=1, ics_fetch_attempts=2),
            allow_hosts=server.allow_hosts,
            sleep=waits.append,
        )
    assert server.hits("/stall.ics") == 2 and waits == [1.0]


def test_deadline_setting_bounds_a_trickling_body(server):
    server.routes["/slow.ics"] = Route(body=ICS * 40, chunk_size=32, chunk_delay=0.1)  # ~9 s in all
    with pytest.raises(FeedTimeoutError, match="deadline of 1s"):
        fetch_with_settings(
            server.url("/slow.ics"),
            fast(ics_fetch_deadline_s=1, ics_read_timeout_s=5, ics_fetch_attempts=1),
            allow_hosts=server.allow_hosts,
        )


def test_limits_are_read_from_the_settings_at_every_attempt(server):
    """A caller's budget can shrink the deadline between attempts (almanac.ics.sync does)."""

    class Shrinking:
        def __init__(self) -> None:
            self.deadlines = iter([30.0, 0.2])

        def __getattr__(self, name):
            return getattr(fast(ics_fetch_attempts=2, ics_read_timeout_s=5), name)

        @property
        def ics_fetch_deadline_s(self) -> float:
            return next(self.deadlines)

    answers = [
        Route(status=503, headers={"Retry-After": "0"}),
        Route(body=ICS * 40, chunk_size=32, chunk_delay=0.1),
    ]
    server.routes["/slow.ics"] = lambda handler: handler._serve(answers.pop(0))
    with pytest.raises(FeedTimeoutError, match="deadline of 0.2s"):
        fetch_with_settings(
            server.url("/slow.ics"), Shrinking(), allow_hosts=server.allow_hosts, sleep=lambda s: None
        )
    assert server.hits("/slow.ics") == 2


def test_validators_are_sent_and_a_given_session_is_kept_open(server):
    server.routes["/cal.ics"] = Route(body=ICS, etag='"v1"', last_modified="Sat, 01 Mar 2025 10:00:00 GMT")
    with new_session() as session:
        first = fetch_with_settings(
            server.url("/cal.ics"), fast(), session=session, allow_hosts=server.allow_hosts
        )
        again = fetch_with_settings(
            server.url("/cal.ics"),
            fast(),
            etag=first.etag,
            last_modified=first.last_modified,
            session=session,
            allow_hosts=server.allow_hosts,
        )
        assert session.adapters  # still usable: not closed by fetch_with_settings
    assert (first.not_modified, again.not_modified) == (False, True)
    assert server.requests[-1].headers["If-None-Match"] == '"v1"'

"""almanac.ics.fetch over TLS: local HTTPS servers with throwaway certificates, and a plain-HTTP one.

Certificate and protocol problems are permanent (``FeedTlsError``, one attempt); a connection reset
during the handshake is retried; a ``webcal://`` URL's failure says it was read as https.
"""

from __future__ import annotations

import ssl

import pytest
import requests

from almanac.errors import PermanentError
from almanac.ics.fetch import (
    FeedTlsError,
    FeedUnavailableError,
    fetch_feed,
    fetch_with_settings,
    new_session,
)
from almanac.settings import Settings
from tests.support.feed_server import FeedServer, Route
from tests.support.tls_server import TlsFeedServer, make_certificates, server_context

ICS = b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//almanac//test//EN\r\nEND:VCALENDAR\r\n"
SETTINGS = Settings(ics_fetch_attempts=3, ics_retry_max_wait_s=5)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA and a certificate for localhost and 127.0.0.1."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A CA and a certificate for another name only."""
    return make_certificates(tmp_path_factory.mktemp("tls-other"), dns_names=("feed.test",), ip_addresses=())


def trusting(ca) -> requests.Session:
    """A fetch session that trusts the test CA ``ca``."""
    session = new_session()
    session.verify = str(ca)
    return session


def fetch(url: str, server, *, session=None, waits: list[float] | None = None):
    return fetch_with_settings(
        url,
        SETTINGS,
        session=session,
        allow_hosts=server.allow_hosts,
        sleep=(waits if waits is not None else []).append,
    )


def test_trusted_certificate_for_the_address_is_fetched(certs):
    """The control: the server and the CA are good, so the failures below are the cases' own."""
    with (
        TlsFeedServer(server_context(certs), {"/cal.ics": Route(body=ICS)}) as server,
        trusting(certs.ca) as s,
    ):
        assert fetch(server.url("/cal.ics"), server, session=s).body == ICS
        assert fetch(server.url("/cal.ics", scheme="webcal"), server, session=s).body == ICS
    assert server.handshakes[0] == "ok" and server.hits("/cal.ics") == 2


def test_unknown_issuer_is_permanent_and_not_retried(certs):
    waits: list[float] = []
    with TlsFeedServer(server_context(certs), {"/cal.ics": Route(body=ICS)}) as server:
        with pytest.raises(FeedTlsError) as info:
            fetch(server.url("/cal.ics"), server, waits=waits)  # the system CAs do not know ours
    assert isinstance(info.value, PermanentError)
    assert "certificate verify failed: unable to get local issuer certificate" in str(info.value)
    assert info.value.webcal is False and "webcal" not in str(info.value)
    assert len(server.handshakes) == 1 and "UNKNOWN_CA" in server.handshakes[0]  # the client gave up
    assert waits == [] and server.hits("/cal.ics") == 0


def test_certificate_for_another_host_is_a_hostname_mismatch(other_certs):
    waits: list[float] = []
    with (
        TlsFeedServer(server_context(other_certs), {"/cal.ics": Route(body=ICS)}) as server,
        trusting(other_certs.ca) as session,
    ):
        with pytest.raises(FeedTlsError) as info:
            fetch(server.url("/cal.ics"), server, session=session, waits=waits)
    assert "hostname mismatch" in str(info.value) and "feed.test" in str(info.value)
    assert info.value.reason.startswith("hostname mismatch")
    assert waits == [] and server.hits("/cal.ics") == 0


def test_webcal_certificate_failure_says_it_was_read_as_https(certs):
    with TlsFeedServer(server_context(certs), {"/cal.ics": Route(body=ICS)}) as server:
        with pytest.raises(FeedTlsError) as info:
            fetch(server.url("/cal.ics", scheme="webcal"), server)
    message = str(info.value)
    assert "webcal:// is read as https://" in message and "certificate verify failed" in message
    assert info.value.webcal is True and info.value.host == "127.0.0.1"


def test_webcal_to_a_plain_http_server_is_a_permanent_wrong_version_number():
    waits: list[float] = []
    with FeedServer({"/cal.ics": Route(body=ICS)}) as server:
        with pytest.raises(FeedTlsError) as info:
            fetch(server.url("/cal.ics", scheme="webcal"), server, waits=waits)
    message = str(info.value)
    assert "webcal:// is read as https://" in message
    assert "protocol version mismatch: wrong version number" in message
    assert "does not speak TLS on this port" in message
    assert waits == [] and server.hits("/cal.ics") == 0


def test_https_to_a_plain_http_server_does_not_mention_webcal():
    with FeedServer({"/cal.ics": Route(body=ICS)}) as server:
        with pytest.raises(FeedTlsError) as info:
            fetch(server.url("/cal.ics", scheme="https"), server)
    assert "wrong version number" in str(info.value) and "webcal" not in str(info.value)


def test_server_offering_only_old_tls_is_a_permanent_protocol_mismatch(certs):
    context = server_context(certs, maximum_version=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")
    waits: list[float] = []
    with TlsFeedServer(context, {"/cal.ics": Route(body=ICS)}) as server, trusting(certs.ca) as session:
        with pytest.raises(FeedTlsError) as info:
            fetch(server.url("/cal.ics"), server, session=session, waits=waits)
    assert "protocol version" in str(info.value)
    assert waits == [] and len(server.handshakes) == 1


def test_no_shared_cipher_is_permanent(certs):
    # TLS 1.2 with a cipher the client never offers (TLS 1.3 suites cannot be narrowed this way).
    context = server_context(
        certs, maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-ARIA128-GCM-SHA256"
    )
    waits: list[float] = []
    with TlsFeedServer(context, {"/cal.ics": Route(body=ICS)}) as server, trusting(certs.ca) as session:
        with pytest.raises(FeedTlsError) as info:
            fetch(server.url("/cal.ics"), server, session=session, waits=waits)
    assert "no shared cipher" in str(info.value)
    assert waits == [] and len(server.handshakes) == 1 and "NO_SHARED_CIPHER" in server.handshakes[0]


def test_connection_reset_before_the_handshake_is_retryable(certs):
    with TlsFeedServer(server_context(certs), {"/cal.ics": Route(body=ICS)}, reset_first=1) as server:
        with trusting(certs.ca) as session, pytest.raises(FeedUnavailableError) as info:
            fetch_feed(server.url("/cal.ics"), session=session, allow_hosts=server.allow_hosts)
    assert "reset" in str(info.value).lower() and info.value.status is None


def test_connection_reset_is_retried_and_the_next_try_succeeds(certs):
    waits: list[float] = []
    with (
        TlsFeedServer(server_context(certs), {"/cal.ics": Route(body=ICS)}, reset_first=1) as server,
        trusting(certs.ca) as session,
    ):
        assert fetch(server.url("/cal.ics"), server, session=session, waits=waits).body == ICS
    assert server.handshakes == ["reset", "ok"] and waits == [1.0]


def test_tls_error_pickles_with_its_fields():
    import pickle

    exc = FeedTlsError("m", host="h", reason="no shared cipher: x", webcal=True)
    back = pickle.loads(pickle.dumps(exc))
    assert (str(back), back.host, back.reason, back.webcal) == ("m", "h", "no shared cipher: x", True)

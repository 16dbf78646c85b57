"""A local HTTPS feed server (``FeedServer`` behind TLS) and throwaway certificates for TLS tests.

Certificates are made per test with ``cryptography``: a CA and a server certificate it signs,
for the names and addresses asked for::

    certs = make_certificates(tmp_path, dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    with TlsFeedServer(server_context(certs), {"/cal.ics": Route(body=ics)}) as server:
        session = new_session()
        session.verify = str(certs.ca)          # trust the test CA (or not: "self-signed")
        fetch_feed(server.url("/cal.ics"), session=session, allow_hosts=server.allow_hosts)

The handshake runs in the connection's own thread; each connection's outcome is recorded in
``server.handshakes`` ("ok", or the server-side error), complete once the ``with`` block ends.
``reset_first=N`` closes the first N connections with a TCP reset before any TLS byte (a connection
reset the client may retry).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.feed_server import FeedServer, RouteSpec

__all__ = ["CertFiles", "TlsFeedServer", "make_certificates", "server_context"]


@dataclass(frozen=True)
class CertFiles:
    """PEM files: the CA certificate to trust, and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(
    directory: Path,
    *,
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
) -> CertFiles:
    """A fresh CA and a server certificate for ``dns_names`` / ``ip_addresses``, valid for a day."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("almanac test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else "almanac test server"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def server_context(
    certs: CertFiles,
    *,
    minimum_version: ssl.TLSVersion | None = None,
    maximum_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A server-side context for ``certs``, optionally limited to some TLS versions or ciphers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if minimum_version is not None:
        context.minimum_version = minimum_version
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


class TlsFeedServer(FeedServer):
    """``FeedServer`` speaking HTTPS with ``context``; ``url()`` defaults to ``https://``."""

    class _Server(FeedServer._Server):
        owner: TlsFeedServer
        # Closing the server waits for every connection's thread, so ``handshakes`` is complete
        # once the ``with`` block has ended (a failed handshake is recorded after the client saw it).
        daemon_threads = False
        block_on_close = True

        def finish_request(self, request, client_address) -> None:  # runs in the connection's thread
            owner = self.owner
            if owner.reset_first > 0:
                owner.reset_first -= 1
                owner.handshakes.append("reset")
                # SO_LINGER 0: close() sends a RST instead of a FIN.
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                request.close()
                return
            request.settimeout(10)  # a client that stays silent never holds the server's close up for long
            try:
                tls = owner.context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                owner.handshakes.append(f"failed: {exc}")
                request.close()
                return
            owner.handshakes.append("ok")
            try:
                super().finish_request(tls, client_address)
            finally:
                tls.close()

        def handle_error(self, request, client_address) -> None:
            pass  # a client that hung up mid-request is expected in these tests

    def __init__(
        self, context: ssl.SSLContext, routes: dict[str, RouteSpec] | None = None, *, reset_first: int = 0
    ) -> None:
        super().__init__(routes)
        self.context = context
        self.reset_first = reset_first
        self.handshakes: list[str] = []

    def url(self, path: str, scheme: str = "https") -> str:
        return super().url(path, scheme)

"""Notifications: the channel senders — email over SMTP, SMS via Twilio's Messages API, push via FCM v1.

Each sender is built from a plain config (``SmtpConfig`` / ``SmsConfig`` / ``FcmConfig``, filled by
the Airflow glue from the connections ``smtp_default`` / ``sms_default`` / ``fcm_default``), keeps
one connection open for a batch (one SMTP session; for SMS and push one keep-alive urllib3 pool,
push through google-auth's ``AuthorizedHttp``), and is a context manager. ``send(message)`` never
raises for a provider's answer or a network fault: it returns a ``SendResult`` whose ``outcome``
says what to do next (see ``almanac.notify.types.Outcome``). A config that cannot work raises
``ConfigError`` when the sender is built; a message for another channel raises ``ValueError`` (a
bug, not a fault).

Sent, or not, or unknown — each sender tracks how far a request got:

- **email**: the transaction is driven command by command (MAIL, RCPT, DATA, body, reply) rather
  than with ``sendmail``, so a fault is placed exactly. Anything before the message body has been
  handed to the socket in full — refused connection, timeout, dropped session, 4xx — is
  ``failed``; a lost connection or timeout *after* the body's final ``.`` was written and before
  the server's reply is ``uncertain``. 5xx at MAIL/RCPT/DATA is ``dead`` with the server's code
  and text; 530/535 and missing STARTTLS/AUTH are ``dead`` with "check the smtp_default
  connection". A reused session found dropped before MAIL was answered is reopened once. All
  recipients of a message are accepted or the message is not sent (no partial delivery).
  ``Message-ID`` is ``<sha256(idempotency_key)[:32]@almanac>``: a resend is recognisable. The
  message bytes are built directly (the ``email`` package's header parsing and folding cost more
  than the rest of a send); unusual messages (SMTPUTF8, quoted addresses) go through the package.
- **sms**: ``POST {base_url}/2010-04-01/Accounts/{sid}/Messages.json`` with urllib3. 200/201
  sent (``sid``); 429/5xx failed with ``Retry-After``; 401/403/404 dead ("check the sms_default
  connection"); other 4xx dead with Twilio's code and message. A connect failure or connect timeout
  is failed; a read timeout or a connection lost once the request went out is uncertain.
  Why not the ``twilio`` package: its Api domain hard-codes ``https://api.twilio.com`` and its
  ``edge``/``region`` options only rewrite the host to ``api.<edge>.<region>.twilio.com``; pointing
  it at a local server takes overwriting ``client.api.base_url`` or a URL-rewriting ``http_client``
  — patching by another name — and its exceptions hide whether the request was sent. Why urllib3
  rather than ``requests``: the same request on the wire (what ``requests`` sends, less its
  ``User-Agent``) for about a third of the CPU (``requests`` re-reads the proxy environment
  and merges settings on every request); the environment it honoured (``*_PROXY``, ``NO_PROXY``,
  ``REQUESTS_CA_BUNDLE``) is read once per sender.
- **push**: one ``POST {base_url}/v1/projects/{project}/messages:send`` per device token, with an
  OAuth token from the service account's ``token_uri`` (google-auth refreshes it). The collapse key
  / tag / ``apns-collapse-id`` is ``sha256(idempotency_key)[:32]``: a resend replaces the first
  notification on the device. Per message: any device accepted -> sent (``provider_id`` = the first
  ``name``; devices that got a transient error then simply miss it); 404 / ``UNREGISTERED`` /
  ``INVALID_ARGUMENT`` about the token -> that token in ``dead_tokens``; every token gone -> dead;
  no token -> skipped; nothing accepted and a connection lost after sending -> uncertain; else
  429/5xx/``UNAVAILABLE`` -> failed (longest ``Retry-After``); 401/403 (``SENDER_ID_MISMATCH``
  included: disabling devices for a wrong project id would lose them all) or a token endpoint
  refusal -> dead ("check the fcm_default connection").

Errors never hold a full address, number or token (``almanac.notify.redact``). A sender is not
thread-safe: use one per worker thread.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
import hashlib
import json
import logging
import os
import re
import smtplib
import ssl
import urllib.request
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, ClassVar, Literal, Protocol, Self
from urllib.parse import quote, urlencode, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationValueError,
    NewConnectionError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from almanac.errors import ConfigError
from almanac.notify.redact import mask_phone, mask_token, scrub
from almanac.notify.types import Channel, Message, Outcome, SendResult
from almanac.retry import parse_retry_after

__all__ = [
    "FCM_SCOPE",
    "EmailSender",
    "FcmConfig",
    "PushSender",
    "Sender",
    "SmsConfig",
    "SmsSender",
    "SmtpConfig",
    "collapse_key",
    "message_id",
    "open_sender",
]

log = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_MAX_TEXT = 300  # a provider's reason is cut to this many characters
_EMAIL_POLICY = email.policy.SMTP.clone(cte_type="7bit")  # body as quoted-printable: no 8BITMIME needed
_EMAIL_POLICY_UTF8 = email.policy.SMTPUTF8.clone(cte_type="7bit")
_QUEUE_ID = re.compile(rb"queued as\s+<?([\w.@-]+)>?|\bid=([\w.@-]+)", re.IGNORECASE)

Timeout = float | tuple[float, float]


def _digest(idempotency_key: str) -> str:
    return hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]


def message_id(idempotency_key: str) -> str:
    """The email ``Message-ID`` for an outbox row: ``<sha256(key)[:32]@almanac>``."""
    return f"<{_digest(idempotency_key)}@almanac>"


def collapse_key(idempotency_key: str) -> str:
    """The FCM collapse key / notification tag / ``apns-collapse-id``: 32 hex chars (APNs allows 64 bytes)."""
    return _digest(idempotency_key)


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


# -- configs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to send email (``smtp_default``). ``ssl``: implicit TLS (port 465);
    ``starttls``: upgrade a plain session (port 587); never both. ``from_addr`` may carry a name
    (``Almanac <noreply@example.com>``)."""

    host: str
    port: int
    _: KW_ONLY
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = False
    ssl: bool = False
    from_addr: str
    timeout_s: float = 30

    def __post_init__(self) -> None:
        if not self.host or not email.utils.parseaddr(self.from_addr)[1]:
            raise ConfigError("smtp_default: a host and a from address (extra from_email) are required")
        if self.ssl and self.starttls:
            raise ConfigError("smtp_default: choose ssl (implicit TLS) or starttls, not both")


@dataclass(frozen=True, kw_only=True)
class SmsConfig:
    """Twilio's Messages API (``sms_default``): account SID and auth token, and the sender —
    ``messaging_service_sid`` when set, else ``from_number``. ``timeout_s``: (connect, read)."""

    base_url: str = "https://api.twilio.com"
    account_sid: str
    auth_token: str = field(repr=False)
    from_number: str | None = None
    messaging_service_sid: str | None = None
    timeout_s: Timeout = (5, 30)

    def __post_init__(self) -> None:
        if not self.account_sid or not self.auth_token:
            raise ConfigError("sms_default: the account SID (login) and auth token (password) are required")
        if not self.from_number and not self.messaging_service_sid:
            raise ConfigError("sms_default: set extra from_number or messaging_service_sid")


@dataclass(frozen=True, kw_only=True)
class FcmConfig:
    """FCM HTTP v1 (``fcm_default``): the Firebase project and a service-account JSON key (as a dict;
    its ``token_uri`` is where OAuth tokens come from). ``timeout_s``: (connect, read)."""

    base_url: str = "https://fcm.googleapis.com"
    project_id: str
    service_account_info: dict[str, Any] = field(repr=False)
    timeout_s: Timeout = (5, 30)

    def __post_init__(self) -> None:
        if not self.project_id or not self.service_account_info:
            raise ConfigError("fcm_default: project_id and a service account key are required")


# -- the senders -----------------------------------------------------------------------------------


class Sender(Protocol):
    """What the dispatcher uses: one sender per channel and worker, open for a batch."""

    channel: Channel

    def send(self, message: Message) -> SendResult: ...

    def close(self) -> None: ...

    def __enter__(self) -> Sender: ...

    def __exit__(self, *exc: object) -> None: ...


class _Base:
    channel: ClassVar[Channel]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - every sender overrides it
        raise NotImplementedError

    def _check(self, message: Message) -> None:
        if message.channel != self.channel:
            raise ValueError(f"{type(self).__name__} cannot send a {message.channel!r} notification")

    def _done(self, message: Message, result: SendResult) -> SendResult:
        level = logging.WARNING if result.outcome == "uncertain" else (
            logging.DEBUG if result.outcome == "sent" else logging.INFO)
        log.log(level, "%s notification %s: %s%s", self.channel, message.notification_id, result.outcome,
                f" ({result.error})" if result.error else "")
        return result


_SMTP_HINT = "check the smtp_default connection"
Phase = Literal["connect", "mail", "rcpt", "data", "body", "reply"]


class EmailSender(_Base):
    """Email over one SMTP session (``smtplib``), reopened when it drops."""

    channel: ClassVar[Channel] = "email"

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._envelope_from = email.utils.parseaddr(config.from_addr)[1]
        self._smtp: smtplib.SMTP | None = None
        self._from_header = _from_header(config.from_addr)

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    def send(self, message: Message) -> SendResult:
        self._check(message)
        rcpts = tuple(dict.fromkeys(a.strip() for a in message.to if a.strip()))
        if not rcpts:
            return self._done(message, SendResult("skipped", error="no email address"))
        utf8 = not (self._envelope_from.isascii() and all(r.isascii() for r in rcpts))
        try:
            data = self._build(message, rcpts, utf8)
        except (ValueError, TypeError) as exc:
            return self._done(message, SendResult("dead", error=f"cannot build the email: {_cut(str(exc))}"))
        mid = message_id(message.idempotency_key)
        result = self._transaction(data, rcpts, utf8, mid, reused=self._smtp is not None)
        if result is None:  # the kept session had dropped before anything was sent: once more, afresh
            result = self._transaction(data, rcpts, utf8, mid, reused=False)
        assert result is not None
        return self._done(message, result)

    def _build(self, message: Message, rcpts: tuple[str, ...], utf8: bool) -> bytes:
        """The message as sent: built directly when it can be (``_email_bytes``), else by the
        ``email`` package (SMTPUTF8, unusual addresses or subjects)."""
        subject = None if message.subject is None else " ".join(message.subject.split())
        date = email.utils.format_datetime(datetime.now(UTC))
        mid = message_id(message.idempotency_key)
        if not utf8 and self._from_header is not None:
            data = _email_bytes(self._from_header, rcpts, subject, date, mid, message.body)
            if data is not None:
                return data
        return _email_bytes_by_package(self.config.from_addr, rcpts, subject, date, mid, message.body, utf8)

    def _session(self) -> smtplib.SMTP:
        if self._smtp is not None:
            return self._smtp
        cfg = self.config
        if cfg.ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                cfg.host, cfg.port, timeout=cfg.timeout_s, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_s)
        try:
            smtp.ehlo_or_helo_if_needed()
            if cfg.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if cfg.username:
                smtp.login(cfg.username, cfg.password or "")
        except BaseException:
            smtp.close()
            raise
        self._smtp = smtp
        return smtp

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def _transaction(
        self, data: bytes, rcpts: tuple[str, ...], utf8: bool, mid: str, *, reused: bool,
    ) -> SendResult | None:
        """One MAIL..DATA transaction; None when a reused session turned out to be gone before MAIL."""
        phase: Phase = "connect"
        try:
            smtp = self._session()
            if utf8 and not smtp.has_extn("smtputf8"):
                return SendResult("dead", error="non-ASCII address, and the server does not offer SMTPUTF8")
            phase = "mail"
            code, reply = smtp.mail(self._envelope_from, ["SMTPUTF8", "BODY=8BITMIME"] if utf8 else [])
            if code == 421 and reused:
                self._drop()
                return None
            if code != 250:
                return self._refused(code, reply, "MAIL", rcpts)
            phase = "rcpt"
            for rcpt in rcpts:
                code, reply = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    return self._refused(code, reply, "RCPT", rcpts)
            phase = "data"
            code, reply = smtp.docmd("DATA")
            if code != 354:
                return self._refused(code, reply, "DATA", rcpts)
            phase = "body"
            smtp.send(_dot_stuffed(data))  # raises unless every byte, the final "." included, was written
            phase = "reply"
            code, reply = smtp.getreply()
            if code != 250:
                return self._refused(code, reply, "end of DATA", rcpts)
            match = _QUEUE_ID.search(reply)
            queue_id = (match.group(1) or match.group(2)).decode("ascii", "replace") if match else None
            return SendResult("sent", provider_id=queue_id or mid)
        except smtplib.SMTPAuthenticationError as exc:
            self._drop()
            return SendResult("dead", error=f"SMTP {exc.smtp_code} at AUTH: {_smtp_text(exc.smtp_error)}; "
                                            f"{_SMTP_HINT}")
        except smtplib.SMTPNotSupportedError as exc:  # STARTTLS or AUTH asked for, not offered
            self._drop()
            return SendResult("dead", error=f"SMTP: {_cut(str(exc))}; {_SMTP_HINT}")
        except ssl.SSLCertVerificationError as exc:
            self._drop()
            return SendResult("dead", error=f"SMTP TLS: {exc.verify_message}; {_SMTP_HINT}")
        except smtplib.SMTPResponseException as exc:  # refused greeting, HELO or STARTTLS
            self._drop()
            text = _smtp_text(exc.smtp_error, rcpts)
            return SendResult("failed", error=f"SMTP {exc.smtp_code} at {phase}: {text}")
        except (smtplib.SMTPException, OSError) as exc:  # refused, timed out, reset, closed
            self._drop()
            what = _fault(exc)
            if phase == "reply":
                return SendResult("uncertain", error=f"SMTP: {what} after the message was sent, before the "
                                                     "server's reply; it may have been accepted")
            if reused and phase == "mail":
                return None
            return SendResult("failed", error=f"SMTP: {what} at {phase}")

    def _refused(self, code: int, reply: bytes, stage: str, rcpts: tuple[str, ...]) -> SendResult:
        """A refusal, classified; the session is reset for the next message (closed on 421)."""
        error = f"SMTP {code} at {stage}: {_smtp_text(reply, rcpts)}"
        if code == 421:  # the server is closing the session
            self._drop()
        elif stage != "end of DATA" and self._smtp is not None:
            try:
                self._smtp.rset()
            except (smtplib.SMTPException, OSError):
                self._drop()
        if code in (530, 535):
            return SendResult("dead", error=f"{error}; {_SMTP_HINT}")
        if 500 <= code < 600:
            return SendResult("dead", error=error)
        return SendResult("failed", error=error)


def _dot_stuffed(data: bytes) -> bytes:
    """The DATA payload (RFC 5321 §4.5.2): lines starting with "." doubled, CRLF, then "." CRLF."""
    data = data.replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


# -- email bytes -----------------------------------------------------------------------------------
#
# What the ``email`` package (policy SMTP, cte_type 7bit) produces for a plain-text message, built
# without its header parsing and folding (about 0.5 ms a message): the same headers in the same
# order, each parsed back to the same value. Differences in the bytes only: a non-ASCII subject is
# always base64 encoded-words (the package picks q or b), a body that cannot go as 7bit is
# quoted-printable or base64, whichever is shorter for the whole body (the package judges by the
# first ten lines). Anything unusual is left to the package: an SMTPUTF8 message, an address that
# is not a plain ``local@domain``, a subject holding "=?" (the package decodes encoded-words in
# it) or an ASCII control character.

_HEADER_WIDTH = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters, MUST be at most 998
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WORD_BYTES = 39  # UTF-8 bytes per encoded-word: "=?utf-8?b?" + 52 base64 chars + "?=" = 64 chars


def _from_header(from_addr: str) -> bytes | None:
    """The ``From:`` line as the ``email`` package writes it (once per sender); None when it
    cannot be written as ASCII (the package then builds every message)."""
    msg = EmailMessage(policy=_EMAIL_POLICY)
    try:
        msg["From"] = from_addr
        head = msg.as_bytes()
    except (ValueError, TypeError, UnicodeError):
        return None
    return head[: -len(b"\r\n")] if head.endswith(b"\r\n\r\n") and head.isascii() else None


def _subject_line(subject: str) -> bytes | None:
    """``Subject:`` line(s), CRLF included: ASCII folded at spaces, else RFC 2047 base64
    encoded-words (a word never splits a character); None: leave it to the package."""
    if "=?" in subject:
        return None
    if subject.isascii():
        if _ASCII_CONTROL.search(subject):
            return None
        lines, line = [], "Subject:"
        for word in subject.split(" ") if subject else ():
            if len(line) > len("Subject:") and len(line) + 1 + len(word) > _HEADER_WIDTH:
                lines.append(line)
                line = ""
            line = f"{line} {word}"
        lines.append(line)
        if max(map(len, lines)) > 900:  # a word too long for a line: the package encodes it
            return None
        return ("\r\n".join(lines) + "\r\n").encode("ascii")
    try:
        data = subject.encode("utf-8")
    except UnicodeEncodeError:
        return None
    words, pos = [], 0
    while pos < len(data):
        end = min(pos + _WORD_BYTES, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # not inside a character
            end -= 1
        words.append(b"=?utf-8?b?" + base64.b64encode(data[pos:end]) + b"?=")
        pos = end
    return b"Subject: " + b"\r\n ".join(words) + b"\r\n"


def _email_bytes(
    from_line: bytes, rcpts: tuple[str, ...], subject: str | None, date: str, mid: str, body: str,
) -> bytes | None:
    """A text/plain message, CRLF throughout; None when the ``email`` package must build it."""
    if not all(len(r) <= 254 and _PLAIN_ADDRESS.fullmatch(r) for r in rcpts):
        return None
    subject_line = b"" if subject is None else _subject_line(subject)
    if subject_line is None:
        return None
    to, line = [], "To:"
    for i, rcpt in enumerate(rcpts):
        piece = f" {rcpt}" + ("," if i < len(rcpts) - 1 else "")
        if len(line) > len("To:") and len(line) + len(piece) > _HEADER_WIDTH:
            to.append(line)
            line = ""
        line += piece
    to.append(line)
    try:
        raw = body.encode("utf-8")
    except UnicodeEncodeError:
        return None
    lines = raw.splitlines()  # CR, LF and CRLF, as the package splits
    if raw.isascii() and max(map(len, lines), default=0) <= _HEADER_WIDTH:
        cte, payload = b"7bit", b"\r\n".join(lines) + b"\r\n"
    else:
        text = b"\n".join(lines) + b"\n"
        qp = binascii.b2a_qp(text, istext=True)
        b64 = base64.encodebytes(text)
        cte, payload = (b"base64", b64) if len(b64) < len(qp) else (b"quoted-printable", qp)
        payload = payload.replace(b"\n", b"\r\n")
    head = b"".join((
        from_line,
        ("\r\n".join(to) + "\r\n").encode("ascii"),
        subject_line,
        f"Date: {date}\r\nMessage-ID: {mid}\r\n".encode("ascii"),
        b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: ',
        cte,
        b"\r\nMIME-Version: 1.0\r\n\r\n",
    ))
    return head + payload


def _email_bytes_by_package(
    from_addr: str, rcpts: tuple[str, ...], subject: str | None, date: str, mid: str, body: str, utf8: bool,
) -> bytes:
    """The same message built by the ``email`` package (raises ValueError/TypeError when it cannot)."""
    msg = EmailMessage(policy=_EMAIL_POLICY_UTF8 if utf8 else _EMAIL_POLICY)
    msg["From"] = from_addr
    msg["To"] = ", ".join(rcpts)
    if subject is not None:
        msg["Subject"] = subject
    msg["Date"] = date
    msg["Message-ID"] = mid
    msg.set_content(body)
    return msg.as_bytes()


def _smtp_text(reply: bytes | str, rcpts: tuple[str, ...] = ()) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return _cut(scrub(text, rcpts))


def _fault(exc: BaseException) -> str:
    """A network fault in a few words, without hosts, URLs or addresses."""
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, smtplib.SMTPServerDisconnected) or isinstance(exc, ConnectionError):
        return "connection lost"
    return type(exc).__name__


# -- HTTP (SMS and push) ---------------------------------------------------------------------------


#: What ``requests`` sent as ``Accept-Encoding`` (urllib3 decodes what it advertises).
_ACCEPT_ENCODING = ", ".join(
    re.split(r",\s*", urllib3.util.make_headers(accept_encoding=True)["accept-encoding"]))
_USER_AGENT = f"python-urllib3/{urllib3.__version__}"


def _urllib3_timeout(timeout: Timeout) -> urllib3.Timeout:
    if isinstance(timeout, tuple):
        return urllib3.Timeout(connect=timeout[0], read=timeout[1])
    return urllib3.Timeout(connect=timeout, read=timeout)


class _Copyable:
    """``copy.deepcopy`` makes a fresh manager with the same settings. google-auth deep-copies the
    transport it is given for its background Regional Access Boundary lookup; a urllib3 manager
    holds a lock and cannot be copied, and google-auth would then retry the copy on every request
    (about 70 us each) instead of looking up once and entering its cooldown, as with ``requests``."""

    _args: tuple[Any, ...]
    _kw: dict[str, Any]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return type(self)(*self._args, **self._kw)


class _PoolManager(_Copyable, urllib3.PoolManager):
    def __init__(self, **kw: Any) -> None:
        self._args, self._kw = (), kw
        super().__init__(**kw)


class _ProxyManager(_Copyable, urllib3.ProxyManager):
    def __init__(self, proxy_url: str, **kw: Any) -> None:
        self._args, self._kw = (proxy_url,), kw
        super().__init__(proxy_url, **kw)


def _pool_manager(url: str, timeout: Timeout) -> tuple[urllib3.PoolManager, bool]:
    """A urllib3 manager for a sender: keep-alive (one idle connection kept), no retries, no
    redirects, the default timeout ``timeout`` (the OAuth token requests get it too). What
    ``requests`` read from the environment is read once here: a proxy from ``HTTP(S)_PROXY`` unless
    ``NO_PROXY`` names the host, and the CA bundle from ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``
    (else certifi's, as ``requests``). Returns (manager, whether it goes through a proxy)."""
    kw: dict[str, Any] = {
        "num_pools": 2, "maxsize": 1, "retries": False, "timeout": _urllib3_timeout(timeout)}
    ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not ca:
        try:
            import certifi

            ca = certifi.where()
        except ImportError:  # pragma: no cover - certifi comes with requests
            ca = None
    if ca:
        kw["ca_certs"] = ca
    try:
        split = urlsplit(url)
        host = split.hostname
    except ValueError:  # an invalid URL: the sender answers dead, no proxy to look up
        split, host = None, None
    proxy = urllib.request.getproxies().get(split.scheme) if split and host else None
    if proxy and not urllib.request.proxy_bypass(host or ""):
        return _ProxyManager(proxy, **kw), True
    return _PoolManager(**kw), False


def _network_outcome(exc: HTTPError, service: str, hint: str) -> tuple[Outcome, str]:
    """(outcome, error) for a urllib3 fault: failed if the request never left, else uncertain."""
    if isinstance(exc, NewConnectionError):  # refused, unreachable, name not resolved: nothing was sent
        return "failed", f"{service}: cannot connect ({type(exc).__name__})"
    if isinstance(exc, ConnectTimeoutError):
        return "failed", f"{service}: connect timeout"
    if isinstance(exc, ReadTimeoutError):
        return "uncertain", f"{service}: no answer in time after the request was sent; it may be accepted"
    if isinstance(exc, LocationValueError):
        return "dead", f"{service}: invalid URL; {hint}"
    if isinstance(exc, (SSLError, ProxyError)):
        return "failed", f"{service}: {type(exc).__name__} while connecting"
    return "uncertain", f"{service}: connection lost after the request was sent ({type(exc).__name__}); " \
                        "it may have been accepted"


def _json(data: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _bad_url(url: str) -> bool:
    try:
        parsed = urllib3.util.parse_url(url)
    except LocationValueError:
        return True
    return parsed.scheme not in ("http", "https") or not parsed.host


# -- SMS ------------------------------------------------------------------------------------------


_SMS_HINT = "check the sms_default connection"


class SmsSender(_Base):
    """SMS through Twilio's Messages API (or anything with its shape) over one keep-alive urllib3
    connection pool. The request is what ``requests`` sent (same headers in the same order, the
    form encoded the same way), except ``User-Agent``: urllib3's."""

    channel: ClassVar[Channel] = "sms"

    def __init__(self, config: SmsConfig) -> None:
        self.config = config
        self._url = (f"{config.base_url.rstrip('/')}/2010-04-01/Accounts/"
                     f"{quote(config.account_sid, safe='')}/Messages.json")
        try:
            basic = base64.b64encode(f"{config.account_sid}:{config.auth_token}".encode("latin1")).decode()
        except UnicodeEncodeError as exc:
            raise ConfigError("sms_default: the account SID and auth token must be Latin-1 text") from exc
        self._auth = f"Basic {basic}"
        self._invalid = _bad_url(self._url)
        self._manager, proxied = _pool_manager(self._url, config.timeout_s)
        self._timeout = _urllib3_timeout(config.timeout_s)
        # Straight to the one connection pool (no per-request URL parsing and pool lookup), unless
        # a forward proxy needs the absolute URL.
        self._target: Any = self._manager
        self._target_url = self._url
        if not self._invalid and not proxied:
            self._target = self._manager.connection_from_url(self._url)
            self._target_url = urllib3.util.parse_url(self._url).request_uri

    def close(self) -> None:
        self._manager.clear()

    def send(self, message: Message) -> SendResult:
        self._check(message)
        numbers = [n.strip() for n in message.to if n.strip()]
        if not numbers:
            return self._done(message, SendResult("skipped", error="no phone number"))
        if len(numbers) > 1:
            error = f"an SMS goes to one number, got {len(numbers)}"
            return self._done(message, SendResult("dead", error=error))
        number = numbers[0]
        if self._invalid:
            error = f"Twilio: invalid URL; {_SMS_HINT} (to {mask_phone(number)})"
            return self._done(message, SendResult("dead", error=error))
        form = {"To": number, "Body": message.body}
        if self.config.messaging_service_sid:
            form["MessagingServiceSid"] = self.config.messaging_service_sid
        else:
            form["From"] = self.config.from_number or ""
        body = urlencode(form).encode("ascii")
        headers = {  # requests' headers, in its order
            "User-Agent": _USER_AGENT,
            "Accept-Encoding": _ACCEPT_ENCODING,
            "Accept": "application/json",
            "Connection": "keep-alive",
            "Content-Length": str(len(body)),
            "Content-Type": "application/x-www-form-urlencoded",
            "Authorization": self._auth,
        }
        try:
            resp = self._target.urlopen(
                "POST", self._target_url, body=body, headers=headers, timeout=self._timeout,
                retries=False, redirect=False, assert_same_host=False,
            )
        except HTTPError as exc:
            outcome, error = _network_outcome(exc, "Twilio", _SMS_HINT)
            return self._done(message, SendResult(outcome, error=f"{error} (to {mask_phone(number)})"))
        return self._done(message, self._classify(resp.status, resp.headers, resp.data, number))

    def _classify(self, status: int, headers: Any, data: bytes, number: str) -> SendResult:
        payload = _json(data)
        if status in (200, 201):
            sid = payload.get("sid")
            return SendResult("sent", provider_id=str(sid) if sid else None)
        code, text = payload.get("code"), payload.get("message")
        reason = f"Twilio {code}: {text}" if code and text else f"Twilio HTTP {status}"
        reason = _cut(scrub(reason, (number,)))
        if status == 429 or status >= 500:
            wait = parse_retry_after(headers.get("Retry-After"))
            return SendResult("failed", error=reason, retry_after_s=wait)
        if status in (401, 403, 404) or 300 <= status < 400:
            return SendResult("dead", error=f"{reason} (HTTP {status}); {_SMS_HINT}")
        if 400 <= status < 500:
            return SendResult("dead", error=reason)
        return SendResult("failed", error=f"{reason}: unexpected answer")


# -- push ------------------------------------------------------------------------------------------

_FCM_HINT = "check the fcm_default connection"
_FCM_TRANSIENT = frozenset({"UNAVAILABLE", "INTERNAL", "QUOTA_EXCEEDED"})
_FCM_CONFIG = frozenset(
    {"SENDER_ID_MISMATCH", "THIRD_PARTY_AUTH_ERROR", "PERMISSION_DENIED", "UNAUTHENTICATED"})

#: What one device's answer came to: accepted, gone (disable the token), rejected (permanent for this
#: message), transient, maybe (sent, no answer), config (stop: every device would get the same).
_Kind = Literal["accepted", "gone", "rejected", "transient", "maybe", "config"]


@dataclass(frozen=True)
class _Answer:
    kind: _Kind
    error: str | None = None
    name: str | None = None
    retry_after_s: float | None = None
    stop: bool = False  # the next devices would get the same: do not try them


class PushSender(_Base):
    """Push through FCM HTTP v1 over one google-auth ``AuthorizedHttp`` (service-account OAuth) on a
    keep-alive urllib3 pool. The request is what ``requests``' ``AuthorizedSession`` sent (same
    headers, the JSON encoded the same way), except ``User-Agent`` (urllib3's) and the place of
    ``authorization`` among the headers (last: google-auth adds it to the headers it is given)."""

    channel: ClassVar[Channel] = "push"

    def __init__(self, config: FcmConfig) -> None:
        from google.auth.transport.urllib3 import AuthorizedHttp
        from google.oauth2 import service_account

        self.config = config
        try:
            credentials = service_account.Credentials.from_service_account_info(
                dict(config.service_account_info), scopes=[FCM_SCOPE])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"fcm_default: the service account key is unusable ({type(exc).__name__}); "
                              "give the JSON key file Google issued") from exc
        project = quote(config.project_id, safe="")
        self._url = f"{config.base_url.rstrip('/')}/v1/projects/{project}/messages:send"
        self._invalid = _bad_url(self._url)
        self._manager, _proxied = _pool_manager(self._url, config.timeout_s)
        self._timeout = _urllib3_timeout(config.timeout_s)
        self._http = AuthorizedHttp(credentials, http=self._manager)

    def close(self) -> None:
        self._manager.clear()

    def send(self, message: Message) -> SendResult:
        self._check(message)
        tokens = tuple(dict.fromkeys(t.strip() for t in message.to if t.strip()))
        if not tokens:
            return self._done(message, SendResult("skipped", error="no active device"))
        answers: list[tuple[str, _Answer]] = []
        for token in tokens:
            answer = self._send_one(message, token)
            answers.append((token, answer))
            if answer.stop:
                break
        return self._done(message, _aggregate(answers, len(tokens)))

    def _payload(self, message: Message, token: str) -> dict[str, Any]:
        key = collapse_key(message.idempotency_key)
        notification = {"body": message.body}
        if message.subject is not None:
            notification["title"] = message.subject
        body: dict[str, Any] = {
            "token": token,
            "notification": notification,
            "android": {"collapse_key": key, "notification": {"tag": key}},
            "apns": {"headers": {"apns-collapse-id": key}},
        }
        if message.data:
            body["data"] = {str(k): str(v) for k, v in message.data.items()}
        return {"message": body}

    def _send_one(self, message: Message, token: str) -> _Answer:
        from google.auth import exceptions as gexc

        device = f"device {mask_token(token)}"
        if self._invalid:
            return _Answer("config", f"FCM: invalid URL; {_FCM_HINT} ({device})", stop=True)
        body = json.dumps(self._payload(message, token), allow_nan=False).encode("utf-8")
        headers = {  # requests' headers, in its order (google-auth adds ``authorization``)
            "User-Agent": _USER_AGENT,
            "Accept-Encoding": _ACCEPT_ENCODING,
            "Accept": "*/*",
            "Connection": "keep-alive",
            "Content-Length": str(len(body)),
            "Content-Type": "application/json",
        }
        try:
            resp = self._http.urlopen(
                "POST", self._url, body=body, headers=headers, timeout=self._timeout,
                retries=False, redirect=False,
            )
        except gexc.RefreshError as exc:  # the token endpoint answered, and not with a token
            data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
            what = data.get("error") or "refused"
            if exc.retryable:
                return _Answer("transient", f"FCM token endpoint: {what}, try later", stop=True)
            return _Answer("config", f"FCM token endpoint refused the service account ({what}); {_FCM_HINT}",
                           stop=True)
        except gexc.TransportError as exc:  # the token endpoint was not reached: nothing was sent
            return _Answer("transient", f"FCM token endpoint unreachable ({type(exc).__name__})", stop=True)
        except HTTPError as exc:
            outcome, error = _network_outcome(exc, "FCM", _FCM_HINT)
            if outcome == "uncertain":
                return _Answer("maybe", f"{error} ({device})")
            return _Answer("config" if outcome == "dead" else "transient", f"{error} ({device})", stop=True)
        return _classify_fcm(resp.status, resp.headers, resp.data, token, device)


def _classify_fcm(status: int, headers: Any, data: bytes, token: str, device: str) -> _Answer:
    payload = _json(data)
    if status == 200:
        return _Answer("accepted", name=str(payload.get("name") or "") or None)
    err = payload.get("error") if isinstance(payload.get("error"), dict) else {}
    fcm_code = next((d.get("errorCode") for d in err.get("details") or ()
                     if isinstance(d, dict) and str(d.get("@type", "")).endswith("FcmError")), None)
    code = fcm_code or err.get("status") or f"HTTP {status}"
    error = _cut(scrub(f"FCM {code}: {err.get('message') or 'no message'} ({device})", (token,)))
    if status == 404 or fcm_code == "UNREGISTERED":
        return _Answer("gone", error)
    if status == 400 and code == "INVALID_ARGUMENT" and _about_token(err):
        return _Answer("gone", error)
    if status == 429 or status >= 500 or code in _FCM_TRANSIENT:
        return _Answer("transient", error, retry_after_s=parse_retry_after(headers.get("Retry-After")))
    if status in (401, 403) or code in _FCM_CONFIG or 300 <= status < 400:
        return _Answer("config", f"{error}; {_FCM_HINT}", stop=True)
    return _Answer("rejected", error)


def _about_token(err: dict[str, Any]) -> bool:
    """Whether an INVALID_ARGUMENT is about the registration token (not the payload)."""
    if "registration token" in str(err.get("message", "")).lower():
        return True
    for detail in err.get("details") or ():
        for violation in (detail.get("fieldViolations") or ()) if isinstance(detail, dict) else ():
            if isinstance(violation, dict) and violation.get("field") == "message.token":
                return True
    return False


def _aggregate(answers: list[tuple[str, _Answer]], total: int) -> SendResult:
    gone = tuple(token for token, a in answers if a.kind == "gone")
    by_kind: dict[str, list[_Answer]] = {}
    for _, answer in answers:
        by_kind.setdefault(answer.kind, []).append(answer)
    if "accepted" in by_kind:
        return SendResult("sent", provider_id=by_kind["accepted"][0].name, dead_tokens=gone)
    if "maybe" in by_kind:  # before "config": a device may have it, so an operator must not just resend
        return SendResult("uncertain", error=by_kind["maybe"][0].error, dead_tokens=gone)
    if "config" in by_kind:
        return SendResult("dead", error=by_kind["config"][0].error, dead_tokens=gone)
    if "transient" in by_kind:
        waits = [a.retry_after_s for a in by_kind["transient"] if a.retry_after_s is not None]
        return SendResult("failed", error=by_kind["transient"][0].error,
                          retry_after_s=max(waits) if waits else None, dead_tokens=gone)
    if len(gone) == total:
        return SendResult("dead", error=f"no active device: all {total} unregistered ({answers[0][1].error})",
                          dead_tokens=gone)
    return SendResult("dead", error=by_kind["rejected"][0].error, dead_tokens=gone)


def open_sender(config: SmtpConfig | SmsConfig | FcmConfig) -> Sender:
    """The sender for ``config``'s channel (not yet connected: it connects on its first send)."""
    if isinstance(config, SmtpConfig):
        return EmailSender(config)
    if isinstance(config, SmsConfig):
        return SmsSender(config)
    if isinstance(config, FcmConfig):
        return PushSender(config)
    raise TypeError(f"no sender for {type(config).__name__}")


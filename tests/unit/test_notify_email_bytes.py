"""almanac.notify.channels: the email bytes built without the ``email`` package's folding, checked
against what the package builds (the reference below is the sender's former ``_build``): parsed
back with ``policy=default``, every header and the body are the same, and the bytes are RFC 5322
(CRLF only, lines <= 998, ASCII unless SMTPUTF8)."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from email.message import EmailMessage

import pytest

from almanac.notify.channels import EmailSender, SmtpConfig, message_id
from almanac.notify.types import Message

_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_POLICY_UTF8 = email.policy.SMTPUTF8.clone(cte_type="7bit")


def reference(from_addr: str, rcpts: tuple[str, ...], message: Message, date: str, utf8: bool) -> bytes:
    """What the sender built with the ``email`` package before (its former ``_build``)."""
    msg = EmailMessage(policy=_POLICY_UTF8 if utf8 else _POLICY)
    msg["From"] = from_addr
    msg["To"] = ", ".join(rcpts)
    if message.subject is not None:
        msg["Subject"] = " ".join(message.subject.split())
    msg["Date"] = date
    msg["Message-ID"] = message_id(message.idempotency_key)
    msg.set_content(message.body)
    return msg.as_bytes()


LONG_WORDS = " ".join(f"word{i}" for i in range(60))
CORPUS = {
    "ascii": ("Your week", "Hello Alice.\nSee you soon.\n"),
    "no subject": (None, "hi"),
    "empty subject": ("", "hi"),
    "whitespace in the subject": ("  Your \t week\n  ahead  ", "x"),
    "non-ascii subject": ("Café ☕ résumé", "plain body"),
    "cjk subject": ("会議のお知らせ：明日の午後三時から第二会議室で行います", "本文です。\n"),
    "emoji only": ("🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉", "🎉"),
    "combining marks": ("e\u0301" * 40, "x"),
    "nbsp in the subject": ("Price:\u00a010\u00a0€", "x"),
    "long ascii subject": (LONG_WORDS, "x"),
    "long non-ascii subject": ("Überraschung für dich " * 20, "x"),
    "a long word in the subject": ("see https://example.com/" + "a" * 120 + " now", "x"),
    "a word too long for a line": ("b" * 950, "x"),
    "an encoded-word in the subject": ("=?utf-8?q?hi?= there", "x"),
    "a control character in the subject": ("bell \x07 here", "x"),
    "non-ascii body": ("Hi", "Привет, мир!\nCafé ☕\n" * 5),
    "mostly non-ascii long body": ("Hi", "Привет мир " * 300),
    "long ascii body lines": ("Hi", ("x" * 200 + "\n") * 3 + "short\n"),
    "a very long unbroken line": ("Hi", "y" * 5000),
    "dots at line start": ("Hi", ".\n.a line that starts with a dot\n..two\nend.\n.\n"),
    "cr and crlf line ends": ("Hi", "one\r\ntwo\rthree\nfour"),
    "trailing spaces and tabs": ("Hi", "trailing   \nand\ttab\t\n \n"),
    "empty body": ("Hi", ""),
    "no final newline": ("Hi", "last line"),
    "from at line start": ("Hi", "From here\n>From there\n"),
    "equals and qp-looking text": ("Hi", "a=b =3D c=\nsoft=\n" + "é" * 10),
}
FROMS = [
    "Almanac <noreply@almanac.test>",
    "noreply@almanac.test",
    "Café Team <noreply@almanac.test>",
    '"Almanac, the app" <noreply@almanac.test>',
]
RCPTS = {
    "one": ("alice@example.com",),
    "several": tuple(f"someone.with.a.long.name{i}@subdomain.example.com" for i in range(5)),
    "plus and dots": ("a.b+tag@example.co.uk",),
    "quoted local part": ('"john doe"@example.com',),
    "smtputf8": ("josé@exämple.com",),
}


def built(sender: EmailSender, message: Message) -> tuple[bytes, bool, tuple[str, ...]]:
    rcpts = tuple(dict.fromkeys(a.strip() for a in message.to if a.strip()))
    utf8 = not all(r.isascii() for r in rcpts)
    return sender._build(message, rcpts, utf8), utf8, rcpts


def headers(data: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return [(k, str(v)) for k, v in msg.items() if k != "Content-Transfer-Encoding"]


def content(data: bytes):
    """Type, charset, text (line ends as LF: the package's quoted-printable of a short body encodes
    its line breaks as CRLF, so it decodes to CRLF; a 7bit or base64 one decodes to LF) and CTE."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    text = msg.get_content().replace("\r\n", "\n")
    return msg.get_content_type(), msg.get_content_charset(), text, msg["Content-Transfer-Encoding"]


def well_formed(data: bytes, utf8: bool) -> None:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b""), "a bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "a bare CR"
    lines = data.split(b"\r\n")
    assert max(map(len, lines)) <= 998
    if not utf8:
        assert data.isascii()
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        assert re.match(rb"[\x21-\x39\x3b-\x7e]+:|[ \t]", line), line  # a field or a continuation


@pytest.mark.parametrize("rcpt_kind", list(RCPTS))
@pytest.mark.parametrize("from_addr", FROMS)
@pytest.mark.parametrize("case", list(CORPUS))
def test_the_bytes_parse_back_to_what_the_email_package_built(case, from_addr, rcpt_kind):
    subject, body = CORPUS[case]
    sender = EmailSender(SmtpConfig("127.0.0.1", 25, from_addr=from_addr))
    message = Message(1, f"digest:{case}", "email", RCPTS[rcpt_kind], subject, body)
    data, utf8, rcpts = built(sender, message)
    date = email.message_from_bytes(data, policy=email.policy.default)["Date"]
    expected = reference(from_addr, rcpts, message, str(date), utf8)
    well_formed(data, utf8)
    assert headers(data) == headers(expected)
    ours, theirs = content(data), content(expected)
    assert ours[:3] == theirs[:3]
    assert ours[3] in ("7bit", "quoted-printable", "base64")
    if theirs[3] == "7bit":
        assert ours[3] == "7bit"


def test_the_common_message_is_built_without_the_email_package():
    """The plain case takes the direct path (the one that saves the CPU), and for an ASCII
    message it gives the package's bytes exactly."""
    from almanac.notify.channels import _email_bytes, _from_header

    from_addr = "Almanac <noreply@almanac.test>"
    message = Message(1, "digest:7", "email", ("alice@example.com",), "Your week", "Hello Alice.\n")
    date = email.utils.format_datetime(email.utils.localtime())
    mid = message_id("digest:7")
    data = _email_bytes(_from_header(from_addr), message.to, message.subject, date, mid, message.body)
    assert data is not None
    assert data == reference(from_addr, message.to, message, date, False)
    sender = EmailSender(SmtpConfig("127.0.0.1", 25, from_addr=from_addr))
    assert built(sender, message)[0].split(b"Date:")[0] == data.split(b"Date:")[0]

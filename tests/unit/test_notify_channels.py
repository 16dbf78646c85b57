"""almanac.notify.channels: each sender drives its real client (smtplib, requests, google-auth)
over a socket to the local provider fakes (almanac.notify.fakes), one test per classification."""

from __future__ import annotations

import contextlib
import email
import email.policy
import logging
import re
import socket
import time

import pytest

from almanac.errors import ConfigError
from almanac.notify.channels import (
    EmailSender,
    FcmConfig,
    PushSender,
    SmsConfig,
    SmsSender,
    SmtpConfig,
    collapse_key,
    message_id,
    open_sender,
)
from almanac.notify.fakes import FakeFcm, FakeSmtpServer, FakeTwilio
from almanac.notify.redact import mask_email, mask_phone, mask_token, scrub
from almanac.notify.types import Message

FROM = "Almanac <noreply@almanac.test>"


def ours(caplog) -> str:
    """What Almanac's own loggers wrote (the fakes' servers, aiosmtpd's ``mail.log`` above all,
    log what they receive)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("almanac.notify.channels"))


def email_msg(to: str = "alice@example.com", key: str = "digest:7:2026-01-05", n: int = 1, **kw) -> Message:
    fields = {"subject": "Your week", "body": "Hello Alice.\n.a line that starts with a dot\nCafé ☕"}
    fields.update(kw)
    return Message(n, key, "email", (to,) if to else (), **fields)


def sms_msg(to: str = "+15557654321", key: str = "sms:1", n: int = 1) -> Message:
    return Message(n, key, "sms", (to,) if to else (), None, "Your code is 1234")


def push_msg(*tokens: str, key: str = "push:chat:42", n: int = 1) -> Message:
    return Message(n, key, "push", tokens, "New message", "Bob: see you at 6", {"chat_id": "42"})


@contextlib.contextmanager
def closed_port():
    """A port nobody listens on: connecting is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    yield port


@contextlib.contextmanager
def silent_listener():
    """Accepts TCP connections (the kernel does) and never says a word."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


@contextlib.contextmanager
def full_backlog():
    """A listener whose accept queue is full: a new connection's SYN is dropped, so connect() times out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.1)
        try:
            yield listener.getsockname()[1]
        finally:
            for filler in fillers:
                filler.close()


# -- email -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smtp_server():
    with FakeSmtpServer(slow_seconds=3) as server:
        yield server


@pytest.fixture
def smtp(smtp_server):
    smtp_server.reset()
    yield smtp_server
    smtp_server.reset()


def smtp_config(port: int, **kw) -> SmtpConfig:
    return SmtpConfig("127.0.0.1", port, **{"from_addr": FROM, "timeout_s": 5, **kw})


def test_email_is_sent_with_headers_and_a_message_id_derived_from_the_key(smtp, caplog):
    caplog.set_level(logging.DEBUG, logger="almanac.notify.channels")
    with EmailSender(smtp_config(smtp.port, username="almanac", password="s3cret")) as sender:
        result = sender.send(email_msg())
    assert result.outcome == "sent"
    (got,) = smtp.received
    assert result.provider_id == got.queue_id  # the server's queue id, from "250 OK queued as <id>"
    assert got.mail_from == "noreply@almanac.test" and got.rcpt_tos == ("alice@example.com",)
    assert got.auth_user == "almanac"
    parsed = email.message_from_bytes(got.raw, policy=email.policy.default)
    assert parsed["Message-ID"] == message_id("digest:7:2026-01-05") == got.message_id
    assert parsed["Message-ID"].startswith("<") and parsed["Message-ID"].endswith("@almanac>")
    assert len(parsed["Message-ID"]) == len("<@almanac>") + 32
    assert parsed["From"] == FROM and parsed["To"] == "alice@example.com" and parsed["Subject"] == "Your week"
    assert parsed["Date"].datetime.tzinfo is not None
    body = parsed.get_content().replace("\r\n", "\n")
    assert body == "Hello Alice.\n.a line that starts with a dot\nCafé ☕\n"
    assert "alice@example.com" not in ours(caplog)


def test_a_resend_carries_the_same_message_id(smtp):
    with EmailSender(smtp_config(smtp.port)) as sender:
        assert sender.send(email_msg(n=1)).outcome == "sent"
        assert sender.send(email_msg(n=1)).outcome == "sent"
        assert sender.send(email_msg(key="digest:8:2026-01-05", n=2)).outcome == "sent"
    ids = [m.message_id for m in smtp.received]
    assert ids[0] == ids[1] != ids[2]


def test_one_session_carries_a_batch(smtp):
    with EmailSender(smtp_config(smtp.port)) as sender:
        assert sender.send(email_msg(n=1)).outcome == "sent"
        session = sender._smtp
        assert sender.send(email_msg(to="bob@example.com", key="k2", n=2)).outcome == "sent"
        assert sender._smtp is session is not None
    assert sender._smtp is None  # closed by the context manager
    assert [m.rcpt_tos for m in smtp.received] == [("alice@example.com",), ("bob@example.com",)]


def test_a_session_dropped_between_messages_is_reopened_once(smtp):
    with EmailSender(smtp_config(smtp.port)) as sender:
        assert sender.send(email_msg(n=1)).outcome == "sent"
        smtp.stop()  # cuts the kept session; the server comes back on the same port
        smtp.start()
        result = sender.send(email_msg(key="k2", n=2))
    assert result.outcome == "sent", result
    assert len(smtp.received) == 2


def test_a_server_gone_for_good_fails_without_looping(smtp):
    with EmailSender(smtp_config(smtp.port)) as sender:
        assert sender.send(email_msg(n=1)).outcome == "sent"
        smtp.stop()
        try:
            result = sender.send(email_msg(key="k2", n=2))
        finally:
            smtp.start()
    assert result.outcome == "failed"
    assert "connection refused at connect" in result.error


def test_a_rejected_recipient_is_dead_with_the_servers_reason_and_a_masked_address(smtp):
    with EmailSender(smtp_config(smtp.port)) as sender:
        result = sender.send(email_msg(to="reject+ann@example.com"))
        assert sender.send(email_msg(key="k2", n=2)).outcome == "sent"  # the session was reset, still usable
    assert result.outcome == "dead"
    assert result.error.startswith("SMTP 550 at RCPT: 5.1.1 mailbox unavailable")
    assert "reject+ann@" not in result.error
    assert len(smtp.received) == 1


def test_a_busy_recipient_is_failed_for_a_retry(smtp):
    with EmailSender(smtp_config(smtp.port)) as sender:
        result = sender.send(email_msg(to="busy+ann@example.com"))
    assert result.outcome == "failed"
    assert result.error.startswith("SMTP 451 at RCPT")
    assert smtp.received == []


@pytest.mark.parametrize(("code", "outcome"), [(451, "failed"), (554, "dead")])
def test_a_reply_to_the_message_body_is_classified_by_its_code(smtp, code, outcome):
    smtp.fail_next(1, code, at="data")
    with EmailSender(smtp_config(smtp.port)) as sender:
        result = sender.send(email_msg())
    assert result.outcome == outcome
    assert result.error.startswith(f"SMTP {code} at end of DATA")


def test_an_authentication_refusal_at_rcpt_is_dead_and_names_the_connection(smtp):
    smtp.fail_next(1, 530, "5.7.0 Authentication required", at="rcpt")
    with EmailSender(smtp_config(smtp.port)) as sender:
        result = sender.send(email_msg())
    assert result.outcome == "dead"
    assert "530" in result.error and "check the smtp_default connection" in result.error


def test_a_connection_lost_after_the_body_was_sent_is_uncertain(smtp):
    with EmailSender(smtp_config(smtp.port)) as sender:
        result = sender.send(email_msg(to="drop+ann@example.com"))
        after = sender.send(email_msg(key="k2", n=2))  # a fresh session for the next message
    assert result.outcome == "uncertain"
    assert "after the message was sent" in result.error
    assert [m.answer for m in smtp.received] == ["dropped", "queued"]  # it did reach the server
    assert after.outcome == "sent"


def test_a_timeout_waiting_for_the_reply_to_the_body_is_uncertain(smtp):
    with EmailSender(smtp_config(smtp.port, timeout_s=0.5)) as sender:
        result = sender.send(email_msg(to="slow+ann@example.com"))
    assert result.outcome == "uncertain"
    assert "timed out after the message was sent" in result.error


def test_a_timeout_before_anything_was_sent_is_failed():
    with silent_listener() as port, EmailSender(smtp_config(port, timeout_s=0.5)) as sender:
        result = sender.send(email_msg())
    assert result.outcome == "failed"
    assert result.error == "SMTP: timed out at connect"


def test_a_refused_connection_is_failed():
    with closed_port() as port, EmailSender(smtp_config(port)) as sender:
        result = sender.send(email_msg())
    assert (result.outcome, result.error) == ("failed", "SMTP: connection refused at connect")


def test_a_login_refused_is_dead_and_names_the_connection():
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    # aiosmtpd itself, configured to refuse every login (the fake accepts any): a real 535 after AUTH.
    with closed_port() as port:
        controller = Controller(object(), hostname="127.0.0.1", port=port, auth_require_tls=False,
                                authenticator=lambda *args: AuthResult(success=False, handled=False))
    controller.start()
    try:
        with EmailSender(smtp_config(port, username="almanac", password="wrong")) as sender:
            result = sender.send(email_msg())
    finally:
        controller.stop()
    assert result.outcome == "dead"
    assert result.error.startswith("SMTP 535 at AUTH")
    assert result.error.endswith("check the smtp_default connection")
    assert "wrong" not in result.error


def test_starttls_asked_of_a_server_that_does_not_offer_it_is_dead(smtp):
    with EmailSender(smtp_config(smtp.port, starttls=True)) as sender:
        result = sender.send(email_msg())
    assert result.outcome == "dead"
    assert "STARTTLS" in result.error and "check the smtp_default connection" in result.error


def test_no_address_is_skipped_and_a_wrong_channel_is_a_bug(smtp):
    with EmailSender(smtp_config(smtp.port)) as sender:
        assert sender.send(email_msg(to="")).outcome == "skipped"
        with pytest.raises(ValueError):
            sender.send(sms_msg())
    assert smtp.received == []


def test_an_impossible_smtp_config_is_refused_when_built():
    with pytest.raises(ConfigError):
        SmtpConfig("smtp.example.com", 465, ssl=True, starttls=True, from_addr=FROM)
    with pytest.raises(ConfigError):
        SmtpConfig("smtp.example.com", 25, from_addr="")


# -- SMS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twilio_server():
    with FakeTwilio(slow_seconds=3) as server:
        yield server


@pytest.fixture
def twilio(twilio_server):
    twilio_server.reset()
    yield twilio_server
    twilio_server.reset()


def sms_config(twilio: FakeTwilio, **kw) -> SmsConfig:
    fields = {"base_url": twilio.url, "account_sid": twilio.account_sid, "auth_token": twilio.auth_token,
              "from_number": "+15550009999", "timeout_s": (2, 5)}
    fields.update(kw)
    return SmsConfig(**fields)


def test_sms_is_sent_and_the_provider_id_is_twilios_sid(twilio, caplog):
    caplog.set_level(logging.DEBUG, logger="almanac.notify.channels")
    with SmsSender(sms_config(twilio)) as sender:
        first = sender.send(sms_msg())
        second = sender.send(sms_msg(to="+15557654322", key="sms:2", n=2))
    assert first.outcome == second.outcome == "sent"
    got = twilio.received
    assert [r["sid"] for r in got] == [first.provider_id, second.provider_id]
    assert first.provider_id.startswith("SM") and len(first.provider_id) == 34
    assert (got[0]["to"], got[0]["from"]) == ("+15557654321", "+15550009999")
    assert got[0]["body"] == "Your code is 1234"
    assert "+15557654321" not in ours(caplog)


def test_a_messaging_service_replaces_the_from_number(twilio):
    service = "MG" + "0" * 32
    with SmsSender(sms_config(twilio, messaging_service_sid=service)) as sender:
        assert sender.send(sms_msg()).outcome == "sent"
    (got,) = twilio.received
    assert got["messaging_service_sid"] == service and got["from"] is None


def test_an_invalid_number_is_dead_with_twilios_code_and_a_masked_number(twilio):
    with SmsSender(sms_config(twilio)) as sender:
        result = sender.send(sms_msg(to=FakeTwilio.INVALID))
    assert result.outcome == "dead"
    assert result.error == "Twilio 21211: The 'To' number +1555***0001 is not a valid phone number."
    assert twilio.received == []


def test_an_unsubscribed_recipient_is_dead(twilio):
    with SmsSender(sms_config(twilio)) as sender:
        result = sender.send(sms_msg(to=FakeTwilio.UNSUBSCRIBED))
    assert result.outcome == "dead"
    assert result.error == "Twilio 21610: Attempt to send to unsubscribed recipient"


def test_429_is_failed_with_retry_after(twilio):
    with SmsSender(sms_config(twilio)) as sender:
        result = sender.send(sms_msg(to=FakeTwilio.RATE_LIMITED))
    assert (result.outcome, result.retry_after_s) == ("failed", 2.0)
    assert result.error.startswith("Twilio 20429")


def test_5xx_is_failed_and_an_http_date_retry_after_is_read(twilio):
    with SmsSender(sms_config(twilio)) as sender:
        unavailable = sender.send(sms_msg(to=FakeTwilio.UNAVAILABLE))
        twilio.fail_next(1, 500, retry_after=30)
        injected = sender.send(sms_msg())
    assert unavailable.outcome == "failed" and unavailable.retry_after_s is None
    assert unavailable.error.startswith("Twilio 20503")
    assert (injected.outcome, injected.retry_after_s) == ("failed", 30.0)


def test_bad_credentials_are_dead_and_name_the_connection(twilio):
    with SmsSender(sms_config(twilio, auth_token="not-the-token")) as sender:
        result = sender.send(sms_msg())
    assert result.outcome == "dead"
    assert result.error == "Twilio 20003: Authenticate (HTTP 401); check the sms_default connection"
    assert "not-the-token" not in result.error


def test_a_read_timeout_after_the_request_was_sent_is_uncertain(twilio):
    with SmsSender(sms_config(twilio, timeout_s=(2, 0.5))) as sender:
        result = sender.send(sms_msg(to=FakeTwilio.SLOW))
    assert result.outcome == "uncertain"
    assert "+1555***0005" in result.error and FakeTwilio.SLOW not in result.error
    assert result.error.startswith("Twilio: no answer in time after the request was sent")
    assert [r["to"] for r in twilio.received] == [FakeTwilio.SLOW]  # it did reach the provider


def test_a_connection_dropped_without_an_answer_is_uncertain(twilio):
    with SmsSender(sms_config(twilio)) as sender:
        result = sender.send(sms_msg(to=FakeTwilio.DROP))
        after = sender.send(sms_msg(key="sms:2", n=2))
    assert result.outcome == "uncertain"
    assert "connection lost after the request was sent" in result.error
    assert after.outcome == "sent"


def test_a_refused_connection_is_failed_for_sms(twilio):
    with closed_port() as port, SmsSender(sms_config(twilio, base_url=f"http://127.0.0.1:{port}")) as sender:
        result = sender.send(sms_msg())
    assert result.outcome == "failed"
    assert result.error.startswith("Twilio: cannot connect (NewConnectionError)")


def test_a_connect_timeout_is_failed_for_sms(twilio):
    with full_backlog() as port:
        config = sms_config(twilio, base_url=f"http://127.0.0.1:{port}", timeout_s=(0.3, 5))
        with SmsSender(config) as sender:
            result = sender.send(sms_msg())
    assert result.outcome == "failed"
    assert result.error.startswith("Twilio: connect timeout")


def test_sms_without_a_number_is_skipped_and_two_numbers_are_refused(twilio):
    with SmsSender(sms_config(twilio)) as sender:
        assert sender.send(sms_msg(to="")).outcome == "skipped"
        two = Message(2, "sms:2", "sms", ("+15557654321", "+15557654322"), None, "hi")
        assert sender.send(two).outcome == "dead"
    assert twilio.received == []


def test_an_sms_config_without_a_sender_is_refused_when_built():
    with pytest.raises(ConfigError):
        SmsConfig(account_sid="AC1", auth_token="t")
    with pytest.raises(ConfigError):
        SmsConfig(account_sid="AC1", auth_token="", from_number="+15550009999")


# -- push ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fcm_server():
    with FakeFcm(slow_seconds=3) as server:
        yield server


@pytest.fixture
def fcm(fcm_server):
    fcm_server.reset()
    yield fcm_server
    fcm_server.reset()


def fcm_config(fcm: FakeFcm, **kw) -> FcmConfig:
    fields = {"base_url": fcm.url, "project_id": fcm.project_id,
              "service_account_info": fcm.service_account_info(), "timeout_s": (2, 5)}
    fields.update(kw)
    return FcmConfig(**fields)


def test_push_is_sent_with_a_collapse_key_from_the_idempotency_key(fcm):
    issued = fcm.tokens_issued
    with PushSender(fcm_config(fcm)) as sender:
        result = sender.send(push_msg("device-a", "device-b"))
        again = sender.send(push_msg("device-a", key="push:chat:43", n=2))
    assert result.outcome == again.outcome == "sent"
    got = fcm.received
    assert [r["message"]["token"] for r in got] == ["device-a", "device-b", "device-a"]
    assert result.provider_id == got[0]["name"]
    assert result.provider_id.startswith("projects/almanac-demo/messages/")
    assert result.dead_tokens == ()
    key = collapse_key("push:chat:42")
    assert len(key) <= 64
    sent = got[0]["message"]
    assert sent["notification"] == {"title": "New message", "body": "Bob: see you at 6"}
    assert sent["data"] == {"chat_id": "42"}
    assert sent["android"] == {"collapse_key": key, "notification": {"tag": key}}
    assert sent["apns"] == {"headers": {"apns-collapse-id": key}}
    assert got[2]["message"]["android"]["collapse_key"] != key
    assert fcm.tokens_issued == issued + 1  # one OAuth token for the whole batch


def test_an_expired_access_token_is_refreshed_by_google_auth(fcm):
    with PushSender(fcm_config(fcm)) as sender:
        assert sender.send(push_msg("device-a")).outcome == "sent"
        fcm.expire_tokens()
        result = sender.send(push_msg("device-a", key="push:2", n=2))
    assert result.outcome == "sent"


def test_an_unregistered_token_is_listed_dead_and_the_rest_sent(fcm):
    with PushSender(fcm_config(fcm)) as sender:
        result = sender.send(push_msg("unregistered-old-phone", "device-a"))
    assert result.outcome == "sent"
    assert result.dead_tokens == ("unregistered-old-phone",)
    assert result.provider_id == fcm.received[0]["name"]


def test_all_tokens_gone_is_dead_with_every_token_listed(fcm):
    with PushSender(fcm_config(fcm)) as sender:
        result = sender.send(push_msg("unregistered-1", "invalid-2"))
    assert result.outcome == "dead"
    assert result.dead_tokens == ("unregistered-1", "invalid-2")
    assert result.error.startswith("no active device: all 2 unregistered")
    assert "unregistered-1" not in result.error and "unregi..." in result.error


def test_an_invalid_argument_about_the_token_marks_it_dead(fcm):
    with PushSender(fcm_config(fcm)) as sender:
        result = sender.send(push_msg("invalid-garbage"))
    assert (result.outcome, result.dead_tokens) == ("dead", ("invalid-garbage",))
    assert "INVALID_ARGUMENT" in result.error


def test_no_device_is_skipped(fcm):
    with PushSender(fcm_config(fcm)) as sender:
        result = sender.send(push_msg())
    assert (result.outcome, result.error) == ("skipped", "no active device")


def test_quota_is_failed_with_retry_after_when_nothing_was_accepted(fcm):
    with PushSender(fcm_config(fcm)) as sender:
        result = sender.send(push_msg("quota-1", "unavailable-2"))
    assert (result.outcome, result.retry_after_s) == ("failed", 2.0)
    assert result.error.startswith("FCM QUOTA_EXCEEDED")


def test_unavailable_is_failed(fcm):
    fcm.fail_next(1, 503, retry_after=9)
    with PushSender(fcm_config(fcm)) as sender:
        injected = sender.send(push_msg("device-a"))
        by_token = sender.send(push_msg("unavailable-1", key="push:2", n=2))
    assert (injected.outcome, injected.retry_after_s) == ("failed", 9.0)
    assert (by_token.outcome, by_token.retry_after_s) == ("failed", None)
    assert by_token.error.startswith("FCM UNAVAILABLE")


def test_some_devices_accepted_and_others_transient_is_sent(fcm):
    with PushSender(fcm_config(fcm)) as sender:
        result = sender.send(push_msg("quota-1", "device-a", "unavailable-2"))
    assert (result.outcome, result.error, result.retry_after_s) == ("sent", None, None)
    assert len(fcm.received) == 1


def test_a_dropped_connection_is_uncertain_only_if_nothing_was_accepted(fcm):
    with PushSender(fcm_config(fcm)) as sender:
        alone = sender.send(push_msg("drop-device-1"))
        with_another = sender.send(push_msg("drop-device-1", "device-a", key="push:2", n=2))
    assert alone.outcome == "uncertain"
    assert "connection lost after the request was sent" in alone.error
    assert "drop-device-1" not in alone.error and "drop-d..." in alone.error
    assert with_another.outcome == "sent"


def test_a_read_timeout_is_uncertain_for_push(fcm):
    with PushSender(fcm_config(fcm, timeout_s=(2, 0.5))) as sender:
        result = sender.send(push_msg("slow-1"))
    assert result.outcome == "uncertain" and result.error.startswith("FCM: no answer in time")
    assert len(fcm.received) == 1


def test_a_token_endpoint_refusal_is_dead_and_names_the_connection(fcm):
    other = FakeFcm()  # another key pair: the fake's token endpoint cannot verify its signature
    info = {**fcm.service_account_info(), "private_key": other.private_key_pem}
    with PushSender(fcm_config(fcm, service_account_info=info)) as sender:
        result = sender.send(push_msg("device-a", "device-b"))
    assert result.outcome == "dead"
    assert result.error == ("FCM token endpoint refused the service account (invalid_grant); "
                            "check the fcm_default connection")
    assert fcm.received == []


def test_a_wrong_project_is_dead_and_disables_no_device(fcm):
    with PushSender(fcm_config(fcm, project_id="someone-else")) as sender:
        result = sender.send(push_msg("device-a", "device-b"))
    assert result.outcome == "dead"
    assert result.dead_tokens == ()
    assert result.error.endswith("check the fcm_default connection")


def test_unreachable_fcm_or_token_endpoint_is_failed(fcm):
    with closed_port() as port:
        with PushSender(fcm_config(fcm, base_url=f"http://127.0.0.1:{port}")) as sender:
            refused = sender.send(push_msg("device-a", "device-b"))
        info = {**fcm.service_account_info(), "token_uri": f"http://127.0.0.1:{port}/token"}
        with PushSender(fcm_config(fcm, service_account_info=info)) as sender:
            no_token = sender.send(push_msg("device-a"))
    assert refused.outcome == "failed" and refused.error.startswith("FCM: cannot connect")
    assert no_token.outcome == "failed" and no_token.error.startswith("FCM token endpoint unreachable")
    assert fcm.received == []


def test_a_connect_timeout_is_failed_for_push(fcm):
    with full_backlog() as port:
        config = fcm_config(fcm, base_url=f"http://127.0.0.1:{port}", timeout_s=(0.3, 5))
        with PushSender(config) as sender:
            result = sender.send(push_msg("device-a"))
    assert result.outcome == "failed" and result.error.startswith("FCM: connect timeout")


def test_an_unusable_service_account_key_is_refused_when_built(fcm):
    with pytest.raises(ConfigError):
        PushSender(fcm_config(fcm, service_account_info={"type": "service_account"}))


def test_open_sender_picks_the_sender_by_config(smtp, twilio, fcm):
    for config, kind in ((smtp_config(smtp.port), EmailSender), (sms_config(twilio), SmsSender),
                         (fcm_config(fcm), PushSender)):
        with open_sender(config) as sender:
            assert isinstance(sender, kind)


# -- masking ---------------------------------------------------------------------------------------


def test_masks_keep_only_what_an_operator_needs():
    assert mask_email("alice@example.com") == "a***@example.com"
    assert mask_phone("+15550100001") == "+1555***0001"
    assert mask_token("fcm-token-abcdef123456") == "fcm-to..."
    text = scrub("user bob@example.org, number +447700900123 and token abcdefghijkl", ["abcdefghijkl"])
    assert text == "user b***@example.org, number +4477***0123 and token abcdef..."


# -- the HTTP senders' requests, byte for byte against requests' ---------------------------------


@contextlib.contextmanager
def recording_server(answer: bytes):
    """An HTTP/1.1 server that records each raw request (head and body) and gives ``answer``."""
    import threading

    seen: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
                while len(rest) < length:
                    rest += conn.recv(65536)
                seen.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                conn.sendall(answer)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", seen


def _normalized(raw: bytes) -> bytes:
    """A request without what legitimately differs: the User-Agent, the bearer token's value and the
    header order (google-auth adds ``authorization`` to the headers it is given, after the others)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    request_line, *fields = head.split(b"\r\n")
    kept = []
    for line in fields:
        name = line.split(b":", 1)[0].lower()
        if name == b"user-agent":
            continue
        if name == b"authorization" and line.lower().startswith(b"authorization: bearer "):
            line = b"authorization: Bearer <token>"
        kept.append(line)
    kept.sort(key=lambda f: f.split(b":", 1)[0].lower())
    return b"\r\n".join([request_line, *kept]) + b"\r\n\r\n" + body


def test_the_sms_request_is_the_one_requests_sent():
    import requests

    answer = (b'HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n'
              b'{"sid": "SM1"} ')
    with recording_server(answer) as (url, seen):
        config = SmsConfig(base_url=url, account_sid="AC123", auth_token="s3cret", from_number="+15550009999")
        with SmsSender(config) as sender:
            assert sender.send(sms_msg()).outcome == "sent"
            unicode = Message(2, "sms:2", "sms", ("+15557654321",), None, "Café ☕ & more = 100%")
            assert sender.send(unicode).outcome == "sent"
        with requests.Session() as session:  # what SmsSender did with requests
            session.auth = ("AC123", "s3cret")
            session.headers["Accept"] = "application/json"
            target = f"{url}/2010-04-01/Accounts/AC123/Messages.json"
            for body in ("Your code is 1234", "Café ☕ & more = 100%"):
                form = {"To": "+15557654321", "Body": body, "From": "+15550009999"}
                session.post(target, data=form, timeout=(2, 5), allow_redirects=False)
    ours, theirs = seen[:2], seen[2:]
    for mine, old in zip(ours, theirs, strict=True):
        mine_fields = [f for f in mine.split(b"\r\n") if not f.lower().startswith(b"user-agent")]
        old_fields = [f for f in old.split(b"\r\n") if not f.lower().startswith(b"user-agent")]
        assert mine_fields == old_fields  # same headers in the same order, same body


def test_the_push_request_is_the_one_google_auths_session_sent(fcm):
    from google.auth.transport.requests import AuthorizedSession
    from google.oauth2 import service_account

    answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"name": "x"}'
    with recording_server(answer) as (url, seen):
        message = push_msg("device-a")
        with PushSender(fcm_config(fcm, base_url=url)) as sender:
            assert sender.send(message).outcome == "sent"
            payload = sender._payload(message, "device-a")
        credentials = service_account.Credentials.from_service_account_info(
            fcm.service_account_info(), scopes=["https://www.googleapis.com/auth/firebase.messaging"])
        with AuthorizedSession(credentials) as session:  # what PushSender did with requests
            session.post(f"{url}/v1/projects/{fcm.project_id}/messages:send", json=payload, timeout=(2, 5))
    mine, old = seen
    assert _normalized(mine) == _normalized(old)
    assert b"x-goog-api-client" in mine.lower()

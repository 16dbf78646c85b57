"""The provider fakes (almanac.notify.fakes) driven by the real clients: smtplib, requests, google-auth.

Every answer a sender must handle is checked on the wire: success, permanent and transient
errors, Retry-After, slow answers and the connection closed without one (recorded: the
ambiguous case), injected answers, what lands in the store folder, and the runner process.
"""

from __future__ import annotations

import base64
import email
import json
import os
import re
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import requests
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import AuthorizedSession
from google.oauth2 import service_account

from almanac.notify.fakes import (
    DEFAULT_ACCOUNT_SID,
    FCM_SCOPE,
    FakeFcm,
    FakeSmtpServer,
    FakeTwilio,
)

SLOW = 0.6  # the fakes' slow_seconds here; clients that give up wait less than this


def _email(to: str = "ana@example.test", key: str = "n-1") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "notifications@almanac.test"
    msg["To"] = to
    msg["Subject"] = "Carpool moved"
    msg["Message-ID"] = f"<{key}@almanac.test>"
    msg.set_content("Carpool moved to Thursday.")
    return msg


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- SMTP


@pytest.fixture
def smtp(tmp_path):
    with FakeSmtpServer(store_dir=tmp_path / "email", slow_seconds=SLOW) as server:
        yield server


def test_smtp_accepts_with_auth_login_and_records_the_message_id(smtp):
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.ehlo()
        assert "auth" in client.esmtp_features and "LOGIN" in client.esmtp_features["auth"]
        client.login("mailer", "secret")  # AUTH over plain TCP, any credentials
        client.mail("notifications@almanac.test")
        assert client.rcpt("ana@example.test")[0] == 250
        code, reply = client.data(_email().as_bytes())
    assert code == 250 and re.fullmatch(rb"OK queued as [0-9A-F]{12}", reply)
    [got] = smtp.received
    assert got.message_id == "<n-1@almanac.test>" and got.rcpt_tos == ("ana@example.test",)
    assert got.mail_from == "notifications@almanac.test" and got.auth_user == "mailer"
    assert got.queue_id.encode() in reply and got.answer == "queued"
    assert email.message_from_bytes(got.raw)["Subject"] == "Carpool moved"


def test_smtp_accepts_auth_plain_and_no_auth(smtp):
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.ehlo()
        client.user, client.password = "u", "p"
        client.auth("PLAIN", client.auth_plain)
        client.send_message(_email(key="plain"))
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.send_message(_email(key="anon"))
    assert [(m.message_id, m.auth_user) for m in smtp.received] == [
        ("<plain@almanac.test>", "u"),
        ("<anon@almanac.test>", None),
    ]


def test_smtp_store_dir_gets_one_eml_per_message(smtp, tmp_path):
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.send_message(_email(key="a"))
        client.send_message(_email(to="bo@example.test", key="b"))
    files = sorted((tmp_path / "email").glob("*.eml"))
    assert len(files) == 2
    parsed = [email.message_from_bytes(f.read_bytes()) for f in files]
    assert [p["Message-ID"] for p in parsed] == ["<a@almanac.test>", "<b@almanac.test>"]
    assert parsed[1]["Delivered-To"] == "bo@example.test"
    assert parsed[1]["Return-Path"] == "<notifications@almanac.test>"


def test_smtp_reject_prefix_is_refused_at_rcpt_with_550(smtp):
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.send_message(_email(to="reject+1@example.test"))
    code, text = refused.value.recipients["reject+1@example.test"]
    assert (code, text) == (550, b"5.1.1 mailbox unavailable")
    assert smtp.received == []


def test_smtp_busy_prefix_is_deferred_at_rcpt_with_451(smtp):
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.ehlo()
        client.mail("notifications@almanac.test")
        assert client.rcpt("busy+1@example.test") == (451, b"4.3.0 try again later")
    assert smtp.received == []


def test_smtp_slow_prefix_answers_data_late(smtp):
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.send_message(_email(to="slow+1@example.test"))
    assert time.monotonic() - started >= SLOW
    assert [m.answer for m in smtp.received] == ["slow"]


def test_smtp_slow_prefix_times_a_client_out_but_the_message_arrived(smtp):
    client = smtplib.SMTP("127.0.0.1", smtp.port, timeout=5)
    client.ehlo()
    client.mail("notifications@almanac.test")
    client.rcpt("slow+2@example.test")
    client.sock.settimeout(SLOW / 4)
    with pytest.raises((TimeoutError, smtplib.SMTPServerDisconnected)):
        client.data(_email(to="slow+2@example.test").as_bytes())
    client.close()
    assert [m.rcpt_tos for m in smtp.received] == [("slow+2@example.test",)]


def test_smtp_drop_prefix_reads_data_then_closes_without_answering(smtp):
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.send_message(_email(to="drop+1@example.test", key="dropped"))
    [got] = smtp.received
    assert got.answer == "dropped" and got.message_id == "<dropped@almanac.test>"


def test_smtp_fail_next_answers_the_next_recipients_whatever_the_address(smtp):
    smtp.fail_next(2, 451)
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.ehlo()
        client.mail("notifications@almanac.test")
        assert client.rcpt("ana@example.test")[0] == 451
        assert client.rcpt("ana@example.test")[0] == 451
        assert client.rcpt("ana@example.test")[0] == 250
        assert client.data(_email().as_bytes())[0] == 250
    smtp.fail_next(1, 554, "5.7.1 spam", at="data")
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPDataError) as data_error:
            client.send_message(_email(key="spam"))
    assert (data_error.value.smtp_code, data_error.value.smtp_error) == (554, b"5.7.1 spam")
    smtp.fail_next(1, "drop")
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.send_message(_email(key="injected-drop"))
    assert [m.answer for m in smtp.received] == ["queued", "dropped"]
    smtp.reset()
    assert smtp.received == []
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        assert client.send_message(_email()) == {}


def test_smtp_restart_keeps_the_port(smtp):
    port = smtp.port
    smtp.stop()
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", port, timeout=2)
    smtp.start()
    assert smtp.port == port
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
        client.send_message(_email())
    assert len(smtp.wait_received(1)) == 1


# --------------------------------------------------------------------------- Twilio


@pytest.fixture
def twilio(tmp_path):
    with FakeTwilio(store_dir=tmp_path, slow_seconds=SLOW) as fake:
        yield fake


def _sms(fake: FakeTwilio, to: str, *, auth=None, timeout: float = 5, **fields) -> requests.Response:
    data = {"To": to, "From": "+15550009999", "Body": "Carpool moved to Thursday."} | fields
    data = {k: v for k, v in data.items() if v is not None}
    return requests.post(
        fake.messages_url, data=data, auth=auth or (fake.account_sid, fake.auth_token), timeout=timeout
    )


def _twilio_error(response: requests.Response, status: int, code: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["message"]
    assert body["more_info"] == f"https://www.twilio.com/docs/errors/{code}"
    return body


def test_twilio_accepts_a_message_with_twilios_resource(twilio):
    response = _sms(twilio, "+15551230001")
    assert response.status_code == 201
    body = response.json()
    assert re.fullmatch(r"SM[0-9a-f]{32}", body["sid"])
    assert re.fullmatch(r"AC[0-9a-f]{32}", body["account_sid"]) and body["account_sid"] == DEFAULT_ACCOUNT_SID
    assert (body["to"], body["from"]) == ("+15551230001", "+15550009999")
    assert body["body"] == "Carpool moved to Thursday."
    assert body["status"] == "queued" and body["direction"] == "outbound-api"
    assert body["uri"] == f"/2010-04-01/Accounts/{twilio.account_sid}/Messages/{body['sid']}.json"
    assert parsedate_to_datetime(body["date_created"]).utcoffset().total_seconds() == 0
    assert twilio.received == [body]


def test_twilio_messaging_service_sid_instead_of_from(twilio):
    response = _sms(twilio, "+15551230002", From=None, MessagingServiceSid="MG" + "0" * 32)
    assert response.status_code == 201
    body = response.json()
    assert body["from"] is None and body["messaging_service_sid"] == "MG" + "0" * 32
    assert body["status"] == "accepted"


def test_twilio_store_dir_gets_one_json_line_per_message(twilio, tmp_path):
    sids = [_sms(twilio, f"+1555123000{i}").json()["sid"] for i in range(3)]
    lines = (tmp_path / "sms.jsonl").read_text().splitlines()
    assert [json.loads(line)["sid"] for line in lines] == sids


def test_twilio_bad_or_missing_auth_is_401_20003(twilio):
    wrong = _sms(twilio, "+15551230001", auth=(twilio.account_sid, "0" * 32))
    _twilio_error(wrong, 401, 20003)
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    missing = requests.post(twilio.messages_url, data={"To": "+15551230001", "Body": "x"}, timeout=5)
    _twilio_error(missing, 401, 20003)
    assert twilio.received == []


def test_twilio_missing_fields_are_400_with_twilios_codes(twilio):
    _twilio_error(_sms(twilio, None), 400, 21604)
    _twilio_error(_sms(twilio, "+15551230001", Body=None), 400, 21602)
    _twilio_error(_sms(twilio, "+15551230001", From=None), 400, 21603)
    _twilio_error(_sms(twilio, "not-a-number"), 400, 21211)
    assert twilio.received == []


def test_twilio_behaviour_numbers(twilio):
    invalid = _twilio_error(_sms(twilio, FakeTwilio.INVALID), 400, 21211)
    assert "not a valid phone number" in invalid["message"]
    _twilio_error(_sms(twilio, FakeTwilio.UNSUBSCRIBED), 400, 21610)
    limited = _sms(twilio, FakeTwilio.RATE_LIMITED)
    _twilio_error(limited, 429, 20429)
    assert limited.headers["Retry-After"] == "2"
    _twilio_error(_sms(twilio, FakeTwilio.UNAVAILABLE), 503, 20503)
    assert twilio.received == []


def test_twilio_slow_number_answers_late_and_times_a_client_out(twilio):
    started = time.monotonic()
    assert _sms(twilio, FakeTwilio.SLOW).status_code == 201
    assert time.monotonic() - started >= SLOW
    with pytest.raises(requests.exceptions.ReadTimeout):
        _sms(twilio, FakeTwilio.SLOW, timeout=SLOW / 4)
    assert [m["to"] for m in twilio.received] == [FakeTwilio.SLOW, FakeTwilio.SLOW]


def test_twilio_drop_number_records_then_closes_without_a_response(twilio):
    with pytest.raises(requests.exceptions.ConnectionError):
        _sms(twilio, FakeTwilio.DROP)
    assert [m["to"] for m in twilio.received] == [FakeTwilio.DROP]


def test_twilio_fail_next_overrides_any_recipient_then_normal_again(twilio):
    twilio.fail_next(2, status=429, retry_after=7)
    for _ in range(2):
        response = _sms(twilio, "+15551230001")
        _twilio_error(response, 429, 20429)
        assert response.headers["Retry-After"] == "7"
    assert _sms(twilio, "+15551230001").status_code == 201
    twilio.fail_next(1, status=400, code=21408)
    _twilio_error(_sms(twilio, "+15551230001"), 400, 21408)
    twilio.fail_next(1, status="drop")
    with pytest.raises(requests.exceptions.ConnectionError):
        _sms(twilio, "+15551230003")
    assert [m["to"] for m in twilio.received] == ["+15551230001", "+15551230003"]
    twilio.fail_next(3)
    twilio.reset()
    assert twilio.received == [] and _sms(twilio, "+15551230001").status_code == 201


def test_twilio_control_endpoints_serve_another_process(twilio):
    _sms(twilio, "+15551230001")
    seen = requests.get(f"{twilio.url}/_received", timeout=5).json()
    assert [m["to"] for m in seen] == ["+15551230001"]
    injected = requests.post(f"{twilio.url}/_fail_next", json={"n": 1, "status": 503}, timeout=5)
    assert injected.status_code == 204
    _twilio_error(_sms(twilio, "+15551230001"), 503, 20503)
    assert requests.post(f"{twilio.url}/_reset", timeout=5).status_code == 204
    assert requests.get(f"{twilio.url}/_received", timeout=5).json() == []


def test_twilio_stop_cuts_open_connections(twilio):
    with requests.Session() as session:
        auth = (twilio.account_sid, twilio.auth_token)
        data = {"To": "+15551230001", "From": "+15550009999", "Body": "x"}
        assert session.post(twilio.messages_url, data=data, auth=auth, timeout=5).status_code == 201
        twilio.stop()  # the pooled keep-alive connection must not be answered any more
        with pytest.raises(requests.exceptions.ConnectionError):
            session.post(twilio.messages_url, data=data, auth=auth, timeout=5)


# --------------------------------------------------------------------------- FCM


@pytest.fixture(scope="module")
def fcm_key() -> tuple[str, str]:
    """One generated key pair for the module's fakes (RSA generation is the slow part)."""
    fake = FakeFcm()
    return fake.private_key_pem, fake.private_key_id


@pytest.fixture
def fcm(tmp_path, fcm_key):
    pem, kid = fcm_key
    with FakeFcm(store_dir=tmp_path, private_key_pem=pem, private_key_id=kid, slow_seconds=SLOW) as fake:
        yield fake


def _session(fake: FakeFcm, scopes=(FCM_SCOPE,), info: dict | None = None) -> AuthorizedSession:
    credentials = service_account.Credentials.from_service_account_info(
        info or fake.service_account_info(), scopes=list(scopes)
    )
    return AuthorizedSession(credentials)


def _push(session, fake: FakeFcm, token: str, *, timeout: float = 5, **extra) -> requests.Response:
    message = {
        "token": token,
        "notification": {"title": "Carpool moved", "body": "Now on Thursday."},
        "data": {"notification_id": "42", "kind": "digest"},
        "android": {"collapse_key": "n-42"},
        "apns": {"headers": {"apns-collapse-id": "n-42"}},
    }
    return session.post(fake.send_url, json={"message": message, **extra}, timeout=timeout)


def _google_error(response: requests.Response, status: int, rpc_status: str, error_code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["status"] == rpc_status and error["message"]
    codes = [d.get("errorCode") for d in error.get("details", []) if d["@type"].endswith("FcmError")]
    assert codes == ([error_code] if error_code else [])
    return error


def test_service_account_info_looks_like_a_google_key(fcm):
    info = fcm.service_account_info()
    assert info["type"] == "service_account" and info["project_id"] == "almanac-demo"
    assert info["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert re.fullmatch(r"[0-9a-f]{40}", info["private_key_id"])
    assert info["client_email"].endswith("@almanac-demo.iam.gserviceaccount.com")
    assert re.fullmatch(r"\d{21}", info["client_id"]) and info["token_uri"] == f"{fcm.url}/token"


def test_fcm_send_with_google_auth_credentials(fcm, tmp_path):
    session = _session(fcm)
    first = _push(session, fcm, "device-token-1")
    second = _push(session, fcm, "device-token-2")
    for response in (first, second):
        assert response.status_code == 200
        assert re.fullmatch(r"projects/almanac-demo/messages/0:\d+%[0-9a-f]{16}", response.json()["name"])
    assert fcm.tokens_issued == 1, "the access token is fetched once and reused"
    got = fcm.received
    assert [m["message"]["token"] for m in got] == ["device-token-1", "device-token-2"]
    assert got[0]["message"]["data"] == {"notification_id": "42", "kind": "digest"}
    assert got[0]["name"] == first.json()["name"]
    lines = (tmp_path / "push.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == [first.json()["name"], second.json()["name"]]


def test_fcm_validate_only_checks_but_delivers_nothing(fcm):
    response = _push(_session(fcm), fcm, "device-token-1", validate_only=True)
    assert response.status_code == 200
    assert response.json() == {"name": "projects/almanac-demo/messages/fake_message_id"}
    assert fcm.received == []


def test_fcm_token_prefix_behaviours(fcm):
    session = _session(fcm)
    _google_error(_push(session, fcm, "unregistered-1"), 404, "NOT_FOUND", "UNREGISTERED")
    invalid = _google_error(_push(session, fcm, "invalid-1"), 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert "not a valid FCM registration token" in invalid["message"]
    quota = _push(session, fcm, "quota-1")
    _google_error(quota, 429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
    assert quota.headers["Retry-After"] == "2"
    _google_error(_push(session, fcm, "unavailable-1"), 503, "UNAVAILABLE", "UNAVAILABLE")
    assert fcm.received == []


def test_fcm_unregistered_error_is_googles_exact_shape(fcm):
    response = _push(_session(fcm), fcm, "unregistered-2")
    assert response.json() == {
        "error": {
            "code": 404,
            "message": "Requested entity was not found.",
            "status": "NOT_FOUND",
            "details": [
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}
            ],
        }
    }


def test_fcm_slow_and_drop_tokens_are_recorded(fcm):
    session = _session(fcm)
    started = time.monotonic()
    assert _push(session, fcm, "slow-1").status_code == 200
    assert time.monotonic() - started >= SLOW
    with pytest.raises(requests.exceptions.ReadTimeout):
        _push(session, fcm, "slow-2", timeout=SLOW / 4)
    with pytest.raises(requests.exceptions.ConnectionError):
        _push(session, fcm, "drop-1")
    assert [m["message"]["token"] for m in fcm.received] == ["slow-1", "slow-2", "drop-1"]


def test_fcm_without_or_with_a_wrong_bearer_is_401(fcm):
    body = {"message": {"token": "device-token-1"}}
    missing = requests.post(fcm.send_url, json=body, timeout=5)
    _google_error(missing, 401, "UNAUTHENTICATED", None)
    assert "missing required authentication credential" in missing.json()["error"]["message"]
    wrong = requests.post(fcm.send_url, json=body, headers={"Authorization": "Bearer ya29.nope"}, timeout=5)
    _google_error(wrong, 401, "UNAUTHENTICATED", None)
    assert fcm.received == []


def test_fcm_expired_access_token_is_refreshed_by_google_auth(fcm):
    session = _session(fcm)
    assert _push(session, fcm, "device-token-1").status_code == 200
    fcm.expire_tokens()  # the server forgets it: the next send gets 401, google-auth refreshes, retries
    assert _push(session, fcm, "device-token-2").status_code == 200
    assert fcm.tokens_issued == 2 and len(fcm.received) == 2


def test_fcm_token_endpoint_refuses_another_key(fcm):
    stranger = FakeFcm()  # another key pair, same client_email, signing for our token URI
    info = fcm.service_account_info() | {
        "private_key": stranger.private_key_pem,
        "private_key_id": stranger.private_key_id,
    }
    with pytest.raises(RefreshError, match="invalid_grant"):
        _push(_session(fcm, info=info), fcm, "device-token-1")
    assert fcm.tokens_issued == 0


def test_fcm_token_endpoint_refuses_an_assertion_without_the_fcm_scope(fcm):
    with pytest.raises(RefreshError, match="invalid_scope"):
        _push(_session(fcm, scopes=["https://www.googleapis.com/auth/calendar"]), fcm, "device-token-1")


def test_fcm_token_endpoint_refuses_a_tampered_assertion(fcm):
    credentials = service_account.Credentials.from_service_account_info(
        fcm.service_account_info(), scopes=[FCM_SCOPE]
    )
    header, claims, signature = credentials._make_authorization_grant_assertion().decode().split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    decoded["scope"] += " https://www.googleapis.com/auth/cloud-platform"
    claims = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    grant = {
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "assertion": f"{header}.{claims}.{signature}",
    }
    response = requests.post(fcm.token_uri, data=grant, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    bad_grant = requests.post(fcm.token_uri, data={"grant_type": "password"}, timeout=5)
    assert bad_grant.status_code == 400 and bad_grant.json()["error"] == "unsupported_grant_type"


def test_fcm_rejects_malformed_messages_like_fcm(fcm):
    session = _session(fcm)
    send = fcm.send_url

    def refused(body):
        response = session.post(send, json=body, timeout=5)
        return _google_error(response, 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")["message"]

    assert "TYPE_STRING" in refused({"message": {"token": "t", "data": {"n": 1}}})  # data values are strings
    assert "Unknown name" in refused({"message": {"token": "t", "colour": "red"}})
    assert "Recipient" in refused({"message": {"notification": {"title": "x"}}})
    assert "oneof" in refused({"message": {"token": "t", "topic": "news"}})
    assert "Unknown name" in refused({"token": "t"})
    other = send.replace("almanac-demo", "someone-else")
    other_project = session.post(other, json={"message": {"token": "t"}}, timeout=5)
    _google_error(other_project, 403, "PERMISSION_DENIED", None)
    assert fcm.received == []


def test_fcm_fail_next_then_normal_again(fcm):
    session = _session(fcm)
    fcm.fail_next(1, status=503)
    _google_error(_push(session, fcm, "device-token-1"), 503, "UNAVAILABLE", "UNAVAILABLE")
    fcm.fail_next(1, status=429, retry_after=3)
    limited = _push(session, fcm, "device-token-1")
    _google_error(limited, 429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
    assert limited.headers["Retry-After"] == "3"
    fcm.fail_next(1, status="drop")
    with pytest.raises(requests.exceptions.ConnectionError):
        _push(session, fcm, "device-token-2")
    assert _push(session, fcm, "device-token-3").status_code == 200
    assert [m["message"]["token"] for m in fcm.received] == ["device-token-2", "device-token-3"]
    assert [m["message"]["token"] for m in requests.get(f"{fcm.url}/_received", timeout=5).json()] == [
        "device-token-2",
        "device-token-3",
    ]


# --------------------------------------------------------------------------- the runner


def _wait_ports(ports, proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        open_ = []
        for port in ports:
            with socket.socket() as sock:
                sock.settimeout(0.2)
                open_.append(sock.connect_ex(("127.0.0.1", port)) == 0)
        if all(open_):
            return
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "runner exited"
        assert time.monotonic() < deadline, "the runner did not open its ports"
        time.sleep(0.1)


def _start_runner(folder: Path, ports: list[int], token: str) -> subprocess.Popen:
    smtp_port, sms_port, fcm_port = ports
    command = [
        sys.executable, "-m", "almanac.notify.fakes", "serve", "--dir", str(folder),
        "--smtp-port", str(smtp_port), "--sms-port", str(sms_port), "--fcm-port", str(fcm_port),
    ]
    env = {**os.environ, "ALMANAC_FAKES_SMS_AUTH_TOKEN": token}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_ports(ports, proc)
    return proc


def _stop_runner(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    return output


def test_runner_serves_all_three_into_a_folder_and_keeps_its_key(tmp_path):
    folder = tmp_path / "outbox"
    ports = [_free_port(), _free_port(), _free_port()]
    token = "f" * 32
    proc = _start_runner(folder, ports, token)
    try:
        key_file = folder / "fcm-service-account.json"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        info = json.loads(key_file.read_text())
        assert info["token_uri"] == f"http://127.0.0.1:{ports[2]}/token"
        with smtplib.SMTP("127.0.0.1", ports[0], timeout=5) as client:
            client.login("any", "thing")
            client.send_message(_email(key="runner"))
        sms = requests.post(
            f"http://127.0.0.1:{ports[1]}/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Messages.json",
            data={"To": "+15551230001", "From": "+15550009999", "Body": "hi"},
            auth=(DEFAULT_ACCOUNT_SID, token),
            timeout=5,
        )
        assert sms.status_code == 201
        session = AuthorizedSession(
            service_account.Credentials.from_service_account_file(str(key_file), scopes=[FCM_SCOPE])
        )
        push = session.post(
            f"http://127.0.0.1:{ports[2]}/v1/projects/almanac-demo/messages:send",
            json={"message": {"token": "device-token-1", "notification": {"title": "t", "body": "b"}}},
            timeout=5,
        )
        assert push.status_code == 200
        received = requests.get(f"http://127.0.0.1:{ports[2]}/_received", timeout=5).json()
        assert [m["name"] for m in received] == [push.json()["name"]]
    finally:
        output = _stop_runner(proc)
    assert token not in output and "ana@example.test" not in output, "no secret or address in the log"
    [eml] = (folder / "email").glob("*.eml")
    assert email.message_from_bytes(eml.read_bytes())["Message-ID"] == "<runner@almanac.test>"
    assert json.loads((folder / "sms.jsonl").read_text())["sid"] == sms.json()["sid"]
    assert json.loads((folder / "push.jsonl").read_text())["name"] == push.json()["name"]

    # Restarted (another FCM port): the same key pair, the token URI follows the port.
    ports[2] = _free_port()
    proc = _start_runner(folder, ports, token)
    try:
        again = json.loads(key_file.read_text())
        assert again["private_key_id"] == info["private_key_id"]
        assert again["private_key"] == info["private_key"]
        assert again["token_uri"] == f"http://127.0.0.1:{ports[2]}/token"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    finally:
        _stop_runner(proc)

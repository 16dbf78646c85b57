"""The OAuth provider fakes (almanac.integrations.fakes, tests/support/fake_google.py) driven by real clients.

Only ``requests`` and ``google-auth`` talk to them, over sockets: the refresh grant with both client
authentication methods, every refusal a client must tell apart (invalid_client, invalid_grant,
unsupported_grant_type, invalid_scope), rotation, revocation and expiry as userinfo sees them, the
prefix behaviours, injected faults, the admin endpoints a test in another process uses, and the
runner process (SIGTERM, a restart with the same secret).
"""

from __future__ import annotations

import base64
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import google.auth._exponential_backoff as backoff
import pytest
import requests
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request
from google.oauth2.credentials import Credentials

from almanac.integrations.fakes import (
    BAD_JSON_BODY,
    INVALID_GRANT_DESCRIPTION,
    FakeOAuthProvider,
    OAuthState,
    fingerprint,
)
from tests.support.fake_google import CALENDAR_EVENTS_SCOPE, FakeGoogle

CLIENT_ID, CLIENT_SECRET = "almanac-client", "s3cr3t+/=%"  # a secret that form encoding changes
SLOW = 0.6  # slow_seconds here
TIMEOUT = 10
INVALID_GRANT = {"error": "invalid_grant", "error_description": INVALID_GRANT_DESCRIPTION}


@pytest.fixture
def fake():
    with FakeOAuthProvider(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, slow_seconds=SLOW) as provider:
        yield provider


@pytest.fixture
def rotating():
    with FakeOAuthProvider(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rotate_refresh_tokens=True) as p:
        yield p


@pytest.fixture
def google():
    with FakeGoogle(slow_seconds=SLOW) as fake_google:
        yield fake_google


@pytest.fixture
def backoff_waits(monkeypatch) -> list[float]:
    """google-auth's own retries of a 429/5xx token answer, without their real 1 s + 2 s waits."""
    waits: list[float] = []
    monkeypatch.setattr(backoff, "time", SimpleNamespace(sleep=waits.append))
    return waits


def _refresh(url: str, refresh_token: str, *, basic: bool = False, client_id: str = CLIENT_ID,
             client_secret: str = CLIENT_SECRET, timeout: float = TIMEOUT, **extra) -> requests.Response:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    auth = (client_id, client_secret) if basic else None
    if not basic:
        form |= {"client_id": client_id, "client_secret": client_secret}
    return requests.post(url, data=form, auth=auth, timeout=timeout)


def _userinfo(url: str, access_token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {access_token}"} if access_token is not None else {}
    return requests.get(url, headers=headers, timeout=TIMEOUT)


def _credentials(token_uri: str, refresh_token: str, **kwargs) -> Credentials:
    return Credentials(token=None, refresh_token=refresh_token, token_uri=token_uri, client_id=CLIENT_ID,
                       client_secret=CLIENT_SECRET, **kwargs)


def _access(fake: FakeOAuthProvider, subject: str = "alice") -> tuple[str, str]:
    """A refresh token of ``subject`` and an access token got with it over the wire."""
    refresh_token = fake.grant(subject)
    answer = _refresh(fake.token_url, refresh_token)
    assert answer.status_code == 200, answer.text
    return refresh_token, answer.json()["access_token"]


# --------------------------------------------------------------------------- the refresh grant


def test_a_refresh_with_client_secret_post_answers_rfc_6749_section_5_1(fake):
    refresh_token = fake.grant("alice", scopes=("openid", "email", "calendar"))
    answer = _refresh(fake.token_url, refresh_token)
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"access_token", "expires_in", "token_type", "scope"}  # no rotation by default
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == "openid email calendar"
    assert answer.headers["Cache-Control"] == "no-store" and answer.headers["Pragma"] == "no-cache"
    assert answer.headers["Content-Type"].startswith("application/json")
    [logged] = fake.state.token_requests
    assert logged["status"] == 200 and logged["outcome"] == "refreshed" and logged["client_auth"] == "post"
    assert logged["subject"] == "alice" and logged["fingerprint"] == fingerprint(refresh_token)
    assert refresh_token not in repr(fake.state.token_requests)  # a fingerprint, never the token
    assert _userinfo(fake.userinfo_url, body["access_token"]).status_code == 200


def test_a_refresh_with_client_secret_basic_works_with_or_without_form_encoding(fake):
    refresh_token = fake.grant("alice")
    plain = _refresh(fake.token_url, refresh_token, basic=True)  # requests does not form-encode
    assert plain.status_code == 200, plain.text
    encoded = base64.b64encode(b"almanac-client:s3cr3t%2B%2F%3D%25").decode()  # RFC 6749 §2.3.1
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    headers = {"Authorization": f"Basic {encoded}"}
    answer = requests.post(fake.token_url, data=form, headers=headers, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert [r["client_auth"] for r in fake.state.token_requests] == ["basic", "basic"]
    assert fake.state.refreshes(refresh_token) == 2


@pytest.mark.parametrize(
    "basic, client_id, client_secret, description",
    [
        (False, CLIENT_ID, "wrong", "Unauthorized"),
        (True, CLIENT_ID, "wrong", "Unauthorized"),
        (False, "another-client", CLIENT_SECRET, "The OAuth client was not found."),
        (True, "another-client", CLIENT_SECRET, "The OAuth client was not found."),
        (False, CLIENT_ID, "", "The OAuth client was not found."),
    ],
)
def test_a_wrong_client_is_401_invalid_client_with_a_basic_challenge(fake, basic, client_id, client_secret,
                                                                    description):
    answer = _refresh(fake.token_url, fake.grant("alice"), basic=basic, client_id=client_id,
                      client_secret=client_secret)
    assert answer.status_code == 401
    assert answer.json() == {"error": "invalid_client", "error_description": description}
    assert answer.headers["WWW-Authenticate"].startswith("Basic")
    assert fake.state.refreshes() == 0


def test_no_client_authentication_or_two_methods_at_once_are_refused(fake):
    refresh_token = fake.grant("alice")
    bare = requests.post(fake.token_url, data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                         timeout=TIMEOUT)
    assert bare.status_code == 401 and bare.json()["error"] == "invalid_client"
    both = requests.post(
        fake.token_url, auth=(CLIENT_ID, CLIENT_SECRET), timeout=TIMEOUT,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token, "client_secret": CLIENT_SECRET},
    )
    assert both.status_code == 400 and both.json()["error"] == "invalid_request"
    garbled = requests.post(fake.token_url, headers={"Authorization": "Basic !!!"}, timeout=TIMEOUT,
                            data={"grant_type": "refresh_token", "refresh_token": refresh_token})
    assert garbled.status_code == 401 and garbled.json()["error"] == "invalid_client"


def test_any_client_is_accepted_when_the_provider_names_none():
    with FakeOAuthProvider() as anyone:
        answer = _refresh(anyone.token_url, anyone.grant("alice"), client_id="x", client_secret="y")
        assert answer.status_code == 200


def test_a_wrong_grant_type_or_a_missing_or_repeated_parameter_is_400(fake):
    refresh_token = fake.grant("alice")
    wrong = _refresh(fake.token_url, refresh_token, grant_type="authorization_code")
    assert wrong.status_code == 400
    assert wrong.json() == {"error": "unsupported_grant_type",
                            "error_description": "Invalid grant_type: authorization_code"}
    missing = _refresh(fake.token_url, "")
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    repeated = requests.post(
        fake.token_url, timeout=TIMEOUT,
        data=[("grant_type", "refresh_token"), ("refresh_token", refresh_token),
              ("refresh_token", refresh_token), ("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)],
    )
    assert repeated.status_code == 400 and repeated.json()["error"] == "invalid_request"
    assert fake.state.refreshes() == 0


def test_an_unknown_forged_or_foreign_refresh_token_is_invalid_grant_with_googles_text(fake):
    genuine = fake.grant("alice")
    body, _, signature = genuine.rpartition(".")
    forged_subject = genuine.replace(".YWxpY2U.", ".bWFsbG9yeQ.")  # "alice" -> "mallory", same signature
    foreign = OAuthState().grant("alice")  # another provider's secret
    for token in ("1//unknown", f"{body}.{signature[:-2]}xx", forged_subject, foreign, "rt....", "é"):
        answer = _refresh(fake.token_url, token)
        assert (answer.status_code, answer.json()) == (400, INVALID_GRANT), token
    assert _refresh(fake.token_url, genuine).status_code == 200


def test_a_narrower_scope_is_granted_and_a_wider_one_is_invalid_scope(fake):
    refresh_token = fake.grant("alice", scopes=("openid", "email", "calendar"))
    narrower = _refresh(fake.token_url, refresh_token, scope="calendar openid")
    assert narrower.status_code == 200 and narrower.json()["scope"] == "openid calendar"
    wider = _refresh(fake.token_url, refresh_token, scope="openid admin")
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"


def test_answers_keep_the_connection_alive(fake):
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=TIMEOUT)
    try:
        for _ in range(2):
            connection.request("GET", "/userinfo")
            answer = connection.getresponse()
            assert answer.read() and answer.status == 401
            assert answer.version == 11 and not answer.will_close  # HTTP/1.1, one connection for both
    finally:
        connection.close()


def test_the_token_endpoint_is_post_only_and_unknown_paths_are_404(fake):
    assert requests.get(fake.token_url, timeout=TIMEOUT).status_code == 405
    assert requests.get(f"{fake.url}/nowhere", timeout=TIMEOUT).status_code == 404


# --------------------------------------------------------------------------- userinfo


def test_userinfo_answers_the_claims_of_a_live_access_token(fake):
    _, access_token = _access(fake, "alice")
    answer = _userinfo(fake.userinfo_url, access_token)
    assert answer.status_code == 200
    claims = {"sub": "alice", "email": "alice@example.com", "email_verified": True, "name": "alice"}
    assert answer.json() == claims
    assert requests.post(fake.userinfo_url, headers={"Authorization": f"bearer {access_token}"},
                         timeout=TIMEOUT).status_code == 200  # POST too; the scheme is case-insensitive
    assert [r["status"] for r in fake.state.userinfo_requests] == [200, 200]
    assert fake.state.userinfo_requests[0]["subject"] == "alice"
    assert access_token not in repr(fake.state.userinfo_requests)


@pytest.mark.parametrize("case", ["missing", "garbled", "refresh token", "foreign", "expired"])
def test_userinfo_refuses_a_bad_access_token_with_rfc_6750_401(fake, case):
    refresh_token, live = _access(fake)
    token = {
        "missing": None,
        "garbled": live[:-3] + "abc",
        "refresh token": refresh_token,
        "foreign": OAuthState().issue_access_token("alice"),
        "expired": fake.state.issue_access_token("alice", ttl=-1),
    }[case]
    answer = _userinfo(fake.userinfo_url, token)
    assert answer.status_code == 401
    body = answer.json()
    assert body["error"] == "invalid_token" and body["error_description"]
    challenge = answer.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    assert body["error_description"] in challenge
    assert _userinfo(fake.userinfo_url, live).status_code == 200


def test_an_access_token_lives_for_its_ttl():
    with FakeOAuthProvider(access_token_ttl=1) as short:
        answer = _refresh(short.token_url, short.grant("alice"))
        assert answer.json()["expires_in"] == 1
        access_token = answer.json()["access_token"]
        assert _userinfo(short.userinfo_url, access_token).status_code == 200
        time.sleep(1.1)
        expired = _userinfo(short.userinfo_url, access_token)
        assert expired.status_code == 401
        assert expired.json()["error_description"] == "The access token expired."


# --------------------------------------------------------------------------- revocation and expiry


def test_revoke_refuses_the_refresh_token_and_the_access_tokens_issued_before(fake):
    refresh_token, access_token = _access(fake, "alice")
    other_grant, alice_elsewhere = _access(fake, "alice")
    _, bob_token = _access(fake, "bob")
    fake.revoke(refresh_token)
    answer = _refresh(fake.token_url, refresh_token)
    assert (answer.status_code, answer.json()) == (400, INVALID_GRANT)
    for token in (access_token, alice_elsewhere):  # every access token of the subject issued before
        refused = _userinfo(fake.userinfo_url, token)
        assert refused.json()["error_description"] == "The access token was revoked."
    assert _userinfo(fake.userinfo_url, bob_token).status_code == 200
    again = _refresh(fake.token_url, other_grant)  # another grant of alice's is not revoked
    assert again.status_code == 200
    assert _userinfo(fake.userinfo_url, again.json()["access_token"]).status_code == 200  # issued after
    assert _refresh(fake.token_url, fake.grant("alice")).status_code == 200  # she can connect again


def test_revoke_subject_refuses_every_grant_of_that_subject_only(fake):
    first, second, bob = fake.grant("alice"), fake.grant("alice"), fake.grant("bob")
    _, access_token = _access(fake, "alice")
    fake.state.revoke_subject("alice")
    assert [_refresh(fake.token_url, t).status_code for t in (first, second, bob)] == [400, 400, 200]
    assert _userinfo(fake.userinfo_url, access_token).status_code == 401
    assert _refresh(fake.token_url, fake.grant("alice")).status_code == 200


def test_revoke_of_an_unknown_token_raises(fake):
    with pytest.raises(ValueError):
        fake.revoke("rt.nothing")


def test_expire_access_tokens_makes_userinfo_401_but_refresh_still_works(fake):
    alice_refresh, alice_token = _access(fake, "alice")
    _, bob_token = _access(fake, "bob")
    fake.expire_access_tokens("alice")
    assert _userinfo(fake.userinfo_url, alice_token).status_code == 401
    assert _userinfo(fake.userinfo_url, bob_token).status_code == 200
    fresh = _refresh(fake.token_url, alice_refresh)
    assert fresh.status_code == 200
    assert _userinfo(fake.userinfo_url, fresh.json()["access_token"]).status_code == 200
    fake.expire_access_tokens()  # everyone's
    assert _userinfo(fake.userinfo_url, bob_token).status_code == 401
    assert _userinfo(fake.userinfo_url, fresh.json()["access_token"]).status_code == 401
    assert _refresh(fake.token_url, alice_refresh).status_code == 200


def test_the_rfc_7009_revocation_endpoint_answers_200_always(fake):
    refresh_token, access_token = _access(fake, "alice")
    _, other_access = _access(fake, "bob")
    for token in (refresh_token, "junk"):
        assert requests.post(fake.revoke_url, data={"token": token}, timeout=TIMEOUT).status_code == 200
    assert _refresh(fake.token_url, refresh_token).json() == INVALID_GRANT
    assert _userinfo(fake.userinfo_url, access_token).status_code == 401
    assert requests.post(fake.revoke_url, data={"token": other_access}, timeout=TIMEOUT).status_code == 200
    assert _userinfo(fake.userinfo_url, other_access).status_code == 401  # an access token alone


# --------------------------------------------------------------------------- rotation


def test_rotation_answers_a_new_refresh_token_and_the_used_one_is_invalid_grant(rotating):
    first = rotating.grant("alice")
    answer = _refresh(rotating.token_url, first)
    assert answer.status_code == 200
    second = answer.json()["refresh_token"]
    assert second != first and second.startswith("rt.")
    assert _refresh(rotating.token_url, first).json() == INVALID_GRANT  # reused
    third = _refresh(rotating.token_url, second, basic=True)
    assert third.status_code == 200 and third.json()["refresh_token"] not in (first, second)
    assert rotating.state.refreshes(first) == 1 and rotating.state.refreshes(second) == 1


def test_revoking_the_original_grant_revokes_the_tokens_rotated_from_it(rotating):
    original = rotating.grant("alice")
    current = _refresh(rotating.token_url, original).json()["refresh_token"]
    rotating.revoke(original)
    assert _refresh(rotating.token_url, current).json() == INVALID_GRANT


def test_concurrent_refreshes_of_one_rotating_token_succeed_exactly_once(rotating):
    token = rotating.grant("alice")
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def refresh() -> None:
        barrier.wait()
        statuses.append(_refresh(rotating.token_url, token).status_code)

    threads = [threading.Thread(target=refresh) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(statuses) == [200] + [400] * 7
    assert rotating.state.refreshes(token) == 1 == rotating.state.refreshes()


def test_a_rotate_prefix_rotates_on_a_provider_that_does_not(fake):
    plain = fake.grant("alice")
    assert "refresh_token" not in _refresh(fake.token_url, plain).json()
    token = fake.grant("alice", prefix="rotate-")
    rotated = _refresh(fake.token_url, token).json()["refresh_token"]
    assert rotated.startswith("rotate-rt.")  # the behaviour stays with the grant
    assert _refresh(fake.token_url, token).json() == INVALID_GRANT
    assert "refresh_token" in _refresh(fake.token_url, rotated).json()


# --------------------------------------------------------------------------- prefix behaviours


def test_prefix_revoked_is_always_invalid_grant(fake):
    answer = _refresh(fake.token_url, fake.grant("alice", prefix="revoked-"))
    assert (answer.status_code, answer.json()) == (400, INVALID_GRANT)


def test_prefix_ratelimited_is_429_with_retry_after_1(fake):
    answer = _refresh(fake.token_url, fake.grant("alice", prefix="ratelimited-"))
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
    assert answer.json()["error"] == "rate_limit_exceeded"


def test_prefix_unavailable_is_503_server_error(fake):
    answer = _refresh(fake.token_url, fake.grant("alice", prefix="unavailable-"))
    assert answer.status_code == 503 and answer.json()["error"] == "server_error"


def test_prefix_slow_answers_after_slow_seconds_and_a_client_that_gave_up_lost_a_rotated_token(fake):
    started = time.monotonic()
    assert _refresh(fake.token_url, fake.grant("alice", prefix="slow-")).status_code == 200
    assert time.monotonic() - started >= SLOW
    token = fake.grant("alice", prefix="slow-rotate-")
    with pytest.raises(requests.ReadTimeout):
        _refresh(fake.token_url, token, timeout=SLOW / 4)
    assert fake.state.refreshes(token) == 1  # done on the provider's side...
    assert _refresh(fake.token_url, token).json() == INVALID_GRANT  # ...so the token was used up


def test_prefix_badjson_is_200_with_a_body_that_is_not_json_and_issues_nothing(fake):
    answer = _refresh(fake.token_url, fake.grant("alice", prefix="badjson-"))
    assert answer.status_code == 200 and answer.content == BAD_JSON_BODY
    assert answer.headers["Content-Type"].startswith("text/html")
    with pytest.raises(requests.JSONDecodeError):
        answer.json()
    assert fake.state.refreshes() == 0 and fake.state.token_requests[0]["outcome"] == "badjson"


def test_prefix_noexpiry_succeeds_without_expires_in(fake):
    answer = _refresh(fake.token_url, fake.grant("alice", prefix="noexpiry-"))
    assert answer.status_code == 200 and "expires_in" not in answer.json() and answer.json()["access_token"]


def test_stop_wakes_a_slow_answer():
    provider = FakeOAuthProvider(slow_seconds=30).start()
    outcome: list[object] = []

    def refresh() -> None:
        try:
            outcome.append(_refresh(provider.token_url, provider.grant("a", prefix="slow-"), timeout=30))
        except requests.RequestException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=refresh)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not provider.state.token_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    provider.stop()
    thread.join(TIMEOUT)
    assert outcome and time.monotonic() - started < 5


# --------------------------------------------------------------------------- injected faults


def test_fail_next_token_429_and_503_then_the_refresh_works(fake):
    refresh_token = fake.grant("alice")
    fake.fail_next(1, 429, retry_after=7)
    fake.fail_next(1, 503)
    limited = _refresh(fake.token_url, refresh_token)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert limited.json()["error"] == "rate_limit_exceeded" and limited.headers["Cache-Control"] == "no-store"
    down = _refresh(fake.token_url, refresh_token)
    assert down.status_code == 503 and down.json()["error"] == "server_error"
    assert "Retry-After" not in down.headers
    assert _refresh(fake.token_url, refresh_token).status_code == 200
    assert [r["outcome"] for r in fake.state.token_requests] == ["injected", "injected", "refreshed"]


def test_fail_next_other_4xx_answer_the_oauth_shape(fake):
    fake.fail_next(1, 400)
    fake.fail_next(1, 401)
    fake.fail_next(1, 403)
    answers = [_refresh(fake.token_url, fake.grant("alice")) for _ in range(3)]
    assert [(a.status_code, a.json()["error"]) for a in answers] == [
        (400, "invalid_request"), (401, "invalid_client"), (403, "access_denied")
    ]
    assert answers[1].headers["WWW-Authenticate"].startswith("Basic")


def test_fail_next_by_endpoint(fake):
    refresh_token, access_token = _access(fake)
    fake.fail_next(1, 503, endpoint="userinfo")
    assert _refresh(fake.token_url, refresh_token).status_code == 200  # not the token endpoint's
    down = _userinfo(fake.userinfo_url, access_token)
    assert down.status_code == 503 and down.json()["error"] == "server_error"
    fake.fail_next(1, 401, endpoint="userinfo", retry_after=2)
    refused = _userinfo(fake.userinfo_url, access_token)
    assert refused.status_code == 401 and refused.headers["Retry-After"] == "2"
    assert refused.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    fake.fail_next(2, 429, endpoint="any")
    assert _userinfo(fake.userinfo_url, access_token).status_code == 429
    assert _refresh(fake.token_url, refresh_token).status_code == 429
    assert _userinfo(fake.userinfo_url, access_token).status_code == 200


@pytest.mark.parametrize(
    "args, kwargs",
    [((-1,), {}), ((1, 200), {}), ((1, 600), {}), ((1, 429), {"endpoint": "api"}),
     ((1, 429), {"retry_after": -1})],
)
def test_fail_next_refuses_nonsense(fake, args, kwargs):
    with pytest.raises(ValueError):
        fake.fail_next(*args, **kwargs)


# --------------------------------------------------------------------------- counters, reset, secret


def test_counters_and_reset(fake):
    refresh_token, access_token = _access(fake)
    _refresh(fake.token_url, "unknown")
    _userinfo(fake.userinfo_url, access_token)
    assert [r["status"] for r in fake.state.token_requests] == [200, 400]
    assert fake.state.token_requests[1]["outcome"] == "invalid_grant"
    assert fake.state.refreshes() == 1 and fake.state.refreshes(refresh_token) == 1
    assert fake.state.refreshes("unknown") == 0
    fake.revoke(refresh_token)
    fake.fail_next(1, 503)
    fake.state.reset()  # forgets the revocation and the fault too; tokens stay valid
    assert fake.state.token_requests == [] and fake.state.userinfo_requests == []
    assert fake.state.refreshes() == 0
    assert _refresh(fake.token_url, refresh_token).status_code == 200
    assert _userinfo(fake.userinfo_url, access_token).status_code == 200


def test_the_same_secret_accepts_the_tokens_of_an_earlier_instance():
    with FakeOAuthProvider(secret="kept") as first:
        refresh_token, access_token = _access(first)
    with FakeOAuthProvider(secret="kept") as second:
        assert _userinfo(second.userinfo_url, access_token).status_code == 200
        assert _refresh(second.token_url, refresh_token).status_code == 200
    with FakeOAuthProvider(secret="another") as third:
        assert _userinfo(third.userinfo_url, access_token).status_code == 401
        assert _refresh(third.token_url, refresh_token).json() == INVALID_GRANT


def test_a_token_marker_must_not_be_base64url():
    with pytest.raises(ValueError):
        OAuthState(refresh_marker="rt")


# --------------------------------------------------------------------------- admin endpoints


def test_the_admin_endpoints_drive_the_fake_from_another_process(fake):
    admin = requests.Session()
    spec = {"subject": "carol", "scopes": ["openid"], "prefix": "rotate-"}
    granted = admin.post(f"{fake.url}/_grant", json=spec, timeout=TIMEOUT)
    assert granted.status_code == 200
    token = granted.json()["refresh_token"]
    answer = _refresh(fake.token_url, token)
    assert answer.json()["scope"] == "openid" and "refresh_token" in answer.json()
    token, access_token = answer.json()["refresh_token"], answer.json()["access_token"]

    assert admin.post(f"{fake.url}/_expire", json={"subject": "carol"}, timeout=TIMEOUT).status_code == 204
    assert _userinfo(fake.userinfo_url, access_token).status_code == 401
    answer = _refresh(fake.token_url, token)
    token, access_token = answer.json()["refresh_token"], answer.json()["access_token"]
    assert admin.post(f"{fake.url}/_expire", timeout=TIMEOUT).status_code == 204  # everyone's, no body
    assert _userinfo(fake.userinfo_url, access_token).status_code == 401

    spec = {"n": 1, "status": 503, "retry_after": 3, "endpoint": "token"}
    assert admin.post(f"{fake.url}/_fail_next", json=spec, timeout=TIMEOUT).status_code == 204
    down = _refresh(fake.token_url, token)
    assert down.status_code == 503 and down.headers["Retry-After"] == "3"

    revoked = admin.post(f"{fake.url}/_revoke", json={"refresh_token": token}, timeout=TIMEOUT)
    assert revoked.status_code == 204
    assert _refresh(fake.token_url, token).json() == INVALID_GRANT
    dave = admin.post(f"{fake.url}/_grant", json={"subject": "dave"}, timeout=TIMEOUT).json()["refresh_token"]
    assert admin.post(f"{fake.url}/_revoke", json={"subject": "dave"}, timeout=TIMEOUT).status_code == 204
    assert _refresh(fake.token_url, dave).json() == INVALID_GRANT

    stats = admin.get(f"{fake.url}/_stats", timeout=TIMEOUT).json()
    assert stats == {"token_requests": 5, "userinfo_requests": 2, "refreshes": 2}
    assert admin.post(f"{fake.url}/_reset", timeout=TIMEOUT).status_code == 204
    assert admin.get(f"{fake.url}/_stats", timeout=TIMEOUT).json() == {
        "token_requests": 0, "userinfo_requests": 0, "refreshes": 0
    }
    assert _refresh(fake.token_url, dave).status_code == 200  # the revocation was forgotten


@pytest.mark.parametrize(
    "path, body",
    [("/_grant", {}), ("/_grant", {"subject": ""}), ("/_revoke", {}), ("/_revoke", {"refresh_token": "x"}),
     ("/_fail_next", {"status": 200}), ("/_fail_next", {"endpoint": "nowhere"}), ("/_grant", [1])],
)
def test_the_admin_endpoints_refuse_bad_requests_with_400(fake, path, body):
    answer = requests.post(f"{fake.url}{path}", json=body, timeout=TIMEOUT)
    assert answer.status_code == 400 and answer.json()["error"]
    assert requests.post(f"{fake.url}/_grant", data=b"{not json", timeout=TIMEOUT).status_code == 400
    assert requests.get(f"{fake.url}/_grant", timeout=TIMEOUT).status_code == 405


# --------------------------------------------------------------------------- google-auth


def test_google_auth_refreshes_against_the_provider(fake):
    creds = _credentials(fake.token_url, fake.grant("alice"))
    creds.refresh(Request())
    assert creds.valid and creds.expiry is not None and creds.refresh_token.startswith("rt.")
    assert _userinfo(fake.userinfo_url, creds.token).json()["sub"] == "alice"
    assert fake.state.token_requests[0]["client_auth"] == "post"  # what google-auth sends


def test_google_auth_sees_rotation_as_a_new_refresh_token(rotating):
    first = rotating.grant("alice")
    creds = _credentials(rotating.token_url, first)
    creds.refresh(Request())
    assert creds.refresh_token != first
    creds.refresh(Request())  # with the rotated one
    assert rotating.state.refreshes() == 2
    stale = _credentials(rotating.token_url, first)
    with pytest.raises(RefreshError) as refused:
        stale.refresh(Request())
    assert "invalid_grant" in str(refused.value.args) and not refused.value.retryable


@pytest.mark.parametrize("how", ["revoked prefix", "revoke", "unknown"])
def test_google_auth_raises_refresh_error_on_invalid_grant(fake, how):
    token = fake.grant("alice", prefix="revoked-" if how == "revoked prefix" else "")
    if how == "revoke":
        fake.revoke(token)
    creds = _credentials(fake.token_url, token if how != "unknown" else "rt.unknown")
    with pytest.raises(RefreshError) as refused:
        creds.refresh(Request())
    assert "invalid_grant" in refused.value.args[0] and INVALID_GRANT_DESCRIPTION in refused.value.args[0]
    assert refused.value.args[1] == INVALID_GRANT and not creds.valid


def test_google_auth_retries_an_injected_429_and_503_itself(fake, backoff_waits):
    fake.fail_next(1, 429, retry_after=1)
    fake.fail_next(1, 503)
    creds = _credentials(fake.token_url, fake.grant("alice"))
    creds.refresh(Request())
    assert creds.valid and [r["status"] for r in fake.state.token_requests] == [429, 503, 200]
    assert len(backoff_waits) == 2


@pytest.mark.parametrize("prefix, status", [("ratelimited-", 429), ("unavailable-", 503)])
def test_google_auth_gives_up_on_a_token_that_is_always_429_or_503(fake, backoff_waits, prefix, status):
    creds = _credentials(fake.token_url, fake.grant("alice", prefix=prefix))
    with pytest.raises(RefreshError) as failed:
        creds.refresh(Request())
    assert failed.value.retryable
    assert [r["status"] for r in fake.state.token_requests] == [status] * 3  # google-auth tried 3 times


def test_google_auth_waits_for_a_slow_refresh(fake):
    creds = _credentials(fake.token_url, fake.grant("alice", prefix="slow-"))
    started = time.monotonic()
    creds.refresh(Request())
    assert creds.valid and time.monotonic() - started >= SLOW


def test_google_auth_with_noexpiry_and_badjson(fake):
    creds = _credentials(fake.token_url, fake.grant("alice", prefix="noexpiry-"))
    creds.refresh(Request())
    assert creds.token and creds.expiry is None
    broken = _credentials(fake.token_url, fake.grant("alice", prefix="badjson-"))
    with pytest.raises(Exception) as failed:  # noqa: B017 - google-auth indexes the text: TypeError
        broken.refresh(Request())
    assert not isinstance(failed.value, RefreshError) or "access_token" in str(failed.value)


# --------------------------------------------------------------------------- FakeGoogle


def test_fake_google_refresh_keeps_googles_token_shapes_and_scope(google):
    token = google.grant("alice")
    assert token.startswith("1//refresh-")
    creds = _credentials(google.token_uri, token)
    creds.refresh(Request())
    assert creds.token.startswith("ya29.fake-") and creds.refresh_token == token
    assert google.token_calls() == 1 and google.state.refreshes(token) == 1
    answer = _refresh(google.token_uri, token, basic=True)  # Basic works too
    assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-store"
    assert answer.json()["scope"] == CALENDAR_EVENTS_SCOPE and answer.json()["expires_in"] == 3600
    events = requests.get(f"{google.api_endpoint}calendars/primary/events", timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {answer.json()['access_token']}"})
    assert events.status_code == 200  # the Calendar API accepts what the token endpoint issued


def test_fake_google_rotation_and_invalid_grant_text():
    with FakeGoogle(rotate_refresh_tokens=True) as google:
        first = google.grant("alice")
        creds = _credentials(google.token_uri, first)
        creds.refresh(Request())
        assert creds.refresh_token != first and creds.refresh_token.startswith("1//refresh-")
        reused = _refresh(google.token_uri, first)
        assert (reused.status_code, reused.json()) == (400, INVALID_GRANT)
        with pytest.raises(RefreshError, match="invalid_grant"):
            _credentials(google.token_uri, first).refresh(Request())
    with FakeGoogle() as google:  # a rotate- grant rotates on a fake that does not
        token = google.grant("bob", prefix="rotate-")
        assert _refresh(google.token_uri, token).json()["refresh_token"] != token
        assert _refresh(google.token_uri, token).json() == INVALID_GRANT


def test_fake_google_revoke_and_expiry_reach_the_calendar_api_and_userinfo(google):
    token = google.grant("alice")
    access_token = _refresh(google.token_uri, token).json()["access_token"]
    events = f"{google.api_endpoint}calendars/primary/events"
    auth = {"Authorization": f"Bearer {access_token}"}
    assert requests.get(events, headers=auth, timeout=TIMEOUT).status_code == 200
    google.expire_access_tokens()
    assert requests.get(events, headers=auth, timeout=TIMEOUT).status_code == 401
    assert _userinfo(google.userinfo_url, access_token).status_code == 401
    fresh = _refresh(google.token_uri, token).json()["access_token"]
    assert _userinfo(google.userinfo_url, fresh).status_code == 200
    google.revoke(token)
    assert _refresh(google.token_uri, token).json() == INVALID_GRANT
    assert _userinfo(events, fresh).status_code == 401
    issued = google.issue_access_token("alice")  # after the revocation: valid
    assert _userinfo(events, issued).status_code == 200


def test_fake_google_userinfo_v3_and_oidc_v1(google):
    access_token = google.issue_access_token("alice")
    for url in (google.userinfo_url, google.oidc_userinfo_url):
        assert url.endswith(("/oauth2/v3/userinfo", "/v1/userinfo"))
        answer = _userinfo(url, access_token)
        assert answer.status_code == 200
        assert answer.json() == {"sub": "alice", "email": "alice@example.com", "email_verified": True}
        for bad in (None, "ya29.stale", google.issue_access_token("alice", ttl=-1)):
            refused = _userinfo(url, bad)
            assert refused.status_code == 401
            assert refused.json() == {"error": "invalid_request", "error_description": "Invalid Credentials"}
            assert refused.headers["WWW-Authenticate"] == (
                'Bearer realm="https://accounts.google.com/", error="invalid_token"'
            )
    assert google.requests == []  # userinfo is not an API call: the Calendar logs are untouched


def test_fake_google_token_and_userinfo_faults(google, backoff_waits):
    token = google.grant("alice")
    google.fail_next_token(1, 429, retry_after=5)
    limited = _refresh(google.token_uri, token)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "5"
    assert limited.json()["error"] == "rate_limit_exceeded"
    google.fail_next_token(2, 503)
    creds = _credentials(google.token_uri, token)
    creds.refresh(Request())  # google-auth retried twice
    assert creds.valid and google.token_calls() == 4 and len(backoff_waits) == 2
    google.fail_next_token(1, 503, endpoint="userinfo")
    assert _userinfo(google.userinfo_url, creds.token).status_code == 503
    google.fail_next_token(1, 401, endpoint="userinfo")
    assert _userinfo(google.userinfo_url, creds.token).json()["error_description"] == "Invalid Credentials"
    assert _userinfo(google.userinfo_url, creds.token).status_code == 200
    google.fail_next(1, 503)  # the API faults are still their own
    assert _refresh(google.token_uri, token).status_code == 200


def test_fake_google_slow_grant(google):
    started = time.monotonic()
    assert _refresh(google.token_uri, google.grant("alice", prefix="slow-")).status_code == 200
    assert time.monotonic() - started >= SLOW


# --------------------------------------------------------------------------- the runner


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_runner(port: int, secret: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "almanac.integrations.fakes", "serve", "--port", str(port),
        "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET, "--secret", secret,
        "--access-token-ttl", "600",
    ]
    env = {key: value for key, value in os.environ.items() if key != "ALMANAC_FAKE_OAUTH_SECRET"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}/_stats", timeout=1)
            return proc
        except requests.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the runner did not start: {proc.communicate()[0]}") from None
            time.sleep(0.1)


def _stop_runner(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, output
    return output


def test_the_runner_serves_until_sigterm_and_keeps_tokens_valid_with_the_same_secret():
    port, secret = _free_port(), "runner-secret-" + "9" * 20
    url = f"http://127.0.0.1:{port}"
    proc = _start_runner(port, secret)
    try:
        granted = requests.post(f"{url}/_grant", json={"subject": "erin"}, timeout=TIMEOUT)
        refresh_token = granted.json()["refresh_token"]
        answer = _refresh(f"{url}/oauth/token", refresh_token, basic=True)
        assert answer.status_code == 200 and answer.json()["expires_in"] == 600
        access_token = answer.json()["access_token"]
        assert _refresh(f"{url}/oauth/token", refresh_token, client_secret="wrong").status_code == 401
        assert _userinfo(f"{url}/userinfo", access_token).json()["sub"] == "erin"
    finally:
        output = _stop_runner(proc)
    assert f"fake OAuth provider on {url}" in output
    assert secret not in output and refresh_token not in output and access_token not in output

    proc = _start_runner(port, secret)  # restarted with the same secret
    try:
        assert _userinfo(f"{url}/userinfo", access_token).json()["sub"] == "erin"
        assert _refresh(f"{url}/oauth/token", refresh_token).status_code == 200
    finally:
        _stop_runner(proc)

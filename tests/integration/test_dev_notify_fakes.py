"""What ``./dev up`` does for notifications (tools/dev.py), against a throwaway profile.

The provider fakes run as their own process with the token in its environment, not on its
command line; the stack's ``smtp_default`` / ``sms_default`` / ``fcm_default`` connections (parsed
by Airflow itself) reach them with the real clients; what they accept lands in the profile's
outbox folder; ``down`` stops them; the test profile starts none. The notification pools are
created through the REST API only when missing, against a stand-in for Airflow's pools API.
"""

from __future__ import annotations

import json
import smtplib
import stat
import threading
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from google.auth.transport.requests import AuthorizedSession
from google.oauth2 import service_account

from almanac.notify.fakes import FCM_SCOPE
from tests.support.dev_tool import free_port, load_dev_module

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "ALMANAC_NOTIFYTEST_"


@pytest.fixture(scope="module")
def dev():
    return load_dev_module("almanac_devtool_notify")



@pytest.fixture
def profile(dev, tmp_path, monkeypatch):
    """A profile of its own with notification fakes on free ports (no demo feeds)."""
    monkeypatch.setenv(PREFIX + "VAR_DIR", str(tmp_path / "var"))
    for key in ("APP_DB_URL", "AIRFLOW_DB_URL", "REDIS_URL"):
        monkeypatch.delenv(PREFIX + key, raising=False)
    ports = (free_port(), free_port(), free_port())
    return dev.Profile(
        "throwaway", free_port(), free_port(), free_port(), PREFIX, notify_fakes_ports=ports
    )


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _connection(env: dict[str, str], conn_id: str):
    from airflow.models.connection import Connection

    return Connection.from_json(env[f"AIRFLOW_CONN_{conn_id.upper()}"], conn_id=conn_id)


def test_the_test_profile_starts_no_fakes_and_routes_no_connections(dev, tmp_path, monkeypatch):
    assert dev.PROFILES["test"].notify_fakes is None
    assert dev.PROFILES["dev"].notify_fakes == {"email": 58025, "sms": 58026, "push": 58027}
    monkeypatch.setenv(PREFIX + "VAR_DIR", str(tmp_path / "var"))
    bare = dev.Profile("bare", free_port(), free_port(), free_port(), PREFIX)
    env = dev.stack_env(bare, provision=False)
    assert not [key for key in env if key.startswith("AIRFLOW_CONN_") and key != "AIRFLOW_CONN_APP_DB"
                and key != "AIRFLOW_CONN_REDIS_DEFAULT"]
    assert "ALMANAC_OUTBOX_DIR" not in env
    assert dev.start_notify_fakes(bare, dev.load_secrets(bare)) is None


def test_an_older_secrets_file_gets_an_sms_token(dev, profile):
    profile.var.mkdir(parents=True)
    path = profile.var / "secrets.json"
    path.write_text(json.dumps({"pg_password": "x", "token_fernet_key": "k"}))
    path.chmod(0o600)
    sec = dev.load_secrets(profile)
    assert len(sec["sms_auth_token"]) == 32 and sec["token_fernet_key"] == "k"
    assert json.loads(path.read_text())["sms_auth_token"] == sec["sms_auth_token"]
    assert dev.load_secrets(profile)["sms_auth_token"] == sec["sms_auth_token"], "kept once made"


def test_up_starts_the_fakes_and_the_connections_reach_them(dev, profile):
    sec = dev.load_secrets(profile)
    env = dev.stack_env(profile, provision=False)
    smtp_conn, sms_conn, fcm_conn = (
        _connection(env, c) for c in ("smtp_default", "sms_default", "fcm_default")
    )
    ports = profile.notify_fakes
    pid = dev.start_notify_fakes(profile, sec)
    try:
        assert dev.start_notify_fakes(profile, sec) == pid, "a second up reuses the running fakes"
        assert sec["sms_auth_token"] not in _cmdline(pid), "the token is not on the command line"
        assert f"--smtp-port {ports['email']}" in _cmdline(pid)

        # smtp_default: the SMTP provider's fields, plain TCP, the hook's own resends off.
        assert (smtp_conn.conn_type, smtp_conn.host, smtp_conn.port) == ("smtp", "127.0.0.1", ports["email"])
        extra = smtp_conn.extra_dejson
        assert extra["disable_tls"] is True and extra["disable_ssl"] is True and extra["retry_limit"] == 0
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = extra["from_email"], "ana@example.test", "Hello"
        msg["Message-ID"] = "<dev-up@almanac.test>"
        msg.set_content("from ./dev up")
        with smtplib.SMTP(smtp_conn.host, smtp_conn.port, timeout=10) as client:
            client.send_message(msg)

        # sms_default: base URL in host, account SID and token as login and password.
        assert sms_conn.conn_type == "http" and sms_conn.extra_dejson == {"from_number": "+15550009999"}
        sent = requests.post(
            f"{sms_conn.host}/2010-04-01/Accounts/{sms_conn.login}/Messages.json",
            data={"To": "+15551230001", "From": sms_conn.extra_dejson["from_number"], "Body": "hi"},
            auth=(sms_conn.login, sms_conn.password),
            timeout=10,
        )
        assert sent.status_code == 201, sent.text

        # fcm_default: base URL in host, project and a service-account key file for google-auth.
        fcm_extra = fcm_conn.extra_dejson
        key_file = Path(fcm_extra["service_account_file"])
        assert key_file.parent == profile.outbox_dir and stat.S_IMODE(key_file.stat().st_mode) == 0o600
        credentials = service_account.Credentials.from_service_account_file(str(key_file), scopes=[FCM_SCOPE])
        pushed = AuthorizedSession(credentials).post(
            f"{fcm_conn.host}/v1/projects/{fcm_extra['project_id']}/messages:send",
            json={"message": {"token": "device-1", "notification": {"title": "t", "body": "b"}}},
            timeout=10,
        )
        assert pushed.status_code == 200, pushed.text
    finally:
        dev.stop_notify_fakes(profile)
    outbox = profile.outbox_dir
    assert len(list((outbox / "email").glob("*.eml"))) == 1
    assert json.loads((outbox / "sms.jsonl").read_text())["sid"] == sent.json()["sid"]
    assert json.loads((outbox / "push.jsonl").read_text())["name"] == pushed.json()["name"]
    assert not dev._pidfile(profile, dev.NOTIFY_FAKES).exists()
    assert not any(dev._port_open(port) for port in ports.values())


class _PoolsApi(BaseHTTPRequestHandler):
    """A stand-in for the three calls of Airflow's REST API ``ensure_notify_pools`` makes."""

    pools: dict[str, dict] = {}
    posted: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        assert self.headers["Authorization"] == "Bearer jwt"
        name = self.path.rsplit("/", 1)[1]
        self._answer(200, self.pools[name]) if name in self.pools else self._answer(404, {"detail": "nope"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/auth/token":
            return self._answer(201, {"access_token": "jwt"})
        assert self.path == "/api/v2/pools" and self.headers["Authorization"] == "Bearer jwt"
        self.posted.append(body)
        self.pools[body["name"]] = body
        self._answer(201, body)


def test_pools_are_created_when_missing_and_kept_when_there(dev, tmp_path):
    _PoolsApi.pools = {"notifications_sms": {"name": "notifications_sms", "slots": 10}}
    _PoolsApi.posted = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PoolsApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path / "airflow"
    home.mkdir()
    (home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({"admin": "pw"}))
    env = {"ALMANAC_API_URL": f"http://127.0.0.1:{server.server_address[1]}", "AIRFLOW_HOME": str(home)}
    try:
        assert dev.ensure_notify_pools(env) == ["notifications_email", "notifications_push"]
        assert [(p["name"], p["slots"]) for p in _PoolsApi.posted] == [
            ("notifications_email", 5),
            ("notifications_push", 5),
        ]
        assert _PoolsApi.pools["notifications_sms"]["slots"] == 10, "an edited pool is kept"
        assert dev.ensure_notify_pools(env) == [], "a second up creates nothing"
    finally:
        server.shutdown()
        server.server_close()

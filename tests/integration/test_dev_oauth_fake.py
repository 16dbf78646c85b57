"""What ``./dev up`` does for connected accounts (tools/dev.py), against a throwaway profile: the
fake OAuth provider runs as its own process with its secrets in its environment, the stack's
``oauth_demo`` connection (parsed by Airflow) reaches it, the demo grants it is given are accepted
by it — across a restart too — and refreshing them shows each demo case."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from almanac.google.crypto import TokenCipher
from almanac.integrations import store
from almanac.integrations.demo import DEMO_PROVIDER, connect_demo_integrations
from almanac.integrations.providers import ProviderConfig
from almanac.integrations.refresh import Refresher
from almanac.leases import LeaseKeeper
from tests.support.db import lent
from tests.support.dev_tool import free_port, load_dev_module

PREFIX = "ALMANAC_OAUTHTEST_"


@pytest.fixture(scope="module")
def dev():
    return load_dev_module("almanac_devtool_oauth")


@pytest.fixture
def profile(dev, tmp_path, monkeypatch):
    monkeypatch.setenv(PREFIX + "VAR_DIR", str(tmp_path / "var"))
    for key in ("APP_DB_URL", "AIRFLOW_DB_URL", "REDIS_URL"):
        monkeypatch.delenv(PREFIX + key, raising=False)
    return dev.Profile(
        "throwaway", free_port(), free_port(), free_port(), PREFIX, oauth_fake_port=free_port()
    )


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_the_demo_grants_refresh_through_the_oauth_demo_connection(dev, profile, db, redis_client):
    from airflow.models.connection import Connection

    sec = dev.load_secrets(profile)
    env = dev.stack_env(profile, provision=False)
    conn = Connection.from_json(env["AIRFLOW_CONN_OAUTH_DEMO"], conn_id="oauth_demo")
    demo = ProviderConfig.from_connection(
        DEMO_PROVIDER, login=conn.login, password=conn.password, extra=conn.extra_dejson
    )
    assert demo.token_url == f"{profile.oauth_fake_url}/oauth/token"
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for user_id in (1, 2, 3, 4):
        db.execute(
            "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
            (user_id, f"u{user_id}", f"u{user_id}@x.test"),
        )
    db.commit()
    cipher = TokenCipher(sec["token_fernet_key"])
    assert connect_demo_integrations(db, cipher, secret=sec["oauth_fake_secret"]) == 4
    assert connect_demo_integrations(db, cipher, secret=sec["oauth_fake_secret"]) == 0  # idempotent
    ids = store.due_for_refresh(db, datetime.now(UTC))
    assert len(ids) == 4

    pid = dev.start_oauth_fake(profile, sec)
    try:
        assert dev.start_oauth_fake(profile, sec) == pid, "a second up reuses the running fake"
        assert sec["oauth_fake_secret"] not in _cmdline(pid) and sec["oauth_client_secret"] not in _cmdline(
            pid
        )
        dev.stop_oauth_fake(profile)
        pid = dev.start_oauth_fake(profile, sec)  # a restart: the same secret, the same grants valid
        with LeaseKeeper(redis_client, "dev-test") as leases:
            refresher = Refresher(cipher, lambda name: demo, leases, sleep=lambda s: None)
            results = {r.item_id: r for r in refresher.refresh_many(lambda: lent(db), ids, parallel=1)}
    finally:
        dev.stop_oauth_fake(profile)
    statuses = [results[i].status for i in ids]
    assert statuses == ["updated", "skipped", "error", "updated"]  # owner, revoked-, ratelimited-, plain
    assert "429" in results[ids[2]].error
    told = db.execute("SELECT user_id, kind FROM notifications").fetchall()
    assert told == [(1, "integration_revoked")]  # the tenant's owner (its first user), once
    assert dev._read_pid(dev._pidfile(profile, dev.OAUTH_FAKE)) is None


def test_the_test_profile_has_no_oauth_fake(dev):
    assert dev.PROFILES["test"].oauth_fake_url is None
    assert dev.PROFILES["dev"].oauth_fake_url == "http://127.0.0.1:58028"

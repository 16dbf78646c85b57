"""What ``./dev`` (tools/dev.py) creates, run against a throwaway profile in a temporary folder.

Secret files are 0600 and the profile folder private; no password is on a command line (every
process ./dev starts is recorded with an audit hook, and the running servers' /proc cmdlines are
read); Redis requires its password; the demo feed server process serves the feed files and
changes them deterministically per time bucket, and ``down`` stops it. The PostgreSQL and Redis
started here are private to the test (own folder, free ports) and stopped at its end.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from almanac.demo import generate
from almanac.demo_feeds import bucket_at, render, write_missing_feeds
from tests.support.dev_tool import free_port, load_dev_module

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "ALMANAC_STACKTEST_"


@pytest.fixture(scope="module")
def dev():
    return load_dev_module("almanac_devtool_stack")



@pytest.fixture
def profile(dev, tmp_path, monkeypatch):
    """A profile of its own: state in tmp_path/var, free ports, a demo feed server."""
    monkeypatch.setenv(PREFIX + "VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("AIRFLOW_VAR_ALMANAC_SETTINGS", raising=False)
    for key in ("APP_DB_URL", "AIRFLOW_DB_URL", "REDIS_URL"):
        monkeypatch.delenv(PREFIX + key, raising=False)
    return dev.Profile(
        "throwaway", free_port(), free_port(), free_port(), PREFIX, demo_feeds_port=free_port()
    )


@pytest.fixture
def permissive_umask():
    """umask 000: a file ./dev does not create private on purpose would come out world-readable."""
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_files_are_0600_and_the_profile_folder_private(dev, profile, permissive_umask):
    sec = dev.load_secrets(profile)
    env = dev.stack_env(profile, provision=False)
    dev.write_env_file(profile, env)
    (profile.var / "redis").mkdir()
    conf = dev.write_redis_conf(profile, sec, 6390)
    assert _mode(profile.var) == 0o700
    assert _mode(profile.var / "secrets.json") == 0o600
    assert _mode(profile.var / "env.sh") == 0o600
    assert _mode(conf) == 0o600 and f'requirepass "{sec["redis_password"]}"' in conf.read_text()
    assert _mode(profile.var / "airflow") == 0o700  # Airflow's generated admin password goes here
    assert not list(profile.var.rglob(".*.tmp")), "no temporary files left behind"


def test_an_older_world_readable_secrets_file_is_tightened(dev, profile):
    profile.var.mkdir(parents=True)
    profile.var.chmod(0o755)
    path = profile.var / "secrets.json"
    path.write_text(json.dumps({"pg_password": "x", "redis_password": "y"}))
    path.chmod(0o644)
    sec = dev.load_secrets(profile)
    assert _mode(path) == 0o600 and _mode(profile.var) == 0o700
    assert sec["token_fernet_key"] and json.loads(path.read_text())["pg_password"] == "x"


def test_demo_feed_host_is_merged_into_the_users_settings(dev):
    host = "127.0.0.1:58080"
    assert json.loads(dev.settings_allowing(None, host)) == {"ics_allow_hosts": host}
    mine = json.dumps({"ics_allow_hosts": "feeds.test:8000", "ics_batch_max": 100})
    merged = dev.settings_allowing(mine, host)
    assert json.loads(merged) == {"ics_allow_hosts": f"feeds.test:8000,{host}", "ics_batch_max": 100}
    assert dev.settings_allowing(merged, host) == merged, "merging twice changes nothing"
    assert dev.settings_allowing("[1]", host) is None and dev.settings_allowing("{", host) is None


def test_the_stack_env_shadows_no_almanac_settings_variable(dev, profile, monkeypatch):
    # Without a user-exported AIRFLOW_VAR_ALMANAC_SETTINGS the stack sets none: an environment
    # variable would shadow the Variable the UI, the e2e tests and the benchmarks set via the API.
    env = dev.stack_env(profile, provision=False)
    assert "AIRFLOW_VAR_ALMANAC_SETTINGS" not in env
    assert env["ALMANAC_DEMO_FEEDS_URL"] == profile.demo_feeds_url
    # One the user exported shadows the Variable anyway, so it gets the demo feed host too.
    monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_SETTINGS", json.dumps({"ics_batch_max": 100}))
    settings = json.loads(dev.stack_env(profile, provision=False)["AIRFLOW_VAR_ALMANAC_SETTINGS"])
    host = profile.demo_feeds_url.removeprefix("http://")
    assert settings == {"ics_allow_hosts": host, "ics_batch_max": 100}
    assert dev.PROFILES["test"].demo_feeds_port is None  # the tests bring their own feed servers


_LAUNCHED: list[list[str]] = []
_RECORDING = False


def _audit(event: str, args: tuple) -> None:
    if _RECORDING and event == "subprocess.Popen":
        _LAUNCHED.append([os.fsdecode(a) for a in (args[1] or [])])


sys.addaudithook(_audit)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_services_start_with_no_password_on_any_command_line(dev, profile):
    import psycopg
    import redis

    global _RECORDING
    sec = dev.load_secrets(profile)
    passwords = [sec["pg_superuser_password"], sec["pg_password"], sec["redis_password"]]
    _LAUNCHED.clear()
    _RECORDING = True
    try:
        app_url, _ = dev.start_postgres(profile, sec)
        redis_url = dev.start_redis(profile, sec)
    finally:
        _RECORDING = False
    try:
        launched = [" ".join(argv) for argv in _LAUNCHED]
        assert any("initdb" in cmd for cmd in launched) and any("redis-server" in cmd for cmd in launched)
        for cmd in launched:
            assert not any(p in cmd for p in passwords), f"a password on the command line: {cmd}"
        postmaster = int((profile.var / "pg" / "data" / "postmaster.pid").read_text().split()[0])
        redis_pid = int((profile.var / "redis" / "redis.pid").read_text())
        for pid in (postmaster, redis_pid):
            assert not any(p in _cmdline(pid) for p in passwords), _cmdline(pid)
        assert not (profile.var / "pg" / "pwfile").exists(), "initdb's password file is removed"
        # Redis refuses clients without the password; the stack's URL carries it.
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=profile.redis_port).ping()
        assert redis.Redis.from_url(redis_url).ping()
        with psycopg.connect(app_url) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == "almanac"
        # The profile folder stays closed to others; as root, PostgreSQL's own user may traverse it.
        if os.geteuid() == 0:
            pg_gid = dev.pwd.getpwnam(dev.PG_SYSTEM_USER).pw_gid
            assert _mode(profile.var) == 0o710 and profile.var.stat().st_gid == pg_gid
            assert (profile.var / "pg").stat().st_uid == dev.pwd.getpwnam(dev.PG_SYSTEM_USER).pw_uid
        else:
            assert _mode(profile.var) == 0o700
        assert _mode(profile.var / "pg") == 0o700
        assert _mode(profile.var / "secrets.json") == 0o600  # still, after the services started
    finally:
        dev.stop_redis(profile)
        dev.stop_postgres(profile)


def _get(url: str) -> tuple[int, str, int, int]:
    """(status, body, bucket before, bucket after) of one GET; the buckets tell which one served it."""
    before = bucket_at(time.time(), 1)
    with urllib.request.urlopen(url, timeout=10) as response:
        status, body = response.status, response.read().decode()
    return status, body, before, bucket_at(time.time(), 1)


def test_demo_feed_server_serves_the_files_and_changes_with_time(dev, profile, monkeypatch):
    monkeypatch.setenv(PREFIX + "DEMO_FEEDS_PERIOD_S", "1")  # a new bucket every second
    spec = dev.demo_spec(profile)
    data = generate(spec)
    assert {row[4] for row in data.calendars} == {
        f"{profile.demo_feeds_url}/calendar-{row[0]}.ics" for row in data.calendars
    }
    folder = profile.var / "feeds"
    write_missing_feeds(folder, data, spec)
    pid = dev.start_demo_feeds(profile)
    try:
        assert int(dev._pidfile(profile, dev.DEMO_FEEDS).read_text()) == pid
        assert dev.start_demo_feeds(profile) == pid, "a second up reuses the running server"
        url = f"{profile.demo_feeds_url}/calendar-1.ics"
        text = (folder / "calendar-1.ics").read_bytes().decode()
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 30
        while len(seen) < 2:  # two buckets, each body checked against the pure function
            assert time.monotonic() < deadline, "the feed did not change"
            status, body, before, after = _get(url)
            assert status == 200
            if before == after:
                assert body == render(text, "calendar-1.ics", before, 1)
                seen[before] = body
            time.sleep(0.2)
        first, second = seen.values()
        assert first != second
        # "Edit a feed": the file on disk is what is served.
        (folder / "calendar-1.ics").write_bytes(text.replace("SUMMARY:", "SUMMARY:Edited ", 1).encode())
        assert "SUMMARY:Edited " in _get(url)[1]
    finally:
        dev.stop_demo_feeds(profile)
    assert not dev._pidfile(profile, dev.DEMO_FEEDS).exists()
    assert not dev._port_open(int(profile.demo_feeds_url.rsplit(":", 1)[1]))

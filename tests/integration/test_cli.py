"""The ``almanac`` operator command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.feed_server import FeedServer, Route, redirect

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"


def almanac(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "almanac.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_inspect_prints_one_json_object_per_instance_in_the_window():
    out = almanac(
        "ics",
        "inspect",
        str(CORPUS / "rie_issue_62_moved_event.ics"),
        "--start",
        "2021-12-01",
        "--end",
        "2022-01-01",
        "--jsonl",
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 1  # the moved instance, and not its old date
    assert rows[0]["start"].startswith("2021-12-17")
    assert set(rows[0]) >= {"uid", "recurrence_id", "start", "end", "all_day", "summary", "status"}


def test_inspect_all_day_dates_and_zone_offsets():
    out = almanac(
        "ics",
        "inspect",
        str(CORPUS / "rie_daylight_saving_time.ics"),
        "--start",
        "2019-03-20",
        "--end",
        "2019-04-25",
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    starts = {r["start"] for r in rows if r["uid"] == "7uartkcnhf0elbvs8md0itrf6c@google.com"}
    assert "2019-03-20T19:00:00+01:00" in starts and "2019-04-24T19:00:00+02:00" in starts
    holidays = almanac(
        "ics",
        "inspect",
        str(CORPUS / "rie_issue_44_double_event.ics"),
        "--start",
        "2020-08-01",
        "--end",
        "2020-09-01",
    )
    (row,) = [json.loads(line) for line in holidays.stdout.splitlines()]
    assert (row["start"], row["all_day"]) == ("2020-08-14", True)


def test_inspect_of_a_file_that_is_not_icalendar_fails_in_one_line(tmp_path):
    bad = tmp_path / "page.ics"
    bad.write_text("<html><body>Please log in</body></html>")
    out = almanac("ics", "inspect", str(bad))
    assert out.returncode != 0
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("almanac:")


def test_inspect_a_url_goes_through_the_address_guard():
    body = (CORPUS / "rie_three_events.ics").read_bytes()
    with FeedServer({"/f.ics": Route(body=body)}) as server:
        window = ("--start", "2019-01-01", "--end", "2020-01-01")
        refused = almanac("ics", "inspect", server.url("/f.ics"), *window)
        allowed = almanac("ics", "inspect", server.url("/f.ics"), *window, "--allow-host", server.host_port)
    assert refused.returncode != 0
    assert "refused" in refused.stderr.lower()
    assert allowed.returncode == 0, allowed.stderr
    assert len(allowed.stdout.splitlines()) == 3


def test_sync_one_calendar_outside_airflow(db):
    body = (CORPUS / "rie_three_events.ics").read_bytes()
    with FeedServer({"/f.ics": Route(body=body)}) as server:
        db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
        db.execute(
            "INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (7, 1, 'c', %s)",
            (server.url("/f.ics"),),
        )
        db.commit()
        settings = json.dumps({"ics_allow_hosts": server.host_port, "ics_window_days_back": 3650})
        out = almanac("ics", "sync", "7", env={"AIRFLOW_VAR_ALMANAC_SETTINGS": settings})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["status"] == "updated"
    db.commit()
    assert db.execute("SELECT count(*) FROM events WHERE calendar_id = 7").fetchone()[0] == 3


# --- one fetch path: `ics inspect` and `ics sync` fetch exactly as the DAG does ----------------

THREE = (CORPUS / "rie_three_events.ics").read_bytes()
WINDOW = ("--start", "2019-01-01", "--end", "2020-01-01")


def settings_env(server: FeedServer, **settings) -> dict:
    return {"AIRFLOW_VAR_ALMANAC_SETTINGS": json.dumps({"ics_allow_hosts": server.host_port, **settings})}


def flaky(status: int, times: int, body: bytes = THREE):
    """A route answering ``status`` (``Retry-After: 0``) the first ``times`` requests, then ``body``."""
    calls = []

    def route(handler):
        calls.append(handler.path)
        if len(calls) <= times:
            handler._serve(
                Route(status=status, body=b"busy", content_type="text/plain", headers={"Retry-After": "0"})
            )
        else:
            handler._serve(Route(body=body))

    return route


def error_lines(stderr: str) -> list[str]:
    """The ``almanac: ...`` lines that are not warnings (log lines have a level prefix)."""
    return [
        ln
        for ln in stderr.splitlines()
        if ln.startswith("almanac:") and not ln.startswith("almanac: warning")
    ]


def test_inspect_retries_a_transient_failure_and_says_so_on_stderr():
    with FeedServer({"/f.ics": flaky(503, 1)}) as server:
        out = almanac("ics", "inspect", server.url("/f.ics"), *WINDOW, env=settings_env(server))
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3 and server.hits("/f.ics") == 2
    (retry,) = [ln for ln in out.stderr.splitlines() if "retrying" in ln]
    assert "feed host 127.0.0.1: try 1 of 3 failed (feed host 127.0.0.1 answered 503" in retry


def test_inspect_reads_the_attempts_setting_and_fails_in_one_line():
    with FeedServer({"/f.ics": flaky(429, 10)}) as server:
        once = almanac(
            "ics", "inspect", server.url("/f.ics"), *WINDOW, env=settings_env(server, ics_fetch_attempts=1)
        )
        once_hits = server.hits("/f.ics")
        twice = almanac(
            "ics", "inspect", server.url("/f.ics"), *WINDOW, env=settings_env(server, ics_fetch_attempts=2)
        )
    assert (once.returncode, twice.returncode) == (2, 2) and once.stdout == ""
    assert once_hits == 1 and server.hits("/f.ics") == 3
    assert error_lines(once.stderr) == ["almanac: feed host 127.0.0.1 answered 429, retry after 0s"]
    assert "retrying" not in once.stderr and "try 1 of 2 failed" in twice.stderr


def test_inspect_reads_the_redirect_limit_setting():
    routes = {"/a": redirect("/b"), "/b": redirect("/f.ics"), "/f.ics": Route(body=THREE)}
    with FeedServer(routes) as server:
        ok = almanac(
            "ics", "inspect", server.url("/a"), *WINDOW, env=settings_env(server, ics_max_redirects=2)
        )
        over = almanac(
            "ics", "inspect", server.url("/a"), *WINDOW, env=settings_env(server, ics_max_redirects=1)
        )
    assert ok.returncode == 0, ok.stderr
    assert over.returncode == 2 and error_lines(over.stderr) == [
        "almanac: feed redirected more than 1 times (last host 127.0.0.1)"
    ]


def test_inspect_refusal_after_a_redirect_names_the_hop():
    with FeedServer({"/start": redirect("http://10.0.0.1/internal?token=s3cr3t")}) as server:
        out = almanac("ics", "inspect", server.url("/start"), *WINDOW, env=settings_env(server))
    assert out.returncode == 2
    (line,) = error_lines(out.stderr)
    assert "refused" in line and f"(redirect from {server.host_port}/start to 10.0.0.1)" in line
    assert "s3cr3t" not in out.stderr


def test_inspect_webcal_to_a_plain_http_server_explains_and_does_not_retry():
    with FeedServer({"/f.ics": Route(body=THREE)}) as server:
        out = almanac(
            "ics", "inspect", server.url("/f.ics", scheme="webcal"), *WINDOW, env=settings_env(server)
        )
    assert out.returncode == 2
    (line,) = error_lines(out.stderr)
    assert "webcal:// is read as https://" in line and "wrong version number" in line
    assert "retrying" not in out.stderr and server.hits("/f.ics") == 0


def test_inspect_ignores_proxy_variables_and_netrc(tmp_path):
    with socket.socket() as sock:  # a proxy address nothing listens on: using it would fail
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password hunter2\n")
    netrc.chmod(0o600)
    proxies = {name: dead for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY")}
    env = {**proxies, "NO_PROXY": "", "no_proxy": "", "NETRC": str(netrc)}
    with FeedServer({"/f.ics": Route(body=THREE)}) as server:
        out = almanac("ics", "inspect", server.url("/f.ics"), *WINDOW, env={**env, **settings_env(server)})
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3
    assert "Authorization" not in server.requests[-1].headers


def test_inspect_bad_settings_fail_in_one_line():
    out = almanac(
        "ics",
        "inspect",
        str(CORPUS / "rie_three_events.ics"),
        env={"AIRFLOW_VAR_ALMANAC_SETTINGS": "{not json"},
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("almanac: AIRFLOW_VAR_ALMANAC_SETTINGS is not JSON")
    assert len(out.stderr.strip().splitlines()) == 1


FEED_WITH_PROBLEMS = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//almanac//test//EN
BEGIN:VEVENT
UID:stated
DTSTART;TZID=Mars/Olympus:20240105T100000
DTEND;TZID=Mars/Olympus:20240105T110000
SUMMARY:Tentative on Mars
STATUS:TENTATIVE
END:VEVENT
BEGIN:VEVENT
UID:unstated
DTSTART:20240106T100000Z
DTEND:20240106T110000Z
SUMMARY:No status
END:VEVENT
END:VCALENDAR
""".replace("\n", "\r\n")


def test_inspect_prints_feed_problems_as_warnings_in_both_modes(tmp_path):
    feed = tmp_path / "problems.ics"
    feed.write_text(FEED_WITH_PROBLEMS)
    window = ("--start", "2024-01-01", "--end", "2024-02-01")
    jsonl = almanac("ics", "inspect", str(feed), *window)
    table = almanac("ics", "inspect", str(feed), *window, "--table")
    for out in (jsonl, table):
        assert out.returncode == 0, out.stderr
        warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("almanac: warning: ")]
        assert any("Mars/Olympus" in ln for ln in warnings), out.stderr
        assert "Mars/Olympus" not in out.stdout  # stdout stays one row per instance
    assert len(jsonl.stdout.splitlines()) == 2 and len(table.stdout.splitlines()) == 2
    rows = {row["uid"]: row for row in map(json.loads, jsonl.stdout.splitlines())}
    assert rows["stated"]["status"] == "tentative"
    assert "tentative" in table.stdout


def test_inspect_prints_status_null_when_the_feed_states_none(tmp_path):
    feed = tmp_path / "problems.ics"
    feed.write_text(FEED_WITH_PROBLEMS)
    out = almanac("ics", "inspect", str(feed), "--start", "2024-01-01", "--end", "2024-02-01")
    rows = {row["uid"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert rows["unstated"]["status"] is None  # the stored status would be "confirmed"


def test_sync_retries_a_transient_failure_per_the_settings(db):
    with FeedServer({"/f.ics": flaky(503, 1)}) as server:
        db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
        db.execute(
            "INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (7, 1, 'c', %s)",
            (server.url("/f.ics"),),
        )
        db.commit()
        out = almanac("ics", "sync", "7", env=settings_env(server, ics_window_days_back=3650))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["status"] == "updated"
    assert server.hits("/f.ics") == 2


def test_sync_says_on_stderr_when_it_retries(db):
    with FeedServer({"/f.ics": flaky(503, 1)}) as server:
        db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
        db.execute(
            "INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (7, 1, 'c', %s)",
            (server.url("/f.ics"),),
        )
        db.commit()
        out = almanac("ics", "sync", "7", env=settings_env(server, ics_window_days_back=3650))
    assert out.returncode == 0, out.stderr
    assert "feed host 127.0.0.1: try 1 of 3 failed" in out.stderr


def test_notifications_enqueue_stats_dead_and_retry(db):
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    db.execute("INSERT INTO users (id, tenant_id, name, email) VALUES (5, 1, 'Eve', 'eve@example.com')")
    db.commit()
    made = almanac(
        "notifications", "enqueue", "--user", "5", "--channel", "email", "--body", "hi", "--key", "k1"
    )
    assert made.returncode == 0, made.stderr
    nid = int(made.stdout.split()[1])
    again = almanac(
        "notifications", "enqueue", "--user", "5", "--channel", "email", "--body", "hi", "--key", "k1"
    )
    assert int(again.stdout.split()[1]) == nid  # one key, one row
    stats = json.loads(almanac("notifications", "stats").stdout)
    assert stats["email"]["pending"] == 1 and stats["sms"]["pending"] == 0
    refused = almanac("notifications", "retry", str(nid))
    assert refused.returncode == 2 and "is pending" in refused.stderr
    db.execute("UPDATE notifications SET status = 'dead', last_error = 'SMTP 550' WHERE id = %s", (nid,))
    db.commit()
    [dead] = [json.loads(line) for line in almanac("notifications", "dead").stdout.splitlines()]
    assert (dead["id"], dead["status"], dead["last_error"]) == (nid, "dead", "SMTP 550")
    retried = almanac("notifications", "retry", str(nid))
    assert retried.returncode == 0 and "(dead) is due again now" in retried.stdout
    bad = almanac(
        "notifications", "enqueue", "--channel", "push", "--to", "+1555", "--tenant", "1", "--body", "x"
    )
    assert bad.returncode == 2 and "user_id is required" in bad.stderr


# --- connected accounts ----------------------------------------------------------------------


def test_integrations_reencrypt_moves_every_token_to_the_new_key_and_list_shows_no_token(db):
    from datetime import UTC, datetime, timedelta

    from almanac.google.crypto import TokenCipher, generate_key
    from almanac.integrations import store

    old, new = generate_key(), generate_key()
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for user_id in (1, 2):
        db.execute(
            "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, 'u', %s)",
            (user_id, f"u{user_id}@x.test"),
        )
        store.connect(
            db,
            TokenCipher(old),
            tenant_id=1,
            user_id=user_id,
            provider="acme",
            refresh_token=f"rt-{user_id}",
            access_token=f"at-{user_id}" if user_id == 1 else None,
            expires_at=datetime.now(UTC) + timedelta(hours=1),
            now=datetime.now(UTC),
        )
    db.commit()

    out = almanac("integrations", "reencrypt", env={"AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY": f"{new},{old}"})
    assert out.returncode == 0, out.stderr
    assert "2 integration(s)" in out.stdout
    rows = db.execute(
        "SELECT user_id, refresh_token_enc, access_token_enc FROM integrations ORDER BY 1"
    ).fetchall()
    db.commit()
    only_new = TokenCipher(new)
    assert [(only_new.decrypt(r), a and only_new.decrypt(a)) for _, r, a in rows] == [
        ("rt-1", "at-1"),
        ("rt-2", None),
    ]
    # Without the key the tokens were encrypted with: one line naming the Variable, nothing written.
    lost = almanac("integrations", "reencrypt", env={"AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY": old})
    assert lost.returncode == 2 and lost.stderr.startswith("almanac: cannot re-encrypt")

    listed = almanac("integrations", "list", "--tenant", "1")
    assert listed.returncode == 0, listed.stderr
    states = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [s["user_id"] for s in states] == [1, 2] and all(s["status"] == "active" for s in states)
    assert "rt-1" not in listed.stdout and not any("token_enc" in key for key in states[0])

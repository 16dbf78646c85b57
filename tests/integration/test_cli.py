"""The ``almanac`` operator command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.feed_server import FeedServer, Route

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "ics-corpus"


def almanac(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "almanac.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_inspect_prints_one_json_object_per_instance_in_the_window():
    out = almanac("ics", "inspect", str(CORPUS / "rie_issue_62_moved_event.ics"),
                  "--start", "2021-12-01", "--end", "2022-01-01", "--jsonl")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 1  # the moved instance, and not its old date
    assert rows[0]["start"].startswith("2021-12-17")
    assert set(rows[0]) >= {"uid", "recurrence_id", "start", "end", "all_day", "summary", "status"}


def test_inspect_all_day_dates_and_zone_offsets():
    out = almanac("ics", "inspect", str(CORPUS / "rie_daylight_saving_time.ics"),
                  "--start", "2019-03-20", "--end", "2019-04-25")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    starts = {r["start"] for r in rows if r["uid"] == "7uartkcnhf0elbvs8md0itrf6c@google.com"}
    assert "2019-03-20T19:00:00+01:00" in starts and "2019-04-24T19:00:00+02:00" in starts
    holidays = almanac("ics", "inspect", str(CORPUS / "rie_issue_44_double_event.ics"),
                       "--start", "2020-08-01", "--end", "2020-09-01")
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
        db.execute("INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (7, 1, 'c', %s)",
                   (server.url("/f.ics"),))
        db.commit()
        settings = json.dumps({"ics_allow_hosts": server.host_port, "ics_window_days_back": 3650})
        out = almanac("ics", "sync", "7", env={"AIRFLOW_VAR_ALMANAC_SETTINGS": settings})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["status"] == "updated"
    db.commit()
    assert db.execute("SELECT count(*) FROM events WHERE calendar_id = 7").fetchone()[0] == 3

"""Benchmark: a real ``ics_sync`` DAG run (scheduler, LocalExecutor, mapped batches) over N calendars.

    ./dev up                                   # a running stack (any profile)
    eval "$(./dev env)"
    .venv/bin/python benchmarks/ics_sync_dag.py --calendars 10000

Writes N small feeds (``--events`` each, default 5), serves them on 127.0.0.1 with ETag/304,
registers them as calendars of a benchmark tenant (its rows only), lets the feed server
through the address guard (Variable ``almanac_settings``), then triggers ``ics_sync`` over the
REST API twice — cold (nothing stored) and warm (every feed answers 304) — and prints each
run's wall time from queued to finished, the number of batch task instances and the slowest
batch. The DAG is unpaused for the measurement and paused again afterwards. Figures only.

It cleans up after itself, also after an error or Ctrl-C: a run still going is marked failed,
the benchmark tenant with its calendars, events and push-pending rows is deleted (its feed URLs
would no longer answer, and every later ``ics_sync`` on the stack would retry them), and the
Variable ``almanac_settings`` is put back as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ics_sync import BENCH_TENANT, cleanup, register_calendars, serve


def write_feeds(folder: Path, calendars: int, events: int) -> list[str]:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)
    names = []
    for c in range(1, calendars + 1):
        lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//almanac//bench-dag//EN"]
        for e in range(events):
            at = start + timedelta(days=e, hours=c % 10)
            lines += ["BEGIN:VEVENT", f"UID:dag-{c}-{e}@almanac.test", "DTSTAMP:20260101T000000Z",
                      f"DTSTART:{at:%Y%m%dT%H%M%SZ}", "DURATION:PT1H", f"SUMMARY:Event {e}", "END:VEVENT"]
        name = f"dag-{c:06d}.ics"
        (folder / name).write_text("\r\n".join(lines + ["END:VCALENDAR"]) + "\r\n")
        names.append(name)
    return names


class Api:
    def __init__(self, base: str, home: str) -> None:
        passwords = Path(home) / "simple_auth_manager_passwords.json.generated"
        password = json.loads(passwords.read_text())["admin"]
        token = requests.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30
        )
        token.raise_for_status()
        self.base = base
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    def call(self, method: str, path: str, **kw):
        response = self.session.request(method, f"{self.base}/api/v2{path}", timeout=60, **kw)
        response.raise_for_status()
        return response.json() if response.content else None


def run_once(api: Api, label: str, run_id: str | None = None, started: list[str] | None = None) -> None:
    """Trigger a run (or follow ``run_id``) until it ends, then print its figures."""
    if run_id is None:
        run_id = api.call("POST", "/dags/ics_sync/dagRuns", json={"logical_date": None})["dag_run_id"]
    if started is not None:
        started.append(run_id)
    while True:
        run = api.call("GET", f"/dags/ics_sync/dagRuns/{run_id}")
        if run["state"] in ("success", "failed"):
            break
        time.sleep(1)
    tis = api.call("GET", f"/dags/ics_sync/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
    batches = [t for t in tis["task_instances"] if t["task_id"] == "sync_batch"]
    slowest = max((t["duration"] or 0 for t in batches), default=0)
    queued = datetime.fromisoformat(run["queued_at"])
    ended = datetime.fromisoformat(run["end_date"])
    total = api.call(
        "GET",
        f"/dags/ics_sync/dagRuns/{run_id}/taskInstances/summarize/xcomEntries/return_value",
        params={"deserialize": True},
    )["value"]
    print(
        f"{label:<5} run {run['state']:<8} {(ended - queued).total_seconds():7.1f} s queued->finished, "
        f"{len(batches)} batch tasks (slowest {slowest:.1f} s), {total['totalCalendars']} calendars, "
        f"{total['errorCount']} errors, events +{total['eventsAdded']} ~{total['eventsUpdated']} "
        f"-{total['eventsDeleted']}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calendars", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=5)
    args = parser.parse_args()
    db_url, api_url = os.environ.get("ALMANAC_APP_DB_URL"), os.environ.get("ALMANAC_API_URL")
    if not (db_url and api_url):
        sys.exit('run inside a stack: eval "$(./dev env)" after ./dev up')
    api = Api(api_url, os.environ["AIRFLOW_HOME"])
    previous = _variable(api)
    started: list[str] = []
    server = None
    with tempfile.TemporaryDirectory(prefix="almanac-dag-bench-") as tmp:
        try:
            folder = Path(tmp)
            names = write_feeds(folder, args.calendars, args.events)
            server = serve(folder)
            host = f"127.0.0.1:{server.server_address[1]}"
            register_calendars(db_url, f"http://{host}/", names)
            settings = {**json.loads(previous or "{}"), "ics_allow_hosts": host}
            _set_variable(api, json.dumps(settings))
            api.call("PATCH", "/dags/ics_sync", json={"is_paused": False})
            started.append("*")  # from here on a run of ics_sync may be ours before we know its id
            print(
                f"{args.calendars} calendars x {args.events} events; feeds on {host}; "
                f"tenant {BENCH_TENANT}"
            )
            first = _first_scheduled_run(api)  # unpausing starts one at once (run_immediately)
            started[:] = [first]
            run_once(api, "cold", first)
            run_once(api, "warm", started=started)
        finally:
            _tidy(api, started, previous)
            if server is not None:
                server.shutdown()
            cleanup(db_url)
            print(f"removed tenant {BENCH_TENANT} (calendars, events, push-pending rows)", flush=True)
    return 0


def _tidy(api: Api, started: list[str], previous: str | None) -> None:
    """Pause the DAG, fail what is still running of our runs (``["*"]``: any, as the DAG was
    unpaused by us moments ago), put ``almanac_settings`` back."""
    for step in (
        lambda: api.call("PATCH", "/dags/ics_sync", json={"is_paused": True}),
        lambda: _fail_unfinished(api, started),
        lambda: _set_variable(api, previous),
    ):
        try:
            step()
        except (requests.RequestException, OSError) as exc:  # go on: the database rows go regardless
            print(f"cleanup step failed: {exc}", file=sys.stderr)


def _fail_unfinished(api: Api, started: list[str]) -> None:
    params = {"limit": 100, "order_by": "-run_after"}
    runs = api.call("GET", "/dags/ics_sync/dagRuns", params=params)["dag_runs"]
    for run in runs:
        ours = run["dag_run_id"] in started or started == ["*"]
        if run["state"] in ("queued", "running") and ours:
            api.call("PATCH", f"/dags/ics_sync/dagRuns/{run['dag_run_id']}", json={"state": "failed"})


def _variable(api: Api) -> str | None:
    try:
        return api.call("GET", "/variables/almanac_settings")["value"]
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            return None
        raise


def _set_variable(api: Api, value: str | None) -> None:
    """Set ``almanac_settings`` to ``value`` (None: no such Variable)."""
    if _variable(api) is not None:
        api.call("DELETE", "/variables/almanac_settings")
    if value is not None:
        api.call("POST", "/variables", json={"key": "almanac_settings", "value": value})


def _first_scheduled_run(api: Api) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        params = {"limit": 100, "order_by": "-run_after"}
        runs = api.call("GET", "/dags/ics_sync/dagRuns", params=params)["dag_runs"]
        active = [r for r in runs if r["state"] in ("queued", "running")]
        if active:
            return active[0]["dag_run_id"]
        time.sleep(1)
    sys.exit("no ics_sync run started after unpausing (is the scheduler up?)")


if __name__ == "__main__":
    sys.exit(main())

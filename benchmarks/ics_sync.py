"""Benchmark: full ICS sync cycles through the code the ics_sync DAG runs.

    eval "$(./dev env --profile test)"   # or any stack: it needs ALMANAC_APP_DB_URL
    .venv/bin/python benchmarks/ics_sync.py --calendars 200 --events 200
    .venv/bin/python benchmarks/ics_sync.py --workload DIR --calendars 2000

Generates N calendars x E events (with ``--workload DIR``: a bench-workload folder holding
``gen.py``/``mutate.py``, e.g. the workload the Node/BullMQ figures were measured on, wherever
you keep it; without it, a built-in deterministic generator), serves them on 127.0.0.1 with
ETag/304 (with ``--workload``: that folder's ``serve.py``, the feed server the peer is measured
against), registers them as calendars of a benchmark tenant (its rows only: nothing else in the
database is touched; the tenant, its calendars, events and push-pending rows are deleted at the
end, also after an error or Ctrl-C), and times three cycles with ``--workers`` processes, each
syncing batches the way mapped tasks do (with leases in Redis when ``ALMANAC_REDIS_URL`` is set):

1. cold: empty database;   2. warm: nothing changed;   3. 10% of the feeds changed.

Prints wall seconds, calendars/s, instances/s, event rows written and peak RSS per cycle
(``--json FILE`` also writes them as JSON). Figures only: nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH_TENANT = 990_000  # the benchmark's own tenant id; removed (with everything under it) at the end

# --------------------------------------------------------------------------- feeds


def generate_feeds(out: Path, calendars: int, events: int, anchor: datetime, seed: int = 42) -> None:
    """Built-in workload: ~20% weekly series (COUNT/UNTIL/open), overrides, all-day, zones."""
    zones = ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC", "Australia/Sydney"]
    out.mkdir(parents=True, exist_ok=True)
    for c in range(1, calendars + 1):
        rng = random.Random(f"{seed}:{c}")
        tz = rng.choice(zones)
        lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//almanac//bench//EN", f"X-WR-TIMEZONE:{tz}"]
        for e in range(events):
            start = anchor + timedelta(days=rng.randrange(-60, 400), hours=rng.randrange(7, 20))
            uid = f"bench-{c}-{e}@almanac.test"
            lines += ["BEGIN:VEVENT", f"UID:{uid}", "DTSTAMP:20260101T000000Z", f"SUMMARY:Event {e} of {c}"]
            if rng.random() < 0.1:
                day = start.strftime("%Y%m%d")
                lines += [f"DTSTART;VALUE=DATE:{day}"]
            else:
                lines += [f"DTSTART;TZID={tz}:{start:%Y%m%dT%H%M%S}", "DURATION:PT1H"]
            if rng.random() < 0.2:
                until = (start + timedelta(days=200)).strftime("%Y%m%dT000000Z")
                kind = rng.choice(["COUNT=30", f"UNTIL={until}", ""])
                lines += ["RRULE:FREQ=WEEKLY" + (f";{kind}" if kind else "")]
            lines += ["END:VEVENT"]
        lines += ["END:VCALENDAR"]
        (out / f"cal-{c:06d}.ics").write_text("\r\n".join(lines) + "\r\n")


def mutate_feeds(folder: Path, share: float, round_no: int) -> None:
    """Built-in mutation: in ``share`` of the feeds, rename 5% of the events."""
    files = sorted(folder.glob("*.ics"))
    rng = random.Random(f"mutate:{round_no}")
    for path in rng.sample(files, max(1, round(len(files) * share))):
        text = path.read_text()
        lines = text.split("\r\n")
        summaries = [i for i, line in enumerate(lines) if line.startswith("SUMMARY:")]
        for i in rng.sample(summaries, max(1, len(summaries) // 20)):
            lines[i] += f" (rev {round_no})"
        path.write_text("\r\n".join(lines))


class _FeedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    folder: Path = Path(".")

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.folder / self.path.lstrip("/")
        try:
            body = path.read_bytes()
        except OSError:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        etag = f'"{hashlib.sha1(body).hexdigest()}"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/calendar; charset=utf-8")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(folder: Path) -> ThreadingHTTPServer:
    handler = type("Handler", (_FeedHandler,), {"folder": folder})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
    server.request_queue_size = 256  # the default backlog of 5 drops connections under load
    server.server_bind()
    server.server_activate()
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WorkloadServer:
    """The bench-workload folder's own ``serve.py`` (what the peer fetches from), as a process."""

    def __init__(self, workload: Path, folder: Path, port: int = 0) -> None:
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(workload / "serve.py"), "--dir", str(folder), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"feed server failed: {self.process.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        self.server_address = ("127.0.0.1", self.port)

    def shutdown(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --------------------------------------------------------------------------- database


def cleanup(db_url: str, tenant: int = BENCH_TENANT) -> None:
    """Delete everything a benchmark run created under ``tenant``: its push-pending rows (they have
    no foreign key), then the tenant (calendars, events, sync state cascade)."""
    import psycopg

    with psycopg.connect(db_url) as conn:
        conn.execute(
            "DELETE FROM calendar_push_pending p USING calendars c"
            " WHERE c.id = p.calendar_id AND c.tenant_id = %s",
            (tenant,),
        )
        conn.execute("DELETE FROM tenants WHERE id = %s", (tenant,))
        conn.commit()


def register_calendars(db_url: str, base_url: str, names: list[str]) -> list[int]:
    import psycopg

    cleanup(db_url)  # what an interrupted earlier run may have left
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO tenants (id, name) VALUES (%s, 'benchmark') ON CONFLICT DO NOTHING", (BENCH_TENANT,)
        )
        rows = conn.execute(
            """
            INSERT INTO calendars (tenant_id, name, source_url)
            SELECT %s, name, %s || name FROM unnest(%s::text[]) AS name
            RETURNING id
            """,
            (BENCH_TENANT, base_url, names),
        ).fetchall()
        conn.commit()
    return sorted(row[0] for row in rows)


def event_row_writes(db_url: str) -> int:
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        time.sleep(0.05)
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute(
            "SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname = 'events'"
        ).fetchone()[0]


# --------------------------------------------------------------------------- cycles


def _worker(args) -> dict:
    db_url, batch, instant, allow = args
    from contextlib import nullcontext

    from almanac.batches import summarize_batch
    from almanac.db.connect import connect
    from almanac.ics.sync import ICS_KIND, sync_batch

    redis_url = os.environ.get("ALMANAC_REDIS_URL")
    owner = f"benchmark/{os.getpid()}/{batch[0]}"
    with connect(db_url) as conn, _lease_keeper(redis_url, owner) if redis_url else nullcontext() as leases:
        results = sync_batch(conn, batch, instant=instant, allow_hosts=frozenset([allow]), leases=leases)
    summary = summarize_batch(ICS_KIND, results)
    summary["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return summary


def _lease_keeper(redis_url: str, owner: str):
    """What the mapped task holds: a ``LeaseKeeper`` on the task's Redis."""
    from almanac.db.redis_conn import connect_redis
    from almanac.leases import LeaseKeeper
    from almanac.settings import Settings

    return LeaseKeeper(connect_redis(redis_url), owner, ttl_s=Settings().ics_lock_ttl_s)


def _warm_worker() -> None:
    """Import what a task imports before the clock starts (an Airflow worker is warm too)."""
    import psycopg  # noqa: F401  (warm import)

    import almanac.ics.fetch
    import almanac.ics.parse
    import almanac.ics.sync  # noqa: F401  (warm import)


def run_cycle(name: str, pool, db_url: str, ids: list[int], batch_size: int, instant, allow) -> dict:
    from almanac.batches import combine_summaries
    from almanac.ics.plan import calendar_batches
    from almanac.ics.sync import ICS_KIND
    from almanac.settings import Settings

    if batch_size:
        batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    else:  # what the DAGs' planner cuts, with the ics_sync settings (defaults)
        batches = [b["ids"] for b in calendar_batches(ids, Settings())]
    before = event_row_writes(db_url)
    started = time.perf_counter()
    summaries = pool.map(_worker, [(db_url, b, instant, allow) for b in batches], chunksize=1)
    wall = time.perf_counter() - started
    total = combine_summaries(ICS_KIND, summaries)
    written = event_row_writes(db_url) - before
    import psycopg

    with psycopg.connect(db_url) as conn:
        instances = conn.execute(
            "SELECT count(*) FROM events e JOIN calendars c ON c.id = e.calendar_id WHERE c.tenant_id = %s",
            (BENCH_TENANT,),
        ).fetchone()[0]
    rss = max(s["maxrss_kb"] for s in summaries) / 1024
    row = {
        "cycle": name, "wall_s": wall, "calendars_per_s": len(ids) / wall,
        "instances": instances, "instances_per_s": instances / wall if name == "cold" else None,
        "event_rows_written": written, "errors": total["errorCount"],
        "added": total["eventsAdded"], "updated": total["eventsUpdated"], "deleted": total["eventsDeleted"],
        "peak_rss_mb_per_worker": rss,
    }
    print(
        f"{name:<12} {wall:8.2f} s  {row['calendars_per_s']:8.0f} cal/s  "
        + (f"{row['instances_per_s']:9.0f} inst/s  " if row["instances_per_s"] else " " * 19)
        + f"rows written {written:>8}  (+{row['added']} ~{row['updated']} -{row['deleted']})  "
        f"errors {row['errors']}  peak RSS {rss:.0f} MB/worker",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calendars", type=int, default=200)
    parser.add_argument("--events", type=int, default=200, help="events per calendar")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=0, help="default: the DAG planner's batches")
    parser.add_argument("--workload", type=Path, help="a bench-workload folder (gen.py, mutate.py, serve.py)")
    parser.add_argument("--feeds-dir", type=Path, help="ready .ics files (skips generation)")
    parser.add_argument("--feed-port", type=int, default=0, help="workload server's port (default: free)")
    parser.add_argument("--builtin-server", action="store_true", help="serve with the built-in server")
    parser.add_argument("--cycles", default="cold,warm,10% changed", help="comma-separated, in this order")
    parser.add_argument("--json", type=Path, help="also write the cycles' figures here")
    parser.add_argument("--db-url", default=os.environ.get("ALMANAC_APP_DB_URL"))
    args = parser.parse_args()
    if not args.db_url:
        sys.exit("set ALMANAC_APP_DB_URL (eval \"$(./dev env --profile test)\") or pass --db-url")
    wanted = [c.strip() for c in args.cycles.split(",") if c.strip()]

    anchor = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    workdir = Path(tempfile.mkdtemp(prefix="almanac-bench-"))
    feeds = workdir / "feeds"
    server = pool = None
    rows = []
    try:
        if args.feeds_dir is not None:  # a copy: the 10% cycle edits files in place
            shutil.copytree(args.feeds_dir, feeds)
        elif args.workload:
            subprocess.run(
                [sys.executable, str(args.workload / "gen.py"), "--calendars", str(args.calendars),
                 "--events-per-cal", str(args.events), "--out", str(feeds)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        else:
            generate_feeds(feeds, args.calendars, args.events, anchor)
        names = sorted(p.name for p in feeds.glob("*.ics"))
        if args.workload and not args.builtin_server:
            server = WorkloadServer(args.workload, feeds, args.feed_port)
        else:
            server = serve(feeds)
        host = f"127.0.0.1:{server.server_address[1]}"
        ids = register_calendars(args.db_url, f"http://{host}/", names)
        print(f"{len(ids)} calendars, {args.workers} workers, batches of {args.batch_size or 'the planner'}, "
              f"feeds from {type(server).__name__} on {host}, anchor {anchor:%Y-%m-%d}", flush=True)
        instant = anchor + timedelta(hours=12)
        pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=_warm_worker)
        for n, name in enumerate(wanted):
            if name == "10% changed":
                if args.workload:
                    mutate = args.workload / "mutate.py"
                    subprocess.run(
                        [sys.executable, str(mutate), "--dir", str(feeds), "--share", "0.1"],
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                else:
                    mutate_feeds(feeds, 0.1, 1)
            at = instant + timedelta(minutes=5 * n)
            rows.append(run_cycle(name, pool, args.db_url, ids, args.batch_size, at, host))
        if args.json:
            args.json.write_text(json.dumps({"calendars": len(ids), "cycles": rows}, indent=2))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if server is not None:
            server.shutdown()
        cleanup(args.db_url)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: Almanac's ICS sync beside the competitor (BullMQ peer), back to back on one workload.

    export ALMANAC_VAR_DIR=var/bench-durable ALMANAC_PG_PORT=25534 ALMANAC_REDIS_PORT=26481
    ./dev services                               # our PostgreSQL + Redis, durable like the peer's
    printf "shared_buffers = '1GB'\nmax_wal_size = '4GB'\n" >> var/bench-durable/pg/data/postgresql.conf
    ./dev down && ./dev services && eval "$(./dev env)"   # restarted with the peer's two settings
    .venv/bin/python benchmarks/compare_peer.py --calendars 500          # as root (the peer needs it)

Both PostgreSQL servers must have the same durability and WAL settings (``PG_SETTINGS``): the
script prints both and warns when they differ. The ``test`` profile's server runs with fsync,
synchronous_commit and full_page_writes off; the peer's with PostgreSQL's defaults (on), 1 GB of
shared_buffers and a 4 GB max_wal_size.

Runs ``../shared/peer-bull-ics/bench.sh`` (variant ``fanout-etag``, the strongest peer: one job
per calendar, concurrency 16, conditional GET) from a writable copy under ``--work`` (its Node 22,
``npm install``, PostgreSQL 15 and Redis on ``--peer-pg-port`` / ``--peer-redis-port``), then
``benchmarks/ics_sync.py --workload ../shared/bench-workload`` on the same N x E calendars, the
same ``gen.py`` / ``mutate.py --share 0.1`` and the same feed server program (the workload's
``serve.py``) on the same port, and prints both times per cycle and Almanac's ratio (peer time /
Almanac time: above 1 means Almanac is faster). The peer's PostgreSQL and Redis are stopped at the
end; ours are left as they were (``ics_sync.py`` removes its own rows). Absolute times on shared
machines vary by up to 2x between sessions: compare the ratios of one session only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
#: (the peer's cycle name, ours, the table's)
CYCLES = (
    ("cold", "cold", "cold"),
    ("unchanged", "warm", "nothing changed"),
    ("mutated", "10% changed", "10% changed"),
)


def prepare_peer(work: Path) -> Path:
    """A writable copy of the peer and the workload side by side (bench.sh reads ``../bench-workload``)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("peer-bull-ics", "bench-workload"):
        target = work / name
        skip = shutil.ignore_patterns("node_modules")
        shutil.copytree(SHARED / name, target, dirs_exist_ok=True, ignore=skip)
    return work / "peer-bull-ics"


def run_peer(peer: Path, args, state: Path) -> dict[str, float]:
    env = {
        **os.environ,
        "N": str(args.calendars),
        "E": str(args.events),
        "VARIANTS": "fanout-etag",
        "W": str(state),
        "PGPORT": str(args.peer_pg_port),
        "REDISPORT": str(args.peer_redis_port),
        "FEEDPORT": str(args.feed_port),
    }
    results = state / "results"
    before = set(results.glob("*.json")) if results.exists() else set()
    subprocess.run(["bash", str(peer / "bench.sh")], cwd=peer, env=env, check=True)
    fresh = sorted(set(results.glob("*.json")) - before)
    if not fresh:
        sys.exit("the peer wrote no results file")
    cycles = json.loads(fresh[-1].read_text())["cycles"]
    return {c["cycle"]: float(c["wallS"]) for c in cycles if c["variant"] == "fanout-etag"}


def stop_peer(peer: Path, args, state: Path) -> None:
    env = {
        **os.environ,
        "W": str(state),
        "PGPORT": str(args.peer_pg_port),
        "REDISPORT": str(args.peer_redis_port),
    }
    subprocess.run(["bash", str(peer / "bench.sh"), "down"], cwd=peer, env=env, check=False)


#: PostgreSQL settings that change write speed; both sides must run with the same values.
PG_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "max_wal_size")


def pg_settings(url: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        query = "SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name"
        return dict(conn.execute(query, (list(PG_SETTINGS),)).fetchall())


def run_almanac(args, out: Path) -> dict[str, float]:
    command = [
        sys.executable,
        str(HERE / "ics_sync.py"),
        "--workload",
        str(SHARED / "bench-workload"),
        "--calendars",
        str(args.calendars),
        "--events",
        str(args.events),
        "--feed-port",
        str(args.feed_port),
        "--json",
        str(out),
    ]
    subprocess.run(command, check=True)
    return {c["cycle"]: float(c["wall_s"]) for c in json.loads(out.read_text())["cycles"]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calendars", type=int, default=500)
    parser.add_argument("--events", type=int, default=200, help="events per calendar")
    parser.add_argument("--work", type=Path, default=Path("/tmp/peer-bull-ics"), help="writable peer copy")
    parser.add_argument("--peer-pg-port", type=int, default=25433)
    parser.add_argument("--peer-redis-port", type=int, default=26380)
    parser.add_argument("--feed-port", type=int, default=28433, help="the feed server's port, for both")
    parser.add_argument("--almanac-first", action="store_true", help="run Almanac before the peer")
    args = parser.parse_args()
    if not os.environ.get("ALMANAC_APP_DB_URL"):
        sys.exit('set ALMANAC_APP_DB_URL and ALMANAC_REDIS_URL: eval "$(./dev env --profile test)"')

    peer = prepare_peer(args.work)
    state = args.work / "state"
    peer_url = f"postgresql://postgres@127.0.0.1:{args.peer_pg_port}/postgres"
    with tempfile.TemporaryDirectory(prefix="almanac-compare-") as tmp:
        ours_json = Path(tmp) / "almanac.json"
        try:
            if args.almanac_first:
                ours = run_almanac(args, ours_json)
                theirs = run_peer(peer, args, state)
            else:
                theirs = run_peer(peer, args, state)
                ours = run_almanac(args, ours_json)
            ours_url = os.environ["ALMANAC_APP_DB_URL"]
            settings = {"peer": pg_settings(peer_url), "Almanac": pg_settings(ours_url)}
        finally:
            stop_peer(peer, args, state)
    print("\nPostgreSQL settings: " + "; ".join(f"{side}: {values}" for side, values in settings.items()))
    if settings["peer"] != settings["Almanac"]:
        print("WARNING: the two PostgreSQL servers differ in these settings: the times are not comparable "
              "(start ours with the same durability, e.g. the dev profile, see README)")
    print(f"\n{args.calendars} calendars x {args.events} events, one session, "
          f"{'Almanac' if args.almanac_first else 'peer'} first\n")
    print("| calendars x events | cycle | peer (fanout-etag) | Almanac | Almanac faster by |")
    print("|---|---|---|---|---|")
    for peer_cycle, our_cycle, label in CYCLES:
        p, a = theirs.get(peer_cycle), ours.get(our_cycle)
        ratio = f"{p / a:.2f}x" if p and a else "n/a"
        print(f"| {args.calendars} x {args.events} | {label} | {p:.2f} s | {a:.2f} s | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

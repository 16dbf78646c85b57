"""Benchmark: google_calendar_push at scale, through the code the DAG runs, against the local fake Google.

    ./dev services --profile test; eval "$(./dev env --profile test)"   # a migrated Postgres
    .venv/bin/python benchmarks/google_push.py                           # 1,000 members x 100
    .venv/bin/python benchmarks/google_push.py --members 50 --instances 20   # a short run

Registers a benchmark tenant (its rows only: nothing else in the database is touched, and
everything it created is deleted at the end): N members, each connected to Google (an account
of the fake) and a member of one shared calendar (``--members-per-calendar`` members each) of M
instances inside the run's sync window. Serves ``tests/support/fake_google.py`` (OAuth and
Calendar v3 on the real wire format, batch endpoint included) on 127.0.0.1, and times three
cycles of ``almanac.google.calendar_push.push_batch`` over the DAG's member batches
(``google_push_batch_size``), ``--workers`` processes at a time as mapped tasks would:

1. cold: every instance is new (N x M inserts);   2. nothing changed (no call);
3. changed: every instance changed (N x M patches).

Prints per cycle: wall seconds, Google calls made and calls/s, the HTTP requests that carried
them (batch requests vs single calls, against the ceil(calls / google_batch_size) floor) and
token refreshes. Figures only: nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support.fake_google

BENCH_TENANT = 990_100  # the benchmark's own tenant id; removed (with everything under it) at the end
BENCH_IDS = 990_100_000  # its users' and calendars' ids start above this (serials may lag explicit ids)


# --------------------------------------------------------------------------- database


def cleanup(db_url: str) -> None:
    """Delete everything the benchmark created (the tenant's rows cascade; pending rows have no FK)."""
    import psycopg

    with psycopg.connect(db_url) as conn:
        conn.execute(
            "DELETE FROM calendar_push_pending p USING calendars c"
            " WHERE c.id = p.calendar_id AND c.tenant_id = %s",
            (BENCH_TENANT,),
        )
        conn.execute("DELETE FROM tenants WHERE id = %s", (BENCH_TENANT,))
        conn.commit()


def register(db_url: str, google, key: str, args, first: datetime) -> list[int]:
    """The tenant, its calendars, instances, members and their Google accounts; the member ids."""
    import psycopg

    from almanac.google.accounts import connect_account
    from almanac.google.crypto import TokenCipher

    cipher = TokenCipher(key)
    members, instances, per_calendar = args.members, args.instances, args.members_per_calendar
    calendars = math.ceil(members / per_calendar)
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, 'google push benchmark')", (BENCH_TENANT,))
        user_ids = [
            row[0]
            for row in conn.execute(
                """
                INSERT INTO users (id, tenant_id, name, email)
                SELECT %s + n, %s, 'bench ' || n, 'bench-' || n || '@almanac.test'
                  FROM generate_series(1, %s) AS n
                RETURNING id
                """,
                (BENCH_IDS, BENCH_TENANT, members),
            ).fetchall()
        ]
        user_ids.sort()
        calendar_ids = sorted(
            row[0]
            for row in conn.execute(
                """
                INSERT INTO calendars (id, tenant_id, name, time_zone)
                SELECT %s + n, %s, 'bench ' || n, 'Europe/Berlin' FROM generate_series(1, %s) AS n
                RETURNING id
                """,
                (BENCH_IDS, BENCH_TENANT, calendars),
            ).fetchall()
        )
        conn.execute(
            """
            INSERT INTO events (calendar_id, uid, summary, starts_at, ends_at, content_hash)
            SELECT c, 'bench-' || n || '@almanac.test', 'Practice ' || n,
                   %(first)s + n * interval '3 hours', %(first)s + n * interval '3 hours' + interval '1 hour',
                   'bench:' || c || ':' || n
              FROM unnest(%(calendars)s::bigint[]) AS c, generate_series(1, %(instances)s) AS n
            """,
            {"first": first, "calendars": calendar_ids, "instances": instances},
        )
        conn.execute(
            """
            INSERT INTO calendar_members (calendar_id, user_id)
            SELECT (%(calendars)s::bigint[])[(i - 1) / %(per)s + 1], u
              FROM unnest(%(users)s::bigint[]) WITH ORDINALITY AS m(u, i)
            """,
            {"calendars": calendar_ids, "users": user_ids, "per": per_calendar},
        )
        for user_id in user_ids:
            refresh_token = google.grant(f"bench-{user_id}")  # one Google account per member
            connect_account(conn, cipher, user_id, refresh_token, account_subject=f"bench-{user_id}")
        conn.commit()
    return user_ids


def change_all(db_url: str, round_no: int) -> None:
    import psycopg

    with psycopg.connect(db_url) as conn:
        conn.execute(
            """
            UPDATE events
               SET summary = summary || ' (rev ' || %s || ')', content_hash = content_hash || ':r' || %s
             WHERE calendar_id IN (SELECT id FROM calendars WHERE tenant_id = %s)
            """,
            (round_no, round_no, BENCH_TENANT),
        )
        conn.commit()


# --------------------------------------------------------------------------- cycles


def _worker(args) -> dict:
    db_url, key, token_uri, api_endpoint, member_ids, window, batch_size = args
    from almanac.batches import summarize_batch
    from almanac.db.connect import connect
    from almanac.db.redis_conn import connect_redis
    from almanac.google.calendar_push import PUSH_KIND, push_batch
    from almanac.google.client import OAuthClient
    from almanac.google.crypto import TokenCipher
    from almanac.integrations.google import google_credentials
    from almanac.integrations.providers import ProviderConfig
    from almanac.integrations.refresh import Refresher
    from almanac.leases import LeaseKeeper

    oauth = OAuthClient("almanac-bench", "bench-secret", token_uri, api_endpoint)
    google = ProviderConfig("google", oauth.client_id, oauth.client_secret, token_uri)
    redis = connect_redis(os.environ["ALMANAC_REDIS_URL"])
    # As the DAG: tokens from the integrations store, refreshed through its one path.
    with connect(db_url) as conn, connect(db_url) as token_conn, LeaseKeeper(redis, "bench-push") as leases:
        tokens = Refresher(TokenCipher(key), lambda name: google, leases)
        results = push_batch(
            conn,
            member_ids,
            calendar_ids=None,
            credentials=lambda integration_id: google_credentials(tokens, token_conn, integration_id),
            oauth=oauth,
            window=window,
            batch_size=batch_size,
        )
    redis.close()
    return summarize_batch(PUSH_KIND, results)


def _warm_worker() -> None:
    """Import what a task imports before the clock starts (an Airflow worker is warm too)."""
    import googleapiclient.discovery  # noqa: F401  (warm import)
    import psycopg  # noqa: F401  (warm import)

    import almanac.google.calendar_push  # noqa: F401  (warm import)


def run_cycle(name: str, pool, google, jobs: list[tuple]) -> dict:
    from almanac.batches import combine_summaries
    from almanac.google.calendar_push import PUSH_KIND

    with google.lock:
        calls_before, http_before = len(google.requests), len(google.http_requests)
    started = time.perf_counter()
    summaries = pool.map(_worker, jobs, chunksize=1)
    wall = time.perf_counter() - started
    total = combine_summaries(PUSH_KIND, summaries)
    with google.lock:
        calls = [r for r in google.requests[calls_before:] if r[1] != "/token"]
        tokens = sum(1 for r in google.requests[calls_before:] if r[1] == "/token")
        http = google.http_requests[http_before:]
    batches = [n for _, path, n in http if path.startswith("/batch/")]
    singles = len(http) - len(batches)
    row = {
        "cycle": name,
        "wall_s": wall,
        "calls": len(calls),
        "calls_per_s": len(calls) / wall if calls else 0.0,
        "batch_requests": len(batches),
        "calls_in_batches": sum(batches),
        "single_requests": singles,
        "token_calls": tokens,
        **{k: total[k] for k in ("errorCount", *PUSH_KIND.counters)},
    }
    print(
        f"{name:<10} {wall:8.2f} s  {len(calls):>7} calls  {row['calls_per_s']:7.0f} calls/s  "
        f"HTTP requests {len(http):>6} ({len(batches)} batch carrying {sum(batches)} calls, {singles} single)"
        f"  token calls {tokens:>5}  (+{row['eventsCreated']} ~{row['eventsUpdated']} -{row['eventsDeleted']}"
        f" !{row['eventsRejected']})  member errors {row['errorCount']}",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=100, help="changed instances per member")
    parser.add_argument("--members-per-calendar", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="push tasks at a time")
    parser.add_argument(
        "--batch-size", type=int, help="calls per HTTP request (default: google_batch_size; 1 = no batching)"
    )
    parser.add_argument("--db-url", default=os.environ.get("ALMANAC_APP_DB_URL"))
    args = parser.parse_args()
    if not args.db_url:
        sys.exit("set ALMANAC_APP_DB_URL (eval \"$(./dev env --profile test)\") or pass --db-url")

    from almanac.batches import plan_batches
    from almanac.google.crypto import generate_key
    from almanac.ics.sync import sync_window
    from almanac.settings import Settings
    from tests.support.fake_google import FakeGoogle

    settings = Settings.from_mapping({"google_batch_size": args.batch_size} if args.batch_size else None)
    anchor = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    instant = anchor + timedelta(hours=12)
    window = sync_window(instant, settings)
    key = generate_key()
    cleanup(args.db_url)  # a run that was interrupted before its own cleanup
    with FakeGoogle() as google:
        try:
            user_ids = register(args.db_url, google, key, args, anchor + timedelta(days=1))
            size = settings.google_push_batch_size  # what the DAG's planner cuts
            batches = [b["ids"] for b in plan_batches(user_ids, min_size=1, max_size=size, target_count=1)]
            fake = (google.token_uri, google.api_endpoint)
            jobs = [(args.db_url, key, *fake, ids, window, settings.google_batch_size) for ids in batches]
            # the fewest HTTP requests a full cycle can take: ceil(M / google_batch_size) per member
            floor = args.members * math.ceil(args.instances / settings.google_batch_size)
            print(
                f"{args.members} members x {args.instances} instances, {len(batches)} push tasks of <= {size}"
                f" members, {args.workers} workers, google_batch_size {settings.google_batch_size} (fewest"
                f" HTTP requests per full cycle: {floor}), window {window[0]:%Y-%m-%d}..{window[1]:%Y-%m-%d}",
                flush=True,
            )
            pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=_warm_worker)
            try:
                run_cycle("cold", pool, google, jobs)
                run_cycle("unchanged", pool, google, jobs)
                change_all(args.db_url, 1)
                run_cycle("changed", pool, google, jobs)
            finally:
                pool.close()
                pool.join()
        finally:
            cleanup(args.db_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: oauth_token_refresh and integration_health at scale, through the code the DAGs run,
against the local fake OAuth provider in its own process.

    ./dev services --profile test && eval "$(./dev env --profile test)"
    .venv/bin/python benchmarks/integrations.py                  # 50,000 integrations, 10% due
    .venv/bin/python benchmarks/integrations.py --quick          # 2,000: a smoke run

Registers a benchmark tenant (its rows only: nothing else in the database is touched, and
everything it created is deleted at the end, also after an error or Ctrl-C): N users, each
with one integration of provider ``bench_oauth`` stored through ``almanac.integrations.store.connect``
— a real grant of the fake (refresh token and access token, signed with the fake's secret),
encrypted with a ``TokenCipher``. ``--due-share`` of them hold an access token expiring inside
the refresh lead of this minute's run, so they are due for it; the others expire 35-65 minutes
later. The fake (``python -m almanac.integrations.fakes serve``) runs in a process of its own,
so its CPU is not counted in ours.

1. Refresh cycle, as one ``oauth_token_refresh`` run: plan as ``plan_refresh`` does
   (``store.due_for_refresh`` of the run's data-interval end, then ``plan_batches`` with the
   ``oauth_batch_*`` settings), then the mapped batches, ``--workers`` processes at a time (the
   LocalExecutor's parallel tasks), each running ``Refresher.refresh_many`` (``oauth_parallel_requests``
   threads) under a Redis ``LeaseKeeper``, as ``refresh_work`` does. Then the same run again (a
   rerun: nothing is due any more) and the first run's batches again (a retry of its tasks:
   every row is re-read under its lease and found refreshed).
2. Health sweep, as one ``integration_health`` run: ``store.due_for_health_check`` + ``plan_batches``,
   then ``HealthChecker.check_many`` per batch in the same process layout, against the
   4-hour interval's target (< 600 s for 50,000 against the local fake).

The plans keep only the benchmark tenant's integrations (another tenant's rows in the same
database are never refreshed or checked here). Worker processes are started (and warmed) before
the clock starts, as an Airflow worker is; a task's own start-up is not counted. Prints, per run:
due/planned count, batches, wall seconds, items/s, outcomes, the provider's request counts and
the CPU seconds of the workers and of the fake. Figures only: nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

BENCH_TENANT = 990_300  # the benchmark's own tenant id; removed (with everything under it) at the end
USER_BASE = BENCH_TENANT * 1_000_000  # its users' ids: USER_BASE + 1 .. USER_BASE + N
PROVIDER = "bench_oauth"
CLIENT_ID = "almanac-bench"
HEALTH_TARGET_S = 600.0


# --------------------------------------------------------------------------- database


def cleanup(db_url: str) -> None:
    """Delete everything the benchmark created: users, integrations (and any outbox row) cascade."""
    from almanac.db.connect import connect

    with connect(db_url) as conn:
        conn.execute("DELETE FROM tenants WHERE id = %s", (BENCH_TENANT,))
        conn.commit()


def register(db_url: str, state, cipher, args, interval_end: datetime, lead: timedelta) -> list[int]:
    """The tenant, its users and one integration each; returns the integration ids.

    Integration i is due when its share counter ticks (``--due-share`` of them, spread evenly):
    its access token expires ``lead`` minus 1..59 s after ``interval_end``, so ``next_refresh_at``
    falls inside the minute before it. The others expire 35..65 minutes after it."""
    from almanac.db.connect import connect
    from almanac.integrations import store

    count, share = args.integrations, args.due_share
    now = datetime.now(UTC)
    ids = []
    with connect(db_url) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, 'integrations benchmark')", (BENCH_TENANT,))
        with conn.cursor() as cur:
            with cur.copy("COPY users (id, tenant_id, name, email) FROM STDIN") as copy:
                for i in range(1, count + 1):
                    copy.write_row(
                        (USER_BASE + i, BENCH_TENANT, f"bench {i}", f"bench-{i}@integrations.test")
                    )
        for i in range(1, count + 1):
            subject = f"bench-{i}"
            due = int(i * share) > int((i - 1) * share)
            if due:
                expires_at = interval_end + lead - timedelta(seconds=1 + i % 59)
            else:
                expires_at = interval_end + timedelta(minutes=35 + i % 31, seconds=i % 60)
            refresh_token = state.grant(subject, scopes=("openid", "email"))
            access_token = state.issue_access_token(subject, ttl=expires_at.timestamp() - time.time())
            ids.append(
                store.connect(
                    conn,
                    cipher,
                    tenant_id=BENCH_TENANT,
                    provider=PROVIDER,
                    refresh_token=refresh_token,
                    user_id=USER_BASE + i,
                    access_token=access_token,
                    expires_at=datetime.fromtimestamp(int(expires_at.timestamp()), UTC),  # as the token says
                    scopes=("openid", "email"),
                    account_subject=subject,
                    now=now,
                    lead=lead,
                )
            )
            if i % 10_000 == 0:
                conn.commit()
        conn.commit()
    return sorted(ids)


def ours_only(ids: list[int], ours: set[int]) -> list[int]:
    kept = [i for i in ids if i in ours]
    if len(kept) != len(ids):
        print(f"  (the plan also found {len(ids) - len(kept)} integration(s) of other tenants: left alone)")
    return kept


# --------------------------------------------------------------------------- the fake provider


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeRunner:
    """``python -m almanac.integrations.fakes serve`` in a process of its own (secrets by environment)."""

    def __init__(self, port: int, client_secret: str, secret: str) -> None:
        from almanac.integrations.fakes import CLIENT_SECRET_ENV, SECRET_ENV

        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-fake-oauth-", suffix=".log", delete=False)
        env = {**os.environ, SECRET_ENV: secret, CLIENT_SECRET_ENV: client_secret}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "almanac.integrations.fakes",
                "serve",
                "--port",
                str(port),
                "--client-id",
                CLIENT_ID,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    sys.exit(f"the fake OAuth provider did not start; its log: {self.log.name}")
                time.sleep(0.1)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=5) as resp:
            return json.load(resp)

    def cpu_s(self) -> float | None:
        """The runner's CPU seconds so far (user + system), from /proc; None elsewhere."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


# --------------------------------------------------------------------------- worker processes


def _provider_lookup(config):
    from almanac.errors import ConfigError

    def lookup(name: str):
        if name != config.name:
            raise ConfigError(f"provider {name!r}: not configured in this benchmark")
        return config

    return lookup


def _refresh_worker(job: dict) -> dict:
    """One ``refresh_batch`` task: ``refresh_work`` with the benchmark's provider and key."""
    from almanac.batches import summarize_batch
    from almanac.db.connect import connect
    from almanac.db.redis_conn import connect_redis
    from almanac.google.crypto import TokenCipher
    from almanac.integrations.refresh import REFRESH_KIND, Refresher, RefreshOptions
    from almanac.leases import LeaseKeeper
    from almanac.settings import Settings

    cpu = time.process_time()
    settings = Settings()
    redis = connect_redis(job["redis_url"])
    try:
        with LeaseKeeper(redis, job["owner"]) as leases:
            refresher = Refresher(
                TokenCipher(job["key"]),
                _provider_lookup(job["provider"]),
                leases,
                RefreshOptions.from_settings(settings),
            )
            results = refresher.refresh_many(
                lambda: connect(job["db_url"], application_name="bench-oauth-refresh"),
                job["ids"],
                parallel=settings.oauth_parallel_requests,
                due_before=datetime.fromisoformat(job["due_before"]),
            )
    finally:
        redis.close()
    summary = summarize_batch(REFRESH_KIND, results, failure_percent=100)
    summary["cpu_s"] = time.process_time() - cpu
    return summary


def _health_worker(job: dict) -> dict:
    """One ``check_batch`` task: ``health_work`` with the benchmark's provider and key."""
    from almanac.batches import summarize_batch
    from almanac.db.connect import connect
    from almanac.google.crypto import TokenCipher
    from almanac.integrations.health import HEALTH_KIND, HealthChecker
    from almanac.integrations.refresh import plain_session
    from almanac.settings import Settings

    cpu = time.process_time()
    settings = Settings()
    checker = HealthChecker(
        TokenCipher(job["key"]),
        _provider_lookup(job["provider"]),
        session=plain_session,
        clock=lambda: datetime.now(UTC),
        timeout_s=float(settings.oauth_request_timeout_s),
    )
    results = checker.check_many(
        lambda: connect(job["db_url"], application_name="bench-integration-health"),
        job["ids"],
        checked_since=datetime.fromisoformat(job["checked_since"]),
        parallel=settings.oauth_parallel_requests,
    )
    summary = summarize_batch(HEALTH_KIND, results, failure_percent=100)
    summary["cpu_s"] = time.process_time() - cpu
    return summary


def _warm_worker() -> None:
    """Import what a task imports before the clock starts (an Airflow worker is warm too)."""
    import logging

    import psycopg  # noqa: F401  (warm import)
    import redis  # noqa: F401  (warm import)
    import requests  # noqa: F401  (warm import)

    import almanac.integrations.health  # noqa: F401  (warm import)
    import almanac.integrations.refresh  # noqa: F401  (warm import)

    logging.basicConfig(level=logging.ERROR)  # a failed item is counted; its log line is not the figure


# --------------------------------------------------------------------------- runs


def _run(pool, worker, kind, batches: list[dict], common: dict, run_id: str, fake: FakeRunner) -> dict:
    from almanac.batches import combine_summaries

    jobs = [
        {**common, **batch, "owner": f"bench/{run_id}/batch/{index}"} for index, batch in enumerate(batches)
    ]
    fake_cpu, stats = fake.cpu_s(), fake.stats()
    started = time.perf_counter()
    summaries = pool.map(worker, jobs, chunksize=1) if jobs else []
    wall = time.perf_counter() - started
    after, fake_after = fake.stats(), fake.cpu_s()
    total = combine_summaries(kind, summaries, planned=len(batches))
    total["run_s"] = wall
    total["worker_cpu_s"] = sum(s["cpu_s"] for s in summaries)
    total["fake_cpu_s"] = fake_after - fake_cpu if fake_cpu is not None and fake_after is not None else None
    total["provider"] = {key: after[key] - stats[key] for key in after}
    return total


def _cpu_line(total: dict) -> str:
    fake = f"{total['fake_cpu_s']:.1f}" if total["fake_cpu_s"] is not None else "?"
    return f"CPU: workers {total['worker_cpu_s']:.1f} s, fake provider {fake} s"


def refresh_run(name, pool, db_url, ours, interval_end, settings, common, fake, batches=None) -> tuple:
    """One ``oauth_token_refresh`` run (plan + batches); ``batches``: retry those instead of planning."""
    from almanac.db.connect import connect
    from almanac.integrations.refresh import REFRESH_KIND
    from almanac.integrations.store import due_for_refresh

    started = time.perf_counter()
    if batches is None:
        with connect(db_url) as conn:
            due = ours_only(due_for_refresh(conn, interval_end), ours)
        from almanac.integrations import plan_integration_batches

        batches = plan_integration_batches(due, settings, {"due_before": interval_end.isoformat()})
    plan_s = time.perf_counter() - started
    due_count = sum(len(b["ids"]) for b in batches)
    total = _run(pool, _refresh_worker, REFRESH_KIND, batches, common, name, fake)
    wall = time.perf_counter() - started
    refreshed = total["refreshed"]
    print(
        f"{name:<22} due {due_count:>6,} in {len(batches):>3} batches  wall {wall:7.2f} s "
        f"(plan {plan_s:.2f} s)  refreshed {refreshed:>6,} = {refreshed / wall if wall else 0:7.0f}/s",
        flush=True,
    )
    unchanged = total["successCount"] - len(total[REFRESH_KIND.changed_key])
    print(
        f"{'':<22} failures {total['errorCount']} (busy {total['busyCount']}), revoked {total['revoked']}, "
        f"skipped {total['skippedCount']}, unchanged {unchanged:,}, rotated {total['rotated']}; "
        f"provider token requests {total['provider']['token_requests']:,}; {_cpu_line(total)}",
        flush=True,
    )
    return total, batches


def health_sweep(pool, db_url, ours, settings, common, fake) -> dict:
    """One ``integration_health`` run: what was not checked since its data-interval end (now)."""
    from almanac.db.connect import connect
    from almanac.integrations.health import HEALTH_KIND
    from almanac.integrations.store import due_for_health_check

    since = datetime.now(UTC)
    started = time.perf_counter()
    with connect(db_url) as conn:
        ids = ours_only(due_for_health_check(conn, since), ours)
    from almanac.integrations import plan_integration_batches

    batches = plan_integration_batches(ids, settings, {"checked_since": since.isoformat()})
    plan_s = time.perf_counter() - started
    total = _run(pool, _health_worker, HEALTH_KIND, batches, common, "integration_health", fake)
    wall = time.perf_counter() - started
    checked = sum(total[state] for state in HEALTH_KIND.counters)
    verdict = "within" if wall < HEALTH_TARGET_S else "OVER"
    print(
        f"{'health sweep':<22} planned {len(ids):>6,} in {len(batches):>3} batches  wall {wall:7.2f} s "
        f"(plan {plan_s:.2f} s)  checked {checked:>6,} = {checked / wall if wall else 0:7.0f}/s  "
        f"(target: < {HEALTH_TARGET_S:.0f} s: {verdict})",
        flush=True,
    )
    states = ", ".join(f"{state} {total[state]:,}" for state in HEALTH_KIND.counters)
    print(
        f"{'':<22} {states}; skipped {total['skippedCount']}, item errors {total['errorCount']}; "
        f"provider userinfo requests {total['provider']['userinfo_requests']:,}; {_cpu_line(total)}",
        flush=True,
    )
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--integrations", type=int, help="integrations (users) to register (default 50,000)")
    parser.add_argument("--due-share", type=float, default=0.1, help="share due for this minute's run")
    parser.add_argument("--workers", type=int, default=4, help="batch tasks at a time (LocalExecutor slots)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 integrations")
    parser.add_argument("--skip-health", action="store_true", help="only the refresh runs")
    parser.add_argument("--db-url", default=os.environ.get("ALMANAC_APP_DB_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("ALMANAC_REDIS_URL"))
    args = parser.parse_args()
    if not args.db_url or not args.redis_url:
        parser.error('set ALMANAC_APP_DB_URL and ALMANAC_REDIS_URL (eval "$(./dev env --profile test)")')
    if args.integrations is None:
        args.integrations = 2_000 if args.quick else 50_000
    if args.integrations < 1 or not 0 <= args.due_share <= 1 or args.workers < 1:
        parser.error("--integrations and --workers must be >= 1, --due-share within 0..1")

    from almanac.google.crypto import TokenCipher, generate_key
    from almanac.integrations.fakes import OAuthState
    from almanac.integrations.providers import ProviderConfig
    from almanac.integrations.refresh import RefreshOptions
    from almanac.settings import Settings

    settings = Settings()
    lead = RefreshOptions.from_settings(settings).lead
    key, secret, client_secret = generate_key(), secrets.token_hex(32), secrets.token_urlsafe(24)
    state = OAuthState(client_id=CLIENT_ID, client_secret=client_secret, secret=secret)  # mints the grants
    interval_end = datetime.now(UTC).replace(second=0, microsecond=0)  # this minute's run
    cleanup(args.db_url)  # a run that was interrupted before its own cleanup
    fake = pool = None
    try:
        fake = FakeRunner(free_port(), client_secret, secret)
        provider = ProviderConfig(
            name=PROVIDER,
            client_id=CLIENT_ID,
            client_secret=client_secret,
            token_url=f"{fake.url}/oauth/token",
            health_url=f"{fake.url}/userinfo",
        )
        started = time.perf_counter()
        ids = register(args.db_url, state, TokenCipher(key), args, interval_end, lead)
        ours = set(ids)
        took = time.perf_counter() - started
        print(
            f"{len(ids):,} integrations registered through store.connect in {took:.1f} s "
            f"({args.due_share:.0%} due before {interval_end:%H:%M:%S} UTC); {args.workers} worker "
            f"processes, oauth_parallel_requests {settings.oauth_parallel_requests}, batches "
            f"{settings.oauth_batch_min}..{settings.oauth_batch_max} aiming at "
            f"{settings.oauth_batch_target_count}",
            flush=True,
        )
        common = {"db_url": args.db_url, "redis_url": args.redis_url, "key": key, "provider": provider}
        pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=_warm_worker)
        pool.map(time.sleep, [0.0] * args.workers)  # every worker up and warm before the clock starts
        run = (pool, args.db_url, ours, interval_end, settings, common, fake)
        first, batches = refresh_run("oauth_token_refresh", *run)
        again, _ = refresh_run("rerun (new plan)", *run)
        retry, _ = refresh_run("retry of its batches", *run, batches=batches)
        print(
            f"{'':<22} the rerun refreshed {again['refreshed']}, the retry {retry['refreshed']} "
            f"(the first run: {first['refreshed']:,} of {sum(len(b['ids']) for b in batches):,} due)",
            flush=True,
        )
        if not args.skip_health:
            health_sweep(pool, args.db_url, ours, settings, common, fake)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if fake is not None:
            fake.stop()
        cleanup(args.db_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())

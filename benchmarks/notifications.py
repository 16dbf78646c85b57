"""Benchmark: the notification outbox — bulk enqueue, dispatch per channel, wake-up latency.

    ./dev services --profile test && eval "$(./dev env --profile test)"
    .venv/bin/python benchmarks/notifications.py                     # 100,000 messages
    .venv/bin/python benchmarks/notifications.py --messages 10000    # a shorter run

Against the real outbox (PostgreSQL), real Redis rate limits (set high enough not to bind) and
the local fakes (a real SMTP server, the Twilio- and FCM-shaped APIs) in this process, it prints:

1. the bulk enqueue rate (``enqueue_many``, mixed channels, one transaction per 10,000);
2. the dispatch rate per channel with 5 and with 10 dispatch processes per channel (what the
   pools ``notifications_<channel>`` allow), each process running ``dispatch_channel`` as a
   ``notification_dispatch`` task does;
3. the p50/p99 latency from enqueue to sent with a lingering dispatcher per channel woken through
   the Redis stream (``almanac.notify.wakeups``), one message at a time.

Its rows (tenant ``BENCH_TENANT``) are removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

BENCH_TENANT = 990_002
USERS = 2_000
CHANNELS = ("email", "sms", "push")


def cleanup(db_url: str) -> None:
    from almanac.db.connect import connect

    with connect(db_url) as conn:
        conn.execute("DELETE FROM tenants WHERE id = %s", (BENCH_TENANT,))
        conn.commit()


def seed_users(db_url: str) -> None:
    from almanac.db.connect import connect

    base = BENCH_TENANT * 10_000
    with connect(db_url) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, 'notify bench')", (BENCH_TENANT,))
        with conn.cursor() as cur:
            with cur.copy(
                "COPY users (id, tenant_id, name, email, phone, contact_channels) FROM STDIN"
            ) as copy:
                for i in range(USERS):
                    copy.write_row(
                        (
                            base + i,
                            BENCH_TENANT,
                            f"u{i}",
                            f"u{i}@bench.example.com",
                            f"+1555{i:07d}",
                            "{email,sms,push}",
                        )
                    )
            with cur.copy("COPY push_devices (user_id, registration_token, platform) FROM STDIN") as copy:
                for i in range(USERS):
                    copy.write_row((base + i, f"bench-device-{i}", "android"))
        conn.commit()


def settings(**kw):
    from almanac.settings import Settings

    big = 10**9
    return Settings(
        notify_email_per_second=big,
        notify_sms_per_second=big,
        notify_push_per_second=big,
        notify_email_per_user_per_hour=big,
        notify_sms_per_user_per_hour=big,
        notify_push_per_user_per_hour=big,
        **kw,
    )


def enqueue(db_url: str, count: int, prefix: str) -> float:
    from almanac.db.connect import connect
    from almanac.notify.outbox import NewNotification, enqueue_many

    base = BENCH_TENANT * 10_000
    started = time.perf_counter()
    with connect(db_url) as conn:
        for start in range(0, count, 10_000):
            enqueue_many(
                conn,
                (
                    NewNotification(
                        tenant_id=BENCH_TENANT,
                        channel=CHANNELS[i % 3],
                        kind="bench",
                        idempotency_key=f"{prefix}:{i}",
                        subject="Bench",
                        body=f"message {i}",
                        user_id=base + i % USERS,
                    )
                    for i in range(start, min(count, start + 10_000))
                ),
            )
            conn.commit()
    return time.perf_counter() - started


def _factories(ports: dict):
    from almanac.notify.channels import EmailSender, FcmConfig, PushSender, SmsConfig, SmsSender, SmtpConfig

    return {
        "email": lambda: EmailSender(SmtpConfig("127.0.0.1", ports["smtp"], from_addr="bench@example.com")),
        "sms": lambda: SmsSender(
            SmsConfig(
                base_url=ports["sms_url"],
                account_sid=ports["sid"],
                auth_token=ports["token"],
                from_number="+15550009999",
            )
        ),
        "push": lambda: PushSender(
            FcmConfig(
                base_url=ports["fcm_url"], project_id=ports["project"], service_account_info=ports["sa"]
            )
        ),
    }


def _dispatch_worker(args) -> dict:
    db_url, redis_url, channel, ports, index, linger, budget = args
    from almanac.db.connect import connect
    from almanac.db.redis_conn import connect_redis
    from almanac.notify.dispatch import dispatch_channel
    from almanac.notify.ratelimit import NotifyLimiter

    cfg = settings(notify_run_budget_s=budget, notify_idle_poll_ms=200)
    rds = connect_redis(redis_url)
    with connect(db_url) as conn:
        return dispatch_channel(
            conn,
            channel,
            _factories(ports)[channel],
            owner=f"bench/{channel}/{index}",
            settings=cfg,
            limiter=NotifyLimiter(rds, cfg),
            linger=linger,
            wakeups=rds if linger else None,
        )


def dispatch(
    db_url: str, redis_url: str, ports: dict, workers: int, total: int
) -> dict[str, tuple[int, float]]:
    """Dispatch every due row, ``workers`` processes per channel at once; (sent, seconds) per channel."""
    ctx = multiprocessing.get_context("spawn")
    result = {}
    for channel in CHANNELS:
        started = time.perf_counter()
        with ctx.Pool(workers) as pool:
            counts = pool.map(
                _dispatch_worker,
                [(db_url, redis_url, channel, ports, i, False, 3600) for i in range(workers)],
            )
        result[channel] = (sum(c["sent"] for c in counts), time.perf_counter() - started, counts)
    return result


def latency(db_url: str, redis_url: str, ports: dict, samples: int) -> list[float]:
    """Seconds from enqueue (commit) to sent, one message at a time, with lingering dispatchers."""
    from almanac.db.connect import connect
    from almanac.db.redis_conn import connect_redis
    from almanac.notify.outbox import NewNotification
    from almanac.notify.outbox import enqueue as put
    from almanac.notify.wakeups import push_wakeup

    budget = samples * 0.6 + 20
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(3)
    pending = pool.map_async(
        _dispatch_worker, [(db_url, redis_url, c, ports, 0, True, budget) for c in CHANNELS]
    )
    time.sleep(8)  # the dispatchers are up and waiting
    rds = connect_redis(redis_url)
    base = BENCH_TENANT * 10_000
    waits = []
    with connect(db_url) as conn:
        for i in range(samples):
            nid = put(
                conn,
                NewNotification(
                    tenant_id=BENCH_TENANT,
                    channel=CHANNELS[i % 3],
                    kind="bench-latency",
                    idempotency_key=f"latency:{time.time_ns()}:{i}",
                    body="ping",
                    user_id=base + i % USERS,
                ),
            )
            conn.commit()
            push_wakeup(rds, nid)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT extract(epoch FROM sent_at - created_at) FROM notifications"
                    " WHERE id = %s AND status = 'sent'",
                    (nid,),
                ).fetchone()
                conn.commit()
                if row:
                    waits.append(float(row[0]))
                    break
                time.sleep(0.005)
            time.sleep(0.1)
    pool.terminate()
    pending.wait(1)
    return waits


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--latency-samples", type=int, default=60)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[5, 10], help="dispatch processes per channel"
    )
    parser.add_argument("--db-url", default=os.environ.get("ALMANAC_APP_DB_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("ALMANAC_REDIS_URL"))
    args = parser.parse_args()
    if not args.db_url or not args.redis_url:
        parser.error('set ALMANAC_APP_DB_URL and ALMANAC_REDIS_URL (eval "$(./dev env --profile test)")')

    from almanac.notify.fakes import FakeFcm, FakeSmtpServer, FakeTwilio

    logging_quiet()
    cleanup(args.db_url)
    try:
        seed_users(args.db_url)
        with FakeSmtpServer() as smtp, FakeTwilio() as twilio, FakeFcm() as fcm:
            ports = {
                "smtp": smtp.port,
                "sms_url": twilio.url,
                "sid": twilio.account_sid,
                "token": twilio.auth_token,
                "fcm_url": fcm.url,
                "project": fcm.project_id,
                "sa": fcm.service_account_info(),
            }
            print(f"{args.messages:,} notifications ({', '.join(CHANNELS)} in turn) for {USERS:,} users")
            for workers in args.workers:
                seconds = enqueue(args.db_url, args.messages, f"bench-w{workers}")
                print(
                    f"enqueue_many: {args.messages:,} in {seconds:.2f} s = {args.messages / seconds:,.0f}/s"
                )
                for channel, (sent, took, _counts) in dispatch(
                    args.db_url, args.redis_url, ports, workers, args.messages
                ).items():
                    print(
                        f"dispatch {channel:<5} {workers:>2} processes: {sent:,} sent in {took:.1f} s"
                        f" = {sent / took:,.0f}/s"
                    )
                for fake in (smtp, twilio, fcm):
                    fake.reset()
            waits = sorted(latency(args.db_url, args.redis_url, ports, args.latency_samples))
            if waits:
                p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
                print(
                    f"enqueue -> sent with a Redis wake-up: {len(waits)} samples, "
                    f"p50 {statistics.median(waits) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
                )
    finally:
        cleanup(args.db_url)
    return 0


def logging_quiet() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    for name in ("mail.log", "almanac", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())

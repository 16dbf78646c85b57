"""Benchmark: the notification outbox — bulk enqueue, dispatch per channel, wake-up latency.

    ./dev services --profile test && eval "$(./dev env --profile test)"
    .venv/bin/python benchmarks/notifications.py                     # 100,000 messages
    .venv/bin/python benchmarks/notifications.py --messages 10000    # a shorter run

Against the real outbox (PostgreSQL), real Redis rate limits (set high enough not to bind) and
the local fakes (a real SMTP server, the Twilio- and FCM-shaped APIs) in a process of their own
(``--fakes inline``: in this one, as before), it prints:

1. the bulk enqueue rate (``enqueue_many``, mixed channels, one transaction per 10,000);
2. the dispatch rate per channel with 5 and with 10 dispatch processes per channel (what the
   pools ``notifications_<channel>`` allow), each process running ``dispatch_channel`` as a
   ``notification_dispatch`` task does, timed from the moment all of them are ready (their start-up
   is not counted), with the CPU time per send of the dispatchers (user + system, all processes
   together) and of the fakes' process — on a shared machine CPU per send is the steady figure;
3. the p50/p99 latency from enqueue to sent with a lingering dispatcher per channel woken through
   the Redis stream (``almanac.notify.wakeups``), one message at a time.

Its rows (tenant ``BENCH_TENANT``) are removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
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


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_ready = None  # a worker's start barrier (set by the pool's initializer)


def _init_worker(barrier) -> None:
    global _ready
    _ready = barrier


def _dispatch_worker(args) -> dict:
    db_url, redis_url, channel, ports, index, linger, budget = args
    from almanac.db.connect import connect
    from almanac.db.redis_conn import connect_redis
    from almanac.notify.dispatch import dispatch_channel
    from almanac.notify.ratelimit import NotifyLimiter

    cfg = settings(notify_run_budget_s=budget, notify_idle_poll_ms=200)
    rds = connect_redis(redis_url)
    with connect(db_url) as conn:
        if _ready is not None:
            _ready.wait(300)  # every dispatcher imported and connected: the clock starts
        cpu, started = cpu_seconds(), time.time()
        counts = dispatch_channel(
            conn,
            channel,
            _factories(ports)[channel],
            owner=f"bench/{channel}/{index}",
            settings=cfg,
            limiter=NotifyLimiter(rds, cfg),
            linger=linger,
            wakeups=rds if linger else None,
        )
        return {**counts, "_cpu": cpu_seconds() - cpu, "_started": started, "_ended": time.time()}


def dispatch(db_url: str, redis_url: str, ports: dict, workers: int, fakes) -> dict[str, dict]:
    """Dispatch every due row, ``workers`` processes per channel at once; per channel: sent, the
    seconds from all dispatchers ready to the last one done, their CPU seconds and the fakes'."""
    ctx = multiprocessing.get_context("spawn")
    result = {}
    for channel in CHANNELS:
        barrier = ctx.Barrier(workers)
        fakes_cpu = fakes.cpu()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(barrier,)) as pool:
            counts = pool.map(
                _dispatch_worker,
                [(db_url, redis_url, channel, ports, i, False, 3600) for i in range(workers)],
            )
        result[channel] = {
            "sent": sum(c["sent"] for c in counts),
            "seconds": max(c["_ended"] for c in counts) - min(c["_started"] for c in counts),
            "cpu": sum(c["_cpu"] for c in counts),
            "fakes_cpu": fakes.cpu() - fakes_cpu,
        }
    return result


# -- the fakes -------------------------------------------------------------------------------------


def _serve_fakes(conn) -> None:
    """The fakes' process: serve them, tell the ports, then answer "cpu", "reset" and "stop"."""
    logging_quiet()
    from almanac.notify.fakes import FakeFcm, FakeSmtpServer, FakeTwilio

    with FakeSmtpServer() as smtp, FakeTwilio() as twilio, FakeFcm() as fcm:
        conn.send(_ports(smtp, twilio, fcm))
        while True:
            command = conn.recv()
            if command == "stop":
                return
            if command == "reset":
                for fake in (smtp, twilio, fcm):
                    fake.reset()
            conn.send(cpu_seconds())


def _ports(smtp, twilio, fcm) -> dict:
    return {
        "smtp": smtp.port,
        "sms_url": twilio.url,
        "sid": twilio.account_sid,
        "token": twilio.auth_token,
        "fcm_url": fcm.url,
        "project": fcm.project_id,
        "sa": fcm.service_account_info(),
    }


class FakesProcess:
    """The three fakes in a process of their own (in memory, quiet), so what they cost is not
    taken from this process's GIL and can be measured apart."""

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve_fakes, args=(child,), name="notify-fakes", daemon=True)
        self._process.start()
        if not self._conn.poll(60):
            raise RuntimeError("the fakes' process did not start")
        self.ports = self._conn.recv()
        return self

    def cpu(self) -> float:
        self._conn.send("cpu")
        return self._conn.recv()

    def reset(self) -> None:
        self._conn.send("reset")
        self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()


class FakesInline:
    """The three fakes in this process (the benchmark's former set-up)."""

    def __enter__(self):
        from almanac.notify.fakes import FakeFcm, FakeSmtpServer, FakeTwilio

        self._fakes = (FakeSmtpServer().start(), FakeTwilio().start(), FakeFcm().start())
        self.ports = _ports(*self._fakes)
        return self

    def cpu(self) -> float:
        return cpu_seconds()  # this process's, the fakes' threads included

    def reset(self) -> None:
        for fake in self._fakes:
            fake.reset()

    def __exit__(self, *exc: object) -> None:
        for fake in reversed(self._fakes):
            fake.stop()


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
    parser.add_argument(
        "--fakes",
        choices=("process", "inline"),
        default="process",
        help="the fakes in a process of their own (default) or in this one",
    )
    parser.add_argument("--db-url", default=os.environ.get("ALMANAC_APP_DB_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("ALMANAC_REDIS_URL"))
    args = parser.parse_args()
    if not args.db_url or not args.redis_url:
        parser.error('set ALMANAC_APP_DB_URL and ALMANAC_REDIS_URL (eval "$(./dev env --profile test)")')

    logging_quiet()
    cleanup(args.db_url)
    try:
        seed_users(args.db_url)
        with FakesProcess() if args.fakes == "process" else FakesInline() as fakes:
            ports = fakes.ports
            print(
                f"{args.messages:,} notifications ({', '.join(CHANNELS)} in turn) for {USERS:,} users; "
                f"the fakes {'in their own process' if args.fakes == 'process' else 'in this process'}"
            )
            for workers in args.workers:
                seconds = enqueue(args.db_url, args.messages, f"bench-w{workers}")
                print(
                    f"enqueue_many: {args.messages:,} in {seconds:.2f} s = {args.messages / seconds:,.0f}/s"
                )
                for channel, r in dispatch(args.db_url, args.redis_url, ports, workers, fakes).items():
                    per_send = 1e6 / max(r["sent"], 1)
                    print(
                        f"dispatch {channel:<5} {workers:>2} processes: {r['sent']:,} sent in"
                        f" {r['seconds']:.1f} s = {r['sent'] / r['seconds']:,.0f}/s; CPU per send:"
                        f" dispatchers {r['cpu'] * per_send:,.0f} us,"
                        f" fakes {r['fakes_cpu'] * per_send:,.0f} us"
                    )
                fakes.reset()
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

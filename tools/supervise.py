"""Keep one Airflow component running, as compose's ``restart: always`` does (used by ``./dev``).

    python tools/supervise.py [--health URL [--grace S] [--unhealthy-after S] [--every S]
                               [--stop-timeout S]] airflow scheduler

Starts the command and restarts it whenever it exits on its own — e.g. the scheduler, the
dag-processor and the triggerer exit when their database connection is refused during a
PostgreSQL restart — after 1 s, doubling up to 30 s while it keeps dying within a minute of
starting. SIGTERM/SIGINT stop the command and then the supervisor. ``./dev`` runs this as the
leader of the component's process group and stops the whole group.

``--health URL`` adds a liveness probe, as a Kubernetes ``livenessProbe`` does: the URL is
fetched every ``--every`` seconds; once it has answered 200 (or ``--grace`` seconds after the
start, whichever is first) a run of failed probes (refused, timed out, not 200) lasting
``--unhealthy-after`` seconds means the command is alive but stuck. It is then stopped
(SIGTERM, SIGKILL after ``--stop-timeout`` seconds, default 15 — with every process it
started) and restarted like a command that exited. The scheduler needs this: after its
database restarts it can hang in the executor's shutdown (LocalExecutor joins its workers
without a timeout) instead of exiting, and its health server (``[scheduler]
enable_health_check``) then answers 503 because its heartbeat is stale.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

_FIRST, _MAX, _HEALTHY_AFTER_S = 1.0, 30.0, 60.0
_TERM_GRACE_S = 15.0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="supervise.py", description="Keep a command running.")
    parser.add_argument("--health", metavar="URL", help="liveness probe: an HTTP URL answering 200")
    parser.add_argument("--grace", type=float, default=120.0, metavar="S",
                        help="seconds after a start before failed probes count (default 120)")
    parser.add_argument("--unhealthy-after", type=float, default=60.0, metavar="S",
                        help="seconds of failed probes before the command is restarted (default 60)")
    parser.add_argument("--every", type=float, default=10.0, metavar="S",
                        help="seconds between probes (default 10)")
    parser.add_argument("--stop-timeout", type=float, default=_TERM_GRACE_S, metavar="S",
                        help="seconds from SIGTERM to SIGKILL when stopping a stuck command (default 15)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("a COMMAND is required")
    return args


def probe(url: str, timeout: float = 5.0) -> str | None:
    """None when ``url`` answers 200; otherwise what went wrong, in a few words."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _tree(pid: int) -> list:
    """The process ``pid`` and everything it started (psutil ships with Airflow)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(child: subprocess.Popen, grace: float = _TERM_GRACE_S) -> None:
    """SIGTERM (then SIGCONT) ``child`` and its descendants; SIGKILL whatever is left after
    ``grace`` seconds."""
    import psutil

    procs = _tree(child.pid)
    for proc in procs:
        try:
            proc.terminate()
            proc.resume()  # SIGCONT after SIGTERM, as systemd does: a stopped process gets to exit
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def watch(child: subprocess.Popen, args: argparse.Namespace, stopping) -> int:
    """Wait for ``child`` to exit; with ``--health``, stop it when the probe keeps failing."""
    if not args.health:
        return child.wait()
    started = time.monotonic()
    answered = False  # has the probe answered 200 since this start?
    failing_since: float | None = None
    while True:
        try:
            return child.wait(timeout=args.every)
        except subprocess.TimeoutExpired:
            pass
        if stopping():
            continue  # the signal was forwarded; wait for the exit
        problem = probe(args.health)
        now = time.monotonic()
        if problem is None:
            answered, failing_since = True, None
            continue
        if not answered and now - started < args.grace:
            continue  # still starting up
        failing_since = failing_since if failing_since is not None else now
        if now - failing_since >= args.unhealthy_after:
            print(
                f"supervise: {' '.join(args.command)} is alive but failing its health check "
                f"{args.health} for {now - failing_since:.0f}s ({problem}); stopping it",
                flush=True,
            )
            stop_tree(child, args.stop_timeout)
            return child.wait()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: supervise.py [--health URL ...] COMMAND [ARGS...]", file=sys.stderr)
        return 2
    args = _parse(argv)
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wait = _FIRST
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(args.command)
        code = watch(child, args, lambda: stopping)
        if stopping:
            return code
        if time.monotonic() - started > _HEALTHY_AFTER_S:
            wait = _FIRST
        print(
            f"supervise: {' '.join(args.command)} exited with {code}; restarting in {wait:.0f}s",
            flush=True,
        )
        deadline = time.monotonic() + wait
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)
        wait = min(wait * 2, _MAX)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

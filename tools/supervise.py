"""Keep one Airflow component running, as compose's ``restart: always`` does (used by ``./dev``).

    python tools/supervise.py airflow scheduler

Starts the command and restarts it whenever it exits on its own — e.g. the scheduler, the
dag-processor and the triggerer exit when their database connection is refused during a
PostgreSQL restart — after 1 s, doubling up to 30 s while it keeps dying within a minute of
starting. SIGTERM/SIGINT stop the command and then the supervisor. ``./dev`` runs this as the
leader of the component's process group and stops the whole group.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

_FIRST, _MAX, _HEALTHY_AFTER_S = 1.0, 30.0, 60.0


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: supervise.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
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
        child = subprocess.Popen(argv)
        code = child.wait()
        if stopping:
            return code
        if time.monotonic() - started > _HEALTHY_AFTER_S:
            wait = _FIRST
        print(f"supervise: {' '.join(argv)} exited with {code}; restarting in {wait:.0f}s", flush=True)
        deadline = time.monotonic() + wait
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)
        wait = min(wait * 2, _MAX)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

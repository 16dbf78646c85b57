"""tools/supervise.py: a component that exits on its own is started again; SIGTERM stops it for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_command_that_dies_is_restarted_and_sigterm_stops_both(tmp_path):
    starts = tmp_path / "starts"
    # Each start appends a line; the first exits at once (as the scheduler does when its database
    # refuses connections), the second stays up until it is terminated.
    script = (
        "import os, sys, time\n"
        f"p = {str(starts)!r}\n"
        "open(p, 'a').write(f'{os.getpid()}\\n')\n"
        "n = len(open(p).read().split())\n"
        "sys.exit(3) if n == 1 else time.sleep(600)\n"
    )
    sup = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "supervise.py"), sys.executable, "-c", script],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _wait(lambda: starts.exists() and len(starts.read_text().split()) == 2)
        second = int(starts.read_text().split()[1])
        os.killpg(sup.pid, signal.SIGTERM)  # what ./dev down does: the whole group
        assert sup.wait(timeout=20) is not None
        assert _wait(lambda: not os.path.exists(f"/proc/{second}") or _zombie(second))
        assert "exited with 3; restarting" in sup.stdout.read()
        assert len(starts.read_text().split()) == 2  # not started again after SIGTERM
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True

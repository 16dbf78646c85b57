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


def test_a_command_alive_but_failing_its_health_check_is_stopped_with_its_children_and_restarted(
    tmp_path,
):
    from tests.support.dev_tool import free_port

    port = free_port()
    starts = tmp_path / "starts"
    # Like a hung scheduler: its health server answers 200 a few times, then 503 for good; it
    # ignores SIGTERM (stuck in a join) and has a child of its own (an executor worker). The
    # second start stays healthy.
    script = (
        "import os, signal, subprocess, sys, time\n"
        "from http.server import BaseHTTPRequestHandler, HTTPServer\n"
        f"p = {str(starts)!r}\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "open(p, 'a').write(f'{os.getpid()} {worker.pid}\\n')\n"
        "first = len(open(p).read().splitlines()) == 1\n"
        "first and signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "served = [0]\n"
        "class H(BaseHTTPRequestHandler):\n"
        "    def log_message(self, *a): pass\n"
        "    def do_GET(self):\n"
        "        served[0] += 1\n"
        "        self.send_response(503 if first and served[0] > 3 else 200); self.end_headers()\n"
        f"HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"
    )
    sup = subprocess.Popen(
        [
            sys.executable, str(ROOT / "tools" / "supervise.py"),
            "--health", f"http://127.0.0.1:{port}/health", "--every", "0.3",
            "--unhealthy-after", "1", "--grace", "30", "--stop-timeout", "1",
            sys.executable, "-c", script,
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _wait(lambda: starts.exists() and len(starts.read_text().splitlines()) == 2, timeout=60)
        first, worker = map(int, starts.read_text().splitlines()[0].split())
        # The stuck command and its worker are gone (SIGKILL, since it ignored SIGTERM).
        assert _wait(lambda: _zombie(first) and _zombie(worker))
        time.sleep(3)  # healthy now: no further restart
        assert len(starts.read_text().splitlines()) == 2
        os.killpg(sup.pid, signal.SIGTERM)
        sup.wait(timeout=20)
        out = sup.stdout.read()
        assert "failing its health check" in out and "(HTTP 503); stopping it" in out, out
        assert "restarting in 1s" in out
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)


def test_before_its_first_answer_a_command_has_the_grace_period_to_start(tmp_path):
    from tests.support.dev_tool import free_port

    port = free_port()  # nothing ever listens: the probe is refused throughout
    starts = tmp_path / "starts"
    script = f"import time; open({str(starts)!r}, 'a').write('x\\n'); time.sleep(600)"
    sup = subprocess.Popen(
        [
            sys.executable, str(ROOT / "tools" / "supervise.py"),
            "--health", f"http://127.0.0.1:{port}/health", "--every", "0.2",
            "--unhealthy-after", "0.5", "--grace", "4", "--stop-timeout", "1",
            sys.executable, "-c", script,
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _wait(lambda: starts.exists())
        time.sleep(2.5)
        assert len(starts.read_text().split()) == 1  # within the grace: left alone
        # Past the grace, still refused: stopped and started again.
        assert _wait(lambda: len(starts.read_text().split()) == 2, timeout=30)
        os.killpg(sup.pid, signal.SIGTERM)
        sup.wait(timeout=20)
        assert "Connection refused); stopping it" in sup.stdout.read()
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)

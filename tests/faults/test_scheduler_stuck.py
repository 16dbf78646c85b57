"""A scheduler that is alive but stuck (as after a PostgreSQL restart, when it can hang in
LocalExecutor's shutdown instead of exiting): ``tools/supervise.py``'s liveness probe on the
scheduler's health server stops it, with every process it started, and starts it again; runs
are scheduled afterwards. The hang is made deterministic here with SIGSTOP."""

from __future__ import annotations

import os
import signal
import urllib.request

import psutil
import pytest

from tests.e2e.conftest import _stop, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

THRESHOLD_S = 10  # the stack's is Airflow's default, 30 s: shorter here to keep the test short


def _scheduler(dev, profile) -> psutil.Process | None:
    """The ``airflow scheduler`` process under the profile's supervisor."""
    pid = dev._read_pid(dev._pidfile(profile, "scheduler"))
    if not pid:
        return None
    for child in psutil.Process(pid).children():
        try:
            if "scheduler" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                return child
        except psutil.Error:
            continue
    return None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def quick_scheduler(dev_module, profile, airflow_stack):
    """The stack's scheduler, restarted with a 10 s heartbeat threshold (so its supervisor calls
    it stuck after 20 s of failed probes); the stack's own scheduler is back at teardown."""
    env = {**airflow_stack, "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": str(THRESHOLD_S)}
    _stop(dev_module, profile, "scheduler")
    dev_module.start_airflow(profile, env, components=("scheduler",))
    url = f"http://127.0.0.1:{env['AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT']}/health"
    try:
        wait_for(lambda: _healthy(url), timeout=180, interval=1, what="the scheduler's health check")
        yield url
    finally:
        for proc in psutil.Process(os.getpid()).children(recursive=True):
            if proc.status() == psutil.STATUS_STOPPED:
                proc.send_signal(signal.SIGCONT)  # never leave a frozen process behind
        _stop(dev_module, profile, "scheduler")
        dev_module.start_airflow(profile, airflow_stack, components=("scheduler",))
        wait_for(lambda: _healthy(url), timeout=180, interval=1, what="the scheduler's health check")


def test_a_stuck_scheduler_is_restarted_by_its_liveness_probe_and_runs_are_scheduled_again(
    dev_module, profile, quick_scheduler, airflow, dag_on
):
    dag_on("invitation_cleanup")
    log = profile.var / "logs" / "scheduler.log"
    log_start = log.stat().st_size
    stuck = _scheduler(dev_module, profile)
    assert stuck is not None
    workers = stuck.children(recursive=True)  # executor workers, the health and log servers
    assert workers
    stuck.send_signal(signal.SIGSTOP)  # alive, heartbeating no more

    def restarted():
        now = _scheduler(dev_module, profile)
        return now is not None and now.pid != stuck.pid and now

    # Stale after 10 s, failing for 20 s more: SIGTERM + SIGCONT, and the scheduler shuts down.
    fresh = wait_for(restarted, timeout=150, interval=1, what="the supervisor to restart the scheduler")
    said = log.read_bytes()[log_start:].decode(errors="replace")
    assert "is alive but failing its health check" in said and "(HTTP 503" in said, said[-2000:]
    assert not stuck.is_running() or stuck.status() == psutil.STATUS_ZOMBIE
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

    wait_for(lambda: _healthy(quick_scheduler), timeout=180, interval=1, what="the new scheduler's health")
    assert _scheduler(dev_module, profile).pid == fresh.pid
    run_id = airflow.trigger("invitation_cleanup")
    assert airflow.wait_finished("invitation_cleanup", run_id, timeout=240).state == "success"

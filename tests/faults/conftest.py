"""Fault tests: the real Airflow components, PostgreSQL and Redis of the ``test`` profile, and
a fault injected in the middle of a run (SIGKILL of a task process, a database or Redis
restart, a triggerer restart). Each test asserts what a crash must not change: nothing
lost, nothing duplicated, no lease outliving its TTL, and a run state and summary that say
what happened.

The Airflow fixtures are the e2e ones (a session started on ``tests/faults`` loads only this
conftest chain, so they are imported here).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from datetime import UTC, datetime, timedelta

import psutil
import pytest
import redis as redis_lib

from tests.e2e import conftest as e2e
from tests.e2e.conftest import COMPONENTS, _exited, wait_for
from tests.faults.helpers import LEASE_PATTERN, Airflow
from tests.support.feed_server import FeedServer

# The e2e fixtures, re-exported by name: a session started on tests/faults loads only this
# conftest chain (tests/conftest.py, then this file), not tests/e2e/conftest.py.
api_client = e2e.api_client
dev_module = e2e.dev_module
restart_component = e2e.restart_component
wait_for_dag = e2e.wait_for_dag


def _started_by_this_session(dev, profile) -> bool:
    """Whether every Airflow component of the profile runs as a child of this pytest process,
    i.e. tests/e2e's ``airflow_stack`` started them earlier in this session."""
    for component in COMPONENTS:
        pid = dev._read_pid(dev._pidfile(profile, component))
        try:
            proc = psutil.Process(pid) if pid else None
            if proc is None or proc.ppid() != os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
    return True


@pytest.fixture(scope="session")
def airflow_stack(dev_module):
    """tests/e2e's ``airflow_stack``, without starting Airflow a second time when tests/e2e ran
    first in this session (a whole-suite run): two session fixtures of the same name in two
    conftest folders are two instances, and the second would restart every component."""
    profile = dev_module.PROFILES["test"]
    env = dev_module.stack_env(profile, provision=False)
    if _started_by_this_session(dev_module, profile):
        dev_module.wait_for_api(env, timeout=60)
        yield env  # the e2e fixture that started it stops it at the end of the session
        return
    yield from inspect.unwrap(e2e.airflow_stack)()  # the e2e fixture's own body: start, yield, stop


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "faults: injects a crash or a restart into real Airflow runs (tests/faults)"
    )


@pytest.fixture(scope="session")
def airflow(api_client) -> Airflow:
    return Airflow(api_client)


@pytest.fixture(scope="session")
def profile(dev_module):
    return dev_module.PROFILES["test"]


@pytest.fixture
def redis_conn(airflow_stack):
    """A client of the stack's Redis; lease keys left by an earlier test are removed first
    (not FLUSHDB: the stream watcher's consumer group must survive)."""
    client = redis_lib.Redis.from_url(airflow_stack["ALMANAC_REDIS_URL"])
    for key in client.scan_iter(match=LEASE_PATTERN):
        client.delete(key)
    yield client
    client.close()


@pytest.fixture
def feeds():
    """A local feed server; routes are added by the test. It outlives ``dag_on`` (declared first),
    so runs still finishing at teardown can reach it."""
    with FeedServer() as server:
        yield server


@pytest.fixture
def dag_on(airflow, wait_for_dag):
    """``dag_on(dag_id)``: unpause the DAG, let a scheduled run it owes finish, and at teardown
    wait until its runs are done and pause it again, so one test's DAGs never act in the next."""
    switched: list[str] = []

    def on(dag_id: str) -> str:
        wait_for_dag(dag_id)  # parsed, then unpaused
        switched.append(dag_id)
        due = airflow.dags.get_dag(dag_id).next_dagrun_run_after
        if due is not None and due <= datetime.now(UTC) + timedelta(seconds=1):
            # Unpausing starts the run the schedule owes (e.g. ics_sync's run_immediately).
            def started():
                return any(r.run_after >= due for r in airflow.runs.get_dag_runs(dag_id, limit=100).dag_runs)

            with contextlib.suppress(pytest.fail.Exception):  # the scheduler may not owe one after all
                wait_for(started, timeout=30, interval=0.5, what=f"the scheduled run {dag_id} owes")
        airflow.wait_idle(dag_id, timeout=240)
        return dag_id

    yield on
    for dag_id in reversed(switched):
        with contextlib.suppress(Exception, pytest.fail.Exception):
            airflow.wait_idle(dag_id, timeout=240)
        airflow.pause(dag_id)


@pytest.fixture
def restart_service(dev_module, profile):
    """``restart_service("postgres" | "redis", down_s=0)``: stop the private server, wait
    ``down_s`` while it is down (polled, bounded), then start it again on the same data."""
    import time

    def restart(service: str, down_s: float = 0.0) -> None:
        secrets = dev_module.load_secrets(profile)
        if service == "postgres":
            dev_module.stop_postgres(profile)
            assert not dev_module._port_open(profile.port("PG_PORT", profile.pg_port))
            time.sleep(down_s)  # the outage itself is what is under test
            dev_module.start_postgres(profile, secrets)
        elif service == "redis":
            port = profile.port("REDIS_PORT", profile.redis_port)
            dev_module.stop_redis(profile)
            wait_for(lambda: not dev_module._port_open(port), timeout=20, interval=0.1, what="Redis to stop")
            time.sleep(down_s)
            dev_module.start_redis(profile, secrets)
            wait_for(lambda: dev_module._port_open(port), timeout=20, interval=0.1, what="Redis to start")
        else:
            raise ValueError(service)

    return restart


@pytest.fixture
def dead_components(dev_module, profile):
    """``dead_components()``: the Airflow components whose process has exited (reaped if ours)."""

    def dead() -> list[str]:
        found = []
        for component in COMPONENTS:
            try:
                pid = int(dev_module._pidfile(profile, component).read_text())
            except (FileNotFoundError, ValueError):
                found.append(component)
                continue
            if _exited(dev_module, pid):
                found.append(component)
        return found

    return dead


@pytest.fixture
def supervised(dev_module, profile, airflow_stack, dead_components):
    """Restart any Airflow component whose supervisor (``tools/supervise.py``) has exited, as
    ``restart: always`` does in docker-compose.yaml: the supervisor restarts the component
    itself, so this only acts if the supervisor died. Yields the list of restarts made,
    ``[(seconds since start, component), ...]``; supervision stops at teardown."""
    import threading
    import time

    restarts: list[tuple[float, str]] = []
    stop = threading.Event()
    began = time.monotonic()

    def watch() -> None:
        while not stop.wait(1.0):
            for component in dead_components():
                restarts.append((round(time.monotonic() - began, 1), component))
                dev_module.start_airflow(profile, airflow_stack, components=(component,))

    thread = threading.Thread(target=watch, name="faults-supervisor", daemon=True)
    thread.start()
    yield restarts
    stop.set()
    thread.join(timeout=30)

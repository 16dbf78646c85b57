"""Real Airflow components for end-to-end tests, driven through the REST API.

Starts the api-server, scheduler, dag-processor and triggerer of the ``test`` profile (the same code
``./dev up`` uses), logs in through SimpleAuthManager's ``POST /auth/token``, and hands
tests an ``apache-airflow-client`` ApiClient carrying that JWT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import warnings
from pathlib import Path

import pytest
import requests

from tests.support.dev_tool import load_dev_module

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def _dev_module():
    return load_dev_module("almanac_devtool")


def _exited(dev, pid: int) -> bool:
    """Whether ``pid`` has exited, reaping it if it is a child of this process.

    ``start_airflow`` starts the components with ``Popen`` from the test process, and
    nothing waits for them: an exited component stays a zombie, which ``dev._alive``
    (``kill(pid, 0)``) still counts as running, and which makes ``start_airflow`` skip
    the component as "already running".
    """
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: ask the kernel
        return not dev._alive(pid)
    return reaped == pid


def _stop(dev, profile, component: str, timeout: float = 60) -> None:
    """SIGTERM one component's process group and wait until it has exited (and is reaped); one
    still running after ``timeout`` gets SIGKILL, as a service manager's stop timeout would do,
    with a warning in the test report."""
    pidfile = dev._pidfile(profile, component)
    try:
        pid = int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        _exited(dev, pid)
        return
    deadline = time.monotonic() + timeout
    while not _exited(dev, pid):
        if time.monotonic() > deadline:
            warnings.warn(f"{component} was still running {timeout:.0f}s after SIGTERM; killed", stacklevel=2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_for(lambda: _exited(dev, pid), timeout=30, interval=0.5, what=f"{component} to die")
            return
        time.sleep(0.5)


@pytest.fixture(scope="session")
def airflow_stack():
    dev = _dev_module()
    profile = dev.PROFILES["test"]
    env = dev.stack_env(profile, provision=False)
    dev.stop_airflow(profile)  # leftovers of an interrupted run
    dev.start_airflow(profile, env, components=COMPONENTS)
    try:
        dev.wait_for_api(env, timeout=240)
        with _client(env) as client:
            _delete_leftover_runs(client)
        yield env
    finally:
        for component in reversed(COMPONENTS):
            with contextlib.suppress(Exception, pytest.fail.Exception):  # stop_airflow kills the rest
                _stop(dev, profile, component, timeout=30)
        dev.stop_airflow(profile)


@contextlib.contextmanager
def _client(env: dict[str, str]):
    """An ``apache-airflow-client`` ApiClient logged in as the stack's admin (JWT from /auth/token)."""
    import airflow_client.client as airflow_client

    api = env["ALMANAC_API_URL"]
    password_file = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    password = json.loads(password_file.read_text())["admin"]
    response = requests.post(
        f"{api}/auth/token", json={"username": "admin", "password": password}, timeout=30
    )
    response.raise_for_status()
    config = airflow_client.Configuration(host=api, access_token=response.json()["access_token"])
    with airflow_client.ApiClient(config) as client:
        yield client


@pytest.fixture(scope="session")
def api_client(airflow_stack):
    with _client(airflow_stack) as client:
        yield client


def _delete_leftover_runs(client) -> None:
    """Delete the runs an earlier session left queued or running in the metadata DB (running
    ones are failed first: the API deletes no running run). Called once, when this session
    has just started the stack, before any test unpauses a DAG: the scheduler would start them
    then, and their effects would land in that test's data. They come from an interrupted
    session, or from `./dev test tests/integration` (whose ``dag.test()`` runs trigger runs into
    this profile's metadata DB; a whole-suite run gives those tests a metadata DB of their own)."""
    from airflow_client.client.api.dag_run_api import DagRunApi
    from airflow_client.client.models import DAGRunPatchBody, DagRunState

    runs = DagRunApi(client)
    for run in runs.get_dag_runs("~", state=["queued", "running"], limit=1000).dag_runs:
        if run.state == DagRunState.RUNNING:
            runs.patch_dag_run(run.dag_id, run.dag_run_id, DAGRunPatchBody(state="failed"))
        runs.delete_dag_run(run.dag_id, run.dag_run_id)


def wait_for(predicate, *, timeout: float, interval: float = 2.0, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait_for_dag(api_client):
    """Wait until the dag-processor has serialized a DAG, then return it unpaused."""
    from airflow_client.client.api.dag_api import DAGApi
    from airflow_client.client.exceptions import NotFoundException
    from airflow_client.client.models import DAGPatchBody

    dags = DAGApi(api_client)

    def ready(dag_id: str) -> str:
        def found():
            try:
                return dags.get_dag(dag_id)
            except NotFoundException:
                return None

        wait_for(found, timeout=180, what=f"DAG {dag_id} to be parsed")
        dags.patch_dag(dag_id, DAGPatchBody(is_paused=False))
        return dag_id

    return ready


@pytest.fixture(scope="session")
def dev_module():
    return _dev_module()


@pytest.fixture(scope="session")
def restart_component(airflow_stack, dev_module):
    """Stop one Airflow component and hand back a function that starts it again."""
    profile = dev_module.PROFILES["test"]

    def stop(component: str):
        _stop(dev_module, profile, component)

        def start():
            dev_module.start_airflow(profile, airflow_stack, components=(component,))

        return start

    return stop

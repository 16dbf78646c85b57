"""What the fault tests share: driving Airflow over the REST API, finding and killing a task's
process, feeds, leases and database checks. Fixtures built on these are in ``conftest.py``."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta

import psutil
import psycopg

from tests.e2e.conftest import wait_for

__all__ = [
    "FINISHED",
    "LEASE_PATTERN",
    "Airflow",
    "connected_to",
    "duplicate_events",
    "event_counts",
    "feed",
    "kill_task_process",
    "lease_keys",
    "leases",
    "slow_google",
    "task_process",
]

FINISHED = ("success", "failed")
LEASE_PATTERN = "almanac:lease:*"


def feed(calendar_id: int, events: int = 2) -> bytes:
    """An ICS feed with ``events`` events inside the sync window of a run now."""
    start = datetime.now(UTC).replace(microsecond=0, second=0, minute=0) + timedelta(days=2)
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//almanac//faults//EN"]
    for n in range(events):
        at = start + timedelta(days=n)
        lines += ["BEGIN:VEVENT", f"UID:fault-{calendar_id}-{n}@almanac.test", "DTSTAMP:20260101T000000Z",
                  f"DTSTART:{at:%Y%m%dT%H%M%SZ}", "DURATION:PT1H",
                  f"SUMMARY:Event {n} of calendar {calendar_id}", "END:VEVENT"]
    return ("\r\n".join(lines + ["END:VCALENDAR"]) + "\r\n").encode()


def event_counts(db_url: str) -> dict[int, int]:
    """Events per calendar, on a fresh connection (a restarted PostgreSQL breaks older ones)."""
    with psycopg.connect(db_url) as conn:
        return dict(conn.execute("SELECT calendar_id, count(*) FROM events GROUP BY 1").fetchall())


def duplicate_events(db_url: str) -> list[tuple]:
    """Identities stored more than once (the unique constraint should make this always empty)."""
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT calendar_id, uid, recurrence_id, count(*) FROM events"
            " GROUP BY 1, 2, 3 HAVING count(*) > 1"
        ).fetchall()


def lease_keys(redis) -> list[str]:
    return sorted(k.decode() for k in redis.scan_iter(match=LEASE_PATTERN, count=1000))


def leases(redis) -> dict[str, tuple[str, int]]:
    """Every lease key with (owner, remaining TTL in ms)."""
    found = {}
    for key in lease_keys(redis):
        value, ttl = redis.get(key), redis.pttl(key)
        if value is not None:
            found[key] = (value.decode().rpartition("|")[0], ttl)
    return found


def task_process(ti_id: str) -> psutil.Process | None:
    """The process running task instance ``ti_id`` (the task runner sets its title to
    ``airflow worker -- <ti id>``; its supervisor's title names the executor instead)."""
    title = f"airflow worker -- {ti_id}"
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if " ".join(proc.info["cmdline"] or []).strip() == title:
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def connected_to(proc: psutil.Process, port: int) -> bool:
    """Whether ``proc`` has an established TCP connection to 127.0.0.1:``port``."""
    try:
        return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
                   for c in proc.net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def kill_task_process(proc: psutil.Process) -> int:
    """SIGKILL the task process (not its supervisor) and wait until it is gone."""
    os.kill(proc.pid, signal.SIGKILL)
    wait_for(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, timeout=10,
             interval=0.1, what=f"task process {proc.pid} to die")
    return proc.pid


class Airflow:
    """The REST API calls the fault tests make (official ``apache-airflow-client``)."""

    def __init__(self, client) -> None:
        from airflow_client.client.api.asset_api import AssetApi
        from airflow_client.client.api.connection_api import ConnectionApi
        from airflow_client.client.api.dag_api import DAGApi
        from airflow_client.client.api.dag_run_api import DagRunApi
        from airflow_client.client.api.task_instance_api import TaskInstanceApi
        from airflow_client.client.api.variable_api import VariableApi
        from airflow_client.client.api.x_com_api import XComApi

        self.client = client
        self.dags = DAGApi(client)
        self.runs = DagRunApi(client)
        self.tis = TaskInstanceApi(client)
        self.variables = VariableApi(client)
        self.connections = ConnectionApi(client)
        self.xcoms = XComApi(client)
        self.assets = AssetApi(client)

    # --- configuration ---------------------------------------------------------------
    def set_settings(self, **settings) -> None:
        from airflow_client.client.exceptions import NotFoundException
        from airflow_client.client.models import VariableBody

        body = VariableBody(key="almanac_settings", value=json.dumps(settings))
        try:
            self.variables.patch_variable("almanac_settings", body)
        except NotFoundException:
            self.variables.post_variable(body)

    def set_connection(self, conn_id: str, **fields) -> None:
        from airflow_client.client.exceptions import NotFoundException
        from airflow_client.client.models import ConnectionBody

        body = ConnectionBody(connection_id=conn_id, **fields)
        try:
            self.connections.patch_connection(conn_id, body)
        except NotFoundException:
            self.connections.post_connection(body)

    def pause(self, dag_id: str, paused: bool = True) -> None:
        from airflow_client.client.models import DAGPatchBody

        self.dags.patch_dag(dag_id, DAGPatchBody(is_paused=paused))

    # --- runs ------------------------------------------------------------------------
    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        from airflow_client.client.models import TriggerDAGRunPostBody

        body = TriggerDAGRunPostBody(logical_date=None, conf=conf or {})
        return self.runs.trigger_dag_run(dag_id, body).dag_run_id

    def active_runs(self, dag_id: str) -> list:
        return [r for r in self.runs.get_dag_runs(dag_id, limit=100).dag_runs if r.state not in FINISHED]

    def queued_asset_events(self, dag_id: str) -> int:
        """Asset events that will start a run of ``dag_id`` the scheduler has not created yet."""
        return self.assets.get_dag_asset_queued_events(dag_id).total_entries

    def wait_idle(self, dag_id: str, timeout: float = 240) -> None:
        """Until no run of ``dag_id`` is queued or running."""
        wait_for(lambda: not self.active_runs(dag_id), timeout=timeout, interval=1,
                 what=f"{dag_id} to be idle")

    def wait_finished(self, dag_id: str, run_id: str, timeout: float = 300):
        """Until the run is finished; API errors meanwhile (a database restarting) are polled through."""
        from airflow_client.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        def finished():
            try:
                run = self.runs.get_dag_run(dag_id, run_id)
            except (ApiException, HTTPError):
                return None
            return run if run.state in FINISHED else None

        return wait_for(finished, timeout=timeout, interval=1, what=f"{dag_id} run {run_id} to finish")

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        from airflow_client.client.exceptions import NotFoundException

        try:
            if map_index >= 0:
                return self.tis.get_mapped_task_instance(dag_id, run_id, task_id, map_index)
            return self.tis.get_task_instance(dag_id, run_id, task_id)
        except NotFoundException:
            return None

    def wait_running_process(self, dag_id: str, run_id: str, task_id: str, map_index: int = 0,
                             timeout: float = 180) -> tuple[object, psutil.Process]:
        """Until ``task_id`` of the run is running and its task process exists: (ti, process)."""
        def running():
            ti = self.task_instance(dag_id, run_id, task_id, map_index)
            if ti is None or ti.state != "running":
                return None
            proc = task_process(str(ti.id))
            return (ti, proc) if proc is not None else None

        return wait_for(running, timeout=timeout, interval=0.2, what=f"{task_id} of {run_id} to run")

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list:
        """Every try of a task instance (finished ones and the current one), oldest first."""
        if map_index >= 0:
            answer = self.tis.get_mapped_task_instance_tries(dag_id, run_id, task_id, map_index)
        else:
            answer = self.tis.get_task_instance_tries(dag_id, run_id, task_id)
        return sorted(answer.task_instances, key=lambda t: t.try_number)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1):
        from airflow_client.client.exceptions import NotFoundException

        try:
            entry = self.xcoms.get_xcom_entry(dag_id, task_id, run_id, key, map_index=map_index,
                                              deserialize=True)
        except NotFoundException:
            return None
        return entry.actual_instance.value if hasattr(entry, "actual_instance") else entry.value

    def summary(self, dag_id: str, run_id: str) -> dict | None:
        """The run total ``summarize`` returned (or, when it failed the run, pushed as ``total``)."""
        return self.xcom(dag_id, run_id, "summarize") or self.xcom(dag_id, run_id, "summarize", key="total")



def slow_google(delay_s: float):
    """A ``FakeGoogle`` that waits ``delay_s`` before answering each Calendar API call
    (``.delay`` can be changed while it runs), so a push lasts long enough to be killed."""
    from tests.support.fake_google import FakeGoogle, _Handler

    fake = FakeGoogle()
    if hasattr(fake, "delay"):  # the fake waits per call itself (each part of a batch request too)
        fake.delay = delay_s
        return fake

    class SlowHandler(_Handler):
        def _dispatch(self, method: str) -> None:
            if self.server.delay and "/calendar/" in self.path:
                time.sleep(self.server.delay)
            super()._dispatch(method)

    fake.RequestHandlerClass = SlowHandler
    fake.delay = delay_s
    return fake

"""almanac.ics.budget: the parse worker process and its wall, CPU and memory limits.

The targets in tests/support/slow_targets.py really loop, sleep, grow and crash inside the real
worker; nothing of ours is mocked. No assertion is on a duration: a limit is checked by which
error comes back, and a process's end by waiting for it (with a generous bound).
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from almanac.ics.budget import (
    CalendarClock,
    FeedBudgetExceededError,
    FeedParserCrashedError,
    ParsePool,
    ParseWorkerError,
)
from almanac.ics.parse import FeedParseError, parse_feed

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fixtures" / "ics-corpus"
T = "tests.support.slow_targets:"
WINDOW = {"window_start": datetime(2018, 1, 1, tzinfo=UTC), "window_end": datetime(2021, 1, 1, tzinfo=UTC)}


@pytest.fixture
def pool():
    with ParsePool(cpu_s=60, memory_mb=128) as p:
        yield p


def gone(pid: int, timeout: float = 30.0) -> bool:
    """True once ``pid`` has exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        process = psutil.Process(pid)
        process.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return True


def workers_of_this_process() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("almanac.ics.budget" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.parametrize(
    "name",
    ["rie_issue42.ics", "nodeical_ms_timezones.ics", "icalendar_issue_722_timezone_transition_ambiguity.ics"],
)
def test_a_parse_in_the_worker_equals_the_same_parse_in_process(pool, name):
    body = (CORPUS / name).read_bytes()
    here = parse_feed(body, **WINDOW, calendar_tz="Europe/Berlin")
    there = pool.parse_feed(body, calendar_id=1, wall_s=120, **WINDOW, calendar_tz="Europe/Berlin")
    assert there == here
    assert [i.start.isoformat() for i in there.instances] == [i.start.isoformat() for i in here.instances]


def test_the_worker_starts_at_the_first_call_and_serves_every_call_after(pool):
    assert pool.worker_pid is None and pool.started == 0
    assert pool.call(T + "echo", {"a": [1]}, calendar_id=1, wall_s=60) == {"a": [1]}
    pid = pool.worker_pid
    for n in range(3):
        assert pool.call(T + "echo", n, calendar_id=1, wall_s=60) == n
    assert pool.worker_pid == pid and pool.started == 1


def test_the_worker_is_a_fresh_interpreter_not_a_fork(pool):
    pool.call(T + "echo", 1, calendar_id=1, wall_s=60)
    cmdline = psutil.Process(pool.worker_pid).cmdline()
    assert cmdline[0] == sys.executable and "-c" in cmdline


def test_a_parse_that_only_waits_is_killed_at_its_wall_limit_and_the_worker_replaced(pool):
    pool.call(T + "echo", 1, calendar_id=1, wall_s=60)
    first = pool.worker_pid
    with pytest.raises(FeedBudgetExceededError) as caught:
        pool.call(T + "sleep_for", 3600, calendar_id=7, wall_s=0.5)
    error = caught.value
    assert (error.calendar_id, error.limit, error.stage, error.seconds) == (7, "wall time", "parse", 0.5)
    assert str(error) == "calendar 7: parse exceeded its limit of 0.5s wall time; the parse worker was killed"
    assert gone(first)
    assert pool.worker_pid is None
    assert pool.call(T + "echo", "again", calendar_id=8, wall_s=60) == "again"
    assert pool.worker_pid not in (None, first) and pool.started == 2


def test_a_parse_that_outlasts_the_calendar_s_budget_is_reported_as_that_budget(pool):
    with pytest.raises(FeedBudgetExceededError) as caught:
        pool.call(T + "sleep_for", 3600, calendar_id=5, clock=CalendarClock(5, 0.5))
    assert str(caught.value) == (
        "calendar 5: exceeded its budget of 0.5s wall time (ics_calendar_budget_s) during parse;"
        " the parse worker was killed"
    )
    assert (caught.value.setting, caught.value.stage) == ("ics_calendar_budget_s", "parse")
    assert pickle.loads(pickle.dumps(caught.value)).args == caught.value.args


def test_a_parse_that_spins_is_killed_at_its_cpu_limit():
    with ParsePool(cpu_s=1, memory_mb=128) as pool:
        with pytest.raises(FeedBudgetExceededError) as caught:
            pool.call(T + "spin", calendar_id=3, wall_s=600)
        assert caught.value.limit == "CPU time" and caught.value.setting == "ics_parse_cpu_s"
        assert "1s CPU time (ics_parse_cpu_s)" in str(caught.value)
        assert pool.call(T + "echo", 1, calendar_id=4, wall_s=60) == 1


def test_the_cpu_limit_is_per_call_not_for_the_worker_s_lifetime():
    with ParsePool(cpu_s=2, memory_mb=128) as pool:
        for _ in range(4):  # 4 x 0.8 s of CPU in one worker: more than 2 s in all
            assert pool.call(T + "spin", 0.8, calendar_id=1, wall_s=600) > 0
        assert pool.started == 1


def test_memory_growth_is_killed_at_the_memory_limit():
    with ParsePool(cpu_s=600, memory_mb=64) as pool:
        with pytest.raises(FeedBudgetExceededError) as caught:
            pool.call(T + "grow", 4, 0.05, calendar_id=5, wall_s=600)
        assert caught.value.limit == "memory" and "64 MiB memory (ics_parse_memory_mb)" in str(caught.value)
        assert pool.call(T + "echo", 1, calendar_id=6, wall_s=60) == 1


def test_one_huge_allocation_is_stopped_by_the_address_space_limit(pool):
    with pytest.raises(FeedBudgetExceededError) as caught:
        pool.call(T + "allocate_at_once", 64 * 1024, calendar_id=5, wall_s=600)
    assert caught.value.limit == "memory" and "allocation failed" in str(caught.value)
    assert pool.call(T + "echo", 1, calendar_id=6, wall_s=60) == 1


def test_a_worker_that_stayed_big_is_replaced_before_the_next_feed():
    with ParsePool(cpu_s=60, memory_mb=64) as pool:
        pool.call(T + "keep", 40, calendar_id=1, wall_s=60)  # more than half the headroom kept
        first_started = pool.started
        assert pool.call(T + "echo", 1, calendar_id=2, wall_s=60) == 1
        assert pool.started == first_started + 1


def test_an_error_of_the_target_comes_back_as_itself_and_the_worker_lives_on(pool):
    pool.call(T + "echo", 1, calendar_id=1, wall_s=60)
    pid = pool.worker_pid
    with pytest.raises(ValueError, match="boom") as caught:
        pool.call(T + "raise_value_error", "boom", calendar_id=1, wall_s=60)
    assert "raise_value_error" in str(caught.value.__cause__)  # the worker's traceback, chained
    with pytest.raises(FeedParseError, match="not iCalendar"):
        pool.parse_feed(b"<html>login</html>", calendar_id=1, wall_s=60, **WINDOW)
    assert pool.worker_pid == pid


def test_an_exception_that_cannot_cross_the_pipe_is_named_in_a_parse_worker_error(pool):
    with pytest.raises(ParseWorkerError, match="_Unpicklable: held a lock"):
        pool.call(T + "raise_unpicklable", "held a lock", calendar_id=1, wall_s=60)


def test_a_result_that_cannot_be_pickled_is_an_error_not_a_dead_worker(pool):
    pool.call(T + "echo", 1, calendar_id=1, wall_s=60)
    pid = pool.worker_pid
    with pytest.raises(TypeError, match="pickle"):
        pool.call(T + "unpicklable_result", calendar_id=1, wall_s=60)
    assert pool.worker_pid == pid


@pytest.mark.parametrize(
    ("target", "says"), [("crash", "killed by SIGSEGV"), ("exit_now", "exited with status 7")]
)
def test_a_worker_that_dies_is_reported_and_replaced(pool, target, says):
    with pytest.raises(FeedParserCrashedError, match=says) as caught:
        pool.call(T + target, calendar_id=9, wall_s=60)
    assert caught.value.calendar_id == 9
    assert pool.call(T + "echo", 1, calendar_id=10, wall_s=60) == 1 and pool.started == 2


def test_a_worker_killed_while_idle_is_replaced_at_the_next_call(pool):
    pool.call(T + "echo", 1, calendar_id=1, wall_s=60)
    first = pool.worker_pid
    psutil.Process(first).send_signal(signal.SIGKILL)
    assert gone(first)
    assert pool.call(T + "echo", 2, calendar_id=1, wall_s=60) == 2
    assert pool.worker_pid != first


def test_closing_the_pool_leaves_no_process():
    pool = ParsePool(cpu_s=60, memory_mb=128)
    with pool:
        pool.call(T + "echo", 1, calendar_id=1, wall_s=60)
        pid = pool.worker_pid
        assert [p.pid for p in workers_of_this_process()] == [pid]
    assert gone(pid) and pool.worker_pid is None
    assert workers_of_this_process() == []
    pool.close()  # twice is fine


def test_a_worker_started_from_a_thread_outlives_that_thread(pool):
    thread = threading.Thread(target=pool.call, args=(T + "echo", 1), kwargs={"calendar_id": 1, "wall_s": 60})
    thread.start()
    thread.join()
    pid = pool.worker_pid
    assert pid is not None
    assert pool.call(T + "echo", 2, calendar_id=1, wall_s=60) == 2 and pool.worker_pid == pid


@pytest.mark.parametrize("mode", ["hold", "hold-in-thread"])
def test_a_worker_never_outlives_its_parent_killed_with_sigkill(mode):
    """Regression guard for orphans: the task process is SIGKILLed mid-parse (execution timeout, OOM)."""
    parent = subprocess.Popen(
        [sys.executable, "-m", "tests.support.slow_targets", mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        worker_pid = int(parent.stdout.readline())
        assert psutil.Process(worker_pid).ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert gone(worker_pid)
    finally:
        parent.kill()
        parent.wait(timeout=30)
        parent.stdout.close()


def test_a_budget_error_keeps_its_fields_through_pickle():
    error = FeedBudgetExceededError(
        "m", calendar_id=3, limit="memory", setting="s", stage="parse", megabytes=5.0
    )
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.calendar_id, again.limit, again.megabytes) == ("m", 3, "memory", 5.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_calendar_clock_counts_down_its_budget_and_names_it_when_spent():
    now = FakeClock()
    clock = CalendarClock(42, 10, clock=now)
    assert clock.left("fetch") == 10 and clock.left("fetch", cap=3) == 3
    now.now += 9.5
    assert clock.left("parse", cap=3) == pytest.approx(0.5)
    now.now += 1
    with pytest.raises(FeedBudgetExceededError) as caught:
        clock.left("store")
    assert str(caught.value) == (
        "calendar 42: exceeded its budget of 10s wall time (ics_calendar_budget_s) during store"
    )
    assert (caught.value.limit, caught.value.stage, caught.value.seconds) == ("wall time", "store", 10.0)


def test_a_retry_wait_the_budget_cannot_afford_fails_at_once_instead_of_sleeping():
    now = FakeClock()
    clock = CalendarClock(1, 10, clock=now)
    slept: list[float] = []
    sleep = clock.sleeper(slept.append, "fetch")
    sleep(2.0)
    now.now += 7
    with pytest.raises(FeedBudgetExceededError, match="during fetch"):
        sleep(4.0)
    assert slept == [2.0]

"""ics_sync: a hard budget per calendar — feeds are parsed in a killable worker process with limits.

A hostile feed (a recurrence rule the expansion library loops on, millions of tiny events, a
rule that can never match at a fine frequency) must cost only its own calendar. Python cannot
stop a thread that loops inside a third-party library, so ``ParsePool`` runs
``almanac.ics.parse.parse_feed`` in a separate, long-lived worker process, reused across the
calendars of a batch, and enforces per call:

- **wall time**: the parent waits at most ``wall_s`` (what is left of the calendar's budget,
  ``CalendarClock``), then kills the worker with SIGKILL;
- **CPU time**: ``RLIMIT_CPU`` is set in the worker before each call (its CPU so far plus
  ``cpu_s``); the kernel kills it past the limit, even inside C code;
- **memory**: the parent watches the worker's resident size and kills it once the call has
  added more than ``memory_mb``; ``RLIMIT_AS`` (twice that above the worker's baseline) stops a
  sudden huge allocation with ``MemoryError``.

Every overrun raises ``FeedBudgetExceededError`` naming the limit; the next call starts a fresh
worker. The worker is started with ``subprocess`` (fork + exec: safe in a process with threads,
e.g. the lease renewer) rather than ``multiprocessing``'s spawn, which would import the parent's
``__main__`` — in an Airflow task, the whole Airflow CLI — into every worker. It never outlives
its parent: ``PR_SET_PDEATHSIG`` (Linux) plus a thread that notices the parent's pid change.

The resident-size watch reads ``/proc``; elsewhere only ``RLIMIT_AS`` bounds memory.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from typing import Any

from almanac.errors import PermanentError, RetryableError
from almanac.imports import import_object

__all__ = [
    "CalendarClock",
    "FeedBudgetExceededError",
    "FeedParserCrashedError",
    "ParsePool",
    "ParseWorkerError",
    "ParseWorkerUnavailableError",
]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
#: What the worker imports before it reports ready (so the first feed does not pay for it).
_PRELOAD = ("almanac.ics.parse",)
#: The target ``ParsePool.parse_feed`` runs in the worker (packs the result for the pipe).
_PACKED_PARSE = "almanac.ics.budget:_parse_packed"
#: How often the parent checks the worker's memory while it waits, in seconds.
_POLL_S = 0.1
_BOOT = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
    "from almanac.ics.budget import _worker_main; _worker_main(sys.argv[2:])"
)


class FeedBudgetExceededError(PermanentError):
    """A calendar needed more wall time, CPU time or memory than its budget allows.

    Its parse worker was killed (or its fetch or store stopped); nothing of this sync was stored,
    and the other calendars of the batch went on. The next run tries again and will most
    likely fail the same way.

    What to do: look at the feed (``almanac ics inspect URL``): a recurrence rule that never
    ends or never matches, or a huge number of events, is the usual cause; ask its owner to fix
    it. If the feed is legitimate and just big, raise the setting named in the message
    (``ics_calendar_budget_s``, ``ics_parse_cpu_s`` or ``ics_parse_memory_mb``).
    """

    def __init__(
        self,
        message: str = "",
        *,
        calendar_id: int | None = None,
        limit: str = "",
        setting: str = "",
        stage: str = "",
        seconds: float | None = None,
        megabytes: float | None = None,
    ) -> None:
        super().__init__(message)
        self.calendar_id = calendar_id
        self.limit = limit
        self.setting = setting
        self.stage = stage
        self.seconds = seconds
        self.megabytes = megabytes

    def __reduce__(self):
        return (_rebuild_budget_error, (str(self), self.__dict__))


def _rebuild_budget_error(message: str, state: dict) -> FeedBudgetExceededError:
    error = FeedBudgetExceededError(message)
    error.__dict__.update(state)
    return error


class FeedParserCrashedError(PermanentError):
    """The parse worker died while parsing this calendar's feed (a signal or an exit, not a limit).

    What to do: the message names the signal or exit status. A crash inside a library (SIGSEGV)
    is a bug to report upstream with the feed attached (``almanac ics inspect URL`` reproduces
    it); SIGKILL without a limit usually means the machine ran out of memory.
    """

    def __init__(self, message: str = "", *, calendar_id: int | None = None, returncode: int | None = None):
        super().__init__(message)
        self.calendar_id = calendar_id
        self.returncode = returncode


class ParseWorkerError(PermanentError):
    """The feed's parse raised an exception that could not be passed back from the worker as is.

    What to do: the message names the original exception type and text; treat it like that
    exception (usually a library bug on this feed: report it with the feed attached).
    """


class ParseWorkerUnavailableError(RetryableError):
    """The parse worker process could not be started (or did not report ready in time).

    This is an infrastructure fault of the task's machine, not of a feed: the batch fails and
    Airflow retries it.

    What to do: look at the task log for the worker's own error (``almanac.ics.budget``); check
    that the machine has free memory and processes, and that ``python -c "import
    almanac.ics.parse"`` works in the task's environment.
    """


# --- the calendar's wall-time budget ----------------------------------------------------------


class CalendarClock:
    """The wall-time budget of one calendar (fetch + parse + store), counted from its creation.

    Parameters:
        calendar_id: named in the errors.
        budget_s: seconds the calendar may take in all (``ics_calendar_budget_s``).
        clock: a monotonic clock (tests pass their own).
    """

    setting = "ics_calendar_budget_s"

    def __init__(
        self, calendar_id: int, budget_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.calendar_id = calendar_id
        self.budget_s = float(budget_s)
        self._clock = clock
        self._started = clock()

    def remaining(self) -> float:
        """Seconds left (negative once the budget is spent)."""
        return self.budget_s - (self._clock() - self._started)

    def exceeded(self, stage: str) -> FeedBudgetExceededError:
        """The error for a budget that ran out during ``stage`` (``fetch``, ``parse``, ``store``)."""
        return FeedBudgetExceededError(
            f"calendar {self.calendar_id}: exceeded its budget of {self.budget_s:g}s wall time "
            f"({self.setting}) during {stage}",
            calendar_id=self.calendar_id,
            limit="wall time",
            setting=self.setting,
            stage=stage,
            seconds=self.budget_s,
        )

    def left(self, stage: str, cap: float | None = None) -> float:
        """Seconds left, at most ``cap``; raises ``FeedBudgetExceededError`` when none are."""
        remaining = self.remaining()
        if remaining <= 0:
            raise self.exceeded(stage)
        return remaining if cap is None else min(cap, remaining)

    def sleeper(self, sleep: Callable[[float], None], stage: str) -> Callable[[float], None]:
        """``sleep`` for waits between retries: a wait the budget cannot afford raises at once."""

        def capped(seconds: float) -> None:
            if seconds >= self.remaining():
                raise self.exceeded(stage)
            sleep(seconds)

        return capped


# --- the parent side ------------------------------------------------------------------------------


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection
    baseline_rss: int
    baseline_vm: int
    finalizer: weakref.finalize


def _kill(proc: subprocess.Popen, conn: Connection | None) -> None:
    """SIGKILL the worker and reap it (also the finalizer of a pool that was never closed)."""
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:  # already gone
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # unkillable for now (D state): the kernel reaps it later
        log.warning("parse worker %s did not exit after SIGKILL", proc.pid)
    if conn is not None:
        conn.close()


def _rss_of(pid: int) -> int | None:
    """Resident bytes of ``pid`` from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class ParsePool:
    """One reusable parse worker process with per-call wall, CPU and memory limits.

    Use as a context manager (``with ParsePool.from_settings(settings) as pool:``); the worker
    is started lazily at the first call, so a batch whose feeds are all unchanged never starts
    one. After an overrun or a crash the worker is gone and the next call starts a fresh one.
    Not thread-safe: one pool per batch.

    Parameters:
        cpu_s: CPU seconds one call may use (``ics_parse_cpu_s``).
        memory_mb: MiB one call may add to the worker's resident size (``ics_parse_memory_mb``).
        parse_target: ``"module:function"`` that ``parse_feed`` runs (tests wrap the real one).
        start_timeout_s: how long a new worker may take to report ready (not counted against
            any calendar's budget).
    """

    def __init__(
        self,
        *,
        cpu_s: float = 20,
        memory_mb: int = 512,
        parse_target: str = "almanac.ics.parse:parse_feed",
        start_timeout_s: float = 60.0,
    ) -> None:
        self.cpu_s = cpu_s
        self.memory_mb = memory_mb
        self.parse_target = parse_target
        self.start_timeout_s = start_timeout_s
        self._worker: _Worker | None = None
        #: Workers started so far (1 after the first call; +1 after every kill or recycle).
        self.started = 0

    @classmethod
    def from_settings(cls, settings, **kwargs) -> ParsePool:
        """A pool with the limits of ``settings`` (``ics_parse_cpu_s``, ``ics_parse_memory_mb``)."""
        return cls(cpu_s=settings.ics_parse_cpu_s, memory_mb=settings.ics_parse_memory_mb, **kwargs)

    def __enter__(self) -> ParsePool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def worker_pid(self) -> int | None:
        """The pid of the live worker, if one is running."""
        worker = self._worker
        return worker.proc.pid if worker is not None and worker.proc.poll() is None else None

    def close(self) -> None:
        """Stop the worker (politely, then with SIGKILL) and reap it. Safe to call twice."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.finalizer.detach()
        try:
            worker.conn.send(None)
            worker.proc.wait(timeout=2)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            pass
        _kill(worker.proc, worker.conn)

    # -- calls --

    def parse_feed(
        self,
        body: bytes,
        *,
        calendar_id: int,
        wall_s: float | None = None,
        clock: CalendarClock | None = None,
        **parse_kwargs: Any,
    ):
        """``almanac.ics.parse.parse_feed(body, **parse_kwargs)`` in the worker, within the limits.

        Parameters:
            calendar_id: named in the errors.
            wall_s: seconds the call may take.
            clock: the calendar's budget instead of ``wall_s``: the call may take what is left
                of it, and running out is reported as that budget's overrun.
        Returns:
            The ``ParseResult``, equal to an in-process call's.
        Raises:
            FeedBudgetExceededError: a limit was hit; the worker was killed.
            FeedParserCrashedError: the worker died on this feed.
            ParseWorkerUnavailableError: no worker could be started (infrastructure).
            Whatever ``parse_feed`` raises (``FeedParseError`` ...), re-raised here.
        """
        packed = self.call(
            _PACKED_PARSE,
            self.parse_target,
            body,
            parse_kwargs,
            calendar_id=calendar_id,
            wall_s=wall_s,
            clock=clock,
        )
        return _unpack_parse_result(packed)

    def call(
        self,
        target: str,
        *args: Any,
        calendar_id: int,
        wall_s: float | None = None,
        clock: CalendarClock | None = None,
        **kwargs: Any,
    ) -> Any:
        """``target(*args, **kwargs)`` in the worker (``"module:function"``; picklable in and out).

        ``wall_s`` or ``clock`` bound its wall time as in ``parse_feed``.
        """
        if clock is not None:
            wall_s = clock.left("parse")
        if wall_s is None:
            raise TypeError("call() needs wall_s or clock")
        worker = self._ensure_worker()
        started = time.monotonic()
        try:
            worker.conn.send((target, args, kwargs, self.cpu_s))
        except OSError:  # died while idle (killed from outside): start another, once
            self._discard(worker)
            worker = self._ensure_worker()
            worker.conn.send((target, args, kwargs, self.cpu_s))
        reply = self._await(worker, started + wall_s, calendar_id, wall_s, clock)
        status, payload, rss, vm = reply
        grown = rss - worker.baseline_rss > self.memory_mb * _MIB / 2
        if grown or vm - worker.baseline_vm > self.memory_mb * _MIB:  # fresh headroom for the next feed
            log.info("parse worker %s grew to %d MiB resident: replaced", worker.proc.pid, rss // _MIB)
            self.close()
        if status == "ok":
            return payload
        if status == "memory":
            raise self._memory_error(calendar_id, "a memory allocation failed")
        raise _remote_error(payload)

    # -- internals --

    def _ensure_worker(self) -> _Worker:
        worker = self._worker
        if worker is not None and worker.proc.poll() is None:
            return worker
        if worker is not None:
            self._discard(worker)
        self._worker = self._start()
        self.started += 1
        return self._worker

    def _discard(self, worker: _Worker) -> None:
        worker.finalizer.detach()
        _kill(worker.proc, worker.conn)
        if self._worker is worker:
            self._worker = None

    def _start(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: only safe to use
        # from the main thread. From other threads the worker's watchdog thread alone is used.
        pdeathsig = threading.current_thread() is threading.main_thread()
        paths = [p or os.getcwd() for p in sys.path]
        argv = [
            sys.executable,
            "-I",
            "-c",
            _BOOT,
            json.dumps(paths),
            str(fd),
            str(os.getpid()),
            "1" if pdeathsig else "0",
            str(self.memory_mb),
        ]
        try:
            # stdin is never the parent's: in an Airflow task, fd 0 is the supervisor's request socket.
            proc = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            parent_sock.close()
            raise ParseWorkerUnavailableError(f"the parse worker could not be started: {e}") from e
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        finalizer = weakref.finalize(self, _kill, proc, conn)
        try:
            if not conn.poll(self.start_timeout_s):
                raise ParseWorkerUnavailableError(
                    f"the parse worker did not report ready within {self.start_timeout_s:g}s"
                )
            status, rss, vm = conn.recv()
        except (EOFError, OSError, ValueError) as e:
            finalizer()
            raise ParseWorkerUnavailableError(
                f"the parse worker exited while starting (status {proc.returncode}); see the task log"
            ) from e
        except ParseWorkerUnavailableError:
            finalizer()
            raise
        log.debug("parse worker %s ready (%d MiB resident)", proc.pid, rss // _MIB)
        return _Worker(proc, conn, rss, vm, finalizer)

    def _await(self, worker: _Worker, deadline: float, calendar_id: int, wall_s: float, clock):
        """The worker's reply, or an error after killing it when a limit is hit."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._discard(worker)
                if clock is not None:
                    error = clock.exceeded("parse")
                    error.args = (f"{error}; the parse worker was killed",)
                    raise error
                raise FeedBudgetExceededError(
                    f"calendar {calendar_id}: parse exceeded its limit of {wall_s:.3g}s wall time; "
                    "the parse worker was killed",
                    calendar_id=calendar_id,
                    limit="wall time",
                    stage="parse",
                    seconds=wall_s,
                )
            try:
                ready = worker.conn.poll(min(left, _POLL_S))
                if ready:
                    return worker.conn.recv()
            except (EOFError, OSError):
                ready = True  # the worker died (its end of the pipe closed)
            if ready:
                raise self._died(worker, calendar_id)
            rss = _rss_of(worker.proc.pid)
            if rss is not None and rss - worker.baseline_rss > self.memory_mb * _MIB:
                self._discard(worker)
                raise self._memory_error(calendar_id, f"it reached {rss // _MIB} MiB resident")
            if worker.proc.poll() is not None:
                raise self._died(worker, calendar_id)

    def _died(self, worker: _Worker, calendar_id: int) -> Exception:
        try:
            code = worker.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self._discard(worker)
        if code == -signal.SIGXCPU:
            return FeedBudgetExceededError(
                f"calendar {calendar_id}: parse exceeded its budget of {self.cpu_s:g}s CPU time "
                "(ics_parse_cpu_s); the parse worker was killed",
                calendar_id=calendar_id,
                limit="CPU time",
                setting="ics_parse_cpu_s",
                stage="parse",
                seconds=float(self.cpu_s),
            )
        if code is not None and code < 0:
            how = f"was killed by {_signal_name(-code)}"
            if code == -signal.SIGKILL:
                how += " (not by Almanac: the machine may be out of memory)"
        else:
            how = f"exited with status {code}"
        return FeedParserCrashedError(
            f"calendar {calendar_id}: the parse worker {how} while parsing the feed",
            calendar_id=calendar_id,
            returncode=code,
        )

    def _memory_error(self, calendar_id: int, what: str) -> FeedBudgetExceededError:
        self.close()
        return FeedBudgetExceededError(
            f"calendar {calendar_id}: parse exceeded its budget of {self.memory_mb} MiB memory "
            f"(ics_parse_memory_mb): {what}; the parse worker was killed",
            calendar_id=calendar_id,
            limit="memory",
            setting="ics_parse_memory_mb",
            stage="parse",
            megabytes=float(self.memory_mb),
        )


class _RemoteTraceback(Exception):
    """The worker-side traceback, chained as ``__cause__`` of a re-raised exception."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


def _remote_error(payload) -> BaseException:
    data, qualname, message, tb = payload
    error: BaseException | None = None
    if data is not None:
        try:
            error = pickle.loads(data)
        except Exception:  # any unpickling failure: fall back to the names
            error = None
    if not isinstance(error, Exception):
        error = ParseWorkerError(f"{qualname}: {message}")
    error.__cause__ = _RemoteTraceback(tb)
    return error


# --- packing a ParseResult for the pipe (tuples pickle about twice as fast as dataclasses) -------


def _parse_packed(target: str, body: bytes, kwargs: dict) -> tuple:
    """Worker side of ``ParsePool.parse_feed``: run ``target`` and pack its ``ParseResult``."""
    from almanac.ics.parse import Instance, ParseResult

    result = import_object(target)(body, **kwargs)
    if not isinstance(result, ParseResult):
        return ("raw", result)
    names = [f.name for f in fields(Instance) if f.init]
    state = {}
    for f in fields(ParseResult):
        value = getattr(result, f.name)
        if f.name == "instances":
            value = [tuple(getattr(instance, name) for name in names) for instance in value]
        state[f.name] = value
    return ("parse", names, state)


def _unpack_parse_result(packed: tuple):
    if packed[0] == "raw":
        return packed[1]
    from almanac.ics.parse import Instance, ParseResult

    _, names, state = packed
    here = [f.name for f in fields(Instance) if f.init]
    if names != here:  # the worker runs other code than the parent (a deploy in between)
        raise ParseWorkerError(f"the parse worker's Instance fields {names} differ from {here}")
    state["instances"] = [Instance(*values) for values in state["instances"]]
    return ParseResult(**state)


# --- the worker side ---------------------------------------------------------------------------------


def _memory_self() -> tuple[int, int]:
    """(resident, virtual) bytes of this process."""
    try:
        with open("/proc/self/statm", "rb") as f:
            size, resident = f.read().split()[:2]
        page = os.sysconf("SC_PAGE_SIZE")
        return int(resident) * page, int(size) * page
    except (OSError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def _set_pdeathsig() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the watchdog thread alone
        pass


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def _set_limit(kind: int, soft: int) -> None:
    import resource

    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
        soft = hard
    resource.setrlimit(kind, (soft, hard))


def _cpu_used() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pack_error(exc: BaseException) -> tuple:
    tb = "".join(traceback.format_exception(exc))[-20_000:]
    try:
        data: bytes | None = pickle.dumps(exc)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        data = None
    return (data, type(exc).__qualname__, str(exc)[:2000], tb)


def _worker_main(argv: list[str]) -> None:
    """The worker process: answer calls on the inherited socket until EOF or ``None``."""
    import resource

    fd, parent_pid, pdeathsig, memory_mb = int(argv[0]), int(argv[1]), argv[2] == "1", int(argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # a parent that ignored it must not disarm RLIMIT_CPU
    if pdeathsig:
        _set_pdeathsig()
    if os.getppid() != parent_pid:  # the parent died before PDEATHSIG was armed
        os._exit(3)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    _set_limit(resource.RLIMIT_CORE, 0)
    conn = Connection(fd)
    for name in _PRELOAD:
        importlib.import_module(name)
    rss, vm = _memory_self()
    _set_limit(resource.RLIMIT_AS, vm + 2 * memory_mb * _MIB)
    conn.send(("ready", rss, vm))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        target, args, kwargs, cpu_s = message
        _set_limit(resource.RLIMIT_CPU, math.ceil(_cpu_used() + cpu_s))
        reply: tuple
        try:
            reply = ("ok", import_object(target)(*args, **kwargs))
        except MemoryError:
            reply = ("memory", None)
        except Exception as exc:  # every failure of the call goes back to the parent
            reply = ("error", _pack_error(exc))
        del message, args, kwargs
        try:
            conn.send((*reply, *_memory_self()))  # pickled whole before anything is written
        except MemoryError:
            reply = ("memory", None)
            conn.send((*reply, *_memory_self()))
        except Exception as exc:  # a result that cannot be pickled
            reply = ("error", _pack_error(exc))
            conn.send((*reply, *_memory_self()))
        del reply
        _set_limit(resource.RLIMIT_CPU, resource.RLIM_INFINITY)

"""Functions that misbehave on purpose, for the parse worker of ``almanac.ics.budget`` to run.

They are real targets run in the real worker process (``ParsePool.call("tests.support.slow_targets:spin",
...)``), not mocks: they loop, sleep, grow, allocate or crash the way a third-party library can.
``parse_feed_or_misbehave`` is the real ``almanac.ics.parse.parse_feed`` unless the feed carries an
``X-ALMANAC-TEST-MISBEHAVE:<how>`` line, so a whole ``sync_batch`` can meet a parse that really
loops even when ``parse.py`` itself refuses every hostile rule we know of.

Run as a script (``python -m tests.support.slow_targets hold``) it starts a pool, prints the
worker's pid and blocks in a spinning call: the orphan test SIGKILLs that process.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

__all__ = [
    "allocate_at_once",
    "crash",
    "echo",
    "exit_now",
    "grow",
    "keep",
    "parse_feed_or_misbehave",
    "raise_unpicklable",
    "raise_value_error",
    "sleep_for",
    "spin",
    "unpicklable_result",
]

_MIB = 1024 * 1024
_kept: list[bytearray] = []
_MISBEHAVE = re.compile(rb"^X-ALMANAC-TEST-MISBEHAVE:(\w+)", re.MULTILINE)


def echo(value):
    return value


def spin(seconds: float = 3600.0) -> int:
    """Burn CPU for ``seconds`` of CPU time (pure Python: the way an expansion library loops)."""
    end = time.process_time() + seconds
    n = 0
    while time.process_time() < end:
        n += 1
    return n


def sleep_for(seconds: float) -> str:
    """Use no CPU at all: only a wall-time limit stops this."""
    time.sleep(seconds)
    return "slept"


def grow(step_mb: int = 8, pause_s: float = 0.02) -> None:
    """Grow resident memory step by step, forever (an expansion that accumulates instances)."""
    chunks = []
    while True:
        chunks.append(os.urandom(16) * (step_mb * _MIB // 16))
        time.sleep(pause_s)


def allocate_at_once(megabytes: int) -> int:
    """One huge allocation: ``RLIMIT_AS`` makes it fail with MemoryError."""
    block = bytearray(megabytes * _MIB)
    return len(block)


def keep(megabytes: int) -> int:
    """Allocate and keep it (module global): the worker stays big after the call."""
    block = bytearray(megabytes * _MIB)
    for i in range(0, len(block), 4096):  # touch every page: resident, not only reserved
        block[i] = 1
    _kept.append(block)
    return len(_kept)


def crash() -> None:
    """Die of SIGSEGV, as a C extension would."""
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)


def exit_now(code: int = 7) -> None:
    os._exit(code)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


class _Unpicklable(Exception):
    def __init__(self, message: str, *, handle) -> None:
        super().__init__(message)
        self.handle = handle


def raise_unpicklable(message: str) -> None:
    """An exception that cannot cross the pipe (it holds a lock)."""
    import threading

    raise _Unpicklable(message, handle=threading.Lock())


def unpicklable_result():
    import threading

    return threading.Lock()


def _overflow() -> None:
    """What a third-party library raises on a date past the representable range."""
    raise OverflowError("date value out of range")


def parse_feed_or_misbehave(body: bytes, **kwargs):
    """``almanac.ics.parse.parse_feed``, unless the feed asks to ``spin``, ``grow``, ``sleep``, ``crash``
    or raise an ``overflow``."""
    match = _MISBEHAVE.search(body)
    if match:
        how = match.group(1).decode()
        {
            "spin": spin,
            "grow": grow,
            "sleep": lambda: sleep_for(3600),
            "crash": crash,
            "overflow": _overflow,
        }[how]()
    from almanac.ics.parse import parse_feed

    return parse_feed(body, **kwargs)


def _hold() -> None:
    from almanac.ics.budget import ParsePool

    pool = ParsePool(cpu_s=3600, memory_mb=256)
    pool.call("tests.support.slow_targets:echo", 1, calendar_id=0, wall_s=60)
    print(pool.worker_pid, flush=True)
    pool.call("tests.support.slow_targets:spin", calendar_id=0, wall_s=3600)


if __name__ == "__main__":
    if sys.argv[1:] == ["hold"]:  # the pool in the main thread (PR_SET_PDEATHSIG armed)
        _hold()
    elif sys.argv[1:] == ["hold-in-thread"]:  # started from another thread: the watchdog alone
        import threading

        holder = threading.Thread(target=_hold)
        holder.start()
        holder.join()

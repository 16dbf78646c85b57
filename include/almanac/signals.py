"""Waiting for a stop signal in a small server process (the local fakes' runners)."""

from __future__ import annotations

import signal
import time

__all__ = ["StopSignals"]


class StopSignals:
    """Catch SIGTERM and SIGINT from now on; ``wait()`` blocks until one has arrived.

    The handler only records the signal, and the main thread polls: the kernel may deliver a
    signal to any thread, and a main thread blocked on a lock would then never run the handler
    (nor may a handler take a lock). Install it before starting what a signal must stop cleanly.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, _frame: self.received.append(signum))

    def wait(self, poll_s: float = 0.2) -> int:
        while not self.received:
            time.sleep(poll_s)
        return self.received[0]

"""Database helpers for tests."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def lent(conn):
    """``conn`` as a connection factory's context manager that does not close it (for code that
    takes ``connect: () -> context manager``, e.g. ``Refresher.refresh_many``, on a test's own
    connection)."""
    yield conn

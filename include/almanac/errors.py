"""Almanac's error hierarchy: every job raises one of these, never a bare Exception."""

from __future__ import annotations

__all__ = ["AlmanacError", "ConfigError", "PermanentError", "RetryableError"]


class AlmanacError(Exception):
    """Base of every error Almanac raises on purpose."""


class RetryableError(AlmanacError):
    """A fault that may pass: a timeout, HTTP 429 or 5xx, a restarting database.

    What to do: nothing; the task retries with backoff. If it keeps failing, look at the
    service named in the message.
    """


class PermanentError(AlmanacError):
    """A fault that a retry will not fix: bad input, a refused URL, a revoked grant.

    What to do: fix the input named in the message; retrying the same input fails the same way.
    """


class ConfigError(PermanentError):
    """A setting, Variable or connection is missing or malformed.

    What to do: fix the setting named in the message (see README, "Settings").
    """

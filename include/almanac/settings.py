"""Job settings: one typed place with documented defaults, overridable per deployment.

Defaults live here. A deployment overrides any of them with the Airflow Variable
``almanac_settings`` (a JSON object, e.g. ``{"invitation_ttl_days": 14}``); the glue in
``plugins/almanac_airflow/settings.py`` reads it inside tasks, never at DAG parse time.
Unknown keys and values of the wrong type are refused with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from almanac.errors import ConfigError

__all__ = ["Settings", "schedule_timezone"]


@dataclass(frozen=True)
class Settings:
    """Every tunable of every job. Field docs are the reference (README lists them too)."""

    #: Days after ``created_at`` an invitation expires when its ``expires_at`` is NULL.
    invitation_ttl_days: int = 30
    #: Rows deleted per statement by invitation cleanup (bounds each statement's locks).
    invitation_cleanup_chunk_size: int = 5000
    #: Postgres ``lock_timeout`` for cleanup statements, in milliseconds.
    cleanup_lock_timeout_ms: int = 5000
    #: Postgres ``statement_timeout`` for cleanup statements, in milliseconds.
    cleanup_statement_timeout_ms: int = 120_000

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any] | None) -> Settings:
        """Defaults updated with ``overrides``; raises ConfigError on unknown keys or bad types."""
        if overrides is None:
            return cls()
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"almanac settings must be a JSON object, got {type(overrides).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ConfigError(f"unknown almanac setting(s): {', '.join(unknown)}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            expected = type(getattr(cls, key))
            if type(value) is not expected:  # exact: JSON true is not an int setting
                raise ConfigError(f"almanac setting {key!r} must be {expected.__name__}, got {value!r}")
            if value <= 0:
                raise ConfigError(f"almanac setting {key!r} must be positive, got {value!r}")
            values[key] = value
        return dataclasses.replace(cls(), **values)


def schedule_timezone(job: str, default: str = "UTC") -> str:
    """The IANA zone a job's cron schedule is read in: ``ALMANAC_<JOB>_TZ``, else ``default``.

    Schedules are fixed when a DAG file is parsed, so this is an environment variable (no I/O),
    not an Airflow Variable.
    """
    return os.environ.get(f"ALMANAC_{job.upper()}_TZ", default)

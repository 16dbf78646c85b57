"""Reading Almanac's job settings inside a task: defaults + the ``almanac_settings`` Variable."""

from __future__ import annotations

import json

from almanac.errors import ConfigError
from almanac.settings import Settings

__all__ = ["SETTINGS_VARIABLE", "load_settings"]

SETTINGS_VARIABLE = "almanac_settings"


def load_settings() -> Settings:
    """Settings for this task run. Call inside a task, never at DAG parse time."""
    from airflow.sdk import Variable

    raw = Variable.get(SETTINGS_VARIABLE, default=None)
    if raw in (None, ""):
        return Settings()
    try:
        overrides = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise ConfigError(f"Variable {SETTINGS_VARIABLE!r} is not valid JSON: {exc}") from exc
    return Settings.from_mapping(overrides)

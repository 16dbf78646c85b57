from __future__ import annotations

import pytest

from almanac.errors import ConfigError
from almanac.settings import Settings, schedule_timezone


def test_defaults_without_overrides():
    assert Settings.from_mapping(None) == Settings()
    assert Settings().invitation_ttl_days == 30


def test_override_changes_only_that_field():
    settings = Settings.from_mapping({"invitation_ttl_days": 14})
    assert settings.invitation_ttl_days == 14
    assert settings.invitation_cleanup_chunk_size == Settings().invitation_cleanup_chunk_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"invitation_ttl_dayz": 3}, "unknown almanac setting"),
        ({"invitation_ttl_days": "30"}, "must be int"),
        ({"invitation_ttl_days": True}, "must be int"),
        ({"invitation_ttl_days": 0}, "must be positive"),
        (["invitation_ttl_days"], "must be a JSON object"),
    ],
)
def test_bad_override_is_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_mapping(overrides)


def test_schedule_timezone_reads_the_job_variable(monkeypatch):
    monkeypatch.delenv("ALMANAC_INVITATION_CLEANUP_TZ", raising=False)
    assert schedule_timezone("invitation_cleanup") == "UTC"
    monkeypatch.setenv("ALMANAC_INVITATION_CLEANUP_TZ", "Europe/Berlin")
    assert schedule_timezone("invitation_cleanup") == "Europe/Berlin"

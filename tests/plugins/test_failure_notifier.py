"""The shared failure notifier: a structured log line always, email when configured."""

from __future__ import annotations

import email
import json
import logging
from types import SimpleNamespace

import pytest

from almanac_airflow.notifiers import AlmanacFailureNotifier
from tests.support.smtp_server import SmtpServer


def _context(error: Exception) -> dict:
    ti = SimpleNamespace(dag_id="invitation_cleanup", task_id="delete", run_id="manual__1", map_index=-1,
                         try_number=4)
    return {"ti": ti, "exception": error}


def test_failure_is_logged_as_one_structured_line(caplog, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SMTP_DEFAULT", raising=False)
    with caplog.at_level(logging.ERROR, logger="almanac_airflow.notifiers"):
        AlmanacFailureNotifier().notify(_context(RuntimeError("database restarting")))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("almanac.task_failed ")]
    assert len(lines) == 1
    fields = json.loads(lines[0].removeprefix("almanac.task_failed "))
    assert fields["dag_id"] == "invitation_cleanup"
    assert fields["error_type"] == "RuntimeError"
    assert fields["error"] == "database restarting"
    assert fields["try_number"] == 4


def test_failure_is_emailed_through_smtp_default(monkeypatch):
    with SmtpServer() as smtp:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SMTP_DEFAULT",
            json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
                        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@x.test"}}),
        )
        monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_ALERT_EMAILS", "ops@x.test, oncall@x.test")
        AlmanacFailureNotifier().notify(_context(ValueError("bad feed")))
    assert len(smtp.messages) == 1
    _, rcpts, raw = smtp.messages[0]
    assert sorted(rcpts) == ["oncall@x.test", "ops@x.test"]
    message = email.message_from_bytes(raw)
    assert "invitation_cleanup.delete failed" in message["Subject"]


@pytest.mark.parametrize("recipients", ["", None])
def test_no_recipients_means_no_email(monkeypatch, recipients):
    with SmtpServer() as smtp:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", f"smtp://127.0.0.1:{smtp.port}")
        if recipients is None:
            monkeypatch.delenv("AIRFLOW_VAR_ALMANAC_ALERT_EMAILS", raising=False)
        else:
            monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_ALERT_EMAILS", recipients)
        AlmanacFailureNotifier().notify(_context(ValueError("x")))
    assert smtp.messages == []

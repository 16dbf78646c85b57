"""The shared failure notifier: a structured log line always, email and Slack when configured.

Email goes to a local SMTP server, Slack posts to a local webhook server; neither is mocked.
"""

from __future__ import annotations

import email
import json
import logging
import socket
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from airflow.sdk.log import redact

from almanac.errors import PermanentError
from almanac.ics.fetch import FeedNotICalendarError, fetch_feed
from almanac.notify.fakes import FakeSmtpServer
from almanac_airflow.notifiers import AlmanacFailureNotifier, post_slack_webhook
from tests.support.feed_server import FeedServer, Route


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
    with FakeSmtpServer() as smtp:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SMTP_DEFAULT",
            json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
                        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@x.test"}}),
        )
        monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_ALERT_EMAILS", "ops@x.test, oncall@x.test")
        AlmanacFailureNotifier().notify(_context(ValueError("bad feed")))
    [received] = smtp.received
    rcpts, raw = received.rcpt_tos, received.raw
    assert sorted(rcpts) == ["oncall@x.test", "ops@x.test"]
    message = email.message_from_bytes(raw)
    assert "invitation_cleanup.delete failed" in message["Subject"]


@pytest.mark.parametrize("recipients", ["", None])
def test_no_recipients_means_no_email(monkeypatch, recipients):
    with FakeSmtpServer() as smtp:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", f"smtp://127.0.0.1:{smtp.port}")
        if recipients is None:
            monkeypatch.delenv("AIRFLOW_VAR_ALMANAC_ALERT_EMAILS", raising=False)
        else:
            monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_ALERT_EMAILS", recipients)
        AlmanacFailureNotifier().notify(_context(ValueError("x")))
    assert smtp.received == []


# --- Slack: the webhook URL is a secret ---------------------------------------------------------

SECRET_PATH = "/services/T0SECRET1/B0SECRET2/s3cr3tW3bh00kT0k3n"


class _SlackWebhook:
    """A local Slack incoming webhook: records each POSTed JSON body, answers ``status``/``body``."""

    def __init__(self, status: int = 200, body: bytes = b"ok") -> None:
        self.status, self.body, self.posts = status, body, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                owner.posts.append((self.path, json.loads(self.rfile.read(length))))
                self.send_response(owner.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> _SlackWebhook:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{SECRET_PATH}"


def _use_slack(monkeypatch, url: str) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_SMTP_DEFAULT", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_WEBHOOK_DEFAULT", json.dumps({"conn_type": "http", "host": url}))


def _logged_text(records) -> list[str]:
    """Everything a log handler could write for these records: messages, tracebacks with their
    whole exception chain, and each chained exception's own text and arguments."""
    texts = []
    for record in records:
        texts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
            seen, pending = set(), [record.exc_info[1]]
            while pending:
                exc = pending.pop()
                if exc is None or id(exc) in seen:
                    continue
                seen.add(id(exc))
                texts += [str(exc), repr(exc.args)]
                pending += [exc.__cause__, exc.__context__]
    return texts


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("answer", ["http_404", "connection_refused"])
def test_failed_slack_post_never_logs_the_webhook_url(caplog, monkeypatch, answer):
    with _SlackWebhook(status=404, body=b"no_service") as slack:
        url = slack.url if answer == "http_404" else f"http://127.0.0.1:{_closed_port()}{SECRET_PATH}"
        _use_slack(monkeypatch, url)
        with caplog.at_level(logging.DEBUG):  # urllib3's request lines included
            AlmanacFailureNotifier().notify(_context(RuntimeError("database restarting")))
    failures = [r for r in caplog.records if r.getMessage() == "failure notification through slack failed"]
    assert len(failures) == 1, "the failed post is reported once"
    reported = "".join(traceback.format_exception(*failures[0].exc_info))
    assert ("HTTP 404 (no_service)" if answer == "http_404" else "ConnectionError") in reported
    # At the level task logs are written (INFO), nothing names the webhook, not even the traceback.
    for text in _logged_text(r for r in caplog.records if r.levelno >= logging.INFO):
        assert "s3cr3tW3bh00kT0k3n" not in text and "B0SECRET2" not in text, text
    # What is logged below that (urllib3 writes the request path at DEBUG) goes through Airflow's
    # secrets masker in a task's log: the URL and its path were registered with it.
    for text in _logged_text(caplog.records):
        assert "s3cr3tW3bh00kT0k3n" not in redact(text), text
    assert redact(f"posting to {url}") == "posting to ***"


def test_slack_message_escapes_text_from_outside(monkeypatch):
    with _SlackWebhook() as slack:
        _use_slack(monkeypatch, slack.url)
        error = ValueError("feed says <!channel> <https://x.test|click> & more")
        AlmanacFailureNotifier().notify(_context(error))
    assert len(slack.posts) == 1
    path, payload = slack.posts[0]
    assert path == SECRET_PATH
    assert "&lt;!channel&gt; &lt;https://x.test|click&gt; &amp; more" in payload["text"]
    assert "<" not in payload["text"] and ">" not in payload["text"]


def test_refused_slack_post_is_a_permanent_error_without_the_url(monkeypatch):
    with _SlackWebhook(status=403, body=b"invalid_token") as slack:
        with pytest.raises(PermanentError) as refused:
            post_slack_webhook(slack.url, "hello")
    assert "HTTP 403 (invalid_token)" in str(refused.value)
    assert refused.value.__cause__ is None and refused.value.__context__ is None


# --- email: text from a feed is escaped ---------------------------------------------------------


def test_failure_email_escapes_what_a_feed_sent(monkeypatch):
    hostile_type = 'text/html"><script>alert(1)</script>'
    with FeedServer({"/cal.ics": Route(body=b"<html>login</html>", content_type=hostile_type)}) as feeds:
        with pytest.raises(FeedNotICalendarError) as refused:
            fetch_feed(feeds.url("/cal.ics"), allow_hosts=feeds.allow_hosts)
    assert "<script>" in str(refused.value), "the feed's Content-Type is quoted in the error"
    with FakeSmtpServer() as smtp:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SMTP_DEFAULT",
            json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
                        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@x.test"}}),
        )
        monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_ALERT_EMAILS", "ops@x.test")
        AlmanacFailureNotifier().notify(_context(refused.value))
    [received] = smtp.received
    message = email.message_from_bytes(received.raw)
    html_parts = [p for p in message.walk() if p.get_content_type() == "text/html"]
    assert len(html_parts) == 1
    body = html_parts[0].get_payload(decode=True).decode()
    assert "<script>" not in body and '"><' not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body

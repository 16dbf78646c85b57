"""The demo feeds: deterministic files, time-bucketed drift, and the HTTP server serving them."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest

from almanac.demo import DemoSpec, generate
from almanac.demo_feeds import (
    DRIFT_MARKER,
    DemoFeedServer,
    bucket_at,
    drift_events,
    feed_text,
    render,
    write_missing_feeds,
)
from almanac.ics.fetch import fetch_feed
from almanac.ics.parse import parse_feed

ANCHOR = datetime(2026, 3, 10, tzinfo=UTC)
SPEC = DemoSpec(anchor=ANCHOR, feed_base_url="http://127.0.0.1:58080")
PERIOD = 600


def _instances(text: str, at: datetime, zone: str = "UTC") -> dict:
    """What ics_sync would keep of ``text`` when run at ``at`` (its 30/365-day window)."""
    parsed = parse_feed(
        text.encode(),
        window_start=at - timedelta(days=30),
        window_end=at + timedelta(days=365),
        calendar_tz=zone,
    )
    assert parsed.problems == []
    return {(i.uid, i.recurrence_id): i for i in parsed.instances}


def test_feed_files_are_deterministic_and_differ_per_calendar():
    calendars = generate(SPEC).calendars
    texts = [feed_text(calendar, SPEC) for calendar in calendars]
    assert texts == [feed_text(calendar, SPEC) for calendar in calendars]
    assert len(set(texts)) == len(texts)
    assert all(DRIFT_MARKER in text.splitlines() for text in texts)


def test_demo_events_fall_inside_the_sync_window_for_a_year():
    for calendar in generate(SPEC).calendars:
        text = feed_text(calendar, SPEC)
        soon = _instances(text, ANCHOR, calendar[3])
        assert len(soon) > 50
        assert len({i.summary for i in soon.values()}) == 7  # 2 weekly, 4 one-off, 1 all-day
        # Weekly events have no end, so a stack still running a year later still sees events.
        assert len(_instances(text, ANCHOR + timedelta(days=365), calendar[3])) > 50


def test_drift_is_the_same_within_a_bucket_and_moves_between_buckets():
    calendar = generate(SPEC).calendars[0]
    text, name = feed_text(calendar, SPEC), "calendar-1.ics"
    bucket = bucket_at(ANCHOR.timestamp(), PERIOD)
    assert render(text, name, bucket, PERIOD) == render(text, name, bucket, PERIOD)
    now, later = (_instances(render(text, name, b, PERIOD), ANCHOR) for b in (bucket, bucket + 1))
    base = _instances(text, ANCHOR)
    # The file's own events are served unchanged in both buckets ...
    def hashes(instances: dict) -> dict:
        return {k: v.content_hash for k, v in instances.items() if k in base}

    assert hashes(now) == hashes(later) == hashes(base) and len(hashes(base)) == len(base)
    # ... and the generated ones change: the carpool moves, the pop-up comes or goes.
    carpool = {i.summary: i for i in now.values()}["Carpool"]
    moved = {i.summary: i for i in later.values()}["Carpool"]
    assert carpool.uid == moved.uid and carpool.starts_at != moved.starts_at
    popups = [sum(i.summary == "Pop-up practice" for i in x.values()) for x in (now, later)]
    assert sorted(popups) == [0, 1]


def test_drift_events_are_just_ahead_of_their_bucket():
    for offset in range(0, 30):
        moment = ANCHOR + timedelta(hours=7 * offset)
        bucket = bucket_at(moment.timestamp(), PERIOD)
        events = "\r\n".join(drift_events("x.ics", bucket, PERIOD))
        body = f"BEGIN:VCALENDAR\r\n{events}\r\nEND:VCALENDAR\r\n"
        for instance in _instances(body, moment).values():
            assert moment < instance.starts_at < moment + timedelta(days=9)


def test_a_file_without_the_drift_line_is_served_as_it_is():
    text = feed_text(generate(SPEC).calendars[0], SPEC).replace(DRIFT_MARKER + "\r\n", "")
    assert render(text, "calendar-1.ics", 123, PERIOD) == text


def test_existing_feed_files_are_kept(tmp_path):
    data = generate(SPEC)
    written = write_missing_feeds(tmp_path, data, SPEC)
    assert sorted(p.name for p in written) == sorted(f"calendar-{row[0]}.ics" for row in data.calendars)
    edited = tmp_path / "calendar-1.ics"
    edited.write_text(edited.read_text().replace("END:VCALENDAR", "X-EDITED:yes\r\nEND:VCALENDAR"))
    (tmp_path / "calendar-2.ics").unlink()
    assert [p.name for p in write_missing_feeds(tmp_path, data, SPEC)] == ["calendar-2.ics"]
    assert "X-EDITED:yes" in edited.read_text()


class _Clock:
    def __init__(self, moment: float) -> None:
        self.moment = moment

    def __call__(self) -> float:
        return self.moment


@pytest.fixture
def served(tmp_path):
    write_missing_feeds(tmp_path, generate(SPEC), SPEC)
    clock = _Clock(ANCHOR.timestamp())
    server = DemoFeedServer(tmp_path, period_s=PERIOD, clock=clock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, clock, tmp_path
    server.close()


def _get(url: str, etag: str | None = None) -> tuple[int, bytes, str | None]:
    request = urllib.request.Request(url, headers={"If-None-Match": etag} if etag else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers.get("ETag")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("ETag")


def test_server_answers_with_the_file_plus_drift_and_304_when_unchanged(served):
    server, clock, folder = served
    url = f"http://127.0.0.1:{server.port}/calendar-1.ics"
    status, body, etag = _get(url)
    assert status == 200 and etag
    text = (folder / "calendar-1.ics").read_bytes().decode()  # CRLF kept
    assert body.decode() == render(text, "calendar-1.ics", bucket_at(clock(), PERIOD), PERIOD)
    assert _get(url, etag)[0] == 304
    clock.moment += PERIOD  # the next bucket: the feed has changed
    status, moved, new_etag = _get(url, etag)
    assert status == 200 and new_etag != etag and moved != body
    # A hand edit is served at once.
    edited_text = text.replace("END:VCALENDAR", "X-EDITED:yes\r\nEND:VCALENDAR")
    (folder / "calendar-1.ics").write_bytes(edited_text.encode())
    status, edited, _ = _get(url, new_etag)
    assert status == 200 and b"X-EDITED:yes" in edited


def test_server_serves_only_feed_files_of_its_folder(served):
    server, _, folder = served
    (folder.parent / "secrets.json").write_text("{}")
    base = f"http://127.0.0.1:{server.port}"
    assert _get(f"{base}/calendar-999.ics")[0] == 404
    assert _get(f"{base}/../secrets.json")[0] == 404
    assert _get(f"{base}/%2e%2e/secrets.json")[0] == 404
    status, listing, _ = _get(f"{base}/")
    assert status == 200 and b"/calendar-1.ics\n" in listing


def test_almanac_fetches_and_parses_a_served_feed(served):
    server, clock, _ = served
    url = f"http://127.0.0.1:{server.port}/calendar-3.ics"
    allow = frozenset({f"127.0.0.1:{server.port}"})
    first = fetch_feed(url, allow_hosts=allow)
    assert first.status == 200 and first.etag
    assert len(_instances(first.body.decode(), ANCHOR)) > 50
    assert fetch_feed(url, etag=first.etag, allow_hosts=allow).status == 304

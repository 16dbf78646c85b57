"""Demo ICS feeds for ``./dev up``: deterministic feed files and the small HTTP server that serves them.

Each demo calendar's feed starts as a file ``<dir>/calendar-<id>.ics`` written from the demo
spec (``write_missing_feeds``; a file that exists is never overwritten, so a hand edit stays).
The server (``python -m almanac.demo_feeds serve --dir DIR --port PORT``, 127.0.0.1 only)
answers ``GET /<name>.ics`` with that file as it is on disk now, plus, when the file carries
the line ``X-ALMANAC-DEMO-DRIFT:TRUE``, two generated events that change every ``period_s``
seconds: a "Carpool" that moves to another day and a "Pop-up practice" that comes and goes.
The body is a pure function of (file text, file name, time bucket), so it is deterministic,
and it carries an ETag, so an unchanged feed answers 304 to a conditional GET.

Editing a feed = editing its file; deleting the drift line stops that feed changing by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import re
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from almanac.demo import DemoData, DemoSpec, feed_path

__all__ = [
    "DEFAULT_PERIOD_S",
    "DRIFT_MARKER",
    "DemoFeedServer",
    "bucket_at",
    "drift_events",
    "feed_text",
    "main",
    "render",
    "write_missing_feeds",
]

log = logging.getLogger(__name__)

#: A feed file with this line gets the generated, time-bucketed events (remove it to stop that).
DRIFT_MARKER = "X-ALMANAC-DEMO-DRIFT:TRUE"
#: Seconds per time bucket: the drift events change once per bucket.
DEFAULT_PERIOD_S = 600
CONTENT_TYPE = "text/calendar; charset=utf-8"

_CRLF = "\r\n"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}\.ics")
# (summary, weekday Monday=0, hour, minute, minutes long)
_WEEKLY = [
    ("Football practice", 1, 17, 30, 90),
    ("Choir rehearsal", 3, 19, 0, 120),
    ("Swimming lesson", 5, 9, 0, 45),
    ("Piano lesson", 2, 16, 0, 30),
    ("Family dinner", 6, 18, 0, 120),
    ("Book club", 4, 20, 0, 90),
]
_ONE_OFF = [
    "Dentist", "Parents' evening", "Birthday party", "School trip", "Match day",
    "Concert", "Vet appointment", "Team lunch", "Plumber visit", "Museum visit",
]
_ALL_DAY = ["School holiday", "Grandparents visiting", "Tournament weekend", "Bank holiday"]


def _text(value: str) -> str:
    """An RFC 5545 TEXT value (backslash, semicolon, comma and newline escaped)."""
    return (
        value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\n", "\\n")
    )


def _local(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%S")


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _event(lines: Iterable[str]) -> list[str]:
    return ["BEGIN:VEVENT", *lines, "END:VEVENT"]


def feed_text(calendar: tuple, spec: DemoSpec) -> str:
    """The feed one demo calendar starts with (the contents of its file), deterministic.

    Two weekly events (open-ended, so the calendar has events in every sync window), four
    one-off events between 7 days before and 60 days after ``spec.anchor``, and one all-day
    event, in the calendar's time zone; plus ``DRIFT_MARKER``.
    """
    calendar_id, _tenant_id, name, zone = calendar[:4]
    rng = random.Random(f"{spec.seed}:demo-feed:{calendar_id}")
    day0: date = spec.anchor.astimezone(UTC).date()
    stamp = _utc(spec.anchor)
    uid = f"demo-{spec.seed}-{calendar_id}"
    events: list[str] = []
    for n, (summary, weekday, hour, minute, minutes) in enumerate(rng.sample(_WEEKLY, 2)):
        first = day0 + timedelta(days=(weekday - day0.weekday()) % 7)
        start = datetime(first.year, first.month, first.day, hour, minute)
        events += _event([
            f"UID:{uid}-weekly-{n}@demo.almanac.test",
            f"DTSTAMP:{stamp}",
            f"DTSTART;TZID={zone}:{_local(start)}",
            f"DTEND;TZID={zone}:{_local(start + timedelta(minutes=minutes))}",
            "RRULE:FREQ=WEEKLY",
            f"SUMMARY:{_text(summary)}",
        ])
    for n, summary in enumerate(rng.sample(_ONE_OFF, 4)):
        day = day0 + timedelta(days=rng.randrange(-7, 61))
        start = datetime(day.year, day.month, day.day, rng.randrange(8, 20), rng.choice([0, 15, 30, 45]))
        events += _event([
            f"UID:{uid}-once-{n}@demo.almanac.test",
            f"DTSTAMP:{stamp}",
            f"DTSTART;TZID={zone}:{_local(start)}",
            f"DTEND;TZID={zone}:{_local(start + timedelta(minutes=rng.choice([30, 60, 90, 120])))}",
            f"SUMMARY:{_text(summary)}",
            f"LOCATION:{_text(rng.choice(['Town hall', 'School', 'Home', 'Sports centre']))}",
        ])
    day = day0 + timedelta(days=rng.randrange(3, 90))
    events += _event([
        f"UID:{uid}-allday@demo.almanac.test",
        f"DTSTAMP:{stamp}",
        f"DTSTART;VALUE=DATE:{day:%Y%m%d}",
        f"DTEND;VALUE=DATE:{day + timedelta(days=rng.randrange(1, 4)):%Y%m%d}",
        f"SUMMARY:{_text(rng.choice(_ALL_DAY))}",
    ])
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//Almanac//demo feeds//EN",
        "CALSCALE:GREGORIAN",
        f"X-WR-CALNAME:{_text(name)}",
        f"X-WR-TIMEZONE:{zone}",
        DRIFT_MARKER,
        *events,
        "END:VCALENDAR",
    ]
    return _CRLF.join(lines) + _CRLF


def write_missing_feeds(directory: Path, data: DemoData, spec: DemoSpec) -> list[Path]:
    """Write the feed file of every calendar in ``data`` that has none yet; return those written.

    Files already there are kept as they are (they may have been edited by hand).
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for calendar in data.calendars:
        path = directory / feed_path(calendar[0])
        if not path.exists():
            path.write_bytes(feed_text(calendar, spec).encode())
            written.append(path)
    return written


def bucket_at(moment: float, period_s: int = DEFAULT_PERIOD_S) -> int:
    """The time bucket of a Unix time: the drift events are the same within one bucket."""
    return int(moment // period_s)


def drift_events(name: str, bucket: int, period_s: int = DEFAULT_PERIOD_S) -> list[str]:
    """The generated events of feed ``name`` in ``bucket`` (content lines, no line ends).

    "Carpool" is always there and moves to another of the 7 days after the bucket's date every
    bucket (its SEQUENCE is the bucket); "Pop-up practice" is there in every other bucket. Both
    are placed after the bucket's own instant, so they are always inside the sync window.
    """
    salt = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")  # per feed, stable
    base = datetime.fromtimestamp(bucket * period_s, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    carpool = base + timedelta(days=1 + (bucket + salt) % 7, hours=7, minutes=30)
    lines = _event([
        f"UID:drift-carpool-{salt:08x}@demo.almanac.test",
        f"DTSTAMP:{_utc(carpool)}",
        f"SEQUENCE:{bucket}",
        f"DTSTART:{_utc(carpool)}",
        f"DTEND:{_utc(carpool + timedelta(minutes=40))}",
        "SUMMARY:Carpool",
        f"DESCRIPTION:{_text(f'Moves every {period_s // 60 or 1} min (demo bucket {bucket}).')}",
    ])
    if (bucket + salt) % 2:
        popup = base + timedelta(days=2, hours=18)
        lines += _event([
            f"UID:drift-popup-{salt:08x}-{bucket}@demo.almanac.test",
            f"DTSTAMP:{_utc(popup)}",
            f"DTSTART:{_utc(popup)}",
            f"DTEND:{_utc(popup + timedelta(hours=1))}",
            "SUMMARY:Pop-up practice",
        ])
    return lines


def render(text: str, name: str, bucket: int, period_s: int = DEFAULT_PERIOD_S) -> str:
    """The body served for feed file ``name`` holding ``text`` during ``bucket``.

    ``text`` as is, with the drift events inserted before its last ``END:VCALENDAR`` when it
    contains ``DRIFT_MARKER`` (on a line of its own).
    """
    if DRIFT_MARKER not in text.splitlines():
        return text
    end = text.rfind("END:VCALENDAR")
    if end < 0:
        return text
    newline = "\r\n" if "\r\n" in text else "\n"
    inserted = newline.join(drift_events(name, bucket, period_s)) + newline
    return text[:end] + inserted + text[end:]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "almanac-demo-feeds"

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        name = urlsplit(self.path).path.lstrip("/")
        directory = self.server.directory
        if name == "":
            listing = "".join(f"/{p.name}\n" for p in sorted(directory.glob("*.ics")))
            return self._send(200, listing.encode(), "text/plain; charset=utf-8")
        if not _NAME.fullmatch(name):
            return self._send(404, b"not found\n", "text/plain; charset=utf-8")
        try:
            text = (directory / name).read_bytes().decode("utf-8", "replace")
        except (FileNotFoundError, IsADirectoryError):
            return self._send(404, b"not found\n", "text/plain; charset=utf-8")
        bucket = bucket_at(self.server.clock(), self.server.period_s)
        body = render(text, name, bucket, self.server.period_s).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        wanted = {tag.strip() for tag in (self.headers.get("If-None-Match") or "").split(",")}
        if etag in wanted or "*" in wanted:
            return self._send(304, b"", None, etag=etag)
        self._send(200, body, CONTENT_TYPE, etag=etag)

    def _send(self, status: int, body: bytes, content_type: str | None, *, etag: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    directory: Path
    period_s: int
    clock: Callable[[], float]


class DemoFeedServer:
    """The demo feed HTTP server over ``directory``, on 127.0.0.1:``port`` (0 picks a free one)."""

    def __init__(
        self,
        directory: Path,
        port: int = 0,
        *,
        period_s: int = DEFAULT_PERIOD_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.directory = Path(directory)
        self._server.period_s = period_s
        self._server.clock = clock

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m almanac.demo_feeds", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the feed files of a folder on 127.0.0.1")
    serve.add_argument("--dir", type=Path, required=True, help="folder with the *.ics feed files")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--period", type=int, default=DEFAULT_PERIOD_S, help="seconds per drift bucket")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.period <= 0:
        parser.error("--period must be positive")
    server = DemoFeedServer(args.dir, args.port, period_s=args.period)
    log.info("serving %s on http://127.0.0.1:%s/ (drift every %s s)", args.dir, server.port, args.period)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

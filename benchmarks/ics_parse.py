"""Benchmark: ``parse_feed`` alone, with our plain-event reader and with icalendar reading everything.

    .venv/bin/python benchmarks/ics_parse.py [--feeds 40] [--events 200] [--workload DIR] [--rounds 2]

Feeds come from a bench-workload folder's ``gen.py`` (``--workload``, e.g. the workload the
peer is measured on) or from ``benchmarks/ics_sync.py``'s built-in generator. Each round parses
every feed twice in one process, once per reader (the order alternates between rounds so
neither gets the warmer caches), over the window ``ics_sync`` would use (30 days back, 365
ahead). Prints ms per feed per reader and the ratio; exits 1 only if the two readers give
different instances or problems for any feed (that would be a bug, not a slow run). Figures
only: nothing asserts on times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from almanac.ics import parse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ics_sync import generate_feeds  # noqa: E402  (the built-in workload, shared with ics_sync.py)


def _parse(body: bytes, start: datetime, end: datetime, *, reader: bool):
    parse._FAST_READ = reader
    try:
        return parse.parse_feed(body, window_start=start, window_end=end, calendar_tz="Europe/Berlin")
    finally:
        parse._FAST_READ = True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feeds", type=int, default=40)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--workload", type=Path, help="a bench-workload folder holding gen.py")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    anchor = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start, end = anchor - timedelta(days=30), anchor + timedelta(days=365)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "feeds"
        if args.workload:
            subprocess.run(
                [sys.executable, str(args.workload / "gen.py"), "--calendars", str(args.feeds),
                 "--events-per-cal", str(args.events), "--out", str(out)],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        else:
            generate_feeds(out, args.feeds, args.events, anchor)
        bodies = [p.read_bytes() for p in sorted(out.glob("*.ics"))]
    differ = 0
    totals = {True: 0.0, False: 0.0}
    instances = {True: 0, False: 0}
    for rnd in range(args.rounds):
        order = (True, False) if rnd % 2 == 0 else (False, True)
        for body in bodies:
            results = {}
            for reader in order:
                t0 = time.perf_counter()
                results[reader] = _parse(body, start, end, reader=reader)
                totals[reader] += time.perf_counter() - t0
                instances[reader] += len(results[reader].instances)
            a, b = results[True], results[False]
            if a.instances != b.instances or a.problems != b.problems:
                differ += 1
    n = len(bodies) * args.rounds
    ours, ical = totals[True] / n * 1000, totals[False] / n * 1000
    per_round = instances[True] // args.rounds
    print(f"{len(bodies)} feeds x {args.events} events, {args.rounds} rounds, {per_round} instances")
    print(f"icalendar reads everything: {ical:8.1f} ms/feed")
    print(f"plain-event reader:         {ours:8.1f} ms/feed   ({ical / ours:.2f}x)")
    if differ:
        print(f"DIFFERENT RESULTS for {differ} feed parses", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

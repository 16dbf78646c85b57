"""The ``almanac`` operator command: database migrations and demo data, outside Airflow.

    almanac db migrate            apply pending application-DB migrations
    almanac db status             list applied and pending migrations
    almanac demo load [options]   load deterministic demo data (idempotent)

The database is ``--db-url``, else ``ALMANAC_APP_DB_URL``, else ``AIRFLOW_CONN_APP_DB``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone

from almanac.errors import AlmanacError

__all__ = ["main"]


def _anchor(value: str) -> datetime:
    if value == "today":
        now = datetime.now(timezone.utc)
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="almanac", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", help="application DB URL (default: $ALMANAC_APP_DB_URL or $AIRFLOW_CONN_APP_DB)")
    groups = parser.add_subparsers(dest="group", required=True)

    db = groups.add_parser("db", help="application database").add_subparsers(dest="command", required=True)
    db.add_parser("migrate", help="apply pending migrations")
    db.add_parser("status", help="list applied and pending migrations")

    demo = groups.add_parser("demo", help="demo data").add_subparsers(dest="command", required=True)
    load = demo.add_parser("load", help="load deterministic demo data (rows already there are kept)")
    load.add_argument("--tenants", type=int, default=3)
    load.add_argument("--users-per-tenant", type=int, default=4)
    load.add_argument("--calendars-per-tenant", type=int, default=2)
    load.add_argument("--invitations-per-calendar", type=int, default=6)
    load.add_argument("--seed", type=int, default=42)
    load.add_argument(
        "--anchor", type=_anchor, default="today", help="'today' (UTC midnight) or an ISO 8601 instant"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from almanac.db.connect import connect

    try:
        conn = connect(args.db_url)
        try:
            return _run(args, conn)
        finally:
            conn.close()
    except AlmanacError as exc:
        print(f"almanac: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, conn) -> int:
    if (args.group, args.command) == ("db", "migrate"):
        from almanac.db.migrate import apply_migrations

        applied = apply_migrations(conn)
        print(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else "; schema is current"))
    elif (args.group, args.command) == ("db", "status"):
        from almanac.db.migrate import available_migrations

        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            exists = cur.fetchone()[0]
            applied = set()
            if exists:
                cur.execute("SELECT version FROM schema_migrations")
                applied = {row[0] for row in cur.fetchall()}
        for migration in available_migrations():
            state = "applied" if migration.version in applied else "pending"
            print(f"{migration.version:04d}_{migration.name}\t{state}")
    elif (args.group, args.command) == ("demo", "load"):
        from almanac.demo import DemoSpec, generate, load

        spec = DemoSpec(
            tenants=args.tenants,
            users_per_tenant=args.users_per_tenant,
            calendars_per_tenant=args.calendars_per_tenant,
            invitations_per_calendar=args.invitations_per_calendar,
            seed=args.seed,
            anchor=args.anchor,
        )
        inserted = load(conn, generate(spec))
        print("demo data: " + ", ".join(f"{table} +{n}" for table, n in inserted.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

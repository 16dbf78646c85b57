"""The ``almanac`` operator command: database migrations and demo data, outside Airflow.

    almanac db migrate            apply pending application-DB migrations
    almanac db status             list applied and pending migrations
    almanac demo load [options]   load deterministic demo data (idempotent)
    almanac ics inspect SOURCE    parse and expand a feed (URL or file): one JSON object per instance
    almanac ics sync CALENDAR_ID  the ics_sync DAG's sync of one calendar, outside Airflow
    almanac notifications stats   outbox rows per channel and status
    almanac notifications dead    dead and uncertain notifications, newest first (JSON lines)
    almanac notifications retry ID  send a dead, uncertain or failed notification again
    almanac notifications enqueue --user ID --channel C --body TEXT   put one message in the outbox
    almanac integrations list [--tenant ID]   connected accounts: state, refresh, health (JSON lines)
    almanac integrations reencrypt  re-encrypt every stored token with the first key (key rotation)
    almanac integrations retry [ID ...]  make `error` integrations (all, or these) due for refresh again

The database is ``--db-url``, else ``ALMANAC_APP_DB_URL``; Redis (leases) ``ALMANAC_REDIS_URL``.
Job settings: defaults, overridden by the JSON in ``AIRFLOW_VAR_ALMANAC_SETTINGS`` (the same
Variable the DAGs read). Feed hosts the address guard lets through: ``--allow-host`` or the
``ics_allow_hosts`` setting. Feeds are fetched exactly as the DAG fetches them
(``almanac.ics.fetch.fetch_with_settings``: same guard, limits and retries); retries are logged
on stderr as they happen, and an error ends the command with one ``almanac: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from almanac.errors import AlmanacError

__all__ = ["main"]


def _anchor(value: str) -> datetime:
    if value == "today":
        now = datetime.now(UTC)
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="almanac", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", help="application DB URL (default: $ALMANAC_APP_DB_URL)")
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

    ics = groups.add_parser("ics", help="ICS feeds").add_subparsers(dest="command", required=True)
    inspect = ics.add_parser("inspect", help="parse and expand a feed; one JSON object per instance")
    inspect.add_argument("source", help="http(s)/webcal URL (fetched through the address guard) or a file")
    inspect.add_argument("--start", type=_day, help="first day (default: 30 days ago)")
    inspect.add_argument("--end", type=_day, help="day after the last (default: 365 days ahead)")
    inspect.add_argument("--tz", default="UTC", help="zone for floating times (default UTC)")
    inspect.add_argument("--jsonl", action="store_true", help="JSON lines (the default; kept for scripts)")
    inspect.add_argument("--table", action="store_true", help="a human-readable table instead")
    inspect.add_argument(
        "--allow-host", action="append", default=[], help="let this host[:port] through the guard"
    )
    notes = groups.add_parser("notifications", help="the notification outbox").add_subparsers(
        dest="command", required=True
    )
    notes.add_parser("stats", help="rows per channel and status")
    dead = notes.add_parser("dead", help="dead and uncertain notifications, newest first")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--channel", choices=["email", "sms", "push"])
    again = notes.add_parser("retry", help="send a dead, uncertain or failed notification again")
    again.add_argument("notification_id", type=int)
    new = notes.add_parser("enqueue", help="put one message in the outbox (and wake the dispatcher)")
    new.add_argument("--user", type=int, help="the user it goes to (their address / number / devices)")
    new.add_argument("--to", help="an explicit email address or E.164 number instead")
    new.add_argument("--channel", choices=["email", "sms", "push"], required=True)
    new.add_argument("--subject")
    new.add_argument("--body", required=True)
    new.add_argument("--kind", default="manual")
    new.add_argument("--key", help="idempotency key (default: a new one, so each call is a new message)")
    new.add_argument("--tenant", type=int, help="default: the user's tenant")

    accounts = groups.add_parser("integrations", help="connected accounts").add_subparsers(
        dest="command", required=True
    )
    listing = accounts.add_parser("list", help="each integration's state (the view integration_states)")
    listing.add_argument("--tenant", type=int, help="only this tenant's")
    again_accounts = accounts.add_parser(
        "retry", help="make integrations in status error (all, or these ids) due for refresh at once"
    )
    again_accounts.add_argument("ids", nargs="*", type=int)
    accounts.add_parser(
        "reencrypt",
        help="re-encrypt every stored token with the first key of almanac_token_fernet_key "
        "(AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY = new_key,old_key); then the old key can go",
    )
    sync = ics.add_parser("sync", help="sync one calendar now, as the DAG does")
    sync.add_argument("calendar_id", type=int)
    sync.add_argument(
        "--allow-host", action="append", default=[], help="let this host[:port] through the guard"
    )
    return parser


def _day(value: str) -> date:
    return date.fromisoformat(value)


def _settings():
    """The job settings the DAGs would use: defaults overridden by ``AIRFLOW_VAR_ALMANAC_SETTINGS``."""
    from almanac.errors import ConfigError
    from almanac.settings import Settings

    raw = os.environ.get("AIRFLOW_VAR_ALMANAC_SETTINGS")
    try:
        overrides = json.loads(raw) if raw else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"AIRFLOW_VAR_ALMANAC_SETTINGS is not JSON ({exc})") from exc
    return Settings.from_mapping(overrides)


def _one_line(exc: BaseException) -> str:
    return "almanac: " + " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from almanac.db.connect import connect

    if (args.group, args.command) == ("ics", "inspect"):
        try:
            return _inspect(args)
        except AlmanacError as exc:
            print(_one_line(exc), file=sys.stderr)
            return 2
    try:
        conn = connect(args.db_url)
        try:
            return _run(args, conn)
        finally:
            conn.close()
    except AlmanacError as exc:
        print(_one_line(exc), file=sys.stderr)
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
    elif (args.group, args.command) == ("ics", "sync"):
        import socket
        from contextlib import nullcontext

        from almanac.batches import summarize_batch
        from almanac.db.redis_conn import connect_redis
        from almanac.ics.fetch import new_session
        from almanac.ics.sync import ICS_KIND, sync_batch
        from almanac.leases import LeaseKeeper

        settings = _settings()
        # The same leases as the DAGs, so a CLI sync never races a running one.
        keeper = (
            LeaseKeeper(
                connect_redis(), f"cli:{socket.gethostname()}:{os.getpid()}", ttl_s=settings.ics_lock_ttl_s
            )
            if os.environ.get("ALMANAC_REDIS_URL")
            else nullcontext(None)
        )
        with keeper as leases, new_session() as session:
            results = sync_batch(
                conn,
                [args.calendar_id],
                instant=datetime.now(UTC),
                settings=settings,
                leases=leases,
                session=session,
                allow_hosts=settings.ics_allow_host_set | frozenset(args.allow_host),
            )
        summary = summarize_batch(ICS_KIND, results, keep_unchanged=True)
        print(json.dumps(summary, indent=2))
        return 0 if summary["errorCount"] == 0 else 1
    elif args.group == "notifications":
        return _notifications(args, conn)
    elif args.group == "integrations":
        return _integrations(args, conn)
    return 0


def _integrations(args: argparse.Namespace, conn) -> int:
    from almanac.integrations import store

    if args.command == "list":
        for row in store.states(conn, tenant_id=args.tenant):
            print(json.dumps(row, default=str))
    elif args.command == "reencrypt":
        from almanac.google.crypto import TokenCipher

        keys = os.environ.get("AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY", "")
        done = store.reencrypt(conn, TokenCipher(keys))
        print(f"re-encrypted the tokens of {done} integration(s) with the first key")
    elif args.command == "retry":
        ids = store.retry_errored(conn, ids=args.ids or None, now=datetime.now(UTC))
        conn.commit()
        print(f"{len(ids)} integration(s) due for refresh again: {ids[:50]}")
    return 0


def _notifications(args: argparse.Namespace, conn) -> int:
    from almanac.notify import outbox

    if args.command == "stats":
        print(json.dumps(outbox.stats(conn), indent=2))
    elif args.command == "dead":
        for row in outbox.needing_attention(conn, limit=args.limit, channel=args.channel):
            print(json.dumps(row, default=str))
    elif args.command == "retry":
        try:
            was = outbox.retry(conn, args.notification_id)
        except (LookupError, ValueError) as exc:
            print(f"almanac: {exc}", file=sys.stderr)
            return 2
        print(f"notification {args.notification_id} ({was}) is due again now")
    elif args.command == "enqueue":
        import uuid

        tenant = args.tenant
        if tenant is None and args.user is not None:
            found = conn.execute("SELECT tenant_id FROM users WHERE id = %s", (args.user,)).fetchone()
            if found is None:
                print(f"almanac: no user {args.user}", file=sys.stderr)
                return 2
            tenant = found[0]
        if tenant is None:
            print("almanac: give --tenant with --to", file=sys.stderr)
            return 2
        try:
            note = outbox.NewNotification(
                tenant_id=tenant,
                channel=args.channel,
                kind=args.kind,
                idempotency_key=args.key or f"cli:{uuid.uuid4()}",
                body=args.body,
                user_id=args.user,
                recipient=args.to,
                subject=args.subject,
            )
        except ValueError as exc:
            print(f"almanac: {exc}", file=sys.stderr)
            return 2
        nid = outbox.enqueue(conn, note)
        conn.commit()
        if os.environ.get("ALMANAC_REDIS_URL"):
            from almanac.db.redis_conn import connect_redis
            from almanac.notify.wakeups import push_wakeup

            push_wakeup(connect_redis(), nid)
        print(f"notification {nid} ({note.idempotency_key}) is in the outbox")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from almanac.ics.parse import parse_feed

    today = datetime.now(UTC).date()
    start = args.start or today - timedelta(days=30)
    end = args.end or today + timedelta(days=365)
    window_start = datetime.combine(start, datetime.min.time(), UTC)
    window_end = datetime.combine(end, datetime.min.time(), UTC)
    settings = _settings()
    if "://" in args.source:
        from almanac.ics.fetch import fetch_with_settings

        # The DAG's fetch path and settings: guard, limits, redirects and retries alike.
        body = fetch_with_settings(args.source, settings, allow_hosts=frozenset(args.allow_host)).body
    else:
        try:
            body = Path(args.source).read_bytes()
        except OSError as exc:
            print(f"almanac: cannot read {args.source}: {exc.strerror}", file=sys.stderr)
            return 2
    result = parse_feed(
        body,
        window_start=window_start,
        window_end=window_end,
        calendar_tz=args.tz,
        **settings.ics_parse_limits,
    )
    # Problems go to stderr in both output modes, so stdout stays one row per instance.
    for problem in result.problems:
        print(f"almanac: warning: {' '.join(str(problem).split())}", file=sys.stderr)
    out = sys.stdout
    for inst in result.instances:
        row = {
            "uid": inst.uid,
            "recurrence_id": inst.recurrence_id or None,
            "start": inst.start.isoformat(),
            "end": inst.end.isoformat(),
            "all_day": inst.all_day,
            "summary": inst.summary,
            # As the feed states it, lower-cased (null when it states none), not the stored value.
            "status": inst.status_stated,
            "location": inst.location,
        }
        if args.table:
            status = row["status"] or "-"
            out.write(f"{row['start']:<26} {row['end']:<26} {status:<10} {row['summary'][:60]}\n")
        else:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

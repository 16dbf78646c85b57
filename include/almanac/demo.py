"""Deterministic demo data: N tenants with users, calendars, members and invitations.

Used by ``./dev up`` (demo data in the UI), the tests and the benchmarks. The same spec
always gives the same rows, ids included, so loading twice changes nothing. With a
``feed_base_url`` every demo calendar subscribes to its feed there
(``<base>/calendar-<id>.ics``, served by ``almanac.demo_feeds``); without one (tests,
benchmarks) calendars have no feed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

__all__ = ["DemoData", "DemoSpec", "feed_path", "generate", "load"]

_ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney", "America/Sao_Paulo"]
_FIRST = ["Ada", "Ben", "Chloé", "Dan", "Eva", "Finn", "Grace", "Hugo", "Iris", "Jon", "Kai", "Lena"]
_LAST = ["Lovelace", "Okafor", "Martin", "Nguyen", "Schmidt", "Tanaka", "Silva", "Moreau"]
_CALENDARS = ["Family", "School", "Football club", "Work shifts", "Choir", "Holidays"]


@dataclass(frozen=True)
class DemoSpec:
    tenants: int = 3
    users_per_tenant: int = 4
    calendars_per_tenant: int = 2
    invitations_per_calendar: int = 6
    seed: int = 42
    #: Instant the invitations are placed around (created up to 60 days before it).
    anchor: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    #: Where the demo feeds are served (e.g. ``http://127.0.0.1:58080``); None: no feed URLs.
    feed_base_url: str | None = None


def feed_path(calendar_id: int) -> str:
    """The path of a demo calendar's feed below ``feed_base_url`` (also its file name)."""
    return f"calendar-{calendar_id}.ics"


@dataclass
class DemoData:
    tenants: list[tuple] = field(default_factory=list)
    users: list[tuple] = field(default_factory=list)
    calendars: list[tuple] = field(default_factory=list)
    calendar_members: list[tuple] = field(default_factory=list)
    invitations: list[tuple] = field(default_factory=list)


def generate(spec: DemoSpec) -> DemoData:
    """The rows for ``spec``, as tuples in the column order ``load`` inserts them."""
    rng = random.Random(spec.seed)
    data = DemoData()
    user_id = calendar_id = invitation_id = 0
    for t in range(1, spec.tenants + 1):
        data.tenants.append((t, f"Demo tenant {t}"))
        members = []
        for _ in range(spec.users_per_tenant):
            user_id += 1
            name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
            channels = rng.choice([["email"], ["sms", "email"], ["email", "push"]])
            phone = f"+1555{user_id:07d}" if "sms" in channels else None
            data.users.append(
                (user_id, t, name, f"user{user_id}@demo.almanac.test", phone, rng.choice(_ZONES), channels)
            )
            members.append(user_id)
        for c in range(spec.calendars_per_tenant):
            calendar_id += 1
            source_url = None
            if spec.feed_base_url:
                source_url = f"{spec.feed_base_url.rstrip('/')}/{feed_path(calendar_id)}"
            data.calendars.append(
                (calendar_id, t, f"{_CALENDARS[c % len(_CALENDARS)]} ({t})", rng.choice(_ZONES), source_url)
            )
            for i, member in enumerate(members):
                data.calendar_members.append((calendar_id, member, "owner" if i == 0 else "member"))
            for _ in range(spec.invitations_per_calendar):
                invitation_id += 1
                created = spec.anchor - timedelta(minutes=rng.randrange(60 * 24 * 60))
                lifetime = timedelta(hours=rng.randrange(24, 24 * 45))
                expires = None if rng.random() < 0.5 else created + lifetime
                status = rng.choices(["pending", "accepted", "declined"], weights=[7, 2, 1])[0]
                responded = None if status == "pending" else created + timedelta(hours=rng.randrange(1, 72))
                data.invitations.append(
                    (
                        invitation_id,
                        calendar_id,
                        members[0],
                        f"guest{invitation_id}@demo.almanac.test",
                        f"demo-{spec.seed}-{rng.getrandbits(64):016x}",
                        status,
                        created,
                        expires,
                        responded,
                    )
                )
    return data


_INSERTS = {
    "tenants": "INSERT INTO tenants (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
    "users": "INSERT INTO users (id, tenant_id, name, email, phone, time_zone, contact_channels) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
    # A demo calendar loaded earlier without a feed gets the demo feed; a URL already set is kept.
    "calendars": "INSERT INTO calendars (id, tenant_id, name, time_zone, source_url) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET source_url = EXCLUDED.source_url "
    "WHERE calendars.source_url IS NULL AND EXCLUDED.source_url IS NOT NULL",
    "calendar_members": "INSERT INTO calendar_members (calendar_id, user_id, role) "
    "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
    "invitations": "INSERT INTO invitations (id, calendar_id, inviter_id, invitee_email, token, status, "
    "created_at, expires_at, responded_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT DO NOTHING",
}
_SEQUENCES = ["tenants", "users", "calendars", "invitations"]


def load(conn, data: DemoData) -> dict[str, int]:
    """Insert ``data`` in one transaction (commits); rows already there are left alone, except
    that a calendar without a feed URL gets the one ``data`` has.

    Returns the number of rows inserted (or given a feed URL) per table; all zero on a second load.
    """
    inserted: dict[str, int] = {}
    try:
        with conn.cursor() as cur:
            for table, sql in _INSERTS.items():
                rows = getattr(data, table)
                if rows:
                    cur.executemany(sql, rows)  # psycopg pipelines these; rowcount sums them
                inserted[table] = cur.rowcount if rows else 0
            for table in _SEQUENCES:
                # Keep the serial sequences ahead of the explicit demo ids.
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"GREATEST((SELECT max(id) FROM {table}), 1))"
                )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return inserted

from __future__ import annotations

from almanac.db.migrate import available_migrations


def test_migrations_are_numbered_without_gaps():
    versions = [m.version for m in available_migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_foundation_creates_the_contract_tables():
    sql = available_migrations()[0].sql
    for table in ("tenants", "users", "calendars", "calendar_members", "events", "invitations"):
        assert f"CREATE TABLE {table} (" in sql

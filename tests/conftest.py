"""Shared fixtures: the real application DB and Redis that ``./dev test`` provisions."""

from __future__ import annotations

import os

import psycopg
import pytest


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the tests through `./dev test` (README, 'Tests')", pytrace=False)
    return value


@pytest.fixture(scope="session")
def app_db_url() -> str:
    return _required_env("ALMANAC_APP_DB_URL")


@pytest.fixture(scope="session")
def migrated(app_db_url: str) -> str:
    from almanac.db.migrate import apply_migrations

    with psycopg.connect(app_db_url) as conn:
        apply_migrations(conn)
    return app_db_url


@pytest.fixture
def db(migrated: str):
    """A connection to an empty application DB (every table but ``schema_migrations`` truncated)."""
    with psycopg.connect(migrated) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT quote_ident(tablename) FROM pg_tables"
                " WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
            )
        ]
        conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        conn.commit()
        yield conn


@pytest.fixture
def redis_client():
    import redis

    client = redis.Redis.from_url(_required_env("ALMANAC_REDIS_URL"))
    client.flushdb()
    yield client
    client.close()

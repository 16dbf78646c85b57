"""Versioned schema migrations for the application DB: numbered SQL files, applied once each.

``migrations/NNNN_name.sql`` files are applied in number order, each in its own transaction
together with its row in ``schema_migrations``. A session-level advisory lock makes two
concurrent runs (say, two containers starting) apply each file exactly once. A file already
applied whose text has since changed is refused: migrations are append-only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from almanac.errors import ConfigError

__all__ = ["Migration", "apply_migrations", "available_migrations"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x616C6D61  # "alma": advisory lock id for migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """Every migration shipped in ``almanac/db/migrations``, in version order."""
    found = []
    for entry in resources.files("almanac.db").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"duplicate migration numbers in {versions}")
    return found


def apply_migrations(conn, migrations: list[Migration] | None = None) -> list[int]:
    """Apply what is not applied yet; return the versions applied by this call.

    Parameters:
        conn: a psycopg connection; it is committed after each migration.
        migrations: defaults to ``available_migrations()``.
    Raises:
        ConfigError: an applied migration's file was edited afterwards.
    """
    migrations = available_migrations() if migrations is None else migrations
    applied_now: list[int] = []
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version    integer PRIMARY KEY,
                    name       text        NOT NULL,
                    checksum   text        NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            cur.execute("SELECT version, checksum FROM schema_migrations")
            done = dict(cur.fetchall())
        conn.commit()
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise ConfigError(
                        f"migration {migration.version:04d}_{migration.name} was edited after it was "
                        "applied; add a new migration instead"
                    )
                continue
            with conn.cursor() as cur:
                cur.execute(migration.sql)
                cur.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            conn.commit()
            log.info("applied migration %04d_%s", migration.version, migration.name)
            applied_now.append(migration.version)
    except BaseException:
        conn.rollback()
        raise
    finally:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
        conn.commit()
    return applied_now

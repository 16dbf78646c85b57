from __future__ import annotations

import psycopg
import pytest

from almanac.db.migrate import Migration, apply_migrations, available_migrations
from almanac.errors import ConfigError


def test_applying_twice_applies_nothing_the_second_time(db):
    assert apply_migrations(db) == []  # the session fixture already migrated
    versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in available_migrations()]


def test_an_edited_applied_migration_is_refused(db):
    first = available_migrations()[0]
    edited = Migration(first.version, first.name, first.sql + "\n-- edited")
    with pytest.raises(ConfigError, match="edited after it was applied"):
        apply_migrations(db, [edited])


def test_a_failing_migration_leaves_no_trace(db):
    broken = Migration(9999, "broken", "CREATE TABLE t_9999 (id int); SELECT no_such_function();")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        apply_migrations(db, [*available_migrations(), broken])
    assert db.execute("SELECT to_regclass('t_9999')").fetchone()[0] is None
    assert db.execute("SELECT count(*) FROM schema_migrations WHERE version = 9999").fetchone()[0] == 0

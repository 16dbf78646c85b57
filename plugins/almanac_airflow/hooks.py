"""Connections to the application DB and Redis, through Airflow's connections.

``app_db`` (Postgres provider) and ``redis_default`` (Redis provider): set by
``AIRFLOW_CONN_*`` in dev and CI, by the UI or a secrets backend in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["APP_DB_CONN_ID", "REDIS_CONN_ID", "app_db", "redis_client"]

APP_DB_CONN_ID = "app_db"
REDIS_CONN_ID = "redis_default"


@contextmanager
def app_db() -> Iterator:
    """A psycopg (3) connection to the application DB, closed on exit (commit is the caller's)."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=APP_DB_CONN_ID).get_conn()
    try:
        yield conn
    finally:
        conn.close()


def redis_client():
    """A redis-py client for ``redis_default``."""
    from airflow.providers.redis.hooks.redis import RedisHook

    return RedisHook(redis_conn_id=REDIS_CONN_ID).get_conn()

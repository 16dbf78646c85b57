"""Connections to the application DB and Redis, through Airflow's connections.

``app_db`` and ``redis_default``: set by ``AIRFLOW_CONN_*`` in dev and CI, by the UI or a
secrets backend in production. Airflow resolves the connection; the client is opened by the
one domain path (``almanac.db.connect``, ``almanac.db.redis_conn``), so tasks, triggers and
the CLI get the same driver and options.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["APP_DB_CONN_ID", "REDIS_CONN_ID", "app_db", "async_redis_client", "redis_client"]

APP_DB_CONN_ID = "app_db"
REDIS_CONN_ID = "redis_default"


def _uri(conn) -> str:
    return conn.get_uri()


def _connection(conn_id: str):
    from airflow.sdk import BaseHook

    from almanac.errors import ConfigError

    try:
        return BaseHook.get_connection(conn_id)
    except Exception as exc:  # AirflowNotFoundException and friends: say which connection
        raise ConfigError(f"Airflow connection {conn_id!r} is not defined (README, 'Connections')") from exc


@contextmanager
def app_db(conn_id: str = APP_DB_CONN_ID) -> Iterator:
    """A psycopg (3) connection to the application DB, closed on exit (commit is the caller's)."""
    from almanac.db.connect import connect

    conn = connect(_uri(_connection(conn_id)))
    try:
        yield conn
    finally:
        conn.close()


def redis_client(conn_id: str = REDIS_CONN_ID, **options: Any):
    """A redis-py client for ``redis_default``."""
    from almanac.db.redis_conn import connect_redis

    return connect_redis(_uri(_connection(conn_id)), **options)


async def async_redis_client(conn_id: str = REDIS_CONN_ID, **options: Any):
    """A ``redis.asyncio`` client for ``redis_default``, looked up without blocking the event loop."""
    from airflow.sdk import BaseHook

    from almanac.db.redis_conn import connect_redis_async
    from almanac.errors import ConfigError

    try:
        conn = await BaseHook.aget_connection(conn_id)
    except Exception as exc:
        raise ConfigError(f"Airflow connection {conn_id!r} is not defined (README, 'Connections')") from exc
    return connect_redis_async(_uri(conn), **options)

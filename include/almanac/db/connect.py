"""Opening connections to the application database from a URL (outside Airflow)."""

from __future__ import annotations

import os

import psycopg

from almanac.errors import ConfigError

__all__ = ["app_db_url", "connect"]


def app_db_url(url: str | None = None) -> str:
    """The application DB URL: ``url``, else ``ALMANAC_APP_DB_URL``, else ``AIRFLOW_CONN_APP_DB``.

    The last is the same URI Airflow reads for the ``app_db`` connection, so the CLI and
    the DAGs find the same database without a second setting.
    """
    found = url or os.environ.get("ALMANAC_APP_DB_URL") or os.environ.get("AIRFLOW_CONN_APP_DB")
    if not found:
        raise ConfigError("no application database: set ALMANAC_APP_DB_URL or AIRFLOW_CONN_APP_DB")
    if found.startswith("postgres://"):  # Airflow accepts this spelling; libpq wants postgresql://
        found = "postgresql://" + found.removeprefix("postgres://")
    return found


def connect(url: str | None = None) -> psycopg.Connection:
    """A new psycopg (3) connection, autocommit off, to the application DB.

    psycopg 3 is also what the Postgres provider's hook returns under SQLAlchemy 2, so the
    domain code sees the same driver inside and outside Airflow.
    """
    return psycopg.connect(app_db_url(url), application_name="almanac")

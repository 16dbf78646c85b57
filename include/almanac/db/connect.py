"""The one way Almanac opens a connection to the application database, from a URL.

Inside Airflow the URL comes from the ``app_db`` connection (``almanac_airflow.hooks.app_db``);
outside it (the ``almanac`` CLI, benchmarks) from ``--db-url`` or ``ALMANAC_APP_DB_URL``.
Both end here, so every caller gets the same driver, options and ``application_name``.

Transactions: a function that takes ``conn`` runs inside the caller's transaction and does
not commit, unless its docstring says "Commits". The job entry points that work item by item
(``sync_batch``, ``push_batch``) say so: they commit per item so one item's failure keeps the
others' work.
"""

from __future__ import annotations

import os

import psycopg

from almanac.errors import ConfigError

__all__ = ["app_db_url", "connect"]


def app_db_url(url: str | None = None) -> str:
    """The application DB URL outside Airflow: ``url``, else ``ALMANAC_APP_DB_URL``."""
    found = url or os.environ.get("ALMANAC_APP_DB_URL")
    if not found:
        raise ConfigError("no application database: pass --db-url or set ALMANAC_APP_DB_URL")
    return found


def connect(url: str | None = None, *, application_name: str = "almanac") -> psycopg.Connection:
    """A new psycopg (3) connection to the application DB, autocommit off.

    ``url`` is a libpq URL; Airflow's ``postgres://`` spelling is accepted.
    """
    dsn = app_db_url(url)
    if dsn.startswith("postgres://"):  # Airflow's spelling; libpq wants postgresql://
        dsn = "postgresql://" + dsn.removeprefix("postgres://")
    return psycopg.connect(dsn, application_name=application_name, connect_timeout=10)

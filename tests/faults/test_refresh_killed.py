"""SIGKILL of an oauth_token_refresh task in the middle of its batch, while one refresh waits on a
slow provider: the retry of the same task instance takes the leases over at once, refreshes only
what the dead try had not stored, the run ends in a state and summary that say so, and no lease
outlives the run."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from almanac.google.crypto import TokenCipher
from almanac.integrations import store
from almanac.integrations.fakes import FakeOAuthProvider
from tests.e2e.conftest import wait_for
from tests.faults.helpers import connected_to, kill_task_process, lease_keys

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

USERS = 12
SLOW = 6  # this user's grant answers after the provider's slow_seconds: where the task dies


@pytest.fixture
def acme(airflow, airflow_stack):
    with FakeOAuthProvider(client_id="almanac-faults", client_secret="s3cret", slow_seconds=8) as fake:
        airflow.set_connection(
            "oauth_acme",
            conn_type="generic",
            login="almanac-faults",
            password="s3cret",
            extra=json.dumps({"token_url": fake.token_url, "health_url": fake.userinfo_url}),
        )
        fake.cipher = TokenCipher(airflow_stack["AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY"])
        yield fake


def test_refresh_task_killed_mid_batch_is_retried_and_stores_every_refresh_once(
    db, app_db_url, airflow, dag_on, acme, redis_conn
):
    # One batch, one refresh at a time, so the dead try has stored the first ones and not the rest.
    airflow.set_settings(oauth_parallel_requests=1)
    dag_on("oauth_token_refresh")
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    tokens = {}
    for user_id in range(1, USERS + 1):
        db.execute(
            "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
            (user_id, f"u{user_id}", f"u{user_id}@x.test"),
        )
        tokens[user_id] = acme.grant(f"u{user_id}", prefix="slow-" if user_id == SLOW else "")
        # Valid for an hour: no scheduled run finds them due; the asked-for run refreshes them.
        store.connect(
            db,
            acme.cipher,
            tenant_id=1,
            user_id=user_id,
            provider="acme",
            refresh_token=tokens[user_id],
            access_token=acme.state.issue_access_token(f"u{user_id}"),
            expires_at=datetime.now(UTC) + timedelta(hours=1),
            now=datetime.now(UTC),
        )
    db.commit()

    ids = [row[0] for row in db.execute("SELECT id FROM integrations ORDER BY id").fetchall()]
    db.commit()
    run_id = airflow.trigger("oauth_token_refresh", {"integration_ids": ids})
    ti, proc = airflow.wait_running_process("oauth_token_refresh", run_id, "refresh_batch", 0)
    wait_for(
        lambda: acme.state.refreshes(tokens[SLOW]) == 1 and connected_to(proc, acme.port),
        timeout=120,
        interval=0.1,
        what="the task to be waiting on the slow refresh",
    )
    assert f"almanac:lease:oauth_refresh:{ids[SLOW - 1]}" in lease_keys(redis_conn)
    kill_task_process(proc)  # the provider refreshed SLOW's grant; its answer is never stored
    with psycopg.connect(app_db_url) as conn:
        stored_at_kill = {
            r[0] for r in conn.execute("SELECT id FROM integrations WHERE last_refresh_at IS NOT NULL")
        }
    assert ids[: SLOW - 1] == sorted(stored_at_kill)  # the ones before SLOW, one at a time

    run = airflow.wait_finished("oauth_token_refresh", run_id, timeout=300)
    tries = airflow.tries("oauth_token_refresh", run_id, "refresh_batch", 0)
    assert run.state == "success", [(t.try_number, t.state) for t in tries]
    assert [t.try_number for t in tries] == [1, 2] and tries[-1].state == "success"

    # Each grant refreshed once — SLOW twice: its first answer died with the task.
    assert {u: acme.state.refreshes(tokens[u]) for u in tokens} == {u: 2 if u == SLOW else 1 for u in tokens}
    with psycopg.connect(app_db_url) as conn:
        rows = conn.execute("SELECT status, last_refresh_at IS NOT NULL FROM integrations").fetchall()
    assert rows == [("active", True)] * USERS
    # The retry's summary: what it refreshed, and what the dead try had already stored (unchanged).
    total = airflow.summary("oauth_token_refresh", run_id)
    assert total["totalIntegrations"] == USERS and total["successCount"] == USERS
    assert total["refreshed"] == USERS - len(stored_at_kill) and total["complete"] is True
    wait_for(lambda: not lease_keys(redis_conn), timeout=35, interval=0.5, what="every lease to be gone")

"""oauth_token_refresh and integration_health run in-process with ``dag.test()`` against the real
databases, Redis and a local OAuth 2 provider configured as the Airflow connection ``oauth_acme``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from almanac.google.crypto import TokenCipher, generate_key
from almanac.integrations import store
from almanac.integrations.fakes import FakeOAuthProvider

LOGICAL = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)  # the run covering [12:00, 12:01)


def _dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=f"dags/{dag_id}.py")
    assert not bag.import_errors
    return bag.get_dag(dag_id)


def _total(run, task_id: str = "summarize"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id, key="total")
        return [XComModel.deserialize_value(row) for row in session.scalars(query)][0]


@pytest.fixture
def acme(db, monkeypatch):
    """The provider as connection ``oauth_acme``; tenant 1 with users 1..4 (1 owns the tenant)."""
    with FakeOAuthProvider(client_id="almanac", client_secret="s3cret") as fake:
        monkeypatch.setenv(
            "AIRFLOW_CONN_OAUTH_ACME",
            json.dumps(
                {
                    "conn_type": "generic",
                    "login": "almanac",
                    "password": "s3cret",
                    "extra": {"token_url": fake.token_url, "health_url": fake.userinfo_url},
                }
            ),
        )
        key = generate_key()
        monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY", key)
        fake.cipher = TokenCipher(key)
        db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
        for user_id in (1, 2, 3, 4):
            db.execute(
                "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
                (user_id, f"u{user_id}", f"u{user_id}@x.test"),
            )
        db.execute("UPDATE tenants SET owner_user_id = 1")
        db.commit()
        yield fake


def _connect(db, acme, user_id: int, *, expires_at: datetime | None, prefix: str = "") -> int:
    subject = f"u{user_id}"
    access = acme.state.issue_access_token(subject) if expires_at else None
    integration_id = store.connect(
        db,
        acme.cipher,
        tenant_id=1,
        user_id=user_id,
        provider="acme",
        refresh_token=acme.grant(subject, prefix=prefix),
        access_token=access,
        expires_at=expires_at,
        now=LOGICAL - timedelta(hours=1),
    )
    db.commit()
    return integration_id


def _status(db, integration_id) -> tuple:
    row = db.execute(
        "SELECT status, health_status, last_refresh_at IS NOT NULL FROM integrations WHERE id = %s",
        (integration_id,),
    ).fetchone()
    db.commit()
    return row


def test_a_scheduled_run_refreshes_what_expires_before_its_interval_end_plus_lead_once(db, acme):
    due = _connect(db, acme, 1, expires_at=LOGICAL + timedelta(minutes=4))  # 12:04 < 12:01 + 5 min
    not_due = _connect(db, acme, 2, expires_at=LOGICAL + timedelta(minutes=10))
    failing = _connect(db, acme, 3, expires_at=LOGICAL, prefix="unavailable-")
    dag = _dag("oauth_token_refresh")

    run = dag.test(logical_date=LOGICAL)

    # One of the two due failed: 50% > the 20% alert threshold, so the run fails (the notifier
    # alerts) and its summary says what happened; the batch is not retried for it.
    assert run.state == "failed"
    states = {ti.task_id: (ti.state, ti.try_number) for ti in run.get_task_instances()}
    assert states["refresh_batch"] == ("success", 1) and states["summarize"][0] == "failed"
    total = _total(run)
    assert (total["totalIntegrations"], total["refreshed"], total["failed"]) == (2, 1, 1)
    assert _status(db, due) == ("active", None, True)
    assert _status(db, not_due) == ("active", None, False)
    assert _status(db, failing)[0] == "expired"
    assert acme.state.refreshes() == 1
    # The same window again (a rerun, a backfill): nothing refreshed twice, the failed one waits.
    again = dag.test(logical_date=LOGICAL)
    total = _total(again)
    assert again.state == "success" and total["refreshed"] == 0 and acme.state.refreshes() == 1
    assert total["totalIntegrations"] == 0  # the failed one waits out its backoff (next_refresh_at)


def test_the_integration_id_param_refreshes_that_one_now_whether_due_or_not(db, acme):
    wanted = _connect(db, acme, 1, expires_at=LOGICAL + timedelta(days=1))
    other = _connect(db, acme, 2, expires_at=LOGICAL)  # due, but not asked for
    run = _dag("oauth_token_refresh").test(logical_date=LOGICAL, run_conf={"integration_id": wanted})
    assert run.state == "success"
    assert _status(db, wanted)[2] is True and _status(db, other)[2] is False


def test_requested_at_skips_what_was_refreshed_since(db, acme):
    wanted = _connect(db, acme, 1, expires_at=LOGICAL + timedelta(days=1))
    dag = _dag("oauth_token_refresh")
    first = dag.test(logical_date=LOGICAL, run_conf={"integration_ids": [wanted], "requested_at": None})
    assert first.state == "success" and acme.state.refreshes() == 1
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()  # before that refresh: served
    again = dag.test(logical_date=LOGICAL, run_conf={"integration_ids": [wanted], "requested_at": since})
    assert again.state == "success" and acme.state.refreshes() == 1
    assert _total(again)["successCount"] == 1 and _total(again)["refreshed"] == 0


def test_the_health_sweep_records_each_state_and_triggers_a_refresh_for_the_expired(db, acme):
    healthy = _connect(db, acme, 1, expires_at=datetime.now(UTC) + timedelta(hours=1))
    expired = _connect(db, acme, 2, expires_at=datetime.now(UTC) + timedelta(hours=1))
    acme.expire_access_tokens("u2")
    also_healthy = _connect(db, acme, 3, expires_at=datetime.now(UTC) + timedelta(hours=1))

    run = _dag("integration_health").test(logical_date=datetime.now(UTC) - timedelta(hours=4))

    total = _total(run)
    assert total["healthy"] == 2 and total["expired"] == 1
    changes = {r["integrationId"]: (r.get("healthFrom"), r.get("healthTo")) for r in total["results"]}
    assert changes[expired] == (None, "expired") and changes[healthy] == (None, "healthy")
    assert _status(db, expired)[:2] == ("expired", "expired")
    assert _status(db, also_healthy)[1] == "healthy"
    assert run.state == "success"


def test_a_health_run_whose_batches_fail_is_failed_although_the_refresh_trigger_runs(db, acme, monkeypatch):
    _connect(db, acme, 1, expires_at=datetime.now(UTC) + timedelta(hours=1))
    monkeypatch.delenv("AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY")  # every check batch fails
    run = _dag("integration_health").test(logical_date=datetime.now(UTC) - timedelta(hours=4))
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "failed", states
    assert states["summarize"] == "failed" and states["refresh_expired"] == "skipped"

"""oauth_token_refresh and integration_health with real Airflow, as a platform engineer drives them:
the provider configured as connection ``oauth_acme`` over the REST API (a local OAuth 2 provider
over real HTTP), runs triggered over the REST API and from Redis, results checked in the DB, in
the runs' ``summarize`` XComs and in what the provider was asked."""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import redis

from almanac.google.crypto import TokenCipher
from almanac.integrations import store
from almanac.integrations.fakes import FakeOAuthProvider
from almanac.integrations.requests import DEAD_LETTER_STREAM, STREAM_KEY, push_refresh_request
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e
REFRESH = "oauth_token_refresh"
HEALTH = "integration_health"
CLIENT_ID = "almanac-e2e"


# --- REST helpers ----------------------------------------------------------------------------


def _state(run) -> str:
    return getattr(run.state, "value", run.state)


def _wait_run(runs, dag_id: str, run_id: str, timeout: float = 180):
    def finished():
        run = runs.get_dag_run(dag_id, run_id)
        return run if _state(run) in ("success", "failed") else None

    return wait_for(finished, timeout=timeout, interval=1, what=f"{dag_id} run {run_id} to finish")


def _trigger(runs, dag_id: str, conf: dict | None = None) -> str:
    from airflow_client.client.models import TriggerDAGRunPostBody

    return runs.trigger_dag_run(dag_id, TriggerDAGRunPostBody(logical_date=None, conf=conf or {})).dag_run_id


def _total(api_client, dag_id: str, run_id: str) -> dict:
    from airflow_client.client.api.x_com_api import XComApi

    entry = XComApi(api_client).get_xcom_entry(dag_id, "summarize", run_id, "return_value", deserialize=True)
    return entry.actual_instance.value


def _results(total: dict) -> dict[int, dict]:
    """The listed items of a run total by id (``unchanged`` items without detail are only counted)."""
    return {r["integrationId"]: r for r in total["results"]}


def _pause(api_client, dag_id: str, paused: bool = True) -> None:
    from airflow_client.client.api.dag_api import DAGApi
    from airflow_client.client.models import DAGPatchBody

    DAGApi(api_client).patch_dag(dag_id, DAGPatchBody(is_paused=paused))


def _quiesce(api_client, runs, dag_id: str) -> None:
    """Pause ``dag_id`` once none of its runs is queued or running (the scheduler does not move a
    paused Dag's runs on, so pausing first could strand one)."""

    def idle():
        return all(_state(r) in ("success", "failed") for r in runs.get_dag_runs(dag_id, limit=100).dag_runs)

    wait_for(idle, timeout=120, interval=1, what=f"{dag_id} runs to finish")
    _pause(api_client, dag_id)


# --- the provider and the integrations ----------------------------------------------------------


@pytest.fixture(scope="module")
def provider(api_client):
    """A local OAuth 2 provider, configured the way a platform engineer does: connection
    ``oauth_acme`` created over the REST API (client id/secret, token and health URLs); deleted,
    and both DAGs paused, at the end."""
    from airflow_client.client.api.connection_api import ConnectionApi
    from airflow_client.client.exceptions import NotFoundException
    from airflow_client.client.models import ConnectionBody

    connections = ConnectionApi(api_client)
    client_secret = secrets.token_urlsafe(16)
    with FakeOAuthProvider(client_id=CLIENT_ID, client_secret=client_secret) as fake:
        with contextlib.suppress(NotFoundException):  # left over by an interrupted run
            connections.delete_connection("oauth_acme")
        connections.post_connection(
            ConnectionBody(
                connection_id="oauth_acme",
                conn_type="generic",
                login=CLIENT_ID,
                password=client_secret,
                extra=json.dumps({"token_url": fake.token_url, "health_url": fake.userinfo_url}),
            )
        )
        try:
            yield fake
        finally:
            for dag_id in (REFRESH, HEALTH):
                with contextlib.suppress(Exception):
                    _pause(api_client, dag_id)
            with contextlib.suppress(NotFoundException):
                connections.delete_connection("oauth_acme")


@dataclass
class Acme:
    fake: FakeOAuthProvider
    cipher: TokenCipher
    db: object

    def connect(self, user_id: int, *, refreshable: bool = True) -> tuple[int, str | None, str]:
        """Integration ``acme`` of user ``user_id`` (subject ``u<id>``), as after the consent: a
        refresh token (unless not ``refreshable``) and an access token valid for an hour, so no
        scheduled run finds it due. Returns (id, refresh token, access token).

        Recorded as health-checked now: integration_health's scheduled run (created when the Dag
        is unpaused, checking what was not checked since its interval end, hours ago) leaves it
        alone; a run triggered later checks it."""
        subject = f"u{user_id}"
        refresh = self.fake.grant(subject) if refreshable else None
        access = self.fake.state.issue_access_token(subject)
        now = datetime.now(UTC)
        integration_id = store.connect(
            self.db,
            self.cipher,
            tenant_id=1,
            user_id=user_id,
            provider="acme",
            refresh_token=refresh,
            access_token=access,
            expires_at=now + timedelta(seconds=self.fake.state.access_token_ttl),
            account_subject=subject,
            now=now,
        )
        self.db.execute(
            "UPDATE integrations SET last_health_check_at = now() WHERE id = %s", (integration_id,)
        )
        self.db.commit()
        return integration_id, refresh, access

    def rows(self, *ids: int) -> dict[int, store.Integration]:
        found = store.load(self.db, ids)
        self.db.commit()
        return found

    def health(self, integration_id: int) -> str | None:
        row = self.db.execute(
            "SELECT health_status FROM integrations WHERE id = %s", (integration_id,)
        ).fetchone()
        self.db.commit()
        return row[0]


@pytest.fixture
def acme(db, provider, airflow_stack):
    """Tenant 1 with users 1..3 (1 owns the tenant), the provider's memory cleared."""
    provider.state.reset()
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for user_id in (1, 2, 3):
        db.execute(
            "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
            (user_id, f"u{user_id}", f"u{user_id}@example.com"),
        )
    db.execute("UPDATE tenants SET owner_user_id = 1")
    db.commit()
    return Acme(provider, TokenCipher(airflow_stack["AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY"]), db)


@pytest.fixture
def dag_runs(acme, api_client, wait_for_dag):
    """Both DAGs parsed and unpaused (after ``acme`` emptied the DB), and a DagRunApi."""
    from airflow_client.client.api.dag_run_api import DagRunApi

    wait_for_dag(REFRESH)
    wait_for_dag(HEALTH)
    return DagRunApi(api_client)


# --- the tests ----------------------------------------------------------------------------------


def test_a_rest_trigger_refreshes_the_asked_integration_once_per_request(acme, dag_runs, api_client):
    runs = dag_runs
    wanted, wanted_refresh, _ = acme.connect(1)
    others = [acme.connect(2)[0], acme.connect(3)[0]]
    before = acme.rows(wanted, *others)

    # Two requests at once (the second queued behind the first, max_active_runs=1): one refresh
    # serves both, because the second was asked before the first refreshed (its run_after).
    first = _trigger(runs, REFRESH, {"integration_id": wanted})
    second = _trigger(runs, REFRESH, {"integration_id": wanted})
    totals = []
    for run_id in (first, second):
        assert _state(_wait_run(runs, REFRESH, run_id)) == "success"
        totals.append(_total(api_client, REFRESH, run_id))
    assert [t["totalIntegrations"] for t in totals] == [1, 1]
    assert sorted(t["refreshed"] for t in totals) == [0, 1]
    assert all(t["successCount"] == 1 and t["complete"] for t in totals)
    assert acme.fake.state.refreshes() == acme.fake.state.refreshes(wanted_refresh) == 1, (
        acme.fake.state.token_requests, totals
    )

    after = acme.rows(wanted, *others)
    assert after[wanted].status == "active" and after[wanted].last_refresh_at is not None
    assert after[wanted].access_token_enc != before[wanted].access_token_enc
    assert after[wanted].next_refresh_at > before[wanted].next_refresh_at
    for other in others:  # not asked for, not due: untouched
        assert after[other].last_refresh_at is None
        assert after[other].access_token_enc == before[other].access_token_enc

    # A request made after that refresh is a new one: refreshed again.
    third = _trigger(runs, REFRESH, {"integration_id": wanted})
    assert _state(_wait_run(runs, REFRESH, third)) == "success"
    total = _total(api_client, REFRESH, third)
    assert (total["totalIntegrations"], total["refreshed"], total["successCount"]) == (1, 1, 1)
    assert total["results"] == []  # refreshed ones are counted, not listed
    assert acme.fake.state.refreshes(wanted_refresh) == 2
    assert acme.rows(wanted)[wanted].last_refresh_at > after[wanted].last_refresh_at


def test_a_bad_integration_id_is_refused_at_trigger_time(acme, api_client):
    from airflow_client.client.api.dag_run_api import DagRunApi
    from airflow_client.client.exceptions import BadRequestException

    runs = DagRunApi(api_client)
    wait_for(lambda: _dag_parsed(api_client, REFRESH), timeout=180, what=f"DAG {REFRESH} to be parsed")
    bad_confs = [{"integration_id": "abc"}, {"integration_id": -1}, {"integration_ids": [0]}]
    for conf in bad_confs:
        with pytest.raises(BadRequestException) as refused:
            _trigger(runs, REFRESH, conf)
        assert refused.value.status == 400, conf
    confs = [r.conf for r in runs.get_dag_runs(REFRESH, limit=100).dag_runs]
    assert not [c for c in confs if c in bad_confs]  # no run was created for any of them
    assert acme.fake.state.token_requests == []


def _dag_parsed(api_client, dag_id: str) -> bool:
    from airflow_client.client.api.dag_api import DAGApi
    from airflow_client.client.exceptions import NotFoundException

    try:
        return bool(DAGApi(api_client).get_dag(dag_id))
    except NotFoundException:
        return False


def test_a_redis_request_starts_a_refresh_and_a_malformed_one_is_dead_lettered(
    acme, dag_runs, api_client, airflow_stack
):
    runs = dag_runs
    wanted, wanted_refresh, _ = acme.connect(1)
    other, _, _ = acme.connect(2)
    client = redis.Redis.from_url(airflow_stack["ALMANAC_REDIS_URL"], decode_responses=True)
    try:
        newest = client.xrevrange(DEAD_LETTER_STREAM, count=1)
        start = f"({newest[0][0]}" if newest else "-"
        pushed_at = datetime.now(UTC) - timedelta(seconds=1)
        bad = client.xadd(STREAM_KEY, {"integration_id": "abc"})  # what a buggy producer writes
        push_refresh_request(client, wanted)

        def dead_lettered():
            return [f for _, f in client.xrange(DEAD_LETTER_STREAM, min=start) if f.get("entry_id") == bad]

        refreshed_at = wait_for(
            lambda: acme.rows(wanted)[wanted].last_refresh_at,
            timeout=150,
            interval=1,
            what="the requested integration to be refreshed",
        )
        letters = wait_for(
            dead_lettered, timeout=60, interval=1, what="the malformed entry to be dead-lettered"
        )
    finally:
        client.close()
    assert len(letters) == 1
    assert "integration_id" in letters[0]["reason"] and letters[0]["stream"] == STREAM_KEY
    assert json.loads(letters[0]["fields"]) == {"integration_id": "abc"}

    # The refresh was an asset-triggered run of oauth_token_refresh, which succeeded.
    def asset_runs():
        listed = runs.get_dag_runs(REFRESH, run_type=["asset_triggered"], run_after_gte=pushed_at).dag_runs
        return [r for r in listed if _state(r) in ("success", "failed")] or None

    done = wait_for(asset_runs, timeout=60, interval=1, what="the asset-triggered run to finish")
    assert [_state(r) for r in done] == ["success"] * len(done), [(r.dag_run_id, _state(r)) for r in done]
    totals = [_total(api_client, REFRESH, r.dag_run_id) for r in done]
    served = [t for t in totals if t["refreshed"]]  # one integration per request: the run that did it
    assert len(served) == 1 and (served[0]["totalIntegrations"], served[0]["refreshed"]) == (1, 1)
    assert refreshed_at >= pushed_at
    assert acme.fake.state.refreshes() == acme.fake.state.refreshes(wanted_refresh) == 1
    assert acme.rows(other)[other].last_refresh_at is None


def test_the_health_sweep_counts_each_state_refreshes_the_expired_and_tells_of_a_revocation_once(
    acme, dag_runs, api_client
):
    runs = dag_runs
    healthy, _, _ = acme.connect(1)
    expired, expired_refresh, _ = acme.connect(2)
    revoked, _, revoked_access = acme.connect(3, refreshable=False)
    acme.fake.expire_access_tokens("u2")  # the provider no longer takes u2's access token
    acme.fake.revoke(revoked_access)  # ... nor u3's, which has no refresh token
    # No scheduled refresh between the health check and the refresh it triggers: that one would
    # be asked for after it and refresh a second time. Its triggered run waits until unpaused.
    _quiesce(api_client, runs, REFRESH)

    sweep = _trigger(runs, HEALTH)
    assert _state(_wait_run(runs, HEALTH, sweep)) == "success"
    total = _total(api_client, HEALTH, sweep)
    counts = {k: total[k] for k in ("totalIntegrations", "healthy", "expired", "revoked", "error")}
    assert counts == {"totalIntegrations": 3, "healthy": 1, "expired": 1, "revoked": 1, "error": 0}
    changes = {i: (r["healthFrom"], r["healthTo"]) for i, r in _results(total).items()}
    assert changes == {healthy: (None, "healthy"), expired: (None, "expired"), revoked: (None, "revoked")}
    assert acme.rows(expired)[expired].status == "expired"
    assert acme.rows(revoked)[revoked].status == "revoked"

    # refresh_expired triggered one oauth_token_refresh run for the expired one.
    refresh_run = runs.get_dag_run(REFRESH, f"integration_health__{sweep}")
    # ... asking for the refreshes made since its checks began (the sweep's interval end).
    assert refresh_run.conf["integration_ids"] == [expired]
    asked = datetime.fromisoformat(refresh_run.conf["requested_at"])
    assert asked <= acme.rows(expired)[expired].last_health_check_at
    _pause(api_client, REFRESH, paused=False)
    assert _state(_wait_run(runs, REFRESH, refresh_run.dag_run_id)) == "success"
    refresh_total = _total(api_client, REFRESH, refresh_run.dag_run_id)
    assert refresh_total["totalIntegrations"] == 1 and refresh_total["successCount"] == 1
    # It refreshed it, unless the scheduled run created on unpausing got there first (then it
    # found it refreshed after its request: unchanged). Either way: refreshed exactly once.
    assert acme.fake.state.refreshes() == acme.fake.state.refreshes(expired_refresh) == 1
    row = acme.rows(expired)[expired]
    assert (row.status, acme.health(expired)) == ("active", None)

    # The owner was told of the revocation once, also after a second sweep.
    again = _trigger(runs, HEALTH)
    assert _state(_wait_run(runs, HEALTH, again)) == "success"
    second = _total(api_client, HEALTH, again)
    assert (second["totalIntegrations"], second["healthy"], second["revoked"]) == (2, 2, 0)
    told = acme.db.execute(
        "SELECT user_id, kind, data->>'integration_id' FROM notifications ORDER BY id"
    ).fetchall()
    acme.db.commit()
    assert told == [(1, "integration_revoked", str(revoked))]
    assert _no_run(runs, REFRESH, f"integration_health__{again}")  # nothing expired: no refresh run


def _no_run(runs, dag_id: str, run_id: str) -> bool:
    from airflow_client.client.exceptions import NotFoundException

    try:
        runs.get_dag_run(dag_id, run_id)
    except NotFoundException:
        return True
    return False

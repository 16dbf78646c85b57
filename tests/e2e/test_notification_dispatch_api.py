"""notification_dispatch with real Airflow: connections and pools set over the REST API, messages
enqueued in the outbox, a wake-up on Redis -> a run sends each message once through the local SMTP
server and the Twilio- and FCM-shaped fakes; a manual REST run afterwards sends nothing again."""

from __future__ import annotations

import json

import pytest
import redis

from almanac.notify import outbox
from almanac.notify.fakes import FakeFcm, FakeSmtpServer, FakeTwilio
from almanac.notify.outbox import NewNotification
from almanac.notify.wakeups import push_wakeup
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e
DAG = "notification_dispatch"


def _upsert(create, patch, key, body):
    from airflow_client.client.exceptions import NotFoundException

    try:
        patch(key, body)
    except NotFoundException:
        create(body)


def _configure(api_client, smtp, twilio, fcm) -> None:
    from airflow_client.client.api.connection_api import ConnectionApi
    from airflow_client.client.api.pool_api import PoolApi
    from airflow_client.client.api.variable_api import VariableApi
    from airflow_client.client.models import ConnectionBody, PoolBody, VariableBody

    connections, pools, variables = ConnectionApi(api_client), PoolApi(api_client), VariableApi(api_client)
    for body in (
        ConnectionBody(
            connection_id="smtp_default",
            conn_type="smtp",
            host="127.0.0.1",
            port=smtp.port,
            extra=json.dumps({"from_email": "almanac@example.com", "disable_ssl": True, "disable_tls": True}),
        ),
        ConnectionBody(
            connection_id="sms_default",
            conn_type="http",
            host=twilio.url,
            login=twilio.account_sid,
            password=twilio.auth_token,
            extra=json.dumps({"from_number": "+15550009999"}),
        ),
        ConnectionBody(
            connection_id="fcm_default",
            conn_type="http",
            host=fcm.url,
            extra=json.dumps(
                {"project_id": fcm.project_id, "service_account_info": fcm.service_account_info()}
            ),
        ),
    ):
        _upsert(connections.post_connection, connections.patch_connection, body.connection_id, body)
    for channel in ("email", "sms", "push"):
        name = f"notifications_{channel}"
        if name not in {p.name for p in pools.get_pools().pools}:
            pools.post_pool(PoolBody(name=name, slots=5))
    settings = VariableBody(key="almanac_settings", value=json.dumps({"notify_run_budget_s": 5}))
    _upsert(variables.post_variable, variables.patch_variable, "almanac_settings", settings)


def test_a_wakeup_sends_every_channel_once_and_a_rerun_sends_nothing(
    db, api_client, wait_for_dag, airflow_stack
):
    from airflow_client.client.api.dag_api import DAGApi
    from airflow_client.client.api.dag_run_api import DagRunApi
    from airflow_client.client.models import DAGPatchBody, TriggerDAGRunPostBody

    with FakeSmtpServer() as smtp, FakeTwilio() as twilio, FakeFcm() as fcm:
        _configure(api_client, smtp, twilio, fcm)
        db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
        db.execute(
            "INSERT INTO users (id, tenant_id, name, email, phone, contact_channels)"
            " VALUES (1, 1, 'Ann', 'ann@example.com', '+15557654321', ARRAY['email','sms','push'])"
        )
        db.execute(
            "INSERT INTO push_devices (user_id, registration_token, platform) VALUES (1, 'dev-1', 'ios')"
        )
        ids = [
            outbox.enqueue(
                db,
                NewNotification(
                    tenant_id=1,
                    channel=channel,
                    kind="e2e",
                    idempotency_key=f"e2e:{channel}",
                    subject="Hello",
                    body=f"hello by {channel}",
                    user_id=1,
                ),
            )
            for channel in ("email", "sms", "push")
        ]
        db.commit()
        wait_for_dag(DAG)
        try:
            push_wakeup(redis.Redis.from_url(airflow_stack["ALMANAC_REDIS_URL"]), ids[0])
            smtp.wait_received(1, timeout=180)
            twilio.wait_received(1, timeout=60)
            fcm.wait_received(1, timeout=60)

            def all_sent():
                db.commit()
                rows = db.execute("SELECT status FROM notifications ORDER BY id").fetchall()
                return [s for (s,) in rows] == ["sent"] * 3

            wait_for(all_sent, timeout=60, what="the outbox rows to be recorded sent")
            runs = DagRunApi(api_client)
            manual = runs.trigger_dag_run(DAG, TriggerDAGRunPostBody(logical_date=None)).dag_run_id

            def finished():
                run = runs.get_dag_run(DAG, manual)
                return run if run.state.value in ("success", "failed") else None

            assert wait_for(finished, timeout=240, what="the manual run to finish").state.value == "success"
        finally:
            DAGApi(api_client).patch_dag(DAG, DAGPatchBody(is_paused=True))
        assert len(smtp.received) == len(twilio.received) == len(fcm.received) == 1
        assert smtp.received[0].rcpt_tos == ("ann@example.com",)

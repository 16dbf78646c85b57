"""The whole chain, with real Airflow: a request pushed on Redis -> ics_sync_requested runs ->
events land in the DB -> the Asset event starts google_calendar_push -> every member who
connected Google has them in (a local fake of) Google Calendar, through the real client library."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import redis

from almanac.google.accounts import connect_account
from almanac.google.crypto import TokenCipher
from almanac.ics.requests import push_sync_request
from tests.e2e.conftest import wait_for
from tests.support.fake_google import FakeGoogle
from tests.support.feed_server import FeedServer, Route

pytestmark = pytest.mark.e2e
CALENDAR = 31


def _feed(events: int) -> bytes:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//almanac//e2e//EN"]
    for n in range(events):
        at = start + timedelta(days=n)
        lines += ["BEGIN:VEVENT", f"UID:chain-{n}@almanac.test", "DTSTAMP:20260101T000000Z",
                  f"DTSTART:{at:%Y%m%dT%H%M%SZ}", "DURATION:PT1H", f"SUMMARY:Practice {n}", "END:VEVENT"]
    return ("\r\n".join(lines + ["END:VCALENDAR"]) + "\r\n").encode()


def test_a_redis_request_reaches_every_members_google_calendar(db, api_client, wait_for_dag, airflow_stack):
    from airflow_client.client.api.connection_api import ConnectionApi
    from airflow_client.client.api.variable_api import VariableApi
    from airflow_client.client.exceptions import NotFoundException
    from airflow_client.client.models import ConnectionBody, VariableBody

    with FeedServer({"/family.ics": Route(body=_feed(3))}) as feeds, FakeGoogle() as google:
        variables, connections = VariableApi(api_client), ConnectionApi(api_client)
        settings = VariableBody(
            key="almanac_settings", value=json.dumps({"ics_allow_hosts": feeds.host_port})
        )
        try:
            variables.patch_variable("almanac_settings", settings)
        except NotFoundException:
            variables.post_variable(settings)
        oauth = ConnectionBody(
            connection_id="google_oauth", conn_type="generic", login="almanac-e2e", password="secret",
            extra=json.dumps({"token_uri": google.token_uri, "api_endpoint": google.api_endpoint}),
        )
        try:
            connections.patch_connection("google_oauth", oauth)
        except NotFoundException:
            connections.post_connection(oauth)

        db.execute("TRUNCATE google_event_links, google_accounts CASCADE")
        db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
        for user_id, name in [(1, "alice"), (2, "bob"), (3, "carol")]:  # carol never connected Google
            db.execute("INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
                       (user_id, name, f"{name}@x.test"))
        db.execute("INSERT INTO calendars (id, tenant_id, name, source_url) VALUES (%s, 1, 'family', %s)",
                   (CALENDAR, feeds.url("/family.ics")))
        for user_id in (1, 2, 3):
            db.execute(
                "INSERT INTO calendar_members (calendar_id, user_id) VALUES (%s, %s)", (CALENDAR, user_id)
            )
        cipher = TokenCipher(airflow_stack["AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY"])
        connect_account(db, cipher, 1, google.grant("alice"))
        connect_account(db, cipher, 2, google.grant("bob"))
        db.commit()

        wait_for_dag("ics_sync_requested")
        wait_for_dag("google_calendar_push")
        push_sync_request(redis.Redis.from_url(airflow_stack["ALMANAC_REDIS_URL"]), CALENDAR)

        def pushed():
            return len(google.live_events("alice")) == 3 and len(google.live_events("bob")) == 3

        wait_for(pushed, timeout=300, what="the feed's 3 events in Alice's and Bob's Google calendars")
        summaries = sorted(e["summary"] for e in google.live_events("alice").values())
        assert summaries == ["Practice 0", "Practice 1", "Practice 2"]
        db.commit()
        count = db.execute("SELECT count(*) FROM events WHERE calendar_id = %s", (CALENDAR,)).fetchone()[0]
        assert count == 3

"""almanac.notify.dispatch end to end: the real outbox, real Redis rate limits, the real senders over
sockets to the local SMTP server and the Twilio- and FCM-shaped fakes."""

from __future__ import annotations

import dataclasses

import pytest

from almanac.notify import outbox
from almanac.notify.channels import EmailSender, FcmConfig, PushSender, SmsConfig, SmsSender, SmtpConfig
from almanac.notify.dispatch import dispatch_channel
from almanac.notify.fakes import FakeFcm, FakeSmtpServer, FakeTwilio
from almanac.notify.outbox import NewNotification
from almanac.notify.ratelimit import NotifyLimiter
from almanac.settings import Settings

FAST = Settings(notify_run_budget_s=20, notify_parallel_sends=3, notify_claim_batch=10)


@pytest.fixture(scope="module")
def smtp():
    with FakeSmtpServer(slow_seconds=0.5) as server:
        yield server


@pytest.fixture(scope="module")
def twilio():
    with FakeTwilio(slow_seconds=0.5) as server:
        yield server


@pytest.fixture(scope="module")
def fcm():
    with FakeFcm(slow_seconds=0.5) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_fakes(smtp, twilio, fcm):
    for fake in (smtp, twilio, fcm):
        fake.reset()


@pytest.fixture
def people(db):
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    db.execute(
        "INSERT INTO users (id, tenant_id, name, email, phone, contact_channels) VALUES"
        " (1, 1, 'Ann', 'ann@example.com', '+15557654321', ARRAY['email','sms','push']),"
        " (2, 1, 'Bob', 'reject+bob@example.com', %s, ARRAY['email','sms']),"
        " (3, 1, 'Cy', 'drop+cy@example.com', %s, ARRAY['email','sms','push'])",
        (FakeTwilio.INVALID, FakeTwilio.RATE_LIMITED),
    )
    db.execute(
        "INSERT INTO push_devices (user_id, registration_token, platform) VALUES"
        " (1, 'device-ann-1', 'android'), (1, 'unregistered-ann-old', 'ios'),"
        " (3, 'unregistered-cy', 'android')"
    )
    db.commit()
    return db


def senders(smtp, twilio, fcm):
    return {
        "email": lambda: EmailSender(SmtpConfig("127.0.0.1", smtp.port, from_addr="almanac@example.com")),
        "sms": lambda: SmsSender(
            SmsConfig(
                base_url=twilio.url,
                account_sid=twilio.account_sid,
                auth_token=twilio.auth_token,
                from_number="+15550009999",
            )
        ),
        "push": lambda: PushSender(
            FcmConfig(
                base_url=fcm.url, project_id=fcm.project_id, service_account_info=fcm.service_account_info()
            )
        ),
    }


def enqueue(db, key: str, channel: str, user: int, **kw) -> int:
    nid = outbox.enqueue(
        db,
        NewNotification(
            tenant_id=1,
            channel=channel,
            kind="test",
            idempotency_key=key,
            body=f"hello {key}",
            user_id=user,
            subject=f"subject {key}",
            **kw,
        ),
    )
    db.commit()
    return nid


def dispatch(db, channel, factories, settings=FAST, **kw):
    return dispatch_channel(db, channel, factories[channel], owner="test/run/1", settings=settings, **kw)


def row(db, nid: int) -> dict:
    cur = db.execute(
        "SELECT status, attempts, last_error, provider_message_id, next_attempt_at > now() AS later"
        " FROM notifications WHERE id = %s",
        (nid,),
    )
    names = [c.name for c in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def test_each_channel_sends_once_and_records_the_providers_id(people, smtp, twilio, fcm):
    factories = senders(smtp, twilio, fcm)
    ids = {c: enqueue(people, f"hello-{c}", c, 1) for c in ("email", "sms", "push")}
    counts = {c: dispatch(people, c, factories) for c in ids}
    assert counts["email"]["sent"] == counts["sms"]["sent"] == counts["push"]["sent"] == 1
    [mail] = smtp.received
    assert mail.rcpt_tos == ("ann@example.com",) and b"hello hello-email" in mail.raw
    assert row(people, ids["email"])["status"] == "sent"
    [sms] = twilio.received
    assert sms["to"] == "+15557654321" and row(people, ids["sms"])["provider_message_id"].startswith("SM")
    # push: the live device got it; the old one is gone, and disabled
    assert [m["message"]["token"] for m in fcm.received] == ["device-ann-1"]
    assert row(people, ids["push"])["status"] == "sent"
    disabled = people.execute("SELECT registration_token FROM push_devices WHERE disabled_at IS NOT NULL")
    assert sorted(t for (t,) in disabled) == ["unregistered-ann-old"]
    # run it again (a retry, a rerun, a backfill): nothing is sent twice
    assert all(dispatch(people, c, factories)["sent"] == 0 for c in ids)
    assert len(smtp.received) == len(twilio.received) == len(fcm.received) == 1


def test_permanent_refusals_are_dead_with_the_providers_reason(people, smtp, twilio, fcm):
    factories = senders(smtp, twilio, fcm)
    email = enqueue(people, "bob-email", "email", 2)
    sms = enqueue(people, "bob-sms", "sms", 2)
    push = enqueue(people, "cy-push", "push", 3)
    assert dispatch(people, "email", factories)["dead"] == 1
    assert dispatch(people, "sms", factories)["dead"] == 1
    assert dispatch(people, "push", factories)["dead"] == 1
    assert row(people, email)["last_error"].startswith("SMTP 550")
    assert row(people, sms)["last_error"].startswith("Twilio 21211")
    assert row(people, push)["status"] == "dead"
    assert [r["id"] for r in outbox.needing_attention(people)] == sorted([email, sms, push], reverse=True)


def test_a_429_waits_for_retry_after_and_is_sent_later(people, smtp, twilio, fcm):
    factories = senders(smtp, twilio, fcm)
    nid = enqueue(people, "ann-sms-busy", "sms", 1)
    twilio.fail_next(1, status=429, retry_after=2)
    counts = dispatch(people, "sms", factories)
    assert counts["failed"] == 1
    state = row(people, nid)
    assert (state["status"], state["attempts"], state["later"]) == ("failed", 1, True)
    assert twilio.received == []
    people.execute("UPDATE notifications SET next_attempt_at = now() WHERE id = %s", (nid,))
    people.commit()
    assert dispatch(people, "sms", factories)["sent"] == 1
    assert row(people, nid)["attempts"] == 2 and len(twilio.received) == 1


def test_transient_failures_end_dead_after_the_channels_attempts(people, smtp, twilio, fcm):
    factories = senders(smtp, twilio, fcm)
    nid = enqueue(people, "ann-sms-down", "sms", 1)
    settings = dataclasses.replace(FAST, notify_sms_attempts=2)
    twilio.fail_next(5, status=503)
    dispatch(people, "sms", factories, settings)
    people.execute("UPDATE notifications SET next_attempt_at = now() WHERE id = %s", (nid,))
    people.commit()
    assert dispatch(people, "sms", factories, settings)["dead"] == 1
    state = row(people, nid)
    assert state["status"] == "dead" and state["last_error"].startswith("gave up after 2 attempts")


def test_an_answer_lost_after_the_hand_over_is_uncertain_and_not_resent(people, smtp, twilio, fcm):
    factories = senders(smtp, twilio, fcm)
    nid = enqueue(people, "cy-email", "email", 3)  # drop+: the server reads it, then hangs up
    assert dispatch(people, "email", factories)["uncertain"] == 1
    assert row(people, nid)["status"] == "uncertain"
    assert dispatch(people, "email", factories)["uncertain"] == 0  # not picked up again
    assert len(smtp.received) == 1


def test_a_user_over_their_hourly_limit_waits_and_is_not_failed(people, smtp, twilio, fcm, redis_client):
    factories = senders(smtp, twilio, fcm)
    settings = dataclasses.replace(FAST, notify_email_per_user_per_hour=2)
    ids = [enqueue(people, f"ann-mail-{i}", "email", 1) for i in range(3)]
    counts = dispatch(people, "email", factories, settings, limiter=NotifyLimiter(redis_client, settings))
    assert (counts["sent"], counts["rateLimited"]) == (2, 1)
    waiting = [row(people, i) for i in ids if row(people, i)["status"] != "sent"]
    assert len(waiting) == 1
    assert waiting[0]["status"] == "pending" and waiting[0]["later"] and waiting[0]["attempts"] == 0
    assert "rate limited" in waiting[0]["last_error"]


def test_the_provider_limit_paces_sends_rather_than_failing_them(people, smtp, twilio, fcm, redis_client):
    factories = senders(smtp, twilio, fcm)
    settings = dataclasses.replace(FAST, notify_email_per_second=2)
    for i in range(5):
        enqueue(people, f"paced-{i}", "email", None, recipient=f"ops{i}@example.com")
    counts = dispatch(people, "email", factories, settings, limiter=NotifyLimiter(redis_client, settings))
    assert counts["sent"] == 5 and counts["rateLimited"] == 0
    stamps = sorted(m.received_at for m in smtp.received)
    assert stamps[-1][:19] > stamps[0][:19]  # at most 2 per second: they spread over seconds


def test_a_lingering_dispatcher_sends_what_arrives_while_it_waits(people, smtp, twilio, fcm, redis_client):
    import threading

    from almanac.notify.wakeups import push_wakeup

    factories = senders(smtp, twilio, fcm)
    settings = dataclasses.replace(FAST, notify_run_budget_s=3)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            dispatch_channel(
                people,
                "email",
                factories["email"],
                owner="lingering",
                settings=settings,
                linger=True,
                wakeups=redis_client,
            )
        )
    )
    worker.start()
    import psycopg

    from tests.conftest import _required_env

    with psycopg.connect(_required_env("ALMANAC_APP_DB_URL")) as backend:
        nid = enqueue(backend, "arrives-later", "email", 1)
        push_wakeup(redis_client, nid)
    smtp.wait_received(1, timeout=5)
    worker.join(10)
    assert result["sent"] == 1

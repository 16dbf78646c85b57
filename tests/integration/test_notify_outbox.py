"""almanac.notify.outbox against the real database: enqueue once per key, claims, leases, outcomes."""

from __future__ import annotations

import psycopg
import pytest

from almanac.notify import outbox
from almanac.notify.outbox import NewNotification
from almanac.notify.types import Message, SendResult
from almanac.retry import RetryPolicy

POLICY = RetryPolicy(base_wait_s=1, max_wait_s=3600)


@pytest.fixture
def people(db):
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    db.execute(
        "INSERT INTO users (id, tenant_id, name, email, phone, contact_channels) VALUES"
        " (1, 1, 'Ann', 'ann@example.com', '+15550001111', ARRAY['email','sms','push']),"
        " (2, 1, 'Bob', 'bob@example.com', NULL, ARRAY['email']),"
        " (3, 1, 'Cy', NULL, '+15550003333', ARRAY['sms'])"
    )
    db.execute(
        "INSERT INTO push_devices (user_id, registration_token, platform) VALUES"
        " (1, 'tok-a', 'android'), (1, 'tok-b', 'ios')"
    )
    db.commit()
    return db


def note(key: str, channel: str = "email", user: int | None = 1, **kw) -> NewNotification:
    return NewNotification(
        tenant_id=1, channel=channel, kind="test", idempotency_key=key, body=f"body {key}", user_id=user, **kw
    )


def status_of(db, nid: int) -> tuple:
    return db.execute(
        "SELECT status, attempts, last_error, provider_message_id, sent_at IS NOT NULL,"
        " next_attempt_at > now() FROM notifications WHERE id = %s",
        (nid,),
    ).fetchone()


def test_enqueueing_one_key_twice_is_one_row(people):
    first = outbox.enqueue(people, note("k1"))
    again = outbox.enqueue(people, note("k1", subject="other text"))
    people.commit()
    assert first == again
    assert people.execute("SELECT count(*), min(subject) FROM notifications").fetchone() == (1, None)


def test_enqueue_takes_keywords_and_refuses_what_cannot_be_sent(people):
    nid = outbox.enqueue(
        people, tenant_id=1, channel="sms", kind="k", idempotency_key="x", body="b", user_id=3
    )
    assert nid > 0
    for bad in (
        dict(channel="fax"),
        dict(idempotency_key=""),
        dict(idempotency_key="k" * 201),
        dict(user_id=None, recipient=None),
        dict(channel="push", user_id=None, recipient="+1555"),
        dict(data={"n": 1}),
    ):
        fields = dict(tenant_id=1, channel="email", kind="k", idempotency_key="y", body="b", user_id=1) | bad
        with pytest.raises(ValueError):
            NewNotification(**fields)


def test_bulk_enqueue_keeps_each_key_once(people):
    outbox.enqueue(people, note("old"))
    new = outbox.enqueue_many(people, [note("old"), note("a"), note("b"), note("a")])
    people.commit()
    assert new == 2
    keys = [r[0] for r in people.execute("SELECT idempotency_key FROM notifications ORDER BY id")]
    assert keys == ["old", "a", "b"]


def test_two_dispatchers_never_claim_the_same_row(people, migrated):
    outbox.enqueue_many(people, [note(f"n{i}") for i in range(30)])
    people.commit()
    with psycopg.connect(migrated) as other:
        a = outbox.claim(people, "email", limit=20, owner="A", lease_s=60)
        b = outbox.claim(other, "email", limit=20, owner="B", lease_s=60)
    assert len(a) == 20 and len(b) == 10
    assert not {r.id for r in a} & {r.id for r in b}
    assert outbox.claim(people, "email", limit=20, owner="C", lease_s=60) == []


def test_claims_take_only_due_rows_of_their_channel(people):
    from datetime import UTC, datetime, timedelta

    later = datetime.now(UTC) + timedelta(hours=1)
    outbox.enqueue(people, note("now"))
    outbox.enqueue(people, note("later", not_before=later))
    outbox.enqueue(people, note("sms", channel="sms"))
    people.commit()
    assert [r.idempotency_key for r in outbox.claim(people, "email", limit=10, owner="A", lease_s=60)] == [
        "now"
    ]


def expire_claims(db) -> None:
    db.execute(
        "UPDATE notifications SET claim_expires_at = now() - interval '1 second' WHERE status = 'sending'"
    )
    db.commit()


def test_an_expired_claim_never_handed_over_is_pending_again_and_one_handed_over_is_uncertain(people):
    ids = [outbox.enqueue(people, note(f"e{i}")) for i in range(3)]
    push = outbox.enqueue(people, note("p", channel="push"))
    people.commit()
    claimed = outbox.claim(people, "email", limit=10, owner="dead", lease_s=60)
    outbox.claim(people, "push", limit=10, owner="dead", lease_s=60)
    assert outbox.mark_started(people, [claimed[0].id], owner="dead") == [claimed[0].id]
    assert outbox.mark_started(people, [push], owner="dead") == [push]
    assert outbox.release_expired(people) == {"released": 0, "uncertain": 0, "resent": 0}  # not yet
    expire_claims(people)
    assert outbox.release_expired(people) == {"released": 2, "uncertain": 1, "resent": 1}
    uncertain = status_of(people, ids[0])
    assert uncertain[:2] == ("uncertain", 1) and "may have been sent" in uncertain[2]
    assert f"almanac notifications retry {ids[0]}" in uncertain[2]
    assert [status_of(people, i)[:2] for i in ids[1:]] == [("pending", 0), ("pending", 0)]
    assert status_of(people, push)[:2] == ("failed", 1)  # due again: FCM collapses a resend
    # Uncertain rows are never claimed again by themselves.
    again = outbox.claim(people, "email", limit=10, owner="next", lease_s=60)
    assert sorted(r.id for r in again) == ids[1:]


def test_a_lost_claim_is_not_handed_over(people):
    nid = outbox.enqueue(people, note("lost"))
    people.commit()
    outbox.claim(people, "email", limit=1, owner="slow", lease_s=60)
    expire_claims(people)
    outbox.release_expired(people)
    outbox.claim(people, "email", limit=1, owner="fresh", lease_s=60)
    assert outbox.mark_started(people, [nid], owner="slow") == []
    assert outbox.mark_started(people, [nid], owner="fresh") == [nid]


def claimed_and_started(db, keys, channel="email"):
    for key in keys:
        outbox.enqueue(db, note(key, channel=channel))
    db.commit()
    rows = outbox.claim(db, channel, limit=100, owner="me", lease_s=60)
    outbox.mark_started(db, [r.id for r in rows], owner="me")
    return rows  # as claimed: record_outcomes counts the attempt mark_started made


def test_outcomes_are_recorded_with_backoff_and_retry_after(people):
    sent, transient, throttled, refused = claimed_and_started(people, ["s", "t", "r", "d"])
    counts = outbox.record_outcomes(
        people,
        [
            (sent, SendResult("sent", provider_id="SM123")),
            (transient, SendResult("failed", error="SMTP 451 at rcpt")),
            (throttled, SendResult("failed", error="429", retry_after_s=120)),
            (refused, SendResult("dead", error="SMTP 550 mailbox unavailable")),
        ],
        owner="me",
        policy=POLICY,
        max_attempts=5,
    )
    assert counts == {"sent": 1, "failed": 2, "dead": 1}
    assert status_of(people, sent.id) == ("sent", 1, None, "SM123", True, False)
    assert status_of(people, transient.id)[:3] == ("failed", 1, "SMTP 451 at rcpt")
    waits = dict(
        people.execute(
            "SELECT idempotency_key, round(extract(epoch FROM next_attempt_at - updated_at))"
            " FROM notifications"
        ).fetchall()
    )
    assert waits["t"] == 1 and waits["r"] == 120
    assert status_of(people, refused.id)[:3] == ("dead", 1, "SMTP 550 mailbox unavailable")


def test_a_transient_failure_on_the_last_attempt_is_dead(people):
    nid = outbox.enqueue(people, note("tired"))
    people.execute("UPDATE notifications SET attempts = 4 WHERE id = %s", (nid,))
    people.commit()
    [row] = outbox.claim(people, "email", limit=1, owner="me", lease_s=60)
    outbox.mark_started(people, [nid], owner="me")
    outbox.record_outcomes(
        people, [(row, SendResult("failed", error="503"))], owner="me", policy=POLICY, max_attempts=5
    )
    status, attempts, error, *_ = status_of(people, nid)
    assert (status, attempts) == ("dead", 5) and error == "gave up after 5 attempts; last: 503"


def test_an_outcome_arriving_after_a_sweep_marked_the_row_uncertain_is_kept(people):
    [row] = claimed_and_started(people, ["late"])
    expire_claims(people)
    outbox.release_expired(people)
    assert status_of(people, row.id)[0] == "uncertain"
    outbox.record_outcomes(
        people, [(row, SendResult("sent", provider_id="q1"))], owner="me", policy=POLICY, max_attempts=5
    )
    assert status_of(people, row.id)[:2] == ("sent", 1)


def test_recipients_are_resolved_or_settled_as_skipped(people):
    people.execute("INSERT INTO users (id, tenant_id, name, email) VALUES (4, 1, 'Dee', 'dee@example.com')")
    for key, channel, user, kw in [
        ("ann-email", "email", 1, {}),
        ("ann-sms", "sms", 1, {}),
        ("ann-push", "push", 1, {}),
        ("bob-sms", "sms", 2, {}),  # opted out of sms
        ("cy-email", "email", 3, {}),  # opted out of email
        ("given", "email", None, {"recipient": "ops@example.com"}),
        ("dee-push", "push", 4, {}),  # push not accepted
    ]:
        outbox.enqueue(people, note(key, channel=channel, user=user, **kw))
    people.execute("UPDATE users SET contact_channels = ARRAY['push'] WHERE id = 4")
    people.commit()
    rows = [
        r for c in ("email", "sms", "push") for r in outbox.claim(people, c, limit=10, owner="m", lease_s=60)
    ]
    out = {r.idempotency_key: outbox.resolve(people, rows)[r.id] for r in rows}
    assert out["ann-email"].to == ("ann@example.com",) and isinstance(out["ann-email"], Message)
    assert out["ann-sms"].to == ("+15550001111",)
    assert out["ann-push"].to == ("tok-a", "tok-b")
    assert out["bob-sms"] == SendResult("skipped", error="the user does not accept sms notifications")
    assert out["cy-email"] == SendResult("skipped", error="the user does not accept email notifications")
    assert out["given"].to == ("ops@example.com",)
    assert out["dee-push"] == SendResult("skipped", error="the user has no active push device")


def test_gone_devices_are_disabled_once(people):
    assert outbox.disable_devices(people, ["tok-a", "tok-a", "nope"], "UNREGISTERED") == 1
    assert outbox.disable_devices(people, ["tok-a"], "UNREGISTERED") == 0
    [active] = people.execute("SELECT registration_token FROM push_devices WHERE disabled_at IS NULL")
    assert active == ("tok-b",)


def test_operators_retry_dead_and_uncertain_rows_only(people):
    [row] = claimed_and_started(people, ["gone"])
    outbox.record_outcomes(
        people, [(row, SendResult("dead", error="550"))], owner="me", policy=POLICY, max_attempts=5
    )
    assert [r["id"] for r in outbox.needing_attention(people)] == [row.id]
    assert outbox.retry(people, row.id) == "dead"
    status, attempts, error, *_ = status_of(people, row.id)
    assert (status, attempts) == ("pending", 0) and error.startswith("retried by an operator (was dead)")
    with pytest.raises(ValueError, match="is pending"):
        outbox.retry(people, row.id)
    with pytest.raises(LookupError):
        outbox.retry(people, 999)
    assert outbox.stats(people)["email"]["pending"] == 1

"""google_calendar_push against the real application DB and a local fake of Google (real wire format).

No mock of the job's own side effects: the Google client library talks HTTP to
``tests/support/fake_google.py`` and the links live in Postgres.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
import redis

from almanac.batches import ItemResult, summarize_batch
from almanac.errors import ConfigError
from almanac.google.accounts import connect_account
from almanac.google.calendar_push import (
    PUSH_KIND,
    clear_pushed,
    member_ids_to_push,
    pending_pushes,
    push_batch,
)
from almanac.google.client import OAuthClient, batch_uri
from almanac.google.crypto import TokenCipher, generate_key
from almanac.google.mapping import google_event_id
from almanac.ics.sync import sync_window
from almanac.integrations.google import google_credentials
from almanac.integrations.providers import ProviderConfig
from almanac.integrations.refresh import Refresher
from almanac.leases import LeaseKeeper
from almanac.retry import RetryPolicy
from almanac.settings import Settings
from almanac.timeconv import all_day_instant
from tests.support.fake_google import FakeGoogle

UTC = UTC
ALICE, BOB, CAROL = 1, 2, 3  # Carol never connected Google
FAMILY, WORK = 10, 20  # Alice and Bob (and Carol) are in FAMILY; only Alice is in WORK
T0 = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
STATE_CHANGING = ("POST", "PATCH", "DELETE")


@pytest.fixture
def google():
    with FakeGoogle() as fake:
        yield fake


@pytest.fixture
def cipher() -> TokenCipher:
    return TokenCipher(generate_key())


@pytest.fixture
def oauth(google) -> OAuthClient:
    return OAuthClient("almanac-test-client", "almanac-test-secret", google.token_uri, google.api_endpoint)


@pytest.fixture
def gdb(db):
    """The app DB, empty, with the Google tables emptied too (they are not in APP_TABLES)."""
    db.execute(
        "TRUNCATE google_push_rejections, google_event_links, google_accounts, calendar_push_pending CASCADE"
    )
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for user_id, name in [(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol")]:
        db.execute(
            "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
            (user_id, name, f"{name}@x.test"),
        )
    db.execute(
        "INSERT INTO calendars (id, tenant_id, name, time_zone) VALUES (%s, 1, 'family', 'Europe/Paris')",
        (FAMILY,),
    )
    db.execute("INSERT INTO calendars (id, tenant_id, name) VALUES (%s, 1, 'work')", (WORK,))
    for calendar_id, user_id in [(FAMILY, ALICE), (FAMILY, BOB), (FAMILY, CAROL), (WORK, ALICE)]:
        db.execute(
            "INSERT INTO calendar_members (calendar_id, user_id) VALUES (%s, %s)", (calendar_id, user_id)
        )
    # FAMILY: a weekly series (2 instances) and an all-day event; WORK: one meeting.
    # An all-day date is stored as 00:00 UTC of that date, end exclusive (almanac.timeconv).
    _event(db, FAMILY, "swim@x", "20260310T090000Z", "Swimming", T0)
    _event(db, FAMILY, "swim@x", "20260317T090000Z", "Swimming", T0 + timedelta(days=7))
    _event(
        db,
        FAMILY,
        "bday@x",
        "",
        "Birthday",
        all_day_instant(date(2026, 3, 12)),
        all_day=True,
        ends=all_day_instant(date(2026, 3, 13)),
    )
    _event(db, WORK, "standup@x", "", "Standup", T0 + timedelta(hours=1))
    db.commit()
    return db


def _event(db, calendar_id, uid, rid, summary, starts, *, all_day=False, ends=None, version=1) -> None:
    db.execute(
        """
        INSERT INTO events
               (calendar_id, uid, recurrence_id, summary, all_day, starts_at, ends_at, content_hash)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (calendar_id, uid, recurrence_id) DO UPDATE
           SET summary = EXCLUDED.summary, content_hash = EXCLUDED.content_hash
        """,
        (
            calendar_id,
            uid,
            rid,
            summary,
            all_day,
            starts,
            ends or starts + timedelta(hours=1),
            f"h:{uid}:{rid}:{summary}:{version}",
        ),
    )


@pytest.fixture
def connected(gdb, google, cipher) -> dict[int, str]:
    """Alice and Bob connected Google; returns their refresh tokens (as Google issued them)."""
    tokens = {ALICE: google.grant("alice"), BOB: google.grant("bob")}
    for user_id, token in tokens.items():
        owner = "alice" if user_id == ALICE else "bob"
        connect_account(gdb, cipher, user_id, token, account_subject=f"sub-{owner}")
    gdb.commit()
    return tokens


@contextmanager
def _credentials(cipher, oauth, sleep):
    """Members' credentials as the DAG gets them: from the integrations store, every refresh
    through its ``Refresher`` (own connection, a real Redis lease) at the fake's token endpoint."""
    google = ProviderConfig("google", oauth.client_id, oauth.client_secret, oauth.token_uri)
    client = redis.Redis.from_url(os.environ["ALMANAC_REDIS_URL"])
    try:
        with (
            psycopg.connect(os.environ["ALMANAC_APP_DB_URL"]) as token_conn,
            LeaseKeeper(client, "push-test") as leases,
        ):
            tokens = Refresher(cipher, lambda name: google, leases, sleep=sleep)
            yield lambda integration_id: google_credentials(tokens, token_conn, integration_id)
    finally:
        client.close()


def _push_results(
    db, cipher, oauth, *, calendar_ids=None, sleep=None, attempts=4, window=None, batch_size=50
) -> list[ItemResult]:
    waits = [] if sleep is None else sleep
    users = member_ids_to_push(db, calendar_ids)
    with _credentials(cipher, oauth, waits.append) as credentials:
        return push_batch(
            db,
            users,
            calendar_ids=calendar_ids,
            credentials=credentials,
            oauth=oauth,
            policy=RetryPolicy(attempts=attempts, max_wait_s=30),
            sleep=waits.append,
            window=window,
            batch_size=batch_size,
        )


def _push(db, cipher, oauth, **kwargs) -> dict:
    return summarize_batch(PUSH_KIND, _push_results(db, cipher, oauth, **kwargs))


def _by_user(summary: dict) -> dict[int, dict]:
    return {r["userId"]: r for r in summary["results"]}


def _summaries(google, owner) -> list[str]:
    return sorted(e["summary"] for e in google.live_events(owner).values())


def _links(db, user_id=None) -> int:
    db.commit()
    if user_id is None:
        return db.execute("SELECT count(*) FROM google_event_links").fetchone()[0]
    return db.execute("SELECT count(*) FROM google_event_links WHERE user_id = %s", (user_id,)).fetchone()[0]


# --- creating, rerunning ------------------------------------------------------------------


def test_push_creates_one_google_event_per_instance_per_member(gdb, connected, google, cipher, oauth):
    summary = _push(gdb, cipher, oauth)

    assert _summaries(google, "alice") == ["Birthday", "Standup", "Swimming", "Swimming"]
    assert _summaries(google, "bob") == ["Birthday", "Swimming", "Swimming"]
    assert summary["totalMembers"] == 2 and summary["successCount"] == 2
    assert (summary["eventsCreated"], summary["eventsUpdated"], summary["eventsDeleted"]) == (7, 0, 0)
    assert _links(gdb) == 7
    # the id is ours, derived from the domain key; the all-day event is dates in the calendar's zone
    bday = google.live_events("bob")[google_event_id(BOB, FAMILY, "bday@x", "")]
    assert bday["start"] == {"date": "2026-03-12"} and bday["end"] == {"date": "2026-03-13"}
    standup = google.live_events("alice")[google_event_id(ALICE, WORK, "standup@x", "")]
    assert standup["start"]["dateTime"] == "2026-03-10T10:00:00+00:00"


def test_running_twice_creates_no_duplicates_and_makes_no_call_that_changes_state(
    gdb, connected, google, cipher, oauth
):
    _push(gdb, cipher, oauth)
    changing, token_calls = len(google.calls(*STATE_CHANGING)), google.token_calls()

    again = _push(gdb, cipher, oauth)

    assert len(google.calls(*STATE_CHANGING)) == changing
    assert google.token_calls() == token_calls  # nothing to do: not even a token refresh
    assert (again["eventsCreated"], again["eventsUpdated"], again["eventsDeleted"]) == (0, 0, 0)
    assert again["successCount"] == 2 and again["results"] == []  # unchanged members are only counted
    assert len(google.live_events("alice")) == 4 and len(google.live_events("bob")) == 3


def test_lost_link_rows_do_not_duplicate_google_events(gdb, connected, google, cipher, oauth):
    """A crash between Google's answer and the link write: the rerun inserts under the same id,
    gets 409, and patches instead."""
    _push(gdb, cipher, oauth)
    gdb.execute("DELETE FROM google_event_links")
    gdb.commit()

    again = _push(gdb, cipher, oauth)

    assert len(google.live_events("alice")) == 4 and len(google.live_events("bob")) == 3
    assert again["eventsCreated"] == 7 and _links(gdb) == 7


# --- updates and deletes ------------------------------------------------------------------


def test_an_updated_instance_is_patched(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)
    _event(gdb, FAMILY, "swim@x", "20260317T090000Z", "Swimming (pool B)", T0 + timedelta(days=7), version=2)
    gdb.commit()
    patches, others = len(google.calls("PATCH")), len(google.calls("POST", "DELETE"))

    summary = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])

    assert len(google.calls("PATCH")) == patches + 2  # one per member
    assert len(google.calls("POST", "DELETE")) == others
    assert summary["eventsUpdated"] == 2 and summary["eventsCreated"] == 0
    assert _summaries(google, "bob") == ["Birthday", "Swimming", "Swimming (pool B)"]
    stored = gdb.execute(
        "SELECT DISTINCT content_hash FROM google_event_links "
        "WHERE uid = 'swim@x' AND recurrence_id = '20260317T090000Z'"
    ).fetchall()
    assert stored == [("h:swim@x:20260317T090000Z:Swimming (pool B):2",)]


def test_a_deleted_event_is_deleted_on_google_and_already_gone_counts_as_done(
    gdb, connected, google, cipher, oauth
):
    _push(gdb, cipher, oauth)
    gone = google_event_id(ALICE, FAMILY, "bday@x", "")
    # Alice already deleted it in Google (a second delete answers 410); Bob's copy was purged (404)
    google.events[("alice", "primary")][gone]["status"] = "cancelled"
    google.delete_behind_our_back("bob", google_event_id(BOB, FAMILY, "bday@x", ""))
    gdb.execute("DELETE FROM events WHERE uid = 'bday@x'")
    gdb.commit()

    summary = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])

    assert summary["eventsDeleted"] == 2 and summary["errorCount"] == 0
    assert "Birthday" not in _summaries(google, "alice") + _summaries(google, "bob")
    assert _links(gdb) == 5
    assert _push(gdb, cipher, oauth)["eventsDeleted"] == 0


def test_a_live_deleted_event_is_deleted_on_google(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)
    gdb.execute("DELETE FROM events WHERE uid = 'standup@x'")
    gdb.commit()

    summary = _push(gdb, cipher, oauth, calendar_ids=[WORK])

    assert summary["eventsDeleted"] == 1
    assert google.calls("DELETE") == [
        (
            "DELETE",
            f"/calendar/v3/calendars/primary/events/{google_event_id(ALICE, WORK, 'standup@x', '')}",
            "alice",
        )
    ]
    assert "Standup" not in _summaries(google, "alice")


def test_a_member_who_left_a_calendar_loses_its_copies(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)
    gdb.execute("DELETE FROM calendar_members WHERE calendar_id = %s AND user_id = %s", (FAMILY, BOB))
    gdb.commit()

    summary = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])

    assert _by_user(summary)[BOB]["eventsDeleted"] == 3
    assert google.live_events("bob") == {}
    assert len(google.live_events("alice")) == 4


def test_a_scoped_run_touches_only_its_calendars(gdb, connected, google, cipher, oauth):
    summary = _push(gdb, cipher, oauth, calendar_ids=[WORK])

    assert summary["totalMembers"] == 1  # only Alice is in WORK
    assert _summaries(google, "alice") == ["Standup"]
    assert google.live_events("bob") == {}


# --- tokens ----------------------------------------------------------------------------


def test_an_unknown_access_token_is_refreshed_once_and_the_call_retried(
    gdb, connected, google, cipher, oauth
):
    # a stored access token Google no longer accepts, although its expiry says it is valid
    gdb.execute(
        "UPDATE integrations SET access_token_enc = %s, access_token_expires_at = %s WHERE user_id = %s",
        (cipher.encrypt("ya29.stale"), datetime.now(UTC) + timedelta(hours=1), BOB),
    )
    gdb.commit()

    summary = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])

    unauthorised = [c for c in google.requests if c[2] is None and c[1] != "/token"]
    # Bob's first batch request: its 3 calls got 401, and only those
    assert unauthorised == [("POST", "/calendar/v3/calendars/primary/events", None)] * 3
    assert google.batch_requests() == [3, 3, 3]  # Alice's 3 FAMILY events; Bob's 3, sent again once
    assert google.token_calls() == 2  # Bob once (after the 401), Alice once (she had no access token)
    assert summary["successCount"] == 2 and len(google.live_events("bob")) == 3
    stored, expires = gdb.execute(
        "SELECT access_token_enc, access_token_expires_at FROM integrations WHERE user_id = %s", (BOB,)
    ).fetchone()
    assert cipher.decrypt(stored).startswith("ya29.fake-") and expires > datetime.now(UTC)


def test_an_expired_access_token_is_refreshed_before_the_call_and_kept_for_the_next_run(
    gdb, connected, google, cipher, oauth
):
    _push(gdb, cipher, oauth)
    assert google.token_calls() == 2
    rows = gdb.execute("SELECT refresh_token_enc, access_token_enc FROM integrations").fetchall()
    assert not any("1//refresh" in r[0] or "ya29" in (r[1] or "") for r in rows)  # encrypted at rest

    _event(gdb, WORK, "standup@x", "", "Standup (moved)", T0 + timedelta(hours=2), version=2)
    gdb.commit()
    _push(gdb, cipher, oauth, calendar_ids=[WORK])
    assert google.token_calls() == 2  # the stored access token was reused

    gdb.execute(
        "UPDATE integrations SET access_token_expires_at = %s", (datetime(2026, 1, 1, tzinfo=UTC),)
    )
    _event(gdb, WORK, "standup@x", "", "Standup (moved again)", T0 + timedelta(hours=3), version=3)
    gdb.commit()
    unauthorised_before = sum(1 for c in google.requests if c[2] is None and c[1] != "/token")
    _push(gdb, cipher, oauth, calendar_ids=[WORK])
    assert google.token_calls() == 3  # refreshed once, up front
    assert (
        sum(1 for c in google.requests if c[2] is None and c[1] != "/token") == unauthorised_before
    )  # no 401
    assert "Standup (moved again)" in _summaries(google, "alice")


def test_a_revoked_grant_marks_the_account_revoked_skips_it_and_others_are_still_pushed(
    gdb, connected, google, cipher, oauth
):
    google.revoke(connected[ALICE])

    summary = _push(gdb, cipher, oauth)

    assert _by_user(summary)[ALICE]["status"] == "skipped"
    assert "invalid_grant" in _by_user(summary)[ALICE]["error"]
    assert summary["skippedCount"] == 1 and summary["errorCount"] == 0 and summary["successCount"] == 1
    assert len(google.live_events("bob")) == 3
    status, error = gdb.execute(
        "SELECT status, last_error FROM integrations WHERE user_id = %s", (ALICE,)
    ).fetchone()
    assert status == "revoked" and "invalid_grant" in error
    assert member_ids_to_push(gdb, None) == [BOB]  # not tried again until the user reconnects
    assert connected[ALICE] not in json.dumps(summary)
    # The integrations store recorded the revocation, and told the tenant (its user: no owner) once.
    told = gdb.execute("SELECT user_id, kind, channel FROM notifications").fetchall()
    assert told == [(ALICE, "integration_revoked", "email")]
    _push(gdb, cipher, oauth)
    assert gdb.execute("SELECT count(*) FROM notifications").fetchone()[0] == 1


# --- Google under load ---------------------------------------------------------------------


def test_429_with_retry_after_is_honoured(gdb, connected, google, cipher, oauth):
    waits: list[float] = []
    google.fail_next(2, 429, retry_after=7)

    summary = _push(gdb, cipher, oauth, sleep=waits)

    assert waits == [7.0, 7.0]
    assert summary["errorCount"] == 0 and summary["eventsCreated"] == 7
    assert len(google.live_events("alice")) == 4


def test_retry_after_is_capped_and_5xx_backs_off(gdb, connected, google, cipher, oauth):
    waits: list[float] = []
    google.fail_next(1, 429, retry_after=3600)
    google.fail_next(2, 503)

    summary = _push(gdb, cipher, oauth, sleep=waits)

    assert waits == [30.0, 2.0, 4.0]  # capped at max_wait_s; then 1 s * 2^(attempt-1) for attempts 2, 3
    assert summary["errorCount"] == 0


def test_a_member_whose_calls_keep_failing_is_an_error_and_the_others_are_pushed(
    gdb, connected, google, cipher, oauth
):
    google.fail_next(2, 503)  # Alice (pushed first) gets both of her attempts refused

    summary = _push(gdb, cipher, oauth, attempts=2)

    alice = _by_user(summary)[ALICE]
    assert alice["status"] == "error" and "503" in alice["error"]
    assert summary["errorCount"] == 1 and len(google.live_events("bob")) == 3
    error = gdb.execute("SELECT last_error FROM google_accounts WHERE user_id = %s", (ALICE,)).fetchone()[0]
    assert "GoogleRetryableError" in error
    # the next run converges
    again = _push(gdb, cipher, oauth)
    assert again["errorCount"] == 0 and len(google.live_events("alice")) == 4


def test_a_member_whose_calls_keep_failing_is_a_retryable_member_error(gdb, connected, google, cipher, oauth):
    google.fail_next(2, 503)

    results = {r.item_id: r for r in _push_results(gdb, cipher, oauth, attempts=2)}

    assert results[ALICE].status == "error" and results[ALICE].permanent is False
    assert _rejections(gdb) == []  # about the member, not an event


# --- one event Google refuses --------------------------------------------------------------


def _rejections(db, user_id=None) -> list[dict]:
    from psycopg.rows import dict_row

    db.commit()
    with db.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT user_id, calendar_id, uid, recurrence_id, content_hash, operation, status, reason "
            "FROM google_push_rejections WHERE %(u)s::bigint IS NULL OR user_id = %(u)s "
            "ORDER BY user_id, calendar_id, uid, recurrence_id",
            {"u": user_id},
        )
        return cur.fetchall()


@pytest.mark.parametrize(
    ("status", "reason"),
    [(400, "invalid"), (403, "forbiddenForNonOrganizer"), (412, "conditionNotMet"), (400, "timeRangeEmpty")],
)
def test_an_event_google_refuses_is_recorded_and_the_members_other_events_are_pushed(
    gdb, connected, google, cipher, oauth, status, reason
):
    google.reject(status, reason, "The event was refused.", summary="Birthday", owner="bob")

    summary = _push(gdb, cipher, oauth)

    bob = _by_user(summary)[BOB]
    assert bob["status"] == "updated" and bob["error"] is None
    assert (bob["eventsCreated"], bob["eventsRejected"]) == (2, 1)
    assert summary["eventsRejected"] == 1 and summary["errorCount"] == 0
    assert bob["rejections"] == [
        {
            "calendarId": FAMILY,
            "uid": "bday@x",
            "recurrenceId": "",
            "operation": "insert",
            "status": status,
            "reason": f"{status} {reason}: The event was refused.",
        }
    ]
    assert _summaries(google, "bob") == ["Swimming", "Swimming"]
    assert _summaries(google, "alice") == ["Birthday", "Standup", "Swimming", "Swimming"]  # hers was accepted
    [row] = _rejections(gdb)
    assert (row["user_id"], row["uid"], row["status"], row["operation"]) == (BOB, "bday@x", status, "insert")
    assert row["content_hash"] == "h:bday@x::Birthday:1" and reason in row["reason"]


def test_a_refused_event_is_not_sent_again_until_its_content_changes(gdb, connected, google, cipher, oauth):
    google.reject(400, "invalid", "Invalid start time.", summary="Birthday")
    _push(gdb, cipher, oauth)
    sent = len(google.calls(*STATE_CHANGING))

    again = _push(gdb, cipher, oauth)

    assert len(google.calls(*STATE_CHANGING)) == sent  # the same content is not re-sent every run
    assert again["eventsRejected"] == 0 and again["errorCount"] == 0
    # Still listed (never silently): unchanged, with the events held back until their content changes.
    assert {(r["status"], r["eventsHeld"] > 0) for r in again["results"]} == {("unchanged", True)}
    assert len(_rejections(gdb)) == 2

    # new content: tried again (and refused again, recorded with the new hash)
    _event(gdb, FAMILY, "bday@x", "", "Birthday", all_day_instant(date(2026, 3, 12)), all_day=True, version=2)
    gdb.commit()
    third = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])
    assert third["eventsRejected"] == 2 and len(google.rejected) == 4
    assert {r["content_hash"] for r in _rejections(gdb)} == {"h:bday@x::Birthday:2"}

    # Google accepts it now, and an operator clears Bob's row: pushed, and the row goes
    google.clear_rejections()
    gdb.execute("DELETE FROM google_push_rejections WHERE user_id = %s", (BOB,))
    gdb.commit()
    fourth = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])
    assert _by_user(fourth)[BOB]["eventsCreated"] == 1 and "Birthday" in _summaries(google, "bob")
    assert [r["user_id"] for r in _rejections(gdb)] == [ALICE]  # Alice's still holds (same content)
    assert "Birthday" not in _summaries(google, "alice")

    # once the content changes again, Alice's goes through and her row is removed
    _event(
        gdb, FAMILY, "bday@x", "", "Birthday!", all_day_instant(date(2026, 3, 12)), all_day=True, version=3
    )
    gdb.commit()
    fifth = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])
    assert (fifth["eventsCreated"], fifth["eventsUpdated"], fifth["eventsRejected"]) == (1, 1, 0)
    assert _rejections(gdb) == [] and _links(gdb) == 7


def test_a_rejection_goes_once_the_event_is_no_longer_desired(gdb, connected, google, cipher, oauth):
    google.reject(400, "invalid", summary="Birthday")
    _push(gdb, cipher, oauth)
    assert len(_rejections(gdb)) == 2
    gdb.execute("DELETE FROM events WHERE uid = 'bday@x'")
    gdb.commit()
    sent = len(google.calls(*STATE_CHANGING))

    summary = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])

    assert _rejections(gdb) == [] and summary["errorCount"] == 0
    assert len(google.calls(*STATE_CHANGING)) == sent  # nothing to delete on Google: it never got there


def test_a_refused_patch_is_recorded_and_not_repeated(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)
    standup = google_event_id(ALICE, WORK, "standup@x", "")
    google.reject(403, "forbiddenForNonOrganizer", "Not the organizer.", event_id=standup, methods=("PATCH",))
    _event(gdb, WORK, "standup@x", "", "Standup (moved)", T0 + timedelta(hours=2), version=2)
    gdb.commit()

    summary = _push(gdb, cipher, oauth, calendar_ids=[WORK])
    again = _push(gdb, cipher, oauth, calendar_ids=[WORK])

    assert summary["eventsRejected"] == 1 and summary["errorCount"] == 0
    assert again["eventsRejected"] == 0 and len(google.rejected) == 1
    [row] = _rejections(gdb)
    assert (row["operation"], row["status"]) == ("patch", 403)
    stored = gdb.execute("SELECT content_hash FROM google_event_links WHERE uid = 'standup@x'").fetchone()[0]
    assert stored == "h:standup@x::Standup:1"  # the link still says what Google has


def test_a_409_whose_patch_fails_is_a_rejection_of_that_event(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)
    gdb.execute("DELETE FROM google_event_links WHERE user_id = %s", (BOB,))  # a crash lost Bob's links
    gdb.commit()
    bday = google_event_id(BOB, FAMILY, "bday@x", "")
    google.reject(400, "invalid", "Bad patch.", event_id=bday, methods=("PATCH",))

    summary = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])

    bob = _by_user(summary)[BOB]
    assert (bob["status"], bob["eventsCreated"], bob["eventsRejected"]) == ("updated", 2, 1)
    assert bob["rejections"][0]["operation"] == "patch"
    assert len(google.live_events("bob")) == 3  # no duplicate either way
    assert _links(gdb, BOB) == 2


def test_a_refused_delete_keeps_the_link_and_is_not_repeated(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)
    standup = google_event_id(ALICE, WORK, "standup@x", "")
    google.reject(403, "forbiddenForNonOrganizer", event_id=standup, methods=("DELETE",))
    gdb.execute("DELETE FROM events WHERE uid = 'standup@x'")
    gdb.commit()

    summary = _push(gdb, cipher, oauth, calendar_ids=[WORK])
    again = _push(gdb, cipher, oauth, calendar_ids=[WORK])

    assert (summary["eventsDeleted"], summary["eventsRejected"]) == (0, 1)
    assert again["eventsRejected"] == 0 and len(google.calls("DELETE")) == 1
    assert [r["operation"] for r in _rejections(gdb)] == ["delete"]
    assert _links(gdb, ALICE) == 4

    google.clear_rejections()
    gdb.execute("DELETE FROM google_push_rejections")
    gdb.commit()
    third = _push(gdb, cipher, oauth, calendar_ids=[WORK])
    assert (
        third["eventsDeleted"] == 1
        and _links(gdb, ALICE) == 3
        and "Standup" not in _summaries(google, "alice")
    )


def test_a_missing_target_calendar_is_an_error_of_the_member_not_of_its_events(
    gdb, connected, google, cipher, oauth
):
    google.remove_calendar("bob")

    results = {r.item_id: r for r in _push_results(gdb, cipher, oauth)}

    assert results[BOB].status == "error" and results[BOB].permanent is True
    assert "404" in results[BOB].error
    assert results[ALICE].status == "updated" and len(google.live_events("alice")) == 4
    assert _rejections(gdb) == [] and _links(gdb, BOB) == 0
    error = gdb.execute("SELECT last_error FROM google_accounts WHERE user_id = %s", (BOB,)).fetchone()[0]
    assert "GoogleApiError" in error and "404" in error


def test_a_401_after_the_refresh_is_an_error_of_the_member(gdb, connected, google, cipher, oauth):
    google.reject(401, "authError", "Invalid Credentials", summary="Birthday", owner="bob")

    results = {r.item_id: r for r in _push_results(gdb, cipher, oauth, calendar_ids=[FAMILY])}

    assert results[BOB].status == "error" and results[BOB].permanent is True and "401" in results[BOB].error
    assert _rejections(gdb) == []
    assert results[ALICE].status == "updated"


def test_a_token_that_cannot_be_decrypted_is_a_permanent_member_error(gdb, connected, google, oauth):
    results = {r.item_id: r for r in _push_results(gdb, TokenCipher(generate_key()), oauth)}

    assert {r.status for r in results.values()} == {"error"}
    assert all(r.permanent for r in results.values())
    assert "TokenDecryptError" in results[ALICE].error
    summary = summarize_batch(PUSH_KIND, list(results.values()))
    assert summary["permanentOnly"] and summary["batchFailed"]
    assert google.calls(*STATE_CHANGING) == []


# --- batch requests ------------------------------------------------------------------------


def _many(db, calendar_id: int, count: int, *, prefix: str = "many", first: datetime = T0) -> None:
    for n in range(count):
        _event(db, calendar_id, f"{prefix}-{n}@x", "", f"Many {n}", first + timedelta(hours=n))
    db.commit()


def test_calls_go_in_batch_requests_of_at_most_50(gdb, connected, google, cipher, oauth):
    _many(gdb, WORK, 119)  # Alice: 120 WORK events and 3 FAMILY ones; Bob: 3

    summary = _push(gdb, cipher, oauth)

    calls = len(google.calls("POST"))
    assert calls == summary["eventsCreated"] == 126 and summary["errorCount"] == 0
    assert google.batch_requests() == [50, 50, 23, 3]  # in order: Alice's 123, then Bob's 3
    assert len(google.batch_requests()) <= math.ceil(123 / 50) + math.ceil(3 / 50)
    assert google.single_requests() == 0
    assert len(google.live_events("alice")) == 123 and _links(gdb, ALICE) == 123


def test_the_batch_size_setting_bounds_each_request(gdb, connected, google, cipher, oauth):
    summary = _push(gdb, cipher, oauth, batch_size=2)

    assert summary["eventsCreated"] == 7
    assert google.batch_requests() == [2, 2, 2]  # Alice's 4, then Bob's first 2
    assert google.single_requests() == 1  # Bob's last call: one call goes as a plain request
    with pytest.raises(ConfigError, match="google_batch_size"):
        _push(gdb, cipher, oauth, batch_size=51)


def test_a_single_change_is_one_plain_request(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)
    before = (list(google.batch_requests()), google.single_requests())
    _event(gdb, WORK, "standup@x", "", "Standup (moved)", T0 + timedelta(hours=2), version=2)
    gdb.commit()

    summary = _push(gdb, cipher, oauth, calendar_ids=[WORK])

    assert summary["eventsUpdated"] == 1
    assert (google.batch_requests(), google.single_requests()) == (before[0], before[1] + 1)


def test_the_batch_endpoint_follows_the_api_endpoint_override():
    # The client library would post to www.googleapis.com whatever the api_endpoint: we don't.
    assert batch_uri("http://127.0.0.1:8/calendar/v3/") == "http://127.0.0.1:8/batch/calendar/v3"
    assert batch_uri("https://proxy.test/google/calendar/v3") == "https://proxy.test/google/batch/calendar/v3"
    assert batch_uri("https://proxy.test/") == "https://proxy.test/batch/calendar/v3"
    assert batch_uri(None) is None  # Google's own: the discovery document's batchPath


def test_each_call_in_a_batch_keeps_its_own_outcome(gdb, connected, google, cipher, oauth):
    """One batch answers 400 for one part, 409 for another and 429 for a third: the 400 is a
    rejection, the 409 is patched and the 429 goes again in a later batch after its Retry-After;
    the other parts are done at once."""
    _many(gdb, WORK, 4)  # Many 0..3 besides the Standup
    google.reject(400, "invalid", "Invalid start time.", summary="Many 1", owner="alice")
    google.reject(429, "rateLimitExceeded", "Slow down.", summary="Many 2", times=1, retry_after=5)
    taken = google_event_id(ALICE, WORK, "many-3@x", "")  # already on Google (a crash lost its link)
    google.events[("alice", "primary")] = {taken: {"id": taken, "summary": "stale", "status": "confirmed"}}
    waits: list[float] = []

    summary = _push(gdb, cipher, oauth, calendar_ids=[WORK], sleep=waits)

    assert google.batch_requests() == [5, 2]  # then the patch after the 409 and the 429, together
    assert waits == [5.0]  # the Retry-After of the 429 part, once
    alice = _by_user(summary)[ALICE]
    assert (alice["status"], alice["eventsCreated"], alice["eventsRejected"]) == ("updated", 4, 1)
    assert alice["rejections"][0]["uid"] == "many-1@x" and alice["rejections"][0]["status"] == 400
    live = google.live_events("alice")
    assert sorted(e["summary"] for e in live.values()) == ["Many 0", "Many 2", "Many 3", "Standup"]
    assert [(m, p.rsplit("/", 1)[-1]) for m, p, _ in google.calls("PATCH")] == [("PATCH", taken)]
    assert [r["uid"] for r in _rejections(gdb)] == ["many-1@x"] and _links(gdb, ALICE) == 4
    # the next run sends nothing: the refused content is held, the rest is linked
    sent = len(google.calls(*STATE_CHANGING))
    listed = _push(gdb, cipher, oauth, calendar_ids=[WORK])["results"]
    assert [(r["userId"], r["status"], r["eventsHeld"]) for r in listed] == [(ALICE, "unchanged", 1)]
    assert len(google.calls(*STATE_CHANGING)) == sent


def test_a_member_error_inside_a_batch_keeps_the_rest_of_that_batch(gdb, connected, google, cipher, oauth):
    _many(gdb, WORK, 4)
    google.reject(401, "authError", "Invalid Credentials", summary="Many 2", owner="alice")

    results = {r.item_id: r for r in _push_results(gdb, cipher, oauth, calendar_ids=[WORK])}

    assert results[ALICE].status == "error" and "401" in results[ALICE].error
    assert results[ALICE].counts["eventsCreated"] == 4  # the other parts of the batch are linked
    assert _links(gdb, ALICE) == 4 and len(google.live_events("alice")) == 4


def test_a_crash_mid_batch_then_a_rerun_does_not_duplicate(gdb, connected, google, cipher, oauth):
    """The links of the last batches were never committed (the task died): the rerun's inserts
    answer 409 and become patches, in batches too."""
    _many(gdb, WORK, 119)
    _push(gdb, cipher, oauth, calendar_ids=[WORK])
    gdb.execute(
        "DELETE FROM google_event_links WHERE user_id = %s AND uid IN "
        "(SELECT uid FROM events WHERE calendar_id = %s ORDER BY uid DESC LIMIT 70)",
        (ALICE, WORK),
    )
    gdb.commit()
    batches = len(google.batch_requests())

    again = _push(gdb, cipher, oauth, calendar_ids=[WORK])

    assert again["eventsCreated"] == 70 and again["errorCount"] == 0
    # 70 inserts (409), then 70 patches: follow-ups fill the next batches, ceil(140 / 50) requests
    assert google.batch_requests()[batches:] == [50, 50, 40]
    assert len(google.live_events("alice")) == 120 and _links(gdb, ALICE) == 120



def test_a_copy_moved_to_another_calendar_keeps_its_new_link_when_the_old_delete_is_retried(
    gdb, connected, google, cipher, oauth
):
    """Regression guard for batching: the delete of the old copy can succeed after the insert of
    the new one (it was retried in a later batch); it must not remove the new link."""
    _push(gdb, cipher, oauth, calendar_ids=[WORK])
    standup = google_event_id(ALICE, WORK, "standup@x", "")
    gdb.execute("UPDATE google_accounts SET target_calendar_id = 'almanac' WHERE user_id = %s", (ALICE,))
    gdb.commit()
    google.reject(503, "backendError", "Try again.", event_id=standup, methods=("DELETE",), times=1)
    waits: list[float] = []

    summary = _push(gdb, cipher, oauth, calendar_ids=[WORK], sleep=waits)

    # delete + insert in one batch request, then the delete again alone (the first push: one call)
    assert (google.batch_requests(), google.single_requests(), waits) == ([2], 2, [1.0])
    assert (summary["eventsCreated"], summary["eventsDeleted"], summary["errorCount"]) == (1, 1, 0)
    assert google.live_events("alice") == {} and list(google.live_events("alice", "almanac")) == [standup]
    gdb.commit()
    assert gdb.execute(
        "SELECT google_calendar_id, google_event_id FROM google_event_links WHERE user_id = %s", (ALICE,)
    ).fetchall() == [("almanac", standup)]
    assert _push(gdb, cipher, oauth, calendar_ids=[WORK])["results"] == []

# --- the sync window -------------------------------------------------------------------------


WINDOW = sync_window(T0, Settings())  # [T0 - 30 days, T0 + 365 days)


def test_only_instances_starting_inside_the_window_are_pushed(gdb, connected, google, cipher, oauth):
    start, end = WINDOW
    _event(gdb, WORK, "old@x", "", "Long ago", start - timedelta(seconds=1))
    _event(gdb, WORK, "first@x", "", "First in", start)
    _event(gdb, WORK, "last@x", "", "Last in", end - timedelta(seconds=1))
    _event(gdb, WORK, "far@x", "", "Too far", end)  # the window ends before its end
    gdb.commit()

    summary = _push(gdb, cipher, oauth, calendar_ids=[WORK], window=WINDOW)

    assert _summaries(google, "alice") == ["First in", "Last in", "Standup"]
    assert summary["eventsCreated"] == 3 and _links(gdb, ALICE) == 3


def test_copies_that_aged_out_of_the_window_are_left_alone(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth, window=WINDOW)  # everything of the fixture is in the window
    assert _summaries(google, "alice") == ["Birthday", "Standup", "Swimming", "Swimming"]
    later = sync_window(T0 + timedelta(days=38), Settings())  # starts at T0 + 8 days
    assert later[0] > T0 + timedelta(days=7)  # every instance of the fixture is history now
    # history is edited, cancelled, or in a calendar the member left; one new instance is inside
    _event(gdb, FAMILY, "swim@x", "20260310T090000Z", "Swimming (edited)", T0, version=2)
    gdb.execute("UPDATE events SET status = 'cancelled' WHERE uid = 'bday@x'")
    gdb.execute("DELETE FROM calendar_members WHERE calendar_id = %s AND user_id = %s", (WORK, ALICE))
    _event(gdb, FAMILY, "late@x", "", "Late", T0 + timedelta(days=40))
    gdb.commit()
    sent = len(google.calls(*STATE_CHANGING))

    summary = _push(gdb, cipher, oauth, window=later)

    assert (summary["eventsCreated"], summary["eventsUpdated"], summary["eventsDeleted"]) == (2, 0, 0)
    assert len(google.calls(*STATE_CHANGING)) == sent + 2  # only the new event, for Alice and Bob
    assert _summaries(google, "alice") == ["Birthday", "Late", "Standup", "Swimming", "Swimming"]
    assert _links(gdb) == 9  # the old links stay too


def test_deleted_and_cancelled_instances_inside_the_window_are_still_deleted(
    gdb, connected, google, cipher, oauth
):
    _push(gdb, cipher, oauth, window=WINDOW)
    gdb.execute("UPDATE events SET status = 'cancelled' WHERE uid = 'bday@x'")
    gdb.execute("DELETE FROM events WHERE uid = 'standup@x'")
    gdb.commit()

    summary = _push(gdb, cipher, oauth, window=WINDOW)

    assert summary["eventsDeleted"] == 3  # Birthday for both, Standup for Alice
    assert _summaries(google, "alice") == ["Swimming", "Swimming"]
    assert _summaries(google, "bob") == ["Swimming", "Swimming"]
    with pytest.raises(ConfigError, match="window"):
        _push(gdb, cipher, oauth, window=(WINDOW[1], WINDOW[0]))


# --- the account a link was pushed to ---------------------------------------------------


def _connect(db, cipher, user_id, token, subject) -> None:
    connect_account(db, cipher, user_id, token, account_subject=subject)
    db.commit()


def test_reconnecting_another_google_account_pushes_everything_to_the_new_account(
    gdb, connected, google, cipher, oauth
):
    _push(gdb, cipher, oauth)
    assert len(google.live_events("alice")) == 4

    # Alice connects her other Google account; the next run is scoped to FAMILY only
    _connect(gdb, cipher, ALICE, google.grant("alice-work"), "sub-alice-work")
    summary = _push(gdb, cipher, oauth, calendar_ids=[FAMILY])

    assert _by_user(summary)[ALICE]["eventsCreated"] == 4  # WORK too: nothing was in that account
    assert _summaries(google, "alice-work") == ["Birthday", "Standup", "Swimming", "Swimming"]
    subjects = gdb.execute(
        "SELECT DISTINCT account_subject FROM google_event_links WHERE user_id = %s", (ALICE,)
    ).fetchall()
    assert subjects == [("sub-alice-work",)] and _links(gdb, ALICE) == 4

    # back to the first account: its copies are found again (409 -> patch), never duplicated
    _connect(gdb, cipher, ALICE, google.grant("alice"), "sub-alice")
    back = _push(gdb, cipher, oauth)
    assert _by_user(back)[ALICE]["eventsCreated"] == 4 and back["errorCount"] == 0
    assert len(google.live_events("alice")) == 4 and len(google.live_events("alice-work")) == 4
    assert _summaries(google, "alice") == ["Birthday", "Standup", "Swimming", "Swimming"]
    assert _push(gdb, cipher, oauth)["results"] == []


def test_reconnecting_the_same_account_keeps_its_links(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)
    sent = len(google.calls(*STATE_CHANGING))

    _connect(gdb, cipher, ALICE, google.grant("alice"), "sub-alice")  # a new grant, same account
    again = _push(gdb, cipher, oauth)

    assert len(google.calls(*STATE_CHANGING)) == sent and again["results"] == []
    assert _links(gdb, ALICE) == 4


def test_rejections_of_another_account_are_forgotten(gdb, connected, google, cipher, oauth):
    google.reject(400, "invalid", summary="Birthday", owner="alice")
    _push(gdb, cipher, oauth)
    assert [r["user_id"] for r in _rejections(gdb)] == [ALICE]

    _connect(gdb, cipher, ALICE, google.grant("alice-work"), "sub-alice-work")
    _push(gdb, cipher, oauth)

    assert "Birthday" in _summaries(google, "alice-work") and _rejections(gdb) == []


# --- time ------------------------------------------------------------------------------


def test_the_database_session_time_zone_does_not_move_all_day_events(gdb, connected, google, cipher, oauth):
    """timestamptz comes back in the session's zone; the all-day date is read in UTC regardless."""
    gdb.execute("SET TIME ZONE 'Pacific/Honolulu'")

    _push(gdb, cipher, oauth, calendar_ids=[FAMILY])

    bday = google.live_events("alice")[google_event_id(ALICE, FAMILY, "bday@x", "")]
    assert bday["start"] == {"date": "2026-03-12"} and bday["end"] == {"date": "2026-03-13"}


# --- pending pushes ------------------------------------------------------------------------


def _pending(db, rows: dict[int, int]) -> None:
    for calendar_id, generation in rows.items():
        db.execute(
            "INSERT INTO calendar_push_pending (calendar_id, generation) VALUES (%s, %s) "
            "ON CONFLICT (calendar_id) DO UPDATE SET generation = EXCLUDED.generation",
            (calendar_id, generation),
        )
    db.commit()


def _pending_rows(db) -> dict[int, int]:
    db.commit()
    return dict(db.execute("SELECT calendar_id, generation FROM calendar_push_pending").fetchall())


def test_pending_pushes_reads_every_calendars_generation(gdb):
    assert pending_pushes(gdb) == {}
    _pending(gdb, {FAMILY: 3, WORK: 1, 99: 7})

    assert pending_pushes(gdb) == {FAMILY: 3, WORK: 1, 99: 7}


def test_clear_pushed_keeps_a_change_stored_after_the_snapshot(gdb):
    _pending(gdb, {FAMILY: 3, WORK: 1, 99: 7})
    snapshot = pending_pushes(gdb)
    _pending(gdb, {WORK: 2})  # ics_sync stored another change to WORK meanwhile

    cleared = clear_pushed(gdb, snapshot, [])
    gdb.commit()

    assert cleared == 2
    assert _pending_rows(gdb) == {WORK: 2}


def test_clear_pushed_keeps_the_calendars_of_failed_members(gdb, connected, google, cipher, oauth):
    _push(gdb, cipher, oauth)  # Bob has links into FAMILY
    gdb.execute("DELETE FROM calendar_members WHERE user_id = %s", (BOB,))  # ... and left it
    _pending(gdb, {FAMILY: 1, WORK: 1, 99: 1})
    snapshot = pending_pushes(gdb)

    assert clear_pushed(gdb, snapshot, [BOB]) == 2  # FAMILY stays: Bob has links into it
    gdb.commit()
    assert _pending_rows(gdb) == {FAMILY: 1}

    _pending(gdb, {FAMILY: 1, WORK: 1})
    assert clear_pushed(gdb, pending_pushes(gdb), [ALICE]) == 0  # Alice is a member of both
    gdb.rollback()
    assert clear_pushed(gdb, {}, []) == 0
    assert clear_pushed(gdb, {FAMILY: 1, WORK: 1}, []) == 2
    gdb.rollback()  # the caller commits: without it nothing is cleared
    assert _pending_rows(gdb) == {FAMILY: 1, WORK: 1}


# --- the DAG ---------------------------------------------------------------------------


@pytest.fixture
def airflow_google_env(monkeypatch, google, cipher):
    key = generate_key()
    monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY", key)
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOOGLE_OAUTH",
        json.dumps(
            {
                "conn_type": "generic",
                "login": "almanac-test-client",
                "password": "almanac-test-secret",
                "extra": {"token_uri": google.token_uri, "api_endpoint": google.api_endpoint},
            }
        ),
    )
    return TokenCipher(key)


def test_the_dag_pushes_and_a_second_run_changes_nothing(gdb, google, airflow_google_env):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder="dags/google_calendar_push.py")
    assert not bag.import_errors
    dag = bag.get_dag("google_calendar_push")
    for user_id, owner in [(ALICE, "alice"), (BOB, "bob")]:
        connect_account(gdb, airflow_google_env, user_id, google.grant(owner))
    gdb.commit()

    # Runs at the fixture's dates: the window is the sync window of the run's instant.
    run = dag.test(logical_date=T0, run_conf={"calendar_ids": [FAMILY]})
    assert run.state == "success"
    assert _summaries(google, "alice") == ["Birthday", "Swimming", "Swimming"]
    assert len(google.live_events("bob")) == 3
    changing = len(google.calls(*STATE_CHANGING))

    # Every calendar: adds Alice's WORK event, repeats nothing. (Explicit empty conf: in one
    # process, dag.test() leaves the previous run's conf in the DAG's Param objects.)
    again = dag.test(logical_date=T0 + timedelta(hours=1), run_conf={"calendar_ids": []})
    assert again.state == "success"
    assert len(google.calls(*STATE_CHANGING)) == changing + 1
    assert _summaries(google, "alice") == ["Birthday", "Standup", "Swimming", "Swimming"]



def test_the_dag_pushes_its_runs_sync_window_in_batches_of_the_setting(
    gdb, google, airflow_google_env, monkeypatch
):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder="dags/google_calendar_push.py").get_dag("google_calendar_push")
    for user_id, owner in [(ALICE, "alice"), (BOB, "bob")]:
        connect_account(gdb, airflow_google_env, user_id, google.grant(owner))
    _event(gdb, FAMILY, "old@x", "", "Old", T0 - timedelta(days=60))
    gdb.commit()
    monkeypatch.setenv("AIRFLOW_VAR_ALMANAC_SETTINGS", json.dumps({"google_batch_size": 2}))

    run = dag.test(logical_date=T0, run_conf={"calendar_ids": [FAMILY]})

    assert run.state == "success"
    assert _summaries(google, "bob") == ["Birthday", "Swimming", "Swimming"]  # not Old: 60 days back
    assert google.batch_requests() == [2, 2] and google.single_requests() == 2  # 3 calls each: 2 + 1

    monkeypatch.setenv(
        "AIRFLOW_VAR_ALMANAC_SETTINGS", json.dumps({"google_batch_size": 2, "ics_window_days_back": 90})
    )
    again = dag.test(logical_date=T0 + timedelta(hours=1), run_conf={"calendar_ids": [FAMILY]})

    assert again.state == "success"
    assert _summaries(google, "bob") == ["Birthday", "Old", "Swimming", "Swimming"]

# --- the run's scope, read the Airflow 3 way ---------------------------------------------


def _asset_event(extra: dict):
    from airflow.sdk.api.datamodels._generated import AssetReferenceAssetEventDagRun
    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult

    uri = "almanac://ics/calendars-changed"
    return AssetEventDagRunReferenceResult(
        asset=AssetReferenceAssetEventDagRun(name=uri, uri=uri, extra={}),
        extra=extra,
        source_task_id="announce_changes",
        source_dag_id="ics_sync",
        source_run_id="r",
        source_map_index=-1,
        source_aliases=[],
        timestamp=T0,
    )


@pytest.mark.parametrize(
    ("params", "extras", "expected"),
    [
        ({"calendar_ids": None}, [{"calendar_ids": [20, 10]}, {"calendar_ids": [10, 30]}], [10, 20, 30]),
        ({"calendar_ids": [7, 7]}, [{"calendar_ids": [10]}], [7]),  # a manual choice wins
        ({"calendar_ids": []}, [], None),  # manual, empty: everything
        ({"calendar_ids": None}, [{}], None),  # an asset event made by hand: everything
    ],
)
def test_the_scope_comes_from_params_or_the_triggering_asset_events_extras(params, extras, expected):
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    from almanac_airflow.assets import ICS_CALENDARS_CHANGED
    from almanac_airflow.google_push import push_scope

    context = {
        "params": params,
        "triggering_asset_events": TriggeringAssetEventsAccessor.build(_asset_event(e) for e in extras),
    }
    assert push_scope(context, ICS_CALENDARS_CHANGED) == expected


def test_a_change_no_asset_event_named_is_pushed_from_pending_then_cleared(gdb, google, airflow_google_env):
    """Regression: calendars committed by an ics_sync try that failed were never announced, so
    their Google copies stayed stale for good. Now they wait in calendar_push_pending."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder="dags/google_calendar_push.py")
    dag = bag.get_dag("google_calendar_push")
    connect_account(gdb, airflow_google_env, ALICE, google.grant("alice"), account_subject="sub-alice")
    gdb.commit()
    dag.test(logical_date=T0, run_conf={"calendar_ids": []})  # everything pushed once
    assert _summaries(google, "alice") == ["Birthday", "Standup", "Swimming", "Swimming"]

    # A change to WORK, committed with its pending mark, but the run that made it never announced it.
    _event(gdb, WORK, "standup@x", "", "Standup (moved)", T0 + timedelta(hours=1), version=2)
    gdb.execute("INSERT INTO calendar_push_pending (calendar_id, generation) VALUES (%s, 1)", (WORK,))
    gdb.commit()
    run = dag.test(logical_date=T0 + timedelta(hours=1), run_conf={"calendar_ids": [FAMILY]})  # not WORK
    assert run.state == "success"
    assert "Standup (moved)" in _summaries(google, "alice")
    assert _pending_rows(gdb) == {}

"""almanac.integrations against the real application DB, real Redis leases and a local OAuth 2
provider (``almanac.integrations.fakes``) reached through ``requests``: refresh, rotation,
revocation told once, failures and backoff, leases, health checks, the product's view, and the
data migration from ``google_accounts``."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from almanac.db.migrate import apply_migrations, available_migrations
from almanac.errors import RetryableError
from almanac.google.crypto import TokenCipher, generate_key
from almanac.integrations import store
from almanac.integrations.fakes import FakeOAuthProvider
from almanac.integrations.health import HealthChecker
from almanac.integrations.providers import ProviderConfig
from almanac.integrations.refresh import IntegrationUnusableError, Refresher, RefreshOptions, plain_session
from almanac.leases import LeaseKeeper, lease_key
from almanac.retry import RetryPolicy
from tests.support.db import lent

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
OWNER, ALICE, BOB = 1, 2, 3
CLIENT_ID, CLIENT_SECRET = "almanac-client", "almanac-secret"


@pytest.fixture
def provider():
    with FakeOAuthProvider(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as fake:
        yield fake


@pytest.fixture
def cipher() -> TokenCipher:
    return TokenCipher(generate_key())


@pytest.fixture
def tenant(db):
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 'Smiths')")
    for user_id, name in [(OWNER, "owner"), (ALICE, "alice"), (BOB, "bob")]:
        db.execute(
            "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
            (user_id, name, f"{name}@x.test"),
        )
    db.execute("UPDATE tenants SET owner_user_id = %s WHERE id = 1", (OWNER,))
    db.commit()
    return 1


def _config(provider, **overrides) -> ProviderConfig:
    values = {
        "name": "acme",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_url": provider.token_url,
        "health_url": provider.userinfo_url,
    } | overrides
    return ProviderConfig(**values)


@pytest.fixture
def refresher_for(redis_client, cipher, provider):
    """``refresher_for(**options)``: a Refresher on the fake, waits recorded in ``.waits``."""
    keepers: list[LeaseKeeper] = []

    def make(config: ProviderConfig | None = None, owner: str = "test-refresh", **options) -> Refresher:
        keeper = LeaseKeeper(redis_client, owner)
        keepers.append(keeper)
        waits: list[float] = []
        opts = RefreshOptions(
            policy=RetryPolicy(attempts=3, base_wait_s=1, max_wait_s=10, timeout_s=5), **options
        )
        refresher = Refresher(
            cipher, lambda name: config or _config(provider), keeper, opts, sleep=waits.append
        )
        refresher.waits = waits
        return refresher

    yield make
    for keeper in keepers:
        keeper.close()


def _connect(
    db, cipher, provider, user_id=ALICE, *, subject="alice", prefix="", expires_at=None, access_token=None
) -> tuple[int, str]:
    token = provider.grant(subject, prefix=prefix)
    integration_id = store.connect(
        db,
        cipher,
        tenant_id=1,
        user_id=user_id,
        provider="acme",
        refresh_token=token,
        access_token=access_token,
        expires_at=expires_at,
        scopes=["openid", "email"],
        account_subject=subject,
        now=NOW,
    )
    db.commit()
    return integration_id, token


def _row(db, integration_id) -> dict:
    cur = db.execute("SELECT * FROM integrations WHERE id = %s", (integration_id,))
    names = [c.name for c in cur.description]
    row = dict(zip(names, cur.fetchone(), strict=True))
    db.commit()
    return row


def _notifications(db) -> list[tuple]:
    rows = db.execute(
        "SELECT user_id, kind, idempotency_key, channel FROM notifications ORDER BY id"
    ).fetchall()
    db.commit()
    return rows


# --- the scheduled selection --------------------------------------------------------------


def test_due_means_expiring_before_the_interval_end_plus_lead_and_a_backfill_finds_only_what_is_left(
    db, tenant, cipher, provider, refresher_for
):
    soon, _ = _connect(
        db, cipher, provider, ALICE, access_token="at-old", expires_at=NOW + timedelta(minutes=4)
    )
    later, _ = _connect(
        db,
        cipher,
        provider,
        BOB,
        subject="bob",
        access_token="at-old",
        expires_at=NOW + timedelta(minutes=30),
    )
    assert store.due_for_refresh(db, NOW) == [soon]  # expires within the 5-minute lead
    assert store.due_for_refresh(db, NOW + timedelta(minutes=26)) == [soon, later]

    refresher = refresher_for()
    [result] = refresher.refresh_many(lambda: lent(db), [soon], due_before=NOW)
    assert result.status == "updated" and result.counts["refreshed"] == 1
    # Refreshed now (the real clock): its next refresh is an hour - 5 min away, past any earlier end.
    assert store.due_for_refresh(db, NOW + timedelta(minutes=26)) == [later]
    again = refresher.refresh(db, soon, due_before=NOW)  # a retry / rerun / backfill of that window
    assert again.status == "unchanged"
    assert provider.state.refreshes() == 1


def test_a_refresh_stores_the_new_access_token_encrypted_and_schedules_the_next_one(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, refresh_token = _connect(db, cipher, provider)
    result = refresher_for().refresh(db, integration_id)
    assert result.status == "updated" and result.counts == {"refreshed": 1, "rotated": 0}
    row = _row(db, integration_id)

    access = cipher.decrypt(row["access_token_enc"])
    assert provider.state.access_token_subject(access) == "alice"
    assert row["status"] == "active" and row["consecutive_failures"] == 0 and row["last_error"] is None
    assert row["next_refresh_at"] == row["access_token_expires_at"] - timedelta(minutes=5)
    lifetime = row["access_token_expires_at"] - row["last_refresh_at"]  # from the request to the answer
    assert abs(lifetime - timedelta(hours=1)) < timedelta(seconds=2)
    assert cipher.decrypt(row["refresh_token_enc"]) == refresh_token  # not rotated: kept
    assert refresh_token not in str(row) and access not in str(row)  # nothing in clear


def test_a_rotated_refresh_token_replaces_the_old_one_which_no_longer_works(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, first = _connect(db, cipher, provider, prefix="rotate-")
    refresher = refresher_for()
    result = refresher.refresh(db, integration_id)
    assert result.counts["rotated"] == 1
    second = cipher.decrypt(_row(db, integration_id)["refresh_token_enc"])
    assert second != first
    assert refresher.refresh(db, integration_id).status == "updated"  # the new one works
    third = cipher.decrypt(_row(db, integration_id)["refresh_token_enc"])
    assert third not in (first, second)
    assert provider.state.refreshes() == 2


# --- revocation ----------------------------------------------------------------------------


def test_invalid_grant_revokes_erases_the_tokens_and_tells_the_tenant_owner_once(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, token = _connect(db, cipher, provider)
    provider.revoke(token)
    refresher = refresher_for()

    result = refresher.refresh(db, integration_id)

    assert result.status == "skipped" and result.counts["revoked"] == 1 and "invalid_grant" in result.error
    row = _row(db, integration_id)
    assert row["status"] == "revoked" and row["health_status"] == "revoked"
    assert row["refresh_token_enc"] is None and row["access_token_enc"] is None
    assert "invalid_grant" in row["last_error"] and row["revoked_at"] is not None
    told = _notifications(db)
    assert told == [
        (
            OWNER,
            "integration_revoked",
            f"integration-revoked:{integration_id}:{row['revoked_at'].isoformat()}",
            "email",
        )
    ]
    body = db.execute("SELECT body FROM notifications").fetchone()[0]
    assert "alice's Acme account" in body and "Smiths" in body and token not in body

    # Found again (another run, a health check): nothing changes, nobody is told twice.
    assert refresher.refresh(db, integration_id).status == "skipped"
    assert store.mark_revoked(db, integration_id, "again", now=NOW) is False
    db.commit()
    assert len(_notifications(db)) == 1

    # The user reconnects; a later revocation is a new one, told again.
    integration_id2, token2 = _connect(db, cipher, provider)
    assert integration_id2 == integration_id and _row(db, integration_id)["status"] == "active"
    provider.revoke(token2)
    refresher.refresh(db, integration_id)
    assert len(_notifications(db)) == 2


def test_a_tenant_without_owner_tells_the_integrations_own_user(db, tenant, cipher, provider, refresher_for):
    db.execute("UPDATE tenants SET owner_user_id = NULL")
    integration_id, token = _connect(db, cipher, provider, BOB, subject="bob")
    provider.revoke(token)
    refresher_for().refresh(db, integration_id)
    assert [(n[0], n[1]) for n in _notifications(db)] == [(BOB, "integration_revoked")]


# --- failures: retried in the task, then expired with the reason, backoff, error ------------


def test_429_with_retry_after_is_waited_for_and_the_refresh_succeeds(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, _ = _connect(db, cipher, provider)
    provider.fail_next(2, 429, retry_after=3)
    refresher = refresher_for()
    result = refresher.refresh(db, integration_id)
    assert result.status == "updated" and refresher.waits == [3.0, 3.0]


def test_failures_after_the_retries_expire_the_integration_with_the_reason_and_back_off(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, _ = _connect(db, cipher, provider, prefix="unavailable-")
    refresher = refresher_for(max_failures=3)

    first = refresher.refresh(db, integration_id)
    row = _row(db, integration_id)
    assert first.status == "error" and not first.permanent and first.counts["failed"] == 1
    assert row["status"] == "expired" and row["consecutive_failures"] == 1
    assert "503" in row["last_error"] and "after 3 attempts" in row["last_error"]
    assert refresher.waits == [1.0, 2.0]  # exponential, within the task
    backoff = row["next_refresh_at"] - row["updated_at"]
    assert backoff == timedelta(minutes=1)

    refresher.refresh(db, integration_id)
    assert _row(db, integration_id)["next_refresh_at"] - _row(db, integration_id)["updated_at"] == timedelta(
        minutes=2
    )
    refresher.refresh(db, integration_id)
    row = _row(db, integration_id)
    assert row["status"] == "error" and row["consecutive_failures"] == 3  # no more scheduled refreshes
    assert row["next_refresh_at"] is None  # the view shows no refresh that will not come
    assert store.due_for_refresh(db, NOW + timedelta(days=1)) == []
    assert refresher.refresh(db, integration_id, due_before=NOW + timedelta(days=1)).status == "skipped"


def test_a_refused_client_is_a_permanent_error_that_names_the_cause_not_the_secret(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, _ = _connect(db, cipher, provider)
    refresher = refresher_for(_config(provider, client_secret="wrong-secret"))
    result = refresher.refresh(db, integration_id)
    assert result.status == "error" and result.permanent and "invalid_client" in result.error
    assert "wrong-secret" not in result.error and refresher.waits == []  # not retried
    assert _row(db, integration_id)["status"] == "expired"


@pytest.mark.parametrize(
    "prefix, expected", [("badjson-", "without an access_token"), ("slow-", "unreachable")]
)
def test_a_provider_that_answers_garbage_or_too_slowly_costs_only_its_integration(
    db, tenant, cipher, provider, refresher_for, prefix, expected
):
    bad, _ = _connect(db, cipher, provider, ALICE, prefix=prefix)
    good, _ = _connect(db, cipher, provider, BOB, subject="bob")
    refresher = refresher_for()
    refresher.options = RefreshOptions(policy=RetryPolicy(attempts=1, timeout_s=0.5))
    results = {r.item_id: r for r in refresher.refresh_many(lambda: lent(db), [bad, good], parallel=1)}
    assert results[bad].status == "error" and expected in results[bad].error
    assert results[good].status == "updated"


# --- one refresh at a time -----------------------------------------------------------------


def test_a_lease_held_elsewhere_makes_the_scheduled_refresh_busy_and_the_request_time_one_wait(
    db, tenant, cipher, provider, refresher_for, redis_client, migrated
):
    import psycopg

    integration_id, _ = _connect(db, cipher, provider)
    other = refresher_for(owner="the-product-backend")
    lease = other.leases.acquire(lease_key("oauth_refresh", integration_id))
    assert lease.taken
    scheduled = refresher_for(owner="oauth_token_refresh/run/refresh_batch/0")
    assert scheduled.refresh(db, integration_id).status == "busy"

    # The holder refreshes and lets go while a request-time caller waits for the lease.
    def holder():
        with psycopg.connect(migrated) as conn:
            other.refresh(conn, integration_id)  # the same owner: it may take its own lease again
        other.leases.release(lease)

    waiter = refresher_for(owner="google_calendar_push/run/push_batch/0", lease_wait_s=10)
    thread = threading.Timer(0.5, holder)
    thread.start()
    token, expiry = waiter.access_token(db, integration_id)
    thread.join()
    assert provider.state.access_token_subject(token) == "alice" and expiry > datetime.now(UTC)
    assert provider.state.refreshes() == 1  # the waiter used the holder's refresh


def test_an_asked_for_refresh_happens_once_per_request_even_when_not_due(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, _ = _connect(db, cipher, provider, access_token="at", expires_at=NOW + timedelta(days=1))
    refresher = refresher_for()
    asked = datetime.now(UTC) - timedelta(seconds=1)
    assert refresher.refresh(db, integration_id, requested_at=asked).status == "updated"  # not due: forced
    assert refresher.refresh(db, integration_id, requested_at=asked).status == "unchanged"  # a retry
    assert provider.state.refreshes() == 1


def test_request_time_access_token_refreshes_only_when_needed_and_refuses_a_revoked_one(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, token = _connect(db, cipher, provider)
    refresher = refresher_for()
    first, _ = refresher.access_token(db, integration_id)  # none stored: refreshed
    again, _ = refresher.access_token(db, integration_id)  # valid: reused
    assert first == again and provider.state.refreshes() == 1
    forced, _ = refresher.access_token(db, integration_id, force=True)  # the provider refused it
    assert forced != first and provider.state.refreshes() == 2
    provider.revoke(token)
    with pytest.raises(IntegrationUnusableError, match="invalid_grant"):
        refresher.access_token(db, integration_id, force=True)


def test_many_integrations_in_parallel_are_each_refreshed_once(
    db, tenant, cipher, provider, refresher_for, migrated
):
    import psycopg

    for n in range(60):
        db.execute(
            "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 1, %s, %s)",
            (100 + n, f"u{n}", f"u{n}@x.test"),
        )
        _connect(db, cipher, provider, 100 + n, subject=f"u{n}")
    end = NOW + timedelta(minutes=1)  # connected at NOW without an access token: due at once
    ids = store.due_for_refresh(db, end)
    assert len(ids) == 60
    results = refresher_for().refresh_many(lambda: psycopg.connect(migrated), ids, parallel=8, due_before=end)
    assert [r.status for r in results] == ["updated"] * 60
    assert provider.state.refreshes() == 60 and store.due_for_refresh(db, end) == []


# --- health ------------------------------------------------------------------------------


def _checker(cipher, provider, config=None) -> HealthChecker:
    return HealthChecker(
        cipher,
        lambda name: config or _config(provider),
        session=plain_session,
        clock=lambda: datetime.now(UTC),
        timeout_s=2,
    )


def test_health_records_healthy_expired_revoked_and_error_and_never_retries(
    db, tenant, cipher, provider, refresher_for
):
    healthy, _ = _connect(db, cipher, provider, ALICE)
    refresher_for().refresh(db, healthy)
    expired, _ = _connect(db, cipher, provider, BOB, subject="bob")
    refresher_for().refresh(db, expired)
    provider.expire_access_tokens("bob")  # Bob's access token stops working (401)
    db.execute("INSERT INTO users (id, tenant_id, name, email) VALUES (4, 1, 'carol', 'c@x.test')")
    gone = store.connect(
        db,
        cipher,
        tenant_id=1,
        user_id=4,
        provider="acme",
        refresh_token=None,
        access_token=provider.state.issue_access_token("carol", ttl=-10),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        now=NOW,
    )
    db.commit()
    since = datetime.now(UTC) - timedelta(seconds=1)

    summary = {
        r.item_id: r
        for r in _checker(cipher, provider).check_many(
            lambda: lent(db), [healthy, expired, gone], checked_since=since, parallel=1
        )
    }

    assert summary[healthy].status == "updated" and summary[healthy].counts == {"healthy": 1}
    assert summary[expired].detail["healthTo"] == "expired"
    assert _row(db, expired)["status"] == "expired" and _row(db, expired)["next_refresh_at"] <= datetime.now(
        UTC
    )
    assert summary[gone].detail["healthTo"] == "revoked" and _row(db, gone)["status"] == "revoked"
    assert [n[0] for n in _notifications(db)] == [OWNER]  # told once, about Carol's

    # Errors are recorded, not retried: one call per integration per run.
    db.execute("UPDATE integrations SET last_health_check_at = NULL")
    db.commit()
    before = len(provider.state.userinfo_requests)
    provider.fail_next(1, 503, endpoint="userinfo")
    [result] = _checker(cipher, provider).check_many(lambda: lent(db), [healthy], checked_since=since)
    assert result.counts == {"error": 1} and "503" in result.detail["reason"]
    assert len(provider.state.userinfo_requests) == before + 1
    assert _row(db, healthy)["health_status"] == "error" and _row(db, healthy)["status"] == "active"
    # A retry of the same run does not call again: it reports what the earlier try recorded.
    [again] = _checker(cipher, provider).check_many(lambda: lent(db), [healthy], checked_since=since)
    assert (again.status, again.counts) == ("unchanged", {"error": 1})
    assert len(provider.state.userinfo_requests) == before + 1


def test_health_of_an_unknown_provider_is_an_error_result_naming_it(db, tenant, cipher, provider):
    from almanac.errors import ConfigError

    integration_id, _ = _connect(db, cipher, provider)

    def unknown(name):
        raise ConfigError(f"provider {name!r}: Airflow connection 'oauth_{name}' is not defined")

    checker = HealthChecker(cipher, unknown, session=plain_session, clock=lambda: datetime.now(UTC))
    result = checker.check(db, integration_id, checked_since=NOW)
    assert result.status == "error" and result.permanent and "oauth_acme" in result.error


# --- the product's view, and the migration ------------------------------------------------


def test_the_view_shows_state_and_schedule_but_no_token(db, tenant, cipher, provider, refresher_for):
    integration_id, _ = _connect(db, cipher, provider)
    refresher_for().refresh(db, integration_id)
    [state] = store.states(db, tenant_id=1)
    assert state["integration_id"] == integration_id and state["status"] == "active"
    assert state["refreshable"] is True and state["next_refresh_at"] is not None
    assert not [column for column in state if "token_enc" in column]


def test_the_migration_moves_google_accounts_over_without_loss(migrated):
    import psycopg

    key = generate_key()
    cipher = TokenCipher(key)
    with psycopg.connect(migrated) as conn:
        conn.execute("DROP SCHEMA IF EXISTS migration_check CASCADE")
        conn.execute("CREATE SCHEMA migration_check")
        conn.execute("SET search_path TO migration_check")
        conn.commit()
        try:
            apply_migrations(conn, [m for m in available_migrations() if m.version < 8])
            conn.execute("INSERT INTO tenants (id, name) VALUES (7, 't')")
            for user_id in (1, 2, 3):
                conn.execute(
                    "INSERT INTO users (id, tenant_id, name, email) VALUES (%s, 7, %s, %s)",
                    (user_id, f"u{user_id}", f"u{user_id}@x.test"),
                )
            expires = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
            conn.execute(
                """
                INSERT INTO google_accounts
                       (user_id, refresh_token_enc, access_token_enc, access_token_expires_at,
                        target_calendar_id, status, last_error, last_push_at, account_subject)
                VALUES (1, %s, %s, %s, 'family', 'active', 'push: 404 on target', '2026-04-30T10:00Z',
                        'sub-1'),
                       (2, %s, NULL, NULL, 'primary', 'active', NULL, NULL, NULL),
                       (3, %s, NULL, NULL, 'primary', 'revoked', 'invalid_grant', NULL, 'sub-3')
                """,
                (
                    cipher.encrypt("rt-1"),
                    cipher.encrypt("at-1"),
                    expires,
                    cipher.encrypt("rt-2"),
                    cipher.encrypt("rt-3"),
                ),
            )
            conn.execute(
                "INSERT INTO google_event_links (user_id, calendar_id, uid, google_calendar_id,"
                " google_event_id, content_hash, account_subject)"
                " VALUES (1, 5, 'u@x', 'family', 'e1', 'h', 'sub-1')"
            )
            conn.commit()

            assert apply_migrations(conn) == [m.version for m in available_migrations() if m.version >= 8]

            rows = {
                r[0]: r
                for r in conn.execute(
                    "SELECT user_id, tenant_id, provider, status, account_subject, refresh_token_enc,"
                    " access_token_enc, access_token_expires_at, next_refresh_at, last_error,"
                    " revoked_at IS NOT NULL FROM integrations"
                ).fetchall()
            }
            assert set(rows) == {1, 2, 3}
            one = rows[1]
            assert one[1:5] == (7, "google", "active", "sub-1")
            assert cipher.decrypt(one[5]) == "rt-1" and cipher.decrypt(one[6]) == "at-1"
            assert one[7] == expires and one[8] == expires - timedelta(minutes=5) and one[9] is None
            assert cipher.decrypt(rows[2][5]) == "rt-2" and rows[2][8] is not None  # due at once
            assert rows[3][3] == "revoked" and rows[3][9] == "invalid_grant" and rows[3][10] is True
            assert rows[3][5] is None and rows[3][6] is None  # a revoked grant's tokens: erased
            push = conn.execute(
                "SELECT a.user_id, a.target_calendar_id, a.last_error, a.last_push_at IS NOT NULL, i.user_id"
                " FROM google_accounts a JOIN integrations i ON i.id = a.integration_id ORDER BY 1"
            ).fetchall()
            assert push[0] == (1, "family", "push: 404 on target", True, 1) and len(push) == 3
            assert conn.execute("SELECT count(*) FROM google_event_links").fetchone()[0] == 1
        finally:
            conn.rollback()
            conn.execute("DROP SCHEMA migration_check CASCADE")
            conn.commit()


# --- what a review found: races, answers that break off, our own faults ---------------------


class _RawServer:
    """A TCP server answering every connection with ``answer`` bytes, then ``stall_s`` of silence."""

    def __init__(self, answer: bytes, stall_s: float = 0.0) -> None:
        import socket

        self.answer, self.stall_s = answer, stall_s
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/token"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import time

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                client.recv(65536)
                client.sendall(self.answer)
                time.sleep(self.stall_s)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    "answer, stall, expected",
    [
        # headers, then the body stalls past the read timeout: urllib3 raises, not requests
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{",
            3.0,
            "unreachable: ReadTimeoutError",
        ),
        # an error code with a NUL in it: never a database fault
        (
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n"
            b'{"error":"bad\\u0000ok"}',
            0.0,
            "400 unknown_error",
        ),
    ],
)
def test_an_answer_that_breaks_off_or_carries_a_nul_is_that_integrations_recorded_failure(
    db, tenant, cipher, provider, refresher_for, answer, stall, expected
):
    server = _RawServer(answer, stall)
    try:
        integration_id, _ = _connect(db, cipher, provider)
        refresher = refresher_for(_config(provider, token_url=server.url))
        refresher.options = RefreshOptions(policy=RetryPolicy(attempts=1, timeout_s=0.5))
        result = refresher.refresh(db, integration_id)
    finally:
        server.close()
    assert result.status == "error" and expected in result.error, result.error
    row = _row(db, integration_id)
    assert row["status"] == "expired" and expected in row["last_error"] and row["consecutive_failures"] == 1
    assert row["next_refresh_at"] > datetime.now(UTC)  # backed off, not due every minute


def test_a_reconnect_during_a_refresh_is_kept_and_the_old_grants_outcome_dropped(
    db, tenant, cipher, refresher_for, migrated
):
    import psycopg

    with FakeOAuthProvider(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, slow_seconds=1.5) as slow:
        integration_id, old_token = _connect(db, cipher, slow, prefix="slow-")  # answered 1.5 s late
        refresher = refresher_for(_config(slow))
        results = []
        thread = threading.Thread(target=lambda: results.append(refresher.refresh(db, integration_id)))
        thread.start()
        import time

        deadline = time.monotonic() + 10
        while not slow.state.refreshes(old_token) and time.monotonic() < deadline:
            time.sleep(0.05)  # the provider has the old grant's request
        with psycopg.connect(migrated) as other:  # the user reconnects meanwhile
            new_id, new_token = _connect(other, cipher, slow)
        thread.join()
    assert new_id == integration_id
    assert results[0].status == "unchanged" and "reconnected" in results[0].error
    row = _row(db, integration_id)
    assert row["status"] == "active" and cipher.decrypt(row["refresh_token_enc"]) == new_token
    assert (
        row["access_token_enc"] is None and row["last_refresh_at"] is None
    )  # the old grant's answer: dropped


def test_our_own_faults_are_not_counted_against_the_integration(db, tenant, cipher, provider, refresher_for):
    integration_id, _ = _connect(db, cipher, provider)
    refresher = refresher_for(_config(provider, client_secret="wrong"), max_failures=2)
    for _ in range(3):
        assert refresher.refresh(db, integration_id).status == "error"
    row = _row(db, integration_id)
    assert row["status"] == "expired" and row["consecutive_failures"] == 0  # never `error` for it
    assert "invalid_client" in row["last_error"] and row["next_refresh_at"] is not None


def test_the_request_time_path_keeps_the_backoff_and_an_operator_retries_an_errored_one(
    db, tenant, cipher, provider, refresher_for
):
    integration_id, _ = _connect(db, cipher, provider, prefix="unavailable-")
    refresher = refresher_for(max_failures=2)
    refresher.refresh(db, integration_id)  # failed: expired, due again in a minute
    calls = len(provider.state.token_requests)
    with pytest.raises(RetryableError, match="next try at"):
        refresher.access_token(db, integration_id)
    assert len(provider.state.token_requests) == calls  # the provider is not called before its time
    db.execute("UPDATE integrations SET next_refresh_at = now() - interval '1 second'")
    db.commit()
    with pytest.raises(RetryableError):
        refresher.access_token(db, integration_id)  # tried, failed again: now `error`
    assert _row(db, integration_id)["status"] == "error"
    with pytest.raises(IntegrationUnusableError, match="almanac integrations retry"):
        refresher.access_token(db, integration_id)
    assert store.retry_errored(db, now=datetime.now(UTC)) == [integration_id]
    db.commit()
    row = _row(db, integration_id)
    assert (row["status"], row["consecutive_failures"]) == ("expired", 0)
    assert row["next_refresh_at"] is not None


def test_a_health_outcome_is_not_recorded_on_a_token_refreshed_meanwhile(db, tenant, cipher, provider):
    integration_id, _ = _connect(db, cipher, provider, access_token="at", expires_at=NOW + timedelta(days=1))
    assert not store.record_health(db, integration_id, "expired", "401", now=NOW, probed="another token")
    db.commit()
    assert _row(db, integration_id)["status"] == "active"

"""invitation_cleanup's domain function against the real application DB."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from almanac.invitations.cleanup import delete_expired_invitations

CUTOFF = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)


def _calendar(db) -> int:
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    db.execute("INSERT INTO calendars (id, tenant_id, name) VALUES (1, 1, 'c')")
    return 1


def _invite(db, token, created, expires=None, status="pending"):
    db.execute(
        "INSERT INTO invitations (calendar_id, invitee_email, token, status, created_at, expires_at) "
        "VALUES (1, %s, %s, %s, %s, %s)",
        (f"{token}@x.test", token, status, created, expires),
    )


def _tokens(db) -> set[str]:
    return {row[0] for row in db.execute("SELECT token FROM invitations")}


@pytest.fixture
def seeded(db):
    _calendar(db)
    day = timedelta(days=1)
    # expires_at NULL: expiry is created_at + 30 days
    _invite(db, "null-old", CUTOFF - 31 * day)
    _invite(db, "null-exactly-at-cutoff", CUTOFF - 30 * day)  # expires AT the cutoff: not before it
    _invite(db, "null-young", CUTOFF - 29 * day)
    # expires_at set: it wins over created_at
    _invite(db, "explicit-past", CUTOFF - 2 * day, expires=CUTOFF - timedelta(seconds=1))
    _invite(db, "explicit-future", CUTOFF - 90 * day, expires=CUTOFF + day)
    # answered invitations are history, never cleaned
    _invite(db, "accepted-old", CUTOFF - 90 * day, status="accepted")
    _invite(db, "declined-old", CUTOFF - 90 * day, expires=CUTOFF - day, status="declined")
    db.commit()
    return db


def test_deletes_only_pending_invitations_expired_before_the_cutoff(seeded):
    result = delete_expired_invitations(seeded, CUTOFF)
    assert result.deleted == 2
    assert _tokens(seeded) == {
        "null-exactly-at-cutoff", "null-young", "explicit-future", "accepted-old", "declined-old",
    }


def test_running_twice_deletes_nothing_more(seeded):
    delete_expired_invitations(seeded, CUTOFF)
    after_first = _tokens(seeded)
    assert delete_expired_invitations(seeded, CUTOFF).deleted == 0
    assert _tokens(seeded) == after_first


def test_ttl_setting_is_honoured(seeded):
    delete_expired_invitations(seeded, CUTOFF, ttl=timedelta(days=29, hours=12))
    assert "null-exactly-at-cutoff" not in _tokens(seeded)
    assert "null-young" in _tokens(seeded)


def test_small_chunks_delete_everything_due(db):
    _calendar(db)
    for i in range(23):
        _invite(db, f"old-{i}", CUTOFF - timedelta(days=40, minutes=i))
    _invite(db, "young", CUTOFF - timedelta(days=1))
    db.commit()
    assert delete_expired_invitations(db, CUTOFF, chunk_size=5).deleted == 23
    assert _tokens(db) == {"young"}


def test_backfill_of_seven_days_equals_the_on_time_runs(migrated, db):
    """Day-by-day runs and a backfill over the same days end in the same state."""
    _calendar(db)
    for hour in range(0, 24 * 40, 7):
        _invite(db, f"h{hour}", CUTOFF - timedelta(days=45) + timedelta(hours=hour))
    db.commit()
    cutoffs = [CUTOFF - timedelta(days=d) for d in range(7, 0, -1)]

    on_time_counts = [delete_expired_invitations(db, c).deleted for c in cutoffs]
    on_time_state = _tokens(db)

    db.execute("TRUNCATE invitations")
    for hour in range(0, 24 * 40, 7):
        _invite(db, f"h{hour}", CUTOFF - timedelta(days=45) + timedelta(hours=hour))
    db.commit()
    # A backfill replays the same intervals, here in reverse order and with a rerun mixed in.
    backfill_counts = {c: delete_expired_invitations(db, c).deleted for c in reversed(cutoffs)}
    delete_expired_invitations(db, cutoffs[3])
    assert _tokens(db) == on_time_state
    assert sum(on_time_counts) == sum(backfill_counts.values()) > 0


def test_naive_cutoff_is_refused(db):
    with pytest.raises(ValueError, match="timezone-aware"):
        delete_expired_invitations(db, datetime(2026, 1, 1))


def test_a_failure_mid_run_rolls_everything_back(migrated, db):
    """A row locked by someone else past lock_timeout fails the run; nothing is deleted."""
    _calendar(db)
    for i in range(10):
        _invite(db, f"old-{i}", CUTOFF - timedelta(days=40, minutes=i))
    db.commit()
    last_id = db.execute("SELECT max(id) FROM invitations").fetchone()[0]
    locked = threading.Event()
    release = threading.Event()

    def hold_lock():
        with psycopg.connect(migrated) as other:
            other.execute("SELECT 1 FROM invitations WHERE id = %s FOR UPDATE", (last_id,))
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(5)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            delete_expired_invitations(db, CUTOFF, chunk_size=3, lock_timeout_ms=200)
    finally:
        release.set()
        holder.join()
    assert db.execute("SELECT count(*) FROM invitations").fetchone()[0] == 10

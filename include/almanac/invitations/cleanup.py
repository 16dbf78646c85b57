"""invitation_cleanup: delete pending invitations that expired before a cutoff.

An invitation expires at ``expires_at``, or ``ttl`` after ``created_at`` when that is NULL.
The cutoff is the run's data interval end, never the wall clock, so a rerun or a backfill
of the same interval deletes exactly what the on-time run did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["CleanupResult", "delete_expired_invitations"]

log = logging.getLogger(__name__)

# One chunk: the oldest expired pending rows, locked, then deleted. ORDER BY id keeps the
# lock order stable so two overlapping runs cannot deadlock each other.
_DELETE_CHUNK = """
WITH expired AS (
    SELECT id
      FROM invitations
     WHERE status = 'pending'
       AND (   (expires_at IS NOT NULL AND expires_at < %(cutoff)s)
            OR (expires_at IS NULL     AND created_at < %(created_before)s))
     ORDER BY id
     LIMIT %(chunk)s
       FOR UPDATE
)
DELETE FROM invitations AS i
 USING expired
 WHERE i.id = expired.id
"""


@dataclass(frozen=True)
class CleanupResult:
    deleted: int
    cutoff: str

    def as_dict(self) -> dict:
        return {"deleted": self.deleted, "cutoff": self.cutoff}


def delete_expired_invitations(
    conn,
    cutoff: datetime,
    *,
    ttl: timedelta = timedelta(days=30),
    chunk_size: int = 5000,
    lock_timeout_ms: int = 5000,
    statement_timeout_ms: int = 120_000,
) -> CleanupResult:
    """Delete pending invitations that expired strictly before ``cutoff``, in one transaction.

    Rows go in chunks of ``chunk_size`` so that no single statement holds many locks or runs
    long; the whole delete commits once, so a failure mid-way leaves the table untouched.

    Parameters:
        conn: psycopg connection to the application DB (committed on success, rolled back on error).
        cutoff: timezone-aware instant; the run's data interval end.
        ttl: lifetime of an invitation whose ``expires_at`` is NULL.
    Returns:
        CleanupResult with the number of rows deleted.
    Raises:
        ValueError: ``cutoff`` is naive.
    """
    if cutoff.tzinfo is None:
        raise ValueError("cutoff must be timezone-aware")
    params = {"cutoff": cutoff, "created_before": cutoff - ttl, "chunk": chunk_size}
    deleted = 0
    try:
        with conn.cursor() as cur:
            # set_config(..., true) is SET LOCAL with a bind parameter: this transaction only.
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_ms)}ms",))
            cur.execute(
                "SELECT set_config('statement_timeout', %s, true)", (f"{int(statement_timeout_ms)}ms",)
            )
            while True:
                cur.execute(_DELETE_CHUNK, params)
                deleted += cur.rowcount
                if cur.rowcount < chunk_size:
                    break
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    log.info("deleted %d expired invitations (cutoff %s)", deleted, cutoff.isoformat())
    return CleanupResult(deleted=deleted, cutoff=cutoff.isoformat())

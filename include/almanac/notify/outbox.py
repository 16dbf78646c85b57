"""Notifications: the outbox — the one API jobs and the product's backend enqueue messages with,
and the claim / record steps the dispatcher moves a row through.

A row's life (``notifications.status``)::

    pending ──claim──> sending ──handed to the provider──> sent | failed | dead | skipped
       ^                  │                                       │ (failed: due again later)
       └──────────────────┴──── lease expired, not handed over ───┘
                          └──── lease expired after hand-over ──> uncertain (never resent by itself)

Exactly once: a row is handed to a provider only while this dispatcher's claim holds it, the hand-over
is recorded (``send_started_at``, committed) *before* the provider is called, and the outcome right
after. If the dispatcher dies between the two, the row cannot tell whether the provider accepted it:
it becomes ``uncertain`` and waits for an operator (``almanac notifications retry ID``), except on a
channel whose provider collapses a resend onto the first message by a key we send
(``RESEND_SAFE_CHANNELS``: push, by FCM collapse key / notification tag), where it is simply due again.

Transactions: ``enqueue``/``enqueue_many`` leave the commit to the caller (so a job can enqueue in
the same transaction as the change that caused the message); every other function commits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from almanac.notify.types import CHANNELS, Message, SendResult
from almanac.retry import RetryPolicy

__all__ = [
    "MAX_BODY_CHARS",
    "RESEND_SAFE_CHANNELS",
    "STATUSES",
    "Claimed",
    "NewNotification",
    "claim",
    "disable_devices",
    "due_count",
    "enqueue",
    "enqueue_many",
    "mark_started",
    "needing_attention",
    "record_outcomes",
    "release",
    "release_expired",
    "resolve",
    "retry",
    "stats",
]

log = logging.getLogger(__name__)

STATUSES = ("pending", "sending", "sent", "failed", "dead", "skipped", "uncertain")
#: Channels whose provider shows a resent message in place of the first one (FCM collapse key and
#: notification tag derived from the idempotency key), so an unknown outcome may be sent again.
RESEND_SAFE_CHANNELS = frozenset({"push"})
MAX_BODY_CHARS = 100_000
MAX_ERROR_CHARS = 1000


@dataclass(frozen=True, slots=True)
class NewNotification:
    """A message to enqueue.

    Parameters:
        tenant_id: the tenant it belongs to.
        channel: ``email``, ``sms`` or ``push``.
        kind: what produced it (``digest``, ``integration_revoked``, ``chat_mention``...).
        idempotency_key: domain data that names this message once and for all, e.g.
            ``digest:<user>:<period start>:email``; never a run id. Up to 200 characters.
        body: the rendered text (email: plain-text body; sms: the SMS; push: the notification body).
        user_id: the person; their address / number / devices are used unless ``recipient`` is given.
        recipient: an explicit email address or E.164 number (email and sms only).
        subject: email subject / push title.
        data: push data payload (string keys and values).
        not_before: do not send before this instant (default: as soon as possible).
    """

    tenant_id: int
    channel: str
    kind: str
    idempotency_key: str
    body: str
    user_id: int | None = None
    recipient: str | None = None
    subject: str | None = None
    data: dict[str, str] = field(default_factory=dict)
    not_before: datetime | None = None

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {self.channel!r}")
        if not isinstance(self.idempotency_key, str) or not 0 < len(self.idempotency_key) <= 200:
            raise ValueError("idempotency_key must be a string of 1 to 200 characters")
        if not isinstance(self.kind, str) or not 0 < len(self.kind) <= 100:
            raise ValueError("kind must be a string of 1 to 100 characters")
        if not isinstance(self.body, str) or len(self.body) > MAX_BODY_CHARS:
            raise ValueError(f"body must be a string of at most {MAX_BODY_CHARS} characters")
        if self.user_id is None and not self.recipient:
            raise ValueError("a notification needs a user_id or a recipient")
        if self.channel == "push" and self.user_id is None:
            raise ValueError("a push notification goes to a user's devices: user_id is required")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.data.items()):
            raise ValueError("data must map strings to strings (FCM data payloads are strings)")


_COLUMNS = (
    "tenant_id, user_id, channel, kind, idempotency_key, recipient, subject, body, data, next_attempt_at"
)


def _row(n: NewNotification) -> tuple:
    return (
        n.tenant_id,
        n.user_id,
        n.channel,
        n.kind,
        n.idempotency_key,
        n.recipient,
        n.subject,
        n.body,
        json.dumps(n.data) if n.data else "{}",
        n.not_before,
    )


def enqueue(conn, notification: NewNotification | None = None, /, **fields: Any) -> int:
    """Put one message in the outbox; returns its id. The same idempotency key again returns the
    first row's id and changes nothing (so a retried or rerun job enqueues once). Does not commit.

    ``enqueue(conn, NewNotification(...))`` or ``enqueue(conn, tenant_id=..., channel=..., ...)``.
    """
    n = notification if notification is not None else NewNotification(**fields)
    row = conn.execute(
        f"""
        INSERT INTO notifications ({_COLUMNS})
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, coalesce(%s, now()))
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id
        """,
        _row(n),
    ).fetchone()
    if row is not None:
        return row[0]
    return conn.execute(
        "SELECT id FROM notifications WHERE idempotency_key = %s", (n.idempotency_key,)
    ).fetchone()[0]


def enqueue_many(conn, notifications: Iterable[NewNotification]) -> int:
    """Bulk ``enqueue`` (COPY into a temporary table, one INSERT): returns how many rows are new.
    Keys already in the outbox (or repeated in the input) are kept once. Does not commit."""
    with conn.transaction():  # a savepoint inside the caller's transaction (a transaction in autocommit)
        conn.execute(
            """
            CREATE TEMPORARY TABLE IF NOT EXISTS notifications_incoming (
                seq bigserial, tenant_id bigint, user_id bigint, channel text, kind text,
                idempotency_key text, recipient text, subject text, body text, data jsonb,
                next_attempt_at timestamptz
            ) ON COMMIT DELETE ROWS
            """
        )
        conn.execute("TRUNCATE notifications_incoming")
        with conn.cursor() as cur:
            with cur.copy(f"COPY notifications_incoming ({_COLUMNS}) FROM STDIN") as copy:
                for n in notifications:
                    copy.write_row(_row(n))
            cur.execute(
                f"""
                INSERT INTO notifications ({_COLUMNS})
                SELECT tenant_id, user_id, channel, kind, idempotency_key,
                       recipient, subject, body, data, coalesce(next_attempt_at, now())
                  FROM notifications_incoming
                 ORDER BY seq
                ON CONFLICT (idempotency_key) DO NOTHING  -- a key repeated in the input: the first wins
                """
            )
            return cur.rowcount


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row this dispatcher holds (``status = 'sending'``)."""

    id: int
    tenant_id: int
    user_id: int | None
    channel: str
    kind: str
    idempotency_key: str
    recipient: str | None
    subject: str | None
    body: str
    data: dict
    attempts: int


def due_count(conn, channel: str) -> int:
    """Rows of ``channel`` due now. Reads only (ends its read transaction)."""
    (n,) = conn.execute(
        "SELECT count(*) FROM notifications"
        " WHERE channel = %s AND status IN ('pending', 'failed') AND next_attempt_at <= now()",
        (channel,),
    ).fetchone()
    conn.commit()
    return n


def release_expired(conn, *, channel: str | None = None) -> dict[str, int]:
    """Rows whose claim expired without an outcome: not yet handed to the provider -> pending;
    handed over -> uncertain (push: due again, see ``RESEND_SAFE_CHANNELS``). Commits; returns
    ``{"released": n, "uncertain": n, "resent": n}``."""
    rows = conn.execute(
        """
        UPDATE notifications
           SET status = CASE WHEN send_started_at IS NULL THEN 'pending'
                             WHEN channel = ANY(%(safe)s) THEN 'failed'
                             ELSE 'uncertain' END,
               next_attempt_at = now(),
               last_error = CASE
                   WHEN send_started_at IS NULL THEN last_error
                   WHEN channel = ANY(%(safe)s) THEN 'the dispatcher stopped after handing this to the '
                        || 'provider, before recording the answer; sent again (the provider collapses '
                        || 'a resend onto the first message)'
                   ELSE 'the dispatcher stopped after handing this to the provider, before recording the '
                        || 'answer: it may have been sent. Check the provider''s log for this message, '
                        || 'then `almanac notifications retry ' || id || '` if it did not arrive' END,
               claimed_by = NULL, claim_expires_at = NULL, send_started_at = NULL, updated_at = now()
         WHERE status = 'sending' AND claim_expires_at < now()
           AND (%(channel)s::text IS NULL OR channel = %(channel)s)
        RETURNING status
        """,
        {"safe": sorted(RESEND_SAFE_CHANNELS), "channel": channel},
    ).fetchall()
    conn.commit()
    counts = {"released": 0, "uncertain": 0, "resent": 0}
    for (status,) in rows:
        counts[{"pending": "released", "uncertain": "uncertain", "failed": "resent"}[status]] += 1
    if counts["uncertain"]:
        log.warning("%d notification(s) uncertain after a dispatcher stopped mid-send", counts["uncertain"])
    return counts


def claim(conn, channel: str, *, limit: int, owner: str, lease_s: int) -> list[Claimed]:
    """Take up to ``limit`` due rows of ``channel`` (oldest due first) for ``lease_s`` seconds.
    Rows other dispatchers hold are skipped, not waited for. Commits."""
    with conn.cursor(row_factory=class_row(Claimed)) as cur:
        cur.execute(
            """
            WITH due AS (
                SELECT id FROM notifications
                 WHERE channel = %(channel)s AND status IN ('pending', 'failed')
                   AND next_attempt_at <= now()
                 ORDER BY next_attempt_at, id
                 LIMIT %(limit)s
                   FOR UPDATE SKIP LOCKED
            )
            UPDATE notifications n
               SET status = 'sending', claimed_by = %(owner)s, send_started_at = NULL,
                   claim_expires_at = now() + make_interval(secs => %(lease)s), updated_at = now()
              FROM due WHERE n.id = due.id
            RETURNING n.id, n.tenant_id, n.user_id, n.channel, n.kind, n.idempotency_key,
                      n.recipient, n.subject, n.body, n.data, n.attempts
            """,
            {"channel": channel, "limit": limit, "owner": owner, "lease": lease_s},
        )
        rows = sorted(cur.fetchall(), key=lambda r: r.id)
    conn.commit()
    return rows


def resolve(conn, rows: Sequence[Claimed]) -> dict[int, Message | SendResult]:
    """Each claimed row's ``Message`` (its recipient looked up), or the ``SendResult`` that settles
    it without sending: ``skipped`` when there is nobody to send to or the user opted out of the
    channel (``users.contact_channels``). Reads only."""
    users = {r.user_id for r in rows if r.user_id is not None}
    people: dict[int, tuple[str | None, str | None, list[str]]] = {}
    devices: dict[int, list[str]] = {}
    if users:
        for uid, email, phone, channels in conn.execute(
            "SELECT id, email, phone, contact_channels FROM users WHERE id = ANY(%s)", (sorted(users),)
        ):
            people[uid] = (email, phone, channels)
        if any(r.channel == "push" for r in rows):
            for uid, token in conn.execute(
                "SELECT user_id, registration_token FROM push_devices"
                " WHERE user_id = ANY(%s) AND disabled_at IS NULL ORDER BY id",
                (sorted(users),),
            ):
                devices.setdefault(uid, []).append(token)
    out: dict[int, Message | SendResult] = {}
    for r in rows:
        person = people.get(r.user_id) if r.user_id is not None else None
        if r.user_id is not None and person is None and not r.recipient:
            out[r.id] = SendResult("skipped", error="the user no longer exists")
            continue
        if person is not None and r.channel not in person[2]:
            out[r.id] = SendResult("skipped", error=f"the user does not accept {r.channel} notifications")
            continue
        if r.channel == "push":
            to = tuple(devices.get(r.user_id, ()))
            if not to:
                out[r.id] = SendResult("skipped", error="the user has no active push device")
                continue
        else:
            address = r.recipient
            if not address and person is not None:
                address = person[0] if r.channel == "email" else person[1]
            if not address:
                what = "email address" if r.channel == "email" else "phone number"
                out[r.id] = SendResult("skipped", error=f"no {what} to send to")
                continue
            to = (address,)
        out[r.id] = Message(
            notification_id=r.id,
            idempotency_key=r.idempotency_key,
            channel=r.channel,  # type: ignore[arg-type]
            to=to,
            subject=r.subject,
            body=r.body,
            data={str(k): str(v) for k, v in (r.data or {}).items()},
        )
    return out


def mark_started(conn, ids: Sequence[int], *, owner: str) -> list[int]:
    """Record that these rows are being handed to the provider now (one attempt each). Commits.
    Returns the ids this owner still holds: a row whose claim was lost is not sent."""
    if not ids:
        return []
    held = conn.execute(
        """
        UPDATE notifications SET send_started_at = now(), attempts = attempts + 1, updated_at = now()
         WHERE id = ANY(%s) AND status = 'sending' AND claimed_by = %s
        RETURNING id
        """,
        (list(ids), owner),
    ).fetchall()
    conn.commit()
    return [row[0] for row in held]


def release(conn, ids: Sequence[int], *, owner: str, not_before_s: float, reason: str | None = None) -> int:
    """Give rows back unsent (rate-limited, or the run's time is up): pending again after
    ``not_before_s`` seconds, no attempt counted. Commits; returns how many were released."""
    if not ids:
        return 0
    cur = conn.execute(
        """
        UPDATE notifications
           SET status = 'pending', next_attempt_at = now() + make_interval(secs => %s),
               claimed_by = NULL, claim_expires_at = NULL, send_started_at = NULL,
               last_error = coalesce(%s, last_error), updated_at = now()
         WHERE id = ANY(%s) AND status = 'sending' AND claimed_by = %s
        """,
        (float(not_before_s), reason, list(ids), owner),
    )
    conn.commit()
    return cur.rowcount


def record_outcomes(
    conn,
    outcomes: Sequence[tuple[Claimed, SendResult]],
    *,
    owner: str,
    policy: RetryPolicy,
    max_attempts: int,
) -> dict[str, int]:
    """Write what each send came to, in one statement. Commits.

    ``failed`` rows are due again after ``policy.wait(attempt, retry_after)``, or ``dead`` once
    ``max_attempts`` tries were made. A row another dispatcher has since settled is left alone,
    but a row that a sweep marked ``uncertain`` meanwhile takes the real outcome. Returns the
    count per final status."""
    if not outcomes:
        return {}
    ids, statuses, errors, provider_ids, waits = [], [], [], [], []
    for row, result in outcomes:
        attempts = row.attempts + (1 if result.outcome != "skipped" else 0)
        status = result.outcome
        error = result.error
        wait = 0.0
        if status == "failed":
            if attempts >= max_attempts:
                status = "dead"
                error = f"gave up after {attempts} attempts; last: {error or 'transient failure'}"
            else:
                wait = policy.wait(attempts, result.retry_after_s)
        ids.append(row.id)
        statuses.append(status)
        errors.append(error[:MAX_ERROR_CHARS] if error else None)
        provider_ids.append(result.provider_id)
        waits.append(float(wait))
    rows = conn.execute(
        """
        UPDATE notifications n
           SET status = u.status,
               last_error = CASE WHEN u.status = 'sent' THEN NULL ELSE u.error END,
               provider_message_id = coalesce(u.provider_id, n.provider_message_id),
               sent_at = CASE WHEN u.status = 'sent' THEN now() ELSE n.sent_at END,
               next_attempt_at = now() + make_interval(secs => u.wait),
               claimed_by = NULL, claim_expires_at = NULL, send_started_at = NULL, updated_at = now()
          FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::float8[])
               AS u(id, status, error, provider_id, wait)
         WHERE n.id = u.id
           AND ((n.status = 'sending' AND n.claimed_by = %s) OR n.status = 'uncertain')
        RETURNING n.status
        """,
        (ids, statuses, errors, provider_ids, waits, owner),
    ).fetchall()
    conn.commit()
    counts: dict[str, int] = {}
    for (status,) in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts


def disable_devices(conn, tokens: Iterable[str], reason: str) -> int:
    """Disable push devices whose registration token the provider says is gone. Commits."""
    tokens = sorted(set(tokens))
    if not tokens:
        return 0
    cur = conn.execute(
        "UPDATE push_devices SET disabled_at = now(), disabled_reason = %s"
        " WHERE registration_token = ANY(%s) AND disabled_at IS NULL",
        (reason[:MAX_ERROR_CHARS], tokens),
    )
    conn.commit()
    return cur.rowcount


# --- operators ---------------------------------------------------------------------------------


def stats(conn) -> dict[str, dict[str, int]]:
    """Rows per channel and status (every status listed, zeros included). Reads only."""
    result = {channel: dict.fromkeys(STATUSES, 0) for channel in CHANNELS}
    for channel, status, n in conn.execute(
        "SELECT channel, status, count(*) FROM notifications GROUP BY channel, status"
    ):
        result[channel][status] = n
    return result


def needing_attention(conn, *, limit: int = 50, channel: str | None = None) -> list[dict]:
    """``dead`` and ``uncertain`` rows, newest first, with what an operator needs (no body)."""
    rows = conn.execute(
        """
        SELECT id, channel, kind, status, attempts, user_id, idempotency_key, last_error,
               provider_message_id, created_at, updated_at
          FROM notifications
         WHERE status IN ('dead', 'uncertain') AND (%(channel)s::text IS NULL OR channel = %(channel)s)
         ORDER BY updated_at DESC, id DESC
         LIMIT %(limit)s
        """,
        {"channel": channel, "limit": limit},
    )
    names = [c.name for c in rows.description]
    return [dict(zip(names, row, strict=True)) for row in rows.fetchall()]


def retry(conn, notification_id: int) -> str:
    """An operator's retry: a ``dead``, ``uncertain`` or ``failed`` row is due now with a fresh set
    of attempts. Commits. Returns the status it had; raises ``LookupError`` for an unknown id and
    ``ValueError`` for a row that is pending, being sent, sent or skipped."""
    row = conn.execute(
        "SELECT status FROM notifications WHERE id = %s FOR UPDATE", (notification_id,)
    ).fetchone()
    if row is None:
        conn.rollback()
        raise LookupError(f"no notification {notification_id}")
    (status,) = row
    if status not in ("dead", "uncertain", "failed"):
        conn.rollback()
        raise ValueError(
            f"notification {notification_id} is {status}: only dead, uncertain or failed ones are retried"
        )
    conn.execute(
        """
        UPDATE notifications
           SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now(),
               last_error = 'retried by an operator (was ' || status || '): ' || coalesce(last_error, '')
         WHERE id = %s
        """,
        (notification_id,),
    )
    conn.commit()
    return status

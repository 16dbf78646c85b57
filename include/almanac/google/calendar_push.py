"""google_calendar_push: reconcile each connected member's Google Calendar with their calendars' events.

Desired state, per member: every instance in ``events`` of the calendars they are a member of
(in the run's scope), except cancelled ones. Pushed state: their ``google_event_links``.
The difference is the work — and nothing else:

- desired, no link (or a link into another Google calendar than the target) -> ``events.insert``
  with an id derived from ``(user, calendar, uid, recurrence_id)``; a 409 (already there, e.g.
  a crash lost the link) -> ``events.patch`` instead;
- desired, link with another ``content_hash`` -> ``events.patch`` (a 404/410: re-insert);
- link, no longer desired (event deleted or cancelled, member left, calendar gone) ->
  ``events.delete`` (404/410 count as done) and the link goes.

A link is written right after its Google call succeeds, so a rerun — or a run after a
partial failure, or a backfill — converges without duplicates and repeats no call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from almanac.errors import PermanentError, RetryableError
from almanac.google.accounts import GoogleAccount, load_accounts, mark_revoked, record_push, save_access_token
from almanac.google.client import (
    CalendarClient,
    GoogleApiError,
    GoogleGrantRevokedError,
    OAuthClient,
    RetryPolicy,
)
from almanac.google.crypto import TokenCipher
from almanac.google.mapping import EventRow, event_body, google_event_id

__all__ = [
    "MemberResult",
    "PushBatchResult",
    "combine_summaries",
    "member_ids_to_push",
    "plan_member_batches",
    "push_batch",
]

log = logging.getLogger(__name__)

_COMMIT_EVERY = 50  # link rows per commit: a crash loses at most this many (and ids make that safe)

Key = tuple[int, str, str]  # (calendar_id, uid, recurrence_id)


@dataclass
class MemberResult:
    userId: int  # noqa: N815 (the spec's result shape)
    status: str  # updated | unchanged | skipped | error
    eventsCreated: int = 0  # noqa: N815
    eventsUpdated: int = 0  # noqa: N815
    eventsDeleted: int = 0  # noqa: N815
    error: str | None = None


@dataclass
class PushBatchResult:
    results: list[MemberResult] = field(default_factory=list)

    def summary(self, *, keep_unchanged: bool = False) -> dict:
        """The job's result shape; unchanged members are counted, not listed unless asked."""
        listed = [r for r in self.results if keep_unchanged or r.status != "unchanged"]
        return {
            "totalMembers": len(self.results),
            "successCount": sum(r.status in ("updated", "unchanged") for r in self.results),
            "errorCount": sum(r.status == "error" for r in self.results),
            "skippedCount": sum(r.status == "skipped" for r in self.results),
            "eventsCreated": sum(r.eventsCreated for r in self.results),
            "eventsUpdated": sum(r.eventsUpdated for r in self.results),
            "eventsDeleted": sum(r.eventsDeleted for r in self.results),
            "results": [asdict(r) for r in listed],
        }


def combine_summaries(summaries: Iterable[dict | None]) -> dict:
    """One run's result from its batches' summaries (a batch that crashed may be missing)."""
    keys = (
        "totalMembers",
        "successCount",
        "errorCount",
        "skippedCount",
        "eventsCreated",
        "eventsUpdated",
        "eventsDeleted",
    )
    total: dict = {key: 0 for key in keys} | {"results": [], "batches": 0}
    for summary in summaries:
        if not summary:
            continue
        total["batches"] += 1
        for key in keys:
            total[key] += summary[key]
        total["results"] += summary["results"]
    return total


# --- planning -------------------------------------------------------------------------


def member_ids_to_push(conn, calendar_ids: list[int] | None) -> list[int]:
    """Active Google accounts with something in scope: a membership of, or links into, one of
    ``calendar_ids`` (links too, so a member who left still gets their copies removed).
    ``None``: every active account."""
    rows = conn.execute(
        """
        SELECT a.user_id
          FROM google_accounts a
         WHERE a.status = 'active'
           AND (%(scope)s::bigint[] IS NULL
                OR EXISTS (SELECT 1 FROM calendar_members m
                            WHERE m.user_id = a.user_id AND m.calendar_id = ANY(%(scope)s::bigint[]))
                OR EXISTS (SELECT 1 FROM google_event_links l
                            WHERE l.user_id = a.user_id AND l.calendar_id = ANY(%(scope)s::bigint[])))
         ORDER BY a.user_id
        """,
        {"scope": calendar_ids},
    ).fetchall()
    conn.commit()
    return [row[0] for row in rows]


def plan_member_batches(user_ids: list[int], *, size: int = 100) -> list[dict]:
    """Cut ``user_ids`` into batches of at most ``size`` members, each labelled for the UI.

    Returns:
        ``[{"label": "members 3-90 (50)", "user_ids": [...]}, ...]``
    """
    return [
        {"label": f"members {chunk[0]}-{chunk[-1]} ({len(chunk)})", "user_ids": chunk}
        for chunk in (user_ids[i : i + size] for i in range(0, len(user_ids), size))
    ]


# --- pushing --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Link:
    google_calendar_id: str
    google_event_id: str
    content_hash: str


@dataclass
class _Work:
    creates: list[Key] = field(default_factory=list)
    updates: list[tuple[Key, _Link]] = field(default_factory=list)
    deletes: list[tuple[Key, _Link]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.creates or self.updates or self.deletes)


ClientFactory = Callable[..., CalendarClient]


def push_batch(
    conn,
    user_ids: Iterable[int],
    *,
    calendar_ids: list[int] | None,
    cipher: TokenCipher,
    oauth: OAuthClient,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    client_factory: ClientFactory = CalendarClient,
) -> PushBatchResult:
    """Reconcile each member's Google Calendar; one member's failure never stops the others.

    Parameters:
        conn: psycopg connection to the application DB (committed as links are written).
        calendar_ids: the run's scope (the calendars that changed); ``None`` for all.
        cipher: decrypts and encrypts the stored tokens.
        oauth: the product's OAuth client and Google's endpoints.
        sleep: waits between retried calls (tests pass a recorder).
    Raises:
        Only database faults; Google and token problems become per-member results.
    """
    policy = policy or RetryPolicy()
    ids = list(dict.fromkeys(user_ids))
    accounts = load_accounts(conn, ids)
    conn.commit()
    batch = PushBatchResult()
    for user_id in ids:
        account = accounts.get(user_id)
        if account is None:
            batch.results.append(MemberResult(user_id, "skipped", error="no Google account connected"))
        elif account.status != "active":
            batch.results.append(MemberResult(user_id, "skipped", error=f"Google account {account.status}"))
        else:
            batch.results.append(
                _push_member(conn, account, calendar_ids, cipher, oauth, policy, sleep, client_factory)
            )
    return batch


def _push_member(conn, account, scope, cipher, oauth, policy, sleep, client_factory) -> MemberResult:
    user_id = account.user_id
    result = MemberResult(user_id, "unchanged")
    work = _plan(conn, user_id, account.target_calendar_id, scope)
    conn.commit()
    if not work:
        return result
    client = None
    try:
        client = client_factory(
            oauth,
            refresh_token=cipher.decrypt(account.refresh_token_enc, what="refresh token"),
            access_token=cipher.decrypt(account.access_token_enc, what="access token")
            if account.access_token_enc
            else None,
            expiry=account.access_token_expires_at,
            policy=policy,
            sleep=sleep,
            user_id=user_id,
        )
        _apply(conn, client, account, work, result)
        record_push(conn, user_id, None)
        result.status = "updated"
    except GoogleGrantRevokedError as exc:
        conn.commit()  # keep the links of the calls that did succeed
        mark_revoked(conn, user_id, f"{type(exc).__name__}: invalid_grant")
        result.status, result.error = (
            "skipped",
            "Google access revoked (invalid_grant); account marked revoked",
        )
        log.warning("user %s: Google grant revoked; account marked revoked and skipped", user_id)
    except (PermanentError, RetryableError) as exc:
        conn.commit()
        message = f"{type(exc).__name__}: {exc}"
        record_push(conn, user_id, message)
        result.status, result.error = "error", message
        log.warning(
            "user %s: push failed after +%d ~%d -%d: %s",
            user_id,
            result.eventsCreated,
            result.eventsUpdated,
            result.eventsDeleted,
            message,
        )
    if client is not None and client.refreshed and result.status != "skipped":
        token, expiry = client.tokens
        if token:
            save_access_token(conn, cipher, user_id, token, expiry)
    conn.commit()
    if result.status == "updated":
        log.info(
            "user %s: +%d ~%d -%d", user_id, result.eventsCreated, result.eventsUpdated, result.eventsDeleted
        )
    return result


def _plan(conn, user_id: int, target: str, scope: list[int] | None) -> _Work:
    desired = {
        (cal, uid, rid): digest
        for cal, uid, rid, digest in conn.execute(
            """
            SELECT e.calendar_id, e.uid, e.recurrence_id, e.content_hash
              FROM calendar_members m
              JOIN events e ON e.calendar_id = m.calendar_id
             WHERE m.user_id = %(user)s AND e.status <> 'cancelled'
               AND (%(scope)s::bigint[] IS NULL OR m.calendar_id = ANY(%(scope)s::bigint[]))
            """,
            {"user": user_id, "scope": scope},
        )
    }
    links = {
        (cal, uid, rid): _Link(gcal, gid, digest)
        for cal, uid, rid, gcal, gid, digest in conn.execute(
            """
            SELECT calendar_id, uid, recurrence_id, google_calendar_id, google_event_id, content_hash
              FROM google_event_links
             WHERE user_id = %(user)s
               AND (%(scope)s::bigint[] IS NULL OR calendar_id = ANY(%(scope)s::bigint[]))
            """,
            {"user": user_id, "scope": scope},
        )
    }
    work = _Work()
    for key, digest in desired.items():
        link = links.get(key)
        if link is None:
            work.creates.append(key)
        elif link.google_calendar_id != target:  # target calendar changed: move the copy
            work.deletes.append((key, link))
            work.creates.append(key)
        elif link.content_hash != digest:
            work.updates.append((key, link))
    work.deletes += [(key, link) for key, link in links.items() if key not in desired]
    work.creates.sort()
    work.updates.sort()
    work.deletes.sort()
    return work


def _load_rows(conn, keys: list[Key]) -> dict[Key, EventRow]:
    if not keys:
        return {}
    rows = conn.execute(
        """
        SELECT e.calendar_id, e.uid, e.recurrence_id, e.summary, e.description, e.location, e.status,
               e.all_day, e.starts_at, e.ends_at, e.content_hash, c.time_zone
          FROM events e
          JOIN calendars c ON c.id = e.calendar_id
          JOIN unnest(%s::bigint[], %s::text[], %s::text[]) AS k(calendar_id, uid, recurrence_id)
            ON e.calendar_id = k.calendar_id AND e.uid = k.uid AND e.recurrence_id = k.recurrence_id
        """,
        ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
    ).fetchall()
    return {(row[0], row[1], row[2]): EventRow(*row) for row in rows}


def _apply(conn, client: CalendarClient, account: GoogleAccount, work: _Work, result: MemberResult) -> None:
    user_id, target = account.user_id, account.target_calendar_id
    pending = 0

    def written() -> None:
        nonlocal pending
        pending += 1
        if pending >= _COMMIT_EVERY:
            conn.commit()
            pending = 0

    for key, link in work.deletes:
        client.delete(link.google_calendar_id, link.google_event_id)  # False (404/410): already gone, done
        conn.execute(
            "DELETE FROM google_event_links "
            "WHERE user_id = %s AND calendar_id = %s AND uid = %s AND recurrence_id = %s",
            (user_id, *key),
        )
        result.eventsDeleted += 1
        written()

    rows = _load_rows(conn, work.creates + [key for key, _ in work.updates])
    for key in work.creates:
        row = rows.get(key)
        if row is None:  # deleted since planning: the next run has nothing to do for it
            continue
        event_id = _insert(client, target, google_event_id(user_id, *key), event_body(row))
        _save_link(conn, user_id, key, target, event_id, row.content_hash)
        result.eventsCreated += 1
        written()
    for key, link in work.updates:
        row = rows.get(key)
        if row is None:
            continue
        body = event_body(row)
        try:
            client.patch(link.google_calendar_id, link.google_event_id, body)
            event_id = link.google_event_id
        except GoogleApiError as exc:
            if exc.status not in (404, 410):
                raise
            event_id = _insert(client, link.google_calendar_id, google_event_id(user_id, *key), body)
        _save_link(conn, user_id, key, link.google_calendar_id, event_id, row.content_hash)
        result.eventsUpdated += 1
        written()


def _insert(client: CalendarClient, calendar_id: str, event_id: str, body: dict) -> str:
    """Insert under our deterministic id; if it is already there (409), patch it to ``body``."""
    try:
        return client.insert(calendar_id, {**body, "id": event_id})["id"]
    except GoogleApiError as exc:
        if exc.status != 409:
            raise
    client.patch(calendar_id, event_id, body)
    return event_id


def _save_link(
    conn, user_id: int, key: Key, google_calendar_id: str, event_id: str, content_hash: str
) -> None:
    conn.execute(
        """
        INSERT INTO google_event_links
               (user_id, calendar_id, uid, recurrence_id, google_calendar_id, google_event_id, content_hash)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (user_id, calendar_id, uid, recurrence_id) DO UPDATE
           SET google_calendar_id = EXCLUDED.google_calendar_id,
               google_event_id = EXCLUDED.google_event_id,
               content_hash = EXCLUDED.content_hash,
               pushed_at = now()
        """,
        (user_id, *key, google_calendar_id, event_id, content_hash),
    )

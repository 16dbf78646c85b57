"""google_calendar_push: reconcile each connected member's Google Calendar with their calendars' events.

Desired state, per member: every instance in ``events`` of the calendars they are a member of
(in the run's scope) that starts inside the run's window, except cancelled ones. Pushed state:
their ``google_event_links`` made under the account's current ``account_subject``. The
difference is the work — and nothing else:

- desired, no link (or a link into another Google calendar than the target) -> ``events.insert``
  with an id derived from ``(user, calendar, uid, recurrence_id)``; a 409 (already there, e.g.
  a crash lost the link) -> ``events.patch`` instead;
- desired, link with another ``content_hash`` -> ``events.patch`` (a 404/410: re-insert);
- link, no longer desired (event deleted or cancelled, member left, calendar gone) ->
  ``events.delete`` (404/410 count as done) and the link goes.

Window: the sync window ics_sync keeps (``almanac.ics.sync.sync_window`` of the run's instant,
``[instant - ics_window_days_back, instant + ics_window_days_ahead)``), so a first push does not
send all history. Links whose instance still exists but starts outside the window are left
alone — neither patched nor deleted: a copy on Google is history, and it is not deleted just
because it aged out of the window (ics_sync keeps those rows too). A link whose instance row is
gone is deleted as before (its start is unknown; ics_sync deletes rows only inside its window),
and so are the links of deleted or cancelled instances inside the window.

Calls go in Calendar batch requests (``CalendarClient.run``: up to ``google_batch_size`` calls
per HTTP request); every call keeps its own outcome as above, and 429/5xx calls are retried in a
later batch. The links of each batch are written and committed when its answer is in, so a
rerun — or a run after a partial failure or a crash mid-batch, or a backfill — converges
without duplicates (ids are deterministic: an insert Google already has answers 409 -> patch).

Accounts: links pushed under another ``account_subject`` belong to a Google account we can no
longer reach (the user connected a different one): they are dropped, and that member is
reconciled over all their calendars, so everything is created in the new account. The
event ids are deterministic, so reconnecting an account that still has copies finds them
(409 -> patch) instead of duplicating them.

Isolation: an error about one event (Google refuses it for good: 400, a 403 that is not a rate
limit or an access problem, 412, a 409 whose patch fails...) is recorded in
``google_push_rejections`` with Google's status and reason, and the member's other events
are still pushed. The same content is not sent again until its ``content_hash``, the target
calendar or the account changes, or an operator deletes the row. Errors about the member
(401 after a refresh, the target calendar missing, retries exhausted, a token that cannot
be decrypted) end that member's push with an ``error`` result.

Pending pushes: ``calendar_push_pending`` holds the calendars ics_sync changed; a run reads
the generations (``pending_pushes``) and clears what it pushed (``clear_pushed``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from psycopg.rows import class_row, dict_row

from almanac.batches import ItemResult, Kind
from almanac.errors import ConfigError, PermanentError, RetryableError
from almanac.google.accounts import GoogleAccount, load_accounts, record_push
from almanac.google.client import (
    DEFAULT_POLICY,
    MAX_BATCH_SIZE,
    CalendarClient,
    Call,
    GoogleApiError,
    GoogleGrantRevokedError,
    OAuthClient,
)
from almanac.google.mapping import EventRow, event_body, google_event_id
from almanac.retry import RetryPolicy

__all__ = [
    "PUSH_KIND",
    "clear_pushed",
    "member_ids_to_push",
    "pending_pushes",
    "push_batch",
]

log = logging.getLogger(__name__)

#: The job's items in summaries (``almanac.batches.summarize_batch`` / ``combine_summaries``).
PUSH_KIND = Kind("Members", "userId", ("eventsCreated", "eventsUpdated", "eventsDeleted", "eventsRejected"))

_DETAIL_REJECTIONS = 5  # rejections listed in a member's result (all are in google_push_rejections)
# 403 reasons about the account or its calendar, not the event: every other event would fail alike.
_MEMBER_403_REASONS = frozenset({"requiredAccessLevel", "quotaExceeded", "dailyLimitExceeded"})

Key = tuple[int, str, str]  # (calendar_id, uid, recurrence_id)
Window = tuple[datetime, datetime]  # [start, end) of instance starts, aware


# --- planning -------------------------------------------------------------------------


def member_ids_to_push(conn, calendar_ids: list[int] | None) -> list[int]:
    """Google accounts whose integration is usable (``active``, or ``expired``: the push's
    request-time refresh retries it) with something in scope: a membership of, or links into,
    one of ``calendar_ids`` (links too, so a member who left still gets their copies removed).
    ``None``: every such account. Commits (ends its read transaction)."""
    rows = conn.execute(
        """
        SELECT a.user_id
          FROM google_accounts a
          JOIN integrations i ON i.id = a.integration_id
         WHERE i.status IN ('active', 'expired')
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


def pending_pushes(conn) -> dict[int, int]:
    """The calendars changed since they were last pushed: ``{calendar_id: generation}``.

    Take it as the run's snapshot before pushing, and hand it to ``clear_pushed`` afterwards.
    Runs in the caller's transaction.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT calendar_id, generation FROM calendar_push_pending ORDER BY calendar_id")
        return {row["calendar_id"]: row["generation"] for row in cur.fetchall()}


def clear_pushed(conn, snapshot: dict[int, int], failed_user_ids: Iterable[int]) -> int:
    """Forget the pending pushes of ``snapshot`` that this run delivered; the number of rows deleted.

    A row goes only if its generation is still <= the snapshot's (a change stored meanwhile
    stays pending for the next run) and no failed user is a member of its calendar or has
    links into it (their push must be tried again). Runs in the caller's transaction: the
    caller commits.
    """
    if not snapshot:
        return 0
    ids = sorted(snapshot)
    cur = conn.execute(
        """
        DELETE FROM calendar_push_pending p
         USING unnest(%(ids)s::bigint[], %(gens)s::bigint[]) AS s(calendar_id, generation)
         WHERE p.calendar_id = s.calendar_id
           AND p.generation <= s.generation
           AND NOT EXISTS (SELECT 1 FROM calendar_members m
                            WHERE m.calendar_id = p.calendar_id AND m.user_id = ANY(%(failed)s::bigint[]))
           AND NOT EXISTS (SELECT 1 FROM google_event_links l
                            WHERE l.calendar_id = p.calendar_id AND l.user_id = ANY(%(failed)s::bigint[]))
        """,
        {"ids": ids, "gens": [snapshot[i] for i in ids], "failed": sorted(set(failed_user_ids))},
    )
    return cur.rowcount


# --- pushing --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Link:
    calendar_id: int
    uid: str
    recurrence_id: str
    google_calendar_id: str
    google_event_id: str
    content_hash: str

    @property
    def key(self) -> Key:
        return (self.calendar_id, self.uid, self.recurrence_id)


@dataclass(frozen=True)
class _Rejection:
    calendar_id: int
    uid: str
    recurrence_id: str
    content_hash: str
    operation: str
    google_calendar_id: str

    @property
    def key(self) -> Key:
        return (self.calendar_id, self.uid, self.recurrence_id)

    def holds(self, operation: str, content_hash: str, google_calendar_id: str) -> bool:
        """Whether this refusal still stands for that call (same content, same calendar)."""
        same_kind = (operation == "delete") == (self.operation == "delete")
        return (
            same_kind and self.content_hash == content_hash and self.google_calendar_id == google_calendar_id
        )


@dataclass
class _Work:
    creates: list[Key] = field(default_factory=list)
    updates: list[tuple[Key, _Link]] = field(default_factory=list)
    deletes: list[tuple[Key, _Link]] = field(default_factory=list)
    held: int = 0  # calls not made: Google refused the same content before
    rejected: set[Key] = field(default_factory=set)  # keys with a rejection row (kept by the plan)

    def __bool__(self) -> bool:
        return bool(self.creates or self.updates or self.deletes)


@dataclass
class _Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PUSH_KIND.counters, 0))
    rejections: list[dict] = field(default_factory=list)
    held: int = 0

    def result(
        self, user_id: int, status: str, error: str | None = None, permanent: bool = False
    ) -> ItemResult:
        detail: dict = {}
        if self.rejections:
            detail["rejections"] = self.rejections[:_DETAIL_REJECTIONS]
        if self.held:
            detail["eventsHeld"] = self.held
        return ItemResult(user_id, status, dict(self.counts), error, permanent, detail)

    def line(self) -> str:
        c = self.counts
        return f"+{c['eventsCreated']} ~{c['eventsUpdated']} -{c['eventsDeleted']} !{c['eventsRejected']}"


@dataclass(frozen=True)
class _Step:
    """What one Google call is for (its ``Call.tag``): the key, the counter it adds to, the
    content and calendar its link will record, and the body/id a follow-up call needs."""

    key: Key
    kind: str  # "eventsCreated" | "eventsUpdated" | "eventsDeleted"
    content_hash: str
    google_calendar_id: str
    event_id: str  # our deterministic id (a delete: the link's)
    body: dict | None = None
    after_conflict: bool = False  # a patch made because the insert answered 409


ClientFactory = Callable[..., CalendarClient]
#: ``integration id -> google-auth credentials``, refreshed through the integrations store
#: (``almanac.integrations.google.google_credentials`` bound to a ``Refresher``).
CredentialsFor = Callable[[int], object]


def push_batch(
    conn,
    user_ids: Iterable[int],
    *,
    calendar_ids: list[int] | None,
    credentials: CredentialsFor,
    oauth: OAuthClient,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    client_factory: ClientFactory = CalendarClient,
    window: Window | None = None,
    batch_size: int = MAX_BATCH_SIZE,
) -> list[ItemResult]:
    """Reconcile each member's Google Calendar; one member's failure never stops the others.

    Commits: per member (its plan, then the links and rejections of each batch request as its
    answer comes in, then its outcome), so a failure keeps the work already done.

    Parameters:
        conn: psycopg connection to the application DB.
        calendar_ids: the run's scope (the calendars that changed); ``None`` for all.
        credentials: each member's Google credentials by integration id; every token refresh
            goes through the integrations store (the one refresh path, under its lease).
        oauth: the product's OAuth client and Google's endpoints (``api_endpoint``).
        policy: retries per Google call (``almanac.retry.RetryPolicy``).
        sleep: waits between retried calls (tests pass a recorder).
        window: ``(start, end)``: push only instances starting in ``[start, end)``, and leave
            the links of instances outside it alone (the run's sync window); ``None``: all.
        batch_size: calls per batch request (``google_batch_size``, 1..50).
    Returns:
        One ``ItemResult`` per member (``PUSH_KIND``), in order: ``updated`` / ``unchanged``;
        ``skipped`` (no account, revoked grant); ``error`` with ``permanent`` set when a retry
        cannot help (undecryptable token, target calendar missing, 401). Counts
        ``eventsCreated/Updated/Deleted/Rejected``; ``detail`` lists a few rejections.
    Raises:
        ConfigError: ``batch_size`` outside 1..50, or a window that ends before it starts.
        Otherwise only database faults; Google and token problems become per-member results.
    """
    policy = policy or DEFAULT_POLICY
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"google_batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}")
    if window is not None and not window[0] < window[1]:
        raise ConfigError(f"the push window must start before it ends, got {window[0]} .. {window[1]}")
    ids = list(dict.fromkeys(user_ids))
    accounts = load_accounts(conn, ids)
    conn.commit()
    results: list[ItemResult] = []
    for user_id in ids:
        account = accounts.get(user_id)
        if account is None:
            results.append(ItemResult(user_id, "skipped", error="no Google account connected"))
        elif account.status not in ("active", "expired"):
            results.append(ItemResult(user_id, "skipped", error=f"Google account {account.status}"))
        else:
            results.append(
                _push_member(
                    conn, account, calendar_ids, credentials, oauth, policy, sleep, client_factory,
                    window, batch_size,
                )
            )
    return results


def _push_member(
    conn, account, scope, credentials, oauth, policy, sleep, client_factory, window, batch_size
) -> ItemResult:
    from almanac.integrations.refresh import IntegrationUnusableError

    user_id = account.user_id
    tally = _Tally()
    work = _plan(conn, account, scope, window)
    conn.commit()
    tally.held = work.held
    if not work:
        return tally.result(user_id, "unchanged")
    client = None
    status, error, permanent = "updated", None, False
    try:
        client = client_factory(
            oauth,
            credentials=credentials(account.integration_id),
            policy=policy,
            sleep=sleep,
            user_id=user_id,
            batch_size=batch_size,
        )
        _apply(conn, client, account, work, tally)
        record_push(conn, user_id, None)
    except (IntegrationUnusableError, GoogleGrantRevokedError) as exc:
        conn.commit()  # keep the links of the calls that did succeed
        status, error = "skipped", f"Google account unusable: {exc}"
        log.warning("user %s: Google grant revoked or unusable; skipped (%s)", user_id, exc)
    except (PermanentError, RetryableError) as exc:
        conn.commit()
        error = f"{type(exc).__name__}: {exc}"
        record_push(conn, user_id, error)
        status, permanent = "error", not isinstance(exc, RetryableError)
        log.warning("user %s: push failed after %s: %s", user_id, tally.line(), error)
    conn.commit()
    if status == "updated" and client is not None:
        sent = client.http_requests
        log.info(
            "user %s: %s in %d batch + %d single request(s)",
            user_id, tally.line(), sent["batch"], sent["single"],
        )
    return tally.result(user_id, status, error, permanent)


def _in_scope_and_window(alias: str) -> str:
    """SQL: the row ``alias`` (a link or a rejection) is in the run's calendar scope, and no instance of
    it lies outside the window (``%(scope)s``/``%(lo)s``/``%(hi)s``; a null bound means everything).
    ``alias`` is one of ours, never input."""
    return f"""(%(scope)s::bigint[] IS NULL OR {alias}.calendar_id = ANY(%(scope)s::bigint[]))
               AND (%(lo)s::timestamptz IS NULL
                    OR NOT EXISTS (SELECT 1 FROM events o
                                    WHERE o.calendar_id = {alias}.calendar_id AND o.uid = {alias}.uid
                                      AND o.recurrence_id = {alias}.recurrence_id
                                      AND (o.starts_at < %(lo)s::timestamptz
                                           OR o.starts_at >= %(hi)s::timestamptz)))"""


def _plan(conn, account: GoogleAccount, scope: list[int] | None, window: Window | None = None) -> _Work:
    """The member's work; drops links and rejections of another Google account (caller commits).

    With a ``window``: only instances starting inside it are desired, and links and rejections
    of instances that still exist but start outside it are not looked at (left alone).
    """
    user_id, target, subject = account.user_id, account.target_calendar_id, account.account_subject
    foreign = conn.execute(
        "DELETE FROM google_event_links WHERE user_id = %s AND account_subject IS DISTINCT FROM %s",
        (user_id, subject),
    ).rowcount
    conn.execute(
        "DELETE FROM google_push_rejections WHERE user_id = %s AND account_subject IS DISTINCT FROM %s",
        (user_id, subject),
    )
    if foreign:
        # Another Google account: nothing of this member's is there yet, whatever the run's scope.
        log.info(
            "user %s: Google account changed; %d old links dropped, pushing everything", user_id, foreign
        )
        scope = None
    lo, hi = window if window is not None else (None, None)
    params = {"user": user_id, "scope": scope, "lo": lo, "hi": hi}
    # An instance row that exists outside the window is history: its link and rejection are not
    # looked at. A link whose row is gone has no start to go by: it is handled (deleted).
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT e.calendar_id, e.uid, e.recurrence_id, e.content_hash
              FROM calendar_members m
              JOIN events e ON e.calendar_id = m.calendar_id
             WHERE m.user_id = %(user)s AND e.status <> 'cancelled'
               AND (%(scope)s::bigint[] IS NULL OR m.calendar_id = ANY(%(scope)s::bigint[]))
               AND (%(lo)s::timestamptz IS NULL
                    OR (e.starts_at >= %(lo)s::timestamptz AND e.starts_at < %(hi)s::timestamptz))
            """,
            params,
        )
        desired = {
            (r["calendar_id"], r["uid"], r["recurrence_id"]): r["content_hash"] for r in cur.fetchall()
        }
    with conn.cursor(row_factory=class_row(_Link)) as cur:
        cur.execute(
            f"""
            SELECT l.calendar_id, l.uid, l.recurrence_id, l.google_calendar_id, l.google_event_id,
                   l.content_hash
              FROM google_event_links l
             WHERE l.user_id = %(user)s
               AND {_in_scope_and_window("l")}
            """,
            params,
        )
        links = {link.key: link for link in cur.fetchall()}
    with conn.cursor(row_factory=class_row(_Rejection)) as cur:
        cur.execute(
            f"""
            SELECT r.calendar_id, r.uid, r.recurrence_id, r.content_hash, r.operation, r.google_calendar_id
              FROM google_push_rejections r
             WHERE r.user_id = %(user)s
               AND {_in_scope_and_window("r")}
            """,
            params,
        )
        rejections = {r.key: r for r in cur.fetchall()}

    work = _Work()
    keep: set[Key] = set()  # rejections that hold back a call, or that a call of this run settles

    def held(key: Key, operation: str, content_hash: str, google_calendar_id: str) -> bool:
        rejection = rejections.get(key)
        if rejection is not None and rejection.holds(operation, content_hash, google_calendar_id):
            work.held += 1
            keep.add(key)
            return True
        return False

    for key, digest in desired.items():
        link = links.get(key)
        if link is None or link.google_calendar_id != target:  # new, or the target calendar changed
            if held(key, "insert", digest, target):
                continue
            if link is not None:  # move the copy
                work.deletes.append((key, link))
            work.creates.append(key)
            keep.add(key)
        elif link.content_hash != digest:
            if held(key, "patch", digest, link.google_calendar_id):
                continue
            work.updates.append((key, link))
            keep.add(key)
    for key, link in links.items():
        if key not in desired and not held(key, "delete", link.content_hash, link.google_calendar_id):
            work.deletes.append((key, link))
            keep.add(key)
    stale = [key for key in rejections if key not in keep]  # pushed, or no longer desired
    if stale:
        conn.execute(
            """
            DELETE FROM google_push_rejections r
             USING unnest(%s::bigint[], %s::text[], %s::text[]) AS k(calendar_id, uid, recurrence_id)
             WHERE r.user_id = %s AND r.calendar_id = k.calendar_id AND r.uid = k.uid
               AND r.recurrence_id = k.recurrence_id
            """,
            ([k[0] for k in stale], [k[1] for k in stale], [k[2] for k in stale], user_id),
        )
    work.rejected = set(keep) & set(rejections)
    work.creates.sort()
    work.updates.sort(key=lambda item: item[0])
    work.deletes.sort(key=lambda item: item[0])
    return work


def _load_rows(conn, keys: list[Key]) -> dict[Key, EventRow]:
    if not keys:
        return {}
    with conn.cursor(row_factory=class_row(EventRow)) as cur:
        cur.execute(
            """
            SELECT e.calendar_id, e.uid, e.recurrence_id, e.summary, e.description, e.location, e.status,
                   e.all_day, e.starts_at, e.ends_at, e.content_hash, c.time_zone
              FROM events e
              JOIN calendars c ON c.id = e.calendar_id
              JOIN unnest(%s::bigint[], %s::text[], %s::text[]) AS k(calendar_id, uid, recurrence_id)
                ON e.calendar_id = k.calendar_id AND e.uid = k.uid AND e.recurrence_id = k.recurrence_id
            """,
            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
        )
        return {(row.calendar_id, row.uid, row.recurrence_id): row for row in cur.fetchall()}


def _apply(conn, client: CalendarClient, account: GoogleAccount, work: _Work, tally: _Tally) -> None:
    """Make the calls in batch requests; a per-event refusal is recorded and the rest go on.

    Deletes first, then inserts, then patches; follow-ups (409 -> patch, 404/410 on a patch ->
    insert) and retries go in later batches. The links and rejections of each batch request are
    written in one round trip and committed when its answer is in. A refusal about the member
    is raised once the rest of its batch is recorded.
    """
    user_id, target = account.user_id, account.target_calendar_id
    calls = [
        Call(
            "delete",
            link.google_calendar_id,
            link.google_event_id,
            tag=_Step(key, "eventsDeleted", link.content_hash, link.google_calendar_id, link.google_event_id),
        )
        for key, link in work.deletes
    ]
    rows = _load_rows(conn, work.creates + [key for key, _ in work.updates])
    for key in work.creates:
        row = rows.get(key)
        if row is None:  # deleted since planning: the next run has nothing to do for it
            continue
        body, event_id = event_body(row), google_event_id(user_id, *key)
        step = _Step(key, "eventsCreated", row.content_hash, target, event_id, body)
        calls.append(Call("insert", target, body={**body, "id": event_id}, tag=step))
    for key, link in work.updates:
        row = rows.get(key)
        if row is None:
            continue
        body = event_body(row)
        event_id = google_event_id(user_id, *key)
        step = _Step(key, "eventsUpdated", row.content_hash, link.google_calendar_id, event_id, body)
        calls.append(Call("patch", link.google_calendar_id, link.google_event_id, body, tag=step))

    # Link writes wait for the end of their batch request and go in one round trip with its commit.
    saved: list[tuple] = []  # link upserts
    gone: list[tuple[Key, str]] = []  # links deleted: (key, the Google calendar the copy was in)
    settled: set[Key] = set()  # keys whose rejection row goes (pushed, or deleted)
    rejected = set(work.rejected)  # keys with a rejection row, including those recorded now

    def handle(call: Call, outcome: dict | GoogleApiError) -> list[Call]:
        step: _Step = call.tag
        if isinstance(outcome, GoogleApiError):
            status = outcome.status
            if call.op == "delete" and status in (404, 410):
                outcome = {}  # already gone: done
            elif call.op == "insert" and status == 409:  # already there (a lost link): patch it to ours
                patch = dataclasses.replace(step, after_conflict=True)
                return [Call("patch", call.calendar_id, step.event_id, step.body, tag=patch)]
            elif call.op == "patch" and status in (404, 410) and not step.after_conflict:
                body = {**(step.body or {}), "id": step.event_id}  # gone on Google: insert it again
                return [Call("insert", call.calendar_id, body=body, tag=step)]
            else:
                if _about_member(outcome, call.op):
                    raise outcome
                _record_rejection(conn, account, step, call.op, outcome, tally)
                rejected.add(step.key)
                return []
        if call.op == "delete":
            gone.append((step.key, step.google_calendar_id))
        else:
            event_id = outcome.get("id") or call.event_id or step.event_id
            link = (step.google_calendar_id, event_id, step.content_hash, account.account_subject)
            saved.append((user_id, *step.key, *link))
        if step.key in rejected:
            settled.add(step.key)
        tally.counts[step.kind] += 1
        return []

    def flush() -> None:
        _write_links(conn, user_id, saved, gone, settled)
        conn.commit()
        saved.clear()
        gone.clear()
        rejected.difference_update(settled)
        settled.clear()

    client.run(calls, handle, after_request=flush)


def _about_member(exc: GoogleApiError, operation: str) -> bool:
    """Whether a refusal is about the member (account, token, target calendar), not one event.

    401 (still, after the refresh), no HTTP status (a refused token refresh), 5xx, a 404 on
    insert (the target calendar is gone) and 403s about access or quotas are the member's;
    every other 4xx is Google refusing this one event.
    """
    status = exc.status
    if status is None or status == 401 or not 400 <= status < 500:
        return True
    if status == 404 and operation == "insert":
        return True
    return status == 403 and exc.reason in _MEMBER_403_REASONS


def _record_rejection(
    conn, account: GoogleAccount, step: _Step, operation: str, exc: GoogleApiError, tally: _Tally
) -> None:
    key, content_hash, google_calendar_id = step.key, step.content_hash, step.google_calendar_id
    reason = " ".join(str(p) for p in (exc.status, exc.reason) if p) or "refused"
    if exc.google_message:
        reason = f"{reason}: {exc.google_message}"
    reason = reason[:500]
    conn.execute(
        """
        INSERT INTO google_push_rejections
               (user_id, calendar_id, uid, recurrence_id, content_hash, operation, google_calendar_id,
                account_subject, status, reason)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (user_id, calendar_id, uid, recurrence_id) DO UPDATE
           SET content_hash = EXCLUDED.content_hash, operation = EXCLUDED.operation,
               google_calendar_id = EXCLUDED.google_calendar_id,
               account_subject = EXCLUDED.account_subject, status = EXCLUDED.status,
               reason = EXCLUDED.reason, rejected_at = now()
        """,
        (
            account.user_id,
            *key,
            content_hash,
            operation,
            google_calendar_id,
            account.account_subject,
            exc.status,
            reason,
        ),
    )
    tally.counts["eventsRejected"] += 1
    tally.rejections.append(
        {
            "calendarId": key[0],
            "uid": key[1][:120],
            "recurrenceId": key[2],
            "operation": operation,
            "status": exc.status,
            "reason": reason[:200],
        }
    )
    log.warning(
        "user %s: Google refused %s of an event of calendar %s: %s",
        account.user_id,
        operation,
        key[0],
        reason,
    )


def _write_links(
    conn, user_id: int, saved: list[tuple], gone: list[tuple[Key, str]], settled: Iterable[Key]
) -> None:
    """Write what one batch request did (the caller commits): the links of pushed copies, the
    removal of deleted ones, and the rejection rows those settle.

    A deleted copy's link goes only if it still points into the calendar the copy was deleted
    from: a copy moved to another calendar may be linked there already.
    """
    with conn.cursor() as cur:
        if gone:
            cur.execute(
                """
                DELETE FROM google_event_links l
                 USING unnest(%s::bigint[], %s::text[], %s::text[], %s::text[])
                       AS k(calendar_id, uid, recurrence_id, google_calendar_id)
                 WHERE l.user_id = %s AND l.calendar_id = k.calendar_id AND l.uid = k.uid
                   AND l.recurrence_id = k.recurrence_id AND l.google_calendar_id = k.google_calendar_id
                """,
                (
                    [k[0] for k, _ in gone],
                    [k[1] for k, _ in gone],
                    [k[2] for k, _ in gone],
                    [c for _, c in gone],
                    user_id,
                ),
            )
        if saved:
            cur.executemany(
                """
                INSERT INTO google_event_links
                       (user_id, calendar_id, uid, recurrence_id, google_calendar_id, google_event_id,
                        content_hash, account_subject)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (user_id, calendar_id, uid, recurrence_id) DO UPDATE
                   SET google_calendar_id = EXCLUDED.google_calendar_id,
                       google_event_id = EXCLUDED.google_event_id,
                       content_hash = EXCLUDED.content_hash,
                       account_subject = EXCLUDED.account_subject,
                       pushed_at = now()
                """,
                saved,
            )
        keys = sorted(settled)
        if keys:
            cur.execute(
                """
                DELETE FROM google_push_rejections r
                 USING unnest(%s::bigint[], %s::text[], %s::text[]) AS k(calendar_id, uid, recurrence_id)
                 WHERE r.user_id = %s AND r.calendar_id = k.calendar_id AND r.uid = k.uid
                   AND r.recurrence_id = k.recurrence_id
                """,
                ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], user_id),
            )

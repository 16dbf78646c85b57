-- google_calendar_push: calendars whose events changed and are not yet pushed to every member.
-- ics_sync bumps a calendar's generation in the same transaction as the events it changed, so
-- a change committed by a task try that later failed is still pushed. google_calendar_push
-- reads the generations when it plans and deletes a row only if no newer change arrived.
-- calendar_id has no foreign key: a deleted calendar's Google copies must still be removed.
CREATE TABLE calendar_push_pending (
    calendar_id bigint      PRIMARY KEY,
    generation  bigint      NOT NULL DEFAULT 1,
    changed_at  timestamptz NOT NULL DEFAULT now()
);

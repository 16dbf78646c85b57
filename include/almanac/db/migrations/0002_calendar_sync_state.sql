-- ICS feed sync: what each calendar's last fetch found, so an unchanged feed costs nothing.

ALTER TABLE calendars
    ADD COLUMN sync_enabled         boolean     NOT NULL DEFAULT true,
    ADD COLUMN last_attempt_at      timestamptz,
    ADD COLUMN last_success_at      timestamptz,
    ADD COLUMN etag                 text,          -- validators for the next conditional GET
    ADD COLUMN last_modified        text,
    ADD COLUMN body_sha256          text,          -- same body twice: neither parsed nor written
    ADD COLUMN window_anchor        timestamptz,   -- the run instant the stored window was expanded at
    ADD COLUMN sync_status          text        NOT NULL DEFAULT 'never'
        CHECK (sync_status IN ('never', 'ok', 'error', 'held')),
    ADD COLUMN last_error           text,          -- operator-readable; NULL once a sync succeeds
    ADD COLUMN consecutive_failures integer     NOT NULL DEFAULT 0,
    ADD COLUMN event_count          integer;       -- instances in the sync window after the last success

CREATE INDEX calendars_due_idx ON calendars (id) WHERE source_url IS NOT NULL AND sync_enabled;

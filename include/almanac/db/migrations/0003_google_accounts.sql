-- google_calendar_push: connected Google accounts, and which Google event each pushed instance became.

-- One connected Google account per user. Tokens are Fernet-encrypted with the Airflow
-- Variable almanac_token_fernet_key; nothing here is readable without that key.
CREATE TABLE google_accounts (
    user_id                 bigint      PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    refresh_token_enc       text        NOT NULL,
    access_token_enc        text,                     -- NULL until the first refresh
    access_token_expires_at timestamptz,
    target_calendar_id      text        NOT NULL DEFAULT 'primary',   -- Google calendar pushed to
    status                  text        NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'revoked')),
    last_error              text,                     -- operator-readable, never a token
    last_push_at            timestamptz,
    connected_at            timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX google_accounts_active_idx ON google_accounts (user_id) WHERE status = 'active';

-- What was pushed: one row per (member, event instance). The reconciliation compares these
-- with events of the member's calendars: missing -> insert, other content_hash -> patch,
-- no longer desired -> delete on Google, then here. calendar_id has no foreign key on
-- purpose: the links of a deleted calendar must outlive it so their Google copies get deleted.
CREATE TABLE google_event_links (
    user_id            bigint      NOT NULL REFERENCES google_accounts (user_id) ON DELETE CASCADE,
    calendar_id        bigint      NOT NULL,
    uid                text        NOT NULL,
    recurrence_id      text        NOT NULL DEFAULT '',
    google_calendar_id text        NOT NULL,
    google_event_id    text        NOT NULL,
    content_hash       text        NOT NULL,          -- events.content_hash that was pushed
    pushed_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, calendar_id, uid, recurrence_id)
);
CREATE INDEX google_event_links_calendar_idx ON google_event_links (calendar_id, user_id);

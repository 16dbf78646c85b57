-- google_calendar_push: which Google account a link was pushed to, and events Google refused for good.

-- Google's account id (the OpenID "sub" of the grant). NULL for accounts connected before it
-- was recorded. A reconnect with another subject is another Google account: links pushed
-- under a different subject are dropped at the next push and everything is created anew.
ALTER TABLE google_accounts ADD COLUMN account_subject text;

-- The account_subject the copy was pushed under (NULL: pushed before subjects were recorded).
ALTER TABLE google_event_links ADD COLUMN account_subject text;

-- One row per (member, event instance) that Google refused with a permanent, per-event error
-- (400 invalid, 403 that is not a rate limit, 412, a 409 whose patch failed...). The push
-- does not send the same content again: it retries once the event's content_hash changes,
-- the target calendar or the account changes, or an operator deletes the row. The row goes
-- once the event is pushed or is no longer desired.
CREATE TABLE google_push_rejections (
    user_id            bigint      NOT NULL REFERENCES google_accounts (user_id) ON DELETE CASCADE,
    calendar_id        bigint      NOT NULL,              -- no foreign key, like google_event_links
    uid                text        NOT NULL,
    recurrence_id      text        NOT NULL DEFAULT '',
    content_hash       text        NOT NULL,              -- events.content_hash that was refused
    operation          text        NOT NULL CHECK (operation IN ('insert', 'patch', 'delete')),
    google_calendar_id text        NOT NULL,
    account_subject    text,
    status             integer,                           -- Google's HTTP status
    reason             text        NOT NULL,              -- Google's reason and message, never a token
    rejected_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, calendar_id, uid, recurrence_id)
);

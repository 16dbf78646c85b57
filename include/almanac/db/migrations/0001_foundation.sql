-- Foundation schema: the contract the jobs read and write. Later migrations extend it.

CREATE TABLE tenants (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id          bigserial   PRIMARY KEY,
    tenant_id   bigint      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text        NOT NULL,
    email       text,
    phone       text,                                  -- E.164, for SMS
    time_zone   text        NOT NULL DEFAULT 'UTC',    -- IANA zone: digests go out at local time
    -- channels the user accepts notifications on, in order of preference
    contact_channels text[] NOT NULL DEFAULT ARRAY['email']::text[]
        CHECK (contact_channels <@ ARRAY['email', 'sms', 'push']::text[]),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (email IS NOT NULL OR phone IS NOT NULL)
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email)) WHERE email IS NOT NULL;
CREATE INDEX users_tenant_idx ON users (tenant_id);

CREATE TABLE calendars (
    id          bigserial   PRIMARY KEY,
    tenant_id   bigint      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text        NOT NULL,
    time_zone   text        NOT NULL DEFAULT 'UTC',    -- zone for floating times in its feed
    source_url  text,                                  -- ICS feed; NULL for a calendar kept in-app
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX calendars_tenant_idx ON calendars (tenant_id);

CREATE TABLE calendar_members (
    calendar_id bigint      NOT NULL REFERENCES calendars (id) ON DELETE CASCADE,
    user_id     bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text        NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'member')),
    joined_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (calendar_id, user_id)
);
CREATE INDEX calendar_members_user_idx ON calendar_members (user_id);

-- One row per event instance: a recurring series is stored expanded, each instance
-- identified by (uid, recurrence_id); recurrence_id is '' for a non-recurring event.
CREATE TABLE events (
    id            bigserial   PRIMARY KEY,
    calendar_id   bigint      NOT NULL REFERENCES calendars (id) ON DELETE CASCADE,
    uid           text        NOT NULL,
    recurrence_id text        NOT NULL DEFAULT '',
    summary       text        NOT NULL DEFAULT '',
    description   text        NOT NULL DEFAULT '',
    location      text        NOT NULL DEFAULT '',
    status        text        NOT NULL DEFAULT 'confirmed'
        CHECK (status IN ('confirmed', 'tentative', 'cancelled')),
    all_day       boolean     NOT NULL DEFAULT false,
    starts_at     timestamptz NOT NULL,
    ends_at       timestamptz NOT NULL,
    content_hash  text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (calendar_id, uid, recurrence_id),
    CHECK (ends_at >= starts_at)
);
CREATE INDEX events_calendar_starts_idx ON events (calendar_id, starts_at);

-- An invitation to join a calendar. It expires expires_at, or when that is NULL,
-- invitation_ttl_days (setting, default 30) after created_at; invitation_cleanup deletes
-- pending ones once expired.
CREATE TABLE invitations (
    id            bigserial   PRIMARY KEY,
    calendar_id   bigint      NOT NULL REFERENCES calendars (id) ON DELETE CASCADE,
    inviter_id    bigint      REFERENCES users (id) ON DELETE SET NULL,
    invitee_email text        NOT NULL,
    token         text        NOT NULL UNIQUE,
    status        text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'accepted', 'declined')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    responded_at  timestamptz
);
-- The two halves of the cleanup predicate, each served by its own partial index.
CREATE INDEX invitations_pending_expires_idx ON invitations (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
CREATE INDEX invitations_pending_created_idx ON invitations (created_at)
    WHERE status = 'pending' AND expires_at IS NULL;
CREATE INDEX invitations_calendar_idx ON invitations (calendar_id);

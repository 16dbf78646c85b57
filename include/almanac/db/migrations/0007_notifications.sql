-- The notification outbox (almanac.notify.outbox): every message to a person goes through here.
-- One row per message, unique by its idempotency key: enqueueing the same key twice is one row.
-- Status: pending -> sending (claimed by a dispatcher, with a lease) -> sent | failed (transient,
-- tried again at next_attempt_at) | dead (permanent, or out of attempts) | skipped (nothing to
-- send: no address, no device, opted out) | uncertain (handed to the provider, no outcome
-- recorded: never resent automatically).
CREATE TABLE notifications (
    id                  bigserial   PRIMARY KEY,
    tenant_id           bigint      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id             bigint      REFERENCES users (id) ON DELETE SET NULL,
    channel             text        NOT NULL CHECK (channel IN ('email', 'sms', 'push')),
    kind                text        NOT NULL CHECK (length(kind) BETWEEN 1 AND 100),
    idempotency_key     text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    -- An address or E.164 number given at enqueue time; NULL: the user's own (push: their devices).
    recipient           text,
    subject             text,
    body                text        NOT NULL,
    data                jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status              text        NOT NULL DEFAULT 'pending' CHECK (status IN
                            ('pending', 'sending', 'sent', 'failed', 'dead', 'skipped', 'uncertain')),
    attempts            integer     NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    claimed_by          text,
    claim_expires_at    timestamptz,
    -- Set when this attempt was handed to the provider: a lease that expires after it means
    -- "maybe sent" (uncertain); before it, "certainly not sent" (pending again).
    send_started_at     timestamptz,
    last_error          text,
    provider_message_id text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    CONSTRAINT notifications_idempotency_key UNIQUE (idempotency_key),
    CHECK (user_id IS NOT NULL OR recipient IS NOT NULL)
);
CREATE INDEX notifications_due_idx ON notifications (channel, next_attempt_at, id)
    WHERE status IN ('pending', 'failed');
CREATE INDEX notifications_sending_idx ON notifications (claim_expires_at) WHERE status = 'sending';
CREATE INDEX notifications_attention_idx ON notifications (updated_at DESC)
    WHERE status IN ('dead', 'uncertain');
CREATE INDEX notifications_user_idx ON notifications (user_id, created_at DESC);

-- FCM registration tokens of users' devices; an UNREGISTERED answer disables one.
CREATE TABLE push_devices (
    id                  bigserial   PRIMARY KEY,
    user_id             bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    registration_token  text        NOT NULL CHECK (length(registration_token) BETWEEN 1 AND 4096),
    platform            text        NOT NULL CHECK (platform IN ('android', 'ios', 'web')),
    created_at          timestamptz NOT NULL DEFAULT now(),
    disabled_at         timestamptz,
    disabled_reason     text,
    CONSTRAINT push_devices_token UNIQUE (registration_token)
);
CREATE INDEX push_devices_active_idx ON push_devices (user_id) WHERE disabled_at IS NULL;

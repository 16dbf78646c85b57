-- Connected accounts: one store of OAuth integrations for every job that calls a provider
-- (almanac.integrations). Google accounts move over from google_accounts, which keeps only
-- what google_calendar_push itself needs (the target calendar, its own last push).

-- Who is told when a tenant's integration is revoked. NULL: the integration's own user.
ALTER TABLE tenants ADD COLUMN owner_user_id bigint REFERENCES users (id) ON DELETE SET NULL;

CREATE TABLE integrations (
    id                      bigserial   PRIMARY KEY,
    tenant_id               bigint      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id                 bigint      REFERENCES users (id) ON DELETE CASCADE,  -- NULL: tenant-wide
    -- 'google' or any OAuth 2 provider configured as the Airflow connection oauth_<provider>
    provider                text        NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_]{0,49}$'),
    account_subject         text,        -- the provider's id of the account (OpenID "sub"), if known
    scopes                  text[],      -- granted scopes; NULL: not recorded (connected before)
    -- Fernet-encrypted (Variable almanac_token_fernet_key): nothing here is readable without it.
    refresh_token_enc       text,        -- NULL: the provider gave none (cannot be refreshed)
    access_token_enc        text,
    access_token_expires_at timestamptz,
    status                  text        NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'expired', 'revoked', 'error')),
    last_refresh_at         timestamptz,
    -- When oauth_token_refresh next refreshes it: the expiry minus the lead time after a
    -- refresh, a backoff after a failure, the connection time for a grant without an access token.
    next_refresh_at         timestamptz,
    last_health_check_at    timestamptz,
    health_status           text        CHECK (health_status IN ('healthy', 'expired', 'revoked', 'error')),
    last_error              text,        -- operator-readable, never a token
    consecutive_failures    integer     NOT NULL DEFAULT 0,
    revoked_at              timestamptz,  -- the revocation the owner was told about (once)
    connected_at            timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
-- One integration per provider and user, and one tenant-wide one per provider and tenant.
CREATE UNIQUE INDEX integrations_user_provider_key ON integrations (user_id, provider)
    WHERE user_id IS NOT NULL;
CREATE UNIQUE INDEX integrations_tenant_provider_key ON integrations (tenant_id, provider)
    WHERE user_id IS NULL;
CREATE INDEX integrations_refresh_due_idx ON integrations (next_refresh_at)
    WHERE status IN ('active', 'expired');
CREATE INDEX integrations_health_idx ON integrations (last_health_check_at)
    WHERE status IN ('active', 'expired');

-- The Google accounts, moved over without loss: tokens stay encrypted as they were (same key).
INSERT INTO integrations (tenant_id, user_id, provider, account_subject, scopes, refresh_token_enc,
                          access_token_enc, access_token_expires_at, status, next_refresh_at,
                          last_error, revoked_at, connected_at, updated_at)
SELECT u.tenant_id, g.user_id, 'google', g.account_subject, NULL,
       -- a revoked grant's tokens are dead: erased, as a revocation erases them from now on
       CASE WHEN g.status = 'revoked' THEN NULL ELSE g.refresh_token_enc END,
       CASE WHEN g.status = 'revoked' THEN NULL ELSE g.access_token_enc END,
       CASE WHEN g.status = 'revoked' THEN NULL ELSE g.access_token_expires_at END, g.status,
       CASE WHEN g.status = 'active'
            THEN coalesce(g.access_token_expires_at - interval '5 minutes', g.connected_at) END,
       CASE WHEN g.status = 'revoked' THEN g.last_error END,
       CASE WHEN g.status = 'revoked' THEN g.updated_at END,
       g.connected_at, g.updated_at
  FROM google_accounts g
  JOIN users u ON u.id = g.user_id;

-- google_accounts: now the Google Calendar push settings of a user's Google integration.
ALTER TABLE google_accounts ADD COLUMN integration_id bigint REFERENCES integrations (id) ON DELETE CASCADE;
UPDATE google_accounts g
   SET integration_id = i.id
  FROM integrations i
 WHERE i.provider = 'google' AND i.user_id = g.user_id;
ALTER TABLE google_accounts ALTER COLUMN integration_id SET NOT NULL;
CREATE UNIQUE INDEX google_accounts_integration_key ON google_accounts (integration_id);
DROP INDEX google_accounts_active_idx;
ALTER TABLE google_accounts
    DROP COLUMN refresh_token_enc,
    DROP COLUMN access_token_enc,
    DROP COLUMN access_token_expires_at,
    DROP COLUMN status,
    DROP COLUMN account_subject;
-- What is left: user_id, integration_id, target_calendar_id, last_error (the push's own, e.g.
-- a missing target calendar), last_push_at, connected_at, updated_at.

-- The product's view of its integrations: what MWAP's request-time endpoints returned. No tokens.
CREATE VIEW integration_states AS
SELECT id AS integration_id, tenant_id, user_id, provider, account_subject, scopes, status,
       health_status, access_token_expires_at, last_refresh_at, next_refresh_at,
       last_health_check_at, last_error, consecutive_failures, revoked_at, connected_at, updated_at,
       refresh_token_enc IS NOT NULL AS refreshable
  FROM integrations;

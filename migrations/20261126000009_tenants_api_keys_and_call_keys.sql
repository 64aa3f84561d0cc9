-- Tenants and API keys, and calls named by their tenant (issue 13).
--
-- NOT safe beside the previous release (docs/deploy.md, "Upgrades and migrations"): every
-- table keyed by call now holds the call key `<tenant>.<call_id>` (wire/src/call_id.rs) where
-- it held the bare call id, and the previous release would write bare ids. Stop it first.
-- Calls that existed before belong to the tenant `default`.

CREATE TABLE tenants (
    tenant      TEXT PRIMARY KEY CHECK (tenant ~ '^[a-z0-9_-]{1,32}$'),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO tenants (tenant) VALUES ('default');

-- API keys and the short-lived tokens minted from them (`parent_id` set, `expires_at` set).
-- Only a SHA-256 hash of the secret is kept (common/src/auth/mod.rs says why a fast hash is right).
CREATE TABLE api_keys (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant      TEXT NOT NULL REFERENCES tenants (tenant),
    role        TEXT NOT NULL CHECK (role IN ('pbx', 'supervisor', 'admin')),
    hash        BYTEA NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
    -- The first characters of the secret, enough to recognise a key in `ingest keys list`.
    hint        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ,
    revoked_at  TIMESTAMPTZ,
    -- A token's key: revoking the key ends its tokens too.
    parent_id   BIGINT REFERENCES api_keys (id) ON DELETE CASCADE
);
CREATE INDEX api_keys_tenant ON api_keys (tenant, id);
CREATE INDEX api_keys_parent ON api_keys (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX api_keys_expiring ON api_keys (expires_at) WHERE expires_at IS NOT NULL;

-- Existing calls move to the tenant `default`. The history tables follow their call through
-- ON UPDATE CASCADE; the partitioned tables and the outbox carry no foreign key.
ALTER TABLE call_transitions DROP CONSTRAINT call_transitions_call_id_fkey,
    ADD CONSTRAINT call_transitions_call_id_fkey FOREIGN KEY (call_id)
        REFERENCES calls (call_id) ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE transcription_attempts DROP CONSTRAINT transcription_attempts_call_id_fkey,
    ADD CONSTRAINT transcription_attempts_call_id_fkey FOREIGN KEY (call_id)
        REFERENCES calls (call_id) ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE call_gaps DROP CONSTRAINT call_gaps_call_id_fkey,
    ADD CONSTRAINT call_gaps_call_id_fkey FOREIGN KEY (call_id)
        REFERENCES calls (call_id) ON DELETE CASCADE ON UPDATE CASCADE;

ALTER TABLE calls DROP CONSTRAINT calls_call_id_check;
UPDATE calls SET call_id = 'default.' || call_id;
UPDATE packets SET call_id = 'default.' || call_id;
UPDATE call_audio SET call_id = 'default.' || call_id;
UPDATE packet_outbox SET call_ids = ARRAY(SELECT 'default.' || c FROM unnest(call_ids) AS c);
ALTER TABLE calls ADD CONSTRAINT calls_call_id_check
    CHECK (call_id ~ '^[a-z0-9_-]{1,32}\.[A-Za-z0-9_-]{1,128}$');

-- The tenant, derived once (never written): what a tenant's reads filter on.
ALTER TABLE calls ADD COLUMN tenant TEXT
    GENERATED ALWAYS AS (split_part(call_id, '.', 1)) STORED NOT NULL;

-- GET /v1/calls is per tenant now; the streaming-calls cap counts a tenant's IN_PROGRESS calls.
DROP INDEX calls_newest;
CREATE INDEX calls_tenant_newest ON calls (tenant, created_at DESC, call_id DESC);
CREATE INDEX calls_tenant_state_newest ON calls (tenant, state, created_at DESC, call_id DESC);

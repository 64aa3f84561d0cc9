-- Switchboard's first schema: calls, their packets, and the history of their state changes.
-- The call state machine itself lives in common/src/call_state.rs; the CHECK below only
-- guards the vocabulary.

CREATE TABLE calls (
    call_id                 TEXT PRIMARY KEY
                            CHECK (call_id ~ '^[A-Za-z0-9_-]{1,128}$'),
    state                   TEXT NOT NULL
                            CHECK (state IN ('IN_PROGRESS', 'COMPLETED', 'PROCESSING_AI', 'ARCHIVED', 'FAILED')),
    -- Number of transitions the call has gone through; its creation is transition 1.
    version                 BIGINT NOT NULL DEFAULT 1,
    packets_received        BIGINT NOT NULL DEFAULT 0,
    -- Every sequence number received, as ranges: a contiguous stream stays one range.
    received                INT8MULTIRANGE NOT NULL DEFAULT '{}',
    first_sequence          BIGINT,
    last_sequence           BIGINT,
    -- Declared by the PBX at completion, so that trailing losses count as missing.
    total_packets           BIGINT,
    ai_attempts             INTEGER NOT NULL DEFAULT 0,
    transcript              TEXT,
    sentiment_label         TEXT CHECK (sentiment_label IN ('positive', 'neutral', 'negative')),
    sentiment_score         DOUBLE PRECISION,
    last_error              TEXT,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Last change of state or AI results (packets move last_packet_at only).
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_packet_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at            TIMESTAMPTZ,
    -- Outbox for the transcriber's work item: NULL while a COMPLETED call's work item has
    -- not been acknowledged by JetStream. Reset on every transition into COMPLETED.
    work_item_published_at  TIMESTAMPTZ
)
-- Every packet batch updates its calls' counters. Leaving room on each page, and indexing
-- none of the columns a packet changes, keeps those updates HOT (no index maintenance).
WITH (fillfactor = 70);

-- GET /v1/calls: newest first, optionally by state, keyset-paginated on (created_at, call_id).
CREATE INDEX calls_newest ON calls (created_at DESC, call_id DESC);
CREATE INDEX calls_state_newest ON calls (state, created_at DESC, call_id DESC);
-- The idle reaper scans the IN_PROGRESS calls through calls_state_newest; last_packet_at
-- is deliberately not indexed (see fillfactor above).
-- The outbox relay looks only at work items JetStream has not acknowledged.
CREATE INDEX calls_work_item_unpublished ON calls (updated_at)
    WHERE state = 'COMPLETED' AND work_item_published_at IS NULL;

CREATE TABLE packets (
    call_id      TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    sequence     BIGINT NOT NULL CHECK (sequence >= 0),
    data         TEXT NOT NULL,
    -- The PBX's own timestamp (seconds since the epoch, fractional), as sent.
    sent_at      DOUBLE PRECISION NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (call_id, sequence)
);

-- One row per state change, written in the same transaction as the change. The row also
-- carries the status event exactly as published, and doubles as its outbox.
CREATE TABLE call_transitions (
    id            BIGSERIAL PRIMARY KEY,
    call_id       TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    version       BIGINT NOT NULL,
    from_state    TEXT,
    to_state      TEXT NOT NULL,
    reason        TEXT NOT NULL,
    at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    event         JSONB NOT NULL,
    published_at  TIMESTAMPTZ,
    UNIQUE (call_id, version)
);

CREATE INDEX call_transitions_unpublished ON call_transitions (id) WHERE published_at IS NULL;

-- Hardening: a call's missing sequences kept incrementally, its first sequence number, and an
-- outbox for packet events.
--
-- `calls.received` (an int8multirange of every sequence received) gives way to
-- `call_gaps`: every batch rewrote and un-nested the whole multirange, so a lossy call's
-- packets got slower with each gap. A gap row is touched only when a packet lands in it or a
-- new one opens at the call's end, and the missing count needs no ranges at all:
-- expected - packets_received.

-- The first sequence number of the call's numbering (SEQUENCE_START when it was created: 0,
-- or 1 for PBXs that count from 1), so that counting never reports a phantom packet 0.
ALTER TABLE calls ADD COLUMN sequence_start BIGINT NOT NULL DEFAULT 0
    CHECK (sequence_start IN (0, 1));

-- The runs of missing sequence numbers below a call's highest received one, inclusive. (Those
-- after it, up to total_packets, are derived from the call row when asked.)
CREATE TABLE call_gaps (
    call_id        TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    first_missing  BIGINT NOT NULL,
    last_missing   BIGINT NOT NULL CHECK (last_missing >= first_missing),
    PRIMARY KEY (call_id, first_missing)
);

INSERT INTO call_gaps (call_id, first_missing, last_missing)
SELECT call_id, lower(r), upper(r) - 1
FROM calls, unnest(int8multirange(int8range(0, COALESCE(last_sequence + 1, 0))) - received) AS r;

-- No longer written or read. Dropped one release later (migrations/README.md): a previous
-- release still running during a rolling upgrade writes it.
ALTER TABLE calls ALTER COLUMN received DROP NOT NULL;

-- Packet events not yet acknowledged by JetStream: one row per writer batch, naming the
-- batch's new packets, written in the batch's transaction and deleted once JetStream has
-- acknowledged every one of them. The outbox relay republishes what is left (the process died,
-- NATS was down, the client gave up), so every stored packet reaches `<prefix>.packets.<id>`.
CREATE TABLE packet_outbox (
    id         BIGSERIAL PRIMARY KEY,
    call_ids   TEXT[] NOT NULL,
    sequences  BIGINT[] NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

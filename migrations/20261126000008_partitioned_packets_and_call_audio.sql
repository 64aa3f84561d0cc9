-- Data lifecycle (issue 15): `packets` partitioned by time, and `call_audio`, the one compacted
-- record per final call that replaces its packet rows.
--
-- Both are partitioned by RANGE on `call_created_at`, the call's own `calls.created_at`
-- (Postgres's clock when its first packet arrived), not by each packet's arrival. A unique key
-- of a partitioned table must contain the partition key; with the call's creation time that
-- costs nothing, since every packet of a call has the same one, so `(call_id, sequence,
-- call_created_at)` is as unique as `(call_id, sequence)` was, and duplicates are still found
-- by `ON CONFLICT`. A call's packets and record therefore live in the partition of the
-- interval it began in, and expiring an interval of calls is one `DROP` per table.
--
-- Partitions are made by `switchboard_add_partition` (below: the one place their names and
-- shape are defined), `PARTITION_INTERVAL_SECS` wide (a UTC day by default), by ingest's
-- partition keeper, ahead of time; see common/src/partitions.rs.
--
-- Upgrade: this migration copies the packets stored so far into the new table (one pass, under
-- the migration's lock), and the previous release cannot write the new table (its INSERT's
-- ON CONFLICT names the old key: Postgres refuses it, and those replicas answer packets 500
-- until replaced; its transcriber would read a compacted call as empty). Nothing stored is
-- lost or changed, but upgrade across this migration with the previous release stopped:
-- scale ingest and the transcriber to zero, run `ingest migrate`, then start the new release
-- (docs/deploy.md, "Upgrades").

-- The shape of every partition: a table like its parent, attached with `ATTACH PARTITION`
-- rather than `CREATE TABLE .. PARTITION OF`, because attaching takes only a SHARE UPDATE
-- EXCLUSIVE lock on the parent, which inserts do not wait for (the keeper runs while ingest
-- writes). Returns the new partition's name, or NULL if it existed.
CREATE FUNCTION switchboard_add_partition(parent TEXT, lower_bound TIMESTAMPTZ, upper_bound TIMESTAMPTZ)
RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    name TEXT := parent || '_p' || to_char(lower_bound AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MISS');
BEGIN
    IF to_regclass(quote_ident(name)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION)',
        name, parent);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        parent, name, lower_bound, upper_bound);
    RETURN name;
END $$;

ALTER TABLE packets RENAME TO packets_unpartitioned;
ALTER INDEX packets_pkey RENAME TO packets_unpartitioned_pkey;

CREATE TABLE packets (
    call_id          TEXT NOT NULL,
    sequence         BIGINT NOT NULL CHECK (sequence >= 0),
    data             TEXT NOT NULL,
    -- The PBX's own timestamp (seconds since the epoch, fractional), as sent.
    sent_at          DOUBLE PRECISION NOT NULL,
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The call's calls.created_at: the partition key.
    call_created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (call_id, sequence, call_created_at)
) PARTITION BY RANGE (call_created_at);

-- A final call's packets, compacted (common/src/calls/compaction.rs): written in the
-- transaction that deletes its packet rows. Lossless: every packet's data exactly as it arrived,
-- its PBX timestamp and its arrival, in sequence order, and which sequences were received. Read
-- through common/src/audio.rs (`Record`), which reads either form.
CREATE TABLE call_audio (
    call_id          TEXT NOT NULL,
    call_created_at  TIMESTAMPTZ NOT NULL,
    -- The sequences received, as ranges (gaps stay known).
    received         INT8MULTIRANGE NOT NULL,
    packets          INTEGER NOT NULL,
    -- How each packet's data is held in `audio`: 'text' (its UTF-8 bytes) or 'base64' (its
    -- decoded bytes, when every packet of the call was canonical base64, which encodes back to
    -- exactly what arrived: a quarter smaller, and audio compresses better than its base64).
    encoding         TEXT NOT NULL CHECK (encoding IN ('text', 'base64')),
    -- Every packet's bytes in sequence order, concatenated, then compressed (one zstd frame).
    audio            BYTEA NOT NULL,
    -- Each packet's length in the decompressed `audio`, its PBX timestamp and its arrival.
    lengths          INTEGER[] NOT NULL,
    sent_at          DOUBLE PRECISION[] NOT NULL,
    received_at      TIMESTAMPTZ[] NOT NULL,
    -- The size of the packets' data as it arrived (what the transcriber measures and bounds).
    data_bytes       BIGINT NOT NULL,
    compacted_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (call_id, call_created_at)
) PARTITION BY RANGE (call_created_at);
-- Already compressed: TOAST stores it out of line without trying pglz on it again.
ALTER TABLE call_audio ALTER COLUMN audio SET STORAGE EXTERNAL;

-- When the call's packets were compacted into call_audio (NULL: still packet rows). A compacted
-- call without a call_audio row had its audio expired (AUDIO_RETENTION_DAYS).
ALTER TABLE calls ADD COLUMN audio_compacted_at TIMESTAMPTZ;

-- The calls whose packets are still rows: the compactor takes the final ones from here, oldest
-- first, and the sweeper drops a packets partition once no call of its interval is left here.
-- Partial, so a compacted call leaves it; on created_at and audio_compacted_at only, so a
-- packet's counter update stays HOT (calls' fillfactor, migration 1). Not built CONCURRENTLY:
-- that cannot run inside this migration's transaction, and in a migration of its own it would
-- wait on (and deadlock with) replicas queued on sqlx's migration lock; the copy above holds
-- its lock longer anyway.
CREATE INDEX calls_audio_uncompacted ON calls (created_at) WHERE audio_compacted_at IS NULL;

-- Partitions for the packets copied below: one per UTC day a call began on. None ahead: ingest
-- adds those at start-up, before it takes a packet, at the configured width.
DO $$
DECLARE
    day TIMESTAMPTZ;
BEGIN
    FOR day IN
        SELECT DISTINCT date_trunc('day', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' FROM calls
    LOOP
        PERFORM switchboard_add_partition('packets', day, day + interval '1 day');
        PERFORM switchboard_add_partition('call_audio', day, day + interval '1 day');
    END LOOP;
END $$;

INSERT INTO packets (call_id, sequence, data, sent_at, received_at, call_created_at)
SELECT p.call_id, p.sequence, p.data, p.sent_at, p.received_at, c.created_at
FROM packets_unpartitioned p JOIN calls c USING (call_id);

DROP TABLE packets_unpartitioned;

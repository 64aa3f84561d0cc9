-- no-transaction
-- The calls whose packets are still rows: the compactor takes the final ones from here, oldest
-- first, and the partition keeper drops a packets partition once no call of its interval is
-- left here. Partial, so a compacted call leaves it, and on created_at and audio_compacted_at
-- only, so a packet's counter update stays HOT (calls' fillfactor, migration 1).
-- Built concurrently: calls may be large, and ingest writes it all the time.
CREATE INDEX CONCURRENTLY IF NOT EXISTS calls_audio_uncompacted
    ON calls (created_at) WHERE audio_compacted_at IS NULL;

-- Each call records the format of its audio (issue 14), replacing the transcriber's global
-- AI_AUDIO_ENCODING: `text` (the JSON API's free-form data, the default), G.711 `mulaw` or
-- `alaw` at 8000 Hz, or `slin` (signed 16-bit little-endian PCM) at its own rate. Set by the
-- packet that creates the call (the JSON API's `encoding`/`sample_rate`, or the telephony
-- adapter's stream) and never changed. The vocabulary is wire/src/audio.rs's `Encoding`.
--
-- Safe beside the previous release: columns with constant defaults are a catalogue change, and
-- the previous release neither reads nor writes them. Calls made before it read as `text`; a
-- call the previous transcriber decoded as AI_AUDIO_ENCODING is re-driven as text (see
-- docs/deploy.md).
ALTER TABLE calls
    ADD COLUMN audio_encoding TEXT NOT NULL DEFAULT 'text'
        CHECK (audio_encoding IN ('text', 'mulaw', 'alaw', 'slin')),
    ADD COLUMN sample_rate INTEGER
        CHECK (sample_rate BETWEEN 8000 AND 192000),
    ADD CONSTRAINT calls_sound_has_a_rate
        CHECK ((audio_encoding = 'text') = (sample_rate IS NULL));

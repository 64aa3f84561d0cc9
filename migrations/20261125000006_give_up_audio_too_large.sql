-- The transcriber gives up on a call whose stored audio is larger than it may send
-- (AI_MAX_AUDIO_BYTES) before loading it. The decision is recorded in calls.ai_give_up like
-- the others, so that a redelivery finishes the give-up with the same reason.
--
-- Widening only: every value the old check allowed is still allowed, so the previous release
-- keeps working, and existing rows need no validation (NOT VALID spares a scan of calls under
-- an exclusive lock).
ALTER TABLE calls
    DROP CONSTRAINT calls_ai_give_up_check,
    ADD CONSTRAINT calls_ai_give_up_check
        CHECK (ai_give_up IN ('permanent', 'exhausted', 'audio_too_large')) NOT VALID;

-- The transcriber's bookkeeping: who holds a call's AI work right now, when the next try is
-- due, and one row per attempt (the attempt counter in calls is the authority; these rows are
-- its history, with timings and errors).

ALTER TABLE calls
    -- While in the future, a transcriber is working on the call; a redelivery that finds it
    -- held waits. Cleared when the attempt ends; expires if the worker dies.
    ADD COLUMN ai_lease_until TIMESTAMPTZ,
    -- When the next AI attempt is due after a retryable failure.
    ADD COLUMN next_attempt_at TIMESTAMPTZ,
    -- Set once a transcriber has decided to give up ('permanent' error or attempts
    -- 'exhausted') and before it dead-letters the call, so that a redelivery finishes the
    -- give-up instead of calling the AI again. Cleared when the call becomes FAILED.
    ADD COLUMN ai_give_up TEXT CHECK (ai_give_up IN ('permanent', 'exhausted'));

CREATE TABLE transcription_attempts (
    call_id         TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    -- The call's version when it became COMPLETED: an operator retry starts a new round.
    work_version    BIGINT NOT NULL,
    attempt         INTEGER NOT NULL CHECK (attempt >= 1),
    worker          TEXT NOT NULL,
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ,
    outcome         TEXT CHECK (outcome IN ('succeeded', 'retry', 'failed', 'abandoned')),
    error           TEXT,
    next_attempt_at TIMESTAMPTZ,
    PRIMARY KEY (call_id, work_version, attempt)
);

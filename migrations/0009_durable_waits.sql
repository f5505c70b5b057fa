-- Durable waits (DESIGN.md §9): a step that waits for a signal, for the asynchronous
-- completion of an HTTP step that answered 202, or for time, holds no lease and no worker
-- slot. The run stays `running`, its step `running`, and the run row says what it waits for
-- until when; `ready_at` is the deadline, so the reachability rule (leased, due or parked)
-- keeps holding and recovery finds a waiting run like any due run.
ALTER TYPE event_kind ADD VALUE 'step_waiting';
ALTER TYPE event_kind ADD VALUE 'signal_received';
ALTER TYPE event_kind ADD VALUE 'step_completed_externally';
ALTER TYPE event_kind ADD VALUE 'wait_timed_out';

CREATE TYPE wait_kind AS ENUM ('signal', 'completion', 'sleep');

ALTER TABLE runs
    ADD COLUMN wait_kind     wait_kind,
    -- The signal's name; the step's name for a completion or a sleep.
    ADD COLUMN wait_name     text,
    ADD COLUMN wait_step     smallint,
    -- The attempt a completion must name (older attempts are stale).
    ADD COLUMN wait_attempt  integer,
    ADD COLUMN wait_deadline timestamptz,
    -- Every wait has a deadline, and a finished run waits for nothing.
    ADD CONSTRAINT runs_wait_complete CHECK (
        wait_kind IS NULL
        OR (wait_name IS NOT NULL AND wait_step IS NOT NULL AND wait_attempt IS NOT NULL
            AND wait_deadline IS NOT NULL AND status = 'running')
    );

-- The dashboard's waiting runs, soonest deadline first (and the overdue ones).
CREATE INDEX runs_waiting ON runs (wait_deadline) WHERE wait_kind IS NOT NULL;

-- What arrived for a run from outside: signals (kept until a wait of that name consumes
-- one, so a signal sent before the run reaches its wait is not lost) and completions of
-- asynchronous steps (for one attempt: an older attempt's completion is refused). Each row
-- is consumed at most once, in the transaction that records the step's outcome.
CREATE TABLE run_inbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- No foreign key, as for run_steps: the retention sweep deletes these with their run.
    run_id           uuid        NOT NULL,
    kind             wait_kind   NOT NULL CHECK (kind IN ('signal', 'completion')),
    -- The signal's name, or the completed step's name.
    name             text        NOT NULL,
    attempt          integer CHECK ((kind = 'completion') = (attempt IS NOT NULL)),
    payload          jsonb,
    -- A completion that reports a failure: `StepError` as JSON.
    error            jsonb,
    idempotency_key  text CHECK (char_length(idempotency_key) <= 255),
    received_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    consumed_at      timestamptz,
    -- The step whose wait consumed it.
    consumed_by      text,
    CHECK ((consumed_at IS NULL) = (consumed_by IS NULL))
);

-- A delivery repeated with the same key is the same delivery.
CREATE UNIQUE INDEX run_inbox_key ON run_inbox (run_id, kind, name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- One completion per attempt.
CREATE UNIQUE INDEX run_inbox_completion ON run_inbox (run_id, name, attempt) WHERE kind = 'completion';
-- What a wait looks for: the oldest unconsumed arrival of its name.
CREATE INDEX run_inbox_pending ON run_inbox (run_id, kind, name, id) WHERE consumed_at IS NULL;
CREATE INDEX run_inbox_run ON run_inbox (run_id);

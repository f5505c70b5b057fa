-- Pause and resume (DESIGN.md §11).
--
-- A run is paused after the attempt in flight: an operator's request sets `pause_requested`
-- (fenced like `cancel_requested`, so an owner deciding without it decides again), and the
-- owner, instead of starting the next attempt, gives the run back `paused`: no lease, not
-- due. `paused_from` keeps the status a resume returns it to. A waiting run keeps its wait
-- (and its deadline) while paused; what arrives meanwhile stays in its inbox.
ALTER TABLE runs
    ADD COLUMN pause_requested boolean NOT NULL DEFAULT false,
    ADD COLUMN paused_from     run_status,
    -- Pending on a paused workflow: accepted, neither leased nor due until the workflow is
    -- resumed.
    ADD COLUMN held            boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT runs_paused_from CHECK (
        (status = 'paused') = (paused_from IS NOT NULL)
        AND (paused_from IS NULL OR paused_from IN ('pending', 'running', 'compensating'))
    ),
    ADD CONSTRAINT runs_held_pending CHECK (NOT held OR status = 'pending');

-- A paused run is unfinished: it is neither leased nor due, and waits for an operator.
CREATE OR REPLACE FUNCTION run_status_is_unfinished(status run_status) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT status IN ('pending', 'running', 'compensating', 'paused') $$;

-- The reachability rule, restated: every unfinished run is leased, due, parked, held by its
-- paused workflow, or paused (then neither leased nor due).
ALTER TABLE runs DROP CONSTRAINT runs_reachable;
ALTER TABLE runs ADD CONSTRAINT runs_reachable CHECK (
    CASE WHEN run_status_is_terminal(status)
         THEN ready_at IS NULL AND lease_owner IS NULL AND finished_at IS NOT NULL
         WHEN status = 'paused'
         THEN ready_at IS NULL AND lease_owner IS NULL
         ELSE ready_at IS NOT NULL OR lease_owner IS NOT NULL OR parked_reason IS NOT NULL OR held
    END
);

-- A waiting run is running, or paused from running (its wait kept for the resume).
ALTER TABLE runs DROP CONSTRAINT runs_wait_complete;
ALTER TABLE runs ADD CONSTRAINT runs_wait_complete CHECK (
    wait_kind IS NULL
    OR (wait_name IS NOT NULL AND wait_step IS NOT NULL AND wait_attempt IS NOT NULL
        AND wait_deadline IS NOT NULL
        AND (status = 'running' OR (status = 'paused' AND paused_from = 'running')))
);

-- What a workflow's resume releases.
CREATE INDEX runs_held ON runs (workflow) WHERE held;
CREATE INDEX runs_paused ON runs (updated_at) WHERE status = 'paused';

-- Paused workflows: their new runs are accepted and held `pending` (the claim and the insert
-- look here); runs already under way go on.
CREATE TABLE paused_workflows (
    workflow   text        PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    paused_by  text        NOT NULL,
    note       text
);

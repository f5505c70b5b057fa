-- One SQL definition of "terminal", the same set as `RunStatus::is_terminal` (a test checks
-- every status against both). A LANGUAGE sql IMMUTABLE function of one expression is inlined
-- by the planner, so queries that use it plan as if the list were written out.
CREATE FUNCTION run_status_is_terminal(status run_status) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT status IN ('completed', 'compensated', 'failed', 'cancelled') $$;

-- Its complement, written as the list of unfinished statuses so that, once inlined, a query
-- looking for the few unfinished runs can use an index on status.
CREATE FUNCTION run_status_is_unfinished(status run_status) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT status IN ('pending', 'running', 'compensating') $$;

-- The reachability rule, now stated with it (the same rule as 0006's).
ALTER TABLE runs DROP CONSTRAINT runs_reachable;
ALTER TABLE runs ADD CONSTRAINT runs_reachable CHECK (
    CASE WHEN run_status_is_terminal(status)
         THEN ready_at IS NULL AND lease_owner IS NULL AND finished_at IS NOT NULL
         ELSE ready_at IS NOT NULL OR lease_owner IS NOT NULL OR parked_reason IS NOT NULL
    END
);

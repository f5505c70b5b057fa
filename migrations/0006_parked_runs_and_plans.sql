-- A run whose recorded steps do not match the plan its workflow version has on this instance
-- is parked: no lease, not due, its reason recorded and logged, instead of being claimed and
-- dropped again every lease period (code review 2, defect E). A parked run is unfinished yet
-- neither leased nor due, so the reachability rule makes room for it.
ALTER TYPE event_kind ADD VALUE 'run_parked';

ALTER TABLE runs ADD COLUMN parked_reason text;

ALTER TABLE runs DROP CONSTRAINT runs_reachable;
ALTER TABLE runs ADD CONSTRAINT runs_reachable CHECK (
    CASE WHEN status IN ('completed', 'compensated', 'failed', 'cancelled')
         THEN ready_at IS NULL AND lease_owner IS NULL AND finished_at IS NOT NULL
         ELSE ready_at IS NOT NULL OR lease_owner IS NOT NULL OR parked_reason IS NOT NULL
    END
);

-- The plan each registered workflow version had when it was first registered: an instance
-- whose code registers the same name and version with other steps is refused at start, since
-- runs of that version were created with the stored steps.
CREATE TABLE workflow_plans (
    workflow      text        NOT NULL,
    version       integer     NOT NULL,
    plan_hash     text        NOT NULL,
    steps         text[]      NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow, version)
);

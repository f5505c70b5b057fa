-- Every operator action, across runs and schedules, in one place (DESIGN.md §11): who, what,
-- on which run or schedule, when, and their note. Written in the transaction of the action
-- itself, so an action is here exactly when it took effect. A run's own log records the same
-- action for that run's history; this is the index an audit reads across all of them, kept
-- when runs are swept.
CREATE TABLE operator_actions (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    operator  text        NOT NULL,
    -- `run.cancel`, `run.retry`, `run.resolve`, `run.restart`, `runs.bulk`, `schedule.create`,
    -- `schedule.replace`, `schedule.enable`, `schedule.disable`, `schedule.fire`, `schedule.delete`.
    action    text        NOT NULL,
    run_id    uuid,
    schedule  text,
    bulk_id   uuid,
    note      text,
    detail    jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX operator_actions_recent ON operator_actions (at DESC, id DESC);
CREATE INDEX operator_actions_run ON operator_actions (run_id) WHERE run_id IS NOT NULL;

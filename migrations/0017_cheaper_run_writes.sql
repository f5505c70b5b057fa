-- What every write of a run pays for, made cheaper without changing what is allowed.
--
-- 1. A CHECK constraint and a trigger's WHEN are prepared again by every statement that
--    writes the table (no plan caches them), and preparing `run_status_is_terminal(status)`
--    inlines the SQL function, which parses its body each time: about 20 µs a statement
--    (pgbench, one UPDATE with the function against the same CHECK written out), and a run's
--    insert and its finishing update paid it three times. The CHECK and the trigger's WHEN
--    now name the terminal statuses themselves; queries keep calling the function (their
--    plans are cached, so they inline it once). `tests/engine.rs` holds both lists to
--    `RunStatus::is_terminal`.
-- 2. `UNIQUE (workflow, idempotency_key)` gave every run an index entry at its insert and at
--    every update that moves the row, also the many runs without a key, where NULLs never
--    conflict. A partial unique index holds exactly the same rule for the runs with a key;
--    with the key first it also serves the search by key alone (`q`), so 0004's index on the
--    key goes too: one index fewer for every write of a run to open.
-- 3. `UNIQUE (run_id, name)` on `run_steps` cost five index entries per registration and no
--    query reads through it: a run's steps are written from its workflow's plan, whose step
--    names are refused when two are the same (`DefinitionError::DuplicateStep`), and the
--    primary key (run_id, idx) stays.

ALTER TABLE runs DROP CONSTRAINT runs_reachable;
ALTER TABLE runs ADD CONSTRAINT runs_reachable CHECK (
    CASE WHEN status IN ('completed', 'compensated', 'failed', 'cancelled')
         THEN ready_at IS NULL AND lease_owner IS NULL AND finished_at IS NOT NULL
         WHEN status = 'paused'
         THEN ready_at IS NULL AND lease_owner IS NULL
         ELSE ready_at IS NOT NULL OR lease_owner IS NOT NULL OR parked_reason IS NOT NULL OR held
    END
);

DROP TRIGGER runs_webhook_on_finish ON runs;
CREATE TRIGGER runs_webhook_on_finish BEFORE UPDATE OF status ON runs
    FOR EACH ROW WHEN (NEW.status IN ('completed', 'compensated', 'failed', 'cancelled')
                       AND OLD.status NOT IN ('completed', 'compensated', 'failed', 'cancelled'))
    EXECUTE FUNCTION webhook_run_finished();

CREATE UNIQUE INDEX runs_one_run_per_key ON runs (idempotency_key, workflow)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE runs DROP CONSTRAINT runs_workflow_idempotency_key_key;
DROP INDEX runs_idempotency_key;

ALTER TABLE run_steps DROP CONSTRAINT run_steps_run_id_name_key;

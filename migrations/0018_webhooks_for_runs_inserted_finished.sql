-- A run whose trigger waits for it is inserted by its first segment, in the state that
-- segment leaves it: a registration goes in `completed`, never updated to it. 0017's
-- `runs_webhook_on_finish` fires on an update into a terminal status only, so a run that is
-- inserted terminal gets the same `run.<status>` delivery from this one, with the same
-- function, the same list of terminal statuses (held to `RunStatus::is_terminal` by
-- `tests/engine.rs`) and, like 0017's, no SQL function in its WHEN.

CREATE TRIGGER runs_webhook_on_insert_finished BEFORE INSERT ON runs
    FOR EACH ROW WHEN (NEW.status IN ('completed', 'compensated', 'failed', 'cancelled'))
    EXECUTE FUNCTION webhook_run_finished();

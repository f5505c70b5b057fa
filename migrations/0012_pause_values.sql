-- Pause and resume (DESIGN.md §11): the status of a paused run and the log entries of a
-- pause. A new enum value cannot be used in the transaction that adds it, so the columns and
-- rules that name 'paused' are in the next migration.
ALTER TYPE run_status ADD VALUE 'paused';
ALTER TYPE event_kind ADD VALUE 'pause_requested';
ALTER TYPE event_kind ADD VALUE 'run_paused';
ALTER TYPE event_kind ADD VALUE 'run_resumed';

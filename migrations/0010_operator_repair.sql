-- Operator repair (DESIGN.md §11): a compensation that gave up marked done by hand, with the
-- operator's note, and a run restarted from a step as a new run that reuses the outputs of
-- the steps before it.
ALTER TYPE event_kind ADD VALUE 'step_resolved_by_hand';
ALTER TYPE event_kind ADD VALUE 'operator_restart';

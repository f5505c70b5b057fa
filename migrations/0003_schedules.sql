-- Cron schedules. Each tick of an enabled schedule starts one run of its workflow, once across
-- all instances: the run's idempotency key is `schedule:<name>:<tick in RFC 3339>`, under the
-- runs' UNIQUE (workflow, idempotency_key).

CREATE TYPE schedule_overlap AS ENUM ('allow', 'skip');
CREATE TYPE schedule_catch_up AS ENUM ('none', 'latest', 'all');
CREATE TYPE schedule_origin AS ENUM ('api', 'file', 'builtin');

CREATE TABLE schedules (
    -- Part of every run's idempotency key, so short and plain.
    name          text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    expression    text              NOT NULL,
    time_zone     text              NOT NULL DEFAULT 'UTC',
    workflow      text              NOT NULL,
    input         jsonb             NOT NULL DEFAULT '{}'::jsonb,
    enabled       boolean           NOT NULL DEFAULT true,
    overlap       schedule_overlap  NOT NULL DEFAULT 'skip',
    catch_up      schedule_catch_up NOT NULL DEFAULT 'latest',
    origin        schedule_origin   NOT NULL DEFAULT 'api',
    -- The next tick not handled yet: every tick from here to now is due. NULL while disabled,
    -- or when the expression never fires again.
    next_fire_at  timestamptz,
    -- The last tick that started a run, and that run.
    last_fire_at  timestamptz,
    last_run_id   uuid REFERENCES runs (id) ON DELETE SET NULL,
    -- Why the last tick could not start a run (the workflow is gone...), until one could.
    last_error    text,
    created_at    timestamptz       NOT NULL DEFAULT now(),
    updated_at    timestamptz       NOT NULL DEFAULT now(),
    CONSTRAINT schedules_disabled_never_due CHECK (enabled OR next_fire_at IS NULL)
);

-- What schedulers claim and sleep until: the earliest next tick of an enabled schedule.
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE enabled AND next_fire_at IS NOT NULL;

-- Every run a schedule started: its ticks, and operators' fire-now requests. The overlap policy
-- asks whether one is unfinished; operators see the latest with their status. A run deleted by
-- the retention sweep takes its row with it.
CREATE TABLE schedule_fires (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    schedule  text        NOT NULL REFERENCES schedules (name) ON DELETE CASCADE,
    -- The tick (for a fire-now: when the operator asked).
    tick      timestamptz NOT NULL,
    manual    boolean     NOT NULL DEFAULT false,
    run_id    uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    -- The node that fired the tick, or the operator.
    fired_by  text        NOT NULL,
    fired_at  timestamptz NOT NULL DEFAULT now()
);

-- A tick is recorded once (recording it again after a crash changes nothing); a fire-now is
-- no tick and never collides with one, even at the same instant.
CREATE UNIQUE INDEX schedule_fires_tick ON schedule_fires (schedule, tick) WHERE NOT manual;
-- The latest runs of a schedule.
CREATE INDEX schedule_fires_recent ON schedule_fires (schedule, tick DESC, id DESC);

-- From a run to its schedule: the overlap check starts from the few unfinished runs, and
-- deleting a run finds its row.
CREATE INDEX schedule_fires_by_run ON schedule_fires (run_id);

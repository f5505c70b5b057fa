-- Outbound webhooks (DESIGN.md §10): admins subscribe a URL to run outcomes and to released
-- outbox events. A delivery is written by a trigger in the transaction of the change it
-- reports (a run reaching a terminal status, an outbox event released), so it exists exactly
-- when that change committed, whichever path made it. A delivery worker on every instance
-- sends the due ones, oldest first and in order per run, and marks each delivered or, past
-- its retry window, failed.
CREATE TABLE webhook_subscriptions (
    name        text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    url         text        NOT NULL,
    -- `run.completed`, `run.compensated`, `run.cancelled`, `run.failed`, `run.wait_overdue`,
    -- `event.<name>`.
    events      text[]      NOT NULL CHECK (cardinality(events) > 0),
    -- Only runs of these workflows (and events of their runs); NULL: every workflow.
    workflows   text[],
    -- The environment variable holding the Standard Webhooks secret (`whsec_...`), read at
    -- each delivery so it can be rotated; never the secret itself.
    secret_env  text        NOT NULL,
    enabled     boolean     NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TYPE webhook_delivery_status AS ENUM ('pending', 'delivered', 'failed');

CREATE TABLE webhook_deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The `webhook-id` header and the body's `id`: the same on every attempt and redelivery,
    -- so a receiver deduplicates by it.
    webhook_id       text        NOT NULL UNIQUE,
    subscription     text        NOT NULL REFERENCES webhook_subscriptions (name) ON DELETE CASCADE,
    event_type       text        NOT NULL,
    -- Deliveries of one run to one subscription go in order; NULL (a test) is unordered.
    run_id           uuid,
    -- At most one delivery per subscription for what it names (a run's overdue wait).
    dedup_key        text,
    -- The exact body sent, so every attempt signs the same bytes.
    body             text        NOT NULL,
    status           webhook_delivery_status NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    -- When the next attempt may start (pushed forward while one is in flight, so a worker
    -- that dies mid-attempt leaves it due again: at least once).
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- No attempt starts after this: the delivery is marked failed.
    give_up_at       timestamptz NOT NULL,
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at     timestamptz,
    CHECK ((status = 'delivered') = (delivered_at IS NOT NULL))
);

CREATE UNIQUE INDEX webhook_deliveries_dedup ON webhook_deliveries (subscription, dedup_key)
    WHERE dedup_key IS NOT NULL;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_run_order ON webhook_deliveries (subscription, run_id, id) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (subscription, id DESC);
CREATE INDEX webhook_deliveries_run ON webhook_deliveries (run_id);

-- How long a delivery is retried: set per database by the server at start
-- (`--webhook-retry-window`), read by the triggers.
CREATE TABLE webhook_settings (
    only_row      boolean  PRIMARY KEY DEFAULT true CHECK (only_row),
    retry_window  interval NOT NULL DEFAULT interval '24 hours'
);
INSERT INTO webhook_settings DEFAULT VALUES;

-- What a delivery says of a run: the run as `GET /v1/runs/{id}` shows it, without its steps.
CREATE FUNCTION webhook_run_json(r runs) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', r.id, 'workflow', r.workflow, 'workflow_version', r.workflow_version,
        'status', r.status, 'input', r.input, 'output', r.output, 'error', r.error,
        'subject', r.subject, 'idempotency_key', r.idempotency_key, 'trigger', r.trigger,
        'retry_of', r.retry_of, 'retried_by', r.retried_by,
        'created_at', r.created_at, 'updated_at', r.updated_at, 'finished_at', r.finished_at)
$$;

-- Writes one delivery of `type` to each enabled subscription that wants it (and the run's
-- workflow), with the body built here: `{"type", "id", "timestamp", "data"}`.
CREATE FUNCTION webhook_enqueue(type text, workflow text, run_id uuid, data jsonb, dedup text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    window_length interval := (SELECT retry_window FROM webhook_settings);
BEGIN
    INSERT INTO webhook_deliveries (webhook_id, subscription, event_type, run_id, dedup_key, body, give_up_at)
    SELECT m.id, s.name, type, run_id, dedup,
           jsonb_build_object('type', type, 'id', m.id, 'timestamp',
                              to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                              'data', data)::text,
           clock_timestamp() + window_length
    FROM webhook_subscriptions s
    CROSS JOIN LATERAL (SELECT 'msg_' || replace(gen_random_uuid()::text, '-', '') AS id) m
    WHERE s.enabled AND type = ANY (s.events)
      AND (s.workflows IS NULL OR workflow = ANY (s.workflows))
    ON CONFLICT (subscription, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING;
END;
$$;

-- A run reached a terminal status: `run.<status>`.
CREATE FUNCTION webhook_run_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM webhook_enqueue('run.' || NEW.status::text, NEW.workflow, NEW.id,
                            jsonb_build_object('run', webhook_run_json(NEW)), NULL);
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_webhook_on_finish AFTER UPDATE OF status ON runs
    FOR EACH ROW WHEN (run_status_is_terminal(NEW.status) AND NOT run_status_is_terminal(OLD.status))
    EXECUTE FUNCTION webhook_run_finished();

-- An outbox event was released (its run completed): `event.<name>`.
CREATE FUNCTION webhook_event_released() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM webhook_enqueue('event.' || NEW.name, (SELECT workflow FROM runs WHERE id = NEW.run_id), NEW.run_id,
                            jsonb_build_object('event', jsonb_build_object(
                                'id', NEW.id, 'name', NEW.name, 'data', NEW.data, 'run_id', NEW.run_id,
                                'created_at', NEW.created_at, 'released_at', NEW.released_at)),
                            NULL);
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_webhook_on_release AFTER UPDATE OF status ON outbox_events
    FOR EACH ROW WHEN (NEW.status = 'released' AND OLD.status IS DISTINCT FROM 'released')
    EXECUTE FUNCTION webhook_event_released();

-- Deliveries go with their run when the retention sweep deletes it.
CREATE FUNCTION webhook_runs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM webhook_deliveries d USING gone WHERE d.run_id = gone.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_webhook_on_delete AFTER DELETE ON runs
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION webhook_runs_deleted();

-- The durable saga engine: workers, runs, their steps and the append-only execution log.
-- Everything the engine persists lives here; the domain of a workflow has its own migrations.

CREATE TYPE run_status AS ENUM (
    'pending', 'running', 'compensating', 'completed', 'compensated', 'failed', 'cancelled'
);

CREATE TYPE step_status AS ENUM (
    'pending', 'running', 'succeeded', 'failed', 'skipped',
    'compensating', 'compensated', 'compensation_failed'
);

CREATE TYPE run_trigger AS ENUM ('api', 'schedule', 'retry');

CREATE TYPE event_kind AS ENUM (
    'run_created',
    'run_claimed',
    'lease_taken_over',
    'lease_released',
    'step_started',
    'step_succeeded',
    'step_failed',
    'step_skipped',
    'retry_scheduled',
    'compensation_started',
    'step_compensation_started',
    'step_compensation_succeeded',
    'step_compensation_failed',
    'run_completed',
    'run_compensated',
    'run_failed',
    'run_cancelled',
    'cancel_requested',
    'operator_retry'
);

-- One row per engine incarnation (a process start). A worker holds the session advisory lock
-- (classid 0x5a6a, objid = id) for as long as it lives, so any other instance can tell it is
-- gone the moment its database session ends.
CREATE TABLE workers (
    id            integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node_id       text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz
);

CREATE INDEX workers_node ON workers (node_id) WHERE stopped_at IS NULL;

CREATE TABLE runs (
    id                uuid PRIMARY KEY,
    workflow          text        NOT NULL,
    workflow_version  integer     NOT NULL,
    status            run_status  NOT NULL,
    input             jsonb       NOT NULL,
    output            jsonb,
    error             jsonb,
    -- What operators search for and see in lists (e.g. a customer's email), given by the workflow.
    subject           text,
    idempotency_key   text CHECK (char_length(idempotency_key) <= 255),
    trigger           run_trigger NOT NULL,
    retry_of          uuid REFERENCES runs (id) ON DELETE SET NULL,
    retried_by        uuid REFERENCES runs (id) ON DELETE SET NULL,
    cancel_requested  boolean     NOT NULL DEFAULT false,
    -- When a worker may (re)claim the run; NULL while leased or once terminal.
    ready_at          timestamptz,
    -- The lease: which worker drives the run, under which epoch, until when.
    -- Every write of the owner is fenced by lease_epoch.
    -- No foreign key to workers: checking it locks the worker's row in every claim, and many
    -- transactions locking one row make PostgreSQL create multixacts. Worker rows are never
    -- deleted.
    lease_owner       integer,
    lease_epoch       bigint      NOT NULL DEFAULT 0,
    lease_expires_at  timestamptz,
    -- Sequence number of the last execution-log entry; keeps the log gap-free.
    log_seq           integer     NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (workflow, idempotency_key),
    -- A run that is not finished is always either claimable or leased, so recovery can find it;
    -- a finished run is neither.
    CONSTRAINT runs_reachable CHECK (
        CASE WHEN status IN ('completed', 'compensated', 'failed', 'cancelled')
             THEN ready_at IS NULL AND lease_owner IS NULL AND finished_at IS NOT NULL
             ELSE ready_at IS NOT NULL OR lease_owner IS NOT NULL
        END
    )
)
-- Room on each page for HOT updates: a step's commit changes no indexed column of its run
-- (status, lease and due time change only when the run starts, waits or ends), so with free
-- space on the page PostgreSQL rewrites the row without touching any of the indexes.
WITH (fillfactor = 70);

-- The claim query: runs that are due, oldest first.
CREATE INDEX runs_claim ON runs (ready_at) WHERE ready_at IS NOT NULL;
-- Heartbeats and recovery: runs leased by a worker. (Not on lease_expires_at: renewing a
-- lease must not cost an index update.)
CREATE INDEX runs_leased ON runs (lease_owner) WHERE lease_owner IS NOT NULL;
-- Listing newest first, overall and by workflow and status (keyset on created_at, id).
CREATE INDEX runs_newest ON runs (created_at DESC, id DESC);
CREATE INDEX runs_by_workflow_status ON runs (workflow, status, created_at DESC, id DESC);
CREATE INDEX runs_by_status ON runs (status, created_at DESC, id DESC);
-- Search by subject (case-insensitive) and finding terminal runs for retention.
CREATE INDEX runs_subject ON runs (lower(subject), created_at DESC) WHERE subject IS NOT NULL;
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE run_steps (
    -- No foreign key (the engine writes steps only together with their run, and the retention
    -- sweep deletes them with it): its check would run a query for every changed step.
    run_id                  uuid        NOT NULL,
    idx                     smallint    NOT NULL,
    name                    text        NOT NULL,
    status                  step_status NOT NULL DEFAULT 'pending',
    attempts                integer     NOT NULL DEFAULT 0,
    compensation_attempts   integer     NOT NULL DEFAULT 0,
    -- Attempts lost with their worker (crash, lost lease): counted apart from the retry budget,
    -- and bounded on their own, so a step that keeps killing its worker still gives up.
    lost_attempts               integer NOT NULL DEFAULT 0,
    lost_compensation_attempts  integer NOT NULL DEFAULT 0,
    started_at              timestamptz,
    finished_at             timestamptz,
    output                  jsonb,
    error                   jsonb,
    -- Work a failed attempt recorded before it failed, handed to its compensation.
    partial                 jsonb,
    PRIMARY KEY (run_id, idx),
    UNIQUE (run_id, name)
)
WITH (fillfactor = 80);

CREATE TABLE run_events (
    -- No foreign key, as for run_steps: entries are only appended in the statement that
    -- updates their run, and the check would run a query per entry on the hot path.
    run_id   uuid        NOT NULL,
    seq      integer     NOT NULL CHECK (seq > 0),
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind     event_kind  NOT NULL,
    step     text,
    attempt  integer,
    detail   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (run_id, seq)
);

-- The execution log is append-only: entries are never rewritten. (The retention sweep deletes
-- a whole run's log together with the run.)
CREATE FUNCTION run_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the execution log is append-only (run %, seq %)', OLD.run_id, OLD.seq;
END;
$$;

CREATE TRIGGER run_events_no_update BEFORE UPDATE ON run_events
    FOR EACH ROW EXECUTE FUNCTION run_events_append_only();

-- Workers LISTEN on this channel and claim when a run becomes due (created unleased, handed
-- back, or made claimable by recovery). Identical notifications within one transaction are
-- folded into one by PostgreSQL, and a notification is delivered only after commit.
CREATE FUNCTION runs_notify_ready() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sagaflow_ready', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_ready_on_insert AFTER INSERT ON runs
    FOR EACH ROW WHEN (NEW.ready_at IS NOT NULL) EXECUTE FUNCTION runs_notify_ready();

CREATE TRIGGER runs_ready_on_update AFTER UPDATE OF ready_at ON runs
    FOR EACH ROW WHEN (NEW.ready_at IS NOT NULL AND OLD.ready_at IS DISTINCT FROM NEW.ready_at)
    EXECUTE FUNCTION runs_notify_ready();

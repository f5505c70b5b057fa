//! All SQL of the engine: runs, steps, the execution log, leases and workers.
//!
//! Each write that a run's owner makes is one statement fenced by the lease epoch
//! ([`persist`], reached only through `engine::apply`); the step's own writes, when it made
//! any, precede it in the same transaction. The rest of the engine opens the connections and
//! transactions these statements run in; the only statement of the engine outside this module
//! is the change feed's `pg_notify` (`changes.rs`), and the scheduler keeps its own SQL in
//! `scheduler/store.rs`.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgConnection, PgExecutor, PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::machine::{Actor, NewEvent, TimeMark};
use super::state::{RunError, RunState, StepError, StepState, Waiting};
use super::status::{EventKind, RunStatus, StepStatus, Trigger, WaitKind};

/// The advisory-lock namespace (`classid`) of worker liveness locks.
pub(crate) const WORKER_LOCK_CLASS: i32 = 0x5a6a;
/// The channel on which the database announces that runs became due.
pub(crate) const READY_CHANNEL: &str = "sagaflow_ready";

/// A run as stored.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct RunRow {
    /// The run's id.
    pub id: Uuid,
    /// The workflow's name.
    pub workflow: String,
    /// The workflow version the run started with.
    pub workflow_version: i32,
    /// Its status.
    pub status: RunStatus,
    /// The input it was triggered with.
    pub input: Value,
    /// The workflow's output, once completed.
    pub output: Option<Value>,
    /// Why it did not complete ([`RunError`] as JSON).
    pub error: Option<Value>,
    /// What operators search for and see (e.g. the customer's email).
    pub subject: Option<String>,
    /// The trigger's idempotency key.
    pub idempotency_key: Option<String>,
    /// What started it.
    pub trigger: Trigger,
    /// The run this one retries.
    pub retry_of: Option<Uuid>,
    /// The run that retried this one.
    pub retried_by: Option<Uuid>,
    /// An operator asked to cancel it.
    pub cancel_requested: bool,
    /// When a worker may next claim it (NULL while leased or once finished).
    pub ready_at: Option<DateTime<Utc>>,
    /// The worker holding its lease.
    pub lease_owner: Option<i32>,
    /// The lease epoch fencing the owner's writes.
    pub lease_epoch: i64,
    /// When the lease runs out unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it reached a terminal status.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it was set aside, neither leased nor due (its steps do not match its plan).
    pub parked_reason: Option<String>,
    /// What its waiting step waits for, while one waits.
    pub wait_kind: Option<WaitKind>,
    /// The signal's name; the step's name for a completion or a sleep.
    pub wait_name: Option<String>,
    /// The waiting step's index.
    pub wait_step: Option<i16>,
    /// The waiting attempt.
    pub wait_attempt: Option<i32>,
    /// When the wait ends with nothing received.
    pub wait_deadline: Option<DateTime<Utc>>,
    /// An operator asked to pause it; it pauses after the attempt in flight.
    pub pause_requested: bool,
    /// While `paused`: the status a resume returns it to.
    pub paused_from: Option<RunStatus>,
    /// Pending on a paused workflow: accepted, neither leased nor due until it is resumed.
    pub held: bool,
}

impl RunRow {
    /// The wait the row records, if complete.
    pub fn waiting(&self) -> Option<Waiting> {
        Some(Waiting {
            step: usize::try_from(self.wait_step?).ok()?,
            kind: self.wait_kind?,
            name: self.wait_name.clone()?,
            attempt: u32::try_from(self.wait_attempt?).ok()?,
            deadline: self.wait_deadline?,
        })
    }
}

const RUN_COLUMNS: &str = "id, workflow, workflow_version, status, input, output, error, subject, idempotency_key, \
     trigger, retry_of, retried_by, cancel_requested, ready_at, lease_owner, lease_epoch, lease_expires_at, \
     created_at, updated_at, finished_at, parked_reason, wait_kind, wait_name, wait_step, wait_attempt, wait_deadline, \
     pause_requested, paused_from, held";

/// A step of a run as stored.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct StepRow {
    /// The run.
    pub run_id: Uuid,
    /// Its position in the plan.
    pub idx: i16,
    /// Its name.
    pub name: String,
    /// Its status.
    pub status: StepStatus,
    /// Invoke attempts started.
    pub attempts: i32,
    /// Compensation attempts started.
    pub compensation_attempts: i32,
    /// Invoke attempts lost with their worker (not charged to the retry budget).
    pub lost_attempts: i32,
    /// Compensation attempts lost with their worker.
    pub lost_compensation_attempts: i32,
    /// When its last attempt began.
    pub started_at: Option<DateTime<Utc>>,
    /// When its last attempt ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its recorded output.
    pub output: Option<Value>,
    /// Its last error ([`StepError`] as JSON).
    pub error: Option<Value>,
    /// Partial work a failed attempt recorded.
    pub partial: Option<Value>,
}

impl StepRow {
    /// The machine's view of this row.
    pub fn state(&self) -> StepState {
        StepState {
            status: self.status,
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            compensation_attempts: u32::try_from(self.compensation_attempts).unwrap_or(0),
            lost_attempts: u32::try_from(self.lost_attempts).unwrap_or(0),
            lost_compensation_attempts: u32::try_from(self.lost_compensation_attempts).unwrap_or(0),
            output: self.output.clone(),
            error: self.step_error(),
            partial: self.partial.clone(),
        }
    }

    /// Its last error, decoded; never dropped when unreadable (see `decode_stored`).
    pub fn step_error(&self) -> Option<StepError> {
        self.error
            .as_ref()
            .map(|stored| decode_stored(stored, StepError::permanent))
    }
}

impl RunRow {
    /// Why the run did not complete, decoded; never dropped when unreadable (see `decode_stored`).
    pub fn run_error(&self) -> Option<RunError> {
        self.error.as_ref().map(|stored| {
            decode_stored(stored, |message| RunError {
                step: None,
                message,
                retryable: false,
            })
        })
    }
}

/// The one decoder of the errors stored as JSON. A stored error that no longer decodes (its
/// shape changed, or a hand edit) is never dropped as "no error": that would write NULL back
/// at the next transition and hide why the run stopped. It becomes an error saying so, with
/// the stored text, and a warning in the log.
fn decode_stored<T: serde::de::DeserializeOwned>(stored: &Value, unreadable: impl FnOnce(String) -> T) -> T {
    match serde_json::from_value::<T>(stored.clone()) {
        Ok(error) => error,
        Err(e) => {
            tracing::warn!(error = %e, %stored, "a stored error could not be decoded");
            unreadable(format!("a stored error could not be decoded ({e}): {stored}"))
        }
    }
}

/// An execution-log entry as stored.
#[derive(Debug, Clone, FromRow)]
pub struct EventRow {
    /// Its position in the run's log, from 1, without gaps.
    pub seq: i32,
    /// When it was written.
    pub at: DateTime<Utc>,
    /// What happened.
    pub kind: EventKind,
    /// The step concerned.
    pub step: Option<String>,
    /// The attempt concerned.
    pub attempt: Option<i32>,
    /// Details.
    pub detail: Value,
}

/// Rebuilds the machine's state of a run from its rows.
pub fn run_state(run: &RunRow, steps: &[StepRow]) -> RunState {
    RunState {
        status: run.status,
        steps: steps.iter().map(StepRow::state).collect(),
        error: run.run_error(),
        output: run.output.clone(),
        cancel_requested: run.cancel_requested,
        pause_requested: run.pause_requested,
        paused_from: run.paused_from,
        waiting: run.waiting(),
    }
}

// ---------------------------------------------------------------------------------------
// Workers and liveness
// ---------------------------------------------------------------------------------------

/// Registers a new incarnation of `node_id`; earlier incarnations of the same node are
/// marked stopped (the node restarted, so they are gone). Returns the worker id.
pub async fn register_worker(pool: &PgPool, node_id: &str) -> Result<i32, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE workers SET stopped_at = now() WHERE node_id = $1 AND stopped_at IS NULL")
        .bind(node_id)
        .execute(&mut *tx)
        .await?;
    let id: i32 = sqlx::query_scalar("INSERT INTO workers (node_id) VALUES ($1) RETURNING id")
        .bind(node_id)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

/// Takes the worker's liveness lock on a session that lives as long as the worker.
pub async fn lock_worker(conn: &mut PgConnection, worker: i32) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(WORKER_LOCK_CLASS)
        .bind(worker)
        .fetch_one(conn)
        .await
}

/// Marks the worker alive and renews the leases of the given runs (those its executors are
/// driving, under these epochs), except the ones it is writing right now: a run locked by its
/// own step transaction cannot be claimed by anyone anyway.
pub async fn heartbeat(
    pool: &PgPool,
    worker: i32,
    runs: &[Uuid],
    epochs: &[i64],
    lease_ms: i64,
) -> Result<u64, sqlx::Error> {
    sqlx::query("UPDATE workers SET last_seen_at = now() WHERE id = $1")
        .bind(worker)
        .execute(pool)
        .await?;
    if runs.is_empty() {
        return Ok(0);
    }
    let renewed = sqlx::query(
        "UPDATE runs SET lease_expires_at = now() + $4 * interval '1 millisecond'
         WHERE id IN (SELECT r.id FROM runs r JOIN unnest($2::uuid[], $3::int8[]) AS a(id, epoch)
                             ON r.id = a.id AND r.lease_epoch = a.epoch
                      WHERE r.lease_owner = $1 AND r.ready_at IS NULL
                      FOR UPDATE OF r SKIP LOCKED)",
    )
    .bind(worker)
    .bind(runs)
    .bind(epochs)
    .bind(lease_ms)
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected())
}

/// A run made claimable again because its owner was gone or its lease ran out.
#[derive(Debug, Clone, FromRow)]
pub struct Expired {
    /// The run.
    pub id: Uuid,
    /// Its previous owner.
    pub lease_owner: Option<i32>,
}

/// Makes claimable the runs whose owner is gone (its liveness lock is free, or it stopped)
/// or whose lease expired. `me` is never judged gone: this worker knows it is alive.
pub async fn expire_lost_leases(pool: &PgPool, me: i32, now: DateTime<Utc>) -> Result<Vec<Expired>, sqlx::Error> {
    sqlx::query_as(
        "WITH owners AS (
             SELECT DISTINCT lease_owner AS id FROM runs
             WHERE lease_owner IS NOT NULL AND ready_at IS NULL AND lease_owner <> $1
         ), gone AS (
             SELECT o.id FROM owners o JOIN workers w ON w.id = o.id
             WHERE w.stopped_at IS NOT NULL OR NOT EXISTS (
                 SELECT 1 FROM pg_locks l
                 WHERE l.locktype = 'advisory' AND l.granted
                   AND l.classid = $2::int4::oid AND l.objid = o.id::oid AND l.objsubid = 2
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
         ), due AS (
             SELECT id FROM runs
             WHERE lease_owner IS NOT NULL AND ready_at IS NULL
               AND (lease_expires_at <= now() OR lease_owner IN (SELECT id FROM gone))
             FOR UPDATE SKIP LOCKED
         )
         UPDATE runs r SET ready_at = $3 FROM due WHERE r.id = due.id
         RETURNING r.id, r.lease_owner",
    )
    .bind(me)
    .bind(WORKER_LOCK_CLASS)
    .bind(now)
    .fetch_all(pool)
    .await
}

/// Gives back every lease `worker` still holds (its attempts were abandoned at shutdown),
/// bumping the epoch so nothing it still had in flight can commit, and logs why.
pub async fn release_all(pool: &PgPool, worker: i32, reason: &str, now: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "WITH released AS (
             UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, lease_epoch = lease_epoch + 1,
                 ready_at = $3, log_seq = log_seq + 1, updated_at = now()
             WHERE lease_owner = $1 AND ready_at IS NULL
               AND run_status_is_unfinished(status)
             RETURNING id, log_seq
         )
         INSERT INTO run_events (run_id, seq, kind, detail)
         SELECT id, log_seq, 'lease_released', jsonb_build_object('reason', $2::text) FROM released",
    )
    .bind(worker)
    .bind(reason)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Records that the worker stopped cleanly.
pub async fn stop_worker(pool: &PgPool, worker: i32) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE workers SET stopped_at = now() WHERE id = $1")
        .bind(worker)
        .execute(pool)
        .await?;
    Ok(())
}

/// The node id of a worker, for log entries naming a previous owner.
pub async fn worker_name(conn: &mut PgConnection, worker: i32) -> Result<String, sqlx::Error> {
    let node: Option<String> = sqlx::query_scalar("SELECT node_id FROM workers WHERE id = $1")
        .bind(worker)
        .fetch_optional(conn)
        .await?;
    Ok(describe_worker(node.as_deref().unwrap_or("?"), worker))
}

/// How log entries name a worker: node id and incarnation.
pub fn describe_worker(node_id: &str, worker: i32) -> String {
    format!("{node_id}#{worker}")
}

// ---------------------------------------------------------------------------------------
// Creating and claiming runs
// ---------------------------------------------------------------------------------------

/// A run to insert, with its steps and first log entries.
pub struct NewRun<'a> {
    /// The run's id.
    pub id: Uuid,
    /// The workflow.
    pub workflow: &'a str,
    /// Its version.
    pub workflow_version: i32,
    /// The input.
    pub input: &'a Value,
    /// What operators search for.
    pub subject: Option<&'a str>,
    /// The trigger's idempotency key.
    pub idempotency_key: Option<&'a str>,
    /// What started it.
    pub trigger: Trigger,
    /// The run it retries.
    pub retry_of: Option<Uuid>,
    /// The state to store (a run claimed at once is already `running`).
    pub state: &'a RunState,
    /// Step names, in plan order.
    pub step_names: Vec<&'a str>,
    /// Step timestamps to set.
    pub marks: &'a std::collections::BTreeMap<usize, TimeMark>,
    /// The log entries, `run_created` first.
    pub events: &'a [NewEvent],
    /// `Some(worker)`: the run is leased to this worker at once (epoch 1); `None`: it is due
    /// at `now`.
    pub owner: Option<i32>,
    /// The engine clock's time: when an unleased run is due.
    pub now: DateTime<Utc>,
    /// The lease duration.
    pub lease_ms: i64,
}

/// Inserts a run unless its idempotency key is taken; a run of a paused workflow is held, and
/// one that was to start in its insert is not inserted (see [`Inserted`]).
pub async fn insert_run(conn: &mut PgConnection, run: &NewRun<'_>) -> Result<Inserted, sqlx::Error> {
    let steps = StepArrays::from_state(run.state, &times_now(run.marks), (0..run.state.steps.len()).collect());
    let events = EventArrays::new(run.events, &[]);
    let wait = WaitColumns::of(run.state.waiting.as_ref());
    let inserted: (Option<DateTime<Utc>>, bool) = sqlx::query_as(
        "WITH t AS (
             SELECT clock_timestamp() AS now,
                    EXISTS (SELECT 1 FROM paused_workflows WHERE workflow = $2) AS paused
         ), run AS (
             INSERT INTO runs (id, workflow, workflow_version, status, input, subject, idempotency_key, trigger,
                               retry_of, ready_at, lease_owner, lease_epoch, lease_expires_at, log_seq,
                               created_at, updated_at, wait_kind, wait_name, wait_step, wait_attempt, wait_deadline,
                               held)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9,
                    CASE WHEN $10::int4 IS NULL AND NOT t.paused THEN $21::timestamptz END, $10,
                    CASE WHEN $10::int4 IS NULL THEN 0 ELSE 1 END,
                    CASE WHEN $10::int4 IS NOT NULL THEN t.now + $11 * interval '1 millisecond' END,
                    cardinality($17::event_kind[]), t.now, t.now, $22, $23, $24, $25, $26,
                    t.paused
             FROM t
             -- A run started in its insert (leased to our worker) is not inserted on a paused
             -- workflow: the caller inserts it again unstarted, and it is held.
             WHERE $10::int4 IS NULL OR NOT t.paused
             ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id, created_at
         ), steps AS (
             INSERT INTO run_steps (run_id, idx, name, status, attempts, started_at, output)
             SELECT run.id, c.idx, c.name, c.status, c.attempts,
                    CASE WHEN c.started_ago IS NOT NULL THEN run.created_at END, c.output
             FROM run, unnest($12::smallint[], $13::text[], $14::step_status[], $15::int4[], $16::int8[],
                              $27::jsonb[])
                       AS c(idx, name, status, attempts, started_ago, output)
         ), events AS (
             INSERT INTO run_events (run_id, seq, at, kind, step, attempt, detail)
             SELECT run.id, c.ord, run.created_at, c.kind, c.step, c.attempt, c.detail
             FROM run, unnest($17::event_kind[], $18::text[], $19::int4[], $20::jsonb[])
                       WITH ORDINALITY AS c(kind, step, attempt, detail, ord)
         )
         SELECT (SELECT created_at FROM run), (SELECT paused FROM t)",
    )
    .bind(run.id)
    .bind(run.workflow)
    .bind(run.workflow_version)
    .bind(run.state.status)
    .bind(run.input)
    .bind(run.subject)
    .bind(run.idempotency_key)
    .bind(run.trigger)
    .bind(run.retry_of)
    .bind(run.owner)
    .bind(run.lease_ms)
    .bind(&steps.idx)
    .bind(&run.step_names)
    .bind(&steps.status)
    .bind(&steps.attempts)
    .bind(&steps.started_ago)
    .bind(&events.kind)
    .bind(&events.step)
    .bind(&events.attempt)
    .bind(&events.detail)
    .bind(run.now)
    .bind(wait.kind)
    .bind(wait.name)
    .bind(wait.step)
    .bind(wait.attempt)
    .bind(wait.deadline)
    .bind(&steps.output)
    .fetch_one(conn)
    .await?;
    Ok(match inserted {
        (Some(created_at), paused) => Inserted::Run {
            created_at,
            held: paused,
        },
        (None, true) if run.owner.is_some() => Inserted::WorkflowPaused,
        (None, _) => Inserted::KeyTaken,
    })
}

/// Inserts a run together with the outcome of its first fused segment, in one statement: the
/// run, its steps and its whole log as they stand once the segment is written, as
/// [`insert_run`] followed by [`persist`] would have left them, but with one row per run and
/// step instead of a row and its update. `created_ago_us` is how long before the statement
/// the run was prepared: its `created_at` and its first entries carry that time, the
/// segment's entries theirs (`first.events_ago_us`); `first.times` are every step's times,
/// the claim's marks included (see [`first_times`]), and every step is written.
///
/// Refused as [`insert_run`] refuses a run that was to start in its insert: its key taken or
/// its workflow paused; nothing is written then. Only a segment that keeps the lease, hands
/// the run back or finishes it can be written so ([`LeaseWrite::Keep`],
/// [`LeaseWrite::Release`], [`LeaseWrite::Finish`]): the caller checks it.
pub async fn insert_run_with_segment(
    conn: &mut PgConnection,
    run: &NewRun<'_>,
    first: &Persist<'_>,
    created_ago_us: i64,
) -> Result<InsertedWithSegment, sqlx::Error> {
    let steps = StepArrays::from_state(first.state, first.times, (0..first.state.steps.len()).collect());
    let all_events: Vec<NewEvent> = run.events.iter().chain(first.events).cloned().collect();
    let ago: Vec<i64> = std::iter::repeat_n(created_ago_us, run.events.len())
        .chain((0..first.events.len()).map(|i| first.events_ago_us.get(i).copied().unwrap_or(0)))
        .collect();
    let events = EventArrays::new(&all_events, &ago);
    let error = error_json(first.state)?;
    let (owner, ready_at) = match first.lease {
        LeaseWrite::Keep => (run.owner, None),
        LeaseWrite::Release(due) => (None, Some(due)),
        _ => (None, None),
    };
    let wait = WaitColumns::of(first.state.waiting.as_ref());
    let inserted: (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "WITH t AS (
             SELECT clock_timestamp() AS now,
                    EXISTS (SELECT 1 FROM paused_workflows WHERE workflow = $2) AS paused
         ), run AS (
             INSERT INTO runs (id, workflow, workflow_version, status, input, output, error, subject, idempotency_key,
                               trigger, retry_of, ready_at, lease_owner, lease_epoch, lease_expires_at, log_seq,
                               created_at, updated_at, finished_at, wait_kind, wait_name, wait_step, wait_attempt,
                               wait_deadline)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $39, $12, 1,
                    CASE WHEN $12::int4 IS NOT NULL THEN t.now + $13 * interval '1 millisecond' END,
                    cardinality($24::event_kind[]), t.now - $14 * interval '1 microsecond', t.now,
                    -- Told, not computed: a function of a parameter is evaluated while planning.
                    CASE WHEN $15 THEN t.now END,
                    $16, $17, $18, $19, $20
             FROM t
             WHERE NOT t.paused
             ON CONFLICT (idempotency_key, workflow) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id, created_at, updated_at AS at
         ), steps AS (
             INSERT INTO run_steps (run_id, idx, name, status, attempts, compensation_attempts, lost_attempts,
                                    lost_compensation_attempts, output, error, partial, started_at, finished_at)
             SELECT run.id, c.idx, c.name, c.status, c.attempts, c.compensation_attempts, c.lost, c.lost_compensation,
                    c.output, c.error, c.partial,
                    run.at - c.started_ago * interval '1 microsecond',
                    CASE c.finished WHEN 'set' THEN run.at - c.finished_ago * interval '1 microsecond' END
             FROM run, unnest($21::smallint[], $22::text[], $23::step_status[], $29::int4[], $30::int4[], $31::int4[],
                              $32::int4[], $33::jsonb[], $34::jsonb[], $35::jsonb[], $36::int8[], $37::text[],
                              $38::int8[])
                       AS c(idx, name, status, attempts, compensation_attempts, lost, lost_compensation, output, error,
                            partial, started_ago, finished, finished_ago)
         ), events AS (
             INSERT INTO run_events (run_id, seq, at, kind, step, attempt, detail)
             SELECT run.id, c.ord, run.at - c.ago * interval '1 microsecond', c.kind, c.step, c.attempt, c.detail
             FROM run, unnest($24::event_kind[], $25::text[], $26::int4[], $27::jsonb[], $28::int8[])
                       WITH ORDINALITY AS c(kind, step, attempt, detail, ago, ord)
         )
         SELECT (SELECT created_at FROM run), (SELECT at FROM run)",
    )
    .bind(run.id)
    .bind(run.workflow)
    .bind(run.workflow_version)
    .bind(first.state.status)
    .bind(run.input)
    .bind(&first.state.output)
    .bind(error)
    .bind(run.subject)
    .bind(run.idempotency_key)
    .bind(run.trigger)
    .bind(run.retry_of)
    .bind(owner)
    .bind(run.lease_ms)
    .bind(created_ago_us)
    .bind(first.state.status.is_terminal())
    .bind(wait.kind)
    .bind(wait.name)
    .bind(wait.step)
    .bind(wait.attempt)
    .bind(wait.deadline)
    .bind(&steps.idx)
    .bind(&run.step_names)
    .bind(&steps.status)
    .bind(&events.kind)
    .bind(&events.step)
    .bind(&events.attempt)
    .bind(&events.detail)
    .bind(&events.ago)
    .bind(&steps.attempts)
    .bind(&steps.compensation_attempts)
    .bind(&steps.lost_attempts)
    .bind(&steps.lost_compensation_attempts)
    .bind(&steps.output)
    .bind(&steps.error)
    .bind(&steps.partial)
    .bind(&steps.started_ago)
    .bind(&steps.finished)
    .bind(&steps.finished_ago)
    .bind(ready_at)
    .fetch_one(conn)
    .await?;
    Ok(match inserted {
        (Some(created_at), Some(at)) => InsertedWithSegment::Run { created_at, at },
        _ => InsertedWithSegment::Refused,
    })
}

/// One run for [`insert_finished_runs`]: its insert as its trigger prepared it, its first
/// segment's write, and how long before the statement it was prepared.
pub struct FinishedRun<'a> {
    /// The insert its trigger prepared.
    pub run: &'a NewRun<'a>,
    /// The write of its first segment, which finished it ([`LeaseWrite::Finish`]).
    pub first: &'a Persist<'a>,
    /// How long before the statement the run was prepared, in microseconds.
    pub created_ago_us: i64,
}

/// [`insert_run_with_segment`] for several runs of one workflow version whose first segment
/// finished each of them, in one statement: the same rows as that function writes for each,
/// in order. Refused for all as it refuses one (the workflow paused), or for one whose key is
/// taken: one answer per run, in order; the caller must not commit a transaction in which
/// some were refused and their segments' work stands. `workflow` and `workflow_version` are
/// every run's.
pub async fn insert_finished_runs(
    conn: &mut PgConnection,
    workflow: &str,
    workflow_version: i32,
    runs: &[FinishedRun<'_>],
) -> Result<Vec<InsertedWithSegment>, sqlx::Error> {
    let mut step_run: Vec<i32> = Vec::new();
    let mut step_names: Vec<&str> = Vec::new();
    let mut steps = StepArrays::default();
    let mut event_run: Vec<i32> = Vec::new();
    let mut event_seq: Vec<i32> = Vec::new();
    let mut events = EventArrays::default();
    let mut errors: Vec<Option<Value>> = Vec::with_capacity(runs.len());
    let mut log_seq: Vec<i32> = Vec::with_capacity(runs.len());
    for (ord, r) in (1_i32..).zip(runs) {
        let of_run = StepArrays::from_state(r.first.state, r.first.times, (0..r.first.state.steps.len()).collect());
        step_run.extend(std::iter::repeat_n(ord, of_run.idx.len()));
        step_names.extend(
            of_run
                .idx
                .iter()
                .filter_map(|&i| r.run.step_names.get(usize::try_from(i).ok()?).copied()),
        );
        steps.append(of_run);
        let all: Vec<NewEvent> = r.run.events.iter().chain(r.first.events).cloned().collect();
        let ago: Vec<i64> = std::iter::repeat_n(r.created_ago_us, r.run.events.len())
            .chain((0..r.first.events.len()).map(|i| r.first.events_ago_us.get(i).copied().unwrap_or(0)))
            .collect();
        event_run.extend(std::iter::repeat_n(ord, all.len()));
        event_seq.extend(1..=i32::try_from(all.len()).unwrap_or(i32::MAX));
        log_seq.push(i32::try_from(all.len()).unwrap_or(i32::MAX));
        events.append(EventArrays::new(&all, &ago));
        errors.push(error_json(r.first.state)?);
    }
    // Per run, in order: when it was accepted and when it was written (both null: refused).
    type Written = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);
    let written: Vec<Written> = sqlx::query_as(
        "WITH t AS (
             SELECT clock_timestamp() AS now,
                    EXISTS (SELECT 1 FROM paused_workflows WHERE workflow = $1) AS paused
         ), r AS (
             SELECT * FROM unnest($3::uuid[], $4::run_status[], $5::jsonb[], $6::jsonb[], $7::jsonb[], $8::text[],
                                  $9::text[], $10::run_trigger[], $11::uuid[], $12::int8[], $13::int4[])
                  WITH ORDINALITY AS r(id, status, input, output, error, subject, idempotency_key, trigger, retry_of,
                                       created_ago, log_seq, ord)
         ), run AS (
             INSERT INTO runs (id, workflow, workflow_version, status, input, output, error, subject, idempotency_key,
                               trigger, retry_of, lease_epoch, log_seq, created_at, updated_at, finished_at)
             SELECT r.id, $1, $2, r.status, r.input, r.output, r.error, r.subject, r.idempotency_key, r.trigger,
                    r.retry_of, 1, r.log_seq, t.now - r.created_ago * interval '1 microsecond', t.now, t.now
             FROM r, t
             WHERE NOT t.paused
             ORDER BY r.ord
             ON CONFLICT (idempotency_key, workflow) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id, created_at, updated_at AS at
         ), steps AS (
             INSERT INTO run_steps (run_id, idx, name, status, attempts, compensation_attempts, lost_attempts,
                                    lost_compensation_attempts, output, error, partial, started_at, finished_at)
             SELECT run.id, c.idx, c.name, c.status, c.attempts, c.compensation_attempts, c.lost, c.lost_compensation,
                    c.output, c.error, c.partial,
                    run.at - c.started_ago * interval '1 microsecond',
                    CASE c.finished WHEN 'set' THEN run.at - c.finished_ago * interval '1 microsecond' END
             FROM unnest($14::int4[], $15::smallint[], $16::text[], $17::step_status[], $18::int4[], $19::int4[],
                         $20::int4[], $21::int4[], $22::jsonb[], $23::jsonb[], $24::jsonb[], $25::int8[], $26::text[],
                         $27::int8[])
                  AS c(run_ord, idx, name, status, attempts, compensation_attempts, lost, lost_compensation, output,
                       error, partial, started_ago, finished, finished_ago)
             JOIN r ON r.ord = c.run_ord
             JOIN run ON run.id = r.id
         ), events AS (
             INSERT INTO run_events (run_id, seq, at, kind, step, attempt, detail)
             SELECT run.id, c.seq, run.at - c.ago * interval '1 microsecond', c.kind, c.step, c.attempt, c.detail
             FROM unnest($28::int4[], $29::int4[], $30::event_kind[], $31::text[], $32::int4[], $33::jsonb[],
                         $34::int8[])
                  AS c(run_ord, seq, kind, step, attempt, detail, ago)
             JOIN r ON r.ord = c.run_ord
             JOIN run ON run.id = r.id
         )
         SELECT run.created_at, run.at FROM r LEFT JOIN run ON run.id = r.id ORDER BY r.ord",
    )
    .bind(workflow)
    .bind(workflow_version)
    .bind(runs.iter().map(|r| r.run.id).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.first.state.status).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.run.input).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.first.state.output.clone()).collect::<Vec<_>>())
    .bind(&errors)
    .bind(runs.iter().map(|r| r.run.subject).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.run.idempotency_key).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.run.trigger).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.run.retry_of).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.created_ago_us).collect::<Vec<_>>())
    .bind(&log_seq)
    .bind(&step_run)
    .bind(&steps.idx)
    .bind(&step_names)
    .bind(&steps.status)
    .bind(&steps.attempts)
    .bind(&steps.compensation_attempts)
    .bind(&steps.lost_attempts)
    .bind(&steps.lost_compensation_attempts)
    .bind(&steps.output)
    .bind(&steps.error)
    .bind(&steps.partial)
    .bind(&steps.started_ago)
    .bind(&steps.finished)
    .bind(&steps.finished_ago)
    .bind(&event_run)
    .bind(&event_seq)
    .bind(&events.kind)
    .bind(&events.step)
    .bind(&events.attempt)
    .bind(&events.detail)
    .bind(&events.ago)
    .fetch_all(conn)
    .await?;
    Ok(written
        .into_iter()
        .map(|w| match w {
            (Some(created_at), Some(at)) => InsertedWithSegment::Run { created_at, at },
            _ => InsertedWithSegment::Refused,
        })
        .collect())
}

/// The step times of a run inserted with its first segment: the claim's `marks`, made when
/// the run was prepared `created_ago_us` before the write, then the segment's `later` times.
pub fn first_times(
    marks: &std::collections::BTreeMap<usize, TimeMark>,
    created_ago_us: i64,
    later: &std::collections::BTreeMap<usize, StepTimes>,
) -> std::collections::BTreeMap<usize, StepTimes> {
    let mut times: std::collections::BTreeMap<usize, StepTimes> = std::collections::BTreeMap::new();
    for (&i, &mark) in marks {
        times.entry(i).or_default().mark(mark, created_ago_us);
    }
    for (&i, &times_later) in later {
        times.entry(i).or_default().then(times_later);
    }
    times
}

/// What [`insert_run_with_segment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertedWithSegment {
    /// The run was inserted, accepted at `created_at`; `at` is the time of the write (the
    /// segment's end), which its entries and marks are counted back from.
    Run {
        /// When it was accepted.
        created_at: DateTime<Utc>,
        /// When the segment was written.
        at: DateTime<Utc>,
    },
    /// Nothing was written: the run's key is taken or its workflow is paused (inserting the
    /// run on its own tells which, and does what follows).
    Refused,
}

/// What [`insert_run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The run was inserted; every time it records is `created_at`, the statement's one
    /// reading of the clock.
    Run {
        /// When it was accepted.
        created_at: DateTime<Utc>,
        /// Its workflow is paused: it is held `pending`, neither leased nor due.
        held: bool,
    },
    /// Its idempotency key is taken: nothing was inserted.
    KeyTaken,
    /// It was to start in its insert, but its workflow is paused: nothing was inserted, and
    /// the caller inserts it again unstarted.
    WorkflowPaused,
}

impl NewRun<'_> {
    /// The rows [`insert_run`] wrote, given what it answered (a run it inserted): what the
    /// run's first owner starts its copy from, so that it can answer without reading them back.
    pub fn rows(&self, inserted: Inserted) -> (RunRow, Vec<StepRow>) {
        let (created_at, held) = match inserted {
            Inserted::Run { created_at, held } => (created_at, held),
            Inserted::KeyTaken | Inserted::WorkflowPaused => (self.now, false),
        };
        let leased = self.owner.is_some();
        let run = RunRow {
            id: self.id,
            workflow: self.workflow.to_string(),
            workflow_version: self.workflow_version,
            status: self.state.status,
            input: self.input.clone(),
            output: None,
            error: None,
            subject: self.subject.map(str::to_string),
            idempotency_key: self.idempotency_key.map(str::to_string),
            trigger: self.trigger,
            retry_of: self.retry_of,
            retried_by: None,
            cancel_requested: false,
            ready_at: (!leased && !held).then_some(self.now),
            lease_owner: self.owner,
            lease_epoch: i64::from(leased),
            lease_expires_at: leased.then(|| created_at + chrono::Duration::milliseconds(self.lease_ms)),
            created_at,
            updated_at: created_at,
            finished_at: None,
            parked_reason: None,
            wait_kind: None,
            wait_name: None,
            wait_step: None,
            wait_attempt: None,
            wait_deadline: None,
            pause_requested: false,
            paused_from: None,
            held,
        };
        let mut run = run;
        WaitColumns::of(self.state.waiting.as_ref()).mirror(&mut run);
        let steps = self
            .state
            .steps
            .iter()
            .zip(&self.step_names)
            .enumerate()
            .map(|(i, (step, name))| StepRow {
                run_id: self.id,
                idx: i16::try_from(i).unwrap_or(i16::MAX),
                name: name.to_string(),
                status: step.status,
                attempts: i32::try_from(step.attempts).unwrap_or(i32::MAX),
                compensation_attempts: 0,
                lost_attempts: 0,
                lost_compensation_attempts: 0,
                started_at: matches!(self.marks.get(&i), Some(TimeMark::Started)).then_some(created_at),
                finished_at: None,
                output: step.output.clone(),
                error: None,
                partial: None,
            })
            .collect();
        (run, steps)
    }
}

/// Sets aside a run this worker claimed (lease `epoch`) whose steps do not match its plan: no
/// lease, not due, the reason recorded and logged. False if the lease moved on meanwhile.
pub async fn park_run(conn: &mut PgConnection, run_id: Uuid, epoch: i64, reason: &str) -> Result<bool, sqlx::Error> {
    let parked = sqlx::query(
        "WITH parked AS (
             UPDATE runs SET parked_reason = $3, lease_owner = NULL, lease_expires_at = NULL, ready_at = NULL,
                             log_seq = log_seq + 1, updated_at = now()
             WHERE id = $1 AND lease_epoch = $2
             RETURNING id, log_seq
         )
         INSERT INTO run_events (run_id, seq, kind, detail)
         SELECT id, log_seq, 'run_parked', jsonb_build_object('reason', $3::text) FROM parked",
    )
    .bind(run_id)
    .bind(epoch)
    .bind(reason)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(parked == 1)
}

/// Unfinished runs per workflow version, for operators' views.
pub async fn unfinished_by_version(pool: &PgPool) -> Result<Vec<(String, i32, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT workflow, workflow_version, count(*) FROM runs
         WHERE run_status_is_unfinished(status) GROUP BY workflow, workflow_version",
    )
    .fetch_all(pool)
    .await
}

/// Makes the parked runs of `workflow@version` due again (a deploy may have brought their
/// plan back); returns how many.
pub async fn unpark_runs<'e>(
    db: impl PgExecutor<'e>,
    workflow: &str,
    version: i32,
    now: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE runs SET parked_reason = NULL, ready_at = $3, updated_at = now()
         WHERE workflow = $1 AND workflow_version = $2 AND parked_reason IS NOT NULL",
    )
    .bind(workflow)
    .bind(version)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected())
}

/// Records the plan of `workflow@version` unless one is stored; returns the stored plan's
/// hash and steps when it differs from `plan_hash`.
///
/// A conflict leaves the stored plan as it is and returns it (an update that changes
/// nothing): that also returns a plan another instance committed while this statement waited
/// for it, which `DO NOTHING` and a read in the same statement would miss, its snapshot being
/// older than that commit.
pub async fn record_plan(
    pool: &PgPool,
    workflow: &str,
    version: i32,
    plan_hash: &str,
    steps: &[&str],
    defined: bool,
) -> Result<Option<(String, Vec<String>)>, sqlx::Error> {
    let stored: (String, Vec<String>) = sqlx::query_as(
        "INSERT INTO workflow_plans (workflow, version, plan_hash, steps, defined) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (workflow, version) DO UPDATE SET plan_hash = workflow_plans.plan_hash
         RETURNING plan_hash, steps",
    )
    .bind(workflow)
    .bind(version)
    .bind(plan_hash)
    .bind(steps)
    .bind(defined)
    .fetch_one(pool)
    .await?;
    Ok((stored.0 != plan_hash).then_some(stored))
}

/// A run this worker just claimed, with the state to decide on.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The run as it is now.
    pub run: RunRow,
    /// Its steps.
    pub steps: Vec<StepRow>,
    /// The owner whose lease was taken over (it never released it), if any.
    pub previous_owner: Option<i32>,
}

/// Claims up to `limit` due runs of the given `workflow@version` kinds for `worker`, in one
/// transaction the caller commits after persisting each run's first transition.
pub async fn claim(
    conn: &mut PgConnection,
    worker: i32,
    limit: i64,
    lease_ms: i64,
    kinds: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<Claimed>, sqlx::Error> {
    #[derive(FromRow)]
    struct Row {
        #[sqlx(flatten)]
        run: RunRow,
        previous_owner: Option<i32>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "WITH due AS (
             SELECT id, lease_owner AS previous_owner,
                    -- A cancel is the operator's next word: a cancelled run is not held.
                    status = 'pending' AND NOT cancel_requested
                        AND EXISTS (SELECT 1 FROM paused_workflows p WHERE p.workflow = runs.workflow)
                        AS on_paused_workflow
             FROM runs
             WHERE ready_at <= $5 AND (workflow || '@' || workflow_version) = ANY($3)
             ORDER BY ready_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), held AS (
             -- Not started and its workflow is paused: held until the workflow is resumed
             -- (the pause holds those it finds; this holds any that became due since).
             UPDATE runs r SET ready_at = NULL, held = true, updated_at = now()
             FROM due d WHERE r.id = d.id AND d.on_paused_workflow
         ), candidates AS (
             SELECT id, previous_owner FROM due WHERE NOT on_paused_workflow
         )
         UPDATE runs r SET lease_owner = $1, lease_epoch = r.lease_epoch + 1,
             lease_expires_at = now() + $4 * interval '1 millisecond', ready_at = NULL, updated_at = now()
         FROM candidates c WHERE r.id = c.id
         RETURNING r.id, r.workflow, r.workflow_version, r.status, r.input, r.output, r.error, r.subject,
             r.idempotency_key, r.trigger, r.retry_of, r.retried_by, r.cancel_requested, r.ready_at, r.lease_owner,
             r.lease_epoch, r.lease_expires_at, r.created_at, r.updated_at, r.finished_at, r.parked_reason,
             r.wait_kind, r.wait_name, r.wait_step, r.wait_attempt, r.wait_deadline, r.pause_requested,
             r.paused_from, r.held, c.previous_owner",
    )
    .bind(worker)
    .bind(limit)
    .bind(kinds)
    .bind(lease_ms)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.run.id).collect();
    let mut steps = steps_of_many(&mut *conn, &ids).await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mine = steps.remove(&row.run.id).unwrap_or_default();
            Claimed {
                run: row.run,
                steps: mine,
                previous_owner: row.previous_owner,
            }
        })
        .collect())
}

async fn steps_of_many(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, Vec<StepRow>>, sqlx::Error> {
    let rows: Vec<StepRow> = sqlx::query_as(
        "SELECT run_id, idx, name, status, attempts, compensation_attempts, lost_attempts, lost_compensation_attempts,
                started_at, finished_at, output, error, partial
         FROM run_steps WHERE run_id = ANY($1) ORDER BY run_id, idx",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    let mut map: std::collections::HashMap<Uuid, Vec<StepRow>> = std::collections::HashMap::new();
    for row in rows {
        map.entry(row.run_id).or_default().push(row);
    }
    Ok(map)
}

/// When the next run becomes due, if any is waiting.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(ready_at) FROM runs WHERE ready_at IS NOT NULL")
        .fetch_one(pool)
        .await
}

// ---------------------------------------------------------------------------------------
// Persisting transitions
// ---------------------------------------------------------------------------------------

/// What happens to the lease with a persisted transition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LeaseWrite {
    /// The owner goes on (its heartbeat renews the lease).
    Keep,
    /// The owner gives the run back; it is due at this time.
    Release(DateTime<Utc>),
    /// The run is finished: no lease, nothing due.
    Finish,
    /// The run is paused: no lease, nothing due, until an operator resumes it.
    Hold,
    /// Not the owner writing (an operator): leave the lease alone, and make an unleased run
    /// due by this time (the engine clock's now) so a worker acts on the change.
    Wake(DateTime<Utc>),
}

/// A transition to persist, fenced by the lease epoch and the operator's requests (cancel,
/// pause) the decision saw.
pub struct Persist<'a> {
    /// The run.
    pub run_id: Uuid,
    /// The epoch of the lease the writer holds (or read, for an operator).
    pub epoch: i64,
    /// The cancel flag the decision was made with: if an operator changed it since, nothing
    /// is written and the caller decides again.
    pub cancel_requested: bool,
    /// The pause flag the decision was made with, fenced the same way.
    pub pause_requested: bool,
    /// The new state.
    pub state: &'a RunState,
    /// Which steps changed (written in full from `state`).
    pub changed: Vec<usize>,
    /// Step timestamps to set.
    pub times: &'a std::collections::BTreeMap<usize, StepTimes>,
    /// Log entries to append.
    pub events: &'a [NewEvent],
    /// How long before the statement each entry of `events` happened, in microseconds (a
    /// fused segment writes entries decided earlier); missing entries happened in it.
    pub events_ago_us: &'a [i64],
    /// What happens to the lease.
    pub lease: LeaseWrite,
}

/// When a write sets a step's timestamps, in microseconds before the statement's own time
/// (0 for what happens in it). The database's clock stays the only clock of recorded times:
/// an offset is elapsed time measured by the writer since the run's last commit, so a time
/// derived from it never goes back past that commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepTimes {
    /// `started_at` is set (an attempt began) this long before the statement.
    pub started: Option<i64>,
    /// What becomes of `finished_at`.
    pub finished: FinishedAt,
}

/// What a write does to a step's `finished_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinishedAt {
    /// Left as it is.
    #[default]
    Keep,
    /// Cleared: a new attempt began.
    Clear,
    /// Set, this many microseconds before the statement.
    Set(i64),
}

impl StepTimes {
    /// The times a machine's mark sets when it is written at once.
    pub fn now(mark: TimeMark) -> Self {
        let mut times = Self::default();
        times.mark(mark, 0);
        times
    }

    /// Folds in the times of a later write (its marks win where it sets any).
    pub fn then(&mut self, later: StepTimes) {
        if later.started.is_some() {
            self.started = later.started;
        }
        if later.finished != FinishedAt::Keep {
            self.finished = later.finished;
        }
    }

    /// Folds in a mark made `ago_us` before the write (later marks win).
    pub fn mark(&mut self, mark: TimeMark, ago_us: i64) {
        match mark {
            TimeMark::Started => {
                self.started = Some(ago_us);
                self.finished = FinishedAt::Clear;
            }
            TimeMark::Finished => self.finished = FinishedAt::Set(ago_us),
        }
    }
}

/// The times of a set of marks all written at once.
pub fn times_now(marks: &std::collections::BTreeMap<usize, TimeMark>) -> std::collections::BTreeMap<usize, StepTimes> {
    marks.iter().map(|(&i, &m)| (i, StepTimes::now(m))).collect()
}

fn before(at: DateTime<Utc>, ago_us: i64) -> DateTime<Utc> {
    at - chrono::Duration::microseconds(ago_us)
}

/// Whether a transition was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persisted {
    /// Written; every time the statement recorded derives from `at`, its one reading of
    /// the database's clock (see [`Persist::mirror`]).
    Applied {
        /// The statement's time.
        at: DateTime<Utc>,
    },
    /// The lease was taken over: the writer must stop touching this run.
    Fenced,
    /// An operator asked to cancel or pause (or withdrew a pause) since the decision:
    /// decide again with the run's flags as they are now.
    Requested {
        /// The cancel flag now.
        cancel: bool,
        /// The pause flag now.
        pause: bool,
    },
}

impl Persist<'_> {
    /// Brings a copy of the run's rows to what this write made of them, given the time
    /// [`persist`] returned: an owner that keeps its copy up to date answers a waiting caller
    /// without reading the run back. It follows the statement's columns one for one.
    pub fn mirror(&self, run: &mut RunRow, steps: &mut [StepRow], at: DateTime<Utc>) {
        run.status = self.state.status;
        run.output = self.state.output.clone();
        run.error = self.state.error.as_ref().and_then(|e| serde_json::to_value(e).ok());
        run.cancel_requested = self.state.cancel_requested;
        run.pause_requested = self.state.pause_requested;
        run.paused_from = self.state.paused_from;
        run.held = run.held && self.state.status == RunStatus::Pending;
        match self.lease {
            LeaseWrite::Keep => run.ready_at = None,
            LeaseWrite::Release(due) => {
                run.ready_at = Some(due);
                run.lease_owner = None;
                run.lease_expires_at = None;
            }
            LeaseWrite::Finish | LeaseWrite::Hold => {
                run.ready_at = None;
                run.lease_owner = None;
                run.lease_expires_at = None;
            }
            LeaseWrite::Wake(now) => {
                if run.lease_owner.is_none() {
                    run.ready_at = run.ready_at.map(|due| due.min(now));
                }
            }
        }
        run.finished_at = self.state.status.is_terminal().then_some(at);
        run.updated_at = at;
        WaitColumns::of(self.state.waiting.as_ref()).mirror(run);
        for &i in &self.changed {
            let (Some(state), Some(row)) = (self.state.steps.get(i), steps.get_mut(i)) else {
                continue;
            };
            row.status = state.status;
            row.attempts = i32::try_from(state.attempts).unwrap_or(i32::MAX);
            row.compensation_attempts = i32::try_from(state.compensation_attempts).unwrap_or(i32::MAX);
            row.lost_attempts = i32::try_from(state.lost_attempts).unwrap_or(i32::MAX);
            row.lost_compensation_attempts = i32::try_from(state.lost_compensation_attempts).unwrap_or(i32::MAX);
            row.output = state.output.clone();
            row.error = state.error.as_ref().and_then(|e| serde_json::to_value(e).ok());
            row.partial = state.partial.clone();
            let times = self.times.get(&i).copied().unwrap_or_default();
            if let Some(ago) = times.started {
                row.started_at = Some(before(at, ago));
            }
            match times.finished {
                FinishedAt::Keep => {}
                FinishedAt::Clear => row.finished_at = None,
                FinishedAt::Set(ago) => row.finished_at = Some(before(at, ago)),
            }
        }
    }
}

/// Writes a transition in one statement: the run row (only if the epoch and the cancel and
/// pause flags are still what the decision saw), the changed steps and the new log entries.
pub async fn persist(conn: &mut PgConnection, p: &Persist<'_>) -> Result<Persisted, sqlx::Error> {
    let steps = StepArrays::from_state(p.state, p.times, p.changed.clone());
    let events = EventArrays::new(p.events, p.events_ago_us);
    let (mode, ready_at) = match p.lease {
        LeaseWrite::Keep => ("keep", None),
        LeaseWrite::Release(at) => ("release", Some(at)),
        LeaseWrite::Finish => ("finish", None),
        LeaseWrite::Hold => ("hold", None),
        LeaseWrite::Wake(now) => ("wake", Some(now)),
    };
    let error = error_json(p.state)?;
    let wait = WaitColumns::of(p.state.waiting.as_ref());
    let applied: Option<DateTime<Utc>> = sqlx::query_scalar(
        "WITH t AS (
             SELECT clock_timestamp() AS now
         ), run AS (
             UPDATE runs SET
                 status = $4,
                 output = $5,
                 error = $6,
                 cancel_requested = $7,
                 log_seq = log_seq + cardinality($18::event_kind[]),
                 ready_at = CASE $8::text WHEN 'release' THEN $9
                                          WHEN 'wake' THEN CASE WHEN lease_owner IS NULL THEN least(ready_at, $9)
                                                                ELSE ready_at END
                                          ELSE NULL END,
                 lease_owner = CASE WHEN $8::text IN ('keep', 'wake') THEN lease_owner END,
                 -- Kept as is while the owner goes on: heartbeats renew it (see runs' fillfactor).
                 lease_expires_at = CASE WHEN $8::text IN ('keep', 'wake') THEN lease_expires_at END,
                 -- Told, not computed: a function of a parameter is evaluated while planning.
                 finished_at = CASE WHEN $27 THEN t.now END,
                 updated_at = t.now,
                 wait_kind = $28, wait_name = $29, wait_step = $30, wait_attempt = $31, wait_deadline = $32,
                 pause_requested = $34, paused_from = $35,
                 held = held AND $4 = 'pending'::run_status
             FROM t
             WHERE id = $1 AND lease_epoch = $2 AND cancel_requested = $3 AND pause_requested = $33
             RETURNING id, log_seq - cardinality($18::event_kind[]) AS base, t.now AS at
         ), steps AS (
             UPDATE run_steps s SET
                 status = c.status, attempts = c.attempts, compensation_attempts = c.compensation_attempts,
                 lost_attempts = c.lost, lost_compensation_attempts = c.lost_compensation,
                 output = c.output, error = c.error, partial = c.partial,
                 started_at = CASE WHEN c.started_ago IS NOT NULL
                                   THEN run.at - c.started_ago * interval '1 microsecond'
                                   ELSE s.started_at END,
                 finished_at = CASE c.finished WHEN 'clear' THEN NULL
                                               WHEN 'set' THEN run.at - c.finished_ago * interval '1 microsecond'
                                               ELSE s.finished_at END
             FROM run, unnest($10::smallint[], $11::step_status[], $12::int4[], $13::int4[], $14::jsonb[],
                              $15::jsonb[], $16::jsonb[], $17::int8[], $22::int4[], $23::int4[], $24::text[],
                              $25::int8[])
                       AS c(idx, status, attempts, compensation_attempts, output, error, partial, started_ago,
                            lost, lost_compensation, finished, finished_ago)
             WHERE s.run_id = run.id AND s.idx = c.idx
         ), events AS (
             INSERT INTO run_events (run_id, seq, at, kind, step, attempt, detail)
             SELECT run.id, run.base + c.ord, run.at - c.ago * interval '1 microsecond', c.kind, c.step, c.attempt,
                    c.detail
             FROM run, unnest($18::event_kind[], $19::text[], $20::int4[], $21::jsonb[], $26::int8[])
                       WITH ORDINALITY AS c(kind, step, attempt, detail, ago, ord)
         )
         SELECT at FROM run",
    )
    .bind(p.run_id)
    .bind(p.epoch)
    .bind(p.cancel_requested)
    .bind(p.state.status)
    .bind(&p.state.output)
    .bind(error)
    .bind(p.state.cancel_requested)
    .bind(mode)
    .bind(ready_at)
    .bind(&steps.idx)
    .bind(&steps.status)
    .bind(&steps.attempts)
    .bind(&steps.compensation_attempts)
    .bind(&steps.output)
    .bind(&steps.error)
    .bind(&steps.partial)
    .bind(&steps.started_ago)
    .bind(&events.kind)
    .bind(&events.step)
    .bind(&events.attempt)
    .bind(&events.detail)
    .bind(&steps.lost_attempts)
    .bind(&steps.lost_compensation_attempts)
    .bind(&steps.finished)
    .bind(&steps.finished_ago)
    .bind(&events.ago)
    .bind(p.state.status.is_terminal())
    .bind(wait.kind)
    .bind(wait.name)
    .bind(wait.step)
    .bind(wait.attempt)
    .bind(wait.deadline)
    .bind(p.pause_requested)
    .bind(p.state.pause_requested)
    .bind(p.state.paused_from)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(at) = applied {
        return Ok(Persisted::Applied { at });
    }
    let current: Option<(i64, bool, bool)> =
        sqlx::query_as("SELECT lease_epoch, cancel_requested, pause_requested FROM runs WHERE id = $1")
            .bind(p.run_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match current {
        Some((epoch, cancel, pause))
            if epoch == p.epoch && (cancel != p.cancel_requested || pause != p.pause_requested) =>
        {
            Persisted::Requested { cancel, pause }
        }
        _ => Persisted::Fenced,
    })
}

/// A run's error as its `error` column holds it.
fn error_json(state: &RunState) -> Result<Option<Value>, sqlx::Error> {
    state
        .error
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// The run columns of a wait, as bound.
struct WaitColumns<'a> {
    kind: Option<WaitKind>,
    name: Option<&'a str>,
    step: Option<i16>,
    attempt: Option<i32>,
    deadline: Option<DateTime<Utc>>,
}

impl<'a> WaitColumns<'a> {
    fn of(waiting: Option<&'a Waiting>) -> Self {
        Self {
            kind: waiting.map(|w| w.kind),
            name: waiting.map(|w| w.name.as_str()),
            step: waiting.map(|w| i16::try_from(w.step).unwrap_or(i16::MAX)),
            attempt: waiting.map(|w| i32::try_from(w.attempt).unwrap_or(i32::MAX)),
            deadline: waiting.map(|w| w.deadline),
        }
    }

    fn mirror(&self, run: &mut RunRow) {
        run.wait_kind = self.kind;
        run.wait_name = self.name.map(str::to_string);
        run.wait_step = self.step;
        run.wait_attempt = self.attempt;
        run.wait_deadline = self.deadline;
    }
}

/// Column arrays of the steps a statement writes (bound as `unnest` parameters).
#[derive(Default)]
struct StepArrays {
    idx: Vec<i16>,
    status: Vec<StepStatus>,
    attempts: Vec<i32>,
    compensation_attempts: Vec<i32>,
    lost_attempts: Vec<i32>,
    lost_compensation_attempts: Vec<i32>,
    output: Vec<Option<Value>>,
    error: Vec<Option<Value>>,
    partial: Vec<Option<Value>>,
    started_ago: Vec<Option<i64>>,
    finished: Vec<Option<&'static str>>,
    finished_ago: Vec<Option<i64>>,
}

impl StepArrays {
    /// Adds `more`'s rows after these.
    fn append(&mut self, mut more: Self) {
        self.idx.append(&mut more.idx);
        self.status.append(&mut more.status);
        self.attempts.append(&mut more.attempts);
        self.compensation_attempts.append(&mut more.compensation_attempts);
        self.lost_attempts.append(&mut more.lost_attempts);
        self.lost_compensation_attempts
            .append(&mut more.lost_compensation_attempts);
        self.output.append(&mut more.output);
        self.error.append(&mut more.error);
        self.partial.append(&mut more.partial);
        self.started_ago.append(&mut more.started_ago);
        self.finished.append(&mut more.finished);
        self.finished_ago.append(&mut more.finished_ago);
    }

    fn from_state(state: &RunState, times: &std::collections::BTreeMap<usize, StepTimes>, which: Vec<usize>) -> Self {
        let mut arrays = Self {
            idx: Vec::with_capacity(which.len()),
            status: Vec::with_capacity(which.len()),
            attempts: Vec::with_capacity(which.len()),
            compensation_attempts: Vec::with_capacity(which.len()),
            lost_attempts: Vec::with_capacity(which.len()),
            lost_compensation_attempts: Vec::with_capacity(which.len()),
            output: Vec::with_capacity(which.len()),
            error: Vec::with_capacity(which.len()),
            partial: Vec::with_capacity(which.len()),
            started_ago: Vec::with_capacity(which.len()),
            finished: Vec::with_capacity(which.len()),
            finished_ago: Vec::with_capacity(which.len()),
        };
        for i in which {
            let Some(step) = state.steps.get(i) else { continue };
            arrays.idx.push(i16::try_from(i).unwrap_or(i16::MAX));
            arrays.status.push(step.status);
            arrays.attempts.push(i32::try_from(step.attempts).unwrap_or(i32::MAX));
            arrays
                .compensation_attempts
                .push(i32::try_from(step.compensation_attempts).unwrap_or(i32::MAX));
            arrays
                .lost_attempts
                .push(i32::try_from(step.lost_attempts).unwrap_or(i32::MAX));
            arrays
                .lost_compensation_attempts
                .push(i32::try_from(step.lost_compensation_attempts).unwrap_or(i32::MAX));
            arrays.output.push(step.output.clone());
            arrays
                .error
                .push(step.error.as_ref().and_then(|e| serde_json::to_value(e).ok()));
            arrays.partial.push(step.partial.clone());
            let t = times.get(&i).copied().unwrap_or_default();
            arrays.started_ago.push(t.started);
            let (finished, ago) = match t.finished {
                FinishedAt::Keep => (None, None),
                FinishedAt::Clear => (Some("clear"), None),
                FinishedAt::Set(ago) => (Some("set"), Some(ago)),
            };
            arrays.finished.push(finished);
            arrays.finished_ago.push(ago);
        }
        arrays
    }
}

/// Column arrays of log entries.
#[derive(Default)]
struct EventArrays {
    kind: Vec<EventKind>,
    step: Vec<Option<String>>,
    attempt: Vec<Option<i32>>,
    detail: Vec<Value>,
    ago: Vec<i64>,
}

impl EventArrays {
    /// Adds `more`'s entries after these.
    fn append(&mut self, mut more: Self) {
        self.kind.append(&mut more.kind);
        self.step.append(&mut more.step);
        self.attempt.append(&mut more.attempt);
        self.detail.append(&mut more.detail);
        self.ago.append(&mut more.ago);
    }

    fn new(events: &[NewEvent], ago_us: &[i64]) -> Self {
        Self {
            ago: (0..events.len()).map(|i| ago_us.get(i).copied().unwrap_or(0)).collect(),
            kind: events.iter().map(|e| e.kind).collect(),
            step: events.iter().map(|e| e.step.clone()).collect(),
            attempt: events
                .iter()
                .map(|e| e.attempt.and_then(|a| i32::try_from(a).ok()))
                .collect(),
            detail: events.iter().map(|e| e.detail.clone()).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading runs
// ---------------------------------------------------------------------------------------

/// A read-only transaction whose statements all see one snapshot (`REPEATABLE READ`), for
/// answers read in several statements that must agree with each other: a run and its steps
/// read at different moments could show a run `running` whose only step had succeeded.
pub async fn snapshot(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
}

/// A run by id.
pub async fn run<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// A run by id, locked for an operator's change.
pub async fn run_for_update(conn: &mut PgConnection, id: Uuid) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// A run by workflow and idempotency key.
pub async fn run_by_key<'e>(db: impl PgExecutor<'e>, workflow: &str, key: &str) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE workflow = $1 AND idempotency_key = $2"
    )))
    .bind(workflow)
    .bind(key)
    .fetch_optional(db)
    .await
}

/// A run's status and whether it exists (cheap, for waiting).
pub async fn status_of(pool: &PgPool, id: Uuid) -> Result<Option<RunStatus>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM runs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// A run's steps, in plan order.
pub async fn steps_of<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<Vec<StepRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT run_id, idx, name, status, attempts, compensation_attempts, lost_attempts, lost_compensation_attempts,
                started_at, finished_at, output, error, partial
         FROM run_steps WHERE run_id = $1 ORDER BY idx",
    )
    .bind(id)
    .fetch_all(db)
    .await
}

/// A run's execution log, in order.
pub async fn events_of<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as("SELECT seq, at, kind, step, attempt, detail FROM run_events WHERE run_id = $1 ORDER BY seq")
        .bind(id)
        .fetch_all(db)
        .await
}

/// Which runs to list.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only these statuses (any of them).
    pub statuses: Vec<RunStatus>,
    /// A run id, an idempotency key or a subject (case-insensitive), exactly.
    pub query: Option<String>,
    /// Only runs created at or after this time.
    pub created_from: Option<DateTime<Utc>>,
    /// Only runs created before this time.
    pub created_to: Option<DateTime<Utc>>,
}

/// Where a page of runs starts: after the run created at `created_at` with this `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The last listed run's creation time.
    pub created_at: DateTime<Utc>,
    /// The last listed run's id.
    pub id: Uuid,
}

/// Runs newest first, `limit` at most, after `cursor`.
pub async fn list_runs(
    pool: &PgPool,
    filter: &RunFilter,
    cursor: Option<Cursor>,
    limit: i64,
) -> Result<Vec<RunRow>, sqlx::Error> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE true"));
    push_filter(&mut sql, filter);
    if let Some(cursor) = cursor {
        sql.push(" AND (created_at, id) < (")
            .push_bind(cursor.created_at)
            .push(", ")
            .push_bind(cursor.id)
            .push(")");
    }
    sql.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(limit);
    sql.build_query_as().fetch_all(pool).await
}

/// How many runs match the filter (without its status part), by status, counting at most
/// `cap` runs of each status: exact below the cap, "at least `cap`" at it; in
/// [`RunStatus::ALL`]'s order. Each count is an index range scan that stops at the cap, so
/// the cost does not grow with the table.
pub async fn count_by_status_capped(
    pool: &PgPool,
    filter: &RunFilter,
    cap: i64,
) -> Result<Vec<(RunStatus, i64)>, sqlx::Error> {
    let without_status = RunFilter {
        statuses: Vec::new(),
        ..filter.clone()
    };
    // One count per status, the status written into the statement (our enum's names, never
    // input) rather than bound: each count is then planned for its own status's share of the
    // table. With one correlated count over the statuses bound as a parameter, every status
    // got the plan of an average one, a walk of the newest-first index filtering by status; a
    // status with few runs (most of them, most of the time) then read every run of the range.
    // On a million runs of the last day not yet vacuumed, which is what a busy table's recent
    // pages are, that took 0.8–1.1 s; once vacuumed, 3–12 ms, because index-only scans of
    // `runs_by_status` then cost less than that walk.
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new("");
    for (i, status) in RunStatus::ALL.iter().enumerate() {
        if i > 0 {
            sql.push(" UNION ALL ");
        }
        sql.push(format_args!(
            "SELECT '{0}'::run_status, (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = '{0}'",
            status.as_str()
        ));
        push_filter(&mut sql, &without_status);
        // In index order, so each count stops at its `cap`-th run even when the filter matches
        // most of the table (the planner would otherwise scan it whole).
        sql.push(" ORDER BY created_at DESC LIMIT ")
            .push_bind(cap)
            .push(") capped)");
    }
    let mut counts: Vec<(RunStatus, i64)> = sql.build_query_as().fetch_all(pool).await?;
    counts.sort_by_key(|(status, _)| RunStatus::ALL.iter().position(|s| s == status));
    Ok(counts)
}

/// A run's step without its outputs and errors: what a list needs to show progress.
#[derive(Debug, Clone, FromRow)]
pub struct StepBrief {
    /// The run.
    pub run_id: Uuid,
    /// Its position in the plan.
    pub idx: i16,
    /// Its name.
    pub name: String,
    /// Its status.
    pub status: StepStatus,
    /// Invoke attempts started.
    pub attempts: i32,
    /// Compensation attempts started.
    pub compensation_attempts: i32,
}

/// The steps of several runs, without outputs (which can be large), by run then plan order.
pub async fn step_briefs(pool: &PgPool, runs: &[Uuid]) -> Result<Vec<StepBrief>, sqlx::Error> {
    sqlx::query_as(
        "SELECT run_id, idx, name, status, attempts, compensation_attempts
         FROM run_steps WHERE run_id = ANY($1) ORDER BY run_id, idx",
    )
    .bind(runs)
    .fetch_all(pool)
    .await
}

/// Runs finished in one minute of the overview.
#[derive(Debug, Clone, FromRow)]
pub struct FinishedMinute {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Runs that reached a terminal status in it.
    pub finished: i64,
}

/// Run durations (acceptance to terminal status) over a time bucket of the overview.
#[derive(Debug, Clone, FromRow)]
pub struct DurationBucket {
    /// The bucket's start (for the summary over all buckets: the first bucket's).
    pub start: DateTime<Utc>,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// Runs measured.
    pub runs: i64,
}

/// Finished runs per minute since `since`, oldest first (minutes without any are absent).
/// Reads only the `runs_finished` index.
pub async fn finished_per_minute(pool: &PgPool, since: DateTime<Utc>) -> Result<Vec<FinishedMinute>, sqlx::Error> {
    sqlx::query_as(
        "SELECT date_trunc('minute', finished_at) AS minute, count(*) AS finished
         FROM runs WHERE finished_at >= $1
         GROUP BY 1 ORDER BY 1",
    )
    .bind(since)
    .fetch_all(pool)
    .await
}

/// p50 and p99 run durations of the runs finished in each bucket `[start, start + minutes)`,
/// over at most `sample` runs per bucket (the last finished), so the cost is bounded however
/// busy the period was. The summary over all sampled runs comes first.
pub async fn durations(
    pool: &PgPool,
    starts: &[DateTime<Utc>],
    minutes: i32,
    sample: i64,
) -> Result<Vec<DurationBucket>, sqlx::Error> {
    sqlx::query_as(
        "WITH sample AS (
             SELECT b.start, r.ms
             FROM unnest($1::timestamptz[]) AS b(start)
             CROSS JOIN LATERAL (
                 SELECT (extract(epoch FROM finished_at - created_at) * 1000)::float8 AS ms
                 FROM runs
                 WHERE finished_at >= b.start AND finished_at < b.start + $2 * interval '1 minute'
                 ORDER BY finished_at DESC LIMIT $3
             ) r
         )
         SELECT start, p50_ms, p99_ms, runs FROM (
             SELECT 0 AS ord, min(start) AS start,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50_ms,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99_ms,
                    count(*) AS runs
             FROM sample HAVING count(*) > 0
             UNION ALL
             SELECT 1, start, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), count(*)
             FROM sample GROUP BY start
         ) b ORDER BY ord, start",
    )
    .bind(starts)
    .bind(minutes)
    .bind(sample)
    .fetch_all(pool)
    .await
}

/// Which runs a bulk action can act on at all (beyond the operator's filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eligible {
    /// A failed run, or a compensated or cancelled one not yet retried.
    Retry,
    /// A pending or running run not yet asked to cancel (or one paused before compensating).
    Cancel,
    /// A pending, running or compensating run not yet asked to pause.
    Pause,
    /// A paused run, or one asked to pause that has not yet.
    Resume,
}

fn push_eligible(sql: &mut QueryBuilder<Postgres>, eligible: Eligible) {
    sql.push(match eligible {
        Eligible::Retry => {
            " AND (status = 'failed' OR (status IN ('compensated', 'cancelled') AND retried_by IS NULL))"
        }
        Eligible::Cancel => {
            " AND (status IN ('pending', 'running') OR (status = 'paused' AND paused_from <> 'compensating'))
              AND NOT cancel_requested"
        }
        Eligible::Pause => " AND status IN ('pending', 'running', 'compensating') AND NOT pause_requested",
        Eligible::Resume => " AND (status = 'paused' OR pause_requested)",
    });
}

/// How many runs match `filter` and are eligible, counting at most `cap`.
pub(crate) async fn count_eligible(
    pool: &PgPool,
    filter: &RunFilter,
    eligible: Eligible,
    cap: i64,
) -> Result<i64, sqlx::Error> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new("SELECT count(*) FROM (SELECT 1 FROM runs WHERE true");
    push_filter(&mut sql, filter);
    push_eligible(&mut sql, eligible);
    sql.push(" LIMIT ").push_bind(cap).push(") capped");
    sql.build_query_scalar().fetch_one(pool).await
}

/// The first `limit` runs matching `filter` that are eligible, oldest first (a morning's
/// runs are acted on in the order they came).
pub(crate) async fn eligible_runs(
    pool: &PgPool,
    filter: &RunFilter,
    eligible: Eligible,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new("SELECT id FROM runs WHERE true");
    push_filter(&mut sql, filter);
    push_eligible(&mut sql, eligible);
    sql.push(" ORDER BY created_at, id LIMIT ").push_bind(limit);
    sql.build_query_scalar().fetch_all(pool).await
}

fn push_filter(sql: &mut QueryBuilder<Postgres>, filter: &RunFilter) {
    if let Some(workflow) = &filter.workflow {
        sql.push(" AND workflow = ").push_bind(workflow.clone());
    }
    if !filter.statuses.is_empty() {
        sql.push(" AND status = ANY(")
            .push_bind(filter.statuses.clone())
            .push(")");
    }
    if let Some(from) = filter.created_from {
        sql.push(" AND created_at >= ").push_bind(from);
    }
    if let Some(to) = filter.created_to {
        sql.push(" AND created_at < ").push_bind(to);
    }
    if let Some(q) = filter.query.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        match Uuid::parse_str(q) {
            Ok(id) => {
                sql.push(" AND id = ").push_bind(id);
            }
            // Two index lookups. Written as an OR, PostgreSQL walks the newest-first index and
            // filters every run (seconds on a million runs) when few match.
            Err(_) => {
                sql.push(" AND id IN (SELECT id FROM runs WHERE idempotency_key = ")
                    .push_bind(q.to_string())
                    .push(" UNION ALL SELECT id FROM runs WHERE subject IS NOT NULL AND lower(subject) = lower(")
                    .push_bind(q.to_string())
                    .push("))");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Durable waits: the run's inbox
// ---------------------------------------------------------------------------------------

/// Something received for a run from outside: a signal, or the completion of an attempt.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct InboxRow {
    /// Its id (deliveries of one run are consumed oldest first).
    pub id: i64,
    /// A signal or a completion.
    pub kind: WaitKind,
    /// The signal's name, or the completed step's.
    pub name: String,
    /// The completed attempt.
    pub attempt: Option<i32>,
    /// The signal's payload, or the completion's output.
    pub payload: Option<Value>,
    /// The error a completion reported.
    pub error: Option<Value>,
    /// The delivery's idempotency key.
    pub idempotency_key: Option<String>,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// When a wait consumed it.
    pub consumed_at: Option<DateTime<Utc>>,
    /// The step whose wait consumed it.
    pub consumed_by: Option<String>,
}

const INBOX_COLUMNS: &str =
    "id, kind, name, attempt, payload, error, idempotency_key, received_at, consumed_at, consumed_by";

/// Locks the run row of a waiting run this owner polls (its lease `epoch`), and returns the
/// wait's deadline as stored now (a heartbeat may have moved it). `None`: fenced.
pub(crate) async fn lock_waiting(
    conn: &mut PgConnection,
    run_id: Uuid,
    epoch: i64,
) -> Result<Option<Option<DateTime<Utc>>>, sqlx::Error> {
    sqlx::query_scalar("SELECT wait_deadline FROM runs WHERE id = $1 AND lease_epoch = $2 FOR UPDATE")
        .bind(run_id)
        .bind(epoch)
        .fetch_optional(conn)
        .await
}

/// The oldest unconsumed arrival the wait is for (none for a sleep), locked until the
/// transaction recording what follows consumes it.
pub(crate) async fn waiting_arrival(
    conn: &mut PgConnection,
    run_id: Uuid,
    waiting: &Waiting,
) -> Result<Option<super::machine::Arrival>, sqlx::Error> {
    use super::machine::Arrival;
    let attempt = match waiting.kind {
        WaitKind::Sleep => return Ok(None),
        WaitKind::Signal => None,
        WaitKind::Completion => Some(i32::try_from(waiting.attempt).unwrap_or(i32::MAX)),
    };
    let row: Option<InboxRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INBOX_COLUMNS} FROM run_inbox
         WHERE run_id = $1 AND kind = $2 AND name = $3 AND consumed_at IS NULL
           AND ($4::int4 IS NULL OR attempt = $4)
         ORDER BY id LIMIT 1 FOR UPDATE"
    )))
    .bind(run_id)
    .bind(waiting.kind)
    .bind(&waiting.name)
    .bind(attempt)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|row| match row.kind {
        WaitKind::Completion => Arrival::Completion {
            id: row.id,
            outcome: match &row.error {
                Some(stored) => Err(decode_stored(stored, StepError::permanent)),
                None => Ok(row.payload.clone().unwrap_or(Value::Null)),
            },
        },
        _ => Arrival::Signal {
            id: row.id,
            payload: row.payload.clone().unwrap_or(Value::Null),
            received_at: row.received_at,
            key: row.idempotency_key.clone(),
        },
    }))
}

/// Marks an arrival consumed by `step`, in the transaction recording what it led to.
pub(crate) async fn consume_arrival(conn: &mut PgConnection, id: i64, step: &str) -> Result<(), sqlx::Error> {
    let done = sqlx::query(
        "UPDATE run_inbox SET consumed_at = clock_timestamp(), consumed_by = $2 WHERE id = $1 AND consumed_at IS NULL",
    )
    .bind(id)
    .bind(step)
    .execute(conn)
    .await?;
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        // The lease holder alone consumes a run's arrivals, under the run's lock.
        Err(sqlx::Error::Protocol(format!("inbox row {id} was already consumed")))
    }
}

/// A signal or a completion to keep for a run (whose row the caller holds locked).
pub(crate) struct Delivery<'a> {
    /// The run.
    pub(crate) run_id: Uuid,
    /// A signal or a completion.
    pub(crate) kind: WaitKind,
    /// The signal's name, or the completed step's.
    pub(crate) name: &'a str,
    /// The completed attempt.
    pub(crate) attempt: Option<i32>,
    /// The payload or output.
    pub(crate) payload: Option<&'a Value>,
    /// A completion's error.
    pub(crate) error: Option<Value>,
    /// The delivery's idempotency key.
    pub(crate) key: Option<&'a str>,
}

/// What keeping a delivery did.
#[derive(Debug)]
pub(crate) enum Delivered {
    /// Kept; `woke` when the run was waiting for it and is due now.
    New {
        /// Its id.
        id: i64,
        /// The run was waiting for it, unleased, and is due now.
        woke: bool,
    },
    /// The same key (or, for a completion, the same attempt) was delivered before: that row.
    Existing(InboxRow),
}

/// Keeps a delivery in the run's inbox and, when the run waits for exactly it (unleased),
/// makes the run due at `now`. A delivery whose key was used, or a second completion of one
/// attempt, writes nothing and returns the row kept before.
pub(crate) async fn deliver(
    conn: &mut PgConnection,
    d: &Delivery<'_>,
    now: DateTime<Utc>,
) -> Result<Delivered, sqlx::Error> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO run_inbox (run_id, kind, name, attempt, payload, error, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(d.run_id)
    .bind(d.kind)
    .bind(d.name)
    .bind(d.attempt)
    .bind(d.payload)
    .bind(&d.error)
    .bind(d.key)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = id else {
        return match earlier_delivery(conn, d).await? {
            Some(existing) => Ok(Delivered::Existing(existing)),
            None => Err(sqlx::Error::RowNotFound),
        };
    };
    let woke = sqlx::query(
        "UPDATE runs SET ready_at = $3
         WHERE id = $1 AND lease_owner IS NULL AND wait_kind = $2 AND wait_name = $4
           AND ($5::int4 IS NULL OR wait_attempt = $5) AND ready_at > $3",
    )
    .bind(d.run_id)
    .bind(d.kind)
    .bind(now)
    .bind(d.name)
    .bind(d.attempt)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    Ok(Delivered::New { id, woke })
}

/// The delivery kept before with the same key (or, for a completion, of the same attempt).
pub(crate) async fn earlier_delivery(
    conn: &mut PgConnection,
    d: &Delivery<'_>,
) -> Result<Option<InboxRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INBOX_COLUMNS} FROM run_inbox
         WHERE run_id = $1 AND kind = $2 AND name = $3
           AND (idempotency_key = $4 OR (kind = 'completion' AND attempt = $5))
         ORDER BY id LIMIT 1"
    )))
    .bind(d.run_id)
    .bind(d.kind)
    .bind(d.name)
    .bind(d.key)
    .bind(d.attempt)
    .fetch_optional(conn)
    .await
}

/// Moves the deadline of the run's wait for `attempt`'s completion (a heartbeat), and its
/// due time with it while unleased. False if the run no longer waits for that attempt.
pub(crate) async fn extend_wait(
    conn: &mut PgConnection,
    run_id: Uuid,
    attempt: i32,
    deadline: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE runs SET wait_deadline = $3,
                         -- A paused run stays not due (its wait is looked at when resumed).
                         ready_at = CASE WHEN lease_owner IS NULL AND status <> 'paused' THEN $3 ELSE ready_at END
         WHERE id = $1 AND wait_kind = 'completion' AND wait_attempt = $2",
    )
    .bind(run_id)
    .bind(attempt)
    .bind(deadline)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The newest `limit` deliveries kept for a run (newest first), and how many it has in all.
pub async fn inbox_of(pool: &PgPool, run_id: Uuid, limit: i64) -> Result<(Vec<InboxRow>, i64), sqlx::Error> {
    let rows: Vec<InboxRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INBOX_COLUMNS} FROM run_inbox WHERE run_id = $1 ORDER BY id DESC LIMIT $2"
    )))
    .bind(run_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM run_inbox WHERE run_id = $1")
        .bind(run_id)
        .fetch_one(pool)
        .await?;
    Ok((rows, total))
}

/// A waiting run, for the dashboard's list.
#[derive(Debug, Clone, FromRow)]
pub struct WaitingRun {
    /// The run.
    pub id: Uuid,
    /// Its workflow.
    pub workflow: String,
    /// What operators search for.
    pub subject: Option<String>,
    /// What it waits for.
    pub wait_kind: WaitKind,
    /// The signal's name, or the step's.
    pub wait_name: String,
    /// The waiting step's name.
    pub step: String,
    /// When the wait ends with nothing received.
    pub wait_deadline: DateTime<Utc>,
    /// An operator paused it: its wait is looked at when it is resumed, so it is never
    /// overdue.
    pub paused: bool,
}

/// Waiting runs, soonest deadline first (overdue ones first of all), at most `limit`.
pub async fn waiting_runs(pool: &PgPool, limit: i64) -> Result<Vec<WaitingRun>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, r.workflow, r.subject, r.wait_kind, r.wait_name, s.name AS step, r.wait_deadline,
                r.status = 'paused' AS paused
         FROM runs r JOIN run_steps s ON s.run_id = r.id AND s.idx = r.wait_step
         WHERE r.wait_kind IS NOT NULL
         ORDER BY r.wait_deadline, r.id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// How many runs wait, and how many of them are past their deadline at `now` (not yet
/// picked up: a worker should end those waits at once).
pub async fn count_waiting(pool: &PgPool, now: DateTime<Utc>) -> Result<(i64, i64), sqlx::Error> {
    // A paused run's wait is not overdue: nothing is meant to end it until it is resumed.
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE wait_deadline < $1 AND status <> 'paused')
         FROM runs WHERE wait_kind IS NOT NULL",
    )
    .bind(now)
    .fetch_one(pool)
    .await
}

// ---------------------------------------------------------------------------------------
// Operator actions
// ---------------------------------------------------------------------------------------

/// Links a run to the run that an operator started from it (a retry, `operator_retry`, or a
/// restart from a step, `operator_restart`) and logs that action, with `detail`, on it.
pub async fn link_successor(
    conn: &mut PgConnection,
    old: Uuid,
    new: Uuid,
    kind: EventKind,
    detail: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH linked AS (
             UPDATE runs SET retried_by = $2, log_seq = log_seq + 1, updated_at = now()
             WHERE id = $1 RETURNING id, log_seq
         )
         INSERT INTO run_events (run_id, seq, kind, detail)
         SELECT id, log_seq, $3, $4 FROM linked",
    )
    .bind(old)
    .bind(new)
    .bind(kind)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The operators' audit trail
// ---------------------------------------------------------------------------------------

/// An operator action to record, in the transaction that does it.
#[derive(Debug, Clone)]
pub struct OperatorAction<'a> {
    /// Who (the operator's self-declared name).
    pub operator: &'a str,
    /// What: `run.cancel`, `run.retry`, `run.resolve`, `run.restart`, `run.pause`,
    /// `run.resume`, `runs.bulk`, `workflow.pause`, `workflow.resume`, `schedule.create`, `schedule.replace`, `schedule.enable`, `schedule.disable`,
    /// `schedule.fire`, `schedule.delete`.
    pub action: &'a str,
    /// The run acted on.
    pub run_id: Option<Uuid>,
    /// The schedule acted on.
    pub schedule: Option<&'a str>,
    /// The bulk action this is part of.
    pub bulk_id: Option<Uuid>,
    /// The operator's note.
    pub note: Option<&'a str>,
    /// What else the action says (the new run, the step, counts).
    pub detail: Value,
}

impl<'a> OperatorAction<'a> {
    /// The record of `action` by `actor`, on no run (a schedule, a workflow, a webhook, a bulk
    /// call: say which with the other fields or in `detail`).
    pub(crate) fn by(actor: Actor<'a>, action: &'a str, detail: Value) -> Self {
        Self {
            operator: actor.by,
            action,
            run_id: None,
            schedule: None,
            bulk_id: actor.bulk,
            note: actor.note,
            detail,
        }
    }

    /// The record of `action` on `run` by `actor`.
    pub(crate) fn on_run(actor: Actor<'a>, action: &'a str, run: Uuid, detail: Value) -> Self {
        Self {
            run_id: Some(run),
            ..Self::by(actor, action, detail)
        }
    }
}

/// Records an operator action.
pub async fn record_action(conn: &mut PgConnection, a: &OperatorAction<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO operator_actions (operator, action, run_id, schedule, bulk_id, note, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(a.operator)
    .bind(a.action)
    .bind(a.run_id)
    .bind(a.schedule)
    .bind(a.bulk_id)
    .bind(a.note)
    .bind(&a.detail)
    .execute(conn)
    .await?;
    Ok(())
}

/// An operator action as recorded.
#[derive(Debug, Clone, FromRow)]
pub struct ActionRow {
    /// Its id.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who.
    pub operator: String,
    /// What.
    pub action: String,
    /// The run acted on.
    pub run_id: Option<Uuid>,
    /// The schedule acted on.
    pub schedule: Option<String>,
    /// The bulk action it was part of.
    pub bulk_id: Option<Uuid>,
    /// The note.
    pub note: Option<String>,
    /// The rest.
    pub detail: Value,
}

/// The newest `limit` operator actions, newest first.
pub async fn recent_actions(pool: &PgPool, limit: i64) -> Result<Vec<ActionRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, at, operator, action, run_id, schedule, bulk_id, note, detail
         FROM operator_actions ORDER BY at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

// ---------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Paused workflows
// ---------------------------------------------------------------------------------------

/// A paused workflow, as listed.
#[derive(Debug, Clone, FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct PausedWorkflow {
    /// The workflow's name.
    pub workflow: String,
    /// When it was paused.
    pub paused_at: DateTime<Utc>,
    /// Who paused it.
    pub paused_by: String,
    /// Their note.
    pub note: Option<String>,
    /// How many of its runs are held, accepted and not started.
    pub held_runs: i64,
}

/// Pauses `workflow`: its runs not yet started are held (neither leased nor due), and so is
/// every run of it accepted until it is resumed. How many were held; `None` if it was
/// paused already.
pub async fn pause_workflow(
    conn: &mut PgConnection,
    workflow: &str,
    by: &str,
    note: Option<&str>,
) -> Result<Option<u64>, sqlx::Error> {
    let paused = sqlx::query(
        "INSERT INTO paused_workflows (workflow, paused_by, note) VALUES ($1, $2, $3)
         ON CONFLICT (workflow) DO NOTHING",
    )
    .bind(workflow)
    .bind(by)
    .bind(note)
    .execute(&mut *conn)
    .await?;
    if paused.rows_affected() == 0 {
        return Ok(None);
    }
    let held = sqlx::query(
        "UPDATE runs SET ready_at = NULL, held = true, updated_at = now()
         WHERE workflow = $1 AND status = 'pending' AND lease_owner IS NULL AND ready_at IS NOT NULL
           AND NOT cancel_requested",
    )
    .bind(workflow)
    .execute(&mut *conn)
    .await?;
    Ok(Some(held.rows_affected()))
}

/// Resumes `workflow`: its held runs are due at `now`. `None` if it was not paused.
pub async fn resume_workflow(
    conn: &mut PgConnection,
    workflow: &str,
    now: DateTime<Utc>,
) -> Result<Option<u64>, sqlx::Error> {
    let resumed = sqlx::query("DELETE FROM paused_workflows WHERE workflow = $1")
        .bind(workflow)
        .execute(&mut *conn)
        .await?;
    if resumed.rows_affected() == 0 {
        return Ok(None);
    }
    let released =
        sqlx::query("UPDATE runs SET held = false, ready_at = $2, updated_at = now() WHERE workflow = $1 AND held")
            .bind(workflow)
            .bind(now)
            .execute(&mut *conn)
            .await?;
    Ok(Some(released.rows_affected()))
}

/// The paused workflows, with how many runs each holds.
pub async fn paused_workflows<'e>(db: impl PgExecutor<'e>) -> Result<Vec<PausedWorkflow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.workflow, p.paused_at, p.paused_by, p.note,
                (SELECT count(*) FROM runs r WHERE r.workflow = p.workflow AND r.held) AS held_runs
         FROM paused_workflows p ORDER BY p.workflow",
    )
    .fetch_all(db)
    .await
}

/// Deletes up to `limit` terminal runs that finished before `cutoff`, oldest first, with their
/// steps and log (deleted by the same statement: there are no foreign keys to cascade); the
/// links from their retries are cleared by the foreign keys' `ON DELETE SET NULL`.
/// Runs locked by a worker or an operator right now are skipped, not waited for.
///
/// Two statements, not one: this runs on the worker's pool, whose plans are generic, and a
/// generic plan cannot see `limit`. It guesses a tenth of the table, and a single statement
/// then joined the doomed runs to `runs`, `run_steps` and `run_events` by reading each whole
/// table. A list of ids bound as an array is planned as a few keys, looked up in the primary
/// keys.
pub async fn delete_finished_before(pool: &PgPool, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let doomed: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM runs
         WHERE finished_at < $1 AND run_status_is_terminal(status)
         ORDER BY finished_at
         LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(cutoff)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if doomed.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "WITH steps AS (
             DELETE FROM run_steps WHERE run_id = ANY($1)
         ), events AS (
             DELETE FROM run_events WHERE run_id = ANY($1)
         ), inbox AS (
             DELETE FROM run_inbox WHERE run_id = ANY($1)
         )
         DELETE FROM runs WHERE id = ANY($1)",
    )
    .bind(&doomed)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn stored_errors_decode_and_unreadable_ones_are_never_dropped() {
        let readable: StepError = decode_stored(&json!({"message": "boom", "retryable": true}), |_| {
            StepError::permanent("unexpected")
        });
        assert_eq!(readable, StepError::retryable("boom"));
        for stored in [json!({"msg": "boom"}), json!("boom"), json!(null)] {
            let step: StepError = decode_stored(&stored, StepError::permanent);
            assert!(step.message.contains("could not be decoded"), "{}", step.message);
            assert!(step.message.contains(&stored.to_string()), "{}", step.message);
            let run: RunError = decode_stored(&stored, |message| RunError {
                step: None,
                message,
                retryable: false,
            });
            assert!(run.message.contains("could not be decoded"), "{}", run.message);
        }
    }
}

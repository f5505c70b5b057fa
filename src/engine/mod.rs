//! The durable saga engine. It knows nothing of customers or HTTP.
//!
//! - [`definition`]: workflows, steps, hooks, typed inputs and outputs.
//! - [`machine`]: the pure state machine deciding every transition of a run.
//! - `executor`: drives one claimed run, one transaction per step or per fused segment of
//!   local steps.
//! - [`lane`]: lets the fused segments of several runs share one transaction and commit.
//! - `apply`: the one place a decided transition becomes SQL, with the workflow's finish
//!   hook whenever a run ends, whichever path ends it.
//! - [`worker`]: claims runs, renews leases, recovers runs of lost workers, shuts down.
//! - `store`: the engine's SQL (crate-private: its writes are unfenced building blocks that
//!   only `apply` and the worker combine safely).
//! - [`scheduler`]: cron schedules firing runs exactly once across instances.
//! - [`retry`], [`faults`], [`status`]: retry policies, fault injection, status enums.
//!
//! [`Engine`] is the entry point: register workflows, start a worker, trigger and inspect
//! runs, and act on them as an operator.

pub(crate) mod apply;
mod bulk;
pub mod changes;
pub mod clock;
pub mod definition;
pub(crate) mod executor;
pub mod faults;
mod inbox;
pub mod lane;
pub mod machine;
mod pause;
pub mod read;
mod repair;
pub mod retry;
pub mod scheduler;
pub mod state;
pub mod status;
pub(crate) mod store;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

pub use bulk::{BULK_COUNT_CAP, BULK_SAMPLE, BulkAction, BulkOutcome, BulkSkip, MAX_BULK_RUNS};
pub use clock::{Clock, ManualClock, SystemClock};
pub use definition::{
    Access, BatchItem, BatchStep, Compensate, Completed, DefinitionError, FinishHook, Handler, InputError, OnTimeout,
    Phase, RunView, Source, Step, StepContext, StepDef, ValidateInput, WaitDef, WaitFor, Workflow, WorkflowBuilder,
    moment_at,
};
pub use executor::{DEFAULT_COHORT_RUNNERS, DEFAULT_COHORT_RUNS, MAX_COHORT_RUNS};
pub use faults::Faults;
pub use inbox::{Completion, Delivery, DeliveryOutcome};
pub use repair::MAX_NOTE_CHARS;
pub use retry::RetryPolicy;
pub use state::{RunError, RunState, StepError, StepState, Waiting};
pub use status::{EventKind, RetryAction, RunStatus, StepStatus, Trigger, WaitKind};
pub use store::{
    ActionRow, Cursor, DurationBucket, EventRow, FinishedMinute, InboxRow, PausedWorkflow, RunFilter, RunRow,
    StepBrief, StepRow, WaitingRun,
};
pub use worker::WorkerHandle;

/// The engine's SQL internals, for tests that must write past the engine's own checks (an
/// old epoch's late write, a claim made by hand). Not for applications: every write here can
/// break an invariant the engine keeps.
#[doc(hidden)]
pub mod testing {
    pub use super::store::{
        Claimed, LeaseWrite, Persist, Persisted, claim, lock_worker, persist, register_worker, run_state,
    };
}

use machine::{Machine, NewEvent, Next};
use worker::WorkerShared;

/// Metric names, in one place so the exporter's descriptions and the code agree.
pub mod metrics_names {
    /// Runs accepted, by workflow and trigger.
    pub const RUNS_STARTED: &str = "sagaflow_runs_started_total";
    /// Runs that reached a terminal status, by workflow and status.
    pub const RUNS_FINISHED: &str = "sagaflow_runs_finished_total";
    /// Step and compensation attempts, by workflow, step, phase and outcome.
    pub const STEP_ATTEMPTS: &str = "sagaflow_step_attempts_total";
    /// Duration of step and compensation attempts, in seconds.
    pub const STEP_SECONDS: &str = "sagaflow_step_duration_seconds";
    /// Attempts recorded together by one fused segment's commit.
    pub const SEGMENT_ATTEMPTS: &str = "sagaflow_segment_attempts";
    /// Runs whose segments one batch committed together.
    pub const BATCH_RUNS: &str = "sagaflow_batch_runs";
    /// Runs one cohort ran through their steps together and committed.
    pub const COHORT_RUNS: &str = "sagaflow_cohort_runs";
    /// Cohorts given up (their runs went on alone), by reason.
    pub const COHORTS_ABANDONED: &str = "sagaflow_cohorts_abandoned_total";
    /// Runs of waiting triggers inserted on their own rather than by their first segment,
    /// by workflow and reason.
    pub const RUNS_INSERTED_ALONE: &str = "sagaflow_runs_inserted_alone_total";
    /// Duration of runs from acceptance to terminal status, in seconds.
    pub const RUN_SECONDS: &str = "sagaflow_run_duration_seconds";
    /// Runs made claimable because their owner was gone or their lease expired.
    pub const RECOVERIES: &str = "sagaflow_recoveries_total";
    /// Claims that took over another worker's lease.
    pub const LEASE_TAKEOVERS: &str = "sagaflow_lease_takeovers_total";
    /// Writes refused because the lease had been taken over (fencing at work).
    pub const FENCED_WRITES: &str = "sagaflow_fenced_writes_total";
    /// Schedule ticks handled, by workflow and outcome (not by schedule: schedules come and
    /// go, and a series per name ever created would grow without bound).
    pub const SCHEDULE_TICKS: &str = "sagaflow_schedule_ticks_total";
    /// Finished runs deleted by the retention sweep.
    pub const RUNS_DELETED: &str = "sagaflow_runs_deleted_total";
    /// Runs set aside because their steps did not match their plan (they need an operator).
    pub const RUNS_PARKED: &str = "sagaflow_runs_parked_total";
    /// Worker slots in use now (a run being driven holds one; a waiting run holds none).
    pub const SLOTS_BUSY: &str = "sagaflow_worker_slots_busy";
    /// Database connections in use now, by pool (`worker`, `api`).
    pub const CONNECTIONS_BUSY: &str = "sagaflow_db_connections_busy";
}

/// Everything that can go wrong in an engine call.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No workflow of that name is registered.
    #[error("unknown workflow `{0}`")]
    UnknownWorkflow(String),
    /// The input does not fit the workflow's input type.
    #[error("invalid input: {0}")]
    InvalidInput(InputError),
    /// An idempotency key that is empty, longer than 255 characters, or holds control
    /// characters: the one rule for keys, whoever passes them.
    #[error("invalid idempotency key: it must be 1 to 255 printable characters")]
    InvalidIdempotencyKey,
    /// The idempotency key was used before with a different input.
    #[error("idempotency key `{key}` was already used with a different input (run {run})")]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// The run it belongs to.
        run: Uuid,
    },
    /// The key belongs to runs of another kind of trigger: a backend cannot pre-claim a
    /// schedule's tick, and a tick never adopts a run it did not start.
    #[error(
        "idempotency key `{key}` belongs to run {run}, started by {}, not by {}",
        owner.as_str(),
        requested.as_str()
    )]
    IdempotencyKeyTaken {
        /// The key.
        key: String,
        /// The run holding it.
        run: Uuid,
        /// What started that run.
        owner: Trigger,
        /// What asked for the key now.
        requested: Trigger,
    },
    /// Keys starting with [`RESERVED_KEY_PREFIX`] are the scheduler's.
    #[error("idempotency keys starting with `{RESERVED_KEY_PREFIX}` are reserved for schedules")]
    ReservedIdempotencyKey,
    /// No run with that id.
    #[error("run {0} not found")]
    RunNotFound(Uuid),
    /// The run's status does not allow the operator action.
    #[error("cannot {action} a run that is {status}")]
    NotAllowed {
        /// `retry`, `cancel`, `pause`, `resume`.
        action: &'static str,
        /// The run's status.
        status: RunStatus,
    },
    /// A compensated or cancelled run is retried once; retry the newer run instead.
    #[error("run {run} was already retried by run {by}")]
    AlreadyRetried {
        /// The run.
        run: Uuid,
        /// Its retry.
        by: Uuid,
    },
    /// No run of the workflow was started with this idempotency key.
    #[error("no run of `{workflow}` was started with the idempotency key `{key}`")]
    RunKeyNotFound {
        /// The workflow.
        workflow: String,
        /// The key.
        key: String,
    },
    /// A bulk call's limit is outside what one call may act on.
    #[error("limit must be from 1 to {max} (got {limit}); call again for the rest")]
    BulkLimit {
        /// The limit asked for.
        limit: i64,
        /// The most allowed.
        max: i64,
    },
    /// The workflow is paused already (or, for a resume, is not paused).
    #[error("workflow `{workflow}` is {}", if *.paused { "paused already" } else { "not paused" })]
    WorkflowPauseState {
        /// The workflow.
        workflow: String,
        /// Whether it is paused.
        paused: bool,
    },
    /// An operator action that needs a note (what was done by hand, and why) got none, or
    /// one too long to keep.
    #[error("a note is required: 1 to {MAX_NOTE_CHARS} characters saying what was done and why")]
    InvalidNote,
    /// The step's compensation did not give up: there is nothing to resolve by hand.
    #[error(
        "step `{step}` is {status}: only a compensation that gave up (compensation_failed) can be resolved by hand"
    )]
    NothingToResolve {
        /// The step.
        step: String,
        /// Its status.
        status: StepStatus,
    },
    /// A restart from this step would reuse what no longer exists, or what never was.
    #[error("cannot restart from step `{from}`: {why}")]
    CannotRestartFrom {
        /// The step asked for.
        from: String,
        /// Why not (and from where it can).
        why: String,
    },
    /// The run finished: it waits for nothing any more.
    #[error("run {run} is {status}: it takes no more signals or completions")]
    RunFinished {
        /// The run.
        run: Uuid,
        /// Its terminal status.
        status: RunStatus,
    },
    /// The run's workflow version declares no wait for this signal.
    #[error("workflow `{workflow}` version {version} waits for no signal `{signal}`")]
    UnknownSignal {
        /// The run's workflow.
        workflow: String,
        /// Its version.
        version: i32,
        /// The signal named.
        signal: String,
    },
    /// The run's plan has no step of that name.
    #[error("run {run} has no step `{step}`")]
    StepNotFound {
        /// The run.
        run: Uuid,
        /// The step named.
        step: String,
    },
    /// The step is not declared asynchronous: nothing completes it from outside.
    #[error("step `{step}` is not asynchronous: it completes with its own attempt")]
    NotAsynchronous {
        /// The step.
        step: String,
    },
    /// A completion or heartbeat for an attempt that is not the one waiting (a retry or a
    /// takeover started a newer one, or the wait ended).
    #[error("attempt {attempt} of step `{step}` is not the current one ({current})")]
    StaleAttempt {
        /// The step.
        step: String,
        /// The attempt named.
        attempt: u32,
        /// What the step is at now.
        current: String,
    },
    /// The attempt was completed before, differently.
    #[error("attempt {attempt} of step `{step}` was already completed with another outcome")]
    AlreadyCompleted {
        /// The step.
        step: String,
        /// The attempt.
        attempt: u32,
    },
    /// The database holds another plan for this workflow version: runs of it were created
    /// with those steps, so a changed plan needs a new version.
    #[error(
        "workflow `{workflow}` version {version} is stored with the steps {stored:?}, not {registered:?}; \
         register the changed plan as a new version"
    )]
    PlanChanged {
        /// The workflow.
        workflow: String,
        /// Its version.
        version: i32,
        /// The steps stored.
        stored: Vec<String>,
        /// The steps this instance registers.
        registered: Vec<String>,
    },
    /// A definition was refused.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Something that should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

/// How an engine instance behaves.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Stable identity of this instance (shown in logs; a restart of the same node id lets
    /// its runs be recovered at once).
    pub node_id: String,
    /// How long a lease lasts without a heartbeat before another instance may take the run.
    pub lease_ttl: Duration,
    /// Runs this instance drives at once.
    pub max_concurrent_runs: usize,
    /// Runs claimed per query at most.
    pub claim_batch: usize,
    /// Fallback polling when no notification arrives.
    pub poll_interval: Duration,
    /// How often to look for runs of lost workers.
    pub recovery_interval: Duration,
    /// How long shutdown waits for attempts in flight.
    pub shutdown_grace: Duration,
    /// Run consecutive local steps of a run in one transaction (a fused segment): one write
    /// of the run and one commit for all of them. Off, every attempt commits on its own.
    pub fuse_local_steps: bool,
    /// Lanes committing the fused segments of several runs together (0: each segment
    /// commits on its own; at most half the worker pool's connections). Runs of one subject
    /// always take the same lane.
    pub commit_lanes: usize,
    /// The most runs one lane commits together (at most [`lane::MAX_BATCH_RUNS`]).
    pub batch_max_runs: usize,
    /// Runners driving cohorts: the not yet inserted runs of a workflow whose every step has
    /// a set-based form, gathered as they arrive, go through their steps together, one call
    /// of each step for all (0: no cohorts; at most a quarter of the worker pool's
    /// connections). Runs of one subject always go to the same runner.
    pub cohort_runners: usize,
    /// The most runs one cohort holds (at most [`MAX_COHORT_RUNS`]).
    pub cohort_max_runs: usize,
    /// How long a cohort's first run waits for peers. Zero, the default: only runs already
    /// waiting join, so an idle system waits for nobody; above zero trades latency for
    /// larger cohorts (the tests use it to gather a cohort they can count on).
    pub cohort_gather: Duration,
    /// The longest a step may wait (for a signal, a completion or time): every wait has a
    /// deadline, and none is later than this after the wait begins.
    pub max_wait: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            node_id: "sagaflow".into(),
            lease_ttl: Duration::from_secs(10),
            max_concurrent_runs: 64,
            claim_batch: 32,
            poll_interval: Duration::from_secs(2),
            recovery_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            fuse_local_steps: true,
            commit_lanes: lane::DEFAULT_LANES,
            batch_max_runs: lane::MAX_BATCH_RUNS,
            cohort_runners: DEFAULT_COHORT_RUNNERS,
            cohort_max_runs: DEFAULT_COHORT_RUNS,
            cohort_gather: Duration::ZERO,
            max_wait: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Builds an [`Engine`]: register workflows and hook handlers, then build.
pub struct EngineBuilder {
    pool: PgPool,
    worker_pool: Option<PgPool>,
    config: EngineConfig,
    faults: Faults,
    workflows: Vec<Workflow>,
    hooks: Vec<(String, String, Handler)>,
    clock: Arc<dyn Clock>,
}

impl EngineBuilder {
    /// Sets the configuration.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Gives the worker (steps, claims, leases, schedules) a pool of its own, so that stalled
    /// steps never take the connections requests need (default: the one pool for all).
    pub fn worker_pool(mut self, pool: PgPool) -> Self {
        self.worker_pool = Some(pool);
        self
    }

    /// Sets the fault injection (tests only).
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Sets the wall clock due times and schedules are read from (tests move a
    /// [`ManualClock`]; see [`clock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Registers a workflow (several versions of one workflow may be registered; new runs
    /// use the highest, running ones keep theirs).
    pub fn register(mut self, workflow: Workflow) -> Self {
        self.workflows.push(workflow);
        self
    }

    /// Registers the embedding application's handler for a hook point of a workflow (all
    /// registered versions that have that hook point).
    pub fn hook(mut self, workflow: &str, step: &str, handler: Handler) -> Self {
        self.hooks.push((workflow.to_string(), step.to_string(), handler));
        self
    }

    /// Checks the registrations and builds the engine.
    pub fn build(self) -> Result<Engine, DefinitionError> {
        let mut registry = Registry::default();
        let mut workflows = self.workflows;
        for (workflow, step, handler) in &self.hooks {
            let mut found = false;
            for wf in workflows.iter_mut().filter(|w| &w.name == workflow) {
                if let Some(def) = wf.steps.iter_mut().find(|s| &s.name == step && s.hook) {
                    if handler.is_batched() && !handler.is_local() {
                        return Err(DefinitionError::BatchNotLocal {
                            workflow: workflow.clone(),
                            step: step.clone(),
                        });
                    }
                    def.handler = handler.clone();
                    found = true;
                }
            }
            if !found {
                return Err(DefinitionError::NoSuchHook {
                    workflow: workflow.clone(),
                    step: step.clone(),
                });
            }
        }
        for wf in workflows {
            registry.add(Arc::new(wf), self.config.max_wait)?;
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                worker_pool: self.worker_pool.unwrap_or_else(|| self.pool.clone()),
                pool: self.pool,
                config: self.config,
                faults: Arc::new(self.faults),
                registry: RwLock::new(registry),
                worker: RwLock::new(None),
                finished: FinishedRuns::default(),
                changes: changes::ChangeFeed::default(),
                clock: self.clock,
            }),
        })
    }
}

/// What an instance holds at one moment (see [`Engine::load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Worker slots in use: runs an executor drives now (claimed, in an attempt or being
    /// recorded).
    pub slots_busy: usize,
    /// Connections of the worker's pool in use.
    pub worker_connections_busy: u32,
    /// Connections of the API's pool in use.
    pub api_connections_busy: u32,
}

/// The durable saga engine: cheap to clone, shared by the API and the worker.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// Requests: triggers, reads, operator actions.
    pub(crate) pool: PgPool,
    /// The worker's: step transactions, claims, heartbeats, recovery, schedules.
    pub(crate) worker_pool: PgPool,
    pub(crate) config: EngineConfig,
    pub(crate) faults: Arc<Faults>,
    /// The workflow versions this instance runs: those registered at build, and versions
    /// added while it runs (workflows defined as data).
    registry: RwLock<Registry>,
    /// This instance's running worker, if any: new runs go to it directly.
    worker: RwLock<Option<Arc<WorkerShared>>>,
    /// Wakes callers waiting for runs driven here to finish.
    pub(crate) finished: FinishedRuns,
    /// Runs changed by this instance, published for live views.
    pub(crate) changes: changes::ChangeFeed,
    /// The wall clock schedules run by.
    pub(crate) clock: Arc<dyn Clock>,
}

/// Workflow versions by name, and what a worker may claim.
#[derive(Default)]
struct Registry {
    /// By name, versions ascending.
    by_name: HashMap<String, Vec<Arc<Workflow>>>,
    /// `name@version` of every version: what this instance's worker claims.
    kinds: Arc<[String]>,
}

impl Registry {
    fn add(&mut self, workflow: Arc<Workflow>, max_wait: Duration) -> Result<(), DefinitionError> {
        workflow.check_waits(max_wait)?;
        let versions = self.by_name.entry(workflow.name.clone()).or_default();
        if versions.iter().any(|v| v.version == workflow.version) {
            return Err(DefinitionError::AlreadyRegistered(
                workflow.name.clone(),
                workflow.version,
            ));
        }
        versions.push(workflow);
        versions.sort_by_key(|w| w.version);
        self.reindex();
        Ok(())
    }

    fn remove(&mut self, name: &str, version: i32) -> Option<Arc<Workflow>> {
        let versions = self.by_name.get_mut(name)?;
        let at = versions.iter().position(|w| w.version == version)?;
        let removed = versions.remove(at);
        if versions.is_empty() {
            self.by_name.remove(name);
        }
        self.reindex();
        Some(removed)
    }

    fn reindex(&mut self) {
        let mut kinds: Vec<String> = self
            .by_name
            .values()
            .flatten()
            .map(|w| format!("{}@{}", w.name, w.version))
            .collect();
        kinds.sort();
        self.kinds = kinds.into();
    }
}

impl Inner {
    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn workflow(&self, name: &str, version: i32) -> Option<Arc<Workflow>> {
        self.registry()
            .by_name
            .get(name)?
            .iter()
            .find(|w| w.version == version)
            .cloned()
    }

    fn latest(&self, name: &str) -> Option<Arc<Workflow>> {
        self.registry().by_name.get(name)?.last().cloned()
    }

    /// `name@version` of every workflow version this instance runs.
    pub(crate) fn kinds(&self) -> Arc<[String]> {
        Arc::clone(&self.registry().kinds)
    }

    fn all_workflows(&self) -> Vec<Arc<Workflow>> {
        self.registry().by_name.values().flatten().cloned().collect()
    }

    pub(crate) fn attach_worker(&self, worker: Arc<WorkerShared>) {
        if let Ok(mut slot) = self.worker.write() {
            *slot = Some(worker);
        }
    }

    pub(crate) fn detach_worker(&self) {
        if let Ok(mut slot) = self.worker.write() {
            *slot = None;
        }
    }

    fn local_worker(&self) -> Option<Arc<WorkerShared>> {
        self.worker.read().ok()?.clone()
    }
}

/// Runs finished by this instance, for callers waiting on them: the final status, and the
/// run's rows when its executor kept them, are handed over directly, so a waiter needs no
/// second read.
#[derive(Default)]
pub(crate) struct FinishedRuns {
    /// Per watched run: where its finish is announced, and how many callers wait.
    waiting: Mutex<HashMap<Uuid, (FinishSender, usize)>>,
}

/// A run's finish as announced to its waiters.
#[derive(Debug, Clone)]
struct Finish {
    status: RunStatus,
    /// The run as its finishing write committed it, if the writer kept a copy.
    detail: Option<Arc<RunDetail>>,
}

type FinishSender = tokio::sync::watch::Sender<Option<Finish>>;

impl FinishedRuns {
    fn watch(&self, run: Uuid) -> tokio::sync::watch::Receiver<Option<Finish>> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let entry = waiting
            .entry(run)
            .or_insert_with(|| (tokio::sync::watch::channel(None).0, 0));
        entry.1 += 1;
        entry.0.subscribe()
    }

    fn unwatch(&self, run: Uuid) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = waiting.get_mut(&run) {
            entry.1 -= 1;
            if entry.1 == 0 {
                waiting.remove(&run);
            }
        }
    }

    /// Announces a committed finish to the run's waiters, if it has any.
    pub(crate) fn notify(&self, run: Uuid, status: RunStatus, detail: Option<Arc<RunDetail>>) {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((sender, _)) = waiting.get(&run) {
            sender.send_replace(Some(Finish { status, detail }));
        }
    }
}

/// A caller's interest in a run's finish. Registered before the run can finish (a trigger
/// registers it before its insert), so no finish is missed; withdrawn when dropped.
struct FinishWatch {
    inner: Arc<Inner>,
    run: Uuid,
    finished: tokio::sync::watch::Receiver<Option<Finish>>,
}

impl FinishWatch {
    fn new(inner: &Arc<Inner>, run: Uuid) -> Self {
        Self {
            finished: inner.finished.watch(run),
            inner: Arc::clone(inner),
            run,
        }
    }

    /// Waits until the run finishes or `deadline` passes (`None` then). A run finished by this
    /// instance is announced; one driven by another instance is looked for in the database
    /// every 200 ms, and at once when `look_first`.
    async fn wait(&mut self, deadline: tokio::time::Instant, look_first: bool) -> Result<Option<Finish>, EngineError> {
        let mut look = look_first;
        loop {
            if let Some(finish) = self.finished.borrow().clone() {
                return Ok(Some(finish));
            }
            if look {
                let status = store::status_of(&self.inner.pool, self.run)
                    .await?
                    .ok_or(EngineError::RunNotFound(self.run))?;
                if status.is_terminal() {
                    return Ok(Some(Finish { status, detail: None }));
                }
            }
            look = true;
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let poll = (deadline - now).min(Duration::from_millis(200));
            tokio::select! {
                changed = self.finished.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                }
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}

impl Drop for FinishWatch {
    fn drop(&mut self) {
        self.inner.finished.unwatch(self.run);
    }
}

/// The prefix of the idempotency keys the scheduler gives its runs
/// (`schedule:<name>:<tick>`): only schedule triggers may use it.
pub const RESERVED_KEY_PREFIX: &str = "schedule:";

/// Options of a trigger.
#[derive(Debug, Clone, Default)]
pub struct TriggerOptions {
    /// Same key and same input: the same run. Same key, different input: refused.
    pub idempotency_key: Option<String>,
    /// What started the run (default: the API).
    pub trigger: Option<Trigger>,
}

/// The result of a trigger.
#[derive(Debug, Clone)]
pub struct Triggered {
    /// The run.
    pub run_id: Uuid,
    /// False when an earlier run with the same idempotency key and input was returned.
    pub created: bool,
    /// The run as it was committed (or, for a replay, as it was read): what a caller can
    /// answer with when reading it again fails, since the run exists whatever happens next.
    pub accepted: store::RunRow,
}

/// A trigger that waited for its run: the run as it stood when the wait ended.
#[derive(Debug, Clone)]
pub struct Waited {
    /// The trigger's result.
    pub triggered: Triggered,
    /// The run with its steps: finished, or as it stood at the deadline. From the executor's
    /// own copy when it finished on this instance, read otherwise; `None` only when reading
    /// it failed (the run exists all the same: answer with `triggered.accepted`).
    pub detail: Option<RunDetail>,
}

/// A run with its steps and the plan's step names, as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunDetail {
    /// The run.
    pub run: store::RunRow,
    /// Its steps, in plan order.
    pub steps: Vec<store::StepRow>,
}

/// The result of an operator's retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retried {
    /// The `failed` run resumes its compensation.
    Resumed(Uuid),
    /// A new run was started, linked to the old one.
    NewRun(Uuid),
}

impl Engine {
    /// Starts building an engine on this pool.
    pub fn builder(pool: PgPool) -> EngineBuilder {
        EngineBuilder {
            pool,
            worker_pool: None,
            config: EngineConfig::default(),
            faults: Faults::none(),
            workflows: Vec::new(),
            hooks: Vec::new(),
            clock: Arc::new(SystemClock),
        }
    }

    /// The connection pool requests use.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The worker's connection pool.
    pub(crate) fn worker_pool(&self) -> &PgPool {
        &self.inner.worker_pool
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The engine clock's time: what due times are stamped with and compared to.
    /// The engine clock's time, to the microsecond PostgreSQL keeps: a due time or a
    /// deadline the executor holds is then exactly the one stored.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        use chrono::SubsecRound;
        self.inner.clock.now().trunc_subsecs(6)
    }

    /// What this instance holds right now: worker slots and database connections in use.
    pub fn load(&self) -> Load {
        let busy = |pool: &PgPool| {
            pool.size()
                .saturating_sub(u32::try_from(pool.num_idle()).unwrap_or(u32::MAX))
        };
        let worker = self.inner.worker.read().ok().and_then(|w| w.clone());
        Load {
            // The executors alive, not the permits taken: a claim in flight holds a batch
            // of permits for a moment, whatever it finds.
            slots_busy: worker.as_ref().map_or(0, |w| w.driving()),
            worker_connections_busy: busy(&self.inner.worker_pool),
            api_connections_busy: busy(&self.inner.pool),
        }
    }

    pub(crate) fn lease_ms(&self) -> i64 {
        i64::try_from(self.inner.config.lease_ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Starts this instance's worker: it claims and drives runs until shut down. The plans
    /// of the registered workflows are checked against the stored ones first
    /// ([`Engine::record_plans`]).
    pub async fn start_worker(&self) -> Result<WorkerHandle, EngineError> {
        self.record_plans().await?;
        worker::start(self.clone()).await
    }

    /// Stores the plan of every registered workflow version not stored yet, and refuses
    /// ([`EngineError::PlanChanged`]) a version whose stored plan has other steps. Runs parked
    /// because their steps did not match their plan are made due again: the plan they need
    /// may be back.
    pub async fn record_plans(&self) -> Result<(), EngineError> {
        for wf in self.inner.all_workflows() {
            self.record_plan(&wf).await?;
        }
        Ok(())
    }

    /// Checks one version's plan against the stored one (recording it if new) and makes its
    /// parked runs due again.
    async fn record_plan(&self, wf: &Workflow) -> Result<(), EngineError> {
        {
            let steps: Vec<&str> = wf.steps.iter().map(|s| s.name.as_str()).collect();
            let stored = store::record_plan(
                &self.inner.pool,
                &wf.name,
                wf.version,
                &wf.plan_hash(),
                &steps,
                wf.source == Source::Defined,
            )
            .await?;
            if let Some((_, stored)) = stored {
                return Err(EngineError::PlanChanged {
                    workflow: wf.name.clone(),
                    version: wf.version,
                    stored,
                    registered: steps.iter().map(|s| s.to_string()).collect(),
                });
            }
            let unparked = store::unpark_runs(&self.inner.pool, &wf.name, wf.version, self.now()).await?;
            if unparked > 0 {
                tracing::info!(workflow = %wf.name, version = wf.version, unparked, "parked runs made due again");
            }
        }
        Ok(())
    }

    /// Adds a workflow version while the engine runs (a workflow defined as data, stored by
    /// this or another instance): its plan is checked against the stored one, and this
    /// instance's worker claims its runs from now on. Refused if the version is registered.
    pub async fn register(&self, workflow: Workflow) -> Result<Arc<Workflow>, EngineError> {
        if self.inner.workflow(&workflow.name, workflow.version).is_some() {
            return Err(EngineError::Definition(DefinitionError::AlreadyRegistered(
                workflow.name.clone(),
                workflow.version,
            )));
        }
        self.record_plan(&workflow).await?;
        let workflow = Arc::new(workflow);
        self.inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .add(Arc::clone(&workflow), self.inner.config.max_wait)
            .map_err(EngineError::Definition)?;
        Ok(workflow)
    }

    /// Stops running a workflow version added with [`Engine::register`] (its definition was
    /// deleted); the caller has checked that no unfinished run uses it.
    pub fn unregister(&self, name: &str, version: i32) -> Option<Arc<Workflow>> {
        self.inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name, version)
    }

    /// Every registered workflow version, by name then version.
    pub fn workflows(&self) -> Vec<Arc<Workflow>> {
        let mut all = self.inner.all_workflows();
        all.sort_by(|a, b| a.name.cmp(&b.name).then(a.version.cmp(&b.version)));
        all
    }

    /// The newest registered version of a workflow.
    pub fn workflow(&self, name: &str) -> Option<Arc<Workflow>> {
        self.inner.latest(name)
    }

    /// The workflow version a run uses.
    pub fn workflow_version(&self, name: &str, version: i32) -> Option<Arc<Workflow>> {
        self.inner.workflow(name, version)
    }

    /// Accepts a run: checks the input, writes the run, its plan and its first log entry in
    /// one transaction, and returns once that committed. When this instance has a worker with
    /// a free slot, the run is leased to it in the same transaction and starts at once.
    pub async fn trigger(
        &self,
        workflow: &str,
        input: Value,
        options: TriggerOptions,
    ) -> Result<Triggered, EngineError> {
        Ok(self.trigger_watched(workflow, input, options, None).await?.0)
    }

    /// Accepts a run as [`Engine::trigger`] does, then waits up to `wait` for it to finish.
    /// Once the run is committed this never fails: the wait or the read that goes wrong is
    /// logged and the answer is the run as it is known. A run this instance finishes is
    /// answered from what its executor committed, without reading it back.
    pub async fn trigger_and_wait(
        &self,
        workflow: &str,
        input: Value,
        options: TriggerOptions,
        wait: Duration,
    ) -> Result<Waited, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        let (triggered, watch) = self.trigger_watched(workflow, input, options, Some(deadline)).await?;
        let run_id = triggered.run_id;
        let mut finish = None;
        if let Some(mut watch) = watch.filter(|_| triggered.created) {
            // Just inserted, the run cannot have finished elsewhere yet: no read before waiting.
            match watch.wait(deadline, false).await {
                Ok(found) => finish = found,
                Err(e) => tracing::warn!(%run_id, error = %e, "waiting for a triggered run failed"),
            }
        }
        let detail = match finish.and_then(|f| f.detail) {
            Some(detail) => Some(Arc::unwrap_or_clone(detail)),
            None => match self.run(run_id).await {
                Ok(detail) => detail,
                Err(e) => {
                    tracing::warn!(%run_id, error = %e, "reading a triggered run failed");
                    None
                }
            },
        };
        Ok(Waited { triggered, detail })
    }

    /// A trigger, with the run's finish watched from before its insert when the caller waits
    /// for it until `waits_until`.
    async fn trigger_watched(
        &self,
        workflow: &str,
        input: Value,
        options: TriggerOptions,
        waits_until: Option<tokio::time::Instant>,
    ) -> Result<(Triggered, Option<FinishWatch>), EngineError> {
        let wf = self
            .inner
            .latest(workflow)
            .ok_or_else(|| EngineError::UnknownWorkflow(workflow.to_string()))?;
        wf.check_input(&input).map_err(EngineError::InvalidInput)?;
        wf.check_wait_input(&input, self.now(), self.inner.config.max_wait)
            .map_err(EngineError::InvalidInput)?;
        let trigger = options.trigger.unwrap_or(Trigger::Api);
        let key = options.idempotency_key.as_deref();
        if let Some(key) = key {
            if key.is_empty() || key.chars().count() > 255 || key.chars().any(char::is_control) {
                return Err(EngineError::InvalidIdempotencyKey);
            }
            if key.starts_with(RESERVED_KEY_PREFIX) && trigger != Trigger::Schedule {
                return Err(EngineError::ReservedIdempotencyKey);
            }
            if let Some(existing) = store::run_by_key(&self.inner.pool, &wf.name, key).await? {
                return Ok((replay(existing, key, &input, trigger)?, None));
            }
        }
        let mut prepared = self.prepare_run(&wf, &input, key, trigger, None, json!({}), None);
        let watch = waits_until.map(|_| FinishWatch::new(&self.inner, prepared.id));
        let run_id = prepared.id;
        let in_first_segment = waits_until.and_then(|answer_by| {
            let local = prepared
                .local
                .take_if(|local| self.inserts_in_first_segment(&prepared.workflow, local))?;
            Some((local, answer_by))
        });
        let accepted = if let Some((local, answer_by)) = in_first_segment {
            // The caller waits for the run anyway: its first segment inserts it, in the state
            // it leaves it, with that segment's commit (one row where there were two, and one
            // commit less); the answer comes once that commit is done.
            let (answer, answered) = oneshot::channel();
            self.start_uninserted(prepared, local, answer_by, answer);
            match answered.await {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(e)) => return Err(EngineError::Database(e)),
                Err(_) => {
                    return Err(EngineError::Internal(
                        "the run's executor stopped before inserting it".into(),
                    ));
                }
            }
        } else {
            let mut conn = self.inner.pool.acquire().await?;
            let inserted = self.insert_prepared(&mut conn, &mut prepared).await?;
            drop(conn);
            inserted.map(|inserted| {
                let (accepted, _) = self.new_run(&prepared).rows(inserted);
                self.inner.changes.touch(run_id);
                self.start_prepared(prepared, inserted);
                accepted
            })
        };
        if let Some(accepted) = accepted {
            let triggered = Triggered {
                run_id,
                created: true,
                accepted,
            };
            return Ok((triggered, watch));
        }
        drop(watch);
        // Lost a race for the idempotency key.
        let key = key.unwrap_or_default();
        match store::run_by_key(&self.inner.pool, &wf.name, key).await? {
            Some(existing) => Ok((replay(existing, key, &input, trigger)?, None)),
            None => Err(EngineError::Internal("idempotency key conflict without a run".into())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn prepare_run(
        &self,
        wf: &Arc<Workflow>,
        input: &Value,
        key: Option<&str>,
        trigger: Trigger,
        retry_of: Option<Uuid>,
        extra: Value,
        reused: Option<repair::Reused>,
    ) -> PreparedRun {
        let id = Uuid::now_v7();
        let mut state = RunState::new(wf.steps.len());
        let mut detail = json!({"trigger": trigger, "workflow_version": wf.version});
        if let Some(key) = key {
            detail["idempotency_key"] = json!(key);
        }
        if let Some(old) = retry_of {
            detail["retry_of"] = json!(old);
        }
        if let (Some(obj), Some(more)) = (detail.as_object_mut(), extra.as_object()) {
            obj.extend(more.clone());
        }
        let mut events = vec![NewEvent {
            kind: EventKind::RunCreated,
            step: None,
            attempt: None,
            detail,
        }];
        // A restart starts with the steps before its first as they were recorded.
        if let Some(reused) = reused {
            for (i, step) in reused.steps {
                if let Some(slot) = state.steps.get_mut(i) {
                    *slot = step;
                }
            }
            events.extend(reused.events);
        }
        // Lease it to our own worker at once when it has room: no claim round trip, no NOTIFY.
        let mut marks = Default::default();
        let mut local = None;
        let mut unstarted = None;
        let slot = self.inner.local_worker().and_then(|w| Some((w.free_slot()?, w)));
        if let Some((slot, worker)) = slot {
            let mut claimed = state.clone();
            let t = worker.claim(wf, input, &mut claimed, None, self.now());
            // Finished before a single attempt (every step skipped by `when`), the run goes
            // in unleased and due: an insert cannot also be a finish (output, finish time, the
            // workflow's finish hook), so a claim finishes it through `apply` like any other.
            if !matches!(t.next, Next::Finish(_)) {
                unstarted = Some((std::mem::replace(&mut state, claimed), events.len()));
                events.extend(t.events);
                marks = t.marks;
                local = Some(LocalStart {
                    worker,
                    slot,
                    next: t.next,
                });
            }
        }
        PreparedRun {
            id,
            workflow: Arc::clone(wf),
            input: input.clone(),
            subject: wf.subject_of(input),
            key: key.map(str::to_string),
            trigger,
            retry_of,
            state,
            marks,
            events,
            now: self.now(),
            owner: local.as_ref().map(|l: &LocalStart| l.worker.id),
            local,
            unstarted,
        }
    }

    /// The insert of a prepared run.
    fn new_run<'a>(&self, p: &'a PreparedRun) -> store::NewRun<'a> {
        store::NewRun {
            id: p.id,
            workflow: &p.workflow.name,
            workflow_version: p.workflow.version,
            input: &p.input,
            subject: p.subject.as_deref(),
            idempotency_key: p.key.as_deref(),
            trigger: p.trigger,
            retry_of: p.retry_of,
            state: &p.state,
            step_names: p.workflow.steps.iter().map(|s| s.name.as_str()).collect(),
            marks: &p.marks,
            events: &p.events,
            owner: p.owner,
            lease_ms: self.lease_ms(),
            now: p.now,
        }
    }

    /// Inserts a prepared run; how when inserted (a run of a paused workflow is inserted
    /// unstarted and held), `None` when its key was taken.
    async fn insert_prepared(
        &self,
        conn: &mut sqlx::PgConnection,
        p: &mut PreparedRun,
    ) -> Result<Option<store::Inserted>, sqlx::Error> {
        let mut inserted = store::insert_run(conn, &self.new_run(p)).await?;
        if inserted == store::Inserted::WorkflowPaused {
            p.unstart();
            inserted = store::insert_run(conn, &self.new_run(p)).await?;
        }
        if !matches!(inserted, store::Inserted::Run { .. }) {
            return Ok(None);
        }
        p.count_started();
        Ok(Some(inserted))
    }

    /// Whether a run leased to our worker in its insert can leave the insert to its first
    /// segment: fusion is on and the run begins with a local step (the segment then commits
    /// in a lane's batch, or on its own). Any other first attempt needs the run committed
    /// before it runs.
    fn inserts_in_first_segment(&self, workflow: &Workflow, local: &LocalStart) -> bool {
        let first = match local.next {
            Next::Invoke(step) => step,
            _ => return false,
        };
        self.inner.config.fuse_local_steps
            && workflow
                .steps
                .get(first)
                .is_some_and(|s| s.is_local() && !self.inner.faults.will_fail(&s.name))
    }

    /// Hands a prepared run that is not inserted yet to an executor of our worker, which
    /// inserts it with its first segment (see [`executor::Uninserted`]) and tells `answer`.
    fn start_uninserted(
        &self,
        p: PreparedRun,
        local: LocalStart,
        answer_by: tokio::time::Instant,
        answer: oneshot::Sender<executor::InsertAnswer>,
    ) {
        let workflow = Arc::clone(&p.workflow);
        let (run, steps) = self.new_run(&p).rows(store::Inserted::Run {
            created_at: p.now,
            held: false,
        });
        let lease = executor::Lease {
            copy: RunDetail { run, steps },
            state: p.state.clone(),
            next: local.next,
            uninserted: Some(executor::Uninserted {
                run: p,
                prepared: std::time::Instant::now(),
                answer_by,
                answer,
            }),
        };
        local.worker.start(self, workflow, lease, local.slot);
    }

    /// Hands a committed run that was leased to our worker to an executor.
    fn start_prepared(&self, mut p: PreparedRun, inserted: store::Inserted) {
        let (run, steps) = self.new_run(&p).rows(inserted);
        let Some(local) = p.local.take() else {
            return;
        };
        let lease = executor::Lease {
            copy: RunDetail { run, steps },
            state: p.state,
            next: local.next,
            uninserted: None,
        };
        local.worker.start(self, p.workflow, lease, local.slot);
    }

    /// Waits up to `timeout` for a run to reach a terminal status; returns its status then.
    pub async fn wait_for_terminal(&self, run_id: Uuid, timeout: Duration) -> Result<RunStatus, EngineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Watch before reading, so a finish between the read and the wait is not missed.
        let mut watch = FinishWatch::new(&self.inner, run_id);
        match watch.wait(deadline, true).await? {
            Some(finish) => Ok(finish.status),
            None => store::status_of(&self.inner.pool, run_id)
                .await?
                .ok_or(EngineError::RunNotFound(run_id)),
        }
    }

    /// A run with its steps, both as of one moment.
    pub async fn run(&self, run_id: Uuid) -> Result<Option<RunDetail>, EngineError> {
        let mut tx = store::snapshot(&self.inner.pool).await?;
        let Some(run) = store::run(&mut *tx, run_id).await? else {
            return Ok(None);
        };
        let steps = store::steps_of(&mut *tx, run_id).await?;
        tx.commit().await?;
        Ok(Some(RunDetail { run, steps }))
    }

    /// A run's execution log, in order (None if the run does not exist).
    pub async fn events(&self, run_id: Uuid) -> Result<Option<Vec<store::EventRow>>, EngineError> {
        let mut tx = self.inner.pool.begin().await?;
        if store::run(&mut *tx, run_id).await?.is_none() {
            return Ok(None);
        }
        let events = store::events_of(&mut *tx, run_id).await?;
        tx.commit().await?;
        Ok(Some(events))
    }

    /// Runs newest first.
    pub async fn list_runs(
        &self,
        filter: &store::RunFilter,
        cursor: Option<store::Cursor>,
        limit: i64,
    ) -> Result<Vec<store::RunRow>, EngineError> {
        Ok(store::list_runs(&self.inner.pool, filter, cursor, limit).await?)
    }

    /// Deletes up to `batch` runs that reached a terminal status before `cutoff`, with their
    /// steps and execution log, and returns how many. One short statement that skips runs
    /// locked by anyone else: call it repeatedly to sweep a backlog without long locks.
    pub async fn delete_finished_runs(&self, cutoff: DateTime<Utc>, batch: i64) -> Result<u64, EngineError> {
        let deleted = store::delete_finished_before(&self.inner.worker_pool, cutoff, batch).await?;
        metrics::counter!(metrics_names::RUNS_DELETED).increment(deleted);
        Ok(deleted)
    }

    /// Asks to cancel a `pending` or `running` run: it stops after the attempt in flight and
    /// compensates, ending `cancelled`. Recorded in the log with the operator's identity.
    pub async fn cancel(&self, run_id: Uuid, operator: &str) -> Result<(), EngineError> {
        self.cancel_as(run_id, operator.into()).await
    }

    /// [`Engine::cancel`] by `actor` (an operator within a bulk action, say).
    pub async fn cancel_as(&self, run_id: Uuid, operator: machine::Actor<'_>) -> Result<(), EngineError> {
        let mut tx = self.inner.pool.begin().await?;
        let run = store::run_for_update(&mut tx, run_id)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        let wf = self.run_workflow(&run)?;
        let steps = store::steps_of(&mut *tx, run_id).await?;
        let old = store::run_state(&run, &steps);
        let mut state = old.clone();
        let transition = Machine::new(&wf, &run.input)
            .request_cancel(&mut state, operator, self.now())
            .map_err(|e| EngineError::NotAllowed {
                action: "cancel",
                status: e.0,
            })?;
        if transition.events.is_empty() {
            return Ok(());
        }
        let change = apply::Change {
            // The operator holds no lease: leave the owner's alone, make an unleased run due.
            lease: Some(store::LeaseWrite::Wake(self.now())),
            ..apply::Change::of_row(&run, &wf, &old, &state, &transition)
        };
        let after = applied_by_operator(apply::apply(&mut tx, change, None).await, "cancel", run_id)?;
        store::record_action(
            &mut tx,
            &store::OperatorAction::on_run(operator, "run.cancel", run_id, json!({})),
        )
        .await?;
        tx.commit().await?;
        after.publish(&self.inner);
        Ok(())
    }

    /// An operator's retry: a `failed` run resumes the compensation that gave up, with a
    /// fresh budget of attempts; a `compensated` or `cancelled` run is started again as a new
    /// run with the same input, linked both ways.
    pub async fn retry(&self, run_id: Uuid, operator: &str) -> Result<Retried, EngineError> {
        self.retry_as(run_id, operator.into()).await
    }

    /// [`Engine::retry`] by `actor` (an operator within a bulk action, say).
    pub async fn retry_as(&self, run_id: Uuid, operator: machine::Actor<'_>) -> Result<Retried, EngineError> {
        let mut tx = self.inner.pool.begin().await?;
        let run = store::run_for_update(&mut tx, run_id)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        let action = run.status.retry_action().ok_or(EngineError::NotAllowed {
            action: "retry",
            status: run.status,
        })?;
        match action {
            RetryAction::Resume => {
                let wf = self.run_workflow(&run)?;
                let steps = store::steps_of(&mut *tx, run_id).await?;
                let old = store::run_state(&run, &steps);
                let mut state = old.clone();
                let transition = Machine::new(&wf, &run.input)
                    .operator_retry(&mut state, operator, self.now())
                    .map_err(|e| EngineError::NotAllowed {
                        action: "retry",
                        status: e.0,
                    })?;
                let change = apply::Change::of_row(&run, &wf, &old, &state, &transition);
                let after = applied_by_operator(apply::apply(&mut tx, change, None).await, "retry", run_id)?;
                store::record_action(
                    &mut tx,
                    &store::OperatorAction::on_run(operator, "run.retry", run_id, json!({"resumed": true})),
                )
                .await?;
                tx.commit().await?;
                after.publish(&self.inner);
                Ok(Retried::Resumed(run_id))
            }
            RetryAction::NewRun => {
                if let Some(by) = run.retried_by {
                    return Err(EngineError::AlreadyRetried { run: run_id, by });
                }
                let wf = self
                    .inner
                    .latest(&run.workflow)
                    .ok_or_else(|| EngineError::UnknownWorkflow(run.workflow.clone()))?;
                let prepared = self.prepare_run(
                    &wf,
                    &run.input,
                    None,
                    Trigger::Retry,
                    Some(run_id),
                    operator.detail(json!({})),
                    None,
                );
                let mut prepared = prepared;
                let Some(inserted) = self.insert_prepared(&mut tx, &mut prepared).await? else {
                    return Err(EngineError::Internal("the retry's run could not be inserted".into()));
                };
                let new_id = prepared.id;
                store::link_successor(
                    &mut tx,
                    run_id,
                    new_id,
                    EventKind::OperatorRetry,
                    &operator.detail(json!({"action": "new_run", "new_run": new_id})),
                )
                .await?;
                store::record_action(
                    &mut tx,
                    &store::OperatorAction::on_run(operator, "run.retry", run_id, json!({"new_run": new_id})),
                )
                .await?;
                tx.commit().await?;
                self.inner.changes.touch(run_id);
                self.inner.changes.touch(new_id);
                self.start_prepared(prepared, inserted);
                Ok(Retried::NewRun(new_id))
            }
        }
    }

    fn run_workflow(&self, run: &store::RunRow) -> Result<Arc<Workflow>, EngineError> {
        self.inner
            .workflow(&run.workflow, run.workflow_version)
            .ok_or_else(|| EngineError::UnknownWorkflow(format!("{}@{}", run.workflow, run.workflow_version)))
    }
}

/// An operator's change, applied on the run's row locked `FOR UPDATE`: nothing can have moved
/// it since it was read, so anything but written is a broken invariant.
pub(crate) fn applied_by_operator(
    applied: Result<apply::Applied, apply::ApplyError>,
    action: &str,
    run_id: Uuid,
) -> Result<apply::AfterCommit, EngineError> {
    match applied {
        Ok(apply::Applied::Written(after)) => Ok(after),
        Ok(other) => Err(EngineError::Internal(format!(
            "{action} of run {run_id} was not applied: {other:?}"
        ))),
        Err(apply::ApplyError::Database(e)) => Err(e.into()),
        Err(e @ apply::ApplyError::FinishHook(_)) => Err(EngineError::Internal(e.to_string())),
    }
}

/// A run ready to insert (and, when leased to our worker, to start).
pub(crate) struct PreparedRun {
    id: Uuid,
    workflow: Arc<Workflow>,
    input: Value,
    subject: Option<String>,
    key: Option<String>,
    trigger: Trigger,
    retry_of: Option<Uuid>,
    state: RunState,
    marks: std::collections::BTreeMap<usize, machine::TimeMark>,
    events: Vec<NewEvent>,
    /// The engine clock's time when it was prepared: when an unleased run is due.
    now: DateTime<Utc>,
    /// Set when the run is leased to this instance's worker in its insert (until its
    /// executor takes it).
    local: Option<LocalStart>,
    /// The worker it is leased to in its insert, if any.
    owner: Option<i32>,
    /// With `local`: the state before the local claim and how many log entries preceded it,
    /// for a run that cannot start in its insert after all (its workflow is paused).
    unstarted: Option<(RunState, usize)>,
}

impl PreparedRun {
    /// Counts the run as started, once it is inserted.
    fn count_started(&self) {
        metrics::counter!(metrics_names::RUNS_STARTED, "workflow" => self.workflow.name.clone(), "trigger" => self.trigger.as_str()).increment(1);
    }

    /// Undoes the local claim: the run is inserted unstarted (its worker slot is given back).
    fn unstart(&mut self) {
        if let Some((state, events)) = self.unstarted.take() {
            self.state = state;
            self.events.truncate(events);
            self.marks.clear();
        }
        self.local = None;
        self.owner = None;
    }
}

/// A run leased to this instance's worker in its insert: the slot it will run in and what
/// the claim decided.
struct LocalStart {
    worker: Arc<WorkerShared>,
    slot: tokio::sync::OwnedSemaphorePermit,
    next: Next,
}

/// The answer to a trigger whose key is taken: the same run for the same kind of trigger and
/// the same input; otherwise a refusal saying which.
fn replay(existing: store::RunRow, key: &str, input: &Value, trigger: Trigger) -> Result<Triggered, EngineError> {
    if existing.trigger != trigger {
        Err(EngineError::IdempotencyKeyTaken {
            key: key.to_string(),
            run: existing.id,
            owner: existing.trigger,
            requested: trigger,
        })
    } else if &existing.input == input {
        Ok(Triggered {
            run_id: existing.id,
            created: false,
            accepted: existing,
        })
    } else {
        Err(EngineError::IdempotencyConflict {
            key: key.to_string(),
            run: existing.id,
        })
    }
}

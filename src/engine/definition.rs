//! Workflow definitions: named, versioned, ordered plans of steps, known before a run starts.
//!
//! A step is a type implementing [`Step`] (and [`Compensate`] when it can be undone). It is
//! handed a [`StepContext`] to read the workflow input and earlier steps' outputs and to get
//! the run's database transaction: what a step writes there commits together with its
//! recorded outcome, so its effect happens exactly once.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::retry::RetryPolicy;
use super::state::{StepError, StepState};
use super::status::{RunStatus, WaitKind};

impl From<serde_json::Error> for StepError {
    fn from(error: serde_json::Error) -> Self {
        Self::permanent(format!("invalid data: {error}"))
    }
}

/// Which half of a step is running: its invoke or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The forward action.
    Invoke,
    /// Undoing it.
    Compensate,
}

impl Phase {
    /// `invoke` or `compensate`, as used in idempotency keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invoke => "invoke",
            Self::Compensate => "compensate",
        }
    }
}

/// A read-only view of a run: its input and the outputs its steps recorded so far.
#[derive(Clone, Copy)]
pub struct RunView<'a> {
    pub(crate) input: &'a Value,
    pub(crate) plan: &'a [StepDef],
    pub(crate) states: &'a [StepState],
}

impl<'a> RunView<'a> {
    /// The workflow input as JSON.
    pub fn input_value(&self) -> &'a Value {
        self.input
    }

    /// The workflow input, deserialized.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        T::deserialize(self.input).map_err(|e| StepError::permanent(format!("invalid workflow input: {e}")))
    }

    /// The recorded output of an earlier step, as JSON (None if it has none, e.g. skipped).
    pub fn output_value(&self, step: &str) -> Option<&'a Value> {
        let index = self.plan.iter().position(|s| s.name == step)?;
        self.states.get(index)?.output.as_ref()
    }

    /// Every recorded output so far, by step name, in plan order.
    pub fn outputs(&self) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
        self.plan
            .iter()
            .zip(self.states.iter())
            .filter_map(|(def, state)| Some((def.name.as_str(), state.output.as_ref()?)))
    }

    /// The recorded output of an earlier step, deserialized; an error if it has none.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let value = self
            .output_value(step)
            .ok_or_else(|| StepError::permanent(format!("step `{step}` has no recorded output")))?;
        T::deserialize(value).map_err(|e| StepError::permanent(format!("invalid output of step `{step}`: {e}")))
    }
}

/// The run's database transaction, begun the first time a step asks for it. The engine
/// records the step's outcome in it and commits both together.
pub(crate) struct StepTransaction {
    pool: PgPool,
    tx: Option<Transaction<'static, Postgres>>,
}

impl StepTransaction {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool, tx: None }
    }

    /// The transaction of a batch the step's segment takes part in.
    pub(crate) fn open(pool: PgPool, tx: Transaction<'static, Postgres>) -> Self {
        Self { pool, tx: Some(tx) }
    }

    pub(crate) async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        if self.tx.is_none() {
            self.tx = Some(self.pool.begin().await?);
        }
        match self.tx.as_mut() {
            Some(tx) => Ok(&mut **tx),
            None => Err(sqlx::Error::PoolClosed),
        }
    }

    pub(crate) fn take(&mut self) -> Option<Transaction<'static, Postgres>> {
        self.tx.take()
    }
}

/// What a step attempt sees: which run and attempt it is, the input, earlier outputs, and
/// the run's transaction.
pub struct StepContext<'a> {
    pub(crate) engine: &'a super::Engine,
    pub(crate) run_id: Uuid,
    pub(crate) workflow: &'a str,
    pub(crate) version: i32,
    pub(crate) step: &'a str,
    pub(crate) deadline: Option<chrono::DateTime<chrono::Utc>>,
    pub(crate) phase: Phase,
    pub(crate) attempt: u32,
    pub(crate) view: RunView<'a>,
    pub(crate) tx: &'a mut StepTransaction,
    /// Set by [`StepContext::complete_later`]: the attempt was accepted, not finished.
    pub(crate) later: Option<Value>,
}

impl<'a> StepContext<'a> {
    /// The engine running the step, for steps that act on the engine itself (the retention
    /// sweep deletes old runs through it).
    pub fn engine(&self) -> &super::Engine {
        self.engine
    }

    /// The run's id.
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// The workflow's name.
    pub fn workflow(&self) -> &str {
        self.workflow
    }

    /// The workflow version the run uses.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// The step's name.
    pub fn step(&self) -> &str {
        self.step
    }

    /// When this attempt times out (wall-clock time), if its step has a timeout.
    pub fn deadline(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.deadline
    }

    /// Invoke or compensate.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The attempt number, from 1 (counted separately for invoke and compensate).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A key that is the same for every attempt of this step's invoke (or compensation) in
    /// this run: hand it to external services so a repeated attempt is not applied twice.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}:{}", self.run_id, self.step, self.phase.as_str())
    }

    /// The run's input and the outputs recorded so far.
    pub fn view(&self) -> RunView<'a> {
        self.view
    }

    /// The workflow input, deserialized.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        self.view.input()
    }

    /// The recorded output of an earlier step, deserialized.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        self.view.output(step)
    }

    /// The run's database transaction. Writes made here commit atomically with the step's
    /// recorded outcome, or not at all.
    pub async fn db(&mut self) -> Result<&mut PgConnection, StepError> {
        self.tx.connection().await.map_err(StepError::from)
    }

    /// Says that this attempt was accepted and will be completed from outside, like
    /// Temporal's `ErrResultPending`: the step then waits, holding no lease and no worker
    /// slot, for `POST /v1/runs/{id}/steps/{step}/complete` naming this attempt (or
    /// [`crate::engine::Engine::complete_step`]), until the deadline its
    /// [`StepDef::asynchronous`] declaration gives. Whatever the attempt then returns is
    /// ignored (an error still fails it). `accepted` (e.g. the participant's 202 answer) is
    /// kept as the step's partial work: should the wait end without success, the step's
    /// compensation receives it, since the participant may have done the work.
    ///
    /// Only a step declared [`StepDef::asynchronous`] may complete later; any other attempt
    /// that asks fails permanently, saying so.
    pub fn complete_later(&mut self, accepted: Value) {
        self.later = Some(accepted);
    }
}

/// What a compensation undoes.
#[derive(Debug, Clone, PartialEq)]
pub enum Completed<O> {
    /// The step succeeded with this output.
    Output(O),
    /// The step failed after recording this partial work ([`StepError::with_partial`]).
    Partial(Value),
}

/// A step's forward action. `Output` is recorded and readable by later steps.
#[async_trait]
pub trait Step: Send + Sync + 'static {
    /// What the step records when it succeeds.
    type Output: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Performs the step. Called again on a retry and after a crash (at least once); writes
    /// through [`StepContext::db`] take effect exactly once.
    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Self::Output, StepError>;
}

/// The compensation of a step: undoes what [`Step::invoke`] did.
#[async_trait]
pub trait Compensate: Step {
    /// Undoes the step. Runs only for a step that succeeded (or recorded partial work).
    async fn compensate(&self, ctx: &mut StepContext<'_>, done: Completed<Self::Output>) -> Result<(), StepError>;
}

/// One run's item in a call of a [`BatchStep`]: which run and attempt it is, and what the
/// run has so far (its input and earlier outputs).
#[derive(Clone, Copy)]
pub struct BatchItem<'a> {
    pub(crate) run_id: Uuid,
    pub(crate) attempt: u32,
    pub(crate) view: RunView<'a>,
}

impl<'a> BatchItem<'a> {
    /// The run this item is for.
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// Which attempt of the step this is for the run (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The run's input and earlier outputs.
    pub fn view(&self) -> RunView<'a> {
        self.view
    }

    /// The workflow input, deserialized.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        self.view.input()
    }

    /// The recorded output of an earlier step of this run, deserialized.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        self.view.output(step)
    }
}

/// The set-based form of a local step: one call does the step for several runs at once, on
/// one transaction, typically with one statement per statement of [`Step::invoke`] (the
/// design study's O8). The engine calls it for a cohort of runs that it drives through
/// their steps in lockstep (see `engine::executor::cohort`); a run alone runs `invoke`.
///
/// The contract, which the engine relies on and the form's tests should hold it to: the
/// answer for each item, in order, and what the call leaves in the database, equal what
/// [`Step::invoke`] gives and leaves when called for the items one after another, in order,
/// on one transaction. An item's failure is its own `Err` in the answer, never an error of
/// the call, unless the call itself failed (the database); should any item fail, the engine
/// rolls back the whole cohort and runs each run on its own, so a failure is recorded
/// exactly as without batching. Only a local step may have one (`StepDef::batch`).
#[async_trait]
pub trait BatchStep: Step {
    /// Performs the step for every item: one answer per item, in order.
    async fn invoke_batch(
        &self,
        db: &mut PgConnection,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<Result<Self::Output, StepError>>, StepError>;
}

/// A batch form with its types erased, as the executor calls it.
#[async_trait]
pub(crate) trait DynBatch: Send + Sync {
    async fn invoke_batch(
        &self,
        db: &mut PgConnection,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<Result<Value, StepError>>, StepError>;
}

struct Batched<S>(S);

#[async_trait]
impl<S: BatchStep> DynBatch for Batched<S> {
    async fn invoke_batch(
        &self,
        db: &mut PgConnection,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<Result<Value, StepError>>, StepError> {
        let answers = self.0.invoke_batch(db, items).await?;
        Ok(answers
            .into_iter()
            .map(|answer| answer.and_then(|output| Ok(serde_json::to_value(output)?)))
            .collect())
    }
}

/// The batch form of a hook point's no-op.
#[async_trait]
impl DynBatch for NoOpHook {
    async fn invoke_batch(
        &self,
        _db: &mut PgConnection,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<Result<Value, StepError>>, StepError> {
        Ok(items.iter().map(|_| Ok(Value::Null)).collect())
    }
}

/// A step with its types erased, as the executor calls it.
#[async_trait]
pub(crate) trait DynStep: Send + Sync {
    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Value, StepError>;
    async fn compensate(&self, ctx: &mut StepContext<'_>, done: Completed<Value>) -> Result<(), StepError>;
    fn has_compensation(&self) -> bool;
}

struct InvokeOnly<S>(S);

#[async_trait]
impl<S: Step> DynStep for InvokeOnly<S> {
    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Value, StepError> {
        let output = self.0.invoke(ctx).await?;
        Ok(serde_json::to_value(output)?)
    }

    async fn compensate(&self, _ctx: &mut StepContext<'_>, _done: Completed<Value>) -> Result<(), StepError> {
        Ok(())
    }

    fn has_compensation(&self) -> bool {
        false
    }
}

struct WithCompensation<S>(S);

#[async_trait]
impl<S: Compensate> DynStep for WithCompensation<S> {
    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Value, StepError> {
        let output = self.0.invoke(ctx).await?;
        Ok(serde_json::to_value(output)?)
    }

    async fn compensate(&self, ctx: &mut StepContext<'_>, done: Completed<Value>) -> Result<(), StepError> {
        let typed = match done {
            Completed::Output(value) => Completed::Output(
                S::Output::deserialize(value)
                    .map_err(|e| StepError::permanent(format!("recorded output cannot be read back: {e}")))?,
            ),
            Completed::Partial(value) => Completed::Partial(value),
        };
        self.0.compensate(ctx, typed).await
    }

    fn has_compensation(&self) -> bool {
        true
    }
}

/// A hook point's default: does nothing, records nothing.
struct NoOpHook;

#[async_trait]
impl DynStep for NoOpHook {
    async fn invoke(&self, _ctx: &mut StepContext<'_>) -> Result<Value, StepError> {
        Ok(Value::Null)
    }

    async fn compensate(&self, _ctx: &mut StepContext<'_>, _done: Completed<Value>) -> Result<(), StepError> {
        Ok(())
    }

    fn has_compensation(&self) -> bool {
        false
    }
}

/// The code of a step that only waits (a signal or a sleep): the engine never invokes it.
struct WaitOnly;

#[async_trait]
impl DynStep for WaitOnly {
    async fn invoke(&self, _ctx: &mut StepContext<'_>) -> Result<Value, StepError> {
        Err(StepError::permanent("a wait step has no code to invoke"))
    }

    async fn compensate(&self, _ctx: &mut StepContext<'_>, _done: Completed<Value>) -> Result<(), StepError> {
        Ok(())
    }

    fn has_compensation(&self) -> bool {
        false
    }
}

/// The code behind a step or a hook point, ready to register.
#[derive(Clone)]
pub struct Handler {
    pub(crate) code: Arc<dyn DynStep>,
    /// Every effect of the code goes through the step's transaction (see [`Handler::local`]).
    local: bool,
    /// The code's set-based form, if it has one (see [`BatchStep`]).
    pub(crate) batch: Option<Arc<dyn DynBatch>>,
}

impl Handler {
    /// A handler without compensation.
    pub fn new<S: Step>(step: S) -> Self {
        Self {
            code: Arc::new(InvokeOnly(step)),
            local: false,
            batch: None,
        }
    }

    /// A handler with its compensation.
    pub fn compensable<S: Compensate>(step: S) -> Self {
        Self {
            code: Arc::new(WithCompensation(step)),
            local: false,
            batch: None,
        }
    }

    fn no_op() -> Self {
        Self {
            code: Arc::new(NoOpHook),
            local: true,
            batch: Some(Arc::new(NoOpHook)),
        }
    }

    fn wait_only() -> Self {
        Self {
            code: Arc::new(WaitOnly),
            local: false,
            batch: None,
        }
    }

    /// Declares that every effect of this code (invoke and compensation) goes through the
    /// step's transaction, `ctx.db()`: nothing outside the database is touched, so running it
    /// again after a rollback is harmless, and it is short. The engine may then run it in one
    /// transaction with the run's neighbouring local steps (a fused segment, committed all or
    /// nothing). Declare it only when true: a local step that calls a service would call it
    /// again for every rolled-back segment.
    pub fn local(mut self) -> Self {
        self.local = true;
        self
    }

    /// Whether the code was declared local (the no-op of a hook point is).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// Gives the code its set-based form, `form`: the same step's [`BatchStep`] (for a type
    /// that implements both, the same value again). Only a local handler may have one: a
    /// workflow with a non-local step that has one is refused when built.
    pub fn batch<S: BatchStep>(mut self, form: S) -> Self {
        self.batch = Some(Arc::new(Batched(form)));
        self
    }

    /// Whether the code has a set-based form (the no-op of a hook point has).
    pub fn is_batched(&self) -> bool {
        self.batch.is_some()
    }

    /// Whether this handler can undo what it did.
    pub fn has_compensation(&self) -> bool {
        self.code.has_compensation()
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("has_compensation", &self.has_compensation())
            .field("local", &self.local)
            .field("batched", &self.is_batched())
            .finish()
    }
}

/// What a step waits for (DESIGN.md §9). Every wait ends by a deadline.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitFor {
    /// A signal of this name, for at most `timeout` from when the wait begins.
    Signal {
        /// The signal's name (`POST /v1/runs/{id}/signals/{name}`).
        name: String,
        /// How long the step waits at most.
        timeout: Duration,
    },
    /// The completion from outside of an attempt that asked to complete later
    /// ([`StepContext::complete_later`]).
    Completion {
        /// How long after the attempt was accepted it may complete at most.
        timeout: Duration,
        /// With it, the participant must also heartbeat at least this often
        /// (`POST /v1/runs/{id}/steps/{step}/heartbeat`), or the wait times out sooner.
        heartbeat_timeout: Option<Duration>,
    },
    /// Time passing: the step succeeds (with a null output) once it has.
    Sleep(Duration),
    /// Until the moment (RFC 3339) found at this JSON pointer of the input; a moment that
    /// has passed ends the sleep at once. Checked at trigger: an input without a valid time
    /// there, or with one past the ceiling on waits, is refused.
    SleepUntil(String),
}

impl WaitFor {
    /// The kind of wait, as the run's `waiting.kind` says it.
    pub fn kind(&self) -> WaitKind {
        match self {
            Self::Signal { .. } => WaitKind::Signal,
            Self::Completion { .. } => WaitKind::Completion,
            Self::Sleep(_) | Self::SleepUntil(_) => WaitKind::Sleep,
        }
    }

    /// The longest the wait may last, where the declaration fixes it (not for a sleep until
    /// a moment of the input, checked at trigger).
    pub fn longest(&self) -> Option<Duration> {
        match self {
            Self::Signal { timeout, .. } | Self::Completion { timeout, .. } => Some(*timeout),
            Self::Sleep(d) => Some(*d),
            Self::SleepUntil(_) => None,
        }
    }
}

/// What a signal wait or a completion wait does when its deadline passes with nothing
/// received. (A sleep's deadline is simply its end.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The step fails permanently, so the run compensates (the default).
    #[default]
    Fail,
    /// The step succeeds with a null output and the run goes on.
    Continue,
}

/// A step's wait: what for, and what its deadline does.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitDef {
    /// What the step waits for.
    pub what: WaitFor,
    /// What happens at the deadline.
    pub on_timeout: OnTimeout,
}

/// The moment (RFC 3339) at `pointer` in `input`, for a sleep until it.
pub fn moment_at(input: &Value, pointer: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let found = input
        .pointer(pointer)
        .ok_or_else(|| format!("the input has no time at `{pointer}`"))?;
    let text = found
        .as_str()
        .ok_or_else(|| format!("`{pointer}` must be an RFC 3339 time, e.g. \"2030-01-01T12:00:00Z\""))?;
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("`{pointer}` is not an RFC 3339 time (`{text}`): {e}"))
}

/// A condition deciding whether a step runs (false: the step is `skipped`).
pub type WhenCondition = Arc<dyn Fn(&RunView<'_>) -> bool + Send + Sync>;

/// One step of a workflow's plan.
#[derive(Clone)]
pub struct StepDef {
    pub(crate) name: String,
    pub(crate) handler: Handler,
    /// A hook point: the embedding application may replace the handler.
    pub(crate) hook: bool,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
    pub(crate) when: Option<WhenCondition>,
    /// What the step calls, for operators (an HTTP step's endpoint and path).
    pub(crate) target: Option<String>,
    /// What the step waits for, if it waits.
    pub(crate) wait: Option<WaitDef>,
}

impl StepDef {
    /// A step without compensation.
    pub fn new<S: Step>(name: impl Into<String>, step: S) -> Self {
        Self::with_handler(name, Handler::new(step))
    }

    /// A step with a compensation.
    pub fn compensable<S: Compensate>(name: impl Into<String>, step: S) -> Self {
        Self::with_handler(name, Handler::compensable(step))
    }

    /// A hook point: a no-op unless the embedding application registers a handler for it
    /// (with [`crate::engine::EngineBuilder::hook`]).
    pub fn hook(name: impl Into<String>) -> Self {
        let mut def = Self::with_handler(name, Handler::no_op());
        def.hook = true;
        def
    }

    /// A step whose code is `handler` (built with [`Handler::new`] or
    /// [`Handler::compensable`]), for plans assembled at run time.
    pub fn with_handler(name: impl Into<String>, handler: Handler) -> Self {
        Self {
            name: name.into(),
            handler,
            hook: false,
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::attempts(5),
            timeout: None,
            when: None,
            target: None,
            wait: None,
        }
    }

    /// A step that waits for the signal `signal` (DESIGN.md §9), at most `timeout`; the
    /// signal's payload becomes its output. A signal sent before the run gets here is kept,
    /// and each signal is consumed by one wait.
    pub fn signal(name: impl Into<String>, signal: impl Into<String>, timeout: Duration) -> Self {
        Self::waiting(
            name,
            WaitFor::Signal {
                name: signal.into(),
                timeout,
            },
        )
    }

    /// A step that sleeps for `duration`, durably (a restart does not shorten or reset it).
    pub fn sleep(name: impl Into<String>, duration: Duration) -> Self {
        Self::waiting(name, WaitFor::Sleep(duration))
    }

    /// A step that sleeps until the RFC 3339 moment at `pointer` in the input.
    pub fn sleep_until(name: impl Into<String>, pointer: impl Into<String>) -> Self {
        Self::waiting(name, WaitFor::SleepUntil(pointer.into()))
    }

    fn waiting(name: impl Into<String>, what: WaitFor) -> Self {
        let mut def = Self::with_handler(name, Handler::wait_only());
        // A wait is never an attempt to repeat: its deadline decides.
        def.retry = RetryPolicy::none();
        def.wait = Some(WaitDef {
            what,
            on_timeout: OnTimeout::Fail,
        });
        def
    }

    /// Declares that an attempt may complete later ([`StepContext::complete_later`]), from
    /// outside, within `timeout` of being accepted and, if `heartbeat_timeout` is given,
    /// within that long of its last heartbeat.
    pub fn asynchronous(mut self, timeout: Duration, heartbeat_timeout: Option<Duration>) -> Self {
        self.wait = Some(WaitDef {
            what: WaitFor::Completion {
                timeout,
                heartbeat_timeout,
            },
            on_timeout: self.wait.map(|w| w.on_timeout).unwrap_or_default(),
        });
        self
    }

    /// What a signal or completion wait does at its deadline (default: fail).
    pub fn on_timeout(mut self, on_timeout: OnTimeout) -> Self {
        if let Some(wait) = &mut self.wait {
            wait.on_timeout = on_timeout;
        }
        self
    }

    /// What the step waits for, if it waits.
    pub fn wait(&self) -> Option<&WaitDef> {
        self.wait.as_ref()
    }

    /// Whether the step only waits (a signal or a sleep: no code of its own).
    pub fn only_waits(&self) -> bool {
        self.wait
            .as_ref()
            .is_some_and(|w| !matches!(w.what, WaitFor::Completion { .. }))
    }

    /// Declares the step local (see [`Handler::local`]): all its effects go through
    /// `ctx.db()`, so it may share one transaction with the run's neighbouring local steps.
    pub fn local(mut self) -> Self {
        self.handler = self.handler.local();
        self
    }

    /// Whether the step is local: declared so, or a hook point with no handler registered.
    pub fn is_local(&self) -> bool {
        self.handler.is_local()
    }

    /// Gives the step its set-based form (see [`Handler::batch`] and [`BatchStep`]): the
    /// engine may then run it for a cohort of runs in one call.
    pub fn batch<S: BatchStep>(mut self, form: S) -> Self {
        self.handler = self.handler.batch(form);
        self
    }

    /// Whether the step has a set-based form (a hook point with no handler registered has).
    pub fn is_batched(&self) -> bool {
        self.handler.is_batched()
    }

    /// Says what the step calls (shown to operators), e.g. `shop POST /stock/reserve`.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// What the step calls, if it said.
    pub fn calls(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// Sets the retry policy of the step's invoke.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the retry policy of the step's compensation.
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// Fails an attempt (retryably) that takes longer than this.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Runs the step only when `condition` holds for the input and earlier outputs.
    pub fn when(mut self, condition: impl Fn(&RunView<'_>) -> bool + Send + Sync + 'static) -> Self {
        self.when = Some(Arc::new(condition));
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the step can be undone.
    pub fn has_compensation(&self) -> bool {
        self.handler.has_compensation()
    }

    /// Whether this is a hook point.
    pub fn is_hook(&self) -> bool {
        self.hook
    }

    /// The invoke's retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The compensation's retry policy.
    pub fn compensation_retry_policy(&self) -> &RetryPolicy {
        &self.compensation_retry
    }

    /// The per-attempt timeout, if any.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Whether the step has a `when` condition.
    pub fn is_conditional(&self) -> bool {
        self.when.is_some()
    }
}

impl fmt::Debug for StepDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepDef")
            .field("name", &self.name)
            .field("hook", &self.hook)
            .field("has_compensation", &self.has_compensation())
            .field("local", &self.is_local())
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why a workflow input was refused: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    /// The JSON path of the offending field (`customerData.email`), or `.` for the whole input.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl InputError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks beyond the shape of a typed input (e.g. that an email is valid).
pub trait ValidateInput {
    /// Returns the first problem found.
    fn validate(&self) -> Result<(), InputError>;
}

/// Deserializes `value` as `T`, naming the offending field on failure.
pub fn parse_input<T: DeserializeOwned>(value: &Value) -> Result<T, InputError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        // serde reports a missing field at its parent; name the field itself.
        let field = match inner.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            Some(missing) if path == "." => missing.to_string(),
            Some(missing) => format!("{path}.{missing}"),
            None => path,
        };
        InputError { field, message: inner }
    })
}

type InputCheck = Arc<dyn Fn(&Value) -> Result<(), InputError> + Send + Sync>;
type SubjectFn = Arc<dyn Fn(&Value) -> Option<String> + Send + Sync>;
type OutputFn = Arc<dyn Fn(&RunView<'_>) -> Value + Send + Sync>;

/// Work a workflow does in the same transaction as its run's final status change
/// (e.g. releasing or discarding the events its steps held in an outbox).
#[async_trait]
pub trait FinishHook: Send + Sync + 'static {
    /// Called once per run, inside the transaction that records `status` (terminal).
    async fn on_finish(&self, db: &mut PgConnection, run_id: Uuid, status: RunStatus) -> Result<(), StepError>;

    /// [`FinishHook::on_finish`] for several runs finishing in one transaction (a cohort of
    /// batched runs), each with its status: what it leaves must equal what `on_finish` leaves
    /// called for each in order. By default it calls `on_finish` for each; a hook whose work
    /// has a set-based form should override it.
    async fn on_finish_batch(&self, db: &mut PgConnection, runs: &[(Uuid, RunStatus)]) -> Result<(), StepError> {
        for &(run_id, status) in runs {
            self.on_finish(db, run_id, status).await?;
        }
        Ok(())
    }
}

/// Who may start runs of a workflow. The engine does not authenticate anyone; it records the
/// workflow's level so that every front end (the API, the dashboard) refuses the same callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Any caller that may trigger runs (backends with the API token).
    #[default]
    Api,
    /// Operators only: maintenance that can destroy history, such as `retention-sweep`.
    Admin,
}

/// Where a workflow comes from: compiled into the server, or defined as data (a JSON
/// definition stored in the database, whose steps call a backend's HTTP endpoints).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Rust code registered with the engine.
    #[default]
    Builtin,
    /// A stored definition (`PUT /v1/workflow-definitions/{name}`).
    Defined,
}

/// A named, versioned, ordered plan of steps.
#[derive(Clone)]
pub struct Workflow {
    pub(crate) name: String,
    pub(crate) access: Access,
    pub(crate) source: Source,
    pub(crate) version: i32,
    pub(crate) description: String,
    pub(crate) steps: Vec<StepDef>,
    pub(crate) input_check: InputCheck,
    pub(crate) subject: Option<SubjectFn>,
    pub(crate) output: Option<OutputFn>,
    pub(crate) on_finish: Option<Arc<dyn FinishHook>>,
}

impl Workflow {
    /// Starts a definition.
    pub fn builder(name: impl Into<String>, version: i32) -> WorkflowBuilder {
        WorkflowBuilder {
            workflow: Workflow {
                name: name.into(),
                access: Access::Api,
                source: Source::Builtin,
                version,
                description: String::new(),
                steps: Vec::new(),
                input_check: Arc::new(|_| Ok(())),
                subject: None,
                output: None,
                on_finish: None,
            },
        }
    }

    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The workflow's version (runs keep the version they started with).
    pub fn version(&self) -> i32 {
        self.version
    }

    /// What the workflow is for.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Who may start its runs.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Where it comes from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// A digest of the plan's shape (each step's name, whether it compensates, whether it is
    /// a hook point, in order): what runs of this version were created with.
    pub fn plan_hash(&self) -> String {
        use sha2::Digest;
        let shape: Vec<Value> = self
            .steps
            .iter()
            .map(|s| match &s.wait {
                // Only steps that wait say so: the hashes of plans without waits stay as
                // they were recorded.
                Some(wait) => serde_json::json!([s.name, s.has_compensation(), s.is_hook(), wait.what.kind().as_str()]),
                None => serde_json::json!([s.name, s.has_compensation(), s.is_hook()]),
            })
            .collect();
        let digest = sha2::Sha256::digest(Value::Array(shape).to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The step plan, in order.
    pub fn steps(&self) -> &[StepDef] {
        &self.steps
    }

    /// Checks an input before a run is accepted.
    pub fn check_input(&self, input: &Value) -> Result<(), InputError> {
        (self.input_check)(input)
    }

    /// Checks the moments of the input that sleeps wait until: each must be an RFC 3339
    /// time, at most `ceiling` after `now` (a moment that has passed is fine: that sleep ends
    /// at once).
    pub fn check_wait_input(
        &self,
        input: &Value,
        now: chrono::DateTime<chrono::Utc>,
        ceiling: Duration,
    ) -> Result<(), InputError> {
        for step in &self.steps {
            let Some(WaitDef {
                what: WaitFor::SleepUntil(pointer),
                ..
            }) = &step.wait
            else {
                continue;
            };
            let field = pointer.trim_start_matches('/').replace('/', ".");
            let at = moment_at(input, pointer).map_err(|message| InputError::new(&field, message))?;
            let limit = chrono::Duration::from_std(ceiling).unwrap_or(chrono::Duration::MAX);
            if at - now > limit {
                return Err(InputError::new(
                    field,
                    format!(
                        "{at} is more than {} from now, beyond the ceiling on waits",
                        humantime::format_duration(ceiling)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a wait that could last longer than `ceiling` (the engine's `max_wait`).
    pub(crate) fn check_waits(&self, ceiling: Duration) -> Result<(), DefinitionError> {
        for step in &self.steps {
            let longest = step.wait.as_ref().and_then(|w| w.what.longest());
            if let Some(asked) = longest.filter(|&d| d > ceiling) {
                return Err(DefinitionError::WaitTooLong {
                    workflow: self.name.clone(),
                    step: step.name.clone(),
                    asked,
                    ceiling,
                });
            }
        }
        Ok(())
    }

    /// The step that waits for `signal`, if the plan declares one.
    pub fn declares_signal(&self, signal: &str) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(&s.wait, Some(WaitDef { what: WaitFor::Signal { name, .. }, .. }) if name == signal))
    }

    /// What operators search for and see in lists for a run with this input.
    pub fn subject_of(&self, input: &Value) -> Option<String> {
        self.subject.as_ref().and_then(|f| f(input))
    }

    /// The run's output once completed: as defined, or the last recorded step output.
    /// Whether cohorts may run this workflow's runs: every step is local and has a set-based
    /// form, so a whole run is one fused segment of batch calls.
    pub(crate) fn runs_in_cohorts(&self) -> bool {
        self.steps.iter().all(|s| s.is_local() && s.is_batched())
    }

    pub(crate) fn output_of(&self, view: &RunView<'_>) -> Value {
        if let Some(output) = &self.output {
            return output(view);
        }
        view.states
            .iter()
            .rev()
            .find_map(|s| s.output.clone())
            .unwrap_or(Value::Null)
    }
}

impl fmt::Debug for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workflow")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .finish()
    }
}

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// A workflow needs a name made of lowercase letters, digits and dashes.
    #[error("invalid workflow name `{0}`: use lowercase letters, digits and dashes")]
    InvalidName(String),
    /// A workflow needs at least one step.
    #[error("workflow `{0}` has no steps")]
    NoSteps(String),
    /// Step names identify steps within a run.
    #[error("workflow `{workflow}` has two steps named `{step}`")]
    DuplicateStep {
        /// The workflow.
        workflow: String,
        /// The repeated name.
        step: String,
    },
    /// Versions start at 1.
    #[error("workflow `{0}` has a version below 1")]
    InvalidVersion(String),
    /// The same name and version registered twice.
    #[error("workflow `{0}` version {1} is already registered")]
    AlreadyRegistered(String, i32),
    /// A wait must end by a deadline no later than the engine's ceiling on waits.
    #[error(
        "step `{step}` of workflow `{workflow}` waits up to {asked:?}, beyond the ceiling of {ceiling:?} (EngineConfig::max_wait, --max-wait)"
    )]
    WaitTooLong {
        /// The workflow.
        workflow: String,
        /// The waiting step.
        step: String,
        /// How long it would wait.
        asked: Duration,
        /// The ceiling.
        ceiling: Duration,
    },
    /// A wait of no time at all, or a signal without a name.
    #[error("step `{step}` of workflow `{workflow}` has an empty wait: {why}")]
    EmptyWait {
        /// The workflow.
        workflow: String,
        /// The waiting step.
        step: String,
        /// What is empty.
        why: &'static str,
    },
    /// Only a local step may have a set-based form: the engine rolls a cohort back whenever
    /// one of its runs fails, and runs each again on its own.
    #[error("step `{step}` of workflow `{workflow}` has a batch form but is not local")]
    BatchNotLocal {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
    },
    /// A hook was registered for a workflow or step that does not exist or is not a hook point.
    #[error("workflow `{workflow}` has no hook point `{step}`")]
    NoSuchHook {
        /// The workflow named.
        workflow: String,
        /// The step named.
        step: String,
    },
}

/// Builds a [`Workflow`].
pub struct WorkflowBuilder {
    workflow: Workflow,
}

impl WorkflowBuilder {
    /// Describes what the workflow is for (shown in the API and dashboard).
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.workflow.description = text.into();
        self
    }

    /// Where the workflow comes from (default [`Source::Builtin`]).
    pub fn source(mut self, source: Source) -> Self {
        self.workflow.source = source;
        self
    }

    /// Who may start runs (default [`Access::Api`]).
    pub fn access(mut self, access: Access) -> Self {
        self.workflow.access = access;
        self
    }

    /// Requires inputs to deserialize as `T`; a refused input names the offending field.
    pub fn input<T: DeserializeOwned + 'static>(mut self) -> Self {
        self.workflow.input_check = Arc::new(|value| parse_input::<T>(value).map(|_| ()));
        self
    }

    /// Requires inputs to deserialize as `T` and pass `T`'s own validation.
    pub fn validated_input<T: DeserializeOwned + ValidateInput + 'static>(mut self) -> Self {
        self.workflow.input_check = Arc::new(|value| parse_input::<T>(value)?.validate());
        self
    }

    /// Checks inputs with a function of your own (e.g. to require a JSON object first).
    pub fn input_check(mut self, check: impl Fn(&Value) -> Result<(), InputError> + Send + Sync + 'static) -> Self {
        self.workflow.input_check = Arc::new(check);
        self
    }

    /// What operators search for and see for a run (e.g. a customer's email).
    pub fn subject(mut self, subject: impl Fn(&Value) -> Option<String> + Send + Sync + 'static) -> Self {
        self.workflow.subject = Some(Arc::new(subject));
        self
    }

    /// Appends a step to the plan.
    pub fn step(mut self, step: StepDef) -> Self {
        self.workflow.steps.push(step);
        self
    }

    /// Computes the run's output from the recorded step outputs (default: the last one).
    pub fn output(mut self, output: impl Fn(&RunView<'_>) -> Value + Send + Sync + 'static) -> Self {
        self.workflow.output = Some(Arc::new(output));
        self
    }

    /// Work done in the same transaction as the run's final status change.
    pub fn on_finish(mut self, hook: impl FinishHook) -> Self {
        self.workflow.on_finish = Some(Arc::new(hook));
        self
    }

    /// Checks and returns the workflow.
    pub fn build(self) -> Result<Workflow, DefinitionError> {
        let wf = self.workflow;
        let valid_name = !wf.name.is_empty()
            && wf
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid_name {
            return Err(DefinitionError::InvalidName(wf.name));
        }
        if wf.version < 1 {
            return Err(DefinitionError::InvalidVersion(wf.name));
        }
        if wf.steps.is_empty() {
            return Err(DefinitionError::NoSteps(wf.name));
        }
        let mut seen = HashSet::new();
        for step in &wf.steps {
            if let Some(wait) = &step.wait {
                let empty = |why| DefinitionError::EmptyWait {
                    workflow: wf.name.clone(),
                    step: step.name.clone(),
                    why,
                };
                match &wait.what {
                    WaitFor::Signal { name, .. } if name.is_empty() => return Err(empty("the signal has no name")),
                    WaitFor::SleepUntil(pointer) if !pointer.starts_with('/') => {
                        return Err(empty("the moment's JSON pointer must start with `/`"));
                    }
                    what if what.longest().is_some_and(|d| d.is_zero()) => {
                        return Err(empty("a wait needs a deadline above zero"));
                    }
                    _ => {}
                }
            }
            if step.is_batched() && !step.is_local() {
                return Err(DefinitionError::BatchNotLocal {
                    workflow: wf.name.clone(),
                    step: step.name.clone(),
                });
            }
            if !seen.insert(step.name.as_str()) {
                return Err(DefinitionError::DuplicateStep {
                    workflow: wf.name.clone(),
                    step: step.name.clone(),
                });
            }
        }
        Ok(wf)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn partial_work_that_cannot_be_serialized_is_never_dropped() {
        // JSON object keys must be strings: this map cannot be serialized.
        let unserializable: std::collections::HashMap<(i32, i32), i32> = [((1, 2), 3)].into();
        let error = StepError::permanent("charge failed").with_partial(unserializable);
        let partial = error.partial.expect("the compensation still gets something to act on");
        assert!(partial["unrecorded"].is_string(), "{partial}");
        assert!(error.message.starts_with("charge failed"), "{}", error.message);
        assert!(
            error.message.contains("partial work could not be recorded"),
            "{}",
            error.message
        );
        let fine = StepError::permanent("charge failed").with_partial(serde_json::json!({"charged": 5}));
        assert_eq!(fine.partial, Some(serde_json::json!({"charged": 5})));
        assert_eq!(fine.message, "charge failed");
    }

    use super::*;
    use serde_json::json;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Input {
        customer: Customer,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Customer {
        email: String,
        age: u32,
    }

    #[test]
    fn input_errors_name_the_field() {
        let missing = parse_input::<Input>(&json!({"customer": {"age": 3}})).err();
        assert_eq!(missing.map(|e| e.field), Some("customer.email".to_string()));
        let wrong_type = parse_input::<Input>(&json!({"customer": {"email": "a", "age": "x"}})).err();
        assert_eq!(wrong_type.map(|e| e.field), Some("customer.age".to_string()));
        let top = parse_input::<Input>(&json!({})).err();
        assert_eq!(top.map(|e| e.field), Some("customer".to_string()));
        assert!(parse_input::<Input>(&json!({"customer": {"email": "a", "age": 3}})).is_ok());
    }

    struct Nothing;

    #[async_trait]
    impl Step for Nothing {
        type Output = ();
        async fn invoke(&self, _ctx: &mut StepContext<'_>) -> Result<(), StepError> {
            Ok(())
        }
    }

    #[async_trait]
    impl BatchStep for Nothing {
        async fn invoke_batch(
            &self,
            _db: &mut PgConnection,
            items: &[BatchItem<'_>],
        ) -> Result<Vec<Result<(), StepError>>, StepError> {
            Ok(items.iter().map(|_| Ok(())).collect())
        }
    }

    /// Only a local step may have a batch form: a cohort rolls back and runs again whatever
    /// its steps did. A workflow runs in cohorts when every step has one (a hook point's
    /// no-op has), and not once a step lacks it.
    #[test]
    fn a_batch_form_needs_a_local_step_and_cohorts_need_one_on_every_step() {
        let refused = Workflow::builder("a", 1)
            .step(StepDef::new("x", Nothing).batch(Nothing))
            .build()
            .err();
        assert_eq!(
            refused,
            Some(DefinitionError::BatchNotLocal {
                workflow: "a".into(),
                step: "x".into()
            })
        );
        let batched = Workflow::builder("a", 1)
            .step(StepDef::new("x", Nothing).local().batch(Nothing))
            .step(StepDef::hook("h"))
            .build()
            .expect("valid");
        assert!(batched.runs_in_cohorts());
        let partly = Workflow::builder("a", 1)
            .step(StepDef::new("x", Nothing).local().batch(Nothing))
            .step(StepDef::new("y", Nothing).local())
            .build()
            .expect("valid");
        assert!(!partly.runs_in_cohorts(), "a local step without a batch form");
    }

    #[test]
    fn definitions_are_checked() {
        let dup = Workflow::builder("a", 1)
            .step(StepDef::new("x", Nothing))
            .step(StepDef::new("x", Nothing))
            .build()
            .err();
        assert_eq!(
            dup,
            Some(DefinitionError::DuplicateStep {
                workflow: "a".into(),
                step: "x".into()
            })
        );
        assert_eq!(
            Workflow::builder("a", 1).build().err(),
            Some(DefinitionError::NoSteps("a".into()))
        );
        assert_eq!(
            Workflow::builder("Bad Name", 1)
                .step(StepDef::new("x", Nothing))
                .build()
                .err(),
            Some(DefinitionError::InvalidName("Bad Name".into()))
        );
        assert_eq!(
            Workflow::builder("a", 0).step(StepDef::new("x", Nothing)).build().err(),
            Some(DefinitionError::InvalidVersion("a".into()))
        );
        let ok = Workflow::builder("a", 1).step(StepDef::hook("h")).build();
        assert!(ok.is_ok_and(|w| w.steps()[0].is_hook() && !w.steps()[0].has_compensation()));
    }

    #[test]
    fn database_errors_are_classified() {
        assert!(StepError::from(sqlx::Error::PoolTimedOut).retryable);
        assert!(!StepError::from(sqlx::Error::RowNotFound).retryable);
    }
}

//! Drives one claimed run: runs the attempt the state machine asks for, records its outcome
//! together with the step's own writes in one transaction, and goes on until the run is
//! finished or handed back. Consecutive attempts of local steps run as one fused segment
//! (one transaction, one write, one commit; under load in a lane's batch, see `lane`);
//! every other attempt commits on its own. A run whose trigger waits for it can reach its
//! executor not yet inserted ([`Uninserted`]): its first segment then inserts it, in the
//! state that segment leaves it, with the segment's commit; if its workflow's steps all have
//! batch forms, it is first offered to a cohort (`cohort`), which may run it with others
//! that arrived together, one batch call per step.
//!
//! How failures are classified here (the machine decides what follows each):
//! - a step error or timeout or panic is an attempt outcome;
//! - a finish hook refusing the end an outcome led to turns that outcome into a failed
//!   attempt, and a second refusal ends the run `failed` (`Machine::refuse_finish`);
//! - losing the lease (another worker took over) stops this executor without writing;
//! - losing the database while recording leaves the outcome unknown: the executor reloads
//!   the run under its lease and the machine treats the in-flight attempt as lost.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use super::apply::{self, Applied, AppliedFirst, ApplyError, Change, Stamps, Unwritten};
use super::definition::{Completed, Phase, RunView, StepContext, StepTransaction, Workflow};
use super::faults::FaultPoint;
use super::lane::{Lanes, Seat};
use super::machine::{Conditions, Event, Machine, Next, TimeMark, Transition};
use super::state::{RunState, StepError};
use super::store;
use super::{Engine, RunDetail, metrics_names as m};

mod cohort;
pub(crate) use cohort::{Cohorts, Gathering};
pub use cohort::{DEFAULT_COHORT_RUNNERS, DEFAULT_COHORT_RUNS, MAX_COHORT_RUNS};

/// A run this worker holds the lease of, with everything needed to drive it.
pub(crate) struct RunTask {
    engine: Engine,
    worker: Arc<dyn Slot>,
    workflow: Arc<Workflow>,
    pub(crate) run_id: Uuid,
    pub(crate) epoch: i64,
    /// The run's rows as this executor's last committed write left them (`apply` keeps it
    /// up to date): a caller waiting for the run is answered from it.
    copy: RunDetail,
    state: RunState,
    next: Next,
    /// This attempt runs alone, outside any fused segment: a segment that held it was rolled
    /// back (it failed there, or the segment's write was refused), so it is tried again with
    /// its outcome recorded on its own.
    alone: Option<(usize, Phase)>,
    /// The run is not inserted yet: its first segment inserts it.
    uninserted: Option<Uninserted>,
    /// The run was offered to a cohort once (see `cohort`): whatever came of it, it goes on
    /// without one.
    cohort_tried: bool,
    /// Set on a run that goes on alone while holding its cohort runner busy: dropped once
    /// the run's next action (its first segment) is done, it frees the runner.
    holds_runner: Option<cohort::Hold>,
    _permit: OwnedSemaphorePermit,
}

/// A run its trigger left for its first segment to insert: the run is written in the state
/// that segment leaves it, with the segment's commit, and the trigger is answered once that
/// commit is done. Should the segment not be written (an attempt failed, the batch did not
/// commit, the finish hook refused), the run is inserted on its own, as its trigger would
/// have, before anything else happens; a run whose key is taken or whose workflow is paused
/// is left to its trigger's answer.
pub(crate) struct Uninserted {
    /// The run as its trigger prepared it (leased to this worker, in the claim's state).
    pub(crate) run: super::PreparedRun,
    /// When it was prepared: its entries until the segment carry that time.
    pub(crate) prepared: Instant,
    /// When the trigger's wait runs out: the segment then ends after the attempt under way,
    /// so that the answer comes no later than that attempt past it.
    pub(crate) answer_by: tokio::time::Instant,
    /// Where the trigger waits for the insert.
    pub(crate) answer: tokio::sync::oneshot::Sender<InsertAnswer>,
}

/// Why an [`Uninserted`] run was inserted on its own instead of by its first segment: the
/// `reason` of `sagaflow_runs_inserted_alone_total`, so that an operator sees how often, and
/// why, waiting triggers miss the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InsertedAlone {
    /// What the run does first cannot be fused (nothing to run in a segment).
    NotFused,
    /// An attempt of the segment failed: it runs again alone, recorded as without fusion.
    AttemptFailed,
    /// The insert with the segment was refused: the run's key is taken or its workflow paused.
    Refused,
    /// The workflow's finish hook refused the status the segment ended the run in.
    FinishHookRefused,
    /// The database failed while the segment was written.
    Database,
    /// The segment's commit (its batch's, or its own) failed.
    NotCommitted,
}

impl InsertedAlone {
    /// The metric's label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NotFused => "not_fused",
            Self::AttemptFailed => "attempt_failed",
            Self::Refused => "refused",
            Self::FinishHookRefused => "finish_hook_refused",
            Self::Database => "database",
            Self::NotCommitted => "not_committed",
        }
    }
}

/// What the trigger of an [`Uninserted`] run is told: the run as inserted, `None` when its
/// idempotency key was taken, or why inserting it failed (the database's error, so that the
/// trigger fails as one that inserted the run itself would: 503 when the database is away).
pub(crate) type InsertAnswer = Result<Option<store::RunRow>, sqlx::Error>;

/// The most attempts one fused segment holds: a bound on the transaction's length whatever
/// the plan (a registration's five steps take five).
const MAX_SEGMENT_ATTEMPTS: usize = 32;

/// What an executor needs of the worker it runs for (implemented by the worker): the executor
/// knows nothing else of claims, heartbeats or shutdown.
pub(crate) trait Slot: Send + Sync {
    /// The worker's id: the lease owner the executor's writes are fenced by.
    fn worker_id(&self) -> i32;
    /// The worker is shutting down: start nothing new, hand the run back.
    fn is_draining(&self) -> bool;
    /// The executor is done with its run (its slot is freed when the task is dropped).
    fn run_done(&self);
    /// Where fused segments of several runs commit together, if the worker batches them.
    fn lanes(&self) -> Option<&Lanes>;
    /// Where runs go through their steps in lockstep, if the worker gathers cohorts.
    fn cohorts(&self) -> Option<&Cohorts>;
}

/// The lease a worker committed on a run, as an executor starts from it.
pub(crate) struct Lease {
    /// The run's rows as the lease committed them (the epoch every write is fenced by is
    /// the row's).
    pub(crate) copy: RunDetail,
    /// The run's state once the claim's transition was applied.
    pub(crate) state: RunState,
    /// What the claim's transition said to do.
    pub(crate) next: Next,
    /// Set when the run is not inserted yet (see [`Uninserted`]).
    pub(crate) uninserted: Option<Uninserted>,
}

impl RunTask {
    /// The executor of a run `worker` has just leased (its lease committed), in a slot of it.
    pub(crate) fn new(
        engine: Engine,
        worker: Arc<dyn Slot>,
        workflow: Arc<Workflow>,
        lease: Lease,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            engine,
            worker,
            workflow,
            run_id: lease.copy.run.id,
            epoch: lease.copy.run.lease_epoch,
            copy: lease.copy,
            state: lease.state,
            next: lease.next,
            alone: None,
            uninserted: lease.uninserted,
            cohort_tried: false,
            holds_runner: None,
            _permit: permit,
        }
    }
}

/// Why an executor stopped driving a run before it finished.
enum Stop {
    /// Another worker holds the lease now.
    Fenced,
    /// Recording failed in a way the run must be reloaded for.
    Database(String),
    /// The run was never this executor's: inserting it found its key taken or its workflow
    /// paused (it went in unstarted), or failed; its trigger was told.
    NotInserted,
}

impl RunTask {
    /// Drives the run until it finishes, is handed back, or the lease is lost.
    pub(crate) async fn drive(mut self) {
        let span = info_span!("run", run_id = %self.run_id, workflow = %self.workflow.name);
        async move {
            loop {
                if self.may_join_cohort() {
                    let worker = Arc::clone(&self.worker);
                    if let Some(cohorts) = worker.cohorts() {
                        match cohorts.join(self).await {
                            Some(cohort::Joined::Back(task)) => self = task,
                            Some(cohort::Joined::Alone(task, hold)) => {
                                self = task;
                                self.holds_runner = Some(hold);
                            }
                            // The runner stopped with the run: it was never inserted.
                            None => return,
                        }
                        continue;
                    }
                }
                let step_result = match self.next {
                    Next::Invoke(step) if self.fusable(step, Phase::Invoke) => self.segment().await,
                    Next::Compensate(step) if self.fusable(step, Phase::Compensate) => self.segment().await,
                    // Anything but a fused segment needs the run in the database first.
                    _ if self.uninserted.is_some() => self.insert_alone(InsertedAlone::NotFused).await,
                    Next::Invoke(step) => self.attempt(step, Phase::Invoke).await,
                    Next::Compensate(step) => self.attempt(step, Phase::Compensate).await,
                    Next::Await(step) => self.poll_wait(step).await,
                    Next::Release { ready_at } => {
                        debug!(%ready_at, "run handed back");
                        break;
                    }
                    Next::Pause => {
                        info!("run paused by an operator");
                        break;
                    }
                    Next::Finish(status) => {
                        // Waiters were woken and the finish counted when it committed
                        // (`apply::AfterCommit`), whichever path finished the run. A completed
                        // run is the common case: at a thousand a second, a line each would
                        // be most of the log and a write to it per run (the metrics count
                        // them); the outcomes someone may have to look at stay at info.
                        if status == super::RunStatus::Completed {
                            debug!(%status, "run finished");
                        } else {
                            info!(%status, "run finished");
                        }
                        break;
                    }
                };
                // The runner that sent this run on alone may gather again.
                self.holds_runner = None;
                match step_result {
                    Ok(()) => {}
                    Err(Stop::Fenced) => {
                        warn!("lease taken over by another worker; stopping without writing");
                        metrics::counter!(m::FENCED_WRITES).increment(1);
                        break;
                    }
                    Err(Stop::Database(error)) => {
                        if !self.resume_in_place(&error).await {
                            break;
                        }
                    }
                    Err(Stop::NotInserted) => break,
                }
            }
            self.worker.run_done();
        }
        .instrument(span)
        .await
    }

    /// Inserts an [`Uninserted`] run on its own, as its trigger would have, and answers the
    /// trigger: the executor goes on only if the run went in leased to it.
    async fn insert_alone(&mut self, why: InsertedAlone) -> Result<(), Stop> {
        let Some(mut uninserted) = self.uninserted.take() else {
            return Ok(());
        };
        metrics::counter!(m::RUNS_INSERTED_ALONE, "workflow" => self.workflow.name.clone(), "reason" => why.as_str())
            .increment(1);
        let inserted = async {
            let mut conn = self.engine.inner.worker_pool.acquire().await?;
            self.engine.insert_prepared(&mut conn, &mut uninserted.run).await
        }
        .await;
        match inserted {
            Ok(Some(inserted)) => {
                let (run, steps) = self.engine.new_run(&uninserted.run).rows(inserted);
                let _ = uninserted.answer.send(Ok(Some(run.clone())));
                self.engine.inner.changes.touch(self.run_id);
                if uninserted.run.owner.is_none() {
                    return Err(Stop::NotInserted);
                }
                self.copy = RunDetail { run, steps };
                Ok(())
            }
            Ok(None) => {
                let _ = uninserted.answer.send(Ok(None));
                Err(Stop::NotInserted)
            }
            Err(e) => {
                let _ = uninserted.answer.send(Err(e));
                Err(Stop::NotInserted)
            }
        }
    }

    /// Undoes the segment (its savepoint in a batch, or its own transaction) and, for a run not
    /// inserted yet, inserts it alone: whatever comes next needs the run in the database.
    async fn leave_segment(
        &mut self,
        seat: Option<Seat>,
        tx: Option<Transaction<'static, Postgres>>,
        why: InsertedAlone,
    ) -> Result<(), Stop> {
        discard(seat, tx).await;
        self.insert_alone(why).await
    }

    /// Whether the run may be offered to a cohort: it was not yet, it is not inserted (so no
    /// crash can have touched it), its workflow runs in cohorts, and it is at an attempt to
    /// invoke that may run fused.
    fn may_join_cohort(&self) -> bool {
        !self.cohort_tried
            && self.uninserted.is_some()
            && self.workflow.runs_in_cohorts()
            && matches!(self.next, Next::Invoke(step) if self.fusable(step, Phase::Invoke))
    }

    /// Whether the attempt of `step` in `phase` may run in a fused segment: fusion is on, the
    /// step is local, it was not set to run alone, and no injected failure is pending for it.
    fn fusable(&self, step: usize, phase: Phase) -> bool {
        let Some(def) = self.workflow.steps.get(step) else {
            return false;
        };
        self.engine.inner.config.fuse_local_steps
            && def.is_local()
            && self.alone != Some((step, phase))
            && !(phase == Phase::Invoke && self.engine.inner.faults.will_fail(&def.name))
    }

    /// One attempt on its own: run, then record its outcome with its writes in one commit.
    async fn attempt(&mut self, step: usize, phase: Phase) -> Result<(), Stop> {
        self.alone = None;
        let mut tx = StepTransaction::new(self.engine.inner.worker_pool.clone());
        let state = self.state.clone();
        let event = self.run_attempt(step, phase, &state, &mut tx).await;
        if is_failure(&event)
            && let Some(open) = tx.take()
        {
            // Whatever the failed attempt wrote is discarded.
            let _ = open.rollback().await;
        }
        let name = self.workflow.steps[step].name.clone();
        self.record(event, tx.take())
            .instrument(info_span!("step", step = %name, phase = phase.as_str()))
            .await?;
        if phase == Phase::Invoke {
            self.engine.inner.faults.checkpoint(FaultPoint::AfterCommit, &name);
        }
        Ok(())
    }

    /// Consecutive local attempts, from the one the run is at, in one transaction: each runs
    /// on it and is decided as it would be alone; then one write records every outcome (each
    /// entry and mark with the time it happened) and one commit makes all of it durable, or
    /// none. The segment ends before a step that is not local, at a retry wait, at the end of
    /// the run, at [`MAX_SEGMENT_ATTEMPTS`], or, for a run not inserted yet, after the attempt
    /// under way once its trigger's wait has run out. Should an attempt fail, the segment is rolled
    /// back and run again up to that attempt, which then runs alone: a failure is recorded
    /// exactly as without fusion, with the writes of the attempts before it committed.
    async fn segment(&mut self) -> Result<(), Stop> {
        // A run that lost an attempt may be what killed its last owner: it runs alone, so
        // that, should it do it again, it takes no batch peers with it.
        let suspect = self
            .state
            .steps
            .iter()
            .any(|s| s.lost_attempts > 0 || s.lost_compensation_attempts > 0);
        let mut seat = match self.worker.lanes() {
            Some(lanes) if !suspect => lanes.seat(self.copy.run.subject.as_deref(), self.run_id).await,
            _ => None,
        };
        // Without a seat (batching off, a full lane, no batch to open) the segment commits on
        // its own transaction, and inserts an uninserted run all the same.
        let mut tx = match seat.as_mut().and_then(Seat::take) {
            Some(open) => StepTransaction::open(self.engine.inner.worker_pool.clone(), open),
            None => StepTransaction::new(self.engine.inner.worker_pool.clone()),
        };
        let mut state = self.state.clone();
        let mut decided: Option<Transition> = None;
        let mut events_at: Vec<Instant> = Vec::new();
        let mut marks: Vec<(usize, TimeMark, Instant)> = Vec::new();
        let mut attempted: Vec<(usize, Phase)> = Vec::new();
        let mut next = self.next;
        loop {
            let (step, phase) = match next {
                Next::Invoke(step) => (step, Phase::Invoke),
                Next::Compensate(step) => (step, Phase::Compensate),
                Next::Release { .. } | Next::Finish(_) | Next::Await(_) | Next::Pause => break,
            };
            let overdue = !attempted.is_empty()
                && self
                    .uninserted
                    .as_ref()
                    .is_some_and(|u| tokio::time::Instant::now() >= u.answer_by);
            if attempted.len() >= MAX_SEGMENT_ATTEMPTS || !self.fusable(step, phase) || overdue {
                break;
            }
            let event = self.run_attempt(step, phase, &state, &mut tx).await;
            if is_failure(&event) {
                self.leave_segment(seat, tx.take(), InsertedAlone::AttemptFailed)
                    .await?;
                debug!(
                    step,
                    phase = phase.as_str(),
                    "an attempt failed in a fused segment; running up to it again"
                );
                // Nothing of the segment is written: the run is where its last commit left it.
                self.alone = Some((step, phase));
                return Ok(());
            }
            let transition = self.decide(&mut state, event);
            let at = Instant::now();
            events_at.extend(std::iter::repeat_n(at, transition.events.len()));
            marks.extend(transition.marks.iter().map(|(&i, &mark)| (i, mark, at)));
            next = transition.next;
            decided = Some(match decided {
                None => transition,
                Some(earlier) => earlier.then(transition),
            });
            attempted.push((step, phase));
        }
        let (Some(transition), Some(&(first, first_phase))) = (decided, attempted.first()) else {
            // The attempt the run is at cannot be fused after all: run it alone.
            self.leave_segment(seat, tx.take(), InsertedAlone::NotFused).await?;
            self.alone = match self.next {
                Next::Invoke(step) => Some((step, Phase::Invoke)),
                Next::Compensate(step) => Some((step, Phase::Compensate)),
                _ => None,
            };
            return Ok(());
        };
        let written = Instant::now();
        let ago = |at: Instant| i64::try_from(written.duration_since(at).as_micros()).unwrap_or(i64::MAX);
        let mut stamps = Stamps {
            events_ago_us: events_at.iter().map(|&at| ago(at)).collect(),
            times: Default::default(),
        };
        for (i, mark, at) in marks {
            stamps.times.entry(i).or_default().mark(mark, ago(at));
        }
        let change = Change {
            run_id: self.run_id,
            epoch: self.epoch,
            workflow: &self.workflow,
            old: &self.state,
            new: &state,
            transition: &transition,
            lease: None,
            created_at: self.copy.run.created_at,
            finish_hook: true,
            stamps: Some(&stamps),
        };
        let mut open = match tx.take() {
            Some(open) => open,
            None => match self.engine.inner.worker_pool.begin().await {
                Ok(open) => open,
                Err(e) => {
                    self.leave_segment(seat, None, InsertedAlone::Database).await?;
                    return Err(Stop::Database(e.to_string()));
                }
            },
        };
        // `apply` changes the copy only once everything was written; should the commit then
        // fail, the reload after it reads the copy again.
        let applied = match &self.uninserted {
            None => apply::apply(&mut open, change, Some(&mut self.copy)).await,
            Some(uninserted) => {
                let run = self.engine.new_run(&uninserted.run);
                let unwritten = Unwritten {
                    run: &run,
                    prepared_ago_us: ago(uninserted.prepared),
                };
                match apply::apply_first(&mut open, unwritten, change, &mut self.copy).await {
                    Ok(AppliedFirst::Written(after)) => Ok(Applied::Written(after)),
                    Ok(AppliedFirst::NotWritten) => {
                        // Inserted on its own, it is refused (or held) as from its trigger, or
                        // goes in and runs the segment again as any other run.
                        debug!("a run's insert with its first segment was not written");
                        return self.leave_segment(seat, Some(open), InsertedAlone::Refused).await;
                    }
                    Err(e) => Err(e),
                }
            }
        };
        let after = match applied {
            Ok(Applied::Written(after)) => after,
            Ok(Applied::Fenced) => {
                discard(seat, Some(open)).await;
                return Err(Stop::Fenced);
            }
            Ok(Applied::Requested { cancel, pause }) => {
                discard(seat, Some(open)).await;
                debug!(
                    "an operator asked to cancel or pause while the segment ran; its first attempt runs again alone"
                );
                self.state.cancel_requested = cancel;
                self.state.pause_requested = pause;
                self.alone = Some((first, first_phase));
                return Ok(());
            }
            Err(ApplyError::FinishHook(error)) => {
                self.leave_segment(seat, Some(open), InsertedAlone::FinishHookRefused)
                    .await?;
                warn!(error = %error.message, "the workflow's finish hook refused the end of a fused segment; its last attempt runs again alone");
                self.alone = attempted.last().copied();
                return Ok(());
            }
            Err(ApplyError::Database(e)) => {
                if self.uninserted.is_some() {
                    // The run's insert failed with its segment: inserted on its own, it
                    // goes on (or its trigger learns why not) as if from its trigger.
                    warn!(error = %e, "inserting a run with its first segment failed; inserting it alone");
                    return self.leave_segment(seat, Some(open), InsertedAlone::Database).await;
                }
                discard(seat, Some(open)).await;
                return Err(Stop::Database(e.to_string()));
            }
        };
        let committed = match seat {
            Some(seat) => seat.commit(open).await,
            None => open.commit().await.map_err(|e| e.to_string()),
        };
        if let Err(e) = committed {
            if self.uninserted.is_some() {
                // Nothing of the batch is durable (or, rarely, the commit's outcome is
                // unknown: then the insert alone finds the run's id taken and fails, and
                // the run, if it went in, is recovered once its lease expires).
                warn!(error = %e, "the batch holding a run's insert did not commit; inserting it alone");
                return self.insert_alone(InsertedAlone::NotCommitted).await;
            }
            return Err(Stop::Database(e));
        }
        if let Some(uninserted) = self.uninserted.take() {
            uninserted.run.count_started();
            let _ = uninserted.answer.send(Ok(Some(self.copy.run.clone())));
        }
        self.state = state;
        self.next = transition.next;
        after.publish(&self.engine.inner);
        metrics::histogram!(m::SEGMENT_ATTEMPTS, "workflow" => self.workflow.name.clone())
            .record(attempted.len() as f64);
        for (step, phase) in attempted {
            if phase == Phase::Invoke {
                self.engine
                    .inner
                    .faults
                    .checkpoint(FaultPoint::AfterCommit, &self.workflow.steps[step].name);
            }
        }
        Ok(())
    }

    /// Looks in the inbox for what the waiting `step` waits for and records what follows: the
    /// step's outcome if it arrived (consumed in the same commit) or its deadline passed, or
    /// the run handed back until its deadline. The run's row is locked first: a delivery
    /// takes the same lock, so it is either seen here or finds the wait committed and makes
    /// the run due.
    async fn poll_wait(&mut self, step: usize) -> Result<(), Stop> {
        let Some(waiting) = self.state.waiting.clone().filter(|w| w.step == step) else {
            // The machine never awaits a step that is not waiting; decide again from the state.
            return self.record(Event::WaitPolled { step, arrival: None }, None).await;
        };
        let pool = &self.engine.inner.worker_pool;
        let mut tx = pool.begin().await.map_err(|e| Stop::Database(e.to_string()))?;
        let looked = async {
            let Some(deadline) = store::lock_waiting(&mut tx, self.run_id, self.epoch).await? else {
                return Ok(None);
            };
            let arrival = store::waiting_arrival(&mut tx, self.run_id, &waiting).await?;
            Ok::<_, sqlx::Error>(Some((deadline, arrival)))
        }
        .await;
        let (deadline, arrival) = match looked {
            Ok(Some(found)) => found,
            Ok(None) => {
                let _ = tx.rollback().await;
                return Err(Stop::Fenced);
            }
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(Stop::Database(e.to_string()));
            }
        };
        // A heartbeat may have moved the deadline since this executor's copy was made.
        if let (Some(deadline), Some(w)) = (deadline, self.state.waiting.as_mut()) {
            w.deadline = deadline;
            self.copy.run.wait_deadline = Some(deadline);
        }
        if arrival.is_some() {
            // What the wait waited for is taken, not yet consumed: a crash here keeps it.
            let name = &self.workflow.steps[step].name;
            self.engine.inner.faults.checkpoint(FaultPoint::AfterEffect, name);
        }
        self.record(Event::WaitPolled { step, arrival }, Some(tx)).await
    }

    /// Runs one attempt of `step` from `state` on `tx` and returns its outcome as the machine's
    /// event; what it wrote is in `tx`, not committed.
    async fn run_attempt(&self, step: usize, phase: Phase, state: &RunState, tx: &mut StepTransaction) -> Event {
        let workflow = Arc::clone(&self.workflow);
        let def = &workflow.steps[step];
        let name = def.name.as_str();
        let attempt = match phase {
            Phase::Invoke => state.steps[step].attempts,
            Phase::Compensate => state.steps[step].compensation_attempts,
        };
        let span = info_span!("step", step = name, attempt, phase = phase.as_str());
        let faults = Arc::clone(&self.engine.inner.faults);
        let started = std::time::Instant::now();

        // `Ok((output, accepted))`: `accepted` when the attempt asked to complete later.
        let outcome: Result<(Option<Value>, Option<Value>), StepError> = async {
            if phase == Phase::Invoke {
                faults.checkpoint(FaultPoint::Before, name);
                if faults.should_fail(name) {
                    return Err(StepError::retryable("injected failure (SAGAFLOW_FAULTS)"));
                }
            }
            let handler = &def.handler.code;
            let mut ctx = StepContext {
                engine: &self.engine,
                run_id: self.run_id,
                workflow: &workflow.name,
                version: workflow.version,
                step: name,
                deadline: def
                    .timeout
                    .and_then(|t| chrono::Duration::from_std(t).ok())
                    .map(|t| Utc::now() + t),
                phase,
                attempt,
                view: RunView {
                    input: &self.copy.run.input,
                    plan: &workflow.steps,
                    states: &state.steps,
                },
                tx,
                later: None,
            };
            let work = async {
                match phase {
                    Phase::Invoke => handler.invoke(&mut ctx).await.map(Some),
                    Phase::Compensate => {
                        let s = &state.steps[step];
                        // A step that succeeded has an output (possibly JSON null); one that
                        // failed has only the partial work it recorded.
                        let done = match (&s.output, &s.partial) {
                            (Some(output), _) => Completed::Output(output.clone()),
                            (None, Some(partial)) => Completed::Partial(partial.clone()),
                            (None, None) => Completed::Output(Value::Null),
                        };
                        handler.compensate(&mut ctx, done).await.map(|()| None)
                    }
                }
            };
            let guarded = AssertUnwindSafe(work).catch_unwind();
            let result = match def.timeout {
                Some(limit) => match tokio::time::timeout(limit, guarded).await {
                    Ok(result) => result,
                    Err(_) => return Err(StepError::retryable(format!("attempt timed out after {limit:?}"))),
                },
                None => guarded.await,
            };
            let result = result.unwrap_or_else(|panic| {
                Err(StepError::retryable(format!(
                    "step panicked: {}",
                    panic_message(&panic)
                )))
            });
            result.map(|output| (output, ctx.later.take()))
        }
        .instrument(span.clone())
        .await;

        let elapsed = started.elapsed();
        let event = match outcome {
            Ok((output, accepted)) => {
                let point = match phase {
                    Phase::Invoke => FaultPoint::AfterEffect,
                    Phase::Compensate => FaultPoint::Compensate,
                };
                faults.checkpoint(point, name);
                match (phase, accepted) {
                    (Phase::Invoke, Some(accepted)) => Event::StepAccepted { step, accepted },
                    (Phase::Invoke, None) => Event::StepSucceeded {
                        step,
                        output: output.unwrap_or(Value::Null),
                    },
                    (Phase::Compensate, _) => Event::CompensationSucceeded { step },
                }
            }
            Err(error) => {
                span.in_scope(|| warn!(error = %error.message, retryable = error.retryable, "attempt failed"));
                match phase {
                    Phase::Invoke => Event::StepFailed { step, error },
                    Phase::Compensate => Event::CompensationFailed { step, error },
                }
            }
        };
        let outcome_label = if is_failure(&event) { "failed" } else { "succeeded" };
        metrics::counter!(m::STEP_ATTEMPTS, "workflow" => workflow.name.clone(), "step" => name.to_string(), "phase" => phase.as_str(), "outcome" => outcome_label).increment(1);
        metrics::histogram!(m::STEP_SECONDS, "workflow" => workflow.name.clone(), "step" => name.to_string(), "phase" => phase.as_str()).record(elapsed.as_secs_f64());
        event
    }

    /// Decides what follows `event` and applies it (with the step's own writes, if any).
    ///
    /// Should the workflow's finish hook refuse the status the run would end in, nothing of
    /// that commits (the step's writes included): the outcome is recorded instead as a failed
    /// attempt with the hook's error, so the machine retries or compensates as for any
    /// failure; if the run ends again and the hook refuses again, the run ends `failed` without
    /// it. Never a retry of the step as if the database had failed.
    async fn record(
        &mut self,
        mut event: Event,
        mut step_tx: Option<Transaction<'static, Postgres>>,
    ) -> Result<(), Stop> {
        // Set once the hook refused an end its last chance: the run then ends without it.
        let mut refusal: Option<StepError> = None;
        let mut substituted = false;
        loop {
            let mut new_state = self.state.clone();
            let mut transition = self.decide(&mut new_state, event.clone());
            let mut finish_hook = true;
            if let Some(error) = &refusal
                && matches!(transition.next, Next::Finish(_))
            {
                transition =
                    Machine::new(&self.workflow, &self.copy.run.input).refuse_finish(&mut new_state, transition, error);
                finish_hook = false;
            }
            let change = Change {
                run_id: self.run_id,
                epoch: self.epoch,
                workflow: &self.workflow,
                old: &self.state,
                new: &new_state,
                transition: &transition,
                lease: None,
                created_at: self.copy.run.created_at,
                finish_hook,
                stamps: None,
            };
            let applied = if step_tx.is_some() || apply::needs_transaction(&self.workflow, &transition) {
                let mut tx = match step_tx.take() {
                    Some(tx) => tx,
                    None => self
                        .engine
                        .inner
                        .worker_pool
                        .begin()
                        .await
                        .map_err(|e| Stop::Database(e.to_string()))?,
                };
                match apply::apply(&mut tx, change, Some(&mut self.copy)).await {
                    Ok(Applied::Written(after)) => {
                        tx.commit().await.map_err(|e| Stop::Database(e.to_string()))?;
                        Applied::Written(after)
                    }
                    Ok(requested @ Applied::Requested { .. }) => {
                        // Same transaction: the step's writes stay, the decision is redone.
                        step_tx = Some(tx);
                        requested
                    }
                    Ok(Applied::Fenced) => {
                        let _ = tx.rollback().await;
                        Applied::Fenced
                    }
                    Err(ApplyError::FinishHook(error)) => {
                        let _ = tx.rollback().await;
                        warn!(error = %error.message, retryable = error.retryable, "the workflow's finish hook refused the run's end");
                        event = match event {
                            Event::StepSucceeded { step, .. } if !substituted => Event::StepFailed {
                                step,
                                error: hook_refusal(&error),
                            },
                            Event::CompensationSucceeded { step } if !substituted => Event::CompensationFailed {
                                step,
                                error: hook_refusal(&error),
                            },
                            other => {
                                // Nothing left to turn into a failure: end without the hook.
                                refusal = Some(error);
                                other
                            }
                        };
                        substituted = true;
                        continue;
                    }
                    Err(e) => {
                        let _ = tx.rollback().await;
                        return Err(Stop::Database(e.to_string()));
                    }
                }
            } else {
                let mut conn = self
                    .engine
                    .inner
                    .worker_pool
                    .acquire()
                    .await
                    .map_err(|e| Stop::Database(e.to_string()))?;
                apply::apply(&mut conn, change, Some(&mut self.copy))
                    .await
                    .map_err(|e| Stop::Database(e.to_string()))?
            };
            match applied {
                Applied::Written(after) => {
                    self.state = new_state;
                    self.next = transition.next;
                    after.publish(&self.engine.inner);
                    return Ok(());
                }
                Applied::Requested { cancel, pause } => {
                    debug!(
                        cancel,
                        pause, "an operator asked to cancel or pause while the attempt ran; deciding again"
                    );
                    self.state.cancel_requested = cancel;
                    self.state.pause_requested = pause;
                }
                Applied::Fenced => return Err(Stop::Fenced),
            }
        }
    }

    fn decide(&self, state: &mut RunState, event: Event) -> Transition {
        let conditions = Conditions {
            draining: self.worker.is_draining(),
            jitter: rand::random::<f64>(),
            now: self.engine.now(),
        };
        Machine::new(&self.workflow, &self.copy.run.input).handle(state, event, &conditions)
    }

    /// After a failed write, reloads the run (still under this lease) and goes on from what
    /// the database says. Returns false when the run must be left to others.
    async fn resume_in_place(&mut self, error: &str) -> bool {
        warn!(%error, "recording an outcome failed; reloading the run");
        let mut delay = Duration::from_millis(100);
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            match self.reload(error).await {
                Ok(true) => return true,
                Ok(false) => {
                    warn!("lease taken over while the database was unreachable; stopping without writing");
                    metrics::counter!(m::FENCED_WRITES).increment(1);
                    return false;
                }
                Err(e) => debug!(error = %e, "database still unreachable"),
            }
        }
    }

    async fn reload(&mut self, error: &str) -> Result<bool, sqlx::Error> {
        let mut tx = self.engine.inner.worker_pool.begin().await?;
        let Some(run) = store::run_for_update(&mut tx, self.run_id).await? else {
            return Ok(false);
        };
        if run.lease_epoch != self.epoch || run.lease_owner != Some(self.worker.worker_id()) || run.status.is_terminal()
        {
            return Ok(false);
        }
        let steps = store::steps_of(&mut *tx, self.run_id).await?;
        self.state = store::run_state(&run, &steps);
        self.copy = RunDetail { run, steps };
        let mut new_state = self.state.clone();
        let reason = format!("the database failed while its outcome was being recorded ({error})");
        let transition = self.decide(&mut new_state, Event::Resumed { reason });
        let change = Change::of_row(&self.copy.run, &self.workflow, &self.state, &new_state, &transition);
        let mut copy = self.copy.clone();
        let after = match apply::apply(&mut tx, change, Some(&mut copy)).await {
            Ok(Applied::Written(after)) => after,
            Ok(_) => return Ok(false),
            Err(ApplyError::Database(e)) => return Err(e),
            Err(e @ ApplyError::FinishHook(_)) => {
                warn!(error = %e, "finishing the run failed after a reload; leaving it to recovery");
                return Ok(false);
            }
        };
        tx.commit().await?;
        self.copy = copy;
        self.state = new_state;
        self.next = transition.next;
        after.publish(&self.engine.inner);
        Ok(true)
    }
}

/// Undoes a segment that will not commit: back to its savepoint in a batch (the transaction
/// goes back to the batch), or its own transaction rolled back.
async fn discard(seat: Option<Seat>, tx: Option<Transaction<'static, Postgres>>) {
    match (seat, tx) {
        (Some(seat), Some(tx)) => seat.rewind(tx).await,
        // The seat without its transaction: dropped, it tells the lane the batch is lost.
        (Some(_), None) => {}
        (None, Some(tx)) => {
            let _ = tx.rollback().await;
        }
        (None, None) => {}
    }
}

/// Whether an attempt's outcome is a failure (its writes must not commit).
fn is_failure(event: &Event) -> bool {
    matches!(event, Event::StepFailed { .. } | Event::CompensationFailed { .. })
}

/// The attempt error recorded when the finish hook refused the end its outcome led to.
fn hook_refusal(error: &StepError) -> StepError {
    StepError {
        retryable: error.retryable,
        ..StepError::permanent(format!(
            "the workflow's finish hook refused the run's end: {}",
            error.message
        ))
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

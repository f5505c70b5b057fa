//! Cohorts: the runs of waiting triggers that arrive together go through their steps in
//! lockstep, each step one call of its set-based form for all of them, and commit together.
//!
//! Lanes (`engine::lane`) share one commit among runs, but every run still sends its own
//! statements: at C = 16 a registration cost PostgreSQL about as much CPU in a lane as on its
//! own. A cohort also shares the statements: the runs of one workflow whose every step is
//! local and has a [`BatchStep`](super::super::definition::BatchStep) form, none inserted yet
//! (the runs of waiting triggers, which no crash can have touched), run step by step on one
//! transaction, one batch call per step; the machine decides each run's outcome as it would
//! alone; the runs are written, their finish hook runs once for all, and one commit makes all
//! of it durable.
//!
//! What a cohort never does is decide a failure: should any run's attempt fail, a batch call
//! fail or time out, a run's decision not follow the others' (a retry, a different next
//! step), its insert be refused, or the commit fail, the cohort's transaction is rolled back
//! and each of its runs goes on as if it had never joined one (a fused segment, in a lane),
//! which records the failure exactly as without cohorts. So a cohort commits only runs that
//! all succeeded, each step's writes with its recorded outcome.
//!
//! Who joins: a runner (one by default) takes the run that reached it first and every run
//! already waiting behind it, up to 8 by default ([`DEFAULT_COHORT_RUNS`], at most
//! [`MAX_COHORT_RUNS`]), one per subject (runs of one subject, e.g. one email, never share a
//! cohort, so a run never decides on a peer's uncommitted writes to the same subject) and
//! one workflow version. A run that reaches an idle runner alone goes on at once as a fused
//! segment of its own, holding the runner until that segment is done: an idle system waits
//! for nobody and runs as before cohorts, and the runs that arrive while a segment or a
//! cohort runs make the next cohort, so cohorts grow with the load. Runs of one subject go
//! to the same runner, and a run that cannot join the cohort it arrived for (its subject is
//! in it already, or it is of another workflow) starts the next one.
//!
//! A cohort's commit overlaps the next cohort's steps: once a cohort's runs are written, the
//! runner gathers again while a task of its own waits for the commit (one commit in flight
//! per runner). The next cohort runs in another transaction, so where the two meet (a second
//! run of a subject inserting the same unique key, locking the same row) PostgreSQL makes it
//! wait for the commit before it, and it then fails its step and gives its cohort up, as two
//! concurrent runs would.
//!
//! In what order the runs' steps see each other's writes: step by step, every run's first
//! step, then every run's second, each call seeing the calls before it. That is an order two
//! concurrent runs committing each step on its own could produce too, and a peer's write
//! that would change a run's answer (an identity linked twice) makes that run's step fail,
//! which rolls the cohort back: the runs then run one after another.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::super::apply::{self, ApplyError, Change, Stamps, Unwritten};
use super::super::definition::{BatchItem, Phase, RunView};
use super::super::faults::FaultPoint;
use super::super::machine::{Event, Next, TimeMark, Transition};
use super::super::state::RunState;
use super::super::{RunDetail, metrics_names as m};
use super::{MAX_SEGMENT_ATTEMPTS, RunTask, panic_message};

/// The most runs one cohort may be set to hold: a cohort takes no savepoints, so nothing of
/// PostgreSQL bounds it, but every run of a cohort waits for the slowest step of all of them.
pub const MAX_COHORT_RUNS: usize = 16;

/// The most runs one cohort holds unless told otherwise. Measured on the registration's
/// set-based statements at C = 16 (README, Performance, "The set-based statements, kept"):
/// PostgreSQL's work per registration fell from 2 to 4 to 8 runs a statement and hardly
/// beyond (16 bought little more than 8).
pub const DEFAULT_COHORT_RUNS: usize = 8;

/// How many cohort runners a worker starts unless told otherwise. Each runs one cohort at a
/// time on one connection, and the runs that arrive meanwhile make its next one. In three
/// interleaved pairs of `sagaflow bench` at C = 16 (README, Performance, phase 12), one
/// runner gave a ratio of 0.65 (0.63–0.67) with 7.9 runs a cohort against two runners' 0.61
/// (0.55–0.65) with 4.1: two split the same arrivals into cohorts half as large, and each
/// run cost PostgreSQL a third more.
pub const DEFAULT_COHORT_RUNNERS: usize = 1;

/// The runners of a worker.
pub(crate) struct Cohorts {
    runners: Vec<Runner>,
    /// A cohort's first run waits for peers (`Gathering::wait` above zero): no run goes on
    /// alone without passing through its runner.
    gathers: bool,
}

/// One runner: where its runs go, and whether it is busy.
struct Runner {
    joining: mpsc::UnboundedSender<Joining>,
    state: Arc<RunnerState>,
}

/// Whether a runner is busy (running a cohort, or held by a run it let go on alone) and how
/// many runs wait for it: a run that finds it free and nobody waiting goes on alone at once,
/// without passing through the runner (an idle server pays nothing for cohorts).
#[derive(Default)]
struct RunnerState {
    counts: std::sync::Mutex<Counts>,
    free: tokio::sync::Notify,
}

#[derive(Default)]
struct Counts {
    busy: bool,
    waiting: usize,
}

impl RunnerState {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until the runner is free, and takes it.
    async fn take(&self) {
        loop {
            let freed = self.free.notified();
            {
                let mut counts = self.counts();
                if !counts.busy {
                    counts.busy = true;
                    return;
                }
            }
            freed.await;
        }
    }

    fn release(&self) {
        self.counts().busy = false;
        self.free.notify_waiters();
    }
}

/// A runner held busy by a run that goes on alone: the runs that arrive meanwhile wait for
/// the next cohort. Dropped once the run's first segment is done, it frees the runner.
pub(crate) struct Hold(Arc<RunnerState>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// What became of a run offered to a cohort.
pub(crate) enum Joined {
    /// It goes on alone (a fused segment of its own) while holding its runner.
    Alone(RunTask, Hold),
    /// It went through a cohort, or was in one that was given up: as [`Cohorts::join`] says.
    Back(RunTask),
}

/// How a worker's cohorts gather and how large they grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gathering {
    /// The most runs a cohort holds (at most [`MAX_COHORT_RUNS`]).
    pub(crate) max_runs: usize,
    /// How long a cohort's first run waits for peers (zero: only those already waiting join).
    pub(crate) wait: std::time::Duration,
}

/// A run that asks to join a cohort, and where to give it back.
struct Joining {
    task: RunTask,
    back: oneshot::Sender<Joined>,
}

/// Why a cohort was given up: the `reason` of `sagaflow_cohorts_abandoned_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abandoned {
    /// A run's attempt failed, or the batch call failed, timed out or panicked.
    AttemptFailed,
    /// The runs' decisions parted (not every run went on to the same step or finished).
    Diverged,
    /// A run's trigger stops waiting before the cohort would end.
    Overdue,
    /// A run's insert was refused (its key taken, its workflow paused).
    Refused,
    /// The finish hook failed.
    FinishHook,
    /// The database failed, or the commit did.
    Database,
}

impl Abandoned {
    fn as_str(self) -> &'static str {
        match self {
            Self::AttemptFailed => "attempt_failed",
            Self::Diverged => "diverged",
            Self::Overdue => "overdue",
            Self::Refused => "refused",
            Self::FinishHook => "finish_hook",
            Self::Database => "database",
        }
    }
}

impl Cohorts {
    /// Starts `count` runners (at least one) gathering as `gathering` says and committing on
    /// `pool`.
    pub(crate) fn start(pool: &PgPool, count: usize, gathering: Gathering) -> Self {
        let gathering = Gathering {
            max_runs: gathering.max_runs.clamp(1, MAX_COHORT_RUNS),
            ..gathering
        };
        let runners = (0..count.max(1))
            .map(|_| {
                let (joining, joined) = mpsc::unbounded_channel();
                let state = Arc::new(RunnerState::default());
                tokio::spawn(run_cohorts(pool.clone(), joined, Arc::clone(&state), gathering));
                Runner { joining, state }
            })
            .collect();
        Self {
            runners,
            gathers: !gathering.wait.is_zero(),
        }
    }

    /// Offers `task` to the runner of its subject (or, without one, of its run id). A runner
    /// that is free with nobody waiting (and set to wait for no peers) lets it go on alone at
    /// once, held busy until its segment is done ([`Joined::Alone`]); otherwise it waits for
    /// the runner's next cohort and comes back once that is done: its run written and
    /// committed, or, should its cohort have been given up, as it was ([`Joined::Back`]). A
    /// run that makes no cohort with others goes on alone holding the runner. Either way it
    /// never asks again. `None` only if the runner stopped while holding it.
    pub(crate) async fn join(&self, mut task: RunTask) -> Option<Joined> {
        task.cohort_tried = true;
        let mut hasher = DefaultHasher::new();
        match task.copy.run.subject.as_deref() {
            Some(subject) => subject.hash(&mut hasher),
            None => task.run_id.hash(&mut hasher),
        }
        let runner = &self.runners[(hasher.finish() % self.runners.len() as u64) as usize];
        {
            let mut counts = runner.state.counts();
            if !counts.busy && counts.waiting == 0 && !self.gathers {
                counts.busy = true;
                return Some(Joined::Alone(task, Hold(Arc::clone(&runner.state))));
            }
            counts.waiting += 1;
        }
        let (back, given) = oneshot::channel();
        if let Err(mpsc::error::SendError(joining)) = runner.joining.send(Joining { task, back }) {
            runner.state.counts().waiting -= 1;
            return Some(Joined::Back(joining.task));
        }
        given.await.ok()
    }
}

/// A runner: gathers the runs waiting for it into cohorts, one cohort at a time.
async fn run_cohorts(
    pool: PgPool,
    mut joining: mpsc::UnboundedReceiver<Joining>,
    state: Arc<RunnerState>,
    gathering: Gathering,
) {
    // Runs that could not join the cohort they arrived for: they start the next ones.
    let mut deferred: VecDeque<Joining> = VecDeque::new();
    // The commit of the cohort before, if it is still under way.
    let mut committing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let first = match deferred.pop_front() {
            Some(first) => first,
            None => match joining.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // Wait for the run holding the runner (or the cohort before) to be done: whoever
        // arrives meanwhile joins this cohort.
        state.take().await;
        let mut members = vec![first];
        let mut subjects: HashSet<String> = HashSet::new();
        subjects.extend(members[0].task.copy.run.subject.clone());
        let joins = |next: &Joining, members: &[Joining], subjects: &HashSet<String>| {
            Arc::ptr_eq(&next.task.workflow, &members[0].task.workflow)
                && next
                    .task
                    .copy
                    .run
                    .subject
                    .as_ref()
                    .is_none_or(|s| !subjects.contains(s))
        };
        let mut i = 0;
        while i < deferred.len() && members.len() < gathering.max_runs {
            if joins(&deferred[i], &members, &subjects) {
                if let Some(next) = deferred.remove(i) {
                    subjects.extend(next.task.copy.run.subject.clone());
                    members.push(next);
                }
            } else {
                i += 1;
            }
        }
        let until = tokio::time::Instant::now() + gathering.wait;
        while members.len() < gathering.max_runs {
            let next = match joining.try_recv() {
                Ok(next) => next,
                Err(_) if gathering.wait.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(until, joining.recv()).await {
                    Ok(Some(next)) => next,
                    _ => break,
                },
            };
            if joins(&next, &members, &subjects) {
                subjects.extend(next.task.copy.run.subject.clone());
                members.push(next);
            } else {
                // A second run of a subject in the cohort (or of another workflow) waits for
                // the next cohort.
                deferred.push_back(next);
            }
        }
        state.counts().waiting -= members.len();
        if members.len() == 1 {
            // A run alone goes on as a fused segment of its own (one-item statements, as
            // before cohorts), holding the runner: the runs that arrive meanwhile make the
            // next cohort, which is how cohorts grow with the load.
            let alone = members.remove(0);
            let _ = alone.back.send(Joined::Alone(alone.task, Hold(Arc::clone(&state))));
            continue;
        }
        let (mut tasks, backs): (Vec<RunTask>, Vec<_>) = members.into_iter().map(|j| (j.task, j.back)).unzip();
        let written = run_cohort(&pool, &mut tasks).await;
        // One commit in flight at a time: the cohort before must have committed first.
        if let Some(before) = committing.take() {
            let _ = before.await;
        }
        match written {
            Ok(written) => {
                // The commit (its wait for the WAL flush) overlaps the next cohort's steps:
                // the runner is free again once this cohort's runs are written.
                state.release();
                committing = Some(tokio::spawn(async move {
                    let runs = tasks.len();
                    match written.commit(&mut tasks).await {
                        Ok(()) => metrics::histogram!(m::COHORT_RUNS).record(runs as f64),
                        Err(why) => given_up(why, runs),
                    }
                    for (task, back) in tasks.into_iter().zip(backs) {
                        let _ = back.send(Joined::Back(task));
                    }
                }));
            }
            Err(why) => {
                given_up(why, tasks.len());
                state.release();
                for (task, back) in tasks.into_iter().zip(backs) {
                    let _ = back.send(Joined::Back(task));
                }
            }
        }
    }
}

/// Counts a cohort given up, and why.
fn given_up(why: Abandoned, runs: usize) {
    debug!(
        reason = why.as_str(),
        runs, "a cohort was given up; its runs go on alone"
    );
    metrics::counter!(m::COHORTS_ABANDONED, "reason" => why.as_str()).increment(1);
}

/// What the cohort decided for one of its runs, until it is written.
struct Decided {
    state: RunState,
    next: Next,
    transition: Option<Transition>,
    events_at: Vec<Instant>,
    marks: Vec<(usize, TimeMark, Instant)>,
}

/// Runs `tasks` (two or more runs of one workflow version, none inserted yet, each at its
/// first attempt to run) through their steps in lockstep on one transaction and writes
/// them there: `Ok` holds the transaction, to commit with [`Written::commit`]. On `Err`
/// nothing was written and every task is as it was.
async fn run_cohort(pool: &PgPool, tasks: &mut [RunTask]) -> Result<Written, Abandoned> {
    let workflow = Arc::clone(&tasks[0].workflow);
    let engine = tasks[0].engine.clone();
    let faults = Arc::clone(&engine.inner.faults);
    let mut tx = pool.begin().await.map_err(|e| database(&e))?;
    let mut decided: Vec<Decided> = tasks
        .iter()
        .map(|t| Decided {
            state: t.state.clone(),
            next: t.next,
            transition: None,
            events_at: Vec::new(),
            marks: Vec::new(),
        })
        .collect();
    let mut attempted: Vec<usize> = Vec::new();
    loop {
        let step = match decided[0].next {
            Next::Invoke(step) if decided.iter().all(|d| d.next == Next::Invoke(step)) => step,
            Next::Finish(status) if decided.iter().all(|d| d.next == Next::Finish(status)) => break,
            _ => return Err(Abandoned::Diverged),
        };
        let overdue = tasks.iter().any(|t| {
            t.uninserted
                .as_ref()
                .is_none_or(|u| tokio::time::Instant::now() >= u.answer_by)
        });
        if overdue {
            return Err(Abandoned::Overdue);
        }
        let def = &workflow.steps[step];
        let Some(batch) = def.handler.batch.as_ref().filter(|_| def.is_local()) else {
            return Err(Abandoned::Diverged);
        };
        if attempted.len() >= MAX_SEGMENT_ATTEMPTS || faults.will_fail(&def.name) {
            return Err(Abandoned::Diverged);
        }
        // Once per run, as each run's attempt would pass it alone: a fault set to strike at
        // the n-th attempt of a step strikes inside a cohort as it would outside one.
        for _ in 0..tasks.len() {
            faults.checkpoint(FaultPoint::Before, &def.name);
        }
        let items: Vec<BatchItem<'_>> = tasks
            .iter()
            .zip(&decided)
            .map(|(t, d)| BatchItem {
                run_id: t.run_id,
                attempt: d.state.steps[step].attempts,
                view: RunView {
                    input: &t.copy.run.input,
                    plan: &workflow.steps,
                    states: &d.state.steps,
                },
            })
            .collect();
        let started = Instant::now();
        let call = AssertUnwindSafe(batch.invoke_batch(&mut tx, &items)).catch_unwind();
        let answered = match def.timeout {
            Some(limit) => tokio::time::timeout(limit, call).await.ok(),
            None => Some(call.await),
        };
        let outputs = match answered {
            Some(Ok(Ok(answers))) if answers.len() == tasks.len() => answers,
            Some(Ok(Ok(answers))) => {
                warn!(step = %def.name, runs = tasks.len(), answers = answers.len(), "a batch form answered for another number of runs than it was given");
                return Err(Abandoned::AttemptFailed);
            }
            Some(Ok(Err(error))) => {
                debug!(step = %def.name, error = %error.message, "a batch call failed");
                return Err(Abandoned::AttemptFailed);
            }
            Some(Err(panic)) => {
                warn!(step = %def.name, panic = %panic_message(&panic), "a batch call panicked");
                return Err(Abandoned::AttemptFailed);
            }
            None => return Err(Abandoned::AttemptFailed),
        };
        if outputs.iter().any(Result::is_err) {
            return Err(Abandoned::AttemptFailed);
        }
        let elapsed = started.elapsed();
        for ((task, d), output) in tasks.iter().zip(decided.iter_mut()).zip(outputs) {
            let Ok(output) = output else {
                return Err(Abandoned::AttemptFailed);
            };
            faults.checkpoint(FaultPoint::AfterEffect, &def.name);
            let transition = task.decide(&mut d.state, Event::StepSucceeded { step, output });
            let at = Instant::now();
            d.events_at.extend(std::iter::repeat_n(at, transition.events.len()));
            d.marks.extend(transition.marks.iter().map(|(&i, &mark)| (i, mark, at)));
            d.next = transition.next;
            d.transition = Some(match d.transition.take() {
                None => transition,
                Some(earlier) => earlier.then(transition),
            });
            metrics::counter!(m::STEP_ATTEMPTS, "workflow" => workflow.name.clone(), "step" => def.name.clone(), "phase" => Phase::Invoke.as_str(), "outcome" => "succeeded").increment(1);
            metrics::histogram!(m::STEP_SECONDS, "workflow" => workflow.name.clone(), "step" => def.name.clone(), "phase" => Phase::Invoke.as_str()).record(elapsed.as_secs_f64());
        }
        attempted.push(step);
    }

    // Every run finished: write them all as their runs' inserts, in one statement, and run
    // the finish hook once for all, then commit.
    let written = Instant::now();
    let ago = |at: Instant| i64::try_from(written.duration_since(at).as_micros()).unwrap_or(i64::MAX);
    let mut stamps = Vec::with_capacity(tasks.len());
    let mut new_runs = Vec::with_capacity(tasks.len());
    for (task, d) in tasks.iter().zip(&decided) {
        let Some(uninserted) = task.uninserted.as_ref() else {
            return Err(Abandoned::Diverged);
        };
        let mut s = Stamps {
            events_ago_us: d.events_at.iter().map(|&at| ago(at)).collect(),
            times: Default::default(),
        };
        for &(i, mark, at) in &d.marks {
            s.times.entry(i).or_default().mark(mark, ago(at));
        }
        stamps.push(s);
        new_runs.push((engine.new_run(&uninserted.run), ago(uninserted.prepared)));
    }
    let mut writes = Vec::with_capacity(tasks.len());
    for (((task, d), s), (run, prepared_ago_us)) in tasks.iter().zip(&decided).zip(&stamps).zip(&new_runs) {
        let Some(transition) = d.transition.as_ref() else {
            return Err(Abandoned::Diverged);
        };
        writes.push((
            Unwritten {
                run,
                prepared_ago_us: *prepared_ago_us,
            },
            Change {
                run_id: task.run_id,
                epoch: task.epoch,
                workflow: &workflow,
                old: &task.state,
                new: &d.state,
                transition,
                lease: None,
                created_at: task.copy.run.created_at,
                finish_hook: true,
                stamps: Some(s),
            },
        ));
    }
    let mut copies: Vec<RunDetail> = tasks.iter().map(|t| t.copy.clone()).collect();
    let afters = match apply::apply_finished_cohort(&mut tx, &workflow, &writes, &mut copies).await {
        Ok(Some(afters)) => afters,
        Ok(None) => return Err(Abandoned::Refused),
        Err(ApplyError::FinishHook(error)) => {
            debug!(error = %error.message, "a cohort's finish hook failed");
            return Err(Abandoned::FinishHook);
        }
        Err(ApplyError::Database(e)) => return Err(database(&e)),
    };
    drop(writes);
    Ok(Written {
        tx,
        decided,
        copies,
        afters,
        attempted,
    })
}

/// A cohort whose runs are written in its transaction, to be committed.
struct Written {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    decided: Vec<Decided>,
    copies: Vec<RunDetail>,
    afters: Vec<apply::AfterCommit>,
    attempted: Vec<usize>,
}

impl Written {
    /// Commits the cohort; then every task holds its run as committed, its trigger is
    /// answered and the change announced. On `Err` nothing is durable (or, should the
    /// connection fail during the commit, its outcome is unknown, as for any segment) and
    /// every task is as it was.
    async fn commit(self, tasks: &mut [RunTask]) -> Result<(), Abandoned> {
        self.tx.commit().await.map_err(|e| database(&e))?;
        let Some(first) = tasks.first() else { return Ok(()) };
        let (workflow, engine) = (Arc::clone(&first.workflow), first.engine.clone());
        let faults = Arc::clone(&engine.inner.faults);
        let written = self.copies.into_iter().zip(self.afters);
        for ((task, d), (copy, after)) in tasks.iter_mut().zip(self.decided).zip(written) {
            task.copy = copy;
            task.state = d.state;
            task.next = d.next;
            if let Some(uninserted) = task.uninserted.take() {
                uninserted.run.count_started();
                let _ = uninserted.answer.send(Ok(Some(task.copy.run.clone())));
            }
            after.publish(&engine.inner);
            metrics::histogram!(m::SEGMENT_ATTEMPTS, "workflow" => workflow.name.clone())
                .record(self.attempted.len() as f64);
            for &step in &self.attempted {
                faults.checkpoint(FaultPoint::AfterCommit, &workflow.steps[step].name);
            }
        }
        Ok(())
    }
}

fn database(error: &sqlx::Error) -> Abandoned {
    debug!(%error, "a cohort's transaction failed");
    Abandoned::Database
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// The runner waits while a run holds it (or its cohort runs), and takes it as soon as
    /// the hold is dropped: a hold that never freed it would stop every cohort after it.
    #[tokio::test]
    async fn a_runner_held_by_a_run_alone_waits_for_it_and_takes_it_once_it_is_done() {
        let state = Arc::new(RunnerState::default());
        state.take().await;
        let hold = Hold(Arc::clone(&state));
        let runner = tokio::spawn({
            let state = Arc::clone(&state);
            async move { state.take().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!runner.is_finished(), "the runner took itself while a run held it");
        drop(hold);
        tokio::time::timeout(Duration::from_secs(5), runner)
            .await
            .expect("the runner is taken once the hold is dropped")
            .expect("no panic");
        assert!(state.counts().busy, "taken again, by the runner");
        state.release();
        assert!(!state.counts().busy);
    }
}

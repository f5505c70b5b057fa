//! The one place a decided transition becomes SQL.
//!
//! Every path that changes a run (an executor recording an attempt's outcome, a claim, a
//! reload after a lost connection, an operator's cancel or resume) hands the machine's
//! [`Transition`] to [`apply`], inside the caller's transaction. It writes the transition
//! fenced by the lease epoch and the operator's requests (cancel, pause) the decision saw,
//! and, whenever the run becomes terminal, whatever path got it there, runs the workflow's
//! [`FinishHook`] in the same transaction. The first segment of a run that is not inserted
//! yet goes to [`apply_first`], which writes it as the run's insert, and the first segments
//! of a cohort's runs to [`apply_finished_cohort`], which writes them all in one statement.
//! What must happen once the transaction commits (waking waiters, announcing the change,
//! counting the finish) is returned as an [`AfterCommit`], never done here: nothing is
//! announced that might still roll back.
//!
//! The inputs are plain data per run, so a caller can apply the transitions of several
//! steps of one run, or of several runs, in one transaction by calling [`apply`] for each.
//!
//! [`FinishHook`]: super::definition::FinishHook

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use std::collections::BTreeMap;
use std::sync::Arc;

use super::definition::Workflow;
use super::machine::{Next, Transition};
use super::state::{RunState, StepError};
use super::status::RunStatus;
use super::store::{self, LeaseWrite, Persist, Persisted, StepTimes};
use super::{Inner, RunDetail, metrics_names as m};

/// A transition of one run, ready to write.
pub(crate) struct Change<'a> {
    /// The run.
    pub(crate) run_id: Uuid,
    /// The lease epoch the writer holds (or read, for an operator).
    pub(crate) epoch: i64,
    /// The run's workflow version (its finish hook).
    pub(crate) workflow: &'a Workflow,
    /// The state the decision started from.
    pub(crate) old: &'a RunState,
    /// The state it decided on.
    pub(crate) new: &'a RunState,
    /// The decision.
    pub(crate) transition: &'a Transition,
    /// `None`: what the transition's next action implies for the owner's lease. An operator,
    /// who holds no lease, passes [`LeaseWrite::Wake`] with the engine clock's time.
    pub(crate) lease: Option<LeaseWrite>,
    /// When the run was accepted (the database's time), for the run-duration metric.
    pub(crate) created_at: DateTime<Utc>,
    /// Run the workflow's finish hook if the run finishes (false only once the hook has
    /// refused this run's end: see `Machine::refuse_finish`).
    pub(crate) finish_hook: bool,
    /// When the transition's entries and marks happened, if not all in the write itself (a
    /// fused segment writes several decisions at once).
    pub(crate) stamps: Option<&'a Stamps>,
}

/// When the entries and step marks of a write happened, as microseconds before it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Stamps {
    /// Per log entry, in order.
    pub(crate) events_ago_us: Vec<i64>,
    /// Per step whose timestamps the write sets.
    pub(crate) times: BTreeMap<usize, StepTimes>,
}

impl<'a> Change<'a> {
    /// The change of a run read from its row (a claim's or an operator's): fenced by the
    /// row's epoch, the lease as the transition implies, the finish hook run if it finishes.
    pub(crate) fn of_row(
        run: &store::RunRow,
        workflow: &'a Workflow,
        old: &'a RunState,
        new: &'a RunState,
        transition: &'a Transition,
    ) -> Self {
        Self {
            run_id: run.id,
            epoch: run.lease_epoch,
            workflow,
            old,
            new,
            transition,
            lease: None,
            created_at: run.created_at,
            finish_hook: true,
            stamps: None,
        }
    }
}

/// What [`apply`] did.
#[derive(Debug)]
pub(crate) enum Applied {
    /// Written (and the finish hook run, if the run finished); do this after commit.
    Written(AfterCommit),
    /// The lease was taken over: the writer must stop touching this run.
    Fenced,
    /// An operator asked to cancel or to pause (or withdrew a pause) since the decision:
    /// decide again with these flags (the transaction is intact, the step's own writes
    /// included).
    Requested {
        /// The run's cancel flag now.
        cancel: bool,
        /// The run's pause flag now.
        pause: bool,
    },
}

/// Why [`apply`] failed. Either way the caller's transaction must not commit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The workflow's finish hook refused the run's final status.
    #[error("the workflow's finish hook failed: {}", .0.message)]
    FinishHook(StepError),
}

/// What to do once the transaction that applied a change has committed.
#[derive(Debug, Clone, PartialEq)]
#[must_use = "the change must be announced after commit"]
pub(crate) struct AfterCommit {
    /// The run.
    pub(crate) run_id: Uuid,
    /// The terminal status it reached, if it finished: waiters are woken, the finish counted.
    pub(crate) finished: Option<RunStatus>,
    /// The finished run as committed, when the writer kept a copy of its rows: waiters
    /// answer with it instead of reading the run back.
    pub(crate) detail: Option<Arc<RunDetail>>,
    workflow: String,
    created_at: DateTime<Utc>,
}

impl AfterCommit {
    /// Announces the committed change: the change feed always; for a finished run, the
    /// finish metrics and the callers waiting for it.
    pub(crate) fn publish(self, inner: &Inner) {
        inner.changes.touch(self.run_id);
        if let Some(status) = self.finished {
            metrics::counter!(m::RUNS_FINISHED, "workflow" => self.workflow.clone(), "status" => status.as_str())
                .increment(1);
            let took = (Utc::now() - self.created_at).to_std().unwrap_or_default();
            metrics::histogram!(m::RUN_SECONDS, "workflow" => self.workflow, "status" => status.as_str())
                .record(took.as_secs_f64());
            inner.finished.notify(self.run_id, status, self.detail);
        }
    }
}

/// Whether applying `transition` runs code that must share a transaction with it (the finish
/// hook): a caller that would otherwise write on a bare connection must open one.
pub(crate) fn needs_transaction(workflow: &Workflow, transition: &Transition) -> bool {
    matches!(transition.next, Next::Finish(_)) && workflow.on_finish.is_some()
}

/// Writes `change` on `conn` (inside a transaction whenever [`needs_transaction`] says so)
/// and, if the run finished, runs the workflow's finish hook there too. A writer that keeps
/// a copy of the run's rows passes it as `copy`: it is changed only once everything was
/// written (a refusing finish hook leaves it as it was), and is then what the transaction
/// holds (should the transaction not commit, the copy must be read again).
pub(crate) async fn apply(
    conn: &mut PgConnection,
    change: Change<'_>,
    copy: Option<&mut RunDetail>,
) -> Result<Applied, ApplyError> {
    let finished = match change.transition.next {
        Next::Finish(status) => Some(status),
        _ => None,
    };
    let now_times;
    let (times, events_ago_us) = match change.stamps {
        Some(stamps) => (&stamps.times, stamps.events_ago_us.as_slice()),
        None => {
            now_times = store::times_now(&change.transition.marks);
            (&now_times, &[][..])
        }
    };
    let changed: Vec<usize> = (0..change.new.steps.len())
        .filter(|&i| change.old.steps.get(i) != change.new.steps.get(i) || times.contains_key(&i))
        .collect();
    let persist = persist_of(&change, changed, times, events_ago_us);
    let at = match store::persist(conn, &persist).await? {
        Persisted::Fenced => return Ok(Applied::Fenced),
        Persisted::Requested { cancel, pause } => return Ok(Applied::Requested { cancel, pause }),
        Persisted::Applied { at } => at,
    };
    if let Some(id) = change.transition.consume {
        // The step that was waiting consumes it.
        let step = change
            .old
            .waiting
            .as_ref()
            .and_then(|w| change.workflow.steps.get(w.step))
            .map_or("?", |def| def.name.as_str());
        store::consume_arrival(conn, id, step).await?;
    }
    finish(conn, &change, finished).await?;
    let detail = copy.and_then(|copy| {
        persist.mirror(&mut copy.run, &mut copy.steps, at);
        finished.is_some().then(|| Arc::new(copy.clone()))
    });
    Ok(Applied::Written(AfterCommit {
        run_id: change.run_id,
        finished,
        detail,
        workflow: change.workflow.name.clone(),
        created_at: change.created_at,
    }))
}

/// The write of `change` with these step times and entry offsets: the lease as the
/// transition's next action implies, unless the change says otherwise.
fn persist_of<'a>(
    change: &Change<'a>,
    changed: Vec<usize>,
    times: &'a BTreeMap<usize, StepTimes>,
    events_ago_us: &'a [i64],
) -> Persist<'a> {
    let lease = change.lease.unwrap_or(match change.transition.next {
        Next::Invoke(_) | Next::Compensate(_) | Next::Await(_) => LeaseWrite::Keep,
        Next::Release { ready_at } => LeaseWrite::Release(ready_at),
        Next::Finish(_) => LeaseWrite::Finish,
        Next::Pause => LeaseWrite::Hold,
    });
    Persist {
        run_id: change.run_id,
        epoch: change.epoch,
        cancel_requested: change.old.cancel_requested,
        pause_requested: change.old.pause_requested,
        state: change.new,
        changed,
        times,
        events: change.transition.events.as_slice(),
        events_ago_us,
        lease,
    }
}

/// Runs the workflow's finish hook, in the write's transaction, when the run finished.
async fn finish(conn: &mut PgConnection, change: &Change<'_>, finished: Option<RunStatus>) -> Result<(), ApplyError> {
    if let (Some(status), Some(hook), true) = (finished, &change.workflow.on_finish, change.finish_hook) {
        hook.on_finish(conn, change.run_id, status)
            .await
            .map_err(ApplyError::FinishHook)?;
    }
    Ok(())
}

/// A run not yet inserted, to be written together with its first segment.
pub(crate) struct Unwritten<'a> {
    /// The insert its trigger prepared (its state the claim's).
    pub(crate) run: &'a store::NewRun<'a>,
    /// How long before now it was prepared, in microseconds: when it was accepted.
    pub(crate) prepared_ago_us: i64,
}

/// What [`apply_first`] did.
#[derive(Debug)]
pub(crate) enum AppliedFirst {
    /// The run was inserted with its segment (and the finish hook run, if it finished); do
    /// this after commit.
    Written(AfterCommit),
    /// Nothing was written, because the run's key is taken or its workflow is paused, or
    /// because the segment holds the run (a pause), which its insert cannot say: insert the
    /// run on its own, which settles what follows.
    NotWritten,
}

/// Writes `change`, the first segment of a run that is not inserted yet, as the insert of the
/// run in the state the segment left it (see [`store::insert_run_with_segment`]): one row for
/// the run and each step where an insert and then its update would write two. Otherwise as
/// [`apply`]: the finish hook runs in the same transaction, `copy` becomes the rows as
/// written, and nothing is announced.
pub(crate) async fn apply_first(
    conn: &mut PgConnection,
    unwritten: Unwritten<'_>,
    change: Change<'_>,
    copy: &mut RunDetail,
) -> Result<AppliedFirst, ApplyError> {
    let finished = match change.transition.next {
        Next::Finish(status) => Some(status),
        _ => None,
    };
    let no_stamps = Stamps::default();
    let stamps = change.stamps.unwrap_or(&no_stamps);
    let times = store::first_times(unwritten.run.marks, unwritten.prepared_ago_us, &stamps.times);
    let persist = first_persist(&change, &times, stamps);
    if !matches!(
        persist.lease,
        LeaseWrite::Keep | LeaseWrite::Release(_) | LeaseWrite::Finish
    ) {
        return Ok(AppliedFirst::NotWritten);
    }
    let (created_at, at) =
        match store::insert_run_with_segment(conn, unwritten.run, &persist, unwritten.prepared_ago_us).await? {
            store::InsertedWithSegment::Run { created_at, at } => (created_at, at),
            store::InsertedWithSegment::Refused => return Ok(AppliedFirst::NotWritten),
        };
    finish(conn, &change, finished).await?;
    Ok(AppliedFirst::Written(inserted_as_written(
        &unwritten, &change, &persist, created_at, at, copy,
    )))
}

/// The write of `change`, a run's first segment, as the run's insert: every step is written,
/// with `times` (the claim's marks and the segment's, see [`store::first_times`]).
fn first_persist<'a>(change: &Change<'a>, times: &'a BTreeMap<usize, StepTimes>, stamps: &'a Stamps) -> Persist<'a> {
    persist_of(
        change,
        (0..change.new.steps.len()).collect(),
        times,
        &stamps.events_ago_us,
    )
}

/// Makes `copy` the rows of `unwritten` as its insert with its first segment (`persist`)
/// wrote them, accepted at `created_at` and written at `at`, and returns what to announce
/// once that commits.
fn inserted_as_written(
    unwritten: &Unwritten<'_>,
    change: &Change<'_>,
    persist: &Persist<'_>,
    created_at: DateTime<Utc>,
    at: DateTime<Utc>,
    copy: &mut RunDetail,
) -> AfterCommit {
    let (mut run, mut steps) = unwritten.run.rows(store::Inserted::Run {
        created_at,
        held: false,
    });
    persist.mirror(&mut run, &mut steps, at);
    if run.lease_owner.is_some() {
        run.lease_expires_at = Some(at + chrono::Duration::milliseconds(unwritten.run.lease_ms));
    }
    *copy = RunDetail { run, steps };
    let finished = match change.transition.next {
        Next::Finish(status) => Some(status),
        _ => None,
    };
    AfterCommit {
        run_id: change.run_id,
        finished,
        detail: finished.is_some().then(|| Arc::new(copy.clone())),
        workflow: change.workflow.name.clone(),
        created_at,
    }
}

/// Writes the first segments of a cohort's runs (see `executor::cohort`), each of which
/// finished its run, as the inserts of the runs in one statement
/// ([`store::insert_finished_runs`]), then runs the workflow's finish hook once for all of them
/// ([`FinishHook::on_finish_batch`]); `copies[i]` becomes the rows of `runs[i]` as written.
/// `None`, with nothing of the runs written and the copies as they were, when some run was
/// refused (its key taken, the workflow paused) or did not finish: the caller then must not
/// commit the transaction, whose other writes stand.
///
/// [`FinishHook::on_finish_batch`]: super::definition::FinishHook::on_finish_batch
pub(crate) async fn apply_finished_cohort(
    conn: &mut PgConnection,
    workflow: &Workflow,
    runs: &[(Unwritten<'_>, Change<'_>)],
    copies: &mut [RunDetail],
) -> Result<Option<Vec<AfterCommit>>, ApplyError> {
    let no_stamps = Stamps::default();
    let mut finished = Vec::with_capacity(runs.len());
    let mut times = Vec::with_capacity(runs.len());
    for (unwritten, change) in runs {
        let Next::Finish(status) = change.transition.next else {
            return Ok(None);
        };
        finished.push((change.run_id, status));
        let stamps = change.stamps.unwrap_or(&no_stamps);
        times.push(store::first_times(
            unwritten.run.marks,
            unwritten.prepared_ago_us,
            &stamps.times,
        ));
    }
    let persists: Vec<Persist<'_>> = runs
        .iter()
        .zip(&times)
        .map(|((_, change), times)| first_persist(change, times, change.stamps.unwrap_or(&no_stamps)))
        .collect();
    if persists.iter().any(|p| !matches!(p.lease, LeaseWrite::Finish)) {
        return Ok(None);
    }
    let items: Vec<store::FinishedRun<'_>> = runs
        .iter()
        .zip(&persists)
        .map(|((unwritten, _), first)| store::FinishedRun {
            run: unwritten.run,
            first,
            created_ago_us: unwritten.prepared_ago_us,
        })
        .collect();
    let written = store::insert_finished_runs(conn, &workflow.name, workflow.version, &items).await?;
    let mut inserted = Vec::with_capacity(written.len());
    for w in written {
        match w {
            store::InsertedWithSegment::Run { created_at, at } => inserted.push((created_at, at)),
            store::InsertedWithSegment::Refused => return Ok(None),
        }
    }
    if inserted.len() != runs.len() {
        return Ok(None);
    }
    if let Some(hook) = &workflow.on_finish {
        hook.on_finish_batch(conn, &finished)
            .await
            .map_err(ApplyError::FinishHook)?;
    }
    let afters = runs
        .iter()
        .zip(&persists)
        .zip(inserted)
        .zip(copies.iter_mut())
        .map(|((((unwritten, change), persist), (created_at, at)), copy)| {
            inserted_as_written(unwritten, change, persist, created_at, at, copy)
        })
        .collect();
    Ok(Some(afters))
}

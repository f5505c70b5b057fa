//! Pause and resume (DESIGN.md §11). A run is paused after the attempt in flight: the state
//! machine decides (`Machine::request_pause`, `Machine::resume`) and `apply` writes it, like
//! any operator action. A workflow is paused by a row the insert and the claim look at: its
//! runs not yet started are held `pending`, neither leased nor due, until it is resumed.

use serde_json::json;
use uuid::Uuid;

use super::apply::{self, Change};
use super::machine::{Actor, Machine, Transition};
use super::repair::check_note;
use super::state::RunState;
use super::{Engine, EngineError, applied_by_operator, store};

/// Which of the two run actions.
#[derive(Clone, Copy)]
enum RunAction {
    Pause,
    Resume,
}

impl RunAction {
    fn name(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
        }
    }
}

impl Engine {
    /// Pauses a `pending`, `running` or `compensating` run: at once when no attempt is in
    /// flight (no lease is held while paused; a wait keeps its deadline), otherwise once the
    /// attempt in flight is recorded. Asking again changes nothing.
    pub async fn pause(&self, run_id: Uuid, operator: &str) -> Result<(), EngineError> {
        self.pause_as(run_id, operator.into()).await
    }

    /// [`Engine::pause`] by `actor` (with a note, or within a bulk action).
    pub async fn pause_as(&self, run_id: Uuid, actor: Actor<'_>) -> Result<(), EngineError> {
        self.pause_or_resume(run_id, actor, RunAction::Pause).await
    }

    /// Resumes a paused run (to the status it was paused from, due at once), or withdraws a
    /// pause asked for while its attempt was still in flight.
    pub async fn resume(&self, run_id: Uuid, operator: &str) -> Result<(), EngineError> {
        self.resume_as(run_id, operator.into()).await
    }

    /// [`Engine::resume`] by `actor` (with a note, or within a bulk action).
    pub async fn resume_as(&self, run_id: Uuid, actor: Actor<'_>) -> Result<(), EngineError> {
        self.pause_or_resume(run_id, actor, RunAction::Resume).await
    }

    async fn pause_or_resume(&self, run_id: Uuid, actor: Actor<'_>, action: RunAction) -> Result<(), EngineError> {
        check_note(actor.note, false)?;
        let mut tx = self.inner.pool.begin().await?;
        let run = store::run_for_update(&mut tx, run_id)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        let wf = self.run_workflow(&run)?;
        let steps = store::steps_of(&mut *tx, run_id).await?;
        let old = store::run_state(&run, &steps);
        let mut state = old.clone();
        let machine = Machine::new(&wf, &run.input);
        let now = self.now();
        let decided: Result<Transition, _> = match action {
            RunAction::Pause => machine.request_pause(&mut state, actor, run.lease_owner.is_some(), now),
            RunAction::Resume => machine.resume(&mut state, actor, now),
        };
        let transition = decided.map_err(|e| EngineError::NotAllowed {
            action: action.name(),
            status: e.0,
        })?;
        if transition.events.is_empty() {
            return Ok(());
        }
        let change = Change {
            lease: lease_for(&state, now),
            ..Change::of_row(&run, &wf, &old, &state, &transition)
        };
        let after = applied_by_operator(apply::apply(&mut tx, change, None).await, action.name(), run_id)?;
        let what = match action {
            RunAction::Pause => "run.pause",
            RunAction::Resume => "run.resume",
        };
        let detail = json!({"status": state.status, "requested": state.pause_requested});
        store::record_action(&mut tx, &store::OperatorAction::on_run(actor, what, run_id, detail)).await?;
        tx.commit().await?;
        after.publish(&self.inner);
        Ok(())
    }

    /// Pauses `workflow` (every version): its runs not yet started, and those accepted from
    /// now on, are held `pending` until it is resumed; runs under way go on (pause them with a
    /// bulk pause). Returns how many runs it held.
    pub async fn pause_workflow(&self, workflow: &str, actor: Actor<'_>) -> Result<u64, EngineError> {
        self.known_workflow(workflow)?;
        check_note(actor.note, false)?;
        let mut tx = self.inner.pool.begin().await?;
        let held = store::pause_workflow(&mut tx, workflow, actor.by, actor.note)
            .await?
            .ok_or_else(|| EngineError::WorkflowPauseState {
                workflow: workflow.to_string(),
                paused: true,
            })?;
        store::record_action(&mut tx, &workflow_action(actor, "workflow.pause", workflow, held)).await?;
        tx.commit().await?;
        tracing::info!(workflow, held, by = actor.by, "workflow paused");
        Ok(held)
    }

    /// Resumes `workflow`: the runs it held are due at once. Returns how many.
    pub async fn resume_workflow(&self, workflow: &str, actor: Actor<'_>) -> Result<u64, EngineError> {
        self.known_workflow(workflow)?;
        check_note(actor.note, false)?;
        let mut tx = self.inner.pool.begin().await?;
        let released = store::resume_workflow(&mut tx, workflow, self.now())
            .await?
            .ok_or_else(|| EngineError::WorkflowPauseState {
                workflow: workflow.to_string(),
                paused: false,
            })?;
        store::record_action(&mut tx, &workflow_action(actor, "workflow.resume", workflow, released)).await?;
        tx.commit().await?;
        tracing::info!(workflow, released, by = actor.by, "workflow resumed");
        Ok(released)
    }

    /// The paused workflows, with how many runs each holds.
    pub async fn paused_workflows(&self) -> Result<Vec<store::PausedWorkflow>, EngineError> {
        Ok(store::paused_workflows(&self.inner.pool).await?)
    }

    fn known_workflow(&self, workflow: &str) -> Result<(), EngineError> {
        match self.inner.latest(workflow) {
            Some(_) => Ok(()),
            None => Err(EngineError::UnknownWorkflow(workflow.to_string())),
        }
    }
}

/// The lease write of an operator's pause or resume: a run paused at once is held (no lease,
/// not due); otherwise the owner's lease is left alone and an unleased run is due now.
fn lease_for(state: &RunState, now: chrono::DateTime<chrono::Utc>) -> Option<store::LeaseWrite> {
    match state.status {
        super::status::RunStatus::Paused => Some(store::LeaseWrite::Hold),
        _ => Some(store::LeaseWrite::Wake(now)),
    }
}

fn workflow_action<'a>(actor: Actor<'a>, action: &'a str, workflow: &str, runs: u64) -> store::OperatorAction<'a> {
    store::OperatorAction::by(actor, action, json!({"workflow": workflow, "runs": runs}))
}

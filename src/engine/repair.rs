//! Operator repair beyond retry and cancel (DESIGN.md §11): resolving by hand a compensation
//! that gave up, and restarting a finished run from a step as a new run that reuses the
//! recorded outputs of the steps before it. Both are decided by the state machine or checked
//! here against the recorded steps, written in one transaction with the operator, what they
//! did and their note in the log.

use serde_json::{Value, json};
use uuid::Uuid;

use super::apply::{self, Change};
use super::machine::{Actor, Machine, NewEvent};
use super::state::StepState;
use super::status::{EventKind, RunStatus, StepStatus, Trigger};
use super::{Engine, EngineError, applied_by_operator, store};

/// The longest note an operator may leave with an action.
pub const MAX_NOTE_CHARS: usize = 2000;

/// The steps a restart starts with (as the restarted run recorded them) and the log entries
/// that say so.
pub(crate) struct Reused {
    /// By index: the recorded state of each step before the first one run again.
    pub(crate) steps: Vec<(usize, StepState)>,
    /// One `step_succeeded` (or `step_skipped`) per reused step, naming where it came from.
    pub(crate) events: Vec<NewEvent>,
}

pub(crate) fn check_note(note: Option<&str>, required: bool) -> Result<Option<String>, EngineError> {
    match note.map(str::trim) {
        Some(text) if !text.is_empty() && text.chars().count() <= MAX_NOTE_CHARS && !text.contains('\0') => {
            Ok(Some(text.to_string()))
        }
        None if !required => Ok(None),
        _ => Err(EngineError::InvalidNote),
    }
}

impl Engine {
    /// Marks the compensation of `step` that gave up (the run is `failed`) as done by hand:
    /// the step is `compensated`, the operator and their `note` (required: what they did)
    /// are in the log, and the unwind goes on at once with the steps before it, so the run
    /// ends `compensated` (or `cancelled`).
    pub async fn resolve_by_hand(
        &self,
        run_id: Uuid,
        step: &str,
        operator: &str,
        note: &str,
    ) -> Result<(), EngineError> {
        let note = check_note(Some(note), true)?.unwrap_or_default();
        let mut tx = self.inner.pool.begin().await?;
        let run = store::run_for_update(&mut tx, run_id)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        let wf = self.run_workflow(&run)?;
        let index = wf
            .steps
            .iter()
            .position(|s| s.name == step)
            .ok_or_else(|| EngineError::StepNotFound {
                run: run_id,
                step: step.to_string(),
            })?;
        if run.status != RunStatus::Failed {
            return Err(EngineError::NotAllowed {
                action: "resolve",
                status: run.status,
            });
        }
        let steps = store::steps_of(&mut *tx, run_id).await?;
        let old = store::run_state(&run, &steps);
        let status = old.steps.get(index).map(|s| s.status).unwrap_or_default();
        if status != StepStatus::CompensationFailed {
            return Err(EngineError::NothingToResolve {
                step: step.to_string(),
                status,
            });
        }
        let mut state = old.clone();
        let transition = Machine::new(&wf, &run.input)
            .resolve_by_hand(&mut state, index, operator, &note, self.now())
            .map_err(|e| EngineError::NotAllowed {
                action: "resolve",
                status: e.0,
            })?;
        let change = Change::of_row(&run, &wf, &old, &state, &transition);
        let after = applied_by_operator(apply::apply(&mut tx, change, None).await, "resolve", run_id)?;
        let audit = store::OperatorAction {
            note: Some(&note),
            ..store::OperatorAction::on_run(Actor::from(operator), "run.resolve", run_id, json!({"step": step}))
        };
        store::record_action(&mut tx, &audit).await?;
        tx.commit().await?;
        after.publish(&self.inner);
        Ok(())
    }

    /// Starts a `compensated`, `cancelled` or `failed` run again from the step `from_step`,
    /// as a new run of the same workflow version linked both ways (`retry_of` /
    /// `retried_by`): the steps before it keep the outputs the run recorded (they are not run
    /// again), and the run goes on from `from_step`. `input` replaces the input (checked like
    /// a trigger's; the change is in the new run's log). Refused when a step before
    /// `from_step` did not succeed, or was compensated: its effects no longer exist, so the
    /// restart must start at it (or earlier). A run is retried or restarted once: act on the
    /// newest run of a chain.
    pub async fn restart(
        &self,
        run_id: Uuid,
        from_step: &str,
        input: Option<Value>,
        operator: &str,
        note: Option<&str>,
    ) -> Result<Uuid, EngineError> {
        let note = check_note(note, false)?;
        let mut tx = self.inner.pool.begin().await?;
        let run = store::run_for_update(&mut tx, run_id)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        if !matches!(
            run.status,
            RunStatus::Compensated | RunStatus::Cancelled | RunStatus::Failed
        ) {
            return Err(EngineError::NotAllowed {
                action: "restart",
                status: run.status,
            });
        }
        if let Some(by) = run.retried_by {
            return Err(EngineError::AlreadyRetried { run: run_id, by });
        }
        let wf = self.run_workflow(&run)?;
        let index = wf
            .steps
            .iter()
            .position(|s| s.name == from_step)
            .ok_or_else(|| EngineError::StepNotFound {
                run: run_id,
                step: from_step.to_string(),
            })?;
        let steps = store::steps_of(&mut *tx, run_id).await?;
        let old_events = store::events_of(&mut *tx, run_id).await?;
        let mut reused = Reused {
            steps: Vec::new(),
            events: Vec::new(),
        };
        for (i, row) in steps.iter().enumerate().take(index) {
            let cannot = |why: String| EngineError::CannotRestartFrom {
                from: from_step.to_string(),
                why,
            };
            let name = &row.name;
            match row.status {
                StepStatus::Succeeded => {
                    // Where the reused work was done: the run that did it, even through
                    // several restarts.
                    let origin = old_events
                        .iter()
                        .rev()
                        .find(|e| e.kind == EventKind::StepSucceeded && e.step.as_deref() == Some(name))
                        .and_then(|e| e.detail.get("reused_from").cloned())
                        .unwrap_or_else(|| json!(run_id));
                    reused.steps.push((
                        i,
                        StepState {
                            status: StepStatus::Succeeded,
                            output: row.output.clone(),
                            ..StepState::default()
                        },
                    ));
                    reused.events.push(NewEvent {
                        kind: EventKind::StepSucceeded,
                        step: Some(name.clone()),
                        attempt: None,
                        detail: json!({"reused_from": origin, "restart_of": run_id}),
                    });
                }
                StepStatus::Skipped => {
                    reused.steps.push((
                        i,
                        StepState {
                            status: StepStatus::Skipped,
                            ..StepState::default()
                        },
                    ));
                    reused.events.push(NewEvent {
                        kind: EventKind::StepSkipped,
                        step: Some(name.clone()),
                        attempt: None,
                        detail: json!({"reason": format!("skipped in run {run_id}, restarted from `{from_step}`")}),
                    });
                }
                StepStatus::Compensated | StepStatus::Compensating | StepStatus::CompensationFailed => {
                    return Err(cannot(format!(
                        "step `{name}` was compensated ({}): its effects no longer exist; restart from `{name}` or an earlier step",
                        row.status
                    )));
                }
                StepStatus::Failed | StepStatus::Pending | StepStatus::Running => {
                    return Err(cannot(format!(
                        "step `{name}` did not succeed ({}); restart from `{name}` or an earlier step",
                        row.status
                    )));
                }
            }
        }
        let changed = input.as_ref().is_some_and(|new| new != &run.input);
        let input = input.unwrap_or_else(|| run.input.clone());
        wf.check_input(&input).map_err(EngineError::InvalidInput)?;
        wf.check_wait_input(&input, self.now(), self.inner.config.max_wait)
            .map_err(EngineError::InvalidInput)?;
        let mut created = json!({"by": operator, "restart_of": run_id, "from_step": from_step});
        if changed {
            created["input_changed"] = json!(true);
            created["previous_input"] = run.input.clone();
        }
        if let Some(note) = &note {
            created["note"] = json!(note);
        }
        let mut prepared = self.prepare_run(&wf, &input, None, Trigger::Retry, Some(run_id), created, Some(reused));
        let Some(inserted) = self.insert_prepared(&mut tx, &mut prepared).await? else {
            return Err(EngineError::Internal("the restart's run could not be inserted".into()));
        };
        let new_id = prepared.id;
        let linked = json!({"by": operator, "action": "restart", "from_step": from_step,
                            "new_run": new_id, "input_changed": changed, "note": note});
        store::link_successor(&mut tx, run_id, new_id, EventKind::OperatorRestart, &linked).await?;
        let audit = store::OperatorAction {
            note: note.as_deref(),
            ..store::OperatorAction::on_run(
                Actor::from(operator),
                "run.restart",
                run_id,
                json!({"from_step": from_step, "new_run": new_id, "input_changed": changed}),
            )
        };
        store::record_action(&mut tx, &audit).await?;
        tx.commit().await?;
        self.inner.changes.touch(run_id);
        self.inner.changes.touch(new_id);
        self.start_prepared(prepared, inserted);
        Ok(new_id)
    }
}

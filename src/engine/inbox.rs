//! Deliveries to waiting runs (DESIGN.md §9): signals, completions of asynchronous steps and
//! their heartbeats. A delivery is kept in the run's inbox under the run's row lock; when the
//! run waits for exactly it, the run becomes due, and its next owner consumes it in the
//! transaction that records the step's outcome (`executor::poll_wait`). A signal sent before
//! the run reaches its wait is kept for it; each delivery is consumed once; a delivery
//! repeated with the same `Idempotency-Key` is the same delivery.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::definition::{WaitDef, WaitFor};
use super::machine::completion_deadline;
use super::status::{StepStatus, WaitKind};
use super::{Engine, EngineError, StepError, store};

/// What became of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// The run was waiting for it: it is due now and will consume it.
    Now,
    /// Kept until the run waits for it (or, for a completion, until the attempt's answer is
    /// recorded).
    Buffered,
    /// Delivered before with the same key (or the same completion): nothing changed.
    Duplicate,
}

/// The answer to a delivery.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// The run it was delivered to.
    pub run_id: Uuid,
    /// Its id in the run's inbox.
    pub id: i64,
    /// What became of it.
    pub delivered: DeliveryOutcome,
    /// When it was received (the first time, for a duplicate).
    pub received_at: Option<DateTime<Utc>>,
    /// Whether a wait has consumed it yet.
    pub consumed: bool,
}

/// How a participant completes an asynchronous attempt.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The attempt completed (as its request's `sagaflow-attempt` header said).
    pub attempt: u32,
    /// Its output, or the error it ended with.
    pub outcome: Result<Value, StepError>,
    /// The delivery's idempotency key, if any.
    pub key: Option<String>,
}

impl Engine {
    /// Sends the signal `name` to a run: kept until the run's wait for it consumes it (at once
    /// if it waits now). Refused for a finished run and for a signal the run's workflow
    /// version declares no wait for.
    pub async fn signal(
        &self,
        run_id: Uuid,
        name: &str,
        payload: &Value,
        key: Option<&str>,
    ) -> Result<Delivery, EngineError> {
        check_key(key)?;
        let mut tx = self.inner.pool.begin().await?;
        let run = store::run_for_update(&mut tx, run_id)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        let delivery = store::Delivery {
            run_id,
            kind: WaitKind::Signal,
            name,
            attempt: None,
            payload: Some(payload),
            error: None,
            key,
        };
        if run.status.is_terminal() {
            // A webhook retried after the run finished is still the same delivery.
            if key.is_some()
                && let Some(row) = store::earlier_delivery(&mut tx, &delivery).await?
            {
                return Ok(answer(run_id, store::Delivered::Existing(row)));
            }
            return Err(EngineError::RunFinished {
                run: run_id,
                status: run.status,
            });
        }
        let wf = self.run_workflow(&run)?;
        if !wf.declares_signal(name) {
            return Err(EngineError::UnknownSignal {
                workflow: run.workflow.clone(),
                version: run.workflow_version,
                signal: name.to_string(),
            });
        }
        let delivered = store::deliver(&mut tx, &delivery, self.now()).await?;
        tx.commit().await?;
        self.inner.changes.touch(run_id);
        Ok(answer(run_id, delivered))
    }

    /// Sends a signal to the run the trigger's idempotency key `key` started.
    pub async fn signal_by_key(
        &self,
        workflow: &str,
        key: &str,
        name: &str,
        payload: &Value,
        delivery_key: Option<&str>,
    ) -> Result<Delivery, EngineError> {
        if self.inner.latest(workflow).is_none() {
            return Err(EngineError::UnknownWorkflow(workflow.to_string()));
        }
        let run = store::run_by_key(&self.inner.pool, workflow, key)
            .await?
            .ok_or_else(|| EngineError::RunKeyNotFound {
                workflow: workflow.to_string(),
                key: key.to_string(),
            })?;
        self.signal(run.id, name, payload, delivery_key).await
    }

    /// Completes attempt `completion.attempt` of the asynchronous step `step` from outside.
    /// Fenced: only the step's current attempt, while it runs or waits, is accepted (an older
    /// one is stale); a second completion of an attempt is a duplicate when it says the same,
    /// refused when it does not.
    pub async fn complete_step(
        &self,
        run_id: Uuid,
        step: &str,
        completion: Completion,
    ) -> Result<Delivery, EngineError> {
        check_key(completion.key.as_deref())?;
        let attempt = i32::try_from(completion.attempt).unwrap_or(i32::MAX);
        let (payload, error) = match &completion.outcome {
            Ok(output) => (Some(output.clone()), None),
            Err(e) => (
                None,
                Some(serde_json::to_value(e).map_err(|e| EngineError::Internal(e.to_string()))?),
            ),
        };
        let delivery = store::Delivery {
            run_id,
            kind: WaitKind::Completion,
            name: step,
            attempt: Some(attempt),
            payload: payload.as_ref(),
            error: error.clone(),
            key: completion.key.as_deref(),
        };
        let mut tx = self.inner.pool.begin().await?;
        let found = self.async_step_for_update(&mut tx, run_id, step).await;
        // The same completion sent again (a participant retrying) is the same delivery,
        // whatever became of the run since.
        if matches!(found, Ok(_) | Err(EngineError::RunFinished { .. }))
            && let Some(row) = store::earlier_delivery(&mut tx, &delivery).await?
        {
            if row.payload == payload && row.error == error {
                return Ok(answer(run_id, store::Delivered::Existing(row)));
            }
            return Err(EngineError::AlreadyCompleted {
                step: step.to_string(),
                attempt: completion.attempt,
            });
        }
        let (_, index, _) = found?;
        let steps = store::steps_of(&mut *tx, run_id).await?;
        let current = steps.get(index);
        let is_current = current.is_some_and(|s| s.status == StepStatus::Running && s.attempts == attempt);
        if !is_current {
            return Err(EngineError::StaleAttempt {
                step: step.to_string(),
                attempt: completion.attempt,
                current: match current {
                    Some(s) if s.status == StepStatus::Running => format!("attempt {} is", s.attempts),
                    Some(s) => format!("the step is {}, attempt {}", s.status, s.attempts),
                    None => "none".into(),
                },
            });
        }
        let delivered = store::deliver(&mut tx, &delivery, self.now()).await?;
        if let store::Delivered::Existing(row) = &delivered
            && (row.payload != payload || row.error != error)
        {
            return Err(EngineError::AlreadyCompleted {
                step: step.to_string(),
                attempt: completion.attempt,
            });
        }
        tx.commit().await?;
        self.inner.changes.touch(run_id);
        Ok(answer(run_id, delivered))
    }

    /// A heartbeat of the waiting attempt `attempt` of the asynchronous step `step`: its
    /// deadline moves to the step's heartbeat timeout from now (never past the step's
    /// timeout from the attempt's start). Returns the deadline now in force (`None` while
    /// the attempt's acceptance is not recorded yet: nothing to move).
    pub async fn heartbeat(
        &self,
        run_id: Uuid,
        step: &str,
        attempt: u32,
    ) -> Result<Option<DateTime<Utc>>, EngineError> {
        let mut tx = self.inner.pool.begin().await?;
        let (run, index, wait) = self.async_step_for_update(&mut tx, run_id, step).await?;
        let steps = store::steps_of(&mut *tx, run_id).await?;
        let current = steps.get(index);
        let stale = || EngineError::StaleAttempt {
            step: step.to_string(),
            attempt,
            current: current.map_or("none".into(), |s| {
                format!("the step is {}, attempt {}", s.status, s.attempts)
            }),
        };
        let Some(row) = current.filter(|s| s.status == StepStatus::Running && s.attempts == attempt as i32) else {
            return Err(stale());
        };
        let waiting = run
            .waiting()
            .filter(|w| w.step == index && w.kind == WaitKind::Completion);
        let Some(waiting) = waiting else {
            // Still in its call: the wait it will begin counts from its acceptance.
            return Ok(None);
        };
        let WaitFor::Completion {
            timeout,
            heartbeat_timeout: Some(beat),
        } = wait.what
        else {
            return Ok(Some(waiting.deadline));
        };
        let started = row.started_at.unwrap_or(waiting.deadline);
        let deadline = completion_deadline(started, timeout, Some(beat), self.now()).max(waiting.deadline);
        if deadline > waiting.deadline && !store::extend_wait(&mut tx, run_id, attempt as i32, deadline).await? {
            return Err(stale());
        }
        tx.commit().await?;
        Ok(Some(deadline))
    }

    /// The run (locked), the index of its step `step` and that step's asynchronous wait.
    async fn async_step_for_update(
        &self,
        tx: &mut sqlx::PgConnection,
        run_id: Uuid,
        step: &str,
    ) -> Result<(store::RunRow, usize, WaitDef), EngineError> {
        let run = store::run_for_update(tx, run_id)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        if run.status.is_terminal() {
            return Err(EngineError::RunFinished {
                run: run_id,
                status: run.status,
            });
        }
        let wf = self.run_workflow(&run)?;
        let Some(index) = wf.steps.iter().position(|s| s.name == step) else {
            return Err(EngineError::StepNotFound {
                run: run_id,
                step: step.to_string(),
            });
        };
        match wf.steps[index].wait.clone() {
            Some(
                wait @ WaitDef {
                    what: WaitFor::Completion { .. },
                    ..
                },
            ) => Ok((run, index, wait)),
            _ => Err(EngineError::NotAsynchronous { step: step.to_string() }),
        }
    }
}

fn check_key(key: Option<&str>) -> Result<(), EngineError> {
    match key {
        Some(key) if key.is_empty() || key.chars().count() > 255 || key.chars().any(char::is_control) => {
            Err(EngineError::InvalidIdempotencyKey)
        }
        _ => Ok(()),
    }
}

fn answer(run_id: Uuid, delivered: store::Delivered) -> Delivery {
    match delivered {
        store::Delivered::New { id, woke } => Delivery {
            run_id,
            id,
            delivered: if woke {
                DeliveryOutcome::Now
            } else {
                DeliveryOutcome::Buffered
            },
            received_at: None,
            consumed: false,
        },
        store::Delivered::Existing(row) => Delivery {
            run_id,
            id: row.id,
            delivered: DeliveryOutcome::Duplicate,
            received_at: Some(row.received_at),
            consumed: row.consumed_at.is_some(),
        },
    }
}

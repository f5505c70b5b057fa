//! A test workflow whose steps do what the run's input tells them: fail a number of times,
//! fail permanently, record partial work, sleep, block until released. Every successful
//! invoke or compensation writes a row to `test_effects` in the step's transaction, so tests
//! can count effects exactly.
//!
//! `comp_fail_while: {STEP: NAME}` fails a compensation while `test_switches` holds NAME.
//!
//! Steps: `a` (no compensation), `b` and `c` (compensable), `d` (no compensation).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::engine::{Compensate, Completed, RetryPolicy, Step, StepContext, StepDef, StepError, Workflow};
use serde_json::{Value, json};
use tokio::sync::Notify;
use uuid::Uuid;

pub const NAME: &str = "scripted";

/// Retries quickly, without jitter, so timings are exact and tests short.
pub fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::attempts(attempts)
        .initial_delay(Duration::from_millis(20))
        .backoff_factor(2.0)
        .jitter(0.0)
}

pub fn workflow() -> Workflow {
    Workflow::builder(NAME, 1)
        .description("a test workflow driven by its input")
        .subject(|input| input.get("subject").and_then(Value::as_str).map(str::to_string))
        .step(StepDef::new("a", Scripted).retry(fast_retry(3)))
        .step(
            StepDef::compensable("b", Scripted)
                .retry(fast_retry(3))
                .compensation_retry(fast_retry(3)),
        )
        .step(
            StepDef::compensable("c", Scripted)
                .retry(fast_retry(3))
                .compensation_retry(fast_retry(2))
                .timeout(Duration::from_millis(300)),
        )
        .step(StepDef::new("d", Scripted).retry(fast_retry(1)).when(|view| {
            !view.input_value()["skip"]
                .as_array()
                .is_some_and(|s| s.contains(&json!("d")))
        }))
        .build()
        .expect("valid workflow")
}

/// The name of [`local_workflow`].
pub const LOCAL_NAME: &str = "scripted-local";

/// The same steps declared local (each writes only through `ctx.db()`), so that they run in
/// fused segments.
pub fn local_workflow() -> Workflow {
    let mut builder = Workflow::builder(LOCAL_NAME, 1).description("the scripted workflow, its steps local");
    for step in workflow().steps() {
        builder = builder.step(step.clone().local());
    }
    builder.build().expect("valid workflow")
}

pub struct Scripted;

fn count(input: &Value, key: &str, step: &str) -> u32 {
    input[key][step].as_u64().unwrap_or(0) as u32
}

fn flag(input: &Value, key: &str, step: &str) -> bool {
    input[key][step].as_bool().unwrap_or(false)
}

/// Records an effect; a compensation also records what it received (`{"output": ...}` or
/// `{"partial": ...}`), so tests can check it, instead of asserting inside the step where a
/// panic would only become a retryable error.
async fn record(ctx: &mut StepContext<'_>, received: Option<Value>) -> Result<(), StepError> {
    let (run, step, phase, attempt) = (
        ctx.run_id(),
        ctx.step().to_string(),
        ctx.phase().as_str(),
        ctx.attempt() as i32,
    );
    sqlx::query("INSERT INTO test_effects (run_id, step, phase, attempt, received) VALUES ($1, $2, $3, $4, $5)")
        .bind(run)
        .bind(step)
        .bind(phase)
        .bind(attempt)
        .bind(received)
        .execute(ctx.db().await?)
        .await?;
    Ok(())
}

#[async_trait]
impl Step for Scripted {
    type Output = Value;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Value, StepError> {
        let input = ctx.view().input_value().clone();
        let step = ctx.step().to_string();
        let attempt = ctx.attempt();
        if attempt <= count(&input, "sleep_attempts", &step) {
            tokio::time::sleep(Duration::from_millis(u64::from(count(&input, "sleep_ms", &step)))).await;
        }
        if flag(&input, "permanent", &step) {
            let error = StepError::permanent(format!("{step} refuses"));
            return Err(if flag(&input, "partial", &step) {
                error.with_partial(json!({"half": step}))
            } else {
                error
            });
        }
        if attempt <= count(&input, "fail", &step) {
            return Err(StepError::retryable(format!("{step} attempt {attempt} failed")));
        }
        record(ctx, None).await?;
        if attempt <= count(&input, "block", &step) {
            gate(ctx.run_id()).entered_and_wait().await;
        }
        Ok(json!({"step": step, "attempt": attempt}))
    }
}

#[async_trait]
impl Compensate for Scripted {
    async fn compensate(&self, ctx: &mut StepContext<'_>, done: Completed<Value>) -> Result<(), StepError> {
        let input = ctx.view().input_value().clone();
        let step = ctx.step().to_string();
        let attempt = ctx.attempt();
        let received = match &done {
            Completed::Output(output) => json!({"output": output}),
            Completed::Partial(partial) => json!({"partial": partial}),
        };
        if flag(&input, "comp_permanent", &step) {
            return Err(StepError::permanent(format!("undoing {step} is impossible")));
        }
        if attempt <= count(&input, "comp_fail", &step) {
            return Err(StepError::retryable(format!("undoing {step} attempt {attempt} failed")));
        }
        if let Some(switch) = input["comp_fail_while"][&step].as_str() {
            let on: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM test_switches WHERE name = $1)")
                .bind(switch)
                .fetch_one(ctx.db().await?)
                .await?;
            if on {
                return Err(StepError::retryable(format!(
                    "undoing {step} is blocked by switch {switch}"
                )));
            }
        }
        record(ctx, Some(received)).await
    }
}

/// Lets a test hold a step inside its attempt (after it wrote its effect, before it returns).
pub struct Gate {
    entered: Notify,
    release: Notify,
    inside: Mutex<bool>,
}

impl Gate {
    async fn entered_and_wait(&self) {
        *self.inside.lock().expect("gate") = true;
        self.entered.notify_waiters();
        self.release.notified().await;
    }

    /// Waits until a step of the run is held at the gate.
    pub async fn wait_entered(&self) {
        loop {
            let entered = self.entered.notified();
            if *self.inside.lock().expect("gate") {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), entered).await;
        }
    }

    /// Lets the held step return.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

pub fn gate(run: Uuid) -> Arc<Gate> {
    static GATES: OnceLock<Mutex<HashMap<Uuid, Arc<Gate>>>> = OnceLock::new();
    let gates = GATES.get_or_init(Default::default);
    Arc::clone(gates.lock().expect("gates").entry(run).or_insert_with(|| {
        Arc::new(Gate {
            entered: Notify::new(),
            release: Notify::new(),
            inside: Mutex::new(false),
        })
    }))
}

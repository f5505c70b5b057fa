//! What a run is, as stored and as the machine decides on it: the state of its steps, how
//! an attempt failed, why the run did not complete. Plain data, written by `store` and read
//! back by `store::run_state`, with no behaviour of its own.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::status::{RunStatus, StepStatus, WaitKind};

/// How a step attempt (or a compensation attempt) failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepError {
    /// What went wrong, for operators.
    pub message: String,
    /// Whether another attempt may succeed. Permanent errors skip the remaining attempts.
    pub retryable: bool,
    /// Work the attempt did before failing that its compensation must undo (for steps whose
    /// effects are outside the run's transaction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<Value>,
    /// The earliest the next attempt may start, when the failure said so (an HTTP
    /// `Retry-After`): the retry waits at least this long, within the policy's maximum
    /// delay. Used for the decision only, not stored.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
    /// What the attempt saw, for operators (an HTTP step's status code, duration and the
    /// first bytes of the answer): logged with the failure, not stored with the step.
    #[serde(skip)]
    pub detail: Option<Value>,
}

impl StepError {
    /// An error another attempt may not hit (a timeout, a lost connection, a busy service).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            partial: None,
            retry_after: None,
            detail: None,
        }
    }

    /// An error no further attempt can fix (invalid input, a business rule).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            partial: None,
            retry_after: None,
            detail: None,
        }
    }

    /// Asks that the next attempt wait at least `delay` (within the retry policy's maximum).
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Attaches what the attempt saw, logged with the failure for operators.
    pub fn with_detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Records work done before the failure, which the step's compensation will receive.
    ///
    /// Partial work that cannot be serialized is not dropped (which would skip the
    /// compensation): the compensation still runs, receiving `{"unrecorded": why}`, and the
    /// error says so, so an operator sees that the undo may be incomplete.
    pub fn with_partial(mut self, partial: impl Serialize) -> Self {
        match serde_json::to_value(partial) {
            Ok(value) => self.partial = Some(value),
            Err(e) => {
                self.message = format!("{} (its partial work could not be recorded: {e})", self.message);
                self.partial = Some(serde_json::json!({"unrecorded": e.to_string()}));
            }
        }
        self
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {}

impl From<sqlx::Error> for StepError {
    /// Connection trouble, serialization failures and deadlocks are retryable; a violated
    /// constraint or a malformed statement is not.
    fn from(error: sqlx::Error) -> Self {
        let retryable = match &error {
            sqlx::Error::Database(db) => {
                matches!(
                    db.code().as_deref(),
                    Some("40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "53300")
                ) || db.code().is_some_and(|c| c.starts_with("08"))
            }
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                true
            }
            _ => false,
        };
        Self {
            retryable,
            ..Self::permanent(format!("database error: {error}"))
        }
    }
}

/// The persisted state of one step of a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepState {
    /// Where the step is.
    pub status: StepStatus,
    /// Invoke attempts started so far.
    pub attempts: u32,
    /// Compensation attempts started so far (reset by an operator's retry).
    pub compensation_attempts: u32,
    /// Invoke attempts lost with their worker: not charged to the retry budget.
    pub lost_attempts: u32,
    /// Compensation attempts lost with their worker.
    pub lost_compensation_attempts: u32,
    /// The output of the successful attempt.
    pub output: Option<Value>,
    /// The last error (of an invoke or a compensation attempt).
    pub error: Option<StepError>,
    /// Work a failed attempt recorded, for its compensation.
    pub partial: Option<Value>,
}

/// Why a run did not complete: the step that gave up (none for a cancel) and its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunError {
    /// The step that gave up, if a step did.
    pub step: Option<String>,
    /// What went wrong.
    pub message: String,
    /// Whether the error was retryable (and the step ran out of attempts).
    pub retryable: bool,
}

/// The persisted state of a run that the machine decides on.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    /// The run's status.
    pub status: RunStatus,
    /// One entry per step of the plan, in order.
    pub steps: Vec<StepState>,
    /// Why the run did not complete.
    pub error: Option<RunError>,
    /// The workflow's output, once completed.
    pub output: Option<Value>,
    /// An operator asked to cancel.
    pub cancel_requested: bool,
    /// An operator asked to pause: the run pauses instead of starting its next attempt.
    pub pause_requested: bool,
    /// While `paused`: the status a resume returns the run to.
    pub paused_from: Option<RunStatus>,
    /// What the run waits for, while one of its steps waits (no lease is held meanwhile).
    pub waiting: Option<Waiting>,
}

/// A step's wait: for what, by which attempt, until when.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    /// The waiting step's index in the plan.
    pub step: usize,
    /// What it waits for.
    pub kind: WaitKind,
    /// The signal's name; the step's own name for a completion or a sleep.
    pub name: String,
    /// The attempt waiting (a completion must name it; older attempts are stale).
    pub attempt: u32,
    /// When the wait ends with nothing received (for a sleep: when it is over).
    pub deadline: chrono::DateTime<chrono::Utc>,
}

impl RunState {
    /// The state of a new run of a plan with `steps` steps.
    pub fn new(steps: usize) -> Self {
        Self {
            status: RunStatus::Pending,
            steps: vec![StepState::default(); steps],
            error: None,
            output: None,
            cancel_requested: false,
            pause_requested: false,
            paused_from: None,
            waiting: None,
        }
    }
}

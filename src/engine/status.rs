//! The statuses of runs and steps and the kinds of execution-log entries, each a Rust enum
//! mirrored by a PostgreSQL enum of the same name (see `migrations/0001_engine.sql`).

use serde::{Deserialize, Serialize};

/// Where a run is in its life. See docs/contract.md §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "run_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted, not yet claimed by a worker.
    Pending,
    /// A worker is executing (or waiting to retry) its steps.
    Running,
    /// A step gave up or an operator cancelled: compensations are running.
    Compensating,
    /// Every step succeeded or was skipped.
    Completed,
    /// A step gave up and every compensation succeeded.
    Compensated,
    /// A compensation gave up: an operator must look at it.
    Failed,
    /// An operator cancelled it and every compensation succeeded.
    Cancelled,
}

impl RunStatus {
    /// Every status, in life order (for filters and counts).
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::Compensating,
        RunStatus::Completed,
        RunStatus::Compensated,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// Whether the run will not change again by itself.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Compensated | Self::Failed | Self::Cancelled
        )
    }

    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses the name used in the API.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// What an operator's retry does in this status, if it is allowed.
    pub fn retry_action(self) -> Option<RetryAction> {
        match self {
            Self::Failed => Some(RetryAction::Resume),
            Self::Compensated | Self::Cancelled => Some(RetryAction::NewRun),
            _ => None,
        }
    }

    /// Whether an operator may cancel a run in this status.
    pub fn can_cancel(self) -> bool {
        matches!(self, Self::Pending | Self::Running)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What an operator's retry means for a run, by its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAction {
    /// A `failed` run resumes: the compensation that gave up is attempted again.
    Resume,
    /// A `compensated` or `cancelled` run is started afresh as a new, linked run.
    NewRun,
}

/// Where a step of a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "step_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached yet.
    #[default]
    Pending,
    /// An attempt is in flight.
    Running,
    /// An attempt succeeded; its output is recorded.
    Succeeded,
    /// The last attempt failed (a retry may be scheduled while the run is `running`).
    Failed,
    /// Its `when` condition was false.
    Skipped,
    /// A compensation attempt is in flight.
    Compensating,
    /// Its compensation succeeded.
    Compensated,
    /// The last compensation attempt failed (retried while the run is `compensating`;
    /// given up when the run is `failed`).
    CompensationFailed,
}

impl StepStatus {
    /// Every step status, in the order of the database enum.
    pub const ALL: [StepStatus; 8] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Skipped,
        Self::Compensating,
        Self::Compensated,
        Self::CompensationFailed,
    ];

    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Compensating => "compensating",
            Self::Compensated => "compensated",
            Self::CompensationFailed => "compensation_failed",
        }
    }
}

impl std::fmt::Display for StepStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "run_trigger", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A backend called the API (or the library).
    Api,
    /// A cron schedule fired.
    Schedule,
    /// An operator retried a compensated or cancelled run.
    Retry,
}

impl Trigger {
    /// Every trigger, in the order of the database enum.
    pub const ALL: [Trigger; 3] = [Self::Api, Self::Schedule, Self::Retry];

    /// The name used in the API, the database and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Schedule => "schedule",
            Self::Retry => "retry",
        }
    }
}

/// The kind of an execution-log entry: one per transition of docs/contract.md §3.7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "event_kind", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The run was accepted (trigger, idempotency key, lineage in the detail).
    RunCreated,
    /// A worker took the run's lease (first claim, or after a retry delay or a release).
    RunClaimed,
    /// A worker took the lease of a worker that was gone or whose lease had expired.
    LeaseTakenOver,
    /// The owner gave the lease back without finishing (shutting down).
    LeaseReleased,
    /// A step attempt began.
    StepStarted,
    /// A step attempt succeeded.
    StepSucceeded,
    /// A step attempt failed (error in the detail).
    StepFailed,
    /// A step's `when` condition was false.
    StepSkipped,
    /// A new attempt (of a step or a compensation) is due at the time in the detail.
    RetryScheduled,
    /// The run began compensating (why, in the detail).
    CompensationStarted,
    /// A compensation attempt began.
    StepCompensationStarted,
    /// A compensation attempt succeeded.
    StepCompensationSucceeded,
    /// A compensation attempt failed (error in the detail).
    StepCompensationFailed,
    /// The run completed.
    RunCompleted,
    /// The run finished compensating after a failure.
    RunCompensated,
    /// A compensation gave up; the run needs an operator.
    RunFailed,
    /// The run finished compensating after an operator's cancel.
    RunCancelled,
    /// An operator asked to cancel the run.
    CancelRequested,
    /// An operator retried the run.
    OperatorRetry,
    /// The run's recorded steps do not match its workflow version's plan here: it was set
    /// aside, neither leased nor due, with the reason in the detail.
    RunParked,
}

impl EventKind {
    /// Every kind, in the order of the database enum.
    pub const ALL: [EventKind; 20] = [
        Self::RunCreated,
        Self::RunClaimed,
        Self::LeaseTakenOver,
        Self::LeaseReleased,
        Self::StepStarted,
        Self::StepSucceeded,
        Self::StepFailed,
        Self::StepSkipped,
        Self::RetryScheduled,
        Self::CompensationStarted,
        Self::StepCompensationStarted,
        Self::StepCompensationSucceeded,
        Self::StepCompensationFailed,
        Self::RunCompleted,
        Self::RunCompensated,
        Self::RunFailed,
        Self::RunCancelled,
        Self::CancelRequested,
        Self::OperatorRetry,
        Self::RunParked,
    ];

    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunCreated => "run_created",
            Self::RunClaimed => "run_claimed",
            Self::LeaseTakenOver => "lease_taken_over",
            Self::LeaseReleased => "lease_released",
            Self::StepStarted => "step_started",
            Self::StepSucceeded => "step_succeeded",
            Self::StepFailed => "step_failed",
            Self::StepSkipped => "step_skipped",
            Self::RetryScheduled => "retry_scheduled",
            Self::CompensationStarted => "compensation_started",
            Self::StepCompensationStarted => "step_compensation_started",
            Self::StepCompensationSucceeded => "step_compensation_succeeded",
            Self::StepCompensationFailed => "step_compensation_failed",
            Self::RunCompleted => "run_completed",
            Self::RunCompensated => "run_compensated",
            Self::RunFailed => "run_failed",
            Self::RunCancelled => "run_cancelled",
            Self::CancelRequested => "cancel_requested",
            Self::OperatorRetry => "operator_retry",
            Self::RunParked => "run_parked",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in RunStatus::ALL {
            assert_eq!(RunStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).ok(),
                Some(serde_json::json!(status.as_str()))
            );
        }
        assert_eq!(RunStatus::parse("done"), None);
        assert_eq!(
            serde_json::to_value(StepStatus::CompensationFailed).ok(),
            Some(serde_json::json!("compensation_failed"))
        );
    }

    #[test]
    fn operator_actions_by_status() {
        use RunStatus::*;
        let cancellable: Vec<_> = RunStatus::ALL.into_iter().filter(|s| s.can_cancel()).collect();
        assert_eq!(cancellable, [Pending, Running]);
        assert_eq!(Failed.retry_action(), Some(RetryAction::Resume));
        assert_eq!(Compensated.retry_action(), Some(RetryAction::NewRun));
        assert_eq!(Cancelled.retry_action(), Some(RetryAction::NewRun));
        for s in [Pending, Running, Compensating, Completed] {
            assert_eq!(s.retry_action(), None, "{s}");
        }
    }
}

//! The statuses of runs and steps and the kinds of execution-log entries, each a Rust enum
//! mirrored by a PostgreSQL enum of the same name (see `migrations/0001_engine.sql`).

db_enum! {
/// Where a run is in its life. See docs/contract.md §3.
#[derive(Hash, utoipa::ToSchema)]
pub enum RunStatus in "run_status" {
    /// Accepted, not yet claimed by a worker.
    Pending = "pending",
    /// A worker is executing (or waiting to retry) its steps.
    Running = "running",
    /// A step gave up or an operator cancelled: compensations are running.
    Compensating = "compensating",
    /// Every step succeeded or was skipped.
    Completed = "completed",
    /// A step gave up and every compensation succeeded.
    Compensated = "compensated",
    /// A compensation gave up: an operator must look at it.
    Failed = "failed",
    /// An operator cancelled it and every compensation succeeded.
    Cancelled = "cancelled",
    /// An operator paused it: no lease, not due, until an operator resumes it (to the status
    /// it was paused from).
    Paused = "paused",
}
}

impl RunStatus {
    /// Whether the run will not change again by itself.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Compensated | Self::Failed | Self::Cancelled
        )
    }

    /// What an operator's retry does in this status, if it is allowed.
    pub fn retry_action(self) -> Option<RetryAction> {
        match self {
            Self::Failed => Some(RetryAction::Resume),
            Self::Compensated | Self::Cancelled => Some(RetryAction::NewRun),
            _ => None,
        }
    }

    /// Whether an operator may cancel a run in this status (a paused run, if it was paused
    /// before compensating: see `Machine::request_cancel`).
    pub fn can_cancel(self) -> bool {
        matches!(self, Self::Pending | Self::Running | Self::Paused)
    }

    /// Whether an operator may pause a run in this status.
    pub fn can_pause(self) -> bool {
        matches!(self, Self::Pending | Self::Running | Self::Compensating)
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

db_enum! {
/// Where a step of a run is.
#[derive(Hash, Default, utoipa::ToSchema)]
pub enum StepStatus in "step_status" {
    /// Not reached yet.
    #[default]
    Pending = "pending",
    /// An attempt is in flight.
    Running = "running",
    /// An attempt succeeded; its output is recorded.
    Succeeded = "succeeded",
    /// The last attempt failed (a retry may be scheduled while the run is `running`).
    Failed = "failed",
    /// Its `when` condition was false.
    Skipped = "skipped",
    /// A compensation attempt is in flight.
    Compensating = "compensating",
    /// Its compensation succeeded.
    Compensated = "compensated",
    /// The last compensation attempt failed (retried while the run is `compensating`;
    /// given up when the run is `failed`).
    CompensationFailed = "compensation_failed",
}
}

db_enum! {
/// What started a run.
#[derive(utoipa::ToSchema)]
pub enum Trigger in "run_trigger" {
    /// A backend called the API (or the library).
    Api = "api",
    /// A cron schedule fired.
    Schedule = "schedule",
    /// An operator retried a compensated or cancelled run.
    Retry = "retry",
}
}

db_enum! {
/// The kind of an execution-log entry: one per transition of docs/contract.md §3.7.
#[derive(Hash, utoipa::ToSchema)]
pub enum EventKind in "event_kind" {
    /// The run was accepted (trigger, idempotency key, lineage in the detail).
    RunCreated = "run_created",
    /// A worker took the run's lease (first claim, or after a retry delay or a release).
    RunClaimed = "run_claimed",
    /// A worker took the lease of a worker that was gone or whose lease had expired.
    LeaseTakenOver = "lease_taken_over",
    /// The owner gave the lease back without finishing (shutting down).
    LeaseReleased = "lease_released",
    /// A step attempt began.
    StepStarted = "step_started",
    /// A step attempt succeeded.
    StepSucceeded = "step_succeeded",
    /// A step attempt failed (error in the detail).
    StepFailed = "step_failed",
    /// A step's `when` condition was false.
    StepSkipped = "step_skipped",
    /// A new attempt (of a step or a compensation) is due at the time in the detail.
    RetryScheduled = "retry_scheduled",
    /// The run began compensating (why, in the detail).
    CompensationStarted = "compensation_started",
    /// A compensation attempt began.
    StepCompensationStarted = "step_compensation_started",
    /// A compensation attempt succeeded.
    StepCompensationSucceeded = "step_compensation_succeeded",
    /// A compensation attempt failed (error in the detail).
    StepCompensationFailed = "step_compensation_failed",
    /// The run completed.
    RunCompleted = "run_completed",
    /// The run finished compensating after a failure.
    RunCompensated = "run_compensated",
    /// A compensation gave up; the run needs an operator.
    RunFailed = "run_failed",
    /// The run finished compensating after an operator's cancel.
    RunCancelled = "run_cancelled",
    /// An operator asked to cancel the run.
    CancelRequested = "cancel_requested",
    /// An operator retried the run.
    OperatorRetry = "operator_retry",
    /// The run's recorded steps do not match its workflow version's plan here: it was set
    /// aside, neither leased nor due, with the reason in the detail.
    RunParked = "run_parked",
    /// A step began waiting (for a signal, a completion or time), until its deadline.
    StepWaiting = "step_waiting",
    /// A waiting step consumed the signal it waited for.
    SignalReceived = "signal_received",
    /// An asynchronous step was completed from outside (with an output or an error).
    StepCompletedExternally = "step_completed_externally",
    /// A wait reached its deadline with nothing received.
    WaitTimedOut = "wait_timed_out",
    /// An operator marked a compensation that gave up as done by hand (who, and their
    /// note); the unwind went on.
    StepResolvedByHand = "step_resolved_by_hand",
    /// An operator restarted the run from a step, as a new run (who, from which step, the
    /// new run, the note).
    OperatorRestart = "operator_restart",
    /// An operator asked to pause the run while an attempt was in flight: it pauses once
    /// that attempt is recorded.
    PauseRequested = "pause_requested",
    /// The run was paused: no lease, not due, until resumed (who asked, in the detail).
    RunPaused = "run_paused",
    /// An operator resumed the run (or withdrew a pause not yet taken).
    RunResumed = "run_resumed",
}
}

db_enum! {
/// What a waiting step waits for (DESIGN.md §9).
#[derive(Hash, utoipa::ToSchema)]
pub enum WaitKind in "wait_kind" {
    /// A named signal (`POST /v1/runs/{id}/signals/{name}`).
    Signal = "signal",
    /// The completion of an asynchronous step's attempt
    /// (`POST /v1/runs/{id}/steps/{step}/complete`).
    Completion = "completion",
    /// Time: a sleep for a duration or until a moment taken from the input.
    Sleep = "sleep",
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
        assert_eq!(cancellable, [Pending, Running, Paused]);
        let pausable: Vec<_> = RunStatus::ALL.into_iter().filter(|s| s.can_pause()).collect();
        assert_eq!(pausable, [Pending, Running, Compensating]);
        assert_eq!(Failed.retry_action(), Some(RetryAction::Resume));
        assert_eq!(Compensated.retry_action(), Some(RetryAction::NewRun));
        assert_eq!(Cancelled.retry_action(), Some(RetryAction::NewRun));
        for s in [Pending, Running, Compensating, Completed, Paused] {
            assert_eq!(s.retry_action(), None, "{s}");
        }
    }
}

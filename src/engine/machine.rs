//! The saga state machine: what happens to a run when a step succeeds or fails, when a worker
//! takes it over, when an operator cancels or retries it.
//!
//! Everything here is pure: a [`RunState`] and an [`Event`] go in; the state is updated and a
//! [`Transition`] comes out, listing the execution-log entries to append and what the worker
//! must do [`Next`]. The executor persists the transition in one transaction and then does
//! what it says. No I/O, no clock, no randomness (the caller passes `now` and a jitter
//! sample), so every decision is unit-tested below without a database.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::definition::{OnTimeout, Phase, RunView, WaitFor, Workflow, moment_at};
use super::state::{RunError, RunState, StepError, Waiting};
use super::status::{EventKind, RunStatus, StepStatus, WaitKind};

/// Something that happened to a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A worker took the lease: `taken_over_from` names the previous owner when that owner
    /// never gave it back (it crashed, paused or lost its database session).
    Claimed {
        /// The worker taking the run.
        by: String,
        /// The owner whose lease was taken over, if any.
        taken_over_from: Option<String>,
    },
    /// The owner lost its database connection while recording an outcome and reloaded the
    /// run: whatever attempt it had in flight is treated as lost.
    Resumed {
        /// Why the owner resumed.
        reason: String,
    },
    /// A step attempt succeeded with this output.
    StepSucceeded {
        /// The step's index in the plan.
        step: usize,
        /// The output to record.
        output: Value,
    },
    /// A step attempt failed.
    StepFailed {
        /// The step's index in the plan.
        step: usize,
        /// The error.
        error: StepError,
    },
    /// An attempt of an asynchronous step was accepted and will be completed from outside
    /// (`StepContext::complete_later`).
    StepAccepted {
        /// The step's index in the plan.
        step: usize,
        /// What the participant answered, kept as the step's partial work.
        accepted: Value,
    },
    /// The waiting step was looked at, under the run's lock: what had arrived for it, if
    /// anything. (Nothing: the run waits on, unless its deadline has passed.)
    WaitPolled {
        /// The step's index in the plan.
        step: usize,
        /// The signal or completion taken from the run's inbox, if one was there.
        arrival: Option<Arrival>,
    },
    /// A compensation attempt succeeded.
    CompensationSucceeded {
        /// The step's index in the plan.
        step: usize,
    },
    /// A compensation attempt failed.
    CompensationFailed {
        /// The step's index in the plan.
        step: usize,
        /// The error.
        error: StepError,
    },
}

/// Something that arrived for a waiting step, consumed in the transaction that records what
/// follows.
#[derive(Debug, Clone, PartialEq)]
pub enum Arrival {
    /// The signal the step waits for.
    Signal {
        /// Its row in the run's inbox.
        id: i64,
        /// Its payload: the step's output.
        payload: Value,
        /// When it was received (before the wait began, if it was kept for it).
        received_at: DateTime<Utc>,
        /// The delivery's idempotency key, if it had one.
        key: Option<String>,
    },
    /// The completion of the waiting attempt.
    Completion {
        /// Its row in the run's inbox.
        id: i64,
        /// The output, or the error the participant reported.
        outcome: Result<Value, StepError>,
    },
}

/// What the caller knows that the machine must not find out for itself.
#[derive(Debug, Clone, Copy)]
pub struct Conditions {
    /// The worker is shutting down: start nothing new, give the lease back.
    pub draining: bool,
    /// A uniform sample from `[0, 1)` for the jitter of a retry delay.
    pub jitter: f64,
    /// The current time, for the time of a scheduled retry.
    pub now: DateTime<Utc>,
}

/// What the worker does after persisting a transition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Run an attempt of this step's invoke.
    Invoke(usize),
    /// Run an attempt of this step's compensation.
    Compensate(usize),
    /// Look in the run's inbox for what this waiting step waits for (under the run's lock),
    /// and hand the run back until its deadline if nothing is there.
    Await(usize),
    /// Give the lease back and hold the run `paused`: neither leased nor due until an
    /// operator resumes it (a wait in progress is kept, deadline and all).
    Pause,
    /// Give the lease back; the run is due again at `ready_at` (a retry delay, or shutdown).
    Release {
        /// When the run may be claimed again.
        ready_at: DateTime<Utc>,
    },
    /// The run reached this terminal status. Its effects, all applied by `apply`: the run row
    /// becomes terminal and its lease is dropped, the workflow's finish hook runs in the same
    /// transaction, and after commit the callers waiting for the run are woken and the finish
    /// is counted.
    Finish(RunStatus),
}

/// Which timestamp of a step row the transition sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeMark {
    /// An attempt began: set `started_at`, clear `finished_at`.
    Started,
    /// An attempt ended: set `finished_at`.
    Finished,
}

/// An execution-log entry to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// What happened.
    pub kind: EventKind,
    /// The step concerned, if any.
    pub step: Option<String>,
    /// The attempt concerned, if any.
    pub attempt: Option<u32>,
    /// Details (errors, times, who).
    pub detail: Value,
}

/// The outcome of a decision: log entries, step timestamps, and what to do next.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Entries to append to the execution log, in order.
    pub events: Vec<NewEvent>,
    /// Step timestamps to set, by step index.
    pub marks: BTreeMap<usize, TimeMark>,
    /// The inbox row (a signal or a completion) this decision consumes: marked consumed in
    /// the transaction that records it, so each is consumed exactly once.
    pub consume: Option<i64>,
    /// What the worker does next.
    pub next: Next,
}

/// The log entries and step marks of a decision being made; it becomes a [`Transition`]
/// once the decision names what follows.
#[derive(Debug, Default)]
struct Draft {
    events: Vec<NewEvent>,
    marks: BTreeMap<usize, TimeMark>,
    consume: Option<i64>,
}

impl Draft {
    fn decided(self, next: Next) -> Transition {
        Transition {
            events: self.events,
            marks: self.marks,
            consume: self.consume,
            next,
        }
    }

    fn log(&mut self, kind: EventKind, step: Option<&str>, attempt: Option<u32>, detail: Value) {
        self.events.push(NewEvent {
            kind,
            step: step.map(str::to_string),
            attempt,
            detail,
        });
    }
}

impl Transition {
    /// Two decisions in a row taken as one (a fused segment writes them together): the entries
    /// of both in order, the later mark of each step, and what the later said to do next. The
    /// writer keeps the time of every entry and mark itself, since a step can be both started
    /// and finished within the pair.
    pub fn then(mut self, later: Transition) -> Transition {
        self.events.extend(later.events);
        self.marks.extend(later.marks);
        self.consume = later.consume.or(self.consume);
        self.next = later.next;
        self
    }
}

#[cfg(test)]
impl Transition {
    /// The kinds of the log entries, for assertions.
    fn kinds(&self) -> Vec<EventKind> {
        self.events.iter().map(|e| e.kind).collect()
    }
}

/// How many attempts of one step (or of its compensation) may be lost with their worker
/// before the step is given up on: a step that crashes every process that runs it must not
/// take the whole fleet down in turn forever.
pub const MAX_LOST_ATTEMPTS: u32 = 5;

/// Why an attempt ended without success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The attempt returned an error (or timed out): charged to the retry budget, retried
    /// after the policy's backoff.
    Attempt,
    /// The attempt was lost with its worker: not charged, retried at once, bounded by
    /// [`MAX_LOST_ATTEMPTS`].
    Lost,
}

/// Who acts on a run from outside (an operator, maybe within a bulk action), as the log
/// names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor<'a> {
    /// The operator.
    pub by: &'a str,
    /// The bulk action this is part of, if any.
    pub bulk: Option<uuid::Uuid>,
    /// What the operator said of it, if anything.
    pub note: Option<&'a str>,
}

impl<'a> From<&'a str> for Actor<'a> {
    fn from(by: &'a str) -> Self {
        Self {
            by,
            bulk: None,
            note: None,
        }
    }
}

impl Actor<'_> {
    /// `fields` with who acted (`by`, `bulk_id` within a bulk action, and their `note`).
    pub fn detail(&self, mut fields: Value) -> Value {
        fields["by"] = json!(self.by);
        if let Some(bulk) = self.bulk {
            fields["bulk_id"] = json!(bulk);
        }
        if let Some(note) = self.note {
            fields["note"] = json!(note);
        }
        fields
    }
}

/// An operator action the run's status does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not allowed while the run is {0}")]
pub struct NotAllowed(pub RunStatus);

/// Decides transitions for runs of one workflow.
pub struct Machine<'a> {
    workflow: &'a Workflow,
    input: &'a Value,
}

impl<'a> Machine<'a> {
    /// A machine for runs of `workflow` with this input.
    pub fn new(workflow: &'a Workflow, input: &'a Value) -> Self {
        Self { workflow, input }
    }

    fn name(&self, step: usize) -> &'a str {
        self.workflow.steps.get(step).map(|s| s.name.as_str()).unwrap_or("?")
    }

    /// Applies `event` to `state` and decides what follows.
    pub fn handle(&self, state: &mut RunState, event: Event, cond: &Conditions) -> Transition {
        let mut t = Draft::default();
        let stop = match event {
            Event::Claimed { by, taken_over_from } => {
                match taken_over_from {
                    Some(from) => t.log(EventKind::LeaseTakenOver, None, None, json!({"from": from, "by": by})),
                    None => t.log(EventKind::RunClaimed, None, None, json!({"by": by})),
                }
                if state.status == RunStatus::Pending {
                    state.status = RunStatus::Running;
                }
                self.settle_lost_attempts(
                    state,
                    "the worker running it stopped before recording an outcome",
                    &mut t,
                )
            }
            Event::Resumed { reason } => self.settle_lost_attempts(state, &reason, &mut t),
            Event::StepSucceeded { step, output } => {
                self.succeeded(state, step, output, json!({}), &mut t);
                None
            }
            Event::StepAccepted { step, accepted } => self.accepted(state, step, accepted, cond, &mut t),
            Event::WaitPolled { step, arrival } => self.polled(state, step, arrival, cond, &mut t),
            Event::StepFailed { step, error } => {
                self.attempt_failed(state, (step, Phase::Invoke), error, Failure::Attempt, cond, &mut t)
            }
            Event::CompensationSucceeded { step } => {
                let s = &mut state.steps[step];
                s.status = StepStatus::Compensated;
                let attempt = s.compensation_attempts;
                t.log(
                    EventKind::StepCompensationSucceeded,
                    Some(self.name(step)),
                    Some(attempt),
                    json!({}),
                );
                None
            }
            Event::CompensationFailed { step, error } => {
                self.attempt_failed(state, (step, Phase::Compensate), error, Failure::Attempt, cond, &mut t)
            }
        };
        let next = match stop {
            Some(next) => next,
            None => self.advance(state, cond, &mut t),
        };
        // A pause asked for takes effect whenever the run would otherwise be handed back or
        // wait: after the attempt in flight, never in the middle of one.
        let next = match next {
            Next::Release { .. } | Next::Await(_) if state.pause_requested => self.pause(state, None, &mut t),
            Next::Finish(status) => {
                // Nothing is left to pause.
                state.pause_requested = false;
                Next::Finish(status)
            }
            other => other,
        };
        t.decided(next)
    }

    /// The run is paused from where it is (`pending`, `running` or `compensating`): the
    /// status a resume returns it to is kept. `by` names the operator when the pause takes
    /// effect in their own request (an unleased run); otherwise their request was logged.
    fn pause(&self, state: &mut RunState, by: Option<Actor<'_>>, t: &mut Draft) -> Next {
        let from = state.status;
        state.paused_from = Some(from);
        state.status = RunStatus::Paused;
        state.pause_requested = false;
        let mut detail = json!({"from": from.as_str()});
        if let Some(waiting) = &state.waiting {
            detail["waiting_for"] = json!(waiting.name);
        }
        if let Some(by) = by {
            detail = by.detail(detail);
        }
        t.log(EventKind::RunPaused, None, None, detail);
        Next::Pause
    }

    /// Attempts in flight when their worker was lost are recorded as lost and retried at once,
    /// without charging the step's retry budget.
    fn settle_lost_attempts(&self, state: &mut RunState, reason: &str, t: &mut Draft) -> Option<Next> {
        let immediate = Conditions {
            draining: false,
            jitter: 0.0,
            now: DateTime::<Utc>::MIN_UTC,
        };
        for step in 0..state.steps.len() {
            if state.waiting.as_ref().is_some_and(|w| w.step == step) {
                // Waiting, not in flight: nothing was lost.
                continue;
            }
            let lost = StepError::retryable(format!("attempt lost: {reason}"));
            let stop = match state.steps[step].status {
                StepStatus::Running => {
                    self.attempt_failed(state, (step, Phase::Invoke), lost, Failure::Lost, &immediate, t)
                }
                StepStatus::Compensating => {
                    self.attempt_failed(state, (step, Phase::Compensate), lost, Failure::Lost, &immediate, t)
                }
                _ => None,
            };
            if stop.is_some() {
                return stop;
            }
        }
        None
    }

    /// An attempt of a step's invoke or compensation failed (or was lost with its worker):
    /// record it, then retry it (after the policy's backoff, or at once when lost), or give up:
    /// an invoke that gives up starts the compensation, a compensation that gives up fails
    /// the run.
    fn attempt_failed(
        &self,
        state: &mut RunState,
        (step, phase): (usize, Phase),
        mut error: StepError,
        failure: Failure,
        cond: &Conditions,
        t: &mut Draft,
    ) -> Option<Next> {
        let name = self.name(step);
        let def = &self.workflow.steps[step];
        let s = &mut state.steps[step];
        let (attempts, lost, policy, what) = match phase {
            Phase::Invoke => (s.attempts, &mut s.lost_attempts, &def.retry, "attempts"),
            Phase::Compensate => (
                s.compensation_attempts,
                &mut s.lost_compensation_attempts,
                &def.compensation_retry,
                "compensation attempts",
            ),
        };
        if failure == Failure::Lost {
            *lost += 1;
            if *lost > MAX_LOST_ATTEMPTS {
                let suspect = match phase {
                    Phase::Invoke => "the step may be crashing it",
                    Phase::Compensate => "it may be crashing it",
                };
                error = StepError::permanent(format!("{} {what} were lost with their worker; {suspect}", *lost));
            }
        }
        let charged = attempts.saturating_sub(*lost);
        let mut detail = json!({"error": error.message, "retryable": error.retryable});
        if failure == Failure::Lost {
            detail["lost"] = json!(true);
        }
        if let Some(seen) = &error.detail {
            detail["attempt"] = seen.clone();
        }
        let kind = match phase {
            Phase::Invoke => {
                // Only an invoke records partial work: it is what its compensation undoes.
                if let Some(partial) = &error.partial {
                    s.partial = Some(partial.clone());
                    detail["partial"] = partial.clone();
                }
                s.status = StepStatus::Failed;
                t.marks.insert(step, TimeMark::Finished);
                EventKind::StepFailed
            }
            Phase::Compensate => {
                s.status = StepStatus::CompensationFailed;
                EventKind::StepCompensationFailed
            }
        };
        s.error = Some(error.clone());
        t.log(kind, Some(name), Some(attempts), detail);
        if phase == Phase::Invoke && state.cancel_requested {
            return None;
        }
        if error.retryable && (failure == Failure::Lost || policy.allows_another(charged)) {
            if failure == Failure::Attempt {
                let mut delay = policy.delay_after(charged, cond.jitter);
                if let Some(asked) = error.retry_after {
                    delay = delay.max(asked.min(policy.max_delay));
                }
                if !delay.is_zero() {
                    return Some(schedule_retry(name, attempts + 1, phase.as_str(), delay, cond, t));
                }
            }
            return None;
        }
        let run_error = RunError {
            step: Some(name.to_string()),
            message: error.message.clone(),
            retryable: error.retryable,
        };
        match phase {
            Phase::Invoke => {
                state.error = Some(run_error);
                let why = if error.retryable {
                    "ran out of attempts"
                } else {
                    "failed permanently"
                };
                self.begin_compensation(state, format!("step `{name}` {why}: {}", error.message), t);
                None
            }
            Phase::Compensate => {
                state.status = RunStatus::Failed;
                state.error.get_or_insert(run_error);
                t.log(
                    EventKind::RunFailed,
                    None,
                    None,
                    json!({"step": name, "error": format!("compensation of `{name}` gave up: {}", error.message)}),
                );
                Some(Next::Finish(RunStatus::Failed))
            }
        }
    }

    fn begin_compensation(&self, state: &mut RunState, reason: String, t: &mut Draft) {
        state.status = RunStatus::Compensating;
        t.log(EventKind::CompensationStarted, None, None, json!({"reason": reason}));
    }

    fn needs_compensation(&self, state: &RunState, step: usize) -> bool {
        if !self.workflow.steps[step].has_compensation() {
            return false;
        }
        let s = &state.steps[step];
        match s.status {
            StepStatus::Succeeded | StepStatus::Compensating | StepStatus::CompensationFailed => true,
            StepStatus::Failed => s.partial.is_some(),
            _ => false,
        }
    }

    /// Moves the run forward until there is an attempt to make, a wait, or an end.
    fn advance(&self, state: &mut RunState, cond: &Conditions, t: &mut Draft) -> Next {
        loop {
            match state.status {
                RunStatus::Pending | RunStatus::Running => {
                    state.status = RunStatus::Running;
                    if state.cancel_requested {
                        self.end_wait_for_cancel(state, t);
                        if state.error.is_none() {
                            state.error = Some(RunError {
                                step: None,
                                message: "cancelled by an operator".into(),
                                retryable: false,
                            });
                        }
                        self.begin_compensation(state, "cancelled by an operator".into(), t);
                        continue;
                    }
                    let next = state.steps.iter().position(|s| {
                        matches!(s.status, StepStatus::Pending | StepStatus::Running | StepStatus::Failed)
                    });
                    let Some(step) = next else {
                        state.status = RunStatus::Completed;
                        let view = RunView {
                            input: self.input,
                            plan: &self.workflow.steps,
                            states: &state.steps,
                        };
                        state.output = Some(self.workflow.output_of(&view));
                        t.log(EventKind::RunCompleted, None, None, json!({}));
                        return Next::Finish(RunStatus::Completed);
                    };
                    if state.waiting.as_ref().is_some_and(|w| w.step == step) {
                        return Next::Await(step);
                    }
                    if state.steps[step].status == StepStatus::Pending && !self.condition_holds(state, step) {
                        state.steps[step].status = StepStatus::Skipped;
                        t.log(
                            EventKind::StepSkipped,
                            Some(self.name(step)),
                            None,
                            json!({"reason": "its `when` condition was false"}),
                        );
                        continue;
                    }
                    match self.start_attempt(state, step, cond, t) {
                        Some(next) => return next,
                        None => continue,
                    }
                }
                RunStatus::Compensating => {
                    let next = (0..state.steps.len())
                        .rev()
                        .find(|&i| self.needs_compensation(state, i));
                    let Some(step) = next else {
                        let (status, kind) = if state.cancel_requested {
                            (RunStatus::Cancelled, EventKind::RunCancelled)
                        } else {
                            (RunStatus::Compensated, EventKind::RunCompensated)
                        };
                        state.status = status;
                        t.log(kind, None, None, json!({}));
                        return Next::Finish(status);
                    };
                    return self.start_compensation(state, step, cond, t);
                }
                status @ (RunStatus::Completed | RunStatus::Compensated | RunStatus::Failed | RunStatus::Cancelled) => {
                    return Next::Finish(status);
                }
                // Only a resume moves a paused run (no worker holds or claims one).
                RunStatus::Paused => return Next::Pause,
            }
        }
    }

    fn condition_holds(&self, state: &RunState, step: usize) -> bool {
        match &self.workflow.steps[step].when {
            None => true,
            Some(condition) => {
                let view = RunView {
                    input: self.input,
                    plan: &self.workflow.steps,
                    states: &state.steps,
                };
                condition(&view)
            }
        }
    }

    /// Starts an attempt of `step`: its invoke, or, for a step that only waits, its wait.
    /// `None` when the wait could not even begin (a sleep whose moment the input lacks) and
    /// the failure decided nothing to do now: the run moves on.
    fn start_attempt(&self, state: &mut RunState, step: usize, cond: &Conditions, t: &mut Draft) -> Option<Next> {
        if state.pause_requested {
            return Some(self.pause(state, None, t));
        }
        if cond.draining {
            return Some(release_for_shutdown(cond, t));
        }
        let def = &self.workflow.steps[step];
        let s = &mut state.steps[step];
        s.status = StepStatus::Running;
        s.attempts += 1;
        let attempt = s.attempts;
        t.marks.insert(step, TimeMark::Started);
        t.log(EventKind::StepStarted, Some(self.name(step)), Some(attempt), json!({}));
        let Some(wait) = def.wait.as_ref().filter(|_| def.only_waits()) else {
            return Some(Next::Invoke(step));
        };
        let (name, deadline) = match &wait.what {
            WaitFor::Signal { name, timeout } => (name.clone(), after(cond.now, *timeout)),
            WaitFor::Sleep(duration) => (def.name.clone(), after(cond.now, *duration)),
            WaitFor::SleepUntil(pointer) => match moment_at(self.input, pointer) {
                Ok(at) => (def.name.clone(), at),
                Err(why) => {
                    let error = StepError::permanent(format!("cannot sleep: {why}"));
                    return self.attempt_failed(state, (step, Phase::Invoke), error, Failure::Attempt, cond, t);
                }
            },
            WaitFor::Completion { .. } => return Some(Next::Invoke(step)),
        };
        Some(self.begin_wait(state, step, wait.what.kind(), name, deadline, t))
    }

    /// The step waits from now on: no lease is held while it does (the executor looks in the
    /// inbox first, since what it waits for may already be there).
    fn begin_wait(
        &self,
        state: &mut RunState,
        step: usize,
        kind: WaitKind,
        name: String,
        deadline: DateTime<Utc>,
        t: &mut Draft,
    ) -> Next {
        let attempt = state.steps[step].attempts;
        t.log(
            EventKind::StepWaiting,
            Some(self.name(step)),
            Some(attempt),
            json!({"kind": kind.as_str(), "name": name, "deadline": deadline}),
        );
        state.waiting = Some(Waiting {
            step,
            kind,
            name,
            attempt,
            deadline,
        });
        Next::Await(step)
    }

    fn succeeded(&self, state: &mut RunState, step: usize, output: Value, detail: Value, t: &mut Draft) {
        let s = &mut state.steps[step];
        s.status = StepStatus::Succeeded;
        s.output = Some(output);
        s.error = None;
        let attempt = s.attempts;
        t.marks.insert(step, TimeMark::Finished);
        t.log(EventKind::StepSucceeded, Some(self.name(step)), Some(attempt), detail);
    }

    /// An attempt of an asynchronous step was accepted: the step waits for its completion.
    fn accepted(
        &self,
        state: &mut RunState,
        step: usize,
        accepted: Value,
        cond: &Conditions,
        t: &mut Draft,
    ) -> Option<Next> {
        let Some(WaitFor::Completion {
            timeout,
            heartbeat_timeout,
        }) = self.workflow.steps[step].wait.as_ref().map(|w| &w.what)
        else {
            let error = StepError::permanent(
                "the step asked to complete later, but it is not declared asynchronous (no deadline to wait until)",
            );
            return self.attempt_failed(state, (step, Phase::Invoke), error, Failure::Attempt, cond, t);
        };
        state.steps[step].partial = Some(accepted);
        let deadline = completion_deadline(cond.now, *timeout, *heartbeat_timeout, cond.now);
        let name = self.name(step).to_string();
        Some(self.begin_wait(state, step, WaitKind::Completion, name, deadline, t))
    }

    /// What a look in the inbox found for the waiting step, or that its deadline passed.
    fn polled(
        &self,
        state: &mut RunState,
        step: usize,
        arrival: Option<Arrival>,
        cond: &Conditions,
        t: &mut Draft,
    ) -> Option<Next> {
        let Some(waiting) = state.waiting.clone().filter(|w| w.step == step) else {
            // Not waiting (any more): the run goes on from where it is.
            return None;
        };
        let name = self.name(step);
        let attempt = Some(waiting.attempt);
        match arrival {
            Some(Arrival::Signal {
                id,
                payload,
                received_at,
                key,
            }) => {
                state.waiting = None;
                t.consume = Some(id);
                t.log(
                    EventKind::SignalReceived,
                    Some(name),
                    attempt,
                    json!({"signal": waiting.name, "inbox_id": id, "received_at": received_at, "idempotency_key": key}),
                );
                self.succeeded(state, step, payload, json!({}), t);
                None
            }
            Some(Arrival::Completion { id, outcome }) => {
                state.waiting = None;
                t.consume = Some(id);
                let mut detail = json!({"inbox_id": id, "outcome": if outcome.is_ok() { "output" } else { "error" }});
                if let Err(error) = &outcome {
                    detail["error"] = json!(error.message);
                }
                t.log(EventKind::StepCompletedExternally, Some(name), attempt, detail);
                match outcome {
                    Ok(output) => {
                        self.succeeded(state, step, output, json!({}), t);
                        None
                    }
                    Err(error) => {
                        let error = with_accepted_work(state, step, error);
                        self.attempt_failed(state, (step, Phase::Invoke), error, Failure::Attempt, cond, t)
                    }
                }
            }
            // A cancel asked for meanwhile ends the wait now (see `advance`).
            None if state.cancel_requested => None,
            None if cond.now < waiting.deadline => Some(Next::Release {
                ready_at: waiting.deadline,
            }),
            None => {
                state.waiting = None;
                if waiting.kind == WaitKind::Sleep {
                    self.succeeded(state, step, Value::Null, json!({"slept_until": waiting.deadline}), t);
                    return None;
                }
                let on_timeout = self.workflow.steps[step]
                    .wait
                    .as_ref()
                    .map(|w| w.on_timeout)
                    .unwrap_or_default();
                t.log(
                    EventKind::WaitTimedOut,
                    Some(name),
                    attempt,
                    json!({"kind": waiting.kind.as_str(), "name": waiting.name, "deadline": waiting.deadline,
                           "on_timeout": match on_timeout { OnTimeout::Fail => "fail", OnTimeout::Continue => "continue" }}),
                );
                match on_timeout {
                    OnTimeout::Continue => {
                        self.succeeded(state, step, Value::Null, json!({"on_timeout": "continue"}), t);
                        None
                    }
                    OnTimeout::Fail => {
                        let what = match waiting.kind {
                            WaitKind::Signal => format!("signal `{}`", waiting.name),
                            _ => "its completion".to_string(),
                        };
                        let error = StepError::permanent(format!(
                            "waited for {what} until {}; nothing arrived",
                            waiting.deadline.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        ));
                        let error = with_accepted_work(state, step, error);
                        self.attempt_failed(state, (step, Phase::Invoke), error, Failure::Attempt, cond, t)
                    }
                }
            }
        }
    }

    /// A cancel ends a wait at once: the waiting step fails (permanently), so that what it
    /// was accepted to do (an asynchronous step's partial work) is compensated with the rest.
    fn end_wait_for_cancel(&self, state: &mut RunState, t: &mut Draft) {
        let Some(waiting) = state.waiting.take() else {
            return;
        };
        let s = &mut state.steps[waiting.step];
        let message = "cancelled by an operator while waiting".to_string();
        s.status = StepStatus::Failed;
        s.error = Some(StepError::permanent(message.clone()));
        t.marks.insert(waiting.step, TimeMark::Finished);
        let mut detail = json!({"error": message, "retryable": false, "waiting_for": waiting.name});
        if let Some(partial) = &s.partial {
            detail["partial"] = partial.clone();
        }
        t.log(
            EventKind::StepFailed,
            Some(self.name(waiting.step)),
            Some(waiting.attempt),
            detail,
        );
    }

    fn start_compensation(&self, state: &mut RunState, step: usize, cond: &Conditions, t: &mut Draft) -> Next {
        if state.pause_requested {
            return self.pause(state, None, t);
        }
        if cond.draining {
            return release_for_shutdown(cond, t);
        }
        let s = &mut state.steps[step];
        s.status = StepStatus::Compensating;
        s.compensation_attempts += 1;
        let attempt = s.compensation_attempts;
        t.log(
            EventKind::StepCompensationStarted,
            Some(self.name(step)),
            Some(attempt),
            json!({}),
        );
        Next::Compensate(step)
    }

    /// The workflow's finish hook refused the status `refused` was about to end the run in:
    /// the run ends `failed` instead, needing an operator, and the hook is not asked again.
    /// The refused transition's own log entries stay (what happened to the steps is true),
    /// except the terminal entry it would have ended with.
    pub fn refuse_finish(&self, state: &mut RunState, mut refused: Transition, error: &StepError) -> Transition {
        let message = format!(
            "the workflow's finish hook refused the run's final status: {}",
            error.message
        );
        if refused.events.last().is_some_and(|e| {
            matches!(
                e.kind,
                EventKind::RunCompleted | EventKind::RunCompensated | EventKind::RunCancelled | EventKind::RunFailed
            )
        }) {
            refused.events.pop();
        }
        state.status = RunStatus::Failed;
        state.output = None;
        state.error = Some(RunError {
            step: None,
            message: message.clone(),
            retryable: error.retryable,
        });
        refused.events.push(NewEvent {
            kind: EventKind::RunFailed,
            step: None,
            attempt: None,
            detail: json!({"error": message, "finish_hook": true}),
        });
        refused.next = Next::Finish(RunStatus::Failed);
        refused
    }

    /// An operator resumes a `failed` run: the compensation that gave up gets a fresh budget
    /// of attempts, and the run is due at once.
    pub fn operator_retry<'b>(
        &self,
        state: &mut RunState,
        by: impl Into<Actor<'b>>,
        now: DateTime<Utc>,
    ) -> Result<Transition, NotAllowed> {
        let by = by.into();
        if state.status != RunStatus::Failed {
            return Err(NotAllowed(state.status));
        }
        let mut t = Draft::default();
        let mut resumed = Vec::new();
        for (i, s) in state.steps.iter_mut().enumerate() {
            if s.status == StepStatus::CompensationFailed {
                s.compensation_attempts = 0;
                s.lost_compensation_attempts = 0;
                resumed.push(self.name(i));
            }
        }
        state.status = RunStatus::Compensating;
        t.log(
            EventKind::OperatorRetry,
            None,
            None,
            by.detail(json!({"action": "resume", "steps": resumed})),
        );
        Ok(t.decided(Next::Release { ready_at: now }))
    }

    /// An operator marks the compensation of `step` that gave up (the run is `failed`) as
    /// done by hand, with a note saying what they did: the step is `compensated`, and the
    /// unwind goes on with the steps before it, at once. The run keeps its original error.
    pub fn resolve_by_hand(
        &self,
        state: &mut RunState,
        step: usize,
        by: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> Result<Transition, NotAllowed> {
        let gave_up = state.steps.get(step).map(|s| s.status) == Some(StepStatus::CompensationFailed);
        if state.status != RunStatus::Failed || !gave_up {
            return Err(NotAllowed(state.status));
        }
        let mut t = Draft::default();
        let s = &mut state.steps[step];
        s.status = StepStatus::Compensated;
        let attempt = s.compensation_attempts;
        state.status = RunStatus::Compensating;
        t.log(
            EventKind::StepResolvedByHand,
            Some(self.name(step)),
            Some(attempt),
            json!({"by": by, "note": note}),
        );
        Ok(t.decided(Next::Release { ready_at: now }))
    }

    /// An operator asks to cancel: the run stops after the attempt in flight and compensates.
    /// Asking again changes nothing.
    pub fn request_cancel<'b>(
        &self,
        state: &mut RunState,
        by: impl Into<Actor<'b>>,
        now: DateTime<Utc>,
    ) -> Result<Transition, NotAllowed> {
        let by = by.into();
        let paused_before_compensating =
            state.status == RunStatus::Paused && state.paused_from != Some(RunStatus::Compensating);
        if !state.status.can_cancel() || (state.status == RunStatus::Paused && !paused_before_compensating) {
            return Err(NotAllowed(state.status));
        }
        let mut t = Draft::default();
        if !state.cancel_requested {
            state.cancel_requested = true;
            let mut detail = json!({});
            // Cancelling a paused run resumes it: the cancel is the operator's next instruction.
            if let Some(from) = state.paused_from.take() {
                state.status = from;
                detail["resumed"] = json!(true);
            }
            t.log(EventKind::CancelRequested, None, None, by.detail(detail));
        }
        Ok(t.decided(Next::Release { ready_at: now }))
    }

    /// An operator asks to pause a `pending`, `running` or `compensating` run. An unleased
    /// run (not yet claimed, between retries, or waiting) is paused at once; a leased one
    /// pauses once the attempt in flight is recorded (its owner's next write sees the
    /// request). Asking again changes nothing.
    pub fn request_pause<'b>(
        &self,
        state: &mut RunState,
        by: impl Into<Actor<'b>>,
        leased: bool,
        now: DateTime<Utc>,
    ) -> Result<Transition, NotAllowed> {
        let by = by.into();
        if !state.status.can_pause() {
            return Err(NotAllowed(state.status));
        }
        let mut t = Draft::default();
        if state.pause_requested {
            return Ok(t.decided(Next::Release { ready_at: now }));
        }
        if leased {
            state.pause_requested = true;
            t.log(EventKind::PauseRequested, None, None, by.detail(json!({})));
            return Ok(t.decided(Next::Release { ready_at: now }));
        }
        let next = self.pause(state, Some(by), &mut t);
        Ok(t.decided(next))
    }

    /// An operator resumes a paused run (to the status it was paused from, due at once), or
    /// withdraws a pause asked for while an attempt was still in flight.
    pub fn resume<'b>(
        &self,
        state: &mut RunState,
        by: impl Into<Actor<'b>>,
        now: DateTime<Utc>,
    ) -> Result<Transition, NotAllowed> {
        let by = by.into();
        let mut t = Draft::default();
        if let Some(from) = state.paused_from.take().filter(|_| state.status == RunStatus::Paused) {
            state.status = from;
            t.log(
                EventKind::RunResumed,
                None,
                None,
                by.detail(json!({"to": from.as_str()})),
            );
        } else if state.pause_requested {
            state.pause_requested = false;
            t.log(EventKind::RunResumed, None, None, by.detail(json!({"withdrawn": true})));
        } else {
            return Err(NotAllowed(state.status));
        }
        Ok(t.decided(Next::Release { ready_at: now }))
    }
}

fn schedule_retry(
    step: &str,
    attempt: u32,
    phase: &str,
    delay: std::time::Duration,
    cond: &Conditions,
    t: &mut Draft,
) -> Next {
    let ready_at = cond.now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
    t.log(
        EventKind::RetryScheduled,
        Some(step),
        Some(attempt),
        json!({"at": ready_at, "delay_ms": delay.as_millis() as u64, "phase": phase}),
    );
    Next::Release { ready_at }
}

/// An asynchronous attempt that ends without success keeps what it was accepted to do as its
/// partial work (unless the failure reports its own), so that its compensation runs and the
/// log says why.
fn with_accepted_work(state: &RunState, step: usize, error: StepError) -> StepError {
    match (&error.partial, &state.steps[step].partial) {
        (None, Some(accepted)) => error.with_partial(accepted.clone()),
        _ => error,
    }
}

fn after(now: DateTime<Utc>, duration: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// When an accepted attempt's wait for its completion ends: `timeout` after it was accepted,
/// and, with a heartbeat timeout, no later than that long after the last heartbeat.
pub fn completion_deadline(
    accepted_at: DateTime<Utc>,
    timeout: std::time::Duration,
    heartbeat_timeout: Option<std::time::Duration>,
    last_heartbeat: DateTime<Utc>,
) -> DateTime<Utc> {
    let end = after(accepted_at, timeout);
    match heartbeat_timeout {
        Some(beat) => end.min(after(last_heartbeat, beat)),
        None => end,
    }
}

fn release_for_shutdown(cond: &Conditions, t: &mut Draft) -> Next {
    t.log(
        EventKind::LeaseReleased,
        None,
        None,
        json!({"reason": "the worker is shutting down"}),
    );
    Next::Release { ready_at: cond.now }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;
    use chrono::TimeZone;

    use super::*;
    use crate::engine::definition::{Compensate, Completed, Step, StepContext, StepDef};
    use crate::engine::retry::RetryPolicy;
    use EventKind as K;

    struct Plain;

    #[async_trait]
    impl Step for Plain {
        type Output = Value;
        async fn invoke(&self, _: &mut StepContext<'_>) -> Result<Value, StepError> {
            Ok(Value::Null)
        }
    }

    #[async_trait]
    impl Compensate for Plain {
        async fn compensate(&self, _: &mut StepContext<'_>, _: Completed<Value>) -> Result<(), StepError> {
            Ok(())
        }
    }

    fn no_retry_delay() -> RetryPolicy {
        RetryPolicy::attempts(3)
            .initial_delay(Duration::from_millis(100))
            .jitter(0.0)
    }

    /// a (no compensation), b (compensable), c (compensable), d (no compensation)
    fn workflow() -> Workflow {
        Workflow::builder("test", 1)
            .step(StepDef::new("a", Plain))
            .step(StepDef::compensable("b", Plain).retry(no_retry_delay()))
            .step(
                StepDef::compensable("c", Plain)
                    .retry(no_retry_delay())
                    .compensation_retry(RetryPolicy::attempts(2)),
            )
            .step(StepDef::new("d", Plain).retry(RetryPolicy::none()))
            .build()
            .expect("valid workflow")
    }

    fn cond() -> Conditions {
        Conditions {
            draining: false,
            jitter: 0.0,
            now: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("time"),
        }
    }

    fn claimed(wf: &Workflow, input: &Value) -> (RunState, Transition) {
        let mut state = RunState::new(wf.steps.len());
        let t = Machine::new(wf, input).handle(
            &mut state,
            Event::Claimed {
                by: "w1".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        (state, t)
    }

    fn ok(step: usize) -> Event {
        Event::StepSucceeded {
            step,
            output: json!({"step": step}),
        }
    }

    fn statuses(state: &RunState) -> Vec<StepStatus> {
        state.steps.iter().map(|s| s.status).collect()
    }

    #[test]
    fn attempt_counters_that_disagree_never_underflow() {
        // A row whose lost count exceeds its started count (hand-edited, or decoded from a
        // NULL): the charged count is zero, not a panic (debug) or four billion (release).
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (state, _) = claimed(&wf, &input);
        for phase in [Phase::Invoke, Phase::Compensate] {
            let mut state = state.clone();
            let (event, s) = match phase {
                Phase::Invoke => {
                    state.steps[1].status = StepStatus::Running;
                    state.steps[1].attempts = 0;
                    state.steps[1].lost_attempts = 3;
                    (
                        Event::StepFailed {
                            step: 1,
                            error: StepError::retryable("boom"),
                        },
                        1,
                    )
                }
                Phase::Compensate => {
                    state.status = RunStatus::Compensating;
                    state.steps[1].status = StepStatus::Compensating;
                    state.steps[1].compensation_attempts = 0;
                    state.steps[1].lost_compensation_attempts = 3;
                    (
                        Event::CompensationFailed {
                            step: 1,
                            error: StepError::retryable("boom"),
                        },
                        1,
                    )
                }
            };
            let t = m.handle(&mut state, event, &cond());
            // Charged nothing, so the policy allows another attempt after its first delay.
            assert!(matches!(t.next, Next::Release { .. }), "{phase:?}: {:?}", t.next);
            assert!(state.steps[s].error.is_some());
        }
    }

    #[test]
    fn happy_path_runs_every_step_in_order_and_completes() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, t) = claimed(&wf, &input);
        assert_eq!(t.kinds(), [K::RunClaimed, K::StepStarted]);
        assert_eq!(t.next, Next::Invoke(0));
        assert_eq!(state.status, RunStatus::Running);
        for step in 0..3 {
            let t = m.handle(&mut state, ok(step), &cond());
            assert_eq!(t.kinds(), [K::StepSucceeded, K::StepStarted]);
            assert_eq!(t.next, Next::Invoke(step + 1));
            assert_eq!(t.marks.get(&step), Some(&TimeMark::Finished));
            assert_eq!(t.marks.get(&(step + 1)), Some(&TimeMark::Started));
        }
        let t = m.handle(&mut state, ok(3), &cond());
        assert_eq!(t.kinds(), [K::StepSucceeded, K::RunCompleted]);
        assert_eq!(t.next, Next::Finish(RunStatus::Completed));
        assert_eq!(state.status, RunStatus::Completed);
        assert_eq!(
            state.output,
            Some(json!({"step": 3})),
            "default output is the last step's"
        );
        assert!(
            state
                .steps
                .iter()
                .all(|s| s.attempts == 1 && s.status == StepStatus::Succeeded)
        );
    }

    #[test]
    fn a_retry_after_lengthens_the_delay_but_not_past_the_policy_maximum() {
        let delay_for = |asked: Duration| {
            let wf = workflow();
            let input = json!({});
            let m = Machine::new(&wf, &input);
            let (mut state, _) = claimed(&wf, &input);
            m.handle(&mut state, ok(0), &cond());
            let error = StepError::retryable("busy").retry_after(asked);
            let t = m.handle(&mut state, Event::StepFailed { step: 1, error }, &cond());
            t.events[1].detail["delay_ms"].clone()
        };
        // The policy's own delay is 100 ms; the default maximum is 30 s.
        assert_eq!(delay_for(Duration::from_millis(20)), json!(100));
        assert_eq!(delay_for(Duration::from_secs(2)), json!(2000));
        assert_eq!(delay_for(Duration::from_secs(3600)), json!(30_000));
    }

    #[test]
    fn what_a_failed_attempt_saw_is_logged_with_it() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        let error = StepError::retryable("busy").with_detail(json!({"status": 503}));
        let t = m.handle(&mut state, Event::StepFailed { step: 1, error }, &cond());
        assert_eq!(t.events[0].detail["attempt"], json!({"status": 503}));
    }

    #[test]
    fn retryable_failure_schedules_a_durable_retry_with_backoff() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        let t = m.handle(
            &mut state,
            Event::StepFailed {
                step: 1,
                error: StepError::retryable("busy"),
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::StepFailed, K::RetryScheduled]);
        let due = cond().now + chrono::Duration::milliseconds(100);
        assert_eq!(t.next, Next::Release { ready_at: due });
        assert_eq!(t.events[1].attempt, Some(2));
        assert_eq!(t.events[1].detail["delay_ms"], json!(100));
        assert_eq!(state.steps[1].status, StepStatus::Failed);
        assert_eq!(state.status, RunStatus::Running);

        // Claimed again when due: the next attempt starts, nothing is "lost".
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w2".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::RunClaimed, K::StepStarted]);
        assert_eq!(t.next, Next::Invoke(1));
        assert_eq!(state.steps[1].attempts, 2);

        // Second failure: delay doubles.
        let t = m.handle(
            &mut state,
            Event::StepFailed {
                step: 1,
                error: StepError::retryable("busy"),
            },
            &cond(),
        );
        assert_eq!(t.events[1].detail["delay_ms"], json!(200));
        m.handle(
            &mut state,
            Event::Claimed {
                by: "w2".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        let t = m.handle(&mut state, ok(1), &cond());
        assert_eq!(t.next, Next::Invoke(2));
        assert_eq!(state.steps[1].attempts, 3);
    }

    #[test]
    fn exhausted_retries_compensate_succeeded_steps_in_reverse_order() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        m.handle(&mut state, ok(1), &cond());
        m.handle(&mut state, ok(2), &cond());
        // d has no retries: its retryable failure gives up at once.
        let t = m.handle(
            &mut state,
            Event::StepFailed {
                step: 3,
                error: StepError::retryable("down"),
            },
            &cond(),
        );
        assert_eq!(
            t.kinds(),
            [K::StepFailed, K::CompensationStarted, K::StepCompensationStarted]
        );
        assert_eq!(t.next, Next::Compensate(2), "c first");
        assert_eq!(state.status, RunStatus::Compensating);
        assert_eq!(
            state.error,
            Some(RunError {
                step: Some("d".into()),
                message: "down".into(),
                retryable: true
            })
        );
        let t = m.handle(&mut state, Event::CompensationSucceeded { step: 2 }, &cond());
        assert_eq!(t.kinds(), [K::StepCompensationSucceeded, K::StepCompensationStarted]);
        assert_eq!(t.next, Next::Compensate(1), "then b; a has no compensation");
        let t = m.handle(&mut state, Event::CompensationSucceeded { step: 1 }, &cond());
        assert_eq!(t.kinds(), [K::StepCompensationSucceeded, K::RunCompensated]);
        assert_eq!(t.next, Next::Finish(RunStatus::Compensated));
        assert_eq!(state.status, RunStatus::Compensated);
        assert_eq!(
            statuses(&state),
            [
                StepStatus::Succeeded,
                StepStatus::Compensated,
                StepStatus::Compensated,
                StepStatus::Failed
            ]
        );
        assert_eq!(
            state.error.as_ref().map(|e| e.message.as_str()),
            Some("down"),
            "keeps the original error"
        );
    }

    #[test]
    fn permanent_error_skips_remaining_retries() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        let t = m.handle(
            &mut state,
            Event::StepFailed {
                step: 1,
                error: StepError::permanent("no"),
            },
            &cond(),
        );
        assert_eq!(state.steps[1].attempts, 1);
        assert_eq!(t.kinds(), [K::StepFailed, K::CompensationStarted, K::RunCompensated]);
        assert_eq!(
            state.status,
            RunStatus::Compensated,
            "nothing compensable had succeeded"
        );
        assert_eq!(state.error.as_ref().map(|e| e.retryable), Some(false));
    }

    #[test]
    fn failed_step_with_partial_work_is_compensated_too() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        m.handle(&mut state, ok(1), &cond());
        let error = StepError::permanent("half done").with_partial(json!({"reserved": 1}));
        let t = m.handle(&mut state, Event::StepFailed { step: 2, error }, &cond());
        assert_eq!(t.events[0].detail["partial"], json!({"reserved": 1}));
        assert_eq!(t.next, Next::Compensate(2), "the failing step's recorded work first");
        assert_eq!(state.steps[2].partial, Some(json!({"reserved": 1})));
    }

    #[test]
    fn compensation_that_gives_up_fails_the_run_and_an_operator_can_resume_it() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        for step in 0..3 {
            m.handle(&mut state, ok(step), &cond());
        }
        m.handle(
            &mut state,
            Event::StepFailed {
                step: 3,
                error: StepError::permanent("x"),
            },
            &cond(),
        );
        // c's compensation: 2 attempts.
        let t = m.handle(
            &mut state,
            Event::CompensationFailed {
                step: 2,
                error: StepError::retryable("flaky"),
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::StepCompensationFailed, K::RetryScheduled]);
        assert_eq!(t.events[1].detail["phase"], json!("compensate"));
        assert_eq!(state.steps[2].status, StepStatus::CompensationFailed);
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        assert_eq!(t.next, Next::Compensate(2));
        let t = m.handle(
            &mut state,
            Event::CompensationFailed {
                step: 2,
                error: StepError::retryable("flaky"),
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::StepCompensationFailed, K::RunFailed]);
        assert_eq!(t.next, Next::Finish(RunStatus::Failed));
        assert_eq!(state.status, RunStatus::Failed);
        assert_eq!(
            state.steps[1].status,
            StepStatus::Succeeded,
            "b not compensated: c blocks it"
        );

        let t = m
            .operator_retry(&mut state, "ops@example.com", cond().now)
            .expect("allowed");
        assert_eq!(t.kinds(), [K::OperatorRetry]);
        assert_eq!(t.events[0].detail["by"], json!("ops@example.com"));
        assert_eq!(state.status, RunStatus::Compensating);
        assert_eq!(state.steps[2].compensation_attempts, 0, "fresh budget");
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        assert_eq!(t.next, Next::Compensate(2));
        assert_eq!(state.steps[2].compensation_attempts, 1);
        m.handle(&mut state, Event::CompensationSucceeded { step: 2 }, &cond());
        let t = m.handle(&mut state, Event::CompensationSucceeded { step: 1 }, &cond());
        assert_eq!(t.next, Next::Finish(RunStatus::Compensated));
        assert_eq!(state.status, RunStatus::Compensated);
        assert_eq!(
            m.operator_retry(&mut state, "x", cond().now),
            Err(NotAllowed(RunStatus::Compensated))
        );
    }

    #[test]
    fn when_false_skips_the_step() {
        let wf = Workflow::builder("w", 1)
            .step(StepDef::new("a", Plain))
            .step(StepDef::new("b", Plain).when(|v| v.input_value()["b"] == json!(true)))
            .step(StepDef::new("c", Plain))
            .build()
            .expect("valid");
        let input = json!({"b": false});
        let m = Machine::new(&wf, &input);
        let mut state = RunState::new(3);
        m.handle(
            &mut state,
            Event::Claimed {
                by: "w".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        let t = m.handle(&mut state, ok(0), &cond());
        assert_eq!(t.kinds(), [K::StepSucceeded, K::StepSkipped, K::StepStarted]);
        assert_eq!(t.next, Next::Invoke(2));
        assert_eq!(
            statuses(&state),
            [StepStatus::Succeeded, StepStatus::Skipped, StepStatus::Running]
        );
        assert_eq!(state.steps[1].attempts, 0);
        let t = m.handle(&mut state, ok(2), &cond());
        assert_eq!(t.next, Next::Finish(RunStatus::Completed));
        assert_eq!(state.status, RunStatus::Completed);
    }

    #[test]
    fn takeover_counts_the_lost_attempt_and_retries_at_once() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        // The owner died while b's first attempt was in flight.
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w2".into(),
                taken_over_from: Some("w1".into()),
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::LeaseTakenOver, K::StepFailed, K::StepStarted]);
        assert_eq!(t.events[0].detail, json!({"from": "w1", "by": "w2"}));
        assert_eq!(t.events[1].attempt, Some(1));
        assert_eq!(t.events[2].attempt, Some(2));
        assert_eq!(t.next, Next::Invoke(1));
        assert_eq!(t.marks.get(&1), Some(&TimeMark::Started));
    }

    #[test]
    fn a_lost_attempt_is_not_charged_to_the_retry_budget() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        for step in 0..3 {
            m.handle(&mut state, ok(step), &cond());
        }
        // d has a single attempt; its worker died: the attempt is retried all the same.
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w2".into(),
                taken_over_from: Some("w1".into()),
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::LeaseTakenOver, K::StepFailed, K::StepStarted]);
        assert_eq!(t.events[1].detail["lost"], json!(true));
        assert_eq!(t.next, Next::Invoke(3));
        assert_eq!((state.steps[3].attempts, state.steps[3].lost_attempts), (2, 1));
        // Its own failure is charged: one attempt in the budget, so compensation.
        let t = m.handle(
            &mut state,
            Event::StepFailed {
                step: 3,
                error: StepError::retryable("down"),
            },
            &cond(),
        );
        assert_eq!(t.next, Next::Compensate(2));
    }

    #[test]
    fn a_step_that_keeps_losing_its_worker_is_given_up_on() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        for lost in 1..=MAX_LOST_ATTEMPTS {
            let t = m.handle(
                &mut state,
                Event::Claimed {
                    by: "w".into(),
                    taken_over_from: Some("w".into()),
                },
                &cond(),
            );
            assert_eq!(t.next, Next::Invoke(1), "after {lost} lost attempts");
        }
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w".into(),
                taken_over_from: Some("w".into()),
            },
            &cond(),
        );
        assert_eq!(
            t.kinds(),
            [
                K::LeaseTakenOver,
                K::StepFailed,
                K::CompensationStarted,
                K::RunCompensated
            ]
        );
        assert_eq!(t.events[1].detail["retryable"], json!(false));
        assert!(state.error.as_ref().is_some_and(|e| e.message.contains("crashing")));
    }

    #[test]
    fn takeover_during_compensation_retries_the_compensation() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        m.handle(&mut state, ok(1), &cond());
        m.handle(
            &mut state,
            Event::StepFailed {
                step: 2,
                error: StepError::permanent("x"),
            },
            &cond(),
        );
        assert_eq!(state.steps[1].status, StepStatus::Compensating);
        let t = m.handle(
            &mut state,
            Event::Resumed {
                reason: "connection lost".into(),
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::StepCompensationFailed, K::StepCompensationStarted]);
        assert_eq!(t.next, Next::Compensate(1));
        assert_eq!(state.steps[1].compensation_attempts, 2);
    }

    #[test]
    fn cancel_stops_after_the_current_attempt_and_compensates() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        let t = m.request_cancel(&mut state, "ops", cond().now).expect("allowed");
        assert_eq!(t.kinds(), [K::CancelRequested]);
        assert!(
            m.request_cancel(&mut state, "ops", cond().now)
                .is_ok_and(|t| t.events.is_empty()),
            "idempotent"
        );
        // b's attempt in flight finishes, then compensation.
        let t = m.handle(&mut state, ok(1), &cond());
        assert_eq!(
            t.kinds(),
            [K::StepSucceeded, K::CompensationStarted, K::StepCompensationStarted]
        );
        assert_eq!(t.next, Next::Compensate(1));
        let t = m.handle(&mut state, Event::CompensationSucceeded { step: 1 }, &cond());
        assert_eq!(t.kinds(), [K::StepCompensationSucceeded, K::RunCancelled]);
        assert_eq!(state.status, RunStatus::Cancelled);
        assert_eq!(state.error.as_ref().map(|e| e.step.is_none()), Some(true));
        assert_eq!(
            m.request_cancel(&mut state, "ops", cond().now).err(),
            Some(NotAllowed(RunStatus::Cancelled))
        );
    }

    #[test]
    fn a_pause_takes_effect_after_the_attempt_in_flight_and_a_resume_goes_on_from_there() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        let t = m.request_pause(&mut state, "ops", true, cond().now).expect("allowed");
        assert_eq!((t.kinds(), state.status), (vec![K::PauseRequested], RunStatus::Running));
        assert!(state.pause_requested);
        assert!(
            m.request_pause(&mut state, "ops", true, cond().now)
                .is_ok_and(|t| t.events.is_empty()),
            "idempotent"
        );
        // b's attempt in flight is recorded; c is not started.
        let t = m.handle(&mut state, ok(1), &cond());
        assert_eq!(t.kinds(), [K::StepSucceeded, K::RunPaused]);
        assert_eq!(t.next, Next::Pause);
        assert_eq!(
            (state.status, state.paused_from, state.pause_requested),
            (RunStatus::Paused, Some(RunStatus::Running), false)
        );
        assert_eq!(
            (state.steps[2].status, state.steps[2].attempts),
            (StepStatus::Pending, 0)
        );
        assert_eq!(
            m.request_pause(&mut state, "ops", false, cond().now).err(),
            Some(NotAllowed(RunStatus::Paused))
        );
        let t = m.resume(&mut state, "ops", cond().now).expect("allowed");
        assert_eq!(t.kinds(), [K::RunResumed]);
        assert_eq!(t.next, Next::Release { ready_at: cond().now });
        assert_eq!((state.status, state.paused_from), (RunStatus::Running, None));
        let claim = Event::Claimed {
            by: "w".into(),
            taken_over_from: None,
        };
        let t = m.handle(&mut state, claim, &cond());
        assert_eq!(t.next, Next::Invoke(2));
        assert_eq!(
            m.resume(&mut state, "ops", cond().now).err(),
            Some(NotAllowed(RunStatus::Running)),
            "nothing to resume"
        );
    }

    #[test]
    fn a_pause_asked_for_during_an_attempt_can_be_withdrawn_and_one_during_a_retry_delay_pauses_instead() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.request_pause(&mut state, "ops", true, cond().now).expect("allowed");
        let t = m.resume(&mut state, "ops", cond().now).expect("withdrawn");
        assert_eq!(t.kinds(), [K::RunResumed]);
        assert_eq!(t.events[0].detail["withdrawn"], json!(true));
        assert!(!state.pause_requested);
        assert_eq!(m.handle(&mut state, ok(0), &cond()).next, Next::Invoke(1));

        // A retryable failure would hand the run back until its retry: it pauses instead.
        m.request_pause(&mut state, "ops", true, cond().now).expect("allowed");
        let t = m.handle(
            &mut state,
            Event::StepFailed {
                step: 1,
                error: StepError::retryable("busy"),
            },
            &cond(),
        );
        assert_eq!(t.next, Next::Pause);
        assert_eq!(t.kinds().last(), Some(&K::RunPaused));
        assert_eq!(state.status, RunStatus::Paused);
    }

    #[test]
    fn an_unleased_run_pauses_at_once_keeping_its_wait_and_a_cancel_resumes_it_to_compensate() {
        let wf = waiting_workflow(Default::default());
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let mut state = at_the_wait(&wf, &input);
        let t = m.request_pause(&mut state, "ops", false, cond().now).expect("allowed");
        assert_eq!(t.kinds(), [K::RunPaused]);
        assert_eq!(t.events[0].detail["by"], json!("ops"));
        assert_eq!(t.next, Next::Pause);
        assert_eq!(state.status, RunStatus::Paused);
        assert!(state.waiting.is_some(), "the wait is kept for the resume");

        let t = m
            .request_cancel(&mut state, "ops", cond().now)
            .expect("a paused run can be cancelled");
        assert_eq!(t.kinds(), [K::CancelRequested]);
        assert_eq!(t.events[0].detail["resumed"], json!(true));
        assert_eq!((state.status, state.paused_from), (RunStatus::Running, None));
        let claim = Event::Claimed {
            by: "w".into(),
            taken_over_from: None,
        };
        let t = m.handle(&mut state, claim, &later(5));
        assert_eq!(t.next, Next::Compensate(0), "the cancel ends the wait and compensates");
    }

    #[test]
    fn a_compensating_run_pauses_before_its_next_compensation_and_cannot_be_cancelled_while_paused() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        m.handle(&mut state, ok(1), &cond());
        m.handle(&mut state, ok(2), &cond());
        let t = m.handle(
            &mut state,
            Event::StepFailed {
                step: 3,
                error: StepError::permanent("no"),
            },
            &cond(),
        );
        assert_eq!((state.status, t.next), (RunStatus::Compensating, Next::Compensate(2)));
        m.request_pause(&mut state, "ops", true, cond().now).expect("allowed");
        let t = m.handle(&mut state, Event::CompensationSucceeded { step: 2 }, &cond());
        assert_eq!(t.kinds(), [K::StepCompensationSucceeded, K::RunPaused]);
        assert_eq!(state.paused_from, Some(RunStatus::Compensating));
        assert_eq!(
            m.request_cancel(&mut state, "ops", cond().now).err(),
            Some(NotAllowed(RunStatus::Paused))
        );
        m.resume(&mut state, "ops", cond().now).expect("allowed");
        assert_eq!(state.status, RunStatus::Compensating);
    }

    #[test]
    fn cancel_during_a_retry_wait_does_not_retry() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        m.handle(&mut state, ok(0), &cond());
        m.handle(
            &mut state,
            Event::StepFailed {
                step: 1,
                error: StepError::retryable("busy"),
            },
            &cond(),
        );
        m.request_cancel(&mut state, "ops", cond().now).expect("allowed");
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::RunClaimed, K::CompensationStarted, K::RunCancelled]);
        assert_eq!(state.steps[1].attempts, 1);
    }

    #[test]
    fn draining_releases_instead_of_starting_the_next_attempt() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        let draining = Conditions {
            draining: true,
            ..cond()
        };
        let t = m.handle(&mut state, ok(0), &draining);
        assert_eq!(t.kinds(), [K::StepSucceeded, K::LeaseReleased]);
        assert_eq!(t.next, Next::Release { ready_at: cond().now });
        assert_eq!(state.steps[1].status, StepStatus::Pending);
        assert_eq!(state.steps[1].attempts, 0, "no attempt is spent on a shutdown");
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w2".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::RunClaimed, K::StepStarted]);
        assert_eq!(state.steps[1].attempts, 1);
    }

    #[test]
    fn cancelling_a_pending_run_needs_no_compensation() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let mut state = RunState::new(4);
        m.request_cancel(&mut state, "ops", cond().now).expect("allowed");
        let t = m.handle(
            &mut state,
            Event::Claimed {
                by: "w".into(),
                taken_over_from: None,
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::RunClaimed, K::CompensationStarted, K::RunCancelled]);
        assert_eq!(state.status, RunStatus::Cancelled);
        assert!(state.steps.iter().all(|s| s.attempts == 0));
    }

    /// a (compensable) → pay (signal `paid`, an hour) → b; and `c` asynchronous (an hour, a
    /// heartbeat every minute) with a compensation.
    fn waiting_workflow(on_timeout: crate::engine::definition::OnTimeout) -> Workflow {
        Workflow::builder("waits", 1)
            .step(StepDef::compensable("a", Plain))
            .step(StepDef::signal("pay", "paid", Duration::from_secs(3600)).on_timeout(on_timeout))
            .step(
                StepDef::compensable("c", Plain).asynchronous(Duration::from_secs(3600), Some(Duration::from_secs(60))),
            )
            .build()
            .expect("valid workflow")
    }

    fn later(seconds: i64) -> Conditions {
        Conditions {
            now: cond().now + chrono::Duration::seconds(seconds),
            ..cond()
        }
    }

    /// The run of `waiting_workflow` waiting at `pay`.
    fn at_the_wait(wf: &Workflow, input: &Value) -> RunState {
        let m = Machine::new(wf, input);
        let (mut state, _) = claimed(wf, input);
        let t = m.handle(&mut state, ok(0), &cond());
        assert_eq!(t.kinds(), [K::StepSucceeded, K::StepStarted, K::StepWaiting]);
        assert_eq!(t.next, Next::Await(1));
        let w = state.waiting.clone().expect("waiting");
        assert_eq!(
            (w.step, w.kind, w.name.as_str(), w.attempt),
            (1, WaitKind::Signal, "paid", 1)
        );
        assert_eq!(w.deadline, cond().now + chrono::Duration::hours(1));
        state
    }

    #[test]
    fn a_signal_wait_ends_with_its_signal_consumed_or_hands_the_run_back_until_its_deadline() {
        let wf = waiting_workflow(Default::default());
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let mut state = at_the_wait(&wf, &input);
        // Nothing yet: handed back until the deadline, nothing logged, nothing consumed.
        let t = m.handle(
            &mut state.clone(),
            Event::WaitPolled { step: 1, arrival: None },
            &later(60),
        );
        assert_eq!(
            t.next,
            Next::Release {
                ready_at: cond().now + chrono::Duration::hours(1)
            }
        );
        assert!(t.events.is_empty() && t.consume.is_none());
        let signal = Arrival::Signal {
            id: 7,
            payload: json!({"amount": 5}),
            received_at: cond().now,
            key: Some("evt".into()),
        };
        let t = m.handle(
            &mut state,
            Event::WaitPolled {
                step: 1,
                arrival: Some(signal),
            },
            &later(60),
        );
        assert_eq!(t.kinds(), [K::SignalReceived, K::StepSucceeded, K::StepStarted]);
        assert_eq!(t.consume, Some(7));
        assert_eq!(state.steps[1].output, Some(json!({"amount": 5})));
        assert!(state.waiting.is_none());
        assert_eq!(t.next, Next::Invoke(2));
    }

    #[test]
    fn at_its_deadline_a_wait_fails_permanently_or_goes_on_with_null_as_declared() {
        use crate::engine::definition::OnTimeout;
        for (on_timeout, expected) in [
            (OnTimeout::Fail, StepStatus::Failed),
            (OnTimeout::Continue, StepStatus::Succeeded),
        ] {
            let wf = waiting_workflow(on_timeout);
            let input = json!({});
            let m = Machine::new(&wf, &input);
            let mut state = at_the_wait(&wf, &input);
            let t = m.handle(&mut state, Event::WaitPolled { step: 1, arrival: None }, &later(3600));
            assert_eq!(state.steps[1].status, expected, "{on_timeout:?}");
            assert!(state.waiting.is_none());
            assert_eq!(t.kinds()[0], K::WaitTimedOut);
            match on_timeout {
                OnTimeout::Fail => {
                    assert_eq!(state.status, RunStatus::Compensating);
                    assert_eq!(t.next, Next::Compensate(0));
                    assert!(!state.steps[1].error.as_ref().expect("error").retryable);
                }
                OnTimeout::Continue => {
                    assert_eq!(state.steps[1].output, Some(Value::Null));
                    assert_eq!(t.next, Next::Invoke(2));
                }
            }
        }
    }

    #[test]
    fn a_waiting_step_is_not_lost_with_its_worker_and_a_cancel_ends_the_wait_at_once() {
        let wf = waiting_workflow(Default::default());
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let state = at_the_wait(&wf, &input);
        let claim = Event::Claimed {
            by: "w2".into(),
            taken_over_from: Some("w1".into()),
        };
        let mut taken = state.clone();
        let t = m.handle(&mut taken, claim.clone(), &later(5));
        assert_eq!(t.kinds(), [K::LeaseTakenOver], "no lost attempt is recorded");
        assert_eq!((t.next, taken.steps[1].lost_attempts), (Next::Await(1), 0));

        // A cancel that lands while the owner looks in the inbox ends the wait too.
        let mut looking = state.clone();
        looking.cancel_requested = true;
        let t = m.handle(&mut looking, Event::WaitPolled { step: 1, arrival: None }, &later(5));
        assert_eq!(
            t.kinds(),
            [K::StepFailed, K::CompensationStarted, K::StepCompensationStarted]
        );
        assert_eq!(t.next, Next::Compensate(0));

        let mut cancelled = state;
        m.request_cancel(&mut cancelled, "ops", cond().now).expect("allowed");
        let t = m.handle(&mut cancelled, claim, &later(5));
        assert_eq!(
            t.kinds(),
            [
                K::LeaseTakenOver,
                K::StepFailed,
                K::CompensationStarted,
                K::StepCompensationStarted
            ]
        );
        assert!(cancelled.waiting.is_none());
        assert_eq!(cancelled.steps[1].status, StepStatus::Failed);
        assert_eq!(t.next, Next::Compensate(0));
    }

    #[test]
    fn an_accepted_attempt_waits_for_its_completion_and_its_accepted_work_is_compensated_if_it_fails() {
        let wf = waiting_workflow(Default::default());
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let mut state = at_the_wait(&wf, &input);
        let signal = Arrival::Signal {
            id: 1,
            payload: json!({}),
            received_at: cond().now,
            key: None,
        };
        m.handle(
            &mut state,
            Event::WaitPolled {
                step: 1,
                arrival: Some(signal),
            },
            &cond(),
        );
        let t = m.handle(
            &mut state,
            Event::StepAccepted {
                step: 2,
                accepted: json!({"ticket": 1}),
            },
            &cond(),
        );
        assert_eq!(t.kinds(), [K::StepWaiting]);
        assert_eq!(t.next, Next::Await(2));
        let w = state.waiting.clone().expect("waiting");
        assert_eq!((w.kind, w.name.as_str()), (WaitKind::Completion, "c"));
        assert_eq!(
            w.deadline,
            cond().now + chrono::Duration::minutes(1),
            "the heartbeat timeout is sooner"
        );
        let failed = Arrival::Completion {
            id: 9,
            outcome: Err(StepError::permanent("declined")),
        };
        let t = m.handle(
            &mut state,
            Event::WaitPolled {
                step: 2,
                arrival: Some(failed),
            },
            &cond(),
        );
        assert_eq!(t.consume, Some(9));
        assert_eq!(t.kinds()[..2], [K::StepCompletedExternally, K::StepFailed]);
        assert_eq!(
            t.events[1].detail["partial"],
            json!({"ticket": 1}),
            "the log says what is undone"
        );
        assert_eq!(t.next, Next::Compensate(2), "the accepted work is compensated first");
    }

    #[test]
    fn a_step_that_is_not_asynchronous_cannot_complete_later() {
        let wf = workflow();
        let input = json!({});
        let m = Machine::new(&wf, &input);
        let (mut state, _) = claimed(&wf, &input);
        let t = m.handle(
            &mut state,
            Event::StepAccepted {
                step: 0,
                accepted: json!({}),
            },
            &cond(),
        );
        assert_eq!(state.steps[0].status, StepStatus::Failed);
        let error = state.steps[0].error.clone().expect("error");
        assert!(
            !error.retryable && error.message.contains("not declared asynchronous"),
            "{}",
            error.message
        );
        assert!(state.waiting.is_none());
        assert!(!matches!(t.next, Next::Await(_)));
    }
}

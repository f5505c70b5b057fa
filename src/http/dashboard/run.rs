//! A run's page (`/runs/{id}`): what happened and when, and the operator's Retry and Cancel.
//!
//! Everything a run holds can be large (inputs up to the body limit, outputs and errors of any
//! size, logs of thousands of retries), so each part has a budget; the page says what it left
//! out and where the whole is (the JSON API).

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::response::{Html, Redirect};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::engine::read::RunReads;

use super::Dashboard;
use super::error::PageError;
use super::format::{self, JsonText};
use super::session::{Operator, Viewer};
use super::timeline::{self, Chart};
use crate::engine::{EventRow, RunRow, StepRow};
use crate::engine::{Retried, RetryAction, RunStatus, StepStatus};
use crate::http::error::ApiError;
use crate::http::extract::{Params, PathText};

/// No page may be larger than this.
pub const PAGE_LIMIT: usize = 200 * 1024;

/// How much of a run's data a page shows. Escaping can make text up to six times longer in
/// HTML, so the page is rendered with [`Budget::FULL`] and, while it is over [`PAGE_LIMIT`],
/// again with halved budgets: the limit holds whatever the data is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes of the input, and of the output.
    pub json: usize,
    /// Bytes of all step outputs together.
    pub step_outputs: usize,
    /// Bytes of one step output.
    pub step_output: usize,
    /// Characters of an error message.
    pub text: usize,
    /// Characters of a log entry's detail.
    pub detail: usize,
    /// Log entries shown: the first `log_head` and the latest ones.
    pub log_rows: usize,
    /// See `log_rows`.
    pub log_head: usize,
    /// Bars drawn in the timeline.
    pub bars: usize,
}

impl Budget {
    /// What a page shows when it fits.
    pub const FULL: Budget = Budget {
        json: 16 * 1024,
        step_outputs: 16 * 1024,
        step_output: 2 * 1024,
        text: 1_000,
        detail: 200,
        log_rows: 150,
        log_head: 50,
        bars: 200,
    };

    /// Half of everything, down to a floor that still tells the story.
    pub fn halved(self) -> Self {
        Self {
            json: (self.json / 2).max(1024),
            step_outputs: (self.step_outputs / 2).max(512),
            step_output: (self.step_output / 2).max(256),
            text: (self.text / 2).max(120),
            detail: (self.detail / 2).max(60),
            log_rows: (self.log_rows / 2).max(20),
            log_head: (self.log_head / 2).max(5),
            bars: (self.bars / 2).max(20),
        }
    }
}

/// A run's page (rendered by the handler, which checks its size).
#[derive(Template)]
#[template(path = "run.html", config = "dashboard/askama.toml")]
pub struct RunPage {
    /// The logged-in operator.
    pub operator: String,
    /// For the forms.
    pub csrf: String,
    /// The run, its facts and lineage.
    pub run: Summary,
    /// What an action just did.
    pub notice: Option<&'static str>,
    /// The retry offered, if allowed.
    pub retry: Option<RetryOffer>,
    /// Whether Cancel is offered.
    pub can_cancel: bool,
    /// Whether Pause is offered (pending, running or compensating, not yet asked to pause).
    pub can_pause: bool,
    /// Whether Resume is offered (paused, or asked to pause).
    pub can_resume: bool,
    /// The input.
    pub input: JsonText,
    /// The output, once completed.
    pub output: Option<JsonText>,
    /// Every step of the plan.
    pub steps: Vec<StepLine>,
    /// The timeline.
    pub chart: Chart,
    /// The log (possibly cut in the middle).
    pub events: Vec<EventLine>,
    /// How many log entries are not shown.
    pub events_omitted: usize,
    /// Where the log is cut (entries before this index are the head).
    pub events_cut_at: usize,
    /// The steps whose compensation gave up, offered for a resolution by hand (a failed run).
    pub resolvable: Vec<String>,
    /// The steps a restart may start at (a finished run that did not complete and was not
    /// retried): the first step, and each whose predecessors all succeeded or were skipped.
    pub restart_from: Vec<String>,
    /// The input as editable JSON for a restart (empty when too large to edit here).
    pub input_edit: String,
    /// What was delivered to the run (signals, completions), newest first.
    pub inbox: Vec<InboxLine>,
    /// Deliveries not shown (older than those listed).
    pub inbox_omitted: i64,
}

/// The most deliveries a run's page lists.
pub const INBOX_SHOWN: i64 = 20;

/// The largest input offered for editing on the page (a larger one is restarted as it is,
/// or edited through the API).
pub const MAX_INPUT_EDIT: usize = 16 * 1024;

/// A signal or a completion delivered to the run.
#[derive(Debug, Clone)]
pub struct InboxLine {
    /// `signal payment.succeeded` or `completion of capture, attempt 2`.
    pub what: String,
    /// When it arrived (UTC).
    pub received: String,
    /// The delivery's idempotency key, or empty.
    pub key: String,
    /// `consumed by await-payment at ...`, or `kept: no wait has consumed it`.
    pub state: String,
    /// Whether a wait consumed it.
    pub consumed: bool,
}

/// The facts about a run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Full id.
    pub id: String,
    /// First block of the id.
    pub short_id: String,
    /// The workflow.
    pub workflow: String,
    /// Its version.
    pub version: i32,
    /// The status.
    pub status: &'static str,
    /// Whether it is still going (the page updates itself).
    pub in_flight: bool,
    /// An operator asked to cancel it.
    pub cancel_requested: bool,
    /// An operator asked to pause it (it pauses after the attempt in flight).
    pub pause_requested: bool,
    /// Why it does not move, while paused or held by its paused workflow.
    pub paused: Option<String>,
    /// The customer's email (the subject).
    pub subject: String,
    /// The idempotency key.
    pub idempotency_key: String,
    /// What started it.
    pub trigger: String,
    /// When it was accepted.
    pub created: String,
    /// When it ended.
    pub finished: String,
    /// How long it took (so far).
    pub duration: String,
    /// Why it did not complete.
    pub error: Option<ErrorLine>,
    /// Why it is set aside (its steps do not match its plan), if it is.
    pub parked: Option<String>,
    /// What it waits for and until when (UTC), and whether that deadline has passed.
    pub waiting: Option<(String, bool)>,
    /// The run it retries: id and short id.
    pub retry_of: Option<(String, String)>,
    /// The run that retried it.
    pub retried_by: Option<(String, String)>,
}

/// A run's error.
#[derive(Debug, Clone)]
pub struct ErrorLine {
    /// The step that gave up (none for a cancel).
    pub step: String,
    /// What went wrong.
    pub message: String,
    /// Whether the step ran out of attempts (rather than failing permanently).
    pub retryable: bool,
}

/// What Retry will do.
#[derive(Debug, Clone)]
pub struct RetryOffer {
    /// The button.
    pub label: &'static str,
    /// The confirmation's explanation.
    pub explanation: &'static str,
}

/// A step of the plan.
#[derive(Debug, Clone)]
pub struct StepLine {
    /// Position, from 1.
    pub number: usize,
    /// Its name.
    pub name: String,
    /// Status (CSS class).
    pub status: &'static str,
    /// Status for people ("not reached").
    pub status_text: &'static str,
    /// Attempts of the step and of its compensation.
    pub attempts: String,
    /// When its last attempt started.
    pub started: String,
    /// How long its last attempt took.
    pub took: String,
    /// Its last error.
    pub error: String,
    /// Its output.
    pub output: Option<JsonText>,
}

/// A log entry.
#[derive(Debug, Clone)]
pub struct EventLine {
    /// Position in the log.
    pub seq: i32,
    /// When.
    pub at: String,
    /// Time since the run was accepted.
    pub offset: String,
    /// What happened.
    pub kind: &'static str,
    /// A CSS class grouping kinds (failures, compensation, operator).
    pub tone: &'static str,
    /// The step.
    pub step: String,
    /// The attempt.
    pub attempt: String,
    /// Details, compact.
    pub detail: String,
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound {
        what: "run",
        id: format::clip(id, 100),
    })
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound {
        what: "run",
        id: id.to_string(),
    }
}

/// `GET /runs/{id}`.
pub async fn page(
    viewer: Viewer,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    params: Params,
) -> Result<Html<String>, PageError> {
    let PathText(id) = path?;
    let id = parse_id(&id)?;
    let engine = &dashboard.app.engine;
    let detail = engine.run(id).await?.ok_or_else(|| not_found(id))?;
    let events = engine.events(id).await?.unwrap_or_default();
    let notice = match params.text("done", 20)?.as_deref() {
        Some("retried") => Some("Retry started: this is the new run, with the same input as the run it retries."),
        Some("resumed") => Some("Retry accepted: the compensation that gave up is being attempted again."),
        Some("cancel") => Some("Cancel requested: the run stops after the attempt in flight and compensates."),
        Some("paused") => Some("Pause requested: the run pauses after the attempt in flight, holding no lease."),
        Some("unpaused") => Some("Resumed: the run goes on from where it was paused."),
        Some("resolved") => {
            Some("Resolved by hand: the step is marked compensated with your note, and the unwind goes on.")
        }
        Some("restarted") => {
            Some("Restarted: this is the new run. The steps before the one chosen kept their recorded outputs.")
        }
        _ => None,
    };
    let (inbox, inbox_total) = RunReads::of(engine).inbox(id, INBOX_SHOWN).await?;
    let now = Utc::now();
    render_within_limit(&format!("run {id}"), Budget::FULL, Budget::halved, |budget| {
        let mut page = build(&viewer, &detail.run, &detail.steps, &events, notice, now, budget);
        page.inbox = inbox.iter().map(|row| inbox_line(row, budget.text)).collect();
        page.inbox_omitted = inbox_total - i64::try_from(inbox.len()).unwrap_or(0);
        page.render()
    })
}

/// A delivery as the page shows it (pure).
pub fn inbox_line(row: &crate::engine::InboxRow, max_text: usize) -> InboxLine {
    InboxLine {
        what: match (row.kind, row.attempt) {
            (crate::engine::WaitKind::Completion, Some(attempt)) => {
                let outcome = if row.error.is_some() { "an error" } else { "an output" };
                format!(
                    "completion of {}, attempt {attempt}, with {outcome}",
                    format::clip(&row.name, 120)
                )
            }
            _ => format!("signal {}", format::clip(&row.name, 120)),
        },
        received: format::time(row.received_at),
        key: format::clip(row.idempotency_key.as_deref().unwrap_or_default(), max_text.min(255)),
        state: match (&row.consumed_by, row.consumed_at) {
            (Some(step), Some(at)) => format!("consumed by {} at {}", format::clip(step, 120), format::time(at)),
            _ => "kept: no wait has consumed it".into(),
        },
        consumed: row.consumed_at.is_some(),
    }
}

/// Renders a page with `budget`, and again with halved budgets while it is over
/// [`PAGE_LIMIT`] and the budget can still shrink: what keeps every page under the limit
/// whatever the data holds. `what` names the page in the log should even the smallest
/// budget be over.
pub(super) fn render_within_limit<B: Copy + PartialEq>(
    what: &str,
    mut budget: B,
    halved: impl Fn(B) -> B,
    mut render: impl FnMut(B) -> Result<String, askama::Error>,
) -> Result<Html<String>, PageError> {
    loop {
        let html = render(budget).map_err(|e| ApiError::Internal(format!("rendering {what}: {e}")))?;
        let smaller = halved(budget);
        if html.len() <= PAGE_LIMIT || smaller == budget {
            if html.len() > PAGE_LIMIT {
                tracing::warn!(
                    page = what,
                    bytes = html.len(),
                    "page over the size limit at the smallest budget"
                );
            }
            return Ok(Html(html));
        }
        budget = smaller;
    }
}

/// Lays out a run's page (pure: the handler only loads).
pub fn build(
    viewer: &Viewer,
    run: &RunRow,
    steps: &[StepRow],
    events: &[EventRow],
    notice: Option<&'static str>,
    now: DateTime<Utc>,
    budget: Budget,
) -> RunPage {
    let over = run.status.is_terminal();
    let end = run.finished_at.unwrap_or(now);
    let attempts = timeline::attempts(events, end, over);
    let names: Vec<String> = steps.iter().map(|s| s.name.clone()).collect();
    let waits = timeline::waits(events);
    let chart = timeline::chart(&names, &attempts, &waits, run.created_at, end, budget.bars);

    let retry = match run.status.retry_action() {
        Some(RetryAction::Resume) => Some(RetryOffer {
            label: "Retry the compensation",
            explanation: "The compensation that gave up is attempted again, with a fresh budget of attempts. \
                          This run resumes; no new run is started.",
        }),
        Some(RetryAction::NewRun) if run.retried_by.is_none() => Some(RetryOffer {
            label: "Retry as a new run",
            explanation: "A new run starts with the same input, linked to this one. This run stays as it is.",
        }),
        _ => None,
    };
    let link = |id: Option<Uuid>| id.map(|id| (id.to_string(), format::short_id(id)));
    let error = run.run_error().map(|e| ErrorLine {
        step: e.step.unwrap_or_default(),
        message: format::clip(&e.message, budget.text),
        retryable: e.retryable,
    });
    let mut duration = format::between(run.created_at, end);
    if !over {
        duration.push_str(" so far");
    }
    let summary = Summary {
        id: run.id.to_string(),
        short_id: format::short_id(run.id),
        workflow: run.workflow.clone(),
        version: run.workflow_version,
        status: run.status.as_str(),
        in_flight: !over,
        cancel_requested: run.cancel_requested,
        pause_requested: run.pause_requested,
        paused: match (run.status, run.paused_from, run.held) {
            (RunStatus::Paused, Some(from), _) => Some(format!(
                "Paused by an operator while {}. It holds no lease and nothing runs until it is resumed; \
                 a wait keeps its deadline, and what arrives meanwhile is kept.",
                from.as_str()
            )),
            (_, _, true) => {
                Some("Its workflow is paused: the run is accepted and starts when the workflow is resumed.".to_string())
            }
            _ => None,
        },
        subject: format::clip(run.subject.as_deref().unwrap_or_default(), 300),
        idempotency_key: run.idempotency_key.clone().unwrap_or_default(),
        trigger: started_how(run.trigger).to_string(),
        created: format::time(run.created_at),
        finished: run.finished_at.map(format::time).unwrap_or_default(),
        duration,
        error,
        parked: run.parked_reason.as_deref().map(|r| format::clip(r, budget.text)),
        waiting: run.waiting().map(|w| {
            let step = steps.get(w.step).map_or("?", |s| s.name.as_str());
            let what = match w.kind {
                crate::engine::WaitKind::Signal => format!("signal {}", format::clip(&w.name, 120)),
                crate::engine::WaitKind::Completion => format!("the completion of attempt {}", w.attempt),
                crate::engine::WaitKind::Sleep => "time".to_string(),
            };
            let now = Utc::now();
            let left = if w.deadline < now {
                format!("overdue by {}", format::between(w.deadline, now))
            } else {
                format!("in {}", format::between(now, w.deadline))
            };
            (
                format!(
                    "Step {step} waits for {what} until {} ({left}).",
                    format::time(w.deadline)
                ),
                w.deadline < now,
            )
        }),
        retry_of: link(run.retry_of),
        retried_by: link(run.retried_by),
    };

    let resolvable = if run.status == RunStatus::Failed {
        steps
            .iter()
            .filter(|s| s.status == StepStatus::CompensationFailed)
            .map(|s| s.name.clone())
            .collect()
    } else {
        Vec::new()
    };
    let restartable = matches!(
        run.status,
        RunStatus::Compensated | RunStatus::Cancelled | RunStatus::Failed
    ) && run.retried_by.is_none();
    let restart_from = if restartable {
        let reusable = steps
            .iter()
            .take_while(|s| matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped))
            .count();
        steps.iter().take(reusable + 1).map(|s| s.name.clone()).collect()
    } else {
        Vec::new()
    };
    let input_edit = serde_json::to_string_pretty(&run.input)
        .ok()
        .filter(|text| text.len() <= MAX_INPUT_EDIT)
        .unwrap_or_default();
    let mut outputs_left = budget.step_outputs;
    let steps = steps
        .iter()
        .enumerate()
        .map(|(i, step)| step_line(i, step, run.status, budget, &mut outputs_left))
        .collect();

    let (events, events_omitted, events_cut_at) = log_lines(events, run.created_at, budget);
    RunPage {
        resolvable,
        restart_from,
        input_edit,
        operator: viewer.session.operator.clone(),
        csrf: viewer.csrf.clone(),
        can_cancel: run.status.can_cancel()
            && !run.cancel_requested
            && !(run.status == RunStatus::Paused && run.paused_from == Some(RunStatus::Compensating)),
        can_pause: run.status.can_pause() && !run.pause_requested,
        can_resume: run.status == RunStatus::Paused || run.pause_requested,
        retry,
        notice,
        input: format::json(&run.input, budget.json),
        output: run.output.as_ref().map(|o| format::json(o, budget.json)),
        run: summary,
        steps,
        chart,
        events,
        events_omitted,
        events_cut_at,
        inbox: Vec::new(),
        inbox_omitted: 0,
    }
}

fn step_line(
    index: usize,
    step: &StepRow,
    run_status: RunStatus,
    budget: Budget,
    outputs_left: &mut usize,
) -> StepLine {
    let status_text = match step.status {
        StepStatus::Pending if run_status.is_terminal() => "not reached",
        StepStatus::Pending => "not reached yet",
        StepStatus::Skipped => "skipped (condition false)",
        StepStatus::CompensationFailed => "compensation failed",
        other => other.as_str(),
    };
    let mut attempts = step.attempts.to_string();
    if step.compensation_attempts > 0 {
        attempts.push_str(&format!(" + {} undo", step.compensation_attempts));
    }
    let output = step.output.as_ref().map(|o| {
        let text = format::json(o, budget.step_output.min(*outputs_left));
        *outputs_left -= text.text.len().min(*outputs_left);
        text
    });
    let took = match (step.started_at, step.finished_at) {
        (Some(start), Some(end)) => format::between(start, end),
        _ => String::new(),
    };
    StepLine {
        number: index + 1,
        name: step.name.clone(),
        status: step.status.as_str(),
        status_text,
        attempts,
        started: step.started_at.map(format::time).unwrap_or_default(),
        took,
        error: step
            .step_error()
            .map(|e| format::clip(&e.message, budget.text))
            .unwrap_or_default(),
        output,
    }
}

/// The log entries shown (the first `log_head` and the latest), how many are left out, and
/// where the cut is.
fn log_lines(events: &[EventRow], start: DateTime<Utc>, budget: Budget) -> (Vec<EventLine>, usize, usize) {
    let line = |e: &EventRow| {
        let detail = match &e.detail {
            Value::Object(map) if map.is_empty() => String::new(),
            other => format::clip(&other.to_string(), budget.detail),
        };
        let tone = match e.kind.as_str() {
            k if k.ends_with("failed") || k == "lease_taken_over" => "bad",
            k if k.contains("compensat") || k == "run_cancelled" => "undo",
            "operator_retry"
            | "cancel_requested"
            | "pause_requested"
            | "run_paused"
            | "run_resumed"
            | "step_resolved_by_hand"
            | "operator_restart" => "operator",
            "run_completed" | "step_succeeded" => "good",
            _ => "",
        };
        EventLine {
            seq: e.seq,
            at: format::time(e.at),
            offset: format!("+{}", format::between(start, e.at)),
            kind: e.kind.as_str(),
            tone,
            step: e.step.clone().unwrap_or_default(),
            attempt: e.attempt.map(|a| a.to_string()).unwrap_or_default(),
            detail,
        }
    };
    let (rows, head) = (budget.log_rows, budget.log_head.min(budget.log_rows));
    if events.len() <= rows {
        return (events.iter().map(line).collect(), 0, events.len());
    }
    let shown = events[..head]
        .iter()
        .chain(&events[events.len() - (rows - head)..])
        .map(line)
        .collect();
    (shown, events.len() - rows, head)
}

/// The fields of the Retry and Cancel forms.
#[derive(Debug, Deserialize)]
pub struct ActionForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
}

/// Refuses an action whose form does not carry this session's CSRF token (a form that is not
/// even a form, too): nothing is done.
pub(super) fn checked(operator: &Operator, form: Result<Form<ActionForm>, FormRejection>) -> Result<(), PageError> {
    let token = form.ok().and_then(|Form(f)| f.csrf);
    operator.check_csrf(token.as_deref())
}

/// `POST /runs/{id}/retry`: retries, then shows the run that goes on (the new one, for a
/// compensated or cancelled run).
pub async fn retry(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    checked(&operator, form)?;
    let PathText(id) = path?;
    let id = parse_id(&id)?;
    let by = &operator.session.operator;
    Ok(match dashboard.app.engine.retry(id, by).await? {
        Retried::NewRun(new) => {
            tracing::info!(run_id = %id, new_run = %new, operator = %by, "dashboard: run retried as a new run");
            Redirect::to(&format!("/runs/{new}?done=retried"))
        }
        Retried::Resumed(run) => {
            tracing::info!(run_id = %run, operator = %by, "dashboard: failed run resumed");
            Redirect::to(&format!("/runs/{run}?done=resumed"))
        }
    })
}

/// The form of a resolution by hand.
#[derive(Debug, Deserialize)]
pub struct ResolveForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
    /// What was done by hand (required).
    #[serde(default)]
    pub note: String,
}

/// `POST /runs/{id}/steps/{step}/resolve`: marks the compensation that gave up as done by
/// hand, with the operator's note; the unwind goes on.
pub async fn resolve(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<super::super::extract::PathPair, ApiError>,
    form: Result<Form<ResolveForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    let form = form.ok().map(|Form(f)| f);
    operator.check_csrf(form.as_ref().and_then(|f| f.csrf.as_deref()))?;
    let super::super::extract::PathPair(id, step) = path?;
    let id = parse_id(&id)?;
    let note = form.map(|f| f.note).unwrap_or_default();
    let by = &operator.session.operator;
    dashboard.app.engine.resolve_by_hand(id, &step, by, &note).await?;
    tracing::info!(run_id = %id, %step, operator = %by, "dashboard: compensation resolved by hand");
    Ok(Redirect::to(&format!("/runs/{id}?done=resolved")))
}

/// The form of a restart from a step.
#[derive(Debug, Deserialize)]
pub struct RestartForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
    /// The step to start at.
    #[serde(default)]
    pub from_step: String,
    /// The input, as JSON (the run's own when unchanged or absent).
    #[serde(default)]
    pub input: Option<String>,
    /// Why, for the log.
    #[serde(default)]
    pub note: Option<String>,
}

/// `POST /runs/{id}/restart`: starts the run again from a step, as a new run, and shows it.
pub async fn restart(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    form: Result<Form<RestartForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    let form = form.ok().map(|Form(f)| f);
    operator.check_csrf(form.as_ref().and_then(|f| f.csrf.as_deref()))?;
    let PathText(id) = path?;
    let id = parse_id(&id)?;
    let form = form.ok_or_else(|| ApiError::invalid("from_step", "choose the step to restart from"))?;
    let input = match form.input.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        Some(text) => Some(
            serde_json::from_str::<Value>(text)
                .map_err(|e| ApiError::invalid("input", format!("the input is not JSON: {e}")))?,
        ),
        None => None,
    };
    let note = form.note.as_deref().map(str::trim).filter(|n| !n.is_empty());
    let by = &operator.session.operator;
    let new = dashboard
        .app
        .engine
        .restart(id, &form.from_step, input, by, note)
        .await?;
    tracing::info!(run_id = %id, new_run = %new, from = %form.from_step, operator = %by, "dashboard: run restarted from a step");
    Ok(Redirect::to(&format!("/runs/{new}?done=restarted")))
}

/// `POST /runs/{id}/cancel`: asks the run to stop and compensate.
pub async fn cancel(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    checked(&operator, form)?;
    let PathText(id) = path?;
    let id = parse_id(&id)?;
    dashboard.app.engine.cancel(id, &operator.session.operator).await?;
    tracing::info!(run_id = %id, operator = %operator.session.operator, "dashboard: cancel requested");
    Ok(Redirect::to(&format!("/runs/{id}?done=cancel")))
}

/// The fields of the Pause and Resume forms.
#[derive(Debug, Deserialize)]
pub struct NoteForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
    /// Why (optional, kept in the log).
    pub note: Option<String>,
}

/// The note of a Pause or Resume form, refused without this session's CSRF token (nothing is
/// done); a blank note is none.
pub(super) fn checked_note(
    operator: &Operator,
    form: Result<Form<NoteForm>, FormRejection>,
) -> Result<Option<String>, PageError> {
    let form = form.ok().map(|Form(f)| f);
    operator.check_csrf(form.as_ref().and_then(|f| f.csrf.as_deref()))?;
    Ok(form.and_then(|f| f.note).filter(|n| !n.trim().is_empty()))
}

/// `POST /runs/{id}/pause`: pauses the run after the attempt in flight.
pub async fn pause(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    form: Result<Form<NoteForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    pause_or_resume(operator, dashboard, path, form, true).await
}

/// `POST /runs/{id}/resume`: resumes a paused run (or withdraws a pause not yet taken).
pub async fn resume(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    form: Result<Form<NoteForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    pause_or_resume(operator, dashboard, path, form, false).await
}

async fn pause_or_resume(
    operator: Operator,
    dashboard: Arc<Dashboard>,
    path: Result<PathText, ApiError>,
    form: Result<Form<NoteForm>, FormRejection>,
    pause: bool,
) -> Result<Redirect, PageError> {
    let note = checked_note(&operator, form)?;
    let PathText(id) = path?;
    let id = parse_id(&id)?;
    let actor = crate::engine::machine::Actor {
        note: note.as_deref(),
        ..crate::engine::machine::Actor::from(operator.session.operator.as_str())
    };
    let engine = &dashboard.app.engine;
    if pause {
        engine.pause_as(id, actor).await?;
    } else {
        engine.resume_as(id, actor).await?;
    }
    tracing::info!(run_id = %id, pause, operator = %operator.session.operator, "dashboard: pause or resume");
    let done = if pause { "paused" } else { "unpaused" };
    Ok(Redirect::to(&format!("/runs/{id}?done={done}")))
}

/// What started a run, in words for beside its start time ("by api" there read like a
/// person's name).
fn started_how(trigger: crate::engine::Trigger) -> &'static str {
    match trigger {
        crate::engine::Trigger::Api => "triggered over the API",
        crate::engine::Trigger::Schedule => "fired by a schedule",
        crate::engine::Trigger::Retry => "started by an operator's retry or restart",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EventKind;
    use serde_json::json;

    #[test]
    fn long_logs_keep_their_start_and_their_end() {
        let t0 = Utc::now();
        let events: Vec<EventRow> = (1..=1_000)
            .map(|seq| EventRow {
                seq,
                at: t0,
                kind: EventKind::StepFailed,
                step: Some("s".into()),
                attempt: Some(seq),
                detail: json!({"error": "x".repeat(5_000)}),
            })
            .collect();
        let b = Budget::FULL;
        let (shown, omitted, cut) = log_lines(&events, t0, b);
        assert_eq!(shown.len(), b.log_rows);
        assert_eq!(omitted, 1_000 - b.log_rows);
        assert_eq!(cut, b.log_head);
        assert_eq!(shown[b.log_head - 1].seq, b.log_head as i32);
        assert_eq!(shown[b.log_head].seq, (1_000 - (b.log_rows - b.log_head) + 1) as i32);
        assert_eq!(shown[b.log_rows - 1].seq, 1_000);
        assert!(shown.iter().all(|l| l.detail.chars().count() <= b.detail));
        assert_eq!(shown[0].tone, "bad");
    }

    #[test]
    fn budgets_halve_down_to_a_floor() {
        let mut b = Budget::FULL;
        for _ in 0..20 {
            b = b.halved();
        }
        assert_eq!(b, b.halved(), "the floor is reached");
        assert!(b.log_head <= b.log_rows && b.log_rows >= 20 && b.bars >= 20);
    }
}

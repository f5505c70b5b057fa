//! Workflows and runs: trigger, list, inspect, read the log, retry, cancel.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::{AdminAccess, ApiAccess, Role};
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, Params, PathText};
use crate::engine::{
    Access, EventKind, Retried, RetryPolicy, RunDetail, RunStatus, Source, StepStatus, Trigger, TriggerOptions,
    WaitKind, Workflow,
};
use crate::engine::{Cursor, EventRow, RunFilter, RunRow, StepRow};

/// A run, as the API shows it (docs/contract.md §5).
#[derive(Debug, Serialize, ToSchema)]
pub struct RunBody {
    /// The run's id.
    pub id: Uuid,
    /// The workflow.
    pub workflow: String,
    /// The workflow version it runs.
    pub workflow_version: i32,
    /// Its status.
    pub status: RunStatus,
    /// The input it was triggered with.
    #[schema(value_type = Object)]
    pub input: Value,
    /// The workflow's output, once completed.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Why it did not complete.
    pub error: Option<RunErrorBody>,
    /// What operators search for (e.g. the customer's email).
    pub subject: Option<String>,
    /// The trigger's idempotency key.
    pub idempotency_key: Option<String>,
    /// The run this one retries.
    pub retry_of: Option<Uuid>,
    /// The run that retried this one.
    pub retried_by: Option<Uuid>,
    /// What started it.
    pub trigger: Trigger,
    /// An operator asked to cancel it.
    pub cancel_requested: bool,
    /// An operator asked to pause it; it pauses once the attempt in flight is recorded.
    pub pause_requested: bool,
    /// While `paused`: the status a resume returns it to (`pending`, `running` or
    /// `compensating`). Null otherwise.
    pub paused_from: Option<RunStatus>,
    /// Why a `pending` run is not started: `workflow_paused` while its workflow is paused
    /// (it starts when the workflow is resumed). Null otherwise.
    pub held: Option<&'static str>,
    /// Why it is set aside, neither leased nor due: its recorded steps do not match its
    /// workflow version's plan on the instance that claimed it. Null for every other run.
    pub parked_reason: Option<String>,
    /// While one of its steps waits (no lease held): for what, until when. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WaitingBody>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it reached a terminal status.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its steps, in plan order (absent in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepBody>>,
}

/// What a waiting run waits for (DESIGN.md §9).
#[derive(Debug, Serialize, ToSchema)]
pub struct WaitingBody {
    /// `signal`, `completion` or `sleep`.
    pub kind: WaitKind,
    /// The signal's name; the step's own name for a completion or a sleep.
    pub name: String,
    /// When the wait ends with nothing received (for a sleep: when it is over).
    pub deadline: DateTime<Utc>,
    /// The waiting step's name (in a run's own answer; absent in lists, which carry no
    /// steps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The waiting attempt (a completion names it).
    pub attempt: i32,
}

/// Why a run did not complete.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunErrorBody {
    /// The step that gave up (null for a cancel).
    pub step: Option<String>,
    /// What went wrong.
    pub message: String,
    /// Whether the error was retryable (the step ran out of attempts).
    pub retryable: bool,
}

/// A step of a run.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepBody {
    /// Position in the plan, from 0.
    pub index: i16,
    /// Its name.
    pub name: String,
    /// Its status.
    pub status: StepStatus,
    /// Invoke attempts started.
    pub attempts: i32,
    /// Compensation attempts started.
    pub compensation_attempts: i32,
    /// Attempts (invoke and compensation) lost with their worker, not charged to the budget.
    pub lost_attempts: i32,
    /// When its last attempt began.
    pub started_at: Option<DateTime<Utc>>,
    /// When its last attempt ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its recorded output.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Its last error.
    pub error: Option<StepErrorBody>,
}

/// A step's last error.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepErrorBody {
    /// What went wrong.
    pub message: String,
    /// Whether another attempt could succeed.
    pub retryable: bool,
}

impl RunBody {
    /// The API view of a run, with its steps when given.
    pub fn new(run: RunRow, steps: Option<Vec<StepRow>>) -> Self {
        let error = run.run_error().map(|e| RunErrorBody {
            step: e.step,
            message: e.message,
            retryable: e.retryable,
        });
        let waiting = run.waiting().map(|w| WaitingBody {
            kind: w.kind,
            step: steps
                .as_ref()
                .and_then(|steps| steps.get(w.step))
                .map(|s| s.name.clone()),
            name: w.name,
            deadline: w.deadline,
            attempt: i32::try_from(w.attempt).unwrap_or(i32::MAX),
        });
        Self {
            id: run.id,
            workflow: run.workflow,
            workflow_version: run.workflow_version,
            status: run.status,
            input: run.input,
            output: run.output,
            error,
            subject: run.subject,
            idempotency_key: run.idempotency_key,
            retry_of: run.retry_of,
            retried_by: run.retried_by,
            trigger: run.trigger,
            cancel_requested: run.cancel_requested,
            pause_requested: run.pause_requested,
            paused_from: run.paused_from,
            held: run.held.then_some("workflow_paused"),
            parked_reason: run.parked_reason,
            waiting,
            created_at: run.created_at,
            updated_at: run.updated_at,
            finished_at: run.finished_at,
            steps: steps.map(|steps| steps.into_iter().map(StepBody::from).collect()),
        }
    }
}

impl From<RunDetail> for RunBody {
    fn from(detail: RunDetail) -> Self {
        Self::new(detail.run, Some(detail.steps))
    }
}

impl From<StepRow> for StepBody {
    fn from(step: StepRow) -> Self {
        let error = step.step_error().map(|e| StepErrorBody {
            message: e.message,
            retryable: e.retryable,
        });
        Self {
            index: step.idx,
            name: step.name,
            status: step.status,
            attempts: step.attempts,
            compensation_attempts: step.compensation_attempts,
            lost_attempts: step.lost_attempts + step.lost_compensation_attempts,
            started_at: step.started_at,
            finished_at: step.finished_at,
            output: step.output,
            error,
        }
    }
}

/// A page of runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    /// Newest first, without their steps.
    pub runs: Vec<RunBody>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// An execution-log entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventBody {
    /// Position in the log, from 1, without gaps.
    pub seq: i32,
    /// When it was written.
    pub at: DateTime<Utc>,
    /// What happened.
    pub kind: EventKind,
    /// The step concerned.
    pub step: Option<String>,
    /// The attempt concerned.
    pub attempt: Option<i32>,
    /// Details (errors, retry times, who).
    #[schema(value_type = Object)]
    pub detail: Value,
}

impl From<EventRow> for EventBody {
    fn from(e: EventRow) -> Self {
        Self {
            seq: e.seq,
            at: e.at,
            kind: e.kind,
            step: e.step,
            attempt: e.attempt,
            detail: e.detail,
        }
    }
}

/// A run's execution log.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    /// In order.
    pub events: Vec<EventBody>,
}

/// A registered workflow and its plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowBody {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: i32,
    /// What it is for.
    pub description: String,
    /// Who may trigger it: `api` (the API token) or `admin` (maintenance, the admin token).
    pub access: Access,
    /// `builtin` (compiled into the server) or `defined` (a stored JSON definition).
    pub source: Source,
    /// Its steps, in order.
    pub steps: Vec<StepPlanBody>,
    /// Set while it is paused (every version): its new runs are accepted and held.
    pub paused: Option<crate::engine::PausedWorkflow>,
}

/// A step of a plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepPlanBody {
    /// Position, from 0.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Whether it can be undone.
    pub has_compensation: bool,
    /// Whether the embedding application may plug in its handler.
    pub hook: bool,
    /// Whether a `when` condition may skip it.
    pub conditional: bool,
    /// What it calls, for a step of a defined workflow (`shop POST /stock/reserve`).
    pub calls: Option<String>,
    /// Per-attempt timeout, if any.
    pub timeout_ms: Option<u64>,
    /// Retries of the invoke.
    pub retry: RetryBody,
    /// Retries of the compensation.
    pub compensation_retry: RetryBody,
}

/// A retry policy.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetryBody {
    /// Attempts in all.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_delay_ms: u64,
    /// Growth of each further delay.
    pub backoff_factor: f64,
    /// Cap on any delay.
    pub max_delay_ms: u64,
    /// Randomized share of each delay.
    pub jitter: f64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&RetryPolicy> for RetryBody {
    fn from(p: &RetryPolicy) -> Self {
        Self {
            max_attempts: p.max_attempts,
            initial_delay_ms: millis(p.initial_delay),
            backoff_factor: p.backoff_factor,
            max_delay_ms: millis(p.max_delay),
            jitter: p.jitter,
        }
    }
}

impl From<&Workflow> for WorkflowBody {
    fn from(w: &Workflow) -> Self {
        Self {
            name: w.name().to_string(),
            version: w.version(),
            description: w.description().to_string(),
            access: w.access(),
            source: w.source(),
            steps: w
                .steps()
                .iter()
                .enumerate()
                .map(|(index, s)| StepPlanBody {
                    index,
                    name: s.name().to_string(),
                    has_compensation: s.has_compensation(),
                    hook: s.is_hook(),
                    conditional: s.is_conditional(),
                    calls: s.calls().map(str::to_string),
                    timeout_ms: s.attempt_timeout().map(millis),
                    retry: s.retry_policy().into(),
                    compensation_retry: s.compensation_retry_policy().into(),
                })
                .collect(),
            paused: None,
        }
    }
}

/// The registered workflows.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowList {
    /// Every registered version, by name then version.
    pub workflows: Vec<WorkflowBody>,
}

/// The registered workflows with their step plans.
#[utoipa::path(get, path = "/v1/workflows", tag = "workflows",
    security(("bearer" = [])),
    responses(
        (status = 200, body = WorkflowList),
        (status = 401, body = ErrorBody),
    ))]
pub async fn list_workflows(_: ApiAccess, State(state): State<Arc<AppState>>) -> Result<Json<WorkflowList>, ApiError> {
    let paused = state.engine.paused_workflows().await?;
    Ok(Json(WorkflowList {
        workflows: state
            .engine
            .workflows()
            .iter()
            .map(|w| WorkflowBody {
                paused: paused.iter().find(|p| p.workflow == w.name()).cloned(),
                ..WorkflowBody::from(w.as_ref())
            })
            .collect(),
    }))
}

pub(crate) fn parse_run_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound {
        what: "run",
        id: id.to_string(),
    })
}

pub(crate) async fn run_body(state: &AppState, id: Uuid) -> Result<RunBody, ApiError> {
    let detail = state.engine.run(id).await?.ok_or(ApiError::NotFound {
        what: "run",
        id: id.to_string(),
    })?;
    Ok(detail.into())
}

/// `body` with `status` and a `Location` header naming the run.
pub(crate) fn with_location(status: StatusCode, body: RunBody) -> Response {
    let location = HeaderValue::from_str(&format!("/v1/runs/{}", body.id)).ok();
    let mut response = (status, Json(body)).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Starts a run. The body is the workflow input (for `create-customer-account`:
/// `{"authIdentityId": "authid_...", "customerData": {"email": ...}}`).
///
/// With `Idempotency-Key`, the same key and body return the same run; the same key with
/// another body is refused. With `wait_ms`, the answer waits up to that long for the run to
/// finish. 201: created and not finished; 200: finished, or an idempotent replay. Once the
/// run is committed the answer is never an error: should reading it back fail, the answer is
/// the run as it was accepted (without `steps`).
#[utoipa::path(post, path = "/v1/workflows/{workflow}/runs", tag = "runs",
    security(("bearer" = [])),
    params(
        ("workflow" = String, Path, description = "The workflow's name"),
        ("wait_ms" = Option<u32>, Query, description = "Wait up to this long (0-30000) for a terminal status"),
        ("Idempotency-Key" = Option<String>, Header, description = "At most 255 characters"),
    ),
    request_body(content = Object, description = "The workflow input", content_type = "application/json"),
    responses(
        (status = 201, description = "Created; not finished yet", body = RunBody),
        (status = 200, description = "Finished within wait_ms, or replayed", body = RunBody),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "An admin-only workflow (e.g. retention-sweep) with the API token", body = ErrorBody),
        (status = 404, description = "Unknown workflow", body = ErrorBody),
        (status = 409, description = "Idempotency key used with another body", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "Input fails the workflow's schema", body = ErrorBody),
    ))]
pub async fn trigger(
    ApiAccess(role): ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(workflow): PathText,
    params: Params,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let mut found = state.engine.workflow(&workflow);
    if found.is_none() {
        // Defined on another instance a moment ago, its announcement not here yet: look.
        if let Err(e) = state.definitions.refresh().await {
            tracing::warn!(error = %e, "reloading workflow definitions failed");
        }
        found = state.engine.workflow(&workflow);
    }
    let Some(definition) = found else {
        return Err(ApiError::NotFound {
            what: "workflow",
            id: workflow,
        });
    };
    if definition.access() == Access::Admin && role != Role::Admin {
        return Err(ApiError::Forbidden);
    }
    let wait_ms = params.integer("wait_ms", 0, 30_000, 0)?;
    let idempotency_key = super::extract::idempotency_key(&headers)?;
    let options = TriggerOptions {
        idempotency_key,
        trigger: Some(Trigger::Api),
    };
    // From the moment the run is committed, the answer names it (201 or 200 with its id and
    // Location), never an error a client would retry as if nothing had been written.
    let (triggered, run) = if wait_ms > 0 {
        let waited = state
            .engine
            .trigger_and_wait(&workflow, body.0, options, Duration::from_millis(wait_ms as u64))
            .await?;
        let run = match waited.detail {
            Some(detail) => RunBody::from(detail),
            None => RunBody::new(waited.triggered.accepted.clone(), None),
        };
        (waited.triggered, run)
    } else {
        let triggered = state.engine.trigger(&workflow, body.0, options).await?;
        let run = match run_body(&state, triggered.run_id).await {
            Ok(run) => run,
            Err(e) => {
                tracing::warn!(run_id = %triggered.run_id, error = %e, "reading a triggered run failed; answering with the run as accepted");
                RunBody::new(triggered.accepted.clone(), None)
            }
        };
        (triggered, run)
    };
    let status = if !triggered.created || run.status.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(with_location(status, run))
}

/// The cursor of the page after `run` (opaque to clients).
pub fn encode_cursor(run: &RunRow) -> String {
    cursor_after(run.created_at, run.id)
}

fn cursor_after(created_at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{}", created_at.timestamp_micros(), id))
}

/// Reads a cursor [`encode_cursor`] made; anything else is a 422 naming `cursor`.
pub fn decode_cursor(text: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::invalid("cursor", "not a cursor this API returned");
    let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = raw.split_once('|').ok_or_else(bad)?;
    let created_at = DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok(Cursor {
        created_at,
        id: Uuid::parse_str(id).map_err(|_| bad())?,
    })
}

/// Reads the list filters shared by the API and the dashboard.
pub fn run_filter(params: &Params) -> Result<RunFilter, ApiError> {
    let statuses = match params.text("status", 200)? {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                RunStatus::parse(s).ok_or_else(|| {
                    let all: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::invalid("status", format!("`{s}` is not one of {}", all.join(", ")))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(RunFilter {
        workflow: params.text("workflow", 200)?,
        statuses,
        query: params.text("q", 300)?,
        created_from: params.timestamp("from")?,
        created_to: params.timestamp("to")?,
    })
}

/// Lists runs, newest first. `q` matches a run id, an idempotency key or the subject (the
/// customer's email) exactly; `status` takes one status or a comma list.
#[utoipa::path(get, path = "/v1/runs", tag = "runs",
    security(("bearer" = [])),
    params(
        ("workflow" = Option<String>, Query, description = "Only this workflow"),
        ("status" = Option<String>, Query, description = "A status or a comma list of statuses"),
        ("q" = Option<String>, Query, description = "A run id, an idempotency key or a subject (e.g. an email)"),
        ("from" = Option<String>, Query, description = "Created at or after (RFC 3339)"),
        ("to" = Option<String>, Query, description = "Created before (RFC 3339)"),
        ("limit" = Option<u32>, Query, description = "1-200, default 50"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, body = RunList),
        (status = 401, body = ErrorBody),
        (status = 422, description = "A bad parameter", body = ErrorBody),
    ))]
pub async fn list_runs(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<Json<RunList>, ApiError> {
    let filter = run_filter(&params)?;
    let limit = params.integer("limit", 1, 200, 50)?;
    let cursor = params.text("cursor", 200)?.map(|c| decode_cursor(&c)).transpose()?;
    let mut rows = state.engine.list_runs(&filter, cursor, limit + 1).await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(RunList {
        runs: rows.into_iter().map(|r| RunBody::new(r, None)).collect(),
        next_cursor,
    }))
}

/// A run with its steps.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The run's id")),
    responses(
        (status = 200, body = RunBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn get_run(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
) -> Result<Json<RunBody>, ApiError> {
    Ok(Json(run_body(&state, parse_run_id(&id)?).await?))
}

/// A run's execution log, in order.
#[utoipa::path(get, path = "/v1/runs/{id}/events", tag = "runs",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The run's id")),
    responses(
        (status = 200, body = EventList),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn run_events(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
) -> Result<Json<EventList>, ApiError> {
    let run = parse_run_id(&id)?;
    let events = state
        .engine
        .events(run)
        .await?
        .ok_or(ApiError::NotFound { what: "run", id })?;
    Ok(Json(EventList {
        events: events.into_iter().map(EventBody::from).collect(),
    }))
}

/// Retries a run (admin token). A `failed` run resumes the compensation that gave up, with a
/// fresh budget (200, the run). A `compensated` or `cancelled` run is started again as a new
/// run with the same input, linked both ways (201, the new run). The operator named in
/// `X-Sagaflow-Operator` is recorded in the log.
#[utoipa::path(post, path = "/v1/runs/{id}/retry", tag = "operators",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The run's id"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)"),
    ),
    responses(
        (status = 200, description = "The failed run resumes", body = RunBody),
        (status = 201, description = "A new run was started", body = RunBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Not allowed in the run's status, or already retried", body = ErrorBody),
        (status = 422, description = "A bad X-Sagaflow-Operator header", body = ErrorBody),
    ))]
pub async fn retry_run(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
) -> Result<Response, ApiError> {
    let run = parse_run_id(&id)?;
    Ok(match state.engine.retry(run, &admin.operator).await? {
        Retried::Resumed(id) => with_location(StatusCode::OK, run_body(&state, id).await?),
        Retried::NewRun(id) => with_location(StatusCode::CREATED, run_body(&state, id).await?),
    })
}

/// Cancels a `pending` or `running` run (admin token): it stops after the attempt in flight
/// and compensates, ending `cancelled`. 202: accepted (`cancel_requested` is true).
#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "operators",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The run's id"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)"),
    ),
    responses(
        (status = 202, body = RunBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Not allowed in the run's status", body = ErrorBody),
        (status = 422, description = "A bad X-Sagaflow-Operator header", body = ErrorBody),
    ))]
pub async fn cancel_run(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
) -> Result<Response, ApiError> {
    let run = parse_run_id(&id)?;
    state.engine.cancel(run, &admin.operator).await?;
    Ok((StatusCode::ACCEPTED, Json(run_body(&state, run).await?)).into_response())
}

/// What a restart asks for.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartBody {
    /// The step the new run starts at; the steps before it keep their recorded outputs.
    pub from_step: String,
    /// A new input (checked like a trigger's); the run's own when absent.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    /// Why, for the log.
    #[serde(default)]
    pub note: Option<String>,
}

/// What a resolution by hand says.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// What was done by hand, and why (required).
    pub note: String,
}

/// Restarts a `compensated`, `cancelled` or `failed` run from a step (admin token): a new
/// run of the same workflow version, linked both ways, that keeps the recorded outputs of
/// the steps before `from_step` and starts there. 201: the new run. Refused (409
/// `cannot_restart_from`) when a step before it did not succeed or was compensated: its
/// effects no longer exist, so start at it or earlier.
#[utoipa::path(post, path = "/v1/runs/{id}/restart", tag = "operators",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The run's id"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)"),
    ),
    request_body = RestartBody,
    responses(
        (status = 201, description = "The new run", body = RunBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, description = "No such run or step", body = ErrorBody),
        (status = 409, description = "Not allowed in the run's status, already retried, or `cannot_restart_from`", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad body, input or note", body = ErrorBody),
    ))]
pub async fn restart_run(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let run = parse_run_id(&id)?;
    let body: RestartBody = body.parse()?;
    let new = state
        .engine
        .restart(run, &body.from_step, body.input, &admin.operator, body.note.as_deref())
        .await?;
    Ok(with_location(StatusCode::CREATED, run_body(&state, new).await?))
}

/// Resolves by hand the compensation of `step` that gave up (admin token; the run is
/// `failed`): the step is marked `compensated` with the operator's note, and the unwind
/// goes on with the steps before it. 200: the run, `compensating` again.
#[utoipa::path(post, path = "/v1/runs/{id}/steps/{step}/resolve", tag = "operators",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The run's id"),
        ("step" = String, Path, description = "The step whose compensation gave up"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)"),
    ),
    request_body = ResolveBody,
    responses(
        (status = 200, body = RunBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, description = "No such run or step", body = ErrorBody),
        (status = 409, description = "The run is not failed, or the step's compensation did not give up", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "No note, or a bad body", body = ErrorBody),
    ))]
pub async fn resolve_step(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    super::extract::PathPair(id, step): super::extract::PathPair,
    body: JsonBody,
) -> Result<Json<RunBody>, ApiError> {
    let run = parse_run_id(&id)?;
    let body: ResolveBody = body.parse()?;
    state
        .engine
        .resolve_by_hand(run, &step, &admin.operator, &body.note)
        .await?;
    Ok(Json(run_body(&state, run).await?))
}

/// The runs a bulk action applies to: the filter of `GET /v1/runs`.
#[derive(Debug, Default, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    /// Only this workflow.
    #[serde(default)]
    pub workflow: Option<String>,
    /// A status or a comma list of statuses.
    #[serde(default)]
    pub status: Option<String>,
    /// A run id, an idempotency key or a subject, exactly.
    #[serde(default)]
    pub q: Option<String>,
    /// Only runs created at or after this time (RFC 3339).
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    /// Only runs created before this time (RFC 3339).
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
}

/// A bulk action.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    /// `retry`, `cancel`, `pause` or `resume`.
    pub action: crate::engine::BulkAction,
    /// Which runs (all, when absent: mind the limit).
    #[serde(default)]
    pub filter: BulkFilter,
    /// Count and sample only; write nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// The most runs acted on by this call (1 to 1000, default 100); call again for more.
    #[serde(default)]
    pub limit: Option<i64>,
}

/// Retries, cancels, pauses or resumes every run a filter matches (admin token), at most
/// `limit` per call, oldest first: each run is acted on as by its own route, with one log
/// entry naming the operator and the call's `bulk_id`. Only runs the action applies to are
/// counted (a retry: failed runs, and compensated or cancelled ones not yet retried; a
/// cancel: pending or running ones not yet cancelled, or paused before compensating; a
/// pause: pending, running or compensating ones not yet asked to pause; a resume: paused
/// ones, or asked to pause), so calling again goes on with the rest. `dry_run` answers the
/// count and a sample and writes nothing.
#[utoipa::path(post, path = "/v1/runs/bulk", tag = "operators",
    security(("bearer" = [])),
    params(("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)")),
    request_body = BulkBody,
    responses(
        (status = 200, body = crate::engine::BulkOutcome),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad filter or limit", body = ErrorBody),
    ))]
pub async fn bulk_action(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Json<crate::engine::BulkOutcome>, ApiError> {
    let body: BulkBody = body.parse()?;
    let filter = bulk_filter(body.filter)?;
    let limit = body.limit.unwrap_or(100);
    let outcome = state
        .engine
        .bulk(body.action, &filter, body.dry_run, limit, &admin.operator)
        .await?;
    Ok(Json(outcome))
}

/// The engine's filter of a bulk body, checked as `GET /v1/runs` checks its parameters.
pub fn bulk_filter(filter: BulkFilter) -> Result<RunFilter, ApiError> {
    let statuses = match filter.status {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                RunStatus::parse(s).ok_or_else(|| {
                    let all: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::invalid("filter.status", format!("`{s}` is not one of {}", all.join(", ")))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let text = |field: &str, value: Option<String>, max: usize| match value {
        Some(v) if v.chars().count() > max || v.contains('\0') => Err(ApiError::invalid(
            format!("filter.{field}"),
            format!("at most {max} characters, no NUL"),
        )),
        other => Ok(other),
    };
    Ok(RunFilter {
        workflow: text("workflow", filter.workflow, 200)?,
        statuses,
        query: text("q", filter.q, 300)?,
        created_from: filter.from,
        created_to: filter.to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let created_at = DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("time");
        let id = Uuid::now_v7();
        let text = cursor_after(created_at, id);
        assert_eq!(decode_cursor(&text).ok(), Some(Cursor { created_at, id }));
        for bad in ["", "!!", "bm90IGEgY3Vyc29y", &URL_SAFE_NO_PAD.encode("x|y")] {
            assert!(matches!(decode_cursor(bad), Err(ApiError::Invalid { .. })), "{bad}");
        }
    }
}

//! Cron schedules: list, create, read, replace, delete (docs/contract.md §5), plus enable, disable
//! and fire-now for operators. Reads take the API token, changes the admin token.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::{AdminAccess, ApiAccess};
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, PathText};
use super::runs::RunBody;
use crate::engine::RunStatus;
use crate::engine::scheduler::{CatchUp, FireRow, Origin, Overlap, ScheduleSpec, ScheduleView, is_valid_name};

/// A schedule, with what it will do and what it did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleBody {
    /// Its name.
    pub name: String,
    /// The cron expression as written.
    pub expression: String,
    /// The expression in words, with the time zone.
    pub description: String,
    /// The IANA time zone of the expression.
    pub time_zone: String,
    /// The workflow each tick starts.
    pub workflow: String,
    /// The input of each run.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Whether ticks fire.
    pub enabled: bool,
    /// What a tick does while a run of the schedule is in flight.
    pub overlap: Overlap,
    /// Which missed ticks fire after a time with no instance running.
    pub catch_up: CatchUp,
    /// Where it was defined (`file`: re-declared at every start).
    pub origin: Origin,
    /// The next tick not handled yet (null while disabled).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The next five fire times (empty while disabled).
    pub upcoming: Vec<DateTime<Utc>>,
    /// The last tick that started a run.
    pub last_fire_at: Option<DateTime<Utc>>,
    /// The run it started.
    pub last_run_id: Option<Uuid>,
    /// Why the last tick could not start a run, until one could.
    pub last_error: Option<String>,
    /// The latest runs it started, newest first.
    pub recent_runs: Vec<ScheduleRunBody>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A run a schedule started.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleRunBody {
    /// The run.
    pub run_id: Uuid,
    /// The tick it is for (for a fire-now: when it was asked for).
    pub tick: DateTime<Utc>,
    /// An operator's fire-now rather than a tick.
    pub manual: bool,
    /// The node that fired the tick, or the operator.
    pub fired_by: String,
    /// The run's status now.
    pub status: RunStatus,
    /// When the run finished, if it has.
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<FireRow> for ScheduleRunBody {
    fn from(f: FireRow) -> Self {
        Self {
            run_id: f.run_id,
            tick: f.tick,
            manual: f.manual,
            fired_by: f.fired_by,
            status: f.status,
            finished_at: f.finished_at,
        }
    }
}

impl From<ScheduleView> for ScheduleBody {
    fn from(view: ScheduleView) -> Self {
        let s = view.schedule;
        Self {
            name: s.name,
            expression: s.expression,
            description: view.description,
            time_zone: s.time_zone,
            workflow: s.workflow,
            input: s.input,
            enabled: s.enabled,
            overlap: s.overlap,
            catch_up: s.catch_up,
            origin: s.origin,
            next_fire_at: s.next_fire_at,
            upcoming: view.upcoming,
            last_fire_at: s.last_fire_at,
            last_run_id: s.last_run_id,
            last_error: s.last_error,
            recent_runs: view.recent_runs.into_iter().map(ScheduleRunBody::from).collect(),
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// The schedules.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    /// By name.
    pub schedules: Vec<ScheduleBody>,
}

fn not_found(name: String) -> ApiError {
    ApiError::NotFound {
        what: "schedule",
        id: name,
    }
}

/// The name in the path; one no schedule can have is simply not found (and never reaches the
/// database, which could not even store some of them).
fn path_name(PathText(name): PathText) -> Result<String, ApiError> {
    if is_valid_name(&name) {
        Ok(name)
    } else {
        Err(not_found(name))
    }
}

fn created(body: ScheduleBody) -> Response {
    let location = HeaderValue::from_str(&format!("/v1/schedules/{}", body.name)).ok();
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Every schedule, by name, with its next fire times and latest runs.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules",
    security(("bearer" = [])),
    responses(
        (status = 200, body = ScheduleList),
        (status = 401, body = ErrorBody),
    ))]
pub async fn list_schedules(_: ApiAccess, State(state): State<Arc<AppState>>) -> Result<Json<ScheduleList>, ApiError> {
    let views = state.engine.schedules().await?;
    Ok(Json(ScheduleList {
        schedules: views.into_iter().map(ScheduleBody::from).collect(),
    }))
}

/// Creates a schedule (admin token). The expression, time zone, workflow and input are
/// checked; each tick of the schedule then starts one run, with the idempotency key
/// `schedule:<name>:<tick>` and trigger `schedule`.
#[utoipa::path(post, path = "/v1/schedules", tag = "schedules",
    security(("bearer" = [])),
    request_body = ScheduleSpec,
    responses(
        (status = 201, description = "Created", body = ScheduleBody),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 409, description = "A schedule of that name exists", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "A bad name, expression, time zone, workflow or input (the field is named)", body = ErrorBody),
    ))]
pub async fn create_schedule(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let spec: ScheduleSpec = body.parse()?;
    let view = state.engine.create_schedule(spec, &admin.operator).await?;
    Ok(created(view.into()))
}

/// A schedule: its definition, the expression in words, its next five fire times and its
/// latest runs with their status.
#[utoipa::path(get, path = "/v1/schedules/{name}", tag = "schedules",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, body = ScheduleBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn get_schedule(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    path: PathText,
) -> Result<Json<ScheduleBody>, ApiError> {
    let name = path_name(path)?;
    let view = state.engine.schedule(&name).await?.ok_or_else(|| not_found(name))?;
    Ok(Json(view.into()))
}

/// Replaces a schedule's definition (admin token). The body is the same as for creating it;
/// `name` may be left out. Changing the expression, time zone or enabled state starts from
/// the next tick after now; other changes keep the next tick.
#[utoipa::path(put, path = "/v1/schedules/{name}", tag = "schedules",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    request_body = ScheduleSpec,
    responses(
        (status = 200, body = ScheduleBody),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "A bad expression, time zone, workflow or input, or another name", body = ErrorBody),
    ))]
pub async fn replace_schedule(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    path: PathText,
    body: JsonBody,
) -> Result<Json<ScheduleBody>, ApiError> {
    let name = path_name(path)?;
    let spec: ScheduleSpec = body.parse()?;
    Ok(Json(
        state
            .engine
            .replace_schedule(&name, spec, &admin.operator)
            .await?
            .into(),
    ))
}

/// Deletes a schedule (admin token). The runs it started stay.
#[utoipa::path(delete, path = "/v1/schedules/{name}", tag = "schedules",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn delete_schedule(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    path: PathText,
) -> Result<StatusCode, ApiError> {
    let name = path_name(path)?;
    state.engine.delete_schedule(&name, &admin.operator).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Enables a schedule (admin token): it fires from the next tick after now on; ticks while
/// it was disabled are not caught up.
#[utoipa::path(post, path = "/v1/schedules/{name}/enable", tag = "schedules",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, body = ScheduleBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "The stored expression is no longer understood", body = ErrorBody),
    ))]
pub async fn enable_schedule(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    path: PathText,
) -> Result<Json<ScheduleBody>, ApiError> {
    let name = path_name(path)?;
    Ok(Json(
        state
            .engine
            .set_schedule_enabled(&name, true, &admin.operator)
            .await?
            .into(),
    ))
}

/// Disables a schedule (admin token): no tick fires until it is enabled again.
#[utoipa::path(post, path = "/v1/schedules/{name}/disable", tag = "schedules",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, body = ScheduleBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "The stored expression is no longer understood", body = ErrorBody),
    ))]
pub async fn disable_schedule(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    path: PathText,
) -> Result<Json<ScheduleBody>, ApiError> {
    let name = path_name(path)?;
    Ok(Json(
        state
            .engine
            .set_schedule_enabled(&name, false, &admin.operator)
            .await?
            .into(),
    ))
}

/// Starts a run of the schedule now (admin token), enabled or not; the operator named in
/// `X-Sagaflow-Operator` is recorded. 201: the run. 409: a run is in flight and the overlap
/// policy is `skip`.
#[utoipa::path(post, path = "/v1/schedules/{name}/fire", tag = "schedules",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The schedule's name"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded with the run)"),
    ),
    responses(
        (status = 201, description = "The run started", body = RunBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, description = "Unknown schedule (or its workflow is no longer registered)", body = ErrorBody),
        (status = 409, description = "A run is in flight and the overlap policy is skip", body = ErrorBody),
        (status = 422, description = "The workflow no longer takes the input, or a bad X-Sagaflow-Operator header", body = ErrorBody),
    ))]
pub async fn fire_schedule(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    path: PathText,
) -> Result<Response, ApiError> {
    let name = path_name(path)?;
    let triggered = state.engine.fire_schedule(&name, &admin.operator).await?;
    let body = super::runs::run_body(&state, triggered.run_id).await?;
    Ok(super::runs::with_location(StatusCode::CREATED, body))
}

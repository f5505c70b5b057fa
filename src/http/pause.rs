//! Pause and resume, of a run and of a workflow (DESIGN.md §11; admin token).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::auth::AdminAccess;
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, OptionalJsonBody, PathText};
use super::runs::{RunBody, parse_run_id, run_body};
use crate::engine::machine::Actor;

/// What an operator may say with a pause or a resume (the body may be empty).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoteBody {
    /// Why, for the log (optional).
    #[serde(default)]
    pub note: Option<String>,
}

/// The admin acting, with the note they sent.
fn actor_of<'a>(admin: &'a AdminAccess, body: &'a NoteBody) -> Actor<'a> {
    Actor {
        note: body.note.as_deref(),
        ..Actor::from(admin.operator.as_str())
    }
}

fn note_of(body: Option<serde_json::Value>) -> Result<NoteBody, ApiError> {
    match body {
        Some(value) => JsonBody(value).parse(),
        None => Ok(NoteBody::default()),
    }
}

/// Pauses a `pending`, `running` or `compensating` run (admin token): at once when no
/// attempt is in flight (`status` is `paused`, no lease held, a wait keeps its deadline and
/// what arrives is kept), otherwise after the attempt in flight (202 with `pause_requested`).
/// Asking again changes nothing.
#[utoipa::path(post, path = "/v1/runs/{id}/pause", tag = "operators",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The run's id"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)"),
    ),
    request_body(content = Option<NoteBody>, description = "An optional note"),
    responses(
        (status = 202, body = RunBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Not allowed in the run's status", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad note or X-Sagaflow-Operator header", body = ErrorBody),
    ))]
pub async fn pause_run(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Response, ApiError> {
    let run = parse_run_id(&id)?;
    let body = note_of(body)?;
    let actor = actor_of(&admin, &body);
    state.engine.pause_as(run, actor).await?;
    Ok((StatusCode::ACCEPTED, Json(run_body(&state, run).await?)).into_response())
}

/// Resumes a paused run (admin token): back to the status it was paused from, due at once.
/// On a run asked to pause that has not paused yet, withdraws the request.
#[utoipa::path(post, path = "/v1/runs/{id}/resume", tag = "operators",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The run's id"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)"),
    ),
    request_body(content = Option<NoteBody>, description = "An optional note"),
    responses(
        (status = 200, body = RunBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The run is not paused", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad note or X-Sagaflow-Operator header", body = ErrorBody),
    ))]
pub async fn resume_run(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<RunBody>, ApiError> {
    let run = parse_run_id(&id)?;
    let body = note_of(body)?;
    let actor = actor_of(&admin, &body);
    state.engine.resume_as(run, actor).await?;
    Ok(Json(run_body(&state, run).await?))
}

/// What a workflow's pause or resume did.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowPauseAnswer {
    /// The workflow.
    pub workflow: String,
    /// Whether it is paused now.
    pub paused: bool,
    /// Runs held by the pause (not yet started), or released by the resume.
    pub runs: u64,
}

/// Pauses a workflow (admin token; every version): its runs not yet started, and those
/// triggered from now on, are accepted and held `pending` (`held: "workflow_paused"`) until
/// it is resumed. Runs already under way go on: pause them with a bulk pause.
#[utoipa::path(post, path = "/v1/workflows/{name}/pause", tag = "operators",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The workflow's name"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)"),
    ),
    request_body(content = Option<NoteBody>, description = "An optional note"),
    responses(
        (status = 200, body = WorkflowPauseAnswer),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 409, description = "`already_paused`", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad note or X-Sagaflow-Operator header", body = ErrorBody),
    ))]
pub async fn pause_workflow(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<WorkflowPauseAnswer>, ApiError> {
    let body = note_of(body)?;
    let actor = actor_of(&admin, &body);
    let runs = state.engine.pause_workflow(&name, actor).await?;
    Ok(Json(WorkflowPauseAnswer {
        workflow: name,
        paused: true,
        runs,
    }))
}

/// Resumes a paused workflow (admin token): the runs it held are due at once.
#[utoipa::path(post, path = "/v1/workflows/{name}/resume", tag = "operators",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The workflow's name"),
        ("X-Sagaflow-Operator" = Option<String>, Header, description = "Who is acting (recorded in the log)"),
    ),
    request_body(content = Option<NoteBody>, description = "An optional note"),
    responses(
        (status = 200, body = WorkflowPauseAnswer),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 409, description = "`not_paused`", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad note or X-Sagaflow-Operator header", body = ErrorBody),
    ))]
pub async fn resume_workflow(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<WorkflowPauseAnswer>, ApiError> {
    let body = note_of(body)?;
    let actor = actor_of(&admin, &body);
    let runs = state.engine.resume_workflow(&name, actor).await?;
    Ok(Json(WorkflowPauseAnswer {
        workflow: name,
        paused: false,
        runs,
    }))
}

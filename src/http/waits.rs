//! Deliveries to waiting runs (DESIGN.md §9): signals, by run id or by the trigger's
//! idempotency key, and the completion and heartbeat of an asynchronous step's attempt.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::auth::ApiAccess;
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, OptionalJsonBody, PathPair, PathTriple, idempotency_key};
use super::runs::parse_run_id;
use crate::engine::{Completion, Delivery, DeliveryOutcome, StepError};

fn delivered(delivery: Delivery) -> Response {
    let status = match delivery.delivered {
        DeliveryOutcome::Duplicate => StatusCode::OK,
        DeliveryOutcome::Now | DeliveryOutcome::Buffered => StatusCode::ACCEPTED,
    };
    (status, Json(delivery)).into_response()
}

/// Sends a signal to a run: the body (any JSON) becomes the output of the step waiting for
/// it. A signal sent before the run reaches its wait is kept for it; each is consumed by one
/// wait. 202 `delivered: "now"` when the run was waiting for it, `"buffered"` when kept; 200
/// `"duplicate"` when the same `Idempotency-Key` was delivered before (nothing changes).
#[utoipa::path(post, path = "/v1/runs/{id}/signals/{name}", tag = "runs",
    security(("bearer" = [])),
    params(
        ("id" = uuid::Uuid, Path, description = "The run's id"),
        ("name" = String, Path, description = "The signal's name, as the run's workflow declares it"),
        ("Idempotency-Key" = Option<String>, Header, description = "The same key delivers once (at most 255 characters)"),
    ),
    request_body(content = Object, description = "The payload", content_type = "application/json"),
    responses(
        (status = 202, description = "Delivered now or kept", body = Delivery),
        (status = 200, description = "A duplicate of an earlier delivery", body = Delivery),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run finished (`run_finished`), or its version declares no such signal (`unknown_signal`)", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad Idempotency-Key", body = ErrorBody),
    ))]
pub async fn signal_run(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathPair(id, name): PathPair,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let run = parse_run_id(&id)?;
    let key = idempotency_key(&headers)?;
    let delivery = state.engine.signal(run, &name, &body.0, key.as_deref()).await?;
    Ok(delivered(delivery))
}

/// Sends a signal to the run started with the idempotency key `key` (a payment provider's
/// webhook handler knows `order-123`, not the run id). Otherwise as by run id.
#[utoipa::path(post, path = "/v1/workflows/{workflow}/runs/by-key/{key}/signals/{name}", tag = "runs",
    security(("bearer" = [])),
    params(
        ("workflow" = String, Path, description = "The workflow's name"),
        ("key" = String, Path, description = "The idempotency key the run was triggered with"),
        ("name" = String, Path, description = "The signal's name"),
        ("Idempotency-Key" = Option<String>, Header, description = "The same key delivers once"),
    ),
    request_body(content = Object, description = "The payload", content_type = "application/json"),
    responses(
        (status = 202, description = "Delivered now or kept", body = Delivery),
        (status = 200, description = "A duplicate of an earlier delivery", body = Delivery),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such workflow, or no run with that key", body = ErrorBody),
        (status = 409, description = "The run finished, or declares no such signal", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn signal_by_key(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathTriple(workflow, key, name): PathTriple,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let delivery_key = idempotency_key(&headers)?;
    let delivery = state
        .engine
        .signal_by_key(&workflow, &key, &name, &body.0, delivery_key.as_deref())
        .await?;
    Ok(delivered(delivery))
}

/// The completion of an asynchronous attempt: an output, or an error.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionBody {
    /// The attempt completed: the `sagaflow-attempt` header of the request that was answered
    /// 202 (may be sent as a `Sagaflow-Attempt` header instead).
    #[serde(default)]
    pub attempt: Option<u32>,
    /// The step's output (give this or `error`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// The step failed: `{"code"?, "message"}`.
    #[serde(default)]
    pub error: Option<CompletionError>,
    /// With `error`: whether another attempt may succeed (default false: the run compensates).
    #[serde(default)]
    pub retryable: bool,
    /// With `error`: work done that the step's compensation must undo.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub partial: Option<Value>,
}

/// How an asynchronous attempt failed.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionError {
    /// A machine-readable code.
    #[serde(default)]
    pub code: Option<String>,
    /// What went wrong.
    pub message: String,
}

/// A heartbeat names the attempt it keeps alive.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    /// The attempt (or a `Sagaflow-Attempt` header).
    #[serde(default)]
    pub attempt: Option<u32>,
}

/// The deadline a heartbeat left in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatAnswer {
    /// When the wait ends unless completed or kept alive again (null while the attempt's 202
    /// answer is not recorded yet).
    pub deadline: Option<DateTime<Utc>>,
}

fn attempt_of(given: Option<u32>, headers: &HeaderMap) -> Result<u32, ApiError> {
    if let Some(attempt) = given {
        return Ok(attempt);
    }
    match headers
        .get("sagaflow-attempt")
        .map(|v| v.to_str().map(str::parse::<u32>))
    {
        Some(Ok(Ok(attempt))) => Ok(attempt),
        Some(_) => Err(ApiError::invalid("Sagaflow-Attempt", "a positive attempt number")),
        None => Err(ApiError::invalid(
            "attempt",
            "name the attempt completed (the `sagaflow-attempt` header of the request answered 202)",
        )),
    }
}

/// Completes an asynchronous step's attempt from outside, with an output or an error.
/// Fenced: only the attempt that is running or waiting now is accepted; an older one (a
/// retry or a takeover started a newer attempt, or its wait ended) gets 409 `stale_attempt`.
/// The same completion sent again is answered 200 `duplicate`; another outcome for a
/// completed attempt is 409 `already_completed`.
#[utoipa::path(post, path = "/v1/runs/{id}/steps/{step}/complete", tag = "runs",
    security(("bearer" = [])),
    params(
        ("id" = uuid::Uuid, Path, description = "The run's id"),
        ("step" = String, Path, description = "The asynchronous step's name"),
        ("Sagaflow-Attempt" = Option<u32>, Header, description = "The attempt, unless in the body"),
        ("Idempotency-Key" = Option<String>, Header, description = "The same key delivers once"),
    ),
    request_body = CompletionBody,
    responses(
        (status = 202, description = "Accepted: the run goes on", body = Delivery),
        (status = 200, description = "A duplicate", body = Delivery),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such run or step", body = ErrorBody),
        (status = 409, description = "`stale_attempt`, `already_completed`, `run_finished` or `not_asynchronous`", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "No attempt named, or neither or both of output and error", body = ErrorBody),
    ))]
pub async fn complete_step(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathPair(id, step): PathPair,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let run = parse_run_id(&id)?;
    let body: CompletionBody = body.parse()?;
    let attempt = attempt_of(body.attempt, &headers)?;
    let outcome = match (body.output, body.error) {
        (Some(output), None) => Ok(output),
        (None, Some(error)) => {
            let message = match error.code {
                Some(code) => format!("{code}: {}", error.message),
                None => error.message,
            };
            let mut failed = if body.retryable {
                StepError::retryable(message)
            } else {
                StepError::permanent(message)
            };
            if let Some(partial) = body.partial {
                failed = failed.with_partial(partial);
            }
            Err(failed)
        }
        (None, None) => Ok(Value::Null),
        (Some(_), Some(_)) => return Err(ApiError::invalid("error", "give `output` or `error`, not both")),
    };
    let completion = Completion {
        attempt,
        outcome,
        key: idempotency_key(&headers)?,
    };
    Ok(delivered(state.engine.complete_step(run, &step, completion).await?))
}

/// Keeps a waiting asynchronous attempt alive: its deadline moves to the step's heartbeat
/// timeout from now (never past its timeout from the attempt's start).
#[utoipa::path(post, path = "/v1/runs/{id}/steps/{step}/heartbeat", tag = "runs",
    security(("bearer" = [])),
    params(
        ("id" = uuid::Uuid, Path, description = "The run's id"),
        ("step" = String, Path, description = "The asynchronous step's name"),
        ("Sagaflow-Attempt" = Option<u32>, Header, description = "The attempt, unless in the body"),
    ),
    request_body = HeartbeatBody,
    responses(
        (status = 200, body = HeartbeatAnswer),
        (status = 400, description = "A body that is not JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "`stale_attempt`, `run_finished` or `not_asynchronous`", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn heartbeat_step(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathPair(id, step): PathPair,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<HeartbeatAnswer>, ApiError> {
    let run = parse_run_id(&id)?;
    // A heartbeat may come without a body (the attempt in its header).
    let body: HeartbeatBody = match body {
        Some(value) => JsonBody(value).parse()?,
        None => HeartbeatBody::default(),
    };
    let attempt = attempt_of(body.attempt, &headers)?;
    let deadline = state.engine.heartbeat(run, &step, attempt).await?;
    Ok(Json(HeartbeatAnswer { deadline }))
}

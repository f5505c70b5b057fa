//! Outbound webhooks over HTTP (DESIGN.md §10): subscriptions (reads with the API token,
//! changes with the admin token), their deliveries, redelivery and a test delivery.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::{AdminAccess, ApiAccess};
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, Params, PathPair, PathText};
use crate::webhooks::{AttemptOutcome, Delivery, MAX_LISTED, Subscription, SubscriptionBody, WebhookError};

impl From<WebhookError> for ApiError {
    fn from(error: WebhookError) -> Self {
        let message = error.to_string();
        match error {
            WebhookError::Invalid { field, message } => Self::Invalid { field, message },
            WebhookError::NotFound(name) => Self::NotFound {
                what: "webhook",
                id: name,
            },
            WebhookError::Exists(_) => Self::Conflict {
                code: "duplicate",
                message,
            },
            WebhookError::DeliveryNotFound { id, .. } => Self::NotFound {
                what: "delivery",
                id: id.to_string(),
            },
            WebhookError::Busy => Self::Busy {
                message,
                retry_after_s: crate::webhooks::SWITCH_LOCK_TIMEOUT_S,
            },
            WebhookError::Database(e) => e.into(),
        }
    }
}

/// Every subscription.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    /// By name.
    pub webhooks: Vec<Subscription>,
}

/// A subscription's deliveries.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    /// Newest first.
    pub deliveries: Vec<Delivery>,
}

/// What a test delivery did.
#[derive(Debug, Serialize, ToSchema)]
pub struct TestAnswer {
    /// The delivery, as recorded.
    pub delivery: Delivery,
    /// What the receiver said to its first attempt.
    pub outcome: AttemptOutcome,
}

/// The 503 that `POST`, `PUT` and `DELETE` answer when switching the webhook triggers
/// could not take its locks in time (`crate::webhooks::SWITCH_LOCK_TIMEOUT_S`, 5 s).
const BUSY_SWITCHING: &str = "`busy`: the first subscription to want a webhook trigger, or the last to stop wanting it, could not lock `runs` or `outbox_events` within 5 s; nothing changed, retry after `Retry-After`";

/// Subscribes a URL (admin token). Body: `{"name", "url", "events": [...], "workflows"?,
/// "secret_env", "enabled"?}`; `events` are `run.completed`, `run.compensated`,
/// `run.cancelled`, `run.failed`, `run.wait_overdue` and `event.<name>`. 201: the
/// subscription. The secret's variable must be set here and hold a `whsec_` secret.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks",
    security(("bearer" = [])),
    request_body = SubscriptionBody,
    responses(
        (status = 201, body = Subscription),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 409, description = "`duplicate`: the name is taken", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad field, named", body = ErrorBody),
        (status = 503, description = BUSY_SWITCHING, body = ErrorBody),
    ))]
pub async fn create_webhook(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: SubscriptionBody = body.parse()?;
    let created = state.webhooks.create(body, &admin.operator).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Every subscription (API token).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    security(("bearer" = [])),
    responses(
        (status = 200, body = WebhookList),
        (status = 401, body = ErrorBody),
    ))]
pub async fn list_webhooks(_: ApiAccess, State(state): State<Arc<AppState>>) -> Result<Json<WebhookList>, ApiError> {
    Ok(Json(WebhookList {
        webhooks: state.webhooks.list().await?,
    }))
}

/// One subscription (API token).
#[utoipa::path(get, path = "/v1/webhooks/{name}", tag = "webhooks",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The subscription's name")),
    responses(
        (status = 200, body = Subscription),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn get_webhook(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
) -> Result<Json<Subscription>, ApiError> {
    Ok(Json(state.webhooks.get(&name).await?))
}

/// Creates or replaces a subscription (admin token; the body's `name` may be left out).
/// 201 created, 200 replaced.
#[utoipa::path(put, path = "/v1/webhooks/{name}", tag = "webhooks",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The subscription's name")),
    request_body = SubscriptionBody,
    responses(
        (status = 200, body = Subscription),
        (status = 201, body = Subscription),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A bad field, named", body = ErrorBody),
        (status = 503, description = BUSY_SWITCHING, body = ErrorBody),
    ))]
pub async fn replace_webhook(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: SubscriptionBody = body.parse()?;
    let (stored, created) = state.webhooks.replace(&name, body, &admin.operator).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(stored)).into_response())
}

/// Deletes a subscription with its deliveries (admin token).
#[utoipa::path(delete, path = "/v1/webhooks/{name}", tag = "webhooks",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The subscription's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = BUSY_SWITCHING, body = ErrorBody),
    ))]
pub async fn delete_webhook(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
) -> Result<StatusCode, ApiError> {
    state.webhooks.delete(&name, &admin.operator).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a `webhook.test` delivery now (admin token), whatever the subscription's events, and
/// answers what the receiver said; it is recorded (and retried) like any delivery.
#[utoipa::path(post, path = "/v1/webhooks/{name}/test", tag = "webhooks",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The subscription's name")),
    responses(
        (status = 200, body = TestAnswer),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn test_webhook(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
) -> Result<Json<TestAnswer>, ApiError> {
    let (delivery, outcome) = state.webhooks.test(&name, &admin.operator).await?;
    Ok(Json(TestAnswer { delivery, outcome }))
}

/// A subscription's newest deliveries (API token), newest first: `?limit=` (1 to 200,
/// default 50).
#[utoipa::path(get, path = "/v1/webhooks/{name}/deliveries", tag = "webhooks",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The subscription's name"),
        ("limit" = Option<i64>, Query, description = "1 to 200, default 50"),
    ),
    responses(
        (status = 200, body = DeliveryList),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "A bad limit", body = ErrorBody),
    ))]
pub async fn list_deliveries(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
    params: Params,
) -> Result<Json<DeliveryList>, ApiError> {
    let limit = params.integer("limit", 1, MAX_LISTED, 50)?;
    Ok(Json(DeliveryList {
        deliveries: state.webhooks.deliveries(&name, limit).await?,
    }))
}

/// Delivers again (admin token): the delivery is due at once with a fresh retry window and
/// keeps its `webhook-id`. 202: the delivery.
#[utoipa::path(post, path = "/v1/webhooks/{name}/deliveries/{id}/redeliver", tag = "webhooks",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The subscription's name"),
        ("id" = i64, Path, description = "The delivery's id"),
    ),
    responses(
        (status = 202, body = Delivery),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn redeliver(
    admin: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathPair(name, id): PathPair,
) -> Result<Response, ApiError> {
    let id: i64 = id.parse().map_err(|_| ApiError::NotFound {
        what: "delivery",
        id: id.clone(),
    })?;
    let delivery = state.webhooks.redeliver(&name, id, &admin.operator).await?;
    Ok((StatusCode::ACCEPTED, Json(delivery)).into_response())
}

#[cfg(test)]
mod tests {
    use super::BUSY_SWITCHING;

    #[test]
    fn the_documented_busy_answer_names_the_lock_timeout_the_switch_uses() {
        let within = format!("within {} s", crate::webhooks::SWITCH_LOCK_TIMEOUT_S);
        assert!(
            BUSY_SWITCHING.contains(&within),
            "{BUSY_SWITCHING:?} should say {within:?}"
        );
    }
}

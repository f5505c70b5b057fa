//! The HTTP surface: [`app`] builds all of it, so tests drive exactly what the server serves.
//!
//! - [`runs`]: workflows and runs (trigger, list, inspect, log, retry, cancel).
//! - [`waits`]: deliveries to waiting runs (signals, completions, heartbeats).
//! - [`definitions`]: workflows defined as data (store, read, list and delete versions).
//! - [`customers`]: auth identities, customers, released events.
//! - [`schedules`]: cron schedules (create, read, replace, delete, enable, disable, fire now).
//! - [`dashboard`]: the operator dashboard (HTML pages, login, live updates).
//! - [`auth`]: bearer tokens; [`extract`]: reading bodies and parameters; [`error`]: the one
//!   place errors become responses; [`metrics`]: the Prometheus endpoint.
//! - [`serve`]: the accept loop, with connection, header, body and answer limits;
//!   [`throttle`]: failed authentications counted per client address.
//!
//! The OpenAPI document (`/openapi.json`) is generated from the handlers' annotations.

pub mod auth;
pub mod customers;
pub mod dashboard;
pub mod definitions;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod pause;
pub mod runs;
pub mod schedules;
pub mod serve;
pub mod throttle;
pub mod waits;
pub mod webhooks;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::auth::{ApiAccess, Tokens};
use self::error::{ApiError, ErrorBody};
use crate::engine::Engine;

/// What every handler can reach.
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// The database pool (domain reads and writes).
    pub pool: PgPool,
    /// Workflows defined as data: stored versions, kept running on this instance.
    pub definitions: crate::defined::Definitions,
    /// The API and admin tokens.
    pub tokens: Tokens,
    /// Failed authentications per client address.
    pub throttle: throttle::AuthThrottle,
    /// Outbound webhooks: subscriptions and deliveries.
    pub webhooks: crate::webhooks::Webhooks,
    /// The random secret the dashboard's signatures are keyed with (with the admin token),
    /// shared by every instance through the database.
    pub dashboard_secret: [u8; 32],
    /// Cancelled when the server stops, so that responses that never end by themselves (the
    /// dashboard's live updates) end and graceful shutdown does not wait for them.
    pub shutdown: CancellationToken,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sagaflow",
        description = "A durable saga orchestrator on PostgreSQL. Every route but /healthz and \
                       /openapi.json takes `Authorization: Bearer <token>`: the API token triggers and \
                       reads, the admin token also retries and cancels. Errors are \
                       `{\"error\": {\"code\", \"message\", \"field\"?}}`."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "runs", description = "Trigger and inspect workflow runs"),
        (name = "operators", description = "Operator actions (admin token)"),
        (name = "workflows", description = "Registered workflows"),
        (name = "schedules", description = "Cron schedules starting runs (changes need the admin token)"),
        (name = "webhooks", description = "Outbound webhooks: subscriptions and deliveries (changes need the admin token)"),
        (name = "customers", description = "The customer domain of create-customer-account"),
        (name = "system", description = "Health, metrics"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document and the router serving what it describes.
fn api() -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(metrics_text))
        .routes(routes!(runs::list_workflows))
        .routes(routes!(runs::trigger))
        .routes(routes!(runs::list_runs))
        .routes(routes!(runs::get_run))
        .routes(routes!(runs::run_events))
        .routes(routes!(runs::retry_run))
        .routes(routes!(runs::cancel_run))
        .routes(routes!(runs::restart_run))
        .routes(routes!(runs::bulk_action))
        .routes(routes!(runs::resolve_step))
        .routes(routes!(pause::pause_run))
        .routes(routes!(pause::resume_run))
        .routes(routes!(pause::pause_workflow))
        .routes(routes!(pause::resume_workflow))
        .routes(routes!(waits::signal_run))
        .routes(routes!(waits::signal_by_key))
        .routes(routes!(waits::complete_step))
        .routes(routes!(waits::heartbeat_step))
        .routes(routes!(definitions::put_definition, definitions::get_definition))
        .routes(routes!(definitions::list_versions))
        .routes(routes!(definitions::delete_version))
        .routes(routes!(schedules::list_schedules, schedules::create_schedule))
        .routes(routes!(
            schedules::get_schedule,
            schedules::replace_schedule,
            schedules::delete_schedule
        ))
        .routes(routes!(schedules::enable_schedule))
        .routes(routes!(schedules::disable_schedule))
        .routes(routes!(schedules::fire_schedule))
        .routes(routes!(webhooks::create_webhook, webhooks::list_webhooks))
        .routes(routes!(
            webhooks::get_webhook,
            webhooks::replace_webhook,
            webhooks::delete_webhook
        ))
        .routes(routes!(webhooks::test_webhook))
        .routes(routes!(webhooks::list_deliveries))
        .routes(routes!(webhooks::redeliver))
        .routes(routes!(customers::create_identity))
        .routes(routes!(customers::get_identity))
        .routes(routes!(customers::list_customers))
        .routes(routes!(customers::get_customer))
        .routes(routes!(customers::list_events))
        .split_for_parts()
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().1
}

/// The whole HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    let (router, spec) = api();
    let spec = Arc::new(spec);
    router
        .route("/openapi.json", get(move || async move { Json(spec.as_ref().clone()) }))
        .merge(dashboard::router(Arc::clone(&state)))
        .fallback(no_route)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_string())
}

/// The server's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// 200 once the server is up (migrations ran before it listens) and the database answers;
/// 503 otherwise. No token needed.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
async fn healthz(State(state): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&state.pool)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "health check: database unreachable");
            ApiError::Unavailable
        })?;
    Ok(Json(Health { status: "ok".into() }))
}

/// Prometheus metrics (text format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "system",
    security(("bearer" = [])),
    responses((status = 200, content_type = "text/plain", body = String), (status = 401, body = ErrorBody)))]
async fn metrics_text(_: ApiAccess, State(state): State<Arc<AppState>>) -> Response {
    let load = state.engine.load();
    ::metrics::gauge!(crate::engine::metrics_names::SLOTS_BUSY).set(load.slots_busy as f64);
    ::metrics::gauge!(crate::engine::metrics_names::CONNECTIONS_BUSY, "pool" => "worker")
        .set(f64::from(load.worker_connections_busy));
    ::metrics::gauge!(crate::engine::metrics_names::CONNECTIONS_BUSY, "pool" => "api")
        .set(f64::from(load.api_connections_busy));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use crate::engine::{EventKind, RunStatus, StepStatus, Trigger};

    /// The document names each status as the API sends it (the fuzz pass checks answers
    /// against it; a schema with `"Completed"` once refused every run).
    #[test]
    fn the_openapi_document_names_statuses_as_the_api_sends_them() {
        let spec = serde_json::to_value(super::openapi()).expect("json");
        let names = |schema: &str| -> Vec<String> {
            spec["components"]["schemas"][schema]["enum"]
                .as_array()
                .unwrap_or_else(|| panic!("{schema} has no enum"))
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        fn sent<T: serde::Serialize>(all: &[T]) -> Vec<String> {
            all.iter()
                .filter_map(|v| serde_json::to_value(v).ok()?.as_str().map(str::to_string))
                .collect()
        }
        assert_eq!(names("RunStatus"), sent(&RunStatus::ALL));
        assert_eq!(names("StepStatus"), sent(&StepStatus::ALL));
        assert_eq!(names("Trigger"), sent(&Trigger::ALL));
        assert_eq!(names("EventKind"), sent(&EventKind::ALL));
    }
}

//! The HTTP surface: `fn app(state) -> Router` builds all of it, so tests drive exactly what
//! the server serves.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::json;
use sqlx::PgPool;

use crate::engine::Engine;

/// What every handler can reach.
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// The database pool (domain reads).
    pub pool: PgPool,
}

/// The whole HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new().route("/healthz", get(healthz)).with_state(state)
}

/// 200 once the server is up (migrations ran before it listens) and the database answers.
async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool).await {
        Ok(_) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": {"code": "database_unavailable", "message": e.to_string()}})),
        ),
    }
}

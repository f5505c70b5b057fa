//! The customer domain over HTTP: auth identities, customers, released events.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::auth::ApiAccess;
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, Params, PathText};
use crate::domain::store as domain;
use crate::domain::{AuthIdentity, Customer, OutboxEvent};

/// What creates an auth identity (in Medusa, the `emailpass` provider's registration).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewIdentity {
    /// The auth provider, e.g. `emailpass`.
    pub provider: String,
    /// The provider's id of the user (an email for `emailpass`).
    pub entity_id: String,
}

/// Creates an auth identity, unlinked (`app_metadata` empty).
#[utoipa::path(post, path = "/v1/auth-identities", tag = "customers",
    security(("bearer" = [])),
    request_body = NewIdentity,
    responses(
        (status = 201, body = AuthIdentity),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "An identity for that provider and entity exists", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn create_identity(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<(StatusCode, Json<AuthIdentity>), ApiError> {
    let new: NewIdentity = body.parse()?;
    let provider = new.provider.trim();
    let entity_id = new.entity_id.trim();
    if provider.is_empty() || provider.chars().count() > 100 {
        return Err(ApiError::invalid("provider", "must be 1 to 100 characters"));
    }
    if entity_id.is_empty() || entity_id.chars().count() > 255 {
        return Err(ApiError::invalid("entity_id", "must be 1 to 255 characters"));
    }
    let identity = domain::create_identity(&state.pool, provider, entity_id).await?;
    Ok((StatusCode::CREATED, Json(identity)))
}

/// An auth identity.
#[utoipa::path(get, path = "/v1/auth-identities/{id}", tag = "customers",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "`authid_...`")),
    responses((status = 200, body = AuthIdentity), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_identity(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
) -> Result<Json<AuthIdentity>, ApiError> {
    domain::identity(&state.pool, &id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound {
            what: "auth identity",
            id,
        })
}

/// Customers.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerList {
    /// Newest first.
    pub customers: Vec<Customer>,
}

/// Customers, newest first; `email` filters by email (case-insensitive).
#[utoipa::path(get, path = "/v1/customers", tag = "customers",
    security(("bearer" = [])),
    params(
        ("email" = Option<String>, Query, description = "Only customers with this email"),
        ("limit" = Option<u32>, Query, description = "1-200, default 50"),
    ),
    responses((status = 200, body = CustomerList), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn list_customers(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<Json<CustomerList>, ApiError> {
    let email = params.text("email", 320)?;
    let limit = params.integer("limit", 1, 200, 50)?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(CustomerList {
        customers: domain::customers(&mut conn, email.as_deref(), limit).await?,
    }))
}

/// A customer with its addresses.
#[utoipa::path(get, path = "/v1/customers/{id}", tag = "customers",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "`cus_...`")),
    responses((status = 200, body = Customer), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_customer(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(id): PathText,
) -> Result<Json<Customer>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    domain::customer(&mut conn, &id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound { what: "customer", id })
}

/// Released events.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutboxEventList {
    /// In release order; pass the last id as `after` to read on.
    pub events: Vec<OutboxEvent>,
}

/// Events of completed runs (e.g. `customer.created`), in release order. Events of runs that
/// were compensated or cancelled are never released.
#[utoipa::path(get, path = "/v1/events", tag = "customers",
    security(("bearer" = [])),
    params(
        ("after" = Option<String>, Query, description = "The last event id seen"),
        ("limit" = Option<u32>, Query, description = "1-500, default 100"),
    ),
    responses((status = 200, body = OutboxEventList), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn list_events(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<Json<OutboxEventList>, ApiError> {
    let after = params.text("after", 100)?;
    let limit = params.integer("limit", 1, 500, 100)?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(OutboxEventList {
        events: domain::released_events(&mut conn, after.as_deref(), limit).await?,
    }))
}

//! Workflows defined as data (docs/contract.md §8): store a definition (a new version when
//! its content changed), read a version, list versions with their unfinished runs, delete a
//! version no unfinished run uses. Reads take the API token, changes the admin token.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::auth::{AdminAccess, ApiAccess};
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, Params, PathPair, PathText};
use crate::defined::{DefinedError, StoredDefinition};

impl From<DefinedError> for ApiError {
    fn from(error: DefinedError) -> Self {
        match error {
            DefinedError::Refused(r) => ApiError::Invalid {
                field: r.field,
                message: r.message,
            },
            e @ DefinedError::BuiltIn(_) => ApiError::Conflict {
                code: "built_in_workflow",
                message: e.to_string(),
            },
            DefinedError::NotFound(id) => ApiError::NotFound {
                what: "workflow definition",
                id,
            },
            e @ DefinedError::InUse { .. } => ApiError::Conflict {
                code: "version_in_use",
                message: e.to_string(),
            },
            DefinedError::Engine(e) => e.into(),
            DefinedError::Database(e) => e.into(),
        }
    }
}

fn body_of(stored: &StoredDefinition) -> Result<Value, ApiError> {
    serde_json::to_value(stored).map_err(|e| ApiError::Internal(e.to_string()))
}

/// Stores a workflow definition. The same content as the newest version answers that
/// version (200); other content becomes the next version (201).
#[utoipa::path(put, path = "/v1/workflow-definitions/{name}", tag = "workflows",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The workflow's name: lowercase letters, digits and dashes")),
    request_body(content = Object, description = "The definition (docs/contract.md §8)"),
    responses(
        (status = 200, description = "Unchanged: the newest version", body = Object),
        (status = 201, description = "A new version", body = Object),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 409, description = "A built-in workflow has that name", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "A definition that cannot work (the field is named)", body = ErrorBody),
    ))]
pub async fn put_definition(
    _: AdminAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let put = state.definitions.put(&name, &body.0).await?;
    let status = if put.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(body_of(&put.stored)?)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!(
        "/v1/workflow-definitions/{}?version={}",
        put.stored.name, put.stored.version
    )) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// A stored definition: the newest version, or `?version=N`.
#[utoipa::path(get, path = "/v1/workflow-definitions/{name}", tag = "workflows",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The workflow's name"),
        ("version" = Option<i32>, Query, description = "A version (default: the newest)"),
    ),
    responses(
        (status = 200, body = Object),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "A version that is not a number", body = ErrorBody),
    ))]
pub async fn get_definition(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    let version = match params.text("version", 10)? {
        Some(text) => Some(parse_version("version", &text)?),
        None => None,
    };
    let stored = state.definitions.get(&name, version).await?;
    Ok(Json(body_of(&stored)?))
}

/// A version of a definition.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionBody {
    /// The version.
    pub version: i32,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// Its runs that are not finished (while any, it cannot be deleted).
    pub unfinished_runs: i64,
}

/// The versions of a definition.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionList {
    /// Newest first.
    pub versions: Vec<VersionBody>,
}

/// The versions of a definition, newest first, each with its count of unfinished runs.
#[utoipa::path(get, path = "/v1/workflow-definitions/{name}/versions", tag = "workflows",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The workflow's name")),
    responses(
        (status = 200, body = VersionList),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn list_versions(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    PathText(name): PathText,
) -> Result<Json<VersionList>, ApiError> {
    let versions = state.definitions.versions(&name).await?;
    Ok(Json(VersionList {
        versions: versions
            .into_iter()
            .map(|v| VersionBody {
                version: v.version,
                created_at: v.created_at,
                unfinished_runs: v.unfinished_runs,
            })
            .collect(),
    }))
}

/// `{name}` and `{version}` of a version's path.
pub struct VersionPath {
    name: String,
    version: i32,
}

impl FromRequestParts<Arc<AppState>> for VersionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let PathPair(name, version) = PathPair::from_request_parts(parts, state).await?;
        let version = version
            .parse::<i32>()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| ApiError::NotFound {
                what: "workflow definition",
                id: format!("{name}@{version}"),
            })?;
        Ok(Self { name, version })
    }
}

/// Deletes a version no unfinished run uses (409 while any does).
#[utoipa::path(delete, path = "/v1/workflow-definitions/{name}/versions/{version}", tag = "workflows",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The workflow's name"),
        ("version" = i32, Path, description = "The version"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The API token cannot do this", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Unfinished runs use the version", body = ErrorBody),
    ))]
pub async fn delete_version(
    _: AdminAccess,
    State(state): State<Arc<AppState>>,
    path: VersionPath,
) -> Result<StatusCode, ApiError> {
    state.definitions.delete(&path.name, path.version).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn parse_version(field: &str, text: &str) -> Result<i32, ApiError> {
    text.parse::<i32>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ApiError::invalid(field, "a version is a whole number from 1"))
}

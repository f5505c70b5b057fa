//! Reading requests: JSON bodies (400 when malformed, 413 when too large) and query
//! parameters (422 naming the parameter), never panicking and never passing on text the
//! database cannot store.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A request body parsed as JSON.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match OptionalJsonBody::from_request(req, state).await? {
            OptionalJsonBody(Some(value)) => Ok(Self(value)),
            OptionalJsonBody(None) => Err(ApiError::MalformedJson(
                "the request body is empty; send a JSON document".into(),
            )),
        }
    }
}

/// A request body parsed as JSON, or nothing when the body is empty (a heartbeat may name
/// its attempt in a header alone). Refused as [`JsonBody`] is otherwise.
pub struct OptionalJsonBody(pub Option<Value>);

impl<S: Send + Sync> FromRequest<S> for OptionalJsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: BODY_LIMIT }
            } else {
                ApiError::MalformedJson(rejection.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        reject_nul(&value, ".")?;
        Ok(Self(Some(value)))
    }
}

impl JsonBody {
    /// Deserializes the body as `T`; a mismatch is a 422 naming the field.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        crate::engine::definition::parse_input(&self.0).map_err(|e| ApiError::Invalid {
            field: e.field,
            message: e.message,
        })
    }
}

/// PostgreSQL text cannot hold U+0000: refuse it up front rather than fail at the database.
/// `path` is the JSON path of `value` (`.` for the whole document).
fn reject_nul(value: &Value, path: &str) -> Result<(), ApiError> {
    let bad = |at: &str| ApiError::invalid(at, "text must not contain the NUL character (U+0000)");
    let child = |key: &str| {
        if path == "." {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => Err(bad(path)),
        Value::Array(items) => {
            let base = if path == "." { "" } else { path };
            items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| reject_nul(item, &format!("{base}[{i}]")))
        }
        Value::Object(map) => map.iter().try_for_each(|(key, item)| {
            if key.contains('\0') {
                return Err(bad(path));
            }
            reject_nul(item, &child(key))
        }),
        _ => Ok(()),
    }
}

/// One path parameter as text. A parameter that is not valid UTF-8 once percent-decoded, or
/// that holds NUL (which PostgreSQL text cannot store), names nothing that can exist: a 404 in
/// the JSON error shape, never axum's plain-text 400 nor a database error.
pub struct PathText(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(text)) => Ok(Self(usable(text)?)),
            Err(_) => Err(unusable(parts.uri.path().to_string())),
        }
    }
}

/// Two path parameters as text, by the same rule as [`PathText`].
pub struct PathPair(pub String, pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathPair {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(String, String)>::from_request_parts(parts, state).await {
            Ok(Path((first, second))) => Ok(Self(usable(first)?, usable(second)?)),
            Err(_) => Err(unusable(parts.uri.path().to_string())),
        }
    }
}

/// Three path parameters as text, by the same rule as [`PathText`].
pub struct PathTriple(pub String, pub String, pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathTriple {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(String, String, String)>::from_request_parts(parts, state).await {
            Ok(Path((first, second, third))) => Ok(Self(usable(first)?, usable(second)?, usable(third)?)),
            Err(_) => Err(unusable(parts.uri.path().to_string())),
        }
    }
}

fn unusable(id: String) -> ApiError {
    ApiError::NotFound { what: "path", id }
}

fn usable(text: String) -> Result<String, ApiError> {
    if text.contains('\0') {
        return Err(unusable(text.replace('\0', "\\0")));
    }
    Ok(text)
}

/// Query parameters, read one by one with a 422 naming the bad one.
pub struct Params(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(map) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid("query", e.body_text()))?;
        for (key, value) in &map {
            if value.contains('\0') {
                return Err(ApiError::invalid(key.clone(), "must not contain the NUL character"));
            }
        }
        Ok(Self(map))
    }
}

impl Params {
    /// A text parameter, if present and non-empty; at most `max` characters.
    pub fn text(&self, name: &str, max: usize) -> Result<Option<String>, ApiError> {
        match self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) if v.chars().count() > max => {
                Err(ApiError::invalid(name, format!("must be at most {max} characters")))
            }
            Some(v) => Ok(Some(v.to_string())),
        }
    }

    /// An RFC 3339 time parameter, if present.
    pub fn timestamp(&self, name: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
        match self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| Some(t.with_timezone(&chrono::Utc)))
                .map_err(|_| ApiError::invalid(name, "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")),
        }
    }

    /// An integer parameter within `min..=max`, or `default` when absent.
    pub fn integer(&self, name: &str, min: i64, max: i64, default: i64) -> Result<i64, ApiError> {
        match self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            None => Ok(default),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| ApiError::invalid(name, format!("must be an integer from {min} to {max}"))),
        }
    }
}

/// The `Idempotency-Key` header, if sent. The engine holds the rule for keys; a header that
/// is not even text breaks it too.
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|value| {
            value
                .to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::from(crate::engine::EngineError::InvalidIdempotencyKey))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_characters_are_refused_with_their_path() {
        let field = |v: Value| match reject_nul(&v, ".") {
            Err(ApiError::Invalid { field, .. }) => Some(field),
            _ => None,
        };
        assert_eq!(field(json!({"a": {"b": ["ok", "x\u{0}"]}})), Some("a.b[1]".into()));
        assert_eq!(field(json!({"a": 1, "c": "\u{0}"})), Some("c".into()));
        assert_eq!(field(json!("\u{0}")), Some(".".into()));
        assert_eq!(field(json!({"a": ["fine"], "b": {"c": "fine"}})), None);
    }
}

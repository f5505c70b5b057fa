//! The dashboard's static files (`dashboard/static/`), embedded in the binary at build time
//! (debug builds too, so tests serve exactly what a release serves). No login needed: they
//! hold nothing secret and the login page uses them.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::Embed;

use super::error::PageError;
use crate::http::error::ApiError;
use crate::http::extract::PathText;

#[derive(Embed)]
#[folder = "dashboard/static/"]
struct Static;

fn content_type(file: &str) -> &'static str {
    match file.rsplit_once('.').map(|(_, ext)| ext) {
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

/// `GET /static/{file}`: the file, with an ETag so browsers revalidate cheaply.
pub async fn serve(path: Result<PathText, ApiError>, headers: HeaderMap) -> Result<Response, PageError> {
    let PathText(file) = path?;
    let asset = Static::get(&file).ok_or_else(|| ApiError::NotFound {
        what: "file",
        id: file.clone(),
    })?;
    let etag = format!(
        "\"{}\"",
        asset
            .metadata
            .sha256_hash()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let cache = (header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let etag_header = HeaderValue::from_str(&etag).map_err(|e| ApiError::Internal(e.to_string()))?;
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_header), cache]).into_response());
    }
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type(&file))),
            (header::ETAG, etag_header),
            cache,
        ],
        asset.data.into_owned(),
    )
        .into_response())
}

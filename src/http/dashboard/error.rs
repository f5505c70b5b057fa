//! Where the dashboard's errors become HTML responses. Statuses and messages come from
//! [`ApiError`] (so internals are logged, not shown, exactly as in the API); what the
//! dashboard adds is the login redirect, the CSRF refusal and the page around the message.

use askama::Template;
use askama_web::WebTemplate;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::engine::EngineError;
use crate::engine::scheduler::ScheduleError;
use crate::http::error::ApiError;

/// Why a dashboard request was not served.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// A page asked for without a session: the browser goes to the login form, which brings
    /// it back to `next` afterwards.
    #[error("login required")]
    LoginRequired {
        /// The path and query asked for.
        next: String,
    },
    /// An action or the live feed without a session: 401, no redirect (a form post cannot be
    /// replayed after a login anyway).
    #[error("you are not logged in, or your session expired; log in again")]
    Unauthenticated,
    /// A form without this session's CSRF token: 403, nothing done.
    #[error(
        "this form was not sent from this dashboard session (its security token is missing or stale); \
         nothing was done; reload the page and try again"
    )]
    BadCsrf,
    /// Anything the API would refuse: its status and (sanitized) message.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<EngineError> for PageError {
    fn from(error: EngineError) -> Self {
        Self::Api(error.into())
    }
}

impl From<ScheduleError> for PageError {
    fn from(error: ScheduleError) -> Self {
        Self::Api(error.into())
    }
}

impl From<sqlx::Error> for PageError {
    fn from(error: sqlx::Error) -> Self {
        Self::Api(error.into())
    }
}

impl PageError {
    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::LoginRequired { .. } => StatusCode::SEE_OTHER,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::BadCsrf => StatusCode::FORBIDDEN,
            Self::Api(e) => e.status(),
        }
    }
}

/// The error page.
#[derive(Template, WebTemplate)]
#[template(path = "error.html", config = "dashboard/askama.toml")]
pub struct ErrorPage {
    /// The status line, e.g. "404 Not Found".
    pub title: String,
    /// What went wrong, for people.
    pub message: String,
    /// Offer the login form (the session is missing or over).
    pub login_link: bool,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            Self::LoginRequired { next } => {
                let target = format!("/login?next={}", encode_query_value(next));
                return Redirect::to(&target).into_response();
            }
            Self::Api(e) => e.body().error.message,
            other => other.to_string(),
        };
        let page = ErrorPage {
            title: format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("Error")),
            message,
            login_link: status == StatusCode::UNAUTHORIZED,
        };
        let mut response = (status, page).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// Percent-encodes a query parameter value (everything but unreserved characters).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode_query_value("/runs/1?q=a b&c"), "/runs/1%3Fq%3Da%20b%26c");
        assert_eq!(encode_query_value("é"), "%C3%A9");
    }

    #[test]
    fn statuses_follow_the_error() {
        assert_eq!(PageError::Unauthenticated.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(PageError::BadCsrf.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            PageError::LoginRequired { next: "/".into() }.status(),
            StatusCode::SEE_OTHER
        );
        assert_eq!(
            PageError::from(ApiError::invalid("status", "bad")).status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}

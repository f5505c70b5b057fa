//! Logging in with the admin token, and out.

use std::sync::Arc;

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;

use super::error::PageError;
use super::session::{
    self, LOGIN_COOKIE, LOGIN_FORM_TTL, Operator, SESSION_COOKIE, SESSION_TTL, clear_cookie, set_cookie,
};
use super::{Dashboard, store};
use crate::http::auth::Role;
use crate::http::error::ApiError;
use crate::http::extract::Params;
use crate::http::serve::peer_of;
use crate::http::throttle::AuthKind;

/// The login form.
#[derive(Template, WebTemplate)]
#[template(path = "login.html", config = "dashboard/askama.toml")]
pub struct LoginPage {
    /// The form's CSRF token.
    pub csrf: String,
    /// Where to go after logging in.
    pub next: String,
    /// The operator name typed before (kept when the token was wrong).
    pub operator: String,
    /// Why the last attempt failed.
    pub error: Option<String>,
}

/// Where a login may send the browser: a path on this site, nothing else (no open redirect).
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.starts_with("/\\")
                && !path.chars().any(|c| c.is_control() || c == '\\')
                && path.len() <= 2000 =>
        {
            path.to_string()
        }
        _ => "/".to_string(),
    }
}

/// What a request to the login form tells about the browser (its session, if any, is only
/// looked up where it matters: [`form`]).
pub struct Browser {
    /// The login form's nonce cookie.
    pub login_nonce: Option<String>,
    /// Whether it came over HTTPS (so cookies get `Secure`).
    pub https: bool,
    /// Its address, for throttling failed logins (none without a socket).
    pub address: Option<std::net::IpAddr>,
}

impl FromRequestParts<Arc<Dashboard>> for Browser {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<Dashboard>) -> Result<Self, Self::Rejection> {
        Ok(Self {
            login_nonce: session::cookie(parts, LOGIN_COOKIE).map(str::to_string),
            https: session::is_https(parts),
            address: peer_of(&parts.extensions).map(|a| a.ip()),
        })
    }
}

/// The form with a fresh login nonce, with `status` (the form again after a refusal).
fn render_form(
    dashboard: &Dashboard,
    status: StatusCode,
    next: String,
    operator: String,
    error: Option<String>,
    https: bool,
) -> Response {
    let (nonce, csrf) = dashboard.keys.login_nonce(Utc::now());
    let page = LoginPage {
        csrf,
        next,
        operator,
        error,
    };
    let mut response = (status, page).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&set_cookie(LOGIN_COOKIE, &nonce, LOGIN_FORM_TTL, https)) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// `GET /login`: the form (or, already logged in, straight on).
pub async fn form(
    State(dashboard): State<Arc<Dashboard>>,
    browser: Browser,
    viewer: Result<session::Viewer, PageError>,
    params: Params,
) -> Response {
    let next = safe_next(params.text("next", 2000).ok().flatten().as_deref());
    if viewer.is_ok() {
        return Redirect::to(&next).into_response();
    }
    render_form(&dashboard, StatusCode::OK, next, String::new(), None, browser.https)
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// The admin token.
    pub token: Option<String>,
    /// Who is logging in (recorded on retry and cancel).
    pub operator: Option<String>,
    /// The form's CSRF token.
    pub csrf: Option<String>,
    /// Where to go afterwards.
    pub next: Option<String>,
}

/// `POST /login`: checks the token and starts a session.
pub async fn submit(
    State(dashboard): State<Arc<Dashboard>>,
    browser: Browser,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return PageError::from(ApiError::invalid("form", "expected the login form's fields")).into_response();
    };
    let next = safe_next(form.next.as_deref());
    let typed_operator = form.operator.clone().unwrap_or_default();
    let again = |status, message: &str| {
        render_form(
            &dashboard,
            status,
            next.clone(),
            super::format::clip(&typed_operator, session::MAX_OPERATOR_CHARS),
            Some(message.to_string()),
            browser.https,
        )
    };
    if let Some(address) = browser.address
        && let Err(retry_after_s) = dashboard.app.throttle.check(address, AuthKind::Login)
    {
        let mut page = again(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("Too many failed logins from your address. Try again in {retry_after_s} s."),
        );
        if let Ok(value) = HeaderValue::from_str(&retry_after_s.to_string()) {
            page.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return page;
    }
    let failed = || {
        if let Some(address) = browser.address {
            dashboard.app.throttle.failed(address, AuthKind::Login);
        }
    };
    let form_expires = match (&browser.login_nonce, &form.csrf) {
        (Some(nonce), Some(token)) => dashboard.keys.check_login(nonce, token, Utc::now()),
        _ => None,
    };
    let fresh = match (form_expires, &browser.login_nonce) {
        // Each form is good for one attempt: a second post of it (a replay, or guesses
        // sent with one form) is stale.
        (Some(expires), Some(nonce)) => match store::use_login_nonce(&dashboard.app.pool, nonce, expires).await {
            Ok(first_use) => first_use,
            Err(e) => return PageError::from(e).into_response(),
        },
        _ => false,
    };
    if !fresh {
        failed();
        return again(
            StatusCode::FORBIDDEN,
            "This login form was stale or not sent from this dashboard. Please try again.",
        );
    }
    let operator = match session::operator_name(form.operator.as_deref()) {
        Ok(name) => name,
        Err(why) => return again(StatusCode::UNPROCESSABLE_ENTITY, &format!("Operator name: {why}.")),
    };
    match dashboard
        .app
        .tokens
        .role_of(form.token.as_deref().unwrap_or_default().trim())
    {
        Some(Role::Admin) => {}
        Some(Role::Api) => {
            return again(
                StatusCode::FORBIDDEN,
                "That is the API token; the dashboard needs the admin token.",
            );
        }
        None => {
            failed();
            tracing::info!(address = ?browser.address, "dashboard login with a wrong token");
            return again(StatusCode::UNAUTHORIZED, "That is not the admin token.");
        }
    }
    let (session, cookie) = match session::start(&dashboard, &operator).await {
        Ok(started) => started,
        Err(e) => return PageError::from(e).into_response(),
    };
    tracing::info!(operator = %session.operator, "operator logged in to the dashboard");
    let mut response = Redirect::to(&next).into_response();
    let headers = response.headers_mut();
    for cookie in [
        set_cookie(SESSION_COOKIE, &cookie, SESSION_TTL, browser.https),
        clear_cookie(LOGIN_COOKIE),
    ] {
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            headers.append(header::SET_COOKIE, value);
        }
    }
    response
}

/// The logout form's field.
#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
}

/// `POST /logout`: ends this session, on the server: a copy of the cookie is worthless after.
pub async fn logout(
    State(dashboard): State<Arc<Dashboard>>,
    operator: Operator,
    form: Result<Form<LogoutForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    end_sessions(&dashboard, operator, form, false).await
}

/// `POST /logout-everywhere`: ends every session of the dashboard, on every instance (for a
/// lost laptop, or after a token leak, before the admin token is changed).
pub async fn logout_everywhere(
    State(dashboard): State<Arc<Dashboard>>,
    operator: Operator,
    form: Result<Form<LogoutForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    end_sessions(&dashboard, operator, form, true).await
}

/// Ends the operator's session, or with `everywhere` every session, once the form's CSRF
/// token is checked.
async fn end_sessions(
    dashboard: &Dashboard,
    operator: Operator,
    form: Result<Form<LogoutForm>, axum::extract::rejection::FormRejection>,
    everywhere: bool,
) -> Response {
    let token = form.ok().and_then(|Form(f)| f.csrf);
    if let Err(e) = operator.check_csrf(token.as_deref()) {
        return e.into_response();
    }
    let who = &operator.session.operator;
    let ended = if everywhere {
        store::close_all_sessions(&dashboard.app.pool).await.map(|closed| {
            tracing::warn!(operator = %who, closed, "every dashboard session was ended");
        })
    } else {
        store::close_session(&dashboard.app.pool, &operator.session.id)
            .await
            .map(|()| tracing::info!(operator = %who, "operator logged out of the dashboard"))
    };
    match ended {
        Ok(()) => logged_out(),
        Err(e) => PageError::from(e).into_response(),
    }
}

/// To the login form, the session cookie deleted.
fn logged_out() -> Response {
    let mut response = Redirect::to("/login").into_response();
    if let Ok(value) = HeaderValue::from_str(&clear_cookie(SESSION_COOKIE)) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed() {
        assert_eq!(safe_next(Some("/runs/abc?q=x")), "/runs/abc?q=x");
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/\\evil.example",
            "runs",
            "/a\nb",
            "",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/");
    }
}

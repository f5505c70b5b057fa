//! Operator sessions and CSRF tokens.
//!
//! A session lives on the server ([`super::store`]): the cookie holds only its random id,
//! signed, and every request looks the id up. Logging out deletes it, and "log out
//! everywhere" deletes every session, so a copied cookie stops working on every instance at
//! once. Sessions last [`SESSION_TTL`] at most, whatever a cookie says.
//!
//! Signatures are HMAC-SHA-256 under a key derived from a random secret stored in the
//! database, mixed with the admin token: nothing an unauthenticated visitor sees (the login
//! form's nonce and token) can be used to test guesses of the admin token offline, and
//! changing the admin token still ends every session.
//!
//! Every form carries a CSRF token: for a session, an HMAC of the session id; for the login
//! form (no session yet), an HMAC of a random nonce also set in a short-lived cookie (double
//! submit). A login form can be submitted once: its nonce is recorded as used. The cookies are
//! `SameSite=Strict` as well, so a cross-site request carries neither.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::COOKIE;
use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::Mac;

use super::Dashboard;
use super::error::PageError;
use super::store;
use crate::http::auth::{Tokens, hmac_sha256};
use crate::http::error::ApiError;

/// The session cookie.
pub const SESSION_COOKIE: &str = "sagaflow_session";
/// The login form's nonce cookie (double-submit CSRF before there is a session).
pub const LOGIN_COOKIE: &str = "sagaflow_login";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// How long a login form stays valid.
pub const LOGIN_FORM_TTL: Duration = Duration::from_secs(3600);
/// The operator recorded when the login form leaves the name empty (as the API's default).
pub const DEFAULT_OPERATOR: &str = "admin";
/// Longest operator name (the API's limit for `X-Sagaflow-Operator`).
pub const MAX_OPERATOR_CHARS: usize = 200;

/// Why a session cookie was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No session cookie.
    #[error("not logged in")]
    Missing,
    /// The cookie is not one this dashboard issues.
    #[error("malformed session cookie")]
    Malformed,
    /// The signature does not match (another secret or admin token, or a forged cookie).
    #[error("session cookie signature mismatch")]
    BadSignature,
    /// The session was logged out, or is over.
    #[error("session ended")]
    Ended,
    /// The sessions could not be read.
    #[error("the sessions could not be read: {0}")]
    Unavailable(String),
}

/// A logged-in operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Random: what the cookie carries and the server looks up, and what the CSRF token of
    /// the session's forms is derived from.
    pub id: String,
    /// Who is acting: recorded as `by` in the run log on retry and cancel.
    pub operator: String,
    /// When the session ends.
    pub expires_at: DateTime<Utc>,
}

/// The signing key: the dashboard's stored secret mixed with the admin token.
#[derive(Clone)]
pub struct Keys {
    key: [u8; 32],
}

impl Keys {
    /// The keys of a dashboard with this stored secret, served with these tokens.
    pub fn new(tokens: &Tokens, secret: &[u8; 32]) -> Self {
        Self {
            key: tokens.derive_key(secret, "sagaflow dashboard session v2"),
        }
    }

    fn mac(&self, purpose: &str, payload: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        let mut mac = hmac_sha256(&self.key);
        // The purpose is separated from the payload so a signature for one use is never valid
        // for another.
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(payload);
        mac
    }

    fn sign(&self, purpose: &str, payload: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(purpose, payload).finalize().into_bytes())
    }

    fn verify(&self, purpose: &str, payload: &[u8], signature: &str) -> bool {
        match URL_SAFE_NO_PAD.decode(signature) {
            // Constant time.
            Ok(bytes) => self.mac(purpose, payload).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    /// The cookie value carrying a session's id.
    pub fn seal(&self, id: &str) -> String {
        format!("{id}.{}", self.sign("session", id.as_bytes()))
    }

    /// The session id a cookie value carries, if this dashboard signed it. Whether that
    /// session is still open is the store's to say.
    pub fn unseal<'a>(&self, cookie: &'a str) -> Result<&'a str, SessionError> {
        let (id, signature) = cookie.split_once('.').ok_or(SessionError::Malformed)?;
        if id.is_empty() || id.len() > 64 {
            return Err(SessionError::Malformed);
        }
        if !self.verify("session", id.as_bytes(), signature) {
            return Err(SessionError::BadSignature);
        }
        Ok(id)
    }

    /// The CSRF token every form of this session carries.
    pub fn csrf_token(&self, session: &Session) -> String {
        self.sign("csrf", session.id.as_bytes())
    }

    /// Whether a form's CSRF token belongs to this session (constant time).
    pub fn check_csrf(&self, session: &Session, token: &str) -> bool {
        self.verify("csrf", session.id.as_bytes(), token)
    }

    /// A fresh login nonce (for the login cookie) and the CSRF token of its form.
    pub fn login_nonce(&self, now: DateTime<Utc>) -> (String, String) {
        let nonce = format!("{}.{}", now.timestamp() + LOGIN_FORM_TTL.as_secs() as i64, random_id());
        let token = self.sign("login", nonce.as_bytes());
        (nonce, token)
    }

    /// When a login form expires, if its token matches the nonce cookie and it is still
    /// fresh at `now`. Whether it was already submitted is the store's to say.
    pub fn check_login(&self, nonce: &str, token: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let expires = nonce
            .split_once('.')
            .and_then(|(expires, _)| expires.parse::<i64>().ok())
            .and_then(|expires| DateTime::from_timestamp(expires, 0))
            .filter(|expires| *expires > now);
        // Both checks always run.
        let genuine = self.verify("login", nonce.as_bytes(), token);
        expires.filter(|_| genuine)
    }
}

/// Starts a session for `operator` on the server; returns it and its cookie value.
pub async fn start(dashboard: &Dashboard, operator: &str) -> Result<(Session, String), sqlx::Error> {
    let session = Session {
        id: random_id(),
        operator: operator.to_string(),
        expires_at: Utc::now() + chrono::Duration::from_std(SESSION_TTL).unwrap_or(chrono::Duration::hours(8)),
    };
    store::open_session(&dashboard.app.pool, &session.id, &session.operator, session.expires_at).await?;
    let cookie = dashboard.keys.seal(&session.id);
    Ok((session, cookie))
}

/// The open session a request's cookie names.
pub async fn session_of(parts: &Parts, dashboard: &Dashboard) -> Result<Session, SessionError> {
    let value = cookie(parts, SESSION_COOKIE).ok_or(SessionError::Missing)?;
    let id = dashboard.keys.unseal(value)?;
    match store::session(&dashboard.app.pool, id).await {
        Ok(Some((operator, expires_at))) => Ok(Session {
            id: id.to_string(),
            operator,
            expires_at,
        }),
        Ok(None) => Err(SessionError::Ended),
        Err(e) => Err(SessionError::Unavailable(e.to_string())),
    }
}

fn random_id() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

/// An operator name from the login form: trimmed, empty means [`DEFAULT_OPERATOR`]; at most
/// [`MAX_OPERATOR_CHARS`] printable characters (the API's rule for `X-Sagaflow-Operator`).
pub fn operator_name(raw: Option<&str>) -> Result<String, &'static str> {
    let name = raw.map(str::trim).unwrap_or_default();
    if name.is_empty() {
        return Ok(DEFAULT_OPERATOR.to_string());
    }
    if name.chars().count() > MAX_OPERATOR_CHARS || name.chars().any(char::is_control) {
        return Err("must be at most 200 printable characters");
    }
    Ok(name.to_string())
}

/// The value of a cookie in a request.
pub fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, for the whole site; `Secure` when the
/// request came over HTTPS (a proxy says so with `X-Forwarded-Proto`).
pub fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// A `Set-Cookie` value deleting a cookie.
pub fn clear_cookie(name: &str) -> String {
    format!("{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")
}

/// Whether the request came over HTTPS, as far as a proxy in front tells.
pub fn is_https(parts: &Parts) -> bool {
    parts
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
        || parts.uri.scheme_str() == Some("https")
}

/// A logged-in operator viewing a page; without a session, the browser is sent to the login
/// form, which brings it back here.
pub struct Viewer {
    /// The session.
    pub session: Session,
    /// The CSRF token for the page's forms.
    pub csrf: String,
}

impl FromRequestParts<Arc<Dashboard>> for Viewer {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, dashboard: &Arc<Dashboard>) -> Result<Self, PageError> {
        match session_of(parts, dashboard).await {
            Ok(session) => Ok(Self {
                csrf: dashboard.keys.csrf_token(&session),
                session,
            }),
            Err(SessionError::Unavailable(e)) => {
                tracing::warn!(error = %e, "reading the dashboard's sessions failed");
                Err(PageError::Api(ApiError::Unavailable))
            }
            Err(_) => Err(PageError::LoginRequired {
                next: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into()),
            }),
        }
    }
}

/// A logged-in operator acting (a form post) or listening (live updates): no redirect, a 401
/// without a session. Forms check the CSRF token with [`Operator::check_csrf`].
pub struct Operator {
    /// The session.
    pub session: Session,
    keys: Keys,
}

impl Operator {
    /// The CSRF token of this session, for the forms of a page rendered in answer to a post.
    pub fn csrf(&self) -> String {
        self.keys.csrf_token(&self.session)
    }

    /// Refuses a form whose CSRF token is not this session's.
    pub fn check_csrf(&self, token: Option<&str>) -> Result<(), PageError> {
        match token {
            Some(token) if self.keys.check_csrf(&self.session, token) => Ok(()),
            _ => Err(PageError::BadCsrf),
        }
    }
}

impl FromRequestParts<Arc<Dashboard>> for Operator {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, dashboard: &Arc<Dashboard>) -> Result<Self, PageError> {
        let session = session_of(parts, dashboard).await.map_err(|e| match e {
            SessionError::Unavailable(e) => {
                tracing::warn!(error = %e, "reading the dashboard's sessions failed");
                PageError::Api(ApiError::Unavailable)
            }
            _ => PageError::Unauthenticated,
        })?;
        Ok(Self {
            session,
            keys: dashboard.keys.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(admin: &str, secret: u8) -> Keys {
        Keys::new(&Tokens::new("api", admin), &[secret; 32])
    }

    #[test]
    fn cookies_carry_a_signed_id_and_follow_the_secret_and_the_token() {
        let keys = keys_of("admin", 1);
        let cookie = keys.seal("abc");
        assert_eq!(keys.unseal(&cookie), Ok("abc"));
        // Another admin token, or another stored secret: every cookie is refused.
        assert_eq!(keys_of("admin2", 1).unseal(&cookie), Err(SessionError::BadSignature));
        assert_eq!(keys_of("admin", 2).unseal(&cookie), Err(SessionError::BadSignature));
    }

    #[test]
    fn tampered_cookies_are_refused() {
        let keys = keys_of("admin", 1);
        let cookie = keys.seal("abc");
        let (_, signature) = cookie.split_once('.').expect("two parts");
        assert_eq!(
            keys.unseal(&format!("abd.{signature}")),
            Err(SessionError::BadSignature)
        );
        assert_eq!(keys.unseal("abc"), Err(SessionError::Malformed));
        assert_eq!(keys.unseal(""), Err(SessionError::Malformed));
        assert_eq!(keys.unseal(&format!(".{signature}")), Err(SessionError::Malformed));
        assert_eq!(keys.unseal("abc.!!"), Err(SessionError::BadSignature));
        // Signed, but not as a session (a CSRF token's signature is for another purpose).
        let session = Session {
            id: "abc".into(),
            operator: "ops".into(),
            expires_at: Utc::now(),
        };
        let csrf = keys.csrf_token(&session);
        assert_eq!(keys.unseal(&format!("abc.{csrf}")), Err(SessionError::BadSignature));
    }

    #[test]
    fn csrf_tokens_belong_to_one_session() {
        let keys = keys_of("admin", 1);
        let session = |id: &str| Session {
            id: id.into(),
            operator: "ops".into(),
            expires_at: Utc::now(),
        };
        let (a, b) = (session("a"), session("b"));
        let token = keys.csrf_token(&a);
        assert!(keys.check_csrf(&a, &token));
        assert!(!keys.check_csrf(&b, &token));
        assert!(!keys.check_csrf(&a, ""));
        assert!(!keys.check_csrf(&a, "not base64 !"));
    }

    #[test]
    fn login_forms_need_their_cookie_and_expire() {
        let keys = keys_of("admin", 1);
        let now = Utc::now();
        let (nonce, token) = keys.login_nonce(now);
        assert!(keys.check_login(&nonce, &token, now).is_some_and(|at| at > now));
        assert_eq!(keys.check_login(&nonce, &token, now + chrono::Duration::hours(2)), None);
        let (other, _) = keys.login_nonce(now);
        assert_eq!(keys.check_login(&other, &token, now), None);
        assert_eq!(keys.check_login("garbage", &token, now), None);
        // A form from a dashboard with another secret is not this one's.
        assert_eq!(keys_of("admin", 2).check_login(&nonce, &token, now), None);
    }

    #[test]
    fn operator_names_default_and_are_bounded() {
        assert_eq!(operator_name(None).as_deref(), Ok("admin"));
        assert_eq!(operator_name(Some("  ")).as_deref(), Ok("admin"));
        assert_eq!(operator_name(Some(" grace ")).as_deref(), Ok("grace"));
        assert!(operator_name(Some(&"x".repeat(201))).is_err());
        assert!(operator_name(Some("a\nb")).is_err());
    }
}

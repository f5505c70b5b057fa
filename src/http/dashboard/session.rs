//! Operator sessions and CSRF tokens, without server-side state.
//!
//! A session is a cookie holding its expiry, a random id and the operator's name, signed with
//! HMAC-SHA-256 under a key derived from the admin token. Any instance configured with the
//! same admin token accepts it (several instances may serve one database), and changing the
//! admin token ends every session at once. Logging out deletes the cookie in the browser; a
//! copy taken before stays valid until it expires ([`SESSION_TTL`]), which is why the
//! lifetime is a working day rather than weeks.
//!
//! Every form carries a CSRF token: for a session, an HMAC of the session id; for the login
//! form (no session yet), an HMAC of a random nonce also set in a short-lived cookie
//! (double submit). The cookies are `SameSite=Strict` as well, so a cross-site request
//! carries neither.

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
use crate::http::auth::{Tokens, hmac_sha256};

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
    /// The signature does not match (another admin token, or a forged cookie).
    #[error("session cookie signature mismatch")]
    BadSignature,
    /// The session is over.
    #[error("session expired")]
    Expired,
}

/// A logged-in operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Random, so that each login has its own CSRF token.
    pub id: String,
    /// Who is acting: recorded as `by` in the run log on retry and cancel.
    pub operator: String,
    /// When the session ends (Unix seconds).
    pub expires_at: i64,
}

/// The signing key, derived from the admin token.
#[derive(Clone)]
pub struct Keys {
    key: [u8; 32],
}

impl Keys {
    /// The keys of a dashboard served with these tokens.
    pub fn new(tokens: &Tokens) -> Self {
        Self {
            key: tokens.derive_key("sagaflow dashboard session v1"),
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

    /// A new session for `operator`, starting `now`.
    pub fn issue(&self, operator: &str, now: DateTime<Utc>) -> Session {
        Session {
            id: random_id(),
            operator: operator.to_string(),
            expires_at: now.timestamp() + SESSION_TTL.as_secs() as i64,
        }
    }

    /// The cookie value carrying a session.
    pub fn seal(&self, session: &Session) -> String {
        let payload = format!("{}|{}|{}", session.expires_at, session.id, session.operator);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            self.sign("session", payload.as_bytes())
        )
    }

    /// The session a cookie value carries, if it is genuine and not expired at `now`.
    pub fn open(&self, cookie: &str, now: DateTime<Utc>) -> Result<Session, SessionError> {
        let (payload, signature) = cookie.split_once('.').ok_or(SessionError::Malformed)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| SessionError::Malformed)?;
        if !self.verify("session", &payload, signature) {
            return Err(SessionError::BadSignature);
        }
        let payload = String::from_utf8(payload).map_err(|_| SessionError::Malformed)?;
        let mut parts = payload.splitn(3, '|');
        let (Some(expires), Some(id), Some(operator)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SessionError::Malformed);
        };
        let expires_at: i64 = expires.parse().map_err(|_| SessionError::Malformed)?;
        if expires_at <= now.timestamp() {
            return Err(SessionError::Expired);
        }
        Ok(Session {
            id: id.to_string(),
            operator: operator.to_string(),
            expires_at,
        })
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

    /// Whether a login form's token matches the nonce cookie and the form is still fresh.
    pub fn check_login(&self, nonce: &str, token: &str, now: DateTime<Utc>) -> bool {
        let fresh = nonce
            .split_once('.')
            .and_then(|(expires, _)| expires.parse::<i64>().ok())
            .is_some_and(|expires| expires > now.timestamp());
        // Both checks always run.
        let genuine = self.verify("login", nonce.as_bytes(), token);
        fresh && genuine
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

/// The session of a request, if any.
fn session_of(parts: &Parts, dashboard: &Dashboard) -> Result<Session, SessionError> {
    let value = cookie(parts, SESSION_COOKIE).ok_or(SessionError::Missing)?;
    dashboard.keys.open(value, Utc::now())
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
        match session_of(parts, dashboard) {
            Ok(session) => Ok(Self {
                csrf: dashboard.keys.csrf_token(&session),
                session,
            }),
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
        let session = session_of(parts, dashboard).map_err(|_| PageError::Unauthenticated)?;
        Ok(Self {
            session,
            keys: dashboard.keys.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(admin: &str) -> Keys {
        Keys::new(&Tokens::new("api", admin))
    }

    #[test]
    fn sessions_round_trip_and_expire() {
        let keys = keys_of("admin");
        let now = Utc::now();
        let session = keys.issue("grace|hopper", now);
        let cookie = keys.seal(&session);
        assert_eq!(keys.open(&cookie, now), Ok(session.clone()));
        assert_eq!(
            keys.open(&cookie, now + chrono::Duration::hours(9)),
            Err(SessionError::Expired)
        );
        // Another admin token: every session ends.
        assert_eq!(keys_of("admin2").open(&cookie, now), Err(SessionError::BadSignature));
    }

    #[test]
    fn tampered_cookies_are_refused() {
        let keys = keys_of("admin");
        let now = Utc::now();
        let cookie = keys.seal(&keys.issue("ops", now));
        let (payload, signature) = cookie.split_once('.').expect("two parts");
        // A longer expiry with the old signature.
        let forged = URL_SAFE_NO_PAD.encode(format!("{}|x|ops", now.timestamp() + 999_999));
        assert_eq!(
            keys.open(&format!("{forged}.{signature}"), now),
            Err(SessionError::BadSignature)
        );
        assert_eq!(keys.open(payload, now), Err(SessionError::Malformed));
        assert_eq!(keys.open("", now), Err(SessionError::Malformed));
        assert_eq!(
            keys.open(&format!("{payload}.!!"), now),
            Err(SessionError::BadSignature)
        );
        // Signed, but not a session (the signature of a CSRF token is for another purpose).
        let session = keys.open(&cookie, now).expect("genuine");
        let csrf = keys.csrf_token(&session);
        let as_session = format!("{}.{csrf}", URL_SAFE_NO_PAD.encode(&session.id));
        assert_eq!(keys.open(&as_session, now), Err(SessionError::BadSignature));
    }

    #[test]
    fn csrf_tokens_belong_to_one_session() {
        let keys = keys_of("admin");
        let now = Utc::now();
        let (a, b) = (keys.issue("ops", now), keys.issue("ops", now));
        let token = keys.csrf_token(&a);
        assert!(keys.check_csrf(&a, &token));
        assert!(!keys.check_csrf(&b, &token));
        assert!(!keys.check_csrf(&a, ""));
        assert!(!keys.check_csrf(&a, "not base64 !"));
    }

    #[test]
    fn login_forms_need_their_cookie_and_expire() {
        let keys = keys_of("admin");
        let now = Utc::now();
        let (nonce, token) = keys.login_nonce(now);
        assert!(keys.check_login(&nonce, &token, now));
        assert!(!keys.check_login(&nonce, &token, now + chrono::Duration::hours(2)));
        let (other, _) = keys.login_nonce(now);
        assert!(!keys.check_login(&other, &token, now));
        assert!(!keys.check_login("garbage", &token, now));
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

//! Bearer tokens: the API token lets backends trigger and read; the admin token also allows
//! operator actions. Tokens are compared in constant time (as SHA-256 digests, so not even
//! their length leaks).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use super::serve::peer_of;
use super::throttle::AuthKind;

/// The header naming the operator behind an admin request (recorded in the run's log).
pub const OPERATOR_HEADER: &str = "x-sagaflow-operator";

/// The two tokens, kept as digests.
#[derive(Clone)]
pub struct Tokens {
    api: [u8; 32],
    admin: [u8; 32],
}

/// What a presented token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Trigger and read.
    Api,
    /// Everything, operator actions included.
    Admin,
}

/// The fewest characters a configured token may have: 32 hex digits are 128 bits, the least
/// that makes guessing hopeless (`openssl rand -hex 32` gives 64).
pub const MIN_TOKEN_CHARS: usize = 32;

/// Why configured tokens were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Too short to resist guessing.
    #[error(
        "{setting} is {chars} characters; use at least {MIN_TOKEN_CHARS} random ones (e.g. `openssl rand -hex 32`), \
         or leave it unset to have one generated"
    )]
    TooShort {
        /// The setting.
        setting: &'static str,
        /// Its length.
        chars: usize,
    },
    /// White space or control characters cannot be sent reliably in a header.
    #[error("{setting} must be printable ASCII without spaces")]
    NotPrintable {
        /// The setting.
        setting: &'static str,
    },
    /// One token for both roles would give every backend the operator's powers.
    #[error("SAGAFLOW_API_TOKEN and SAGAFLOW_ADMIN_TOKEN must differ")]
    Same,
}

impl Tokens {
    /// Checks configured tokens: each at least [`MIN_TOKEN_CHARS`] printable ASCII characters,
    /// and the two different.
    pub fn configured(api: &str, admin: &str) -> Result<Self, TokenError> {
        for (setting, token) in [("SAGAFLOW_API_TOKEN", api), ("SAGAFLOW_ADMIN_TOKEN", admin)] {
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenError::NotPrintable { setting });
            }
            if token.len() < MIN_TOKEN_CHARS {
                return Err(TokenError::TooShort {
                    setting,
                    chars: token.len(),
                });
            }
        }
        if api == admin {
            return Err(TokenError::Same);
        }
        Ok(Self::new(api, admin))
    }

    /// Tokens from their clear text, unchecked (see [`Tokens::configured`]).
    pub fn new(api: &str, admin: &str) -> Self {
        Self {
            api: digest(api),
            admin: digest(admin),
        }
    }

    /// The role a token grants, if any.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let presented = digest(token);
        // Both comparisons always run.
        let is_admin: bool = presented.ct_eq(&self.admin).into();
        let is_api: bool = presented.ct_eq(&self.api).into();
        if is_admin {
            Some(Role::Admin)
        } else if is_api {
            Some(Role::Api)
        } else {
            None
        }
    }
}

impl Tokens {
    /// A key for `purpose`: HMAC-SHA-256 keyed by a random `secret` over the admin token's
    /// digest and the purpose. Every instance sharing the secret and the admin token derives
    /// the same key; changing either invalidates everything signed; and without the secret,
    /// something signed with the key tells nothing about the admin token.
    pub fn derive_key(&self, secret: &[u8; 32], purpose: &str) -> [u8; 32] {
        let mut mac = hmac_sha256(secret);
        hmac::Mac::update(&mut mac, &self.admin);
        hmac::Mac::update(&mut mac, purpose.as_bytes());
        hmac::Mac::finalize(mac).into_bytes().into()
    }
}

/// HMAC-SHA-256 keyed by a 256-bit key. HMAC zero-pads keys shorter than the hash's 64-byte
/// block, so padding here gives the standard result with a key of the exact type, not a
/// length checked at run time.
pub(crate) fn hmac_sha256(key: &[u8; 32]) -> hmac::Hmac<Sha256> {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    <hmac::Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into())
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// A fresh random token (256 bits, hex).
pub fn generate_token() -> String {
    use std::fmt::Write;
    rand::random::<[u8; 32]>()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A caller with the API or the admin token.
#[derive(Debug, Clone, Copy)]
pub struct ApiAccess(pub Role);

impl FromRequestParts<Arc<AppState>> for ApiAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let address = peer_of(&parts.extensions).map(|a| a.ip());
        if let Some(address) = address {
            state
                .throttle
                .check(address, AuthKind::Bearer)
                .map_err(|retry_after_s| ApiError::Throttled { retry_after_s })?;
        }
        // No token at all is not a guess: only wrong tokens count against the address.
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        match state.tokens.role_of(token) {
            Some(role) => Ok(ApiAccess(role)),
            None => {
                if let Some(address) = address {
                    state.throttle.failed(address, AuthKind::Bearer);
                }
                Err(ApiError::Unauthorized)
            }
        }
    }
}

/// A caller with the admin token, and who they say they are.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    /// The operator, from `X-Sagaflow-Operator` (default `admin`).
    pub operator: String,
}

impl FromRequestParts<Arc<AppState>> for AdminAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let ApiAccess(role) = ApiAccess::from_request_parts(parts, state).await?;
        if role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        let operator = match parts.headers.get(OPERATOR_HEADER) {
            None => "admin".to_string(),
            Some(value) => {
                let name = value
                    .to_str()
                    .ok()
                    .map(str::trim)
                    .filter(|n| !n.is_empty() && n.chars().count() <= 200 && !n.chars().any(char::is_control))
                    .ok_or_else(|| ApiError::invalid("X-Sagaflow-Operator", "must be 1 to 200 printable characters"))?;
                name.to_string()
            }
        };
        Ok(Self { operator })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_token() {
        let tokens = Tokens::new("api-token", "admin-token");
        assert_eq!(tokens.role_of("api-token"), Some(Role::Api));
        assert_eq!(tokens.role_of("admin-token"), Some(Role::Admin));
        assert_eq!(tokens.role_of("api-token "), None);
        assert_eq!(tokens.role_of(""), None);
    }

    #[test]
    fn derived_keys_follow_the_secret_the_admin_token_and_the_purpose() {
        use hmac::Mac;
        let secret = [7u8; 32];
        let tokens = Tokens::new("api-token", "admin-token");
        let key = tokens.derive_key(&secret, "sessions");
        assert_eq!(
            key,
            Tokens::new("other-api", "admin-token").derive_key(&secret, "sessions")
        );
        assert_ne!(
            key,
            Tokens::new("api-token", "admin-token2").derive_key(&secret, "sessions")
        );
        assert_ne!(key, tokens.derive_key(&[8u8; 32], "sessions"));
        assert_ne!(key, tokens.derive_key(&secret, "other purpose"));
        // The padded key gives standard HMAC (the same as keying with the 32 bytes).
        let mut standard = <hmac::Hmac<Sha256> as Mac>::new_from_slice(&secret).expect("any length");
        standard.update(&digest("admin-token"));
        standard.update(b"sessions");
        assert_eq!(key, <[u8; 32]>::from(standard.finalize().into_bytes()));
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let (a, b) = (generate_token(), generate_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(Tokens::configured(&a, &b).is_ok());
    }

    #[test]
    fn weak_configured_tokens_are_refused() {
        let strong = "0123456789abcdef0123456789abcdef";
        let other = "fedcba9876543210fedcba9876543210";
        assert!(Tokens::configured(strong, other).is_ok());
        assert_eq!(
            Tokens::configured("dev-api", other).err(),
            Some(TokenError::TooShort {
                setting: "SAGAFLOW_API_TOKEN",
                chars: 7
            })
        );
        assert!(matches!(
            Tokens::configured(strong, "dev-admin"),
            Err(TokenError::TooShort {
                setting: "SAGAFLOW_ADMIN_TOKEN",
                ..
            })
        ));
        assert_eq!(
            Tokens::configured(strong, &format!("{other} x")).err(),
            Some(TokenError::NotPrintable {
                setting: "SAGAFLOW_ADMIN_TOKEN"
            })
        );
        assert_eq!(Tokens::configured(strong, strong).err(), Some(TokenError::Same));
    }
}

//! Standard Webhooks signatures (<https://www.standardwebhooks.com>), the one scheme
//! sagaflow signs with: the HTTP steps of defined workflows (§8) and outbound webhooks (§10).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key of a Standard Webhooks secret (`whsec_` and the base64 of at least 16 bytes; the
/// prefix may be left out), or `None` when it is not one.
pub fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .filter(|key| key.len() >= 16)
}

/// A Standard Webhooks signature: `v1,` and the base64 of HMAC-SHA256 over
/// `{id}.{timestamp}.{body}`.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Option<String> {
    // HMAC takes keys of any length: this fails only if that stops being true.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Some(format!("v1,{signature}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_v1_and_base64_of_32_bytes() {
        let signature = sign(b"0123456789abcdef", "id", "1700000000", b"{}").expect("signed");
        let encoded = signature.strip_prefix("v1,").expect("v1");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map(|d| d.len())
                .ok(),
            Some(32)
        );
    }

    #[test]
    fn a_secret_is_whsec_and_the_base64_of_at_least_16_bytes() {
        let key = decode_secret("whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").expect("a secret");
        assert_eq!(key, b"0123456789abcdef0123456789abcdef");
        assert!(
            decode_secret("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").is_some(),
            "the prefix is optional"
        );
        assert!(decode_secret("whsec_c2hvcnQ=").is_none(), "too short");
        assert!(decode_secret("whsec_!!!").is_none(), "not base64");
    }
}

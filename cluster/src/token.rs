//! Join tokens: what an operator copies from one server to another.
//!
//! A token is `keel-join-v1.` followed by base64url (no padding) of a JSON document with the
//! token id, the one-time secret, the SHA-256 fingerprint of the cluster CA certificate, the
//! API addresses to reach and the expiry. The joining node pins the CA by that fingerprint
//! before it sends anything, so a token cannot be redirected to a rogue server. Only the
//! SHA-256 of the secret is ever stored or replicated.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "keel-join-v1.";

/// The decoded content of a join token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenBody {
    pub id: String,
    pub secret: String,
    /// SHA-256 of the cluster CA certificate (DER), lowercase hex.
    pub ca_fingerprint: String,
    /// `host:port` HTTPS API addresses of current members.
    pub addrs: Vec<String>,
    pub expires_at_ms: u64,
}

impl std::fmt::Debug for JoinTokenBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenBody")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("addrs", &self.addrs)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenParseError {
    #[error("this is not a Keel join token: it must start with {PREFIX:?} (copy the whole line printed by `keel cluster token create`)")]
    Prefix,
    #[error("the join token is damaged: its text is not valid base64url (was it cut or wrapped?)")]
    Encoding,
    #[error("the join token is damaged: {detail}")]
    Content { detail: String },
}

impl JoinTokenBody {
    /// Creates a token with a fresh id and secret.
    pub fn generate(ca_fingerprint: String, addrs: Vec<String>, expires_at_ms: u64) -> Self {
        Self {
            id: random_hex(8),
            secret: random_hex(32),
            ca_fingerprint,
            addrs,
            expires_at_ms,
        }
    }

    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn decode(text: &str) -> Result<Self, TokenParseError> {
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenParseError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(rest)
            .map_err(|_| TokenParseError::Encoding)?;
        let body: Self = serde_json::from_slice(&json).map_err(|e| TokenParseError::Content {
            detail: e.to_string(),
        })?;
        let content = |detail: &str| TokenParseError::Content {
            detail: detail.to_string(),
        };
        if body.id.is_empty() || body.secret.len() < 32 {
            return Err(content("the id or secret is missing or too short"));
        }
        if body.ca_fingerprint.len() != 64 || hex::decode(&body.ca_fingerprint).is_err() {
            return Err(content("the CA fingerprint is not a SHA-256 in hex"));
        }
        if body.addrs.is_empty() {
            return Err(content("it names no address to reach the cluster"));
        }
        Ok(body)
    }

    pub fn secret_sha256(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Compares two hex digests in constant time.
pub fn digests_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> JoinTokenBody {
        JoinTokenBody::generate("ab".repeat(32), vec!["10.0.0.1:8443".into()], 42)
    }

    #[test]
    fn round_trips() {
        let b = body();
        assert_eq!(JoinTokenBody::decode(&b.encode()), Ok(b));
    }

    #[test]
    fn garbage_gets_a_clear_error() {
        assert_eq!(JoinTokenBody::decode("hello"), Err(TokenParseError::Prefix));
        assert_eq!(
            JoinTokenBody::decode("keel-join-v1.%%%"),
            Err(TokenParseError::Encoding)
        );
        let truncated = &body().encode()[..40];
        assert!(matches!(
            JoinTokenBody::decode(truncated),
            Err(TokenParseError::Content { .. } | TokenParseError::Encoding)
        ));
    }

    #[test]
    fn debug_hides_the_secret() {
        let b = body();
        assert!(!format!("{b:?}").contains(&b.secret));
    }

    #[test]
    fn digest_compare() {
        assert!(digests_equal("abc", "abc"));
        assert!(!digests_equal("abc", "abd"));
        assert!(!digests_equal("abc", "ab"));
    }
}

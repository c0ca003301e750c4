//! Access control of the admin API: an optional bearer token and the exposure rule.
//!
//! - When a token is configured, every route except the health checks (`/api/healthcheck`,
//!   `/healthcheck`) needs `Authorization: Bearer <token>`; anything else gets 401 with a JSON
//!   body and `WWW-Authenticate: Bearer realm="kvtier"`. Unknown paths need the token too, so an
//!   anonymous caller cannot probe which routes exist.
//! - The comparison is constant-time: both the configured and the presented token are hashed
//!   (BLAKE3) and the two 32-byte digests compared with `subtle`, so neither the content nor the
//!   length of the secret leaks through timing.
//! - [`AuthToken`] never reveals the secret through `Debug` or `Serialize` (the latter is what
//!   `GET /config` shows), so logging or dumping a configuration is safe.
//! - Exposure rule ([`HttpConfig::check_exposure`](super::HttpConfig::check_exposure)): binding a
//!   non-loopback address without a token is refused unless explicitly allowed.

use std::net::IpAddr;

use serde::{Serialize, Serializer};
use subtle::ConstantTimeEq;

/// The placeholder shown wherever a secret would be printed.
pub const REDACTED: &str = "<redacted>";

/// Why an HTTP setting is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpConfigError {
    /// The token is empty or has characters an HTTP header cannot carry.
    #[error(
        "the HTTP auth token must be non-empty visible ASCII without spaces (it is sent as \
         `Authorization: Bearer <token>`): {0}"
    )]
    InvalidToken(&'static str),
    /// A non-loopback bind without a token.
    #[error(
        "refusing to serve the HTTP admin API on non-loopback address {host:?} without a token: \
         set --http-auth-token (or KVTIER_HTTP_TOKEN), bind --http-host 127.0.0.1, or pass \
         --http-insecure to expose it unauthenticated"
    )]
    InsecureBind {
        /// The address asked for.
        host: String,
    },
}

/// A bearer token. Compared in constant time; never printed.
#[derive(Clone)]
pub struct AuthToken {
    secret: String,
    digest: [u8; 32],
}

impl AuthToken {
    /// Validates and wraps a token: non-empty, printable ASCII, no whitespace.
    pub fn new(secret: impl Into<String>) -> Result<Self, HttpConfigError> {
        let secret = secret.into();
        if secret.is_empty() {
            return Err(HttpConfigError::InvalidToken("it is empty"));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(HttpConfigError::InvalidToken(
                "it contains whitespace, control or non-ASCII characters",
            ));
        }
        let digest = *blake3::hash(secret.as_bytes()).as_bytes();
        Ok(Self { secret, digest })
    }

    /// The secret itself, for a client that must send it.
    pub fn expose(&self) -> &str {
        &self.secret
    }

    /// Constant-time check of a presented token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let presented = blake3::hash(presented);
        bool::from(self.digest.ct_eq(presented.as_bytes()))
    }

    /// Checks an `Authorization` header value (`Bearer <token>`, scheme case-insensitive).
    pub fn authorizes(&self, header: Option<&[u8]>) -> bool {
        let Some(value) = header else { return false };
        let Some(scheme) = value.get(..7) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        let token = value.get(7..).unwrap_or_default().trim_ascii();
        self.matches(token)
    }
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(")?;
        f.write_str(REDACTED)?;
        f.write_str(")")
    }
}

impl Serialize for AuthToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Whether `host` is certainly a loopback address (`localhost`, `127.0.0.0/8`, `::1`).
/// Anything else, hostnames included, counts as exposed.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_validated_and_never_printed() {
        assert!(AuthToken::new("").is_err());
        assert!(AuthToken::new("has space").is_err());
        assert!(AuthToken::new("tab\t").is_err());
        assert!(AuthToken::new("é").is_err());
        let t = AuthToken::new("s3cr3t-token").expect("valid");
        assert_eq!(format!("{t:?}"), "AuthToken(<redacted>)");
        assert_eq!(
            serde_json::to_string(&t).expect("serialises"),
            "\"<redacted>\""
        );
        assert_eq!(t.expose(), "s3cr3t-token");
    }

    #[test]
    fn bearer_header_matching() {
        let t = AuthToken::new("abc123").expect("valid");
        assert!(t.authorizes(Some(b"Bearer abc123")));
        assert!(t.authorizes(Some(b"bearer abc123")));
        assert!(t.authorizes(Some(b"BEARER  abc123 ")));
        assert!(!t.authorizes(None));
        assert!(!t.authorizes(Some(b"")));
        assert!(!t.authorizes(Some(b"Bearer")));
        assert!(!t.authorizes(Some(b"Bearer ")));
        assert!(!t.authorizes(Some(b"Bearer abc12")));
        assert!(!t.authorizes(Some(b"Bearer abc1234")));
        assert!(!t.authorizes(Some(b"Basic abc123")));
        assert!(!t.authorizes(Some(b"abc123")));
    }

    #[test]
    fn loopback_detection() {
        for h in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "192.168.1.5",
            "example.com",
            "",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}

//! `Secret`: a string that never shows itself.
//!
//! App secrets, Encrypt Keys, Verification Tokens, tickets, tokens and bearer keys all travel as
//! `Secret`. Its `Debug` and `Display` print `[redacted]`, so a stray `{:?}` in a log line or an
//! error message cannot leak one. Where correlation helps (which ticket is this?), log
//! [`Secret::fingerprint`]: the first 8 hex digits of its SHA-256, which identifies a value
//! without revealing it. Comparisons go through [`Secret::ct_eq`], in constant time.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A secret string. Serialises transparently (the store must keep tickets and tokens), but never
/// prints itself.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself: call this only where the value must leave the process on purpose
    /// (an upstream request, a token API response, the store).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time equality with `other` (the lengths may leak, the content does not).
    pub fn ct_eq(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }

    /// A short, stable, non-reversible identifier for logs: 8 hex digits of the SHA-256.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }
}

/// 8 hex digits of the SHA-256 of `bytes`.
pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..4])
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(&other.0)
    }
}

impl Eq for Secret {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        let s = Secret::new("test key");
        // SHA-256("test key") = fa2bdca4...
        assert_eq!(s.fingerprint(), "fa2bdca4");
    }

    #[test]
    fn ct_eq_compares_content() {
        let s = Secret::new("abc");
        assert!(s.ct_eq("abc"));
        assert!(!s.ct_eq("abd"));
        assert!(!s.ct_eq("ab"));
        assert!(!s.ct_eq(""));
    }
}

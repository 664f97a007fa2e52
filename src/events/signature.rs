//! The request signature: `lowercase_hex(SHA-256(timestamp ‖ nonce ‖ encrypt_key ‖ raw_body))`
//! (protocol.md §2.1). Plain SHA-256, not HMAC; over the body's bytes exactly as received, never
//! a re-serialisation; compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Header names, as Feishu sends them (HTTP header names are case-insensitive).
pub const TIMESTAMP_HEADER: &str = "x-lark-request-timestamp";
pub const NONCE_HEADER: &str = "x-lark-request-nonce";
pub const SIGNATURE_HEADER: &str = "x-lark-signature";

/// The three signature headers of one request.
#[derive(Debug, Clone, Copy)]
pub struct SignatureHeaders<'a> {
    pub timestamp: &'a str,
    pub nonce: &'a str,
    pub signature: &'a str,
}

/// The signature Feishu would send, as 32 raw bytes.
pub fn compute(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(timestamp.as_bytes());
    h.update(nonce.as_bytes());
    h.update(encrypt_key.as_bytes());
    h.update(body);
    h.finalize().into()
}

/// The signature as Feishu sends it: 64 lower-case hex digits.
pub fn compute_hex(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> String {
    hex::encode(compute(timestamp, nonce, encrypt_key, body))
}

/// Does `headers.signature` match the body under `encrypt_key`? Constant time in the content;
/// only lower-case hex is accepted, as every SDK compares the exact string.
pub fn verify(headers: &SignatureHeaders<'_>, encrypt_key: &str, body: &[u8]) -> bool {
    let expected = compute_hex(headers.timestamp, headers.nonce, encrypt_key, body);
    expected
        .as_bytes()
        .ct_eq(headers.signature.as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_test_inputs() {
        // Java/Go SDK test inputs (vector sig-go-sdk-test-inputs uses the same formula).
        let sig = compute_hex("timestamp", "nonce", "1212121212", b"body");
        assert_eq!(sig.len(), 64);
        assert!(verify(
            &SignatureHeaders {
                timestamp: "timestamp",
                nonce: "nonce",
                signature: &sig
            },
            "1212121212",
            b"body"
        ));
    }

    #[test]
    fn uppercase_and_truncated_signatures_fail() {
        let sig = compute_hex("1", "2", "k", b"{}");
        let h = |s: &str| SignatureHeaders {
            timestamp: "1",
            nonce: "2",
            signature: Box::leak(s.to_string().into_boxed_str()),
        };
        assert!(verify(&h(&sig), "k", b"{}"));
        assert!(!verify(&h(&sig.to_uppercase()), "k", b"{}"));
        assert!(!verify(&h(&sig[..63]), "k", b"{}"));
        assert!(!verify(&h(""), "k", b"{}"));
        assert!(!verify(&h(&sig), "k", b"{} "));
    }
}

//! Standard Webhooks signatures of handed-on events (DESIGN.md → *Event hand-off*).
//!
//! `webhook-signature: v1,` + base64(HMAC-SHA256(key, `{webhook-id}.{webhook-timestamp}.{body}`)),
//! where the key is the base64-decoded part of the consumer's `whsec_…` secret. This module owns
//! that rule and the rule for the secret itself ([`WebhookSecret::parse`]: `whsec_` + standard
//! base64 of 24..=64 bytes); config validation calls the same parser, so a secret the service
//! starts with is always one it can sign with.
//!
//! Pure: no IO, no clock (`now_s` is a parameter of [`verify`]). The key is printed as
//! `[redacted]`, and no error carries any part of a secret or a signature. [`verify`] exists for
//! our tests and as the reference the README's consumer snippets follow; it compares in constant
//! time and accepts a space-separated list of signatures, as the specification allows during a
//! key rotation. The known-answer vectors are `fixtures/vectors/standard-webhooks.json`, and the
//! tests check our signatures against the specification's own Rust library.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// Header names of a delivery (Standard Webhooks; lower case as HTTP/2 wants them).
pub const WEBHOOK_ID_HEADER: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE_HEADER: &str = "webhook-signature";

/// Every consumer secret starts with this.
pub const SECRET_PREFIX: &str = "whsec_";
/// Shortest key, in decoded bytes (192 bits; the specification's lower bound).
pub const MIN_SECRET_BYTES: usize = 24;
/// Longest key, in decoded bytes (the HMAC-SHA256 block size: longer keys are hashed anyway).
pub const MAX_SECRET_BYTES: usize = 64;

/// The one signature version we produce and accept.
const VERSION_PREFIX: &str = "v1,";

/// A consumer's signing key: the decoded bytes of its `whsec_…` secret. Debug prints
/// `[redacted]`.
#[derive(Clone)]
pub struct WebhookSecret(Box<[u8]>);

/// Why a string is not a usable Standard Webhooks secret. Never carries the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretError {
    /// It does not start with `whsec_`.
    MissingPrefix,
    /// The rest is not standard base64 (with padding).
    NotBase64,
    /// It decodes to this many bytes, outside 24..=64.
    BadLength(usize),
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::MissingPrefix => write!(
                f,
                "must start with \"{SECRET_PREFIX}\" (a Standard Webhooks secret: \"{SECRET_PREFIX}\" + base64 of {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} random bytes)"
            ),
            SecretError::NotBase64 => write!(
                f,
                "the part after \"{SECRET_PREFIX}\" must be standard base64 (A-Z a-z 0-9 + /, '=' padding)"
            ),
            SecretError::BadLength(n) => write!(
                f,
                "decodes to {n} bytes; a Standard Webhooks secret has {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} (make one with: printf 'whsec_%s' \"$(openssl rand -base64 32)\")"
            ),
        }
    }
}

impl std::error::Error for SecretError {}

impl WebhookSecret {
    /// Parse a configured secret: `whsec_` + standard base64 of 24..=64 bytes.
    pub fn parse(value: &str) -> Result<Self, SecretError> {
        let encoded = value
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        Self::from_key(key)
    }

    /// A secret from raw key bytes (24..=64 of them).
    pub fn from_key(key: Vec<u8>) -> Result<Self, SecretError> {
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(SecretError::BadLength(key.len()));
        }
        Ok(WebhookSecret(key.into_boxed_slice()))
    }

    /// A fresh random 32-byte secret (for `demo`, tests and users who need one).
    pub fn random() -> Self {
        let key: [u8; 32] = rand::random();
        WebhookSecret(Box::new(key))
    }

    /// The secret as it is written in the config file (`whsec_…`), still wrapped as a [`Secret`].
    pub fn to_config_value(&self) -> Secret {
        Secret::new(format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0)))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The `webhook-signature` value for one attempt: `v1,` + base64 of the HMAC-SHA256 of
/// `{webhook_id}.{timestamp_s}.{body}`, over the body's bytes exactly as sent.
pub fn sign(secret: &WebhookSecret, webhook_id: &str, timestamp_s: u64, body: &[u8]) -> String {
    let mut mac = secret.mac();
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "{VERSION_PREFIX}{}",
        STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Why a delivery does not verify. Never carries a signature or a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    /// `webhook-timestamp` is not unix seconds (digits only).
    BadTimestamp,
    /// `webhook-timestamp` is further from `now_s` than the tolerance (a replay, or a bad clock).
    OutsideTolerance,
    /// No `v1` signature in the list matches.
    NoMatch,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerifyError::BadTimestamp => "webhook-timestamp is not unix seconds",
            VerifyError::OutsideTolerance => "webhook-timestamp is outside the tolerance",
            VerifyError::NoMatch => "no webhook-signature matches",
        })
    }
}

impl std::error::Error for VerifyError {}

/// Verify a delivery as a consumer would: `webhook_timestamp` within `tolerance` of `now_s`, and
/// at least one `v1,` entry of the space-separated `signatures` equal (constant time) to ours.
/// Entries of other versions are ignored, as the specification asks.
pub fn verify(
    secret: &WebhookSecret,
    webhook_id: &str,
    webhook_timestamp: &str,
    signatures: &str,
    body: &[u8],
    now_s: u64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    if webhook_timestamp.is_empty() || !webhook_timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::BadTimestamp);
    }
    let timestamp_s: u64 = webhook_timestamp
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    if timestamp_s.abs_diff(now_s) > tolerance.as_secs() {
        return Err(VerifyError::OutsideTolerance);
    }
    let expected = sign(secret, webhook_id, timestamp_s, body);
    let expected = expected.as_bytes();
    // Look at every entry (no early exit), so timing does not say which one matched.
    let matched = signatures
        .split(' ')
        .filter(|s| s.starts_with(VERSION_PREFIX))
        .fold(subtle::Choice::from(0), |acc, s| {
            acc | s.as_bytes().ct_eq(expected)
        });
    if bool::from(matched) {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const VECTORS: &str = include_str!("../fixtures/vectors/standard-webhooks.json");
    const TOLERANCE: Duration = Duration::from_secs(5 * 60);

    #[derive(Deserialize)]
    struct Vectors {
        vectors: Vec<Vector>,
    }

    #[derive(Deserialize)]
    struct Vector {
        name: String,
        secret: String,
        webhook_id: String,
        webhook_timestamp: String,
        body: String,
        webhook_signature: String,
        valid: bool,
    }

    fn vectors() -> Vec<Vector> {
        let v: Vectors = serde_json::from_str(VECTORS).expect("vectors parse");
        assert!(v.vectors.len() >= 10, "all vectors loaded");
        v.vectors
    }

    fn secret(s: &str) -> WebhookSecret {
        WebhookSecret::parse(s).expect("valid secret")
    }

    #[test]
    fn known_answer_vectors_sign_and_verify() {
        let (mut valid, mut invalid) = (0, 0);
        for v in vectors() {
            let key = secret(&v.secret);
            let ts: u64 = v.webhook_timestamp.parse().expect("timestamp");
            let ours = sign(&key, &v.webhook_id, ts, v.body.as_bytes());
            let verdict = verify(
                &key,
                &v.webhook_id,
                &v.webhook_timestamp,
                &v.webhook_signature,
                v.body.as_bytes(),
                ts,
                TOLERANCE,
            );
            if v.valid {
                valid += 1;
                assert_eq!(ours, v.webhook_signature, "{}", v.name);
                assert_eq!(verdict, Ok(()), "{}", v.name);
            } else {
                invalid += 1;
                assert_ne!(ours, v.webhook_signature, "{}", v.name);
                assert_eq!(verdict, Err(VerifyError::NoMatch), "{}", v.name);
            }
        }
        assert!(
            valid >= 9 && invalid >= 1,
            "{valid} valid, {invalid} invalid"
        );
    }

    #[test]
    fn secrets_of_24_to_64_bytes_with_the_prefix_parse() {
        for n in [24, 32, 64] {
            let value = format!("whsec_{}", STANDARD.encode(vec![7u8; n]));
            assert!(WebhookSecret::parse(&value).is_ok(), "{n} bytes");
        }
        for (value, err) in [
            (STANDARD.encode([1u8; 32]), SecretError::MissingPrefix),
            (
                format!("WHSEC_{}", STANDARD.encode([1u8; 32])),
                SecretError::MissingPrefix,
            ),
            (
                format!("whsec_{}", STANDARD.encode([1u8; 23])),
                SecretError::BadLength(23),
            ),
            (
                format!("whsec_{}", STANDARD.encode([1u8; 65])),
                SecretError::BadLength(65),
            ),
            ("whsec_".to_string(), SecretError::BadLength(0)),
            ("whsec_not base64!".to_string(), SecretError::NotBase64),
            // URL-safe base64 is not standard base64.
            (format!("whsec_{}", "-_".repeat(16)), SecretError::NotBase64),
        ] {
            assert_eq!(WebhookSecret::parse(&value).err(), Some(err), "{value}");
        }
    }

    #[test]
    fn secret_errors_and_debug_never_show_the_secret() {
        // base64 of "0123456789abcdef": 16 bytes, too short.
        for value in [
            "whsec_MDEyMzQ1Njc4OWFiY2RlZg==",
            "whsec_MDEyMzQ1Njc4OWFiY2RlZg",
        ] {
            let err = WebhookSecret::parse(value).expect_err("refused");
            assert!(!err.to_string().contains("MDEyMzQ1"), "{err}");
            assert!(!format!("{err:?}").contains("MDEyMzQ1"), "{err:?}");
        }
        let key = WebhookSecret::random();
        let shown = key.to_config_value();
        assert_eq!(format!("{key:?}"), "[redacted]");
        assert_eq!(format!("{shown:?}"), "[redacted]");
        assert!(shown.expose().starts_with("whsec_"));
        // The written-out form parses back to the same key.
        let again = secret(shown.expose());
        assert_eq!(sign(&key, "id", 1, b"{}"), sign(&again, "id", 1, b"{}"));
    }

    #[test]
    fn verify_accepts_any_matching_entry_of_a_list() {
        let key = secret("whsec_wZPl9qd+KCzQjxaK2mBjvC8Hp/oSGWyn");
        let other = WebhookSecret::random();
        let good = sign(&key, "evt_1", 1000, b"{}");
        let stale = sign(&other, "evt_1", 1000, b"{}");
        let check = |sigs: &str| verify(&key, "evt_1", "1000", sigs, b"{}", 1000, TOLERANCE);
        assert_eq!(check(&good), Ok(()));
        assert_eq!(check(&format!("{stale} {good}")), Ok(()));
        assert_eq!(check(&format!("v1a,xyz {good} v2,abc")), Ok(()));
        assert_eq!(check(&stale), Err(VerifyError::NoMatch));
        assert_eq!(check(""), Err(VerifyError::NoMatch));
        assert_eq!(check("v1,"), Err(VerifyError::NoMatch));
        assert_eq!(check(&good[..good.len() - 1]), Err(VerifyError::NoMatch));
        // The same MAC under another version label is not accepted.
        assert_eq!(
            check(&good.replacen("v1,", "v2,", 1)),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn verify_checks_id_body_and_timestamp() {
        let key = WebhookSecret::random();
        let sig = sign(&key, "evt_1", 1000, b"{\"a\":1}");
        let v = |id: &str, ts: &str, body: &[u8], now: u64| {
            verify(&key, id, ts, &sig, body, now, TOLERANCE)
        };
        assert_eq!(v("evt_1", "1000", b"{\"a\":1}", 1000), Ok(()));
        assert_eq!(
            v("evt_2", "1000", b"{\"a\":1}", 1000),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            v("evt_1", "1000", b"{\"a\":2}", 1000),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            v("evt_1", "1001", b"{\"a\":1}", 1001),
            Err(VerifyError::NoMatch)
        );
        // Tolerance is inclusive on both sides.
        assert_eq!(v("evt_1", "1000", b"{\"a\":1}", 1300), Ok(()));
        assert_eq!(v("evt_1", "1000", b"{\"a\":1}", 700), Ok(()));
        assert_eq!(
            v("evt_1", "1000", b"{\"a\":1}", 1301),
            Err(VerifyError::OutsideTolerance)
        );
        assert_eq!(
            v("evt_1", "1000", b"{\"a\":1}", 699),
            Err(VerifyError::OutsideTolerance)
        );
        for ts in [
            "",
            "-1000",
            "+1000",
            "1e3",
            "1000.0",
            " 1000",
            "99999999999999999999999",
        ] {
            assert_eq!(
                v("evt_1", ts, b"{\"a\":1}", 1000),
                Err(VerifyError::BadTimestamp),
                "{ts:?}"
            );
        }
    }

    /// The specification's own library (code we did not write) accepts our signatures, and ours
    /// accepts its signatures. Its `verify` reads the wall clock with a 5-minute tolerance, so
    /// the timestamp is now.
    #[test]
    fn standardwebhooks_library_agrees_with_our_signing() {
        use hyper::header::{HeaderMap, HeaderValue};
        use standardwebhooks::Webhook;

        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        for v in vectors().into_iter().filter(|v| v.valid) {
            let ours_key = secret(&v.secret);
            let theirs = Webhook::new(&v.secret).expect("their parser takes our secret");
            let body = v.body.as_bytes();

            // Ours → theirs.
            let sig = sign(&ours_key, &v.webhook_id, now_s, body);
            let mut headers = HeaderMap::new();
            let value = |s: &str| HeaderValue::from_str(s).expect("header value");
            headers.insert(WEBHOOK_ID_HEADER, value(&v.webhook_id));
            headers.insert(WEBHOOK_TIMESTAMP_HEADER, value(&now_s.to_string()));
            headers.insert(WEBHOOK_SIGNATURE_HEADER, value(&sig));
            theirs
                .verify(body, &headers)
                .unwrap_or_else(|e| panic!("{}: their verify refused ours: {e}", v.name));
            // A tampered body is refused by theirs too.
            let mut tampered = body.to_vec();
            tampered.push(b' ');
            assert!(theirs.verify(&tampered, &headers).is_err(), "{}", v.name);

            // Theirs → ours, at the vector's own timestamp and at now.
            for ts in [v.webhook_timestamp.parse::<u64>().expect("ts"), now_s] {
                let their_sig = theirs
                    .sign(&v.webhook_id, ts as i64, body)
                    .expect("their sign");
                assert_eq!(
                    their_sig,
                    sign(&ours_key, &v.webhook_id, ts, body),
                    "{}",
                    v.name
                );
                assert_eq!(
                    verify(
                        &ours_key,
                        &v.webhook_id,
                        &ts.to_string(),
                        &their_sig,
                        body,
                        ts,
                        TOLERANCE
                    ),
                    Ok(()),
                    "{}",
                    v.name
                );
            }
        }
    }
}

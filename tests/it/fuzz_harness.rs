//! The fuzz harness: one function per `cargo fuzz` target (`fuzz/fuzz_targets/`), shared with the
//! corpus replay test (`fuzz_corpus`). The fuzz crate includes this very file by path, so the
//! fuzzer and `cargo test` run the same code on the same bytes.
//!
//! Each function takes the raw fuzz input, runs it through the intake functions, and panics when
//! an invariant breaks (that panic is what the fuzzer reports as a crash). It returns what the
//! intake answered so the replay test can check the error kinds. Only `lark_ticketd` and `std` are
//! used here: this file must compile in both crates.
//!
//! Input formats (chosen so corpus files stay readable):
//! - [`envelope`]: a request body (or a decrypted plaintext).
//! - [`decrypt`]: `<encrypt key>\n<encrypt value>`; without a newline, the whole input is the
//!   value under [`KEY`]. The input itself is also encrypted and decrypted again (round trip).
//! - [`verify`]: one flags byte, then `<timestamp>\n<nonce>\n<signature>\n<body>`.
//! - [`sealed`]: an event plaintext; it is encrypted and signed with [`KEY`] (as Feishu would), so
//!   the fuzzer reaches the parsing of decrypted payloads, and also sent as a plaintext body.

#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use lark_ticketd::config::Config;
use lark_ticketd::error::ErrorKind;
use lark_ticketd::events::cipher::{DecryptError, EventCipher, BLOCK_BYTES};
use lark_ticketd::events::envelope::{self, EventDetail, Payload, ShapeError};
use lark_ticketd::events::signature::{self, SignatureHeaders};
use lark_ticketd::events::{Target, Verified, Verifier};

/// The app with an Encrypt Key: the shared vectors' fake credentials, so their bodies verify.
pub const KEYED_APP: &str = "cli_a5f0e9d8c7b6a5f4";
pub const KEYED_TOKEN: &str = "Vt0kExampleVerificationTok3n0001";
pub const KEY: &str = "EkEyExampleEncryptKey000000000001";
/// The app without an Encrypt Key (plaintext pushes).
pub const PLAIN_APP: &str = "cli_fuzzplain0001";
pub const PLAIN_TOKEN: &str = "PlainFuzzVerificationToken000001";
/// A routed app id that is not configured.
pub const UNKNOWN_APP: &str = "cli_notconfigured";

/// The fixed IV [`sealed`] and the round trip in [`decrypt`] encrypt with (deterministic runs).
const IV: [u8; BLOCK_BYTES] = *b"fuzz-fixed-iv-16";

/// The error kinds `Verifier::verify` may answer (DESIGN.md's intake errors). Anything else,
/// and above all a server error, is a defect.
pub const VERIFY_ERRORS: &[ErrorKind] = &[
    ErrorKind::MalformedBody,
    ErrorKind::BadPayload,
    ErrorKind::EncryptionRequired,
    ErrorKind::EncryptKeyNotConfigured,
    ErrorKind::BadSignature,
    ErrorKind::BadToken,
    ErrorKind::UnknownApp,
    ErrorKind::AppMismatch,
];

/// The verifier every target uses: one app with an Encrypt Key, one without.
pub fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let text = format!(
            "[[apps]]\napp_id = \"{KEYED_APP}\"\napp_secret = \"s1\"\n\
             verification_token = \"{KEYED_TOKEN}\"\nencrypt_key = \"{KEY}\"\n\
             [[apps]]\napp_id = \"{PLAIN_APP}\"\napp_secret = \"s2\"\n\
             verification_token = \"{PLAIN_TOKEN}\"\n"
        );
        let config = Config::parse(&text, &|_| None).expect("the fuzz config parses");
        Verifier::new(&config.apps)
    })
}

/// Envelope detection and parsing: `encrypt_only`, `parse_object`, `classify`.
///
/// Invariants: the `{"encrypt":"…"}` fast path only ever answers what a full parse answers;
/// only JSON objects parse; a classified payload keeps the guarantees intake relies on.
pub fn envelope(data: &[u8]) -> Result<Payload, ShapeError> {
    let parsed = envelope::parse_object(data);
    if let Some(fast) = envelope::encrypt_only(data) {
        let wire = parsed
            .as_ref()
            .unwrap_or_else(|e| panic!("encrypt_only found {fast:?}, the parser: {e:?}"));
        assert_eq!(
            wire.encrypt.as_deref(),
            Some(fast),
            "encrypt_only disagrees with the parser"
        );
    }
    let wire = parsed?;
    assert_eq!(
        data.iter().find(|b| !b.is_ascii_whitespace()),
        Some(&b'{'),
        "only an object parses"
    );
    let payload = envelope::classify(&wire)?;
    check_payload(&payload);
    Ok(payload)
}

/// What every classified payload must hold.
fn check_payload(payload: &Payload) {
    let Payload::Event(event) = payload else {
        return;
    };
    assert!(event.time_us.is_none_or(|t| t >= 0), "negative event time");
    match &event.detail {
        EventDetail::AppTicket { ticket } => assert!(!ticket.is_empty(), "empty ticket"),
        EventDetail::Tenant(_) => assert!(
            event.tenant_key.as_deref().is_some_and(|k| !k.is_empty()),
            "lifecycle event without a tenant"
        ),
        EventDetail::Other => {}
    }
}

/// Decryption: `EventCipher::decrypt` on arbitrary text, and a round trip of the input.
///
/// Invariants: decryption is strict, so a blob that decrypts is exactly what encrypting its
/// plaintext with its IV gives (canonical base64 and padding); the reasons for failing agree with
/// the blob's shape; encrypting any bytes and decrypting them gives them back when they are UTF-8.
pub fn decrypt(data: &[u8]) -> Result<String, DecryptError> {
    let (key, blob) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (String::from_utf8_lossy(&data[..i]), &data[i + 1..]),
        None => (KEY.into(), data),
    };
    let cipher = EventCipher::new(&key);

    let round_trip = cipher.decrypt(&cipher.encrypt(data, IV));
    match std::str::from_utf8(data) {
        Ok(text) => assert_eq!(round_trip.as_deref(), Ok(text), "round trip"),
        Err(_) => assert_eq!(round_trip, Err(DecryptError::Utf8), "round trip"),
    }

    let blob = String::from_utf8_lossy(blob);
    let result = cipher.decrypt(&blob);
    match &result {
        Ok(plaintext) => {
            // Standard base64 of IV ‖ ciphertext: the IV is the first 16 bytes, i.e. the first
            // 24 characters hold 18 bytes; re-encrypt and compare the whole blob instead.
            let iv = iv_of(&blob).expect("a blob that decrypts has an IV");
            assert_eq!(
                cipher.encrypt(plaintext.as_bytes(), iv),
                blob,
                "a blob that decrypts is canonical"
            );
        }
        Err(DecryptError::Empty) => assert!(blob.is_empty()),
        Err(_) => assert!(!blob.is_empty()),
    }
    result
}

/// The IV at the front of a base64 blob, decoded without the crate under test's decoder.
fn iv_of(blob: &str) -> Option<[u8; BLOCK_BYTES]> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::with_capacity(BLOCK_BYTES);
    for c in blob.bytes().take(24) {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
        if out.len() == BLOCK_BYTES {
            return out.try_into().ok();
        }
    }
    None
}

/// The whole `Verifier::verify` with arbitrary signature headers and bodies.
///
/// Input: a flags byte, then `<timestamp>\n<nonce>\n<signature>\n<body>`. Flags: bits 0–1 pick
/// the route (`/events`, the keyed app, the plain app, an unknown app); bit 2 sends the three
/// signature headers; bit 3 replaces the signature with the correct one for [`KEY`], so the
/// fuzzer gets past the signature to decryption and parsing.
pub fn verify(data: &[u8]) -> Result<String, ErrorKind> {
    let Some((&flags, rest)) = data.split_first() else {
        return verify_checked(Target::AnyApp, None, b"");
    };
    let mut parts = rest.splitn(4, |&b| b == b'\n');
    let mut field = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (timestamp, nonce, mut sig) = (field(), field(), field());
    let body = parts.next().unwrap_or_default();
    let target = match flags & 0b11 {
        0 => Target::AnyApp,
        1 => Target::App(KEYED_APP),
        2 => Target::App(PLAIN_APP),
        _ => Target::App(UNKNOWN_APP),
    };
    if flags & 0b1000 != 0 {
        sig = signature::compute_hex(&timestamp, &nonce, KEY, body);
    }
    let headers = (flags & 0b100 != 0).then_some(SignatureHeaders {
        timestamp: &timestamp,
        nonce: &nonce,
        signature: &sig,
    });
    verify_checked(target, headers, body)
}

/// Encrypt and sign the input as Feishu would, and verify it; send it as a plaintext body too.
///
/// Invariants (beyond [`verify`]'s): a correctly signed body is never refused for its signature
/// or its routing; it is `bad_payload` exactly when the plaintext is not a UTF-8 JSON object;
/// `/events` and `/events/{app_id}` agree.
pub fn sealed(data: &[u8]) -> Result<String, ErrorKind> {
    let blob = EventCipher::new(KEY).encrypt(data, IV);
    let body = format!("{{\"encrypt\":\"{blob}\"}}");
    let timestamp = now_secs().to_string();
    let sig = signature::compute_hex(&timestamp, "fuzz-nonce", KEY, body.as_bytes());
    let headers = SignatureHeaders {
        timestamp: &timestamp,
        nonce: "fuzz-nonce",
        signature: &sig,
    };
    let routed = verify_checked(Target::App(KEYED_APP), Some(headers), body.as_bytes());
    let bare = verify_checked(Target::AnyApp, Some(headers), body.as_bytes());
    assert_eq!(routed, bare, "/events and /events/{{app_id}} disagree");

    let is_object = std::str::from_utf8(data)
        .ok()
        .is_some_and(|text| envelope::parse_object(text.as_bytes()).is_ok());
    match &routed {
        Ok(_) => assert!(is_object),
        Err(ErrorKind::BadPayload) => assert!(!is_object, "a JSON object refused as bad_payload"),
        Err(kind) => assert!(
            matches!(
                kind,
                ErrorKind::MalformedBody | ErrorKind::BadToken | ErrorKind::AppMismatch
            ),
            "a correctly signed body refused as {kind:?}"
        ),
    }

    // The same bytes as a plaintext push, to the plain app and to `/events`.
    let _ = verify_checked(Target::App(PLAIN_APP), None, data);
    let _ = verify_checked(Target::AnyApp, None, data);
    routed
}

/// Run `verify` and check what it answered against what the request proved.
fn verify_checked(
    target: Target<'_>,
    headers: Option<SignatureHeaders<'_>>,
    body: &[u8],
) -> Result<String, ErrorKind> {
    let result = verifier().verify(target, headers, body);
    match result {
        Err(e) => {
            let kind = e.kind();
            assert!(
                VERIFY_ERRORS.contains(&kind),
                "verify answered {kind:?}: not an intake error"
            );
            if matches!(target, Target::App(UNKNOWN_APP)) {
                assert_eq!(kind, ErrorKind::UnknownApp);
            }
            Err(kind)
        }
        Ok(verified) => {
            check_verified(target, headers, body, &verified);
            Ok(verified.app_id().to_string())
        }
    }
}

/// An accepted request is one the configured credentials really vouch for.
fn check_verified(
    target: Target<'_>,
    headers: Option<SignatureHeaders<'_>>,
    body: &[u8],
    verified: &Verified,
) {
    let app = verified.app_id();
    if let Target::App(routed) = target {
        assert_eq!(app, routed, "accepted for another app than the routed one");
    }
    let payload = verified.payload();
    check_payload(payload);
    let token = payload.token().map(|t| t.expose());
    match app {
        KEYED_APP => {
            assert_eq!(token, Some(KEYED_TOKEN), "accepted with a wrong token");
            let signed = headers.is_some_and(|h| signature::verify(&h, KEY, body));
            assert!(
                signed || matches!(payload, Payload::Challenge { .. }),
                "an unsigned event accepted for an app with an Encrypt Key"
            );
        }
        PLAIN_APP => {
            assert_eq!(token, Some(PLAIN_TOKEN), "accepted with a wrong token");
            let encrypted = envelope::parse_object(body).is_ok_and(|w| w.encrypt.is_some());
            assert!(
                !encrypted,
                "an encrypted body accepted for an app without a key"
            );
        }
        other => panic!("accepted for an app that is not configured: {other:?}"),
    }
    if let Payload::Event(event) = payload {
        if let Some(named) = event.app_id.as_deref() {
            assert_eq!(named, app, "accepted an event naming another app");
        }
        if matches!(event.detail, EventDetail::AppTicket { .. }) {
            assert!(event.app_id.is_some(), "a ticket without an app_id");
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

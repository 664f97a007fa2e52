//! Intake: everything between the raw bytes Feishu POSTs to `/events` and a stored ticket.
//!
//! The order is fixed and is the point of this module (protocol.md §8, STYLE.md habit 3):
//!
//! 1. the body must be a JSON object (`malformed_body`);
//! 2. `{"encrypt": ...}`: the **signature over the raw bytes** decides the app (on bare `/events`)
//!    and authenticity, in constant time; only then is the payload decrypted (`bad_payload` for
//!    every decryption failure alike). A request without a valid signature may still be a
//!    URL-verification challenge, the one request Feishu does not sign: it is decrypted, and if it
//!    is anything but a challenge it is refused as `bad_signature`;
//! 3. a plaintext body is accepted only for apps without an Encrypt Key (`encryption_required`);
//!    on bare `/events` the app is the one whose Verification Token matches;
//! 4. the Verification Token must match on every shape, in constant time (`bad_token`);
//! 5. an event naming another app than the routed one is refused (`app_mismatch`).
//!
//! **Key rotation.** An app may also have a previous Encrypt Key and Verification Token
//! (`previous_encrypt_key`, `previous_verification_token`), accepted until
//! `previous_keys_until` by the [`Clock`]: in steps 2–4 the current key (token) is tried first,
//! then the previous one, the signature still over the raw bytes and tokens still compared in
//! constant time; on bare `/events` either key finds the app. A payload that only a previous key
//! or token accepts says so in [`Verified`], and [`accept`] counts it
//! (`lark_ticketd_events_previous_key_total`), so the operator sees when Feishu stopped using
//! the old one. A verifier is immutable: a config reload builds a new one.
//!
//! Only [`Verifier::verify`] builds a [`Verified`], so nothing downstream can act on a payload
//! that skipped a step. [`accept`] then checks that an event is fresh ([`freshness`]: the
//! replay window, `stale_request`; event times ahead of our clock are capped for ordering) and
//! does the one thing each verified payload asks for: echo the challenge, store the ticket
//! (durably, before the 200), record tenant state, or just ack.
//!
//! A ticket goes to [`crate::tickets`], the bookkeeping intake shares with the token broker: it
//! decides whether the push answers a resend of ours, stores it newest-wins, and wakes the token
//! requests waiting for it — as one step that always completes, even when the client
//! disconnects mid-request. Intake sits above the store and the ticket bookkeeping and never
//! reaches the broker ([`crate::tokens`]); the two are siblings.
//!
//! About oracles: a request that carries signature headers that match no key gets
//! `bad_signature` whatever its ciphertext holds (unless it is a valid challenge). Without
//! signature headers, a body that fails to decrypt and one that decrypts to garbage answer
//! identically (`bad_payload`); only a ciphertext that decrypts to a JSON object that is not a
//! challenge answers `bad_signature`, which an attacker cannot produce without the key. So the
//! unsigned challenge path is not a padding oracle. Only short bodies
//! ([`MAX_CHALLENGE_ENCRYPT_BYTES`]) are tried as unsigned challenges at all, so an unsigned
//! request cannot make us decrypt a megabyte with every configured key.

pub mod cipher;
pub mod envelope;
pub mod freshness;
pub mod signature;

use std::collections::{HashMap, HashSet};

use crate::clock::{self, SharedClock};
use crate::config::{AppConfig, EventsConfig};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind};
use crate::forward::{self, Forwarder};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::{Enqueue, NewEvent, Store, TenantEvent, TicketWrite};
use crate::tickets::{PushedTicket, Tickets};

use cipher::EventCipher;
use envelope::{EventDetail, Payload, ShapeError};
use freshness::SignedAt;
use signature::SignatureHeaders;

pub use envelope::{Event, Order, Schema, TenantChange};

/// The longest `encrypt` value tried as an (unsigned) URL-verification challenge. Feishu's
/// challenge decrypts to about 120 bytes; this leaves room for long tokens and challenges.
pub const MAX_CHALLENGE_ENCRYPT_BYTES: usize = 4096;

/// The credentials intake checks for one app.
#[derive(Debug)]
struct AppKeys {
    app_id: String,
    verification_token: Secret,
    encrypt_key: Option<(Secret, EventCipher)>,
    /// The keys before a rotation, while they are still accepted.
    previous: Option<PreviousKeys>,
}

/// An app's Encrypt Key and Verification Token before a rotation.
#[derive(Debug)]
struct PreviousKeys {
    encrypt_key: Option<(Secret, EventCipher)>,
    verification_token: Option<Secret>,
    /// Accepted while `now < until_ms`.
    until_ms: u64,
}

impl AppKeys {
    /// The previous keys, if they are still accepted at `now_ms`.
    fn previous(&self, now_ms: u64) -> Option<&PreviousKeys> {
        self.previous.as_ref().filter(|p| now_ms < p.until_ms)
    }

    /// Does `token` match: `Some(false)` the current token, `Some(true)` only the previous one
    /// (while accepted), `None` neither. Both comparisons are constant time.
    fn token_matches(&self, token: &str, now_ms: u64) -> Option<bool> {
        if self.verification_token.ct_eq(token) {
            return Some(false);
        }
        let previous = self.previous(now_ms)?.verification_token.as_ref()?;
        previous.ct_eq(token).then_some(true)
    }
}

/// One Encrypt Key to try: whose it is and whether it is a previous one.
struct KeySlot<'a> {
    app: &'a AppKeys,
    key: &'a Secret,
    cipher: &'a EventCipher,
    previous: bool,
}

/// Every Encrypt Key of `candidates` to try, the current keys first, then the previous ones
/// still accepted at `now_ms`.
fn key_slots(candidates: &[AppKeys], now_ms: u64) -> Vec<KeySlot<'_>> {
    let current = candidates.iter().filter_map(|app| {
        let (key, cipher) = app.encrypt_key.as_ref()?;
        Some(KeySlot {
            app,
            key,
            cipher,
            previous: false,
        })
    });
    let previous = candidates.iter().filter_map(|app| {
        let (key, cipher) = app.previous(now_ms)?.encrypt_key.as_ref()?;
        Some(KeySlot {
            app,
            key,
            cipher,
            previous: true,
        })
    });
    current.chain(previous).collect()
}

fn keyed(key: &Option<Secret>) -> Option<(Secret, EventCipher)> {
    key.as_ref()
        .map(|k| (k.clone(), EventCipher::new(k.expose())))
}

/// Which app a request was addressed to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// `POST /events`: find the app from the request.
    AnyApp,
    /// `POST /events/{app_id}`.
    App(&'a str),
}

/// A payload that passed every check for the app it names. Only [`Verifier::verify`] makes one.
#[derive(Debug)]
pub struct Verified {
    app_id: String,
    payload: Payload,
    /// The event as Feishu sent it (decrypted): what the hand-off passes on.
    json: String,
    /// The timestamp the (valid) signature covers, for the replay window.
    signed_at: SignedAt,
    /// Which of the app's previous keys this payload needed (key rotation).
    previous: UsedPrevious,
}

/// Which previous key or token a verified payload was accepted with (none, normally).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsedPrevious {
    /// Signed (or, for an unsigned challenge, encrypted) with `previous_encrypt_key`.
    pub encrypt_key: bool,
    /// Carried `previous_verification_token`.
    pub verification_token: bool,
}

impl Verified {
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// The signature timestamp, when a signature was checked.
    pub fn signed_at(&self) -> SignedAt {
        self.signed_at
    }

    /// Which previous key or token (key rotation) the payload was accepted with.
    pub fn used_previous(&self) -> UsedPrevious {
        self.previous
    }

    /// The event type for logs and metrics: `url_verification` or the event's type.
    pub fn event_type(&self) -> &str {
        match &self.payload {
            Payload::Challenge { .. } => "url_verification",
            Payload::Event(e) => &e.event_type,
        }
    }
}

/// Checks requests against the configured apps' keys and tokens.
pub struct Verifier {
    /// The apps whose events are received here (they have a Verification Token).
    apps: Vec<AppKeys>,
    index: HashMap<String, usize>,
    /// Configured apps whose events are not received here: custom apps without a Verification
    /// Token. A request routed to one is refused as `events_not_configured`, never checked
    /// against an empty token.
    without_events: HashSet<String>,
    /// Decides whether the previous keys are still accepted.
    clock: SharedClock,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("apps", &self.apps)
            .field("without_events", &self.without_events)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier on the system clock.
    pub fn new(apps: &[AppConfig]) -> Self {
        Self::with_clock(apps, clock::system())
    }

    /// A verifier whose previous keys expire by `clock`.
    pub fn with_clock(apps: &[AppConfig], clock: SharedClock) -> Self {
        let without_events = apps
            .iter()
            .filter(|a| a.verification_token.is_none())
            .map(|a| a.app_id.clone())
            .collect();
        let apps: Vec<AppKeys> = apps
            .iter()
            .filter_map(|a| {
                let previous = a.previous_keys_until.and_then(|until| {
                    let keys = PreviousKeys {
                        encrypt_key: keyed(&a.previous_encrypt_key),
                        verification_token: a.previous_verification_token.clone(),
                        until_ms: until.unix_ms,
                    };
                    (keys.encrypt_key.is_some() || keys.verification_token.is_some())
                        .then_some(keys)
                });
                Some(AppKeys {
                    app_id: a.app_id.clone(),
                    verification_token: a.verification_token.clone()?,
                    encrypt_key: keyed(&a.encrypt_key),
                    previous,
                })
            })
            .collect();
        let index = apps
            .iter()
            .enumerate()
            .map(|(i, a)| (a.app_id.clone(), i))
            .collect();
        Verifier {
            apps,
            index,
            without_events,
            clock,
        }
    }

    /// Are this app's events received here?
    pub fn knows(&self, app_id: &str) -> bool {
        self.index.contains_key(app_id)
    }

    /// Run every check on one request. `signature` is `None` when any of the three
    /// `X-Lark-*` headers is absent.
    pub fn verify(
        &self,
        target: Target<'_>,
        signature: Option<SignatureHeaders<'_>>,
        body: &[u8],
    ) -> Result<Verified, Error> {
        let candidates: &[AppKeys] = match target {
            Target::AnyApp if self.apps.is_empty() => {
                return Err(Error::new(
                    ErrorKind::EventsNotConfigured,
                    "no configured app receives events here: set verification_token (and \
                     encrypt_key) in an [[apps]] entry",
                ))
            }
            Target::AnyApp => &self.apps,
            Target::App(id) if self.without_events.contains(id) => {
                return Err(Error::new(
                    ErrorKind::EventsNotConfigured,
                    format!(
                        "app {id} has no verification_token configured, so its events are not \
                         received here; set verification_token (and encrypt_key) in its [[apps]] \
                         entry to receive them"
                    ),
                ))
            }
            Target::App(id) => {
                let i = *self.index.get(id).ok_or_else(|| {
                    Error::new(
                        ErrorKind::UnknownApp,
                        "no app with this app_id is configured",
                    )
                })?;
                std::slice::from_ref(&self.apps[i])
            }
        };
        let now_ms = self.clock.now_ms();
        // Feishu's exact shape first: no JSON parser needed for the outer object.
        if let Some(encrypt) = envelope::encrypt_only(body) {
            return Self::verify_encrypted(candidates, signature, body, encrypt, now_ms);
        }
        let wire =
            envelope::parse_object(body).map_err(|_| Error::from(ErrorKind::MalformedBody))?;
        match wire.encrypt.as_deref() {
            Some(encrypt) => Self::verify_encrypted(candidates, signature, body, encrypt, now_ms),
            None => Self::verify_plain(candidates, &wire, body, now_ms),
        }
    }

    fn verify_encrypted(
        candidates: &[AppKeys],
        signature: Option<SignatureHeaders<'_>>,
        body: &[u8],
        encrypt: &str,
        now_ms: u64,
    ) -> Result<Verified, Error> {
        let slots = key_slots(candidates, now_ms);
        if slots.is_empty() {
            return Err(ErrorKind::EncryptKeyNotConfigured.into());
        }
        // Signed: the signature picks the app (and which of its keys), then decrypt.
        if let Some(headers) = signature {
            let signed_by = slots
                .iter()
                .find(|slot| signature::verify(&headers, slot.key.expose(), body));
            if let Some(slot) = signed_by {
                let (payload, json) = decrypt_payload(slot.cipher, encrypt)?;
                let signed_at = SignedAt::parse(headers.timestamp);
                return finish(slot.app, payload, json, signed_at, slot.previous, now_ms);
            }
        }
        // Unsigned (or signed by no app): only a URL-verification challenge may pass. A challenge
        // is a few hundred bytes; anything larger is not one, and is not worth decrypting with
        // every key for a request that proved nothing.
        if encrypt.len() > MAX_CHALLENGE_ENCRYPT_BYTES {
            return Err(ErrorKind::BadSignature.into());
        }
        let decrypted = slots.iter().find_map(|slot| {
            decrypt_payload(slot.cipher, encrypt)
                .ok()
                .map(|payload| (slot, payload))
        });
        match decrypted {
            Some((slot, (payload @ Payload::Challenge { .. }, json))) => finish(
                slot.app,
                payload,
                json,
                SignedAt::Unsigned,
                slot.previous,
                now_ms,
            ),
            Some(_) => Err(ErrorKind::BadSignature.into()),
            // A signature was claimed and is wrong: that is the answer, whatever the payload.
            None if signature.is_some() => Err(ErrorKind::BadSignature.into()),
            None => Err(ErrorKind::BadPayload.into()),
        }
    }

    fn verify_plain(
        candidates: &[AppKeys],
        wire: &envelope::Wire<'_>,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Verified, Error> {
        if candidates.iter().all(|a| a.encrypt_key.is_some()) {
            return Err(ErrorKind::EncryptionRequired.into());
        }
        let payload = envelope::classify(wire).map_err(shape_error)?;
        let token = payload
            .token()
            .ok_or_else(|| Error::new(ErrorKind::BadToken, "the Verification Token is missing"))?;
        let matches = |a: &&AppKeys| a.token_matches(token.expose(), now_ms).is_some();
        match candidates.iter().find(matches) {
            Some(app) if app.encrypt_key.is_none() => {
                // The body parsed as JSON, so it is UTF-8.
                let json = String::from_utf8_lossy(body).into_owned();
                finish(app, payload, json, SignedAt::Unsigned, false, now_ms)
            }
            Some(_) => Err(ErrorKind::EncryptionRequired.into()),
            None => Err(ErrorKind::BadToken.into()),
        }
    }
}

/// Decrypt and classify; every failure up to a parsed JSON object is `bad_payload`.
fn decrypt_payload(cipher: &EventCipher, encrypt: &str) -> Result<(Payload, String), Error> {
    let plaintext = cipher
        .decrypt(encrypt)
        .map_err(|cause| Error::from(ErrorKind::BadPayload).with_cause(cause))?;
    let wire = envelope::parse_object(plaintext.as_bytes())
        .map_err(|_| Error::from(ErrorKind::BadPayload))?;
    let payload = envelope::classify(&wire).map_err(shape_error)?;
    Ok((payload, plaintext))
}

fn shape_error(e: ShapeError) -> Error {
    match e {
        ShapeError::NotAnObject => ErrorKind::MalformedBody.into(),
        ShapeError::Unrecognised(why) => Error::new(ErrorKind::MalformedBody, why),
    }
}

/// The token and app checks shared by every path.
/// `previous_key`: the payload was signed or decrypted with the app's previous Encrypt Key.
fn finish(
    app: &AppKeys,
    payload: Payload,
    json: String,
    signed_at: SignedAt,
    previous_key: bool,
    now_ms: u64,
) -> Result<Verified, Error> {
    let token = payload
        .token()
        .ok_or_else(|| Error::new(ErrorKind::BadToken, "the Verification Token is missing"))?;
    let previous_token = app
        .token_matches(token.expose(), now_ms)
        .ok_or_else(|| Error::from(ErrorKind::BadToken))?;
    if let Payload::Event(event) = &payload {
        let names_app = event.app_id.as_deref();
        match (&event.detail, names_app) {
            (EventDetail::AppTicket { .. }, None) => {
                return Err(Error::new(
                    ErrorKind::MalformedBody,
                    "app_ticket event without event.app_id",
                ))
            }
            (_, Some(named)) if named != app.app_id => {
                return Err(Error::new(
                    ErrorKind::AppMismatch,
                    format!(
                        "the event is for app {named:?} but was routed to {:?}",
                        app.app_id
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(Verified {
        app_id: app.app_id.clone(),
        payload,
        json,
        signed_at,
        previous: UsedPrevious {
            encrypt_key: previous_key,
            verification_token: previous_token,
        },
    })
}

/// What intake did with a verified payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answer `{"challenge": ...}`.
    Challenge(String),
    /// A ticket was stored (it is the newest now).
    TicketStored,
    /// A ticket arrived that is older than the stored one: acknowledged, not stored.
    TicketKeptNewer,
    /// Tenant state was recorded.
    TenantRecorded,
    /// Any other authentic event: queued for every consumer that wants it (none: nothing
    /// stored), and acknowledged.
    Acknowledged,
    /// An event id seen within `forwarding.dedupe_window` (Feishu's redelivery): acknowledged,
    /// not handed on again.
    Duplicate,
}

/// What intake acts with once a payload is verified: the replay window's settings, the ticket
/// bookkeeping ([`Tickets`]), the store (tenant state), the hand-off ([`Forwarder`]), metrics
/// and the clock — not the whole service. Cheap to clone.
#[derive(Clone)]
pub struct Intake {
    events: EventsConfig,
    tickets: Tickets,
    store: Store,
    forwarder: Forwarder,
    metrics: Metrics,
    clock: SharedClock,
}

impl Intake {
    pub fn new(
        events: EventsConfig,
        tickets: Tickets,
        store: Store,
        forwarder: Forwarder,
        metrics: Metrics,
        clock: SharedClock,
    ) -> Intake {
        Intake {
            events,
            tickets,
            store,
            forwarder,
            metrics,
            clock,
        }
    }
}

/// Act on a verified payload. Returns only after anything that must be durable is durable.
pub async fn accept(intake: &Intake, verified: Verified) -> Result<Outcome, Error> {
    let Verified {
        app_id,
        payload,
        json,
        signed_at,
        previous,
    } = verified;
    if previous.encrypt_key {
        intake.metrics.event_previous_key(&app_id, "encrypt_key");
    }
    if previous.verification_token {
        intake
            .metrics
            .event_previous_key(&app_id, "verification_token");
    }
    let event = match payload {
        Payload::Challenge { challenge, .. } => return Ok(Outcome::Challenge(challenge)),
        Payload::Event(event) => *event,
    };
    let now_ms = intake.clock.now_ms();
    let fresh =
        freshness::check(&intake.events, signed_at, event.time_us, now_ms).map_err(|stale| {
            intake.metrics.stale_request(&app_id, stale.as_str());
            Error::new(ErrorKind::StaleRequest, stale.message())
        })?;
    if fresh.capped {
        intake.metrics.event_time_capped(&app_id);
        tracing::warn!(
            app_id = %app_id,
            event_time_us = event.time_us.unwrap_or_default(),
            now_ms,
            "event time is ahead of our clock by more than events.max_skew; ordering it at the limit"
        );
    }
    // Without a usable event time, order by arrival.
    let time_us = fresh.order_time_us.unwrap_or(now_ms as i64 * 1000);
    match event.detail {
        EventDetail::AppTicket { ticket } => {
            let pushed = PushedTicket {
                ticket,
                event_time_us: time_us,
                event_id: event.event_id.unwrap_or_default(),
                received_at_ms: now_ms,
            };
            Ok(match intake.tickets.store_pushed(app_id, pushed).await? {
                TicketWrite::Stored => Outcome::TicketStored,
                TicketWrite::KeptNewer => Outcome::TicketKeptNewer,
            })
        }
        EventDetail::Tenant(change) => {
            let meta = EventMeta {
                event_id: event.event_id,
                event_type: event.event_type.clone(),
                tenant_key: event.tenant_key.clone(),
            };
            let ev = TenantEvent {
                tenant_key: event.tenant_key.unwrap_or_default(),
                change,
                event_type: event.event_type,
                event_time_us: time_us,
                received_at_ms: now_ms,
            };
            intake.store.record_tenant_event(&app_id, ev).await?;
            match hand_on(intake, app_id, meta, json, now_ms).await? {
                Outcome::Duplicate => Ok(Outcome::Duplicate),
                _ => Ok(Outcome::TenantRecorded),
            }
        }
        EventDetail::Other => {
            let meta = EventMeta {
                event_id: event.event_id,
                event_type: event.event_type,
                tenant_key: event.tenant_key,
            };
            hand_on(intake, app_id, meta, json, now_ms).await
        }
    }
}

/// What the hand-off needs of an event besides its body.
struct EventMeta {
    event_id: Option<String>,
    event_type: String,
    tenant_key: Option<String>,
}

/// Queue an authentic event for the consumers that want it (DESIGN.md → *Event hand-off*):
/// durable before it returns, deduplicated on the event id. Without an id (Feishu always sends
/// one) the SHA-256 of the event stands in, so an exact redelivery is still recognised.
async fn hand_on(
    intake: &Intake,
    app_id: String,
    meta: EventMeta,
    json: String,
    now_ms: u64,
) -> Result<Outcome, Error> {
    if intake
        .forwarder
        .matching(&app_id, &meta.event_type)
        .is_empty()
    {
        return Ok(Outcome::Acknowledged);
    }
    let body = forward::delivery_body(&json)
        .map_err(|e| Error::new(ErrorKind::MalformedBody, e.to_string()))?;
    let event_id = meta
        .event_id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| hex::encode(Sha256::digest(json.as_bytes())));
    // These travel as delivery headers: refuse what no header can carry (an authentic Feishu
    // event never has it) rather than queue an event that can never be delivered.
    for (field, value) in [
        ("event_id", Some(event_id.as_str())),
        ("event_type", Some(meta.event_type.as_str())),
        ("tenant_key", meta.tenant_key.as_deref()),
    ] {
        if value.is_some_and(|v| !forward::header_safe(v)) {
            return Err(Error::new(
                ErrorKind::MalformedBody,
                format!(
                    "the event's {field} must be printable ASCII of at most {} characters",
                    forward::MAX_HEADER_FIELD
                ),
            ));
        }
    }
    let event = NewEvent {
        app_id,
        event_id,
        event_type: meta.event_type,
        tenant_key: meta.tenant_key,
        received_at_ms: now_ms,
        dedupe_until_ms: intake.forwarder.dedupe_until_ms(now_ms),
        body: body.into(),
    };
    match intake.forwarder.enqueue(event).await? {
        Enqueue::Queued => Ok(Outcome::Acknowledged),
        Enqueue::Duplicate => {
            intake.metrics.duplicate_event();
            Ok(Outcome::Duplicate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::Arc;

    const TOKEN: &str = "Vt0kExampleVerificationTok3n0001";
    const KEY: &str = "EkEyExampleEncryptKey000000000001";

    fn verifier(apps: &[(&str, Option<&str>, &str)]) -> Verifier {
        let mut text = String::new();
        for (id, key, token) in apps {
            text.push_str(&format!(
                "[[apps]]\napp_id = \"{id}\"\napp_secret = \"s\"\nverification_token = \"{token}\"\n"
            ));
            if let Some(k) = key {
                text.push_str(&format!("encrypt_key = \"{k}\"\n"));
            }
        }
        let config = Config::parse(&text, &|_| None).unwrap();
        Verifier::new(&config.apps)
    }

    fn encrypted(key: &str, plaintext: &str) -> Vec<u8> {
        let blob = EventCipher::new(key).encrypt(plaintext.as_bytes(), [3; 16]);
        format!("{{\"encrypt\":\"{blob}\"}}").into_bytes()
    }

    fn signed<'a>(key: &str, body: &[u8], sig: &'a mut String) -> SignatureHeaders<'a> {
        *sig = signature::compute_hex("1", "2", key, body);
        SignatureHeaders {
            timestamp: "1",
            nonce: "2",
            signature: sig,
        }
    }

    fn ticket_json(app_id: &str, token: &str) -> String {
        format!(
            r#"{{"ts":"1700000000.5","uuid":"u","token":"{token}","type":"event_callback","event":{{"app_id":"{app_id}","app_ticket":"tk","type":"app_ticket"}}}}"#
        )
    }

    #[test]
    fn bare_events_picks_the_app_whose_key_signs() {
        let v = verifier(&[
            ("cli_a", Some("key-a"), "tok-a"),
            ("cli_b", Some("key-b"), "tok-b"),
        ]);
        let body = encrypted("key-b", &ticket_json("cli_b", "tok-b"));
        let mut sig = String::new();
        let h = signed("key-b", &body, &mut sig);
        let verified = v.verify(Target::AnyApp, Some(h), &body).unwrap();
        assert_eq!(verified.app_id(), "cli_b");
    }

    #[test]
    fn bare_events_picks_the_app_whose_key_decrypts_the_challenge() {
        let v = verifier(&[
            ("cli_a", Some("key-a"), "tok-a"),
            ("cli_b", Some("key-b"), "tok-b"),
        ]);
        let body = encrypted(
            "key-b",
            r#"{"challenge":"c","token":"tok-b","type":"url_verification"}"#,
        );
        let verified = v.verify(Target::AnyApp, None, &body).unwrap();
        assert_eq!(verified.app_id(), "cli_b");
    }

    #[test]
    fn previous_keys_are_tried_after_the_current_ones_until_they_expire() {
        use crate::clock::ManualClock;
        let text = "[[apps]]\napp_id = \"cli_a\"\napp_secret = \"s\"\nverification_token = \"tok-a\"\n\
            encrypt_key = \"key-a\"\n\
            [[apps]]\napp_id = \"cli_b\"\napp_secret = \"s\"\nverification_token = \"tok-b\"\n\
            encrypt_key = \"key-b\"\nprevious_encrypt_key = \"old-b\"\n\
            previous_verification_token = \"old-tok-b\"\nprevious_keys_until = \"1970-01-01T00:00:10Z\"\n";
        let config = Config::parse(text, &|_| None).unwrap();
        let clock = Arc::new(ManualClock::new(9_999));
        let v = Verifier::with_clock(&config.apps, clock.clone());
        let check = |key: &str, token: &str, target| {
            let body = encrypted(key, &ticket_json("cli_b", token));
            let mut sig = String::new();
            let h = signed(key, &body, &mut sig);
            v.verify(target, Some(h), &body)
        };
        for target in [Target::AnyApp, Target::App("cli_b")] {
            let current = check("key-b", "tok-b", target).unwrap();
            assert_eq!(current.used_previous(), UsedPrevious::default());
            let old = check("old-b", "old-tok-b", target).unwrap();
            assert_eq!(old.app_id(), "cli_b");
            assert_eq!(
                old.used_previous(),
                UsedPrevious {
                    encrypt_key: true,
                    verification_token: true
                }
            );
            // Another app's previous token is not this app's.
            let err = check("old-b", "tok-a", target).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadToken);
        }
        clock.advance(std::time::Duration::from_millis(1));
        for target in [Target::AnyApp, Target::App("cli_b")] {
            let err = check("old-b", "tok-b", target).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadSignature);
            let err = check("key-b", "old-tok-b", target).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadToken);
        }
        // Debug never shows a key.
        let printed = format!("{v:?}");
        assert!(
            !printed.contains("old-b") && !printed.contains("key-b"),
            "{printed}"
        );
    }

    #[test]
    fn bare_events_picks_the_plain_app_by_token() {
        let v = verifier(&[("cli_a", None, "tok-a"), ("cli_b", None, "tok-b")]);
        let body = ticket_json("cli_b", "tok-b");
        let verified = v.verify(Target::AnyApp, None, body.as_bytes()).unwrap();
        assert_eq!(verified.app_id(), "cli_b");
    }

    #[test]
    fn every_check_has_its_error() {
        let v = verifier(&[("cli_a", Some(KEY), TOKEN), ("cli_p", None, "tok-p")]);
        let kind = |target, body: &[u8], sign: bool| {
            let mut sig = String::new();
            let h = sign.then(|| signed(KEY, body, &mut sig));
            v.verify(target, h, body).unwrap_err().kind()
        };
        let a = Target::App("cli_a");
        let ticket = encrypted(KEY, &ticket_json("cli_a", TOKEN));
        assert_eq!(kind(a, b"[]", true), ErrorKind::MalformedBody);
        assert_eq!(
            kind(Target::App("cli_zzz"), &ticket, true),
            ErrorKind::UnknownApp
        );
        assert_eq!(kind(a, &ticket, false), ErrorKind::BadSignature);
        assert_eq!(
            kind(a, ticket_json("cli_a", TOKEN).as_bytes(), false),
            ErrorKind::EncryptionRequired
        );
        assert_eq!(
            kind(a, &encrypted(KEY, &ticket_json("cli_a", "nope")), true),
            ErrorKind::BadToken
        );
        assert_eq!(
            kind(a, &encrypted(KEY, &ticket_json("cli_other", TOKEN)), true),
            ErrorKind::AppMismatch
        );
        assert_eq!(
            kind(a, br#"{"encrypt":"AAAA"}"#, true),
            ErrorKind::BadPayload
        );
        assert_eq!(
            kind(a, br#"{"encrypt":"AAAA"}"#, false),
            ErrorKind::BadPayload
        );
        assert_eq!(
            kind(Target::App("cli_p"), &ticket, false),
            ErrorKind::EncryptKeyNotConfigured
        );
        // A plaintext body whose token belongs to an app with a key: encryption_required.
        assert_eq!(
            kind(
                Target::AnyApp,
                ticket_json("cli_a", TOKEN).as_bytes(),
                false
            ),
            ErrorKind::EncryptionRequired
        );
    }
}

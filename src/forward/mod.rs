//! The event hand-off (DESIGN.md → *Event hand-off*): Feishu allows one event request URL per
//! app, so every other event the app subscribes to is passed on from here to the services that
//! want it — the *consumers* of `[[consumers]]`.
//!
//! # The rules this module owns
//!
//! - **What is handed on**: every authentic event except the URL-verification challenge and
//!   `app_ticket` (the ticket never leaves the service). Lifecycle events (`app_open`,
//!   `app_status_change`, `app_uninstalled`, `order_paid`) are recorded by intake *and* handed on.
//!   An event goes to each consumer whose [`ConsumerFilter`] (its `events` patterns and `apps`)
//!   matches it. Feishu's `200` is sent only after the event is durably queued for every
//!   matching consumer; with no matching consumer nothing is stored and the answer is `200` at
//!   once.
//! - **Dedupe**: on `header.event_id` (schema 2.0) or `uuid` (1.0), atomic, for
//!   `forwarding.dedupe_window`. A redelivery by Feishu gets `200` and is not queued again.
//! - **The delivery**: `POST {url}` with the decrypted event as Feishu sent it, minus the
//!   Verification Token ([`delivery_body`]), and the headers of [`delivery_headers`]:
//!   `content-type: application/json`, the Standard Webhooks `webhook-id` (the Feishu event id,
//!   the same on every retry and redelivery), `webhook-timestamp` (unix seconds of this attempt)
//!   and `webhook-signature` ([`crate::webhook::sign`]), and `lark-app-id`, `lark-event-type`, and
//!   `lark-tenant-key` when the event names a tenant. Consumers authenticate a delivery by the
//!   signature, never by our Verification Token, which is why the token is removed.
//! - **Outcome** (the deliverer, to come): any `2xx` within `forwarding.delivery_timeout` is
//!   delivered; anything else is retried on `forwarding.retry_schedule`, then a dead letter.
//!   Consumers are independent. At least once; order is not guaranteed.
//!
//! # What lives where
//!
//! [`crate::webhook`] signs (Standard Webhooks) and owns the `whsec_` secret rule;
//! [`crate::consumer_filter`] decides which consumer gets which event. Both sit at the bottom of
//! the crate, below `config`, which validates `[[consumers]]` with them. This file builds the
//! body and the headers of one attempt.
//! All of it is pure: no IO, no clock (the attempt's timestamp is a parameter). The durable
//! queue lives in `store`; the deliverer will live here and call these functions.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

pub mod deliver;

pub use crate::consumer_filter::{ConsumerFilter, EventPattern};
pub use crate::webhook::{
    WebhookSecret, WEBHOOK_ID_HEADER, WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER,
};
pub use deliver::Forwarder;

/// Header names of a delivery beyond Standard Webhooks' three.
pub const CONTENT_TYPE_HEADER: &str = "content-type";
pub const APP_ID_HEADER: &str = "lark-app-id";
pub const EVENT_TYPE_HEADER: &str = "lark-event-type";
pub const TENANT_KEY_HEADER: &str = "lark-tenant-key";

/// What a delivery's headers say about its event (intake's parsed envelope has all of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryMeta<'a> {
    /// `header.event_id` (2.0) or `uuid` (1.0): the `webhook-id`.
    pub event_id: &'a str,
    pub app_id: &'a str,
    /// `header.event_type` (2.0) or `event.type` (1.0).
    pub event_type: &'a str,
    /// The tenant the event names, if any.
    pub tenant_key: Option<&'a str>,
}

/// The event is not a JSON object. Carries serde_json's position, never the content (which
/// holds the Verification Token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(String);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the event is not a JSON object: {}", self.0)
    }
}

impl std::error::Error for BodyError {}

/// The body handed to consumers: the decrypted event as Feishu sent it, minus the Verification
/// Token.
///
/// Removed: every top-level `token` member (schema 1.0 carries the Verification Token there)
/// and every `token` member of a top-level `header` object (schema 2.0), whatever the schema
/// says — a Verification Token can sit in no other place, so nothing that could be ours
/// survives. Kept: everything else, in Feishu's order, every value byte for byte. In
/// particular a `token` *inside* `event` stays: it is event data, not our secret (a card
/// action's `event.token` is what the consumer needs to update that card). Keys are compared
/// after unescaping, so `"\u0074oken"` is a `token` too.
///
/// Only the top-level object and `header` are rebuilt: their members are re-joined without
/// whitespace, and their keys written in serde_json's escaping (identical for every key Feishu
/// uses). Values, including `event`, are copied as received.
pub fn delivery_body(decrypted_event_json: &str) -> Result<String, BodyError> {
    let top = members(decrypted_event_json)?;
    let mut out = String::with_capacity(decrypted_event_json.len());
    out.push('{');
    let mut first = true;
    for (key, value) in top {
        if key == "token" {
            continue;
        }
        let header;
        let value = match key.as_str() {
            "header" if value.get().starts_with('{') => {
                header = strip_token_member(value.get())?;
                header.as_str()
            }
            _ => value.get(),
        };
        push_member(&mut out, &mut first, &key, value);
    }
    out.push('}');
    Ok(out)
}

/// The object `json` without its `token` members.
fn strip_token_member(json: &str) -> Result<String, BodyError> {
    let mut out = String::with_capacity(json.len());
    out.push('{');
    let mut first = true;
    for (key, value) in members(json)? {
        if key != "token" {
            push_member(&mut out, &mut first, &key, value.get());
        }
    }
    out.push('}');
    Ok(out)
}

fn push_member(out: &mut String, first: &mut bool, key: &str, raw_value: &str) {
    if !std::mem::take(first) {
        out.push(',');
    }
    // A `String` always serialises.
    out.push_str(&serde_json::to_string(key).unwrap_or_default());
    out.push(':');
    out.push_str(raw_value);
}

/// The members of a JSON object in order, values unparsed (duplicates kept, as sent).
fn members(json: &str) -> Result<Vec<(String, &RawValue)>, BodyError> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
            while let Some(key) = map.next_key::<String>()? {
                out.push((key, map.next_value::<&'de RawValue>()?));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let out = de
        .deserialize_map(Members)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| BodyError(e.to_string()))?;
    Ok(out)
}

/// Every header of one delivery attempt, in a fixed order: `content-type`, `webhook-id`,
/// `webhook-timestamp`, `webhook-signature` (over `body` exactly), `lark-app-id`,
/// `lark-event-type`, and `lark-tenant-key` when the event names a (non-empty) tenant.
/// `timestamp_s` is the unix time of this attempt, so each retry is signed afresh.
/// Longest event id, event type or tenant key handed on (Feishu's are 16–64 characters).
pub const MAX_HEADER_FIELD: usize = 128;

/// Can `value` travel in a delivery header (`webhook-id`, `lark-event-type`,
/// `lark-tenant-key`)? Printable ASCII, at most [`MAX_HEADER_FIELD`] bytes. Intake refuses an
/// event whose fields cannot: such an event could never be sent, and every failed attempt would
/// count against a healthy consumer.
pub fn header_safe(value: &str) -> bool {
    value.len() <= MAX_HEADER_FIELD && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

pub fn delivery_headers(
    secret: &WebhookSecret,
    meta: &DeliveryMeta<'_>,
    timestamp_s: u64,
    body: &str,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        (CONTENT_TYPE_HEADER, "application/json".to_string()),
        (WEBHOOK_ID_HEADER, meta.event_id.to_string()),
        (WEBHOOK_TIMESTAMP_HEADER, timestamp_s.to_string()),
        (
            WEBHOOK_SIGNATURE_HEADER,
            crate::webhook::sign(secret, meta.event_id, timestamp_s, body.as_bytes()),
        ),
        (APP_ID_HEADER, meta.app_id.to_string()),
        (EVENT_TYPE_HEADER, meta.event_type.to_string()),
    ];
    if let Some(tenant) = meta.tenant_key.filter(|t| !t.is_empty()) {
        headers.push((TENANT_KEY_HEADER, tenant.to_string()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use serde_json::Value;

    const V2: &str = r#"{"schema":"2.0","header":{"event_id":"5e3702a84e847582be8db7fb73283c02","token":"Vt0kExampleVerificationTok3n0001","create_time":"1608725989000","event_type":"im.message.receive_v1","tenant_key":"2ca1d211f64f6438","app_id":"cli_a5f0e9d8c7b6a5f4"},"event":{"token":"card-update-token-stays","message":{"message_id":"om_1","content":"{\"text\":\"hello \\u4f60\\u597d\"}","n":1.50,"e":1e3}}}"#;
    const V2_EXPECTED: &str = r#"{"schema":"2.0","header":{"event_id":"5e3702a84e847582be8db7fb73283c02","create_time":"1608725989000","event_type":"im.message.receive_v1","tenant_key":"2ca1d211f64f6438","app_id":"cli_a5f0e9d8c7b6a5f4"},"event":{"token":"card-update-token-stays","message":{"message_id":"om_1","content":"{\"text\":\"hello \\u4f60\\u597d\"}","n":1.50,"e":1e3}}}"#;
    const V1: &str = r#"{"uuid":"41b5f371157e3bd6b51ae19a5ec7a1d2","token":"Vt0kExampleVerificationTok3n0001","ts":"1502199207.7171419","type":"event_callback","event":{"app_id":"cli_a5f0e9d8c7b6a5f4","tenant_key":"2ca1d211f64f6438","type":"app_open","token":"decoy-event-data"}}"#;
    const V1_EXPECTED: &str = r#"{"uuid":"41b5f371157e3bd6b51ae19a5ec7a1d2","ts":"1502199207.7171419","type":"event_callback","event":{"app_id":"cli_a5f0e9d8c7b6a5f4","tenant_key":"2ca1d211f64f6438","type":"app_open","token":"decoy-event-data"}}"#;
    const VT: &str = "Vt0kExampleVerificationTok3n0001";

    #[test]
    fn only_printable_ascii_travels_in_a_header() {
        assert!(header_safe("5e3702a84e847582be8db7fb73283c02"));
        assert!(header_safe("im.message.receive_v1"));
        assert!(!header_safe("w-nl\r\nX-Injected: 1"));
        assert!(!header_safe("im.\u{0}x"));
        assert!(!header_safe("事件"));
        assert!(!header_safe(&"a".repeat(MAX_HEADER_FIELD + 1)));
    }

    #[test]
    fn v2_body_loses_header_token_and_nothing_else() {
        let body = delivery_body(V2).expect("object");
        assert_eq!(body, V2_EXPECTED);
        assert!(!body.contains(VT));
        // The event payload is copied byte for byte (numbers, escapes and all).
        let event = |s: &str| s[s.find("\"event\":").expect("event")..].to_string();
        assert_eq!(event(&body), event(V2));
    }

    #[test]
    fn v1_body_loses_top_level_token_and_nothing_else() {
        let body = delivery_body(V1).expect("object");
        assert_eq!(body, V1_EXPECTED);
        assert!(!body.contains(VT));
        // Same content as the original minus the token, by value too.
        let mut original: Value = serde_json::from_str(V1).expect("json");
        original.as_object_mut().expect("object").remove("token");
        assert_eq!(
            serde_json::from_str::<Value>(&body).expect("json"),
            original
        );
    }

    #[test]
    fn nested_token_in_event_is_event_data_and_stays() {
        for (input, decoy) in [(V2, "card-update-token-stays"), (V1, "decoy-event-data")] {
            let body = delivery_body(input).expect("object");
            let v: Value = serde_json::from_str(&body).expect("json");
            assert_eq!(v["event"]["token"], decoy);
            assert!(v.get("token").is_none());
            assert!(v.get("header").is_none_or(|h| h.get("token").is_none()));
        }
    }

    #[test]
    fn escaped_duplicated_and_spaced_tokens_are_all_removed() {
        let input = concat!(
            "{ \"\\u0074oken\" : \"",
            "Vt0kExampleVerificationTok3n0001",
            "\" ,\n",
            "  \"header\": { \"token\": \"",
            "Vt0kExampleVerificationTok3n0001",
            "\", ",
            "\"tok\\u0065n\": \"",
            "Vt0kExampleVerificationTok3n0001",
            "\", \"event_id\": \"e1\" },\n",
            "  \"token\": \"",
            "Vt0kExampleVerificationTok3n0001",
            "\",\n",
            "  \"event\": { \"a\" : [1, 2] }\n}"
        );
        let body = delivery_body(input).expect("object");
        assert!(!body.contains(VT), "{body}");
        assert_eq!(
            body,
            r#"{"header":{"event_id":"e1"},"event":{ "a" : [1, 2] }}"#
        );
    }

    #[test]
    fn keys_keep_feishus_order() {
        let input =
            r#"{"z":1,"token":"t","a":{"y":2,"x":3},"header":{"token":"t","b":1,"a":2},"m":null}"#;
        assert_eq!(
            delivery_body(input).expect("object"),
            r#"{"z":1,"a":{"y":2,"x":3},"header":{"b":1,"a":2},"m":null}"#
        );
    }

    #[test]
    fn a_header_that_is_not_an_object_is_kept_as_is() {
        let input = r#"{"header":"token","token":"t","h":{"token":"x"}}"#;
        assert_eq!(
            delivery_body(input).expect("object"),
            r#"{"header":"token","h":{"token":"x"}}"#
        );
    }

    #[test]
    fn not_an_object_is_an_error_without_the_content() {
        for bad in [
            "",
            "[]",
            "\"token\"",
            r#"{"token":"Vt0kExampleVerificationTok3n0001""#,
            r#"{"token":"Vt0kExampleVerificationTok3n0001"} trailing"#,
            r#"{"header":{"token":"Vt0kExampleVerificationTok3n0001",}}"#,
        ] {
            let err = delivery_body(bad).expect_err(bad);
            assert!(!err.to_string().contains(VT), "{err}");
        }
    }

    #[test]
    fn headers_carry_the_event_and_a_signature_over_the_body() {
        let secret = WebhookSecret::random();
        let body = delivery_body(V2).expect("object");
        let meta = DeliveryMeta {
            event_id: "5e3702a84e847582be8db7fb73283c02",
            app_id: "cli_a5f0e9d8c7b6a5f4",
            event_type: "im.message.receive_v1",
            tenant_key: Some("2ca1d211f64f6438"),
        };
        let headers = delivery_headers(&secret, &meta, 1_700_000_000, &body);
        let names: Vec<_> = headers.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "webhook-id",
                "webhook-timestamp",
                "webhook-signature",
                "lark-app-id",
                "lark-event-type",
                "lark-tenant-key"
            ]
        );
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
                .expect(name)
        };
        assert_eq!(get("content-type"), "application/json");
        assert_eq!(get("webhook-id"), meta.event_id);
        assert_eq!(get("webhook-timestamp"), "1700000000");
        assert_eq!(get("lark-app-id"), meta.app_id);
        assert_eq!(get("lark-event-type"), meta.event_type);
        assert_eq!(get("lark-tenant-key"), "2ca1d211f64f6438");
        crate::webhook::verify(
            &secret,
            get("webhook-id"),
            get("webhook-timestamp"),
            get("webhook-signature"),
            body.as_bytes(),
            1_700_000_000,
            Duration::from_secs(300),
        )
        .expect("the signature covers id, timestamp and body");
        // No header carries the Verification Token or the secret.
        let secret_text = secret.to_config_value();
        for (_, v) in &headers {
            assert!(!v.contains(VT) && !v.contains(secret_text.expose()));
        }
    }

    #[test]
    fn tenant_header_only_when_the_event_names_a_tenant() {
        let secret = WebhookSecret::random();
        for tenant_key in [None, Some("")] {
            let meta = DeliveryMeta {
                event_id: "e",
                app_id: "cli_a",
                event_type: "app_open",
                tenant_key,
            };
            let headers = delivery_headers(&secret, &meta, 1, "{}");
            assert!(headers.iter().all(|(n, _)| *n != "lark-tenant-key"));
            assert_eq!(headers.len(), 6);
        }
    }
}

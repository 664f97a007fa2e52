//! Event envelopes (protocol.md §4): recognising the URL-verification challenge, schema 1.0 and
//! schema 2.0, and pulling out what intake needs — the token, the event type and id, the app, the
//! tenant, the event time, and the fields of `app_ticket` and the store-app lifecycle events.
//!
//! Parsing borrows from the body wherever the JSON has no escapes, and only the fields we use are
//! declared: the `event` payload of a business event is never parsed (it is handed on later).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::secret::Secret;

pub use crate::model::{Order, TenantChange};

/// Every top-level field any shape uses. A request body is this too: `{"encrypt": ...}` or, with
/// no Encrypt Key, the envelope itself.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Wire<'a> {
    #[serde(borrow)]
    pub encrypt: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub schema: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub challenge: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub uuid: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub ts: Option<&'a RawValue>,
    #[serde(borrow)]
    pub header: Option<Header<'a>>,
    #[serde(borrow)]
    pub event: Option<&'a RawValue>,
}

/// The schema 2.0 `header`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Header<'a> {
    #[serde(borrow)]
    pub event_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub event_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub create_time: Option<&'a RawValue>,
    #[serde(borrow)]
    pub tenant_key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub app_id: Option<Cow<'a, str>>,
}

/// The fields of a schema 1.0 `event` that app_ticket and the lifecycle events carry.
#[derive(Deserialize, Default)]
#[serde(default)]
struct V1Event<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    app_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    app_ticket: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tenant_key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow)]
    order_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    price_plan_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    buy_type: Option<Cow<'a, str>>,
    seats: Option<serde_json::Value>,
    pay_time: Option<serde_json::Value>,
}

/// Why a JSON text is not an envelope we understand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    /// Not a JSON object.
    NotAnObject,
    /// A JSON object, but not one of the three shapes, or a shape with a required field missing.
    Unrecognised(&'static str),
}

/// The `encrypt` value of a body in exactly the shape Feishu sends, `{"encrypt":"<base64>"}`,
/// found without a JSON parser; `None` for any other shape (then the body is parsed in full).
/// Only printable ASCII without `"` or `\` is accepted inside, and only JSON's own whitespace
/// around it (not `trim_ascii`'s form feed: found by the `envelope` fuzz target), so the answer is
/// always what a full parse would give.
pub fn encrypt_only(body: &[u8]) -> Option<&str> {
    let json_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = body.iter().position(|b| !json_ws(b))?;
    let end = body.iter().rposition(|b| !json_ws(b))? + 1;
    let inner = body[start..end]
        .strip_prefix(br#"{"encrypt":""#)?
        .strip_suffix(br#""}"#)?;
    let plain = inner
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if !plain {
        return None;
    }
    std::str::from_utf8(inner).ok()
}

/// Parse a JSON object (and only an object: serde would happily read an array into a struct).
pub fn parse_object(bytes: &[u8]) -> Result<Wire<'_>, ShapeError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ShapeError::NotAnObject);
    }
    serde_json::from_slice(bytes).map_err(|_| ShapeError::NotAnObject)
}

/// Envelope schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    V1,
    V2,
}

impl Schema {
    pub fn as_str(self) -> &'static str {
        match self {
            Schema::V1 => "1.0",
            Schema::V2 => "2.0",
        }
    }
}

/// A recognised payload, owned.
#[derive(Debug, Clone)]
pub enum Payload {
    /// URL verification: echo `challenge`.
    Challenge {
        challenge: String,
        token: Option<Secret>,
    },
    Event(Box<Event>),
}

impl Payload {
    /// The Verification Token the payload carries, where its shape keeps it.
    pub fn token(&self) -> Option<&Secret> {
        match self {
            Payload::Challenge { token, .. } => token.as_ref(),
            Payload::Event(e) => e.token.as_ref(),
        }
    }
}

/// An event (schema 1.0 or 2.0).
#[derive(Debug, Clone)]
pub struct Event {
    pub schema: Schema,
    /// `uuid` (1.0) or `header.event_id` (2.0): the dedup key.
    pub event_id: Option<String>,
    /// `event.type` (1.0) or `header.event_type` (2.0).
    pub event_type: String,
    pub token: Option<Secret>,
    /// `event.app_id` (1.0) or `header.app_id` (2.0), when present.
    pub app_id: Option<String>,
    pub tenant_key: Option<String>,
    /// Event time in microseconds since the epoch: 1.0 `ts` (seconds with fraction), 2.0
    /// `header.create_time` (milliseconds).
    pub time_us: Option<i64>,
    pub detail: EventDetail,
}

/// What intake does something with.
#[derive(Debug, Clone)]
pub enum EventDetail {
    AppTicket { ticket: Secret },
    Tenant(TenantChange),
    Other,
}

/// Classify a parsed object into one of the three shapes (protocol.md §4.1: a challenge has
/// `type == "url_verification"` and no `schema`).
pub fn classify(wire: &Wire<'_>) -> Result<Payload, ShapeError> {
    // Schema first: a 2.0 envelope is an event whatever else it carries (the Go/Java SDK test
    // event has a stray `"type":"url_verification"` beside its header).
    if wire.schema.is_some() {
        let header = wire.header.as_ref().ok_or(ShapeError::Unrecognised(
            "schema 2.0 event without a header",
        ))?;
        return Ok(Payload::Event(Box::new(Event {
            schema: Schema::V2,
            event_id: header.event_id.as_deref().map(str::to_string),
            event_type: header.event_type.as_deref().unwrap_or_default().to_string(),
            token: header.token.as_deref().map(Secret::new),
            app_id: header.app_id.as_deref().map(str::to_string),
            tenant_key: header.tenant_key.as_deref().map(str::to_string),
            time_us: header
                .create_time
                .and_then(|t| parse_time_us(t, TimeUnit::Millis)),
            detail: EventDetail::Other,
        })));
    }
    if wire.kind.as_deref() == Some("url_verification") {
        let challenge = wire.challenge.as_deref().ok_or(ShapeError::Unrecognised(
            "url_verification without a challenge",
        ))?;
        return Ok(Payload::Challenge {
            challenge: challenge.to_string(),
            token: wire.token.as_deref().map(Secret::new),
        });
    }
    if wire.uuid.is_some() || wire.kind.as_deref() == Some("event_callback") {
        return classify_v1(wire).map(|e| Payload::Event(Box::new(e)));
    }
    Err(ShapeError::Unrecognised(
        "neither url_verification, schema 1.0 nor schema 2.0",
    ))
}

fn classify_v1(wire: &Wire<'_>) -> Result<Event, ShapeError> {
    let event: V1Event<'_> = match wire.event {
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| ShapeError::Unrecognised("schema 1.0 event is not an object"))?,
        None => V1Event::default(),
    };
    let event_type = event.kind.as_deref().unwrap_or_default().to_string();
    let tenant_key = event.tenant_key.as_deref().map(str::to_string);
    let detail = match event_type.as_str() {
        "app_ticket" => {
            let ticket = event
                .app_ticket
                .as_deref()
                .filter(|t| !t.is_empty())
                .ok_or(ShapeError::Unrecognised(
                    "app_ticket event without app_ticket",
                ))?;
            EventDetail::AppTicket {
                ticket: Secret::new(ticket),
            }
        }
        "app_open" | "app_status_change" | "app_uninstalled" | "order_paid" => {
            if tenant_key.as_deref().is_none_or(str::is_empty) {
                return Err(ShapeError::Unrecognised(
                    "lifecycle event without event.tenant_key",
                ));
            }
            EventDetail::Tenant(match event_type.as_str() {
                "app_open" => TenantChange::Opened,
                "app_status_change" => TenantChange::StatusChanged {
                    status: event.status.as_deref().unwrap_or("unknown").to_string(),
                },
                "app_uninstalled" => TenantChange::Uninstalled,
                _ => TenantChange::OrderPaid(Order {
                    order_id: event.order_id.as_deref().unwrap_or_default().to_string(),
                    price_plan_type: event.price_plan_type.as_deref().map(str::to_string),
                    buy_type: event.buy_type.as_deref().map(str::to_string),
                    seats: event.seats.as_ref().and_then(json_u64),
                    pay_time: event.pay_time.as_ref().map(json_string),
                }),
            })
        }
        _ => EventDetail::Other,
    };
    Ok(Event {
        schema: Schema::V1,
        event_id: wire.uuid.as_deref().map(str::to_string),
        event_type,
        token: wire.token.as_deref().map(Secret::new),
        app_id: event.app_id.as_deref().map(str::to_string),
        tenant_key,
        time_us: wire.ts.and_then(|t| parse_time_us(t, TimeUnit::Seconds)),
        detail,
    })
}

fn json_u64(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn json_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Clone, Copy)]
enum TimeUnit {
    Seconds,
    Millis,
}

/// A time given as a JSON string or number, in seconds (with optional fraction) or milliseconds,
/// as microseconds since the epoch. Anything else is `None`.
fn parse_time_us(raw: &RawValue, unit: TimeUnit) -> Option<i64> {
    let text = raw.get().trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let (scale, digits) = match unit {
        TimeUnit::Seconds => (1_000_000i64, 6usize),
        TimeUnit::Millis => (1_000, 3),
    };
    let mut frac: i64 = 0;
    for (i, b) in fraction.bytes().take(digits).enumerate() {
        frac += i64::from(b - b'0') * 10i64.pow((digits - 1 - i) as u32);
    }
    whole.checked_mul(scale)?.checked_add(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(json: &str) -> Result<Payload, ShapeError> {
        classify(&parse_object(json.as_bytes())?)
    }

    #[test]
    fn recognises_the_three_shapes() {
        let c = payload(r#"{"challenge":"c\"1","token":"t","type":"url_verification"}"#).unwrap();
        assert!(matches!(c, Payload::Challenge { ref challenge, .. } if challenge == "c\"1"));

        let v1 = payload(
            r#"{"ts":"1502199207.7171419","uuid":"u1","token":"t","type":"event_callback",
               "event":{"app_id":"cli_x","app_ticket":"tk","type":"app_ticket"}}"#,
        )
        .unwrap();
        let Payload::Event(e) = v1 else { panic!() };
        assert_eq!(e.schema, Schema::V1);
        assert_eq!(e.event_type, "app_ticket");
        assert_eq!(e.event_id.as_deref(), Some("u1"));
        assert_eq!(e.app_id.as_deref(), Some("cli_x"));
        assert_eq!(e.time_us, Some(1_502_199_207_717_141));
        assert!(
            matches!(e.detail, EventDetail::AppTicket { ref ticket } if ticket.expose() == "tk")
        );

        let v2 = payload(
            r#"{"schema":"2.0","token":"decoy","header":{"event_id":"e","token":"t2","create_time":"1603977298000",
               "event_type":"im.message.receive_v1","tenant_key":"tk","app_id":"cli_x"},"event":{}}"#,
        )
        .unwrap();
        let Payload::Event(e) = v2 else { panic!() };
        assert_eq!(e.schema, Schema::V2);
        assert_eq!(e.token.unwrap().expose(), "t2");
        assert_eq!(e.tenant_key.as_deref(), Some("tk"));
        assert_eq!(e.time_us, Some(1_603_977_298_000_000));
    }

    #[test]
    fn the_encrypt_fast_path_agrees_with_the_parser() {
        let cases: &[&[u8]] = &[
            br#"{"encrypt":"QUJD"}"#,
            b" {\"encrypt\":\"QUJD+/==\"}\n",
            br#"{"encrypt":""}"#,
            br#"{"encrypt":"a\/b"}"#,
            br#"{"encrypt":"a"b"}"#,
            br#"{"encrypt":"x","token":"y"}"#,
            br#"{ "encrypt": "x" }"#,
            b"{\"encrypt\":\"a\nb\"}",
            br#"{"encrypt":"x"}}"#,
        ];
        for body in cases {
            let parsed = parse_object(body)
                .ok()
                .map(|w| w.encrypt.map(|e| e.into_owned()));
            if let Some(fast) = encrypt_only(body) {
                assert_eq!(
                    parsed,
                    Some(Some(fast.to_string())),
                    "{}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        assert_eq!(encrypt_only(br#"{"encrypt":"QUJD"}"#), Some("QUJD"));
        assert_eq!(encrypt_only(br#"{"encrypt":"a\/b"}"#), None);
        assert_eq!(encrypt_only(br#"{ "encrypt": "x" }"#), None);
    }

    proptest::proptest! {
        #[test]
        fn the_fast_path_never_disagrees(inner in "[ -~\\n\\\\\"]{0,40}", pad in "[ \\n]{0,2}") {
            let body = format!("{pad}{{\"encrypt\":\"{inner}\"}}{pad}");
            if let Some(fast) = encrypt_only(body.as_bytes()) {
                let parsed = parse_object(body.as_bytes()).ok().and_then(|w| w.encrypt.map(|e| e.into_owned()));
                proptest::prop_assert_eq!(parsed, Some(fast.to_string()));
            }
        }
    }

    #[test]
    fn rejects_non_objects_and_unknown_shapes() {
        assert_eq!(payload("[1,2]").unwrap_err(), ShapeError::NotAnObject);
        assert_eq!(payload("\"x\"").unwrap_err(), ShapeError::NotAnObject);
        assert_eq!(payload("{").unwrap_err(), ShapeError::NotAnObject);
        assert!(matches!(
            payload(r#"{"hello":"world"}"#).unwrap_err(),
            ShapeError::Unrecognised(_)
        ));
        assert!(matches!(
            payload(r#"{"type":"url_verification"}"#).unwrap_err(),
            ShapeError::Unrecognised(_)
        ));
    }

    #[test]
    fn lifecycle_events_need_a_tenant() {
        let e = payload(
            r#"{"uuid":"u","token":"t","type":"event_callback","event":{"type":"app_open","app_id":"cli_x"}}"#,
        );
        assert!(matches!(e, Err(ShapeError::Unrecognised(_))));
        let e = payload(
            r#"{"uuid":"u","token":"t","ts":"1","type":"event_callback","event":{"type":"order_paid","tenant_key":"k","order_id":"o","seats":"5","pay_time":"17"}}"#,
        )
        .unwrap();
        let Payload::Event(event) = e else { panic!() };
        let EventDetail::Tenant(TenantChange::OrderPaid(order)) = event.detail else {
            panic!()
        };
        assert_eq!(order.seats, Some(5));
        assert_eq!(order.pay_time.as_deref(), Some("17"));
    }

    #[test]
    fn times_parse_from_strings_and_numbers() {
        let raw = |s: &str| RawValue::from_string(s.to_string()).unwrap();
        assert_eq!(
            parse_time_us(&raw("\"1.5\""), TimeUnit::Seconds),
            Some(1_500_000)
        );
        assert_eq!(parse_time_us(&raw("2"), TimeUnit::Seconds), Some(2_000_000));
        assert_eq!(
            parse_time_us(&raw("\"1700\""), TimeUnit::Millis),
            Some(1_700_000)
        );
        assert_eq!(parse_time_us(&raw("\"-1\""), TimeUnit::Seconds), None);
        assert_eq!(parse_time_us(&raw("\"\""), TimeUnit::Seconds), None);
        assert_eq!(parse_time_us(&raw("null"), TimeUnit::Seconds), None);
        assert_eq!(
            parse_time_us(&raw("\"99999999999999999999\""), TimeUnit::Seconds),
            None
        );
    }
}

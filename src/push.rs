//! Sending events the way Feishu's Open Platform does: encrypt with a random IV, sign the exact
//! body bytes, add the `X-Lark-*` headers, POST as JSON.
//!
//! Used by `lark-ticketd push` (an operator testing a live deployment), by the fake Open Platform,
//! and by the tests. The URL-verification challenge is sent unsigned, as the platform does.

use rand::RngCore;

use crate::events::cipher::EventCipher;
use crate::events::signature::{self, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::secret::Secret;

/// One request as the Open Platform would send it.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub body: Vec<u8>,
    /// `(name, value)` pairs beyond `Content-Type`.
    pub headers: Vec<(&'static str, String)>,
}

/// How to seal a payload: with or without an Encrypt Key, signed or not.
#[derive(Debug, Clone, Copy)]
pub struct Seal<'a> {
    pub encrypt_key: Option<&'a Secret>,
    /// Add signature headers (only meaningful with an Encrypt Key; challenges are unsigned).
    pub sign: bool,
}

/// Build the request for `plaintext` with a random IV, nonce and the current time.
pub fn seal(plaintext: &str, how: Seal<'_>) -> PushRequest {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    seal_at(plaintext, how, now_ms)
}

/// Build the request with a random IV and nonce, signed at `now_ms` (unix milliseconds; the
/// header carries whole seconds, as Feishu's does): a fake platform on its own clock.
pub fn seal_at(plaintext: &str, how: Seal<'_>, now_ms: u64) -> PushRequest {
    let mut rng = rand::thread_rng();
    let mut iv = [0u8; 16];
    rng.fill_bytes(&mut iv);
    let nonce = rng.next_u32().to_string();
    let timestamp = (now_ms / 1000).to_string();
    seal_with(plaintext, how, iv, &timestamp, &nonce)
}

/// Build the request deterministically (tests, benchmarks).
pub fn seal_with(
    plaintext: &str,
    how: Seal<'_>,
    iv: [u8; 16],
    timestamp: &str,
    nonce: &str,
) -> PushRequest {
    let Some(key) = how.encrypt_key else {
        return PushRequest {
            body: plaintext.as_bytes().to_vec(),
            headers: Vec::new(),
        };
    };
    let encrypt = EventCipher::new(key.expose()).encrypt(plaintext.as_bytes(), iv);
    let body = serde_json::to_vec(&serde_json::json!({ "encrypt": encrypt })).unwrap_or_default();
    let mut headers = Vec::new();
    if how.sign {
        let sig = signature::compute_hex(timestamp, nonce, key.expose(), &body);
        headers.push((TIMESTAMP_HEADER, timestamp.to_string()));
        headers.push((NONCE_HEADER, nonce.to_string()));
        headers.push((SIGNATURE_HEADER, sig));
    }
    PushRequest { body, headers }
}

/// A URL-verification challenge.
pub fn challenge_json(challenge: &str, token: &Secret) -> String {
    serde_json::json!({
        "challenge": challenge,
        "token": token.expose(),
        "type": "url_verification",
    })
    .to_string()
}

/// An `app_ticket` event (schema 1.0, the only form Feishu sends). `ts_us` is the event time.
pub fn app_ticket_json(
    app_id: &str,
    ticket: &Secret,
    token: &Secret,
    ts_us: i64,
    uuid: &str,
) -> String {
    serde_json::json!({
        "ts": format!("{}.{:06}", ts_us.div_euclid(1_000_000), ts_us.rem_euclid(1_000_000)),
        "uuid": uuid,
        "token": token.expose(),
        "type": "event_callback",
        "event": {
            "app_id": app_id,
            "app_ticket": ticket.expose(),
            "type": "app_ticket",
        },
    })
    .to_string()
}

/// Put the Verification Token where the event's schema keeps it (`header.token` for 2.0, `token`
/// for 1.0 and challenges). Fails if `event` is not a JSON object.
pub fn with_token(event: &str, token: &Secret) -> Result<String, String> {
    let mut value: serde_json::Value =
        serde_json::from_str(event).map_err(|e| format!("not JSON: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| "not a JSON object".to_string())?;
    let token = serde_json::Value::String(token.expose().to_string());
    let is_v2 = object.contains_key("schema");
    let header = object
        .get_mut("header")
        .and_then(serde_json::Value::as_object_mut)
        .filter(|_| is_v2);
    match header {
        Some(header) => header.insert("token".into(), token),
        None => object.insert("token".into(), token),
    };
    Ok(value.to_string())
}

/// A random id in Feishu's style (32 hex digits).
pub fn random_event_id() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// POST a sealed request; returns the status and body.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    request: &PushRequest,
) -> Result<(u16, String), reqwest::Error> {
    let mut builder = client
        .post(url)
        .header("content-type", "application/json; charset=utf-8")
        .body(request.body.clone());
    for (name, value) in &request.headers {
        builder = builder.header(*name, value);
    }
    let response = builder.send().await?;
    let status = response.status().as_u16();
    let body = response.text().await?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_requests_verify_and_decrypt() {
        let key = Secret::new("k");
        let req = seal(
            "{\"a\":1}",
            Seal {
                encrypt_key: Some(&key),
                sign: true,
            },
        );
        let header = |n: &str| {
            req.headers
                .iter()
                .find(|(h, _)| *h == n)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        let sig = signature::SignatureHeaders {
            timestamp: header(TIMESTAMP_HEADER),
            nonce: header(NONCE_HEADER),
            signature: header(SIGNATURE_HEADER),
        };
        assert!(signature::verify(&sig, "k", &req.body));
        let outer: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        let pt = EventCipher::new("k")
            .decrypt(outer["encrypt"].as_str().unwrap())
            .unwrap();
        assert_eq!(pt, "{\"a\":1}");
    }

    #[test]
    fn token_goes_where_the_schema_keeps_it() {
        let t = Secret::new("tok");
        let v2 = with_token(r#"{"schema":"2.0","header":{"event_type":"x"}}"#, &t).unwrap();
        let v2: serde_json::Value = serde_json::from_str(&v2).unwrap();
        assert_eq!(v2["header"]["token"], "tok");
        assert!(v2.get("token").is_none());
        let v1 = with_token(r#"{"uuid":"u","type":"event_callback"}"#, &t).unwrap();
        let v1: serde_json::Value = serde_json::from_str(&v1).unwrap();
        assert_eq!(v1["token"], "tok");
        assert!(with_token("[]", &t).is_err());
    }

    #[test]
    fn app_ticket_ts_has_six_fraction_digits() {
        let t = Secret::new("x");
        let json = app_ticket_json("cli_a", &t, &t, 1_700_000_000_000_123, "u");
        assert!(json.contains("\"ts\":\"1700000000.000123\""), "{json}");
    }
}

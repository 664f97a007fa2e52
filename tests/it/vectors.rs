//! Every shared test vector (copied into fixtures/vectors/) through the real HTTP server.

use serde_json::Value;

use lark_ticketd::events::cipher::EventCipher;
use lark_ticketd::events::signature::{self, SignatureHeaders};

use crate::util::{app_toml, fixture_json, TestApp, APP_ID, KEY, TOKEN};

/// The shared vectors were generated on 2023-11-14: every signature timestamp in them is
/// 1700000000..=1700000010 and every generated event time 1700000000.123456. Their apps run on a
/// clock set to that moment, so the vectors pass through the real replay window (events.max_age)
/// instead of around it.
const VECTOR_TIME_MS: u64 = 1_700_000_010_000;

/// A test app whose clock is the vectors' time.
async fn vector_app(config: &str) -> TestApp {
    let clock = std::sync::Arc::new(lark_ticketd::clock::ManualClock::new(VECTOR_TIME_MS));
    TestApp::spawn_with_clock(config, clock).await
}

/// The error code and status DESIGN.md gives each error kind the vectors name.
fn expected_error(kind: &str) -> (u16, &'static str) {
    match kind {
        "bad_padding"
        | "base64_invalid"
        | "ciphertext_not_block_aligned"
        | "ciphertext_too_short"
        | "empty_encrypt"
        | "json_invalid"
        | "json_not_object"
        | "invalid_utf8" => (400, "bad_payload"),
        "signature_mismatch" | "missing_signature" => (401, "bad_signature"),
        "token_mismatch" | "token_missing" => (401, "bad_token"),
        // The vectors suggest 500; DESIGN.md says bad input never gets a 5xx.
        "encrypt_key_not_configured" => (400, "encrypt_key_not_configured"),
        other => panic!("no mapping for vector error {other}"),
    }
}

fn sign(key: &str, body: &[u8]) -> [(&'static str, String); 3] {
    let sig = signature::compute_hex("1700000000", "42", key, body);
    [
        ("X-Lark-Request-Timestamp", "1700000000".to_string()),
        ("X-Lark-Request-Nonce", "42".to_string()),
        ("X-Lark-Signature", sig),
    ]
}

fn as_refs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The token and app a decrypted plaintext names, so the server can be configured to accept it.
fn token_and_app(plaintext: &str) -> (String, String) {
    let v: Value = serde_json::from_str(plaintext).unwrap_or(Value::Null);
    let token = v["header"]["token"]
        .as_str()
        .or(v["token"].as_str())
        .unwrap_or(TOKEN);
    let app = v["header"]["app_id"]
        .as_str()
        .or(v["event"]["app_id"].as_str())
        .unwrap_or(APP_ID);
    (token.to_string(), app.to_string())
}

#[tokio::test]
async fn decrypt_vectors_through_http() {
    let vectors = fixture_json("vectors/decrypt.json");
    let vectors = vectors["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), 16);
    for v in vectors {
        let id = v["id"].as_str().unwrap();
        let key = v["encrypt_key"].as_str().unwrap();
        let plaintext = v["plaintext"].as_str().unwrap();
        // The library decrypts to exactly the expected plaintext.
        assert_eq!(
            EventCipher::new(key)
                .decrypt(v["encrypt"].as_str().unwrap())
                .unwrap(),
            plaintext,
            "{id}"
        );
        let (token, app_id) = token_and_app(plaintext);
        let app = vector_app(&app_toml(&app_id, Some(key), &token)).await;
        let body = v["body"].as_str().unwrap().as_bytes();
        let headers = sign(key, body);
        let reply = app.post("/events", body, &as_refs(&headers)).await;
        let parsed: Value = serde_json::from_str(plaintext).unwrap_or(Value::Null);
        if !v["is_json"].as_bool().unwrap() {
            assert_eq!((reply.status, reply.code()), (400, "bad_payload"), "{id}");
        } else if parsed["type"] == "url_verification" && parsed.get("schema").is_none() {
            assert_eq!(reply.status, 200, "{id}: {}", reply.text);
            assert_eq!(reply.json["challenge"], parsed["challenge"], "{id}");
        } else {
            assert_eq!(reply.status, 200, "{id}: {}", reply.text);
            assert_eq!(reply.json["msg"], "success", "{id}");
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn signature_vectors() {
    let vectors = fixture_json("vectors/signature.json");
    for v in vectors["vectors"].as_array().unwrap() {
        let id = v["id"].as_str().unwrap();
        let key = v["encrypt_key"].as_str().unwrap();
        let body = v["body"].as_str().unwrap();
        let headers = SignatureHeaders {
            timestamp: v["timestamp"].as_str().unwrap(),
            nonce: v["nonce"].as_str().unwrap(),
            signature: v["signature"].as_str().unwrap(),
        };
        assert!(signature::verify(&headers, key, body.as_bytes()), "{id}");
        assert_eq!(
            signature::compute_hex(headers.timestamp, headers.nonce, key, body.as_bytes()),
            headers.signature,
            "{id}"
        );

        // Through HTTP: configure the app the body is for, send the vector's exact headers.
        let outer: Value = serde_json::from_str(body).unwrap();
        let Some(encrypt) = outer["encrypt"].as_str() else {
            // The Go SDK's test input is a plaintext body: with an Encrypt Key set we require
            // encryption (protocol.md §8, our policy).
            let app = vector_app(&app_toml("cli_xxxxxxxx", Some(key), "v")).await;
            let reply = app.post("/events", body.as_bytes(), &[]).await;
            assert_eq!(
                (reply.status, reply.code()),
                (400, "encryption_required"),
                "{id}"
            );
            continue;
        };
        let plaintext = EventCipher::new(key).decrypt(encrypt).unwrap();
        let (token, app_id) = token_and_app(&plaintext);
        let app_config = app_toml(&app_id, Some(key), &token);
        let wire_headers = [
            ("X-Lark-Request-Timestamp", headers.timestamp),
            ("X-Lark-Request-Nonce", headers.nonce),
            ("X-Lark-Signature", headers.signature),
        ];
        let path = format!("/events/{app_id}");
        let app = vector_app(&app_config).await;
        let reply = app.post(&path, body.as_bytes(), &wire_headers).await;
        if headers.timestamp.bytes().all(|b| b.is_ascii_digit()) {
            assert_eq!(reply.status, 200, "{id}: {}", reply.text);
        } else {
            // The Java SDK's test input signs the literal "timestamp": a valid signature, but no
            // time to bound a replay by, so our policy refuses it (events module docs) ...
            assert_eq!((reply.status, reply.code()), (401, "stale_request"), "{id}");
            app.stop().await;
            // ... and with the window turned off (replaying captured traffic) it is accepted.
            let config = format!("[events]\nreject_stale = false\n{app_config}");
            let app = vector_app(&config).await;
            let reply = app.post(&path, body.as_bytes(), &wire_headers).await;
            assert_eq!(reply.status, 200, "{id}: {}", reply.text);
            app.stop().await;
            continue;
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn negative_vectors_through_http() {
    let vectors = fixture_json("vectors/negative.json");
    let vectors = vectors["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), 32);
    let mut bad_payload_bodies = Vec::new();
    for v in vectors {
        let id = v["id"].as_str().unwrap();
        let (status, code) = expected_error(v["expected"]["error"].as_str().unwrap());
        match v["stage"].as_str().unwrap() {
            "decrypt" => {
                let key = v["encrypt_key"].as_str().unwrap();
                let app = vector_app(&app_toml(APP_ID, Some(key), TOKEN)).await;
                let body = v["body"].as_str().unwrap().as_bytes();
                // Signed with the right key: the failure is decryption, nothing else.
                let headers = sign(key, body);
                let reply = app.post("/events", body, &as_refs(&headers)).await;
                assert_eq!((reply.status, reply.code()), (status, code), "{id} signed");
                bad_payload_bodies.push((id.to_string(), reply.text));
                // Unsigned (the challenge path) and on the app's own route: identical answer.
                for path in ["/events".to_string(), format!("/events/{APP_ID}")] {
                    let reply = app.post(&path, body, &[]).await;
                    assert_eq!((reply.status, reply.code()), (status, code), "{id} {path}");
                    bad_payload_bodies.push((id.to_string(), reply.text));
                }
                app.stop().await;
            }
            "signature" => {
                let key = v["encrypt_key"].as_str().unwrap();
                let app = vector_app(&app_toml(APP_ID, Some(key), TOKEN)).await;
                let body = v["body"].as_str().unwrap().as_bytes();
                let mut headers = vec![
                    ("X-Lark-Request-Timestamp", v["timestamp"].as_str().unwrap()),
                    ("X-Lark-Request-Nonce", v["nonce"].as_str().unwrap()),
                ];
                if let Some(sig) = v["signature"].as_str() {
                    headers.push(("X-Lark-Signature", sig));
                }
                let reply = app.post("/events", body, &headers).await;
                assert_eq!((reply.status, reply.code()), (status, code), "{id}");
                app.stop().await;
            }
            "token" => {
                let configured = v["configured_verification_token"].as_str().unwrap();
                let plaintext = v["plaintext"].as_str().unwrap();
                // Encrypted and correctly signed: only the token is wrong.
                let app = vector_app(&app_toml(APP_ID, Some(KEY), configured)).await;
                let blob = EventCipher::new(KEY).encrypt(plaintext.as_bytes(), [9; 16]);
                let body = serde_json::json!({ "encrypt": blob }).to_string();
                let headers = sign(KEY, body.as_bytes());
                let reply = app
                    .post("/events", body.as_bytes(), &as_refs(&headers))
                    .await;
                assert_eq!(
                    (reply.status, reply.code()),
                    (status, code),
                    "{id} encrypted"
                );
                app.stop().await;
                // In clear text, to an app without an Encrypt Key: same answer.
                let app = vector_app(&app_toml(APP_ID, None, configured)).await;
                let reply = app
                    .post(&format!("/events/{APP_ID}"), plaintext.as_bytes(), &[])
                    .await;
                assert_eq!((reply.status, reply.code()), (status, code), "{id} plain");
                app.stop().await;
            }
            other => panic!("unknown stage {other}"),
        }
    }
    // No padding oracle: every decryption failure answers byte-for-byte the same.
    let first = &bad_payload_bodies[0].1;
    for (id, body) in &bad_payload_bodies {
        assert_eq!(body, first, "{id} answers differently");
    }
}

#[tokio::test]
async fn request_vectors_through_http() {
    let vectors = fixture_json("vectors/requests.json");
    let vectors = vectors["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), 9);
    for v in vectors {
        let id = v["id"].as_str().unwrap();
        let config = &v["config"];
        let key = config["encrypt_key"].as_str().filter(|k| !k.is_empty());
        let app = vector_app(&app_toml(
            config["app_id"].as_str().unwrap(),
            key,
            config["verification_token"].as_str().unwrap(),
        ))
        .await;
        let request = &v["request"];
        let headers: Vec<(&str, &str)> = request["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
            .collect();
        let reply = app
            .post(
                request["path"].as_str().unwrap(),
                request["body"].as_str().unwrap().as_bytes(),
                &headers,
            )
            .await;
        let expected = &v["expected"];
        match expected["outcome"].as_str().unwrap() {
            "challenge" => {
                assert_eq!(reply.status, 200, "{id}");
                assert_eq!(reply.json, expected["response_json"], "{id}");
                let ct = reply.headers["content-type"].to_str().unwrap();
                assert!(ct.starts_with("application/json"), "{id}: {ct}");
            }
            "accept" => {
                assert_eq!(reply.status, 200, "{id}: {}", reply.text);
                let event = &expected["event"];
                let store = app.state.store();
                if event["type"] == "app_ticket" {
                    let stored = store.ticket(APP_ID).await.unwrap().expect(id);
                    assert_eq!(stored.ticket.expose(), event["app_ticket"], "{id}");
                    assert_eq!(stored.event_id, event["dedup_key"], "{id}");
                }
                if event["type"] == "app_open" {
                    let tenants = store.tenants(APP_ID).await.unwrap();
                    assert_eq!(tenants.len(), 1, "{id}");
                    assert_eq!(tenants[0].tenant_key, event["tenant_key"], "{id}");
                }
            }
            "reject" => {
                let (status, code) = expected_error(expected["error"].as_str().unwrap());
                assert_eq!((reply.status, reply.code()), (status, code), "{id}");
            }
            other => panic!("unknown outcome {other}"),
        }
        app.stop().await;
    }
}

//! Intake behaviour over HTTP: tickets, tenants, routing, limits.

use std::time::Duration;

use lark_ticketd::push::{self, Seal};
use lark_ticketd::secret::Secret;
use lark_ticketd::store::TenantState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{app_toml, TestApp, APP_ID, KEY, TOKEN};

/// Now, in microseconds: event times must be inside the replay window (events.max_age).
pub fn now_us() -> i64 {
    use lark_ticketd::clock::Clock;
    lark_ticketd::clock::SystemClock.now_ms() as i64 * 1000
}

/// `now_us()` as Feishu writes a schema 1.0 `ts`: seconds with a fraction.
fn ts_now(offset_s: i64) -> String {
    format!("{}.0", now_us() / 1_000_000 + offset_s)
}

/// A signed, encrypted app_ticket push for `app_id`.
pub fn ticket_push(
    app_id: &str,
    key: &str,
    token: &str,
    ticket: &str,
    ts_us: i64,
) -> push::PushRequest {
    let json = push::app_ticket_json(
        app_id,
        &Secret::new(ticket),
        &Secret::new(token),
        ts_us,
        &push::random_event_id(),
    );
    push::seal(
        &json,
        Seal {
            encrypt_key: Some(&Secret::new(key)),
            sign: true,
        },
    )
}

pub async fn send(app: &TestApp, path: &str, req: &push::PushRequest) -> crate::util::Reply {
    let headers: Vec<(&str, &str)> = req.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    app.post(path, &req.body, &headers).await
}

fn event_v1(event: serde_json::Value, ts: &str) -> String {
    serde_json::json!({
        "ts": ts,
        "uuid": push::random_event_id(),
        "token": TOKEN,
        "type": "event_callback",
        "event": event,
    })
    .to_string()
}

fn sealed(json: &str) -> push::PushRequest {
    push::seal(
        json,
        Seal {
            encrypt_key: Some(&Secret::new(KEY)),
            sign: true,
        },
    )
}

#[tokio::test]
async fn newest_ticket_wins_and_late_redelivery_is_acknowledged_but_ignored() {
    let app = TestApp::spawn(&app_toml(APP_ID, Some(KEY), TOKEN)).await;
    let path = format!("/events/{APP_ID}");
    let now = now_us();
    let newer = ticket_push(APP_ID, KEY, TOKEN, "tkt-secret-newer", now);
    let older = ticket_push(APP_ID, KEY, TOKEN, "tkt-secret-older", now - 1_000_000);
    assert_eq!(send(&app, &path, &newer).await.status, 200);
    let reply = send(&app, &path, &older).await;
    assert_eq!(reply.status, 200, "a late redelivery is still acknowledged");
    let stored = app.state.store().ticket(APP_ID).await.unwrap().unwrap();
    assert_eq!(stored.ticket.expose(), "tkt-secret-newer");
    assert_eq!(stored.pushes_seen, 2);
    assert_eq!(stored.event_time_us, now);
    app.stop().await;
}

#[tokio::test]
async fn ticket_for_another_app_is_refused() {
    let app = TestApp::spawn(&app_toml(APP_ID, Some(KEY), TOKEN)).await;
    let req = ticket_push("cli_someone_else", KEY, TOKEN, "tkt-secret-x", 1);
    let reply = send(&app, &format!("/events/{APP_ID}"), &req).await;
    assert_eq!((reply.status, reply.code()), (400, "app_mismatch"));
    assert!(app.state.store().ticket(APP_ID).await.unwrap().is_none());
    app.stop().await;
}

#[tokio::test]
async fn bare_events_routes_by_signature_among_several_apps() {
    let config = format!(
        "{}{}{}",
        app_toml("cli_one", Some("key-one"), "tok-one"),
        app_toml("cli_two", Some("key-two"), "tok-two"),
        app_toml("cli_plain", None, "tok-plain"),
    );
    let app = TestApp::spawn(&config).await;
    let req = ticket_push("cli_two", "key-two", "tok-two", "tkt-secret-two", now_us());
    assert_eq!(send(&app, "/events", &req).await.status, 200);
    // A plaintext push finds its app by Verification Token.
    let plain = push::app_ticket_json(
        "cli_plain",
        &Secret::new("tkt-secret-plain"),
        &Secret::new("tok-plain"),
        now_us(),
        "u",
    );
    assert_eq!(app.post("/events", plain.as_bytes(), &[]).await.status, 200);
    let store = app.state.store();
    assert_eq!(
        store
            .ticket("cli_two")
            .await
            .unwrap()
            .unwrap()
            .ticket
            .expose(),
        "tkt-secret-two"
    );
    assert_eq!(
        store
            .ticket("cli_plain")
            .await
            .unwrap()
            .unwrap()
            .ticket
            .expose(),
        "tkt-secret-plain"
    );
    assert!(store.ticket("cli_one").await.unwrap().is_none());
    // An encrypted challenge for app one, unsigned, is answered.
    let challenge = push::challenge_json("c-1", &Secret::new("tok-one"));
    let req = push::seal(
        &challenge,
        Seal {
            encrypt_key: Some(&Secret::new("key-one")),
            sign: false,
        },
    );
    let reply = send(&app, "/events", &req).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json, serde_json::json!({"challenge": "c-1"}));
    app.stop().await;
}

#[tokio::test]
async fn challenge_is_echoed_with_json_escaping() {
    let app = TestApp::spawn(&app_toml(APP_ID, None, TOKEN)).await;
    let tricky = "quote\" backslash\\ newline\n </script> 飞书";
    let body = push::challenge_json(tricky, &Secret::new(TOKEN));
    let reply = app.post("/events", body.as_bytes(), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json["challenge"], tricky);
    app.stop().await;
}

#[tokio::test]
async fn lifecycle_events_record_tenant_state() {
    let app = TestApp::spawn(&app_toml(APP_ID, Some(KEY), TOKEN)).await;
    let path = format!("/events/{APP_ID}");
    let events = [
        (
            serde_json::json!({"type": "app_open", "app_id": APP_ID, "tenant_key": "tenant-a",
                "installer": {"open_id": "ou_1"}}),
            ts_now(-4),
        ),
        (
            serde_json::json!({"type": "app_open", "app_id": APP_ID, "tenant_key": "tenant-b"}),
            ts_now(-3),
        ),
        (
            serde_json::json!({"type": "app_status_change", "app_id": APP_ID, "tenant_key": "tenant-b",
                "status": "stop_by_tenant"}),
            ts_now(-2),
        ),
        (
            serde_json::json!({"type": "app_uninstalled", "app_id": APP_ID, "tenant_key": "tenant-c"}),
            ts_now(-1),
        ),
        (
            serde_json::json!({"type": "order_paid", "app_id": APP_ID, "tenant_key": "tenant-a",
                "order_id": "order-1", "price_plan_type": "per_seat_per_year", "seats": 20,
                "buy_type": "buy", "pay_time": "1700000005", "order_pay_price": 10000}),
            ts_now(0),
        ),
    ];
    for (event, ts) in events {
        let reply = send(&app, &path, &sealed(&event_v1(event, &ts))).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let tenants = app.state.store().tenants(APP_ID).await.unwrap();
    let summary: Vec<(&str, TenantState)> = tenants
        .iter()
        .map(|t| (t.tenant_key.as_str(), t.state))
        .collect();
    assert_eq!(
        summary,
        [
            ("tenant-a", TenantState::Active),
            ("tenant-b", TenantState::Stopped),
            ("tenant-c", TenantState::Uninstalled),
        ]
    );
    let order = tenants[0].last_order.as_ref().unwrap();
    assert_eq!(order.order_id, "order-1");
    assert_eq!(order.seats, Some(20));
    assert_eq!(tenants[1].status.as_deref(), Some("stop_by_tenant"));
    app.stop().await;
}

#[tokio::test]
async fn other_authentic_events_are_acknowledged() {
    let app = TestApp::spawn(&app_toml(APP_ID, Some(KEY), TOKEN)).await;
    let v2 = serde_json::json!({
        "schema": "2.0",
        "header": {"event_id": "e1", "event_type": "im.message.receive_v1", "token": TOKEN,
                   "create_time": (now_us() / 1000).to_string(), "tenant_key": "t", "app_id": APP_ID},
        "event": {"message": {"content": "{\"text\":\"hi\"}"}},
    })
    .to_string();
    let reply = send(&app, "/events", &sealed(&v2)).await;
    assert_eq!(
        (reply.status, reply.json["msg"].as_str()),
        (200, Some("success"))
    );
    // The same v2 event naming another app is refused.
    let other = v2.replace(APP_ID, "cli_other");
    let reply = send(&app, "/events", &sealed(&other)).await;
    assert_eq!((reply.status, reply.code()), (400, "app_mismatch"));
    app.stop().await;
}

#[tokio::test]
async fn routing_errors_have_codes() {
    let app = TestApp::spawn(&app_toml(APP_ID, Some(KEY), TOKEN)).await;
    let reply = app.get("/events").await;
    assert_eq!((reply.status, reply.code()), (405, "method_not_allowed"));
    assert_eq!(reply.headers["allow"], "POST");
    let reply = app.get("/nope").await;
    assert_eq!((reply.status, reply.code()), (404, "not_found"));
    let req = ticket_push(APP_ID, KEY, TOKEN, "tkt-secret-u", 1);
    let reply = send(&app, "/events/cli_unknown", &req).await;
    assert_eq!((reply.status, reply.code()), (404, "unknown_app"));
    let reply = app.post("/events", b"not json", &[]).await;
    assert_eq!((reply.status, reply.code()), (400, "malformed_body"));
    let reply = app.post("/events", b"[1,2,3]", &[]).await;
    assert_eq!((reply.status, reply.code()), (400, "malformed_body"));
    // Too long to be a challenge and unsigned: refused without decrypting.
    let big = format!("{{\"encrypt\":\"{}\"}}", "A".repeat(8192));
    let reply = app.post("/events", big.as_bytes(), &[]).await;
    assert_eq!((reply.status, reply.code()), (401, "bad_signature"));
    assert_eq!(app.get("/healthz").await.status, 200);
    let ready = app.get("/readyz").await;
    assert_eq!(
        (ready.status, ready.json["status"].as_str()),
        (200, Some("ready"))
    );
    app.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_declared_or_chunked() {
    let config = format!(
        "[server]\nmax_body_bytes = \"4KiB\"\n{}",
        app_toml(APP_ID, Some(KEY), TOKEN)
    );
    let app = TestApp::spawn(&config).await;
    let big = vec![b' '; 5000];
    let reply = app.post("/events", &big, &[]).await;
    assert_eq!((reply.status, reply.code()), (413, "payload_too_large"));

    // Chunked, no Content-Length: the limit applies while reading.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 3000, " ".repeat(3000));
    let head = "POST /events HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(chunk.as_bytes()).await.unwrap();
    stream.write_all(chunk.as_bytes()).await.unwrap();
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("payload_too_large"), "{response}");
    app.stop().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let config = format!(
        "[server]\nheader_read_timeout = \"200ms\"\n{}",
        app_toml(APP_ID, Some(KEY), TOKEN)
    );
    let app = TestApp::spawn(&config).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"POST /events HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Never finish the head: the server must close the connection (read returns 0 or an error).
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("the server should have closed the connection");
    // hyper may answer 408 before closing, or reset; either way the connection ends.
    if let Ok(n) = read {
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn connection_limit_holds_back_extra_clients() {
    let config = format!(
        "[server]\nmax_connections = 1\n{}",
        app_toml(APP_ID, Some(KEY), TOKEN)
    );
    let app = TestApp::spawn(&config).await;
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut first = TcpStream::connect(app.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = [0u8; 512];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    // The first connection is kept alive; a second client is accepted by the kernel but not
    // served while the first holds the only permit.
    let mut second = TcpStream::connect(app.addr).await.unwrap();
    second.write_all(request).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(
        waiting.is_err(),
        "the second connection was served over the limit"
    );

    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
        .await
        .expect("served once the first closed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    app.stop().await;
}

#[tokio::test]
async fn storage_failure_is_a_503_and_loses_nothing_acknowledged() {
    let app = TestApp::spawn(&app_toml(APP_ID, Some(KEY), TOKEN)).await;
    let lark_ticketd::store::Store::Memory(memory) = app.state.store() else {
        panic!("the test app runs on the memory store")
    };
    let path = format!("/events/{APP_ID}");
    let first = ticket_push(APP_ID, KEY, TOKEN, "tkt-secret-kept", now_us() - 1_000_000);
    assert_eq!(send(&app, &path, &first).await.status, 200);

    memory.set_unavailable(true);
    let second = ticket_push(APP_ID, KEY, TOKEN, "tkt-secret-later", now_us());
    let reply = send(&app, &path, &second).await;
    assert_eq!((reply.status, reply.code()), (503, "store_unavailable"));
    assert!(reply.headers.contains_key("retry-after"));
    assert!(
        !reply.text.contains("memory store"),
        "5xx bodies stay generic: {}",
        reply.text
    );
    let ready = app.get("/readyz").await;
    assert_eq!((ready.status, ready.code()), (503, "store_unavailable"));
    assert_eq!(
        app.get("/healthz").await.status,
        200,
        "alive, just not ready"
    );

    // Feishu retries the same push: it lands.
    memory.set_unavailable(false);
    assert_eq!(send(&app, &path, &second).await.status, 200);
    let stored = app.state.store().ticket(APP_ID).await.unwrap().unwrap();
    assert_eq!(stored.ticket.expose(), "tkt-secret-later");
    app.stop().await;
}

//! The replay window and event times (issue 8, defects 4, 5 and 6): captured requests replayed
//! later, Feishu's retry ladder, far-future events, and a ticket whose request was dropped.

use std::sync::Arc;
use std::time::Duration;

use lark_ticketd::clock::{Clock, ManualClock};
use lark_ticketd::events::signature::SignatureHeaders;
use lark_ticketd::events::{self, Target};
use lark_ticketd::push::{self, PushRequest, Seal};
use lark_ticketd::secret::Secret;

use crate::intake::send;
use crate::util::{app_toml, toml_str, TestApp, APP_ID, KEY, TOKEN};

/// Our clock in these tests: 2027-01-15.
const NOW_MS: u64 = 1_800_000_000_000;
const HOUR: Duration = Duration::from_secs(3600);

fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(NOW_MS))
}

fn us(ms: u64) -> i64 {
    ms as i64 * 1000
}

fn ticket_json(ticket: &str, ts_us: i64) -> String {
    push::app_ticket_json(
        APP_ID,
        &Secret::new(ticket),
        &Secret::new(TOKEN),
        ts_us,
        &push::random_event_id(),
    )
}

/// Encrypted with the app's key, and signed.
fn sealed() -> Seal<'static> {
    static KEY_SECRET: std::sync::OnceLock<Secret> = std::sync::OnceLock::new();
    Seal {
        encrypt_key: Some(KEY_SECRET.get_or_init(|| Secret::new(KEY))),
        sign: true,
    }
}

/// Encrypted and signed as Feishu would at `signed_ms`.
fn signed_at(json: &str, signed_ms: u64) -> PushRequest {
    push::seal_at(json, sealed(), signed_ms)
}

/// Encrypted and signed with this exact `X-Lark-Request-Timestamp` value.
fn signed_with_timestamp(json: &str, timestamp: &str) -> PushRequest {
    push::seal_with(json, sealed(), [7; 16], timestamp, "nonce-1")
}

async fn encrypted_app(clock: &Arc<ManualClock>, extra: &str) -> TestApp {
    let config = format!("{extra}\n{}", app_toml(APP_ID, Some(KEY), TOKEN));
    TestApp::spawn_with_clock(&config, Arc::clone(clock) as _).await
}

/// The value of one series in `/metrics` (`name{labels}` exactly as exposed), 0 if absent.
async fn metric(app: &TestApp, series: &str) -> f64 {
    metric_sum(app, series, "").await
}

/// The sum of every series in `/metrics` that starts with `prefix` and contains `label`.
async fn metric_sum(app: &TestApp, prefix: &str, label: &str) -> f64 {
    let text = app.get("/metrics").await.text;
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn path() -> String {
    format!("/events/{APP_ID}")
}

#[tokio::test]
async fn stale_request_replayed_signed_push_is_refused_and_not_counted() {
    let clock = manual_clock();
    let app = encrypted_app(&clock, "").await;
    let captured = signed_at(&ticket_json("tkt-secret-captured", us(NOW_MS)), NOW_MS);
    assert_eq!(send(&app, &path(), &captured).await.status, 200);

    // Nine hours later (beyond Feishu's 7.1 h retry ladder) someone replays it.
    clock.advance(9 * HOUR);
    let reply = send(&app, &path(), &captured).await;
    assert_eq!((reply.status, reply.code()), (401, "stale_request"));

    // A request signed at `ts = 1`, with a fresh event time: still a replay.
    let ancient =
        signed_with_timestamp(&ticket_json("tkt-secret-ancient", us(clock.now_ms())), "1");
    let reply = send(&app, &path(), &ancient).await;
    assert_eq!((reply.status, reply.code()), (401, "stale_request"));

    let stored = app.state.store().ticket(APP_ID).await.unwrap().unwrap();
    assert_eq!(stored.ticket.expose(), "tkt-secret-captured");
    assert_eq!(stored.pushes_seen, 1, "replays are not pushes");
    let pushes = "lark_ticketd_ticket_pushes_total{";
    assert_eq!(metric_sum(&app, pushes, "stored=\"true\"").await, 1.0);
    assert_eq!(metric_sum(&app, pushes, "stored=\"false\"").await, 0.0);
    let stale = format!("lark_ticketd_stale_requests_total{{app_id=\"{APP_ID}\",reason=");
    assert_eq!(
        metric(&app, &format!("{stale}\"signature_old\"}}")).await,
        2.0
    );
    assert_eq!(
        metric(
            &app,
            "lark_ticketd_events_total{event_type=\"app_ticket\",outcome=\"stale_request\"}"
        )
        .await,
        2.0
    );
    app.stop().await;
}

#[tokio::test]
async fn stale_request_window_tolerates_the_retry_ladder_and_small_skew() {
    let clock = manual_clock();
    let app = encrypted_app(&clock, "").await;
    let now = clock.now_ms();
    // Feishu's last retry (15 s + 5 min + 1 h + 6 h) carrying the first attempt's timestamp
    // and, as always, the event's original time.
    let first_attempt = signed_at(&ticket_json("tkt-secret-retried", us(now)), now);
    clock.advance(Duration::from_secs(7 * 3600 + 5 * 60 + 15));
    let reply = send(&app, &path(), &first_attempt).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    let now = clock.now_ms();
    let cases = [
        // Feishu's clock a little ahead of ours.
        (
            signed_at(&ticket_json("tkt-secret-a", us(now)), now + 5 * 60_000),
            200,
            "",
        ),
        (
            signed_at(&ticket_json("tkt-secret-b", us(now)), now + 6 * 60_000),
            401,
            "stale_request",
        ),
        // A millisecond timestamp (the format is undocumented) reads as such.
        (
            signed_with_timestamp(&ticket_json("tkt-secret-c", us(now)), &now.to_string()),
            200,
            "",
        ),
        (
            signed_with_timestamp(
                &ticket_json("tkt-secret-d", us(now)),
                &format!("{}.250", now / 1000),
            ),
            200,
            "",
        ),
        // Validly signed, but no time we can read: refused, a window must be readable.
        (
            signed_with_timestamp(&ticket_json("tkt-secret-e", us(now)), "timestamp"),
            401,
            "stale_request",
        ),
    ];
    for (i, (req, status, code)) in cases.iter().enumerate() {
        let reply = send(&app, &path(), req).await;
        assert_eq!(
            (reply.status, reply.code()),
            (*status, *code),
            "case {i}: {}",
            reply.text
        );
    }
    let stale = format!("lark_ticketd_stale_requests_total{{app_id=\"{APP_ID}\",reason=");
    assert_eq!(
        metric(&app, &format!("{stale}\"signature_ahead\"}}")).await,
        1.0
    );
    assert_eq!(
        metric(&app, &format!("{stale}\"signature_unreadable\"}}")).await,
        1.0
    );
    app.stop().await;
}

#[tokio::test]
async fn stale_request_old_event_time_is_refused_without_an_encrypt_key() {
    let clock = manual_clock();
    let app =
        TestApp::spawn_with_clock(&app_toml(APP_ID, None, TOKEN), Arc::clone(&clock) as _).await;
    let order = |order_id: &str, ts_s: u64| {
        serde_json::json!({
            "ts": format!("{ts_s}.0"), "uuid": push::random_event_id(), "token": TOKEN,
            "type": "event_callback",
            "event": {"type": "order_paid", "app_id": APP_ID, "tenant_key": "tenant-a",
                      "order_id": order_id, "seats": 5},
        })
        .to_string()
    };
    let now_s = NOW_MS / 1000;
    let reply = app
        .post(&path(), order("order-new", now_s).as_bytes(), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    // A captured plaintext event from yesterday: nothing signs it, its own time bounds it.
    let replay = order("order-old", now_s - 24 * 3600);
    let reply = app.post(&path(), replay.as_bytes(), &[]).await;
    assert_eq!((reply.status, reply.code()), (401, "stale_request"));
    let tenants = app.state.store().tenants(APP_ID).await.unwrap();
    assert_eq!(
        tenants[0].last_order.as_ref().unwrap().order_id,
        "order-new"
    );

    // Schema 2.0: `header.create_time` in milliseconds.
    let v2 = |create_ms: u64| {
        serde_json::json!({
            "schema": "2.0",
            "header": {"event_id": push::random_event_id(), "event_type": "im.message.receive_v1",
                       "token": TOKEN, "create_time": create_ms.to_string(), "app_id": APP_ID},
            "event": {},
        })
        .to_string()
    };
    let reply = app.post(&path(), v2(NOW_MS - 60_000).as_bytes(), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let reply = app
        .post(&path(), v2(NOW_MS - 9 * 3_600_000).as_bytes(), &[])
        .await;
    assert_eq!((reply.status, reply.code()), (401, "stale_request"));
    let stale =
        format!("lark_ticketd_stale_requests_total{{app_id=\"{APP_ID}\",reason=\"event_old\"}}");
    assert_eq!(metric(&app, &stale).await, 2.0);
    app.stop().await;
}

#[tokio::test]
async fn stale_request_check_can_be_turned_off_to_replay_captured_traffic() {
    let clock = manual_clock();
    let app = encrypted_app(&clock, "[events]\nreject_stale = false\n").await;
    let old = signed_with_timestamp(&ticket_json("tkt-secret-captured", 1_000_000), "1");
    let reply = send(&app, &path(), &old).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn future_ticket_does_not_lock_out_real_pushes() {
    let clock = manual_clock();
    let app = encrypted_app(&clock, "").await;
    // Authentic, freshly signed, but stamped 2100-01-01 (a platform bug, or a key holder).
    let year_2100_us = 4_102_444_800_000_000;
    let future = signed_at(&ticket_json("tkt-secret-future", year_2100_us), NOW_MS);
    let reply = send(&app, &path(), &future).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let stored = app.state.store().ticket(APP_ID).await.unwrap().unwrap();
    assert_eq!(stored.ticket.expose(), "tkt-secret-future");
    assert_eq!(
        stored.event_time_us,
        us(NOW_MS + 5 * 60_000),
        "ordered at now + events.max_skew"
    );
    let capped = format!("lark_ticketd_event_times_capped_total{{app_id=\"{APP_ID}\"}}");
    assert_eq!(metric(&app, &capped).await, 1.0);

    // The next hourly push replaces it.
    clock.advance(HOUR);
    let now = clock.now_ms();
    let real = signed_at(&ticket_json("tkt-secret-real", us(now)), now);
    assert_eq!(send(&app, &path(), &real).await.status, 200);
    let stored = app.state.store().ticket(APP_ID).await.unwrap().unwrap();
    assert_eq!(stored.ticket.expose(), "tkt-secret-real");
    app.stop().await;
}

#[tokio::test]
async fn ticket_committed_by_a_dropped_request_still_wakes_waiters() {
    // The embedded store: its write completes on the writer thread whatever the caller does.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let config = format!(
        "[store]\nkind = \"embedded\"\npath = {}\n{}",
        toml_str(db.to_str().unwrap()),
        app_toml(APP_ID, Some(KEY), TOKEN)
    );
    let app = TestApp::spawn(&config).await;
    let state = &app.state.clone();
    // A token request waiting for the ticket waits on exactly this signal.
    let mut waiter = state.broker().ticket_watch(APP_ID).unwrap();

    let now_ms = lark_ticketd::clock::SystemClock.now_ms();
    let req = signed_at(&ticket_json("tkt-secret-orphan", us(now_ms)), now_ms);
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(h, _)| *h == name)
            .map(|(_, v)| v.as_str())
            .unwrap()
    };
    let headers = SignatureHeaders {
        timestamp: header(events::signature::TIMESTAMP_HEADER),
        nonce: header(events::signature::NONCE_HEADER),
        signature: header(events::signature::SIGNATURE_HEADER),
    };
    let verified = state
        .verifier()
        .verify(Target::App(APP_ID), Some(headers), &req.body)
        .unwrap();

    // The request's future runs until the write is under way, then hyper drops it (the client
    // disconnected).
    let mut accept = Box::pin(events::accept(state.intake(), verified));
    let finished = tokio::select! {
        biased;
        outcome = &mut accept => Some(outcome),
        () = std::future::ready(()) => None,
    };
    assert!(finished.is_none(), "the write should still be in flight");
    drop(accept);

    tokio::time::timeout(Duration::from_secs(10), waiter.changed())
        .await
        .expect("the waiter was never woken: the ticket was committed silently")
        .unwrap();
    let stored = state.store().ticket(APP_ID).await.unwrap().unwrap();
    assert_eq!(stored.ticket.expose(), "tkt-secret-orphan");
    app.stop().await;
}

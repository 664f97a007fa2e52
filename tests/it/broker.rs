//! Regression tests for the token broker's defects of issue 8 (3, 4, 5, 9, 10, 11), each named
//! after its defect; the real server and mock-feishu on port 0, time moved by hand.
//!
//! The fixes that are about the cache and its refresh hold for every kind of app: those tests run
//! for the store app and the custom app (`for_each_kind!`, issue 11). The ticket's (5, 11's
//! 10012) and the per-tenant bounds (9, 10) are the store app's alone.

use std::sync::Arc;
use std::time::Duration;

use lark_ticketd::clock::{Clock, ManualClock};
use lark_ticketd::mock_feishu::Endpoint;
use lark_ticketd::push::{self, Seal};
use lark_ticketd::secret::Secret;
use lark_ticketd::tokens::{BrokerEvent, TokenKey};

use crate::util::{eventually, Kind, Stack, StackOptions, APP_ID, BEARER, KEY, TOKEN};

for_each_kind!(
    defect_3_a_refresh_that_returns_the_same_token_keeps_the_throttle,
    defect_3_a_token_issued_inside_the_margin_is_fetched_once_for_all_waiters,
    defect_4_a_dropped_first_caller_does_not_cancel_the_shared_fetch,
    defect_11_feishus_error_answers_back_off_per_key,
    defect_11_a_5xx_with_a_feishu_code_keeps_the_code,
    defect_11_shutdown_stops_background_refreshes,
);

fn tenant_path(tenant: &str) -> String {
    format!("/v1/apps/{APP_ID}/tenants/{tenant}/tenant_access_token")
}

fn app_path() -> String {
    format!("/v1/apps/{APP_ID}/app_access_token")
}

fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_800_000_000_000))
}

/// GET with the orders key in a task of its own; answers (status, JSON body).
fn spawn_get(stack: &Stack, path: &str) -> tokio::task::JoinHandle<(u16, serde_json::Value)> {
    let client = stack.app.client.clone();
    let url = stack.app.url(path);
    tokio::spawn(async move {
        let r = client.get(&url).bearer_auth(BEARER).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    })
}

/// Report a token as rejected. Besides its own effect, it returns only once a fetch of the key
/// in flight has landed: a barrier for background refreshes.
async fn invalidate_bogus(stack: &Stack, path: &str) {
    let r = stack
        .post_json(
            &format!("{path}/invalidate"),
            serde_json::json!({"token": "t-not-a-token-we-were-given"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["invalidated"], false);
}

// ---- Defect 3: one upstream call per request when a refresh returns the same token ----------

async fn defect_3_a_refresh_that_returns_the_same_token_keeps_the_throttle(kind: Kind) {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "[tokens]\nrefresh_jitter = \"0s\"\n").await;
    let path = kind.tenant_path("t-boundary");
    let t1 = stack.get(&path).await.json["tenant_access_token"].clone();
    assert_eq!(stack.mock.calls(kind.tenant_endpoint()), 1);

    // Exactly 30:00 left: due for refresh, and Feishu still answers with the same token.
    clock.advance(Duration::from_secs(90 * 60));
    for _ in 0..5 {
        let r = stack.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["tenant_access_token"], t1);
        invalidate_bogus(&stack, &path).await;
    }
    assert_eq!(
        stack.mock.calls(kind.tenant_endpoint()),
        2,
        "one refresh (answered with the same token), then the throttle holds"
    );
    stack.stop().await;
}

async fn defect_3_a_token_issued_inside_the_margin_is_fetched_once_for_all_waiters(kind: Kind) {
    let clock = manual_clock();
    let stack = Stack::start(StackOptions {
        clock: Some(Arc::clone(&clock)),
        // Feishu answers `expire: 120`, inside the 3-minute margin.
        token_ttl: Some(Duration::from_secs(120)),
        ..Default::default()
    })
    .await;
    stack.wait_for_ticket(APP_ID).await;
    let path = kind.tenant_path("t-short");
    let callers: Vec<_> = (0..30).map(|_| spawn_get(&stack, &path)).collect();
    for c in callers {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["expire"], 120);
    }
    for _ in 0..3 {
        assert_eq!(stack.get(&path).await.status, 200);
    }
    assert_eq!(
        stack.mock.calls(kind.app_endpoint()),
        kind.app_calls_per_cold_tenant_token()
    );
    assert_eq!(
        stack.mock.calls(kind.tenant_endpoint()),
        1,
        "30 waiters and 3 later callers: one fetch"
    );
    stack.stop().await;
}

// ---- Defect 4: a disconnecting client cancels the shared fetch ------------------------------

async fn defect_4_a_dropped_first_caller_does_not_cancel_the_shared_fetch(kind: Kind) {
    let app_path = || kind.app_path();
    let stack = Stack::start(StackOptions::default()).await;
    stack.wait_for_ticket(APP_ID).await;
    stack.mock.set_latency(Duration::from_millis(1500));
    let first = spawn_get(&stack, &app_path());
    eventually("the first caller's fetch reaching Feishu", || {
        stack.mock.calls(kind.app_endpoint()) == 1
    })
    .await;
    // The first client gives up: its connection closes and hyper drops its request.
    first.abort();
    let _ = first.await;
    let others: Vec<_> = (0..5).map(|_| spawn_get(&stack, &app_path())).collect();
    let mut tokens = Vec::new();
    for c in others {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200, "{body}");
        tokens.push(body["app_access_token"].clone());
    }
    assert!(tokens.iter().all(|t| *t == tokens[0]));
    assert_eq!(
        stack.mock.calls(kind.app_endpoint()),
        1,
        "the abandoned fetch completed and served the others"
    );
    stack.stop().await;
}

// ---- Defect 5 (broker side): a refused ticket gives way to the next push --------------------

/// Push an authentic app_ticket the fake platform never issued, with event time `ts_us`.
async fn push_foreign_ticket(stack: &Stack, ts_us: i64) {
    let json = push::app_ticket_json(
        APP_ID,
        &Secret::new("tkt-secret-unknown-to-feishu"),
        &Secret::new(TOKEN),
        ts_us,
        &push::random_event_id(),
    );
    let key = Secret::new(KEY);
    // Signed at the event's time on the stack's hand-moved clock (the replay window).
    let request = push::seal_at(
        &json,
        Seal {
            encrypt_key: Some(&key),
            sign: true,
        },
        (ts_us / 1000) as u64,
    );
    let url = stack.app.url(&format!("/events/{APP_ID}"));
    let (status, body) = push::send(&stack.app.client, &url, &request).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn defect_5_a_ticket_feishu_refused_gives_way_to_the_next_push() {
    let clock = manual_clock();
    let stack = Stack::start(StackOptions {
        clock: Some(Arc::clone(&clock)),
        no_push_on_resend: true,
        config: "[tickets]\nresend_interval = \"1s\"\nresend_wait = \"10s\"\n".into(),
        ..Default::default()
    })
    .await;
    eventually("the start-up resends", || {
        stack.mock.calls(Endpoint::AppTicketResend) == 2
    })
    .await;
    // A ticket from ahead of our clock (10 s of skew) that Feishu does not know: 10012.
    push_foreign_ticket(&stack, (clock.now_ms() as i64 + 10_000) * 1000).await;
    clock.advance(Duration::from_secs(2)); // past the start-up resend's interval
    let caller = spawn_get(&stack, &app_path());
    eventually("the resend asked for after 10012", || {
        stack.mock.calls(Endpoint::AppTicketResend) == 3
    })
    .await;
    // The real push: its event time is older than the refused ticket's.
    assert_eq!(stack.mock.push_ticket(APP_ID).await.unwrap(), 200);
    let (status, body) = caller.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        stack.mock.calls(Endpoint::AppAccessToken),
        2,
        "10012, then success"
    );
    assert!(!stack.stored_ticket(APP_ID).await.rejected);
    stack.stop().await;
}

// ---- Defect 9: unbounded token cache and store ----------------------------------------------

#[tokio::test]
async fn defect_9_tenant_tokens_beyond_the_bound_are_dropped_least_recently_used_first() {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "[tokens]\nmax_tenant_tokens = 3\n").await;
    for i in 0..5 {
        assert_eq!(
            stack.get(&tenant_path(&format!("lru-{i}"))).await.status,
            200
        );
        clock.advance(Duration::from_secs(1));
    }
    let broker = stack.app.state.broker().clone();
    let cached = |t: &str| {
        broker
            .cached_expiry(&TokenKey::Tenant(APP_ID.into(), t.into()))
            .is_some()
    };
    assert_eq!(broker.cached_tenant_tokens(APP_ID), 3);
    assert_eq!(stack.mock.calls(Endpoint::TenantAccessToken), 5);
    // The most recent stay cached; the oldest were dropped.
    assert!(cached("lru-4") && cached("lru-3") && cached("lru-2"));
    assert!(!cached("lru-0") && !cached("lru-1"));
    assert_eq!(stack.get(&tenant_path("lru-4")).await.status, 200);
    assert_eq!(stack.mock.calls(Endpoint::TenantAccessToken), 5, "a hit");
    // A dropped one is served again on demand (from the store or from Feishu).
    assert_eq!(stack.get(&tenant_path("lru-0")).await.status, 200);
    assert!(cached("lru-0"));
    assert_eq!(broker.cached_tenant_tokens(APP_ID), 3);
    stack.stop().await;
}

#[tokio::test]
async fn defect_9_expired_tokens_leave_memory_and_the_store() {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "[tokens]\nrefresh_check_interval = \"20ms\"\n").await;
    for i in 0..3 {
        assert_eq!(
            stack.get(&tenant_path(&format!("gone-{i}"))).await.status,
            200
        );
    }
    let store = stack.app.state.store().clone();
    let key = TokenKey::Tenant(APP_ID.into(), "gone-0".into()).store_key();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.token(&key).await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the token was never written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Nobody asks for them again; three hours later they have expired.
    clock.advance(Duration::from_secs(3 * 3600));
    let broker = stack.app.state.broker().clone();
    eventually("expired tenant tokens evicted from memory", || {
        broker.cached_tenant_tokens(APP_ID) == 0
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.token(&key).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired token stayed in the store"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stack.stop().await;
}

// ---- Defect 10: background refresh has no concurrency limit ---------------------------------

#[tokio::test]
async fn defect_10_background_refreshes_are_bounded() {
    let clock = manual_clock();
    let stack = Stack::with_clock(
        &clock,
        "[tokens]\nrefresh_check_interval = \"20ms\"\nrefresh_concurrency = 2\nrefresh_jitter = \"0s\"\n",
    )
    .await;
    for i in 0..8 {
        assert_eq!(
            stack.get(&tenant_path(&format!("herd-{i}"))).await.status,
            200
        );
    }
    let before = stack.mock.calls(Endpoint::TenantAccessToken);
    stack.mock.set_latency(Duration::from_millis(100));
    stack.mock.reset_peak();
    // All nine tokens (8 tenants and the app) fall due at once.
    clock.advance(Duration::from_secs(95 * 60));
    eventually("every tenant token refreshed", || {
        stack.mock.calls(Endpoint::TenantAccessToken) == before + 8
    })
    .await;
    assert!(
        stack.mock.peak_concurrent_calls() <= 2,
        "{} refreshes at once",
        stack.mock.peak_concurrent_calls()
    );
    stack.stop().await;
}

// ---- Defect 11: the broker's smaller items --------------------------------------------------

#[tokio::test]
async fn defect_11_a_10012_inside_the_resend_interval_does_not_wait_in_vain() {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "[tickets]\nresend_wait = \"1h\"\n").await;
    let resends = stack.mock.calls(Endpoint::AppTicketResend);
    stack.mock.invalidate_tickets(APP_ID);
    // The start-up resend was just answered: no new one may be sent, none is pending.
    let r = stack.get(&app_path()).await;
    assert_eq!((r.status, r.code()), (503, "ticket_missing"), "{}", r.text);
    assert_eq!(stack.mock.calls(Endpoint::AppTicketResend), resends);
    stack.stop().await;
}

async fn defect_11_feishus_error_answers_back_off_per_key(kind: Kind) {
    let clock = manual_clock();
    let stack = Stack::start(StackOptions {
        clock: Some(Arc::clone(&clock)),
        wrong_secret: true,
        ..Default::default()
    })
    .await;
    kind.provide_ticket(&stack).await;
    for _ in 0..3 {
        let r = stack.get(&kind.app_path()).await;
        assert_eq!((r.status, r.code()), (502, "upstream_error"), "{}", r.text);
        assert_eq!(r.json["error"]["upstream"]["code"], 10015);
    }
    assert_eq!(
        stack.mock.calls(kind.app_endpoint()),
        1,
        "one answer, shared"
    );
    clock.advance(Duration::from_secs(6)); // past tokens.error_backoff
    let r = stack.get(&kind.app_path()).await;
    assert_eq!(r.status, 502);
    assert_eq!(stack.mock.calls(kind.app_endpoint()), 2);
    stack.stop().await;
}

#[tokio::test]
async fn a_newly_stored_ticket_clears_the_apps_remembered_failure() {
    // Issue 9's layering moved the ticket bookkeeping out of the broker; a stored ticket must
    // still make the broker forget the app's remembered answer (the new ticket may be the cure).
    let clock = manual_clock();
    let stack = Stack::start(StackOptions {
        clock: Some(Arc::clone(&clock)),
        wrong_secret: true,
        ..Default::default()
    })
    .await;
    assert_eq!(stack.mock.push_ticket(APP_ID).await.unwrap(), 200);
    for _ in 0..2 {
        let r = stack.get(&app_path()).await;
        assert_eq!((r.status, r.code()), (502, "upstream_error"), "{}", r.text);
    }
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 1, "remembered");
    // A new ticket, same clock: inside tokens.error_backoff, yet Feishu is asked again.
    assert_eq!(stack.mock.push_ticket(APP_ID).await.unwrap(), 200);
    let r = stack.get(&app_path()).await;
    assert_eq!((r.status, r.code()), (502, "upstream_error"), "{}", r.text);
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 2, "forgotten");
    // And the new answer is remembered again.
    assert_eq!(stack.get(&app_path()).await.status, 502);
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 2);
    stack.stop().await;
}

async fn defect_11_a_5xx_with_a_feishu_code_keeps_the_code(kind: Kind) {
    let stack = Stack::start(StackOptions {
        config: "[tokens]\nupstream_retries = 0\n".into(),
        ..Default::default()
    })
    .await;
    stack.wait_for_ticket(APP_ID).await;
    stack.mock.set_down(true);
    let r = stack.get(&kind.app_path()).await;
    assert_eq!((r.status, r.code()), (502, "upstream_error"), "{}", r.text);
    assert_eq!(r.json["error"]["upstream"]["code"], -1, "{}", r.text);
    assert_eq!(r.json["error"]["upstream"]["msg"], "service unavailable");
    stack.stop().await;
}

async fn defect_11_shutdown_stops_background_refreshes(kind: Kind) {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "[tokens]\nupstream_timeout = \"10s\"\n").await;
    let path = kind.tenant_path("t-shutdown");
    assert_eq!(stack.get(&path).await.status, 200);
    let mut events = stack.app.state.broker().subscribe();
    stack.mock.set_latency(Duration::from_secs(3));
    clock.advance(Duration::from_secs(95 * 60));
    let calls = stack.mock.calls(kind.tenant_endpoint());
    assert_eq!(
        stack.get(&path).await.status,
        200,
        "served; a refresh starts"
    );
    eventually("the background refresh reaching Feishu", || {
        stack.mock.calls(kind.tenant_endpoint()) == calls + 1
    })
    .await;
    stack.stop().await;
    // Once the broker is gone its event channel closes; a refresh that outlived the shutdown
    // would report first.
    let next = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Ok(BrokerEvent::Refreshed(key)) => return Some(key),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .expect("the broker outlived the shutdown");
    assert_eq!(next, None, "a refresh completed after the shutdown");
}

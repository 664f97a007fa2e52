//! The token broker end to end: the real server and mock-feishu, both on port 0.
//!
//! The cache, refresh and invalidation rules hold for every kind of app alike: those tests are
//! written once, `async fn(kind: Kind)`, and run for the store app and the custom app
//! (`for_each_kind!`, issue 11).

use std::sync::Arc;
use std::time::Duration;

use lark_ticketd::clock::ManualClock;
use lark_ticketd::mock_feishu::Endpoint;
use lark_ticketd::store::TicketSource;
use lark_ticketd::tokens::BrokerEvent;

use crate::util::{
    captured_logs, custom_app_toml, eventually, Kind, Reply, Stack, StackOptions, TestApp, APP_ID,
    BEARER, CUSTOM_APP_ID, SECOND_APP_BEARER, STATUS_BEARER,
};

const TENANT: &str = "2ed263bf32cf1651";

fn tenant_path(tenant: &str) -> String {
    format!("/v1/apps/{APP_ID}/tenants/{tenant}/tenant_access_token")
}

fn app_path() -> String {
    format!("/v1/apps/{APP_ID}/app_access_token")
}

/// A clock that starts at a realistic time.
fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_800_000_000_000))
}

/// Start a GET with the orders key for every path at once; each answers (status, JSON body).
fn spawn_gets(
    stack: &Stack,
    paths: Vec<String>,
) -> Vec<tokio::task::JoinHandle<(u16, serde_json::Value)>> {
    paths
        .into_iter()
        .map(|path| {
            let client = stack.app.client.clone();
            let url = stack.app.url(&path);
            tokio::spawn(async move {
                let r = client.get(&url).bearer_auth(BEARER).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or_default())
            })
        })
        .collect()
}

async fn await_event(
    events: &mut tokio::sync::broadcast::Receiver<BrokerEvent>,
    expected: BrokerEvent,
) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if events.recv().await.unwrap() == expected {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {expected:?}"));
}

#[tokio::test]
async fn five_hundred_cold_requests_make_one_call_per_endpoint() {
    let stack = Stack::start(StackOptions::default()).await;
    stack.wait_for_ticket(APP_ID).await;
    let ticket = stack.stored_ticket(APP_ID).await;
    assert_eq!(
        ticket.source,
        TicketSource::Resend,
        "the start-up resend's push"
    );

    let mut tokens = Vec::new();
    for call in spawn_gets(&stack, vec![tenant_path(TENANT); 500]) {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200);
        tokens.push(body["tenant_access_token"].as_str().unwrap().to_string());
    }
    assert!(
        tokens.iter().all(|t| *t == tokens[0]),
        "all callers get the same token"
    );
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 1);
    assert_eq!(stack.mock.calls(Endpoint::TenantAccessToken), 1);
    stack.stop().await;
}

#[tokio::test]
async fn token_api_answers_in_feishu_terms() {
    let stack = Stack::start(StackOptions::default()).await;
    stack.wait_for_ticket(APP_ID).await;
    let r = stack.get(&app_path()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["app_id"], APP_ID);
    assert!(r.json["app_access_token"]
        .as_str()
        .unwrap()
        .starts_with("a-"));
    // The wall clock moves between Feishu's answer and ours.
    assert!((7190..=7200).contains(&r.json["expire"].as_u64().unwrap()));
    assert!(r.json["expires_at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(r.headers["cache-control"], "no-store");
    let r = stack.get(&tenant_path(TENANT)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["tenant_key"], TENANT);
    assert!(r.json["tenant_access_token"]
        .as_str()
        .unwrap()
        .starts_with("t-"));
    stack.stop().await;
}

for_each_kind!(
    background_refresh_happens_before_expiry_without_making_callers_wait,
    the_sweep_refreshes_app_tokens_nobody_asks_for,
    compare_and_invalidate_drops_only_the_current_token,
    upstream_down_serves_the_still_valid_token_then_reports_the_failure,
    callers_queued_behind_a_failing_fetch_share_its_failure,
    a_failing_background_refresh_is_retried_once_per_interval_not_per_hit,
    restart_on_the_embedded_store_serves_tokens_without_upstream_calls,
    feishu_error_codes_reach_the_caller,
);

async fn background_refresh_happens_before_expiry_without_making_callers_wait(kind: Kind) {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "").await;
    let first = stack.get(&kind.tenant_path(TENANT)).await;
    let t1 = first.json["tenant_access_token"]
        .as_str()
        .unwrap()
        .to_string();

    // 91 minutes later, 29 remain: Feishu would now issue a new token.
    clock.advance(Duration::from_secs(91 * 60));
    let mut events = stack.app.state.broker().subscribe();
    let r = stack.get(&kind.tenant_path(TENANT)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json["tenant_access_token"], t1,
        "the caller got the still-valid token at once; the refresh runs behind it"
    );
    assert_eq!(r.json["expire"], 29 * 60);
    await_event(&mut events, BrokerEvent::Refreshed(kind.tenant_key(TENANT))).await;

    let r = stack.get(&kind.tenant_path(TENANT)).await;
    let t2 = r.json["tenant_access_token"].as_str().unwrap();
    assert_ne!(t2, t1, "the refreshed token is served");
    assert_eq!(r.json["expire"], 7200);
    assert_eq!(stack.mock.calls(kind.tenant_endpoint()), 2);
    stack.stop().await;
}

async fn the_sweep_refreshes_app_tokens_nobody_asks_for(kind: Kind) {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "[tokens]\nrefresh_check_interval = \"20ms\"\n").await;
    let a1 = stack.get(&kind.app_path()).await.json["app_access_token"].clone();
    let mut events = stack.app.state.broker().subscribe();
    clock.advance(Duration::from_secs(100 * 60));
    await_event(&mut events, BrokerEvent::Refreshed(kind.app_key())).await;
    assert_eq!(stack.mock.calls(kind.app_endpoint()), 2);
    let a2 = stack.get(&kind.app_path()).await.json["app_access_token"].clone();
    assert_ne!(a1, a2);
    assert_eq!(
        stack.mock.calls(kind.app_endpoint()),
        2,
        "served from the cache"
    );
    stack.stop().await;
}

async fn compare_and_invalidate_drops_only_the_current_token(kind: Kind) {
    let stack = Stack::start(StackOptions::default()).await;
    stack.wait_for_ticket(APP_ID).await;
    let tenant_path = |t: &str| kind.tenant_path(t);
    let t1 = stack.get(&tenant_path(TENANT)).await.json["tenant_access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let invalidate = format!("{}/invalidate", tenant_path(TENANT));

    // A stale report (some older token) changes nothing.
    let r = stack
        .post_json(
            &invalidate,
            serde_json::json!({"token": "t-some-older-token"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["invalidated"], false);
    assert_eq!(r.json["tenant_access_token"], t1);
    assert_eq!(stack.mock.calls(kind.tenant_endpoint()), 1);

    // Feishu revoked the current one: it is replaced with exactly one upstream call.
    stack.mock.revoke(&t1);
    let r = stack
        .post_json(&invalidate, serde_json::json!({"token": t1}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["invalidated"], true);
    let t2 = r.json["tenant_access_token"].as_str().unwrap().to_string();
    assert_ne!(t2, t1);
    assert_eq!(stack.mock.calls(kind.tenant_endpoint()), 2);
    // Reporting t1 again (a second replica's late report) keeps t2.
    let r = stack
        .post_json(&invalidate, serde_json::json!({"token": t1}))
        .await;
    assert_eq!(
        (
            r.json["invalidated"].clone(),
            r.json["tenant_access_token"].clone()
        ),
        (false.into(), t2.clone().into())
    );
    assert_eq!(stack.mock.calls(kind.tenant_endpoint()), 2);

    let r = stack
        .post_json(&invalidate, serde_json::json!({"nope": 1}))
        .await;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    stack.stop().await;
}

async fn upstream_down_serves_the_still_valid_token_then_reports_the_failure(kind: Kind) {
    let tenant_path = |t: &str| kind.tenant_path(t);
    let clock = manual_clock();
    let stack = Stack::with_clock(
        &clock,
        "[tokens]\nupstream_retries = 0\nupstream_timeout = \"300ms\"\n",
    )
    .await;
    let t1 = stack.get(&tenant_path(TENANT)).await.json["tenant_access_token"].clone();

    stack.mock.set_down(true);
    // Inside the 3-minute margin but not expired: a refresh is attempted, fails, t1 is served.
    clock.advance(Duration::from_secs(118 * 60));
    let r = stack.get(&tenant_path(TENANT)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["tenant_access_token"], t1);
    assert_eq!(r.json["expire"], 120);

    // Expired, upstream down: 502 with the code.
    clock.advance(Duration::from_secs(3 * 60));
    let r = stack.get(&tenant_path(TENANT)).await;
    assert_eq!((r.status, r.code()), (502, "upstream_error"), "{}", r.text);

    // Upstream slow: 504.
    stack.mock.set_down(false);
    stack.mock.set_latency(Duration::from_secs(2));
    let r = stack.get(&tenant_path("another-tenant")).await;
    assert_eq!(
        (r.status, r.code()),
        (504, "upstream_timeout"),
        "{}",
        r.text
    );
    stack.stop().await;
}

async fn feishu_error_codes_reach_the_caller(kind: Kind) {
    let stack = Stack::start(StackOptions {
        wrong_secret: true,
        ..Default::default()
    })
    .await;
    // The resend is refused (wrong secret), so push a ticket the way the platform would.
    kind.provide_ticket(&stack).await;
    let r = stack.get(&kind.app_path()).await;
    assert_eq!((r.status, r.code()), (502, "upstream_error"), "{}", r.text);
    assert_eq!(r.json["error"]["upstream"]["code"], 10015);
    assert_eq!(r.json["error"]["upstream"]["msg"], "app secret invalid");
    stack.stop().await;
}

#[tokio::test]
async fn missing_ticket_one_resend_and_the_push_wakes_waiting_callers() {
    let stack = Stack::start(StackOptions {
        no_push_on_resend: true,
        config: "[tickets]\nresend_wait = \"30s\"\n".into(),
        ..Default::default()
    })
    .await;
    let paths = (0..20)
        .map(|i| tenant_path(&format!("tenant-{}", i % 2)))
        .collect();
    let callers = spawn_gets(&stack, paths);
    let broker = stack.app.state.broker().clone();
    eventually("a caller waiting for the ticket", || {
        broker.ticket_waiters(APP_ID) > 0
    })
    .await;
    eventually("the start-up resends, one per app", || {
        stack.mock.calls(Endpoint::AppTicketResend) == 2
    })
    .await;
    let started = tokio::time::Instant::now();
    assert_eq!(stack.mock.push_ticket(APP_ID).await.unwrap(), 200);
    for c in callers {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken by the push, not by the 30 s wait"
    );
    assert_eq!(
        stack.mock.calls(Endpoint::AppTicketResend),
        2,
        "no resend per caller"
    );
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 1);
    assert_eq!(stack.mock.calls(Endpoint::TenantAccessToken), 2);
    stack.stop().await;
}

async fn callers_queued_behind_a_failing_fetch_share_its_failure(kind: Kind) {
    let stack = Stack::start(StackOptions {
        config: "[tokens]\nupstream_retries = 0\nupstream_timeout = \"5s\"\n".into(),
        ..Default::default()
    })
    .await;
    stack.wait_for_ticket(APP_ID).await;
    // Every auth call now fails after 300 ms: the callers below all arrive while the first fails.
    stack.mock.set_latency(Duration::from_millis(300));
    stack.mock.set_error_rate(1.0);
    for call in spawn_gets(&stack, vec![kind.app_path(); 10]) {
        assert_eq!(call.await.unwrap().0, 502);
    }
    assert_eq!(
        stack.mock.calls(kind.app_endpoint()),
        1,
        "one upstream attempt for the whole wave"
    );
    stack.stop().await;
}

async fn a_failing_background_refresh_is_retried_once_per_interval_not_per_hit(kind: Kind) {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "[tokens]\nupstream_retries = 0\n").await;
    let t1 = stack.get(&kind.tenant_path(TENANT)).await.json["tenant_access_token"].clone();
    stack.mock.set_down(true);
    clock.advance(Duration::from_secs(91 * 60));
    let before = stack.mock.calls(kind.tenant_endpoint());
    let mut events = stack.app.state.broker().subscribe();
    for _ in 0..5 {
        let r = stack.get(&kind.tenant_path(TENANT)).await;
        assert_eq!(
            r.json["tenant_access_token"], t1,
            "the valid token is still served"
        );
    }
    await_event(
        &mut events,
        BrokerEvent::RefreshFailed(kind.tenant_key(TENANT)),
    )
    .await;
    assert_eq!(stack.mock.calls(kind.tenant_endpoint()), before + 1);
    stack.stop().await;
}

#[tokio::test]
async fn no_push_means_503_ticket_missing_with_retry_after() {
    let stack = Stack::start(StackOptions {
        no_push_on_resend: true,
        config: "[tickets]\nresend_wait = \"200ms\"\n".into(),
        ..Default::default()
    })
    .await;
    let r = stack.get(&tenant_path(TENANT)).await;
    assert_eq!((r.status, r.code()), (503, "ticket_missing"), "{}", r.text);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 0);

    // Twenty callers at once wait one resend_wait together, not twenty in a row.
    let started = tokio::time::Instant::now();
    for call in spawn_gets(&stack, vec![tenant_path(TENANT); 20]) {
        assert_eq!(call.await.unwrap().0, 503);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "20 x 200 ms in a row would be 4 s: {:?}",
        started.elapsed()
    );
    stack.stop().await;
}

#[tokio::test]
async fn rejected_ticket_10012_resends_and_retries_once() {
    let clock = manual_clock();
    let stack = Stack::with_clock(&clock, "").await;
    stack.wait_for_ticket("cli_second").await;
    stack.mock.invalidate_tickets(APP_ID);
    clock.advance(Duration::from_secs(61)); // past the resend interval of the start-up resend
    let r = stack.get(&app_path()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        stack.mock.calls(Endpoint::AppAccessToken),
        2,
        "10012, then success"
    );
    assert_eq!(
        stack.mock.calls(Endpoint::AppTicketResend),
        3,
        "2 at start-up, 1 for 10012"
    );
    stack.stop().await;
}

#[tokio::test]
async fn rejected_app_token_on_the_tenant_call_is_replaced_once() {
    let stack = Stack::start(StackOptions::default()).await;
    stack.wait_for_ticket(APP_ID).await;
    let a1 = stack.get(&app_path()).await.json["app_access_token"]
        .as_str()
        .unwrap()
        .to_string();
    stack.mock.revoke(&a1);
    let r = stack.get(&tenant_path(TENANT)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 2);
    assert_eq!(
        stack.mock.calls(Endpoint::TenantAccessToken),
        2,
        "99991664, then success"
    );
    let a2 = stack.get(&app_path()).await.json["app_access_token"].clone();
    assert_ne!(a2, a1.as_str());
    stack.stop().await;
}

async fn restart_on_the_embedded_store_serves_tokens_without_upstream_calls(kind: Kind) {
    let tenant_path = |t: &str| kind.tenant_path(t);
    let app_path = || kind.app_path();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[store]\nkind = \"embedded\"\npath = {}\n",
        crate::util::toml_str(dir.path().join("s.db").to_str().unwrap())
    );
    let stack = Stack::start(StackOptions {
        config,
        ..Default::default()
    })
    .await;
    stack.wait_for_ticket(APP_ID).await;
    let t1 = stack.get(&tenant_path(TENANT)).await.json["tenant_access_token"].clone();
    let a1 = stack.get(&app_path()).await.json["app_access_token"].clone();
    let calls = |s: &Stack| Endpoint::ALL_TOKENS.map(|e| s.mock.calls(e));
    let before = calls(&stack);
    let stack = stack.restart().await;
    let r = stack.get(&tenant_path(TENANT)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["tenant_access_token"], t1);
    let r = stack.get(&app_path()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["app_access_token"], a1);
    assert_eq!(
        calls(&stack),
        before,
        "zero upstream calls after the restart"
    );
    stack.stop().await;
}

#[tokio::test]
async fn bearer_keys_scopes_and_apps_are_enforced() {
    let stack = Stack::start(StackOptions::default()).await;
    let r = stack.get_as(&app_path(), None).await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let r = stack.get_as(&app_path(), Some("not-a-key")).await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    let r = stack.get_as(&app_path(), Some(STATUS_BEARER)).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = stack.get_as(&app_path(), Some(SECOND_APP_BEARER)).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = stack.get("/v1/apps/cli_nobody/app_access_token").await;
    assert_eq!((r.status, r.code()), (404, "unknown_app"));
    let r = stack.get(&tenant_path("bad%20key")).await;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let r = stack.post_json(&app_path(), serde_json::json!({})).await;
    assert_eq!((r.status, r.code()), (405, "method_not_allowed"));
    stack.stop().await;
}

/// A fake Open Platform at the byte level: every connection gets `answer` (raw HTTP/1.1, then
/// the connection closes), or, with `None`, is held open and never answered. Counts connections.
struct RawPlatform {
    addr: std::net::SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawPlatform {
    async fn start(answer: Option<String>) -> RawPlatform {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match answer.clone() {
                    Some(answer) => {
                        tokio::spawn(async move {
                            // Whatever arrives first (a request head, a TLS ClientHello).
                            let mut buf = [0u8; 4096];
                            let _ = stream.read(&mut buf).await;
                            let _ = stream.write_all(answer.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        });
                    }
                    None => held.push(stream),
                }
            }
        });
        RawPlatform {
            addr,
            connections,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RawPlatform {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 answer with this status line and body.
fn http_answer(status_line: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status_line}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The service with only the custom app, its Open Platform at `base_url`, and these `[tokens]`.
async fn custom_app_at(base_url: &str, tokens: &str) -> TestApp {
    let config = format!(
        "[tokens]\n{tokens}\n{}[[clients]]\nname = \"orders\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\n\
         scopes = [\"tokens\", \"status\"]\n",
        custom_app_toml(CUSTOM_APP_ID, base_url),
        lark_ticketd::auth::key_sha256_hex(BEARER),
    );
    TestApp::spawn(&config).await
}

async fn get_with_key(app: &TestApp, path: &str) -> Reply {
    let r = app.client.get(app.url(path)).bearer_auth(BEARER).send();
    Reply::from(r.await.expect("request")).await
}

/// Issue 12: "error sending request" told nobody anything. Each way the Open Platform can fail
/// to answer is named — in the caller's error, in the status API's last failure, in the log —
/// and never with the URL.
#[tokio::test]
async fn issue_12_upstream_errors_name_their_cause() {
    let refused = {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        taken.local_addr().unwrap().port()
        // Dropped: nothing listens there any more.
    };
    let plain = RawPlatform::start(Some(http_answer("200 OK", "text/plain", "ok"))).await;
    let bad_gateway = RawPlatform::start(Some(http_answer(
        "502 Bad Gateway",
        "text/html",
        "<html><body>502 Bad Gateway</body></html>",
    )))
    .await;
    let silent = RawPlatform::start(None).await;
    let cases = [
        (
            format!("http://127.0.0.1:{refused}"),
            "10s",
            (502, "upstream_error"),
            "no usable answer from the Open Platform: connection refused",
        ),
        (
            "http://open.feishu.invalid".to_string(),
            "10s",
            (502, "upstream_error"),
            "no usable answer from the Open Platform: DNS lookup of the Open Platform's host failed",
        ),
        (
            // TLS spoken to a plain-HTTP server.
            format!("https://{}", plain.addr),
            "10s",
            (502, "upstream_error"),
            "no usable answer from the Open Platform: TLS handshake failed",
        ),
        (
            format!("http://{}", silent.addr),
            "500ms",
            (504, "upstream_timeout"),
            "the Open Platform did not answer in time: no answer within tokens.upstream_timeout (500ms)",
        ),
        (
            format!("http://{}", bad_gateway.addr),
            "10s",
            (502, "upstream_error"),
            "no usable answer from the Open Platform: HTTP 502 (Bad Gateway), with a body that is not JSON",
        ),
        (
            format!("http://{}", plain.addr),
            "10s",
            (502, "upstream_error"),
            "no usable answer from the Open Platform: HTTP 200 (OK), with a body that is not JSON",
        ),
    ];
    for (base_url, timeout, answer, cause) in cases {
        let tokens = format!("upstream_retries = 0\nupstream_timeout = \"{timeout}\"");
        let app = custom_app_at(&base_url, &tokens).await;
        let r = get_with_key(
            &app,
            &format!("/v1/apps/{CUSTOM_APP_ID}/tenant_access_token"),
        )
        .await;
        assert_eq!((r.status, r.code()), answer, "{base_url}: {}", r.text);
        let message = r.json["error"]["message"].as_str().unwrap().to_string();
        println!("{base_url}: {} {message}", r.status);
        assert!(message.starts_with(cause), "{base_url}: {message}");
        assert!(!message.contains("http"), "no URL: {message}");
        let s = get_with_key(&app, &format!("/v1/apps/{CUSTOM_APP_ID}")).await;
        let failure = &s.json["tokens"]["last_failure"];
        assert_eq!(failure["message"], message.as_str(), "{}", s.text);
        assert_eq!(failure["error"], answer.1);
        assert_eq!(failure["token"], "tenant");
        assert_eq!(s.json["tokens"]["consecutive_failures"], 1);
        assert!(captured_logs().contains(&message), "{base_url}: logged");
        app.stop().await;
    }
}

/// Issue 12: a token request has one deadline (`tokens.request_deadline`), not
/// `(retries + 1) × timeout`: against a platform that never answers, with 19 retries of a 300 ms
/// timeout (6 s and more), the caller has its `504` at the 1 s deadline, and the retries stop.
#[tokio::test]
async fn issue_12_a_token_request_ends_at_its_deadline_whatever_retries_remain() {
    const TOKENS: &str =
        "upstream_timeout = \"300ms\"\nupstream_retries = 19\nrequest_deadline = \"1s\"\n";
    let silent = RawPlatform::start(None).await;
    let app = custom_app_at(&format!("http://{}", silent.addr), TOKENS).await;
    let started = std::time::Instant::now();
    let r = get_with_key(
        &app,
        &format!("/v1/apps/{CUSTOM_APP_ID}/tenant_access_token"),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        (r.status, r.code()),
        (504, "upstream_timeout"),
        "{}",
        r.text
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}; (retries + 1) × timeout is 6 s"
    );
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline (tokens.request_deadline, 1s)"),
        "{}",
        r.text
    );
    // Three 300 ms attempts and their back-off fit in 1 s at the very most.
    let attempts = silent.connections();
    assert!((1..=3).contains(&attempts), "{attempts} attempts");
    app.stop().await;

    // A store app's cold tenant token needs the app token first: both share the deadline.
    let stack = Stack::start(StackOptions {
        config: format!("[tokens]\n{TOKENS}"),
        ..Default::default()
    })
    .await;
    stack.wait_for_ticket(APP_ID).await;
    stack.mock.set_latency(Duration::from_secs(10));
    let started = std::time::Instant::now();
    let r = stack.get(&tenant_path(TENANT)).await;
    let elapsed = started.elapsed();
    assert_eq!(
        (r.status, r.code()),
        (504, "upstream_timeout"),
        "{}",
        r.text
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    assert!((1..=3).contains(&stack.mock.calls(Endpoint::AppAccessToken)));
    assert_eq!(stack.mock.calls(Endpoint::TenantAccessToken), 0);
    stack.stop().await;
}

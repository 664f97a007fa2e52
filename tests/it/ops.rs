//! Operators: ticket states over time, the status API and CLI, metrics, the ops listener.

use std::sync::Arc;
use std::time::Duration;

use lark_ticketd::clock::{Clock, ManualClock};
use serde_json::Value;

use crate::util::{
    app_toml, assert_no_secrets, client, lark_ticketd, Child, Reply, Stack, StackOptions,
    TempConfig, ADMIN_BEARER, APP_ID, KEY, STATUS_BEARER, TOKEN,
};

fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_800_000_000_000))
}

/// A stack whose fake platform does not push on resend, so tickets arrive only when we say.
async fn quiet_stack(clock: &Arc<ManualClock>) -> Stack {
    Stack::start(StackOptions {
        clock: Some(Arc::clone(clock)),
        no_push_on_resend: true,
        ..Default::default()
    })
    .await
}

async fn push(stack: &Stack, app_id: &str) {
    assert_eq!(stack.mock.push_ticket(app_id).await.unwrap(), 200);
}

/// `POST /v1/apps/{APP_ID}/ticket/resend` with `bearer`.
async fn resend(stack: &Stack, bearer: &str) -> Reply {
    let path = format!("/v1/apps/{APP_ID}/ticket/resend");
    stack.post_json_as(&path, Value::Null, bearer).await
}

async fn app_status(stack: &Stack) -> Value {
    let r = stack
        .get_as(&format!("/v1/apps/{APP_ID}"), Some(STATUS_BEARER))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

#[tokio::test]
async fn ticket_state_goes_missing_fresh_stale_fresh() {
    let clock = manual_clock();
    let stack = quiet_stack(&clock).await;

    let s = app_status(&stack).await;
    assert_eq!(s["ticket"]["state"], "missing");
    assert_eq!(s["ticket"]["received_at"], Value::Null);
    // Readiness does not depend on the ticket: a new replica must get its first one.
    assert_eq!(stack.app.get("/readyz").await.status, 200);

    push(&stack, APP_ID).await;
    let s = app_status(&stack).await;
    assert_eq!(s["ticket"]["state"], "fresh");
    assert_eq!(s["ticket"]["age_seconds"], 0);
    assert_eq!(s["ticket"]["received_at"], 1_800_000_000);
    assert_eq!(s["ticket"]["pushes_seen"], 1);
    assert_eq!(s["ticket"]["stale_after_seconds"], 75 * 60);
    assert_eq!(s["ticket"]["fingerprint"].as_str().unwrap().len(), 8);

    clock.advance(Duration::from_secs(75 * 60 + 1));
    let s = app_status(&stack).await;
    assert_eq!(s["ticket"]["state"], "stale");
    assert_eq!(s["ticket"]["age_seconds"], 75 * 60 + 1);
    assert_eq!(stack.app.get("/readyz").await.status, 200);

    push(&stack, APP_ID).await;
    let s = app_status(&stack).await;
    assert_eq!(s["ticket"]["state"], "fresh");
    assert_eq!(s["ticket"]["pushes_seen"], 2);
    stack.stop().await;
}

#[tokio::test]
async fn status_api_reports_resends_tokens_and_tenants_but_never_a_secret() {
    let clock = manual_clock();
    let stack = quiet_stack(&clock).await;
    // The start-up resend was requested (the fake platform accepted it but did not push).
    let s = app_status(&stack).await;
    assert_eq!(s["last_resend"]["requested_at"], 1_800_000_000);
    assert_eq!(s["app_token"]["cached"], false);

    // An admin resend: the platform pushes now; the ticket arrives "via resend".
    let before = stack
        .mock
        .calls(lark_ticketd::mock_feishu::Endpoint::AppTicketResend);
    clock.advance(Duration::from_secs(61));
    let r = resend(&stack, ADMIN_BEARER).await;
    assert_eq!(
        (r.status, r.json["requested"].as_bool()),
        (202, Some(true)),
        "{}",
        r.text
    );
    crate::util::eventually("the resend call", || {
        stack
            .mock
            .calls(lark_ticketd::mock_feishu::Endpoint::AppTicketResend)
            == before + 1
    })
    .await;
    push(&stack, APP_ID).await;
    let s = app_status(&stack).await;
    assert_eq!(s["ticket"]["arrived_via"], "resend");
    assert_eq!(s["last_resend"]["outcome"]["state"], "accepted");
    assert_eq!(s["last_resend"]["awaiting_push"], false);
    // A second request inside the interval is not sent: 429 until the interval ends.
    let r = resend(&stack, ADMIN_BEARER).await;
    assert_eq!(
        (r.status, r.code()),
        (429, "resend_rate_limited"),
        "{}",
        r.text
    );
    // The status scope may not resend; the tokens scope may not read status.
    let r = resend(&stack, STATUS_BEARER).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = stack.get(&format!("/v1/apps/{APP_ID}")).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));

    // Tokens: cached state and seconds left, never the token.
    let token = stack
        .get(&format!(
            "/v1/apps/{APP_ID}/tenants/tenant-a/tenant_access_token"
        ))
        .await;
    let tenant_token = token.json["tenant_access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let s = app_status(&stack).await;
    assert_eq!(s["app_token"]["cached"], true);
    assert_eq!(s["app_token"]["expire"], 7200);
    assert_eq!(s["tenants"]["tokens_cached"], 1);

    // Tenants from lifecycle events.
    // Signed at the stack's (hand-moved) clock, as Feishu signs at its own time.
    let event = lark_ticketd::push::seal_at(
        &serde_json::json!({"uuid": "u1", "ts": "1800000000.0", "token": TOKEN, "type": "event_callback",
            "event": {"type": "app_open", "app_id": APP_ID, "tenant_key": "tenant-a"}})
        .to_string(),
        lark_ticketd::push::Seal {
            encrypt_key: Some(&lark_ticketd::secret::Secret::new(KEY)),
            sign: true,
        },
        clock.now_ms(),
    );
    let url = stack.app.url(&format!("/events/{APP_ID}"));
    let (status, _) = lark_ticketd::push::send(&client(), &url, &event)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let r = stack
        .get_as(&format!("/v1/apps/{APP_ID}/tenants"), Some(STATUS_BEARER))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let tenants = r.json["tenants"].as_array().unwrap();
    assert_eq!(tenants.len(), 1);
    assert_eq!(tenants[0]["tenant_key"], "tenant-a");
    assert_eq!(tenants[0]["state"], "active");
    assert_eq!(tenants[0]["last_event"], "app_open");
    assert_eq!(tenants[0]["token"]["cached"], true);
    let s = app_status(&stack).await;
    assert_eq!(
        (
            s["tenants"]["total"].as_u64(),
            s["tenants"]["active"].as_u64()
        ),
        (Some(1), Some(1))
    );

    let all = stack.get_as("/v1/apps", Some(STATUS_BEARER)).await;
    // The two store apps and the custom app.
    assert_eq!(all.json["apps"].as_array().unwrap().len(), 3);
    let ticket = stack.stored_ticket(APP_ID).await;
    for text in [&all.text, &r.text] {
        assert!(!text.contains(ticket.ticket.expose()));
        assert!(!text.contains(&tenant_token));
    }
    stack.stop().await;
}

/// Wait until the last resend request for `app_id` has its outcome; returns it.
async fn resend_outcome(stack: &Stack, app_id: &str) -> lark_ticketd::tickets::ResendOutcome {
    use lark_ticketd::tickets::ResendOutcome;
    let tickets = stack.app.state.tickets();
    crate::util::eventually("the resend's outcome", || {
        tickets
            .resend_status(app_id)
            .is_some_and(|s| s.outcome != ResendOutcome::Pending)
    })
    .await;
    tickets.resend_status(app_id).unwrap().outcome
}

/// Issue 12: a resend held back by `tickets.resend_interval` answers `429 resend_rate_limited`
/// with `Retry-After` (seconds until the interval ends), not `202 {"requested": false}`; a
/// resend that never reached Feishu does not use up the interval.
#[tokio::test]
async fn issue_12_a_held_back_resend_is_429_and_a_failed_one_does_not_use_up_the_interval() {
    use lark_ticketd::mock_feishu::Endpoint;
    use lark_ticketd::tickets::ResendOutcome;
    let clock = manual_clock();
    let stack = Stack::start(StackOptions {
        clock: Some(Arc::clone(&clock)),
        no_push_on_resend: true,
        config: "[tokens]\nupstream_retries = 0\n".into(),
        ..Default::default()
    })
    .await;
    // The start-up resend was accepted (the platform does not push): the interval runs.
    assert_eq!(
        resend_outcome(&stack, APP_ID).await,
        ResendOutcome::Accepted
    );
    let r = resend(&stack, ADMIN_BEARER).await;
    assert_eq!(
        (r.status, r.code()),
        (429, "resend_rate_limited"),
        "{}",
        r.text
    );
    assert_eq!(r.headers["retry-after"], "60", "{:?}", r.headers);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tickets.resend_interval (60s)"),
        "{}",
        r.text
    );
    clock.advance(Duration::from_secs(45));
    let r = resend(&stack, ADMIN_BEARER).await;
    assert_eq!(
        (r.status, r.headers["retry-after"].to_str().unwrap()),
        (429, "15")
    );
    clock.advance(Duration::from_secs(15));

    // Feishu unreachable (every auth call a 503): the request fails, and the next may go at once.
    stack.mock.set_down(true);
    let calls = stack.mock.calls(Endpoint::AppTicketResend);
    for attempt in 1..=2 {
        let r = resend(&stack, ADMIN_BEARER).await;
        assert_eq!(
            (r.status, r.json["requested"].as_bool()),
            (202, Some(true)),
            "attempt {attempt}: {}",
            r.text
        );
        assert!(matches!(
            resend_outcome(&stack, APP_ID).await,
            ResendOutcome::Failed { code: None, .. }
        ));
        assert_eq!(stack.mock.calls(Endpoint::AppTicketResend), calls + attempt);
    }
    // Reachable again: one that Feishu accepts uses the interval up.
    stack.mock.set_down(false);
    let r = resend(&stack, ADMIN_BEARER).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(
        resend_outcome(&stack, APP_ID).await,
        ResendOutcome::Accepted
    );
    let r = resend(&stack, ADMIN_BEARER).await;
    assert_eq!(
        (r.status, r.code()),
        (429, "resend_rate_limited"),
        "{}",
        r.text
    );
    assert_eq!(r.headers["retry-after"], "60");
    stack.stop().await;
}

/// Issue 12: `lark-ticketd status` exits 1 while Feishu fails every token request, though every
/// ticket is fresh; the status API names the failures and their cause; a success clears them.
#[tokio::test]
async fn issue_12_status_exits_1_while_token_fetches_fail() {
    let stack = Stack::start(StackOptions {
        config: "[tokens]\nupstream_retries = 0\n".into(),
        ..Default::default()
    })
    .await;
    stack.wait_for_ticket(APP_ID).await;
    stack.wait_for_ticket("cli_second").await;
    let url = stack.app.url("");
    assert_eq!(
        status_cli(url.clone(), Some(STATUS_BEARER), false).await.0,
        0
    );

    stack.mock.set_down(true);
    for _ in 0..2 {
        let r = stack
            .get(&format!("/v1/apps/{APP_ID}/app_access_token"))
            .await;
        assert_eq!((r.status, r.code()), (502, "upstream_error"), "{}", r.text);
    }
    let s = app_status(&stack).await;
    assert_eq!(s["ticket"]["state"], "fresh");
    assert_eq!(s["tokens"]["consecutive_failures"], 2, "{s}");
    assert_eq!(s["tokens"]["last_success_at"], Value::Null);
    let failure = &s["tokens"]["last_failure"];
    assert_eq!(failure["token"], "app");
    assert_eq!(failure["error"], "upstream_error");
    assert_eq!(failure["upstream_code"], -1);
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("service unavailable"),
        "{failure}"
    );
    let (code, stdout) = status_cli(url.clone(), Some(STATUS_BEARER), false).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("FAILING (2 in a row)"), "{stdout}");
    assert!(stdout.contains("TOKEN FETCHES FAILING"), "{stdout}");
    let (code, stdout) = status_cli(url.clone(), Some(STATUS_BEARER), true).await;
    assert_eq!(code, 1, "{stdout}");

    // Feishu is back: the next fetch succeeds and the app is healthy again.
    stack.mock.set_down(false);
    let r = stack
        .get(&format!("/v1/apps/{APP_ID}/app_access_token"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let s = app_status(&stack).await;
    assert_eq!(s["tokens"]["consecutive_failures"], 0, "{s}");
    assert!(s["tokens"]["last_success_at"].as_u64().is_some(), "{s}");
    assert_eq!(
        s["tokens"]["last_failure"]["token"], "app",
        "kept for the record"
    );
    assert_eq!(status_cli(url, Some(STATUS_BEARER), false).await.0, 0);
    stack.stop().await;
}

/// Run `lark-ticketd status` against `url`; returns (exit code, stdout).
pub async fn status_cli(url: String, key: Option<&'static str>, json: bool) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let mut cmd = lark_ticketd();
        cmd.args([
            "status",
            "--url",
            &url,
            "--api-key-env",
            "LARK_TICKETD_TEST_KEY",
        ]);
        if json {
            cmd.arg("--json");
        }
        cmd.env_remove("LARK_TICKETD_TEST_KEY");
        if let Some(key) = key {
            cmd.env("LARK_TICKETD_TEST_KEY", key);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn status_cli_exit_codes_and_json() {
    let clock = manual_clock();
    let stack = quiet_stack(&clock).await;
    let url = format!("http://{}", stack.app.addr);

    let (code, out) = status_cli(url.clone(), Some(STATUS_BEARER), false).await;
    assert_eq!(code, 2, "missing tickets: {out}");
    assert!(out.contains("missing"), "{out}");

    push(&stack, APP_ID).await;
    push(&stack, "cli_second").await;
    let (code, out) = status_cli(url.clone(), Some(STATUS_BEARER), false).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("APP "), "{out}");
    assert!(
        out.contains(APP_ID) && out.contains("cli_second") && out.contains("fresh"),
        "{out}"
    );
    assert!(!out.contains('\x1b'), "no colour when not on a terminal");

    clock.advance(Duration::from_secs(80 * 60));
    let (code, out) = status_cli(url.clone(), Some(STATUS_BEARER), true).await;
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["apps"][0]["ticket"]["state"], "stale");
    assert_eq!(v["apps"][0]["ticket"]["age_seconds"], 80 * 60);

    let (code, _) = status_cli(url.clone(), None, false).await;
    assert_eq!(code, 2, "no key: 401");
    let (code, out) = status_cli("http://127.0.0.1:1".into(), Some(STATUS_BEARER), true).await;
    assert_eq!(code, 2, "unreachable");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["reachable"],
        false
    );
    stack.stop().await;
}

fn sample<'a>(
    scrape: &'a prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a prometheus_parse::Value> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| &s.value)
}

fn number(v: Option<&prometheus_parse::Value>) -> f64 {
    match v {
        Some(prometheus_parse::Value::Counter(n))
        | Some(prometheus_parse::Value::Gauge(n))
        | Some(prometheus_parse::Value::Untyped(n)) => *n,
        other => panic!("not a number: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_hold_no_secret() {
    let stack = Stack::start(StackOptions::default()).await;
    stack.wait_for_ticket(APP_ID).await;
    stack
        .get(&format!("/v1/apps/{APP_ID}/tenants/t1/tenant_access_token"))
        .await;
    stack
        .get(&format!("/v1/apps/{APP_ID}/tenants/t1/tenant_access_token"))
        .await;
    stack
        .app
        .post(&format!("/events/{APP_ID}"), b"{}", &[])
        .await;
    let r = stack.app.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let lines = r.text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");

    let accepted = number(sample(
        &scrape,
        "lark_ticketd_events_total",
        &[("event_type", "app_ticket"), ("outcome", "accepted")],
    ));
    assert!(accepted >= 1.0);
    let rejected = number(sample(
        &scrape,
        "lark_ticketd_events_total",
        &[("outcome", "encryption_required")],
    ));
    assert_eq!(rejected, 1.0);
    assert_eq!(
        number(sample(
            &scrape,
            "lark_ticketd_token_requests_total",
            &[("kind", "tenant"), ("outcome", "hit")]
        )),
        1.0
    );
    assert_eq!(
        number(sample(
            &scrape,
            "lark_ticketd_token_requests_total",
            &[("kind", "tenant"), ("outcome", "refreshed")]
        )),
        1.0
    );
    assert_eq!(
        number(sample(
            &scrape,
            "lark_ticketd_upstream_calls_total",
            &[("endpoint", "app_access_token"), ("code", "0")]
        )),
        1.0
    );
    assert_eq!(
        number(sample(
            &scrape,
            "lark_ticketd_ticket_state",
            &[("app_id", APP_ID), ("state", "fresh")]
        )),
        1.0
    );
    let age = number(sample(
        &scrape,
        "lark_ticketd_ticket_age_seconds",
        &[("app_id", APP_ID)],
    ));
    assert!((0.0..60.0).contains(&age));
    assert!(
        number(sample(
            &scrape,
            "lark_ticketd_ticket_resends_total",
            &[("app_id", APP_ID), ("outcome", "accepted")]
        )) >= 1.0
    );
    assert!(number(sample(&scrape, "lark_ticketd_open_connections", &[])) >= 1.0);
    assert!(r
        .text
        .contains("lark_ticketd_intake_duration_seconds_bucket"));
    assert!(r
        .text
        .contains("lark_ticketd_upstream_call_duration_seconds_bucket"));
    assert_no_secrets(&r.text, "/metrics");
    stack.stop().await;
}

#[tokio::test]
async fn api_listen_takes_the_apis_off_the_public_listener() {
    let config = TempConfig::embedded(&format!(
        "api_listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\n{}\
         [[clients]]\nname = \"dash\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"status\"]\n",
        app_toml(APP_ID, Some(KEY), TOKEN),
        lark_ticketd::auth::key_sha256_hex(STATUS_BEARER),
    ));
    top_level_first(&config.path);
    let server = Child::serve(&config.path);
    let (ops, api) = (server.ops_addr().unwrap(), server.api_addr().unwrap());
    let http = client();
    let get = |url: String| {
        let http = http.clone();
        async move {
            Reply::from(
                http.get(url)
                    .bearer_auth(STATUS_BEARER)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let public = |path: &str| server.url(path);
    // The public listener: events and health checks only.
    assert_eq!(get(public("/v1/apps")).await.status, 404);
    assert_eq!(get(public(&format!("/v1/apps/{APP_ID}"))).await.status, 404);
    assert_eq!(get(public("/v1/consumers")).await.status, 404);
    assert_eq!(get(public("/metrics")).await.status, 404);
    assert_eq!(get(public("/healthz")).await.status, 200);
    let events = http
        .post(public("/events"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_ne!(events.status(), 404, "intake stays on the public listener");
    // The internal API listener: the APIs and health checks, not intake.
    assert_eq!(get(format!("http://{api}/v1/apps")).await.status, 200);
    assert_eq!(get(format!("http://{api}/v1/consumers")).await.status, 200);
    assert_eq!(get(format!("http://{api}/healthz")).await.status, 200);
    assert_eq!(get(format!("http://{api}/readyz")).await.status, 200);
    assert_eq!(get(format!("http://{api}/metrics")).await.status, 404);
    let events = http
        .post(format!("http://{api}/events"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 404);
    // The ops listener: metrics, status page, health.
    assert_eq!(get(format!("http://{ops}/metrics")).await.status, 200);
    assert_eq!(get(format!("http://{ops}/")).await.status, 200);
    assert_eq!(get(format!("http://{ops}/v1/apps")).await.status, 404);
    server.kill();
}

/// Top-level keys (`listen`, `ops_listen`, `api_listen`) must come before the tables.
fn top_level_first(path: &std::path::Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let (top, rest): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| {
        l.starts_with("listen") || l.starts_with("ops_listen") || l.starts_with("api_listen")
    });
    std::fs::write(path, format!("{}\n{}\n", top.join("\n"), rest.join("\n"))).unwrap();
}

#[tokio::test]
async fn ops_listener_serves_metrics_and_health_only() {
    let config = TempConfig::embedded(&format!(
        "ops_listen = \"127.0.0.1:0\"\n{}",
        app_toml(APP_ID, Some(KEY), TOKEN)
    ));
    top_level_first(&config.path);
    let server = Child::serve(&config.path);
    let ops = server
        .ops_addr()
        .expect("ops listener address in the start-up log");
    let http = client();
    let get = |url: String| {
        let http = http.clone();
        async move { Reply::from(http.get(url).send().await.unwrap()).await }
    };
    assert_eq!(get(format!("http://{ops}/metrics")).await.status, 200);
    assert_eq!(get(format!("http://{ops}/healthz")).await.status, 200);
    assert_eq!(get(format!("http://{ops}/readyz")).await.status, 200);
    assert_eq!(get(format!("http://{ops}/v1/apps")).await.status, 404);
    // The status page sits beside the metrics.
    assert_eq!(get(format!("http://{ops}/")).await.status, 200);
    assert_eq!(get(server.url("/")).await.status, 404);
    assert_eq!(get(server.url("/metrics")).await.status, 404);
    assert_eq!(get(server.url("/healthz")).await.status, 200);
    server.kill();
}

#[tokio::test]
async fn metrics_label_injection_and_series_growth_from_authentic_event_types() {
    let app = crate::util::TestApp::spawn(&app_toml(APP_ID, Some(KEY), TOKEN)).await;
    let v2 = |event_type: &str| {
        let json = serde_json::json!({
            "schema": "2.0",
            "header": {"event_id": lark_ticketd::push::random_event_id(), "event_type": event_type,
                       "token": TOKEN, "create_time": (crate::intake::now_us() / 1000).to_string(),
                       "app_id": APP_ID},
            "event": {},
        })
        .to_string();
        lark_ticketd::push::seal(
            &json,
            lark_ticketd::push::Seal {
                encrypt_key: Some(&lark_ticketd::secret::Secret::new(KEY)),
                sign: true,
            },
        )
    };
    let path = format!("/events/{APP_ID}");
    // Authentic (signed with the app's key), with a type built to break the exposition.
    let hostile = "x\"} 1\n# EOF\nlark_ticketd_forged_total{a=\"b\"} 1\nlark_ticketd_events_total{event_type=\"y";
    let reply = crate::intake::send(&app, &path, &v2(hostile)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    // Many distinct types: one series between them.
    for i in 0..500 {
        let reply = crate::intake::send(&app, &path, &v2(&format!("custom.type_{i}_v1"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let reply = crate::intake::send(&app, &path, &v2("im.message.receive_v1")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    let r = app.get("/metrics").await;
    assert_eq!(r.text.matches("# EOF").count(), 1, "{}", r.text);
    assert!(r.text.ends_with("# EOF\n"));
    assert!(!r.text.contains("forged"), "{}", r.text);
    let lines = r.text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let series: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "lark_ticketd_events_total")
        .collect();
    assert_eq!(series.len(), 2, "other + im.message.receive_v1: {series:?}");
    assert_eq!(
        number(sample(
            &scrape,
            "lark_ticketd_events_total",
            &[("event_type", "other"), ("outcome", "accepted")]
        )),
        501.0
    );
    app.stop().await;
}

#[tokio::test]
async fn log_back_pressure_never_stalls_requests() {
    use std::io::BufRead;
    let config = TempConfig::embedded(&app_toml(APP_ID, Some(KEY), TOKEN));
    // The real binary, its stderr a pipe that nobody reads after start-up: a stalled log
    // collector. Once the pipe (64 KiB) is full, every write to stderr blocks.
    let mut child = lark_ticketd()
        .args(["serve", "--config"])
        .arg(&config.path)
        .env("LARK_TICKETD_LOG", "trace")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    // Blocking reads, before anything else runs on this test's runtime.
    let addr: std::net::SocketAddr = loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "exited early");
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["message"] == "lark-ticketd serving" {
            break v["listen"].as_str().unwrap().parse().unwrap();
        }
    };
    // ~250 bytes of log per request: 3,000 requests are ten times what the pipe holds.
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for i in 0..3000 {
        let r = http.get(format!("http://{addr}/healthz")).send().await;
        let status = r.map(|r| r.status().as_u16());
        assert!(
            matches!(status, Ok(200)),
            "request {i} was not answered while the log output was stalled: {status:?}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(stderr);
}

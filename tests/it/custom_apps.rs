//! Self-built ("custom") apps next to app-store apps (issue 11, DESIGN.md → *Every kind of Feishu
//! app*): the real server on port 0 and mock-feishu, with every [`Stack`]'s config — two store
//! apps and the custom app [`CUSTOM_APP_ID`], which has no ticket and no event keys.
//!
//! The cache, refresh and invalidation rules the two kinds share are asserted by the same tests
//! for both kinds in `tokens.rs` and `broker.rs` (`for_each_kind!`); this module holds what is
//! the custom app's own: where its tokens come from, one call for many cold callers, no ticket
//! and no resend ever, its status, and the paths that belong to the other kind.

use std::sync::Arc;

use lark_ticketd::clock::ManualClock;
use lark_ticketd::mock_feishu::{own_tenant_key, Endpoint, TENANT_QUERY_PATH};
use lark_ticketd::tokens::TokenKey;

use crate::util::{
    app_toml, client, custom_app_toml, Stack, StackOptions, TestApp, ADMIN_BEARER, APP_ID, BEARER,
    CUSTOM_APP_ID, KEY, NO_UPSTREAM, STATUS_BEARER, TOKEN,
};

fn custom_tenant_path() -> String {
    format!("/v1/apps/{CUSTOM_APP_ID}/tenant_access_token")
}

#[tokio::test]
async fn a_store_app_and_a_custom_app_both_serve_app_tokens() {
    let stack = Stack::start(StackOptions::default()).await;
    stack.wait_for_ticket(APP_ID).await;
    let store = stack
        .get(&format!("/v1/apps/{APP_ID}/app_access_token"))
        .await;
    assert_eq!(store.status, 200, "{}", store.text);
    let custom = stack
        .get(&format!("/v1/apps/{CUSTOM_APP_ID}/app_access_token"))
        .await;
    assert_eq!(custom.status, 200, "{}", custom.text);
    assert_eq!(custom.json["app_id"], CUSTOM_APP_ID);
    assert!(custom.json["app_access_token"]
        .as_str()
        .unwrap()
        .starts_with("a-"));
    assert!((7190..=7200).contains(&custom.json["expire"].as_u64().unwrap()));
    assert_ne!(
        store.json["app_access_token"],
        custom.json["app_access_token"]
    );
    // Each from its own kind's endpoint.
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 1);
    assert_eq!(stack.mock.calls(Endpoint::AppAccessTokenInternal), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cold_callers_of_the_custom_tenant_token_make_one_upstream_call() {
    let stack = Stack::start(StackOptions::default()).await;
    // A little upstream latency, so the callers overlap the one fetch.
    stack.mock.set_latency(std::time::Duration::from_millis(50));
    let callers: Vec<_> = (0..200)
        .map(|_| {
            let request = stack
                .app
                .client
                .get(stack.app.url(&custom_tenant_path()))
                .bearer_auth(BEARER);
            tokio::spawn(async move {
                let r = request.send().await.unwrap();
                (
                    r.status().as_u16(),
                    r.json::<serde_json::Value>().await.unwrap(),
                )
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for caller in callers {
        let (status, body) = caller.await.unwrap();
        assert_eq!(status, 200, "{body}");
        // DESIGN.md's shape: no tenant_key (the app's own tenant).
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["app_id", "expire", "expires_at", "tenant_access_token"]
        );
        tokens.push(body["tenant_access_token"].as_str().unwrap().to_string());
    }
    assert!(tokens.iter().all(|t| *t == tokens[0]), "one token for all");
    assert_eq!(stack.mock.calls(Endpoint::TenantAccessTokenInternal), 1);
    // The internal endpoint needs no app token and no ticket.
    assert_eq!(stack.mock.calls(Endpoint::AppAccessTokenInternal), 0);
    assert_eq!(stack.mock.calls(Endpoint::AppAccessToken), 0);
    assert_eq!(stack.mock.calls(Endpoint::TenantAccessToken), 0);

    // It is the token of the app's own tenant, and it works against the platform.
    let check = client()
        .get(format!("{}{TENANT_QUERY_PATH}", stack.mock.base_url()))
        .bearer_auth(&tokens[0])
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(
        check["data"]["tenant"]["tenant_key"],
        own_tenant_key(CUSTOM_APP_ID)
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_custom_app_has_no_ticket_and_is_never_resent_one() {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let stack = Stack::start(StackOptions {
        clock: Some(Arc::clone(&clock)),
        ..Default::default()
    })
    .await;
    stack.wait_for_ticket(APP_ID).await;
    stack.wait_for_ticket("cli_second").await;
    // Token traffic, an expiry and a refresh, and an invalidation: nothing asks for a ticket.
    assert_eq!(stack.get(&custom_tenant_path()).await.status, 200);
    let custom_app_path = format!("/v1/apps/{CUSTOM_APP_ID}/app_access_token");
    let a1 = stack.get(&custom_app_path).await.json["app_access_token"].clone();
    let r = stack
        .post_json(
            &format!("{custom_app_path}/invalidate"),
            serde_json::json!({"token": a1}),
        )
        .await;
    assert_eq!(
        (r.status, r.json["invalidated"].as_bool()),
        (200, Some(true))
    );
    clock.advance(std::time::Duration::from_secs(3 * 3600));
    assert_eq!(stack.get(&custom_tenant_path()).await.status, 200);

    // An operator's resend request is refused, clearly.
    let r = stack
        .post_json_as(
            &format!("/v1/apps/{CUSTOM_APP_ID}/ticket/resend"),
            serde_json::Value::Null,
            ADMIN_BEARER,
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "bad_request"), "{}", r.text);
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("custom app"));

    // mock-feishu's counts: the start-up resends were the two store apps', none the custom's.
    assert_eq!(stack.mock.resends_for(CUSTOM_APP_ID), 0);
    assert_eq!(stack.mock.resends_for(APP_ID), 1);
    assert_eq!(stack.mock.resends_for("cli_second"), 1);
    assert_eq!(stack.mock.calls(Endpoint::AppTicketResend), 2);
    assert!(stack
        .app
        .state
        .broker()
        .ticket_watch(CUSTOM_APP_ID)
        .is_none());

    // Its status: kind custom, ticket not_needed, token state shown (never the token).
    let r = stack
        .get_as(&format!("/v1/apps/{CUSTOM_APP_ID}"), Some(STATUS_BEARER))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["kind"], "custom");
    assert_eq!(r.json["ticket"]["state"], "not_needed");
    assert_eq!(r.json["ticket"]["received_at"], serde_json::Value::Null);
    assert_eq!(r.json["last_resend"], serde_json::Value::Null);
    assert_eq!(r.json["tenant_token"]["cached"], true);
    assert_eq!(r.json["tenant_token"]["expire"], 7200);
    let r = stack
        .get_as(&format!("/v1/apps/{APP_ID}"), Some(STATUS_BEARER))
        .await;
    assert_eq!(r.json["kind"], "store");
    assert_eq!(r.json["tenant_token"], serde_json::Value::Null);

    // No ticket gauges for it: nothing to alert on.
    let metrics = stack.app.get("/metrics").await.text;
    assert!(metrics.contains(&format!("lark_ticketd_ticket_state{{app_id=\"{APP_ID}\"")));
    assert!(
        !metrics.contains(&format!("app_id=\"{CUSTOM_APP_ID}\"")),
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn each_kind_refuses_the_other_kinds_tenant_path() {
    let stack = Stack::start(StackOptions::default()).await;
    // A store app has a tenant token per customer tenant: the tenant-less path needs one.
    let r = stack
        .get(&format!("/v1/apps/{APP_ID}/tenant_access_token"))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "tenant_key_required"),
        "{}",
        r.text
    );
    let r = stack
        .post_json(
            &format!("/v1/apps/{APP_ID}/tenant_access_token/invalidate"),
            serde_json::json!({"token": "t-x"}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "tenant_key_required"),
        "{}",
        r.text
    );
    // A custom app has one tenant, its own.
    let r = stack
        .get(&format!(
            "/v1/apps/{CUSTOM_APP_ID}/tenants/2ed263bf32cf1651/tenant_access_token"
        ))
        .await;
    assert_eq!((r.status, r.code()), (400, "bad_request"), "{}", r.text);
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&format!("/v1/apps/{CUSTOM_APP_ID}/tenant_access_token")));
    // Neither reached Feishu nor left anything cached.
    for e in Endpoint::ALL_TOKENS {
        if e != Endpoint::AppTicketResend {
            assert_eq!(stack.mock.calls(e), 0, "{e:?}");
        }
    }
    let broker = stack.app.state.broker();
    assert_eq!(
        broker.cached_expiry(&TokenKey::OwnTenant(APP_ID.into())),
        None
    );
    // The usual auth rules hold on the new path too.
    let r = stack.get_as(&custom_tenant_path(), None).await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    let r = stack
        .get_as(&custom_tenant_path(), Some(crate::util::SECOND_APP_BEARER))
        .await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = stack.get("/v1/apps/cli_nobody/tenant_access_token").await;
    assert_eq!((r.status, r.code()), (404, "unknown_app"));
    stack.stop().await;
}

#[tokio::test]
async fn intake_refuses_a_custom_apps_events_without_a_verification_token() {
    // Every Stack's custom app has no event keys: its events route nowhere, clearly.
    let stack = Stack::start(StackOptions::default()).await;
    let challenge =
        lark_ticketd::push::challenge_json("c-1", &lark_ticketd::secret::Secret::new("anything"));
    let r = stack
        .app
        .post(
            &format!("/events/{CUSTOM_APP_ID}"),
            challenge.as_bytes(),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (404, "events_not_configured"),
        "{}",
        r.text
    );
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("verification_token"));
    stack.stop().await;

    // A service with only such an app receives no events at all, also on bare /events; an
    // empty token is never matched.
    let app = TestApp::spawn(&custom_app_toml(CUSTOM_APP_ID, NO_UPSTREAM)).await;
    let empty_token = r#"{"challenge":"c-2","token":"","type":"url_verification"}"#;
    for path in ["/events", &format!("/events/{CUSTOM_APP_ID}")] {
        let r = app.post(path, empty_token.as_bytes(), &[]).await;
        assert_eq!(
            (r.status, r.code()),
            (404, "events_not_configured"),
            "{path}: {}",
            r.text
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_custom_app_with_event_keys_receives_its_events() {
    // Event keys are optional for a custom app; with them its events are checked like a store
    // app's (for the hand-off).
    let config = format!(
        "{}[[apps]]\napp_id = \"{CUSTOM_APP_ID}\"\nkind = \"custom\"\napp_secret = \"custom-app-secret\"\n\
         encrypt_key = \"custom-key\"\nverification_token = \"custom-token\"\nbase_url = \"{NO_UPSTREAM}\"\n",
        app_toml(APP_ID, Some(KEY), TOKEN),
    );
    let app = TestApp::spawn(&config).await;
    let challenge = lark_ticketd::push::challenge_json(
        "c-3",
        &lark_ticketd::secret::Secret::new("custom-token"),
    );
    let sealed = lark_ticketd::push::seal(
        &challenge,
        lark_ticketd::push::Seal {
            encrypt_key: Some(&lark_ticketd::secret::Secret::new("custom-key")),
            sign: false,
        },
    );
    for path in ["/events".to_string(), format!("/events/{CUSTOM_APP_ID}")] {
        let (status, body) = lark_ticketd::push::send(&client(), &app.url(&path), &sealed)
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains("c-3"), "{body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_status_command_ignores_custom_apps_in_its_exit_code() {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let stack = Stack::start(StackOptions {
        clock: Some(Arc::clone(&clock)),
        no_push_on_resend: true,
        ..Default::default()
    })
    .await;
    let url = format!("http://{}", stack.app.addr);
    for app_id in [APP_ID, "cli_second"] {
        assert_eq!(stack.mock.push_ticket(app_id).await.unwrap(), 200);
    }
    // Both store apps fresh, the custom app not_needed: all well.
    let (code, out) = crate::ops::status_cli(url.clone(), Some(STATUS_BEARER), false).await;
    assert_eq!(code, 0, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(CUSTOM_APP_ID))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("custom") && line.contains("not_needed"),
        "{out}"
    );
    // A stale store ticket still counts.
    clock.advance(std::time::Duration::from_secs(80 * 60));
    let (code, out) = crate::ops::status_cli(url, Some(STATUS_BEARER), true).await;
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let custom = v["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["app_id"] == CUSTOM_APP_ID)
        .unwrap();
    assert_eq!(custom["ticket"]["state"], "not_needed");
    stack.stop().await;
}

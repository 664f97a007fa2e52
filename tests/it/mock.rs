//! mock-feishu behaves like the documented platform (protocol.md §6, §6b, §6c).

use std::sync::Arc;
use std::time::Duration;

use lark_ticketd::clock::ManualClock;
use lark_ticketd::config::Config;
use lark_ticketd::mock_feishu::{own_tenant_key, CodeRequest, Endpoint, MockFeishu, MockOptions};
use lark_ticketd::tokens::upstream::{OAUTH_TOKEN_PATH as OAUTH, USER_INFO_PATH};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::util::{
    app_toml, client, eventually, TestApp, APP_ID, APP_SECRET, CUSTOM_APP_ID, KEY, TOKEN,
};

struct Mock {
    mock: MockFeishu,
    clock: Arc<ManualClock>,
    http: reqwest::Client,
}

impl Mock {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn app_token(&self, ticket: &str) -> (u16, Value) {
        self.post(
            "/open-apis/auth/v3/app_access_token",
            json!({"app_id": APP_ID, "app_secret": APP_SECRET, "app_ticket": ticket}),
        )
        .await
    }
}

/// The fake platform pushing to a real service, so tests can read the pushed ticket.
async fn mock_with_service() -> (Mock, TestApp) {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let events_url = format!("http://{}/events/{{app_id}}", service.local_addr().unwrap());
    let config_text = app_toml(APP_ID, Some(KEY), TOKEN);
    let config = Config::parse(&config_text, &|_| None).unwrap();
    let mut options = MockOptions::from_config(&config, clock.clone());
    options.events_url = Some(events_url);
    let mock = MockFeishu::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), options).unwrap();
    let app = TestApp::spawn_on(service, &config_text, clock.clone()).await;
    (
        Mock {
            mock,
            clock,
            http: client(),
        },
        app,
    )
}

#[tokio::test]
async fn auth_endpoints_follow_the_documented_rules() {
    let (m, app) = mock_with_service().await;
    assert_eq!(m.mock.push_ticket(APP_ID).await.unwrap(), 200);
    let ticket = app.state.store().ticket(APP_ID).await.unwrap().unwrap();
    let ticket = ticket.ticket.expose();

    // Error codes, Feishu's JSON shape, HTTP 400.
    let (status, body) = m
        .post("/open-apis/auth/v3/app_access_token", json!({}))
        .await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(10003)));
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/app_access_token",
            json!({"app_id": "cli_nobody", "app_secret": "x", "app_ticket": ticket}),
        )
        .await;
    assert_eq!(body["code"], 10014);
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/app_access_token",
            json!({"app_id": APP_ID, "app_secret": "wrong", "app_ticket": ticket}),
        )
        .await;
    assert_eq!(body["code"], 10015);
    let (_, body) = m.app_token("not-a-ticket").await;
    assert_eq!(body["code"], 10012);

    // expire counts down; the same token while >= 30 minutes remain, a new one below.
    let (status, first) = m.app_token(ticket).await;
    assert_eq!(
        (status, first["code"].as_i64(), first["expire"].as_u64()),
        (200, Some(0), Some(7200))
    );
    m.clock.advance(Duration::from_secs(90 * 60));
    let (_, same) = m.app_token(ticket).await;
    assert_eq!(same["app_access_token"], first["app_access_token"]);
    assert_eq!(same["expire"], 30 * 60);
    m.clock.advance(Duration::from_secs(1));
    let (_, fresh) = m.app_token(ticket).await;
    assert_ne!(fresh["app_access_token"], first["app_access_token"]);
    assert_eq!(fresh["expire"], 7200);

    // The old app token stays valid until its own expiry; tenant tokens are per tenant_key.
    let tenant = |token: &Value, tenant_key: &str| json!({"app_access_token": token.as_str().unwrap(), "tenant_key": tenant_key});
    let (status, t_old) = m
        .post(
            "/open-apis/auth/v3/tenant_access_token",
            tenant(&first["app_access_token"], "tk-1"),
        )
        .await;
    assert_eq!((status, t_old["code"].as_i64()), (200, Some(0)));
    let (_, t_other) = m
        .post(
            "/open-apis/auth/v3/tenant_access_token",
            tenant(&fresh["app_access_token"], "tk-2"),
        )
        .await;
    assert_ne!(t_other["tenant_access_token"], t_old["tenant_access_token"]);
    m.clock.advance(Duration::from_secs(30 * 60));
    let (_, expired) = m
        .post(
            "/open-apis/auth/v3/tenant_access_token",
            tenant(&first["app_access_token"], "tk-1"),
        )
        .await;
    assert_eq!(expired["code"], 99991664);

    // The business endpoint checks tenant tokens.
    let query = |token: String| {
        let http = m.http.clone();
        let url = format!("{}/open-apis/tenant/v2/tenant/query", m.mock.base_url());
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            r.json::<Value>().await.unwrap()
        }
    };
    let ok = query(t_other["tenant_access_token"].as_str().unwrap().to_string()).await;
    assert_eq!(ok["data"]["tenant"]["tenant_key"], "tk-2");
    let bad = query("t-nonsense".into()).await;
    assert_eq!(bad["code"], 99991663);
    m.mock
        .revoke(t_other["tenant_access_token"].as_str().unwrap());
    let revoked = query(t_other["tenant_access_token"].as_str().unwrap().to_string()).await;
    assert_eq!(revoked["code"], 99991663);

    assert!(m.mock.calls(Endpoint::AppAccessToken) >= 7);
    app.stop().await;
}

#[tokio::test]
async fn resend_pushes_a_signed_encrypted_ticket_and_counts_calls() {
    let (m, app) = mock_with_service().await;
    let before = m.mock.pushes();
    let mut signal = app.state.broker().ticket_watch(APP_ID).unwrap();
    let (status, body) = m
        .post(
            "/open-apis/auth/v3/app_ticket/resend",
            json!({"app_id": APP_ID, "app_secret": APP_SECRET}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"code": 0, "msg": "success"})));
    tokio::time::timeout(Duration::from_secs(10), signal.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(app.state.store().ticket(APP_ID).await.unwrap().is_some());
    eventually("the push to be counted", || m.mock.pushes() == before + 1).await;
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/app_ticket/resend",
            json!({"app_id": APP_ID, "app_secret": "wrong"}),
        )
        .await;
    assert_eq!(body["code"], 10015);
    let counts: Value = m
        .http
        .get(format!("{}/mock/calls", m.mock.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(counts["app_ticket_resend"].as_u64().unwrap() >= 2);
    app.stop().await;
}

#[tokio::test]
async fn injected_errors_and_downtime_look_like_5xx() {
    let (m, app) = mock_with_service().await;
    m.mock.set_down(true);
    let (status, _) = m.app_token("x").await;
    assert_eq!(status, 503);
    m.mock.set_down(false);
    m.mock.set_error_rate(1.0);
    let (status, _) = m.app_token("x").await;
    assert_eq!(status, 500);
    m.mock.set_error_rate(0.0);
    let (status, body) = m.app_token("x").await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(10012)));
    app.stop().await;
}

#[tokio::test]
async fn periodic_pushes_arrive_without_being_asked() {
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let events_url = format!("http://{}/events/{{app_id}}", service.local_addr().unwrap());
    let config_text = app_toml(APP_ID, Some(KEY), TOKEN);
    let config = Config::parse(&config_text, &|_| None).unwrap();
    let clock = lark_ticketd::clock::system();
    let mut options = MockOptions::from_config(&config, clock.clone());
    options.events_url = Some(events_url);
    options.push_interval = Some(Duration::from_millis(50));
    let app = TestApp::spawn_on(service, &config_text, clock).await;
    let mut signal = app.state.broker().ticket_watch(APP_ID).unwrap();
    let mock = MockFeishu::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), options).unwrap();
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), signal.changed())
            .await
            .expect("a periodic push")
            .unwrap();
    }
    let ticket = app.state.store().ticket(APP_ID).await.unwrap().unwrap();
    assert!(ticket.pushes_seen >= 2);
    assert_eq!(mock.calls(Endpoint::AppTicketResend), 0, "nobody asked");
    app.stop().await;
}

/// mock-feishu with the store app and a self-built app, on a hand-moved clock, pushing nowhere.
async fn mock_with_a_custom_app() -> Mock {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let config_text = format!(
        "{}{}",
        app_toml(APP_ID, Some(KEY), TOKEN),
        crate::util::custom_app_toml(CUSTOM_APP_ID, crate::util::NO_UPSTREAM)
    );
    let config = Config::parse(&config_text, &|_| None).unwrap();
    let options = MockOptions::from_config(&config, clock.clone());
    let mock = MockFeishu::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), options).unwrap();
    Mock {
        mock,
        clock,
        http: client(),
    }
}

#[tokio::test]
async fn the_internal_endpoints_serve_self_built_apps_only() {
    let m = mock_with_a_custom_app().await;
    let creds = |app_id: &str| json!({"app_id": app_id, "app_secret": APP_SECRET});
    let (status, body) = m
        .post(
            "/open-apis/auth/v3/app_access_token/internal",
            creds(CUSTOM_APP_ID),
        )
        .await;
    assert_eq!((status, body["code"].as_i64()), (200, Some(0)), "{body}");
    assert_eq!(body["expire"], 7200);
    let a1 = body["app_access_token"].clone();
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/tenant_access_token/internal",
            creds(CUSTOM_APP_ID),
        )
        .await;
    let t1 = body["tenant_access_token"].clone();
    assert!(t1.as_str().unwrap().starts_with("t-"), "{body}");
    // The 30-minute rule, as for store apps: the same token until fewer than 30 minutes remain.
    m.clock.advance(Duration::from_secs(89 * 60));
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/app_access_token/internal",
            creds(CUSTOM_APP_ID),
        )
        .await;
    assert_eq!(
        (body["app_access_token"].clone(), body["expire"].as_u64()),
        (a1.clone(), Some(31 * 60))
    );
    m.clock.advance(Duration::from_secs(2 * 60));
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/app_access_token/internal",
            creds(CUSTOM_APP_ID),
        )
        .await;
    assert_ne!(body["app_access_token"], a1);
    // A wrong secret, a store app here, a custom app on the store-app endpoint or asking for
    // a ticket: refused.
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/tenant_access_token/internal",
            json!({"app_id": CUSTOM_APP_ID, "app_secret": "wrong"}),
        )
        .await;
    assert_eq!(body["code"], 10015);
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/app_access_token/internal",
            creds(APP_ID),
        )
        .await;
    assert_eq!(body["code"], 10014);
    let (_, body) = m
        .post(
            "/open-apis/auth/v3/app_access_token",
            json!({"app_id": CUSTOM_APP_ID, "app_secret": APP_SECRET, "app_ticket": "x"}),
        )
        .await;
    assert_eq!(body["code"], 10014);
    let (_, body) = m
        .post("/open-apis/auth/v3/app_ticket/resend", creds(CUSTOM_APP_ID))
        .await;
    assert_eq!(body["code"], 10016);
    assert!(m.mock.push_ticket(CUSTOM_APP_ID).await.is_err());
    assert_eq!(m.mock.resends_for(CUSTOM_APP_ID), 1);
    assert_eq!(m.mock.calls(Endpoint::AppAccessTokenInternal), 4);
}

#[tokio::test]
async fn oauth_codes_live_five_minutes_once_and_refresh_tokens_once() {
    let m = mock_with_a_custom_app().await;
    let exchange = |code: &str| {
        json!({"grant_type": "authorization_code", "client_id": CUSTOM_APP_ID,
               "client_secret": APP_SECRET, "code": code})
    };
    let minted = m
        .mock
        .mint_code(&CodeRequest {
            app_id: CUSTOM_APP_ID.into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(minted.expires_in, 300);
    // A code 5 minutes old is refused.
    m.clock.advance(Duration::from_secs(300));
    let (status, body) = m.post(OAUTH, exchange(&minted.code)).await;
    assert_eq!(
        (status, body["code"].as_i64()),
        (400, Some(20004)),
        "{body}"
    );
    assert_eq!(body["error"], "invalid_grant");

    let minted = m
        .mock
        .mint_code(&CodeRequest {
            app_id: CUSTOM_APP_ID.into(),
            ..Default::default()
        })
        .unwrap();
    m.clock.advance(Duration::from_secs(299));
    // Wrong client credentials leave the code alone.
    let mut wrong = exchange(&minted.code);
    wrong["client_secret"] = "wrong".into();
    let (_, body) = m.post(OAUTH, wrong).await;
    assert_eq!(body["code"], 20002);
    let (status, body) = m.post(OAUTH, exchange(&minted.code)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 7200);
    let access = body["access_token"].as_str().unwrap().to_string();
    let refresh = body["refresh_token"].as_str().unwrap().to_string();
    let (_, body) = m.post(OAUTH, exchange(&minted.code)).await;
    assert_eq!(body["code"], 20003, "single-use");

    // user_info knows the user and the tenant.
    let info: Value = m
        .http
        .get(format!("{}{USER_INFO_PATH}", m.mock.base_url()))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["data"]["open_id"], minted.open_id);
    assert_eq!(info["data"]["tenant_key"], own_tenant_key(CUSTOM_APP_ID));
    let bad: Value = m
        .http
        .get(format!("{}{USER_INFO_PATH}", m.mock.base_url()))
        .bearer_auth("u-not-a-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bad["code"], 99991663);

    let refresh_with = |token: &str| {
        json!({"grant_type": "refresh_token", "client_id": CUSTOM_APP_ID,
               "client_secret": APP_SECRET, "refresh_token": token})
    };
    let (status, body) = m.post(OAUTH, refresh_with(&refresh)).await;
    assert_eq!(status, 200, "{body}");
    let next = body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(next, refresh);
    let (_, body) = m.post(OAUTH, refresh_with(&refresh)).await;
    assert_eq!(body["code"], 20026, "single-use");
    // A refresh token expires too.
    m.clock.advance(Duration::from_secs(7 * 24 * 3600));
    let (_, body) = m.post(OAUTH, refresh_with(&next)).await;
    assert_eq!(body["code"], 20037);
    // A code for another app's user, or a tenant the custom app is not in, is not minted.
    assert!(m
        .mock
        .mint_code(&CodeRequest {
            app_id: CUSTOM_APP_ID.into(),
            tenant_key: Some("another-tenant".into()),
            ..Default::default()
        })
        .is_err());
}

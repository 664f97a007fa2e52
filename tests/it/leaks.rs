//! No secret, ticket or key in anything the server logs, at the most verbose level; and no user
//! access token, refresh token or authorization code (login, issue 11) in the logs, the metrics
//! or the store.

use lark_ticketd::push::{self, Seal};
use lark_ticketd::secret::Secret;

use crate::util::{
    app_toml, assert_no_secrets, captured_logs, client, custom_app_toml, holds_issued_secret,
    toml_str, Child, Stack, StackOptions, TempConfig, TestApp, APP_ID, CUSTOM_APP_ID, KEY,
    LOGIN_BEARER, TOKEN,
};

/// A workload that touches every path that could log: accepted tickets, challenges, every kind
/// of rejection.
async fn workload(url: &str) {
    let http = client();
    let key = Secret::new(KEY);
    let token = Secret::new(TOKEN);
    let sealed = |json: &str, sign| {
        push::seal(
            json,
            Seal {
                encrypt_key: Some(&key),
                sign,
            },
        )
    };
    // Event times inside the replay window, so the ticket is stored and logged.
    let now = crate::intake::now_us();
    let ticket = push::app_ticket_json(APP_ID, &Secret::new("tkt-secret-leak"), &token, now, "u");
    let wrong_token = push::app_ticket_json(
        APP_ID,
        &Secret::new("tkt-secret-leak2"),
        &Secret::new("tkt-secret-wrong-token"),
        now,
        "u",
    );
    let requests = [
        sealed(&ticket, true),
        sealed(&ticket, false),
        sealed(&wrong_token, true),
        sealed(&push::challenge_json("c", &token), false),
        push::seal(
            &ticket,
            Seal {
                encrypt_key: None,
                sign: false,
            },
        ),
        push::PushRequest {
            body: b"{\"encrypt\":\"AAAA\"}".to_vec(),
            headers: vec![],
        },
    ];
    for req in &requests {
        push::send(&http, url, req).await.unwrap();
    }
}

#[tokio::test]
async fn in_process_logs_hold_no_secret() {
    let app = TestApp::spawn(&app_toml(APP_ID, Some(KEY), TOKEN)).await;
    workload(&app.url(&format!("/events/{APP_ID}"))).await;
    app.stop().await;
    // Everything every in-process server of this suite has logged so far, at TRACE.
    assert_no_secrets(&captured_logs(), "the in-process servers");
}

#[tokio::test]
async fn binary_logs_hold_no_secret() {
    let config = TempConfig::embedded(&app_toml(APP_ID, Some(KEY), TOKEN));
    let server = Child::serve(&config.path);
    workload(&server.url(&format!("/events/{APP_ID}"))).await;
    workload(&server.url("/events")).await;
    let (_, logs) = server.terminate();
    assert!(logs.contains("app_ticket received"), "{logs}");
    assert_no_secrets(&logs, "lark-ticketd serve");
}

/// A login workload against `base` (the service) and `mock` (mock-feishu): two exchanges, a
/// reused code, two refreshes and a reused refresh token. Returns every code, user access token
/// and refresh token it saw.
async fn login_workload(base: &str, mock: &str, bearer: &str) -> Vec<String> {
    let http = client();
    let mut secrets = Vec::new();
    let post = |path: String, body: serde_json::Value| {
        let request = http
            .post(format!("{base}{path}"))
            .bearer_auth(bearer)
            .json(&body);
        async move {
            let r = request.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let exchange = format!("/v1/apps/{CUSTOM_APP_ID}/user_access_token");
    let refresh = format!("{exchange}/refresh");
    for _ in 0..2 {
        let minted: serde_json::Value = http
            .post(format!("{mock}/mock/oauth/code"))
            .json(&serde_json::json!({"app_id": CUSTOM_APP_ID}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let code = minted["code"].as_str().unwrap().to_string();
        let (status, first) = post(exchange.clone(), serde_json::json!({"code": code})).await;
        assert_eq!(status, 200, "{first}");
        let (status, _) = post(exchange.clone(), serde_json::json!({"code": code})).await;
        assert_eq!(status, 400, "a reused code is refused");
        let old = first["refresh_token"].as_str().unwrap().to_string();
        let (status, second) =
            post(refresh.clone(), serde_json::json!({"refresh_token": old})).await;
        assert_eq!(status, 200, "{second}");
        let (status, _) = post(refresh.clone(), serde_json::json!({"refresh_token": old})).await;
        assert_eq!(status, 400, "a reused refresh token is refused");
        secrets.push(code);
        for answer in [&first, &second] {
            for field in ["access_token", "refresh_token"] {
                secrets.push(answer[field].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(secrets.len(), 10);
    secrets
}

fn assert_none_of(secrets: &[String], text: &str, what: &str) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} holds a login secret ({}…)",
            &secret[..5]
        );
    }
    assert!(
        !holds_issued_secret(text),
        "{what} holds something shaped like an issued token or code"
    );
}

#[tokio::test]
async fn login_secrets_never_reach_the_logs_the_metrics_or_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let stack = Stack::start(StackOptions {
        config: format!(
            "[store]\nkind = \"embedded\"\npath = {}\n",
            toml_str(db.to_str().unwrap())
        ),
        ..Default::default()
    })
    .await;
    let secrets = login_workload(&stack.app.url(""), &stack.mock.base_url(), LOGIN_BEARER).await;
    let metrics = stack.app.get("/metrics").await.text;
    assert!(
        metrics
            .contains("lark_ticketd_token_requests_total{kind=\"user\",outcome=\"exchanged\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("endpoint=\"oauth_token\""), "{metrics}");
    assert_none_of(&secrets, &metrics, "/metrics");
    // Stopping checks everything logged so far for anything shaped like a token or a code.
    stack.stop().await;
    assert_none_of(&secrets, &captured_logs(), "the in-process servers");
    // The store holds tickets and app tokens (shaped like issued secrets): look for these.
    let stored = std::fs::read(&db).unwrap();
    for secret in &secrets {
        assert!(
            !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the store file holds a login secret ({}…)",
            &secret[..5]
        );
    }
}

#[tokio::test]
async fn binary_logs_hold_no_login_secret() {
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_url = format!("http://{}", mock_listener.local_addr().unwrap());
    let config = TempConfig::embedded(&format!(
        "{}[[clients]]\nname = \"login-service\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"login\"]\n",
        custom_app_toml(CUSTOM_APP_ID, &mock_url),
        lark_ticketd::auth::key_sha256_hex(LOGIN_BEARER),
    ));
    let parsed = lark_ticketd::config::Config::load(&config.path).unwrap();
    let mock = lark_ticketd::mock_feishu::MockFeishu::start(
        mock_listener,
        lark_ticketd::mock_feishu::MockOptions::from_config(&parsed, lark_ticketd::clock::system()),
    )
    .unwrap();
    let server = Child::serve(&config.path);
    let secrets = login_workload(&server.url(""), &mock.base_url(), LOGIN_BEARER).await;
    let (_, logs) = server.terminate();
    assert!(logs.contains("user tokens issued"), "{logs}");
    assert_none_of(&secrets, &logs, "lark-ticketd serve");
    assert_no_secrets(&logs, "lark-ticketd serve");
}

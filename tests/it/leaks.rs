//! No secret, ticket or key in anything the server logs, at the most verbose level.

use lark_ticketd::push::{self, Seal};
use lark_ticketd::secret::Secret;

use crate::util::{
    app_toml, assert_no_secrets, captured_logs, client, Child, TempConfig, TestApp, APP_ID, KEY,
    TOKEN,
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

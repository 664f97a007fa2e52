//! OAuth login through the service (issue 11, DESIGN.md → *Every kind of Feishu app*): a login
//! service exchanges the code Feishu gave its callback, or a refresh token, for the user's
//! tokens and identity — `POST /v1/apps/{app_id}/user_access_token[/refresh]` with the `login`
//! scope — against mock-feishu's OAuth endpoints, the real server on port 0.

use std::time::Duration;

use lark_ticketd::mock_feishu::{
    own_tenant_key, pkce_challenge, CodeRequest, Endpoint, AUTHORIZE_PATH, DEFAULT_TENANT_KEY,
};
use lark_ticketd::tokens::upstream::USER_INFO_PATH;
use serde_json::{json, Value};

use crate::util::{
    client, Reply, Stack, StackOptions, APP_ID, BEARER, CUSTOM_APP_ID, LOGIN_BEARER,
};

fn exchange_path(app_id: &str) -> String {
    format!("/v1/apps/{app_id}/user_access_token")
}

fn refresh_path(app_id: &str) -> String {
    format!("/v1/apps/{app_id}/user_access_token/refresh")
}

/// Mint a code the way a test or a user does: `POST /mock/oauth/code`.
async fn mint(stack: &Stack, request: Value) -> Value {
    let r = client()
        .post(format!("{}/mock/oauth/code", stack.mock.base_url()))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn login(stack: &Stack, path: &str, body: Value) -> Reply {
    stack.post_json_as(path, body, LOGIN_BEARER).await
}

#[tokio::test]
async fn a_code_exchange_returns_the_identity_and_tenant_key_once() {
    let stack = Stack::start(StackOptions::default()).await;
    let minted = mint(
        &stack,
        json!({"app_id": CUSTOM_APP_ID, "user_id": "ada", "name": "Ada Lovelace"}),
    )
    .await;
    let code = minted["code"].as_str().unwrap();
    let r = login(&stack, &exchange_path(CUSTOM_APP_ID), json!({"code": code})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    let u = &r.json;
    assert_eq!(u["app_id"], CUSTOM_APP_ID);
    assert_eq!(u["tenant_key"], own_tenant_key(CUSTOM_APP_ID));
    assert_eq!(u["open_id"], minted["open_id"]);
    assert_eq!(u["union_id"], minted["union_id"]);
    assert_eq!(u["user_id"], "ada");
    assert_eq!(u["name"], "Ada Lovelace");
    assert!(u["access_token"].as_str().unwrap().starts_with("u-"));
    assert!(u["refresh_token"].as_str().unwrap().starts_with("ur-"));
    assert_eq!(u["expire"], 7200);
    assert!(u["expires_at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(u["refresh_expire"], 7 * 24 * 3600);
    // The token is a real one: Feishu knows whose it is.
    let info: Value = client()
        .get(format!("{}{USER_INFO_PATH}", stack.mock.base_url()))
        .bearer_auth(u["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["data"]["open_id"], u["open_id"]);

    // A code is single-use: the second exchange is refused with Feishu's answer.
    let again = login(&stack, &exchange_path(CUSTOM_APP_ID), json!({"code": code})).await;
    assert_eq!(
        (again.status, again.code()),
        (400, "login_failed"),
        "{}",
        again.text
    );
    assert_eq!(again.json["error"]["upstream"]["code"], 20003);
    assert!(again.json["error"]["upstream"]["msg"]
        .as_str()
        .unwrap()
        .contains("used"));
    assert_eq!(stack.mock.calls(Endpoint::OAuthToken), 2);
    // One from the exchange, one from this test; none for the refused code.
    assert_eq!(stack.mock.calls(Endpoint::UserInfo), 2);
    stack.stop().await;
}

#[tokio::test]
async fn a_refresh_returns_a_new_pair_and_the_old_refresh_token_is_refused_afterwards() {
    let stack = Stack::start(StackOptions::default()).await;
    let minted = mint(&stack, json!({"app_id": CUSTOM_APP_ID})).await;
    let first = login(
        &stack,
        &exchange_path(CUSTOM_APP_ID),
        json!({"code": minted["code"]}),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text);
    let old_refresh = first.json["refresh_token"].as_str().unwrap().to_string();

    let second = login(
        &stack,
        &refresh_path(CUSTOM_APP_ID),
        json!({"refresh_token": old_refresh}),
    )
    .await;
    assert_eq!(second.status, 200, "{}", second.text);
    assert_ne!(second.json["access_token"], first.json["access_token"]);
    assert_ne!(second.json["refresh_token"], first.json["refresh_token"]);
    assert!(second.json["refresh_token"]
        .as_str()
        .unwrap()
        .starts_with("ur-"));
    for field in ["app_id", "tenant_key", "open_id", "union_id", "user_id"] {
        assert_eq!(second.json[field], first.json[field], "{field}");
    }

    // Refresh tokens are single-use.
    let stale = login(
        &stack,
        &refresh_path(CUSTOM_APP_ID),
        json!({"refresh_token": old_refresh}),
    )
    .await;
    assert_eq!(
        (stale.status, stale.code()),
        (400, "login_failed"),
        "{}",
        stale.text
    );
    assert_eq!(stale.json["error"]["upstream"]["code"], 20026);
    // The new one works once more.
    let third = login(
        &stack,
        &refresh_path(CUSTOM_APP_ID),
        json!({"refresh_token": second.json["refresh_token"]}),
    )
    .await;
    assert_eq!(third.status, 200, "{}", third.text);
    stack.stop().await;
}

#[tokio::test]
async fn login_needs_the_login_scope_and_a_well_formed_body() {
    let stack = Stack::start(StackOptions::default()).await;
    let minted = mint(&stack, json!({"app_id": CUSTOM_APP_ID})).await;
    // The orders key has the tokens scope only.
    for path in [exchange_path(CUSTOM_APP_ID), refresh_path(CUSTOM_APP_ID)] {
        let r = stack
            .post_json_as(&path, json!({"code": minted["code"]}), BEARER)
            .await;
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden"),
            "{path}: {}",
            r.text
        );
        assert!(r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("login"));
        let r = stack
            .app
            .client
            .post(stack.app.url(&path))
            .json(&json!({"code": minted["code"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    // And a login key may not fetch app tokens.
    let r = stack
        .get_as(
            &format!("/v1/apps/{CUSTOM_APP_ID}/app_access_token"),
            Some(LOGIN_BEARER),
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    for (path, body) in [
        (exchange_path(CUSTOM_APP_ID), json!({})),
        (exchange_path(CUSTOM_APP_ID), json!({"code": ""})),
        (refresh_path(CUSTOM_APP_ID), json!({"code": minted["code"]})),
    ] {
        let r = login(&stack, &path, body).await;
        assert_eq!(
            (r.status, r.code()),
            (400, "bad_request"),
            "{path}: {}",
            r.text
        );
    }
    let r = stack
        .get_as(&exchange_path(CUSTOM_APP_ID), Some(LOGIN_BEARER))
        .await;
    assert_eq!((r.status, r.code()), (405, "method_not_allowed"));
    let r = login(&stack, &exchange_path("cli_nobody"), json!({"code": "x"})).await;
    assert_eq!((r.status, r.code()), (404, "unknown_app"));
    assert_eq!(
        stack.mock.calls(Endpoint::OAuthToken),
        0,
        "nothing reached Feishu"
    );
    // The code was never spent: it still works.
    let r = login(
        &stack,
        &exchange_path(CUSTOM_APP_ID),
        json!({"code": minted["code"]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    stack.stop().await;
}

#[tokio::test]
async fn a_store_apps_login_waits_for_its_first_ticket_then_leads_to_the_users_tenant_token() {
    let stack = Stack::start(StackOptions {
        no_push_on_resend: true,
        config: "[tickets]\nresend_wait = \"200ms\"\n".into(),
        ..Default::default()
    })
    .await;
    let minted = mint(&stack, json!({"app_id": APP_ID, "user_id": "grace"})).await;
    let body = json!({"code": minted["code"]});
    let r = login(&stack, &exchange_path(APP_ID), body.clone()).await;
    assert_eq!((r.status, r.code()), (503, "ticket_missing"), "{}", r.text);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(
        stack.mock.calls(Endpoint::OAuthToken),
        0,
        "the code is not spent while the app cannot follow up"
    );

    assert_eq!(stack.mock.push_ticket(APP_ID).await.unwrap(), 200);
    let r = login(&stack, &exchange_path(APP_ID), body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["tenant_key"], DEFAULT_TENANT_KEY);
    assert_eq!(r.json["user_id"], "grace");
    // The login service's next step: the token of the user's tenant.
    let tenant = r.json["tenant_key"].as_str().unwrap();
    let t = stack
        .get(&format!(
            "/v1/apps/{APP_ID}/tenants/{tenant}/tenant_access_token"
        ))
        .await;
    assert_eq!(t.status, 200, "{}", t.text);
    assert_eq!(t.json["tenant_key"], DEFAULT_TENANT_KEY);
    stack.stop().await;
}

#[tokio::test]
async fn the_browser_flow_redirect_uri_and_pkce_are_honoured() {
    let stack = Stack::start(StackOptions::default()).await;
    let callback = "https://login.example.com/feishu/callback";
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let challenge = pkce_challenge(verifier, "S256");
    // What a browser opens; the mock signs a user in at once and redirects to the callback.
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut authorize =
        reqwest::Url::parse(&format!("{}{AUTHORIZE_PATH}", stack.mock.base_url())).unwrap();
    authorize
        .query_pairs_mut()
        .append_pair("client_id", CUSTOM_APP_ID)
        .append_pair("redirect_uri", callback)
        .append_pair("scope", "offline_access contact:user.base:readonly")
        .append_pair("state", "s-42")
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let r = no_redirects.get(authorize).send().await.unwrap();
    assert_eq!(r.status(), 302);
    let location =
        reqwest::Url::parse(r.headers()[reqwest::header::LOCATION].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(callback), "{location}");
    let query: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    assert_eq!(query["state"], "s-42");
    let code = &query["code"];

    // The wrong verifier spends the code and fails; a fresh code with the right one works.
    let r = login(
        &stack,
        &exchange_path(CUSTOM_APP_ID),
        json!({"code": code, "redirect_uri": callback, "code_verifier": "not-the-verifier"}),
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "login_failed"), "{}", r.text);
    let minted = stack
        .mock
        .mint_code(&CodeRequest {
            app_id: CUSTOM_APP_ID.into(),
            redirect_uri: Some(callback.into()),
            code_challenge: Some(challenge.clone()),
            ..Default::default()
        })
        .unwrap();
    let wrong_uri = login(
        &stack,
        &exchange_path(CUSTOM_APP_ID),
        json!({"code": minted.code, "redirect_uri": "https://evil.example.com/cb", "code_verifier": verifier}),
    )
    .await;
    assert_eq!(wrong_uri.code(), "login_failed", "{}", wrong_uri.text);
    let minted = stack
        .mock
        .mint_code(&CodeRequest {
            app_id: CUSTOM_APP_ID.into(),
            redirect_uri: Some(callback.into()),
            code_challenge: Some(challenge),
            ..Default::default()
        })
        .unwrap();
    let r = login(
        &stack,
        &exchange_path(CUSTOM_APP_ID),
        json!({"code": minted.code, "redirect_uri": callback, "code_verifier": verifier}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["open_id"], minted.open_id);

    // Without offline_access there is no refresh token.
    let minted = stack
        .mock
        .mint_code(&CodeRequest {
            app_id: CUSTOM_APP_ID.into(),
            scope: Some(String::new()),
            ..Default::default()
        })
        .unwrap();
    let r = login(
        &stack,
        &exchange_path(CUSTOM_APP_ID),
        json!({"code": minted.code}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json.get("refresh_token").is_none(), "{}", r.text);
    assert!(r.json.get("refresh_expire").is_none(), "{}", r.text);
    stack.stop().await;
}

#[tokio::test]
async fn an_exchange_that_times_out_is_504_and_is_not_retried() {
    let stack = Stack::start(StackOptions {
        config: "[tokens]\nupstream_timeout = \"300ms\"\nupstream_retries = 2\n".into(),
        ..Default::default()
    })
    .await;
    let minted = mint(&stack, json!({"app_id": CUSTOM_APP_ID})).await;
    stack.mock.set_latency(Duration::from_secs(2));
    let r = login(
        &stack,
        &exchange_path(CUSTOM_APP_ID),
        json!({"code": minted["code"]}),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (504, "upstream_timeout"),
        "{}",
        r.text
    );
    assert_eq!(
        stack.mock.calls(Endpoint::OAuthToken),
        1,
        "a single-use code is never sent twice"
    );
    stack.stop().await;
}

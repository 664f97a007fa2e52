//! Arbitrary input never panics the handler and never gets a 5xx.

use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use proptest::prelude::*;

use lark_ticketd::clock;
use lark_ticketd::config::Config;
use lark_ticketd::events::cipher::EventCipher;
use lark_ticketd::routes::{self, Role};
use lark_ticketd::store::Store;
use lark_ticketd::AppState;

use crate::util::{app_toml, APP_ID, KEY, TOKEN};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
}

fn state() -> &'static AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE.get_or_init(|| {
        let text = format!(
            "[store]\nkind = \"memory\"\n{}{}",
            app_toml(APP_ID, Some(KEY), TOKEN),
            app_toml("cli_plain", None, "plain-token")
        );
        let config = Config::parse(&text, &|_| None).unwrap();
        let store = runtime().block_on(Store::open(&config.store)).unwrap();
        AppState::new(config, store, clock::system())
    })
}

fn status_of(method: &str, path: &str, headers: &[(String, String)], body: Vec<u8>) -> u16 {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let Ok(req) = req.body(Full::new(Bytes::from(body))) else {
        return 400; // not a request hyper would have parsed
    };
    let response = runtime().block_on(routes::handle(state(), Role::Main, req));
    response.status().as_u16()
}

/// Bodies that get past the first checks: real ciphertext of arbitrary plaintext, JSON shapes.
fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        any::<String>().prop_map(|s| s.into_bytes()),
        any::<String>().prop_map(|s| serde_json::json!({ "encrypt": s }).to_string().into_bytes()),
        (
            proptest::collection::vec(any::<u8>(), 0..256),
            any::<[u8; 16]>()
        )
            .prop_map(|(pt, iv)| {
                let blob = EventCipher::new(KEY).encrypt(&pt, iv);
                serde_json::json!({ "encrypt": blob })
                    .to_string()
                    .into_bytes()
            }),
        (any::<String>(), any::<String>(), any::<String>()).prop_map(|(t, c, e)| {
            serde_json::json!({"type": t, "challenge": c, "token": TOKEN, "uuid": e,
                "event": {"type": "app_ticket", "app_id": e, "app_ticket": c}})
            .to_string()
            .into_bytes()
        }),
        (any::<String>(), any::<String>()).prop_map(|(t, e)| {
            let pt =
                serde_json::json!({"schema": "2.0", "header": {"token": TOKEN, "event_type": t,
                "app_id": APP_ID, "create_time": e}, "event": {}})
                .to_string();
            let blob = EventCipher::new(KEY).encrypt(pt.as_bytes(), [1; 16]);
            serde_json::json!({ "encrypt": blob })
                .to_string()
                .into_bytes()
        }),
    ]
}

fn header_strategy() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        Just("x-lark-request-timestamp".to_string()),
        Just("x-lark-request-nonce".to_string()),
        Just("x-lark-signature".to_string()),
        Just("content-length".to_string()),
        Just("content-type".to_string()),
        "[a-z-]{1,20}",
    ];
    proptest::collection::vec((name, "[ -~]{0,80}"), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_never_get_a_5xx(
        method in prop_oneof![Just("POST"), Just("GET"), Just("PUT"), Just("DELETE")],
        path in prop_oneof![
            Just("/events".to_string()),
            Just(format!("/events/{APP_ID}")),
            Just("/events/cli_plain".to_string()),
            "/[a-z/_]{0,30}",
        ],
        headers in header_strategy(),
        body in body_strategy(),
    ) {
        let status = status_of(method, &path, &headers, body);
        prop_assert!((200..500).contains(&status), "status {}", status);
    }
}

//! docs/openapi.yaml against the running server (issue 12), so the file cannot drift.
//!
//! Every operation of the spec is driven through every status a test can provoke, and each answer
//! is checked against the spec: its status is listed for the operation, its content type is one
//! the response lists, its JSON body validates against the schema (the small validator below, over
//! `serde_json::Value`: `$ref`, `type`, `enum`, `const`, `required`, `properties`,
//! `additionalProperties`, `items`, `allOf`/`oneOf`/`anyOf`, bounds and `pattern`; any other
//! keyword in the spec fails the test rather than being skipped), and the headers it marks
//! `required` are there. Then the reverse: every (operation, status, error code) the spec lists
//! was seen, but for a commented allow-list ([`UNREACHABLE`]); every route `src/routes.rs`
//! matches is a path of the spec; each path answers `405` with an `Allow` naming exactly its
//! documented methods; each path is served on the listener its `x-listener` names and `404` on
//! the others; each operation's `security` role is the scope the server enforces.
//!
//! Scenarios are data: [`cases`] lists, per operation, the requests and what each must answer, in
//! the world (server set-up, [`World`]) and under the fault ([`Fault`]) each needs. Requests go
//! over raw HTTP/1.1 (one connection each), so bodies that stop, bodies over the limit and methods
//! like `HEAD` and `PATCH` are sent exactly as written.
//!
//! Issue 11's endpoints (branch `custom-apps`) are documented already. Their scenarios are in
//! [`custom_apps_cases`], switched on by [`CUSTOM_APPS_MERGED`]; until then this test checks that
//! their paths answer `404 not_found` and excuses what only they can reach ([`CUSTOM_APPS_ONLY`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lark_ticketd::clock::{self, Clock};
use lark_ticketd::config::Config;
use lark_ticketd::push::{self, PushRequest, Seal};
use lark_ticketd::secret::Secret;
use lark_ticketd::server::{self, Listeners};
use lark_ticketd::store::Store;
use lark_ticketd::AppState;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::util::{
    app_toml, Stack, StackOptions, TestApp, ADMIN_BEARER, APP_ID, BEARER, CONSUMER_SECRET_A, KEY,
    STATUS_BEARER, TOKEN,
};

/// Issue 11's endpoints are on main: flip to `true` after merging branch `custom-apps` (its
/// `Stack` then has the custom app [`CUSTOM_APP`] and the login key [`LOGIN_BEARER`]). While
/// `false`, the operations in [`CUSTOM_APPS_OPS`] must answer `404 not_found`, and what only they
/// reach is excused from the coverage check.
const CUSTOM_APPS_MERGED: bool = true;

/// The operations branch `custom-apps` adds.
const CUSTOM_APPS_OPS: [&str; 4] = [
    "getOwnTenantAccessToken",
    "invalidateOwnTenantAccessToken",
    "exchangeUserAccessToken",
    "refreshUserAccessToken",
];

/// Answers of operations already on main that only branch `custom-apps` gives: excused while
/// [`CUSTOM_APPS_MERGED`] is false.
const CUSTOM_APPS_ONLY: [(&str, u16, &str); 2] = [
    // A custom app without a verification_token receives no events.
    ("receiveAppEvent", 404, "events_not_configured"),
    // A custom app has no ticket to resend.
    ("resendTicket", 400, "bad_request"),
];

/// Documented answers no test can provoke, each with the reason.
const UNREACHABLE: [(&str, u16, &str, &str); 6] = [
    (
        "receiveEvent",
        500,
        "internal",
        "only if the task that writes a ticket panics",
    ),
    (
        "receiveAppEvent",
        500,
        "internal",
        "only if the task that writes a ticket panics",
    ),
    (
        "getAppAccessToken",
        500,
        "internal",
        "a broker invariant broken (a fetch prepared for another kind of token)",
    ),
    (
        "invalidateAppAccessToken",
        500,
        "internal",
        "a broker invariant broken (a fetch prepared for another kind of token)",
    ),
    (
        "getTenantAccessToken",
        500,
        "internal",
        "a broker invariant broken (a fetch prepared for another kind of token)",
    ),
    (
        "invalidateTenantAccessToken",
        500,
        "internal",
        "a broker invariant broken (a fetch prepared for another kind of token)",
    ),
];

/// The same for branch `custom-apps`' operations (checked once [`CUSTOM_APPS_MERGED`]).
const CUSTOM_APPS_UNREACHABLE: [(&str, u16, &str, &str); 2] = [
    (
        "getOwnTenantAccessToken",
        500,
        "internal",
        "a broker invariant broken (a fetch prepared for another kind of token)",
    ),
    (
        "invalidateOwnTenantAccessToken",
        500,
        "internal",
        "a broker invariant broken (a fetch prepared for another kind of token)",
    ),
];

/// Branch `custom-apps`' self-built app and login key in every `Stack` (tests/it/util.rs there).
const CUSTOM_APP: &str = "cli_c0ffee0c5a17b0e1";
const LOGIN_BEARER: &str = "test-bearer-key-login";

/// A key with every scope main knows, allowed only `cli_second`: `403` for the app of the path.
const NARROW_BEARER: &str = "test-bearer-key-narrow";
/// The app without an Encrypt Key in [`World::Main`].
const PLAIN_APP: &str = "cli_plain";
const PLAIN_TOKEN: &str = "tok-plain";
/// The consumer of [`World::Main`]: nothing listens at its URL, so its events die.
const CONSUMER: &str = "dead-end";
const NOT_CONFIGURED: &str = "cli_not_configured";

// ------------------------------------------------------------------------------------------------
// The scenarios.

/// A server set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum World {
    /// Each app has its ticket; a consumer nothing listens for (dead letters); an app without an
    /// Encrypt Key; a key narrowed to another app.
    Main,
    /// Feishu never pushes the ticket: token requests give up after `tickets.resend_wait`.
    NoTicket,
    /// Feishu refuses the app secret (`10015`).
    Refused,
    /// Feishu answers slower than `tokens.upstream_timeout`.
    Slow,
    /// A short `server.request_timeout`, for bodies that stop arriving.
    Stalled,
    /// A held body spends the server-wide body budget.
    Busy,
    /// Only an app without an Encrypt Key.
    PlainOnly,
}

/// What is broken while one case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The memory store refuses every call.
    StoreDown,
    /// The fake Open Platform answers every auth call with HTTP 503.
    UpstreamDown,
}

/// What must hold before a case is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ready {
    /// [`CONSUMER`] has a dead letter.
    DeadLetter,
    /// The last resend request for this app has its outcome.
    ResendSettled(&'static str),
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Bytes(Vec<u8>),
    /// `Content-Length` says this many bytes; none are sent (the server refuses on the head).
    Declared(usize),
    /// `Content-Length: 100`, ten bytes sent, then nothing.
    Stalled,
    /// This many bytes, declared and sent.
    Filler(usize),
    /// Made when the case runs (branch `custom-apps`).
    Later(Later),
}

#[derive(Debug, Clone, Copy)]
enum Later {
    /// `{"code"}` with a code minted by the fake platform for this app.
    Code(&'static str),
    /// `{"refresh_token"}` from an exchange of a minted code through the service.
    RefreshToken(&'static str),
}

/// One request and what it must answer.
#[derive(Debug, Clone)]
struct Case {
    /// The spec's operationId.
    op: &'static str,
    world: World,
    fault: Fault,
    ready: Option<Ready>,
    method: &'static str,
    path: String,
    key: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
    body: Body,
    /// Status and error code (`""` for a success).
    expect: (u16, &'static str),
    /// A further assertion on the JSON body.
    also: Option<fn(&Value)>,
}

fn case(op: &'static str, method: &'static str, path: impl Into<String>) -> Case {
    Case {
        op,
        world: World::Main,
        fault: Fault::None,
        ready: None,
        method,
        path: path.into(),
        key: None,
        headers: Vec::new(),
        body: Body::None,
        expect: (0, ""),
        also: None,
    }
}

fn get(op: &'static str, path: impl Into<String>) -> Case {
    case(op, "GET", path)
}

fn post(op: &'static str, path: impl Into<String>) -> Case {
    case(op, "POST", path)
}

fn head(op: &'static str, path: impl Into<String>) -> Case {
    case(op, "HEAD", path)
}

impl Case {
    fn key(mut self, key: &'static str) -> Case {
        self.key = Some(key);
        self
    }

    fn json(mut self, body: Value) -> Case {
        self.body = Body::Bytes(body.to_string().into_bytes());
        self
    }

    fn bytes(mut self, body: impl Into<Vec<u8>>) -> Case {
        self.body = Body::Bytes(body.into());
        self
    }

    fn push(mut self, request: PushRequest) -> Case {
        self.headers = request.headers;
        self.body = Body::Bytes(request.body);
        self
    }

    fn body(mut self, body: Body) -> Case {
        self.body = body;
        self
    }

    fn world(mut self, world: World) -> Case {
        self.world = world;
        self
    }

    fn fault(mut self, fault: Fault) -> Case {
        self.fault = fault;
        self
    }

    fn after(mut self, ready: Ready) -> Case {
        self.ready = Some(ready);
        self
    }

    fn answers(mut self, status: u16, code: &'static str) -> Case {
        self.expect = (status, code);
        self
    }

    fn also(mut self, check: fn(&Value)) -> Case {
        self.also = Some(check);
        self
    }

    fn describe(&self) -> String {
        format!(
            "{} {} {} [{:?}{}]",
            self.op,
            self.method,
            self.path,
            self.world,
            match self.fault {
                Fault::None => String::new(),
                f => format!(", {f:?}"),
            }
        )
    }
}

fn now_ms() -> u64 {
    clock::SystemClock.now_ms()
}

/// A push as Feishu sends it to an app with an Encrypt Key: encrypted and signed.
fn sealed(json: &str, key: &str) -> PushRequest {
    push::seal(
        json,
        Seal {
            encrypt_key: Some(&Secret::new(key)),
            sign: true,
        },
    )
}

/// Encrypted but unsigned: how Feishu sends the URL-verification challenge.
fn unsigned(json: &str, key: &str) -> PushRequest {
    push::seal(
        json,
        Seal {
            encrypt_key: Some(&Secret::new(key)),
            sign: false,
        },
    )
}

fn ticket(app_id: &str, token: &str) -> String {
    push::app_ticket_json(
        app_id,
        &Secret::new(format!("tkt-secret-{}", push::random_event_id())),
        &Secret::new(token),
        now_ms() as i64 * 1000,
        &push::random_event_id(),
    )
}

fn challenge(token: &str) -> String {
    push::challenge_json("openapi-challenge", &Secret::new(token))
}

/// A schema 1.0 event of `app_id` (a lifecycle event, or anything else).
fn event_v1(event: Value) -> String {
    json!({
        "ts": format!("{}.0", now_ms() / 1000),
        "uuid": push::random_event_id(),
        "token": TOKEN,
        "type": "event_callback",
        "event": event,
    })
    .to_string()
}

/// A schema 2.0 message event, which [`CONSUMER`] takes.
fn message_v2() -> String {
    json!({
        "schema": "2.0",
        "header": {"event_id": push::random_event_id(), "token": TOKEN,
                   "create_time": now_ms().to_string(), "event_type": "im.message.receive_v1",
                   "tenant_key": "tenant-a", "app_id": APP_ID},
        "event": {"message": {"message_id": "om_1", "content": "{\"text\":\"hi\"}"}},
    })
    .to_string()
}

fn app_path(app_id: &str, rest: &str) -> String {
    format!("/v1/apps/{app_id}{rest}")
}

fn tenant_token_path(app_id: &str, tenant: &str) -> String {
    app_path(app_id, &format!("/tenants/{tenant}/tenant_access_token"))
}

fn upstream_names_the_secret(body: &Value) {
    assert_eq!(body["error"]["upstream"]["code"], 10015, "{body}");
    assert_eq!(
        body["error"]["upstream"]["msg"], "app secret invalid",
        "{body}"
    );
}

fn challenge_echoed(body: &Value) {
    assert_eq!(body["challenge"], "openapi-challenge", "{body}");
}

fn has_dead_letters(body: &Value) {
    let events = body["events"].as_array().expect("events");
    assert!(!events.is_empty(), "{body}");
}

fn has_tenants(body: &Value) {
    let tenants = body["tenants"].as_array().expect("tenants");
    assert!(
        tenants.iter().any(|t| t["last_order"].is_object()),
        "an order is listed: {body}"
    );
}

/// Every scenario of the operations on main, in the order they run within each world.
fn cases() -> Vec<Case> {
    let mut c = Vec::new();
    let app_events = format!("/events/{APP_ID}");

    // Intake, per app.
    let op = "receiveAppEvent";
    c.extend([
        post(op, &app_events)
            .push(unsigned(&challenge(TOKEN), KEY))
            .answers(200, "")
            .also(challenge_echoed),
        post(op, &app_events)
            .push(sealed(&ticket(APP_ID, TOKEN), KEY))
            .answers(200, ""),
        post(op, &app_events)
            .push(sealed(
                &event_v1(json!({"type": "app_open", "app_id": APP_ID, "tenant_key": "tenant-a"})),
                KEY,
            ))
            .answers(200, ""),
        post(op, &app_events)
            .push(sealed(
                &event_v1(
                    json!({"type": "order_paid", "app_id": APP_ID, "tenant_key": "tenant-a",
                    "order_id": "order-1", "price_plan_type": "per_seat_per_year", "seats": 20,
                    "buy_type": "buy", "pay_time": "1700000005"}),
                ),
                KEY,
            ))
            .answers(200, ""),
        // Queued for the consumer, whose deliveries all fail: a dead letter soon.
        post(op, &app_events)
            .push(sealed(&message_v2(), KEY))
            .answers(200, ""),
        post(op, format!("/events/{PLAIN_APP}"))
            .bytes(challenge(PLAIN_TOKEN))
            .answers(200, "")
            .also(challenge_echoed),
        post(op, &app_events)
            .bytes("not json")
            .answers(400, "malformed_body"),
        post(op, &app_events)
            .bytes(r#"{"encrypt":"AAAA"}"#)
            .answers(400, "bad_payload"),
        post(op, &app_events)
            .bytes(challenge(TOKEN))
            .answers(400, "encryption_required"),
        post(op, format!("/events/{PLAIN_APP}"))
            .push(sealed(&ticket(PLAIN_APP, PLAIN_TOKEN), KEY))
            .answers(400, "encrypt_key_not_configured"),
        post(op, &app_events)
            .push(sealed(&ticket("cli_second", TOKEN), KEY))
            .answers(400, "app_mismatch"),
        post(op, &app_events)
            .push(forged(sealed(&ticket(APP_ID, TOKEN), KEY)))
            .answers(401, "bad_signature"),
        post(op, &app_events)
            .push(unsigned(&challenge("not-the-token"), KEY))
            .answers(401, "bad_token"),
        post(op, &app_events)
            .push(push::seal_at(
                &ticket(APP_ID, TOKEN),
                Seal {
                    encrypt_key: Some(&Secret::new(KEY)),
                    sign: true,
                },
                now_ms() - 9 * 3600 * 1000,
            ))
            .answers(401, "stale_request"),
        post(op, format!("/events/{NOT_CONFIGURED}"))
            .push(sealed(&ticket(NOT_CONFIGURED, TOKEN), KEY))
            .answers(404, "unknown_app"),
        post(op, &app_events)
            .body(Body::Declared(2 * 1024 * 1024))
            .answers(413, "payload_too_large"),
        post(op, &app_events)
            .push(sealed(&ticket(APP_ID, TOKEN), KEY))
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        post(op, &app_events)
            .body(Body::Stalled)
            .world(World::Stalled)
            .answers(408, "request_timeout"),
        post(op, &app_events)
            .body(Body::Filler(10_000))
            .world(World::Busy)
            .answers(429, "server_busy"),
    ]);

    // Intake, one URL for every app.
    let op = "receiveEvent";
    c.extend([
        post(op, "/events")
            .push(unsigned(&challenge(TOKEN), KEY))
            .answers(200, "")
            .also(challenge_echoed),
        post(op, "/events")
            .push(sealed(&ticket(APP_ID, TOKEN), KEY))
            .answers(200, ""),
        post(op, "/events")
            .bytes("[1,2]")
            .answers(400, "malformed_body"),
        post(op, "/events")
            .bytes(r#"{"encrypt":"AAAA"}"#)
            .answers(400, "bad_payload"),
        post(op, "/events")
            .bytes(challenge(TOKEN))
            .answers(400, "encryption_required"),
        post(op, "/events")
            .push(sealed(&ticket("cli_second", TOKEN), KEY))
            .answers(400, "app_mismatch"),
        post(op, "/events")
            .push(forged(sealed(&ticket(APP_ID, TOKEN), KEY)))
            .answers(401, "bad_signature"),
        post(op, "/events")
            .push(unsigned(&challenge("not-the-token"), KEY))
            .answers(401, "bad_token"),
        post(op, "/events")
            .push(push::seal_at(
                &ticket(APP_ID, TOKEN),
                Seal {
                    encrypt_key: Some(&Secret::new(KEY)),
                    sign: true,
                },
                now_ms() - 9 * 3600 * 1000,
            ))
            .answers(401, "stale_request"),
        post(op, "/events")
            .body(Body::Declared(2 * 1024 * 1024))
            .answers(413, "payload_too_large"),
        post(op, "/events")
            .push(sealed(&ticket(APP_ID, TOKEN), KEY))
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        post(op, "/events")
            .body(Body::Stalled)
            .world(World::Stalled)
            .answers(408, "request_timeout"),
        post(op, "/events")
            .body(Body::Filler(10_000))
            .world(World::Busy)
            .answers(429, "server_busy"),
        // Only when no app has an Encrypt Key.
        post(op, "/events")
            .push(sealed(&ticket(PLAIN_APP, PLAIN_TOKEN), KEY))
            .world(World::PlainOnly)
            .answers(400, "encrypt_key_not_configured"),
    ]);

    // Health, metrics, the status page.
    c.extend([
        get("healthz", "/healthz").answers(200, ""),
        head("healthzHead", "/healthz").answers(200, ""),
        get("readyz", "/readyz").answers(200, ""),
        get("readyz", "/readyz")
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        head("readyzHead", "/readyz").answers(200, ""),
        head("readyzHead", "/readyz")
            .fault(Fault::StoreDown)
            .answers(503, ""),
        get("metrics", "/metrics").answers(200, ""),
        get("metrics", "/metrics")
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        get("statusPage", "/").answers(200, ""),
        get("statusPage", "/")
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        head("statusPageHead", "/").answers(200, ""),
        head("statusPageHead", "/")
            .fault(Fault::StoreDown)
            .answers(503, ""),
    ]);

    // Status API.
    c.extend([
        get("listApps", "/v1/apps")
            .key(STATUS_BEARER)
            .answers(200, ""),
        get("listApps", "/v1/apps")
            .key(STATUS_BEARER)
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        get("getApp", app_path(APP_ID, ""))
            .key(STATUS_BEARER)
            .answers(200, ""),
        get("getApp", app_path(PLAIN_APP, ""))
            .key(STATUS_BEARER)
            .answers(200, ""),
        get("getApp", app_path(APP_ID, ""))
            .key(STATUS_BEARER)
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        get("listTenants", app_path(APP_ID, "/tenants"))
            .key(STATUS_BEARER)
            .answers(200, "")
            .also(has_tenants),
        get("listTenants", app_path(APP_ID, "/tenants"))
            .key(STATUS_BEARER)
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        // The start-up resend of PLAIN_APP never reached Feishu (nothing listens at its
        // base_url): it does not use up the interval, so an operator's resend is sent at once.
        post("resendTicket", app_path(PLAIN_APP, "/ticket/resend"))
            .key(ADMIN_BEARER)
            .after(Ready::ResendSettled(PLAIN_APP))
            .answers(202, ""),
        post("resendTicket", app_path(PLAIN_APP, "/ticket/resend"))
            .key(ADMIN_BEARER)
            .after(Ready::ResendSettled(PLAIN_APP))
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        // APP_ID's start-up resend was accepted (and pushed) within the interval (1 h here).
        post("resendTicket", app_path(APP_ID, "/ticket/resend"))
            .key(ADMIN_BEARER)
            .answers(429, "resend_rate_limited")
            .also(|body| {
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("tickets.resend_interval"),
                    "the message names the interval: {body}"
                )
            }),
    ]);

    // Token API. In World::Main nothing ever asks for `cli_second`'s tokens but the store-down
    // cases, so nothing of it is cached and they reach the store.
    let op = "getAppAccessToken";
    let path = app_path(APP_ID, "/app_access_token");
    c.extend([
        get(op, &path).key(BEARER).answers(200, ""),
        get(op, app_path("cli_second", "/app_access_token"))
            .key(BEARER)
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        get(op, &path)
            .key(BEARER)
            .world(World::NoTicket)
            .answers(503, "ticket_missing"),
        get(op, &path)
            .key(BEARER)
            .world(World::Refused)
            .answers(502, "upstream_error")
            .also(upstream_names_the_secret),
        get(op, &path)
            .key(BEARER)
            .world(World::Slow)
            .answers(504, "upstream_timeout"),
    ]);
    let op = "invalidateAppAccessToken";
    let path = app_path(APP_ID, "/app_access_token/invalidate");
    let stale = json!({"token": "a-token-feishu-rejected"});
    c.extend([
        post(op, &path)
            .key(BEARER)
            .json(stale.clone())
            .answers(200, ""),
        post(op, &path)
            .key(BEARER)
            .json(json!({"nope": 1}))
            .answers(400, "bad_request"),
        post(op, &path)
            .key(BEARER)
            .body(Body::Declared(20_000))
            .answers(413, "payload_too_large"),
        post(op, app_path("cli_second", "/app_access_token/invalidate"))
            .key(BEARER)
            .json(stale.clone())
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        post(op, &path)
            .key(BEARER)
            .json(stale.clone())
            .world(World::NoTicket)
            .answers(503, "ticket_missing"),
        post(op, &path)
            .key(BEARER)
            .json(stale.clone())
            .world(World::Refused)
            .answers(502, "upstream_error")
            .also(upstream_names_the_secret),
        post(op, &path)
            .key(BEARER)
            .json(stale.clone())
            .world(World::Slow)
            .answers(504, "upstream_timeout"),
        post(op, &path)
            .key(BEARER)
            .body(Body::Stalled)
            .world(World::Stalled)
            .answers(408, "request_timeout"),
        post(op, &path)
            .key(BEARER)
            .body(Body::Filler(10_000))
            .world(World::Busy)
            .answers(429, "server_busy"),
    ]);
    let op = "getTenantAccessToken";
    let path = tenant_token_path(APP_ID, "tenant-a");
    c.extend([
        get(op, &path).key(BEARER).answers(200, ""),
        get(op, tenant_token_path(APP_ID, "bad!key"))
            .key(BEARER)
            .answers(400, "bad_request"),
        get(op, tenant_token_path("cli_second", "tenant-a"))
            .key(BEARER)
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        get(op, &path)
            .key(BEARER)
            .world(World::NoTicket)
            .answers(503, "ticket_missing"),
        get(op, &path)
            .key(BEARER)
            .world(World::Refused)
            .answers(502, "upstream_error")
            .also(upstream_names_the_secret),
        get(op, &path)
            .key(BEARER)
            .world(World::Slow)
            .answers(504, "upstream_timeout"),
    ]);
    let op = "invalidateTenantAccessToken";
    let path = format!("{}/invalidate", tenant_token_path(APP_ID, "tenant-a"));
    c.extend([
        post(op, &path)
            .key(BEARER)
            .json(stale.clone())
            .answers(200, ""),
        post(op, &path)
            .key(BEARER)
            .json(json!({"token": 7}))
            .answers(400, "bad_request"),
        post(
            op,
            format!("{}/invalidate", tenant_token_path(APP_ID, "bad!key")),
        )
        .key(BEARER)
        .json(stale.clone())
        .answers(400, "bad_request"),
        post(op, &path)
            .key(BEARER)
            .body(Body::Declared(20_000))
            .answers(413, "payload_too_large"),
        post(
            op,
            format!("{}/invalidate", tenant_token_path("cli_second", "tenant-a")),
        )
        .key(BEARER)
        .json(stale.clone())
        .fault(Fault::StoreDown)
        .answers(503, "store_unavailable"),
        post(op, &path)
            .key(BEARER)
            .json(stale.clone())
            .world(World::NoTicket)
            .answers(503, "ticket_missing"),
        post(op, &path)
            .key(BEARER)
            .json(stale.clone())
            .world(World::Refused)
            .answers(502, "upstream_error")
            .also(upstream_names_the_secret),
        post(op, &path)
            .key(BEARER)
            .json(stale.clone())
            .world(World::Slow)
            .answers(504, "upstream_timeout"),
        post(op, &path)
            .key(BEARER)
            .body(Body::Stalled)
            .world(World::Stalled)
            .answers(408, "request_timeout"),
        post(op, &path)
            .key(BEARER)
            .body(Body::Filler(10_000))
            .world(World::Busy)
            .answers(429, "server_busy"),
    ]);

    // Hand-off API.
    let dead = format!("/v1/consumers/{CONSUMER}/dead");
    let redeliver = format!("/v1/consumers/{CONSUMER}/redeliver");
    c.extend([
        get("listConsumers", "/v1/consumers")
            .key(STATUS_BEARER)
            .answers(200, ""),
        get("listConsumers", "/v1/consumers")
            .key(STATUS_BEARER)
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        get("listDeadLetters", &dead)
            .key(STATUS_BEARER)
            .after(Ready::DeadLetter)
            .answers(200, "")
            .also(has_dead_letters),
        get("listDeadLetters", format!("{dead}?limit=0"))
            .key(STATUS_BEARER)
            .answers(400, "bad_request"),
        get("listDeadLetters", "/v1/consumers/nobody/dead")
            .key(STATUS_BEARER)
            .answers(404, "unknown_consumer"),
        get("listDeadLetters", &dead)
            .key(STATUS_BEARER)
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        post("redeliver", &redeliver)
            .key(ADMIN_BEARER)
            .json(json!({"dead": true}))
            .after(Ready::DeadLetter)
            .answers(202, ""),
        post("redeliver", &redeliver)
            .key(ADMIN_BEARER)
            .json(json!({"since": 0, "until": now_ms() / 1000}))
            .answers(202, ""),
        post("redeliver", &redeliver)
            .key(ADMIN_BEARER)
            .json(json!({"event_ids": ["no-such-event"]}))
            .answers(202, ""),
        post("redeliver", &redeliver)
            .key(ADMIN_BEARER)
            .json(json!({"dead": true, "since": 0}))
            .answers(400, "bad_request"),
        post("redeliver", "/v1/consumers/nobody/redeliver")
            .key(ADMIN_BEARER)
            .json(json!({"dead": true}))
            .answers(404, "unknown_consumer"),
        post("redeliver", &redeliver)
            .key(ADMIN_BEARER)
            .body(Body::Declared(20_000))
            .answers(413, "payload_too_large"),
        post("redeliver", &redeliver)
            .key(ADMIN_BEARER)
            .json(json!({"dead": true}))
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        post("redeliver", &redeliver)
            .key(ADMIN_BEARER)
            .body(Body::Stalled)
            .world(World::Stalled)
            .answers(408, "request_timeout"),
        post("redeliver", &redeliver)
            .key(ADMIN_BEARER)
            .body(Body::Filler(10_000))
            .world(World::Busy)
            .answers(429, "server_busy"),
    ]);
    c
}

/// Branch `custom-apps`' scenarios (run once [`CUSTOM_APPS_MERGED`] is true).
fn custom_apps_cases() -> Vec<Case> {
    let mut c = Vec::new();
    let own = app_path(CUSTOM_APP, "/tenant_access_token");
    let own_invalidate = app_path(CUSTOM_APP, "/tenant_access_token/invalidate");
    let stale = json!({"token": "t-a-token-feishu-rejected"});
    let op = "getOwnTenantAccessToken";
    c.extend([
        get(op, &own).key(BEARER).answers(200, ""),
        get(op, app_path(APP_ID, "/tenant_access_token"))
            .key(BEARER)
            .answers(400, "tenant_key_required"),
        get(op, &own)
            .key(BEARER)
            .world(World::Refused)
            .answers(502, "upstream_error"),
        get(op, &own)
            .key(BEARER)
            .world(World::Slow)
            .answers(504, "upstream_timeout"),
    ]);
    let op = "invalidateOwnTenantAccessToken";
    c.extend([
        post(op, &own_invalidate)
            .key(BEARER)
            .json(stale.clone())
            .answers(200, ""),
        post(op, &own_invalidate)
            .key(BEARER)
            .json(json!({}))
            .answers(400, "bad_request"),
        post(op, app_path(APP_ID, "/tenant_access_token/invalidate"))
            .key(BEARER)
            .json(stale.clone())
            .answers(400, "tenant_key_required"),
        post(op, &own_invalidate)
            .key(BEARER)
            .body(Body::Declared(20_000))
            .answers(413, "payload_too_large"),
        post(op, &own_invalidate)
            .key(BEARER)
            .json(stale.clone())
            .world(World::Refused)
            .answers(502, "upstream_error"),
        post(op, &own_invalidate)
            .key(BEARER)
            .json(stale.clone())
            .world(World::Slow)
            .answers(504, "upstream_timeout"),
        post(op, &own_invalidate)
            .key(BEARER)
            .body(Body::Stalled)
            .world(World::Stalled)
            .answers(408, "request_timeout"),
        post(op, &own_invalidate)
            .key(BEARER)
            .body(Body::Filler(10_000))
            .world(World::Busy)
            .answers(429, "server_busy"),
    ]);
    for (op, path, later, bogus) in [
        (
            "exchangeUserAccessToken",
            app_path(CUSTOM_APP, "/user_access_token"),
            Later::Code(CUSTOM_APP),
            json!({"code": "oc-0000000000000000000000000000dead"}),
        ),
        (
            "refreshUserAccessToken",
            app_path(CUSTOM_APP, "/user_access_token/refresh"),
            Later::RefreshToken(CUSTOM_APP),
            json!({"refresh_token": "ur-000000000000000000000000000000000000dead"}),
        ),
    ] {
        let store_app = path.replace(CUSTOM_APP, APP_ID);
        // `cli_second`'s app token is never cached in World::Main: a login for it reads the
        // ticket, so it reaches the store.
        let uncached = path.replace(CUSTOM_APP, "cli_second");
        c.extend([
            post(op, &path)
                .key(LOGIN_BEARER)
                .body(Body::Later(later))
                .answers(200, ""),
            post(op, &path)
                .key(LOGIN_BEARER)
                .json(json!({}))
                .answers(400, "bad_request"),
            post(op, &path)
                .key(LOGIN_BEARER)
                .json(bogus.clone())
                .answers(400, "login_failed"),
            post(op, &path)
                .key(LOGIN_BEARER)
                .body(Body::Declared(20_000))
                .answers(413, "payload_too_large"),
            post(op, &path)
                .key(LOGIN_BEARER)
                .json(bogus.clone())
                .fault(Fault::UpstreamDown)
                .answers(502, "upstream_error"),
            post(op, &store_app)
                .key(LOGIN_BEARER)
                .json(bogus.clone())
                .world(World::NoTicket)
                .answers(503, "ticket_missing"),
            post(op, &uncached)
                .key(LOGIN_BEARER)
                .json(bogus.clone())
                .fault(Fault::StoreDown)
                .answers(503, "store_unavailable"),
            post(op, &path)
                .key(LOGIN_BEARER)
                .json(bogus.clone())
                .world(World::Slow)
                .answers(504, "upstream_timeout"),
            post(op, &path)
                .key(LOGIN_BEARER)
                .body(Body::Stalled)
                .world(World::Stalled)
                .answers(408, "request_timeout"),
            post(op, &path)
                .key(LOGIN_BEARER)
                .body(Body::Filler(10_000))
                .world(World::Busy)
                .answers(429, "server_busy"),
        ]);
    }
    c.extend([
        get("getApp", app_path(CUSTOM_APP, ""))
            .key(STATUS_BEARER)
            .answers(200, "")
            .also(|body| {
                assert_eq!(
                    (&body["kind"], &body["ticket"]["state"]),
                    (&json!("custom"), &json!("not_needed")),
                    "{body}"
                )
            }),
        post("resendTicket", app_path(CUSTOM_APP, "/ticket/resend"))
            .key(ADMIN_BEARER)
            .answers(400, "bad_request"),
        post("receiveAppEvent", format!("/events/{CUSTOM_APP}"))
            .push(sealed(&ticket(CUSTOM_APP, TOKEN), KEY))
            .answers(404, "events_not_configured"),
    ]);
    c
}

/// `DELETE /v1/apps/{app_id}/ticket` (issue 12). Run after every other case of World::Main, as
/// it drops the app's ticket: the store down first (nothing dropped), then the drop, then the
/// drop of nothing.
fn ticket_delete_cases() -> Vec<Case> {
    let op = "deleteTicket";
    let path = app_path(APP_ID, "/ticket");
    vec![
        case(op, "DELETE", &path)
            .key(ADMIN_BEARER)
            .fault(Fault::StoreDown)
            .answers(503, "store_unavailable"),
        case(op, "DELETE", &path).key(ADMIN_BEARER).answers(200, ""),
        case(op, "DELETE", &path)
            .key(ADMIN_BEARER)
            .answers(404, "not_found"),
        case(op, "DELETE", app_path(CUSTOM_APP, "/ticket"))
            .key(ADMIN_BEARER)
            .answers(400, "bad_request"),
    ]
}

/// The same signed push with a signature that does not match.
fn forged(mut request: PushRequest) -> PushRequest {
    for (name, value) in &mut request.headers {
        if name.eq_ignore_ascii_case("x-lark-signature") {
            *value = "0".repeat(64);
        }
    }
    request
}

/// Who holds which scope (tests/it/util.rs `Stack`, and [`NARROW_BEARER`] of World::Main).
fn key_with(scope: &str) -> &'static str {
    match scope {
        "tokens" => BEARER,
        "status" => STATUS_BEARER,
        "admin" => ADMIN_BEARER,
        "login" => LOGIN_BEARER,
        other => panic!("no test key has the scope {other:?}"),
    }
}

fn key_without(scope: &str) -> &'static str {
    match scope {
        "tokens" | "admin" => STATUS_BEARER,
        "status" | "login" => BEARER,
        other => panic!("no test key lacks the scope {other:?}"),
    }
}

/// The bearer-key checks each secured operation's `security` implies, made from its first
/// success case: no key and an unknown key `401`; a key without the scope `403`; a key not
/// allowed the app (or, for `x-requires-every-app`, not allowed every app) `403`; a key allowed
/// every app naming one that is not configured `404`.
fn auth_cases(spec: &Spec, base: &Case) -> Vec<Case> {
    let op = spec.op(base.op);
    let Some(scope) = op.scope.as_deref() else {
        return Vec::new();
    };
    let mut derived = base.clone();
    derived.also = None;
    derived.ready = None;
    derived.fault = Fault::None;
    let mut out = vec![
        Case {
            key: None,
            ..derived.clone()
        }
        .answers(401, "unauthorized"),
        Case {
            key: Some("no-client-has-this-key"),
            ..derived.clone()
        }
        .answers(401, "unauthorized"),
        Case {
            key: Some(key_without(scope)),
            ..derived.clone()
        }
        .answers(403, "forbidden"),
    ];
    // The narrow key holds the scope, for another app only: refused where the path names an app
    // or the operation needs every app, served as the base case elsewhere (both sides, so a
    // missing `x-requires-every-app` fails as surely as a wrong one).
    assert_eq!(derived.key, Some(key_with(scope)), "{}", base.describe());
    let narrow = Case {
        key: Some(NARROW_BEARER),
        ..derived.clone()
    };
    if scope == "login" {
        // The narrow key lacks it: covered by the key without the scope.
    } else if op.path.contains("{app_id}") || op.every_app {
        out.push(narrow.answers(403, "forbidden"));
    } else {
        out.push(narrow);
    }
    if op.path.contains("{app_id}") {
        let app = [APP_ID, CUSTOM_APP, PLAIN_APP]
            .into_iter()
            .find(|a| derived.path.contains(a))
            .unwrap_or_else(|| panic!("{}: which app?", base.describe()));
        out.push(
            Case {
                path: derived.path.replace(app, NOT_CONFIGURED),
                ..derived
            }
            .answers(404, "unknown_app"),
        );
    }
    out
}

// ------------------------------------------------------------------------------------------------
// The test.

#[tokio::test]
async fn the_server_answers_as_docs_openapi_yaml_says() {
    let spec = Spec::load();
    spec.check_itself();
    spec.check_routes_are_documented();
    let mut run = Run::new(&spec);

    let mut all = cases();
    if CUSTOM_APPS_MERGED {
        all.extend(custom_apps_cases());
    }
    // Last of World::Main: they drop its ticket.
    all.extend(ticket_delete_cases());
    for c in &all {
        assert!(c.expect.0 != 0, "{}: no expected answer", c.describe());
        assert!(
            spec.ops.contains_key(c.op),
            "{}: the spec has no such operation",
            c.describe()
        );
    }
    // Every operation the server serves has a success case: the base of the derived checks.
    let mut bases: BTreeMap<&str, Case> = BTreeMap::new();
    for c in &all {
        if c.world == World::Main && c.expect.0 < 300 && !bases.contains_key(c.op) {
            bases.insert(c.op, c.clone());
        }
    }
    for id in spec.ops.keys() {
        if pending(id) {
            continue;
        }
        assert!(
            bases.contains_key(id.as_str()),
            "{id}: no success case in World::Main"
        );
    }
    for base in bases.values() {
        all.extend(auth_cases(&spec, base));
    }

    let worlds: BTreeSet<World> = all.iter().map(|c| c.world).collect();
    for world in worlds {
        let served = Served::start(world).await;
        for c in all.iter().filter(|c| c.world == world) {
            run.case(&served, c).await;
        }
        if world == World::Main {
            run.methods_not_allowed(&served, &bases).await;
            run.unknown_routes(served.addr).await;
            if !CUSTOM_APPS_MERGED {
                run.custom_apps_not_yet(&served).await;
            }
        }
        served.stop().await;
    }
    run.listeners(&bases).await;
    run.connection_answers().await;
    run.finish();
}

/// Is this operation one branch `custom-apps` brings, not yet merged?
fn pending(op: &str) -> bool {
    !CUSTOM_APPS_MERGED && CUSTOM_APPS_OPS.contains(&op)
}

/// What one run saw.
struct Run<'s> {
    spec: &'s Spec,
    /// (operationId, status, error code or "") of every answer checked.
    reached: BTreeSet<(String, u16, String)>,
    failures: Vec<String>,
    /// Answers checked, for the closing line.
    answers: usize,
}

impl<'s> Run<'s> {
    fn new(spec: &'s Spec) -> Run<'s> {
        Run {
            spec,
            reached: BTreeSet::new(),
            failures: Vec::new(),
            answers: 0,
        }
    }

    async fn case(&mut self, served: &Served, c: &Case) {
        match c.ready {
            Some(Ready::DeadLetter) => served.await_dead_letter().await,
            Some(Ready::ResendSettled(app_id)) => served.await_resend_outcome(app_id).await,
            None => {}
        }
        let body = match &c.body {
            Body::Later(later) => Body::Bytes(served.make(*later).await),
            other => other.clone(),
        };
        let mut headers = c.headers.clone();
        if let Some(key) = c.key {
            headers.push(("authorization", format!("Bearer {key}")));
        }
        let request = Request {
            method: c.method,
            path: &c.path,
            headers,
            body,
        };
        served.set_fault(c.fault);
        let answer = send(served.addr, &request).await;
        served.set_fault(Fault::None);
        let what = c.describe();
        let code = answer.code();
        if (answer.status, code.as_str()) != (c.expect.0, c.expect.1) {
            self.failures.push(format!(
                "{what}: expected {} {:?}, got {} {code:?}: {}",
                c.expect.0,
                c.expect.1,
                answer.status,
                answer.text()
            ));
            return;
        }
        if let (Some(check), Some(body)) = (c.also, answer.json()) {
            check(&body);
        }
        // A request body the server took must be one the spec documents.
        if answer.status < 300 {
            if let Body::Bytes(bytes) = &request.body {
                if let Ok(value) = serde_json::from_slice::<Value>(bytes) {
                    self.check_request_body(c.op, &value, &what);
                }
            }
        }
        self.check_operation(c.op, c.method == "HEAD", &answer, &what);
    }

    /// The answer of operation `op` against the spec, and note it as reached.
    fn check_operation(&mut self, op: &str, head: bool, answer: &Answer, what: &str) {
        self.answers += 1;
        let Some(response) = self.spec.ops[op].responses.get(&answer.status) else {
            self.failures.push(format!(
                "{what}: status {} is not documented for {op}: {}",
                answer.status,
                answer.text()
            ));
            return;
        };
        let errors = self.spec.check_answer(response, head, answer);
        self.failures
            .extend(errors.into_iter().map(|e| format!("{what}: {e}")));
        self.reached
            .insert((op.to_string(), answer.status, answer.code()));
    }

    /// An answer that belongs to no operation against a shared response (`#/components/responses/NAME`).
    fn check_shared(&mut self, name: &str, answer: &Answer, what: &str) {
        self.answers += 1;
        let response = self
            .spec
            .resolve(&json!({"$ref": format!("#/components/responses/{name}")}))
            .clone();
        let errors = self.spec.check_answer(&response, false, answer);
        self.failures
            .extend(errors.into_iter().map(|e| format!("{what}: {e}")));
        self.reached
            .insert((format!("#{name}"), answer.status, answer.code()));
    }

    fn check_request_body(&mut self, op: &str, body: &Value, what: &str) {
        let Some(request_body) = self.spec.ops[op].request_body.as_ref() else {
            self.failures
                .push(format!("{what}: {op} documents no request body"));
            return;
        };
        let schema = &request_body["content"]["application/json"]["schema"];
        let mut errors = Vec::new();
        self.spec.validate(schema, body, "request", &mut errors);
        self.failures.extend(
            errors
                .into_iter()
                .map(|e| format!("{what}: the request body the server took: {e}")),
        );
    }

    /// Each documented path answers a method it does not list with `405` and an `Allow` naming
    /// exactly the methods it lists.
    async fn methods_not_allowed(&mut self, served: &Served, bases: &BTreeMap<&str, Case>) {
        for (path, methods) in &self.spec.paths {
            let Some(base) = methods.iter().find_map(|(_, op)| bases.get(op.as_str())) else {
                continue; // A pending path: it answers 404 for now (custom_apps_not_yet).
            };
            let answer = send(
                served.addr,
                &Request {
                    method: "PATCH",
                    path: &base.path,
                    headers: Vec::new(),
                    body: Body::None,
                },
            )
            .await;
            let what = format!("PATCH {path}");
            if answer.status != 405 {
                self.failures.push(format!(
                    "{what}: expected 405, got {}: {}",
                    answer.status,
                    answer.text()
                ));
                continue;
            }
            let allow: BTreeSet<String> = answer
                .header("allow")
                .unwrap_or("")
                .split(',')
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .collect();
            let documented: BTreeSet<String> = methods.keys().cloned().collect();
            if allow != documented {
                self.failures.push(format!(
                    "{what}: Allow says {allow:?}, the spec documents {documented:?}"
                ));
            }
            self.check_shared("MethodNotAllowed", &answer, &what);
        }
    }

    async fn unknown_routes(&mut self, addr: SocketAddr) {
        for path in ["/nope", "/v1", "/v1/apps/a/b/c/d/e/f/g/h", "/events/a/b"] {
            let answer = send(addr, &Request::get(path)).await;
            let what = format!("GET {path}");
            if answer.status != 404 || answer.code() != "not_found" {
                self.failures.push(format!(
                    "{what}: expected 404 not_found, got {}",
                    answer.text()
                ));
                continue;
            }
            self.check_shared("RouteNotFound", &answer, &what);
        }
    }

    /// Until branch `custom-apps` is merged its paths are unknown here.
    async fn custom_apps_not_yet(&mut self, served: &Served) {
        let mut seen = BTreeSet::new();
        for c in custom_apps_cases()
            .into_iter()
            .filter(|c| CUSTOM_APPS_OPS.contains(&c.op))
            .filter(|c| seen.insert((c.method, c.path.clone())))
        {
            let request = Request {
                method: c.method,
                path: &c.path,
                headers: Vec::new(),
                body: Body::None,
            };
            let answer = send(served.addr, &request).await;
            let what = format!("{} (before branch custom-apps)", c.describe());
            if (answer.status, answer.code().as_str()) != (404, "not_found") {
                self.failures.push(format!(
                    "{what}: expected 404 not_found, got {}; merged? set CUSTOM_APPS_MERGED",
                    answer.text()
                ));
                continue;
            }
            self.check_shared("RouteNotFound", &answer, &what);
        }
    }

    /// With `api_listen` and `ops_listen` set, each path is served where its `x-listener` says
    /// and answers `404 not_found` on the other listeners.
    async fn listeners(&mut self, bases: &BTreeMap<&str, Case>) {
        let split = Split::start().await;
        for (path, methods) in &self.spec.paths {
            let Some((method, op)) = methods
                .iter()
                .find(|(_, op)| bases.contains_key(op.as_str()))
            else {
                continue;
            };
            let base = &bases[op.as_str()];
            let listener = self.spec.listener(path);
            for (name, addr) in [
                ("listen", split.main),
                ("api_listen", split.api),
                ("ops_listen", split.ops),
            ] {
                let serves = match listener.as_str() {
                    "all" => true,
                    "events" => name == "listen",
                    "api" => name == "api_listen",
                    "ops" => name == "ops_listen",
                    other => panic!("{path}: x-listener {other:?}"),
                };
                let request = Request {
                    method: base.method,
                    path: &base.path,
                    headers: Vec::new(),
                    body: Body::None,
                };
                let answer = send(addr, &request).await;
                let what = format!("{method} {} on {name}", base.path);
                let not_found = (answer.status, answer.code().as_str()) == (404, "not_found");
                if serves == not_found {
                    self.failures.push(format!(
                        "{what}: x-listener is {listener:?}, but it answered {}",
                        answer.text()
                    ));
                } else if serves {
                    self.check_operation(op, base.method == "HEAD", &answer, &what);
                } else {
                    self.check_shared("RouteNotFound", &answer, &what);
                }
            }
        }
        split.stop().await;
    }

    /// The connection layer's own answers, before any route is matched.
    async fn connection_answers(&mut self) {
        let app = TestApp::spawn(&format!(
            "[server]\nmax_connections_per_peer = 2\nmax_header_bytes = \"128KiB\"\n\
             header_read_timeout = \"60s\"\n{}",
            app_toml(APP_ID, Some(KEY), TOKEN)
        ))
        .await;
        let long_uri = format!(
            "GET /{} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            "a".repeat(70_000)
        );
        let big_head = format!(
            "GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n",
            "a".repeat(140 * 1024)
        );
        let raw: [(&[u8], &str); 3] = [
            (b"G@T / HTTP/1.1\r\nhost: x\r\n\r\n", "MalformedRequest"),
            (long_uri.as_bytes(), "UriTooLong"),
            (big_head.as_bytes(), "HeaderTooLarge"),
        ];
        for (request, response) in raw {
            let answer = exchange(app.addr, None, request).await;
            self.check_shared(
                response,
                &answer,
                &format!("the connection layer: {response}"),
            );
        }
        // Two connections from one address hold its share; the third is refused at once.
        let from = [127, 0, 0, 3];
        let _held = [
            connect(app.addr, Some(from)).await,
            connect(app.addr, Some(from)).await,
        ];
        let state = app.state.clone();
        crate::util::eventually("two connections held", || open_connections(&state) >= 2).await;
        let answer = exchange(app.addr, Some(from), b"").await;
        self.check_shared(
            "TooManyConnections",
            &answer,
            "the connection layer: TooManyConnections",
        );
        app.stop().await;
    }

    /// Every documented (operation, status, code) was reached, but for those excused.
    fn finish(mut self) {
        let mut excused: BTreeSet<(String, u16, String)> = BTreeSet::new();
        let mut allow_list: Vec<(&str, u16, &str)> = UNREACHABLE
            .iter()
            .map(|(o, s, c, _)| (*o, *s, *c))
            .collect();
        if CUSTOM_APPS_MERGED {
            allow_list.extend(
                CUSTOM_APPS_UNREACHABLE
                    .iter()
                    .map(|(o, s, c, _)| (*o, *s, *c)),
            );
        } else {
            allow_list.extend(CUSTOM_APPS_ONLY);
        }
        let documented = self.spec.documented();
        for (op, status, code) in allow_list {
            let key = (op.to_string(), status, code.to_string());
            if !documented.contains(&key) {
                self.failures
                    .push(format!("excused but not documented: {key:?}"));
            }
            if self.reached.contains(&key) {
                self.failures.push(format!(
                    "excused as unreachable but reached: {key:?}; take it off the list"
                ));
            }
            excused.insert(key);
        }
        let missed: Vec<_> = documented
            .iter()
            .filter(|k| !self.reached.contains(*k) && !excused.contains(*k) && !pending(&k.0))
            .collect();
        if !missed.is_empty() {
            self.failures.push(format!(
                "documented but never reached (add a case, or excuse it with a reason): {missed:#?}"
            ));
        }
        assert!(
            self.failures.is_empty(),
            "docs/openapi.yaml and the server disagree:\n{}",
            self.failures.join("\n")
        );
        println!(
            "openapi: {} answers checked; {} documented answers reached, {} excused",
            self.answers,
            self.reached.len(),
            excused.len()
        );
    }
}

fn open_connections(state: &AppState) -> u64 {
    state
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("lark_ticketd_open_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------------------------
// The servers.

/// One world, running.
struct Served {
    addr: SocketAddr,
    stack: Option<Stack>,
    app: Option<TestApp>,
    /// World::Busy: the unfinished body that holds the budget.
    _holder: Option<TcpStream>,
}

impl Served {
    async fn start(world: World) -> Served {
        let stack = |options: StackOptions| async move {
            let stack = Stack::start(options).await;
            Served {
                addr: stack.app.addr,
                stack: Some(stack),
                app: None,
                _holder: None,
            }
        };
        let config = |text: &str| StackOptions {
            config: text.to_string(),
            ..Default::default()
        };
        match world {
            World::Main => {
                let served = stack(config(&format!(
                    "[tickets]\nresend_interval = \"1h\"\n\
                     [forwarding]\nretry_schedule = [\"10ms\"]\n\
                     [[consumers]]\nname = \"{CONSUMER}\"\nurl = \"http://127.0.0.1:1/\"\n\
                     secret = \"{CONSUMER_SECRET_A}\"\nevents = [\"im.message.receive_v1\"]\n\
                     [[clients]]\nname = \"narrow\"\nkey_sha256 = \"{}\"\napps = [\"cli_second\"]\n\
                     scopes = [\"tokens\", \"status\", \"admin\"]\n{}",
                    lark_ticketd::auth::key_sha256_hex(NARROW_BEARER),
                    app_toml(PLAIN_APP, None, PLAIN_TOKEN),
                )))
                .await;
                served.stack().wait_for_ticket(APP_ID).await;
                served
            }
            World::NoTicket => {
                stack(StackOptions {
                    no_push_on_resend: true,
                    config: "[tickets]\nresend_wait = \"200ms\"\n".into(),
                    ..Default::default()
                })
                .await
            }
            World::Refused => {
                let served = stack(StackOptions {
                    wrong_secret: true,
                    config: "[tokens]\nupstream_retries = 0\n".into(),
                    ..Default::default()
                })
                .await;
                // The resend is refused too: push the ticket the way the platform would.
                let pushed = served.stack().mock.push_ticket(APP_ID).await.unwrap();
                assert_eq!(pushed, 200);
                served
            }
            World::Slow => {
                let served = stack(config(
                    "[tokens]\nupstream_retries = 0\nupstream_timeout = \"500ms\"\n",
                ))
                .await;
                served.stack().wait_for_ticket(APP_ID).await;
                served.stack().mock.set_latency(Duration::from_secs(10));
                served
            }
            World::Stalled => stack(config("[server]\nrequest_timeout = \"300ms\"\n")).await,
            World::Busy => {
                let mut served = stack(config(
                    "[server]\nmax_body_bytes = \"64KiB\"\nmax_body_bytes_in_flight = \"64KiB\"\n\
                     body_allowance_bytes = \"2KiB\"\n",
                ))
                .await;
                served._holder = Some(hold_body_budget(served.addr).await);
                served
            }
            World::PlainOnly => {
                let app = TestApp::spawn(&app_toml(PLAIN_APP, None, PLAIN_TOKEN)).await;
                Served {
                    addr: app.addr,
                    stack: None,
                    app: Some(app),
                    _holder: None,
                }
            }
        }
    }

    fn stack(&self) -> &Stack {
        self.stack.as_ref().expect("a world with the fake platform")
    }

    fn state(&self) -> &AppState {
        match (&self.stack, &self.app) {
            (Some(stack), _) => &stack.app.state,
            (None, Some(app)) => &app.state,
            (None, None) => unreachable!(),
        }
    }

    fn set_fault(&self, fault: Fault) {
        let Store::Memory(memory) = self.state().store() else {
            panic!("the worlds run on the memory store")
        };
        memory.set_unavailable(fault == Fault::StoreDown);
        if let Some(stack) = &self.stack {
            stack.mock.set_down(fault == Fault::UpstreamDown);
        }
    }

    async fn await_resend_outcome(&self, app_id: &str) {
        let tickets = self.state().tickets();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tickets.resend_status(app_id).map(|s| s.outcome)
            == Some(lark_ticketd::tickets::ResendOutcome::Pending)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the resend of {app_id} has no outcome"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn await_dead_letter(&self) {
        let store = self.state().store();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while store.consumer_stats(CONSUMER).await.unwrap().dead == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no dead letter for {CONSUMER}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A body made when the case runs (branch `custom-apps`).
    async fn make(&self, later: Later) -> Vec<u8> {
        let mock = self.stack().mock.addr();
        let mint = |app_id: &'static str| async move {
            let answer = send(
                mock,
                &Request {
                    method: "POST",
                    path: "/mock/oauth/code",
                    headers: Vec::new(),
                    body: Body::Bytes(json!({"app_id": app_id}).to_string().into_bytes()),
                },
            )
            .await;
            assert_eq!(answer.status, 200, "{}", answer.text());
            answer.json().expect("a minted code")["code"]
                .as_str()
                .expect("code")
                .to_string()
        };
        match later {
            Later::Code(app_id) => json!({"code": mint(app_id).await}).to_string().into_bytes(),
            Later::RefreshToken(app_id) => {
                let code = mint(app_id).await;
                let answer = send(
                    self.addr,
                    &Request {
                        method: "POST",
                        path: &app_path(app_id, "/user_access_token"),
                        headers: vec![("authorization", format!("Bearer {LOGIN_BEARER}"))],
                        body: Body::Bytes(json!({"code": code}).to_string().into_bytes()),
                    },
                )
                .await;
                assert_eq!(answer.status, 200, "{}", answer.text());
                let refresh = answer.json().expect("a login")["refresh_token"].clone();
                json!({"refresh_token": refresh}).to_string().into_bytes()
            }
        }
    }

    async fn stop(self) {
        if let Some(stack) = self.stack {
            stack.stop().await;
        }
        if let Some(app) = self.app {
            app.stop().await;
        }
    }
}

/// Start a 62,000-byte body and send only its first bytes: it holds most of World::Busy's
/// 64 KiB body budget. Returns once a 10,000-byte body is refused for it.
async fn hold_body_budget(addr: SocketAddr) -> TcpStream {
    let mut holder = connect(addr, None).await;
    let head = format!(
        "POST /events/{APP_ID} HTTP/1.1\r\nhost: x\r\ncontent-length: 62000\r\n\r\n{}",
        "x".repeat(100)
    );
    holder.write_all(head.as_bytes()).await.unwrap();
    // Until the server has read that head a second body may still fit: probe until it does not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let probe = send(
            addr,
            &Request {
                method: "POST",
                path: "/events",
                headers: Vec::new(),
                body: Body::Filler(10_000),
            },
        )
        .await;
        if probe.status == 429 {
            return holder;
        }
        assert!(
            (400..500).contains(&probe.status),
            "a filler body is refused: {}",
            probe.text()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held body never spent the budget"
        );
    }
}

/// The server with `api_listen` and `ops_listen` beside `listen`.
struct Split {
    main: SocketAddr,
    api: SocketAddr,
    ops: SocketAddr,
    state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Split {
    async fn start() -> Split {
        let text = format!(
            "api_listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\n\
             [store]\nkind = \"memory\"\n{}",
            app_toml(APP_ID, Some(KEY), TOKEN)
        );
        let config = Config::parse(&text, &|_| None).expect("split config");
        let store = Store::open(&config.store).await.unwrap();
        let state = AppState::new(config, store, clock::system()).unwrap();
        let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = (
            main.local_addr().unwrap(),
            api.local_addr().unwrap(),
            ops.local_addr().unwrap(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            Listeners {
                main,
                ops: Some(ops),
                api: Some(api),
            },
            state.clone(),
            async {
                let _ = rx.await;
            },
            server::Hangups::catch(),
        ));
        Split {
            main: addrs.0,
            api: addrs.1,
            ops: addrs.2,
            state,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap().unwrap();
        self.state.store().close().await;
    }
}

// ------------------------------------------------------------------------------------------------
// HTTP/1.1 by hand: one connection per request, closed by the server after its answer.

struct Request<'a> {
    method: &'static str,
    path: &'a str,
    headers: Vec<(&'static str, String)>,
    body: Body,
}

impl<'a> Request<'a> {
    fn get(path: &'a str) -> Request<'a> {
        Request {
            method: "GET",
            path,
            headers: Vec::new(),
            body: Body::None,
        }
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The error code of an error body, or "".
    fn code(&self) -> String {
        self.json()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn text(&self) -> String {
        format!("{} {}", self.status, String::from_utf8_lossy(&self.body))
    }
}

async fn connect(addr: SocketAddr, from: Option<[u8; 4]>) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(from) = from {
        socket.bind((from, 0).into()).unwrap();
    }
    socket.connect(addr).await.unwrap()
}

async fn send(addr: SocketAddr, request: &Request<'_>) -> Answer {
    let (body, declared, stall): (&[u8], usize, bool) = match &request.body {
        Body::None => (b"", 0, false),
        Body::Bytes(bytes) => (bytes, bytes.len(), false),
        Body::Declared(n) => (b"", *n, false),
        Body::Stalled => (b"0123456789", 100, true),
        Body::Filler(_) | Body::Later(_) => (b"", 0, false),
    };
    let filler;
    let (body, declared) = match &request.body {
        Body::Filler(n) => {
            filler = vec![b' '; *n];
            (filler.as_slice(), *n)
        }
        Body::Later(_) => panic!("made before sending"),
        _ => (body, declared),
    };
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: lark-ticketd\r\n",
        request.method, request.path
    );
    if !stall {
        head.push_str("connection: close\r\n");
    }
    if declared > 0 || request.method == "POST" {
        head.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {declared}\r\n"
        ));
    }
    for (name, value) in &request.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    exchange(addr, None, &bytes).await
}

/// Write `request` (the server may answer before reading all of it) and read the answer until
/// the server closes.
async fn exchange(addr: SocketAddr, from: Option<[u8; 4]>, request: &[u8]) -> Answer {
    let mut stream = connect(addr, from).await;
    let _ = stream.write_all(request).await;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 30 s");
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> Answer {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

// ------------------------------------------------------------------------------------------------
// The spec, and the validator.

/// docs/openapi.yaml, as JSON values.
struct Spec {
    doc: Value,
    /// operationId → the operation.
    ops: BTreeMap<String, Operation>,
    /// path → method (upper case) → operationId.
    paths: BTreeMap<String, BTreeMap<String, String>>,
}

struct Operation {
    path: String,
    /// `x-requires-every-app`: only a key with `apps = ["*"]` may use it.
    every_app: bool,
    /// The `security` role: the scope the operation needs.
    scope: Option<String>,
    /// Status → the response object, `$ref` resolved.
    responses: BTreeMap<u16, Value>,
    request_body: Option<Value>,
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
const SCOPES: [&str; 4] = ["tokens", "status", "admin", "login"];

impl Spec {
    fn load() -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = yaml_rust2::YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(docs.len(), 1, "one YAML document");
        let doc = yaml_to_json(&docs[0]);
        let mut spec = Spec {
            doc,
            ops: BTreeMap::new(),
            paths: BTreeMap::new(),
        };
        let paths = spec.doc["paths"].as_object().expect("paths").clone();
        for (path, item) in &paths {
            let item = item.as_object().expect("a path item");
            for (method, op) in item {
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path}: no operationId"))
                    .to_string();
                let scope = op.get("security").map(|s| {
                    let roles = s[0]["bearerKey"].as_array().expect("bearerKey roles");
                    assert_eq!(roles.len(), 1, "{id}: one scope");
                    roles[0].as_str().expect("a scope").to_string()
                });
                let responses = op["responses"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{id}: no responses"))
                    .iter()
                    .map(|(status, r)| {
                        let status: u16 = status
                            .parse()
                            .unwrap_or_else(|_| panic!("{id}: status {status}"));
                        (status, spec.resolve(r).clone())
                    })
                    .collect();
                let request_body = op.get("requestBody").map(|b| spec.resolve(b).clone());
                let previous = spec.ops.insert(
                    id.clone(),
                    Operation {
                        path: path.clone(),
                        every_app: op["x-requires-every-app"] == true,
                        scope,
                        responses,
                        request_body,
                    },
                );
                assert!(previous.is_none(), "operationId {id} twice");
                spec.paths
                    .entry(path.clone())
                    .or_default()
                    .insert(method.to_ascii_uppercase(), id);
            }
        }
        spec
    }

    fn op(&self, id: &str) -> &Operation {
        &self.ops[id]
    }

    fn listener(&self, path: &str) -> String {
        self.doc["paths"][path]["x-listener"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no x-listener"))
            .to_string()
    }

    /// Follow `$ref`s (local ones: `#/...`) until an object without one.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        while let Some(r) = value.get("$ref").and_then(Value::as_str) {
            value = self.pointer(r);
        }
        value
    }

    fn pointer(&self, r: &str) -> &Value {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs: {r}"));
        self.doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {r} resolves to nothing"))
    }

    /// The spec's own consistency: what a reader (or a code generator) relies on.
    fn check_itself(&self) {
        assert!(
            self.doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1.")),
            "OpenAPI 3.1"
        );
        // Every $ref resolves; every schema uses only keywords the validator knows.
        fn walk(spec: &Spec, value: &Value) {
            match value {
                Value::Object(map) => {
                    if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                        spec.pointer(r);
                    }
                    if let Some(schema) = map.get("schema") {
                        spec.check_keywords(schema, "schema");
                    }
                    map.values().for_each(|v| walk(spec, v));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(spec, v)),
                _ => {}
            }
        }
        walk(self, &self.doc);
        for (name, schema) in self.doc["components"]["schemas"].as_object().unwrap() {
            self.check_keywords(schema, name);
        }
        for (id, op) in &self.ops {
            for (status, response) in &op.responses {
                assert!(
                    response["description"].is_string(),
                    "{id} {status}: no description"
                );
                if *status >= 400 && response.get("content").is_some() {
                    let schema = &response["content"]["application/json"]["schema"];
                    assert!(
                        self.codes(schema).is_some_and(|c| !c.is_empty()),
                        "{id} {status}: an error response must name its codes"
                    );
                }
            }
            assert!(
                op.responses.keys().any(|s| *s < 300),
                "{id}: no success response"
            );
            if let Some(scope) = &op.scope {
                assert!(SCOPES.contains(&scope.as_str()), "{id}: scope {scope}");
                for status in [401, 403] {
                    assert!(op.responses.contains_key(&status), "{id}: no {status}");
                }
            }
            // Every path parameter is declared.
            let item = &self.doc["paths"][&op.path];
            let method = self.paths[&op.path]
                .iter()
                .find(|(_, o)| *o == id)
                .map(|(m, _)| m.to_ascii_lowercase())
                .unwrap();
            let declared: BTreeSet<String> = [&item["parameters"], &item[&method]["parameters"]]
                .into_iter()
                .filter_map(Value::as_array)
                .flatten()
                .map(|p| self.resolve(p))
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap().to_string())
                .collect();
            let used: BTreeSet<String> = op
                .path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .map(str::to_string)
                .collect();
            assert_eq!(declared, used, "{id}: path parameters");
        }
        for path in self.paths.keys() {
            self.listener(path);
        }
    }

    /// Every route `src/routes.rs` matches (its `fn template`) is a documented path, and every
    /// documented path is a route (but branch `custom-apps`' until it is merged).
    fn check_routes_are_documented(&self) {
        let source =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/routes.rs"))
                .unwrap();
        let start = source
            .find("fn template(self)")
            .expect("routes.rs has fn template");
        let body = &source[start..];
        let body = &body[..body.find("\n    }\n").expect("the end of fn template")];
        let templates: BTreeSet<String> = body
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with('/'))
            .map(str::to_string)
            .collect();
        assert!(templates.len() > 10, "read the templates: {templates:?}");
        let documented: BTreeSet<String> = self.paths.keys().cloned().collect();
        let undocumented: Vec<_> = templates.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "routes the server matches that docs/openapi.yaml does not document: {undocumented:?}"
        );
        let not_routes: BTreeSet<&String> = documented
            .difference(&templates)
            .filter(|p| {
                !self.paths[*p]
                    .values()
                    .all(|op| CUSTOM_APPS_OPS.contains(&op.as_str()) && !CUSTOM_APPS_MERGED)
            })
            .collect();
        assert!(
            not_routes.is_empty(),
            "documented paths the server does not match: {not_routes:?}"
        );
    }

    /// Every (operationId, status, code) the spec documents: `""` for a success or a body-less
    /// answer; for an error, each code its schema allows. Plus the answers of no operation, as
    /// `#Name`.
    fn documented(&self) -> BTreeSet<(String, u16, String)> {
        let mut out = BTreeSet::new();
        for (id, op) in &self.ops {
            for (status, response) in &op.responses {
                let schema = &response["content"]["application/json"]["schema"];
                match self.codes(schema) {
                    Some(codes) if *status >= 400 => {
                        for code in codes {
                            out.insert((id.clone(), *status, code));
                        }
                    }
                    _ => {
                        out.insert((id.clone(), *status, String::new()));
                    }
                }
            }
        }
        for list in ["x-connection-responses", "x-unmatched-responses"] {
            for r in self.doc[list].as_array().expect(list) {
                let name = r["$ref"]
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/components/responses/"))
                    .expect("a shared response");
                let response = self.resolve(r);
                let schema = &response["content"]["application/json"]["schema"];
                let codes = self.codes(schema).expect("an error response");
                for code in codes {
                    let status = self.shared_status(name);
                    out.insert((format!("#{name}"), status, code));
                }
            }
        }
        out
    }

    /// The status of a response that belongs to no operation.
    fn shared_status(&self, name: &str) -> u16 {
        match name {
            "MalformedRequest" => 400,
            "UriTooLong" => 414,
            "HeaderTooLarge" => 431,
            "TooManyConnections" => 429,
            "RouteNotFound" => 404,
            "MethodNotAllowed" => 405,
            other => panic!("the status of {other}?"),
        }
    }

    /// The error codes a schema allows at `error.code`, if it constrains them.
    fn codes(&self, schema: &Value) -> Option<BTreeSet<String>> {
        fn meet(
            a: Option<BTreeSet<String>>,
            b: Option<BTreeSet<String>>,
        ) -> Option<BTreeSet<String>> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.intersection(&b).cloned().collect()),
                (a, None) => a,
                (None, b) => b,
            }
        }
        let mut out = None;
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            out = meet(out, self.codes(self.pointer(r)));
        }
        for all in schema
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out = meet(out, self.codes(all));
        }
        let code = &schema["properties"]["error"]["properties"]["code"];
        let listed = match (code.get("enum"), code.get("const")) {
            (Some(Value::Array(values)), _) => Some(
                values
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            ),
            (_, Some(Value::String(c))) => Some(BTreeSet::from([c.clone()])),
            _ => None,
        };
        meet(out, listed)
    }

    /// One answer against one documented response.
    fn check_answer(&self, response: &Value, head: bool, answer: &Answer) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(headers) = response.get("headers").and_then(Value::as_object) {
            for (name, header) in headers {
                let header = self.resolve(header);
                let value = answer.header(&name.to_ascii_lowercase());
                match value {
                    None if header["required"] == true => {
                        errors.push(format!("header {name} is required and missing"))
                    }
                    Some(value) => {
                        self.validate(&header["schema"], &json!(value), name, &mut errors)
                    }
                    None => {}
                }
            }
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            if !answer.body.is_empty() {
                errors.push(format!(
                    "the spec documents no body, the answer has one: {}",
                    answer.text()
                ));
            }
            return errors;
        };
        let content_type = answer.header("content-type").unwrap_or("");
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let Some(media) = content.get(&essence) else {
            errors.push(format!(
                "content type {content_type:?} is not one of {:?}",
                content.keys().collect::<Vec<_>>()
            ));
            return errors;
        };
        if head {
            return errors;
        }
        let schema = &media["schema"];
        if essence == "application/json" {
            match answer.json() {
                Some(body) => self.validate(schema, &body, "body", &mut errors),
                None => errors.push(format!("the body is not JSON: {}", answer.text())),
            }
        } else {
            let text = String::from_utf8(answer.body.clone());
            match text {
                Ok(text) if !text.is_empty() => {
                    self.validate(schema, &Value::String(text), "body", &mut errors)
                }
                _ => errors.push(format!("an empty or non-UTF-8 {essence} body")),
            }
        }
        errors
    }

    /// Refuse schema keywords the validator does not apply.
    fn check_keywords(&self, schema: &Value, at: &str) {
        let Some(map) = schema.as_object() else {
            assert!(
                schema.is_boolean(),
                "{at}: a schema is an object or a boolean"
            );
            return;
        };
        for (keyword, value) in map {
            let here = format!("{at}/{keyword}");
            match keyword.as_str() {
                "properties" => {
                    for (name, s) in value.as_object().expect("properties") {
                        self.check_keywords(s, &format!("{here}/{name}"));
                    }
                }
                "items" | "additionalProperties" => self.check_keywords(value, &here),
                "allOf" | "oneOf" | "anyOf" => {
                    for s in value.as_array().expect("a list of schemas") {
                        self.check_keywords(s, &here);
                    }
                }
                "$ref" | "type" | "enum" | "const" | "required" | "minimum" | "minLength"
                | "maxLength" | "minItems" | "maxItems" | "pattern" => {}
                "description" | "title" | "format" | "example" | "examples" | "deprecated"
                | "default" => {}
                k if k.starts_with("x-") => {}
                other => panic!(
                    "{at}: the validator does not apply the keyword {other:?}: teach it, or do not use it"
                ),
            }
        }
    }

    /// JSON Schema (the subject `check_keywords` allows) over a `serde_json::Value`.
    fn validate(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let Some(map) = schema.as_object() else {
            if schema == &Value::Bool(false) {
                errors.push(format!("{at}: nothing is allowed here"));
            }
            return;
        };
        for (keyword, rule) in map {
            match keyword.as_str() {
                "$ref" => self.validate(self.pointer(rule.as_str().unwrap()), value, at, errors),
                "type" => {
                    let types: Vec<&str> = match rule {
                        Value::String(t) => vec![t.as_str()],
                        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                        _ => panic!("{at}: type {rule}"),
                    };
                    if !types.iter().any(|t| is_type(value, t)) {
                        errors.push(format!("{at}: {value} is not of type {rule}"));
                    }
                }
                "enum" if !rule.as_array().unwrap().contains(value) => {
                    errors.push(format!("{at}: {value} is not one of {rule}"));
                }
                "const" if rule != value => {
                    errors.push(format!("{at}: {value} is not {rule}"));
                }
                "required" => {
                    if let Some(object) = value.as_object() {
                        for name in rule.as_array().unwrap() {
                            let name = name.as_str().unwrap();
                            if !object.contains_key(name) {
                                errors.push(format!("{at}: {name} is required"));
                            }
                        }
                    }
                }
                "properties" => {
                    if let Some(object) = value.as_object() {
                        for (name, s) in rule.as_object().unwrap() {
                            if let Some(v) = object.get(name) {
                                self.validate(s, v, &format!("{at}.{name}"), errors);
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    if let Some(object) = value.as_object() {
                        let known = map.get("properties").and_then(Value::as_object);
                        for (name, v) in object {
                            if known.is_some_and(|k| k.contains_key(name)) {
                                continue;
                            }
                            if rule == &Value::Bool(false) {
                                errors.push(format!("{at}: {name} is not documented"));
                            } else {
                                self.validate(rule, v, &format!("{at}.{name}"), errors);
                            }
                        }
                    }
                }
                "items" => {
                    if let Some(items) = value.as_array() {
                        for (i, v) in items.iter().enumerate() {
                            self.validate(rule, v, &format!("{at}[{i}]"), errors);
                        }
                    }
                }
                "allOf" => {
                    for s in rule.as_array().unwrap() {
                        self.validate(s, value, at, errors);
                    }
                }
                "oneOf" | "anyOf" => {
                    let mut failed = Vec::new();
                    let mut passed = 0;
                    for s in rule.as_array().unwrap() {
                        let mut mine = Vec::new();
                        self.validate(s, value, at, &mut mine);
                        if mine.is_empty() {
                            passed += 1;
                        } else {
                            failed.push(mine.join("; "));
                        }
                    }
                    if passed == 0 {
                        errors.push(format!(
                            "{at}: matches none of {keyword}: [{}]",
                            failed.join(" | ")
                        ));
                    } else if keyword == "oneOf" && passed > 1 {
                        errors.push(format!("{at}: matches {passed} of oneOf"));
                    }
                }
                "minimum" => {
                    if let (Some(v), Some(min)) = (value.as_f64(), rule.as_f64()) {
                        if v < min {
                            errors.push(format!("{at}: {v} < {min}"));
                        }
                    }
                }
                "minLength" | "maxLength" => {
                    if let Some(s) = value.as_str() {
                        let n = s.chars().count() as u64;
                        let bound = rule.as_u64().unwrap();
                        if (keyword == "minLength" && n < bound)
                            || (keyword == "maxLength" && n > bound)
                        {
                            errors.push(format!("{at}: {n} characters, {keyword} {bound}"));
                        }
                    }
                }
                "minItems" | "maxItems" => {
                    if let Some(items) = value.as_array() {
                        let n = items.len() as u64;
                        let bound = rule.as_u64().unwrap();
                        if (keyword == "minItems" && n < bound)
                            || (keyword == "maxItems" && n > bound)
                        {
                            errors.push(format!("{at}: {n} items, {keyword} {bound}"));
                        }
                    }
                }
                "pattern" => {
                    if let Some(s) = value.as_str() {
                        let re = regex::Regex::new(rule.as_str().unwrap()).expect("a pattern");
                        if !re.is_match(s) {
                            errors.push(format!("{at}: {s:?} does not match {rule}"));
                        }
                    }
                }
                _ => {} // annotations (check_keywords refused everything else)
            }
        }
    }
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        other => panic!("type {other:?}"),
    }
}

/// YAML (as yaml-rust2 reads it) to JSON. Mapping keys become strings (`200:` → `"200"`).
fn yaml_to_json(yaml: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match yaml {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => json!(r.parse::<f64>().expect("a number")),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => panic!("a mapping key {other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::BadValue => panic!("no aliases in docs/openapi.yaml"),
    }
}

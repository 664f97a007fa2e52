//! `mock-feishu`: a local fake of the Feishu / Lark Open Platform, for the demo, the tests, and
//! developers who have no Feishu tenant at hand.
//!
//! It is faithful where lark-ticketd (or any client) depends on the platform's behaviour
//! (protocol.md §6, §6b, §6c):
//! * the three store-app auth endpoints with Feishu's JSON shape (`{"code", "msg", ...}`), its
//!   error codes — `10003` bad parameters, `10014` unknown app, `10015` wrong app secret,
//!   `10012` invalid app_ticket, `99991664` invalid app_access_token — answered with HTTP 400;
//! * the self-built ("custom") app endpoints, `app_access_token/internal` and
//!   `tenant_access_token/internal` (app_id + app_secret alone; the tenant token is for the app's
//!   own tenant, [`own_tenant_key`]); a store app asking there, or a custom app asking the
//!   store-app endpoints or for a ticket resend (`10016`), is refused;
//! * `expire` counts down; the same token is returned while at least 30 minutes remain and a new
//!   one below that, the old one staying valid until its own expiry; tenant tokens per tenant_key;
//! * OAuth login: `GET /open-apis/authen/v1/authorize` (what a browser opens: it signs in a mock
//!   user at once and redirects to `redirect_uri` with `code` and `state`), the v2 token endpoint
//!   `POST /open-apis/authen/v2/oauth/token` (authorization codes single-use and valid 5
//!   minutes, bound to their app, `redirect_uri` and PKCE challenge; refresh tokens single-use,
//!   issued only with the `offline_access` scope; errors as `{"code", "error",
//!   "error_description"}` with HTTP 400: `20001` missing parameter, `20002` wrong client
//!   credentials, `20003` invalid, used or mismatched code, `20004` expired code, `20026`
//!   invalid or used refresh token, `20037` expired refresh token — the numbers beyond 20003
//!   are the mock's, not confirmed against Feishu), and `GET /open-apis/authen/v1/user_info`
//!   (identity and `tenant_key` for a user access token, `99991663` otherwise);
//!   `POST /mock/oauth/code` mints a code for a (tenant, user) without a browser;
//! * `app_ticket/resend` answers `{"code":0}` and then pushes a freshly encrypted, signed
//!   `app_ticket` event to the events URL, as the platform does; an optional periodic push
//!   imitates the hourly schedule; tickets stay valid for 12 hours;
//! * a business endpoint, `GET /open-apis/tenant/v2/tenant/query` ("get tenant info", a typed
//!   method in every official SDK), that checks a tenant_access_token as the platform does, so a
//!   client can prove its token works and its invalidate-and-retry path runs: `99991661`
//!   without a token, `99991663` when it is invalid, with HTTP 400 (the status third-party
//!   captures show Feishu sending them with; the Node SDK throws on it, the Python and Go SDKs
//!   return the code).
//!
//! For tests and chaos: latency and error-rate injection, an "upstream down" switch, token
//! revocation (also at `POST /mock/revoke`, optionally naming the code the business endpoint
//! then answers), ticket invalidation, per-endpoint call counts (also at `GET /mock/calls`), and the
//! most auth calls it had in progress at once (to test a client's concurrency bound).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::{Rng, RngCore};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::clock::SharedClock;
use crate::config::{AppKind, Config};
use crate::push::{self, Seal};
use crate::secret::Secret;
use crate::tokens::upstream::{
    APP_ACCESS_TOKEN_INTERNAL_PATH, APP_ACCESS_TOKEN_PATH, APP_TICKET_RESEND_PATH,
    OAUTH_TOKEN_PATH, TENANT_ACCESS_TOKEN_INTERNAL_PATH, TENANT_ACCESS_TOKEN_PATH, USER_INFO_PATH,
};

/// The business endpoint that checks a tenant_access_token.
pub const TENANT_QUERY_PATH: &str = "/open-apis/tenant/v2/tenant/query";
/// Feishu returns the same token while at least this much of its life remains.
pub const SAME_TOKEN_WHILE_MS: u64 = 30 * 60 * 1000;
/// Where a browser starts a login (Feishu serves it on `accounts.feishu.cn`; the mock on its
/// own address).
pub const AUTHORIZE_PATH: &str = "/open-apis/authen/v1/authorize";
/// An authorization code is valid this long, once.
pub const CODE_TTL_MS: u64 = 5 * 60 * 1000;
/// A refresh token is valid this long, once.
pub const REFRESH_TOKEN_TTL_S: u64 = 7 * 24 * 3600;
/// The tenant a minted code's user belongs to when none is named (store apps).
pub const DEFAULT_TENANT_KEY: &str = "736588c9260f175d";
/// The user a minted code signs in when none is named.
pub const DEFAULT_USER_ID: &str = "mock-user-1";

/// One app the fake platform knows.
#[derive(Debug, Clone)]
pub struct MockApp {
    pub app_id: String,
    pub kind: AppKind,
    pub app_secret: Secret,
    pub encrypt_key: Option<Secret>,
    /// `None`: the app's events are not pushed anywhere (a custom app without one).
    pub verification_token: Option<Secret>,
}

/// The tenant a custom app lives in, as the mock has it: stable per app id, shaped like a
/// Feishu tenant_key (16 hex digits).
pub fn own_tenant_key(app_id: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(format!("tenant-of/{app_id}").as_bytes())[..8])
}

/// How the fake platform behaves.
#[derive(Clone)]
pub struct MockOptions {
    pub apps: Vec<MockApp>,
    /// Where ticket pushes go; `{app_id}` is replaced by the app id. `None`: no pushes.
    pub events_url: Option<String>,
    /// Push a new ticket to every app this often (Feishu: hourly). `None`: only on resend.
    pub push_interval: Option<Duration>,
    /// Push a new ticket after each accepted resend request (Feishu does; tests may not want it).
    pub push_on_resend: bool,
    /// Lifetime of issued tokens (Feishu: 2 hours).
    pub token_ttl: Duration,
    /// How long a ticket is accepted after it was pushed.
    pub ticket_ttl: Duration,
    /// Delay before answering each auth call.
    pub latency: Duration,
    /// Share of auth calls answered with HTTP 500, 0.0 to 1.0.
    pub error_rate: f64,
    pub clock: SharedClock,
}

impl MockOptions {
    /// The apps of a lark-ticketd config, with Feishu's defaults.
    pub fn from_config(config: &Config, clock: SharedClock) -> MockOptions {
        MockOptions {
            apps: config
                .apps
                .iter()
                .map(|a| MockApp {
                    app_id: a.app_id.clone(),
                    kind: a.kind,
                    app_secret: a.app_secret.clone(),
                    encrypt_key: a.encrypt_key.clone(),
                    verification_token: a.verification_token.clone(),
                })
                .collect(),
            events_url: None,
            push_interval: None,
            push_on_resend: true,
            token_ttl: Duration::from_secs(2 * 3600),
            ticket_ttl: Duration::from_secs(12 * 3600),
            latency: Duration::ZERO,
            error_rate: 0.0,
            clock,
        }
    }
}

/// The endpoints whose calls are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    AppAccessToken,
    TenantAccessToken,
    AppTicketResend,
    TenantQuery,
    /// Self-built apps.
    AppAccessTokenInternal,
    TenantAccessTokenInternal,
    /// OAuth login: the v2 token endpoint and `user_info`.
    OAuthToken,
    UserInfo,
}

impl Endpoint {
    /// The three store-app auth endpoints.
    pub const ALL_AUTH: [Endpoint; 3] = [
        Endpoint::AppAccessToken,
        Endpoint::TenantAccessToken,
        Endpoint::AppTicketResend,
    ];

    /// Every endpoint that issues an app's tokens or asks for a ticket, both kinds.
    pub const ALL_TOKENS: [Endpoint; 5] = [
        Endpoint::AppAccessToken,
        Endpoint::TenantAccessToken,
        Endpoint::AppTicketResend,
        Endpoint::AppAccessTokenInternal,
        Endpoint::TenantAccessTokenInternal,
    ];

    const ALL: [Endpoint; 8] = [
        Endpoint::AppAccessToken,
        Endpoint::TenantAccessToken,
        Endpoint::AppTicketResend,
        Endpoint::TenantQuery,
        Endpoint::AppAccessTokenInternal,
        Endpoint::TenantAccessTokenInternal,
        Endpoint::OAuthToken,
        Endpoint::UserInfo,
    ];

    fn name(self) -> &'static str {
        match self {
            Endpoint::AppAccessToken => "app_access_token",
            Endpoint::TenantAccessToken => "tenant_access_token",
            Endpoint::AppTicketResend => "app_ticket_resend",
            Endpoint::TenantQuery => "tenant_query",
            Endpoint::AppAccessTokenInternal => "app_access_token_internal",
            Endpoint::TenantAccessTokenInternal => "tenant_access_token_internal",
            Endpoint::OAuthToken => "oauth_token",
            Endpoint::UserInfo => "user_info",
        }
    }
}

/// A user of a tenant, as the mock signs them in.
#[derive(Debug, Clone)]
struct MockUser {
    app_id: String,
    tenant_key: String,
    user_id: String,
    name: String,
}

impl MockUser {
    /// Per app and user, as Feishu's `open_id`.
    fn open_id(&self) -> String {
        format!(
            "ou_{}",
            digest_hex(&["open", &self.app_id, &self.tenant_key, &self.user_id])
        )
    }

    /// Per developer and user (one developer here), as Feishu's `union_id`.
    fn union_id(&self) -> String {
        format!(
            "on_{}",
            digest_hex(&["union", &self.tenant_key, &self.user_id])
        )
    }
}

fn digest_hex(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(parts.join("/").as_bytes())[..16])
}

/// An authorization code, until it is used or expires.
struct Code {
    user: MockUser,
    redirect_uri: Option<String>,
    /// PKCE: the challenge and its method (`S256` or `plain`).
    challenge: Option<(String, String)>,
    scope: String,
    issued_ms: u64,
}

/// A refresh token, until it is used or expires.
struct Refresh {
    user: MockUser,
    scope: String,
    expires_ms: u64,
}

/// What `POST /mock/oauth/code` (and [`MockFeishu::mint_code`]) takes: who signs in.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct CodeRequest {
    pub app_id: String,
    /// Default: a custom app's own tenant; [`DEFAULT_TENANT_KEY`] for a store app.
    #[serde(default)]
    pub tenant_key: Option<String>,
    /// Default: [`DEFAULT_USER_ID`].
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// When set, the exchange must name the same one.
    #[serde(default)]
    pub redirect_uri: Option<String>,
    /// Default `offline_access` (so a refresh token is issued); `""` for none.
    #[serde(default)]
    pub scope: Option<String>,
    /// PKCE.
    #[serde(default)]
    pub code_challenge: Option<String>,
    /// `S256` (default) or `plain`.
    #[serde(default)]
    pub code_challenge_method: Option<String>,
}

/// A minted code and who it signs in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MintedCode {
    pub code: String,
    pub expires_in: u64,
    pub tenant_key: String,
    pub open_id: String,
    pub union_id: String,
    pub user_id: String,
}

#[derive(Clone)]
struct Issued {
    token: String,
    expires_ms: u64,
}

#[derive(Default)]
struct Data {
    /// app_id → tickets pushed (value, pushed at).
    tickets: HashMap<String, Vec<(String, u64)>>,
    /// app_id → app tokens issued, oldest first.
    app_tokens: HashMap<String, Vec<Issued>>,
    /// (app_id, tenant_key) → tenant tokens issued, oldest first.
    tenant_tokens: HashMap<(String, String), Vec<Issued>>,
    revoked: HashSet<String>,
    /// Revoked tokens for which a test chose what the business endpoint answers (`99991664`,
    /// say); the others get `99991663`.
    revoked_answers: HashMap<String, i64>,
    /// OAuth: authorization codes not used yet.
    codes: HashMap<String, Code>,
    /// OAuth: user access tokens → (user, expires at).
    user_tokens: HashMap<String, (MockUser, u64)>,
    /// OAuth: refresh tokens not used yet.
    refresh_tokens: HashMap<String, Refresh>,
    /// app_id → resend requests received (answered or refused).
    resends: HashMap<String, u64>,
}

struct State {
    apps: HashMap<String, MockApp>,
    events_url: Option<String>,
    push_on_resend: bool,
    token_ttl_ms: u64,
    ticket_ttl_ms: u64,
    clock: SharedClock,
    latency_ms: AtomicU64,
    error_rate_bits: AtomicU64,
    down: AtomicBool,
    calls: HashMap<Endpoint, AtomicU64>,
    /// Auth calls being answered now, and the most at once since the last reset.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    pushes_ok: AtomicU64,
    pushes_failed: AtomicU64,
    data: Mutex<Data>,
    http: reqwest::Client,
}

/// A running fake Open Platform.
pub struct MockFeishu {
    addr: SocketAddr,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for MockFeishu {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

impl MockFeishu {
    /// Serve on `listener` until dropped.
    pub fn start(listener: TcpListener, options: MockOptions) -> std::io::Result<MockFeishu> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            apps: options
                .apps
                .iter()
                .map(|a| (a.app_id.clone(), a.clone()))
                .collect(),
            events_url: options.events_url.clone(),
            push_on_resend: options.push_on_resend,
            token_ttl_ms: options.token_ttl.as_millis() as u64,
            ticket_ttl_ms: options.ticket_ttl.as_millis() as u64,
            clock: options.clock.clone(),
            latency_ms: AtomicU64::new(options.latency.as_millis() as u64),
            error_rate_bits: AtomicU64::new(options.error_rate.to_bits()),
            down: AtomicBool::new(false),
            calls: Endpoint::ALL
                .iter()
                .map(|e| (*e, AtomicU64::new(0)))
                .collect(),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            pushes_ok: AtomicU64::new(0),
            pushes_failed: AtomicU64::new(0),
            data: Mutex::new(Data::default()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        });
        let mut tasks = vec![tokio::spawn(serve(listener, Arc::clone(&state)))];
        if let Some(interval) = options.push_interval {
            let state = Arc::clone(&state);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.tick().await; // the first tick is immediate; Feishu's first push is not
                loop {
                    tick.tick().await;
                    // Only store apps get tickets.
                    let mut apps: Vec<String> = state
                        .apps
                        .values()
                        .filter(|a| a.kind == AppKind::Store)
                        .map(|a| a.app_id.clone())
                        .collect();
                    apps.sort();
                    for app_id in apps {
                        let _ = state.push_new_ticket(&app_id).await;
                    }
                }
            }));
        }
        Ok(MockFeishu { addr, state, tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `base_url` to configure lark-ticketd with.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls received by an endpoint so far.
    pub fn calls(&self, endpoint: Endpoint) -> u64 {
        self.state.calls[&endpoint].load(Ordering::SeqCst)
    }

    /// The most auth calls in progress at once since the start or [`MockFeishu::reset_peak`].
    pub fn peak_concurrent_calls(&self) -> u64 {
        self.state.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Start measuring [`MockFeishu::peak_concurrent_calls`] afresh.
    pub fn reset_peak(&self) {
        self.state.peak_in_flight.store(
            self.state.in_flight.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    /// Pushes (tickets and events) that got a 2xx.
    pub fn pushes(&self) -> u64 {
        self.state.pushes_ok.load(Ordering::SeqCst)
    }

    /// Issue a new ticket for `app_id` and push it now; returns the HTTP status of the push.
    pub async fn push_ticket(&self, app_id: &str) -> Result<u16, String> {
        self.state.push_new_ticket(app_id).await
    }

    /// Push any event (a JSON object without the Verification Token) as Feishu would; returns
    /// the HTTP status of the push.
    pub async fn push_event(&self, app_id: &str, event: &str) -> Result<u16, String> {
        self.state.push_event(app_id, event).await
    }

    /// Resend requests received for `app_id` so far (whatever the answer).
    pub fn resends_for(&self, app_id: &str) -> u64 {
        self.state.data().resends.get(app_id).copied().unwrap_or(0)
    }

    /// Mint an authorization code for a (tenant, user) of `request.app_id`, as a browser login
    /// would end with (also `POST /mock/oauth/code`).
    pub fn mint_code(&self, request: &CodeRequest) -> Result<MintedCode, String> {
        self.state.mint_code(request)
    }

    /// Make a token invalid from now on (as when Feishu revokes it).
    pub fn revoke(&self, token: &str) {
        self.state.revoke(token, None);
    }

    /// [`MockFeishu::revoke`], and the business endpoint answers `code` for the token instead of
    /// `99991663` (Feishu documents no rule for which of its token codes a revoked token gets;
    /// a client must handle `99991663` and `99991664` alike).
    pub fn revoke_answering(&self, token: &str, code: i64) {
        self.state.revoke(token, Some(code));
    }

    /// Make every ticket pushed so far for `app_id` invalid (`10012` on use).
    pub fn invalidate_tickets(&self, app_id: &str) {
        self.state.data().tickets.remove(app_id);
    }

    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_error_rate(&self, rate: f64) {
        self.state
            .error_rate_bits
            .store(rate.to_bits(), Ordering::SeqCst);
    }

    /// When down, every auth call gets HTTP 503.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(state.handle(req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One auth call in progress.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Feishu's error shape.
fn feishu_error(code: i64, msg: &str) -> Response<Full<Bytes>> {
    reply(StatusCode::BAD_REQUEST, json!({"code": code, "msg": msg}))
}

/// The v2 OAuth endpoint's error shape (RFC 6749 names, plus Feishu's `code`).
fn oauth_error(code: i64, error: &str, description: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::BAD_REQUEST,
        json!({"code": code, "error": error, "error_description": description}),
    )
}

/// The PKCE challenge of a verifier (RFC 7636): `S256` is base64url(SHA-256), unpadded.
pub fn pkce_challenge(verifier: &str, method: &str) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    match method {
        "plain" => verifier.to_string(),
        _ => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(verifier.as_bytes())),
    }
}

fn str_field<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    body.get(name)?.as_str().filter(|s| !s.is_empty())
}

/// Issue per Feishu's rule: the newest token while ≥ 30 min remain, else a new one.
fn issue(
    list: &mut Vec<Issued>,
    revoked: &HashSet<String>,
    now: u64,
    ttl: u64,
    prefix: &str,
) -> Issued {
    list.retain(|t| t.expires_ms > now && !revoked.contains(&t.token));
    if let Some(latest) = list.last() {
        if latest.expires_ms.saturating_sub(now) >= SAME_TOKEN_WHILE_MS {
            return latest.clone();
        }
    }
    let fresh = Issued {
        token: format!("{prefix}{}", random_hex(20)),
        expires_ms: now + ttl,
    };
    list.push(fresh.clone());
    fresh
}

impl State {
    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, endpoint: Endpoint) {
        self.calls[&endpoint].fetch_add(1, Ordering::SeqCst);
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let endpoint = match (&method, path.as_str()) {
            (&Method::POST, APP_ACCESS_TOKEN_PATH) => Some(Endpoint::AppAccessToken),
            (&Method::POST, TENANT_ACCESS_TOKEN_PATH) => Some(Endpoint::TenantAccessToken),
            (&Method::POST, APP_TICKET_RESEND_PATH) => Some(Endpoint::AppTicketResend),
            (&Method::GET, TENANT_QUERY_PATH) => Some(Endpoint::TenantQuery),
            (&Method::POST, APP_ACCESS_TOKEN_INTERNAL_PATH) => {
                Some(Endpoint::AppAccessTokenInternal)
            }
            (&Method::POST, TENANT_ACCESS_TOKEN_INTERNAL_PATH) => {
                Some(Endpoint::TenantAccessTokenInternal)
            }
            (&Method::POST, OAUTH_TOKEN_PATH) => Some(Endpoint::OAuthToken),
            (&Method::GET, USER_INFO_PATH) => Some(Endpoint::UserInfo),
            _ => None,
        };
        let Some(endpoint) = endpoint else {
            return self.handle_admin(method, &path, req).await;
        };
        self.count(endpoint);
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight
            .fetch_max(now_in_flight, Ordering::SeqCst);
        // Counted down however the call ends (a client that hangs up drops this future).
        let _in_flight = InFlight(&self.in_flight);
        self.answer(endpoint, req).await
    }

    async fn answer(
        self: &Arc<Self>,
        endpoint: Endpoint,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        if let Some(fault) = self.inject_faults().await {
            return fault;
        }
        if matches!(endpoint, Endpoint::TenantQuery | Endpoint::UserInfo) {
            let token = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .filter(|t| !t.is_empty());
            return match endpoint {
                Endpoint::UserInfo => self.user_info(token.unwrap_or("")),
                _ => self.tenant_query(token),
            };
        }
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => serde_json::from_slice::<Value>(&b.to_bytes()).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        match endpoint {
            Endpoint::AppAccessToken => self.app_access_token(&body),
            Endpoint::TenantAccessToken => self.tenant_access_token(&body),
            Endpoint::AppAccessTokenInternal => self.app_access_token_internal(&body),
            Endpoint::TenantAccessTokenInternal => self.tenant_access_token_internal(&body),
            Endpoint::OAuthToken => self.oauth_token(&body),
            _ => self.resend(&body).await,
        }
    }

    async fn inject_faults(&self) -> Option<Response<Full<Bytes>>> {
        if self.down.load(Ordering::SeqCst) {
            return Some(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"code": -1, "msg": "service unavailable"}),
            ));
        }
        let latency = self.latency_ms.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let rate = f64::from_bits(self.error_rate_bits.load(Ordering::SeqCst));
        if rate > 0.0 && rand::thread_rng().gen_bool(rate.clamp(0.0, 1.0)) {
            return Some(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"code": -1, "msg": "internal error (injected)"}),
            ));
        }
        None
    }

    /// Check app_id and app_secret the way the platform does; an error is Feishu's (code, msg).
    fn check_app(&self, body: &Value) -> Result<&MockApp, (i64, &'static str)> {
        let (Some(app_id), Some(secret)) =
            (str_field(body, "app_id"), str_field(body, "app_secret"))
        else {
            return Err((10003, "invalid param: app_id and app_secret are required"));
        };
        let app = self
            .apps
            .get(app_id)
            .ok_or((10014, "app unauthorized: no such app"))?;
        if !app.app_secret.ct_eq(secret) {
            return Err((10015, "app secret invalid"));
        }
        Ok(app)
    }

    /// [`State::check_app`], for an app of `kind`: the store-app endpoints refuse a self-built
    /// app and the `/internal` ones an app-store app.
    fn check_app_of(&self, body: &Value, kind: AppKind) -> Result<&MockApp, (i64, &'static str)> {
        let app = self.check_app(body)?;
        match (app.kind, kind) {
            (a, b) if a == b => Ok(app),
            (AppKind::Custom, _) => Err((
                10014,
                "app unauthorized: a self-built app gets its tokens from the /internal endpoints",
            )),
            (AppKind::Store, _) => Err((
                10014,
                "app unauthorized: an app-store app gets its tokens with its app_ticket",
            )),
        }
    }

    fn app_access_token(&self, body: &Value) -> Response<Full<Bytes>> {
        let app = match self.check_app_of(body, AppKind::Store) {
            Ok(app) => app,
            Err((code, msg)) => return feishu_error(code, msg),
        };
        let Some(ticket) = str_field(body, "app_ticket") else {
            return feishu_error(10003, "invalid param: app_ticket is required");
        };
        let now = self.clock.now_ms();
        let mut data = self.data();
        let ticket_ok = data.tickets.get(&app.app_id).is_some_and(|list| {
            list.iter()
                .any(|(t, at)| t == ticket && now.saturating_sub(*at) < self.ticket_ttl_ms)
        });
        if !ticket_ok {
            return feishu_error(10012, "app ticket invalid");
        }
        let Data {
            app_tokens,
            revoked,
            ..
        } = &mut *data;
        let list = app_tokens.entry(app.app_id.clone()).or_default();
        let issued = issue(list, revoked, now, self.token_ttl_ms, "a-");
        reply(
            StatusCode::OK,
            json!({
                "code": 0,
                "msg": "success",
                "app_access_token": issued.token,
                "expire": issued.expires_ms.saturating_sub(now) / 1000,
            }),
        )
    }

    /// A self-built app's `app_access_token`: app_id + app_secret alone (protocol.md §6b).
    fn app_access_token_internal(&self, body: &Value) -> Response<Full<Bytes>> {
        let app = match self.check_app_of(body, AppKind::Custom) {
            Ok(app) => app,
            Err((code, msg)) => return feishu_error(code, msg),
        };
        let now = self.clock.now_ms();
        let mut data = self.data();
        let Data {
            app_tokens,
            revoked,
            ..
        } = &mut *data;
        let list = app_tokens.entry(app.app_id.clone()).or_default();
        let issued = issue(list, revoked, now, self.token_ttl_ms, "a-");
        reply(
            StatusCode::OK,
            json!({
                "code": 0,
                "msg": "ok",
                "app_access_token": issued.token,
                "expire": issued.expires_ms.saturating_sub(now) / 1000,
            }),
        )
    }

    /// A self-built app's `tenant_access_token`, for its own tenant ([`own_tenant_key`]).
    fn tenant_access_token_internal(&self, body: &Value) -> Response<Full<Bytes>> {
        let app = match self.check_app_of(body, AppKind::Custom) {
            Ok(app) => app,
            Err((code, msg)) => return feishu_error(code, msg),
        };
        let now = self.clock.now_ms();
        let mut data = self.data();
        let Data {
            tenant_tokens,
            revoked,
            ..
        } = &mut *data;
        let list = tenant_tokens
            .entry((app.app_id.clone(), own_tenant_key(&app.app_id)))
            .or_default();
        let issued = issue(list, revoked, now, self.token_ttl_ms, "t-");
        reply(
            StatusCode::OK,
            json!({
                "code": 0,
                "msg": "ok",
                "tenant_access_token": issued.token,
                "expire": issued.expires_ms.saturating_sub(now) / 1000,
            }),
        )
    }

    /// Mint an authorization code for a (tenant, user) of an app.
    fn mint_code(&self, request: &CodeRequest) -> Result<MintedCode, String> {
        let app = self
            .apps
            .get(&request.app_id)
            .ok_or_else(|| format!("unknown app {:?}", request.app_id))?;
        let tenant_key = match (&request.tenant_key, app.kind) {
            (Some(t), _) if !t.is_empty() => t.clone(),
            (_, AppKind::Custom) => own_tenant_key(&app.app_id),
            (_, AppKind::Store) => DEFAULT_TENANT_KEY.to_string(),
        };
        if app.kind == AppKind::Custom && tenant_key != own_tenant_key(&app.app_id) {
            return Err("a self-built app's users are in its own tenant only".to_string());
        }
        let user_id = request
            .user_id
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_USER_ID.to_string());
        let user = MockUser {
            app_id: app.app_id.clone(),
            name: request
                .name
                .clone()
                .unwrap_or_else(|| format!("Mock User {user_id}")),
            tenant_key,
            user_id,
        };
        let challenge = match &request.code_challenge {
            Some(c) if !c.is_empty() => {
                let method = request
                    .code_challenge_method
                    .clone()
                    .unwrap_or_else(|| "S256".to_string());
                if method != "S256" && method != "plain" {
                    return Err("code_challenge_method must be S256 or plain".to_string());
                }
                Some((c.clone(), method))
            }
            _ => None,
        };
        let code = format!("oc-{}", random_hex(16));
        let minted = MintedCode {
            code: code.clone(),
            expires_in: CODE_TTL_MS / 1000,
            tenant_key: user.tenant_key.clone(),
            open_id: user.open_id(),
            union_id: user.union_id(),
            user_id: user.user_id.clone(),
        };
        let scope = request
            .scope
            .clone()
            .unwrap_or_else(|| "offline_access".to_string());
        self.data().codes.insert(
            code,
            Code {
                user,
                redirect_uri: request.redirect_uri.clone().filter(|u| !u.is_empty()),
                challenge,
                scope,
                issued_ms: self.clock.now_ms(),
            },
        );
        Ok(minted)
    }

    /// The v2 OAuth token endpoint: an authorization code or a refresh token for a user's tokens.
    fn oauth_token(&self, body: &Value) -> Response<Full<Bytes>> {
        let (Some(grant_type), Some(client_id), Some(client_secret)) = (
            str_field(body, "grant_type"),
            str_field(body, "client_id"),
            str_field(body, "client_secret"),
        ) else {
            return oauth_error(
                20001,
                "invalid_request",
                "grant_type, client_id and client_secret are required",
            );
        };
        let app = match self.apps.get(client_id) {
            Some(app) if app.app_secret.ct_eq(client_secret) => app,
            _ => return oauth_error(20002, "invalid_client", "client authentication failed"),
        };
        let now = self.clock.now_ms();
        let mut data = self.data();
        let (user, scope) = match grant_type {
            "authorization_code" => {
                let Some(code) = str_field(body, "code") else {
                    return oauth_error(20001, "invalid_request", "code is required");
                };
                // Used once, whatever the outcome: a second try is refused as invalid.
                let Some(grant) = data.codes.remove(code) else {
                    return oauth_error(
                        20003,
                        "invalid_grant",
                        "the authorization code is invalid or has been used",
                    );
                };
                if now.saturating_sub(grant.issued_ms) >= CODE_TTL_MS {
                    return oauth_error(
                        20004,
                        "invalid_grant",
                        "the authorization code has expired",
                    );
                }
                if grant.user.app_id != app.app_id {
                    return oauth_error(
                        20003,
                        "invalid_grant",
                        "the authorization code is for another app",
                    );
                }
                if let Some(uri) = &grant.redirect_uri {
                    if str_field(body, "redirect_uri") != Some(uri.as_str()) {
                        return oauth_error(
                            20003,
                            "invalid_grant",
                            "redirect_uri does not match the authorization request",
                        );
                    }
                }
                if let Some((challenge, method)) = &grant.challenge {
                    let verified = str_field(body, "code_verifier").is_some_and(|v| {
                        pkce_challenge(v, method).as_bytes() == challenge.as_bytes()
                    });
                    if !verified {
                        return oauth_error(
                            20003,
                            "invalid_grant",
                            "code_verifier does not match the code_challenge",
                        );
                    }
                }
                (grant.user, grant.scope)
            }
            "refresh_token" => {
                let Some(token) = str_field(body, "refresh_token") else {
                    return oauth_error(20001, "invalid_request", "refresh_token is required");
                };
                let Some(refresh) = data.refresh_tokens.remove(token) else {
                    return oauth_error(
                        20026,
                        "invalid_grant",
                        "the refresh token is invalid or has been used",
                    );
                };
                if now >= refresh.expires_ms {
                    return oauth_error(20037, "invalid_grant", "the refresh token has expired");
                }
                if refresh.user.app_id != app.app_id {
                    return oauth_error(
                        20026,
                        "invalid_grant",
                        "the refresh token is for another app",
                    );
                }
                (refresh.user, refresh.scope)
            }
            _ => {
                return oauth_error(
                    20001,
                    "unsupported_grant_type",
                    "grant_type must be authorization_code or refresh_token",
                )
            }
        };
        let access_token = format!("u-{}", random_hex(20));
        data.user_tokens.insert(
            access_token.clone(),
            (user.clone(), now.saturating_add(self.token_ttl_ms)),
        );
        let mut answer = json!({
            "code": 0,
            "access_token": access_token,
            "expires_in": self.token_ttl_ms / 1000,
            "token_type": "Bearer",
            "scope": scope,
        });
        if scope.split_whitespace().any(|s| s == "offline_access") {
            let refresh_token = format!("ur-{}", random_hex(20));
            data.refresh_tokens.insert(
                refresh_token.clone(),
                Refresh {
                    user,
                    scope: scope.clone(),
                    expires_ms: now.saturating_add(REFRESH_TOKEN_TTL_S * 1000),
                },
            );
            answer["refresh_token"] = refresh_token.into();
            answer["refresh_token_expires_in"] = REFRESH_TOKEN_TTL_S.into();
        }
        reply(StatusCode::OK, answer)
    }

    /// Who a user access token belongs to.
    fn user_info(&self, token: &str) -> Response<Full<Bytes>> {
        let now = self.clock.now_ms();
        let data = self.data();
        let user = data
            .user_tokens
            .get(token)
            .filter(|(_, expires)| *expires > now && !data.revoked.contains(token))
            .map(|(user, _)| user.clone());
        match user {
            Some(user) => reply(
                StatusCode::OK,
                json!({"code": 0, "msg": "success", "data": {
                    "name": user.name,
                    "en_name": user.name,
                    "open_id": user.open_id(),
                    "union_id": user.union_id(),
                    "user_id": user.user_id,
                    "tenant_key": user.tenant_key,
                }}),
            ),
            None => feishu_error(
                99991663,
                "Invalid access token for authorization. Please make a request with token attached.",
            ),
        }
    }

    /// The app a valid (unexpired, unrevoked) app_access_token belongs to.
    fn app_of_token(data: &Data, token: &str, now: u64) -> Option<String> {
        if data.revoked.contains(token) {
            return None;
        }
        data.app_tokens.iter().find_map(|(app, list)| {
            list.iter()
                .any(|t| t.token == token && t.expires_ms > now)
                .then(|| app.clone())
        })
    }

    fn tenant_access_token(&self, body: &Value) -> Response<Full<Bytes>> {
        let (Some(app_token), Some(tenant_key)) = (
            str_field(body, "app_access_token"),
            str_field(body, "tenant_key"),
        ) else {
            return feishu_error(
                10003,
                "invalid param: app_access_token and tenant_key are required",
            );
        };
        let now = self.clock.now_ms();
        let mut data = self.data();
        let Some(app_id) = Self::app_of_token(&data, app_token, now) else {
            return feishu_error(99991664, "invalid app token");
        };
        let Data {
            tenant_tokens,
            revoked,
            ..
        } = &mut *data;
        let list = tenant_tokens
            .entry((app_id, tenant_key.to_string()))
            .or_default();
        let issued = issue(list, revoked, now, self.token_ttl_ms, "t-");
        reply(
            StatusCode::OK,
            json!({
                "code": 0,
                "msg": "success",
                "tenant_access_token": issued.token,
                "expire": issued.expires_ms.saturating_sub(now) / 1000,
            }),
        )
    }

    /// `GET /open-apis/tenant/v2/tenant/query` ("get tenant info"), a business endpoint that
    /// checks the caller's tenant_access_token as the platform does: the tenant of a valid
    /// (issued, unexpired, unrevoked) tenant token; else Feishu's error shape with HTTP 400 (the
    /// status Feishu sends these codes with): `99991661` without a bearer token, `99991663` for
    /// any other token (unknown, expired, revoked, an app token), or the code a test chose when
    /// it revoked the token ([`MockFeishu::revoke_answering`], `POST /mock/revoke`).
    fn tenant_query(&self, token: Option<&str>) -> Response<Full<Bytes>> {
        let Some(token) = token else {
            return feishu_error(
                99991661,
                "Missing access token for authorization. Please make a request with token attached.",
            );
        };
        let now = self.clock.now_ms();
        let data = self.data();
        let tenant = data.tenant_tokens.iter().find_map(|((_, tenant), list)| {
            list.iter()
                .any(|t| t.token == token && t.expires_ms > now && !data.revoked.contains(token))
                .then(|| tenant.clone())
        });
        match tenant {
            Some(tenant_key) => reply(
                StatusCode::OK,
                json!({"code": 0, "msg": "success",
                       "data": {"tenant": {"tenant_key": tenant_key, "name": "Mock Tenant"}}}),
            ),
            None => match data.revoked_answers.get(token) {
                Some(&code) if code == 99991664 => feishu_error(code, "invalid app token"),
                Some(&code) if code != 99991663 => feishu_error(code, "the token was revoked"),
                _ => feishu_error(
                    99991663,
                    "Invalid access token for authorization. Please make a request with token attached.",
                ),
            },
        }
    }

    /// Revoke `token`; `answer`: the code the business endpoint then answers for it.
    fn revoke(&self, token: &str, answer: Option<i64>) {
        let mut data = self.data();
        data.revoked.insert(token.to_string());
        if let Some(code) = answer {
            data.revoked_answers.insert(token.to_string(), code);
        }
    }

    async fn resend(self: &Arc<Self>, body: &Value) -> Response<Full<Bytes>> {
        if let Some(app_id) = str_field(body, "app_id") {
            *self.data().resends.entry(app_id.to_string()).or_default() += 1;
        }
        let app_id = match self.check_app(body) {
            Ok(app) if app.kind == AppKind::Custom => {
                return feishu_error(
                    10016,
                    "app resend fail: resend only works for app-store apps",
                )
            }
            Ok(app) => app.app_id.clone(),
            Err((code, msg)) => return feishu_error(code, msg),
        };
        if self.push_on_resend && self.events_url.is_some() {
            // The platform answers at once and pushes shortly after.
            let state = Arc::clone(self);
            tokio::spawn(async move {
                let _ = state.push_new_ticket(&app_id).await;
            });
        }
        reply(StatusCode::OK, json!({"code": 0, "msg": "success"}))
    }

    /// Issue a new ticket for `app_id` and push it to the events URL.
    async fn push_new_ticket(&self, app_id: &str) -> Result<u16, String> {
        let app = self
            .apps
            .get(app_id)
            .ok_or_else(|| format!("unknown app {app_id}"))?;
        if app.kind == AppKind::Custom {
            return Err(format!(
                "{app_id} is a self-built app: it gets no app_ticket"
            ));
        }
        let token = app
            .verification_token
            .as_ref()
            .ok_or_else(|| format!("{app_id} has no verification_token: no events are pushed"))?;
        let ticket = format!("ticket-{}", random_hex(16));
        let now = self.clock.now_ms();
        self.data()
            .tickets
            .entry(app_id.to_string())
            .or_default()
            .push((ticket.clone(), now));
        let json = push::app_ticket_json(
            app_id,
            &Secret::new(ticket),
            token,
            now as i64 * 1000,
            &push::random_event_id(),
        );
        self.push_json(app_id, &json).await
    }

    /// Push any event (a JSON object, as Feishu would send it, without the Verification Token:
    /// it is put where the event's schema keeps it), encrypted and signed like every push.
    async fn push_event(&self, app_id: &str, event: &str) -> Result<u16, String> {
        let app = self
            .apps
            .get(app_id)
            .ok_or_else(|| format!("unknown app {app_id}"))?;
        let token = app
            .verification_token
            .as_ref()
            .ok_or_else(|| format!("{app_id} has no verification_token: no events are pushed"))?;
        let json = push::with_token(event, token)?;
        self.push_json(app_id, &json).await
    }

    /// Seal `json` for `app_id` (encrypted with its Encrypt Key, signed at the platform's own
    /// time, as Feishu does; tests move this clock by hand) and POST it to the events URL.
    async fn push_json(&self, app_id: &str, json: &str) -> Result<u16, String> {
        let app = self
            .apps
            .get(app_id)
            .ok_or_else(|| format!("unknown app {app_id}"))?;
        let url = self
            .events_url
            .as_ref()
            .ok_or("no events URL configured")?
            .replace("{app_id}", app_id);
        let request = push::seal_at(
            json,
            Seal {
                encrypt_key: app.encrypt_key.as_ref(),
                sign: true,
            },
            self.clock.now_ms(),
        );
        match push::send(&self.http, &url, &request).await {
            Ok((status, _)) if (200..300).contains(&status) => {
                self.pushes_ok.fetch_add(1, Ordering::SeqCst);
                Ok(status)
            }
            Ok((status, body)) => {
                self.pushes_failed.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(app_id, status, body = %body, "mock-feishu: push was refused");
                Ok(status)
            }
            Err(e) => {
                self.pushes_failed.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(app_id, error = %e, "mock-feishu: push failed");
                Err(e.to_string())
            }
        }
    }

    /// `GET /open-apis/authen/v1/authorize`: the page a browser opens to sign in. The mock signs
    /// in a user at once (`user_id`, `tenant_key` and `name` may be given in the query, an
    /// extension of the mock) and redirects to `redirect_uri` with `code` and `state`.
    fn authorize(&self, uri: &hyper::Uri) -> Response<Full<Bytes>> {
        let query: HashMap<String, String> = reqwest::Url::parse(&format!("http://mock{uri}"))
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default();
        let get = |name: &str| query.get(name).filter(|v| !v.is_empty()).cloned();
        let (Some(app_id), Some(redirect_uri)) = (get("client_id"), get("redirect_uri")) else {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "client_id and redirect_uri are required"}),
            );
        };
        let Ok(mut location) = reqwest::Url::parse(&redirect_uri) else {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "redirect_uri must be an absolute URL"}),
            );
        };
        let request = CodeRequest {
            app_id,
            tenant_key: get("tenant_key"),
            user_id: get("user_id"),
            name: get("name"),
            redirect_uri: Some(redirect_uri),
            // Feishu issues a refresh token only when the user granted offline_access.
            scope: Some(get("scope").unwrap_or_default()),
            code_challenge: get("code_challenge"),
            code_challenge_method: get("code_challenge_method"),
        };
        let minted = match self.mint_code(&request) {
            Ok(minted) => minted,
            Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e})),
        };
        {
            let mut pairs = location.query_pairs_mut();
            pairs.append_pair("code", &minted.code);
            if let Some(state) = get("state") {
                pairs.append_pair("state", &state);
            }
        }
        let mut response = reply(StatusCode::FOUND, json!({"redirect": "see Location"}));
        if let Ok(value) = hyper::header::HeaderValue::from_str(location.as_str()) {
            response
                .headers_mut()
                .insert(hyper::header::LOCATION, value);
        }
        response
    }

    async fn handle_admin(
        &self,
        method: Method,
        path: &str,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, ["mock", "calls"]) => {
                let mut body = serde_json::Map::new();
                for e in Endpoint::ALL {
                    body.insert(
                        e.name().into(),
                        self.calls[&e].load(Ordering::SeqCst).into(),
                    );
                }
                body.insert(
                    "pushes_ok".into(),
                    self.pushes_ok.load(Ordering::SeqCst).into(),
                );
                body.insert(
                    "pushes_failed".into(),
                    self.pushes_failed.load(Ordering::SeqCst).into(),
                );
                reply(StatusCode::OK, Value::Object(body))
            }
            (&Method::POST, ["mock", "push", app_id]) => {
                // No body: a new app_ticket. A JSON body: that event.
                let body = match Limited::new(req.into_body(), 1024 * 1024).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => {
                        return reply(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            json!({"pushed": false, "error": "the event is larger than 1 MiB"}),
                        )
                    }
                };
                let pushed = if body.iter().all(u8::is_ascii_whitespace) {
                    self.push_new_ticket(app_id).await
                } else {
                    match std::str::from_utf8(&body) {
                        Ok(event) => self.push_event(app_id, event).await,
                        Err(_) => Err("the event is not UTF-8".to_string()),
                    }
                };
                match pushed {
                    Ok(status) => reply(StatusCode::OK, json!({"pushed": true, "status": status})),
                    Err(e) => reply(
                        StatusCode::BAD_REQUEST,
                        json!({"pushed": false, "error": e}),
                    ),
                }
            }
            (&Method::POST, ["mock", "oauth", "code"]) => {
                let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                    Ok(b) => serde_json::from_slice::<CodeRequest>(&b.to_bytes()).ok(),
                    Err(_) => None,
                };
                let Some(request) = body else {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "send {\"app_id\", \"tenant_key\"?, \"user_id\"?, \"name\"?, \"redirect_uri\"?, \"scope\"?, \"code_challenge\"?, \"code_challenge_method\"?}"}),
                    );
                };
                match self.mint_code(&request) {
                    Ok(minted) => reply(StatusCode::OK, json!(minted)),
                    Err(e) => reply(StatusCode::BAD_REQUEST, json!({"error": e})),
                }
            }
            (&Method::GET, ["open-apis", "authen", "v1", "authorize"]) => self.authorize(req.uri()),
            (&Method::POST, ["mock", "revoke"]) => {
                let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                    Ok(b) => serde_json::from_slice::<Value>(&b.to_bytes()).unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                // `code` (optional): what the business endpoint answers for the token.
                let code = match body.get("code") {
                    None | Some(Value::Null) => Ok(None),
                    Some(code) => code.as_i64().filter(|c| *c != 0).map(Some).ok_or(()),
                };
                match (str_field(&body, "token"), code) {
                    (Some(token), Ok(code)) => {
                        self.revoke(token, code);
                        reply(StatusCode::OK, json!({"revoked": true}))
                    }
                    _ => reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "send {\"token\", \"code\"?: a non-zero Feishu error code}"}),
                    ),
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                json!({"code": 404, "msg": "mock-feishu does not serve this path"}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::clock::ManualClock;

    const APP: &str = "cli_mocktest0000001";
    const SECRET: &str = "mock-test-secret";

    struct Fixture {
        mock: MockFeishu,
        clock: Arc<ManualClock>,
        http: reqwest::Client,
    }

    /// mock-feishu on port 0 with one self-built app (its tenant token needs no ticket).
    async fn start() -> Fixture {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let options = MockOptions {
            apps: vec![MockApp {
                app_id: APP.into(),
                kind: AppKind::Custom,
                app_secret: Secret::new(SECRET),
                encrypt_key: None,
                verification_token: None,
            }],
            events_url: None,
            push_interval: None,
            push_on_resend: false,
            token_ttl: Duration::from_secs(2 * 3600),
            ticket_ttl: Duration::from_secs(12 * 3600),
            latency: Duration::ZERO,
            error_rate: 0.0,
            clock: clock.clone(),
        };
        Fixture {
            mock: MockFeishu::start(listener, options).unwrap(),
            clock,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    impl Fixture {
        /// The app's tenant token, as Feishu issues it.
        async fn tenant_token(&self) -> String {
            let body: Value = self
                .http
                .post(format!(
                    "{}{TENANT_ACCESS_TOKEN_INTERNAL_PATH}",
                    self.mock.base_url()
                ))
                .json(&json!({"app_id": APP, "app_secret": SECRET}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["tenant_access_token"].as_str().unwrap().to_string()
        }

        /// `GET /open-apis/tenant/v2/tenant/query` with this Authorization header: status, body.
        async fn query(&self, authorization: Option<&str>) -> (u16, Value) {
            let mut req = self
                .http
                .get(format!("{}{TENANT_QUERY_PATH}", self.mock.base_url()));
            if let Some(value) = authorization {
                req = req.header("authorization", value);
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json().await.unwrap())
        }

        async fn post_revoke(&self, body: Value) -> (u16, Value) {
            let r = self
                .http
                .post(format!("{}/mock/revoke", self.mock.base_url()))
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json().await.unwrap())
        }
    }

    #[tokio::test]
    async fn tenant_query_answers_the_tenant_of_a_valid_token() {
        let f = start().await;
        let token = f.tenant_token().await;
        let (status, body) = f.query(Some(&format!("Bearer {token}"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["code"], 0);
        assert_eq!(body["msg"], "success");
        assert_eq!(body["data"]["tenant"]["tenant_key"], own_tenant_key(APP));
        assert_eq!(f.mock.calls(Endpoint::TenantQuery), 1);
    }

    #[tokio::test]
    async fn tenant_query_without_a_token_is_99991661() {
        let f = start().await;
        for authorization in [None, Some("Bearer "), Some("Basic dXNlcjpwdw==")] {
            let (status, body) = f.query(authorization).await;
            assert_eq!(status, 400, "{authorization:?}: {body}");
            assert_eq!(body["code"], 99991661, "{authorization:?}: {body}");
            assert!(body["msg"]
                .as_str()
                .unwrap()
                .starts_with("Missing access token"));
        }
    }

    #[tokio::test]
    async fn tenant_query_refuses_unknown_expired_and_app_tokens_with_99991663() {
        let f = start().await;
        let token = f.tenant_token().await;
        let app_token: Value = f
            .http
            .post(format!(
                "{}{APP_ACCESS_TOKEN_INTERNAL_PATH}",
                f.mock.base_url()
            ))
            .json(&json!({"app_id": APP, "app_secret": SECRET}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let app_token = app_token["app_access_token"].as_str().unwrap();
        for bad in ["t-0000000000000000000000000000000000000000", app_token] {
            let (status, body) = f.query(Some(&format!("Bearer {bad}"))).await;
            assert_eq!((status, body["code"].as_i64()), (400, Some(99991663)));
        }
        f.clock.advance(Duration::from_secs(2 * 3600));
        let (status, body) = f.query(Some(&format!("Bearer {token}"))).await;
        assert_eq!(
            (status, body["code"].as_i64()),
            (400, Some(99991663)),
            "expired"
        );
    }

    #[tokio::test]
    async fn a_revoked_token_is_refused_with_the_code_the_test_chose() {
        let f = start().await;
        // Revoked over HTTP without a code: 99991663, as Feishu answers an invalid tenant token.
        let first = f.tenant_token().await;
        assert_eq!(f.post_revoke(json!({"token": first})).await.0, 200);
        let (status, body) = f.query(Some(&format!("Bearer {first}"))).await;
        assert_eq!((status, body["code"].as_i64()), (400, Some(99991663)));
        // The revoked token is never issued again.
        let second = f.tenant_token().await;
        assert_ne!(second, first);
        assert_eq!(f.query(Some(&format!("Bearer {second}"))).await.0, 200);
        // With a code: that one.
        let (status, _) = f
            .post_revoke(json!({"token": second, "code": 99991664}))
            .await;
        assert_eq!(status, 200);
        let (status, body) = f.query(Some(&format!("Bearer {second}"))).await;
        assert_eq!(
            (status, body["code"].as_i64()),
            (400, Some(99991664)),
            "{body}"
        );
        // The library call does the same.
        let third = f.tenant_token().await;
        f.mock.revoke_answering(&third, 99991664);
        let (_, body) = f.query(Some(&format!("Bearer {third}"))).await;
        assert_eq!(body["code"], 99991664);
    }

    #[tokio::test]
    async fn mock_revoke_refuses_a_body_without_a_token_or_with_a_bad_code() {
        let f = start().await;
        let token = f.tenant_token().await;
        for body in [
            json!({}),
            json!({"token": ""}),
            json!({"token": token, "code": 0}),
            json!({"token": token, "code": "99991664"}),
        ] {
            let (status, answer) = f.post_revoke(body.clone()).await;
            assert_eq!(status, 400, "{body}: {answer}");
        }
        // Nothing was revoked.
        assert_eq!(f.query(Some(&format!("Bearer {token}"))).await.0, 200);
    }
}

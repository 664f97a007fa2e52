//! `mock-feishu`: a local fake of the Feishu / Lark Open Platform, for the demo, the tests, and
//! developers who have no Feishu tenant at hand.
//!
//! It is faithful where lark-ticketd (or any store-app client) depends on the platform's
//! behaviour (protocol.md §6):
//! * the three store-app auth endpoints with Feishu's JSON shape (`{"code", "msg", ...}`), its
//!   error codes — `10003` bad parameters, `10014` unknown app, `10015` wrong app secret,
//!   `10012` invalid app_ticket, `99991664` invalid app_access_token — answered with HTTP 400;
//! * `expire` counts down; the same token is returned while at least 30 minutes remain and a new
//!   one below that, the old one staying valid until its own expiry; tenant tokens per tenant_key;
//! * `app_ticket/resend` answers `{"code":0}` and then pushes a freshly encrypted, signed
//!   `app_ticket` event to the events URL, as the platform does; an optional periodic push
//!   imitates the hourly schedule; tickets stay valid for 12 hours;
//! * a business endpoint, `GET /open-apis/tenant/v2/tenant/query`, that checks a
//!   tenant_access_token (`99991663` when it is invalid), so a client can prove its token works.
//!
//! For tests and chaos: latency and error-rate injection, an "upstream down" switch, token
//! revocation, ticket invalidation, per-endpoint call counts (also at `GET /mock/calls`), and the
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
use crate::config::Config;
use crate::push::{self, Seal};
use crate::secret::Secret;
use crate::tokens::upstream::{
    APP_ACCESS_TOKEN_PATH, APP_TICKET_RESEND_PATH, TENANT_ACCESS_TOKEN_PATH,
};

/// The business endpoint that checks a tenant_access_token.
pub const TENANT_QUERY_PATH: &str = "/open-apis/tenant/v2/tenant/query";
/// Feishu returns the same token while at least this much of its life remains.
pub const SAME_TOKEN_WHILE_MS: u64 = 30 * 60 * 1000;

/// One app the fake platform knows.
#[derive(Debug, Clone)]
pub struct MockApp {
    pub app_id: String,
    pub app_secret: Secret,
    pub encrypt_key: Option<Secret>,
    pub verification_token: Secret,
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
}

impl Endpoint {
    /// The three store-app auth endpoints.
    pub const ALL_AUTH: [Endpoint; 3] = [
        Endpoint::AppAccessToken,
        Endpoint::TenantAccessToken,
        Endpoint::AppTicketResend,
    ];

    const ALL: [Endpoint; 4] = [
        Endpoint::AppAccessToken,
        Endpoint::TenantAccessToken,
        Endpoint::AppTicketResend,
        Endpoint::TenantQuery,
    ];

    fn name(self) -> &'static str {
        match self {
            Endpoint::AppAccessToken => "app_access_token",
            Endpoint::TenantAccessToken => "tenant_access_token",
            Endpoint::AppTicketResend => "app_ticket_resend",
            Endpoint::TenantQuery => "tenant_query",
        }
    }
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
                    let mut apps: Vec<String> = state.apps.keys().cloned().collect();
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

    /// Make a token invalid from now on (as when Feishu revokes it).
    pub fn revoke(&self, token: &str) {
        self.state.data().revoked.insert(token.to_string());
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
        if endpoint == Endpoint::TenantQuery {
            let token = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("")
                .to_string();
            return self.tenant_query(&token);
        }
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => serde_json::from_slice::<Value>(&b.to_bytes()).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        match endpoint {
            Endpoint::AppAccessToken => self.app_access_token(&body),
            Endpoint::TenantAccessToken => self.tenant_access_token(&body),
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

    fn app_access_token(&self, body: &Value) -> Response<Full<Bytes>> {
        let app = match self.check_app(body) {
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

    fn tenant_query(&self, token: &str) -> Response<Full<Bytes>> {
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
            None => feishu_error(
                99991663,
                "Invalid access token for authorization. Please make a request with token attached.",
            ),
        }
    }

    async fn resend(self: &Arc<Self>, body: &Value) -> Response<Full<Bytes>> {
        let app_id = match self.check_app(body) {
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
            &app.verification_token,
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
        let json = push::with_token(event, &app.verification_token)?;
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
            (&Method::POST, ["mock", "revoke"]) => {
                let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                    Ok(b) => serde_json::from_slice::<Value>(&b.to_bytes()).unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                match str_field(&body, "token") {
                    Some(token) => {
                        self.data().revoked.insert(token.to_string());
                        reply(StatusCode::OK, json!({"revoked": true}))
                    }
                    None => reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "send {\"token\"}"}),
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

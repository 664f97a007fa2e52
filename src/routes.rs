//! Paths to handlers, request bounds, and the one place an [`Error`] becomes a response.
//!
//! Every response is built here: successes as small JSON bodies, failures as
//! `{"error": {"code", "message"}}` with the kind's status (5xx messages stay generic; the cause
//! goes to the log, once, from [`handle`]). One log line per request, with the app, route, event
//! type, status and elapsed time, and never a secret.
//!
//! Request bodies are read here, never by hyper on its own: at most `server.max_body_bytes`
//! within `server.request_timeout`, and charged to the server-wide [`BodyBudget`] that `server`
//! puts in each request's extensions. A body that does not fit the budget is refused with
//! `429 server_busy` and `Retry-After` at once rather than waited for: under a flood of slow
//! bodies budget frees only as they time out, so waiting would mostly turn a quick refusal
//! (which Feishu retries) into a slow one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use hyper::header::{HeaderMap, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth;
use crate::config::Scope;
use crate::error::{Error, ErrorKind};
use crate::events::signature::{
    SignatureHeaders, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use crate::events::{self, Outcome, Target};
use crate::ops::{consumers, status};
use crate::secret::Secret;
use crate::tokens::login::Grant;
use crate::tokens::TokenKey;
use crate::AppState;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `listen`: events, the health checks, and whatever no other listener took.
    Main,
    /// `ops_listen`: only `/healthz`, `/readyz`, `/metrics` and the status page.
    Ops,
    /// `api_listen`: the token, status, login and consumer APIs and the health checks (and
    /// `/metrics` with the status page when there is no `ops_listen`).
    Api,
}

/// Which listener serves a route, given the listeners configured.
fn home(route: Route<'_>, config: &crate::config::Config) -> Option<Role> {
    let api = if config.api_listen.is_some() {
        Role::Api
    } else {
        Role::Main
    };
    match route {
        // Every listener answers its own health checks.
        Route::Healthz | Route::Readyz | Route::Unknown => None,
        Route::Events | Route::EventsFor(_) => Some(Role::Main),
        Route::Metrics | Route::StatusPage if config.ops_listen.is_some() => Some(Role::Ops),
        _ => Some(api),
    }
}

/// What the per-request log line reports beyond method, path and status.
#[derive(Default)]
struct RequestLog {
    app_id: Option<String>,
    event_type: Option<String>,
    /// Token API: how the token was served (hit, waited, refreshed, stale).
    served: Option<&'static str>,
    /// Token API: the authenticated client's name.
    client: Option<String>,
    /// Token API: `app`, `tenant`, or `user` (login).
    token_kind: Option<&'static str>,
}

/// Handle one request. Never fails: every error is a response.
pub async fn handle<B>(state: &AppState, role: Role, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let started = Instant::now();
    let method = req.method().clone();
    let template = Route::parse(req.uri().path()).template();
    let mut log = RequestLog::default();
    let result = route(state, role, req, &mut log).await;
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            if let Some(cause) = error.cause() {
                if error.kind().is_server_error() {
                    tracing::error!(code = error.kind().code(), cause = %cause, "request failed");
                } else {
                    tracing::debug!(code = error.kind().code(), cause = %cause, "request rejected");
                }
            }
            error_response(&error)
        }
    };
    let status = response.status().as_u16();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let error_code = response
        .extensions()
        .get::<ErrorCode>()
        .map(|c| c.0)
        .unwrap_or("");
    let metrics = state.metrics();
    if template.starts_with("/events") && method == Method::POST {
        let outcome = if error_code.is_empty() {
            "accepted"
        } else {
            error_code
        };
        let event_type = log.event_type.as_deref().unwrap_or("");
        metrics.event(event_type, outcome, elapsed_ms / 1000.0);
    }
    if let Some(kind) = log.token_kind {
        let outcome = log.served.unwrap_or(error_code);
        metrics.token_request(kind, outcome);
    }
    tracing::info!(
        method = method.as_str(),
        route = template,
        app_id = log.app_id.as_deref().unwrap_or(""),
        event_type = log.event_type.as_deref().unwrap_or(""),
        client = log.client.as_deref().unwrap_or(""),
        served = log.served.unwrap_or(""),
        status,
        error = error_code,
        elapsed_ms = (elapsed_ms * 1000.0).round() / 1000.0,
        "request"
    );
    response
}

/// The error code of an error response, for the log line.
#[derive(Clone, Copy)]
struct ErrorCode(&'static str);

/// A parsed path. Borrowed segments are app ids and tenant keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'p> {
    Events,
    EventsFor(&'p str),
    Healthz,
    Readyz,
    Metrics,
    Apps,
    App(&'p str),
    Tenants(&'p str),
    Resend(&'p str),
    /// `DELETE`: an operator drops the app's ticket.
    Ticket(&'p str),
    AppToken(&'p str),
    AppTokenInvalidate(&'p str),
    TenantToken(&'p str, &'p str),
    TenantTokenInvalidate(&'p str, &'p str),
    /// A custom app's own tenant token (no tenant_key).
    OwnTenantToken(&'p str),
    OwnTenantTokenInvalidate(&'p str),
    /// Login: exchange an authorization code, or a refresh token.
    UserToken(&'p str),
    UserTokenRefresh(&'p str),
    Consumers,
    DeadLetters(&'p str),
    Redeliver(&'p str),
    /// `GET /`: the status page, beside `/metrics`.
    StatusPage,
    Unknown,
}

impl<'p> Route<'p> {
    /// The one place paths are matched.
    fn parse(path: &'p str) -> Route<'p> {
        let mut parts = [""; 8];
        let mut n = 0;
        for segment in path.trim_end_matches('/').split('/').skip(1) {
            if n == parts.len() {
                return Route::Unknown;
            }
            parts[n] = segment;
            n += 1;
        }
        match parts[..n] {
            [] => Route::StatusPage,
            ["events"] => Route::Events,
            ["events", app] => Route::EventsFor(app),
            ["healthz"] => Route::Healthz,
            ["readyz"] => Route::Readyz,
            ["metrics"] => Route::Metrics,
            ["v1", "apps"] => Route::Apps,
            ["v1", "apps", app] => Route::App(app),
            ["v1", "apps", app, "tenants"] => Route::Tenants(app),
            ["v1", "apps", app, "ticket", "resend"] => Route::Resend(app),
            ["v1", "apps", app, "ticket"] => Route::Ticket(app),
            ["v1", "apps", app, "app_access_token"] => Route::AppToken(app),
            ["v1", "apps", app, "app_access_token", "invalidate"] => Route::AppTokenInvalidate(app),
            ["v1", "apps", app, "tenants", tenant, "tenant_access_token"] => {
                Route::TenantToken(app, tenant)
            }
            ["v1", "apps", app, "tenants", tenant, "tenant_access_token", "invalidate"] => {
                Route::TenantTokenInvalidate(app, tenant)
            }
            ["v1", "apps", app, "tenant_access_token"] => Route::OwnTenantToken(app),
            ["v1", "apps", app, "tenant_access_token", "invalidate"] => {
                Route::OwnTenantTokenInvalidate(app)
            }
            ["v1", "apps", app, "user_access_token"] => Route::UserToken(app),
            ["v1", "apps", app, "user_access_token", "refresh"] => Route::UserTokenRefresh(app),
            ["v1", "consumers"] => Route::Consumers,
            ["v1", "consumers", name, "dead"] => Route::DeadLetters(name),
            ["v1", "consumers", name, "redeliver"] => Route::Redeliver(name),
            _ => Route::Unknown,
        }
    }

    /// The template for logs and metrics: never the raw path (bounded cardinality).
    fn template(self) -> &'static str {
        match self {
            Route::Events => "/events",
            Route::EventsFor(_) => "/events/{app_id}",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::StatusPage => "/",
            Route::Apps => "/v1/apps",
            Route::App(_) => "/v1/apps/{app_id}",
            Route::Tenants(_) => "/v1/apps/{app_id}/tenants",
            Route::Resend(_) => "/v1/apps/{app_id}/ticket/resend",
            Route::Ticket(_) => "/v1/apps/{app_id}/ticket",
            Route::AppToken(_) => "/v1/apps/{app_id}/app_access_token",
            Route::AppTokenInvalidate(_) => "/v1/apps/{app_id}/app_access_token/invalidate",
            Route::TenantToken(..) => "/v1/apps/{app_id}/tenants/{tenant_key}/tenant_access_token",
            Route::TenantTokenInvalidate(..) => {
                "/v1/apps/{app_id}/tenants/{tenant_key}/tenant_access_token/invalidate"
            }
            Route::OwnTenantToken(_) => "/v1/apps/{app_id}/tenant_access_token",
            Route::OwnTenantTokenInvalidate(_) => {
                "/v1/apps/{app_id}/tenant_access_token/invalidate"
            }
            Route::UserToken(_) => "/v1/apps/{app_id}/user_access_token",
            Route::UserTokenRefresh(_) => "/v1/apps/{app_id}/user_access_token/refresh",
            Route::Consumers => "/v1/consumers",
            Route::DeadLetters(_) => "/v1/consumers/{name}/dead",
            Route::Redeliver(_) => "/v1/consumers/{name}/redeliver",
            Route::Unknown => "other",
        }
    }
}

async fn route<B>(
    state: &AppState,
    role: Role,
    req: Request<B>,
    log: &mut RequestLog,
) -> Result<Response<Full<Bytes>>, Error>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    // The URI is reference-counted: cloning it lets the route borrow from it while `req` moves on.
    let uri = req.uri().clone();
    let route = Route::parse(uri.path());
    // Each route lives on one listener (see `home`); the others answer 404.
    if home(route, state.config()).is_some_and(|home| home != role) {
        return Err(ErrorKind::NotFound.into());
    }
    match route {
        Route::Metrics => {
            only(&req, &[Method::GET])?;
            metrics(state).await
        }
        Route::StatusPage => {
            only(&req, &[Method::GET, Method::HEAD])?;
            status_page(state).await
        }
        Route::Healthz => {
            only(&req, &[Method::GET, Method::HEAD])?;
            Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
        }
        Route::Readyz => {
            only(&req, &[Method::GET, Method::HEAD])?;
            readyz(state).await
        }
        Route::Events => {
            only(&req, &[Method::POST])?;
            intake(state, Target::AnyApp, req, log).await
        }
        Route::EventsFor(app_id) => {
            only(&req, &[Method::POST])?;
            log.app_id = Some(app_id.to_string());
            intake(state, Target::App(app_id), req, log).await
        }
        Route::Apps => {
            only(&req, &[Method::GET])?;
            let client = caller(state, &req, Scope::Status, None, log)?;
            let mut apps = Vec::new();
            for app in &state.config().apps {
                if auth::authorize(&client, Scope::Status, Some(&app.app_id)).is_ok() {
                    apps.push(status::app_status(state, &app.app_id).await?);
                }
            }
            let now = state.clock().now_ms() / 1000;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"now": now, "apps": apps, "store": state.store().durability()}),
            ))
        }
        Route::App(app_id) => {
            only(&req, &[Method::GET])?;
            caller(state, &req, Scope::Status, Some(app_id), log)?;
            Ok(json(
                StatusCode::OK,
                &status::app_status(state, app_id).await?,
            ))
        }
        Route::Tenants(app_id) => {
            only(&req, &[Method::GET])?;
            caller(state, &req, Scope::Status, Some(app_id), log)?;
            let tenants = status::tenants(state, app_id).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"app_id": app_id, "tenants": tenants}),
            ))
        }
        Route::Resend(app_id) => {
            only(&req, &[Method::POST])?;
            caller(state, &req, Scope::Admin, Some(app_id), log)?;
            // Held back by the interval: `429 resend_rate_limited` with `Retry-After`.
            state.broker().resend_for_operator(app_id).await?;
            let app = status::app_status(state, app_id).await?;
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({
                    "app_id": app_id,
                    "requested": true,
                    "last_resend": app.last_resend,
                }),
            ))
        }
        Route::Ticket(app_id) => {
            only(&req, &[Method::DELETE])?;
            caller(state, &req, Scope::Admin, Some(app_id), log)?;
            let Some(dropped) = state.tickets().delete(app_id).await? else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    "no App Ticket is stored for this app",
                ));
            };
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "app_id": app_id,
                    "deleted": {
                        "fingerprint": dropped.ticket.fingerprint(),
                        "received_at": dropped.received_at_ms / 1000,
                        "arrived_via": dropped.source,
                        "rejected": dropped.rejected,
                    },
                }),
            ))
        }
        Route::Consumers => {
            only(&req, &[Method::GET])?;
            consumers::require_every_app(&*caller(state, &req, Scope::Status, None, log)?)?;
            let consumers = consumers::list(state).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "consumers": consumers }),
            ))
        }
        Route::DeadLetters(name) => {
            only(&req, &[Method::GET])?;
            consumers::require_every_app(&*caller(state, &req, Scope::Status, None, log)?)?;
            let events = consumers::dead_letters(state, name, req.uri().query()).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "consumer": name, "events": events }),
            ))
        }
        Route::Redeliver(name) => {
            only(&req, &[Method::POST])?;
            consumers::require_every_app(&*caller(state, &req, Scope::Admin, None, log)?)?;
            let (parts, body) = req.into_parts();
            let timeout = state.config().server.request_timeout;
            let (body, _budget) = read_body(&parts, body, MAX_API_BODY_BYTES, timeout).await?;
            let queued = consumers::redeliver(state, name, &body).await?;
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "queued": queued }),
            ))
        }
        Route::AppToken(app_id) | Route::AppTokenInvalidate(app_id) => {
            let invalidate = matches!(route, Route::AppTokenInvalidate(_));
            only(
                &req,
                &[if invalidate {
                    Method::POST
                } else {
                    Method::GET
                }],
            )?;
            let key = TokenKey::App(app_id.to_string());
            token_request(state, req, key, invalidate, log).await
        }
        Route::TenantToken(app_id, tenant) | Route::TenantTokenInvalidate(app_id, tenant) => {
            let invalidate = matches!(route, Route::TenantTokenInvalidate(..));
            only(
                &req,
                &[if invalidate {
                    Method::POST
                } else {
                    Method::GET
                }],
            )?;
            let key = TokenKey::Tenant(app_id.to_string(), tenant.to_string());
            token_request(state, req, key, invalidate, log).await
        }
        Route::OwnTenantToken(app_id) | Route::OwnTenantTokenInvalidate(app_id) => {
            let invalidate = matches!(route, Route::OwnTenantTokenInvalidate(_));
            only(
                &req,
                &[if invalidate {
                    Method::POST
                } else {
                    Method::GET
                }],
            )?;
            // The broker answers `tenant_key_required` for a store app.
            let key = TokenKey::OwnTenant(app_id.to_string());
            token_request(state, req, key, invalidate, log).await
        }
        Route::UserToken(app_id) | Route::UserTokenRefresh(app_id) => {
            only(&req, &[Method::POST])?;
            let refresh = matches!(route, Route::UserTokenRefresh(_));
            login_request(state, req, app_id, refresh, log).await
        }
        Route::Unknown => Err(ErrorKind::NotFound.into()),
    }
}

/// The bearer-authenticated client, allowed `scope` on `app_id` (which must exist).
fn caller<B>(
    state: &AppState,
    req: &Request<B>,
    scope: Scope,
    app_id: Option<&str>,
    log: &mut RequestLog,
) -> Result<std::sync::Arc<crate::config::ClientConfig>, Error> {
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let client = state.clients().authenticate(header)?;
    log.client = Some(client.name.clone());
    auth::authorize(&client, scope, app_id)?;
    if let Some(app_id) = app_id {
        log.app_id = Some(app_id.to_string());
        if state.config().app(app_id).is_none() {
            return Err(Error::new(
                ErrorKind::UnknownApp,
                "no app with this app_id is configured",
            ));
        }
    }
    Ok(client)
}

/// A tenant_key as Feishu issues them: short, URL-safe, and not a path segment of its own
/// (`.`, `..`: never a tenant, and a proxy in front may resolve them).
fn valid_tenant_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && !key.bytes().all(|b| b == b'.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Largest body of an API request (`{"token": ...}`).
const MAX_API_BODY_BYTES: usize = 16 * 1024;

#[derive(serde::Deserialize)]
struct InvalidateRequest {
    token: String,
}

/// `POST …/user_access_token`: what Feishu's redirect brought the login service.
#[derive(serde::Deserialize)]
struct CodeRequest {
    code: Secret,
    #[serde(default)]
    redirect_uri: Option<String>,
    #[serde(default)]
    code_verifier: Option<Secret>,
}

/// `POST …/user_access_token/refresh`.
#[derive(serde::Deserialize)]
struct RefreshRequest {
    refresh_token: Secret,
}

/// The token API's answer, in Feishu's field names.
#[derive(Serialize)]
struct TokenResponse<'a> {
    app_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_access_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_access_token: Option<&'a str>,
    /// Seconds left.
    expire: u64,
    /// Unix seconds.
    expires_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    invalidated: Option<bool>,
}

/// `GET …/{app,tenant}_access_token` and `POST …/invalidate`.
async fn token_request<B>(
    state: &AppState,
    req: Request<B>,
    key: TokenKey,
    invalidate: bool,
    log: &mut RequestLog,
) -> Result<Response<Full<Bytes>>, Error>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    log.token_kind = Some(key.kind());
    caller(state, &req, Scope::Tokens, Some(key.app_id()), log)?;
    if let TokenKey::Tenant(_, tenant_key) = &key {
        if !valid_tenant_key(tenant_key) {
            return Err(Error::new(
                ErrorKind::BadRequest,
                "tenant_key must be 1-128 letters, digits, '_', '-' or '.'",
            ));
        }
    }
    let broker = state.broker();
    let (token, invalidated) = if invalidate {
        let (parts, body) = req.into_parts();
        let timeout = state.config().server.request_timeout;
        let (body, _budget) = read_body(&parts, body, MAX_API_BODY_BYTES, timeout).await?;
        let request: InvalidateRequest = serde_json::from_slice(&body).map_err(|_| {
            Error::new(
                ErrorKind::BadRequest,
                "send {\"token\": \"<the token Feishu rejected>\"}",
            )
        })?;
        let (token, dropped) = broker.invalidate(&key, &request.token).await?;
        log.served = Some(if dropped { "refreshed" } else { "hit" });
        (token, Some(dropped))
    } else {
        let (token, served) = broker.get(&key).await?;
        log.served = Some(served.as_str());
        (token, None)
    };
    let now = state.clock().now_ms();
    let (tenant_key, app_token, tenant_token) = match &key {
        TokenKey::App(_) => (None, Some(token.value.expose()), None),
        TokenKey::Tenant(_, tenant_key) => {
            (Some(tenant_key.as_str()), None, Some(token.value.expose()))
        }
        TokenKey::OwnTenant(_) => (None, None, Some(token.value.expose())),
    };
    let body = TokenResponse {
        app_id: key.app_id(),
        tenant_key,
        app_access_token: app_token,
        tenant_access_token: tenant_token,
        expire: token.expire_s(now),
        expires_at: token.expires_at_ms / 1000,
        invalidated,
    };
    let mut response = json(StatusCode::OK, &body);
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

/// `POST …/user_access_token` (`refresh`: `…/refresh`): a login through the broker. The body
/// holds a code or a refresh token: it is parsed into [`Secret`]s and never logged.
async fn login_request<B>(
    state: &AppState,
    req: Request<B>,
    app_id: &str,
    refresh: bool,
    log: &mut RequestLog,
) -> Result<Response<Full<Bytes>>, Error>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    log.token_kind = Some("user");
    caller(state, &req, Scope::Login, Some(app_id), log)?;
    let (parts, body) = req.into_parts();
    let timeout = state.config().server.request_timeout;
    let (body, _budget) = read_body(&parts, body, MAX_API_BODY_BYTES, timeout).await?;
    let grant = if refresh {
        let r: RefreshRequest = serde_json::from_slice(&body)
            .ok()
            .filter(|r: &RefreshRequest| !r.refresh_token.is_empty())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::BadRequest,
                    "send {\"refresh_token\": \"<the refresh token of the last exchange>\"}",
                )
            })?;
        Grant::Refresh(r.refresh_token)
    } else {
        let r: CodeRequest = serde_json::from_slice(&body)
            .ok()
            .filter(|r: &CodeRequest| !r.code.is_empty())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::BadRequest,
                    "send {\"code\": \"<the authorization code>\", \"redirect_uri\"?, \"code_verifier\"?}",
                )
            })?;
        Grant::Code {
            code: r.code,
            redirect_uri: r.redirect_uri.filter(|u| !u.is_empty()),
            code_verifier: r.code_verifier.filter(|v| !v.is_empty()),
        }
    };
    let login = state.broker().login(app_id, grant).await?;
    log.served = Some(if refresh { "refreshed" } else { "exchanged" });
    let mut response = json(StatusCode::OK, &login);
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

/// 405 with an `Allow` header unless the method is one of `allowed`.
fn only<B>(req: &Request<B>, allowed: &[Method]) -> Result<(), Error> {
    if allowed.contains(req.method()) {
        return Ok(());
    }
    let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    Err(Error::new(
        ErrorKind::MethodNotAllowed,
        format!("use {}", list.join(", ")),
    ))
}

/// The Prometheus exposition, with the ticket gauges computed now.
async fn status_page(state: &AppState) -> Result<Response<Full<Bytes>>, Error> {
    let page = crate::ops::page::gather(state).await?;
    let mut response = Response::new(Full::new(Bytes::from(crate::ops::page::render(&page))));
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // No script, no frames, no outside resources: inline style only.
    headers.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(response)
}

async fn metrics(state: &AppState) -> Result<Response<Full<Bytes>>, Error> {
    let now = state.clock().now_ms();
    let stale_after_ms = state.config().tickets.stale_after.as_millis() as u64;
    for app in &state.config().apps {
        // An app without a ticket (a custom app) has no ticket gauges: nothing to alert on.
        let Some(record) = status::ticket_record(state, &app.app_id).await? else {
            continue;
        };
        let ticket_state = status::ticket_state(record.as_ref(), now, stale_after_ms);
        let age = record.map(|r| now.saturating_sub(r.received_at_ms) as f64 / 1000.0);
        state.metrics().set_ticket(&app.app_id, ticket_state, age);
    }
    for consumer in &state.forwarder().consumer_names() {
        let stats = state.store().consumer_stats(consumer).await?;
        let oldest = stats
            .oldest_pending_received_at_ms
            .map_or(0.0, |at| now.saturating_sub(at) as f64 / 1000.0);
        state
            .metrics()
            .set_consumer(consumer, stats.pending, stats.dead, oldest);
    }
    // The log writer counts what it drops; metrics are a leaf and do not read it themselves.
    state
        .metrics()
        .log_lines_dropped(crate::ops::logging::dropped_lines());
    let mut response = Response::new(Full::new(Bytes::from(state.metrics().encode())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

async fn readyz(state: &AppState) -> Result<Response<Full<Bytes>>, Error> {
    // Readiness is "the store answers", never ticket freshness: a new replica must be ready to
    // receive its first ticket.
    state.store().ping().await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"status": "ready"}),
    ))
}

async fn intake<B>(
    state: &AppState,
    target: Target<'_>,
    req: Request<B>,
    log: &mut RequestLog,
) -> Result<Response<Full<Bytes>>, Error>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let limits = &state.config().server;
    let (parts, body) = req.into_parts();
    // `_budget` keeps the body's share of the budget until the event is handled and the body
    // dropped.
    let (body, _budget) =
        read_body(&parts, body, limits.max_body_bytes, limits.request_timeout).await?;
    let signature = signature_headers(&parts.headers);
    let verified = state.verifier().verify(target, signature, &body)?;
    log.app_id = Some(verified.app_id().to_string());
    log.event_type = Some(verified.event_type().to_string());
    match events::accept(state.intake(), verified).await? {
        Outcome::Challenge(challenge) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "challenge": challenge }),
        )),
        _ => Ok(json_bytes(
            StatusCode::OK,
            Bytes::from_static(br#"{"msg":"success"}"#),
        )),
    }
}

/// The three signature headers, if all are present and readable.
fn signature_headers(headers: &HeaderMap) -> Option<SignatureHeaders<'_>> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    Some(SignatureHeaders {
        timestamp: get(TIMESTAMP_HEADER)?,
        nonce: get(NONCE_HEADER)?,
        signature: get(SIGNATURE_HEADER)?,
    })
}

/// The server-wide budget for request-body bytes held at once (`server.max_body_bytes_in_flight`),
/// beyond a per-request allowance (`server.body_allowance_bytes`). Cheap to clone.
///
/// `server` inserts one into every request's extensions; a request without one (a handler called
/// directly, as the property tests do) is bounded by `max_body_bytes` only.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    allowance: usize,
}

impl BodyBudget {
    /// `total` bytes shared by all requests, `allowance` bytes free to each. `total` must fit in
    /// a `u32` (config validation ensures it).
    pub fn new(total: usize, allowance: usize) -> Self {
        BodyBudget {
            permits: Arc::new(Semaphore::new(total.min(u32::MAX as usize))),
            allowance,
        }
    }

    /// Bytes of the shared budget not held by any request now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Make sure `hold` covers a body of `bytes` bytes; `Busy` if the budget cannot.
    fn cover(&self, hold: &mut BudgetHold, bytes: usize) -> Result<(), Error> {
        let need = bytes.saturating_sub(self.allowance);
        let held = hold.0.as_ref().map_or(0, |p| p.num_permits());
        if need <= held {
            return Ok(());
        }
        let more = u32::try_from(need - held).map_err(|_| ErrorKind::Busy)?;
        let permit = Arc::clone(&self.permits)
            .try_acquire_many_owned(more)
            .map_err(|_| ErrorKind::Busy)?;
        match &mut hold.0 {
            Some(p) => p.merge(permit),
            None => hold.0 = Some(permit),
        }
        Ok(())
    }
}

/// A request body's share of the [`BodyBudget`], given back when dropped.
#[derive(Default)]
#[must_use = "the budget is given back as soon as the hold is dropped"]
pub struct BudgetHold(Option<OwnedSemaphorePermit>);

/// Read a body of at most `limit` bytes within `timeout`, charged to the request's
/// [`BodyBudget`] as it arrives (all of a declared `Content-Length` before the first byte is
/// read). The returned hold keeps the charge until the caller is done with the body.
async fn read_body<B>(
    parts: &Parts,
    body: B,
    limit: usize,
    timeout: Duration,
) -> Result<(Bytes, BudgetHold), Error>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(payload_too_large(limit));
    }
    let budget = parts.extensions.get::<BodyBudget>();
    let mut hold = BudgetHold::default();
    if let (Some(budget), Some(n)) = (budget, declared) {
        // `n <= limit`, a usize.
        budget.cover(&mut hold, n as usize)?;
    }
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Error::new(ErrorKind::MalformedBody, "the body could not be read")
                    .with_cause(e.to_string())
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            total += data.len();
            if total > limit {
                return Err(payload_too_large(limit));
            }
            if let Some(budget) = budget {
                budget.cover(&mut hold, total)?;
            }
            chunks.push(data);
        }
        Ok(match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => {
                let mut joined = BytesMut::with_capacity(total);
                for chunk in chunks {
                    joined.extend_from_slice(&chunk);
                }
                joined.freeze()
            }
        })
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(ErrorKind::RequestTimeout.into()),
        Ok(Err(e)) => Err(e),
        Ok(Ok(bytes)) => Ok((bytes, hold)),
    }
}

fn payload_too_large(limit: usize) -> Error {
    Error::new(
        ErrorKind::PayloadTooLarge,
        format!("the body is larger than {limit} bytes"),
    )
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    json_bytes(status, Bytes::from(body))
}

/// A response with an already serialised JSON body.
fn json_bytes(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// The one place an error becomes a response.
pub fn error_response(error: &Error) -> Response<Full<Bytes>> {
    let kind = error.kind();
    let status = StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = if kind == ErrorKind::Internal {
        "internal error"
    } else {
        error.message()
    };
    let mut body = serde_json::json!({"error": {"code": kind.code(), "message": message}});
    if let Some((code, msg)) = error.upstream() {
        body["error"]["upstream"] = serde_json::json!({"code": code, "msg": msg});
    }
    let mut response = json(status, &body);
    let headers = response.headers_mut();
    // The error's own `Retry-After` (seconds until the resend interval ends), else its kind's.
    let retry_after = match (error.retry_after(), kind) {
        (Some(after), _) => Some(crate::error::retry_after_seconds(after)),
        (None, ErrorKind::StoreUnavailable | ErrorKind::TicketMissing) => Some(5),
        (None, ErrorKind::Busy) => Some(1),
        _ => None,
    };
    if let Some(seconds) = retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    match kind {
        ErrorKind::Unauthorized => {
            headers.insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        ErrorKind::MethodNotAllowed => {
            if let Some(allow) = error
                .message()
                .strip_prefix("use ")
                .and_then(|m| HeaderValue::from_str(m).ok())
            {
                headers.insert(ALLOW, allow);
            }
        }
        _ => {}
    }
    response.extensions_mut().insert(ErrorCode(kind.code()));
    response
}

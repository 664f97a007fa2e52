//! The Feishu / Lark auth API on each app's `base_url`: the store-app endpoints (protocol.md §6:
//! `app_access_token`, `tenant_access_token`, `app_ticket/resend`), the self-built ("custom")
//! app endpoints (§6b: the same two tokens from `/internal`, app_id + app_secret alone), and
//! OAuth login (§6c: the v2 token endpoint, then `user_info`).
//!
//! Every attempt has a timeout (`tokens.upstream_timeout`), and every call a **deadline** that the
//! caller gives (a token fetch: `tokens.request_deadline` from the start of its flight): no
//! attempt runs past it, and no retry starts that could not finish before it — the deadline, not
//! `(retries + 1) × timeout`, bounds what a caller waits for Feishu. Transport failures
//! (including timeouts) and 5xx answers are retried with exponential backoff and jitter; an
//! answered error (`code != 0`, HTTP < 500) is never retried — it is Feishu's verdict, and the
//! broker decides what it means (10012: resend the ticket; 99991663 / 99991664: drop that token).
//! Non-200 statuses are still parsed for `code` and `msg`, since Feishu answers some auth failures
//! with HTTP 400 and a JSON body; a 5xx that carries a `code` keeps it ([`UpstreamError::Server`]),
//! so the caller's `502 upstream_error` says what Feishu said.
//!
//! **A failure names its cause** ([`no_answer`], [`unusable_answer`]): connection refused, DNS
//! lookup failed, TLS handshake failed, the connection closed, no answer within the timeout or
//! before the deadline, an HTTP status without Feishu's JSON answer, a body that is not JSON —
//! from reqwest's classification and the error's `source()` chain (the io error's kind, hyper's
//! connector stage), never from the URL: messages carry no URL (the request's is ours to know,
//! and a base URL may hold credentials) and no body (it may hold a token).
//!
//! The OAuth token call is the exception: it is **never retried**. Its authorization code and
//! refresh token are single-use, so a retry after a lost answer would be refused (the first
//! attempt spent the credential) and turn a timeout into a misleading `login_failed`. A timeout is
//! reported as such, and the user signs in again.
//!
//! `expire` is checked against Feishu's range (protocol.md §6: a token lives at most 2 hours):
//! 1 to [`MAX_EXPIRE_S`] seconds is taken as given, a larger value is clamped to
//! [`MAX_EXPIRE_S`] (a token must never be cached for longer than Feishu can have meant), and 0,
//! a negative, fractional or missing `expire` makes the answer unusable (`upstream_error`).
//! A user access token's `expires_in` is taken as given (it is never cached here).
//!
//! Nothing here logs a request or an answer: the bodies hold app secrets, tokens, codes.
//!
//! Building the HTTP client can fail (TLS set-up); [`Upstream::new`] returns that error so the
//! service refuses to start instead of running with a default client.

use std::fmt;
use std::time::Duration;

use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind};
use crate::metrics::Metrics;
use crate::secret::Secret;

pub const APP_ACCESS_TOKEN_PATH: &str = "/open-apis/auth/v3/app_access_token";
pub const TENANT_ACCESS_TOKEN_PATH: &str = "/open-apis/auth/v3/tenant_access_token";
pub const APP_TICKET_RESEND_PATH: &str = "/open-apis/auth/v3/app_ticket/resend";
/// Self-built apps (protocol.md §6b).
pub const APP_ACCESS_TOKEN_INTERNAL_PATH: &str = "/open-apis/auth/v3/app_access_token/internal";
pub const TENANT_ACCESS_TOKEN_INTERNAL_PATH: &str =
    "/open-apis/auth/v3/tenant_access_token/internal";
/// OAuth login (protocol.md §6c): the v2 token endpoint and the user's identity.
pub const OAUTH_TOKEN_PATH: &str = "/open-apis/authen/v2/oauth/token";
pub const USER_INFO_PATH: &str = "/open-apis/authen/v1/user_info";

/// The longest token lifetime Feishu issues (2 hours), in seconds: a larger `expire` is clamped.
pub const MAX_EXPIRE_S: u64 = 2 * 3600;

/// Feishu codes the broker acts on.
pub mod codes {
    /// "get app access token fail": by SDK convention, the app_ticket is invalid.
    pub const APP_TICKET_INVALID: i64 = 10012;
    /// "invalid access token" (tenant_access_token expired or of the wrong type).
    pub const INVALID_ACCESS_TOKEN: i64 = 99991663;
    /// "invalid app token".
    pub const INVALID_APP_TOKEN: i64 = 99991664;
    /// "request trigger frequency limit": back off.
    pub const RATE_LIMITED: i64 = 99991400;
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// Feishu answered with a non-zero `code`.
    Api { code: i64, msg: String, status: u16 },
    /// No answer within the timeout or before the deadline (after retries): which, in words.
    Timeout(String),
    /// A 5xx answer that carried Feishu's `code` and `msg` (after retries).
    Server { code: i64, msg: String, status: u16 },
    /// No usable answer (after retries): a connection failure or an answer we cannot read, its
    /// cause in words (connection refused, DNS lookup failed, TLS handshake failed, HTTP 502 …).
    Transport(String),
}

impl UpstreamError {
    pub fn code(&self) -> Option<i64> {
        match self {
            UpstreamError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Api { code, msg, status } => {
                write!(f, "Feishu answered code {code} ({msg}), HTTP {status}")
            }
            UpstreamError::Server { code, msg, status } => {
                write!(f, "Feishu failed with HTTP {status}, code {code} ({msg})")
            }
            UpstreamError::Timeout(why) => write!(f, "Feishu did not answer in time: {why}"),
            UpstreamError::Transport(why) => write!(f, "no usable answer from Feishu: {why}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

impl From<UpstreamError> for Error {
    fn from(e: UpstreamError) -> Self {
        match &e {
            UpstreamError::Api { code, msg, .. } => Error::new(
                ErrorKind::UpstreamError,
                format!("the Open Platform answered code {code}: {msg}"),
            )
            .with_upstream(*code, msg.clone()),
            UpstreamError::Server { code, msg, .. } => Error::new(
                ErrorKind::UpstreamError,
                format!("the Open Platform failed with code {code}: {msg}"),
            )
            .with_upstream(*code, msg.clone()),
            UpstreamError::Timeout(why) => Error::new(
                ErrorKind::UpstreamTimeout,
                format!("the Open Platform did not answer in time: {why}"),
            ),
            UpstreamError::Transport(why) => Error::new(
                ErrorKind::UpstreamError,
                format!("no usable answer from the Open Platform: {why}"),
            ),
        }
    }
}

/// A token and its lifetime in seconds, as Feishu returned them.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: Secret,
    pub expire_s: u64,
}

/// What every Open Platform answer carries: Feishu's `code`, and a message for a refusal.
trait Answer: DeserializeOwned {
    fn code(&self) -> i64;
    fn message(self) -> String;
}

#[derive(Deserialize)]
struct AuthResponse {
    code: i64,
    #[serde(default)]
    msg: String,
    app_access_token: Option<Secret>,
    tenant_access_token: Option<Secret>,
    /// Any JSON number, so an out-of-range value is judged here rather than failing the parse.
    expire: Option<serde_json::Number>,
}

impl Answer for AuthResponse {
    fn code(&self) -> i64 {
        self.code
    }
    fn message(self) -> String {
        self.msg
    }
}

/// The v2 OAuth token endpoint's flat answer (RFC 6749 names, plus Feishu's `code`).
#[derive(Deserialize)]
struct OAuthResponse {
    code: i64,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    msg: String,
    access_token: Option<Secret>,
    expires_in: Option<serde_json::Number>,
    refresh_token: Option<Secret>,
    refresh_token_expires_in: Option<serde_json::Number>,
}

impl Answer for OAuthResponse {
    fn code(&self) -> i64 {
        self.code
    }
    fn message(self) -> String {
        [self.error_description, self.error, self.msg]
            .into_iter()
            .find(|m| !m.is_empty())
            .unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct UserInfoResponse {
    code: i64,
    #[serde(default)]
    msg: String,
    data: Option<UserInfo>,
}

impl Answer for UserInfoResponse {
    fn code(&self) -> i64 {
        self.code
    }
    fn message(self) -> String {
        self.msg
    }
}

/// A user's tokens, as the OAuth token endpoint issued them. Never stored or cached.
#[derive(Debug, Clone)]
pub struct UserTokens {
    pub access_token: Secret,
    /// Seconds the access token lives.
    pub expire_s: u64,
    /// Only with the `offline_access` scope.
    pub refresh_token: Option<Secret>,
    pub refresh_expire_s: Option<u64>,
}

/// Who signed in, as `user_info` tells it.
#[derive(Debug, Clone, Deserialize)]
pub struct UserInfo {
    pub open_id: String,
    #[serde(default)]
    pub union_id: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    pub tenant_key: String,
}

/// What a login exchanges for a user's tokens.
#[derive(Debug, Clone)]
pub enum Grant {
    /// An authorization code (single-use, valid 5 minutes), with the `redirect_uri` it was issued
    /// for and the PKCE `code_verifier`, when the authorization request had them.
    Code {
        code: Secret,
        redirect_uri: Option<String>,
        code_verifier: Option<Secret>,
    },
    /// A refresh token (single-use: each refresh returns a new one).
    Refresh(Secret),
}

/// How one call is sent.
enum Outgoing<'a> {
    /// POST a JSON body.
    Post(&'a serde_json::Value),
    /// GET with `Authorization: Bearer`.
    Get { bearer: &'a Secret },
}

/// How long a call may take: each attempt, and all of them together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// One attempt (`tokens.upstream_timeout`).
    pub timeout: Duration,
    /// Retries after an outage (`tokens.upstream_retries`), as long as the deadline allows.
    pub retries: u32,
    /// A whole request, retries included (`tokens.request_deadline`): see [`Upstream::deadline`].
    pub request_deadline: Duration,
}

/// The auth API client.
#[derive(Clone, Debug)]
pub struct Upstream {
    http: reqwest::Client,
    bounds: Bounds,
    metrics: Metrics,
}

impl Upstream {
    /// The client; fails if the HTTP client cannot be built.
    pub fn new(bounds: Bounds, metrics: Metrics) -> Result<Upstream, UpstreamError> {
        let builder = reqwest::Client::builder()
            .user_agent(concat!("lark-ticketd/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        Upstream::with_builder(builder, bounds, metrics)
    }

    fn with_builder(
        builder: reqwest::ClientBuilder,
        bounds: Bounds,
        metrics: Metrics,
    ) -> Result<Upstream, UpstreamError> {
        let http = builder
            .build()
            .map_err(|e| UpstreamError::Transport(format!("cannot build the HTTP client: {e}")))?;
        Ok(Upstream {
            http,
            bounds,
            metrics,
        })
    }

    /// The deadline of a request starting now: `tokens.request_deadline` from now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.bounds.request_deadline
    }

    /// `app_access_token` for a store app: needs the newest app_ticket.
    pub async fn app_access_token(
        &self,
        base_url: &str,
        app_id: &str,
        app_secret: &Secret,
        app_ticket: &Secret,
        deadline: Instant,
    ) -> Result<IssuedToken, UpstreamError> {
        let body = serde_json::json!({
            "app_id": app_id,
            "app_secret": app_secret.expose(),
            "app_ticket": app_ticket.expose(),
        });
        let r: AuthResponse = self
            .call(
                base_url,
                APP_ACCESS_TOKEN_PATH,
                "app_access_token",
                Outgoing::Post(&body),
                self.bounds.retries,
                deadline,
            )
            .await?;
        issued(r.app_access_token, expire_s(r.expire.as_ref()))
    }

    /// `tenant_access_token` for one tenant of a store app.
    pub async fn tenant_access_token(
        &self,
        base_url: &str,
        app_access_token: &Secret,
        tenant_key: &str,
        deadline: Instant,
    ) -> Result<IssuedToken, UpstreamError> {
        let body = serde_json::json!({
            "app_access_token": app_access_token.expose(),
            "tenant_key": tenant_key,
        });
        let r: AuthResponse = self
            .call(
                base_url,
                TENANT_ACCESS_TOKEN_PATH,
                "tenant_access_token",
                Outgoing::Post(&body),
                self.bounds.retries,
                deadline,
            )
            .await?;
        issued(r.tenant_access_token, expire_s(r.expire.as_ref()))
    }

    /// `app_access_token` for a self-built app: app_id + app_secret alone.
    pub async fn app_access_token_internal(
        &self,
        base_url: &str,
        app_id: &str,
        app_secret: &Secret,
        deadline: Instant,
    ) -> Result<IssuedToken, UpstreamError> {
        let body = serde_json::json!({ "app_id": app_id, "app_secret": app_secret.expose() });
        let r: AuthResponse = self
            .call(
                base_url,
                APP_ACCESS_TOKEN_INTERNAL_PATH,
                "app_access_token_internal",
                Outgoing::Post(&body),
                self.bounds.retries,
                deadline,
            )
            .await?;
        issued(r.app_access_token, expire_s(r.expire.as_ref()))
    }

    /// The `tenant_access_token` of a self-built app's own tenant: app_id + app_secret alone.
    pub async fn tenant_access_token_internal(
        &self,
        base_url: &str,
        app_id: &str,
        app_secret: &Secret,
        deadline: Instant,
    ) -> Result<IssuedToken, UpstreamError> {
        let body = serde_json::json!({ "app_id": app_id, "app_secret": app_secret.expose() });
        let r: AuthResponse = self
            .call(
                base_url,
                TENANT_ACCESS_TOKEN_INTERNAL_PATH,
                "tenant_access_token_internal",
                Outgoing::Post(&body),
                self.bounds.retries,
                deadline,
            )
            .await?;
        issued(r.tenant_access_token, expire_s(r.expire.as_ref()))
    }

    /// Ask Feishu to push the app_ticket again (it arrives at the events URL, not here).
    pub async fn resend_app_ticket(
        &self,
        base_url: &str,
        app_id: &str,
        app_secret: &Secret,
        deadline: Instant,
    ) -> Result<(), UpstreamError> {
        let body = serde_json::json!({ "app_id": app_id, "app_secret": app_secret.expose() });
        self.call::<AuthResponse>(
            base_url,
            APP_TICKET_RESEND_PATH,
            "app_ticket_resend",
            Outgoing::Post(&body),
            self.bounds.retries,
            deadline,
        )
        .await
        .map(|_| ())
    }

    /// Exchange an authorization code or a refresh token for a user's tokens (the v2 OAuth
    /// token endpoint; client credentials in the body). Never retried (module docs).
    pub async fn user_tokens(
        &self,
        base_url: &str,
        app_id: &str,
        app_secret: &Secret,
        grant: &Grant,
        deadline: Instant,
    ) -> Result<UserTokens, UpstreamError> {
        let mut body = serde_json::json!({
            "client_id": app_id,
            "client_secret": app_secret.expose(),
        });
        match grant {
            Grant::Code {
                code,
                redirect_uri,
                code_verifier,
            } => {
                body["grant_type"] = "authorization_code".into();
                body["code"] = code.expose().into();
                if let Some(uri) = redirect_uri {
                    body["redirect_uri"] = uri.as_str().into();
                }
                if let Some(verifier) = code_verifier {
                    body["code_verifier"] = verifier.expose().into();
                }
            }
            Grant::Refresh(token) => {
                body["grant_type"] = "refresh_token".into();
                body["refresh_token"] = token.expose().into();
            }
        }
        let r: OAuthResponse = self
            .call(
                base_url,
                OAUTH_TOKEN_PATH,
                "oauth_token",
                Outgoing::Post(&body),
                0,
                deadline,
            )
            .await?;
        let access_token = r.access_token.filter(|t| !t.is_empty()).ok_or_else(|| {
            UpstreamError::Transport("a success answer without an access_token".to_string())
        })?;
        let expire_s = expire_s(r.expires_in.as_ref())
            .filter(|s| *s > 0)
            .ok_or_else(|| {
                UpstreamError::Transport(
                    "a success answer whose expires_in is missing or not a positive number of seconds"
                        .to_string(),
                )
            })?;
        let refresh_token = r.refresh_token.filter(|t| !t.is_empty());
        let refresh_expire_s = refresh_token
            .as_ref()
            .and(expire_s_opt(r.refresh_token_expires_in.as_ref()));
        Ok(UserTokens {
            access_token,
            expire_s,
            refresh_token,
            refresh_expire_s,
        })
    }

    /// Who a user access token belongs to, and in which tenant.
    pub async fn user_info(
        &self,
        base_url: &str,
        user_access_token: &Secret,
        deadline: Instant,
    ) -> Result<UserInfo, UpstreamError> {
        let r: UserInfoResponse = self
            .call(
                base_url,
                USER_INFO_PATH,
                "user_info",
                Outgoing::Get {
                    bearer: user_access_token,
                },
                self.bounds.retries,
                deadline,
            )
            .await?;
        match r.data {
            Some(info) if !info.open_id.is_empty() && !info.tenant_key.is_empty() => Ok(info),
            _ => Err(UpstreamError::Transport(
                "a user_info answer without open_id or tenant_key".to_string(),
            )),
        }
    }

    /// One call, with up to `retries` retries after an outage, all before `deadline` (module
    /// docs). `endpoint` names it in metrics.
    async fn call<T: Answer>(
        &self,
        base_url: &str,
        path: &str,
        endpoint: &'static str,
        send: Outgoing<'_>,
        retries: u32,
        deadline: Instant,
    ) -> Result<T, UpstreamError> {
        let url = format!("{}{path}", base_url.trim_end_matches('/'));
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // The attempt's own timeout, or what is left of the deadline: whichever ends first
            // names the timeout.
            let outcome = if left.is_zero() {
                Err(UpstreamError::Timeout(self.deadline_passed(attempt)))
            } else if left < self.bounds.timeout {
                match self.call_once::<T>(&url, &send, left).await {
                    Err(UpstreamError::Timeout(_)) => {
                        Err(UpstreamError::Timeout(self.deadline_passed(attempt + 1)))
                    }
                    other => other,
                }
            } else {
                self.call_once::<T>(&url, &send, self.bounds.timeout)
                    .await
                    .map_err(|e| match e {
                        UpstreamError::Timeout(why) if attempt > 0 => UpstreamError::Timeout(
                            format!("{why} (attempt {} of {})", attempt + 1, retries + 1),
                        ),
                        e => e,
                    })
            };
            let retryable = matches!(
                outcome,
                Err(UpstreamError::Timeout(_)
                    | UpstreamError::Transport(_)
                    | UpstreamError::Server { .. })
            );
            let wait = backoff(attempt);
            // A retry that could not even start before the deadline is not made.
            let in_time = Instant::now() + wait < deadline;
            let outcome = match outcome {
                Err(UpstreamError::Timeout(why)) if attempt < retries && !in_time => {
                    Err(UpstreamError::Timeout(self.no_time_left(why)))
                }
                Err(UpstreamError::Transport(why)) if attempt < retries && !in_time => {
                    Err(UpstreamError::Transport(self.no_time_left(why)))
                }
                outcome => outcome,
            };
            if !retryable || attempt >= retries || !in_time {
                let code = match &outcome {
                    Ok(_) => "0".to_string(),
                    Err(UpstreamError::Api { code, .. }) => code.to_string(),
                    Err(UpstreamError::Server { .. }) => "5xx".to_string(),
                    Err(UpstreamError::Timeout(_)) => "timeout".to_string(),
                    Err(UpstreamError::Transport(_)) => "transport".to_string(),
                };
                self.metrics
                    .upstream_call(endpoint, &code, started.elapsed().as_secs_f64());
                return outcome;
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Why a call ended with retries left: the deadline.
    fn no_time_left(&self, why: String) -> String {
        format!(
            "{why}; no time left for another attempt before the request's deadline (tokens.request_deadline, {:?})",
            self.bounds.request_deadline
        )
    }

    /// Why a call ended at its deadline, `attempts` made.
    fn deadline_passed(&self, attempts: u32) -> String {
        let plural = if attempts == 1 { "" } else { "s" };
        format!(
            "no answer before the request's deadline (tokens.request_deadline, {:?}) passed; {attempts} attempt{plural} made",
            self.bounds.request_deadline
        )
    }

    async fn call_once<T: Answer>(
        &self,
        url: &str,
        send: &Outgoing<'_>,
        timeout: Duration,
    ) -> Result<T, UpstreamError> {
        let request = match send {
            Outgoing::Post(body) => self
                .http
                .post(url)
                .header("content-type", "application/json; charset=utf-8")
                .json(body),
            Outgoing::Get { bearer } => self.http.get(url).bearer_auth(bearer.expose()),
        };
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| no_answer(&e, timeout))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| no_answer(&e, timeout))?;
        let parsed = serde_json::from_slice::<T>(&bytes);
        match parsed {
            Ok(r) if r.code() == 0 && status < 300 => Ok(r),
            Ok(r) if r.code() != 0 && status < 500 => Err(UpstreamError::Api {
                code: r.code(),
                msg: r.message(),
                status,
            }),
            Ok(r) if r.code() != 0 => Err(UpstreamError::Server {
                code: r.code(),
                msg: r.message(),
                status,
            }),
            Ok(_) => Err(UpstreamError::Transport(format!(
                "{}, with code 0",
                http_status(status)
            ))),
            Err(_) => Err(UpstreamError::Transport(unusable_answer(status, &bytes))),
        }
    }
}

/// `HTTP 502 (Bad Gateway)`.
fn http_status(status: u16) -> String {
    match hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        Some(reason) => format!("HTTP {status} ({reason})"),
        None => format!("HTTP {status}"),
    }
}

/// An answer without Feishu's JSON (`code`, `msg`): its status, and what the body was instead.
/// Never the body itself (a token may be in it).
pub fn unusable_answer(status: u16, body: &[u8]) -> String {
    let what = if body.iter().all(u8::is_ascii_whitespace) {
        "an empty body"
    } else if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        "a JSON body that is not an Open Platform answer (no numeric code)"
    } else {
        "a body that is not JSON"
    };
    format!("{}, with {what}", http_status(status))
}

/// Why a request got no (complete) answer, named for an operator: from reqwest's classification
/// and the `source()` chain — the io error's kind (refused, reset, timed out, TLS data), hyper's
/// connector stage (`dns error`) — plus the innermost cause's own words. Never the URL.
pub fn no_answer(e: &reqwest::Error, timeout: Duration) -> UpstreamError {
    use std::error::Error as _;
    use std::io::ErrorKind as Io;
    let mut kinds = Vec::new();
    let mut stages = Vec::new();
    let mut innermost = None;
    let mut source = e.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        stages.push(cause.to_string());
        innermost = Some(cause.to_string());
        source = cause.source();
    }
    // Without the URL: reqwest's own words name it, the causes below it never do.
    let detail = innermost.unwrap_or_else(|| {
        let mut e = format!("{e}");
        if let Some(url) = e.find(" for url (") {
            e.truncate(url);
        }
        e
    });
    let has = |kind: Io| kinds.contains(&kind);
    let https = e.url().is_some_and(|u| u.scheme() == "https");
    if e.is_timeout() || has(Io::TimedOut) {
        return UpstreamError::Timeout(format!(
            "no answer within tokens.upstream_timeout ({timeout:?})"
        ));
    }
    let why = if has(Io::ConnectionRefused) {
        format!("connection refused ({detail})")
    } else if stages.iter().any(|s| s == "dns error")
        || detail.starts_with("failed to lookup address")
    {
        format!("DNS lookup of the Open Platform's host failed ({detail})")
    } else if https
        && (has(Io::InvalidData)
            || (e.is_connect() && !stages.iter().any(|s| s.starts_with("tcp "))))
    {
        // Past DNS and TCP (hyper's connector names those stages `dns error`, `tcp connect
        // error` …), a failed https connect is the TLS handshake; rustls' io errors are
        // InvalidData.
        format!("TLS handshake failed ({detail})")
    } else if has(Io::ConnectionReset)
        || has(Io::ConnectionAborted)
        || has(Io::BrokenPipe)
        || has(Io::UnexpectedEof)
        || stages.iter().any(|s| s.contains("connection closed"))
    {
        format!("the connection was closed before a complete answer ({detail})")
    } else if e.is_connect() {
        format!("cannot connect ({detail})")
    } else if e.is_body() || e.is_decode() {
        format!("the answer broke off ({detail})")
    } else {
        format!("the request failed ({detail})")
    };
    UpstreamError::Transport(why)
}

/// `expire` as whole seconds: a negative or fractional number is 0 (unusable).
fn expire_s(expire: Option<&serde_json::Number>) -> Option<u64> {
    expire.map(|n| n.as_u64().unwrap_or(0))
}

/// An optional lifetime in seconds: present and positive, else `None`.
fn expire_s_opt(expire: Option<&serde_json::Number>) -> Option<u64> {
    expire_s(expire).filter(|s| *s > 0)
}

/// A success answer's token, with `expire` checked against Feishu's range (module docs).
fn issued(token: Option<Secret>, expire: Option<u64>) -> Result<IssuedToken, UpstreamError> {
    match (token, expire) {
        (Some(token), Some(expire_s)) if !token.is_empty() && expire_s > 0 => {
            if expire_s > MAX_EXPIRE_S {
                tracing::warn!(
                    expire_s,
                    max_s = MAX_EXPIRE_S,
                    "Feishu answered an expire beyond a token's lifetime; clamped"
                );
            }
            Ok(IssuedToken {
                token,
                expire_s: expire_s.min(MAX_EXPIRE_S),
            })
        }
        (Some(token), _) if !token.is_empty() => Err(UpstreamError::Transport(
            "a success answer whose expire is missing or not a positive number of seconds"
                .to_string(),
        )),
        _ => Err(UpstreamError::Transport(
            "a success answer without a token".to_string(),
        )),
    }
}

/// 100 ms, 200 ms, 400 ms … (at most 3.2 s), each ±50 % jitter.
/// The longest wait before retry `attempt + 1` ([`backoff`] with its largest jitter).
pub fn max_backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(5)) * 3 / 2)
}

fn backoff(attempt: u32) -> Duration {
    let base_ms = 100u64 << attempt.min(5);
    let jitter = rand::thread_rng().gen_range(0.5..1.5);
    Duration::from_millis((base_ms as f64 * jitter) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            timeout: Duration::from_secs(1),
            retries: 0,
            request_deadline: Duration::from_secs(10),
        }
    }

    #[test]
    fn an_answer_without_feishus_json_names_its_status_and_what_came_instead() {
        assert_eq!(
            unusable_answer(502, b"<html>Bad Gateway</html>"),
            "HTTP 502 (Bad Gateway), with a body that is not JSON"
        );
        assert_eq!(
            unusable_answer(200, b"  "),
            "HTTP 200 (OK), with an empty body"
        );
        assert_eq!(
            unusable_answer(200, br#"{"tenant_access_token":"t-secret"}"#),
            "HTTP 200 (OK), with a JSON body that is not an Open Platform answer (no numeric code)"
        );
    }

    #[test]
    fn backoff_grows_with_jitter() {
        for attempt in 0..8 {
            let d = backoff(attempt).as_millis() as u64;
            let base = 100u64 << attempt.min(5);
            assert!(d >= base / 2 && d <= base * 3 / 2, "{attempt}: {d}");
        }
    }

    #[test]
    fn expire_outside_feishus_range_is_clamped_or_refused() {
        let token = || Some(Secret::new("t-x"));
        assert_eq!(issued(token(), Some(7140)).unwrap().expire_s, 7140);
        assert_eq!(issued(token(), Some(1)).unwrap().expire_s, 1);
        assert_eq!(
            issued(token(), Some(u64::MAX)).unwrap().expire_s,
            MAX_EXPIRE_S
        );
        assert_eq!(issued(token(), Some(7201)).unwrap().expire_s, MAX_EXPIRE_S);
        assert!(issued(token(), Some(0)).is_err());
        assert!(issued(token(), None).is_err());
        let parse = |body: &str| {
            let r: AuthResponse = serde_json::from_str(body).unwrap();
            issued(r.tenant_access_token, expire_s(r.expire.as_ref()))
        };
        assert!(parse(r#"{"code":0,"tenant_access_token":"t-x","expire":-5}"#).is_err());
        assert!(parse(r#"{"code":0,"tenant_access_token":"t-x","expire":1.5}"#).is_err());
        assert_eq!(
            parse(r#"{"code":0,"tenant_access_token":"t-x","expire":18446744073709551615}"#)
                .unwrap()
                .expire_s,
            MAX_EXPIRE_S
        );
    }

    #[test]
    fn oauth_answers_name_feishus_reason_and_user_info_its_tenant() {
        // protocol.md §6c: errors carry `code` and `error` / `error_description`.
        let refused: OAuthResponse = serde_json::from_str(
            r#"{"code":20003,"error":"invalid_grant","error_description":"the code is invalid"}"#,
        )
        .unwrap();
        assert_eq!(refused.code(), 20003);
        assert_eq!(refused.message(), "the code is invalid");
        let terse: OAuthResponse =
            serde_json::from_str(r#"{"code":20002,"error":"invalid_client"}"#).unwrap();
        assert_eq!(terse.message(), "invalid_client");
        let ok: OAuthResponse = serde_json::from_str(
            r#"{"code":0,"access_token":"u-x","expires_in":7200,"refresh_token":"ur-y",
                "refresh_token_expires_in":604800,"token_type":"Bearer","scope":"offline_access"}"#,
        )
        .unwrap();
        assert_eq!(ok.code(), 0);
        assert_eq!(
            expire_s_opt(ok.refresh_token_expires_in.as_ref()),
            Some(604_800)
        );
        assert_eq!(expire_s_opt(None), None);
        let info: UserInfoResponse = serde_json::from_str(
            r#"{"code":0,"msg":"success","data":{"name":"Ada","en_name":"Ada","open_id":"ou_1",
                "union_id":"on_1","user_id":"u1","tenant_key":"736588c9260f175d","email":""}}"#,
        )
        .unwrap();
        let data = info.data.unwrap();
        assert_eq!(
            (data.open_id.as_str(), data.tenant_key.as_str()),
            ("ou_1", "736588c9260f175d")
        );
        // Secrets never print.
        let tokens = UserTokens {
            access_token: Secret::new("u-secret"),
            expire_s: 1,
            refresh_token: Some(Secret::new("ur-secret")),
            refresh_expire_s: None,
        };
        let grant = Grant::Code {
            code: Secret::new("oc-secret"),
            redirect_uri: None,
            code_verifier: Some(Secret::new("verifier-secret")),
        };
        let printed = format!("{tokens:?} {grant:?}");
        assert!(!printed.contains("secret"), "{printed}");
    }

    #[test]
    fn upstream_builder_errors_are_surfaced() {
        // An invalid header value makes reqwest's builder fail at build().
        let builder = reqwest::Client::builder().user_agent("bad\nagent");
        let built = Upstream::with_builder(builder, bounds(), Metrics::new());
        assert!(built.is_err(), "the builder error must reach the caller");
        assert!(Upstream::new(bounds(), Metrics::new()).is_ok());
    }

    #[test]
    fn server_errors_keep_feishus_code() {
        let e: Error = UpstreamError::Server {
            code: 99991400,
            msg: "request trigger frequency limit".into(),
            status: 500,
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::UpstreamError);
        assert_eq!(
            e.upstream(),
            Some((99991400, "request trigger frequency limit"))
        );
    }

    #[test]
    fn api_errors_keep_code_and_msg() {
        let e: Error = UpstreamError::Api {
            code: 10014,
            msg: "app secret invalid".into(),
            status: 400,
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::UpstreamError);
        assert_eq!(e.upstream(), Some((10014, "app secret invalid")));
        let e: Error = UpstreamError::Timeout("no answer within 3s".into()).into();
        assert_eq!(e.kind(), ErrorKind::UpstreamTimeout);
        assert_eq!(
            e.message(),
            "the Open Platform did not answer in time: no answer within 3s"
        );
    }
}

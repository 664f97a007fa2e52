//! The Feishu / Lark auth API for store apps (protocol.md §6): `app_access_token`,
//! `tenant_access_token`, `app_ticket/resend`, on each app's `base_url`.
//!
//! Every call has a timeout. Transport failures (including timeouts) and 5xx answers are retried
//! with exponential backoff and jitter; an answered error (`code != 0`, HTTP < 500) is never
//! retried — it is Feishu's verdict, and the broker decides what it means (10012: resend the
//! ticket; 99991663 / 99991664: drop that token). Non-200 statuses are still parsed for `code` and
//! `msg`, since Feishu answers some auth failures with HTTP 400 and a JSON body; a 5xx that
//! carries a `code` keeps it ([`UpstreamError::Server`]), so the caller's `502 upstream_error`
//! says what Feishu said.
//!
//! `expire` is checked against Feishu's range (protocol.md §6: a token lives at most 2 hours):
//! 1 to [`MAX_EXPIRE_S`] seconds is taken as given, a larger value is clamped to
//! [`MAX_EXPIRE_S`] (a token must never be cached for longer than Feishu can have meant), and 0,
//! a negative, fractional or missing `expire` makes the answer unusable (`upstream_error`).
//!
//! Building the HTTP client can fail (TLS set-up); [`Upstream::new`] returns that error so the
//! service refuses to start instead of running with a default client.

use std::fmt;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

use crate::error::{Error, ErrorKind};
use crate::metrics::Metrics;
use crate::secret::Secret;

pub const APP_ACCESS_TOKEN_PATH: &str = "/open-apis/auth/v3/app_access_token";
pub const TENANT_ACCESS_TOKEN_PATH: &str = "/open-apis/auth/v3/tenant_access_token";
pub const APP_TICKET_RESEND_PATH: &str = "/open-apis/auth/v3/app_ticket/resend";

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
    /// No answer within the timeout (after retries).
    Timeout,
    /// A 5xx answer that carried Feishu's `code` and `msg` (after retries).
    Server { code: i64, msg: String, status: u16 },
    /// Connection failure or an unreadable answer (after retries).
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
            UpstreamError::Timeout => f.write_str("Feishu did not answer in time"),
            UpstreamError::Transport(e) => write!(f, "cannot reach Feishu: {e}"),
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
            UpstreamError::Timeout => Error::from(ErrorKind::UpstreamTimeout),
            UpstreamError::Transport(_) => Error::new(
                ErrorKind::UpstreamError,
                "the Open Platform could not be reached",
            )
            .with_cause(e),
        }
    }
}

/// A token and its lifetime in seconds, as Feishu returned them.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: Secret,
    pub expire_s: u64,
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

/// The auth API client.
#[derive(Clone, Debug)]
pub struct Upstream {
    http: reqwest::Client,
    timeout: Duration,
    retries: u32,
    metrics: Metrics,
}

impl Upstream {
    /// The client; fails if the HTTP client cannot be built.
    pub fn new(
        timeout: Duration,
        retries: u32,
        metrics: Metrics,
    ) -> Result<Upstream, UpstreamError> {
        let builder = reqwest::Client::builder()
            .user_agent(concat!("lark-ticketd/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        Upstream::with_builder(builder, timeout, retries, metrics)
    }

    fn with_builder(
        builder: reqwest::ClientBuilder,
        timeout: Duration,
        retries: u32,
        metrics: Metrics,
    ) -> Result<Upstream, UpstreamError> {
        let http = builder
            .build()
            .map_err(|e| UpstreamError::Transport(format!("cannot build the HTTP client: {e}")))?;
        Ok(Upstream {
            http,
            timeout,
            retries,
            metrics,
        })
    }

    /// `app_access_token` for a store app: needs the newest app_ticket.
    pub async fn app_access_token(
        &self,
        base_url: &str,
        app_id: &str,
        app_secret: &Secret,
        app_ticket: &Secret,
    ) -> Result<IssuedToken, UpstreamError> {
        let body = serde_json::json!({
            "app_id": app_id,
            "app_secret": app_secret.expose(),
            "app_ticket": app_ticket.expose(),
        });
        let r = self.call(base_url, APP_ACCESS_TOKEN_PATH, &body).await?;
        issued(r.app_access_token, expire_s(r.expire.as_ref()))
    }

    /// `tenant_access_token` for one tenant of a store app.
    pub async fn tenant_access_token(
        &self,
        base_url: &str,
        app_access_token: &Secret,
        tenant_key: &str,
    ) -> Result<IssuedToken, UpstreamError> {
        let body = serde_json::json!({
            "app_access_token": app_access_token.expose(),
            "tenant_key": tenant_key,
        });
        let r = self.call(base_url, TENANT_ACCESS_TOKEN_PATH, &body).await?;
        issued(r.tenant_access_token, expire_s(r.expire.as_ref()))
    }

    /// Ask Feishu to push the app_ticket again (it arrives at the events URL, not here).
    pub async fn resend_app_ticket(
        &self,
        base_url: &str,
        app_id: &str,
        app_secret: &Secret,
    ) -> Result<(), UpstreamError> {
        let body = serde_json::json!({ "app_id": app_id, "app_secret": app_secret.expose() });
        self.call(base_url, APP_TICKET_RESEND_PATH, &body)
            .await
            .map(|_| ())
    }

    async fn call(
        &self,
        base_url: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<AuthResponse, UpstreamError> {
        let url = format!("{}{path}", base_url.trim_end_matches('/'));
        let endpoint = path.rsplit("/v3/").next().unwrap_or(path).replace('/', "_");
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            let outcome = self.call_once(&url, body).await;
            let retryable = matches!(
                outcome,
                Err(UpstreamError::Timeout
                    | UpstreamError::Transport(_)
                    | UpstreamError::Server { .. })
            );
            if !retryable || attempt >= self.retries {
                let code = match &outcome {
                    Ok(_) => "0".to_string(),
                    Err(UpstreamError::Api { code, .. }) => code.to_string(),
                    Err(UpstreamError::Server { .. }) => "5xx".to_string(),
                    Err(UpstreamError::Timeout) => "timeout".to_string(),
                    Err(UpstreamError::Transport(_)) => "transport".to_string(),
                };
                self.metrics
                    .upstream_call(&endpoint, &code, started.elapsed().as_secs_f64());
                return outcome;
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn call_once(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<AuthResponse, UpstreamError> {
        let response = self
            .http
            .post(url)
            .timeout(self.timeout)
            .header("content-type", "application/json; charset=utf-8")
            .json(body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(transport)?;
        let parsed = serde_json::from_slice::<AuthResponse>(&bytes);
        match parsed {
            Ok(r) if r.code == 0 && status < 300 => Ok(r),
            Ok(r) if r.code != 0 && status < 500 => Err(UpstreamError::Api {
                code: r.code,
                msg: r.msg,
                status,
            }),
            Ok(r) if r.code != 0 => Err(UpstreamError::Server {
                code: r.code,
                msg: r.msg,
                status,
            }),
            _ => Err(UpstreamError::Transport(format!(
                "HTTP {status} with an unexpected body"
            ))),
        }
    }
}

fn transport(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError::Timeout
    } else {
        // Without the URL: it is ours to log, not news to anyone.
        UpstreamError::Transport(e.without_url().to_string())
    }
}

/// `expire` as whole seconds: a negative or fractional number is 0 (unusable).
fn expire_s(expire: Option<&serde_json::Number>) -> Option<u64> {
    expire.map(|n| n.as_u64().unwrap_or(0))
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
    fn upstream_builder_errors_are_surfaced() {
        // An invalid header value makes reqwest's builder fail at build().
        let builder = reqwest::Client::builder().user_agent("bad\nagent");
        let built = Upstream::with_builder(builder, Duration::from_secs(1), 0, Metrics::new());
        assert!(built.is_err(), "the builder error must reach the caller");
        assert!(Upstream::new(Duration::from_secs(1), 0, Metrics::new()).is_ok());
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
        let e: Error = UpstreamError::Timeout.into();
        assert_eq!(e.kind(), ErrorKind::UpstreamTimeout);
    }
}

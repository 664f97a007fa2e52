//! The configuration file: typed, validated before anything binds, secrets redacted.
//!
//! The file is TOML (DESIGN.md has the shape). Loading does three things, in order:
//! 1. parse into typed structs; unknown keys are errors (a typo must not silently become a
//!    default), and every parse error names the key that is wrong;
//! 2. expand `${NAME}` references from the environment in secret-bearing values; a secret that
//!    is in the file must not come out empty (an empty `${LARK_ENCRYPT_KEY}` would silently turn
//!    encryption off): leaving the key out is the one way to say "not set";
//! 3. validate what types cannot say (unique app ids, a usable base_url, hex key hashes …).
//!
//! Every error is a [`ConfigError`] that names the key; `main` prints it on one line and exits 64.
//! The environment is passed in as a function, so tests never touch the process environment.
//! Every secret is a [`Secret`], so `Debug` (and so `check-config`) prints `[redacted]`.
//!
//! `[forwarding]` and `[[consumers]]` configure the event hand-off (DESIGN.md → *Event hand-off*).
//! A consumer's secret and event patterns are checked by the same code that later signs and
//! filters with them ([`crate::webhook`], [`crate::consumer_filter`]), so what
//! validates here is exactly what the deliverer accepts.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::consumer_filter::{ConsumerFilter, EventPattern, PatternError};
use crate::secret::Secret;
use crate::webhook::{SecretError, WebhookSecret};

/// Feishu's default API base URL.
pub const FEISHU_BASE_URL: &str = "https://open.feishu.cn";

/// Feishu issues a new token only when fewer than 30 minutes remain (protocol.md §6): refreshing
/// earlier returns the same token, so `tokens.refresh_ahead` may not be longer.
pub const MAX_REFRESH_AHEAD: Duration = Duration::from_secs(30 * 60);
/// The longest `tokens.error_backoff`: a remembered failure must stay short.
pub const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(5 * 60);

/// A configuration problem, naming the key that is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Events and API listener (only `/events` and the health checks when `api_listen` is set).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Optional separate listener for `/metrics`, `/healthz`, `/readyz` and the status page.
    #[serde(default)]
    pub ops_listen: Option<SocketAddr>,
    /// Optional internal listener for the token, status, login and consumer APIs: they are then
    /// served there and no longer on `listen`, so `listen` can face the internet with nothing but
    /// `/events` and the health checks.
    #[serde(default)]
    pub api_listen: Option<SocketAddr>,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub tickets: TicketConfig,
    #[serde(default)]
    pub tokens: TokenConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    /// The hand-off's timing: dedupe, retries, retention.
    #[serde(default)]
    pub forwarding: ForwardingConfig,
    /// The services events are handed on to; none means nothing is stored or delivered.
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    /// The file this config was loaded from ([`Config::load`]): what `serve` reads again on
    /// SIGHUP. `None` for config text parsed in memory (tests).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How events are handed on to consumers: dedupe, retries, retention.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardingConfig {
    /// A redelivery of an event id seen within this window is acknowledged, not handed on again.
    /// Feishu retries a failed push after 15 s, 5 min, 1 h and 6 h (≈ 7.1 h) with the same
    /// event id, so anything from 8 h up recognises every retry; shorter is allowed but lets a
    /// late retry through as a second delivery.
    #[serde(deserialize_with = "de_duration")]
    pub dedupe_window: Duration,
    /// Waits before each retry of a failed delivery, in order (never shorter than the step
    /// before); after the last one the event is a dead letter for that consumer. A consumer's
    /// `Retry-After` may lengthen a wait.
    #[serde(deserialize_with = "de_durations")]
    pub retry_schedule: Vec<Duration>,
    /// Time one delivery attempt may take, to the consumer's answer.
    #[serde(deserialize_with = "de_duration")]
    pub delivery_timeout: Duration,
    /// Delivered and dead events are kept this long, for redelivery; then purged.
    #[serde(deserialize_with = "de_duration")]
    pub retention: Duration,
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        let s = Duration::from_secs;
        ForwardingConfig {
            dedupe_window: s(24 * 3600),
            retry_schedule: vec![
                s(5),
                s(30),
                s(2 * 60),
                s(10 * 60),
                s(30 * 60),
                s(3600),
                s(3 * 3600),
                s(6 * 3600),
                s(12 * 3600),
            ],
            delivery_timeout: s(10),
            retention: s(7 * 86_400),
        }
    }
}

/// One service events are handed on to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// `[a-z0-9-]{1,64}`, unique: in the API's paths, metrics and logs.
    pub name: String,
    /// Where deliveries are POSTed: http or https, with a host, without user info.
    pub url: String,
    /// The Standard Webhooks secret, `whsec_` + base64 of 24..64 random bytes.
    pub secret: Secret,
    /// Event type patterns: exact, a prefix ending in `.*`, or `*`.
    #[serde(default = "default_everything")]
    pub events: Vec<String>,
    /// App ids, or `*`.
    #[serde(default = "default_everything")]
    pub apps: Vec<String>,
}

impl ConsumerConfig {
    /// The signing key. Cannot fail on a validated config.
    pub fn webhook_secret(&self) -> Result<WebhookSecret, SecretError> {
        WebhookSecret::parse(self.secret.expose())
    }

    /// The compiled `events` and `apps`. Cannot fail on a validated config.
    pub fn filter(&self) -> Result<ConsumerFilter, PatternError> {
        ConsumerFilter::new(&self.events, &self.apps)
    }
}

fn default_everything() -> Vec<String> {
    vec!["*".to_string()]
}

/// How tickets are chased when missing and judged when old.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TicketConfig {
    /// At most one resend request per app per this interval, however many callers ask.
    #[serde(deserialize_with = "de_duration")]
    pub resend_interval: Duration,
    /// How long a token request without a ticket waits for the pushed ticket before answering
    /// `503 ticket_missing`.
    #[serde(deserialize_with = "de_duration")]
    pub resend_wait: Duration,
    /// A ticket older than this is `stale` (Feishu pushes hourly).
    #[serde(deserialize_with = "de_duration")]
    pub stale_after: Duration,
}

impl Default for TicketConfig {
    fn default() -> Self {
        TicketConfig {
            resend_interval: Duration::from_secs(60),
            resend_wait: Duration::from_secs(5),
            stale_after: Duration::from_secs(75 * 60),
        }
    }
}

/// How fresh an event must be (the replay window; see `events` module docs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// A signed request whose `X-Lark-Request-Timestamp`, or an event whose own time (1.0 `ts`,
    /// 2.0 `header.create_time`), is older than this is refused as `stale_request`. Feishu
    /// retries a failed push after 15 s, 5 min, 1 h and 6 h (≈ 7.1 h), and whether a retry
    /// carries a fresh timestamp is not documented, so the default leaves room for the whole
    /// ladder.
    #[serde(deserialize_with = "de_duration")]
    pub max_age: Duration,
    /// How far ahead of our clock a signature timestamp may be (further: `stale_request`), and
    /// where an event time further ahead is capped for ordering (never refused: a clock that is
    /// behind must not stop real pushes).
    #[serde(deserialize_with = "de_duration")]
    pub max_skew: Duration,
    /// `false` accepts requests and events of any age: for replaying captured traffic. Event
    /// times ahead of `max_skew` are capped either way.
    pub reject_stale: bool,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            max_age: Duration::from_secs(8 * 3600),
            max_skew: Duration::from_secs(5 * 60),
            reject_stale: true,
        }
    }
}

/// Token caching, refresh and the upstream client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// A token is served until `expire` minus this margin (clock skew, request latency).
    #[serde(deserialize_with = "de_duration")]
    pub refresh_margin: Duration,
    /// Refresh in the background once fewer than this remain. Feishu issues a new token only
    /// when fewer than 30 minutes remain, so this is 30 minutes by default, and at most that.
    #[serde(deserialize_with = "de_duration")]
    pub refresh_ahead: Duration,
    /// A random delay of up to this is added to each token's refresh time, so tokens fetched
    /// together do not fall due together.
    #[serde(deserialize_with = "de_duration")]
    pub refresh_jitter: Duration,
    /// Background refreshes running at once, at most.
    pub refresh_concurrency: usize,
    /// Tenant tokens kept in memory, at most; the least recently used beyond it are dropped and
    /// fetched again on demand.
    pub max_tenant_tokens: usize,
    /// After Feishu answers a token request with an error code, the callers of that token get
    /// the same answer for this long instead of asking again (rate limits, wrong secrets).
    #[serde(deserialize_with = "de_duration")]
    pub error_backoff: Duration,
    /// How often the background refresher looks for tokens due.
    #[serde(deserialize_with = "de_duration")]
    pub refresh_check_interval: Duration,
    /// Tenant tokens used within this window are refreshed in the background; others are
    /// refreshed on their next use.
    #[serde(deserialize_with = "de_duration")]
    pub recent_use: Duration,
    /// Timeout of one call to the Open Platform.
    #[serde(deserialize_with = "de_duration")]
    pub upstream_timeout: Duration,
    /// Retries of a call that failed in transport or with a 5xx (never of an answered error),
    /// as long as `request_deadline` allows.
    pub upstream_retries: u32,
    /// Everything one token fetch asks Feishu — every attempt, retry and back-off, and the
    /// app token a tenant token needs — ends by this deadline, counted from the fetch's start:
    /// then the callers get `504 upstream_timeout`, whatever retries remain. (Waiting for a
    /// ticket push is bounded by `tickets.resend_wait` instead.) At least `upstream_timeout`.
    #[serde(deserialize_with = "de_duration")]
    pub request_deadline: Duration,
    /// With several replicas on one store: how often a replica waiting for another replica's
    /// token fetch, or a token request waiting for a ticket push, reads the store again in
    /// case a change notice was missed (the notice normally wakes it at once).
    #[serde(deserialize_with = "de_duration")]
    pub fleet_poll_interval: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            refresh_margin: Duration::from_secs(3 * 60),
            refresh_ahead: Duration::from_secs(30 * 60),
            refresh_jitter: Duration::from_secs(60),
            refresh_concurrency: 8,
            max_tenant_tokens: 100_000,
            error_backoff: Duration::from_secs(5),
            refresh_check_interval: Duration::from_secs(30),
            recent_use: Duration::from_secs(2 * 3600),
            upstream_timeout: Duration::from_secs(3),
            upstream_retries: 2,
            request_deadline: Duration::from_secs(10),
            fleet_poll_interval: Duration::from_secs(1),
        }
    }
}

/// Resource bounds of the HTTP server.
///
/// Every listener has its own connection pool (`max_connections*` for the main listener,
/// `ops_max_connections*` for `ops_listen`), so a flood of one never starves the other.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Largest request body accepted; Feishu's events are a few KB.
    #[serde(deserialize_with = "de_bytes")]
    pub max_body_bytes: usize,
    /// Time a client has to send a complete request head, counted from accept and again from the
    /// end of each response: it is the first-byte, slowloris and keep-alive idle bound at once.
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// Time a client has to send the request body.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Longest a response write may stay blocked (a client that stops reading); then the
    /// connection is closed.
    #[serde(deserialize_with = "de_duration")]
    pub write_timeout: Duration,
    /// Open connections on the main listener at most; further clients wait in the kernel's
    /// backlog.
    pub max_connections: usize,
    /// Open connections from one client IP address on the main listener at most; more are
    /// answered `429 too_many_connections` and closed. Behind a proxy every client has the
    /// proxy's address: raise this to `max_connections` there.
    pub max_connections_per_peer: usize,
    /// Open connections on `api_listen` at most.
    pub api_max_connections: usize,
    /// Open connections from one client IP address on `api_listen` at most (the services that
    /// call the API often sit behind one address: high by default).
    pub api_max_connections_per_peer: usize,
    /// Open connections on `ops_listen` at most.
    pub ops_max_connections: usize,
    /// Open connections from one client IP address on `ops_listen` at most.
    pub ops_max_connections_per_peer: usize,
    /// Largest request head (request line and headers); larger gets `431 header_too_large`.
    /// Also bounds hyper's per-connection read buffer.
    #[serde(deserialize_with = "de_bytes")]
    pub max_header_bytes: usize,
    /// Request-body bytes held at once across all connections, beyond each request's
    /// `body_allowance_bytes`. A body that does not fit gets `429 server_busy` with
    /// `Retry-After` at once.
    #[serde(deserialize_with = "de_bytes")]
    pub max_body_bytes_in_flight: usize,
    /// Body bytes every request may hold without drawing on `max_body_bytes_in_flight`: small
    /// bodies (every Feishu push we know of) are never refused for lack of budget. Bounded in sum by
    /// the connection limits.
    #[serde(deserialize_with = "de_bytes")]
    pub body_allowance_bytes: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_peer: 512,
            api_max_connections: 1024,
            api_max_connections_per_peer: 1024,
            ops_max_connections: 64,
            ops_max_connections_per_peer: 16,
            max_header_bytes: 16 * 1024,
            max_body_bytes_in_flight: 32 * 1024 * 1024,
            body_allowance_bytes: 16 * 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Which backend keeps tickets, tenants and tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A crash-safe file (redb): the default.
    #[default]
    Embedded,
    /// Process memory: for tests and throwaway runs; everything is lost on exit.
    Memory,
    /// Redis (or Valkey), shared by several replicas (DESIGN.md → *Several replicas*).
    Redis,
}

/// The default `store.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "lark-ticketd";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// The embedded store's file.
    pub path: PathBuf,
    /// The Redis URL, `redis://` (or `rediss://`, `unix://`); it may carry a password, so it is
    /// a secret, and it may hold `${NAME}` references.
    pub url: Option<Secret>,
    /// Every Redis key starts with this, so several deployments may share one Redis.
    pub key_prefix: String,
    /// `url` is one seed node of a Redis Cluster.
    pub cluster: bool,
    /// With a `rediss://` URL: a PEM file of the CA certificate(s) that signed the server's
    /// certificate (a private CA, a managed service's own), trusted instead of the Mozilla roots
    /// built in. Read when the store is opened.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Embedded,
            path: PathBuf::from("data/lark-ticketd.db"),
            url: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_string(),
            cluster: false,
            tls_ca_file: None,
        }
    }
}

impl StoreConfig {
    /// `store.url` and `store.key_prefix` for `kind = "redis"`. An error never repeats the URL:
    /// it may hold a password.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let url =
            match &self.url {
                Some(url) if !url.is_empty() => url,
                _ => return Err(ConfigError::new(
                    "store.url",
                    "is required with store.kind = \"redis\", e.g. \"redis://127.0.0.1:6379/0\"",
                )),
            };
        let scheme = url.expose().split("://").next().unwrap_or_default();
        if !["redis", "rediss", "unix", "redis+unix"].contains(&scheme) {
            return Err(ConfigError::new(
                "store.url",
                "must start with redis:// (or rediss://, unix://)",
            ));
        }
        if scheme == "rediss" && url.expose().contains('#') {
            return Err(ConfigError::new(
                "store.url",
                "must not turn off certificate checks (#insecure): trust the server's CA with \
                 store.tls_ca_file instead",
            ));
        }
        if self.tls_ca_file.is_some() && scheme != "rediss" {
            return Err(ConfigError::new(
                "store.tls_ca_file",
                "needs a rediss:// (TLS) store.url",
            ));
        }
        if redis::IntoConnectionInfo::into_connection_info(url.expose()).is_err() {
            return Err(ConfigError::new(
                "store.url",
                "is not a valid Redis URL (redis://[user:password@]host[:port][/db])",
            ));
        }
        if self.cluster && !["redis", "rediss"].contains(&scheme) {
            return Err(ConfigError::new(
                "store.url",
                "with store.cluster = true must be a redis:// (or rediss://) URL of one cluster \
                 node",
            ));
        }
        let p = &self.key_prefix;
        if p.is_empty()
            || p.len() > 64
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        {
            return Err(ConfigError::new(
                "store.key_prefix",
                "must be 1 to 64 of letters, digits, '_', '-', '.' and ':' (no braces: the \
                 service adds the hash tags itself)",
            ));
        }
        Ok(())
    }
}

/// Which kind of Feishu / Lark app an `[[apps]]` entry is (DESIGN.md → *Every kind of Feishu
/// app*): it decides how the app's tokens are issued, and whether it has an App Ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// An app-store ("ISV") app: its tokens need the App Ticket Feishu pushes to us, and a
    /// tenant token is per customer tenant.
    #[default]
    Store,
    /// A self-built app: tokens from app_id + app_secret alone (the `/internal` endpoints),
    /// one tenant (its own), no ticket.
    Custom,
}

impl AppKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AppKind::Store => "store",
            AppKind::Custom => "custom",
        }
    }
}

/// One Feishu / Lark app: an app-store app or a self-built one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub app_id: String,
    /// `store` (default) or `custom`.
    #[serde(default)]
    pub kind: AppKind,
    pub app_secret: Secret,
    /// Optional in Feishu's console; without it events arrive in clear text and unsigned.
    /// `None` only when the key is absent: an empty value is a config error, so an unset
    /// `${LARK_ENCRYPT_KEY}` can never turn encryption off.
    #[serde(default)]
    pub encrypt_key: Option<Secret>,
    /// Required for a store app (its App Ticket arrives as an event); for a custom app only if
    /// its events are pushed here. `None` (the key absent; empty is a config error): this app's
    /// events are refused (`events_not_configured`).
    #[serde(default)]
    pub verification_token: Option<Secret>,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Key rotation: the Encrypt Key this app had before `encrypt_key`, still accepted (signature
    /// and decryption, after the current key) until `previous_keys_until`.
    #[serde(default)]
    pub previous_encrypt_key: Option<Secret>,
    /// Key rotation: the Verification Token before `verification_token`, still accepted until
    /// `previous_keys_until`.
    #[serde(default)]
    pub previous_verification_token: Option<Secret>,
    /// Until when (RFC 3339, e.g. `"2026-12-01T00:00:00Z"`) the previous key and token are
    /// accepted, as unix milliseconds. Required with either of them.
    #[serde(default, deserialize_with = "de_rfc3339_ms")]
    pub previous_keys_until: Option<UtcTime>,
}

impl AppConfig {
    /// Are the previous Encrypt Key / Verification Token still accepted at `now_ms`?
    pub fn previous_keys_active(&self, now_ms: u64) -> bool {
        self.previous_keys_until
            .is_some_and(|until| now_ms < until.unix_ms)
    }

    /// Are this app's events received here (is there a Verification Token to check them with)?
    pub fn receives_events(&self) -> bool {
        self.verification_token.is_some()
    }
}

/// A scope a downstream client may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Fetch and invalidate app and tenant tokens.
    Tokens,
    /// Read the status API.
    Status,
    /// Ask Feishu to resend a ticket; redeliver events.
    Admin,
    /// Exchange OAuth codes and refresh tokens for user access tokens (login).
    Login,
}

/// A downstream caller of the token API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub name: String,
    /// Hex SHA-256 of the bearer key; the key itself never sits in the file.
    #[serde(deserialize_with = "de_key_hash")]
    pub key_sha256: KeyHash,
    /// App ids this client may use, or `["*"]`.
    pub apps: Vec<String>,
    pub scopes: Vec<Scope>,
}

/// The SHA-256 of a bearer key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}…", hex::encode(&self.0[..4]))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_base_url() -> String {
    FEISHU_BASE_URL.to_string()
}

impl Config {
    /// Read, parse, expand and validate a config file, with the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        let mut config = Config::parse(&text, &|name| std::env::var(name).ok())?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// The keys that differ between the running config (`self`) and `new` but are only read at
    /// start-up, so a reload cannot apply them: the listeners, `[server]`, `[store]`,
    /// `[tickets]`, `[tokens]`, `[events]`, `[forwarding]`, which apps exist, and each app's
    /// kind, secret and base URL. What a reload does apply (`[[clients]]`, `[[consumers]]`, the
    /// apps' event keys and tokens, previous ones included) is never listed.
    pub fn needs_restart(&self, new: &Config) -> Vec<String> {
        let mut keys = Vec::new();
        let mut differs = |key: &str, changed: bool| {
            if changed {
                keys.push(key.to_string());
            }
        };
        differs("listen", self.listen != new.listen);
        differs("ops_listen", self.ops_listen != new.ops_listen);
        differs("api_listen", self.api_listen != new.api_listen);
        // Debug compares every setting; secrets print `[redacted]`, so the store URL (which
        // may hold a password) is compared apart.
        let debug = |v: &dyn fmt::Debug| format!("{v:?}");
        differs("server", debug(&self.server) != debug(&new.server));
        differs(
            "store",
            debug(&self.store) != debug(&new.store) || self.store.url != new.store.url,
        );
        differs("tickets", debug(&self.tickets) != debug(&new.tickets));
        differs("tokens", debug(&self.tokens) != debug(&new.tokens));
        differs("events", debug(&self.events) != debug(&new.events));
        differs(
            "forwarding",
            debug(&self.forwarding) != debug(&new.forwarding),
        );
        let ids = |c: &Config| c.apps.iter().map(|a| a.app_id.clone()).collect::<Vec<_>>();
        let (old_ids, new_ids) = (ids(self), ids(new));
        let mut sorted = (old_ids.clone(), new_ids.clone());
        sorted.0.sort();
        sorted.1.sort();
        differs("apps (added or removed)", sorted.0 != sorted.1);
        for (i, app) in self.apps.iter().enumerate() {
            let Some(other) = new.app(&app.app_id) else {
                continue;
            };
            differs(&format!("apps[{i}].kind"), app.kind != other.kind);
            differs(
                &format!("apps[{i}].app_secret"),
                app.app_secret != other.app_secret,
            );
            differs(
                &format!("apps[{i}].base_url"),
                app.base_url != other.base_url,
            );
        }
        keys
    }

    /// Parse, expand and validate config text; `env` resolves `${NAME}` references.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner();
            // 1-based: the newlines before the span's start, plus one (`lines()` would not
            // count the line the span starts on when it starts at column 0).
            let line = inner.span().map(|span| {
                let before = text.get(..span.start).unwrap_or(text);
                before.bytes().filter(|&b| b == b'\n').count() + 1
            });
            let key = match (path.as_str(), line) {
                (".", Some(line)) => format!("line {line}"),
                (".", None) => "config".to_string(),
                (p, Some(line)) => format!("{p} (line {line})"),
                (p, None) => p.to_string(),
            };
            ConfigError::new(key, inner.message().trim().to_string())
        })?;
        config.expand_env(env)?;
        config.validate()?;
        Ok(config)
    }

    fn expand_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for (i, app) in self.apps.iter_mut().enumerate() {
            let key = |field: &str| format!("apps[{i}].{field}");
            app.app_secret = expand_present_secret(&app.app_secret, &key("app_secret"), env)?;
            if let Some(t) = &app.verification_token {
                let key = key("verification_token");
                app.verification_token = Some(expand_present_secret(t, &key, env)?);
            }
            if let Some(k) = &app.encrypt_key {
                let key = key("encrypt_key");
                app.encrypt_key = Some(expand_present_secret(k, &key, env)?);
            }
            if let Some(k) = &app.previous_encrypt_key {
                let key = key("previous_encrypt_key");
                app.previous_encrypt_key = Some(expand_present_secret(k, &key, env)?);
            }
            if let Some(t) = &app.previous_verification_token {
                let key = key("previous_verification_token");
                app.previous_verification_token = Some(expand_present_secret(t, &key, env)?);
            }
            app.base_url = expand(&app.base_url, &key("base_url"), env)?;
        }
        if let Some(url) = &self.store.url {
            self.store.url = Some(expand_secret(url, "store.url", env)?);
        }
        for (i, consumer) in self.consumers.iter_mut().enumerate() {
            let key = |field: &str| format!("consumers[{i}].{field}");
            consumer.secret = expand_secret(&consumer.secret, &key("secret"), env)?;
            consumer.url = expand(&consumer.url, &key("url"), env)?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "server.max_body_bytes",
                "must be at least 1KiB",
            ));
        }
        for (key, n) in [
            ("server.max_connections", s.max_connections),
            (
                "server.max_connections_per_peer",
                s.max_connections_per_peer,
            ),
            ("server.api_max_connections", s.api_max_connections),
            (
                "server.api_max_connections_per_peer",
                s.api_max_connections_per_peer,
            ),
            ("server.ops_max_connections", s.ops_max_connections),
            (
                "server.ops_max_connections_per_peer",
                s.ops_max_connections_per_peer,
            ),
        ] {
            if n == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        if !(1024..=1024 * 1024).contains(&s.max_header_bytes) {
            return Err(ConfigError::new(
                "server.max_header_bytes",
                "must be between 1KiB and 1MiB",
            ));
        }
        if s.max_body_bytes_in_flight < s.max_body_bytes {
            return Err(ConfigError::new(
                "server.max_body_bytes_in_flight",
                "must be at least server.max_body_bytes",
            ));
        }
        // The budget counts bytes in a semaphore whose largest single grant is u32::MAX.
        if s.max_body_bytes_in_flight > u32::MAX as usize {
            return Err(ConfigError::new(
                "server.max_body_bytes_in_flight",
                "must be less than 4GiB",
            ));
        }
        for (key, d) in [
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.request_timeout", s.request_timeout),
            ("server.write_timeout", s.write_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(key, "must be longer than 0s"));
            }
        }
        let t = &self.tokens;
        if t.refresh_ahead <= t.refresh_margin {
            return Err(ConfigError::new(
                "tokens.refresh_ahead",
                "must be longer than tokens.refresh_margin",
            ));
        }
        if t.refresh_ahead > MAX_REFRESH_AHEAD {
            return Err(ConfigError::new(
                "tokens.refresh_ahead",
                "must be at most 30m: Feishu returns the same token while 30 minutes or more remain",
            ));
        }
        if t.refresh_jitter >= t.refresh_ahead - t.refresh_margin {
            return Err(ConfigError::new(
                "tokens.refresh_jitter",
                "must be shorter than tokens.refresh_ahead minus tokens.refresh_margin",
            ));
        }
        if t.refresh_concurrency == 0 {
            return Err(ConfigError::new(
                "tokens.refresh_concurrency",
                "must be at least 1",
            ));
        }
        if t.max_tenant_tokens == 0 {
            return Err(ConfigError::new(
                "tokens.max_tenant_tokens",
                "must be at least 1",
            ));
        }
        if t.request_deadline < t.upstream_timeout {
            return Err(ConfigError::new(
                "tokens.request_deadline",
                format!(
                    "must be at least tokens.upstream_timeout ({:?}): one whole attempt must fit before the deadline",
                    t.upstream_timeout
                ),
            ));
        }
        if t.error_backoff > MAX_ERROR_BACKOFF {
            return Err(ConfigError::new(
                "tokens.error_backoff",
                "must be at most 5m",
            ));
        }
        for (key, d) in [
            ("tokens.refresh_check_interval", t.refresh_check_interval),
            ("tokens.upstream_timeout", t.upstream_timeout),
            ("tokens.fleet_poll_interval", t.fleet_poll_interval),
            ("tickets.resend_wait", self.tickets.resend_wait),
            ("tickets.stale_after", self.tickets.stale_after),
            ("events.max_age", self.events.max_age),
            ("events.max_skew", self.events.max_skew),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(key, "must be longer than 0s"));
            }
        }
        match self.store.kind {
            StoreKind::Embedded if self.store.path.as_os_str().is_empty() => {
                return Err(ConfigError::new("store.path", "must not be empty"));
            }
            StoreKind::Redis => self.store.validate_redis()?,
            _ => {}
        }
        if self.apps.is_empty() {
            return Err(ConfigError::new(
                "apps",
                "at least one [[apps]] entry is required",
            ));
        }
        let mut seen = HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let key = |field: &str| format!("apps[{i}].{field}");
            if !is_valid_app_id(&app.app_id) {
                return Err(ConfigError::new(
                    key("app_id"),
                    "must be a Feishu app id like \"cli_a1b2c3d4e5f6a7b8\" (letters, digits, '_' and '-')",
                ));
            }
            if !seen.insert(app.app_id.as_str()) {
                return Err(ConfigError::new(
                    key("app_id"),
                    format!("duplicate app_id {:?}", app.app_id),
                ));
            }
            // An empty app_secret, encrypt_key or verification_token was refused by
            // `expand_present_secret`: here `None` means the key is absent from the file.
            match (app.kind, &app.verification_token, &app.encrypt_key) {
                (AppKind::Store, None, _) => {
                    return Err(ConfigError::new(
                        key("verification_token"),
                        "must be set: a store app's App Ticket arrives as an event, checked against it",
                    ));
                }
                (AppKind::Custom, None, Some(_)) => {
                    return Err(ConfigError::new(
                        key("verification_token"),
                        "must be set when encrypt_key is (events are checked against both); \
                         a custom app whose events are not pushed here needs neither",
                    ));
                }
                _ => {}
            }
            validate_base_url(&app.base_url).map_err(|m| ConfigError::new(key("base_url"), m))?;
            validate_previous_keys(app).map_err(|(field, m)| ConfigError::new(key(field), m))?;
        }
        let mut names = HashSet::new();
        for (i, client) in self.clients.iter().enumerate() {
            let key = |field: &str| format!("clients[{i}].{field}");
            if client.name.trim().is_empty() {
                return Err(ConfigError::new(key("name"), "must not be empty"));
            }
            if !names.insert(client.name.as_str()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate client name {:?}", client.name),
                ));
            }
            if client.apps.is_empty() {
                return Err(ConfigError::new(
                    key("apps"),
                    "list the app ids this client may use, or [\"*\"]",
                ));
            }
            for app in &client.apps {
                if app != "*" && !seen.contains(app.as_str()) {
                    return Err(ConfigError::new(
                        key("apps"),
                        format!("{app:?} is not an app_id of any [[apps]] entry"),
                    ));
                }
            }
            if client.scopes.is_empty() {
                return Err(ConfigError::new(
                    key("scopes"),
                    "list at least one of \"tokens\", \"status\", \"admin\", \"login\"",
                ));
            }
        }
        self.validate_forwarding(&seen)
    }

    /// `[forwarding]` and `[[consumers]]`; `app_ids` are the configured apps.
    fn validate_forwarding(&self, app_ids: &HashSet<&str>) -> Result<(), ConfigError> {
        let f = &self.forwarding;
        for (key, d) in [
            ("forwarding.dedupe_window", f.dedupe_window),
            ("forwarding.delivery_timeout", f.delivery_timeout),
            ("forwarding.retention", f.retention),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(key, "must be longer than 0s"));
            }
        }
        if f.retry_schedule.is_empty() {
            return Err(ConfigError::new(
                "forwarding.retry_schedule",
                "must list at least one wait, e.g. [\"5s\", \"30s\", \"2m\"]",
            ));
        }
        for (i, step) in f.retry_schedule.iter().enumerate() {
            let key = format!("forwarding.retry_schedule[{i}]");
            if step.is_zero() {
                return Err(ConfigError::new(key, "must be longer than 0s"));
            }
            if i > 0 && *step < f.retry_schedule[i - 1] {
                return Err(ConfigError::new(
                    key,
                    "is shorter than the step before it: the schedule must be sorted",
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, consumer) in self.consumers.iter().enumerate() {
            let key = |field: &str| format!("consumers[{i}].{field}");
            if !is_valid_consumer_name(&consumer.name) {
                return Err(ConfigError::new(
                    key("name"),
                    format!(
                        "{:?} must be 1 to 64 of a-z, 0-9 and '-' (it appears in API paths and metrics)",
                        consumer.name
                    ),
                ));
            }
            if !names.insert(consumer.name.as_str()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate consumer name {:?}", consumer.name),
                ));
            }
            validate_consumer_url(&consumer.url).map_err(|m| ConfigError::new(key("url"), m))?;
            consumer
                .webhook_secret()
                .map_err(|e| ConfigError::new(key("secret"), e.to_string()))?;
            if consumer.events.is_empty() {
                return Err(ConfigError::new(
                    key("events"),
                    "list event types, or [\"*\"] for every event",
                ));
            }
            for pattern in &consumer.events {
                EventPattern::parse(pattern)
                    .map_err(|e| ConfigError::new(key("events"), e.to_string()))?;
            }
            if consumer.apps.is_empty() {
                return Err(ConfigError::new(
                    key("apps"),
                    "list the app ids whose events this consumer gets, or [\"*\"]",
                ));
            }
            for app in &consumer.apps {
                if app != "*" && !app_ids.contains(app.as_str()) {
                    return Err(ConfigError::new(
                        key("apps"),
                        format!("{app:?} is not an app_id of any [[apps]] entry"),
                    ));
                }
            }
            consumer
                .filter()
                .map_err(|e| ConfigError::new(key("events"), e.to_string()))?;
        }
        Ok(())
    }

    /// The app with this id.
    pub fn app(&self, app_id: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.app_id == app_id)
    }
}

/// Key rotation's rules: a previous key or token only next to a current one, and never without
/// the time it stops being accepted (so a forgotten old key does not stay valid for ever).
fn validate_previous_keys(app: &AppConfig) -> Result<(), (&'static str, String)> {
    if app.previous_encrypt_key.is_some() && app.encrypt_key.is_none() {
        return Err((
            "previous_encrypt_key",
            "is set but encrypt_key is not: put the new key in encrypt_key and the old one here"
                .into(),
        ));
    }
    if app.previous_verification_token.is_some() && app.verification_token.is_none() {
        return Err((
            "previous_verification_token",
            "is set but verification_token is not: put the new token in verification_token and \
             the old one here"
                .into(),
        ));
    }
    let has_previous =
        app.previous_encrypt_key.is_some() || app.previous_verification_token.is_some();
    if has_previous && app.previous_keys_until.is_none() {
        return Err((
            "previous_keys_until",
            "is required with previous_encrypt_key or previous_verification_token: until when \
             (RFC 3339, e.g. \"2026-12-01T00:00:00Z\") the previous key is still accepted"
                .into(),
        ));
    }
    Ok(())
}

fn is_valid_app_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_valid_consumer_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An http(s) URL with a host and no user info: the URL is shown by `GET /v1/consumers`,
/// `check-config` and the logs, so it must not carry a password (consumers authenticate our
/// deliveries by the signature instead). Errors do not repeat the URL, in case it holds one.
fn validate_consumer_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http or https URL, not {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_string());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "must not contain user info (user:password@): the URL is shown in the API and logs; consumers verify the webhook-signature instead"
                .to_string(),
        );
    }
    Ok(())
}

fn validate_base_url(url: &str) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{url:?} must be an http or https URL"));
    }
    if parsed.host_str().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

/// [`expand_secret`] for a secret whose emptiness would change what the service does: an empty
/// `encrypt_key` (current or previous) would turn decryption and signature checks off, an empty `verification_token`
/// would stop an app's events, an empty `app_secret` can fetch no token. An empty value (a
/// `${NAME}` set to "" included) is refused, naming the key and the variables; a key left out of
/// the file is the one way to say "not set".
fn expand_present_secret(
    value: &Secret,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    let expanded = expand_secret(value, key, env)?;
    if !expanded.is_empty() {
        return Ok(expanded);
    }
    // Empty after expansion: the raw value holds nothing but references, no secret text.
    let raw = value.expose();
    let names: Vec<&str> = raw
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
        .collect();
    let what = match names.as_slice() {
        [] => "is empty".to_string(),
        [name] => format!("is empty: environment variable {name} is set but empty"),
        names => format!(
            "is empty: environment variables {} are set but empty",
            names.join(", ")
        ),
    };
    let field = key.rsplit('.').next().unwrap_or(key);
    let hint = match field {
        "encrypt_key" => {
            "; an empty Encrypt Key would turn encryption and signature checks off: leave \
             encrypt_key out only if the app has no Encrypt Key in Feishu's console"
        }
        "verification_token" => {
            "; leave verification_token out only for a custom app whose events are not pushed here"
        }
        _ => "",
    };
    Err(ConfigError::new(key, format!("{what}{hint}")))
}

fn expand_secret(
    value: &Secret,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    expand(value.expose(), key, env).map(Secret::new)
}

/// Replace every `${NAME}` in `value` with the variable's value.
fn expand(
    value: &str,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| ConfigError::new(key, "unterminated ${…} reference"))?;
        let name = &after[..end];
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(ConfigError::new(
                key,
                format!("${{{name}}} is not a valid environment variable reference"),
            ));
        }
        let resolved = env(name).ok_or_else(|| {
            ConfigError::new(key, format!("environment variable {name} is not set"))
        })?;
        out.push_str(&resolved);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parse a duration like `"90s"`, `"5m"`, `"1h"`, `"250ms"`, `"1d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit: write e.g. \"90s\", \"5m\", \"1h\""))?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like \"90s\", \"5m\", \"1h\""))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Parse a size like `1048576`, `"64KiB"`, `"1MiB"`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: usize = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"64KiB\" or \"1MiB\""))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1024,
        "MiB" | "MB" | "M" => 1024 * 1024,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use B, KiB or MiB)")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let items = Vec::<String>::deserialize(d)?;
    items
        .iter()
        .map(|s| parse_duration(s).map_err(serde::de::Error::custom))
        .collect()
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => usize::try_from(n).map_err(serde::de::Error::custom),
        Size::Text(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
    }
}

/// Parse an RFC 3339 time (`2026-12-01T00:00:00Z`, `2026-12-01T08:00:00+08:00`, fractional
/// seconds allowed) to unix milliseconds. Times before 1970 are refused.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time like \"2026-12-01T00:00:00Z\"");
    let b = s.trim().as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let part = b.get(range).ok_or_else(bad)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        std::str::from_utf8(part)
            .ok()
            .and_then(|p| p.parse().ok())
            .ok_or_else(bad)
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let digits = &s.trim()[start..i.min(start + 3)];
        millis = format!("{digits:0<3}").parse().map_err(|_| bad())?;
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let minutes = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' {
                minutes
            } else {
                -minutes
            }
        }
        _ => return Err(bad()),
    };
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    u64::try_from(seconds * 1000 + millis).map_err(|_| format!("{s:?} is before 1970"))
}

/// A point in time the config gives as RFC 3339, kept as unix milliseconds; shown (`Debug`, as
/// `check-config` prints it) in RFC 3339 again, in UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcTime {
    pub unix_ms: u64,
}

impl fmt::Debug for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = crate::clock::utc(self.unix_ms / 1000).replace(' ', "T");
        match self.unix_ms % 1000 {
            0 => write!(f, "{seconds}Z"),
            ms => write!(f, "{seconds}.{ms:03}Z"),
        }
    }
}

fn de_rfc3339_ms<'de, D: Deserializer<'de>>(d: D) -> Result<Option<UtcTime>, D::Error> {
    let s = String::deserialize(d)?;
    parse_rfc3339_ms(&s)
        .map(|unix_ms| Some(UtcTime { unix_ms }))
        .map_err(serde::de::Error::custom)
}

fn de_key_hash<'de, D: Deserializer<'de>>(d: D) -> Result<KeyHash, D::Error> {
    let s = String::deserialize(d)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).map_err(|_| {
        serde::de::Error::custom("must be 64 hex digits: the SHA-256 of the bearer key")
    })?;
    Ok(KeyHash(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    const MINIMAL: &str = r#"
[[apps]]
app_id = "cli_a1b2c3d4e5f6a7b8"
app_secret = "${SECRET}"
encrypt_key = "ek-${EK}-suffix"
verification_token = "vt-literal"
"#;

    #[test]
    fn minimal_config_gets_defaults_and_expands_env() {
        let c = Config::parse(MINIMAL, &env_of(&[("SECRET", "s3cr3t"), ("EK", "key")])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 1024 * 1024);
        assert_eq!(c.store.kind, StoreKind::Embedded);
        let app = &c.apps[0];
        assert_eq!(app.app_secret.expose(), "s3cr3t");
        assert_eq!(app.encrypt_key.as_ref().unwrap().expose(), "ek-key-suffix");
        assert_eq!(
            app.verification_token.as_ref().unwrap().expose(),
            "vt-literal"
        );
        assert_eq!(app.kind, AppKind::Store);
        assert_eq!(app.base_url, FEISHU_BASE_URL);
        assert_eq!(c.events.max_age, Duration::from_secs(8 * 3600));
        assert_eq!(c.events.max_skew, Duration::from_secs(300));
        assert!(c.events.reject_stale);
    }

    #[test]
    fn redis_store_keys_are_validated_without_repeating_the_url() {
        let parse = |store: &str| {
            let text = format!("[store]\n{store}\n{MINIMAL}");
            Config::parse(
                &text,
                &env_of(&[("SECRET", "s"), ("EK", "k"), ("PW", "pw-9f3e")]),
            )
        };
        let c = parse("kind = \"redis\"\nurl = \"redis://:${PW}@127.0.0.1:6380/0\"").unwrap();
        assert_eq!(c.store.kind, StoreKind::Redis);
        assert_eq!(
            c.store.url.as_ref().unwrap().expose(),
            "redis://:pw-9f3e@127.0.0.1:6380/0"
        );
        assert_eq!(
            (c.store.key_prefix.as_str(), c.store.cluster),
            ("lark-ticketd", false)
        );
        assert!(!format!("{c:?}").contains("pw-9f3e"));
        let c = parse(
            "kind = \"redis\"\nurl = \"rediss://:${PW}@redis.internal:6380/0\"\ntls_ca_file = \"/etc/ca.pem\"",
        )
        .unwrap();
        assert_eq!(
            c.store.tls_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        let c = parse(
            "kind = \"redis\"\nurl = \"redis://h:7000\"\nkey_prefix = \"ltd:prod\"\ncluster = true",
        )
        .unwrap();
        assert_eq!(
            (c.store.key_prefix.as_str(), c.store.cluster),
            ("ltd:prod", true)
        );
        for (store, key) in [
            ("kind = \"redis\"", "store.url"),
            ("kind = \"redis\"\nurl = \"\"", "store.url"),
            ("kind = \"redis\"\nurl = \"http://:pw-9f3e@h\"", "store.url"),
            (
                "kind = \"redis\"\nurl = \"redis://:pw-9f3e@h:notaport\"",
                "store.url",
            ),
            (
                "kind = \"redis\"\nurl = \"rediss://:pw-9f3e@h/#insecure\"",
                "store.url",
            ),
            (
                "kind = \"redis\"\nurl = \"unix:///run/redis.sock\"\ncluster = true",
                "store.url",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://:pw-9f3e@h\"\ntls_ca_file = \"ca.pem\"",
                "store.tls_ca_file",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h\"\nkey_prefix = \"\"",
                "store.key_prefix",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h\"\nkey_prefix = \"{x}\"",
                "store.key_prefix",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h\"\nclustr = true",
                "store.clustr",
            ),
            ("kind = \"redis\"\nurl = \"${MISSING}\"", "store.url"),
        ] {
            let e = parse(store).expect_err(store);
            assert!(e.key.starts_with(key), "{store}: {e}");
            assert!(!e.to_string().contains("pw-9f3e"), "{e}");
        }
    }

    #[test]
    fn events_window_is_configurable_and_can_be_turned_off() {
        let text = format!(
            "[events]\nmax_age = \"12h\"\nmax_skew = \"1m\"\nreject_stale = false\n{MINIMAL}"
        );
        let c = Config::parse(&text, &env_of(&[("SECRET", "s"), ("EK", "k")])).unwrap();
        assert_eq!(c.events.max_age, Duration::from_secs(12 * 3600));
        assert_eq!(c.events.max_skew, Duration::from_secs(60));
        assert!(!c.events.reject_stale);
        let text = format!("[events]\nmax_age = \"0s\"\n{MINIMAL}");
        let err = Config::parse(&text, &env_of(&[("SECRET", "s"), ("EK", "k")])).unwrap_err();
        assert_eq!(err.key, "events.max_age");
    }

    #[test]
    fn debug_output_redacts_every_secret() {
        let c = Config::parse(MINIMAL, &env_of(&[("SECRET", "s3cr3t"), ("EK", "key")])).unwrap();
        let dump = format!("{c:?} {c:#?}");
        for secret in ["s3cr3t", "ek-key-suffix", "vt-literal"] {
            assert!(!dump.contains(secret), "{secret} leaked in {dump}");
        }
        assert!(dump.contains("[redacted]"));
    }

    #[test]
    fn missing_env_variable_names_the_key() {
        let err = Config::parse(MINIMAL, &env_of(&[("EK", "key")])).unwrap_err();
        assert_eq!(err.key, "apps[0].app_secret");
        assert!(err.message.contains("SECRET"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = format!("lisen = \"127.0.0.1:1\"\n{MINIMAL}");
        let err = Config::parse(&text, &env_of(&[("SECRET", "s"), ("EK", "k")])).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }

    /// Issue 12: an unknown key's error named the line before it whenever the key starts a line
    /// (every key but the file's first). The line reported must be the typo's own, wherever it is.
    #[test]
    fn unknown_key_reports_its_own_line() {
        let env = env_of(&[("SECRET", "s"), ("EK", "k")]);
        let consumer = "[[consumers]]\nname = \"c\"\nurl = \"http://127.0.0.1:9/\"\n\
                        secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";
        for (text, typo) in [
            (
                format!("listen = \"127.0.0.1:1\"\n\nlisen = \"x\"\n{MINIMAL}"),
                "lisen",
            ),
            (format!("{MINIMAL}encrpyt_key = \"k\"\n"), "encrpyt_key"),
            (
                format!("{MINIMAL}[forwarding]\nretention = \"1d\"\n  retry_shedule = []\n"),
                "retry_shedule",
            ),
            (format!("{MINIMAL}{consumer}evnets = [\"*\"]\n"), "evnets"),
            (
                format!("[server]\nshutdown_grase = \"1s\"\n{MINIMAL}"),
                "shutdown_grase",
            ),
        ] {
            let line = 1 + text
                .lines()
                .position(|l| l.trim_start().starts_with(typo))
                .expect("the typo is in the text");
            let err = Config::parse(&text, &env).unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains(typo), "{shown}");
            assert!(
                shown.contains(&format!("line {line})"))
                    || shown.starts_with(&format!("line {line}:")),
                "{typo} is on line {line}: {shown}"
            );
        }
    }

    #[test]
    fn bad_duration_names_the_key() {
        let text = format!("[server]\nshutdown_grace = \"10 parsecs\"\n{MINIMAL}");
        let err = Config::parse(&text, &env_of(&[("SECRET", "s"), ("EK", "k")])).unwrap_err();
        assert!(err.key.starts_with("server.shutdown_grace"), "{err}");
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("1GiB").is_err());
    }

    #[test]
    fn custom_apps_need_no_event_keys() {
        let text = r#"
[[apps]]
app_id = "cli_custom"
kind = "custom"
app_secret = "s"

[[apps]]
app_id = "cli_custom_events"
kind = "custom"
app_secret = "s"
verification_token = "${VT}"

[[clients]]
name = "login-service"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
apps = ["cli_custom"]
scopes = ["login", "tokens"]
"#;
        let c = Config::parse(text, &env_of(&[("VT", "vt")])).unwrap();
        assert_eq!(c.apps[0].kind, AppKind::Custom);
        assert!(!c.apps[0].receives_events());
        assert_eq!(c.clients[0].scopes, [Scope::Login, Scope::Tokens]);
        assert!(c.apps[1].receives_events());
        // An empty ${VT} is an error (issue 12), not a quiet "events off": leave the key out.
        let err = Config::parse(text, &env_of(&[("VT", "")])).unwrap_err();
        assert_eq!(err.key, "apps[1].verification_token", "{err}");
        assert_eq!(AppKind::Custom.as_str(), "custom");
    }

    /// Issue 12: an empty `${LARK_ENCRYPT_KEY}` silently turned encryption off. Every secret
    /// that is in the file and comes out empty is refused, naming the key (and the variable);
    /// only a key left out means "not set".
    #[test]
    fn empty_secret_is_refused_unless_the_key_is_absent() {
        let app = |fields: &str| {
            format!("[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"\n{fields}")
        };
        let env = env_of(&[("LARK_ENCRYPT_KEY", ""), ("EMPTY", ""), ("EK", "k")]);
        // Absent: no Encrypt Key, events in clear text.
        let c = Config::parse(&app(""), &env).unwrap();
        assert!(c.apps[0].encrypt_key.is_none());
        let c = Config::parse(&app("encrypt_key = \"${EK}\""), &env).unwrap();
        assert_eq!(c.apps[0].encrypt_key.as_ref().unwrap().expose(), "k");
        for (fields, key, names) in [
            (
                "encrypt_key = \"${LARK_ENCRYPT_KEY}\"",
                "apps[0].encrypt_key",
                "LARK_ENCRYPT_KEY",
            ),
            ("encrypt_key = \"\"", "apps[0].encrypt_key", ""),
            (
                "encrypt_key = \"${EMPTY}${LARK_ENCRYPT_KEY}\"",
                "apps[0].encrypt_key",
                "EMPTY, LARK_ENCRYPT_KEY",
            ),
        ] {
            let err = Config::parse(&app(fields), &env).unwrap_err();
            assert_eq!(err.key, key, "{fields}: {err}");
            assert!(err.message.starts_with("is empty"), "{fields}: {err}");
            assert!(err.message.contains(names), "{fields}: {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
        for (text, key) in [
            (
                "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"${EMPTY}\"\nverification_token = \"t\"",
                "apps[0].app_secret",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"${EMPTY}\"",
                "apps[0].verification_token",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\nkind = \"custom\"\napp_secret = \"s\"\nverification_token = \"${EMPTY}\"",
                "apps[0].verification_token",
            ),
        ] {
            let err = Config::parse(text, &env).unwrap_err();
            assert_eq!(err.key, key, "{text}: {err}");
            assert!(err.message.contains("EMPTY"), "{text}: {err}");
        }
    }

    #[test]
    fn token_bounds_are_validated_naming_the_key() {
        let app = "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"";
        for (tokens, key) in [
            ("refresh_ahead = \"31m\"", "tokens.refresh_ahead"),
            ("refresh_ahead = \"2h\"", "tokens.refresh_ahead"),
            ("refresh_jitter = \"27m\"", "tokens.refresh_jitter"),
            ("refresh_concurrency = 0", "tokens.refresh_concurrency"),
            ("max_tenant_tokens = 0", "tokens.max_tenant_tokens"),
            ("error_backoff = \"1h\"", "tokens.error_backoff"),
            ("request_deadline = \"1s\"", "tokens.request_deadline"),
            ("upstream_timeout = \"11s\"", "tokens.request_deadline"),
        ] {
            let text = format!("[tokens]\n{tokens}\n{app}");
            let err = Config::parse(&text, &env_of(&[])).unwrap_err();
            assert_eq!(err.key, key, "{tokens}: {err}");
        }
        let text = format!("[tokens]\nrefresh_ahead = \"30m\"\nrefresh_jitter = \"0s\"\n{app}");
        assert!(Config::parse(&text, &env_of(&[])).is_ok());
        // One deadline per token request: 10 s unless set, never shorter than one attempt.
        let c = Config::parse(app, &env_of(&[])).unwrap();
        assert_eq!(c.tokens.request_deadline, Duration::from_secs(10));
        let text = format!("[tokens]\nupstream_timeout = \"1s\"\nrequest_deadline = \"1s\"\n{app}");
        assert!(Config::parse(&text, &env_of(&[])).is_ok());
    }

    /// A valid Standard Webhooks secret (base64 of 24 bytes) for the consumer tests.
    const WHSEC: &str = "whsec_wZPl9qd+KCzQjxaK2mBjvC8Hp/oSGWyn";
    const APP: &str =
        "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"\n";

    fn consumer(fields: &str) -> String {
        format!("{APP}[[consumers]]\n{fields}\n")
    }

    #[test]
    fn forwarding_defaults_follow_the_design() {
        let c = Config::parse(APP, &env_of(&[])).unwrap();
        let f = &c.forwarding;
        let s = Duration::from_secs;
        assert_eq!(f.dedupe_window, s(24 * 3600));
        assert_eq!(
            f.retry_schedule,
            [5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600].map(s)
        );
        assert_eq!(f.delivery_timeout, s(10));
        assert_eq!(f.retention, s(7 * 86_400));
        assert!(c.consumers.is_empty());
        let text = format!(
            "[forwarding]\ndedupe_window = \"8h\"\nretry_schedule = [\"10ms\", \"10ms\", \"1s\"]\ndelivery_timeout = \"2s\"\nretention = \"1d\"\n{APP}"
        );
        let f = Config::parse(&text, &env_of(&[])).unwrap().forwarding;
        assert_eq!(f.dedupe_window, s(8 * 3600));
        assert_eq!(
            f.retry_schedule,
            [Duration::from_millis(10), Duration::from_millis(10), s(1)]
        );
        assert_eq!(f.delivery_timeout, s(2));
        assert_eq!(f.retention, s(86_400));
    }

    #[test]
    fn consumer_gets_defaults_and_its_secret_from_the_environment() {
        let text = consumer(
            "name = \"bot-backend\"\nurl = \"http://127.0.0.1:9000/feishu\"\nsecret = \"${WH_SECRET}\"",
        );
        let c = Config::parse(&text, &env_of(&[("WH_SECRET", WHSEC)])).unwrap();
        let k = &c.consumers[0];
        assert_eq!(k.name, "bot-backend");
        assert_eq!(k.url, "http://127.0.0.1:9000/feishu");
        assert_eq!(k.secret.expose(), WHSEC);
        assert_eq!(k.events, ["*"]);
        assert_eq!(k.apps, ["*"]);
        assert!(k.webhook_secret().is_ok());
        assert!(k
            .filter()
            .unwrap()
            .matches("cli_x", "im.message.receive_v1"));

        let text = consumer(
            "name = \"contacts\"\nurl = \"https://example.com/hook\"\nsecret = \"${WH_SECRET}\"\nevents = [\"contact.user.*\", \"app_open\"]\napps = [\"cli_x\"]",
        );
        let c = Config::parse(&text, &env_of(&[("WH_SECRET", WHSEC)])).unwrap();
        let filter = c.consumers[0].filter().unwrap();
        assert!(filter.matches("cli_x", "contact.user.created_v3"));
        assert!(filter.matches("cli_x", "app_open"));
        assert!(!filter.matches("cli_x", "im.message.receive_v1"));
    }

    #[test]
    fn debug_output_redacts_consumer_secrets() {
        let text = consumer("name = \"a\"\nurl = \"http://127.0.0.1:9000/\"\nsecret = \"${WH}\"");
        let c = Config::parse(&text, &env_of(&[("WH", WHSEC)])).unwrap();
        let dump = format!("{c:?} {c:#?}");
        assert!(!dump.contains(WHSEC), "{dump}");
        assert!(!dump.contains("wZPl9qd"), "{dump}");
        assert!(dump.contains("secret: [redacted]"), "{dump}");
        assert!(
            dump.contains("http://127.0.0.1:9000/"),
            "the rest is shown: {dump}"
        );
    }

    #[test]
    fn forwarding_validation_errors_name_the_key() {
        for (forwarding, key) in [
            ("retry_schedule = []", "forwarding.retry_schedule"),
            (
                "retry_schedule = [\"5s\", \"1s\"]",
                "forwarding.retry_schedule[1]",
            ),
            (
                "retry_schedule = [\"1s\", \"2s\", \"1500ms\"]",
                "forwarding.retry_schedule[2]",
            ),
            (
                "retry_schedule = [\"0s\", \"1s\"]",
                "forwarding.retry_schedule[0]",
            ),
            (
                "retry_schedule = [\"5 parsecs\"]",
                "forwarding.retry_schedule",
            ),
            ("retry_schedule = \"5s\"", "forwarding.retry_schedule"),
            ("dedupe_window = \"0s\"", "forwarding.dedupe_window"),
            ("delivery_timeout = \"0ms\"", "forwarding.delivery_timeout"),
            ("retention = \"0d\"", "forwarding.retention"),
            ("retries = 3", "forwarding"),
        ] {
            let text = format!("[forwarding]\n{forwarding}\n{APP}");
            let err = Config::parse(&text, &env_of(&[])).unwrap_err();
            assert!(
                err.key.starts_with(key),
                "{forwarding}: expected {key}, got {err}"
            );
        }
    }

    #[test]
    fn consumer_validation_errors_name_the_key() {
        let ok_url = "url = \"http://127.0.0.1:9000/\"";
        let ok_secret = "secret = \"${WH}\"";
        let with = |name: &str, url: &str, secret: &str, extra: &str| {
            consumer(&format!("name = \"{name}\"\n{url}\n{secret}\n{extra}"))
        };
        let short = "whsec_MDEyMzQ1Njc4OWFiY2RlZg==";
        let cases = [
            (with("Bot", ok_url, ok_secret, ""), "consumers[0].name"),
            (with("", ok_url, ok_secret, ""), "consumers[0].name"),
            (
                with("bot_backend", ok_url, ok_secret, ""),
                "consumers[0].name",
            ),
            (
                with(&"a".repeat(65), ok_url, ok_secret, ""),
                "consumers[0].name",
            ),
            (
                format!(
                    "{}[[consumers]]\nname = \"a\"\n{ok_url}\n{ok_secret}\n",
                    with("a", ok_url, ok_secret, "")
                ),
                "consumers[1].name",
            ),
            (
                with("a", "url = \"ftp://host/x\"", ok_secret, ""),
                "consumers[0].url",
            ),
            (
                with("a", "url = \"http://\"", ok_secret, ""),
                "consumers[0].url",
            ),
            (
                with("a", "url = \"/relative\"", ok_secret, ""),
                "consumers[0].url",
            ),
            (with("a", "url = \"\"", ok_secret, ""), "consumers[0].url"),
            (
                with("a", "url = \"https://user:pw-in-url@host/\"", ok_secret, ""),
                "consumers[0].url",
            ),
            (
                with("a", "url = \"${NO_SUCH_VAR}\"", ok_secret, ""),
                "consumers[0].url",
            ),
            (
                with(
                    "a",
                    ok_url,
                    "secret = \"wZPl9qd+KCzQjxaK2mBjvC8Hp/oSGWyn\"",
                    "",
                ),
                "consumers[0].secret",
            ),
            (
                with("a", ok_url, &format!("secret = \"{short}\""), ""),
                "consumers[0].secret",
            ),
            (
                with("a", ok_url, "secret = \"whsec_%%%\"", ""),
                "consumers[0].secret",
            ),
            (
                with("a", ok_url, "secret = \"\"", ""),
                "consumers[0].secret",
            ),
            (
                with("a", ok_url, "secret = \"${NO_SUCH_VAR}\"", ""),
                "consumers[0].secret",
            ),
            (with("a", ok_url, "", ""), "consumers[0]"),
            (
                with("a", ok_url, ok_secret, "events = []"),
                "consumers[0].events",
            ),
            (
                with("a", ok_url, ok_secret, "events = [\"contact.user*\"]"),
                "consumers[0].events",
            ),
            (
                with("a", ok_url, ok_secret, "events = [\"im..x\"]"),
                "consumers[0].events",
            ),
            (
                with("a", ok_url, ok_secret, "apps = []"),
                "consumers[0].apps",
            ),
            (
                with("a", ok_url, ok_secret, "apps = [\"cli_y\"]"),
                "consumers[0].apps",
            ),
            (
                with("a", ok_url, ok_secret, "filter = \"x\""),
                "consumers[0]",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(&text, &env_of(&[("WH", WHSEC)])).unwrap_err();
            assert!(
                err.key.starts_with(key),
                "expected {key}, got {err}\n{text}"
            );
            let shown = err.to_string();
            for secret in [WHSEC, "wZPl9qd", "MDEyMzQ1", "pw-in-url"] {
                assert!(!shown.contains(secret), "{secret} leaked: {shown}");
            }
        }
        // Equal steps, "*" next to app ids and https are fine.
        let text = with(
            "a-1",
            "url = \"https://hooks.example.com:8443/feishu?x=1\"",
            ok_secret,
            "apps = [\"cli_x\", \"*\"]\nevents = [\"*\", \"im.*\"]",
        );
        assert!(Config::parse(&text, &env_of(&[("WH", WHSEC)])).is_ok());
    }

    /// The example file parses, and so does its commented-out `[[consumers]]` block once
    /// uncommented: the documentation cannot drift from what the service accepts.
    #[test]
    fn example_config_and_its_consumer_example_are_valid() {
        let example = include_str!("../docs/lark-ticketd.example.toml");
        let c = Config::parse(example, &env_of(&[])).unwrap();
        assert!(c.consumers.is_empty());
        let block: Vec<&str> = example
            .lines()
            .skip_while(|l| !l.starts_with("# [[consumers]]"))
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("# "))
            .collect();
        assert!(block.len() >= 5, "the example has a consumer block");
        let text = format!("{example}\n{}\n", block.join("\n"));
        let c = Config::parse(&text, &env_of(&[("BOT_BACKEND_WEBHOOK_SECRET", WHSEC)])).unwrap();
        assert_eq!(c.consumers.len(), 1);
        assert!(c.consumers[0].filter().is_ok());
    }

    #[test]
    fn validation_errors_name_the_key() {
        let cases = [
            ("listen = \"127.0.0.1:1\"", "apps"),
            (
                "[[apps]]\napp_id = \"cli x\"\napp_secret = \"s\"\nverification_token = \"t\"",
                "apps[0].app_id",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"\"\nverification_token = \"t\"",
                "apps[0].app_secret",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"\nbase_url = \"ftp://x\"",
                "apps[0].base_url",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"\n[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"",
                "apps[1].app_id",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"\n[[clients]]\nname = \"a\"\nkey_sha256 = \"00\"\napps = [\"*\"]\nscopes = [\"tokens\"]",
                "clients[0].key_sha256",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"\n[[clients]]\nname = \"a\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\napps = [\"cli_y\"]\nscopes = [\"tokens\"]",
                "clients[0].apps",
            ),
            (
                "[server]\nmax_body_bytes = 10\n[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"",
                "server.max_body_bytes",
            ),
            (
                "[server]\nmax_connections_per_peer = 0\n[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"",
                "server.max_connections_per_peer",
            ),
            (
                "[server]\nmax_header_bytes = 100\n[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"",
                "server.max_header_bytes",
            ),
            (
                "[server]\nmax_body_bytes = \"2MiB\"\nmax_body_bytes_in_flight = \"1MiB\"\n[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"\nverification_token = \"t\"",
                "server.max_body_bytes_in_flight",
            ),
            // A store app needs its Verification Token: the ticket arrives as an event.
            (
                "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"s\"",
                "apps[0].verification_token",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\nkind = \"store\"\napp_secret = \"s\"\nverification_token = \"\"",
                "apps[0].verification_token",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\nkind = \"custom\"\napp_secret = \"s\"\nencrypt_key = \"k\"",
                "apps[0].verification_token",
            ),
            (
                "[[apps]]\napp_id = \"cli_x\"\nkind = \"marketplace\"\napp_secret = \"s\"",
                "apps[0].kind",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(text, &env_of(&[])).unwrap_err();
            assert!(err.key.starts_with(key), "expected {key}, got {err}");
        }
    }

    #[test]
    fn check_config_shows_the_end_of_a_key_overlap_in_rfc3339() {
        let text = format!(
            "{ROTATING}previous_encrypt_key = \"old-key\"\n\
             previous_keys_until = \"2026-12-02T08:00:00.25+08:00\"\n"
        );
        let config = Config::parse(&text, &|_| None).unwrap();
        let shown = format!("{config:?}");
        assert!(
            shown.contains("previous_keys_until: Some(2026-12-02T00:00:00.250Z)"),
            "{shown}"
        );
    }

    #[test]
    fn rfc3339_times_parse_to_unix_milliseconds() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_rfc3339_ms("2026-12-01T00:00:00Z"),
            Ok(1_796_083_200_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-12-01T08:00:00.5+08:00"),
            Ok(1_796_083_200_500)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-02-29T23:59:59-00:30"),
            Ok(1_709_252_999_000)
        );
        for bad in [
            "",
            "2026-12-01",
            "2026-12-01T00:00:00",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-12-01T00:00:00+0800",
            "1969-12-31T23:59:59Z",
            "24h",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
        }
    }

    const ROTATING: &str = "[[apps]]\napp_id = \"cli_a\"\napp_secret = \"s\"\n\
        verification_token = \"new-tok\"\nencrypt_key = \"new-key\"\n";

    #[test]
    fn previous_keys_need_a_current_key_and_an_end() {
        let ok = format!(
            "{ROTATING}previous_encrypt_key = \"${{OLD}}\"\nprevious_verification_token = \"old-tok\"\n\
             previous_keys_until = \"2026-12-01T00:00:00Z\"\n"
        );
        let c = Config::parse(&ok, &env_of(&[("OLD", "old-key")])).unwrap();
        let app = &c.apps[0];
        assert_eq!(
            app.previous_encrypt_key.as_ref().map(Secret::expose),
            Some("old-key")
        );
        assert!(app.previous_keys_active(1_796_083_199_999));
        assert!(!app.previous_keys_active(1_796_083_200_000));
        let printed = format!("{c:?}");
        assert!(!printed.contains("old-key") && !printed.contains("old-tok"));
        // An empty value is refused, as for the current key: leaving the key out means "not set".
        let empty = Config::parse(&ok, &env_of(&[("OLD", "")])).unwrap_err();
        assert_eq!(empty.key, "apps[0].previous_encrypt_key");

        let no_end = format!("{ROTATING}previous_encrypt_key = \"old-key\"\n");
        let err = Config::parse(&no_end, &env_of(&[])).unwrap_err();
        assert_eq!(err.key, "apps[0].previous_keys_until");
        let bad_time = format!(
            "{ROTATING}previous_encrypt_key = \"old-key\"\nprevious_keys_until = \"24h\"\n"
        );
        let err = Config::parse(&bad_time, &env_of(&[])).unwrap_err();
        assert!(err.key.starts_with("apps[0].previous_keys_until"), "{err}");
        let no_current = "[[apps]]\napp_id = \"cli_a\"\napp_secret = \"s\"\n\
            verification_token = \"t\"\nprevious_encrypt_key = \"old\"\n\
            previous_keys_until = \"2026-12-01T00:00:00Z\"\n";
        let err = Config::parse(no_current, &env_of(&[])).unwrap_err();
        assert_eq!(err.key, "apps[0].previous_encrypt_key");
    }

    #[test]
    fn a_reload_names_what_needs_a_restart_and_only_that() {
        let base = format!("{ROTATING}[[clients]]\nname = \"a\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"tokens\"]\n", "00".repeat(32));
        let old = Config::parse(&base, &env_of(&[])).unwrap();
        // Clients, keys and tokens: applied by a reload, never listed.
        let applied = base
            .replace("new-key", "newer-key")
            .replace("new-tok", "newer-tok")
            .replace(&"00".repeat(32), &"11".repeat(32));
        let new = Config::parse(&applied, &env_of(&[])).unwrap();
        assert!(old.needs_restart(&new).is_empty());
        let restart = format!(
            "listen = \"127.0.0.1:9\"\n[tokens]\nrefresh_jitter = \"1s\"\n{}",
            base.replace("app_secret = \"s\"", "app_secret = \"s2\"")
        );
        let new = Config::parse(&restart, &env_of(&[])).unwrap();
        assert_eq!(
            old.needs_restart(&new),
            ["listen", "tokens", "apps[0].app_secret"]
        );
    }
}

//! The token broker: `app_access_token` and `tenant_access_token` out, for every kind of app —
//! an app-store app's from its tickets (one tenant token per customer tenant), a self-built
//! ("custom") app's from its app_id + app_secret (one tenant token, its own tenant).
//!
//! **How a token is issued is the one thing that differs between the kinds**, and it lives in
//! one place, [`issuer`]: the store-app issuer keeps the ticket, the resend and the `10012`
//! logic; the custom-app issuer calls the `/internal` endpoints. Everything below — the cache,
//! single-flight, background refresh, compare-and-invalidate, the error back-off, the fleet —
//! applies to every token of every app alike, and never asks which kind an app is. OAuth login
//! ([`login`]) exchanges codes through the same credentials; user tokens never enter the cache.
//!
//! What it guarantees (DESIGN.md, "Tokens"):
//! * **Cache** until `expire` minus `tokens.refresh_margin`; expiry is a pure function of
//!   `(expires_at, margin, now)` ([`is_usable`], [`serve_until_ms`], [`is_due`]) and `now` comes
//!   from the injected clock, so tests move time by hand. A token Feishu issued already inside
//!   the margin (a small `expire`) is still served until it expires or for one
//!   `tokens.refresh_check_interval`, whichever is first: otherwise every caller would fetch it
//!   again. `expire` is clamped to Feishu's range in [`upstream`].
//! * **Single-flight per key, detached**: the first caller of a cold key starts a *flight*, a
//!   spawned task that fetches, caches and publishes its result on a `watch` channel; every
//!   caller (the first one included) awaits that result. A caller that goes away (its client
//!   disconnected) abandons only its own wait: the flight completes and caches the token for
//!   the others. (smithy-rs `expiring_cache.rs` runs the load inside the caller's future; a
//!   shared token service cannot.) Callers that join a failing flight get its error, once.
//! * **One deadline per fetch**: everything a flight asks Feishu — every attempt, retry and
//!   back-off, the app token a tenant token needs (its own flight, started at the same moment),
//!   the second call after a `10012` — ends `tokens.request_deadline` after the flight started
//!   ([`upstream`] enforces it per call): the callers then get `504 upstream_timeout` whatever
//!   retries remain, not after `(retries + 1) × timeout`. A wait for a ticket push is bounded by
//!   `tickets.resend_wait` instead, and a fleet's wait for another replica's fetch by the
//!   deadline too.
//! * **Failures are counted per app** ([`TokenFetches`]): each fetch that asked Feishu and failed
//!   (with the cause its callers were told), and the last success; the status API shows them and
//!   `lark-ticketd status` exits 1 while an app's last fetch failed. One small record per
//!   configured app.
//! * **Answered errors back off**: a Feishu error answer (a `code`, e.g. `99991400` rate limit,
//!   `10015` wrong secret) is remembered per key for `tokens.error_backoff` and given to the
//!   callers of that key meanwhile, instead of every new wave of callers asking again. A newly
//!   stored ticket clears the app's remembered failure (the failure keeps the app's ticket
//!   generation, [`Tickets::generation`], and counts only while it is unchanged).
//! * **Background refresh** once fewer than `tokens.refresh_ahead` (≤ 30 min: Feishu issues a new
//!   token only then) remain, plus a random `tokens.refresh_jitter`, so tokens fetched together
//!   do not fall due together. Refreshes start from the hit that notices and from a periodic
//!   sweep; at most `tokens.refresh_concurrency` run at once (a semaphore); each key is retried
//!   at most once per `tokens.refresh_check_interval` — also when Feishu answers with the same
//!   token (it does while ≥ 30 min remain), which must not reset the throttle.
//! * **The sweep touches only what is due**: a due-time index (`BTreeSet<(at_ms, key)>`) holds
//!   exactly one entry per cached token — its refresh time, its retry time, or (for tenant tokens
//!   nobody used within `tokens.recent_use`) its expiry, when it is evicted.
//! * **Bounded memory and disk**: expired tokens leave the cache; at most
//!   `tokens.max_tenant_tokens` tenant tokens stay cached (the least recently used beyond it are
//!   dropped and fetched again on demand); the sweep deletes expired tokens from the store every
//!   [`STORE_PRUNE_INTERVAL`].
//! * **A failed refresh never throws away a token that is still valid**: a token inside its
//!   margin but not yet expired is still served when the upstream fails.
//! * **Compare-and-invalidate**: a caller reports the token Feishu rejected; it is dropped only if
//!   it is still the cached one (after any fetch in flight has landed), then a new one is fetched.
//! * Feishu's verdicts (store apps, in [`issuer`]): `99991663` / `99991664` on the tenant call drop exactly that app token
//!   and fetch once more; `10012` means the ticket is invalid: it is demoted
//!   ([`Tickets::demote`]: the next different ticket replaces it whatever its event time), a
//!   resend is requested, and the fetch retries once with the pushed ticket. A stored ticket
//!   marked refused counts as missing.
//! * **A store app's tickets come from [`crate::tickets`]**, the bookkeeping shared with intake:
//!   the store-app issuer asks it for the current ticket ([`Tickets::current`]) and hands it the
//!   resend call to make
//!   ([`Broker::request_resend`]); the rules — at most one resend request per app per
//!   `tickets.resend_interval`, waiting up to `tickets.resend_wait` only while a resend awaits its
//!   push, `503 ticket_missing` at once otherwise — live there. The broker never hears from
//!   intake, and intake never calls the broker.
//! * Tokens persist in the store, so a restart serves them without upstream calls. The write is
//!   off the request path: one background writer applies token writes in order; a failure is
//!   logged, never returned to a caller.
//! * [`Broker::close`] stops the sweep and every background refresh, waits for the flights that
//!   callers are waiting on (each is bounded by `tokens.request_deadline` and `tickets.resend_wait`),
//!   and drains the token writer.
//!
//! # Several replicas on one store (a fleet)
//!
//! Only when the store is shared ([`Store::is_shared`], or a caller that builds several
//! replicas over one store in one process) does any of this run; a single process takes exactly
//! the paths described above.
//! * **Single-flight across replicas**: a flight first adopts a usable token another replica
//!   stored (newer than the one cached here); then gets what the call needs (the ticket, or the
//!   app token for a tenant token) and takes the lease `fetch:{store key}` with a random owner
//!   for [`Broker::fetch_lease_ttl`] (one upstream call's worst case plus slack). The winner
//!   looks at the store once more (the last holder may have just stored and let go), calls
//!   Feishu, stores the token *before* it releases the lease (compare-and-delete), and caches
//!   it. A loser never calls Feishu while the lease is held: it waits for the store's
//!   [`Change::TokenStored`] notice of that key — or `tokens.fleet_poll_interval`, in case the
//!   notice was missed — and serves the stored token. A replica that dies mid-fetch leaves a
//!   lease that expires; the next loser to look takes it and fetches. Within a replica the
//!   in-process flight still comes first: one lease attempt per key per replica. A background
//!   refresh is such a flight too, so one replica refreshes a token for the fleet and the others
//!   reload it from the notice. When the store cannot be reached, a replica fetches on its own
//!   (serving tokens matters more than saving a call).
//! * **The near-cache stays the hot path**: a hit never touches the store. Token writes and
//!   compare-and-invalidate deletes go to the store at once (not through the writer), and the
//!   follower ([`Broker::start`]) keeps the cache coherent from the store's notices: a token
//!   another replica stored that expires later than the cached one replaces it (the echo of
//!   this replica's own write expires no later, so it changes nothing); a token invalidated
//!   anywhere is dropped here unless the store still holds it or holds something older (then
//!   the cached one is newer); [`Change::Resynced`] or a lagging subscription (notices missed)
//!   drops every cached token, reloaded from the store on the next request. When the store
//!   came back *empty*, the cached tokens are kept (Feishu still honours them; the store has
//!   nothing better) and every app's ticket is asked for again, once for the fleet.
//!
//! Locks: the cache and the flight table are `DashMap`s (sharded; a cache hit takes one shard's
//! read lock and touches two atomics); the due index is a std mutex taken by installs, evictions
//! and the sweep, never by a hit, and never held across an `.await`; it may take a shard lock
//! while held (index → shard), never the other way round.

mod issuer;
pub mod login;
pub mod upstream;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::clock::SharedClock;
use crate::config::{AppKind, Config, TokenConfig};
use crate::error::{Error, ErrorKind};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::{Change, Store, TokenRecord};
use crate::tickets::{Resend, Tickets};
use issuer::{Issuer, Prepared};
use upstream::{codes, Upstream};

/// How often the sweep deletes expired tokens from the store (by the injected clock).
pub const STORE_PRUNE_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Token writes waiting for the store; beyond it a write is dropped (logged): the token stays
/// cached and is fetched again after a restart.
const PERSIST_QUEUE: usize = 4096;
/// An entry that is not in the due index (a flight is refreshing it).
const NOT_INDEXED: u64 = u64::MAX;
/// Added to one upstream call's worst case to make a fetch lease's time to live: the store
/// write and release after the call, and a loaded machine.
const FETCH_LEASE_SLACK: Duration = Duration::from_secs(1);

/// Which token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenKey {
    /// An app's `app_access_token` (both kinds).
    App(String),
    /// A store app's `tenant_access_token` for one customer tenant.
    Tenant(String, String),
    /// A custom app's `tenant_access_token`: its own tenant, so no tenant_key.
    OwnTenant(String),
}

impl TokenKey {
    pub fn app_id(&self) -> &str {
        match self {
            TokenKey::App(a) | TokenKey::Tenant(a, _) | TokenKey::OwnTenant(a) => a,
        }
    }

    /// `app` or `tenant`: for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TokenKey::App(_) => "app",
            TokenKey::Tenant(..) | TokenKey::OwnTenant(_) => "tenant",
        }
    }

    /// The key the store keeps the token under: `app/{app_id}`, `tenant/{app_id}/{tenant_key}`,
    /// or `tenant/{app_id}` for a custom app's own tenant.
    pub fn store_key(&self) -> String {
        match self {
            TokenKey::App(a) => format!("app/{a}"),
            TokenKey::Tenant(a, t) => format!("tenant/{a}/{t}"),
            TokenKey::OwnTenant(a) => format!("tenant/{a}"),
        }
    }

    /// The key a store key names (the inverse of [`TokenKey::store_key`]).
    pub fn from_store_key(key: &str) -> Option<TokenKey> {
        let mut parts = key.splitn(3, '/');
        match (parts.next()?, parts.next()?, parts.next()) {
            ("app", app_id, None) => Some(TokenKey::App(app_id.to_string())),
            ("tenant", app_id, None) => Some(TokenKey::OwnTenant(app_id.to_string())),
            ("tenant", app_id, Some(tenant_key)) => {
                Some(TokenKey::Tenant(app_id.to_string(), tenant_key.to_string()))
            }
            _ => None,
        }
    }

    /// One of a store app's per-customer tenant tokens: there may be very many, so they are
    /// bounded by `tokens.max_tenant_tokens` and refreshed only while recently used. An app
    /// token and a custom app's own tenant token are one per app: always kept and refreshed.
    fn is_per_tenant(&self) -> bool {
        matches!(self, TokenKey::Tenant(..))
    }
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.store_key())
    }
}

/// A token and when it expires.
#[derive(Debug, Clone)]
pub struct Token {
    pub value: Secret,
    pub expires_at_ms: u64,
}

impl Token {
    /// Seconds left at `now_ms` (Feishu's `expire`).
    pub fn expire_s(&self, now_ms: u64) -> u64 {
        self.expires_at_ms.saturating_sub(now_ms) / 1000
    }
}

/// May a token expiring at `expires_at_ms` be served at `now_ms`?
pub fn is_usable(expires_at_ms: u64, now_ms: u64, margin: Duration) -> bool {
    now_ms.saturating_add(margin.as_millis() as u64) < expires_at_ms
}

/// Until when a token fetched at `fetched_at_ms` is served: `expire` minus the margin, but a
/// token Feishu issued already inside the margin is served for `min_serve` (or until it
/// expires, if sooner), so its callers do not each fetch it again.
pub fn serve_until_ms(
    expires_at_ms: u64,
    fetched_at_ms: u64,
    margin: Duration,
    min_serve: Duration,
) -> u64 {
    let by_margin = expires_at_ms.saturating_sub(margin.as_millis() as u64);
    let by_min = fetched_at_ms
        .saturating_add(min_serve.as_millis() as u64)
        .min(expires_at_ms);
    by_margin.max(by_min)
}

/// Is a token expiring at `expires_at_ms` due for refresh at `now_ms`?
pub fn is_due(expires_at_ms: u64, now_ms: u64, ahead: Duration) -> bool {
    expires_at_ms <= now_ms.saturating_add(ahead.as_millis() as u64)
}

/// Is the token still valid at Feishu (not yet expired), margin or not?
pub fn is_valid(expires_at_ms: u64, now_ms: u64) -> bool {
    now_ms < expires_at_ms
}

/// How a token request was served (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// From the cache.
    Hit,
    /// After waiting for a fetch another caller (or the background refresh) started.
    Waited,
    /// This caller started the fetch.
    Refreshed,
    /// Feishu failed; a token inside its margin but still valid was served.
    Stale,
}

impl Served {
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Waited => "waited",
            Served::Refreshed => "refreshed",
            Served::Stale => "stale",
        }
    }
}

/// How an app's token fetches from the Open Platform have gone since this process started: the
/// status API's `tokens` block, and what makes `lark-ticketd status` exit 1 (the app's last
/// fetch failed and none succeeded since). Counted per fetch that asked Feishu — every token of
/// the app, app and tenant, background refreshes included — not per caller: callers that share
/// a fetch, or get a remembered refusal during `tokens.error_backoff`, add nothing. Never a
/// token or a secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TokenFetches {
    /// Fetches that failed since the last one that succeeded (0: the last one succeeded, or
    /// none failed).
    pub consecutive_failures: u64,
    /// Unix seconds.
    pub last_success_at: Option<u64>,
    pub last_failure: Option<FetchFailure>,
}

/// The last failed token fetch of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FetchFailure {
    /// Unix seconds.
    pub at: u64,
    /// `app` or `tenant`: which kind of token.
    pub token: String,
    /// The error code the callers got: `upstream_error` or `upstream_timeout`.
    pub error: String,
    /// Feishu's code, when it answered with one.
    pub upstream_code: Option<i64>,
    /// What went wrong, naming the cause (Feishu's message, connection refused, DNS, TLS, a
    /// timeout, an HTTP status …), as the callers were told.
    pub message: String,
}

/// Things the broker did in the background, for tests and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    Refreshed(TokenKey),
    RefreshFailed(TokenKey),
}

/// A cached token. Immutable but for the atomics; a refresh installs a new entry.
struct Entry {
    token: Arc<Token>,
    /// Served while `now < serve_until_ms` ([`serve_until_ms`]).
    serve_until_ms: u64,
    /// When the background refresh is due (`expire − refresh_ahead + jitter`).
    due_ms: u64,
    /// The last hit: for `recent_use` and the LRU bound.
    last_used_ms: AtomicU64,
    /// No refresh attempt before this (one per check interval, whatever Feishu answers).
    next_attempt_ms: AtomicU64,
    /// Where the due index holds this entry, or [`NOT_INDEXED`]. Changed only under the index
    /// lock.
    indexed_at_ms: AtomicU64,
}

impl Entry {
    /// Take the refresh slot if it is free at `now`.
    fn claim_attempt(&self, now: u64, interval_ms: u64) -> bool {
        let next = self.next_attempt_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_attempt_ms
                .compare_exchange(
                    next,
                    now.saturating_add(interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// An answered error, given to the callers of its key until `until_ms`.
struct Failure {
    until_ms: u64,
    error: Error,
    /// For an app token: the app's ticket generation when Feishu answered. A ticket stored
    /// since then clears the failure.
    ticket_generation: Option<u64>,
}

/// A flight's result: `None` while it runs.
type Outcome = Option<Result<Arc<Token>, Error>>;

/// Whether [`Broker::install`] replaces a cached token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// A token just issued by Feishu to this replica.
    Always,
    /// A persisted token, after a restart: never replaces a cached one.
    IfAbsent,
    /// A token another replica stored: only over one that expires earlier.
    IfNewer,
}

/// A token write for the background writer.
enum Persist {
    Put(String, TokenRecord),
    Delete(String, Secret),
}

/// Counts running flights; close() waits for zero.
struct Running(Arc<watch::Sender<usize>>);

impl Running {
    fn enter(counter: &Arc<watch::Sender<usize>>) -> Running {
        counter.send_modify(|n| *n += 1);
        Running(Arc::clone(counter))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

struct Inner {
    /// Per app: how its tokens are issued (the one place the kinds differ).
    issuers: HashMap<String, Issuer>,
    tokens_cfg: TokenConfig,
    store: Store,
    clock: SharedClock,
    upstream: Upstream,
    cache: DashMap<TokenKey, Arc<Entry>>,
    /// Cached tenant tokens (for the `max_tenant_tokens` bound).
    tenant_tokens: AtomicUsize,
    /// Exactly one `(at_ms, key)` per indexed cache entry: when the sweep should look at it.
    index: Mutex<BTreeSet<(u64, TokenKey)>>,
    /// Fetches in flight, each a spawned task publishing its result.
    flights: DashMap<TokenKey, watch::Receiver<Outcome>>,
    /// The last answered error per key, until it may be asked again.
    failures: DashMap<TokenKey, Failure>,
    /// Per configured app (a fixed set: bounded): how its fetches from Feishu have gone.
    fetches: HashMap<String, Mutex<TokenFetches>>,
    /// Bounds background refreshes.
    refresh_permits: Arc<Semaphore>,
    /// Tokens dropped by compare-and-invalidate, until a new one is fetched: never reloaded from
    /// the store (its delete may not have landed).
    rejected: Mutex<HashMap<TokenKey, Secret>>,
    /// The app tickets: the current one, resend requests, the wake-ups of waiting callers.
    tickets: Tickets,
    /// Other replicas share the store (see "Several replicas" in the module docs).
    fleet: bool,
    /// The tasks that follow the store's change notices (fleet only): this broker's and the
    /// tickets'.
    followers: Mutex<Vec<AbortHandle>>,
    events: broadcast::Sender<BrokerEvent>,
    persist_tx: mpsc::Sender<Persist>,
    persist_rx: Mutex<Option<mpsc::Receiver<Persist>>>,
    /// Set by close(): no new flights; background flights stop.
    closing: watch::Sender<bool>,
    /// Set by close() once no flight runs: the writer drains its queue and stops.
    writer_stop: watch::Sender<bool>,
    running: Arc<watch::Sender<usize>>,
    sweep: Mutex<Option<AbortHandle>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    last_prune_ms: AtomicU64,
}

/// The broker handle. Cheap to clone.
#[derive(Clone)]
pub struct Broker(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations that cannot leave a map half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn shutting_down() -> Error {
    Error::new(
        ErrorKind::UpstreamError,
        "the service is shutting down; retry on another replica or shortly",
    )
}

impl Broker {
    /// Build the broker; fails if the HTTP client for the Open Platform cannot be built. It is
    /// one of a fleet when `tickets` is ([`Tickets::in_fleet`]): one decision for both.
    pub fn new(
        config: &Config,
        store: Store,
        tickets: Tickets,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Result<Broker, Error> {
        let issuers = config
            .apps
            .iter()
            .map(|a| (a.app_id.clone(), Issuer::new(a)))
            .collect();
        let upstream = Upstream::new(
            upstream::Bounds {
                timeout: config.tokens.upstream_timeout,
                retries: config.tokens.upstream_retries,
                request_deadline: config.tokens.request_deadline,
            },
            metrics,
        )
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                "cannot build the HTTP client for the Open Platform",
            )
            .with_cause(e)
        })?;
        let (persist_tx, persist_rx) = mpsc::channel(PERSIST_QUEUE);
        let fleet = tickets.in_fleet();
        let fetches = config
            .apps
            .iter()
            .map(|a| (a.app_id.clone(), Mutex::new(TokenFetches::default())))
            .collect();
        Ok(Broker(Arc::new(Inner {
            issuers,
            tokens_cfg: config.tokens.clone(),
            store,
            clock,
            upstream,
            cache: DashMap::new(),
            tenant_tokens: AtomicUsize::new(0),
            index: Mutex::new(BTreeSet::new()),
            flights: DashMap::new(),
            failures: DashMap::new(),
            fetches,
            refresh_permits: Arc::new(Semaphore::new(config.tokens.refresh_concurrency)),
            rejected: Mutex::new(HashMap::new()),
            tickets,
            fleet,
            followers: Mutex::new(Vec::new()),
            events: broadcast::channel(1024).0,
            persist_tx,
            persist_rx: Mutex::new(Some(persist_rx)),
            closing: watch::channel(false).0,
            writer_stop: watch::channel(false).0,
            running: Arc::new(watch::channel(0).0),
            sweep: Mutex::new(None),
            writer: Mutex::new(None),
            last_prune_ms: AtomicU64::new(0),
        })))
    }

    fn now(&self) -> u64 {
        self.0.clock.now_ms()
    }

    fn interval_ms(&self) -> u64 {
        self.0.tokens_cfg.refresh_check_interval.as_millis() as u64
    }

    /// Background events (refreshes), for tests and metrics.
    pub fn subscribe(&self) -> broadcast::Receiver<BrokerEvent> {
        self.0.events.subscribe()
    }

    /// Serve `key`: from the cache, or from the single flight that fetches it.
    pub async fn get(&self, key: &TokenKey) -> Result<(Arc<Token>, Served), Error> {
        if let Some(token) = self.hit(key) {
            return Ok((token, Served::Hit));
        }
        // Only a key the app's kind has can be cached, so the hit path never needs this.
        self.issuer(key.app_id())?.check(key)?;
        if let Some(e) = self.recent_failure(key) {
            return self.stale_or(key, e);
        }
        let (flight, started) = self.flight(key, None)?;
        match await_flight(flight).await {
            Ok(token) => Ok((
                token,
                if started {
                    Served::Refreshed
                } else {
                    Served::Waited
                },
            )),
            Err(e) => self.stale_or(key, e),
        }
    }

    /// The still-valid cached token if there is one, else `error`.
    fn stale_or(&self, key: &TokenKey, error: Error) -> Result<(Arc<Token>, Served), Error> {
        match self.still_valid(key) {
            Some(token) => {
                tracing::warn!(key = %key, error = %error, "refresh failed; serving the still-valid token");
                Ok((token, Served::Stale))
            }
            None => Err(error),
        }
    }

    /// An answered error for `key` that is still inside its back-off.
    fn recent_failure(&self, key: &TokenKey) -> Option<Error> {
        let now = self.now();
        let failure = self.0.failures.get(key)?;
        (now < failure.until_ms && failure.ticket_generation == self.ticket_generation(key))
            .then(|| failure.error.public_copy())
    }

    /// For an app token, the app's ticket generation (store apps; see
    /// [`Issuer::ticket_generation`]): a failure remembered under an older one is forgotten (a
    /// newly stored ticket may be the cure).
    fn ticket_generation(&self, key: &TokenKey) -> Option<u64> {
        match key {
            TokenKey::App(app_id) => self
                .0
                .issuers
                .get(app_id)
                .and_then(|i| i.ticket_generation(self)),
            TokenKey::Tenant(..) | TokenKey::OwnTenant(_) => None,
        }
    }

    /// Drop `rejected` if it is still the cached token for `key`, then fetch a new one. Returns
    /// the current token and whether `rejected` was dropped.
    pub async fn invalidate(
        &self,
        key: &TokenKey,
        rejected: &str,
    ) -> Result<(Arc<Token>, bool), Error> {
        self.issuer(key.app_id())?.check(key)?;
        // A fetch in flight may already bring a newer token: compare with what it lands.
        let in_flight = self.0.flights.get(key).map(|f| f.clone());
        if let Some(flight) = in_flight {
            let _ = await_flight(flight).await;
        }
        self.load_persisted(key).await;
        let dropped = {
            let mut index = lock(&self.0.index);
            let current = self
                .0
                .cache
                .get(key)
                .filter(|e| e.token.value.ct_eq(rejected))
                .map(|e| Arc::clone(&e));
            current.is_some_and(|entry| self.remove_entry(&mut index, key, &entry))
        };
        if !dropped {
            let (token, _) = self.get(key).await?;
            return Ok((token, false));
        }
        lock(&self.0.rejected).insert(key.clone(), Secret::new(rejected));
        if self.0.fleet {
            // At once, so the other replicas hear of it now and no replica adopts it again.
            if let Err(e) = self
                .0
                .store
                .delete_token(&key.store_key(), &Secret::new(rejected))
                .await
            {
                tracing::warn!(key = %key, error = %e, "cannot delete the invalidated token from the store; other replicas keep it until they hear of a newer one");
            }
        } else {
            self.persist(Persist::Delete(key.store_key(), Secret::new(rejected)));
        }
        tracing::info!(key = %key, token = %crate::secret::fingerprint(rejected.as_bytes()), "token invalidated; fetching a new one");
        let (token, _) = self.get(key).await?;
        Ok((token, true))
    }

    /// A servable cached token; starts a background refresh when it is due. The hot path: one
    /// shard read lock, two atomics, one `Arc` clone.
    fn hit(&self, key: &TokenKey) -> Option<Arc<Token>> {
        let now = self.now();
        let entry = self.0.cache.get(key)?;
        if now >= entry.serve_until_ms {
            return None;
        }
        entry.last_used_ms.store(now, Ordering::Relaxed);
        let token = Arc::clone(&entry.token);
        let due = now >= entry.due_ms && entry.claim_attempt(now, self.interval_ms());
        drop(entry);
        if due {
            self.refresh_in_background(key);
        }
        Some(token)
    }

    /// A cached token that is past its margin but not yet expired.
    fn still_valid(&self, key: &TokenKey) -> Option<Arc<Token>> {
        let now = self.now();
        self.0
            .cache
            .get(key)
            .filter(|e| is_valid(e.token.expires_at_ms, now))
            .map(|e| Arc::clone(&e.token))
    }

    /// Bring a persisted token into the cache (after a restart) if none is cached.
    async fn load_persisted(&self, key: &TokenKey) -> Option<Arc<Token>> {
        if self.0.cache.contains_key(key) {
            return None;
        }
        match self.0.store.token(&key.store_key()).await {
            Ok(Some(record))
                if is_valid(record.expires_at_ms, self.now())
                    && lock(&self.0.rejected).get(key) != Some(&record.token) =>
            {
                let token = Token {
                    value: record.token,
                    expires_at_ms: record.expires_at_ms,
                };
                Some(self.install(key, token, false, Replace::IfAbsent))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cannot read a persisted token");
                None
            }
        }
    }

    /// Put a token in the cache and the due index. `fresh`: just issued by Feishu (may be
    /// served inside its margin for a check interval); `replace`: whether it replaces a cached
    /// one. Returns the token cached afterwards (the cached one when it stays).
    fn install(&self, key: &TokenKey, token: Token, fresh: bool, replace: Replace) -> Arc<Token> {
        let cfg = &self.0.tokens_cfg;
        let now = self.now();
        let interval = self.interval_ms();
        let expires = token.expires_at_ms;
        let serve_until = if fresh {
            serve_until_ms(expires, now, cfg.refresh_margin, cfg.refresh_check_interval)
        } else {
            serve_until_ms(expires, now, cfg.refresh_margin, Duration::ZERO)
        };
        let jitter_ms = cfg.refresh_jitter.as_millis() as u64;
        let jitter = if jitter_ms == 0 {
            0
        } else {
            rand::thread_rng().gen_range(0..=jitter_ms)
        };
        let due = expires
            .saturating_sub(cfg.refresh_ahead.as_millis() as u64)
            .saturating_add(jitter);
        // A token that is due the moment it arrives (Feishu answered with the same token at the
        // 30-minute boundary, or a short `expire`) waits one interval before the next attempt.
        let next_attempt = if due <= now {
            now.saturating_add(interval)
        } else {
            0
        };
        let token = Arc::new(token);
        let mut index = lock(&self.0.index);
        let last_used = match self.0.cache.get(key) {
            Some(old) if replace == Replace::IfAbsent => return Arc::clone(&old.token),
            Some(old)
                if replace == Replace::IfNewer
                    && old.token.expires_at_ms >= token.expires_at_ms =>
            {
                return Arc::clone(&old.token)
            }
            Some(old) => old.last_used_ms.load(Ordering::Relaxed),
            None => now,
        };
        let at = due.max(next_attempt);
        let entry = Arc::new(Entry {
            token: Arc::clone(&token),
            serve_until_ms: serve_until,
            due_ms: due,
            last_used_ms: AtomicU64::new(last_used),
            next_attempt_ms: AtomicU64::new(next_attempt),
            indexed_at_ms: AtomicU64::new(at),
        });
        let old = self.0.cache.insert(key.clone(), entry);
        match old {
            Some(old) => unindex(&mut index, key, &old),
            None if key.is_per_tenant() => {
                let n = self.0.tenant_tokens.fetch_add(1, Ordering::Relaxed) + 1;
                if n > cfg.max_tenant_tokens {
                    self.evict_least_recently_used(&mut index, key);
                }
            }
            None => {}
        }
        index.insert((at, key.clone()));
        drop(index);
        lock(&self.0.rejected).remove(key);
        token
    }

    /// Remove `entry` from the cache if it is still the one cached for `key`.
    fn remove_entry(
        &self,
        index: &mut BTreeSet<(u64, TokenKey)>,
        key: &TokenKey,
        entry: &Arc<Entry>,
    ) -> bool {
        let removed = self
            .0
            .cache
            .remove_if(key, |_, cached| Arc::ptr_eq(cached, entry))
            .is_some();
        if removed {
            unindex(index, key, entry);
            if key.is_per_tenant() {
                self.0.tenant_tokens.fetch_sub(1, Ordering::Relaxed);
            }
        }
        removed
    }

    /// Drop the least recently used tenant tokens down to 90 % of `max_tenant_tokens` (so the
    /// scan runs once per tenth of the bound, not once per insert). `keep` was just installed.
    fn evict_least_recently_used(&self, index: &mut BTreeSet<(u64, TokenKey)>, keep: &TokenKey) {
        let max = self.0.tokens_cfg.max_tenant_tokens;
        let target = max.saturating_sub(max / 10).max(1);
        let mut tenants: Vec<(u64, TokenKey, Arc<Entry>)> = self
            .0
            .cache
            .iter()
            .filter(|e| e.key().is_per_tenant() && e.key() != keep)
            .map(|e| {
                (
                    e.last_used_ms.load(Ordering::Relaxed),
                    e.key().clone(),
                    Arc::clone(e.value()),
                )
            })
            .collect();
        // `keep` counts too.
        let excess = (tenants.len() + 1).saturating_sub(target);
        if excess == 0 {
            return;
        }
        let excess = excess.min(tenants.len());
        if excess < tenants.len() {
            tenants.select_nth_unstable_by_key(excess - 1, |t| t.0);
        }
        let mut evicted = 0;
        for (_, key, entry) in &tenants[..excess] {
            if self.remove_entry(index, key, entry) {
                evicted += 1;
            }
        }
        tracing::info!(
            evicted,
            max_tenant_tokens = max,
            "tenant token cache full; dropped the least recently used"
        );
    }

    /// Start a background refresh of `key` if a permit is free and nothing is in flight.
    fn refresh_in_background(&self, key: &TokenKey) {
        if self.0.flights.contains_key(key) {
            return;
        }
        let Ok(permit) = Arc::clone(&self.0.refresh_permits).try_acquire_owned() else {
            // The sweep will come back to it.
            return;
        };
        let _ = self.flight(key, Some(permit));
    }

    /// Join the flight for `key`, or start one. `permit`: a background refresh. Returns the
    /// flight's result channel and whether this call started it.
    fn flight(
        &self,
        key: &TokenKey,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(watch::Receiver<Outcome>, bool), Error> {
        let tx = match self.0.flights.entry(key.clone()) {
            MapEntry::Occupied(flight) => return Ok((flight.get().clone(), false)),
            MapEntry::Vacant(slot) => {
                if *self.0.closing.borrow() {
                    return Err(shutting_down());
                }
                let (tx, rx) = watch::channel(None);
                slot.insert(rx);
                tx
            }
        };
        let rx = tx.subscribe();
        self.spawn_flight(key.clone(), tx, permit);
        Ok((rx, true))
    }

    fn spawn_flight(
        &self,
        key: TokenKey,
        tx: watch::Sender<Outcome>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let running = Running::enter(&self.0.running);
        let this = self.clone();
        let mut closing = self.0.closing.subscribe();
        tokio::spawn(async move {
            let background = permit.is_some();
            // One deadline for everything this fetch asks Feishu (module docs).
            let deadline = this.0.upstream.deadline();
            let result = if background {
                tokio::select! {
                    r = this.run_flight(&key, deadline) => r,
                    _ = closing.wait_for(|c| *c) => Err(shutting_down()),
                }
            } else {
                this.run_flight(&key, deadline).await
            };
            drop(permit);
            this.land(&key, &result, background);
            this.0.flights.remove(&key);
            let _ = tx.send(Some(result));
            drop(this);
            drop(running);
        });
    }

    /// Book-keeping after a flight: failures back off and the entry goes back in the index.
    fn land(&self, key: &TokenKey, result: &Result<Arc<Token>, Error>, background: bool) {
        let now = self.now();
        match result {
            Ok(_) => {
                self.0.failures.remove(key);
                if background {
                    tracing::debug!(key = %key, "token refreshed in the background");
                    let _ = self.0.events.send(BrokerEvent::Refreshed(key.clone()));
                }
            }
            Err(e) => {
                // The entry (if any) stays cached; the sweep looks at it again after an interval.
                {
                    let mut index = lock(&self.0.index);
                    if let Some(entry) = self.0.cache.get(key) {
                        if entry.indexed_at_ms.load(Ordering::Relaxed) == NOT_INDEXED {
                            let at = now.saturating_add(self.interval_ms());
                            entry.indexed_at_ms.store(at, Ordering::Relaxed);
                            index.insert((at, key.clone()));
                        }
                    }
                }
                if background {
                    tracing::warn!(key = %key, error = %e, "background refresh failed; keeping the current token");
                    let _ = self.0.events.send(BrokerEvent::RefreshFailed(key.clone()));
                } else {
                    tracing::warn!(key = %key, error = %e, cause = ?e.cause().map(|c| c.to_string()), "token fetch failed");
                }
            }
        }
    }

    /// What a flight does: a persisted token (after a restart), else a fetch from Feishu, whose
    /// calls end by `deadline`; in a fleet, [`Broker::run_fleet_flight`].
    async fn run_flight(&self, key: &TokenKey, deadline: Instant) -> Result<Arc<Token>, Error> {
        if self.0.fleet {
            return self.run_fleet_flight(key, deadline).await;
        }
        if let Some(token) = self.load_persisted(key).await {
            if is_usable(
                token.expires_at_ms,
                self.now(),
                self.0.tokens_cfg.refresh_margin,
            ) {
                return Ok(token);
            }
        }
        self.fetch(key, deadline).await
    }

    /// How long a replica may hold a token's fetch lease: one upstream call's worst case
    /// (every attempt timing out, the longest back-off between them, but no longer than
    /// `tokens.request_deadline`) plus [`FETCH_LEASE_SLACK`]. A fetch that takes longer (Feishu
    /// refused the app token and the call is made again) may let a second replica fetch too: a
    /// wasted call, never a wrong token (the store keeps the token that expires last).
    pub fn fetch_lease_ttl(&self) -> Duration {
        let cfg = &self.0.tokens_cfg;
        let backoff: Duration = (0..cfg.upstream_retries).map(upstream::max_backoff).sum();
        cfg.upstream_timeout
            .saturating_mul(cfg.upstream_retries.saturating_add(1))
            .saturating_add(backoff)
            .min(cfg.request_deadline)
            .saturating_add(FETCH_LEASE_SLACK)
    }

    /// A flight in a fleet (see "Several replicas" in the module docs): adopt what another
    /// replica stored, else fetch under the fleet's lease, else wait for the lease holder's
    /// token.
    async fn run_fleet_flight(
        &self,
        key: &TokenKey,
        request_deadline: Instant,
    ) -> Result<Arc<Token>, Error> {
        // Subscribe before the first look, so a token stored after it still wakes us.
        let mut changes = self.0.store.changes();
        let mut closing = self.0.closing.subscribe();
        let newer_than = self.cached_expiry(key).unwrap_or(0);
        if let Some(token) = self.adopt_stored(key, newer_than).await {
            return Ok(token);
        }
        let mut prepared = Some(self.prepare(key).await?);
        let store_key = key.store_key();
        let lease = format!("fetch:{store_key}");
        let ttl = self.fetch_lease_ttl();
        let poll = self.0.tokens_cfg.fleet_poll_interval;
        // The holder finishes or its lease expires within `ttl`; one more holder may come first.
        // And this request's own deadline holds here too.
        let deadline = (Instant::now() + ttl.saturating_mul(2) + poll).min(request_deadline);
        loop {
            if let Some(token) = self.adopt_stored(key, newer_than).await {
                return Ok(token);
            }
            let owner = lease_owner();
            match self.0.store.try_lease(&lease, &owner, ttl).await {
                Ok(true) => {
                    // The last holder may have stored its token and let go since we looked.
                    let result = match self.adopt_stored(key, newer_than).await {
                        Some(token) => Ok(token),
                        None => match prepared.take() {
                            Some(prepared) => {
                                self.call_and_store(key, prepared, request_deadline).await
                            }
                            None => Err(Error::from(ErrorKind::Internal)),
                        },
                    };
                    if let Err(e) = self.0.store.release_lease(&lease, &owner).await {
                        tracing::warn!(key = %key, error = %e, "cannot release the fetch lease; it expires on its own");
                    }
                    return result;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "cannot take the fetch lease; fetching without the other replicas");
                    return match prepared.take() {
                        Some(prepared) => {
                            self.call_and_store(key, prepared, request_deadline).await
                        }
                        None => Err(Error::from(ErrorKind::Internal)),
                    };
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    ErrorKind::UpstreamTimeout,
                    "another replica is fetching this token and has not stored it yet; retry shortly",
                ));
            }
            let wait = poll.min(deadline - now);
            tokio::select! {
                _ = tokio::time::timeout(wait, token_stored(&mut changes, &store_key)) => {}
                // Shutting down: nobody waits for this flight any more (the listeners are
                // closed), and the lease holder stores the token for the others.
                _ = closing.wait_for(|c| *c) => return Err(shutting_down()),
            }
        }
    }

    /// Cache the token the store holds for `key` if it expires later than `newer_than_ms`, is
    /// still usable, and is not one this replica saw rejected. Returns the token cached
    /// afterwards; `None` when the store has nothing better (or cannot be read).
    async fn adopt_stored(&self, key: &TokenKey, newer_than_ms: u64) -> Option<Arc<Token>> {
        match self.0.store.token(&key.store_key()).await {
            Ok(Some(record))
                if record.expires_at_ms > newer_than_ms
                    && is_usable(
                        record.expires_at_ms,
                        self.now(),
                        self.0.tokens_cfg.refresh_margin,
                    )
                    && lock(&self.0.rejected).get(key) != Some(&record.token) =>
            {
                let token = Token {
                    value: record.token,
                    expires_at_ms: record.expires_at_ms,
                };
                Some(self.install(key, token, false, Replace::IfNewer))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cannot read a token from the store");
                None
            }
        }
    }

    /// In a fleet: follow the store's change notices to keep the near-cache coherent (see the
    /// module docs). Holds the broker weakly: it ends when the broker goes.
    fn follow_fleet(&self) -> Option<AbortHandle> {
        if !self.0.fleet {
            return None;
        }
        let mut changes = self.0.store.changes();
        let broker = Arc::downgrade(&self.0);
        let task = tokio::spawn(async move {
            loop {
                let change = changes.recv().await;
                let Some(this) = broker.upgrade().map(Broker) else {
                    return;
                };
                match change {
                    Ok(change) => this.on_change(change).await,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(
                            missed,
                            "store change notices were missed; revalidating every cached token"
                        );
                        this.on_change(Change::Resynced { lost_data: false }).await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Some(task.abort_handle())
    }

    /// Act on one change notice (the follower's step).
    async fn on_change(&self, change: Change) {
        match change {
            Change::TokenStored { key, expires_at_ms } => {
                self.on_token_stored(&key, expires_at_ms).await
            }
            Change::TokenInvalidated { key } => self.on_token_invalidated(&key).await,
            Change::Resynced { lost_data: false } => {
                let dropped = self.drop_all();
                tracing::info!(
                    dropped,
                    "store notices may have been missed; cached tokens dropped, reloaded from the store on use"
                );
            }
            Change::Resynced { lost_data: true } => self.after_data_loss().await,
            // The ticket bookkeeping follows these.
            Change::TicketStored { .. } | Change::TicketDeleted { .. } => {}
        }
    }

    /// The cached entry of a configured key named by a store key.
    fn cached_entry(&self, store_key: &str) -> Option<(TokenKey, Arc<Entry>)> {
        let key = TokenKey::from_store_key(store_key)?;
        let entry = self.0.cache.get(&key).map(|e| Arc::clone(&e))?;
        Some((key, entry))
    }

    /// Remove `entry` if it is still the one cached for `key`.
    fn drop_entry(&self, key: &TokenKey, entry: &Arc<Entry>) -> bool {
        let mut index = lock(&self.0.index);
        self.remove_entry(&mut index, key, entry)
    }

    /// A replica stored a token under `store_key`: one that expires later than the cached one
    /// replaces it (reloaded from the store; dropped if it cannot be). The echo of this
    /// replica's own write expires no later than what it cached: nothing happens.
    async fn on_token_stored(&self, store_key: &str, expires_at_ms: u64) {
        let Some((key, entry)) = self.cached_entry(store_key) else {
            return;
        };
        let cached_expiry = entry.token.expires_at_ms;
        if cached_expiry >= expires_at_ms {
            return;
        }
        if self.adopt_stored(&key, cached_expiry).await.is_none() && self.drop_entry(&key, &entry) {
            tracing::debug!(key = %key, "a newer token was stored elsewhere; dropped the cached one");
        }
    }

    /// A replica invalidated the token under `store_key` (compare-and-delete): drop the cached
    /// one unless it is not the one invalidated — the store still holds it, or holds an older
    /// token (this one is newer). A newer stored token replaces it.
    async fn on_token_invalidated(&self, store_key: &str) {
        let Some((key, entry)) = self.cached_entry(store_key) else {
            return;
        };
        let keep = match self.0.store.token(store_key).await {
            Ok(Some(record)) if record.token == entry.token.value => true,
            Ok(Some(record)) if record.expires_at_ms > entry.token.expires_at_ms => self
                .adopt_stored(&key, entry.token.expires_at_ms)
                .await
                .is_some(),
            Ok(Some(_)) => true,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cannot read a token another replica invalidated; dropping the cached one");
                false
            }
        };
        if !keep && self.drop_entry(&key, &entry) {
            tracing::info!(key = %key, token = %entry.token.value.fingerprint(), "token invalidated by another replica; dropped");
        }
    }

    /// Drop every cached token (notices were missed): each is reloaded from the store, or
    /// fetched, on its next use. Returns how many were dropped.
    fn drop_all(&self) -> usize {
        let entries: Vec<(TokenKey, Arc<Entry>)> = self
            .0
            .cache
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        let mut index = lock(&self.0.index);
        entries
            .iter()
            .filter(|(key, entry)| self.remove_entry(&mut index, key, entry))
            .count()
    }

    /// The store came back without its data: the tickets must be asked for again (once for the
    /// fleet: the resend lease still counts). Cached tokens stay: Feishu honours them until they
    /// expire, and the store has nothing newer.
    async fn after_data_loss(&self) {
        tracing::warn!(
            "the store came back without its data (tickets and tokens lost); asking Feishu to resend every app's ticket"
        );
        for issuer in self.issuers_in_order() {
            issuer.after_data_loss(self).await;
        }
    }

    /// Look at every index entry that is due: refresh app tokens and recently used tenant
    /// tokens (at most `refresh_concurrency` at once), evict expired ones, park the rest at
    /// their expiry. Touches nothing that is not due.
    async fn sweep(&self) {
        let now = self.now();
        let cfg = &self.0.tokens_cfg;
        let recent = cfg.recent_use.as_millis() as u64;
        loop {
            let next = {
                let mut index = lock(&self.0.index);
                match index.first() {
                    Some((at, _)) if *at <= now => {}
                    _ => break,
                }
                let Some((_, key)) = index.pop_first() else {
                    break;
                };
                let entry = self.0.cache.get(&key).map(|e| Arc::clone(&e));
                match entry {
                    Some(entry) if !is_valid(entry.token.expires_at_ms, now) => {
                        entry.indexed_at_ms.store(NOT_INDEXED, Ordering::Relaxed);
                        self.remove_entry(&mut index, &key, &entry);
                        None
                    }
                    Some(entry) => {
                        entry.indexed_at_ms.store(NOT_INDEXED, Ordering::Relaxed);
                        let wanted = !key.is_per_tenant()
                            || now.saturating_sub(entry.last_used_ms.load(Ordering::Relaxed))
                                <= recent;
                        let next_attempt = entry.next_attempt_ms.load(Ordering::Relaxed);
                        let park_at = if !wanted {
                            Some(entry.token.expires_at_ms)
                        } else if now < next_attempt {
                            Some(next_attempt)
                        } else {
                            None
                        };
                        match park_at {
                            Some(at) => {
                                entry.indexed_at_ms.store(at, Ordering::Relaxed);
                                index.insert((at, key));
                                None
                            }
                            None => Some((key, entry)),
                        }
                    }
                    None => None,
                }
            };
            let Some((key, entry)) = next else {
                continue;
            };
            let Ok(permit) = Arc::clone(&self.0.refresh_permits).acquire_owned().await else {
                return;
            };
            if entry.claim_attempt(self.now(), self.interval_ms())
                && !self.0.flights.contains_key(&key)
            {
                let _ = self.flight(&key, Some(permit));
            } else {
                // Refreshing already (the hit path): the flight re-indexes it when it lands.
                self.reindex_if_unindexed(&key, &entry);
            }
        }
        let now = self.now();
        self.0.failures.retain(|_, f| f.until_ms > now);
        let last = self.0.last_prune_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= STORE_PRUNE_INTERVAL.as_millis() as u64 {
            self.0.last_prune_ms.store(now, Ordering::Relaxed);
            match self.0.store.delete_expired_tokens(now).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "expired tokens deleted from the store"),
                Err(e) => tracing::warn!(error = %e, "cannot delete expired tokens from the store"),
            }
        }
    }

    fn reindex_if_unindexed(&self, key: &TokenKey, entry: &Arc<Entry>) {
        let mut index = lock(&self.0.index);
        let still_cached = self
            .0
            .cache
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(&e, entry));
        if still_cached && entry.indexed_at_ms.load(Ordering::Relaxed) == NOT_INDEXED {
            let at = entry
                .next_attempt_ms
                .load(Ordering::Relaxed)
                .max(self.now().saturating_add(self.interval_ms()));
            entry.indexed_at_ms.store(at, Ordering::Relaxed);
            index.insert((at, key.clone()));
        }
    }

    /// Fetch `key` from Feishu (inside its flight, calls ending by `deadline`), cache it and
    /// queue its write.
    async fn fetch(&self, key: &TokenKey, deadline: Instant) -> Result<Arc<Token>, Error> {
        let prepared = self.prepare(key).await?;
        self.call_and_store(key, prepared, deadline).await
    }

    /// How `app_id`'s tokens are issued; `unknown_app` if it is not configured.
    fn issuer(&self, app_id: &str) -> Result<&Issuer, Error> {
        self.0.issuers.get(app_id).ok_or_else(|| {
            Error::new(
                ErrorKind::UnknownApp,
                "no app with this app_id is configured",
            )
        })
    }

    /// Every app's issuer, by app id (a stable order for start-up work).
    fn issuers_in_order(&self) -> Vec<&Issuer> {
        let mut issuers: Vec<(&String, &Issuer)> = self.0.issuers.iter().collect();
        issuers.sort_by(|a, b| a.0.cmp(b.0));
        issuers.into_iter().map(|(_, i)| i).collect()
    }

    /// Which kind of app `app_id` is, if it is configured.
    pub fn kind(&self, app_id: &str) -> Option<AppKind> {
        self.0.issuers.get(app_id).map(Issuer::kind)
    }

    /// What the upstream call for `key` needs (the issuer decides: a store app's ticket or app
    /// token; nothing for a custom app).
    async fn prepare(&self, key: &TokenKey) -> Result<Prepared, Error> {
        self.issuer(key.app_id())?.prepare(self, key).await
    }

    /// Call Feishu for `key`, then cache the token and write it to the store: queued for the
    /// writer in one process; in a fleet at once and before it is cached, so the other replicas
    /// find it in the store when they hear of it (and before the fetch lease is released).
    async fn call_and_store(
        &self,
        key: &TokenKey,
        prepared: Prepared,
        deadline: Instant,
    ) -> Result<Arc<Token>, Error> {
        let issued = self
            .issuer(key.app_id())?
            .issue(self, key, prepared, deadline)
            .await?;
        let now = self.now();
        self.fetched(key, now);
        let token = Token {
            value: issued.token,
            expires_at_ms: now.saturating_add(issued.expire_s.saturating_mul(1000)),
        };
        let record = TokenRecord {
            token: token.value.clone(),
            expires_at_ms: token.expires_at_ms,
            fetched_at_ms: now,
        };
        let token = if self.0.fleet {
            match self
                .0
                .store
                .put_token_if_later(&key.store_key(), record)
                .await
            {
                Ok(true) => self.install(key, token, true, Replace::Always),
                // The store kept a token that expires later: another replica fetched one after
                // ours (this replica was slow to write). Serve that one, not ours: ours may be
                // the one Feishu has revoked since.
                Ok(false) => match self.adopt_stored(key, 0).await {
                    Some(newer) => newer,
                    None => self.install(key, token, true, Replace::Always),
                },
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "cannot write a token to the store; it stays cached in this replica only");
                    self.install(key, token, true, Replace::Always)
                }
            }
        } else {
            let token = self.install(key, token, true, Replace::Always);
            self.persist(Persist::Put(key.store_key(), record));
            token
        };
        tracing::info!(
            key = %key,
            token = %token.value.fingerprint(),
            expire_s = issued.expire_s,
            "token fetched"
        );
        Ok(token)
    }

    /// Queue a token write for the background writer; never blocks a caller.
    fn persist(&self, op: Persist) {
        if self.0.persist_tx.try_send(op).is_err() {
            tracing::warn!("the token write queue is full; the token stays cached in memory only");
        }
    }

    /// A fetch of `key` from Feishu succeeded at `now_ms`: the app's failures in a row end.
    fn fetched(&self, key: &TokenKey, now_ms: u64) {
        if let Some(fetches) = self.0.fetches.get(key.app_id()) {
            let mut fetches = lock(fetches);
            fetches.consecutive_failures = 0;
            fetches.last_success_at = Some(now_ms / 1000);
        }
    }

    /// How the token fetches of `app_id` have gone ([`TokenFetches`]); empty for an app that is
    /// not configured.
    pub fn token_fetches(&self, app_id: &str) -> TokenFetches {
        self.0
            .fetches
            .get(app_id)
            .map(|f| lock(f).clone())
            .unwrap_or_default()
    }

    /// Convert an upstream failure and count it for the app ([`TokenFetches`]); Feishu's
    /// verdicts (an error answer, or a rate limit however it came) are remembered for
    /// `tokens.error_backoff`, so the next callers of `key` get the same answer without asking
    /// again. Outages (timeouts, 5xx) are not: the next caller tries.
    fn upstream_failed(&self, key: &TokenKey, e: upstream::UpstreamError) -> Error {
        let verdict = match &e {
            upstream::UpstreamError::Api { .. } => true,
            upstream::UpstreamError::Server { code, .. } => *code == codes::RATE_LIMITED,
            _ => false,
        };
        let error = Error::from(e);
        if let Some(fetches) = self.0.fetches.get(key.app_id()) {
            let mut fetches = lock(fetches);
            fetches.consecutive_failures = fetches.consecutive_failures.saturating_add(1);
            fetches.last_failure = Some(FetchFailure {
                at: self.now() / 1000,
                token: key.kind().to_string(),
                error: error.kind().code().to_string(),
                upstream_code: error.upstream().map(|(code, _)| code),
                message: error.message().to_string(),
            });
        }
        if verdict {
            let until = self
                .now()
                .saturating_add(self.0.tokens_cfg.error_backoff.as_millis() as u64);
            let failure = Failure {
                until_ms: until,
                error: error.public_copy(),
                ticket_generation: self.ticket_generation(key),
            };
            self.0.failures.insert(key.clone(), failure);
        }
        error
    }

    /// How many token requests are waiting for a ticket of `app_id` to be pushed (the channels
    /// live in [`Tickets`]; kept here for callers that hold the broker).
    pub fn ticket_waiters(&self, app_id: &str) -> usize {
        self.0.tickets.ticket_waiters(app_id)
    }

    /// A receiver that changes whenever intake stores a ticket for `app_id` (see
    /// [`Tickets::ticket_watch`]).
    pub fn ticket_watch(&self, app_id: &str) -> Option<watch::Receiver<u64>> {
        self.0.tickets.ticket_watch(app_id)
    }

    /// Ask Feishu to push the ticket again, at most once per app per `tickets.resend_interval`
    /// (across the fleet too; the bookkeeping is [`Tickets::request_resend`]'s; the call is the
    /// Open Platform client's). Returns whether a request was sent now or how long it is held
    /// back; never sent for a custom app (it has no ticket).
    pub async fn request_resend(&self, app_id: &str) -> Resend {
        let call = self
            .0
            .issuers
            .get(app_id)
            .and_then(|i| i.resend_call(&self.0.upstream));
        match call {
            Some(call) => self.0.tickets.request_resend(app_id, call).await,
            None => Resend::NotApplicable,
        }
    }

    /// An operator's resend request: as [`Broker::request_resend`], but what did not send a
    /// request is an error the operator should see: an app without a ticket (a custom app) is
    /// `400 bad_request`, a request held back by the interval `429 resend_rate_limited` with the
    /// time until the next may be sent.
    pub async fn resend_for_operator(&self, app_id: &str) -> Result<(), Error> {
        let custom_app = || {
            Error::new(
                ErrorKind::BadRequest,
                format!("{app_id} is a custom app: it has no App Ticket to resend"),
            )
        };
        if self.issuer(app_id)?.resend_call(&self.0.upstream).is_none() {
            return Err(custom_app());
        }
        match self.request_resend(app_id).await {
            Resend::Sent => Ok(()),
            Resend::Held {
                retry_after,
                other_replica,
            } => {
                let interval = self.0.tickets.resend_interval();
                let who = if other_replica {
                    "another replica asked Feishu to resend the App Ticket"
                } else {
                    "a resend of the App Ticket was requested"
                };
                Err(Error::new(
                    ErrorKind::ResendRateLimited,
                    format!(
                        "{who} less than tickets.resend_interval ({interval:?}) ago and Feishu is asked at most once per interval; retry in {} s",
                        crate::error::retry_after_seconds(retry_after)
                    ),
                )
                .with_retry_after(retry_after))
            }
            Resend::NotApplicable => Err(custom_app()),
        }
    }

    /// When the cached token for `key` expires, if one is cached (never the token itself).
    pub fn cached_expiry(&self, key: &TokenKey) -> Option<u64> {
        self.0.cache.get(key).map(|e| e.token.expires_at_ms)
    }

    /// How many tenant tokens are cached for an app.
    pub fn cached_tenant_tokens(&self, app_id: &str) -> usize {
        self.0
            .cache
            .iter()
            .filter(|e| matches!(e.key(), TokenKey::Tenant(a, _) if a == app_id))
            .count()
    }

    /// How many tenant tokens are cached, all apps together.
    pub fn cached_tenant_tokens_total(&self) -> usize {
        self.0.tenant_tokens.load(Ordering::Relaxed)
    }

    /// Start the background work: the token writer, the followers of the store's change notices
    /// (in a fleet: this cache's and the tickets'), a resend for every app without a ticket, then
    /// the periodic refresh sweep. Returns the sweep's task; [`Broker::close`] stops it and the
    /// followers.
    pub fn start(&self) -> JoinHandle<()> {
        {
            let mut followers = lock(&self.0.followers);
            if followers.is_empty() {
                followers.extend(self.follow_fleet());
                followers.extend(self.0.tickets.follow_fleet().map(|t| t.abort_handle()));
            }
        }
        if let Some(rx) = lock(&self.0.persist_rx).take() {
            let writer = tokio::spawn(write_tokens(
                self.0.store.clone(),
                rx,
                self.0.writer_stop.subscribe(),
            ));
            *lock(&self.0.writer) = Some(writer);
        }
        let this = self.clone();
        let sweep = tokio::spawn(async move {
            // A store app without a ticket asks for one; a custom app needs none.
            for issuer in this.issuers_in_order() {
                issuer.start(&this).await;
            }
            let mut tick = tokio::time::interval(this.0.tokens_cfg.refresh_check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.sweep().await;
            }
        });
        *lock(&self.0.sweep) = Some(sweep.abort_handle());
        sweep
    }

    /// Stop the background work: the sweep and every background refresh stop now; flights that
    /// callers wait on finish (each is bounded); new flights are refused; queued token writes
    /// are written. Call once the listeners are closed.
    pub async fn close(&self) {
        self.0.closing.send_replace(true);
        if let Some(sweep) = lock(&self.0.sweep).take() {
            sweep.abort();
        }
        for follower in lock(&self.0.followers).drain(..) {
            follower.abort();
        }
        let mut running = self.0.running.subscribe();
        let _ = running.wait_for(|n| *n == 0).await;
        self.0.writer_stop.send_replace(true);
        let writer = lock(&self.0.writer).take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

/// Take `entry`'s place in the due index out.
fn unindex(index: &mut BTreeSet<(u64, TokenKey)>, key: &TokenKey, entry: &Entry) {
    let at = entry.indexed_at_ms.swap(NOT_INDEXED, Ordering::Relaxed);
    if at != NOT_INDEXED {
        index.remove(&(at, key.clone()));
    }
}

/// Wait for a flight's result.
async fn await_flight(mut flight: watch::Receiver<Outcome>) -> Result<Arc<Token>, Error> {
    let outcome = match flight.wait_for(Option::is_some).await {
        Ok(outcome) => match &*outcome {
            Some(Ok(token)) => Ok(Arc::clone(token)),
            Some(Err(e)) => Err(e.public_copy()),
            None => Err(shutting_down()),
        },
        // The flight's task went away without an answer (the runtime is shutting down).
        Err(_) => Err(shutting_down()),
    };
    outcome
}

/// A random lease owner: only the replica that took a lease gives it back.
fn lease_owner() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Wait for the store's notice that a token was stored under `store_key`, or that notices
/// were missed (then the caller looks at the store anyway).
async fn token_stored(changes: &mut broadcast::Receiver<Change>, store_key: &str) {
    loop {
        match changes.recv().await {
            Ok(Change::TokenStored { key, .. }) if key == store_key => return,
            Ok(Change::Resynced { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => return,
            Ok(_) => {}
            // No more notices: only the poll is left.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// The token writer: applies writes in the order they were queued, until told to stop; then
/// writes what is queued and ends.
async fn write_tokens(
    store: Store,
    mut rx: mpsc::Receiver<Persist>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let op = tokio::select! {
            biased;
            op = rx.recv() => op,
            _ = stop.wait_for(|s| *s) => None,
        };
        match op {
            Some(op) => write_token(&store, op).await,
            None => break,
        }
    }
    while let Ok(op) = rx.try_recv() {
        write_token(&store, op).await;
    }
}

async fn write_token(store: &Store, op: Persist) {
    let (key, result) = match op {
        Persist::Put(key, record) => {
            let r = store.put_token(&key, record).await;
            (key, r)
        }
        Persist::Delete(key, token) => {
            let r = store.delete_token(&key, &token).await;
            (key, r)
        }
    };
    if let Err(e) = result {
        tracing::warn!(key = %key, error = %e, "cannot write a token to the store; it stays cached in memory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn expiry_rules_are_pure_functions_of_now() {
        let margin = Duration::from_secs(180);
        let ahead = Duration::from_secs(1800);
        let expires = 120 * MIN;
        assert!(is_usable(expires, 0, margin));
        assert!(is_usable(expires, 116 * MIN, margin));
        assert!(!is_usable(expires, 117 * MIN, margin));
        assert!(!is_due(expires, 89 * MIN, ahead));
        assert!(is_due(expires, 90 * MIN, ahead));
        assert!(is_valid(expires, 119 * MIN));
        assert!(!is_valid(expires, 120 * MIN));
    }

    #[test]
    fn a_token_issued_inside_its_margin_is_served_for_a_check_interval() {
        let margin = Duration::from_secs(180);
        let interval = Duration::from_secs(30);
        // The usual case: expire minus the margin.
        assert_eq!(serve_until_ms(120 * MIN, 0, margin, interval), 117 * MIN);
        // Issued with 2 minutes left: served 30 s, not 0.
        assert_eq!(serve_until_ms(2 * MIN, 0, margin, interval), 30_000);
        // Issued with 10 s left: until it expires.
        assert_eq!(serve_until_ms(10_000, 0, margin, interval), 10_000);
        // A persisted token is not "fresh": no minimum.
        assert_eq!(serve_until_ms(2 * MIN, 0, margin, Duration::ZERO), 0);
    }

    #[test]
    fn token_keys_name_themselves() {
        let k = TokenKey::Tenant("cli_a".into(), "t1".into());
        assert_eq!(k.store_key(), "tenant/cli_a/t1");
        assert_eq!(k.kind(), "tenant");
        assert_eq!(TokenKey::App("cli_a".into()).store_key(), "app/cli_a");
    }

    #[test]
    fn expire_counts_down() {
        let t = Token {
            value: Secret::new("x"),
            expires_at_ms: 10_500,
        };
        assert_eq!(t.expire_s(500), 10);
        assert_eq!(t.expire_s(20_000), 0);
    }

    #[test]
    fn store_keys_name_token_keys_back() {
        for key in [
            TokenKey::App("cli_a".into()),
            TokenKey::Tenant("cli_a".into(), "t1".into()),
            TokenKey::Tenant("cli_a".into(), "with/slash".into()),
            TokenKey::OwnTenant("cli_a".into()),
        ] {
            assert_eq!(TokenKey::from_store_key(&key.store_key()), Some(key));
        }
        assert_eq!(
            TokenKey::OwnTenant("cli_a".into()).store_key(),
            "tenant/cli_a"
        );
        for bad in ["", "app", "app/a/b", "tenant", "other/a"] {
            assert_eq!(TokenKey::from_store_key(bad), None, "{bad}");
        }
    }

    /// Brokers over one memory store, as replicas of a fleet. The app's Open Platform is a
    /// port that accepts connections and never answers.
    mod fleet {
        use super::*;
        use crate::clock::ManualClock;
        use crate::store::memory::MemoryStore;
        use crate::tickets::ResendOutcome;

        const APP: &str = "cli_fleet";
        const START_MS: u64 = 1_800_000_000_000;
        const HOUR: u64 = 3_600_000;

        struct Replicas {
            store: Store,
            brokers: Vec<Broker>,
            /// Holds the silent Open Platform's port open.
            _silent: std::net::TcpListener,
        }

        fn replicas(n: usize) -> Replicas {
            let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let text = format!(
                "[store]\nkind = \"memory\"\n[tokens]\nupstream_timeout = \"5s\"\nupstream_retries = 0\n\
                 [[apps]]\napp_id = \"{APP}\"\napp_secret = \"s\"\nverification_token = \"v\"\n\
                 base_url = \"http://{}\"\n",
                silent.local_addr().unwrap()
            );
            let config = Config::parse(&text, &|_| None).unwrap();
            let store = Store::Memory(MemoryStore::default());
            let clock = Arc::new(ManualClock::new(START_MS));
            let brokers = (0..n)
                .map(|_| {
                    let tickets =
                        Tickets::new(&config, store.clone(), clock.clone(), Metrics::new(), true);
                    Broker::new(
                        &config,
                        store.clone(),
                        tickets,
                        clock.clone(),
                        Metrics::new(),
                    )
                    .unwrap()
                })
                .collect();
            Replicas {
                store,
                brokers,
                _silent: silent,
            }
        }

        fn record(token: &str, expires_at_ms: u64) -> TokenRecord {
            TokenRecord {
                token: Secret::new(token),
                expires_at_ms,
                fetched_at_ms: START_MS,
            }
        }

        fn app_key() -> TokenKey {
            TokenKey::App(APP.into())
        }

        async fn served(broker: &Broker) -> String {
            let (token, _) = broker.get(&app_key()).await.unwrap();
            token.value.expose().to_string()
        }

        #[tokio::test]
        async fn a_replica_serves_what_another_stored_without_calling_feishu() {
            let r = replicas(1);
            let expires = START_MS + 2 * HOUR;
            r.store
                .put_token(&app_key().store_key(), record("a-one", expires))
                .await
                .unwrap();
            let (token, served_as) = r.brokers[0].get(&app_key()).await.unwrap();
            assert_eq!(token.value.expose(), "a-one");
            assert_eq!(served_as, Served::Refreshed);
            assert_eq!(r.brokers[0].cached_expiry(&app_key()), Some(expires));
        }

        #[tokio::test]
        async fn a_stored_token_replaces_only_an_older_cached_one() {
            let r = replicas(1);
            let broker = &r.brokers[0];
            let key = app_key().store_key();
            let expires = START_MS + 2 * HOUR;
            r.store
                .put_token(&key, record("a-one", expires))
                .await
                .unwrap();
            assert_eq!(served(broker).await, "a-one");

            // A slow replica's stale write (and the echo of our own write) changes nothing.
            for stale in [expires - 60_000, expires] {
                r.store
                    .put_token(&key, record("a-stale", stale))
                    .await
                    .unwrap();
                broker
                    .on_change(Change::TokenStored {
                        key: key.clone(),
                        expires_at_ms: stale,
                    })
                    .await;
                assert_eq!(served(broker).await, "a-one");
                assert_eq!(broker.cached_expiry(&app_key()), Some(expires));
            }
            // A newer one replaces it at once.
            r.store
                .put_token(&key, record("a-two", expires + 60_000))
                .await
                .unwrap();
            broker
                .on_change(Change::TokenStored {
                    key: key.clone(),
                    expires_at_ms: expires + 60_000,
                })
                .await;
            assert_eq!(broker.cached_expiry(&app_key()), Some(expires + 60_000));
            assert_eq!(served(broker).await, "a-two");
        }

        #[tokio::test]
        async fn an_invalidation_drops_the_cached_token_only_if_it_is_the_one_invalidated() {
            let r = replicas(1);
            let broker = &r.brokers[0];
            let key = app_key().store_key();
            let expires = START_MS + 2 * HOUR;
            r.store
                .put_token(&key, record("a-one", expires))
                .await
                .unwrap();
            assert_eq!(served(broker).await, "a-one");
            let invalidated = || Change::TokenInvalidated { key: key.clone() };

            // A compare-and-delete of another token left ours in the store: kept.
            r.store
                .delete_token(&key, &Secret::new("a-other"))
                .await
                .unwrap();
            broker.on_change(invalidated()).await;
            assert_eq!(broker.cached_expiry(&app_key()), Some(expires));

            // The store holds an older token than ours: ours is newer, kept.
            r.store
                .put_token(&key, record("a-older", expires - 60_000))
                .await
                .unwrap();
            broker.on_change(invalidated()).await;
            assert_eq!(broker.cached_expiry(&app_key()), Some(expires));

            // The store already holds the replacement: it is served.
            r.store
                .put_token(&key, record("a-two", expires + 60_000))
                .await
                .unwrap();
            broker.on_change(invalidated()).await;
            assert_eq!(broker.cached_expiry(&app_key()), Some(expires + 60_000));

            // Ours was deleted: dropped.
            r.store
                .delete_token(&key, &Secret::new("a-two"))
                .await
                .unwrap();
            broker.on_change(invalidated()).await;
            assert_eq!(broker.cached_expiry(&app_key()), None);
        }

        #[tokio::test]
        async fn missed_notices_drop_every_cached_token() {
            let r = replicas(1);
            let broker = &r.brokers[0];
            let key = app_key().store_key();
            r.store
                .put_token(&key, record("a-one", START_MS + 2 * HOUR))
                .await
                .unwrap();
            assert_eq!(served(broker).await, "a-one");
            broker
                .on_change(Change::Resynced { lost_data: false })
                .await;
            assert_eq!(broker.cached_expiry(&app_key()), None);
            // Reloaded from the store on the next request.
            assert_eq!(served(broker).await, "a-one");
        }

        #[tokio::test]
        async fn a_lagging_follower_drops_every_cached_token() {
            let r = replicas(1);
            let broker = &r.brokers[0];
            r.store
                .put_token(&app_key().store_key(), record("a-one", START_MS + 2 * HOUR))
                .await
                .unwrap();
            assert_eq!(served(broker).await, "a-one");
            broker.start();
            tokio::task::yield_now().await;
            // More notices than the channel keeps, before the follower runs again.
            for i in 0..crate::store::coordination::CHANGE_BACKLOG + 10 {
                let other = TokenKey::Tenant("cli_other".into(), format!("t{i}"));
                r.store
                    .put_token(&other.store_key(), record("t-x", START_MS + HOUR))
                    .await
                    .unwrap();
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while broker.cached_expiry(&app_key()).is_some() {
                assert!(tokio::time::Instant::now() < deadline, "not dropped");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            broker.close().await;
        }

        #[tokio::test]
        async fn a_store_that_lost_its_data_gets_the_tickets_asked_for_once_per_fleet() {
            let r = replicas(2);
            r.store
                .put_token(&app_key().store_key(), record("a-one", START_MS + 2 * HOUR))
                .await
                .unwrap();
            assert_eq!(served(&r.brokers[0]).await, "a-one");
            for broker in &r.brokers {
                broker.on_change(Change::Resynced { lost_data: true }).await;
            }
            // The first asks Feishu (the silent platform keeps it pending); the second finds
            // the fleet's lease taken.
            let outcome = |b: &Broker| b.0.tickets.resend_status(APP).map(|s| s.outcome);
            assert_eq!(outcome(&r.brokers[0]), Some(ResendOutcome::Pending));
            assert_eq!(outcome(&r.brokers[1]), Some(ResendOutcome::OtherReplica));
            // Feishu still honours the cached token, and the store has nothing better.
            assert_eq!(
                r.brokers[0].cached_expiry(&app_key()),
                Some(START_MS + 2 * HOUR)
            );
        }
    }

    #[test]
    fn the_refresh_slot_is_taken_once_per_interval() {
        let entry = Entry {
            token: Arc::new(Token {
                value: Secret::new("x"),
                expires_at_ms: 100 * MIN,
            }),
            serve_until_ms: 97 * MIN,
            due_ms: 70 * MIN,
            last_used_ms: AtomicU64::new(0),
            next_attempt_ms: AtomicU64::new(0),
            indexed_at_ms: AtomicU64::new(NOT_INDEXED),
        };
        assert!(entry.claim_attempt(70 * MIN, 30_000));
        assert!(!entry.claim_attempt(70 * MIN, 30_000));
        assert!(!entry.claim_attempt(70 * MIN + 29_999, 30_000));
        assert!(entry.claim_attempt(70 * MIN + 30_000, 30_000));
    }
}

//! The token broker: tickets in, `app_access_token` and per-tenant `tenant_access_token` out.
//!
//! What it guarantees (DESIGN.md, "Tokens"):
//! * **Cache** until `expire` minus `tokens.refresh_margin`; expiry is a pure function of
//!   `(expires_at, margin, now)` ([`is_usable`], [`is_due`]) and `now` comes from the injected
//!   clock, so tests move time by hand.
//! * **Single-flight per key**: a per-key tokio mutex, re-checked after it is taken, so N callers
//!   of a cold key cause one upstream call; the others are served what it fetched. Failures are
//!   not cached, but they are shared: callers that queued behind a fetch that failed get its
//!   error at once instead of each trying again (one upstream attempt per wave of callers).
//! * **Background refresh** once fewer than `tokens.refresh_ahead` (30 min) remain — when Feishu
//!   issues a new token while the old stays valid — triggered by the hit that notices, and by a
//!   periodic sweep over app tokens and recently used tenant tokens; callers keep getting the
//!   still-valid token meanwhile and never wait on the common path.
//! * **A failed refresh never throws away a token that is still valid**: if the upstream is down
//!   or slow, a token inside its margin but not yet expired is still served.
//! * **Compare-and-invalidate**: a caller reports the token Feishu rejected; it is dropped only if
//!   it is still the cached one, then a new one is fetched (once, single-flight).
//! * Feishu's verdicts: `99991663` / `99991664` on the tenant call drop exactly that app token
//!   and fetch once more; `10012` means the ticket is invalid: resend, wait for the push, retry once.
//! * **Missing ticket**: at most one resend request per app per `tickets.resend_interval` across all
//!   callers; callers wait up to `tickets.resend_wait` and are woken the moment intake stores the
//!   pushed ticket; then `503 ticket_missing`.
//! * Tokens persist in the store, so a restart serves them without upstream calls.
//!
//! Locks: the cache, the flight table and the resend table are std mutexes, never held across an
//! `.await`; the per-key tokio mutex is the one lock held across the upstream call. A tenant
//! fetch takes its tenant lock, then the app lock (never the other way round).

pub mod upstream;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, watch, Mutex as KeyMutex, OwnedMutexGuard};
use tokio::task::JoinHandle;

use crate::clock::SharedClock;
use crate::config::{Config, TicketConfig, TokenConfig};
use crate::error::{Error, ErrorKind};
use crate::ops::metrics::Metrics;
use crate::secret::Secret;
use crate::store::{Store, TokenRecord};
use upstream::{codes, IssuedToken, Upstream};

/// Which token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenKey {
    App(String),
    Tenant(String, String),
}

impl TokenKey {
    pub fn app_id(&self) -> &str {
        match self {
            TokenKey::App(a) | TokenKey::Tenant(a, _) => a,
        }
    }

    /// `app` or `tenant`: for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TokenKey::App(_) => "app",
            TokenKey::Tenant(..) => "tenant",
        }
    }

    /// The key the store keeps the token under.
    pub fn store_key(&self) -> String {
        match self {
            TokenKey::App(a) => format!("app/{a}"),
            TokenKey::Tenant(a, t) => format!("tenant/{a}/{t}"),
        }
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
    /// After waiting for another caller's fetch of the same key.
    Waited,
    /// This caller fetched it from Feishu.
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

/// Things the broker did in the background, for tests and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    Refreshed(TokenKey),
    RefreshFailed(TokenKey),
}

/// The outcome of the last resend request for an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ResendOutcome {
    Pending,
    Accepted,
    Failed { code: Option<i64>, message: String },
}

/// Resend bookkeeping for one app.
#[derive(Debug, Clone)]
pub struct ResendStatus {
    pub requested_at_ms: u64,
    pub outcome: ResendOutcome,
    /// A push has not arrived since the request.
    pub awaiting_push: bool,
}

struct AppCreds {
    secret: Secret,
    base_url: String,
}

struct Cached {
    token: Token,
    last_used_ms: u64,
    /// When a hit last started a background refresh: one attempt per check interval, not one
    /// per hit while Feishu is failing.
    refresh_attempt_ms: u64,
}

/// What a key's flight lock protects: the last fetch's failure, so callers that queued behind a
/// failing fetch get its answer instead of each fetching again.
#[derive(Default)]
struct Flight {
    last_failure: Option<(tokio::time::Instant, Error)>,
}

struct Inner {
    apps: HashMap<String, AppCreds>,
    tokens_cfg: TokenConfig,
    tickets_cfg: TicketConfig,
    store: Store,
    clock: SharedClock,
    upstream: Upstream,
    cache: Mutex<HashMap<TokenKey, Cached>>,
    /// One tokio mutex per key with a fetch in flight or waited for.
    flights: Mutex<HashMap<TokenKey, Arc<KeyMutex<Flight>>>>,
    /// Tokens dropped by compare-and-invalidate, until a new one is fetched: never reloaded from
    /// the store (its delete may have failed).
    rejected: Mutex<HashMap<TokenKey, Secret>>,
    /// Bumped whenever intake stores a ticket for the app: wakes waiting callers.
    ticket_signals: HashMap<String, watch::Sender<u64>>,
    resends: Mutex<HashMap<String, ResendStatus>>,
    events: broadcast::Sender<BrokerEvent>,
    metrics: Metrics,
}

/// The broker handle. Cheap to clone.
#[derive(Clone)]
pub struct Broker(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations that cannot leave a map half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds a key's flight lock; removes the key's mutex from the table when nobody else wants it.
struct KeyGuard {
    broker: Broker,
    key: TokenKey,
    mutex: Arc<KeyMutex<Flight>>,
    guard: Option<OwnedMutexGuard<Flight>>,
    /// When this caller started waiting for the lock, if it had to.
    waited_since: Option<tokio::time::Instant>,
}

impl KeyGuard {
    /// The failure of a fetch that ended while this caller waited for it.
    fn failure_while_waiting(&self) -> Option<Error> {
        let since = self.waited_since?;
        let (at, error) = self.guard.as_ref()?.last_failure.as_ref()?;
        (*at >= since).then(|| error.public_copy())
    }

    fn record_failure(&mut self, error: &Error) {
        if let Some(flight) = self.guard.as_mut() {
            flight.last_failure = Some((tokio::time::Instant::now(), error.public_copy()));
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut flights = lock(&self.broker.0.flights);
        // Ours and the table's: nobody is waiting.
        if Arc::strong_count(&self.mutex) == 2 {
            flights.remove(&self.key);
        }
    }
}

impl Broker {
    pub fn new(config: &Config, store: Store, clock: SharedClock, metrics: Metrics) -> Broker {
        let apps = config
            .apps
            .iter()
            .map(|a| {
                (
                    a.app_id.clone(),
                    AppCreds {
                        secret: a.app_secret.clone(),
                        base_url: a.base_url.clone(),
                    },
                )
            })
            .collect();
        let ticket_signals = config
            .apps
            .iter()
            .map(|a| (a.app_id.clone(), watch::channel(0u64).0))
            .collect();
        let upstream = Upstream::new(
            config.tokens.upstream_timeout,
            config.tokens.upstream_retries,
            metrics.clone(),
        );
        Broker(Arc::new(Inner {
            apps,
            tokens_cfg: config.tokens.clone(),
            tickets_cfg: config.tickets.clone(),
            store,
            clock,
            upstream,
            cache: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            ticket_signals,
            resends: Mutex::new(HashMap::new()),
            events: broadcast::channel(1024).0,
            metrics,
        }))
    }

    fn now(&self) -> u64 {
        self.0.clock.now_ms()
    }

    /// Background events (refreshes), for tests and metrics.
    pub fn subscribe(&self) -> broadcast::Receiver<BrokerEvent> {
        self.0.events.subscribe()
    }

    /// Serve `key`: from the cache, or after one single-flight fetch.
    pub async fn get(&self, key: &TokenKey) -> Result<(Token, Served), Error> {
        if let Some(token) = self.hit(key) {
            return Ok((token, Served::Hit));
        }
        let mut guard = self.lock_key(key).await;
        if let Some(token) = self.hit(key) {
            return Ok((token, Served::Waited));
        }
        // The fetch this caller queued behind failed: that is the answer, without a second try.
        let failure = match guard.failure_while_waiting() {
            Some(e) => Err(e),
            None => {
                self.load_persisted(key).await;
                if let Some(token) = self.hit(key) {
                    return Ok((token, Served::Hit));
                }
                match self.fetch(key).await {
                    Ok(token) => return Ok((token, Served::Refreshed)),
                    Err(e) => {
                        guard.record_failure(&e);
                        Err(e)
                    }
                }
            }
        };
        match (failure, self.still_valid(key)) {
            (Err(e), Some(token)) => {
                tracing::warn!(key = %key, error = %e, "refresh failed; serving the still-valid token");
                Ok((token, Served::Stale))
            }
            (failure, _) => failure,
        }
    }

    /// Drop `rejected` if it is still the cached token for `key`, then fetch a new one. Returns
    /// the current token and whether `rejected` was dropped.
    pub async fn invalidate(&self, key: &TokenKey, rejected: &str) -> Result<(Token, bool), Error> {
        let guard = self.lock_key(key).await;
        self.load_persisted(key).await;
        let is_current = lock(&self.0.cache)
            .get(key)
            .is_some_and(|c| c.token.value.ct_eq(rejected));
        if !is_current {
            drop(guard);
            let (token, _) = self.get(key).await?;
            return Ok((token, false));
        }
        lock(&self.0.cache).remove(key);
        lock(&self.0.rejected).insert(key.clone(), Secret::new(rejected));
        if let Err(e) = self
            .0
            .store
            .delete_token(&key.store_key(), &Secret::new(rejected))
            .await
        {
            tracing::warn!(key = %key, error = %e, "cannot delete the rejected token from the store");
        }
        tracing::info!(key = %key, token = %crate::secret::fingerprint(rejected.as_bytes()), "token invalidated; fetching a new one");
        let token = self.fetch(key).await?;
        Ok((token, true))
    }

    /// A usable cached token; starts a background refresh when it is due.
    fn hit(&self, key: &TokenKey) -> Option<Token> {
        let now = self.now();
        let (token, due) = {
            let mut cache = lock(&self.0.cache);
            let entry = cache.get_mut(key)?;
            if !is_usable(
                entry.token.expires_at_ms,
                now,
                self.0.tokens_cfg.refresh_margin,
            ) {
                return None;
            }
            entry.last_used_ms = now;
            let cfg = &self.0.tokens_cfg;
            let due = is_due(entry.token.expires_at_ms, now, cfg.refresh_ahead)
                && now.saturating_sub(entry.refresh_attempt_ms)
                    >= cfg.refresh_check_interval.as_millis() as u64;
            if due {
                entry.refresh_attempt_ms = now;
            }
            (entry.token.clone(), due)
        };
        if due {
            self.spawn_refresh(key.clone());
        }
        Some(token)
    }

    /// A cached token that is past its margin but not yet expired.
    fn still_valid(&self, key: &TokenKey) -> Option<Token> {
        let now = self.now();
        lock(&self.0.cache)
            .get(key)
            .filter(|c| is_valid(c.token.expires_at_ms, now))
            .map(|c| c.token.clone())
    }

    /// Bring a persisted token into the cache (after a restart).
    async fn load_persisted(&self, key: &TokenKey) {
        if lock(&self.0.cache).contains_key(key) {
            return;
        }
        match self.0.store.token(&key.store_key()).await {
            Ok(Some(record))
                if is_valid(record.expires_at_ms, self.now())
                    && lock(&self.0.rejected).get(key) != Some(&record.token) =>
            {
                lock(&self.0.cache)
                    .entry(key.clone())
                    .or_insert_with(|| Cached {
                        token: Token {
                            value: record.token,
                            expires_at_ms: record.expires_at_ms,
                        },
                        last_used_ms: self.now(),
                        refresh_attempt_ms: 0,
                    });
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(key = %key, error = %e, "cannot read a persisted token"),
        }
    }

    async fn lock_key(&self, key: &TokenKey) -> KeyGuard {
        let mutex = Arc::clone(lock(&self.0.flights).entry(key.clone()).or_default());
        let (guard, waited_since) = match Arc::clone(&mutex).try_lock_owned() {
            Ok(guard) => (guard, None),
            Err(_) => {
                let since = tokio::time::Instant::now();
                (Arc::clone(&mutex).lock_owned().await, Some(since))
            }
        };
        KeyGuard {
            broker: self.clone(),
            key: key.clone(),
            mutex,
            guard: Some(guard),
            waited_since,
        }
    }

    fn try_lock_key(&self, key: &TokenKey) -> Option<KeyGuard> {
        let mutex = Arc::clone(lock(&self.0.flights).entry(key.clone()).or_default());
        let guard = Arc::clone(&mutex).try_lock_owned().ok();
        let key_guard = KeyGuard {
            broker: self.clone(),
            key: key.clone(),
            mutex,
            guard,
            waited_since: None,
        };
        key_guard.guard.is_some().then_some(key_guard)
    }

    /// Refresh `key` in the background unless a fetch is already in flight.
    fn spawn_refresh(&self, key: TokenKey) {
        let Some(guard) = self.try_lock_key(&key) else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let mut guard = guard;
            let now = this.now();
            let still_due = lock(&this.0.cache).get(&key).is_none_or(|c| {
                is_due(c.token.expires_at_ms, now, this.0.tokens_cfg.refresh_ahead)
            });
            if !still_due {
                return;
            }
            match this.fetch(&key).await {
                Ok(_) => {
                    tracing::debug!(key = %key, "token refreshed in the background");
                    let _ = this.0.events.send(BrokerEvent::Refreshed(key));
                }
                Err(e) => {
                    guard.record_failure(&e);
                    tracing::warn!(key = %key, error = %e, "background refresh failed; keeping the current token");
                    let _ = this.0.events.send(BrokerEvent::RefreshFailed(key));
                }
            }
        });
    }

    /// Refresh every app token, and every tenant token used recently, that is due.
    fn refresh_due(&self) {
        let now = self.now();
        let cfg = &self.0.tokens_cfg;
        let recent = cfg.recent_use.as_millis() as u64;
        let due: Vec<TokenKey> = lock(&self.0.cache)
            .iter()
            .filter(|(key, c)| {
                is_due(c.token.expires_at_ms, now, cfg.refresh_ahead)
                    && (matches!(key, TokenKey::App(_))
                        || now.saturating_sub(c.last_used_ms) <= recent)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            self.spawn_refresh(key);
        }
    }

    /// Fetch `key` from Feishu (the caller holds the key's lock), cache and persist it.
    async fn fetch(&self, key: &TokenKey) -> Result<Token, Error> {
        let app_id = key.app_id();
        let creds = self.0.apps.get(app_id).ok_or_else(|| {
            Error::new(
                ErrorKind::UnknownApp,
                "no app with this app_id is configured",
            )
        })?;
        let issued = match key {
            TokenKey::App(_) => self.fetch_app(app_id, creds).await?,
            TokenKey::Tenant(_, tenant_key) => self.fetch_tenant(app_id, tenant_key, creds).await?,
        };
        let now = self.now();
        let token = Token {
            value: issued.token,
            expires_at_ms: now.saturating_add(issued.expire_s.saturating_mul(1000)),
        };
        {
            let mut cache = lock(&self.0.cache);
            let last_used_ms = cache.get(key).map_or(now, |c| c.last_used_ms);
            cache.insert(
                key.clone(),
                Cached {
                    token: token.clone(),
                    last_used_ms,
                    refresh_attempt_ms: 0,
                },
            );
            lock(&self.0.rejected).remove(key);
        }
        let record = TokenRecord {
            token: token.value.clone(),
            expires_at_ms: token.expires_at_ms,
            fetched_at_ms: now,
        };
        if let Err(e) = self.0.store.put_token(&key.store_key(), record).await {
            tracing::warn!(key = %key, error = %e, "cannot persist a token; it stays cached in memory");
        }
        tracing::info!(
            key = %key,
            token = %token.value.fingerprint(),
            expire_s = issued.expire_s,
            "token fetched"
        );
        Ok(token)
    }

    async fn fetch_app(&self, app_id: &str, creds: &AppCreds) -> Result<IssuedToken, Error> {
        let ticket = self.current_ticket(app_id).await?;
        let up = &self.0.upstream;
        match up
            .app_access_token(&creds.base_url, app_id, &creds.secret, &ticket)
            .await
        {
            Err(e) if e.code() == Some(codes::APP_TICKET_INVALID) => {
                tracing::warn!(
                    app_id,
                    ticket = %ticket.fingerprint(),
                    "Feishu rejected the app_ticket (10012); asking for a resend"
                );
                let fresh = self.ticket_other_than(app_id, &ticket).await?;
                Ok(up
                    .app_access_token(&creds.base_url, app_id, &creds.secret, &fresh)
                    .await?)
            }
            other => Ok(other?),
        }
    }

    async fn fetch_tenant(
        &self,
        app_id: &str,
        tenant_key: &str,
        creds: &AppCreds,
    ) -> Result<IssuedToken, Error> {
        let app_key = TokenKey::App(app_id.to_string());
        let (app_token, _) = Box::pin(self.get(&app_key)).await?;
        let up = &self.0.upstream;
        match up
            .tenant_access_token(&creds.base_url, &app_token.value, tenant_key)
            .await
        {
            Err(e)
                if matches!(
                    e.code(),
                    Some(codes::INVALID_ACCESS_TOKEN | codes::INVALID_APP_TOKEN)
                ) =>
            {
                tracing::warn!(
                    app_id,
                    code = e.code(),
                    "Feishu rejected the app_access_token; fetching a new one"
                );
                let (fresh, _) =
                    Box::pin(self.invalidate(&app_key, app_token.value.expose())).await?;
                Ok(up
                    .tenant_access_token(&creds.base_url, &fresh.value, tenant_key)
                    .await?)
            }
            other => Ok(other?),
        }
    }

    fn ticket_signal(&self, app_id: &str) -> Result<watch::Receiver<u64>, Error> {
        self.ticket_watch(app_id)
            .ok_or_else(|| Error::from(ErrorKind::UnknownApp))
    }

    /// How many token requests are waiting for a ticket of `app_id` to be pushed.
    pub fn ticket_waiters(&self, app_id: &str) -> usize {
        self.0
            .ticket_signals
            .get(app_id)
            .map_or(0, watch::Sender::receiver_count)
    }

    /// A receiver that changes whenever intake stores a ticket for `app_id`.
    pub fn ticket_watch(&self, app_id: &str) -> Option<watch::Receiver<u64>> {
        self.0
            .ticket_signals
            .get(app_id)
            .map(watch::Sender::subscribe)
    }

    /// The stored ticket, or: request a resend and wait for the push.
    async fn current_ticket(&self, app_id: &str) -> Result<Secret, Error> {
        // Subscribe before looking, so a push landing in between still wakes us.
        let mut signal = self.ticket_signal(app_id)?;
        if let Some(t) = self.0.store.ticket(app_id).await? {
            return Ok(t.ticket);
        }
        self.request_resend(app_id);
        self.wait_for_ticket(app_id, &mut signal, None).await
    }

    /// A ticket other than `rejected`: request a resend and wait for the push.
    async fn ticket_other_than(&self, app_id: &str, rejected: &Secret) -> Result<Secret, Error> {
        let mut signal = self.ticket_signal(app_id)?;
        if let Some(t) = self.0.store.ticket(app_id).await? {
            if t.ticket != *rejected {
                return Ok(t.ticket);
            }
        }
        self.request_resend(app_id);
        self.wait_for_ticket(app_id, &mut signal, Some(rejected))
            .await
    }

    async fn wait_for_ticket(
        &self,
        app_id: &str,
        signal: &mut watch::Receiver<u64>,
        not: Option<&Secret>,
    ) -> Result<Secret, Error> {
        let wait = async {
            loop {
                if signal.changed().await.is_err() {
                    return Ok(None);
                }
                if let Some(t) = self.0.store.ticket(app_id).await? {
                    if not.is_none_or(|old| t.ticket != *old) {
                        return Ok(Some(t.ticket));
                    }
                }
            }
        };
        match tokio::time::timeout(self.0.tickets_cfg.resend_wait, wait).await {
            Ok(Ok(Some(ticket))) => Ok(ticket),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) | Err(_) => Err(Error::new(
                ErrorKind::TicketMissing,
                "no usable app_ticket for this app yet; a resend was requested, retry shortly",
            )),
        }
    }

    /// Ask Feishu to push the ticket again, at most once per app per `tickets.resend_interval`.
    /// Returns whether a request was sent now.
    pub fn request_resend(&self, app_id: &str) -> bool {
        let Some(creds) = self.0.apps.get(app_id) else {
            return false;
        };
        let now = self.now();
        let interval = self.0.tickets_cfg.resend_interval.as_millis() as u64;
        {
            let mut resends = lock(&self.0.resends);
            if let Some(last) = resends.get(app_id) {
                if now.saturating_sub(last.requested_at_ms) < interval {
                    return false;
                }
            }
            resends.insert(
                app_id.to_string(),
                ResendStatus {
                    requested_at_ms: now,
                    outcome: ResendOutcome::Pending,
                    awaiting_push: true,
                },
            );
        }
        tracing::info!(app_id, "asking Feishu to resend the app_ticket");
        // The call may outlive the service (a shutdown mid-request): hold the broker weakly, so
        // the store is not kept open by it.
        let broker = Arc::downgrade(&self.0);
        let upstream = self.0.upstream.clone();
        let app_id = app_id.to_string();
        let base_url = creds.base_url.clone();
        let secret = creds.secret.clone();
        tokio::spawn(async move {
            let result = upstream
                .resend_app_ticket(&base_url, &app_id, &secret)
                .await;
            let Some(this) = broker.upgrade().map(Broker) else {
                return;
            };
            this.0
                .metrics
                .ticket_resend(&app_id, if result.is_ok() { "accepted" } else { "failed" });
            let outcome = match result {
                Ok(()) => ResendOutcome::Accepted,
                Err(e) => {
                    tracing::warn!(app_id = %app_id, error = %e, "app_ticket resend request failed");
                    ResendOutcome::Failed {
                        code: e.code(),
                        message: e.to_string(),
                    }
                }
            };
            let mut resends = lock(&this.0.resends);
            if let Some(status) = resends.get_mut(&app_id) {
                // A refused request brings no push: what arrives next is the usual push.
                if matches!(outcome, ResendOutcome::Failed { .. }) {
                    status.awaiting_push = false;
                }
                status.outcome = outcome;
            }
        });
        true
    }

    /// The last resend request for an app.
    pub fn resend_status(&self, app_id: &str) -> Option<ResendStatus> {
        lock(&self.0.resends).get(app_id).cloned()
    }

    /// Does a push arriving now answer a resend request of ours? (Intake asks before storing.)
    pub fn resend_pending(&self, app_id: &str) -> bool {
        lock(&self.0.resends)
            .get(app_id)
            .is_some_and(|s| s.awaiting_push)
    }

    /// Intake calls this once a ticket is stored as the newest: the resend (if any) is answered,
    /// and callers waiting for a ticket wake up.
    pub fn ticket_stored(&self, app_id: &str) {
        if let Some(status) = lock(&self.0.resends).get_mut(app_id) {
            status.awaiting_push = false;
        }
        if let Some(signal) = self.0.ticket_signals.get(app_id) {
            signal.send_modify(|v| *v += 1);
        }
    }

    /// When the cached token for `key` expires, if one is cached (never the token itself).
    pub fn cached_expiry(&self, key: &TokenKey) -> Option<u64> {
        lock(&self.0.cache).get(key).map(|c| c.token.expires_at_ms)
    }

    /// How many tenant tokens are cached for an app.
    pub fn cached_tenant_tokens(&self, app_id: &str) -> usize {
        lock(&self.0.cache)
            .keys()
            .filter(|k| matches!(k, TokenKey::Tenant(a, _) if a == app_id))
            .count()
    }

    /// Start the background work: a resend for every app without a ticket, then the periodic
    /// refresh sweep. The server aborts the task on shutdown.
    pub fn start(&self) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut apps: Vec<&String> = this.0.apps.keys().collect();
            apps.sort();
            for app_id in apps {
                match this.0.store.ticket(app_id).await {
                    Ok(None) => {
                        this.request_resend(app_id);
                    }
                    Ok(Some(_)) => {}
                    Err(e) => {
                        tracing::warn!(app_id = %app_id, error = %e, "cannot read the stored ticket")
                    }
                }
            }
            let mut tick = tokio::time::interval(this.0.tokens_cfg.refresh_check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.refresh_due();
            }
        })
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
}

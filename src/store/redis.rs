//! The Redis backend (`store.kind = "redis"`): the one store contract over Redis or Valkey, so
//! any number of replicas behind a load balancer share tickets, tenants, tokens, leases, change
//! notices and the hand-off queue (DESIGN.md → *Several replicas*).
//!
//! **Key layout.** Everything lives under `store.key_prefix` (`P`, default `lark-ticketd`), and
//! every key of one app carries the app's hash tag, `P:{app_id}:…`, so all of an app's keys sit
//! in one Redis Cluster slot and every multi-key write of an app is one script:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{A}:ticket` | string | the app's newest ticket (JSON [`TicketRecord`]) |
//! | `P:{A}:tenants` | hash | tenant_key → JSON [`TenantRecord`] |
//! | `P:{A}:token:{broker key}` | hash | `t` token, `e` expires_at_ms, `f` fetched_at_ms |
//! | `P:{A}:token-expiry` | zset | broker key, scored by expires_at_ms (the prune's index) |
//! | `P:{A}:…` queue keys | | see `redis_queue` |
//! | `P:apps` | set | every app id holding tokens or queued events (claims and prunes go over it) |
//! | `P:lease:{name}` | string | a lease's owner, with a `PX` time to live |
//! | `P:epoch` | string | a random id of this data set: gone means Redis lost its data |
//! | `P:readyz` | string | readiness probes' write, expiring |
//! | `P:changes` | pub/sub channel | change notices |
//!
//! Broker keys that name no app (`app/{A}`, `tenant/{A}/{T}` name one) go under the tag
//! `{:shared}`, which no app id can be.
//!
//! **Atomic writes, one copy of each rule.** Every write that must be atomic is one Lua script
//! (sent with `EVALSHA`, loaded again by itself after a Redis restart empties the script cache):
//! fenced token puts, compare-and-delete of tokens and leases, an operator's ticket delete (the
//! record read, deleted and announced at once), and every queue write. Tickets and
//! tenants are a compare-and-set instead: read the record, apply [`merge_ticket`],
//! [`demote_ticket`] or [`apply_tenant_event`] — the same functions the other backends use — and
//! write the result with a script that stores it only if the record is still the one read (else
//! read again). A port of those rules to Lua would be a second copy to keep in step, and `WATCH`
//! is not an option on a multiplexed connection; tickets arrive hourly, so a retry is rare.
//!
//! **Change notices.** Every write that changes a ticket or a token publishes its [`Change`] on
//! `P:changes` inside the same script, so a notice goes out exactly when the write happened, from
//! whichever replica wrote. Each process keeps one subscription (a dedicated connection) and feeds
//! a tokio broadcast; a process hears its own writes too (see `coordination`). When the
//! subscription is lost (Redis restarted, the network broke, a ping went unanswered) it is made
//! again, and [`Change::Resynced`] tells subscribers notices may have been missed. `lost_data`
//! says the data set is not the one this process knew: the `P:epoch` marker written at start is
//! gone (a Redis restarted without persistence, a flush, a failover to an empty replica) — logged
//! as a warning and shown in [`RedisStore::durability`]; the broker then asks for tickets again.
//!
//! **Failure.** Every command is bounded by [`COMMAND_TIMEOUT`]: a down or hung Redis is an error
//! within that time (intake answers `503 store_unavailable`, readiness fails), never a hung
//! request. The connection (redis-rs's `ConnectionManager`, or its cluster connection) reconnects
//! by itself, so everything recovers without a restart when Redis returns. Errors never carry the
//! URL's password.
//!
//! **Durability.** A `200` means Redis acknowledged the write. What that promises depends on the
//! server, so [`RedisStore::open`] reads `appendonly`, `appendfsync` and `maxmemory-policy` and
//! says so (see [`Durability`]): on disk only with `appendonly yes` + `appendfsync always`; keys
//! may be evicted under any `maxmemory-policy` but `noeviction`.
//!
//! **TLS.** A `rediss://` URL connects over rustls (the one rustls, and its ring provider, that
//! the Feishu client already uses). The server's certificate is checked against the Mozilla roots
//! built in (webpki-roots, as for Feishu), or against the CA certificates in `store.tls_ca_file`
//! instead; there is no way to turn the checks off. On a cluster the seed's scheme decides for
//! every node (each node tells a TLS client its TLS port). A connect error that looks like TLS on
//! one end and plain TCP on the other says so ([`tls_hint`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Script,
    ScriptInvocation, TlsCertificates, Value,
};
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::coordination::{Change, CHANGE_BACKLOG};
use super::{
    apply_tenant_event, demote_ticket, merge_ticket, Durability, RedisSettings, StoreError,
    TenantEvent, TenantRecord, TicketRecord, TicketWrite, TokenRecord,
};
use crate::config::StoreConfig;
use crate::secret::Secret;

/// The longest one Redis command (or script) may take, connecting included: a hung Redis must
/// not hang a request. Also the subscription's ping deadline.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How a PEM certificate begins (`store.tls_ca_file` must hold one at least).
const PEM_CERTIFICATE: &[u8] = b"-----BEGIN CERTIFICATE-----";
/// A connection attempt's own limit (inside [`COMMAND_TIMEOUT`]).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often the subscription pings (a half-open connection shows as an unanswered ping) and
/// checks that the data set is still the one it knew.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// Waits between attempts to subscribe again.
const RESUBSCRIBE_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Stripes of [`Inner::write_turns`].
const WRITE_TURNS: usize = 64;

/// Compare-and-set attempts before a ticket or tenant write gives up (each retry means another
/// writer changed the record in between).
const CAS_ATTEMPTS: usize = 32;
/// Rows per script in prunes, purges and redelivers, so no script holds Redis for long.
pub(super) const CHUNK: usize = 500;
/// How long a readiness probe's marker lives.
const READYZ_TTL_MS: u64 = 60_000;
/// The hash tag of broker keys that name no app: no app id contains ':'.
const SHARED_TAG: &str = ":shared";

/// A connection to a standalone Redis or to a cluster: one type for the scripts to run on.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Key names (see the module docs' table).
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    /// The base every key of `app` starts with: `P:{app}`.
    pub(super) fn app(&self, app: &str) -> String {
        format!("{}:{{{app}}}", self.prefix)
    }
    fn ticket(&self, app: &str) -> String {
        format!("{}:ticket", self.app(app))
    }
    fn tenants(&self, app: &str) -> String {
        format!("{}:tenants", self.app(app))
    }
    fn token_base(&self, tag: &str) -> String {
        format!("{}:token:", self.app(tag))
    }
    fn token_expiry(&self, tag: &str) -> String {
        format!("{}:token-expiry", self.app(tag))
    }
    pub(super) fn apps(&self) -> String {
        format!("{}:apps", self.prefix)
    }
    fn lease(&self, name: &str) -> String {
        format!("{}:lease:{name}", self.prefix)
    }
    fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
    fn readyz(&self) -> String {
        format!("{}:readyz", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:changes", self.prefix)
    }
}

/// The app a broker key belongs to (its hash tag): `app/{A}` and `tenant/{A}/{T}` name one.
fn token_tag(key: &str) -> &str {
    let app = if let Some(rest) = key.strip_prefix("app/") {
        Some(rest)
    } else {
        key.strip_prefix("tenant/")
            .and_then(|rest| rest.split('/').next())
    };
    app.filter(|a| !a.is_empty() && !a.contains(['{', '}']))
        .unwrap_or(SHARED_TAG)
}

/// A change notice on the channel: one line per field, the kind first.
fn encode_change(change: &Change) -> String {
    match change {
        Change::TicketStored { app_id } => format!("ticket\n{app_id}"),
        Change::TicketDeleted { app_id } => format!("ticket-deleted\n{app_id}"),
        Change::TokenStored { key, expires_at_ms } => format!("token\n{expires_at_ms}\n{key}"),
        Change::TokenInvalidated { key } => format!("invalidated\n{key}"),
        // Never published: each process makes its own when its subscription is re-made.
        Change::Resynced { lost_data } => format!("resynced\n{lost_data}"),
    }
}

fn decode_change(text: &str) -> Option<Change> {
    let (kind, rest) = text.split_once('\n')?;
    match kind {
        "ticket" => Some(Change::TicketStored {
            app_id: rest.to_string(),
        }),
        "ticket-deleted" => Some(Change::TicketDeleted {
            app_id: rest.to_string(),
        }),
        "token" => {
            let (expires, key) = rest.split_once('\n')?;
            Some(Change::TokenStored {
                key: key.to_string(),
                expires_at_ms: expires.parse().ok()?,
            })
        }
        "invalidated" => Some(Change::TokenInvalidated {
            key: rest.to_string(),
        }),
        _ => None,
    }
}

/// The scripts, built once per process (each is hashed once; `EVALSHA` sends only the hash).
pub(super) struct Scripts {
    cas: Script,
    ticket_delete: Script,
    token_put: Script,
    token_delete: Script,
    token_prune: Script,
    release_lease: Script,
    pub(super) enqueue: Script,
    pub(super) claim: Script,
    pub(super) outcome: Script,
    pub(super) stats: Script,
    pub(super) dead_letters: Script,
    pub(super) redeliver: Script,
    pub(super) purge: Script,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let queue = |body: &str| {
        Script::new(&format!(
            "{}\n{body}",
            include_str!("redis_lua/prelude.lua")
        ))
    };
    Scripts {
        cas: Script::new(include_str!("redis_lua/cas.lua")),
        ticket_delete: Script::new(include_str!("redis_lua/ticket_delete.lua")),
        token_put: Script::new(include_str!("redis_lua/token_put.lua")),
        token_delete: Script::new(include_str!("redis_lua/token_delete.lua")),
        token_prune: Script::new(include_str!("redis_lua/token_prune.lua")),
        release_lease: Script::new(include_str!("redis_lua/release_lease.lua")),
        enqueue: queue(include_str!("redis_lua/enqueue.lua")),
        claim: queue(include_str!("redis_lua/claim.lua")),
        outcome: queue(include_str!("redis_lua/outcome.lua")),
        stats: queue(include_str!("redis_lua/stats.lua")),
        dead_letters: queue(include_str!("redis_lua/dead_letters.lua")),
        redeliver: queue(include_str!("redis_lua/redeliver.lua")),
        purge: queue(include_str!("redis_lua/purge.lua")),
    }
});

/// Takes the URL's password out of any text before it becomes an error or a log line.
#[derive(Clone, Default)]
struct Redactor(Option<Secret>);

impl Redactor {
    fn clean(&self, text: String) -> String {
        match &self.0 {
            Some(p) if !p.is_empty() => text.replace(p.expose(), "[redacted]"),
            _ => text,
        }
    }
}

/// The handle: cheap to clone; the subscription task stops when the last clone goes (or at
/// [`RedisStore::close`]).
#[derive(Clone)]
pub struct RedisStore(Arc<Inner>);

struct Inner {
    conn: Conn,
    keys: Keys,
    changes: broadcast::Sender<Change>,
    /// The data set this process knows (`P:epoch`'s value).
    epoch: Mutex<Option<String>>,
    settings: RedisSettings,
    /// When the data set was last found gone, unix ms (0: never).
    data_lost_at_ms: AtomicU64,
    redactor: Redactor,
    subscriber: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    /// This process's writers of one record (a ticket, a tenant) take turns: its read-merge-CAS
    /// then races only other replicas' writes, never its own (64 concurrent pushes for one app
    /// used to lose to each other until they gave up). Striped: bounded, whatever the number of
    /// tenants.
    write_turns: Vec<tokio::sync::Mutex<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self
            .subscriber
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.0.keys.prefix)
            .field("cluster", &self.0.settings.cluster)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_id() -> String {
    use rand::Rng;
    hex::encode(rand::thread_rng().gen::<[u8; 16]>())
}

/// What a `rediss://` connection trusts: the CA certificates in `store.tls_ca_file`, or (`None`)
/// the Mozilla roots built in (webpki-roots, as the Feishu client does). Read once, at open.
fn tls_certificates(config: &StoreConfig) -> Result<Option<TlsCertificates>, StoreError> {
    let Some(path) = &config.tls_ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| {
        StoreError::new(format!(
            "redis: cannot read store.tls_ca_file {}: {e}",
            path.display()
        ))
    })?;
    if !pem
        .windows(PEM_CERTIFICATE.len())
        .any(|w| w == PEM_CERTIFICATE)
    {
        return Err(StoreError::new(format!(
            "redis: store.tls_ca_file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A connect error that may come from TLS on one end and plain TCP on the other gets a hint: a
/// TLS port hangs up on a plain client; a plain port never answers a TLS client's hello (it
/// takes it for the start of a command and waits for the rest).
fn tls_hint(e: StoreError, tls_url: bool) -> StoreError {
    let text = e.0.to_lowercase();
    let hint = if tls_url {
        ["corrupt message", "invalidcontenttype", "no answer within"]
            .iter()
            .any(|s| text.contains(s))
            .then_some("if the server speaks plain TCP on this port, the URL must be redis://")
    } else {
        [
            "reset by peer",
            "broken pipe",
            "unexpected end of file",
            "eof",
        ]
        .iter()
        .any(|s| text.contains(s))
        .then_some("if the server speaks TLS on this port, the URL must be rediss://")
    };
    match hint {
        Some(hint) => StoreError(format!("{} ({hint})", e.0)),
        None => e,
    }
}

/// Bound `fut` by [`COMMAND_TIMEOUT`]; errors become [`StoreError`]s without the password.
async fn bounded<T>(
    redactor: &Redactor,
    what: &str,
    fut: impl Future<Output = RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::new(
            redactor.clean(format!("redis: {what}: {e}")),
        )),
        Err(_) => Err(StoreError::new(format!(
            "redis: {what}: no answer within {}s",
            COMMAND_TIMEOUT.as_secs()
        ))),
    }
}

impl RedisStore {
    /// Connect, mark or learn the data set's epoch, read the durability settings, subscribe to
    /// the change channel. Fails if Redis cannot be reached now.
    pub async fn open(config: &StoreConfig) -> Result<RedisStore, StoreError> {
        let url = config
            .url
            .as_ref()
            .ok_or_else(|| StoreError::new("store.url is required with store.kind = \"redis\""))?;
        let info = url
            .expose()
            .into_connection_info()
            .map_err(|_| StoreError::new("store.url is not a valid Redis URL"))?;
        let redactor = Redactor(info.redis.password.clone().map(Secret::new));
        let tls = tls_certificates(config)?;
        let tls_url = matches!(info.addr, ::redis::ConnectionAddr::TcpTls { .. });
        let client_redactor = redactor.clone();
        let client_tls = tls.clone();
        let client = move |info: ::redis::ConnectionInfo| {
            let tls = &client_tls;
            match &tls {
                Some(certs) => ::redis::Client::build_with_tls(info, certs.clone()),
                None => ::redis::Client::open(info),
            }
            .map_err(|e| StoreError::new(client_redactor.clean(format!("redis: {e}"))))
        };
        let conn = if config.cluster {
            // TLS (from a rediss:// seed) to every node, which answers with its TLS port.
            let mut builder = ClusterClientBuilder::new(vec![info.clone()])
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(COMMAND_TIMEOUT)
                .retries(2);
            if let Some(certs) = &tls {
                builder = builder.certs(certs.clone());
            }
            let client = builder
                .build()
                .map_err(|e| StoreError::new(redactor.clean(format!("redis: {e}"))))?;
            let conn = bounded(&redactor, "connect", client.get_async_connection()).await?;
            Conn::Cluster(conn)
        } else {
            let client = client(info.clone())?;
            let manager = ConnectionManagerConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(COMMAND_TIMEOUT)
                .set_number_of_retries(1)
                .set_max_delay(500);
            let conn = bounded(
                &redactor,
                "connect",
                ConnectionManager::new_with_config(client, manager),
            )
            .await
            .map_err(|e| tls_hint(e, tls_url))?;
            Conn::Single(conn)
        };
        let keys = Keys {
            prefix: config.key_prefix.clone(),
        };
        let settings = read_settings(&mut conn.clone(), config.cluster).await;
        let store = RedisStore(Arc::new(Inner {
            conn,
            keys,
            changes: broadcast::channel(CHANGE_BACKLOG).0,
            write_turns: (0..WRITE_TURNS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            epoch: Mutex::new(None),
            settings,
            data_lost_at_ms: AtomicU64::new(0),
            redactor,
            subscriber: Mutex::new(None),
            closed: AtomicBool::new(false),
        }));
        store.check_epoch().await?;
        // Subscribe before returning, so every write after `open` is heard.
        let pubsub_client = client(info)?;
        let pubsub = subscribe(&pubsub_client, &store.0.keys.channel())
            .await
            .map_err(|e| {
                StoreError::new(store.0.redactor.clean(format!("redis: subscribe: {e}")))
            })?;
        let task = tokio::spawn(watch_changes(
            Arc::downgrade(&store.0),
            pubsub_client,
            store.0.changes.clone(),
            pubsub,
        ));
        *store.0.subscriber.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        let durability = store.durability();
        if durability.warnings.is_empty() {
            tracing::info!(
                appendonly = %durability_field(&durability, |s| &s.appendonly),
                appendfsync = %durability_field(&durability, |s| &s.appendfsync),
                maxmemory_policy = %durability_field(&durability, |s| &s.maxmemory_policy),
                "redis store: a 200 means the write is on disk"
            );
        }
        for warning in &durability.warnings {
            tracing::warn!(warning = %warning, "redis store durability");
        }
        Ok(store)
    }

    pub(super) fn conn(&self) -> Conn {
        self.0.conn.clone()
    }

    pub(super) fn keys(&self) -> &Keys {
        &self.0.keys
    }

    /// Run one command or script, bounded and with a clean error. Fails at once after `close`.
    pub(super) async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.0.closed.load(Ordering::SeqCst) {
            return Err(StoreError::new("redis: the store is closed"));
        }
        bounded(&self.0.redactor, what, f(self.conn())).await
    }

    /// A read, or a write that may run twice: retried once at once when the connection had
    /// dropped (the first command after a Redis restart finds the old connection broken; the
    /// connection is made again meanwhile), all within one [`COMMAND_TIMEOUT`].
    pub(super) async fn query<T: FromRedisValue>(
        &self,
        what: &str,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.retrying(what, |mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    /// [`RedisStore::query`] for a script that reads, or writes idempotently.
    pub(super) async fn query_script<T: FromRedisValue>(
        &self,
        what: &str,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.retrying(what, |mut c| async move { inv.invoke_async(&mut c).await })
            .await
    }

    async fn retrying<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.0.closed.load(Ordering::SeqCst) {
            return Err(StoreError::new("redis: the store is closed"));
        }
        let once_more = async {
            match f(self.conn()).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => f(self.conn()).await,
                answer => answer,
            }
        };
        bounded(&self.0.redactor, what, once_more).await
    }

    /// What a `200` promises on this server (read at start), and any data loss seen since.
    pub fn durability(&self) -> Durability {
        let s = &self.0.settings;
        let on_disk = match (s.appendonly.as_str(), s.appendfsync.as_str()) {
            ("unknown", _) | ("yes", "unknown") => None,
            ("yes", "always") => Some(true),
            _ => Some(false),
        };
        let mut warnings = Vec::new();
        match on_disk {
            Some(true) => {}
            Some(false) if s.appendonly != "yes" => warnings.push(format!(
                "appendonly is {:?}: a 200 means Redis holds the write in memory, not on disk; \
                 a Redis restart loses it (set appendonly yes and appendfsync always)",
                s.appendonly
            )),
            Some(false) => warnings.push(format!(
                "appendfsync is {:?}: a 200 means the write is in Redis's append-only file but \
                 not yet fsynced; a machine crash can lose up to about a second of writes (set \
                 appendfsync always)",
                s.appendfsync
            )),
            None => warnings.push(
                "the Redis server refused CONFIG GET: whether a 200 means on disk is unknown \
                 (use appendonly yes, appendfsync always)"
                    .to_string(),
            ),
        }
        if s.maxmemory_policy == "unknown" {
            if on_disk.is_some() {
                warnings.push(
                    "maxmemory-policy is unknown: keys may be evicted (use noeviction)".into(),
                );
            }
        } else if s.maxmemory_policy != "noeviction" {
            warnings.push(format!(
                "maxmemory-policy is {:?}: Redis may evict keys (tickets, tokens, queued events, \
                 leases) when it runs out of memory (use noeviction)",
                s.maxmemory_policy
            ));
        }
        let lost = self.0.data_lost_at_ms.load(Ordering::SeqCst);
        if lost > 0 {
            warnings.push(
                "Redis came back without its data since this process started (restarted \
                 without persistence, flushed, or failed over to an empty replica): tickets \
                 were asked for again"
                    .into(),
            );
        }
        Durability {
            kind: "redis".into(),
            on_disk,
            redis: Some(s.clone()),
            warnings,
            data_lost_at: (lost > 0).then_some(lost / 1000),
        }
    }

    /// Is the data set still the one this process knew? Learns it the first time. Returns
    /// `true` when it was gone or replaced (the data was lost), after marking the new one.
    async fn check_epoch(&self) -> Result<bool, StoreError> {
        let key = self.0.keys.epoch();
        let current: Option<String> = self.query("epoch", ::redis::cmd("GET").arg(&key)).await?;
        let known = self
            .0
            .epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.is_some() && current == known {
            return Ok(false);
        }
        let fresh = current.clone().unwrap_or_else(random_id);
        let key = self.0.keys.epoch();
        // Whoever marks the new data set first wins; everyone learns the winner's id.
        let ours = fresh.clone();
        let marked: Option<String> = self
            .query(
                "epoch",
                ::redis::cmd("SET")
                    .arg(&key)
                    .arg(&ours)
                    .arg("NX")
                    .arg("GET"),
            )
            .await?;
        let now = marked.or(Some(fresh));
        *self.0.epoch.lock().unwrap_or_else(|p| p.into_inner()) = now;
        let lost = known.is_some();
        if lost {
            self.0.data_lost_at_ms.store(now_ms(), Ordering::SeqCst);
            tracing::warn!(
                "the Redis store came back without its data (restarted without persistence, \
                 flushed, or failed over to an empty replica): tickets will be asked for again"
            );
        }
        Ok(lost)
    }

    /// Register an app (a hash tag) as holding tokens or queued events, so claims, purges and
    /// prunes find it. Idempotent, O(1).
    pub(super) async fn register_app(&self, app: &str) -> Result<(), StoreError> {
        let key = self.0.keys.apps();
        self.query::<()>("register app", ::redis::cmd("SADD").arg(&key).arg(app))
            .await
    }

    /// Every registered app, sorted.
    pub(super) async fn apps(&self) -> Result<Vec<String>, StoreError> {
        let key = self.0.keys.apps();
        let mut apps: Vec<String> = self
            .query("apps", ::redis::cmd("SMEMBERS").arg(&key))
            .await?;
        apps.sort();
        Ok(apps)
    }

    /// Wait for this process's turn to write the record `key` (`field`: a hash field or `""`).
    async fn write_turn(&self, key: &str, field: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (key, field).hash(&mut h);
        let turns = &self.0.write_turns;
        turns[(h.finish() % turns.len() as u64) as usize]
            .lock()
            .await
    }

    /// Compare-and-set one record (`field` `""`: a string key). `expected` is the raw value read
    /// (`None`: absent). Returns whether it was written.
    async fn cas(
        &self,
        key: &str,
        field: &str,
        expected: Option<&str>,
        new: &str,
        notice: Option<Change>,
    ) -> Result<bool, StoreError> {
        let mut inv = SCRIPTS.cas.prepare_invoke();
        inv.key(key)
            .arg(field)
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(new)
            .arg(self.0.keys.channel())
            .arg(notice.as_ref().map(encode_change).unwrap_or_default());
        let written: i64 = self
            .run(
                "write",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        Ok(written == 1)
    }

    async fn get_string(&self, key: String) -> Result<Option<String>, StoreError> {
        self.query("read", ::redis::cmd("GET").arg(&key)).await
    }

    pub async fn put_ticket(
        &self,
        app_id: &str,
        incoming: TicketRecord,
    ) -> Result<TicketWrite, StoreError> {
        let key = self.0.keys.ticket(app_id);
        let _turn = self.write_turn(&key, "").await;
        for _ in 0..CAS_ATTEMPTS {
            let raw = self.get_string(key.clone()).await?;
            let stored = raw.as_deref().map(decode::<TicketRecord>).transpose()?;
            let (record, write) = merge_ticket(stored, incoming.clone());
            let notice = (write == TicketWrite::Stored).then(|| Change::TicketStored {
                app_id: app_id.to_string(),
            });
            if self
                .cas(&key, "", raw.as_deref(), &encode(&record)?, notice)
                .await?
            {
                return Ok(write);
            }
        }
        Err(contended("ticket"))
    }

    pub async fn ticket(&self, app_id: &str) -> Result<Option<TicketRecord>, StoreError> {
        let raw = self.get_string(self.0.keys.ticket(app_id)).await?;
        raw.as_deref().map(decode).transpose()
    }

    pub async fn demote_ticket(&self, app_id: &str, ticket: &Secret) -> Result<bool, StoreError> {
        let key = self.0.keys.ticket(app_id);
        let _turn = self.write_turn(&key, "").await;
        for _ in 0..CAS_ATTEMPTS {
            let Some(raw) = self.get_string(key.clone()).await? else {
                return Ok(false);
            };
            let mut stored: TicketRecord = decode(&raw)?;
            if !demote_ticket(&mut stored, ticket) {
                return Ok(false);
            }
            if self
                .cas(&key, "", Some(&raw), &encode(&stored)?, None)
                .await?
            {
                return Ok(true);
            }
        }
        Err(contended("ticket"))
    }

    /// Drop the ticket and announce it, in one script (`ticket_delete.lua`): the record
    /// returned is exactly the one deleted, whatever other replicas write meanwhile.
    pub async fn delete_ticket(&self, app_id: &str) -> Result<Option<TicketRecord>, StoreError> {
        let key = self.0.keys.ticket(app_id);
        let _turn = self.write_turn(&key, "").await;
        let notice = encode_change(&Change::TicketDeleted {
            app_id: app_id.to_string(),
        });
        let mut inv = SCRIPTS.ticket_delete.prepare_invoke();
        inv.key(&key).arg(self.0.keys.channel()).arg(notice);
        let raw: Option<String> = self
            .run(
                "write",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        raw.as_deref().map(decode).transpose()
    }

    pub async fn record_tenant_event(
        &self,
        app_id: &str,
        ev: TenantEvent,
    ) -> Result<TenantRecord, StoreError> {
        let key = self.0.keys.tenants(app_id);
        let _turn = self.write_turn(&key, &ev.tenant_key).await;
        for _ in 0..CAS_ATTEMPTS {
            let raw: Option<String> = self
                .query("read", ::redis::cmd("HGET").arg(&key).arg(&ev.tenant_key))
                .await?;
            let stored = raw.as_deref().map(decode::<TenantRecord>).transpose()?;
            let record = apply_tenant_event(stored, &ev);
            if self
                .cas(
                    &key,
                    &ev.tenant_key,
                    raw.as_deref(),
                    &encode(&record)?,
                    None,
                )
                .await?
            {
                return Ok(record);
            }
        }
        Err(contended("tenant"))
    }

    pub async fn tenants(&self, app_id: &str) -> Result<Vec<TenantRecord>, StoreError> {
        let key = self.0.keys.tenants(app_id);
        let all: Vec<(String, String)> = self
            .query("read", ::redis::cmd("HGETALL").arg(&key))
            .await?;
        let mut out = all
            .iter()
            .map(|(_, v)| decode::<TenantRecord>(v))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.tenant_key.cmp(&b.tenant_key));
        Ok(out)
    }

    /// The fenced put (see `token_put.lua`). Returns whether the token was stored.
    pub async fn put_token(&self, key: &str, record: TokenRecord) -> Result<bool, StoreError> {
        let tag = token_tag(key);
        self.register_app(tag).await?;
        let notice = encode_change(&Change::TokenStored {
            key: key.to_string(),
            expires_at_ms: record.expires_at_ms,
        });
        let mut inv = SCRIPTS.token_put.prepare_invoke();
        inv.key(format!("{}{key}", self.0.keys.token_base(tag)))
            .key(self.0.keys.token_expiry(tag))
            .arg(key)
            .arg(record.token.expose())
            .arg(record.expires_at_ms.to_string())
            .arg(record.fetched_at_ms.to_string())
            .arg(self.0.keys.channel())
            .arg(notice);
        let stored: i64 = self
            .run("token write", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(stored == 1)
    }

    pub async fn token(&self, key: &str) -> Result<Option<TokenRecord>, StoreError> {
        let hash = format!("{}{key}", self.0.keys.token_base(token_tag(key)));
        let (token, expires, fetched): (Option<String>, Option<u64>, Option<u64>) = self
            .query(
                "token read",
                ::redis::cmd("HMGET").arg(&hash).arg("t").arg("e").arg("f"),
            )
            .await?;
        Ok(token.map(|t| TokenRecord {
            token: Secret::new(t),
            expires_at_ms: expires.unwrap_or(0),
            fetched_at_ms: fetched.unwrap_or(0),
        }))
    }

    /// Compare-and-delete; the invalidation is announced either way (as the local backends do).
    pub async fn delete_token(&self, key: &str, token: &Secret) -> Result<(), StoreError> {
        let tag = token_tag(key);
        let notice = encode_change(&Change::TokenInvalidated {
            key: key.to_string(),
        });
        let mut inv = SCRIPTS.token_delete.prepare_invoke();
        inv.key(format!("{}{key}", self.0.keys.token_base(tag)))
            .key(self.0.keys.token_expiry(tag))
            .arg(key)
            .arg(token.expose())
            .arg(self.0.keys.channel())
            .arg(notice);
        self.run("token delete", |mut c| async move {
            inv.invoke_async::<i64>(&mut c).await
        })
        .await
        .map(drop)
    }

    pub async fn delete_expired_tokens(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut deleted = 0;
        for tag in self.apps().await? {
            loop {
                let mut inv = SCRIPTS.token_prune.prepare_invoke();
                inv.key(self.0.keys.token_expiry(&tag))
                    .arg(self.0.keys.token_base(&tag))
                    .arg(now_ms.to_string())
                    .arg(CHUNK);
                let n: usize = self.query_script("token prune", &inv).await?;
                deleted += n;
                if n < CHUNK {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    /// `SET NX PX`: one owner at a time, for `ttl` (at least 1 ms).
    pub async fn try_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = self.0.keys.lease(name);
        let owner = owner.to_string();
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        let take = ::redis::cmd("SET")
            .arg(&key)
            .arg(&owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        // Not retried: a SET that ran but whose answer was lost would read as "not taken".
        let set: Value = self
            .run(
                "lease",
                |mut c| async move { take.query_async(&mut c).await },
            )
            .await?;
        Ok(!matches!(set, Value::Nil))
    }

    /// Compare-and-delete: only the owner's own, live lease goes.
    pub async fn release_lease(&self, name: &str, owner: &str) -> Result<bool, StoreError> {
        let mut inv = SCRIPTS.release_lease.prepare_invoke();
        inv.key(self.0.keys.lease(name)).arg(owner);
        let released: i64 = self
            .run("lease release", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(released == 1)
    }

    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.0.changes.subscribe()
    }

    /// Readiness: a small, expiring write, answered within [`COMMAND_TIMEOUT`] — so a Redis that
    /// is down, hung, read-only (a replica) or refusing writes (out of memory) is not ready.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let key = self.0.keys.readyz();
        self.query::<()>(
            "ping",
            ::redis::cmd("SET")
                .arg(&key)
                .arg(now_ms())
                .arg("PX")
                .arg(READYZ_TTL_MS),
        )
        .await
    }

    /// Stop the subscription; later operations fail.
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        if let Some(task) = self
            .0
            .subscriber
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

fn contended(what: &str) -> StoreError {
    StoreError::new(format!(
        "redis: the {what} record changed on each of {CAS_ATTEMPTS} attempts to write it"
    ))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(StoreError::new)
}

fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    // Never the text itself in the error: a ticket record holds the ticket.
    serde_json::from_str(text).map_err(|e| {
        StoreError::new(format!(
            "redis: a stored record is malformed (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

fn durability_field(d: &Durability, f: impl Fn(&RedisSettings) -> &String) -> String {
    d.redis.as_ref().map(|s| f(s).clone()).unwrap_or_default()
}

/// `CONFIG GET` the settings that decide what a `200` means; `"unknown"` where refused (managed
/// services often rename or forbid `CONFIG`). On a cluster every primary is asked: one value if
/// they agree, else `"mixed: …"` (which promises the least).
async fn read_settings(conn: &mut Conn, cluster: bool) -> RedisSettings {
    let get = |name: &'static str| {
        let c = conn.clone();
        async move {
            let config_get = ::redis::cmd("CONFIG").arg("GET").arg(name).clone();
            let answer = tokio::time::timeout(COMMAND_TIMEOUT, async move {
                match c {
                    Conn::Single(mut c) => {
                        let pair: Vec<String> = config_get.query_async(&mut c).await?;
                        Ok(vec![pair])
                    }
                    Conn::Cluster(mut c) => {
                        use ::redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
                        let all =
                            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                        let by_node: Vec<(String, Vec<String>)> = ::redis::from_owned_redis_value(
                            c.route_command(&config_get, all).await?,
                        )?;
                        Ok(by_node.into_iter().map(|(_, pair)| pair).collect())
                    }
                }
            })
            .await;
            let answers: Vec<Vec<String>> = match answer {
                Ok(Ok(answers)) => answers,
                Ok(Err::<_, ::redis::RedisError>(_)) | Err(_) => return "unknown".to_string(),
            };
            let mut values: Vec<String> = answers
                .into_iter()
                .map(|pair| match pair.as_slice() {
                    [_, value] => value.clone(),
                    _ => "unknown".to_string(),
                })
                .collect();
            values.sort();
            values.dedup();
            match values.as_slice() {
                [one] => one.clone(),
                [] => "unknown".to_string(),
                many => format!("mixed: {}", many.join(", ")),
            }
        }
    };
    RedisSettings {
        appendonly: get("appendonly").await,
        appendfsync: get("appendfsync").await,
        maxmemory_policy: get("maxmemory-policy").await,
        cluster,
    }
}

/// A subscription on its own connection.
async fn subscribe(client: &::redis::Client, channel: &str) -> RedisResult<::redis::aio::PubSub> {
    let timeout = |e: tokio::time::error::Elapsed| {
        ::redis::RedisError::from((
            ::redis::ErrorKind::IoError,
            "no answer in time",
            e.to_string(),
        ))
    };
    let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(timeout)??;
    tokio::time::timeout(COMMAND_TIMEOUT, pubsub.subscribe(channel))
        .await
        .map_err(timeout)??;
    Ok(pubsub)
}

/// The subscription's task: feed notices to the broadcast; when the connection is lost,
/// subscribe again (with a backoff), then say [`Change::Resynced`] — with `lost_data` when the
/// data set is gone. Holds the store only weakly: it ends when the last handle goes.
async fn watch_changes(
    store: Weak<Inner>,
    client: ::redis::Client,
    tx: broadcast::Sender<Change>,
    first: ::redis::aio::PubSub,
) {
    let Some(channel) = store.upgrade().map(|s| s.keys.channel()) else {
        return;
    };
    let mut next = Some(first);
    let mut backoff = RESUBSCRIBE_BACKOFF_MIN;
    let mut resubscribed = false;
    loop {
        let pubsub = match next.take() {
            Some(p) => p,
            None => match subscribe(&client, &channel).await {
                Ok(p) => p,
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF_MAX);
                    continue;
                }
            },
        };
        if resubscribed {
            let Some(inner) = store.upgrade() else { return };
            let checked = RedisStore(inner).check_epoch().await;
            match checked {
                Ok(lost_data) => {
                    tracing::info!(lost_data, "redis change subscription made again");
                    let _ = tx.send(Change::Resynced { lost_data });
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF_MAX);
                    continue;
                }
            }
        }
        resubscribed = true;
        backoff = RESUBSCRIBE_BACKOFF_MIN;
        let (mut sink, mut stream) = pubsub.split();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => {
                        if let Some(change) = std::str::from_utf8(msg.get_payload_bytes())
                            .ok()
                            .and_then(decode_change)
                        {
                            let _ = tx.send(change);
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    // A half-open connection (no reset ever arrives) shows as an unanswered ping.
                    let pong = tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break;
                    }
                    // A flush or a failover to an empty replica loses data without a disconnect.
                    let Some(inner) = store.upgrade() else { return };
                    if let Ok(true) = RedisStore(inner).check_epoch().await {
                        let _ = tx.send(Change::Resynced { lost_data: true });
                    }
                }
            }
        }
        tracing::warn!("lost the redis change subscription; subscribing again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_keys_are_tagged_by_their_app() {
        assert_eq!(token_tag("app/cli_a"), "cli_a");
        assert_eq!(token_tag("tenant/cli_a/t-{x}/y"), "cli_a");
        assert_eq!(token_tag("prune/old"), SHARED_TAG);
        assert_eq!(token_tag("app/"), SHARED_TAG);
        let keys = Keys {
            prefix: "ltd".into(),
        };
        assert_eq!(keys.ticket("cli_a"), "ltd:{cli_a}:ticket");
        assert_eq!(
            format!("{}{}", keys.token_base("cli_a"), "tenant/cli_a/t"),
            "ltd:{cli_a}:token:tenant/cli_a/t"
        );
    }

    #[test]
    fn change_notices_round_trip() {
        for change in [
            Change::TicketStored {
                app_id: "cli_a".into(),
            },
            Change::TokenStored {
                key: "tenant/cli_a/t\nx".into(),
                expires_at_ms: 42,
            },
            Change::TokenInvalidated {
                key: "app/cli_a".into(),
            },
        ] {
            assert_eq!(decode_change(&encode_change(&change)), Some(change));
        }
        assert_eq!(decode_change("resynced\ntrue"), None);
        assert_eq!(decode_change("token\nnot-a-number\nk"), None);
    }

    #[test]
    fn errors_never_carry_the_password() {
        let r = Redactor(Some(Secret::new("pw-123")));
        assert_eq!(
            r.clean("AUTH failed for redis://:pw-123@h".into()),
            "AUTH failed for redis://:[redacted]@h"
        );
    }
}

/// The Redis backend against a real `redis-server` each test starts itself (see
/// `store::testing`).
#[cfg(test)]
mod server_tests {
    use std::time::Instant;

    use super::*;
    use crate::config::StoreKind;
    use crate::store::testing::RedisServer;
    use crate::store::{contract, coordination, Store};

    pub(crate) fn config(url: &str) -> StoreConfig {
        StoreConfig {
            kind: StoreKind::Redis,
            url: Some(Secret::new(url)),
            ..StoreConfig::default()
        }
    }

    async fn open(server: &RedisServer) -> Store {
        Store::open(&config(&server.url())).await.unwrap()
    }

    /// Poll `f` until it holds, for at most 20 s (a loaded machine is slow, never this slow).
    async fn eventually<F, Fut>(what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f().await {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn next_change(rx: &mut broadcast::Receiver<Change>) -> Change {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a change notice in time")
            .expect("no notice missed")
    }

    #[tokio::test]
    async fn redis_store_passes_the_contract() {
        let Some(server) = RedisServer::start("redis_store_passes_the_contract") else {
            return;
        };
        let store = open(&server).await;
        assert!(store.is_shared());
        contract::run(&store).await;
    }

    /// The load bench (issue 10, r2) found 64 concurrent pushes of distinct tickets for one app
    /// answered with `503`s: every write re-read and compare-and-set the one ticket record, and
    /// most lost to the others of the same process, 32 times in a row.
    #[tokio::test]
    async fn concurrent_writes_of_one_record_in_one_process_never_give_up() {
        let Some(server) = RedisServer::start("concurrent_writes_of_one_record") else {
            return;
        };
        let store = open(&server).await;
        let writes: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let ticket = contract::ticket(&format!("t-{i}"), i);
                    let pushed = store.put_ticket("cli_busy", ticket).await.map(drop);
                    let event = TenantEvent {
                        tenant_key: "tenant-1".into(),
                        change: crate::model::TenantChange::Opened,
                        event_type: "app_open".into(),
                        event_time_us: i,
                        received_at_ms: 1,
                    };
                    let recorded = store.record_tenant_event("cli_busy", event).await.map(drop);
                    pushed.and(recorded)
                })
            })
            .collect();
        for w in writes {
            w.await.unwrap().unwrap();
        }
        let newest = store.ticket("cli_busy").await.unwrap().unwrap();
        assert_eq!(newest.event_time_us, 63);
        assert_eq!(newest.pushes_seen, 64);
    }

    #[tokio::test]
    async fn two_processes_on_one_redis_pass_the_coordination_contract() {
        let Some(server) = RedisServer::start("two_processes_on_one_redis") else {
            return;
        };
        let (a, b) = (open(&server).await, open(&server).await);
        coordination::contract::run(&a, &b).await;
    }

    #[tokio::test]
    async fn every_key_sits_under_the_prefix_and_each_app_under_its_hash_tag() {
        let Some(server) = RedisServer::start("key_layout") else {
            return;
        };
        let mut cfg = config(&server.url());
        cfg.key_prefix = "ltd-test".into();
        let store = Store::open(&cfg).await.unwrap();
        contract::run(&store).await;
        let keys = server.cli(&["--scan"]);
        assert!(!keys.is_empty());
        for key in keys.lines() {
            assert!(key.starts_with("ltd-test:"), "{key}");
            if let Some(rest) = key.strip_prefix("ltd-test:{") {
                let tag = rest.split('}').next().unwrap();
                assert!(tag.starts_with("cli_") || tag == SHARED_TAG, "{key}");
            } else {
                let global = ["ltd-test:apps", "ltd-test:epoch", "ltd-test:readyz"];
                assert!(
                    global.contains(&key) || key.starts_with("ltd-test:lease:"),
                    "{key}"
                );
            }
        }
        // Secrets are stored (they must be), but only where the layout says.
        let ticket = server.cli(&["GET", "ltd-test:{cli_a}:ticket"]);
        assert!(ticket.contains("\"t3\""), "{ticket}");
    }

    #[tokio::test]
    async fn redis_down_fails_fast_and_everything_recovers_when_it_returns_empty() {
        let Some(mut server) = RedisServer::start("redis_down_and_back_empty") else {
            return;
        };
        let (a, b) = (open(&server).await, open(&server).await);
        let (mut on_a, mut on_b) = (a.changes(), b.changes());
        a.put_ticket("cli_a", contract::ticket("t-1", 1))
            .await
            .unwrap();
        assert_eq!(
            next_change(&mut on_b).await,
            Change::TicketStored {
                app_id: "cli_a".into()
            }
        );
        next_change(&mut on_a).await;
        assert_eq!(a.durability().data_lost_at, None);

        server.kill();
        let started = Instant::now();
        let err = a
            .put_ticket("cli_a", contract::ticket("t-2", 2))
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < COMMAND_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
        assert!(err.0.starts_with("redis: "), "{err}");
        assert!(a.ping().await.is_err());

        // Back, without its data: both processes notice, reconnect by themselves, and say so.
        server.restart();
        for rx in [&mut on_a, &mut on_b] {
            assert_eq!(next_change(rx).await, Change::Resynced { lost_data: true });
        }
        eventually("ping works again", || async { a.ping().await.is_ok() }).await;
        assert!(a.durability().data_lost_at.is_some());
        assert!(a
            .durability()
            .warnings
            .iter()
            .any(|w| w.contains("without its data")));
        assert_eq!(a.ticket("cli_a").await.unwrap(), None);
        // Writes and notices work again.
        b.put_ticket("cli_a", contract::ticket("t-3", 3))
            .await
            .unwrap();
        assert_eq!(
            next_change(&mut on_a).await,
            Change::TicketStored {
                app_id: "cli_a".into()
            }
        );
        assert_eq!(
            a.ticket("cli_a").await.unwrap().unwrap().ticket.expose(),
            "t-3"
        );
        // The hand-off works on the new data set: the app is registered again.
        let ev = contract::forwarding::event("cli_a", "e-1", 1_000);
        a.enqueue_event(ev, &["c"]).await.unwrap();
        assert_eq!(b.claim_due("c", 1_000, 1_000, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_persistent_redis_restarted_keeps_every_acknowledged_write() {
        let Some(builder) = RedisServer::builder("persistent_restart") else {
            return;
        };
        let mut server = builder.persistent().launch();
        let store = open(&server).await;
        assert_eq!(store.durability().on_disk, Some(true));
        assert!(
            store.durability().warnings.is_empty(),
            "{:?}",
            store.durability()
        );
        let mut changes = store.changes();
        store
            .put_ticket("cli_a", contract::ticket("t-1", 1))
            .await
            .unwrap();
        let ev = contract::forwarding::event("cli_a", "e-1", 1_000);
        store.enqueue_event(ev, &["c"]).await.unwrap();
        next_change(&mut changes).await;
        // kill -9 right after the acknowledgements.
        server.kill();
        server.restart();
        assert_eq!(
            next_change(&mut changes).await,
            Change::Resynced { lost_data: false }
        );
        assert_eq!(store.durability().data_lost_at, None);
        assert_eq!(
            store
                .ticket("cli_a")
                .await
                .unwrap()
                .unwrap()
                .ticket
                .expose(),
            "t-1"
        );
        let claimed = store.claim_due("c", 2_000, 1_000, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].event_id, "e-1");
    }

    /// The first read after Redis came back found the old connection broken and failed
    /// ("broken pipe"): a read is now made again at once on the new connection.
    #[tokio::test]
    async fn the_first_read_after_a_redis_restart_succeeds() {
        let Some(mut server) = RedisServer::start("first_read_after_restart") else {
            return;
        };
        let store = open(&server).await;
        store.ping().await.unwrap();
        server.kill();
        server.restart();
        assert_eq!(store.ticket("cli_a").await.unwrap(), None);
        store.ping().await.unwrap();
    }

    #[tokio::test]
    async fn a_hung_redis_fails_a_command_within_the_timeout() {
        let Some(server) = RedisServer::start("hung_redis") else {
            return;
        };
        let store = open(&server).await;
        store.ping().await.unwrap();
        server.pause();
        let started = Instant::now();
        assert!(store.ping().await.is_err());
        assert!(store.ticket("cli_a").await.is_err());
        let took = started.elapsed();
        server.resume();
        assert!(took < COMMAND_TIMEOUT * 3, "{took:?}");
        eventually("ping works again", || async { store.ping().await.is_ok() }).await;
    }

    #[tokio::test]
    async fn durability_is_read_from_the_server_and_warned_about() {
        let Some(server) = RedisServer::start("durability_plain") else {
            return;
        };
        let d = open(&server).await.durability();
        assert_eq!(d.kind, "redis");
        assert_eq!(d.on_disk, Some(false));
        let settings = d.redis.clone().unwrap();
        assert_eq!(
            (
                settings.appendonly.as_str(),
                settings.maxmemory_policy.as_str()
            ),
            ("no", "noeviction")
        );
        assert!(d.warnings.iter().any(|w| w.contains("appendonly")), "{d:?}");

        let Some(builder) = RedisServer::builder("durability_eviction") else {
            return;
        };
        let server = builder
            .persistent()
            .args(&[
                "--appendfsync",
                "everysec",
                "--maxmemory-policy",
                "allkeys-lru",
            ])
            .launch();
        let d = open(&server).await.durability();
        assert_eq!(d.on_disk, Some(false));
        assert!(
            d.warnings.iter().any(|w| w.contains("appendfsync")),
            "{d:?}"
        );
        assert!(
            d.warnings.iter().any(|w| w.contains("allkeys-lru")),
            "{d:?}"
        );

        let Some(builder) = RedisServer::builder("durability_config_refused") else {
            return;
        };
        let server = builder.args(&["--rename-command", "CONFIG", ""]).launch();
        let d = open(&server).await.durability();
        assert_eq!(d.on_disk, None);
        assert_eq!(d.redis.unwrap().appendonly, "unknown");
        assert!(
            d.warnings.iter().any(|w| w.contains("unknown")),
            "{:?}",
            d.warnings
        );
    }

    #[tokio::test]
    async fn the_password_never_shows_in_errors_or_debug() {
        let Some(builder) = RedisServer::builder("redis_password") else {
            return;
        };
        let server = builder.password("pw-s3cr3t-6d1f").launch();
        let store = open(&server).await;
        store.ping().await.unwrap();
        assert!(!format!("{store:?}").contains("pw-s3cr3t-6d1f"));
        let wrong = server.url().replace("pw-s3cr3t-6d1f", "pw-wrong-0a9c");
        let err = Store::open(&config(&wrong)).await.unwrap_err();
        assert!(!err.to_string().contains("pw-wrong-0a9c"), "{err}");
    }
}

/// The Redis backend on a three-node Redis Cluster (`store.cluster = true`).
#[cfg(test)]
mod cluster_tests {
    use std::collections::HashMap;

    use super::server_tests::config;
    use crate::store::testing::RedisCluster;
    use crate::store::{contract, coordination, Store};

    async fn open(cluster: &RedisCluster) -> Store {
        let mut cfg = config(&cluster.url());
        cfg.cluster = true;
        Store::open(&cfg).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_cluster_passes_the_store_and_coordination_contracts() {
        let Some(cluster) = RedisCluster::start("redis_cluster_contract") else {
            return;
        };
        // Every primary is asked what a 200 means; the weakest answer counts.
        assert_eq!(
            cluster.nodes[1].cli(&["config", "set", "appendonly", "yes"]),
            "OK"
        );
        let store = open(&cluster).await;
        let durability = store.durability();
        let settings = durability.redis.clone().unwrap();
        assert!(settings.cluster);
        assert_eq!(settings.appendonly, "mixed: no, yes");
        assert_eq!(settings.maxmemory_policy, "noeviction");
        assert_eq!(durability.on_disk, Some(false));
        assert!(
            durability.warnings.iter().any(|w| w.contains("mixed")),
            "{durability:?}"
        );
        contract::run(&store).await;
        let other = open(&cluster).await;
        coordination::contract::run(&store, &other).await;

        // Every key of one app sits in one slot; the apps are spread over the nodes.
        let mut slots: HashMap<String, Vec<String>> = HashMap::new();
        let mut nodes_used = 0;
        for node in &cluster.nodes {
            let keys = node.cli(&["--scan"]);
            nodes_used += usize::from(!keys.is_empty());
            for key in keys.lines() {
                if let Some(rest) = key.strip_prefix("lark-ticketd:{") {
                    let tag = rest.split('}').next().unwrap().to_string();
                    let slot = node.cli(&["cluster", "keyslot", key]);
                    slots.entry(tag).or_default().push(slot);
                }
            }
        }
        assert!(slots.len() > 5, "{slots:?}");
        for (tag, slot_list) in &slots {
            assert!(
                slot_list.iter().all(|s| s == &slot_list[0]),
                "{tag}: {slot_list:?}"
            );
        }
        assert!(nodes_used >= 2, "every app landed on one node");
    }
}

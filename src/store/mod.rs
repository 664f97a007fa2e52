//! Durable state: the newest App Ticket per app, tenant state per (app, tenant), cached tokens,
//! and the event hand-off queue (dedupe marks, events, deliveries per consumer: see [`queue`]
//! for its semantics and `queue_embedded` for its layout in the file).
//!
//! One [`Store`] over several backends, chosen once at start-up (an enum, not a trait object:
//! the set is closed and known). Every backend passes the same contract test (`tests` below), so
//! intake and the token broker never know which one they talk to.
//!
//! * [`embedded`] — the default: a [redb](https://docs.rs/redb) file. Chosen over SQLite because
//!   it is pure Rust (no C toolchain, no `-sys` crate), gives ACID transactions with
//!   copy-on-write B-trees that survive a crash or power loss at any point, and commits with
//!   fsync by default — which is exactly "a 200 means the ticket is on disk" — while we need
//!   nothing SQL offers: a handful of key → record tables.
//! * [`memory`] — process memory, for tests and throwaway runs.
//! * [`redis`] — Redis (or Valkey), shared by several replicas (`store.kind = "redis"`); its key
//!   layout and why it is built the way it is are in its module docs. The record merge rules live
//!   here, as pure functions, and the Redis backend applies these same functions atomically
//!   (compare-and-set), so there is one copy of each rule.
//!
//! Merge rules, shared by every backend:
//! * a ticket replaces the stored one only if its event time is newer, or equal for a different
//!   ticket ([`merge_ticket`]), so a late redelivery never replaces a fresher ticket and a
//!   redelivery of the stored ticket does not reset when and how it arrived;
//! * a ticket Feishu refused (10012) is *demoted* ([`Store::demote_ticket`]): the next different
//!   ticket replaces it whatever its event time, so a ticket with a bogus event time cannot lock
//!   out the real pushes after it;
//! * an operator may drop a bad ticket ([`Store::delete_ticket`]): the app then has none, and
//!   the next ticket pushed is stored whatever its event time;
//! * every per-tenant field follows the newest event of its kind by event time
//!   ([`apply_tenant_event`]), so a replayed or late event never rolls a tenant back;
//! * a token replaces the stored one only if it expires later ([`token_replaces`]): with several
//!   replicas, a slow replica's older token never overwrites a newer one (fenced writes).

pub mod coordination;
pub mod embedded;
pub mod memory;
pub mod queue;
mod queue_embedded;
mod queue_memory;
pub mod redis;
mod redis_queue;
#[doc(hidden)]
pub mod testing;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{StoreConfig, StoreKind};
use crate::error::Error;
use crate::model::{Order, TenantChange};
use crate::secret::Secret;

pub use coordination::Change;
pub use queue::{ConsumerStats, DeadLetter, Delivery, Enqueue, NewEvent, Selector};

/// How a ticket arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TicketSource {
    /// Feishu's hourly push.
    Push,
    /// A push that followed a resend request of ours.
    Resend,
}

impl TicketSource {
    /// The name the API, the metrics and the demo show (the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            TicketSource::Push => "push",
            TicketSource::Resend => "resend",
        }
    }
}

/// The stored App Ticket of one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRecord {
    pub ticket: Secret,
    /// The push's event time (`ts`), microseconds since the epoch: orders tickets.
    pub event_time_us: i64,
    /// The push's `uuid`.
    pub event_id: String,
    /// When we received it, unix milliseconds.
    pub received_at_ms: u64,
    pub source: TicketSource,
    /// Authentic app_ticket pushes seen for this app, redeliveries of older tickets included.
    #[serde(default)]
    pub pushes_seen: u64,
    /// Feishu refused this ticket (10012): any different ticket replaces it.
    #[serde(default)]
    pub rejected: bool,
}

/// Whether a ticket write replaced the stored ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketWrite {
    Stored,
    /// The stored ticket stays: it is newer, or it is the same ticket redelivered.
    KeptNewer,
}

/// Merge an incoming ticket into the stored one; the count of pushes seen goes up either way.
///
/// The incoming ticket wins when its event time is newer, or equal and the ticket differs (ties
/// go to the later arrival). A redelivery of the stored ticket with the same or an older event
/// time changes nothing else: `received_at` and `source` keep saying when and how the ticket
/// first arrived. A stored ticket Feishu refused gives way to any different ticket, and stays
/// refused if it is pushed again.
pub fn merge_ticket(
    stored: Option<TicketRecord>,
    mut incoming: TicketRecord,
) -> (TicketRecord, TicketWrite) {
    let seen = stored.as_ref().map_or(0, |s| s.pushes_seen) + 1;
    let Some(mut kept) = stored else {
        incoming.pushes_seen = seen;
        return (incoming, TicketWrite::Stored);
    };
    kept.pushes_seen = seen;
    let same = kept.ticket == incoming.ticket;
    let replaces = if kept.rejected {
        !same
    } else {
        incoming.event_time_us > kept.event_time_us
            || (incoming.event_time_us == kept.event_time_us && !same)
    };
    if replaces {
        incoming.pushes_seen = seen;
        incoming.rejected = false;
        (incoming, TicketWrite::Stored)
    } else {
        (kept, TicketWrite::KeptNewer)
    }
}

/// Mark `stored` as refused by Feishu if it still holds `ticket`. Returns whether it changed.
pub fn demote_ticket(stored: &mut TicketRecord, ticket: &Secret) -> bool {
    if stored.rejected || stored.ticket != *ticket {
        return false;
    }
    stored.rejected = true;
    true
}

/// A tenant's install state as the lifecycle events tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantState {
    /// Installed and enabled (`app_open`, `app_status_change: start_by_tenant`, a paid order).
    Active,
    /// Disabled by the tenant or the platform (`app_status_change: stop_by_*`).
    Stopped,
    /// `app_uninstalled`.
    Uninstalled,
}

/// A lifecycle event, as intake hands it to the store.
#[derive(Debug, Clone)]
pub struct TenantEvent {
    pub tenant_key: String,
    pub change: TenantChange,
    pub event_type: String,
    pub event_time_us: i64,
    pub received_at_ms: u64,
}

/// What we know about one tenant of one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub tenant_key: String,
    pub state: TenantState,
    /// The `status` of the last `app_status_change`, if that set the state.
    pub status: Option<String>,
    /// Event time of the event that set `state`, microseconds.
    pub state_time_us: i64,
    pub first_seen_ms: u64,
    pub last_event_type: String,
    /// When the newest event (by event time) arrived, unix milliseconds.
    pub last_event_ms: u64,
    /// Event time of the newest event, microseconds: orders `last_event_type`/`last_event_ms`.
    #[serde(default = "oldest")]
    pub last_event_time_us: i64,
    pub last_order: Option<Order>,
    /// Event time of the `order_paid` that set `last_order`, microseconds.
    #[serde(default = "oldest")]
    pub last_order_time_us: i64,
}

/// Older than any event: records written before a field existed lose to any new event.
fn oldest() -> i64 {
    i64::MIN
}

/// Apply a lifecycle event. Each field follows the newest event that sets it, by event time, so
/// the order of arrival (late deliveries, replays) never rolls a tenant back: the state (with
/// its `status`), the last order, and the last event seen.
pub fn apply_tenant_event(stored: Option<TenantRecord>, ev: &TenantEvent) -> TenantRecord {
    let mut rec = stored.unwrap_or_else(|| TenantRecord {
        tenant_key: ev.tenant_key.clone(),
        state: TenantState::Active,
        status: None,
        state_time_us: i64::MIN,
        first_seen_ms: ev.received_at_ms,
        last_event_type: String::new(),
        last_event_ms: 0,
        last_event_time_us: i64::MIN,
        last_order: None,
        last_order_time_us: i64::MIN,
    });
    if ev.event_time_us >= rec.last_event_time_us {
        rec.last_event_type = ev.event_type.clone();
        rec.last_event_ms = ev.received_at_ms;
        rec.last_event_time_us = ev.event_time_us;
    }
    let (state, status) = match &ev.change {
        TenantChange::Opened => (Some(TenantState::Active), None),
        TenantChange::StatusChanged { status } => {
            let state = match status.as_str() {
                "start_by_tenant" => Some(TenantState::Active),
                s if s.starts_with("stop") => Some(TenantState::Stopped),
                _ => None,
            };
            (state, Some(status.clone()))
        }
        TenantChange::Uninstalled => (Some(TenantState::Uninstalled), None),
        TenantChange::OrderPaid(order) => {
            if ev.event_time_us >= rec.last_order_time_us {
                rec.last_order = Some(order.clone());
                rec.last_order_time_us = ev.event_time_us;
            }
            (None, None)
        }
    };
    if let Some(state) = state {
        if ev.event_time_us >= rec.state_time_us {
            rec.state = state;
            rec.status = status;
            rec.state_time_us = ev.event_time_us;
        }
    }
    rec
}

/// A cached access token, persisted so a restart serves it without calling Feishu.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token: Secret,
    /// When Feishu says it expires, unix milliseconds.
    pub expires_at_ms: u64,
    /// When we fetched it, unix milliseconds.
    pub fetched_at_ms: u64,
}

/// Whether `incoming` may replace the `stored` token: only if it expires later. Feishu's newer
/// token always expires later than the one it replaces, so this keeps the newest token whatever
/// order the writes arrive in; a write of the same token again changes nothing.
pub fn token_replaces(stored: Option<&TokenRecord>, incoming: &TokenRecord) -> bool {
    stored.is_none_or(|s| incoming.expires_at_ms > s.expires_at_ms)
}

/// What a `200` from this store promises, as `GET /v1/apps` (its `store` block), `status` and
/// the start-up log show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durability {
    /// `embedded`, `memory` or `redis`.
    pub kind: String,
    /// A `200` to Feishu means the write is on disk: `true`, `false`, or `null` when the server
    /// would not say (Redis with `CONFIG` refused).
    pub on_disk: Option<bool>,
    /// The Redis server's settings as read at start (`"unknown"` where `CONFIG` is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSettings>,
    /// What an operator should know: each a sentence.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// When the store last came back without its data (a Redis restarted without persistence),
    /// unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_lost_at: Option<u64>,
}

/// The Redis settings that decide what a `200` means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisSettings {
    pub appendonly: String,
    pub appendfsync: String,
    pub maxmemory_policy: String,
    /// A Redis Cluster (`store.cluster = true`).
    #[serde(default)]
    pub cluster: bool,
}

/// A storage failure (the backend's own error, as text).
#[derive(Debug, Clone)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    pub fn new(e: impl fmt::Display) -> Self {
        StoreError(e.to_string())
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::store(e)
    }
}

/// The one store handle. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    Memory(memory::MemoryStore),
    Embedded(embedded::EmbeddedStore),
    Redis(self::redis::RedisStore),
}

impl Store {
    /// Open the backend the config names. Redis: connect, read the server's durability
    /// settings, subscribe to the change channel; an unreachable Redis is an error.
    pub async fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        if config.kind == StoreKind::Redis {
            return self::redis::RedisStore::open(config)
                .await
                .map(Store::Redis);
        }
        let config = config.clone();
        tokio::task::spawn_blocking(move || Store::open_blocking(&config))
            .await
            .map_err(StoreError::new)?
    }

    /// Open the backend on the calling thread. `main` does this before serving: the file's
    /// one-off set-up allocations then come from the main thread's heap, which is returned to the
    /// system, instead of pinning a worker thread's arena (about 1 MiB of resident memory).
    /// Redis is opened with [`Store::open`] (it needs the runtime).
    pub fn open_blocking(config: &StoreConfig) -> Result<Store, StoreError> {
        match config.kind {
            StoreKind::Memory => Ok(Store::Memory(memory::MemoryStore::default())),
            StoreKind::Embedded => embedded::EmbeddedStore::open(&config.path).map(Store::Embedded),
            StoreKind::Redis => Err(StoreError::new(
                "the redis backend is opened with Store::open, on the runtime",
            )),
        }
    }

    /// What a `200` from this store promises (see [`Durability`]).
    pub fn durability(&self) -> Durability {
        match self {
            Store::Memory(_) => Durability {
                kind: "memory".into(),
                on_disk: Some(false),
                redis: None,
                warnings: vec![
                    "store.kind = \"memory\": nothing survives a restart (tests and throwaway runs only)"
                        .into(),
                ],
                data_lost_at: None,
            },
            Store::Embedded(_) => Durability {
                kind: "embedded".into(),
                on_disk: Some(true),
                redis: None,
                warnings: Vec::new(),
                data_lost_at: None,
            },
            Store::Redis(r) => r.durability(),
        }
    }

    /// Store `incoming` unless a newer ticket is already stored; durable before it returns.
    pub async fn put_ticket(
        &self,
        app_id: &str,
        incoming: TicketRecord,
    ) -> Result<TicketWrite, StoreError> {
        let written = match self {
            Store::Memory(m) => m.check().map(|()| m.put_ticket(app_id, incoming)),
            Store::Embedded(e) => e.put_ticket(app_id, incoming).await,
            Store::Redis(r) => return r.put_ticket(app_id, incoming).await,
        }?;
        if written == TicketWrite::Stored {
            self.notify(Change::TicketStored {
                app_id: app_id.to_string(),
            });
        }
        Ok(written)
    }

    pub async fn ticket(&self, app_id: &str) -> Result<Option<TicketRecord>, StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.ticket(app_id)),
            Store::Embedded(e) => e.ticket(app_id).await,
            Store::Redis(r) => r.ticket(app_id).await,
        }
    }

    /// Mark the stored ticket as refused by Feishu (10012) if it is still `ticket`, so the next
    /// different ticket replaces it whatever its event time; durable before it returns. Returns
    /// whether the stored ticket was demoted now.
    pub async fn demote_ticket(&self, app_id: &str, ticket: &Secret) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.demote_ticket(app_id, ticket)),
            Store::Embedded(e) => e.demote_ticket(app_id, ticket).await,
            Store::Redis(r) => r.demote_ticket(app_id, ticket).await,
        }
    }

    /// Drop the stored ticket of `app_id` (an operator's `DELETE /v1/apps/{app_id}/ticket`);
    /// durable before it returns. Returns the record dropped (`None`: none was stored). A drop is
    /// announced on [`Store::changes`] as [`Change::TicketDeleted`]; nothing else is (reads go
    /// to the store, so no replica can serve the dropped ticket afterwards).
    pub async fn delete_ticket(&self, app_id: &str) -> Result<Option<TicketRecord>, StoreError> {
        let dropped = match self {
            Store::Memory(m) => m.check().map(|()| m.delete_ticket(app_id)),
            Store::Embedded(e) => e.delete_ticket(app_id).await,
            // Redis announces inside the write itself.
            Store::Redis(r) => return r.delete_ticket(app_id).await,
        }?;
        if dropped.is_some() {
            self.notify(Change::TicketDeleted {
                app_id: app_id.to_string(),
            });
        }
        Ok(dropped)
    }

    /// Apply a lifecycle event to the tenant's record; durable before it returns.
    pub async fn record_tenant_event(
        &self,
        app_id: &str,
        ev: TenantEvent,
    ) -> Result<TenantRecord, StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.record_tenant_event(app_id, &ev)),
            Store::Embedded(e) => e.record_tenant_event(app_id, ev).await,
            Store::Redis(r) => r.record_tenant_event(app_id, ev).await,
        }
    }

    /// Every tenant of an app, ordered by tenant_key.
    pub async fn tenants(&self, app_id: &str) -> Result<Vec<TenantRecord>, StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.tenants(app_id)),
            Store::Embedded(e) => e.tenants(app_id).await,
            Store::Redis(r) => r.tenants(app_id).await,
        }
    }

    /// Persist a token under `key` (the broker's key: `app/{app_id}` or `tenant/{app_id}/{tenant_key}`),
    /// unless the stored token expires as late or later ([`token_replaces`]: fenced, so a slow
    /// writer never replaces a newer token).
    pub async fn put_token(&self, key: &str, record: TokenRecord) -> Result<(), StoreError> {
        self.put_token_if_later(key, record).await.map(drop)
    }

    /// [`Store::put_token`], saying whether the token was stored (`false`: the stored token
    /// expires as late or later, and stays). A stored token is announced on [`Store::changes`].
    pub async fn put_token_if_later(
        &self,
        key: &str,
        record: TokenRecord,
    ) -> Result<bool, StoreError> {
        let expires_at_ms = record.expires_at_ms;
        let stored = match self {
            Store::Memory(m) => m.check().map(|()| m.put_token(key, record)),
            Store::Embedded(e) => e.put_token(key, record).await,
            // Redis announces inside the write itself.
            Store::Redis(r) => return r.put_token(key, record).await,
        }?;
        if stored {
            self.notify(Change::TokenStored {
                key: key.to_string(),
                expires_at_ms,
            });
        }
        Ok(stored)
    }

    pub async fn token(&self, key: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.token(key)),
            Store::Embedded(e) => e.token(key).await,
            Store::Redis(r) => r.token(key).await,
        }
    }

    /// Delete the token under `key` if it is still `token` (compare-and-delete).
    pub async fn delete_token(&self, key: &str, token: &Secret) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.delete_token(key, token)),
            Store::Embedded(e) => e.delete_token(key, token).await,
            // Redis announces inside the write itself.
            Store::Redis(r) => return r.delete_token(key, token).await,
        }?;
        self.notify(Change::TokenInvalidated {
            key: key.to_string(),
        });
        Ok(())
    }

    /// Delete every token that expired at or before `now_ms` (a bounded store: tenant tokens
    /// nobody asks for again must not pile up). Returns how many were deleted.
    pub async fn delete_expired_tokens(&self, now_ms: u64) -> Result<usize, StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.delete_expired_tokens(now_ms)),
            Store::Embedded(e) => e.delete_expired_tokens(now_ms).await,
            Store::Redis(r) => r.delete_expired_tokens(now_ms).await,
        }
    }

    /// Queue `event` for each of `consumers` (the event hand-off, see [`queue`]): atomic dedupe
    /// on `(app_id, event_id)` until `dedupe_until_ms`, the body stored once, one delivery per
    /// consumer due at once, all in one write that is durable (fsynced, group-committed) before
    /// this returns — intake answers Feishu `200` only then. A duplicate within the window
    /// stores nothing; with no consumers nothing is stored (and the answer is `Queued`).
    pub async fn enqueue_event<S: AsRef<str>>(
        &self,
        event: NewEvent,
        consumers: &[S],
    ) -> Result<Enqueue, StoreError> {
        let consumers: Vec<String> = consumers.iter().map(|c| c.as_ref().to_string()).collect();
        match self {
            Store::Memory(m) => m.queue(|q| q.enqueue(event, consumers)),
            Store::Embedded(e) => e.enqueue_event(event, consumers).await,
            Store::Redis(r) => r.enqueue_event(event, consumers).await,
        }
    }

    /// Claim up to `limit` of `consumer`'s deliveries that are due at `now_ms` (oldest due
    /// first), leasing each until `now_ms + lease_ms`: without an outcome by then it is due
    /// again (a crashed attempt comes back by itself). Each claim counts an attempt.
    pub async fn claim_due(
        &self,
        consumer: &str,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        match self {
            Store::Memory(m) => m.queue(|q| q.claim(consumer, now_ms, lease_ms, limit)),
            Store::Embedded(e) => e.claim_due(consumer, now_ms, lease_ms, limit).await,
            Store::Redis(r) => r.claim_due(consumer, now_ms, lease_ms, limit).await,
        }
    }

    /// The attempt `claimed` succeeded. Not fsynced (a lost mark means one duplicate delivery
    /// after the lease). Applies only while `claimed`'s lease is the delivery's current one: an
    /// outcome that arrives after the lease ran out and the delivery was claimed again, or was
    /// redelivered by an operator, changes nothing (a fencing token, so a stale attempt never
    /// overwrites a newer one). Returns whether the delivery changed.
    pub async fn delivered(&self, claimed: &Delivery, now_ms: u64) -> Result<bool, StoreError> {
        let outcome = queue::Outcome::Delivered { now_ms };
        self.outcome(claimed, outcome).await
    }

    /// The attempt `claimed` failed: due again at `next_attempt_ms`. Not fsynced; fenced by the
    /// lease like [`Store::delivered`].
    pub async fn retry_later(
        &self,
        claimed: &Delivery,
        next_attempt_ms: u64,
        last_error: &str,
    ) -> Result<bool, StoreError> {
        let outcome = queue::Outcome::Retry {
            next_ms: next_attempt_ms,
            error: last_error.to_string(),
        };
        self.outcome(claimed, outcome).await
    }

    /// The last attempt `claimed` failed: a dead letter, kept for `retention`. Not fsynced;
    /// fenced by the lease like [`Store::delivered`].
    pub async fn dead(
        &self,
        claimed: &Delivery,
        now_ms: u64,
        last_error: &str,
    ) -> Result<bool, StoreError> {
        let outcome = queue::Outcome::Dead {
            now_ms,
            error: last_error.to_string(),
        };
        self.outcome(claimed, outcome).await
    }

    async fn outcome(
        &self,
        claimed: &Delivery,
        outcome: queue::Outcome,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => m.queue(|q| q.outcome(claimed, outcome)),
            Store::Embedded(e) => e.outcome(claimed, outcome).await,
            Store::Redis(r) => r.outcome(claimed, outcome).await,
        }
    }

    /// A consumer's figures (counters kept with the deliveries: no scan).
    pub async fn consumer_stats(&self, consumer: &str) -> Result<ConsumerStats, StoreError> {
        match self {
            Store::Memory(m) => m.queue(|q| q.stats(consumer)),
            Store::Embedded(e) => e.consumer_stats(consumer).await,
            Store::Redis(r) => r.consumer_stats(consumer).await,
        }
    }

    /// A consumer's dead letters, newest first, at most `limit`.
    pub async fn dead_letters(
        &self,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        match self {
            Store::Memory(m) => m.queue(|q| q.dead_letters(consumer, limit)),
            Store::Embedded(e) => e.dead_letters(consumer, limit).await,
            Store::Redis(r) => r.dead_letters(consumer, limit).await,
        }
    }

    /// Queue the selected retained deliveries of `consumer` again, due at `now_ms`, attempts
    /// reset; durable before it returns. Returns how many.
    pub async fn redeliver(
        &self,
        consumer: &str,
        selector: Selector,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        match self {
            Store::Memory(m) => m.queue(|q| q.redeliver(consumer, &selector, now_ms)),
            Store::Embedded(e) => e.redeliver(consumer, selector, now_ms).await,
            Store::Redis(r) => r.redeliver(consumer, selector, now_ms).await,
        }
    }

    /// Delete dedupe marks expired at `now_ms` and delivered/dead deliveries finished at or
    /// before `now_ms - retention_ms` (an event's body goes with its last delivery), in chunks
    /// so other writes go in between. Returns how many marks and deliveries were deleted.
    pub async fn purge_forwarding(
        &self,
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<usize, StoreError> {
        match self {
            Store::Memory(m) => m.queue(|q| q.purge(now_ms, retention_ms)),
            Store::Embedded(e) => e.purge_forwarding(now_ms, retention_ms).await,
            Store::Redis(r) => r.purge_forwarding(now_ms, retention_ms).await,
        }
    }

    /// Is the backend usable for writes? (Readiness.) The embedded backend commits a small
    /// write through its writer, so a broken file, a full disk or a stuck writer all fail it;
    /// Redis answers a small write within its command timeout (a down, hung, read-only or full
    /// Redis fails it).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => m.check(),
            Store::Embedded(e) => e.ping().await,
            Store::Redis(r) => r.ping().await,
        }
    }

    /// Close the backend at shutdown, after the server has stopped: the writes queued so far
    /// are committed, the file is closed, and no async worker is blocked meanwhile. Later
    /// operations on any clone of this handle fail.
    pub async fn close(&self) {
        match self {
            Store::Memory(_) => {}
            Store::Embedded(e) => e.close().await,
            Store::Redis(r) => r.close(),
        }
    }
}

/// The contract every backend passes: run by each backend's tests.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;

    pub fn ticket(value: &str, time_us: i64) -> TicketRecord {
        TicketRecord {
            ticket: Secret::new(value),
            event_time_us: time_us,
            event_id: format!("uuid-{value}"),
            received_at_ms: 1000,
            source: TicketSource::Push,
            pushes_seen: 0,
            rejected: false,
        }
    }

    fn tenant_event(key: &str, change: TenantChange, time_us: i64) -> TenantEvent {
        TenantEvent {
            tenant_key: key.to_string(),
            change,
            event_type: "x".to_string(),
            event_time_us: time_us,
            received_at_ms: 5,
        }
    }

    pub async fn run(store: &Store) {
        store.ping().await.unwrap();
        assert_eq!(store.ticket("cli_a").await.unwrap(), None);

        // Newest by event time wins; a late redelivery does not replace it.
        assert_eq!(
            store.put_ticket("cli_a", ticket("t2", 200)).await.unwrap(),
            TicketWrite::Stored
        );
        assert_eq!(
            store.put_ticket("cli_a", ticket("t1", 100)).await.unwrap(),
            TicketWrite::KeptNewer
        );
        let got = store.ticket("cli_a").await.unwrap().unwrap();
        assert_eq!(got.ticket.expose(), "t2");
        assert_eq!(got.pushes_seen, 2);
        assert_eq!(
            store.put_ticket("cli_a", ticket("t3", 300)).await.unwrap(),
            TicketWrite::Stored
        );
        let got = store.ticket("cli_a").await.unwrap().unwrap();
        assert_eq!(got.ticket.expose(), "t3");
        assert_eq!(got.pushes_seen, 3);
        // Apps are independent.
        assert_eq!(store.ticket("cli_b").await.unwrap(), None);

        // Tenants: state follows the newest event, orders are kept.
        store
            .record_tenant_event("cli_a", tenant_event("t-b", TenantChange::Opened, 10))
            .await
            .unwrap();
        store
            .record_tenant_event("cli_a", tenant_event("t-a", TenantChange::Uninstalled, 30))
            .await
            .unwrap();
        // An older "opened" arriving late does not resurrect an uninstalled tenant.
        let rec = store
            .record_tenant_event("cli_a", tenant_event("t-a", TenantChange::Opened, 20))
            .await
            .unwrap();
        assert_eq!(rec.state, TenantState::Uninstalled);
        let order = Order {
            order_id: "o1".into(),
            price_plan_type: Some("per_year".into()),
            buy_type: Some("buy".into()),
            seats: Some(10),
            pay_time: None,
        };
        store
            .record_tenant_event(
                "cli_a",
                tenant_event("t-b", TenantChange::OrderPaid(order.clone()), 40),
            )
            .await
            .unwrap();
        store
            .record_tenant_event("cli_other", tenant_event("t-z", TenantChange::Opened, 1))
            .await
            .unwrap();
        let tenants = store.tenants("cli_a").await.unwrap();
        let keys: Vec<&str> = tenants.iter().map(|t| t.tenant_key.as_str()).collect();
        assert_eq!(keys, ["t-a", "t-b"]);
        assert_eq!(tenants[1].state, TenantState::Active);
        assert_eq!(tenants[1].last_order.as_ref(), Some(&order));
        assert_eq!(store.tenants("cli_none").await.unwrap(), vec![]);

        // Tokens: put, get, compare-and-delete.
        let record = |v: &str| TokenRecord {
            token: Secret::new(v),
            expires_at_ms: 9_000,
            fetched_at_ms: 1_000,
        };
        assert_eq!(store.token("app/cli_a").await.unwrap(), None);
        store.put_token("app/cli_a", record("a-1")).await.unwrap();
        store
            .put_token("tenant/cli_a/t", record("t-1"))
            .await
            .unwrap();
        assert_eq!(store.token("app/cli_a").await.unwrap(), Some(record("a-1")));
        store
            .delete_token("app/cli_a", &Secret::new("a-0"))
            .await
            .unwrap();
        assert_eq!(store.token("app/cli_a").await.unwrap(), Some(record("a-1")));
        store
            .delete_token("app/cli_a", &Secret::new("a-1"))
            .await
            .unwrap();
        assert_eq!(store.token("app/cli_a").await.unwrap(), None);
        assert_eq!(
            store.token("tenant/cli_a/t").await.unwrap(),
            Some(record("t-1"))
        );

        token_writes_are_fenced(store).await;
        demoted_ticket_gives_way_to_any_different_ticket(store).await;
        redelivered_ticket_keeps_when_and_how_it_arrived(store).await;
        deleted_ticket_is_gone(store).await;
        replayed_order_paid_does_not_roll_back_last_order(store).await;
        expired_tokens_are_deleted(store).await;
        forwarding::run(store).await;
    }

    /// Issue 10: with several replicas, a slow replica's older token must never replace a newer
    /// one (WxJava and friends let the last writer win).
    async fn token_writes_are_fenced(store: &Store) {
        let key = "app/cli_fence";
        let record = |v: &str, expires_at_ms| TokenRecord {
            token: Secret::new(v),
            expires_at_ms,
            fetched_at_ms: 1,
        };
        assert!(store
            .put_token_if_later(key, record("new", 20_000))
            .await
            .unwrap());
        assert!(!store
            .put_token_if_later(key, record("old", 10_000))
            .await
            .unwrap());
        assert!(!store
            .put_token_if_later(key, record("same-expiry", 20_000))
            .await
            .unwrap());
        store.put_token(key, record("old", 10_000)).await.unwrap();
        assert_eq!(store.token(key).await.unwrap(), Some(record("new", 20_000)));
        assert!(store
            .put_token_if_later(key, record("newer", 20_001))
            .await
            .unwrap());
        // Once invalidated, the next token is stored whatever its expiry.
        store
            .delete_token(key, &Secret::new("newer"))
            .await
            .unwrap();
        assert!(store
            .put_token_if_later(key, record("after", 15_000))
            .await
            .unwrap());
        assert_eq!(
            store.token(key).await.unwrap(),
            Some(record("after", 15_000))
        );
    }

    /// Issue 8, defect 5: a ticket with a far-future event time used to lock out every real push
    /// for good; once Feishu refuses it, the next different ticket must replace it.
    async fn demoted_ticket_gives_way_to_any_different_ticket(store: &Store) {
        let app = "cli_demote";
        let bogus = ticket("bogus", i64::MAX / 2);
        store.put_ticket(app, bogus.clone()).await.unwrap();
        assert_eq!(
            store.put_ticket(app, ticket("real-1", 500)).await.unwrap(),
            TicketWrite::KeptNewer
        );
        // Only the ticket Feishu refused is demoted.
        assert!(!store
            .demote_ticket(app, &Secret::new("real-1"))
            .await
            .unwrap());
        assert!(store.demote_ticket(app, &bogus.ticket).await.unwrap());
        assert!(!store.demote_ticket(app, &bogus.ticket).await.unwrap());
        assert!(store.ticket(app).await.unwrap().unwrap().rejected);
        // The refused ticket pushed again stays refused.
        assert_eq!(
            store.put_ticket(app, bogus.clone()).await.unwrap(),
            TicketWrite::KeptNewer
        );
        assert!(store.ticket(app).await.unwrap().unwrap().rejected);
        // Any different ticket replaces it, even with an older event time.
        assert_eq!(
            store.put_ticket(app, ticket("real-2", 600)).await.unwrap(),
            TicketWrite::Stored
        );
        let got = store.ticket(app).await.unwrap().unwrap();
        assert_eq!(got.ticket.expose(), "real-2");
        assert!(!got.rejected);
        assert!(!store
            .demote_ticket("cli_none", &bogus.ticket)
            .await
            .unwrap());
    }

    /// Issue 8, defect 11: a redelivery of the stored ticket with an equal event time reset
    /// `received_at` and `source`.
    async fn redelivered_ticket_keeps_when_and_how_it_arrived(store: &Store) {
        let app = "cli_redeliver";
        let mut first = ticket("same", 700);
        first.source = TicketSource::Resend;
        first.received_at_ms = 1_000;
        store.put_ticket(app, first).await.unwrap();
        let mut again = ticket("same", 700);
        again.received_at_ms = 9_000;
        assert_eq!(
            store.put_ticket(app, again).await.unwrap(),
            TicketWrite::KeptNewer
        );
        let got = store.ticket(app).await.unwrap().unwrap();
        assert_eq!(
            (got.received_at_ms, got.source, got.pushes_seen),
            (1_000, TicketSource::Resend, 2)
        );
        // A different ticket with the same event time is the later arrival: it wins.
        assert_eq!(
            store.put_ticket(app, ticket("other", 700)).await.unwrap(),
            TicketWrite::Stored
        );
    }

    /// Issue 8, defect 6: a replayed old `order_paid` rolled `last_order` back, and any old
    /// event rewrote the last event seen.
    /// Issue 12: an operator drops a bad ticket (say, a fake one `push ticket` stored). The
    /// record comes back whole, the app has none afterwards, other apps keep theirs, and the
    /// next push is stored even with an older event time (nothing is left to be newer than).
    async fn deleted_ticket_is_gone(store: &Store) {
        let app = "cli_delete";
        assert_eq!(store.delete_ticket(app).await.unwrap(), None);
        let mut fake = ticket("fake", 900);
        fake.source = TicketSource::Resend;
        store.put_ticket(app, fake.clone()).await.unwrap();
        store
            .put_ticket("cli_delete_other", ticket("kept", 1))
            .await
            .unwrap();
        let dropped = store
            .delete_ticket(app)
            .await
            .unwrap()
            .expect("the dropped record");
        assert_eq!(
            (
                dropped.ticket.expose(),
                dropped.event_time_us,
                dropped.source
            ),
            ("fake", 900, TicketSource::Resend)
        );
        assert_eq!(dropped.pushes_seen, 1);
        assert_eq!(store.ticket(app).await.unwrap(), None);
        assert_eq!(store.delete_ticket(app).await.unwrap(), None);
        let other = store.ticket("cli_delete_other").await.unwrap().unwrap();
        assert_eq!(other.ticket.expose(), "kept");
        assert_eq!(
            store.put_ticket(app, ticket("real", 100)).await.unwrap(),
            TicketWrite::Stored
        );
        let got = store.ticket(app).await.unwrap().unwrap();
        assert_eq!((got.ticket.expose(), got.pushes_seen), ("real", 1));
    }

    async fn replayed_order_paid_does_not_roll_back_last_order(store: &Store) {
        let app = "cli_orders";
        let order = |id: &str| Order {
            order_id: id.into(),
            price_plan_type: None,
            buy_type: None,
            seats: None,
            pay_time: None,
        };
        let mut new = tenant_event("t", TenantChange::OrderPaid(order("new")), 2_000);
        new.event_type = "order_paid".into();
        store.record_tenant_event(app, new).await.unwrap();
        let mut old = tenant_event("t", TenantChange::OrderPaid(order("old")), 1_000);
        old.event_type = "order_paid_replayed".into();
        let rec = store.record_tenant_event(app, old).await.unwrap();
        assert_eq!(rec.last_order.unwrap().order_id, "new");
        assert_eq!(rec.last_event_type, "order_paid");
        let mut later = tenant_event("t", TenantChange::OrderPaid(order("later")), 3_000);
        later.event_type = "order_paid".into();
        let rec = store.record_tenant_event(app, later).await.unwrap();
        assert_eq!(rec.last_order.unwrap().order_id, "later");
    }

    /// Issue 8, defect 9: tokens were never pruned from the store.
    async fn expired_tokens_are_deleted(store: &Store) {
        let record = |v: &str, expires_at_ms| TokenRecord {
            token: Secret::new(v),
            expires_at_ms,
            fetched_at_ms: 0,
        };
        store
            .put_token("prune/old", record("o", 100))
            .await
            .unwrap();
        store
            .put_token("prune/edge", record("e", 200))
            .await
            .unwrap();
        store
            .put_token("prune/live", record("l", 201))
            .await
            .unwrap();
        let deleted = store.delete_expired_tokens(200).await.unwrap();
        // Earlier parts of the contract left tokens expiring at 9_000: they stay.
        assert_eq!(deleted, 2);
        assert_eq!(store.token("prune/old").await.unwrap(), None);
        assert_eq!(store.token("prune/edge").await.unwrap(), None);
        assert!(store.token("prune/live").await.unwrap().is_some());
        assert_eq!(store.delete_expired_tokens(200).await.unwrap(), 0);
    }

    /// The event hand-off queue's contract (issue 9).
    pub(crate) mod forwarding {
        use bytes::Bytes;

        use super::super::*;

        pub fn event(app: &str, id: &str, received_at_ms: u64) -> NewEvent {
            // Not UTF-8, with a NUL: the body is bytes, stored and returned exactly.
            let mut body = format!("{{\"id\":\"{id}\",\"app\":\"{app}\"}}\0\u{e9}\n").into_bytes();
            body.extend_from_slice(&[0xff, 0xfe]);
            NewEvent {
                app_id: app.to_string(),
                event_id: id.to_string(),
                event_type: "im.message.receive_v1".to_string(),
                tenant_key: Some("t-1".to_string()),
                received_at_ms,
                dedupe_until_ms: received_at_ms + 1_000,
                body: Bytes::from(body),
            }
        }

        fn ids(claimed: &[Delivery]) -> Vec<&str> {
            claimed.iter().map(|d| d.event_id.as_str()).collect()
        }

        fn find<'a>(claimed: &'a [Delivery], id: &str) -> &'a Delivery {
            claimed.iter().find(|d| d.event_id == id).unwrap()
        }

        pub async fn run(store: &Store) {
            dedupe(store).await;
            claims_and_leases(store).await;
            outcomes_dead_letters_and_redeliver(store).await;
            purge(store).await;
        }

        async fn dedupe(store: &Store) {
            let q = |ev: NewEvent, consumers: &'static [&'static str]| {
                let store = store.clone();
                async move { store.enqueue_event(ev, consumers).await.unwrap() }
            };
            assert_eq!(
                q(event("cli_q", "e1", 10_000), &["dd"]).await,
                Enqueue::Queued
            );
            // Feishu's redelivery within the window: acknowledged, not queued again.
            assert_eq!(
                q(event("cli_q", "e1", 10_500), &["dd"]).await,
                Enqueue::Duplicate
            );
            // The same id from another app is another event.
            assert_eq!(
                q(event("cli_r", "e1", 10_500), &["dd"]).await,
                Enqueue::Queued
            );
            // No consumers: nothing stored, not even a dedupe mark.
            assert_eq!(q(event("cli_q", "e2", 10_000), &[]).await, Enqueue::Queued);
            assert_eq!(
                q(event("cli_q", "e2", 10_001), &["dd"]).await,
                Enqueue::Queued
            );
            // A consumer named twice gets one delivery.
            assert_eq!(
                q(event("cli_q", "e3", 10_002), &["dd", "dd"]).await,
                Enqueue::Queued
            );
            let stats = store.consumer_stats("dd").await.unwrap();
            assert_eq!(
                (stats.pending, stats.oldest_pending_received_at_ms),
                (4, Some(10_000))
            );
            // The body enqueued is exactly the body claimed, with the event's fields.
            let claimed = store.claim_due("dd", 20_000, 60_000, 10).await.unwrap();
            assert_eq!(claimed.len(), 4);
            let first = claimed
                .iter()
                .find(|d| d.app_id == "cli_q" && d.event_id == "e1")
                .unwrap();
            let sent = event("cli_q", "e1", 10_000);
            assert_eq!(first.body, sent.body);
            assert_eq!(
                (
                    first.consumer.as_str(),
                    first.event_type.as_str(),
                    first.tenant_key.as_deref()
                ),
                ("dd", "im.message.receive_v1", Some("t-1"))
            );
            assert_eq!(
                (first.attempt, first.received_at_ms, first.lease_until_ms),
                (1, 10_000, 80_000)
            );
            let other = claimed.iter().find(|d| d.app_id == "cli_r").unwrap();
            assert_eq!(other.body, event("cli_r", "e1", 0).body);
            // Still a duplicate until the window ends (dedupe_until = received + 1000)…
            assert_eq!(
                q(event("cli_q", "e1", 10_999), &["dd"]).await,
                Enqueue::Duplicate
            );
            // …then the id is new again: delivered afresh (attempts start over).
            assert!(store.delivered(first, 20_001).await.unwrap());
            assert_eq!(
                q(event("cli_q", "e1", 11_000), &["dd"]).await,
                Enqueue::Queued
            );
            let stats = store.consumer_stats("dd").await.unwrap();
            assert_eq!((stats.pending, stats.delivered), (4, 0));
            let again = store.claim_due("dd", 20_002, 1, 10).await.unwrap();
            assert_eq!(ids(&again), ["e1"]);
            assert_eq!((again[0].attempt, again[0].received_at_ms), (1, 11_000));
        }

        async fn claims_and_leases(store: &Store) {
            for (id, at) in [("a", 100), ("b", 200), ("c", 300)] {
                let mut ev = event("cli_l", id, at);
                ev.tenant_key = None;
                ev.event_type = format!("type.{id}");
                assert_eq!(
                    store.enqueue_event(ev, &["lease", "other"]).await.unwrap(),
                    Enqueue::Queued
                );
            }
            // Due entries, oldest due first; "c" is not due yet.
            let claimed = store.claim_due("lease", 250, 1_000, 10).await.unwrap();
            assert_eq!(ids(&claimed), ["a", "b"]);
            assert_eq!(claimed[1].event_type, "type.b");
            assert_eq!(claimed[1].tenant_key, None);
            // Leased: not claimed again until the lease ends (250 + 1000).
            assert_eq!(
                ids(&store.claim_due("lease", 300, 1_000, 10).await.unwrap()),
                ["c"]
            );
            assert!(store
                .claim_due("lease", 1_249, 1_000, 10)
                .await
                .unwrap()
                .is_empty());
            // The lease ran out (a crashed attempt): claimed again, one attempt more.
            let again = store.claim_due("lease", 1_250, 1_000, 1).await.unwrap();
            assert_eq!(ids(&again), ["a"]);
            assert_eq!(again[0].attempt, 2);
            assert_eq!(
                ids(&store.claim_due("lease", 1_250, 1_000, 5).await.unwrap()),
                ["b"]
            );
            // Consumers are independent.
            let other = store.claim_due("other", 1_000, 1_000, 10).await.unwrap();
            assert_eq!(ids(&other), ["a", "b", "c"]);
            assert!(other.iter().all(|d| d.attempt == 1));
            assert!(store
                .claim_due("nobody", 1_000, 1_000, 10)
                .await
                .unwrap()
                .is_empty());
        }

        async fn outcomes_dead_letters_and_redeliver(store: &Store) {
            let c = "out";
            for (id, at) in [("a", 100), ("b", 200), ("c", 300), ("d", 400)] {
                store
                    .enqueue_event(event("cli_o", id, at), &[c])
                    .await
                    .unwrap();
            }
            let first = store.claim_due(c, 1_000, 100, 10).await.unwrap();
            assert_eq!(first.len(), 4);
            // Retry: due again at the time given, not before.
            assert!(store
                .retry_later(find(&first, "a"), 5_000, "HTTP 500")
                .await
                .unwrap());
            // b, c and d are claimed again (their leases ended at 1_100), "a" is not due yet.
            let others = store.claim_due(c, 4_999, 10_000, 10).await.unwrap();
            assert_eq!(ids(&others), ["b", "c", "d"]);
            let stats = store.consumer_stats(c).await.unwrap();
            assert_eq!(stats.last_error.as_deref(), Some("HTTP 500"));
            let retried = store.claim_due(c, 5_000, 10_000, 10).await.unwrap();
            assert!(
                retried.iter().any(|d| d.event_id == "a" && d.attempt == 2),
                "{retried:?}"
            );
            // The lease is a fence: the first attempt at "a" was claimed again since, so its
            // late outcome changes nothing (nor does one for "c", whose lease ran out at 1_100
            // and which was claimed again at 4_999).
            assert!(!store.delivered(find(&first, "a"), 5_050).await.unwrap());
            assert!(!store.dead(find(&first, "c"), 5_050, "late").await.unwrap());
            // Delivered: once; a late outcome for it changes nothing.
            let b = find(&others, "b");
            assert!(store.delivered(b, 5_100).await.unwrap());
            assert!(!store.delivered(b, 5_200).await.unwrap());
            assert!(!store.retry_later(b, 9_000, "late").await.unwrap());
            assert!(!store.dead(b, 9_000, "late").await.unwrap());
            let mut unknown = b.clone();
            unknown.event_id = "zz".into();
            assert!(!store.delivered(&unknown, 5_200).await.unwrap());
            unknown.event_id = "b".into();
            unknown.app_id = "cli_other".into();
            assert!(!store.delivered(&unknown, 5_200).await.unwrap());
            // Dead letters, newest first.
            assert!(store
                .dead(find(&retried, "a"), 6_000, "gave up on a")
                .await
                .unwrap());
            assert!(store
                .dead(find(&others, "c"), 7_000, "gave up on c")
                .await
                .unwrap());
            let dead = store.dead_letters(c, 10).await.unwrap();
            assert_eq!(
                dead.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(),
                ["c", "a"]
            );
            assert_eq!(
                dead[1],
                DeadLetter {
                    event_id: "a".into(),
                    app_id: "cli_o".into(),
                    event_type: "im.message.receive_v1".into(),
                    attempts: 2,
                    last_error: "gave up on a".into(),
                    received_at_ms: 100,
                    dead_at_ms: 6_000,
                }
            );
            assert_eq!(store.dead_letters(c, 1).await.unwrap().len(), 1);
            assert!(store.dead_letters("lease", 10).await.unwrap().is_empty());
            assert_eq!(
                store.consumer_stats(c).await.unwrap(),
                ConsumerStats {
                    pending: 1,
                    dead: 2,
                    delivered: 1,
                    oldest_pending_received_at_ms: Some(400),
                    last_delivery_at_ms: Some(5_100),
                    last_error: Some("gave up on c".into()),
                }
            );
            // Redeliver every dead letter: due now, attempts reset.
            assert_eq!(store.redeliver(c, Selector::Dead, 8_000).await.unwrap(), 2);
            assert!(store.dead_letters(c, 10).await.unwrap().is_empty());
            assert_eq!(store.redeliver(c, Selector::Dead, 8_000).await.unwrap(), 0);
            let back = store.claim_due(c, 8_000, 100_000, 10).await.unwrap();
            assert_eq!(ids(&back), ["a", "c"]);
            assert!(back.iter().all(|d| d.attempt == 1));
            // By ids (a delivered one named twice, an unknown one).
            let ids_selector = Selector::Ids(vec!["b".into(), "nope".into(), "b".into()]);
            assert_eq!(store.redeliver(c, ids_selector, 8_100).await.unwrap(), 1);
            let b_again = store.claim_due(c, 8_100, 100_000, 10).await.unwrap();
            assert_eq!(ids(&b_again), ["b"]);
            // A window of received times (inclusive), whatever the state.
            for d in back.iter().chain(&b_again).chain([find(&others, "d")]) {
                assert!(store.delivered(d, 9_000).await.unwrap(), "{d:?}");
            }
            let window = Selector::Window {
                since_ms: 200,
                until_ms: 300,
            };
            assert_eq!(store.redeliver(c, window, 9_500).await.unwrap(), 2);
            assert_eq!(
                ids(&store.claim_due(c, 9_500, 100, 10).await.unwrap()),
                ["b", "c"]
            );
            let stats = store.consumer_stats(c).await.unwrap();
            assert_eq!((stats.pending, stats.delivered, stats.dead), (2, 2, 0));
            assert_eq!(stats.oldest_pending_received_at_ms, Some(200));
            // Other consumers' deliveries are not touched.
            assert_eq!(
                store
                    .redeliver("nobody", Selector::Dead, 9_500)
                    .await
                    .unwrap(),
                0
            );
        }

        async fn purge(store: &Store) {
            let c = "purge";
            let base = 1_000_000;
            for (id, at) in [
                ("old", base),
                ("new", base + 10),
                ("dead", base + 20),
                ("live", base + 30),
            ] {
                store
                    .enqueue_event(event("cli_p", id, at), &[c, "keep"])
                    .await
                    .unwrap();
            }
            let claimed = store.claim_due(c, base + 100, 10, 10).await.unwrap();
            let outcome = |id| find(&claimed, id);
            assert!(store.delivered(outcome("old"), base + 100).await.unwrap());
            assert!(store.delivered(outcome("new"), base + 500).await.unwrap());
            assert!(store.dead(outcome("dead"), base + 200, "x").await.unwrap());
            // Retention 300: finished at or before base + 200 goes; the dedupe marks
            // (received + 1000) are still live at base + 500.
            store.purge_forwarding(base + 500, 300).await.unwrap();
            let stats = store.consumer_stats(c).await.unwrap();
            assert_eq!((stats.pending, stats.delivered, stats.dead), (1, 1, 0));
            assert!(store.dead_letters(c, 10).await.unwrap().is_empty());
            let gone = Selector::Ids(vec!["old".into(), "dead".into()]);
            assert_eq!(store.redeliver(c, gone, base + 500).await.unwrap(), 0);
            // The other consumer's deliveries of the same events keep the bodies alive.
            let kept = store.claim_due("keep", base + 500, 10, 10).await.unwrap();
            assert_eq!(ids(&kept), ["old", "new", "dead", "live"]);
            assert_eq!(kept[0].body, event("cli_p", "old", 0).body);
            // Dedupe marks still live: a redelivery from Feishu is a duplicate.
            assert_eq!(
                store
                    .enqueue_event(event("cli_p", "old", base + 600), &[c])
                    .await
                    .unwrap(),
                Enqueue::Duplicate
            );
            // Once expired, marks go; purging twice finds nothing more of them.
            let far = base + 10_000;
            assert!(store.purge_forwarding(far, 1_000_000_000).await.unwrap() >= 4);
            assert_eq!(store.purge_forwarding(far, 1_000_000_000).await.unwrap(), 0);
            // A retained event is still found by id after its dedupe window.
            let by_id = Selector::Ids(vec!["new".into()]);
            assert_eq!(store.redeliver(c, by_id, far).await.unwrap(), 1);
            assert_eq!(
                store
                    .enqueue_event(event("cli_p", "old", far), &[c])
                    .await
                    .unwrap(),
                Enqueue::Queued
            );
        }
    }
}

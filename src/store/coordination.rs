//! What several processes sharing one store must agree on: leases and change notices.
//!
//! With the embedded or memory backend one process owns the store, and these are that process's
//! own bookkeeping (a lease table and a broadcast channel nobody else writes to). With Redis
//! every replica shares them, and they are what makes a fleet act as one service:
//!
//! * **Leases** ([`Store::try_lease`]): a named lease with a random owner and a time to live —
//!   `SET NX PX` and compare-and-delete in Redis. One token fetch per token across the fleet (the
//!   others wait for the winner's result), at most one ticket resend per app per interval (take a
//!   lease for the interval and never release it), one background refresh per token.
//! * **Change notices** ([`Store::changes`]): a ticket stored or deleted, a token stored or invalidated, by
//!   *any* process, this one included (pub/sub in Redis; a broadcast channel locally), so a
//!   subscriber must treat a notice of its own write as a no-op. Waiters on this replica wake
//!   when a ticket lands on another; a near-cache drops a token that another replica
//!   invalidated. Two brokers over one memory store see each other's notices like two replicas
//!   on Redis, which is how the fleet logic is unit-tested.
//!   [`Change::Resynced`] says notices may have been missed (the subscription was re-made), so a
//!   near-cache must revalidate everything; `lost_data` says the store came back empty (a Redis
//!   restarted without persistence) and the tickets must be asked for again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{Store, StoreError};

/// Something another process changed in the shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A newer ticket was stored for this app.
    TicketStored { app_id: String },
    /// An operator dropped this app's ticket (`DELETE /v1/apps/{app_id}/ticket`).
    TicketDeleted { app_id: String },
    /// A token was stored under this broker key, valid until `expires_at_ms` (a near-cache
    /// holding a token that expires earlier reloads; one holding this token ignores it).
    TokenStored { key: String, expires_at_ms: u64 },
    /// The token under this broker key was invalidated (compare-and-delete).
    TokenInvalidated { key: String },
    /// Notices may have been missed: revalidate every cached entry. `lost_data`: the store came
    /// back without its data.
    Resynced { lost_data: bool },
}

/// Change notices kept before a slow subscriber misses some (it then sees `Lagged` and must
/// act as on [`Change::Resynced`]).
pub const CHANGE_BACKLOG: usize = 1024;

/// The lease table and notice channel of a store that one process owns.
#[derive(Debug, Clone)]
pub(super) struct Local {
    /// lease name → (owner, held until).
    leases: Arc<Mutex<HashMap<String, (String, Instant)>>>,
    changes: broadcast::Sender<Change>,
}

impl Default for Local {
    fn default() -> Self {
        Local {
            leases: Arc::default(),
            changes: broadcast::channel(CHANGE_BACKLOG).0,
        }
    }
}

impl Local {
    pub(super) fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        // Expired leases go on every call, so the table holds live leases only.
        leases.retain(|_, (_, until)| *until > now);
        if leases.contains_key(name) {
            return false;
        }
        leases.insert(name.to_string(), (owner.to_string(), now + ttl));
        true
    }

    pub(super) fn release_lease(&self, name: &str, owner: &str) -> bool {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match leases.get(name) {
            Some((held_by, until)) if held_by == owner && *until > now => {
                leases.remove(name);
                true
            }
            _ => false,
        }
    }

    pub(super) fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    pub(super) fn notify(&self, change: Change) {
        // No subscriber is fine: nobody is waiting.
        let _ = self.changes.send(change);
    }
}

impl Store {
    /// Take the lease `name` for `ttl` unless a live lease of that name exists (whoever holds
    /// it, `owner` included). Returns whether it was taken.
    pub async fn try_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.local().try_lease(name, owner, ttl)),
            Store::Embedded(e) => Ok(e.local().try_lease(name, owner, ttl)),
            Store::Redis(r) => r.try_lease(name, owner, ttl).await,
        }
    }

    /// Give the lease `name` back if `owner` still holds it (compare-and-delete: a lease that
    /// expired and was taken by another owner is left alone). Returns whether it was released.
    pub async fn release_lease(&self, name: &str, owner: &str) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => m.check().map(|()| m.local().release_lease(name, owner)),
            Store::Embedded(e) => Ok(e.local().release_lease(name, owner)),
            Store::Redis(r) => r.release_lease(name, owner).await,
        }
    }

    /// Notices of what other processes change in the store (see the module docs).
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        match self {
            Store::Memory(m) => m.local().changes(),
            Store::Embedded(e) => e.local().changes(),
            Store::Redis(r) => r.changes(),
        }
    }

    /// Tell every subscriber (local backends; Redis publishes inside its writes).
    pub(super) fn notify(&self, change: Change) {
        match self {
            Store::Memory(m) => m.local().notify(change),
            Store::Embedded(e) => e.local().notify(change),
            // Redis writes publish their notice in the same script that writes.
            Store::Redis(_) => {}
        }
    }

    /// Whether other processes may write to this store too (a fleet on Redis).
    pub fn is_shared(&self) -> bool {
        match self {
            Store::Memory(_) | Store::Embedded(_) => false,
            Store::Redis(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_held_until_released_or_expired() {
        let local = Local::default();
        assert!(local.try_lease("fetch", "a", Duration::from_secs(60)));
        assert!(!local.try_lease("fetch", "b", Duration::from_secs(60)));
        assert!(!local.try_lease("fetch", "a", Duration::from_secs(60)));
        // Only the owner releases it.
        assert!(!local.release_lease("fetch", "b"));
        assert!(local.release_lease("fetch", "a"));
        assert!(local.try_lease("fetch", "b", Duration::from_millis(0)));
        // An expired lease is free, and its old owner cannot release the new one.
        assert!(local.try_lease("fetch", "c", Duration::from_secs(60)));
        assert!(!local.release_lease("fetch", "b"));
    }

    #[tokio::test]
    async fn memory_handles_pass_the_coordination_contract() {
        let store = Store::Memory(crate::store::memory::MemoryStore::default());
        contract::run(&store, &store.clone()).await;
    }
}

/// What two handles on one shared store must see of each other — two clones of a memory store,
/// or two processes on one Redis: run by each backend's tests.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;
    use crate::secret::Secret;
    use crate::store::TokenRecord;

    /// How long a notice may take to arrive (Redis pub/sub: milliseconds; generous for a loaded
    /// machine).
    const NOTICE_DEADLINE: Duration = Duration::from_secs(10);

    pub async fn run(a: &Store, b: &Store) {
        leases(a, b).await;
        notices(a, b).await;
    }

    async fn leases(a: &Store, b: &Store) {
        let ttl = Duration::from_secs(60);
        assert!(a.try_lease("fetch/x", "a", ttl).await.unwrap());
        assert!(!b.try_lease("fetch/x", "b", ttl).await.unwrap());
        assert!(!a.try_lease("fetch/x", "a", ttl).await.unwrap());
        // Only the owner releases it.
        assert!(!b.release_lease("fetch/x", "b").await.unwrap());
        assert!(a.release_lease("fetch/x", "a").await.unwrap());
        assert!(!a.release_lease("fetch/x", "a").await.unwrap());
        assert!(b.try_lease("fetch/x", "b", ttl).await.unwrap());
        // A holder that died never releases: the lease frees itself when its time is up, and
        // the old owner cannot release the next owner's lease.
        let short = Duration::from_millis(30);
        assert!(a.try_lease("fetch/short", "a", short).await.unwrap());
        let deadline = Instant::now() + NOTICE_DEADLINE;
        while !b.try_lease("fetch/short", "b", ttl).await.unwrap() {
            assert!(Instant::now() < deadline, "the short lease never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!a.release_lease("fetch/short", "a").await.unwrap());
        assert!(b.release_lease("fetch/short", "b").await.unwrap());
    }

    async fn next(rx: &mut broadcast::Receiver<Change>) -> Change {
        tokio::time::timeout(NOTICE_DEADLINE, rx.recv())
            .await
            .expect("a change notice in time")
            .expect("no notice missed")
    }

    /// Every change is heard by every handle, the writer's included, in order; writes that
    /// change nothing announce nothing.
    async fn notices(a: &Store, b: &Store) {
        let mut on_a = a.changes();
        let mut on_b = b.changes();
        let ticket = crate::store::contract::ticket("t-1", 1);
        a.put_ticket("cli_notice", ticket.clone()).await.unwrap();
        // A redelivery of the stored ticket changes nothing and announces nothing.
        a.put_ticket("cli_notice", ticket).await.unwrap();
        let record = |v: &str, expires_at_ms| TokenRecord {
            token: Secret::new(v),
            expires_at_ms,
            fetched_at_ms: 1,
        };
        let key = "app/cli_notice".to_string();
        a.put_token(&key, record("tok", 10)).await.unwrap();
        // A fenced write (an older token) is not stored, so not announced.
        b.put_token(&key, record("older", 9)).await.unwrap();
        b.delete_token(&key, &Secret::new("tok")).await.unwrap();
        b.delete_ticket("cli_notice").await.unwrap();
        // Nothing left to delete: nothing announced.
        a.delete_ticket("cli_notice").await.unwrap();
        b.put_ticket("cli_end", crate::store::contract::ticket("t-2", 1))
            .await
            .unwrap();
        let expected = [
            Change::TicketStored {
                app_id: "cli_notice".into(),
            },
            Change::TokenStored {
                key: key.clone(),
                expires_at_ms: 10,
            },
            Change::TokenInvalidated { key },
            Change::TicketDeleted {
                app_id: "cli_notice".into(),
            },
            Change::TicketStored {
                app_id: "cli_end".into(),
            },
        ];
        for rx in [&mut on_a, &mut on_b] {
            for change in &expected {
                assert_eq!(&next(rx).await, change);
            }
        }
    }
}

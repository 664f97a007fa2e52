//! The in-memory backend: the store contract over `HashMap`s, for tests and throwaway runs.
//! Nothing survives the process. A std `Mutex` suffices: no lock is held across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::coordination::Local;
use super::queue_memory::MemoryQueue;
use super::{
    apply_tenant_event, demote_ticket, merge_ticket, token_replaces, StoreError, TenantEvent,
    TenantRecord, TicketRecord, TicketWrite, TokenRecord,
};
use crate::secret::Secret;

#[derive(Debug, Default)]
struct Tables {
    tickets: HashMap<String, TicketRecord>,
    /// app_id → tenant_key → record (ordered, like the embedded backend's range scans).
    tenants: HashMap<String, BTreeMap<String, TenantRecord>>,
    tokens: HashMap<String, TokenRecord>,
    /// The event hand-off queue.
    pub(super) queue: MemoryQueue,
}

#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
    /// Fault injection: when set, every operation fails as a broken disk would.
    unavailable: Arc<AtomicBool>,
    local: Local,
}

impl MemoryStore {
    pub(super) fn local(&self) -> &Local {
        &self.local
    }

    /// Make every operation fail (or work again): for tests of what callers see when storage
    /// breaks.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Fails while the store is marked unavailable.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::new("memory store marked unavailable"));
        }
        Ok(())
    }

    /// Run `f` on the hand-off queue, under the one lock (every queue operation is atomic).
    pub(super) fn queue<T>(&self, f: impl FnOnce(&mut MemoryQueue) -> T) -> Result<T, StoreError> {
        self.check()?;
        Ok(f(&mut self.lock().queue))
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave a half-applied record (each update is one
        // insert), so a poisoned lock is still consistent.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put_ticket(&self, app_id: &str, incoming: TicketRecord) -> TicketWrite {
        let mut t = self.lock();
        let stored = t.tickets.remove(app_id);
        let (record, write) = merge_ticket(stored, incoming);
        t.tickets.insert(app_id.to_string(), record);
        write
    }

    pub fn ticket(&self, app_id: &str) -> Option<TicketRecord> {
        self.lock().tickets.get(app_id).cloned()
    }

    pub fn demote_ticket(&self, app_id: &str, ticket: &Secret) -> bool {
        self.lock()
            .tickets
            .get_mut(app_id)
            .is_some_and(|stored| demote_ticket(stored, ticket))
    }

    pub fn delete_ticket(&self, app_id: &str) -> Option<TicketRecord> {
        self.lock().tickets.remove(app_id)
    }

    pub fn record_tenant_event(&self, app_id: &str, ev: &TenantEvent) -> TenantRecord {
        let mut t = self.lock();
        let tenants = t.tenants.entry(app_id.to_string()).or_default();
        let record = apply_tenant_event(tenants.remove(&ev.tenant_key), ev);
        tenants.insert(ev.tenant_key.clone(), record.clone());
        record
    }

    /// Store the token unless the stored one expires as late or later. Returns whether stored.
    pub fn put_token(&self, key: &str, record: TokenRecord) -> bool {
        let mut t = self.lock();
        if !token_replaces(t.tokens.get(key), &record) {
            return false;
        }
        t.tokens.insert(key.to_string(), record);
        true
    }

    pub fn token(&self, key: &str) -> Option<TokenRecord> {
        self.lock().tokens.get(key).cloned()
    }

    pub fn delete_token(&self, key: &str, token: &Secret) {
        let mut t = self.lock();
        if t.tokens.get(key).is_some_and(|r| r.token == *token) {
            t.tokens.remove(key);
        }
    }

    pub fn delete_expired_tokens(&self, now_ms: u64) -> usize {
        let mut t = self.lock();
        let before = t.tokens.len();
        t.tokens.retain(|_, r| r.expires_at_ms > now_ms);
        before - t.tokens.len()
    }

    pub fn tenants(&self, app_id: &str) -> Vec<TenantRecord> {
        self.lock()
            .tenants
            .get(app_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{contract, Store};

    #[tokio::test]
    async fn memory_store_passes_the_contract() {
        contract::run(&Store::Memory(Default::default())).await;
    }
}

//! The embedded backend: one redb file (see the module docs of `store` for why redb).
//!
//! Each write is one redb write transaction, committed with redb's default `Durability::Immediate`
//! (fsync) before the call returns: that is what lets intake answer 200 only once a ticket is on
//! disk. redb runs blocking IO, so every call hops onto tokio's blocking pool. Records are JSON:
//! small, self-describing, and readable with any redb tool when debugging.
//!
//! The file holds tickets and (later) tokens, which are credentials: it is created readable by its
//! owner only.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    apply_tenant_event, merge_ticket, StoreError, TenantEvent, TenantRecord, TicketRecord,
    TicketWrite, TokenRecord,
};
use crate::secret::Secret;

/// app_id → TicketRecord (JSON).
const TICKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("tickets");
/// (app_id, tenant_key) → TenantRecord (JSON).
const TENANTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tenants");
/// Broker key → TokenRecord (JSON).
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedStore")
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::new)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(StoreError::new)
}

impl EmbeddedStore {
    /// Open (or create) the database file, its directory, and every table. Blocking.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::new(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::new(format!("cannot open {}: {e}", path.display())))?;
        restrict_permissions(path);
        let txn = db.begin_write().map_err(StoreError::new)?;
        txn.open_table(TICKETS).map_err(StoreError::new)?;
        txn.open_table(TENANTS).map_err(StoreError::new)?;
        txn.open_table(TOKENS).map_err(StoreError::new)?;
        txn.commit().map_err(StoreError::new)?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }

    /// Run blocking redb work on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(StoreError::new)?
    }

    pub async fn put_ticket(
        &self,
        app_id: &str,
        incoming: TicketRecord,
    ) -> Result<TicketWrite, StoreError> {
        let app_id = app_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(StoreError::new)?;
            let write = {
                let mut table = txn.open_table(TICKETS).map_err(StoreError::new)?;
                let stored = match table.get(app_id.as_str()).map_err(StoreError::new)? {
                    Some(v) => Some(decode::<TicketRecord>(v.value())?),
                    None => None,
                };
                let (record, write) = merge_ticket(stored, incoming);
                table
                    .insert(app_id.as_str(), encode(&record)?.as_slice())
                    .map_err(StoreError::new)?;
                write
            };
            txn.commit().map_err(StoreError::new)?;
            Ok(write)
        })
        .await
    }

    pub async fn ticket(&self, app_id: &str) -> Result<Option<TicketRecord>, StoreError> {
        let app_id = app_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(StoreError::new)?;
            let table = txn.open_table(TICKETS).map_err(StoreError::new)?;
            let value = table.get(app_id.as_str()).map_err(StoreError::new)?;
            value.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    pub async fn record_tenant_event(
        &self,
        app_id: &str,
        ev: TenantEvent,
    ) -> Result<TenantRecord, StoreError> {
        let app_id = app_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(StoreError::new)?;
            let record = {
                let mut table = txn.open_table(TENANTS).map_err(StoreError::new)?;
                let key = (app_id.as_str(), ev.tenant_key.as_str());
                let stored = match table.get(key).map_err(StoreError::new)? {
                    Some(v) => Some(decode::<TenantRecord>(v.value())?),
                    None => None,
                };
                let record = apply_tenant_event(stored, &ev);
                table
                    .insert(key, encode(&record)?.as_slice())
                    .map_err(StoreError::new)?;
                record
            };
            txn.commit().map_err(StoreError::new)?;
            Ok(record)
        })
        .await
    }

    pub async fn tenants(&self, app_id: &str) -> Result<Vec<TenantRecord>, StoreError> {
        let app_id = app_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(StoreError::new)?;
            let table = txn.open_table(TENANTS).map_err(StoreError::new)?;
            let mut out = Vec::new();
            let range = table
                .range((app_id.as_str(), "")..)
                .map_err(StoreError::new)?;
            for entry in range {
                let (key, value) = entry.map_err(StoreError::new)?;
                if key.value().0 != app_id {
                    break;
                }
                out.push(decode(value.value())?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn put_token(&self, key: &str, record: TokenRecord) -> Result<(), StoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(StoreError::new)?;
            {
                let mut table = txn.open_table(TOKENS).map_err(StoreError::new)?;
                table
                    .insert(key.as_str(), encode(&record)?.as_slice())
                    .map_err(StoreError::new)?;
            }
            txn.commit().map_err(StoreError::new)
        })
        .await
    }

    pub async fn token(&self, key: &str) -> Result<Option<TokenRecord>, StoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(StoreError::new)?;
            let table = txn.open_table(TOKENS).map_err(StoreError::new)?;
            let value = table.get(key.as_str()).map_err(StoreError::new)?;
            value.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    pub async fn delete_token(&self, key: &str, token: &Secret) -> Result<(), StoreError> {
        let key = key.to_string();
        let token = token.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(StoreError::new)?;
            {
                let mut table = txn.open_table(TOKENS).map_err(StoreError::new)?;
                let current = match table.get(key.as_str()).map_err(StoreError::new)? {
                    Some(v) => Some(decode::<TokenRecord>(v.value())?),
                    None => None,
                };
                if current.is_some_and(|r| r.token == token) {
                    table.remove(key.as_str()).map_err(StoreError::new)?;
                }
            }
            txn.commit().map_err(StoreError::new)
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(StoreError::new)?;
            txn.open_table(TICKETS).map_err(StoreError::new)?;
            Ok(())
        })
        .await
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot restrict store file permissions");
    }
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{contract, Store};

    #[tokio::test]
    async fn embedded_store_passes_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("nested/t.db")).unwrap();
        contract::run(&Store::Embedded(store)).await;
    }

    #[tokio::test]
    async fn tickets_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store
                .put_ticket("cli_a", contract::ticket("kept", 5))
                .await
                .unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let got = store.ticket("cli_a").await.unwrap().unwrap();
        assert_eq!(got.ticket.expose(), "kept");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

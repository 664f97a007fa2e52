//! The embedded backend: one redb file (see the module docs of `store` for why redb).
//!
//! **Writes go through one writer thread that commits in groups.** Every write (ticket, tenant,
//! token) is queued to the writer; the writer takes whatever has queued up (up to
//! [`MAX_BATCH`]), applies it in one redb write transaction, commits once, and only then answers
//! each caller. redb allows one write transaction at a time anyway, so this costs a single
//! writer nothing and turns N concurrent fsyncs into one. A batch holding a ticket or tenant
//! write commits with `Durability::Immediate` (fsync) — that is what lets intake answer 200 only
//! once a ticket is on disk; a batch of token writes only commits with `Durability::Eventual`
//! (written, not fsynced: it survives a crash of the process, and a token lost to a power cut is
//! simply fetched again).
//!
//! Reads run on tokio's blocking pool in their own read transactions, concurrently with the
//! writer. Records are JSON: small, self-describing, readable with any redb tool when debugging.
//! The page cache is bounded ([`CACHE_BYTES`]; redb's default is 1 GiB).
//!
//! The file holds tickets and tokens, which are credentials: it is created readable by its owner
//! only. Dropping the last handle stops the writer and closes the file before returning, so the
//! same process can open it again at once.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, Durability, ReadableTable, Table, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::{
    apply_tenant_event, demote_ticket, merge_ticket, StoreError, TenantEvent, TenantRecord,
    TicketRecord, TicketWrite, TokenRecord,
};
use crate::secret::Secret;

/// app_id → TicketRecord (JSON).
const TICKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("tickets");
/// (app_id, tenant_key) → TenantRecord (JSON).
const TENANTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tenants");
/// Broker key → TokenRecord (JSON).
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// Most writes applied in one commit.
pub const MAX_BATCH: usize = 512;
/// redb's page cache.
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Writes queued for the writer before callers wait for room.
const QUEUE_DEPTH: usize = 4096;

/// A queued write and where its answer goes.
enum WriteOp {
    Ticket {
        app_id: String,
        record: TicketRecord,
        reply: oneshot::Sender<Result<TicketWrite, StoreError>>,
    },
    DemoteTicket {
        app_id: String,
        ticket: Secret,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Tenant {
        app_id: String,
        event: TenantEvent,
        reply: oneshot::Sender<Result<TenantRecord, StoreError>>,
    },
    PutToken {
        key: String,
        record: TokenRecord,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    DeleteToken {
        key: String,
        token: Secret,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    DeleteExpiredTokens {
        now_ms: u64,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
}

impl WriteOp {
    /// Tickets and tenant state must be on disk before the caller hears back.
    fn needs_fsync(&self) -> bool {
        matches!(
            self,
            WriteOp::Ticket { .. } | WriteOp::DemoteTicket { .. } | WriteOp::Tenant { .. }
        )
    }
}

/// An applied write's answer, sent only after the commit.
enum Answer {
    Ticket(
        oneshot::Sender<Result<TicketWrite, StoreError>>,
        Result<TicketWrite, StoreError>,
    ),
    /// Boxed: a tenant record is several times larger than every other answer.
    Tenant(
        oneshot::Sender<Result<TenantRecord, StoreError>>,
        Box<Result<TenantRecord, StoreError>>,
    ),
    Flag(
        oneshot::Sender<Result<bool, StoreError>>,
        Result<bool, StoreError>,
    ),
    Count(
        oneshot::Sender<Result<usize, StoreError>>,
        Result<usize, StoreError>,
    ),
    Unit(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
}

impl Answer {
    fn send(self) {
        // A caller that went away (its request was cancelled) does not care.
        match self {
            Answer::Ticket(tx, r) => drop(tx.send(r)),
            Answer::Tenant(tx, r) => drop(tx.send(*r)),
            Answer::Flag(tx, r) => drop(tx.send(r)),
            Answer::Count(tx, r) => drop(tx.send(r)),
            Answer::Unit(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, e: &StoreError) {
        match self {
            Answer::Ticket(tx, _) => drop(tx.send(Err(e.clone()))),
            Answer::Tenant(tx, _) => drop(tx.send(Err(e.clone()))),
            Answer::Flag(tx, _) => drop(tx.send(Err(e.clone()))),
            Answer::Count(tx, _) => drop(tx.send(Err(e.clone()))),
            Answer::Unit(tx, _) => drop(tx.send(Err(e.clone()))),
        }
    }
}

struct Shared {
    db: Arc<Database>,
    /// `None` only while dropping.
    queue: Option<mpsc::Sender<WriteOp>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the queue ends the writer; joining it releases its handle on the file.
        self.queue.take();
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
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

/// The writer thread: take what has queued up, apply it in one transaction, commit, answer.
fn writer_loop(db: Arc<Database>, mut queue: mpsc::Receiver<WriteOp>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit_batch(&db, batch);
    }
}

fn commit_batch(db: &Database, batch: Vec<WriteOp>) {
    let durable = batch.iter().any(WriteOp::needs_fsync);
    let mut answers = Vec::with_capacity(batch.len());
    let result = (|| -> Result<(), StoreError> {
        let mut txn = db.begin_write().map_err(StoreError::new)?;
        if !durable {
            txn.set_durability(Durability::Eventual);
        }
        {
            let mut tickets = txn.open_table(TICKETS).map_err(StoreError::new)?;
            let mut tenants = txn.open_table(TENANTS).map_err(StoreError::new)?;
            let mut tokens = txn.open_table(TOKENS).map_err(StoreError::new)?;
            for op in batch {
                answers.push(apply(op, &mut tickets, &mut tenants, &mut tokens));
            }
        }
        txn.commit().map_err(StoreError::new)
    })();
    match result {
        Ok(()) => answers.into_iter().for_each(Answer::send),
        Err(e) => {
            tracing::error!(error = %e, writes = answers.len(), "store commit failed");
            answers.into_iter().for_each(|a| a.fail(&e));
        }
    }
}

type StrTable<'t> = Table<'t, &'static str, &'static [u8]>;
type PairTable<'t> = Table<'t, (&'static str, &'static str), &'static [u8]>;

/// Apply one write inside the batch's transaction (later writes see earlier ones).
fn apply(
    op: WriteOp,
    tickets: &mut StrTable<'_>,
    tenants: &mut PairTable<'_>,
    tokens: &mut StrTable<'_>,
) -> Answer {
    match op {
        WriteOp::Ticket {
            app_id,
            record,
            reply,
        } => {
            let result = (|| {
                let stored = match tickets.get(app_id.as_str()).map_err(StoreError::new)? {
                    Some(v) => Some(decode::<TicketRecord>(v.value())?),
                    None => None,
                };
                let (merged, write) = merge_ticket(stored, record);
                tickets
                    .insert(app_id.as_str(), encode(&merged)?.as_slice())
                    .map_err(StoreError::new)?;
                Ok(write)
            })();
            Answer::Ticket(reply, result)
        }
        WriteOp::DemoteTicket {
            app_id,
            ticket,
            reply,
        } => {
            let result = (|| {
                let stored = match tickets.get(app_id.as_str()).map_err(StoreError::new)? {
                    Some(v) => Some(decode::<TicketRecord>(v.value())?),
                    None => None,
                };
                let Some(mut stored) = stored else {
                    return Ok(false);
                };
                if !demote_ticket(&mut stored, &ticket) {
                    return Ok(false);
                }
                tickets
                    .insert(app_id.as_str(), encode(&stored)?.as_slice())
                    .map_err(StoreError::new)?;
                Ok(true)
            })();
            Answer::Flag(reply, result)
        }
        WriteOp::Tenant {
            app_id,
            event,
            reply,
        } => {
            let result = (|| {
                let key = (app_id.as_str(), event.tenant_key.as_str());
                let stored = match tenants.get(key).map_err(StoreError::new)? {
                    Some(v) => Some(decode::<TenantRecord>(v.value())?),
                    None => None,
                };
                let record = apply_tenant_event(stored, &event);
                tenants
                    .insert(key, encode(&record)?.as_slice())
                    .map_err(StoreError::new)?;
                Ok(record)
            })();
            Answer::Tenant(reply, Box::new(result))
        }
        WriteOp::PutToken { key, record, reply } => {
            let result = encode(&record).and_then(|bytes| {
                tokens
                    .insert(key.as_str(), bytes.as_slice())
                    .map(drop)
                    .map_err(StoreError::new)
            });
            Answer::Unit(reply, result)
        }
        WriteOp::DeleteToken { key, token, reply } => {
            let result = (|| {
                let current = match tokens.get(key.as_str()).map_err(StoreError::new)? {
                    Some(v) => Some(decode::<TokenRecord>(v.value())?),
                    None => None,
                };
                if current.is_some_and(|r| r.token == token) {
                    tokens.remove(key.as_str()).map_err(StoreError::new)?;
                }
                Ok(())
            })();
            Answer::Unit(reply, result)
        }
        WriteOp::DeleteExpiredTokens { now_ms, reply } => {
            let result = (|| {
                let mut expired = 0;
                tokens
                    .retain(|_, value| {
                        let keep =
                            decode::<TokenRecord>(value).is_ok_and(|r| r.expires_at_ms > now_ms);
                        expired += usize::from(!keep);
                        keep
                    })
                    .map_err(StoreError::new)?;
                Ok(expired)
            })();
            Answer::Count(reply, result)
        }
    }
}

impl EmbeddedStore {
    /// Open (or create) the database file, its directory, and every table, and start the
    /// writer. Blocking.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::new(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::new(format!("cannot open {}: {e}", path.display())))?;
        restrict_permissions(path);
        let txn = db.begin_write().map_err(StoreError::new)?;
        txn.open_table(TICKETS).map_err(StoreError::new)?;
        txn.open_table(TENANTS).map_err(StoreError::new)?;
        txn.open_table(TOKENS).map_err(StoreError::new)?;
        txn.commit().map_err(StoreError::new)?;
        let db = Arc::new(db);
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(writer_db, receiver))
            .map_err(StoreError::new)?;
        Ok(EmbeddedStore {
            shared: Arc::new(Shared {
                db,
                queue: Some(queue),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Queue a write and wait for its commit.
    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let stopped = || StoreError::new("the store writer has stopped");
        let queue = self.shared.queue.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        queue.send(make(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Run blocking redb reads on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.shared.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(StoreError::new)?
    }

    pub async fn put_ticket(
        &self,
        app_id: &str,
        record: TicketRecord,
    ) -> Result<TicketWrite, StoreError> {
        let app_id = app_id.to_string();
        self.write(|reply| WriteOp::Ticket {
            app_id,
            record,
            reply,
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

    pub async fn demote_ticket(&self, app_id: &str, ticket: &Secret) -> Result<bool, StoreError> {
        let app_id = app_id.to_string();
        let ticket = ticket.clone();
        self.write(|reply| WriteOp::DemoteTicket {
            app_id,
            ticket,
            reply,
        })
        .await
    }

    pub async fn record_tenant_event(
        &self,
        app_id: &str,
        event: TenantEvent,
    ) -> Result<TenantRecord, StoreError> {
        let app_id = app_id.to_string();
        self.write(|reply| WriteOp::Tenant {
            app_id,
            event,
            reply,
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
        self.write(|reply| WriteOp::PutToken { key, record, reply })
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
        self.write(|reply| WriteOp::DeleteToken { key, token, reply })
            .await
    }
    pub async fn delete_expired_tokens(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.write(|reply| WriteOp::DeleteExpiredTokens { now_ms, reply })
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

//! The hand-off queue in the redb file: tables, and the writes the writer thread applies.
//!
//! **Layout.** Keys are tuples (redb orders them element by element), so every question the
//! queue asks is a point lookup or a range scan over a prefix; nothing is held per event in
//! memory, and nothing scans the whole queue:
//!
//! | table | key → value | used by |
//! |---|---|---|
//! | `fwd_events` | (received ms, app, event_id) → header + body (binary, [`EventRow`]) | the body, stored once per event whatever the number of consumers; `refs` counts the deliveries still holding it. Keyed by arrival time, not by id: events are appended at the end of the tree (Feishu's ids are random, which left 1 KB rows in half-empty pages) and a backlog drains in arrival order, reading neighbouring pages |
//! | `fwd_dedupe` | (app, event_id) → dedupe-until ms | enqueue's atomic duplicate check |
//! | `fwd_dedupe_expiry` | (until ms, app, event_id) → () | purge: expired marks are a prefix range |
//! | `fwd_deliveries` | (consumer, event_id, app) → state, attempts, due, times, last error ([`DeliveryRow`]) | outcomes; redeliver by ids (a prefix range) |
//! | `fwd_due` | (consumer, due ms, event_id, app) → () | **the claim**: due entries are the range up to `now`; a lease is just a later due time |
//! | `fwd_pending` | (consumer, received ms, event_id, app) → () | the oldest pending event (first key) |
//! | `fwd_received` | (consumer, received ms, event_id, app) → () | redeliver a time window |
//! | `fwd_dead` | (consumer, dead-at ms, event_id, app) → () | dead letters newest first (reverse range), redeliver dead |
//! | `fwd_finished` | (finished ms, consumer, event_id, app) → () | purge after retention: a prefix range |
//! | `fwd_consumers` | consumer → counters ([`Counters`]) | stats without a scan |
//!
//! Each operation touches a handful of rows, and each maps to one atomic script over sorted sets
//! and hashes in Redis (the due/pending/received/dead/finished indexes are sorted sets scored by
//! time, the rows hashes), which is what the Redis backend will do.
//!
//! A write reads and decodes every row it needs before it changes anything, so a malformed row
//! fails that one write without leaving half of it in the batch's transaction.

use std::ops::Bound;

use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;

use super::queue::{
    short_error, ConsumerStats, Counters, DeadLetter, Delivery, DeliveryRow, Enqueue, EventRow,
    NewEvent, Outcome, Selector, State,
};
use super::StoreError;

type Pair = (&'static str, &'static str);
type Triple = (&'static str, &'static str, &'static str);
type ByTime = (&'static str, u64, &'static str, &'static str);
type Finished = (u64, &'static str, &'static str, &'static str);

pub(super) const EVENTS: TableDefinition<(u64, &str, &str), &[u8]> =
    TableDefinition::new("fwd_events");
const DEDUPE: TableDefinition<Pair, u64> = TableDefinition::new("fwd_dedupe");
const DEDUPE_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("fwd_dedupe_expiry");
const DELIVERIES: TableDefinition<Triple, &[u8]> = TableDefinition::new("fwd_deliveries");
const DUE: TableDefinition<ByTime, ()> = TableDefinition::new("fwd_due");
const PENDING: TableDefinition<ByTime, ()> = TableDefinition::new("fwd_pending");
const RECEIVED: TableDefinition<ByTime, ()> = TableDefinition::new("fwd_received");
const DEAD: TableDefinition<ByTime, ()> = TableDefinition::new("fwd_dead");
const FINISHED: TableDefinition<Finished, ()> = TableDefinition::new("fwd_finished");
const CONSUMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("fwd_consumers");

/// Rows handled per purge or redeliver commit, so ticket writes and enqueues go in between.
pub const QUEUE_CHUNK: usize = 2048;

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(e)
}

/// The smallest string above every key whose first element is `consumer` (keys with the same
/// first element sort before `consumer + "\0"`).
fn after(consumer: &str) -> String {
    format!("{consumer}\0")
}

/// Create every queue table (at open, so readers never meet a missing table).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(EVENTS)?;
    txn.open_table(DEDUPE)?;
    txn.open_table(DEDUPE_EXPIRY)?;
    txn.open_table(DELIVERIES)?;
    for t in [DUE, PENDING, RECEIVED, DEAD] {
        txn.open_table(t)?;
    }
    txn.open_table(FINISHED)?;
    txn.open_table(CONSUMERS)?;
    Ok(())
}

/// One chunk of a purge or a redeliver.
pub(super) struct Chunk {
    pub done: usize,
    /// More to do: call again (with `cursor` for a window redeliver).
    pub more: bool,
    pub cursor: Option<(u64, String, String)>,
}

/// A queue write, queued to the writer with where its answer goes.
pub(super) enum Op {
    Enqueue {
        event: NewEvent,
        consumers: Vec<String>,
        reply: oneshot::Sender<Result<Enqueue, StoreError>>,
    },
    Claim {
        consumer: String,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Delivery>, StoreError>>,
    },
    Outcome {
        consumer: String,
        app_id: String,
        event_id: String,
        lease_until_ms: u64,
        outcome: Outcome,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Redeliver {
        consumer: String,
        selector: Selector,
        now_ms: u64,
        cursor: Option<(u64, String, String)>,
        reply: oneshot::Sender<Result<Chunk, StoreError>>,
    },
    Purge {
        now_ms: u64,
        retention_ms: u64,
        reply: oneshot::Sender<Result<Chunk, StoreError>>,
    },
}

/// An applied write's answer, sent after the commit (or replaced by the commit's error).
pub(super) type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn answer<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    result: Result<T, StoreError>,
) -> Answer {
    Box::new(move |failed| {
        // A caller that went away does not care.
        let _ = reply.send(match failed {
            Some(e) => Err(e.clone()),
            None => result,
        });
    })
}

impl Op {
    /// Only what Feishu's `200` or an operator's request depends on is fsynced: enqueues and
    /// redelivers. Claims, outcomes and purges commit without fsync (see `store::queue`).
    pub fn needs_fsync(&self) -> bool {
        matches!(self, Op::Enqueue { .. } | Op::Redeliver { .. })
    }

    pub fn fail(self, e: &StoreError) {
        let e = Some(e);
        match self {
            Op::Enqueue { reply, .. } => answer(reply, Ok(Enqueue::Queued))(e),
            Op::Claim { reply, .. } => answer(reply, Ok(Vec::new()))(e),
            Op::Outcome { reply, .. } => answer(reply, Ok(false))(e),
            Op::Redeliver { reply, .. } | Op::Purge { reply, .. } => answer(
                reply,
                Ok(Chunk {
                    done: 0,
                    more: false,
                    cursor: None,
                }),
            )(e),
        }
    }

    pub fn apply(self, t: &mut Tables<'_>) -> Answer {
        match self {
            Op::Enqueue {
                event,
                consumers,
                reply,
            } => answer(reply, t.enqueue(event, consumers)),
            Op::Claim {
                consumer,
                now_ms,
                lease_ms,
                limit,
                reply,
            } => answer(reply, t.claim(&consumer, now_ms, lease_ms, limit)),
            Op::Outcome {
                consumer,
                app_id,
                event_id,
                lease_until_ms,
                outcome,
                reply,
            } => answer(
                reply,
                t.outcome(&consumer, &app_id, &event_id, lease_until_ms, outcome),
            ),
            Op::Redeliver {
                consumer,
                selector,
                now_ms,
                cursor,
                reply,
            } => answer(reply, t.redeliver(&consumer, &selector, now_ms, cursor)),
            Op::Purge {
                now_ms,
                retention_ms,
                reply,
            } => answer(reply, t.purge(now_ms, retention_ms)),
        }
    }
}

/// The queue's tables, open in one write transaction (opened once per batch that needs them).
pub(super) struct Tables<'t> {
    events: Table<'t, (u64, &'static str, &'static str), &'static [u8]>,
    dedupe: Table<'t, Pair, u64>,
    dedupe_expiry: Table<'t, (u64, &'static str, &'static str), ()>,
    deliveries: Table<'t, Triple, &'static [u8]>,
    due: Table<'t, ByTime, ()>,
    pending: Table<'t, ByTime, ()>,
    received: Table<'t, ByTime, ()>,
    dead: Table<'t, ByTime, ()>,
    finished: Table<'t, Finished, ()>,
    consumers: Table<'t, &'static str, &'static [u8]>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, StoreError> {
        Ok(Tables {
            events: txn.open_table(EVENTS).map_err(err)?,
            dedupe: txn.open_table(DEDUPE).map_err(err)?,
            dedupe_expiry: txn.open_table(DEDUPE_EXPIRY).map_err(err)?,
            deliveries: txn.open_table(DELIVERIES).map_err(err)?,
            due: txn.open_table(DUE).map_err(err)?,
            pending: txn.open_table(PENDING).map_err(err)?,
            received: txn.open_table(RECEIVED).map_err(err)?,
            dead: txn.open_table(DEAD).map_err(err)?,
            finished: txn.open_table(FINISHED).map_err(err)?,
            consumers: txn.open_table(CONSUMERS).map_err(err)?,
        })
    }

    fn delivery(&self, c: &str, id: &str, app: &str) -> Result<Option<DeliveryRow>, StoreError> {
        match self.deliveries.get((c, id, app)).map_err(err)? {
            Some(v) => DeliveryRow::decode(v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// The event a delivery received at `received` refers to.
    fn event(&self, received: u64, app: &str, id: &str) -> Result<Option<EventRow>, StoreError> {
        match self.events.get((received, app, id)).map_err(err)? {
            Some(v) => EventRow::decode(v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn counters(&self, c: &str) -> Result<Counters, StoreError> {
        match self.consumers.get(c).map_err(err)? {
            Some(v) => Counters::decode(v.value()),
            None => Ok(Counters::default()),
        }
    }

    fn put_counters(&mut self, c: &str, counters: &Counters) -> Result<(), StoreError> {
        self.consumers
            .insert(c, counters.encode().as_slice())
            .map(drop)
            .map_err(err)
    }

    /// Remove a delivery's state-dependent index keys (not `fwd_received`).
    fn unindex(
        &mut self,
        c: &str,
        id: &str,
        app: &str,
        row: &DeliveryRow,
    ) -> Result<(), StoreError> {
        match row.state {
            State::Pending => {
                self.due.remove((c, row.due_ms, id, app)).map_err(err)?;
                self.pending
                    .remove((c, row.received_at_ms, id, app))
                    .map_err(err)?;
            }
            State::Delivered => {
                self.finished
                    .remove((row.finished_ms, c, id, app))
                    .map_err(err)?;
            }
            State::Dead => {
                self.finished
                    .remove((row.finished_ms, c, id, app))
                    .map_err(err)?;
                self.dead
                    .remove((c, row.finished_ms, id, app))
                    .map_err(err)?;
            }
        }
        Ok(())
    }

    /// Store a delivery and its state-dependent index keys.
    fn index(&mut self, c: &str, id: &str, app: &str, row: &DeliveryRow) -> Result<(), StoreError> {
        match row.state {
            State::Pending => {
                self.due.insert((c, row.due_ms, id, app), ()).map_err(err)?;
                self.pending
                    .insert((c, row.received_at_ms, id, app), ())
                    .map_err(err)?;
            }
            State::Delivered => {
                self.finished
                    .insert((row.finished_ms, c, id, app), ())
                    .map_err(err)?;
            }
            State::Dead => {
                self.finished
                    .insert((row.finished_ms, c, id, app), ())
                    .map_err(err)?;
                self.dead
                    .insert((c, row.finished_ms, id, app), ())
                    .map_err(err)?;
            }
        }
        self.deliveries
            .insert((c, id, app), row.encode().as_slice())
            .map_err(err)?;
        Ok(())
    }

    fn enqueue(&mut self, ev: NewEvent, mut consumers: Vec<String>) -> Result<Enqueue, StoreError> {
        consumers.sort();
        consumers.dedup();
        if consumers.is_empty() {
            return Ok(Enqueue::Queued);
        }
        let (app, id, now) = (ev.app_id.as_str(), ev.event_id.as_str(), ev.received_at_ms);
        let mark = self.dedupe.get((app, id)).map_err(err)?.map(|v| v.value());
        if mark.is_some_and(|until| until > now) {
            return Ok(Enqueue::Duplicate);
        }
        // Reads first. An event still retained from an earlier push (its dedupe mark expired)
        // is queued again: its deliveries start over.
        // Each delivery refers to the event row of its `received_at`; a requeued delivery moves
        // to the new row, and an old row no delivery refers to any more goes.
        let stored = self.event(now, app, id)?;
        let mut plan = Vec::with_capacity(consumers.len());
        for c in &consumers {
            plan.push((self.delivery(c, id, app)?, self.counters(c)?));
        }
        let mut moved: Vec<(u64, u32)> = Vec::new();
        let mut fresh = 0u32;
        for (old, _) in &plan {
            match old {
                Some(old) if old.received_at_ms == now => {}
                Some(old) => match moved.iter_mut().find(|(r, _)| *r == old.received_at_ms) {
                    Some((_, n)) => *n += 1,
                    None => moved.push((old.received_at_ms, 1)),
                },
                None => {}
            }
            if old.as_ref().is_none_or(|o| o.received_at_ms != now) {
                fresh += 1;
            }
        }
        let mut old_rows = Vec::with_capacity(moved.len());
        for (received, n) in moved {
            if let Some(row) = self.event(received, app, id)? {
                old_rows.push((received, n, row));
            }
        }
        for (received, n, mut row) in old_rows {
            row.refs = row.refs.saturating_sub(n);
            if row.refs == 0 {
                self.events.remove((received, app, id)).map_err(err)?;
            } else {
                self.events
                    .insert((received, app, id), row.encode().as_slice())
                    .map_err(err)?;
            }
        }
        if let Some(until) = mark {
            self.dedupe_expiry.remove((until, app, id)).map_err(err)?;
        }
        self.dedupe
            .insert((app, id), ev.dedupe_until_ms)
            .map_err(err)?;
        self.dedupe_expiry
            .insert((ev.dedupe_until_ms, app, id), ())
            .map_err(err)?;
        let row = EventRow {
            received_at_ms: now,
            refs: stored.map_or(0, |s| s.refs) + fresh,
            event_type: ev.event_type,
            tenant_key: ev.tenant_key,
            body: ev.body,
        };
        self.events
            .insert((now, app, id), row.encode().as_slice())
            .map_err(err)?;
        for (c, (old, mut counters)) in consumers.iter().zip(plan) {
            if let Some(old) = old {
                self.unindex(c, id, app, &old)?;
                self.received
                    .remove((c.as_str(), old.received_at_ms, id, app))
                    .map_err(err)?;
                counters.leave(old.state);
            }
            self.index(c, id, app, &DeliveryRow::pending(now, now))?;
            self.received
                .insert((c.as_str(), now, id, app), ())
                .map_err(err)?;
            counters.enter(State::Pending);
            self.put_counters(c, &counters)?;
        }
        Ok(Enqueue::Queued)
    }

    fn claim(
        &mut self,
        c: &str,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut due = Vec::new();
        for entry in self
            .due
            .range((c, 0, "", "")..(c, now_ms.saturating_add(1), "", ""))
            .map_err(err)?
            .take(limit)
        {
            let (key, _) = entry.map_err(err)?;
            let (_, at, id, app) = key.value();
            due.push((at, id.to_string(), app.to_string()));
        }
        let lease_until_ms = now_ms.saturating_add(lease_ms);
        let mut claimed = Vec::with_capacity(due.len());
        for (at, id, app) in due {
            let (id, app) = (id.as_str(), app.as_str());
            let row = self.delivery(c, id, app)?;
            let event = match &row {
                Some(row) => self.event(row.received_at_ms, app, id)?,
                None => None,
            };
            let (Some(mut row), Some(event)) = (row, event) else {
                // An index key without its rows: drop the key, never hand out half a delivery.
                tracing::warn!(
                    consumer = c,
                    event_id = id,
                    "queue index entry without a delivery; dropped"
                );
                self.due.remove((c, at, id, app)).map_err(err)?;
                continue;
            };
            if row.state != State::Pending || row.due_ms != at {
                self.due.remove((c, at, id, app)).map_err(err)?;
                continue;
            }
            self.due.remove((c, at, id, app)).map_err(err)?;
            row.due_ms = lease_until_ms;
            row.attempts = row.attempts.saturating_add(1);
            self.due
                .insert((c, lease_until_ms, id, app), ())
                .map_err(err)?;
            self.deliveries
                .insert((c, id, app), row.encode().as_slice())
                .map_err(err)?;
            claimed.push(Delivery {
                consumer: c.to_string(),
                app_id: app.to_string(),
                event_id: id.to_string(),
                event_type: event.event_type,
                tenant_key: event.tenant_key,
                body: event.body,
                attempt: row.attempts,
                received_at_ms: row.received_at_ms,
                lease_until_ms,
            });
        }
        Ok(claimed)
    }

    fn outcome(
        &mut self,
        c: &str,
        app: &str,
        id: &str,
        lease_until_ms: u64,
        outcome: Outcome,
    ) -> Result<bool, StoreError> {
        let Some(old) = self.delivery(c, id, app)? else {
            return Ok(false);
        };
        // The fence: a pending delivery's due time is its current lease's end while claimed.
        if old.state != State::Pending || old.due_ms != lease_until_ms {
            return Ok(false);
        }
        let mut counters = self.counters(c)?;
        let mut row = old.clone();
        match outcome {
            Outcome::Delivered { now_ms } => {
                row.state = State::Delivered;
                row.finished_ms = now_ms;
                counters.last_delivery_ms = counters.last_delivery_ms.max(now_ms);
            }
            Outcome::Retry { next_ms, error } => {
                row.due_ms = next_ms;
                row.last_error = short_error(&error);
                counters.last_error = row.last_error.clone();
            }
            Outcome::Dead { now_ms, error } => {
                row.state = State::Dead;
                row.finished_ms = now_ms;
                row.last_error = short_error(&error);
                counters.last_error = row.last_error.clone();
            }
        }
        self.unindex(c, id, app, &old)?;
        self.index(c, id, app, &row)?;
        counters.leave(old.state);
        counters.enter(row.state);
        self.put_counters(c, &counters)?;
        Ok(true)
    }

    /// Queue a retained delivery again: due now, attempts reset.
    fn requeue(
        &mut self,
        c: &str,
        id: &str,
        app: &str,
        now_ms: u64,
        counters: &mut Counters,
    ) -> Result<bool, StoreError> {
        let Some(old) = self.delivery(c, id, app)? else {
            return Ok(false);
        };
        let row = DeliveryRow::pending(old.received_at_ms, now_ms);
        self.unindex(c, id, app, &old)?;
        self.index(c, id, app, &row)?;
        counters.leave(old.state);
        counters.enter(State::Pending);
        Ok(true)
    }

    fn redeliver(
        &mut self,
        c: &str,
        selector: &Selector,
        now_ms: u64,
        cursor: Option<(u64, String, String)>,
    ) -> Result<Chunk, StoreError> {
        let mut keys: Vec<(u64, String, String)> = Vec::new();
        let upper = after(c);
        match selector {
            Selector::Dead => {
                // Requeued letters leave the index: each chunk starts at the front again.
                for entry in self
                    .dead
                    .range((c, 0, "", "")..(c, now_ms.saturating_add(1), "", ""))
                    .map_err(err)?
                    .take(QUEUE_CHUNK)
                {
                    let (key, _) = entry.map_err(err)?;
                    let (_, at, id, app) = key.value();
                    keys.push((at, id.to_string(), app.to_string()));
                }
            }
            Selector::Window { since_ms, until_ms } => {
                let start = match &cursor {
                    Some((at, id, app)) => Bound::Excluded((c, *at, id.as_str(), app.as_str())),
                    None => Bound::Included((c, *since_ms, "", "")),
                };
                let end = match until_ms.checked_add(1) {
                    Some(end) => Bound::Excluded((c, end, "", "")),
                    None => Bound::Excluded((upper.as_str(), 0, "", "")),
                };
                for entry in self
                    .received
                    .range::<(&str, u64, &str, &str)>((start, end))
                    .map_err(err)?
                    .take(QUEUE_CHUNK)
                {
                    let (key, _) = entry.map_err(err)?;
                    let (_, at, id, app) = key.value();
                    keys.push((at, id.to_string(), app.to_string()));
                }
            }
            Selector::Ids(ids) => {
                for id in ids {
                    for entry in self.deliveries.range((c, id.as_str(), "")..).map_err(err)? {
                        let (key, _) = entry.map_err(err)?;
                        let (kc, kid, app) = key.value();
                        if kc != c || kid != id {
                            break;
                        }
                        keys.push((0, id.clone(), app.to_string()));
                    }
                }
            }
        }
        if matches!(selector, Selector::Ids(_)) {
            // An id named twice is requeued (and counted) once.
            keys.sort();
            keys.dedup();
        }
        let more = !matches!(selector, Selector::Ids(_)) && keys.len() == QUEUE_CHUNK;
        let cursor = keys.last().cloned().filter(|_| more);
        let mut counters = self.counters(c)?;
        let mut done = 0;
        for (_, id, app) in &keys {
            if self.requeue(c, id, app, now_ms, &mut counters)? {
                done += 1;
            }
        }
        if done > 0 {
            self.put_counters(c, &counters)?;
        }
        Ok(Chunk { done, more, cursor })
    }

    fn purge(&mut self, now_ms: u64, retention_ms: u64) -> Result<Chunk, StoreError> {
        let mut marks = Vec::new();
        for entry in self
            .dedupe_expiry
            .range(..(now_ms.saturating_add(1), "", ""))
            .map_err(err)?
            .take(QUEUE_CHUNK)
        {
            let (key, _) = entry.map_err(err)?;
            let (until, app, id) = key.value();
            marks.push((until, app.to_string(), id.to_string()));
        }
        let mut finished = Vec::new();
        if let Some(cutoff) = now_ms.checked_sub(retention_ms) {
            for entry in self
                .finished
                .range(..(cutoff.saturating_add(1), "", "", ""))
                .map_err(err)?
                .take(QUEUE_CHUNK)
            {
                let (key, _) = entry.map_err(err)?;
                let (at, c, id, app) = key.value();
                finished.push((at, c.to_string(), id.to_string(), app.to_string()));
            }
        }
        let more = marks.len() == QUEUE_CHUNK || finished.len() == QUEUE_CHUNK;
        let mut done = 0;
        for (until, app, id) in &marks {
            let (app, id) = (app.as_str(), id.as_str());
            self.dedupe_expiry.remove((*until, app, id)).map_err(err)?;
            let current = self.dedupe.get((app, id)).map_err(err)?.map(|v| v.value());
            if current == Some(*until) {
                self.dedupe.remove((app, id)).map_err(err)?;
            }
            done += 1;
        }
        for (at, c, id, app) in &finished {
            let (c, id, app) = (c.as_str(), id.as_str(), app.as_str());
            let row = self.delivery(c, id, app)?;
            let event = match &row {
                Some(row) => self.event(row.received_at_ms, app, id)?,
                None => None,
            };
            let mut counters = self.counters(c)?;
            self.finished.remove((*at, c, id, app)).map_err(err)?;
            let Some(row) = row else { continue };
            self.unindex(c, id, app, &row)?;
            self.received
                .remove((c, row.received_at_ms, id, app))
                .map_err(err)?;
            self.deliveries.remove((c, id, app)).map_err(err)?;
            counters.leave(row.state);
            self.put_counters(c, &counters)?;
            if let Some(mut event) = event {
                let key = (row.received_at_ms, app, id);
                event.refs = event.refs.saturating_sub(1);
                if event.refs == 0 {
                    self.events.remove(key).map_err(err)?;
                } else {
                    self.events
                        .insert(key, event.encode().as_slice())
                        .map_err(err)?;
                }
            }
            done += 1;
        }
        Ok(Chunk {
            done,
            more,
            cursor: None,
        })
    }
}

/// Stats from the counters and the first pending key: two lookups.
pub(super) fn consumer_stats(txn: &ReadTransaction, c: &str) -> Result<ConsumerStats, StoreError> {
    let consumers = txn.open_table(CONSUMERS).map_err(err)?;
    let counters = match consumers.get(c).map_err(err)? {
        Some(v) => Counters::decode(v.value())?,
        None => Counters::default(),
    };
    let pending = txn.open_table(PENDING).map_err(err)?;
    let upper = after(c);
    let oldest = match pending
        .range((c, 0, "", "")..(upper.as_str(), 0, "", ""))
        .map_err(err)?
        .next()
    {
        Some(entry) => Some(entry.map_err(err)?.0.value().1),
        None => None,
    };
    Ok(counters.stats(oldest))
}

/// Dead letters, newest first: a reverse range over the consumer's dead index.
pub(super) fn dead_letters(
    txn: &ReadTransaction,
    c: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let dead = txn.open_table(DEAD).map_err(err)?;
    let deliveries = txn.open_table(DELIVERIES).map_err(err)?;
    let events = txn.open_table(EVENTS).map_err(err)?;
    let upper = after(c);
    let mut out = Vec::new();
    for entry in dead
        .range((c, 0, "", "")..(upper.as_str(), 0, "", ""))
        .map_err(err)?
        .rev()
        .take(limit)
    {
        let (key, _) = entry.map_err(err)?;
        let (_, dead_at_ms, id, app) = key.value();
        let Some(row) = deliveries.get((c, id, app)).map_err(err)? else {
            continue;
        };
        let row = DeliveryRow::decode(row.value())?;
        let event_type = match events.get((row.received_at_ms, app, id)).map_err(err)? {
            Some(v) => EventRow::decode(v.value())?.event_type,
            None => String::new(),
        };
        out.push(DeadLetter {
            event_id: id.to_string(),
            app_id: app.to_string(),
            event_type,
            attempts: row.attempts,
            last_error: row.last_error,
            received_at_ms: row.received_at_ms,
            dead_at_ms,
        });
    }
    Ok(out)
}

//! The hand-off queue in the redb file: tables, and the writes the writer thread applies.
//!
//! **Layout.** Keys are tuples (redb orders them element by element), so every question the
//! queue asks is a point lookup or a range scan over a prefix; nothing is held per event in
//! memory, and nothing scans the whole queue. Every row a delivery writes is keyed by *time*
//! (arrival, due, finished), never by Feishu's random event id alone: a batch of new events then
//! appends to the right edge of each tree, and a claim or an outcome rewrites recent pages that
//! the batch before touched, instead of one random page per event per table (the first layout,
//! keyed by id, spent most of the writer's time copying and checksumming such pages). Only the
//! dedupe mark is keyed by id, because that is the question it answers.
//!
//! | table | key → value | used by |
//! |---|---|---|
//! | `fwd_events` | (received ms, app, event_id) → header + body (binary, [`EventRow`]) | the body, stored once per event whatever the number of consumers; `refs` counts the deliveries still holding it |
//! | `fwd_marks` | (event_id, app) → (dedupe-until ms, received ms) | enqueue's atomic duplicate check; finds an event's deliveries by id (redeliver by ids, a push after the window). Kept while its event is retained |
//! | `fwd_mark_expiry` | (until ms, app, event_id) → () | purge: expired marks are a prefix range |
//! | `fwd_delivery_rows` | (consumer, received ms, event_id, app) → state, attempts, due, times, last error ([`DeliveryRow`]) | outcomes; redeliver a time window (a range) |
//! | `fwd_due_at` | (consumer, due ms, event_id, app) → received ms | **the claim**: due entries are the range up to `now`; a lease is just a later due time |
//! | `fwd_pending` | (consumer, received ms, event_id, app) → () | the oldest pending event (first key) |
//! | `fwd_dead_at` | (consumer, dead-at ms, event_id, app) → received ms | dead letters newest first (reverse range), redeliver dead |
//! | `fwd_finished_at` | (finished ms, consumer, event_id, app) → received ms | purge after retention: a prefix range |
//! | `fwd_consumers` | consumer → counters ([`Counters`]) | stats without a scan |
//!
//! The index values carry the received time, so every index entry leads straight to its
//! delivery row. Files written by the first layout (before any release) have their queue
//! tables dropped and recreated at open ([`create_tables`]).
//!
//! Each operation touches a handful of rows, and each maps to one atomic script over sorted sets
//! and hashes in Redis (the due/pending/received/dead/finished indexes are sorted sets scored by
//! time, the rows hashes), which is what the Redis backend will do.
//!
//! A write reads and decodes every row it needs before it changes anything, so a malformed row
//! fails that one write without leaving half of it in the batch's transaction.

use std::ops::Bound;

use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, TableHandle, WriteTransaction};
use tokio::sync::oneshot;

use super::queue::{
    short_error, ConsumerStats, Counters, DeadLetter, Delivery, DeliveryRow, Enqueue, EventRow,
    NewEvent, Outcome, Selector, State,
};
use super::StoreError;

type Pair = (&'static str, &'static str);
type ByTime = (&'static str, u64, &'static str, &'static str);
/// A delivery's key: (consumer, received ms, event_id, app).
type Key<'a> = (&'a str, u64, &'a str, &'a str);
type Finished = (u64, &'static str, &'static str, &'static str);

pub(super) const EVENTS: TableDefinition<(u64, &str, &str), &[u8]> =
    TableDefinition::new("fwd_events");
/// (event_id, app) → (dedupe until, received).
const DEDUPE: TableDefinition<Pair, (u64, u64)> = TableDefinition::new("fwd_marks");
const DEDUPE_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("fwd_mark_expiry");
const DELIVERIES: TableDefinition<ByTime, &[u8]> = TableDefinition::new("fwd_delivery_rows");
const DUE: TableDefinition<ByTime, u64> = TableDefinition::new("fwd_due_at");
const PENDING: TableDefinition<ByTime, ()> = TableDefinition::new("fwd_pending");
const DEAD: TableDefinition<ByTime, u64> = TableDefinition::new("fwd_dead_at");
const FINISHED: TableDefinition<Finished, u64> = TableDefinition::new("fwd_finished_at");
const CONSUMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("fwd_consumers");
/// The first layout's tables (keyed by event id), dropped at open: they never shipped.
const FIRST_LAYOUT: [&str; 6] = [
    "fwd_dedupe",
    "fwd_dedupe_expiry",
    "fwd_deliveries",
    "fwd_due",
    "fwd_received",
    "fwd_dead",
];

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

/// Create every queue table (at open, so readers never meet a missing table). A file written
/// by the first layout has its queue dropped first (its events and deliveries with it: that
/// layout never shipped in a release).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    if txn.list_tables()?.any(|t| t.name() == FIRST_LAYOUT[0]) {
        for name in FIRST_LAYOUT.into_iter().chain([
            "fwd_events",
            "fwd_finished",
            "fwd_pending",
            "fwd_consumers",
        ]) {
            txn.delete_table(TableDefinition::<&str, ()>::new(name))?;
        }
    }
    txn.open_table(EVENTS)?;
    txn.open_table(DEDUPE)?;
    txn.open_table(DEDUPE_EXPIRY)?;
    txn.open_table(DELIVERIES)?;
    txn.open_table(DUE)?;
    txn.open_table(PENDING)?;
    txn.open_table(DEAD)?;
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
        received_at_ms: u64,
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
                received_at_ms,
                lease_until_ms,
                outcome,
                reply,
            } => {
                let key = (
                    consumer.as_str(),
                    received_at_ms,
                    event_id.as_str(),
                    app_id.as_str(),
                );
                answer(reply, t.outcome(key, lease_until_ms, outcome))
            }
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
    dedupe: Table<'t, Pair, (u64, u64)>,
    dedupe_expiry: Table<'t, (u64, &'static str, &'static str), ()>,
    deliveries: Table<'t, ByTime, &'static [u8]>,
    due: Table<'t, ByTime, u64>,
    pending: Table<'t, ByTime, ()>,
    dead: Table<'t, ByTime, u64>,
    finished: Table<'t, Finished, u64>,
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
            dead: txn.open_table(DEAD).map_err(err)?,
            finished: txn.open_table(FINISHED).map_err(err)?,
            consumers: txn.open_table(CONSUMERS).map_err(err)?,
        })
    }

    /// A delivery by its key: (consumer, received, event_id, app).
    fn delivery(&self, key: Key<'_>) -> Result<Option<DeliveryRow>, StoreError> {
        match self.deliveries.get(key).map_err(err)? {
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

    /// Remove a delivery's state-dependent index keys (not the row).
    fn unindex(&mut self, key: Key<'_>, row: &DeliveryRow) -> Result<(), StoreError> {
        let (c, _, id, app) = key;
        match row.state {
            State::Pending => {
                self.due.remove((c, row.due_ms, id, app)).map_err(err)?;
                self.pending.remove(key).map_err(err)?;
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
    fn index(&mut self, key: Key<'_>, row: &DeliveryRow) -> Result<(), StoreError> {
        let (c, received, id, app) = key;
        match row.state {
            State::Pending => {
                self.due
                    .insert((c, row.due_ms, id, app), received)
                    .map_err(err)?;
                self.pending.insert(key, ()).map_err(err)?;
            }
            State::Delivered => {
                self.finished
                    .insert((row.finished_ms, c, id, app), received)
                    .map_err(err)?;
            }
            State::Dead => {
                self.finished
                    .insert((row.finished_ms, c, id, app), received)
                    .map_err(err)?;
                self.dead
                    .insert((c, row.finished_ms, id, app), received)
                    .map_err(err)?;
            }
        }
        self.deliveries
            .insert(key, row.encode().as_slice())
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
        let mark = self.dedupe.get((id, app)).map_err(err)?.map(|v| v.value());
        if mark.is_some_and(|(until, _)| until > now) {
            return Ok(Enqueue::Duplicate);
        }
        // Reads first. An event still retained from an earlier push (its dedupe window is over,
        // its mark is kept while the event is) is queued again: its deliveries start over, and
        // move from the earlier push's rows to this one's.
        let earlier = mark.map(|(_, received)| received).filter(|r| *r != now);
        let stored = self.event(now, app, id)?;
        let mut plan = Vec::with_capacity(consumers.len());
        for c in &consumers {
            let same = self.delivery((c, now, id, app))?;
            let moved = match (&same, earlier) {
                (None, Some(received)) => self
                    .delivery((c, received, id, app))?
                    .map(|row| (received, row)),
                _ => None,
            };
            plan.push((same, moved, self.counters(c)?));
        }
        let moved = plan.iter().filter(|(_, m, _)| m.is_some()).count() as u32;
        let fresh = plan.iter().filter(|(same, _, _)| same.is_none()).count() as u32;
        let old_row = match earlier {
            Some(received) if moved > 0 => self.event(received, app, id)?.map(|r| (received, r)),
            _ => None,
        };
        if let Some((received, mut row)) = old_row {
            row.refs = row.refs.saturating_sub(moved);
            if row.refs == 0 {
                self.events.remove((received, app, id)).map_err(err)?;
            } else {
                self.events
                    .insert((received, app, id), row.encode().as_slice())
                    .map_err(err)?;
            }
        }
        if let Some((until, _)) = mark {
            self.dedupe_expiry.remove((until, app, id)).map_err(err)?;
        }
        self.dedupe
            .insert((id, app), (ev.dedupe_until_ms, now))
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
        for (c, (same, moved, mut counters)) in consumers.iter().zip(plan) {
            let key = (c.as_str(), now, id, app);
            if let Some(old) = same {
                self.unindex(key, &old)?;
                counters.leave(old.state);
            }
            if let Some((received, old)) = moved {
                let old_key = (c.as_str(), received, id, app);
                self.unindex(old_key, &old)?;
                self.deliveries.remove(old_key).map_err(err)?;
                counters.leave(old.state);
            }
            self.index(key, &DeliveryRow::pending(now, now))?;
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
            let (key, received) = entry.map_err(err)?;
            let (_, at, id, app) = key.value();
            due.push((at, received.value(), id.to_string(), app.to_string()));
        }
        let lease_until_ms = now_ms.saturating_add(lease_ms);
        let mut claimed = Vec::with_capacity(due.len());
        for (at, received, id, app) in due {
            let (id, app) = (id.as_str(), app.as_str());
            let key = (c, received, id, app);
            let row = self.delivery(key)?;
            let event = match &row {
                Some(_) => self.event(received, app, id)?,
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
                .insert((c, lease_until_ms, id, app), received)
                .map_err(err)?;
            self.deliveries
                .insert(key, row.encode().as_slice())
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
        key: Key<'_>,
        lease_until_ms: u64,
        outcome: Outcome,
    ) -> Result<bool, StoreError> {
        let Some(old) = self.delivery(key)? else {
            return Ok(false);
        };
        // The fence: a pending delivery's due time is its current lease's end while claimed.
        if old.state != State::Pending || old.due_ms != lease_until_ms {
            return Ok(false);
        }
        let c = key.0;
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
        self.unindex(key, &old)?;
        self.index(key, &row)?;
        counters.leave(old.state);
        counters.enter(row.state);
        self.put_counters(c, &counters)?;
        Ok(true)
    }

    /// Queue a retained delivery again: due now, attempts reset.
    fn requeue(
        &mut self,
        key: Key<'_>,
        now_ms: u64,
        counters: &mut Counters,
    ) -> Result<bool, StoreError> {
        let Some(old) = self.delivery(key)? else {
            return Ok(false);
        };
        let row = DeliveryRow::pending(old.received_at_ms, now_ms);
        self.unindex(key, &old)?;
        self.index(key, &row)?;
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
        // (received, event_id, app) of each delivery to queue again.
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
                    let (key, received) = entry.map_err(err)?;
                    let (_, _, id, app) = key.value();
                    keys.push((received.value(), id.to_string(), app.to_string()));
                }
            }
            Selector::Window { since_ms, until_ms } => {
                // The delivery rows are keyed by received time: the window is one range.
                let start = match &cursor {
                    Some((at, id, app)) => Bound::Excluded((c, *at, id.as_str(), app.as_str())),
                    None => Bound::Included((c, *since_ms, "", "")),
                };
                let end = match until_ms.checked_add(1) {
                    Some(end) => Bound::Excluded((c, end, "", "")),
                    None => Bound::Excluded((upper.as_str(), 0, "", "")),
                };
                for entry in self
                    .deliveries
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
                // The marks, keyed by id first, name every app's event with that id and when
                // it was received.
                for id in ids {
                    for entry in self.dedupe.range((id.as_str(), "")..).map_err(err)? {
                        let (key, mark) = entry.map_err(err)?;
                        let (kid, app) = key.value();
                        if kid != id {
                            break;
                        }
                        keys.push((mark.value().1, id.clone(), app.to_string()));
                    }
                }
                // An id named twice is requeued (and counted) once.
                keys.sort();
                keys.dedup();
            }
        }
        let more = !matches!(selector, Selector::Ids(_)) && keys.len() == QUEUE_CHUNK;
        let cursor = keys.last().cloned().filter(|_| more);
        let mut counters = self.counters(c)?;
        let mut done = 0;
        for (received, id, app) in &keys {
            if self.requeue((c, *received, id, app), now_ms, &mut counters)? {
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
                let (key, received) = entry.map_err(err)?;
                let (at, c, id, app) = key.value();
                finished.push((
                    at,
                    c.to_string(),
                    received.value(),
                    id.to_string(),
                    app.to_string(),
                ));
            }
        }
        let more = marks.len() == QUEUE_CHUNK || finished.len() == QUEUE_CHUNK;
        let mut done = 0;
        // An expired mark goes, unless its event is still retained (it then finds the event by
        // id; the event's own purge removes the mark).
        for (until, app, id) in &marks {
            let (app, id) = (app.as_str(), id.as_str());
            self.dedupe_expiry.remove((*until, app, id)).map_err(err)?;
            let current = self.dedupe.get((id, app)).map_err(err)?.map(|v| v.value());
            if let Some((mark_until, received)) = current {
                if mark_until == *until && self.event(received, app, id)?.is_none() {
                    self.dedupe.remove((id, app)).map_err(err)?;
                }
            }
            done += 1;
        }
        for (at, c, received, id, app) in &finished {
            let key = (c.as_str(), *received, id.as_str(), app.as_str());
            let (c, id, app) = (key.0, key.2, key.3);
            let row = self.delivery(key)?;
            let event = match &row {
                Some(_) => self.event(*received, app, id)?,
                None => None,
            };
            let mut counters = self.counters(c)?;
            self.finished.remove((*at, c, id, app)).map_err(err)?;
            let Some(row) = row else { continue };
            self.unindex(key, &row)?;
            self.deliveries.remove(key).map_err(err)?;
            counters.leave(row.state);
            self.put_counters(c, &counters)?;
            if let Some(mut event) = event {
                let event_key = (*received, app, id);
                event.refs = event.refs.saturating_sub(1);
                if event.refs == 0 {
                    self.events.remove(event_key).map_err(err)?;
                    // The event's mark goes with it once its window is over (a mark still in
                    // its window is removed by its expiry entry).
                    let mark = self.dedupe.get((id, app)).map_err(err)?.map(|v| v.value());
                    if mark.is_some_and(|(until, r)| r == *received && until <= now_ms) {
                        self.dedupe.remove((id, app)).map_err(err)?;
                    }
                } else {
                    self.events
                        .insert(event_key, event.encode().as_slice())
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
        let (key, received) = entry.map_err(err)?;
        let (_, dead_at_ms, id, app) = key.value();
        let received = received.value();
        let Some(row) = deliveries.get((c, received, id, app)).map_err(err)? else {
            continue;
        };
        let row = DeliveryRow::decode(row.value())?;
        let event_type = match events.get((received, app, id)).map_err(err)? {
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

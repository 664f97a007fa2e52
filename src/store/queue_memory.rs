//! The hand-off queue in process memory (the memory backend's half of `store::queue`): the
//! same rows as the embedded layout, in ordered maps. The memory backend is for tests and
//! throwaway runs, so stats and dead letters scan instead of keeping indexes of their own.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::queue::{
    short_error, ConsumerStats, DeadLetter, Delivery, DeliveryRow, Enqueue, EventRow, NewEvent,
    Outcome, Selector, State,
};

/// (consumer, event_id, app_id)
type Key = (String, String, String);

#[derive(Debug, Default)]
pub(super) struct MemoryQueue {
    /// (app_id, event_id) → event.
    events: HashMap<(String, String), EventRow>,
    /// (app_id, event_id) → dedupe until.
    dedupe: HashMap<(String, String), u64>,
    deliveries: BTreeMap<Key, DeliveryRow>,
    /// (consumer, due, event_id, app_id) of pending deliveries.
    due: BTreeSet<(String, u64, String, String)>,
    /// consumer → (last delivery ms, last error).
    last: HashMap<String, (u64, String)>,
}

impl MemoryQueue {
    fn set(&mut self, key: &Key, row: DeliveryRow) {
        if let Some(old) = self.deliveries.get(key) {
            if old.state == State::Pending {
                self.due
                    .remove(&(key.0.clone(), old.due_ms, key.1.clone(), key.2.clone()));
            }
        }
        if row.state == State::Pending {
            self.due
                .insert((key.0.clone(), row.due_ms, key.1.clone(), key.2.clone()));
        }
        self.deliveries.insert(key.clone(), row);
    }

    pub fn enqueue(&mut self, ev: NewEvent, mut consumers: Vec<String>) -> Enqueue {
        consumers.sort();
        consumers.dedup();
        if consumers.is_empty() {
            return Enqueue::Queued;
        }
        let id = (ev.app_id.clone(), ev.event_id.clone());
        let now = ev.received_at_ms;
        if self.dedupe.get(&id).is_some_and(|&until| until > now) {
            return Enqueue::Duplicate;
        }
        self.dedupe.insert(id.clone(), ev.dedupe_until_ms);
        let mut refs = self.events.get(&id).map_or(0, |e| e.refs);
        for c in consumers {
            let key = (c, ev.event_id.clone(), ev.app_id.clone());
            if !self.deliveries.contains_key(&key) {
                refs += 1;
            }
            self.set(&key, DeliveryRow::pending(now, now));
        }
        self.events.insert(
            id,
            EventRow {
                received_at_ms: now,
                refs,
                event_type: ev.event_type,
                tenant_key: ev.tenant_key,
                body: ev.body,
            },
        );
        Enqueue::Queued
    }

    pub fn claim(&mut self, c: &str, now_ms: u64, lease_ms: u64, limit: usize) -> Vec<Delivery> {
        let start = (c.to_string(), 0, String::new(), String::new());
        let end = (
            c.to_string(),
            now_ms.saturating_add(1),
            String::new(),
            String::new(),
        );
        let due: Vec<_> = self.due.range(start..end).take(limit).cloned().collect();
        let lease_until_ms = now_ms.saturating_add(lease_ms);
        let mut out = Vec::new();
        for (c, _, id, app) in due {
            let key = (c, id, app);
            let Some(event) = self.events.get(&(key.2.clone(), key.1.clone())).cloned() else {
                continue;
            };
            let Some(mut row) = self.deliveries.get(&key).cloned() else {
                continue;
            };
            row.attempts += 1;
            row.due_ms = lease_until_ms;
            out.push(Delivery {
                consumer: key.0.clone(),
                app_id: key.2.clone(),
                event_id: key.1.clone(),
                event_type: event.event_type,
                tenant_key: event.tenant_key,
                body: event.body,
                attempt: row.attempts,
                received_at_ms: row.received_at_ms,
                lease_until_ms,
            });
            self.set(&key, row);
        }
        out
    }

    /// Apply an attempt's outcome while its lease is the delivery's current one.
    pub fn outcome(&mut self, claimed: &Delivery, outcome: Outcome) -> bool {
        let key = (
            claimed.consumer.clone(),
            claimed.event_id.clone(),
            claimed.app_id.clone(),
        );
        let Some(mut row) = self.deliveries.get(&key).cloned() else {
            return false;
        };
        if row.state != State::Pending || row.due_ms != claimed.lease_until_ms {
            return false;
        }
        let c = key.0.as_str();
        match outcome {
            Outcome::Delivered { now_ms } => {
                row.state = State::Delivered;
                row.finished_ms = now_ms;
                let last = self.last.entry(c.to_string()).or_default();
                last.0 = last.0.max(now_ms);
            }
            Outcome::Retry { next_ms, error } => {
                row.due_ms = next_ms;
                row.last_error = short_error(&error);
                self.last.entry(c.to_string()).or_default().1 = row.last_error.clone();
            }
            Outcome::Dead { now_ms, error } => {
                row.state = State::Dead;
                row.finished_ms = now_ms;
                row.last_error = short_error(&error);
                self.last.entry(c.to_string()).or_default().1 = row.last_error.clone();
            }
        }
        self.set(&key, row);
        true
    }

    fn of<'a>(&'a self, c: &'a str) -> impl Iterator<Item = (&'a Key, &'a DeliveryRow)> + 'a {
        self.deliveries
            .range((c.to_string(), String::new(), String::new())..)
            .take_while(move |(k, _)| k.0 == c)
    }

    pub fn stats(&self, c: &str) -> ConsumerStats {
        let mut stats = ConsumerStats::default();
        for (_, row) in self.of(c) {
            match row.state {
                State::Pending => {
                    stats.pending += 1;
                    let oldest = stats.oldest_pending_received_at_ms.get_or_insert(u64::MAX);
                    *oldest = (*oldest).min(row.received_at_ms);
                }
                State::Delivered => stats.delivered += 1,
                State::Dead => stats.dead += 1,
            }
        }
        if let Some((at, error)) = self.last.get(c) {
            stats.last_delivery_at_ms = (*at > 0).then_some(*at);
            stats.last_error = (!error.is_empty()).then(|| error.clone());
        }
        stats
    }

    pub fn dead_letters(&self, c: &str, limit: usize) -> Vec<DeadLetter> {
        let mut dead: Vec<DeadLetter> = self
            .of(c)
            .filter(|(_, row)| row.state == State::Dead)
            .map(|(key, row)| DeadLetter {
                event_id: key.1.clone(),
                app_id: key.2.clone(),
                event_type: self
                    .events
                    .get(&(key.2.clone(), key.1.clone()))
                    .map(|e| e.event_type.clone())
                    .unwrap_or_default(),
                attempts: row.attempts,
                last_error: row.last_error.clone(),
                received_at_ms: row.received_at_ms,
                dead_at_ms: row.finished_ms,
            })
            .collect();
        // Newest first, ties in the embedded backend's (reversed key) order.
        dead.sort_by(|a, b| {
            (b.dead_at_ms, &b.event_id, &b.app_id).cmp(&(a.dead_at_ms, &a.event_id, &a.app_id))
        });
        dead.truncate(limit);
        dead
    }

    pub fn redeliver(&mut self, c: &str, selector: &Selector, now_ms: u64) -> usize {
        let keys: Vec<Key> = self
            .of(c)
            .filter(|(key, row)| match selector {
                Selector::Dead => row.state == State::Dead && row.finished_ms <= now_ms,
                Selector::Window { since_ms, until_ms } => {
                    (*since_ms..=*until_ms).contains(&row.received_at_ms)
                }
                Selector::Ids(ids) => ids.contains(&key.1),
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            let received = self.deliveries[key].received_at_ms;
            self.set(key, DeliveryRow::pending(received, now_ms));
        }
        keys.len()
    }

    pub fn purge(&mut self, now_ms: u64, retention_ms: u64) -> usize {
        let before = self.dedupe.len();
        self.dedupe.retain(|_, until| *until > now_ms);
        let mut done = before - self.dedupe.len();
        let Some(cutoff) = now_ms.checked_sub(retention_ms) else {
            return done;
        };
        let gone: Vec<Key> = self
            .deliveries
            .iter()
            .filter(|(_, row)| row.state != State::Pending && row.finished_ms <= cutoff)
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.deliveries.remove(&key);
            let id = (key.2, key.1);
            if let Some(event) = self.events.get_mut(&id) {
                event.refs = event.refs.saturating_sub(1);
                if event.refs == 0 {
                    self.events.remove(&id);
                }
            }
            done += 1;
        }
        done
    }
}

//! The event hand-off queue's records: what intake enqueues, what the deliverer claims, what
//! operators read — shared by every backend (the backends hold the storage, this module the
//! shapes and the compact row encodings).
//!
//! **Semantics (every backend).**
//! * [`Store::enqueue_event`](super::Store::enqueue_event) dedupes on `(app_id, event_id)` for
//!   the dedupe window and, in the same atomic (and, embedded, fsynced) write, stores the event
//!   once and one delivery per consumer, due at once. With no consumers nothing is stored.
//! * [`Store::claim_due`](super::Store::claim_due) hands out up to `limit` deliveries whose next
//!   attempt is due (oldest due first) and *leases* them: their next attempt moves to
//!   `now + lease`. A process that crashes mid-attempt never reports an outcome, so the lease
//!   runs out and the delivery is claimed again — no coordinator, no recovery step at start-up
//!   (Convoy's leased claims). The lease is the due time itself, so "due" and "lease expired"
//!   are one range scan.
//! * Outcomes ([`delivered`](super::Store::delivered), [`retry_later`](super::Store::retry_later),
//!   [`dead`](super::Store::dead)) apply only to a pending delivery (a late outcome for a
//!   delivery that is already delivered or dead changes nothing) and commit **without fsync**:
//!   a crash can lose the last outcomes, and a lost "delivered" means the delivery is still
//!   pending with its lease, so it is claimed and sent once more after the lease — one
//!   duplicate, which at-least-once allows — and a lost "retry later"/"dead" means one more
//!   attempt. Nothing acknowledged to Feishu is ever lost: only the enqueue must be durable.
//! * Delivered and dead deliveries are kept for `retention` (for redelivery), then
//!   [`purge_forwarding`](super::Store::purge_forwarding) removes them, and the event's body
//!   once no delivery refers to it; expired dedupe marks likewise.
//!
//! Deliveries are named by `(consumer, app_id, event_id)`: an event id is unique per app, and
//! two apps may (in tests, at least) use the same one.

use bytes::Bytes;

use super::StoreError;

/// An event to hand on, as intake passes it to [`Store::enqueue_event`](super::Store::enqueue_event).
#[derive(Clone)]
pub struct NewEvent {
    pub app_id: String,
    /// `header.event_id` (schema 2.0) or `uuid` (1.0): the dedupe key and the `webhook-id`.
    pub event_id: String,
    pub event_type: String,
    /// The tenant the event names, if any (`lark-tenant-key`).
    pub tenant_key: Option<String>,
    /// When Feishu's POST arrived, unix ms. Also "now" for the dedupe check.
    pub received_at_ms: u64,
    /// The dedupe mark holds until then (received_at + dedupe_window), unix ms.
    pub dedupe_until_ms: u64,
    /// The exact bytes to POST to consumers (the Verification Token already removed).
    pub body: Bytes,
}

impl std::fmt::Debug for NewEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body is the customer's data: never in Debug output.
        f.debug_struct("NewEvent")
            .field("app_id", &self.app_id)
            .field("event_id", &self.event_id)
            .field("event_type", &self.event_type)
            .field("received_at_ms", &self.received_at_ms)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueue {
    /// Stored for every consumer (or nothing to store: no consumers).
    Queued,
    /// The event id was seen within its dedupe window: nothing stored.
    Duplicate,
}

/// One claimed delivery: everything the deliverer needs for one attempt.
#[derive(Clone, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: String,
    pub app_id: String,
    pub event_id: String,
    pub event_type: String,
    pub tenant_key: Option<String>,
    pub body: Bytes,
    /// This attempt's number, 1-based (attempts are counted when claimed, so an attempt cut
    /// short by a crash counts too). After a failure of attempt `n`, wait `retry_schedule[n-1]`;
    /// with no step left, the delivery is dead.
    pub attempt: u32,
    pub received_at_ms: u64,
    /// The claim's lease: unless an outcome is reported before then, the delivery is due again.
    pub lease_until_ms: u64,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("consumer", &self.consumer)
            .field("app_id", &self.app_id)
            .field("event_id", &self.event_id)
            .field("event_type", &self.event_type)
            .field("attempt", &self.attempt)
            .field("received_at_ms", &self.received_at_ms)
            .field("lease_until_ms", &self.lease_until_ms)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// A dead letter, as `GET /v1/consumers/{name}/dead` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub event_id: String,
    pub app_id: String,
    pub event_type: String,
    pub attempts: u32,
    pub last_error: String,
    pub received_at_ms: u64,
    pub dead_at_ms: u64,
}

/// Per-consumer figures for `GET /v1/consumers`, metrics and `status`. Counts are of the
/// deliveries held now (delivered and dead ones until they are purged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    pub pending: u64,
    pub dead: u64,
    pub delivered: u64,
    pub oldest_pending_received_at_ms: Option<u64>,
    pub last_delivery_at_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// Which retained deliveries of a consumer [`Store::redeliver`](super::Store::redeliver) queues
/// again (due now, attempts reset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every dead letter (dead at or before the redeliver's `now_ms`).
    Dead,
    /// Every retained delivery of an event received in `[since_ms, until_ms]`, whatever its state.
    Window { since_ms: u64, until_ms: u64 },
    /// These event ids (of any app).
    Ids(Vec<String>),
}

/// An attempt's outcome, as the deliverer reports it.
pub(crate) enum Outcome {
    Delivered { now_ms: u64 },
    Retry { next_ms: u64, error: String },
    Dead { now_ms: u64, error: String },
}

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Pending = 0,
    Delivered = 1,
    Dead = 2,
}

/// The stored event: header fields and the body, once per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventRow {
    pub received_at_ms: u64,
    /// Deliveries still referring to this event; it is deleted when the last one is purged.
    pub refs: u32,
    pub event_type: String,
    pub tenant_key: Option<String>,
    pub body: Bytes,
}

/// One consumer's delivery of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeliveryRow {
    pub state: State,
    /// Attempts claimed so far.
    pub attempts: u32,
    /// Pending: its key in the due index (next attempt or lease end).
    pub due_ms: u64,
    pub received_at_ms: u64,
    /// Delivered or dead: when.
    pub finished_ms: u64,
    pub last_error: String,
}

/// The per-consumer counters (kept in step with the deliveries, so stats never scan).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub pending: u64,
    pub dead: u64,
    pub delivered: u64,
    /// 0: never.
    pub last_delivery_ms: u64,
    pub last_error: String,
}

fn corrupt(what: &str) -> StoreError {
    StoreError::new(format!("a stored {what} record is malformed"))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn str16(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Event types and tenant keys are short; a longer one is cut at a char boundary.
    let mut n = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

const ROW_VERSION: u8 = 1;

impl EventRow {
    /// `[v][received u64][refs u32][type str16][has_tenant u8][tenant str16?][body…]`:
    /// binary, so a 1 KB body is stored as 1 KB (JSON would escape it).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 32 + self.event_type.len());
        out.push(ROW_VERSION);
        out.extend_from_slice(&self.received_at_ms.to_le_bytes());
        out.extend_from_slice(&self.refs.to_le_bytes());
        put_str16(&mut out, &self.event_type);
        match &self.tenant_key {
            Some(t) => {
                out.push(1);
                put_str16(&mut out, t);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<EventRow, StoreError> {
        let mut r = Reader(bytes);
        (|| {
            if r.u8()? != ROW_VERSION {
                return None;
            }
            let received_at_ms = r.u64()?;
            let refs = r.u32()?;
            let event_type = r.str16()?;
            let tenant_key = match r.u8()? {
                0 => None,
                _ => Some(r.str16()?),
            };
            Some(EventRow {
                received_at_ms,
                refs,
                event_type,
                tenant_key,
                body: Bytes::copy_from_slice(r.0),
            })
        })()
        .ok_or_else(|| corrupt("event"))
    }
}

impl DeliveryRow {
    pub fn pending(received_at_ms: u64, due_ms: u64) -> DeliveryRow {
        DeliveryRow {
            state: State::Pending,
            attempts: 0,
            due_ms,
            received_at_ms,
            finished_ms: 0,
            last_error: String::new(),
        }
    }

    /// `[v][state u8][attempts u32][due u64][received u64][finished u64][last_error…]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(30 + self.last_error.len());
        out.push(ROW_VERSION);
        out.push(self.state as u8);
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&self.due_ms.to_le_bytes());
        out.extend_from_slice(&self.received_at_ms.to_le_bytes());
        out.extend_from_slice(&self.finished_ms.to_le_bytes());
        out.extend_from_slice(self.last_error.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<DeliveryRow, StoreError> {
        let mut r = Reader(bytes);
        (|| {
            if r.u8()? != ROW_VERSION {
                return None;
            }
            let state = match r.u8()? {
                0 => State::Pending,
                1 => State::Delivered,
                2 => State::Dead,
                _ => return None,
            };
            Some(DeliveryRow {
                state,
                attempts: r.u32()?,
                due_ms: r.u64()?,
                received_at_ms: r.u64()?,
                finished_ms: r.u64()?,
                last_error: String::from_utf8(r.0.to_vec()).ok()?,
            })
        })()
        .ok_or_else(|| corrupt("delivery"))
    }
}

impl Counters {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(33 + self.last_error.len());
        out.push(ROW_VERSION);
        for n in [
            self.pending,
            self.dead,
            self.delivered,
            self.last_delivery_ms,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(self.last_error.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Counters, StoreError> {
        let mut r = Reader(bytes);
        (|| {
            if r.u8()? != ROW_VERSION {
                return None;
            }
            Some(Counters {
                pending: r.u64()?,
                dead: r.u64()?,
                delivered: r.u64()?,
                last_delivery_ms: r.u64()?,
                last_error: String::from_utf8(r.0.to_vec()).ok()?,
            })
        })()
        .ok_or_else(|| corrupt("consumer counters"))
    }

    pub fn stats(&self, oldest_pending_received_at_ms: Option<u64>) -> ConsumerStats {
        ConsumerStats {
            pending: self.pending,
            dead: self.dead,
            delivered: self.delivered,
            oldest_pending_received_at_ms,
            last_delivery_at_ms: (self.last_delivery_ms > 0).then_some(self.last_delivery_ms),
            last_error: (!self.last_error.is_empty()).then(|| self.last_error.clone()),
        }
    }

    /// A delivery leaves `from` (`None`: it is new).
    pub fn leave(&mut self, from: State) {
        let n = match from {
            State::Pending => &mut self.pending,
            State::Delivered => &mut self.delivered,
            State::Dead => &mut self.dead,
        };
        *n = n.saturating_sub(1);
    }

    pub fn enter(&mut self, to: State) {
        match to {
            State::Pending => self.pending += 1,
            State::Delivered => self.delivered += 1,
            State::Dead => self.dead += 1,
        }
    }
}

/// Keep a stored error short: consumer answers can be large.
pub(crate) fn short_error(e: &str) -> String {
    const MAX: usize = 512;
    if e.len() <= MAX {
        return e.to_string();
    }
    let mut n = MAX;
    while !e.is_char_boundary(n) {
        n -= 1;
    }
    format!("{}…", &e[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip() {
        let event = EventRow {
            received_at_ms: 7,
            refs: 3,
            event_type: "im.message.receive_v1".into(),
            tenant_key: Some("t-1".into()),
            body: Bytes::from_static(b"{\"a\":\"\\u00e9\"}\x00\xff"),
        };
        assert_eq!(EventRow::decode(&event.encode()).unwrap(), event);
        let untenanted = EventRow {
            tenant_key: None,
            body: Bytes::new(),
            ..event
        };
        assert_eq!(EventRow::decode(&untenanted.encode()).unwrap(), untenanted);
        let mut row = DeliveryRow::pending(5, 6);
        row.state = State::Dead;
        row.attempts = 9;
        row.finished_ms = 10;
        row.last_error = "HTTP 500 é".into();
        assert_eq!(DeliveryRow::decode(&row.encode()).unwrap(), row);
        let counters = Counters {
            pending: 1,
            dead: 2,
            delivered: 3,
            last_delivery_ms: 4,
            last_error: "x".into(),
        };
        assert_eq!(Counters::decode(&counters.encode()).unwrap(), counters);
        assert!(DeliveryRow::decode(b"\x01\x07").is_err());
        assert!(EventRow::decode(b"").is_err());
    }

    #[test]
    fn long_errors_are_cut_at_a_char_boundary() {
        let e = "é".repeat(1000);
        let s = short_error(&e);
        assert!(s.len() <= 512 + "…".len());
        assert!(s.ends_with('…'));
    }
}

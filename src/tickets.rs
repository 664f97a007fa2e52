//! Ticket bookkeeping: the one home of the App Ticket between intake, which receives it, and the
//! token broker, which spends it.
//!
//! What it owns:
//! * **Storing a pushed ticket** ([`Tickets::store_pushed`]): newest-wins through the store
//!   ([`crate::store::merge_ticket`]), counted, logged by fingerprint. Whether the push arrived
//!   on Feishu's schedule or answers a resend request of ours ([`TicketSource`]) is decided
//!   here, before the write. Storing and waking the waiters is one step that always completes:
//!   it runs as its own task, so a request whose client disconnects (hyper then drops its
//!   future) cannot leave a committed ticket unannounced and its waiters asleep until their
//!   timeout.
//! * **The wake-up channels**: one `watch` per configured app, bumped whenever a ticket is
//!   stored as the newest. Token requests waiting for a ticket subscribe to it
//!   ([`Tickets::ticket_watch`]); its value is also the app's ticket *generation*
//!   ([`Tickets::generation`]), which the broker compares to forget a failure remembered before
//!   the new ticket.
//! * **Resend bookkeeping**: at most one resend request per app per `tickets.resend_interval`
//!   across all callers ([`Tickets::request_resend`]), its outcome ([`ResendStatus`], shown by
//!   the status API), and whether a push is still awaited for it.
//! * **The current ticket** ([`Tickets::current`]): the stored ticket unless Feishu refused it;
//!   otherwise a resend is requested and the push awaited for up to `tickets.resend_wait` — but
//!   only when a push is actually on its way: with none requested now (inside the interval) and
//!   none awaiting its push, the answer is `503 ticket_missing` at once.
//! * **Demotion** after Feishu's `10012` ([`Tickets::demote`]), so the next different ticket
//!   replaces the refused one whatever its event time.
//!
//! Layering: this module sits above the store and below both intake ([`crate::events`]) and the
//! broker ([`crate::tokens`]); it imports neither. The request to Feishu itself belongs to the
//! broker's Open Platform client, so the broker hands [`Tickets::request_resend`] the call to make
//! and this module decides whether to make it and keeps its outcome.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::config::{Config, TicketConfig};
use crate::error::{Error, ErrorKind};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::{Store, TicketRecord, TicketSource, TicketWrite};

/// The outcome of the last resend request for an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ResendOutcome {
    Pending,
    Accepted,
    Failed { code: Option<i64>, message: String },
}

/// Resend bookkeeping for one app.
#[derive(Debug, Clone)]
pub struct ResendStatus {
    pub requested_at_ms: u64,
    pub outcome: ResendOutcome,
    /// A push has not arrived since the request.
    pub awaiting_push: bool,
}

/// An authentic `app_ticket` push, as intake hands it over.
#[derive(Debug)]
pub struct PushedTicket {
    pub ticket: Secret,
    /// The push's event time, microseconds since the epoch (orders tickets).
    pub event_time_us: i64,
    /// The push's `uuid`.
    pub event_id: String,
    /// When we received it, unix milliseconds.
    pub received_at_ms: u64,
}

struct Inner {
    cfg: TicketConfig,
    store: Store,
    clock: SharedClock,
    metrics: Metrics,
    /// Bumped whenever a ticket is stored as the newest for the app: wakes waiting callers.
    signals: HashMap<String, watch::Sender<u64>>,
    resends: Mutex<HashMap<String, ResendStatus>>,
}

/// The ticket bookkeeping handle. Cheap to clone.
#[derive(Clone)]
pub struct Tickets(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations that cannot leave a map half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tickets {
    pub fn new(config: &Config, store: Store, clock: SharedClock, metrics: Metrics) -> Tickets {
        let signals = config
            .apps
            .iter()
            .map(|a| (a.app_id.clone(), watch::channel(0u64).0))
            .collect();
        Tickets(Arc::new(Inner {
            cfg: config.tickets.clone(),
            store,
            clock,
            metrics,
            signals,
            resends: Mutex::new(HashMap::new()),
        }))
    }

    /// Store a pushed ticket (if it is the newest) and wake whoever waits for one. Returns only
    /// once the write is durable; the write and the wake-up complete even if the caller's future
    /// is dropped meanwhile.
    pub async fn store_pushed(
        &self,
        app_id: String,
        pushed: PushedTicket,
    ) -> Result<TicketWrite, Error> {
        let source = if self.resend_pending(&app_id) {
            TicketSource::Resend
        } else {
            TicketSource::Push
        };
        let record = TicketRecord {
            ticket: pushed.ticket,
            event_time_us: pushed.event_time_us,
            event_id: pushed.event_id,
            received_at_ms: pushed.received_at_ms,
            source,
            pushes_seen: 0,
            rejected: false,
        };
        // Its own task: once started it commits *and* wakes the waiters, even if this
        // request's future is dropped meanwhile (the client went away).
        let task = tokio::spawn(self.clone().store_and_signal(app_id, record));
        task.await.map_err(|e| {
            Error::from(ErrorKind::Internal)
                .with_cause(format!("the ticket write task failed: {e}"))
        })?
    }

    /// Store a ticket, count it, and wake whoever waits for one: the step
    /// [`Tickets::store_pushed`] runs as a task.
    async fn store_and_signal(
        self,
        app_id: String,
        record: TicketRecord,
    ) -> Result<TicketWrite, Error> {
        let fingerprint = record.ticket.fingerprint();
        let via = match record.source {
            TicketSource::Push => "push",
            TicketSource::Resend => "resend",
        };
        let write = self.0.store.put_ticket(&app_id, record).await?;
        let stored = write == TicketWrite::Stored;
        self.0.metrics.ticket_push(&app_id, via, stored);
        if stored {
            self.stored(&app_id);
        }
        tracing::info!(
            app_id = %app_id,
            ticket = %fingerprint,
            stored,
            "app_ticket received"
        );
        Ok(write)
    }

    /// A ticket was stored as the newest: the resend (if any) is answered, and callers waiting
    /// for a ticket wake up (the bumped generation also tells the broker to forget the app's
    /// remembered failure).
    fn stored(&self, app_id: &str) {
        if let Some(status) = lock(&self.0.resends).get_mut(app_id) {
            status.awaiting_push = false;
        }
        if let Some(signal) = self.0.signals.get(app_id) {
            signal.send_modify(|v| *v += 1);
        }
    }

    /// A receiver that changes whenever a ticket is stored as the newest for `app_id`.
    pub fn ticket_watch(&self, app_id: &str) -> Option<watch::Receiver<u64>> {
        self.0.signals.get(app_id).map(watch::Sender::subscribe)
    }

    /// How many token requests are waiting for a ticket of `app_id` to be pushed.
    pub fn ticket_waiters(&self, app_id: &str) -> usize {
        self.0
            .signals
            .get(app_id)
            .map_or(0, watch::Sender::receiver_count)
    }

    /// How many tickets have been stored as the newest for `app_id` since the start (0 for an
    /// unknown app): changes exactly when [`Tickets::ticket_watch`] fires.
    pub fn generation(&self, app_id: &str) -> u64 {
        self.0.signals.get(app_id).map_or(0, |s| *s.borrow())
    }

    /// The stored ticket of `app_id`, unless Feishu refused it or it is `not`; otherwise request
    /// a resend (`request_resend` makes the request and says whether it was sent now) and wait
    /// for the push, up to `tickets.resend_wait`. Waits only if a push is actually on its way:
    /// with no resend requested now and none awaiting its push, nothing would wake us, so the
    /// answer is `ticket_missing` at once.
    pub async fn current(
        &self,
        app_id: &str,
        not: Option<&Secret>,
        request_resend: impl FnOnce() -> bool,
    ) -> Result<Secret, Error> {
        // Subscribe before looking, so a push landing in between still wakes us.
        let mut signal = self
            .ticket_watch(app_id)
            .ok_or_else(|| Error::from(ErrorKind::UnknownApp))?;
        let refused;
        let not = match self.0.store.ticket(app_id).await? {
            Some(t) if usable(&t, not) => return Ok(t.ticket),
            // Not usable and no `not`: Feishu refused the stored one; wait for another.
            Some(t) if not.is_none() => {
                refused = t.ticket;
                Some(&refused)
            }
            _ => not,
        };
        let requested = request_resend();
        if !requested && !self.resend_pending(app_id) {
            return Err(Error::new(
                ErrorKind::TicketMissing,
                "no usable app_ticket for this app; a resend was requested recently and Feishu has not pushed a new one yet, retry later",
            ));
        }
        self.wait_for_push(app_id, &mut signal, not).await
    }

    async fn wait_for_push(
        &self,
        app_id: &str,
        signal: &mut watch::Receiver<u64>,
        not: Option<&Secret>,
    ) -> Result<Secret, Error> {
        let wait = async {
            loop {
                if signal.changed().await.is_err() {
                    return Ok(None);
                }
                if let Some(t) = self.0.store.ticket(app_id).await? {
                    if usable(&t, not) {
                        return Ok(Some(t.ticket));
                    }
                }
            }
        };
        match tokio::time::timeout(self.0.cfg.resend_wait, wait).await {
            Ok(Ok(Some(ticket))) => Ok(ticket),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) | Err(_) => Err(Error::new(
                ErrorKind::TicketMissing,
                "no usable app_ticket for this app yet; a resend was requested, retry shortly",
            )),
        }
    }

    /// Ask Feishu to push the ticket of `app_id` again, at most once per app per
    /// `tickets.resend_interval`: if this call may, `call` (the request to Feishu, made by the
    /// broker's Open Platform client) runs in the background and its outcome is recorded.
    /// Returns whether a request was sent now.
    pub fn request_resend<F>(&self, app_id: &str, call: F) -> bool
    where
        F: Future<Output = ResendOutcome> + Send + 'static,
    {
        if !self.0.signals.contains_key(app_id) {
            return false;
        }
        let now = self.0.clock.now_ms();
        let interval = self.0.cfg.resend_interval.as_millis() as u64;
        {
            let mut resends = lock(&self.0.resends);
            if let Some(last) = resends.get(app_id) {
                if now.saturating_sub(last.requested_at_ms) < interval {
                    return false;
                }
            }
            resends.insert(
                app_id.to_string(),
                ResendStatus {
                    requested_at_ms: now,
                    outcome: ResendOutcome::Pending,
                    awaiting_push: true,
                },
            );
        }
        tracing::info!(app_id, "asking Feishu to resend the app_ticket");
        // The call may outlive the service (a shutdown mid-request): hold the bookkeeping
        // weakly, so the store is not kept open by it.
        let tickets = Arc::downgrade(&self.0);
        let app_id = app_id.to_string();
        tokio::spawn(async move {
            let outcome = call.await;
            let Some(this) = tickets.upgrade().map(Tickets) else {
                return;
            };
            let label = match &outcome {
                ResendOutcome::Failed { message, .. } => {
                    tracing::warn!(app_id = %app_id, error = %message, "app_ticket resend request failed");
                    "failed"
                }
                ResendOutcome::Accepted | ResendOutcome::Pending => "accepted",
            };
            this.0.metrics.ticket_resend(&app_id, label);
            let mut resends = lock(&this.0.resends);
            if let Some(status) = resends.get_mut(&app_id) {
                // A refused request brings no push: what arrives next is the usual push.
                if matches!(outcome, ResendOutcome::Failed { .. }) {
                    status.awaiting_push = false;
                }
                status.outcome = outcome;
            }
        });
        true
    }

    /// The last resend request for an app.
    pub fn resend_status(&self, app_id: &str) -> Option<ResendStatus> {
        lock(&self.0.resends).get(app_id).cloned()
    }

    /// Does a push arriving now answer a resend request of ours?
    pub fn resend_pending(&self, app_id: &str) -> bool {
        lock(&self.0.resends)
            .get(app_id)
            .is_some_and(|s| s.awaiting_push)
    }

    /// Mark a ticket Feishu refused (10012), so the next different ticket replaces it.
    pub async fn demote(&self, app_id: &str, ticket: &Secret) {
        if let Err(e) = self.0.store.demote_ticket(app_id, ticket).await {
            tracing::warn!(app_id, error = %e, "cannot mark the refused app_ticket in the store");
        }
    }
}

/// A stored ticket that may be spent: Feishu has not refused it, and it is not `not`.
fn usable(t: &TicketRecord, not: Option<&Secret>) -> bool {
    !t.rejected && not.is_none_or(|old| t.ticket != *old)
}

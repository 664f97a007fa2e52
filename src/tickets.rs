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
//! * **The wake-up channels**: one `watch` per configured store app (a custom app has no
//!   ticket: no channel, and [`Tickets::request_resend`] never asks for one), bumped whenever a ticket is
//!   stored as the newest. Token requests waiting for a ticket subscribe to it
//!   ([`Tickets::ticket_watch`]); its value is also the app's ticket *generation*
//!   ([`Tickets::generation`]), which the broker compares to forget a failure remembered before
//!   the new ticket.
//! * **Resend bookkeeping**: at most one resend request per app per `tickets.resend_interval`
//!   across all callers ([`Tickets::request_resend`]; held back, it says how long until the next
//!   may be sent: [`Resend::Held`]), its outcome ([`ResendStatus`], shown by the status API), and
//!   whether a push is still awaited for it. A request that never reached Feishu (no answer, a
//!   5xx: [`ResendOutcome::Failed`] without Feishu's `code`) gives the interval back, so the next
//!   request may try at once; one Feishu answered (accepted, or refused with a `code`) uses it
//!   up — asking again at once would only repeat the verdict. The same rule in one process and
//!   in a fleet.
//! * **The current ticket** ([`Tickets::current`]): the stored ticket unless Feishu refused it;
//!   otherwise a resend is requested and the push awaited for up to `tickets.resend_wait` — but
//!   only when a push is actually on its way: with none requested now (inside the interval) and
//!   none awaiting its push, the answer is `503 ticket_missing` at once.
//! * **Demotion** after Feishu's `10012` ([`Tickets::demote`]), so the next different ticket
//!   replaces the refused one whatever its event time.
//! * **An operator's delete** ([`Tickets::delete`], `DELETE /v1/apps/{app_id}/ticket`): a bad
//!   ticket (say, the fake one `lark-ticketd push ticket` stores) is dropped from the store. No
//!   replica keeps a copy — every read goes to the store — so the next token request that needs
//!   a ticket, on any replica, finds none and asks for a resend, as at start-up.
//! * **Several replicas on one store** (a fleet; only when the store is shared): a ticket pushed
//!   to any replica wakes the callers waiting on every replica — [`Tickets::follow_fleet`] turns
//!   the store's [`Change::TicketStored`] notices into the same wake-up a local push makes (the
//!   echo of this replica's own write is recognised and changes nothing), and a waiting caller
//!   also reads the store every `tokens.fleet_poll_interval` in case a notice was missed. The
//!   resend limit holds across the fleet: a replica sends a resend only while it holds the
//!   lease `resend:{app_id}` for `tickets.resend_interval` (never released, so it *is* the
//!   interval), except that a request that failed to reach Feishu gives it back (and this
//!   replica's own interval with it, as in one process). A replica that
//!   finds the lease taken waits for the other replica's push like for its own, for at most
//!   `tickets.resend_wait` after it looked.
//!
//! Layering: this module sits above the store and below both intake ([`crate::events`]) and the
//! broker ([`crate::tokens`]); it imports neither. The request to Feishu itself belongs to the
//! broker's Open Platform client, so the broker hands [`Tickets::request_resend`] the call to make
//! and this module decides whether to make it and keeps its outcome.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::clock::SharedClock;
use crate::config::{AppKind, Config, TicketConfig};
use crate::error::{Error, ErrorKind};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::{Change, Store, TicketRecord, TicketSource, TicketWrite};

/// The outcome of the last resend request for an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ResendOutcome {
    Pending,
    Accepted,
    Failed {
        code: Option<i64>,
        message: String,
    },
    /// Another replica of the fleet holds the app's resend lease: it asked within the interval,
    /// so this one did not.
    OtherReplica,
}

impl ResendOutcome {
    /// A request that never reached Feishu (no answer, or a 5xx): it gives the interval back.
    pub fn never_reached_feishu(&self) -> bool {
        matches!(self, ResendOutcome::Failed { code: None, .. })
    }
}

/// Resend bookkeeping for one app.
#[derive(Debug, Clone)]
pub struct ResendStatus {
    pub requested_at_ms: u64,
    pub outcome: ResendOutcome,
    /// A push has not arrived since the request.
    pub awaiting_push: bool,
    /// No other request before this (unix ms): the end of the interval, or of the wait for
    /// another replica's push; `0` once a request that never reached Feishu gave it back.
    pub held_until_ms: u64,
}

/// What a resend request did ([`Tickets::request_resend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// A request to Feishu was started now.
    Sent,
    /// Held back: a request was sent within `tickets.resend_interval` (by this replica, or by
    /// another replica of the fleet when `other_replica`); the next may be sent after
    /// `retry_after`.
    Held {
        retry_after: Duration,
        other_replica: bool,
    },
    /// The app has no ticket to ask for (a custom app, or no such app).
    NotApplicable,
}

impl Resend {
    pub fn sent(self) -> bool {
        self == Resend::Sent
    }
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
    /// The ticket each signal was last bumped for (its event time and id), so the same stored
    /// ticket never wakes twice — a local push and the store's notice of it, in either order.
    signalled: Mutex<HashMap<String, (i64, String)>>,
    resends: Mutex<HashMap<String, ResendStatus>>,
    /// When each newest ticket arrived (unix ms), the last [`ARRIVALS_KEPT`] per app: the status
    /// page's timeline. In memory, since this process started — in a fleet it hears of the
    /// tickets stored by every replica.
    arrivals: Mutex<HashMap<String, std::collections::VecDeque<u64>>>,
    /// When this bookkeeping started (unix ms): arrivals before it are unknown here.
    started_ms: u64,
    /// Other replicas share the store: resends take the fleet's lease, waiters also poll.
    fleet: bool,
    /// How often a waiting caller reads the store in case a change notice was missed (fleet).
    fleet_poll: Duration,
}

/// Ticket arrivals remembered per app for the status page's timeline: two days of hourly pushes
/// with room for resends.
pub const ARRIVALS_KEPT: usize = 96;

/// The ticket bookkeeping handle. Cheap to clone.
#[derive(Clone)]
pub struct Tickets(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations that cannot leave a map half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The lease that limits resend requests for `app_id` across the fleet.
fn resend_lease(app_id: &str) -> String {
    format!("resend:{app_id}")
}

/// A random lease owner: only the one who took a lease gives it back.
fn lease_owner() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Tickets {
    /// `fleet`: other replicas share `store` (see the module docs); `store.is_shared()` unless
    /// the caller knows better (several replicas in one process, over one memory store).
    pub fn new(
        config: &Config,
        store: Store,
        clock: SharedClock,
        metrics: Metrics,
        fleet: bool,
    ) -> Tickets {
        // Only store apps have a ticket: a custom app has no wake-up channel, and a resend is
        // never requested for it.
        let signals = config
            .apps
            .iter()
            .filter(|a| a.kind == AppKind::Store)
            .map(|a| (a.app_id.clone(), watch::channel(0u64).0))
            .collect();
        let started_ms = clock.now_ms();
        Tickets(Arc::new(Inner {
            cfg: config.tickets.clone(),
            store,
            clock,
            metrics,
            signals,
            signalled: Mutex::new(HashMap::new()),
            resends: Mutex::new(HashMap::new()),
            arrivals: Mutex::new(HashMap::new()),
            started_ms,
            fleet,
            fleet_poll: config.tokens.fleet_poll_interval,
        }))
    }

    /// Whether other replicas share the store.
    pub fn in_fleet(&self) -> bool {
        self.0.fleet
    }

    /// With a shared store: wake this replica's waiting callers when a ticket lands on any
    /// replica. Runs until aborted; `None` when the store is not shared (nothing to follow).
    pub fn follow_fleet(&self) -> Option<JoinHandle<()>> {
        if !self.0.fleet {
            return None;
        }
        // Subscribe now, so nothing stored after this call is missed.
        let mut changes = self.0.store.changes();
        // Weak: the follower must not keep the bookkeeping (and the store) alive.
        let tickets = Arc::downgrade(&self.0);
        Some(tokio::spawn(async move {
            loop {
                let change = changes.recv().await;
                let Some(this) = tickets.upgrade().map(Tickets) else {
                    return;
                };
                match change {
                    Ok(Change::TicketStored { app_id }) => this.look_at_stored(&app_id).await,
                    Ok(Change::TicketDeleted { app_id }) => this.forget_signalled(&app_id),
                    // Notices may have been missed: look at every app. A store that lost its
                    // data may get the very push it had again: it must wake us again.
                    Ok(Change::Resynced { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        if matches!(change, Ok(Change::Resynced { lost_data: true })) {
                            lock(&this.0.signalled).clear();
                        }
                        let mut apps: Vec<String> = this.0.signals.keys().cloned().collect();
                        apps.sort();
                        for app_id in apps {
                            this.look_at_stored(&app_id).await;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }))
    }

    /// Another replica (or this one) stored a ticket for `app_id`: wake the waiters unless this
    /// replica already did for that ticket.
    async fn look_at_stored(&self, app_id: &str) {
        if !self.0.signals.contains_key(app_id) {
            return;
        }
        match self.0.store.ticket(app_id).await {
            Ok(Some(t)) => {
                if self.stored(app_id, (t.event_time_us, t.event_id), t.received_at_ms) {
                    tracing::debug!(app_id, ticket = %t.ticket.fingerprint(), "app_ticket stored by another replica");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(app_id, error = %e, "cannot read the ticket another replica stored")
            }
        }
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
        let id = (record.event_time_us, record.event_id.clone());
        let received_at_ms = record.received_at_ms;
        let write = self.0.store.put_ticket(&app_id, record).await?;
        let stored = write == TicketWrite::Stored;
        self.0.metrics.ticket_push(&app_id, via, stored);
        if stored {
            self.stored(&app_id, id, received_at_ms);
        }
        tracing::info!(
            app_id = %app_id,
            ticket = %fingerprint,
            stored,
            "app_ticket received"
        );
        Ok(write)
    }

    /// A ticket (`id`: its event time and id) was stored as the newest: the resend (if any) is
    /// answered, and callers waiting for a ticket wake up (the bumped generation also tells the
    /// broker to forget the app's remembered failure). The same ticket wakes once, whether this
    /// replica stored it or heard of it from the store. Returns whether it woke anyone.
    fn stored(&self, app_id: &str, id: (i64, String), received_at_ms: u64) -> bool {
        {
            let mut signalled = lock(&self.0.signalled);
            if signalled.get(app_id) == Some(&id) {
                return false;
            }
            signalled.insert(app_id.to_string(), id);
        }
        {
            let mut arrivals = lock(&self.0.arrivals);
            let times = arrivals.entry(app_id.to_string()).or_default();
            if times.len() == ARRIVALS_KEPT {
                times.pop_front();
            }
            times.push_back(received_at_ms);
        }
        if let Some(status) = lock(&self.0.resends).get_mut(app_id) {
            status.awaiting_push = false;
        }
        if let Some(signal) = self.0.signals.get(app_id) {
            signal.send_modify(|v| *v += 1);
        }
        true
    }

    /// When the newest tickets of `app_id` arrived (unix ms, oldest first) since this process
    /// started: the status page's timeline.
    pub fn arrivals(&self, app_id: &str) -> Vec<u64> {
        self.arrivals_of(app_id)
    }

    /// Since when [`Tickets::arrivals`] knows of every arrival (unix ms).
    pub fn arrivals_known_since(&self) -> u64 {
        self.0.started_ms
    }

    fn arrivals_of(&self, app_id: &str) -> Vec<u64> {
        lock(&self.0.arrivals)
            .get(app_id)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default()
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
    pub async fn current<R>(
        &self,
        app_id: &str,
        not: Option<&Secret>,
        request_resend: impl FnOnce() -> R,
    ) -> Result<Secret, Error>
    where
        R: Future<Output = Resend>,
    {
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
        let requested = request_resend().await;
        if !requested.sent() && !self.resend_pending(app_id) {
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
        tracing::debug!(
            app_id,
            wait_ms = self.0.cfg.resend_wait.as_millis() as u64,
            "waiting for an app_ticket push"
        );
        let wait = async {
            loop {
                if self.0.fleet {
                    // The notice normally wakes us; the poll covers one that was missed.
                    tokio::select! {
                        changed = signal.changed() => if changed.is_err() {
                            return Ok(None);
                        },
                        _ = tokio::time::sleep(self.0.fleet_poll) => {}
                    }
                } else if signal.changed().await.is_err() {
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
    /// `tickets.resend_interval` across all callers (across the fleet too, through the lease
    /// `resend:{app_id}`): if this call may, `call` (the request to Feishu, made by the broker's
    /// Open Platform client) runs in the background and its outcome is recorded. Returns whether
    /// a request was sent now, or how long it is held back. Awaits only with a shared store (the
    /// lease).
    pub async fn request_resend<F>(&self, app_id: &str, call: F) -> Resend
    where
        F: Future<Output = ResendOutcome> + Send + 'static,
    {
        self.resend(app_id, call, false).await
    }

    /// As [`Tickets::request_resend`], but without this replica's own interval: after the
    /// store lost its data every ticket must be asked for again. The fleet's lease still holds,
    /// so the fleet asks once.
    pub async fn request_resend_after_data_loss<F>(&self, app_id: &str, call: F) -> Resend
    where
        F: Future<Output = ResendOutcome> + Send + 'static,
    {
        self.resend(app_id, call, true).await
    }

    async fn resend<F>(&self, app_id: &str, call: F, ignore_interval: bool) -> Resend
    where
        F: Future<Output = ResendOutcome> + Send + 'static,
    {
        if !self.0.signals.contains_key(app_id) {
            return Resend::NotApplicable;
        }
        let now = self.0.clock.now_ms();
        let interval = self.0.cfg.resend_interval.as_millis() as u64;
        {
            let mut resends = lock(&self.0.resends);
            if let Some(last) = resends.get(app_id) {
                if !ignore_interval && now < last.held_until_ms {
                    return Resend::Held {
                        retry_after: Duration::from_millis(last.held_until_ms - now),
                        other_replica: last.outcome == ResendOutcome::OtherReplica,
                    };
                }
            }
            // Reserved before any await: one attempt per app per interval in this replica.
            resends.insert(
                app_id.to_string(),
                ResendStatus {
                    requested_at_ms: now,
                    outcome: ResendOutcome::Pending,
                    awaiting_push: true,
                    held_until_ms: now.saturating_add(interval),
                },
            );
        }
        let lease = if self.0.fleet {
            let owner = lease_owner();
            let lease = resend_lease(app_id);
            match self
                .0
                .store
                .try_lease(&lease, &owner, self.0.cfg.resend_interval)
                .await
            {
                Ok(true) => Some(owner),
                Ok(false) => {
                    tracing::debug!(
                        app_id,
                        "another replica asked Feishu to resend the app_ticket within the interval"
                    );
                    // Look again once that replica's push is overdue (its request may have
                    // failed and given the lease back), not a whole interval later.
                    let block = interval.min(self.0.cfg.resend_wait.as_millis() as u64);
                    if let Some(status) = lock(&self.0.resends).get_mut(app_id) {
                        status.outcome = ResendOutcome::OtherReplica;
                        status.held_until_ms = now.saturating_add(block);
                    }
                    return Resend::Held {
                        retry_after: Duration::from_millis(block),
                        other_replica: true,
                    };
                }
                Err(e) => {
                    // The store is down: no ticket could be stored either, but the request may
                    // still help once it is back. This replica's own interval still holds.
                    tracing::warn!(app_id, error = %e, "cannot take the resend lease; asking Feishu anyway");
                    None
                }
            }
        } else {
            None
        };
        tracing::info!(app_id, "asking Feishu to resend the app_ticket");
        // The call may outlive the service (a shutdown mid-request): hold the bookkeeping
        // weakly, so the store is not kept open by it.
        let tickets = Arc::downgrade(&self.0);
        let store = self.0.store.clone();
        let app_id = app_id.to_string();
        tokio::spawn(async move {
            let outcome = call.await;
            // A request that never reached Feishu (no answer, a 5xx) must not use up the
            // fleet's interval: another replica may try at once (and this one: below).
            if let (Some(owner), true) = (&lease, outcome.never_reached_feishu()) {
                if let Err(e) = store.release_lease(&resend_lease(&app_id), owner).await {
                    tracing::warn!(app_id = %app_id, error = %e, "cannot give back the resend lease; it expires after the interval");
                }
            }
            drop(store);
            let Some(this) = tickets.upgrade().map(Tickets) else {
                return;
            };
            let label = match &outcome {
                ResendOutcome::Failed { message, .. } => {
                    tracing::warn!(app_id = %app_id, error = %message, "app_ticket resend request failed");
                    "failed"
                }
                ResendOutcome::Accepted | ResendOutcome::Pending | ResendOutcome::OtherReplica => {
                    "accepted"
                }
            };
            this.0.metrics.ticket_resend(&app_id, label);
            let mut resends = lock(&this.0.resends);
            if let Some(status) = resends.get_mut(&app_id) {
                // A refused request brings no push: what arrives next is the usual push.
                if matches!(outcome, ResendOutcome::Failed { .. }) {
                    status.awaiting_push = false;
                }
                // Nor does it use up this replica's interval if it never reached Feishu.
                if outcome.never_reached_feishu() {
                    status.held_until_ms = 0;
                }
                status.outcome = outcome;
            }
        });
        Resend::Sent
    }

    /// `tickets.resend_interval`.
    pub fn resend_interval(&self) -> Duration {
        self.0.cfg.resend_interval
    }

    /// The last resend request for an app.
    pub fn resend_status(&self, app_id: &str) -> Option<ResendStatus> {
        lock(&self.0.resends).get(app_id).cloned()
    }

    /// Does a push arriving now answer a resend request of ours (or of another replica's)?
    /// Another replica's request counts for `tickets.resend_wait` after this replica saw it:
    /// whether it reached Feishu is not known here.
    pub fn resend_pending(&self, app_id: &str) -> bool {
        let now = self.0.clock.now_ms();
        let wait = self.0.cfg.resend_wait.as_millis() as u64;
        lock(&self.0.resends).get(app_id).is_some_and(|s| {
            s.awaiting_push
                && (s.outcome != ResendOutcome::OtherReplica
                    || now.saturating_sub(s.requested_at_ms) < wait)
        })
    }

    /// Drop the stored ticket of a store app (an operator's `DELETE …/ticket`); returns the
    /// record dropped, `None` when none was stored. A custom app has no ticket: `bad_request`,
    /// as for a resend.
    pub async fn delete(&self, app_id: &str) -> Result<Option<TicketRecord>, Error> {
        if !self.0.signals.contains_key(app_id) {
            return Err(Error::new(
                ErrorKind::BadRequest,
                format!("{app_id} is a custom app: it has no App Ticket to delete"),
            ));
        }
        let dropped = self.0.store.delete_ticket(app_id).await?;
        // Should the same ticket be stored again, it is news: its waiters must wake.
        self.forget_signalled(app_id);
        if let Some(t) = &dropped {
            tracing::warn!(app_id, ticket = %t.ticket.fingerprint(), "app_ticket deleted by an operator");
        }
        Ok(dropped)
    }

    fn forget_signalled(&self, app_id: &str) {
        lock(&self.0.signalled).remove(app_id);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::memory::MemoryStore;

    const APP: &str = "cli_resend";
    const INTERVAL: Duration = Duration::from_secs(60);
    const WAIT: Duration = Duration::from_secs(5);

    fn replica(store: &Store, clock: &Arc<ManualClock>, fleet: bool) -> Tickets {
        let text = format!(
            "[tickets]\nresend_interval = \"60s\"\nresend_wait = \"5s\"\n\
             [[apps]]\napp_id = \"{APP}\"\napp_secret = \"s\"\nverification_token = \"v\"\n"
        );
        let config = Config::parse(&text, &|_| None).unwrap();
        let clock: SharedClock = clock.clone();
        Tickets::new(&config, store.clone(), clock, Metrics::new(), fleet)
    }

    /// Ask for a resend whose request to Feishu ends with `outcome`, and wait for it to land.
    async fn resend(t: &Tickets, outcome: ResendOutcome) -> Resend {
        let sent = t.request_resend(APP, async move { outcome }).await;
        if sent.sent() {
            tokio::time::timeout(Duration::from_secs(10), async {
                while t.resend_status(APP).map(|s| s.outcome) == Some(ResendOutcome::Pending) {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the resend's outcome lands");
        }
        sent
    }

    fn unreachable() -> ResendOutcome {
        ResendOutcome::Failed {
            code: None,
            message: "cannot reach Feishu: connection refused".into(),
        }
    }

    fn held(retry_after: Duration, other_replica: bool) -> Resend {
        Resend::Held {
            retry_after,
            other_replica,
        }
    }

    /// Issue 12: a request that never reached Feishu gives the interval back — in one process
    /// as in a fleet; one that Feishu answered (accepted or refused) uses it up, and the held
    /// answer says how long is left.
    #[tokio::test]
    async fn a_resend_that_never_reached_feishu_does_not_use_up_the_interval() {
        for fleet in [false, true] {
            let clock = Arc::new(ManualClock::new(1_800_000_000_000));
            let store = Store::Memory(MemoryStore::default());
            let t = replica(&store, &clock, fleet);
            assert_eq!(
                resend(&t, unreachable()).await,
                Resend::Sent,
                "fleet: {fleet}"
            );
            assert_eq!(
                resend(&t, unreachable()).await,
                Resend::Sent,
                "fleet: {fleet}"
            );
            assert_eq!(t.resend_status(APP).unwrap().held_until_ms, 0);
            assert_eq!(
                resend(&t, ResendOutcome::Accepted).await,
                Resend::Sent,
                "fleet: {fleet}"
            );
            assert_eq!(
                resend(&t, ResendOutcome::Accepted).await,
                held(INTERVAL, false),
                "fleet: {fleet}"
            );
            clock.advance(Duration::from_secs(45));
            assert_eq!(
                resend(&t, ResendOutcome::Accepted).await,
                held(Duration::from_secs(15), false),
                "fleet: {fleet}"
            );
            if fleet {
                // The lease is the fleet's interval, on the store's own clock: not moved here.
                continue;
            }
            clock.advance(Duration::from_secs(15));
            let refused = ResendOutcome::Failed {
                code: Some(10015),
                message: "app secret invalid".into(),
            };
            assert_eq!(resend(&t, refused.clone()).await, Resend::Sent);
            // Feishu's verdict: asking again at once would only repeat it.
            assert_eq!(resend(&t, refused).await, held(INTERVAL, false));
        }
    }

    #[tokio::test]
    async fn across_the_fleet_a_failed_request_lets_another_replica_ask_at_once() {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let store = Store::Memory(MemoryStore::default());
        let (a, b) = (replica(&store, &clock, true), replica(&store, &clock, true));
        assert_eq!(resend(&a, unreachable()).await, Resend::Sent);
        assert_eq!(resend(&b, ResendOutcome::Accepted).await, Resend::Sent);
        // B holds the lease: A waits for B's push, then looks again.
        assert_eq!(resend(&a, ResendOutcome::Accepted).await, held(WAIT, true));
        assert_eq!(
            resend(&b, ResendOutcome::Accepted).await,
            held(INTERVAL, false)
        );
    }
}

//! The deliverer: takes queued events out of the store and POSTs them to their consumers.
//!
//! One loop per consumer, so a consumer that is down or slow never delays another. A loop
//! claims up to [`CONCURRENCY`] due deliveries at once (the store leases each claim for the
//! attempt's timeout plus [`LEASE_SLACK`]: an attempt cut short by a crash comes back by itself
//! after a restart, without any bookkeeping here), sends them concurrently and records each
//! outcome. With nothing due it sleeps until intake queues something for this consumer
//! ([`Forwarder::enqueue`] wakes it) or [`IDLE_POLL`] passes (a retry falling due). There is no
//! batch barrier: once a quarter of the slots are free again, the loop claims again.
//!
//! One attempt is a small pure step plus one request (Svix's worker, STYLE.md): build the body
//! without the Verification Token and sign it (Standard Webhooks, a fresh `webhook-timestamp`
//! per attempt), POST within `forwarding.delivery_timeout`, classify the answer ([`classify`]),
//! and pick the next step from the retry schedule ([`next_step`]): any 2xx is delivered;
//! anything else waits for the schedule's next step (a longer `Retry-After` from the consumer is
//! honoured, up to the schedule's last step), and after the last step the event is a dead letter.
//!
//! What this never does: hold an event in memory beyond the attempts in flight (the backlog
//! lives in the store), or log a body, a secret or a consumer's answer body.
//!
//! **Reconfiguring** (a config reload, [`Forwarder::reconfigure`]): the consumer set is an
//! immutable list swapped whole, so intake reads it with one uncontended lock and an `Arc`
//! clone. An added consumer gets its loop at once. A removed one's loop stops claiming and lets
//! its attempts in flight finish; its queued deliveries stay in the store, claimed again if a
//! consumer of that name comes back. A changed URL, secret or filter takes effect from the next
//! attempt: each attempt looks its consumer up when it starts. A consumer's running state (its
//! failure count, its wake-ups) survives a change; the loops live in the forwarder's own task
//! set, from [`Forwarder::start`] to [`Forwarder::stop`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::clock::SharedClock;
use crate::config::{Config, ConsumerConfig, ForwardingConfig};
use crate::consumer_filter::ConsumerFilter;
use crate::error::{Error, ErrorKind};
use crate::metrics::Metrics;
use crate::store::{Delivery, Enqueue, NewEvent, Store, StoreError};
use crate::webhook::WebhookSecret;

use super::{delivery_headers, DeliveryMeta};

/// Deliveries in flight per consumer at most.
pub const CONCURRENCY: usize = 32;
/// Added to `delivery_timeout` for a claim's lease: the attempt's own bound plus room to record
/// its outcome.
pub const LEASE_SLACK: Duration = Duration::from_secs(5);
/// How often an idle consumer loop looks for retries that fell due.
pub const IDLE_POLL: Duration = Duration::from_millis(500);
/// How often retained deliveries and expired dedupe marks are purged.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(600);
/// Failed attempts in a row after which a consumer counts as down: its loop lets the attempts
/// in flight end, then sends one delivery at a time, [`BACK_OFF_MIN`] apart and doubling to
/// [`BACK_OFF_MAX`], until one succeeds (a circuit breaker, as Svix and Convoy have). A consumer
/// that is down for an hour then costs a probe a minute instead of an attempt per queued event,
/// and the events it was not sent keep their retry steps for when it is back.
pub const BACK_OFF_AFTER: u32 = 5;
pub const BACK_OFF_MIN: Duration = Duration::from_secs(1);
pub const BACK_OFF_MAX: Duration = Duration::from_secs(60);
/// Longest error text kept with a delivery (no consumer answer body is ever kept).
const MAX_ERROR_CHARS: usize = 200;

/// One configured consumer: its settings (replaced whole by a reload) and its running state.
struct Consumer {
    name: String,
    url: String,
    secret: WebhookSecret,
    filter: ConsumerFilter,
    /// The config it was built from, to tell a changed consumer on reload.
    config: ConsumerConfig,
    /// Kept across reloads for as long as the consumer stays configured.
    run: Arc<Running>,
}

/// A consumer's running state: what outlives a change of its settings.
struct Running {
    /// Woken when intake queues an event for this consumer.
    wake: Notify,
    /// Failed attempts in a row (0 after any success).
    failing: AtomicU32,
    /// Woken by an operator's redeliver: probe a consumer that is down at once.
    retry_now: Notify,
    /// Set when a reload removes the consumer: its loop stops claiming.
    retired: watch::Sender<bool>,
}

impl Running {
    fn new() -> Arc<Running> {
        Arc::new(Running {
            wake: Notify::new(),
            failing: AtomicU32::new(0),
            retry_now: Notify::new(),
            retired: watch::channel(false).0,
        })
    }
}

/// The consumers a reload added, removed and changed, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// The hand-off: matching, queueing and delivering. Cheap to clone.
#[derive(Clone)]
pub struct Forwarder(Arc<Inner>);

type ConsumerList = Arc<Vec<Arc<Consumer>>>;

struct Inner {
    /// Swapped whole by [`Forwarder::reconfigure`]; a std lock, held only to clone the `Arc`.
    consumers: RwLock<ConsumerList>,
    /// The delivery loops and the purge: `Some` between [`Forwarder::start`] and
    /// [`Forwarder::stop`]. Also serialises reconfiguring.
    tasks: Mutex<Option<JoinSet<()>>>,
    settings: ForwardingConfig,
    store: Store,
    clock: SharedClock,
    metrics: Metrics,
    http: reqwest::Client,
}

/// What an attempt's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// Failed; the consumer asked for at least this long before the next try (`Retry-After`).
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// Whether a consumer that failed `failing` attempts in a row counts as down.
pub fn is_down(failing: u32) -> bool {
    failing >= BACK_OFF_AFTER
}

/// How long a consumer that is down is left alone before probe number `probe` (0-based).
pub fn back_off(probe: u32) -> Duration {
    BACK_OFF_MIN
        .saturating_mul(1u32 << probe.min(16))
        .min(BACK_OFF_MAX)
}

/// Classify a consumer's answer: any 2xx is delivered, anything else failed.
pub fn classify(status: u16, retry_after: Option<&str>) -> Attempt {
    if (200..300).contains(&status) {
        return Attempt::Delivered;
    }
    Attempt::Failed {
        error: format!("HTTP {status}"),
        retry_after: retry_after
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
    }
}

/// After failed attempt number `attempt` (1-based): the wait before the next one, or `None` when
/// the schedule is spent (a dead letter). A `Retry-After` lengthens the wait, never beyond the
/// schedule's last step.
pub fn next_step(
    schedule: &[Duration],
    attempt: u32,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    let step = *schedule.get(attempt.checked_sub(1)? as usize)?;
    let longest = schedule.last().copied().unwrap_or(step);
    Some(retry_after.map_or(step, |asked| asked.clamp(step, longest.max(step))))
}

impl Consumer {
    /// The consumer of a validated `[[consumers]]` entry, with its running state.
    fn new(c: &ConsumerConfig, run: Arc<Running>) -> Result<Consumer, Error> {
        // Validated with the same code when the config was loaded.
        let secret = c
            .webhook_secret()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("consumers: {e}")))?;
        let filter = c
            .filter()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("consumers: {e}")))?;
        Ok(Consumer {
            name: c.name.clone(),
            url: c.url.clone(),
            secret,
            filter,
            config: c.clone(),
            run,
        })
    }
}

/// Do two entries of one consumer name configure the same thing?
fn same_consumer(a: &ConsumerConfig, b: &ConsumerConfig) -> bool {
    a.url == b.url && a.secret == b.secret && a.events == b.events && a.apps == b.apps
}

impl Forwarder {
    pub fn new(
        config: &Config,
        store: Store,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Result<Forwarder, Error> {
        let consumers = config
            .consumers
            .iter()
            .map(|c| Consumer::new(c, Running::new()).map(Arc::new))
            .collect::<Result<Vec<_>, Error>>()?;
        let http = reqwest::Client::builder()
            .timeout(config.forwarding.delivery_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Internal, "cannot build the delivery HTTP client")
                    .with_cause(e)
            })?;
        Ok(Forwarder(Arc::new(Inner {
            consumers: RwLock::new(Arc::new(consumers)),
            tasks: Mutex::new(None),
            settings: config.forwarding.clone(),
            store,
            clock,
            metrics,
            http,
        })))
    }

    /// The consumers now: one read of the swapped list.
    fn consumers(&self) -> ConsumerList {
        Arc::clone(&self.0.consumers.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The consumers that want an event of `event_type` from `app_id`.
    pub fn matching(&self, app_id: &str, event_type: &str) -> Vec<String> {
        self.consumers()
            .iter()
            .filter(|c| c.filter.matches(app_id, event_type))
            .map(|c| c.name.clone())
            .collect()
    }

    /// The configured consumers' names, in config order.
    pub fn consumer_names(&self) -> Vec<String> {
        self.consumers().iter().map(|c| c.name.clone()).collect()
    }

    /// The consumer's URL, if it is configured.
    pub fn consumer_url(&self, name: &str) -> Option<String> {
        self.consumer(name).map(|c| c.url.clone())
    }

    fn consumer(&self, name: &str) -> Option<Arc<Consumer>> {
        self.consumers().iter().find(|c| c.name == name).cloned()
    }

    /// Swap in the consumers of a reloaded (validated) config: added ones start delivering,
    /// removed ones stop claiming (their queued deliveries stay in the store), changed ones use
    /// their new settings from their next attempt.
    pub fn reconfigure(&self, configs: &[ConsumerConfig]) -> Result<ConsumerChanges, Error> {
        let mut tasks = self.0.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.consumers();
        let mut changes = ConsumerChanges::default();
        let mut next = Vec::with_capacity(configs.len());
        for config in configs {
            let kept = old.iter().find(|c| c.name == config.name);
            let run = kept.map_or_else(Running::new, |c| Arc::clone(&c.run));
            match kept {
                None => changes.added.push(config.name.clone()),
                Some(c) if !same_consumer(&c.config, config) => {
                    changes.changed.push(config.name.clone())
                }
                Some(_) => {}
            }
            next.push(Arc::new(Consumer::new(config, run)?));
        }
        for gone in old
            .iter()
            .filter(|c| !configs.iter().any(|n| n.name == c.name))
        {
            changes.removed.push(gone.name.clone());
            gone.run.retired.send_replace(true);
            self.0.metrics.forget_consumer(&gone.name);
        }
        *self.0.consumers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        if let Some(tasks) = tasks.as_mut() {
            // Reap the loops of consumers removed earlier that have finished.
            while tasks.try_join_next().is_some() {}
            for name in &changes.added {
                if let Some(c) = self.consumer(name) {
                    let this = self.clone();
                    tasks.spawn(async move {
                        this.consumer_loop(c.name.clone(), Arc::clone(&c.run)).await
                    });
                }
            }
        }
        Ok(changes)
    }

    /// How long an event id is remembered for dedupe, from `now_ms`.
    pub fn dedupe_until_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.0.settings.dedupe_window.as_millis() as u64)
    }

    /// Queue `event` durably for every consumer that wants it (none: nothing is stored), then
    /// wake their loops. Feishu may hear `200` once this returns.
    pub async fn enqueue(&self, event: NewEvent) -> Result<Enqueue, StoreError> {
        let names = self.matching(&event.app_id, &event.event_type);
        if names.is_empty() {
            return Ok(Enqueue::Queued);
        }
        let outcome = self.0.store.enqueue_event(event, &names).await?;
        if outcome == Enqueue::Queued {
            for c in self.consumers().iter().filter(|c| names.contains(&c.name)) {
                c.run.wake.notify_one();
            }
        }
        Ok(outcome)
    }

    /// Failed attempts in a row at this consumer, and whether it counts as down (its loop sends
    /// one probe at a time until one succeeds).
    pub fn failing(&self, name: &str) -> Option<(u32, bool)> {
        let failing = self.consumer(name)?.run.failing.load(Ordering::Relaxed);
        Some((failing, is_down(failing)))
    }

    /// Wake a consumer's loop after an operator's redeliver: "try now", so a consumer counted
    /// as down is tried again at once (if it is still down, it is counted as down again after
    /// [`BACK_OFF_AFTER`] failures).
    pub fn wake(&self, name: &str) {
        if let Some(c) = self.consumer(name) {
            c.run.failing.store(0, Ordering::Relaxed);
            c.run.retry_now.notify_one();
            c.run.wake.notify_one();
        }
    }

    /// Start one delivery loop per consumer and the purge (always: a reload may add
    /// consumers), until [`Forwarder::stop`].
    pub fn start(&self) {
        let mut guard = self.0.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let tasks = guard.get_or_insert_with(JoinSet::new);
        for c in self.consumers().iter() {
            let this = self.clone();
            let (name, run) = (c.name.clone(), Arc::clone(&c.run));
            tasks.spawn(async move { this.consumer_loop(name, run).await });
        }
        let this = self.clone();
        tasks.spawn(async move { this.purge_loop().await });
    }

    /// Stop every delivery loop and the purge, and wait until they are gone. Attempts cut short
    /// here are claimed again after a restart, once their lease runs out.
    pub async fn stop(&self) {
        let tasks = self
            .0
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut tasks) = tasks {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Deliver to one consumer until a reload removes it; then let the attempts in flight end.
    async fn consumer_loop(self, name: String, run: Arc<Running>) {
        let mut attempts = JoinSet::new();
        let mut retired = run.retired.subscribe();
        tokio::select! {
            () = self.claim_loop(&name, &run, &mut attempts) => {}
            _ = retired.wait_for(|retired| *retired) => {}
        }
        tracing::info!(consumer = %name, in_flight = attempts.len(), "consumer removed by a reload: no more deliveries");
        while attempts.join_next().await.is_some() {}
    }

    async fn claim_loop(&self, name: &str, consumer: &Running, attempts: &mut JoinSet<()>) {
        let lease_ms = (self.0.settings.delivery_timeout + LEASE_SLACK).as_millis() as u64;
        // No batch barrier: once a quarter of the slots are free the loop claims again, so one
        // slow delivery never holds up the others, and claims stay batched under load.
        // Probes sent since the consumer was last counted as down.
        let mut probes = 0u32;
        loop {
            while attempts.try_join_next().is_some() {}
            if attempts.len() > CONCURRENCY - CONCURRENCY / 4 {
                attempts.join_next().await;
                continue;
            }
            let mut free = CONCURRENCY - attempts.len();
            if !is_down(consumer.failing.load(Ordering::Relaxed)) {
                probes = 0;
            } else if !attempts.is_empty() {
                // Down: let what is in flight end first (it may succeed)…
                attempts.join_next().await;
                continue;
            } else {
                // …then wait, and probe with one delivery. An operator's redeliver cuts the
                // wait short ([`Forwarder::wake`]); new events do not.
                tokio::select! {
                    () = tokio::time::sleep(back_off(probes)) => {}
                    () = consumer.retry_now.notified() => {}
                }
                probes = probes.saturating_add(1);
                if !is_down(consumer.failing.load(Ordering::Relaxed)) {
                    continue;
                }
                free = 1;
            }
            let now = self.0.clock.now_ms();
            let claimed = match self.0.store.claim_due(name, now, lease_ms, free).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "cannot claim deliveries");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            if claimed.is_empty() {
                // Woken by intake, a retry falling due, or an attempt ending (its delivery may
                // have been retried at once).
                tokio::select! {
                    () = consumer.wake.notified() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                    Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
                }
                continue;
            }
            // Each attempt uses the consumer's settings as they are now (a reload may have
            // changed them); a consumer removed meanwhile is not sent anything.
            let Some(current) = self.consumer(name) else {
                continue;
            };
            for delivery in claimed {
                let this = self.clone();
                let current = Arc::clone(&current);
                attempts.spawn(async move { this.attempt(current, delivery).await });
            }
        }
    }

    /// One attempt: send, classify, record the next step.
    async fn attempt(self, consumer: Arc<Consumer>, delivery: Delivery) {
        let outcome = self.send(&consumer, &delivery).await;
        match &outcome {
            Attempt::Delivered => {
                if consumer.run.failing.swap(0, Ordering::Relaxed) >= BACK_OFF_AFTER {
                    tracing::info!(consumer = %consumer.name, "consumer is back: delivering again");
                }
            }
            Attempt::Failed { error, .. } => {
                if consumer.run.failing.fetch_add(1, Ordering::Relaxed) + 1 == BACK_OFF_AFTER {
                    tracing::warn!(consumer = %consumer.name, error = %error, failed_in_a_row = BACK_OFF_AFTER, "consumer looks down: sending one delivery at a time until one succeeds");
                }
            }
        }
        let now = self.0.clock.now_ms();
        let (app, id) = (delivery.app_id.as_str(), delivery.event_id.as_str());
        let recorded = match &outcome {
            Attempt::Delivered => {
                let latency_s = now.saturating_sub(delivery.received_at_ms) as f64 / 1000.0;
                self.0
                    .metrics
                    .delivery(&consumer.name, "delivered", Some(latency_s));
                self.0.store.delivered(&delivery, now).await
            }
            Attempt::Failed { error, retry_after } => {
                match next_step(
                    &self.0.settings.retry_schedule,
                    delivery.attempt,
                    *retry_after,
                ) {
                    Some(wait) => {
                        self.0.metrics.delivery(&consumer.name, "retry", None);
                        let next = now.saturating_add(wait.as_millis() as u64);
                        self.0.store.retry_later(&delivery, next, error).await
                    }
                    None => {
                        self.0.metrics.delivery(&consumer.name, "dead", None);
                        tracing::warn!(
                            consumer = %consumer.name,
                            app_id = app,
                            event_id = id,
                            attempts = delivery.attempt,
                            error = %error,
                            "delivery failed for the last time: a dead letter"
                        );
                        self.0.store.dead(&delivery, now, error).await
                    }
                }
            }
        };
        if let Err(e) = recorded {
            // The lease runs out and the delivery is claimed again: at least once.
            tracing::warn!(consumer = %consumer.name, event_id = id, error = %e, "cannot record a delivery's outcome");
        }
        tracing::debug!(consumer = %consumer.name, app_id = app, event_id = id, attempt = delivery.attempt, outcome = ?outcome, "delivery attempt");
    }

    async fn send(&self, consumer: &Consumer, delivery: &Delivery) -> Attempt {
        let body = match std::str::from_utf8(&delivery.body) {
            Ok(body) => body,
            Err(_) => {
                return Attempt::Failed {
                    error: "the stored event is not UTF-8".into(),
                    retry_after: None,
                }
            }
        };
        let meta = DeliveryMeta {
            event_id: &delivery.event_id,
            app_id: &delivery.app_id,
            event_type: &delivery.event_type,
            tenant_key: delivery.tenant_key.as_deref(),
        };
        let now_s = self.0.clock.now_ms() / 1000;
        let mut request = self.0.http.post(&consumer.url);
        for (name, value) in delivery_headers(&consumer.secret, &meta, now_s, body) {
            request = request.header(name, value);
        }
        match request
            .body(Bytes::copy_from_slice(body.as_bytes()))
            .send()
            .await
        {
            Ok(answer) => {
                let retry_after = answer
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                classify(answer.status().as_u16(), retry_after.as_deref())
            }
            Err(e) => Attempt::Failed {
                error: transport_error(&e),
                retry_after: None,
            },
        }
    }

    async fn purge_loop(self) {
        let retention_ms = self.0.settings.retention.as_millis() as u64;
        loop {
            tokio::time::sleep(PURGE_INTERVAL).await;
            let now = self.0.clock.now_ms();
            if let Err(e) = self.0.store.purge_forwarding(now, retention_ms).await {
                tracing::warn!(error = %e, "cannot purge delivered events");
            }
        }
    }
}

/// A transport failure in a few words: what kind, never a URL with its query or a body.
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_request() {
        "request failed"
    } else {
        "transport error"
    };
    let mut text = kind.to_string();
    if let Some(source) = std::error::Error::source(e) {
        text.push_str(": ");
        text.push_str(&source.to_string());
    }
    text.chars().take(MAX_ERROR_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_2xx_is_delivered_and_retry_after_is_read() {
        assert_eq!(classify(200, None), Attempt::Delivered);
        assert_eq!(classify(204, None), Attempt::Delivered);
        assert_eq!(
            classify(503, Some(" 120 ")),
            Attempt::Failed {
                error: "HTTP 503".into(),
                retry_after: Some(Duration::from_secs(120))
            }
        );
        assert!(matches!(
            classify(302, Some("soon")),
            Attempt::Failed {
                retry_after: None,
                ..
            }
        ));
    }

    #[test]
    fn a_consumer_is_left_alone_longer_the_longer_it_stays_down() {
        assert!(!is_down(BACK_OFF_AFTER - 1));
        assert!(is_down(BACK_OFF_AFTER));
        assert_eq!(back_off(0), BACK_OFF_MIN);
        assert_eq!(back_off(1), BACK_OFF_MIN * 2);
        assert_eq!(back_off(40), BACK_OFF_MAX);
        assert_eq!(back_off(u32::MAX), BACK_OFF_MAX);
    }

    #[test]
    fn the_schedule_then_a_dead_letter() {
        let s = |v: u64| Duration::from_secs(v);
        let schedule = [s(5), s(30), s(120)];
        assert_eq!(next_step(&schedule, 1, None), Some(s(5)));
        assert_eq!(next_step(&schedule, 3, None), Some(s(120)));
        assert_eq!(next_step(&schedule, 4, None), None);
        assert_eq!(next_step(&schedule, 0, None), None);
        // Retry-After lengthens a wait, never beyond the last step, never shortens it.
        assert_eq!(next_step(&schedule, 1, Some(s(60))), Some(s(60)));
        assert_eq!(next_step(&schedule, 1, Some(s(9999))), Some(s(120)));
        assert_eq!(next_step(&schedule, 2, Some(s(1))), Some(s(30)));
    }
}

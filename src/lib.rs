//! lark-ticketd: the one endpoint a Feishu / Lark app-store ("ISV") app needs, plus the token
//! service its other services call.
//!
//! # Architecture
//!
//! ```text
//!             Feishu Open Platform                         downstream services / operators
//!                    │ POST /events[/{app_id}]                        │ GET /healthz /readyz
//!                    ▼                                                ▼
//!   server (listeners, connection limit, header timeout, graceful drain)
//!                    │
//!   routes (path → handler; body limit; bearer auth; the one place errors become responses)
//!                    │                                                │
//!   events (intake: verify signature over raw bytes      tokens (broker: cache, single-flight,
//!     → decrypt → parse envelope → check token)            background refresh) ──► Feishu auth API
//!                    │                                                │
//!                    └──────────────► tickets ◄───────────────────────┘
//!                       (stored pushes, resend requests, waking waiting token requests)
//!                                        │
//!   store (newest ticket per app, tenant state, tokens; embedded redb file | redis | memory)
//! ```
//!
//! # Layering
//!
//! A module imports only modules below it (DESIGN.md → *Layout*); lowest first:
//!
//! ```text
//!   clock, error, model, secret   building blocks; model: the records several layers share
//!   consumer_filter, webhook      pure rules config validates consumers with (filters, signing)
//!   config, metrics               typed config; metrics: a leaf, calls nothing back
//!   auth, store                   bearer keys; durable state
//!   forward, tickets              the event hand-off; ticket bookkeeping for intake and broker
//!   events, tokens                intake and the broker: siblings, neither imports the other
//!   push                          sealing pushes as Feishu does
//!   mock_feishu                   the fake Open Platform
//!   (crate root)                  AppState: the service, built from everything above
//!   ops                           status and logging
//!   routes                        the HTTP surface
//!   server                        listeners, limits, graceful shutdown
//!   demo                          the demo command
//! ```
//!
//! `tests/it/layering.rs` declares this order and fails on an import that points up or sideways.
//!
//! [`mock_feishu`] is a faithful local fake of the Open Platform (auth endpoints, ticket pushes),
//! used by `lark-ticketd demo`, the tests, and developers without a Feishu tenant.
//!
//! The intake flow: request → limit → verify signature (raw bytes) → decrypt → parse envelope →
//! check token → replay window (`events.max_age`) → challenge | store ticket | record tenant | ack.
//! Intake answers 200 to Feishu only after the ticket is durable; [`tickets`] stores it and wakes
//! token requests waiting for it.
//!
//! The token flow: request → bearer auth ([`auth`]) → cache → (single-flight) ticket from
//! [`tickets`] → upstream (Feishu's auth API, [`tokens::upstream`]) → cache and store → respond.
//! The broker ([`tokens`]) refreshes in the background before expiry so callers never wait on
//! the common path.
//!
//! State is shared as one cheap, clonable [`AppState`] handle; time comes from a [`clock::Clock`]
//! so tests move it by hand.
//!
//! # Reloading
//!
//! `serve` reads its config file again on SIGHUP ([`server`]) and hands it to
//! [`AppState::reload`], which applies what can change while running — `[[clients]]`,
//! `[[consumers]]`, and the apps' Encrypt Keys and Verification Tokens (previous ones included)
//! — and logs the rest as "needs a restart" ([`Config::needs_restart`]). The clients and the
//! verifier are immutable values swapped whole ([`Swap`]): a request reads one `Arc` under an
//! uncontended lock. [`AppState::config`] stays the config the service started with.

pub mod auth;
pub mod clock;
pub mod config;
pub mod consumer_filter;
pub mod demo;
pub mod error;
pub mod events;
pub mod forward;
pub mod metrics;
pub mod mock_feishu;
pub mod model;
pub mod ops;
pub mod push;
pub mod routes;
pub mod secret;
pub mod server;
pub mod store;
pub mod tickets;
pub mod tokens;
pub mod webhook;

use std::sync::{Arc, Mutex, RwLock};

use clock::{Clock, SharedClock};
use config::Config;
use events::{Intake, Verifier};
use forward::Forwarder;
use store::Store;
use tickets::Tickets;
use tokens::Broker;

/// Everything a request handler needs, behind one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// A value replaced whole by a config reload: readers clone the `Arc` under a read lock held for
/// nothing else, so they never wait on each other (std `RwLock`: nothing awaits inside).
struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    fn new(value: T) -> Self {
        Swap(RwLock::new(Arc::new(value)))
    }

    fn load(&self) -> Arc<T> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn store(&self, value: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }
}

/// What a reload changed, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Clients configured now.
    pub clients: usize,
    pub consumers: forward::deliver::ConsumerChanges,
    /// Keys whose change needs a restart: not applied.
    pub needs_restart: Vec<String>,
}

struct Inner {
    config: Config,
    verifier: Swap<Verifier>,
    clients: Swap<auth::Clients>,
    /// Serialises reloads (SIGHUPs in quick succession apply one after the other).
    reloading: Mutex<()>,
    intake: Intake,
    tickets: Tickets,
    forwarder: Forwarder,
    broker: Broker,
    metrics: metrics::Metrics,
    store: Store,
    clock: SharedClock,
}

impl AppState {
    /// The state, or why it cannot be built (the HTTP client for the Open Platform). It acts
    /// as one replica of a fleet when the store is shared ([`Store::is_shared`]).
    pub fn new(config: Config, store: Store, clock: SharedClock) -> Result<Self, error::Error> {
        let fleet = store.is_shared();
        Self::build(config, store, clock, fleet)
    }

    /// One of several replicas sharing `store` whatever its backend: several of these over one
    /// memory store act like replicas on Redis (every store announces every write), which is
    /// how the fleet's coordination is tested in one process.
    pub fn new_replica(
        config: Config,
        store: Store,
        clock: SharedClock,
    ) -> Result<Self, error::Error> {
        Self::build(config, store, clock, true)
    }

    fn build(
        config: Config,
        store: Store,
        clock: SharedClock,
        fleet: bool,
    ) -> Result<Self, error::Error> {
        let verifier = Verifier::with_clock(&config.apps, Arc::clone(&clock));
        let clients = auth::Clients::new(&config.clients);
        let metrics = metrics::Metrics::new();
        let tickets = Tickets::new(
            &config,
            store.clone(),
            Arc::clone(&clock),
            metrics.clone(),
            fleet,
        );
        let forwarder =
            Forwarder::new(&config, store.clone(), Arc::clone(&clock), metrics.clone())?;
        let intake = Intake::new(
            config.events.clone(),
            tickets.clone(),
            store.clone(),
            forwarder.clone(),
            metrics.clone(),
            Arc::clone(&clock),
        );
        let broker = Broker::new(
            &config,
            store.clone(),
            tickets.clone(),
            Arc::clone(&clock),
            metrics.clone(),
        )?;
        Ok(AppState(Arc::new(Inner {
            config,
            verifier: Swap::new(verifier),
            clients: Swap::new(clients),
            reloading: Mutex::new(()),
            intake,
            tickets,
            forwarder,
            broker,
            metrics,
            store,
            clock,
        })))
    }

    /// The config the service started with. What a reload changes is read from
    /// [`AppState::clients`], [`AppState::verifier`] and [`AppState::forwarder`].
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The event keys and tokens in effect now.
    pub fn verifier(&self) -> Arc<Verifier> {
        self.0.verifier.load()
    }

    /// The bearer-key clients in effect now.
    pub fn clients(&self) -> Arc<auth::Clients> {
        self.0.clients.load()
    }

    /// Apply a reloaded, validated config: swap in its clients, its consumers and the event
    /// keys and tokens of the apps running now; list what needs a restart instead of applying
    /// it (see [`Config::needs_restart`]). Apps added by `new` are not served until a restart.
    pub fn reload(&self, new: &Config) -> Result<Reloaded, error::Error> {
        let _one_at_a_time = self.0.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let running = &self.0.config;
        let needs_restart = running.needs_restart(new);
        // The running apps, each with its keys and tokens from `new` when it is still there.
        let apps: Vec<config::AppConfig> = running
            .apps
            .iter()
            .map(|app| match new.app(&app.app_id) {
                Some(fresh) => config::AppConfig {
                    encrypt_key: fresh.encrypt_key.clone(),
                    verification_token: fresh.verification_token.clone(),
                    previous_encrypt_key: fresh.previous_encrypt_key.clone(),
                    previous_verification_token: fresh.previous_verification_token.clone(),
                    previous_keys_until: fresh.previous_keys_until,
                    ..app.clone()
                },
                None => app.clone(),
            })
            .collect();
        let consumers = self.0.forwarder.reconfigure(&new.consumers)?;
        self.0
            .verifier
            .store(Verifier::with_clock(&apps, Arc::clone(&self.0.clock)));
        self.0.clients.store(auth::Clients::new(&new.clients));
        Ok(Reloaded {
            clients: new.clients.len(),
            consumers,
            needs_restart,
        })
    }

    /// What acts on verified `/events` payloads.
    /// The event hand-off: consumers, their queue, the deliverer.
    pub fn forwarder(&self) -> &Forwarder {
        &self.0.forwarder
    }

    pub fn intake(&self) -> &Intake {
        &self.0.intake
    }

    /// The app tickets: stored pushes, resend requests, waiting callers.
    pub fn tickets(&self) -> &Tickets {
        &self.0.tickets
    }

    pub fn broker(&self) -> &Broker {
        &self.0.broker
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.0.metrics
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    pub fn clock(&self) -> &dyn Clock {
        self.0.clock.as_ref()
    }
}

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

use std::sync::Arc;

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

struct Inner {
    config: Config,
    verifier: Verifier,
    clients: auth::Clients,
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
        let verifier = Verifier::new(&config.apps);
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
            verifier,
            clients,
            intake,
            tickets,
            forwarder,
            broker,
            metrics,
            store,
            clock,
        })))
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn verifier(&self) -> &Verifier {
        &self.0.verifier
    }

    pub fn clients(&self) -> &auth::Clients {
        &self.0.clients
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

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
//!   routes (path → handler; body limit; the one place errors become responses)
//!                    │
//!   events (verify signature over raw bytes → decrypt → parse envelope → check token)
//!                    │
//!   store (newest ticket per app, tenant state; embedded redb file | memory)
//! ```
//!
//! The intake flow: request → limit → verify signature (raw bytes) → decrypt → parse envelope →
//! check token → challenge | store ticket | record tenant | ack. Intake answers 200 to Feishu only
//! after the ticket is durable.
//!
//! State is shared as one cheap, clonable [`AppState`] handle; time comes from a [`clock::Clock`]
//! so tests move it by hand.

pub mod clock;
pub mod config;
pub mod error;
pub mod events;
pub mod ops;
pub mod push;
pub mod routes;
pub mod secret;
pub mod server;
pub mod store;

use std::sync::Arc;

use clock::{Clock, SharedClock};
use config::Config;
use events::Verifier;
use store::Store;

/// Everything a request handler needs, behind one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: Config,
    verifier: Verifier,
    store: Store,
    clock: SharedClock,
}

impl AppState {
    pub fn new(config: Config, store: Store, clock: SharedClock) -> Self {
        let verifier = Verifier::new(&config.apps);
        AppState(Arc::new(Inner {
            config,
            verifier,
            store,
            clock,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn verifier(&self) -> &Verifier {
        &self.0.verifier
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    pub fn clock(&self) -> &dyn Clock {
        self.0.clock.as_ref()
    }
}

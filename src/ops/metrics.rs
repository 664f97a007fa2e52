//! Prometheus metrics (`GET /metrics`, OpenMetrics text from `prometheus-client`).
//!
//! Labels are bounded and never secret: app ids (from the config), event types (only of
//! authentic events), error codes, token kinds, Feishu endpoints and codes. No ticket, token, key
//! or tenant_key appears in a label or a value. The ticket gauges are computed from the store at
//! scrape time, so they are right even on a replica that did not receive the push.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::ops::status::TicketState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event_type: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppStateLabels {
    app_id: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabels {
    app_id: String,
    via: String,
    stored: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResendLabels {
    app_id: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    endpoint: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

fn intake_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn upstream_histogram() -> Histogram {
    // 5 ms … ~10 s
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

struct Inner {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    intake_duration: Histogram,
    ticket_pushes: Family<PushLabels, Counter>,
    ticket_resends: Family<ResendLabels, Counter>,
    ticket_age: Family<AppLabels, Gauge<f64, AtomicU64>>,
    ticket_state: Family<AppStateLabels, Gauge>,
    token_requests: Family<TokenLabels, Counter>,
    upstream_calls: Family<UpstreamLabels, Counter>,
    upstream_duration: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    open_connections: Gauge,
}

/// The metrics handle. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("lark_ticketd");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Requests to /events by event type and outcome (accepted, or the error code)",
            events.clone(),
        );
        let intake_duration = intake_histogram();
        registry.register(
            "intake_duration_seconds",
            "Time to answer a request to /events",
            intake_duration.clone(),
        );
        let ticket_pushes = Family::<PushLabels, Counter>::default();
        registry.register(
            "ticket_pushes",
            "Authentic app_ticket pushes, by how they arrived and whether they were the newest",
            ticket_pushes.clone(),
        );
        let ticket_resends = Family::<ResendLabels, Counter>::default();
        registry.register(
            "ticket_resends",
            "app_ticket resend requests sent to Feishu, by outcome",
            ticket_resends.clone(),
        );
        let ticket_age = Family::<AppLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "ticket_age_seconds",
            "Age of the stored app_ticket (absent while there is none)",
            ticket_age.clone(),
        );
        let ticket_state = Family::<AppStateLabels, Gauge>::default();
        registry.register(
            "ticket_state",
            "1 for the current ticket state of each app (fresh, stale, missing), 0 otherwise",
            ticket_state.clone(),
        );
        let token_requests = Family::<TokenLabels, Counter>::default();
        registry.register(
            "token_requests",
            "Token API requests by token kind and outcome (hit, waited, refreshed, stale, or the error code)",
            token_requests.clone(),
        );
        let upstream_calls = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_calls",
            "Calls to the Open Platform auth API by endpoint and Feishu code (or timeout, transport)",
            upstream_calls.clone(),
        );
        let upstream_duration =
            Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                upstream_histogram,
            );
        registry.register(
            "upstream_call_duration_seconds",
            "Duration of calls to the Open Platform auth API, retries included",
            upstream_duration.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open client connections",
            open_connections.clone(),
        );
        Metrics(Arc::new(Inner {
            registry,
            events,
            intake_duration,
            ticket_pushes,
            ticket_resends,
            ticket_age,
            ticket_state,
            token_requests,
            upstream_calls,
            upstream_duration,
            open_connections,
        }))
    }

    /// A request to /events: `outcome` is `accepted` or the error code.
    pub fn event(&self, event_type: &str, outcome: &str, seconds: f64) {
        let event_type = if event_type.is_empty() {
            "unknown"
        } else {
            event_type
        };
        self.0
            .events
            .get_or_create(&EventLabels {
                event_type: event_type.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.0.intake_duration.observe(seconds);
    }

    /// An authentic app_ticket push.
    pub fn ticket_push(&self, app_id: &str, via: &str, stored: bool) {
        self.0
            .ticket_pushes
            .get_or_create(&PushLabels {
                app_id: app_id.to_string(),
                via: via.to_string(),
                stored: stored.to_string(),
            })
            .inc();
    }

    /// A resend request's outcome: `accepted` or `failed`.
    pub fn ticket_resend(&self, app_id: &str, outcome: &str) {
        self.0
            .ticket_resends
            .get_or_create(&ResendLabels {
                app_id: app_id.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// A token API request: `kind` app or tenant, `outcome` hit/waited/refreshed/stale or the error code.
    pub fn token_request(&self, kind: &str, outcome: &str) {
        self.0
            .token_requests
            .get_or_create(&TokenLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// A call to the auth API: `code` is Feishu's code, or `timeout` / `transport`.
    pub fn upstream_call(&self, endpoint: &str, code: &str, seconds: f64) {
        self.0
            .upstream_calls
            .get_or_create(&UpstreamLabels {
                endpoint: endpoint.to_string(),
                code: code.to_string(),
            })
            .inc();
        self.0
            .upstream_duration
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .observe(seconds);
    }

    /// Count an open connection until the guard drops.
    pub fn connection(&self) -> ConnectionGuard {
        self.0.open_connections.inc();
        ConnectionGuard(self.clone())
    }

    /// Set the ticket gauges of one app (at scrape time).
    pub fn set_ticket(&self, app_id: &str, state: TicketState, age_seconds: Option<f64>) {
        for s in [TicketState::Fresh, TicketState::Stale, TicketState::Missing] {
            self.0
                .ticket_state
                .get_or_create(&AppStateLabels {
                    app_id: app_id.to_string(),
                    state: s.as_str().to_string(),
                })
                .set(i64::from(s == state));
        }
        let labels = AppLabels {
            app_id: app_id.to_string(),
        };
        match age_seconds {
            Some(age) => {
                self.0.ticket_age.get_or_create(&labels).set(age);
            }
            None => {
                self.0.ticket_age.remove(&labels);
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.0.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Decrements the open-connection gauge when dropped.
pub struct ConnectionGuard(Metrics);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0 .0.open_connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_family_with_the_prefix() {
        let m = Metrics::new();
        m.event("app_ticket", "accepted", 0.001);
        m.token_request("tenant", "hit");
        m.upstream_call("app_access_token", "0", 0.02);
        m.ticket_resend("cli_a", "accepted");
        m.ticket_push("cli_a", "push", true);
        m.set_ticket("cli_a", TicketState::Fresh, Some(12.0));
        let _guard = m.connection();
        let text = m.encode();
        for name in [
            "lark_ticketd_events_total{event_type=\"app_ticket\",outcome=\"accepted\"} 1",
            "lark_ticketd_token_requests_total{kind=\"tenant\",outcome=\"hit\"} 1",
            "lark_ticketd_upstream_calls_total{endpoint=\"app_access_token\",code=\"0\"} 1",
            "lark_ticketd_ticket_age_seconds{app_id=\"cli_a\"} 12.0",
            "lark_ticketd_ticket_state{app_id=\"cli_a\",state=\"fresh\"} 1",
            "lark_ticketd_ticket_state{app_id=\"cli_a\",state=\"stale\"} 0",
            "lark_ticketd_open_connections 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        m.set_ticket("cli_a", TicketState::Missing, None);
        assert!(!m.encode().contains("ticket_age_seconds{"));
    }
}

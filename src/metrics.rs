//! Prometheus metrics (`GET /metrics`, OpenMetrics text from `prometheus-client`).
//!
//! A leaf (DESIGN.md → *Layout*): intake, tickets, the broker, the upstream client and the
//! server all count through [`Metrics`], and it imports nothing from the crate but the plain
//! records of [`crate::model`] ([`TicketState`]). What it cannot see itself is handed in by the
//! layer that owns it: the ticket gauges ([`Metrics::set_ticket`]) and the log writer's dropped
//! lines ([`Metrics::log_lines_dropped`]) are set by the `/metrics` handler at scrape time.
//!
//! Labels are bounded and never secret. A label value that a request can influence is never
//! copied into the exposition: it is mapped onto a closed set of `&'static str`s here, so no
//! input can inject lines (a `"` or a newline in an event type) or grow the number of series:
//!
//! * `event_type`: the event types we name ([`KNOWN_EVENT_TYPES`]), else `other` (`unknown`
//!   before a request was verified);
//! * `outcome` / error codes, token kinds, `via`, stale reasons: `&'static str` by type;
//! * Feishu's answer codes ([`KNOWN_UPSTREAM_CODES`]), else `other`;
//! * app ids come from the config; Feishu endpoint names from our own constants.
//!
//! No ticket, token, key or tenant_key appears in a label or a value. The ticket gauges are
//! computed from the store at scrape time, so they are right even on a replica that did not
//! receive the push.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::model::TicketState;

/// The event types that get their own `event_type` label value: Feishu's store-app events,
/// the challenge, and the common business events. Every other type is counted as `other`.
pub const KNOWN_EVENT_TYPES: &[&str] = &[
    "url_verification",
    "app_ticket",
    "app_open",
    "app_status_change",
    "app_uninstalled",
    "order_paid",
    "message",
    "add_bot",
    "remove_bot",
    "p2p_chat_create",
    "im.message.receive_v1",
    "im.message.message_read_v1",
    "im.message.recalled_v1",
    "im.message.reaction.created_v1",
    "im.message.reaction.deleted_v1",
    "im.chat.updated_v1",
    "im.chat.disbanded_v1",
    "im.chat.member.bot.added_v1",
    "im.chat.member.bot.deleted_v1",
    "im.chat.member.user.added_v1",
    "im.chat.member.user.deleted_v1",
    "contact.user.created_v3",
    "contact.user.updated_v3",
    "contact.user.deleted_v3",
    "contact.department.created_v3",
    "contact.department.updated_v3",
    "contact.department.deleted_v3",
    "contact.scope.updated_v3",
    "application.application.visibility.added_v6",
    "application.bot.menu_v6",
    "card.action.trigger",
];

/// Feishu answer codes that get their own `code` label value (protocol.md §6's table, plus our
/// own `timeout` and `transport`); any other code is `other`.
pub const KNOWN_UPSTREAM_CODES: &[&str] = &[
    "0",
    "10003",
    "10005",
    "10012",
    "10013",
    "10014",
    "10015",
    "10016",
    "11210",
    "99991400",
    "99991661",
    "99991662",
    "99991663",
    "99991664",
    "99991665",
    "99991671",
    "99991673",
    "99992500",
    "99992501",
    "timeout",
    "transport",
];

/// The label value for an event type: itself if we name it, else `other`.
pub fn event_type_label(event_type: &str) -> &'static str {
    if event_type.is_empty() {
        return "unknown";
    }
    KNOWN_EVENT_TYPES
        .iter()
        .find(|known| **known == event_type)
        .copied()
        .unwrap_or("other")
}

/// The label value for Feishu's answer code: itself if listed, else `other`.
pub fn upstream_code_label(code: &str) -> &'static str {
    KNOWN_UPSTREAM_CODES
        .iter()
        .find(|known| **known == code)
        .copied()
        .unwrap_or("other")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event_type: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StaleLabels {
    app_id: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PreviousKeyLabels {
    app_id: String,
    /// `encrypt_key` or `verification_token`.
    key: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    /// `applied` or `refused`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppStateLabels {
    app_id: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabels {
    app_id: String,
    via: &'static str,
    stored: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResendLabels {
    app_id: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    endpoint: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    /// From the config (`[a-z0-9-]{1,64}`): a closed set.
    consumer: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

fn intake_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn delivery_histogram() -> Histogram {
    // 1 ms … ~9 h: from Feishu's POST to the consumer's 2xx, retries included.
    Histogram::new(exponential_buckets(0.001, 4.0, 16))
}

fn upstream_histogram() -> Histogram {
    // 5 ms … ~10 s
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

struct Inner {
    registry: Registry,
    process: ProcessMetrics,
    events: Family<EventLabels, Counter>,
    intake_duration: Histogram,
    ticket_pushes: Family<PushLabels, Counter>,
    stale_requests: Family<StaleLabels, Counter>,
    event_times_capped: Family<AppLabels, Counter>,
    log_lines_dropped: Counter,
    ticket_resends: Family<ResendLabels, Counter>,
    ticket_age: Family<AppLabels, Gauge<f64, AtomicU64>>,
    ticket_state: Family<AppStateLabels, Gauge>,
    token_requests: Family<TokenLabels, Counter>,
    upstream_calls: Family<UpstreamLabels, Counter>,
    upstream_duration: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    deliveries: Family<DeliveryLabels, Counter>,
    consumer_pending: Family<ConsumerLabels, Gauge>,
    consumer_dead: Family<ConsumerLabels, Gauge>,
    consumer_oldest_pending: Family<ConsumerLabels, Gauge<f64, AtomicU64>>,
    delivery_latency: Family<ConsumerLabels, Histogram, fn() -> Histogram>,
    duplicates: Counter,
    open_connections: Gauge,
    events_previous_key: Family<PreviousKeyLabels, Counter>,
    config_reloads: Family<ReloadLabels, Counter>,
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
        // Our families under `lark_ticketd_`; the process's own under the standard `process_`
        // names, so stock dashboards and alerts work.
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("lark_ticketd");
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
        let stale_requests = Family::<StaleLabels, Counter>::default();
        registry.register(
            "stale_requests",
            "Authentic requests refused as stale_request (replays, or retries past events.max_age), by reason",
            stale_requests.clone(),
        );
        let event_times_capped = Family::<AppLabels, Counter>::default();
        registry.register(
            "event_times_capped",
            "Events whose time was further ahead of our clock than events.max_skew, ordered at that limit",
            event_times_capped.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log output could not keep up",
            log_lines_dropped.clone(),
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
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Delivery attempts to consumers by outcome (delivered, retry, dead)",
            deliveries.clone(),
        );
        let consumer_pending = Family::<ConsumerLabels, Gauge>::default();
        registry.register(
            "consumer_pending",
            "Events queued for a consumer and not yet delivered (the backlog)",
            consumer_pending.clone(),
        );
        let consumer_dead = Family::<ConsumerLabels, Gauge>::default();
        registry.register(
            "consumer_dead_letters",
            "A consumer's retained dead letters (every retry failed)",
            consumer_dead.clone(),
        );
        let consumer_oldest_pending = Family::<ConsumerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "consumer_oldest_pending_age_seconds",
            "Age of a consumer's oldest undelivered event (0 with none)",
            consumer_oldest_pending.clone(),
        );
        let delivery_latency =
            Family::<ConsumerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                delivery_histogram,
            );
        registry.register(
            "delivery_latency_seconds",
            "Time from Feishu's POST to the consumer's 2xx, retries included",
            delivery_latency.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "duplicate_events",
            "Events redelivered within forwarding.dedupe_window: acknowledged, not handed on again",
            duplicates.clone(),
        );
        let events_previous_key = Family::<PreviousKeyLabels, Counter>::default();
        registry.register(
            "events_previous_key",
            "Authentic pushes only an app's previous Encrypt Key or Verification Token accepted (key rotation): at zero for a while, Feishu uses the new one",
            events_previous_key.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads (SIGHUP) by outcome: applied, or refused (the file was invalid; the running config stays)",
            config_reloads.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open client connections",
            open_connections.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "build_info",
            "The running build: always 1, with the version as a label",
            build_info.clone(),
        );
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let process = ProcessMetrics::register(&mut root);
        Metrics(Arc::new(Inner {
            registry: root,
            process,
            events,
            intake_duration,
            ticket_pushes,
            stale_requests,
            event_times_capped,
            log_lines_dropped,
            ticket_resends,
            ticket_age,
            ticket_state,
            token_requests,
            upstream_calls,
            upstream_duration,
            deliveries,
            consumer_pending,
            consumer_dead,
            consumer_oldest_pending,
            delivery_latency,
            duplicates,
            open_connections,
            events_previous_key,
            config_reloads,
        }))
    }

    /// A delivery attempt's outcome (`delivered`, `retry`, `dead`); for a delivered one, the
    /// time since Feishu's POST.
    pub fn delivery(&self, consumer: &str, outcome: &'static str, latency_seconds: Option<f64>) {
        self.0
            .deliveries
            .get_or_create(&DeliveryLabels {
                consumer: consumer.to_string(),
                outcome,
            })
            .inc();
        if let Some(seconds) = latency_seconds {
            self.0
                .delivery_latency
                .get_or_create(&ConsumerLabels {
                    consumer: consumer.to_string(),
                })
                .observe(seconds);
        }
    }

    /// A consumer's backlog, read from the store at scrape time.
    pub fn set_consumer(&self, consumer: &str, pending: u64, dead: u64, oldest_pending_age_s: f64) {
        let labels = ConsumerLabels {
            consumer: consumer.to_string(),
        };
        self.0
            .consumer_pending
            .get_or_create(&labels)
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.0
            .consumer_dead
            .get_or_create(&labels)
            .set(i64::try_from(dead).unwrap_or(i64::MAX));
        self.0
            .consumer_oldest_pending
            .get_or_create(&labels)
            .set(oldest_pending_age_s);
    }

    /// An authentic push that only the app's previous `key` (`encrypt_key` or
    /// `verification_token`) accepted.
    pub fn event_previous_key(&self, app_id: &str, key: &'static str) {
        self.0
            .events_previous_key
            .get_or_create(&PreviousKeyLabels {
                app_id: app_id.to_string(),
                key,
            })
            .inc();
    }

    /// A config reload: `applied` or `refused`.
    pub fn config_reload(&self, outcome: &'static str) {
        self.0
            .config_reloads
            .get_or_create(&ReloadLabels { outcome })
            .inc();
    }

    /// A consumer removed by a reload: its gauges go, so no stale backlog is exported.
    pub fn forget_consumer(&self, consumer: &str) {
        let labels = ConsumerLabels {
            consumer: consumer.to_string(),
        };
        self.0.consumer_pending.remove(&labels);
        self.0.consumer_dead.remove(&labels);
        self.0.consumer_oldest_pending.remove(&labels);
    }

    /// An event redelivered within the dedupe window.
    pub fn duplicate_event(&self) {
        self.0.duplicates.inc();
    }

    /// A request to /events: `event_type` as the request named it (mapped onto
    /// [`KNOWN_EVENT_TYPES`] + `other`), `outcome` `accepted` or the error code.
    pub fn event(&self, event_type: &str, outcome: &'static str, seconds: f64) {
        self.0
            .events
            .get_or_create(&EventLabels {
                event_type: event_type_label(event_type),
                outcome,
            })
            .inc();
        self.0.intake_duration.observe(seconds);
    }

    /// An authentic app_ticket push (never a refused one: replays are [`Metrics::stale_request`]).
    pub fn ticket_push(&self, app_id: &str, via: &'static str, stored: bool) {
        self.0
            .ticket_pushes
            .get_or_create(&PushLabels {
                app_id: app_id.to_string(),
                via,
                stored: if stored { "true" } else { "false" },
            })
            .inc();
    }

    /// An authentic request refused as `stale_request`; `reason` names which time was out of the
    /// window.
    pub fn stale_request(&self, app_id: &str, reason: &'static str) {
        self.0
            .stale_requests
            .get_or_create(&StaleLabels {
                app_id: app_id.to_string(),
                reason,
            })
            .inc();
    }

    /// An event whose time was capped at `now + events.max_skew`.
    pub fn event_time_capped(&self, app_id: &str) {
        self.0
            .event_times_capped
            .get_or_create(&AppLabels {
                app_id: app_id.to_string(),
            })
            .inc();
    }

    /// A resend request's outcome: `accepted` or `failed`.
    pub fn ticket_resend(&self, app_id: &str, outcome: &'static str) {
        self.0
            .ticket_resends
            .get_or_create(&ResendLabels {
                app_id: app_id.to_string(),
                outcome,
            })
            .inc();
    }

    /// A token API request: `kind` app or tenant, `outcome` hit/waited/refreshed/stale or the error code.
    pub fn token_request(&self, kind: &'static str, outcome: &'static str) {
        self.0
            .token_requests
            .get_or_create(&TokenLabels { kind, outcome })
            .inc();
    }

    /// A call to the auth API: `code` is Feishu's code (mapped onto [`KNOWN_UPSTREAM_CODES`] +
    /// `other`), or `timeout` / `transport`.
    pub fn upstream_call(&self, endpoint: &str, code: &str, seconds: f64) {
        self.0
            .upstream_calls
            .get_or_create(&UpstreamLabels {
                endpoint: endpoint.to_string(),
                code: upstream_code_label(code),
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

    /// Catch the dropped-log-lines counter up with `total`, the log writer's own count (it must
    /// not call into metrics, and metrics import nothing above them: the caller reads one and
    /// hands it to the other at scrape time).
    pub fn log_lines_dropped(&self, total: u64) {
        self.0
            .log_lines_dropped
            .inner()
            .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
    }

    /// The OpenMetrics text exposition (the process figures read now).
    pub fn encode(&self) -> String {
        self.0.process.update();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.0.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// The process's own figures, read from `/proc/self` at scrape time (Linux; elsewhere they stay
/// 0). Twenty lines of parsing instead of a crate: `procfs` would be most of our dependency tree.
struct ProcessMetrics {
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time_seconds: Gauge,
}

/// `USER_HZ`: the unit of `/proc/self/stat`'s CPU times, 100 on every Linux architecture that
/// ships (the kernel fixes it for userspace regardless of its own tick).
const USER_HZ: f64 = 100.0;

impl ProcessMetrics {
    fn register(root: &mut Registry) -> ProcessMetrics {
        let m = ProcessMetrics {
            cpu_seconds: Counter::default(),
            resident_bytes: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            start_time_seconds: Gauge::default(),
        };
        root.register(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            m.cpu_seconds.clone(),
        );
        root.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            m.resident_bytes.clone(),
        );
        root.register(
            "process_open_fds",
            "Open file descriptors",
            m.open_fds.clone(),
        );
        root.register(
            "process_max_fds",
            "The limit on open file descriptors",
            m.max_fds.clone(),
        );
        root.register(
            "process_start_time_seconds",
            "Start time of the process since the unix epoch, in seconds",
            m.start_time_seconds.clone(),
        );
        m.update();
        m
    }

    fn update(&self) {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let stat = read("/proc/self/stat");
        // The fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            let total = (utime + stime) / USER_HZ;
            let seen = self.cpu_seconds.get();
            if total > seen {
                self.cpu_seconds.inc_by(total - seen);
            }
        }
        let boot_time = read("/proc/stat")
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if let (Some(boot), Some(start)) = (boot_time, field(22)) {
            self.start_time_seconds.set((boot + start / USER_HZ) as i64);
        }
        let kib = |key: &str, text: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        };
        if let Some(rss) = kib("VmRSS:", &read("/proc/self/status")) {
            self.resident_bytes.set(rss * 1024);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        if let Some(limit) = read("/proc/self/limits")
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        {
            self.max_fds.set(limit);
        }
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

    #[test]
    fn the_build_and_the_process_are_described() {
        let text = Metrics::new().encode();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "lark_ticketd_build_info{{version=\"{version}\"}} 1"
            )),
            "{text}"
        );
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_start_time_seconds") > 1.6e9);
        assert!(value("process_cpu_seconds_total") >= 0.0);
    }

    /// The exposition parsed line by line: (series name with labels, value) of every sample.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn metrics_label_injection_from_event_type_is_impossible() {
        let m = Metrics::new();
        let hostile = "x\"} 1\n# EOF\nlark_ticketd_forged_total{a=\"b";
        m.event(hostile, "accepted", 0.001);
        m.upstream_call("app_access_token", "1\"}\n# EOF", 0.01);
        let text = m.encode();
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(!text.contains("forged"), "{text}");
        assert!(
            text.contains("lark_ticketd_events_total{event_type=\"other\",outcome=\"accepted\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "lark_ticketd_upstream_calls_total{endpoint=\"app_access_token\",code=\"other\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn metrics_series_stay_bounded_for_distinct_event_types() {
        let m = Metrics::new();
        for i in 0..2000 {
            m.event(&format!("custom.type_{i}"), "accepted", 0.001);
            m.upstream_call("tenant_access_token", &format!("{}", 20_000_000 + i), 0.01);
        }
        m.event("im.message.receive_v1", "accepted", 0.001);
        let text = m.encode();
        let events = samples(&text)
            .into_iter()
            .filter(|l| l.starts_with("lark_ticketd_events_total{"))
            .count();
        assert_eq!(events, 2, "other + im.message.receive_v1:\n{text}");
        assert!(text.contains("event_type=\"other\",outcome=\"accepted\"} 2000"));
        let upstream = samples(&text)
            .into_iter()
            .filter(|l| l.starts_with("lark_ticketd_upstream_calls_total{"))
            .count();
        assert_eq!(upstream, 1, "{text}");
    }

    #[test]
    fn label_sets_are_closed() {
        assert_eq!(event_type_label("app_ticket"), "app_ticket");
        assert_eq!(event_type_label(""), "unknown");
        assert_eq!(event_type_label("APP_TICKET"), "other");
        assert_eq!(upstream_code_label("10012"), "10012");
        assert_eq!(upstream_code_label("-1"), "other");
        for name in KNOWN_EVENT_TYPES.iter().chain(KNOWN_UPSTREAM_CODES) {
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.'),
                "{name}"
            );
        }
    }
}

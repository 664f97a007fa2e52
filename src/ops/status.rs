//! Ticket freshness and token state, for operators: the status API's model, how it is computed
//! from the store, the ticket bookkeeping and the broker, and how the `status` command renders it.
//!
//! A ticket is `missing` (none stored), `stale` (older than `tickets.stale_after`, 75 minutes by
//! default: Feishu pushes hourly, so one missed push is tolerated), or `fresh`; a custom
//! (self-built) app has none and needs none: `not_needed`, which never counts against the
//! `status` command's exit code and has no ticket gauges. An app whose last token fetch from the
//! Open Platform failed, with none succeeding since (`tokens.consecutive_failures > 0`), is
//! `failing`: the `status` command exits 1 for it as for a stale ticket — Feishu refusing every
//! token request is as urgent as a ticket that stopped arriving. Nothing here ever holds a ticket
//! or a token: only ages, expiries, counts, an 8-hex-digit fingerprint, and the last failure's
//! message as the callers were told it.

use serde::{Deserialize, Serialize};

use crate::clock::utc;
use crate::config::AppKind;
use crate::error::Error;
use crate::store::{Durability, TenantRecord, TenantState, TicketRecord, TicketSource};
use crate::tickets::ResendOutcome;
use crate::tokens::{TokenFetches, TokenKey};
use crate::AppState;

pub use crate::model::TicketState;

/// The state of a stored ticket at `now_ms`: a pure function, so tests move time by hand.
pub fn ticket_state(
    record: Option<&TicketRecord>,
    now_ms: u64,
    stale_after_ms: u64,
) -> TicketState {
    match record {
        None => TicketState::Missing,
        Some(r) if now_ms.saturating_sub(r.received_at_ms) > stale_after_ms => TicketState::Stale,
        Some(_) => TicketState::Fresh,
    }
}

/// One app's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub app_id: String,
    /// `store` or `custom` (an older service does not say: `store`).
    #[serde(default)]
    pub kind: AppKind,
    pub ticket: TicketStatus,
    /// The last resend request since this process started.
    pub last_resend: Option<ResendInfo>,
    pub app_token: TokenStatus,
    /// A custom app's own tenant token (a store app has one per tenant: see `tenants`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_token: Option<TokenStatus>,
    pub tenants: TenantCounts,
    /// How the app's token fetches from the Open Platform have gone since the process started
    /// (an older service does not say: no failures).
    #[serde(default)]
    pub tokens: TokenFetches,
}

impl AppStatus {
    /// The app's last token fetch failed and none succeeded since.
    pub fn tokens_failing(&self) -> bool {
        self.tokens.consecutive_failures > 0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketStatus {
    pub state: TicketState,
    /// Unix seconds.
    pub received_at: Option<u64>,
    pub age_seconds: Option<u64>,
    /// `push` (Feishu's schedule) or `resend` (the answer to a resend request of ours).
    pub arrived_via: Option<TicketSource>,
    /// Authentic pushes seen, redeliveries of older tickets included.
    pub pushes_seen: u64,
    /// 8 hex digits of the ticket's SHA-256, to match log lines.
    pub fingerprint: Option<String>,
    pub stale_after_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResendInfo {
    /// Unix seconds.
    pub requested_at: u64,
    pub outcome: ResendOutcome,
    /// No push has arrived since the request.
    pub awaiting_push: bool,
}

/// A cached token's state: never the token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenStatus {
    pub cached: bool,
    /// Seconds left.
    pub expire: Option<u64>,
    /// Unix seconds.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantCounts {
    pub total: usize,
    pub active: usize,
    pub stopped: usize,
    pub uninstalled: usize,
    pub tokens_cached: usize,
}

/// One tenant as the lifecycle events tell it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantStatus {
    pub tenant_key: String,
    pub state: TenantState,
    pub status: Option<String>,
    /// Unix seconds.
    pub first_seen_at: u64,
    pub last_event: String,
    /// Unix seconds.
    pub last_event_at: u64,
    pub last_order: Option<crate::model::Order>,
    pub token: TokenStatus,
}

fn token_status(state: &AppState, key: &TokenKey, now_ms: u64) -> TokenStatus {
    let expiry = state.broker().cached_expiry(key).filter(|&at| at > now_ms);
    TokenStatus {
        cached: expiry.is_some(),
        expire: expiry.map(|at| (at - now_ms) / 1000),
        expires_at: expiry.map(|at| at / 1000),
    }
}

/// The stored ticket of an app that has one (`Some(None)`: none stored yet); `None` for an app
/// that needs none (a custom app).
pub async fn ticket_record(
    state: &AppState,
    app_id: &str,
) -> Result<Option<Option<TicketRecord>>, Error> {
    match state.broker().kind(app_id) {
        Some(AppKind::Custom) => Ok(None),
        _ => Ok(Some(state.store().ticket(app_id).await?)),
    }
}

/// The status of one configured app.
pub async fn app_status(state: &AppState, app_id: &str) -> Result<AppStatus, Error> {
    let now = state.clock().now_ms();
    let stale_after_ms = state.config().tickets.stale_after.as_millis() as u64;
    let kind = state.broker().kind(app_id).unwrap_or_default();
    let ticket = ticket_record(state, app_id).await?;
    let state_now = match &ticket {
        Some(record) => ticket_state(record.as_ref(), now, stale_after_ms),
        None => TicketState::NotNeeded,
    };
    let record = ticket.flatten();
    let tenants = state.store().tenants(app_id).await?;
    let count = |s: TenantState| tenants.iter().filter(|t| t.state == s).count();
    let tenant_token = (kind == AppKind::Custom)
        .then(|| token_status(state, &TokenKey::OwnTenant(app_id.to_string()), now));
    Ok(AppStatus {
        app_id: app_id.to_string(),
        kind,
        tenant_token,
        ticket: TicketStatus {
            state: state_now,
            received_at: record.as_ref().map(|r| r.received_at_ms / 1000),
            age_seconds: record
                .as_ref()
                .map(|r| now.saturating_sub(r.received_at_ms) / 1000),
            arrived_via: record.as_ref().map(|r| r.source),
            pushes_seen: record.as_ref().map_or(0, |r| r.pushes_seen),
            fingerprint: record.as_ref().map(|r| r.ticket.fingerprint()),
            stale_after_seconds: stale_after_ms / 1000,
        },
        last_resend: state.tickets().resend_status(app_id).map(|r| ResendInfo {
            requested_at: r.requested_at_ms / 1000,
            outcome: r.outcome,
            awaiting_push: r.awaiting_push,
        }),
        app_token: token_status(state, &TokenKey::App(app_id.to_string()), now),
        tokens: state.broker().token_fetches(app_id),
        tenants: TenantCounts {
            total: tenants.len(),
            active: count(TenantState::Active),
            stopped: count(TenantState::Stopped),
            uninstalled: count(TenantState::Uninstalled),
            tokens_cached: state.broker().cached_tenant_tokens(app_id),
        },
    })
}

/// Every tenant of an app.
pub async fn tenants(state: &AppState, app_id: &str) -> Result<Vec<TenantStatus>, Error> {
    let now = state.clock().now_ms();
    let records: Vec<TenantRecord> = state.store().tenants(app_id).await?;
    Ok(records
        .into_iter()
        .map(|t| {
            let key = TokenKey::Tenant(app_id.to_string(), t.tenant_key.clone());
            TenantStatus {
                token: token_status(state, &key, now),
                tenant_key: t.tenant_key,
                state: t.state,
                status: t.status,
                first_seen_at: t.first_seen_ms / 1000,
                last_event: t.last_event_type,
                last_event_at: t.last_event_ms / 1000,
                last_order: t.last_order,
            }
        })
        .collect())
}

/// The `status` command's exit code: 0 all fresh, 1 some stale or some app's token fetches
/// failing ([`AppStatus::tokens_failing`]), 2 some missing. An app that needs no ticket
/// (`not_needed`, a custom app) never counts by its ticket, but does by its token fetches.
pub fn exit_code(apps: &[AppStatus]) -> u8 {
    if apps.iter().any(|a| a.ticket.state == TicketState::Missing) {
        2
    } else if apps
        .iter()
        .any(|a| a.ticket.state == TicketState::Stale || a.tokens_failing())
    {
        1
    } else {
        0
    }
}

/// `12s`, `4m 05s`, `1h 02m`, `3d 04h`.
pub fn human_duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d {h:02}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The operator's table. `colour` adds ANSI colours to the ticket state.
pub fn render_table(apps: &[AppStatus], colour: bool) -> String {
    let header = [
        "APP",
        "KIND",
        "TICKET",
        "AGE",
        "RECEIVED AT (UTC)",
        "APP TOKEN",
        "TOKEN FETCHES",
        "TENANTS",
        "LAST RESEND",
    ];
    let mut rows: Vec<[String; 9]> = Vec::new();
    for a in apps {
        let t = &a.ticket;
        rows.push([
            a.app_id.clone(),
            a.kind.as_str().to_string(),
            t.state.as_str().to_string(),
            t.age_seconds.map_or("-".into(), human_duration),
            t.received_at.map_or("-".into(), utc),
            match a.app_token.expire {
                Some(s) => format!("{} left", human_duration(s)),
                None => "not cached".into(),
            },
            match a.tokens.consecutive_failures {
                0 => "ok".into(),
                n => format!("FAILING ({n} in a row)"),
            },
            format!("{} ({} active)", a.tenants.total, a.tenants.active),
            match &a.last_resend {
                None => "-".into(),
                Some(r) => {
                    let outcome = match &r.outcome {
                        ResendOutcome::Pending => "pending".to_string(),
                        ResendOutcome::Accepted => "accepted".to_string(),
                        ResendOutcome::Failed { code: Some(c), .. } => format!("failed ({c})"),
                        ResendOutcome::Failed { code: None, .. } => "failed".to_string(),
                        ResendOutcome::OtherReplica => "by another replica".to_string(),
                    };
                    format!("{} {outcome}", utc(r.requested_at))
                }
            },
        ]);
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(
        header
            .iter()
            .zip(widths)
            .map(|(h, w)| format!("{h:<w$}"))
            .collect(),
        &mut out,
    );
    for (row, app) in rows.iter().zip(apps) {
        let cells = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                let padded = format!("{cell:<w$}");
                let code = match app.ticket.state {
                    TicketState::Fresh => Some("32"),
                    TicketState::Stale => Some("33"),
                    TicketState::Missing => Some("31"),
                    TicketState::NotNeeded => None,
                };
                if let (2, true, Some(code)) = (i, colour, code) {
                    format!("\x1b[{code}m{padded}\x1b[0m")
                } else if i == 6 && colour && app.tokens_failing() {
                    format!("\x1b[31m{padded}\x1b[0m")
                } else {
                    padded
                }
            })
            .collect();
        line(cells, &mut out);
    }
    out.push_str(&render_token_failures(apps));
    out
}

/// Below the table: each failing app's last token fetch failure, in the words its callers got.
pub fn render_token_failures(apps: &[AppStatus]) -> String {
    let mut out = String::new();
    for a in apps.iter().filter(|a| a.tokens_failing()) {
        let Some(f) = &a.tokens.last_failure else {
            continue;
        };
        if out.is_empty() {
            out.push_str("\nTOKEN FETCHES FAILING\n");
        }
        let since = a
            .tokens
            .last_success_at
            .map_or("none succeeded since the start".to_string(), |at| {
                format!("the last success at {} UTC", utc(at))
            });
        out.push_str(&format!(
            "{}: {} failed in a row ({since}); last at {} UTC, {} token: {}: {}\n",
            a.app_id,
            a.tokens.consecutive_failures,
            utc(f.at),
            f.token,
            f.error,
            f.message
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn record(received_at_ms: u64) -> TicketRecord {
        TicketRecord {
            ticket: Secret::new("t"),
            event_time_us: 0,
            event_id: String::new(),
            received_at_ms,
            source: TicketSource::Push,
            pushes_seen: 1,
            rejected: false,
        }
    }

    #[test]
    fn ticket_state_follows_the_clock() {
        let stale_after = 75 * 60_000;
        assert_eq!(ticket_state(None, 0, stale_after), TicketState::Missing);
        let r = record(1_000);
        assert_eq!(
            ticket_state(Some(&r), 1_000, stale_after),
            TicketState::Fresh
        );
        assert_eq!(
            ticket_state(Some(&r), 1_000 + stale_after, stale_after),
            TicketState::Fresh
        );
        assert_eq!(
            ticket_state(Some(&r), 1_001 + stale_after, stale_after),
            TicketState::Stale
        );
    }

    #[test]
    fn times_render_for_humans() {
        assert_eq!(human_duration(7), "7s");
        assert_eq!(human_duration(245), "4m 05s");
        assert_eq!(human_duration(3720), "1h 02m");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600), "3d 04h");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_795_290_111), "2026-11-21 19:41:51");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn consumers_need_attention_with_dead_letters_or_an_old_backlog() {
        let line = |dead, oldest| ConsumerLine {
            name: "bot".into(),
            pending: 1,
            dead,
            oldest_pending_age_seconds: oldest,
            last_error: None,
        };
        assert!(!consumer_needs_attention(&line(0, None), 900));
        assert!(!consumer_needs_attention(&line(0, Some(900)), 900));
        assert!(consumer_needs_attention(&line(0, Some(901)), 900));
        assert!(consumer_needs_attention(&line(1, None), 900));
        let table = render_consumers(&[line(1, Some(5))], 900);
        assert!(
            table.contains("CONSUMER") && table.contains("needs attention"),
            "{table}"
        );
        assert_eq!(render_consumers(&[], 900), "");
    }

    #[test]
    fn the_store_line_says_what_a_200_means() {
        let store = Durability {
            kind: "redis".into(),
            on_disk: Some(false),
            redis: None,
            warnings: vec!["appendonly is \"no\"".into()],
            data_lost_at: None,
        };
        let text = render_store(&store);
        assert!(
            text.contains("STORE redis: a 200 means on disk: no"),
            "{text}"
        );
        assert!(text.contains("  warning: appendonly is \"no\""), "{text}");
    }

    #[test]
    fn exit_codes_rank_missing_over_stale() {
        let app = |state| AppStatus {
            app_id: "cli_a".into(),
            kind: AppKind::Store,
            tenant_token: None,
            ticket: TicketStatus {
                state,
                received_at: None,
                age_seconds: None,
                arrived_via: None,
                pushes_seen: 0,
                fingerprint: None,
                stale_after_seconds: 4500,
            },
            last_resend: None,
            app_token: TokenStatus {
                cached: false,
                expire: None,
                expires_at: None,
            },
            tenants: TenantCounts {
                total: 0,
                active: 0,
                stopped: 0,
                uninstalled: 0,
                tokens_cached: 0,
            },
            tokens: TokenFetches::default(),
        };
        assert_eq!(exit_code(&[app(TicketState::Fresh)]), 0);
        assert_eq!(
            exit_code(&[app(TicketState::Fresh), app(TicketState::Stale)]),
            1
        );
        assert_eq!(
            exit_code(&[app(TicketState::Stale), app(TicketState::Missing)]),
            2
        );
        // A custom app needs no ticket: it never raises the exit code.
        let custom = AppStatus {
            kind: AppKind::Custom,
            ..app(TicketState::NotNeeded)
        };
        assert_eq!(exit_code(std::slice::from_ref(&custom)), 0);
        assert_eq!(exit_code(&[app(TicketState::Fresh), custom.clone()]), 0);
        let table = render_table(&[custom], true);
        assert!(
            table.contains("custom") && table.contains("not_needed"),
            "{table}"
        );
        assert!(!table.contains('\x1b'), "no colour for not_needed: {table}");
        let table = render_table(&[app(TicketState::Stale)], false);
        assert!(table.starts_with("APP"), "{table}");
        assert!(table.contains("stale"));
        assert!(render_table(&[app(TicketState::Stale)], true).contains("\x1b[33m"));

        // Issue 12: Feishu refusing every token request makes the exit code 1, with a fresh
        // ticket too, and for a custom app (no ticket) alike; a success since clears it.
        let failing = |state, kind| AppStatus {
            kind,
            tokens: TokenFetches {
                consecutive_failures: 3,
                last_success_at: None,
                last_failure: Some(crate::tokens::FetchFailure {
                    at: 1_795_290_111,
                    token: "app".into(),
                    error: "upstream_error".into(),
                    upstream_code: Some(10015),
                    message: "the Open Platform answered code 10015: app secret invalid".into(),
                }),
            },
            ..app(state)
        };
        assert_eq!(exit_code(&[failing(TicketState::Fresh, AppKind::Store)]), 1);
        assert_eq!(
            exit_code(&[failing(TicketState::NotNeeded, AppKind::Custom)]),
            1
        );
        assert_eq!(
            exit_code(&[failing(TicketState::Missing, AppKind::Store)]),
            2
        );
        let recovered = AppStatus {
            tokens: TokenFetches {
                consecutive_failures: 0,
                last_success_at: Some(1_795_290_200),
                ..failing(TicketState::Fresh, AppKind::Store).tokens
            },
            ..app(TicketState::Fresh)
        };
        assert_eq!(exit_code(&[recovered]), 0);
        let table = render_table(&[failing(TicketState::Fresh, AppKind::Store)], false);
        assert!(table.contains("FAILING (3 in a row)"), "{table}");
        assert!(
            table.contains(
                "cli_a: 3 failed in a row (none succeeded since the start); last at 2026-11-21 19:41:51 UTC, app token: upstream_error: the Open Platform answered code 10015: app secret invalid"
            ),
            "{table}"
        );
        assert!(!render_table(&[app(TicketState::Fresh)], false).contains("FAILING"));
    }
}

/// What `GET /v1/apps` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppsResponse {
    pub now: u64,
    pub apps: Vec<AppStatus>,
    /// What a `200` from the store promises (absent from older servers).
    #[serde(default)]
    pub store: Option<Durability>,
}

/// The store line of the `status` table: the backend, whether a `200` means on disk, and each
/// warning on its own line.
pub fn render_store(store: &Durability) -> String {
    let on_disk = match store.on_disk {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    let mut out = format!("\nSTORE {}: a 200 means on disk: {on_disk}\n", store.kind);
    for warning in &store.warnings {
        out.push_str(&format!("  warning: {warning}\n"));
    }
    out
}

/// What `GET /v1/consumers` answers, as the `status` command reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerLine {
    pub name: String,
    pub pending: u64,
    pub dead: u64,
    pub oldest_pending_age_seconds: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConsumersResponse {
    consumers: Vec<ConsumerLine>,
}

/// Does a consumer need an operator: dead letters, or an event waiting longer than `max_age_s`?
pub fn consumer_needs_attention(c: &ConsumerLine, max_age_s: u64) -> bool {
    c.dead > 0
        || c.oldest_pending_age_seconds
            .is_some_and(|age| age > max_age_s)
}

/// The consumers part of the `status` table.
pub fn render_consumers(consumers: &[ConsumerLine], max_age_s: u64) -> String {
    if consumers.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{:<24} {:>8} {:>6} {:>14}  {}\n",
        "CONSUMER", "PENDING", "DEAD", "OLDEST PENDING", "LAST ERROR"
    );
    for c in consumers {
        let oldest = c
            .oldest_pending_age_seconds
            .map_or_else(|| "-".to_string(), human_duration);
        let flag = if consumer_needs_attention(c, max_age_s) {
            "  <- needs attention"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<24} {:>8} {:>6} {:>14}  {}{flag}\n",
            c.name,
            c.pending,
            c.dead,
            oldest,
            c.last_error.as_deref().unwrap_or("-")
        ));
    }
    out
}

/// `lark-ticketd status`: fetch `/v1/apps` and `/v1/consumers`, print a table (or the JSON),
/// return the exit code — 0 every ticket fresh, every app's token fetches succeeding and every
/// consumer keeping up; 1 one ticket stale, one app whose token fetches fail (the last failed,
/// none succeeded since), or one consumer with dead letters or an event older than
/// `max_pending_age_s`; 2 one ticket missing or the service unreachable.
pub async fn run_cli(
    url: &str,
    api_key: Option<&str>,
    as_json: bool,
    max_pending_age_s: u64,
) -> u8 {
    let base = url.trim_end_matches('/').to_string();
    let url = format!("{base}/v1/apps");
    let fail = |message: String| {
        if as_json {
            println!(
                "{}",
                serde_json::json!({"reachable": false, "error": message})
            );
        } else {
            eprintln!("lark-ticketd status: {message}");
        }
        2
    };
    let http = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot build an HTTP client: {e}")),
    };
    let mut request = http.get(&url);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return fail(format!("{url} is unreachable: {}", e.without_url())),
    };
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        let hint = if status.as_u16() == 401 && api_key.is_none() {
            " (no API key: set the variable --api-key-env names)"
        } else {
            ""
        };
        return fail(format!("{url} answered HTTP {status}{hint}: {body}"));
    }
    let parsed: AppsResponse = match serde_json::from_str(&body) {
        Ok(p) => p,
        Err(e) => return fail(format!("{url} answered something unexpected: {e}")),
    };
    // A service without consumers (or an older one) has none to list.
    let mut consumers_request = http.get(format!("{base}/v1/consumers"));
    if let Some(key) = api_key {
        consumers_request = consumers_request.bearer_auth(key);
    }
    let consumers: Vec<ConsumerLine> = match consumers_request.send().await {
        Ok(r) if r.status().is_success() => r
            .json::<ConsumersResponse>()
            .await
            .map(|c| c.consumers)
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if as_json {
        let json = serde_json::json!({
            "now": parsed.now,
            "apps": parsed.apps,
            "consumers": consumers,
            "store": parsed.store,
        });
        println!("{}", serde_json::to_string_pretty(&json).unwrap_or(body));
    } else {
        use std::io::IsTerminal;
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        print!("{}", render_table(&parsed.apps, colour));
        print!("{}", render_consumers(&consumers, max_pending_age_s));
        if let Some(store) = &parsed.store {
            print!("{}", render_store(store));
        }
    }
    let lagging = consumers
        .iter()
        .any(|c| consumer_needs_attention(c, max_pending_age_s));
    exit_code(&parsed.apps).max(u8::from(lagging))
}

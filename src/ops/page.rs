//! The status page (`GET /` where `/metrics` is served: the ops listener when there is one):
//! what `lark-ticketd status` and the status API say, for a person with a browser or a phone.
//!
//! Server-rendered HTML with inline CSS and no script (a `<meta refresh>` reloads it), so it works
//! with JavaScript off and under a `default-src 'none'` Content-Security-Policy. It shows each
//! app's ticket state and age with a 24-hour timeline of ticket arrivals (did Feishu push every
//! hour?), the app token's state, whether its token fetches from Feishu are failing (and the last
//! failure's cause), tenants by state, each consumer's backlog, dead letters and
//! last error, and the store. It shows no secret, ticket, token or tenant key — the same rule as
//! the metrics it sits beside — and every text that is not ours is HTML-escaped.

use std::fmt::Write;

use crate::clock::utc;
use crate::error::Error;
use crate::model::TicketState;
use crate::ops::consumers::{self, ConsumerStatus};
use crate::ops::status::{self, human_duration, AppStatus};
use crate::store::Durability;
use crate::tickets::ResendOutcome;
use crate::AppState;

/// How often the page reloads itself.
pub const REFRESH_SECONDS: u64 = 30;
/// Hours on the arrivals timeline.
pub const TIMELINE_HOURS: u64 = 24;

const HOUR_MS: u64 = 3_600_000;

/// One hour of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hour {
    /// At least this many tickets arrived.
    Pushed(usize),
    /// None arrived (and this process was watching).
    Missed,
    /// Before this process started: not known here.
    Unknown,
}

/// The last [`TIMELINE_HOURS`] hours before `now_ms`, oldest first.
pub fn timeline(arrivals_ms: &[u64], known_since_ms: u64, now_ms: u64) -> Vec<Hour> {
    (0..TIMELINE_HOURS)
        .map(|i| {
            let end = now_ms.saturating_sub((TIMELINE_HOURS - 1 - i) * HOUR_MS);
            let start = end.saturating_sub(HOUR_MS);
            let n = arrivals_ms
                .iter()
                .filter(|&&t| t > start && t <= end)
                .count();
            if n > 0 {
                Hour::Pushed(n)
            } else if end <= known_since_ms {
                Hour::Unknown
            } else {
                Hour::Missed
            }
        })
        .collect()
}

/// Escape text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Everything the page shows, gathered from the service.
pub struct Page {
    pub now_ms: u64,
    pub apps: Vec<(AppStatus, Vec<Hour>)>,
    pub consumers: Vec<ConsumerStatus>,
    pub store: Durability,
}

/// Gather the page's figures.
pub async fn gather(state: &AppState) -> Result<Page, Error> {
    let now_ms = state.clock().now_ms();
    let tickets = state.tickets();
    let mut apps = Vec::new();
    for app in &state.config().apps {
        let status = status::app_status(state, &app.app_id).await?;
        let mut arrivals = tickets.arrivals(&app.app_id);
        // The stored ticket's arrival, also when it came before this process started.
        if let Some(received_s) = status.ticket.received_at {
            let received_ms = received_s * 1000;
            if !arrivals.iter().any(|&t| t / 1000 == received_s) {
                arrivals.push(received_ms);
            }
        }
        let hours = timeline(&arrivals, tickets.arrivals_known_since(), now_ms);
        apps.push((status, hours));
    }
    let consumers = consumers::list(state).await?;
    let store = state.store().durability();
    Ok(Page {
        now_ms,
        apps,
        consumers,
        store,
    })
}

const STYLE: &str = "\
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:60rem;padding:1rem;color:#1b1f24;background:#fff}\
h1{font-size:1.4rem;margin:.2rem 0}h2{font-size:1.1rem;margin:1.5rem 0 .5rem;border-bottom:1px solid #d0d7de}\
h3{font-size:1rem;margin:0 0 .4rem;word-break:break-all}.meta{color:#57606a;font-size:.85rem;margin:0}\
article{border:1px solid #d0d7de;border-left-width:6px;border-radius:6px;padding:.6rem .8rem;margin:.6rem 0}\
article.fresh,article.not-needed{border-left-color:#1a7f37}article.stale{border-left-color:#bf8700}article.missing{border-left-color:#cf222e}\
.badge{font-size:.8rem;padding:.05rem .45rem;border-radius:1rem;color:#fff;vertical-align:middle}\
.badge.fresh,.badge.not-needed{background:#1a7f37}.badge.stale{background:#9a6700}.badge.missing,.badge.dead{background:#cf222e}.badge.ok{background:#1a7f37}.badge.backing-off{background:#9a6700}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.15rem .8rem;margin:.3rem 0}dt{color:#57606a}dd{margin:0}\
.timeline{display:flex;gap:2px;margin:.4rem 0 .1rem}.timeline span{flex:1;height:1.1rem;border-radius:2px}\
.pushed{background:#2da44e}.missed{background:#cf222e}.unknown{background:#d0d7de}\
.axis{display:flex;justify-content:space-between;color:#57606a;font-size:.75rem}\
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{text-align:left;padding:.3rem .4rem;border-bottom:1px solid #eaeef2;vertical-align:top}\
td.num{text-align:right}.error{color:#cf222e;word-break:break-word}\
@media (max-width:40rem){dl{grid-template-columns:1fr}dt{margin-top:.3rem}}";

fn state_word(state: TicketState) -> &'static str {
    match state {
        TicketState::Fresh => "fresh",
        TicketState::Stale => "stale",
        TicketState::Missing => "missing",
        TicketState::NotNeeded => "not-needed",
    }
}

/// The page's HTML.
pub fn render(page: &Page) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let now_s = page.now_ms / 1000;
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>lark-ticketd status</title><style>{STYLE}</style></head><body>\
         <header><h1>lark-ticketd</h1><p class=\"meta\">version {} · {} UTC · refreshes every {REFRESH_SECONDS} s</p></header>",
        env!("CARGO_PKG_VERSION"),
        utc(now_s)
    );
    h.push_str("<section id=\"apps\"><h2>Apps</h2>");
    for (app, hours) in &page.apps {
        render_app(&mut h, app, hours, now_s);
    }
    h.push_str("</section>");
    render_consumers(&mut h, &page.consumers);
    render_store(&mut h, &page.store);
    h.push_str("</body></html>");
    h
}

fn render_store(h: &mut String, store: &Durability) {
    let means = match store.on_disk {
        Some(true) => "on disk",
        Some(false) => "in memory only: a crash can lose it",
        None => "unknown (the server does not say)",
    };
    let _ = write!(
        h,
        "<section id=\"store\"><h2>Store</h2><dl><dt>Kind</dt><dd>{}</dd>\
         <dt>A 200 to Feishu means</dt><dd data-on-disk=\"{}\">{means}</dd>",
        escape(&store.kind),
        store
            .on_disk
            .map_or("unknown", |d| if d { "true" } else { "false" })
    );
    if let Some(at) = store.data_lost_at {
        let _ = write!(
            h,
            "<dt>Data lost</dt><dd class=\"error\">{} UTC: the store came back empty</dd>",
            utc(at)
        );
    }
    h.push_str("</dl>");
    for warning in &store.warnings {
        let _ = write!(h, "<p class=\"error\">{}</p>", escape(warning));
    }
    h.push_str("</section>");
}

fn render_app(h: &mut String, app: &AppStatus, hours: &[Hour], now_s: u64) {
    let word = state_word(app.ticket.state);
    let id = escape(&app.app_id);
    let _ = write!(
        h,
        "<article class=\"app {word}\" data-app-id=\"{id}\" data-ticket-state=\"{word}\">\
         <h3>{id} <span class=\"badge {word}\">ticket {label}</span></h3><dl>",
        label = word.replace('-', " ")
    );
    let ticket = match (app.ticket.age_seconds, app.ticket.received_at) {
        (Some(age), Some(at)) => format!(
            "{} old (arrived {} UTC{})",
            human_duration(age),
            utc(at),
            app.ticket
                .arrived_via
                .map(|via| format!(", by {}", format!("{via:?}").to_lowercase()))
                .unwrap_or_default()
        ),
        _ if app.ticket.state == TicketState::NotNeeded => {
            "not needed (a custom app: tokens from its app secret alone)".to_string()
        }
        _ => "none yet".to_string(),
    };
    let _ = write!(h, "<dt>Ticket</dt><dd>{}</dd>", escape(&ticket));
    let token = match app.app_token.expire {
        Some(left) if app.app_token.cached => format!("cached, {} left", human_duration(left)),
        _ => "not cached".to_string(),
    };
    let _ = write!(h, "<dt>App token</dt><dd>{}</dd>", escape(&token));
    let fetches = &app.tokens;
    match &fetches.last_failure {
        Some(f) if app.tokens_failing() => {
            let _ = write!(
                h,
                "<dt>Token fetches</dt><dd class=\"error\" data-token-failures=\"{n}\">failing: {n} in a row, \
                 last at {} UTC ({} token): {}</dd>",
                utc(f.at),
                escape(&f.token),
                escape(&f.message),
                n = fetches.consecutive_failures,
            );
        }
        _ => {
            let _ = write!(
                h,
                "<dt>Token fetches</dt><dd data-token-failures=\"0\">{}</dd>",
                fetches
                    .last_success_at
                    .map_or("none yet".to_string(), |at| format!(
                        "ok (last at {} UTC)",
                        utc(at)
                    ))
            );
        }
    }
    let t = &app.tenants;
    let _ = write!(
        h,
        "<dt>Tenants</dt><dd>{} ({} active, {} stopped, {} uninstalled; {} tokens cached)</dd>",
        t.total, t.active, t.stopped, t.uninstalled, t.tokens_cached
    );
    if let Some(resend) = &app.last_resend {
        let outcome = match &resend.outcome {
            ResendOutcome::Pending => "pending".to_string(),
            ResendOutcome::Accepted => "accepted".to_string(),
            ResendOutcome::Failed { code, message } => match code {
                Some(code) => format!("failed ({code}: {message})"),
                None => format!("failed ({message})"),
            },
            ResendOutcome::OtherReplica => "asked by another replica".to_string(),
        };
        let _ = write!(
            h,
            "<dt>Last resend</dt><dd>{} UTC: {}{}</dd>",
            utc(resend.requested_at),
            escape(&outcome),
            if resend.awaiting_push {
                ", awaiting the push"
            } else {
                ""
            }
        );
    }
    h.push_str("</dl>");
    if app.ticket.state == TicketState::NotNeeded {
        // A custom app gets no ticket: a timeline of arrivals would only show missed hours.
        h.push_str("</article>");
        return;
    }
    let pushed = hours
        .iter()
        .filter(|x| matches!(x, Hour::Pushed(_)))
        .count();
    let missed = hours.iter().filter(|x| **x == Hour::Missed).count();
    let _ = write!(
        h,
        "<div class=\"timeline\" role=\"img\" data-pushed-hours=\"{pushed}\" data-missed-hours=\"{missed}\" \
         aria-label=\"Ticket arrivals in the last {TIMELINE_HOURS} hours: {pushed} hours with a push, {missed} without\">"
    );
    for (i, hour) in hours.iter().enumerate() {
        let start_s = now_s.saturating_sub((TIMELINE_HOURS - i as u64) * 3600);
        let (class, what) = match hour {
            Hour::Pushed(n) => ("pushed", format!("{n} ticket(s)")),
            Hour::Missed => ("missed", "no ticket".to_string()),
            Hour::Unknown => (
                "unknown",
                "not watched (before this process started)".to_string(),
            ),
        };
        let _ = write!(
            h,
            "<span class=\"{class}\" title=\"from {} UTC: {what}\"></span>",
            utc(start_s)
        );
    }
    h.push_str("</div><div class=\"axis\"><span>24 h ago</span><span>now</span></div></article>");
}

fn render_consumers(h: &mut String, consumers: &[ConsumerStatus]) {
    h.push_str("<section id=\"consumers\"><h2>Event hand-off</h2>");
    if consumers.is_empty() {
        h.push_str("<p>No consumers configured.</p></section>");
        return;
    }
    h.push_str(
        "<table><thead><tr><th>Consumer</th><th>State</th><th>Pending</th><th>Oldest pending</th>\
         <th>Dead letters</th><th>Delivered</th><th>Last error</th></tr></thead><tbody>",
    );
    for c in consumers {
        let (class, word) = if c.backing_off {
            ("backing-off", "backing off")
        } else if c.dead > 0 {
            ("dead", "dead letters")
        } else {
            ("ok", "delivering")
        };
        let _ = write!(
            h,
            "<tr data-consumer=\"{name}\"><td>{name}</td><td><span class=\"badge {class}\">{word}</span></td>\
             <td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"error\">{}</td></tr>",
            c.pending,
            c.oldest_pending_age_seconds.map(human_duration).unwrap_or_default(),
            c.dead,
            c.delivered,
            escape(c.last_error.as_deref().unwrap_or("")),
            name = escape(&c.name),
        );
    }
    h.push_str("</tbody></table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_marks_hours_with_and_without_a_push() {
        let now = 100 * HOUR_MS;
        // Watching for the last 3 hours; pushes 10 minutes and 2.5 hours ago.
        let hours = timeline(
            &[now - HOUR_MS / 6, now - 5 * HOUR_MS / 2],
            now - 3 * HOUR_MS,
            now,
        );
        assert_eq!(hours.len(), 24);
        assert_eq!(hours[23], Hour::Pushed(1));
        assert_eq!(hours[22], Hour::Missed);
        assert_eq!(hours[21], Hour::Pushed(1));
        assert_eq!(hours[20], Hour::Unknown);
        assert_eq!(hours[0], Hour::Unknown);
    }

    #[test]
    fn text_that_is_not_ours_is_escaped() {
        assert_eq!(
            escape("<img src=x onerror=\"a\">&'"),
            "&lt;img src=x onerror=&quot;a&quot;&gt;&amp;&#39;"
        );
    }
}

//! The consumer API's answers (DESIGN.md → *Event hand-off*): each consumer's backlog and dead
//! letters, and redelivery. Never a consumer's secret, never an event's body.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};
use crate::store::{DeadLetter, Selector};
use crate::AppState;

/// Dead letters listed at most, whatever `?limit=` asks.
pub const MAX_DEAD_LETTERS: usize = 1000;
/// Dead letters listed without `?limit=`.
pub const DEFAULT_DEAD_LETTERS: usize = 100;

/// One consumer in `GET /v1/consumers`.
#[derive(Debug, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub url: String,
    pub pending: u64,
    pub dead: u64,
    pub delivered: u64,
    pub oldest_pending_age_seconds: Option<u64>,
    pub last_delivery_at: Option<u64>,
    pub last_error: Option<String>,
    /// Failed attempts in a row.
    pub failing_attempts: u32,
    /// Counted as down: one probe at a time until a delivery succeeds.
    pub backing_off: bool,
}

/// Every configured consumer's figures, in config order.
pub async fn list(state: &AppState) -> Result<Vec<ConsumerStatus>, Error> {
    let forwarder = state.forwarder();
    let now_ms = state.clock().now_ms();
    let mut out = Vec::new();
    for name in &forwarder.consumer_names() {
        let stats = state.store().consumer_stats(name).await?;
        let (failing_attempts, backing_off) = forwarder.failing(name).unwrap_or_default();
        out.push(ConsumerStatus {
            name: name.to_string(),
            url: forwarder.consumer_url(name).unwrap_or_default().to_string(),
            pending: stats.pending,
            dead: stats.dead,
            delivered: stats.delivered,
            oldest_pending_age_seconds: stats
                .oldest_pending_received_at_ms
                .map(|at| now_ms.saturating_sub(at) / 1000),
            last_delivery_at: stats.last_delivery_at_ms.map(|ms| ms / 1000),
            last_error: stats.last_error,
            failing_attempts,
            backing_off,
        });
    }
    Ok(out)
}

/// One dead letter in `GET /v1/consumers/{name}/dead` (times in unix seconds).
#[derive(Debug, Serialize)]
pub struct DeadLetterStatus {
    pub event_id: String,
    pub app_id: String,
    pub event_type: String,
    pub attempts: u32,
    pub last_error: String,
    pub received_at: u64,
    pub dead_at: u64,
}

impl From<DeadLetter> for DeadLetterStatus {
    fn from(d: DeadLetter) -> Self {
        DeadLetterStatus {
            event_id: d.event_id,
            app_id: d.app_id,
            event_type: d.event_type,
            attempts: d.attempts,
            last_error: d.last_error,
            received_at: d.received_at_ms / 1000,
            dead_at: d.dead_at_ms / 1000,
        }
    }
}

/// The consumer API is for keys that may use every app (`apps = ["*"]`): a consumer's queue holds
/// the events of every app its filter names, and its figures, dead letters and redeliveries are
/// not split by app. A key limited to some apps gets `403` here rather than another app's events.
pub fn require_every_app(client: &crate::config::ClientConfig) -> Result<(), Error> {
    if client.apps.iter().any(|a| a == "*") {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Forbidden,
        "the consumer API needs a key with apps = [\"*\"]: consumers carry every app's events",
    ))
}

fn known(state: &AppState, name: &str) -> Result<(), Error> {
    match state.forwarder().consumer_url(name) {
        Some(_) => Ok(()),
        None => Err(ErrorKind::UnknownConsumer.into()),
    }
}

/// A consumer's dead letters, newest first; `query` may hold `limit=N`.
pub async fn dead_letters(
    state: &AppState,
    name: &str,
    query: Option<&str>,
) -> Result<Vec<DeadLetterStatus>, Error> {
    known(state, name)?;
    let limit = match query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("limit="))
    {
        None => DEFAULT_DEAD_LETTERS,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| Error::new(ErrorKind::BadRequest, "limit must be a positive number"))?
            .min(MAX_DEAD_LETTERS),
    };
    let letters = state.store().dead_letters(name, limit).await?;
    Ok(letters.into_iter().map(DeadLetterStatus::from).collect())
}

/// The body of `POST /v1/consumers/{name}/redeliver`: exactly one of the three selections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedeliverRequest {
    #[serde(default)]
    dead: bool,
    since: Option<u64>,
    until: Option<u64>,
    event_ids: Option<Vec<String>>,
}

const REDELIVER_USAGE: &str =
    "send {\"dead\": true}, {\"since\": <unix s>, \"until\": <unix s>} or {\"event_ids\": [...]}";

/// Queue the selected retained events of a consumer again; returns how many.
pub async fn redeliver(state: &AppState, name: &str, body: &[u8]) -> Result<usize, Error> {
    known(state, name)?;
    let request: RedeliverRequest = serde_json::from_slice(body)
        .map_err(|_| Error::new(ErrorKind::BadRequest, REDELIVER_USAGE))?;
    let selector = match request {
        RedeliverRequest {
            dead: true,
            since: None,
            until: None,
            event_ids: None,
        } => Selector::Dead,
        RedeliverRequest {
            dead: false,
            since: Some(since),
            until: Some(until),
            event_ids: None,
        } if since <= until => Selector::Window {
            since_ms: since.saturating_mul(1000),
            until_ms: until.saturating_mul(1000).saturating_add(999),
        },
        RedeliverRequest {
            dead: false,
            since: None,
            until: None,
            event_ids: Some(ids),
        } if !ids.is_empty() && ids.len() <= MAX_DEAD_LETTERS => Selector::Ids(ids),
        _ => return Err(Error::new(ErrorKind::BadRequest, REDELIVER_USAGE)),
    };
    let now_ms = state.clock().now_ms();
    let queued = state.store().redeliver(name, selector, now_ms).await?;
    state.forwarder().wake(name);
    tracing::info!(consumer = name, queued, "redelivery requested");
    Ok(queued)
}

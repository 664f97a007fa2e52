//! The hand-off queue on Redis (the Redis backend's half of `store::queue`, whose semantics it
//! keeps: atomic dedupe with the enqueue, leased claims whose lease end is the due time, outcomes
//! fenced by the lease, redeliver selectors, purge after retention, counters without scans).
//!
//! **Layout**, per app `A` (hash tag) and consumer `C`, under `P:{A}`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{A}:dedupe` | zset | event_id, scored by the end of its dedupe window |
//! | `P:{A}:event:{id}` | hash | `received`, `refs` (deliveries left), `type`, `tenant`, `body` (bytes as sent) |
//! | `P:{A}:delivery:{C}:{id}` | hash | `state` (0 pending, 1 delivered, 2 dead), `attempts`, `due`, `received`, `finished`, `err` |
//! | `P:{A}:due:{C}` | zset | pending event ids, scored by next attempt or lease end: a claim is one range |
//! | `P:{A}:pending:{C}` | zset | pending event ids, scored by received time: the oldest pending |
//! | `P:{A}:dead:{C}` | zset | dead letters, scored by when they died: newest first, redeliver "dead" |
//! | `P:{A}:received:{C}` | zset | every retained delivery, scored by received time: redeliver by window |
//! | `P:{A}:finished` | zset | `C:id` of delivered and dead deliveries, scored by when: the purge |
//! | `P:{A}:counters:{C}` | hash | `pending`, `dead`, `delivered`, `last_delivery`, `last_error`, `last_error_at` |
//!
//! Every write is one script over one app's keys (one cluster slot). A consumer's figures and
//! claims span apps: [`RedisStore::claim_due`] reads each registered app's due entries (one
//! round trip, in parallel), takes the oldest `limit` overall and claims exactly those (each
//! still due at the claim: another replica may have taken it in between, then it is skipped).
//!
//! **Why sorted sets, not Redis Streams consumer groups.** Our semantics are time-scored: a retry
//! is due at a given time, a lease ends at a given time, the next attempt's time *is* the lease
//! — a sorted set scored by due time gives all three with one `ZRANGEBYSCORE`, and re-scoring to
//! the lease end is the claim. The outcome's fence (the due time still equal to the claim's lease
//! end) is a field compare in the same script. Streams would need a second structure for delayed
//! retries anyway, `XAUTOCLAIM` idle times instead of explicit leases, and the consumer group is
//! state that a Redis restarted without persistence loses while the workers keep asking for it
//! (the `NOGROUP` failure Svix users hit): here there is no group to lose — an empty Redis is
//! simply an empty queue, which the epoch check reports.

use std::collections::HashMap;

use ::redis::Value;
use bytes::Bytes;
use futures_util::future::try_join_all;

use super::queue::{
    short_error, ConsumerStats, DeadLetter, Delivery, Enqueue, NewEvent, Outcome, Selector,
};
use super::redis::{RedisStore, CHUNK, SCRIPTS};
use super::StoreError;

/// A script's array answer as byte strings.
fn fields(value: Value) -> Result<Vec<Vec<u8>>, StoreError> {
    ::redis::from_owned_redis_value(value)
        .map_err(|e| StoreError::new(format!("redis: an unexpected answer: {e}")))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn number(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl RedisStore {
    pub async fn enqueue_event(
        &self,
        ev: NewEvent,
        mut consumers: Vec<String>,
    ) -> Result<Enqueue, StoreError> {
        consumers.sort();
        consumers.dedup();
        if consumers.is_empty() {
            return Ok(Enqueue::Queued);
        }
        // Registered first: an app is never holding deliveries that no claim looks at.
        self.register_app(&ev.app_id).await?;
        let mut inv = SCRIPTS.enqueue.prepare_invoke();
        inv.key(self.keys().app(&ev.app_id))
            .arg(&ev.event_id)
            .arg(ev.received_at_ms.to_string())
            .arg(ev.dedupe_until_ms.to_string())
            .arg(&ev.event_type)
            .arg(if ev.tenant_key.is_some() { "1" } else { "0" })
            .arg(ev.tenant_key.as_deref().unwrap_or_default())
            .arg(ev.body.as_ref());
        for c in &consumers {
            inv.arg(c);
        }
        let queued: i64 = self
            .run(
                "enqueue",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        Ok(if queued == 1 {
            Enqueue::Queued
        } else {
            Enqueue::Duplicate
        })
    }

    pub async fn claim_due(
        &self,
        consumer: &str,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let apps = self.apps().await?;
        let lease_until_ms = now_ms.saturating_add(lease_ms);
        if apps.len() <= 1 {
            let Some(app) = apps.first() else {
                return Ok(Vec::new());
            };
            return self
                .claim_in(app, consumer, now_ms, lease_until_ms, limit, &[])
                .await;
        }
        // Several apps: the oldest due entries overall, then claim exactly those.
        let peeks = apps.iter().map(|app| {
            let peek = ::redis::cmd("ZRANGEBYSCORE")
                .arg(format!("{}:due:{consumer}", self.keys().app(app)))
                .arg("-inf")
                .arg(now_ms)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .clone();
            async move { self.query::<Vec<(String, f64)>>("claim", &peek).await }
        });
        let peeked = try_join_all(peeks).await?;
        let mut due: Vec<(f64, String, &str)> = peeked
            .into_iter()
            .zip(&apps)
            .flat_map(|(entries, app)| {
                entries
                    .into_iter()
                    .map(move |(id, score)| (score, id, app.as_str()))
            })
            .collect();
        due.sort_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then_with(|| a.1.cmp(&b.1))
                .then_with(|| a.2.cmp(b.2))
        });
        due.truncate(limit);
        let mut by_app: HashMap<&str, Vec<String>> = HashMap::new();
        for (_, id, app) in &due {
            by_app.entry(app).or_default().push(id.clone());
        }
        let claims = by_app
            .iter()
            .map(|(app, ids)| self.claim_in(app, consumer, now_ms, lease_until_ms, ids.len(), ids));
        let mut claimed: HashMap<(String, String), Delivery> = try_join_all(claims)
            .await?
            .into_iter()
            .flatten()
            .map(|d| ((d.app_id.clone(), d.event_id.clone()), d))
            .collect();
        Ok(due
            .into_iter()
            .filter_map(|(_, id, app)| claimed.remove(&(app.to_string(), id)))
            .collect())
    }

    /// Claim in one app: the oldest due (`ids` empty) or exactly `ids` where still due.
    async fn claim_in(
        &self,
        app: &str,
        consumer: &str,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
        ids: &[String],
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut inv = SCRIPTS.claim.prepare_invoke();
        inv.key(self.keys().app(app))
            .arg(consumer)
            .arg(now_ms.to_string())
            .arg(lease_until_ms.to_string())
            .arg(limit);
        for id in ids {
            inv.arg(id);
        }
        let answer: Value = self
            .run(
                "claim",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        let rows = fields(answer)?;
        Ok(rows
            .chunks_exact(7)
            .map(|f| Delivery {
                consumer: consumer.to_string(),
                app_id: app.to_string(),
                event_id: text(&f[0]),
                attempt: number(&f[1]) as u32,
                received_at_ms: number(&f[2]),
                event_type: text(&f[3]),
                tenant_key: (f[4] == b"1").then(|| text(&f[5])),
                body: Bytes::copy_from_slice(&f[6]),
                lease_until_ms,
            })
            .collect())
    }

    pub(super) async fn outcome(
        &self,
        claimed: &Delivery,
        outcome: Outcome,
    ) -> Result<bool, StoreError> {
        let (kind, time, error) = match outcome {
            Outcome::Delivered { now_ms } => ("delivered", now_ms, String::new()),
            Outcome::Retry { next_ms, error } => ("retry", next_ms, short_error(&error)),
            Outcome::Dead { now_ms, error } => ("dead", now_ms, short_error(&error)),
        };
        let mut inv = SCRIPTS.outcome.prepare_invoke();
        inv.key(self.keys().app(&claimed.app_id))
            .arg(&claimed.consumer)
            .arg(&claimed.event_id)
            .arg(claimed.lease_until_ms.to_string())
            .arg(kind)
            .arg(time.to_string())
            .arg(error);
        let applied: i64 = self
            .run(
                "outcome",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        Ok(applied == 1)
    }

    pub async fn consumer_stats(&self, consumer: &str) -> Result<ConsumerStats, StoreError> {
        let apps = self.apps().await?;
        let per_app = apps.iter().map(|app| {
            let mut inv = SCRIPTS.stats.prepare_invoke();
            inv.key(self.keys().app(app)).arg(consumer);
            async move { self.query_script::<Value>("stats", &inv).await }
        });
        let mut stats = ConsumerStats::default();
        let mut last_error_at = 0;
        for answer in try_join_all(per_app).await? {
            let f = fields(answer)?;
            if f.len() != 7 {
                return Err(StoreError::new("redis: an unexpected stats answer"));
            }
            stats.pending += number(&f[0]);
            stats.dead += number(&f[1]);
            stats.delivered += number(&f[2]);
            let last_delivery = number(&f[3]);
            if last_delivery > 0 {
                stats.last_delivery_at_ms = stats.last_delivery_at_ms.max(Some(last_delivery));
            }
            let error_at = number(&f[5]);
            if !f[4].is_empty() && error_at >= last_error_at {
                last_error_at = error_at;
                stats.last_error = Some(text(&f[4]));
            }
            if !f[6].is_empty() {
                let oldest = number(&f[6]);
                stats.oldest_pending_received_at_ms = Some(
                    stats
                        .oldest_pending_received_at_ms
                        .map_or(oldest, |o| o.min(oldest)),
                );
            }
        }
        Ok(stats)
    }

    pub async fn dead_letters(
        &self,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let apps = self.apps().await?;
        let per_app = apps.iter().map(|app| {
            let mut inv = SCRIPTS.dead_letters.prepare_invoke();
            inv.key(self.keys().app(app)).arg(consumer).arg(limit);
            async move { self.query_script::<Value>("dead letters", &inv).await }
        });
        let mut dead = Vec::new();
        for (answer, app) in try_join_all(per_app).await?.into_iter().zip(&apps) {
            for f in fields(answer)?.chunks_exact(6) {
                dead.push(DeadLetter {
                    event_id: text(&f[0]),
                    app_id: app.clone(),
                    event_type: text(&f[1]),
                    attempts: number(&f[2]) as u32,
                    last_error: text(&f[3]),
                    received_at_ms: number(&f[4]),
                    dead_at_ms: number(&f[5]),
                });
            }
        }
        // Newest first, ties in the other backends' order.
        dead.sort_by(|a, b| {
            (b.dead_at_ms, &b.event_id, &b.app_id).cmp(&(a.dead_at_ms, &a.event_id, &a.app_id))
        });
        dead.truncate(limit);
        Ok(dead)
    }

    pub async fn redeliver(
        &self,
        consumer: &str,
        selector: Selector,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut total = 0;
        for app in self.apps().await? {
            match &selector {
                Selector::Dead => loop {
                    let (n, scanned) = self
                        .redeliver_in(&app, consumer, now_ms, "dead", &[CHUNK.to_string()])
                        .await?;
                    total += n;
                    if scanned < CHUNK {
                        break;
                    }
                },
                Selector::Window { since_ms, until_ms } => {
                    let mut offset = 0;
                    loop {
                        let args = [
                            since_ms.to_string(),
                            until_ms.to_string(),
                            offset.to_string(),
                            CHUNK.to_string(),
                        ];
                        let (n, scanned) = self
                            .redeliver_in(&app, consumer, now_ms, "window", &args)
                            .await?;
                        total += n;
                        offset += scanned;
                        if scanned < CHUNK {
                            break;
                        }
                    }
                }
                Selector::Ids(ids) => {
                    for chunk in ids.chunks(CHUNK) {
                        let (n, _) = self
                            .redeliver_in(&app, consumer, now_ms, "ids", chunk)
                            .await?;
                        total += n;
                    }
                }
            }
        }
        Ok(total)
    }

    async fn redeliver_in(
        &self,
        app: &str,
        consumer: &str,
        now_ms: u64,
        mode: &str,
        args: &[String],
    ) -> Result<(usize, usize), StoreError> {
        let mut inv = SCRIPTS.redeliver.prepare_invoke();
        inv.key(self.keys().app(app))
            .arg(consumer)
            .arg(now_ms.to_string())
            .arg(mode);
        for a in args {
            inv.arg(a);
        }
        self.run("redeliver", |mut c| async move {
            inv.invoke_async(&mut c).await
        })
        .await
    }

    pub async fn purge_forwarding(
        &self,
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<usize, StoreError> {
        let cutoff = now_ms
            .checked_sub(retention_ms)
            .map(|c| c.to_string())
            .unwrap_or_default();
        let mut total = 0;
        for app in self.apps().await? {
            loop {
                let mut inv = SCRIPTS.purge.prepare_invoke();
                inv.key(self.keys().app(&app))
                    .arg(now_ms.to_string())
                    .arg(&cutoff)
                    .arg(CHUNK);
                let (marks, gone): (usize, usize) = self
                    .run(
                        "purge",
                        |mut c| async move { inv.invoke_async(&mut c).await },
                    )
                    .await?;
                total += marks + gone;
                if marks < CHUNK && gone < CHUNK {
                    break;
                }
            }
        }
        Ok(total)
    }
}

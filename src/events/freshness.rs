//! The replay window: how old (and how far ahead of our clock) an authentic request may be.
//!
//! A signed request stays verifiable forever, so without a window anyone who captured one (a log,
//! a proxy, a misdirected request URL) can replay it: an old `order_paid` rolls tenant state
//! back, an old ticket push inflates the push counters. Two times bound a request:
//!
//! * the **signature timestamp** (`X-Lark-Request-Timestamp`), which the signature covers:
//!   refused as `stale_request` when older than `events.max_age` or further ahead than
//!   `events.max_skew`. Its format is not documented (protocol.md §2.1, §10.1); captures show
//!   decimal unix seconds. We accept decimal seconds with an optional fraction, and read a value
//!   of 10¹² or more as milliseconds (second-resolution values that large are 30,000 years away);
//!   anything else is refused, because a window that cannot be read cannot bound a replay;
//! * the **event's own time** (1.0 `ts`, 2.0 `header.create_time`), the only bound for apps
//!   without an Encrypt Key (plaintext, unsigned): refused when older than `events.max_age`.
//!   An event time ahead of `now + max_skew` is **capped** there for ordering, never refused:
//!   a forged or mis-stamped far-future ticket can then shadow real pushes for at most
//!   `max_skew`, and a clock of ours that runs behind Feishu's does not stop real pushes.
//!
//! `max_age` (default 8 h) is lenient on purpose: Feishu retries a failed push after 15 s,
//! 5 min, 1 h and 6 h (≈ 7.1 h, protocol.md §5), and whether a retry carries a fresh timestamp
//! is not documented (§10.7); a retry keeps its event time in any case. A window narrower than
//! the ladder would refuse Feishu's own last retries. `events.reject_stale = false` turns the
//! refusals off (replaying captured traffic on purpose); capping stays on.
//!
//! URL-verification challenges are not bounded: they are unsigned, carry no time, and answering
//! one again changes nothing.
//!
//! Pure: `now` is a parameter.

use crate::config::EventsConfig;

/// A signature timestamp at or above this is read as milliseconds (year 33658 in seconds).
const MILLIS_THRESHOLD: u64 = 1_000_000_000_000;

/// The signature timestamp of a verified request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedAt {
    /// No signature was checked (plaintext apps, challenges).
    Unsigned,
    /// Unix milliseconds.
    Millis(u64),
    /// The signature matched, but its timestamp is not decimal unix time.
    Unreadable,
}

impl SignedAt {
    /// Read an `X-Lark-Request-Timestamp` value (see the module docs).
    pub fn parse(timestamp: &str) -> SignedAt {
        let (whole, fraction) = timestamp.split_once('.').unwrap_or((timestamp, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || whole.len() > 19 || !digits(whole) || !digits(fraction) {
            return SignedAt::Unreadable;
        }
        match whole.parse::<u64>() {
            Ok(ms) if ms >= MILLIS_THRESHOLD => SignedAt::Millis(ms),
            Ok(s) => s
                .checked_mul(1000)
                .map_or(SignedAt::Unreadable, SignedAt::Millis),
            Err(_) => SignedAt::Unreadable,
        }
    }
}

/// Why a request is refused as `stale_request`. The names are metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// The signature timestamp is older than `max_age`.
    SignatureOld,
    /// The signature timestamp is more than `max_skew` ahead of our clock.
    SignatureAhead,
    /// The signature timestamp is not decimal unix time.
    SignatureUnreadable,
    /// The event's own time is older than `max_age`.
    EventOld,
}

impl Stale {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Stale::SignatureOld => "signature_old",
            Stale::SignatureAhead => "signature_ahead",
            Stale::SignatureUnreadable => "signature_unreadable",
            Stale::EventOld => "event_old",
        }
    }

    /// The message the caller sees.
    pub fn message(self) -> &'static str {
        match self {
            Stale::SignatureOld => {
                "X-Lark-Request-Timestamp is older than events.max_age: a replay, or a retry that came too late"
            }
            Stale::SignatureAhead => {
                "X-Lark-Request-Timestamp is further ahead of our clock than events.max_skew"
            }
            Stale::SignatureUnreadable => "X-Lark-Request-Timestamp is not decimal unix seconds",
            Stale::EventOld => "the event's time is older than events.max_age: a replay, or a retry that came too late",
        }
    }
}

/// The event time to order by, once the request is fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fresh {
    /// Microseconds since the epoch, capped at `now + max_skew`; `None` when the event has no
    /// usable time (order by arrival).
    pub order_time_us: Option<i64>,
    /// The event's time was ahead of `now + max_skew` and was capped.
    pub capped: bool,
}

/// Check a verified event's times against the window at `now_ms`.
pub fn check(
    window: &EventsConfig,
    signed_at: SignedAt,
    event_time_us: Option<i64>,
    now_ms: u64,
) -> Result<Fresh, Stale> {
    let max_age_ms = window.max_age.as_millis().min(u128::from(u64::MAX)) as u64;
    let max_skew_ms = window.max_skew.as_millis().min(u128::from(u64::MAX)) as u64;
    if window.reject_stale {
        match signed_at {
            SignedAt::Unsigned => {}
            SignedAt::Unreadable => return Err(Stale::SignatureUnreadable),
            SignedAt::Millis(at) if at < now_ms.saturating_sub(max_age_ms) => {
                return Err(Stale::SignatureOld)
            }
            SignedAt::Millis(at) if at > now_ms.saturating_add(max_skew_ms) => {
                return Err(Stale::SignatureAhead)
            }
            SignedAt::Millis(_) => {}
        }
        let oldest_us = i64::try_from(now_ms.saturating_sub(max_age_ms))
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        if event_time_us.is_some_and(|t| t < oldest_us) {
            return Err(Stale::EventOld);
        }
    }
    let latest_us = i64::try_from(now_ms.saturating_add(max_skew_ms))
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    Ok(match event_time_us {
        Some(t) if t > latest_us => Fresh {
            order_time_us: Some(latest_us),
            capped: true,
        },
        other => Fresh {
            order_time_us: other,
            capped: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NOW_MS: u64 = 1_800_000_000_000;
    const HOUR_MS: u64 = 3_600_000;

    fn window() -> EventsConfig {
        EventsConfig::default()
    }

    fn at(ms: u64) -> SignedAt {
        SignedAt::Millis(ms)
    }

    #[test]
    fn timestamps_parse_as_seconds_or_milliseconds() {
        assert_eq!(SignedAt::parse("1800000000"), at(NOW_MS));
        assert_eq!(SignedAt::parse("1800000000.75"), at(NOW_MS));
        assert_eq!(SignedAt::parse("1800000000000"), at(NOW_MS));
        assert_eq!(SignedAt::parse("1"), at(1000));
        for bad in [
            "",
            "timestamp",
            "-1",
            "+1800000000",
            " 1800000000",
            "1e9",
            ".5",
            "1.2.3",
            "0x6b49d200",
            "99999999999999999999",
        ] {
            assert_eq!(SignedAt::parse(bad), SignedAt::Unreadable, "{bad:?}");
        }
    }

    #[test]
    fn signature_timestamps_must_be_inside_the_window() {
        let w = window();
        let ok = |s| check(&w, s, None, NOW_MS).is_ok();
        assert!(ok(SignedAt::Unsigned));
        assert!(ok(at(NOW_MS)));
        // Feishu's whole retry ladder (15 s + 5 min + 1 h + 6 h) with a reused timestamp.
        assert!(ok(at(NOW_MS - (7 * HOUR_MS + 5 * 60_000 + 15_000))));
        assert!(ok(at(NOW_MS - 8 * HOUR_MS)));
        assert_eq!(
            check(&w, at(NOW_MS - 8 * HOUR_MS - 1), None, NOW_MS),
            Err(Stale::SignatureOld)
        );
        assert_eq!(check(&w, at(1000), None, NOW_MS), Err(Stale::SignatureOld));
        assert!(ok(at(NOW_MS + 5 * 60_000)));
        assert_eq!(
            check(&w, at(NOW_MS + 5 * 60_000 + 1), None, NOW_MS),
            Err(Stale::SignatureAhead)
        );
        assert_eq!(
            check(&w, SignedAt::Unreadable, None, NOW_MS),
            Err(Stale::SignatureUnreadable)
        );
    }

    #[test]
    fn old_event_times_are_refused_and_future_ones_capped() {
        let w = window();
        let now_us = NOW_MS as i64 * 1000;
        let hour_us = HOUR_MS as i64 * 1000;
        let fresh = check(&w, SignedAt::Unsigned, Some(now_us - hour_us), NOW_MS).unwrap();
        assert_eq!(fresh.order_time_us, Some(now_us - hour_us));
        assert!(!fresh.capped);
        assert_eq!(
            check(&w, SignedAt::Unsigned, Some(now_us - 9 * hour_us), NOW_MS),
            Err(Stale::EventOld)
        );
        assert_eq!(
            check(&w, SignedAt::Unsigned, Some(1), NOW_MS),
            Err(Stale::EventOld)
        );
        let far = check(&w, SignedAt::Unsigned, Some(i64::MAX), NOW_MS).unwrap();
        assert_eq!(far.order_time_us, Some(now_us + 5 * 60_000_000));
        assert!(far.capped);
        // No event time: order by arrival.
        assert_eq!(
            check(&w, SignedAt::Unsigned, None, NOW_MS).unwrap(),
            Fresh {
                order_time_us: None,
                capped: false
            }
        );
    }

    #[test]
    fn turned_off_accepts_any_age_but_still_caps() {
        let w = EventsConfig {
            reject_stale: false,
            ..window()
        };
        assert!(check(&w, at(1000), Some(1), NOW_MS).is_ok());
        assert!(check(&w, SignedAt::Unreadable, None, NOW_MS).is_ok());
        assert!(
            check(&w, SignedAt::Unsigned, Some(i64::MAX), NOW_MS)
                .unwrap()
                .capped
        );
    }

    #[test]
    fn extreme_windows_do_not_overflow() {
        let w = EventsConfig {
            max_age: Duration::MAX,
            max_skew: Duration::MAX,
            reject_stale: true,
        };
        assert!(check(&w, at(0), Some(0), NOW_MS).is_ok());
        assert!(check(&w, at(u64::MAX), Some(i64::MAX), NOW_MS).is_ok());
        assert!(check(&w, at(0), Some(0), 0).is_ok());
    }
}

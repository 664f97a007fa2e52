//! Which events a consumer receives: its `events` and `apps` lists, compiled once.
//!
//! An event type pattern is one of
//! - `"*"`: every event type;
//! - `"contact.user.*"`: a prefix — every event type that starts with `contact.user.` (not
//!   `contact.user` itself, and not `contact.username_v1`: the dot is part of the prefix);
//! - anything else, matched exactly: `"im.message.receive_v1"`, `"app_open"`.
//!
//! Event types are dot-separated names of ASCII letters, digits, `_` and `-` (Feishu's 1.0 types
//! like `leave_approvalV2` have upper-case letters); a `*` anywhere but as the last segment is an
//! error, so `"contact.user*"` or `"*.created_v3"` is refused at start-up rather than silently
//! matching nothing. An app entry is `"*"` or an app id; config validation checks that the app
//! id is configured. Pure: no IO, nothing here knows the config.

use std::fmt;

/// The longest pattern accepted (Feishu's event types are far shorter).
pub const MAX_PATTERN_LEN: usize = 256;

/// One compiled entry of a consumer's `events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventPattern {
    /// `"*"`.
    Any,
    /// `"a.b.*"`, kept as `"a.b."`.
    Prefix(String),
    /// Anything else.
    Exact(String),
}

/// Why an `events` entry is not a pattern. Names the entry, which is not secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError(String);

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PatternError {}

impl EventPattern {
    /// Parse one `events` entry.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        if pattern == "*" {
            return Ok(EventPattern::Any);
        }
        let err = |why: &str| {
            PatternError(format!(
                "{pattern:?} {why}: write an event type (\"im.message.receive_v1\"), a prefix ending in \".*\" (\"contact.user.*\") or \"*\""
            ))
        };
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(err("is too long"));
        }
        let (name, prefix) = match pattern.strip_suffix(".*") {
            Some(name) => (name, true),
            None => (pattern, false),
        };
        if name.contains('*') {
            return Err(err("may only have '*' as its last segment"));
        }
        if name.is_empty() || name.split('.').any(str::is_empty) {
            return Err(err("has an empty segment"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(err(
                "has a character other than letters, digits, '_', '-' and '.'",
            ));
        }
        Ok(if prefix {
            EventPattern::Prefix(format!("{name}."))
        } else {
            EventPattern::Exact(name.to_string())
        })
    }

    /// Does this pattern select `event_type`?
    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            EventPattern::Any => true,
            EventPattern::Prefix(prefix) => {
                event_type.len() > prefix.len() && event_type.starts_with(prefix.as_str())
            }
            EventPattern::Exact(name) => event_type == name,
        }
    }
}

/// A consumer's `events` and `apps`, compiled: [`ConsumerFilter::matches`] says whether an event
/// goes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerFilter {
    events: Vec<EventPattern>,
    /// `None`: every app (`"*"` was listed).
    apps: Option<Vec<String>>,
}

impl ConsumerFilter {
    /// Compile `events` and `apps` as configured. The error names the offending `events` entry;
    /// an empty list matches nothing and is refused (config validation reports it first).
    pub fn new(events: &[String], apps: &[String]) -> Result<Self, PatternError> {
        if events.is_empty() {
            return Err(PatternError(
                "is empty: list event types, or [\"*\"] for every event".to_string(),
            ));
        }
        if apps.is_empty() {
            return Err(PatternError(
                "apps is empty: list app ids, or [\"*\"] for every app".to_string(),
            ));
        }
        let events = events
            .iter()
            .map(|p| EventPattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let apps = (!apps.iter().any(|a| a == "*")).then(|| apps.to_vec());
        Ok(ConsumerFilter { events, apps })
    }

    /// The filter of a consumer with the defaults (`["*"]`, `["*"]`): everything.
    pub fn everything() -> Self {
        ConsumerFilter {
            events: vec![EventPattern::Any],
            apps: None,
        }
    }

    /// Does the event of `app_id` with type `event_type` go to this consumer?
    pub fn matches(&self, app_id: &str, event_type: &str) -> bool {
        let app_ok = match &self.apps {
            None => true,
            Some(apps) => apps.iter().any(|a| a == app_id),
        };
        app_ok && self.events.iter().any(|p| p.matches(event_type))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(events: &[&str], apps: &[&str]) -> ConsumerFilter {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        ConsumerFilter::new(&s(events), &s(apps)).expect("valid filter")
    }

    #[test]
    fn star_matches_every_event_of_every_app() {
        let f = filter(&["*"], &["*"]);
        for (app, ty) in [
            ("cli_a", "im.message.receive_v1"),
            ("cli_b", "app_open"),
            ("x", ""),
        ] {
            assert!(f.matches(app, ty), "{app} {ty}");
        }
        assert_eq!(f, ConsumerFilter::everything());
    }

    #[test]
    fn exact_pattern_matches_only_that_type() {
        let f = filter(&["im.message.receive_v1", "app_open"], &["*"]);
        assert!(f.matches("cli_a", "im.message.receive_v1"));
        assert!(f.matches("cli_a", "app_open"));
        assert!(!f.matches("cli_a", "im.message.receive_v2"));
        assert!(!f.matches("cli_a", "im.message.receive_v1.x"));
        assert!(!f.matches("cli_a", "im.message"));
        assert!(!f.matches("cli_a", "IM.MESSAGE.RECEIVE_V1"));
        assert!(!f.matches("cli_a", "app_open_v2"));
    }

    #[test]
    fn prefix_pattern_matches_below_the_dot_only() {
        let f = filter(&["contact.user.*"], &["*"]);
        assert!(f.matches("cli_a", "contact.user.created_v3"));
        assert!(f.matches("cli_a", "contact.user.deleted_v3"));
        assert!(f.matches("cli_a", "contact.user.x.y"));
        assert!(!f.matches("cli_a", "contact.user"));
        assert!(!f.matches("cli_a", "contact.user."));
        assert!(!f.matches("cli_a", "contact.username_v1"));
        assert!(!f.matches("cli_a", "contact.department.created_v3"));
        assert!(!f.matches("cli_a", "xcontact.user.created_v3"));
    }

    #[test]
    fn apps_restrict_to_the_listed_ids() {
        let f = filter(&["*"], &["cli_a", "cli_b"]);
        assert!(f.matches("cli_a", "app_open"));
        assert!(f.matches("cli_b", "app_open"));
        assert!(!f.matches("cli_c", "app_open"));
        assert!(!f.matches("cli_", "app_open"));
        // "*" among ids means every app.
        let f = filter(&["app_open"], &["cli_a", "*"]);
        assert!(f.matches("cli_z", "app_open"));
        assert!(!f.matches("cli_z", "app_close"));
    }

    #[test]
    fn events_and_apps_must_both_match() {
        let f = filter(&["im.*", "app_open"], &["cli_a"]);
        assert!(f.matches("cli_a", "im.message.receive_v1"));
        assert!(!f.matches("cli_b", "im.message.receive_v1"));
        assert!(!f.matches("cli_a", "contact.user.created_v3"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            ".",
            "*.*",
            "contact.user*",
            "*.created_v3",
            "contact.*.created",
            "im..message",
            ".im",
            "im.",
            "im.message.**",
            "im message",
            "im/message",
            "**",
            "é",
        ] {
            assert!(EventPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(EventPattern::parse(&"a".repeat(MAX_PATTERN_LEN + 1)).is_err());
        for good in ["*", "im.*", "leave_approvalV2", "a-b.c_d.*", "app_ticket"] {
            assert!(EventPattern::parse(good).is_ok(), "{good:?} refused");
        }
        let err = EventPattern::parse("contact.user*").expect_err("refused");
        assert!(err.to_string().contains("contact.user*"), "{err}");
        assert!(ConsumerFilter::new(&[], &["*".to_string()]).is_err());
        assert!(ConsumerFilter::new(&["*".to_string()], &[]).is_err());
    }
}

//! Log output: human-readable on a terminal, JSON lines otherwise (or when asked).
//!
//! The filter comes from `LARK_TICKETD_LOG` (or `RUST_LOG`), default `info`. Nothing in this crate
//! logs a secret: secrets are [`crate::secret::Secret`]s, which print as `[redacted]`, and the
//! places that want correlation log a fingerprint.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How to format log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

/// Install the global subscriber, writing to stderr, at `default_level` unless the environment
/// says otherwise. Call once, from `main`.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_env("LARK_TICKETD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Auto => !terminal,
        LogFormat::Text => false,
        LogFormat::Json => true,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.with_ansi(terminal).try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

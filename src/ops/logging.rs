//! Log output: human-readable on a terminal, JSON lines otherwise (or when asked).
//!
//! The filter comes from `LARK_TICKETD_LOG` (or `RUST_LOG`), default `info`. Nothing in this crate
//! logs a secret: secrets are [`crate::secret::Secret`]s, which print as `[redacted]`, and the
//! places that want correlation log a fingerprint.
//!
//! JSON lines are formatted by [`JsonLines`]: one flat object per event — `timestamp` (RFC 3339,
//! UTC, microseconds), `level`, `message`, then the event's fields; fields with an empty value are
//! left out. It exists because the generic JSON formatter cost a seventh of the CPU at load.
//!
//! JSON lines (the production format) are written through a buffer that a background thread
//! flushes every [`FLUSH_INTERVAL`] (and the writer itself once [`FLUSH_BYTES`] are pending):
//! one `write` per batch instead of one per request line, which at tens of thousands of requests
//! a second is a fifth of the CPU. `main` calls [`flush`] before exiting; a process killed with
//! SIGKILL loses at most the last interval's lines. On a terminal, lines go straight to stderr.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How often buffered log lines are written out.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Pending bytes that make the writer flush at once.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// How to format log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

/// Log lines waiting to be written to stderr.
#[derive(Clone, Default)]
struct BufferedStderr(Arc<Mutex<Vec<u8>>>);

impl BufferedStderr {
    fn flush_pending(&self) {
        let pending = {
            let mut buf = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if buf.is_empty() {
                return;
            }
            std::mem::take(&mut *buf)
        };
        let _ = std::io::stderr().lock().write_all(&pending);
    }
}

impl Write for BufferedStderr {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut buf = self.0.lock().unwrap_or_else(|p| p.into_inner());
            buf.extend_from_slice(bytes);
            buf.len() >= FLUSH_BYTES
        };
        if full {
            self.flush_pending();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_pending();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = BufferedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Append `value` to `out` as a JSON string (quotes included).
fn json_string(out: &mut String, value: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in value.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&value[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&value[start..]);
    out.push('"');
}

/// The event's fields as `,"name":value` pairs.
struct JsonFields<'a> {
    out: &'a mut String,
}

impl JsonFields<'_> {
    fn key(&mut self, field: &Field) {
        self.out.push(',');
        json_string(self.out, field.name());
        self.out.push(':');
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !value.is_empty() {
            self.key(field);
            json_string(self.out, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.out, "{value}");
        } else {
            self.out.push_str("null");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }
}

thread_local! {
    /// The formatted date and time of the current second, per thread.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `2026-11-21T19:46:02.123456Z`.
fn timestamp(out: &mut String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let text = crate::ops::status::utc(secs).replace(' ', "T");
            *cached = (secs, text);
        }
        out.push_str(&cached.1);
    });
    let _ = write!(out, ".{:06}Z", now.subsec_micros());
}

/// One JSON object per line; see the module docs.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::with_capacity(256);
        line.push_str("{\"timestamp\":\"");
        timestamp(&mut line);
        line.push_str("\",\"level\":\"");
        line.push_str(event.metadata().level().as_str());
        line.push('"');
        event.record(&mut JsonFields { out: &mut line });
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

static BUFFER: OnceLock<BufferedStderr> = OnceLock::new();

/// Write out buffered log lines now. Call before the process exits.
pub fn flush() {
    if let Some(buffer) = BUFFER.get() {
        buffer.flush_pending();
    }
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
        .with_target(false);
    // `message` is recorded like any field, so it lands right after `level`.
    // A second init (tests) keeps the first subscriber.
    let _ = if json {
        let buffer = BUFFER.get_or_init(|| {
            let buffer = BufferedStderr::default();
            let flusher = buffer.clone();
            let _ = std::thread::Builder::new()
                .name("log-flush".into())
                .spawn(move || loop {
                    std::thread::sleep(FLUSH_INTERVAL);
                    flusher.flush_pending();
                });
            buffer
        });
        builder
            .with_writer(buffer.clone())
            .event_format(JsonLines)
            .try_init()
    } else {
        builder
            .with_writer(std::io::stderr)
            .with_ansi(terminal)
            .try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}é飞");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é飞""#);
        let parsed: String = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}é飞");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let mut out = String::new();
        timestamp(&mut out);
        assert_eq!(out.len(), "2026-11-21T19:46:02.123456Z".len(), "{out}");
        assert!(out.ends_with('Z') && out.as_bytes()[10] == b'T', "{out}");
    }

    #[test]
    fn events_become_one_json_object_per_line() {
        let buffer = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || SinkWriter(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                app = "cli_a",
                empty = "",
                n = 3u64,
                ok = true,
                ms = 1.5,
                "hello \"world\""
            );
        });
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "hello \"world\"");
        assert_eq!(v["app"], "cli_a");
        assert_eq!(v["n"], 3);
        assert_eq!(v["ok"], true);
        assert_eq!(v["ms"], 1.5);
        assert!(v.get("empty").is_none(), "empty fields are left out");
    }

    struct SinkWriter(Arc<Mutex<Vec<u8>>>);

    impl Write for SinkWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

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
//! Lines are never written by the thread that logs them. Every line (JSON or text) goes into a
//! bounded in-memory buffer, and one dedicated thread ([`LogPipe`]) writes the buffer out: every
//! [`FLUSH_INTERVAL`], or at once when [`FLUSH_BYTES`] are pending (on a terminal, at once after
//! every line). A tokio worker that logs only appends to the buffer under a lock that no one
//! holds across I/O, so a stalled stderr (a full pipe, a stopped log collector) never blocks a
//! worker. When the buffer holds [`MAX_PENDING_BYTES`], further lines are dropped and counted
//! ([`dropped_lines`], a warning line written once the output moves again, and the
//! `lark_ticketd_log_lines_dropped_total` metric, which the `/metrics` handler catches up from
//! [`dropped_lines`] at scrape time: metrics are a leaf and never call back into logging).
//! Batching is also cheaper: one `write` per batch instead of one per request line, which at
//! tens of thousands of requests a second is a fifth of the CPU. `main` calls [`flush`] before
//! exiting; a process killed with SIGKILL loses at most the last interval's lines.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How often buffered log lines are written out.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Pending bytes that make the writer thread write at once.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Pending bytes at most: lines beyond this are dropped (and counted) until the output catches
/// up. A few seconds of output at full load.
pub const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// How long [`flush`] waits for a stalled output before giving up (at exit).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How to format log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

/// What the logging threads and the writer thread share.
struct Shared {
    state: Mutex<PipeState>,
    /// Wakes the writer thread: enough is pending, or a flush was asked for.
    work: Condvar,
    /// Wakes [`LogPipe::flush`] callers when a batch has been written.
    written: Condvar,
    /// Lines dropped since the start.
    dropped: AtomicU64,
    /// Bytes pending at most.
    max_pending: usize,
    /// Wake the writer after every line (a terminal), not only when [`FLUSH_BYTES`] are pending.
    eager: bool,
}

#[derive(Default)]
struct PipeState {
    pending: Vec<u8>,
    /// Dropped lines not yet reported in the output.
    unreported: u64,
    /// Flush requests so far, and how many of them the writer has served.
    flushes_asked: u64,
    flushes_done: u64,
}

/// Log output through a bounded buffer and a dedicated writer thread; see the module docs.
#[derive(Clone)]
pub struct LogPipe(Arc<Shared>);

impl LogPipe {
    /// Start the writer thread over `sink`, keeping at most `max_pending` bytes waiting.
    /// `eager`: write each line as soon as possible (a terminal) instead of in batches.
    pub fn start(
        sink: impl Write + Send + 'static,
        max_pending: usize,
        eager: bool,
    ) -> std::io::Result<LogPipe> {
        let pipe = LogPipe(Arc::new(Shared {
            state: Mutex::new(PipeState::default()),
            work: Condvar::new(),
            written: Condvar::new(),
            dropped: AtomicU64::new(0),
            max_pending,
            eager,
        }));
        let writer = pipe.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run(sink))?;
        Ok(pipe)
    }

    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lines dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }

    /// Queue one formatted line (or several); never waits for the output.
    fn push(&self, bytes: &[u8]) {
        let wake = {
            let mut state = self.lock();
            if state.pending.len() + bytes.len() > self.0.max_pending {
                state.unreported += 1;
                self.0.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            state.pending.extend_from_slice(bytes);
            self.0.eager || state.pending.len() >= FLUSH_BYTES
        };
        if wake {
            self.0.work.notify_one();
        }
    }

    /// Ask the writer thread to write everything pending, and wait up to `timeout` for it.
    /// Returns whether it was written.
    pub fn flush(&self, timeout: Duration) -> bool {
        let mut state = self.lock();
        state.flushes_asked += 1;
        let ticket = state.flushes_asked;
        self.0.work.notify_one();
        let (state, _) = self
            .0
            .written
            .wait_timeout_while(state, timeout, |s| s.flushes_done < ticket)
            .unwrap_or_else(|p| p.into_inner());
        state.flushes_done >= ticket
    }

    /// The writer thread: the only place log output is written.
    fn run(self, mut sink: impl Write) {
        let mut batch = Vec::new();
        loop {
            let (unreported, asked) = {
                let state = self.lock();
                let (mut state, _) = self
                    .0
                    .work
                    .wait_timeout_while(state, FLUSH_INTERVAL, |s| {
                        // Sleep unless a flush is asked for, a batch is full, or (eager) a line waits.
                        let nothing_asked = s.flushes_done == s.flushes_asked;
                        let batch_open = s.pending.len() < FLUSH_BYTES;
                        let may_wait = !self.0.eager || s.pending.is_empty();
                        nothing_asked && batch_open && may_wait
                    })
                    .unwrap_or_else(|p| p.into_inner());
                // Swap buffers: the next lines go into last round's (cleared) allocation.
                std::mem::swap(&mut state.pending, &mut batch);
                (std::mem::take(&mut state.unreported), state.flushes_asked)
            };
            if unreported > 0 {
                dropped_notice(&mut batch, unreported);
            }
            if !batch.is_empty() {
                let _ = sink.write_all(&batch).and_then(|()| sink.flush());
                batch.clear();
            }
            let mut state = self.lock();
            state.flushes_done = asked;
            drop(state);
            self.0.written.notify_all();
        }
    }
}

/// The line that reports dropped lines, in the JSON lines format.
fn dropped_notice(out: &mut Vec<u8>, dropped: u64) {
    let mut line = String::with_capacity(160);
    line.push_str("{\"timestamp\":\"");
    timestamp(&mut line);
    let _ = writeln!(
        line,
        "\",\"level\":\"WARN\",\"message\":\"log lines dropped: the log output could not keep up\",\"dropped\":{dropped}}}"
    );
    out.extend_from_slice(line.as_bytes());
}

/// The writer each log event gets: appends to the pipe.
pub struct PipeWriter(LogPipe);

impl Write for PipeWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.push(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogPipe {
    type Writer = PipeWriter;

    fn make_writer(&'a self) -> Self::Writer {
        PipeWriter(self.clone())
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
            let text = crate::clock::utc(secs).replace(' ', "T");
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

static PIPE: OnceLock<LogPipe> = OnceLock::new();

/// Write out pending log lines now (waiting at most [`FLUSH_TIMEOUT`] for a stalled output).
/// Call before the process exits.
pub fn flush() {
    if let Some(pipe) = PIPE.get() {
        pipe.flush(FLUSH_TIMEOUT);
    }
}

/// Log lines dropped so far because the output could not keep up.
pub fn dropped_lines() -> u64 {
    PIPE.get().map_or(0, LogPipe::dropped)
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
    if PIPE.get().is_some() {
        return;
    }
    let pipe = match LogPipe::start(std::io::stderr(), MAX_PENDING_BYTES, terminal) {
        Ok(pipe) => PIPE.get_or_init(|| pipe).clone(),
        Err(e) => {
            eprintln!("lark-ticketd: cannot start the log writer thread: {e}");
            return;
        }
    };
    let _ = if json {
        builder.with_writer(pipe).event_format(JsonLines).try_init()
    } else {
        builder.with_writer(pipe).with_ansi(terminal).try_init()
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

    /// A sink that blocks every write until the gate opens (a full pipe, a stopped collector),
    /// and tells the test when the writer thread is stuck in it.
    #[derive(Clone)]
    struct StalledSink {
        gate: Arc<(Mutex<bool>, Condvar)>,
        entered: std::sync::mpsc::SyncSender<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl StalledSink {
        fn open(&self) {
            *self.gate.0.lock().unwrap() = true;
            self.gate.1.notify_all();
        }
    }

    impl Write for StalledSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.try_send(());
            let (lock, cvar) = &*self.gate;
            let _open = cvar
                .wait_while(lock.lock().unwrap(), |open| !*open)
                .unwrap();
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_writer_never_blocks_the_logging_thread_and_counts_drops() {
        let (entered, stuck) = std::sync::mpsc::sync_channel(1);
        let sink = StalledSink {
            gate: Arc::default(),
            entered,
            out: Arc::default(),
        };
        let pipe = LogPipe::start(sink.clone(), 1000, true).unwrap();
        let line = |i: usize| format!("{{\"line\":{i:090}}}\n"); // 100 bytes
        let mut writer = pipe.make_writer();
        writer.write_all(line(0).as_bytes()).unwrap();
        // The writer thread takes the first line and is now stuck in the sink.
        stuck.recv_timeout(Duration::from_secs(10)).unwrap();

        // 1,000 more lines from another thread: every one returns although nothing is written.
        let (done, finished) = std::sync::mpsc::channel();
        let logging = pipe.clone();
        std::thread::spawn(move || {
            let mut writer = logging.make_writer();
            for i in 1..=1000 {
                writer.write_all(line(i).as_bytes()).unwrap();
            }
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("logging blocked on a stalled output");
        // 10 lines fit in 1,000 bytes; the other 990 were dropped and counted.
        assert_eq!(pipe.dropped(), 990);

        // The output moves again: the kept lines, then a line that reports the drops.
        sink.open();
        assert!(pipe.flush(Duration::from_secs(10)));
        let out = String::from_utf8(sink.out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1 + 10 + 1, "{out}");
        assert_eq!(lines[1], line(1).trim_end());
        assert_eq!(lines[10], line(10).trim_end());
        let notice: serde_json::Value = serde_json::from_str(lines[11]).unwrap();
        assert_eq!(notice["level"], "WARN");
        assert_eq!(notice["dropped"], 990);
    }

    #[test]
    fn batched_lines_are_written_by_the_interval_or_a_flush() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let pipe = LogPipe::start(SinkWriter(Arc::clone(&out)), 1 << 20, false).unwrap();
        pipe.make_writer().write_all(b"one\n").unwrap();
        pipe.make_writer().write_all(b"two\n").unwrap();
        assert!(pipe.flush(Duration::from_secs(10)));
        assert_eq!(out.lock().unwrap().as_slice(), b"one\ntwo\n");
        assert_eq!(pipe.dropped(), 0);
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

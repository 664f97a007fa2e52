//! Listeners and connections: the resource bounds and the graceful drain.
//!
//! [`run`] serves every listener (STYLE.md habit 1: `main` binds, the library serves, tests bind
//! port 0 and pass their own shutdown future). Bounds, all from `[server]` in the config:
//! * **one pool and one accept loop per listener** (main, `ops_listen`): a flood of the main
//!   listener never takes the permits or the accept loop that `/healthz`, `/readyz` and
//!   `/metrics` need. A listener is one [`Role`] row in [`Listeners::served`] and [`PoolLimits::of`];
//! * a connection limit per pool: a permit is taken *before* `accept`, so past the limit new
//!   clients wait in the kernel's backlog instead of costing us memory;
//! * a limit per client IP per pool: past it a connection gets a canned
//!   `429 too_many_connections` and is closed at once;
//! * `header_read_timeout`: hyper (1.12) arms it when it first polls the connection for a head —
//!   at accept, and again whenever a keep-alive connection goes idle after a response — and
//!   clears it once a head is parsed. So it is the first-byte timeout, the slowloris bound and the
//!   keep-alive idle timeout at once; a connection that sends no complete head within it is
//!   closed without an answer;
//! * `max_header_bytes` bounds the request head *and* hyper's per-connection read buffer (hyper's
//!   default buffer grows to ~400 KB for an unfinished head);
//! * the body limit, the body timeout and the server-wide body budget ([`BodyBudget`], put in
//!   every request's extensions here) are enforced per request in `routes`;
//! * `write_timeout`: a connection whose answer cannot be written for that long (a client that
//!   stops reading, so its socket's buffers fill up) is closed. hyper stops reading while it
//!   cannot write, so the head timeout never fires for such a client: without this bound it
//!   would hold its permit, and up to a few MiB of kernel send buffer, for ever;
//! * hyper answers unparseable requests itself (400 bad framing, 414, 431) with an empty body and
//!   offers no hook to change it; [`EnvelopeIo`] swaps exactly those canned answers for the same
//!   status with the JSON error envelope, as the connection writes them;
//! * on shutdown, listeners close at once and in-flight requests get `shutdown_grace` to finish.
//!
//! Signals: SIGTERM and SIGINT shut down ([`shutdown_signal`]); SIGHUP reloads the config file
//! the service was started with ([`reload_config`]), and is never fatal — `serve` catches it
//! ([`Hangups`]) before it reads the config, so one during start-up waits for the reload. An invalid file is logged (one line naming
//! the key) and the running config stays.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, ServerConfig};
use crate::error::{Error, ErrorKind};
use crate::routes::{self, BodyBudget, Role};
use crate::AppState;

/// The listeners to serve: the main one (events and API) and the optional ops one.
pub struct Listeners {
    pub main: TcpListener,
    pub ops: Option<TcpListener>,
    pub api: Option<TcpListener>,
}

impl Listeners {
    /// Every listener with its role; each gets its own pool and accept loop.
    fn served(self) -> Vec<(Role, TcpListener)> {
        let mut served = vec![(Role::Main, self.main)];
        served.extend(self.ops.map(|l| (Role::Ops, l)));
        served.extend(self.api.map(|l| (Role::Api, l)));
        served
    }
}

/// The connection bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one IP address at most.
    pub max_per_peer: usize,
}

impl PoolLimits {
    /// The `[server]` keys that bound the listener of `role`.
    pub fn of(limits: &ServerConfig, role: Role) -> PoolLimits {
        match role {
            Role::Main => PoolLimits {
                max_connections: limits.max_connections,
                max_per_peer: limits.max_connections_per_peer,
            },
            Role::Ops => PoolLimits {
                max_connections: limits.ops_max_connections,
                max_per_peer: limits.ops_max_connections_per_peer,
            },
            Role::Api => PoolLimits {
                max_connections: limits.api_max_connections,
                max_per_peer: limits.api_max_connections_per_peer,
            },
        }
    }
}

/// One listener's connection permits and per-peer counts.
struct Pool {
    permits: Arc<Semaphore>,
    /// Open connections per client address (entries removed at zero, so the map is bounded by
    /// `max_connections`). A std mutex: nothing awaits while it is held.
    peers: Mutex<HashMap<IpAddr, usize>>,
    max_per_peer: usize,
}

impl Pool {
    fn new(limits: PoolLimits) -> Arc<Pool> {
        Arc::new(Pool {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            peers: Mutex::new(HashMap::new()),
            max_per_peer: limits.max_per_peer,
        })
    }

    /// Count a connection from `ip`, unless that address already has its share.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PeerGuard> {
        let ip = ip.to_canonical();
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let open = peers.entry(ip).or_insert(0);
        if *open >= self.max_per_peer {
            return None;
        }
        *open += 1;
        Some(PeerGuard {
            pool: Arc::clone(self),
            ip,
        })
    }
}

/// One admitted connection from `ip`; uncounted when dropped.
struct PeerGuard {
    pool: Arc<Pool>,
    ip: IpAddr,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut peers = self.pool.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = peers.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

/// What every accept loop needs to serve a connection.
#[derive(Clone)]
struct Serve {
    state: AppState,
    http: http1::Builder,
    budget: BodyBudget,
    write_timeout: Duration,
    graceful: Arc<GracefulShutdown>,
}

impl Serve {
    fn new(state: &AppState, limits: &ServerConfig) -> Serve {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes)
            // hyper's floor for its buffer is 8 KiB.
            .max_buf_size(limits.max_header_bytes.max(8192));
        Serve {
            state: state.clone(),
            http,
            budget: BodyBudget::new(limits.max_body_bytes_in_flight, limits.body_allowance_bytes),
            write_timeout: limits.write_timeout,
            graceful: Arc::new(GracefulShutdown::new()),
        }
    }

    fn spawn(&self, stream: TcpStream, role: Role, permit: OwnedSemaphorePermit, peer: PeerGuard) {
        let _ = stream.set_nodelay(true);
        let open = self.state.metrics().connection();
        let state = self.state.clone();
        let budget = self.budget.clone();
        let service = service_fn(move |mut req| {
            req.extensions_mut().insert(budget.clone());
            let state = state.clone();
            async move { Ok::<_, Infallible>(routes::handle(&state, role, req).await) }
        });
        let conn = self.http.serve_connection(
            EnvelopeIo::new(TokioIo::new(stream), self.write_timeout),
            service,
        );
        let conn = self.graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(open);
            drop(peer);
            drop(permit);
        });
    }
}

/// Serve until `shutdown` resolves, then drain within `server.shutdown_grace`.
pub async fn run(
    listeners: Listeners,
    state: AppState,
    shutdown: impl Future<Output = ()>,
    mut hangups: Hangups,
) -> io::Result<()> {
    let limits = state.config().server.clone();
    let serve = Serve::new(&state, &limits);
    let background = state.broker().start();
    state.forwarder().start();
    // Dropping the sender stops every accept loop.
    let (stop, stopped) = watch::channel(());
    let loops: Vec<_> = listeners
        .served()
        .into_iter()
        .map(|(role, listener)| {
            let pool = Pool::new(PoolLimits::of(&limits, role));
            tokio::spawn(accept_loop(
                listener,
                role,
                pool,
                serve.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    drop(stopped);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = hangups.next() => reload_config(&state),
        }
    }
    drop(stop);
    for accept in loops {
        // Each loop drops its listener as it ends.
        let _ = accept.await;
    }
    state.broker().close().await;
    // Attempts cut short here are claimed again after a restart, once their lease runs out.
    state.forwarder().stop().await;
    // Wait until the stopped sweep is gone, with its handles on the store.
    let _ = background.await;
    tracing::info!(
        grace_ms = limits.shutdown_grace.as_millis() as u64,
        "shutting down: draining in-flight requests"
    );
    let Serve { graceful, .. } = serve;
    match Arc::try_unwrap(graceful) {
        Ok(graceful) => {
            tokio::select! {
                () = graceful.shutdown() => tracing::info!("all connections closed"),
                () = tokio::time::sleep(limits.shutdown_grace) => {
                    tracing::warn!("shutdown grace period elapsed; closing remaining connections");
                }
            }
        }
        // Unreachable: every accept loop (and its `Serve`) has ended.
        Err(_) => tracing::warn!("connections still being accepted at shutdown"),
    }
    Ok(())
}

/// Accept on one listener, within its own pool, until `stop`'s sender is dropped.
async fn accept_loop(
    listener: TcpListener,
    role: Role,
    pool: Arc<Pool>,
    serve: Serve,
    mut stop: watch::Receiver<()>,
) {
    let mut backoff = Backoff::default();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&pool.permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff.reset();
                    accepted
                }
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin.
                    tracing::warn!(error = %e, listener = ?role, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next()) => continue,
                        _ = stop.changed() => break,
                    }
                }
            },
            _ = stop.changed() => break,
        };
        match pool.admit(peer.ip()) {
            Some(guard) => serve.spawn(stream, role, permit, guard),
            None => refuse(stream, peer, role),
        }
    }
}

/// Answer `429 too_many_connections` if the socket takes it without waiting, and close.
fn refuse(stream: TcpStream, peer: SocketAddr, role: Role) {
    tracing::debug!(peer = %peer.ip(), listener = ?role, "too many connections from one address");
    let _ = stream.try_write(&canned(ErrorKind::TooManyConnections));
}

/// A whole HTTP/1.1 answer carrying the JSON error envelope of `kind`, closing the connection.
fn canned(kind: ErrorKind) -> Vec<u8> {
    let error = Error::from(kind);
    let body =
        serde_json::json!({"error": {"code": kind.code(), "message": error.message()}}).to_string();
    let status = StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let retry = if kind == ErrorKind::TooManyConnections {
        "retry-after: 1\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n{retry}\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

/// The error kind of an answer hyper wrote on its own for a request it could not parse: a whole
/// head alone in one write, status 400, 414 or 431, `content-length: 0`. The service never
/// answers these statuses with an empty body, so nothing of ours matches.
fn automatic_rejection(buf: &[u8]) -> Option<ErrorKind> {
    let kind = match buf.get(..13)? {
        b"HTTP/1.1 400 " => ErrorKind::MalformedRequest,
        b"HTTP/1.1 414 " => ErrorKind::UriTooLong,
        b"HTTP/1.1 431 " => ErrorKind::HeaderTooLarge,
        _ => return None,
    };
    let head = std::str::from_utf8(buf).ok()?;
    let whole_head = head.ends_with("\r\n\r\n") && head.find("\r\n\r\n") == Some(head.len() - 4);
    let empty = head
        .to_ascii_lowercase()
        .contains("\r\ncontent-length: 0\r\n");
    (whole_head && empty).then_some(kind)
}

/// The connection's IO, passing everything through except hyper's own empty-bodied rejections,
/// which it replaces with the same status and the JSON error envelope (hyper has no hook for
/// them: `Http1Transaction::on_error` writes a bare head and closes). It also bounds how long a
/// write may stay blocked (`server.write_timeout`).
struct EnvelopeIo<T> {
    inner: T,
    /// The replacement being written, and how much of it is written.
    replacing: Option<(Vec<u8>, usize)>,
    write_timeout: Duration,
    /// Armed when a write finds the socket full; cleared by any write that makes progress.
    write_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> EnvelopeIo<T> {
    fn new(inner: T, write_timeout: Duration) -> Self {
        EnvelopeIo {
            inner,
            replacing: None,
            write_timeout,
            write_deadline: None,
        }
    }

    fn watch_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        watch_write(&mut self.write_deadline, self.write_timeout, cx, polled)
    }
}

/// Pass a write's outcome through, keeping the blocked-write deadline: armed while writes stay
/// pending, an error once it passes, cleared by progress.
fn watch_write<R>(
    deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
    polled: Poll<io::Result<R>>,
) -> Poll<io::Result<R>> {
    match polled {
        Poll::Pending => {
            let armed = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            match armed.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client stopped reading: write timeout",
                ))),
                Poll::Pending => Poll::Pending,
            }
        }
        ready => {
            *deadline = None;
            ready
        }
    }
}

impl<T: Write + Unpin> EnvelopeIo<T> {
    /// Write the replacement for a `consumed`-byte write of hyper's; report `consumed` once all
    /// of it is written.
    fn poll_replacement(
        &mut self,
        cx: &mut Context<'_>,
        consumed: usize,
    ) -> Poll<io::Result<usize>> {
        while let Some((bytes, written)) = &mut self.replacing {
            if *written == bytes.len() {
                self.replacing = None;
                return Poll::Ready(Ok(consumed));
            }
            let polled = Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]);
            match watch_write(&mut self.write_deadline, self.write_timeout, cx, polled) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(consumed))
    }

    fn start_replacing(&mut self, first: &[u8]) -> bool {
        if self.replacing.is_some() {
            return true;
        }
        match automatic_rejection(first) {
            Some(kind) => {
                tracing::debug!(code = kind.code(), "request refused while parsing");
                self.replacing = Some((canned(kind), 0));
                true
            }
            None => false,
        }
    }
}

impl<T: Read + Unpin> Read for EnvelopeIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for EnvelopeIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.start_replacing(buf) {
            return this.poll_replacement(cx, buf.len());
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if this.start_replacing(first) {
                return this.poll_replacement(cx, first.len());
            }
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch_write(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accept-error backoff: 10 ms doubling to 1 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let ms = 10u64 << self.0.min(7);
        self.0 += 1;
        Duration::from_millis(ms.min(1000))
    }

    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// Pending connections the kernel may queue for `accept` (capped by `net.core.somaxconn`).
/// Generous: a burst of clients (1,000 token requests at a cold start) must not overflow it, or
/// their SYNs are dropped and retried a second later.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Bind a listener with [`LISTEN_BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// SIGHUP, caught: while this exists (and for the rest of the process: the handler is never
/// removed) SIGHUP no longer terminates the process. [`run`] reloads the config on each one;
/// `serve` creates it before anything else, so a SIGHUP during start-up (the store opening, say)
/// is held and answered by a reload once serving, instead of killing the process.
pub struct Hangups(
    #[cfg(unix)] Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] (),
);

impl Hangups {
    /// Catch SIGHUP from now on (where the platform has it). Needs a Tokio runtime.
    #[cfg(unix)]
    pub fn catch() -> Hangups {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Hangups(Some(s)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: config reload unavailable");
                Hangups(None)
            }
        }
    }

    #[cfg(not(unix))]
    pub fn catch() -> Hangups {
        Hangups(())
    }

    /// The next SIGHUP (never, without the stream, or once it has ended).
    #[cfg(unix)]
    async fn next(&mut self) {
        if let Some(s) = &mut self.0 {
            if s.recv().await.is_some() {
                return;
            }
            // The stream ended: never poll it again (it would answer at once, for ever).
            self.0 = None;
        }
        std::future::pending().await
    }

    #[cfg(not(unix))]
    async fn next(&mut self) {
        std::future::pending().await
    }
}

/// Read the config file the service was started with again, validate it as at start-up, and
/// apply what a running service can change ([`AppState::reload`]). An invalid file changes
/// nothing: one error line names the key. Counted in `lark_ticketd_config_reloads_total`.
pub fn reload_config(state: &AppState) {
    let Some(path) = state.config().source.clone() else {
        tracing::warn!("SIGHUP: the config was not loaded from a file, nothing to reload");
        return;
    };
    let reloaded = Config::load(&path)
        .map_err(|e| (e.key.clone(), e.to_string()))
        .and_then(|new| {
            state
                .reload(&new)
                .map_err(|e| ("consumers".to_string(), e.message().to_string()))
        });
    match reloaded {
        Ok(done) => {
            state.metrics().config_reload("applied");
            tracing::info!(
                config = %path.display(),
                clients = done.clients,
                consumers_added = ?done.consumers.added,
                consumers_removed = ?done.consumers.removed,
                consumers_changed = ?done.consumers.changed,
                "config reloaded"
            );
            if !done.needs_restart.is_empty() {
                tracing::warn!(
                    keys = %done.needs_restart.join(", "),
                    "config reloaded, but these changes need a restart and were not applied: {}",
                    done.needs_restart.join(", ")
                );
            }
        }
        Err((key, why)) => {
            state.metrics().config_reload("refused");
            tracing::error!(
                config = %path.display(),
                key = %key,
                "config reload refused, still running with the previous config: {why}"
            );
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_empty_rejections_are_replaced() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n";
        assert_eq!(
            automatic_rejection(hyper_431),
            Some(ErrorKind::HeaderTooLarge)
        );
        // Our own 400s carry a body; a head followed by anything is not a bare rejection.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 60\r\n\r\n";
        assert_eq!(automatic_rejection(ours), None);
        let with_body =
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(automatic_rejection(with_body), None);
        assert_eq!(
            automatic_rejection(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            None
        );
    }

    #[test]
    fn canned_answers_are_whole_http_responses_with_the_envelope() {
        let raw = String::from_utf8(canned(ErrorKind::TooManyConnections)).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }
}

//! Listeners and connections: the resource bounds and the graceful drain.
//!
//! [`run`] owns the accept loop (STYLE.md habit 1: `main` binds, the library serves, tests bind
//! port 0 and pass their own shutdown future). Bounds, all from `[server]` in the config:
//! * a connection limit: a permit is taken *before* `accept`, so past the limit new clients wait
//!   in the kernel's backlog instead of costing us memory;
//! * a header-read timeout per request (slowloris);
//! * the body limit and body timeout are enforced per request in `routes`;
//! * on shutdown, listeners close at once and in-flight requests get `shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::routes::{self, Role};
use crate::AppState;

/// The listeners to serve: the main one (events and API) and the optional ops one.
pub struct Listeners {
    pub main: TcpListener,
    pub ops: Option<TcpListener>,
}

/// Serve until `shutdown` resolves, then drain within `server.shutdown_grace`.
pub async fn run(
    listeners: Listeners,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = state.config().server.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let Listeners { main, ops } = listeners;
    tokio::pin!(shutdown);
    let mut backoff = Backoff::default();
    let background = state.broker().start();

    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            r = main.accept() => r.map(|(s, _)| (s, Role::Main)),
            r = accept_optional(ops.as_ref()) => r.map(|(s, _)| (s, Role::Ops)),
            () = &mut shutdown => break,
        };
        let (stream, role) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let open = state.metrics().connection();
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(routes::handle(&state, role, req).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(open);
            drop(permit);
        });
    }

    drop(main);
    drop(ops);
    state.broker().close().await;
    // Wait until the aborted task is gone, with its handles on the store.
    let _ = background.await;
    tracing::info!(
        grace_ms = limits.shutdown_grace.as_millis() as u64,
        "shutting down: draining in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("shutdown grace period elapsed; closing remaining connections");
        }
    }
    Ok(())
}

async fn accept_optional(
    listener: Option<&TcpListener>,
) -> io::Result<(TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
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

//! Abuse benchmark: unauthenticated floods against the real release binary while a legitimate
//! client keeps working (issue 8, "Evidence to add").
//!
//! `cargo bench --bench abuse` (options after `--`: `--seconds N` per phase, `--no-pin`). Under
//! `cargo test` (no `--bench` argument) it only runs a smoke check: every phase for a fraction of
//! a second with a few dozen attacking connections, and the legitimate client must still succeed.
//!
//! lark-ticketd (`serve`, embedded store, default `[server]` limits, `ops_listen` set) and
//! mock-feishu run as child processes, pinned like `benches/load.rs` (servers on core 0, this
//! process on core 1, with `taskset`). Everything is on loopback. The legitimate client is
//! 127.0.0.1; attackers use other loopback addresses (127.0.0.2 and up), so the per-address limit
//! applies to them and not to the client, as it would on a network; at most 128 per address on
//! the main listener (below its per-address limit: the pool itself is what is flooded).
//!
//! Throughout, the legitimate client pushes signed, encrypted `app_ticket` events (two keep-alive
//! connections, closed loop), fetches tenant tokens (two more), and probes `/healthz` and
//! `/readyz` on `ops_listen` every 100 ms on a new connection each (as an orchestrator does).
//! Phases, one after another, each `--seconds` long (default 10), attackers reconnecting whenever
//! the server closes them:
//! 1. baseline: no attack;
//! 2. slowloris on both listeners: 1,000 connections to the main listener (8 addresses) and 200
//!    to `ops_listen` (one address) each send a request head one byte per second;
//! 3. 1,000 unfinished 1 MiB bodies: head with `content-length: 1048576`, then all but the last
//!    byte, then silence;
//! 4. 1,000 unfinished 400 KB heads: 400 KB of headers without the blank line, then silence;
//! 5. connection flood: 1,536 idle connections (12 addresses × 128), more than the main pool.
//!
//! Reported per phase: the legitimate requests' success rate and p50/p99 latency, health probes
//! answered, the server's peak RSS; then its RSS a few seconds after the last flood stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use lark_ticketd::push::{self, Seal};
use lark_ticketd::secret::Secret;

mod common;

use common::{
    command, embedded_store, free_port, machine, now_us, pin_self_to_core_1, rss_kib,
    served_binary, spawn_ready, ticketd_binary, Proc, APP_ID, KEY, TOKEN,
};

/// The app the legitimate client pushes tickets to (tokens come from the other one's ticket).
const PUSH_APP: &str = "cli_abusepushapp0001";
const SECRET: &str = "abuse-bench-app-secret";
const PINNING: &str =
    "lark-ticketd pinned to core 0, attackers, client and mock-feishu to core 1 (taskset)";
const BEARER: &str = "abuse-bench-bearer-key";

/// The sizes of one run.
#[derive(Clone, Copy)]
struct Scale {
    phase: Duration,
    slowloris_main: usize,
    slowloris_ops: usize,
    bodies: usize,
    body_bytes: usize,
    heads: usize,
    head_bytes: usize,
    flood_addresses: u8,
    flood_per_address: usize,
}

impl Scale {
    fn full(seconds: f64) -> Scale {
        Scale {
            phase: Duration::from_secs_f64(seconds),
            slowloris_main: 1000,
            slowloris_ops: 200,
            bodies: 1000,
            body_bytes: 1024 * 1024,
            heads: 1000,
            head_bytes: 400 * 1024,
            flood_addresses: 12,
            flood_per_address: 128,
        }
    }

    fn smoke() -> Scale {
        Scale {
            phase: Duration::from_millis(500),
            slowloris_main: 40,
            slowloris_ops: 20,
            bodies: 40,
            body_bytes: 1024 * 1024,
            heads: 40,
            head_bytes: 400 * 1024,
            flood_addresses: 2,
            flood_per_address: 30,
        }
    }
}

// ---------------------------------------------------------------------------------------------
/// The service's config: default `[server]` limits, an ops listener, the embedded store.
fn config_text(port: u16, ops_port: u16, mock_port: u16, db: &Path) -> String {
    let app = |app_id: &str| {
        format!(
            "[[apps]]\napp_id = \"{app_id}\"\napp_secret = \"{SECRET}\"\nencrypt_key = \"{KEY}\"\n\
             verification_token = \"{TOKEN}\"\nbase_url = \"http://127.0.0.1:{mock_port}\"\n"
        )
    };
    format!(
        "listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops_port}\"\n\
         {}{}{}\
         [[clients]]\nname = \"bench\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"tokens\", \"status\"]\n",
        embedded_store(db),
        app(APP_ID),
        app(PUSH_APP),
        lark_ticketd::auth::key_sha256_hex(BEARER)
    )
}

struct Servers {
    ticketd: Proc,
    ops: SocketAddr,
    _mock: Proc,
}

fn start(pin_server: Option<&str>, pin_client: Option<&str>, dir: &Path) -> Servers {
    let (port, ops_port, mock_port) = (free_port(), free_port(), free_port());
    let path = dir.join("abuse.toml");
    std::fs::write(
        &path,
        config_text(port, ops_port, mock_port, &dir.join("abuse.db")),
    )
    .unwrap();
    let mut mock = command(pin_client, &ticketd_binary());
    mock.args(["mock-feishu", "--push-interval", "0s", "--latency", "0ms"])
        .args(["--listen", &format!("127.0.0.1:{mock_port}")])
        .args([
            "--events-url",
            &format!("http://127.0.0.1:{port}/events/{{app_id}}"),
        ])
        .arg("--config")
        .arg(&path);
    let mock = spawn_ready(mock, mock_port, "/mock/calls").0;
    let mut cmd = command(pin_server, &served_binary());
    cmd.args(["serve", "--log-format", "json", "--config"])
        .arg(&path)
        .env_remove("LARK_TICKETD_LOG")
        .env_remove("RUST_LOG");
    let ticketd = spawn_ready(cmd, port, "/healthz").0;
    Servers {
        ticketd,
        ops: ([127, 0, 0, 1], ops_port).into(),
        _mock: mock,
    }
}

// ---------------------------------------------------------------------------------------------
// The legitimate client.

async fn connect(addr: SocketAddr) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// A signed, encrypted app_ticket push for `PUSH_APP`, newer than every earlier one.
fn ticket_push(i: u64) -> Request<Full<Bytes>> {
    let json = push::app_ticket_json(
        PUSH_APP,
        &Secret::new(format!("abuse-ticket-{i}")),
        &Secret::new(TOKEN),
        now_us(),
        &format!("{i:032x}"),
    );
    let sealed = push::seal(
        &json,
        Seal {
            encrypt_key: Some(&Secret::new(KEY)),
            sign: true,
        },
    );
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(format!("/events/{PUSH_APP}"))
        .header("host", "127.0.0.1")
        .header("content-type", "application/json; charset=utf-8");
    for (k, v) in &sealed.headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::from(sealed.body))).unwrap()
}

fn token_fetch(i: u64) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(format!(
            "/v1/apps/{APP_ID}/tenants/tenant-{:02}/tenant_access_token",
            i % 10
        ))
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {BEARER}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// What the legitimate client saw in one phase.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    latencies_us: Vec<u32>,
    probes_ok: u64,
    probes_failed: u64,
    peak_rss_kib: u64,
}

impl Tally {
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

/// The legitimate client's running record, shared by its tasks.
#[derive(Default)]
struct Record {
    ok: AtomicU64,
    failed: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    probes_ok: AtomicU64,
    probes_failed: AtomicU64,
}

impl Record {
    fn take(&self) -> Tally {
        let mut latencies_us = std::mem::take(&mut *self.latencies_us.lock().unwrap());
        latencies_us.sort_unstable();
        Tally {
            ok: self.ok.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
            latencies_us,
            probes_ok: self.probes_ok.swap(0, Ordering::Relaxed),
            probes_failed: self.probes_failed.swap(0, Ordering::Relaxed),
            peak_rss_kib: 0,
        }
    }
}

/// Closed loop over one keep-alive connection until `stop`.
async fn legit_loop(
    addr: SocketAddr,
    make: fn(u64) -> Request<Full<Bytes>>,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut sender = None;
    let mut i = seed;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        if sender.is_none() {
            sender = connect(addr).await;
        }
        let ok = match sender.as_mut() {
            None => false,
            Some(s) => match s.ready().await {
                Err(_) => false,
                Ok(()) => match s.send_request(make(i)).await {
                    Ok(resp) => {
                        let success = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        success
                    }
                    Err(_) => false,
                },
            },
        };
        i += 1;
        if ok {
            record.ok.fetch_add(1, Ordering::Relaxed);
            let us = started.elapsed().as_micros() as u32;
            record.latencies_us.lock().unwrap().push(us);
        } else {
            record.failed.fetch_add(1, Ordering::Relaxed);
            sender = None;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A probe on a new connection, as an orchestrator's: answered 200 within 2 s?
async fn probe(addr: SocketAddr, path: &str) -> bool {
    let attempt = async {
        let mut sender = connect(addr).await?;
        let req = Request::builder()
            .uri(path)
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.status().as_u16() == 200)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

async fn probe_loop(ops: SocketAddr, record: Arc<Record>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        for path in ["/healthz", "/readyz"] {
            if probe(ops, path).await {
                record.probes_ok.fetch_add(1, Ordering::Relaxed);
            } else {
                record.probes_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Attackers. Each task connects from its own loopback address, does its thing, and reconnects
// (after a short pause) whenever the server closes it, until `stop`.

#[derive(Clone, Copy)]
enum Attack {
    /// A request head, one byte per second.
    Slowloris,
    /// `content-length: n`, then n - 1 bytes, then silence.
    UnfinishedBody(usize),
    /// n bytes of headers without the blank line, then silence.
    UnfinishedHead(usize),
    /// Connect and send nothing.
    Idle,
}

async fn connect_from(from: [u8; 4], addr: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind((from, 0).into()).ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .ok()?
        .ok()
}

async fn attacker(from: [u8; 4], addr: SocketAddr, attack: Attack, stop: Arc<AtomicBool>) {
    let filler = Bytes::from(vec![b'a'; 64 * 1024]);
    while !stop.load(Ordering::Relaxed) {
        let Some(stream) = connect_from(from, addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut read, mut write) = stream.into_split();
        let act = async {
            match attack {
                Attack::Slowloris => {
                    for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: "
                        .iter()
                        .chain(std::iter::repeat(&b'a'))
                    {
                        write.write_all(&[*b]).await?;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                Attack::UnfinishedBody(n) => {
                    let head = format!("POST /events/{APP_ID} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n");
                    write.write_all(head.as_bytes()).await?;
                    let mut left = n - 1;
                    while left > 0 {
                        let k = left.min(filler.len());
                        write.write_all(&filler[..k]).await?;
                        left -= k;
                    }
                }
                Attack::UnfinishedHead(n) => {
                    write
                        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
                        .await?;
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(8 * 1024);
                        let line = format!("x-{left}: {}\r\n", "a".repeat(k));
                        write.write_all(line.as_bytes()).await?;
                        left -= k;
                    }
                }
                Attack::Idle => {}
            }
            std::future::pending::<std::io::Result<()>>().await
        };
        let mut buf = [0u8; 1024];
        let server_closed = async {
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let stopping = async {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = act => {}
            () = server_closed => {}
            () = stopping => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Start `count` attackers of one kind, `per_address` per loopback address from `first`.
fn launch(
    addr: SocketAddr,
    attack: Attack,
    count: usize,
    per_address: usize,
    first: u8,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|i| {
            let from = [127, 0, 0, first + (i / per_address) as u8];
            tokio::spawn(attacker(from, addr, attack, Arc::clone(stop)))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

/// Where, what, how many, how many per address, first address (127.0.0.x).
type Plan = (SocketAddr, Attack, usize, usize, u8);

struct PhaseResult {
    name: &'static str,
    tally: Tally,
}

async fn bench(
    scale: Scale,
    pins: (Option<&str>, Option<&str>),
) -> (Vec<PhaseResult>, u64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let servers = start(pins.0, pins.1, dir.path());
    let main = servers.ticketd.addr;
    let pid = servers.ticketd.child.id();
    // The app's ticket (from mock-feishu's start-up push), then every tenant token cached.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut warm = connect(main).await.unwrap();
    for i in 0..10 {
        loop {
            warm.ready().await.unwrap();
            let resp = warm.send_request(token_fetch(i)).await.unwrap();
            let ok = resp.status().is_success();
            let _ = resp.into_body().collect().await;
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "no tokens");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(warm);
    let record = Arc::new(Record::default());
    let legit_stop = Arc::new(AtomicBool::new(false));
    let mut legit = Vec::new();
    for c in 0..2u64 {
        legit.push(tokio::spawn(legit_loop(
            main,
            ticket_push,
            Arc::clone(&record),
            Arc::clone(&legit_stop),
            c << 40,
        )));
        legit.push(tokio::spawn(legit_loop(
            main,
            token_fetch,
            Arc::clone(&record),
            Arc::clone(&legit_stop),
            c,
        )));
    }
    legit.push(tokio::spawn(probe_loop(
        servers.ops,
        Arc::clone(&record),
        Arc::clone(&legit_stop),
    )));

    let s = scale;
    let phases: [(&'static str, Vec<Plan>); 5] = [
        ("1. baseline, no attack", vec![]),
        (
            "2. slowloris, main and ops listeners",
            vec![
                (
                    main,
                    Attack::Slowloris,
                    s.slowloris_main,
                    s.slowloris_main.div_ceil(8),
                    2,
                ),
                (
                    servers.ops,
                    Attack::Slowloris,
                    s.slowloris_ops,
                    s.slowloris_ops,
                    20,
                ),
            ],
        ),
        (
            "3. unfinished 1 MiB bodies",
            vec![(
                main,
                Attack::UnfinishedBody(s.body_bytes),
                s.bodies,
                s.bodies.div_ceil(8),
                2,
            )],
        ),
        (
            "4. unfinished 400 KB heads",
            vec![(
                main,
                Attack::UnfinishedHead(s.head_bytes),
                s.heads,
                s.heads.div_ceil(8),
                2,
            )],
        ),
        (
            "5. connection flood",
            vec![(
                main,
                Attack::Idle,
                s.flood_per_address * usize::from(s.flood_addresses),
                s.flood_per_address,
                2,
            )],
        ),
    ];
    let mut results = Vec::new();
    record.take();
    for (name, attacks) in phases {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (addr, attack, count, per_address, first) in attacks {
            tasks.extend(launch(addr, attack, count, per_address, first, &stop));
        }
        eprintln!("  {name}: {} attacking connections", tasks.len());
        let started = Instant::now();
        let mut peak = 0;
        while started.elapsed() < s.phase {
            peak = peak.max(rss_kib(pid).0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let mut tally = record.take();
        tally.peak_rss_kib = peak.max(rss_kib(pid).0);
        results.push(PhaseResult { name, tally });
    }
    // After the floods: the client keeps going for a while, then the RSS is read.
    let settle = s.phase.min(Duration::from_secs(5));
    tokio::time::sleep(settle).await;
    let (after, hwm) = rss_kib(pid);
    legit_stop.store(true, Ordering::Relaxed);
    for t in legit {
        let _ = t.await;
    }
    let after_tally = record.take();
    assert_eq!(
        after_tally.failed, 0,
        "legitimate requests failed after the floods"
    );
    (results, after, hwm, settle.as_secs())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if !args.iter().any(|a| a == "--bench") {
        let (results, ..) = rt.block_on(bench(Scale::smoke(), (None, None)));
        for r in &results {
            assert_eq!(r.tally.failed, 0, "{}: legitimate requests failed", r.name);
            assert!(r.tally.ok > 0, "{}: no legitimate request", r.name);
            assert_eq!(
                r.tally.probes_failed, 0,
                "{}: a health probe failed",
                r.name
            );
        }
        println!("abuse benchmark smoke check: 1 passed, 0 failed");
        return;
    }
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = pin_self_to_core_1(cores, !args.iter().any(|a| a == "--no-pin"));
    let pins = if pin {
        (Some("0"), Some("1"))
    } else {
        (None, None)
    };
    eprintln!(
        "lark-ticketd abuse benchmark: {}",
        machine(cores, pin.then_some(PINNING))
    );
    let (results, after, hwm, settle) = rt.block_on(bench(Scale::full(seconds), pins));

    println!();
    println!(
        "lark-ticketd abuse benchmark — {}",
        machine(cores, pin.then_some(PINNING))
    );
    println!(
        "{seconds}s per phase; legitimate client: 2 connections pushing signed app_ticket events + 2 fetching tenant tokens (closed loop), /healthz + /readyz probes on ops_listen every 100 ms on new connections"
    );
    println!();
    println!("| phase | legitimate ok / total | success | p50 / p99 ms | ops probes answered | peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &results {
        let t = &r.tally;
        let total = t.ok + t.failed;
        println!(
            "| {} | {} / {} | {:.2} % | {:.2} / {:.2} | {} / {} | {:.1} |",
            r.name,
            t.ok,
            total,
            100.0 * t.ok as f64 / total.max(1) as f64,
            t.percentile_ms(0.5),
            t.percentile_ms(0.99),
            t.probes_ok,
            t.probes_ok + t.probes_failed,
            t.peak_rss_kib as f64 / 1024.0
        );
    }
    println!();
    println!(
        "peak RSS over the whole run (VmHWM) {:.1} MiB; RSS {settle} s after the last flood stopped {:.1} MiB",
        hwm as f64 / 1024.0,
        after as f64 / 1024.0
    );
}

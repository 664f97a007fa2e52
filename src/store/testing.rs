//! Test support, not part of the service: a real `redis-server` that a test starts on a free port
//! and kills when it is dropped. Public (and hidden from the docs) so the unit tests and the
//! integration tests in `tests/it` share this one copy.
//!
//! Every server runs in its own temporary directory with `--save ""` (no snapshots) and, unless
//! asked for, `--appendonly no`: a restart then comes back empty, the way a Redis without
//! persistence does. [`RedisServer::persistent`] turns on `appendonly yes` + `appendfsync always`
//! instead, so a `kill -9` loses nothing that was acknowledged.
//!
//! [`RedisCluster`] starts three such servers with `--cluster-enabled yes` and joins them with
//! `redis-cli --cluster create` (three primaries, no replicas). [`RedisCluster::shared`] starts one
//! for the whole test binary (tests that share it keep apart by `key_prefix`): its nodes cannot be
//! dropped with a test, so each runs under a watchdog shell that kills it when the test process
//! exits, however it exits (the watchdog waits for the end of a pipe only this process holds).
//!
//! [`RedisServer::tls`] adds a TLS port beside the plain one (Debian's `redis-server` is built
//! with TLS): the test brings the certificate files; the plain port stays for readiness and
//! `redis-cli`.
//!
//! Under `CI=true` a missing `redis-server` binary is a test failure (a panic); elsewhere
//! [`RedisServer::start`] prints a loud notice and returns `None`, and the test returns early.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a server gets to answer after it is started.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A binary: the file `$env` names, else the first `name` on `PATH`.
fn binary(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Are `redis-server` and `redis-cli` here? Under `CI=true` their absence panics (tests must not
/// pass by skipping); elsewhere it prints a loud notice naming the test and returns `false`.
pub fn redis_available(test: &str) -> bool {
    if binary("redis-server", "REDIS_SERVER").is_some()
        && binary("redis-cli", "REDIS_CLI").is_some()
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: redis-server or redis-cli is not installed, and CI=true requires the Redis tests \
         to run (.ci/run installs them with apt-get)"
    );
    eprintln!(
        "\n********************************************************************************\n\
         ** SKIPPED {test}: redis-server / redis-cli not installed (apt-get install redis-server).\n\
         ** The Redis backend is NOT tested in this run. Under CI=true this is a failure.\n\
         ********************************************************************************\n"
    );
    false
}

/// A port nobody listens on now (the OS picks it; a race with another process is retried by
/// [`RedisServer::start`]).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lark-ticketd-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

/// The certificate files of a TLS port (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate (chain).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that signed it (`redis-server` wants one even when clients need no certificate).
    pub ca: PathBuf,
}

/// A `redis-server` child process on 127.0.0.1.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    password: Option<String>,
    persistent: bool,
    extra: Vec<String>,
    /// A TLS port beside the plain one, and its files.
    tls: Option<(u16, TlsFiles)>,
    /// Run under a watchdog that kills it when this process exits (see the module docs).
    watchdog: bool,
    child: Option<Child>,
}

/// `sh -c` script: start `$0 "$@"` (redis-server) and exit with it; kill it as soon as standard
/// input (a pipe whose other end only the test process holds) reaches its end, i.e. when the
/// test process has exited, and then remove its directory (`$REDIS_TEST_DIR`). Asynchronous
/// lists get `/dev/null` as standard input, hence fd 3.
const WATCHDOG: &str = r#"exec 3<&0
"$0" "$@" 3<&- & pid=$!
( read -r _ <&3; : > "$REDIS_TEST_DIR/.orphaned"; kill -9 "$pid" 2>/dev/null ) & watch=$!
exec 3<&-
wait "$pid"; status=$?
if [ -e "$REDIS_TEST_DIR/.orphaned" ]; then rm -rf -- "$REDIS_TEST_DIR"; else kill "$watch" 2>/dev/null; fi
exit "$status""#;

impl RedisServer {
    /// Start a server without persistence. `None` (after a loud notice) when `redis-server` is
    /// missing outside CI; see the module docs.
    pub fn start(test: &str) -> Option<RedisServer> {
        Self::builder(test).map(RedisServer::launch)
    }

    /// A server not started yet, to set options on; `None` as in [`RedisServer::start`].
    pub fn builder(test: &str) -> Option<RedisServer> {
        if !redis_available(test) {
            return None;
        }
        Some(RedisServer {
            port: 0,
            dir: temp_dir("redis"),
            password: None,
            persistent: false,
            extra: Vec::new(),
            tls: None,
            watchdog: false,
            child: None,
        })
    }

    /// Also listen for TLS on a free port, with these files (clients need no certificate).
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some((0, files));
        self
    }

    /// Kill the server when this process exits, even if it is never dropped (a `static`).
    pub fn tied_to_this_process(mut self) -> Self {
        self.watchdog = true;
        self
    }

    /// Require this password (`requirepass`).
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self
    }

    /// `appendonly yes` + `appendfsync always`: an acknowledged write survives `kill -9`.
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// More `redis-server` arguments (e.g. `["--cluster-enabled", "yes"]`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Start it on a free port (retried on another port if that one was taken meanwhile).
    pub fn launch(mut self) -> RedisServer {
        for _ in 0..5 {
            self.port = free_port();
            if let Some((port, _)) = &mut self.tls {
                *port = free_port();
            }
            if self.spawn_and_wait() {
                return self;
            }
        }
        panic!(
            "redis-server did not start (see its log in {})",
            self.dir.display()
        );
    }

    fn spawn_and_wait(&mut self) -> bool {
        let bin = binary("redis-server", "REDIS_SERVER").expect("redis-server");
        let mut cmd = if self.watchdog {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(WATCHDOG)
                .arg(bin)
                .env("REDIS_TEST_DIR", &self.dir);
            sh
        } else {
            Command::new(bin)
        };
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"));
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        if let Some((port, files)) = &self.tls {
            cmd.arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca)
                .args(["--tls-auth-clients", "no"]);
        }
        // The watchdog's pipe: this process holds the other end until it exits.
        let stdin = if self.watchdog {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        cmd.args(&self.extra)
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn redis-server");
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: most likely the port was taken
            }
            if answers(self.addr()) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://[:password@]127.0.0.1:port/0`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// The TLS port ([`RedisServer::tls`]).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls.as_ref().map(|(port, _)| *port)
    }

    /// `rediss://[:password@]127.0.0.1:tls_port/0` ([`RedisServer::tls`]).
    pub fn tls_url(&self) -> Option<String> {
        let port = self.tls_port()?;
        Some(match &self.password {
            Some(p) => format!("rediss://:{p}@127.0.0.1:{port}/0"),
            None => format!("rediss://127.0.0.1:{port}/0"),
        })
    }

    /// The server's own directory (its append-only file, its log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `kill -9`: no shutdown, no final write.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port and directory (what persistence kept, it finds again).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_DEADLINE;
        while !self.spawn_and_wait() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -STOP`: the server stops answering but keeps its connections (a hung Redis).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// `kill -CONT` after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("a running redis-server");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Is the server process running?
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Run one command with `redis-cli` against this server and return its output (for tests
    /// that look at what is stored or change server settings). Panics if `redis-cli` fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let bin = binary("redis-cli", "REDIS_CLI").expect("redis-cli");
        let mut cmd = Command::new(bin);
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(p) = &self.password {
            cmd.env("REDISCLI_AUTH", p);
        }
        let out = cmd.args(args).output().expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Does something answer a RESP `PING` there (`+PONG`, or `-NOAUTH` with a password)?
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && (buf[0] == b'+' || buf[0] == b'-'))
}

/// A Redis Cluster of three primaries on free ports, each node a [`RedisServer`].
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Start three nodes, create the cluster, wait until every node says `cluster_state:ok`.
    /// `None` as in [`RedisServer::start`].
    pub fn start(test: &str) -> Option<RedisCluster> {
        if !redis_available(test) {
            return None;
        }
        Some(Self::create(test, false, None))
    }

    /// [`RedisCluster::start`] with a TLS port on every node beside the plain one, and the
    /// cluster bus over TLS: a TLS client learns the other nodes' TLS ports, a plain one their
    /// plain ports.
    pub fn start_tls(test: &str, files: TlsFiles) -> Option<RedisCluster> {
        if !redis_available(test) {
            return None;
        }
        Some(Self::create(test, false, Some(files)))
    }

    /// One cluster for every caller in this test process, started by the first (later callers
    /// wait for it). Its nodes live until the process exits, killed then by their watchdogs.
    /// Callers must keep apart by `key_prefix`. `None` as in [`RedisServer::start`].
    pub fn shared(test: &str) -> Option<&'static RedisCluster> {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        if !redis_available(test) {
            return None;
        }
        Some(SHARED.get_or_init(|| Self::create(test, true, None)))
    }

    fn create(test: &str, tied: bool, tls: Option<TlsFiles>) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // The cluster bus port is given explicitly: port + 10000 may not exist.
                let bus = free_port().to_string();
                let builder = RedisServer::builder(test).expect("redis-server");
                let builder = if tied {
                    builder.tied_to_this_process()
                } else {
                    builder
                };
                let builder = match &tls {
                    Some(files) => builder.tls(files.clone()).args(&["--tls-cluster", "yes"]),
                    None => builder,
                };
                builder
                    .args(&[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--cluster-port",
                        &bus,
                    ])
                    .launch()
            })
            .collect();
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(nodes.iter().map(|n| n.addr().to_string()));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let created = nodes[0].cli(&args);
        assert!(created.contains("All 16384 slots covered"), "{created}");
        let deadline = Instant::now() + START_DEADLINE;
        for node in &nodes {
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "the cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// One seed node's URL, as `store.url` with `store.cluster = true`.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// One seed node's `rediss://` URL ([`RedisCluster::start_tls`]).
    pub fn tls_url(&self) -> Option<String> {
        self.nodes[0].tls_url()
    }
}

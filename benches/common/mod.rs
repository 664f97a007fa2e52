//! What the load and abuse benchmarks share: the fake app's credentials, child processes (the
//! release binary, killed on drop), readiness, CPU pinning, the clock, and the machine line.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const APP_ID: &str = "cli_a5f0e9d8c7b6a5f4";
pub const KEY: &str = "EkEyExampleEncryptKey000000000001";
pub const TOKEN: &str = "Vt0kExampleVerificationTok3n0001";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        rss_kib(self.pid())
    }
}

/// CPU time a process (all its threads) has used so far, in seconds: `utime + stime` of
/// `/proc/{pid}/stat`, in Linux's fixed 100 ticks per second (`USER_HZ`). 0 where there is no
/// `/proc`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after it follow its `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15 of the line: 11 and 12 counted from 0 after the `)`.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// (VmRSS, VmHWM) of a process in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `program`, pinned to `pin` (a `taskset` CPU list) when given.
pub fn command(pin: Option<&str>, program: &Path) -> Command {
    match pin {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Wait until `GET http://addr/path` answers 2xx; returns the time it took from `since`.
pub fn wait_ready(addr: SocketAddr, path: &str, since: Instant) -> Duration {
    use std::io::{Read, Write};
    let deadline = since + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).is_ok() {
                let mut buf = [0u8; 16];
                if s.read(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 2") {
                    return since.elapsed();
                }
            }
        }
        assert!(Instant::now() < deadline, "{addr} did not become ready");
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Start `cmd` (its output discarded) and wait until `port` answers `ready_path` with a 2xx;
/// returns the process and the time from spawn to that first 2xx.
pub fn spawn_ready(mut cmd: Command, port: u16, ready_path: &str) -> (Proc, Duration) {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let first_2xx = wait_ready(addr, ready_path, started);
    (Proc { child, addr }, first_2xx)
}

/// The release binary cargo built for this bench.
pub fn ticketd_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lark-ticketd"))
}

/// The lark-ticketd that serves the measured requests: this bench's own build, or the binary
/// `LARK_TICKETD_BENCH_BINARY` names — to compare another build (an earlier commit, say) under
/// the same conditions. mock-feishu and the bare server always run from this build.
pub fn served_binary() -> PathBuf {
    std::env::var_os("LARK_TICKETD_BENCH_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(ticketd_binary)
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

pub fn now_ms() -> u64 {
    (now_us() / 1000) as u64
}

/// Pin this process (the load generator) to core 1 so the servers can have core 0: only with
/// two or more cores, when `wanted`, and when `taskset` works. Returns whether it is pinned.
pub fn pin_self_to_core_1(cores: usize, wanted: bool) -> bool {
    wanted && cores >= 2 && pin_process(std::process::id(), "1")
}

/// Pin every thread of a running process to `cpus` (a `taskset` CPU list): for a child that
/// another helper started without `taskset` in front. Returns whether `taskset` succeeded.
pub fn pin_process(pid: u32, cpus: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `[store]` table of an embedded store at `db`.
pub fn embedded_store(db: &Path) -> String {
    format!(
        "[store]\nkind = \"embedded\"\npath = {:?}\n",
        db.display().to_string()
    )
}

/// The `[store]` table of the Redis store at `url`, its keys under `key_prefix`.
pub fn redis_store(url: &str, key_prefix: &str) -> String {
    format!("[store]\nkind = \"redis\"\nurl = {url:?}\nkey_prefix = {key_prefix:?}\n")
}

/// "2 cores (CPU model); `pinning`".
pub fn machine(cores: usize, pinning: Option<&str>) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    format!(
        "{cores} cores ({model}); {}",
        pinning.unwrap_or("not pinned")
    )
}

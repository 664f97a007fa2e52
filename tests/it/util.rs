//! Test harness: spawn lark-ticketd in-process or as a child process, on port 0.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use lark_ticketd::clock::{self, SharedClock};
use lark_ticketd::config::Config;
use lark_ticketd::server::{self, Listeners};
use lark_ticketd::store::Store;
use lark_ticketd::AppState;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The fake credentials the shared vectors use.
pub const APP_ID: &str = "cli_a5f0e9d8c7b6a5f4";
/// The self-built ("custom") app of every [`Stack`]: no ticket, no event keys.
pub const CUSTOM_APP_ID: &str = "cli_c0ffee0c5a17b0e1";
pub const TOKEN: &str = "Vt0kExampleVerificationTok3n0001";
pub const KEY: &str = "EkEyExampleEncryptKey000000000001";
pub const APP_SECRET: &str = "AppSecretExampleValue0000000001";
/// Where tests point `base_url` when no fake Open Platform runs: a closed loopback port, so the
/// start-up resend request fails at once and never leaves the machine.
pub const NO_UPSTREAM: &str = "http://127.0.0.1:1";

/// A fixture file's text (fixtures/ is the only place tests read from).
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fixture file's JSON.
pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture(name)).unwrap()
}

/// An `[[apps]]` table.
pub fn app_toml(app_id: &str, encrypt_key: Option<&str>, token: &str) -> String {
    app_toml_at(app_id, encrypt_key, token, NO_UPSTREAM)
}

/// An `[[apps]]` table with its `base_url`.
pub fn app_toml_at(app_id: &str, encrypt_key: Option<&str>, token: &str, base_url: &str) -> String {
    let key = encrypt_key
        .map(|k| format!("encrypt_key = {}\n", toml_str(k)))
        .unwrap_or_default();
    format!(
        "[[apps]]\napp_id = {}\napp_secret = {}\n{key}verification_token = {}\nbase_url = {}\n",
        toml_str(app_id),
        toml_str(APP_SECRET),
        toml_str(token),
        toml_str(base_url)
    )
}

/// An `[[apps]]` table for a self-built app without event keys.
pub fn custom_app_toml(app_id: &str, base_url: &str) -> String {
    format!(
        "[[apps]]\napp_id = {}\nkind = \"custom\"\napp_secret = {}\nbase_url = {}\n",
        toml_str(app_id),
        toml_str(APP_SECRET),
        toml_str(base_url)
    )
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Everything the in-process servers logged, for the leak test.
pub fn captured_logs() -> String {
    let buf = log_buffer().lock().unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(Default::default)
}

#[derive(Clone)]
struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log_buffer().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Capture every log line of every in-process server, at the most verbose level.
fn install_log_capture() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(|| Capture)
            .json()
            .try_init();
    });
}

/// Every secret value the suite uses. Test tickets all carry the `tkt-secret-` marker.
pub fn secrets_used() -> Vec<String> {
    let mut secrets: Vec<String> = [
        KEY,
        TOKEN,
        APP_SECRET,
        "tkt-secret-",
        "key-one",
        "key-two",
        "tok-one",
        "tok-two",
        "tok-plain",
        "second-key",
        "second-token",
        "a-different-secret",
        "custom-key",
        "custom-token",
        "custom-app-secret",
        BEARER,
        STATUS_BEARER,
        SECOND_APP_BEARER,
        ADMIN_BEARER,
        REDIS_PASSWORD,
        LOGIN_BEARER,
        // Consumer secrets (Standard Webhooks), whole and as the key part alone.
        CONSUMER_SECRET_A,
        CONSUMER_SECRET_B,
        &CONSUMER_SECRET_A["whsec_".len()..],
        &CONSUMER_SECRET_B["whsec_".len()..],
        "whsec_",
    ]
    .iter()
    .chain(crate::reload::SECRETS.iter())
    .map(|s| s.to_string())
    .collect();
    // Tickets inside the shared vectors' plaintexts.
    let vectors = fixture_json("vectors/decrypt.json");
    for v in vectors["vectors"].as_array().unwrap() {
        let plaintext: serde_json::Value =
            serde_json::from_str(v["plaintext"].as_str().unwrap()).unwrap_or_default();
        if let Some(ticket) = plaintext["event"]["app_ticket"].as_str() {
            secrets.push(ticket.to_string());
        }
    }
    secrets
}

/// Does `text` hold something shaped like a token, ticket or login secret mock-feishu issues
/// (`a-`/`t-` + 40 hex digits, `ticket-` + 32; user access tokens `u-` + 40, refresh tokens
/// `ur-` + 40, authorization codes `oc-` + 32)?
pub fn holds_issued_secret(text: &str) -> bool {
    [
        ("a-", 40),
        ("t-", 40),
        ("ticket-", 32),
        ("u-", 40),
        ("ur-", 40),
        ("oc-", 32),
    ]
    .iter()
    .any(|(prefix, len)| {
        text.match_indices(prefix).any(|(i, _)| {
            let rest = &text.as_bytes()[i + prefix.len()..];
            rest.len() >= *len && rest[..*len].iter().all(u8::is_ascii_hexdigit)
        })
    })
}

pub fn assert_no_secrets(logs: &str, what: &str) {
    assert!(
        !logs.is_empty(),
        "{what}: nothing was logged, the check would be vacuous"
    );
    assert_none_leaked(logs, what);
}

/// Check the captured logs that no check has seen yet, from a margin before the last check's
/// end (longer than any secret, so one written across that point is still found). Checking
/// the whole capture at every server's stop made the in-process suite quadratic: the capture
/// holds every test's TRACE lines, hundreds of MiB by the end of a run. `leaks` checks it
/// whole.
fn assert_no_secrets_in_new_logs(what: &str) {
    const MARGIN: usize = 256;
    static CHECKED_UP_TO: Mutex<usize> = Mutex::new(0);
    // A failed check panics holding the lock: the next check still runs.
    let mut checked = CHECKED_UP_TO.lock().unwrap_or_else(|e| e.into_inner());
    let (new, end) = {
        let buf = log_buffer().lock().unwrap_or_else(|e| e.into_inner());
        let start = checked.saturating_sub(MARGIN).min(buf.len());
        (
            String::from_utf8_lossy(&buf[start..]).into_owned(),
            buf.len(),
        )
    };
    *checked = end;
    assert_none_leaked(&new, what);
}

fn assert_none_leaked(logs: &str, what: &str) {
    for secret in secrets_used() {
        assert!(
            !logs.contains(&secret),
            "{what} logged a secret ({}…)",
            &secret[..4]
        );
    }
    assert!(
        !holds_issued_secret(logs),
        "{what} logged an issued token or ticket"
    );
}

/// The server, in this process, on an ephemeral port.
pub struct TestApp {
    pub addr: SocketAddr,
    pub state: AppState,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    /// Spawn with this config text (its `listen` is ignored: port 0) and the system clock.
    pub async fn spawn(config: &str) -> TestApp {
        Self::spawn_with_clock(config, clock::system()).await
    }

    pub async fn spawn_with_clock(config: &str, clock: SharedClock) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::spawn_on(listener, config, clock).await
    }

    /// Spawn on a listener the test bound (to know the address before the config is written).
    pub async fn spawn_on(listener: TcpListener, config: &str, clock: SharedClock) -> TestApp {
        install_log_capture();
        // In-process servers keep state in memory unless the test asks for a store.
        let config = if config.contains("[store]") {
            config.to_string()
        } else {
            format!("[store]\nkind = \"memory\"\n{config}")
        };
        let config = Config::parse(&config, &|_| None).expect("test config");
        let store = Store::open(&config.store).await.expect("store");
        Self::spawn_with_store(listener, config, store, clock).await
    }

    /// Spawn on a store the test opened (e.g. on a storage backend it can break).
    pub async fn spawn_with_store(
        listener: TcpListener,
        config: Config,
        store: Store,
        clock: SharedClock,
    ) -> TestApp {
        install_log_capture();
        let addr = listener.local_addr().unwrap();
        let state = AppState::new(config, store, clock).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            Listeners {
                main: listener,
                ops: None,
                api: None,
            },
            state.clone(),
            async {
                let _ = rx.await;
            },
            server::Hangups::catch(),
        ));
        TestApp {
            addr,
            state,
            client: client(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POST raw bytes with extra headers; returns status, headers and JSON body (Null if not JSON).
    pub async fn post(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json; charset=utf-8")
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        Reply::from(
            self.client
                .get(self.url(path))
                .send()
                .await
                .expect("request"),
        )
        .await
    }

    /// Shut down gracefully and wait for the server to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        // As `serve` does: the file is closed before the next server opens it.
        self.state.store().close().await;
        // Every test that stops a server also checks what was logged since the last check.
        assert_no_secrets_in_new_logs("the in-process servers");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub json: serde_json::Value,
}

impl Reply {
    pub async fn from(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Reply {
            status,
            headers,
            text,
            json,
        }
    }

    /// The error code of an error body, or "".
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

/// The proxy variables a child process must not inherit: every request the tests make goes to
/// 127.0.0.1 directly.
pub const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// A command running the binary under test, with no proxy from the environment ([`PROXY_VARS`]).
pub fn lark_ticketd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lark-ticketd"));
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// The real binary running `serve`, its stderr collected line by line.
pub struct Child {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub logs: Arc<Mutex<String>>,
    /// Ends when the child's stderr closes, i.e. when it has exited.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Child {
    /// Start `lark-ticketd serve --config <path>` and wait until it says where it listens.
    pub fn serve(config_path: &Path) -> Child {
        let mut child = lark_ticketd()
            .args(["serve", "--config"])
            .arg(config_path)
            .env("LARK_TICKETD_LOG", "trace")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lark-ticketd");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&logs);
        let reader = std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut logs = sink.lock().unwrap();
                    logs.push_str(&line);
                    logs.push('\n');
                }
                // Only after the line is in `logs`, so readers of the logs find it.
                if let Some(addr) = listen_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "lark-ticketd did not start; it logged:\n{}",
                    logs.lock().unwrap()
                )
            });
        Child {
            child,
            addr,
            logs,
            reader: Some(reader),
        }
    }

    /// Wait for the reader to see the end of stderr, then return everything logged.
    fn drain_logs(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let logs = self.logs.lock().unwrap().clone();
        logs
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Where the ops listener is, if the config has one.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.logged_addr("ops_listen")
    }

    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.logged_addr("api_listen")
    }

    /// A listener's address from the start-up log line (`key`: `ops_listen`, `api_listen`).
    fn logged_addr(&self, key: &str) -> Option<SocketAddr> {
        let logs = self.logs.lock().unwrap();
        logs.lines().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "lark-ticketd serving")
                .then(|| v[key].as_str()?.parse().ok())
                .flatten()
        })
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.drain_logs()
    }

    /// SIGTERM, then wait for exit; returns the exit status and the logs.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        (exit, self.drain_logs())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listen_addr(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["message"] != "lark-ticketd serving" {
        return None;
    }
    v["listen"].as_str()?.parse().ok()
}

/// A temp dir with a config file for the child-process tests.
pub struct TempConfig {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TempConfig {
    /// Write `body` (apps etc.) with an embedded store in the temp dir and listen on port 0.
    pub fn embedded(body: &str) -> TempConfig {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("store.db");
        let text = format!(
            "listen = \"127.0.0.1:0\"\n[store]\nkind = \"embedded\"\npath = {}\n{body}",
            toml_str(db.to_str().unwrap())
        );
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        TempConfig { dir, path }
    }

    /// Write `body` with this `[store]` table in the temp dir and listen on port 0.
    pub fn with_store(store: &str, body: &str) -> TempConfig {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("listen = \"127.0.0.1:0\"\n{store}{body}");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        TempConfig { dir, path }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("store.db")
    }
}

/// The bearer key of the `orders` client in every [`Stack`] (tokens scope, all apps).
pub const BEARER: &str = "test-bearer-key-orders";
/// A key with only the `status` scope.
pub const STATUS_BEARER: &str = "test-bearer-key-status";
/// A key allowed the tokens scope on `cli_second` only.
pub const SECOND_APP_BEARER: &str = "test-bearer-key-second";
/// A key with only the `login` scope (all apps).
pub const LOGIN_BEARER: &str = "test-bearer-key-login";
/// Consumer secrets of the hand-off tests: 24 and 32 bytes, base64.
pub const CONSUMER_SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const CONSUMER_SECRET_B: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
/// A key with the admin and status scopes.
pub const ADMIN_BEARER: &str = "test-bearer-key-admin";
/// The password of the Redis servers the Redis tests start (in their store URLs).
pub const REDIS_PASSWORD: &str = "redis-pw-Xq7v2Lk9Tc";

/// How to build a [`Stack`].
#[derive(Default)]
pub struct StackOptions {
    /// Extra config tables (`[tokens]`, `[tickets]`, `[store]` …).
    pub config: String,
    /// A clock shared by the service and the fake platform.
    pub clock: Option<Arc<lark_ticketd::clock::ManualClock>>,
    /// The fake platform does not push after a resend request.
    pub no_push_on_resend: bool,
    /// The fake platform knows a different app secret than the service.
    pub wrong_secret: bool,
    /// Lifetime of the tokens the fake platform issues (default: Feishu's 2 hours).
    pub token_ttl: Option<Duration>,
}

/// The service and a fake Open Platform, each on port 0, wired to each other.
pub struct Stack {
    pub mock: lark_ticketd::mock_feishu::MockFeishu,
    pub app: TestApp,
    pub config: String,
    clock: SharedClock,
}

impl Stack {
    pub async fn start(options: StackOptions) -> Stack {
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock_url = format!("http://{}", mock_listener.local_addr().unwrap());
        let clock: SharedClock = match options.clock {
            Some(c) => c,
            None => clock::system(),
        };
        let config = format!(
            "{}\n{}{}{}\
             [[clients]]\nname = \"orders\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"tokens\"]\n\
             [[clients]]\nname = \"dashboards\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"status\"]\n\
             [[clients]]\nname = \"second\"\nkey_sha256 = \"{}\"\napps = [\"cli_second\"]\nscopes = [\"tokens\"]\n\
             [[clients]]\nname = \"operators\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"status\", \"admin\"]\n\
             [[clients]]\nname = \"login-service\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"login\"]\n",
            options.config,
            app_toml_at(APP_ID, Some(KEY), TOKEN, &mock_url),
            app_toml_at("cli_second", Some("second-key"), "second-token", &mock_url),
            custom_app_toml(CUSTOM_APP_ID, &mock_url),
            lark_ticketd::auth::key_sha256_hex(BEARER),
            lark_ticketd::auth::key_sha256_hex(STATUS_BEARER),
            lark_ticketd::auth::key_sha256_hex(SECOND_APP_BEARER),
            lark_ticketd::auth::key_sha256_hex(ADMIN_BEARER),
            lark_ticketd::auth::key_sha256_hex(LOGIN_BEARER),
        );
        let parsed = Config::parse(&config, &|_| None).expect("stack config");
        let mut mock_options =
            lark_ticketd::mock_feishu::MockOptions::from_config(&parsed, Arc::clone(&clock));
        mock_options.events_url = Some(format!(
            "http://{}/events/{{app_id}}",
            service.local_addr().unwrap()
        ));
        mock_options.push_on_resend = !options.no_push_on_resend;
        if let Some(ttl) = options.token_ttl {
            mock_options.token_ttl = ttl;
        }
        if options.wrong_secret {
            for app in &mut mock_options.apps {
                app.app_secret = lark_ticketd::secret::Secret::new("a-different-secret");
            }
        }
        let mock =
            lark_ticketd::mock_feishu::MockFeishu::start(mock_listener, mock_options).unwrap();
        let app = TestApp::spawn_on(service, &config, Arc::clone(&clock)).await;
        Stack {
            mock,
            app,
            config,
            clock,
        }
    }

    /// Stop the service and start it again on the same config (same store file if embedded).
    pub async fn restart(self) -> Stack {
        let Stack {
            mock,
            app,
            config,
            clock,
        } = self;
        app.stop().await;
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TestApp::spawn_on(service, &config, Arc::clone(&clock)).await;
        Stack {
            mock,
            app,
            config,
            clock,
        }
    }

    /// GET with the orders key.
    pub async fn get(&self, path: &str) -> Reply {
        self.get_as(path, Some(BEARER)).await
    }

    pub async fn get_as(&self, path: &str, bearer: Option<&str>) -> Reply {
        let mut req = self.app.client.get(self.app.url(path));
        if let Some(key) = bearer {
            req = req.bearer_auth(key);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    /// POST JSON with the orders key.
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> Reply {
        self.post_json_as(path, body, BEARER).await
    }

    pub async fn post_json_as(&self, path: &str, body: serde_json::Value, bearer: &str) -> Reply {
        let req = self
            .app
            .client
            .post(self.app.url(path))
            .bearer_auth(bearer)
            .json(&body);
        Reply::from(req.send().await.expect("request")).await
    }

    /// A stack on a hand-moved clock whose ticket has arrived.
    pub async fn with_clock(clock: &Arc<lark_ticketd::clock::ManualClock>, config: &str) -> Stack {
        let stack = Stack::start(StackOptions {
            clock: Some(Arc::clone(clock)),
            config: config.to_string(),
            ..Default::default()
        })
        .await;
        stack.wait_for_ticket(APP_ID).await;
        stack
    }

    /// The stored ticket of `app_id` (there must be one).
    pub async fn stored_ticket(&self, app_id: &str) -> lark_ticketd::store::TicketRecord {
        let ticket = self.app.state.store().ticket(app_id).await.unwrap();
        ticket.expect("a stored ticket")
    }

    /// Wait until a ticket for `app_id` is stored (the start-up resend's push).
    pub async fn wait_for_ticket(&self, app_id: &str) {
        let mut signal = self.app.state.broker().ticket_watch(app_id).unwrap();
        let store = self.app.state.store();
        tokio::time::timeout(Duration::from_secs(10), async {
            while store.ticket(app_id).await.unwrap().is_none() {
                signal.changed().await.unwrap();
            }
        })
        .await
        .expect("a ticket should arrive");
    }

    pub async fn stop(self) {
        self.app.stop().await;
    }
}

/// Poll `condition` until it holds (for state that has no signal to await), at most 10 s.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The two kinds of app, for tests that must hold for both (`for_each_kind!`): the store app
/// [`APP_ID`] and the custom app [`CUSTOM_APP_ID`] of every [`Stack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Store,
    Custom,
}

impl Kind {
    pub fn app_id(self) -> &'static str {
        match self {
            Kind::Store => APP_ID,
            Kind::Custom => CUSTOM_APP_ID,
        }
    }

    pub fn app_path(self) -> String {
        format!("/v1/apps/{}/app_access_token", self.app_id())
    }

    /// A tenant token's path: the store app's for `tenant`, the custom app's own (one tenant,
    /// so `tenant` is not used).
    pub fn tenant_path(self, tenant: &str) -> String {
        match self {
            Kind::Store => format!("/v1/apps/{APP_ID}/tenants/{tenant}/tenant_access_token"),
            Kind::Custom => format!("/v1/apps/{CUSTOM_APP_ID}/tenant_access_token"),
        }
    }

    pub fn app_key(self) -> lark_ticketd::tokens::TokenKey {
        lark_ticketd::tokens::TokenKey::App(self.app_id().into())
    }

    pub fn tenant_key(self, tenant: &str) -> lark_ticketd::tokens::TokenKey {
        use lark_ticketd::tokens::TokenKey;
        match self {
            Kind::Store => TokenKey::Tenant(APP_ID.into(), tenant.into()),
            Kind::Custom => TokenKey::OwnTenant(CUSTOM_APP_ID.into()),
        }
    }

    /// The mock endpoint that issues this kind's app tokens.
    pub fn app_endpoint(self) -> lark_ticketd::mock_feishu::Endpoint {
        use lark_ticketd::mock_feishu::Endpoint;
        match self {
            Kind::Store => Endpoint::AppAccessToken,
            Kind::Custom => Endpoint::AppAccessTokenInternal,
        }
    }

    /// The mock endpoint that issues this kind's tenant tokens.
    pub fn tenant_endpoint(self) -> lark_ticketd::mock_feishu::Endpoint {
        use lark_ticketd::mock_feishu::Endpoint;
        match self {
            Kind::Store => Endpoint::TenantAccessToken,
            Kind::Custom => Endpoint::TenantAccessTokenInternal,
        }
    }

    /// App-token calls a cold tenant token costs: the store app fetches its app token first.
    pub fn app_calls_per_cold_tenant_token(self) -> u64 {
        match self {
            Kind::Store => 1,
            Kind::Custom => 0,
        }
    }

    /// Make the app able to get tokens where the stack does not (a store app whose start-up
    /// resend was refused needs a ticket pushed; a custom app needs nothing).
    pub async fn provide_ticket(self, stack: &Stack) {
        if self == Kind::Store {
            assert_eq!(stack.mock.push_ticket(APP_ID).await.unwrap(), 200);
        }
    }
}

/// One `#[tokio::test]` per kind of app, `store_app` and `custom_app`, for a test written as
/// `async fn name(kind: Kind)`: the same behaviour, asserted for both (issue 11).
macro_rules! for_each_kind {
    ($($test:ident),+ $(,)?) => {
        $(
            mod $test {
                #[tokio::test]
                async fn store_app() {
                    super::$test(crate::util::Kind::Store).await
                }
                #[tokio::test]
                async fn custom_app() {
                    super::$test(crate::util::Kind::Custom).await
                }
            }
        )+
    };
}

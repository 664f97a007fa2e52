//! `store.kind = "redis"` end to end: the real binary (`serve`) on a real `redis-server` that the
//! test starts itself on a free port (`lark_ticketd::store::testing`), and an in-process fake
//! Open Platform. Redis is killed and restarted under the running service, which must answer
//! `503` while it is gone, keep serving the tokens it holds, and recover by itself.
//!
//! Without `redis-server` these tests fail under `CI=true` and print a loud notice elsewhere.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use lark_ticketd::config::{Config, StoreConfig, StoreKind};
use lark_ticketd::mock_feishu::{Endpoint, MockFeishu, MockOptions};
use lark_ticketd::push;
use lark_ticketd::secret::Secret;
use lark_ticketd::store::testing::{free_port, RedisCluster, RedisServer, TlsFiles};
use lark_ticketd::store::Store;

use crate::handoff::{consumer_toml, event_v2, refused_port, Consumer};
use crate::intake::{now_us, ticket_push};
use crate::util::{
    app_toml_at, assert_no_secrets, client, toml_str, Child, Reply, APP_ID, BEARER,
    CONSUMER_SECRET_A, KEY, NO_UPSTREAM, REDIS_PASSWORD, STATUS_BEARER, TOKEN,
};

/// A config for one replica listening on `port`, on `redis`, against the fake platform.
fn replica_config(port: u16, redis: &RedisServer, mock_url: &str, key_prefix: &str) -> String {
    replica_config_at(port, &redis.url(), mock_url, key_prefix)
}

/// [`replica_config`] with the store at `url`.
fn replica_config_at(port: u16, url: &str, mock_url: &str, key_prefix: &str) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\n\
         [store]\nkind = \"redis\"\nurl = {}\nkey_prefix = {}\n\
         {}\
         [[clients]]\nname = \"orders\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"tokens\"]\n\
         [[clients]]\nname = \"dashboards\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"status\"]\n",
        toml_str(url),
        toml_str(key_prefix),
        app_toml_at(APP_ID, Some(KEY), TOKEN, mock_url),
        lark_ticketd::auth::key_sha256_hex(BEARER),
        lark_ticketd::auth::key_sha256_hex(STATUS_BEARER),
    )
}

/// The fake platform, pushing tickets to the replica on `port` when the test says so (not on
/// resend requests: each test decides which ticket is where).
async fn mock_for(port: u16, redis: &RedisServer) -> MockFeishu {
    let config = replica_config(port, redis, "http://127.0.0.1:1", "unused");
    let parsed = Config::parse(&config, &|_| None).expect("config");
    let mut options = MockOptions::from_config(&parsed, lark_ticketd::clock::system());
    options.events_url = Some(format!("http://127.0.0.1:{port}/events/{{app_id}}"));
    options.push_on_resend = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    MockFeishu::start(listener, options).unwrap()
}

struct Replica {
    _dir: tempfile::TempDir,
    child: Child,
}

impl Replica {
    fn start(config: &str) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        let child = Child::serve(&path);
        Replica { _dir: dir, child }
    }

    async fn get(&self, path: &str, bearer: Option<&str>) -> Reply {
        let mut req = client().get(self.child.url(path));
        if let Some(key) = bearer {
            req = req.bearer_auth(key);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    async fn app_token(&self) -> Reply {
        self.get(&format!("/v1/apps/{APP_ID}/app_access_token"), Some(BEARER))
            .await
    }

    async fn push_ticket(&self, ticket: &str) -> Reply {
        self.send(ticket_push(APP_ID, KEY, TOKEN, ticket, now_us()))
            .await
    }

    /// Any event, sealed and signed as Feishu sends it.
    async fn push_event(&self, json: &str) -> Reply {
        let key = Secret::new(KEY);
        let seal = push::Seal {
            encrypt_key: Some(&key),
            sign: true,
        };
        self.send(push::seal(json, seal)).await
    }

    async fn send(&self, req: push::PushRequest) -> Reply {
        let url = self.child.url(&format!("/events/{APP_ID}"));
        let mut builder = client()
            .post(url)
            .header("content-type", "application/json; charset=utf-8")
            .body(req.body.clone());
        for (k, v) in &req.headers {
            builder = builder.header(*k, v.as_str());
        }
        Reply::from(builder.send().await.unwrap()).await
    }
}

/// A store handle of the test's own on the same Redis, to look at what the service wrote.
async fn inspect(redis: &RedisServer, key_prefix: &str) -> Store {
    let config = StoreConfig {
        kind: StoreKind::Redis,
        url: Some(Secret::new(redis.url())),
        key_prefix: key_prefix.to_string(),
        ..StoreConfig::default()
    };
    Store::open(&config).await.unwrap()
}

/// Poll an HTTP condition with a generous deadline (a loaded machine is slow, never this slow).
async fn until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_redis_rides_out_a_redis_outage_and_an_empty_restart() {
    let Some(builder) = RedisServer::builder("serve_on_redis_rides_out_a_redis_outage") else {
        return;
    };
    let mut redis = builder.password(REDIS_PASSWORD).launch();
    let port = free_port();
    let prefix = "it-outage";
    let mock = mock_for(port, &redis).await;
    let config = replica_config(port, &redis, &mock.base_url(), prefix);
    let replica = Replica::start(&config);
    let store = inspect(&redis, prefix).await;

    // A push lands in Redis, and a token is served.
    assert_eq!(mock.push_ticket(APP_ID).await, Ok(200));
    let stored = store
        .ticket(APP_ID)
        .await
        .unwrap()
        .expect("the ticket is in Redis");
    assert!(stored.ticket.expose().starts_with("ticket-"));
    let token = replica.app_token().await;
    assert_eq!(token.status, 200, "{}", token.text);
    let cached = token.json["app_access_token"].as_str().unwrap().to_string();
    // The broker writes tokens to the store behind the answer.
    let (s, c) = (&store, cached.as_str());
    until("the token is in Redis", || async move {
        let stored = s.token(&format!("app/{APP_ID}")).await.unwrap();
        stored.is_some_and(|t| t.token.expose() == c)
    })
    .await;
    let apps = replica.get("/v1/apps", Some(STATUS_BEARER)).await;
    assert_eq!(apps.json["store"]["kind"], "redis", "{}", apps.text);
    assert_eq!(apps.json["store"]["on_disk"], false, "{}", apps.text);

    // Redis gone: intake refuses (Feishu retries), readiness fails, the cached token is served.
    redis.kill();
    let refused = replica.push_ticket("tkt-secret-redis-down").await;
    assert_eq!(
        (refused.status, refused.code()),
        (503, "store_unavailable"),
        "{}",
        refused.text
    );
    let ready = replica.get("/readyz", None).await;
    assert_eq!((ready.status, ready.code()), (503, "store_unavailable"));
    let served = replica.app_token().await;
    assert_eq!(served.status, 200, "{}", served.text);
    assert_eq!(served.json["app_access_token"], cached.as_str());
    assert_eq!(mock.calls(Endpoint::AppAccessToken), 1);

    // Back on the same port, empty: no restart of the service.
    redis.restart();
    let r = &replica;
    until("ready again", || async move {
        r.get("/readyz", None).await.status == 200
    })
    .await;
    let accepted = replica.push_ticket("tkt-secret-redis-back").await;
    assert_eq!(accepted.status, 200, "{}", accepted.text);
    assert_eq!(
        store.ticket(APP_ID).await.unwrap().unwrap().ticket.expose(),
        "tkt-secret-redis-back"
    );
    until("the service reports the data loss", || async move {
        let apps = r.get("/v1/apps", Some(STATUS_BEARER)).await;
        apps.json["store"]["data_lost_at"].is_u64()
    })
    .await;
    let served = replica.app_token().await;
    assert_eq!(served.status, 200, "{}", served.text);

    let (_, logs) = replica.child.terminate();
    assert!(logs.contains("without its data"), "{logs}");
    assert!(
        !logs.contains(REDIS_PASSWORD),
        "the Redis password was logged"
    );
    assert_no_secrets(&logs, "lark-ticketd serve on redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_pushed_to_one_replica_serves_tokens_on_another() {
    let Some(redis) = RedisServer::start("a_ticket_pushed_to_one_replica") else {
        return;
    };
    let (port_a, port_b) = (free_port(), free_port());
    let prefix = "it-two";
    // The platform pushes to A only.
    let mock = mock_for(port_a, &redis).await;
    let a = Replica::start(&replica_config(port_a, &redis, &mock.base_url(), prefix));
    let b = Replica::start(&replica_config(port_b, &redis, &mock.base_url(), prefix));
    assert_eq!(mock.push_ticket(APP_ID).await, Ok(200));
    let stored = inspect(&redis, prefix).await.ticket(APP_ID).await.unwrap();
    let fingerprint = stored.expect("the ticket is in Redis").ticket.fingerprint();
    // B never saw the push: it reads the ticket from Redis.
    let on_b = b
        .get(&format!("/v1/apps/{APP_ID}"), Some(STATUS_BEARER))
        .await;
    assert_eq!(on_b.json["ticket"]["state"], "fresh", "{}", on_b.text);
    assert_eq!(on_b.json["ticket"]["fingerprint"], fingerprint.as_str());
    let token = b.app_token().await;
    assert_eq!(token.status, 200, "{}", token.text);
    let logs = [a.child.kill(), b.child.kill()].concat();
    assert_no_secrets(&logs, "two replicas on redis");
}

/// Kill -9 a Redis that fsyncs every write, right after a `200` for a ticket and one for a queued
/// event: after Redis restarts both are there, and the event is delivered — without restarting
/// the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_redis_right_after_200s_loses_neither_ticket_nor_event() {
    let Some(builder) = RedisServer::builder("kill_9_of_redis_right_after_200s") else {
        return;
    };
    let mut redis = builder.persistent().password(REDIS_PASSWORD).launch();
    let consumer_port = refused_port().await;
    let prefix = "it-kill9";
    // Quick retries, many of them: the consumer is down at first.
    let schedule = format!("[{}]", vec!["\"100ms\""; 600].join(", "));
    let config = format!(
        "{}[forwarding]\nretry_schedule = {schedule}\ndelivery_timeout = \"1s\"\n{}",
        replica_config(free_port(), &redis, NO_UPSTREAM, prefix),
        consumer_toml(
            "bot",
            &format!("http://127.0.0.1:{consumer_port}/feishu"),
            CONSUMER_SECRET_A,
            "[\"*\"]"
        ),
    );
    let replica = Replica::start(&config);
    let ticket = replica.push_ticket("tkt-secret-kill9").await;
    assert_eq!(ticket.status, 200, "{}", ticket.text);
    let event = replica
        .push_event(&event_v2("ev-redis-kill9", "im.message.receive_v1"))
        .await;
    assert_eq!(event.status, 200, "{}", event.text);
    redis.kill();
    redis.restart();

    let consumer = Consumer::start_on(consumer_port).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !consumer
        .received()
        .iter()
        .any(|r| r.header("webhook-id") == "ev-redis-kill9")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = inspect(&redis, prefix).await.ticket(APP_ID).await.unwrap();
    assert_eq!(stored.unwrap().ticket.expose(), "tkt-secret-kill9");
    let (_, logs) = replica.child.terminate();
    assert_no_secrets(&logs, "lark-ticketd serve on a killed redis");
}

/// A replica that cannot reach Redis at start exits with the store's exit code and one line
/// that names the problem, never the password (its supervisor starts it again).
#[test]
fn serve_exits_74_when_redis_is_unreachable_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/0", free_port());
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[store]\nkind = \"redis\"\nurl = {}\n{}",
        toml_str(&url),
        app_toml_at(APP_ID, Some(KEY), TOKEN, NO_UPSTREAM)
    );
    std::fs::write(&path, config).unwrap();
    let out = crate::util::lark_ticketd()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(stderr.contains("cannot open the store: redis"), "{stderr}");
    assert!(!stderr.contains(REDIS_PASSWORD), "{stderr}");
}

/// The compose file's config is one the service accepts, with the Redis settings the docs ask
/// for.
#[test]
fn the_compose_deployment_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let text = std::fs::read_to_string(dir.join("lark-ticketd.redis.toml")).unwrap();
    let config = Config::parse(&text, &|name| Some(format!("value-of-{name}"))).unwrap();
    assert_eq!(config.store.kind, StoreKind::Redis);
    assert_eq!(
        config.store.url.unwrap().expose(),
        "redis://:value-of-LARK_REDIS_PASSWORD@redis:6379/0"
    );
    let compose = std::fs::read_to_string(dir.join("docker-compose.redis.yml")).unwrap();
    for needed in [
        "lark-ticketd.redis.toml",
        "--appendonly",
        "--appendfsync\n      - always",
        "--maxmemory-policy\n      - noeviction",
        "replica-a:",
        "replica-b:",
    ] {
        assert!(compose.contains(needed), "{needed}");
    }
}

/// A TCP relay between one replica and Redis: a network link the test controls. Once armed,
/// the first write of the replica that carries an issued app token (the token write) and
/// everything after it on that connection is held — Redis gets it late, as from a replica that
/// stalled or sat behind a slow link — until [`Relay::release`]. Redis's answers to what was
/// held are kept for the test.
struct Relay {
    addr: std::net::SocketAddr,
    shared: Arc<RelayShared>,
    task: tokio::task::JoinHandle<()>,
}

struct RelayShared {
    armed: AtomicBool,
    /// Idle → holding → released.
    state: watch::Sender<HoldState>,
    /// The write that set off the hold.
    held: Mutex<Vec<u8>>,
    /// What Redis answered on the held connection after the release.
    answers: Mutex<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldState {
    Idle,
    Holding,
    Released,
}

impl Relay {
    async fn start(redis: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(RelayShared {
            armed: AtomicBool::new(false),
            state: watch::channel(HoldState::Idle).0,
            held: Mutex::default(),
            answers: Mutex::default(),
        });
        let relay_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, redis, Arc::clone(&relay_shared)));
            }
        });
        Relay { addr, shared, task }
    }

    /// The store URL of a replica that reaches Redis through this relay.
    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Hold the next token write (and what follows it on its connection).
    fn arm(&self) {
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// Wait until a token write is held; returns the token it carries.
    async fn holding(&self) -> String {
        let mut state = self.shared.state.subscribe();
        tokio::time::timeout(
            Duration::from_secs(20),
            state.wait_for(|s| *s == HoldState::Holding),
        )
        .await
        .expect("no token write reached the relay")
        .unwrap();
        let held = self.shared.held.lock().unwrap();
        app_token_in(&held).expect("the held write carries the token")
    }

    /// Let the held bytes go on to Redis.
    fn release(&self) {
        self.shared.state.send_replace(HoldState::Released);
    }

    /// Redis's answer to the held token write, once it has come (RESP, e.g. `:0`).
    async fn answer_to_held_write(&self) -> String {
        let held = self.shared.held.lock().unwrap().clone();
        let token_at = app_token_at(&held).expect("the token in the held write");
        // Commands wholly before the token's in the held write are answered first.
        let mut before = 0;
        let mut at = 0;
        while let Some(end) = resp_end(&held, at) {
            if end > token_at {
                break;
            }
            before += 1;
            at = end;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            {
                let answers = self.shared.answers.lock().unwrap();
                let mut at = 0;
                for i in 0..=before {
                    let Some(end) = resp_end(&answers, at) else {
                        break;
                    };
                    if i == before {
                        return String::from_utf8_lossy(&answers[at..end])
                            .trim()
                            .to_string();
                    }
                    at = end;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Redis never answered the held write"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.release();
    }
}

/// One replica connection through the relay.
async fn relay(
    client: tokio::net::TcpStream,
    redis: std::net::SocketAddr,
    shared: Arc<RelayShared>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(upstream) = tokio::net::TcpStream::connect(redis).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_redis, mut to_redis) = upstream.into_split();
    let held_here = Arc::new(AtomicBool::new(false));
    let up = {
        let (shared, held_here) = (Arc::clone(&shared), Arc::clone(&held_here));
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                if app_token_in(chunk).is_some()
                    && shared
                        .armed
                        .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    *shared.held.lock().unwrap() = chunk.to_vec();
                    held_here.store(true, Ordering::SeqCst);
                    shared.state.send_replace(HoldState::Holding);
                    let mut state = shared.state.subscribe();
                    let _ = state.wait_for(|s| *s == HoldState::Released).await;
                }
                if to_redis.write_all(chunk).await.is_err() {
                    break;
                }
            }
            let _ = to_redis.shutdown().await;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_redis.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if held_here.load(Ordering::SeqCst) && *shared.state.borrow() == HoldState::Released {
                shared.answers.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            // The replica may have hung up meanwhile: keep reading Redis's answers all the same.
            let _ = to_client.write_all(&buf[..n]).await;
        }
    };
    tokio::join!(up, down);
}

/// Where an app token mock-feishu issues (`a-` + 40 hex digits) starts in `bytes`.
fn app_token_at(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len().saturating_sub(41)).find(|&i| {
        bytes[i..].starts_with(b"a-")
            && bytes[i + 2..i + 42].iter().all(u8::is_ascii_hexdigit)
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric())
    })
}

fn app_token_in(bytes: &[u8]) -> Option<String> {
    let at = app_token_at(bytes)?;
    Some(String::from_utf8_lossy(&bytes[at..at + 42]).into_owned())
}

/// The end of the RESP value that starts at `at` (a command, or an answer), if it is whole.
fn resp_end(buf: &[u8], at: usize) -> Option<usize> {
    let line_end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[at + 1..line_end]).ok()?;
    let after = line_end + 2;
    match buf[at] {
        b'+' | b'-' | b':' => Some(after),
        b'$' => match line.parse::<i64>().ok()? {
            n if n < 0 => Some(after),
            n => (buf.len() >= after + n as usize + 2).then_some(after + n as usize + 2),
        },
        b'*' => {
            let mut end = after;
            for _ in 0..line.parse::<i64>().ok()?.max(0) {
                end = resp_end(buf, end)?;
            }
            Some(end)
        }
        _ => None,
    }
}

/// Issue 10: "a slow replica's stale write does not replace a newer token". Replica S reaches
/// Redis through a [`Relay`]: S fetches token X under the fleet's lease, and its write of X is
/// held on the way to Redis, longer than the lease lives (S gives up on the write and serves X
/// from memory, as a replica does when the store does not answer). Feishu then issues a newer
/// token Y (X revoked), which replica F fetches once the lease has expired and stores. Only then
/// does S's write of X reach Redis: the fenced write keeps Y (Redis answers 0), the store holds Y,
/// and both replicas serve Y.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replicas_stale_token_write_does_not_replace_a_newer_token() {
    let Some(redis) = RedisServer::start("a_slow_replicas_stale_token_write") else {
        return;
    };
    let relay = Relay::start(redis.addr()).await;
    let (port_s, port_f) = (free_port(), free_port());
    let prefix = "it-stale";
    let mock = mock_for(port_f, &redis).await;
    // One attempt of at most 1 s: the fetch lease lives 2 s, as long as one Redis command may
    // take, so S's held write outlasts S's lease.
    let tokens = "[tokens]\nupstream_timeout = \"1s\"\nupstream_retries = 0\n";
    let slow = Replica::start(&format!(
        "{}{tokens}",
        replica_config_at(port_s, &relay.url(), &mock.base_url(), prefix)
    ));
    let fast = Replica::start(&format!(
        "{}{tokens}",
        replica_config(port_f, &redis, &mock.base_url(), prefix)
    ));
    assert_eq!(mock.push_ticket(APP_ID).await, Ok(200));
    let s = &slow;
    until("S has the ticket pushed to F", || async move {
        let status = s
            .get(&format!("/v1/apps/{APP_ID}"), Some(STATUS_BEARER))
            .await;
        status.json["ticket"]["state"] == "fresh"
    })
    .await;
    let store = inspect(&redis, prefix).await;
    let key = format!("app/{APP_ID}");

    // S fetches X; its write of X is held on the way to Redis.
    relay.arm();
    let url = slow
        .child
        .url(&format!("/v1/apps/{APP_ID}/app_access_token"));
    let on_slow = tokio::spawn(async move {
        let req = client().get(url).bearer_auth(BEARER);
        Reply::from(req.send().await.unwrap()).await
    });
    let x = relay.holding().await;
    // S gives up on the write (and then on giving the lease back): its caller gets X.
    let served = on_slow.await.unwrap();
    assert_eq!(served.status, 200, "{}", served.text);
    assert_eq!(served.json["app_access_token"], x.as_str());
    assert!(slow
        .child
        .logs
        .lock()
        .unwrap()
        .contains("cannot write a token to the store"));
    assert_eq!(
        store.token(&key).await.unwrap(),
        None,
        "X reached Redis early"
    );

    // Feishu issues a newer token; F fetches it under the expired lease and stores it.
    mock.revoke(&x);
    let on_fast = fast.app_token().await;
    assert_eq!(on_fast.status, 200, "{}", on_fast.text);
    let y = on_fast.json["app_access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(y, x);
    let newer = store.token(&key).await.unwrap().expect("F stored Y");
    assert_eq!(newer.token.expose(), y);

    // Now S's stale write reaches Redis: refused by the fence.
    relay.release();
    assert_eq!(
        relay.answer_to_held_write().await,
        ":0",
        "the stale write was stored"
    );
    let kept = store.token(&key).await.unwrap().expect("a stored token");
    assert_eq!(
        (kept.token.expose(), kept.expires_at_ms),
        (y.as_str(), newer.expires_at_ms)
    );
    // Both replicas serve Y: S drops X when it hears of the newer token.
    let newest = y.as_str();
    until("S serves the newer token", || async move {
        s.app_token().await.json["app_access_token"] == newest
    })
    .await;
    assert_eq!(fast.app_token().await.json["app_access_token"], y.as_str());
    assert_eq!(mock.calls(Endpoint::AppAccessToken), 2, "X by S, Y by F");
    let logs = [slow.child.kill(), fast.child.kill()].concat();
    assert_no_secrets(&logs, "two replicas, one behind a slow link");
}

/// A CA, and a certificate for 127.0.0.1 that it signed, written to `dir` (PEM): what a
/// `redis-server --tls-port` needs, and the CA file a replica trusts.
fn tls_files(dir: &std::path::Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "lark-ticketd test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut server = CertificateParams::new(Vec::<String>::new()).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "redis-server");
    server.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: dir.join("ca.pem"),
    };
    std::fs::write(&files.cert, server_cert.pem()).unwrap();
    std::fs::write(&files.key, server_key.serialize_pem()).unwrap();
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    files
}

/// `lark-ticketd serve` on this `[store]` table: it must exit 74 (the store cannot be opened)
/// with one line that names the problem and never the password. Returns its stderr.
fn serve_refuses_the_store(store: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[store]\nkind = \"redis\"\n{store}{}",
        app_toml_at(APP_ID, Some(KEY), TOKEN, NO_UPSTREAM)
    );
    std::fs::write(&path, config).unwrap();
    let out = crate::util::lark_ticketd()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(stderr.contains("cannot open the store: redis"), "{stderr}");
    assert!(!stderr.contains(REDIS_PASSWORD), "{stderr}");
    stderr
}

/// `rediss://`: a replica trusting the server's CA through `store.tls_ca_file` takes pushes
/// and serves tokens over TLS. Without that CA, with the certificate made out to another name,
/// or speaking plain TCP to the TLS port, it refuses to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_redis_over_tls_trusts_the_ca_file_and_nothing_else() {
    let certs = tempfile::tempdir().unwrap();
    let files = tls_files(certs.path());
    let Some(builder) = RedisServer::builder("serve_on_redis_over_tls") else {
        return;
    };
    let redis = builder.password(REDIS_PASSWORD).tls(files.clone()).launch();
    let tls_url = redis.tls_url().unwrap();
    let ca = toml_str(files.ca.to_str().unwrap());
    let port = free_port();
    let prefix = "it-tls";
    let mock = mock_for(port, &redis).await;
    let config = replica_config_at(port, &tls_url, &mock.base_url(), prefix).replacen(
        "[store]\n",
        &format!("[store]\ntls_ca_file = {ca}\n"),
        1,
    );
    let replica = Replica::start(&config);
    assert_eq!(mock.push_ticket(APP_ID).await, Ok(200));
    let stored = inspect(&redis, prefix).await.ticket(APP_ID).await.unwrap();
    assert!(stored
        .expect("the ticket went to Redis over TLS")
        .ticket
        .expose()
        .starts_with("ticket-"));
    let token = replica.app_token().await;
    assert_eq!(token.status, 200, "{}", token.text);
    let ready = replica.get("/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    let (_, logs) = replica.child.terminate();
    assert_no_secrets(&logs, "lark-ticketd serve on rediss://");

    // The server's CA not trusted: the built-in roots do not know it.
    let url = toml_str(&tls_url);
    let untrusted = serve_refuses_the_store(&format!("url = {url}\n"));
    assert!(
        untrusted.contains("invalid peer certificate: UnknownIssuer"),
        "{untrusted}"
    );
    // A certificate made out to 127.0.0.1, reached as localhost.
    let elsewhere = toml_str(&tls_url.replace("127.0.0.1", "localhost"));
    let wrong_name = serve_refuses_the_store(&format!("url = {elsewhere}\ntls_ca_file = {ca}\n"));
    assert!(
        wrong_name.contains("not valid for name \"localhost\""),
        "{wrong_name}"
    );
    // Plain TCP to the TLS port, and TLS to the plain port.
    let plain = toml_str(&tls_url.replacen("rediss://", "redis://", 1));
    let plain_to_tls = serve_refuses_the_store(&format!("url = {plain}\n"));
    assert!(
        plain_to_tls.contains("if the server speaks TLS on this port, the URL must be rediss://"),
        "{plain_to_tls}"
    );
    let to_plain = toml_str(&redis.url().replacen("redis://", "rediss://", 1));
    let tls_to_plain = serve_refuses_the_store(&format!("url = {to_plain}\ntls_ca_file = {ca}\n"));
    assert!(
        tls_to_plain
            .contains("if the server speaks plain TCP on this port, the URL must be redis://"),
        "{tls_to_plain}"
    );
    // A CA file that is not there.
    let missing = toml_str(certs.path().join("nope.pem").to_str().unwrap());
    let no_file = serve_refuses_the_store(&format!("url = {url}\ntls_ca_file = {missing}\n"));
    assert!(
        no_file.contains("cannot read store.tls_ca_file"),
        "{no_file}"
    );
    eprintln!("rediss:// refusals:\n{untrusted}{wrong_name}{plain_to_tls}{tls_to_plain}{no_file}");
}

/// `rediss://` to a Redis Cluster: the seed and every node it redirects to are reached over
/// TLS (each node answers a TLS client with its TLS port), trusting the CA file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_a_redis_cluster_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let files = tls_files(certs.path());
    let Some(cluster) = RedisCluster::start_tls("serve_on_a_redis_cluster_over_tls", files.clone())
    else {
        return;
    };
    let port = free_port();
    let prefix = "it-tls-cluster";
    let mock = mock_for(port, &cluster.nodes[0]).await;
    let ca = toml_str(files.ca.to_str().unwrap());
    let config = replica_config_at(port, &cluster.tls_url().unwrap(), &mock.base_url(), prefix)
        .replacen(
            "[store]\n",
            &format!("[store]\ncluster = true\ntls_ca_file = {ca}\n"),
            1,
        );
    let replica = Replica::start(&config);
    assert_eq!(mock.push_ticket(APP_ID).await, Ok(200));
    let token = replica.app_token().await;
    assert_eq!(token.status, 200, "{}", token.text);
    let ready = replica.get("/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    let apps = replica.get("/v1/apps", Some(STATUS_BEARER)).await;
    assert_eq!(
        apps.json["store"]["redis"]["cluster"], true,
        "{}",
        apps.text
    );
    // What it wrote is in the cluster (read here over the plain ports), on more than one node:
    // the replica followed the cluster's redirections over TLS.
    let plain = StoreConfig {
        kind: StoreKind::Redis,
        url: Some(Secret::new(cluster.url())),
        key_prefix: prefix.to_string(),
        cluster: true,
        ..StoreConfig::default()
    };
    let stored = Store::open(&plain)
        .await
        .unwrap()
        .ticket(APP_ID)
        .await
        .unwrap();
    assert!(stored.is_some(), "the ticket is in the cluster");
    let nodes_used = cluster
        .nodes
        .iter()
        .filter(|n| {
            !n.cli(&["--scan", "--pattern", &format!("{prefix}:*")])
                .is_empty()
        })
        .count();
    assert!(
        nodes_used >= 2,
        "the replica's keys are on {nodes_used} node(s)"
    );
    let (_, logs) = replica.child.terminate();
    assert_no_secrets(&logs, "lark-ticketd serve on a TLS cluster");
}

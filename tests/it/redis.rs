//! `store.kind = "redis"` end to end: the real binary (`serve`) on a real `redis-server` that the
//! test starts itself on a free port (`lark_ticketd::store::testing`), and an in-process fake
//! Open Platform. Redis is killed and restarted under the running service, which must answer
//! `503` while it is gone, keep serving the tokens it holds, and recover by itself.
//!
//! Without `redis-server` these tests fail under `CI=true` and print a loud notice elsewhere.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use lark_ticketd::config::{Config, StoreConfig, StoreKind};
use lark_ticketd::mock_feishu::{Endpoint, MockFeishu, MockOptions};
use lark_ticketd::push;
use lark_ticketd::secret::Secret;
use lark_ticketd::store::testing::{free_port, RedisServer};
use lark_ticketd::store::Store;

use crate::handoff::{consumer_toml, event_v2, refused_port, Consumer};
use crate::intake::{now_us, ticket_push};
use crate::util::{
    app_toml_at, assert_no_secrets, client, toml_str, Child, Reply, APP_ID, BEARER,
    CONSUMER_SECRET_A, KEY, NO_UPSTREAM, REDIS_PASSWORD, STATUS_BEARER, TOKEN,
};

/// A config for one replica listening on `port`, on `redis`, against the fake platform.
fn replica_config(port: u16, redis: &RedisServer, mock_url: &str, key_prefix: &str) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\n\
         [store]\nkind = \"redis\"\nurl = {}\nkey_prefix = {}\n\
         {}\
         [[clients]]\nname = \"orders\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"tokens\"]\n\
         [[clients]]\nname = \"dashboards\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"status\"]\n",
        toml_str(&redis.url()),
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

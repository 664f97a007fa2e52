//! Issue 12's rough edges: SIGHUP reloads `[[clients]]`, `[[consumers]]` and the apps' event
//! keys without a restart (and is never fatal), and key rotation accepts an app's previous
//! Encrypt Key / Verification Token until `previous_keys_until`.
//!
//! The SIGHUP tests run the real binary (a signal is process-wide) and await its log lines; the
//! overlap's end is tested in-process on a [`ManualClock`], never by waiting for wall time.

use std::sync::Arc;
use std::time::Duration;

use lark_ticketd::clock::{Clock, ManualClock, SystemClock};
use lark_ticketd::config::Config;
use lark_ticketd::push::{self, Seal};
use lark_ticketd::secret::Secret;

use crate::handoff::{consumer_toml, event_v2, refused_port, Consumer};
use crate::util::{
    app_toml, client, toml_str, Child, Reply, TempConfig, TestApp, APP_ID, APP_SECRET,
    CONSUMER_SECRET_A, KEY, NO_UPSTREAM, TOKEN,
};

/// The bearer keys a reload swaps.
const OLD_BEARER: &str = "test-bearer-key-before-reload";
const NEW_BEARER: &str = "test-bearer-key-after-reload";
/// An app's Encrypt Key and Verification Token before a rotation, and the new keys (all in the
/// leak grep, `util::secrets_used`).
pub const OLD_KEY: &str = "RotatedAwayEncryptKey00000000001";
pub const OLD_TOKEN: &str = "RotatedAwayVerificationToken0001";
pub const NEW_KEY: &str = "RotatedInEncryptKey0000000000001";
/// Every secret this module uses, for the leak grep.
pub const SECRETS: [&str; 5] = [OLD_KEY, OLD_TOKEN, NEW_KEY, OLD_BEARER, NEW_BEARER];

fn status_client(name: &str, bearer: &str, apps: &str) -> String {
    format!(
        "[[clients]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\napps = {apps}\nscopes = [\"status\"]\n",
        lark_ticketd::auth::key_sha256_hex(bearer)
    )
}

/// An `[[apps]]` table mid-rotation: `key`/`token` current, `previous` accepted until `until`.
fn rotating_app(key: &str, token: &str, previous: Option<(&str, &str)>, until: &str) -> String {
    let previous = previous
        .map(|(k, t)| {
            format!(
                "previous_encrypt_key = {}\nprevious_verification_token = {}\nprevious_keys_until = {}\n",
                toml_str(k),
                toml_str(t),
                toml_str(until)
            )
        })
        .unwrap_or_default();
    format!(
        "[[apps]]\napp_id = {}\napp_secret = {}\nencrypt_key = {}\nverification_token = {}\nbase_url = {}\n{previous}",
        toml_str(APP_ID),
        toml_str(APP_SECRET),
        toml_str(key),
        toml_str(token),
        toml_str(NO_UPSTREAM),
    )
}

/// Replace the body of a [`TempConfig`] written by [`TempConfig::embedded`].
fn rewrite(config: &TempConfig, body: &str) {
    let text = std::fs::read_to_string(&config.path).unwrap();
    let head_end = text.find("[[").unwrap_or(text.len());
    std::fs::write(&config.path, format!("{}{body}", &text[..head_end])).unwrap();
}

fn hangup(server: &Child) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The `message` of every JSON log line so far.
fn messages(server: &Child) -> Vec<String> {
    server
        .logs
        .lock()
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["message"].as_str().map(str::to_string))
        .collect()
}

/// Wait until the child has logged `count` lines whose message starts with `prefix`; fail at
/// once, with its logs, if it exits.
async fn logged(server: &mut Child, prefix: &str, count: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let lines: Vec<String> = messages(server)
            .into_iter()
            .filter(|m| m.starts_with(prefix))
            .collect();
        if lines.len() >= count {
            return lines;
        }
        if let Some(exit) = server.child.try_wait().unwrap() {
            panic!(
                "lark-ticketd exited ({exit}) instead of logging {prefix:?}:\n{}",
                server.logs.lock().unwrap()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {prefix:?} logged:\n{}",
            server.logs.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn status_as(server: &Child, bearer: &str) -> u16 {
    client()
        .get(server.url("/v1/apps"))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn metrics(url: String) -> String {
    Reply::from(client().get(url).send().await.unwrap())
        .await
        .text
}

#[tokio::test]
async fn sighup_swaps_the_bearer_keys_and_the_process_lives() {
    let config = TempConfig::embedded(&format!(
        "{}{}",
        app_toml(APP_ID, Some(KEY), TOKEN),
        status_client("before", OLD_BEARER, "[\"*\"]")
    ));
    let mut server = Child::serve(&config.path);
    // Answered: the server is past its start-up, SIGHUP handler included.
    assert_eq!(status_as(&server, OLD_BEARER).await, 200);
    assert_eq!(status_as(&server, NEW_BEARER).await, 401);

    rewrite(
        &config,
        &format!(
            "{}{}",
            app_toml(APP_ID, Some(KEY), TOKEN),
            status_client("after", NEW_BEARER, "[\"*\"]")
        ),
    );
    hangup(&server);
    logged(&mut server, "config reloaded", 1).await;
    assert!(server.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(status_as(&server, NEW_BEARER).await, 200);
    assert_eq!(status_as(&server, OLD_BEARER).await, 401);
    let metrics = metrics(server.url("/metrics")).await;
    assert!(
        metrics.contains("lark_ticketd_config_reloads_total{outcome=\"applied\"} 1"),
        "{metrics}"
    );
    let (status, logs) = server.terminate();
    assert!(status.success(), "{logs}");
    crate::util::assert_no_secrets(&logs, "lark-ticketd serve, reloading");
}

/// A SIGHUP that comes while the process is still starting (here: connecting to its Redis
/// store, which a fake accepts and then closes) is not fatal either: the process goes on to fail
/// as it would have (exit 74, the store), not by the signal. Old code: killed by SIGHUP.
#[test]
fn sighup_during_start_up_does_not_kill_the_process() {
    let store = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    store.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lark-ticketd.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\n[store]\nkind = \"redis\"\nurl = \"redis://{}\"\n{}",
            store.local_addr().unwrap(),
            app_toml(APP_ID, Some(KEY), TOKEN)
        ),
    )
    .unwrap();
    let mut server = crate::util::lark_ticketd()
        .args(["serve", "--config"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The process is in its start-up once it connects to the store.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let connection = loop {
        match store.accept() {
            Ok((connection, _)) => break connection,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(exit) = server.try_wait().unwrap() {
                    panic!("lark-ticketd exited ({exit}) before it connected to its store");
                }
                assert!(std::time::Instant::now() < deadline, "never connected");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    drop(connection);
    drop(store);
    let out = server.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{:?}\n{stderr}", out.status);
    assert!(stderr.contains("cannot open the store"), "{stderr}");
}

#[tokio::test]
async fn sighup_with_a_broken_config_keeps_the_running_one_and_names_the_key() {
    let good = format!(
        "{}{}",
        app_toml(APP_ID, Some(KEY), TOKEN),
        status_client("before", OLD_BEARER, "[\"*\"]")
    );
    let config = TempConfig::embedded(&good);
    let mut server = Child::serve(&config.path);
    assert_eq!(status_as(&server, OLD_BEARER).await, 200);

    // A client for an app that does not exist, and the new key it would bring.
    rewrite(
        &config,
        &format!(
            "{}{}",
            app_toml(APP_ID, Some(KEY), TOKEN),
            status_client("after", NEW_BEARER, "[\"cli_nobody\"]")
        ),
    );
    hangup(&server);
    let refused = logged(&mut server, "config reload refused", 1).await;
    assert!(refused[0].contains("clients[0].apps"), "{refused:?}");
    assert!(server.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(status_as(&server, OLD_BEARER).await, 200);
    assert_eq!(status_as(&server, NEW_BEARER).await, 401);

    // A restart-only change next to a valid client change: the client applies, the rest is
    // named as needing a restart.
    rewrite(
        &config,
        &format!(
            "[tickets]\nstale_after = \"99m\"\n{}{}",
            app_toml(APP_ID, Some(KEY), TOKEN),
            status_client("after", NEW_BEARER, "[\"*\"]")
        ),
    );
    hangup(&server);
    logged(&mut server, "config reloaded", 1).await;
    let restart = logged(
        &mut server,
        "config reloaded, but these changes need a restart",
        1,
    )
    .await;
    assert!(restart[0].ends_with(": tickets"), "{restart:?}");
    assert_eq!(status_as(&server, NEW_BEARER).await, 200);
    let metrics = metrics(server.url("/metrics")).await;
    for outcome in ["applied", "refused"] {
        assert!(
            metrics.contains(&format!(
                "lark_ticketd_config_reloads_total{{outcome=\"{outcome}\"}} 1"
            )),
            "{metrics}"
        );
    }
    server.kill();
}

fn sealed(json: &str, key: &str) -> push::PushRequest {
    push::seal(
        json,
        Seal {
            encrypt_key: Some(&Secret::new(key)),
            sign: true,
        },
    )
}

#[tokio::test]
async fn a_consumer_added_by_sighup_receives_events_and_a_removed_one_stops() {
    let port = refused_port().await;
    let consumer = Consumer::start_on(port).await;
    let url = format!("http://127.0.0.1:{port}/feishu");
    let config = TempConfig::embedded(&app_toml(APP_ID, Some(KEY), TOKEN));
    let mut server = Child::serve(&config.path);
    let http = client();
    let events = server.url(&format!("/events/{APP_ID}"));
    // No consumer yet: acknowledged, nothing queued.
    let (status, body) = push::send(
        &http,
        &events,
        &sealed(&event_v2("ev-reload-0001", "im.message.receive_v1"), KEY),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");

    rewrite(
        &config,
        &format!(
            "{}{}",
            app_toml(APP_ID, Some(KEY), TOKEN),
            consumer_toml("bot", &url, CONSUMER_SECRET_A, "[\"*\"]")
        ),
    );
    hangup(&server);
    logged(&mut server, "config reloaded", 1).await;
    let (status, body) = push::send(
        &http,
        &events,
        &sealed(&event_v2("ev-reload-0002", "im.message.receive_v1"), KEY),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    crate::util::eventually("the added consumer's delivery", || {
        consumer.received().len() == 1
    })
    .await;
    assert_eq!(
        consumer.received()[0].header("webhook-id"),
        "ev-reload-0002"
    );

    // Removed: its loop stops; what intake queues meanwhile is not for it.
    rewrite(&config, &app_toml(APP_ID, Some(KEY), TOKEN));
    hangup(&server);
    logged(&mut server, "consumer removed by a reload", 1).await;
    let (status, _) = push::send(
        &http,
        &events,
        &sealed(&event_v2("ev-reload-0003", "im.message.receive_v1"), KEY),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(consumer.received().len(), 1);
    server.kill();
}

/// Key rotation through a reload, on the real binary: the old key is refused until the config
/// names it `previous_encrypt_key`, accepted on both routes while it is, and counted.
#[tokio::test]
async fn a_reload_brings_in_the_previous_key_on_both_routes() {
    let config = TempConfig::embedded(&rotating_app(OLD_KEY, OLD_TOKEN, None, ""));
    let mut server = Child::serve(&config.path);
    let http = client();
    let now_us = crate::intake::now_us();
    let push_with = |key: &'static str, token: &'static str, n: i64| {
        crate::intake::ticket_push(
            APP_ID,
            key,
            token,
            &format!("tkt-secret-rot-{n}"),
            now_us + n,
        )
    };
    let routed = server.url(&format!("/events/{APP_ID}"));
    let bare = server.url("/events");
    assert_eq!(
        push::send(&http, &routed, &push_with(OLD_KEY, OLD_TOKEN, 1))
            .await
            .unwrap()
            .0,
        200
    );

    // Step 1 of the rotation: the new key and token in, the old ones as previous.
    rewrite(
        &config,
        &rotating_app(
            NEW_KEY,
            TOKEN,
            Some((OLD_KEY, OLD_TOKEN)),
            "2999-01-01T00:00:00Z",
        ),
    );
    hangup(&server);
    logged(&mut server, "config reloaded", 1).await;
    for (n, url) in [(2, &routed), (3, &bare)] {
        let (status, body) = push::send(&http, url, &push_with(OLD_KEY, OLD_TOKEN, n))
            .await
            .unwrap();
        assert_eq!(status, 200, "old key and token on {url}: {body}");
    }
    for (n, url) in [(4, &routed), (5, &bare)] {
        let (status, body) = push::send(&http, url, &push_with(NEW_KEY, TOKEN, n))
            .await
            .unwrap();
        assert_eq!(status, 200, "new key and token on {url}: {body}");
    }
    let metrics = metrics(server.url("/metrics")).await;
    for key in ["encrypt_key", "verification_token"] {
        assert!(
            metrics.contains(&format!(
                "lark_ticketd_events_previous_key_total{{app_id=\"{APP_ID}\",key=\"{key}\"}} 2"
            )),
            "{metrics}"
        );
    }

    // Step 4: the previous key removed; the old key is refused again.
    rewrite(&config, &rotating_app(NEW_KEY, TOKEN, None, ""));
    hangup(&server);
    logged(&mut server, "config reloaded", 2).await;
    for (n, url) in [(6, &routed), (7, &bare)] {
        let (status, body) = push::send(&http, url, &push_with(OLD_KEY, OLD_TOKEN, n))
            .await
            .unwrap();
        assert_eq!(status, 401, "old key on {url}: {body}");
    }
    let (_, logs) = server.terminate();
    crate::util::assert_no_secrets(&logs, "lark-ticketd serve, rotating keys");
}

/// `2026-12-01T00:00:00Z` for unix milliseconds, as `check-config` shows such a time.
fn rfc3339(unix_ms: u64) -> String {
    format!("{:?}", lark_ticketd::config::UtcTime { unix_ms })
}

#[test]
fn config_times_are_shown_as_the_config_reads_them() {
    for ms in [
        0,
        1_796_083_200_000,
        1_709_252_999_000,
        4_102_444_800_000,
        1_796_083_200_250,
    ] {
        assert_eq!(
            lark_ticketd::config::parse_rfc3339_ms(&rfc3339(ms)),
            Ok(ms),
            "{}",
            rfc3339(ms)
        );
    }
}

/// The overlap ends by the service's clock: accepted before `previous_keys_until`, refused from
/// it, on both routes, for the key and for the token.
#[tokio::test]
async fn the_previous_key_and_token_are_accepted_until_the_overlap_ends() {
    let start_ms = SystemClock.now_ms();
    let clock = Arc::new(ManualClock::new(start_ms));
    // The overlap ends an hour from the service's now (inside events.max_age, so the pushes,
    // stamped with the wall clock, stay fresh when the clock moves).
    let until_ms = (start_ms / 1000 + 3600) * 1000;
    let app = TestApp::spawn_with_clock(
        &rotating_app(
            NEW_KEY,
            TOKEN,
            Some((OLD_KEY, OLD_TOKEN)),
            &rfc3339(until_ms),
        ),
        clock.clone(),
    )
    .await;
    let now_us = crate::intake::now_us();
    let mut n = 0;
    let mut push_with = |key: &str, token: &str| {
        n += 1;
        crate::intake::ticket_push(
            APP_ID,
            key,
            token,
            &format!("tkt-secret-ovl-{n}"),
            now_us + n,
        )
    };
    let routed = format!("/events/{APP_ID}");
    for path in [routed.as_str(), "/events"] {
        for (key, token) in [
            (OLD_KEY, TOKEN),
            (NEW_KEY, OLD_TOKEN),
            (OLD_KEY, OLD_TOKEN),
            (NEW_KEY, TOKEN),
        ] {
            let reply = crate::intake::send(&app, path, &push_with(key, token)).await;
            assert_eq!(
                reply.status, 200,
                "{path} during the overlap: {}",
                reply.text
            );
        }
    }
    let metrics = app.state.metrics().encode();
    for key in ["encrypt_key", "verification_token"] {
        assert!(
            metrics.contains(&format!(
                "lark_ticketd_events_previous_key_total{{app_id=\"{APP_ID}\",key=\"{key}\"}} 4"
            )),
            "{metrics}"
        );
    }

    clock.advance(Duration::from_millis(until_ms - start_ms));
    for path in [routed.as_str(), "/events"] {
        let reply = crate::intake::send(&app, path, &push_with(OLD_KEY, TOKEN)).await;
        assert_eq!(
            (reply.status, reply.code()),
            (401, "bad_signature"),
            "{path}"
        );
        let reply = crate::intake::send(&app, path, &push_with(NEW_KEY, OLD_TOKEN)).await;
        assert_eq!((reply.status, reply.code()), (401, "bad_token"), "{path}");
        let reply = crate::intake::send(&app, path, &push_with(NEW_KEY, TOKEN)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
    }

    // A reload that moves the end later brings the previous key back, on the same clock.
    let later = rotating_app(
        NEW_KEY,
        TOKEN,
        Some((OLD_KEY, OLD_TOKEN)),
        &rfc3339(until_ms + 3_600_000),
    );
    let config = Config::parse(&format!("[store]\nkind = \"memory\"\n{later}"), &|_| None).unwrap();
    let reloaded = app.state.reload(&config).unwrap();
    assert!(reloaded.needs_restart.is_empty(), "{reloaded:?}");
    let reply = crate::intake::send(&app, &routed, &push_with(OLD_KEY, OLD_TOKEN)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    app.stop().await;
}

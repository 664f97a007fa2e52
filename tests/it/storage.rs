//! The embedded store under a failing disk and damaged files: recovery without a restart,
//! readiness that sees the writer, and a clear refusal to start.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lark_ticketd::clock;
use lark_ticketd::config::Config;
use lark_ticketd::store::embedded::testing::{Faults, FaultyFile};
use lark_ticketd::store::embedded::EmbeddedStore;
use lark_ticketd::store::Store;
use tokio::net::TcpListener;

use crate::intake::{send, ticket_push};
use crate::util::{app_toml, lark_ticketd, TempConfig, TestApp, APP_ID, KEY, TOKEN};

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Issue 8, defect 1: after one failed write (a full disk) redb refused every later write
/// until the process was restarted, while `/readyz` stayed 200. Now intake answers 503 while the
/// disk is full, readiness says so, and once the disk has room again the store reopens itself:
/// the next push is acknowledged and on disk, and readiness is 200 — no restart.
#[tokio::test]
async fn store_recovers_from_a_full_disk_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let faults = Arc::new(Faults::default());
    let store = {
        let name = path.display().to_string();
        let (path, faults) = (path.clone(), Arc::clone(&faults));
        EmbeddedStore::open_with_backend(&name, move || FaultyFile::open(&path, &faults)).unwrap()
    };
    let config = Config::parse(
        &format!(
            "[store]\nkind = \"memory\"\n{}",
            app_toml(APP_ID, Some(KEY), TOKEN)
        ),
        &|_| None,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app =
        TestApp::spawn_with_store(listener, config, Store::Embedded(store), clock::system()).await;
    let events = format!("/events/{APP_ID}");
    let ts = now_us();
    let first = ticket_push(APP_ID, KEY, TOKEN, "tkt-secret-before-full", ts);
    assert_eq!(send(&app, &events, &first).await.status, 200);
    assert_eq!(app.get("/readyz").await.status, 200);

    faults.set_full(true);
    let second = ticket_push(APP_ID, KEY, TOKEN, "tkt-secret-after-full", ts + 1_000_000);
    let reply = send(&app, &events, &second).await;
    assert_eq!((reply.status, reply.code()), (503, "store_unavailable"));
    let ready = app.get("/readyz").await;
    assert_eq!((ready.status, ready.code()), (503, "store_unavailable"));
    // Still full: still refused, still not ready.
    let reply = send(&app, &events, &second).await;
    assert_eq!((reply.status, reply.code()), (503, "store_unavailable"));
    assert_eq!(app.get("/readyz").await.status, 503);

    faults.set_full(false);
    // Probe like a supervisor: the store reopens itself within the reopening backoff.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.get("/readyz").await.status != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never became ready again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Feishu retries the push: acknowledged.
    assert_eq!(send(&app, &events, &second).await.status, 200);
    app.stop().await;
    // ... and on disk: the real file, opened afresh, holds it.
    let reopened = EmbeddedStore::open(&path).unwrap();
    let stored = reopened.ticket(APP_ID).await.unwrap().unwrap();
    assert_eq!(stored.ticket.expose(), "tkt-secret-after-full");
    reopened.close().await;
}

/// A real store file with a ticket in it.
async fn written_store(path: &Path) {
    let store = EmbeddedStore::open(path).unwrap();
    for i in 0..50 {
        let mut record = lark_ticketd::store::TicketRecord {
            ticket: lark_ticketd::secret::Secret::new(format!("tkt-secret-{i}")),
            event_time_us: i,
            event_id: format!("e{i}"),
            received_at_ms: 0,
            source: lark_ticketd::store::TicketSource::Push,
            pushes_seen: 0,
            rejected: false,
        };
        record.received_at_ms = i as u64;
        store.put_ticket(&format!("cli_{i}"), record).await.unwrap();
    }
    store.close().await;
}

/// Issue 8, defect 2: a truncated or overwritten store file made `serve` panic (a redb
/// assertion, exit code 101), and an empty file was silently a fresh store. Each must refuse to
/// start with one clear line naming the file and exit code 74, and no panic.
#[tokio::test]
async fn damaged_store_file_refuses_to_start_with_exit_code_74() {
    let config = TempConfig::embedded(&app_toml(APP_ID, Some(KEY), TOKEN));
    let db = config.db_path();
    written_store(&db).await;
    let good = std::fs::read(&db).unwrap();
    let random: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let cases = [
        ("truncated", good[..good.len() / 3].to_vec(), "is damaged"),
        ("truncated to one page", good[..4096].to_vec(), "is damaged"),
        ("random bytes", random, "is damaged"),
        ("empty", Vec::new(), "is empty (0 bytes)"),
    ];
    for (what, content, expected) in cases {
        std::fs::write(&db, &content).unwrap();
        let out = lark_ticketd()
            .args(["serve", "--config"])
            .arg(&config.path)
            .env("LARK_TICKETD_LOG", "info")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(74), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("cannot open the store"))
            .unwrap_or_else(|| panic!("{what}: no clear message: {stderr}"));
        assert!(
            line.contains(db.to_str().unwrap()) && line.contains(expected),
            "{what}: {line}"
        );
        assert!(!stderr.contains("lark-ticketd serving"), "{what}: {stderr}");
        assert_eq!(std::fs::read(&db).unwrap(), content, "{what}: file changed");
    }
}

//! The status page (`GET /` beside `/metrics`), checked over HTTP and in a real headless
//! browser (Debian's `chromium`): a fresh and a stale app, the arrivals timeline, no secret.

use std::sync::Arc;
use std::time::Duration;

use lark_ticketd::clock::ManualClock;

use crate::util::{assert_no_secrets, Stack, StackOptions, APP_ID, CUSTOM_APP_ID};

const SECOND_APP: &str = "cli_second";

/// One app pushed 80 minutes ago (stale), the other 80 and 50 minutes ago (fresh).
async fn fresh_and_stale() -> Stack {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let stack = Stack::start(StackOptions {
        clock: Some(Arc::clone(&clock)),
        no_push_on_resend: true,
        ..Default::default()
    })
    .await;
    for app in [APP_ID, SECOND_APP] {
        assert_eq!(stack.mock.push_ticket(app).await.unwrap(), 200);
    }
    clock.advance(Duration::from_secs(30 * 60));
    assert_eq!(stack.mock.push_ticket(APP_ID).await.unwrap(), 200);
    clock.advance(Duration::from_secs(50 * 60));
    stack
}

#[tokio::test]
async fn the_status_page_shows_each_app_and_its_timeline_and_no_secret() {
    let stack = fresh_and_stale().await;
    let r = stack.app.get("/").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let header = |name: &str| r.headers[name].to_str().unwrap().to_string();
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert!(header("content-security-policy").starts_with("default-src 'none'"));
    assert_eq!(header("cache-control"), "no-store");
    let html = &r.text;
    assert!(html.contains(&format!(
        "data-app-id=\"{APP_ID}\" data-ticket-state=\"fresh\""
    )));
    assert!(html.contains(&format!(
        "data-app-id=\"{SECOND_APP}\" data-ticket-state=\"stale\""
    )));
    // Both pushes of the fresh app fall in two different hours; the stale app's one push is
    // followed by a watched hour without any.
    assert!(
        html.contains("data-pushed-hours=\"2\" data-missed-hours=\"0\""),
        "{html}"
    );
    assert!(
        html.contains("data-pushed-hours=\"1\" data-missed-hours=\"1\""),
        "{html}"
    );
    // A custom app has no ticket: no arrivals timeline (its hours would all read as missed).
    let custom = html
        .split("<article ")
        .find(|a| a.contains(&format!("data-app-id=\"{CUSTOM_APP_ID}\"")))
        .expect("the custom app is on the page");
    assert!(
        custom.contains("data-ticket-state=\"not-needed\""),
        "{custom}"
    );
    assert!(!custom.contains("class=\"timeline\""), "{custom}");
    assert!(html.contains("<meta http-equiv=\"refresh\""));
    assert!(!html.contains("<script"));
    assert_no_secrets(html, "the status page");
    // Served where /metrics is: with an ops listener, not on the main one (tests/it/ops.rs
    // checks the ops listener's routes).
    stack.stop().await;
}

#[tokio::test]
async fn the_status_page_renders_in_a_real_browser() {
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|b| which(b))
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is required under CI (.ci/run installs Debian's chromium package)"
        );
        eprintln!("NOTICE: no chromium found: the status page was not rendered in a browser (apt-get install chromium)");
        return;
    };
    let stack = fresh_and_stale().await;
    let url = stack.app.url("/");
    let profile = tempfile::tempdir().unwrap();
    let browser = |extra: &[String]| {
        let mut cmd = tokio::process::Command::new(&chromium);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            // A phone's viewport: the page must be readable there.
            "--window-size=412,1400",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(&url)
        .kill_on_drop(true);
        cmd
    };
    // The DOM as the browser built it (parsed, styles applied, no script to run).
    let dom = tokio::time::timeout(
        Duration::from_secs(60),
        browser(&["--dump-dom".to_string()]).output(),
    )
    .await
    .expect("chromium --dump-dom timed out")
    .unwrap();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8(dom.stdout).unwrap();
    assert!(dom.contains("<title>lark-ticketd status</title>"), "{dom}");
    for (app, state) in [(APP_ID, "fresh"), (SECOND_APP, "stale")] {
        assert!(
            dom.contains(&format!(
                "data-app-id=\"{app}\" data-ticket-state=\"{state}\""
            )),
            "{app} is not {state} in the browser's DOM:\n{dom}"
        );
    }
    assert_eq!(dom.matches("class=\"pushed\"").count(), 3, "{dom}");
    assert_no_secrets(&dom, "the status page in a browser");
    // A screenshot for review: target/status-page.png.
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        browser(&[format!("--screenshot={}", shot.display())]).output(),
    )
    .await
    .expect("chromium --screenshot timed out")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    stack.stop().await;
}

fn which(binary: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

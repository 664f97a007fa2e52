//! The real binary: crash safety, restarts, signals, and the CLI helpers.

use lark_ticketd::store::embedded::EmbeddedStore;

use crate::util::{app_toml, client, lark_ticketd, Child, Reply, TempConfig, APP_ID, KEY, TOKEN};

/// Read the ticket straight from the store file (the server must not be running).
async fn stored_ticket(config: &TempConfig) -> Option<String> {
    let store = EmbeddedStore::open(&config.db_path()).expect("open store file");
    let ticket = store
        .ticket(APP_ID)
        .await
        .unwrap()
        .map(|t| t.ticket.expose().to_string());
    // Release the file before the next server process opens it.
    store.close().await;
    ticket
}

fn push_ticket_cli(url: &str, config: &TempConfig, ticket: &str) -> std::process::Output {
    lark_ticketd()
        .args(["push", "ticket", "--force", "--url", url, "--config"])
        .arg(&config.path)
        .args(["--ticket", ticket])
        .env_remove("LARK_APP_TICKET")
        .output()
        .unwrap()
}

#[tokio::test]
async fn cli_push_ticket_survives_sigkill_and_restart() {
    let status_client = format!(
        "[[clients]]\nname = \"ops\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"status\"]\n",
        lark_ticketd::auth::key_sha256_hex(crate::util::STATUS_BEARER)
    );
    let config = TempConfig::embedded(&format!(
        "{}{status_client}",
        app_toml(APP_ID, Some(KEY), TOKEN)
    ));
    let server = Child::serve(&config.path);
    let url = server.url(&format!("/events/{APP_ID}"));
    let out = push_ticket_cli(&url, &config, "tkt-secret-cli-1");
    assert!(
        out.status.success(),
        "push failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("HTTP 200"));
    // Kill -9 right after the 200: no shutdown path runs.
    server.kill();
    assert_eq!(
        stored_ticket(&config).await.as_deref(),
        Some("tkt-secret-cli-1")
    );

    // The service starts again on the same file, is ready, and reports the ticket.
    let server = Child::serve(&config.path);
    let ready = Reply::from(client().get(server.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(ready.status, 200);
    let status = Reply::from(
        client()
            .get(server.url(&format!("/v1/apps/{APP_ID}")))
            .bearer_auth(crate::util::STATUS_BEARER)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status.json["ticket"]["state"], "fresh", "{}", status.text);
    let fingerprint = lark_ticketd::secret::Secret::new("tkt-secret-cli-1").fingerprint();
    assert_eq!(status.json["ticket"]["fingerprint"], fingerprint.as_str());
    let pushed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        pushed.contains(&format!("ticket fingerprint: {fingerprint}")),
        "{pushed}"
    );
    server.kill();
    assert_eq!(
        stored_ticket(&config).await.as_deref(),
        Some("tkt-secret-cli-1")
    );
}

#[tokio::test]
async fn every_acknowledged_ticket_is_on_disk_when_killed() {
    let config = TempConfig::embedded(&app_toml(APP_ID, Some(KEY), TOKEN));
    let server = Child::serve(&config.path);
    let url = server.url(&format!("/events/{APP_ID}"));
    let http = client();
    let mut last = String::new();
    for i in 0..20i64 {
        last = format!("tkt-secret-burst-{i}");
        let req =
            crate::intake::ticket_push(APP_ID, KEY, TOKEN, &last, crate::intake::now_us() + i);
        let (status, body) = lark_ticketd::push::send(&http, &url, &req).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    server.kill();
    assert_eq!(stored_ticket(&config).await, Some(last));
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let config = TempConfig::embedded(&app_toml(APP_ID, Some(KEY), TOKEN));
    let server = Child::serve(&config.path);
    let reply = Reply::from(client().get(server.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(reply.status, 200);
    let (status, logs) = server.terminate();
    assert!(status.success(), "exit {status:?}\n{logs}");
    assert!(logs.contains("shutting down"), "{logs}");
}

#[tokio::test]
async fn cli_push_challenge_is_echoed() {
    let config = TempConfig::embedded(&app_toml(APP_ID, Some(KEY), TOKEN));
    let server = Child::serve(&config.path);
    let out = lark_ticketd()
        .args([
            "push",
            "challenge",
            "--url",
            &server.url("/events"),
            "--config",
        ])
        .arg(&config.path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("challenge echoed correctly"), "{stdout}");
    server.kill();
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[apps]]\napp_id = \"cli_x\"\napp_secret = \"${LARK_TICKETD_TEST_UNSET_VAR}\"\nverification_token = \"t\"\n",
    )
    .unwrap();
    for command in ["serve", "check-config"] {
        let out = lark_ticketd()
            .args([command, "--config"])
            .arg(&path)
            .env_remove("LARK_TICKETD_TEST_UNSET_VAR")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("apps[0].app_secret"), "{stderr}");
    }
}

#[test]
fn check_config_prints_the_resolution_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, app_toml(APP_ID, Some(KEY), TOKEN)).unwrap();
    let out = lark_ticketd()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(APP_ID), "{stdout}");
    for secret in [KEY, TOKEN, crate::util::APP_SECRET] {
        assert!(!stdout.contains(secret), "{secret} printed");
    }
    assert!(stdout.contains("[redacted]"));
}

#[test]
fn decrypt_cli_decrypts_the_doc_vector() {
    let out = lark_ticketd()
        .args([
            "decrypt",
            "--encrypt-key",
            "test key",
            "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello world");
    let out = lark_ticketd()
        .args([
            "decrypt",
            "--encrypt-key",
            "wrong",
            "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn demo_once_prints_a_tenant_token_fetched_through_the_api() {
    let out = lark_ticketd()
        .args(["demo", "--once"])
        .env_remove("LARK_TICKETD_LOG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The tenant token fetched through the API, in the answer shown after step 5.
    let answer = stdout
        .lines()
        .skip_while(|l| !l.starts_with("5. "))
        .find_map(|l| l.trim_start().strip_prefix("→ "))
        .unwrap_or_else(|| panic!("no answer after step 5 in:\n{stdout}"));
    let answer: serde_json::Value = serde_json::from_str(answer).unwrap();
    let token = answer["tenant_access_token"].as_str().unwrap_or_default();
    assert!(token.starts_with("t-") && token.len() > 12, "{answer}");
    // Issue 12: the output is the numbered steps and their indented lines, nothing stray (a
    // bare `tenant_access_token: …` line was printed between step 5 and step 6) …
    for line in stdout.lines().filter(|l| !l.is_empty()) {
        let numbered = line
            .split_once(". ")
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok());
        assert!(
            numbered
                || line.starts_with("   ")
                || line.starts_with("lark-ticketd demo:")
                || line.starts_with("Done (--once)"),
            "stray line {line:?} in:\n{stdout}"
        );
    }
    // … and values read as the API spells them: the ticket arrived via `resend` (the status
    // API's `arrived_via`), not Rust's `Resend`.
    assert!(stdout.contains("arrived via resend,"), "{stdout}");
    assert!(!stdout.contains("Resend"), "{stdout}");
    assert!(
        stdout.contains("app_access_token 1, tenant_access_token 1, app_ticket/resend 1"),
        "{stdout}"
    );
    // A custom app next to the store app: its tokens without a ticket, and a user's login.
    assert!(
        stdout.contains("kind = \"custom\"") && stdout.contains("ticket not_needed"),
        "{stdout}"
    );
    assert!(stdout.contains("signed in: open_id ou_"), "{stdout}");
    // The hand-off: a pushed chat message reached the demo's consumer, signature verified.
    assert!(
        stdout.contains("checked the signature with its secret: valid"),
        "{stdout}"
    );
}

//! Issue 12's rough edges of the command line, through the real binary: config errors that name
//! the right key and line, and `push ticket` that does not replace a real ticket by accident.

use std::path::Path;

use crate::util::{app_toml, lark_ticketd, Child, TempConfig, APP_ID, KEY, TOKEN};

/// `check-config` on `text`, with the environment variable `LARK_ENCRYPT_KEY` set to `key`.
fn check_config(text: &str, encrypt_key: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lark-ticketd.toml");
    std::fs::write(&path, text).unwrap();
    lark_ticketd()
        .args(["check-config", "--config"])
        .arg(&path)
        .env("LARK_ENCRYPT_KEY", encrypt_key)
        .output()
        .unwrap()
}

fn one_line_on_stderr(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

/// An app whose Encrypt Key comes from `${LARK_ENCRYPT_KEY}`, as deploy/ has it.
fn app_with_key_from_env() -> String {
    format!(
        "[[apps]]\napp_id = \"{APP_ID}\"\napp_secret = \"s\"\nencrypt_key = \"${{LARK_ENCRYPT_KEY}}\"\n\
         verification_token = \"{TOKEN}\"\n"
    )
}

/// Issue 12: `LARK_ENCRYPT_KEY=` (set, empty) used to turn encryption off without a word: the
/// app then took unsigned, clear-text events. Now: exit 64, one line naming the key and the
/// variable. Set, the key is used; left out of the file, there is none.
#[test]
fn empty_encrypt_key_from_the_environment_exits_64() {
    let out = check_config(&app_with_key_from_env(), "");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = one_line_on_stderr(&out);
    assert!(
        stderr.contains("apps[0].encrypt_key") && stderr.contains("LARK_ENCRYPT_KEY"),
        "{stderr}"
    );

    let out = check_config(&app_with_key_from_env(), KEY);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("encrypt_key: Some("), "{stdout}");

    let out = check_config(&app_toml(APP_ID, None, TOKEN), "");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("encrypt_key: None"), "{stdout}");
}

/// Issue 12: an unknown key's error named the line above it. The line must be the typo's.
#[test]
fn unknown_key_error_names_its_line() {
    let text = format!(
        "listen = \"127.0.0.1:0\"\n\n{}encrpyt_key = \"k\"\n\n[forwarding]\nretention = \"1d\"\n",
        app_toml(APP_ID, Some(KEY), TOKEN)
    );
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("encrpyt_key"))
        .unwrap();
    let out = check_config(&text, "");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = one_line_on_stderr(&out);
    assert!(
        stderr.contains("encrpyt_key") && stderr.contains(&format!("(line {line})")),
        "the typo is on line {line}: {stderr}"
    );
}

fn push_ticket(url: &str, config: &Path, force: bool) -> std::process::Output {
    let mut cmd = lark_ticketd();
    cmd.args(["push", "ticket", "--url", url, "--config"])
        .arg(config)
        .args(["--ticket", "tkt-fake-from-the-cli"])
        .env_remove("LARK_APP_TICKET");
    if force {
        cmd.arg("--force");
    }
    cmd.output().unwrap()
}

/// Issue 12: `push ticket` against a running service replaced the app's real ticket with a fake
/// one, without a warning. Without `--force` it now sends nothing and says why (exit 64); its
/// help says what it does and how to undo it.
#[tokio::test]
async fn push_ticket_needs_force_to_replace_the_stored_ticket() {
    let config = TempConfig::embedded(&app_toml(APP_ID, Some(KEY), TOKEN));
    let server = Child::serve(&config.path);
    let url = server.url(&format!("/events/{APP_ID}"));

    let out = push_ticket(&url, &config.path, false);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = one_line_on_stderr(&out);
    assert!(
        stderr.contains("--force") && stderr.contains(&format!("DELETE /v1/apps/{APP_ID}/ticket")),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("HTTP"),
        "nothing may be sent: {out:?}"
    );

    let out = push_ticket(&url, &config.path, true);
    assert!(out.status.success(), "{out:?}");
    server.kill();
    let store =
        lark_ticketd::store::embedded::EmbeddedStore::open(&config.db_path()).expect("the store");
    let stored = store.ticket(APP_ID).await.unwrap().map(|t| t.ticket);
    store.close().await;
    assert_eq!(
        stored.as_ref().map(|t| t.expose()),
        Some("tkt-fake-from-the-cli"),
        "with --force the ticket is pushed"
    );

    let help = lark_ticketd()
        .args(["push", "ticket", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for said in [
        "REPLACES the app's stored ticket with a fake one",
        "--force",
        "DELETE /v1/apps/{app_id}/ticket",
    ] {
        assert!(help.contains(said), "{said:?} not in:\n{help}");
    }
}

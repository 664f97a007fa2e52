//! The deployment kit (`deploy/`) and the operations guide cannot drift from the server: every
//! metric the Grafana dashboard, the alert rules and docs/operations.md name is one the running
//! server exports, and the rules pass `promtool check rules`.

use std::collections::BTreeSet;
use std::path::Path;

use crate::util::{app_toml, TestApp, APP_ID, KEY, TOKEN};

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `lark_ticketd_*` and `process_*` name in `text`, histogram series suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = metric_names_with(text, "lark_ticketd_");
    names.extend(metric_names_with(text, "process_"));
    names
}

fn metric_names_with(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find(prefix) {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let name = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(name.to_string());
        i = end;
    }
    names
}

/// The metric families the server exports (from `# TYPE` lines: families without samples yet
/// are listed too), with `_total` removed like [`metric_names`] does.
async fn exported() -> BTreeSet<String> {
    let consumer = "[[consumers]]\nname = \"c\"\nurl = \"http://127.0.0.1:9/x\"\n\
                    secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";
    let app = TestApp::spawn(&format!("{consumer}{}", app_toml(APP_ID, Some(KEY), TOKEN))).await;
    let r = app.get("/metrics").await;
    assert_eq!(r.status, 200);
    let names = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .flat_map(metric_names)
        .collect();
    app.stop().await;
    names
}

#[tokio::test]
async fn the_dashboard_the_alerts_and_the_guide_name_only_exported_metrics() {
    let exported = exported().await;
    assert!(exported.len() > 10, "{exported:?}");
    for file in [
        "deploy/grafana/lark-ticketd.json",
        "deploy/prometheus/alerts.yml",
        "docs/operations.md",
    ] {
        let named = metric_names(&read(file));
        assert!(!named.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = named.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the server does not export: {unknown:?}"
        );
    }
    // And the guide's metrics table lists every metric the server exports.
    let documented = metric_names(&read("docs/operations.md"));
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "docs/operations.md does not list {undocumented:?}"
    );
}

#[test]
fn the_dashboard_is_grafana_json_with_a_query_per_panel() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/lark-ticketd.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let graphs: Vec<_> = panels.iter().filter(|p| p["type"] != "row").collect();
    assert!(graphs.len() >= 8);
    for p in graphs {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        assert!(targets
            .iter()
            .all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty())));
    }
    // Ticket age is drawn against the 75-minute line.
    assert!(panels.iter().any(|p| p["targets"][0]["expr"]
        .as_str()
        .unwrap_or("")
        .contains("ticket_age_seconds")
        && p["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == 4500));
}

#[test]
fn the_alert_rules_pass_promtool() {
    let Ok(promtool) = which("promtool") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required under CI (.ci/run installs Debian's prometheus package)"
        );
        eprintln!("NOTICE: promtool not found; the alert rules were not checked (apt-get install prometheus)");
        return;
    };
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(binary: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
        .ok_or(())
}

//! The minimum Rust version we state is one the dependencies build on (issue 12: README said
//! 1.82 while the resolved dependencies needed a newer compiler).
//!
//! `cargo metadata` (offline, for the host: the dependencies are already fetched when tests run)
//! resolves the graph; every package reached from ours through normal or build dependencies — dev-dependencies
//! only build our tests — must declare a `rust-version` no newer than Cargo.toml's. README's
//! requirements line must say the same version.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// `1.85`, `1.85.0` → (1, 85, 0).
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

/// The platform we build for: `cargo metadata --offline` can resolve only the packages fetched,
/// and those are the host's (a Windows-only crate is never downloaded here).
fn host() -> String {
    let out = cargo().arg("-vV").output().expect("run cargo -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("cargo -vV names the host")
        .trim()
        .to_string()
}

fn metadata(manifest_dir: &Path) -> Value {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host(), "--manifest-path"])
        .arg(manifest_dir.join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON")
}

/// Every package id our package reaches through normal and build dependencies.
fn built_packages(metadata: &Value) -> BTreeSet<String> {
    let root = metadata["resolve"]["root"]
        .as_str()
        .expect("a root package");
    let nodes: HashMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        for dep in nodes[id.as_str()]["deps"].as_array().into_iter().flatten() {
            let built = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null() || k["kind"] == "build");
            if built {
                todo.push(dep["pkg"].as_str().unwrap().to_string());
            }
        }
    }
    seen
}

#[test]
fn rust_version_covers_every_dependency_and_readme_states_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let metadata = metadata(dir);
    let packages: HashMap<&str, &Value> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p))
        .collect();
    let root = &packages[metadata["resolve"]["root"].as_str().unwrap()];
    let ours = root["rust_version"]
        .as_str()
        .expect("Cargo.toml sets rust-version");

    let mut too_new: Vec<String> = built_packages(&metadata)
        .iter()
        .filter_map(|id| {
            let p = packages[id.as_str()];
            let needs = p["rust_version"].as_str()?;
            (version(needs) > version(ours)).then(|| {
                format!(
                    "{} {} needs Rust {needs}",
                    p["name"].as_str().unwrap_or("?"),
                    p["version"].as_str().unwrap_or("?")
                )
            })
        })
        .collect();
    too_new.sort();
    assert!(
        too_new.is_empty(),
        "Cargo.toml says rust-version = {ours:?}, but:\n{}",
        too_new.join("\n")
    );

    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let stated = readme
        .split("a Rust toolchain (")
        .nth(1)
        .and_then(|rest| rest.split(" or newer)").next())
        .expect("README states the minimum Rust version as \"a Rust toolchain (X or newer)\"");
    assert_eq!(
        version(stated),
        version(ours),
        "README says Rust {stated}, Cargo.toml's rust-version is {ours}"
    );
}

//! The layering stays one way (DESIGN.md → *Layout*, STYLE.md habit 11): every `crate::` path in
//! `src/` names a module on a lower layer than the file's own module, or the module itself.
//! Modules on the same layer are siblings and do not import each other either. A change that
//! re-creates a cycle (or just an upward edge) fails here, naming the file and the path.
//!
//! The order below is the one the crate docs (`src/lib.rs`) draw; change both together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. `lib` is the crate root (`AppState`); `main.rs` is a separate binary crate and
/// sits above everything.
const LAYERS: &[&[&str]] = &[
    // Plain building blocks: import nothing from the crate.
    &["clock", "error", "model", "secret"],
    // Pure rules that `config` validates `[[consumers]]` with.
    &["consumer_filter", "webhook"],
    // The typed config; metrics, a leaf every layer may call and that calls nothing back.
    &["config", "metrics"],
    // Durable state; bearer-key auth.
    &["auth", "store"],
    // Ticket bookkeeping shared by intake and the broker; the event hand-off (issue 9).
    &["forward", "tickets"],
    // Intake and the token broker: siblings, neither imports the other.
    &["events", "tokens"],
    // Sealing pushes (uses intake's cipher and signature), then the fake Open Platform.
    &["push"],
    &["mock_feishu"],
    // The crate root: AppState, built from everything below.
    &["lib"],
    // Operators' views, then the HTTP surface, then the listeners, then the demo.
    &["ops"],
    &["routes"],
    &["server"],
    &["demo"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/x.rs` and `src/x/**` are `x`, `src/lib.rs` is
/// `lib`; `None` for the binary.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "main.rs" | "bin" => None,
        "lib.rs" => Some("lib".into()),
        other => Some(other.trim_end_matches(".rs").to_string()),
    }
}

/// Drop a line's `//` comment (doc links are not dependencies). A `//` right after a
/// non-space (as in `https://`) is kept.
fn code_of(line: &str) -> &str {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return "";
    }
    match line.find(" //") {
        Some(i) => &line[..i],
        None => line,
    }
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The crate-level items a line names: the first segment after each `crate::` (or each entry
/// of a `crate::{...}` group). An item starting with a capital is the root's (`AppState`).
fn crate_refs(code: &str, out: &mut Vec<String>) {
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue; // `lark_ticketd::`-like or `$crate::`: not this crate's root path
        }
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(',')
                .map(|item| ident_at(item.trim()))
                .collect()
        } else {
            vec![ident_at(rest)]
        };
        for name in names.into_iter().filter(|n| !n.is_empty() && *n != "self") {
            let is_item = name.chars().next().is_some_and(char::is_uppercase);
            out.push(if is_item { "lib".into() } else { name.into() });
        }
    }
}

/// The root names its modules without `crate::` (`use tokens::Broker;`, `metrics::Metrics`).
fn root_refs(code: &str, modules: &BTreeSet<String>, out: &mut Vec<String>) {
    if code.trim_start().starts_with("pub mod ") || code.trim_start().starts_with("mod ") {
        return;
    }
    for (i, _) in code.match_indices("::") {
        let head = &code[..i];
        let start = head
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |j| j + 1);
        let name = &head[start..];
        let qualified = head[..start].ends_with("::");
        if !qualified && modules.contains(name) {
            out.push(name.to_string());
        }
    }
}

/// Every (from module, to module, file:line, line) edge in `src/`.
fn edges() -> Vec<(String, String, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut edges = Vec::new();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = code_of(line);
            let mut refs = Vec::new();
            crate_refs(code, &mut refs);
            if from == "lib" {
                root_refs(code, &modules, &mut refs);
            }
            for to in refs {
                let at = format!("{}:{}", file.strip_prefix(&src).unwrap().display(), n + 1);
                edges.push((from.clone(), to, at, line.trim().to_string()));
            }
        }
    }
    edges
}

#[test]
fn every_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let missing: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(&src, f))
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a layer: {missing:?}; add each to LAYERS in tests/it/layering.rs \
         (and to the picture in src/lib.rs) below everything that uses it"
    );
}

#[test]
fn layering_runs_one_way() {
    let mut upward = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to, at, line) in edges() {
        if from == to {
            continue;
        }
        graph.entry(from.clone()).or_default().insert(to.clone());
        match (layer_of(&from), layer_of(&to)) {
            (Some(f), Some(t)) if t < f => {}
            (Some(_), None) => upward.push(format!("{at}: {from} -> {to} (no layer): {line}")),
            _ => upward.push(format!("{at}: {from} -> {to}: {line}")),
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down (DESIGN.md → Layout; move the shared thing lower):\n{}",
        upward.join("\n")
    );
    // The edges this issue removed stay removed.
    for (from, to) in [
        ("store", "events"),
        ("events", "tokens"),
        ("events", "lib"),
        ("tokens", "ops"),
        ("metrics", "ops"),
        ("tickets", "tokens"),
        ("tickets", "events"),
    ] {
        assert!(
            !graph.get(from).is_some_and(|t| t.contains(to)),
            "{from} imports {to} again"
        );
    }
}

#[test]
fn the_reader_sees_every_kind_of_path() {
    // The parser itself: grouped, nested, root items, comments and foreign crates.
    let mut refs = Vec::new();
    crate_refs("use crate::{config::Config, store, AppState};", &mut refs);
    crate_refs(
        "let x = crate::push::seal(a, crate::ops::status::utc(1));",
        &mut refs,
    );
    crate_refs("use lark_ticketd::tokens::TokenKey;", &mut refs);
    crate_refs(
        code_of("let y = 1; // crate::tokens is above us"),
        &mut refs,
    );
    crate_refs(code_of("//! [`crate::routes`]"), &mut refs);
    assert_eq!(refs, ["config", "store", "lib", "push", "ops"]);
    let modules: BTreeSet<String> = ["metrics", "tokens"].map(String::from).into();
    let mut root = Vec::new();
    root_refs("    metrics: metrics::Metrics,", &modules, &mut root);
    root_refs("use tokens::Broker;", &modules, &mut root);
    root_refs("pub mod tokens;", &modules, &mut root);
    root_refs("let t = std::tokens::x;", &modules, &mut root);
    assert_eq!(root, ["metrics", "tokens"]);
}

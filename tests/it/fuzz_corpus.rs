//! The fuzz corpus, replayed under `cargo test`: every file of `fixtures/fuzz/<target>/` goes
//! through the same harness function the fuzz target `<target>` calls (`fuzz_harness`), so a
//! regression on an input the fuzzer once found interesting fails here, without nightly.
//!
//! The harness panics on any broken invariant; this test adds that each corpus is there and not
//! vacuous (it still reaches acceptance, each shape and the error kinds it was kept for), and that
//! every error is one of the documented kinds. `seed_corpus` builds the seeds a fresh fuzzing run
//! starts from (the shared vectors in `fixtures/vectors/`), runs them through the harness, and
//! writes them out when `FUZZ_SEED_DIR` names a folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use lark_ticketd::error::ErrorKind;
use lark_ticketd::events::envelope::{self, Payload, ShapeError};
use lark_ticketd::events::signature;

use crate::fuzz_harness::{self as harness, KEY, KEYED_APP, KEYED_TOKEN, PLAIN_APP, PLAIN_TOKEN};
use crate::util::fixture_json;

const TARGETS: &[&str] = &["envelope", "decrypt", "verify", "sealed"];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/fuzz")
        .join(target)
}

/// Every input of one target's kept corpus, by file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
}

/// How often each outcome occurred, for the assertions and the failure messages.
fn tally<T, E: std::fmt::Debug>(
    results: impl Iterator<Item = Result<T, E>>,
    ok: impl Fn(&T) -> String,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in results {
        let key = match &r {
            Ok(v) => format!("ok:{}", ok(v)),
            Err(e) => format!("err:{e:?}"),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

fn has(counts: &BTreeMap<String, usize>, prefix: &str) -> bool {
    counts.keys().any(|k| k.starts_with(prefix))
}

#[test]
fn every_fuzz_target_has_a_kept_corpus_and_nothing_else_is_there() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut expected: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    expected.sort();
    assert_eq!(found, expected);
}

#[test]
fn envelope_corpus_replays() {
    let counts = tally(
        corpus("envelope").iter().map(|(_, d)| harness::envelope(d)),
        |p| match p {
            Payload::Challenge { .. } => "challenge".to_string(),
            Payload::Event(e) => format!("{:?}", e.schema),
        },
    );
    for shape in [
        "ok:challenge",
        "ok:V1",
        "ok:V2",
        "err:NotAnObject",
        "err:Unrecognised",
    ] {
        assert!(has(&counts, shape), "no {shape} in the corpus: {counts:?}");
    }
}

#[test]
fn decrypt_corpus_replays() {
    let counts = tally(
        corpus("decrypt").iter().map(|(_, d)| harness::decrypt(d)),
        |_| String::new(),
    );
    for kind in [
        "ok:",
        "err:Base64",
        "err:TooShort",
        "err:NotBlockAligned",
        "err:Padding",
    ] {
        assert!(has(&counts, kind), "no {kind} in the corpus: {counts:?}");
    }
}

#[test]
fn verify_corpus_replays() {
    let counts = tally(
        corpus("verify").iter().map(|(_, d)| harness::verify(d)),
        String::clone,
    );
    check_kinds(&counts);
    for outcome in [
        "ok:cli_a5f0e9d8c7b6a5f4",
        "ok:cli_fuzzplain0001",
        "err:BadSignature",
        "err:BadPayload",
        "err:MalformedBody",
    ] {
        assert!(
            has(&counts, outcome),
            "no {outcome} in the corpus: {counts:?}"
        );
    }
}

#[test]
fn sealed_corpus_replays() {
    let counts = tally(
        corpus("sealed").iter().map(|(_, d)| harness::sealed(d)),
        String::clone,
    );
    check_kinds(&counts);
    for outcome in [
        "ok:cli_a5f0e9d8c7b6a5f4",
        "err:BadPayload",
        "err:MalformedBody",
    ] {
        assert!(
            has(&counts, outcome),
            "no {outcome} in the corpus: {counts:?}"
        );
    }
}

/// Only the documented intake errors (the harness asserts it too; this names the list).
fn check_kinds(counts: &BTreeMap<String, usize>) {
    for key in counts.keys().filter(|k| k.starts_with("err:")) {
        assert!(
            harness::VERIFY_ERRORS
                .iter()
                .any(|k| format!("err:{k:?}") == *key),
            "undocumented error {key}"
        );
    }
}

/// Defect found by the `envelope` fuzz target: the `{"encrypt":"…"}` fast path stripped form
/// feeds (`trim_ascii`), which JSON does not count as whitespace, so it accepted a body that every
/// JSON parser (ours included) refuses.
#[test]
fn encrypt_fast_path_refuses_form_feed_padding() {
    for body in [
        &b"\x0c{\"encrypt\":\"QUJD\"}"[..],
        &b"{\"encrypt\":\"QUJD\"}\x0c"[..],
    ] {
        assert!(envelope::parse_object(body).is_err());
        assert_eq!(envelope::encrypt_only(body), None, "{body:?}");
    }
}

/// The seed corpora a fresh fuzzing run starts from, built from the shared vectors: every seed
/// goes through its target's harness (no invariant breaks on them). With `FUZZ_SEED_DIR` set
/// (README, "Fuzzing"), they are also written to `$FUZZ_SEED_DIR/<target>/`:
/// `FUZZ_SEED_DIR=fuzz/corpus cargo test --test it fuzz_corpus::seed_corpus`.
#[test]
fn seed_corpus() {
    let root = std::env::var_os("FUZZ_SEED_DIR").map(std::path::PathBuf::from);
    let mut seeds: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
    let vectors = |name: &str| match fixture_json(&format!("vectors/{name}.json")) {
        Value::Object(mut o) => match o.remove("vectors") {
            Some(Value::Array(v)) => v,
            _ => panic!("{name}: no vectors"),
        },
        _ => panic!("{name}: not an object"),
    };
    let s = |v: &Value, k: &str| v[k].as_str().map(str::to_string);

    // Plaintexts: the vectors', each lifecycle event, and the same for the plain app.
    let mut plaintexts: Vec<String> = vectors("decrypt")
        .iter()
        .filter_map(|v| s(v, "plaintext"))
        .collect();
    plaintexts.extend(vectors("negative").iter().filter_map(|v| s(v, "plaintext")));
    for (kind, extra) in [
        ("app_open", r#","applicants":[{"open_id":"ou_1"}]"#),
        ("app_status_change", r#","status":"stop_by_tenant""#),
        ("app_uninstalled", ""),
        (
            "order_paid",
            r#","order_id":"o1","price_plan_type":"per_seat_per_month","buy_type":"buy","seats":5,"pay_time":"1700000000""#,
        ),
    ] {
        plaintexts.push(format!(
            r#"{{"ts":"1700000000.5","uuid":"u-{kind}","token":"{KEYED_TOKEN}","type":"event_callback","event":{{"type":"{kind}","app_id":"{KEYED_APP}","tenant_key":"t1"{extra}}}}}"#
        ));
    }
    let plain: Vec<String> = plaintexts
        .iter()
        .map(|p| {
            p.replace(KEYED_TOKEN, PLAIN_TOKEN)
                .replace(KEYED_APP, PLAIN_APP)
        })
        .collect();
    plaintexts.extend(plain);

    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for name in ["decrypt", "negative", "signature"] {
        bodies.extend(
            vectors(name)
                .iter()
                .filter_map(|v| s(v, "body"))
                .map(String::into_bytes),
        );
    }
    for v in vectors("requests") {
        bodies.extend(s(&v["request"], "body").map(String::into_bytes));
    }

    let envelope = seeds.entry("envelope").or_default();
    envelope.extend(bodies.iter().cloned());
    envelope.extend(plaintexts.iter().map(|p| p.clone().into_bytes()));

    let decrypt = seeds.entry("decrypt").or_default();
    for v in vectors("decrypt")
        .iter()
        .chain(vectors("negative").iter())
        .filter(|v| v["encrypt"].is_string())
    {
        let key = s(v, "encrypt_key").unwrap_or_else(|| KEY.to_string());
        decrypt.push(format!("{key}\n{}", s(v, "encrypt").unwrap()).into_bytes());
    }

    // verify: flags byte, then timestamp \n nonce \n signature \n body.
    let verify = seeds.entry("verify").or_default();
    let framed = |flags: u8, ts: &str, nonce: &str, sig: &str, body: &[u8]| {
        let mut v = vec![flags];
        v.extend_from_slice(format!("{ts}\n{nonce}\n{sig}\n").as_bytes());
        v.extend_from_slice(body);
        v
    };
    for v in vectors("signature")
        .iter()
        .chain(vectors("negative").iter())
    {
        if let (Some(ts), Some(nonce), Some(body)) =
            (s(v, "timestamp"), s(v, "nonce"), s(v, "body"))
        {
            let sig = s(v, "signature").unwrap_or_default();
            for flags in [0b0100, 0b0101] {
                verify.push(framed(flags, &ts, &nonce, &sig, body.as_bytes()));
            }
        }
    }
    for body in &bodies {
        let sig = signature::compute_hex("1700000000", "1", KEY, body);
        for flags in [0b0000, 0b0001, 0b0010, 0b0011, 0b1100, 0b1101] {
            verify.push(framed(flags, "1700000000", "1", &sig, body));
        }
    }
    for p in &plaintexts {
        for flags in [0b0000, 0b0010] {
            verify.push(framed(flags, "", "", "", p.as_bytes()));
        }
    }

    seeds
        .entry("sealed")
        .or_default()
        .extend(plaintexts.iter().map(|p| p.clone().into_bytes()));

    for (target, inputs) in &seeds {
        assert!(!inputs.is_empty(), "{target}: no seeds");
        for input in inputs {
            let _ = match *target {
                "envelope" => harness::envelope(input).map(drop).map_err(drop),
                "decrypt" => harness::decrypt(input).map(drop).map_err(drop),
                "verify" => harness::verify(input).map(drop).map_err(drop),
                _ => harness::sealed(input).map(drop).map_err(drop),
            };
        }
        let Some(root) = &root else { continue };
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, input) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), input).unwrap();
        }
        eprintln!("{}: {} seeds", dir.display(), inputs.len());
    }
}

#[test]
fn harness_catches_the_invariants_it_claims() {
    // A correctly signed, correctly encrypted ticket is accepted for the keyed app…
    let plaintext = format!(
        r#"{{"ts":"1700000000.5","uuid":"u","token":"{KEYED_TOKEN}","type":"event_callback","event":{{"type":"app_ticket","app_id":"{KEYED_APP}","app_ticket":"tk"}}}}"#
    );
    assert_eq!(
        harness::sealed(plaintext.as_bytes()),
        Ok(KEYED_APP.to_string())
    );
    // …and the plain app takes its own plaintext events.
    let plain = plaintext
        .replace(KEYED_TOKEN, PLAIN_TOKEN)
        .replace(KEYED_APP, PLAIN_APP);
    let mut input = vec![0b0010];
    input.extend_from_slice(b"\n\n\n");
    input.extend_from_slice(plain.as_bytes());
    assert_eq!(harness::verify(&input), Ok(PLAIN_APP.to_string()));
    // Unknown routes answer unknown_app, whatever the body.
    assert_eq!(harness::verify(b"\x03\n\n\n{}"), Err(ErrorKind::UnknownApp));
    assert!(matches!(
        harness::envelope(b"[]"),
        Err(ShapeError::NotAnObject)
    ));
}

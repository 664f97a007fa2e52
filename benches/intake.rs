//! Criterion micro-benchmarks of the intake pipeline: verify signature (raw bytes) → decrypt →
//! parse envelope → check token, for the two shapes that matter — the hourly `app_ticket` push
//! and a ~10 KB schema-2.0 business event. Inputs are the shared vectors in fixtures/.

#![allow(clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::Value;

use lark_ticketd::config::Config;
use lark_ticketd::events::signature::SignatureHeaders;
use lark_ticketd::events::{Target, Verifier};

const APP_ID: &str = "cli_a5f0e9d8c7b6a5f4";

fn vector(id: &str) -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/vectors/signature.json"
    ))
    .unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    all["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .cloned()
        .unwrap()
}

fn verifier() -> Verifier {
    let config = Config::parse(
        &format!(
            "[[apps]]\napp_id = \"{APP_ID}\"\napp_secret = \"s\"\n\
             encrypt_key = \"EkEyExampleEncryptKey000000000001\"\n\
             verification_token = \"Vt0kExampleVerificationTok3n0001\"\n"
        ),
        &|_| None,
    )
    .unwrap();
    Verifier::new(&config.apps)
}

fn bench_intake(c: &mut Criterion) {
    let verifier = verifier();
    let mut group = c.benchmark_group("intake");
    for (name, id) in [
        ("app_ticket", "sig-app-ticket"),
        ("v2_event_10kb", "sig-long"),
    ] {
        let v = vector(id);
        let body = v["body"].as_str().unwrap().as_bytes().to_vec();
        let headers = SignatureHeaders {
            timestamp: v["timestamp"].as_str().unwrap(),
            nonce: v["nonce"].as_str().unwrap(),
            signature: v["signature"].as_str().unwrap(),
        };
        // Make sure the benchmark measures the success path.
        verifier
            .verify(Target::App(APP_ID), Some(headers), &body)
            .unwrap();
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                verifier
                    .verify(
                        black_box(Target::App(APP_ID)),
                        Some(black_box(headers)),
                        black_box(&body),
                    )
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_intake);
criterion_main!(benches);

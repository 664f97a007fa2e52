//! `cargo fuzz run decrypt`: the harness function `decrypt` in tests/it/fuzz_harness.rs, which the
//! corpus replay test (tests/it/fuzz_corpus.rs) runs on every file of fixtures/fuzz/decrypt/.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/it/fuzz_harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    let _ = harness::decrypt(data);
});

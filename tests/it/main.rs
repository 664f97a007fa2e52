//! The integration suite: the real server on port 0, driven over real HTTP.
//!
//! One binary (STYLE.md habit 9). `util` holds `TestApp` (the server in-process, with its logs
//! captured) and `Child` (the real binary as a separate process, for crash and restart tests).

#![allow(clippy::unwrap_used)]

mod util;

mod abuse;
mod broker;
mod deploy;
mod fleet;
mod fuzz_corpus;
mod fuzz_harness;
mod handoff;
mod intake;
mod layering;
mod leaks;
mod mock;
mod openapi;
mod ops;
mod page;
mod process;
mod redis;
mod replay;
mod robustness;
mod storage;
mod tokens;
mod vectors;

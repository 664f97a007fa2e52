//! The integration suite: the real server on port 0, driven over real HTTP.
//!
//! One binary (STYLE.md habit 9). `util` holds `TestApp` (the server in-process, with its logs
//! captured) and `Child` (the real binary as a separate process, for crash and restart tests).

#![allow(clippy::unwrap_used)]

#[macro_use]
mod util;

mod abuse;
mod broker;
mod cli;
mod custom_apps;
mod deploy;
mod fleet;
mod fuzz_corpus;
mod fuzz_harness;
mod handoff;
mod intake;
mod layering;
mod leaks;
mod login;
mod mock;
mod msrv;
mod openapi;
mod ops;
mod page;
mod process;
mod redis;
mod reload;
mod replay;
mod robustness;
mod sdk;
mod storage;
mod tokens;
mod vectors;

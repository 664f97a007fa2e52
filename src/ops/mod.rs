//! Operations: what operators see of the service — logs, the ticket freshness and token state
//! behind the status API, the `status` command and the status page, and the consumers' backlogs
//! and dead letters.
//!
//! `ops` sits above the ticket bookkeeping and the token broker (status reads both); the
//! Prometheus metrics are not here but in [`crate::metrics`], a leaf that every layer may call
//! and that calls nothing back.

pub mod consumers;
pub mod logging;
pub mod page;
pub mod status;

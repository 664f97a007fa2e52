//! Operations: what operators see of the service — logs, Prometheus metrics, and the ticket
//! freshness and token state behind the status API and the `status` command.

pub mod logging;
pub mod metrics;
pub mod status;

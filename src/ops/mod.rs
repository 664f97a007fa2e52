//! Operations: what operators see of the service — logs (and, later, status and metrics).

pub mod logging;

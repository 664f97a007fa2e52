//! Record types that several layers share, at the bottom of the crate so that no two layers
//! import each other to reach them (DESIGN.md → *Layout*, STYLE.md habit 11).
//!
//! Intake ([`crate::events`]) produces tenant changes and orders, the store ([`crate::store`])
//! keeps them, and the status API shows them; the ticket state is computed by the status module
//! and exported by [`crate::metrics`], which is a leaf and may import nothing but this. None of
//! those may own them, none of those may own them, because intake writes to the store and
//! the store must not import intake. What lives here is plain data: no I/O, no secrets, and
//! nothing from the rest of the crate.
//!
//! The store's own records (`TicketRecord`, `TenantRecord`, `TokenRecord`, ...) stay in
//! [`crate::store`]: only the store defines how they are kept.

/// How fresh an app's ticket is (`ops::status` computes it; metrics and the status API show it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketState {
    Fresh,
    Stale,
    Missing,
    /// A custom (self-built) app: it has no ticket and needs none.
    NotNeeded,
}

impl TicketState {
    pub fn as_str(self) -> &'static str {
        match self {
            TicketState::Fresh => "fresh",
            TicketState::Stale => "stale",
            TicketState::Missing => "missing",
            TicketState::NotNeeded => "not_needed",
        }
    }
}

/// A store-app lifecycle event (protocol.md §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantChange {
    /// `app_open`: first installed / enabled.
    Opened,
    /// `app_status_change` with its `status` (`start_by_tenant`, `stop_by_tenant`, `stop_by_platform`).
    StatusChanged { status: String },
    /// `app_uninstalled`.
    Uninstalled,
    /// `order_paid`.
    OrderPaid(Order),
}

/// The parts of an `order_paid` event an operator wants to see.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Order {
    pub order_id: String,
    pub price_plan_type: Option<String>,
    pub buy_type: Option<String>,
    pub seats: Option<u64>,
    pub pay_time: Option<String>,
}

//! Record types that several layers share, at the bottom of the crate so that no two layers
//! import each other to reach them (DESIGN.md → *Layout*, STYLE.md habit 11).
//!
//! Intake ([`crate::events`]) produces these, the store ([`crate::store`]) keeps them, and the
//! status API shows them; none of those may own them, because intake writes to the store and
//! the store must not import intake. What lives here is plain data: no I/O, no secrets, and
//! nothing from the rest of the crate.
//!
//! The store's own records (`TicketRecord`, `TenantRecord`, `TokenRecord`, ...) stay in
//! [`crate::store`]: only the store defines how they are kept.

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

//! HTTP handlers, one module per resource.

pub mod audits;
pub mod chat;
pub mod health;
pub mod metrics;
pub mod models;
pub mod providers;

//! Where APIServices come from. Each source publishes complete [`Snapshot`]s for the routing
//! writer and reports the objects it had to reject, with reasons.
//!
//! [`Snapshot`]: crate::routing::writer::Snapshot

pub mod file;
pub mod kube;

//! Helpers shared by the integration and end-to-end suites.
//!
//! Every test binary compiles this whole module, and each uses only part of it.
#![allow(dead_code)]

pub mod backend;
pub mod client;
pub mod cluster;
pub mod cluster_proxy;
pub mod h2_backend;
pub mod raw;
pub mod slow_backend;
pub mod standalone;
pub mod wait;

//! The real-cluster harness, which lives in the crate as [`kube_aggregation_proxy::testbed`]
//! (the binary's `demo --cluster` and the benchmarks use it too).

pub use kube_aggregation_proxy::testbed::*;

//! Settings shared by the criterion micro-benchmarks. Each bench uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use std::sync::Arc;

use criterion::Criterion;
use kube_aggregation_proxy::apiservice::ServiceReference;

/// Short runs, so the whole micro-benchmark suite takes a couple of minutes on two cores.
pub fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

/// The one backend service the benchmark APIServices point at.
pub fn backend_service() -> ServiceReference {
    ServiceReference {
        namespace: "bench".into(),
        name: "backend".into(),
        port: 443,
        ca_bundle: Arc::from(&b""[..]),
        insecure_skip_tls_verify: true,
    }
}

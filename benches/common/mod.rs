//! Settings shared by the criterion micro-benchmarks.

use std::time::Duration;

use criterion::Criterion;

/// Short runs, so the whole micro-benchmark suite takes a couple of minutes on two cores.
pub fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

//! The two runtime models, each through a real proxy. A test binary of its own: it counts this
//! process's per-core threads, which any other proxy in the process would add to.

mod common;

use std::time::Duration;

use common::standalone::{backend_connections, Standalone, TOKEN};
use http::StatusCode;
use kube_aggregation_proxy::runtime::{cores, RuntimeModel};

/// This process's threads that are per-core runtimes.
fn core_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("kap-core-"))
        .count()
}

/// Twenty clients, a connection each (the kernel spreads them over per-core listeners), half
/// over HTTP/1.1 and half over HTTP/2; each sees the authenticated user.
async fn twenty_clients(env: &Standalone) {
    for i in 0..20 {
        let builder = env.client().bearer(TOKEN);
        let client = if i % 2 == 0 { builder.http1_only() } else { builder.http2_only() }.build();
        let response = client.get(&env.url("/apis/echo.example.com/v1/x")).await.unwrap();
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        assert_eq!(response.json()["user"]["name"], "alice");
    }
}

/// Per core is the default: a runtime thread per core, each accepting on its own listener and
/// reaching the backend on connections of its own; shutdown ends the threads. With
/// `--runtime work-stealing` there are no such threads. One test, so the two never overlap.
#[tokio::test]
async fn per_core_by_default_with_a_thread_per_core_and_work_stealing_when_asked() {
    let env = Standalone::start_with(|s| s.runtime = None).await;
    assert_eq!(core_threads(), cores(), "the default runs a runtime per core");
    twenty_clients(&env).await;
    assert!(backend_connections(&env).await >= cores(), "a backend connection per runtime");
    let Standalone { proxy, .. } = env;
    tokio::time::timeout(Duration::from_secs(30), proxy.shutdown()).await.expect("shutdown completes");
    assert_eq!(core_threads(), 0, "the per-core threads ended");

    let env = Standalone::start_with(|s| s.runtime = Some(RuntimeModel::WorkStealing)).await;
    assert_eq!(core_threads(), 0, "work-stealing runs no per-core threads");
    twenty_clients(&env).await;
    let Standalone { proxy, .. } = env;
    tokio::time::timeout(Duration::from_secs(30), proxy.shutdown()).await.expect("shutdown completes");
}

//! Heap allocations per proxied request, counted by a counting global allocator (dhat's).
//!
//! The standalone demo (the proxy and the sample extension server, in this process) serves
//! `GET /apis/echo.example.com/v1/x` a few thousand times over HTTP/2, once through the proxy
//! (bearer token) and once straight to the sample server (the front-proxy certificate and
//! `X-Remote-User`, as the proxy sends it). Client and backend do the same work both ways, so
//! the difference is what the proxy allocates per request. Everything in the process is
//! counted, the proxy's background tasks included; a quiet run of the same length is
//! measured too and subtracted.
//!
//! `cargo bench --bench allocations` (about ten seconds). Figures are in benches/RESULTS.md.
//! With `DHAT_FILE=path` the run also writes dhat's heap profile (allocation sites with their
//! stacks; view it with dhat's viewer or read the JSON) to find where the allocations are.

mod common;

use std::time::{Duration, Instant};

use common::HttpsClient;
use http_body_util::{BodyExt, Empty};
use kube_aggregation_proxy::demo::Demo;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const WARMUP: usize = 500;
const REQUESTS: usize = 5_000;
const PATH: &str = "/apis/echo.example.com/v1/x";

/// Sends `n` requests one after the other; panics on any answer but 200.
async fn run(client: &HttpsClient, url: &str, headers: &[(&str, &str)], n: usize) {
    for _ in 0..n {
        let mut request = http::Request::get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = client.request(request.body(Empty::new()).expect("request")).await.expect("response");
        assert_eq!(response.status(), 200, "{url}");
        response.into_body().collect().await.expect("body");
    }
}

/// Blocks and bytes allocated while `f` runs.
async fn counted<F: std::future::Future<Output = ()>>(f: F) -> (u64, u64) {
    let before = dhat::HeapStats::get();
    f.await;
    let after = dhat::HeapStats::get();
    (after.total_blocks - before.total_blocks, after.total_bytes - before.total_bytes)
}

fn main() {
    let _profiler = common::dhat_profiler();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let demo = Demo::start(dir.path(), 0).await.expect("demo starts");
        let pki = dir.path().join("pki");
        let ca = std::fs::read_to_string(pki.join("serving-ca.crt")).expect("serving CA");
        let (cert, key) = (pki.join("proxy-client.crt"), pki.join("proxy-client.key"));
        let proxied = common::https_client(&ca, None, true);
        let direct = common::https_client(&ca, Some((&cert, &key)), true);
        let proxy_url = format!("https://localhost:{}{PATH}", demo.proxy.local_addr().port());
        let direct_url = format!("https://localhost:{}{PATH}", demo.sample_addr.port());
        let bearer = format!("Bearer {}", demo.token);
        let through_proxy = [("authorization", bearer.as_str())];
        let as_proxy = [("x-remote-user", "demo-token-user"), ("x-remote-group", "demo")];

        run(&proxied, &proxy_url, &through_proxy, WARMUP).await;
        run(&direct, &direct_url, &as_proxy, WARMUP).await;
        let started = Instant::now();
        let (proxy_blocks, proxy_bytes) = counted(run(&proxied, &proxy_url, &through_proxy, REQUESTS)).await;
        let proxy_time = started.elapsed();
        let started = Instant::now();
        let (direct_blocks, direct_bytes) = counted(run(&direct, &direct_url, &as_proxy, REQUESTS)).await;
        let direct_time = started.elapsed();
        // Background work (availability, discovery) over as long as both runs took.
        let (idle_blocks, idle_bytes) = counted(tokio::time::sleep(proxy_time + direct_time)).await;
        let idle_share = |x: u64, t: Duration| x as f64 * t.as_secs_f64() / (proxy_time + direct_time).as_secs_f64();

        let per = |x: f64| x / REQUESTS as f64;
        let proxy_blocks = per(proxy_blocks as f64 - idle_share(idle_blocks, proxy_time));
        let direct_blocks = per(direct_blocks as f64 - idle_share(idle_blocks, direct_time));
        let proxy_bytes = per(proxy_bytes as f64 - idle_share(idle_bytes, proxy_time));
        let direct_bytes = per(direct_bytes as f64 - idle_share(idle_bytes, direct_time));
        println!(
            "allocations per request, HTTP/2, {REQUESTS} sequential requests (client + server + proxy, in process)"
        );
        println!("  through the proxy: {proxy_blocks:8.1} allocations {proxy_bytes:10.0} bytes");
        println!("  direct:            {direct_blocks:8.1} allocations {direct_bytes:10.0} bytes");
        println!(
            "  the proxy's share: {:8.1} allocations {:10.0} bytes",
            proxy_blocks - direct_blocks,
            proxy_bytes - direct_bytes
        );
        println!("  background while idle: {idle_blocks} allocations over {:?}", proxy_time + direct_time);
        demo.shutdown().await;
    });
}

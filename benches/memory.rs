//! Memory held per APIService: the heap the proxy's data takes, and the resident set of the
//! real binary with its own allocator.
//!
//! The standalone demo (the proxy and the sample extension server) starts with its two
//! APIServices; then `SCALE` more (10,000 by default, 100 per manifest file, as
//! `benches/load.sh`'s scale step writes them) are dropped into its manifest directory. They
//! name the sample server, which serves none of their groups, so they are routed, probed and
//! unavailable, as the load benchmark's are. Two runs:
//!
//! - **Heap, in this process**: dhat's counting allocator samples the bytes in use before and
//!   while they are loaded; the difference over `SCALE` is what one APIService's data holds.
//! - **Resident set, the binary**: `kube-aggregation-proxy demo` as users run it (mimalloc,
//!   its own threads), with VmRSS before and while loaded and VmHWM, the peak. The gap
//!   between the two runs is the allocator's and the process's, not the data's.
//!
//! `cargo bench --bench memory` (about a minute). Figures are in benches/RESULTS.md.
//! With `DHAT_FILE=path` the heap run also writes dhat's heap profile, taken while the
//! APIServices are loaded: each allocation site's bytes live at that moment (`eb`), with its
//! stack.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::HttpsClient;
use http_body_util::{BodyExt, Empty};
use kube_aggregation_proxy::demo::Demo;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// How long the heap is watched once the APIServices are routed: several availability rounds
/// and discovery resyncs, so what they keep is counted.
const WATCH: Duration = Duration::from_secs(15);
const LOAD_DEADLINE: Duration = Duration::from_secs(120);
const BINARY: &str = env!("CARGO_BIN_EXE_kube-aggregation-proxy");

fn manifest(n: usize, ca_b64: &str) -> String {
    format!(
        "---\napiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: v1.scale{n}.example.com\n\
         spec:\n  group: scale{n}.example.com\n  version: v1\n  groupPriorityMinimum: {gpm}\n  versionPriority: 15\n  \
         service:\n    namespace: kube-system\n    name: sample-apiserver\n    port: 443\n  caBundle: {ca_b64}\n",
        gpm = 100 + n % 900,
    )
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The heap in use, sampled every 250 ms for `period`: (last, highest).
async fn watch_heap(period: Duration) -> (usize, usize) {
    let end = Instant::now() + period;
    let mut highest = 0;
    loop {
        let now = dhat::HeapStats::get().curr_bytes;
        highest = highest.max(now);
        if Instant::now() >= end {
            return (now, highest);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Writes `scale` APIServices into `dir`, 100 per file, each file renamed into place whole.
fn write_manifests(dir: &Path, staging: &Path, scale: usize, ca_pem: &str) {
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    for start in (0..scale).step_by(100) {
        let text: String = (start..(start + 100).min(scale)).map(|n| manifest(n, &ca_b64)).collect();
        std::fs::write(staging, text).expect("write manifest");
        std::fs::rename(staging, dir.join(format!("scale-{:05}.yaml", start / 100))).expect("rename manifest");
    }
}

/// Polls `ready` every 50 ms until it holds; panics after [`LOAD_DEADLINE`].
async fn until_loaded<F: std::future::Future<Output = bool>>(what: &str, mut ready: impl FnMut() -> F) -> Duration {
    let started = Instant::now();
    while !ready().await {
        assert!(started.elapsed() < LOAD_DEADLINE, "{what} not ready within {LOAD_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

fn heap_in_process(scale: usize) {
    let profiler = common::dhat_profiler();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let demo = Demo::start(dir.path(), 0).await.expect("demo starts");
        let initial = demo.proxy.table().apiservices().len();
        let (base, _) = watch_heap(WATCH / 3).await;

        let ca = std::fs::read_to_string(dir.path().join("pki/serving-ca.crt")).expect("serving CA");
        write_manifests(&dir.path().join("apiservices"), &dir.path().join("staging.tmp"), scale, &ca);
        let routed_after = until_loaded("the in-process demo's APIServices", || {
            let routed = demo.proxy.table().apiservices().len();
            async move { routed >= initial + scale }
        })
        .await;
        let (loaded, highest) = watch_heap(WATCH).await;
        let stats = dhat::HeapStats::get();
        // Ends the profile here, while the APIServices are loaded: its end-of-run figures are
        // what they hold.
        drop(profiler);

        println!("heap in use (dhat), the demo in process with {initial} APIServices and then {scale} more");
        println!("  before:         {:8.1} MiB", mib(base));
        println!("  loaded:         {:8.1} MiB (highest {:.1} MiB while watched)", mib(loaded), mib(highest));
        println!("  per APIService: {:8.0} bytes", (loaded.saturating_sub(base)) as f64 / scale as f64);
        println!("  routed after {routed_after:.1?}; blocks in use {}", stats.curr_blocks);
        demo.shutdown().await;
    });
}

/// A field of /proc/<pid>/status in bytes (VmRSS, VmHWM).
fn status_bytes(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc status"));
    let kb: usize = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB");
    kb * 1024
}

/// `aggregator_routing_table_apiservices` from the demo's /metrics.
async fn routed_apiservices(client: &HttpsClient, url: &str, bearer: &str) -> Option<usize> {
    let request = http::Request::get(url).header("authorization", bearer).body(Empty::new()).ok()?;
    let response = client.request(request).await.ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    let text = std::str::from_utf8(&body).ok()?;
    let line = text.lines().find(|l| l.starts_with("aggregator_routing_table_apiservices "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn rss_of_binary(scale: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(dir.path().join("demo.log")).expect("log file");
        let mut child = Command::new(BINARY)
            .args(["demo", "--dir"])
            .arg(dir.path().join("demo"))
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the demo");
        let pid = child.id();
        let demo = dir.path().join("demo");
        until_loaded("the demo's kubeconfig", || {
            let written = demo.join("kubeconfig").exists();
            async move { written }
        })
        .await;
        let kubeconfig = std::fs::read_to_string(demo.join("kubeconfig")).expect("kubeconfig");
        let server = kubeconfig.lines().find_map(|l| l.trim().strip_prefix("server: ")).expect("server in kubeconfig");
        let url = format!("{server}/metrics");
        let tokens = std::fs::read_to_string(demo.join("tokens.csv")).expect("tokens.csv");
        let bearer = format!("Bearer {}", tokens.split(',').next().expect("a token"));
        let ca = std::fs::read_to_string(demo.join("pki/serving-ca.crt")).expect("serving CA");
        let client = common::https_client(&ca, None, false);

        let initial = routed_apiservices(&client, &url, &bearer).await.expect("the demo's /metrics");
        // The same settling time as the heap run before sampling.
        tokio::time::sleep(WATCH / 3).await;
        let base = status_bytes(pid, "VmRSS");
        write_manifests(&demo.join("apiservices"), &dir.path().join("staging.tmp"), scale, &ca);
        let routed_after = until_loaded("the demo's APIServices", || {
            let (client, url, bearer) = (&client, &url, &bearer);
            async move { routed_apiservices(client, url, bearer).await.is_some_and(|n| n >= initial + scale) }
        })
        .await;
        tokio::time::sleep(WATCH).await;
        let loaded = status_bytes(pid, "VmRSS");
        let peak = status_bytes(pid, "VmHWM");
        let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
        let ended = Instant::now();
        while child.try_wait().expect("wait for the demo").is_none() {
            if ended.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        println!("resident set, `kube-aggregation-proxy demo` with {initial} APIServices and then {scale} more");
        println!("  before:         {:8.1} MiB", mib(base));
        println!("  loaded:         {:8.1} MiB (peak VmHWM {:.1} MiB)", mib(loaded), mib(peak));
        println!("  per APIService: {:8.0} bytes", (loaded.saturating_sub(base)) as f64 / scale as f64);
        println!("  routed after {routed_after:.1?}");
    });
}

fn main() {
    let scale: usize = std::env::var("SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    heap_in_process(scale);
    rss_of_binary(scale);
}

//! A stand-in kubelet for metrics-server: one Node object whose status points at a loopback
//! TLS endpoint serving `/metrics/resource` in the Prometheus text format, with a CPU counter
//! that advances at half a core and a fixed working set, so node metrics carry real numbers.
//!
//! Nothing else of the kubelet API is served; metrics-server's `--kubelet-insecure-tls`
//! means the serving certificate is not checked, and no client certificate is asked for.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::pki::CertKey;
use super::Cluster;

/// The Node the stand-in kubelet reports for.
pub const FAKE_NODE_NAME: &str = "kap-e2e-node";
/// Working set reported for the node, in bytes.
pub const FAKE_NODE_MEMORY_BYTES: u64 = 512 * 1024 * 1024;
/// CPU the node appears to use, in cores.
pub const FAKE_NODE_CPU_CORES: f64 = 0.5;

/// The running stand-in; dropping it stops serving.
pub struct FakeKubelet {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl FakeKubelet {
    /// Serves on a free loopback port and registers the Node pointing at it.
    pub fn start(cluster: &Cluster, serving: &CertKey) -> Result<Self, String> {
        let config = server_config(serving)?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("binding the fake kubelet: {e}"))?;
        let port = listener.local_addr().map_err(|e| format!("fake kubelet address: {e}"))?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let stopping = Arc::clone(&stop);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let config = Arc::clone(&config);
                    thread::spawn(move || serve(stream, config, started));
                }
            }
        });
        register_node(cluster, port)?;
        Ok(FakeKubelet { port, stop })
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn server_config(serving: &CertKey) -> Result<Arc<ServerConfig>, String> {
    let chain = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("kubelet certificate PEM: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).map_err(|e| format!("kubelet key PEM: {e}"))?;
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("kubelet serving certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// Answers one request on one connection, whatever the path, with the resource metrics.
fn serve(stream: TcpStream, config: Arc<ServerConfig>, started: Instant) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let Ok(connection) = ServerConnection::new(config) else {
        return;
    };
    let mut tls = StreamOwned::new(connection, stream);
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = resource_metrics(started.elapsed());
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(response.as_bytes());
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn resource_metrics(uptime: Duration) -> String {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    // Start well above zero so the first two samples already give a positive rate.
    let cpu_seconds = 1000.0 + uptime.as_secs_f64() * FAKE_NODE_CPU_CORES;
    format!(
        "# HELP node_cpu_usage_seconds_total [ALPHA] Cumulative cpu time consumed by the node in core-seconds\n\
         # TYPE node_cpu_usage_seconds_total counter\n\
         node_cpu_usage_seconds_total {cpu_seconds} {now_ms}\n\
         # HELP node_memory_working_set_bytes [ALPHA] Current working set of the node in bytes\n\
         # TYPE node_memory_working_set_bytes gauge\n\
         node_memory_working_set_bytes {FAKE_NODE_MEMORY_BYTES} {now_ms}\n\
         # HELP scrape_error [ALPHA] 1 if there was an error while getting container metrics, 0 otherwise\n\
         # TYPE scrape_error gauge\n\
         scrape_error 0\n"
    )
}

/// Creates the Node and sets its status: Ready, InternalIP 127.0.0.1, kubelet port.
fn register_node(cluster: &Cluster, port: u16) -> Result<(), String> {
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {FAKE_NODE_NAME}\n  labels:\n    kubernetes.io/hostname: {FAKE_NODE_NAME}\n"
    ))?;
    let status = serde_json::json!({
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": "localhost"},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "stand-in kubelet of the e2e harness",
            }],
        }
    });
    let out = cluster.kubectl(&[
        "patch",
        "node",
        FAKE_NODE_NAME,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])?;
    if out.success() {
        Ok(())
    } else {
        Err(format!("patching the Node's status: {}", out.stderr))
    }
}

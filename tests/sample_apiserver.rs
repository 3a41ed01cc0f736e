//! The sample extension API server over real TLS on loopback: who it lets in, what it serves,
//! and that its watch stream arrives in pieces over HTTP/1.1 and HTTP/2.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::client::{Chunk, TestClient};
use common::wait::eventually;
use http::{Method, StatusCode, Version};
use kube_aggregation_proxy::auth::requestheader::RequestHeaderConfig;
use kube_aggregation_proxy::auth::x509::ChainVerifier;
use kube_aggregation_proxy::pki::{CertificateAuthority, PemPair};
use kube_aggregation_proxy::testbed::sample::{SampleServer, SampleServerConfig};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PROXY_CN: &str = "front-proxy-client";
const AGGREGATED_ACCEPT: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// PKI for one test: the CA that signs the sample server's serving certificate, the
/// requestheader CA, and the proxy's client certificate from it.
struct Pki {
    serving_ca: CertificateAuthority,
    serving: PemPair,
    front_proxy_ca: CertificateAuthority,
    proxy: PemPair,
}

fn pki() -> Pki {
    let serving_ca = CertificateAuthority::new("sample-serving-ca").unwrap();
    let serving = serving_ca.issue_serving("sample-apiserver", &["localhost", "127.0.0.1"]).unwrap();
    let front_proxy_ca = CertificateAuthority::new("front-proxy-ca").unwrap();
    let proxy = front_proxy_ca.issue_client(PROXY_CN, &[]).unwrap();
    Pki { serving_ca, serving, front_proxy_ca, proxy }
}

struct Running {
    pki: Pki,
    addr: SocketAddr,
    node_name: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// A client that trusts the server, presenting `cert` if given.
    fn client(&self, cert: Option<&PemPair>) -> common::client::TestClientBuilder {
        let builder = TestClient::builder().ca_pem(self.pki.serving_ca.cert_pem());
        match cert {
            Some(cert) => builder.client_cert(cert),
            None => builder,
        }
    }

    /// A client holding the proxy's requestheader certificate.
    fn proxy(&self) -> TestClient {
        self.client(Some(&self.pki.proxy)).build()
    }
}

async fn start_with_node_name(node_name: Option<&str>) -> Running {
    let pki = pki();
    let verifier = ChainVerifier::from_pem(pki.front_proxy_ca.cert_pem().as_bytes(), "front-proxy-ca").unwrap();
    let config = SampleServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        serving: pki.serving.certified_key().unwrap(),
        requestheader: RequestHeaderConfig::with_default_headers(verifier, vec![PROXY_CN.into()]),
        node_name: node_name.map(str::to_owned),
    };
    let server = SampleServer::bind(config).await.unwrap();
    let (addr, node_name) = (server.local_addr(), server.node_name().to_owned());
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running { pki, addr, node_name, shutdown: Some(shutdown), task }
}

async fn start() -> Running {
    start_with_node_name(None).await
}

fn unauthorized_status() -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401})
}

#[tokio::test]
async fn a_caller_without_a_client_certificate_gets_401_with_a_status_body() {
    let server = start().await;
    let client = server.client(None).build();
    for path in ["/apis", "/apis/metrics.k8s.io/v1beta1/nodes", "/apis/echo.example.com/v1/x"] {
        let response = client.request(Method::GET, &server.url(path), &[("X-Remote-User", "alice")], "").await.unwrap();
        assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.json(), unauthorized_status(), "{path}");
    }
    for path in ["/healthz", "/livez", "/readyz"] {
        let response = client.get(&server.url(path)).await.unwrap();
        assert_eq!((response.status, response.text().as_str()), (StatusCode::OK, "ok"), "{path}");
    }
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake_or_gets_401() {
    let server = start().await;
    let stranger = CertificateAuthority::new("other-ca").unwrap().issue_client(PROXY_CN, &[]).unwrap();
    for client in
        [server.client(Some(&stranger)).http1_only().build(), server.client(Some(&stranger)).http2_only().build()]
    {
        match client.request(Method::GET, &server.url("/apis"), &[("X-Remote-User", "alice")], "").await {
            Err(_) => {}
            Ok(response) => assert_eq!(response.status, StatusCode::UNAUTHORIZED),
        }
    }
}

#[tokio::test]
async fn a_requestheader_certificate_with_a_name_not_allowed_gets_401() {
    let server = start().await;
    let impostor = server.pki.front_proxy_ca.issue_client("not-the-proxy", &[]).unwrap();
    let client = server.client(Some(&impostor)).build();
    let response = client.request(Method::GET, &server.url("/apis"), &[("X-Remote-User", "alice")], "").await.unwrap();
    assert_eq!((response.status, response.json()), (StatusCode::UNAUTHORIZED, unauthorized_status()));
}

#[tokio::test]
async fn the_proxy_certificate_without_a_username_header_gets_401() {
    let server = start().await;
    let response = server.proxy().get(&server.url("/apis/echo.example.com/v1/x")).await.unwrap();
    assert_eq!((response.status, response.json()), (StatusCode::UNAUTHORIZED, unauthorized_status()));
}

#[tokio::test]
async fn echo_reports_the_user_groups_extra_and_headers_the_proxy_asserted() {
    let server = start().await;
    let headers = [
        ("X-Remote-User", "alice"),
        ("X-Remote-Uid", "uid-42"),
        ("X-Remote-Group", "dev"),
        ("X-Remote-Group", "ops"),
        ("X-Remote-Extra-Example.com%2Fscopes", "read"),
        ("X-Remote-Extra-Example.com%2Fscopes", "write"),
        ("X-Remote-Extra-Reason", "testing"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
    ];
    for (client, version) in [
        (server.client(Some(&server.pki.proxy)).http1_only().build(), "HTTP/1.1"),
        (server.client(Some(&server.pki.proxy)).http2_only().build(), "HTTP/2.0"),
    ] {
        let url = server.url("/apis/echo.example.com/v1/namespaces/demo/echoes/hello?labelSelector=a%3Db&limit=5");
        let response = client.request(Method::POST, &url, &headers, r#"{"spec":{}}"#).await.unwrap();
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let echo = response.json();
        assert_eq!(echo["kind"], "Echo");
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["path"], "/apis/echo.example.com/v1/namespaces/demo/echoes/hello");
        assert_eq!(echo["query"], "labelSelector=a%3Db&limit=5");
        assert_eq!(echo["httpVersion"], version);
        assert_eq!(echo["host"], server.addr.to_string());
        assert_eq!(echo["body"], r#"{"spec":{}}"#);
        assert_eq!(
            echo["user"],
            json!({
                "name": "alice",
                "uid": "uid-42",
                "groups": ["dev", "ops", "system:authenticated"],
                "extra": {"example.com/scopes": ["read", "write"], "reason": ["testing"]},
            }),
            "{version}"
        );
        assert_eq!(echo["headers"]["x-custom"], json!(["one", "two"]));
        assert_eq!(echo["headers"]["x-remote-group"], json!(["dev", "ops"]));
        assert_eq!(echo["headers"]["x-remote-extra-example.com%2fscopes"], json!(["read", "write"]));
    }
}

/// Nanocores from a Kubernetes decimal quantity (`"123n"`, `"4u"`, `"5m"`, `"2"`).
fn parse_cpu_nanocores(quantity: &str) -> u64 {
    let (digits, scale) = match quantity.char_indices().last() {
        Some((i, 'n')) => (&quantity[..i], 1),
        Some((i, 'u')) => (&quantity[..i], 1_000),
        Some((i, 'm')) => (&quantity[..i], 1_000_000),
        _ => (quantity, 1_000_000_000),
    };
    digits.parse::<u64>().unwrap_or_else(|e| panic!("cpu {quantity:?}: {e}")) * scale
}

/// Bytes from a Kubernetes binary quantity (`"1234Ki"`, `"2Gi"`, `"512"`).
fn parse_memory_bytes(quantity: &str) -> u64 {
    let suffixes = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40)];
    let (digits, scale) = suffixes
        .iter()
        .find_map(|(suffix, scale)| quantity.strip_suffix(suffix).map(|d| (d, *scale)))
        .unwrap_or((quantity, 1));
    digits.parse::<u64>().unwrap_or_else(|e| panic!("memory {quantity:?}: {e}")) * scale
}

/// Seconds from a Go duration of under a minute (`"1.002s"`, `"980ms"`).
fn parse_window_seconds(window: &str) -> f64 {
    if let Some(ms) = window.strip_suffix("ms") {
        return ms.parse::<f64>().unwrap() / 1000.0;
    }
    window.strip_suffix('s').and_then(|s| s.parse::<f64>().ok()).unwrap_or_else(|| panic!("window {window:?}"))
}

fn meminfo_kib(key: &str) -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn node_metrics_report_this_machines_real_cpu_and_memory() {
    let server = start().await;
    let expected_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_ascii_lowercase();
    assert_eq!(server.node_name, expected_name);
    let client = server.proxy();
    let url = server.url("/apis/metrics.k8s.io/v1beta1/nodes");
    // Once the background sampler has taken its second sample, the window is about a second.
    let list = eventually(Duration::from_secs(10), || async {
        let response =
            client.request(Method::GET, &url, &[("X-Remote-User", "alice")], "").await.map_err(|e| e.to_string())?;
        let list = response.json();
        let window = parse_window_seconds(list["items"][0]["window"].as_str().unwrap_or("0s"));
        if (0.5..5.0).contains(&window) {
            Ok(list)
        } else {
            Err(format!("window is {window}s"))
        }
    })
    .await;
    assert_eq!(list["kind"], "NodeMetricsList");
    assert_eq!(list["apiVersion"], "metrics.k8s.io/v1beta1");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let node = &items[0];
    assert_eq!(node["kind"], "NodeMetrics");
    assert_eq!(node["metadata"]["name"], expected_name.as_str());
    assert!(node["timestamp"].as_str().unwrap().ends_with('Z'), "{node}");
    assert!(node["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'), "{node}");

    let cores = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count() as u64;
    let cpu = parse_cpu_nanocores(node["usage"]["cpu"].as_str().unwrap());
    assert!(cpu <= cores * 1_100_000_000, "cpu {cpu}n on {cores} cores");

    let memory = parse_memory_bytes(node["usage"]["memory"].as_str().unwrap());
    let expected = (meminfo_kib("MemTotal") - meminfo_kib("MemAvailable")) * 1024;
    let slack = expected / 4 + (256 << 20);
    assert!(memory.abs_diff(expected) <= slack, "memory {memory} bytes, /proc/meminfo says about {expected}");
    assert!(memory < meminfo_kib("MemTotal") * 1024);
}

#[tokio::test]
async fn a_named_node_answers_and_any_other_name_is_not_found() {
    let server = start_with_node_name(Some("node-under-test")).await;
    let client = server.proxy();
    let alice = [("X-Remote-User", "alice")];
    let url = server.url("/apis/metrics.k8s.io/v1beta1/nodes/node-under-test");
    let response = client.request(Method::GET, &url, &alice, "").await.unwrap();
    assert_eq!(response.status, StatusCode::OK);
    let node = response.json();
    assert_eq!(
        (node["kind"].as_str(), node["metadata"]["name"].as_str()),
        (Some("NodeMetrics"), Some("node-under-test"))
    );
    parse_cpu_nanocores(node["usage"]["cpu"].as_str().unwrap());
    parse_memory_bytes(node["usage"]["memory"].as_str().unwrap());

    let url = server.url("/apis/metrics.k8s.io/v1beta1/nodes/elsewhere");
    let response = client.request(Method::GET, &url, &alice, "").await.unwrap();
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    assert_eq!(
        response.json(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "nodes.metrics.k8s.io \"elsewhere\" not found", "reason": "NotFound",
            "details": {"name": "elsewhere", "group": "metrics.k8s.io", "kind": "nodes"}, "code": 404,
        })
    );
}

#[tokio::test]
async fn metrics_discovery_is_shaped_as_kube_serves_it() {
    let server = start().await;
    let client = server.proxy();
    let alice = [("X-Remote-User", "alice")];
    let list =
        client.request(Method::GET, &server.url("/apis/metrics.k8s.io/v1beta1"), &alice, "").await.unwrap().json();
    assert_eq!(
        list,
        json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "metrics.k8s.io/v1beta1",
            "resources": [
                {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "NodeMetrics", "verbs": ["get", "list"]},
                {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "PodMetrics", "verbs": ["get", "list"]},
            ],
        })
    );
    let group = client.request(Method::GET, &server.url("/apis/metrics.k8s.io"), &alice, "").await.unwrap().json();
    assert_eq!(group["kind"], "APIGroup");
    assert_eq!(group["preferredVersion"], json!({"groupVersion": "metrics.k8s.io/v1beta1", "version": "v1beta1"}));
    let echo = client.request(Method::GET, &server.url("/apis/echo.example.com/v1"), &alice, "").await.unwrap().json();
    assert_eq!(echo["resources"][0]["kind"], "Echo");
    assert_eq!(echo["resources"][0]["verbs"], json!(["get", "list", "watch"]));
}

#[tokio::test]
async fn aggregated_discovery_is_served_for_the_v2_accept_header() {
    let server = start().await;
    let client = server.proxy();
    let url = server.url("/apis");
    let response = client
        .request(Method::GET, &url, &[("X-Remote-User", "alice"), ("Accept", AGGREGATED_ACCEPT)], "")
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("content-type"), Some(AGGREGATED_ACCEPT));
    let document = response.json();
    assert_eq!(
        (document["kind"].as_str(), document["apiVersion"].as_str()),
        (Some("APIGroupDiscoveryList"), Some("apidiscovery.k8s.io/v2"))
    );
    let groups: Vec<_> = document["items"].as_array().unwrap().iter().map(|g| g["metadata"]["name"].clone()).collect();
    assert_eq!(groups, [json!("metrics.k8s.io"), json!("echo.example.com")]);
    let nodes = &document["items"][0]["versions"][0]["resources"][0];
    assert_eq!(nodes["resource"], "nodes");
    assert_eq!(nodes["scope"], "Cluster");
    assert_eq!(nodes["responseKind"]["kind"], "NodeMetrics");

    let legacy = client
        .request(Method::GET, &url, &[("X-Remote-User", "alice"), ("Accept", "application/json")], "")
        .await
        .unwrap();
    assert_eq!(legacy.header("content-type"), Some("application/json"));
    assert_eq!(legacy.json()["kind"], "APIGroupList");
}

/// Reads the watch, then checks it arrived as separate events over time.
async fn assert_watch_arrives_in_pieces(client: TestClient, url: &str, version: Version) {
    let headers = [("X-Remote-User", "alice")];
    let response = client.request_streaming(Method::GET, url, &headers, "").await.unwrap();
    assert_eq!((response.status, response.version), (StatusCode::OK, version));
    let started = response.started;
    let chunks: Vec<Chunk> = response.collect_chunks().await.unwrap();
    let ended = Instant::now();

    let events: Vec<Value> = chunks
        .iter()
        .flat_map(|c| {
            c.data
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let sequences: Vec<u64> = events.iter().map(|e| e["object"]["sequence"].as_u64().unwrap()).collect();
    assert_eq!(sequences, [1, 2, 3], "{version:?}");
    assert!(events.iter().all(|e| e["type"] == "ADDED" && e["object"]["user"]["name"] == "alice"));

    assert!(chunks.len() >= 3, "{version:?}: {} chunks", chunks.len());
    let first = chunks[0].at;
    assert!(
        first.duration_since(started) < Duration::from_millis(900),
        "{version:?}: first event after {:?}",
        first - started
    );
    assert!(
        ended.duration_since(first) > Duration::from_millis(1800),
        "{version:?}: stream ended {:?} after the first event",
        ended - first
    );
    assert!(
        ended.duration_since(started) >= Duration::from_millis(2900),
        "{version:?}: timeoutSeconds=3 but ended after {:?}",
        ended - started
    );
}

#[tokio::test]
async fn echo_watch_arrives_in_pieces_over_http1() {
    let server = start().await;
    let client = server.client(Some(&server.pki.proxy)).http1_only().build();
    let url = server.url("/apis/echo.example.com/v1/namespaces/demo/echoes?watch=true&timeoutSeconds=3");
    assert_watch_arrives_in_pieces(client, &url, Version::HTTP_11).await;
}

#[tokio::test]
async fn echo_watch_arrives_in_pieces_over_http2() {
    let server = start().await;
    let client = server.client(Some(&server.pki.proxy)).http2_only().build();
    let url = server.url("/apis/echo.example.com/v1/echoes?watch=1&timeoutSeconds=3");
    assert_watch_arrives_in_pieces(client, &url, Version::HTTP_2).await;
}

#[tokio::test]
async fn shutdown_ends_open_watches_and_stops_accepting() {
    let mut server = start().await;
    let client = server.proxy();
    let url = server.url("/apis/echo.example.com/v1/echoes?watch=true&timeoutSeconds=300");
    let mut watch = client.request_streaming(Method::GET, &url, &[("X-Remote-User", "alice")], "").await.unwrap();
    assert!(watch.next_chunk().await.unwrap().is_some());

    let _ = server.shutdown.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(10), &mut server.task).await.expect("server stops").unwrap();
    let mut rest = 0;
    while let Ok(Some(_)) = watch.next_chunk().await {
        rest += 1;
        assert!(rest < 10, "watch kept streaming after shutdown");
    }
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err(), "still accepting after shutdown");
}

#[tokio::test]
async fn the_binary_rejects_bad_flags_with_exit_code_64() {
    let binary = env!("CARGO_BIN_EXE_sample-apiserver");
    let missing = std::process::Command::new(binary).output().unwrap();
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--requestheader-client-ca-file"));

    let unreadable = std::process::Command::new(binary)
        .args(["--requestheader-client-ca-file", "/nonexistent/ca.crt", "--tls-cert-file", "/nonexistent/tls.crt"])
        .output()
        .unwrap();
    assert_eq!(unreadable.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&unreadable.stderr);
    assert!(stderr.contains("--requestheader-client-ca-file: /nonexistent/ca.crt"), "{stderr}");
    assert!(stderr.contains("--tls-private-key-file"), "{stderr}");
}

#[tokio::test]
async fn the_binary_serves_with_files_from_flags_and_stops_on_sigterm() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    pki.serving.write(dir.path(), "serving").unwrap();
    std::fs::write(dir.path().join("front-proxy-ca.crt"), pki.front_proxy_ca.cert_pem()).unwrap();
    // Find a free port; the tiny window before the binary binds it is acceptable on loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sample-apiserver"))
        .args(["--bind-address", "127.0.0.1", "--secure-port", &port.to_string()])
        .args(["--tls-cert-file", &path("serving.crt"), "--tls-private-key-file", &path("serving.key")])
        .args(["--requestheader-client-ca-file", &path("front-proxy-ca.crt")])
        .args(["--requestheader-allowed-names", &format!("someone-else,{PROXY_CN}"), "--node-name", "flag-node"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let client = TestClient::builder().ca_pem(pki.serving_ca.cert_pem()).client_cert(&pki.proxy).build();
    let url = format!("https://127.0.0.1:{port}/apis/metrics.k8s.io/v1beta1/nodes/flag-node");
    let node = eventually(Duration::from_secs(15), || async {
        let response =
            client.request(Method::GET, &url, &[("X-Remote-User", "alice")], "").await.map_err(|e| e.to_string())?;
        if response.status == StatusCode::OK {
            Ok(response.json())
        } else {
            Err(format!("status {}", response.status))
        }
    })
    .await;
    assert_eq!(node["metadata"]["name"], "flag-node");

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status =
        tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits after SIGTERM").unwrap();
    assert!(status.success(), "{status}");
}

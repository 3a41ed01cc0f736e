//! Hostile and broken input against a real proxy on loopback: silent and trickling
//! connections, connection floods (also under a low open-file limit, in a child process),
//! dripped request bodies, in-flight limits, pathological manifests and identities that are
//! not ASCII. Each test keeps a canary client asking the proxy for real answers meanwhile.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::client::TestClient;
use common::raw::{self, closed_within, drip_body, h2_client, tls_config, tls_connect};
use common::standalone::{apiservice_yaml, Standalone};
use common::wait::{eventually, eventually_status};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const ECHO: &str = "/apis/echo.example.com/v1/namespaces/default/things/x";
/// How long a connection the proxy decided to close may take to go: its deadline, plus the
/// graceful close, plus scheduling on a busy machine.
const CLOSE_SLACK: Duration = Duration::from_secs(4);

/// Keeps asking the proxy for the echo route until stopped; counts answers and failures.
struct Canary {
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Canary {
    fn start(client: TestClient, url: String) -> Self {
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (o, f) = (ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            // Bounded: stops when told, or after 2,000 requests.
            for _ in 0..2_000 {
                match client.get(&url).await {
                    Ok(r) if r.status == StatusCode::OK => o.fetch_add(1, Ordering::SeqCst),
                    _ => f.fetch_add(1, Ordering::SeqCst),
                };
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        });
        Self { ok, failed, stop, task }
    }

    /// Stops and returns (answered, failed).
    async fn finish(self) -> (usize, usize) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        (self.ok.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst))
    }
}

fn fast_deadlines(s: &mut kube_aggregation_proxy::config::Settings) {
    s.tls_handshake_timeout = Some("1s".into());
    s.request_header_timeout = Some("1s".into());
    s.idle_connection_timeout = Some("2s".into());
}

/// Writes `bytes` one at a time, `every` apart, until the peer stops taking them.
fn trickle<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(mut w: W, bytes: Vec<u8>, every: Duration) {
    tokio::spawn(async move {
        for b in bytes {
            if w.write_all(&[b]).await.is_err() || w.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
}

#[tokio::test]
async fn silent_and_trickling_connections_are_closed_within_their_deadlines_while_others_are_served() {
    let env = Standalone::start_with(fast_deadlines).await;
    let addr = env.proxy.local_addr();
    let ca = env.pki.serving_ca.cert_pem();
    let canary = Canary::start(env.admin(), env.url(ECHO));

    // TCP only: the TLS handshake never starts.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // TLS done, then nothing, with either protocol.
    let mut silent_h1 = tls_connect(addr, tls_config(ca, &[b"http/1.1"], None)).await.unwrap();
    let mut silent_h2 = tls_connect(addr, tls_config(ca, &[b"h2"], None)).await.unwrap();
    // An HTTP/2 preface and SETTINGS, and no stream.
    let mut preface_only = tls_connect(addr, tls_config(ca, &[b"h2"], None)).await.unwrap();
    preface_only.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    preface_only.flush().await.unwrap();
    // HTTP/2 slowloris: preface, then a HEADERS frame a byte at a time.
    let h2_slow = tls_connect(addr, tls_config(ca, &[b"h2"], None)).await.unwrap();
    let (mut h2_slow_read, h2_slow_write) = tokio::io::split(h2_slow);
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    frames.extend_from_slice(&[0, 0, 64, 1, 4, 0, 0, 0, 1]);
    frames.extend(std::iter::repeat_n(0x82u8, 64));
    trickle(h2_slow_write, frames, Duration::from_millis(200));
    // HTTP/1.1 slowloris: request headers a byte at a time.
    let h1_slow = tls_connect(addr, tls_config(ca, &[b"http/1.1"], None)).await.unwrap();
    let (mut h1_slow_read, h1_slow_write) = tokio::io::split(h1_slow);
    trickle(
        h1_slow_write,
        b"GET /apis HTTP/1.1\r\nHost: localhost\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
        Duration::from_millis(200),
    );

    let deadline = Duration::from_secs(1) + CLOSE_SLACK;
    let (a, b, c, d, e, f) = tokio::join!(
        closed_within(&mut tcp, deadline),
        closed_within(&mut silent_h1, deadline),
        closed_within(&mut silent_h2, deadline),
        closed_within(&mut preface_only, deadline),
        closed_within(&mut h2_slow_read, deadline),
        closed_within(&mut h1_slow_read, deadline),
    );
    for (what, closed) in [
        ("silent TCP", a),
        ("silent TLS, HTTP/1.1", b),
        ("silent TLS, h2", c),
        ("h2 preface only", d),
        ("h2 slowloris", e),
        ("HTTP/1.1 slowloris", f),
    ] {
        closed.unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let (ok, failed) = canary.finish().await;
    assert!(ok > 0, "the canary got answers");
    assert_eq!(failed, 0, "the canary never failed");
    let metrics = env.admin().get(&env.url("/metrics")).await.unwrap().text();
    for reason in ["tls-handshake-timeout", "request-header-timeout"] {
        assert!(
            metrics.contains(&format!("aggregator_proxy_connections_closed_total{{reason=\"{reason}\"}}")),
            "{reason}: {metrics}"
        );
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout_but_a_quiet_watch_is_not() {
    let env = Standalone::start_with(fast_deadlines).await;
    let mut h2 = h2_client(env.proxy.local_addr(), env.pki.serving_ca.cert_pem(), &env.pki.admin).await;
    // A watch whose events come every second for 4 s: longer than the 2 s idle timeout, so
    // only the request in flight keeps the connection open.
    let (_drip, body) = drip_body();
    drop(_drip);
    let request =
        http::Request::get(env.url("/apis/echo.example.com/v1/things?watch=true&timeoutSeconds=4")).body(body).unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect()).await.unwrap().unwrap();
    let events = String::from_utf8_lossy(&body.to_bytes()).matches("\"ADDED\"").count();
    assert!(events >= 3, "the watch streamed to its end: {events} events");
    // Now idle: closed within the idle timeout and its grace.
    eventually(Duration::from_secs(2) + CLOSE_SLACK, || {
        let closed = h2.is_closed();
        async move {
            if closed {
                Ok(())
            } else {
                Err("still open")
            }
        }
    })
    .await;
}

/// A TLS connection from `source` that completes its handshake, or the error that ended it.
async fn connect_from(
    source: Ipv4Addr,
    addr: SocketAddr,
    ca: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let tcp = socket.connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(tls_config(ca, &[b"http/1.1"], None))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    // A refused connection is closed right after accept: the handshake, or the first read, fails.
    match tokio::time::timeout(Duration::from_millis(300), tokio::io::AsyncReadExt::read(&mut tls, &mut [0u8; 1])).await
    {
        Ok(Ok(0)) | Ok(Err(_)) => Err(std::io::Error::other("closed by the proxy")),
        _ => Ok(tls),
    }
}

#[tokio::test]
async fn connections_past_the_caps_are_refused_and_established_ones_keep_working() {
    let env = Standalone::start_with(|s| {
        s.max_connections = Some(6);
        s.max_connections_per_client = Some(3);
    })
    .await;
    let (addr, ca) = (env.proxy.local_addr(), env.pki.serving_ca.cert_pem());
    // The canary's HTTP/2 connection is the first from 127.0.0.1.
    let canary = env.client().client_cert(&env.pki.admin).http2_only().build();
    assert_eq!(canary.get(&env.url(ECHO)).await.unwrap().status, 200);
    let local = Ipv4Addr::LOCALHOST;
    let other = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect_from(local, addr, ca).await.expect("within the per-client share"));
    }
    assert!(connect_from(local, addr, ca).await.is_err(), "a fourth connection from one address is refused");
    for _ in 0..3 {
        held.push(connect_from(other, addr, ca).await.expect("another address has its own share"));
    }
    assert!(connect_from(other, addr, ca).await.is_err(), "the seventh connection is past max-connections");
    assert_eq!(canary.get(&env.url(ECHO)).await.unwrap().status, 200, "established connections keep working");
    held.truncate(4);
    eventually(Duration::from_secs(5), || async {
        connect_from(other, addr, ca).await.map(drop).map_err(|e| e.to_string())
    })
    .await;
    let metrics = canary.get(&env.url("/metrics")).await.unwrap().text();
    // At least one: an attempt of the wait above may come before the freed place is given
    // back (per core, on the runtime that served the closed connection) and be refused too.
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("aggregator_proxy_connections_refused_total{reason=\"max-connections\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(refused.is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(
        metrics.contains("aggregator_proxy_connections_refused_total{reason=\"max-connections-per-client\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("aggregator_proxy_max_connections 6"), "{metrics}");
}

#[tokio::test]
async fn a_flood_under_a_low_open_file_limit_never_stops_established_clients_and_recovers() {
    let env = Standalone::start().await;
    let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
    let mut settings = env.settings.clone();
    settings.secure_port = Some(port);
    // The file form of the service map is a mapping.
    let services: std::collections::BTreeMap<String, String> = settings
        .services
        .drain(..)
        .filter_map(|s| s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let mut file = serde_json::to_value(&settings).unwrap();
    file["services"] = serde_json::to_value(services).unwrap();
    let config = env.dir.path().join("flood.yaml");
    std::fs::write(&config, serde_yaml_ng::to_string(&file).unwrap()).unwrap();
    let log = env.dir.path().join("flood.log");
    let command = format!(
        "ulimit -n 300 && exec '{}' serve --config '{}' 2>'{}'",
        env!("CARGO_BIN_EXE_kube-aggregation-proxy"),
        config.display(),
        log.display()
    );
    let mut child = tokio::process::Command::new("sh").arg("-c").arg(command).kill_on_drop(true).spawn().unwrap();
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");
    let canary = env.client().client_cert(&env.pki.admin).http2_only().build();
    eventually_status(Duration::from_secs(15), &canary, &url(ECHO), StatusCode::OK).await;
    let budget = canary.get(&url("/metrics")).await.unwrap().text();
    assert!(budget.contains("aggregator_proxy_max_connections 44"), "300 descriptors, 256 kept back: {budget}");

    // 600 connections that never speak: far past the budget and the descriptor limit.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut flood = Vec::new();
    for _ in 0..600 {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            flood.push(tcp);
        }
    }
    for _ in 0..20 {
        let r = canary.get(&url(ECHO)).await.expect("the established client is served during the flood");
        assert_eq!(r.status, 200);
    }
    drop(flood);
    // After the flood, new clients get in again.
    let fresh = env.client().client_cert(&env.pki.admin).build();
    eventually_status(Duration::from_secs(20), &fresh, &url(ECHO), StatusCode::OK).await;
    let metrics = canary.get(&url("/metrics")).await.unwrap().text();
    assert!(metrics.contains("aggregator_proxy_connections_refused_total{reason=\"max-connections\"}"), "{metrics}");
    let _ = child.kill().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let refused_lines = text.lines().filter(|l| l.contains("connection refused")).count();
    assert!(refused_lines <= 30, "refusals are logged at most once a second, not {refused_lines} lines");
}

/// `(sender, request)` for a POST or GET whose body the test drips.
fn dripping(method: http::Method, url: String) -> (raw::Drip, http::Request<raw::DripBody>) {
    let (tx, body) = drip_body();
    (tx, http::Request::builder().method(method).uri(url).body(body).unwrap())
}

#[tokio::test]
async fn a_dripped_request_body_gets_kubes_504_at_the_request_timeout() {
    let env = Standalone::start_with(|s| s.request_timeout = Some("1s".into())).await;
    let mut h2 = h2_client(env.proxy.local_addr(), env.pki.serving_ca.cert_pem(), &env.pki.admin).await;
    let (tx, request) = dripping(http::Method::POST, env.url("/apis/echo.example.com/v1/namespaces/default/things"));
    tokio::spawn(async move {
        // Bounded: 100 bytes, 300 ms apart, far beyond the deadline.
        for _ in 0..100 {
            if tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let response = tokio::time::timeout(Duration::from_secs(10), h2.send_request(request)).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["reason"], "Timeout");
    assert_eq!(status["message"], "Timeout: request did not complete within the allotted timeout");
    // A shorter ?timeout= of the client's own is honoured; a malformed one is a 400.
    let client = env.admin();
    let bad = client.get(&env.url("/apis/echo.example.com/v1/things?timeout=soon")).await.unwrap();
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"].as_str().unwrap().starts_with("invalid timeout specified in the request URL"));
    // Watches are long-running: no deadline.
    let watch = client.get(&env.url("/apis/echo.example.com/v1/things?watch=true&timeoutSeconds=2")).await.unwrap();
    assert_eq!(watch.status, 200);
    assert!(watch.text().matches("\"ADDED\"").count() >= 2, "the watch outlived the request timeout");
}

#[tokio::test]
async fn past_max_requests_inflight_requests_get_429_with_retry_after_and_system_masters_still_gets_in() {
    let env = Standalone::start_with(|s| s.max_requests_inflight = Some(1)).await;
    let bob_cert = env.pki.client_ca.issue_client("bob", &["dev"]).unwrap();
    let bob = env.client().client_cert(&bob_cert).build();
    // One read-only request held in flight by a body that does not end.
    let mut h2 = h2_client(env.proxy.local_addr(), env.pki.serving_ca.cert_pem(), &bob_cert).await;
    let (held_body, request) = dripping(http::Method::GET, env.url("/apis/echo.example.com/v1/things/held"));
    let held = tokio::spawn(async move { h2.send_request(request).await.map(|r| r.status()) });
    let refused = eventually_status(Duration::from_secs(10), &bob, &env.url(ECHO), StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["reason"], "TooManyRequests");
    assert_eq!(env.admin().get(&env.url(ECHO)).await.unwrap().status, 200, "system:masters is never refused");
    let watch = bob.get(&env.url("/apis/echo.example.com/v1/things?watch=true&timeoutSeconds=1")).await.unwrap();
    assert_eq!(watch.status, 200, "watches are not counted");
    let post = bob
        .request(
            http::Method::POST,
            &env.url("/apis/echo.example.com/v1/namespaces/default/things"),
            &[],
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
    assert_eq!(post.status, 200, "mutating requests have their own pool");
    drop(held_body);
    assert_eq!(held.await.unwrap().unwrap(), 200);
    eventually_status(Duration::from_secs(5), &bob, &env.url(ECHO), StatusCode::OK).await;
    let metrics = bob.get(&env.url("/metrics")).await.unwrap().text();
    assert!(metrics.contains("aggregator_proxy_inflight_rejections_total{request_kind=\"readOnly\"}"), "{metrics}");
}

#[tokio::test]
async fn hostile_manifests_are_rejected_with_reasons_while_requests_keep_being_served() {
    let env = Standalone::start().await;
    let canary = Canary::start(env.admin(), env.url(ECHO));
    let dir = env.apiservices_dir();
    // 200 KB of nesting, the case that once took 23 s of CPU on the request runtime.
    std::fs::write(dir.join("deep.yaml"), format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000))).unwrap();
    let block: String = (0..400).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
    std::fs::write(dir.join("deep-block.yaml"), block).unwrap();
    std::fs::write(dir.join("big.yaml"), "# padding\n".repeat(210_000)).unwrap();
    std::fs::write(dir.join("latin1.yaml"), b"kind: APIService\nmetadata: {name: caf\xe9}\n").unwrap();
    let laughs = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n";
    std::fs::write(dir.join("laughs.yaml"), laughs).unwrap();
    let many: String = (0..1001)
        .map(|i| format!("---\n{}", apiservice_yaml(&format!("v1.g{i}.example.com"), 100, 10, None, None)))
        .collect();
    std::fs::write(dir.join("many.yaml"), many).unwrap();
    let fifo = dir.join("fifo.yaml");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    std::os::unix::fs::symlink(dir.join("loop-b.yaml"), dir.join("loop-a.yaml")).unwrap();
    std::os::unix::fs::symlink(dir.join("loop-a.yaml"), dir.join("loop-b.yaml")).unwrap();
    // A good file turned bad keeps its route and says why.
    std::fs::write(dir.join("echo.yaml"), b"\xff\xfe not text").unwrap();

    let expected = [
        ("deep.yaml", "nests at least"),
        ("deep-block.yaml", "nests at least"),
        ("big.yaml", "more than --apiservices-max-file-size (1048576 bytes)"),
        ("latin1.yaml", "is not valid UTF-8 (at byte 37)"),
        ("laughs.yaml", "YAML aliases, more than the limit of 16"),
        ("many.yaml", "holds 1001 APIServices, more than --apiservices-max-per-file (1000)"),
        ("fifo.yaml", "is a FIFO, not a regular file"),
        ("loop-a.yaml", "cannot be read"),
        ("loop-b.yaml", "cannot be read"),
        ("echo.yaml", "is not valid UTF-8 (at byte 0)"),
    ];
    let admin = env.admin();
    let rejected = eventually(Duration::from_secs(15), || async {
        let debug = admin.get(&env.url("/debug/apiservices")).await.map_err(|e| e.to_string())?.json();
        let rejected = debug["rejected"].as_array().cloned().unwrap_or_default();
        let missing: Vec<_> = expected
            .iter()
            .filter(|(file, words)| {
                !rejected.iter().any(|r| {
                    r["source"].as_str().is_some_and(|s| s.ends_with(file))
                        && r["reason"].as_str().is_some_and(|reason| reason.contains(words))
                })
            })
            .collect();
        if missing.is_empty() {
            Ok(rejected)
        } else {
            Err(format!("missing {missing:?} in {rejected:#?}"))
        }
    })
    .await;
    assert_eq!(rejected.len(), expected.len(), "{rejected:#?}");
    assert_eq!(admin.get(&env.url(ECHO)).await.unwrap().status, 200, "echo.yaml's last good route stays");
    let (ok, failed) = canary.finish().await;
    assert!(ok > 0);
    assert_eq!(failed, 0, "requests kept being answered while the manifests were read");
    let metrics = admin.get(&env.url("/metrics")).await.unwrap().text();
    for kind in [
        "too-deep",
        "too-large",
        "not-utf8",
        "too-many-aliases",
        "too-many-objects",
        "not-a-regular-file",
        "unreadable",
    ] {
        assert!(
            metrics.contains(&format!("aggregator_manifest_rejections_total{{reason=\"{kind}\"}}")),
            "{kind}: {metrics}"
        );
    }
}

#[tokio::test]
async fn non_ascii_identities_reach_the_backend_and_unsendable_ones_are_refused() {
    let tokens = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tokens.path(), "token-jurgen,jürgen,1,\"développeurs,ops\"\ntoken-bell,eve,2,\"a\u{7}b\"\n")
        .unwrap();
    let path = tokens.path().to_owned();
    let env = Standalone::start_with(|s| s.token_auth_file = Some(path)).await;
    let jurgen = env.client().bearer("token-jurgen").build();
    let echo = jurgen.get(&env.url(ECHO)).await.unwrap();
    assert_eq!(echo.status, 200, "{}", echo.text());
    let seen = echo.json();
    assert_eq!(seen["user"]["name"], "jürgen", "the backend saw the user: {seen}");
    assert_eq!(seen["user"]["groups"][0], "développeurs");
    // The Host the client used, not the backend's address.
    assert_eq!(seen["headers"]["x-forwarded-host"][0], env.proxy.local_addr().to_string());
    let bell = env.client().bearer("token-bell").build().get(&env.url(ECHO)).await.unwrap();
    assert_eq!(bell.status, 500);
    assert_eq!(
        bell.json()["message"],
        "Internal error occurred: the identity of this request cannot be sent to the backend: X-Remote-Group would contain a control character"
    );
}

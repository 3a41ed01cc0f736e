//! The backend connection layer against real HTTP/2 backends on loopback: stream limits and
//! long watches, balancing and ejection across endpoints, a backend process stopped with
//! SIGSTOP, GOAWAY under load,
//! a backend that never answers, and a request whose headers the backend would choke on.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::h2_backend::H2Backend;
use common::standalone::Standalone;
use common::wait::{eventually, eventually_status};
use http::StatusCode;
use kube_aggregation_proxy::config::Settings;

const GROUP: &str = "b.example.com";

fn manifest() -> String {
    manifest_for(GROUP, "")
}

/// `v1.<group>` on service `kube-system/b`, with `annotations` (a YAML flow mapping's insides).
fn manifest_for(group: &str, annotations: &str) -> String {
    format!(
        "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {{name: v1.{group}, annotations: {{{annotations}}}}}\n\
         spec: {{group: {group}, version: v1, groupPriorityMinimum: 100, versionPriority: 10, insecureSkipTLSVerify: true,\n\
         service: {{namespace: kube-system, name: b, port: 443}}}}\n"
    )
}

/// The standalone proxy with APIService `v1.b.example.com` on `endpoints`.
async fn proxy_for(endpoints: &[SocketAddr], adjust: impl FnOnce(&mut Settings)) -> Standalone {
    proxy_with(endpoints, &[("b.yaml", manifest())], &[GROUP], adjust).await
}

/// The standalone proxy with service `kube-system/b` on `endpoints` and `manifests` loaded,
/// once every one of `groups` is routed.
async fn proxy_with(
    endpoints: &[SocketAddr],
    manifests: &[(&str, String)],
    groups: &[&str],
    adjust: impl FnOnce(&mut Settings),
) -> Standalone {
    let list: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
    let env = Standalone::start_with(|s| {
        s.services.push(format!("kube-system/b:443={}", list.join(",")));
        adjust(s);
    })
    .await;
    for (file, yaml) in manifests {
        env.write_manifest(file, yaml);
    }
    let admin = env.admin();
    eventually(Duration::from_secs(10), || async {
        let debug = admin.get(&env.url("/debug/apiservices")).await.map_err(|e| e.to_string())?.json();
        let routed =
            |group: &&str| debug["apiservices"].as_array().is_some_and(|a| a.iter().any(|x| x["group"] == *group));
        if groups.iter().all(routed) {
            Ok(())
        } else {
            Err("not routed yet".to_owned())
        }
    })
    .await;
    env
}

fn url(env: &Standalone, rest: &str) -> String {
    env.url(&format!("/apis/{GROUP}/v1/{rest}"))
}

fn dead_address() -> SocketAddr {
    // Bound, then released: nothing listens there.
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap()
}

async fn metrics(env: &Standalone) -> String {
    env.admin().get(&env.url("/metrics")).await.unwrap().text()
}

/// Waits until `want` requests are in flight to the endpoint at `addr`.
async fn eventually_in_flight(env: &Standalone, addr: SocketAddr, want: f64, deadline: Duration) {
    let in_flight = format!("aggregator_backend_requests_in_flight{{endpoint=\"{addr}\"}}");
    eventually(deadline, || async {
        let n = metric(&metrics(env).await, &in_flight).unwrap_or(-1.0);
        if n == want {
            Ok(())
        } else {
            Err(format!("{n} in flight, not {want}"))
        }
    })
    .await;
}

/// The value of a metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_thousand_watches_past_the_backends_stream_limit_never_starve_short_requests() {
    let backend = H2Backend::start("b1", 100).await;
    let env = proxy_for(&[backend.addr], |s| s.http2_max_streams_per_connection = Some(1100)).await;
    let client = env.client().client_cert(&env.pki.admin).http2_only().build();
    // Each watch is read as a client reads one, counting the events it gets.
    let events = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut watches = Vec::new();
    for i in 0..1000 {
        let mut watch = client.get_streaming(&url(&env, &format!("things?watch=true&w={i}"))).await.unwrap();
        assert_eq!(watch.status, 200, "watch {i}");
        let events = events.clone();
        watches.push(tokio::spawn(async move {
            while let Ok(Some(_)) = watch.next_chunk().await {
                events.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Every watch holds a stream; a short GET still gets through, each within a second.
    let quick = env.client().client_cert(&env.pki.admin).http2_only().timeout(Duration::from_secs(1)).build();
    for i in 0..20 {
        let r = quick.get(&url(&env, &format!("things/t{i}"))).await.unwrap_or_else(|e| panic!("short GET {i}: {e}"));
        assert_eq!(r.status, 200);
    }
    // The watches are still streaming, and none has ended.
    let seen = events.load(Ordering::Relaxed);
    eventually(Duration::from_secs(5), || async {
        let now = events.load(Ordering::Relaxed);
        if now >= seen + 1000 {
            Ok(())
        } else {
            Err(format!("{} events since", now - seen))
        }
    })
    .await;
    assert!(watches.iter().all(|w| !w.is_finished()), "every watch is still open");
    let text = metrics(&env).await;
    let label = format!("aggregator_backend_connections{{endpoint=\"{}\"}}", backend.addr);
    let connections = metric(&text, &label).unwrap_or_default();
    assert!(connections >= 11.0, "1000 watches at 100 streams a connection need 11 connections: {connections}");
    for watch in watches {
        watch.abort();
    }
    eventually_in_flight(&env, backend.addr, 0.0, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_dead_endpoint_and_a_failing_one_are_ejected_and_clients_stop_seeing_errors() {
    let good = H2Backend::start("good", 100).await;
    let failing = H2Backend::start("failing", 100).await;
    failing.fail.store(true, Ordering::SeqCst);
    let dead = dead_address();
    let env = proxy_for(&[good.addr, failing.addr, dead], |_| {}).await;
    let client = env.admin();
    let mut errors = Vec::new();
    for i in 0..80 {
        let r = client.get(&url(&env, &format!("things/{i}"))).await.unwrap();
        if r.status != 200 {
            errors.push((i, r.status));
        }
    }
    // The dead endpoint's refusals are retried elsewhere; the failing one's 500s reach the
    // client until it is ejected (five in a row) or the balancer stops picking it, then
    // nothing does.
    assert!(errors.iter().all(|(i, _)| *i < 40), "errors after the first 40 requests: {errors:?}");
    assert!(errors.len() <= 10, "{errors:?}");
    let text = metrics(&env).await;
    let ejections =
        |addr: SocketAddr| metric(&text, &format!("aggregator_backend_ejections_total{{endpoint=\"{addr}\"}}"));
    assert!(ejections(dead).is_some_and(|n| n >= 1.0), "the dead endpoint was ejected: {text}");
    assert!(metric(&text, "aggregator_backend_retries_total").is_some_and(|n| n >= 1.0), "{text}");
    let failing_served = failing.requests.load(Ordering::SeqCst);
    assert!(
        ejections(failing.addr).is_some_and(|n| n >= 1.0) || failing_served <= 10,
        "the failing endpoint is ejected or avoided: {failing_served} requests"
    );
    // Recovered, it is probed back in by real traffic once its backoff ends.
    failing.fail.store(false, Ordering::SeqCst);
    let before = failing.requests.load(Ordering::SeqCst);
    eventually(Duration::from_secs(40), || async {
        let r = client.get(&url(&env, "things/again")).await.map_err(|e| e.to_string())?;
        let served = failing.requests.load(Ordering::SeqCst) > before;
        if r.status == 200 && served {
            Ok(())
        } else {
            Err(format!("{} / back in: {served}", r.status))
        }
    })
    .await;
}

/// The sample extension server as its own process (`sample-apiserver`), trusting the test
/// PKI's front-proxy CA, on `port`. Killed when dropped.
fn sample_process(env: &Standalone, port: u16) -> tokio::process::Child {
    let dir = env.dir.path().join("sample-process");
    std::fs::create_dir_all(&dir).unwrap();
    env.pki.sample_serving.write(&dir, "serving").unwrap();
    std::fs::write(dir.join("front-proxy-ca.crt"), env.pki.front_proxy_ca.cert_pem()).unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sample-apiserver"))
        .args(["--bind-address", "127.0.0.1", "--secure-port", &port.to_string()])
        .args(["--tls-cert-file", &path("serving.crt"), "--tls-private-key-file", &path("serving.key")])
        .args(["--requestheader-client-ca-file", &path("front-proxy-ca.crt")])
        .args(["--requestheader-allowed-names", common::standalone::PROXY_CLIENT_CN])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("still running").to_string();
    assert!(std::process::Command::new("kill").args([format!("-{name}"), pid]).status().unwrap().success());
}

#[tokio::test]
async fn a_backend_stopped_with_sigstop_is_found_dead_within_five_seconds_and_serves_again_after_sigcont() {
    const ECHO: &str = "echo.example.com";
    // Free port for the backend process; the window before it binds is acceptable on loopback.
    let port = dead_address().port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let env = proxy_with(&[addr], &[("echo.yaml", manifest_for(ECHO, ""))], &[ECHO], |s| {
        s.backend_connect_timeout = Some("1s".into());
    })
    .await;
    let backend = sample_process(&env, port);
    let client = env.client().client_cert(&env.pki.admin).timeout(Duration::from_secs(20)).build();
    let echo = |rest: &str| env.url(&format!("/apis/{ECHO}/v1/namespaces/default/{rest}"));
    // `echo.yaml` replaced the standalone set-up's APIService of the same name: wait until the
    // process answers (the echo names the host it was sent to).
    eventually(Duration::from_secs(15), || async {
        let r = client.get(&echo("things/x")).await.map_err(|e| e.to_string())?;
        match (r.status, r.json()["host"].as_str()) {
            (StatusCode::OK, Some(host)) if host == addr.to_string() => Ok(()),
            (status, host) => Err(format!("{status}, answered by {host:?}")),
        }
    })
    .await;
    let mut watch = client.get_streaming(&echo("things?watch=true&timeoutSeconds=120")).await.unwrap();
    assert!(watch.next_chunk().await.unwrap().is_some());

    signal(&backend, "STOP");
    let stopped_at = std::time::Instant::now();
    // The watch's connection is declared dead (HTTP/2 PING unanswered): the stream fails.
    while let Ok(Some(_)) = watch.next_chunk().await {}
    let found = stopped_at.elapsed();
    // 5 s is the default ping interval plus timeout; the rest is slack for a loaded machine.
    assert!(found < Duration::from_secs(8), "found dead after {found:?}");
    // New requests fail fast with a Status naming the APIService while it stays stopped.
    let asked_at = std::time::Instant::now();
    let r = client.get(&echo("things/x")).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(asked_at.elapsed() < Duration::from_secs(5), "took {:?}", asked_at.elapsed());
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(message.starts_with(&format!("APIService \"v1.{ECHO}\" is unavailable: ")), "{message}");
    let text = metrics(&env).await;
    let closed = format!("aggregator_backend_connections_closed_total{{endpoint=\"{addr}\",reason=\"ping-timeout\"}}");
    assert!(text.contains(&closed), "{text}");

    signal(&backend, "CONT");
    eventually_status(Duration::from_secs(40), &client, &echo("things/x"), StatusCode::OK).await;
}

#[tokio::test]
async fn goaway_under_steady_load_of_gets_loses_no_request() {
    let backend = H2Backend::start("rotating", 100).await;
    let env = proxy_for(&[backend.addr], |_| {}).await;
    let client = env.admin();
    let mut failures = Vec::new();
    for round in 0..6 {
        let requests: Vec<_> = (0..50)
            .map(|i| {
                let (client, url) = (client.clone(), url(&env, &format!("things/{round}-{i}")));
                tokio::spawn(async move { client.get(&url).await.map(|r| (r.status, r.text())) })
            })
            .collect();
        backend.goaway();
        for r in requests {
            match r.await.unwrap() {
                Ok((StatusCode::OK, _)) => {}
                other => failures.push(format!("{other:?}")),
            }
        }
    }
    let text = metrics(&env).await;
    let backend_lines: Vec<_> = text.lines().filter(|l| l.starts_with("aggregator_backend")).collect();
    assert!(failures.is_empty(), "{} failed, the first: {:?}; {backend_lines:#?}", failures.len(), failures.first());
    assert!(backend.connections.load(Ordering::SeqCst) >= 2, "GOAWAY made the proxy open new connections");
}

#[tokio::test]
async fn a_backend_that_never_answers_gets_504_at_the_deadline_and_holds_no_queue() {
    let backend = H2Backend::start("silent", 100).await;
    let env = proxy_for(&[backend.addr], |s| s.request_timeout = Some("1s".into())).await;
    let client = env.admin();
    let hung: Vec<_> = (0..50)
        .map(|_| {
            let (client, direct) = (client.clone(), url(&env, "hang"));
            tokio::spawn(async move { client.get(&direct).await.map(|r| (r.status, r.json())) })
        })
        .collect();
    for h in hung {
        let (status, body) = h.await.unwrap().unwrap();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body["reason"], "Timeout");
    }
    eventually_in_flight(&env, backend.addr, 0.0, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn one_users_oversized_header_gets_431_while_another_users_watch_keeps_streaming() {
    let backend = H2Backend::start("picky", 100).await;
    let env = proxy_for(&[backend.addr], |_| {}).await;
    let watcher = env.client().client_cert(&env.pki.admin).http2_only().build();
    let mut watch = watcher.get_streaming(&url(&env, "things?watch=true")).await.unwrap();
    assert!(watch.next_chunk().await.unwrap().is_some());
    let big = "x".repeat(100 * 1024);
    let other = env.client().bearer(common::standalone::TOKEN).http1_only().build();
    let r = other
        .request(http::Method::GET, &url(&env, "things/big"), &[("x-big", big.as_str())], bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(message.starts_with("APIService \"v1.b.example.com\": the request headers are "), "{message}");
    // The watch on the shared connection never noticed.
    for _ in 0..5 {
        assert!(watch.next_chunk().await.unwrap().is_some(), "the watch keeps streaming");
    }
    assert_eq!(other.get(&url(&env, "things/small")).await.unwrap().status, 200);
}

#[tokio::test]
async fn past_max_pending_requests_new_ones_fail_fast_with_503() {
    let backend = H2Backend::start("narrow", 1).await;
    let env = proxy_for(&[backend.addr], |s| {
        s.backend_max_connections_per_endpoint = Some(1);
        s.backend_max_pending_requests = Some(2);
        // The limits are per pool, and per core each runtime has a pool of its own: the
        // probe's connection could land on another runtime than the hung requests'.
        s.runtime = Some(kube_aggregation_proxy::runtime::RuntimeModel::WorkStealing);
        // Long enough that the hung requests hold their places however slow the machine is;
        // the test ends them itself.
        s.request_timeout = Some("120s".into());
    })
    .await;
    let client = env.client().client_cert(&env.pki.admin).timeout(Duration::from_secs(120)).build();
    // Available first. The availability probe goes through the same one-stream connection,
    // and one queued behind the hung requests would find no place and fail the APIService.
    eventually_status(Duration::from_secs(10), &client, &url(&env, "things/x"), StatusCode::OK).await;
    // One connection of one stream, held by a hung request; two more may wait.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let (client, direct) = (client.clone(), url(&env, "hang"));
            tokio::spawn(async move { client.get(&direct).await.map(|r| r.status) })
        })
        .collect();
    eventually_in_flight(&env, backend.addr, 1.0, Duration::from_secs(10)).await;
    // A probe that arrives before both waiting places are taken waits itself: its client gives
    // up after a second, which frees its place, and the next probe tries again.
    let probe = env.client().client_cert(&env.pki.admin).timeout(Duration::from_secs(1)).build();
    let refused =
        eventually_status(Duration::from_secs(10), &probe, &url(&env, "things/x"), StatusCode::SERVICE_UNAVAILABLE)
            .await;
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        refused.json()["message"].as_str().unwrap().contains("requests are already waiting for a connection"),
        "{}",
        refused.text()
    );
    for h in held {
        h.abort();
    }
    let text = metrics(&env).await;
    assert!(
        metric(&text, &format!("aggregator_backend_queue_rejections_total{{endpoint=\"{}\"}}", backend.addr))
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

/// The proxy with `v1.b.example.com` annotated with `annotations` and `v1.c.example.com` not,
/// both on one backend.
async fn annotated(backend: &H2Backend, annotations: &str, adjust: impl FnOnce(&mut Settings)) -> Standalone {
    let manifests = [("b.yaml", manifest_for(GROUP, annotations)), ("c.yaml", manifest_for("c.example.com", ""))];
    proxy_with(&[backend.addr], &manifests, &[GROUP, "c.example.com"], adjust).await
}

#[tokio::test]
async fn an_apiservices_flow_control_answers_429_past_its_limits_and_spares_the_others() {
    let backend = H2Backend::start("fragile", 100).await;
    let env = annotated(
        &backend,
        "kube-aggregation-proxy.io/max-requests-inflight: '2', kube-aggregation-proxy.io/requests-per-second: '50'",
        |_| {},
    )
    .await;
    let client = env.admin();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (client, hang) = (client.clone(), url(&env, "hang"));
            tokio::spawn(async move { client.get(&hang).await.map(|r| r.status) })
        })
        .collect();
    // Both hung requests hold their places before the next one comes.
    eventually_in_flight(&env, backend.addr, 2.0, Duration::from_secs(10)).await;
    let refused = client.get(&url(&env, "things/x")).await.unwrap();
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"));
    let status = refused.json();
    assert_eq!(status["reason"], "TooManyRequests");
    assert_eq!(
        status["message"],
        "APIService \"v1.b.example.com\": too many requests in flight (at most 2), please try again later"
    );
    assert_eq!(
        client.get(&env.url("/apis/c.example.com/v1/things/x")).await.unwrap().status,
        200,
        "other APIServices are unaffected"
    );
    for h in held {
        h.abort();
    }
    eventually_status(Duration::from_secs(10), &client, &url(&env, "things/x"), StatusCode::OK).await;
    // The rate: 50 a second with a burst of 50; 200 at once meet it.
    let burst: Vec<_> = (0..200)
        .map(|i| {
            let (client, u) = (client.clone(), url(&env, &format!("things/{i}")));
            tokio::spawn(async move { client.get(&u).await.map(|r| r.status) })
        })
        .collect();
    let mut limited = 0;
    for b in burst {
        if b.await.unwrap().unwrap() == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    assert!(limited > 0, "the token bucket refused some of 200 requests at once");
    let text = metrics(&env).await;
    assert!(
        metric(&text, "aggregator_apiservice_flow_rejections_total{reason=\"in-flight\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

#[tokio::test]
async fn an_annotated_long_running_subresource_outlives_the_request_timeout() {
    let backend = H2Backend::start("streamy", 100).await;
    let env = annotated(&backend, "kube-aggregation-proxy.io/long-running-subresources: 'stream, tail'", |s| {
        s.request_timeout = Some("1s".into())
    })
    .await;
    let client = env.admin();
    let count_chunks = |u: String| {
        let client = client.clone();
        async move {
            let mut stream = client.get_streaming(&u).await.map_err(|e| e.to_string())?;
            let mut chunks = 0;
            while chunks < 25 {
                match stream.next_chunk().await {
                    Ok(Some(_)) => chunks += 1,
                    _ => break,
                }
            }
            Ok::<_, String>(chunks)
        }
    };
    let long = count_chunks(url(&env, "namespaces/default/things/x/stream")).await.unwrap();
    assert_eq!(long, 25, "the annotated subresource streams past the 1 s deadline");
    let cut = count_chunks(env.url("/apis/c.example.com/v1/namespaces/default/things/x/stream")).await.unwrap();
    assert!(cut < 15, "without the annotation the stream ends at the 1 s deadline: {cut} chunks");
}

#[tokio::test]
async fn an_availability_round_asks_each_endpoint_once_over_shared_connections() {
    let backend = H2Backend::start("many", 100).await;
    let groups: Vec<String> = (0..500).map(|i| format!("g{i}.example.com")).collect();
    let list: Vec<String> = groups
        .iter()
        .map(|g| format!("{{\"name\":\"{g}\",\"versions\":[{{\"groupVersion\":\"{g}/v1\",\"version\":\"v1\"}}]}}"))
        .collect();
    *backend.apis.lock().unwrap() =
        Some(format!("{{\"kind\":\"APIGroupList\",\"apiVersion\":\"v1\",\"groups\":[{}]}}", list.join(",")));
    let manifests: String = groups.iter().map(|g| format!("---\n{}", manifest_for(g, ""))).collect();
    let env =
        proxy_with(&[backend.addr], &[("many.yaml", manifests)], &["g0.example.com", "g499.example.com"], |_| {}).await;
    let admin = env.admin();
    eventually(Duration::from_secs(30), || async {
        let debug = admin.get(&env.url("/debug/apiservices")).await.map_err(|e| e.to_string())?.json();
        let available = debug["apiservices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| {
                        x["group"].as_str().is_some_and(|g| g.starts_with('g')) && x["available"]["status"] == "True"
                    })
                    .count()
            })
            .unwrap_or(0);
        if available == 500 {
            Ok(())
        } else {
            Err(format!("{available} of 500 available"))
        }
    })
    .await;
    // One /apis per endpoint per round (the discovery fetcher asks it once too, and fetches
    // each group-version's document once), not a request, let alone a TLS connection, per
    // APIService per round.
    let connections = backend.connections.load(Ordering::SeqCst);
    let paths = backend.paths.lock().unwrap().clone();
    let mut by_path: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for p in &paths {
        *by_path.entry(p.as_str()).or_default() += 1;
    }
    assert!(by_path.get("/apis").is_some_and(|n| *n <= 2), "{by_path:?}");
    let repeated: Vec<_> = by_path.iter().filter(|(p, n)| **n > 1 && **p != "/apis").collect();
    assert!(repeated.is_empty(), "asked more than once: {repeated:?}");
    assert!(connections <= 3, "{connections} connections for 500 APIServices");
}

#[tokio::test]
async fn an_openapi_v3_document_the_proxy_could_not_fetch_is_asked_of_the_backend() {
    // The stand-in answers every path with its name, so its `/openapi/v3` is no index and the
    // proxy holds no v3 document for the group: the request goes to the backend instead of a
    // 404 until the next round.
    let backend = H2Backend::start("openapi", 100).await;
    let env = proxy_for(&[backend.addr], |_| {}).await;
    let admin = env.admin();
    let index = admin.get(&env.url("/openapi/v3")).await.unwrap().json();
    assert!(index["paths"].get(format!("apis/{GROUP}/v1")).is_none(), "{index}");
    let document = admin.get(&env.url(&format!("/openapi/v3/apis/{GROUP}/v1"))).await.unwrap();
    assert_eq!(document.status, StatusCode::OK, "{}", document.text());
    assert!(document.text().contains("openapi"), "{}", document.text());
}

//! Aggregated discovery and OpenAPI through the standalone proxy, over real TLS on loopback:
//! the merged documents, ETag and 304, a dead backend marked stale and recovering, a slow
//! backend that does not slow discovery down, and kubectl reading both against the demo.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::client::{TestClient, TestResponse};
use common::slow_backend::{SlowBackend, SLOW_GROUP};
use common::standalone::{apiservice_yaml, Sample, Standalone, SAMPLE_NAMESPACE};
use common::wait::eventually;
use kube_aggregation_proxy::demo::Demo;
use kube_aggregation_proxy::pki::CertificateAuthority;
use serde_json::Value;

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
/// What client-go 1.30–1.36 sends.
const CLIENT_GO_ACCEPT: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,\
    application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
const SETTLE: Duration = Duration::from_secs(10);

async fn get_with(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> TestResponse {
    client.request(http::Method::GET, url, headers, bytes::Bytes::new()).await.expect("request completes")
}

async fn aggregated(env: &Standalone) -> TestResponse {
    let response = get_with(&env.admin(), &env.url("/apis"), &[("accept", CLIENT_GO_ACCEPT)]).await;
    assert_eq!(response.status, 200, "{}", response.text());
    response
}

fn group<'a>(document: &'a Value, name: &str) -> Option<&'a Value> {
    document["items"].as_array()?.iter().find(|g| g["metadata"]["name"] == name)
}

fn group_names(document: &Value) -> Vec<String> {
    document["items"].as_array().unwrap().iter().map(|g| g["metadata"]["name"].as_str().unwrap().to_owned()).collect()
}

fn freshness(document: &Value, name: &str) -> Option<String> {
    Some(group(document, name)?["versions"][0]["freshness"].as_str()?.to_owned())
}

#[tokio::test]
async fn aggregated_discovery_merges_the_backends_in_priority_order_with_an_etag() {
    let env = Standalone::start().await;
    let response = aggregated(&env).await;
    assert_eq!(response.header("content-type"), Some(AGGREGATED));
    assert_eq!(response.header("vary"), Some("Accept"));
    assert_eq!(response.header("cache-control"), Some("public"));
    let etag = response.header("etag").expect("an ETag").to_owned();
    assert_eq!(etag.len(), 130, "{etag}");
    assert!(etag.trim_matches('"').chars().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()), "{etag}");

    let document = response.json();
    assert_eq!(document["kind"], "APIGroupDiscoveryList");
    assert_eq!(document["apiVersion"], "apidiscovery.k8s.io/v2");
    // echo.example.com has groupPriorityMinimum 1000, metrics.k8s.io 100.
    assert_eq!(group_names(&document), ["apiregistration.k8s.io", "echo.example.com", "metrics.k8s.io"]);
    let metrics = group(&document, "metrics.k8s.io").unwrap();
    assert_eq!(metrics["versions"][0]["version"], "v1beta1");
    assert_eq!(metrics["versions"][0]["freshness"], "Current");
    let nodes = &metrics["versions"][0]["resources"][0];
    assert_eq!(nodes["resource"], "nodes");
    assert_eq!(nodes["scope"], "Cluster");
    assert_eq!(nodes["responseKind"]["kind"], "NodeMetrics");

    // The client's copy is current: 304, no body, same ETag.
    let again = get_with(&env.admin(), &env.url("/apis"), &[("accept", AGGREGATED), ("if-none-match", &etag)]).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let stale_copy =
        get_with(&env.admin(), &env.url("/apis"), &[("accept", AGGREGATED), ("if-none-match", "\"0\"")]).await;
    assert_eq!(stale_copy.status, 200);
}

#[tokio::test]
async fn legacy_discovery_is_answered_unless_the_aggregated_document_is_asked_for_first() {
    let env = Standalone::start().await;
    let admin = env.admin();
    for accept in ["application/json", &format!("application/json,{AGGREGATED}"), &format!("{AGGREGATED};q=0")] {
        let legacy = get_with(&admin, &env.url("/apis"), &[("accept", accept)]).await;
        assert_eq!(legacy.json()["kind"], "APIGroupList", "{accept}");
    }
    // As in kube, `/apis/` never answers the aggregated document.
    let slash = get_with(&admin, &env.url("/apis/"), &[("accept", AGGREGATED)]).await;
    assert_eq!(slash.json()["kind"], "APIGroupList");
    // No delegate: the core group is not served, in either form.
    let core = get_with(&admin, &env.url("/api"), &[("accept", AGGREGATED)]).await;
    assert_eq!(core.status, 404);
    // Discovery is authenticated like everything else.
    let anonymous = env.client().build();
    assert_eq!(get_with(&anonymous, &env.url("/apis"), &[("accept", AGGREGATED)]).await.status, 401);
    assert_eq!(get_with(&anonymous, &env.url("/openapi/v2"), &[]).await.status, 401);
}

#[tokio::test]
async fn a_stopped_backend_stays_listed_as_stale_and_comes_back_current() {
    let mut env = Standalone::start().await;
    assert_eq!(freshness(&aggregated(&env).await.json(), "metrics.k8s.io").as_deref(), Some("Current"));

    env.sample.take().unwrap().stop().await;
    // The periodic refetch comes every minute; ask for one now instead of waiting.
    let document = eventually(SETTLE, || async {
        env.proxy.discovery().resync();
        let document = aggregated(&env).await.json();
        match freshness(&document, "metrics.k8s.io").as_deref() {
            Some("Stale") => Ok(document),
            other => Err(format!("metrics.k8s.io freshness {other:?}")),
        }
    })
    .await;
    // The last known resources are kept, for every group of the dead backend.
    let metrics = group(&document, "metrics.k8s.io").unwrap();
    assert_eq!(metrics["versions"][0]["resources"][0]["resource"], "nodes");
    assert_eq!(freshness(&document, "echo.example.com").as_deref(), Some("Stale"));
    assert_eq!(group_names(&document), ["apiregistration.k8s.io", "echo.example.com", "metrics.k8s.io"]);

    env.sample = Some(Sample::start(&env.pki, env.sample_addr).await);
    eventually(SETTLE, || async {
        env.proxy.discovery().resync();
        let document = aggregated(&env).await.json();
        match (freshness(&document, "metrics.k8s.io"), freshness(&document, "echo.example.com")) {
            (Some(m), Some(e)) if m == "Current" && e == "Current" => Ok(()),
            other => Err(format!("freshness {other:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_slow_backend_does_not_slow_discovery_down() {
    let ca = CertificateAuthority::new("slow-backend-ca").unwrap();
    let serving = ca.issue_serving("slow", &[&format!("slow.{SAMPLE_NAMESPACE}.svc")]).unwrap();
    let slow = SlowBackend::start(&serving, Duration::from_secs(3)).await;
    let slow_addr = slow.addr;
    let env = Standalone::start_with(|s| s.services.push(format!("{SAMPLE_NAMESPACE}/slow:443={slow_addr}"))).await;
    env.write_manifest(
        "slow.yaml",
        &apiservice_yaml(&format!("v1.{SLOW_GROUP}"), 2000, 15, Some(("slow", 443)), Some(ca.cert_pem())),
    );

    // The proxy has started fetching from the slow backend, which sits on the request.
    eventually(SETTLE, || async {
        if slow.started() > 0 {
            Ok(())
        } else {
            Err("no fetch yet")
        }
    })
    .await;
    let asked = Instant::now();
    let document = aggregated(&env).await.json();
    let answered = asked.elapsed();
    assert_eq!(slow.finished(), 0, "the slow fetch ended before discovery answered");
    assert!(answered < slow.delay, "discovery took {answered:?}, the slow backend's delay is {:?}", slow.delay);
    // Never fetched yet: left out rather than listed empty; the others are served as usual.
    assert_eq!(group_names(&document), ["apiregistration.k8s.io", "echo.example.com", "metrics.k8s.io"]);

    // Once it answers, its group leads (groupPriorityMinimum 2000).
    let document = eventually(SETTLE, || async {
        let document = aggregated(&env).await.json();
        if group(&document, SLOW_GROUP).is_some() {
            Ok(document)
        } else {
            Err(format!("groups {:?}", group_names(&document)))
        }
    })
    .await;
    assert_eq!(group_names(&document), ["apiregistration.k8s.io", SLOW_GROUP, "echo.example.com", "metrics.k8s.io"]);
    assert_eq!(group(&document, SLOW_GROUP).unwrap()["versions"][0]["resources"][0]["resource"], "widgets");
}

#[tokio::test]
async fn openapi_v2_and_v3_are_merged_from_the_backends() {
    let env = Standalone::start().await;
    let admin = env.admin();

    let v2 = admin.get(&env.url("/openapi/v2")).await.unwrap();
    assert_eq!(v2.status, 200);
    let etag = v2.header("etag").unwrap().to_owned();
    let spec = v2.json();
    assert_eq!(spec["swagger"], "2.0");
    assert!(spec["paths"].get("/apis/metrics.k8s.io/v1beta1/nodes").is_some());
    assert!(spec["definitions"].get("io.k8s.metrics.pkg.apis.metrics.v1beta1.NodeMetrics").is_some());
    assert!(spec["definitions"].get("com.example.echo.v1.Echo").is_some());
    let again = get_with(&admin, &env.url("/openapi/v2"), &[("if-none-match", &etag)]).await;
    assert_eq!(again.status, 304);
    // JSON only: a protobuf-only client is told so instead of getting bytes it cannot parse.
    let protobuf = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
    assert_eq!(get_with(&admin, &env.url("/openapi/v2"), &[("accept", protobuf)]).await.status, 406);

    let root = admin.get(&env.url("/openapi/v3")).await.unwrap().json();
    let url = root["paths"]["apis/metrics.k8s.io/v1beta1"]["serverRelativeURL"].as_str().unwrap().to_owned();
    assert!(url.starts_with("/openapi/v3/apis/metrics.k8s.io/v1beta1?hash="), "{url}");
    assert!(root["paths"].get("apis/echo.example.com/v1").is_some());
    let document = admin.get(&env.url(&url)).await.unwrap();
    assert_eq!(document.status, 200);
    assert_eq!(document.header("cache-control"), Some("public, immutable"));
    let schemas = &document.json()["components"]["schemas"];
    assert!(schemas.get("io.k8s.metrics.pkg.apis.metrics.v1beta1.PodMetrics").is_some());
    // An outdated hash is sent to the current one.
    let outdated = admin.get(&env.url("/openapi/v3/apis/metrics.k8s.io/v1beta1?hash=OLD")).await.unwrap();
    assert_eq!(outdated.status, 301);
    assert_eq!(outdated.header("location"), Some(url.as_str()));
    assert_eq!(admin.get(&env.url("/openapi/v3/apis/nothing.io/v1")).await.unwrap().status, 404);
}

/// Runs kubectl against the demo with a private cache, off the async runtime.
async fn kubectl(demo: &Demo, cache: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let kubeconfig = demo.kubeconfig.clone();
    let cache = cache.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let output = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .args(&args)
            .output()
            .expect("kubectl runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_discovers_resources_and_explains_types_through_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), 0).await.expect("demo starts");

    // -v=6 logs every request: aggregated discovery means no per-group-version requests.
    let (ok, out, err) = kubectl(&demo, cache.path(), &["api-resources", "-v=6"]).await;
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("nodes") && l.contains("metrics.k8s.io/v1beta1")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("echoes") && l.contains("echo.example.com/v1")), "{out}");
    assert!(!err.contains("/apis/metrics.k8s.io/v1beta1"), "kubectl fell back to legacy discovery:\n{err}");

    let (ok, out, err) = kubectl(&demo, cache.path(), &["explain", "nodes.metrics.k8s.io"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("NodeMetrics"), "{out}");
    assert!(out.contains("usage"), "{out}");

    let (ok, out, err) = kubectl(&demo, cache.path(), &["explain", "echoes.user"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("groups"), "{out}");

    let (ok, out, err) = kubectl(&demo, cache.path(), &["explain", "pods.metrics.k8s.io.containers"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("usage"), "{out}");

    demo.shutdown().await;
}

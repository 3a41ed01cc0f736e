//! Discovery through the proxy in cluster mode, against kube-apiserver's own aggregator:
//! kubectl sees the same APIs, the aggregated documents hold the same group-versions and
//! resources, and a dead backend leaves its group stale instead of breaking everyone.
//!
//! `cargo test --features e2e --test e2e_discovery -- --nocapture` also prints the latency of
//! `/apis` through the proxy and directly (medians, same run).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::client::TestClient;
use common::cluster::{Cluster, User};
use common::cluster_proxy::{blocking, kubectl_as, owned_cluster, ClusterProxy};
use common::wait::eventually;
use http::Method;
use kube_aggregation_proxy::pki::PemPair;

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn pem(user: &User) -> PemPair {
    PemPair { cert_pem: user.cert.cert_pem.clone(), key_pem: user.cert.key_pem.clone() }
}

fn direct_client(cluster: &Cluster, user: &User) -> TestClient {
    TestClient::builder().ca_pem(&cluster.pki().cluster_ca.cert.cert_pem).client_cert(&pem(user)).build()
}

/// (group, version, resource) triples of an aggregated discovery document.
fn resources(doc: &serde_json::Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for group in doc["items"].as_array().into_iter().flatten() {
        let g = group["metadata"]["name"].as_str().unwrap_or_default();
        for version in group["versions"].as_array().into_iter().flatten() {
            let v = version["version"].as_str().unwrap_or_default();
            for resource in version["resources"].as_array().into_iter().flatten() {
                out.insert((g.into(), v.into(), resource["resource"].as_str().unwrap_or_default().into()));
            }
        }
    }
    out
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    lines.sort();
    lines
}

async fn get_aggregated(client: &TestClient, url: &str) -> serde_json::Value {
    let r = client.request(Method::GET, url, &[("accept", AGGREGATED)], "").await.unwrap();
    assert_eq!(r.status, 200, "{url}: {}", r.text());
    assert_eq!(r.header("content-type"), Some(AGGREGATED), "{url}");
    r.json()
}

/// The shared cluster with both extension servers running.
async fn cluster() -> &'static Cluster {
    blocking(|| {
        let c = Cluster::shared();
        c.metrics_server();
        c.sample_apiserver();
        c
    })
    .await
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_discovers_the_same_apis_through_the_proxy_as_from_kube_apiserver() {
    let cluster = cluster().await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(|| Cluster::shared().mint_user("discovery-admin", &["system:masters"]).unwrap()).await;
    let via_proxy = proxy.kubeconfig_for(&admin);
    let direct = admin.kubeconfig.clone();

    for args in [&["api-resources"][..], &["api-versions"], &["explain", "flunders"], &["explain", "flunders.spec"]] {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (a, p, d) = (args.clone(), via_proxy.clone(), direct.clone());
        let (through, straight) = blocking(move || {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            (kubectl_as(Cluster::shared(), &p, &a), kubectl_as(Cluster::shared(), &d, &a))
        })
        .await;
        assert!(through.success(), "kubectl {args:?} through the proxy: {}", through.stderr);
        assert!(straight.success(), "kubectl {args:?} direct: {}", straight.stderr);
        assert_eq!(sorted_lines(&through.stdout), sorted_lines(&straight.stdout), "kubectl {args:?}");
    }

    // The aggregated documents hold the same (group, version, resource) set.
    let proxy_client = proxy.client_as(&admin);
    let direct_client = direct_client(cluster, &admin);
    let through = get_aggregated(&proxy_client, &proxy.url("/apis")).await;
    let straight = get_aggregated(&direct_client, &format!("{}/apis", cluster.server_url())).await;
    let (a, b) = (resources(&through), resources(&straight));
    let only_proxy: Vec<_> = a.difference(&b).collect();
    let only_direct: Vec<_> = b.difference(&a).collect();
    assert!(
        only_proxy.is_empty() && only_direct.is_empty(),
        "only via proxy: {only_proxy:?}\nonly direct: {only_direct:?}"
    );
    let groups = |d: &serde_json::Value| -> Vec<String> {
        d["items"].as_array().unwrap().iter().map(|g| g["metadata"]["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(groups(&through)[0], "apiregistration.k8s.io");
    assert_eq!(groups(&through), groups(&straight), "group order");

    // Latency of the aggregated /apis, interleaved, same run (reported, not asserted).
    let (mut p, mut d) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let t = Instant::now();
        proxy_client.request(Method::GET, &proxy.url("/apis"), &[("accept", AGGREGATED)], "").await.unwrap();
        p.push(t.elapsed());
        let t = Instant::now();
        direct_client
            .request(Method::GET, &format!("{}/apis", cluster.server_url()), &[("accept", AGGREGATED)], "")
            .await
            .unwrap();
        d.push(t.elapsed());
    }
    println!("aggregated /apis median over 200: proxy {:?}, kube-apiserver {:?}", median(p), median(d));
}

/// The documents themselves, side by side: the aggregated `/apis` (same JSON, so the same
/// ETag), the merged OpenAPI v2 (same paths, same definitions: each APIService's spec
/// filtered to its group-version, equal definitions shared modulo their kinds), the OpenAPI
/// v3 index, and kube's `Cache-Control` on the proxy's own answers. kube-apiserver's own
/// aggregator may lag a freshly registered APIService, so each comparison waits for agreement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_openapi_documents_are_kube_apiservers() {
    let cluster = cluster().await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(|| Cluster::shared().mint_user("documents-admin", &["system:masters"]).unwrap()).await;
    let (via, direct) = (proxy.client_as(&admin), direct_client(cluster, &admin));
    let server = cluster.server_url();
    let both = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let (via, direct, proxy_url, direct_url) = (&via, &direct, proxy.url(path), format!("{server}{path}"));
        async move {
            let b = via.request(Method::GET, &proxy_url, headers, "").await.map_err(|e| e.to_string())?;
            let a = direct.request(Method::GET, &direct_url, headers, "").await.map_err(|e| e.to_string())?;
            Ok::<_, String>((a, b))
        }
    };

    let (kube, ours) = eventually(Duration::from_secs(60), || async {
        let (a, b) = both("/apis", &[("accept", AGGREGATED)]).await?;
        if a.json() == b.json() {
            Ok((a, b))
        } else {
            Err(format!("aggregated /apis differs:\n kube-apiserver {}\n proxy          {}", a.text(), b.text()))
        }
    })
    .await;
    assert_eq!(ours.header("etag"), kube.header("etag"), "equal documents, equal ETags");
    assert_eq!(ours.body, kube.body, "equal documents, equal bytes");

    let names = |doc: &serde_json::Value, section: &str| -> BTreeSet<String> {
        doc[section].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    };
    eventually(Duration::from_secs(60), || async {
        let (a, b) = both("/openapi/v2", &[("accept", "application/json")]).await?;
        let (a, b) = (a.json(), b.json());
        for section in ["paths", "definitions"] {
            let (kube, ours) = (names(&a, section), names(&b, section));
            if kube != ours {
                return Err(format!(
                    "/openapi/v2 {section}: only kube-apiserver {:?}; only the proxy {:?}",
                    kube.difference(&ours).collect::<Vec<_>>(),
                    ours.difference(&kube).collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    })
    .await;

    eventually(Duration::from_secs(60), || async {
        let (a, b) = both("/openapi/v3", &[]).await?;
        if a.header("content-type") != b.header("content-type") {
            return Err(format!(
                "/openapi/v3 Content-Type {:?} and {:?}",
                a.header("content-type"),
                b.header("content-type")
            ));
        }
        let (kube, ours) = (names(&a.json(), "paths"), names(&b.json(), "paths"));
        if kube == ours {
            Ok(())
        } else {
            Err(format!("/openapi/v3 paths: kube-apiserver {kube:?}, proxy {ours:?}"))
        }
    })
    .await;

    for path in ["/apis", "/apis/wardle.example.com", "/apis/wardle.example.com/v1alpha1", "/apis/nope.example.com"] {
        let (a, b) = both(path, &[]).await.unwrap();
        assert_eq!(b.header("cache-control"), a.header("cache-control"), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_metrics_server_leaves_its_group_stale_and_the_rest_working() {
    let cluster = owned_cluster(true).await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(move || cluster.mint_user("stale-admin", &["system:masters"]).unwrap()).await;
    let client = proxy.client_as(&admin);
    let freshness = |doc: &serde_json::Value, group: &str| -> Option<String> {
        doc["items"].as_array()?.iter().find(|g| g["metadata"]["name"] == group)?["versions"][0]["freshness"]
            .as_str()
            .map(str::to_owned)
    };
    // Until kube-apiserver's own document has been fetched, the proxy serves the legacy list
    // (clients fall back to it): wait for the aggregated one.
    let doc = eventually(Duration::from_secs(30), || async {
        let r = client
            .request(Method::GET, &proxy.url("/apis"), &[("accept", AGGREGATED)], "")
            .await
            .map_err(|e| e.to_string())?;
        if r.status == 200 && r.header("content-type") == Some(AGGREGATED) {
            Ok(r.json())
        } else {
            Err(format!("{} {:?}", r.status, r.header("content-type")))
        }
    })
    .await;
    assert_eq!(freshness(&doc, "metrics.k8s.io").as_deref(), Some("Current"), "{doc}");

    blocking(move || cluster.metrics_server().stop()).await;
    proxy.app.discovery().resync();
    eventually(Duration::from_secs(30), || async {
        let doc = get_aggregated(&client, &proxy.url("/apis")).await;
        match freshness(&doc, "metrics.k8s.io").as_deref() {
            Some("Stale") => Ok(()),
            other => {
                proxy.app.discovery().resync();
                Err(format!("metrics.k8s.io freshness {other:?}"))
            }
        }
    })
    .await;

    let kubeconfig = proxy.kubeconfig_for(&admin);
    blocking(move || {
        cluster.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: stale\n").unwrap();
        cluster
            .apply("apiVersion: wardle.example.com/v1alpha1\nkind: Flunder\nmetadata:\n  name: still-here\n  namespace: stale\nspec: {}\n")
            .unwrap();
        let pods = kubectl_as(cluster, &kubeconfig, &["get", "pods", "-A"]);
        assert!(pods.success(), "kubectl get pods with metrics-server down: {}", pods.stderr);
        let flunders = kubectl_as(cluster, &kubeconfig, &["get", "flunders", "-n", "stale", "-o", "name"]);
        assert!(flunders.success(), "kubectl get flunders with metrics-server down: {}", flunders.stderr);
        assert_eq!(flunders.stdout.trim(), "flunder.wardle.example.com/still-here");
    })
    .await;
}

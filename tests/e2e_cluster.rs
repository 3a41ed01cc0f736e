//! Cluster mode end to end: the proxy in front of a real kube-apiserver, with real
//! metrics-server and sample-apiserver behind it, driven by kubectl pointed at the proxy.
//!
//! `cargo test --features e2e --test e2e_cluster`

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, FAKE_NODE_NAME};
use common::cluster_proxy::{blocking, kubectl_as, ClusterProxy};
use common::wait::{eventually, eventually_status};
use http::{Method, StatusCode};

const CONVERGE: Duration = Duration::from_secs(10);

/// The shared cluster with both extension servers running and Available.
async fn cluster() -> &'static Cluster {
    blocking(|| {
        let cluster = Cluster::shared();
        cluster.metrics_server();
        cluster.sample_apiserver();
        cluster
    })
    .await
}

fn create_namespace(cluster: &Cluster, name: &str) {
    cluster.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")).expect("namespace created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_metrics_from_metrics_server_come_through_the_proxy() {
    let cluster = cluster().await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(|| Cluster::shared().mint_user("proxy-admin", &["system:masters"]).unwrap()).await;
    let kubeconfig = proxy.kubeconfig_for(&admin);
    let out = blocking(move || {
        kubectl_as(Cluster::shared(), &kubeconfig, &["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes"])
    })
    .await;
    assert!(out.success(), "{}", out.stderr);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list["kind"], "NodeMetricsList");

    // `kubectl top node` reads nodes from kube-apiserver and their usage from metrics-server,
    // both through the proxy; metrics-server reports the stand-in kubelet after a scrape or two.
    let kubeconfig = proxy.kubeconfig_for(&admin);
    let top = eventually(Duration::from_secs(90), || {
        let kubeconfig = kubeconfig.clone();
        async move {
            let out =
                blocking(move || kubectl_as(Cluster::shared(), &kubeconfig, &["top", "node", "--no-headers"])).await;
            if out.success() && out.stdout.contains(FAKE_NODE_NAME) {
                Ok(out.stdout)
            } else {
                Err(format!("{}{}", out.stdout, out.stderr))
            }
        }
    })
    .await;
    println!("kubectl top node through the proxy: {}", top.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flunders_are_created_listed_and_watched_through_the_proxy() {
    let cluster = cluster().await;
    blocking(|| create_namespace(Cluster::shared(), "proxy-flunders")).await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(|| Cluster::shared().mint_user("flunder-admin", &["system:masters"]).unwrap()).await;
    let kubeconfig = proxy.kubeconfig_for(&admin);
    let flunder = |name: &str| {
        format!("apiVersion: wardle.example.com/v1alpha1\nkind: Flunder\nmetadata:\n  name: {name}\n  namespace: proxy-flunders\nspec: {{}}\n")
    };
    let manifest = proxy.dir.path().join("first.yaml");
    std::fs::write(&manifest, flunder("first")).unwrap();
    let (kc, m) = (kubeconfig.clone(), manifest.clone());
    let out = blocking(move || kubectl_as(Cluster::shared(), &kc, &["create", "-f", m.to_str().unwrap()])).await;
    assert!(out.success(), "{}", out.stderr);

    let kc = kubeconfig.clone();
    let out = blocking(move || {
        kubectl_as(Cluster::shared(), &kc, &["get", "flunders", "-n", "proxy-flunders", "-o", "name"])
    })
    .await;
    assert!(out.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "flunder.wardle.example.com/first");

    // A watch through the proxy sees an object created while it runs.
    let kc = kubeconfig.clone();
    let mut watch = blocking(move || {
        Cluster::shared()
            .kubectl_watch(&kc, &["get", "flunders", "-n", "proxy-flunders", "--watch", "-o", "name"])
            .unwrap()
    })
    .await;
    let (watch, line) = blocking(move || {
        let first = watch.wait_for_line(Duration::from_secs(30), |l| l.contains("first"));
        (watch, first)
    })
    .await;
    line.expect("the watch lists the existing flunder");
    let second = proxy.dir.path().join("second.yaml");
    std::fs::write(&second, flunder("second")).unwrap();
    let kc = kubeconfig.clone();
    let out = blocking(move || kubectl_as(Cluster::shared(), &kc, &["create", "-f", second.to_str().unwrap()])).await;
    assert!(out.success(), "{}", out.stderr);
    let mut watch = watch;
    let line = blocking(move || watch.wait_for_line(Duration::from_secs(30), |l| l.contains("second"))).await;
    line.expect("the watch through the proxy delivers the new flunder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_apis_reach_kube_apiserver_as_the_authenticated_user() {
    let cluster = cluster().await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(|| Cluster::shared().mint_user("core-admin", &["system:masters"]).unwrap()).await;
    let kubeconfig = proxy.kubeconfig_for(&admin);
    for args in [&["get", "pods", "-A"][..], &["get", "apiservices"], &["get", "namespaces"]] {
        let kc = kubeconfig.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kubectl_as(Cluster::shared(), &kc, &args)
        })
        .await;
        assert!(out.success(), "{}", out.stderr);
    }
    let kc = kubeconfig.clone();
    let out = blocking(move || kubectl_as(Cluster::shared(), &kc, &["auth", "can-i", "create", "pods"])).await;
    assert_eq!(out.stdout.trim(), "yes", "{}", out.stderr);

    // kube-apiserver sees the user the proxy authenticated, whatever headers the client sent.
    let nobody = blocking(|| Cluster::shared().mint_user("nobody", &[]).unwrap()).await;
    let client = proxy.client_as(&nobody);
    let review = r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#;
    let response = client
        .request(
            Method::POST,
            &proxy.url("/apis/authentication.k8s.io/v1/selfsubjectreviews"),
            &[
                ("content-type", "application/json"),
                ("X-Remote-User", "system:admin"),
                ("X-Remote-Group", "system:masters"),
                ("Impersonate-User", "system:admin"),
            ],
            review,
        )
        .await
        .unwrap();
    assert_eq!(response.status, 201, "{}", response.text());
    let seen = response.json();
    assert_eq!(seen["status"]["userInfo"]["username"], "nobody");
    let groups = seen["status"]["userInfo"]["groups"].as_array().unwrap();
    assert!(!groups.iter().any(|g| g == "system:masters"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extension_server_authorizes_the_identity_the_proxy_carries() {
    let cluster = cluster().await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let nobody = blocking(|| Cluster::shared().mint_user("no-rights", &[]).unwrap()).await;
    let client = proxy.client_as(&nobody);
    let url = proxy.url("/apis/wardle.example.com/v1alpha1/namespaces/default/flunders");
    let forbidden_user = |r: &common::client::TestResponse| {
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        message.split('"').nth(1).map(str::to_owned).unwrap_or(message)
    };
    let plain = client.get(&url).await.unwrap();
    assert_eq!(plain.status, 403, "{}", plain.text());
    assert_eq!(forbidden_user(&plain), "no-rights");
    // A spoofed identity header is stripped: still served as no-rights.
    let spoofed = client
        .request(Method::GET, &url, &[("X-Remote-User", "system:admin"), ("X-Remote-Group", "system:masters")], "")
        .await
        .unwrap();
    assert_eq!(spoofed.status, 403, "{}", spoofed.text());
    assert_eq!(forbidden_user(&spoofed), "no-rights");

    // Service-account style bearer tokens are checked with TokenReview.
    let token = blocking(|| {
        let cluster = Cluster::shared();
        cluster
            .apply("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: proxy-e2e\n  namespace: default\n")
            .unwrap();
        cluster.kubectl(&["create", "token", "proxy-e2e", "-n", "default"]).unwrap().expect_success("token")
    })
    .await;
    let bearer = proxy.client().bearer(token.trim()).build();
    let response = bearer.get(&url).await.unwrap();
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(forbidden_user(&response), "system:serviceaccount:default:proxy-e2e");
    let bad = proxy.client().bearer("not-a-real-token").build();
    assert_eq!(bad.get(&url).await.unwrap().status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiservice_and_service_changes_reach_the_routing_table() {
    let cluster = cluster().await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(|| Cluster::shared().mint_user("churn-admin", &["system:masters"]).unwrap()).await;
    let client = proxy.client_as(&admin);
    let sample_port = blocking(|| Cluster::shared().sample_apiserver().port).await;
    let url = proxy.url("/apis/wardle.example.com/v1beta1/namespaces/default/flunders");
    // The ExternalName service keeps the sample-apiserver's name, so its certificate matches.
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: api-probe\n  namespace: wardle\nspec:\n  type: ExternalName\n  externalName: localhost\n---\n\
         apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: v1beta1.wardle.example.com\nspec:\n  group: wardle.example.com\n  version: v1beta1\n  \
         groupPriorityMinimum: 1000\n  versionPriority: 10\n  insecureSkipTLSVerify: true\n  service:\n    namespace: wardle\n    name: api-probe\n    port: {sample_port}\n"
    );
    let started = Instant::now();
    blocking(move || Cluster::shared().apply(&manifest).unwrap()).await;
    eventually_status(CONVERGE, &client, &url, StatusCode::from_u16(200).unwrap()).await;
    println!("APIService created -> routed in {:?}", started.elapsed());

    let started = Instant::now();
    blocking(|| {
        Cluster::shared()
            .kubectl(&["delete", "service", "-n", "wardle", "api-probe"])
            .unwrap()
            .expect_success("delete service")
    })
    .await;
    let body = eventually_status(CONVERGE, &client, &url, StatusCode::from_u16(503).unwrap()).await.json();
    println!("Service deleted -> 503 in {:?}", started.elapsed());
    assert_eq!(
        body["message"],
        "APIService \"v1beta1.wardle.example.com\" is unavailable: service wardle/api-probe not found"
    );

    let started = Instant::now();
    blocking(|| {
        Cluster::shared()
            .kubectl(&["delete", "apiservice", "v1beta1.wardle.example.com"])
            .unwrap()
            .expect_success("delete")
    })
    .await;
    eventually_status(CONVERGE, &client, &url, StatusCode::from_u16(404).unwrap()).await;
    println!("APIService deleted -> 404 in {:?}", started.elapsed());
}

/// Requests sent both to kube-apiserver's own aggregator and to the proxy get the same status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_with_kube_apiservers_status_codes() {
    let cluster = cluster().await;
    // kube-apiserver serves anonymous requests by default; so does the proxy here, so that
    // both see the same callers.
    let proxy = ClusterProxy::start(cluster, |s| s.anonymous_auth = Some(true)).await;
    let (admin, nobody) = blocking(|| {
        let c = Cluster::shared();
        (c.mint_user("compare-admin", &["system:masters"]).unwrap(), c.mint_user("compare-nobody", &[]).unwrap())
    })
    .await;
    let pem = |u: &common::cluster::User| kube_aggregation_proxy::pki::PemPair {
        cert_pem: u.cert.cert_pem.clone(),
        key_pem: u.cert.key_pem.clone(),
    };
    let cluster_ca = Cluster::shared().pki().cluster_ca.cert.cert_pem.clone();
    let direct = |u: Option<&common::cluster::User>| {
        let b = common::client::TestClient::builder().ca_pem(&cluster_ca);
        match u {
            Some(u) => b.client_cert(&pem(u)).build(),
            None => b.build(),
        }
    };
    let via = |u: Option<&common::cluster::User>| match u {
        Some(u) => proxy.client_as(u),
        None => proxy.client().build(),
    };
    let paths = [
        "/api",
        "/api/v1",
        "/api/v1/namespaces",
        "/api/v1/namespaces/default",
        "/api/v1/namespaces/nope",
        "/api/v1/pods",
        "/api/v1/namespaces/default/configmaps",
        "/apis",
        "/apis/apps",
        "/apis/apps/v1",
        "/apis/apps/v1/deployments",
        "/apis/metrics.k8s.io",
        "/apis/metrics.k8s.io/v1beta1",
        "/apis/metrics.k8s.io/v1beta1/nodes",
        "/apis/metrics.k8s.io/v1beta1/nodes/nope",
        "/apis/wardle.example.com",
        "/apis/wardle.example.com/v1alpha1",
        "/apis/wardle.example.com/v1alpha1/flunders",
        "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders/nope",
        "/apis/unknown.example.com",
        "/apis/unknown.example.com/v1",
        "/apis/unknown.example.com/v1/things",
        "/apis/apiregistration.k8s.io/v1/apiservices",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/version",
        "/apis/apiregistration.k8s.io",
        "/apis/apiregistration.k8s.io/v1",
        "/apis/storage.k8s.io/v1/storageclasses",
        "/api/v1/nodes",
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods",
        "/apis/wardle.example.com/v1alpha1/fischers",
        "/apis/authorization.k8s.io/v1",
        "/apis/batch/v1/jobs",
        "/apis/networking.k8s.io/v1/ingresses",
        "/api/v1/services",
        "/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication",
    ];
    let mut rows = Vec::new();
    for (who, user) in [("admin", Some(&admin)), ("nobody", Some(&nobody)), ("anonymous", None)] {
        let (d, v) = (direct(user), via(user));
        for path in paths {
            if who != "admin"
                && !path.starts_with("/apis/wardle")
                && !path.starts_with("/api/v1/pods")
                && path != "/apis"
            {
                continue;
            }
            let a = d.get(&format!("{}{path}", Cluster::shared().server_url())).await.unwrap().status;
            let b = v.get(&proxy.url(path)).await.unwrap().status;
            rows.push((who, path, a, b));
        }
    }
    let differences: Vec<_> = rows.iter().filter(|(_, _, a, b)| a != b).collect();
    println!("{} requests compared", rows.len());
    for (who, path, a, b) in &differences {
        println!("DIFF {who:10} {path:70} kube-apiserver={a} proxy={b}");
    }
    assert!(rows.len() >= 40, "only {} requests compared", rows.len());
    assert!(differences.is_empty(), "status codes differ: {differences:?}");
}

/// 1,100 watches on flunders: more than sample-apiserver's 1,000 streams per connection. Short
/// requests through the proxy still answer, each within a second, as they do through
/// kube-apiserver's own aggregator with the same watches open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_watches_leave_short_requests_answering_as_through_kube_apiserver() {
    let cluster = cluster().await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(|| Cluster::shared().mint_user("watch-admin", &["system:masters"]).unwrap()).await;
    let pem = kube_aggregation_proxy::pki::PemPair {
        cert_pem: admin.cert.cert_pem.clone(),
        key_pem: admin.cert.key_pem.clone(),
    };
    let cluster_ca = Cluster::shared().pki().cluster_ca.cert.cert_pem.clone();
    let list = "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders";
    let watch = format!("{list}?watch=true&timeoutSeconds=120");
    for (side, base) in [("proxy", proxy.url("")), ("kube-apiserver", Cluster::shared().server_url())] {
        // Both front ends allow 100 streams a connection: 11 clients of 100 watches each.
        let clients: Vec<_> = (0..11)
            .map(|_| {
                let b = if side == "proxy" {
                    proxy.client()
                } else {
                    common::client::TestClient::builder().ca_pem(&cluster_ca)
                };
                b.client_cert(&pem).http2_only().build()
            })
            .collect();
        let mut watches = Vec::new();
        for client in &clients {
            for _ in 0..100 {
                let w = client
                    .get_streaming(&format!("{base}{watch}"))
                    .await
                    .unwrap_or_else(|e| panic!("{side}: watch: {e}"));
                assert_eq!(w.status, 200, "{side}: watch");
                watches.push(w);
            }
        }
        let quick =
            if side == "proxy" { proxy.client() } else { common::client::TestClient::builder().ca_pem(&cluster_ca) }
                .client_cert(&pem)
                .timeout(Duration::from_secs(1))
                .build();
        for i in 0..5 {
            let started = Instant::now();
            let r = quick.get(&format!("{base}{list}")).await.unwrap_or_else(|e| panic!("{side}: short GET {i}: {e}"));
            assert_eq!(r.status, 200, "{side}: short GET {i}");
            eprintln!("{side}: GET flunders with 1,100 watches open: {:?}", started.elapsed());
        }
        drop(watches);
    }
    let text = proxy.client_as(&admin).get(&proxy.url("/metrics")).await.unwrap().text();
    let connections: f64 = text
        .lines()
        .filter(|l| l.starts_with("aggregator_backend_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    assert!(connections >= 2.0, "1,100 watches past 1,000 streams take a second connection: {text}");
}

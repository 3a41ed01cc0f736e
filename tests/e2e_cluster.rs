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

/// The project's sample server, which authorizes nothing itself, registered in the cluster as
/// `v1.echo.example.com` (ExternalName `localhost`, `insecureSkipTLSVerify`) and trusting the
/// cluster's front-proxy CA: behind kube-aggregator only kube-apiserver's authorization
/// protects it, and behind the proxy the proxy's must.
struct EchoBackend {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

const ECHO_APISERVICE: &str = "v1.echo.example.com";

impl EchoBackend {
    async fn start(cluster: &'static Cluster) -> Self {
        use kube_aggregation_proxy::auth::requestheader::RequestHeaderConfig;
        use kube_aggregation_proxy::auth::x509::ChainVerifier;
        use kube_aggregation_proxy::testbed::sample::{SampleServer, SampleServerConfig};
        let front_proxy_ca = &cluster.pki().front_proxy_ca.cert.cert_pem;
        let verifier = ChainVerifier::from_pem(front_proxy_ca.as_bytes(), "front-proxy CA").unwrap();
        let serving = kube_aggregation_proxy::pki::self_signed_localhost().unwrap().certified_key().unwrap();
        let server = SampleServer::bind(SampleServerConfig {
            bind: std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            serving,
            requestheader: RequestHeaderConfig::with_default_headers(verifier, vec!["front-proxy-client".into()]),
            node_name: Some("echo-node".into()),
        })
        .await
        .unwrap();
        let port = server.local_addr().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let manifest = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: echo-e2e\n---\n\
             apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: echo-e2e\nspec:\n  type: ExternalName\n  externalName: localhost\n---\n\
             apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: {ECHO_APISERVICE}\nspec:\n  group: echo.example.com\n  version: v1\n  \
             groupPriorityMinimum: 900\n  versionPriority: 10\n  insecureSkipTLSVerify: true\n  service:\n    namespace: echo-e2e\n    name: echo\n    port: {port}\n"
        );
        blocking(move || {
            cluster.apply(&manifest).unwrap();
            cluster.wait_for_apiservice_available(ECHO_APISERVICE, Duration::from_secs(60)).unwrap();
        })
        .await;
        Self { stop: Some(stop) }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        let _ = Cluster::shared().kubectl(&["delete", "apiservice", ECHO_APISERVICE, "--wait=false"]);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Status code, and the Status reason when the body is a Status.
fn code_and_reason(r: &common::client::TestResponse) -> (u16, String, String) {
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let (reason, message) = if body["kind"] == "Status" {
        (
            body["reason"].as_str().unwrap_or_default().to_owned(),
            body["message"].as_str().unwrap_or_default().to_owned(),
        )
    } else {
        (String::new(), String::new())
    };
    (r.status.as_u16(), reason, message)
}

/// Requests sent both to kube-apiserver's own aggregator and to the proxy, with its default
/// settings, get the same status codes and Status reasons: plain requests from an admin, an
/// unprivileged user and anonymous callers, impersonation (allowed, denied, malformed),
/// requests to an extension server that does not authorize by itself, empty path segments,
/// kube-apiserver's own redirects, and OpenAPI right after the proxy reports ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_with_kube_apiservers_status_codes() {
    let cluster = cluster().await;
    let _echo = EchoBackend::start(cluster).await;
    // Defaults: anonymous requests are system:anonymous, as kube-apiserver's.
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
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
    // The first requests after ready: aggregated groups' OpenAPI v3 documents.
    let after_ready = [
        "/openapi/v3/apis/wardle.example.com/v1alpha1",
        "/openapi/v3/apis/metrics.k8s.io/v1beta1",
        "/openapi/v3/apis/echo.example.com/v1",
    ];
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
        "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders",
        "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders/nope",
        "/apis/wardle.example.com//v1alpha1/flunders",
        "/apis/wardle.example.com//v1alpha1",
        "/apis/echo.example.com",
        "/apis/echo.example.com/v1",
        "/apis/echo.example.com/v1/namespaces/default/things",
        "/apis/echo.example.com/v1/namespaces/default/things/one",
        "/apis/echo.example.com/v1/things?watch=true&timeoutSeconds=1",
        "/apis/unknown.example.com",
        "/apis/unknown.example.com/v1",
        "/apis/unknown.example.com/v1/things",
        "/apis/apiregistration.k8s.io/v1/apiservices",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/version",
        "/healthz",
        "/livez",
        "/readyz",
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
        "/openapi/v2",
        "/openapi/v3",
        "/openapi/v3/apis/apps/v1?hash=0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "/metrics",
    ];
    // Impersonation: (description, headers, paths).
    let as_nobody: &[(&str, &str)] = &[("Impersonate-User", "compare-nobody")];
    let as_sa: &[(&str, &str)] = &[("Impersonate-User", "system:serviceaccount:default:nobody-sa")];
    let as_masters: &[(&str, &str)] = &[("Impersonate-User", "someone"), ("Impersonate-Group", "system:masters")];
    let group_only: &[(&str, &str)] = &[("Impersonate-Group", "system:masters")];
    let uid_only: &[(&str, &str)] = &[("Impersonate-Uid", "1234")];
    let extra_only: &[(&str, &str)] = &[("Impersonate-Extra-Scopes", "all")];
    let impersonated_paths = [
        "/api/v1/namespaces",
        "/apis/metrics.k8s.io/v1beta1/nodes",
        "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders",
        "/apis/echo.example.com/v1/namespaces/default/things",
        "/apis",
        "/openapi/v2",
    ];

    let mut rows = Vec::new();
    let mut compare = |who: String, path: &str, a: &common::client::TestResponse, b: &common::client::TestResponse| {
        rows.push((who, path.to_owned(), code_and_reason(a), code_and_reason(b)));
    };
    let server = Cluster::shared().server_url();
    for path in after_ready {
        let b = via(Some(&admin)).get(&proxy.url(path)).await.unwrap();
        // kube-apiserver's own OpenAPI v3 aggregator may take seconds to list a group that was
        // just registered (the proxy's readiness waits for its documents): wait for it.
        let a = eventually_status(
            Duration::from_secs(60),
            &direct(Some(&admin)),
            &format!("{server}{path}"),
            StatusCode::OK,
        )
        .await;
        compare("admin, right after ready".into(), path, &a, &b);
    }
    for (who, user) in [("admin", Some(&admin)), ("nobody", Some(&nobody)), ("anonymous", None)] {
        let (d, v) = (direct(user), via(user));
        for path in paths {
            let (a, b) = (d.get(&format!("{server}{path}")).await.unwrap(), v.get(&proxy.url(path)).await.unwrap());
            compare(who.into(), path, &a, &b);
        }
    }
    for (who, user, headers) in [
        ("admin as compare-nobody", &admin, as_nobody),
        ("admin as a service account", &admin, as_sa),
        ("admin as someone in system:masters", &admin, as_masters),
        ("admin with a group and no user", &admin, group_only),
        ("admin with a uid and no user", &admin, uid_only),
        ("admin with an extra and no user", &admin, extra_only),
        ("nobody as someone in system:masters", &nobody, as_masters),
        ("nobody as compare-nobody", &nobody, as_nobody),
    ] {
        let (d, v) = (direct(Some(user)), via(Some(user)));
        for path in impersonated_paths {
            let a = d.request(Method::GET, &format!("{server}{path}"), headers, "").await.unwrap();
            let b = v.request(Method::GET, &proxy.url(path), headers, "").await.unwrap();
            compare(who.into(), path, &a, &b);
        }
    }
    // Writes to the extension server that authorizes nothing: refused by authorization first.
    let thing = r#"{"apiVersion":"echo.example.com/v1","kind":"Thing","metadata":{"name":"one"}}"#;
    for (who, user) in [("nobody", Some(&nobody)), ("anonymous", None)] {
        let (d, v) = (direct(user), via(user));
        let path = "/apis/echo.example.com/v1/namespaces/default/things";
        let ct = [("content-type", "application/json")];
        let a = d.request(Method::POST, &format!("{server}{path}"), &ct, thing).await.unwrap();
        let b = v.request(Method::POST, &proxy.url(path), &ct, thing).await.unwrap();
        compare(format!("{who} POST"), path, &a, &b);
    }

    let mut forbidden_messages = 0;
    let mut differences = Vec::new();
    for (who, path, a, b) in &rows {
        // Status bodies where kube answers plain text are a documented improvement: the
        // reason is compared only when both answered a Status.
        let reasons_differ = !a.1.is_empty() && !b.1.is_empty() && a.1 != b.1;
        if a.0 != b.0 || reasons_differ {
            differences.push(format!("{who:40} {path:70} kube-apiserver={} {} proxy={} {}", a.0, a.1, b.0, b.1));
        }
        if a.0 == 403 && b.0 == 403 {
            if a.2 == b.2 {
                forbidden_messages += 1;
            } else {
                println!("MESSAGE {who} {path}\n  kube-apiserver: {}\n  proxy:          {}", a.2, b.2);
            }
        }
    }
    let denied = rows.iter().filter(|(_, _, a, _)| a.0 == 403).count();
    let impersonated = rows.iter().filter(|(who, ..)| who.contains(" as ") || who.contains(" no user")).count();
    println!(
        "{} requests compared ({impersonated} with impersonation, {denied} forbidden by kube-apiserver, \
         {forbidden_messages} of those with the same message); {} differ",
        rows.len(),
        differences.len()
    );
    for d in &differences {
        println!("DIFF {d}");
    }
    assert!(rows.len() >= 200, "only {} requests compared", rows.len());
    assert!(differences.is_empty(), "status codes or reasons differ:\n{}", differences.join("\n"));
    let both_denied = rows.iter().filter(|(_, _, a, b)| a.0 == 403 && b.0 == 403).count();
    assert_eq!(forbidden_messages, both_denied, "Forbidden messages differ (MESSAGE lines above)");
    // The extension server that authorizes nothing is protected: kube-apiserver's own answer.
    let echo_denied = rows.iter().filter(|(who, path, a, b)| {
        who == "nobody" && path == "/apis/echo.example.com/v1/namespaces/default/things" && a.0 == 403 && b == a
    });
    assert_eq!(echo_denied.count(), 1, "nobody's list of echo things is not refused alike");

    // Allowed impersonation: the extension server sees the impersonated user, through both.
    let path = "/apis/echo.example.com/v1/namespaces/default/things/who";
    let asks =
        [("Impersonate-User", "jane"), ("Impersonate-Group", "system:masters"), ("Impersonate-Extra-Team", "blue")];
    let a = direct(Some(&admin)).request(Method::GET, &format!("{server}{path}"), &asks, "").await.unwrap();
    let b = via(Some(&admin)).request(Method::GET, &proxy.url(path), &asks, "").await.unwrap();
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK), "{} / {}", a.text(), b.text());
    assert_eq!(b.json()["user"], a.json()["user"], "the backend saw different users");
    assert_eq!(b.json()["user"]["name"], "jane");
    assert_eq!(b.json()["user"]["groups"], serde_json::json!(["system:masters", "system:authenticated"]));
    assert_eq!(b.json()["user"]["extra"], serde_json::json!({"team": ["blue"]}));
    // kubectl --as through the proxy gets kube's own refusal.
    let kubeconfig = proxy.kubeconfig_for(&admin);
    let out = blocking(move || {
        kubectl_as(Cluster::shared(), &kubeconfig, &["--as", "compare-nobody", "get", "flunders", "-n", "default"])
    })
    .await;
    assert!(!out.success(), "{}", out.stdout);
    assert!(
        out.stderr.contains(
            r#"flunders.wardle.example.com is forbidden: User "compare-nobody" cannot list resource "flunders" in API group "wardle.example.com" in the namespace "default""#
        ),
        "{}",
        out.stderr
    );
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

//! Proves the real-cluster harness before the proxy relies on it: kube-apiserver's own
//! aggregator, in front of real metrics-server and sample-apiserver, behaves as the proxy's
//! cluster-mode tests will expect. Nothing here involves the proxy itself.
//!
//! Run with `cargo test --features e2e --test e2e_harness`; the first run builds the
//! Kubernetes binaries (see tests/e2e/k8s/build.sh).

mod common;

use std::time::Duration;

use common::cluster::{
    https_get, wait_for, write_kubeconfig, Cluster, FAKE_NODE_CPU_CORES, FAKE_NODE_MEMORY_BYTES, FAKE_NODE_NAME,
};

const EVENT_DEADLINE: Duration = Duration::from_secs(30);

fn json_names(list: &serde_json::Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("a list has items")
        .iter()
        .filter_map(|item| item["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// A namespace of its own for a test, so tests sharing the cluster do not see each other.
fn create_namespace(cluster: &Cluster, name: &str) {
    cluster
        .apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"))
        .expect("namespace is created");
}

fn flunder(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: wardle.example.com/v1alpha1\nkind: Flunder\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec: {{}}\n"
    )
}

#[test]
fn kubectl_lists_the_built_in_local_apiservices() {
    let cluster = Cluster::shared();
    let list = cluster.kubectl(&["get", "apiservices", "-o", "json"]).expect("kubectl runs");
    let list = list.json().expect("a JSON APIServiceList");
    let names = json_names(&list);
    for local in ["v1.", "v1.apps", "v1.rbac.authorization.k8s.io"] {
        assert!(names.iter().any(|n| n == local), "{local} missing from {names:?}");
    }
    let core = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|item| item["metadata"]["name"] == "v1.")
        .expect("v1. is listed");
    assert!(core["spec"]["service"].is_null(), "built-in APIServices are served locally: {core}");
}

#[test]
fn kube_apiserver_publishes_the_front_proxy_settings_for_extension_servers() {
    let cluster = Cluster::shared();
    let configmap = cluster
        .kubectl(&["get", "configmap", "-n", "kube-system", "extension-apiserver-authentication", "-o", "json"])
        .expect("kubectl runs")
        .json()
        .expect("a ConfigMap");
    let data = &configmap["data"];
    assert_eq!(data["requestheader-allowed-names"], r#"["front-proxy-client"]"#);
    assert_eq!(data["requestheader-username-headers"], r#"["X-Remote-User"]"#);
    assert_eq!(data["requestheader-group-headers"], r#"["X-Remote-Group"]"#);
    assert_eq!(data["requestheader-extra-headers-prefix"], r#"["X-Remote-Extra-"]"#);
    let front_proxy_ca = &cluster.pki().front_proxy_ca.cert.cert_pem;
    assert_eq!(data["requestheader-client-ca-file"].as_str().map(str::trim), Some(front_proxy_ca.trim()));
    let client_ca = &cluster.pki().client_ca.cert.cert_pem;
    assert_eq!(data["client-ca-file"].as_str().map(str::trim), Some(client_ca.trim()));
}

#[test]
fn metrics_and_wardle_apiservices_become_available() {
    let cluster = Cluster::shared();
    let metrics = cluster.metrics_server();
    let wardle = cluster.sample_apiserver();
    assert_eq!(metrics.apiservices, ["v1beta1.metrics.k8s.io"]);
    assert_eq!(wardle.apiservices, ["v1alpha1.wardle.example.com"]);
    for name in metrics.apiservices.iter().chain(&wardle.apiservices) {
        cluster.wait_for_apiservice_available(name, Duration::from_secs(60)).expect("the APIService is Available");
    }
}

#[test]
fn node_metrics_are_served_through_the_aggregator() {
    let cluster = Cluster::shared();
    cluster.metrics_server();
    // CPU usage is a rate: metrics-server reports the node after its second scrape.
    let node = wait_for(Duration::from_secs(90), "node metrics of the fake node", || {
        let nodes = cluster.kubectl(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes"])?;
        let nodes = nodes.json()?;
        assert_eq!(nodes["kind"], "NodeMetricsList", "{nodes}");
        assert_eq!(nodes["apiVersion"], "metrics.k8s.io/v1beta1", "{nodes}");
        Ok(nodes["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|item| item["metadata"]["name"] == FAKE_NODE_NAME)
            .cloned())
    })
    .expect("metrics-server reports the node");
    let memory = quantity(&node["usage"]["memory"]);
    assert_eq!(memory, FAKE_NODE_MEMORY_BYTES as f64, "{node}");
    let cores = quantity(&node["usage"]["cpu"]);
    assert!((cores - FAKE_NODE_CPU_CORES).abs() < 0.05, "expected about {FAKE_NODE_CPU_CORES} cores: {node}");
}

/// A Kubernetes quantity (`500m`, `499871234n`, `512Mi`, `3`) as a number.
fn quantity(value: &serde_json::Value) -> f64 {
    let text = value.as_str().expect("a quantity string");
    let suffixes = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
    ];
    let (number, scale) = suffixes
        .iter()
        .find_map(|(suffix, scale)| text.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((text, 1.0));
    number.parse::<f64>().expect("a number") * scale
}

#[test]
fn flunders_can_be_created_listed_and_watched_through_kube_apiserver() {
    let cluster = Cluster::shared();
    cluster.sample_apiserver();
    let namespace = "e2e-flunders";
    create_namespace(cluster, namespace);

    cluster.apply(&flunder(namespace, "existing-flunder")).expect("a Flunder is created through the aggregator");
    let list = cluster
        .kubectl(&["get", "flunders", "-n", namespace, "-o", "json"])
        .expect("kubectl runs")
        .json()
        .expect("a JSON FlunderList");
    assert_eq!(json_names(&list), ["existing-flunder"]);

    let mut watch = cluster
        .kubectl_watch(
            cluster.kubeconfig(),
            &[
                "get",
                "flunders",
                "-n",
                namespace,
                "--watch",
                "--output-watch-events",
                "-o",
                r#"go-template={{.type}} {{.object.metadata.name}}{{"\n"}}"#,
            ],
        )
        .expect("kubectl watch starts");
    // The initial list arrives as ADDED events: once seen, the watch is established.
    watch
        .wait_for_line(EVENT_DEADLINE, |line| line == "ADDED existing-flunder")
        .expect("the watch lists existing Flunders");
    cluster.apply(&flunder(namespace, "watched-flunder")).expect("a second Flunder is created");
    watch
        .wait_for_line(EVENT_DEADLINE, |line| line == "ADDED watched-flunder")
        .expect("the watch sees the Flunder created during the watch");
}

#[test]
fn an_unprivileged_user_is_refused_by_the_extension_servers_delegated_authorization() {
    let cluster = Cluster::shared();
    let wardle = cluster.sample_apiserver();
    let namespace = "e2e-unprivileged";
    create_namespace(cluster, namespace);
    let nobody = cluster.mint_user("e2e-nobody", &["e2e-nobodies"]).expect("a user certificate is minted");

    // Straight to the extension server: it authenticates the client certificate against the
    // client CA it read from kube-system/extension-apiserver-authentication, then asks
    // kube-apiserver (SubjectAccessReview), which says no.
    let direct = cluster.dir().join("users/e2e-nobody-direct.kubeconfig");
    write_kubeconfig(&direct, &wardle.url(), &cluster.pki().extension_ca.cert.cert_pem, &nobody.name, &nobody.cert)
        .expect("kubeconfig is written");
    let refused = cluster.kubectl_as(&direct, &["get", "flunders", "-n", namespace]).expect("kubectl runs");
    assert!(!refused.success(), "{refused:?}");
    assert!(
        refused.stderr.contains("Forbidden")
            && refused.stderr.contains(r#"User "e2e-nobody" cannot list resource "flunders""#),
        "expected a 403 naming the user: {}",
        refused.stderr
    );

    // The same server lets admin in, so the refusal is authorization, not authentication.
    let admin_direct = cluster.dir().join("users/admin-direct.kubeconfig");
    write_kubeconfig(
        &admin_direct,
        &wardle.url(),
        &cluster.pki().extension_ca.cert.cert_pem,
        "admin",
        &cluster.pki().admin,
    )
    .expect("kubeconfig is written");
    cluster
        .kubectl_as(&admin_direct, &["get", "flunders", "-n", namespace])
        .expect("kubectl runs")
        .expect_success("get flunders as admin, directly");

    // Through kube-apiserver the user is refused too (by kube-apiserver's own RBAC first).
    let via_aggregator =
        cluster.kubectl_as(&nobody.kubeconfig, &["get", "flunders", "-n", namespace]).expect("kubectl runs");
    assert!(!via_aggregator.success() && via_aggregator.stderr.contains("Forbidden"), "{via_aggregator:?}");
}

#[test]
fn kube_apiserver_restarts_on_the_same_port_and_keeps_its_data() {
    // A cluster of its own: restarting the shared one would disturb the other tests.
    let cluster = Cluster::start().expect("a private cluster starts");
    cluster
        .kubectl(&["create", "configmap", "survivor", "-n", "default"])
        .expect("kubectl runs")
        .expect_success("create configmap");
    let url = cluster.server_url();
    cluster.restart_kube_apiserver().expect("kube-apiserver restarts");
    assert_eq!(cluster.server_url(), url);
    cluster
        .kubectl(&["get", "configmap", "survivor", "-n", "default"])
        .expect("kubectl runs")
        .expect_success("get configmap after restart");
}

#[test]
fn extension_servers_take_identity_from_headers_only_with_the_front_proxy_certificate() {
    let cluster = Cluster::shared();
    let wardle = cluster.sample_apiserver();
    let namespace = "e2e-front-proxy";
    create_namespace(cluster, namespace);
    let path = format!("/apis/wardle.example.com/v1alpha1/namespaces/{namespace}/flunders");
    let ca = &cluster.pki().extension_ca.cert.cert_pem;
    let proxy = &cluster.pki().front_proxy_client;

    // What kube-aggregator does: the proxy client certificate plus X-Remote-* headers.
    let allowed = https_get(
        &wardle.url(),
        &path,
        ca,
        Some(proxy),
        &[("X-Remote-User", "e2e-proxied-admin"), ("X-Remote-Group", "system:masters")],
    )
    .expect("the extension server answers");
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    assert_eq!(allowed.json().expect("JSON")["kind"], "FlunderList");

    let refused = https_get(&wardle.url(), &path, ca, Some(proxy), &[("X-Remote-User", "e2e-proxied-nobody")])
        .expect("the extension server answers");
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains(r#"User \"e2e-proxied-nobody\""#), "{}", refused.body);

    // The same headers from an ordinary client certificate are ignored: the caller is
    // who its certificate says.
    let spoofer = cluster.mint_user("e2e-spoofer", &[]).expect("a user certificate is minted");
    let spoofed = https_get(
        &wardle.url(),
        &path,
        ca,
        Some(&spoofer.cert),
        &[("X-Remote-User", "admin"), ("X-Remote-Group", "system:masters")],
    )
    .expect("the extension server answers");
    assert_eq!(spoofed.status, 403, "{}", spoofed.body);
    assert!(spoofed.body.contains(r#"User \"e2e-spoofer\""#), "{}", spoofed.body);
}

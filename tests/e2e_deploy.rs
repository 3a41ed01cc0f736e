//! The deployment manifests against the real kube-apiserver: every object of the rendered
//! base is accepted (`--dry-run=server`), the ServiceAccount can do exactly what the cluster
//! source needs and nothing more, and two proxies running with that account's token (not the
//! admin's) both serve.
//!
//! `cargo test --features e2e --test e2e_deploy`

mod common;

use std::time::Duration;

use base64::Engine;
use common::cluster::Cluster;
use common::cluster_proxy::{blocking, ClusterProxy};
use common::wait::eventually_status;
use http::StatusCode;

const NAMESPACE: &str = "kube-aggregation-proxy";
const ACCOUNT: &str = "system:serviceaccount:kube-aggregation-proxy:kube-aggregation-proxy";

fn render() -> String {
    let out = std::process::Command::new("kubectl")
        .args(["kustomize", concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/deploy")])
        .output()
        .expect("kubectl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_are_accepted_grant_the_least_rights_and_two_replicas_serve_with_them() {
    let cluster = blocking(|| {
        let c = Cluster::shared();
        c.sample_apiserver();
        c
    })
    .await;
    let rendered = render();
    let kinds = rendered.lines().filter(|l| l.starts_with("kind: ")).count();
    assert!(kinds >= 9, "{rendered}");

    // Every object accepted by the real API server (admission and validation included).
    let manifests = rendered.clone();
    let dry = blocking(move || {
        // The namespace must exist for the namespaced objects' dry run.
        Cluster::shared().apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n")).unwrap();
        Cluster::shared().kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], &manifests).unwrap()
    })
    .await;
    assert!(dry.success(), "{}\n{}", dry.stdout, dry.stderr);
    let accepted = dry.stdout.lines().filter(|l| l.contains("(server dry run)")).count();
    assert_eq!(accepted, kinds, "{}", dry.stdout);

    // The ServiceAccount and its RBAC for real; then what it may and may not do.
    let rbac: String = rendered
        .split("\n---\n")
        .filter(|doc| {
            ["kind: ServiceAccount", "kind: ClusterRole", "kind: RoleBinding"].iter().any(|k| doc.contains(k))
        })
        .collect::<Vec<_>>()
        .join("\n---\n");
    blocking(move || Cluster::shared().apply(&rbac).unwrap()).await;
    let checks: &[(&[&str], &str)] = &[
        (&["watch", "apiservices.apiregistration.k8s.io"], "yes"),
        (&["list", "services", "-A"], "yes"),
        (&["watch", "endpointslices.discovery.k8s.io", "-A"], "yes"),
        (&["create", "tokenreviews.authentication.k8s.io"], "yes"),
        (&["create", "subjectaccessreviews.authorization.k8s.io"], "yes"),
        (&["get", "configmap/extension-apiserver-authentication", "-n", "kube-system"], "yes"),
        (&["get", "secrets", "-A"], "no"),
        (&["get", "configmap/kube-root-ca.crt", "-n", "kube-system"], "no"),
        (&["create", "apiservices.apiregistration.k8s.io"], "no"),
        (&["list", "pods", "-A"], "no"),
        (&["impersonate", "users"], "no"),
    ];
    for (args, want) in checks {
        let mut full = vec!["auth", "can-i", "--as", ACCOUNT];
        full.extend_from_slice(args);
        let full: Vec<String> = full.iter().map(|s| s.to_string()).collect();
        let out = blocking(move || {
            let args: Vec<&str> = full.iter().map(String::as_str).collect();
            Cluster::shared().kubectl(&args).unwrap()
        })
        .await;
        assert_eq!(out.stdout.trim(), *want, "can-i {args:?}: {}", out.stderr);
    }

    // Two replicas with the account's token, in front of the cluster.
    let token = blocking(|| {
        Cluster::shared()
            .kubectl(&["create", "token", "kube-aggregation-proxy", "-n", NAMESPACE, "--duration=1h"])
            .unwrap()
            .expect_success("token")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("proxy.kubeconfig");
    let ca = base64::engine::general_purpose::STANDARD.encode(&cluster.pki().cluster_ca.cert.cert_pem);
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\n\
             users:\n- name: sa\n  user:\n    token: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: sa\ncurrent-context: c\n",
            cluster.server_url(),
            token.trim()
        ),
    )
    .unwrap();
    let admin = blocking(|| Cluster::shared().mint_user("deploy-admin", &["system:masters"]).unwrap()).await;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let path = kubeconfig.clone();
        replicas.push(ClusterProxy::start(cluster, move |s| s.kubeconfig = Some(path)).await);
    }
    for proxy in &replicas {
        let client = proxy.client_as(&admin);
        let url = proxy.url("/apis/wardle.example.com/v1alpha1/namespaces/default/flunders");
        eventually_status(Duration::from_secs(30), &client, &url, StatusCode::OK).await;
        // Token authentication goes through the account's TokenReview right.
        let bearer = proxy.client().bearer(token.trim()).build();
        let denied = bearer.get(&url).await.unwrap();
        assert_eq!(denied.status, StatusCode::FORBIDDEN, "{}", denied.text());
        assert!(denied.text().contains(ACCOUNT), "{}", denied.text());
    }
}

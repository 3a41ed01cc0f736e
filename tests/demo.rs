//! The embedded demo, driven by the real kubectl binary the way the README tells a new user to.

use std::process::Command;

use kube_aggregation_proxy::demo::Demo;

const KUBECTL: &str = "kubectl";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reads_real_node_metrics_resources_and_identity_through_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), 0).await.expect("demo starts");
    assert!(demo.instructions().contains(&demo.kubeconfig.display().to_string()));

    // kubectl blocks; run it off the runtime that serves the demo.
    let run = |args: &'static [&'static str]| {
        let kubeconfig = demo.kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            // Its own discovery cache: the default one is keyed by host and port only.
            let cache = kubeconfig.with_extension("kubectl-cache");
            let output = Command::new(KUBECTL)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .arg("--cache-dir")
                .arg(&cache)
                .args(args)
                .output()
                .unwrap();
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        })
    };

    let (ok, out, err) = run(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes"]).await.unwrap();
    assert!(ok, "{err}");
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes["kind"], "NodeMetricsList");
    let memory = nodes["items"][0]["usage"]["memory"].as_str().unwrap();
    let kib: u64 = memory.trim_end_matches("Ki").parse().unwrap_or_else(|_| panic!("memory {memory}"));
    assert!(kib > 1024, "implausible memory usage {memory}");

    // The proxy's own read-only apiregistration.k8s.io: kubectl's first troubleshooting step.
    let (ok, out, err) = run(&["get", "apiservices"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(out.starts_with("NAME") && out.contains("SERVICE") && out.contains("AVAILABLE"), "{out}");
    assert!(out.contains("v1beta1.metrics.k8s.io") && out.contains("v1.echo.example.com"), "{out}");

    let (ok, out, err) = run(&["api-resources"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("nodes") && l.contains("metrics.k8s.io/v1beta1") && l.contains("NodeMetrics")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("echoes") && l.contains("echo.example.com/v1")), "{out}");

    let (ok, out, err) = run(&["get", "--raw", "/apis/echo.example.com/v1/anything"]).await.unwrap();
    assert!(ok, "{err}");
    let seen: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(seen["user"]["name"], "demo-admin");
    assert_eq!(seen["user"]["groups"], serde_json::json!(["system:masters", "system:authenticated"]));
    assert!(seen["headers"]["user-agent"][0].as_str().unwrap().starts_with("kubectl/"));

    let (ok, _, err) = run(&["get", "--raw", "/apis/nothing.example.com/v1/x"]).await.unwrap();
    assert!(!ok);
    assert!(err.contains("NotFound") || err.contains("could not find"), "{err}");

    demo.shutdown().await;
}

//! The deployment manifests render with kubectl alone, and every key of the configs they
//! carry is a flag the proxy has (the settings file rejects unknown keys), so a rendered
//! Deployment cannot start with a typo.

use std::path::Path;
use std::process::Command;

use kube_aggregation_proxy::config::{Settings, SourceKind};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl").args(["kustomize", &format!("{ROOT}/{dir}")]).output().expect("kubectl runs");
    assert!(out.status.success(), "{dir}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_base_and_the_standalone_overlay_render_and_their_configs_are_valid_settings() {
    let base = kustomize("manifests/deploy");
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
    ] {
        assert!(base.lines().any(|l| l == format!("kind: {kind}")), "no {kind} in\n{base}");
    }
    assert!(base.contains("replicas: 2"));
    assert!(base.contains("path: /readyz") && base.contains("path: /livez"));
    let overlay = kustomize("manifests/deploy/overlays/standalone");
    assert!(overlay.contains("kube-aggregation-proxy-apiservices"), "{overlay}");

    let cluster =
        Settings::from_file(Path::new(&format!("{ROOT}/manifests/deploy/base/proxy.yaml"))).expect("base config");
    assert!(matches!(cluster.source, Some(SourceKind::Cluster)));
    let standalone = Settings::from_file(Path::new(&format!("{ROOT}/manifests/deploy/overlays/standalone/proxy.yaml")))
        .expect("standalone config");
    assert!(matches!(standalone.source, Some(SourceKind::Files)));
}

#[test]
fn the_deployments_arguments_are_flags_of_serve() {
    let base = kustomize("manifests/deploy");
    assert!(base.lines().any(|l| l.trim() == "- serve"), "the container does not run serve:\n{base}");
    let help = Command::new(env!("CARGO_BIN_EXE_kube-aggregation-proxy")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> =
        base.lines().filter_map(|l| l.trim().strip_prefix("- --")).map(|f| f.split('=').next().unwrap_or(f)).collect();
    assert!(flags.contains(&"config"), "{flags:?}");
    for flag in flags {
        assert!(help.contains(&format!("--{flag}")), "--{flag} is not a flag of serve");
    }
    assert!(help.contains("--config"), "{help}");
}

//! `demo --cluster` as a user runs it: the binary started, kubectl through its
//! kubeconfigs, `compare` between kube-apiserver's own aggregator and the proxy, and Ctrl-C
//! leaving no process behind.
//!
//! `cargo test --features e2e --test e2e_demo_cluster`

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{binaries, https_get, FAKE_NODE_NAME};

/// A first cluster start on two busy cores (with the binaries cached).
const READY_DEADLINE: Duration = Duration::from_secs(300);
const EXIT_DEADLINE: Duration = Duration::from_secs(60);
const BIN: &str = env!("CARGO_BIN_EXE_kube-aggregation-proxy");

/// Every process below `root`, from /proc.
fn descendants(root: u32) -> BTreeSet<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && found.insert(pid) {
                frontier.push(pid);
            }
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its entry is left until it is reaped.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// The demo process, killed if the test fails before it is stopped (its cluster's processes
/// follow: their watchdogs' lifelines close with it).
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// kubectl's success and its output, stderr after stdout.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let out = kubectl_output(kubeconfig, args);
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn kubectl_output(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    let kubectl = &binaries().expect("binaries").kubectl;
    let cache = kubeconfig.with_extension("cache");
    Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args(args)
        .output()
        .expect("kubectl runs")
}

fn until<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let give_up = Instant::now() + deadline;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= give_up => panic!("{what} not within {deadline:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

#[test]
fn demo_cluster_serves_kubectl_compares_and_leaves_nothing_behind() {
    binaries().expect("the Kubernetes binaries build");
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Demo(
        Command::new(BIN)
            .args(["demo", "--cluster", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the demo starts"),
    );
    let pid = demo.0.id();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stdout = demo.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if line.starts_with("Press Ctrl-C") {
                let _ = ready_tx.send(text.clone());
            }
        }
    });
    let instructions = ready_rx.recv_timeout(READY_DEADLINE).expect("demo --cluster says it is ready");
    assert!(instructions.contains("proxy.kubeconfig top node"), "{instructions}");
    let proxy = dir.path().join("proxy.kubeconfig");
    let direct = dir.path().join("direct.kubeconfig");

    // Real version strings, as a Kubernetes release build stamps them, directly and through
    // the proxy (which forwards /version to kube-apiserver).
    let built = binaries().unwrap();
    let version = Command::new(&built.kube_apiserver).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), "Kubernetes v1.37.2");
    for kubeconfig in [&direct, &proxy] {
        // stdout only: kubectl warns on stderr when its own version is far from the server's.
        let out = kubectl_output(kubeconfig, &["version", "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let server = &serde_json::from_str::<serde_json::Value>(&out).unwrap()["serverVersion"];
        assert_eq!(server["gitVersion"], "v1.37.2", "{out}");
        assert_eq!((server["major"].as_str(), server["minor"].as_str()), (Some("1"), Some("37")), "{out}");
        assert_eq!(server["gitTreeState"], "clean", "{out}");
    }

    let (ok, out) = kubectl(&proxy, &["get", "apiservices"]);
    assert!(ok && out.contains("v1beta1.metrics.k8s.io") && out.contains("v1alpha1.wardle.example.com"), "{out}");
    let (ok, out) = kubectl(&proxy, &["get", "flunders", "-A"]);
    assert!(ok, "{out}");
    let top = until(Duration::from_secs(120), "kubectl top node through the proxy", || {
        let (ok, out) = kubectl(&proxy, &["top", "node", "--no-headers"]);
        if ok && out.contains(FAKE_NODE_NAME) {
            Ok(out)
        } else {
            Err(out)
        }
    });
    assert!(top.contains(FAKE_NODE_NAME), "{top}");
    let (ok, out) = kubectl(&dir.path().join("nobody-proxy.kubeconfig"), &["get", "flunders", "-A"]);
    assert!(!ok && out.contains("Forbidden"), "a user without rights is refused: {out}");

    // The admin's bearer token (for clients without certificates), against both servers,
    // verified with the CA files the demo wrote.
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    for (kubeconfig, ca) in [(&direct, "cluster-ca.crt"), (&proxy, "proxy-ca.crt")] {
        let text = std::fs::read_to_string(kubeconfig).unwrap();
        let server = text.lines().find_map(|l| l.trim().strip_prefix("server: ")).unwrap().to_owned();
        let ca = std::fs::read_to_string(dir.path().join(ca)).unwrap();
        let namespace =
            https_get(&server, "/api/v1/namespaces/default", &ca, None, &[("Authorization", &bearer)]).unwrap();
        assert_eq!(namespace.status, 200, "{server}: {}", namespace.body);
        let forged =
            https_get(&server, "/api/v1/namespaces/default", &ca, None, &[("Authorization", "Bearer forged")]).unwrap();
        assert_eq!(forged.status, 401, "{server}: {}", forged.body);
    }

    // The built-in comparison finds kube-aggregator and the proxy alike, and says so.
    let compare = Command::new(BIN).arg("compare").arg(&direct).arg(&proxy).output().unwrap();
    let table = String::from_utf8_lossy(&compare.stdout).into_owned();
    eprintln!("{table}");
    assert_eq!(compare.status.code(), Some(0), "{table}{}", String::from_utf8_lossy(&compare.stderr));
    assert!(table.contains("GET /apis/metrics.k8s.io/v1beta1/nodes"), "{table}");
    assert!(table.contains(" 0 differ"), "{table}");
    // A path only the proxy serves differs, and the exit status says so.
    let differ = Command::new(BIN)
        .arg("compare")
        .arg(&direct)
        .arg(&proxy)
        .args(["--no-builtin", "--request", "GET /debug/apiservices"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&differ.stdout).into_owned();
    assert_eq!(differ.status.code(), Some(1), "{table}");
    assert!(table.contains("1 differ") && table.contains("status: direct 404"), "{table}");

    // Ctrl-C: the demo and every process it started are gone.
    let started = descendants(pid);
    assert!(
        started.len() >= 4,
        "etcd, kube-apiserver, metrics-server, sample-apiserver and their watchdogs: {started:?}"
    );
    let sent = Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    assert!(sent.success());
    let status = until(EXIT_DEADLINE, "the demo to exit on SIGINT", || {
        demo.0.try_wait().map_err(|e| e.to_string())?.ok_or_else(|| "running".to_owned())
    });
    assert!(status.success(), "{status}");
    let left = until(EXIT_DEADLINE, "every process of the demo to end", || {
        let left: Vec<u32> = started.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() {
            Ok(left)
        } else {
            Err(format!("still running: {left:?}"))
        }
    });
    assert!(left.is_empty());
}

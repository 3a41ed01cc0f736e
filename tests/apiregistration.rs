//! The standalone proxy's own read-only apiregistration.k8s.io/v1, driven by the real kubectl:
//! `get apiservices` (server-side Table), `-w` while an APIService flips, `-o yaml` through
//! `apply --dry-run=client`, `describe`, and `delete` refused with a Status.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use common::standalone::Standalone;
use common::wait::eventually;
use http::{Method, StatusCode};

/// A kubeconfig for the standalone proxy's admin (client certificate), and its own cache dir.
fn kubeconfig(env: &Standalone) -> PathBuf {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let path = env.dir.path().join("admin.kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: https://{}\n    certificate-authority-data: {}\n\
         users:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
         contexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: admin\ncurrent-context: proxy\n",
        env.proxy.local_addr(),
        b64(env.pki.serving_ca.cert_pem()),
        b64(&env.pki.admin.cert_pem),
        b64(&env.pki.admin.key_pem),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn kubectl(kubeconfig: &Path) -> Command {
    let mut command = Command::new("kubectl");
    command.arg("--kubeconfig").arg(kubeconfig).arg("--cache-dir").arg(kubeconfig.with_extension("cache"));
    command
}

/// Runs kubectl off the runtime: (success, stdout, stderr).
async fn run(kubeconfig: &Path, args: &[&str], stdin: Option<String>) -> (bool, String, String) {
    let mut command = kubectl(kubeconfig);
    // A bound on each one-shot command (not on the watch, which must outlive a probe round).
    command.arg("--request-timeout=20s").args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("kubectl runs");
        if let Some(input) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// A child process killed (and reaped) when the test ends, passing or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The AVAILABLE column of `name` in `kubectl get apiservices` output.
fn available(table: &str, name: &str) -> Option<String> {
    let line = table.lines().find(|l| l.split_whitespace().next() == Some(name))?;
    let cells: Vec<&str> = line.split_whitespace().collect();
    // NAME SERVICE AVAILABLE... AGE: AVAILABLE may be "False (Reason)".
    Some(cells[2..cells.len() - 1].join(" "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_lists_watches_describes_and_cannot_delete_apiservices_on_the_standalone_proxy() {
    let mut env = Standalone::start().await;
    let kc = kubeconfig(&env);

    let table = eventually(Duration::from_secs(40), || async {
        let (ok, out, err) = run(&kc, &["get", "apiservices"], None).await;
        match (ok, available(&out, "v1beta1.metrics.k8s.io"), available(&out, "v1.echo.example.com")) {
            (true, Some(a), Some(b)) if a == "True" && b == "True" => Ok(out),
            _ => Err(format!("{out}{err}")),
        }
    })
    .await;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("kube-system/sample-apiserver"), "{table}");

    // -o yaml is a real APIService: kubectl accepts it back.
    let (ok, yaml, err) = run(&kc, &["get", "apiservice", "v1beta1.metrics.k8s.io", "-o", "yaml"], None).await;
    assert!(ok, "{err}");
    assert!(yaml.contains("caBundle: ") && yaml.contains("type: Available"), "{yaml}");
    let (ok, out, err) = run(&kc, &["apply", "--dry-run=client", "-f", "-"], Some(yaml)).await;
    assert!(ok, "{out}{err}");
    let (ok, described, err) = run(&kc, &["describe", "apiservice", "v1beta1.metrics.k8s.io"], None).await;
    assert!(ok, "{err}");
    assert!(
        described.contains("Type:                  Available") && described.contains("Reason:                Passed"),
        "{described}"
    );

    // Writes are refused with a Status saying where APIServices come from.
    let (ok, _, err) = run(&kc, &["delete", "apiservice", "v1beta1.metrics.k8s.io"], None).await;
    assert!(!ok);
    assert!(err.contains("MethodNotAllowed") && err.contains("manifest directory"), "{err}");
    let refused = env
        .admin()
        .request(Method::DELETE, &env.url("/apis/apiregistration.k8s.io/v1/apiservices/v1.echo.example.com"), &[], "")
        .await
        .unwrap();
    assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(refused.json()["reason"], "MethodNotAllowed");

    // A running `get -w` prints the flip when the backend goes away.
    let mut watch = KillOnDrop(
        kubectl(&kc).args(["get", "apiservices", "-w"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap(),
    );
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    env.sample.take().expect("the sample backend").stop().await;
    // The availability loop probes every 30 s.
    let flipped = eventually(Duration::from_secs(45), || async {
        let (_, out, err) = run(&kc, &["get", "apiservices"], None).await;
        match available(&out, "v1.echo.example.com") {
            Some(a) if a.starts_with("False (") => Ok(a),
            other => Err(format!("{other:?}: {out}{err}")),
        }
    })
    .await;
    assert!(flipped.contains("FailedDiscoveryCheck") || flipped.contains("Service"), "{flipped}");
    let seen = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(line) if line.starts_with("v1.echo.example.com") && line.contains("False (") => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        Err(seen)
    })
    .await
    .unwrap();
    drop(watch);
    let line = seen.unwrap_or_else(|seen| panic!("the watch printed no flip: {seen:?}"));
    assert!(line.contains("kube-system/sample-apiserver"), "{line}");
}

#[tokio::test]
async fn the_api_answers_lists_watches_from_a_version_and_unknown_names_as_kube_does() {
    let env = Standalone::start().await;
    let admin = env.admin();
    let base = "/apis/apiregistration.k8s.io/v1/apiservices";
    let list = eventually(Duration::from_secs(10), || async {
        let list = admin.get(&env.url(base)).await.map_err(|e| e.to_string())?.json();
        // Both listed, and both probed: nothing else is about to change.
        let settled =
            |i: &Vec<serde_json::Value>| i.len() == 2 && i.iter().all(|o| o["status"]["conditions"].is_array());
        if list["items"].as_array().is_some_and(settled) {
            Ok(list)
        } else {
            Err(format!("{list}"))
        }
    })
    .await;
    assert_eq!(list["kind"], "APIServiceList");
    let version = list["metadata"]["resourceVersion"].as_str().unwrap().to_owned();

    // A watch from the list's version sends only what changes after it.
    let client = env.client().client_cert(&env.pki.admin).timeout(Duration::from_secs(20)).build();
    let mut watch = client
        .get_streaming(&env.url(&format!("{base}?watch=true&resourceVersion={version}&timeoutSeconds=15")))
        .await
        .unwrap();
    assert_eq!(watch.status, StatusCode::OK);
    let added =
        common::standalone::apiservice_yaml("v3.echo.example.com", 1000, 5, Some(("sample-apiserver", 443)), None);
    env.write_manifest("v3.yaml", &added);
    let chunk = watch.next_chunk().await.unwrap().expect("an event");
    let event: serde_json::Value = serde_json::from_slice(chunk.data.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(event["type"], "ADDED");
    assert_eq!(event["object"]["metadata"]["name"], "v3.echo.example.com");

    // A version long gone is kube's 410 Expired.
    let gone = admin.get(&env.url(&format!("{base}?watch=true&resourceVersion=999999"))).await.unwrap();
    assert_eq!(gone.status, StatusCode::GONE);
    assert_eq!(gone.json()["reason"], "Expired");
    let missing = admin.get(&env.url(&format!("{base}/v9.nope.example.com"))).await.unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["message"], "apiservices.apiregistration.k8s.io \"v9.nope.example.com\" not found");
    // Discovery lists the group.
    let apis = admin.get(&env.url("/apis")).await.unwrap().json();
    assert_eq!(apis["groups"][0]["name"], "apiregistration.k8s.io", "{apis}");
}

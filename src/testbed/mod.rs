//! The testbed: a real Kubernetes control plane on loopback, for the end-to-end tests, the
//! benchmarks and `demo --cluster`: etcd and kube-apiserver built from the Go module proxy (see
//! `tests/e2e/k8s/build.sh`), plus real extension API servers (metrics-server,
//! sample-apiserver) registered through APIServices. Behind the `testbed` feature (on by
//! default).
//!
//! [`sample`] is the other half: the sample extension API server this project ships (the
//! standalone demo's backend and the `sample-apiserver` binary), served by the proxy's own
//! front end ([`crate::server`]) rather than a copy of it.
//!
//! The way envtest does it: no kubelet, no controller-manager, no network beyond 127.0.0.1.
//!
//! Invariants:
//! - every process listens on 127.0.0.1 only, on a port picked at start;
//! - no process outlives the test binary, however it ends (see `process.rs`);
//! - every process logs to its own file in [`Cluster::dir`]; the tails of all logs are
//!   printed when a test panics or the cluster fails to start;
//! - every wait polls a condition under a deadline; nothing sleeps for synchronisation.
//!
//! Use [`Cluster::shared`] for the process-wide cluster that tests in one binary share, or
//! [`Cluster::start`] for one a test owns (and may restart kube-apiserver in). The API is
//! blocking by design so it works the same from `#[test]` and `#[tokio::test]`; from an
//! async test that must not block its runtime, wrap calls in `spawn_blocking`.

mod binaries;
mod extension;
mod https;
mod kubectl;
mod kubelet;
mod pki;
mod process;
pub mod sample;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

pub use binaries::{binaries, cache_dir, Binaries};
pub use extension::{ExtensionServer, ExtensionServerKind};
pub use https::{https_get, HttpsResponse};
pub use kubectl::{KubectlOutput, KubectlWatch};
pub use kubelet::{FAKE_NODE_CPU_CORES, FAKE_NODE_MEMORY_BYTES, FAKE_NODE_NAME};
pub use pki::{CertKey, CertificateAuthority, Pki, Usage, FRONT_PROXY_CLIENT_NAME};
pub use process::print_log_tails;

use process::{free_port, Process};

/// `--service-cluster-ip-range`; the first address is the `kubernetes` Service's.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
const APISERVER_SERVICE_IP: &str = "10.0.0.1";
/// `--service-account-issuer`.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

const ETCD_READY_DEADLINE: Duration = Duration::from_secs(30);
/// A first start on two busy cores (bootstrap RBAC, priority-and-fairness) can be slow.
const APISERVER_READY_DEADLINE: Duration = Duration::from_secs(120);
/// Ports are picked free and may be taken before the process binds them: retry that.
const START_ATTEMPTS: usize = 3;
/// Lines of each log printed when something fails.
const LOG_TAIL_LINES: usize = 40;
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A running etcd + kube-apiserver pair and everything needed to talk to it.
pub struct Cluster {
    dir: PathBuf,
    pki: Pki,
    binaries: &'static Binaries,
    etcd_url: String,
    apiserver_port: u16,
    kubeconfig: PathBuf,
    etcd: Mutex<Option<Process>>,
    apiserver: Mutex<Option<Process>>,
    metrics_server: OnceLock<Result<ExtensionServer, String>>,
    sample_apiserver: OnceLock<Result<ExtensionServer, String>>,
    /// Closing this removes `dir` (unless `KAP_KEEP_CLUSTER_DIR` is set).
    janitor: Option<ChildStdin>,
}

/// A client identity signed by the cluster's client CA, with its own kubeconfig.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub cert: CertKey,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    /// The cluster shared by every test in this binary, started on first use.
    ///
    /// Panics (with the logs' tails) if it cannot start; later callers get the same panic
    /// message without another attempt. Do not stop or restart its kube-apiserver: other
    /// tests are using it. It is torn down when the test binary exits.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
        match SHARED.get_or_init(Cluster::start) {
            Ok(cluster) => cluster,
            Err(e) => panic!("the shared test cluster failed to start: {e}"),
        }
    }

    /// Starts a cluster owned by the caller; dropping it stops every process and removes
    /// its directory. Builds the binaries first if this machine has none.
    pub fn start() -> Result<Cluster, String> {
        install_panic_hook();
        let binaries = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("kap-cluster-")
            .tempdir()
            .map_err(|e| format!("creating the cluster directory: {e}"))?
            .keep();
        let janitor = if std::env::var_os("KAP_KEEP_CLUSTER_DIR").is_some() {
            eprintln!("cluster directory kept: {}", dir.display());
            None
        } else {
            Some(process::remove_dir_on_exit(&dir).map_err(|e| format!("starting janitor: {e}"))?)
        };
        let pki =
            Pki::generate(&dir.join("pki"), APISERVER_SERVICE_IP).map_err(|e| format!("generating the PKI: {e}"))?;

        let (etcd, etcd_url) = start_etcd(binaries, &dir)?;
        let mut cluster = Cluster {
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            pki,
            binaries,
            etcd_url,
            apiserver_port: 0,
            etcd: Mutex::new(Some(etcd)),
            apiserver: Mutex::new(None),
            metrics_server: OnceLock::new(),
            sample_apiserver: OnceLock::new(),
            janitor,
        };
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            cluster.apiserver_port = free_port().map_err(|e| format!("picking a port: {e}"))?;
            write_kubeconfig(
                &cluster.kubeconfig,
                &cluster.server_url(),
                &cluster.pki.cluster_ca.cert.cert_pem,
                "admin",
                &cluster.pki.admin,
            )?;
            match cluster.spawn_kube_apiserver() {
                Ok(()) => return Ok(cluster),
                Err(StartError::PortInUse) => last_error = "port in use".to_owned(),
                Err(StartError::Failed(e)) => return Err(with_log_tails(e)),
            }
        }
        Err(with_log_tails(format!("kube-apiserver did not start after {START_ATTEMPTS} attempts: {last_error}")))
    }

    /// The directory holding the PKI, kubeconfigs, etcd data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn binaries(&self) -> &Binaries {
        self.binaries
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    pub fn apiserver_port(&self) -> u16 {
        self.apiserver_port
    }

    /// etcd's client URL (plain HTTP on loopback).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The admin kubeconfig (CN=admin, O=system:masters, certificate data embedded).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// All certificates and keys; see [`Pki`] for which file is which flag.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The log file of a process of this cluster (`etcd`, `kube-apiserver`, ...).
    pub fn log_path(&self, process: &str) -> PathBuf {
        self.dir.join(format!("{process}.log"))
    }

    /// Mints a client certificate for `name` in `groups` (at most two), signed by the client
    /// CA, and a kubeconfig for it. The user has no RBAC permissions until a test grants them.
    pub fn mint_user(&self, name: &str, groups: &[&str]) -> Result<User, String> {
        let users = self.dir.join("users");
        fs::create_dir_all(&users).map_err(|e| format!("creating {}: {e}", users.display()))?;
        let stem = sanitize(name);
        let cert = self
            .pki
            .client_ca
            .issue(&users, &stem, name, groups, &[], Usage::Client)
            .map_err(|e| format!("issuing a client certificate for {name}: {e}"))?;
        let kubeconfig = users.join(format!("{stem}.kubeconfig"));
        write_kubeconfig(&kubeconfig, &self.server_url(), &self.pki.cluster_ca.cert.cert_pem, name, &cert)?;
        Ok(User { name: name.to_owned(), groups: groups.iter().map(|g| g.to_string()).collect(), cert, kubeconfig })
    }

    /// Runs kubectl as admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<KubectlOutput, String> {
        kubectl::run(&self.binaries.kubectl, &self.kubeconfig, args, None)
    }

    /// Runs kubectl as admin with `input` on its stdin.
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Result<KubectlOutput, String> {
        kubectl::run(&self.binaries.kubectl, &self.kubeconfig, args, Some(input))
    }

    /// Runs kubectl with another kubeconfig (for example a [`User`]'s).
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<KubectlOutput, String> {
        kubectl::run(&self.binaries.kubectl, kubeconfig, args, None)
    }

    /// `kubectl apply -f -` as admin; fails unless kubectl succeeds.
    pub fn apply(&self, manifests: &str) -> Result<(), String> {
        let out = kubectl::run(&self.binaries.kubectl, &self.kubeconfig, &["apply", "-f", "-"], Some(manifests))?;
        if out.success() {
            Ok(())
        } else {
            Err(format!("kubectl apply failed: {}\n{}\nmanifests:\n{manifests}", out.stderr, out.stdout))
        }
    }

    /// Starts a long-running kubectl (for example `get --watch`) as the given kubeconfig.
    pub fn kubectl_watch(&self, kubeconfig: &Path, args: &[&str]) -> Result<KubectlWatch, String> {
        KubectlWatch::spawn(&self.binaries.kubectl, kubeconfig, args, &self.log_path("kubectl-watch"))
    }

    /// A kube-rs client authenticated as admin.
    pub async fn client(&self) -> Result<kube::Client, String> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| format!("reading {}: {e}", self.kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("loading the admin kubeconfig: {e}"))?;
        kube::Client::try_from(config).map_err(|e| format!("building a kube client: {e}"))
    }

    /// Waits until the APIService's `Available` condition is `True`.
    pub fn wait_for_apiservice_available(&self, name: &str, timeout: Duration) -> Result<(), String> {
        let mut last = String::from("not found yet");
        wait_for(timeout, &format!("APIService {name} to become Available"), || {
            let out = self.kubectl(&["get", "apiservice", name, "-o", "json"])?;
            if !out.success() {
                last = out.stderr;
                return Ok(None);
            }
            let apiservice = out.json()?;
            let available = apiservice["status"]["conditions"]
                .as_array()
                .and_then(|conditions| conditions.iter().find(|c| c["type"] == "Available"));
            match available {
                Some(c) if c["status"] == "True" => Ok(Some(())),
                Some(c) => {
                    last = format!("{}: {}", c["reason"], c["message"]);
                    Ok(None)
                }
                None => Ok(None),
            }
        })
        .map_err(|e| format!("{e}; last condition: {last}"))
    }

    /// The cluster's metrics-server, started and registered on first use; panics if it
    /// cannot start (tests), see [`Cluster::try_metrics_server`].
    pub fn metrics_server(&self) -> &ExtensionServer {
        self.try_metrics_server().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_metrics_server(&self) -> Result<&ExtensionServer, String> {
        self.metrics_server
            .get_or_init(|| ExtensionServer::start(self, ExtensionServerKind::MetricsServer))
            .as_ref()
            .map_err(|e| format!("metrics-server failed to start: {e}"))
    }

    /// The cluster's sample-apiserver (wardle.example.com), started and registered on first
    /// use; it stores its objects in this cluster's etcd under its own prefix.
    pub fn sample_apiserver(&self) -> &ExtensionServer {
        self.try_sample_apiserver().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_sample_apiserver(&self) -> Result<&ExtensionServer, String> {
        self.sample_apiserver
            .get_or_init(|| ExtensionServer::start(self, ExtensionServerKind::SampleApiserver))
            .as_ref()
            .map_err(|e| format!("sample-apiserver failed to start: {e}"))
    }

    /// Starts another extension server of `kind` owned by the caller (stopped on drop).
    ///
    /// It registers the same APIServices as [`Cluster::metrics_server`] or
    /// [`Cluster::sample_apiserver`] would, pointing them at itself: do not mix the two on
    /// one cluster.
    pub fn start_extension_server(&self, kind: ExtensionServerKind) -> Result<ExtensionServer, String> {
        ExtensionServer::start(self, kind)
    }

    /// Stops kube-apiserver gracefully (SIGTERM, then SIGKILL after ten seconds) and waits
    /// for it to exit; etcd keeps running. [`Cluster::start_kube_apiserver`] brings it back.
    pub fn stop_kube_apiserver(&self) {
        if let Some(mut apiserver) = lock(&self.apiserver).take() {
            apiserver.stop();
        }
    }

    /// Kills kube-apiserver at once (SIGKILL), as a crash would, and waits for it to exit.
    pub fn kill_kube_apiserver(&self) {
        if let Some(mut apiserver) = lock(&self.apiserver).take() {
            apiserver.kill();
        }
    }

    /// Starts kube-apiserver again on the same port with the same flags and waits for
    /// `/readyz`. Only waits if it is already running.
    pub fn start_kube_apiserver(&self) -> Result<(), String> {
        self.spawn_kube_apiserver().map_err(|e| with_log_tails(e.to_string()))
    }

    fn spawn_kube_apiserver(&self) -> Result<(), StartError> {
        let mut slot = lock(&self.apiserver);
        if let Some(running) = slot.as_mut() {
            if running.exit_status().is_none() {
                drop(slot);
                return self.wait_for_readyz(None);
            }
        }
        let process = Process::spawn(
            "kube-apiserver",
            &self.binaries.kube_apiserver,
            &self.kube_apiserver_args(),
            &self.log_path("kube-apiserver"),
        )
        .map_err(|e| StartError::Failed(e.to_string()))?;
        *slot = Some(process);
        drop(slot);
        self.wait_for_readyz(Some(&self.apiserver))
    }

    /// Stops and starts kube-apiserver, keeping its port, PKI and etcd data.
    pub fn restart_kube_apiserver(&self) -> Result<(), String> {
        self.stop_kube_apiserver();
        self.start_kube_apiserver()
    }

    fn wait_for_readyz(&self, process: Option<&Mutex<Option<Process>>>) -> Result<(), StartError> {
        let deadline = Instant::now() + APISERVER_READY_DEADLINE;
        loop {
            if let Some(process) = process {
                let mut guard = lock(process);
                if let Some(p) = guard.as_mut() {
                    if let Some(status) = p.exit_status() {
                        if p.logged("address already in use") {
                            *guard = None;
                            return Err(StartError::PortInUse);
                        }
                        return Err(StartError::Failed(format!("kube-apiserver exited: {status}")));
                    }
                }
            }
            let out = kubectl::run(
                &self.binaries.kubectl,
                &self.kubeconfig,
                &["get", "--raw", "/readyz", "--request-timeout=5s"],
                None,
            )
            .map_err(StartError::Failed)?;
            if out.success() && out.stdout.trim() == "ok" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "kube-apiserver not ready within {APISERVER_READY_DEADLINE:?}: {}{}",
                    out.stdout, out.stderr
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn kube_apiserver_args(&self) -> Vec<String> {
        let pki = &self.pki;
        let path = |p: &Path| p.display().to_string();
        [
            ("etcd-servers", self.etcd_url.clone()),
            ("bind-address", "127.0.0.1".into()),
            ("advertise-address", "127.0.0.1".into()),
            ("secure-port", self.apiserver_port.to_string()),
            // No endpoints for the `kubernetes` Service: loopback addresses are invalid there.
            ("endpoint-reconciler-type", "none".into()),
            ("cert-dir", path(&self.dir.join("apiserver-certs"))),
            ("tls-cert-file", path(&pki.apiserver_serving.cert_path)),
            ("tls-private-key-file", path(&pki.apiserver_serving.key_path)),
            ("client-ca-file", path(&pki.client_ca.cert.cert_path)),
            ("token-auth-file", path(&pki.token_auth_file)),
            // Front-proxy (requestheader) authentication, as kubeadm configures it; published
            // in kube-system/extension-apiserver-authentication for extension servers.
            ("requestheader-client-ca-file", path(&pki.front_proxy_ca.cert.cert_path)),
            ("requestheader-allowed-names", FRONT_PROXY_CLIENT_NAME.into()),
            ("requestheader-username-headers", "X-Remote-User".into()),
            ("requestheader-group-headers", "X-Remote-Group".into()),
            ("requestheader-extra-headers-prefix", "X-Remote-Extra-".into()),
            ("proxy-client-cert-file", path(&pki.front_proxy_client.cert_path)),
            ("proxy-client-key-file", path(&pki.front_proxy_client.key_path)),
            ("authorization-mode", "Node,RBAC".into()),
            ("service-account-issuer", SERVICE_ACCOUNT_ISSUER.into()),
            ("service-account-key-file", path(&pki.service_account_public_key)),
            ("service-account-signing-key-file", path(&pki.service_account_private_key)),
            ("service-cluster-ip-range", SERVICE_CLUSTER_IP_RANGE.into()),
            // No controller-manager creates service-account tokens here.
            ("disable-admission-plugins", "ServiceAccount".into()),
            ("allow-privileged", "true".into()),
            ("v", "1".into()),
        ]
        .into_iter()
        .map(|(flag, value)| format!("--{flag}={value}"))
        .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Extension servers first (they watch kube-apiserver), then kube-apiserver, then
        // etcd; the janitor removes the directory last.
        drop(self.metrics_server.take());
        drop(self.sample_apiserver.take());
        self.kill_kube_apiserver();
        if let Some(mut etcd) = lock(&self.etcd).take() {
            etcd.kill();
        }
        self.janitor = None;
    }
}

/// Why a process did not become ready.
#[derive(Debug)]
enum StartError {
    /// Its port was taken between picking and binding it; the caller may pick another.
    PortInUse,
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::PortInUse => f.write_str("address already in use"),
            StartError::Failed(e) => f.write_str(e),
        }
    }
}

fn start_etcd(binaries: &Binaries, dir: &Path) -> Result<(Process, String), String> {
    let log = dir.join("etcd.log");
    for _ in 0..START_ATTEMPTS {
        let client_port = free_port().map_err(|e| format!("picking a port: {e}"))?;
        let peer_port = free_port().map_err(|e| format!("picking a port: {e}"))?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let args: Vec<String> = [
            ("name", "kap-e2e".to_owned()),
            ("data-dir", dir.join("etcd-data").display().to_string()),
            ("listen-client-urls", client_url.clone()),
            ("advertise-client-urls", client_url.clone()),
            ("listen-peer-urls", peer_url.clone()),
            ("initial-advertise-peer-urls", peer_url.clone()),
            ("initial-cluster", format!("kap-e2e={peer_url}")),
            // Test data need not survive a power cut; fsync dominates etcd latency on CI disks.
            ("unsafe-no-fsync", "true".to_owned()),
            ("log-level", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(flag, value)| format!("--{flag}={value}"))
        .collect();
        let mut etcd =
            Process::spawn("etcd", &binaries.etcd, &args, &log).map_err(|e| format!("starting etcd: {e}"))?;
        let ready = wait_for(ETCD_READY_DEADLINE, "etcd to serve clients", || {
            if let Some(status) = etcd.exit_status() {
                return Err(format!("etcd exited: {status}"));
            }
            Ok(std::net::TcpStream::connect(("127.0.0.1", client_port)).ok().map(|_| ()))
        });
        match ready {
            Ok(()) => return Ok((etcd, client_url)),
            Err(_) if etcd.logged("address already in use") => continue,
            Err(e) => return Err(with_log_tails(e)),
        }
    }
    Err(with_log_tails(format!("etcd did not start after {START_ATTEMPTS} attempts: ports in use")))
}

/// Polls `check` every 200 ms until it yields a value, fails, or `timeout` passes.
///
/// `check` returns `Ok(None)` to keep waiting and `Err` to give up at once.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Writes a kubeconfig with embedded certificate data.
pub fn write_kubeconfig(path: &Path, server: &str, ca_pem: &str, user: &str, cert: &CertKey) -> Result<(), String> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "kap-e2e",
            "cluster": {
                "server": server,
                "certificate-authority-data": BASE64.encode(ca_pem),
            },
        }],
        "users": [{
            "name": user,
            "user": {
                "client-certificate-data": BASE64.encode(&cert.cert_pem),
                "client-key-data": BASE64.encode(&cert.key_pem),
            },
        }],
        "contexts": [{
            "name": "kap-e2e",
            "context": {"cluster": "kap-e2e", "user": user},
        }],
        "current-context": "kap-e2e",
    });
    let text = serde_yaml_ng::to_string(&config).map_err(|e| format!("kubeconfig: {e}"))?;
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A file-name-safe form of a user or server name.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn with_log_tails(message: String) -> String {
    print_log_tails(LOG_TAIL_LINES);
    message
}

/// On any panic in this test binary (a failing assertion), print every process log's tail.
fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            print_log_tails(LOG_TAIL_LINES);
        }));
    });
}

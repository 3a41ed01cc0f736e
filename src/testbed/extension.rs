//! Real extension API servers (metrics-server, sample-apiserver) run against the cluster.
//!
//! Each runs on its own free loopback port with a serving certificate for `<svc>.<ns>.svc`
//! (plus localhost and 127.0.0.1) from the extension-serving CA, under its own client-cert
//! identity with the RBAC its upstream manifests grant, and is registered as an APIService
//! through a Service of type ExternalName pointing at `localhost`: kube-aggregator resolves
//! that to `https://localhost:<spec.service.port>`, so the APIService's port is the server's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::kubelet::FakeKubelet;
use super::pki::{CertKey, Usage};
use super::process::{free_port, Process};
use super::{lock, with_log_tails, Cluster, User, START_ATTEMPTS};

/// How long a freshly started server has to pass kube-aggregator's availability check.
const AVAILABLE_DEADLINE: Duration = Duration::from_secs(120);

/// Which extension server to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtensionServerKind {
    /// sigs.k8s.io/metrics-server: `v1beta1.metrics.k8s.io`.
    MetricsServer,
    /// k8s.io/sample-apiserver: `v1alpha1.wardle.example.com` (Flunders, Fischers).
    SampleApiserver,
}

/// One registered APIService: (group, version, groupPriorityMinimum, versionPriority),
/// priorities as in the upstream manifests.
struct ApiServiceSpec {
    group: &'static str,
    version: &'static str,
    group_priority_minimum: u32,
    version_priority: u32,
}

impl ExtensionServerKind {
    fn name(self) -> &'static str {
        match self {
            ExtensionServerKind::MetricsServer => "metrics-server",
            ExtensionServerKind::SampleApiserver => "sample-apiserver",
        }
    }

    fn namespace(self) -> &'static str {
        match self {
            ExtensionServerKind::MetricsServer => "kube-system",
            ExtensionServerKind::SampleApiserver => "wardle",
        }
    }

    fn service(self) -> &'static str {
        match self {
            ExtensionServerKind::MetricsServer => "metrics-server",
            ExtensionServerKind::SampleApiserver => "api",
        }
    }

    fn apiservices(self) -> &'static [ApiServiceSpec] {
        match self {
            ExtensionServerKind::MetricsServer => &[ApiServiceSpec {
                group: "metrics.k8s.io",
                version: "v1beta1",
                group_priority_minimum: 100,
                version_priority: 100,
            }],
            ExtensionServerKind::SampleApiserver => &[ApiServiceSpec {
                group: "wardle.example.com",
                version: "v1alpha1",
                group_priority_minimum: 1000,
                version_priority: 15,
            }],
        }
    }

    /// Rules of the ClusterRole the server's identity gets, beyond delegated auth.
    fn cluster_role_rules(self) -> &'static str {
        match self {
            // As metrics-server's `system:metrics-server` ClusterRole.
            ExtensionServerKind::MetricsServer => {
                r#"
- apiGroups: [""]
  resources: [nodes/metrics]
  verbs: [get]
- apiGroups: [""]
  resources: [pods, nodes]
  verbs: [get, list, watch]"#
            }
            // Its admission (NamespaceLifecycle, BanFlunder, webhooks, admission policies)
            // and priority-and-fairness informers.
            ExtensionServerKind::SampleApiserver => {
                r#"
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
- apiGroups: [admissionregistration.k8s.io]
  resources: ["*"]
  verbs: [get, list, watch]
- apiGroups: [flowcontrol.apiserver.k8s.io]
  resources: ["*"]
  verbs: [get, list, watch]"#
            }
        }
    }
}

/// A running, registered extension API server.
pub struct ExtensionServer {
    pub kind: ExtensionServerKind,
    /// Namespace and name of its ExternalName Service.
    pub namespace: String,
    pub service: String,
    /// Its loopback port: also `spec.service.port` of its APIServices.
    pub port: u16,
    /// Serving certificate, signed by [`super::Pki::extension_ca`].
    pub serving: CertKey,
    /// Its own identity towards kube-apiserver.
    pub identity: User,
    /// Names of the APIServices it backs, e.g. `v1beta1.metrics.k8s.io`.
    pub apiservices: Vec<String>,
    log: PathBuf,
    process: Mutex<Option<Process>>,
    /// metrics-server's scrape target (a Node and a stand-in kubelet).
    kubelet: Option<FakeKubelet>,
}

impl ExtensionServer {
    /// Starts the server, registers it, and waits until its APIServices are Available.
    pub(super) fn start(cluster: &Cluster, kind: ExtensionServerKind) -> Result<Self, String> {
        let name = kind.name();
        let dir = cluster.dir().join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let identity = cluster.mint_user(&format!("system:{name}"), &[])?;
        let host = format!("{}.{}.svc", kind.service(), kind.namespace());
        let serving = cluster
            .pki()
            .extension_ca
            .issue(
                &dir,
                "serving",
                &host,
                &[],
                &[&host, &format!("{host}.cluster.local"), "localhost", "127.0.0.1"],
                Usage::Server,
            )
            .map_err(|e| format!("issuing {name}'s serving certificate: {e}"))?;

        let mut kubelet = match kind {
            ExtensionServerKind::MetricsServer => {
                let kubelet_serving = cluster
                    .pki()
                    .extension_ca
                    .issue(&dir, "kubelet", "kubelet", &[], &["127.0.0.1", "localhost"], Usage::Server)
                    .map_err(|e| format!("issuing the kubelet's serving certificate: {e}"))?;
                Some(FakeKubelet::start(cluster, &kubelet_serving)?)
            }
            ExtensionServerKind::SampleApiserver => None,
        };

        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port().map_err(|e| format!("picking a port: {e}"))?;
            cluster.apply(&manifests(cluster, kind, &identity, port))?;
            let args = args(cluster, kind, &identity, &serving, port);
            let mut process = Process::spawn(name, server_binary(cluster, kind), &args, &cluster.log_path(name))
                .map_err(|e| format!("starting {name}: {e}"))?;
            let mut ready = Ok(());
            for spec in kind.apiservices() {
                ready = wait_available(cluster, &mut process, &apiservice_name(spec));
                if ready.is_err() {
                    break;
                }
            }
            match ready {
                Ok(()) => {
                    return Ok(ExtensionServer {
                        kind,
                        namespace: kind.namespace().to_owned(),
                        service: kind.service().to_owned(),
                        port,
                        serving,
                        identity,
                        apiservices: kind.apiservices().iter().map(apiservice_name).collect(),
                        log: cluster.log_path(name),
                        process: Mutex::new(Some(process)),
                        kubelet: kubelet.take(),
                    })
                }
                Err(_) if process.logged("address already in use") => {
                    last_error = "port in use".to_owned();
                }
                Err(e) => return Err(with_log_tails(e)),
            }
        }
        Err(with_log_tails(format!("{name} did not start after {START_ATTEMPTS} attempts: {last_error}")))
    }

    /// `https://127.0.0.1:<port>`, for talking to the server directly (bypassing the
    /// aggregator); verify it with [`super::Pki::extension_ca`].
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Stops the server gracefully; its APIServices become unavailable.
    pub fn stop(&self) {
        if let Some(mut process) = lock(&self.process).take() {
            process.stop();
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&self) {
        if let Some(mut process) = lock(&self.process).take() {
            process.kill();
        }
    }

    /// Its log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for ExtensionServer {
    fn drop(&mut self) {
        self.kill();
        self.kubelet = None;
    }
}

fn apiservice_name(spec: &ApiServiceSpec) -> String {
    format!("{}.{}", spec.version, spec.group)
}

fn server_binary(cluster: &Cluster, kind: ExtensionServerKind) -> &Path {
    match kind {
        ExtensionServerKind::MetricsServer => &cluster.binaries().metrics_server,
        ExtensionServerKind::SampleApiserver => &cluster.binaries().sample_apiserver,
    }
}

fn wait_available(cluster: &Cluster, process: &mut Process, apiservice: &str) -> Result<(), String> {
    // Poll in short slices so a crashed server fails fast instead of at the deadline.
    let slice = Duration::from_secs(2);
    let deadline = std::time::Instant::now() + AVAILABLE_DEADLINE;
    loop {
        if let Some(status) = process.exit_status() {
            return Err(format!("{} exited: {status}", process.name()));
        }
        match cluster.wait_for_apiservice_available(apiservice, slice) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => {}
        }
    }
}

fn args(cluster: &Cluster, kind: ExtensionServerKind, identity: &User, serving: &CertKey, port: u16) -> Vec<String> {
    let kubeconfig = identity.kubeconfig.display().to_string();
    let mut flags: Vec<(&str, String)> = vec![
        ("bind-address", "127.0.0.1".into()),
        ("secure-port", port.to_string()),
        ("tls-cert-file", serving.cert_path.display().to_string()),
        ("tls-private-key-file", serving.key_path.display().to_string()),
        ("kubeconfig", kubeconfig.clone()),
        // Delegated authentication and authorization through kube-apiserver, with the
        // requestheader and client CAs read from kube-system/extension-apiserver-authentication.
        ("authentication-kubeconfig", kubeconfig.clone()),
        ("authorization-kubeconfig", kubeconfig),
    ];
    match kind {
        ExtensionServerKind::MetricsServer => flags.extend([
            ("cert-dir", cluster.dir().join("metrics-server").display().to_string()),
            // The stand-in kubelet: self-signed as far as metrics-server knows, on the port
            // its Node's status announces.
            ("kubelet-insecure-tls", "true".into()),
            ("kubelet-use-node-status-port", "true".into()),
            ("kubelet-preferred-address-types", "InternalIP".into()),
            // The shortest allowed (CPU usage needs two scrapes), above the request timeout.
            ("metric-resolution", "10s".into()),
            ("kubelet-request-timeout", "5s".into()),
        ]),
        ExtensionServerKind::SampleApiserver => flags.extend([
            ("etcd-servers", cluster.etcd_url().to_owned()),
            // Its own keyspace in the cluster's etcd.
            ("etcd-prefix", "/wardle-sample-apiserver".into()),
            ("cert-dir", cluster.dir().join("sample-apiserver").display().to_string()),
        ]),
    }
    flags.into_iter().map(|(flag, value)| format!("--{flag}={value}")).collect()
}

/// Namespace, RBAC, ExternalName Service and APIServices for one server.
fn manifests(cluster: &Cluster, kind: ExtensionServerKind, identity: &User, port: u16) -> String {
    let name = kind.name();
    let namespace = kind.namespace();
    let service = kind.service();
    let user = &identity.name;
    let ca_bundle = BASE64.encode(&cluster.pki().extension_ca.cert.cert_pem);
    let rules = kind.cluster_role_rules();
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kap-e2e:{name}:auth-delegator
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:auth-delegator
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: {user}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: kap-e2e:{name}:auth-reader
  namespace: kube-system
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: extension-apiserver-authentication-reader
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: {user}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: kap-e2e:{name}
rules:{rules}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kap-e2e:{name}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: kap-e2e:{name}
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: {user}
---
apiVersion: v1
kind: Service
metadata:
  name: {service}
  namespace: {namespace}
spec:
  type: ExternalName
  externalName: localhost
"#
    );
    for spec in kind.apiservices() {
        let _ = write!(
            yaml,
            r#"---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: {apiservice}
spec:
  group: {group}
  version: {version}
  groupPriorityMinimum: {gpm}
  versionPriority: {vp}
  caBundle: {ca_bundle}
  service:
    namespace: {namespace}
    name: {service}
    port: {port}
"#,
            apiservice = apiservice_name(spec),
            group = spec.group,
            version = spec.version,
            gpm = spec.group_priority_minimum,
            vp = spec.version_priority,
        );
    }
    yaml
}

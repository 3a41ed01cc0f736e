//! `demo --cluster`: a real control plane on loopback with the proxy in front of it.
//!
//! etcd, kube-apiserver (with its own kube-aggregator), metrics-server and sample-apiserver,
//! built from the Go module proxy on first use and cached ([`crate::testbed`]); a generated
//! PKI with the front-proxy CA and client certificate set up the way kube-apiserver needs
//! them; metrics-server and sample-apiserver registered as APIServices; and this proxy in
//! cluster mode in front. `DIR/direct.kubeconfig` reaches kube-apiserver (and its own
//! aggregator), `DIR/proxy.kubeconfig` this proxy, both as an admin; `DIR/nobody-*.kubeconfig`
//! are a user with no rights; `DIR/admin.token` is the admin's bearer token (kube-apiserver's
//! `--token-auth-file`) for clients without certificates, with `DIR/proxy-ca.crt` and
//! `DIR/cluster-ca.crt` to verify the two servers. Ctrl-C stops everything: every process runs under a watchdog
//! that ends it when this process goes, however it goes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::app::{self, RunningApp};
use crate::backend::BackendProtocol;
use crate::config::{Settings, SourceKind};
use crate::pki::CertificateAuthority;
use crate::runtime::RuntimeModel;
use crate::testbed::{self, write_kubeconfig, Cluster, User};

/// How long the proxy may take to build its first routing table from the cluster.
const PROXY_READY_DEADLINE: Duration = Duration::from_secs(60);
/// How often a first build says it is still going.
const BUILD_PROGRESS_INTERVAL: Duration = Duration::from_secs(15);
/// How long each APIService may take to become Available in kube-apiserver.
const APISERVICE_AVAILABLE_DEADLINE: Duration = Duration::from_secs(120);

/// The running demo: dropping it stops the cluster's processes.
/// The proxy's own flags that `demo --cluster` passes on, to measure them on a real control
/// plane (`benches/load.sh` with `DEMO_ARGS`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyOptions {
    /// `--runtime`
    pub runtime: RuntimeModel,
    /// `--backend-protocol`, for extension servers and kube-apiserver alike.
    pub backend_protocol: BackendProtocol,
}

pub struct ClusterDemo {
    pub dir: PathBuf,
    pub proxy: RunningApp,
    cluster: Cluster,
}

/// Something that stopped the demo from starting, in words a user can act on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClusterDemoError(String);

fn step(n: usize, of: usize, what: &str) {
    eprintln!("[{n}/{of}] {what}");
}

impl ClusterDemo {
    /// Builds what is missing, starts the control plane, the extension servers and the
    /// proxy, and writes the kubeconfigs. Blocking parts run off the async runtime.
    pub async fn start(dir: &Path, options: ProxyOptions) -> Result<Self, ClusterDemoError> {
        const STEPS: usize = 5;
        let err = |e: String| ClusterDemoError(e);
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        let started = Instant::now();
        step(1, STEPS, "Kubernetes binaries (built from the Go module proxy on first use; cached)");
        // build.sh names each binary as it builds it; this says how long it has been going.
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(BUILD_PROGRESS_INTERVAL);
            every.tick().await;
            loop {
                every.tick().await;
                eprintln!(
                    "      ... still building, {} elapsed",
                    humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
                );
            }
        });
        let built = blocking(|| testbed::binaries().map(|_| ())).await;
        ticker.abort();
        built.map_err(|e| err(go_hint(e)))?;
        step(2, STEPS, "etcd and kube-apiserver, with a generated PKI");
        let cluster = blocking(Cluster::start).await.map_err(err)?;
        step(3, STEPS, "metrics-server and sample-apiserver, registered as APIServices");
        let cluster = blocking(move || {
            cluster.try_metrics_server()?;
            cluster.try_sample_apiserver()?;
            for name in ["v1beta1.metrics.k8s.io", "v1alpha1.wardle.example.com"] {
                cluster.wait_for_apiservice_available(name, APISERVICE_AVAILABLE_DEADLINE)?;
            }
            Ok::<_, String>(cluster)
        })
        .await
        .map_err(err)?;
        step(4, STEPS, "the proxy in cluster mode, in front of kube-apiserver");
        let serving_ca =
            CertificateAuthority::new("kube-aggregation-proxy-demo-serving-ca").map_err(|e| err(e.to_string()))?;
        let serving = serving_ca
            .issue_serving("kube-aggregation-proxy", &["localhost", "127.0.0.1"])
            .map_err(|e| err(e.to_string()))?;
        let pki_dir = dir.join("pki");
        std::fs::create_dir_all(&pki_dir).map_err(|e| err(format!("creating {}: {e}", pki_dir.display())))?;
        serving.write(&pki_dir, "proxy-serving").map_err(|e| err(e.to_string()))?;
        let front_proxy = &cluster.pki().front_proxy_client;
        let settings = Settings {
            source: Some(SourceKind::Cluster),
            kubeconfig: Some(cluster.kubeconfig().to_owned()),
            secure_port: Some(0),
            tls_cert_file: Some(pki_dir.join("proxy-serving.crt")),
            tls_private_key_file: Some(pki_dir.join("proxy-serving.key")),
            proxy_client_cert_file: Some(front_proxy.cert_path.clone()),
            proxy_client_key_file: Some(front_proxy.key_path.clone()),
            runtime: Some(options.runtime),
            backend_protocol: Some(options.backend_protocol),
            ..Settings::default()
        };
        let config = settings.validate().map_err(|e| err(e.to_string()))?;
        let proxy = app::start(config).await.map_err(|e| err(e.to_string()))?;
        tokio::time::timeout(PROXY_READY_DEADLINE, proxy.ready())
            .await
            .map_err(|_| err(format!("the proxy built no routing table within {PROXY_READY_DEADLINE:?}")))?;
        step(5, STEPS, "kubeconfigs");
        let proxy_url = format!("https://{}", proxy.local_addr());
        // Quick (a certificate each): no need to leave the runtime.
        let admin = cluster.mint_user("demo-admin", &["system:masters"]).map_err(err)?;
        let nobody = cluster.mint_user("nobody", &[]).map_err(err)?;
        let write = |name: &str, server: &str, ca: &str, user: &User| {
            write_kubeconfig(&dir.join(format!("{name}.kubeconfig")), server, ca, &user.name, &user.cert).map_err(err)
        };
        let cluster_ca = &cluster.pki().cluster_ca.cert.cert_pem;
        write("direct", &cluster.server_url(), cluster_ca, &admin)?;
        write("proxy", &proxy_url, serving_ca.cert_pem(), &admin)?;
        write("nobody-direct", &cluster.server_url(), cluster_ca, &nobody)?;
        write("nobody-proxy", &proxy_url, serving_ca.cert_pem(), &nobody)?;
        // For clients without client certificates (curl, h2load): the same admin, by token.
        write_private(&dir.join("admin.token"), &cluster.pki().admin_token).map_err(err)?;
        std::fs::write(dir.join("proxy-ca.crt"), serving_ca.cert_pem())
            .and_then(|()| std::fs::write(dir.join("cluster-ca.crt"), cluster_ca))
            .map_err(|e| err(format!("writing the CA files: {e}")))?;
        eprintln!("ready in {:.0?}", started.elapsed());
        Ok(Self { dir: dir.to_owned(), proxy, cluster })
    }

    /// What to try, side by side.
    pub fn instructions(&self) -> String {
        let d = self.dir.display();
        format!(
            "kube-aggregation-proxy demo --cluster is ready.\n\n  \
             kube-apiserver:   {direct} (its own aggregator)   DIR/direct.kubeconfig\n  \
             proxy:            https://{proxy} (in front of it)   DIR/proxy.kubeconfig\n  \
             DIR:              {d}\n\n\
             Try, through the proxy and then directly (direct.kubeconfig):\n  \
             kubectl --kubeconfig {d}/proxy.kubeconfig top node\n  \
             kubectl --kubeconfig {d}/proxy.kubeconfig get apiservices\n  \
             kubectl --kubeconfig {d}/proxy.kubeconfig get flunders -A\n  \
             kubectl --kubeconfig {d}/proxy.kubeconfig auth can-i list flunders.wardle.example.com --as nobody\n  \
             kubectl --kubeconfig {d}/nobody-proxy.kubeconfig get flunders -A     # Forbidden, as directly\n  \
             kube-aggregation-proxy compare {d}/direct.kubeconfig {d}/proxy.kubeconfig\n  \
             curl --cacert {d}/proxy-ca.crt -H \"Authorization: Bearer $(cat {d}/admin.token)\" https://{proxy}/version\n\n\
             Press Ctrl-C to stop everything.\n",
            direct = self.cluster.server_url(),
            proxy = self.proxy.local_addr(),
        )
    }

    /// Stops the proxy, then (on drop) every process of the cluster.
    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
        blocking(move || drop(self.cluster)).await;
    }
}

/// Writes a secret readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Build failures without Go say what to install.
fn go_hint(error: String) -> String {
    if error.contains("no Go toolchain") || error.contains("build.sh") && which("go").is_none() {
        format!(
            "{error}\ndemo --cluster builds etcd, kube-apiserver, metrics-server and sample-apiserver from the Go \
             module proxy on first use (about 20 minutes on two cores, 2 GB of disk in the Go caches): install Go \
             (https://go.dev/dl/) or set GO=/path/to/go"
        )
    } else {
        error
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

//! The proxy in cluster mode in front of the harness's kube-apiserver: started in-process
//! with the same wiring as `serve --source cluster`, presenting the cluster's front-proxy client
//! certificate, with kubeconfigs that point kubectl at the proxy instead of kube-apiserver.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube_aggregation_proxy::app::{self, RunningApp};
use kube_aggregation_proxy::config::{Settings, SourceKind};
use kube_aggregation_proxy::pki::{self, CertificateAuthority};

use super::client::{TestClient, TestClientBuilder};
use super::cluster::{write_kubeconfig, Cluster, User};

pub struct ClusterProxy {
    pub app: RunningApp,
    pub dir: tempfile::TempDir,
    pub serving_ca: CertificateAuthority,
}

impl ClusterProxy {
    /// Starts the proxy against `cluster` and waits until its first routing table serves.
    pub async fn start(cluster: &Cluster, adjust: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let serving_ca = CertificateAuthority::new("cluster-proxy-serving-ca").expect("CA");
        let serving = serving_ca.issue_serving("proxy", &["localhost", "127.0.0.1"]).expect("serving cert");
        serving.write(dir.path(), "serving").expect("write serving cert");
        let front_proxy = &cluster.pki().front_proxy_client;
        let mut settings = Settings {
            source: Some(SourceKind::Cluster),
            kubeconfig: Some(cluster.kubeconfig().to_owned()),
            secure_port: Some(0),
            tls_cert_file: Some(dir.path().join("serving.crt")),
            tls_private_key_file: Some(dir.path().join("serving.key")),
            proxy_client_cert_file: Some(front_proxy.cert_path.clone()),
            proxy_client_key_file: Some(front_proxy.key_path.clone()),
            ..Settings::default()
        };
        adjust(&mut settings);
        let app = app::start(settings.validate().expect("valid settings")).await.expect("proxy starts");
        tokio::time::timeout(Duration::from_secs(60), app.ready()).await.expect("the first routing table is built");
        Self { app, dir, serving_ca }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.app.local_addr())
    }

    /// A kubeconfig for `user` that points at the proxy.
    pub fn kubeconfig_for(&self, user: &User) -> PathBuf {
        let path = self.dir.path().join(format!("{}.kubeconfig", user.name.replace(':', "-")));
        write_kubeconfig(
            &path,
            &format!("https://{}", self.app.local_addr()),
            self.serving_ca.cert_pem(),
            &user.name,
            &user.cert,
        )
        .expect("kubeconfig written");
        path
    }

    /// A test client trusting the proxy, presenting `user`'s certificate.
    pub fn client_as(&self, user: &User) -> TestClient {
        self.client()
            .client_cert(&pki::PemPair { cert_pem: user.cert.cert_pem.clone(), key_pem: user.cert.key_pem.clone() })
            .build()
    }

    pub fn client(&self) -> TestClientBuilder {
        TestClient::builder().ca_pem(self.serving_ca.cert_pem())
    }
}

/// Runs a blocking harness call off the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

pub fn kubectl_as(cluster: &'static Cluster, kubeconfig: &Path, args: &[&str]) -> super::cluster::KubectlOutput {
    cluster.kubectl_as(kubeconfig, args).expect("kubectl runs")
}

/// A cluster owned by one test (for tests that stop its parts), with sample-apiserver and,
/// if asked, metrics-server running. It is leaked so it lives as long as the test's `'static`
/// borrows; its processes still end with the test binary (see `cluster::process`).
pub async fn owned_cluster(with_metrics_server: bool) -> &'static Cluster {
    blocking(move || {
        let cluster: &'static Cluster = Box::leak(Box::new(Cluster::start().expect("cluster starts")));
        if with_metrics_server {
            cluster.metrics_server();
        }
        cluster.sample_apiserver();
        cluster
    })
    .await
}

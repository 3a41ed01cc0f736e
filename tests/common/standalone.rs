//! A standalone proxy on loopback for integration tests: a generated PKI, the real sample
//! extension server as backend, manifests in a temp dir, and the proxy started in-process with
//! the same wiring as `serve`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::Engine;
use kube_aggregation_proxy::app::{self, RunningApp};
use kube_aggregation_proxy::auth::requestheader::RequestHeaderConfig;
use kube_aggregation_proxy::auth::x509::ChainVerifier;
use kube_aggregation_proxy::config::Settings;
use kube_aggregation_proxy::pki::{CertificateAuthority, PemPair};
use kube_aggregation_proxy::testbed::sample::{SampleServer, SampleServerConfig};

use super::client::{TestClient, TestClientBuilder};

pub const SAMPLE_NAMESPACE: &str = "kube-system";
pub const SAMPLE_SERVICE: &str = "sample-apiserver";
pub const PROXY_CLIENT_CN: &str = "front-proxy-client";
pub const TOKEN: &str = "test-token-alice";

/// Every certificate a standalone test needs.
pub struct Pki {
    pub serving_ca: CertificateAuthority,
    pub client_ca: CertificateAuthority,
    pub front_proxy_ca: CertificateAuthority,
    pub proxy_client: PemPair,
    pub sample_serving: PemPair,
    pub admin: PemPair,
}

impl Pki {
    pub fn new() -> Self {
        let serving_ca = CertificateAuthority::new("test-serving-ca").expect("serving CA");
        let client_ca = CertificateAuthority::new("test-client-ca").expect("client CA");
        let front_proxy_ca = CertificateAuthority::new("test-front-proxy-ca").expect("front-proxy CA");
        let proxy_client = front_proxy_ca.issue_client(PROXY_CLIENT_CN, &[]).expect("proxy client cert");
        let sample_serving = serving_ca
            .issue_serving("sample", &["sample-apiserver.kube-system.svc", "localhost", "127.0.0.1"])
            .expect("sample serving cert");
        let admin = client_ca.issue_client("admin", &["system:masters"]).expect("admin cert");
        Self { serving_ca, client_ca, front_proxy_ca, proxy_client, sample_serving, admin }
    }
}

/// A running sample extension server.
pub struct Sample {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sample {
    /// Starts the sample server; `addr` port 0 picks a free port.
    pub async fn start(pki: &Pki, addr: SocketAddr) -> Self {
        let verifier = ChainVerifier::from_pem(pki.front_proxy_ca.cert_pem().as_bytes(), "front-proxy CA").unwrap();
        let server = SampleServer::bind(SampleServerConfig {
            bind: addr,
            serving: pki.sample_serving.certified_key().unwrap(),
            requestheader: RequestHeaderConfig::with_default_headers(verifier, vec![PROXY_CLIENT_CN.into()]),
            node_name: Some("test-node".into()),
        })
        .await
        .expect("sample server binds");
        let addr = server.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self { addr, stop: Some(stop), task }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

/// An APIService manifest.
pub fn apiservice_yaml(name: &str, gpm: i32, vp: i32, service: Option<(&str, u16)>, ca_pem: Option<&str>) -> String {
    let (version, group) = name.split_once('.').expect("name is version.group");
    let mut yaml = format!(
        "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: {name}\nspec:\n  group: {group:?}\n  \
         version: {version}\n  groupPriorityMinimum: {gpm}\n  versionPriority: {vp}\n"
    );
    if let Some((service, port)) = service {
        yaml.push_str(&format!(
            "  service:\n    name: {service}\n    namespace: {SAMPLE_NAMESPACE}\n    port: {port}\n"
        ));
    }
    if let Some(ca) = ca_pem {
        yaml.push_str(&format!("  caBundle: {}\n", base64::engine::general_purpose::STANDARD.encode(ca)));
    }
    yaml
}

pub struct Standalone {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub sample: Option<Sample>,
    pub sample_addr: SocketAddr,
    pub proxy: RunningApp,
    /// What the proxy was started with, for tests that load the same configuration again.
    pub settings: Settings,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl Standalone {
    /// The proxy with `echo.example.com/v1` and `metrics.k8s.io/v1beta1` served by the sample
    /// server, client certs and a token accepted, no anonymous access.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Like [`Standalone::start`], with a chance to adjust the settings.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let sample = Sample::start(&pki, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await;
        let sample_addr = sample.addr;
        let p = |name: &str| dir.path().join(name);
        let apiservices = p("apiservices");
        std::fs::create_dir(&apiservices).unwrap();
        let ca = pki.serving_ca.cert_pem();
        write(
            &apiservices.join("echo.yaml"),
            &apiservice_yaml("v1.echo.example.com", 1000, 15, Some((SAMPLE_SERVICE, 443)), Some(ca)),
        );
        write(
            &apiservices.join("metrics.yaml"),
            &apiservice_yaml("v1beta1.metrics.k8s.io", 100, 100, Some((SAMPLE_SERVICE, 443)), Some(ca)),
        );
        let serving = pki.serving_ca.issue_serving("proxy", &["localhost", "127.0.0.1"]).unwrap();
        serving.write(dir.path(), "serving").unwrap();
        pki.proxy_client.write(dir.path(), "proxy-client").unwrap();
        write(&p("client-ca.crt"), pki.client_ca.cert_pem());
        write(&p("tokens.csv"), &format!("{TOKEN},alice,1001,\"dev,ops\"\n"));
        let mut settings = Settings {
            apiservices_dir: Some(apiservices),
            services: vec![
                format!("{SAMPLE_NAMESPACE}/{SAMPLE_SERVICE}:443={sample_addr}"),
                // A service whose certificate does not carry its name.
                format!("{SAMPLE_NAMESPACE}/impostor:443={sample_addr}"),
            ],
            secure_port: Some(0),
            tls_cert_file: Some(p("serving.crt")),
            tls_private_key_file: Some(p("serving.key")),
            client_ca_file: Some(p("client-ca.crt")),
            token_auth_file: Some(p("tokens.csv")),
            proxy_client_cert_file: Some(p("proxy-client.crt")),
            proxy_client_key_file: Some(p("proxy-client.key")),
            ..Settings::default()
        };
        adjust(&mut settings);
        let started_with = settings.clone();
        let proxy = app::start(settings.validate().expect("valid test config")).await.expect("proxy starts");
        tokio::time::timeout(std::time::Duration::from_secs(10), proxy.ready()).await.expect("proxy becomes ready");
        // Every backend fetched once, so discovery and OpenAPI list the sample's groups.
        tokio::time::timeout(std::time::Duration::from_secs(10), proxy.discovery().synced())
            .await
            .expect("discovery is fetched from every backend");
        Self { dir, pki, sample: Some(sample), sample_addr, proxy, settings: started_with }
    }

    pub fn apiservices_dir(&self) -> PathBuf {
        self.dir.path().join("apiservices")
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) {
        write(&self.apiservices_dir().join(file), yaml);
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.proxy.local_addr())
    }

    /// A client that trusts the proxy, with no credentials yet.
    pub fn client(&self) -> TestClientBuilder {
        TestClient::builder().ca_pem(self.pki.serving_ca.cert_pem())
    }

    /// A client authenticated as `admin` (groups system:masters) by client certificate.
    pub fn admin(&self) -> TestClient {
        self.client().client_cert(&self.pki.admin).build()
    }
}

/// The proxy's open backend connections, summed over endpoints, from its own `/metrics`.
pub async fn backend_connections(env: &Standalone) -> usize {
    let metrics = env.admin().get(&env.url("/metrics")).await.unwrap().text();
    metrics
        .lines()
        .filter(|l| l.starts_with("aggregator_backend_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

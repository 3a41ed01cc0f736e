//! The embedded default: a throwaway PKI, the sample extension server and the proxy on
//! loopback, both APIServices registered from manifests, and a kubeconfig to point kubectl at.
//!
//! Everything it writes goes under one directory, so a user can read the certificates, the
//! manifests and the config it used, and rerun `serve --config DIR/proxy.yaml` by hand.

#[cfg(feature = "testbed")]
pub mod cluster;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::Engine;
use k8s_openapi::ByteString;

use crate::apiservice::manifest::parse_documents;
use crate::app::{self, RunningApp};
use crate::auth::requestheader::RequestHeaderConfig;
use crate::auth::x509::ChainVerifier;
use crate::config::Settings;
use crate::pki::{self, CertificateAuthority, PkiError};
use crate::testbed::sample::{SampleServer, SampleServerConfig};

/// The APIService manifests the demo registers, with their file names.
pub const MANIFESTS: [(&str, &str); 2] = [
    ("v1beta1.metrics.k8s.io.yaml", include_str!("../../manifests/demo/v1beta1.metrics.k8s.io.yaml")),
    ("v1.echo.example.com.yaml", include_str!("../../manifests/demo/v1.echo.example.com.yaml")),
];

/// The service the manifests name, and the common name the sample server allows.
const SAMPLE_SERVICE: &str = "kube-system/sample-apiserver:443";
const SAMPLE_SERVER_NAME: &str = "sample-apiserver.kube-system.svc";
const PROXY_CLIENT_CN: &str = "front-proxy-client";
const DEMO_USER: &str = "demo-admin";
const DEMO_GROUP: &str = "system:masters";
/// A token for curl users; the demo directory is private to whoever ran it.
const DEMO_TOKEN_USER: &str = "demo-token-user";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{0}")]
    Io(String),
    #[error("sample extension server: {0}")]
    Sample(String),
    #[error("proxy configuration: {0}")]
    Config(String),
    #[error("proxy: {0}")]
    App(#[from] app::AppError),
}

/// A running demo.
pub struct Demo {
    pub dir: PathBuf,
    pub proxy: RunningApp,
    pub sample_addr: SocketAddr,
    pub kubeconfig: PathBuf,
    pub token: String,
    sample_shutdown: tokio::sync::oneshot::Sender<()>,
    sample_task: tokio::task::JoinHandle<()>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DemoError + '_ {
    move |e| DemoError::Io(format!("{}: {e}", path.display()))
}

fn b64(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem)
}

/// Writes the manifests with `spec.caBundle` set to `ca_pem`.
fn write_manifests(dir: &Path, ca_pem: &str) -> Result<(), DemoError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (file, text) in MANIFESTS {
        let mut objects = parse_documents(text, file).map_err(|e| DemoError::Config(e.to_string()))?;
        for object in &mut objects {
            if let Some(spec) = object.spec.as_mut() {
                spec.ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
            }
        }
        let mut out = String::new();
        for object in &objects {
            let yaml = serde_yaml_ng::to_string(object).map_err(|e| DemoError::Config(e.to_string()))?;
            out.push_str("---\n");
            out.push_str(&yaml);
        }
        let path = dir.join(file);
        std::fs::write(&path, out).map_err(io(&path))?;
    }
    Ok(())
}

fn kubeconfig(server: &str, ca_pem: &str, client: &pki::PemPair) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-aggregation-proxy-demo\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {DEMO_USER}\n  user:\n    client-certificate-data: {cert}\n    \
         client-key-data: {key}\ncontexts:\n- name: demo\n  context:\n    cluster: kube-aggregation-proxy-demo\n    user: {DEMO_USER}\n\
         current-context: demo\n",
        ca = b64(ca_pem),
        cert = b64(&client.cert_pem),
        key = b64(&client.key_pem),
    )
}

impl Demo {
    /// Sets everything up under `dir` and starts both servers on loopback; `port` 0 picks one.
    pub async fn start(dir: &Path, port: u16) -> Result<Self, DemoError> {
        let pki_dir = dir.join("pki");
        std::fs::create_dir_all(&pki_dir).map_err(io(&pki_dir))?;
        let serving_ca = CertificateAuthority::new("kube-aggregation-proxy-demo-serving-ca")?;
        let client_ca = CertificateAuthority::new("kube-aggregation-proxy-demo-client-ca")?;
        let front_proxy_ca = CertificateAuthority::new("kube-aggregation-proxy-demo-front-proxy-ca")?;
        let proxy_serving = serving_ca.issue_serving("localhost", &["localhost", "127.0.0.1", "::1"])?;
        let sample_serving =
            serving_ca.issue_serving(SAMPLE_SERVER_NAME, &[SAMPLE_SERVER_NAME, "localhost", "127.0.0.1"])?;
        let proxy_client = front_proxy_ca.issue_client(PROXY_CLIENT_CN, &[])?;
        let admin = client_ca.issue_client(DEMO_USER, &[DEMO_GROUP])?;
        pki::write_file(&pki_dir.join("serving-ca.crt"), serving_ca.cert_pem(), false)?;
        pki::write_file(&pki_dir.join("client-ca.crt"), client_ca.cert_pem(), false)?;
        pki::write_file(&pki_dir.join("front-proxy-ca.crt"), front_proxy_ca.cert_pem(), false)?;
        proxy_serving.write(&pki_dir, "proxy-serving")?;
        sample_serving.write(&pki_dir, "sample-serving")?;
        proxy_client.write(&pki_dir, "proxy-client")?;
        admin.write(&pki_dir, DEMO_USER)?;

        let verifier = ChainVerifier::from_pem(front_proxy_ca.cert_pem().as_bytes(), "front-proxy CA")
            .map_err(|e| DemoError::Sample(e.to_string()))?;
        let sample = SampleServer::bind(SampleServerConfig {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            serving: sample_serving.certified_key().map_err(|e| DemoError::Sample(e.to_string()))?,
            requestheader: RequestHeaderConfig::with_default_headers(verifier, vec![PROXY_CLIENT_CN.to_owned()]),
            node_name: None,
        })
        .await
        .map_err(|e| DemoError::Sample(e.to_string()))?;
        let sample_addr = sample.local_addr();
        let (sample_shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let sample_task = tokio::spawn(sample.run(async {
            let _ = stop.await;
        }));

        let apiservices_dir = dir.join("apiservices");
        write_manifests(&apiservices_dir, serving_ca.cert_pem())?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let tokens = dir.join("tokens.csv");
        pki::write_file(&tokens, &format!("{token},{DEMO_TOKEN_USER},1000,\"demo\"\n"), true)?;
        let config_path = dir.join("proxy.yaml");
        let config_text = format!(
            "# Written by `kube-aggregation-proxy demo`; rerun with: kube-aggregation-proxy serve --config {config}\n\
             source: files\napiservices-dir: {apiservices}\nservices:\n  {SAMPLE_SERVICE}: {sample_addr}\n\
             bind-address: 127.0.0.1\nsecure-port: {port}\ntls-cert-file: {pki}/proxy-serving.crt\n\
             tls-private-key-file: {pki}/proxy-serving.key\nclient-ca-file: {pki}/client-ca.crt\n\
             token-auth-file: {tokens}\nproxy-client-cert-file: {pki}/proxy-client.crt\n\
             proxy-client-key-file: {pki}/proxy-client.key\n",
            config = config_path.display(),
            apiservices = apiservices_dir.display(),
            pki = pki_dir.display(),
            tokens = tokens.display(),
        );
        std::fs::write(&config_path, &config_text).map_err(io(&config_path))?;
        let config = Settings::from_file(&config_path)
            .and_then(Settings::validate)
            .map_err(|e| DemoError::Config(e.to_string()))?;
        let proxy = app::start(config).await?;
        proxy.ready().await;
        // Discovery and OpenAPI are fetched in the background; wait for the first round so
        // `kubectl api-resources` and `kubectl explain` see the sample's groups at once.
        proxy.discovery().synced().await;
        let kubeconfig_path = dir.join("kubeconfig");
        let server = format!("https://{}", proxy.local_addr());
        pki::write_file(&kubeconfig_path, &kubeconfig(&server, serving_ca.cert_pem(), &admin), true)?;
        Ok(Self {
            dir: dir.to_owned(),
            proxy,
            sample_addr,
            kubeconfig: kubeconfig_path,
            token,
            sample_shutdown,
            sample_task,
        })
    }

    /// What to try next, for the terminal.
    pub fn instructions(&self) -> String {
        let kc = self.kubeconfig.display();
        let addr = self.proxy.local_addr();
        let ca = self.dir.join("pki/serving-ca.crt");
        format!(
            "kube-aggregation-proxy demo is ready.\n\n  proxy:            https://{addr}\n  sample backend:   https://{sample} \
             (kube-system/sample-apiserver)\n  files:            {dir}\n\nTry:\n  \
             kubectl --kubeconfig {kc} get apiservices\n  \
             kubectl --kubeconfig {kc} get --raw /apis/metrics.k8s.io/v1beta1/nodes\n  \
             kubectl --kubeconfig {kc} api-resources\n  \
             kubectl --kubeconfig {kc} get --raw /apis/echo.example.com/v1/anything\n  \
             kubectl --kubeconfig {kc} get --raw /apis\n  \
             kubectl --kubeconfig {kc} get --raw /debug/apiservices\n  \
             curl --cacert {ca} -H 'Authorization: Bearer {token}' -H 'X-Remote-User: system:admin' \
             https://{addr}/apis/echo.example.com/v1/spoof-me\n\n\
             Edit or add manifests in {dir}/apiservices and the routing table follows within a second.\n\
             Press Ctrl-C to stop.\n",
            sample = self.sample_addr,
            dir = self.dir.display(),
            ca = ca.display(),
            token = self.token,
        )
    }

    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
        let _ = self.sample_shutdown.send(());
        let _ = self.sample_task.await;
    }
}

//! Wiring: from a validated [`Config`] to a running proxy. Used by `serve`, the demo and the
//! integration tests alike, so what is tested is what runs.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::auth::identity::IdentityHeaderNames;
use crate::auth::requestheader::RequestHeaderAuthenticator;
use crate::auth::x509::ClientCertAuthenticator;
use crate::auth::{AuthChain, Authenticator};
use crate::config::{Config, Source};
use crate::metrics::Metrics;
use crate::pki;
use crate::proxy::client::{BackendClient, BackendTls, ClientCache, ClientSettings};
use crate::proxy::ForwardSettings;
use crate::routing::writer::{self, SharedTable};
use crate::routing::{RoutingTable, StaticResolver};
use crate::server::endpoints::{self, EndpointState, SharedRejections};
use crate::server::pipeline::DelegateTarget;
use crate::server::{self, Gateway};
use crate::source::file::FileSource;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("serving certificate: {0}")]
    Serving(String),
    #[error("delegate: {0}")]
    Delegate(String),
    #[error("source: {0}")]
    Source(String),
}

/// A running proxy. Dropping it does not stop it; call [`RunningApp::shutdown`].
pub struct RunningApp {
    local_addr: SocketAddr,
    /// PEM of the CA that signed the serving certificate, when the proxy generated its own.
    generated_serving_ca: Option<String>,
    table: SharedTable,
    ready: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    tasks: JoinSet<()>,
}

impl RunningApp {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn generated_serving_ca(&self) -> Option<&str> {
        self.generated_serving_ca.as_deref()
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Resolves once the first routing table is serving.
    pub async fn ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Stops accepting, drains in-flight requests, and stops the background tasks.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // The server task ends after draining; the others end when their channels close.
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                if e.is_panic() {
                    tracing::error!(error = %e, "background task panicked");
                }
            }
            self.tasks.abort_all();
        }
    }

    /// Runs until one of the tasks ends (the server, on shutdown) and returns.
    pub async fn wait(&mut self) {
        let _ = self.tasks.join_next().await;
    }
}

fn auth_chain(config: &Config) -> (AuthChain, IdentityHeaderNames) {
    let mut authenticators: Vec<Arc<dyn Authenticator>> = Vec::new();
    let mut names = IdentityHeaderNames::default();
    if let Some(rh) = &config.requestheader {
        names = IdentityHeaderNames::new(
            rh.username_headers.iter().chain(&rh.uid_headers).chain(&rh.group_headers).map(String::as_str),
            rh.extra_headers_prefix.iter().map(String::as_str),
        );
        authenticators.push(Arc::new(RequestHeaderAuthenticator::new(rh.clone())));
    }
    if let Some(ca) = &config.client_ca {
        authenticators.push(Arc::new(ClientCertAuthenticator::new(ca.clone())));
    }
    if let Some(tokens) = &config.token_file {
        authenticators.push(Arc::new(tokens.clone()));
    }
    (AuthChain::new(authenticators, config.anonymous_auth), names)
}

/// Every CA a client certificate may come from, so the TLS layer asks for one.
fn client_roots(config: &Config) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let verifiers = config.client_ca.iter().chain(config.requestheader.as_ref().map(|rh| &rh.verifier));
    for verifier in verifiers {
        roots.roots.extend(verifier.roots().roots.iter().cloned());
    }
    roots
}

/// Starts the proxy described by `config` and returns once it is listening (not yet ready:
/// see [`RunningApp::ready`]).
pub async fn start(config: Config) -> Result<RunningApp, AppError> {
    let metrics = Arc::new(Metrics::new());
    let (serving, generated_serving_ca) = match &config.serving {
        Some(s) => (s.clone(), None),
        None => {
            let pair = pki::self_signed_localhost().map_err(|e| AppError::Serving(e.to_string()))?;
            let ca = pair.cert_pem.split_inclusive("-----END CERTIFICATE-----").nth(1).map(|s| s.trim().to_owned());
            (pair.certified_key().map_err(|e| AppError::Serving(e.to_string()))?, ca)
        }
    };
    let tls_config =
        tls::server_config(&serving, Some(client_roots(&config))).map_err(|e| AppError::Serving(e.to_string()))?;

    let client_settings = ClientSettings {
        proxy_client_cert: config.proxy_client_cert.clone(),
        connect_timeout: config.backend_connect_timeout,
        idle_timeout: config.backend_idle_timeout,
        ..ClientSettings::default()
    };
    let delegate = match &config.delegate {
        Some(d) => {
            let tls = BackendTls {
                server_name: d.server_name.clone(),
                ca_bundle: d.ca_bundle.clone().into(),
                insecure_skip_tls_verify: false,
            };
            let client = BackendClient::new(&tls, &client_settings).map_err(|e| AppError::Delegate(e.to_string()))?;
            Some(DelegateTarget { client, authority: d.authority.clone() })
        }
        None => None,
    };
    let clients = Arc::new(ClientCache::new(client_settings));
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
    let rejections: SharedRejections = Arc::default();
    let (ready_tx, ready) = watch::channel(false);
    let (snapshots_tx, snapshots_rx) = watch::channel(None);
    let mut tasks = JoinSet::new();

    match &config.source {
        Source::Files { dir, services } => {
            let resolver = Arc::new(StaticResolver::new(services.clone()));
            let source = FileSource::new(dir.clone(), resolver, rejections.clone(), metrics.clone());
            tasks.spawn(source.run(snapshots_tx));
        }
        Source::Cluster { .. } => {
            return Err(AppError::Source("source: cluster is not available in this build yet".into()));
        }
    }
    tasks.spawn(writer::run(snapshots_rx, table.clone(), clients, ready_tx, metrics.clone()));

    let (auth, identity_headers) = auth_chain(&config);
    let endpoint_state =
        EndpointState { table: table.clone(), metrics: metrics.clone(), ready: ready.clone(), rejections };
    let gateway = Arc::new(Gateway {
        table: table.clone(),
        auth,
        identity_headers,
        forward: ForwardSettings {
            reject_forwarding_redirects: config.reject_forwarding_redirects,
            ..ForwardSettings::default()
        },
        delegate,
        metrics: metrics.clone(),
        ready: ready.clone(),
        endpoints: endpoints::router(endpoint_state),
    });
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| AppError::Listen { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| AppError::Listen { addr: config.listen, source })?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    tasks.spawn(server::serve(listener, Arc::new(tls_config), gateway, async {
        let _ = shutdown_rx.await;
    }));
    tracing::info!(%local_addr, "serving");
    Ok(RunningApp { local_addr, generated_serving_ca, table, ready, metrics, shutdown: Some(shutdown_tx), tasks })
}

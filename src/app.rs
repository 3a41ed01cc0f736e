//! Wiring: from a validated [`Config`] to a running proxy. Used by `serve`, the demo and the
//! integration tests alike, so what is tested is what runs.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::auth::authorization::{Authorization, SubjectAccessReviewer};
use crate::auth::delegating;
use crate::auth::tokenreview::TokenReviewAuthenticator;
use crate::availability::Availability;
use crate::backend::{Backend, BackendTls, Backends};
use crate::config::{Config, Delegate, Source};
use crate::discovery::{DelegateDiscovery, DiscoveryDocuments, Fetcher, FetcherSettings};
use crate::metrics::Metrics;
use crate::pki;
use crate::proxy::ForwardSettings;
use crate::routing::writer::{self, SharedTable};
use crate::routing::{RoutingTable, StaticResolver};
use crate::runtime::RuntimeModel;
use crate::server::credentials::{self, ReloadStatus, SharedFrontEnd, SharedReloadStatus};
use crate::server::endpoints::{self, EndpointState, SharedRejections};
use crate::server::pipeline::DelegateTarget;
use crate::server::signal::Signal;
use crate::server::{self, Gateway};
use crate::source::file::FileSource;
use crate::source::kube::ClusterSource;
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
    #[error("audit log: {0}")]
    Audit(std::io::Error),
    #[error("tracing: {0}")]
    Tracing(String),
}

/// A running proxy. Dropping it does not stop it; call [`RunningApp::shutdown`].
pub struct RunningApp {
    local_addr: SocketAddr,
    /// PEM of the CA that signed the serving certificate, when the proxy generated its own.
    generated_serving_ca: Option<String>,
    table: SharedTable,
    ready: Signal<bool>,
    metrics: Arc<Metrics>,
    discovery: DiscoveryDocuments,
    delegate_discovery: watch::Sender<Arc<DelegateDiscovery>>,
    shutdown: Option<oneshot::Sender<()>>,
    tasks: JoinSet<()>,
    /// Flushed on shutdown, so the last requests' spans are exported.
    tracing: Option<Arc<crate::telemetry::Tracing>>,
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

    /// The aggregated discovery and OpenAPI documents being served.
    pub fn discovery(&self) -> &DiscoveryDocuments {
        &self.discovery
    }

    /// Where the delegate's own discovery and OpenAPI documents go (cluster mode).
    pub fn delegate_discovery(&self) -> &watch::Sender<Arc<DelegateDiscovery>> {
        &self.delegate_discovery
    }

    /// Resolves once the first routing table is serving.
    pub async fn ready(&self) {
        self.ready.wait_for(|ready| ready).await;
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
        if let Some(tracing) = &self.tracing {
            tracing.shutdown().await;
        }
    }

    /// Runs until one of the tasks ends (the server, on shutdown) and returns.
    pub async fn wait(&mut self) {
        let _ = self.tasks.join_next().await;
    }
}

/// A client for the cluster of `kubeconfig` (or the in-cluster config, or kube's usual
/// inference when none is given).
async fn connect(kubeconfig: Option<&std::path::Path>) -> Result<(kube::Client, kube::Config), AppError> {
    let source = |e: String| AppError::Source(format!("cluster: {e}"));
    let kube_config = match kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|e| source(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| source(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| source(e.to_string()))?,
    };
    let client = kube::Client::try_from(kube_config.clone()).map_err(|e| source(e.to_string()))?;
    Ok((client, kube_config))
}

/// The delegate is the kubeconfig's server, trusted with the kubeconfig's CA.
fn delegate_from_kubeconfig(kube_config: &kube::Config) -> Result<Delegate, AppError> {
    let url = &kube_config.cluster_url;
    let host = url.host().ok_or_else(|| AppError::Delegate(format!("kubeconfig server {url} has no host")))?;
    let port = url.port_u16().unwrap_or(443);
    let authority = format!(
        "{}:{port}",
        if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() }
    )
    .parse()
    .map_err(|e| AppError::Delegate(format!("kubeconfig server {url}: {e}")))?;
    let ca_bundle = kube_config.root_cert.as_deref().map(tls::der_to_pem).unwrap_or_default().into_bytes();
    Ok(Delegate { authority, ca_bundle, server_name: host.trim_matches(['[', ']']).to_owned() })
}

/// Starts the proxy described by `config` and returns once it is listening (not yet ready:
/// see [`RunningApp::ready`]).
pub async fn start(mut config: Config) -> Result<RunningApp, AppError> {
    // Before any backend endpoint exists: per-core runtimes each get a pool of their own.
    crate::runtime::prepare(config.frontend.runtime);
    let metrics = Arc::new(Metrics::new());
    // Cluster mode fills what flags left open from the cluster itself: the delegate is the
    // kubeconfig's server, authentication follows kube-apiserver's published settings, and
    // bearer tokens are checked with TokenReview.
    let cluster = match &config.source {
        Source::Cluster { kubeconfig } => Some(connect(kubeconfig.as_deref()).await?),
        Source::Files { .. } => None,
    };
    // What the cluster provides where flags give nothing, kept for credential reloads.
    let mut provided = credentials::Provided::default();
    let mut reviewer = None;
    if let Some((client, kube_config)) = &cluster {
        if config.delegate.is_none() {
            config.delegate = Some(delegate_from_kubeconfig(kube_config)?);
        }
        if config.client_ca.is_none() || config.requestheader.is_none() {
            match delegating::load(client.clone()).await {
                Ok(found) => {
                    provided.client_ca = found.client_ca;
                    provided.requestheader = found.requestheader;
                }
                Err(e) => tracing::warn!(error = %e, "cluster authentication settings unavailable; using flags only"),
            }
        }
        provided.token_reviewer =
            Some(Arc::new(TokenReviewAuthenticator::new(client.clone(), config.token_review_cache_ttl)));
        reviewer = Some(SubjectAccessReviewer::new(client.clone(), config.authorization.ttls));
    }
    let generated_serving_ca = match &config.serving {
        Some(_) => None,
        None => {
            let pair = pki::self_signed_localhost().map_err(|e| AppError::Serving(e.to_string()))?;
            let ca = pair.cert_pem.split_inclusive("-----END CERTIFICATE-----").nth(1).map(|s| s.trim().to_owned());
            provided.generated_serving = Some(pair.certified_key().map_err(|e| AppError::Serving(e.to_string()))?);
            ca
        }
    };
    let front: SharedFrontEnd =
        Arc::new(ArcSwap::from_pointee(credentials::build(&config, &provided).map_err(AppError::Serving)?));
    let credentials_status: SharedReloadStatus = Arc::new(ArcSwap::from_pointee(ReloadStatus::loaded()));

    let backend_settings = config.backend.clone();
    let delegate = match &config.delegate {
        Some(d) => {
            let tls = BackendTls {
                server_name: d.server_name.clone(),
                ca_bundle: d.ca_bundle.clone().into(),
                insecure_skip_tls_verify: false,
            };
            let backend = Backend::new(&tls, Arc::new(backend_settings.clone()), metrics.clone())
                .map_err(|e| AppError::Delegate(e.to_string()))?;
            let endpoints = backend
                .endpoints(std::slice::from_ref(&d.authority))
                .ok_or_else(|| AppError::Delegate("no address".into()))?;
            Some(DelegateTarget { endpoints })
        }
        None => None,
    };
    let probe_settings = backend_settings.clone();
    let clients = Arc::new(Backends::new(backend_settings, metrics.clone()));
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
    let rejections: SharedRejections = Arc::default();
    let (table_ready_tx, mut table_ready) = watch::channel(false);
    let ready = Signal::new(false);
    let (snapshots_tx, snapshots_rx) = watch::channel(None);
    let mut tasks = JoinSet::new();

    match &config.source {
        Source::Files { dir, services, limits } => {
            let resolver = Arc::new(StaticResolver::new(services.clone()));
            let source = FileSource::new(dir.clone(), resolver, *limits, rejections.clone(), metrics.clone());
            tasks.spawn(source.run(snapshots_tx));
        }
        Source::Cluster { .. } => {
            let (client, _) = cluster.clone().ok_or_else(|| AppError::Source("no cluster client".into()))?;
            let loopback = delegate.as_ref().map(|d| d.endpoints.pick().authority().clone());
            let source = ClusterSource::new(
                client,
                config.enable_aggregator_routing,
                loopback,
                rejections.clone(),
                metrics.clone(),
            );
            tasks.spawn(source.run(snapshots_tx));
        }
    }
    tasks.spawn(writer::run(snapshots_rx, table.clone(), clients, table_ready_tx, metrics.clone()));
    // Our own availability view: probes each remote APIService as kube-aggregator does.
    let availability = Arc::new(Availability::default());
    tasks.spawn(crate::availability::run(table.clone(), probe_settings, availability.clone(), metrics.clone()));
    // Standalone: `kubectl get apiservices` is answered by the proxy, from the same state.
    let apiregistration = match &config.source {
        Source::Files { dir, .. } => {
            let registry = crate::server::apiregistration::Registry::new(
                format!("the manifest directory {}", dir.display()),
                table.clone(),
                availability.clone(),
            );
            tasks.spawn(registry.clone().run());
            Some(registry)
        }
        Source::Cluster { .. } => None,
    };
    // Discovery and OpenAPI are fetched from the backends in the background and served from
    // memory; cluster mode sends kube-apiserver's own documents on `delegate_discovery`.
    let (delegate_discovery, delegate_discovery_rx) = watch::channel(Arc::new(DelegateDiscovery::default()));
    let fetcher_settings = FetcherSettings {
        delegate_expected: delegate.is_some(),
        serves_apiregistration: matches!(config.source, Source::Files { .. }),
        ..FetcherSettings::default()
    };
    let (fetcher, discovery) = Fetcher::new(table.clone(), fetcher_settings, delegate_discovery_rx);
    tasks.spawn(fetcher.run());
    let mut delegate_fetched = None;
    if let Some(d) = &delegate {
        // With a delegate, its own groups (built-ins, CRDs) join the merged documents.
        let (fetched_tx, fetched) = watch::channel(false);
        delegate_fetched = Some(fetched);
        let feed = crate::discovery::delegate::run(
            d.endpoints.pick().clone(),
            table.clone(),
            delegate_discovery.clone(),
            fetched_tx,
        );
        tasks.spawn(feed);
    }
    // Ready, as kube-apiserver's readiness waits for its aggregator: the first routing table,
    // the first discovery round, and (with a delegate) one attempt at its documents.
    let (discovery_synced, becomes_ready) = (discovery.clone(), ready.clone());
    tasks.spawn(async move {
        let _ = table_ready.wait_for(|r| *r).await;
        discovery_synced.synced().await;
        if let Some(mut fetched) = delegate_fetched {
            let _ = fetched.wait_for(|f| *f).await;
        }
        becomes_ready.set(true);
        // The app runs until one of its tasks ends; this one has nothing more to do.
        std::future::pending::<()>().await;
    });

    let lifecycle = Signal::new(server::Lifecycle::Serving);
    // Credentials are reloaded when their files change or on SIGHUP.
    tasks.spawn(
        credentials::Reloader {
            settings: config.settings.clone(),
            provided,
            front: front.clone(),
            proxy_client_cert: config.backend.proxy_client_cert.clone(),
            status: credentials_status.clone(),
            metrics: metrics.clone(),
        }
        .run(),
    );
    let endpoint_state = EndpointState {
        table: table.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        rejections,
        discovery: discovery.clone(),
        has_delegate: delegate.is_some(),
        availability,
        apiregistration,
        credentials: credentials_status,
        lifecycle: lifecycle.clone(),
    };
    let tracing = match &config.tracing {
        Some(settings) => Some(Arc::new(crate::telemetry::Tracing::start(settings).map_err(AppError::Tracing)?)),
        None => None,
    };
    let gateway = Arc::new(Gateway {
        table: table.clone(),
        front,
        forward: ForwardSettings {
            reject_forwarding_redirects: config.reject_forwarding_redirects,
            ..ForwardSettings::default()
        },
        delegate,
        metrics: metrics.clone(),
        ready: ready.clone(),
        endpoints: endpoints::router(endpoint_state),
        authorization: match reviewer {
            Some(reviewer) => Authorization::cluster(reviewer, config.authorization.aggregated, metrics.clone()),
            None => Authorization::standalone(config.authorization.impersonator_groups.clone(), metrics.clone()),
        },
        limits: crate::server::limits::RequestLimits::new(config.request_limits.clone()),
        flow: crate::server::flow::FlowControl::new(config.flow),
        documents: discovery.clone(),
        lifecycle: lifecycle.clone(),
        send_retry_after: config.frontend.shutdown_send_retry_after,
        watch_grace: config.frontend.shutdown_watch_termination_grace_period,
        audit: match config.audit.clone() {
            Some(settings) => {
                Some(Arc::new(crate::audit::Auditor::start(settings, metrics.clone()).map_err(AppError::Audit)?))
            }
            None => None,
        },
        tracing: tracing.clone(),
    });
    let listen_error = |source| AppError::Listen { addr: config.listen, source };
    let (listeners, local_addr) = match config.frontend.runtime {
        RuntimeModel::WorkStealing => {
            let listener = TcpListener::bind(config.listen).await.map_err(listen_error)?;
            let local_addr = listener.local_addr().map_err(listen_error)?;
            (server::Listeners::Shared(listener), local_addr)
        }
        RuntimeModel::PerCore => {
            let cores = crate::runtime::cores();
            let listeners = crate::runtime::bind_reuseport(config.listen, cores).map_err(listen_error)?;
            let local_addr = listeners[0].local_addr().map_err(listen_error)?;
            tracing::info!(cores, "serving on a runtime per core");
            (server::Listeners::PerCore(listeners), local_addr)
        }
    };
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    tasks.spawn(server::serve(listeners, gateway, config.frontend.clone(), lifecycle, async {
        let _ = shutdown_rx.await;
    }));
    tracing::info!(%local_addr, "serving");
    Ok(RunningApp {
        local_addr,
        generated_serving_ca,
        table,
        ready,
        metrics,
        discovery,
        delegate_discovery,
        shutdown: Some(shutdown_tx),
        tasks,
        tracing,
    })
}

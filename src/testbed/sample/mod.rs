//! The sample extension API server: what the aggregation proxy forwards to in the demo and in
//! tests, behaving as a server built on k8s.io/apiserver does.
//!
//! It serves TLS (HTTP/1.1 and HTTP/2) and asks every client for a certificate from the
//! requestheader CA. A certificate from any other CA fails the handshake; a caller without one,
//! with a common name that is not allowed, or without a username header is answered 401. It
//! serves `metrics.k8s.io/v1beta1` NodeMetrics for this machine from `/proc`
//! ([`node_metrics`]), the `echo.example.com/v1` API that describes each request back
//! ([`echo`]), discovery for both ([`discovery`]) and their OpenAPI documents ([`openapi`]).
//! [`handler`] holds the request path.
//!
//! [`SampleServer::bind`] binds first (so port 0 works and the address is known before
//! serving); [`SampleServer::run`] serves until its shutdown future completes. It is served by
//! the proxy's own front end ([`crate::server::serve`]): the same TLS handshake deadline,
//! connection limits, idle timeouts and graceful shutdown, which also ends open watches.

pub mod discovery;
pub mod echo;
pub mod handler;
pub mod node_metrics;
pub mod openapi;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::requestheader::{RequestHeaderAuthenticator, RequestHeaderConfig};
use crate::metrics::Metrics;
use crate::server::connection::{ActivityGuard, BodyGuards, GuardedBody};
use crate::server::signal::Signal;
use crate::server::{self, ConnectionInfo, FrontendSettings, Lifecycle, RequestHandler};
use crate::tls::{self, CertifiedKey, TlsError};
use handler::Handler;
use node_metrics::Sampler;

/// Everything the sample server needs; the binary builds it from flags, tests and the demo
/// from generated PKI.
#[derive(Clone)]
pub struct SampleServerConfig {
    /// Where to listen; port 0 picks a free port (see [`SampleServer::local_addr`]).
    pub bind: SocketAddr,
    /// The serving certificate chain and key.
    pub serving: CertifiedKey,
    /// Which client certificates may assert identity, and in which headers.
    pub requestheader: RequestHeaderConfig,
    /// The node name NodeMetrics reports; the machine's host name when `None`.
    pub node_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A bound, not yet serving, sample extension server.
pub struct SampleServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    service: Arc<SampleService>,
    sampler: Arc<Sampler>,
    stop: watch::Sender<bool>,
}

/// What the front end serves: the handler behind its TLS configuration.
struct SampleService {
    tls: Arc<rustls::ServerConfig>,
    /// The front end's connection counters; the sample server does not publish them.
    metrics: Arc<Metrics>,
    handler: Handler,
}

impl RequestHandler for SampleService {
    fn tls_config(&self) -> Arc<rustls::ServerConfig> {
        self.tls.clone()
    }

    fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    async fn handle(
        &self,
        conn: &ConnectionInfo,
        activity: ActivityGuard,
        request: Request<Incoming>,
    ) -> Response<GuardedBody> {
        let guards = BodyGuards { activity, permits: [None, None], audit: None, trace: None };
        self.handler.handle(request, &conn.peer).await.map(|body| GuardedBody::new(body, guards, None, None))
    }
}

impl std::fmt::Debug for SampleServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleServer")
            .field("local_addr", &self.local_addr)
            .field("node_name", &self.service.handler.node_name())
            .finish_non_exhaustive()
    }
}

impl SampleServer {
    /// Builds the TLS configuration and binds the listener. Fails when the serving certificate
    /// or the requestheader CA cannot make a rustls configuration, or the address is taken.
    pub async fn bind(config: SampleServerConfig) -> Result<Self, SampleError> {
        let client_roots = config.requestheader.verifier.roots().clone();
        let tls_config = tls::server_config(&config.serving, Some(client_roots))?;
        let listener =
            TcpListener::bind(config.bind).await.map_err(|source| SampleError::Bind { addr: config.bind, source })?;
        let local_addr = listener.local_addr().map_err(|source| SampleError::Bind { addr: config.bind, source })?;

        let sampler = Sampler::new();
        // A first sample now, so the first NodeMetrics has a window even before the
        // background sampler has run.
        if let Err(error) = sampler.record() {
            tracing::warn!(%error, "node metrics are unavailable on this machine");
        }
        let node_name = config.node_name.unwrap_or_else(node_metrics::hostname);
        let (stop, stop_rx) = watch::channel(false);
        let handler =
            Handler::new(RequestHeaderAuthenticator::new(config.requestheader), node_name, sampler.clone(), stop_rx);
        let service = SampleService { tls: Arc::new(tls_config), metrics: Arc::new(Metrics::new()), handler };
        Ok(Self { listener, local_addr, service: Arc::new(service), sampler, stop })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node name NodeMetrics reports.
    pub fn node_name(&self) -> &str {
        self.service.handler.node_name()
    }

    /// Serves until `shutdown` completes: accepts connections, samples node metrics in the
    /// background, and on shutdown stops accepting, ends watches, and lets open connections
    /// finish within the front end's grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self { listener, local_addr, service, sampler, stop } = self;
        // Aborted on drop, so the sampler stops even when this future is dropped mid-serve.
        let _sampling = AbortOnDrop(tokio::spawn(sampler.run(node_metrics::DEFAULT_SAMPLE_INTERVAL)));
        let lifecycle = Signal::new(Lifecycle::Serving);
        // Watches end as soon as the front end starts draining.
        let draining = lifecycle.clone();
        let _end_watches = AbortOnDrop(tokio::spawn(async move {
            draining.wait_for(|l| l == Lifecycle::Draining).await;
            stop.send_replace(true);
        }));
        tracing::info!(address = %local_addr, node = service.handler.node_name(), "sample-apiserver serving");
        server::serve(server::Listeners::Shared(listener), service, FrontendSettings::default(), lifecycle, shutdown)
            .await;
        tracing::info!(address = %local_addr, "sample-apiserver stopped");
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

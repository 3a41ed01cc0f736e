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
//! serving); [`SampleServer::run`] serves until its shutdown future completes, then ends open
//! watches and gives connections [`SHUTDOWN_GRACE`] to finish.

pub mod discovery;
pub mod echo;
pub mod handler;
pub mod node_metrics;
pub mod openapi;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::x509::PeerChain;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::requestheader::{RequestHeaderAuthenticator, RequestHeaderConfig};
use crate::tls::{self, CertifiedKey, TlsError};
use handler::Handler;
use node_metrics::Sampler;

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    acceptor: TlsAcceptor,
    handler: Arc<Handler>,
    sampler: Arc<Sampler>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for SampleServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleServer")
            .field("local_addr", &self.local_addr)
            .field("node_name", &self.handler.node_name())
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
        Ok(Self {
            listener,
            local_addr,
            acceptor: TlsAcceptor::from(Arc::new(tls_config)),
            handler: Arc::new(handler),
            sampler,
            stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node name NodeMetrics reports.
    pub fn node_name(&self) -> &str {
        self.handler.node_name()
    }

    /// Serves until `shutdown` completes: accepts connections, samples node metrics in the
    /// background, and on shutdown stops accepting, ends watches, and waits up to
    /// [`SHUTDOWN_GRACE`] for open connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self { listener, local_addr, acceptor, handler, sampler, stop } = self;
        // Aborted on drop, so the sampler stops even when this future is dropped mid-serve.
        let _sampling = AbortOnDrop(tokio::spawn(sampler.run(node_metrics::DEFAULT_SAMPLE_INTERVAL)));
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        tracing::info!(address = %local_addr, node = handler.node_name(), "sample-apiserver serving");

        tokio::pin!(shutdown);
        loop {
            let (tcp, remote) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Usually transient (out of file descriptors); back off instead of spinning.
                        tracing::warn!(%error, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let watcher = graceful.watcher();
            let (acceptor, handler, builder) = (acceptor.clone(), handler.clone(), builder.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%remote, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let peer = Arc::new(PeerChain::new(
                    tls.get_ref().1.peer_certificates().map(<[_]>::to_vec).unwrap_or_default(),
                ));
                let service = hyper::service::service_fn(move |request| {
                    let (handler, peer) = (handler.clone(), peer.clone());
                    async move { Ok::<_, std::convert::Infallible>(handler.handle(request, &peer).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(tls), service).into_owned();
                if let Err(error) = watcher.watch(connection).await {
                    tracing::debug!(%remote, %error, "connection ended with an error");
                }
            });
        }

        drop(listener);
        stop.send_replace(true);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
            tracing::info!("connections still open after the shutdown grace period; closing them");
        }
        tracing::info!(address = %local_addr, "sample-apiserver stopped");
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

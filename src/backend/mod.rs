//! The one way out of the proxy: every request to an extension server or to the delegate,
//! and every discovery fetch, goes through here.
//!
//! ```text
//!  Backends (by TLS identity) ─▶ Backend ─▶ Endpoint (by address) ─▶ connections (h2 / h1)
//!                                   │            health: peak-EWMA, in flight, ejection
//!                                   └─ Endpoints (one service's, for a route): P2C pick, retry
//! ```
//!
//! Endpoints, their connections and their health outlive routing tables: a table rebuild that
//! keeps an address keeps its warm connections and its record; [`Backends::retain`] drops
//! the rest. See [`endpoint`] for how connections are used and [`balancer`] for how an
//! endpoint is picked and ejected. [`send`] is the request path's entry: pick, send, and retry
//! once on another connection or endpoint when that is safe.

pub mod balancer;
pub mod endpoint;
pub mod error;
pub mod settings_tap;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use dashmap::DashMap;
use http::uri::Authority;
use http::{Method, Request, Response};
use rustls::pki_types::ServerName;

pub use balancer::Endpoints;
pub use endpoint::Endpoint;
pub use error::BackendError;
pub use tls::{BackendTls, TransportError};

use crate::metrics::Metrics;
use crate::tls::{ProxyClientCert, ALPN_H2, ALPN_HTTP11};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// PING after 3 s of silence, 2 s to answer: a dead connection is found within 5 s, where
/// kube-aggregator's Go transport (30 s + 15 s) takes 45.
pub const DEFAULT_HTTP2_PING_INTERVAL: Duration = Duration::from_secs(3);
pub const DEFAULT_HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_MAX_CONNECTIONS_PER_ENDPOINT: usize = 32;
pub const DEFAULT_MAX_PENDING_PER_ENDPOINT: usize = 256;
/// kube-apiserver's own bound on request headers; used when a backend advertises none.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: usize = 1 << 20;
/// The stream limit assumed of an HTTP/2 backend until (unless) it advertises one.
pub const DEFAULT_HTTP2_MAX_STREAMS: usize = 100;

/// Which protocol pooled backend connections speak (`--backend-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/2 when the backend offers it in ALPN (as kube-aggregator's transport does), else
    /// HTTP/1.1: many requests share a connection.
    #[default]
    H2,
    /// HTTP/1.1 only: one request per connection at a time, no HTTP/2 framing or flow
    /// control; more connections (up to `--backend-max-connections-per-endpoint`).
    Http1,
}

/// How backends are reached; every field but the certificate has a flag.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Presented to backends (`--proxy-client-cert-file` / `--proxy-client-key-file`).
    pub proxy_client_cert: ProxyClientCert,
    /// `--backend-connect-timeout`: TCP and TLS.
    pub connect_timeout: Duration,
    /// `--backend-idle-timeout`: an unused connection is closed after this.
    pub idle_timeout: Duration,
    /// `--backend-http2-ping-interval`, `--backend-http2-ping-timeout` (also TCP keep-alive
    /// and `TCP_USER_TIMEOUT` for HTTP/1.1).
    pub http2_ping_interval: Duration,
    pub http2_ping_timeout: Duration,
    /// `--backend-max-connections-per-endpoint`
    pub max_connections_per_endpoint: usize,
    /// `--backend-max-pending-requests`: requests waiting for a connection, per endpoint.
    pub max_pending_per_endpoint: usize,
    /// `--backend-max-header-list-size`, when the backend advertises none.
    pub max_header_list_size: usize,
    pub default_http2_max_streams: usize,
    /// `--backend-protocol`
    pub protocol: BackendProtocol,
}

impl Default for BackendSettings {
    fn default() -> Self {
        Self {
            proxy_client_cert: ProxyClientCert::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            http2_ping_interval: DEFAULT_HTTP2_PING_INTERVAL,
            http2_ping_timeout: DEFAULT_HTTP2_PING_TIMEOUT,
            max_connections_per_endpoint: DEFAULT_MAX_CONNECTIONS_PER_ENDPOINT,
            max_pending_per_endpoint: DEFAULT_MAX_PENDING_PER_ENDPOINT,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            default_http2_max_streams: DEFAULT_HTTP2_MAX_STREAMS,
            protocol: BackendProtocol::H2,
        }
    }
}

/// What one request asks of the backend layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SendOptions {
    /// The response headers must arrive by then (the request deadline, or discovery's 5 s);
    /// `None` for long-running requests.
    pub deadline: Option<tokio::time::Instant>,
    /// Watches and other streams: they may not take an endpoint's last connection slot, and
    /// are never retried.
    pub long_running: bool,
    /// Put a [`SendReport`] in the response's extensions (for the request's trace).
    pub report: bool,
}

/// Where and when the backend layer placed a request, for its trace.
#[derive(Debug, Clone)]
pub struct SendReport {
    pub endpoint: http::uri::Authority,
    /// When a connection with room was found (after any wait for one, and any connect).
    pub acquired: std::time::SystemTime,
}

/// What every endpoint of one backend identity shares.
pub(crate) struct Shared {
    /// ALPN `h2`, `http/1.1`.
    tls: Arc<rustls::ClientConfig>,
    /// ALPN `http/1.1` only, for protocol switches.
    tls_http1: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    server_name_text: Arc<str>,
    settings: Arc<BackendSettings>,
    metrics: Arc<Metrics>,
}

/// One backend TLS identity (server name, caBundle, insecureSkipTLSVerify) and its endpoints.
pub struct Backend {
    shared: Arc<Shared>,
    endpoints: DashMap<Authority, Arc<Endpoint>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("server_name", &self.shared.server_name_text).finish_non_exhaustive()
    }
}

impl Backend {
    pub fn new(
        tls: &BackendTls,
        settings: Arc<BackendSettings>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TransportError> {
        let mut config = tls::client_tls_config(tls, &settings.proxy_client_cert, metrics.x509_missing_san())?;
        let mut http1 = config.clone();
        config.alpn_protocols = match settings.protocol {
            BackendProtocol::H2 => vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()],
            BackendProtocol::Http1 => vec![ALPN_HTTP11.to_vec()],
        };
        http1.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        let server_name = ServerName::try_from(tls.server_name.clone())
            .map_err(|e| TransportError { field: "spec.service", reason: format!("invalid server name: {e}") })?;
        Ok(Self {
            shared: Arc::new(Shared {
                tls: Arc::new(config),
                tls_http1: Arc::new(http1),
                server_name,
                server_name_text: tls.server_name.as_str().into(),
                settings,
                metrics,
            }),
            endpoints: DashMap::new(),
        })
    }

    pub fn server_name(&self) -> &str {
        &self.shared.server_name_text
    }

    /// The endpoint at `authority`, made on first use and kept across tables.
    pub fn endpoint(&self, authority: &Authority) -> Arc<Endpoint> {
        if let Some(e) = self.endpoints.get(authority) {
            return e.clone();
        }
        self.endpoints
            .entry(authority.clone())
            .or_insert_with(|| Arc::new(Endpoint::new(authority.clone(), self.shared.clone())))
            .clone()
    }

    /// The endpoints at `targets`, for a route; `None` when there are none.
    pub fn endpoints(&self, targets: &[Authority]) -> Option<Endpoints> {
        Endpoints::new(targets.iter().map(|t| self.endpoint(t)).collect())
    }
}

/// Backends by TLS identity, shared across routing-table generations.
pub struct Backends {
    settings: Arc<BackendSettings>,
    metrics: Arc<Metrics>,
    backends: DashMap<BackendTls, Result<Arc<Backend>, TransportError>>,
}

impl Default for Backends {
    fn default() -> Self {
        Self::new(BackendSettings::default(), Arc::new(Metrics::new()))
    }
}

impl Backends {
    pub fn new(settings: BackendSettings, metrics: Arc<Metrics>) -> Self {
        Self { settings: Arc::new(settings), metrics, backends: DashMap::new() }
    }

    pub fn settings(&self) -> &BackendSettings {
        &self.settings
    }

    /// The backend for `tls`, made on first use.
    pub fn get(&self, tls: &BackendTls) -> Result<Arc<Backend>, TransportError> {
        if let Some(backend) = self.backends.get(tls) {
            return backend.clone();
        }
        self.backends
            .entry(tls.clone())
            .or_insert_with(|| Backend::new(tls, self.settings.clone(), self.metrics.clone()).map(Arc::new))
            .clone()
    }

    /// Keeps only the backends and endpoints some route still uses; the others' connections
    /// close as their last requests end, and their metric series go.
    pub fn retain(&self, in_use: &HashMap<BackendTls, HashSet<Authority>>) {
        self.backends.retain(|tls, backend| {
            let Some(addresses) = in_use.get(tls) else {
                if let Ok(b) = backend {
                    b.endpoints.iter().for_each(|e| self.metrics.forget_endpoint(e.label()));
                }
                return false;
            };
            if let Ok(backend) = backend {
                backend.endpoints.retain(|authority, endpoint| {
                    let keep = addresses.contains(authority);
                    if !keep {
                        self.metrics.forget_endpoint(endpoint.label());
                    }
                    keep
                });
            }
            true
        });
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}

/// Sends again, at most, a request the backend never took (see [`send`]).
const MAX_UNPROCESSED_RESENDS: usize = 2;

/// Sends `request` to one of `endpoints`. An idempotent request (GET, HEAD, OPTIONS; not
/// long-running; no body) that fails at the connection level before any answer is sent once
/// more, to another endpoint when there is one, on a fresh connection. While the backend
/// declines it unprocessed (GOAWAY past its stream, REFUSED_STREAM: a backend going away),
/// up to [`MAX_UNPROCESSED_RESENDS`] more; nothing else is ever retried.
pub async fn send(
    endpoints: &Endpoints,
    request: Request<Body>,
    opts: &SendOptions,
) -> Result<Response<Body>, BackendError> {
    let again = retry_copy(&request, opts);
    let first = endpoints.pick();
    match first.send(request, opts).await {
        Err(e) if e.retry_safe() => match again {
            // Boxed, so the common path's future does not carry the retries inline.
            Some(request) => Box::pin(retry(endpoints, first, request, opts, e)).await,
            None => Err(e),
        },
        other => other,
    }
}

async fn retry(
    endpoints: &Endpoints,
    mut previous: &Arc<Endpoint>,
    mut request: Request<Body>,
    opts: &SendOptions,
    mut error: BackendError,
) -> Result<Response<Body>, BackendError> {
    for resend in 0..=MAX_UNPROCESSED_RESENDS {
        if resend > 0 && !error.unprocessed() {
            break;
        }
        let next = retry_copy(&request, opts);
        previous.metrics().backend_retried();
        tracing::debug!(endpoint = %previous.authority(), error = %error, "sending an idempotent request again");
        let endpoint = endpoints.pick_other(previous);
        match endpoint.send_on(request, opts, true).await {
            Err(e) => {
                let Some(copy) = next else { return Err(e) };
                (previous, request, error) = (endpoint, copy, e);
            }
            ok => return ok,
        }
    }
    Err(error)
}

/// A second copy of a request that may be retried, made before the first is sent.
fn retry_copy(request: &Request<Body>, opts: &SendOptions) -> Option<Request<Body>> {
    use http_body::Body as _;
    let idempotent = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !idempotent || opts.long_running || !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(Body::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    // A clone shares each value's bytes (a reference count each) and copies the map's
    // tables as they are. Building a new map instead would hash every name and validate
    // every value again: 4.6% of the proxy's CPU on HTTP/2 at c=64 (benches/RESULTS.md).
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

//! The HTTPS front end: the accept loop with its connection limits, each connection's life
//! (TLS, protocol, idle deadlines; [`connection`]), the request pipeline ([`pipeline`]), and
//! graceful shutdown.
//!
//! Each connection's peer certificates and address are read once after the handshake and
//! handed to every request on it, so authentication never touches the TLS state again.
//!
//! What is served behind it is a [`RequestHandler`]: the proxy's [`Gateway`], or the
//! testbed's sample extension server, which thereby has the same TLS, limits, timeouts and
//! graceful shutdown rather than a copy of them.

pub mod apiregistration;
pub mod connection;
pub mod credentials;
pub mod endpoints;
pub mod flow;
pub mod limits;
pub mod listener;
pub mod pipeline;
pub mod request_info;
pub mod signal;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use connection::{ActivityGuard, ConnectionContext, GuardedBody, ServerState};
use listener::{AcceptBackoff, ConnectionLimits, LogThrottle};
pub use pipeline::Gateway;

/// How long in-flight requests get to finish after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Go's `ReadHeaderTimeout` as kube-apiserver sets it.
pub const DEFAULT_REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(32);
/// Go's `IdleTimeout` as kube-apiserver sets it, for HTTP/1.1 and HTTP/2 alike.
pub const DEFAULT_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(90);
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 1_000;
/// kube-apiserver advertises 100 when `--http2-max-streams-per-connection` is 0, its default.
pub const DEFAULT_HTTP2_MAX_STREAMS_PER_CONNECTION: u32 = 100;
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The front end's bounds on connections, each named after its flag.
#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// `--tls-handshake-timeout`
    pub tls_handshake_timeout: Duration,
    /// `--request-header-timeout`: a new connection's first request, and an HTTP/1.1
    /// request's headers, must arrive within this.
    pub request_header_timeout: Duration,
    /// `--idle-connection-timeout`: a connection with no request in flight is closed after this.
    pub idle_connection_timeout: Duration,
    /// `--max-connections` (lowered to fit under the open-file limit).
    pub max_connections: usize,
    /// `--max-connections-per-client`; 0 for none.
    pub max_connections_per_client: usize,
    /// `--http2-max-streams-per-connection`
    pub http2_max_streams_per_connection: u32,
    /// PINGs to HTTP/2 clients that have sent nothing for this long, and how long to wait for
    /// the answer before the connection is closed.
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// `--shutdown-delay-duration`: after SIGTERM, `/readyz` fails at once but requests are
    /// served this long, so endpoints controllers and load balancers take the replica out.
    pub shutdown_delay: Duration,
    /// `--shutdown-send-retry-after`: while draining, a request that still arrives gets 429
    /// with `Retry-After` (and `Connection: close` on HTTP/1.1) instead of being served.
    pub shutdown_send_retry_after: bool,
    /// `--shutdown-watch-termination-grace-period`: open watches are ended cleanly at random
    /// times within this, so their clients relist gradually rather than all at once.
    pub shutdown_watch_termination_grace_period: Duration,
    /// `--runtime`: where connections are served.
    pub runtime: crate::runtime::RuntimeModel,
}

/// Where the server is in kube-apiserver's graceful termination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Serving,
    /// SIGTERM arrived: `/readyz` fails, requests are still served (the shutdown delay).
    ShuttingDown,
    /// No new connections; open ones finish what is in flight and close.
    Draining,
}

impl signal::SignalValue for Lifecycle {
    fn to_byte(self) -> u8 {
        self as u8
    }

    fn from_byte(byte: u8) -> Self {
        match byte {
            0 => Self::Serving,
            1 => Self::ShuttingDown,
            _ => Self::Draining,
        }
    }
}

impl Default for FrontendSettings {
    fn default() -> Self {
        Self {
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            request_header_timeout: DEFAULT_REQUEST_HEADER_TIMEOUT,
            idle_connection_timeout: DEFAULT_IDLE_CONNECTION_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            http2_max_streams_per_connection: DEFAULT_HTTP2_MAX_STREAMS_PER_CONNECTION,
            http2_keepalive_interval: DEFAULT_HTTP2_KEEPALIVE_INTERVAL,
            http2_keepalive_timeout: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT,
            shutdown_delay: Duration::ZERO,
            shutdown_send_retry_after: false,
            shutdown_watch_termination_grace_period: Duration::ZERO,
            runtime: crate::runtime::RuntimeModel::default(),
        }
    }
}

/// What the TLS layer learnt about a connection.
#[derive(Debug)]
pub struct ConnectionInfo {
    pub remote_addr: SocketAddr,
    /// The client's address as `X-Forwarded-For` names it, made once per connection.
    pub client_ip: http::HeaderValue,
    /// The client's certificate chain, verified and parsed at most once per connection.
    pub peer: crate::auth::x509::PeerChain,
}

/// What the front end serves.
pub trait RequestHandler: Send + Sync + 'static {
    /// The TLS configuration for the next connection; credentials reloaded from their files
    /// take effect there.
    fn tls_config(&self) -> Arc<rustls::ServerConfig>;
    /// Where connections are counted.
    fn metrics(&self) -> &Arc<Metrics>;
    /// Answers one request of the connection `conn`. `activity` must live until the response
    /// body is done: the connection is idle (and may be closed) once it is dropped.
    fn handle(
        &self,
        conn: &ConnectionInfo,
        activity: ActivityGuard,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<GuardedBody>> + Send;
}

impl RequestHandler for Gateway {
    fn tls_config(&self) -> Arc<rustls::ServerConfig> {
        self.front.load().tls.clone()
    }

    fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn handle(
        &self,
        conn: &ConnectionInfo,
        activity: ActivityGuard,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<GuardedBody>> + Send {
        Gateway::handle(self, conn, activity, request)
    }
}

/// What the front end listens on.
pub enum Listeners {
    /// One listener; connections run on the current (work-stealing) runtime.
    Shared(TcpListener),
    /// One `SO_REUSEPORT` listener per core, each served by a runtime of its own
    /// ([`crate::runtime`]).
    PerCore(Vec<std::net::TcpListener>),
}

/// What every accept loop shares: the connection budget is one for the whole server.
struct Acceptor<H> {
    ctx: Arc<ConnectionContext<H>>,
    limits: ConnectionLimits,
    state: watch::Receiver<ServerState>,
    refused_log: LogThrottle,
    accept_log: LogThrottle,
}

/// Serves `handler` on `listeners` until `shutdown` completes, then drains connections.
pub async fn serve<H: RequestHandler>(
    listeners: Listeners,
    handler: Arc<H>,
    settings: FrontendSettings,
    lifecycle: signal::Signal<Lifecycle>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = ConnectionLimits::new(
        settings.max_connections,
        settings.max_connections_per_client,
        listener::open_file_limit(),
    );
    let metrics = handler.metrics().clone();
    metrics.set_max_connections(limits.max_connections());
    let delay = settings.shutdown_delay;
    let watch_grace = settings.shutdown_watch_termination_grace_period;
    let ctx = Arc::new(ConnectionContext::new(handler, settings));
    let (state_tx, state) = watch::channel(ServerState::Serving);
    let acceptor = Arc::new(Acceptor {
        ctx,
        limits,
        state,
        refused_log: LogThrottle::per_second(),
        accept_log: LogThrottle::per_second(),
    });
    // `stop` ends the accept loops; `exit` the per-core runtimes, once their connections
    // are drained or closed.
    let (stop_tx, stop) = watch::channel(false);
    let (exit_tx, exit) = watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    let mut cores = Vec::new();
    match listeners {
        Listeners::Shared(listener) => {
            loops.spawn(accept_loop(listener, acceptor.clone(), stop.clone()));
        }
        Listeners::PerCore(listeners) => {
            for (index, listener) in listeners.into_iter().enumerate() {
                let (acceptor, stop, mut exit) = (acceptor.clone(), stop.clone(), exit.clone());
                let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
                let spawned = crate::runtime::spawn_core(index, move || async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => accept_loop(listener, acceptor, stop).await,
                        Err(error) => tracing::error!(%error, core = index, "registering a per-core listener"),
                    }
                    let _ = ended_tx.send(());
                    // Keep driving this runtime's connections until the server lets go.
                    let _ = exit.wait_for(|e| *e).await;
                });
                match spawned {
                    Ok(thread) => {
                        loops.spawn(async move {
                            let _ = ended.await;
                        });
                        cores.push(thread);
                    }
                    Err(error) => tracing::error!(%error, core = index, "starting a per-core thread"),
                }
            }
        }
    }
    shutdown.await;
    lifecycle.set(Lifecycle::ShuttingDown);
    tracing::info!(delay = ?delay, "shutting down: /readyz fails now, requests are served until the delay ends");
    tokio::time::sleep(delay).await;
    stop_tx.send_replace(true);
    while loops.join_next().await.is_some() {}
    lifecycle.set(Lifecycle::Draining);
    state_tx.send_replace(ServerState::Draining);
    // Watches end within their grace period; everything else within SHUTDOWN_GRACE.
    let limits = &acceptor.limits;
    if !limits.drained(SHUTDOWN_GRACE.max(watch_grace + Duration::from_secs(2))).await {
        tracing::warn!(open = limits.open(), "connections still open after the shutdown grace period; closing them");
        state_tx.send_replace(ServerState::Closed);
        let _ = limits.drained(Duration::from_secs(1)).await;
    }
    exit_tx.send_replace(true);
    for thread in cores {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Accepts connections on `listener` and serves each in a task of the current runtime, until
/// `stop` turns true.
async fn accept_loop<H: RequestHandler>(
    listener: TcpListener,
    acceptor: Arc<Acceptor<H>>,
    mut stop: watch::Receiver<bool>,
) {
    let Acceptor { ctx, limits, state, refused_log, accept_log } = &*acceptor;
    let metrics = ctx.metrics.clone();
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, remote_addr)) => {
                backoff.reset();
                match limits.admit(remote_addr.ip()) {
                    Ok(permit) => {
                        tokio::spawn(connection::serve(stream, remote_addr, permit, ctx.clone(), state.clone()));
                    }
                    Err(refusal) => {
                        // Closed before a byte is read: the cheapest answer to a flood.
                        drop(stream);
                        metrics.connection_refused(refusal.label());
                        if let Some(held_back) = refused_log.check() {
                            tracing::warn!(%remote_addr, limit = refusal.label(), open = limits.open(), held_back, "connection refused");
                        }
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off (the connections already
                // open keep being served in their own tasks) and say so once a second.
                metrics.accept_failed();
                let retry_in = backoff.next_delay();
                if let Some(held_back) = accept_log.check() {
                    tracing::warn!(error = %e, open = limits.open(), retry_in = ?retry_in, held_back, "accept failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(retry_in) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

//! The HTTPS front end: the accept loop with its connection limits, each connection's life
//! (TLS, protocol, idle deadlines; [`connection`]), the request pipeline ([`pipeline`]), and
//! graceful shutdown.
//!
//! Each connection's peer certificates and address are read once after the handshake and
//! handed to every request on it, so authentication never touches the TLS state again.

pub mod apiregistration;
pub mod connection;
pub mod credentials;
pub mod endpoints;
pub mod flow;
pub mod limits;
pub mod listener;
pub mod pipeline;
pub mod request_info;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use connection::{ConnectionContext, ServerState};
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
        }
    }
}

/// What the TLS layer learnt about a connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote_addr: SocketAddr,
    pub peer_certificates: Arc<[CertificateDer<'static>]>,
}

/// Serves `gateway` on `listener` until `shutdown` completes, then drains connections.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    settings: FrontendSettings,
    shutdown: impl Future<Output = ()>,
) {
    let limits = ConnectionLimits::new(
        settings.max_connections,
        settings.max_connections_per_client,
        listener::open_file_limit(),
    );
    let metrics = gateway.metrics.clone();
    metrics.set_max_connections(limits.max_connections());
    let ctx = Arc::new(ConnectionContext::new(gateway, settings));
    let (state_tx, state) = watch::channel(ServerState::Serving);
    let refused_log = LogThrottle::per_second();
    let accept_log = LogThrottle::per_second();
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
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
                let delay = backoff.next_delay();
                if let Some(held_back) = accept_log.check() {
                    tracing::warn!(error = %e, open = limits.open(), retry_in = ?delay, held_back, "accept failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => break,
                }
            }
        }
    }
    drop(listener);
    state_tx.send_replace(ServerState::Draining);
    if !limits.drained(SHUTDOWN_GRACE).await {
        tracing::warn!(open = limits.open(), "connections still open after the shutdown grace period; closing them");
        state_tx.send_replace(ServerState::Closed);
        let _ = limits.drained(Duration::from_secs(1)).await;
    }
}

//! One client connection, from the TLS handshake to its close.
//!
//! Nothing a client does before it has a request in flight may hold a connection for long:
//! - the TLS handshake has `--tls-handshake-timeout`;
//! - the protocol is the one ALPN chose (`h2`, else HTTP/1.1), so the proxy never waits to
//!   sniff a preface a silent client will not send;
//! - a connection with no request in flight is closed once it has been idle for
//!   `--request-header-timeout` before its first request (silent clients, HTTP/2 prefaces
//!   with no stream, headers trickled a byte at a time: none of them is a request yet) and
//!   `--idle-connection-timeout` after one;
//! - HTTP/2 PINGs find clients that vanished without a FIN.
//!
//! A request is "in flight" from its headers until its response body is done, so a watch
//! keeps its connection however quiet it is. Closing is graceful first (HTTP/2 GOAWAY, an
//! HTTP/1.1 close after the current exchange) and forced after a short grace. On server
//! shutdown every connection is asked to drain, then closed when the grace period ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::listener::ConnectionPermit;
use super::{ConnectionInfo, FrontendSettings, RequestHandler};
use crate::metrics::Metrics;
use crate::tls::ALPN_H2;

/// How long a connection closed for idleness gets to say goodbye before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the server asks of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Serving,
    /// Finish what is in flight, take nothing new.
    Draining,
    /// Close now.
    Closed,
}

/// What every connection shares.
pub struct ConnectionContext<H> {
    pub handler: Arc<H>,
    pub settings: FrontendSettings,
    pub metrics: Arc<Metrics>,
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl<H: RequestHandler> ConnectionContext<H> {
    pub fn new(handler: Arc<H>, settings: FrontendSettings) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(settings.request_header_timeout).keep_alive(true);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(settings.http2_max_streams_per_connection)
            .keep_alive_interval(settings.http2_keepalive_interval)
            .keep_alive_timeout(settings.http2_keepalive_timeout);
        let metrics = handler.metrics().clone();
        Self { handler, settings, metrics, http1, http2 }
    }
}

/// Requests in flight on one connection and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicU32,
    served: AtomicBool,
    /// Milliseconds after `epoch` at which the last request in flight ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Relaxed);
        ActivityGuard(Some(self.clone()))
    }

    /// When the connection becomes closable for idleness, if nothing starts before then;
    /// `None` while a request is in flight.
    fn idle_deadline(&self, settings: &FrontendSettings) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        let allowed = if self.served.load(Ordering::Relaxed) {
            settings.idle_connection_timeout
        } else {
            settings.request_header_timeout
        };
        Some(since + allowed)
    }
}

/// A request in flight; the connection counts as idle again when the last one is dropped.
#[derive(Debug)]
pub struct ActivityGuard(Option<Arc<Activity>>);

impl ActivityGuard {
    /// A guard that tracks nothing, for requests handled outside a connection (tests).
    pub fn detached() -> Self {
        Self(None)
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if let Some(activity) = self.0.take() {
            let ms = u64::try_from(activity.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            activity.idle_since_ms.store(ms, Ordering::Release);
            activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Serves one accepted TCP connection until it closes, is idle too long, or the server
/// closes it. `permit` is held until then.
pub async fn serve<H: RequestHandler>(
    stream: TcpStream,
    remote_addr: std::net::SocketAddr,
    permit: ConnectionPermit,
    ctx: Arc<ConnectionContext<H>>,
    mut state: watch::Receiver<ServerState>,
) {
    let _permit = permit;
    let _open = ctx.metrics.open_connection();
    let _ = stream.set_nodelay(true);
    // The credentials in force now (they are reloaded when their files change).
    let acceptor = TlsAcceptor::from(ctx.handler.tls_config());
    let handshake = tokio::time::timeout(ctx.settings.tls_handshake_timeout, acceptor.accept(stream));
    let tls = tokio::select! {
        result = handshake => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                ctx.metrics.connection_closed("tls-handshake-failed");
                tracing::debug!(%remote_addr, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                ctx.metrics.connection_closed("tls-handshake-timeout");
                tracing::debug!(%remote_addr, "TLS handshake timed out");
                return;
            }
        },
        _ = state.wait_for(|s| *s != ServerState::Serving) => return,
    };
    let (_, session) = tls.get_ref();
    let h2 = session.alpn_protocol() == Some(ALPN_H2);
    let peer = crate::auth::x509::PeerChain::new(session.peer_certificates().map(|c| c.to_vec()).unwrap_or_default());
    // An IP address is always a valid header value.
    let client_ip = http::HeaderValue::try_from(remote_addr.ip().to_string())
        .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
    let info = Arc::new(ConnectionInfo { remote_addr, client_ip, peer });
    let activity = Activity::new();
    let service = {
        let (handler, activity) = (ctx.handler.clone(), activity.clone());
        service_fn(move |request| {
            let (handler, info, guard) = (handler.clone(), info.clone(), activity.begin());
            async move { Ok::<_, std::convert::Infallible>(handler.handle(&info, guard, request).await) }
        })
    };
    let io = TokioIo::new(tls);
    let ended = if h2 {
        drive(ctx.http2.serve_connection(io, service), &activity, &ctx, &mut state).await
    } else {
        drive(ctx.http1.serve_connection(io, service).with_upgrades(), &activity, &ctx, &mut state).await
    };
    if let Some(reason) = ended {
        ctx.metrics.connection_closed(reason);
        tracing::debug!(%remote_addr, reason, "connection closed by the proxy");
    }
}

/// The two hyper connection types, closable the same way.
trait GracefulConnection: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}

impl<I, S, B> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

/// Runs `conn` to its end, closing it for idleness or on the server's word. Returns why the
/// proxy closed it, when it did.
async fn drive<C: GracefulConnection, H>(
    conn: C,
    activity: &Activity,
    ctx: &ConnectionContext<H>,
    state: &mut watch::Receiver<ServerState>,
) -> Option<&'static str> {
    tokio::pin!(conn);
    // Set once a graceful close has begun: why, and when to stop waiting for it.
    let mut closing: Option<(&'static str, Option<Instant>)> = None;
    loop {
        let wake = match closing {
            Some((_, Some(hard_deadline))) => hard_deadline,
            Some((_, None)) => Instant::now() + ctx.settings.idle_connection_timeout,
            None => activity.idle_deadline(&ctx.settings).unwrap_or_else(|| {
                // Busy: look again later; the deadline moves when the last request ends.
                Instant::now() + ctx.settings.request_header_timeout.min(ctx.settings.idle_connection_timeout)
            }),
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return closing.map(|(reason, _)| reason);
            }
            () = tokio::time::sleep_until(wake.into()) => {
                match closing {
                    Some((reason, Some(_))) => return Some(reason),
                    Some((_, None)) => {}
                    None => {
                        if activity.idle_deadline(&ctx.settings).is_some_and(|d| d <= Instant::now()) {
                            let reason = if activity.served.load(Ordering::Relaxed) { "idle-timeout" } else { "request-header-timeout" };
                            conn.as_mut().graceful_shutdown();
                            closing = Some((reason, Some(Instant::now() + IDLE_CLOSE_GRACE)));
                        }
                    }
                }
            }
            changed = state.changed() => {
                let now = if changed.is_err() { ServerState::Closed } else { *state.borrow_and_update() };
                match now {
                    ServerState::Serving => {}
                    ServerState::Draining => {
                        if closing.is_none() {
                            conn.as_mut().graceful_shutdown();
                            closing = Some(("shutdown", None));
                        }
                    }
                    ServerState::Closed => return Some("shutdown"),
                }
            }
        }
    }
}

/// A response body that holds what must live as long as the response: the connection's
/// activity guard, an in-flight permit, and the request's deadline, past which the body
/// fails (the stream is reset) as kube-apiserver aborts a request that outlives its timeout.
pub struct GuardedBody {
    inner: Body,
    deadline: Option<tokio::time::Instant>,
    /// Armed only when the body first has to wait: a response that is ready at once (most
    /// are) costs no timer.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A long-running response ends cleanly when the server drains (see [`CloseOnDrain`]).
    close_on_drain: Option<CloseOnDrain>,
    _guards: BodyGuards,
}

/// What a response body holds until it has been sent: the connection's activity, the
/// in-flight places, and the audit record (whose `ResponseComplete` is written when it goes).
pub struct BodyGuards {
    pub activity: ActivityGuard,
    pub permits: [Option<tokio::sync::OwnedSemaphorePermit>; 2],
    pub audit: Option<Box<crate::audit::RequestAudit>>,
    /// The request's server span, which ends with the body.
    pub trace: Option<crate::telemetry::RequestTrace>,
}

/// When the server drains, a watch (or any long-running response) is ended cleanly, at a
/// random moment within `--shutdown-watch-termination-grace-period`, so its client sees an
/// orderly end of stream and relists, and a thousand clients do not relist at once.
pub struct CloseOnDrain {
    lifecycle: super::signal::Signal<super::Lifecycle>,
    grace: Duration,
    /// Made when the body first waits, so a response that never waits costs nothing.
    closing: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl CloseOnDrain {
    pub fn new(lifecycle: super::signal::Signal<super::Lifecycle>, grace: Duration) -> Self {
        Self { lifecycle, grace, closing: None }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let closing = self.closing.get_or_insert_with(|| {
            let (lifecycle, grace) = (self.lifecycle.clone(), self.grace);
            Box::pin(async move {
                lifecycle.wait_for(|l| l == super::Lifecycle::Draining).await;
                tokio::time::sleep(grace.mul_f64(rand::random::<f64>())).await;
            })
        });
        closing.as_mut().poll(cx)
    }
}

impl GuardedBody {
    pub fn new(
        inner: Body,
        guards: BodyGuards,
        deadline: Option<tokio::time::Instant>,
        close_on_drain: Option<CloseOnDrain>,
    ) -> Self {
        Self { inner, deadline, timer: None, close_on_drain, _guards: guards }
    }
}

/// The response outlived the request deadline while its body was being sent.
#[derive(Debug, thiserror::Error)]
#[error("request did not complete within the allotted timeout")]
pub struct BodyDeadlineExceeded;

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            // A body that never waits still stops at the deadline.
            if frame.is_some() && this.deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Poll::Ready(Some(Err(axum::Error::new(BodyDeadlineExceeded))));
            }
            return Poll::Ready(frame);
        }
        if let Some(close) = &mut this.close_on_drain {
            if close.poll(cx).is_ready() {
                // The end of the body: a clean end of stream, not a reset.
                this.close_on_drain = None;
                this.inner = Body::empty();
                return Poll::Ready(None);
            }
        }
        let Some(deadline) = this.deadline else { return Poll::Pending };
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyDeadlineExceeded)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

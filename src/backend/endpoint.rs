//! One endpoint (an address reached with one TLS identity) and its connections.
//!
//! Connections are counted by the requests they carry. An HTTP/2 connection has room while its
//! requests in flight are below the stream limit the backend advertised in its SETTINGS (100
//! when it says nothing); an HTTP/1.1 connection carries one at a time. A request takes the
//! least loaded connection with room, or opens another, up to
//! `--backend-max-connections-per-endpoint`; long-running requests may not take the last
//! connection slot, so watches can fill connections but never leave short requests without
//! one. Past the cap a request waits, at most `--backend-max-pending-requests` of them and
//! never past its deadline, and then fails fast.
//!
//! A connection that closes (GOAWAY, an error, a PING the backend did not answer within
//! `--backend-http2-ping-timeout`) leaves the pool at once; its streams in flight finish or
//! fail on their own, new requests go to another connection. TCP keep-alive and
//! `TCP_USER_TIMEOUT` bound how long a dead HTTP/1.1 connection can go unnoticed.
//!
//! With `--runtime per-core` each runtime has a pool of its own (the cap applies to each): a
//! request takes a connection whose task runs on its own thread, so no other thread is woken
//! to carry it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderMap, Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use super::balancer::{Health, Verdict};
use super::error::BackendError;
use super::settings_tap::{PeerSettings, SettingsTap};
use super::tls::describe_error;
use super::{SendOptions, Shared};
use crate::tls::ALPN_H2;

/// What a connection can carry, and whether it still can.
struct Connection {
    sender: Sender,
    in_flight: AtomicUsize,
    peer: Arc<PeerSettings>,
    closed: Arc<AtomicBool>,
    /// Milliseconds after the endpoint's epoch at which the last request ended.
    idle_since_ms: AtomicU64,
}

enum Sender {
    Http2(http2::SendRequest<Body>),
    Http1(tokio::sync::Mutex<http1::SendRequest<Body>>),
}

impl Connection {
    fn capacity(&self, default_streams: usize) -> usize {
        match self.sender {
            Sender::Http1(_) => 1,
            Sender::Http2(_) => self.peer.max_concurrent_streams().map_or(default_streams, |n| n as usize).max(1),
        }
    }

    fn is_usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && match &self.sender {
                Sender::Http2(s) => !s.is_closed(),
                Sender::Http1(_) => true,
            }
    }

    /// Sends `request` (its URI already names the endpoint) in the form the protocol wants:
    /// HTTP/2 with `:scheme` and `:authority`, HTTP/1.1 in origin form with `Host`.
    async fn send(&self, mut request: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        match &self.sender {
            Sender::Http2(s) => s.clone().send_request(request).await,
            Sender::Http1(s) => {
                if let Some(authority) = request.uri().authority().cloned() {
                    if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
                        request.headers_mut().insert(http::header::HOST, host);
                    }
                    let origin = request.uri().path_and_query().cloned();
                    if let Some(origin) = origin.and_then(|pq| http::Uri::try_from(pq.as_str()).ok()) {
                        *request.uri_mut() = origin;
                    }
                }
                let mut s = s.lock().await;
                s.ready().await?;
                let sent = s.send_request(request);
                drop(s);
                sent.await
            }
        }
    }
}

struct Pool {
    connections: Vec<Arc<Connection>>,
    connecting: usize,
    pending: usize,
}

/// The connections of one runtime ([`crate::runtime::slot`]).
struct RuntimePool {
    pool: Mutex<Pool>,
    /// Woken when a request ends or a connection closes: room may have appeared.
    room: Arc<Notify>,
}

impl RuntimePool {
    fn new() -> Self {
        Self {
            pool: Mutex::new(Pool { connections: Vec::new(), connecting: 0, pending: 0 }),
            room: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One address of a backend, its connections and its health.
pub struct Endpoint {
    authority: Authority,
    label: Arc<str>,
    shared: Arc<Shared>,
    health: Health,
    /// One pool per runtime slot.
    pools: Box<[RuntimePool]>,
    /// Learnt from the first connection: the backend does not speak HTTP/2.
    http1: AtomicBool,
    epoch: Instant,
    /// This endpoint's series, resolved once rather than looked up per request.
    in_flight_gauge: prometheus_client::metrics::gauge::Gauge,
    connections_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("authority", &self.authority).finish_non_exhaustive()
    }
}

/// A request's place on a connection, given back when its response body is done.
struct Lease {
    connection: Arc<Connection>,
    endpoint: Arc<Endpoint>,
    /// The pool the connection belongs to.
    pool: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.connection.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.connection.idle_since_ms.store(self.endpoint.now_ms(), Ordering::Relaxed);
        }
        self.endpoint.health.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.in_flight_gauge.dec();
        // Takes no lock unless a request is waiting; with none, it leaves a permit.
        self.endpoint.pools[self.pool].room.notify_one();
    }
}

/// The backend's response body, holding the request's lease until it is done.
struct LeasedBody {
    body: Incoming,
    _lease: Lease,
}

impl http_body::Body for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The size of a header list as HTTP/2 counts it (RFC 9113 section 6.5.2): every name and
/// value plus 32 bytes each, pseudo-headers included.
pub fn header_list_size<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let pseudo = request.method().as_str().len()
        + uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + "https".len()
        + 4 * 32;
    pseudo + headers_size(request.headers())
}

/// Whole seconds, or milliseconds under a second, for messages.
fn rounded(d: Duration) -> Duration {
    if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs_f64().round() as u64)
    } else {
        Duration::from_millis(d.as_millis() as u64)
    }
}

fn headers_size(headers: &HeaderMap) -> usize {
    headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 32).sum()
}

impl Endpoint {
    pub(super) fn new(authority: Authority, shared: Arc<Shared>) -> Self {
        let label: Arc<str> = authority.as_str().into();
        let (in_flight_gauge, connections_gauge) = shared.metrics.backend_endpoint_gauges(&label);
        Self {
            authority,
            label,
            shared,
            health: Health::default(),
            pools: (0..crate::runtime::slots()).map(|_| RuntimePool::new()).collect(),
            http1: AtomicBool::new(false),
            epoch: Instant::now(),
            in_flight_gauge,
            connections_gauge,
        }
    }

    /// The pool of the runtime this request runs on, and its index.
    fn local(&self) -> (usize, &RuntimePool) {
        let index = crate::runtime::slot() % self.pools.len();
        (index, &self.pools[index])
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn server_name(&self) -> &str {
        &self.shared.server_name_text
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub(super) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }

    pub(super) fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// Open connections now.
    pub fn connections(&self) -> usize {
        self.pools.iter().map(|p| p.lock().connections.iter().filter(|c| c.is_usable()).count()).sum()
    }

    /// `https://<this endpoint><path and query of uri>`.
    pub fn uri_for(&self, uri: &http::Uri) -> Result<http::Uri, http::Error> {
        let mut builder = http::Uri::builder().scheme(http::uri::Scheme::HTTPS).authority(self.authority.clone());
        if let Some(pq) = uri.path_and_query() {
            builder = builder.path_and_query(pq.clone());
        }
        builder.build()
    }

    /// Sends `request` on a connection with room, within `opts`' deadline. Only the path and
    /// query of its URI are read: it goes to this endpoint.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<Body>,
        opts: &SendOptions,
    ) -> Result<Response<Body>, BackendError> {
        self.send_on(request, opts, false).await
    }

    /// [`Endpoint::send`], on a new connection when `fresh` and the cap allows (a retry).
    pub(super) async fn send_on(
        self: &Arc<Self>,
        mut request: Request<Body>,
        opts: &SendOptions,
        fresh: bool,
    ) -> Result<Response<Body>, BackendError> {
        let settings = &self.shared.settings;
        *request.uri_mut() = self
            .uri_for(request.uri())
            .map_err(|e| BackendError::Transport { cause: e.to_string(), retry: super::error::Retry::Never })?;
        let size = header_list_size(&request);
        if size > settings.max_header_list_size {
            self.shared.metrics.backend_header_rejected();
            return Err(BackendError::HeadersTooLarge { size, limit: settings.max_header_list_size });
        }
        let lease = self.acquire(opts, fresh).await?;
        let acquired = opts.report.then(std::time::SystemTime::now);
        if let Some(limit) = lease.connection.peer.max_header_list_size().map(|l| l as usize) {
            if size > limit {
                self.shared.metrics.backend_header_rejected();
                return Err(BackendError::HeadersTooLarge { size, limit });
            }
        }
        let started = Instant::now();
        let sent = lease.connection.send(request);
        let result = match opts.deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, sent).await {
                Ok(result) => result,
                Err(_) => {
                    self.judge(self.health.failure());
                    return Err(BackendError::Timeout(rounded(started.elapsed())));
                }
            },
            None => sent.await,
        };
        match result {
            Ok(response) => {
                self.judge(self.health.observe(started.elapsed(), response.status().is_server_error()));
                let mut response = response.map(|body| Body::new(LeasedBody { body, _lease: lease }));
                if let Some(acquired) = acquired {
                    response.extensions_mut().insert(super::SendReport { endpoint: self.authority.clone(), acquired });
                }
                Ok(response)
            }
            Err(e) => {
                let (error, connection_done, declined) = BackendError::from_hyper(&e, self.server_name());
                if connection_done {
                    // No new request goes to it; those in flight finish or fail on their own.
                    lease.connection.closed.store(true, Ordering::Release);
                }
                if !declined {
                    self.judge(self.health.failure());
                }
                Err(error)
            }
        }
    }

    /// A protocol switch (WebSocket, SPDY) on a connection of its own, over HTTP/1.1, as
    /// kube-aggregator dials one for each; it is not pooled.
    pub async fn send_upgrade(&self, mut request: Request<Body>) -> Result<Response<Incoming>, BackendError> {
        if let Ok(host) = http::HeaderValue::from_str(self.authority.as_str()) {
            request.headers_mut().insert(http::header::HOST, host);
        }
        if let Some(origin) = request.uri().path_and_query().and_then(|pq| http::Uri::try_from(pq.as_str()).ok()) {
            *request.uri_mut() = origin;
        }
        let tls = self.dial(self.shared.tls_http1.clone()).await?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| BackendError::Connect(describe_error(&e, self.server_name())))?;
        tokio::spawn(connection.with_upgrades());
        sender.send_request(request).await.map_err(|e| BackendError::from_hyper(&e, self.server_name()).0)
    }

    fn judge(&self, verdict: Verdict) {
        if let Verdict::Ejected(backoff) = verdict {
            self.shared.metrics.backend_ejected(&self.label);
            tracing::warn!(endpoint = %self.authority, ?backoff, "endpoint ejected after consecutive failures");
        }
    }

    /// A place on a connection: the least loaded one with room, a new one, or a wait. With
    /// `fresh` (a retry after a connection failed) a new connection is preferred, since the
    /// others may be going the same way (a backend's GOAWAY reaches all of them).
    async fn acquire(self: &Arc<Self>, opts: &SendOptions, fresh: bool) -> Result<Lease, BackendError> {
        let settings = &self.shared.settings;
        let cap = settings.max_connections_per_endpoint.max(1);
        // Long-running requests leave the last connection slot to short ones.
        let limit = if opts.long_running && cap > 1 { cap - 1 } else { cap };
        let wait_until = opts.deadline.unwrap_or_else(|| tokio::time::Instant::now() + settings.connect_timeout);
        let queued_at = Instant::now();
        let (index, local) = self.local();
        let mut queued = false;
        let mut waited = false;
        loop {
            // Made before the look, so a place freed after it wakes this request: a
            // `notify_waiters` reaches every future made before it, a `notify_one` leaves a
            // permit. Not registered (no lock) until it is awaited.
            let room = local.room.notified();
            let connect = {
                let mut pool = local.lock();
                if queued {
                    pool.pending -= 1;
                    queued = false;
                }
                self.prune(&mut pool);
                let best = pool
                    .connections
                    .iter()
                    .filter(|c| {
                        c.is_usable()
                            && c.in_flight.load(Ordering::Acquire) < c.capacity(settings.default_http2_max_streams)
                    })
                    .min_by_key(|c| c.in_flight.load(Ordering::Acquire))
                    .cloned();
                let under_cap = pool.connections.len() + pool.connecting < limit;
                // One connection at a time, unless the backend speaks HTTP/1.1 (one request a
                // connection): a burst waits for the HTTP/2 connection being made rather than
                // opening one each.
                let may_connect = under_cap && (fresh || pool.connecting == 0 || self.http1.load(Ordering::Relaxed));
                match best {
                    Some(connection) if !(fresh && under_cap) => {
                        // Counted under the lock, so two requests cannot take one last place.
                        connection.in_flight.fetch_add(1, Ordering::AcqRel);
                        drop(pool);
                        return Ok(self.lease(connection, index, waited.then_some(queued_at)));
                    }
                    _ if may_connect => {
                        pool.connecting += 1;
                        true
                    }
                    Some(connection) => {
                        connection.in_flight.fetch_add(1, Ordering::AcqRel);
                        drop(pool);
                        return Ok(self.lease(connection, index, waited.then_some(queued_at)));
                    }
                    None if pool.pending >= settings.max_pending_per_endpoint => {
                        let pending = pool.pending;
                        drop(pool);
                        self.shared.metrics.backend_queue_rejected(&self.label);
                        return Err(BackendError::Overloaded { pending });
                    }
                    None => {
                        pool.pending += 1;
                        queued = true;
                        false
                    }
                }
            };
            if connect {
                // Boxed: dialling (TCP, TLS, the HTTP/2 handshake) is rare, and inline it would
                // make every request's future, which hyper moves into a task, that much larger.
                let made = Box::pin(self.connect(&local.room)).await;
                let mut pool = local.lock();
                pool.connecting -= 1;
                match made {
                    Ok(connection) => {
                        connection.in_flight.fetch_add(1, Ordering::AcqRel);
                        pool.connections.push(connection.clone());
                        drop(pool);
                        self.connections_gauge.inc();
                        // An HTTP/2 connection has room for those waiting too.
                        local.room.notify_waiters();
                        return Ok(self.lease(connection, index, waited.then_some(queued_at)));
                    }
                    Err(e) => {
                        drop(pool);
                        local.room.notify_waiters();
                        if e.is_endpoint_failure() {
                            self.judge(self.health.failure());
                        }
                        return Err(e);
                    }
                }
            }
            waited = true;
            if tokio::time::timeout_at(wait_until, room).await.is_err() {
                let mut pool = local.lock();
                pool.pending -= 1;
                return Err(BackendError::QueueTimeout(queued_at.elapsed()));
            }
        }
    }

    /// The lease of a place already counted on `connection`; `queued_at` when it waited.
    fn lease(self: &Arc<Self>, connection: Arc<Connection>, pool: usize, queued_at: Option<Instant>) -> Lease {
        self.health.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_gauge.inc();
        if let Some(queued_at) = queued_at {
            self.shared.metrics.backend_queue_waited(queued_at.elapsed());
        }
        Lease { connection, endpoint: self.clone(), pool }
    }

    /// Drops closed connections, and idle ones past `--backend-idle-timeout` (one is kept).
    fn prune(&self, pool: &mut Pool) {
        let idle_timeout = self.shared.settings.idle_timeout;
        let mut kept_idle = false;
        pool.connections.retain(|c| {
            if !c.is_usable() {
                return false;
            }
            if c.in_flight.load(Ordering::Acquire) > 0 {
                return true;
            }
            let idle_for = Duration::from_millis(self.now_ms().saturating_sub(c.idle_since_ms.load(Ordering::Relaxed)));
            if idle_for < idle_timeout || !kept_idle {
                kept_idle = true;
                return true;
            }
            false
        });
    }

    /// TCP with keep-alive and a user timeout, then TLS, within `--backend-connect-timeout`.
    async fn dial(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BackendError> {
        let settings = &self.shared.settings;
        let name = self.server_name();
        let dial = async {
            let tcp = TcpStream::connect(self.authority.as_str())
                .await
                .map_err(|e| BackendError::Connect(describe_error(&e, name)))?;
            let _ = tcp.set_nodelay(true);
            let socket = socket2::SockRef::from(&tcp);
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(settings.http2_ping_interval)
                .with_interval(Duration::from_secs(1))
                .with_retries(2);
            let _ = socket.set_tcp_keepalive(&keepalive);
            let _ = socket.set_tcp_user_timeout(Some(settings.http2_ping_interval + settings.http2_ping_timeout));
            TlsConnector::from(config)
                .connect(self.shared.server_name.clone(), tcp)
                .await
                .map_err(|e| BackendError::Tls(describe_error(&e, name)))
        };
        match tokio::time::timeout(settings.connect_timeout, dial).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Connect(format!(
                "connection timed out after {}",
                humantime::format_duration(settings.connect_timeout)
            ))),
        }
    }

    async fn connect(&self, room: &Arc<Notify>) -> Result<Arc<Connection>, BackendError> {
        let settings = &self.shared.settings;
        let tls = self.dial(self.shared.tls.clone()).await?;
        let closed = Arc::new(AtomicBool::new(false));
        let connect_error = |e: hyper::Error| BackendError::Connect(describe_error(&e, self.server_name()));
        let (sender, peer) = if tls.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
            let tap = SettingsTap::new(tls);
            let peer = tap.settings();
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(settings.http2_ping_interval)
                .keep_alive_timeout(settings.http2_ping_timeout)
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(tap))
                .await
                .map_err(connect_error)?;
            self.watch(connection, closed.clone(), room.clone());
            // The backend's SETTINGS come after the handshake: the first request waits for
            // them, so its headers are checked against the backend's limit like any other's.
            if tokio::time::timeout(settings.connect_timeout, peer.preface_read()).await.is_err() {
                return Err(BackendError::Connect(format!(
                    "no HTTP/2 SETTINGS from the backend within {}",
                    humantime::format_duration(settings.connect_timeout)
                )));
            }
            if closed.load(Ordering::Acquire) {
                return Err(BackendError::Connect(
                    "the backend closed the connection before its HTTP/2 SETTINGS".into(),
                ));
            }
            (Sender::Http2(sender), peer)
        } else {
            self.http1.store(true, Ordering::Relaxed);
            let (sender, connection) = http1::handshake(TokioIo::new(tls)).await.map_err(connect_error)?;
            self.watch(connection, closed.clone(), room.clone());
            (Sender::Http1(tokio::sync::Mutex::new(sender)), Arc::default())
        };
        Ok(Arc::new(Connection {
            sender,
            in_flight: AtomicUsize::new(0),
            peer,
            closed,
            idle_since_ms: AtomicU64::new(self.now_ms()),
        }))
    }

    /// Drives a connection; when it ends, marks it closed, says why, and wakes waiters.
    fn watch<C>(&self, connection: C, closed: Arc<AtomicBool>, room: Arc<Notify>)
    where
        C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let (metrics, label, authority, gauge) =
            (self.shared.metrics.clone(), self.label.clone(), self.authority.clone(), self.connections_gauge.clone());
        tokio::spawn(async move {
            let result = connection.await;
            closed.store(true, Ordering::Release);
            let reason = match &result {
                Ok(()) => "closed",
                Err(e) if e.is_timeout() => "ping-timeout",
                Err(_) => "error",
            };
            if let Err(e) = &result {
                tracing::debug!(endpoint = %authority, error = %e, reason, "backend connection ended");
            }
            gauge.dec();
            metrics.backend_connection_closed(&label, reason);
            room.notify_waiters();
        });
    }
}

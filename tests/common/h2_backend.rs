//! An extension-server stand-in whose HTTP/2 behaviour a test controls: its stream limit,
//! answering 500, and sending GOAWAY on every open connection. Self-signed: APIServices
//! pointing at it use `insecureSkipTLSVerify`.
//!
//! Paths: `...?watch=true` and `.../stream` stream a line every 100 ms until the client goes
//! (for 10 minutes at most, longer than any test that holds a thousand of them open);
//! `/hang` never answers (for 120 s at most); anything else answers 200 at once with the
//! backend's name.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use kube_aggregation_proxy::{pki, tls};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A running backend. Dropping it stops it.
pub struct H2Backend {
    pub addr: SocketAddr,
    pub name: &'static str,
    pub fail: Arc<AtomicBool>,
    /// The answer to `GET /apis`, when set (an APIGroupList).
    pub apis: Arc<std::sync::Mutex<Option<String>>>,
    /// Every request's path, in arrival order.
    pub paths: Arc<std::sync::Mutex<Vec<String>>>,
    /// Requests answered, and connections accepted.
    pub requests: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    goaway: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(status: StatusCode, body: String) -> Response<BoxBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
}

async fn answer(name: &'static str, fail: bool, apis: Option<String>, request: Request<Incoming>) -> Response<BoxBody> {
    if let (Some(list), "/apis") = (apis, request.uri().path()) {
        return full(StatusCode::OK, list);
    }
    if fail {
        return full(StatusCode::INTERNAL_SERVER_ERROR, format!("{{\"backend\":\"{name}\",\"failing\":true}}"));
    }
    let query = request.uri().query().unwrap_or_default();
    if request.uri().path().ends_with("/hang") {
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    if query.contains("watch=true") || request.uri().path().ends_with("/stream") {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        tokio::spawn(async move {
            for i in 0..6000 {
                let line = format!("{{\"type\":\"ADDED\",\"n\":{i}}}\n");
                if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let stream = super::raw::tokio_stream_shim::Receiver(rx);
        return Response::new(BodyExt::boxed(StreamBody::new(stream)));
    }
    full(StatusCode::OK, format!("{{\"backend\":\"{name}\"}}"))
}

impl H2Backend {
    /// Serves HTTP/2 (and HTTP/1.1) with at most `max_streams` concurrent streams per connection.
    pub async fn start(name: &'static str, max_streams: u32) -> Self {
        let serving = pki::self_signed_localhost().unwrap().certified_key().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(&serving, None).unwrap()));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let apis = Arc::new(std::sync::Mutex::new(None));
        let paths = Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (goaway, goaway_rx) = watch::channel(0u64);
        let (f, r, c, a, p) = (fail.clone(), requests.clone(), connections.clone(), apis.clone(), paths.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (acceptor, f, r, a, p, mut goaway) =
                    (acceptor.clone(), f.clone(), r.clone(), a.clone(), p.clone(), goaway_rx.clone());
                goaway.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service = hyper::service::service_fn(move |request| {
                        let (f, r) = (f.clone(), r.clone());
                        let apis = a.lock().unwrap().clone();
                        p.lock().unwrap().push(request.uri().path().to_owned());
                        async move {
                            r.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(
                                answer(name, f.load(Ordering::SeqCst), apis, request).await,
                            )
                        }
                    });
                    if h2 {
                        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                        builder.timer(TokioTimer::new()).max_concurrent_streams(max_streams);
                        let conn = builder.serve_connection(TokioIo::new(tls), service);
                        tokio::pin!(conn);
                        tokio::select! {
                            _ = conn.as_mut() => return,
                            _ = goaway.changed() => conn.as_mut().graceful_shutdown(),
                        }
                        let _ = conn.await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    }
                });
            }
        });
        Self { addr, name, fail, apis, paths, requests, connections, goaway, task }
    }

    /// Sends GOAWAY on every connection open now (new ones are still accepted).
    pub fn goaway(&self) {
        self.goaway.send_modify(|n| *n += 1);
    }
}

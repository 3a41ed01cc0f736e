//! A tiny extension API server on loopback that answers every request only after a delay: the
//! backend that must not slow discovery down for anyone else.
//!
//! It serves the aggregated discovery document of one group (`slow.example.com/v1`, resource
//! `widgets`) at `/apis` and 404 elsewhere, over TLS with a certificate from the test CA, and
//! counts requests started and finished so a test can tell a fetch is still pending.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kube_aggregation_proxy::pki::PemPair;
use kube_aggregation_proxy::tls;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub const SLOW_GROUP: &str = "slow.example.com";
pub const SLOW_VERSION: &str = "v1";

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// A running slow backend. Dropping it stops it.
pub struct SlowBackend {
    pub addr: SocketAddr,
    pub delay: Duration,
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowBackend {
    /// Serves with `serving` (its certificate must name the service the APIService points
    /// at), answering each request `delay` after it arrives.
    pub async fn start(serving: &PemPair, delay: Duration) -> Self {
        let key = serving.certified_key().expect("slow backend certificate");
        let config = tls::server_config(&key, None).expect("slow backend TLS");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await.expect("slow backend binds");
        let addr = listener.local_addr().expect("slow backend address");
        let started = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let (s, f) = (started.clone(), finished.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, s, f) = (acceptor.clone(), s.clone(), f.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let (s, f) = (s.clone(), f.clone());
                        async move {
                            s.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            let response = answer(&request);
                            f.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        Self { addr, delay, started, finished, task }
    }

    /// Requests that arrived.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Requests answered.
    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

impl Drop for SlowBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer<B>(request: &http::Request<B>) -> Response<Full<Bytes>> {
    let accept = request.headers().get(http::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if request.uri().path() == "/apis" && accept.contains("as=APIGroupDiscoveryList") {
        let document = serde_json::json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {},
            "items": [{"metadata": {"name": SLOW_GROUP}, "versions": [{"version": SLOW_VERSION, "resources": [
                {"resource": "widgets", "scope": "Namespaced", "singularResource": "widget", "verbs": ["get", "list"],
                 "responseKind": {"group": SLOW_GROUP, "version": SLOW_VERSION, "kind": "Widget"}}
            ]}]}],
        });
        let mut response = Response::new(Full::new(Bytes::from(document.to_string())));
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(AGGREGATED));
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from_static(b"{\"kind\":\"Status\",\"code\":404}")));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

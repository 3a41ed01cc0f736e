//! A small real HTTPS server on loopback whose answers a test decides: for backend behaviour
//! the sample server does not have (redirects, odd headers). Self-signed, so APIServices that
//! point at it use `insecureSkipTLSVerify`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kube_aggregation_proxy::{pki, tls};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// A running backend; dropping it stops accepting.
pub struct TestBackend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestBackend {
    pub async fn start(handler: Handler) -> Self {
        Self::start_serving(&pki::self_signed_localhost().unwrap(), handler).await
    }

    /// Serves with this certificate and key (a test's own, from its PKI).
    pub async fn start_serving(serving: &pki::PemPair, handler: Handler) -> Self {
        let serving = serving.certified_key().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(&serving, None).unwrap()));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (acceptor, handler) = (acceptor.clone(), handler.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let service = hyper::service::service_fn(move |request| {
                        let response = handler(&request);
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        Self { addr, task }
    }
}

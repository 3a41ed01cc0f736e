//! Raw connections for tests that must misbehave on purpose: a TLS client that stops after the
//! handshake, bytes written one at a time, an HTTP/2 request whose body drips, and a way to
//! measure when the server closed the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube_aggregation_proxy::pki::PemPair;
use kube_aggregation_proxy::tls;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub fn tls_config(ca_pem: &str, alpn: &[&[u8]], client_cert: Option<&PemPair>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in tls::parse_certs(ca_pem.as_bytes(), "test CA").expect("test CA PEM") {
        roots.add(cert).expect("test CA certificate");
    }
    let builder = ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(pair) => {
            let key = pair.certified_key().expect("client certificate");
            builder.with_client_auth_cert(key.chain.clone(), key.key.clone_key()).expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr`, handshake done, nothing sent.
pub async fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config).connect(ServerName::try_from("localhost").expect("server name"), tcp).await
}

/// Reads until the peer closes (EOF or error) and returns how long that took, or an error
/// when it is still open after `deadline`.
pub async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, deadline: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(deadline, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map(|()| started.elapsed())
    .map_err(|_| format!("still open after {deadline:?}"))
}

/// The client half of a request body written piece by piece.
pub type Drip = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;
pub type DripBody = StreamBody<tokio_stream_shim::Receiver>;

/// An HTTP/2 connection for requests whose bodies the test writes as it likes.
pub async fn h2_client(
    addr: SocketAddr,
    ca_pem: &str,
    client_cert: &PemPair,
) -> hyper::client::conn::http2::SendRequest<DripBody> {
    let tls = tls_connect(addr, tls_config(ca_pem, &[b"h2"], Some(client_cert))).await.expect("TLS to the proxy");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// A body that sends what is pushed into the returned sender, and ends when it is dropped.
pub fn drip_body() -> (Drip, DripBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, StreamBody::new(tokio_stream_shim::Receiver(rx)))
}

/// `mpsc::Receiver` as a `Stream`, without another dependency.
pub mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use hyper::body::Frame;

    pub struct Receiver(pub tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

    impl futures_util::Stream for Receiver {
        type Item = Result<Frame<Bytes>, std::io::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
}

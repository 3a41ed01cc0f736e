//! The load benchmark's backend: a small, fast TLS server that answers constant JSON, so the
//! benchmark measures what sits in front of it (`benches/load.sh` starts it; it is a `[[bench]]`
//! target only so that `cargo bench` builds it with the release profile).
//!
//! It serves HTTP/1.1 and HTTP/2 (ALPN), asks for no client certificate, and answers
//! `/apis` and `/apis/bench.example.com` with discovery documents (kube-apiserver's
//! availability check and discovery read them), `/apis/bench.example.com/v1` with an
//! APIResourceList, and every other path with one small constant object. `--status 300`
//! makes it a decoy: every answer is `300 Multiple Choices` without `Location`, which proxies
//! pass through, so a request routed to the decoy is counted as misrouted, not failed.
//!
//! Run by `cargo bench` (which passes `--bench`), it prints a note and exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kube_aggregation_proxy::tls::{self, CertifiedKey};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const GROUP_LIST: &[u8] = br#"{"kind":"APIGroupList","apiVersion":"v1","groups":[{"name":"bench.example.com","versions":[{"groupVersion":"bench.example.com/v1","version":"v1"}],"preferredVersion":{"groupVersion":"bench.example.com/v1","version":"v1"}}]}"#;
const GROUP: &[u8] = br#"{"kind":"APIGroup","apiVersion":"v1","name":"bench.example.com","versions":[{"groupVersion":"bench.example.com/v1","version":"v1"}],"preferredVersion":{"groupVersion":"bench.example.com/v1","version":"v1"}}"#;
const RESOURCE_LIST: &[u8] = br#"{"kind":"APIResourceList","apiVersion":"v1","groupVersion":"bench.example.com/v1","resources":[{"name":"things","singularName":"thing","namespaced":true,"kind":"Thing","verbs":["get"]}]}"#;
const THING: &[u8] = br#"{"kind":"Thing","apiVersion":"bench.example.com/v1","metadata":{"name":"thing-1","namespace":"default","resourceVersion":"1"},"spec":{"answer":42}}"#;

/// A constant-JSON TLS backend for benches/load.sh.
#[derive(Debug, Parser)]
struct Flags {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
    #[arg(long)]
    tls_cert_file: PathBuf,
    #[arg(long)]
    tls_private_key_file: PathBuf,
    /// Status of every answer (300 for the decoy).
    #[arg(long, default_value_t = 200)]
    status: u16,
}

fn body_for(path: &str) -> &'static [u8] {
    match path.trim_end_matches('/') {
        "/apis" => GROUP_LIST,
        "/apis/bench.example.com" => GROUP,
        "/apis/bench.example.com/v1" => RESOURCE_LIST,
        _ => THING,
    }
}

async fn answer(status: StatusCode, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(body_for(request.uri().path()))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--bench") {
        println!("backend: the load benchmark's backend; benches/load.sh runs it");
        return Ok(());
    }
    let flags = Flags::parse();
    let status = StatusCode::from_u16(flags.status)?;
    let serving = CertifiedKey::load(&flags.tls_cert_file, &flags.tls_private_key_file)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(&serving, None)?));
    let listener = TcpListener::bind(flags.listen).await?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1000);
    let builder = Arc::new(builder);
    eprintln!("backend listening on {} (status {status})", listener.local_addr()?);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, builder) = (acceptor.clone(), builder.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else { return };
            let service = hyper::service::service_fn(move |request| answer(status, request));
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

//! Settings shared by the criterion micro-benchmarks. Each bench uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use std::sync::Arc;

use criterion::Criterion;
use kube_aggregation_proxy::apiservice::ServiceReference;

/// Short runs, so the whole micro-benchmark suite takes a couple of minutes on two cores.
pub fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

/// The one backend service the benchmark APIServices point at.
pub fn backend_service() -> ServiceReference {
    ServiceReference {
        namespace: "bench".into(),
        name: "backend".into(),
        port: 443,
        ca_bundle: Arc::from(&b""[..]),
        insecure_skip_tls_verify: true,
    }
}

/// dhat's profiler for the counting benches: with `DHAT_FILE=path` it writes the heap
/// profile there when dropped, otherwise it only counts.
pub fn dhat_profiler() -> dhat::Profiler {
    match std::env::var_os("DHAT_FILE") {
        Some(file) => dhat::Profiler::builder().file_name(file).build(),
        None => dhat::Profiler::builder().testing().build(),
    }
}

pub type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// An HTTPS client trusting `ca_pem`, with a client certificate when `identity` is given;
/// HTTP/2 only when `http2`, else HTTP/1.1.
pub fn https_client(ca_pem: &str, identity: Option<(&std::path::Path, &std::path::Path)>, http2: bool) -> HttpsClient {
    use kube_aggregation_proxy::tls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in tls::parse_certs(ca_pem.as_bytes(), "bench CA").expect("bench CA") {
        roots.add(cert).expect("bench CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(tls::load_certs(cert).expect("client certificate"), tls::load_key(key).expect("key"))
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only();
    let executor = hyper_util::rt::TokioExecutor::new();
    if http2 {
        hyper_util::client::legacy::Client::builder(executor).http2_only(true).build(https.enable_http2().build())
    } else {
        hyper_util::client::legacy::Client::builder(executor).build(https.enable_http1().build())
    }
}

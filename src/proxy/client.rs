//! Backend clients: one pooled HTTPS client per distinct TLS identity of a backend.
//!
//! A client is keyed by what its TLS configuration is made of (server name, caBundle,
//! insecureSkipTLSVerify), so APIServices that share a backend share its connection pool, and a
//! routing-table rebuild that does not change those inputs keeps warm connections. ALPN offers
//! `h2` first: one multiplexed HTTP/2 connection per backend when the backend speaks it.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use dashmap::DashMap;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::apiservice::ServiceReference;
use crate::tls::{self, CertifiedKey};

/// Connection settings shared by every backend client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Presented to backends (`--proxy-client-cert-file` / `--proxy-client-key-file`).
    pub proxy_client_cert: Option<CertifiedKey>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_backend: usize,
    /// HTTP/2 PING interval on idle connections; a dead backend is noticed within
    /// interval + timeout instead of when the kernel gives up.
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            proxy_client_cert: None,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
            max_idle_per_backend: 25,
            http2_keep_alive_interval: Duration::from_secs(30),
            http2_keep_alive_timeout: Duration::from_secs(15),
        }
    }
}

/// How to trust one backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendTls {
    /// The name the serving certificate must carry (and the SNI sent).
    pub server_name: String,
    /// PEM roots; empty means the system's roots.
    pub ca_bundle: Arc<[u8]>,
    pub insecure_skip_tls_verify: bool,
}

impl BackendTls {
    pub fn for_service(service: &ServiceReference) -> Self {
        Self {
            server_name: service.server_name(),
            ca_bundle: service.ca_bundle.clone(),
            insecure_skip_tls_verify: service.insecure_skip_tls_verify,
        }
    }
}

/// The TLS client of a backend could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TransportError {
    pub field: &'static str,
    pub reason: String,
}

/// A pooled HTTP/1.1 + HTTP/2 client for one backend TLS identity.
#[derive(Clone)]
pub struct BackendClient {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    /// HTTP/1.1 only: a protocol switch (WebSocket, SPDY) cannot ride an HTTP/2 stream.
    upgrades: Client<HttpsConnector<HttpConnector>, Body>,
    server_name: Arc<str>,
}

fn pooled_client(
    config: ClientConfig,
    server_name: ServerName<'static>,
    settings: &ClientSettings,
    http2: bool,
) -> Client<HttpsConnector<HttpConnector>, Body> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(30)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .with_server_name_resolver(FixedServerNameResolver::new(server_name));
    let connector = if http2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(settings.idle_timeout)
        .pool_max_idle_per_host(settings.max_idle_per_backend)
        .http2_keep_alive_interval(settings.http2_keep_alive_interval)
        .http2_keep_alive_timeout(settings.http2_keep_alive_timeout)
        .http2_keep_alive_while_idle(true)
        .build(connector)
}

impl std::fmt::Debug for BackendClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendClient").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl BackendClient {
    pub fn new(tls: &BackendTls, settings: &ClientSettings) -> Result<Self, TransportError> {
        let config = client_tls_config(tls, settings)?;
        let server_name = ServerName::try_from(tls.server_name.clone())
            .map_err(|e| TransportError { field: "spec.service", reason: format!("invalid server name: {e}") })?;
        Ok(Self {
            client: pooled_client(config.clone(), server_name.clone(), settings, true),
            upgrades: pooled_client(config, server_name, settings, false),
            server_name: tls.server_name.as_str().into(),
        })
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Sends a protocol-switch request over HTTP/1.1.
    pub async fn send_upgrade(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        self.upgrades.request(request).await
    }

    pub async fn send(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(request).await
    }
}

pub(crate) fn client_tls_config(tls: &BackendTls, settings: &ClientSettings) -> Result<ClientConfig, TransportError> {
    let provider = tls::crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError { field: "tls", reason: e.to_string() })?;
    let builder = if tls.insecure_skip_tls_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        builder.with_root_certificates(root_store(&tls.ca_bundle)?)
    };
    let config = match &settings.proxy_client_cert {
        Some(cert) => builder
            .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
            .map_err(|e| TransportError { field: "proxy client certificate", reason: e.to_string() })?,
        None => builder.with_no_client_auth(),
    };
    // hyper-rustls sets ALPN (`h2`, `http/1.1`) itself from `enable_all_versions`.
    Ok(config)
}

fn root_store(ca_bundle: &[u8]) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    if ca_bundle.is_empty() {
        // kube falls back to the system's roots when an APIService has no caBundle.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        return Ok(roots);
    }
    let bad = |reason: String| TransportError { field: "spec.caBundle", reason };
    for cert in tls::parse_certs(ca_bundle, "spec.caBundle").map_err(|e| bad(e.to_string()))? {
        roots.add(cert).map_err(|e| bad(format!("unable to load root certificates: {e}")))?;
    }
    Ok(roots)
}

/// `insecureSkipTLSVerify: true`: accept any certificate, but still check that the handshake
/// is signed by the key in it.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Backend clients by TLS identity, shared across routing-table generations.
#[derive(Default)]
pub struct ClientCache {
    settings: ClientSettings,
    clients: DashMap<BackendTls, Result<BackendClient, TransportError>>,
}

impl ClientCache {
    pub fn new(settings: ClientSettings) -> Self {
        Self { settings, clients: DashMap::new() }
    }

    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// The client for `tls`, built on first use.
    pub fn get(&self, tls: &BackendTls) -> Result<BackendClient, TransportError> {
        if let Some(client) = self.clients.get(tls) {
            return client.clone();
        }
        self.clients.entry(tls.clone()).or_insert_with(|| BackendClient::new(tls, &self.settings)).clone()
    }

    /// Drops clients (and their pools) no longer used by any route.
    pub fn retain(&self, in_use: &std::collections::HashSet<BackendTls>) {
        self.clients.retain(|k, _| in_use.contains(k));
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// Words a failed backend exchange for the client: the kind of failure and, for TLS, what was
/// wrong with the certificate. Never includes the backend's address.
pub fn describe_error(err: &(dyn StdError + 'static), server_name: &str) -> String {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    let mut innermost = err.to_string();
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return describe_tls(tls, server_name);
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return "the backend closed the connection before answering".into();
            }
        }
        innermost = e.to_string();
        // `io::Error::source` skips the error it wraps, so descend into it by hand.
        current = match e.downcast_ref::<std::io::Error>() {
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn StdError + 'static)),
                None => match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
                    std::io::ErrorKind::TimedOut => return "connection timed out".into(),
                    std::io::ErrorKind::ConnectionReset => return "connection reset by the backend".into(),
                    std::io::ErrorKind::UnexpectedEof => return "the backend closed the connection".into(),
                    _ => None,
                },
            },
            None => e.source(),
        };
    }
    if innermost.contains("dns error") || innermost.contains("failed to lookup address") {
        return format!("cannot resolve the host of {server_name}");
    }
    innermost
}

fn describe_tls(err: &rustls::Error, server_name: &str) -> String {
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("TLS: certificate not valid for {server_name}")
            }
            CertificateError::UnknownIssuer => "TLS: certificate signed by unknown authority".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "TLS: certificate has expired".into()
            }
            other => format!("TLS: invalid certificate: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => format!("TLS: the backend refused the handshake ({alert:?})"),
        other => format!("TLS: {other}"),
    }
}

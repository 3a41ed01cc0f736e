//! How the proxy trusts and presents itself to a backend: the TLS identity of a backend
//! (server name, caBundle, insecureSkipTLSVerify), the rustls client configuration made from
//! it, and the words for what went wrong in TLS and below, for the client's Status.

use std::error::Error as StdError;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::apiservice::ServiceReference;
use crate::tls::{self, ProxyClientCert};

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

/// The rustls configuration for one backend identity, presenting `proxy_client_cert`. ALPN is
/// left to the caller. Certificates refused for carrying no subjectAltName are counted in
/// `missing_san`.
pub fn client_tls_config(
    tls: &BackendTls,
    proxy_client_cert: &ProxyClientCert,
    missing_san: Counter,
) -> Result<ClientConfig, TransportError> {
    let provider = tls::crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError { field: "tls", reason: e.to_string() })?;
    let roots = if tls.insecure_skip_tls_verify {
        None
    } else {
        let store = Arc::new(root_store(&tls.ca_bundle)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(store, provider.clone())
            .build()
            .map_err(|e| TransportError { field: "spec.caBundle", reason: e.to_string() })?;
        Some(webpki)
    };
    let verifier = Arc::new(BackendVerifier { provider, roots, missing_san });
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    // Resolved at each handshake: a reloaded certificate is used by the next connection.
    Ok(builder.with_client_cert_resolver(Arc::new(proxy_client_cert.clone())))
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

/// How a backend's certificate is judged: against the roots (the caBundle or the system's),
/// or not at all with `insecureSkipTLSVerify: true`, though the handshake must still be signed
/// by the key in the certificate. Refusals of a certificate that names its host only in the
/// Common Name (which Go since 1.15 and webpki both reject) are counted, as kube-aggregator's
/// `apiserver_kube_aggregator_x509_missing_san_total`.
#[derive(Debug)]
struct BackendVerifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// `None`: insecureSkipTLSVerify.
    roots: Option<Arc<WebPkiServerVerifier>>,
    missing_san: Counter,
}

impl ServerCertVerifier for BackendVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else { return Ok(ServerCertVerified::assertion()) };
        let verified = roots.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        if let Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) = &verified
        {
            if lacks_subject_alt_name(end_entity) {
                self.missing_san.inc();
            }
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn lacks_subject_alt_name(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert)
        .is_ok_and(|(_, c)| c.subject_alternative_name().is_ok_and(|san| san.is_none()))
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

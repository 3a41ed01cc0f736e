//! PEM loading and rustls configuration shared by the front end, the backend clients and the
//! sample extension server. One crypto provider (ring) for the whole process.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: no PEM private key found")]
    NoKey { what: String },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// Every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(&read(path)?, &path.display().to_string())
}

/// Every certificate in a PEM buffer; `what` names the source in errors.
pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid { what: what.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.to_owned() });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(&read(path)?, &path.display().to_string())
}

pub fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey { what: what.to_owned() },
        e => TlsError::Invalid { what: what.to_owned(), reason: e.to_string() },
    })
}

/// A certificate chain and its key, checked to belong together.
#[derive(Clone)]
pub struct CertifiedKey {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("CertifiedKey").field("chain_len", &self.chain.len()).finish_non_exhaustive()
    }
}

/// The proxy client certificate, swappable: every backend TLS configuration resolves it at
/// each handshake, so a rotated certificate is presented on every new backend connection while
/// the ones already open keep theirs.
#[derive(Clone, Default)]
pub struct ProxyClientCert {
    current: Arc<arc_swap::ArcSwapOption<rustls::sign::CertifiedKey>>,
    /// The leaf, for messages (its CN) without parsing the signing key again.
    leaf: Arc<arc_swap::ArcSwapOption<CertificateDer<'static>>>,
}

impl std::fmt::Debug for ProxyClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyClientCert").field("set", &self.current.load().is_some()).finish()
    }
}

impl ProxyClientCert {
    pub fn new(cert: Option<&CertifiedKey>) -> Result<Self, TlsError> {
        let this = Self::default();
        this.replace(cert)?;
        Ok(this)
    }

    /// Presents `cert` (or none) on connections made from now on.
    pub fn replace(&self, cert: Option<&CertifiedKey>) -> Result<(), TlsError> {
        let signed = match cert {
            None => None,
            Some(c) => {
                let key = crypto_provider()
                    .key_provider
                    .load_private_key(c.key.clone_key())
                    .map_err(|e| TlsError::Invalid { what: "proxy client key".into(), reason: e.to_string() })?;
                Some(Arc::new(rustls::sign::CertifiedKey::new(c.chain.clone(), key)))
            }
        };
        self.leaf.store(cert.and_then(|c| c.chain.first().cloned()).map(Arc::new));
        self.current.store(signed);
        Ok(())
    }

    /// The certificate presented now, leaf first.
    pub fn leaf(&self) -> Option<Arc<CertificateDer<'static>>> {
        self.leaf.load_full()
    }
}

impl rustls::client::ResolvesClientCert for ProxyClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

impl CertifiedKey {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::from_pem(&read(cert)?, &read(key)?, &cert.display().to_string())
    }

    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<Self, TlsError> {
        let chain = parse_certs(cert_pem, what)?;
        let key = parse_key(key_pem, what)?;
        let this = Self { chain, key: Arc::new(key) };
        this.to_rustls()?;
        Ok(this)
    }

    /// The rustls form; fails when the key does not match the leaf certificate.
    pub fn to_rustls(&self) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        let what = || "certificate and key".to_owned();
        let signing = crypto_provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| TlsError::Invalid { what: what(), reason: e.to_string() })?;
        let ck = rustls::sign::CertifiedKey::new(self.chain.clone(), signing);
        ck.keys_match().map_err(|e| TlsError::Invalid { what: what(), reason: e.to_string() })?;
        Ok(Arc::new(ck))
    }
}

/// A serving configuration with ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3. When `client_roots`
/// is given, clients are asked for a certificate from those roots but may go without one
/// (tokens and anonymous requests still work); a certificate that does not verify fails the
/// handshake, as kube-apiserver's `VerifyClientCertIfGiven` does.
pub fn server_config(serving: &CertifiedKey, client_roots: Option<RootCertStore>) -> Result<ServerConfig, TlsError> {
    let provider = crypto_provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Invalid { what: "TLS versions".into(), reason: e.to_string() })?;
    let builder = match client_roots {
        Some(roots) if !roots.is_empty() => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Invalid { what: "client CA".into(), reason: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(serving.chain.clone(), serving.key.clone_key())
        .map_err(|e| TlsError::Invalid { what: "serving certificate".into(), reason: e.to_string() })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(config)
}

/// PEM text for DER certificates (kube's config hands out DER roots; our clients take PEM).
pub fn der_to_pem(ders: &[Vec<u8>]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

//! x509 client-certificate authentication: the leaf's CN is the user, its O values the groups.
//!
//! The TLS layer only asks for a certificate (any CA the proxy trusts will do); which CA a chain
//! must verify against depends on what the certificate is used for, so each authenticator
//! re-verifies the chain against its own bundle here.

use std::path::Path;
use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::{AuthError, Authenticator, Credentials, UserInfo};
use crate::tls::{self, TlsError};

/// Verifies client certificate chains against one CA bundle.
#[derive(Clone)]
pub struct ChainVerifier {
    verifier: Arc<dyn ClientCertVerifier>,
    /// The DER of every trusted root, so the TLS layer can ask for certificates from all of them.
    roots: Arc<RootCertStore>,
}

impl ChainVerifier {
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        Self::from_certs(tls::load_certs(path)?, &path.display().to_string())
    }

    pub fn from_pem(pem: &[u8], what: &str) -> Result<Self, TlsError> {
        Self::from_certs(tls::parse_certs(pem, what)?, what)
    }

    fn from_certs(certs: Vec<CertificateDer<'static>>, what: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::Invalid { what: what.to_owned(), reason: e.to_string() })?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), tls::crypto_provider())
            .build()
            .map_err(|e| TlsError::Invalid { what: what.to_owned(), reason: e.to_string() })?;
        Ok(Self { verifier, roots })
    }

    pub fn roots(&self) -> &RootCertStore {
        &self.roots
    }

    /// Verifies `chain` (leaf first) for client authentication.
    pub fn verify(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let (leaf, intermediates) = chain.split_first().ok_or("no certificate presented")?;
        self.verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
    }
}

/// The subject fields kube reads from a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub common_name: String,
    pub organizations: Vec<String>,
}

/// Reads CN and O from a DER certificate.
pub fn subject(cert: &CertificateDer<'_>) -> Result<Subject, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let subject = parsed.subject();
    let common_name = subject.iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_owned();
    let organizations = subject.iter_organization().filter_map(|o| o.as_str().ok()).map(str::to_owned).collect();
    Ok(Subject { common_name, organizations })
}

/// `--client-ca-file` authentication.
pub struct ClientCertAuthenticator {
    verifier: ChainVerifier,
}

impl ClientCertAuthenticator {
    pub fn new(verifier: ChainVerifier) -> Self {
        Self { verifier }
    }
}

impl Authenticator for ClientCertAuthenticator {
    fn authenticate(&self, credentials: Credentials<'_>) -> Result<Option<UserInfo>, AuthError> {
        let Some(leaf) = credentials.peer_certificates.first() else { return Ok(None) };
        self.verifier.verify(credentials.peer_certificates).map_err(AuthError::ClientCertificate)?;
        let subject = subject(leaf).map_err(AuthError::ClientCertificate)?;
        if subject.common_name.is_empty() {
            return Err(AuthError::ClientCertificate("certificate has no common name".into()));
        }
        Ok(Some(UserInfo::new(subject.common_name, subject.organizations)))
    }
}

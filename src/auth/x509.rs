//! x509 client-certificate authentication: the leaf's CN is the user, its O values the groups.
//!
//! The TLS layer only asks for a certificate (any CA the proxy trusts will do); which CA a chain
//! must verify against depends on what the certificate is used for, so each authenticator
//! re-verifies the chain against its own bundle here.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::{AuthError, Authenticator, Credentials, UserInfo};
use crate::tls::{self, TlsError};

/// Verifies client certificate chains against one CA bundle.
#[derive(Clone)]
pub struct ChainVerifier {
    /// Unique per bundle loaded (a reload is a new bundle): the key of [`PeerChain`]'s cache.
    id: u64,
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
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), verifier, roots })
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

/// A TLS connection's client certificate chain, and what authentication learnt of it.
///
/// The chain cannot change within a connection, so it is verified once per CA bundle and its
/// subject parsed once, not on every request on the connection. A verification is trusted
/// again only while every certificate of the chain is within its validity period; a failed
/// one is never kept (it is tried again), and a reloaded bundle is a new bundle.
#[derive(Debug, Default)]
pub struct PeerChain {
    certs: Vec<CertificateDer<'static>>,
    subject: OnceLock<Result<Subject, String>>,
    /// The user the certificate names, made once and shared by the connection's requests.
    user: OnceLock<Result<Arc<UserInfo>, String>>,
    /// The latest `notBefore` and the earliest `notAfter` of the chain.
    validity: OnceLock<Option<(SystemTime, SystemTime)>>,
    /// The ids of the bundles the chain verified against (at most [`MAX_VERIFIED_BUNDLES`]).
    verified: Mutex<Vec<u64>>,
}

/// A chain meets at most the client CA and the requestheader CA (and, across a reload, their
/// successors); more is never kept.
const MAX_VERIFIED_BUNDLES: usize = 4;

impl PeerChain {
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Self {
        Self { certs, ..Self::default() }
    }

    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.certs.first()
    }

    /// The leaf's CN and O, parsed on first use.
    pub fn subject(&self) -> Result<&Subject, String> {
        let leaf = self.leaf().ok_or("no certificate presented")?;
        self.subject.get_or_init(|| subject(leaf)).as_ref().map_err(Clone::clone)
    }

    /// The user a client certificate names: CN as the name, O as the groups, with
    /// `system:authenticated` as the chain hands it out.
    pub fn user(&self) -> Result<Arc<UserInfo>, String> {
        let made = self.user.get_or_init(|| {
            let subject = self.subject()?;
            if subject.common_name.is_empty() {
                return Err("certificate has no common name".into());
            }
            let user = UserInfo::new(subject.common_name.clone(), subject.organizations.clone());
            Ok(Arc::new(user.with_authenticated_group()))
        });
        made.clone()
    }

    /// Verifies the chain against `verifier`'s bundle, or trusts an earlier verification
    /// against the same bundle while the chain is valid.
    pub fn verify(&self, verifier: &ChainVerifier) -> Result<(), String> {
        let now = SystemTime::now();
        let within = self
            .validity
            .get_or_init(|| validity(&self.certs))
            .is_some_and(|(from, until)| from <= now && now <= until);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if within && verified.contains(&verifier.id) {
            return Ok(());
        }
        verifier.verify(&self.certs)?;
        if verified.len() < MAX_VERIFIED_BUNDLES && !verified.contains(&verifier.id) {
            verified.push(verifier.id);
        }
        Ok(())
    }
}

/// When every certificate of `chain` is valid: from the latest `notBefore` to the earliest
/// `notAfter`; `None` if one does not parse.
fn validity(chain: &[CertificateDer<'_>]) -> Option<(SystemTime, SystemTime)> {
    let mut window: Option<(SystemTime, SystemTime)> = None;
    for cert in chain {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let v = parsed.validity();
        let at = |t: i64| SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(u64::try_from(t).ok()?));
        let (from, until) = (at(v.not_before.timestamp())?, at(v.not_after.timestamp())?);
        window = Some(match window {
            None => (from, until),
            Some((f, u)) => (f.max(from), u.min(until)),
        });
    }
    window
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
    fn authenticate(&self, credentials: Credentials<'_>) -> Result<Option<Arc<UserInfo>>, AuthError> {
        if credentials.peer.leaf().is_none() {
            return Ok(None);
        }
        credentials.peer.verify(&self.verifier).map_err(AuthError::ClientCertificate)?;
        credentials.peer.user().map(Some).map_err(AuthError::ClientCertificate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    #[test]
    fn a_connection_remembers_a_verification_only_for_its_bundle() {
        let (ca, other) =
            (CertificateAuthority::new("client-ca").unwrap(), CertificateAuthority::new("other-ca").unwrap());
        let chain = ca.issue_client("alice", &["dev"]).unwrap().certified_key().unwrap().chain;
        let peer = PeerChain::new(chain);
        let trusted = ChainVerifier::from_pem(ca.cert_pem().as_bytes(), "client-ca").unwrap();
        let untrusted = ChainVerifier::from_pem(other.cert_pem().as_bytes(), "other-ca").unwrap();
        assert!(peer.verify(&untrusted).is_err());
        assert!(peer.verify(&trusted).is_ok());
        assert!(peer.verify(&trusted).is_ok(), "again, from what the connection learnt");
        assert!(peer.verify(&untrusted).is_err(), "one bundle's verification says nothing of another's");
        // A reloaded bundle is a new bundle: verified afresh, and without the old CA it fails.
        assert!(peer.verify(&ChainVerifier::from_pem(ca.cert_pem().as_bytes(), "client-ca").unwrap()).is_ok());
        assert!(peer.verify(&ChainVerifier::from_pem(other.cert_pem().as_bytes(), "client-ca").unwrap()).is_err());
        assert_eq!(peer.subject().unwrap().common_name, "alice");
        assert!(PeerChain::default().subject().is_err());
    }
}

//! Throwaway PKI for the demo and for a self-signed serving certificate when none is given.
//!
//! Certificates are ECDSA P-256, valid for a year, generated in memory with rcgen.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::tls::{CertifiedKey, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("client certificate for {user}: {count} groups, at most {MAX_CLIENT_GROUPS} supported")]
    TooManyGroups { user: String, count: usize },
}

/// A certificate and its key, both PEM.
#[derive(Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair").finish_non_exhaustive()
    }
}

impl PemPair {
    pub fn certified_key(&self) -> Result<CertifiedKey, TlsError> {
        CertifiedKey::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes(), "generated certificate")
    }

    /// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` (the key mode 0600).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), PkiError> {
        write_file(&dir.join(format!("{stem}.crt")), &self.cert_pem, false)?;
        write_file(&dir.join(format!("{stem}.key")), &self.key_pem, true)
    }
}

pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write { path: path.display().to_string(), source };
    std::fs::write(path, contents).map_err(err)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

/// A certificate authority that can issue serving and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    pem: PemPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

fn generate(what: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate { what: what.to_owned(), source }
}

/// The OID of the X.520 organizationName attribute.
const OID_ORGANIZATION_NAME: [u64; 4] = [2, 5, 4, 10];

/// rcgen keeps one value per attribute type, so a second organization goes in under the same
/// OID spelled as a custom type. Two groups is the most a generated certificate can carry.
pub const MAX_CLIENT_GROUPS: usize = 2;

fn name(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    let types = [DnType::OrganizationName, DnType::CustomDnType(OID_ORGANIZATION_NAME.to_vec())];
    for (o, ty) in organizations.iter().zip(types) {
        dn.push(ty, *o);
    }
    dn
}

impl CertificateAuthority {
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let err = generate(common_name);
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(&err)?;
        let cert = params.self_signed(&key).map_err(&err)?;
        let pem = PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(Self { issuer: Issuer::new(params, key), pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.pem.cert_pem
    }

    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    /// A serving certificate for DNS names and IP addresses (strings that parse as IPs).
    pub fn issue_serving(&self, common_name: &str, hosts: &[&str]) -> Result<PemPair, PkiError> {
        let err = generate(common_name);
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, &[]);
        params.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*h).try_into().map_err(&err)?)),
            })
            .collect::<Result<_, PkiError>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.sign(params, &err)
    }

    /// A client certificate: CN is the user, each O a group (at most [`MAX_CLIENT_GROUPS`]).
    pub fn issue_client(&self, user: &str, groups: &[&str]) -> Result<PemPair, PkiError> {
        let err = generate(user);
        if groups.len() > MAX_CLIENT_GROUPS {
            return Err(PkiError::TooManyGroups { user: user.to_owned(), count: groups.len() });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = name(user, groups);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.sign(params, &err)
    }

    fn sign(&self, params: CertificateParams, err: &impl Fn(rcgen::Error) -> PkiError) -> Result<PemPair, PkiError> {
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A self-signed serving certificate for `localhost`, `127.0.0.1` and `::1`, used when the
/// operator gives none.
pub fn self_signed_localhost() -> Result<PemPair, PkiError> {
    let ca = CertificateAuthority::new("kube-aggregation-proxy-self-signed-ca")?;
    let mut pair = ca.issue_serving("localhost", &["localhost", "127.0.0.1", "::1"])?;
    pair.cert_pem.push_str(ca.cert_pem());
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::x509::{subject, ChainVerifier};

    #[test]
    fn issued_client_certificate_verifies_and_carries_user_and_groups() {
        let ca = CertificateAuthority::new("test-ca").unwrap();
        let client = ca.issue_client("alice", &["dev", "ops"]).unwrap().certified_key().unwrap();
        let verifier = ChainVerifier::from_pem(ca.cert_pem().as_bytes(), "test-ca").unwrap();
        verifier.verify(&client.chain).unwrap();
        let s = subject(&client.chain[0]).unwrap();
        assert_eq!(
            (s.common_name.as_str(), s.organizations.as_slice()),
            ("alice", &["dev".to_owned(), "ops".to_owned()][..])
        );
        let other = CertificateAuthority::new("other-ca").unwrap();
        let stranger = other.issue_client("mallory", &[]).unwrap().certified_key().unwrap();
        assert!(verifier.verify(&stranger.chain).is_err());
    }
}

//! The cluster's PKI, generated with rcgen (ECDSA P-256) and written as PEM files.
//!
//! Four authorities, each with one job, as kubeadm lays them out:
//! - the cluster CA signs kube-apiserver's serving certificate;
//! - the client CA signs client certificates that kube-apiserver and the extension servers
//!   accept for direct x509 authentication (`--client-ca-file`);
//! - the front-proxy CA signs only the aggregator's proxy client certificate
//!   (`--requestheader-client-ca-file`, CN `front-proxy-client`);
//! - the extension-serving CA signs extension servers' serving certificates; it is the
//!   caBundle of their APIServices.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The CommonName kube-apiserver is told to accept in `--requestheader-allowed-names`.
pub const FRONT_PROXY_CLIENT_NAME: &str = "front-proxy-client";

/// A certificate and its private key, both as PEM text and as files.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// A CA that can issue more certificates during a test.
pub struct CertificateAuthority {
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate (and key, for tests that sign with it themselves).
    pub cert: CertKey,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

impl CertificateAuthority {
    fn generate(dir: &Path, stem: &str, common_name: &str) -> io::Result<Self> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        let cert = write_pair(dir, stem, cert.pem(), key.serialize_pem())?;
        Ok(CertificateAuthority { params, key, cert })
    }

    /// Issues a leaf certificate, written to `<dir>/<stem>.crt` and `<dir>/<stem>.key`.
    ///
    /// `organizations` become the subject's O attributes, which Kubernetes reads as groups;
    /// rcgen keeps one value per attribute type, so at most two are supported.
    pub fn issue(
        &self,
        dir: &Path,
        stem: &str,
        common_name: &str,
        organizations: &[&str],
        subject_alt_names: &[&str],
        usage: Usage,
    ) -> io::Result<CertKey> {
        let sans: Vec<String> = subject_alt_names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).map_err(rcgen_error)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        match organizations {
            [] => {}
            [one] => params.distinguished_name.push(DnType::OrganizationName, *one),
            [one, two] => {
                params.distinguished_name.push(DnType::OrganizationName, *one);
                // Same OID (2.5.4.10) under another key: a second O attribute.
                params.distinguished_name.push(DnType::CustomDnType(vec![2, 5, 4, 10]), *two);
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "at most two groups (O attributes) per client certificate",
                ))
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
        write_pair(dir, stem, cert.pem(), key.serialize_pem())
    }
}

/// The user of [`Pki::admin_token`].
pub const ADMIN_TOKEN_USER: &str = "token-admin";

/// Everything kube-apiserver and its clients need, under one directory.
pub struct Pki {
    pub dir: PathBuf,
    /// Signs kube-apiserver's serving certificate; the kubeconfig's certificate-authority.
    pub cluster_ca: CertificateAuthority,
    /// `--client-ca-file`: signs admin, extension-server and test-user client certificates.
    pub client_ca: CertificateAuthority,
    /// `--requestheader-client-ca-file`: signs only the proxy client certificate.
    pub front_proxy_ca: CertificateAuthority,
    /// Signs extension servers' serving certificates; their APIServices' caBundle.
    pub extension_ca: CertificateAuthority,
    /// kube-apiserver serving certificate (127.0.0.1, localhost, kubernetes.default.svc, ...).
    pub apiserver_serving: CertKey,
    /// CN=admin, O=system:masters.
    pub admin: CertKey,
    /// CN=front-proxy-client, `--proxy-client-cert-file/--proxy-client-key-file`.
    pub front_proxy_client: CertKey,
    /// A bearer token for [`ADMIN_TOKEN_USER`] in `system:masters`, from `--token-auth-file`
    /// ([`Pki::token_auth_file`]): for clients that cannot present a client certificate
    /// (h2load in the load benchmark).
    pub admin_token: String,
    pub token_auth_file: PathBuf,
    /// ECDSA key pair: `--service-account-signing-key-file` (private),
    /// `--service-account-key-file` (public).
    pub service_account_private_key: PathBuf,
    pub service_account_public_key: PathBuf,
}

impl Pki {
    /// Generates the whole PKI into `dir` (created if missing).
    pub fn generate(dir: &Path, apiserver_service_ip: &str) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let cluster_ca = CertificateAuthority::generate(dir, "ca", "kubernetes-ca")?;
        let client_ca = CertificateAuthority::generate(dir, "client-ca", "kubernetes-client-ca")?;
        let front_proxy_ca = CertificateAuthority::generate(dir, "front-proxy-ca", "kubernetes-front-proxy-ca")?;
        let extension_ca = CertificateAuthority::generate(dir, "extension-ca", "extension-apiserver-ca")?;
        let apiserver_serving = cluster_ca.issue(
            dir,
            "apiserver",
            "kube-apiserver",
            &[],
            &[
                "127.0.0.1",
                "localhost",
                apiserver_service_ip,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            Usage::Server,
        )?;
        let admin = client_ca.issue(dir, "admin", "admin", &["system:masters"], &[], Usage::Client)?;
        let front_proxy_client =
            front_proxy_ca.issue(dir, "front-proxy-client", FRONT_PROXY_CLIENT_NAME, &[], &[], Usage::Client)?;
        let sa_key = KeyPair::generate().map_err(rcgen_error)?;
        let service_account_private_key = dir.join("sa.key");
        let service_account_public_key = dir.join("sa.pub");
        write_secret(&service_account_private_key, &sa_key.serialize_pem())?;
        fs::write(&service_account_public_key, sa_key.public_key_pem())?;
        let admin_token = format!("kap-admin-{:032x}", rand::random::<u128>());
        let token_auth_file = dir.join("tokens.csv");
        write_secret(
            &token_auth_file,
            &format!("{admin_token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},\"system:masters\"\n"),
        )?;
        Ok(Pki {
            dir: dir.to_owned(),
            cluster_ca,
            client_ca,
            front_proxy_ca,
            extension_ca,
            apiserver_serving,
            admin,
            front_proxy_client,
            admin_token,
            token_auth_file,
            service_account_private_key,
            service_account_public_key,
        })
    }
}

fn write_pair(dir: &Path, stem: &str, cert_pem: String, key_pem: String) -> io::Result<CertKey> {
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    fs::write(&cert_path, &cert_pem)?;
    write_secret(&key_path, &key_pem)?;
    Ok(CertKey { cert_pem, key_pem, cert_path, key_path })
}

fn write_secret(path: &Path, text: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

fn rcgen_error(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("rcgen: {e}"))
}

//! The front end's credentials, and their hot reload: the serving certificate, the client CA,
//! the requestheader (front-proxy) CA with its allowed names and header names, the token file,
//! and the proxy client certificate presented to backends.
//!
//! They are built in one place ([`build`]) at start and on every reload into a [`FrontEnd`],
//! swapped whole, so a connection sees one consistent set: new connections use the new
//! material, and those already open keep theirs until they close (kube-aggregator's behaviour
//! since kubernetes/kubernetes#92791). The proxy client certificate is swapped inside the
//! backends' TLS resolver ([`crate::tls::ProxyClientCert`]).
//!
//! The files are read again every [`POLL`] (their bytes are compared, so an in-place rewrite
//! within the same second is seen) and on SIGHUP. A change is validated exactly as at start
//! (`Settings::validate`); a file that does not load keeps the last good set, and the reason
//! goes to the log, `aggregator_credentials_reloads_total{result="failure"}` and
//! `/debug/apiservices`.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::{RootCertStore, ServerConfig};
use serde::Serialize;

use crate::auth::identity::IdentityHeaderNames;
use crate::auth::requestheader::{RequestHeaderAuthenticator, RequestHeaderConfig};
use crate::auth::token::AsyncTokenAuthenticator;
use crate::auth::x509::{ChainVerifier, ClientCertAuthenticator};
use crate::auth::{AuthChain, Authenticator};
use crate::config::{Config, Settings};
use crate::metrics::Metrics;
use crate::tls::{self, CertifiedKey, ProxyClientCert};

/// How often the credential files are read again.
pub const POLL: Duration = Duration::from_secs(1);

/// What a client connection is accepted and authenticated with, swapped whole.
pub struct FrontEnd {
    pub tls: Arc<ServerConfig>,
    pub auth: AuthChain,
    pub identity_headers: IdentityHeaderNames,
}

pub type SharedFrontEnd = Arc<ArcSwap<FrontEnd>>;

/// What the cluster provided at start (kube-system/extension-apiserver-authentication), used
/// where flags give nothing; the token reviewer is kept as it is.
#[derive(Clone, Default)]
pub struct Provided {
    pub client_ca: Option<ChainVerifier>,
    pub requestheader: Option<RequestHeaderConfig>,
    pub token_reviewer: Option<Arc<dyn AsyncTokenAuthenticator>>,
    /// The certificate generated at start when no `--tls-cert-file` was given.
    pub generated_serving: Option<CertifiedKey>,
}

/// The result of the last reload, for `/debug/apiservices`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStatus {
    /// RFC 3339 time of the last successful load (start included).
    pub loaded_at: String,
    /// Why the newest files were not used, while the last good ones are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub type SharedReloadStatus = Arc<ArcSwap<ReloadStatus>>;

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl ReloadStatus {
    pub fn loaded() -> Self {
        Self { loaded_at: now_rfc3339(), error: None }
    }
}

/// Every CA a client certificate may come from, so the TLS layer asks for one.
fn client_roots(client_ca: Option<&ChainVerifier>, requestheader: Option<&RequestHeaderConfig>) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for verifier in client_ca.into_iter().chain(requestheader.map(|rh| &rh.verifier)) {
        roots.roots.extend(verifier.roots().roots.iter().cloned());
    }
    roots
}

/// The front end `config` describes, with what the cluster provided where it gives nothing.
pub fn build(config: &Config, provided: &Provided) -> Result<FrontEnd, String> {
    let client_ca = config.client_ca.as_ref().or(provided.client_ca.as_ref());
    let requestheader = config.requestheader.as_ref().or(provided.requestheader.as_ref());
    let serving = config
        .serving
        .as_ref()
        .or(provided.generated_serving.as_ref())
        .ok_or("no serving certificate: --tls-cert-file is unset and none was generated")?;
    let tls = tls::server_config(serving, Some(client_roots(client_ca, requestheader))).map_err(|e| e.to_string())?;
    let mut authenticators: Vec<Arc<dyn Authenticator>> = Vec::new();
    let mut identity_headers = IdentityHeaderNames::default();
    if let Some(rh) = requestheader {
        identity_headers = IdentityHeaderNames::new(
            rh.username_headers.iter().chain(&rh.uid_headers).chain(&rh.group_headers).map(String::as_str),
            rh.extra_headers_prefix.iter().map(String::as_str),
        );
        authenticators.push(Arc::new(RequestHeaderAuthenticator::new(rh.clone())));
    }
    if let Some(ca) = client_ca {
        authenticators.push(Arc::new(ClientCertAuthenticator::new(ca.clone())));
    }
    if let Some(tokens) = &config.token_file {
        authenticators.push(Arc::new(tokens.clone()));
    }
    let mut auth = AuthChain::new(authenticators, config.anonymous_auth);
    if let Some(reviewer) = &provided.token_reviewer {
        auth = auth.with_token_reviewer(reviewer.clone());
    }
    Ok(FrontEnd { tls: Arc::new(tls), auth, identity_headers })
}

/// Reloads the credentials when their files change or on SIGHUP.
pub struct Reloader {
    pub settings: Settings,
    pub provided: Provided,
    pub front: SharedFrontEnd,
    pub proxy_client_cert: ProxyClientCert,
    pub status: SharedReloadStatus,
    pub metrics: Arc<Metrics>,
}

/// The credential files `settings` names.
fn files(settings: &Settings) -> Vec<PathBuf> {
    [
        &settings.tls_cert_file,
        &settings.tls_private_key_file,
        &settings.client_ca_file,
        &settings.requestheader_client_ca_file,
        &settings.token_auth_file,
        &settings.proxy_client_cert_file,
        &settings.proxy_client_key_file,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect()
}

/// A hash of the files' contents (a missing or unreadable file hashes as its error).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(e) => e.kind().to_string().hash(&mut hasher),
        }
    }
    hasher.finish()
}

impl Reloader {
    /// Runs until the process ends.
    pub async fn run(self) {
        let paths = files(&self.settings);
        if paths.is_empty() {
            return;
        }
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = fingerprint(&paths);
        let mut ticker = tokio::time::interval(POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let forced = tokio::select! {
                _ = ticker.tick() => false,
                Some(()) = async { match &mut hangup { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            let now = fingerprint(&paths);
            if now == seen && !forced {
                continue;
            }
            seen = now;
            self.reload(forced);
        }
    }

    /// Loads every file again; on success the new set replaces the old one whole.
    fn reload(&self, forced: bool) {
        let loaded = self
            .settings
            .clone()
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|config| Ok((build(&config, &self.provided)?, config)));
        match loaded {
            Ok((front, config)) => {
                if let Err(e) = self.proxy_client_cert.replace(config.proxy_client_cert.as_ref()) {
                    return self.failed(format!("proxy client certificate: {e}"));
                }
                self.front.store(Arc::new(front));
                self.status.store(Arc::new(ReloadStatus::loaded()));
                self.metrics.credentials_reloaded(true);
                tracing::info!(forced, "credentials reloaded: new connections use them");
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&self, error: String) {
        self.metrics.credentials_reloaded(false);
        tracing::warn!(%error, "credentials not reloaded; the last good ones stay in use");
        let previous = self.status.load();
        self.status.store(Arc::new(ReloadStatus { loaded_at: previous.loaded_at.clone(), error: Some(error) }));
    }
}

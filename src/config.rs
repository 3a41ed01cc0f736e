//! Configuration: a YAML file and kube-apiserver-style flags, merged and validated once.
//!
//! Every flag can also be written in the file under the same name (`secure-port: 6443`); a
//! flag given on the command line wins. Unknown keys are errors (a typo in a security proxy
//! must not be silently ignored), and every problem is reported at once, named by its key.
//! The result, [`Config`], holds plain types with files already loaded.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use http::uri::Authority;
use http::Uri;
use serde::{Deserialize, Serialize};

use crate::auth::authorization::CacheTtls;
use crate::auth::requestheader::RequestHeaderConfig;
use crate::auth::token::TokenFile;
use crate::auth::x509::ChainVerifier;
use crate::backend::BackendSettings;
use crate::server::flow::FlowDefaults;
use crate::server::limits::RequestLimitSettings;
use crate::server::FrontendSettings;
use crate::source::file::ManifestLimits;
use crate::tls::CertifiedKey;

pub const DEFAULT_SECURE_PORT: u16 = 8443;
pub const DEFAULT_APISERVICES_DIR: &str = "config/apiservices";

/// Where APIServices come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Manifests in `--apiservices-dir`, reloaded on change (standalone mode).
    #[default]
    Files,
    /// APIServices, Services and EndpointSlices watched in a cluster (`--kubeconfig`).
    Cluster,
}

/// The settings as written: every field optional, in flags and in the file alike.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Where APIServices come from.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceKind>,
    /// Directory of APIService manifests (files source) [default: config/apiservices].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apiservices_dir: Option<PathBuf>,
    /// Standalone service map entry `namespace/name:port=host:port[,host:port...]` (several
    /// endpoints are balanced); repeatable.
    #[arg(long = "service", value_name = "NS/NAME:PORT=HOST:PORT")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[serde(rename = "services", deserialize_with = "service_map")]
    pub services: Vec<String>,
    /// Kubeconfig of the cluster to watch (cluster source); in-cluster config when absent.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_address: Option<IpAddr>,
    /// Port to serve HTTPS on [default: 8443]; 0 picks a free port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure_port: Option<u16>,
    /// Serving certificate (PEM); a self-signed one for localhost when absent.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle for x509 client-certificate authentication.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Static bearer tokens, CSV `token,user,uid,"group1,group2"`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_auth_file: Option<PathBuf>,
    /// Serve unauthenticated requests as system:anonymous, who then meets authorization
    /// [default: true with the cluster source, as kube-apiserver; false with files].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_auth: Option<bool>,
    /// CA bundle of front proxies allowed to assert identity in request headers.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requestheader_client_ca_file: Option<PathBuf>,
    /// Common names a front proxy's certificate may have; empty allows any from the CA.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requestheader_allowed_names: Option<Vec<String>>,
    /// Headers to read the user from [default: X-Remote-User].
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requestheader_username_headers: Option<Vec<String>>,
    /// Headers to read the uid from [default: X-Remote-Uid].
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requestheader_uid_headers: Option<Vec<String>>,
    /// Headers to read groups from [default: X-Remote-Group].
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requestheader_group_headers: Option<Vec<String>>,
    /// Header prefixes to read extra attributes from [default: X-Remote-Extra-].
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requestheader_extra_headers_prefix: Option<Vec<String>>,
    /// Client certificate the proxy presents to backends and the delegate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_client_cert_file: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_client_key_file: Option<PathBuf>,
    /// The server for local APIServices and `/api` (a kube-apiserver), `https://host:port`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegate_url: Option<String>,
    /// CA bundle to verify the delegate's serving certificate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegate_ca_file: Option<PathBuf>,
    /// Route to a ready endpoint of the service instead of its cluster IP [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_aggregator_routing: Option<bool>,
    /// Answer a backend's redirect with 502 instead of passing it on [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregator_reject_forwarding_redirect: Option<bool>,
    /// How long to wait for a backend connection [default: 5s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_connect_timeout: Option<String>,
    /// How long TokenReview answers are cached (cluster source) [default: 10s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication_token_webhook_cache_ttl: Option<String>,
    /// Cluster source: ask kube-apiserver (SubjectAccessReview) whether the caller may make
    /// each request to an extension server before forwarding it, as kube-aggregator does.
    /// `false` leaves authorization to the extension server alone, which is only safe when
    /// every extension server authorizes by itself [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorize_aggregated_requests: Option<bool>,
    /// How long an allowed SubjectAccessReview answer is cached [default: 10s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_webhook_cache_authorized_ttl: Option<String>,
    /// How long a denied SubjectAccessReview answer is cached [default: 10s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_webhook_cache_unauthorized_ttl: Option<String>,
    /// Files source: members of these groups may impersonate anyone with `Impersonate-*`
    /// headers; everyone else gets 403 [default: none]. The cluster source asks
    /// kube-apiserver instead.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impersonation_allowed_groups: Option<Vec<String>>,
    /// After SIGTERM, keep serving this long with `/readyz` failing, so endpoints and load
    /// balancers stop sending traffic first [default: 0s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_delay_duration: Option<String>,
    /// While draining, answer new requests 429 with `Retry-After` (and close HTTP/1.1
    /// connections) instead of serving them [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_send_retry_after: Option<bool>,
    /// While draining, end open watches cleanly at random times within this, so clients relist
    /// gradually [default: 0s: at once].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_watch_termination_grace_period: Option<String>,
    /// kube audit policy (`audit.k8s.io/v1` `Policy`); with `--audit-log-path`, turns
    /// audit on [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_policy_file: Option<PathBuf>,
    /// Where audit events go, one JSON line each; `-` is standard output.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_log_path: Option<PathBuf>,
    /// Days to keep rotated audit logs [default: 0: any age].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_log_maxage: Option<u64>,
    /// Rotated audit logs to keep [default: 0: all].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_log_maxbackup: Option<usize>,
    /// Megabytes an audit log grows to before it is rotated [default: 0: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_log_maxsize: Option<u64>,
    /// Audit events waiting to be written before new ones are dropped (and counted in
    /// `apiserver_audit_error_total{plugin="buffered"}`) [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_log_batch_buffer_size: Option<usize>,
    /// An audit event larger than this loses its request and response bodies; one still
    /// larger is dropped [default: 102400].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_log_truncate_max_event_size: Option<usize>,
    /// kube's tracing configuration (`apiserver.config.k8s.io/v1` `TracingConfiguration`:
    /// `endpoint` of an OTLP/gRPC collector, `samplingRatePerMillion`) [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing_config_file: Option<PathBuf>,
    /// How long an idle backend connection is kept [default: 90s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_idle_timeout: Option<String>,
    /// A client's TLS handshake must finish within this [default: 10s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_timeout: Option<String>,
    /// A new connection's first request, and every HTTP/1.1 request's headers, must arrive
    /// within this [default: 32s, kube-apiserver's ReadHeaderTimeout].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header_timeout: Option<String>,
    /// A client connection with no request in flight is closed after this [default: 90s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_connection_timeout: Option<String>,
    /// Client connections open at once; lowered to fit under the open-file limit
    /// [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Client connections open at once from one address; 0 for no limit [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<usize>,
    /// How requests are scheduled: per-core (a single-threaded runtime per core, each with
    /// its own SO_REUSEPORT listener and backend connections) or work-stealing (one
    /// multi-threaded runtime) [default: per-core].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<crate::runtime::RuntimeModel>,
    /// Concurrent streams a client may open on one HTTP/2 connection [default: 100, as
    /// kube-apiserver].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http2_max_streams_per_connection: Option<u32>,
    /// Deadline of every request that is not long-running (watch, proxy, exec, attach, log,
    /// port-forward) [default: 60s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    /// Read-only requests in flight at once, long-running ones not counted; 0 for no limit
    /// [default: 400].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_inflight: Option<usize>,
    /// Mutating requests in flight at once; 0 for no limit [default: 200].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_mutating_requests_inflight: Option<usize>,
    /// PING a backend's HTTP/2 connection after this much silence (also the TCP keep-alive
    /// time of HTTP/1.1 ones) [default: 3s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_http2_ping_interval: Option<String>,
    /// Close a backend connection whose PING is not answered within this [default: 2s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_http2_ping_timeout: Option<String>,
    /// Connections to one backend endpoint at most [default: 32].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_max_connections_per_endpoint: Option<usize>,
    /// The protocol of pooled backend connections: h2 (HTTP/2 when the backend offers it,
    /// else HTTP/1.1) or http1 (HTTP/1.1 only, one request per connection) [default: h2].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_protocol: Option<crate::backend::BackendProtocol>,
    /// Requests that may wait for a connection to one endpoint; past it they fail fast with
    /// 503 [default: 256].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_max_pending_requests: Option<usize>,
    /// Largest request header list sent to a backend that advertises no limit of its own;
    /// larger requests get 431 [default: 1048576].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_max_header_list_size: Option<usize>,
    /// Requests in flight at once to each APIService without its own
    /// `kube-aggregation-proxy.io/max-requests-inflight` annotation; 0 for no limit [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apiservice_max_requests_inflight: Option<u32>,
    /// Requests a second to each APIService without its own
    /// `kube-aggregation-proxy.io/requests-per-second` annotation; 0 for no limit [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apiservice_requests_per_second: Option<u32>,
    /// The token bucket's burst for `apiservice-requests-per-second` [default: the rate].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apiservice_burst: Option<u32>,
    /// Largest manifest file read, in bytes; larger ones are rejected [default: 1048576].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apiservices_max_file_size: Option<u64>,
    /// Most APIService objects one manifest file may hold [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apiservices_max_per_file: Option<usize>,
}

/// The file form of the service map is a mapping; flags use `key=value` strings.
fn service_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// Front-proxy settings, loaded.
#[derive(Clone)]
pub struct RequestHeader {
    pub config: RequestHeaderConfig,
}

/// Impersonation and authorization (`--authorize-aggregated-requests`,
/// `--authorization-webhook-cache-*-ttl`, `--impersonation-allowed-groups`).
#[derive(Debug, Clone)]
pub struct AuthorizationSettings {
    pub aggregated: bool,
    pub impersonator_groups: Vec<String>,
    pub ttls: CacheTtls,
}

/// The local delegate (kube-apiserver).
#[derive(Debug, Clone)]
pub struct Delegate {
    pub authority: Authority,
    pub ca_bundle: Vec<u8>,
    pub server_name: String,
}

#[derive(Debug, Clone)]
pub enum Source {
    Files { dir: PathBuf, services: std::collections::HashMap<String, Vec<Authority>>, limits: ManifestLimits },
    Cluster { kubeconfig: Option<PathBuf> },
}

/// The validated configuration.
pub struct Config {
    /// What this was validated from: credential reloads validate it again.
    pub settings: Settings,
    pub listen: SocketAddr,
    /// `None`: generate a self-signed certificate at start.
    pub serving: Option<CertifiedKey>,
    pub client_ca: Option<ChainVerifier>,
    pub token_file: Option<TokenFile>,
    pub anonymous_auth: bool,
    pub requestheader: Option<RequestHeaderConfig>,
    pub proxy_client_cert: Option<CertifiedKey>,
    pub delegate: Option<Delegate>,
    pub source: Source,
    pub enable_aggregator_routing: bool,
    pub reject_forwarding_redirects: bool,
    /// How backends are reached (`--backend-*`, the proxy client certificate).
    pub backend: BackendSettings,
    pub token_review_cache_ttl: Duration,
    pub authorization: AuthorizationSettings,
    pub frontend: FrontendSettings,
    pub request_limits: RequestLimitSettings,
    /// `--apiservice-*`: flow control for APIServices without annotations of their own.
    pub flow: FlowDefaults,
    /// `--audit-*`: `None` when audit is off.
    pub audit: Option<crate::audit::AuditSettings>,
    /// `--tracing-config-file`: `None` when tracing is off.
    pub tracing: Option<crate::telemetry::TracingSettings>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config").field("listen", &self.listen).field("source", &self.source).finish_non_exhaustive()
    }
}

impl Settings {
    /// Reads a settings file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("config file {}: {e}", path.display())]))?;
        serde_yaml_ng::from_str(&text).map_err(|e| ConfigError(vec![format!("config file {}: {e}", path.display())]))
    }

    /// `self` overridden by every value set in `flags`.
    pub fn merged_with(self, flags: &Settings) -> Result<Self, ConfigError> {
        let to_map = |s: &Settings| match serde_json::to_value(s) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            other => Err(ConfigError(vec![format!("internal: settings did not serialize: {other:?}")])),
        };
        let mut base = to_map(&self)?;
        let services = self.services.iter().chain(&flags.services).cloned().collect::<Vec<_>>();
        base.extend(to_map(flags)?);
        base.remove("services");
        let mut merged: Settings = serde_json::from_value(serde_json::Value::Object(base))
            .map_err(|e| ConfigError(vec![format!("internal: {e}")]))?;
        merged.services = services;
        Ok(merged)
    }

    /// Validates and loads everything, collecting every problem.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let settings = self.clone();
        let mut errors = Vec::new();
        let mut check = |key: &str, r: Result<(), String>| {
            if let Err(e) = r {
                errors.push(format!("{key}: {e}"));
            }
        };

        let serving = match (&self.tls_cert_file, &self.tls_private_key_file) {
            (Some(c), Some(k)) => match loaded(CertifiedKey::load(c, k)) {
                Ok(ck) => Some(ck),
                Err(e) => {
                    check("tls-cert-file", Err(e));
                    None
                }
            },
            (None, None) => None,
            _ => {
                check("tls-cert-file", Err("tls-cert-file and tls-private-key-file go together".into()));
                None
            }
        };
        let proxy_client_cert = match (&self.proxy_client_cert_file, &self.proxy_client_key_file) {
            (Some(c), Some(k)) => match loaded(CertifiedKey::load(c, k)) {
                Ok(ck) => Some(ck),
                Err(e) => {
                    check("proxy-client-cert-file", Err(e));
                    None
                }
            },
            (None, None) => None,
            _ => {
                check(
                    "proxy-client-cert-file",
                    Err("proxy-client-cert-file and proxy-client-key-file go together".into()),
                );
                None
            }
        };
        let client_ca = self.client_ca_file.as_deref().and_then(|p| match loaded(ChainVerifier::from_pem_file(p)) {
            Ok(v) => Some(v),
            Err(e) => {
                check("client-ca-file", Err(e));
                None
            }
        });
        let token_file = self.token_auth_file.as_deref().and_then(|p| match TokenFile::load(p) {
            Ok(t) => Some(t),
            Err(e) => {
                check("token-auth-file", Err(e.to_string()));
                None
            }
        });
        let requestheader = match &self.requestheader_client_ca_file {
            Some(p) => match loaded(ChainVerifier::from_pem_file(p)) {
                Ok(verifier) => {
                    let mut rh = RequestHeaderConfig::with_default_headers(
                        verifier,
                        self.requestheader_allowed_names.clone().unwrap_or_default(),
                    );
                    let overrides = [
                        (&self.requestheader_username_headers, &mut rh.username_headers),
                        (&self.requestheader_uid_headers, &mut rh.uid_headers),
                        (&self.requestheader_group_headers, &mut rh.group_headers),
                        (&self.requestheader_extra_headers_prefix, &mut rh.extra_headers_prefix),
                    ];
                    for (given, field) in overrides {
                        if let Some(given) = given {
                            *field = given.clone();
                        }
                    }
                    Some(rh)
                }
                Err(e) => {
                    check("requestheader-client-ca-file", Err(e));
                    None
                }
            },
            None => {
                if self.requestheader_allowed_names.is_some() {
                    check(
                        "requestheader-allowed-names",
                        Err("set without requestheader-client-ca-file, it would have no effect".into()),
                    );
                }
                None
            }
        };
        let delegate = match &self.delegate_url {
            Some(url) => match parse_delegate(url, self.delegate_ca_file.as_deref()) {
                Ok(d) => Some(d),
                Err(e) => {
                    check("delegate-url", Err(e));
                    None
                }
            },
            None => None,
        };
        let mut services = std::collections::HashMap::new();
        for entry in &self.services {
            match parse_service_entry(entry) {
                Ok((k, v)) => {
                    services.insert(k, v);
                }
                Err(e) => check("services", Err(format!("{entry:?}: {e}"))),
            }
        }
        let manifest_defaults = ManifestLimits::default();
        let manifest_limits = ManifestLimits {
            max_file_size: self.apiservices_max_file_size.unwrap_or(manifest_defaults.max_file_size),
            max_per_file: self.apiservices_max_per_file.unwrap_or(manifest_defaults.max_per_file),
            ..manifest_defaults
        };
        for (key, value) in [
            ("apiservices-max-file-size", manifest_limits.max_file_size as usize),
            ("apiservices-max-per-file", manifest_limits.max_per_file),
            ("max-connections", self.max_connections.unwrap_or(1)),
            ("http2-max-streams-per-connection", self.http2_max_streams_per_connection.unwrap_or(1) as usize),
            ("backend-max-connections-per-endpoint", self.backend_max_connections_per_endpoint.unwrap_or(1)),
            ("backend-max-header-list-size", self.backend_max_header_list_size.unwrap_or(1)),
        ] {
            if value == 0 {
                check(key, Err("must be greater than zero".into()));
            }
        }
        let source = match self.source.unwrap_or_default() {
            SourceKind::Files => Source::Files {
                dir: self.apiservices_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_APISERVICES_DIR)),
                services,
                limits: manifest_limits,
            },
            SourceKind::Cluster => {
                if !self.services.is_empty() {
                    check("services", Err("only used with source: files".into()));
                }
                if self.impersonation_allowed_groups.as_ref().is_some_and(|g| !g.is_empty()) {
                    check(
                        "impersonation-allowed-groups",
                        Err("only used with source: files; the cluster source asks kube-apiserver".into()),
                    );
                }
                Source::Cluster { kubeconfig: self.kubeconfig.clone() }
            }
        };
        // Durations where 0 is meaningful (and the default).
        let mut zero_or_more = |key: &str, value: &Option<String>| match value {
            None => Duration::ZERO,
            Some(v) => humantime::parse_duration(v).unwrap_or_else(|e| {
                check(key, Err(format!("{v:?}: {e}")));
                Duration::ZERO
            }),
        };
        let shutdown_delay = zero_or_more("shutdown-delay-duration", &self.shutdown_delay_duration);
        let shutdown_watch_grace =
            zero_or_more("shutdown-watch-termination-grace-period", &self.shutdown_watch_termination_grace_period);
        let mut duration = |key: &str, value: &Option<String>, default: Duration| match value {
            None => default,
            Some(v) => match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    check(key, Err("must be greater than zero".into()));
                    default
                }
                Err(e) => {
                    check(key, Err(format!("{v:?}: {e}")));
                    default
                }
            },
        };
        let backend_defaults = BackendSettings::default();
        let backend = BackendSettings {
            proxy_client_cert: crate::tls::ProxyClientCert::new(proxy_client_cert.as_ref())
                .map_err(|e| ConfigError(vec![format!("proxy-client-key-file: {e}")]))?,
            connect_timeout: duration(
                "backend-connect-timeout",
                &self.backend_connect_timeout,
                backend_defaults.connect_timeout,
            ),
            idle_timeout: duration("backend-idle-timeout", &self.backend_idle_timeout, backend_defaults.idle_timeout),
            http2_ping_interval: duration(
                "backend-http2-ping-interval",
                &self.backend_http2_ping_interval,
                backend_defaults.http2_ping_interval,
            ),
            http2_ping_timeout: duration(
                "backend-http2-ping-timeout",
                &self.backend_http2_ping_timeout,
                backend_defaults.http2_ping_timeout,
            ),
            max_connections_per_endpoint: self
                .backend_max_connections_per_endpoint
                .unwrap_or(backend_defaults.max_connections_per_endpoint),
            max_pending_per_endpoint: self
                .backend_max_pending_requests
                .unwrap_or(backend_defaults.max_pending_per_endpoint),
            max_header_list_size: self.backend_max_header_list_size.unwrap_or(backend_defaults.max_header_list_size),
            protocol: self.backend_protocol.unwrap_or(backend_defaults.protocol),
            ..backend_defaults
        };
        let token_review_cache_ttl = duration(
            "authentication-token-webhook-cache-ttl",
            &self.authentication_token_webhook_cache_ttl,
            crate::auth::tokenreview::DEFAULT_CACHE_TTL,
        );
        let authorization = AuthorizationSettings {
            aggregated: self.authorize_aggregated_requests.unwrap_or(true),
            impersonator_groups: self.impersonation_allowed_groups.clone().unwrap_or_default(),
            ttls: CacheTtls {
                allowed: duration(
                    "authorization-webhook-cache-authorized-ttl",
                    &self.authorization_webhook_cache_authorized_ttl,
                    crate::auth::authorization::DEFAULT_ALLOWED_TTL,
                ),
                denied: duration(
                    "authorization-webhook-cache-unauthorized-ttl",
                    &self.authorization_webhook_cache_unauthorized_ttl,
                    crate::auth::authorization::DEFAULT_DENIED_TTL,
                ),
            },
        };
        let frontend_defaults = FrontendSettings::default();

        let frontend = FrontendSettings {
            tls_handshake_timeout: duration(
                "tls-handshake-timeout",
                &self.tls_handshake_timeout,
                frontend_defaults.tls_handshake_timeout,
            ),
            request_header_timeout: duration(
                "request-header-timeout",
                &self.request_header_timeout,
                frontend_defaults.request_header_timeout,
            ),
            idle_connection_timeout: duration(
                "idle-connection-timeout",
                &self.idle_connection_timeout,
                frontend_defaults.idle_connection_timeout,
            ),
            shutdown_delay,
            shutdown_send_retry_after: self.shutdown_send_retry_after.unwrap_or(false),
            shutdown_watch_termination_grace_period: shutdown_watch_grace,
            max_connections: self.max_connections.unwrap_or(frontend_defaults.max_connections),
            max_connections_per_client: self
                .max_connections_per_client
                .unwrap_or(frontend_defaults.max_connections_per_client),
            http2_max_streams_per_connection: self
                .http2_max_streams_per_connection
                .unwrap_or(frontend_defaults.http2_max_streams_per_connection),
            runtime: self.runtime.unwrap_or_default(),
            ..frontend_defaults
        };
        let limit_defaults = RequestLimitSettings::default();
        let request_limits = RequestLimitSettings {
            request_timeout: duration("request-timeout", &self.request_timeout, limit_defaults.request_timeout),
            max_requests_inflight: self.max_requests_inflight.unwrap_or(limit_defaults.max_requests_inflight),
            max_mutating_requests_inflight: self
                .max_mutating_requests_inflight
                .unwrap_or(limit_defaults.max_mutating_requests_inflight),
        };
        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        let audit = self.audit(&mut errors);
        let tracing = self.tracing_config_file.as_deref().and_then(|path| {
            crate::telemetry::TracingSettings::load(path)
                .map_err(|e| errors.push(format!("tracing-config-file: {e}")))
                .ok()
        });
        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        Ok(Config {
            settings,
            listen: SocketAddr::new(
                self.bind_address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                self.secure_port.unwrap_or(DEFAULT_SECURE_PORT),
            ),
            serving,
            client_ca,
            token_file,
            anonymous_auth: self.anonymous_auth.unwrap_or(matches!(source, Source::Cluster { .. })),
            requestheader,
            proxy_client_cert,
            delegate,
            source,
            enable_aggregator_routing: self.enable_aggregator_routing.unwrap_or(false),
            reject_forwarding_redirects: self.aggregator_reject_forwarding_redirect.unwrap_or(true),
            backend,
            token_review_cache_ttl,
            authorization,
            frontend,
            request_limits,
            flow: FlowDefaults {
                max_requests_inflight: self.apiservice_max_requests_inflight.unwrap_or(0),
                requests_per_second: self.apiservice_requests_per_second.unwrap_or(0),
                burst: self.apiservice_burst.unwrap_or(0),
            },
            audit,
            tracing,
        })
    }

    /// Audit needs a policy and a log: kube writes nothing without a policy, so one without
    /// the other is a mistake worth naming.
    fn audit(&self, errors: &mut Vec<String>) -> Option<crate::audit::AuditSettings> {
        let (policy_file, path) = match (&self.audit_policy_file, &self.audit_log_path) {
            (None, None) => return None,
            (Some(policy), Some(path)) => (policy, path),
            (Some(_), None) => {
                errors.push("audit-policy-file: needs --audit-log-path, where the events go".into());
                return None;
            }
            (None, Some(_)) => {
                errors.push("audit-log-path: needs --audit-policy-file (without a policy nothing is recorded)".into());
                return None;
            }
        };
        let buffer_size = self.audit_log_batch_buffer_size.unwrap_or(crate::audit::log::DEFAULT_BUFFER_SIZE);
        if buffer_size == 0 {
            errors.push("audit-log-batch-buffer-size: must be a positive number".into());
        }
        let max_event_bytes = self.audit_log_truncate_max_event_size.unwrap_or(crate::audit::DEFAULT_MAX_EVENT_BYTES);
        if max_event_bytes == 0 {
            errors.push("audit-log-truncate-max-event-size: must be a positive number".into());
        }
        let policy = match crate::audit::Policy::load(policy_file) {
            Ok(p) => p,
            Err(e) => {
                errors.push(format!("audit-policy-file: {e}"));
                return None;
            }
        };
        Some(crate::audit::AuditSettings {
            policy,
            log: crate::audit::LogSettings {
                path: path.clone(),
                max_size_mb: self.audit_log_maxsize.unwrap_or(0),
                max_backups: self.audit_log_maxbackup.unwrap_or(0),
                max_age_days: self.audit_log_maxage.unwrap_or(0),
                buffer_size,
            },
            max_event_bytes,
        })
    }
}

fn loaded<T>(result: Result<T, crate::tls::TlsError>) -> Result<T, String> {
    result.map_err(|e| e.to_string())
}

/// `namespace/name:port=host:port[,host:port...]`: a service and its endpoints.
fn parse_service_entry(entry: &str) -> Result<(String, Vec<Authority>), String> {
    let (key, targets) = entry.split_once('=').ok_or("expected namespace/name:port=host:port")?;
    let (ns_name, port) = key.rsplit_once(':').ok_or("key must be namespace/name:port")?;
    let (ns, name) = ns_name.split_once('/').ok_or("key must be namespace/name:port")?;
    if ns.is_empty() || name.is_empty() {
        return Err("namespace and name must not be empty".into());
    }
    let port: u16 = port.parse().map_err(|_| format!("port {port:?} is not a number from 1 to 65535"))?;
    let mut endpoints = Vec::new();
    for target in targets.split(',').map(str::trim) {
        let authority: Authority = target.parse().map_err(|e| format!("target {target:?}: {e}"))?;
        if authority.port_u16().is_none() {
            return Err(format!("target {target:?} must be host:port"));
        }
        endpoints.push(authority);
    }
    Ok((format!("{ns}/{name}:{port}"), endpoints))
}

fn parse_delegate(url: &str, ca_file: Option<&Path>) -> Result<Delegate, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url:?}: must be an https:// URL"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| format!("{url:?}: no host"))?;
    let authority: Authority = match authority.port_u16() {
        Some(_) => authority,
        None => format!("{}:443", authority.host()).parse().map_err(|e| format!("{url:?}: {e}"))?,
    };
    let ca_bundle = match ca_file {
        Some(p) => std::fs::read(p).map_err(|e| format!("delegate-ca-file {}: {e}", p.display()))?,
        None => Vec::new(),
    };
    Ok(Delegate { server_name: authority.host().trim_matches(['[', ']']).to_owned(), authority, ca_bundle })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        let err = serde_yaml_ng::from_str::<Settings>("secure-prot: 1\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `secure-prot`"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_service_maps_add_up() {
        let file: Settings =
            serde_yaml_ng::from_str("secure-port: 1000\nanonymous-auth: true\nservices:\n  ns/a:443: 127.0.0.1:9000\n")
                .unwrap();
        let flags = Settings {
            secure_port: Some(2000),
            services: vec!["ns/b:443=127.0.0.1:9001".into()],
            ..Settings::default()
        };
        let config = file.merged_with(&flags).unwrap().validate().unwrap();
        assert_eq!(config.listen.port(), 2000);
        assert!(config.anonymous_auth);
        let Source::Files { services, .. } = config.source else { panic!() };
        assert_eq!(services.len(), 2);
        assert_eq!(services["ns/a:443"][0].as_str(), "127.0.0.1:9000");
    }

    #[test]
    fn every_problem_is_reported_at_once_by_key() {
        let settings = Settings {
            tls_cert_file: Some("/nonexistent/cert.pem".into()),
            client_ca_file: Some("/nonexistent/ca.pem".into()),
            services: vec!["bad".into()],
            delegate_url: Some("http://x".into()),
            backend_connect_timeout: Some("soon".into()),
            ..Settings::default()
        };
        let ConfigError(errors) = settings.validate().unwrap_err();
        let keys: Vec<_> = errors.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(keys, ["tls-cert-file", "client-ca-file", "delegate-url", "services", "backend-connect-timeout"]);
    }

    #[test]
    fn the_example_config_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/proxy.yaml");
        let settings = Settings::from_file(&path).unwrap();
        assert_eq!(settings.source, Some(SourceKind::Files));
    }
}

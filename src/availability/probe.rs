//! One availability check of one APIService, step by step, so a failure says which step failed
//! and why: resolution, TCP, TLS (with the names the certificate really carries), then the
//! discovery request kube-aggregator's availability controller makes.
//!
//! The same probe drives the background availability loop and the `check` command.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::apiservice::ApiService;
use crate::auth::identity::{inject, UserInfo};
use crate::backend::tls::{client_tls_config, describe_error};
use crate::backend::{BackendSettings, BackendTls};
use crate::routing::ResolveError;

/// kube-aggregator's availability probe gives a backend five seconds.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
pub const PROBE_USER: &str = "system:kube-aggregator";
pub const PROBE_GROUP: &str = "system:masters";

/// The `Available` condition's reasons, as kube-aggregator names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Reason {
    Local,
    Passed,
    ServiceNotFound,
    ServicePortError,
    MissingEndpoints,
    ServiceAccessError,
    FailedDiscoveryCheck,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Local,
        Reason::Passed,
        Reason::ServiceNotFound,
        Reason::ServicePortError,
        Reason::MissingEndpoints,
        Reason::ServiceAccessError,
        Reason::FailedDiscoveryCheck,
    ];

    /// The reason as kube writes it in the condition and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Local => "Local",
            Reason::Passed => "Passed",
            Reason::ServiceNotFound => "ServiceNotFound",
            Reason::ServicePortError => "ServicePortError",
            Reason::MissingEndpoints => "MissingEndpoints",
            Reason::ServiceAccessError => "ServiceAccessError",
            Reason::FailedDiscoveryCheck => "FailedDiscoveryCheck",
        }
    }
}

/// One step of a check and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// The outcome of a check: the condition it implies and the steps that led there.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub apiservice: String,
    pub available: bool,
    pub reason: Reason,
    pub message: String,
    pub steps: Vec<Step>,
}

impl Report {
    fn new(apiservice: &ApiService) -> Self {
        Self {
            apiservice: apiservice.name.to_string(),
            available: false,
            reason: Reason::FailedDiscoveryCheck,
            message: String::new(),
            steps: Vec::new(),
        }
    }

    /// Available, after the request step that showed it.
    pub(crate) fn passed(apiservice: &ApiService, detail: String) -> Self {
        let mut report = Self::new(apiservice);
        report.step("request", true, detail);
        report.available = true;
        report.reason = Reason::Passed;
        report.message = "all checks passed".into();
        report
    }

    /// Not available, for `reason`.
    pub(crate) fn failed(apiservice: &ApiService, reason: Reason, message: String) -> Self {
        let mut report = Self::new(apiservice);
        report.step("request", false, message.clone());
        report.fail(reason, message)
    }

    fn step(&mut self, name: &'static str, ok: bool, detail: impl Into<String>) {
        self.steps.push(Step { name, ok, detail: detail.into() });
    }

    fn fail(mut self, reason: Reason, message: String) -> Self {
        self.reason = reason;
        self.message = message;
        self
    }
}

fn discovery_path(apiservice: &ApiService) -> String {
    if apiservice.group.is_empty() {
        format!("/api/{}", apiservice.version)
    } else {
        format!("/apis/{}/{}", apiservice.group, apiservice.version)
    }
}

/// Advice for a status the backend answered the probe with.
fn explain_status(status: StatusCode, cn: &str) -> String {
    match status.as_u16() {
        401 => format!(
            "the backend did not authenticate the proxy: its --requestheader-client-ca-file must trust the proxy \
             client certificate (CN={cn}) and --requestheader-allowed-names must include that CN"
        ),
        403 => format!("the backend refused {PROBE_USER} (group {PROBE_GROUP}): check its authorization"),
        404 => "the backend does not serve this group/version".to_owned(),
        s if (300..400).contains(&s) => "the backend redirected the discovery request".to_owned(),
        _ => "the backend answered with an error".to_owned(),
    }
}

/// Checks one APIService the way the proxy would reach it, given how its service resolved.
pub async fn check(
    apiservice: &ApiService,
    resolved: Result<Vec<Authority>, ResolveError>,
    settings: &BackendSettings,
) -> Report {
    let mut report = Report::new(apiservice);
    let Some(service) = &apiservice.service else {
        report.step("local", true, "served by the delegate");
        report.available = true;
        report.reason = Reason::Local;
        report.message = "Local APIServices are always available".into();
        return report;
    };
    let targets = match resolved {
        Ok(t) if !t.is_empty() => t,
        Ok(_) | Err(ResolveError::NoEndpoints { .. }) => {
            report.step("resolve", false, format!("no ready endpoints for {}", service.key()));
            let message = format!("service/{} in {:?} has no ready endpoints", service.name, &*service.namespace);
            return report.fail(Reason::MissingEndpoints, message);
        }
        Err(e) => {
            report.step("resolve", false, e.to_string());
            let reason = match e {
                ResolveError::ServiceNotFound { .. } => Reason::ServiceNotFound,
                ResolveError::PortNotFound { .. } => Reason::ServicePortError,
                _ => Reason::ServiceAccessError,
            };
            let message = match reason {
                Reason::ServiceNotFound => {
                    format!("service/{} in {:?} is not present", service.name, &*service.namespace)
                }
                Reason::ServicePortError => {
                    format!(
                        "service/{} in {:?} is not listening on port {}",
                        service.name, &*service.namespace, service.port
                    )
                }
                _ => e.to_string(),
            };
            return report.fail(reason, message);
        }
    };
    report.step("resolve", true, format!("{} endpoint(s)", targets.len()));
    let tls = BackendTls::for_service(service);
    let server_name = tls.server_name.clone();
    // The step-by-step check reports a missing subjectAltName in its own steps; the serving
    // proxy counts it where its connections are made (the backend layer).
    let uncounted = prometheus_client::metrics::counter::Counter::default();
    let config = match client_tls_config(&tls, &settings.proxy_client_cert, uncounted) {
        Ok(c) => c,
        Err(e) => {
            report.step("tls-config", false, e.to_string());
            return report.fail(Reason::FailedDiscoveryCheck, e.to_string());
        }
    };
    let config = {
        let mut c = config;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    };
    let cn = settings
        .proxy_client_cert
        .leaf()
        .and_then(|leaf| crate::auth::x509::subject(&leaf).ok())
        .map(|s| s.common_name)
        .unwrap_or_else(|| "<none: no proxy client certificate configured>".into());
    let path = discovery_path(apiservice);
    let mut last = String::new();
    for target in &targets {
        match tokio::time::timeout(PROBE_TIMEOUT, probe_target(target.as_str(), &server_name, config.clone(), &path))
            .await
        {
            Err(_) => {
                report.step("request", false, format!("no answer within {PROBE_TIMEOUT:?}"));
                last = format!("timed out waiting for https://{server_name}{path}");
            }
            Ok(Err((step, detail))) => {
                report.step(step, false, detail.clone());
                last = format!("failing or missing response from https://{server_name}{path}: {detail}");
            }
            Ok(Ok(status)) if status.is_success() => {
                report.step("request", true, format!("GET {path}: {status}"));
                report.available = true;
                report.reason = Reason::Passed;
                report.message = "all checks passed".into();
                return report;
            }
            Ok(Ok(status)) => {
                report.step("request", false, format!("GET {path}: {status}: {}", explain_status(status, &cn)));
                last = format!("bad status from https://{server_name}{path}: {}", status.as_u16());
            }
        }
    }
    report.fail(Reason::FailedDiscoveryCheck, last)
}

/// TCP, TLS, then one HTTP/1.1 GET; an error names the step that failed.
async fn probe_target(
    target: &str,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<StatusCode, (&'static str, String)> {
    let tcp = TcpStream::connect(target).await.map_err(|e| ("tcp", describe_error(&e, server_name)))?;
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| ("tls", e.to_string()))?;
    let tls =
        TlsConnector::from(config).connect(name, tcp).await.map_err(|e| ("tls", describe_error(&e, server_name)))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| ("http", describe_error(&e, server_name)))?;
    tokio::spawn(connection);
    let mut request = Request::get(path)
        .header(http::header::HOST, server_name)
        .body(Empty::<Bytes>::new())
        .map_err(|e| ("http", e.to_string()))?;
    // A fixed ASCII identity: it always fits in a header.
    let _ = inject(&UserInfo::new(PROBE_USER, vec![PROBE_GROUP.to_owned()]), request.headers_mut());
    let response = sender.send_request(request).await.map_err(|e| ("request", describe_error(&e, server_name)))?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    Ok(status)
}

//! The proxy's own endpoints: health probes, metrics, discovery of the routing table and a
//! debug view of every APIService and why it is or is not served.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::discovery;
use crate::metrics::Metrics;
use crate::routing::writer::SharedTable;
use crate::routing::Upstream;
use crate::status::RequestError;

/// An object a source could not use, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    /// Where it came from: a file path or `cluster`.
    pub source: String,
    pub name: Option<String>,
    pub reason: String,
}

/// Rejections as the sources last reported them.
pub type SharedRejections = Arc<ArcSwap<Vec<Rejection>>>;

#[derive(Clone)]
pub struct EndpointState {
    pub table: SharedTable,
    pub metrics: Arc<Metrics>,
    pub ready: super::signal::Signal<bool>,
    pub rejections: SharedRejections,
    /// Aggregated discovery and OpenAPI, published by the background fetcher.
    pub discovery: discovery::DiscoveryDocuments,
    /// Whether a delegate (kube-apiserver) serves `apiregistration.k8s.io` behind the proxy.
    pub has_delegate: bool,
    /// The availability loop's conditions.
    pub availability: Arc<crate::availability::Availability>,
    /// Standalone mode: the proxy's own read-only `apiregistration.k8s.io/v1`.
    pub apiregistration: Option<Arc<super::apiregistration::Registry>>,
    /// The last credential reload, and why the newest files are not in use, if they are not.
    pub credentials: super::credentials::SharedReloadStatus,
    /// Graceful termination: `/readyz` fails as soon as it begins.
    pub lifecycle: super::signal::Signal<super::Lifecycle>,
}

/// Paths answered before authentication (probes).
pub fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/livez" | "/readyz")
}

pub fn router(state: EndpointState) -> Router {
    let apiregistration = state.apiregistration.clone();
    let router = Router::new()
        .route("/healthz", get(|uri: Uri| async move { health("healthz", &uri, &[("ping", Ok(()))], Vec::new) }))
        .route("/livez", get(|uri: Uri| async move { health("livez", &uri, &[("ping", Ok(()))], Vec::new) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/apis", get(apis))
        // As in kube, `/apis/` only ever answers the legacy list.
        .route("/apis/", get(apis_legacy))
        .route("/apis/{group}", get(group))
        .route("/apis/{group}/", get(group))
        .route("/debug/apiservices", get(debug_apiservices))
        .route("/version", get(version))
        .route("/openapi/v2", get(openapi_v2))
        .route("/openapi/v3", get(openapi_v3))
        .route("/openapi/v3/{*path}", get(openapi_v3_document))
        .fallback(not_found)
        .with_state(state);
    match apiregistration {
        Some(registry) => router.merge(super::apiregistration::router(registry)),
        None => router,
    }
}

/// Anything the router has no handler for: kube's NotFound Status, never a bare 404.
async fn not_found(uri: Uri) -> Response {
    RequestError::NotFound(format!(
        "the server could not find the requested resource: no handler for path {:?}",
        uri.path()
    ))
    .into_response()
}

/// kube's health output: `ok`, or with `?verbose` a `[+]name ok` line per check and
/// `<endpoint> check passed`; a failing check is `[-]name failed: <why>` and the answer 503.
/// `informational` lines are printed with `?verbose` but never change the answer.
fn health(
    endpoint: &str,
    uri: &Uri,
    checks: &[(&str, Result<(), &str>)],
    informational: impl FnOnce() -> Vec<String>,
) -> Response {
    let passed = checks.iter().all(|(_, r)| r.is_ok());
    let verbose = uri.query().is_some_and(|q| q.split('&').any(|p| p == "verbose" || p.starts_with("verbose=")));
    let code = if passed { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    if passed && !verbose {
        return "ok".into_response();
    }
    let mut body = String::new();
    for (name, result) in checks {
        match result {
            Ok(()) => body.push_str(&format!("[+]{name} ok\n")),
            Err(why) => body.push_str(&format!("[-]{name} failed: {why}\n")),
        }
    }
    for line in informational() {
        body.push_str(&line);
        body.push('\n');
    }
    body.push_str(&format!("{endpoint} check {}\n", if passed { "passed" } else { "failed" }));
    (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn readyz(State(state): State<EndpointState>, uri: Uri) -> Response {
    let table = if state.ready.get() { Ok(()) } else { Err("routing table and discovery not built yet") };
    let serving =
        if state.lifecycle.get() == super::Lifecycle::Serving { Ok(()) } else { Err("the server is shutting down") };
    // Each APIService's availability, for people reading the probe: one dead extension server
    // must not take every replica out of rotation, so these never fail readiness.
    let informational = || {
        let table = state.table.load();
        let routes = table.groups().iter().flat_map(|g| g.versions.iter());
        routes
            .map(|route| {
                let name = &route.apiservice.name;
                match state.availability.condition(name) {
                    Some(c) if c.status == "True" => format!("[+]informational/apiservice/{name} available"),
                    Some(c) => format!(
                        "[-]informational/apiservice/{name} unavailable ({:?}): {} (does not affect readiness)",
                        c.reason, c.message
                    ),
                    None => format!("[-]informational/apiservice/{name} not checked yet (does not affect readiness)"),
                }
            })
            .collect()
    };
    health("readyz", &uri, &[("ping", Ok(())), ("routing-table", table), ("shutdown", serving)], informational)
}

async fn metrics(State(state): State<EndpointState>) -> Response {
    ([(header::CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], state.metrics.encode())
        .into_response()
}

/// `/apis`: the aggregated document when `Accept` asks for it, else the legacy list.
async fn apis(State(state): State<EndpointState>, headers: HeaderMap) -> Response {
    match discovery::handlers::aggregated(&state.discovery, &headers) {
        Some(response) => response,
        None => apis_legacy(State(state)).await,
    }
}

async fn apis_legacy(State(state): State<EndpointState>) -> Response {
    let list = discovery::api_group_list(&state.table.load());
    // apiregistration.k8s.io is always served: by kube-apiserver behind the proxy, or by the
    // proxy itself in standalone mode.
    Json(discovery::with_aggregator_group(list)).into_response()
}

async fn openapi_v2(State(state): State<EndpointState>, headers: HeaderMap) -> Response {
    discovery::handlers::openapi_v2(&state.discovery, &headers)
}

async fn openapi_v3(State(state): State<EndpointState>, headers: HeaderMap) -> Response {
    discovery::handlers::openapi_v3_root(&state.discovery, &headers)
}

async fn openapi_v3_document(
    State(state): State<EndpointState>,
    Path(path): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    discovery::handlers::openapi_v3_document(&state.discovery, &path, &uri, &headers)
}

async fn group(State(state): State<EndpointState>, Path(group): Path<String>) -> Response {
    match discovery::api_group_document(&state.table.load(), &group) {
        Some(doc) => Json(doc).into_response(),
        None => RequestError::NotFound(format!(
            "the server could not find the requested resource: no APIService serves group {group:?}"
        ))
        .into_response(),
    }
}

async fn version() -> Response {
    Json(serde_json::json!({
        // The proxy's own version (standalone; cluster mode forwards /version to kube-apiserver).
        "major": env!("CARGO_PKG_VERSION_MAJOR"),
        "minor": env!("CARGO_PKG_VERSION_MINOR"),
        "gitVersion": concat!("v", env!("CARGO_PKG_VERSION"), "-kube-aggregation-proxy"),
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    }))
    .into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiServiceView {
    name: String,
    group: String,
    version: String,
    group_priority_minimum: i32,
    version_priority: i32,
    service: Option<String>,
    served: bool,
    reason: String,
    /// The `Available` condition from this proxy's own probes.
    available: Option<crate::availability::Condition>,
    /// Flow control and long-running subresources from the APIService's annotations.
    #[serde(skip_serializing_if = "crate::apiservice::TrafficPolicy::is_empty")]
    policy: crate::apiservice::TrafficPolicy,
}

/// Every APIService the table holds and every object a source rejected, with the reason:
/// the first place to look when an aggregated API does not answer.
async fn debug_apiservices(State(state): State<EndpointState>) -> Response {
    let table = state.table.load();
    let mut views = Vec::new();
    for group in table.groups() {
        for route in &group.versions {
            let a = &route.apiservice;
            let (served, reason) = match &route.upstream {
                Upstream::Local => (true, "Local".to_owned()),
                Upstream::Remote(remote) => match (&remote.backend, &remote.endpoints) {
                    (Err(e), _) => (false, e.to_string()),
                    (_, Err(e)) => (false, e.to_string()),
                    (Ok(_), Ok(endpoints)) => (true, format!("{} endpoint(s)", endpoints.all().len())),
                },
            };
            views.push(ApiServiceView {
                name: a.name.to_string(),
                group: a.group.to_string(),
                version: a.version.to_string(),
                group_priority_minimum: a.group_priority_minimum,
                version_priority: a.version_priority,
                service: a.service.as_ref().map(|s| s.key()),
                served,
                reason,
                available: state.availability.condition(&a.name),
                policy: a.policy.clone(),
            });
        }
    }
    Json(serde_json::json!({
        "generation": table.generation,
        "apiservices": views,
        "rejected": **state.rejections.load(),
        "credentials": **state.credentials.load(),
    }))
    .into_response()
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        RequestError::into_response(self)
    }
}

//! One request through the sample server, top to bottom: health endpoints answer without
//! authentication (kubelet probes carry no identity); everything else must come from an
//! aggregation proxy, proven by its requestheader client certificate, with the user in
//! `X-Remote-*` headers; then the path picks discovery, node metrics or the echo API. Every
//! failure is answered with a Kubernetes `Status` body, as k8s.io/apiserver does.

use std::sync::{Arc, LazyLock};

use crate::auth::x509::PeerChain;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, VARY};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde::Serialize;
use tokio::sync::watch;

use super::discovery::{self, GROUP_ECHO, GROUP_METRICS, VERSION_ECHO, VERSION_METRICS};
use super::echo;
use super::node_metrics::{MetricsList, NodeMetrics, Sampler};
use super::openapi;
use crate::auth::requestheader::RequestHeaderAuthenticator;
use crate::auth::{Authenticator, Credentials, UserInfo};
use crate::discovery::aggregated::{negotiate, Negotiated};
use crate::discovery::published::Published;
use crate::status::{Status, StatusDetails};

/// Every response body: whole documents and watch streams alike (the proxy's body type, so
/// the proxy's front end serves the sample server too).
pub type ResponseBody = axum::body::Body;

/// Paths answered `ok` without authentication, as kube's health checks are.
pub const HEALTH_PATHS: &[&str] = &["/healthz", "/livez", "/readyz"];

/// The largest request body the echo API reads back.
pub const MAX_ECHO_BODY_BYTES: usize = 4 * 1024 * 1024;

const APPLICATION_JSON: &str = "application/json";

/// A `Status` failure response, as kube-apiserver writes it: the proxy's own [`Status`].
pub fn status_response(
    code: StatusCode,
    reason: &'static str,
    message: &str,
    details: Option<StatusDetails>,
) -> Response<ResponseBody> {
    let mut status = Status::failure(code, reason, message);
    status.details = details;
    status.into_response()
}

fn respond(code: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::from(body.into()));
    *response.status_mut() = code;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response<T: Serialize>(value: &T) -> Response<ResponseBody> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(StatusCode::OK, APPLICATION_JSON, body),
        Err(error) => {
            tracing::error!(%error, "serializing a response");
            internal_error()
        }
    }
}

fn unauthorized() -> Response<ResponseBody> {
    status_response(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized", None)
}

fn not_found() -> Response<ResponseBody> {
    status_response(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource", None)
}

fn object_not_found(group: &str, resource: &str, name: &str) -> Response<ResponseBody> {
    let message = format!("{resource}.{group} \"{name}\" not found");
    let details = StatusDetails {
        name: Some(name.to_owned()),
        group: Some(group.to_owned()),
        kind: Some(resource.to_owned()),
        ..StatusDetails::default()
    };
    status_response(StatusCode::NOT_FOUND, "NotFound", &message, Some(details))
}

fn method_not_allowed() -> Response<ResponseBody> {
    status_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        None,
    )
}

fn internal_error() -> Response<ResponseBody> {
    status_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        "an error on the server prevented the request from succeeding",
        None,
    )
}

/// The request handler shared by every connection.
pub struct Handler {
    authenticator: RequestHeaderAuthenticator,
    node_name: String,
    sampler: Arc<Sampler>,
    stop: watch::Receiver<bool>,
}

impl Handler {
    pub fn new(
        authenticator: RequestHeaderAuthenticator,
        node_name: String,
        sampler: Arc<Sampler>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self { authenticator, node_name, sampler, stop }
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Answers one request; `peer` is the chain the TLS client presented.
    pub async fn handle<B>(&self, request: Request<B>, peer: &PeerChain) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // 1. Health first: probes carry no identity.
        if HEALTH_PATHS.contains(&request.uri().path()) {
            return respond(StatusCode::OK, "text/plain; charset=utf-8", "ok");
        }

        // 2. Only a proxy holding a requestheader client certificate may assert a user.
        let credentials = Credentials { peer, headers: request.headers() };
        let user = match self.authenticator.authenticate(credentials) {
            Ok(Some(user)) => crate::auth::identity::with_authenticated_group(user),
            Ok(None) => {
                tracing::debug!(path = request.uri().path(), "no front-proxy certificate or no username header");
                return unauthorized();
            }
            Err(error) => {
                tracing::debug!(path = request.uri().path(), %error, "front-proxy authentication failed");
                return unauthorized();
            }
        };

        // 3. Route by path.
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            ["apis"] | ["apis", ""] => get_only(request.method(), || self.apis(request.headers())),
            ["openapi", "v2"] => get_only(request.method(), || document(&openapi::DOCUMENTS.v2, request.headers())),
            ["openapi", "v3"] => {
                get_only(request.method(), || document(&openapi::DOCUMENTS.v3_root, request.headers()))
            }
            ["openapi", "v3", rest @ ..] => match openapi::DOCUMENTS.v3.get(&rest.join("/")) {
                Some(doc) => get_only(request.method(), || document(doc, request.headers())),
                None => not_found(),
            },
            ["apis", GROUP_ECHO, VERSION_ECHO, _, ..] => self.echo(request, &user).await,
            ["apis", group] | ["apis", group, ""] => match discovery::served_group(group) {
                Some(served) => get_only(request.method(), || json_response(&discovery::api_group(served))),
                None => not_found(),
            },
            ["apis", group, version] | ["apis", group, version, ""] => {
                match discovery::served_group(group).filter(|g| g.version == *version) {
                    Some(served) => get_only(request.method(), || json_response(&discovery::api_resource_list(served))),
                    None => not_found(),
                }
            }
            ["apis", GROUP_METRICS, VERSION_METRICS, rest @ ..] => get_only(request.method(), || self.metrics(rest)),
            _ => not_found(),
        }
    }

    /// `/apis`: the legacy `APIGroupList`, or the aggregated document (with an `ETag`, so the
    /// proxy's periodic refetch is answered 304) when asked for.
    fn apis(&self, headers: &http::HeaderMap) -> Response<ResponseBody> {
        /// The aggregated document never changes: serialized and hashed once.
        static AGGREGATED: LazyLock<Published> = LazyLock::new(|| {
            let body = serde_json::to_vec(&discovery::aggregated_discovery()).unwrap_or_default();
            Published::new(discovery::AGGREGATED_DISCOVERY_CONTENT_TYPE, body)
        });
        match negotiate(headers) {
            Negotiated::AggregatedV2 => AGGREGATED.respond(headers),
            Negotiated::Legacy => {
                let mut response = json_response(&discovery::api_group_list());
                response.headers_mut().insert(VARY, HeaderValue::from_static("Accept"));
                response
            }
        }
    }

    /// `/apis/metrics.k8s.io/v1beta1/<rest>`.
    fn metrics(&self, rest: &[&str]) -> Response<ResponseBody> {
        match rest {
            ["nodes"] => match self.sampler.usage() {
                Ok(usage) => {
                    json_response(&MetricsList::new("NodeMetricsList", vec![NodeMetrics::new(&self.node_name, &usage)]))
                }
                Err(error) => {
                    tracing::warn!(%error, "reading node metrics");
                    internal_error()
                }
            },
            ["nodes", name] if *name == self.node_name => match self.sampler.usage() {
                Ok(usage) => json_response(&NodeMetrics::new(&self.node_name, &usage)),
                Err(error) => {
                    tracing::warn!(%error, "reading node metrics");
                    internal_error()
                }
            },
            ["nodes", name] => object_not_found(GROUP_METRICS, "nodes", name),
            // No pods run here: lists are empty and every named pod is unknown.
            ["pods"] | ["namespaces", _, "pods"] => {
                json_response(&MetricsList::<()>::new("PodMetricsList", Vec::new()))
            }
            ["namespaces", _, "pods", name] => object_not_found(GROUP_METRICS, "pods", name),
            _ => not_found(),
        }
    }

    /// `/apis/echo.example.com/v1/...`: the request described back, or a watch stream of it.
    async fn echo<B>(&self, request: Request<B>, user: &UserInfo) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let query = match echo::parse_query(request.uri().query()) {
            Ok(query) => query,
            Err(message) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &message, None),
        };
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_ECHO_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                let message = format!("request body larger than {MAX_ECHO_BODY_BYTES} bytes");
                return status_response(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge", &message, None);
            }
            Err(error) => {
                tracing::debug!(%error, "reading the request body");
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the request body could not be read",
                    None,
                );
            }
        };
        let description = echo::describe(&parts, user, &body);
        if !query.watch {
            return json_response(&description);
        }
        let mut response = Response::new(echo::watch_body(description, query.timeout, self.stop.clone()));
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(APPLICATION_JSON));
        response
    }
}

/// A JSON document with its `ETag`; `304` when `If-None-Match` names it.
fn document(doc: &Published, headers: &http::HeaderMap) -> Response<ResponseBody> {
    doc.respond_with_cache_control(headers, HeaderValue::from_static("no-cache, private"))
}

/// Discovery and metrics are read-only.
fn get_only(method: &Method, answer: impl FnOnce() -> Response<ResponseBody>) -> Response<ResponseBody> {
    if method == Method::GET || method == Method::HEAD {
        answer()
    } else {
        method_not_allowed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::requestheader::RequestHeaderConfig;
    use crate::auth::x509::ChainVerifier;
    use crate::pki::CertificateAuthority;

    struct Fixture {
        handler: Handler,
        proxy_chain: Vec<rustls_pki_types::CertificateDer<'static>>,
        _stop: watch::Sender<bool>,
    }

    fn fixture() -> Fixture {
        let ca = CertificateAuthority::new("front-proxy-ca").unwrap();
        let verifier = ChainVerifier::from_pem(ca.cert_pem().as_bytes(), "front-proxy-ca").unwrap();
        let config = RequestHeaderConfig::with_default_headers(verifier, vec!["front-proxy-client".into()]);
        let proxy_chain = ca.issue_client("front-proxy-client", &[]).unwrap().certified_key().unwrap().chain;
        let (stop_tx, stop) = watch::channel(false);
        let handler = Handler::new(RequestHeaderAuthenticator::new(config), "node-a".into(), Sampler::new(), stop);
        Fixture { handler, proxy_chain, _stop: stop_tx }
    }

    async fn call(
        f: &Fixture,
        request: Request<http_body_util::Full<Bytes>>,
        as_proxy: bool,
    ) -> (StatusCode, serde_json::Value) {
        let chain = PeerChain::new(if as_proxy { f.proxy_chain.clone() } else { Vec::new() });
        let response = f.handler.handle(request, &chain).await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::String(String::from_utf8_lossy(&body).into())),
        )
    }

    fn get(path: &str, user: Option<&str>) -> Request<http_body_util::Full<Bytes>> {
        let mut builder = Request::get(path);
        if let Some(user) = user {
            builder = builder.header("X-Remote-User", user);
        }
        builder.body(http_body_util::Full::default()).unwrap()
    }

    #[tokio::test]
    async fn health_endpoints_answer_without_authentication() {
        let f = fixture();
        for path in HEALTH_PATHS {
            assert_eq!(call(&f, get(path, None), false).await, (StatusCode::OK, "ok".into()));
        }
    }

    #[tokio::test]
    async fn a_caller_without_the_proxy_certificate_or_a_username_is_unauthorized() {
        let f = fixture();
        let expected: serde_json::Value = serde_json::from_str(
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#,
        )
        .unwrap();
        assert_eq!(call(&f, get("/apis", Some("alice")), false).await, (StatusCode::UNAUTHORIZED, expected.clone()));
        assert_eq!(call(&f, get("/apis", None), true).await, (StatusCode::UNAUTHORIZED, expected));
    }

    #[tokio::test]
    async fn discovery_paths_answer_their_documents() {
        let f = fixture();
        let (status, body) = call(&f, get("/apis", Some("alice")), true).await;
        assert_eq!((status, body["kind"].as_str()), (StatusCode::OK, Some("APIGroupList")));
        let (_, body) = call(&f, get("/apis/metrics.k8s.io", Some("alice")), true).await;
        assert_eq!(body["kind"], "APIGroup");
        let (_, body) = call(&f, get("/apis/echo.example.com/v1", Some("alice")), true).await;
        assert_eq!(body["resources"][0]["name"], "echoes");
        let (status, _) = call(&f, get("/apis/unknown.example.com", Some("alice")), true).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&f, get("/apis/metrics.k8s.io/v2", Some("alice")), true).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let post =
            Request::post("/apis").header("X-Remote-User", "alice").body(http_body_util::Full::default()).unwrap();
        assert_eq!(call(&f, post, true).await.0, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn unknown_pods_are_not_found_with_details() {
        let f = fixture();
        let (status, body) =
            call(&f, get("/apis/metrics.k8s.io/v1beta1/namespaces/ns/pods/p", Some("alice")), true).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["message"], "pods.metrics.k8s.io \"p\" not found");
        assert_eq!(body["details"], serde_json::json!({"name": "p", "group": "metrics.k8s.io", "kind": "pods"}));
        let (status, body) = call(&f, get("/apis/metrics.k8s.io/v1beta1/pods", Some("alice")), true).await;
        assert_eq!(
            (status, body["kind"].as_str(), body["items"].as_array().map(Vec::len)),
            (StatusCode::OK, Some("PodMetricsList"), Some(0))
        );
    }

    #[tokio::test]
    async fn echo_reports_the_authenticated_user_with_the_authenticated_group() {
        let f = fixture();
        let request = Request::put("/apis/echo.example.com/v1/namespaces/ns/echoes/x?dryRun=All")
            .header("X-Remote-User", "alice")
            .header("X-Remote-Group", "dev")
            .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let (status, body) = call(&f, request, true).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["method"], "PUT");
        assert_eq!(body["query"], "dryRun=All");
        assert_eq!(body["user"]["groups"], serde_json::json!(["dev", "system:authenticated"]));
        assert_eq!(body["body"], "{}");
        let (status, body) = call(&f, get("/apis/echo.example.com/v1/x?watch=maybe", Some("alice")), true).await;
        assert_eq!((status, body["reason"].as_str()), (StatusCode::BAD_REQUEST, Some("BadRequest")));
    }
}

//! The request path, top to bottom.
//!
//! 0. With tracing on, the request's server span starts (under the client's `traceparent`);
//!    its phases below are child spans, and it ends with the response body.
//! 1. Probes answer first, unauthenticated, so load balancers need no credentials.
//! 2. Classify (kube's RequestInfo) and start the request deadline: everything after this,
//!    authentication included, must finish within `--request-timeout` unless the request is
//!    long-running, as in kube-apiserver's filter chain.
//! 3. Authenticate, read the impersonation headers, then strip every identity header the
//!    client sent (X-Remote-*, Impersonate-*, Authorization) before anything can forward them.
//!    With audit on, the policy judges the authenticated request here and `RequestReceived`
//!    is written (or, for a failed authentication, its one `ResponseStarted` event).
//! 4. Impersonate, when asked and allowed (kube's rules, `crate::auth::impersonation`): the
//!    identity the backend will see is decided by these two steps and nowhere else.
//! 5. The in-flight limits, which need the user (system:masters is never refused).
//! 6. Resolve the route with one `load_full()` of the table: no lock, no guard held across an
//!    await, and one consistent table for the whole request.
//! 7. Authorize (cluster mode) the proxy's own endpoints and requests to extension servers;
//!    the delegate authorizes what it serves itself.
//! 8. Forward to the backend or the delegate with that identity injected, or answer from the
//!    proxy's own endpoints.
//! 9. Log and count (kube's verb; per APIService by the series its route holds), with the
//!    Audit-ID the backend also saw. The response body carries the connection's activity
//!    guard, the in-flight permits, the deadline, the audit record (`ResponseComplete`) and
//!    the server span until it is sent.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use tower::ServiceExt;

use super::connection::{ActivityGuard, BodyGuards, CloseOnDrain, GuardedBody};
use super::credentials::SharedFrontEnd;
use super::endpoints;
use super::flow::FlowControl;
use super::limits::{RequestClass, RequestLimits};
use super::request_info::{method_metric_verb, RequestInfo};
use super::ConnectionInfo;
use crate::audit::event::ResponseStatus;
use crate::audit::{Auditor, RequestAudit, RequestHead};
use crate::auth::authorization::{Attributes, Authorization, AuthorizationError};
use crate::auth::impersonation::{self, Impersonation};
use crate::auth::{Credentials, UserInfo};
use crate::backend::{Endpoints, SendOptions};
use crate::metrics::{ApiServiceSeries, Metrics, RequestTarget};
use crate::proxy::{self, Caller, ForwardSettings, Target, HEADER_AUDIT_ID};
use crate::routing::path::{classify, ApiPath};
use crate::routing::writer::SharedTable;
use crate::routing::{Route, RoutingTable, Upstream};
use crate::status::RequestError;
use crate::telemetry::{RequestTrace, Tracing};

/// The local delegate: kube-apiserver in cluster mode.
#[derive(Debug)]
pub struct DelegateTarget {
    pub endpoints: Endpoints,
}

/// Everything the request path needs, shared by all connections.
pub struct Gateway {
    pub table: SharedTable,
    /// The TLS configuration and authenticators in force (reloaded when their files change).
    pub front: SharedFrontEnd,
    pub forward: ForwardSettings,
    pub delegate: Option<DelegateTarget>,
    pub metrics: Arc<Metrics>,
    /// Whether the first routing table and discovery are in.
    pub ready: super::signal::Signal<bool>,
    pub endpoints: axum::Router,
    /// Impersonation and, in cluster mode, kube-apiserver's authorization of the proxy's own
    /// endpoints and of requests to extension servers.
    pub authorization: Authorization,
    /// The request deadline and the in-flight limits.
    pub limits: RequestLimits,
    /// Per-APIService in-flight limits and token buckets (opt-in).
    pub flow: FlowControl,
    /// The fetched discovery and OpenAPI documents, to know which the proxy can answer.
    pub documents: crate::discovery::DiscoveryDocuments,
    /// Graceful termination: where the server is, `--shutdown-send-retry-after` and
    /// `--shutdown-watch-termination-grace-period`.
    pub lifecycle: super::signal::Signal<super::Lifecycle>,
    pub send_retry_after: bool,
    pub watch_grace: std::time::Duration,
    /// `--audit-policy-file` and `--audit-log-*`, when audit is on.
    pub audit: Option<Arc<Auditor>>,
    /// `--tracing-config-file`, when tracing is on.
    pub tracing: Option<Arc<Tracing>>,
}

/// What every step of one request reads: where it came from, the table it is routed by, its
/// deadline, and the Audit-ID the backend sees.
struct RequestContext<'a> {
    conn: &'a ConnectionInfo,
    /// When the request arrived, for audit's timestamps (read only when audit is on).
    received: Option<std::time::SystemTime>,
    /// The request's server span, when tracing is on.
    trace: Option<&'a RequestTrace>,
    table: &'a RoutingTable,
    send: SendOptions,
    audit_id: &'a HeaderValue,
}

/// What the steps of one request leave for its accounting and its response body.
struct Outcome {
    /// Who answered it.
    target: RequestTarget,
    /// The APIService that routed it, if any (for the log).
    apiservice: Option<Arc<str>>,
    /// A remote APIService's request series, when it was routed to one.
    series: Option<Arc<ApiServiceSeries>>,
    /// The request's audit record, when the policy records it. Boxed: it is large, and the
    /// request's future and response body, which carry it, are moved on every request.
    audit: Option<Box<RequestAudit>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The APIService's own flow-control place, when it has limits.
    apiservice_permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Where the pipeline decided to send a request.
enum Decision {
    Own,
    /// The route `decide` found, so forwarding does not look it up again.
    Remote {
        route: Arc<Route>,
        discovery: bool,
    },
    Delegate {
        /// The local APIService, if one routed it here.
        apiservice: Option<Arc<str>>,
    },
}

const DELEGATE_LABEL: &str = "delegate";
const NO_CACHE_PRIVATE: HeaderValue = HeaderValue::from_static("no-cache, private");

/// The client's Audit-ID when it sent a usable one, else a new v4 UUID, as a header value
/// made once and shared by the backend request and the response. Either way it is new with
/// each request, so HPACK does not index it ([`proxy::not_indexed`]).
fn audit_id(request: &Request<Body>) -> HeaderValue {
    if let Some(v) = request.headers().get(HEADER_AUDIT_ID) {
        if v.to_str().is_ok_and(|s| !s.is_empty() && s.len() <= 128) {
            return proxy::not_indexed(v.clone());
        }
    }
    // From the thread-local CSPRNG: `Uuid::new_v4` makes a getrandom(2) syscall per request.
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let value = HeaderValue::from_str(uuid.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    proxy::not_indexed(value)
}

impl Gateway {
    pub async fn handle(
        &self,
        conn: &ConnectionInfo,
        activity: ActivityGuard,
        request: Request<Incoming>,
    ) -> Response<GuardedBody> {
        let started = Instant::now();
        let received = self.audit.as_ref().map(|_| std::time::SystemTime::now());
        // Boxed once here; forwarding passes the same box on.
        let request = request.map(Body::new);
        let method = request.method().clone();
        let audit_id = audit_id(&request);
        let trace =
            self.tracing.as_ref().map(|t| t.request(&request, conn.remote_addr, audit_id.to_str().unwrap_or_default()));
        let mut outcome = Outcome {
            target: RequestTarget::Proxy,
            apiservice: None,
            series: None,
            audit: None,
            permit: None,
            apiservice_permit: None,
        };
        let mut verb = method_metric_verb(method.as_str());
        // One table for the whole request.
        let table = self.table.load_full();
        let mut deadline = None;
        let mut long_running = false;
        let draining = self.send_retry_after && self.lifecycle.get() == super::Lifecycle::Draining;

        let mut response = if endpoints::is_probe(request.uri().path()) {
            Box::pin(self.own(request)).await
        } else if draining {
            // Told to go elsewhere; HTTP/1.1 clients also to drop this connection.
            let mut refused = RequestError::ShuttingDown.into_response();
            if request.version() < http::Version::HTTP_2 {
                refused.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            refused
        } else {
            match self.limits.classify(&request, |info| long_running_by_annotation(&table, info)) {
                Err(e) => e.into_response(),
                Ok(class) => {
                    long_running = class.long_running;
                    verb = class.verb;
                    let until = class.timeout.map(|t| tokio::time::Instant::from_std(started) + t);
                    let send = SendOptions { deadline: until, long_running: class.long_running, report: false };
                    let ctx = RequestContext {
                        conn,
                        received,
                        trace: trace.as_ref(),
                        table: &table,
                        send,
                        audit_id: &audit_id,
                    };
                    // Boxed: hyper moves each request's future into a task of its own, and
                    // tokio copies a task's whole future into place when it starts and ends.
                    // Inline, the forwarding path made that 6.9 KiB, copied three times per
                    // request; boxed, it is written once.
                    let work = Box::pin(self.admitted(ctx, &class, &mut outcome, request));
                    match until {
                        None => work.await,
                        Some(until) => {
                            match tokio::time::timeout_at(until, work).await {
                                Ok(response) => {
                                    // The body must be sent by the same deadline; an answer made
                                    // at the deadline (the backend layer's own 504) is sent whole.
                                    deadline = Some(until).filter(|d| *d > tokio::time::Instant::now());
                                    response
                                }
                                Err(_) => {
                                    self.metrics.request_timed_out();
                                    RequestError::Timeout.into_response()
                                }
                            }
                        }
                    }
                }
            }
        };

        if method == http::Method::HEAD {
            // A HEAD answer has headers only. hyper drops the body for HTTP/1.1 but sends it
            // on HTTP/2, where DATA on a HEAD stream is a protocol error that fails the
            // client's request: Go's server, kube-apiserver's, drops it on both.
            response = response.map(|_| Body::empty());
        }
        response.headers_mut().insert(HEADER_AUDIT_ID, audit_id.clone());
        if let Some(audit) = outcome.audit.as_mut() {
            response = audit.respond(response);
        }
        // kube-apiserver's WithCacheControl: every answer not marked otherwise is private.
        response.headers_mut().entry(http::header::CACHE_CONTROL).or_insert(NO_CACHE_PRIVATE);
        let code = response.status().as_u16();
        if let Some(trace) = &trace {
            trace.respond(code);
        }
        let elapsed = started.elapsed();
        self.metrics.request(outcome.target, verb, code, elapsed);
        if let Some(series) = &outcome.series {
            series.observe(verb, code, elapsed);
        }
        tracing::debug!(%method, apiservice = outcome.apiservice.as_deref().unwrap_or_default(), code, audit_id = audit_id.to_str().unwrap_or_default(), ?elapsed, "request");
        let close_on_drain = long_running.then(|| CloseOnDrain::new(self.lifecycle.clone(), self.watch_grace));
        let guards =
            BodyGuards { activity, permits: [outcome.permit, outcome.apiservice_permit], audit: outcome.audit, trace };
        response.map(|body| GuardedBody::new(body, guards, deadline, close_on_drain))
    }

    /// Authentication, the in-flight limits, then routing and forwarding: the part of a
    /// request that runs under its deadline.
    async fn admitted(
        &self,
        ctx: RequestContext<'_>,
        class: &RequestClass,
        outcome: &mut Outcome,
        mut request: Request<Body>,
    ) -> Response<Body> {
        let authenticating = ctx.trace.map(|t| t.phase("authenticate"));
        let authenticated = self.authenticated(ctx.conn, &mut request).await;
        drop(authenticating);
        let (user, impersonation) = match authenticated {
            Ok(found) => found,
            Err(e) => {
                let response = e.into_response();
                if let Some(auditor) = &self.audit {
                    let status = response.extensions().get::<ResponseStatus>().cloned().unwrap_or_default();
                    auditor.unauthenticated(&audit_head(&ctx, &request), status);
                }
                return response;
            }
        };
        if let Some(auditor) = &self.audit {
            outcome.audit = auditor.begin(&audit_head(&ctx, &request), &user).map(Box::new);
        }
        let user = match impersonation {
            None => user,
            // Rare, and a SubjectAccessReview per check: boxed, off the common future.
            Some(asked) => match Box::pin(self.impersonate(&user, asked, attributes(&request), ctx.trace)).await {
                Ok(impersonated) => {
                    if let Some(audit) = outcome.audit.as_mut() {
                        audit.impersonated(&impersonated);
                    }
                    Arc::new(impersonated)
                }
                Err(e) => return RequestError::from(e).into_response(),
            },
        };
        if let Some(audit) = &outcome.audit {
            request = audit.record_request_body(request);
        }
        match self.limits.admit(class, &user) {
            Ok(permit) => outcome.permit = permit,
            Err(kind) => {
                self.metrics.inflight_rejected(kind.label());
                return RequestError::TooManyRequests.into_response();
            }
        }
        self.route_and_forward(&ctx, &user, outcome, request).await
    }

    /// The authenticated user and what it asks to impersonate, with the identity headers gone.
    async fn authenticated(
        &self,
        conn: &ConnectionInfo,
        request: &mut Request<Body>,
    ) -> Result<(Arc<UserInfo>, Option<Impersonation>), RequestError> {
        let front = self.front.load_full();
        let credentials = Credentials { peer: &conn.peer, headers: request.headers() };
        let result = front.auth.authenticate(credentials).await;
        self.metrics.authentication(result.is_ok());
        let user = result.inspect_err(|e| {
            tracing::info!(remote = %conn.remote_addr, path = request.uri().path(), reason = %e, "unauthorized");
        })?;
        let impersonation = impersonation::parse(request.headers())?;
        front.identity_headers.strip(request.headers_mut());
        Ok((user, impersonation))
    }

    async fn route_and_forward(
        &self,
        ctx: &RequestContext<'_>,
        user: &UserInfo,
        outcome: &mut Outcome,
        request: Request<Body>,
    ) -> Response<Body> {
        let send = ctx.send;
        if !self.ready.get() {
            return RequestError::NotReady.into_response();
        }
        let has_v3_document = |path: &str| self.documents.openapi_v3().document(path).is_some();
        let decision = match decide(ctx.table, request.uri().path(), self.delegate.is_some(), has_v3_document) {
            // The merged OpenAPI v2 is JSON only; a client that wants protobuf (kubectl's
            // validation does) gets kube-apiserver's, which its own aggregator merged.
            Ok(Decision::Own)
                if request.uri().path() == "/openapi/v2"
                    && self.delegate.is_some()
                    && !crate::discovery::aggregated::accepts_json(request.headers()) =>
            {
                Decision::Delegate { apiservice: None }
            }
            Ok(d) => d,
            Err(e) => return e.into_response(),
        };
        let caller = Caller { user, client_ip: &ctx.conn.client_ip, audit_id: ctx.audit_id, trace: ctx.trace };
        match decision {
            // The proxy's own endpoints and their SubjectAccessReview are boxed: the forwarding
            // path's future, which hyper moves into a task per request, stays small.
            Decision::Own => {
                if let Some(trace) = ctx.trace {
                    trace.routed(None, "proxy");
                }
                let authorized = if self.authorization.authorizes_own() {
                    Box::pin(self.authorize(user, attributes(&request), ctx.trace, outcome)).await
                } else {
                    Ok(())
                };
                match authorized {
                    Ok(()) => Box::pin(self.own(request)).await,
                    Err(e) => e.into_response(),
                }
            }
            Decision::Delegate { apiservice } => {
                outcome.target = RequestTarget::Delegate;
                if let Some(trace) = ctx.trace {
                    trace.routed(None, "delegate");
                }
                let response = match &self.delegate {
                    Some(d) => {
                        let target = Target {
                            apiservice: DELEGATE_LABEL,
                            endpoints: &d.endpoints,
                            discovery: false,
                            send,
                            delegate: true,
                        };
                        proxy::forward(&self.forward, target, caller, request).await
                    }
                    None => Err(RequestError::NoDelegate {
                        apiservice: apiservice.as_deref().map(str::to_owned).unwrap_or_default(),
                    }),
                };
                outcome.apiservice = apiservice;
                response.unwrap_or_else(RequestError::into_response)
            }
            Decision::Remote { route, discovery } => {
                // Whatever the answer, it counts for this APIService, as kube-aggregator's
                // proxy handler counts its own 503s and 403s.
                outcome.target = RequestTarget::ApiService;
                outcome.apiservice = Some(route.apiservice.name.clone());
                outcome.series = route.requests.clone();
                if let Some(trace) = ctx.trace {
                    let a = &route.apiservice;
                    trace.routed(Some((&a.name, &a.group, &a.version)), "apiservice");
                }
                if self.authorization.authorizes_aggregated() {
                    if let Err(e) = Box::pin(self.authorize(user, attributes(&request), ctx.trace, outcome)).await {
                        return e.into_response();
                    }
                }
                let response =
                    self.forward_remote(&route, discovery, send, caller, &mut outcome.apiservice_permit, request).await;
                response.unwrap_or_else(RequestError::into_response)
            }
        }
    }

    async fn forward_remote(
        &self,
        route: &Route,
        discovery: bool,
        send: SendOptions,
        caller: Caller<'_>,
        flow_permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
        request: Request<Body>,
    ) -> Result<Response<Body>, RequestError> {
        let apiservice = &*route.apiservice.name;
        // The APIService's own limits, before anything is sent its way.
        *flow_permit = self.flow.admit(&route.apiservice, send.long_running).map_err(|refusal| {
            self.metrics.flow_rejected(refusal.label());
            RequestError::ApiServiceTooManyRequests { apiservice: apiservice.to_owned(), refusal }
        })?;
        let Upstream::Remote(remote) = &route.upstream else {
            return Err(RequestError::NoDelegate { apiservice: apiservice.to_owned() });
        };
        if let Err(e) = &remote.backend {
            return Err(RequestError::Transport { apiservice: apiservice.to_owned(), cause: e.to_string() });
        }
        let endpoints = remote.endpoints.as_ref().map_err(|e| RequestError::ServiceUnavailable {
            apiservice: apiservice.to_owned(),
            cause: e.to_string(),
        })?;
        let target = Target { apiservice, endpoints, discovery, send, delegate: false };
        proxy::forward(&self.forward, target, caller, request).await
    }

    /// Impersonation checks, given what the request itself does.
    async fn impersonate(
        &self,
        user: &UserInfo,
        asked: Impersonation,
        action: Attributes,
        trace: Option<&RequestTrace>,
    ) -> Result<UserInfo, AuthorizationError> {
        let _phase = trace.map(|t| t.phase("impersonate"));
        self.authorization.impersonate(user, asked, &action).await
    }

    /// Asks the authorizer about this request, with kube's RequestInfo attributes; the
    /// decision goes into the audit record as kube annotates it.
    async fn authorize(
        &self,
        user: &UserInfo,
        attributes: Attributes,
        trace: Option<&RequestTrace>,
        outcome: &mut Outcome,
    ) -> Result<(), RequestError> {
        let phase = trace.map(|t| t.phase("authorize"));
        let decision = self.authorization.authorize(user, attributes).await;
        drop(phase);
        if let Some(audit) = outcome.audit.as_mut() {
            match &decision {
                Ok(()) => audit.authorized(true, ""),
                Err(AuthorizationError::Forbidden { reason, .. }) => audit.authorized(false, reason),
                Err(AuthorizationError::Failed(_)) => {}
            }
        }
        Ok(decision?)
    }

    async fn own(&self, request: Request<Body>) -> Response<Body> {
        match self.endpoints.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// What the authorizer is asked about a request: kube's RequestInfo attributes. Made before
/// any await, so no future holds the request (whose body is not `Sync`).
fn attributes(request: &Request<Body>) -> Attributes {
    let uri = request.uri();
    RequestInfo::parse(request.method(), uri.path(), uri.query()).attributes()
}

/// What audit reads of a request: its line and headers, where it came from, and when.
fn audit_head<'a>(ctx: &RequestContext<'a>, request: &'a Request<Body>) -> RequestHead<'a> {
    RequestHead {
        method: request.method(),
        uri: request.uri(),
        headers: request.headers(),
        remote: ctx.conn.remote_addr.ip(),
        audit_id: ctx.audit_id.to_str().unwrap_or_default(),
        received: ctx.received.unwrap_or_else(std::time::SystemTime::now),
    }
}

fn not_found(what: String) -> RequestError {
    RequestError::NotFound(format!("the server could not find the requested resource: {what}"))
}

/// Decides where a path goes. Unknown paths go to the delegate when there is one (it owns
/// everything the aggregator does not), else they are 404. `has_v3_document` says whether the
/// proxy holds a remote group-version's OpenAPI v3 document (`apis/<group>/<version>`).
fn decide(
    table: &RoutingTable,
    path: &str,
    has_delegate: bool,
    has_v3_document: impl Fn(&str) -> bool,
) -> Result<Decision, RequestError> {
    let otherwise = |what: String| {
        if has_delegate {
            Ok(Decision::Delegate { apiservice: None })
        } else {
            Err(not_found(what))
        }
    };
    match classify(path) {
        ApiPath::Apis { .. } => Ok(Decision::Own),
        // Standalone: the proxy serves its own apiregistration.k8s.io (read-only).
        ApiPath::Group(super::apiregistration::GROUP)
        | ApiPath::GroupVersion { group: super::apiregistration::GROUP, .. }
            if !has_delegate =>
        {
            Ok(Decision::Own)
        }
        ApiPath::Group(group) => match table.group(group) {
            Some(_) => Ok(Decision::Own),
            None => otherwise(format!("no APIService serves group {group:?}")),
        },
        ApiPath::GroupVersion { group, version, discovery } => match table.route(group, version) {
            Some(route) => match route.upstream {
                Upstream::Local => Ok(Decision::Delegate { apiservice: Some(route.apiservice.name.clone()) }),
                Upstream::Remote(_) => Ok(Decision::Remote { route: route.clone(), discovery }),
            },
            None => otherwise(format!("no APIService serves {group}/{version}")),
        },
        ApiPath::Legacy => otherwise("the core API (/api) is served by the delegate, and none is configured".into()),
        ApiPath::Other => match path {
            "/metrics" | "/debug/apiservices" => Ok(Decision::Own),
            "/version" if !has_delegate => Ok(Decision::Own),
            // OpenAPI: the merged v2 document, the v3 index, and the v3 documents of remote
            // group-versions are ours (crate::discovery::openapi); the delegate's own v3
            // documents are forwarded to it.
            "/openapi/v2" | "/openapi/v3" => Ok(Decision::Own),
            _ if path.strip_prefix("/openapi/v3/").is_some_and(|d| !has_delegate && has_v3_document(d)) => {
                // Standalone: documents the proxy holds of its own (apiregistration.k8s.io).
                Ok(Decision::Own)
            }
            _ => match openapi_v3_remote(table, path) {
                Some((document, _)) if has_v3_document(document) => Ok(Decision::Own),
                // Not fetched (yet, or the last fetch failed): the backend answers for itself
                // rather than a 404 until the next round.
                Some((_, route)) => Ok(Decision::Remote { route, discovery: true }),
                None => otherwise(format!("no handler for path {path:?}")),
            },
        },
    }
}

/// Whether the request is for a subresource its APIService's annotations call long-running.
fn long_running_by_annotation(table: &RoutingTable, info: &RequestInfo<'_>) -> bool {
    if !info.is_resource_request || info.subresource.is_empty() {
        return false;
    }
    table
        .route(info.api_group, info.api_version)
        .is_some_and(|r| r.apiservice.policy.long_running_subresources.iter().any(|s| s == info.subresource))
}

/// For `/openapi/v3/apis/<group>/<version>` of a remote APIService: the document's name
/// (`apis/<group>/<version>`) and the route.
fn openapi_v3_remote<'a>(table: &RoutingTable, path: &'a str) -> Option<(&'a str, Arc<Route>)> {
    let rest = path.strip_prefix("/openapi/v3")?;
    match classify(rest) {
        ApiPath::GroupVersion { group, version, discovery: true } => {
            let route = table.route(group, version).filter(|r| matches!(r.upstream, Upstream::Remote(_)))?;
            Some((rest.trim_start_matches('/').trim_end_matches('/'), route.clone()))
        }
        _ => None,
    }
}

//! Prometheus metrics: one registry, created by the app and passed explicitly.
//!
//! Names follow kube-aggregator where it has the concept (`aggregator_unavailable_apiservice`);
//! per-APIService request metrics, which upstream lacks, are ours.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Request labels. The APIService name is the route's own `Arc<str>` and standard methods are
/// static strings, so counting a request allocates nothing once its series exists.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub apiservice: Arc<str>,
    pub method: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiServiceLabels {
    pub apiservice: Arc<str>,
}

/// A method as a label value, borrowed for the standard methods.
fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        // Any other token is a valid HTTP method, and a client (an unauthenticated one
        // included) could mint a new series with each: one label for all of them, as
        // kube-apiserver's `other`.
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// An authorization decision and where it came from, both from fixed sets.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allowed`, `denied` or `error`.
    pub decision: &'static str,
    /// `review` (a SubjectAccessReview was sent), `cache`, or `policy` (standalone's
    /// impersonation allow-list).
    pub source: &'static str,
}

/// A bounded set of reasons, always static strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestKindLabels {
    pub request_kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointReasonLabels {
    pub endpoint: Arc<str>,
    pub reason: &'static str,
}

/// The reasons a backend connection ends, for removing an endpoint's series.
const BACKEND_CLOSE_REASONS: [&str; 3] = ["closed", "ping-timeout", "error"];

/// An open client connection, counted in `aggregator_proxy_open_connections` while it lives.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<ApiServiceLabels, Histogram>,
    table_rebuilds: Counter,
    table_apiservices: Gauge,
    table_build_duration: Histogram,
    invalid_apiservices: Gauge,
    unavailable: Family<NameLabels, Gauge>,
    authentication: Family<ResultLabels, Counter>,
    open_connections: Gauge,
    max_connections: Gauge,
    connections_refused: Family<ReasonLabels, Counter>,
    connections_closed: Family<ReasonLabels, Counter>,
    accept_errors: Counter,
    request_timeouts: Counter,
    inflight_rejections: Family<RequestKindLabels, Counter>,
    manifest_rejections: Family<ReasonLabels, Counter>,
    authorization: Family<DecisionLabels, Counter>,
    credentials_reloads: Family<ResultLabels, Counter>,
    backend_connections: Family<EndpointLabels, Gauge>,
    backend_in_flight: Family<EndpointLabels, Gauge>,
    backend_connections_closed: Family<EndpointReasonLabels, Counter>,
    backend_ejections: Family<EndpointLabels, Counter>,
    backend_queue_rejections: Family<EndpointLabels, Counter>,
    backend_queue_wait: Histogram,
    backend_retries: Counter,
    backend_header_rejections: Counter,
    flow_rejections: Family<ReasonLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "aggregator_proxy_requests",
            "Requests handled, by APIService (empty for the proxy's own endpoints), method and status code",
            requests.clone(),
        );
        let request_duration = Family::<ApiServiceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "aggregator_proxy_request_duration_seconds",
            "Time from the request's arrival to the response headers, by APIService",
            request_duration.clone(),
        );
        let table_rebuilds = Counter::default();
        registry.register(
            "aggregator_routing_table_rebuilds",
            "Routing tables built and swapped in",
            table_rebuilds.clone(),
        );
        let table_apiservices = Gauge::default();
        registry.register(
            "aggregator_routing_table_apiservices",
            "APIServices in the serving routing table",
            table_apiservices.clone(),
        );
        let table_build_duration = Histogram::new(exponential_buckets(0.00001, 4.0, 12));
        registry.register(
            "aggregator_routing_table_build_duration_seconds",
            "Time to build a routing table",
            table_build_duration.clone(),
        );
        let invalid_apiservices = Gauge::default();
        registry.register(
            "aggregator_invalid_apiservices",
            "APIService objects currently rejected by validation or parsing",
            invalid_apiservices.clone(),
        );
        let unavailable = Family::<NameLabels, Gauge>::default();
        registry.register(
            "aggregator_unavailable_apiservice",
            "Gauge of APIServices which are marked as unavailable broken down by APIService name.",
            unavailable.clone(),
        );
        let authentication = Family::<ResultLabels, Counter>::default();
        registry.register("authentication_attempts", "Authentication attempts by result", authentication.clone());
        let open_connections = Gauge::default();
        registry.register("aggregator_proxy_open_connections", "Client connections open now", open_connections.clone());
        let max_connections = Gauge::default();
        registry.register(
            "aggregator_proxy_max_connections",
            "The client connection budget in force (--max-connections, fitted under the open-file limit)",
            max_connections.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "aggregator_proxy_connections_refused",
            "Client connections closed on arrival, by the limit they met (max-connections, max-connections-per-client)",
            connections_refused.clone(),
        );
        let connections_closed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "aggregator_proxy_connections_closed",
            "Client connections the proxy closed, by reason (tls-handshake-timeout, tls-handshake-failed, request-header-timeout, idle-timeout, shutdown)",
            connections_closed.clone(),
        );
        let accept_errors = Counter::default();
        registry.register(
            "aggregator_proxy_accept_errors",
            "Failed accepts (out of file descriptors, ...); the loop backs off",
            accept_errors.clone(),
        );
        let request_timeouts = Counter::default();
        registry.register(
            "aggregator_proxy_request_timeouts",
            "Requests answered 504 for outliving --request-timeout (or their ?timeout=)",
            request_timeouts.clone(),
        );
        let inflight_rejections = Family::<RequestKindLabels, Counter>::default();
        registry.register(
            "aggregator_proxy_inflight_rejections",
            "Requests answered 429 by --max-requests-inflight (readOnly) or --max-mutating-requests-inflight (mutating)",
            inflight_rejections.clone(),
        );
        let authorization = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "apiserver_authorization_decisions",
            "Authorization decisions (impersonation, own endpoints, aggregated requests) by decision and source",
            authorization.clone(),
        );
        let credentials_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "aggregator_credentials_reloads",
            "Reloads of the serving certificate, client CAs, token file and proxy client certificate, by result",
            credentials_reloads.clone(),
        );
        let manifest_rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "aggregator_manifest_rejections",
            "Manifest files rejected when read, by reason (too-large, too-deep, too-many-objects, not-utf8, not-a-regular-file, unreadable, parse, invalid)",
            manifest_rejections.clone(),
        );
        let backend_connections = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "aggregator_backend_connections",
            "Open connections to each backend endpoint",
            backend_connections.clone(),
        );
        let backend_in_flight = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "aggregator_backend_requests_in_flight",
            "Requests (streams) in flight to each backend endpoint",
            backend_in_flight.clone(),
        );
        let backend_connections_closed = Family::<EndpointReasonLabels, Counter>::default();
        registry.register(
            "aggregator_backend_connections_closed",
            "Backend connections that ended, by endpoint and reason (closed: GOAWAY or EOF; ping-timeout: the backend stopped answering; error)",
            backend_connections_closed.clone(),
        );
        let backend_ejections = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "aggregator_backend_ejections",
            "Times an endpoint was left out of balancing after consecutive failures",
            backend_ejections.clone(),
        );
        let backend_queue_rejections = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "aggregator_backend_queue_rejections",
            "Requests failed fast because --backend-max-pending-requests were already waiting for a connection",
            backend_queue_rejections.clone(),
        );
        let backend_queue_wait = Histogram::new(exponential_buckets(0.000_01, 4.0, 12));
        registry.register(
            "aggregator_backend_queue_wait_seconds",
            "Time a request waited for a place on a backend connection",
            backend_queue_wait.clone(),
        );
        let backend_retries = Counter::default();
        registry.register(
            "aggregator_backend_retries",
            "Idempotent requests sent a second time after a connection-level failure",
            backend_retries.clone(),
        );
        let backend_header_rejections = Counter::default();
        registry.register(
            "aggregator_backend_header_rejections",
            "Requests answered 431 because their headers exceed what the backend accepts",
            backend_header_rejections.clone(),
        );
        let flow_rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "aggregator_apiservice_flow_rejections",
            "Requests answered 429 by an APIService's own flow control, by reason (in-flight, rate)",
            flow_rejections.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            request_duration,
            table_rebuilds,
            table_apiservices,
            table_build_duration,
            invalid_apiservices,
            unavailable,
            authentication,
            open_connections,
            max_connections,
            connections_refused,
            connections_closed,
            accept_errors,
            request_timeouts,
            inflight_rejections,
            manifest_rejections,
            authorization,
            credentials_reloads,
            backend_connections,
            backend_in_flight,
            backend_connections_closed,
            backend_ejections,
            backend_queue_rejections,
            backend_queue_wait,
            backend_retries,
            backend_header_rejections,
            flow_rejections,
        }
    }

    pub fn flow_rejected(&self, reason: &'static str) {
        self.flow_rejections.get_or_create(&ReasonLabels { reason }).inc();
    }

    fn endpoint(endpoint: &Arc<str>) -> EndpointLabels {
        EndpointLabels { endpoint: endpoint.clone() }
    }

    /// An endpoint's in-flight and open-connection gauges, for it to keep: updating them is
    /// then an atomic add, with no label lookup per request.
    pub fn backend_endpoint_gauges(&self, endpoint: &Arc<str>) -> (Gauge, Gauge) {
        let labels = Self::endpoint(endpoint);
        let in_flight = self.backend_in_flight.get_or_create(&labels).clone();
        let connections = self.backend_connections.get_or_create(&labels).clone();
        (in_flight, connections)
    }

    pub fn backend_connection_closed(&self, endpoint: &Arc<str>, reason: &'static str) {
        let labels = EndpointReasonLabels { endpoint: endpoint.clone(), reason };
        self.backend_connections_closed.get_or_create(&labels).inc();
    }

    pub fn backend_ejected(&self, endpoint: &Arc<str>) {
        self.backend_ejections.get_or_create(&Self::endpoint(endpoint)).inc();
    }

    pub fn backend_queue_rejected(&self, endpoint: &Arc<str>) {
        self.backend_queue_rejections.get_or_create(&Self::endpoint(endpoint)).inc();
    }

    pub fn backend_queue_waited(&self, waited: Duration) {
        self.backend_queue_wait.observe(waited.as_secs_f64());
    }

    pub fn backend_retried(&self) {
        self.backend_retries.inc();
    }

    pub fn backend_header_rejected(&self) {
        self.backend_header_rejections.inc();
    }

    /// Removes an endpoint's series when it leaves every route.
    pub fn forget_endpoint(&self, endpoint: &Arc<str>) {
        let labels = Self::endpoint(endpoint);
        self.backend_connections.remove(&labels);
        self.backend_in_flight.remove(&labels);
        self.backend_ejections.remove(&labels);
        self.backend_queue_rejections.remove(&labels);
        for reason in BACKEND_CLOSE_REASONS {
            self.backend_connections_closed.remove(&EndpointReasonLabels { endpoint: endpoint.clone(), reason });
        }
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn open_connection(&self) -> OpenConnection {
        self.open_connections.inc();
        OpenConnection(self.open_connections.clone())
    }

    pub fn set_max_connections(&self, max: usize) {
        self.max_connections.set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn accept_failed(&self) {
        self.accept_errors.inc();
    }

    pub fn request_timed_out(&self) {
        self.request_timeouts.inc();
    }

    pub fn inflight_rejected(&self, request_kind: &'static str) {
        self.inflight_rejections.get_or_create(&RequestKindLabels { request_kind }).inc();
    }

    pub fn manifest_rejected(&self, reason: &'static str) {
        self.manifest_rejections.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts one request; `apiservice` is empty for the proxy's own endpoints.
    pub fn request(&self, apiservice: &Arc<str>, method: &http::Method, code: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels { apiservice: apiservice.clone(), method: method_label(method), code })
            .inc();
        self.request_duration
            .get_or_create(&ApiServiceLabels { apiservice: apiservice.clone() })
            .observe(elapsed.as_secs_f64());
    }

    pub fn table_rebuilt(&self, apiservices: usize, elapsed: Duration) {
        self.table_rebuilds.inc();
        self.table_apiservices.set(i64::try_from(apiservices).unwrap_or(i64::MAX));
        self.table_build_duration.observe(elapsed.as_secs_f64());
    }

    pub fn set_invalid_apiservices(&self, count: usize) {
        self.invalid_apiservices.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_unavailable(&self, name: &str, unavailable: bool) {
        self.unavailable.get_or_create(&NameLabels { name: name.to_owned() }).set(i64::from(unavailable));
    }

    pub fn forget_apiservice(&self, name: &str) {
        self.unavailable.remove(&NameLabels { name: name.to_owned() });
    }

    pub fn authorization(&self, decision: &'static str, source: &'static str) {
        self.authorization.get_or_create(&DecisionLabels { decision, source }).inc();
    }

    pub fn credentials_reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.credentials_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn authentication(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.authentication.get_or_create(&ResultLabels { result }).inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_http_s_own_set_share_one_label() {
        let metrics = Metrics::new();
        let name: Arc<str> = Arc::from("v1.a.io");
        for method in ["PROPFIND", "X-ANYTHING", "GET"] {
            metrics.request(
                &name,
                &http::Method::from_bytes(method.as_bytes()).unwrap(),
                200,
                Duration::from_millis(1),
            );
        }
        let text = metrics.encode();
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with("aggregator_proxy_requests_total{")).collect();
        assert_eq!(series.len(), 2, "{series:?}");
        assert!(series.iter().any(|l| l.contains("method=\"other\"") && l.ends_with(" 2")), "{series:?}");
    }
}

//! Prometheus metrics: one registry, created by the app and passed explicitly.
//!
//! Names follow kube-aggregator where it has the concept (`aggregator_unavailable_apiservice`);
//! per-APIService request metrics, which upstream lacks, are ours.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Every request the proxy answered: who answered it (`proxy` for its own endpoints and the
/// errors it made before routing, `delegate` for kube-apiserver, `apiservice` for an
/// extension server), kube's metric verb and the status code. Every value comes from a fixed
/// set, so no client can add a series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyRequestLabels {
    pub target: &'static str,
    pub verb: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: &'static str,
}

/// Who answered a request, for `aggregator_proxy_requests_total{target}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestTarget {
    Proxy,
    Delegate,
    ApiService,
}

impl RequestTarget {
    fn label(self) -> &'static str {
        match self {
            RequestTarget::Proxy => "proxy",
            RequestTarget::Delegate => "delegate",
            RequestTarget::ApiService => "apiservice",
        }
    }
}

/// kube-apiserver's request-duration buckets, with three finer ones below its first: routing
/// latency, which this project is used to study, is sub-millisecond.
const REQUEST_DURATION_BUCKETS: [f64; 26] = [
    0.0005, 0.001, 0.0025, 0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

/// The proxy-wide request-duration buckets: 0.1 ms doubling to 13 s.
const PROXY_DURATION_BUCKETS: [f64; 18] = [
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048, 0.4096, 0.8192,
    1.6384, 3.2768, 6.5536, 13.1072,
];

/// A histogram of durations whose observation is two relaxed atomic adds, with no lock:
/// every request observes one or two, from every core at once, and prometheus-client's
/// `Histogram` takes a mutex per observation. Buckets are counted apart and summed when
/// scraped; the sum is kept in nanoseconds.
#[derive(Debug)]
pub struct DurationHistogram {
    bounds: &'static [f64],
    /// One per bound, then one for `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_nanos: AtomicU64::new(0) }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self.bounds.partition_point(|bound| *bound < seconds);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    /// The encoder takes each finite bucket's own count (it sums them into `le` lines) and
    /// writes the total as the `+Inf` bucket.
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = self.buckets.iter().map(|n| n.load(Ordering::Relaxed)).collect();
        let buckets: Vec<(f64, u64)> = self.bounds.iter().copied().zip(counts.iter().copied()).collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Distinct (verb, code) pairs kept per APIService. Verbs are a fixed set of 13 and a sane
/// backend answers with a handful of codes; a backend that cycles through hundreds of codes
/// is counted in `aggregator_metrics_series_dropped_total` instead of growing the scrape.
pub const MAX_SERIES_PER_APISERVICE: usize = 128;

/// The labels of the per-APIService request series, as kube-aggregator's proposal names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupVersionVerbCode {
    group: Arc<str>,
    version: Arc<str>,
    verb: &'static str,
    code: u16,
}

/// One (verb, code) pair's count and latency.
#[derive(Debug)]
struct VerbCodeSeries {
    count: Counter,
    duration: DurationHistogram,
}

/// The request series of one remote APIService. Its route holds it (resolved once, when the
/// routing table is built), so counting a request is a read lock and two atomic updates,
/// with no lookup by name; when the APIService leaves the table its series go with it.
#[derive(Debug)]
pub struct ApiServiceSeries {
    group: Arc<str>,
    version: Arc<str>,
    by_verb_code: RwLock<HashMap<(&'static str, u16), VerbCodeSeries>>,
    dropped: Counter,
}

impl ApiServiceSeries {
    pub fn observe(&self, verb: &'static str, code: u16, elapsed: Duration) {
        let key = (verb, code);
        {
            let series = self.by_verb_code.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = series.get(&key) {
                s.count.inc();
                s.duration.observe(elapsed);
                return;
            }
        }
        let mut series = self.by_verb_code.write().unwrap_or_else(|e| e.into_inner());
        if series.len() >= MAX_SERIES_PER_APISERVICE && !series.contains_key(&key) {
            self.dropped.inc();
            return;
        }
        let s = series.entry(key).or_insert_with(|| VerbCodeSeries {
            count: Counter::default(),
            duration: DurationHistogram::new(&REQUEST_DURATION_BUCKETS),
        });
        s.count.inc();
        s.duration.observe(elapsed);
    }
}

/// The live per-APIService series, by APIService name, encoded on each scrape as
/// `apiserver_kube_aggregator_request_total` and `..._request_duration_seconds`.
#[derive(Debug, Default)]
pub struct ApiServiceRequests {
    live: RwLock<BTreeMap<Arc<str>, Arc<ApiServiceSeries>>>,
    dropped: Counter,
}

impl ApiServiceRequests {
    /// The series of an APIService, kept across tables while it stays.
    pub fn series(&self, name: &Arc<str>, group: &Arc<str>, version: &Arc<str>) -> Arc<ApiServiceSeries> {
        if let Some(s) = self.live.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return s.clone();
        }
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        live.entry(name.clone())
            .or_insert_with(|| {
                Arc::new(ApiServiceSeries {
                    group: group.clone(),
                    version: version.clone(),
                    by_verb_code: RwLock::default(),
                    dropped: self.dropped.clone(),
                })
            })
            .clone()
    }

    /// Drops the series of every APIService `keep` does not name.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.live.write().unwrap_or_else(|e| e.into_inner()).retain(|name, _| keep(name));
    }
}

/// Encodes [`ApiServiceRequests`] on each scrape.
#[derive(Debug)]
struct ApiServiceRequestsCollector(Arc<ApiServiceRequests>);

impl Collector for ApiServiceRequestsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = self.0.live.read().unwrap_or_else(|e| e.into_inner());
        let each = |f: &mut dyn FnMut(GroupVersionVerbCode, &VerbCodeSeries) -> Result<(), std::fmt::Error>| {
            for series in live.values() {
                let by_verb_code = series.by_verb_code.read().unwrap_or_else(|e| e.into_inner());
                let mut keys: Vec<_> = by_verb_code.keys().copied().collect();
                keys.sort_unstable();
                for key in keys {
                    let labels = GroupVersionVerbCode {
                        group: series.group.clone(),
                        version: series.version.clone(),
                        verb: key.0,
                        code: key.1,
                    };
                    f(labels, &by_verb_code[&key])?;
                }
            }
            Ok(())
        };
        let mut counters = encoder.encode_descriptor(
            "apiserver_kube_aggregator_request",
            "Requests to extension API servers (remote APIServices), by group, version, verb and code",
            None,
            MetricType::Counter,
        )?;
        each(&mut |labels, s| s.count.encode(counters.encode_family(&labels)?))?;
        let mut histograms = encoder.encode_descriptor(
            "apiserver_kube_aggregator_request_duration_seconds",
            "Time from a request's arrival to its response headers, for requests to extension API servers, by group, version, verb and code",
            None,
            MetricType::Histogram,
        )?;
        each(&mut |labels, s| s.duration.encode(histograms.encode_family(&labels)?))?;
        Ok(())
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameReasonLabels {
    pub name: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabels {
    pub level: &'static str,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<ProxyRequestLabels, Counter>,
    request_duration: Family<TargetLabels, DurationHistogram, fn() -> DurationHistogram>,
    apiservice_requests: Arc<ApiServiceRequests>,
    unavailable_total: Family<NameReasonLabels, Counter>,
    x509_missing_san: Counter,
    audit_events: Counter,
    audit_errors: Family<PluginLabels, Counter>,
    audit_levels: Family<LevelLabels, Counter>,
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
        let requests = Family::<ProxyRequestLabels, Counter>::default();
        registry.register(
            "aggregator_proxy_requests",
            "Requests answered, by target (proxy: its own endpoints and errors before routing; delegate; apiservice: an extension server), kube's metric verb and status code",
            requests.clone(),
        );
        let request_duration: Family<TargetLabels, DurationHistogram, fn() -> DurationHistogram> =
            Family::new_with_constructor(|| DurationHistogram::new(&PROXY_DURATION_BUCKETS));
        registry.register(
            "aggregator_proxy_request_duration_seconds",
            "Time from the request's arrival to the response headers, by target",
            request_duration.clone(),
        );
        let apiservice_requests = Arc::new(ApiServiceRequests::default());
        registry.register_collector(Box::new(ApiServiceRequestsCollector(apiservice_requests.clone())));
        registry.register(
            "aggregator_metrics_series_dropped",
            "Requests not counted in the per-APIService series because the APIService already has the most (verb, code) series allowed",
            apiservice_requests.dropped.clone(),
        );
        let unavailable_total = Family::<NameReasonLabels, Counter>::default();
        registry.register(
            "aggregator_unavailable_apiservice",
            "Counter of APIServices which are marked as unavailable broken down by APIService name and reason.",
            unavailable_total.clone(),
        );
        let x509_missing_san = Counter::default();
        registry.register(
            "apiserver_kube_aggregator_x509_missing_san",
            "Counts the number of requests to servers missing SAN extension in their serving certificate OR the number of connection failures due to the lack of x509 certificate SAN extension missing (either/or, based on the runtime environment)",
            x509_missing_san.clone(),
        );
        let audit_events = Counter::default();
        registry.register(
            "apiserver_audit_event",
            "Counter of audit events generated and sent to the audit backend.",
            audit_events.clone(),
        );
        let audit_errors = Family::<PluginLabels, Counter>::default();
        registry.register(
            "apiserver_audit_error",
            "Counter of audit events that failed to be audited properly. Plugin identifies the plugin affected by the error.",
            audit_errors.clone(),
        );
        let audit_levels = Family::<LevelLabels, Counter>::default();
        registry.register(
            "apiserver_audit_level",
            "Counter of policy levels for audit events (1 per request).",
            audit_levels.clone(),
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
            apiservice_requests,
            unavailable_total,
            x509_missing_san,
            audit_events,
            audit_errors,
            audit_levels,
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

    /// Counts one request the proxy answered.
    pub fn request(&self, target: RequestTarget, verb: &'static str, code: u16, elapsed: Duration) {
        let target = target.label();
        self.requests.get_or_create(&ProxyRequestLabels { target, verb, code }).inc();
        self.request_duration.get_or_create(&TargetLabels { target }).observe(elapsed);
    }

    /// The per-APIService request series, which the routing table resolves for its routes.
    pub fn apiservice_requests(&self) -> &ApiServiceRequests {
        &self.apiservice_requests
    }

    /// Counted each time a backend's serving certificate is refused for having no
    /// subjectAltName (a Common Name alone names no host, as in Go since 1.15).
    pub fn x509_missing_san(&self) -> Counter {
        self.x509_missing_san.clone()
    }

    /// An audit event handed to the log.
    pub fn audit_event(&self) {
        self.audit_events.inc();
    }

    /// An audit event lost: `buffered` (the queue was full), `log` (it could not be
    /// written) or `truncate` (too large even without its bodies).
    pub fn audit_error(&self, plugin: &'static str) {
        self.audit_errors.get_or_create(&PluginLabels { plugin }).inc();
    }

    /// The level the audit policy gave a request.
    pub fn audit_level(&self, level: &'static str) {
        self.audit_levels.get_or_create(&LevelLabels { level }).inc();
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

    /// An APIService's `Available` condition changed and it is unavailable, as kube's
    /// availability controller counts it on each such status update.
    pub fn unavailable_transition(&self, name: &str, reason: &'static str) {
        self.unavailable_total.get_or_create(&NameReasonLabels { name: name.to_owned(), reason }).inc();
    }

    /// Removes an APIService's availability series when it leaves the table; `reasons` are
    /// every reason it can have been counted under.
    pub fn forget_apiservice(&self, name: &str, reasons: &[&'static str]) {
        self.unavailable.remove(&NameLabels { name: name.to_owned() });
        for &reason in reasons {
            self.unavailable_total.remove(&NameReasonLabels { name: name.to_owned(), reason });
        }
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

    /// The registry in the Prometheus text format 0.0.4, as kube-apiserver serves it: a
    /// counter's family is named with its `_total`, so the gauge
    /// `aggregator_unavailable_apiservice` and the counter
    /// `aggregator_unavailable_apiservice_total` are two families, as in kube-aggregator.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_apiservice_series_live_as_long_as_their_apiservice() {
        let metrics = Metrics::new();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("v1.a.io"), Arc::from("v1.b.io"));
        let (group_a, group_b, v1): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("a.io"), Arc::from("b.io"), Arc::from("v1"));
        let series_a = metrics.apiservice_requests().series(&a, &group_a, &v1);
        let series_b = metrics.apiservice_requests().series(&b, &group_b, &v1);
        series_a.observe("GET", 200, Duration::from_millis(1));
        series_a.observe("GET", 200, Duration::from_millis(1));
        series_b.observe("LIST", 503, Duration::from_millis(1));
        // The same APIService in a later table keeps its counts.
        assert!(Arc::ptr_eq(&series_a, &metrics.apiservice_requests().series(&a, &group_a, &v1)));
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"apiserver_kube_aggregator_request_total{group="a.io",version="v1",verb="GET",code="200"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"apiserver_kube_aggregator_request_duration_seconds_count{group="b.io",version="v1",verb="LIST",code="503"} 1"#));
        // 1 ms falls in the bucket bounded by 1 ms (`le` is inclusive), and every bucket after.
        for (le, n) in [("0.0005", 0), ("0.001", 2), ("60", 2), ("+Inf", 2)] {
            let line = format!(
                r#"apiserver_kube_aggregator_request_duration_seconds_bucket{{group="a.io",version="v1",verb="GET",code="200",le="{le}"}} {n}"#
            );
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(text.contains(r#"apiserver_kube_aggregator_request_duration_seconds_sum{group="a.io",version="v1",verb="GET",code="200"} 0.002"#), "{text}");
        metrics.apiservice_requests().retain(|name| name == "v1.a.io");
        let text = metrics.encode();
        assert!(!text.contains(r#"group="b.io""#), "{text}");
        assert!(text.contains(r#"group="a.io""#));
    }

    #[test]
    fn an_apiservice_keeps_at_most_its_share_of_series() {
        let metrics = Metrics::new();
        let name: Arc<str> = Arc::from("v1.a.io");
        let series = metrics.apiservice_requests().series(&name, &Arc::from("a.io"), &Arc::from("v1"));
        for code in 100..700u16 {
            series.observe("GET", code, Duration::from_millis(1));
        }
        let text = metrics.encode();
        let kept = text.lines().filter(|l| l.starts_with("apiserver_kube_aggregator_request_total{")).count();
        assert_eq!(kept, MAX_SERIES_PER_APISERVICE);
        let dropped = 600 - MAX_SERIES_PER_APISERVICE;
        assert!(text.contains(&format!("aggregator_metrics_series_dropped_total {dropped}")), "{text}");
    }
}

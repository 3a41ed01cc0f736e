//! The background fetcher: downloads every backend's discovery and OpenAPI documents off the
//! request path, and rebuilds the merged documents the handlers serve only when an input
//! changed. kube-aggregator's discovery manager and OpenAPI controllers, in one task.
//!
//! - **When.** On every new routing table (the writer swaps tables into an `ArcSwap`; the
//!   fetcher polls its generation, a single atomic load, every [`FetcherSettings::table_poll`]),
//!   every [`FetcherSettings::resync_period`] (60 s, with the backend's `ETag` in
//!   `If-None-Match`), and when asked ([`DiscoveryDocuments::resync`]).
//! - **What.** One fetch per distinct backend service and document kind (aggregated discovery,
//!   OpenAPI v2, OpenAPI v3), each its own task bounded by a timeout (5 s for discovery, as kube),
//!   so a slow backend delays only its own documents. A fetch already running for a backend is
//!   not started twice; a change seen meanwhile refetches when it ends.
//! - **As whom.** Through the backend layer (the route's endpoints, their connections shared
//!   with the requests), as user `system:kube-aggregator`
//!   in group `system:masters`, the identity kube-aggregator's discovery manager uses.
//! - **Failures.** A backend that fails keeps its last known discovery, marked
//!   `freshness: Stale`, and its last OpenAPI documents. A backend that has never answered is
//!   **left out** of the aggregated document (and logged): kube-aggregator publishes its
//!   group-versions with no resources and `Stale`, which makes clients believe the group has no
//!   resources; leaving it out lets them fall back to the legacy `/apis/<group>/<version>`,
//!   which answers (or fails) for that group alone. Legacy `/apis` still lists every group.
//! - **Serving** never waits for a fetch: handlers load the last published document.
//!
//! Cluster mode feeds the delegate's own documents through [`DelegateDiscovery`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use axum::body::Body;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::aggregated::{
    self, ApiGroupDiscoveryList, ApiVersionDiscovery, LegacyResourceList, LocalPriorities, Source, VersionEntry,
    ACCEPT_AGGREGATED_V2_OR_JSON, CONTENT_TYPE_AGGREGATED_V2, FRESHNESS_CURRENT, FRESHNESS_STALE,
};
use super::openapi::{self, V3Documents};
use super::published::Published;
use crate::apiservice::ServiceReference;
use crate::auth::identity;
use crate::auth::UserInfo;
use crate::backend::{Endpoint, SendOptions};
use crate::routing::writer::SharedTable;
use crate::routing::{Route, RoutingTable, Upstream};

/// The user discovery and OpenAPI are fetched as.
pub const DISCOVERY_USER: &str = "system:kube-aggregator";
pub const DISCOVERY_GROUP: &str = "system:masters";

/// kube-aggregator bounds each discovery fetch to five seconds.
pub const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// OpenAPI documents are larger and less urgent; kube-aggregator allows a minute.
pub const DEFAULT_OPENAPI_TIMEOUT: Duration = Duration::from_secs(60);
/// How often every backend is fetched again (kube-aggregator: every minute).
pub const DEFAULT_RESYNC_PERIOD: Duration = Duration::from_secs(60);
/// How often the routing table's generation is checked.
pub const DEFAULT_TABLE_POLL: Duration = Duration::from_millis(100);
/// The largest document read from a backend.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024 * 1024;

/// Timing of the fetcher.
#[derive(Debug, Clone)]
pub struct FetcherSettings {
    pub discovery_timeout: Duration,
    pub openapi_timeout: Duration,
    pub resync_period: Duration,
    pub table_poll: Duration,
    /// A delegate is configured (cluster mode). Until its aggregated `/apis` arrives on the
    /// [`DelegateDiscovery`] channel, `/apis` answers only the legacy list: an aggregated
    /// document without the built-in groups would hide them from clients, while the legacy
    /// list names them all and clients then read each group-version from its owner.
    pub delegate_expected: bool,
    /// Standalone: the proxy serves `apiregistration.k8s.io/v1` itself
    /// (`crate::server::apiregistration`), so its documents list the group.
    pub serves_apiregistration: bool,
}

impl Default for FetcherSettings {
    fn default() -> Self {
        Self {
            discovery_timeout: DEFAULT_DISCOVERY_TIMEOUT,
            openapi_timeout: DEFAULT_OPENAPI_TIMEOUT,
            resync_period: DEFAULT_RESYNC_PERIOD,
            table_poll: DEFAULT_TABLE_POLL,
            delegate_expected: false,
            serves_apiregistration: false,
        }
    }
}

/// The delegate's own documents, which cluster mode fetches from kube-apiserver and sends to
/// the fetcher (a `watch` channel: the newest value wins). Standalone mode sends nothing, and
/// local APIServices then appear in no merged document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DelegateDiscovery {
    /// kube-apiserver's aggregated `/apis` (built-in and CRD groups). Its group-versions are
    /// ordered with the priorities of the table's local APIServices (kube's defaults, 1000 and
    /// 15, for one without). A group-version a remote backend also serves is the backend's
    /// once the backend has answered; until then the delegate's entry stands in for it.
    pub apis: Option<Arc<ApiGroupDiscoveryList>>,
    /// kube-apiserver's `/openapi/v2`, merged first and unfiltered.
    pub openapi_v2: Option<Arc<Value>>,
    /// kube-apiserver's `/openapi/v3` index, `path -> serverRelativeURL`; the request path
    /// must send those paths to the delegate.
    pub openapi_v3_paths: BTreeMap<String, String>,
}

/// What the handlers serve: the merged documents, each swapped in whole.
#[derive(Clone)]
pub struct DiscoveryDocuments {
    /// `None` while a delegate is expected but its document has not arrived.
    aggregated: Arc<ArcSwapOption<Published>>,
    openapi_v2: Arc<ArcSwap<Published>>,
    openapi_v3: Arc<ArcSwap<V3Documents>>,
    synced: watch::Receiver<bool>,
    resync: Arc<Notify>,
}

/// The aggregated document as kube-apiserver serves it, byte for byte: its JSON and a newline,
/// with the ETag kube computes, the SHA-512 of the JSON without `kind` and `apiVersion`.
fn publish_aggregated(list: &ApiGroupDiscoveryList) -> Published {
    #[derive(serde::Serialize)]
    struct Untyped<'a> {
        metadata: &'a serde_json::Map<String, Value>,
        items: &'a [crate::discovery::aggregated::ApiGroupDiscovery],
    }
    let mut body = serde_json::to_vec(list).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let hashed = serde_json::to_vec(&Untyped { metadata: &list.metadata, items: &list.items }).unwrap_or_default();
    Published::hashed_as(CONTENT_TYPE_AGGREGATED_V2, body, &hashed)
}

impl DiscoveryDocuments {
    fn new(synced: watch::Receiver<bool>) -> Self {
        Self {
            aggregated: Arc::new(ArcSwapOption::from_pointee(publish_aggregated(&ApiGroupDiscoveryList::default()))),
            openapi_v2: Arc::new(ArcSwap::from_pointee(openapi::publish_v2(&openapi::merge_v2([], [])))),
            openapi_v3: Arc::new(ArcSwap::from_pointee(V3Documents::default())),
            synced,
            resync: Arc::new(Notify::new()),
        }
    }

    /// The aggregated `APIGroupDiscoveryList` for `/apis`, or `None` when it cannot be
    /// complete yet (see [`FetcherSettings::delegate_expected`]) and the legacy list must do.
    pub fn aggregated(&self) -> Option<Arc<Published>> {
        self.aggregated.load_full()
    }

    /// The merged Swagger 2.0 document for `/openapi/v2`.
    pub fn openapi_v2(&self) -> Arc<Published> {
        self.openapi_v2.load_full()
    }

    /// The OpenAPI v3 index and the documents it points at.
    pub fn openapi_v3(&self) -> Arc<V3Documents> {
        self.openapi_v3.load_full()
    }

    /// Whether every backend of the first routing table has been fetched once (successfully
    /// or not): until then the documents may lack groups that are about to appear.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once [`DiscoveryDocuments::is_synced`].
    pub async fn synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// Fetches every backend again now, without waiting for the periodic resync.
    pub fn resync(&self) {
        self.resync.notify_one();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no client for the backend: {0}")]
    NoClient(String),
    #[error("no endpoints: {0}")]
    NoEndpoints(String),
    #[error("request failed: {0}")]
    Unreachable(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{path} answered {code}")]
    Status { path: String, code: StatusCode },
    #[error("{path}: invalid document: {reason}")]
    Decode { path: String, reason: String },
}

/// The kinds of document fetched from each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Discovery,
    OpenApiV2,
    OpenApiV3,
}

const KINDS: [Kind; 3] = [Kind::Discovery, Kind::OpenApiV2, Kind::OpenApiV3];

/// How to reach a backend for one fetch.
#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) endpoint: Arc<Endpoint>,
}

impl Http {
    /// `GET path` as the discovery user; the body is read whole (bounded).
    pub(crate) async fn get(
        &self,
        path: &str,
        accept: &str,
        if_none_match: Option<&HeaderValue>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), FetchError> {
        let uri = Uri::builder()
            .path_and_query(path)
            .build()
            .map_err(|e| FetchError::Decode { path: path.to_owned(), reason: e.to_string() })?;
        let mut request = Request::new(Body::empty());
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        if let Ok(v) = HeaderValue::from_str(accept) {
            headers.insert(ACCEPT, v);
        }
        if let Some(etag) = if_none_match {
            headers.insert(IF_NONE_MATCH, etag.clone());
        }
        // A fixed ASCII identity: it always fits in a header.
        let _ = identity::inject(&UserInfo::new(DISCOVERY_USER, vec![DISCOVERY_GROUP.to_owned()]), headers);
        // Each fetch task has its own deadline around this.
        let response = self
            .endpoint
            .send(request, &SendOptions::default())
            .await
            .map_err(|e| FetchError::Unreachable(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_DOCUMENT_BYTES)
            .collect()
            .await
            .map_err(|e| FetchError::Unreachable(format!("reading {path}: {e}")))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    }
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, FetchError> {
    serde_json::from_slice(body).map_err(|e| FetchError::Decode { path: path.to_owned(), reason: e.to_string() })
}

/// A backend's discovery as last fetched.
#[derive(Debug, Clone)]
struct Discovered {
    versions: HashMap<(String, String), ApiVersionDiscovery>,
    /// The backend's `ETag` of its aggregated document; legacy results are not revalidated.
    etag: Option<HeaderValue>,
}

/// What one fetch brought back.
enum Fetched {
    NotModified,
    Discovery(Discovered),
    OpenApiV2 {
        spec: Option<Arc<Value>>,
        etag: Option<HeaderValue>,
    },
    /// `path -> (serverRelativeURL, document)` for the backend's own group-versions.
    OpenApiV3(BTreeMap<String, (String, Bytes)>),
}

/// The inputs of one fetch job.
struct Job {
    key: String,
    kind: Kind,
    http: Http,
    group_versions: Vec<(String, String)>,
    discovery_etag: Option<HeaderValue>,
    v2_etag: Option<HeaderValue>,
    v3_cached: BTreeMap<String, (String, Bytes)>,
    timeout: Duration,
}

impl Job {
    async fn run(self) -> (String, Kind, Result<Fetched, FetchError>) {
        let timeout = self.timeout;
        let result = match tokio::time::timeout(timeout, self.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout(timeout)),
        };
        (self.key, self.kind, result)
    }

    async fn fetch(&self) -> Result<Fetched, FetchError> {
        match self.kind {
            Kind::Discovery => self.discovery().await,
            Kind::OpenApiV2 => self.openapi_v2().await,
            Kind::OpenApiV3 => self.openapi_v3().await,
        }
    }

    /// The backend's aggregated `/apis` where it serves one (its `Content-Type` says so),
    /// else each group-version's legacy `APIResourceList`, converted.
    async fn discovery(&self) -> Result<Fetched, FetchError> {
        let (code, headers, body) =
            self.http.get("/apis", ACCEPT_AGGREGATED_V2_OR_JSON, self.discovery_etag.as_ref()).await?;
        if code == StatusCode::NOT_MODIFIED && self.discovery_etag.is_some() {
            return Ok(Fetched::NotModified);
        }
        let aggregated = code == StatusCode::OK
            && headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(aggregated::is_aggregated_v2_content_type);
        if aggregated {
            let list: ApiGroupDiscoveryList = decode("/apis", &body)?;
            let versions = list
                .versions()
                .map(|((g, v), discovery)| {
                    let mut discovery = discovery.clone();
                    aggregated::force_response_kinds(&mut discovery);
                    ((g.to_owned(), v.to_owned()), discovery)
                })
                .collect();
            return Ok(Fetched::Discovery(Discovered { versions, etag: headers.get(ETAG).cloned() }));
        }
        if code == StatusCode::SERVICE_UNAVAILABLE {
            return Err(FetchError::Status { path: "/apis".into(), code });
        }
        let mut versions = HashMap::new();
        for (group, version) in &self.group_versions {
            let path = format!("/apis/{group}/{version}");
            let (code, _, body) = self.http.get(&path, "application/json", None).await?;
            if code != StatusCode::OK {
                return Err(FetchError::Status { path, code });
            }
            let list: LegacyResourceList = decode(&path, &body)?;
            versions.insert((group.clone(), version.clone()), aggregated::convert_legacy(group, version, &list));
        }
        Ok(Fetched::Discovery(Discovered { versions, etag: None }))
    }

    async fn openapi_v2(&self) -> Result<Fetched, FetchError> {
        let path = "/openapi/v2";
        let (code, headers, body) = self.http.get(path, "application/json", self.v2_etag.as_ref()).await?;
        match code {
            StatusCode::NOT_MODIFIED if self.v2_etag.is_some() => Ok(Fetched::NotModified),
            // The backend publishes no spec: a success with nothing to merge.
            StatusCode::NOT_FOUND => Ok(Fetched::OpenApiV2 { spec: None, etag: None }),
            StatusCode::OK => {
                let spec: Value = decode(path, &body)?;
                if !spec.is_object() {
                    return Err(FetchError::Decode { path: path.into(), reason: "not a JSON object".into() });
                }
                Ok(Fetched::OpenApiV2 { spec: Some(Arc::new(spec)), etag: headers.get(ETAG).cloned() })
            }
            code => Err(FetchError::Status { path: path.into(), code }),
        }
    }

    /// The backend's v3 index, then each of its own group-versions' documents whose URL (and
    /// so `?hash=`) changed since the last fetch.
    async fn openapi_v3(&self) -> Result<Fetched, FetchError> {
        let (code, _, body) = self.http.get("/openapi/v3", "application/json", None).await?;
        match code {
            StatusCode::NOT_FOUND => return Ok(Fetched::OpenApiV3(BTreeMap::new())),
            StatusCode::OK => {}
            code => return Err(FetchError::Status { path: "/openapi/v3".into(), code }),
        }
        let root: Value = decode("/openapi/v3", &body)?;
        let own: BTreeSet<String> = self.group_versions.iter().map(|(g, v)| format!("apis/{g}/{v}")).collect();
        let mut documents = BTreeMap::new();
        for (path, url) in openapi::v3_root_paths(&root) {
            if !own.contains(&path) || !url.starts_with('/') {
                continue;
            }
            if let Some((cached_url, bytes)) = self.v3_cached.get(&path) {
                if *cached_url == url {
                    documents.insert(path, (url, bytes.clone()));
                    continue;
                }
            }
            let (code, _, body) = self.http.get(&url, "application/json", None).await?;
            if code != StatusCode::OK {
                return Err(FetchError::Status { path: url, code });
            }
            let _: serde_json::Map<String, Value> = decode(&url, &body)?;
            documents.insert(path, (url, body));
        }
        Ok(Fetched::OpenApiV3(documents))
    }
}

/// What identifies a backend's fetch inputs; a change refetches it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    service: ServiceReference,
    group_versions: BTreeSet<(String, String)>,
    targets: Result<Vec<String>, String>,
}

/// A backend's fetch inputs in the current table.
struct BackendInputs {
    signature: Signature,
    /// One of the backend's routes: its pooled client and endpoints (shared by all of them).
    route: Arc<Route>,
    /// The best (group priority, APIService name) among its APIServices, for OpenAPI order.
    rank: (i32, String),
}

/// What the fetcher knows about one backend.
#[derive(Default)]
struct BackendState {
    signature: Option<Signature>,
    discovery: Option<Discovered>,
    discovery_fresh: bool,
    v2: Option<(Option<Arc<Value>>, Option<HeaderValue>)>,
    v3: BTreeMap<String, (String, Bytes)>,
    in_flight: BTreeSet<Kind>,
    /// Kinds to fetch again when the running fetch ends.
    dirty: BTreeSet<Kind>,
    /// Whether the last fetch of each kind failed (to log transitions once).
    failing: BTreeSet<Kind>,
}

/// The fetcher task. Build with [`Fetcher::new`], run with [`Fetcher::run`].
pub struct Fetcher {
    table: SharedTable,
    current: Arc<RoutingTable>,
    settings: FetcherSettings,
    delegate: Option<watch::Receiver<Arc<DelegateDiscovery>>>,
    delegate_value: Arc<DelegateDiscovery>,
    documents: DiscoveryDocuments,
    synced_tx: watch::Sender<bool>,
    backends: HashMap<String, BackendState>,
    inputs: HashMap<String, BackendInputs>,
    jobs: JoinSet<(String, Kind, Result<Fetched, FetchError>)>,
    /// The first round's fetches still running; `None` once synced.
    first_round: Option<BTreeSet<(String, Kind)>>,
}

impl Fetcher {
    /// A fetcher for `table`'s backends, and the documents it publishes. Send the delegate's
    /// documents on `delegate` (cluster mode); standalone mode may drop the sender.
    pub fn new(
        table: SharedTable,
        settings: FetcherSettings,
        delegate: watch::Receiver<Arc<DelegateDiscovery>>,
    ) -> (Self, DiscoveryDocuments) {
        let (synced_tx, synced) = watch::channel(false);
        let documents = DiscoveryDocuments::new(synced);
        let delegate_value = delegate.borrow().clone();
        let fetcher = Self {
            table,
            current: Arc::new(RoutingTable::default()),
            settings,
            delegate: Some(delegate),
            delegate_value,
            documents: documents.clone(),
            synced_tx,
            backends: HashMap::new(),
            inputs: HashMap::new(),
            jobs: JoinSet::new(),
            first_round: Some(BTreeSet::new()),
        };
        (fetcher, documents)
    }

    /// Runs until aborted. Fetch jobs are owned by the task and end with it.
    pub async fn run(mut self) {
        let mut poll = tokio::time::interval(self.settings.table_poll);
        poll.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let period = self.settings.resync_period;
        let mut resync = tokio::time::interval_at(Instant::now() + period, period);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let resync_requested = self.documents.resync.clone();
        // With a delegate document already present, publish it before the first table.
        self.rebuild_all();
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    let table = self.table.load_full();
                    if table.generation > 0 && table.generation != self.current.generation {
                        self.on_table(table);
                    }
                }
                _ = resync.tick() => self.resync_all(),
                () = resync_requested.notified() => self.resync_all(),
                changed = changed(&mut self.delegate) => match changed {
                    Some(value) => {
                        self.delegate_value = value;
                        self.rebuild_all();
                    }
                    None => self.delegate = None,
                },
                Some(joined) = self.jobs.join_next() => match joined {
                    Ok((key, kind, result)) => self.on_fetched(key, kind, result),
                    Err(e) => tracing::error!(error = %e, "discovery fetch task failed"),
                },
            }
        }
    }

    /// A new routing table: forget backends it no longer names, fetch new or changed ones,
    /// and rebuild (priorities and group-versions may have changed without any fetch).
    fn on_table(&mut self, table: Arc<RoutingTable>) {
        self.inputs = backend_inputs(&table);
        self.current = table;
        self.backends.retain(|key, _| self.inputs.contains_key(key));
        let keys: Vec<String> = self.inputs.keys().cloned().collect();
        for key in keys {
            let signature = self.inputs.get(&key).map(|i| i.signature.clone());
            let state = self.backends.entry(key.clone()).or_default();
            if state.signature != signature {
                state.signature = signature;
                for kind in KINDS {
                    self.schedule(&key, kind);
                }
            }
        }
        if let Some(pending) = &mut self.first_round {
            pending.retain(|(key, _)| self.inputs.contains_key(key));
        }
        self.rebuild_all();
        self.check_synced();
    }

    fn resync_all(&mut self) {
        let keys: Vec<String> = self.inputs.keys().cloned().collect();
        for key in keys {
            for kind in KINDS {
                self.schedule(&key, kind);
            }
        }
    }

    /// Starts a fetch of `kind` from backend `key`, or marks it for a refetch when one runs.
    fn schedule(&mut self, key: &str, kind: Kind) {
        let (Some(inputs), Some(state)) = (self.inputs.get(key), self.backends.get_mut(key)) else { return };
        if state.in_flight.contains(&kind) {
            state.dirty.insert(kind);
            return;
        }
        // Each fetch picks the next endpoint, as requests do.
        let http = match &inputs.route.upstream {
            Upstream::Remote(remote) => match (&remote.backend, &remote.endpoints) {
                (Err(e), _) => Err(FetchError::NoClient(e.to_string())),
                (_, Err(e)) => Err(FetchError::NoEndpoints(e.to_string())),
                (Ok(_), Ok(endpoints)) => Ok(Http { endpoint: endpoints.pick().clone() }),
            },
            Upstream::Local => Err(FetchError::NoEndpoints("a local APIService has no backend".into())),
        };
        let http = match http {
            Ok(http) => http,
            Err(error) => {
                self.on_fetched(key.to_owned(), kind, Err(error));
                return;
            }
        };
        state.in_flight.insert(kind);
        if let Some(pending) = &mut self.first_round {
            pending.insert((key.to_owned(), kind));
        }
        let job = Job {
            key: key.to_owned(),
            kind,
            http,
            group_versions: inputs.signature.group_versions.iter().cloned().collect(),
            discovery_etag: state.discovery.as_ref().and_then(|d| d.etag.clone()),
            v2_etag: state.v2.as_ref().and_then(|(_, etag)| etag.clone()),
            v3_cached: state.v3.clone(),
            timeout: match kind {
                Kind::Discovery => self.settings.discovery_timeout,
                Kind::OpenApiV2 | Kind::OpenApiV3 => self.settings.openapi_timeout,
            },
        };
        self.jobs.spawn(job.run());
    }

    fn on_fetched(&mut self, key: String, kind: Kind, result: Result<Fetched, FetchError>) {
        if let Some(pending) = &mut self.first_round {
            pending.remove(&(key.clone(), kind));
        }
        let Some(state) = self.backends.get_mut(&key) else {
            // The backend left the table while its fetch ran.
            self.check_synced();
            return;
        };
        state.in_flight.remove(&kind);
        match result {
            Ok(fetched) => {
                if state.failing.remove(&kind) {
                    tracing::info!(backend = %key, ?kind, "backend answers again");
                }
                match fetched {
                    Fetched::NotModified => {}
                    Fetched::Discovery(discovered) => state.discovery = Some(discovered),
                    Fetched::OpenApiV2 { spec, etag } => state.v2 = Some((spec, etag)),
                    Fetched::OpenApiV3(documents) => state.v3 = documents,
                }
                if kind == Kind::Discovery {
                    state.discovery_fresh = true;
                }
            }
            Err(error) => {
                if state.failing.insert(kind) {
                    let known = match kind {
                        Kind::Discovery => state.discovery.is_some(),
                        Kind::OpenApiV2 => state.v2.is_some(),
                        Kind::OpenApiV3 => !state.v3.is_empty(),
                    };
                    if known {
                        tracing::warn!(backend = %key, ?kind, %error, "fetch failed; serving the last known document as stale");
                    } else {
                        tracing::warn!(backend = %key, ?kind, %error, "fetch failed; the backend is left out until it answers");
                    }
                }
                if kind == Kind::Discovery {
                    state.discovery_fresh = false;
                }
            }
        }
        if state.dirty.remove(&kind) {
            self.schedule(&key, kind);
        }
        match kind {
            Kind::Discovery => self.rebuild_discovery(),
            Kind::OpenApiV2 => self.rebuild_openapi_v2(),
            Kind::OpenApiV3 => self.rebuild_openapi_v3(),
        }
        self.check_synced();
    }

    fn check_synced(&mut self) {
        if self.current.generation > 0 && self.first_round.as_ref().is_some_and(BTreeSet::is_empty) {
            self.first_round = None;
            self.synced_tx.send_replace(true);
            tracing::info!("discovery and OpenAPI documents fetched from every backend once");
        }
    }

    fn rebuild_all(&mut self) {
        self.rebuild_discovery();
        self.rebuild_openapi_v2();
        self.rebuild_openapi_v3();
    }

    fn rebuild_discovery(&self) {
        let mut entries = Vec::new();
        let mut local = LocalPriorities::new();
        for group in self.current.groups() {
            for route in &group.versions {
                let a = &route.apiservice;
                let Some(service) = &a.service else {
                    local.insert(
                        (a.group.to_string(), a.version.to_string()),
                        (a.group_priority_minimum, a.version_priority),
                    );
                    continue;
                };
                let Some(state) = self.backends.get(&service.key()) else { continue };
                let Some(discovered) = &state.discovery else { continue };
                let key = (a.group.to_string(), a.version.to_string());
                let mut discovery = discovered
                    .versions
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| ApiVersionDiscovery { version: a.version.to_string(), ..Default::default() });
                if !state.discovery_fresh {
                    discovery.freshness = FRESHNESS_STALE.to_owned();
                } else if discovery.freshness.is_empty() {
                    discovery.freshness = FRESHNESS_CURRENT.to_owned();
                }
                entries.push(VersionEntry {
                    group: key.0,
                    source: Source::Remote,
                    group_priority_minimum: a.group_priority_minimum,
                    version_priority: a.version_priority,
                    discovery,
                });
            }
        }
        if let Some(apis) = &self.delegate_value.apis {
            entries.extend(aggregated::delegate_entries(apis, &local));
        }
        if self.settings.serves_apiregistration {
            entries.push(aggregated::apiregistration_entry());
        }
        if self.settings.delegate_expected && self.delegate_value.apis.is_none() {
            self.documents.aggregated.store(None);
            return;
        }
        let published = publish_aggregated(&aggregated::merge(entries));
        if self.documents.aggregated.load().as_ref().is_none_or(|current| current.hash() != published.hash()) {
            self.documents.aggregated.store(Some(Arc::new(published)));
        }
    }

    /// Backends in OpenAPI priority order: best group priority first, then APIService name.
    fn ranked_backends(&self) -> Vec<(&String, &BackendState)> {
        let mut ranked: Vec<_> = self
            .backends
            .iter()
            .filter_map(|(key, state)| Some(((self.inputs.get(key)?.rank.clone()), key, state)))
            .collect();
        ranked.sort_by(|a, b| b.0 .0.cmp(&a.0 .0).then_with(|| a.0 .1.cmp(&b.0 .1)));
        ranked.into_iter().map(|(_, key, state)| (key, state)).collect()
    }

    fn rebuild_openapi_v2(&self) {
        // Each backend's spec keeps the paths of the group-versions its APIServices register,
        // as kube-aggregator filters each APIService's spec to `/apis/<group>/<version>/`.
        let remote: Vec<(Value, Vec<String>)> = self
            .ranked_backends()
            .into_iter()
            .filter_map(|(key, state)| {
                let spec = state.v2.as_ref()?.0.as_deref().cloned()?;
                let prefixes = self.inputs.get(key)?.signature.group_versions.iter();
                Some((spec, prefixes.map(|(g, v)| format!("/apis/{g}/{v}/")).collect()))
            })
            .collect();
        let local = self.delegate_value.openapi_v2.as_deref().cloned();
        let published = openapi::publish_v2(&openapi::merge_v2(local, remote));
        if published.hash() != self.documents.openapi_v2.load().hash() {
            self.documents.openapi_v2.store(Arc::new(published));
        }
    }

    fn rebuild_openapi_v3(&self) {
        let mut remote = BTreeMap::new();
        for (_, state) in self.ranked_backends() {
            for (path, (_, bytes)) in &state.v3 {
                remote.entry(path.clone()).or_insert_with(|| bytes.clone());
            }
        }
        if self.settings.serves_apiregistration {
            remote.insert(openapi::APIREGISTRATION_V3_PATH.to_owned(), Bytes::from_static(openapi::APIREGISTRATION_V3));
        }
        let built = openapi::build_v3(remote, &self.delegate_value.openapi_v3_paths);
        if built.root.hash() != self.documents.openapi_v3.load().root.hash() {
            self.documents.openapi_v3.store(Arc::new(built));
        }
    }
}

/// The next delegate value, or `None` once the sender is gone (then never polled again).
async fn changed(delegate: &mut Option<watch::Receiver<Arc<DelegateDiscovery>>>) -> Option<Arc<DelegateDiscovery>> {
    match delegate {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Groups the table's remote APIServices by backend service.
fn backend_inputs(table: &RoutingTable) -> HashMap<String, BackendInputs> {
    let group_priority: HashMap<&str, i32> = table
        .groups()
        .iter()
        .map(|g| {
            let best = g
                .versions
                .iter()
                .filter(|r| !r.apiservice.is_local())
                .map(|r| r.apiservice.group_priority_minimum)
                .max()
                .unwrap_or(0);
            (&*g.name, best)
        })
        .collect();
    let mut inputs: HashMap<String, BackendInputs> = HashMap::new();
    for group in table.groups() {
        for route in &group.versions {
            let a = &route.apiservice;
            let (Some(service), Upstream::Remote(remote)) = (&a.service, &route.upstream) else { continue };
            let rank = (group_priority.get(&*a.group).copied().unwrap_or(0), a.name.to_string());
            let entry = inputs.entry(service.key()).or_insert_with(|| BackendInputs {
                signature: Signature {
                    service: service.clone(),
                    group_versions: BTreeSet::new(),
                    targets: match &remote.endpoints {
                        Ok(e) => Ok(e.all().iter().map(|e| e.authority().to_string()).collect()),
                        Err(e) => Err(e.to_string()),
                    },
                },
                route: route.clone(),
                rank: rank.clone(),
            });
            entry.signature.group_versions.insert((a.group.to_string(), a.version.to_string()));
            if rank.0 > entry.rank.0 || (rank.0 == entry.rank.0 && rank.1 < entry.rank.1) {
                entry.rank = rank;
            }
        }
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backends;
    use crate::routing::StaticResolver;

    use crate::apiservice::testing::apiservice;

    fn items(documents: &DiscoveryDocuments) -> Vec<String> {
        let list: ApiGroupDiscoveryList = serde_json::from_slice(documents.aggregated().unwrap().body()).unwrap();
        list.items.into_iter().map(|g| g.metadata.name).collect()
    }

    #[tokio::test]
    async fn delegate_groups_are_ordered_by_local_priorities_and_unreachable_backends_left_out() {
        // A remote APIService whose service resolves nowhere, and two local ones.
        let mut table = RoutingTable::build(
            &[
                apiservice("v1.apps", 17800, 15, None),
                apiservice("v1.crd.io", 1000, 100, None),
                apiservice("v1beta1.metrics.k8s.io", 100, 100, Some("nowhere")),
            ]
            .map(Arc::new),
            &StaticResolver::default(),
            &Backends::default(),
        );
        table.generation = 1;
        let shared: SharedTable = Arc::new(ArcSwap::from_pointee(table));
        let (delegate_tx, delegate_rx) = watch::channel(Arc::new(DelegateDiscovery::default()));
        let (fetcher, documents) = Fetcher::new(shared, FetcherSettings::default(), delegate_rx);
        let task = tokio::spawn(fetcher.run());
        tokio::time::timeout(Duration::from_secs(5), documents.synced()).await.unwrap();
        // No delegate document and the backend never answered: nothing to list.
        assert!(items(&documents).is_empty());

        let apis: ApiGroupDiscoveryList = serde_json::from_value(serde_json::json!({"items": [
            {"metadata": {"name": "crd.io"}, "versions": [{"version": "v1"}]},
            {"metadata": {"name": "apps"}, "versions": [{"version": "v1"}]},
            {"metadata": {"name": "unregistered.io"}, "versions": [{"version": "v1"}]},
        ]}))
        .unwrap();
        delegate_tx.send_replace(Arc::new(DelegateDiscovery { apis: Some(Arc::new(apis)), ..Default::default() }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while items(&documents).is_empty() && Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        // apps 17800, then crd.io and unregistered.io at 1000 (kube's default), by name.
        assert_eq!(items(&documents), ["apps", "crd.io", "unregistered.io"]);
        task.abort();
    }

    #[tokio::test]
    async fn with_a_delegate_the_aggregated_document_waits_for_the_delegates_own() {
        let mut table = RoutingTable::build(
            &[apiservice("v1.apps", 17800, 15, None)].map(Arc::new),
            &StaticResolver::default(),
            &Backends::default(),
        );
        table.generation = 1;
        let shared: SharedTable = Arc::new(ArcSwap::from_pointee(table));
        let (delegate_tx, delegate_rx) = watch::channel(Arc::new(DelegateDiscovery::default()));
        let settings = FetcherSettings { delegate_expected: true, ..FetcherSettings::default() };
        let (fetcher, documents) = Fetcher::new(shared, settings, delegate_rx);
        let task = tokio::spawn(fetcher.run());
        tokio::time::timeout(Duration::from_secs(5), documents.synced()).await.unwrap();
        assert!(documents.aggregated().is_none(), "served without the delegate's groups");
        let apis = ApiGroupDiscoveryList::new(vec![aggregated::ApiGroupDiscovery {
            metadata: aggregated::GroupMeta { name: "apps".into() },
            versions: vec![ApiVersionDiscovery { version: "v1".into(), ..Default::default() }],
        }]);
        delegate_tx.send_replace(Arc::new(DelegateDiscovery { apis: Some(Arc::new(apis)), ..Default::default() }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while documents.aggregated().is_none() && Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(items(&documents), ["apps"]);
        task.abort();
    }
}

//! The proxy's own `apiregistration.k8s.io/v1` API in standalone mode, read-only: `list`,
//! `get` and `watch` of `apiservices`, so `kubectl get apiservices`, `get -w`, `-o yaml` and
//! `describe` work against the proxy as against kube-apiserver. In cluster mode these paths go
//! to kube-apiserver, which owns the real objects.
//!
//! The objects are the loaded manifests (spec, labels, annotations, caBundle included) with
//! `status.conditions` from the proxy's own availability view, the same one `check` and
//! `/debug/apiservices` show. A background task publishes a [`Snapshot`] of them whenever the
//! routing table or a condition changes; each snapshot has a sequence number that is the
//! list's `resourceVersion`, and each object's `resourceVersion` is the sequence of its last
//! change, so a watch from a list's version sends exactly what changed since (the last
//! [`HISTORY`] snapshots are kept; an older version is kube's 410 Expired).
//!
//! Writes are 405 MethodNotAllowed: APIServices come from the manifest directory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::availability::{Availability, Condition};
use crate::routing::writer::SharedTable;
use crate::status::Status;

pub const GROUP: &str = "apiregistration.k8s.io";
pub const VERSION: &str = "v1";
const RESOURCE: &str = "apiservices";
/// How often the publisher looks at the table and the conditions.
const POLL: Duration = Duration::from_millis(500);
/// Snapshots kept for watches that start from an earlier list.
pub const HISTORY: usize = 64;
/// A watch without `timeoutSeconds` ends after this, as kube-apiserver's do (30-60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One APIService object as served, without its `resourceVersion` (added when written).
#[derive(Debug, Clone, PartialEq)]
struct Object {
    /// The object's JSON; `metadata.resourceVersion` is filled in per response.
    json: Value,
    /// The sequence of the snapshot in which it last changed.
    rv: u64,
    /// Seconds since the epoch when the proxy first loaded it (`creationTimestamp`).
    created: u64,
    service: String,
    available: String,
}

/// Every APIService object at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    seq: u64,
    objects: BTreeMap<String, Arc<Object>>,
}

/// The published objects, and the recent past for watches.
pub struct Registry {
    current: watch::Sender<Arc<Snapshot>>,
    history: Mutex<VecDeque<Arc<Snapshot>>>,
    /// Where the objects come from, for the 405's words.
    source: String,
    table: SharedTable,
    availability: Arc<Availability>,
    build: Mutex<BuildState>,
}

/// What the last snapshot was built from: nothing is rebuilt until one of them changes (10,000
/// APIServices are not serialized twice a second for nothing), and when each object was first
/// seen (its `creationTimestamp`).
#[derive(Default)]
struct BuildState {
    built_from: Option<(Arc<crate::routing::RoutingTable>, u64)>,
    created: BTreeMap<String, u64>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// kube's printer for the AVAILABLE column.
fn available_cell(condition: Option<&Condition>) -> String {
    match condition {
        None => "Unknown".into(),
        Some(c) if c.status == "True" => "True".into(),
        Some(c) => format!("{} ({:?})", c.status, c.reason),
    }
}

impl Registry {
    /// `source` names where the APIServices come from (the manifest directory).
    pub fn new(source: String, table: SharedTable, availability: Arc<Availability>) -> Arc<Self> {
        let (current, _) = watch::channel(Arc::new(Snapshot::default()));
        Arc::new(Self {
            current,
            history: Mutex::new(VecDeque::new()),
            source,
            table,
            availability,
            build: Mutex::new(BuildState::default()),
        })
    }

    fn at(&self, seq: u64) -> Option<Arc<Snapshot>> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.iter().find(|s| s.seq == seq).cloned()
    }

    /// Publishes changes every [`POLL`] for open watches; runs until the process ends. With no
    /// watch open nothing is built: the objects of 10,000 APIServices are tens of megabytes,
    /// and a list or get builds the snapshot of the moment itself.
    pub async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            ticker.tick().await;
            if self.current.receiver_count() > 0 {
                self.latest();
            }
        }
    }

    /// The current snapshot, rebuilt first if the table or a condition changed since the last
    /// one: a request always sees the state of the moment, not of the last poll.
    fn latest(&self) -> Arc<Snapshot> {
        let mut build = self.build.lock().unwrap_or_else(|e| e.into_inner());
        let table = self.table.load_full();
        let version = self.availability.version();
        if build.built_from.as_ref().is_some_and(|(t, v)| Arc::ptr_eq(t, &table) && *v == version) {
            return self.current.borrow().clone();
        }
        build.built_from = Some((table.clone(), version));
        let previous = self.current.borrow().clone();
        let seq = previous.seq + 1;
        let mut objects = BTreeMap::new();
        for route in table.groups().iter().flat_map(|g| &g.versions) {
            let a = &route.apiservice;
            let name = a.name.to_string();
            let created = *build.created.entry(name.clone()).or_insert_with(now);
            let condition = self.availability.condition(&a.name);
            let json = object(a, condition.as_ref(), created);
            let object = match previous.objects.get(&name) {
                Some(old) if old.json == json => old.clone(),
                _ => Arc::new(Object {
                    json,
                    rv: seq,
                    created,
                    service: a
                        .service
                        .as_ref()
                        .map_or_else(|| "Local".to_owned(), |s| format!("{}/{}", s.namespace, s.name)),
                    available: available_cell(condition.as_ref()),
                }),
            };
            objects.insert(name, object);
        }
        build.created.retain(|name, _| objects.contains_key(name));
        let changed = objects.len() != previous.objects.len()
            || objects.iter().any(|(name, o)| previous.objects.get(name).is_none_or(|p| !Arc::ptr_eq(p, o)));
        if !changed && previous.seq != 0 {
            return previous;
        }
        let snapshot = Arc::new(Snapshot { seq, objects });
        {
            let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(snapshot.clone());
        }
        self.current.send_replace(snapshot.clone());
        snapshot
    }
}

/// The APIService object kube would show for `a`.
fn object(a: &crate::apiservice::ApiService, condition: Option<&Condition>, created: u64) -> Value {
    use base64::Engine;
    let mut metadata = json!({"name": &*a.name, "creationTimestamp": rfc3339(created)});
    if !a.meta.labels.is_empty() {
        metadata["labels"] = json!(&*a.meta.labels);
    }
    if !a.meta.annotations.is_empty() {
        metadata["annotations"] = json!(&*a.meta.annotations);
    }
    let mut spec = json!({
        "group": &*a.group,
        "version": &*a.version,
        "groupPriorityMinimum": a.group_priority_minimum,
        "versionPriority": a.version_priority,
    });
    if let Some(s) = &a.service {
        spec["service"] = json!({"namespace": &*s.namespace, "name": &*s.name, "port": s.port});
        if !s.ca_bundle.is_empty() {
            spec["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(&s.ca_bundle));
        }
        if s.insecure_skip_tls_verify {
            spec["insecureSkipTLSVerify"] = json!(true);
        }
    }
    let conditions: Vec<Value> = condition
        .map(|c| {
            json!({
                "type": "Available",
                "status": c.status,
                "lastTransitionTime": rfc3339(c.last_transition_time),
                "reason": format!("{:?}", c.reason),
                "message": c.message,
            })
        })
        .into_iter()
        .collect();
    let status = if conditions.is_empty() { json!({}) } else { json!({ "conditions": conditions }) };
    json!({"kind": "APIService", "apiVersion": "apiregistration.k8s.io/v1", "metadata": metadata, "spec": spec, "status": status})
}

/// `o` as written: its JSON with `metadata.resourceVersion`.
fn with_rv(o: &Object) -> Value {
    let mut json = o.json.clone();
    json["metadata"]["resourceVersion"] = json!(o.rv.to_string());
    json
}

/// kube's `duration.HumanDuration`, for the AGE column.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (m, h) = (s / 60, s / 3600);
    let with = |big: u64, unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{unit}")
        } else {
            format!("{big}{unit}{small}{small_unit}")
        }
    };
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        with(m, "m", s % 60, "s")
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        with(h, "h", m % 60, "m")
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        with(h / 24, "d", h % 24, "h")
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else if h < 24 * 365 * 8 {
        with(h / 24 / 365, "y", (h / 24) % 365, "d")
    } else {
        format!("{}y", h / 24 / 365)
    }
}

/// What a list or watch asks for.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    watch: Option<String>,
    resource_version: Option<String>,
    timeout_seconds: Option<u64>,
    field_selector: Option<String>,
    label_selector: Option<String>,
    include_object: Option<String>,
}

impl ListQuery {
    fn is_watch(&self) -> bool {
        self.watch.as_deref().is_some_and(|w| w != "0" && !w.eq_ignore_ascii_case("false"))
    }

    /// `metadata.name=X` (or `==`), the one field selector kubectl sends here.
    fn name(&self) -> Result<Option<&str>, String> {
        let Some(selector) = self.field_selector.as_deref().filter(|s| !s.is_empty()) else { return Ok(None) };
        let rest = selector.strip_prefix("metadata.name").ok_or_else(|| {
            format!("field label not supported: {}", selector.split(['=', '!']).next().unwrap_or(selector))
        })?;
        let name = rest
            .strip_prefix("==")
            .or_else(|| rest.strip_prefix('='))
            .ok_or("only metadata.name=<name> is supported")?;
        Ok(Some(name))
    }

    /// Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated.
    fn labels_match(&self, labels: &Value) -> bool {
        let Some(selector) = self.label_selector.as_deref().filter(|s| !s.is_empty()) else { return true };
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                label(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                label(k.trim()) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                label(k.trim()).is_none()
            } else {
                label(term).is_some()
            }
        })
    }
}

/// Whether the client asked for a server-side Table (`as=Table;g=meta.k8s.io;v=v1`).
fn wants_table(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        params.contains(&"as=Table") && params.contains(&"g=meta.k8s.io") && params.contains(&"v=v1")
    })
}

const TABLE_CONTENT_TYPE: &str = "application/json;as=Table;g=meta.k8s.io;v=v1";

fn column_definitions() -> Value {
    json!([
        {"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names", "priority": 0},
        {"name": "Service", "type": "string", "format": "", "description": "The reference to the service that hosts this API endpoint.", "priority": 0},
        {"name": "Available", "type": "string", "format": "", "description": "Whether this service is available.", "priority": 0},
        {"name": "Age", "type": "string", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata", "priority": 0},
    ])
}

fn row(o: &Object, include: Option<&str>) -> Value {
    let age = human_duration(Duration::from_secs(now().saturating_sub(o.created)));
    let mut row = json!({"cells": [o.json["metadata"]["name"], o.service, o.available, age]});
    let full = with_rv(o);
    match include.unwrap_or("Metadata") {
        "None" => {}
        "Object" => row["object"] = full,
        _ => {
            row["object"] =
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": full["metadata"]})
        }
    }
    row
}

fn table(objects: &[&Object], rv: u64, query: &ListQuery) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": column_definitions(),
        "rows": objects.iter().map(|o| row(o, query.include_object.as_deref())).collect::<Vec<_>>(),
    })
}

fn json_response(content_type: &'static str, value: &Value) -> Response {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response()
}

fn status(code: StatusCode, reason: &'static str, message: String) -> Response {
    Status::failure(code, reason, message).into_response()
}

fn not_found(name: &str) -> Response {
    let mut s = Status::failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("apiservices.apiregistration.k8s.io {name:?} not found"),
    );
    s.details = Some(crate::status::StatusDetails {
        name: Some(name.to_owned()),
        group: Some(GROUP.into()),
        kind: Some(RESOURCE.into()),
        ..Default::default()
    });
    s.into_response()
}

/// The routes, for the proxy's own router.
pub fn router(registry: Arc<Registry>) -> Router {
    let refuse = |registry: Arc<Registry>| {
        move || {
            let registry = registry.clone();
            async move {
                status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!(
                        "APIServices are read-only here: this proxy loads them from {}; change the manifests there",
                        registry.source
                    ),
                )
            }
        }
    };
    Router::new()
        .route("/apis/apiregistration.k8s.io", get(group_document))
        .route("/apis/apiregistration.k8s.io/", get(group_document))
        .route("/apis/apiregistration.k8s.io/v1", get(resource_list))
        .route("/apis/apiregistration.k8s.io/v1/", get(resource_list))
        .route("/apis/apiregistration.k8s.io/v1/apiservices", get(list).fallback(refuse(registry.clone())))
        .route("/apis/apiregistration.k8s.io/v1/apiservices/{name}", get(one).fallback(refuse(registry.clone())))
        .route("/apis/apiregistration.k8s.io/v1/apiservices/{name}/status", get(one).fallback(refuse(registry.clone())))
        .with_state(registry)
}

async fn group_document() -> Response {
    let v1 = json!({"groupVersion": "apiregistration.k8s.io/v1", "version": "v1"});
    json_response(
        "application/json",
        &json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [v1], "preferredVersion": v1}),
    )
}

async fn resource_list() -> Response {
    json_response(
        "application/json",
        &json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "apiregistration.k8s.io/v1",
            "resources": [
                {"name": "apiservices", "singularName": "apiservice", "namespaced": false, "kind": "APIService",
                 "verbs": ["get", "list", "watch"], "categories": ["api-extensions"]},
                {"name": "apiservices/status", "singularName": "", "namespaced": false, "kind": "APIService",
                 "verbs": ["get"]},
            ],
        }),
    )
}

async fn one(State(registry): State<Arc<Registry>>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let snapshot = registry.latest();
    let Some(object) = snapshot.objects.get(&name) else { return not_found(&name) };
    if wants_table(&headers) {
        return json_response(TABLE_CONTENT_TYPE, &table(&[object], snapshot.seq, &ListQuery::default()));
    }
    json_response("application/json", &with_rv(object))
}

async fn list(State(registry): State<Arc<Registry>>, Query(query): Query<ListQuery>, headers: HeaderMap) -> Response {
    let name = match query.name() {
        Ok(name) => name.map(str::to_owned),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let selected = |o: &Object| {
        name.as_deref().is_none_or(|n| o.json["metadata"]["name"] == n)
            && query.labels_match(&o.json["metadata"]["labels"])
    };
    let as_table = wants_table(&headers);
    if query.is_watch() {
        return watch_response(registry, query, as_table, name);
    }
    let snapshot = registry.latest();
    let objects: Vec<&Object> = snapshot.objects.values().map(|o| &**o).filter(|o| selected(o)).collect();
    if as_table {
        return json_response(TABLE_CONTENT_TYPE, &table(&objects, snapshot.seq, &query));
    }
    json_response(
        "application/json",
        &json!({
            "kind": "APIServiceList",
            "apiVersion": "apiregistration.k8s.io/v1",
            "metadata": {"resourceVersion": snapshot.seq.to_string()},
            "items": objects.iter().map(|o| with_rv(o)).collect::<Vec<_>>(),
        }),
    )
}

/// Watch events between two snapshots, in name order: ADDED, MODIFIED, DELETED.
fn events(from: &Snapshot, to: &Snapshot) -> Vec<(&'static str, Arc<Object>)> {
    let mut out = Vec::new();
    for (name, object) in &to.objects {
        match from.objects.get(name) {
            None => out.push(("ADDED", object.clone())),
            Some(old) if !Arc::ptr_eq(old, object) => out.push(("MODIFIED", object.clone())),
            Some(_) => {}
        }
    }
    for (name, object) in &from.objects {
        if !to.objects.contains_key(name) {
            out.push(("DELETED", object.clone()));
        }
    }
    out
}

fn watch_response(registry: Arc<Registry>, query: ListQuery, as_table: bool, name: Option<String>) -> Response {
    // No version (or "0"): every current object as ADDED, then changes; a version: the changes
    // since that list, if it is recent enough.
    let start = match query.resource_version.as_deref().filter(|v| !v.is_empty() && *v != "0") {
        None => Arc::new(Snapshot::default()),
        Some(v) => match v.parse().ok().and_then(|seq| registry.at(seq)) {
            Some(snapshot) => snapshot,
            None if v.parse::<u64>().ok() == Some(registry.latest().seq) => registry.latest(),
            None => {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    format!("too old resource version: {v} ({})", registry.latest().seq),
                )
            }
        },
    };
    let timeout = query.timeout_seconds.map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changes = registry.current.subscribe();
    changes.mark_changed();
    let include = query.include_object.clone();
    let encode = move |kind: &str, o: &Object| -> Bytes {
        let object = if as_table {
            let mut t = table(&[o], o.rv, &ListQuery { include_object: include.clone(), ..ListQuery::default() });
            if kind == "DELETED" {
                t["rows"][0]["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": with_rv(o)["metadata"]});
            }
            t
        } else {
            with_rv(o)
        };
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    };
    let stream = futures_util::stream::unfold((changes, start), move |(mut changes, last)| {
        let (encode, name) = (encode.clone(), name.clone());
        async move {
            loop {
                tokio::select! {
                    changed = changes.changed() => changed.ok()?,
                    () = tokio::time::sleep_until(deadline) => return None,
                }
                let next = changes.borrow_and_update().clone();
                let batch: Vec<u8> = events(&last, &next)
                    .into_iter()
                    .filter(|(_, o)| name.as_deref().is_none_or(|n| o.json["metadata"]["name"] == n))
                    .flat_map(|(kind, o)| encode(kind, &o).to_vec())
                    .collect();
                if !batch.is_empty() {
                    return Some((Ok::<_, std::convert::Infallible>(Bytes::from(batch)), (changes, next)));
                }
            }
        }
    });
    let content_type = if as_table { TABLE_CONTENT_TYPE } else { "application/json" };
    ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], Body::from_stream(stream)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_kubectls() {
        let cases = [
            (5, "5s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 + 5 * 60, "3h5m"),
            (10 * 3600, "10h"),
            (3 * 86400 + 3600, "3d1h"),
            (30 * 86400, "30d"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}");
        }
    }

    #[test]
    fn label_and_field_selectors() {
        let q = |labels: &str, fields: &str| ListQuery {
            label_selector: Some(labels.into()),
            field_selector: Some(fields.into()),
            ..ListQuery::default()
        };
        let labels = json!({"team": "blue", "tier": "x"});
        assert!(q("team=blue,tier", "").labels_match(&labels));
        assert!(!q("team!=blue", "").labels_match(&labels));
        assert!(q("!missing", "").labels_match(&labels));
        assert_eq!(q("", "metadata.name=v1.a.io").name(), Ok(Some("v1.a.io")));
        assert!(q("", "spec.group=a").name().is_err());
    }
}

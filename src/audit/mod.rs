//! Audit: kube-apiserver's audit events (`audit.k8s.io/v1`) for what passes through the proxy,
//! filtered by a kube audit policy and written as JSON lines (`--audit-policy-file`,
//! `--audit-log-*`). Off unless both a policy and a log path are given, as in kube.
//!
//! The stages follow kube's filter chain. A request is judged by the policy once it is
//! authenticated, as the user who sent it (not the one it impersonates); `RequestReceived` is
//! written then, before impersonation and authorization. Long-running requests (watches,
//! exec, ...) get `ResponseStarted` when their response headers go out. `ResponseComplete` is
//! written when the response body has been sent (or abandoned), by the [`RequestAudit`]
//! that the body carries. A request that fails authentication gets one event, at
//! `ResponseStarted`, with an empty user, as kube's `WithFailedAuthenticationAudit` writes.
//!
//! kube-apiserver records requests it proxies to extension servers at Metadata level only
//! (kubernetes/kubernetes#103889): it never decodes their bodies. This proxy does what the
//! policy asks: at `Request` and `RequestResponse` it keeps the JSON request and response
//! bodies of resource requests, each at most `--audit-log-truncate-max-event-size` bytes, and
//! like kube's truncate backend drops them (with the annotation `audit.k8s.io/truncated`)
//! from an event that would be larger. Other content types (protobuf, CBOR, YAML apply
//! patches) are never recorded.

pub mod event;
pub mod log;
pub mod policy;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use http_body::{Frame, SizeHint};

use crate::auth::UserInfo;
use crate::metrics::Metrics;
use crate::server::request_info::RequestInfo;
use event::{Event, Level, ObjectRef, ResponseStatus, Stage, User};
use log::AuditLog;
pub use log::LogSettings;
pub use policy::Policy;

/// kube's `--audit-log-truncate-max-event-size` default.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 102_400;

/// The annotation kube's truncate backend sets on an event whose bodies it dropped.
const TRUNCATED_ANNOTATION: &str = "audit.k8s.io/truncated";
const DECISION_ANNOTATION: &str = "authorization.k8s.io/decision";
const REASON_ANNOTATION: &str = "authorization.k8s.io/reason";

/// The validated audit configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub policy: Policy,
    pub log: LogSettings,
    /// Events larger than this lose their bodies; still larger ones are dropped.
    pub max_event_bytes: usize,
}

/// The audit policy and log, shared by every request.
#[derive(Debug)]
pub struct Auditor {
    policy: Policy,
    log: AuditLog,
    max_event_bytes: usize,
    metrics: Arc<Metrics>,
}

/// What audit reads of a request before anything consumes it.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub remote: IpAddr,
    pub audit_id: &'a str,
    pub received: SystemTime,
}

impl Auditor {
    /// Starts the log's writer thread.
    pub fn start(settings: AuditSettings, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let log = AuditLog::start(settings.log, metrics.clone())?;
        Ok(Self { policy: settings.policy, log, max_event_bytes: settings.max_event_bytes, metrics })
    }

    fn decide(&self, head: &RequestHead<'_>, info: &RequestInfo<'_>, user: Option<&UserInfo>) -> policy::Decision {
        let verb = info.verb.as_str();
        let attributes = policy::Attributes {
            user: user.map(|u| (u.name.as_str(), u.groups.as_slice())),
            verb: &verb,
            resource_request: info.is_resource_request,
            group: info.api_group,
            namespace: info.namespace,
            resource: info.resource,
            subresource: info.subresource,
            name: &info.name,
            path: head.uri.path(),
        };
        let decision = self.policy.evaluate(&attributes);
        self.metrics.audit_level(decision.level.as_str());
        decision
    }

    fn event(&self, head: &RequestHead<'_>, info: &RequestInfo<'_>, level: Level, user: User) -> Event {
        let object_ref = info.is_resource_request.then(|| ObjectRef {
            resource: info.resource.to_owned(),
            namespace: info.namespace.to_owned(),
            name: info.name.clone().into_owned(),
            api_group: info.api_group.to_owned(),
            api_version: info.api_version.to_owned(),
            subresource: info.subresource.to_owned(),
        });
        let received = event::micro_time(head.received);
        Event {
            kind: "Event",
            api_version: "audit.k8s.io/v1",
            level,
            audit_id: head.audit_id.to_owned(),
            stage: Stage::RequestReceived,
            request_uri: head.uri.path_and_query().map_or_else(|| head.uri.path().to_owned(), |pq| pq.to_string()),
            verb: info.verb.as_str().into_owned(),
            user,
            impersonated_user: None,
            source_ips: event::source_ips(head.headers, head.remote),
            user_agent: event::user_agent(head.headers),
            object_ref,
            response_status: None,
            request_object: None,
            response_object: None,
            stage_timestamp: received.clone(),
            request_received_timestamp: received,
            annotations: BTreeMap::new(),
        }
    }

    /// Serializes and queues one event, without its bodies if it is too large; an event too
    /// large even then is dropped and counted, as kube's truncate backend does.
    fn write(&self, event: &mut Event) {
        let Ok(mut line) = serde_json::to_string(event) else { return };
        if line.len() >= self.max_event_bytes {
            if event.level < Level::Request {
                self.metrics.audit_error("truncate");
                return;
            }
            event.request_object = None;
            event.response_object = None;
            event.annotations.insert(TRUNCATED_ANNOTATION, "true".into());
            match serde_json::to_string(event) {
                Ok(l) if l.len() < self.max_event_bytes => line = l,
                _ => {
                    self.metrics.audit_error("truncate");
                    return;
                }
            }
        }
        self.log.send(line);
    }

    /// A request that failed authentication: one event at `ResponseStarted`, with no user.
    pub fn unauthenticated(&self, head: &RequestHead<'_>, status: ResponseStatus) {
        let info = RequestInfo::parse(head.method, head.uri.path(), head.uri.query());
        let decision = self.decide(head, &info, None);
        if !decision.records(Stage::ResponseStarted) {
            return;
        }
        let mut event = self.event(head, &info, decision.level, User::default());
        event.stage = Stage::ResponseStarted;
        event.stage_timestamp = event::micro_time(SystemTime::now());
        event.response_status = Some(status);
        self.write(&mut event);
    }

    /// An authenticated request: its record, if the policy records it at all. Writes
    /// `RequestReceived`.
    pub fn begin(self: &Arc<Self>, head: &RequestHead<'_>, user: &UserInfo) -> Option<RequestAudit> {
        let info = RequestInfo::parse(head.method, head.uri.path(), head.uri.query());
        let decision = self.decide(head, &info, Some(user));
        if decision.level == Level::None {
            return None;
        }
        let bodies = info.is_resource_request && decision.level >= Level::Request;
        let mut audit = RequestAudit {
            event: self.event(head, &info, decision.level, User::from(user)),
            auditor: self.clone(),
            long_running: info.is_long_running(),
            request_body: (bodies && is_json(head.headers)).then(|| Capture::new(self.max_event_bytes)),
            response_body: None,
            record_response_body: bodies && decision.level == Level::RequestResponse,
            decision,
        };
        audit.emit(Stage::RequestReceived);
        Some(audit)
    }
}

/// Whether a body of these headers is JSON (`application/json`, or any `+json` type).
fn is_json(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| {
        let essence = t.split(';').next().unwrap_or_default().trim();
        essence.eq_ignore_ascii_case("application/json") || essence.to_ascii_lowercase().ends_with("+json")
    })
}

/// One request's event as it grows. The response body carries it; when the body is done
/// (sent, failed, or dropped by a client that went away), `ResponseComplete` is written.
#[derive(Debug)]
pub struct RequestAudit {
    auditor: Arc<Auditor>,
    decision: policy::Decision,
    event: Event,
    long_running: bool,
    request_body: Option<Capture>,
    response_body: Option<Capture>,
    record_response_body: bool,
}

impl RequestAudit {
    fn emit(&mut self, stage: Stage) {
        if !self.decision.records(stage) {
            return;
        }
        self.event.stage = stage;
        // kube: a RequestReceived event's stage time is the time the request was received.
        if stage != Stage::RequestReceived {
            self.event.stage_timestamp = event::micro_time(SystemTime::now());
        }
        if stage == Stage::ResponseComplete {
            let omit_managed_fields = self.decision.omit_managed_fields;
            self.event.request_object = self.request_body.as_ref().and_then(|c| c.json(omit_managed_fields));
            self.event.response_object = self.response_body.as_ref().and_then(|c| c.json(omit_managed_fields));
        }
        let mut event = self.event.clone();
        self.auditor.write(&mut event);
    }

    /// The user it acts as, once impersonation is allowed.
    pub fn impersonated(&mut self, user: &UserInfo) {
        self.event.impersonated_user = Some(User::from(user));
    }

    /// The authorizer's decision, as kube's authorization filter annotates it.
    pub fn authorized(&mut self, allowed: bool, reason: &str) {
        let decision = if allowed { "allow" } else { "forbid" };
        self.event.annotations.insert(DECISION_ANNOTATION, decision.into());
        self.event.annotations.insert(REASON_ANNOTATION, reason.into());
    }

    /// The request with its body recorded as it streams, when the policy asks for it.
    pub fn record_request_body(&self, request: http::Request<Body>) -> http::Request<Body> {
        match &self.request_body {
            Some(capture) => request.map(|body| Body::new(Tee { inner: body, capture: capture.clone() })),
            None => request,
        }
    }

    /// The response's status, and `ResponseStarted` for a long-running request; the body is
    /// recorded as it streams when the policy asks for it.
    pub fn respond(&mut self, response: http::Response<Body>) -> http::Response<Body> {
        let status = match response.extensions().get::<ResponseStatus>() {
            Some(s) => s.clone(),
            None => ResponseStatus { code: response.status().as_u16(), ..ResponseStatus::default() },
        };
        self.event.response_status = Some(status);
        if self.long_running {
            self.emit(Stage::ResponseStarted);
        }
        if !self.record_response_body || self.long_running || !is_json(response.headers()) {
            return response;
        }
        let capture = Capture::new(self.auditor.max_event_bytes);
        self.response_body = Some(capture.clone());
        response.map(|body| Body::new(Tee { inner: body, capture }))
    }
}

impl Drop for RequestAudit {
    fn drop(&mut self) {
        self.emit(Stage::ResponseComplete);
    }
}

/// A body's first bytes, up to a limit; past it only that it was longer.
#[derive(Debug, Clone)]
struct Capture(Arc<Mutex<CaptureState>>);

#[derive(Debug)]
struct CaptureState {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Self(Arc::new(Mutex::new(CaptureState { bytes: Vec::new(), limit, overflowed: false })))
    }

    fn push(&self, data: &[u8]) {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if state.overflowed {
            return;
        }
        if state.bytes.len() + data.len() > state.limit {
            state.overflowed = true;
            state.bytes = Vec::new();
            return;
        }
        state.bytes.extend_from_slice(data);
    }

    /// The body as JSON, when it was complete JSON within the limit.
    fn json(&self, omit_managed_fields: bool) -> Option<serde_json::Value> {
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if state.overflowed || state.bytes.is_empty() {
            return None;
        }
        let mut value: serde_json::Value = serde_json::from_slice(&state.bytes).ok()?;
        if omit_managed_fields {
            strip_managed_fields(&mut value);
        }
        Some(value)
    }
}

/// `metadata.managedFields` of an object and of a list's items, as kube's `omitManagedFields`.
fn strip_managed_fields(value: &mut serde_json::Value) {
    if let Some(metadata) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        metadata.remove("managedFields");
    }
    if let Some(items) = value.get_mut("items").and_then(|i| i.as_array_mut()) {
        items.iter_mut().for_each(strip_managed_fields);
    }
}

/// A body passed through unchanged, its data also given to a [`Capture`].
struct Tee {
    inner: Body,
    capture: Capture,
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame {
            if let Some(data) = frame.data_ref() {
                this.capture.push(data);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_keep_json_within_the_limit_and_strip_managed_fields_when_asked() {
        let capture = Capture::new(64);
        capture.push(br#"{"metadata":{"name":"a","managedFields":[1]},"#);
        capture.push(br#""spec":{}}"#);
        assert_eq!(capture.json(false).unwrap()["metadata"]["managedFields"], serde_json::json!([1]));
        assert_eq!(capture.json(true).unwrap(), serde_json::json!({"metadata": {"name": "a"}, "spec": {}}));
        capture.push(&[b' '; 64]);
        assert_eq!(capture.json(false), None, "past the limit nothing is kept");
        let partial = Capture::new(64);
        partial.push(br#"{"a":"#);
        assert_eq!(partial.json(false), None);
    }

    #[test]
    fn json_is_told_by_content_type() {
        let with = |t: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, t.parse().unwrap());
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("application/apply-patch+yaml"));
        assert!(!with("application/vnd.kubernetes.protobuf"));
        assert!(!is_json(&HeaderMap::new()));
    }
}

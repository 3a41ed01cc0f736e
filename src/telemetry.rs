//! OpenTelemetry tracing, configured as kube-apiserver's `--tracing-config-file`
//! (`apiserver.config.k8s.io/v1` `TracingConfiguration`: an OTLP/gRPC endpoint and a sampling
//! rate per million), off unless that file is given.
//!
//! Each request gets a server span, a child of the client's W3C `traceparent` when it sends
//! one, so a trace crosses client -> proxy -> extension server (or kube-apiserver). The span
//! carries OpenTelemetry's HTTP attributes and the APIService; the request's phases are child
//! spans (`authenticate`, `impersonate`, `authorize`), a `routed` event, and a client span for the hop to the
//! backend, whose context is what the backend receives in `traceparent`. That client span
//! records when a backend connection was acquired (pool wait and connect before it, response
//! headers after). The server span ends when the response body does (a watch's span lasts
//! as long as the watch), with a `response body end` event.
//!
//! The tracer is the app's own, not a process-wide `tracing` subscriber: two proxies in one
//! process (the tests) trace independently, and with tracing off a request pays one `None`
//! check. Sampling is kube's: parent-based, then the configured rate.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use serde::Deserialize;

/// kube-apiserver's default collector address.
pub const DEFAULT_ENDPOINT: &str = "localhost:4317";
pub const MAX_SAMPLING_RATE_PER_MILLION: u32 = 1_000_000;
/// The most a tracing configuration file may hold.
const MAX_CONFIG_FILE_BYTES: u64 = 64 * 1024;
/// How long one export to the collector may take before it is given up (and retried).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The validated `--tracing-config-file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracingSettings {
    /// `host:port` of an OTLP/gRPC collector, as kube writes it (a `http://` URL also works).
    pub endpoint: String,
    pub sampling_rate_per_million: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    api_version: Option<String>,
    kind: Option<String>,
    endpoint: Option<String>,
    sampling_rate_per_million: Option<i64>,
}

impl TracingSettings {
    pub fn load(path: &Path) -> Result<Self, String> {
        let size = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
        if size > MAX_CONFIG_FILE_BYTES {
            return Err(format!("{}: {size} bytes, more than {MAX_CONFIG_FILE_BYTES}", path.display()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ConfigFile = serde_yaml_ng::from_str(text).map_err(|e| format!("failed decoding: {e}"))?;
        match (file.api_version.as_deref(), file.kind.as_deref()) {
            (
                Some(
                    "apiserver.config.k8s.io/v1"
                    | "apiserver.config.k8s.io/v1beta1"
                    | "apiserver.config.k8s.io/v1alpha1",
                ),
                Some("TracingConfiguration"),
            ) => {}
            (v, k) => {
                return Err(format!(
                    "apiVersion apiserver.config.k8s.io/v1 and kind TracingConfiguration are required, got {v:?} {k:?}"
                ))
            }
        }
        let rate = file.sampling_rate_per_million.unwrap_or(0);
        let sampling_rate_per_million = match u32::try_from(rate) {
            Ok(r) if r <= MAX_SAMPLING_RATE_PER_MILLION => r,
            _ if rate < 0 => return Err(format!("samplingRatePerMillion: Invalid value: {rate}: must be greater than or equal to 0")),
            _ => {
                return Err(format!(
                    "samplingRatePerMillion: Invalid value: {rate}: must be less than or equal to {MAX_SAMPLING_RATE_PER_MILLION}"
                ))
            }
        };
        let endpoint = file.endpoint.unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        if endpoint.is_empty() || endpoint.contains(char::is_whitespace) {
            return Err(format!("endpoint: Invalid value: {endpoint:?}: must be host:port"));
        }
        if endpoint.starts_with("https://") {
            return Err(format!(
                "endpoint: Invalid value: {endpoint:?}: TLS to the collector is not supported; use host:port"
            ));
        }
        Ok(Self { endpoint, sampling_rate_per_million })
    }

    fn url(&self) -> String {
        if self.endpoint.contains("://") {
            self.endpoint.clone()
        } else {
            format!("http://{}", self.endpoint)
        }
    }
}

/// The app's tracer and its exporter.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracing {
    /// Builds the exporter (which connects lazily: a collector that is down costs spans,
    /// never requests). Must run inside the Tokio runtime, which drives the gRPC channel.
    pub fn start(settings: &TracingSettings) -> Result<Self, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.url())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("tracing exporter: {e}"))?;
        let ratio = f64::from(settings.sampling_rate_per_million) / f64::from(MAX_SAMPLING_RATE_PER_MILLION);
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("kube-aggregation-proxy").build())
            .build();
        let tracer = provider.tracer("kube-aggregation-proxy");
        Ok(Self { provider, tracer })
    }

    /// Exports what is still queued; blocking, so off the runtime's workers.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "tracing exporter did not shut down cleanly"),
            Err(e) => tracing::warn!(error = %e, "tracing shutdown failed"),
        }
    }

    /// Starts a request's server span, under the client's `traceparent` if it sent one.
    pub fn request<B>(self: &Arc<Self>, request: &Request<B>, remote: SocketAddr, audit_id: &str) -> RequestTrace {
        let parent = TraceContextPropagator::new().extract_with_context(&Context::new(), &Headers(request.headers()));
        let method = semconv_method(request.method());
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.clone()),
            KeyValue::new("url.scheme", "https"),
            KeyValue::new("url.path", request.uri().path().to_owned()),
            KeyValue::new("network.protocol.version", protocol_version(request.version())),
            KeyValue::new("client.address", remote.ip().to_string()),
            KeyValue::new("client.port", i64::from(remote.port())),
            KeyValue::new("audit-id", audit_id.to_owned()),
        ];
        if method == "_OTHER" {
            attributes.push(KeyValue::new("http.request.method_original", request.method().as_str().to_owned()));
        }
        if let Some(ua) = request.headers().get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()) {
            attributes.push(KeyValue::new("user_agent.original", ua.to_owned()));
        }
        let host = request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok());
        if let Some(host) = host.or_else(|| request.uri().authority().map(|a| a.as_str())) {
            attributes.push(KeyValue::new("server.address", host.to_owned()));
        }
        let span = self
            .tracer
            .span_builder(method.clone())
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        RequestTrace { tracing: self.clone(), cx: parent.with_span(span), method }
    }
}

/// The semantic conventions' method: one of HTTP's own, else `_OTHER`.
fn semconv_method(method: &Method) -> Cow<'static, str> {
    match *method {
        Method::GET => "GET".into(),
        Method::POST => "POST".into(),
        Method::PUT => "PUT".into(),
        Method::PATCH => "PATCH".into(),
        Method::DELETE => "DELETE".into(),
        Method::HEAD => "HEAD".into(),
        Method::OPTIONS => "OPTIONS".into(),
        Method::CONNECT => "CONNECT".into(),
        Method::TRACE => "TRACE".into(),
        _ => "_OTHER".into(),
    }
}

fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}

/// One request's server span. The response body holds it; the span ends when it goes.
#[derive(Debug)]
pub struct RequestTrace {
    tracing: Arc<Tracing>,
    cx: Context,
    method: Cow<'static, str>,
}

impl RequestTrace {
    /// A phase of the request, as a child span that ends when the returned guard goes.
    pub fn phase(&self, name: &'static str) -> Phase {
        let tracer = &self.tracing.tracer;
        Phase(
            self.cx.with_span(
                tracer.span_builder(name).with_kind(SpanKind::Internal).start_with_context(tracer, &self.cx),
            ),
        )
    }

    /// Where the request was routed: the span is named `METHOD /apis/<group>/<version>` for an
    /// APIService (a route, not the path: its names stay few), else by its target.
    pub fn routed(&self, apiservice: Option<(&str, &str, &str)>, target: &'static str) {
        let span = self.cx.span();
        span.add_event("routed", vec![KeyValue::new("k8s.aggregator.target", target)]);
        span.set_attribute(KeyValue::new("k8s.aggregator.target", target));
        match apiservice {
            Some((name, group, version)) => {
                let route =
                    if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
                span.update_name(format!("{} {route}", self.method));
                span.set_attribute(KeyValue::new("http.route", route));
                span.set_attribute(KeyValue::new("k8s.apiservice.name", name.to_owned()));
            }
            None => span.update_name(format!("{} {target}", self.method)),
        }
    }

    /// The response's status: 5xx marks the span as an error, as the conventions ask of servers.
    pub fn respond(&self, code: u16) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
        if code >= 500 {
            span.set_attribute(KeyValue::new("error.type", code.to_string()));
            span.set_status(Status::error(""));
        }
    }

    /// The hop to a backend, as a client span; its context goes in the request's
    /// `traceparent` (replacing the client's, whose span is this one's grandparent).
    pub fn client(&self, apiservice: &str, request: &mut Request<axum::body::Body>) -> ClientSpan {
        let tracer = &self.tracing.tracer;
        let attributes = vec![
            KeyValue::new("http.request.method", semconv_method(request.method())),
            KeyValue::new("url.path", request.uri().path().to_owned()),
            KeyValue::new("k8s.apiservice.name", apiservice.to_owned()),
        ];
        let span = tracer
            .span_builder(self.method.clone())
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &self.cx);
        let cx = self.cx.with_span(span);
        TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(request.headers_mut()));
        ClientSpan(cx)
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        let span = self.cx.span();
        span.add_event("response body end", Vec::new());
        span.end();
    }
}

/// A phase's child span; ends when dropped.
#[derive(Debug)]
pub struct Phase(Context);

impl Drop for Phase {
    fn drop(&mut self) {
        self.0.span().end();
    }
}

/// The hop to a backend, from the request being handed to the backend layer to the response
/// headers (or the failure).
#[derive(Debug)]
pub struct ClientSpan(Context);

impl ClientSpan {
    /// The backend layer found a connection for the request at `at`, on `endpoint`.
    pub fn acquired(&self, endpoint: &str, at: SystemTime) {
        let span = self.0.span();
        span.set_attribute(KeyValue::new("server.address", endpoint.to_owned()));
        span.add_event_with_timestamp("connection acquired", at, Vec::new());
    }

    pub fn responded(&self, code: u16) {
        let span = self.0.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
        if code >= 400 {
            span.set_attribute(KeyValue::new("error.type", code.to_string()));
            span.set_status(Status::error(""));
        }
    }

    pub fn failed(&self, error: &str) {
        let span = self.0.span();
        span.set_attribute(KeyValue::new("error.type", error.to_owned()));
        span.set_status(Status::error(error.to_owned()));
    }
}

impl Drop for ClientSpan {
    fn drop(&mut self) {
        self.0.span().end();
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else { return };
        match HeaderValue::from_str(&value) {
            // An empty `tracestate` says nothing: the client's is dropped rather than kept.
            Ok(v) if !v.is_empty() => {
                self.0.insert(name, v);
            }
            _ => {
                self.0.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_is_kubes_tracing_configuration() {
        let parsed = TracingSettings::parse(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: TracingConfiguration\nendpoint: 127.0.0.1:4317\nsamplingRatePerMillion: 100\n",
        )
        .unwrap();
        assert_eq!(parsed, TracingSettings { endpoint: "127.0.0.1:4317".into(), sampling_rate_per_million: 100 });
        assert_eq!(parsed.url(), "http://127.0.0.1:4317");
        let defaults =
            TracingSettings::parse("apiVersion: apiserver.config.k8s.io/v1\nkind: TracingConfiguration\n").unwrap();
        assert_eq!(defaults, TracingSettings { endpoint: DEFAULT_ENDPOINT.into(), sampling_rate_per_million: 0 });
        let err = |t: &str| TracingSettings::parse(t).unwrap_err();
        let head = "apiVersion: apiserver.config.k8s.io/v1\nkind: TracingConfiguration\n";
        assert!(err(&format!("{head}samplingRatePerMillion: 1000001\n")).contains("less than or equal to 1000000"));
        assert!(err(&format!("{head}samplingRatePerMillion: -1\n")).contains("greater than or equal to 0"));
        assert!(err(&format!("{head}endpoint: https://collector:4317\n")).starts_with("endpoint:"));
        assert!(err(&format!("{head}sampling: 1\n")).contains("unknown field"));
        assert!(err("apiVersion: v1\nkind: ConfigMap\n").contains("TracingConfiguration"));
    }

    #[test]
    fn unknown_methods_are_other_as_the_conventions_say() {
        assert_eq!(semconv_method(&Method::GET), "GET");
        assert_eq!(semconv_method(&Method::from_bytes(b"PROPFIND").unwrap()), "_OTHER");
    }
}

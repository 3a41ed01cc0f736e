//! Tracing through the real proxy: an OTLP/gRPC collector on loopback receives the proxy's
//! spans in the client's trace, and the extension server sees that trace in `traceparent`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::standalone::Standalone;
use common::wait::eventually;
use http::Method;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Spans received, in the order they came.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn start_collector() -> (SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let spans = collector.spans.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
}

fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attribute(span, key) {
        Some(AnyValue::StringValue(v)) => v,
        other => panic!("{key} of {}: {other:?}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(AnyValue::IntValue(v)) => *v,
        other => panic!("{key} of {}: {other:?}", span.name),
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_crosses_client_proxy_and_extension_server() {
    let (collector, received) = start_collector().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tracing.yaml");
    // Rate 0, as kube's default: only requests whose client sampled them are traced.
    std::fs::write(
        &config,
        format!("apiVersion: apiserver.config.k8s.io/v1\nkind: TracingConfiguration\nendpoint: {collector}\nsamplingRatePerMillion: 0\n"),
    )
    .unwrap();
    let env = Standalone::start_with(|s| s.tracing_config_file = Some(config)).await;
    let admin = env.admin();
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01");
    let r = admin
        .request(
            Method::GET,
            &env.url("/apis/echo.example.com/v1/namespaces/default/echoes/one"),
            &[("traceparent", &traceparent), ("user-agent", "trace-test/1")],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let seen = r.json()["headers"]["traceparent"][0].as_str().unwrap().to_owned();
    // Not traced: no traceparent, and a sampling rate of 0.
    let untraced = admin.get(&env.url("/apis/echo.example.com/v1/namespaces/default/echoes/two")).await.unwrap();
    assert_eq!(untraced.status, 200);

    let spans = eventually(Duration::from_secs(20), || async {
        let spans = received.lock().unwrap().clone();
        let done = spans.iter().any(|s| s.kind == SpanKind::Server as i32)
            && spans.iter().any(|s| s.kind == SpanKind::Client as i32);
        if done {
            Ok(spans)
        } else {
            Err(format!("{} spans so far", spans.len()))
        }
    })
    .await;
    assert!(spans.iter().all(|s| hex(&s.trace_id) == TRACE_ID), "every span is in the client's trace: {spans:#?}");
    // The tree as the collector got it (shown with --nocapture).
    print_tree(&spans, CLIENT_SPAN_ID, 0);

    let server = spans.iter().find(|s| s.kind == SpanKind::Server as i32).unwrap();
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN_ID, "the client's span is the server span's parent");
    assert_eq!(server.name, "GET /apis/echo.example.com/v1");
    assert_eq!(text(server, "http.request.method"), "GET");
    assert_eq!(text(server, "url.path"), "/apis/echo.example.com/v1/namespaces/default/echoes/one");
    assert_eq!(text(server, "url.scheme"), "https");
    assert_eq!(text(server, "http.route"), "/apis/echo.example.com/v1");
    assert_eq!(text(server, "k8s.apiservice.name"), "v1.echo.example.com");
    assert_eq!(text(server, "user_agent.original"), "trace-test/1");
    assert_eq!(text(server, "audit-id"), r.headers["audit-id"].to_str().unwrap());
    assert_eq!(int(server, "http.response.status_code"), 200);
    let events: Vec<&str> = server.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(events, ["routed", "response body end"]);
    assert!(server.end_time_unix_nano >= server.start_time_unix_nano);

    let child = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>()))
    };
    let authenticate = child("authenticate");
    assert_eq!(authenticate.parent_span_id, server.span_id);

    let client = spans.iter().find(|s| s.kind == SpanKind::Client as i32).unwrap();
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(int(client, "http.response.status_code"), 200);
    assert_eq!(text(client, "server.address"), env.sample_addr.to_string());
    assert!(client.events.iter().any(|e| e.name == "connection acquired"), "{:?}", client.events);
    // The extension server was handed the client span's context: the same trace, one hop on.
    assert_eq!(seen, format!("00-{TRACE_ID}-{}-01", hex(&client.span_id)));

    // Shutdown flushes whatever is queued: the untraced request left nothing to flush.
    let Standalone { proxy, .. } = env;
    proxy.shutdown().await;
    let all = received.lock().unwrap().clone();
    assert!(all.iter().all(|s| hex(&s.trace_id) == TRACE_ID), "{all:#?}");
    assert_eq!(all.iter().filter(|s| s.kind == SpanKind::Server as i32).count(), 1);
}

/// Prints the spans under `parent` (hex), indented, with their kind, duration and events.
fn print_tree(spans: &[Span], parent: &str, depth: usize) {
    for span in spans.iter().filter(|s| hex(&s.parent_span_id) == parent) {
        let micros = span.end_time_unix_nano.saturating_sub(span.start_time_unix_nano) / 1_000;
        let events: Vec<&str> = span.events.iter().map(|e| e.name.as_str()).collect();
        println!(
            "{:indent$}{} [{:?}] {micros} µs events={events:?}",
            "",
            span.name,
            SpanKind::try_from(span.kind).unwrap(),
            indent = depth * 2
        );
        print_tree(spans, &hex(&span.span_id), depth + 1);
    }
}

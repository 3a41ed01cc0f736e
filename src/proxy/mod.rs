//! Forwarding a routed request to its backend and the backend's answer to the client.
//!
//! Bodies stream both ways: the client's body goes to the backend as it arrives, and the
//! backend's body reaches the client frame by frame (a watch event is forwarded when the
//! backend writes it). A backend that fails mid-body makes the client's stream fail too, as
//! kube-aggregator does, rather than end it as if complete.

use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use hyper_util::rt::TokioIo;

use crate::auth::identity;
use crate::auth::UserInfo;
use crate::backend::{self, BackendError, Endpoints, SendOptions};
use crate::status::RequestError;
use crate::telemetry::RequestTrace;

// Header names made at compile time: a `&str` name is parsed and copied on every insert.
pub const HEADER_AUDIT_ID: HeaderName = HeaderName::from_static("audit-id");
pub const HEADER_X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const HEADER_X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const HEADER_X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const HEADER_X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");

/// kube-aggregator bounds discovery requests (`/apis/<group>/<version>`) to five seconds.
pub const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Hop-by-hop headers, never forwarded in either direction (RFC 9110 section 7.6.1), and
/// `Upgrade`. Names, not strings: a `&str` name is parsed again on every lookup.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// CORS headers from backends are dropped; the front end decides CORS, as kube-apiserver does.
const CORS_RESPONSE_HEADERS: [HeaderName; 4] = [
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
];

/// Whether `headers` has any of `names`, from one pass over the names it holds: most
/// messages have none, and a `remove` per name would hash each one.
fn has_any(headers: &HeaderMap, names: &[HeaderName]) -> bool {
    headers.keys().any(|name| names.contains(name))
}

/// Removes `names` from `headers`, after one pass that finds whether any is there.
fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    if has_any(headers, names) {
        for name in names {
            headers.remove(name);
        }
    }
}

/// Forwarding policy.
#[derive(Debug, Clone)]
pub struct ForwardSettings {
    /// `--aggregator-reject-forwarding-redirect`: an extension server's 3xx with `Location`
    /// becomes a 502.
    pub reject_forwarding_redirects: bool,
    pub discovery_timeout: Duration,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        Self { reject_forwarding_redirects: true, discovery_timeout: DEFAULT_DISCOVERY_TIMEOUT }
    }
}

/// Who asked, for the headers the backend gets.
#[derive(Debug, Clone)]
pub struct Caller<'a> {
    pub user: &'a UserInfo,
    /// The client's address, for `X-Forwarded-For` (made once per connection).
    pub client_ip: &'a HeaderValue,
    pub audit_id: &'a HeaderValue,
    /// The request's trace, when tracing is on: the hop to the backend is its client span.
    pub trace: Option<&'a RequestTrace>,
}

/// One forwarding target: the endpoints of a backend and what the request asks of them.
#[derive(Debug)]
pub struct Target<'a> {
    /// The APIService name, for errors and logs (`delegate` for the local delegate).
    pub apiservice: &'a str,
    pub endpoints: &'a Endpoints,
    /// Whether this is a `/apis/<group>/<version>` discovery request (time-bounded).
    pub discovery: bool,
    /// The request's deadline and whether it is long-running.
    pub send: SendOptions,
    /// kube-apiserver itself: its redirects are its own answers (a stale OpenAPI hash gets a
    /// 301 to the current one) and pass through; only extension servers' are refused.
    pub delegate: bool,
}

/// The headers [`backend_request`] adds besides the identity: `X-Forwarded-For`, `-Proto`,
/// `-Host`, `-Uri` and `Audit-ID`.
const ADDED_HEADERS: usize = 5;

/// Marks a value HPACK must not add to its dynamic table (a "never indexed" literal), for the
/// values that change with every request (Audit-ID, X-Forwarded-Uri), as h2 already treats
/// `:path`. Indexed, each would take a new table entry per request, evicting the values that
/// do repeat (the identity headers, X-Forwarded-For), and the encoder compares each new value
/// with every entry of the same name: 6% of the proxy's CPU on HTTP/2 at c=64
/// (benches/RESULTS.md). The value is sent as it is; only its encoding differs.
pub fn not_indexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // The names `Connection` lists go too; without a `Connection` there are none.
    if !has_any(headers, &HOP_BY_HOP) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &listed {
        headers.remove(name);
    }
    remove_all(headers, &HOP_BY_HOP);
}

/// Builds the backend request: same method, path and query; hop-by-hop headers and `Host`
/// dropped; identity, `X-Forwarded-*` and `Audit-ID` set. Identity headers the client sent were
/// stripped before routing.
fn backend_request(caller: &Caller<'_>, request: Request<Body>) -> Result<Request<Body>, RequestError> {
    let (mut parts, body) = request.into_parts();
    let forwarded_uri = HeaderValue::from_str(parts.uri.path()).map(not_indexed);
    // The host the client asked for: HTTP/1.1's `Host`, HTTP/2's `:authority`.
    let forwarded_host = match parts.headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    // The URI stays the client's: the backend layer reads only its path and query and names
    // the endpoint it picks.
    parts.version = Version::HTTP_11;
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    headers.remove(header::HOST);
    // Room for what is added below, so the map grows once rather than at each doubling.
    headers.reserve(identity::header_count(caller.user) + ADDED_HEADERS);
    identity::inject(caller.user, headers)?;
    let forwarded_for = match headers.get(HEADER_X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => {
            HeaderValue::try_from(format!("{prior}, {}", caller.client_ip.to_str().unwrap_or_default())).ok()
        }
        None => Some(caller.client_ip.clone()),
    };
    if let Some(v) = forwarded_for {
        headers.insert(HEADER_X_FORWARDED_FOR, v);
    }
    headers.insert(HEADER_X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    match forwarded_host {
        Some(host) => headers.insert(HEADER_X_FORWARDED_HOST, host),
        None => headers.remove(HEADER_X_FORWARDED_HOST),
    };
    if let Ok(v) = forwarded_uri {
        headers.insert(HEADER_X_FORWARDED_URI, v);
    }
    headers.insert(HEADER_AUDIT_ID, caller.audit_id.clone());
    Ok(Request::from_parts(parts, body))
}

/// Forwards `request` to `target` and returns the backend's response, streaming.
pub async fn forward(
    settings: &ForwardSettings,
    target: Target<'_>,
    caller: Caller<'_>,
    request: Request<Body>,
) -> Result<Response<Body>, RequestError> {
    if is_upgrade(request.headers()) {
        // Boxed: rare, and large.
        return Box::pin(forward_upgrade(target, caller, request)).await;
    }
    let mut outgoing = backend_request(&caller, request)?;
    let client_span = caller.trace.map(|t| t.client(target.apiservice, &mut outgoing));
    let mut send = target.send;
    send.report = client_span.is_some();
    if target.discovery {
        // kube-aggregator bounds discovery requests, body included, to five seconds.
        let bound = tokio::time::Instant::now() + settings.discovery_timeout;
        send.deadline = Some(send.deadline.map_or(bound, |d| d.min(bound)));
    }
    let response = backend::send(target.endpoints, outgoing, &send).await;
    if let Some(span) = &client_span {
        match &response {
            Ok(r) => {
                if let Some(report) = r.extensions().get::<backend::SendReport>() {
                    span.acquired(report.endpoint.as_str(), report.acquired);
                }
                span.responded(r.status().as_u16());
            }
            Err(e) => span.failed(e.kind()),
        }
    }
    drop(client_span);
    let response = response.map_err(|error| match error {
        BackendError::Timeout(_) if target.discovery => RequestError::Backend {
            apiservice: target.apiservice.to_owned(),
            error: BackendError::Timeout(settings.discovery_timeout),
        },
        // The request's own deadline passed: kube-apiserver's 504, in its words.
        BackendError::Timeout(_) => RequestError::Timeout,
        error => RequestError::Backend { apiservice: target.apiservice.to_owned(), error },
    })?;
    if settings.reject_forwarding_redirects
        && !target.delegate
        && response.status().is_redirection()
        && response.headers().get(header::LOCATION).is_some_and(|l| !l.is_empty())
    {
        return Err(RequestError::RedirectRejected { apiservice: target.apiservice.to_owned() });
    }
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    remove_all(&mut parts.headers, &CORS_RESPONSE_HEADERS);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Whether a request asks to switch protocols (WebSocket, SPDY for exec, attach and
/// port-forward): its `Connection` header lists `upgrade`, as kube's check reads it.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// A protocol switch, proxied as kube-aggregator does: the request goes to the backend over
/// HTTP/1.1 with its `Upgrade` header (and the injected identity); a `101` is passed back and
/// both connections are then joined as a byte pipe until either side closes. A backend error
/// (4xx, 5xx) is passed back as it is; any other answer is a 503.
async fn forward_upgrade(
    target: Target<'_>,
    caller: Caller<'_>,
    mut request: Request<Body>,
) -> Result<Response<Body>, RequestError> {
    let unavailable =
        |cause: String| RequestError::ServiceUnavailable { apiservice: target.apiservice.to_owned(), cause };
    let protocol = request.headers().get(header::UPGRADE).cloned();
    let client_side = hyper::upgrade::on(&mut request);
    let mut outgoing = backend_request(&caller, request)?;
    // The switch itself is the client span; the stream after it is not traced.
    let client_span = caller.trace.map(|t| t.client(target.apiservice, &mut outgoing));
    outgoing.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Some(protocol) = protocol {
        outgoing.headers_mut().insert(header::UPGRADE, protocol);
    }
    let mut response = target
        .endpoints
        .pick()
        .send_upgrade(outgoing)
        .await
        .map_err(|e| unavailable(format!("error dialing backend: {e}")))?;
    let status = response.status();
    if let Some(span) = client_span {
        span.responded(status.as_u16());
    }
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        if status.as_u16() < 400 {
            return Err(unavailable(format!("invalid upgrade response: status code {}", status.as_u16())));
        }
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    let backend_side = hyper::upgrade::on(&mut response);
    let apiservice = target.apiservice.to_owned();
    tokio::spawn(async move {
        match tokio::try_join!(client_side, backend_side) {
            Ok((client, backend)) => {
                let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                    tracing::debug!(%apiservice, error = %e, "upgraded connection ended");
                }
            }
            Err(e) => tracing::debug!(%apiservice, error = %e, "protocol switch did not complete"),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, Body::empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("accept", "application/json".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);

        // Without a `Connection` header, the others still go.
        let mut h = HeaderMap::new();
        h.insert("proxy-connection", "close".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-private"]);
    }

    #[test]
    fn values_new_with_each_request_are_marked_for_hpack_not_to_index() {
        let value = not_indexed(HeaderValue::from_static("/apis/example.com/v1/things"));
        assert!(value.is_sensitive());
        assert_eq!(value, "/apis/example.com/v1/things");
    }
}

//! Answering `/apis` (aggregated), `/openapi/v2`, `/openapi/v3` and `/openapi/v3/<path>` from
//! the published documents: a pointer load and a header comparison, never a backend request.

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Uri};

use super::aggregated::{accepts_json, negotiate, Negotiated};
use super::fetcher::DiscoveryDocuments;
use crate::status::{RequestError, Status};

/// `/apis` when the client asked for `APIGroupDiscoveryList`; `None` when it asked for the
/// legacy `APIGroupList`, or the aggregated document is not complete yet (cluster mode before
/// the delegate's document arrived): the caller then builds the legacy list from the routing
/// table, and the client falls back to legacy discovery, as it does with any server that
/// does not serve the aggregated type.
pub fn aggregated(documents: &DiscoveryDocuments, headers: &HeaderMap) -> Option<Response<Body>> {
    match negotiate(headers) {
        Negotiated::AggregatedV2 => documents.aggregated().map(|document| document.respond(headers)),
        Negotiated::Legacy => None,
    }
}

/// `/openapi/v2`: the merged Swagger document. Only JSON is served; a client that accepts
/// only the protobuf encoding (client-go's `OpenAPISchema`) is answered 406, as kube-openapi
/// answers a type it cannot produce, rather than with bytes it cannot parse.
pub fn openapi_v2(documents: &DiscoveryDocuments, headers: &HeaderMap) -> Response<Body> {
    if !accepts_json(headers) {
        return Status::failure(
            StatusCode::NOT_ACCEPTABLE,
            "NotAcceptable",
            "only application/json is served for /openapi/v2",
        )
        .into_response();
    }
    documents.openapi_v2().respond_with_cache_control(headers, HeaderValue::from_static("no-cache, private"))
}

/// `/openapi/v3`: the index of group-version documents.
pub fn openapi_v3_root(documents: &DiscoveryDocuments, headers: &HeaderMap) -> Response<Body> {
    documents.openapi_v3().root.respond_with_cache_control(headers, HeaderValue::from_static("no-cache, private"))
}

/// `/openapi/v3/<path>`: a backend's document from the cache. As kube-openapi does, a request
/// carrying the current `?hash=` may be cached forever, and one with an outdated hash is
/// redirected to the current URL.
pub fn openapi_v3_document(
    documents: &DiscoveryDocuments,
    path: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response<Body> {
    let index = documents.openapi_v3();
    let Some(document) = index.document(path) else {
        return RequestError::NotFound(format!("no OpenAPI v3 document for {path:?}")).into_response();
    };
    let requested_hash = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("hash="))
        .filter(|h| !h.is_empty());
    match requested_hash {
        Some(hash) if hash == document.hash() => {
            document.respond_with_cache_control(headers, HeaderValue::from_static("public, immutable"))
        }
        Some(_) => {
            let location = format!("{}?hash={}", uri.path(), document.hash());
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
            if let Ok(location) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        None => document.respond_with_cache_control(headers, HeaderValue::from_static("no-cache, private")),
    }
}

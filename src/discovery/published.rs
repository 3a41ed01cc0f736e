//! A document the proxy serves from memory: its bytes, content type and entity tag, computed
//! once when the document is rebuilt, so answering a request is a pointer load and a header
//! comparison.
//!
//! The entity tag is kube's for aggregated discovery: the upper-case hex SHA-512 of the
//! document's bytes (for aggregated discovery, of the bytes kube hashes), in double quotes. An `If-None-Match` equal to it is answered
//! `304 Not Modified` without a body; like kube-apiserver, no weak tags or lists are parsed.

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use sha2::{Digest, Sha512};

/// Upper-case hex SHA-512 of `bytes`: kube's discovery hash, also used as the `?hash=` of
/// OpenAPI v3 documents.
pub fn sha512_hex(bytes: &[u8]) -> String {
    let digest = Sha512::digest(bytes);
    let mut out = String::with_capacity(digest.len() * 2);
    for b in digest {
        out.push_str(&format!("{b:02X}"));
    }
    out
}

/// An immutable, ready-to-serve document.
#[derive(Debug, Clone)]
pub struct Published {
    body: Bytes,
    content_type: HeaderValue,
    /// The unquoted hash.
    hash: String,
    /// `"<hash>"`, as sent in `ETag`.
    etag: HeaderValue,
}

impl Published {
    /// Hashes `body` once. `content_type` must be a valid header value (they are constants).
    pub fn new(content_type: &'static str, body: impl Into<Bytes>) -> Self {
        let body = body.into();
        let hash = sha512_hex(&body);
        Self::with_hash(content_type, body, hash)
    }

    /// A document whose entity tag is the hash of another encoding of it, `hashed`: kube
    /// hashes aggregated discovery without its `kind` and `apiVersion` and serves it with a
    /// trailing newline, and equal content must carry kube's ETag.
    pub fn hashed_as(content_type: &'static str, body: impl Into<Bytes>, hashed: &[u8]) -> Self {
        Self::with_hash(content_type, body.into(), sha512_hex(hashed))
    }

    fn with_hash(content_type: &'static str, body: Bytes, hash: String) -> Self {
        // A quoted hex string is always a valid header value.
        let etag = HeaderValue::from_str(&format!("\"{hash}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"\""));
        Self { body, content_type: HeaderValue::from_static(content_type), hash, etag }
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn etag(&self) -> &HeaderValue {
        &self.etag
    }

    /// Whether the request's `If-None-Match` names this very document.
    pub fn matches(&self, request_headers: &HeaderMap) -> bool {
        request_headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == self.etag.as_bytes())
    }

    /// `200` with the body, or `304` when the client already holds it. Always sets `ETag`,
    /// `Vary: Accept` and `Cache-Control: public`, as kube's aggregated discovery does.
    pub fn respond(&self, request_headers: &HeaderMap) -> Response<Body> {
        self.respond_with_cache_control(request_headers, HeaderValue::from_static("public"))
    }

    /// Like [`Published::respond`] with a chosen `Cache-Control`.
    pub fn respond_with_cache_control(
        &self,
        request_headers: &HeaderMap,
        cache_control: HeaderValue,
    ) -> Response<Body> {
        let mut response = if self.matches(request_headers) {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else {
            let mut r = Response::new(Body::from(self.body.clone()));
            r.headers_mut().insert(header::CONTENT_TYPE, self.content_type.clone());
            r
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(header::VARY, HeaderValue::from_static("Accept"));
        headers.insert(header::CACHE_CONTROL, cache_control);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_the_quoted_upper_case_sha512_of_the_body() {
        let doc = Published::new("application/json", &b"{}"[..]);
        assert_eq!(doc.hash().len(), 128);
        assert!(doc.hash().chars().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
        assert_eq!(doc.etag().to_str().unwrap(), format!("\"{}\"", doc.hash()));
        // The SHA-512 of "{}", computed independently.
        assert!(doc.hash().starts_with("27C74670ADB75075FAD058D5CEAF7B20C4E7786C83BAE8A32F626F9782AF34C9"));
    }

    #[test]
    fn a_matching_if_none_match_is_answered_304_without_body() {
        let doc = Published::new("application/json", &b"{\"a\":1}"[..]);
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, doc.etag().clone());
        let response = doc.respond(&headers);
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(response.headers()[header::ETAG], *doc.etag());
        assert!(response.headers().get(header::CONTENT_TYPE).is_none());

        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        let response = doc.respond(&headers);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::VARY], "Accept");
        assert_eq!(response.headers()[header::CACHE_CONTROL], "public");
    }
}

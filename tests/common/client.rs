//! A real HTTPS client for the integration suites: rustls (ring) through hyper-rustls and
//! hyper-util's pooled client, so requests take the same path a Go or kubectl client's would
//! (TLS handshake, ALPN, HTTP/1.1 or HTTP/2).
//!
//! ```ignore
//! let client = TestClient::builder().ca_pem(ca.cert_pem()).client_cert(&alice).http2_only().build();
//! let response = client.get(&format!("https://{addr}/apis")).await?;
//! assert_eq!(response.status, 200);
//! let streamed = client.get_streaming(&url).await?.collect_chunks().await?;
//! ```
//!
//! Every request has a deadline ([`DEFAULT_TIMEOUT`] unless changed), so a hung server fails a
//! test instead of hanging it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kube_aggregation_proxy::pki::PemPair;
use kube_aggregation_proxy::tls;
use rustls::{ClientConfig, RootCertStore};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long a request (or one streamed chunk) may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocols {
    Both,
    Http1Only,
    Http2Only,
}

/// Builds a [`TestClient`]. The CA is required: tests always verify the server.
#[derive(Default)]
pub struct TestClientBuilder {
    ca_pem: Vec<String>,
    client_cert: Option<PemPair>,
    protocols: Option<Protocols>,
    bearer: Option<String>,
    timeout: Option<Duration>,
}

impl TestClientBuilder {
    /// Trusts the certificates in this PEM (may be called more than once).
    pub fn ca_pem(mut self, pem: &str) -> Self {
        self.ca_pem.push(pem.to_owned());
        self
    }

    /// Presents this client certificate in the handshake.
    pub fn client_cert(mut self, pair: &PemPair) -> Self {
        self.client_cert = Some(pair.clone());
        self
    }

    /// Offers only `http/1.1` in ALPN and speaks HTTP/1.1.
    pub fn http1_only(mut self) -> Self {
        self.protocols = Some(Protocols::Http1Only);
        self
    }

    /// Offers only `h2` in ALPN and speaks HTTP/2.
    pub fn http2_only(mut self) -> Self {
        self.protocols = Some(Protocols::Http2Only);
        self
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    /// The deadline for a whole buffered request, or for each chunk of a streamed one.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Panics on bad PEM: a test's own fixtures are wrong.
    pub fn build(self) -> TestClient {
        let mut roots = RootCertStore::empty();
        for pem in &self.ca_pem {
            for cert in tls::parse_certs(pem.as_bytes(), "test CA").expect("test CA PEM") {
                roots.add(cert).expect("test CA certificate");
            }
        }
        let builder = ClientConfig::builder_with_provider(tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots);
        let config = match &self.client_cert {
            Some(pair) => {
                let key = pair.certified_key().expect("test client certificate");
                builder.with_client_auth_cert(key.chain.clone(), key.key.clone_key()).expect("test client certificate")
            }
            None => builder.with_no_client_auth(),
        };
        let protocols = self.protocols.unwrap_or(Protocols::Both);
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only();
        let connector = match protocols {
            Protocols::Both => https.enable_http1().enable_http2().build(),
            Protocols::Http1Only => https.enable_http1().build(),
            Protocols::Http2Only => https.enable_http2().build(),
        };
        let client =
            Client::builder(TokioExecutor::new()).http2_only(protocols == Protocols::Http2Only).build(connector);
        TestClient { client, bearer: self.bearer, timeout: self.timeout.unwrap_or(DEFAULT_TIMEOUT) }
    }
}

/// An HTTPS client with fixed trust, client certificate and protocol choice.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    bearer: Option<String>,
    timeout: Duration,
}

/// A response read to the end.
#[derive(Debug, Clone)]
pub struct TestResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    /// The body as JSON; panics with the body text when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One piece of a streamed body and when it arrived.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub data: Bytes,
    pub at: Instant,
}

/// A response whose body is read as it arrives.
#[derive(Debug)]
pub struct StreamingResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// When the response head arrived.
    pub started: Instant,
    body: Incoming,
    timeout: Duration,
}

impl StreamingResponse {
    /// The next data chunk, `None` at the end of the body. Fails when the stream breaks or no
    /// chunk arrives within the client's timeout.
    pub async fn next_chunk(&mut self) -> Result<Option<Chunk>, Error> {
        loop {
            let frame = tokio::time::timeout(self.timeout, self.body.frame())
                .await
                .map_err(|_| format!("no chunk within {:?}", self.timeout))?;
            match frame {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(Chunk { data, at: Instant::now() }));
                        }
                    }
                    // Trailers and empty frames carry no data; keep reading.
                }
            }
        }
    }

    /// Every remaining chunk with its arrival time, until the body ends.
    pub async fn collect_chunks(mut self) -> Result<Vec<Chunk>, Error> {
        let mut chunks = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            chunks.push(chunk);
        }
        Ok(chunks)
    }
}

impl TestClient {
    pub fn builder() -> TestClientBuilder {
        TestClientBuilder::default()
    }

    pub async fn get(&self, url: &str) -> Result<TestResponse, Error> {
        self.request(Method::GET, url, &[], Bytes::new()).await
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<TestResponse, Error> {
        let request = self.build_request(method, url, headers, body.into())?;
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok(TestResponse { status: parts.status, version: parts.version, headers: parts.headers, body })
        })
        .await
        .map_err(|_| format!("{url}: no complete response within {timeout:?}"))?
    }

    pub async fn get_streaming(&self, url: &str) -> Result<StreamingResponse, Error> {
        self.request_streaming(Method::GET, url, &[], Bytes::new()).await
    }

    /// Sends a request and returns once the response head has arrived; the body is read with
    /// [`StreamingResponse::next_chunk`].
    pub async fn request_streaming(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<StreamingResponse, Error> {
        let request = self.build_request(method, url, headers, body.into())?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| format!("{url}: no response head within {:?}", self.timeout))??;
        let (parts, body) = response.into_parts();
        Ok(StreamingResponse {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            started: Instant::now(),
            body,
            timeout: self.timeout,
        })
    }

    fn build_request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, Error> {
        let mut request = Request::builder().method(method).uri(url).body(Full::new(body))?;
        if let Some(token) = &self.bearer {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}"))?);
        }
        for (name, value) in headers {
            request.headers_mut().append(HeaderName::from_bytes(name.as_bytes())?, HeaderValue::from_str(value)?);
        }
        Ok(request)
    }
}

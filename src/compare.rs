//! `compare`: the same requests through two kubeconfigs, side by side.
//!
//! For studying how two aggregation layers differ (kube-apiserver's own kube-aggregator and
//! this proxy, or two Kubernetes versions): each request goes to both, and what a client can
//! observe is compared: the status code, the `Status` reason of an error, the content type,
//! and for discovery documents (`APIGroupList`, `APIResourceList`, aggregated discovery) the
//! sets of groups, versions and resources, with what only one side has spelled out. The exit
//! status is 1 when anything differs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use serde_json::Value;

/// A response body is read up to this; discovery documents are far smaller.
const MAX_BODY_BYTES: usize = 16 << 20;
/// How long one request may take on one side (a watch is read only to its headers).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most request lines a file may hold.
const MAX_REQUESTS: usize = 10_000;

/// The built-in set: discovery, aggregated reads and writes, a watch, errors, identities.
/// Written for the demo cluster's APIServices (metrics.k8s.io from metrics-server,
/// wardle.example.com from sample-apiserver); on another cluster the requests for APIServices
/// it lacks are 404 on both sides, which is still a comparison.
pub const BUILTIN_REQUESTS: &str = "\
GET /version
GET /api
GET /apis
GET /apis | Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList
GET /apis/metrics.k8s.io
GET /apis/metrics.k8s.io/v1beta1
GET /apis/wardle.example.com/v1alpha1
GET /apis/apiregistration.k8s.io/v1/apiservices/v1beta1.metrics.k8s.io
GET /apis/metrics.k8s.io/v1beta1/nodes
GET /apis/metrics.k8s.io/v1beta1/namespaces/kube-system/pods
GET /apis/wardle.example.com/v1alpha1/namespaces/default/flunders
GET /apis/wardle.example.com/v1alpha1/namespaces/default/flunders?watch=true&timeoutSeconds=1
POST /apis/wardle.example.com/v1alpha1/namespaces/default/flunders?dryRun=All | Content-Type: application/json | {\"apiVersion\":\"wardle.example.com/v1alpha1\",\"kind\":\"Flunder\",\"metadata\":{\"name\":\"compare\"}}
GET /apis/wardle.example.com/v1alpha1/namespaces/default/flunders/not-there
GET /apis/metrics.k8s.io/v1beta1/nodes/not-a-node
GET /apis/nobody.example.com/v1/things
GET /apis/metrics.k8s.io/v1beta1/nodes?timeout=bogus
GET /apis/wardle.example.com/v1alpha1/namespaces/default/flunders | Impersonate-User: nobody
GET /apis/metrics.k8s.io/v1beta1/nodes | Impersonate-User: system:anonymous
";

/// One request: a method, a path with its query, headers, and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
}

impl RequestLine {
    /// `METHOD /path?query [| Header: value]... [| body]`: the parts after the path are
    /// separated by ` | `; one without a `Name:` is the body.
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut parts = line.split(" | ");
        let head = parts.next().unwrap_or_default().trim();
        let (method, path) = head.split_once(' ').ok_or_else(|| format!("{line:?}: expected METHOD PATH"))?;
        let method =
            Method::from_bytes(method.as_bytes()).map_err(|_| format!("{line:?}: invalid method {method:?}"))?;
        let path = path.trim();
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            return Err(format!("{line:?}: the path must start with / and have no spaces"));
        }
        let mut headers = Vec::new();
        let mut body = Vec::new();
        for part in parts {
            let part = part.trim();
            match part.split_once(':').filter(|(name, _)| !name.is_empty() && !name.contains([' ', '{', '"'])) {
                Some((name, value)) => {
                    let name = HeaderName::from_bytes(name.trim().as_bytes())
                        .map_err(|_| format!("{line:?}: invalid header name {name:?}"))?;
                    let value = HeaderValue::from_str(value.trim())
                        .map_err(|_| format!("{line:?}: invalid value for header {name}"))?;
                    headers.push((name, value));
                }
                None => body = part.as_bytes().to_vec(),
            }
        }
        Ok(Self { method, path: path.to_owned(), headers, body })
    }

    /// Lines of a file or of [`BUILTIN_REQUESTS`]; blank lines and `#` comments are skipped.
    pub fn parse_all(text: &str) -> Result<Vec<Self>, String> {
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        if lines.len() > MAX_REQUESTS {
            return Err(format!("{} requests, more than {MAX_REQUESTS}", lines.len()));
        }
        lines.into_iter().map(Self::parse).collect()
    }

    fn label(&self) -> String {
        let mut label = format!("{} {}", self.method, self.path);
        for (name, value) in &self.headers {
            if name != http::header::CONTENT_TYPE {
                label.push_str(&format!(" [{name}: {}]", value.to_str().unwrap_or("?")));
            }
        }
        label
    }

    fn is_watch(&self) -> bool {
        self.path.contains("watch=true") || self.path.contains("watch=1") || self.path.contains("/watch/")
    }
}

/// What a client can observe of one answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub code: u16,
    /// The `reason` of a `Status` body.
    pub reason: String,
    /// The media type with its parameters, lower case, without `charset`.
    pub content_type: String,
    /// For discovery documents: `group`, `group/version` and `group/version/resource` entries.
    pub discovery: Option<BTreeSet<String>>,
    /// Why there is no answer (connection refused, TLS, timeout).
    pub error: String,
}

impl Observed {
    fn summary(&self) -> String {
        if !self.error.is_empty() {
            return format!("error: {}", self.error);
        }
        let mut s = self.code.to_string();
        if !self.reason.is_empty() {
            s.push(' ');
            s.push_str(&self.reason);
        }
        if !self.content_type.is_empty() {
            s.push(' ');
            s.push_str(&self.content_type);
        }
        s
    }

    /// What differs, in words; empty when nothing does.
    fn differences(&self, other: &Observed, left: &str, right: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.code != other.code || self.error != other.error {
            out.push(format!("status: {left} {}, {right} {}", self.summary(), other.summary()));
        } else if self.reason != other.reason {
            out.push(format!("Status reason: {left} {:?}, {right} {:?}", self.reason, other.reason));
        }
        if self.content_type != other.content_type && self.error.is_empty() && other.error.is_empty() {
            out.push(format!("content type: {left} {:?}, {right} {:?}", self.content_type, other.content_type));
        }
        if let (Some(a), Some(b)) = (&self.discovery, &other.discovery) {
            let only_a: Vec<&String> = a.difference(b).collect();
            let only_b: Vec<&String> = b.difference(a).collect();
            if !only_a.is_empty() {
                out.push(format!("only in {left}: {}", join(&only_a)));
            }
            if !only_b.is_empty() {
                out.push(format!("only in {right}: {}", join(&only_b)));
            }
        }
        out
    }
}

fn join(items: &[&String]) -> String {
    items.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

fn normalize_content_type(value: Option<&HeaderValue>) -> String {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else { return String::new() };
    let mut parts = value.split(';').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty());
    let essence = parts.next().unwrap_or_default();
    let params: Vec<String> = parts.filter(|p| !p.starts_with("charset=")).collect();
    std::iter::once(essence).chain(params).collect::<Vec<_>>().join(";")
}

/// The groups, versions and resources a discovery document lists.
fn discovery_entries(body: &Value) -> Option<BTreeSet<String>> {
    let mut set = BTreeSet::new();
    match body["kind"].as_str()? {
        "APIGroupList" => {
            for group in body["groups"].as_array()? {
                set.insert(group["name"].as_str().unwrap_or_default().to_owned());
                for version in group["versions"].as_array().into_iter().flatten() {
                    set.insert(version["groupVersion"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
        "APIVersions" => {
            for version in body["versions"].as_array()? {
                set.insert(version.as_str().unwrap_or_default().to_owned());
            }
        }
        "APIGroup" => {
            for version in body["versions"].as_array()? {
                set.insert(version["groupVersion"].as_str().unwrap_or_default().to_owned());
            }
        }
        "APIResourceList" => {
            let gv = body["groupVersion"].as_str().unwrap_or_default();
            for resource in body["resources"].as_array()? {
                set.insert(format!("{gv}/{}", resource["name"].as_str().unwrap_or_default()));
            }
        }
        "APIGroupDiscoveryList" => {
            for group in body["items"].as_array()? {
                let name = group["metadata"]["name"].as_str().unwrap_or_default();
                set.insert(name.to_owned());
                for version in group["versions"].as_array().into_iter().flatten() {
                    let v = version["version"].as_str().unwrap_or_default();
                    set.insert(format!("{name}/{v}"));
                    for resource in version["resources"].as_array().into_iter().flatten() {
                        set.insert(format!("{name}/{v}/{}", resource["resource"].as_str().unwrap_or_default()));
                    }
                }
            }
        }
        _ => return None,
    }
    Some(set)
}

/// One side: a client made from a kubeconfig.
struct Side {
    name: String,
    client: kube::Client,
}

impl Side {
    async fn open(path: &Path) -> Result<Self, String> {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let client = kube::Client::try_from(config).map_err(|e| format!("{}: {e}", path.display()))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "?".into());
        Ok(Self { name, client })
    }

    async fn observe(&self, line: &RequestLine) -> Observed {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.send(line)).await {
            Ok(Ok(observed)) => observed,
            Ok(Err(error)) => Observed { error, ..Observed::default() },
            Err(_) => Observed { error: format!("no answer within {REQUEST_TIMEOUT:?}"), ..Observed::default() },
        }
    }

    async fn send(&self, line: &RequestLine) -> Result<Observed, String> {
        let mut request = Request::builder().method(line.method.clone()).uri(&line.path);
        for (name, value) in &line.headers {
            request = request.header(name, value);
        }
        let request = request.body(kube::client::Body::from(line.body.clone())).map_err(|e| e.to_string())?;
        let response = self.client.send(request).await.map_err(|e| e.to_string())?;
        let code = response.status().as_u16();
        let content_type = normalize_content_type(response.headers().get(http::header::CONTENT_TYPE));
        let mut observed = Observed { code, content_type, ..Observed::default() };
        if line.is_watch() && code == 200 {
            // A watch's headers are what is compared; its events are the backend's.
            return Ok(observed);
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        if let Ok(json) = serde_json::from_slice::<Value>(&body) {
            if json["kind"] == "Status" {
                observed.reason = json["reason"].as_str().unwrap_or_default().to_owned();
            }
            observed.discovery = discovery_entries(&json);
        }
        Ok(observed)
    }
}

/// One compared request.
#[derive(Debug, Clone)]
pub struct Row {
    pub request: String,
    pub left: Observed,
    pub right: Observed,
    pub differences: Vec<String>,
}

/// Sends every request to both sides, one after the other (writes are dry runs in the
/// built-in set; the user's own are sent as written).
pub async fn run(left: &Path, right: &Path, requests: &[RequestLine]) -> Result<(Vec<Row>, String, String), String> {
    let (a, b) = (Side::open(left).await?, Side::open(right).await?);
    let (left_name, right_name) =
        if a.name == b.name { ("left".to_owned(), "right".to_owned()) } else { (a.name.clone(), b.name.clone()) };
    let mut rows = Vec::with_capacity(requests.len());
    for line in requests {
        let (l, r) = tokio::join!(a.observe(line), b.observe(line));
        let differences = l.differences(&r, &left_name, &right_name);
        rows.push(Row { request: line.label(), left: l, right: r, differences });
    }
    Ok((rows, left_name, right_name))
}

/// The side-by-side table, then the differences spelled out.
pub fn render(rows: &[Row], left: &str, right: &str) -> String {
    let width = |f: &dyn Fn(&Row) -> usize, title: &str| rows.iter().map(f).max().unwrap_or(0).max(title.len());
    let w_req = width(&|r| r.request.len(), "REQUEST").min(90);
    let w_left = width(&|r| r.left.summary().len(), left).min(60);
    let w_right = width(&|r| r.right.summary().len(), right).min(60);
    let mut out = format!("{:<w_req$}  {:<w_left$}  {:<w_right$}  SAME\n", "REQUEST", left, right);
    for row in rows {
        let same = if row.differences.is_empty() { "yes" } else { "NO" };
        out.push_str(&format!(
            "{:<w_req$}  {:<w_left$}  {:<w_right$}  {same}\n",
            truncate(&row.request, w_req),
            truncate(&row.left.summary(), w_left),
            truncate(&row.right.summary(), w_right)
        ));
    }
    let differing: Vec<&Row> = rows.iter().filter(|r| !r.differences.is_empty()).collect();
    out.push_str(&format!("\n{} requests, {} differ\n", rows.len(), differing.len()));
    for row in differing {
        out.push_str(&format!("\n{}\n", row.request));
        for d in &row.differences {
            out.push_str(&format!("  {d}\n"));
        }
    }
    out
}

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// The command: exit status 0 when nothing differs, 1 when something does, 2 on bad input.
pub async fn command(
    left: PathBuf,
    right: PathBuf,
    requests: Vec<String>,
    file: Option<PathBuf>,
    builtin: bool,
) -> i32 {
    let mut lines = Vec::new();
    if builtin {
        lines.extend(RequestLine::parse_all(BUILTIN_REQUESTS).expect("the built-in requests parse"));
    }
    if let Some(file) = &file {
        match std::fs::read_to_string(file)
            .map_err(|e| format!("{}: {e}", file.display()))
            .and_then(|t| RequestLine::parse_all(&t))
        {
            Ok(more) => lines.extend(more),
            Err(e) => {
                eprintln!("compare: {e}");
                return 2;
            }
        }
    }
    for request in &requests {
        match RequestLine::parse(request) {
            Ok(line) => lines.push(line),
            Err(e) => {
                eprintln!("compare: --request {e}");
                return 2;
            }
        }
    }
    match run(&left, &right, &lines).await {
        Ok((rows, l, r)) => {
            print!("{}", render(&rows, &l, &r));
            i32::from(rows.iter().any(|row| !row.differences.is_empty()))
        }
        Err(e) => {
            eprintln!("compare: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_with_headers_and_a_body() {
        let line = RequestLine::parse("POST /apis/g/v1/things?dryRun=All | Content-Type: application/json | {\"a\":1}")
            .unwrap();
        assert_eq!(line.method, Method::POST);
        assert_eq!(line.path, "/apis/g/v1/things?dryRun=All");
        assert_eq!(line.headers, vec![(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))]);
        assert_eq!(line.body, br#"{"a":1}"#);
        assert!(RequestLine::parse("GET").unwrap_err().contains("METHOD PATH"));
        assert!(RequestLine::parse("GET apis").unwrap_err().contains("must start with /"));
        assert!(RequestLine::parse("GET /x | Bad Header: 1").is_ok(), "a part with a space before : is a body");
        assert_eq!(RequestLine::parse_all(BUILTIN_REQUESTS).unwrap().len(), BUILTIN_REQUESTS.lines().count());
    }

    #[test]
    fn discovery_documents_compare_as_sets() {
        let groups = serde_json::json!({"kind": "APIGroupList", "groups": [
            {"name": "a.io", "versions": [{"groupVersion": "a.io/v1"}]},
            {"name": "b.io", "versions": [{"groupVersion": "b.io/v1"}]}]});
        let fewer = serde_json::json!({"kind": "APIGroupList", "groups": [{"name": "a.io", "versions": [{"groupVersion": "a.io/v1"}]}]});
        let left = Observed { code: 200, discovery: discovery_entries(&groups), ..Observed::default() };
        let right = Observed { code: 200, discovery: discovery_entries(&fewer), ..Observed::default() };
        assert_eq!(left.differences(&right, "direct", "proxy"), ["only in direct: b.io, b.io/v1"]);
        assert!(left.differences(&left.clone(), "direct", "proxy").is_empty());
        let status = Observed { code: 404, reason: "NotFound".into(), ..Observed::default() };
        let other = Observed { code: 503, reason: "ServiceUnavailable".into(), ..Observed::default() };
        assert_eq!(status.differences(&other, "l", "r"), ["status: l 404 NotFound, r 503 ServiceUnavailable"]);
    }

    #[test]
    fn content_types_compare_without_charset() {
        let ct = |s: &'static str| normalize_content_type(Some(&HeaderValue::from_static(s)));
        assert_eq!(ct("application/json; charset=utf-8"), "application/json");
        // Aggregated discovery, as kubectl asks for it: the parameters are the document's kind.
        let aggregated = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
        assert_eq!(ct(aggregated), "application/json;g=apidiscovery.k8s.io;v=v2;as=apigroupdiscoverylist");
    }
}

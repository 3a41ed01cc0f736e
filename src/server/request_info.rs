//! What a request asks for, in kube-apiserver's terms (`RequestInfo` in
//! `k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`): the verb (`list`, `watch`,
//! `deletecollection`, ... rather than the HTTP method), API group and version, namespace,
//! resource, subresource and name, or a non-resource path.
//!
//! The front end needs this before a request goes anywhere: the request deadline and the
//! in-flight limits skip long-running requests and tell mutating from read-only ones exactly
//! as kube-apiserver does, so a client sees the same limits through the proxy as through
//! kube-apiserver. Parsing borrows from the request and allocates nothing.

use std::borrow::Cow;

use http::Method;

use crate::auth::authorization::{Attributes, ResourceAttributes};

/// Verbs that take the place of a resource in the path (`/api/v1/watch/pods`).
const SPECIAL_VERBS: [&str; 2] = ["proxy", "watch"];
/// Subresources of a namespace itself, not resources inside it.
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];
/// kube-apiserver's long-running check: `BasicLongRunningRequestCheck({watch, proxy},
/// {attach, exec, proxy, log, portforward})`.
const LONG_RUNNING_VERBS: [&str; 2] = ["watch", "proxy"];
const LONG_RUNNING_SUBRESOURCES: [&str; 5] = ["attach", "exec", "proxy", "log", "portforward"];
/// The verbs kube's max-in-flight filter counts as read-only; every other verb is mutating.
const READ_ONLY_VERBS: [&str; 3] = ["get", "list", "watch"];

/// A parsed request. Empty strings where kube's struct has empty strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo<'a> {
    pub is_resource_request: bool,
    pub path: &'a str,
    /// kube's verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, `proxy`; for non-resource requests the lower-case method.
    pub verb: Verb<'a>,
    /// `api` or `apis` for resource requests.
    pub api_prefix: &'a str,
    pub api_group: &'a str,
    pub api_version: &'a str,
    pub namespace: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    /// Borrowed from the path, or decoded from `fieldSelector=metadata.name=...`.
    pub name: Cow<'a, str>,
}

/// A verb: one of kube's fixed set, or the lower-cased method of a non-resource request
/// (kept as the method, so nothing is allocated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verb<'a> {
    #[default]
    Unknown,
    Kube(&'static str),
    /// A non-resource request's method, to be lower-cased when it is read.
    Method(&'a str),
}

impl Verb<'_> {
    /// The verb as kube writes it; `""` for a resource request with an unknown method.
    pub fn as_str(&self) -> Cow<'_, str> {
        match self {
            Verb::Unknown => "".into(),
            Verb::Kube(v) => (*v).into(),
            Verb::Method(m) if m.bytes().all(|b| !b.is_ascii_uppercase()) => (*m).into(),
            Verb::Method(m) => m.to_ascii_lowercase().into(),
        }
    }

    fn is(&self, verb: &str) -> bool {
        match self {
            Verb::Unknown => verb.is_empty(),
            Verb::Kube(v) => *v == verb,
            Verb::Method(m) => m.eq_ignore_ascii_case(verb),
        }
    }
}

impl<'a> RequestInfo<'a> {
    /// Parses `method`, `path` and the raw `query` (without `?`) as kube-apiserver does.
    pub fn parse(method: &'a Method, path: &'a str, query: Option<&'a str>) -> Self {
        let non_resource = RequestInfo { path, verb: Verb::Method(method.as_str()), ..Default::default() };
        let trimmed = path.trim_matches('/');
        let mut parts = trimmed.split('/');
        let count = if trimmed.is_empty() { 0 } else { trimmed.split('/').count() };
        if count < 3 {
            return non_resource;
        }
        let Some(prefix @ ("api" | "apis")) = parts.next() else { return non_resource };
        let mut info = RequestInfo { path, api_prefix: prefix, is_resource_request: true, ..Default::default() };
        if prefix == "apis" {
            // The prefix is consumed: "do we have four parts?"
            if count < 4 {
                return non_resource;
            }
            info.api_group = parts.next().unwrap_or_default();
        }
        info.api_version = parts.next().unwrap_or_default();
        // At most `[verb] namespaces NS resource name subresource` matter; the rest is not read.
        let mut buf = [""; 6];
        let mut len = 0;
        for (slot, part) in buf.iter_mut().zip(parts) {
            *slot = part;
            len += 1;
        }
        let mut rest = &buf[..len];
        match rest.first() {
            Some(special) if SPECIAL_VERBS.contains(special) => {
                if rest.len() < 2 {
                    // kube: "unable to determine kind and namespace from url"; treated as a
                    // non-resource request so it meets the ordinary limits.
                    return non_resource;
                }
                info.verb = Verb::Kube(if *special == "proxy" { "proxy" } else { "watch" });
                rest = &rest[1..];
            }
            _ => {
                info.verb = match *method {
                    Method::POST => Verb::Kube("create"),
                    Method::GET | Method::HEAD => Verb::Kube("get"),
                    Method::PUT => Verb::Kube("update"),
                    Method::PATCH => Verb::Kube("patch"),
                    Method::DELETE => Verb::Kube("delete"),
                    _ => Verb::Unknown,
                }
            }
        }
        if rest.first() == Some(&"namespaces") && rest.len() > 1 {
            info.namespace = rest[1];
            if rest.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&rest[2]) {
                rest = &rest[2..];
            }
        }
        if rest.len() >= 3 && !info.verb.is("proxy") {
            info.subresource = rest[2];
        }
        if rest.len() >= 2 {
            info.name = Cow::Borrowed(rest[1]);
        }
        if let Some(resource) = rest.first() {
            info.resource = resource;
        }
        if info.name.is_empty() && info.verb.is("get") {
            let query = Query(query.unwrap_or_default());
            info.verb = Verb::Kube(if query.watch() { "watch" } else { "list" });
            if let Some(name) = query.field_selector_name() {
                info.name = name;
            }
        }
        if info.name.is_empty() && info.verb.is("delete") {
            info.verb = Verb::Kube("deletecollection");
        }
        info
    }

    /// kube-apiserver's long-running check: watches, proxy, and the streaming subresources.
    /// These get no request deadline and are not counted by the in-flight limits.
    pub fn is_long_running(&self) -> bool {
        LONG_RUNNING_VERBS.iter().any(|v| self.verb.is(v))
            || (self.is_resource_request && LONG_RUNNING_SUBRESOURCES.contains(&self.subresource))
            || (!self.is_resource_request && self.path.starts_with("/debug/pprof/"))
    }

    /// What kube's authorizer is asked about this request.
    pub fn attributes(&self) -> Attributes {
        let verb = self.verb.as_str().into_owned();
        if !self.is_resource_request {
            return Attributes::NonResource { verb, path: self.path.to_owned() };
        }
        Attributes::Resource(ResourceAttributes {
            verb,
            group: self.api_group.to_owned(),
            version: self.api_version.to_owned(),
            namespace: self.namespace.to_owned(),
            resource: self.resource.to_owned(),
            subresource: self.subresource.to_owned(),
            name: self.name.clone().into_owned(),
        })
    }

    /// The verb as kube-apiserver's request metrics report it (`apiserver_request_total`,
    /// and the aggregator's per-APIService series): upper case, `GET` told from `LIST`,
    /// `WATCH` and `APPLY` told apart, the streaming subresources as `CONNECT`, and any method
    /// outside that fixed set as `other`, so no client can mint a label value.
    pub fn metric_verb(&self, content_type: Option<&http::HeaderValue>) -> &'static str {
        if !self.is_resource_request {
            return match self.verb {
                Verb::Method(m) => method_metric_verb(m),
                _ => OTHER_METRIC_VERB,
            };
        }
        if CONNECT_SUBRESOURCES.contains(&self.subresource) {
            return "CONNECT";
        }
        match self.verb {
            Verb::Kube("get") => "GET",
            Verb::Kube("list") => "LIST",
            Verb::Kube("watch") => "WATCH",
            Verb::Kube("create") => "POST",
            Verb::Kube("update") => "PUT",
            Verb::Kube("patch") if content_type.is_some_and(|t| t.as_bytes() == APPLY_PATCH_CONTENT_TYPE) => "APPLY",
            Verb::Kube("patch") => "PATCH",
            Verb::Kube("delete") => "DELETE",
            Verb::Kube("deletecollection") => "DELETECOLLECTION",
            Verb::Kube("proxy") => "PROXY",
            _ => OTHER_METRIC_VERB,
        }
    }

    /// Whether kube's max-in-flight filter counts this as a mutating request.
    pub fn is_mutating(&self) -> bool {
        !READ_ONLY_VERBS.iter().any(|v| self.verb.is(v))
    }
}

/// kube's label for a verb outside its set (`OtherRequestMethod`).
pub const OTHER_METRIC_VERB: &str = "other";
/// Subresources kube's request metrics report as `CONNECT` (`validConnectRequests`).
const CONNECT_SUBRESOURCES: [&str; 5] = ["attach", "exec", "log", "portforward", "proxy"];
/// Server-side apply's patch type, reported as the verb `APPLY`.
const APPLY_PATCH_CONTENT_TYPE: &[u8] = b"application/apply-patch+yaml";

/// A non-resource request's method as a metric verb: `HEAD` counts as `GET`, as kube's
/// `CanonicalVerb` has it; anything outside kube's set is `other`.
pub fn method_metric_verb(method: &str) -> &'static str {
    match method {
        "GET" | "HEAD" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        _ => OTHER_METRIC_VERB,
    }
}

/// A raw query string, read the way kube's parameter codec reads the few keys used here.
struct Query<'a>(&'a str);

impl<'a> Query<'a> {
    /// The first value of `key`, still percent-encoded.
    fn first(&self, key: &str) -> Option<&'a str> {
        self.0.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then_some(v)
        })
    }

    /// kube converts the `watch` parameter with "anything but `0` or `false` is true".
    fn watch(&self) -> bool {
        self.first("watch").is_some_and(|v| v != "0" && !v.eq_ignore_ascii_case("false"))
    }

    /// `fieldSelector=metadata.name=NAME` (or `==`) names the object, as kube's
    /// `RequiresExactMatch("metadata.name")` does, when the name is a valid path segment.
    fn field_selector_name(&self) -> Option<Cow<'a, str>> {
        let raw = self.first("fieldSelector")?;
        let selector = percent_encoding::percent_decode_str(raw).decode_utf8().ok()?;
        let name = selector.split(',').find_map(|term| {
            let rest = term.trim().strip_prefix("metadata.name")?;
            rest.strip_prefix("==").or_else(|| rest.strip_prefix('='))
        })?;
        if name.is_empty() || !is_valid_path_segment(name) {
            return None;
        }
        // Rare (a list narrowed to one name), so the one allocation is fine here.
        Some(Cow::Owned(name.to_owned()))
    }
}

/// kube's `path.IsValidPathSegmentName`: not `.` or `..`, no `/` or `%`.
fn is_valid_path_segment(name: &str) -> bool {
    name != "." && name != ".." && !name.contains(['/', '%'])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resource request?, verb, group, version, namespace, resource, subresource, name.
    type Parsed = (bool, String, String, String, String, String, String, String);
    /// Method, url, then the expected verb, group, version, namespace, resource, subresource, name.
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    );

    fn parse(method: &str, url: &str) -> Parsed {
        let method: Method = method.parse().unwrap();
        let (path, query) = url.split_once('?').map_or((url, None), |(p, q)| (p, Some(q)));
        let i = RequestInfo::parse(&method, path, query);
        (
            i.is_resource_request,
            i.verb.as_str().into_owned(),
            i.api_group.into(),
            i.api_version.into(),
            i.namespace.into(),
            i.resource.into(),
            i.subresource.into(),
            i.name.into_owned(),
        )
    }

    /// Cases from kube's own `TestGetAPIRequestInfo`, plus aggregated groups.
    #[test]
    fn paths_parse_as_kube_apiserver_parses_them() {
        let cases: &[Case] = &[
            ("GET", "/api/v1/namespaces", "list", "", "v1", "", "namespaces", "", ""),
            ("GET", "/api/v1/namespaces/other", "get", "", "v1", "other", "namespaces", "", "other"),
            ("GET", "/api/v1/namespaces/other/pods", "list", "", "v1", "other", "pods", "", ""),
            ("GET", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo"),
            ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo"),
            ("GET", "/api/v1/pods", "list", "", "v1", "", "pods", "", ""),
            ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "", "v1", "other", "pods", "status", "foo"),
            ("GET", "/api/v1/watch/pods", "watch", "", "v1", "", "pods", "", ""),
            ("GET", "/api/v1/pods?watch=true", "watch", "", "v1", "", "pods", "", ""),
            ("GET", "/api/v1/pods?watch=false", "list", "", "v1", "", "pods", "", ""),
            ("GET", "/api/v1/pods?watch=0", "list", "", "v1", "", "pods", "", ""),
            ("GET", "/api/v1/pods?watch=yes", "watch", "", "v1", "", "pods", "", ""),
            ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "", "v1", "other", "pods", "", ""),
            (
                "GET",
                "/api/v1/namespaces/other/pods?fieldSelector=metadata.name=foo",
                "list",
                "",
                "v1",
                "other",
                "pods",
                "",
                "foo",
            ),
            (
                "GET",
                "/api/v1/namespaces/other/pods?fieldSelector=metadata.name%3D%3Dfoo",
                "list",
                "",
                "v1",
                "other",
                "pods",
                "",
                "foo",
            ),
            ("POST", "/api/v1/namespaces/other/pods", "create", "", "v1", "other", "pods", "", ""),
            ("PUT", "/api/v1/namespaces/other/pods/foo", "update", "", "v1", "other", "pods", "", "foo"),
            ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "", "v1", "other", "pods", "", "foo"),
            ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "", "v1", "other", "pods", "", "foo"),
            ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "", "v1", "other", "pods", "", ""),
            ("GET", "/api/v1/proxy/namespaces/other/pods/foo/a/b", "proxy", "", "v1", "other", "pods", "", "foo"),
            ("GET", "/api/v1/namespaces/other/pods/foo/log", "get", "", "v1", "other", "pods", "log", "foo"),
            ("POST", "/api/v1/namespaces/other/pods/foo/exec", "create", "", "v1", "other", "pods", "exec", "foo"),
            (
                "PUT",
                "/api/v1/namespaces/other/finalize",
                "update",
                "",
                "v1",
                "other",
                "namespaces",
                "finalize",
                "other",
            ),
            (
                "GET",
                "/apis/extensions/v1beta1/namespaces/other/jobs",
                "list",
                "extensions",
                "v1beta1",
                "other",
                "jobs",
                "",
                "",
            ),
            (
                "GET",
                "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders?watch=1",
                "watch",
                "wardle.example.com",
                "v1alpha1",
                "default",
                "flunders",
                "",
                "",
            ),
            ("GET", "/apis/metrics.k8s.io/v1beta1/nodes/n1", "get", "metrics.k8s.io", "v1beta1", "", "nodes", "", "n1"),
            ("FOO", "/apis/echo.example.com/v1/things", "", "echo.example.com", "v1", "", "things", "", ""),
        ];
        for &(method, url, verb, group, version, ns, resource, sub, name) in cases {
            assert_eq!(
                parse(method, url),
                (true, verb.into(), group.into(), version.into(), ns.into(), resource.into(), sub.into(), name.into()),
                "{method} {url}"
            );
        }
    }

    #[test]
    fn short_and_unprefixed_paths_are_non_resource_requests() {
        for url in [
            "/",
            "/api",
            "/api/v1",
            "/apis",
            "/apis/metrics.k8s.io",
            "/apis/metrics.k8s.io/v1beta1",
            "/version",
            "/openapi/v3/apis/x/v1",
            "/api/v1/watch",
        ] {
            let (resource, verb, ..) = parse("GET", url);
            assert!(!resource, "{url}");
            assert_eq!(verb, "get", "{url}");
        }
        assert_eq!(parse("POST", "/healthz").1, "post");
    }

    #[test]
    fn long_running_and_mutating_follow_kube_apiservers_checks() {
        let info = |method: &'static str, url: &'static str| {
            let method: Method = method.parse().unwrap();
            let (path, query) = url.split_once('?').map_or((url, None), |(p, q)| (p, Some(q)));
            let i = RequestInfo::parse(&method, path, query);
            (i.is_long_running(), i.is_mutating())
        };
        assert_eq!(info("GET", "/api/v1/pods"), (false, false));
        assert_eq!(info("GET", "/api/v1/pods?watch=true"), (true, false));
        assert_eq!(info("GET", "/apis/g.io/v1/watch/things"), (true, false));
        assert_eq!(info("GET", "/api/v1/namespaces/a/pods/p/log"), (true, false));
        assert_eq!(info("POST", "/api/v1/namespaces/a/pods/p/exec"), (true, true));
        assert_eq!(info("GET", "/api/v1/namespaces/a/pods/p/portforward"), (true, false));
        assert_eq!(info("GET", "/api/v1/namespaces/a/services/s/proxy/x"), (true, false));
        assert_eq!(info("POST", "/apis/g.io/v1/namespaces/a/things"), (false, true));
        assert_eq!(info("DELETE", "/apis/g.io/v1/namespaces/a/things"), (false, true));
        assert_eq!(info("GET", "/apis/g.io/v1"), (false, false));
        assert_eq!(info("POST", "/apis/g.io/v1"), (false, true));
        assert_eq!(info("GET", "/debug/pprof/profile"), (true, false));
    }

    #[test]
    fn metric_verbs_are_kube_apiservers_request_metric_verbs() {
        let verb = |method: &str, url: &'static str, content_type: Option<&'static str>| {
            let method: Method = method.parse().unwrap();
            let (path, query) = url.split_once('?').map_or((url, None), |(p, q)| (p, Some(q)));
            let content_type = content_type.map(http::HeaderValue::from_static);
            RequestInfo::parse(&method, path, query).metric_verb(content_type.as_ref())
        };
        assert_eq!(verb("GET", "/apis/g.io/v1/namespaces/a/things/t", None), "GET");
        assert_eq!(verb("HEAD", "/apis/g.io/v1/namespaces/a/things/t", None), "GET");
        assert_eq!(verb("GET", "/apis/g.io/v1/things", None), "LIST");
        assert_eq!(verb("GET", "/apis/g.io/v1/things?watch=1", None), "WATCH");
        assert_eq!(verb("GET", "/apis/g.io/v1/watch/things", None), "WATCH");
        assert_eq!(verb("POST", "/apis/g.io/v1/namespaces/a/things", None), "POST");
        assert_eq!(verb("PUT", "/apis/g.io/v1/namespaces/a/things/t", None), "PUT");
        assert_eq!(verb("PATCH", "/apis/g.io/v1/namespaces/a/things/t", Some("application/merge-patch+json")), "PATCH");
        assert_eq!(verb("PATCH", "/apis/g.io/v1/namespaces/a/things/t", Some("application/apply-patch+yaml")), "APPLY");
        assert_eq!(verb("DELETE", "/apis/g.io/v1/namespaces/a/things/t", None), "DELETE");
        assert_eq!(verb("DELETE", "/apis/g.io/v1/namespaces/a/things", None), "DELETECOLLECTION");
        assert_eq!(verb("POST", "/api/v1/namespaces/a/pods/p/exec", None), "CONNECT");
        assert_eq!(verb("GET", "/api/v1/namespaces/a/pods/p/log", None), "CONNECT");
        assert_eq!(verb("PROPFIND", "/apis/g.io/v1/namespaces/a/things/t", None), "other");
        assert_eq!(verb("GET", "/apis/g.io/v1", None), "GET");
        assert_eq!(verb("HEAD", "/healthz", None), "GET");
        assert_eq!(verb("PROPFIND", "/healthz", None), "other");
        assert_eq!(verb("BREW", "/apis/g.io/v1", None), "other");
    }
}

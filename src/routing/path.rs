//! Classifying a request path the way kube-aggregator's mux does, without allocating.

/// What a request path addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiPath<'a> {
    /// `/apis` (and `/apis/`, which kube serves only in legacy form).
    Apis { trailing_slash: bool },
    /// `/apis/<group>`
    Group(&'a str),
    /// `/apis/<group>/<version>[/...]`; `discovery` when nothing follows the version.
    GroupVersion { group: &'a str, version: &'a str, discovery: bool },
    /// `/api` and everything under it: the core group, always local.
    Legacy,
    /// Anything else (`/version`, `/openapi/v2`, `/healthz`, ...).
    Other,
}

pub fn classify(path: &str) -> ApiPath<'_> {
    if path == "/api" || path.starts_with("/api/") {
        return ApiPath::Legacy;
    }
    let Some(rest) = path.strip_prefix("/apis") else { return ApiPath::Other };
    if rest.is_empty() {
        return ApiPath::Apis { trailing_slash: false };
    }
    let Some(rest) = rest.strip_prefix('/') else { return ApiPath::Other };
    if rest.is_empty() {
        return ApiPath::Apis { trailing_slash: true };
    }
    let (group, rest) = rest.split_once('/').unwrap_or((rest, ""));
    if rest.is_empty() {
        return ApiPath::Group(group);
    }
    let (version, tail) = match rest.split_once('/') {
        Some((v, t)) => (v, Some(t)),
        None => (rest, None),
    };
    if version.is_empty() {
        // `/apis/<group>//...`: kube-aggregator's mux has no handler for it; neither a group
        // document nor a route.
        return ApiPath::Other;
    }
    ApiPath::GroupVersion { group, version, discovery: tail.is_none_or(str::is_empty) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified_like_kube_aggregators_mux() {
        assert_eq!(classify("/apis"), ApiPath::Apis { trailing_slash: false });
        assert_eq!(classify("/apis/"), ApiPath::Apis { trailing_slash: true });
        assert_eq!(classify("/apis/metrics.k8s.io"), ApiPath::Group("metrics.k8s.io"));
        assert_eq!(classify("/apis/metrics.k8s.io/"), ApiPath::Group("metrics.k8s.io"));
        assert_eq!(
            classify("/apis/metrics.k8s.io/v1beta1"),
            ApiPath::GroupVersion { group: "metrics.k8s.io", version: "v1beta1", discovery: true }
        );
        assert_eq!(
            classify("/apis/metrics.k8s.io/v1beta1/"),
            ApiPath::GroupVersion { group: "metrics.k8s.io", version: "v1beta1", discovery: true }
        );
        assert_eq!(
            classify("/apis/metrics.k8s.io/v1beta1/nodes/x"),
            ApiPath::GroupVersion { group: "metrics.k8s.io", version: "v1beta1", discovery: false }
        );
        assert_eq!(classify("/api"), ApiPath::Legacy);
        assert_eq!(classify("/api/v1/pods"), ApiPath::Legacy);
        assert_eq!(classify("/apis/metrics.k8s.io//v1beta1/nodes"), ApiPath::Other);
        assert_eq!(classify("/apis/metrics.k8s.io//"), ApiPath::Other);
        assert_eq!(classify("/apisx"), ApiPath::Other);
        assert_eq!(classify("/apix"), ApiPath::Other);
        assert_eq!(classify("/version"), ApiPath::Other);
    }
}

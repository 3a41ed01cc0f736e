//! APIService objects: parsing manifests, kube-apiserver's validation, and the plain validated
//! model the rest of the proxy works with.
//!
//! Objects arrive as apiregistration.k8s.io/v1 `APIService` (k8s-openapi's type) from files or
//! a cluster, are defaulted (service port 443) and validated once here; everything downstream
//! holds only [`ApiService`], which cannot be invalid.

pub mod manifest;
pub mod validation;
pub mod version;

use std::cmp::Ordering;
use std::sync::Arc;

pub use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService as ApiServiceObject;
pub use validation::{validate, FieldError, ValidationError};

/// The port used when `spec.service.port` is not set.
pub const DEFAULT_SERVICE_PORT: u16 = 443;

/// A validated APIService.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiService {
    /// `<version>.<group>`, `v1.` for the core group.
    pub name: Arc<str>,
    pub group: Arc<str>,
    pub version: Arc<str>,
    pub group_priority_minimum: i32,
    pub version_priority: i32,
    /// `None` for a local APIService, served by the delegate.
    pub service: Option<ServiceReference>,
    /// From the proxy's own annotations; empty unless asked for.
    pub policy: TrafficPolicy,
    /// The object's labels and annotations as loaded, for the read-only apiregistration API.
    pub meta: ObjectLabels,
}

/// An APIService object's labels and annotations, shared (most have none).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ObjectLabels {
    pub labels: Arc<std::collections::BTreeMap<String, String>>,
    pub annotations: Arc<std::collections::BTreeMap<String, String>>,
}

pub const ANNOTATION_MAX_REQUESTS_INFLIGHT: &str = "kube-aggregation-proxy.io/max-requests-inflight";
pub const ANNOTATION_REQUESTS_PER_SECOND: &str = "kube-aggregation-proxy.io/requests-per-second";
pub const ANNOTATION_BURST: &str = "kube-aggregation-proxy.io/burst";
pub const ANNOTATION_LONG_RUNNING_SUBRESOURCES: &str = "kube-aggregation-proxy.io/long-running-subresources";

/// How the proxy treats one APIService's traffic, set by annotations on the APIService (this
/// proxy's own; kube-aggregator has no such thing): flow control that protects a fragile
/// extension server from one noisy client, and subresources that stream like `log` does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Requests in flight at once (long-running ones not counted).
    pub max_requests_inflight: Option<u32>,
    /// A token bucket: this many requests a second on average, `burst` at once.
    pub requests_per_second: Option<u32>,
    pub burst: Option<u32>,
    /// Subresources to treat as long-running besides kube's (attach, exec, log, portforward,
    /// proxy): no deadline, never retried, not counted by the in-flight limits.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub long_running_subresources: Vec<String>,
}

impl TrafficPolicy {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Where a remote APIService lives and how to trust it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceReference {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: u16,
    /// PEM bundle from `spec.caBundle`; empty means "system roots" unless insecure.
    pub ca_bundle: Arc<[u8]>,
    pub insecure_skip_tls_verify: bool,
}

impl ServiceReference {
    /// The name the backend's serving certificate must carry: `<service>.<namespace>.svc`.
    pub fn server_name(&self) -> String {
        format!("{}.{}.svc", self.name, self.namespace)
    }

    /// `namespace/name:port`, the key of the standalone service map.
    pub fn key(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port)
    }
}

impl ApiService {
    pub fn is_local(&self) -> bool {
        self.service.is_none()
    }

    /// kube-aggregator's ByVersionPriority: higher versionPriority first, then kube-aware
    /// version order. `Less` means `self` is preferred.
    pub fn cmp_version_preference(&self, other: &Self) -> Ordering {
        other
            .version_priority
            .cmp(&self.version_priority)
            .then_with(|| version::compare_kube_aware(&other.version, &self.version))
    }

    /// kube-aggregator's ByGroupPriorityMinimum: higher groupPriorityMinimum first, then name.
    pub fn cmp_group_preference(&self, other: &Self) -> Ordering {
        other.group_priority_minimum.cmp(&self.group_priority_minimum).then_with(|| self.name.cmp(&other.name))
    }
}

/// Orders APIServices the way legacy `/apis` lists them: groups by their best APIService
/// (highest groupPriorityMinimum, then name), versions within a group by preference.
pub fn sorted_by_group_and_version(apiservices: &[ApiService]) -> Vec<Vec<&ApiService>> {
    sorted_by_group_and_version_by(apiservices, |a| a)
}

/// [`sorted_by_group_and_version`] for anything that holds an APIService (routes, `Arc`s).
pub fn sorted_by_group_and_version_by<T>(items: &[T], apiservice: impl Fn(&T) -> &ApiService) -> Vec<Vec<&T>> {
    let mut all: Vec<&T> = items.iter().collect();
    all.sort_by(|a, b| apiservice(a).cmp_group_preference(apiservice(b)));
    let mut groups: Vec<Vec<&T>> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for item in all {
        match index.get(&*apiservice(item).group) {
            Some(&i) => groups[i].push(item),
            None => {
                index.insert(&apiservice(item).group, groups.len());
                groups.push(vec![item]);
            }
        }
    }
    for g in &mut groups {
        g.sort_by(|a, b| apiservice(a).cmp_version_preference(apiservice(b)));
    }
    groups
}

/// Building APIServices in unit tests across the crate.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An APIService named `<version>.<group>`; with `service`, remote (namespace `ns`, port
    /// 443, insecureSkipTLSVerify), else local.
    pub(crate) fn apiservice(name: &str, gpm: i32, vp: i32, service: Option<&str>) -> ApiService {
        let (version, group) = name.split_once('.').expect("name is <version>.<group>");
        ApiService {
            name: name.into(),
            group: group.into(),
            version: version.into(),
            group_priority_minimum: gpm,
            version_priority: vp,
            service: service.map(|s| ServiceReference {
                namespace: "ns".into(),
                name: s.into(),
                port: 443,
                ca_bundle: Arc::from(&b""[..]),
                insecure_skip_tls_verify: true,
            }),
            policy: TrafficPolicy::default(),
            meta: ObjectLabels::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(name: &str, gpm: i32, vp: i32) -> ApiService {
        testing::apiservice(name, gpm, vp, None)
    }

    fn order(apiservices: &[ApiService]) -> Vec<Vec<&str>> {
        sorted_by_group_and_version(apiservices)
            .into_iter()
            .map(|g| g.into_iter().map(|a| &*a.name).collect())
            .collect()
    }

    #[test]
    fn groups_sort_by_their_best_priority_then_name() {
        let all = [
            local("v1.zeta.io", 100, 10),
            local("v1.alpha.io", 100, 10),
            local("v1beta1.low.io", 50, 10),
            local("v2.low.io", 2000, 1),
            local("v1.high.io", 1000, 10),
        ];
        // low.io's best APIService (v2, 2000) lifts the whole group to the front; inside the
        // group, versionPriority still puts v1beta1 first.
        assert_eq!(
            order(&all),
            [vec!["v1beta1.low.io", "v2.low.io"], vec!["v1.high.io"], vec!["v1.alpha.io"], vec!["v1.zeta.io"]]
        );
    }

    #[test]
    fn versions_sort_by_priority_then_kube_aware_order() {
        let all = [
            local("v1alpha1.g.io", 100, 10),
            local("v1.g.io", 100, 10),
            local("v2beta1.g.io", 100, 10),
            local("v1beta1.g.io", 100, 20),
        ];
        assert_eq!(order(&all), [vec!["v1beta1.g.io", "v1.g.io", "v2beta1.g.io", "v1alpha1.g.io"]]);
    }
}

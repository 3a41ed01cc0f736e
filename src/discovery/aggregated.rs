//! Aggregated discovery (`apidiscovery.k8s.io/v2`, `APIGroupDiscoveryList`) at `/apis`: the
//! document types, the conversion of a legacy `APIResourceList`, and the pure merge that
//! kube-aggregator's discovery manager and aggregated ResourceManager perform.
//!
//! The merge takes every input at once and returns the whole document, so the same inputs
//! always give the same bytes (and so the same `ETag`):
//!
//! - **Sources.** Each group-version comes from a source; the lowest one wins a duplicated
//!   group-version, as in kube's ResourceManager: [`Source::Remote`] (a remote APIService's
//!   backend, kube's AggregatorSource = 0) before [`Source::Delegate`] (the delegate's own
//!   aggregated document, kube's Builtin/CRD sources).
//! - **Group order.** A group's priority is the maximum `groupPriorityMinimum` over its
//!   versions (each counted with the priority of the source that won it); groups sort by it,
//!   highest first, then by group name.
//! - **Version order.** `versionPriority` highest first, then kube-aware version order
//!   ([`compare_kube_aware`]); the first version is the preferred one.
//! - **`responseKind`** is never absent: kube forces `{}` for every resource and subresource
//!   (a workaround for client-go 0.26.0–0.26.3 panics, kubernetes#118361).

use std::collections::{BTreeMap, HashMap};

use http::header::{HeaderMap, ACCEPT};
use serde::{Deserialize, Serialize};

use crate::apiservice::version::compare_kube_aware;

/// The media type of the aggregated document, in `Accept` and in `Content-Type`.
pub const CONTENT_TYPE_AGGREGATED_V2: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
/// What the fetcher asks backends for: the v2 document, else plain JSON (legacy).
pub const ACCEPT_AGGREGATED_V2_OR_JSON: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";

pub const FRESHNESS_CURRENT: &str = "Current";
pub const FRESHNESS_STALE: &str = "Stale";

/// kube's defaults for a group-version whose priorities nobody set.
pub const DEFAULT_GROUP_PRIORITY_MINIMUM: i32 = 1000;
pub const DEFAULT_VERSION_PRIORITY: i32 = 15;

/// `metav1.GroupVersionKind`; all three fields are always written, so an empty one is
/// `{"group":"","version":"","kind":""}` as Go writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

/// `apidiscovery.k8s.io/v2` APISubresourceDiscovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiSubresourceDiscovery {
    #[serde(default)]
    pub subresource: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_kind: Option<GroupVersionKind>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepted_types: Vec<GroupVersionKind>,
    #[serde(default)]
    pub verbs: Vec<String>,
}

/// `apidiscovery.k8s.io/v2` APIResourceDiscovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiResourceDiscovery {
    #[serde(default)]
    pub resource: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_kind: Option<GroupVersionKind>,
    #[serde(default)]
    pub scope: String,
    /// Always written, empty or not, as kube's struct has no `omitempty` here (equal
    /// content must give kube's bytes, and so its ETag).
    #[serde(default)]
    pub singular_resource: String,
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub short_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subresources: Vec<ApiSubresourceDiscovery>,
}

/// `apidiscovery.k8s.io/v2` APIVersionDiscovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiVersionDiscovery {
    #[serde(default)]
    pub version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ApiResourceDiscovery>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub freshness: String,
}

/// The part of `metadata` a discovery group carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    #[serde(default)]
    pub name: String,
}

/// `apidiscovery.k8s.io/v2` APIGroupDiscovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiGroupDiscovery {
    #[serde(default)]
    pub metadata: GroupMeta,
    #[serde(default)]
    pub versions: Vec<ApiVersionDiscovery>,
}

/// `apidiscovery.k8s.io/v2` APIGroupDiscoveryList. Decoding is lenient (a backend's document
/// needs only `items`); encoding always writes `kind`, `apiVersion` and an empty `metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiGroupDiscoveryList {
    #[serde(default = "list_kind")]
    pub kind: String,
    #[serde(default = "list_api_version")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub items: Vec<ApiGroupDiscovery>,
}

fn list_kind() -> String {
    "APIGroupDiscoveryList".to_owned()
}

fn list_api_version() -> String {
    "apidiscovery.k8s.io/v2".to_owned()
}

impl ApiGroupDiscoveryList {
    pub fn new(items: Vec<ApiGroupDiscovery>) -> Self {
        Self { kind: list_kind(), api_version: list_api_version(), metadata: serde_json::Map::new(), items }
    }

    /// Every group-version in the document, keyed `(group, version)`.
    pub fn versions(&self) -> impl Iterator<Item = ((&str, &str), &ApiVersionDiscovery)> {
        self.items
            .iter()
            .flat_map(|g| g.versions.iter().map(move |v| ((g.metadata.name.as_str(), v.version.as_str()), v)))
    }
}

impl Default for ApiGroupDiscoveryList {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// A legacy `APIResourceList` as served at `/apis/<group>/<version>`, decoded leniently.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LegacyResourceList {
    #[serde(default)]
    pub group_version: String,
    #[serde(default)]
    pub resources: Vec<LegacyResource>,
}

/// A legacy `APIResource`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LegacyResource {
    pub name: String,
    #[serde(default)]
    pub singular_name: String,
    #[serde(default)]
    pub namespaced: bool,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default)]
    pub short_names: Vec<String>,
    #[serde(default)]
    pub categories: Vec<String>,
}

fn scope(namespaced: bool) -> String {
    if namespaced { "Namespaced" } else { "Cluster" }.to_owned()
}

/// Converts a legacy resource list into one version's discovery, as kube's
/// `ConvertGroupVersionIntoToDiscovery` does: `parent/sub` entries become subresources of
/// `parent` (a parent listed only through its subresources gets a bare entry), resources keep
/// their order of first appearance, and `responseKind` defaults to the list's group-version.
pub fn convert_legacy(group: &str, version: &str, list: &LegacyResourceList) -> ApiVersionDiscovery {
    let kind_of = |r: &LegacyResource| GroupVersionKind {
        group: r.group.clone().unwrap_or_else(|| group.to_owned()),
        version: r.version.clone().unwrap_or_else(|| version.to_owned()),
        kind: r.kind.clone(),
    };
    let mut resources: Vec<ApiResourceDiscovery> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut slot = |resources: &mut Vec<ApiResourceDiscovery>, name: &str, namespaced: bool| -> usize {
        *index.entry(name.to_owned()).or_insert_with(|| {
            resources.push(ApiResourceDiscovery {
                resource: name.to_owned(),
                scope: scope(namespaced),
                ..ApiResourceDiscovery::default()
            });
            resources.len() - 1
        })
    };
    for r in &list.resources {
        match r.name.split_once('/') {
            Some((parent, sub)) => {
                let i = slot(&mut resources, parent, r.namespaced);
                resources[i].subresources.push(ApiSubresourceDiscovery {
                    subresource: sub.to_owned(),
                    response_kind: Some(kind_of(r)),
                    accepted_types: Vec::new(),
                    verbs: r.verbs.clone(),
                });
            }
            None => {
                let i = slot(&mut resources, &r.name, r.namespaced);
                let entry = &mut resources[i];
                entry.scope = scope(r.namespaced);
                entry.response_kind = Some(kind_of(r));
                entry.singular_resource = r.singular_name.clone();
                entry.verbs = r.verbs.clone();
                entry.short_names = r.short_names.clone();
                entry.categories = r.categories.clone();
            }
        }
    }
    let mut discovery =
        ApiVersionDiscovery { version: version.to_owned(), resources, freshness: FRESHNESS_CURRENT.to_owned() };
    force_response_kinds(&mut discovery);
    discovery
}

/// Sets every missing `responseKind` to `{}` (kubernetes#118361).
pub fn force_response_kinds(version: &mut ApiVersionDiscovery) {
    for r in &mut version.resources {
        r.response_kind.get_or_insert_with(GroupVersionKind::default);
        for s in &mut r.subresources {
            s.response_kind.get_or_insert_with(GroupVersionKind::default);
        }
    }
}

/// Where a group-version's discovery came from; the lowest wins a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A remote APIService, fetched from its backend (kube's AggregatorSource, 0).
    Remote,
    /// The delegate's own aggregated document: built-in and CRD groups (kube's Builtin 100
    /// and CRD 200 sources, which the delegate has already merged).
    Delegate,
}

/// One group-version as an input to [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionEntry {
    pub group: String,
    pub source: Source,
    pub group_priority_minimum: i32,
    pub version_priority: i32,
    pub discovery: ApiVersionDiscovery,
}

/// The priorities of group-versions served by the delegate, from the routing table's local
/// APIServices (kube-apiserver registers one per built-in group-version and CRD version).
pub type LocalPriorities = HashMap<(String, String), (i32, i32)>;

/// `apiregistration.k8s.io/v1` as the proxy serves it in standalone mode (read-only
/// `apiservices`), first in the list as kube-apiserver's is.
pub fn apiregistration_entry() -> VersionEntry {
    let kind = GroupVersionKind {
        group: super::AGGREGATOR_GROUP.to_owned(),
        version: "v1".to_owned(),
        kind: "APIService".to_owned(),
    };
    VersionEntry {
        group: super::AGGREGATOR_GROUP.to_owned(),
        source: Source::Delegate,
        group_priority_minimum: super::AGGREGATOR_GROUP_PRIORITY,
        version_priority: 15,
        discovery: ApiVersionDiscovery {
            version: "v1".to_owned(),
            resources: vec![ApiResourceDiscovery {
                resource: "apiservices".to_owned(),
                response_kind: Some(kind.clone()),
                scope: "Cluster".to_owned(),
                singular_resource: "apiservice".to_owned(),
                verbs: ["get", "list", "watch"].map(str::to_owned).to_vec(),
                categories: vec!["api-extensions".to_owned()],
                subresources: vec![ApiSubresourceDiscovery {
                    subresource: "status".to_owned(),
                    response_kind: Some(kind),
                    verbs: vec!["get".to_owned()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            freshness: "Current".to_owned(),
        },
    }
}

/// Turns the delegate's aggregated `/apis` document into merge inputs, with priorities from
/// `priorities` or kube's defaults (1000 / 15) for a group-version no local APIService names.
pub fn delegate_entries(document: &ApiGroupDiscoveryList, priorities: &LocalPriorities) -> Vec<VersionEntry> {
    document
        .versions()
        .filter(|((group, _), _)| !group.is_empty())
        .map(|((group, version), discovery)| {
            let (gpm, vp) = priorities.get(&(group.to_owned(), version.to_owned())).copied().unwrap_or(
                // kube-aggregator's own group has no APIService and always comes first.
                if group == super::AGGREGATOR_GROUP {
                    (super::AGGREGATOR_GROUP_PRIORITY, 0)
                } else {
                    (DEFAULT_GROUP_PRIORITY_MINIMUM, DEFAULT_VERSION_PRIORITY)
                },
            );
            let mut discovery = discovery.clone();
            force_response_kinds(&mut discovery);
            VersionEntry {
                group: group.to_owned(),
                source: Source::Delegate,
                group_priority_minimum: gpm,
                version_priority: vp,
                discovery,
            }
        })
        .collect()
}

/// Merges group-versions from every source into one document, in kube's order (see the
/// module docs). The core group (`""`) belongs to `/api` and is dropped.
pub fn merge(entries: impl IntoIterator<Item = VersionEntry>) -> ApiGroupDiscoveryList {
    // The winner per group-version: the lowest source; between equal sources the first seen.
    let mut winners: BTreeMap<(String, String), VersionEntry> = BTreeMap::new();
    for entry in entries {
        if entry.group.is_empty() {
            continue;
        }
        let key = (entry.group.clone(), entry.discovery.version.clone());
        match winners.get(&key) {
            Some(existing) if existing.source <= entry.source => {}
            _ => {
                winners.insert(key, entry);
            }
        }
    }
    let mut groups: BTreeMap<String, Vec<VersionEntry>> = BTreeMap::new();
    for ((group, _), entry) in winners {
        groups.entry(group).or_default().push(entry);
    }
    let mut groups: Vec<(i32, String, Vec<VersionEntry>)> = groups
        .into_iter()
        .map(|(name, mut versions)| {
            versions.sort_by(|a, b| {
                b.version_priority
                    .cmp(&a.version_priority)
                    .then_with(|| compare_kube_aware(&b.discovery.version, &a.discovery.version))
            });
            let priority = versions.iter().map(|v| v.group_priority_minimum).max().unwrap_or(0);
            (priority, name, versions)
        })
        .collect();
    // Stable, and names are unique: ties on priority fall back to the name order above.
    groups.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    ApiGroupDiscoveryList::new(
        groups
            .into_iter()
            .map(|(_, name, versions)| ApiGroupDiscovery {
                metadata: GroupMeta { name },
                versions: versions.into_iter().map(|v| v.discovery).collect(),
            })
            .collect(),
    )
}

/// Whether a `Content-Type` names the aggregated v2 document (`application/json` with
/// `g=apidiscovery.k8s.io`, `v=v2`, `as=APIGroupDiscoveryList`, in any order).
pub fn is_aggregated_v2_content_type(value: &str) -> bool {
    matches!(MediaRange::parse(value), Some(r) if r.is_aggregated_v2_json())
}

/// What `/apis` answers for a request's `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// `APIGroupDiscoveryList` (apidiscovery.k8s.io/v2, JSON).
    AggregatedV2,
    /// The legacy `APIGroupList`.
    Legacy,
}

/// Picks the document for `/apis` the way kube's negotiation does: media ranges in order of
/// their `q` (ties keep the client's order), `q=0` refused, and the first range the proxy can
/// serve wins. The aggregated document is served as JSON only; an aggregated range for
/// another version (v2beta1) or protobuf is skipped. With nothing servable the legacy list is
/// answered, as it always was.
pub fn negotiate(headers: &HeaderMap) -> Negotiated {
    let mut ranges: Vec<MediaRange<'_>> = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(MediaRange::parse)
        .filter(|r| r.q > 0.0)
        .collect();
    ranges.sort_by(|a, b| b.q.total_cmp(&a.q));
    for range in &ranges {
        if range.is_aggregated_v2_json() {
            return Negotiated::AggregatedV2;
        }
        if range.as_kind.is_none() && range.serves_json() {
            return Negotiated::Legacy;
        }
    }
    Negotiated::Legacy
}

/// Whether `Accept` admits plain JSON (`application/json`, `application/*` or `*/*` with a
/// non-zero `q`); no `Accept` at all admits anything.
pub fn accepts_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(ACCEPT).iter().peekable();
    if values.peek().is_none() {
        return true;
    }
    values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(MediaRange::parse)
        .any(|r| r.q > 0.0 && r.as_kind.is_none() && r.serves_json())
}

/// One parsed media range of an `Accept` or `Content-Type` value.
#[derive(Debug, Clone, PartialEq)]
struct MediaRange<'a> {
    media_type: &'a str,
    group: Option<&'a str>,
    version: Option<&'a str>,
    as_kind: Option<&'a str>,
    q: f32,
}

impl<'a> MediaRange<'a> {
    fn parse(range: &'a str) -> Option<Self> {
        let mut parts = range.split(';').map(str::trim);
        let media_type = parts.next().filter(|m| !m.is_empty())?;
        let mut parsed = Self { media_type, group: None, version: None, as_kind: None, q: 1.0 };
        for param in parts {
            let Some((key, value)) = param.split_once('=') else { continue };
            let value = value.trim().trim_matches('"');
            match key.trim() {
                "g" => parsed.group = Some(value),
                "v" => parsed.version = Some(value),
                "as" => parsed.as_kind = Some(value),
                // An unparsable q is treated as kube's negotiation does: the range is refused.
                "q" => parsed.q = value.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        Some(parsed)
    }

    fn serves_json(&self) -> bool {
        ["application/json", "application/*", "*/*"].iter().any(|m| self.media_type.eq_ignore_ascii_case(m))
    }

    fn is_aggregated_v2_json(&self) -> bool {
        self.media_type.eq_ignore_ascii_case("application/json")
            && self.group == Some("apidiscovery.k8s.io")
            && self.version == Some("v2")
            && self.as_kind == Some("APIGroupDiscoveryList")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::json;

    fn version(v: &str, resource: &str) -> ApiVersionDiscovery {
        ApiVersionDiscovery {
            version: v.into(),
            resources: vec![ApiResourceDiscovery {
                resource: resource.into(),
                response_kind: Some(GroupVersionKind::default()),
                scope: "Cluster".into(),
                verbs: vec!["get".into()],
                ..Default::default()
            }],
            freshness: FRESHNESS_CURRENT.into(),
        }
    }

    fn entry(group: &str, v: &str, source: Source, gpm: i32, vp: i32) -> VersionEntry {
        VersionEntry {
            group: group.into(),
            source,
            group_priority_minimum: gpm,
            version_priority: vp,
            discovery: version(v, &format!("{group}-{v}-{source:?}")),
        }
    }

    fn shape(list: &ApiGroupDiscoveryList) -> Vec<(String, Vec<String>)> {
        list.items
            .iter()
            .map(|g| (g.metadata.name.clone(), g.versions.iter().map(|v| v.version.clone()).collect()))
            .collect()
    }

    fn owned(shape: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        shape.iter().map(|(g, vs)| ((*g).to_owned(), vs.iter().map(|v| (*v).to_owned()).collect())).collect()
    }

    #[test]
    fn groups_sort_by_max_priority_then_name_and_ties_go_to_the_name() {
        let merged = merge([
            entry("zeta.io", "v1", Source::Remote, 100, 10),
            entry("alpha.io", "v1", Source::Remote, 100, 10),
            entry("low.io", "v1beta1", Source::Remote, 50, 10),
            entry("low.io", "v2", Source::Remote, 2000, 1),
            entry("high.io", "v1", Source::Remote, 1000, 10),
        ]);
        assert_eq!(
            shape(&merged),
            owned(
                &[("low.io", &["v1beta1", "v2"]), ("high.io", &["v1"]), ("alpha.io", &["v1"]), ("zeta.io", &["v1"]),]
            )
        );
    }

    #[test]
    fn versions_sort_by_priority_then_kube_aware_order() {
        let merged = merge([
            entry("g.io", "v1alpha1", Source::Remote, 100, 10),
            entry("g.io", "v1", Source::Remote, 100, 10),
            entry("g.io", "v2beta1", Source::Remote, 100, 10),
            entry("g.io", "v1beta1", Source::Remote, 100, 20),
            entry("g.io", "foo10", Source::Remote, 100, 10),
            entry("g.io", "foo1", Source::Remote, 100, 10),
        ]);
        assert_eq!(shape(&merged), owned(&[("g.io", &["v1beta1", "v1", "v2beta1", "v1alpha1", "foo1", "foo10"])]));
    }

    #[test]
    fn versions_of_one_group_from_different_backends_are_merged_into_one_group() {
        // Two backends serve two versions of one group; the input order does not matter.
        let a = entry("split.io", "v1", Source::Remote, 100, 15);
        let b = entry("split.io", "v2", Source::Remote, 300, 20);
        let one = merge([a.clone(), b.clone(), entry("other.io", "v1", Source::Remote, 200, 1)]);
        let two = merge([entry("other.io", "v1", Source::Remote, 200, 1), b, a]);
        assert_eq!(one, two);
        // The group takes its best version's priority (300), so it comes before other.io.
        assert_eq!(shape(&one), owned(&[("split.io", &["v2", "v1"]), ("other.io", &["v1"])]));
    }

    #[test]
    fn a_group_split_between_delegate_and_remote_keeps_both_and_remote_wins_duplicates() {
        let merged = merge([
            entry("mixed.io", "v1", Source::Delegate, 1000, 100),
            entry("mixed.io", "v2", Source::Delegate, 1000, 100),
            entry("mixed.io", "v2", Source::Remote, 500, 200),
            entry("apps", "v1", Source::Delegate, 17800, 15),
        ]);
        assert_eq!(shape(&merged), owned(&[("apps", &["v1"]), ("mixed.io", &["v2", "v1"])]));
        let v2 = &merged.items[1].versions[0];
        assert_eq!(v2.resources[0].resource, "mixed.io-v2-Remote");
        // Order of arrival does not change the winner.
        let reversed = merge([
            entry("mixed.io", "v2", Source::Remote, 500, 200),
            entry("mixed.io", "v2", Source::Delegate, 1000, 100),
        ]);
        assert_eq!(reversed.items[0].versions[0].resources[0].resource, "mixed.io-v2-Remote");
    }

    #[test]
    fn group_priority_counts_only_the_winning_source() {
        // The delegate's 20000 for x.io/v1 loses to the remote's 10, so x.io sorts by 10.
        let merged = merge([
            entry("x.io", "v1", Source::Delegate, 20000, 1),
            entry("x.io", "v1", Source::Remote, 10, 1),
            entry("y.io", "v1", Source::Remote, 20, 1),
        ]);
        assert_eq!(shape(&merged), owned(&[("y.io", &["v1"]), ("x.io", &["v1"])]));
    }

    #[test]
    fn delegate_entries_take_local_priorities_or_kube_defaults_and_skip_the_core_group() {
        let doc: ApiGroupDiscoveryList = serde_json::from_value(json!({"items": [
            {"metadata": {"name": ""}, "versions": [{"version": "v1"}]},
            {"metadata": {"name": "apps", "creationTimestamp": null}, "versions": [{"version": "v1",
                "resources": [{"resource": "deployments", "scope": "Namespaced", "verbs": ["get"]}]}]},
            {"metadata": {"name": "crd.io"}, "versions": [{"version": "v1"}]},
        ]}))
        .unwrap();
        let priorities = LocalPriorities::from([(("apps".into(), "v1".into()), (17800, 15))]);
        let entries = delegate_entries(&doc, &priorities);
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].group.as_str(), entries[0].group_priority_minimum), ("apps", 17800));
        assert_eq!(entries[0].discovery.resources[0].response_kind, Some(GroupVersionKind::default()));
        assert_eq!((entries[1].group_priority_minimum, entries[1].version_priority), (1000, 15));
    }

    #[test]
    fn stale_versions_keep_their_resources_and_say_so() {
        let mut stale = entry("m.io", "v1", Source::Remote, 100, 1);
        stale.discovery.freshness = FRESHNESS_STALE.into();
        let json = serde_json::to_value(merge([stale])).unwrap();
        assert_eq!(json["items"][0]["versions"][0]["freshness"], "Stale");
        assert_eq!(json["items"][0]["versions"][0]["resources"][0]["resource"], "m.io-v1-Remote");
    }

    #[test]
    fn legacy_lists_convert_with_subresources_under_their_parent() {
        let list: LegacyResourceList = serde_json::from_value(json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "wardle.example.com/v1alpha1",
            "resources": [
                {"name": "flunders/status", "namespaced": true, "kind": "Flunder", "verbs": ["get", "patch"]},
                {"name": "flunders", "singularName": "flunder", "namespaced": true, "kind": "Flunder",
                 "verbs": ["get", "list"], "shortNames": ["fl"], "categories": ["all"]},
                {"name": "fischers", "singularName": "fischer", "namespaced": false, "kind": "Fischer", "verbs": []},
                {"name": "fischers/scale", "namespaced": false, "group": "autoscaling", "version": "v1",
                 "kind": "Scale", "verbs": ["get"]},
                {"name": "orphans/log", "namespaced": true, "kind": "", "verbs": ["get"]},
            ]
        }))
        .unwrap();
        let converted = convert_legacy("wardle.example.com", "v1alpha1", &list);
        assert_eq!(
            serde_json::to_value(&converted).unwrap(),
            json!({"version": "v1alpha1", "freshness": "Current", "resources": [
                {"resource": "flunders", "scope": "Namespaced", "singularResource": "flunder",
                 "responseKind": {"group": "wardle.example.com", "version": "v1alpha1", "kind": "Flunder"},
                 "verbs": ["get", "list"], "shortNames": ["fl"], "categories": ["all"],
                 "subresources": [{"subresource": "status", "verbs": ["get", "patch"],
                     "responseKind": {"group": "wardle.example.com", "version": "v1alpha1", "kind": "Flunder"}}]},
                {"resource": "fischers", "scope": "Cluster", "singularResource": "fischer", "verbs": [],
                 "responseKind": {"group": "wardle.example.com", "version": "v1alpha1", "kind": "Fischer"},
                 "subresources": [{"subresource": "scale", "verbs": ["get"],
                     "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"}}]},
                {"resource": "orphans", "scope": "Namespaced", "singularResource": "", "verbs": [],
                 "responseKind": {"group": "", "version": "", "kind": ""},
                 "subresources": [{"subresource": "log", "verbs": ["get"],
                     "responseKind": {"group": "wardle.example.com", "version": "v1alpha1", "kind": ""}}]},
            ]})
        );
    }

    #[test]
    fn a_backend_document_missing_response_kinds_gets_empty_ones() {
        let mut v: ApiVersionDiscovery = serde_json::from_value(json!({"version": "v1", "resources": [
            {"resource": "things", "scope": "Cluster", "verbs": ["get"], "subresources": [{"subresource": "status"}]}
        ]}))
        .unwrap();
        force_response_kinds(&mut v);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["resources"][0]["responseKind"], json!({"group": "", "version": "", "kind": ""}));
        assert_eq!(
            json["resources"][0]["subresources"][0]["responseKind"],
            json!({"group": "", "version": "", "kind": ""})
        );
    }

    #[test]
    fn an_empty_document_still_names_its_kind() {
        assert_eq!(
            serde_json::to_value(merge([])).unwrap(),
            json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": []})
        );
    }

    fn accept(value: &str) -> Negotiated {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_str(value).unwrap());
        negotiate(&h)
    }

    #[test]
    fn negotiation_takes_the_first_acceptable_range() {
        use Negotiated::*;
        assert_eq!(accept(CONTENT_TYPE_AGGREGATED_V2), AggregatedV2);
        assert_eq!(accept("application/json; as=APIGroupDiscoveryList; v=v2; g=apidiscovery.k8s.io"), AggregatedV2);
        // client-go 1.30-1.36: v2, v2beta1, then plain JSON.
        assert_eq!(
            accept(&format!(
                "{CONTENT_TYPE_AGGREGATED_V2},application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"
            )),
            AggregatedV2
        );
        // The first acceptable range wins: plain JSON first means legacy.
        assert_eq!(accept(&format!("application/json,{CONTENT_TYPE_AGGREGATED_V2}")), Legacy);
        assert_eq!(accept(&format!("*/*,{CONTENT_TYPE_AGGREGATED_V2}")), Legacy);
        // Ranges it cannot serve are skipped.
        assert_eq!(
            accept(&format!(
                "application/vnd.kubernetes.protobuf;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,{CONTENT_TYPE_AGGREGATED_V2}"
            )),
            AggregatedV2
        );
        assert_eq!(accept("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"), Legacy);
        // q=0 refuses; a higher q is preferred whatever the order.
        assert_eq!(accept(&format!("{CONTENT_TYPE_AGGREGATED_V2};q=0")), Legacy);
        assert_eq!(accept(&format!("application/json;q=0.5,{CONTENT_TYPE_AGGREGATED_V2};q=0.9")), AggregatedV2);
        assert_eq!(negotiate(&HeaderMap::new()), Legacy);
    }

    #[test]
    fn json_is_acceptable_unless_only_other_types_are_named() {
        let accepts = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(ACCEPT, HeaderValue::from_str(v).unwrap());
            accepts_json(&h)
        };
        assert!(accepts_json(&HeaderMap::new()));
        assert!(accepts("application/json"));
        assert!(accepts("application/com.github.proto-openapi.spec.v2@v1.0+protobuf, */*;q=0.1"));
        assert!(!accepts("application/com.github.proto-openapi.spec.v2@v1.0+protobuf"));
        assert!(!accepts("application/json;q=0"));
    }

    #[test]
    fn content_type_detection_ignores_parameter_order() {
        assert!(is_aggregated_v2_content_type(CONTENT_TYPE_AGGREGATED_V2));
        assert!(is_aggregated_v2_content_type("application/json;as=APIGroupDiscoveryList;v=v2;g=apidiscovery.k8s.io"));
        assert!(!is_aggregated_v2_content_type("application/json"));
        assert!(!is_aggregated_v2_content_type(
            "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
        ));
    }
}

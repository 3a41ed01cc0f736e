//! Legacy discovery built from the routing table: `/apis` (APIGroupList) and `/apis/<group>`
//! (APIGroup), in kube-aggregator's order, with `preferredVersion` = the group's first version.
//!
//! Like kube-aggregator, every APIService is listed whatever its availability; the core group
//! (`v1.`) is served under `/api`, not here.
//!
//! The other documents are built from the backends' own, fetched in the background:
//! [`aggregated`] (the `apidiscovery.k8s.io/v2` document and its merge), [`openapi`]
//! (`/openapi/v2` and `/openapi/v3`), [`fetcher`] (the task that downloads and rebuilds them),
//! [`handlers`] (answering from memory) and [`published`] (a document ready to serve, with
//! its `ETag`).

pub mod aggregated;
pub mod delegate;
pub mod fetcher;
pub mod handlers;
pub mod openapi;
pub mod published;

pub use fetcher::{DelegateDiscovery, DiscoveryDocuments, Fetcher, FetcherSettings};

use serde::Serialize;

use crate::routing::{GroupRoutes, RoutingTable};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GroupVersionForDiscovery {
    pub group_version: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<&'static str>,
    pub name: String,
    pub versions: Vec<GroupVersionForDiscovery>,
    pub preferred_version: GroupVersionForDiscovery,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiGroupList {
    pub kind: &'static str,
    pub api_version: &'static str,
    pub groups: Vec<ApiGroup>,
}

fn api_group(group: &GroupRoutes) -> Option<ApiGroup> {
    let versions: Vec<_> = group
        .versions
        .iter()
        .map(|r| GroupVersionForDiscovery {
            group_version: format!("{}/{}", group.name, r.apiservice.version),
            version: r.apiservice.version.to_string(),
        })
        .collect();
    let preferred_version = versions.first()?.clone();
    Some(ApiGroup { kind: None, api_version: None, name: group.name.to_string(), versions, preferred_version })
}

/// `/apis`: every non-core group in the table's order.
pub fn api_group_list(table: &RoutingTable) -> ApiGroupList {
    let groups = table.groups().iter().filter(|g| !g.name.is_empty()).filter_map(api_group).collect();
    ApiGroupList { kind: "APIGroupList", api_version: "v1", groups }
}

/// kube-aggregator's own group, which it always lists first: with a delegate (kube-apiserver)
/// behind the proxy, `apiregistration.k8s.io/v1` is served there and listed here.
pub const AGGREGATOR_GROUP: &str = "apiregistration.k8s.io";
/// kube-aggregator ranks its own group one above the highest valid groupPriorityMinimum.
pub const AGGREGATOR_GROUP_PRIORITY: i32 = 20001;

/// `list` with `apiregistration.k8s.io/v1` first, unless an APIService already lists it.
pub fn with_aggregator_group(mut list: ApiGroupList) -> ApiGroupList {
    if !list.groups.iter().any(|g| g.name == AGGREGATOR_GROUP) {
        let v1 = GroupVersionForDiscovery { group_version: format!("{AGGREGATOR_GROUP}/v1"), version: "v1".into() };
        list.groups.insert(
            0,
            ApiGroup {
                kind: None,
                api_version: None,
                name: AGGREGATOR_GROUP.into(),
                versions: vec![v1.clone()],
                preferred_version: v1,
            },
        );
    }
    list
}

/// `/apis/<group>`, or `None` when no APIService serves the group.
pub fn api_group_document(table: &RoutingTable, name: &str) -> Option<ApiGroup> {
    if name.is_empty() {
        return None;
    }
    let mut group = api_group(table.group(name)?)?;
    group.kind = Some("APIGroup");
    group.api_version = Some("v1");
    Some(group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::apiservice::ApiService;
    use crate::backend::Backends;
    use crate::routing::StaticResolver;

    fn local(name: &str, gpm: i32, vp: i32) -> ApiService {
        crate::apiservice::testing::apiservice(name, gpm, vp, None)
    }

    #[test]
    fn group_list_skips_core_and_prefers_first_version() {
        let table = RoutingTable::build(
            &[local("v1.", 18000, 1), local("v1.b.io", 10, 5), local("v2.b.io", 10, 15), local("v1.a.io", 20, 1)]
                .map(Arc::new),
            &StaticResolver::default(),
            &Backends::default(),
        );
        let json = serde_json::to_value(api_group_list(&table)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": "a.io", "versions": [{"groupVersion": "a.io/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": "a.io/v1", "version": "v1"}},
                {"name": "b.io", "versions": [{"groupVersion": "b.io/v2", "version": "v2"},
                                              {"groupVersion": "b.io/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": "b.io/v2", "version": "v2"}}]})
        );
        let group = serde_json::to_value(api_group_document(&table, "b.io").unwrap()).unwrap();
        assert_eq!(group["kind"], "APIGroup");
        assert!(api_group_document(&table, "").is_none());
        assert!(api_group_document(&table, "c.io").is_none());
    }
}

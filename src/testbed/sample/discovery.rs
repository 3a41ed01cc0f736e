//! Discovery documents for the groups the sample server serves, shaped as k8s.io/apiserver
//! serves them: `APIResourceList` at `/apis/<group>/<version>`, `APIGroup` at `/apis/<group>`,
//! `APIGroupList` at `/apis`, and the aggregated `APIGroupDiscoveryList` (apidiscovery.k8s.io/v2)
//! at `/apis` when the client asks for it in `Accept`. Everything is derived from one static
//! description, [`SERVED_GROUPS`], so the documents cannot disagree with each other.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, GroupVersionForDiscovery, ListMeta, ObjectMeta,
};
use serde::Serialize;

pub const GROUP_METRICS: &str = "metrics.k8s.io";
pub const VERSION_METRICS: &str = "v1beta1";
pub const METRICS_GROUP_VERSION: &str = "metrics.k8s.io/v1beta1";
pub const GROUP_ECHO: &str = "echo.example.com";
pub const VERSION_ECHO: &str = "v1";
pub const ECHO_GROUP_VERSION: &str = "echo.example.com/v1";

/// The media type of the aggregated discovery document, in `Accept` and `Content-Type`; `Accept`
/// is negotiated by the proxy's own [`crate::discovery::aggregated::negotiate`].
pub use crate::discovery::aggregated::CONTENT_TYPE_AGGREGATED_V2 as AGGREGATED_DISCOVERY_CONTENT_TYPE;

/// One resource of a served group version.
#[derive(Debug, Clone, Copy)]
pub struct ServedResource {
    pub name: &'static str,
    pub singular_name: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub verbs: &'static [&'static str],
}

/// A group with its single served version.
#[derive(Debug, Clone, Copy)]
pub struct ServedGroup {
    pub group: &'static str,
    pub version: &'static str,
    pub resources: &'static [ServedResource],
}

impl ServedGroup {
    pub fn group_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }
}

/// What this server serves, in the order it registers the groups.
pub const SERVED_GROUPS: &[ServedGroup] = &[
    ServedGroup {
        group: GROUP_METRICS,
        version: VERSION_METRICS,
        resources: &[
            ServedResource {
                name: "nodes",
                singular_name: "node",
                kind: "NodeMetrics",
                namespaced: false,
                verbs: &["get", "list"],
            },
            ServedResource {
                name: "pods",
                singular_name: "pod",
                kind: "PodMetrics",
                namespaced: true,
                verbs: &["get", "list"],
            },
        ],
    },
    ServedGroup {
        group: GROUP_ECHO,
        version: VERSION_ECHO,
        resources: &[ServedResource {
            name: "echoes",
            singular_name: "echo",
            kind: "Echo",
            namespaced: true,
            verbs: &["get", "list", "watch"],
        }],
    },
];

pub fn served_group(group: &str) -> Option<&'static ServedGroup> {
    SERVED_GROUPS.iter().find(|g| g.group == group)
}

fn group_version_for_discovery(group: &ServedGroup) -> GroupVersionForDiscovery {
    GroupVersionForDiscovery { group_version: group.group_version(), version: group.version.to_owned() }
}

/// `/apis/<group>/<version>`.
pub fn api_resource_list(group: &ServedGroup) -> APIResourceList {
    APIResourceList {
        group_version: group.group_version(),
        resources: group
            .resources
            .iter()
            .map(|r| APIResource {
                name: r.name.to_owned(),
                singular_name: r.singular_name.to_owned(),
                namespaced: r.namespaced,
                kind: r.kind.to_owned(),
                verbs: r.verbs.iter().map(|v| (*v).to_owned()).collect(),
                ..APIResource::default()
            })
            .collect(),
    }
}

/// `/apis/<group>`.
pub fn api_group(group: &ServedGroup) -> APIGroup {
    APIGroup {
        name: group.group.to_owned(),
        versions: vec![group_version_for_discovery(group)],
        preferred_version: Some(group_version_for_discovery(group)),
        server_address_by_client_cidrs: None,
    }
}

/// `/apis`.
pub fn api_group_list() -> APIGroupList {
    APIGroupList { groups: SERVED_GROUPS.iter().map(api_group).collect() }
}

/// `apidiscovery.k8s.io/v2` APIGroupDiscoveryList; k8s-openapi has no type for it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct APIGroupDiscoveryList {
    pub kind: &'static str,
    pub api_version: &'static str,
    pub metadata: ListMeta,
    pub items: Vec<APIGroupDiscovery>,
}

#[derive(Debug, Clone, Serialize)]
pub struct APIGroupDiscovery {
    pub metadata: ObjectMeta,
    pub versions: Vec<APIVersionDiscovery>,
}

#[derive(Debug, Clone, Serialize)]
pub struct APIVersionDiscovery {
    pub version: &'static str,
    pub resources: Vec<APIResourceDiscovery>,
    pub freshness: &'static str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct APIResourceDiscovery {
    pub resource: &'static str,
    pub response_kind: GroupVersionKind,
    pub scope: &'static str,
    pub singular_resource: &'static str,
    pub verbs: &'static [&'static str],
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupVersionKind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
}

/// The aggregated discovery document for every served group.
pub fn aggregated_discovery() -> APIGroupDiscoveryList {
    let items = SERVED_GROUPS
        .iter()
        .map(|g| APIGroupDiscovery {
            metadata: ObjectMeta { name: Some(g.group.to_owned()), ..ObjectMeta::default() },
            versions: vec![APIVersionDiscovery {
                version: g.version,
                resources: g
                    .resources
                    .iter()
                    .map(|r| APIResourceDiscovery {
                        resource: r.name,
                        response_kind: GroupVersionKind { group: g.group, version: g.version, kind: r.kind },
                        scope: if r.namespaced { "Namespaced" } else { "Cluster" },
                        singular_resource: r.singular_name,
                        verbs: r.verbs,
                    })
                    .collect(),
                freshness: "Current",
            }],
        })
        .collect();
    APIGroupDiscoveryList {
        kind: "APIGroupDiscoveryList",
        api_version: "apidiscovery.k8s.io/v2",
        metadata: ListMeta::default(),
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn resource_list_is_shaped_as_kube_serves_it() {
        let json = serde_json::to_value(api_resource_list(served_group(GROUP_METRICS).unwrap())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "metrics.k8s.io/v1beta1",
                "resources": [
                    {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "NodeMetrics", "verbs": ["get", "list"]},
                    {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "PodMetrics", "verbs": ["get", "list"]},
                ],
            })
        );
    }

    #[test]
    fn group_list_names_every_group_with_its_preferred_version() {
        let json = serde_json::to_value(api_group_list()).unwrap();
        assert_eq!(json["kind"], "APIGroupList");
        assert_eq!(json["groups"][0]["name"], "metrics.k8s.io");
        assert_eq!(
            json["groups"][1]["preferredVersion"],
            serde_json::json!({"groupVersion": "echo.example.com/v1", "version": "v1"})
        );
    }

    #[test]
    fn aggregated_document_carries_scope_and_response_kind() {
        let json = serde_json::to_value(aggregated_discovery()).unwrap();
        assert_eq!(json["apiVersion"], "apidiscovery.k8s.io/v2");
        assert_eq!(json["items"][0]["metadata"]["name"], "metrics.k8s.io");
        let nodes = &json["items"][0]["versions"][0]["resources"][0];
        assert_eq!(nodes["scope"], "Cluster");
        assert_eq!(
            nodes["responseKind"],
            serde_json::json!({"group": "metrics.k8s.io", "version": "v1beta1", "kind": "NodeMetrics"})
        );
        assert_eq!(json["items"][1]["versions"][0]["freshness"], "Current");
    }

    #[test]
    fn aggregated_discovery_is_chosen_only_when_accept_asks_for_it() {
        let accept = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::ACCEPT, HeaderValue::from_str(v).unwrap());
            crate::discovery::aggregated::negotiate(&h) == crate::discovery::aggregated::Negotiated::AggregatedV2
        };
        assert!(accept(AGGREGATED_DISCOVERY_CONTENT_TYPE));
        assert!(accept("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"));
        assert!(accept("application/json; as=APIGroupDiscoveryList; v=v2; g=apidiscovery.k8s.io"));
        assert!(!accept("application/json"));
        assert!(!accept("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"));
        assert!(!accept("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList;q=0"));
        assert!(!accept("application/vnd.kubernetes.protobuf;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"));
    }
}

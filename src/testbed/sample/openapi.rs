//! OpenAPI documents for the sample server's types, served as a k8s.io/apiserver server serves
//! them: Swagger 2.0 at `/openapi/v2`, the v3 index at `/openapi/v3` and one v3 document per
//! group-version at `/openapi/v3/apis/<group>/<version>?hash=<hash>`, each with an `ETag`.
//!
//! They exist so `kubectl explain nodes.metrics.k8s.io` and `kubectl explain echoes` work
//! through the proxy, and so the proxy's OpenAPI aggregation has a real backend to merge. The
//! schemas describe what [`super::node_metrics`] and [`super::echo`] write; both OpenAPI
//! versions are generated from the one description below, so they cannot disagree.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde_json::{json, Map, Value};

use super::discovery::{GROUP_ECHO, GROUP_METRICS, VERSION_ECHO, VERSION_METRICS};
use crate::discovery::published::Published;

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";
const LIST_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta";
const TIME: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Time";
const DURATION: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Duration";
const QUANTITY: &str = "io.k8s.apimachinery.pkg.api.resource.Quantity";
const METRICS: &str = "io.k8s.metrics.pkg.apis.metrics.v1beta1";
const ECHO: &str = "com.example.echo.v1";

/// A document ready to serve, with the upper-case hex SHA-512 that is its `ETag` and
/// `?hash=`: the proxy's own [`Published`].
fn document(value: &Value) -> Published {
    Published::new("application/json", serde_json::to_vec(value).unwrap_or_default())
}

/// Every OpenAPI document the sample server serves.
#[derive(Debug)]
pub struct SampleOpenApi {
    pub v2: Published,
    pub v3_root: Published,
    /// `apis/<group>/<version>` -> document.
    pub v3: BTreeMap<String, Published>,
}

/// Built once, on first use.
pub static DOCUMENTS: LazyLock<SampleOpenApi> = LazyLock::new(build);

/// How references are written: Swagger 2.0 puts a description next to `$ref`; OpenAPI 3.0
/// ignores siblings of `$ref`, so kube wraps the reference in `allOf`.
#[derive(Clone, Copy)]
enum Dialect {
    V2,
    V3,
}

impl Dialect {
    fn reference(self, name: &str, description: &str) -> Value {
        match self {
            Self::V2 => json!({"$ref": format!("#/definitions/{name}"), "description": description}),
            Self::V3 => {
                json!({"allOf": [{"$ref": format!("#/components/schemas/{name}")}], "description": description})
            }
        }
    }

    fn bare_reference(self, name: &str) -> Value {
        match self {
            Self::V2 => json!({"$ref": format!("#/definitions/{name}")}),
            Self::V3 => json!({"$ref": format!("#/components/schemas/{name}")}),
        }
    }
}

fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!([{"group": group, "version": version, "kind": kind}])
}

fn string(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

fn type_meta(properties: &mut Map<String, Value>) {
    properties.insert(
        "apiVersion".into(),
        string("APIVersion defines the versioned schema of this representation of an object."),
    );
    properties
        .insert("kind".into(), string("Kind is a string value representing the REST resource this object represents."));
}

/// The apimachinery types the sample's objects refer to (the subset of fields they use).
fn meta_schemas(d: Dialect) -> Map<String, Value> {
    let mut schemas = Map::new();
    schemas.insert(
        OBJECT_META.into(),
        json!({
            "description": "ObjectMeta is metadata that all persisted resources must have.",
            "type": "object",
            "properties": {
                "name": string("Name must be unique within a namespace."),
                "namespace": string("Namespace defines the space within which each name must be unique."),
                "uid": string("UID is the unique in time and space value for this object."),
                "resourceVersion": string("An opaque value that represents the internal version of this object."),
                "creationTimestamp": d.reference(TIME, "CreationTimestamp is a timestamp representing the server time when this object was created."),
                "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""},
                           "description": "Map of string keys and values that can be used to organize and categorize objects."},
                "annotations": {"type": "object", "additionalProperties": {"type": "string", "default": ""},
                                "description": "Annotations is an unstructured key value map stored with a resource."},
            },
        }),
    );
    schemas.insert(
        LIST_META.into(),
        json!({
            "description": "ListMeta describes metadata that synthetic resources must have.",
            "type": "object",
            "properties": {
                "resourceVersion": string("String that identifies the server's internal version of this object."),
                "continue": string("continue may be set if the user set a limit on the number of items returned."),
            },
        }),
    );
    schemas.insert(
        TIME.into(),
        json!({"description": "Time is a wrapper around time.Time which supports correct marshaling to YAML and JSON.",
               "type": "string", "format": "date-time"}),
    );
    schemas.insert(
        DURATION.into(),
        json!({"description": "Duration is a wrapper around time.Duration.", "type": "string"}),
    );
    schemas.insert(
        QUANTITY.into(),
        json!({"description": "Quantity is a fixed-point representation of a number, such as 100m or 128Mi.", "type": "string"}),
    );
    schemas
}

fn metrics_schemas(d: Dialect) -> Map<String, Value> {
    let usage = json!({"type": "object", "additionalProperties": d.bare_reference(QUANTITY),
                       "description": "The memory and CPU usage."});
    let object = |kind: &str, description: &str, extra: Vec<(&str, Value)>, required: Vec<&str>| {
        let mut properties = Map::new();
        type_meta(&mut properties);
        properties.insert("metadata".into(), d.reference(OBJECT_META, "Standard object's metadata."));
        properties.insert(
            "timestamp".into(),
            d.reference(TIME, "The following fields define time interval from which metrics were collected."),
        );
        properties
            .insert("window".into(), d.reference(DURATION, "The length of the interval the usage was measured over."));
        for (k, v) in extra {
            properties.insert(k.into(), v);
        }
        json!({"description": description, "type": "object", "properties": properties, "required": required,
               "x-kubernetes-group-version-kind": gvk(GROUP_METRICS, VERSION_METRICS, kind)})
    };
    let list = |kind: &str, item: &str| {
        let mut properties = Map::new();
        type_meta(&mut properties);
        properties.insert("metadata".into(), d.reference(LIST_META, "Standard list metadata."));
        properties.insert(
            "items".into(),
            json!({"type": "array", "items": d.bare_reference(&format!("{METRICS}.{item}")), "description": "List of metrics."}),
        );
        json!({"description": format!("{kind} is a list of {item}."), "type": "object", "properties": properties,
               "required": ["items"], "x-kubernetes-group-version-kind": gvk(GROUP_METRICS, VERSION_METRICS, kind)})
    };
    let mut schemas = Map::new();
    schemas.insert(
        format!("{METRICS}.NodeMetrics"),
        object(
            "NodeMetrics",
            "NodeMetrics sets resource usage metrics of a node.",
            vec![("usage", usage.clone())],
            vec!["timestamp", "window", "usage"],
        ),
    );
    schemas.insert(format!("{METRICS}.NodeMetricsList"), list("NodeMetricsList", "NodeMetrics"));
    schemas.insert(
        format!("{METRICS}.PodMetrics"),
        object(
            "PodMetrics",
            "PodMetrics sets resource usage metrics of a pod.",
            vec![(
                "containers",
                json!({"type": "array", "items": d.bare_reference(&format!("{METRICS}.ContainerMetrics")),
                       "description": "Metrics for all containers are collected within the same time window."}),
            )],
            vec!["timestamp", "window", "containers"],
        ),
    );
    schemas.insert(format!("{METRICS}.PodMetricsList"), list("PodMetricsList", "PodMetrics"));
    schemas.insert(
        format!("{METRICS}.ContainerMetrics"),
        json!({"description": "ContainerMetrics sets resource usage metrics of a container.", "type": "object",
               "properties": {"name": string("Container name corresponding to the one from pod.spec.containers."),
                              "usage": usage},
               "required": ["name", "usage"]}),
    );
    schemas
}

fn echo_schemas(d: Dialect) -> Map<String, Value> {
    let mut properties = Map::new();
    type_meta(&mut properties);
    properties
        .insert("metadata".into(), d.reference(OBJECT_META, "metadata.name is the last segment of the request path."));
    for (name, description) in [
        ("method", "The HTTP method of the request, as the backend received it."),
        ("host", "The Host (HTTP/1.1) or :authority (HTTP/2) of the request."),
        ("path", "The request path."),
        ("query", "The raw query string."),
        ("httpVersion", "The HTTP version between the proxy and the backend."),
        ("body", "The request body, as text."),
    ] {
        properties.insert(name.into(), string(description));
    }
    properties.insert(
        "user".into(),
        d.reference(&format!("{ECHO}.EchoUser"), "The user the backend's requestheader authenticator produced."),
    );
    properties.insert(
        "headers".into(),
        json!({"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string", "default": ""}},
               "description": "Every request header, by lower-case name."}),
    );
    let mut schemas = Map::new();
    schemas.insert(
        format!("{ECHO}.Echo"),
        json!({"description": "Echo describes the request that produced it, as the backend received it.",
               "type": "object", "properties": properties,
               "x-kubernetes-group-version-kind": gvk(GROUP_ECHO, VERSION_ECHO, "Echo")}),
    );
    schemas.insert(
        format!("{ECHO}.EchoUser"),
        json!({"description": "EchoUser is an authenticated user.", "type": "object", "properties": {
            "name": string("The user name."),
            "uid": string("The user's UID."),
            "groups": {"type": "array", "items": {"type": "string", "default": ""}, "description": "The user's groups."},
            "extra": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string", "default": ""}},
                      "description": "Extra attributes of the user."},
        }}),
    );
    schemas
}

/// A read-only operation returning `schema`.
fn get_operation(d: Dialect, id: &str, schema: &str, kind: (&str, &str, &str), list: bool) -> Value {
    let (group, version, k) = kind;
    let response = match d {
        Dialect::V2 => json!({"description": "OK", "schema": d.bare_reference(schema)}),
        Dialect::V3 => {
            json!({"description": "OK", "content": {"application/json": {"schema": d.bare_reference(schema)}}})
        }
    };
    let mut op = json!({
        "operationId": id,
        "responses": {"200": response, "401": {"description": "Unauthorized"}},
        "x-kubernetes-action": if list { "list" } else { "get" },
        "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": k},
    });
    if let (Dialect::V2, Some(map)) = (d, op.as_object_mut()) {
        map.insert("produces".into(), json!(["application/json"]));
        map.insert("schemes".into(), json!(["https"]));
    }
    op
}

fn path_parameters(d: Dialect, names: &[&str]) -> Value {
    Value::Array(
        names
            .iter()
            .map(|n| match d {
                Dialect::V2 => json!({"name": n, "in": "path", "required": true, "type": "string", "uniqueItems": true}),
                Dialect::V3 => json!({"name": n, "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}}),
            })
            .collect(),
    )
}

fn metrics_paths(d: Dialect) -> Map<String, Value> {
    let base = format!("/apis/{GROUP_METRICS}/{VERSION_METRICS}");
    let gv = |kind| (GROUP_METRICS, VERSION_METRICS, kind);
    let node = format!("{METRICS}.NodeMetrics");
    let node_list = format!("{METRICS}.NodeMetricsList");
    let pod = format!("{METRICS}.PodMetrics");
    let pod_list = format!("{METRICS}.PodMetricsList");
    let mut paths = Map::new();
    paths.insert(
        format!("{base}/nodes"),
        json!({"get": get_operation(d, "listMetricsV1beta1NodeMetrics", &node_list, gv("NodeMetrics"), true)}),
    );
    paths.insert(
        format!("{base}/nodes/{{name}}"),
        json!({"get": get_operation(d, "readMetricsV1beta1NodeMetrics", &node, gv("NodeMetrics"), false),
               "parameters": path_parameters(d, &["name"])}),
    );
    paths.insert(format!("{base}/pods"), json!({"get": get_operation(d, "listMetricsV1beta1PodMetricsForAllNamespaces", &pod_list, gv("PodMetrics"), true)}));
    paths.insert(
        format!("{base}/namespaces/{{namespace}}/pods"),
        json!({"get": get_operation(d, "listMetricsV1beta1NamespacedPodMetrics", &pod_list, gv("PodMetrics"), true),
               "parameters": path_parameters(d, &["namespace"])}),
    );
    paths.insert(
        format!("{base}/namespaces/{{namespace}}/pods/{{name}}"),
        json!({"get": get_operation(d, "readMetricsV1beta1NamespacedPodMetrics", &pod, gv("PodMetrics"), false),
               "parameters": path_parameters(d, &["name", "namespace"])}),
    );
    paths
}

fn echo_paths(d: Dialect) -> Map<String, Value> {
    let base = format!("/apis/{GROUP_ECHO}/{VERSION_ECHO}");
    let echo = format!("{ECHO}.Echo");
    let gv = (GROUP_ECHO, VERSION_ECHO, "Echo");
    let mut paths = Map::new();
    paths.insert(
        format!("{base}/namespaces/{{namespace}}/echoes"),
        json!({"get": get_operation(d, "listEchoV1NamespacedEcho", &echo, gv, true),
               "parameters": path_parameters(d, &["namespace"])}),
    );
    paths.insert(
        format!("{base}/namespaces/{{namespace}}/echoes/{{name}}"),
        json!({"get": get_operation(d, "readEchoV1NamespacedEcho", &echo, gv, false),
               "parameters": path_parameters(d, &["name", "namespace"])}),
    );
    paths
}

fn info() -> Value {
    json!({"title": "sample-apiserver", "version": concat!("v", env!("CARGO_PKG_VERSION"))})
}

fn v3_document(paths: Map<String, Value>, schemas: Map<String, Value>) -> Value {
    json!({
        "openapi": "3.0.0",
        "info": info(),
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header"}},
        },
        "security": [{"BearerToken": []}],
    })
}

fn build() -> SampleOpenApi {
    let d = Dialect::V2;
    let mut paths = metrics_paths(d);
    paths.extend(echo_paths(d));
    let mut definitions = meta_schemas(d);
    definitions.extend(metrics_schemas(d));
    definitions.extend(echo_schemas(d));
    let v2 = json!({
        "swagger": "2.0",
        "info": info(),
        "paths": paths,
        "definitions": definitions,
        "securityDefinitions": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header"}},
        "security": [{"BearerToken": []}],
    });

    let d = Dialect::V3;
    let mut metrics = meta_schemas(d);
    metrics.extend(metrics_schemas(d));
    let mut echo = meta_schemas(d);
    echo.extend(echo_schemas(d));
    let v3 = BTreeMap::from([
        (format!("apis/{GROUP_METRICS}/{VERSION_METRICS}"), document(&v3_document(metrics_paths(d), metrics))),
        (format!("apis/{GROUP_ECHO}/{VERSION_ECHO}"), document(&v3_document(echo_paths(d), echo))),
    ]);
    let root = json!({"paths": v3.iter().map(|(path, doc)| {
        (path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", doc.hash())}))
    }).collect::<Map<_, _>>()});
    SampleOpenApi { v2: document(&v2), v3_root: document(&root), v3 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves_in_both_versions() {
        let docs = &*DOCUMENTS;
        let v2: Value = serde_json::from_slice(docs.v2.body()).unwrap();
        let mut all = Vec::new();
        refs(&v2, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let name = r.strip_prefix("#/definitions/").unwrap();
            assert!(v2["definitions"].get(name).is_some(), "v2: {r}");
        }
        for (path, doc) in &docs.v3 {
            let v3: Value = serde_json::from_slice(doc.body()).unwrap();
            let mut all = Vec::new();
            refs(&v3, &mut all);
            for r in all {
                let name = r.strip_prefix("#/components/schemas/").unwrap();
                assert!(v3["components"]["schemas"].get(name).is_some(), "{path}: {r}");
            }
        }
    }

    #[test]
    fn each_served_kind_is_described_with_its_group_version_kind() {
        let v2: Value = serde_json::from_slice(DOCUMENTS.v2.body()).unwrap();
        let node = &v2["definitions"]["io.k8s.metrics.pkg.apis.metrics.v1beta1.NodeMetrics"];
        assert_eq!(node["x-kubernetes-group-version-kind"][0]["kind"], "NodeMetrics");
        let echo: Value = serde_json::from_slice(DOCUMENTS.v3["apis/echo.example.com/v1"].body()).unwrap();
        assert_eq!(
            echo["components"]["schemas"]["com.example.echo.v1.Echo"]["x-kubernetes-group-version-kind"][0]["group"],
            "echo.example.com"
        );
        let root: Value = serde_json::from_slice(DOCUMENTS.v3_root.body()).unwrap();
        let url = root["paths"]["apis/metrics.k8s.io/v1beta1"]["serverRelativeURL"].as_str().unwrap();
        assert!(url.ends_with(&DOCUMENTS.v3["apis/metrics.k8s.io/v1beta1"].hash()));
        assert!(v2["paths"].as_object().unwrap().keys().all(|p| p.starts_with("/apis/")));
    }
}

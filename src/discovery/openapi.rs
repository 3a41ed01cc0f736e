//! OpenAPI aggregation: the merged Swagger 2.0 document at `/openapi/v2` and the OpenAPI v3
//! index at `/openapi/v3` with one document per group-version under it.
//!
//! Everything here is pure: the fetcher downloads the backends' documents in the background
//! and calls these functions only when an input changed, and the handlers serve the result
//! from memory ([`Published`]).
//!
//! v2, as kube-aggregator merges it:
//! - each remote spec is first filtered to the paths of the group-versions its APIServices
//!   register (`/apis/<group>/<version>/...`: a backend cannot add `/api/...`, root paths, its
//!   group's own path or a version nobody registered), dropping the definitions and
//!   parameters nothing kept refers to;
//! - specs are merged in priority order (the delegate first, then backends by group priority);
//!   on a path conflict the earlier spec keeps the path, and a spec whose paths all conflict
//!   adds nothing;
//! - an equal definition (or shared parameter) of the same name is shared, equality ignoring
//!   `x-kubernetes-group-version-kind` as kube-openapi's does, and the two GVK lists are merged
//!   (so `DeleteOptions` and `WatchEvent` stay one definition each); a different one is renamed
//!   `<name>_v2`, `_v3`, ... (reusing an earlier rename it equals, else a name free in both
//!   specs) and every `$ref` to it in the incoming spec is rewritten.
//!
//! v3: the index is the union of the sources' `paths`, each pointing at
//! `/openapi/v3/<path>?hash=<hash of the cached document>`; a backend's own document is served
//! from the cached copy, so explaining a backend's types keeps working while it is down.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use serde_json::{Map, Value};

use super::published::Published;

pub const CONTENT_TYPE_JSON: &str = "application/json";
/// kube-openapi writes the `/openapi/v3` index without a Content-Type, so Go's sniffing
/// labels it text: clients see this from kube-apiserver, and so from the proxy.
pub const CONTENT_TYPE_V3_INDEX: &str = "text/plain; charset=utf-8";
/// The OpenAPI v3 document of `apiregistration.k8s.io/v1`, which the proxy serves itself in
/// standalone mode (kubectl's client-side validation of an APIService needs it).
pub const APIREGISTRATION_V3_PATH: &str = "apis/apiregistration.k8s.io/v1";
pub const APIREGISTRATION_V3: &[u8] = include_bytes!("apiregistration-openapi-v3.json");
/// The path every v3 document is served under.
pub const V3_PREFIX: &str = "/openapi/v3/";

const DEFINITIONS_REF: &str = "#/definitions/";
/// kube's extension listing the kinds a definition is; not part of its equality.
const GVK_KEY: &str = "x-kubernetes-group-version-kind";

/// kube-openapi's `deepEqualDefinitionsModuloGVKs`.
fn equal_modulo_gvks(a: &Value, b: &Value) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let others = |m: &Map<String, Value>| m.len() - usize::from(m.contains_key(GVK_KEY));
            others(a) == others(b) && a.iter().filter(|(k, _)| *k != GVK_KEY).all(|(k, v)| b.get(k) == Some(v))
        }
        _ => a == b,
    }
}

/// Adds `incoming`'s GVKs that `existing` lacks, sorted by `group/version.kind` when any was
/// added, as kube-openapi's `mergedGVKs`.
fn merge_gvks(existing: &mut Value, incoming: &Value) {
    let Some(new) = incoming.get(GVK_KEY).and_then(Value::as_array) else { return };
    let Some(map) = existing.as_object_mut() else { return };
    let Some(Value::Array(list)) = map.get_mut(GVK_KEY) else {
        map.insert(GVK_KEY.to_owned(), Value::Array(new.clone()));
        return;
    };
    let key = |gvk: &Value| {
        let part = |k: &str| gvk.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        format!("{}/{}.{}", part("group"), part("version"), part("kind"))
    };
    let seen: BTreeSet<String> = list.iter().map(key).collect();
    let before = list.len();
    list.extend(new.iter().filter(|g| !seen.contains(&key(g))).cloned());
    if list.len() != before {
        list.sort_by_key(key);
    }
}
const PARAMETERS_REF: &str = "#/parameters/";

/// Every `$ref` string in `value`.
fn collect_refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

fn object_mut<'a>(spec: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    spec.get_mut(key).and_then(Value::as_object_mut)
}

fn object<'a>(spec: &'a Value, key: &str) -> Option<&'a Map<String, Value>> {
    spec.get(key).and_then(Value::as_object)
}

/// Keeps only the paths `keep` accepts, then only the definitions and shared parameters that
/// the kept paths reach (directly or through other definitions).
pub fn filter_paths(spec: &mut Value, keep: impl Fn(&str) -> bool) {
    if let Some(paths) = object_mut(spec, "paths") {
        paths.retain(|path, _| keep(path));
    }
    let mut definitions = BTreeSet::new();
    let mut parameters = BTreeSet::new();
    let mut pending: Vec<String> = Vec::new();
    let mut refs = Vec::new();
    if let Some(paths) = object(spec, "paths") {
        paths.values().for_each(|p| collect_refs(p, &mut refs));
    }
    pending.extend(refs.into_iter().map(str::to_owned));
    while let Some(r) = pending.pop() {
        let mut refs = Vec::new();
        if let Some(name) = r.strip_prefix(DEFINITIONS_REF) {
            if definitions.insert(name.to_owned()) {
                if let Some(def) = object(spec, "definitions").and_then(|d| d.get(name)) {
                    collect_refs(def, &mut refs);
                }
            }
        } else if let Some(name) = r.strip_prefix(PARAMETERS_REF) {
            if parameters.insert(name.to_owned()) {
                if let Some(param) = object(spec, "parameters").and_then(|p| p.get(name)) {
                    collect_refs(param, &mut refs);
                }
            }
        }
        pending.extend(refs.into_iter().map(str::to_owned));
    }
    if let Some(defs) = object_mut(spec, "definitions") {
        defs.retain(|name, _| definitions.contains(name));
    }
    if let Some(params) = object_mut(spec, "parameters") {
        params.retain(|name, _| parameters.contains(name));
    }
}

/// Rewrites every `$ref` of `value` found in `renames` (full `#/...` references).
fn rewrite_refs(value: &mut Value, renames: &HashMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Value::String(r) if k == "$ref" => {
                        if let Some(new) = renames.get(r.as_str()) {
                            *r = new.clone();
                        }
                    }
                    other => rewrite_refs(other, renames),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_refs(v, renames)),
        _ => {}
    }
}

/// Renames the entries of `source[section]` that clash with a different entry of the same
/// name in `dest[section]`, rewriting references in `source`; repeats until no clash is left,
/// since a rewrite can make a formerly equal entry differ.
fn rename_conflicts(dest: &Value, source: &mut Value, section: &str, ref_prefix: &str) {
    loop {
        let empty = Map::new();
        let dest_entries = object(dest, section).unwrap_or(&empty);
        let source_entries = object(source, section).unwrap_or(&empty);
        let mut assigned: BTreeSet<String> = BTreeSet::new();
        let mut renames: Vec<(String, String)> = Vec::new();
        for (name, value) in source_entries {
            if dest_entries.get(name).is_none_or(|existing| equal_modulo_gvks(existing, value)) {
                continue;
            }
            // kube-openapi's order: skip names the incoming spec has, reuse an earlier rename
            // this one equals, else take the first name free in the merged document.
            let new = (2..)
                .map(|n| format!("{name}_v{n}"))
                .find(|candidate| {
                    !source_entries.contains_key(candidate)
                        && !assigned.contains(candidate)
                        && dest_entries.get(candidate).is_none_or(|existing| equal_modulo_gvks(existing, value))
                })
                .unwrap_or_else(|| format!("{name}_renamed"));
            assigned.insert(new.clone());
            renames.push((name.clone(), new));
        }
        if renames.is_empty() {
            return;
        }
        if let Some(entries) = object_mut(source, section) {
            for (old, new) in &renames {
                if let Some(value) = entries.remove(old) {
                    entries.insert(new.clone(), value);
                }
            }
        }
        let refs: HashMap<String, String> = renames
            .into_iter()
            .map(|(old, new)| (format!("{ref_prefix}{old}"), format!("{ref_prefix}{new}")))
            .collect();
        rewrite_refs(source, &refs);
    }
}

/// Merges `source` into `dest` (see the module docs). Returns whether anything was added.
pub fn merge_into(dest: &mut Value, mut source: Value) -> bool {
    let existing: BTreeSet<String> = object(dest, "paths").map(|p| p.keys().cloned().collect()).unwrap_or_default();
    let conflicting = object(&source, "paths").is_some_and(|p| p.keys().any(|k| existing.contains(k)));
    if conflicting {
        filter_paths(&mut source, |p| !existing.contains(p));
    }
    if object(&source, "paths").is_none_or(Map::is_empty) {
        return false;
    }
    rename_conflicts(dest, &mut source, "definitions", DEFINITIONS_REF);
    rename_conflicts(dest, &mut source, "parameters", PARAMETERS_REF);
    let Some(dest_map) = dest.as_object_mut() else { return false };
    for section in ["paths", "definitions", "parameters"] {
        let Some(Value::Object(incoming)) = source.get_mut(section).map(Value::take) else { continue };
        let target = dest_map.entry(section).or_insert_with(|| Value::Object(Map::new()));
        if let Some(target) = target.as_object_mut() {
            for (k, v) in incoming {
                match target.get_mut(&k) {
                    // Equal modulo GVKs by now (or a path, which the first spec keeps).
                    Some(existing) if section == "definitions" => merge_gvks(existing, &v),
                    Some(_) => {}
                    None => {
                        target.insert(k, v);
                    }
                }
            }
        }
    }
    true
}

/// The top-level fields of the merged document when no spec provides them.
fn default_v2_base() -> Value {
    serde_json::json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": concat!("v", env!("CARGO_PKG_VERSION"))},
        "paths": {},
        "definitions": {},
    })
}

/// Merges Swagger 2.0 specs, highest priority first: `local` specs unfiltered (the delegate
/// owns every path it serves), then each `remote` spec filtered to the path prefixes given
/// with it (`/apis/<group>/<version>/` of each APIService it serves). The first spec gives the
/// top-level fields (`swagger`, `info`, `securityDefinitions`, ...).
pub fn merge_v2(
    local: impl IntoIterator<Item = Value>,
    remote: impl IntoIterator<Item = (Value, Vec<String>)>,
) -> Value {
    let specs: Vec<Value> = local
        .into_iter()
        .chain(remote.into_iter().map(|(mut spec, prefixes)| {
            filter_paths(&mut spec, |p| prefixes.iter().any(|prefix| p.starts_with(prefix.as_str())));
            spec
        }))
        .filter(Value::is_object)
        .collect();
    let mut merged = match specs.first() {
        Some(first) => {
            let mut base = first.clone();
            if let Some(map) = base.as_object_mut() {
                for section in ["paths", "definitions", "parameters"] {
                    map.insert(section.to_owned(), Value::Object(Map::new()));
                }
            }
            base
        }
        None => default_v2_base(),
    };
    for spec in specs {
        merge_into(&mut merged, spec);
    }
    if let Some(map) = merged.as_object_mut() {
        if map.get("parameters").and_then(Value::as_object).is_some_and(Map::is_empty) {
            map.remove("parameters");
        }
    }
    merged
}

/// `/openapi/v2` ready to serve.
pub fn publish_v2(merged: &Value) -> Published {
    Published::new(CONTENT_TYPE_JSON, serde_json::to_vec(merged).unwrap_or_else(|_| b"{}".to_vec()))
}

/// The `paths` of an OpenAPI v3 root document (`{"paths": {"apis/g/v": {"serverRelativeURL":
/// "..."}}}`), as `path -> serverRelativeURL`.
pub fn v3_root_paths(root: &Value) -> BTreeMap<String, String> {
    object(root, "paths")
        .map(|paths| {
            paths
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.get("serverRelativeURL")?.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The v3 index and every backend document it points at, consistent with each other.
#[derive(Debug, Clone)]
pub struct V3Documents {
    pub root: Published,
    /// `apis/<group>/<version>` -> the cached backend document.
    pub documents: HashMap<String, Published>,
}

impl Default for V3Documents {
    fn default() -> Self {
        build_v3(BTreeMap::new(), &BTreeMap::new())
    }
}

impl V3Documents {
    /// The cached document for a request path below `/openapi/v3/`.
    pub fn document(&self, path: &str) -> Option<&Published> {
        self.documents.get(path)
    }
}

/// Builds the index from the backends' cached documents (`path -> bytes`) and the delegate's
/// own index (`path -> serverRelativeURL`, served by the delegate). A backend's entry wins a
/// path both list, as remote sources win in discovery.
pub fn build_v3(remote: BTreeMap<String, Bytes>, delegate: &BTreeMap<String, String>) -> V3Documents {
    let mut paths: BTreeMap<String, String> = delegate.clone();
    let mut documents = HashMap::new();
    for (path, bytes) in remote {
        let published = Published::new(CONTENT_TYPE_JSON, bytes);
        paths.insert(path.clone(), format!("{V3_PREFIX}{path}?hash={}", published.hash()));
        documents.insert(path, published);
    }
    let root = serde_json::json!({
        "paths": paths.into_iter().map(|(k, url)| (k, serde_json::json!({"serverRelativeURL": url}))).collect::<Map<_, _>>()
    });
    V3Documents {
        root: Published::new(CONTENT_TYPE_V3_INDEX, serde_json::to_vec(&root).unwrap_or_else(|_| b"{}".to_vec())),
        documents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(paths: Value, definitions: Value) -> Value {
        json!({"swagger": "2.0", "info": {"title": "t", "version": "1"}, "paths": paths, "definitions": definitions})
    }

    /// A remote spec whose APIServices register `group_versions` (`a.io/v1`, ...).
    fn served(spec: Value, group_versions: &[&str]) -> (Value, Vec<String>) {
        (spec, group_versions.iter().map(|gv| format!("/apis/{gv}/")).collect())
    }

    fn get_ref(def: &str) -> Value {
        json!({"get": {"responses": {"200": {"schema": {"$ref": format!("#/definitions/{def}")}}}}})
    }

    #[test]
    fn remote_specs_are_filtered_to_their_group_versions_paths_and_what_they_reach() {
        let remote = spec(
            json!({"/apis/a.io/v1/things": get_ref("Thing"), "/api/v1/pods": get_ref("Pod"), "/version": get_ref("Info"),
                   "/apis/a.io/": get_ref("Info"), "/apis/a.io/v2/things": get_ref("Pod")}),
            json!({
                "Thing": {"properties": {"meta": {"$ref": "#/definitions/Meta"}}},
                "Meta": {"type": "object"},
                "Pod": {"type": "object"},
                "Info": {"type": "object"},
            }),
        );
        let merged = merge_v2([], [served(remote, &["a.io/v1"])]);
        assert_eq!(merged["paths"].as_object().unwrap().keys().collect::<Vec<_>>(), ["/apis/a.io/v1/things"]);
        assert_eq!(merged["definitions"].as_object().unwrap().keys().collect::<Vec<_>>(), ["Meta", "Thing"]);
        assert_eq!(merged["swagger"], "2.0");
    }

    #[test]
    fn the_first_spec_keeps_a_conflicting_path() {
        let first = spec(json!({"/apis/a.io/v1/x": get_ref("A")}), json!({"A": {"type": "object"}}));
        let second = spec(
            json!({"/apis/a.io/v1/x": get_ref("B"), "/apis/b.io/v1/y": get_ref("C")}),
            json!({"B": {"type": "string"}, "C": {"type": "integer"}}),
        );
        let merged = merge_v2([], [served(first, &["a.io/v1"]), served(second, &["a.io/v1", "b.io/v1"])]);
        assert_eq!(merged["paths"]["/apis/a.io/v1/x"], get_ref("A"));
        assert_eq!(merged["paths"]["/apis/b.io/v1/y"], get_ref("C"));
        // B was only reachable from the losing path.
        assert!(merged["definitions"].get("B").is_none());
    }

    #[test]
    fn a_spec_whose_paths_all_conflict_adds_nothing() {
        let first = spec(json!({"/apis/a.io/v1/x": get_ref("A")}), json!({"A": {"type": "object"}}));
        let second = spec(json!({"/apis/a.io/v1/x": get_ref("A")}), json!({"A": {"type": "string"}}));
        let mut merged = merge_v2([], [served(first.clone(), &["a.io/v1"])]);
        assert!(!merge_into(&mut merged, second));
        assert_eq!(merged["definitions"], json!({"A": {"type": "object"}}));
    }

    #[test]
    fn equal_definitions_are_shared_and_different_ones_renamed_with_refs_rewritten() {
        let meta = json!({"type": "object", "properties": {"name": {"type": "string"}}});
        let first = spec(
            json!({"/apis/a.io/v1/x": get_ref("Thing")}),
            json!({"Thing": {"properties": {"m": {"$ref": "#/definitions/Meta"}}}, "Meta": meta}),
        );
        let second = spec(
            json!({"/apis/b.io/v1/y": get_ref("Thing"), "/apis/b.io/v1/z": get_ref("Meta")}),
            json!({"Thing": {"properties": {"m": {"$ref": "#/definitions/Meta"}, "extra": {"type": "string"}}}, "Meta": meta}),
        );
        let third = spec(
            json!({"/apis/c.io/v1/w": get_ref("Thing")}),
            json!({"Thing": {"type": "integer"}, "Thing_v2": {"type": "boolean"}}),
        );
        let merged =
            merge_v2([], [served(first, &["a.io/v1"]), served(second, &["b.io/v1"]), served(third, &["c.io/v1"])]);
        let defs = merged["definitions"].as_object().unwrap();
        assert_eq!(defs.keys().collect::<Vec<_>>(), ["Meta", "Thing", "Thing_v2", "Thing_v3"]);
        assert_eq!(merged["paths"]["/apis/b.io/v1/y"], get_ref("Thing_v2"));
        // Meta was equal, so shared and not renamed.
        assert_eq!(merged["paths"]["/apis/b.io/v1/z"], get_ref("Meta"));
        assert_eq!(defs["Thing_v2"]["properties"]["m"]["$ref"], "#/definitions/Meta");
        // The third spec's Thing clashes with both Thing and its own Thing_v2's new name.
        assert_eq!(merged["paths"]["/apis/c.io/v1/w"], get_ref("Thing_v3"));
        assert_eq!(defs["Thing_v3"], json!({"type": "integer"}));
    }

    #[test]
    fn a_definition_made_different_by_a_rename_is_renamed_too() {
        // Both specs have an identical Wrapper pointing at Inner, but their Inner differ: once
        // the second Inner is renamed, its Wrapper no longer equals the first one.
        let first = spec(
            json!({"/apis/a.io/v1/x": get_ref("Wrapper")}),
            json!({"Wrapper": {"items": {"$ref": "#/definitions/Inner"}}, "Inner": {"type": "string"}}),
        );
        let second = spec(
            json!({"/apis/b.io/v1/y": get_ref("Wrapper")}),
            json!({"Wrapper": {"items": {"$ref": "#/definitions/Inner"}}, "Inner": {"type": "integer"}}),
        );
        let merged = merge_v2([], [served(first, &["a.io/v1"]), served(second, &["b.io/v1"])]);
        assert_eq!(merged["paths"]["/apis/b.io/v1/y"], get_ref("Wrapper_v2"));
        assert_eq!(merged["definitions"]["Wrapper_v2"]["items"]["$ref"], "#/definitions/Inner_v2");
        assert_eq!(merged["definitions"]["Wrapper"]["items"]["$ref"], "#/definitions/Inner");
    }

    #[test]
    fn definitions_equal_but_for_their_kinds_are_one_with_the_kinds_merged() {
        let gvk = |g: &str| json!({"group": g, "version": "v1", "kind": "DeleteOptions"});
        let delete_options = |g: &str| json!({"type": "object", "x-kubernetes-group-version-kind": [gvk(g)]});
        let first = spec(
            json!({"/apis/b.io/v1/x": get_ref("DeleteOptions")}),
            json!({"DeleteOptions": delete_options("b.io")}),
        );
        let second = spec(
            json!({"/apis/a.io/v1/y": get_ref("DeleteOptions")}),
            json!({"DeleteOptions": delete_options("a.io")}),
        );
        // Different but for the kinds, a third time: renamed once, then reused.
        let other = |g: &str| json!({"type": "string", "x-kubernetes-group-version-kind": [gvk(g)]});
        let third = spec(json!({"/apis/c.io/v1/z": get_ref("DeleteOptions")}), json!({"DeleteOptions": other("c.io")}));
        let fourth =
            spec(json!({"/apis/d.io/v1/w": get_ref("DeleteOptions")}), json!({"DeleteOptions": other("d.io")}));
        let merged = merge_v2(
            [],
            [
                served(first, &["b.io/v1"]),
                served(second, &["a.io/v1"]),
                served(third, &["c.io/v1"]),
                served(fourth, &["d.io/v1"]),
            ],
        );
        let defs = merged["definitions"].as_object().unwrap();
        assert_eq!(defs.keys().collect::<Vec<_>>(), ["DeleteOptions", "DeleteOptions_v2"]);
        assert_eq!(defs["DeleteOptions"]["x-kubernetes-group-version-kind"], json!([gvk("a.io"), gvk("b.io")]));
        assert_eq!(defs["DeleteOptions_v2"]["x-kubernetes-group-version-kind"], json!([gvk("c.io"), gvk("d.io")]));
        assert_eq!(merged["paths"]["/apis/d.io/v1/w"], get_ref("DeleteOptions_v2"));
    }

    #[test]
    fn local_specs_come_first_unfiltered() {
        let local = spec(json!({"/api/v1/pods": get_ref("Pod")}), json!({"Pod": {"type": "object"}}));
        let evil = spec(json!({"/api/v1/pods": get_ref("Evil")}), json!({"Evil": {}}));
        let merged = merge_v2([local], [served(evil, &["a.io/v1"])]);
        assert_eq!(merged["paths"]["/api/v1/pods"], get_ref("Pod"));
        assert!(merged["definitions"].get("Evil").is_none());
        assert_eq!(merge_v2([], [])["swagger"], "2.0");
    }

    #[test]
    fn v3_index_points_at_cached_documents_by_hash_and_keeps_delegate_paths() {
        let docs = build_v3(
            BTreeMap::from([("apis/a.io/v1".to_owned(), Bytes::from_static(b"{\"openapi\":\"3.0.0\"}"))]),
            &BTreeMap::from([
                ("api/v1".to_owned(), "/openapi/v3/api/v1?hash=ABC".to_owned()),
                ("apis/a.io/v1".to_owned(), "/openapi/v3/apis/a.io/v1?hash=OLD".to_owned()),
            ]),
        );
        let root: Value = serde_json::from_slice(docs.root.body()).unwrap();
        let doc = docs.document("apis/a.io/v1").unwrap();
        assert_eq!(
            root,
            json!({"paths": {
                "api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=ABC"},
                "apis/a.io/v1": {"serverRelativeURL": format!("/openapi/v3/apis/a.io/v1?hash={}", doc.hash())},
            }})
        );
        assert_eq!(v3_root_paths(&root)["api/v1"], "/openapi/v3/api/v1?hash=ABC");
        assert!(docs.document("api/v1").is_none());
    }
}

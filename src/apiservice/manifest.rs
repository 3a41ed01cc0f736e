//! Reading APIService manifests: YAML (one or many documents) or JSON, single objects or
//! `List`/`APIServiceList` wrappers. Other kinds are skipped so a directory may hold a whole
//! application's manifests.

use serde::Deserialize;

use super::ApiServiceObject;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}, document {document}: {reason}")]
    Parse { file: String, document: usize, reason: String },
}

/// Every APIService object in a manifest text; `file` names the source in errors.
pub fn parse_documents(text: &str, file: &str) -> Result<Vec<ApiServiceObject>, ManifestError> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let bad = |reason: String| ManifestError::Parse { file: file.to_owned(), document: index + 1, reason };
        let value = serde_yaml_ng::Value::deserialize(document).map_err(|e| bad(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        collect(value, &mut objects).map_err(bad)?;
    }
    Ok(objects)
}

fn collect(value: serde_yaml_ng::Value, out: &mut Vec<ApiServiceObject>) -> Result<(), String> {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
    match kind.as_str() {
        "APIService" => {
            let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default();
            if api_version != "apiregistration.k8s.io/v1" {
                return Err(format!(
                    "apiVersion: unsupported value {api_version:?}: expected \"apiregistration.k8s.io/v1\""
                ));
            }
            let name = value.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()).map(str::to_owned);
            let object = ApiServiceObject::deserialize(value).map_err(|e| match name {
                Some(n) => format!("APIService {n:?}: {e}"),
                None => e.to_string(),
            })?;
            out.push(object);
        }
        "List" | "APIServiceList" => {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned().unwrap_or_default();
            for item in items {
                collect(item, out)?;
            }
        }
        "" => return Err("kind: Required value".into()),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_stream_json_and_lists_are_all_read() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: ignored}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1.a.io}
spec: {group: a.io, version: v1, groupPriorityMinimum: 1, versionPriority: 1}
---
{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": "v1.b.io"},
   "spec": {"group": "b.io", "version": "v1", "groupPriorityMinimum": 1, "versionPriority": 1,
            "caBundle": "Zm9v", "service": {"name": "b", "namespace": "ns", "port": 8443}}}]}
---
"#;
        let objects = parse_documents(text, "all.yaml").unwrap();
        let names: Vec<_> = objects.iter().map(|o| o.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["v1.a.io", "v1.b.io"]);
        assert_eq!(objects[1].spec.as_ref().unwrap().ca_bundle.as_ref().unwrap().0, b"foo");
    }

    #[test]
    fn a_broken_document_names_file_and_document() {
        let text = "kind: APIService\napiVersion: apiregistration.k8s.io/v1\nmetadata: {name: x}\nspec: {groupPriorityMinimum: many}\n";
        let err = parse_documents(text, "bad.yaml").unwrap_err().to_string();
        assert!(err.starts_with("bad.yaml, document 1: APIService \"x\": "), "{err}");
        let err = parse_documents("a: [", "broken.yaml").unwrap_err().to_string();
        assert!(err.starts_with("broken.yaml, document 1: "), "{err}");
    }
}

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

/// What [`yaml_shape`] found: how deep collections nest and how many aliases there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct YamlShape {
    pub depth: usize,
    pub aliases: usize,
}

/// An upper bound on how deeply a YAML (or JSON) text nests its collections, and its count of
/// alias nodes, in one pass and without parsing: block indentation levels, compact `- `
/// sequence entries and flow `[`/`{` brackets outside quoted scalars and comments, block
/// scalar (`|`, `>`) content skipped. It lets a reader refuse a pathological file (thousands
/// of levels, or aliases that expand exponentially) before handing it to the YAML parser,
/// whose cost on such input is what an attacker with write access to the directory controls.
pub fn yaml_shape(text: &str) -> YamlShape {
    let mut shape = YamlShape::default();
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // Indentation of the line that opened a block scalar, while inside one.
    let mut block_scalar: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let content = &line[indent..];
        if let Some(parent) = block_scalar {
            if content.trim().is_empty() || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if flow == 0 {
            if content.starts_with("---") || content.starts_with("...") {
                indents.clear();
            }
            while indents.last().is_some_and(|&top| top > indent) {
                indents.pop();
            }
            if indents.last() != Some(&indent) {
                indents.push(indent);
            }
        }
        let mut depth = indents.len() + flow;
        let mut rest = content;
        // Compact nesting: `- - - x` and `- key: value` open a level per indicator.
        while let Some(after) = rest.strip_prefix("- ").or_else(|| (rest == "-").then_some("")) {
            depth += 1;
            rest = after.trim_start_matches(' ');
        }
        shape.depth = shape.depth.max(depth);
        let (line_max, last_token) = scan_line(rest, &mut flow, &mut shape.aliases, indents.len());
        shape.depth = shape.depth.max(line_max);
        if flow == 0 && is_block_scalar_indicator(last_token) {
            block_scalar = Some(indent);
        }
    }
    shape
}

/// Scans one line's content for flow brackets, quotes, comments and aliases. Returns the
/// deepest flow nesting seen (plus `base`) and the last token before a comment.
fn scan_line<'a>(line: &'a str, flow: &mut usize, aliases: &mut usize, base: usize) -> (usize, &'a str) {
    let bytes = line.as_bytes();
    let mut max = 0;
    let mut quote: Option<u8> = None;
    let mut node_start = true;
    let mut end = bytes.len();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == b'\\' && q == b'"' {
                    i += 1;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'\'' | b'"' if node_start => quote = Some(b),
                b'#' if i == 0 || bytes[i - 1] == b' ' => {
                    end = i;
                    break;
                }
                b'[' | b'{' => {
                    *flow += 1;
                    max = max.max(base + *flow);
                }
                b']' | b'}' => *flow = flow.saturating_sub(1),
                b'*' if node_start => *aliases += 1,
                _ => {}
            },
        }
        // A node starts after an indicator (and any spaces), never in the middle of a scalar.
        let next_is_space = bytes.get(i + 1).is_none_or(|n| *n == b' ');
        node_start = quote.is_none()
            && match b {
                b' ' => node_start,
                b'[' | b'{' | b',' => true,
                b':' | b'-' | b'?' => next_is_space,
                _ => false,
            };
        i += 1;
    }
    (max, line[..end].trim_end().rsplit(' ').next().unwrap_or_default())
}

/// `|`, `>`, with optional chomping and indentation indicators (`|-`, `>+2`, ...).
fn is_block_scalar_indicator(token: &str) -> bool {
    let mut chars = token.chars();
    matches!(chars.next(), Some('|' | '>')) && chars.all(|c| matches!(c, '-' | '+' | '1'..='9'))
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
    fn yaml_shape_bounds_nesting_and_counts_aliases() {
        let manifest = "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: v1.a.io\n\
                        spec:\n  group: a.io\n  service:\n    name: a\n    namespace: ns\n";
        assert_eq!(yaml_shape(manifest), YamlShape { depth: 3, aliases: 0 });
        let json = r#"{"kind": "List", "items": [{"spec": {"service": {"name": "a"}}}]}"#;
        // A bound, not an exact count: a flow collection on a line counts that line's level too.
        assert_eq!(yaml_shape(json).depth, 6);
        assert_eq!(yaml_shape(&format!("{}{}", "[".repeat(5000), "]".repeat(5000))).depth, 5001);
        let block: String = (0..300).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        assert_eq!(yaml_shape(&block).depth, 300);
        assert_eq!(yaml_shape("a: - - - - x\n").depth, 1);
        assert_eq!(yaml_shape("- - - - x\n").depth, 5);
        // Brackets in quotes, comments and block scalars do not nest.
        let quiet = "a: \"[[[[\"\nb: '{{{{'\nc: x # [[[[\nd: |\n  [[[[\n    {{{{\ne: 1\n";
        assert_eq!(yaml_shape(quiet).depth, 1);
        let aliases = "a: &x [1, 2]\nb: *x\nc: [*x, *x]\nd: 2 * 3\ne: \"*x\"\n";
        assert_eq!(yaml_shape(aliases).aliases, 3);
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

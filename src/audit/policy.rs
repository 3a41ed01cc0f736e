//! kube's audit policy (`audit.k8s.io/v1` `Policy`): which level, and which stages, each
//! request is recorded at.
//!
//! Read once, validated with kube-apiserver's messages, and evaluated per request the way
//! `k8s.io/apiserver/pkg/audit/policy/checker.go` does: rules in order, the first that matches
//! wins, an empty list matches everything, and no match means `None`.

use std::path::Path;

use serde::Deserialize;

use super::event::{Level, Stage};

/// The most a policy file may hold: policies are a few hundred lines.
pub const MAX_POLICY_FILE_BYTES: u64 = 1 << 20;

/// A loaded, validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    /// The policy's own `omitStages`, for requests no rule matches.
    omit_stages: Vec<Stage>,
    omit_managed_fields: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    level: Level,
    users: Vec<String>,
    user_groups: Vec<String>,
    verbs: Vec<String>,
    resources: Vec<GroupResources>,
    namespaces: Vec<String>,
    non_resource_urls: Vec<String>,
    /// The rule's and the policy's `omitStages` together, as kube unions them at load.
    omit_stages: Vec<Stage>,
    omit_managed_fields: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GroupResources {
    #[serde(default)]
    group: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyFile {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    rules: Vec<RuleFile>,
    #[serde(default)]
    omit_stages: Vec<Stage>,
    #[serde(default)]
    omit_managed_fields: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    level: String,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    user_groups: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    resources: Vec<GroupResources>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
    #[serde(default)]
    omit_stages: Vec<Stage>,
    omit_managed_fields: Option<bool>,
}

/// What a request is, for the policy.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// `None` for a request that failed authentication: rules naming users or groups do not
    /// match it.
    pub user: Option<(&'a str, &'a [String])>,
    /// kube's RequestInfo verb (`get`, `list`, `watch`, ...; the lower-cased method of a
    /// non-resource request).
    pub verb: &'a str,
    pub resource_request: bool,
    pub group: &'a str,
    pub namespace: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub name: &'a str,
    /// The path without the query.
    pub path: &'a str,
}

/// The policy's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub level: Level,
    pub omit_stages: Vec<Stage>,
    pub omit_managed_fields: bool,
}

impl Decision {
    pub fn records(&self, stage: Stage) -> bool {
        self.level != Level::None && !self.omit_stages.contains(&stage)
    }
}

impl Policy {
    /// Reads and validates a policy file; every problem is named by its rule and field.
    pub fn load(path: &Path) -> Result<Self, String> {
        let size = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
        if size > MAX_POLICY_FILE_BYTES {
            return Err(format!(
                "{}: {size} bytes, more than the {MAX_POLICY_FILE_BYTES} a policy may have",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a policy in YAML or JSON.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = serde_yaml_ng::from_str(text).map_err(|e| format!("failed decoding: {e}"))?;
        match (file.api_version.as_deref(), file.kind.as_deref()) {
            (Some("audit.k8s.io/v1"), Some("Policy")) => {}
            (Some(v), Some("Policy")) => return Err(format!("unknown group version field {v:?} in policy")),
            _ => return Err("apiVersion audit.k8s.io/v1 and kind Policy are required".into()),
        }
        if file.rules.is_empty() {
            return Err("loaded illegal policy with 0 rules".into());
        }
        let mut errors = Vec::new();
        let rules = file
            .rules
            .into_iter()
            .enumerate()
            .filter_map(|(i, rule)| match validate_rule(rule, &file.omit_stages) {
                Ok(rule) => Some(rule),
                Err(e) => {
                    errors.extend(e.into_iter().map(|e| format!("rules[{i}].{e}")));
                    None
                }
            })
            .collect();
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        Ok(Self { rules, omit_stages: file.omit_stages, omit_managed_fields: file.omit_managed_fields })
    }

    /// The level and stages for a request: the first rule that matches, else `None`.
    pub fn evaluate(&self, request: &Attributes<'_>) -> Decision {
        match self.rules.iter().find(|r| r.matches(request)) {
            Some(rule) => Decision {
                level: rule.level,
                omit_stages: rule.omit_stages.clone(),
                omit_managed_fields: rule.omit_managed_fields.unwrap_or(self.omit_managed_fields),
            },
            None => Decision {
                level: Level::None,
                omit_stages: self.omit_stages.clone(),
                omit_managed_fields: self.omit_managed_fields,
            },
        }
    }
}

fn validate_rule(rule: RuleFile, policy_omit_stages: &[Stage]) -> Result<Rule, Vec<String>> {
    let mut errors = Vec::new();
    let level = match rule.level.as_str() {
        "" => {
            errors.push("level: Required value".to_owned());
            Level::None
        }
        other => Level::parse(other).unwrap_or_else(|| {
            errors.push(format!(
                "level: Unsupported value: {other:?}: supported values: \"None\", \"Metadata\", \"Request\", \"RequestResponse\""
            ));
            Level::None
        }),
    };
    if !rule.non_resource_urls.is_empty() && (!rule.resources.is_empty() || !rule.namespaces.is_empty()) {
        errors.push(
            "nonResourceURLs: Invalid value: rules cannot apply to both regular resources and non-resource URLs".into(),
        );
    }
    for url in &rule.non_resource_urls {
        if url == "*" {
            continue;
        }
        if !url.starts_with('/') {
            errors.push(format!(
                "nonResourceURLs: Invalid value: {url:?}: non-resource URL rules must begin with a '/' character"
            ));
        }
        if url.trim_end_matches('*').contains('*') {
            errors.push(format!(
                "nonResourceURLs: Invalid value: {url:?}: non-resource URL wildcards '*' must be the final character of the rule"
            ));
        }
    }
    for (i, gr) in rule.resources.iter().enumerate() {
        if !gr.group.is_empty() && !is_dns_subdomain(&gr.group) {
            errors.push(format!("resources[{i}].group: Invalid value: {:?}: must be a DNS subdomain", gr.group));
        }
        if !gr.resource_names.is_empty() && gr.resources.is_empty() {
            errors.push(format!(
                "resources[{i}].resourceNames: Invalid value: using resourceNames requires at least one resource"
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut omit_stages = rule.omit_stages;
    for stage in policy_omit_stages {
        if !omit_stages.contains(stage) {
            omit_stages.push(*stage);
        }
    }
    Ok(Rule {
        level,
        users: rule.users,
        user_groups: rule.user_groups,
        verbs: rule.verbs,
        resources: rule.resources,
        namespaces: rule.namespaces,
        non_resource_urls: rule.non_resource_urls,
        omit_stages,
        omit_managed_fields: rule.omit_managed_fields,
    })
}

/// A lower-case RFC 1123 subdomain, as kube validates API groups.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl Rule {
    fn matches(&self, r: &Attributes<'_>) -> bool {
        if !self.users.is_empty() && !r.user.is_some_and(|(name, _)| self.users.iter().any(|u| u == name)) {
            return false;
        }
        if !self.user_groups.is_empty()
            && !r.user.is_some_and(|(_, groups)| groups.iter().any(|g| self.user_groups.contains(g)))
        {
            return false;
        }
        if !self.verbs.is_empty() && !self.verbs.iter().any(|v| v == r.verb) {
            return false;
        }
        if !self.namespaces.is_empty() || !self.resources.is_empty() {
            return self.matches_resource(r);
        }
        if !self.non_resource_urls.is_empty() {
            return self.matches_non_resource(r);
        }
        true
    }

    fn matches_resource(&self, r: &Attributes<'_>) -> bool {
        if !r.resource_request {
            return false;
        }
        if !self.namespaces.is_empty() && !self.namespaces.iter().any(|n| n == r.namespace) {
            return false;
        }
        if self.resources.is_empty() {
            return true;
        }
        self.resources.iter().any(|gr| {
            gr.group == r.group
                && (gr.resources.is_empty()
                    || gr.resources.iter().any(|res| {
                        resource_matches(res, r.resource, r.subresource)
                            && (gr.resource_names.is_empty() || gr.resource_names.iter().any(|n| n == r.name))
                    }))
        })
    }

    fn matches_non_resource(&self, r: &Attributes<'_>) -> bool {
        if r.resource_request {
            return false;
        }
        self.non_resource_urls.iter().any(|spec| match spec.strip_suffix('*') {
            _ if spec == "*" => true,
            Some(prefix) => r.path.starts_with(prefix),
            None => spec == r.path,
        })
    }
}

/// `*`, `resource`, `resource/subresource`, `*/subresource` or `resource/*` (which also
/// matches the resource itself).
fn resource_matches(spec: &str, resource: &str, subresource: &str) -> bool {
    if spec == "*" {
        return true;
    }
    match spec.split_once('/') {
        None => subresource.is_empty() && spec == resource,
        Some(("*", sub)) => sub == subresource,
        Some((res, "*")) => res == resource,
        Some((res, sub)) => res == resource && sub == subresource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: None
  users: ["system:kube-proxy"]
- level: Metadata
  resources:
  - group: ""
    resources: ["secrets", "configmaps"]
- level: RequestResponse
  resources:
  - group: echo.example.com
    resources: ["*"]
- level: Request
  verbs: ["create"]
  resources:
  - group: apps
    resources: ["deployments/scale", "*/status", "statefulsets/*"]
    resourceNames: ["web"]
- level: Metadata
  nonResourceURLs: ["/healthz*", "/version"]
  omitStages: ["ResponseComplete"]
- level: Metadata
  namespaces: ["kube-system"]
"#;

    fn request<'a>(verb: &'a str, group: &'a str, resource: &'a str, subresource: &'a str) -> Attributes<'a> {
        Attributes {
            user: Some(("alice", &[])),
            verb,
            resource_request: true,
            group,
            namespace: "default",
            resource,
            subresource,
            name: "web",
            path: "/apis/x",
        }
    }

    fn non_resource(path: &str) -> Attributes<'_> {
        Attributes {
            user: Some(("alice", &[])),
            verb: "get",
            resource_request: false,
            group: "",
            namespace: "",
            resource: "",
            subresource: "",
            name: "",
            path,
        }
    }

    #[test]
    fn the_first_matching_rule_decides_as_in_kubes_checker() {
        let policy = Policy::parse(POLICY).unwrap();
        let level = |a: &Attributes<'_>| policy.evaluate(a).level;
        assert_eq!(level(&request("get", "", "secrets", "")), Level::Metadata);
        assert_eq!(level(&request("get", "", "pods", "")), Level::None);
        assert_eq!(level(&request("watch", "echo.example.com", "echoes", "")), Level::RequestResponse);
        assert_eq!(level(&request("create", "apps", "deployments", "scale")), Level::Request);
        assert_eq!(level(&request("create", "apps", "deployments", "status")), Level::Request);
        assert_eq!(
            level(&request("create", "apps", "statefulsets", "")),
            Level::Request,
            "resource/* matches the resource"
        );
        assert_eq!(
            level(&request("create", "apps", "deployments", "")),
            Level::None,
            "deployments/scale is not deployments"
        );
        assert_eq!(level(&request("update", "apps", "deployments", "scale")), Level::None, "verb");
        let mut other_name = request("create", "apps", "deployments", "scale");
        other_name.name = "db";
        assert_eq!(level(&other_name), Level::None, "resourceNames");
        let mut proxy = request("get", "", "secrets", "");
        proxy.user = Some(("system:kube-proxy", &[]));
        assert_eq!(level(&proxy), Level::None);
        assert_eq!(level(&non_resource("/healthz/etcd")), Level::Metadata);
        assert_eq!(level(&non_resource("/version")), Level::Metadata);
        assert_eq!(level(&non_resource("/version/x")), Level::None);
        let mut system = request("get", "", "pods", "");
        system.namespace = "kube-system";
        assert_eq!(level(&system), Level::Metadata);
        assert_eq!(level(&non_resource("/apis")), Level::None, "a namespace rule never matches a non-resource request");
    }

    #[test]
    fn omitted_stages_are_the_rules_and_the_policys_together() {
        let policy = Policy::parse(POLICY).unwrap();
        let healthz = policy.evaluate(&non_resource("/healthz"));
        assert!(!healthz.records(Stage::RequestReceived));
        assert!(!healthz.records(Stage::ResponseComplete));
        assert!(healthz.records(Stage::ResponseStarted));
        let secrets = policy.evaluate(&request("get", "", "secrets", ""));
        assert!(!secrets.records(Stage::RequestReceived) && secrets.records(Stage::ResponseComplete));
    }

    #[test]
    fn a_failed_authentication_matches_no_rule_that_names_users() {
        let policy = Policy::parse(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Request\n  userGroups: [dev]\n- level: Metadata\n",
        )
        .unwrap();
        let mut anonymous = request("get", "", "pods", "");
        anonymous.user = None;
        assert_eq!(policy.evaluate(&anonymous).level, Level::Metadata);
        let groups = ["dev".to_owned()];
        let mut dev = request("get", "", "pods", "");
        dev.user = Some(("bob", &groups));
        assert_eq!(policy.evaluate(&dev).level, Level::Request);
    }

    #[test]
    fn invalid_policies_are_refused_naming_the_rule_and_field() {
        let err = |text: &str| Policy::parse(text).unwrap_err();
        let head = "apiVersion: audit.k8s.io/v1\nkind: Policy\n";
        assert_eq!(err(&format!("{head}rules: []\n")), "loaded illegal policy with 0 rules");
        assert!(err("apiVersion: audit.k8s.io/v1beta1\nkind: Policy\nrules: [{level: None}]\n")
            .contains("unknown group version"));
        assert_eq!(err(&format!("{head}rules:\n- users: [a]\n")), "rules[0].level: Required value");
        assert!(err(&format!("{head}rules:\n- level: Everything\n")).starts_with("rules[0].level: Unsupported value"));
        assert!(err(&format!("{head}rules:\n- level: None\n  nonResourceURLs: [/a]\n  namespaces: [b]\n"))
            .contains("rules cannot apply to both regular resources and non-resource URLs"));
        assert!(
            err(&format!("{head}rules:\n- level: None\n  nonResourceURLs: [a]\n")).contains("must begin with a '/'")
        );
        assert!(
            err(&format!("{head}rules:\n- level: None\n  nonResourceURLs: [\"/a*/b\"]\n")).contains("final character")
        );
        assert!(err(&format!(
            "{head}rules:\n- level: None\n- level: None\n  resources: [{{group: apps, resourceNames: [x]}}]\n"
        ))
        .starts_with("rules[1].resources[0].resourceNames"));
        assert!(err(&format!("{head}rules:\n- level: None\n  omitStages: [Sometime]\n")).contains("unknown variant"));
        assert!(err(&format!("{head}rules:\n- level: None\n  verb: [get]\n")).contains("unknown field"));
    }
}

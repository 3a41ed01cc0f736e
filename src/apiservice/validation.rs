//! kube-apiserver's APIService validation (ValidateAPIService), every error collected and
//! named by field, so one bad object is rejected with all its reasons and nothing else breaks.

use std::fmt;
use std::sync::Arc;

use super::{
    ApiService, ApiServiceObject, ObjectLabels, ServiceReference, TrafficPolicy, ANNOTATION_BURST,
    ANNOTATION_LONG_RUNNING_SUBRESOURCES, ANNOTATION_MAX_REQUESTS_INFLIGHT, ANNOTATION_REQUESTS_PER_SECOND,
    DEFAULT_SERVICE_PORT,
};

/// One problem with one field, worded as kube-apiserver words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found with one APIService.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub name: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "APIService {:?} is invalid: ", self.name)?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn is_dns1123_label_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// DNS-1123 subdomain: at most 253 characters, dot-separated lower-case alphanumeric labels.
fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 253 {
        errors.push("must be no more than 253 characters".to_owned());
    }
    if !value.split('.').all(is_dns1123_label_part) {
        errors.push(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
             and must start and end with an alphanumeric character"
                .to_owned(),
        );
    }
    errors
}

/// DNS-1035 label: at most 63 characters, starts with a letter.
fn dns1035_label_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 63 {
        errors.push("must be no more than 63 characters".to_owned());
    }
    let starts_with_letter = value.bytes().next().is_some_and(|c| c.is_ascii_lowercase());
    if !starts_with_letter || !is_dns1123_label_part(value) {
        errors.push(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an \
             alphabetic character, and end with an alphanumeric character"
                .to_owned(),
        );
    }
    errors
}

/// The proxy's annotations on an APIService; a value that does not parse is an error of that
/// annotation, as kube reports `metadata.annotations` problems.
fn traffic_policy(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    error: &mut impl FnMut(&'static str, String),
) -> TrafficPolicy {
    let mut policy = TrafficPolicy::default();
    let Some(annotations) = annotations else { return policy };
    let mut count = |key: &'static str| -> Option<u32> {
        let value = annotations.get(key)?;
        match value.trim().parse::<u32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                error(key, format!("Invalid value: {value:?}: must be a whole number greater than zero"));
                None
            }
        }
    };
    policy.max_requests_inflight = count(ANNOTATION_MAX_REQUESTS_INFLIGHT);
    policy.requests_per_second = count(ANNOTATION_REQUESTS_PER_SECOND);
    policy.burst = count(ANNOTATION_BURST);
    if policy.burst.is_some() && policy.requests_per_second.is_none() {
        error(ANNOTATION_BURST, format!("Forbidden: needs {ANNOTATION_REQUESTS_PER_SECOND}"));
    }
    if let Some(list) = annotations.get(ANNOTATION_LONG_RUNNING_SUBRESOURCES) {
        policy.long_running_subresources =
            list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    }
    policy
}

/// Validates and defaults an APIService object into the proxy's model.
pub fn validate(object: &ApiServiceObject) -> Result<ApiService, ValidationError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let mut errors = Vec::new();
    let mut error = |field: &'static str, message: String| errors.push(FieldError { field, message });
    let Some(spec) = object.spec.as_ref() else {
        error("spec", "Required value".into());
        return Err(ValidationError { name, errors });
    };
    let group = spec.group.clone().unwrap_or_default();
    let version = spec.version.clone().unwrap_or_default();

    if object.metadata.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
        error("metadata.namespace", "Forbidden: not allowed on this type".into());
    }
    let path_segment_problem = match name.as_str() {
        "." => Some("may not be '.'"),
        ".." => Some("may not be '..'"),
        n if n.contains('/') => Some("may not contain '/'"),
        n if n.contains('%') => Some("may not contain '%'"),
        _ => None,
    };
    if let Some(problem) = path_segment_problem {
        error("metadata.name", format!("Invalid value: {name:?}: {problem}"));
    } else {
        let required = format!("{version}.{group}");
        if name != required {
            error(
                "metadata.name",
                format!("Invalid value: {name:?}: must be `spec.version+\".\"+spec.group`: {required:?}"),
            );
        }
    }
    if group.is_empty() {
        if version != "v1" {
            error("spec.group", "Required value: only v1 may have an empty group and it better be legacy kube".into());
        }
    } else {
        for message in dns1123_subdomain_errors(&group) {
            error("spec.group", format!("Invalid value: {group:?}: {message}"));
        }
    }
    for message in dns1035_label_errors(&version) {
        error("spec.version", format!("Invalid value: {version:?}: {message}"));
    }
    let gpm = spec.group_priority_minimum;
    if gpm <= 0 || gpm > 20000 {
        error("spec.groupPriorityMinimum", format!("Invalid value: {gpm}: must be positive and less than 20000"));
    }
    let vp = spec.version_priority;
    if vp <= 0 || vp > 1000 {
        error("spec.versionPriority", format!("Invalid value: {vp}: must be positive and less than 1000"));
    }
    let ca_bundle: &[u8] = spec.ca_bundle.as_ref().map(|b| b.0.as_slice()).unwrap_or_default();
    let insecure = spec.insecure_skip_tls_verify.unwrap_or(false);
    let service = match &spec.service {
        None => {
            if !ca_bundle.is_empty() {
                error(
                    "spec.caBundle",
                    format!("Invalid value: \"{} bytes\": local APIServices may not have a caBundle", ca_bundle.len()),
                );
            }
            if insecure {
                error(
                    "spec.insecureSkipTLSVerify",
                    "Invalid value: true: local APIServices may not have insecureSkipTLSVerify".into(),
                );
            }
            None
        }
        Some(svc) => {
            let namespace = svc.namespace.clone().unwrap_or_default();
            let svc_name = svc.name.clone().unwrap_or_default();
            if namespace.is_empty() {
                error("spec.service.namespace", "Required value".into());
            }
            if svc_name.is_empty() {
                error("spec.service.name", "Required value".into());
            }
            let port = svc.port.unwrap_or(i32::from(DEFAULT_SERVICE_PORT));
            if !(1..=65535).contains(&port) {
                error(
                    "spec.service.port",
                    format!("Invalid value: {port}: port is not valid: must be between 1 and 65535, inclusive"),
                );
            }
            if insecure && !ca_bundle.is_empty() {
                error(
                    "spec.insecureSkipTLSVerify",
                    "Invalid value: true: may not be true if caBundle is present".into(),
                );
            }
            Some(ServiceReference {
                namespace: namespace.into(),
                name: svc_name.into(),
                port: u16::try_from(port).unwrap_or(DEFAULT_SERVICE_PORT),
                ca_bundle: Arc::from(ca_bundle),
                insecure_skip_tls_verify: insecure,
            })
        }
    };
    let policy = traffic_policy(object.metadata.annotations.as_ref(), &mut error);
    if !errors.is_empty() {
        return Err(ValidationError { name, errors });
    }
    Ok(ApiService {
        name: name.into(),
        group: group.into(),
        version: version.into(),
        group_priority_minimum: gpm,
        version_priority: vp,
        service,
        policy,
        meta: ObjectLabels {
            labels: Arc::new(object.metadata.labels.clone().unwrap_or_default()),
            annotations: Arc::new(object.metadata.annotations.clone().unwrap_or_default()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiservice::manifest::parse_documents;

    fn object(yaml: &str) -> ApiServiceObject {
        parse_documents(yaml, "test.yaml").unwrap().remove(0)
    }

    const METRICS: &str = r#"
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.metrics.k8s.io}
spec:
  group: metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  service: {name: metrics-server, namespace: kube-system}
  insecureSkipTLSVerify: true
"#;

    #[test]
    fn the_proxys_annotations_set_the_traffic_policy_and_bad_values_name_the_annotation() {
        let annotated = METRICS.replace(
            "metadata: {name: v1beta1.metrics.k8s.io}",
            "metadata:\n  name: v1beta1.metrics.k8s.io\n  annotations:\n    \
             kube-aggregation-proxy.io/max-requests-inflight: '10'\n    \
             kube-aggregation-proxy.io/requests-per-second: '5'\n    \
             kube-aggregation-proxy.io/long-running-subresources: 'tail, stream'",
        );
        let policy = validate(&object(&annotated)).unwrap().policy;
        assert_eq!(policy.max_requests_inflight, Some(10));
        assert_eq!((policy.requests_per_second, policy.burst), (Some(5), None));
        assert_eq!(policy.long_running_subresources, ["tail", "stream"]);
        let bad = METRICS.replace(
            "metadata: {name: v1beta1.metrics.k8s.io}",
            "metadata:\n  name: v1beta1.metrics.k8s.io\n  annotations:\n    \
             kube-aggregation-proxy.io/max-requests-inflight: 'lots'\n    kube-aggregation-proxy.io/burst: '3'",
        );
        let err = validate(&object(&bad)).unwrap_err().to_string();
        assert!(err.contains("kube-aggregation-proxy.io/max-requests-inflight: Invalid value: \"lots\""), "{err}");
        assert!(
            err.contains(
                "kube-aggregation-proxy.io/burst: Forbidden: needs kube-aggregation-proxy.io/requests-per-second"
            ),
            "{err}"
        );
    }

    #[test]
    fn remote_apiservice_is_defaulted_to_port_443() {
        let a = validate(&object(METRICS)).unwrap();
        let svc = a.service.unwrap();
        assert_eq!((svc.port, svc.server_name().as_str()), (443, "metrics-server.kube-system.svc"));
        assert_eq!(svc.key(), "kube-system/metrics-server:443");
    }

    #[test]
    fn core_group_local_apiservice_is_named_v1_dot() {
        let a = validate(&object(
            "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {name: v1.}\n\
             spec: {version: v1, groupPriorityMinimum: 18000, versionPriority: 1}\n",
        ))
        .unwrap();
        assert!(a.is_local());
        assert_eq!(&*a.group, "");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let yaml = r#"
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1.wrong}
spec:
  group: Bad_Group
  version: 1v
  groupPriorityMinimum: 0
  versionPriority: 1001
  caBundle: Zm9v
  insecureSkipTLSVerify: true
  service: {name: "", namespace: "", port: 70000}
"#;
        let err = validate(&object(yaml)).unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "metadata.name",
                "spec.group",
                "spec.version",
                "spec.groupPriorityMinimum",
                "spec.versionPriority",
                "spec.service.namespace",
                "spec.service.name",
                "spec.service.port",
                "spec.insecureSkipTLSVerify",
            ]
        );
        let text = err.to_string();
        assert!(text.starts_with("APIService \"v1.wrong\" is invalid: metadata.name: Invalid value: \"v1.wrong\": must be `spec.version+\".\"+spec.group`: \"1v.Bad_Group\""), "{text}");
        assert!(text.contains("spec.groupPriorityMinimum: Invalid value: 0: must be positive and less than 20000"));
    }

    #[test]
    fn priority_bounds_are_inclusive() {
        let edge = METRICS
            .replace("groupPriorityMinimum: 100", "groupPriorityMinimum: 20000")
            .replace("versionPriority: 100", "versionPriority: 1000");
        assert!(validate(&object(&edge)).is_ok());
        let over = METRICS.replace("groupPriorityMinimum: 100", "groupPriorityMinimum: 20001");
        assert!(validate(&object(&over)).is_err());
    }

    #[test]
    fn only_v1_may_have_an_empty_group() {
        let yaml = "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {name: v2.}\n\
                    spec: {version: v2, groupPriorityMinimum: 1, versionPriority: 1}\n";
        let err = validate(&object(yaml)).unwrap_err();
        assert_eq!(err.errors[0].field, "spec.group");
        assert!(err.errors[0].message.contains("only v1 may have an empty group"));
    }

    #[test]
    fn local_apiservice_may_not_carry_tls_settings() {
        let yaml = "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {name: v1.local.io}\n\
                    spec: {group: local.io, version: v1, groupPriorityMinimum: 1, versionPriority: 1, caBundle: Zm9v}\n";
        let err = validate(&object(yaml)).unwrap_err();
        assert_eq!(
            err.errors[0].to_string(),
            "spec.caBundle: Invalid value: \"3 bytes\": local APIServices may not have a caBundle"
        );
    }
}

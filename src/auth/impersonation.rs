//! Impersonation as kube-apiserver's `WithImpersonation` filter does it: the headers
//! `Impersonate-User`, `Impersonate-Group` (repeatable), `Impersonate-Uid` and
//! `Impersonate-Extra-<key>` ask to act as another user. Each thing asked for is one
//! authorization check of verb `impersonate` (on `users`, `serviceaccounts`, `groups`,
//! `userextras/<key>` or `uids`); only when every check passes does the request continue as
//! the impersonated user, and that user is then what authorization checks and what backends
//! and the delegate see in `X-Remote-*`.
//!
//! kube-apiserver 1.35+ also has *constrained* impersonation (KEP-5284), tried first: one
//! action check, `impersonate-on:<mode>:<verb>` on what the request itself does, and identity
//! checks, `impersonate:<mode>` on the users, groups, uids, userextras, serviceaccounts or
//! nodes of `authentication.k8s.io`. When it is not granted, the legacy `impersonate` checks
//! decide, and a refusal names the constrained check that failed, as kube's does.
//!
//! Parsing happens before the identity headers are stripped, so the headers are read once and
//! never forwarded.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName};

use super::authorization::{Attributes, ResourceAttributes};
use super::identity::{GROUP_AUTHENTICATED, GROUP_UNAUTHENTICATED, HEADER_IMPERSONATE_PREFIX, USER_ANONYMOUS};
use super::UserInfo;

// Names made at compile time: a `&str` lookup parses and hashes the name on every request.
pub const HEADER_USER: HeaderName = HeaderName::from_static("impersonate-user");
pub const HEADER_GROUP: HeaderName = HeaderName::from_static("impersonate-group");
pub const HEADER_UID: HeaderName = HeaderName::from_static("impersonate-uid");
pub const HEADER_EXTRA_PREFIX: &str = "impersonate-extra-";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const NODE_PREFIX: &str = "system:node:";
/// The extra a service account token carries naming the node its pod runs on.
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const GROUP_SERVICE_ACCOUNTS: &str = "system:serviceaccounts";
/// kube's API group of the `userextras` and `uids` impersonation resources.
const AUTHENTICATION_GROUP: &str = "authentication.k8s.io";

/// What a request asked to impersonate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    target: Target,
    /// `Impersonate-Group` values, in order; an empty list means "not given".
    groups: Vec<String>,
    /// `Impersonate-Extra-<key>` values: lower-cased, percent-decoded key and each value.
    extra: Vec<(String, String)>,
    uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    User(String),
    ServiceAccount { namespace: String, name: String },
}

/// Impersonation headers that cannot be used, naming the header at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImpersonationError {
    #[error("requested impersonation of {0} without impersonating a user (header Impersonate-User)")]
    WithoutUser(String),
    #[error("header {0}: value is not valid UTF-8")]
    NotUtf8(String),
}

fn text<'a>(name: &str, value: &'a http::HeaderValue) -> Result<&'a str, ImpersonationError> {
    std::str::from_utf8(value.as_bytes()).map_err(|_| ImpersonationError::NotUtf8(name.to_owned()))
}

/// Reads the impersonation headers. `Ok(None)`: the request impersonates nobody.
pub fn parse(headers: &HeaderMap) -> Result<Option<Impersonation>, ImpersonationError> {
    // Nearly every request impersonates nobody: one pass over the names decides that.
    if !headers.keys().any(|name| name.as_str().starts_with(HEADER_IMPERSONATE_PREFIX)) {
        return Ok(None);
    }
    // kube reads the first Impersonate-User and Impersonate-Uid, and every Impersonate-Group.
    let user = headers.get(HEADER_USER).map(|v| text("Impersonate-User", v)).transpose()?.filter(|u| !u.is_empty());
    let uid = headers.get(HEADER_UID).map(|v| text("Impersonate-Uid", v)).transpose()?.filter(|u| !u.is_empty());
    let mut groups = Vec::new();
    for value in headers.get_all(HEADER_GROUP) {
        groups.push(text("Impersonate-Group", value)?.to_owned());
    }
    let mut extra = Vec::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(HEADER_EXTRA_PREFIX) else { continue };
        // kube records a malformed %-encoding as it came rather than dropping it.
        let key = percent_encoding::percent_decode_str(key)
            .decode_utf8()
            .map(|k| k.into_owned())
            .unwrap_or_else(|_| key.to_owned());
        extra.push((key, text(name.as_str(), value)?.to_owned()));
    }
    let Some(user) = user else {
        if groups.is_empty() && extra.is_empty() && uid.is_none() {
            return Ok(None);
        }
        let mut asked = Vec::new();
        asked.extend(groups.iter().map(|g| format!("group {g:?}")));
        asked.extend(extra.iter().map(|(k, v)| format!("extra {k:?}={v:?}")));
        asked.extend(uid.iter().map(|u| format!("uid {u:?}")));
        return Err(ImpersonationError::WithoutUser(asked.join(", ")));
    };
    let target = match service_account(user) {
        Some((namespace, name)) => Target::ServiceAccount { namespace: namespace.to_owned(), name: name.to_owned() },
        None => Target::User(user.to_owned()),
    };
    Ok(Some(Impersonation { target, groups, extra, uid: uid.map(str::to_owned) }))
}

/// `system:serviceaccount:<namespace>:<name>` with a valid namespace and name, as kube's
/// `serviceaccount.SplitUsername` accepts it.
fn service_account(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
    let (namespace, name) = rest.split_once(':')?;
    (is_dns1123_label(namespace) && !name.contains(':') && is_dns1123_subdomain(name)).then_some((namespace, name))
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

impl Impersonation {
    /// The authorization checks, in kube's order: the user, each group, each extra value,
    /// the uid. Every one must be allowed.
    pub fn checks(&self) -> Vec<Attributes> {
        let check = |group: &str, resource: &str, subresource: &str, namespace: &str, name: &str| {
            Attributes::Resource(ResourceAttributes {
                verb: "impersonate".into(),
                group: group.into(),
                version: "v1".into(),
                namespace: namespace.into(),
                resource: resource.into(),
                subresource: subresource.into(),
                name: name.into(),
            })
        };
        let mut checks = vec![match &self.target {
            Target::User(name) => check("", "users", "", "", name),
            Target::ServiceAccount { namespace, name } => check("", "serviceaccounts", "", namespace, name),
        }];
        checks.extend(self.groups.iter().map(|g| check("", "groups", "", "", g)));
        checks.extend(self.extra.iter().map(|(k, v)| check(AUTHENTICATION_GROUP, "userextras", k, "", v)));
        checks.extend(self.uid.iter().map(|u| check(AUTHENTICATION_GROUP, "uids", "", "", u)));
        checks
    }

    /// KEP-5284's mode for this impersonation by `requestor`.
    fn mode(&self, requestor: &UserInfo) -> &'static str {
        match &self.target {
            Target::ServiceAccount { .. } => "serviceaccount",
            Target::User(name) => match name.strip_prefix(NODE_PREFIX) {
                None => "user-info",
                Some(node) => {
                    let on_that_node = service_account(&requestor.name).is_some()
                        && requestor.extra.get(EXTRA_NODE_NAME).is_some_and(|n| n.len() == 1 && n[0] == node);
                    if on_that_node {
                        "associated-node"
                    } else {
                        "arbitrary-node"
                    }
                }
            },
        }
    }

    /// The constrained checks, in order: the action (`impersonate-on:<mode>:<verb>` on
    /// `action`, what the request does), then each identity (`impersonate:<mode>`).
    pub fn constrained_checks(&self, requestor: &UserInfo, action: &Attributes) -> Vec<Attributes> {
        let mode = self.mode(requestor);
        let mut action = action.clone();
        match &mut action {
            Attributes::Resource(r) => r.verb = format!("impersonate-on:{mode}:{}", r.verb),
            Attributes::NonResource { verb, .. } => *verb = format!("impersonate-on:{mode}:{verb}"),
        }
        let identity = |resource: &str, subresource: &str, namespace: &str, name: &str| {
            Attributes::Resource(ResourceAttributes {
                verb: format!("impersonate:{mode}"),
                group: AUTHENTICATION_GROUP.into(),
                version: "v1".into(),
                namespace: namespace.into(),
                resource: resource.into(),
                subresource: subresource.into(),
                name: name.into(),
            })
        };
        let mut checks = vec![action];
        checks.push(match &self.target {
            Target::ServiceAccount { namespace, name } => identity("serviceaccounts", "", namespace, name),
            Target::User(name) => match name.strip_prefix(NODE_PREFIX) {
                Some(node) => identity("nodes", "", "", node),
                None => identity("users", "", "", name),
            },
        });
        checks.extend(self.groups.iter().map(|g| identity("groups", "", "", g)));
        checks.extend(self.extra.iter().map(|(k, v)| identity("userextras", k, "", v)));
        checks.extend(self.uid.iter().map(|u| identity("uids", "", "", u)));
        checks
    }

    /// The user the request continues as once every check passed. Groups given are the
    /// authority; a service account without them gets its fixed groups; everyone but
    /// `system:anonymous` gets `system:authenticated` unless `system:(un)authenticated` was
    /// given, and `system:anonymous` gets `system:unauthenticated`.
    pub fn into_user(self) -> UserInfo {
        let mut groups = self.groups;
        let name = match self.target {
            Target::User(name) => name,
            Target::ServiceAccount { namespace, name } => {
                if groups.is_empty() {
                    groups = vec![GROUP_SERVICE_ACCOUNTS.to_owned(), format!("{GROUP_SERVICE_ACCOUNTS}:{namespace}")];
                }
                format!("{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}")
            }
        };
        if name != USER_ANONYMOUS {
            if !groups.iter().any(|g| g == GROUP_AUTHENTICATED || g == GROUP_UNAUTHENTICATED) {
                groups.push(GROUP_AUTHENTICATED.to_owned());
            }
        } else if !groups.iter().any(|g| g == GROUP_UNAUTHENTICATED) {
            groups.push(GROUP_UNAUTHENTICATED.to_owned());
        }
        let mut extra = BTreeMap::<String, Vec<String>>::new();
        for (key, value) in self.extra {
            extra.entry(key).or_default().push(value);
        }
        UserInfo { name, uid: self.uid, groups, extra }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        map
    }

    fn resource(a: &Attributes) -> &ResourceAttributes {
        match a {
            Attributes::Resource(r) => r,
            Attributes::NonResource { .. } => panic!("non-resource check {a:?}"),
        }
    }

    #[test]
    fn no_headers_is_no_impersonation() {
        assert_eq!(parse(&headers(&[("x-remote-user", "a")])).unwrap(), None);
        assert_eq!(parse(&headers(&[("impersonate-user", "")])).unwrap(), None);
    }

    #[test]
    fn a_user_with_groups_extra_and_uid_is_checked_piece_by_piece_in_kubes_order() {
        let imp = parse(&headers(&[
            ("Impersonate-User", "jane"),
            ("Impersonate-Group", "dev"),
            ("Impersonate-Group", "ops"),
            ("Impersonate-Extra-Scopes%2Fone", "view"),
            ("Impersonate-Uid", "1234"),
        ]))
        .unwrap()
        .unwrap();
        let checks = imp.checks();
        let summary: Vec<_> = checks
            .iter()
            .map(resource)
            .map(|r| (r.verb.as_str(), r.group.as_str(), r.resource.as_str(), r.subresource.as_str(), r.name.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("impersonate", "", "users", "", "jane"),
                ("impersonate", "", "groups", "", "dev"),
                ("impersonate", "", "groups", "", "ops"),
                ("impersonate", "authentication.k8s.io", "userextras", "scopes/one", "view"),
                ("impersonate", "authentication.k8s.io", "uids", "", "1234"),
            ]
        );
        let user = imp.into_user();
        assert_eq!(user.name, "jane");
        assert_eq!(user.groups, ["dev", "ops", "system:authenticated"]);
        assert_eq!(user.extra["scopes/one"], ["view"]);
        assert_eq!(user.uid.as_deref(), Some("1234"));
    }

    #[test]
    fn a_service_account_is_checked_in_its_namespace_and_gets_its_groups() {
        let imp =
            parse(&headers(&[("Impersonate-User", "system:serviceaccount:kube-system:builder")])).unwrap().unwrap();
        let check = imp.checks();
        let r = resource(&check[0]);
        assert_eq!(
            (r.resource.as_str(), r.namespace.as_str(), r.name.as_str()),
            ("serviceaccounts", "kube-system", "builder")
        );
        let user = imp.into_user();
        assert_eq!(user.name, "system:serviceaccount:kube-system:builder");
        assert_eq!(
            user.groups,
            ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
        );
    }

    #[test]
    fn constrained_checks_ask_for_the_action_then_each_identity_by_mode() {
        let action = Attributes::Resource(ResourceAttributes {
            verb: "list".into(),
            resource: "pods".into(),
            namespace: "default".into(),
            version: "v1".into(),
            ..ResourceAttributes::default()
        });
        let requestor = UserInfo::new("alice", vec![]);
        let verbs = |imp: &Impersonation, requestor: &UserInfo| {
            imp.constrained_checks(requestor, &action)
                .iter()
                .map(|a| {
                    let r = resource(a);
                    format!(
                        "{} {}/{}{}",
                        r.verb,
                        r.group,
                        r.resource,
                        if r.name.is_empty() { String::new() } else { format!(" {}", r.name) }
                    )
                })
                .collect::<Vec<_>>()
        };
        let user = parse(&headers(&[("Impersonate-User", "jane"), ("Impersonate-Group", "dev")])).unwrap().unwrap();
        assert_eq!(
            verbs(&user, &requestor),
            [
                "impersonate-on:user-info:list /pods",
                "impersonate:user-info authentication.k8s.io/users jane",
                "impersonate:user-info authentication.k8s.io/groups dev",
            ]
        );
        let sa = parse(&headers(&[("Impersonate-User", "system:serviceaccount:ns:robot")])).unwrap().unwrap();
        assert_eq!(
            verbs(&sa, &requestor),
            [
                "impersonate-on:serviceaccount:list /pods",
                "impersonate:serviceaccount authentication.k8s.io/serviceaccounts robot"
            ]
        );
        let node = parse(&headers(&[("Impersonate-User", "system:node:n1")])).unwrap().unwrap();
        assert_eq!(
            verbs(&node, &requestor),
            ["impersonate-on:arbitrary-node:list /pods", "impersonate:arbitrary-node authentication.k8s.io/nodes n1"]
        );
        let mut on_node = UserInfo::new("system:serviceaccount:kube-system:agent", vec![]);
        on_node.extra.insert(EXTRA_NODE_NAME.into(), vec!["n1".into()]);
        assert_eq!(verbs(&node, &on_node)[0], "impersonate-on:associated-node:list /pods");
    }

    #[test]
    fn a_malformed_service_account_name_is_an_ordinary_user() {
        for name in ["system:serviceaccount:ns", "system:serviceaccount:Bad:x", "system:serviceaccount:ns:a:b"] {
            let imp = parse(&headers(&[("Impersonate-User", name)])).unwrap().unwrap();
            assert_eq!(resource(&imp.checks()[0]).resource, "users", "{name}");
            assert_eq!(imp.into_user().name, name);
        }
    }

    #[test]
    fn given_groups_are_the_authority() {
        let imp = parse(&headers(&[("Impersonate-User", "x"), ("Impersonate-Group", "system:unauthenticated")]))
            .unwrap()
            .unwrap();
        assert_eq!(imp.into_user().groups, ["system:unauthenticated"]);
        let anon = parse(&headers(&[("Impersonate-User", "system:anonymous")])).unwrap().unwrap();
        assert_eq!(anon.into_user().groups, ["system:unauthenticated"]);
        let sa = parse(&headers(&[("Impersonate-User", "system:serviceaccount:a:b"), ("Impersonate-Group", "g")]))
            .unwrap()
            .unwrap();
        assert_eq!(sa.into_user().groups, ["g", "system:authenticated"]);
    }

    #[test]
    fn groups_uid_or_extra_without_a_user_are_refused_naming_what_was_asked() {
        for (header, value, named) in [
            ("Impersonate-Group", "system:masters", "group \"system:masters\""),
            ("Impersonate-Uid", "42", "uid \"42\""),
            ("Impersonate-Extra-Scopes", "x", "extra \"scopes\"=\"x\""),
        ] {
            let err = parse(&headers(&[(header, value)])).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(named) && message.contains("Impersonate-User"), "{message}");
        }
    }

    #[test]
    fn a_non_utf8_value_names_its_header() {
        let mut map = HeaderMap::new();
        map.insert(HEADER_USER, http::HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(parse(&map).unwrap_err(), ImpersonationError::NotUtf8("Impersonate-User".into()));
    }
}

//! The authenticated user and the `X-Remote-*` headers that carry it to backends.
//!
//! Stripping happens before routing and injection right before forwarding, so no header the
//! client wrote in the identity namespace (configured requestheader names, the standard
//! `X-Remote-*` set, `Impersonate-*`, `Authorization`) can reach a backend.

use std::collections::BTreeMap;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::HeaderMap;

pub const HEADER_REMOTE_USER: &str = "x-remote-user";
pub const HEADER_REMOTE_UID: &str = "x-remote-uid";
pub const HEADER_REMOTE_GROUP: &str = "x-remote-group";
pub const HEADER_REMOTE_EXTRA_PREFIX: &str = "x-remote-extra-";
pub const HEADER_IMPERSONATE_PREFIX: &str = "impersonate-";

pub const USER_ANONYMOUS: &str = "system:anonymous";
pub const GROUP_UNAUTHENTICATED: &str = "system:unauthenticated";
pub const GROUP_AUTHENTICATED: &str = "system:authenticated";

/// A Kubernetes user: what `user.Info` is to kube-apiserver.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct UserInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub fn new(name: impl Into<String>, groups: Vec<String>) -> Self {
        Self { name: name.into(), groups, ..Self::default() }
    }

    pub fn anonymous() -> Self {
        Self::new(USER_ANONYMOUS, vec![GROUP_UNAUTHENTICATED.to_owned()])
    }

    pub(crate) fn with_authenticated_group(mut self) -> Self {
        if self.name != USER_ANONYMOUS && !self.groups.iter().any(|g| g == GROUP_AUTHENTICATED) {
            self.groups.push(GROUP_AUTHENTICATED.to_owned());
        }
        self
    }
}

/// The header names treated as identity, besides the fixed `X-Remote-*` and `Impersonate-*`
/// sets: the configured `--requestheader-*` names, lower-cased once at start.
#[derive(Debug, Clone, Default)]
pub struct IdentityHeaderNames {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl IdentityHeaderNames {
    pub fn new<'a>(exact: impl IntoIterator<Item = &'a str>, prefixes: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            exact: exact.into_iter().map(str::to_ascii_lowercase).collect(),
            prefixes: prefixes.into_iter().map(str::to_ascii_lowercase).collect(),
        }
    }

    fn is_identity(&self, name: &str) -> bool {
        // `HeaderName`s are already lower case.
        name == AUTHORIZATION.as_str()
            || name == HEADER_REMOTE_USER
            || name == HEADER_REMOTE_UID
            || name == HEADER_REMOTE_GROUP
            || name.starts_with(HEADER_REMOTE_EXTRA_PREFIX)
            || name.starts_with(HEADER_IMPERSONATE_PREFIX)
            || self.exact.iter().any(|e| e == name)
            || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Removes every header in the identity namespace. Returns how many distinct names went.
    pub fn strip(&self, headers: &mut HeaderMap) -> usize {
        let doomed: Vec<HeaderName> = headers.keys().filter(|name| self.is_identity(name.as_str())).cloned().collect();
        for name in &doomed {
            headers.remove(name);
        }
        doomed.len()
    }
}

/// Writes the user as `X-Remote-User`, `X-Remote-Uid`, one `X-Remote-Group` per group, and
/// `X-Remote-Extra-<escaped key>` per extra value. Values that are not valid header values
/// (control characters) are dropped rather than sent mangled.
pub fn inject(user: &UserInfo, headers: &mut HeaderMap) {
    if let Ok(v) = HeaderValue::from_str(&user.name) {
        headers.insert(HEADER_REMOTE_USER, v);
    }
    if let Some(uid) = user.uid.as_deref().filter(|u| !u.is_empty()) {
        if let Ok(v) = HeaderValue::from_str(uid) {
            headers.insert(HEADER_REMOTE_UID, v);
        }
    }
    for group in &user.groups {
        if let Ok(v) = HeaderValue::from_str(group) {
            headers.append(HEADER_REMOTE_GROUP, v);
        }
    }
    for (key, values) in &user.extra {
        let name = format!("{HEADER_REMOTE_EXTRA_PREFIX}{}", escape_extra_key(key));
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
        for value in values {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.append(name.clone(), v);
            }
        }
    }
}

/// Escapes an extra key for use in a header name: RFC 7230 token characters stay, everything
/// else (and `%` itself) becomes `%XX`, so the receiver can path-unescape it back.
pub fn escape_extra_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`escape_extra_key`] on a received header suffix: lower-cased, then
/// percent-decoded; an undecodable suffix is kept as it is, as kube does.
pub fn unescape_extra_key(suffix: &str) -> String {
    let lower = suffix.to_ascii_lowercase();
    match percent_encoding::percent_decode_str(&lower).decode_utf8() {
        Ok(decoded) => decoded.into_owned(),
        Err(_) => lower,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn spoofed_identity_headers_are_stripped_case_insensitively() {
        let names = IdentityHeaderNames::new(["X-Custom-User"], ["X-Custom-Extra-"]);
        let mut h = headers(&[
            ("X-Remote-User", "system:admin"),
            ("x-remote-uid", "0"),
            ("X-REMOTE-GROUP", "system:masters"),
            ("X-Remote-Extra-Scopes", "all"),
            ("Impersonate-User", "root"),
            ("Impersonate-Extra-Foo", "bar"),
            ("Authorization", "Bearer secret"),
            ("X-Custom-User", "eve"),
            ("x-custom-extra-thing", "1"),
            ("Accept", "application/json"),
        ]);
        assert_eq!(names.strip(&mut h), 9);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn identity_is_injected_with_one_header_per_group_and_extra_value() {
        let mut user = UserInfo::new("alice", vec!["dev".into(), "ops".into()]);
        user.uid = Some("42".into());
        user.extra.insert("example.com/scopes".into(), vec!["a".into(), "b".into()]);
        let mut h = HeaderMap::new();
        inject(&user, &mut h);
        assert_eq!(h["x-remote-user"], "alice");
        assert_eq!(h["x-remote-uid"], "42");
        let groups: Vec<_> = h.get_all("x-remote-group").iter().collect();
        assert_eq!(groups, ["dev", "ops"]);
        let extra: Vec<_> = h.get_all("x-remote-extra-example.com%2Fscopes").iter().collect();
        assert_eq!(extra, ["a", "b"]);
    }

    #[test]
    fn extra_keys_round_trip_through_escaping() {
        for key in ["scopes", "example.com/scopes", "100%", "a b:c=d", "ünï"] {
            assert_eq!(unescape_extra_key(&escape_extra_key(key)), key.to_lowercase());
        }
        assert_eq!(escape_extra_key("100%"), "100%25");
    }

    #[test]
    fn authenticated_group_is_added_once_and_never_to_anonymous() {
        let u = UserInfo::new("bob", vec![GROUP_AUTHENTICATED.into()]).with_authenticated_group();
        assert_eq!(u.groups, [GROUP_AUTHENTICATED]);
        assert_eq!(UserInfo::anonymous().with_authenticated_group().groups, [GROUP_UNAUTHENTICATED]);
    }
}

//! The authenticated user and the `X-Remote-*` headers that carry it to backends.
//!
//! Stripping happens before routing and injection right before forwarding, so no header the
//! client wrote in the identity namespace (configured requestheader names, the standard
//! `X-Remote-*` set, `Impersonate-*`, `Authorization`) can reach a backend.

use std::collections::BTreeMap;
use std::sync::Arc;

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
        if self.lacks_authenticated_group() {
            self.groups.push(GROUP_AUTHENTICATED.to_owned());
        }
        self
    }

    fn lacks_authenticated_group(&self) -> bool {
        self.name != USER_ANONYMOUS && !self.groups.iter().any(|g| g == GROUP_AUTHENTICATED)
    }
}

/// kube's group adder for a shared user. The users authenticators keep (the token file's, a
/// connection's certificate user) are stored with the group already, so a request hands on
/// the same allocation rather than a copy of the user.
pub(crate) fn with_authenticated_group(user: Arc<UserInfo>) -> Arc<UserInfo> {
    if user.lacks_authenticated_group() {
        Arc::new(Arc::unwrap_or_clone(user).with_authenticated_group())
    } else {
        user
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

/// A part of the identity that no HTTP header can carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header} would contain a control character")]
pub struct IdentityHeaderError {
    pub header: String,
}

/// A header value as Go writes it: any bytes but control characters, so UTF-8 names go as
/// they are (obs-text), exactly as kube-aggregator sends them.
fn header_value(value: &str, header: &str) -> Result<HeaderValue, IdentityHeaderError> {
    HeaderValue::from_bytes(value.as_bytes()).map_err(|_| IdentityHeaderError { header: header.to_owned() })
}

/// How many headers [`inject`] writes for `user`.
pub fn header_count(user: &UserInfo) -> usize {
    let uid = user.uid.as_deref().is_some_and(|u| !u.is_empty());
    1 + usize::from(uid) + user.groups.len() + user.extra.values().map(Vec::len).sum::<usize>()
}

/// Writes the user as `X-Remote-User`, `X-Remote-Uid`, one `X-Remote-Group` per group, and
/// `X-Remote-Extra-<escaped key>` per extra value, as client-go's `SetAuthProxyHeaders` does:
/// names, groups and values in UTF-8 as they are, extra keys percent-escaped. A value no
/// header can carry (a control character) fails the whole identity: a request is never sent
/// with part of its identity missing.
pub fn inject(user: &UserInfo, headers: &mut HeaderMap) -> Result<(), IdentityHeaderError> {
    // Names made at compile time: a `&str` name is parsed and copied on every insert.
    const REMOTE_USER: HeaderName = HeaderName::from_static(HEADER_REMOTE_USER);
    const REMOTE_UID: HeaderName = HeaderName::from_static(HEADER_REMOTE_UID);
    const REMOTE_GROUP: HeaderName = HeaderName::from_static(HEADER_REMOTE_GROUP);
    headers.insert(REMOTE_USER, header_value(&user.name, "X-Remote-User")?);
    if let Some(uid) = user.uid.as_deref().filter(|u| !u.is_empty()) {
        headers.insert(REMOTE_UID, header_value(uid, "X-Remote-Uid")?);
    }
    for group in &user.groups {
        headers.append(REMOTE_GROUP, header_value(group, "X-Remote-Group")?);
    }
    for (key, values) in &user.extra {
        let name = format!("{HEADER_REMOTE_EXTRA_PREFIX}{}", escape_extra_key(key));
        // Escaping leaves only token characters, so this cannot fail; refuse rather than skip.
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| IdentityHeaderError { header: name.clone() })?;
        for value in values {
            headers.append(name.clone(), header_value(value, name.as_str())?);
        }
    }
    Ok(())
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
        inject(&user, &mut h).unwrap();
        assert_eq!(h["x-remote-user"], "alice");
        assert_eq!(h["x-remote-uid"], "42");
        let groups: Vec<_> = h.get_all("x-remote-group").iter().collect();
        assert_eq!(groups, ["dev", "ops"]);
        let extra: Vec<_> = h.get_all("x-remote-extra-example.com%2Fscopes").iter().collect();
        assert_eq!(extra, ["a", "b"]);
        assert_eq!(header_count(&user), h.len());
    }

    #[test]
    fn non_ascii_identities_go_as_utf8_and_control_characters_refuse_the_identity() {
        let mut h = HeaderMap::new();
        inject(&UserInfo::new("jürgen", vec!["développeurs".into()]), &mut h).unwrap();
        assert_eq!(h["x-remote-user"].as_bytes(), "jürgen".as_bytes());
        assert_eq!(h["x-remote-group"].as_bytes(), "développeurs".as_bytes());
        let err = inject(&UserInfo::new("eve", vec!["a\r\nX-Remote-User: root".into()]), &mut HeaderMap::new());
        assert_eq!(err.unwrap_err().header, "X-Remote-Group");
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
        // A shared user that has the group is handed on, not copied.
        let shared = Arc::new(u);
        assert!(Arc::ptr_eq(&with_authenticated_group(shared.clone()), &shared));
        let without = with_authenticated_group(Arc::new(UserInfo::new("carol", vec![])));
        assert_eq!(without.groups, [GROUP_AUTHENTICATED]);
    }
}

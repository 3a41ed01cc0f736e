//! Front-proxy ("requestheader") authentication: a caller holding a client certificate from the
//! requestheader CA, with an allowed common name, may assert the user in headers.
//!
//! Used by the proxy to accept a chained front proxy, and by the sample extension server to
//! accept the proxy itself, the way extension API servers built on k8s.io/apiserver do.

use http::HeaderMap;

use super::identity::{unescape_extra_key, UserInfo};
use super::x509::ChainVerifier;
use super::{AuthError, Authenticator, Credentials};

/// The `--requestheader-*` settings.
#[derive(Clone)]
pub struct RequestHeaderConfig {
    pub verifier: ChainVerifier,
    /// Common names allowed to assert identity; empty allows any certificate from the CA.
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub uid_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_headers_prefix: Vec<String>,
}

impl RequestHeaderConfig {
    /// The header names extension servers use when nothing else is configured.
    pub fn with_default_headers(verifier: ChainVerifier, allowed_names: Vec<String>) -> Self {
        Self {
            verifier,
            allowed_names,
            username_headers: vec!["X-Remote-User".into()],
            uid_headers: vec!["X-Remote-Uid".into()],
            group_headers: vec!["X-Remote-Group".into()],
            extra_headers_prefix: vec!["X-Remote-Extra-".into()],
        }
    }
}

pub struct RequestHeaderAuthenticator {
    config: RequestHeaderConfig,
}

impl RequestHeaderAuthenticator {
    pub fn new(config: RequestHeaderConfig) -> Self {
        Self { config }
    }
}

/// A header value as text: Go reads header bytes as they are, so UTF-8 names a front proxy
/// sends (as kube-aggregator does) are read as UTF-8, not dropped for not being ASCII.
fn text(value: &http::HeaderValue) -> Option<&str> {
    std::str::from_utf8(value.as_bytes()).ok()
}

fn first_non_empty(headers: &HeaderMap, names: &[String]) -> Option<String> {
    names.iter().flat_map(|n| headers.get_all(n.as_str())).find_map(|v| {
        let v = text(v)?;
        (!v.is_empty()).then(|| v.to_owned())
    })
}

/// Reads the asserted identity; `None` when no username header is set.
pub fn identity_from_headers(config: &RequestHeaderConfig, headers: &HeaderMap) -> Option<UserInfo> {
    let name = first_non_empty(headers, &config.username_headers)?;
    let uid = first_non_empty(headers, &config.uid_headers);
    let groups = config
        .group_headers
        .iter()
        .flat_map(|n| headers.get_all(n.as_str()))
        .filter_map(text)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    let mut user = UserInfo { name, uid, groups, ..UserInfo::default() };
    for (header, value) in headers {
        let header = header.as_str();
        for prefix in &config.extra_headers_prefix {
            if header.len() > prefix.len() && header[..prefix.len()].eq_ignore_ascii_case(prefix) {
                if let Some(value) = text(value) {
                    let key = unescape_extra_key(&header[prefix.len()..]);
                    user.extra.entry(key).or_default().push(value.to_owned());
                }
            }
        }
    }
    Some(user)
}

impl Authenticator for RequestHeaderAuthenticator {
    fn authenticate(&self, credentials: Credentials<'_>) -> Result<Option<std::sync::Arc<UserInfo>>, AuthError> {
        if credentials.peer.leaf().is_none() {
            return Ok(None);
        }
        credentials.peer.verify(&self.config.verifier).map_err(AuthError::FrontProxy)?;
        if !self.config.allowed_names.is_empty() {
            let cn = &credentials.peer.subject().map_err(AuthError::FrontProxy)?.common_name;
            if !self.config.allowed_names.contains(cn) {
                return Err(AuthError::FrontProxy(format!("subject with cn={cn} is not in the allowed list")));
            }
        }
        Ok(identity_from_headers(&self.config, credentials.headers).map(std::sync::Arc::new))
    }
}

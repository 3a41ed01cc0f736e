//! kube's `audit.k8s.io/v1` `Event`, field for field, as one JSON line.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::auth::UserInfo;

/// How much of a request is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    None,
    Metadata,
    Request,
    RequestResponse,
}

impl Level {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "None" => Some(Level::None),
            "Metadata" => Some(Level::Metadata),
            "Request" => Some(Level::Request),
            "RequestResponse" => Some(Level::RequestResponse),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "None",
            Level::Metadata => "Metadata",
            Level::Request => "Request",
            Level::RequestResponse => "RequestResponse",
        }
    }
}

/// When in a request's life an event is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    RequestReceived,
    /// Only for long-running requests (watches, proxy, exec...): the response headers are
    /// sent but the body goes on.
    ResponseStarted,
    ResponseComplete,
    Panic,
}

/// kube's `MicroTime`: RFC 3339 in UTC with exactly six fractional digits.
pub fn micro_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// `authentication.k8s.io/v1` `UserInfo` as audit writes it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct User {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub username: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl From<&UserInfo> for User {
    fn from(u: &UserInfo) -> Self {
        Self { username: u.name.clone(), uid: u.uid.clone(), groups: u.groups.clone(), extra: u.extra.clone() }
    }
}

/// What a resource request is about.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub resource: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub api_group: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subresource: String,
}

/// The `metav1.Status` audit keeps of a response: the code, and for a Status answer its
/// status, message and reason.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct ResponseStatus {
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub code: u16,
}

/// One event.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub kind: &'static str,
    pub api_version: &'static str,
    pub level: Level,
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub stage: Stage,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    pub verb: String,
    pub user: User,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impersonated_user: Option<User>,
    #[serde(rename = "sourceIPs", skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_ref: Option<ObjectRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_status: Option<ResponseStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_object: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_object: Option<serde_json::Value>,
    pub request_received_timestamp: String,
    pub stage_timestamp: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<&'static str, String>,
}

/// kube truncates user agents past this (`maxUserAgentLength`).
const MAX_USER_AGENT_BYTES: usize = 1024;

/// The client's user agent, cut as kube cuts it.
pub fn user_agent(headers: &HeaderMap) -> Option<String> {
    let ua = headers.get(http::header::USER_AGENT)?;
    let ua = String::from_utf8_lossy(ua.as_bytes());
    if ua.len() <= MAX_USER_AGENT_BYTES {
        return Some(ua.into_owned());
    }
    let mut end = MAX_USER_AGENT_BYTES;
    while !ua.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}...TRUNCATED", &ua[..end]))
}

/// kube's `SourceIPs`: the `X-Forwarded-For` addresses, then `X-Real-Ip` unless already
/// listed, then the peer's address unless it is the last one.
pub fn source_ips(headers: &HeaderMap, remote: IpAddr) -> Vec<String> {
    let mut ips: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|ip| ip.trim().parse().ok())
        .collect();
    if let Some(real) = headers.get("x-real-ip").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()) {
        if !ips.contains(&real) {
            ips.push(real);
        }
    }
    if ips.last() != Some(&remote) {
        ips.push(remote);
    }
    ips.into_iter().map(|ip| ip.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_micro_times_in_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_714_557_600_123_456);
        assert_eq!(micro_time(t), "2024-05-01T10:00:00.123456Z");
        assert_eq!(micro_time(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn source_ips_are_kubes() {
        let mut h = HeaderMap::new();
        let remote: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(source_ips(&h, remote), ["10.0.0.9"]);
        h.insert("x-forwarded-for", "1.2.3.4, bogus, 10.0.0.9".parse().unwrap());
        h.insert("x-real-ip", "1.2.3.4".parse().unwrap());
        assert_eq!(source_ips(&h, remote), ["1.2.3.4", "10.0.0.9"]);
        h.insert("x-real-ip", "5.6.7.8".parse().unwrap());
        assert_eq!(source_ips(&h, remote), ["1.2.3.4", "10.0.0.9", "5.6.7.8", "10.0.0.9"]);
    }
}

//! Per-request limits, as kube-apiserver's filter chain applies them:
//!
//! - the request deadline (`WithRequestDeadline` and `WithTimeoutForNonLongRunningRequests`):
//!   `--request-timeout` (60 s), or the client's shorter `?timeout=`, for every request that is
//!   not long-running. It covers authentication, a slow request body (the backend cannot answer
//!   before it has it) and the response body; past it the client gets kube's 504 `Timeout`
//!   Status, or a reset stream when the response had already started;
//! - the in-flight limits (`WithMaxInFlightLimit`): `--max-requests-inflight` read-only and
//!   `--max-mutating-requests-inflight` mutating requests at once, long-running ones not
//!   counted, `system:masters` never refused. Past them: 429 with `Retry-After: 1`.
//!
//! Which requests are long-running or mutating comes from [`RequestInfo`], as in kube.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::request_info::RequestInfo;
use crate::auth::UserInfo;
use crate::status::RequestError;

pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_REQUESTS_INFLIGHT: usize = 400;
pub const DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT: usize = 200;
/// The group kube's in-flight filter always lets through, so an admin can still get in.
const GROUP_SYSTEM_MASTERS: &str = "system:masters";

/// `--request-timeout`, `--max-requests-inflight`, `--max-mutating-requests-inflight`.
#[derive(Debug, Clone)]
pub struct RequestLimitSettings {
    pub request_timeout: Duration,
    /// 0: no limit.
    pub max_requests_inflight: usize,
    /// 0: no limit.
    pub max_mutating_requests_inflight: usize,
}

impl Default for RequestLimitSettings {
    fn default() -> Self {
        Self {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_requests_inflight: DEFAULT_MAX_REQUESTS_INFLIGHT,
            max_mutating_requests_inflight: DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT,
        }
    }
}

/// What the limits need to know of a request, read once when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestClass {
    pub long_running: bool,
    pub mutating: bool,
    /// `None` for long-running requests.
    pub timeout: Option<Duration>,
    /// kube's metric verb (`GET`, `LIST`, `WATCH`, ..., `other`).
    pub verb: &'static str,
}

/// A metric label for the in-flight pools, as kube's `request_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    ReadOnly,
    Mutating,
}

impl RequestKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::ReadOnly => "readOnly",
            Self::Mutating => "mutating",
        }
    }
}

/// The in-flight pools and the deadline rule, shared by every connection.
#[derive(Debug)]
pub struct RequestLimits {
    settings: RequestLimitSettings,
    read_only: Option<Arc<Semaphore>>,
    mutating: Option<Arc<Semaphore>>,
}

impl RequestLimits {
    pub fn new(settings: RequestLimitSettings) -> Self {
        let pool = |n: usize| (n > 0).then(|| Arc::new(Semaphore::new(n)));
        Self {
            read_only: pool(settings.max_requests_inflight),
            mutating: pool(settings.max_mutating_requests_inflight),
            settings,
        }
    }

    /// Classifies a request; a `?timeout=` that does not parse is kube's 400. `also_long_running`
    /// adds to kube's check (an APIService's own long-running subresources).
    pub fn classify<B>(
        &self,
        request: &Request<B>,
        also_long_running: impl FnOnce(&RequestInfo<'_>) -> bool,
    ) -> Result<RequestClass, RequestError> {
        let uri = request.uri();
        let info = RequestInfo::parse(request.method(), uri.path(), uri.query());
        let long_running =
            info.is_long_running() || crate::proxy::is_upgrade(request.headers()) || also_long_running(&info);
        let timeout = if long_running { None } else { Some(self.timeout(uri.query())?) };
        let verb = info.metric_verb(request.headers().get(http::header::CONTENT_TYPE));
        Ok(RequestClass { long_running, mutating: info.is_mutating(), timeout, verb })
    }

    /// `--request-timeout`, or the client's `?timeout=` when it is positive and shorter.
    fn timeout(&self, query: Option<&str>) -> Result<Duration, RequestError> {
        let maximum = self.settings.request_timeout;
        let Some(value) =
            query.and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("timeout=")).filter(|v| !v.is_empty()))
        else {
            return Ok(maximum);
        };
        match parse_go_duration(value) {
            Ok(Some(d)) if !d.is_zero() && d < maximum => Ok(d),
            Ok(_) => Ok(maximum),
            Err(e) => Err(RequestError::BadRequest(format!("invalid timeout specified in the request URL - {e}"))),
        }
    }

    /// A place in the in-flight pool of its kind, or 429. Long-running requests take none.
    pub fn admit(&self, class: &RequestClass, user: &UserInfo) -> Result<Option<OwnedSemaphorePermit>, RequestKind> {
        if class.long_running {
            return Ok(None);
        }
        let (pool, kind) = if class.mutating {
            (&self.mutating, RequestKind::Mutating)
        } else {
            (&self.read_only, RequestKind::ReadOnly)
        };
        let Some(pool) = pool else { return Ok(None) };
        match pool.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) if user.groups.iter().any(|g| g == GROUP_SYSTEM_MASTERS) => Ok(None),
            Err(_) => Err(kind),
        }
    }

    /// Requests of each kind in flight now.
    pub fn in_flight(&self) -> [(RequestKind, usize); 2] {
        let used = |pool: &Option<Arc<Semaphore>>, max: usize| pool.as_ref().map_or(0, |p| max - p.available_permits());
        [
            (RequestKind::ReadOnly, used(&self.read_only, self.settings.max_requests_inflight)),
            (RequestKind::Mutating, used(&self.mutating, self.settings.max_mutating_requests_inflight)),
        ]
    }
}

/// Go's `time.ParseDuration`: a sequence of decimal numbers with units (`ns`, `us`, `µs`,
/// `ms`, `s`, `m`, `h`), optionally signed. `Ok(None)` for a negative duration.
pub fn parse_go_duration(text: &str) -> Result<Option<Duration>, String> {
    let invalid = || format!("time: invalid duration {text:?}");
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(Some(Duration::ZERO));
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number = &rest[..number_len];
        if number.is_empty() || number == "." {
            return Err(invalid());
        }
        let value: f64 = number.parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("time: missing unit in duration {text:?}")),
            unit => return Err(format!("time: unknown unit {unit:?} in duration {text:?}")),
        };
        rest = &rest[unit_len..];
        total += value * seconds_per_unit;
    }
    if negative {
        return Ok(None);
    }
    Duration::try_from_secs_f64(total).map(Some).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(limits: &RequestLimits, method: &str, url: &str) -> Result<RequestClass, RequestError> {
        let request = Request::builder().method(method).uri(url).body(()).unwrap();
        limits.classify(&request, |_| false)
    }

    #[test]
    fn go_durations_parse_as_go_parses_them() {
        let secs = |s: f64| Ok(Some(Duration::from_secs_f64(s)));
        assert_eq!(parse_go_duration("30s"), secs(30.0));
        assert_eq!(parse_go_duration("1m30s"), secs(90.0));
        assert_eq!(parse_go_duration("1.5h"), secs(5400.0));
        assert_eq!(parse_go_duration("250ms"), secs(0.25));
        assert_eq!(parse_go_duration("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse_go_duration("-5s"), Ok(None));
        assert!(parse_go_duration("5").unwrap_err().contains("missing unit"));
        assert!(parse_go_duration("5 days").is_err());
        assert!(parse_go_duration("").is_err());
    }

    #[test]
    fn the_deadline_is_the_request_timeout_or_a_shorter_client_timeout() {
        let limits = RequestLimits::new(RequestLimitSettings::default());
        let timeout = |url| class(&limits, "GET", url).unwrap().timeout;
        assert_eq!(timeout("/api/v1/pods"), Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(timeout("/api/v1/pods?timeout=5s"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("/api/v1/pods?limit=1&timeout=2m"), Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(timeout("/api/v1/pods?timeout=0s"), Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(timeout("/api/v1/pods?timeout=-1s"), Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(timeout("/api/v1/pods?watch=true&timeout=5s"), None);
        let err = class(&limits, "GET", "/api/v1/pods?timeout=soon").unwrap_err();
        assert_eq!(err.to_status().code, 400);
        assert!(err.to_string().starts_with("invalid timeout specified in the request URL - time: "), "{err}");
    }

    #[test]
    fn in_flight_pools_are_per_kind_skip_long_running_and_spare_system_masters() {
        let limits = RequestLimits::new(RequestLimitSettings {
            max_requests_inflight: 1,
            max_mutating_requests_inflight: 1,
            ..RequestLimitSettings::default()
        });
        let alice = UserInfo::new("alice", vec![]);
        let admin = UserInfo::new("admin", vec![GROUP_SYSTEM_MASTERS.into()]);
        let get = class(&limits, "GET", "/apis/g.io/v1/things").unwrap();
        let post = class(&limits, "POST", "/apis/g.io/v1/things").unwrap();
        let watch = class(&limits, "GET", "/apis/g.io/v1/things?watch=1").unwrap();
        let held = limits.admit(&get, &alice).unwrap();
        assert!(held.is_some());
        assert_eq!(limits.admit(&get, &alice).unwrap_err(), RequestKind::ReadOnly);
        let mutating = limits.admit(&post, &alice).unwrap();
        assert!(mutating.is_some(), "mutating requests have their own pool");
        assert_eq!(limits.admit(&post, &alice).unwrap_err(), RequestKind::Mutating);
        assert!(limits.admit(&watch, &alice).unwrap().is_none(), "watches are not counted");
        assert!(limits.admit(&get, &admin).is_ok(), "system:masters always gets in");
        assert_eq!(limits.in_flight()[0], (RequestKind::ReadOnly, 1));
        drop(held);
        assert!(limits.admit(&get, &alice).unwrap().is_some());
    }
}

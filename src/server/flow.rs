//! Per-APIService flow control: at most N requests in flight and a token bucket of R requests a
//! second (burst B) for one APIService, so one noisy client cannot take a fragile extension
//! server (metrics-server, say) down for everyone, as kube's priority-and-fairness protects
//! kube-apiserver. Past either, 429 with `Retry-After` and a `TooManyRequests` Status; other
//! APIServices are unaffected.
//!
//! Off unless asked for: by the APIService's annotations
//! (`kube-aggregation-proxy.io/max-requests-inflight`, `.../requests-per-second`,
//! `.../burst`) or for every APIService by `--apiservice-max-requests-inflight` and
//! `--apiservice-requests-per-second` / `--apiservice-burst`; an annotation wins. The state
//! of an APIService lives as long as its object does: a changed APIService starts afresh, a
//! removed one's state goes.

use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::apiservice::ApiService;

/// The flags: what every APIService gets when its annotations say nothing; 0 is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowDefaults {
    pub max_requests_inflight: u32,
    pub requests_per_second: u32,
    pub burst: u32,
}

/// Why a request was refused, with how long to wait.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowRefusal {
    #[error("too many requests in flight (at most {max}), please try again later")]
    InFlight { max: u32 },
    #[error("more than {per_second} requests a second, please try again later")]
    Rate { per_second: u32, retry_after: u32 },
}

impl FlowRefusal {
    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InFlight { .. } => "in-flight",
            Self::Rate { .. } => "rate",
        }
    }

    pub fn retry_after_seconds(&self) -> u32 {
        match self {
            Self::InFlight { .. } => 1,
            Self::Rate { retry_after, .. } => *retry_after,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    max_requests_inflight: Option<u32>,
    requests_per_second: Option<u32>,
    burst: u32,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Limiter {
    object: Weak<ApiService>,
    limits: Limits,
    in_flight: Option<Arc<Semaphore>>,
    bucket: Option<Mutex<Bucket>>,
}

/// Every APIService's limiter, made on its first request.
#[derive(Default)]
pub struct FlowControl {
    defaults: FlowDefaults,
    limiters: DashMap<Arc<str>, Arc<Limiter>>,
}

impl std::fmt::Debug for FlowControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowControl").field("defaults", &self.defaults).finish_non_exhaustive()
    }
}

impl FlowControl {
    pub fn new(defaults: FlowDefaults) -> Self {
        Self { defaults, limiters: DashMap::new() }
    }

    fn limits(&self, apiservice: &ApiService) -> Option<Limits> {
        let nonzero = |n: u32| (n > 0).then_some(n);
        let policy = &apiservice.policy;
        let max_requests_inflight = policy.max_requests_inflight.or(nonzero(self.defaults.max_requests_inflight));
        let requests_per_second = policy.requests_per_second.or(nonzero(self.defaults.requests_per_second));
        if max_requests_inflight.is_none() && requests_per_second.is_none() {
            return None;
        }
        // A rate from the annotations takes its burst from them too.
        let burst = if policy.requests_per_second.is_some() {
            policy.burst.or(policy.requests_per_second)
        } else {
            policy.burst.or(nonzero(self.defaults.burst)).or(requests_per_second)
        }
        .unwrap_or(1);
        Some(Limits { max_requests_inflight, requests_per_second, burst })
    }

    fn limiter(&self, apiservice: &Arc<ApiService>, limits: Limits) -> Arc<Limiter> {
        if let Some(limiter) = self.limiters.get(&apiservice.name) {
            if limiter.limits == limits && limiter.object.ptr_eq(&Arc::downgrade(apiservice)) {
                return limiter.clone();
            }
        }
        // A new or changed APIService: drop the state of those whose objects are gone.
        self.limiters.retain(|_, l| l.object.strong_count() > 0);
        let limiter = Arc::new(Limiter {
            object: Arc::downgrade(apiservice),
            limits,
            in_flight: limits.max_requests_inflight.map(|n| Arc::new(Semaphore::new(n as usize))),
            bucket: limits
                .requests_per_second
                .map(|_| Mutex::new(Bucket { tokens: f64::from(limits.burst), last: Instant::now() })),
        });
        self.limiters.insert(apiservice.name.clone(), limiter.clone());
        limiter
    }

    /// Admits a request to `apiservice`, or says why not. The permit, when there is one, is
    /// held until the response is done. Long-running requests take a token but no in-flight
    /// place, as in kube's limits.
    pub fn admit(
        &self,
        apiservice: &Arc<ApiService>,
        long_running: bool,
    ) -> Result<Option<OwnedSemaphorePermit>, FlowRefusal> {
        let Some(limits) = self.limits(apiservice) else { return Ok(None) };
        let limiter = self.limiter(apiservice, limits);
        if let (Some(bucket), Some(rate)) = (&limiter.bucket, limits.requests_per_second) {
            let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(bucket.last).as_secs_f64() * f64::from(rate);
            bucket.tokens = (bucket.tokens + refill).min(f64::from(limits.burst));
            bucket.last = now;
            if bucket.tokens < 1.0 {
                let wait = ((1.0 - bucket.tokens) / f64::from(rate)).ceil().max(1.0);
                return Err(FlowRefusal::Rate { per_second: rate, retry_after: wait as u32 });
            }
            bucket.tokens -= 1.0;
        }
        match (&limiter.in_flight, long_running) {
            (Some(pool), false) => match pool.clone().try_acquire_owned() {
                Ok(permit) => Ok(Some(permit)),
                Err(_) => Err(FlowRefusal::InFlight { max: limits.max_requests_inflight.unwrap_or_default() }),
            },
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiservice::testing::apiservice;

    fn with_policy(f: impl FnOnce(&mut crate::apiservice::TrafficPolicy)) -> Arc<ApiService> {
        let mut a = apiservice("v1.m.io", 100, 10, Some("m"));
        f(&mut a.policy);
        Arc::new(a)
    }

    #[test]
    fn nothing_is_limited_unless_asked_for() {
        let flow = FlowControl::default();
        let a = with_policy(|_| {});
        for _ in 0..1000 {
            assert_eq!(flow.admit(&a, false).unwrap().map(|_| ()), None);
        }
    }

    #[test]
    fn in_flight_places_are_bounded_per_apiservice_and_come_back() {
        let flow = FlowControl::default();
        let a = with_policy(|p| p.max_requests_inflight = Some(2));
        let b = Arc::new(apiservice("v1.other.io", 100, 10, Some("o")));
        let first = flow.admit(&a, false).unwrap();
        let _second = flow.admit(&a, false).unwrap();
        assert_eq!(flow.admit(&a, false).unwrap_err(), FlowRefusal::InFlight { max: 2 });
        assert!(flow.admit(&a, true).is_ok(), "long-running requests take no place");
        assert!(flow.admit(&b, false).is_ok(), "other APIServices are unaffected");
        drop(first);
        assert!(flow.admit(&a, false).is_ok());
    }

    #[test]
    fn the_token_bucket_allows_a_burst_then_the_rate() {
        let flow = FlowControl::new(FlowDefaults { requests_per_second: 2, burst: 3, ..FlowDefaults::default() });
        let a = with_policy(|_| {});
        for _ in 0..3 {
            assert!(flow.admit(&a, false).is_ok());
        }
        let refused = flow.admit(&a, false).unwrap_err();
        assert_eq!(refused, FlowRefusal::Rate { per_second: 2, retry_after: 1 });
        assert_eq!(refused.retry_after_seconds(), 1);
        // An annotation wins over the flags.
        let own = with_policy(|p| p.requests_per_second = Some(100));
        for _ in 0..50 {
            assert!(flow.admit(&own, false).is_ok());
        }
    }

    #[test]
    fn a_changed_apiservice_starts_afresh_and_a_removed_ones_state_goes() {
        let flow = FlowControl::default();
        let a = with_policy(|p| p.max_requests_inflight = Some(1));
        let _held = flow.admit(&a, false).unwrap();
        assert!(flow.admit(&a, false).is_err());
        let changed = with_policy(|p| p.max_requests_inflight = Some(1));
        assert!(flow.admit(&changed, false).is_ok(), "another object: fresh state");
        drop(a);
        let other = Arc::new({
            let mut o = apiservice("v1.z.io", 100, 10, Some("z"));
            o.policy.max_requests_inflight = Some(1);
            o
        });
        let _ = flow.admit(&other, false);
        assert_eq!(flow.limiters.len(), 2, "the dropped object's state went");
    }
}

//! Choosing an endpoint, and keeping a failing one out.
//!
//! Power of two choices over peak-EWMA latency weighted by requests in flight (as linkerd2-proxy
//! and Finagle balance): two endpoints drawn at random, the one with the lower
//! `latency x (in flight + 1)` wins. Peak-EWMA jumps to a slow answer at once and decays back
//! over [`DECAY`], so a slowing endpoint sheds load before it times out.
//!
//! Ejection: an endpoint that fails [`EJECT_AFTER`] times in a row (a connection that cannot be
//! made or breaks, a 5xx) is left out for a backoff that doubles with each ejection in a row,
//! from [`EJECT_BASE`] up to [`EJECT_MAX`]; then real traffic probes it back in and its first
//! success clears its record. When every endpoint is ejected the balancer still picks one (the
//! one whose ejection ends first): failing open beats refusing everything.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::endpoint::Endpoint;

/// How fast peak-EWMA forgets a slow answer.
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed of an endpoint not measured yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
pub const EJECT_AFTER: u32 = 5;
pub const EJECT_BASE: Duration = Duration::from_secs(1);
pub const EJECT_MAX: Duration = Duration::from_secs(30);

/// What the balancer knows of one endpoint. Lock-free: every request updates it.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    /// Peak-EWMA of the time to response headers, in nanoseconds.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, nanoseconds after `epoch`.
    updated_ns: AtomicU64,
    pub(super) in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    ejections_in_a_row: AtomicU32,
    /// Milliseconds after `epoch` until which the endpoint is left out; 0 when it is not.
    ejected_until_ms: AtomicU64,
}

/// What one outcome did to an endpoint's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Kept,
    /// Ejected now, for this long.
    Ejected(Duration),
}

impl Default for Health {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            ewma_ns: AtomicU64::new(DEFAULT_RTT.as_nanos() as u64),
            updated_ns: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections_in_a_row: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }
}

impl Health {
    fn since_epoch(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch)
    }

    /// Records a response's latency, and whether it counts as a failure (a 5xx).
    pub fn observe(&self, latency: Duration, failed: bool) -> Verdict {
        let now = self.since_epoch(Instant::now()).as_nanos() as u64;
        let rtt = latency.as_nanos() as u64;
        let last = self.updated_ns.swap(now, Ordering::Relaxed);
        let ewma = self.ewma_ns.load(Ordering::Relaxed);
        let next = if rtt > ewma {
            rtt
        } else {
            let w = (-((now.saturating_sub(last)) as f64) / DECAY.as_nanos() as f64).exp();
            (ewma as f64 * w + rtt as f64 * (1.0 - w)) as u64
        };
        self.ewma_ns.store(next.max(1), Ordering::Relaxed);
        if failed {
            self.failure()
        } else {
            self.success();
            Verdict::Kept
        }
    }

    pub fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections_in_a_row.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; the [`EJECT_AFTER`]th in a row ejects the endpoint.
    pub fn failure(&self) -> Verdict {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < EJECT_AFTER {
            return Verdict::Kept;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let n = self.ejections_in_a_row.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = (EJECT_BASE * 2u32.pow(n)).min(EJECT_MAX);
        let until = self.since_epoch(Instant::now()) + backoff;
        self.ejected_until_ms.store(until.as_millis() as u64, Ordering::Relaxed);
        Verdict::Ejected(backoff)
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > self.since_epoch(now).as_millis() as u64
    }

    fn ejected_until_ms(&self) -> u64 {
        self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// The balancer's cost: latency times the load it would add to. The latency decays with
    /// the time since it was last measured, so an endpoint that stopped getting traffic (it
    /// was slow once) is tried again, as linkerd2-proxy's peak-EWMA does.
    fn cost(&self, now: Instant) -> u64 {
        let ewma = self.ewma_ns.load(Ordering::Relaxed) as f64;
        let since = self.since_epoch(now).as_nanos() as f64 - self.updated_ns.load(Ordering::Relaxed) as f64;
        let decayed = ewma * (-(since.max(0.0)) / DECAY.as_nanos() as f64).exp();
        (decayed as u64).saturating_mul(u64::from(self.in_flight.load(Ordering::Relaxed)) + 1)
    }
}

/// The endpoints of one service, as the routing table resolved them. Never empty.
#[derive(Debug)]
pub struct Endpoints {
    list: Vec<Arc<Endpoint>>,
}

impl Endpoints {
    /// `None` when there are no endpoints.
    pub fn new(list: Vec<Arc<Endpoint>>) -> Option<Self> {
        (!list.is_empty()).then_some(Self { list })
    }

    pub fn all(&self) -> &[Arc<Endpoint>] {
        &self.list
    }

    /// The endpoint for the next request.
    pub fn pick(&self) -> &Arc<Endpoint> {
        self.pick_excluding(None)
    }

    /// An endpoint other than `not` when there is one (for a retry).
    pub fn pick_other(&self, not: &Arc<Endpoint>) -> &Arc<Endpoint> {
        self.pick_excluding(Some(not))
    }

    fn pick_excluding(&self, not: Option<&Arc<Endpoint>>) -> &Arc<Endpoint> {
        if self.list.len() == 1 {
            return &self.list[0];
        }
        let now = Instant::now();
        let eligible = |e: &Arc<Endpoint>| !e.health().is_ejected(now) && not.is_none_or(|n| !Arc::ptr_eq(n, e));
        let mut rng = rand::rng();
        let healthy = self.list.iter().filter(|e| eligible(e)).count();
        if healthy == 0 {
            // Everything is out: the one coming back first, avoiding `not` if possible.
            return self
                .list
                .iter()
                .filter(|e| not.is_none_or(|n| !Arc::ptr_eq(n, e)))
                .min_by_key(|e| e.health().ejected_until_ms())
                .unwrap_or(&self.list[0]);
        }
        let nth = |i: usize| self.list.iter().filter(|e| eligible(e)).nth(i);
        let a = rng.random_range(0..healthy);
        let b = if healthy > 1 { (a + rng.random_range(1..healthy)) % healthy } else { a };
        match (nth(a), nth(b)) {
            (Some(x), Some(y)) => {
                if y.health().cost(now) < x.health().cost(now) {
                    y
                } else {
                    x
                }
            }
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => &self.list[0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_to_a_slow_answer_and_decays_back() {
        let h = Health::default();
        h.observe(Duration::from_millis(100), false);
        assert_eq!(h.ewma_ns.load(Ordering::Relaxed), 100_000_000);
        // An immediate fast answer barely moves it (no time to decay).
        h.observe(Duration::from_millis(1), false);
        assert!(h.ewma_ns.load(Ordering::Relaxed) > 99_000_000);
        // Long after, a fast answer pulls it most of the way down.
        h.updated_ns.store(0, Ordering::Relaxed);
        let h2 = Health { epoch: Instant::now() - Duration::from_secs(60), ..Health::default() };
        h2.ewma_ns.store(100_000_000, Ordering::Relaxed);
        h2.observe(Duration::from_millis(1), false);
        assert!(h2.ewma_ns.load(Ordering::Relaxed) < 10_000_000);
    }

    #[test]
    fn five_failures_in_a_row_eject_with_a_doubling_backoff_and_a_success_forgives() {
        let h = Health::default();
        for _ in 0..EJECT_AFTER - 1 {
            assert_eq!(h.failure(), Verdict::Kept);
        }
        assert_eq!(h.failure(), Verdict::Ejected(EJECT_BASE));
        assert!(h.is_ejected(Instant::now()));
        for _ in 0..EJECT_AFTER - 1 {
            h.failure();
        }
        assert_eq!(h.failure(), Verdict::Ejected(EJECT_BASE * 2));
        h.success();
        for _ in 0..EJECT_AFTER - 1 {
            h.failure();
        }
        assert_eq!(h.failure(), Verdict::Ejected(EJECT_BASE), "a success resets the backoff");
        assert!(!h.is_ejected(Instant::now() + EJECT_BASE * 3));
    }
}

//! The accept loop and who may hold a connection.
//!
//! Every connection needs a permit before anything is read from it: one from the global
//! `--max-connections` budget and one from its client address's `--max-connections-per-client`
//! share. A connection past either is closed at once and counted; one address cannot take the
//! whole budget, and the budget stays below the process's file-descriptor limit so the proxy
//! never runs out of descriptors for its own backend connections and files.
//!
//! When accept fails anyway (out of descriptors, out of memory), the loop backs off
//! exponentially up to a second and logs at most once a second, with the count of what it did
//! not log. The connections it already has keep being served: they live in their own tasks.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept out of the connection budget for backend connections, files and the
/// runtime itself.
const RESERVED_FDS: usize = 256;
/// The smallest connection budget the descriptor limit may shrink `--max-connections` to.
const MIN_CONNECTIONS: usize = 16;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why a connection was turned away; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    MaxConnectionsPerClient,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::MaxConnections => "max-connections",
            Self::MaxConnectionsPerClient => "max-connections-per-client",
        }
    }
}

/// The connection budget, global and per client address.
pub struct ConnectionLimits {
    total: Arc<Semaphore>,
    max_total: usize,
    per_client: Option<usize>,
    clients: Arc<DashMap<IpAddr, usize>>,
}

/// Held by a connection for its whole life; returns both shares when dropped.
pub struct ConnectionPermit {
    _total: OwnedSemaphorePermit,
    client: Option<(IpAddr, Arc<DashMap<IpAddr, usize>>)>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some((ip, clients)) = self.client.take() {
            // Entries leave the map with their last connection, so it holds only live clients.
            clients.remove_if_mut(&ip, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

impl ConnectionLimits {
    /// `max_connections` as configured, lowered to fit under `fd_limit` when one is known;
    /// `per_client` 0 means no per-client bound.
    pub fn new(max_connections: usize, per_client: usize, fd_limit: Option<usize>) -> Self {
        let max_total = effective_max_connections(max_connections, fd_limit);
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            per_client: (per_client > 0).then_some(per_client),
            clients: Arc::default(),
        }
    }

    /// The global budget in force (after fitting it under the descriptor limit).
    pub fn max_connections(&self) -> usize {
        self.max_total
    }

    pub fn open(&self) -> usize {
        self.max_total - self.total.available_permits()
    }

    /// A permit for a new connection from `ip`, or why there is none.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        let total = self.total.clone().try_acquire_owned().map_err(|_| Refusal::MaxConnections)?;
        let Some(limit) = self.per_client else { return Ok(ConnectionPermit { _total: total, client: None }) };
        let mut entry = self.clients.entry(ip).or_insert(0);
        if *entry >= limit {
            return Err(Refusal::MaxConnectionsPerClient);
        }
        *entry += 1;
        drop(entry);
        Ok(ConnectionPermit { _total: total, client: Some((ip, self.clients.clone())) })
    }

    /// Resolves once every connection has given its permit back, or after `grace`.
    pub async fn drained(&self, grace: Duration) -> bool {
        let all = u32::try_from(self.max_total).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.total.acquire_many(all)).await.is_ok()
    }
}

fn effective_max_connections(configured: usize, fd_limit: Option<usize>) -> usize {
    match fd_limit {
        Some(limit) if limit.saturating_sub(RESERVED_FDS) < configured => {
            let fitted = limit.saturating_sub(RESERVED_FDS).max(MIN_CONNECTIONS).min(configured);
            tracing::info!(
                max_connections = fitted,
                configured,
                fd_limit = limit,
                "max-connections lowered to fit under the open-file limit"
            );
            fitted
        }
        _ => configured,
    }
}

/// The soft open-file limit of this process, from `/proc/self/limits` (Linux).
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Exponential backoff for a failing accept, reset by the next success.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { next: ACCEPT_BACKOFF_MIN }
    }
}

impl AcceptBackoff {
    pub fn reset(&mut self) {
        self.next = ACCEPT_BACKOFF_MIN;
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(ACCEPT_BACKOFF_MAX);
        delay
    }
}

/// Lets a log line through at most once per interval and counts the ones held back, so a
/// flood of the same event costs one line a second, never a busy log.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub fn per_second() -> Self {
        Self { interval: Duration::from_secs(1), last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were held back since the
    /// last one that was.
    pub fn check(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn permits_are_bounded_globally_and_per_client_and_come_back_on_drop() {
        let limits = ConnectionLimits::new(3, 2, None);
        let a1 = limits.admit(A).unwrap();
        let _a2 = limits.admit(A).unwrap();
        assert_eq!(limits.admit(A).err(), Some(Refusal::MaxConnectionsPerClient));
        let _b1 = limits.admit(B).unwrap();
        assert_eq!(limits.admit(B).err(), Some(Refusal::MaxConnections));
        assert_eq!(limits.open(), 3);
        drop(a1);
        assert_eq!(limits.open(), 2);
        let _a3 = limits.admit(A).unwrap();
        assert_eq!(limits.clients.len(), 2);
    }

    #[test]
    fn a_clients_entry_leaves_with_its_last_connection() {
        let limits = ConnectionLimits::new(10, 5, None);
        let permits: Vec<_> = (0..3).map(|_| limits.admit(A).unwrap()).collect();
        assert_eq!(*limits.clients.get(&A).unwrap(), 3);
        drop(permits);
        assert!(limits.clients.is_empty());
    }

    #[test]
    fn the_budget_fits_under_the_descriptor_limit() {
        assert_eq!(effective_max_connections(10_000, Some(1024)), 1024 - RESERVED_FDS);
        assert_eq!(effective_max_connections(100, Some(1024)), 100);
        assert_eq!(effective_max_connections(10_000, Some(100)), MIN_CONNECTIONS);
        assert_eq!(effective_max_connections(10_000, None), 10_000);
        assert!(open_file_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn the_accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(delays[1], ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(*delays.last().unwrap(), ACCEPT_BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next_delay(), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn a_throttled_log_passes_once_per_interval_and_counts_the_rest() {
        let t = LogThrottle::per_second();
        assert_eq!(t.check(), Some(0));
        assert_eq!(t.check(), None);
        assert_eq!(t.check(), None);
        *t.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(t.check(), Some(2));
    }
}

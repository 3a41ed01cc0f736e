//! Availability: this proxy's own view of whether each remote APIService answers, as
//! kube-aggregator's availability controller computes the `Available` condition.
//!
//! Every 30 s each APIService is probed (through the backend layer, once per endpoint:
//! [`round`]; [`probe::check`] step by step where the backend is not reachable), and after a routing-table change
//! the new or changed ones, at most [`MAX_CONCURRENT_PROBES`] at a time; the result is kept as a condition (status, kube's reason, message, last
//! transition), exported as `aggregator_unavailable_apiservice{name}` (and each update that
//! leaves it unavailable as `aggregator_unavailable_apiservice_total{name,reason}`) and shown on
//! `/debug/apiservices`. A flip is logged once. Unlike kube-aggregator, availability does not
//! gate routing: a request to an unavailable backend still gets the real, current error.

pub mod probe;
pub mod round;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use futures_util::StreamExt;
use serde::Serialize;

use crate::apiservice::ApiService;
use crate::backend::BackendSettings;
use crate::metrics::Metrics;
use crate::routing::writer::SharedTable;
use crate::routing::{Route, RoutingTable, Upstream};
pub use probe::{Reason, Report};

/// kube-aggregator re-checks every APIService every 30 s.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How often the loop looks for a new routing table.
const TABLE_POLL: Duration = Duration::from_millis(250);

/// The `Available` condition of one APIService, as this proxy sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub status: &'static str,
    pub reason: Reason,
    pub message: String,
    /// Seconds since the Unix epoch of the last change of `status`.
    pub last_transition_time: u64,
}

/// Conditions by APIService name.
#[derive(Debug, Default)]
pub struct Availability {
    conditions: DashMap<String, Condition>,
    /// Bumped whenever a condition appears, changes or goes: readers that present the
    /// conditions (the apiregistration API) rebuild only then.
    version: std::sync::atomic::AtomicU64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Availability {
    pub fn condition(&self, name: &str) -> Option<Condition> {
        self.conditions.get(name).map(|c| c.clone())
    }

    /// Changes whenever any condition does.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    fn changed(&self) {
        self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    fn record(&self, report: &Report, metrics: &Metrics) {
        let status = if report.available { "True" } else { "False" };
        let mut transition = now();
        if let Some(previous) = self.conditions.get(&report.apiservice) {
            if previous.status == status {
                transition = previous.last_transition_time;
            } else {
                tracing::info!(apiservice = %report.apiservice, from = previous.status, to = status, reason = ?report.reason, message = %report.message, "APIService availability changed");
            }
        } else if !report.available {
            tracing::warn!(apiservice = %report.apiservice, reason = ?report.reason, message = %report.message, "APIService unavailable");
        }
        metrics.set_unavailable(&report.apiservice, !report.available);
        let same = self
            .conditions
            .get(&report.apiservice)
            .is_some_and(|c| c.status == status && c.reason == report.reason && c.message == report.message);
        if !same {
            self.changed();
            // kube's availability controller counts every status update that leaves the
            // APIService unavailable, by the condition's reason.
            if !report.available {
                metrics.unavailable_transition(&report.apiservice, report.reason.as_str());
            }
        }
        self.conditions.insert(
            report.apiservice.clone(),
            Condition {
                status,
                reason: report.reason,
                message: report.message.clone(),
                last_transition_time: transition,
            },
        );
    }

    fn forget_except(&self, keep: &HashSet<String>, metrics: &Metrics) {
        let mut forgot = false;
        self.conditions.retain(|name, _| {
            let kept = keep.contains(name);
            if !kept {
                metrics.forget_apiservice(name, &Reason::ALL.map(Reason::as_str));
                forgot = true;
            }
            kept
        });
        if forgot {
            self.changed();
        }
    }
}

/// Probes running at once: a large table must not open thousands of connections together.
pub const MAX_CONCURRENT_PROBES: usize = 16;

/// Probes the APIServices of the table that `select` picks, at most
/// [`MAX_CONCURRENT_PROBES`] at a time, and forgets those no longer in the table.
pub async fn check_selected(
    table: &RoutingTable,
    select: impl Fn(&Route) -> bool,
    settings: &BackendSettings,
    availability: &Availability,
    metrics: &Metrics,
) {
    let mut names = HashSet::new();
    let mut selected: Vec<Arc<Route>> = Vec::new();
    for route in table.groups().iter().flat_map(|g| &g.versions) {
        names.insert(route.apiservice.name.to_string());
        if select(route) {
            selected.push(route.clone());
        }
    }
    // Each probe's future is made when a slot frees up, not all up front: at 10,000
    // APIServices, 10,000 pending futures held tens of MiB. Reachable backends are asked
    // through the backend layer, once per endpoint ([`round`]); the rest get the step-by-step
    // probe, which says what is missing (service, port, endpoints, TLS configuration).
    let round = round::Round::default();
    let round = &round;
    let probes = futures_util::stream::iter(selected).map(|route: Arc<Route>| async move {
        match &route.upstream {
            Upstream::Remote(remote) => match (&remote.backend, &remote.endpoints) {
                (Ok(_), Ok(endpoints)) => round.check(&route.apiservice, endpoints).await,
                // A caBundle that does not parse and the like: no request can be made.
                (Err(e), _) => Report::failed(&route.apiservice, Reason::FailedDiscoveryCheck, e.to_string()),
                (Ok(_), Err(unresolved)) => probe::check(&route.apiservice, Err(unresolved.clone()), settings).await,
            },
            Upstream::Local => probe::check(&route.apiservice, Ok(Vec::new()), settings).await,
        }
    });
    let mut reports = probes.buffer_unordered(MAX_CONCURRENT_PROBES);
    while let Some(report) = reports.next().await {
        availability.record(&report, metrics);
    }
    availability.forget_except(&names, metrics);
}

/// Runs until the process ends: every APIService every [`RECHECK_INTERVAL`]; after a
/// routing-table change, only the APIServices that are new or changed.
pub async fn run(
    table: SharedTable,
    settings: BackendSettings,
    availability: Arc<Availability>,
    metrics: Arc<Metrics>,
) {
    let mut checked: Option<Arc<RoutingTable>> = None;
    let mut last_full = tokio::time::Instant::now();
    loop {
        let current = table.load_full();
        if current.generation > 0 {
            let due = checked.is_none() || last_full.elapsed() >= RECHECK_INTERVAL;
            if due {
                check_selected(&current, |_| true, &settings, &availability, &metrics).await;
                last_full = tokio::time::Instant::now();
                checked = Some(current);
            } else if checked.as_ref().is_some_and(|c| c.generation != current.generation) {
                let before: HashSet<&Arc<ApiService>> =
                    checked.as_deref().map(|c| c.apiservices().iter().collect()).unwrap_or_default();
                check_selected(&current, |r| !before.contains(&r.apiservice), &settings, &availability, &metrics).await;
                checked = Some(current);
            }
        }
        tokio::time::sleep(TABLE_POLL).await;
    }
}

//! The single writer of the routing table.
//!
//! Sources publish complete snapshots on a `watch` channel, which keeps only the newest: a
//! burst of changes coalesces into one rebuild. The writer builds the new table off the request
//! path, swaps it in only when its inputs differ, and marks the proxy ready after the first.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{Inputs, RoutingTable, ServiceResolver};
use crate::apiservice::ApiService;
use crate::backend::Backends;
use crate::metrics::Metrics;

/// Everything a table is built from, as one source saw it at one moment.
#[derive(Clone)]
pub struct Snapshot {
    /// Shared with the source's own state and the tables built from it.
    pub apiservices: Vec<Arc<ApiService>>,
    pub resolver: Arc<dyn ServiceResolver>,
}

/// The published table, shared by every request.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// Runs until the snapshot channel closes.
pub async fn run(
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    table: SharedTable,
    backends: Arc<Backends>,
    ready: watch::Sender<bool>,
    metrics: Arc<Metrics>,
) {
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        if let Some(snapshot) = snapshot {
            apply(&snapshot, &table, &backends, &metrics);
            ready.send_replace(true);
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// Builds and swaps in a table for `snapshot`, unless the serving table already matches it.
/// Returns whether a new table was published. Services are resolved once, for both the
/// comparison and the build.
pub fn apply(snapshot: &Snapshot, table: &SharedTable, backends: &Backends, metrics: &Metrics) -> bool {
    let current = table.load();
    let started = std::time::Instant::now();
    let inputs = Inputs::resolve(&snapshot.apiservices, snapshot.resolver.as_ref());
    if current.generation > 0 && current.is_built_from_inputs(&inputs) {
        return false;
    }
    let mut next = RoutingTable::from_inputs(inputs, backends, metrics.apiservice_requests());
    next.generation = current.generation + 1;
    let next = Arc::new(next);
    let count = next.apiservices().len();
    let generation = next.generation;
    table.store(next.clone());
    backends.retain(next.backends_in_use());
    // An APIService that left the table takes its request series with it.
    metrics.apiservice_requests().retain(|name| next.has_apiservice(name));
    metrics.table_rebuilt(count, started.elapsed());
    tracing::info!(generation, apiservices = count, elapsed = ?started.elapsed(), "routing table updated");
    true
}

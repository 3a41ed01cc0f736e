//! Cluster mode: kube-apiserver's own discovery and OpenAPI documents, fetched in the
//! background and handed to the [`Fetcher`](super::Fetcher) as [`DelegateDiscovery`], so the
//! merged `/apis` and `/openapi/*` documents include the built-in and CRD groups.
//!
//! Fetched at start, every 30 s, and whenever the routing table changes (a new CRD or local
//! APIService); a failed fetch keeps the last good documents.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use tokio::sync::watch;

use super::aggregated::{ApiGroupDiscoveryList, CONTENT_TYPE_AGGREGATED_V2};
use super::fetcher::{decode, DelegateDiscovery, FetchError, Http};
use super::openapi::v3_root_paths;
use crate::backend::Endpoint;
use crate::routing::writer::SharedTable;

const REFRESH: Duration = Duration::from_secs(30);
const TABLE_POLL: Duration = Duration::from_millis(250);
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

async fn fetch_json<T: serde::de::DeserializeOwned>(http: &Http, path: &str, accept: &str) -> Result<T, FetchError> {
    let (status, _, body) = tokio::time::timeout(FETCH_TIMEOUT, http.get(path, accept, None))
        .await
        .map_err(|_| FetchError::Timeout(FETCH_TIMEOUT))??;
    if status != StatusCode::OK {
        return Err(FetchError::Status { path: path.to_owned(), code: status });
    }
    decode(path, &body)
}

/// Fetches what it can; each document that fails keeps its previous value.
async fn fetch(http: &Http, previous: &DelegateDiscovery) -> DelegateDiscovery {
    let mut next = previous.clone();
    match fetch_json::<ApiGroupDiscoveryList>(http, "/apis", CONTENT_TYPE_AGGREGATED_V2).await {
        Ok(list) => next.apis = Some(Arc::new(list)),
        Err(e) => tracing::warn!(error = %e, "delegate aggregated discovery unavailable; keeping the last"),
    }
    match fetch_json::<Value>(http, "/openapi/v2", "application/json").await {
        Ok(spec) => next.openapi_v2 = Some(Arc::new(spec)),
        Err(e) => tracing::warn!(error = %e, "delegate OpenAPI v2 unavailable; keeping the last"),
    }
    match fetch_json::<Value>(http, "/openapi/v3", "application/json").await {
        Ok(root) => next.openapi_v3_paths = v3_root_paths(&root),
        Err(e) => tracing::warn!(error = %e, "delegate OpenAPI v3 index unavailable; keeping the last"),
    }
    next
}

/// Runs until `tx` has no receivers; `attempted` turns true after the first round of fetches,
/// successful or not, so readiness never waits on a delegate that is down.
pub async fn run(
    endpoint: Arc<Endpoint>,
    table: SharedTable,
    tx: watch::Sender<Arc<DelegateDiscovery>>,
    attempted: watch::Sender<bool>,
) {
    let http = Http { endpoint };
    let mut fetched_generation = None;
    let mut last_fetch = tokio::time::Instant::now();
    loop {
        if tx.is_closed() {
            return;
        }
        let generation = table.load().generation;
        if Some(generation) != fetched_generation || last_fetch.elapsed() >= REFRESH {
            let previous = tx.borrow().clone();
            let next = fetch(&http, &previous).await;
            tx.send_if_modified(|current| {
                let changed = **current != next;
                if changed {
                    *current = Arc::new(next);
                }
                changed
            });
            fetched_generation = Some(generation);
            last_fetch = tokio::time::Instant::now();
            attempted.send_replace(true);
        }
        tokio::time::sleep(TABLE_POLL).await;
    }
}

//! One round of the background availability loop, through the backend layer.
//!
//! kube-aggregator's controller sends `GET /apis/<group>/<version>` for every APIService; with
//! 10,000 APIServices on one extension server that is 10,000 requests (and, with a connection
//! per probe, 10,000 TLS handshakes) a round. Here each endpoint is asked once a round for its
//! `/apis` group list, on the connections requests use (so health and traffic agree), and
//! every APIService it serves is decided from that one answer. An endpoint whose `/apis` does
//! not list a group-version (or does not answer it) is asked `/apis/<group>/<version>`
//! itself, as kube does. The step-by-step probe of the `check` command is [`super::probe`].

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use dashmap::DashMap;
use http::header::ACCEPT;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::sync::OnceCell;

use super::probe::{Reason, Report, PROBE_GROUP, PROBE_TIMEOUT, PROBE_USER};
use crate::apiservice::ApiService;
use crate::auth::identity::{inject, UserInfo};
use crate::backend::{Endpoint, Endpoints, SendOptions};

/// The largest `/apis` document read.
const MAX_GROUP_LIST_BYTES: usize = 8 << 20;

/// What one endpoint's `/apis` said: its group-versions, or why there are none.
type Served = Result<HashSet<String>, String>;

/// The answers of one round, one per endpoint, shared by the APIServices it serves.
#[derive(Default)]
pub struct Round {
    served: DashMap<usize, Arc<OnceCell<Arc<Served>>>>,
}

#[derive(serde::Deserialize)]
struct GroupList {
    #[serde(default)]
    groups: Vec<Group>,
}

#[derive(serde::Deserialize)]
struct Group {
    #[serde(default)]
    versions: Vec<GroupVersion>,
}

#[derive(serde::Deserialize)]
struct GroupVersion {
    #[serde(rename = "groupVersion", default)]
    group_version: String,
}

/// `GET path` as the probe user through `endpoint`, within the probe timeout.
async fn get(endpoint: &Arc<Endpoint>, path: &str) -> Result<(StatusCode, Bytes), String> {
    let mut request =
        Request::get(path).header(ACCEPT, "application/json").body(Body::empty()).map_err(|e| e.to_string())?;
    // A fixed ASCII identity: it always fits in a header.
    let _ = inject(&UserInfo::new(PROBE_USER, vec![PROBE_GROUP.to_owned()]), request.headers_mut());
    let opts =
        SendOptions { deadline: Some(tokio::time::Instant::now() + PROBE_TIMEOUT), long_running: false, report: false };
    let read = async {
        let response = endpoint.send(request, &opts).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_GROUP_LIST_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading {path}: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(PROBE_TIMEOUT, read).await.map_err(|_| format!("no answer within {PROBE_TIMEOUT:?}"))?
}

impl Round {
    /// The endpoint's `/apis`, fetched by the first APIService that asks this round.
    async fn served(&self, endpoint: &Arc<Endpoint>) -> Arc<Served> {
        let cell = self.served.entry(Arc::as_ptr(endpoint) as usize).or_default().clone();
        cell.get_or_init(|| async {
            Arc::new(match get(endpoint, "/apis").await {
                Ok((status, body)) if status.is_success() => serde_json::from_slice::<GroupList>(&body)
                    .map(|list| list.groups.into_iter().flat_map(|g| g.versions).map(|v| v.group_version).collect())
                    .map_err(|e| format!("/apis: {e}")),
                Ok((status, _)) => Err(format!("/apis: {}", status.as_u16())),
                Err(e) => Err(e),
            })
        })
        .await
        .clone()
    }

    /// Checks a remote APIService on its endpoints: available when one of them serves it.
    pub async fn check(&self, apiservice: &ApiService, endpoints: &Endpoints) -> Report {
        let group_version = format!("{}/{}", apiservice.group, apiservice.version);
        let path = format!("/apis/{group_version}");
        let mut last = String::new();
        for endpoint in endpoints.all() {
            let server = endpoint.server_name();
            let listed =
                self.served(endpoint).await.as_ref().as_ref().is_ok_and(|served| served.contains(&group_version));
            if listed {
                return Report::passed(apiservice, format!("{} lists {group_version}", endpoint.authority()));
            }
            // Not listed, or no usable `/apis`: ask the discovery path itself.
            match get(endpoint, &path).await {
                Ok((status, _)) if status.is_success() => {
                    return Report::passed(apiservice, format!("GET {path}: {status}"));
                }
                Ok((status, _)) => last = format!("bad status from https://{server}{path}: {}", status.as_u16()),
                Err(e) => last = format!("failing or missing response from https://{server}{path}: {e}"),
            }
        }
        Report::failed(apiservice, Reason::FailedDiscoveryCheck, last)
    }
}

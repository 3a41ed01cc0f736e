//! `kube-aggregation-proxy check`: the troubleshooting command. It loads the same
//! configuration as `serve`, reads the APIServices once, and checks each the way the proxy
//! reaches it, printing which step failed and why (validation, service resolution, TCP, TLS
//! with the certificate's actual names, the backend's answer to a discovery request), where
//! kube-aggregator only says `FailedDiscoveryCheck`.

use std::fmt::Write as _;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::runtime::{reflector, watcher};
use kube::Api;

use crate::apiservice::{validate, ApiService, ApiServiceObject};
use crate::availability::probe::{check, Report};
use crate::config::{Config, Source};
use crate::routing::{ServiceResolver, StaticResolver};
use crate::server::endpoints::Rejection;
use crate::source::file::FileSource;
use crate::source::kube::ClusterResolver;

/// What the check found.
pub struct Outcome {
    pub reports: Vec<Report>,
    pub rejections: Vec<Rejection>,
}

impl Outcome {
    pub fn all_available(&self) -> bool {
        self.rejections.is_empty() && self.reports.iter().all(|r| r.available)
    }
}

async fn list<K>(api: Api<K>) -> Result<reflector::Store<K>, String>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, mut writer) = reflector::store();
    let list = api.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
    for item in list.items {
        writer.apply_watcher_event(&watcher::Event::Apply(item));
    }
    Ok(store)
}

/// Reads the APIServices of `config`'s source and checks them (only `name`, when given).
pub async fn run(config: &Config, name: Option<&str>) -> Result<Outcome, String> {
    let (apiservices, rejections, resolver): (Vec<ApiService>, Vec<Rejection>, Arc<dyn ServiceResolver>) = match &config
        .source
    {
        Source::Files { dir, services, limits } => {
            let resolver = Arc::new(StaticResolver::new(services.clone()));
            let mut source = FileSource::new(
                dir.clone(),
                resolver.clone(),
                *limits,
                Default::default(),
                Arc::new(Default::default()),
            );
            let (apiservices, rejections) = tokio::task::spawn_blocking(move || {
                source.scan(true);
                source.collect()
            })
            .await
            .map_err(|e| format!("reading manifests: {e}"))?;
            (apiservices.into_iter().map(Arc::unwrap_or_clone).collect(), rejections, resolver)
        }
        Source::Cluster { kubeconfig } => {
            let client = match kubeconfig {
                Some(path) => {
                    let file = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
                    let c = kube::Config::from_custom_kubeconfig(file, &Default::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    kube::Client::try_from(c).map_err(|e| e.to_string())?
                }
                None => kube::Client::try_default().await.map_err(|e| e.to_string())?,
            };
            let objects = Api::<ApiServiceObject>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| format!("listing APIServices: {e}"))?;
            let mut apiservices = Vec::new();
            let mut rejections = Vec::new();
            for object in &objects.items {
                match validate(object) {
                    Ok(a) => apiservices.push(a),
                    Err(e) => rejections.push(Rejection {
                        source: "cluster".into(),
                        name: Some(e.name.clone()),
                        reason: e.to_string(),
                    }),
                }
            }
            let services = list(Api::<Service>::all(client.clone())).await?;
            let slices = list(Api::<EndpointSlice>::all(client)).await?;
            let loopback = config.delegate.as_ref().map(|d| d.authority.clone());
            let resolver = Arc::new(ClusterResolver::new(services, slices, config.enable_aggregator_routing, loopback));
            (apiservices, rejections, resolver)
        }
    };
    let settings = config.backend.clone();
    let selected: Vec<&ApiService> = apiservices.iter().filter(|a| name.is_none_or(|n| *a.name == *n)).collect();
    if let (Some(n), true) = (name, selected.is_empty()) {
        if !rejections.iter().any(|r| r.name.as_deref() == Some(n)) {
            return Err(format!("no APIService named {n:?}"));
        }
    }
    let mut reports = Vec::new();
    for a in selected {
        let resolved = a.service.as_ref().map_or(Ok(Vec::new()), |s| resolver.resolve(s));
        reports.push(check(a, resolved, &settings).await);
    }
    // With a name, only that object's own rejection counts; a broken file could hold anything.
    let rejections = rejections.into_iter().filter(|r| name.is_none_or(|n| r.name.as_deref() == Some(n))).collect();
    Ok(Outcome { reports, rejections })
}

/// The report for a terminal.
pub fn render(outcome: &Outcome) -> String {
    let mut out = String::new();
    for r in &outcome.reports {
        let status = if r.available { "True" } else { "False" };
        let _ = writeln!(out, "APIService {}: Available={status} ({:?})", r.apiservice, r.reason);
        for step in &r.steps {
            let mark = if step.ok { "ok  " } else { "FAIL" };
            let _ = writeln!(out, "  {mark} {:<8} {}", step.name, step.detail);
        }
        if !r.available {
            let _ = writeln!(out, "  message: {}", r.message);
        }
    }
    for rejection in &outcome.rejections {
        let _ = writeln!(out, "rejected {}: {}", rejection.source, rejection.reason);
    }
    out
}

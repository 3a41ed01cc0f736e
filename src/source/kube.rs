//! Cluster mode: APIServices, Services and EndpointSlices watched in a real cluster.
//!
//! Three kube-rs watchers feed reflector stores; every event wakes one loop that, after a short
//! quiet period (so a burst of changes coalesces), publishes a snapshot to the routing writer.
//! Watch errors back off and relist (410 Gone included) inside kube-rs while the last published
//! table keeps serving. An APIService that fails validation is skipped, logged once and counted;
//! the others are unaffected.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use http::uri::Authority;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::{watch, Notify};

use crate::apiservice::{validate, ApiServiceObject, ServiceReference};
use crate::metrics::Metrics;
use crate::routing::writer::Snapshot;
use crate::routing::{ResolveError, ServiceResolver};
use crate::server::endpoints::{Rejection, SharedRejections};

/// Changes arriving within this window are published as one snapshot.
const COALESCE: Duration = Duration::from_millis(25);
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Resolves services from the watched Services and EndpointSlices, as kube-aggregator's
/// cluster-IP resolver (default) or endpoint resolver (`--enable-aggregator-routing`) does.
#[derive(Clone)]
pub struct ClusterResolver {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    endpoint_routing: bool,
    /// `default/kubernetes:443` goes straight to the delegate, as kube-aggregator's loopback
    /// resolver does.
    loopback: Option<Authority>,
}

fn authority(host: &str, port: u16) -> Result<Authority, String> {
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
    format!("{host}:{port}").parse().map_err(|e| format!("{host}:{port}: {e}"))
}

impl ClusterResolver {
    pub fn new(
        services: Store<Service>,
        slices: Store<EndpointSlice>,
        endpoint_routing: bool,
        loopback: Option<Authority>,
    ) -> Self {
        Self { services, slices, endpoint_routing, loopback }
    }

    fn ready_endpoints(&self, svc: &ServiceReference, port_name: &str) -> Vec<Authority> {
        let mut targets = Vec::new();
        let slices = self.slices.state_filter(|s| {
            s.metadata.namespace.as_deref() == Some(&*svc.namespace)
                && s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(String::as_str)
                    == Some(&*svc.name)
        });
        for slice in slices {
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or_default() == port_name && p.port.is_some())
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for endpoint in slice.endpoints.iter().flatten() {
                let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if let (true, Some(address)) = (ready, endpoint.addresses.first()) {
                    if let Ok(a) = authority(address, port) {
                        targets.push(a);
                    }
                }
            }
        }
        targets
    }
}

impl ServiceResolver for ClusterResolver {
    fn resolve(&self, svc: &ServiceReference) -> Result<Vec<Authority>, ResolveError> {
        if let Some(loopback) = &self.loopback {
            if &*svc.namespace == "default" && &*svc.name == "kubernetes" && svc.port == 443 {
                return Ok(vec![loopback.clone()]);
            }
        }
        let unroutable = |reason: String| ResolveError::Unroutable {
            namespace: svc.namespace.to_string(),
            name: svc.name.to_string(),
            reason,
        };
        let service = self
            .services
            .get(&ObjectRef::new(&svc.name).within(&svc.namespace))
            .ok_or_else(|| ResolveError::not_found(svc))?;
        let spec = service.spec.clone().unwrap_or_default();
        match spec.type_.as_deref().unwrap_or("ClusterIP") {
            "ExternalName" => {
                let name = spec.external_name.unwrap_or_default();
                if name.is_empty() {
                    return Err(unroutable("ExternalName service has no externalName".into()));
                }
                Ok(vec![authority(&name, svc.port).map_err(unroutable)?])
            }
            "ClusterIP" | "NodePort" | "LoadBalancer" => {
                let port = spec.ports.iter().flatten().find(|p| p.port == i32::from(svc.port)).ok_or_else(|| {
                    ResolveError::PortNotFound {
                        namespace: svc.namespace.to_string(),
                        name: svc.name.to_string(),
                        port: svc.port,
                    }
                })?;
                if self.endpoint_routing {
                    let targets = self.ready_endpoints(svc, port.name.as_deref().unwrap_or_default());
                    if targets.is_empty() {
                        return Err(ResolveError::NoEndpoints {
                            namespace: svc.namespace.to_string(),
                            name: svc.name.to_string(),
                        });
                    }
                    return Ok(targets);
                }
                match spec.cluster_ip.as_deref() {
                    None | Some("") => Err(unroutable("service has no cluster IP".into())),
                    Some("None") => Err(unroutable("cannot route to service with ClusterIP \"None\"".into())),
                    Some(ip) => Ok(vec![authority(ip, svc.port).map_err(unroutable)?]),
                }
            }
            other => Err(unroutable(format!("unsupported service type {other:?}"))),
        }
    }
}

/// Runs a reflector for `api`, waking `notify` on every event; errors back off and relist.
fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    notify: Arc<Notify>,
    what: &'static str,
) -> impl std::future::Future<Output = ()>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff().reflect(writer);
    drain(stream, notify, what)
}

async fn drain<S, K>(stream: S, notify: Arc<Notify>, what: &'static str)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    futures_util::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => notify.notify_one(),
            Err(e) => tracing::warn!(resource = what, error = %e, "watch failed; retrying with backoff"),
        }
    }
}

pub struct ClusterSource {
    client: Client,
    endpoint_routing: bool,
    loopback: Option<Authority>,
    rejections: SharedRejections,
    metrics: Arc<Metrics>,
}

impl ClusterSource {
    pub fn new(
        client: Client,
        endpoint_routing: bool,
        loopback: Option<Authority>,
        rejections: SharedRejections,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { client, endpoint_routing, loopback, rejections, metrics }
    }

    /// Publishes snapshots until `tx` closes. The first one waits for all three initial lists.
    pub async fn run(self, tx: watch::Sender<Option<Arc<Snapshot>>>) {
        let notify = Arc::new(Notify::new());
        let (apiservices, apiservice_writer) = reflector::store::<ApiServiceObject>();
        let (services, service_writer) = reflector::store::<Service>();
        let (slices, slice_writer) = reflector::store::<EndpointSlice>();
        let mut watchers = tokio::task::JoinSet::new();
        watchers.spawn(reflect(Api::all(self.client.clone()), apiservice_writer, notify.clone(), "apiservices"));
        watchers.spawn(reflect(Api::all(self.client.clone()), service_writer, notify.clone(), "services"));
        watchers.spawn(reflect(Api::all(self.client.clone()), slice_writer, notify.clone(), "endpointslices"));
        let synced = async {
            apiservices.wait_until_ready().await.is_ok()
                && services.wait_until_ready().await.is_ok()
                && slices.wait_until_ready().await.is_ok()
        };
        tokio::select! {
            ok = synced => if !ok { return },
            () = tx.closed() => return,
        }
        tracing::info!("initial list of APIServices, Services and EndpointSlices complete");
        let resolver: Arc<dyn ServiceResolver> =
            Arc::new(ClusterResolver::new(services, slices, self.endpoint_routing, self.loopback.clone()));
        let mut last_rejections: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let mut valid = Vec::new();
            let mut rejected = BTreeMap::new();
            for object in apiservices.state() {
                match validate(&object) {
                    Ok(a) => valid.push(Arc::new(a)),
                    Err(e) => {
                        rejected.insert(e.name.clone(), e.to_string());
                    }
                }
            }
            for (name, reason) in &rejected {
                if last_rejections.get(name) != Some(reason) {
                    tracing::warn!(apiservice = %name, %reason, "APIService skipped");
                }
            }
            self.metrics.set_invalid_apiservices(rejected.len());
            self.rejections.store(Arc::new(
                rejected
                    .iter()
                    .map(|(name, reason)| Rejection {
                        source: "cluster".into(),
                        name: Some(name.clone()),
                        reason: reason.clone(),
                    })
                    .collect(),
            ));
            last_rejections = rejected;
            tx.send_replace(Some(Arc::new(Snapshot { apiservices: valid, resolver: resolver.clone() })));
            tokio::select! {
                () = notify.notified() => {}
                () = tx.closed() => return,
            }
            // Let the rest of a burst arrive before rebuilding.
            tokio::time::sleep(COALESCE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    fn service(name: &str, spec: ServiceSpec) -> Service {
        Service {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some("ns".into()), ..ObjectMeta::default() },
            spec: Some(spec),
            ..Service::default()
        }
    }

    fn port(name: &str, port: i32) -> ServicePort {
        ServicePort { name: Some(name.into()), port, ..ServicePort::default() }
    }

    fn endpoint(address: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![address.into()],
            conditions: Some(EndpointConditions { ready, ..EndpointConditions::default() }),
            ..Endpoint::default()
        }
    }

    fn slice(service: &str, port_name: &str, port: i32, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-abc")),
                namespace: Some("ns".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(vec![EndpointPort {
                name: Some(port_name.into()),
                port: Some(port),
                ..EndpointPort::default()
            }]),
        }
    }

    fn resolver(services: Vec<Service>, slices: Vec<EndpointSlice>, endpoint_routing: bool) -> ClusterResolver {
        let (service_store, mut service_writer) = reflector::store();
        for s in services {
            service_writer.apply_watcher_event(&watcher::Event::Apply(s));
        }
        let (slice_store, mut slice_writer) = reflector::store();
        for s in slices {
            slice_writer.apply_watcher_event(&watcher::Event::Apply(s));
        }
        ClusterResolver::new(service_store, slice_store, endpoint_routing, Some("127.0.0.1:6443".parse().unwrap()))
    }

    fn reference(name: &str, port: u16) -> ServiceReference {
        ServiceReference {
            namespace: "ns".into(),
            name: name.into(),
            port,
            ca_bundle: Arc::from(&b""[..]),
            insecure_skip_tls_verify: true,
        }
    }

    fn resolved(r: &ClusterResolver, name: &str, port: u16) -> Result<Vec<String>, String> {
        r.resolve(&reference(name, port)).map(|v| v.iter().map(|a| a.to_string()).collect()).map_err(|e| e.to_string())
    }

    fn cluster_ip(ip: &str, ports: Vec<ServicePort>) -> ServiceSpec {
        ServiceSpec { cluster_ip: Some(ip.into()), ports: Some(ports), ..ServiceSpec::default() }
    }

    #[test]
    fn cluster_ip_services_resolve_to_the_cluster_ip_and_the_matching_service_port() {
        let r = resolver(
            vec![
                service("api", cluster_ip("10.0.0.7", vec![port("https", 443)])),
                service("v6", cluster_ip("fd00::7", vec![port("https", 443)])),
                service("headless", cluster_ip("None", vec![port("https", 443)])),
            ],
            vec![],
            false,
        );
        assert_eq!(resolved(&r, "api", 443), Ok(vec!["10.0.0.7:443".into()]));
        assert_eq!(resolved(&r, "v6", 443), Ok(vec!["[fd00::7]:443".into()]));
        assert_eq!(resolved(&r, "api", 8443), Err("no service port 8443 found for service ns/api".into()));
        assert_eq!(resolved(&r, "missing", 443), Err("service ns/missing not found".into()));
        assert!(resolved(&r, "headless", 443).unwrap_err().contains("ClusterIP \"None\""));
    }

    #[test]
    fn external_name_services_resolve_to_their_name_with_the_apiservice_port() {
        let spec = ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some("localhost".into()),
            ..ServiceSpec::default()
        };
        let r = resolver(vec![service("ext", spec)], vec![], false);
        assert_eq!(resolved(&r, "ext", 9443), Ok(vec!["localhost:9443".into()]));
    }

    #[test]
    fn aggregator_routing_spreads_over_ready_endpoints_of_the_named_port() {
        let r = resolver(
            vec![service("api", cluster_ip("10.0.0.7", vec![port("https", 443)]))],
            vec![slice(
                "api",
                "https",
                8443,
                vec![endpoint("10.1.0.1", Some(true)), endpoint("10.1.0.2", Some(false)), endpoint("10.1.0.3", None)],
            )],
            true,
        );
        assert_eq!(resolved(&r, "api", 443), Ok(vec!["10.1.0.1:8443".into(), "10.1.0.3:8443".into()]));
        let none_ready = resolver(
            vec![service("api", cluster_ip("10.0.0.7", vec![port("https", 443)]))],
            vec![slice("api", "https", 8443, vec![endpoint("10.1.0.2", Some(false))])],
            true,
        );
        assert_eq!(resolved(&none_ready, "api", 443), Err("no endpoints available for service ns/api".into()));
    }

    #[test]
    fn the_kubernetes_service_goes_to_the_delegate() {
        let r = resolver(vec![], vec![], false);
        let mut default_kubernetes = reference("kubernetes", 443);
        default_kubernetes.namespace = "default".into();
        assert_eq!(r.resolve(&default_kubernetes).unwrap()[0].as_str(), "127.0.0.1:6443");
    }
}

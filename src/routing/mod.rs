//! The routing table: an immutable snapshot from (group, version) to where requests go.
//!
//! One writer ([`writer`]) builds a complete table from a snapshot of APIServices and service
//! resolution, and swaps it in with arc-swap only when it differs from the one serving.
//! Requests take one `load_full()` and never hold a lock: a table, once published, is never
//! mutated (the round-robin cursor of a route's endpoints is the only atomic inside).

pub mod path;
pub mod resolver;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::uri::Authority;

use crate::apiservice::{sorted_by_group_and_version, ApiService};
use crate::proxy::client::{BackendClient, BackendTls, ClientCache, TransportError};
pub use resolver::{ResolveError, ServiceResolver, StaticResolver};

/// Where a routed request goes.
#[derive(Debug)]
pub enum Upstream {
    /// A local APIService: the delegate (kube-apiserver) serves it.
    Local,
    Remote(Box<RemoteUpstream>),
}

/// A remote APIService's backend: its client and resolved endpoints, or why it has none.
#[derive(Debug)]
pub struct RemoteUpstream {
    pub client: Result<BackendClient, TransportError>,
    pub endpoints: Result<Endpoints, ResolveError>,
}

/// Resolved `host:port` targets, handed out round-robin.
#[derive(Debug)]
pub struct Endpoints {
    targets: Vec<Authority>,
    next: AtomicUsize,
}

impl Endpoints {
    fn new(targets: Vec<Authority>) -> Self {
        Self { targets, next: AtomicUsize::new(0) }
    }

    /// The next target. Never empty: resolution without targets is a [`ResolveError`].
    pub fn pick(&self) -> &Authority {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        &self.targets[i]
    }

    pub fn targets(&self) -> &[Authority] {
        &self.targets
    }
}

/// One APIService's route.
#[derive(Debug)]
pub struct Route {
    pub apiservice: ApiService,
    pub upstream: Upstream,
}

/// A group's routes, preferred version first.
#[derive(Debug)]
pub struct GroupRoutes {
    pub name: Arc<str>,
    pub versions: Vec<Arc<Route>>,
}

impl GroupRoutes {
    pub fn version(&self, version: &str) -> Option<&Arc<Route>> {
        self.versions.iter().find(|r| &*r.apiservice.version == version)
    }
}

/// What a table was built from; equal inputs build equal tables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Inputs {
    apiservices: Vec<ApiService>,
    resolved: Vec<Option<Result<Vec<Authority>, ResolveError>>>,
}

/// The immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Groups in legacy `/apis` order (the core group, `""`, included).
    groups: Vec<GroupRoutes>,
    by_group: HashMap<Arc<str>, usize>,
    inputs: Inputs,
    /// Bumped by the writer on every swap; lets tests and metrics see a new table.
    pub generation: u64,
}

impl RoutingTable {
    /// Builds a table. `apiservices` must have unique names (sources guarantee it).
    pub fn build(apiservices: Vec<ApiService>, resolver: &dyn ServiceResolver, clients: &ClientCache) -> Self {
        let mut apiservices = apiservices;
        apiservices.sort_by(|a, b| a.name.cmp(&b.name));
        let resolved: Vec<_> = apiservices.iter().map(|a| a.service.as_ref().map(|s| resolver.resolve(s))).collect();
        Self::from_inputs(Inputs { apiservices, resolved }, clients)
    }

    fn from_inputs(inputs: Inputs, clients: &ClientCache) -> Self {
        let resolution: HashMap<&str, &Option<Result<Vec<Authority>, ResolveError>>> =
            inputs.apiservices.iter().map(|a| &*a.name).zip(&inputs.resolved).collect();
        let mut groups = Vec::new();
        let mut by_group = HashMap::new();
        for group in sorted_by_group_and_version(&inputs.apiservices) {
            let name: Arc<str> = group[0].group.clone();
            let versions = group
                .into_iter()
                .map(|a| {
                    let upstream = match (&a.service, resolution.get(&*a.name)) {
                        (Some(service), Some(Some(resolved))) => Upstream::Remote(Box::new(RemoteUpstream {
                            client: clients.get(&BackendTls::for_service(service)),
                            endpoints: match resolved {
                                Ok(targets) if targets.is_empty() => Err(ResolveError::NoEndpoints {
                                    namespace: service.namespace.to_string(),
                                    name: service.name.to_string(),
                                }),
                                Ok(targets) => Ok(Endpoints::new(targets.clone())),
                                Err(e) => Err(e.clone()),
                            },
                        })),
                        _ => Upstream::Local,
                    };
                    Arc::new(Route { apiservice: a.clone(), upstream })
                })
                .collect();
            by_group.insert(name.clone(), groups.len());
            groups.push(GroupRoutes { name, versions });
        }
        Self { groups, by_group, inputs, generation: 0 }
    }

    /// Whether building from these inputs would give this very table.
    pub fn is_built_from(&self, apiservices: &[ApiService], resolver: &dyn ServiceResolver) -> bool {
        let mut sorted: Vec<&ApiService> = apiservices.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        sorted.len() == self.inputs.apiservices.len()
            && sorted.iter().zip(&self.inputs.apiservices).all(|(a, b)| *a == b)
            && sorted
                .iter()
                .zip(&self.inputs.resolved)
                .all(|(a, r)| a.service.as_ref().map(|s| resolver.resolve(s)) == *r)
    }

    pub fn route(&self, group: &str, version: &str) -> Option<&Arc<Route>> {
        self.group(group)?.version(version)
    }

    pub fn group(&self, name: &str) -> Option<&GroupRoutes> {
        self.by_group.get(name).map(|&i| &self.groups[i])
    }

    /// Every group in `/apis` order, including the core group `""`.
    pub fn groups(&self) -> &[GroupRoutes] {
        &self.groups
    }

    pub fn apiservices(&self) -> &[ApiService] {
        &self.inputs.apiservices
    }

    /// The TLS identities in use, so the client cache can drop the rest.
    pub fn backend_tls_in_use(&self) -> HashSet<BackendTls> {
        self.inputs.apiservices.iter().filter_map(|a| a.service.as_ref()).map(BackendTls::for_service).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::apiservice::testing::apiservice;

    fn resolver() -> StaticResolver {
        StaticResolver::new(HashMap::from([("ns/echo:443".to_owned(), "127.0.0.1:9443".parse().unwrap())]))
    }

    #[test]
    fn routes_resolve_by_group_and_version_with_preferred_first() {
        let clients = ClientCache::default();
        let table = RoutingTable::build(
            vec![
                apiservice("v1.echo.io", 100, 10, Some("echo")),
                apiservice("v2.echo.io", 100, 20, Some("echo")),
                apiservice("v1.", 18000, 1, None),
                apiservice("v1.missing.io", 50, 1, Some("gone")),
            ],
            &resolver(),
            &clients,
        );
        let names: Vec<_> = table.groups().iter().map(|g| &*g.name).collect();
        assert_eq!(names, ["", "echo.io", "missing.io"]);
        assert_eq!(&*table.group("echo.io").unwrap().versions[0].apiservice.version, "v2");
        let route = table.route("echo.io", "v1").unwrap();
        let Upstream::Remote(remote) = &route.upstream else { panic!("remote expected") };
        assert_eq!(remote.endpoints.as_ref().unwrap().pick().as_str(), "127.0.0.1:9443");
        let Upstream::Remote(missing) = &table.route("missing.io", "v1").unwrap().upstream else { panic!() };
        assert_eq!(missing.endpoints.as_ref().unwrap_err().to_string(), "service ns/gone not found");
        assert!(matches!(table.route("", "v1").unwrap().upstream, Upstream::Local));
        assert!(table.route("echo.io", "v3").is_none());
        // Two APIServices on one backend share one client.
        assert_eq!(clients.len(), 2);
    }

    #[test]
    fn a_table_knows_the_inputs_it_was_built_from() {
        let clients = ClientCache::default();
        let set = vec![apiservice("v1.echo.io", 100, 10, Some("echo"))];
        let table = RoutingTable::build(set.clone(), &resolver(), &clients);
        assert!(table.is_built_from(&set, &resolver()));
        assert!(!table.is_built_from(&set, &StaticResolver::default()));
        assert!(!table.is_built_from(&[apiservice("v1.echo.io", 100, 11, Some("echo"))], &resolver()));
    }

    #[test]
    fn endpoints_are_handed_out_round_robin() {
        let e = Endpoints::new(vec!["a:1".parse().unwrap(), "b:1".parse().unwrap()]);
        let picks: Vec<_> = (0..4).map(|_| e.pick().as_str().to_owned()).collect();
        assert_eq!(picks, ["a:1", "b:1", "a:1", "b:1"]);
    }
}

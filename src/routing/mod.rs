//! The routing table: an immutable snapshot from (group, version) to where requests go.
//!
//! One writer ([`writer`]) builds a complete table from a snapshot of APIServices and service
//! resolution, and swaps it in with arc-swap only when it differs from the one serving.
//! Requests take one `load_full()` and never hold a lock: a table, once published, is never
//! mutated (the endpoints it points at keep their own connections and health, shared with
//! the tables before and after it).
//!
//! A build does the per-backend work (service resolution, the TLS client) once per distinct
//! `spec.service`, not once per APIService: the versions and groups of one extension server
//! share one [`RemoteUpstream`], so 10,000 APIServices on a few backends cost a few lookups.

pub mod path;
pub mod resolver;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use http::uri::Authority;

use crate::apiservice::{sorted_by_group_and_version_by, ApiService, ServiceReference};
use crate::backend::{Backend, BackendTls, Backends, Endpoints, TransportError};
use crate::metrics::{ApiServiceRequests, ApiServiceSeries};
pub use resolver::{ResolveError, ServiceResolver, StaticResolver};

/// Where a routed request goes.
#[derive(Debug)]
pub enum Upstream {
    /// A local APIService: the delegate (kube-apiserver) serves it.
    Local,
    /// Shared by every route of the same `spec.service` in one table.
    Remote(Arc<RemoteUpstream>),
}

/// A remote APIService's backend and its resolved endpoints, or why it has none.
#[derive(Debug)]
pub struct RemoteUpstream {
    pub backend: Result<Arc<Backend>, TransportError>,
    pub endpoints: Result<Endpoints, ResolveError>,
}

/// One APIService's route.
#[derive(Debug)]
pub struct Route {
    /// The same allocation as the source's and the table's inputs: never copied per table.
    pub apiservice: Arc<ApiService>,
    pub upstream: Upstream,
    /// A remote APIService's request series, resolved when the table is built so a request
    /// counts itself without looking anything up.
    pub requests: Option<Arc<ApiServiceSeries>>,
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

/// The result of resolving one `spec.service`; shared by the APIServices that name it.
type Resolved = Arc<Result<Vec<Authority>, ResolveError>>;

/// What a table is built from; equal inputs build equal tables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inputs {
    /// Sorted by name. Shared with the source's snapshot, not copied.
    apiservices: Vec<Arc<ApiService>>,
    /// Per APIService, in the same order: `None` for a local one.
    resolved: Vec<Option<Resolved>>,
}

impl Inputs {
    /// Sorts `apiservices` by name and resolves each distinct service once.
    pub fn resolve(apiservices: &[Arc<ApiService>], resolver: &dyn ServiceResolver) -> Self {
        let mut apiservices = apiservices.to_vec();
        apiservices.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let mut memo: HashMap<(&str, &str, u16), Resolved> = HashMap::new();
        let resolved = apiservices
            .iter()
            .map(|a| {
                a.service.as_ref().map(|s| {
                    memo.entry((&*s.namespace, &*s.name, s.port))
                        .or_insert_with(|| Arc::new(resolver.resolve(s)))
                        .clone()
                })
            })
            .collect();
        Self { apiservices, resolved }
    }
}

/// A `spec.service` as a key of one build's memo: hashes the cheap fields only (the caBundle by
/// length, not content) and compares in full, so APIServices sharing a caBundle `Arc` (or an
/// equal one) share an upstream without the bundle being hashed per APIService.
struct ServiceKey<'a>(&'a ServiceReference);

impl Hash for ServiceKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let s = self.0;
        (&*s.namespace, &*s.name, s.port, s.ca_bundle.len(), s.insecure_skip_tls_verify).hash(state);
    }
}

impl PartialEq for ServiceKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0, other.0);
        a.namespace == b.namespace
            && a.name == b.name
            && a.port == b.port
            && a.insecure_skip_tls_verify == b.insecure_skip_tls_verify
            && (Arc::ptr_eq(&a.ca_bundle, &b.ca_bundle) || a.ca_bundle == b.ca_bundle)
    }
}

impl Eq for ServiceKey<'_> {}

/// The immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Groups in legacy `/apis` order (the core group, `""`, included).
    groups: Vec<GroupRoutes>,
    by_group: HashMap<Arc<str>, usize>,
    inputs: Inputs,
    /// The backend identities and addresses the routes use, so the rest can be dropped.
    in_use: HashMap<BackendTls, HashSet<Authority>>,
    /// Bumped by the writer on every swap; lets tests and metrics see a new table.
    pub generation: u64,
}

impl RoutingTable {
    /// Builds a table whose request series are its own, not exported: for tests and
    /// benchmarks. `apiservices` must have unique names (sources guarantee it).
    pub fn build(apiservices: &[Arc<ApiService>], resolver: &dyn ServiceResolver, backends: &Backends) -> Self {
        Self::from_inputs(Inputs::resolve(apiservices, resolver), backends, &ApiServiceRequests::default())
    }

    /// Builds a table from resolved inputs, the TLS client and endpoints of each distinct
    /// service made once, and each remote route's request series taken from `requests`.
    pub fn from_inputs(inputs: Inputs, backends: &Backends, requests: &ApiServiceRequests) -> Self {
        let mut upstreams: HashMap<ServiceKey<'_>, Arc<RemoteUpstream>> = HashMap::new();
        let mut in_use: HashMap<BackendTls, HashSet<Authority>> = HashMap::new();
        let routes: Vec<Arc<Route>> = inputs
            .apiservices
            .iter()
            .zip(&inputs.resolved)
            .map(|(a, resolved)| {
                let upstream = match (&a.service, resolved) {
                    (Some(service), Some(resolved)) => Upstream::Remote(
                        upstreams
                            .entry(ServiceKey(service))
                            .or_insert_with(|| {
                                let tls = BackendTls::for_service(service);
                                let backend = backends.get(&tls);
                                let no_endpoints = || ResolveError::NoEndpoints {
                                    namespace: service.namespace.to_string(),
                                    name: service.name.to_string(),
                                };
                                let endpoints = match (&**resolved, &backend) {
                                    (Err(e), _) => Err(e.clone()),
                                    (Ok(targets), Ok(backend)) => {
                                        in_use.entry(tls).or_default().extend(targets.iter().cloned());
                                        backend.endpoints(targets).ok_or_else(no_endpoints)
                                    }
                                    (Ok(targets), Err(_)) if targets.is_empty() => Err(no_endpoints()),
                                    // Reported through `backend`, which routing checks first.
                                    (Ok(_), Err(e)) => Err(ResolveError::Unroutable {
                                        namespace: service.namespace.to_string(),
                                        name: service.name.to_string(),
                                        reason: e.to_string(),
                                    }),
                                };
                                Arc::new(RemoteUpstream { backend, endpoints })
                            })
                            .clone(),
                    ),
                    _ => Upstream::Local,
                };
                let requests =
                    matches!(upstream, Upstream::Remote(_)).then(|| requests.series(&a.name, &a.group, &a.version));
                Arc::new(Route { apiservice: a.clone(), upstream, requests })
            })
            .collect();
        drop(upstreams);
        let mut groups = Vec::new();
        let mut by_group = HashMap::new();
        for group in sorted_by_group_and_version_by(&routes, |r| &*r.apiservice) {
            let name: Arc<str> = group[0].apiservice.group.clone();
            by_group.insert(name.clone(), groups.len());
            groups.push(GroupRoutes { name, versions: group.into_iter().cloned().collect() });
        }
        Self { groups, by_group, inputs, in_use, generation: 0 }
    }

    /// Whether building from these inputs would give this very table.
    pub fn is_built_from(&self, apiservices: &[Arc<ApiService>], resolver: &dyn ServiceResolver) -> bool {
        self.is_built_from_inputs(&Inputs::resolve(apiservices, resolver))
    }

    /// Whether this table was built from `inputs`: the writer's check, without resolving twice.
    pub fn is_built_from_inputs(&self, inputs: &Inputs) -> bool {
        self.inputs == *inputs
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

    /// Every APIService of the table, by name.
    pub fn apiservices(&self) -> &[Arc<ApiService>] {
        &self.inputs.apiservices
    }

    /// Whether an APIService of this name is in the table (its inputs are sorted by name).
    pub fn has_apiservice(&self, name: &str) -> bool {
        self.inputs.apiservices.binary_search_by(|a| (*a.name).cmp(name)).is_ok()
    }

    /// The backend identities and addresses in use, so [`Backends`] can drop the rest.
    pub fn backends_in_use(&self) -> &HashMap<BackendTls, HashSet<Authority>> {
        &self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::apiservice::testing::apiservice;

    fn resolver() -> StaticResolver {
        StaticResolver::new(HashMap::from([("ns/echo:443".to_owned(), vec!["127.0.0.1:9443".parse().unwrap()])]))
    }

    #[test]
    fn routes_resolve_by_group_and_version_with_preferred_first() {
        let clients = Backends::default();
        let table = RoutingTable::build(
            &[
                Arc::new(apiservice("v1.echo.io", 100, 10, Some("echo"))),
                Arc::new(apiservice("v2.echo.io", 100, 20, Some("echo"))),
                Arc::new(apiservice("v1.", 18000, 1, None)),
                Arc::new(apiservice("v1.missing.io", 50, 1, Some("gone"))),
            ],
            &resolver(),
            &clients,
        );
        let names: Vec<_> = table.groups().iter().map(|g| &*g.name).collect();
        assert_eq!(names, ["", "echo.io", "missing.io"]);
        assert_eq!(&*table.group("echo.io").unwrap().versions[0].apiservice.version, "v2");
        let route = table.route("echo.io", "v1").unwrap();
        let Upstream::Remote(remote) = &route.upstream else { panic!("remote expected") };
        assert_eq!(remote.endpoints.as_ref().unwrap().pick().authority().as_str(), "127.0.0.1:9443");
        let Upstream::Remote(missing) = &table.route("missing.io", "v1").unwrap().upstream else { panic!() };
        assert_eq!(missing.endpoints.as_ref().unwrap_err().to_string(), "service ns/gone not found");
        assert!(matches!(table.route("", "v1").unwrap().upstream, Upstream::Local));
        assert!(table.route("echo.io", "v3").is_none());
        // Two APIServices on one backend share one backend and one upstream.
        assert_eq!(clients.len(), 2);
        let Upstream::Remote(v2) = &table.route("echo.io", "v2").unwrap().upstream else { panic!() };
        assert!(Arc::ptr_eq(remote, v2));
        assert_eq!(table.backends_in_use().len(), 1, "the unresolvable service has no address in use");
    }

    #[test]
    fn a_table_knows_the_inputs_it_was_built_from() {
        let clients = Backends::default();
        let set = vec![Arc::new(apiservice("v1.echo.io", 100, 10, Some("echo")))];
        let table = RoutingTable::build(&set, &resolver(), &clients);
        assert!(table.is_built_from(&set, &resolver()));
        // Equal content in other allocations is the same input.
        assert!(table.is_built_from(&[Arc::new(apiservice("v1.echo.io", 100, 10, Some("echo")))], &resolver()));
        assert!(!table.is_built_from(&set, &StaticResolver::default()));
        assert!(!table.is_built_from(&[Arc::new(apiservice("v1.echo.io", 100, 11, Some("echo")))], &resolver()));
    }

    #[test]
    fn services_differing_only_in_ca_bundle_get_their_own_upstream() {
        let clients = Backends::default();
        let mut other = apiservice("v1.other.io", 100, 10, Some("echo"));
        if let Some(s) = other.service.as_mut() {
            s.ca_bundle = Arc::from(&b"not a bundle"[..]);
            s.insecure_skip_tls_verify = false;
        }
        let table = RoutingTable::build(
            &[Arc::new(apiservice("v1.echo.io", 100, 10, Some("echo"))), Arc::new(other)],
            &resolver(),
            &clients,
        );
        let Upstream::Remote(echo) = &table.route("echo.io", "v1").unwrap().upstream else { panic!() };
        let Upstream::Remote(other) = &table.route("other.io", "v1").unwrap().upstream else { panic!() };
        assert!(!Arc::ptr_eq(echo, other));
        assert!(echo.backend.is_ok());
        assert!(other.backend.is_err(), "an unparsable caBundle is this upstream's own error");
        assert_eq!(table.backends_in_use().len(), 1);
    }
}

//! Routing micro-benchmarks: route lookup for a request path, and building and swapping the
//! routing table, at 10, 1,000 and 10,000 APIServices.
//!
//! Targets (issue 6): lookup under 200 ns and a build under 20 ms at 10,000 APIServices.
//! Every APIService here is remote and shares one backend, as versions of one extension server
//! do, so a build measures the table itself, not TLS client construction (built once, cached).

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kube_aggregation_proxy::apiservice::ApiService;
use kube_aggregation_proxy::backend::Backends;
use kube_aggregation_proxy::metrics::Metrics;
use kube_aggregation_proxy::routing::path::{classify, ApiPath};
use kube_aggregation_proxy::routing::writer::{self, SharedTable, Snapshot};
use kube_aggregation_proxy::routing::{RoutingTable, ServiceResolver, StaticResolver};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// `n` APIServices: `v1.group<i>.bench.example.com`, every tenth group also with `v2`.
fn apiservices(n: usize) -> Vec<Arc<ApiService>> {
    let service = common::backend_service();
    (0..n)
        .map(|i| {
            let (group, version) = (format!("group{}.bench.example.com", i / 2), if i % 2 == 0 { "v1" } else { "v2" });
            Arc::new(ApiService {
                name: format!("{version}.{group}").into(),
                group: group.into(),
                version: version.into(),
                group_priority_minimum: 1000 + (i % 97) as i32,
                version_priority: 15 + (i % 2) as i32,
                service: Some(service.clone()),
                policy: Default::default(),
                meta: Default::default(),
            })
        })
        .collect()
}

fn resolver() -> Arc<dyn ServiceResolver> {
    Arc::new(StaticResolver::new(HashMap::from([(
        "bench/backend:443".to_owned(),
        vec!["127.0.0.1:9443".parse().expect("authority")],
    )])))
}

/// What the request path does per request: classify the path, then look the route up.
fn lookup<'t>(table: &'t RoutingTable, path: &str) -> Option<&'t Arc<kube_aggregation_proxy::routing::Route>> {
    match classify(path) {
        ApiPath::GroupVersion { group, version, .. } => table.route(group, version),
        _ => None,
    }
}

fn route_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    let clients = Backends::default();
    for n in SIZES {
        let table = RoutingTable::build(&apiservices(n), resolver().as_ref(), &clients);
        // A group in the middle of the table, a resource path as kubectl sends it.
        let path = format!("/apis/group{}.bench.example.com/v1/namespaces/default/things/thing-1", n / 4);
        assert!(lookup(&table, &path).is_some(), "the benchmark path routes");
        group.bench_with_input(BenchmarkId::new("hit", n), &path, |b, path| b.iter(|| lookup(&table, black_box(path))));
        let miss = "/apis/absent.bench.example.com/v1/namespaces/default/things/thing-1";
        group.bench_with_input(BenchmarkId::new("miss", n), miss, |b, path| b.iter(|| lookup(&table, black_box(path))));
    }
    group.finish();
}

fn table_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_build");
    let clients = Backends::default();
    let resolver = resolver();
    for n in SIZES {
        let set = apiservices(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
            b.iter_with_large_drop(|| RoutingTable::build(set, resolver.as_ref(), &clients))
        });
    }
    group.finish();
}

/// `writer::apply` as the writer task runs it: compare with the serving table, build, swap,
/// drop unused clients, record metrics. Alternates between two snapshots that differ in one
/// APIService so every call publishes; `unchanged` is the no-op check a rescan pays.
fn table_swap(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_apply");
    let clients = Backends::default();
    let metrics = Metrics::new();
    for n in SIZES {
        let a = apiservices(n);
        let mut b = a.clone();
        let mut changed = (*b[n / 2]).clone();
        changed.version_priority += 100;
        b[n / 2] = Arc::new(changed);
        let snapshots =
            [Snapshot { apiservices: a, resolver: resolver() }, Snapshot { apiservices: b, resolver: resolver() }];
        let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
        let mut i = 0usize;
        group.bench_function(BenchmarkId::new("changed", n), |bench| {
            bench.iter(|| {
                i += 1;
                assert!(writer::apply(&snapshots[i % 2], &table, &clients, &metrics));
            })
        });
        group.bench_function(BenchmarkId::new("unchanged", n), |bench| {
            bench.iter(|| assert!(!writer::apply(&snapshots[i % 2], &table, &clients, &metrics)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::quick();
    targets = route_lookup, table_build, table_swap
}
criterion_main!(benches);

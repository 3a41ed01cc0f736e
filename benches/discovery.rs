//! Legacy discovery: building `/apis` (APIGroupList) from the routing table and serializing it
//! to JSON, at 1,000 groups (half of them with two versions), as the `/apis` handler does.

mod common;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use kube_aggregation_proxy::apiservice::ApiService;
use kube_aggregation_proxy::backend::Backends;
use kube_aggregation_proxy::discovery::api_group_list;
use kube_aggregation_proxy::routing::{RoutingTable, StaticResolver};

const GROUPS: usize = 1_000;

fn table() -> RoutingTable {
    let service = common::backend_service();
    let apiservices = (0..GROUPS)
        .flat_map(|g| {
            let versions: &[&str] = if g % 2 == 0 { &["v1", "v1beta1"] } else { &["v1"] };
            let service = service.clone();
            versions.iter().enumerate().map(move |(i, version)| {
                let group = format!("group{g}.bench.example.com");
                Arc::new(ApiService {
                    name: format!("{version}.{group}").into(),
                    group: group.into(),
                    version: (*version).into(),
                    group_priority_minimum: 1000 + (g % 97) as i32,
                    version_priority: 20 - i as i32,
                    service: Some(service.clone()),
                    policy: Default::default(),
                    meta: Default::default(),
                })
            })
        })
        .collect::<Vec<_>>();
    RoutingTable::build(&apiservices, &StaticResolver::default(), &Backends::default())
}

fn discovery(c: &mut Criterion) {
    let table = table();
    let mut group = c.benchmark_group("discovery");
    group.bench_function("api_group_list_1000_groups", |b| b.iter(|| api_group_list(black_box(&table))));
    group.bench_function("api_group_list_json_1000_groups", |b| {
        b.iter(|| serde_json::to_vec(&api_group_list(black_box(&table))).map(|v| v.len()))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::quick();
    targets = discovery
}
criterion_main!(benches);

//! Identity header rewrite: stripping what a client asserted (`X-Remote-*`, `Impersonate-*`,
//! `Authorization`, the configured requestheader names) and injecting the authenticated user,
//! on the header set kubectl sends plus one spoofing attempt.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use kube_aggregation_proxy::auth::identity::{inject, IdentityHeaderNames, UserInfo};

fn client_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "127.0.0.1:8443"),
        ("user-agent", "kubectl/v1.37.2 (linux/amd64) kubernetes/abcdef0"),
        ("accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
        ("accept-encoding", "gzip"),
        ("authorization", "Bearer 0123456789abcdef0123456789abcdef"),
        ("kubectl-command", "kubectl get"),
        ("kubectl-session", "5b1a3c7e-0000-4000-8000-000000000000"),
        ("x-remote-user", "system:admin"),
    ] {
        headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    headers
}

fn identity(c: &mut Criterion) {
    let names = IdentityHeaderNames::new(["X-Remote-User", "X-Remote-Group"], ["X-Remote-Extra-"]);
    let mut user = UserInfo::new("alice", vec!["dev".into(), "ops".into(), "system:authenticated".into()]);
    user.uid = Some("1001".into());
    let headers = client_headers();
    let mut group = c.benchmark_group("identity");
    group.bench_function("strip", |b| {
        b.iter_batched_ref(|| headers.clone(), |h| names.strip(black_box(h)), BatchSize::SmallInput)
    });
    group.bench_function("inject", |b| {
        b.iter_batched_ref(|| headers.clone(), |h| inject(black_box(&user), h), BatchSize::SmallInput)
    });
    group.bench_function("strip_and_inject", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |h| {
                names.strip(h);
                inject(black_box(&user), h)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::quick();
    targets = identity
}
criterion_main!(benches);

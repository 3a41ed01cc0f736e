//! Identity header rewrite: stripping what a client asserted (`X-Remote-*`, `Impersonate-*`,
//! `Authorization`, the configured requestheader names) and injecting the authenticated user,
//! on the header set kubectl sends plus one spoofing attempt; and client-certificate
//! authentication, on a new connection (the chain verified and parsed) and on a later request
//! of the same connection (what the connection learnt is reused).

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use kube_aggregation_proxy::auth::identity::{inject, IdentityHeaderNames, UserInfo};
use kube_aggregation_proxy::auth::x509::{ChainVerifier, ClientCertAuthenticator, PeerChain};
use kube_aggregation_proxy::auth::{Authenticator, Credentials};

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

    let ca = kube_aggregation_proxy::pki::CertificateAuthority::new("client-ca").unwrap();
    let chain = ca.issue_client("alice", &["dev", "ops"]).unwrap().certified_key().unwrap().chain;
    let verifier = ChainVerifier::from_pem(ca.cert_pem().as_bytes(), "client-ca").unwrap();
    let x509 = ClientCertAuthenticator::new(verifier);
    let no_headers = HeaderMap::new();
    let mut group = c.benchmark_group("client_certificate");
    group.bench_function("first_request_on_a_connection", |b| {
        b.iter_batched(
            || PeerChain::new(chain.clone()),
            |peer| x509.authenticate(Credentials { peer: &peer, headers: &no_headers }).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let peer = PeerChain::new(chain.clone());
    group.bench_function("later_request_on_the_connection", |b| {
        b.iter(|| x509.authenticate(Credentials { peer: black_box(&peer), headers: &no_headers }).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::quick();
    targets = identity
}
criterion_main!(benches);

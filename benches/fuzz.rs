//! Bounded-time fuzzing of the parsers that take untrusted input (not part of the test
//! command; run it like a benchmark):
//!
//! ```sh
//! cargo bench --locked --bench fuzz -- [SECONDS_PER_TARGET] [TARGET...]
//! ```
//!
//! cargo-fuzz needs a nightly toolchain and these machines have only stable, so this is a
//! mutation fuzzer of our own: each target starts from a corpus of real inputs and mutates it
//! (bytes flipped, inserted, deleted, spliced from other seeds, structure tokens repeated),
//! with a seeded RNG so a crash is reproducible from the seed printed. Every target checks
//! the property that matters, not only "does not panic": stripping leaves no identity header,
//! injected identity reads back the same, routing never sends a path to another group's
//! backend, and so on. A finding is printed with its seed and input, and the run exits 1;
//! every one found becomes a regression test next to the code it broke.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use kube_aggregation_proxy::apiservice::manifest::{parse_documents, yaml_shape};
use kube_aggregation_proxy::apiservice::{validate, ApiService};
use kube_aggregation_proxy::auth::identity::{self, IdentityHeaderNames, UserInfo};
use kube_aggregation_proxy::auth::requestheader::{identity_from_headers, RequestHeaderConfig};
use kube_aggregation_proxy::auth::token::TokenFile;
use kube_aggregation_proxy::auth::x509::ChainVerifier;
use kube_aggregation_proxy::backend::Backends;
use kube_aggregation_proxy::discovery::aggregated::{accepts_json, is_aggregated_v2_content_type, negotiate};
use kube_aggregation_proxy::pki::CertificateAuthority;
use kube_aggregation_proxy::routing::path::{classify, ApiPath};
use kube_aggregation_proxy::routing::{RoutingTable, StaticResolver};
use kube_aggregation_proxy::server::request_info::RequestInfo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MANIFEST_SEEDS: &[&str] = &[
    include_str!("../manifests/demo/v1.echo.example.com.yaml"),
    include_str!("../manifests/demo/v1beta1.metrics.k8s.io.yaml"),
    "apiVersion: v1\nkind: List\nitems:\n- apiVersion: apiregistration.k8s.io/v1\n  kind: APIService\n  metadata: {name: v1.a.io}\n  spec: {group: a.io, version: v1, groupPriorityMinimum: 1, versionPriority: 1}\n",
    r#"{"apiVersion":"apiregistration.k8s.io/v1","kind":"APIService","metadata":{"name":"v1."},"spec":{"version":"v1","groupPriorityMinimum":18000,"versionPriority":1}}"#,
    "a: &x [1, 2]\nb: *x\nc: |\n  text\n  [[[\n",
];
const PATH_SEEDS: &[&str] = &[
    "/apis/metrics.k8s.io/v1beta1/nodes",
    "/apis/echo.example.com/v1/namespaces/default/things/x?watch=true",
    "/api/v1/namespaces/kube-system/pods/p/log?follow=true",
    "/apis/echo.example.com//v1/things",
    "/apis/echo.example.com/v1/../../metrics.k8s.io/v1beta1",
    "/apis/%2e%2e/v1",
    "/apis/echo.example.com/v1/watch/namespaces/a/things?fieldSelector=metadata.name%3Dx",
];
const TOKEN_SEEDS: &[&str] = &[
    "token1,alice,1001,\"dev,ops\"\n",
    "t2,bob,u2\n# comment\nt3,\"carol, c\",u3,\"a\"\n",
    "t4,jürgen,1,\"développeurs\"\n",
];
const ACCEPT_SEEDS: &[&str] = &[
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;q=0.9",
    "application/vnd.kubernetes.protobuf;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
    "application/json;as=Table;g=meta.k8s.io;v=v1, */*;q=0",
    "*/*",
];
const TOKENS: &[&[u8]] = &[
    b"[", b"{", b"- ", b": ", b"&a ", b"*a", b"\"", b"'", b"|\n", b"\n  ", b"%2F", b"/", b"//", b";", b",", b"=",
    b"q=0", b"\xff", b"\r\n", b"\0",
];

/// A mutated copy of one of `seeds`.
fn mutate(rng: &mut StdRng, seeds: &[&str]) -> Vec<u8> {
    let mut data = seeds[rng.random_range(0..seeds.len())].as_bytes().to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let at = if data.is_empty() { 0 } else { rng.random_range(0..data.len()) };
        match rng.random_range(0..6) {
            0 if !data.is_empty() => data[at] ^= 1 << rng.random_range(0..8),
            1 => data.insert(at, rng.random()),
            2 if !data.is_empty() => {
                let end = (at + rng.random_range(1..16)).min(data.len());
                data.drain(at..end);
            }
            3 => {
                let other = seeds[rng.random_range(0..seeds.len())].as_bytes();
                let from = rng.random_range(0..other.len().max(1));
                let to = (from + rng.random_range(1..64)).min(other.len());
                data.splice(at..at, other[from.min(to)..to].iter().copied());
            }
            4 => {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                let times = rng.random_range(1..200);
                data.splice(at..at, token.iter().copied().cycle().take(token.len() * times));
            }
            _ => {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
        }
    }
    data
}

fn fuzz_manifest(input: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(input) else { return Ok(()) };
    let shape = yaml_shape(text);
    if shape.depth > 64 || shape.aliases > 16 {
        return Ok(()); // the file source refuses these before parsing
    }
    if let Ok(objects) = parse_documents(text, "fuzz.yaml") {
        for object in &objects {
            if let Ok(valid) = validate(object) {
                if valid.name.is_empty() || valid.version.is_empty() {
                    return Err(format!("validation accepted an empty name or version: {valid:?}"));
                }
            }
        }
    }
    Ok(())
}

struct RoutingFixture {
    table: RoutingTable,
}

impl RoutingFixture {
    fn new() -> Self {
        let apiservice = |name: &str, service: Option<&str>| -> Arc<ApiService> {
            let (version, group) = name.split_once('.').unwrap_or_default();
            let mut yaml = format!(
                "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {{name: {name}}}\n\
                 spec: {{group: '{group}', version: {version}, groupPriorityMinimum: 100, versionPriority: 10"
            );
            if let Some(s) = service {
                yaml.push_str(&format!(", insecureSkipTLSVerify: true, service: {{namespace: ns, name: {s}}}"));
            }
            yaml.push_str("}\n");
            let object = parse_documents(&yaml, "fixture").expect("fixture parses").remove(0);
            Arc::new(validate(&object).expect("fixture is valid"))
        };
        let set = [
            apiservice("v1beta1.metrics.k8s.io", Some("metrics")),
            apiservice("v1.echo.example.com", Some("echo")),
            apiservice("v1.", None),
        ];
        let resolver = StaticResolver::new(HashMap::from([
            ("ns/metrics:443".to_owned(), vec!["127.0.0.1:1".parse().expect("authority")]),
            ("ns/echo:443".to_owned(), vec!["127.0.0.1:2".parse().expect("authority")]),
        ]));
        Self { table: RoutingTable::build(&set, &resolver, &Backends::default()) }
    }
}

fn fuzz_path(routing: &RoutingFixture, input: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(input) else { return Ok(()) };
    let (path, query) = text.split_once('?').map_or((text, None), |(p, q)| (p, Some(q)));
    for method in [Method::GET, Method::POST, Method::DELETE, Method::from_bytes(b"FOO").expect("method")] {
        let info = RequestInfo::parse(&method, path, query);
        let _ = (info.is_long_running(), info.is_mutating(), info.verb.as_str());
    }
    // A route is only ever the one of the group and version the path names, segment by segment.
    if let ApiPath::GroupVersion { group, version, .. } = classify(path) {
        if let Some(route) = routing.table.route(group, version) {
            let mut segments = path.trim_start_matches('/').split('/');
            let (apis, g, v) = (segments.next(), segments.next(), segments.next());
            if apis != Some("apis") || g != Some(&*route.apiservice.group) || v != Some(&*route.apiservice.version) {
                return Err(format!("{path:?} routed to {}", route.apiservice.name));
            }
        }
    }
    Ok(())
}

struct IdentityFixture {
    names: IdentityHeaderNames,
    requestheader: RequestHeaderConfig,
}

impl IdentityFixture {
    fn new() -> Self {
        let ca = CertificateAuthority::new("fuzz").expect("CA");
        let verifier = ChainVerifier::from_pem(ca.cert_pem().as_bytes(), "fuzz CA").expect("verifier");
        Self {
            names: IdentityHeaderNames::new(["X-Custom-User"], ["X-Custom-Extra-"]),
            requestheader: RequestHeaderConfig::with_default_headers(verifier, vec![]),
        }
    }
}

fn fuzz_identity(fixture: &IdentityFixture, input: &[u8]) -> Result<(), String> {
    // Headers: the input split into name/value pairs at NUL bytes.
    let mut headers = HeaderMap::new();
    let mut parts = input.split(|b| *b == 0);
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    fixture.names.strip(&mut headers);
    for name in headers.keys() {
        let n = name.as_str();
        if n.starts_with("x-remote-")
            || n.starts_with("impersonate-")
            || n == "authorization"
            || n.starts_with("x-custom-")
        {
            return Err(format!("{n} survived stripping"));
        }
    }
    // Injection round trip: whatever identity goes out reads back the same through the
    // requestheader reader a backend (or the next proxy) uses.
    let text = String::from_utf8_lossy(input);
    let mut fields = text.split('\u{1}');
    let name = fields.next().unwrap_or_default().to_owned();
    let mut user = UserInfo::new(if name.is_empty() { "u".to_owned() } else { name }, Vec::new());
    user.groups = fields.next().unwrap_or_default().split(',').filter(|g| !g.is_empty()).map(str::to_owned).collect();
    if let Some(key) = fields.next().filter(|k| !k.is_empty()) {
        user.extra.insert(key.to_lowercase(), vec![fields.next().unwrap_or("v").to_owned()]);
    }
    let mut out = HeaderMap::new();
    if identity::inject(&user, &mut out).is_ok() {
        let back = identity_from_headers(&fixture.requestheader, &out).ok_or("injected identity has no user")?;
        let expected_extra: std::collections::BTreeMap<_, _> = user
            .extra
            .iter()
            .filter(|(_, v)| v.iter().all(|v| !v.is_empty()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if back.name != user.name || back.groups != user.groups || back.extra != expected_extra {
            return Err(format!("identity did not round-trip: sent {user:?}, read {back:?}"));
        }
    }
    Ok(())
}

fn fuzz_tokens(input: &[u8]) -> Result<(), String> {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = TokenFile::parse(text, "fuzz.csv");
    }
    Ok(())
}

fn fuzz_accept(input: &[u8]) -> Result<(), String> {
    let Ok(value) = HeaderValue::from_bytes(input) else { return Ok(()) };
    let mut headers = HeaderMap::new();
    headers.insert(http::header::ACCEPT, value.clone());
    let _ = (accepts_json(&headers), negotiate(&headers));
    if let Ok(text) = value.to_str() {
        let _ = is_aggregated_v2_content_type(text);
    }
    Ok(())
}

fn main() {
    // `cargo bench` passes `--bench`; anything numeric is the time per target.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let seconds = args.iter().find_map(|a| a.parse::<u64>().ok()).unwrap_or(20);
    let only: Vec<&str> = args.iter().filter(|a| a.parse::<u64>().is_err()).map(String::as_str).collect();
    let routing = RoutingFixture::new();
    let identity_fixture = IdentityFixture::new();
    type Target<'a> = (&'static str, &'static [&'static str], Box<dyn Fn(&[u8]) -> Result<(), String> + 'a>);
    let targets: Vec<Target<'_>> = vec![
        ("manifest", MANIFEST_SEEDS, Box::new(fuzz_manifest)),
        ("path", PATH_SEEDS, Box::new(|i| fuzz_path(&routing, i))),
        ("identity", PATH_SEEDS, Box::new(|i| fuzz_identity(&identity_fixture, i))),
        ("tokens", TOKEN_SEEDS, Box::new(fuzz_tokens)),
        ("accept", ACCEPT_SEEDS, Box::new(fuzz_accept)),
    ];
    std::panic::set_hook(Box::new(|_| {}));
    let mut findings = 0;
    for (name, seeds, target) in &targets {
        if !only.is_empty() && !only.contains(name) {
            continue;
        }
        let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        let mut rng = StdRng::seed_from_u64(seed);
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut runs = 0u64;
        while Instant::now() < deadline && findings < 10 {
            let input = mutate(&mut rng, seeds);
            let outcome = catch_unwind(AssertUnwindSafe(|| target(&input)));
            runs += 1;
            let failure = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(property)) => property,
                Err(panic) => format!(
                    "panic: {}",
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                ),
            };
            findings += 1;
            println!(
                "{name}: FINDING (FUZZ_SEED={seed}, run {runs}): {failure}\n  input: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        println!("{name}: {runs} inputs in {seconds}s, seed {seed}");
    }
    if findings > 0 {
        std::process::exit(1);
    }
}

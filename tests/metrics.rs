//! Metrics through the real proxy: kube's names and verbs, series that go when their
//! APIService goes, and no client able to add a series.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::backend::TestBackend;
use common::client::TestClient;
use common::standalone::{apiservice_yaml, Standalone, SAMPLE_NAMESPACE};
use common::wait::eventually;
use http::Method;
use rand::Rng;

/// The series (name and labels, without the value) of the families requests can touch.
fn request_series(metrics: &str) -> BTreeSet<String> {
    const FAMILIES: [&str; 4] = [
        "aggregator_proxy_request",
        "apiserver_kube_aggregator_request",
        "authentication_attempts",
        "apiserver_authorization",
    ];
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && FAMILIES.iter().any(|f| l.starts_with(f)))
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

async fn scrape(admin: &TestClient, env: &Standalone) -> String {
    let r = admin.get(&env.url("/metrics")).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    r.text()
}

fn random_token(rng: &mut impl Rng) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-";
    let len = rng.random_range(4..24);
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// One request with a random method (standard or an extension token) and a random path, as
/// an unauthenticated client. Returns the tokens it used, to look for them in the scrape.
async fn random_request(client: &TestClient, env: &Standalone) -> Vec<String> {
    const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"];
    let (method, tokens, path) = {
        let mut rng = rand::rng();
        let extension = rng.random_bool(0.5);
        let method = if extension {
            format!("X{}", random_token(&mut rng).to_ascii_uppercase())
        } else {
            METHODS[rng.random_range(0..METHODS.len())].to_owned()
        };
        let (a, b, c) = (random_token(&mut rng), random_token(&mut rng), random_token(&mut rng));
        let path = match rng.random_range(0..5) {
            0 => format!("/apis/{a}/{b}/namespaces/{c}/things"),
            1 => format!("/apis/echo.example.com/v1/{a}/{b}?watch={c}"),
            2 => format!("/api/v1/namespaces/{a}/pods/{b}/{c}"),
            3 => format!("/{a}/{b}"),
            _ => format!("/apis/{a}"),
        };
        let mut tokens = vec![a, b, c];
        if extension {
            tokens.push(method.clone());
        }
        (method, tokens, path)
    };
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let r = client
        .request(method.clone(), &env.url(&path), &[], "")
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
    tokens
}

#[tokio::test]
async fn ten_thousand_random_unauthenticated_requests_add_no_series() {
    let env = Standalone::start().await;
    let admin = env.admin();
    let anonymous = env.client().http2_only().build();
    let mut tokens = Vec::new();
    let mut after_warm_up = BTreeSet::new();
    // The admin's scrapes count too: one before the comparison starts.
    scrape(&admin, &env).await;
    for batch in 0..100 {
        let results = futures_util::future::join_all((0..100).map(|_| random_request(&anonymous, &env))).await;
        tokens.extend(results.into_iter().flatten());
        if batch == 19 {
            after_warm_up = request_series(&scrape(&admin, &env).await);
        }
    }
    let text = scrape(&admin, &env).await;
    let after = request_series(&text);
    assert_eq!(after, after_warm_up, "8,000 more requests added series");
    // Every verb is one of kube's, and no path or method of the client's shows up anywhere.
    for line in text.lines().filter(|l| l.starts_with("aggregator_proxy_requests_total{")) {
        let verb = line.split("verb=\"").nth(1).and_then(|v| v.split('"').next()).unwrap();
        const KUBE_VERBS: [&str; 13] = [
            "APPLY",
            "CONNECT",
            "DELETE",
            "DELETECOLLECTION",
            "GET",
            "LIST",
            "PATCH",
            "POST",
            "PROXY",
            "PUT",
            "WATCH",
            "WATCHLIST",
            "other",
        ];
        assert!(KUBE_VERBS.contains(&verb), "{line}");
    }
    for token in tokens.iter().filter(|t| t.len() >= 8) {
        assert!(!text.contains(token.as_str()), "{token} reached the metrics");
    }
    assert!(text.contains(r#"authentication_attempts_total{result="failure"} 10000"#), "{text}");
}

#[tokio::test]
async fn an_apiservice_leaving_the_table_takes_its_series_with_it() {
    let env = Standalone::start().await;
    env.write_manifest(
        "gone.yaml",
        &apiservice_yaml("v1.gone.example.com", 100, 10, Some(("not-in-the-service-map", 443)), None),
    );
    let admin = env.admin();
    eventually(Duration::from_secs(10), || async {
        let text = scrape(&admin, &env).await;
        let flipped =
            r#"aggregator_unavailable_apiservice_total{name="v1.gone.example.com",reason="ServiceNotFound"} 1"#;
        if text.contains(flipped) && text.contains(r#"aggregator_unavailable_apiservice{name="v1.gone.example.com"} 1"#)
        {
            Ok(())
        } else {
            Err("v1.gone.example.com not yet counted unavailable")
        }
    })
    .await;
    for path in [
        "/apis/metrics.k8s.io/v1beta1/nodes",
        "/apis/metrics.k8s.io/v1beta1/nodes?watch=true&timeoutSeconds=1",
        "/apis/echo.example.com/v1/namespaces/default/echoes/one",
        "/apis/gone.example.com/v1/things",
    ] {
        admin.get(&env.url(path)).await.unwrap();
    }
    let text = scrape(&admin, &env).await;
    for series in [
        r#"apiserver_kube_aggregator_request_total{group="metrics.k8s.io",version="v1beta1",verb="LIST",code="200"} 1"#,
        r#"apiserver_kube_aggregator_request_total{group="metrics.k8s.io",version="v1beta1",verb="WATCH",code="200"} 1"#,
        r#"apiserver_kube_aggregator_request_total{group="echo.example.com",version="v1",verb="GET",code="200"} 1"#,
        r#"apiserver_kube_aggregator_request_total{group="gone.example.com",version="v1",verb="LIST",code="503"} 1"#,
        r#"apiserver_kube_aggregator_request_duration_seconds_count{group="gone.example.com",version="v1",verb="LIST",code="503"} 1"#,
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    std::fs::remove_file(env.apiservices_dir().join("gone.yaml")).unwrap();
    std::fs::remove_file(env.apiservices_dir().join("metrics.yaml")).unwrap();
    let text = eventually(Duration::from_secs(10), || async {
        let text = scrape(&admin, &env).await;
        let left = ["gone.example.com", "metrics.k8s.io"].into_iter().find(|name| text.contains(name));
        match left {
            None => Ok(text),
            Some(name) => Err(format!("series of {name} still exported")),
        }
    })
    .await;
    assert!(text.contains(r#"apiserver_kube_aggregator_request_total{group="echo.example.com""#), "{text}");
}

#[tokio::test]
async fn a_backend_certificate_naming_its_host_only_in_the_common_name_is_counted() {
    let pki = common::standalone::Pki::new();
    let cn_only = pki.serving_ca.issue_serving("cn-only.kube-system.svc", &[]).unwrap();
    let backend = TestBackend::start_serving(
        &cn_only,
        std::sync::Arc::new(|_| http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))),
    )
    .await;
    let addr = backend.addr;
    let env = Standalone::start_with(|s| s.services.push(format!("{SAMPLE_NAMESPACE}/cn-only:443={addr}"))).await;
    let admin = env.admin();
    let missing_san = || async {
        let text = scrape(&admin, &env).await;
        text.lines()
            .find_map(|l| l.strip_prefix("apiserver_kube_aggregator_x509_missing_san_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no missing-SAN counter in\n{text}"))
    };
    // A certificate that carries names, just not this one, is refused but not counted.
    env.write_manifest(
        "impostor.yaml",
        &apiservice_yaml(
            "v1.impostor.example.com",
            100,
            10,
            Some(("impostor", 443)),
            Some(env.pki.serving_ca.cert_pem()),
        ),
    );
    let refused = |path: &'static str| {
        let (admin, url) = (&admin, env.url(path));
        async move {
            eventually(Duration::from_secs(10), || async {
                let r = admin.get(&url).await.map_err(|e| e.to_string())?;
                if r.status == 503 {
                    Ok(r.text())
                } else {
                    Err(format!("{url}: {} {}", r.status, r.text()))
                }
            })
            .await
        }
    };
    let impostor = refused("/apis/impostor.example.com/v1/things").await;
    assert!(impostor.contains("certificate not valid for impostor.kube-system.svc"), "{impostor}");
    assert_eq!(missing_san().await, 0);
    env.write_manifest(
        "cn-only.yaml",
        &apiservice_yaml("v1.cn-only.example.com", 100, 10, Some(("cn-only", 443)), Some(pki.serving_ca.cert_pem())),
    );
    let cn_only = refused("/apis/cn-only.example.com/v1/things").await;
    assert!(cn_only.contains("certificate not valid for cn-only.kube-system.svc"), "{cn_only}");
    assert!(missing_san().await >= 1);
}

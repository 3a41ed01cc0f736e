//! The standalone proxy over real TLS on loopback, with the real sample extension server as
//! backend: routing, hot reload, identity, errors, streaming and both HTTP versions.

mod common;

use std::time::Duration;

use common::client::{TestClient, TestResponse};
use common::standalone::{apiservice_yaml, backend_connections, Sample, Standalone, SAMPLE_SERVICE, TOKEN};
use common::wait::eventually;
use http::{Method, StatusCode, Version};

const SETTLE: Duration = Duration::from_secs(5);

async fn status_of(client: &TestClient, url: &str) -> StatusCode {
    client.get(url).await.expect("request completes").status
}

/// Polls `url` until it answers `want`, and returns that response.
async fn eventually_status(client: &TestClient, url: &str, want: StatusCode) -> TestResponse {
    common::wait::eventually_status(SETTLE, client, url, want).await
}

/// Polls `/debug/apiservices` until it lists `count` rejections, and returns it.
async fn eventually_rejections(env: &Standalone, count: usize) -> serde_json::Value {
    let admin = env.admin();
    eventually(SETTLE, || async {
        let debug = admin.get(&env.url("/debug/apiservices")).await.map_err(|e| e.to_string())?.json();
        match debug["rejected"].as_array().map(Vec::len) {
            Some(n) if n == count => Ok(debug),
            n => Err(format!("rejections: {n:?}")),
        }
    })
    .await
}

#[tokio::test]
async fn requests_are_routed_by_group_and_version() {
    let env = Standalone::start().await;
    let admin = env.admin();

    let echo = admin.get(&env.url("/apis/echo.example.com/v1/namespaces/default/echoes/x?limit=5")).await.unwrap();
    assert_eq!(echo.status, 200, "{}", echo.text());
    let seen = echo.json();
    assert_eq!(seen["path"], "/apis/echo.example.com/v1/namespaces/default/echoes/x");
    assert_eq!(seen["query"], "limit=5");

    let nodes = admin.get(&env.url("/apis/metrics.k8s.io/v1beta1/nodes")).await.unwrap();
    assert_eq!(nodes.status, 200, "{}", nodes.text());
    assert_eq!(nodes.json()["kind"], "NodeMetricsList");

    // Discovery lists groups by groupPriorityMinimum: the proxy's own apiregistration.k8s.io
    // first, then echo (1000) before metrics (100).
    let apis = admin.get(&env.url("/apis")).await.unwrap().json();
    let groups: Vec<_> = apis["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(groups, ["apiregistration.k8s.io", "echo.example.com", "metrics.k8s.io"]);
    let group = admin.get(&env.url("/apis/metrics.k8s.io")).await.unwrap().json();
    assert_eq!(group["preferredVersion"]["groupVersion"], "metrics.k8s.io/v1beta1");
}

#[tokio::test]
async fn the_preferred_version_follows_version_priority() {
    let env = Standalone::start().await;
    let ca = env.pki.serving_ca.cert_pem();
    env.write_manifest(
        "v2.yaml",
        &apiservice_yaml("v2beta1.echo.example.com", 1000, 20, Some((SAMPLE_SERVICE, 443)), Some(ca)),
    );
    let admin = env.admin();
    let preferred = eventually(SETTLE, || async {
        let group = admin.get(&env.url("/apis/echo.example.com")).await.map_err(|e| e.to_string())?.json();
        match group["preferredVersion"]["version"].as_str() {
            Some("v2beta1") => Ok(group),
            other => Err(format!("preferred version is {other:?}")),
        }
    })
    .await;
    assert_eq!(preferred["versions"][1]["version"], "v1");
    // Both versions route to the backend, which serves only v1: its own 404 comes back.
    assert_eq!(status_of(&admin, &env.url("/apis/echo.example.com/v1/x")).await, 200);
    let v2 = admin.get(&env.url("/apis/echo.example.com/v2beta1/x")).await.unwrap();
    assert_eq!(v2.status, 404);
    assert_eq!(v2.json()["message"], "the server could not find the requested resource");
}

#[tokio::test]
async fn manifests_are_hot_reloaded_when_removed_added_and_changed() {
    let env = Standalone::start().await;
    let admin = env.admin();
    let url = env.url("/apis/echo.example.com/v1/things");
    let manifest = env.apiservices_dir().join("echo.yaml");
    let original = std::fs::read_to_string(&manifest).unwrap();

    std::fs::remove_file(&manifest).unwrap();
    let gone = eventually_status(&admin, &url, StatusCode::NOT_FOUND).await.json();
    assert_eq!(
        gone["message"],
        "the server could not find the requested resource: no APIService serves echo.example.com/v1"
    );

    env.write_manifest("echo.yaml", &original);
    eventually_status(&admin, &url, StatusCode::OK).await;

    // Pointing it at a service the static map does not know makes it unavailable.
    let ca = env.pki.serving_ca.cert_pem();
    env.write_manifest("echo.yaml", &apiservice_yaml("v1.echo.example.com", 10, 10, Some(("nowhere", 443)), Some(ca)));
    let body = eventually_status(&admin, &url, StatusCode::SERVICE_UNAVAILABLE).await.json();
    assert_eq!(body["reason"], "ServiceUnavailable");
    assert_eq!(
        body["message"],
        "APIService \"v1.echo.example.com\" is unavailable: service kube-system/nowhere not found"
    );
    // The other APIService never stopped serving.
    assert_eq!(status_of(&admin, &env.url("/apis/metrics.k8s.io/v1beta1/nodes")).await, 200);
}

#[tokio::test]
async fn an_invalid_manifest_is_rejected_with_its_reason_while_the_others_keep_serving() {
    let env = Standalone::start().await;
    let admin = env.admin();
    env.write_manifest("bad.yaml", &apiservice_yaml("v1.bad.example.com", 0, 10, Some((SAMPLE_SERVICE, 443)), None));
    let debug = eventually_rejections(&env, 1).await;
    let reason = debug["rejected"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("bad.yaml"), "{reason}");
    assert!(
        reason.contains("spec.groupPriorityMinimum: Invalid value: 0: must be positive and less than 20000"),
        "{reason}"
    );
    assert_eq!(status_of(&admin, &env.url("/apis/bad.example.com/v1/x")).await, 404);
    assert_eq!(status_of(&admin, &env.url("/apis/echo.example.com/v1/x")).await, 200);

    // A good file broken by an edit keeps serving its last good version.
    env.write_manifest(
        "echo.yaml",
        "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {name: v1.echo.example.com\n",
    );
    eventually_rejections(&env, 2).await;
    assert_eq!(status_of(&admin, &env.url("/apis/echo.example.com/v1/x")).await, 200);
    let metrics = admin.get(&env.url("/metrics")).await.unwrap().text();
    assert!(metrics.contains("aggregator_invalid_apiservices 2"), "{metrics}");
}

#[tokio::test]
async fn the_authenticated_identity_is_injected_and_spoofed_identity_headers_are_stripped() {
    let env = Standalone::start().await;
    let spoofs = [
        ("X-Remote-User", "system:admin"),
        ("x-remote-group", "system:masters"),
        ("X-Remote-Uid", "0"),
        ("X-Remote-Extra-Scopes", "everything"),
    ];
    // As alice by bearer token (the Authorization header must not reach the backend either).
    let alice = env.client().bearer(TOKEN).build();
    let response = alice.request(Method::GET, &env.url("/apis/echo.example.com/v1/whoami"), &spoofs, "").await.unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = response.json();
    assert_eq!(seen["user"]["name"], "alice");
    assert_eq!(seen["user"]["uid"], "1001");
    assert_eq!(seen["user"]["groups"], serde_json::json!(["dev", "ops", "system:authenticated"]));
    assert_eq!(seen["user"]["extra"], serde_json::json!({}));
    let headers = seen["headers"].as_object().unwrap();
    for name in headers.keys() {
        assert!(!name.starts_with("impersonate-"), "{name} reached the backend");
        assert_ne!(name, "authorization", "the bearer token reached the backend");
    }
    assert_eq!(headers["x-remote-user"], serde_json::json!(["alice"]));
    assert_eq!(headers["x-forwarded-proto"], serde_json::json!(["https"]));
    assert_eq!(headers["x-forwarded-uri"], serde_json::json!(["/apis/echo.example.com/v1/whoami"]));
    assert!(headers.contains_key("audit-id"));

    // As admin by client certificate.
    let seen = env
        .admin()
        .request(Method::GET, &env.url("/apis/echo.example.com/v1/whoami"), &spoofs, "")
        .await
        .unwrap()
        .json();
    assert_eq!(seen["user"]["name"], "admin");
    assert_eq!(seen["user"]["groups"], serde_json::json!(["system:masters", "system:authenticated"]));
}

/// Standalone mode has no authorizer: impersonation is refused with kube's 403 unless
/// `--impersonation-allowed-groups` names one of the caller's groups, and then the backend
/// sees the impersonated user and none of the `Impersonate-*` headers.
#[tokio::test]
async fn impersonation_is_refused_unless_the_callers_group_is_allowed_and_then_the_backend_sees_the_impersonated_user()
{
    let asks = [
        ("Impersonate-User", "bob"),
        ("Impersonate-Group", "dev"),
        ("Impersonate-Group", "ops"),
        ("Impersonate-Extra-Scopes%2Fa", "view"),
        ("Impersonate-Uid", "42"),
    ];
    let url = |env: &Standalone| env.url("/apis/echo.example.com/v1/whoami");
    let env = Standalone::start().await;
    let refused = env.admin().request(Method::GET, &url(&env), &asks, "").await.unwrap();
    assert_eq!(refused.status, 403, "{}", refused.text());
    let status = refused.json();
    assert_eq!(status["reason"], "Forbidden");
    assert_eq!(status["details"], serde_json::json!({"name": "bob", "kind": "users"}));
    let message = status["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            r#"users "bob" is forbidden: User "admin" cannot impersonate resource "users" in API group "" at the cluster scope: "#
        ) && message.contains("--impersonation-allowed-groups"),
        "{message}"
    );
    // Groups without a user are kube's 400, naming the header that is missing.
    let lone =
        env.admin().request(Method::GET, &url(&env), &[("Impersonate-Group", "system:masters")], "").await.unwrap();
    assert_eq!(lone.status, 400, "{}", lone.text());
    assert!(lone.json()["message"].as_str().unwrap().contains("Impersonate-User"), "{}", lone.text());

    let env = Standalone::start_with(|s| s.impersonation_allowed_groups = Some(vec!["system:masters".into()])).await;
    let seen = env.admin().request(Method::GET, &url(&env), &asks, "").await.unwrap();
    assert_eq!(seen.status, 200, "{}", seen.text());
    let seen = seen.json();
    assert_eq!(seen["user"]["name"], "bob");
    assert_eq!(seen["user"]["uid"], "42");
    assert_eq!(seen["user"]["groups"], serde_json::json!(["dev", "ops", "system:authenticated"]));
    assert_eq!(seen["user"]["extra"], serde_json::json!({"scopes/a": ["view"]}));
    for name in seen["headers"].as_object().unwrap().keys() {
        assert!(!name.starts_with("impersonate-"), "{name} reached the backend");
    }
    // alice (groups dev, ops) is not in the allowed group.
    let alice = env.client().bearer(TOKEN).build();
    assert_eq!(alice.request(Method::GET, &url(&env), &asks, "").await.unwrap().status, 403);
}

#[tokio::test]
async fn requests_without_valid_credentials_get_401_with_a_status_body() {
    let env = Standalone::start().await;
    for client in [env.client().build(), env.client().bearer("not-a-token").build()] {
        let response = client.get(&env.url("/apis/echo.example.com/v1/x")).await.unwrap();
        assert_eq!(response.status, 401);
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(
            response.json(),
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
        );
    }
    // Probes need no credentials.
    assert_eq!(status_of(&env.client().build(), &env.url("/readyz")).await, 200);
}

#[tokio::test]
async fn anonymous_requests_are_served_as_system_anonymous_when_enabled() {
    let env = Standalone::start_with(|s| s.anonymous_auth = Some(true)).await;
    let seen = env.client().build().get(&env.url("/apis/echo.example.com/v1/x")).await.unwrap().json();
    assert_eq!(seen["user"]["name"], "system:anonymous");
    assert_eq!(seen["user"]["groups"], serde_json::json!(["system:unauthenticated"]));
    // A bad token is still refused: anonymous is for callers with no credentials at all.
    assert_eq!(status_of(&env.client().bearer("wrong").build(), &env.url("/apis")).await, 401);
}

#[tokio::test]
async fn unknown_groups_and_the_core_api_get_404_with_a_status_body() {
    let env = Standalone::start().await;
    let admin = env.admin();
    let response = admin.get(&env.url("/apis/unknown.example.com/v1/things")).await.unwrap();
    assert_eq!(response.status, 404);
    let body = response.json();
    assert_eq!(body["reason"], "NotFound");
    assert!(body["message"].as_str().unwrap().contains("unknown.example.com/v1"), "{body}");
    assert_eq!(status_of(&admin, &env.url("/apis/unknown.example.com")).await, 404);
    assert_eq!(status_of(&admin, &env.url("/api")).await, 404);
    assert_eq!(status_of(&admin, &env.url("/api/v1/pods")).await, 404);
    // An empty segment where the version goes is no route, answered with a Status.
    let empty = admin.get(&env.url("/apis/echo.example.com//v1/things")).await.unwrap();
    assert_eq!(empty.status, 404);
    assert_eq!(empty.header("content-type"), Some("application/json"));
    assert_eq!(empty.json()["reason"], "NotFound");
    // The proxy's own answers are private, as kube-apiserver's are.
    assert_eq!(empty.header("cache-control"), Some("no-cache, private"));
    let apis = admin.get(&env.url("/apis")).await.unwrap();
    assert_eq!(apis.header("cache-control"), Some("no-cache, private"));
}

#[tokio::test]
async fn health_endpoints_list_their_checks_when_verbose_and_version_names_the_proxy() {
    let env = Standalone::start().await;
    let client = env.client().build();
    let plain = client.get(&env.url("/readyz")).await.unwrap();
    assert_eq!((plain.status.as_u16(), plain.text()), (200, "ok".to_owned()));
    let verbose = client.get(&env.url("/readyz?verbose")).await.unwrap();
    assert_eq!(verbose.status, 200);
    let text = verbose.text();
    assert!(text.starts_with("[+]ping ok\n[+]routing-table ok\n[+]shutdown ok\n"), "{text}");
    assert!(text.ends_with("readyz check passed\n"), "{text}");
    // Per-APIService lines are informational: the stopped backend below does not fail readiness.
    assert!(text.contains("informational/apiservice/v1.echo.example.com"), "{text}");
    env.write_manifest(
        "gone.yaml",
        &apiservice_yaml("v1.gone.example.com", 10, 10, Some(("no-such-service", 443)), None),
    );
    let text = eventually(Duration::from_secs(10), || async {
        let r = client.get(&env.url("/readyz?verbose")).await.map_err(|e| e.to_string())?;
        let text = r.text();
        if r.status == StatusCode::OK && text.contains("[-]informational/apiservice/v1.gone.example.com unavailable") {
            Ok(text)
        } else {
            Err(format!("{}: {text}", r.status))
        }
    })
    .await;
    assert!(text.ends_with("readyz check passed\n"), "{text}");
    let livez = client.get(&env.url("/livez?verbose=1")).await.unwrap().text();
    assert_eq!(livez, "[+]ping ok\nlivez check passed\n");
    let version = env.admin().get(&env.url("/version")).await.unwrap().json();
    assert_eq!(version["major"], env!("CARGO_PKG_VERSION_MAJOR"));
    assert_eq!(version["minor"], env!("CARGO_PKG_VERSION_MINOR"));
}

#[tokio::test]
async fn a_local_apiservice_without_a_delegate_answers_503() {
    let env = Standalone::start().await;
    env.write_manifest("local.yaml", &apiservice_yaml("v1.local.example.com", 10, 10, None, None));
    let admin = env.admin();
    let body = eventually_status(&admin, &env.url("/apis/local.example.com/v1/x"), StatusCode::SERVICE_UNAVAILABLE)
        .await
        .json();
    assert!(body["message"].as_str().unwrap().contains("no --delegate-url"), "{body}");
}

#[tokio::test]
async fn a_down_backend_answers_503_naming_the_cause_and_recovers_when_it_returns() {
    let mut env = Standalone::start().await;
    let admin = env.admin();
    let url = env.url("/apis/echo.example.com/v1/x");
    assert_eq!(status_of(&admin, &url).await, 200);

    env.sample.take().unwrap().stop().await;
    let response = admin.get(&url).await.unwrap();
    assert_eq!(response.status, 503);
    let body = response.json();
    assert_eq!(body["reason"], "ServiceUnavailable");
    let message = body["message"].as_str().unwrap();
    assert_eq!(message, "APIService \"v1.echo.example.com\" is unavailable: connection refused");
    assert!(!message.contains(&env.sample_addr.port().to_string()), "the backend address leaked: {message}");
    // Other routes and the proxy itself are unaffected.
    assert_eq!(status_of(&admin, &env.url("/apis")).await, 200);

    let restarted = Sample::start(&env.pki, env.sample_addr).await;
    eventually_status(&admin, &url, StatusCode::OK).await;
    env.sample = Some(restarted);
}

#[tokio::test]
async fn a_backend_certificate_for_another_name_is_refused_with_the_reason() {
    let env = Standalone::start().await;
    let ca = env.pki.serving_ca.cert_pem();
    env.write_manifest(
        "impostor.yaml",
        &apiservice_yaml("v1.impostor.example.com", 10, 10, Some(("impostor", 443)), Some(ca)),
    );
    let other_ca = kube_aggregation_proxy::pki::CertificateAuthority::new("someone-else").unwrap();
    env.write_manifest(
        "untrusted.yaml",
        &apiservice_yaml("v1.untrusted.example.com", 10, 10, Some((SAMPLE_SERVICE, 443)), Some(other_ca.cert_pem())),
    );
    let admin = env.admin();
    let message = |path: &'static str| {
        let (admin, url) = (admin.clone(), env.url(path));
        async move { eventually_status(&admin, &url, StatusCode::SERVICE_UNAVAILABLE).await.json()["message"].clone() }
    };
    assert_eq!(
        message("/apis/impostor.example.com/v1/x").await,
        "APIService \"v1.impostor.example.com\" is unavailable: TLS: certificate not valid for impostor.kube-system.svc"
    );
    assert_eq!(
        message("/apis/untrusted.example.com/v1/x").await,
        "APIService \"v1.untrusted.example.com\" is unavailable: TLS: certificate signed by unknown authority"
    );
}

#[tokio::test]
async fn a_streamed_response_arrives_in_pieces_before_the_backend_finishes() {
    let env = Standalone::start().await;
    for client in [
        env.client().client_cert(&env.pki.admin).http1_only().build(),
        env.client().client_cert(&env.pki.admin).http2_only().build(),
    ] {
        let stream = client
            .get_streaming(&env.url("/apis/echo.example.com/v1/namespaces/default/echoes?watch=true&timeoutSeconds=3"))
            .await
            .unwrap();
        assert_eq!(stream.status, 200);
        let started = stream.started;
        let chunks = stream.collect_chunks().await.unwrap();
        let events: Vec<serde_json::Value> = chunks
            .iter()
            .flat_map(|c| std::str::from_utf8(&c.data).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect();
        assert!(events.len() >= 3, "events: {events:?}");
        assert_eq!(events[0]["type"], "ADDED");
        let first = chunks.first().unwrap().at.duration_since(started);
        let last = chunks.last().unwrap().at.duration_since(started);
        // The backend writes one event a second for three seconds: the first must arrive while
        // the backend is still writing, not when it finishes.
        assert!(last - first >= Duration::from_millis(1500), "first at {first:?}, last at {last:?}");
    }
}

#[tokio::test]
async fn http1_and_http2_clients_are_both_served() {
    let env = Standalone::start().await;
    let h1 = env.client().client_cert(&env.pki.admin).http1_only().build();
    let h2 = env.client().client_cert(&env.pki.admin).http2_only().build();
    let r1 = h1.get(&env.url("/apis/echo.example.com/v1/x")).await.unwrap();
    let r2 = h2.get(&env.url("/apis/echo.example.com/v1/x")).await.unwrap();
    assert_eq!((r1.status, r1.version), (StatusCode::OK, Version::HTTP_11));
    assert_eq!((r2.status, r2.version), (StatusCode::OK, Version::HTTP_2));
}

#[tokio::test]
async fn request_bodies_are_forwarded_to_the_backend() {
    let env = Standalone::start().await;
    let body = r#"{"kind":"Echo","metadata":{"name":"posted"}}"#;
    let r = env
        .admin()
        .request(
            Method::POST,
            &env.url("/apis/echo.example.com/v1/namespaces/default/echoes"),
            &[("content-type", "application/json")],
            body,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body"], body);
}

#[tokio::test]
async fn metrics_count_requests_per_apiservice() {
    let env = Standalone::start().await;
    let admin = env.admin();
    for _ in 0..3 {
        assert_eq!(status_of(&admin, &env.url("/apis/echo.example.com/v1/x")).await, 200);
    }
    let metrics = admin.get(&env.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains(
            r#"apiserver_kube_aggregator_request_total{group="echo.example.com",version="v1",verb="LIST",code="200"} 3"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"aggregator_proxy_requests_total{target="apiservice",verb="LIST",code="200"} 3"#));
    assert!(metrics.contains("aggregator_routing_table_apiservices 2"), "{metrics}");
}

#[tokio::test]
async fn a_backend_redirect_is_refused_with_502_and_backend_cors_headers_are_dropped() {
    use common::backend::TestBackend;
    let backend = TestBackend::start(std::sync::Arc::new(|request| {
        let mut response =
            http::Response::builder().header("access-control-allow-origin", "*").header("x-backend", "yes");
        response = match request.uri().path() {
            "/apis/custom.example.com/v1/moved" => {
                response.status(302).header("location", "https://elsewhere.example/")
            }
            "/apis/custom.example.com/v1/no-location" => response.status(304),
            _ => response.status(200),
        };
        response.body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}"))).unwrap()
    }))
    .await;
    let addr = backend.addr;
    let env = Standalone::start_with(|s| s.services.push(format!("kube-system/custom:443={addr}"))).await;
    env.write_manifest(
        "custom.yaml",
        &apiservice_yaml("v1.custom.example.com", 10, 10, Some(("custom", 443)), None)
            .replace("  service:", "  insecureSkipTLSVerify: true\n  service:"),
    );
    let admin = env.admin();
    let ok = eventually_status(&admin, &env.url("/apis/custom.example.com/v1/x"), StatusCode::OK).await;
    assert_eq!(ok.header("x-backend"), Some("yes"));
    assert_eq!(ok.header("access-control-allow-origin"), None);

    let moved = admin.get(&env.url("/apis/custom.example.com/v1/moved")).await.unwrap();
    assert_eq!(moved.status, 502);
    assert_eq!(moved.header("location"), None);
    let body = moved.json();
    assert_eq!(body["reason"], "BadGateway");
    assert_eq!(
        body["message"],
        "APIService \"v1.custom.example.com\": the backend attempted to redirect this request, which is not permitted"
    );
    // A 3xx without Location is passed through.
    assert_eq!(status_of(&admin, &env.url("/apis/custom.example.com/v1/no-location")).await, 304);
}

/// A backend that accepts any protocol switch, greets with the user the proxy named, then
/// echoes bytes: the shape of exec/attach/port-forward streams.
async fn upgrade_echo_backend() -> std::net::SocketAddr {
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let serving = kube_aggregation_proxy::pki::self_signed_localhost().unwrap().certified_key().unwrap();
    let config = kube_aggregation_proxy::tls::server_config(&serving, None).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service =
                    hyper::service::service_fn(|mut request: http::Request<hyper::body::Incoming>| async move {
                        let user = request
                            .headers()
                            .get("x-remote-user")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let upgrade = hyper::upgrade::on(&mut request);
                        tokio::spawn(async move {
                            let Ok(upgraded) = upgrade.await else { return };
                            let mut io = TokioIo::new(upgraded);
                            let _ = io.write_all(format!("hello {user}\n").as_bytes()).await;
                            let mut buf = [0u8; 1024];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        });
                        let response = http::Response::builder()
                            .status(101)
                            .header("connection", "Upgrade")
                            .header("upgrade", "echo")
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn protocol_switches_are_piped_through_with_the_authenticated_identity() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let backend = upgrade_echo_backend().await;
    let env = Standalone::start_with(|s| s.services.push(format!("kube-system/streams:443={backend}"))).await;
    env.write_manifest(
        "streams.yaml",
        &apiservice_yaml("v1.streams.example.com", 10, 10, Some(("streams", 443)), None)
            .replace("  service:", "  insecureSkipTLSVerify: true\n  service:"),
    );
    let admin = env.admin();
    eventually_status(&admin, &env.url("/apis/streams.example.com"), StatusCode::OK).await;

    // A raw HTTP/1.1 client, as kubectl exec speaks it.
    let mut roots = rustls::RootCertStore::empty();
    for cert in kube_aggregation_proxy::tls::parse_certs(env.pki.serving_ca.cert_pem().as_bytes(), "ca").unwrap() {
        roots.add(cert).unwrap();
    }
    let key = env.pki.admin.certified_key().unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(kube_aggregation_proxy::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(key.chain.clone(), key.key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(env.proxy.local_addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    let mut stream = tokio::io::BufReader::new(tls);
    stream
        .get_mut()
        .write_all(
            b"GET /apis/streams.example.com/v1/namespaces/default/pods/p/exec HTTP/1.1\r\nHost: localhost\r\n\
              Connection: Upgrade\r\nUpgrade: echo\r\nX-Remote-User: system:admin\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = String::new();
    loop {
        let mut line = String::new();
        tokio::time::timeout(SETTLE, stream.read_line(&mut line)).await.unwrap().unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut greeting = String::new();
    tokio::time::timeout(SETTLE, stream.read_line(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(greeting, "hello admin\n", "the backend saw the authenticated user, not the spoofed one");
    stream.get_mut().write_all(b"ping\n").await.unwrap();
    let mut echoed = String::new();
    tokio::time::timeout(SETTLE, stream.read_line(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, "ping\n");
}

/// `--backend-protocol http1` speaks HTTP/1.1 to a backend that offers HTTP/2, one request
/// per connection; the default multiplexes them on one HTTP/2 connection. On the
/// work-stealing runtime, which keeps one pool: per core, the probes' runtime and each
/// client connection's have a pool each, and the count would depend on where they landed.
#[tokio::test]
async fn the_backend_protocol_is_http2_by_default_and_http1_when_asked() {
    use kube_aggregation_proxy::backend::BackendProtocol;
    use kube_aggregation_proxy::runtime::RuntimeModel;
    for (protocol, version, watches_need) in [(None, "HTTP/2.0", 1), (Some(BackendProtocol::Http1), "HTTP/1.1", 3)] {
        let env = Standalone::start_with(|s| {
            s.backend_protocol = protocol;
            s.runtime = Some(RuntimeModel::WorkStealing);
        })
        .await;
        let client = env.client().bearer(TOKEN).build();
        let echo = eventually_status(&client, &env.url("/apis/echo.example.com/v1/x"), StatusCode::OK).await;
        assert_eq!(echo.json()["httpVersion"], version, "{protocol:?}");
        // Three watches in flight at once: each holds an HTTP/1.1 connection of its own.
        let mut watches = Vec::new();
        for i in 0..3 {
            let url = env.url(&format!("/apis/echo.example.com/v1/w{i}?watch=true&timeoutSeconds=30"));
            let mut watch = client.get_streaming(&url).await.unwrap();
            assert!(watch.next_chunk().await.unwrap().is_some(), "watch {i} streams");
            watches.push(watch);
        }
        assert_eq!(backend_connections(&env).await, watches_need, "{protocol:?}");
        drop(watches);
    }
}

//! Credentials rotated in place under load: the serving certificate (to a new CA), the proxy
//! client certificate, the client CA and the token file are replaced while a bounded client
//! loop keeps asking; no request that should succeed fails, the new material is in use within
//! seconds, what was rotated out is refused, and a malformed file changes nothing but is
//! reported.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::TestClient;
use common::standalone::{Standalone, TOKEN};
use common::wait::eventually;
use http::StatusCode;
use kube_aggregation_proxy::pki::CertificateAuthority;

const OTHER_TOKEN: &str = "test-token-bob";

/// Replaces `name` in `dir` in one step (write aside, rename over), as a secret mount does.
fn replace(dir: &Path, name: &str, contents: &str) {
    let aside = dir.join(format!(".{name}.new"));
    std::fs::write(&aside, contents).unwrap();
    std::fs::rename(&aside, dir.join(name)).unwrap();
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_rotate_in_place_under_load_without_failing_a_request() {
    let env = Standalone::start().await;
    let dir = env.dir.path().to_owned();
    let url = env.url("/apis/echo.example.com/v1/x");
    let new_serving_ca = CertificateAuthority::new("rotated-serving-ca").unwrap();
    let both_cas = [env.pki.serving_ca.cert_pem().to_owned(), new_serving_ca.cert_pem().to_owned()];
    let tokens = |with_bob: bool| {
        let mut text = format!("{TOKEN},alice,1001,\"dev,ops\"\n");
        if with_bob {
            text.push_str(&format!("{OTHER_TOKEN},bob,1002,\"dev\"\n"));
        }
        text
    };
    let with_token = |token: &str| {
        let mut b = TestClient::builder().bearer(token);
        for ca in &both_cas {
            b = b.ca_pem(ca);
        }
        b.build()
    };
    // A second token, added in place: proof that the token file is read again at all.
    replace(&dir, "tokens.csv", &tokens(true));
    eventually(Duration::from_secs(10), || async {
        match with_token(OTHER_TOKEN).get(&url).await {
            Ok(r) if r.status == StatusCode::OK => Ok(()),
            other => Err(format!("{:?}", other.map(|r| r.status))),
        }
    })
    .await;

    // The load: alice's token, a fresh client (new connections) every 20 requests, bounded.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, done, failures, url, cas) =
            (stop.clone(), done.clone(), failures.clone(), url.clone(), both_cas.clone());
        tokio::spawn(async move {
            for batch in 0..500 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut b = TestClient::builder().bearer(TOKEN);
                for ca in &cas {
                    b = b.ca_pem(ca);
                }
                let client = b.build();
                for i in 0..20 {
                    match client.get(&url).await {
                        Ok(r) if r.status == StatusCode::OK => {}
                        other => {
                            failures.lock().unwrap().push(format!("batch {batch} #{i}: {:?}", other.map(|r| r.status)))
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    // 1. The serving certificate, to one from a new CA: new connections get it within 2 s
    //    (the files are read every second).
    let serving = new_serving_ca.issue_serving("proxy", &["localhost", "127.0.0.1"]).unwrap();
    let rotated_at = Instant::now();
    replace(&dir, "serving.key", &serving.key_pem);
    replace(&dir, "serving.crt", &serving.cert_pem);
    let only_new = || TestClient::builder().ca_pem(new_serving_ca.cert_pem()).bearer(TOKEN).build();
    eventually(Duration::from_secs(10), || async {
        match only_new().get(&url).await {
            Ok(r) if r.status == StatusCode::OK => Ok(()),
            other => Err(format!("{:?}", other.map(|r| r.status))),
        }
    })
    .await;
    let presented_after = rotated_at.elapsed();
    println!("new serving certificate presented after {presented_after:?}");
    assert!(presented_after < Duration::from_secs(2) + Duration::from_millis(1500), "took {presented_after:?}");

    // 2. The proxy client certificate, to a new one from the front-proxy CA.
    let proxy_client = env.pki.front_proxy_ca.issue_client(common::standalone::PROXY_CLIENT_CN, &[]).unwrap();
    replace(&dir, "proxy-client.key", &proxy_client.key_pem);
    replace(&dir, "proxy-client.crt", &proxy_client.cert_pem);

    // 3. The client CA: a certificate from the old one is refused, one from the new accepted.
    let new_client_ca = CertificateAuthority::new("rotated-client-ca").unwrap();
    let new_admin = new_client_ca.issue_client("admin2", &["system:masters"]).unwrap();
    replace(&dir, "client-ca.crt", new_client_ca.cert_pem());
    let cert_client = |pair: &kube_aggregation_proxy::pki::PemPair| {
        TestClient::builder().ca_pem(new_serving_ca.cert_pem()).client_cert(pair).build()
    };
    eventually(Duration::from_secs(10), || async {
        let old = cert_client(&env.pki.admin).get(&url).await.map(|r| r.status);
        let new = cert_client(&new_admin).get(&url).await.map(|r| r.status);
        match (&old, &new) {
            (Err(_) | Ok(StatusCode::UNAUTHORIZED), Ok(StatusCode::OK)) => Ok(()),
            _ => Err(format!("old CA: {old:?}, new CA: {new:?}")),
        }
    })
    .await;

    // 4. A revoked token is refused.
    replace(&dir, "tokens.csv", &tokens(false));
    eventually(Duration::from_secs(10), || async {
        match with_token(OTHER_TOKEN).get(&url).await.map(|r| r.status) {
            Ok(StatusCode::UNAUTHORIZED) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // 5. A malformed replacement changes nothing, and is reported.
    let metrics_url = env.url("/metrics");
    let failures_before = metric(
        &only_new().get(&metrics_url).await.unwrap().text(),
        "aggregator_credentials_reloads_total{result=\"failure\"}",
    );
    replace(&dir, "client-ca.crt", "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n");
    let debug = eventually(Duration::from_secs(10), || async {
        let debug = only_new().get(&env.url("/debug/apiservices")).await.map_err(|e| e.to_string())?.json();
        match debug["credentials"]["error"].as_str() {
            Some(e) if e.contains("client-ca-file") => Ok(debug),
            _ => Err(format!("{}", debug["credentials"])),
        }
    })
    .await;
    assert!(debug["credentials"]["loadedAt"].is_string(), "{debug}");
    let failures_after = metric(
        &only_new().get(&metrics_url).await.unwrap().text(),
        "aggregator_credentials_reloads_total{result=\"failure\"}",
    );
    assert!(failures_after > failures_before, "{failures_before} -> {failures_after}");
    // The last good client CA is still the one in force.
    assert_eq!(cert_client(&new_admin).get(&url).await.unwrap().status, StatusCode::OK);

    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    let done = done.load(Ordering::SeqCst);
    let failures = failures.lock().unwrap();
    println!("{done} requests during the rotations, {} failed", failures.len());
    assert!(done >= 100, "only {done} requests made");
    assert!(failures.is_empty(), "{} of {done} failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
}

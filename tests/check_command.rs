//! The troubleshooting command: each APIService checked the way the proxy reaches it, with
//! the failing step and its reason.

mod common;

use common::standalone::{apiservice_yaml, Standalone, SAMPLE_SERVICE};
use kube_aggregation_proxy::availability::Reason;
use kube_aggregation_proxy::check;

#[tokio::test]
async fn check_names_the_failing_step_for_each_broken_apiservice() {
    let env = Standalone::start().await;
    let ca = env.pki.serving_ca.cert_pem();
    env.write_manifest(
        "impostor.yaml",
        &apiservice_yaml("v1.impostor.example.com", 10, 10, Some(("impostor", 443)), Some(ca)),
    );
    env.write_manifest(
        "missing.yaml",
        &apiservice_yaml("v1.missing.example.com", 10, 10, Some(("missing", 443)), Some(ca)),
    );
    env.write_manifest(
        "wrongver.yaml",
        &apiservice_yaml("v9.echo.example.com", 10, 10, Some((SAMPLE_SERVICE, 443)), Some(ca)),
    );
    env.write_manifest("invalid.yaml", &apiservice_yaml("v1.invalid.example.com", 0, 10, None, None));
    let config = env.settings.clone().validate().unwrap();

    let outcome = check::run(&config, None).await.unwrap();
    assert!(!outcome.all_available());
    let report = |name: &str| outcome.reports.iter().find(|r| r.apiservice == name).unwrap_or_else(|| panic!("{name}"));

    let echo = report("v1.echo.example.com");
    assert!(echo.available, "{echo:?}");
    assert_eq!(echo.reason, Reason::Passed);

    let impostor = report("v1.impostor.example.com");
    assert_eq!(impostor.reason, Reason::FailedDiscoveryCheck);
    let failed = impostor.steps.iter().find(|s| !s.ok).unwrap();
    assert_eq!(
        (failed.name, failed.detail.as_str()),
        ("tls", "TLS: certificate not valid for impostor.kube-system.svc")
    );

    let missing = report("v1.missing.example.com");
    assert_eq!(missing.reason, Reason::ServiceNotFound);
    assert_eq!(missing.message, "service/missing in \"kube-system\" is not present");

    // The backend answers, but does not serve this version.
    let wrong = report("v9.echo.example.com");
    let failed = wrong.steps.iter().find(|s| !s.ok).unwrap();
    assert_eq!(failed.name, "request");
    assert!(failed.detail.contains("404") && failed.detail.contains("does not serve"), "{failed:?}");

    assert_eq!(outcome.rejections.len(), 1);
    assert!(outcome.rejections[0].reason.contains("spec.groupPriorityMinimum"));
    let text = check::render(&outcome);
    assert!(text.contains("APIService v1.impostor.example.com: Available=False (FailedDiscoveryCheck)"), "{text}");

    let only = check::run(&config, Some("v1.echo.example.com")).await.unwrap();
    assert_eq!(only.reports.len(), 1);
    assert!(only.all_available(), "{}", check::render(&only));
    assert!(check::run(&config, Some("v1.nothing.example.com")).await.is_err());
}

#[tokio::test]
async fn a_backend_that_does_not_trust_the_proxy_certificate_is_explained() {
    // No proxy client certificate: the sample server refuses the probe with 401.
    let env = Standalone::start_with(|s| {
        s.proxy_client_cert_file = None;
        s.proxy_client_key_file = None;
    })
    .await;
    let config = env.settings.clone().validate().unwrap();
    let outcome = check::run(&config, Some("v1.echo.example.com")).await.unwrap();
    let report = &outcome.reports[0];
    assert!(!report.available);
    let failed = report.steps.iter().find(|s| !s.ok).unwrap();
    assert!(failed.detail.contains("401") && failed.detail.contains("--requestheader-client-ca-file"), "{failed:?}");
}

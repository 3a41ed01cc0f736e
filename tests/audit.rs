//! Audit through the real proxy: kube's events, stages and fields in the log a policy asks
//! for, and a stuck disk that costs events (counted), never requests.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use common::standalone::{Standalone, TOKEN};
use common::wait::eventually;
use http::Method;
use serde_json::Value;

const POLICY: &str = r#"
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
- level: Metadata
  resources:
  - group: metrics.k8s.io
- level: RequestResponse
  resources:
  - group: echo.example.com
- level: None
"#;

fn read_events(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

/// The events of one request (by Audit-ID), once `count` of them are in the log.
async fn events_of(log: &Path, audit_id: &str, count: usize) -> Vec<Value> {
    eventually(Duration::from_secs(10), || async {
        let events: Vec<Value> = read_events(log).into_iter().filter(|e| e["auditID"] == audit_id).collect();
        if events.len() == count {
            Ok(events)
        } else {
            Err(format!("{} of {count} events for {audit_id}: {events:?}", events.len()))
        }
    })
    .await
}

fn stages(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["stage"].as_str().unwrap()).collect()
}

fn is_micro_time(v: &Value) -> bool {
    // 2024-05-01T10:00:00.123456Z
    v.as_str().is_some_and(|s| s.len() == 27 && s.ends_with('Z') && s.as_bytes()[19] == b'.')
}

#[tokio::test]
async fn the_log_holds_the_events_the_policy_asks_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let (policy, log) = (dir.path().join("policy.yaml"), dir.path().join("audit.log"));
    let env = Standalone::start_with(|s| {
        s.audit_policy_file = Some(policy);
        s.audit_log_path = Some(log.clone());
        s.impersonation_allowed_groups = Some(vec!["system:masters".into()]);
    })
    .await;
    let admin = env.admin();
    let alice = env.client().bearer(TOKEN).build();
    let audit_id = |r: &common::client::TestResponse| r.headers["audit-id"].to_str().unwrap().to_owned();

    // A list at Metadata: received and complete, no bodies.
    let list = admin.get(&env.url("/apis/metrics.k8s.io/v1beta1/nodes")).await.unwrap();
    assert_eq!(list.status, 200);
    let events = events_of(&log, &audit_id(&list), 2).await;
    assert_eq!(stages(&events), ["RequestReceived", "ResponseComplete"]);
    let complete = &events[1];
    assert_eq!(complete["kind"], "Event");
    assert_eq!(complete["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(complete["level"], "Metadata");
    assert_eq!(complete["verb"], "list");
    assert_eq!(complete["requestURI"], "/apis/metrics.k8s.io/v1beta1/nodes");
    assert_eq!(complete["user"]["username"], "admin");
    assert_eq!(complete["user"]["groups"], serde_json::json!(["system:masters", "system:authenticated"]));
    assert_eq!(complete["sourceIPs"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(
        complete["objectRef"],
        serde_json::json!({"resource": "nodes", "apiGroup": "metrics.k8s.io", "apiVersion": "v1beta1"})
    );
    assert_eq!(complete["responseStatus"], serde_json::json!({"metadata": {}, "code": 200}));
    assert!(events[0].get("responseStatus").is_none(), "RequestReceived has no status: {}", events[0]);
    assert!(complete.get("responseObject").is_none() && complete.get("requestObject").is_none());
    assert!(is_micro_time(&complete["requestReceivedTimestamp"]) && is_micro_time(&complete["stageTimestamp"]));
    assert_eq!(events[0]["requestReceivedTimestamp"], complete["requestReceivedTimestamp"]);
    assert_eq!(events[0]["stageTimestamp"], events[0]["requestReceivedTimestamp"]);

    // A get at RequestResponse: the response body is recorded.
    let get = admin.get(&env.url("/apis/echo.example.com/v1/namespaces/default/echoes/one")).await.unwrap();
    assert_eq!(get.status, 200);
    let events = events_of(&log, &audit_id(&get), 2).await;
    let complete = &events[1];
    assert_eq!(complete["level"], "RequestResponse");
    assert_eq!(complete["verb"], "get");
    assert_eq!(complete["objectRef"]["namespace"], "default");
    assert_eq!(complete["objectRef"]["name"], "one");
    assert_eq!(complete["objectRef"]["resource"], "echoes");
    assert_eq!(complete["responseObject"], get.json(), "the response body as the client got it");
    // One event as written (shown with --nocapture).
    let id = audit_id(&get);
    let raw = std::fs::read_to_string(&log).unwrap();
    println!("{}", raw.lines().rfind(|l| l.contains(&id)).unwrap());

    // A create: the request body too.
    let body = r#"{"apiVersion":"echo.example.com/v1","kind":"Echo","metadata":{"name":"new"}}"#;
    let create = alice
        .request(
            Method::POST,
            &env.url("/apis/echo.example.com/v1/namespaces/default/echoes"),
            &[("content-type", "application/json")],
            body,
        )
        .await
        .unwrap();
    assert_eq!(create.status, 200);
    let events = events_of(&log, &audit_id(&create), 2).await;
    assert_eq!(events[1]["verb"], "create");
    assert_eq!(events[1]["user"]["username"], "alice");
    assert_eq!(events[1]["user"]["uid"], "1001");
    assert_eq!(events[1]["requestObject"], serde_json::from_str::<Value>(body).unwrap());

    // A watch: its response starts, then completes when the stream ends.
    let watch = admin
        .get(&env.url("/apis/echo.example.com/v1/namespaces/default/echoes?watch=true&timeoutSeconds=1"))
        .await
        .unwrap();
    assert_eq!(watch.status, 200);
    let events = events_of(&log, &audit_id(&watch), 3).await;
    assert_eq!(stages(&events), ["RequestReceived", "ResponseStarted", "ResponseComplete"]);
    assert_eq!(events[1]["verb"], "watch");
    assert_eq!(events[1]["responseStatus"]["code"], 200);
    assert!(events[2].get("responseObject").is_none(), "a watch's stream is not recorded");

    // Impersonated: the requester is the user, the impersonated one beside it.
    let as_bob = admin
        .request(
            Method::GET,
            &env.url("/apis/echo.example.com/v1/namespaces/default/echoes/two"),
            &[("impersonate-user", "bob"), ("impersonate-group", "dev")],
            "",
        )
        .await
        .unwrap();
    assert_eq!(as_bob.status, 200);
    assert_eq!(as_bob.json()["user"]["name"], "bob");
    let events = events_of(&log, &audit_id(&as_bob), 2).await;
    assert_eq!(events[0]["user"]["username"], "admin");
    assert!(events[0].get("impersonatedUser").is_none(), "impersonation comes after RequestReceived");
    assert_eq!(events[1]["user"]["username"], "admin");
    assert_eq!(events[1]["impersonatedUser"]["username"], "bob");
    assert_eq!(events[1]["impersonatedUser"]["groups"], serde_json::json!(["dev", "system:authenticated"]));

    // Denied: alice may not impersonate; the event records the 403 Status.
    let denied = alice
        .request(
            Method::GET,
            &env.url("/apis/echo.example.com/v1/namespaces/default/echoes/three"),
            &[("impersonate-user", "bob")],
            "",
        )
        .await
        .unwrap();
    assert_eq!(denied.status, 403);
    let events = events_of(&log, &audit_id(&denied), 2).await;
    let status = &events[1]["responseStatus"];
    assert_eq!(status["code"], 403);
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "Forbidden");
    assert_eq!(status["message"], denied.json()["message"]);
    assert!(events[1].get("impersonatedUser").is_none());

    // Unauthenticated: one event, at ResponseStarted, with no user.
    let anonymous = env.client().build();
    let unauthorized = anonymous.get(&env.url("/apis/echo.example.com/v1/namespaces/default/echoes")).await.unwrap();
    assert_eq!(unauthorized.status, 401);
    let events = events_of(&log, &audit_id(&unauthorized), 1).await;
    assert_eq!(stages(&events), ["ResponseStarted"]);
    assert_eq!(events[0]["user"], serde_json::json!({}));
    assert_eq!(events[0]["responseStatus"]["reason"], "Unauthorized");

    // Not recorded: the policy's last rule says None.
    let discovery = admin.get(&env.url("/apis")).await.unwrap();
    assert_eq!(discovery.status, 200);

    // Nothing else is in the log: the requests above and only they, in their stages.
    let all = read_events(&log);
    assert_eq!(all.len(), 2 + 2 + 2 + 3 + 2 + 2 + 1, "{all:#?}");
    assert!(all.iter().all(|e| e["auditID"] != audit_id(&discovery)));
    let metrics = admin.get(&env.url("/metrics")).await.unwrap().text();
    assert!(metrics.contains("apiserver_audit_event_total 14"), "{metrics}");
    assert!(metrics.contains(r#"apiserver_audit_level_total{level="None"}"#), "{metrics}");
    assert!(!metrics.contains("apiserver_audit_error_total{"), "{metrics}");
}

#[tokio::test]
async fn a_stuck_audit_log_drops_and_counts_events_and_requests_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let (policy, path) = (dir.path().join("policy.yaml"), fifo.clone());
    let env = Standalone::start_with(|s| {
        s.audit_policy_file = Some(policy);
        // Nobody reads the pipe: the writer blocks opening it, as on a disk that hangs.
        s.audit_log_path = Some(path);
        s.audit_log_batch_buffer_size = Some(8);
    })
    .await;
    let admin = env.admin();
    let requests = 200;
    for _ in 0..requests {
        let r = admin.get(&env.url("/apis/metrics.k8s.io/v1beta1/nodes")).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let metrics = eventually(Duration::from_secs(10), || async {
        let text = admin.get(&env.url("/metrics")).await.map_err(|e| e.to_string())?.text();
        if text.contains(&format!("apiserver_audit_event_total {}", 2 * requests)) {
            Ok(text)
        } else {
            Err("not every event generated yet".to_owned())
        }
    })
    .await;
    let dropped: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"apiserver_audit_error_total{plugin="buffered"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no drops counted:\n{metrics}"));
    // At most the queue and the one event the writer holds got through.
    let kept = 2 * requests - dropped;
    assert!((1..=9).contains(&kept), "{kept} kept, {dropped} dropped");
    // Once the disk moves again, what was queued is written.
    let reader = std::thread::spawn(move || {
        let file = std::fs::File::open(&fifo).unwrap();
        std::io::BufReader::new(file).lines().take(kept).map(|l| l.unwrap()).collect::<Vec<_>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || reader.join()))
        .await
        .expect("the queued events are written once the pipe is read")
        .unwrap()
        .unwrap();
    assert_eq!(lines.len(), kept);
    for line in lines {
        let event: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["objectRef"]["apiGroup"], "metrics.k8s.io");
    }
}

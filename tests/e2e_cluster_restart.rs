//! kube-apiserver restarted under the proxy: aggregated APIs keep being served from the last
//! routing table while the watches are down, and the proxy catches up when kube-apiserver
//! returns. This test owns its cluster, since it stops kube-apiserver.
//!
//! `cargo test --features e2e --test e2e_cluster_restart`

mod common;

use std::time::Duration;

use common::cluster_proxy::{blocking, owned_cluster, ClusterProxy};
use common::wait::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_keeps_serving_while_kube_apiserver_restarts_and_then_catches_up() {
    let cluster = owned_cluster(false).await;
    let proxy = ClusterProxy::start(cluster, |_| {}).await;
    let admin = blocking(move || cluster.mint_user("restart-admin", &["system:masters"]).unwrap()).await;
    let client = proxy.client_as(&admin);
    let flunders = proxy.url("/apis/wardle.example.com/v1alpha1/namespaces/default/flunders");
    assert_eq!(client.get(&flunders).await.unwrap().status, 200);

    blocking(move || cluster.stop_kube_apiserver()).await;
    // The aggregated API is still routed from the last table. (sample-apiserver itself answers
    // from etcd; its delegated authorization is cached or fails closed, so any answer from it
    // proves the route, while 404/503 from the proxy would not.)
    let during = client.get(&flunders).await.unwrap();
    let from_proxy = during.text().contains("no APIService serves") || during.text().contains("is unavailable");
    assert!(!from_proxy, "the proxy lost its route while kube-apiserver was down: {} {}", during.status, during.text());
    // Local APIs answer 503 naming the delegate, not a hang.
    let core = client.get(&proxy.url("/api/v1/namespaces")).await.unwrap();
    assert_eq!(core.status, 503, "{}", core.text());

    blocking(move || cluster.start_kube_apiserver().expect("kube-apiserver restarts")).await;
    // Catching up: a change made after the restart reaches the routing table.
    let manifest = "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: v1.after-restart.example.com\n\
                    spec:\n  group: after-restart.example.com\n  version: v1\n  groupPriorityMinimum: 10\n  versionPriority: 10\n";
    blocking(move || cluster.apply(manifest).unwrap()).await;
    eventually(Duration::from_secs(60), || async {
        let apis = client.get(&proxy.url("/apis/after-restart.example.com")).await.map_err(|e| e.to_string())?;
        if apis.status == 200 {
            Ok(())
        } else {
            Err(format!("{} {}", apis.status, apis.text()))
        }
    })
    .await;
    assert_eq!(client.get(&flunders).await.unwrap().status, 200);
}

//! A rolling restart of two replicas behind a round-robin TCP balancer on loopback, with the
//! balancer taking a replica out once its `/readyz` fails (as an endpoints controller does):
//! SIGTERM's path (`RunningApp::shutdown`) on one, a new one started, then the other. A bounded
//! load of GETs (each on a new connection) loses none, a 429 with `Retry-After` is retried and
//! counted, and 50 watches end with a clean end of stream, spread over the watch grace period.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::TestClient;
use common::standalone::{Standalone, TOKEN};
use common::wait::eventually;
use http::StatusCode;
use kube_aggregation_proxy::app::{self, RunningApp};
use kube_aggregation_proxy::config::Settings;
use tokio::net::{TcpListener, TcpStream};

const WATCH_GRACE: Duration = Duration::from_secs(3);

/// Replicas the balancer sends new connections to: those whose `/readyz` answers 200.
#[derive(Default)]
struct Balancer {
    members: Mutex<Vec<SocketAddr>>,
    ready: Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
}

impl Balancer {
    /// Starts the balancer and its readiness poller, which trusts `ca_pem`.
    async fn start(self: &Arc<Self>, ca_pem: &str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = {
                    let ready = this.ready.lock().unwrap();
                    (!ready.is_empty()).then(|| ready[this.next.fetch_add(1, Ordering::SeqCst) % ready.len()])
                };
                let Some(target) = target else { continue };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        // The endpoints controller: readiness every 100 ms.
        let this = self.clone();
        let probe = TestClient::builder().ca_pem(ca_pem).timeout(Duration::from_secs(1)).build();
        tokio::spawn(async move {
            loop {
                let members = this.members.lock().unwrap().clone();
                let mut ready = Vec::new();
                for member in members {
                    if let Ok(r) = probe.get(&format!("https://{member}/readyz")).await {
                        if r.status == StatusCode::OK {
                            ready.push(member);
                        }
                    }
                }
                *this.ready.lock().unwrap() = ready;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        addr
    }
}

async fn replica(settings: &Settings) -> RunningApp {
    let proxy = app::start(settings.clone().validate().unwrap()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy.ready()).await.unwrap();
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_request_and_ends_watches_cleanly_over_the_grace_period() {
    let env = Standalone::start().await;
    let mut settings = env.settings.clone();
    settings.shutdown_delay_duration = Some("1s".into());
    settings.shutdown_send_retry_after = Some(true);
    settings.shutdown_watch_termination_grace_period = Some(format!("{}s", WATCH_GRACE.as_secs()));
    let (a, b) = (replica(&settings).await, replica(&settings).await);
    let balancer = Arc::new(Balancer::default());
    balancer.members.lock().unwrap().extend([a.local_addr(), b.local_addr()]);
    let front = balancer.start(env.pki.serving_ca.cert_pem()).await;
    let ca = env.pki.serving_ca.cert_pem().to_owned();
    let client = move || TestClient::builder().ca_pem(&ca).bearer(TOKEN).timeout(Duration::from_secs(10)).build();
    let url = |path: &str| format!("https://{front}{path}");
    eventually(Duration::from_secs(10), || async {
        let ready = balancer.ready.lock().unwrap().len();
        if ready == 2 {
            Ok(())
        } else {
            Err(format!("{ready} ready"))
        }
    })
    .await;

    // 50 watches, spread over both replicas by the balancer.
    let mut watches = Vec::new();
    for _ in 0..50 {
        let mut w = client()
            .get_streaming(&url("/apis/echo.example.com/v1/namespaces/default/things?watch=true&timeoutSeconds=300"))
            .await
            .unwrap();
        assert_eq!(w.status, StatusCode::OK);
        assert!(w.next_chunk().await.unwrap().is_some());
        watches.push(tokio::spawn(async move {
            loop {
                match w.next_chunk().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(Instant::now()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }));
    }

    // The load: a new connection for every GET; a 429 is retried after its Retry-After.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, retried, failed) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let load = {
        let (stop, done, retried, failed, client, get) = (
            stop.clone(),
            done.clone(),
            retried.clone(),
            failed.clone(),
            client.clone(),
            url("/apis/echo.example.com/v1/x"),
        );
        tokio::spawn(async move {
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match client().get(&get).await {
                        Ok(r) if r.status == StatusCode::OK => break,
                        Ok(r)
                            if r.status == StatusCode::TOO_MANY_REQUESTS
                                && r.header("retry-after").is_some()
                                && attempts < 5 =>
                        {
                            retried.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        other => {
                            failed.lock().unwrap().push(format!("{:?}", other.map(|r| (r.status, r.text()))));
                            break;
                        }
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // Roll: stop A (and start C), then stop B.
    let a_addr = a.local_addr();
    let drained_a = Instant::now();
    let stopping_a = tokio::spawn(a.shutdown());
    let c = replica(&settings).await;
    balancer.members.lock().unwrap().push(c.local_addr());
    stopping_a.await.unwrap();
    balancer.members.lock().unwrap().retain(|m| *m != a_addr);
    let drained_b = Instant::now();
    b.shutdown().await;

    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    let mut ends = Vec::new();
    for w in watches {
        match w.await.unwrap() {
            Ok(at) => ends.push(at),
            Err(e) => panic!("a watch ended with an error, not a clean close: {e}"),
        }
    }
    // A's watches all ended before A's shutdown returned (their clients may notice a moment
    // later); B's cannot end before B's shutdown delay has passed.
    let b_earliest = drained_b + Duration::from_millis(900);
    let (on_a, on_b): (Vec<Instant>, Vec<Instant>) = ends.iter().partition(|e| **e < b_earliest);
    let spread = |from: Instant, ends: &[Instant]| {
        let secs: Vec<f64> = ends.iter().map(|e| e.duration_since(from).as_secs_f64()).collect();
        (secs.iter().cloned().fold(f64::MAX, f64::min), secs.iter().cloned().fold(0.0, f64::max))
    };
    let (first_a, last_a) = spread(drained_a, &on_a);
    let (first_b, last_b) = spread(drained_b, &on_b);
    let failed = failed.lock().unwrap().clone();
    let (done, retried) = (done.load(Ordering::SeqCst), retried.load(Ordering::SeqCst));
    println!(
        "{done} GETs during the roll, {} failed, {retried} answered 429 with Retry-After and retried; \
         50 watches ended cleanly: {} on the first replica {first_a:.2}s to {last_a:.2}s after its SIGTERM, \
         {} on the second {first_b:.2}s to {last_b:.2}s after its",
        failed.len(),
        on_a.len(),
        on_b.len()
    );
    assert!(failed.is_empty(), "{} of {done} GETs failed: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    assert!(done >= 20, "only {done} GETs");
    assert_eq!(ends.len(), 50);
    for (first, last, n) in [(first_a, last_a, on_a.len()), (first_b, last_b, on_b.len())] {
        if n < 5 {
            continue;
        }
        // After the 1 s shutdown delay, spread over the 3 s grace rather than all at once.
        assert!(first >= 0.9, "a watch closed during the shutdown delay: {first:.2}");
        assert_eq!(on_a.len() + on_b.len(), 50);
        assert!(last - first > 0.5, "watch closes not spread: {first:.2}..{last:.2}");
        assert!(last < 1.0 + WATCH_GRACE.as_secs_f64() + 1.5, "closes went past the grace: {last:.2}");
    }
    c.shutdown().await;
}

//! Waiting for a condition with a deadline, instead of sleeping and hoping.
//!
//! ```ignore
//! let body = eventually(Duration::from_secs(5), || async {
//!     let r = client.get(&url).await?;
//!     if r.status == 200 { Ok(r.json()) } else { Err(format!("status {}", r.status).into()) }
//! })
//! .await;
//! ```

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long to wait between attempts; short, since loopback conditions settle quickly.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `f` until it returns `Ok`, and returns that value. Panics when `deadline` passes
/// first, with the last error, so a failure says what was still wrong.
pub async fn eventually<F, Fut, T, E>(deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let give_up = Instant::now() + deadline;
    loop {
        let last_error = match tokio::time::timeout_at(give_up, f()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(error)) => error.to_string(),
            Err(_) => "the last attempt was still running".to_owned(),
        };
        if Instant::now() + POLL_INTERVAL > give_up {
            panic!("condition not met within {deadline:?}: {last_error}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `url` with GET until it answers `want` within `deadline`, and returns that response.
pub async fn eventually_status(
    deadline: Duration,
    client: &super::client::TestClient,
    url: &str,
    want: http::StatusCode,
) -> super::client::TestResponse {
    eventually(deadline, || async {
        let r = client.get(url).await.map_err(|e| e.to_string())?;
        if r.status == want {
            Ok(r)
        } else {
            Err(format!("{url}: {} {}", r.status, r.text()))
        }
    })
    .await
}

//! `echo.example.com/v1`: every request is answered with a description of itself as this
//! backend received it (method, host, path, raw query, HTTP version, the user the requestheader
//! authenticator produced, every header, the body), so tests and demo users can see exactly
//! what the aggregation proxy forwarded and which identity it asserted.
//!
//! `?watch=true` turns the answer into a watch stream: one `ADDED` event a second, each written
//! and flushed on its own, until `timeoutSeconds` (default 5, at most 300) have passed or the
//! server shuts down. That makes it a backend whose response provably arrives in pieces.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::discovery::ECHO_GROUP_VERSION;
use super::handler::ResponseBody;
use crate::auth::UserInfo;

pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(300);
pub const WATCH_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The query parameters that matter to the echo API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoQuery {
    pub watch: bool,
    /// How long a watch lasts: `timeoutSeconds`, defaulted and capped.
    pub timeout: Duration,
}

/// Reads `watch` (Go's `strconv.ParseBool` spellings, as kube accepts) and `timeoutSeconds`
/// (0 or absent means the default). A value that does not parse is the client's error.
pub fn parse_query(query: Option<&str>) -> Result<EchoQuery, String> {
    let mut parsed = EchoQuery { watch: false, timeout: DEFAULT_WATCH_TIMEOUT };
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        match key {
            "watch" => {
                parsed.watch = match value.as_ref() {
                    "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
                    "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
                    other => return Err(format!("watch: invalid boolean {other:?}")),
                }
            }
            "timeoutSeconds" => {
                let seconds = value.parse::<u64>().map_err(|e| format!("timeoutSeconds {value:?}: {e}"))?;
                if seconds > 0 {
                    parsed.timeout = Duration::from_secs(seconds).min(MAX_WATCH_TIMEOUT);
                }
            }
            _ => {}
        }
    }
    Ok(parsed)
}

/// The `Echo` object describing a request. `metadata.name` is the last path segment.
pub fn describe(parts: &Parts, user: &UserInfo, body: &[u8]) -> Value {
    let mut headers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers.entry(name.as_str()).or_default().push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let path = parts.uri.path();
    let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    // HTTP/1.1 names the host in a header, HTTP/2 in the `:authority` pseudo-header.
    let host = match parts.headers.get(http::header::HOST) {
        Some(host) => String::from_utf8_lossy(host.as_bytes()).into_owned(),
        None => parts.uri.authority().map(|a| a.to_string()).unwrap_or_default(),
    };
    json!({
        "kind": "Echo",
        "apiVersion": ECHO_GROUP_VERSION,
        "metadata": {"name": name},
        "method": parts.method.as_str(),
        "host": host,
        "path": path,
        "query": parts.uri.query().unwrap_or_default(),
        "httpVersion": format!("{:?}", parts.version),
        "user": {
            "name": user.name,
            "uid": user.uid.clone().unwrap_or_default(),
            "groups": user.groups,
            "extra": user.extra,
        },
        "headers": headers,
        "body": String::from_utf8_lossy(body),
    })
}

/// The `n`th watch event (1-based) for `object`: the object gains `sequence` and a matching
/// `metadata.resourceVersion`.
pub fn watch_event(object: &Value, sequence: u64) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.insert("sequence".into(), json!(sequence));
        if let Some(metadata) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("resourceVersion".into(), json!(sequence.to_string()));
        }
    }
    json!({"type": "ADDED", "object": object})
}

struct WatchState {
    object: Value,
    sent: u64,
    started: Instant,
    deadline: Instant,
    stop: watch::Receiver<bool>,
}

/// A newline-delimited JSON watch stream: an event now, then one every
/// [`WATCH_EVENT_INTERVAL`] until `timeout` has passed; it ends early when `stop` turns true
/// or its sender goes away (the server is shutting down).
pub fn watch_body(object: Value, timeout: Duration, stop: watch::Receiver<bool>) -> ResponseBody {
    watch_events(object, timeout, WATCH_EVENT_INTERVAL, stop)
}

fn watch_events(object: Value, timeout: Duration, interval: Duration, stop: watch::Receiver<bool>) -> ResponseBody {
    let now = Instant::now();
    let state = WatchState { object, sent: 0, started: now, deadline: now + timeout, stop };
    let events = futures_util::stream::unfold(state, move |mut state| async move {
        if state.sent > 0 {
            let elapsed = interval.saturating_mul(u32::try_from(state.sent).unwrap_or(u32::MAX));
            let wake = (state.started + elapsed).min(state.deadline);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                _ = state.stop.wait_for(|stopped| *stopped) => return None,
            }
            if Instant::now() >= state.deadline {
                return None;
            }
        }
        state.sent += 1;
        let mut line = serde_json::to_vec(&watch_event(&state.object, state.sent)).ok()?;
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(line))), state))
    });
    ResponseBody::new(StreamBody::new(events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::BodyExt;

    #[test]
    fn watch_and_timeout_are_read_from_the_query() {
        assert_eq!(parse_query(None).unwrap(), EchoQuery { watch: false, timeout: DEFAULT_WATCH_TIMEOUT });
        let q = parse_query(Some("watch=true&timeoutSeconds=3")).unwrap();
        assert_eq!(q, EchoQuery { watch: true, timeout: Duration::from_secs(3) });
        assert!(parse_query(Some("watch=1")).unwrap().watch);
        assert!(!parse_query(Some("watch=false&labelSelector=a%3Db")).unwrap().watch);
        assert_eq!(parse_query(Some("watch=1&timeoutSeconds=0")).unwrap().timeout, DEFAULT_WATCH_TIMEOUT);
        assert_eq!(parse_query(Some("timeoutSeconds=100000")).unwrap().timeout, MAX_WATCH_TIMEOUT);
        assert!(parse_query(Some("watch=maybe")).is_err());
        assert!(parse_query(Some("timeoutSeconds=-1")).is_err());
    }

    #[test]
    fn description_names_method_path_query_user_and_headers() {
        let (parts, ()) =
            Request::post("https://api.example:6443/apis/echo.example.com/v1/namespaces/ns/echoes/thing?x=1")
                .header("Accept", "application/json")
                .header("X-Multi", "a")
                .header("X-Multi", "b")
                .body(())
                .unwrap()
                .into_parts();
        let mut user = UserInfo::new("alice", vec!["dev".into()]);
        user.extra.insert("example.com/scopes".into(), vec!["read".into()]);
        let echo = describe(&parts, &user, b"hello");
        assert_eq!(echo["metadata"]["name"], "thing");
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["path"], "/apis/echo.example.com/v1/namespaces/ns/echoes/thing");
        assert_eq!(echo["query"], "x=1");
        assert_eq!(echo["httpVersion"], "HTTP/1.1");
        assert_eq!(
            echo["user"],
            json!({"name": "alice", "uid": "", "groups": ["dev"], "extra": {"example.com/scopes": ["read"]}})
        );
        assert_eq!(echo["headers"]["x-multi"], json!(["a", "b"]));
        assert_eq!(echo["body"], "hello");
    }

    #[test]
    fn watch_events_carry_a_sequence_number_and_the_description() {
        let event = watch_event(&json!({"kind": "Echo", "metadata": {"name": "x"}}), 3);
        assert_eq!(event["type"], "ADDED");
        assert_eq!(event["object"]["sequence"], 3);
        assert_eq!(event["object"]["metadata"], json!({"name": "x", "resourceVersion": "3"}));
    }

    #[tokio::test]
    async fn watch_stream_sends_one_event_per_interval_until_the_timeout() {
        let (_stop_tx, stop) = watch::channel(false);
        let interval = Duration::from_millis(40);
        let started = Instant::now();
        let mut body = watch_events(json!({"metadata": {}}), interval * 3, interval, stop);
        let mut sequences = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert_eq!(data.iter().filter(|b| **b == b'\n').count(), 1, "one event per frame");
            let event: Value = serde_json::from_slice(&data).unwrap();
            sequences.push(event["object"]["sequence"].as_u64().unwrap());
        }
        assert!(started.elapsed() >= interval * 3);
        assert_eq!(sequences, [1, 2, 3]);
    }

    #[tokio::test]
    async fn watch_stream_ends_when_the_server_stops() {
        let (stop_tx, stop) = watch::channel(false);
        let mut body = watch_body(json!({}), Duration::from_secs(60), stop);
        assert!(body.frame().await.is_some());
        stop_tx.send_replace(true);
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("stream ends promptly");
        assert!(end.is_none());
    }
}

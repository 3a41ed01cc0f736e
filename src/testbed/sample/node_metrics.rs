//! `metrics.k8s.io/v1beta1` NodeMetrics for this machine, read from `/proc`.
//!
//! metrics-server reports a node's CPU as a rate: the growth of a cumulative counter between two
//! scrapes divided by the time between them (the `window`), and memory as the working set at the
//! later scrape (the `timestamp`). We do the same with the machine's own counters: the busy
//! ticks of the `cpu` line in `/proc/stat`, sampled in the background, and
//! `MemTotal - MemAvailable` from `/proc/meminfo`. Quantities are written in Kubernetes'
//! canonical form (`"1234567n"`, `"2048Ki"`) so clients parse them as they parse kube's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Time};
use serde::Serialize;

use super::discovery::METRICS_GROUP_VERSION as METRICS_API_VERSION;

const PROC_STAT: &str = "/proc/stat";
const PROC_MEMINFO: &str = "/proc/meminfo";
const PROC_HOSTNAME: &str = "/proc/sys/kernel/hostname";

/// `/proc/stat` counts in USER_HZ ticks. USER_HZ is part of Linux's userspace ABI and is 100 on
/// every architecture, whatever the kernel's internal tick rate.
const USER_HZ: u128 = 100;
const NANOS_PER_TICK: u128 = 1_000_000_000 / USER_HZ;

/// How often the background sampler reads `/proc/stat`, and so the usual `window`.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NodeMetricsError {
    #[error("reading {path}: {source}")]
    Read { path: &'static str, source: std::io::Error },
    #[error("parsing {path}: {reason}")]
    Parse { path: &'static str, reason: String },
}

/// One reading of the machine's cumulative counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    wall: SystemTime,
    /// Cumulative busy CPU time of all cores, in nanoseconds.
    busy_nanos: u128,
    memory_working_set_bytes: u64,
}

/// Usage over one window, as metrics-server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeUsage {
    /// When the later sample was taken.
    pub timestamp: SystemTime,
    pub window: Duration,
    pub cpu_nanocores: u64,
    pub memory_working_set_bytes: u64,
}

/// Busy ticks from the aggregate `cpu` line of `/proc/stat`: user, nice, system, irq, softirq
/// and steal. idle and iowait are not busy; guest time is already counted in user.
pub fn parse_busy_ticks(stat: &str) -> Result<u128, String> {
    let line = stat.lines().find(|l| l.starts_with("cpu ")).ok_or("no aggregate cpu line")?;
    let fields = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u128>().map_err(|e| format!("field {f:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if fields.len() < 4 {
        return Err(format!("cpu line has {} fields, expected at least 4", fields.len()));
    }
    // user nice system idle iowait irq softirq steal guest guest_nice
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(field(0) + field(1) + field(2) + field(5) + field(6) + field(7))
}

/// `MemTotal - MemAvailable` from `/proc/meminfo`, in bytes: the memory the machine cannot
/// hand out without reclaiming from someone, which is what a working set means.
pub fn parse_working_set_bytes(meminfo: &str) -> Result<u64, String> {
    let kib = |key: &str| -> Result<u64, String> {
        let line = meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix(':')))
            .ok_or_else(|| format!("no {key} line"))?;
        let number = line.trim().trim_end_matches("kB").trim();
        number.parse::<u64>().map_err(|e| format!("{key} {number:?}: {e}"))
    };
    let total = kib("MemTotal")?;
    let available = kib("MemAvailable")?;
    Ok(total.saturating_sub(available).saturating_mul(1024))
}

fn read(path: &'static str) -> Result<String, NodeMetricsError> {
    std::fs::read_to_string(path).map_err(|source| NodeMetricsError::Read { path, source })
}

fn take_sample() -> Result<Sample, NodeMetricsError> {
    let busy_ticks =
        parse_busy_ticks(&read(PROC_STAT)?).map_err(|reason| NodeMetricsError::Parse { path: PROC_STAT, reason })?;
    let memory_working_set_bytes = parse_working_set_bytes(&read(PROC_MEMINFO)?)
        .map_err(|reason| NodeMetricsError::Parse { path: PROC_MEMINFO, reason })?;
    Ok(Sample {
        at: Instant::now(),
        wall: SystemTime::now(),
        busy_nanos: busy_ticks * NANOS_PER_TICK,
        memory_working_set_bytes,
    })
}

fn usage_between(earlier: &Sample, later: &Sample) -> NodeUsage {
    let window = later.at.saturating_duration_since(earlier.at);
    let busy = later.busy_nanos.saturating_sub(earlier.busy_nanos);
    let cpu_nanocores = match window.as_nanos() {
        0 => 0,
        window_nanos => u64::try_from(busy * 1_000_000_000 / window_nanos).unwrap_or(u64::MAX),
    };
    NodeUsage { timestamp: later.wall, window, cpu_nanocores, memory_working_set_bytes: later.memory_working_set_bytes }
}

#[derive(Debug, Default)]
struct Samples {
    previous: Option<Sample>,
    latest: Option<Sample>,
}

/// Keeps the two most recent samples; one writer (the background task), many readers.
#[derive(Debug, Default)]
pub struct Sampler {
    samples: Mutex<Samples>,
}

impl Sampler {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        // The guarded data is two plain values; a panic elsewhere cannot leave them torn.
        self.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the counters now and makes that the latest sample.
    pub fn record(&self) -> Result<(), NodeMetricsError> {
        let sample = take_sample()?;
        let mut samples = self.samples();
        samples.previous = samples.latest.replace(sample);
        Ok(())
    }

    /// Usage over the last sampling window. Before the background task has taken two samples,
    /// the window runs from the first sample to now.
    pub fn usage(&self) -> Result<NodeUsage, NodeMetricsError> {
        let (previous, latest) = {
            let samples = self.samples();
            (samples.previous, samples.latest)
        };
        match (previous, latest) {
            (Some(previous), Some(latest)) => Ok(usage_between(&previous, &latest)),
            (_, Some(only)) => Ok(usage_between(&only, &take_sample()?)),
            (_, None) => {
                self.record()?;
                let now = take_sample()?;
                let first = self.samples().latest.unwrap_or(now);
                Ok(usage_between(&first, &now))
            }
        }
    }

    /// Samples every `interval` until the task is dropped. A failure is logged when reading
    /// starts failing and when it recovers, not on every tick.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            ticker.tick().await;
            match self.record() {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("node metrics sampling recovered");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "node metrics sampling failed");
                }
                Err(_) => {}
            }
        }
    }
}

/// This machine's host name, lower-cased as Kubernetes node names are; `localhost` when the
/// kernel does not say.
pub fn hostname() -> String {
    std::fs::read_to_string(PROC_HOSTNAME)
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Kubernetes' canonical form of a binary-SI quantity of bytes: the largest power-of-1024
/// suffix that divides the value exactly (`2097152` → `"2Mi"`, `1049600` → `"1025Ki"`,
/// `1536` → `"1536"`).
pub fn format_bytes_quantity(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes == 0 {
        return "0".to_owned();
    }
    let (mut value, mut power) = (bytes, 0);
    while value % 1024 == 0 && power + 1 < SUFFIXES.len() {
        value /= 1024;
        power += 1;
    }
    format!("{value}{}", SUFFIXES[power])
}

/// Kubernetes' canonical form of a decimal-SI quantity given in nano units: the largest of
/// `n`, `u`, `m` or no suffix that represents the value exactly (metrics-server's cpu is a
/// nano-scaled quantity, so `1234567` → `"1234567n"`, `2000000` → `"2m"`).
pub fn format_nano_quantity(nanos: u64) -> String {
    const SUFFIXES: [&str; 4] = ["n", "u", "m", ""];
    if nanos == 0 {
        return "0".to_owned();
    }
    let (mut value, mut power) = (nanos, 0);
    while value % 1000 == 0 && power + 1 < SUFFIXES.len() {
        value /= 1000;
        power += 1;
    }
    format!("{value}{}", SUFFIXES[power])
}

/// A duration as Go's `time.Duration.String()` writes it (`"1.002s"`, `"1m0.5s"`, `"500ms"`),
/// which is how `metav1.Duration` appears in JSON.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    fn fraction(value: u128, digits: u32) -> String {
        let scale = 10u128.pow(digits);
        let (whole, frac) = (value / scale, value % scale);
        if frac == 0 {
            return whole.to_string();
        }
        let frac = format!("{frac:0width$}", width = digits as usize);
        format!("{whole}.{}", frac.trim_end_matches('0'))
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", fraction(nanos, 3));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", fraction(nanos, 6));
    }
    let total_secs = nanos / 1_000_000_000;
    let (hours, minutes) = (total_secs / 3600, (total_secs / 60) % 60);
    let seconds = fraction(nanos % 60_000_000_000, 9);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

fn time(t: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(Time)
}

/// `metrics.k8s.io/v1beta1` NodeMetrics.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMetrics {
    pub kind: &'static str,
    pub api_version: &'static str,
    pub metadata: ObjectMeta,
    pub timestamp: Option<Time>,
    pub window: String,
    pub usage: BTreeMap<&'static str, String>,
}

impl NodeMetrics {
    /// The object metrics-server would serve for `node_name`: `creationTimestamp` is when the
    /// object was made (now), `timestamp` when the usage was measured.
    pub fn new(node_name: &str, usage: &NodeUsage) -> Self {
        Self {
            kind: "NodeMetrics",
            api_version: METRICS_API_VERSION,
            metadata: ObjectMeta {
                name: Some(node_name.to_owned()),
                creation_timestamp: time(SystemTime::now()),
                ..ObjectMeta::default()
            },
            timestamp: time(usage.timestamp),
            window: format_go_duration(usage.window),
            usage: BTreeMap::from([
                ("cpu", format_nano_quantity(usage.cpu_nanocores)),
                ("memory", format_bytes_quantity(usage.memory_working_set_bytes)),
            ]),
        }
    }
}

/// `NodeMetricsList` or `PodMetricsList`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsList<T> {
    pub kind: &'static str,
    pub api_version: &'static str,
    pub metadata: ListMeta,
    pub items: Vec<T>,
}

impl<T> MetricsList<T> {
    pub fn new(kind: &'static str, items: Vec<T>) -> Self {
        Self { kind, api_version: METRICS_API_VERSION, metadata: ListMeta::default(), items }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 20 30 1000 50 5 6 7 40 0\ncpu0 50 10 15 500 25 2 3 3 20 0\nintr 1 2 3\n";

    #[test]
    fn busy_ticks_count_user_nice_system_irq_softirq_and_steal_only() {
        assert_eq!(parse_busy_ticks(STAT).unwrap(), 100 + 20 + 30 + 5 + 6 + 7);
        assert_eq!(parse_busy_ticks("cpu  1 2 3 4\n").unwrap(), 6);
        assert!(parse_busy_ticks("cpu0 1 2 3 4\n").is_err());
        assert!(parse_busy_ticks("cpu  1 x 3 4\n").is_err());
    }

    #[test]
    fn working_set_is_total_minus_available() {
        let meminfo = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    6000000 kB\n";
        assert_eq!(parse_working_set_bytes(meminfo).unwrap(), 10_000_000 * 1024);
        assert!(parse_working_set_bytes("MemTotal: 1 kB\n").is_err());
    }

    #[test]
    fn cpu_rate_is_busy_time_over_the_window() {
        let t0 = Instant::now();
        let earlier = Sample { at: t0, wall: SystemTime::now(), busy_nanos: 0, memory_working_set_bytes: 1 };
        let later = Sample {
            at: t0 + Duration::from_secs(2),
            busy_nanos: 3_000_000_000,
            memory_working_set_bytes: 7,
            ..earlier
        };
        let usage = usage_between(&earlier, &later);
        assert_eq!(usage.cpu_nanocores, 1_500_000_000);
        assert_eq!(usage.window, Duration::from_secs(2));
        assert_eq!(usage.memory_working_set_bytes, 7);
        assert_eq!(usage_between(&earlier, &earlier).cpu_nanocores, 0);
    }

    #[test]
    fn quantities_use_kubernetes_canonical_suffixes() {
        assert_eq!(format_nano_quantity(1_234_567), "1234567n");
        assert_eq!(format_nano_quantity(1_234_000), "1234u");
        assert_eq!(format_nano_quantity(2_000_000), "2m");
        assert_eq!(format_nano_quantity(3_000_000_000), "3");
        assert_eq!(format_nano_quantity(0), "0");
        assert_eq!(format_bytes_quantity(1536), "1536");
        assert_eq!(format_bytes_quantity(1025 * 1024), "1025Ki");
        assert_eq!(format_bytes_quantity(2 * 1024 * 1024), "2Mi");
        assert_eq!(format_bytes_quantity(0), "0");
    }

    #[test]
    fn durations_are_written_as_go_writes_them() {
        assert_eq!(format_go_duration(Duration::from_millis(1002)), "1.002s");
        assert_eq!(format_go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(format_go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_go_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(format_go_duration(Duration::from_millis(60_500)), "1m0.5s");
        assert_eq!(format_go_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(format_go_duration(Duration::from_nanos(1500)), "1.5µs");
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn node_metrics_serialize_as_metrics_server_does() {
        let usage = NodeUsage {
            timestamp: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            window: Duration::from_millis(1004),
            cpu_nanocores: 1_234_567,
            memory_working_set_bytes: 1025 * 1024,
        };
        let json = serde_json::to_value(NodeMetrics::new("node-a", &usage)).unwrap();
        assert_eq!(json["kind"], "NodeMetrics");
        assert_eq!(json["apiVersion"], "metrics.k8s.io/v1beta1");
        assert_eq!(json["metadata"]["name"], "node-a");
        assert!(json["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(json["timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(json["window"], "1.004s");
        assert_eq!(json["usage"], serde_json::json!({"cpu": "1234567n", "memory": "1025Ki"}));
    }
}

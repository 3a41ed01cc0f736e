//! The audit log: JSON lines to `--audit-log-path`, written by a thread of its own behind a
//! bounded queue, rotated as kube-apiserver's log backend (lumberjack) rotates.
//!
//! Requests never wait for the disk: an event is serialized on the request's thread and
//! handed to the queue without blocking; when the queue is full (a slow or stuck disk) the
//! event is dropped and counted in `apiserver_audit_error_total{plugin="buffered"}`, as kube's
//! batch mode does. Write failures count under `plugin="log"`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::metrics::Metrics;

/// kube's `--audit-log-batch-buffer-size` default.
pub const DEFAULT_BUFFER_SIZE: usize = 10_000;
/// lumberjack's size when `--audit-log-maxsize` is 0.
const DEFAULT_MAX_SIZE_MB: u64 = 100;

/// Where and how the log is written (`--audit-log-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// `-` is standard output.
    pub path: PathBuf,
    /// Megabytes before the file is rotated; 0 is lumberjack's 100.
    pub max_size_mb: u64,
    /// Rotated files kept; 0 keeps all (unless `max_age_days` removes them).
    pub max_backups: usize,
    /// Days a rotated file is kept; 0 keeps them regardless of age.
    pub max_age_days: u64,
    /// Events waiting for the writer before new ones are dropped.
    pub buffer_size: usize,
}

/// The sending side, shared by every request.
#[derive(Debug)]
pub struct AuditLog {
    queue: SyncSender<String>,
    metrics: Arc<Metrics>,
}

impl AuditLog {
    /// Starts the writer thread. The file is opened by that thread, so a path that blocks on
    /// open (a FIFO without a reader) stalls only the writer.
    pub fn start(settings: LogSettings, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (queue, events) = sync_channel(settings.buffer_size.max(1));
        let writer_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || write_events(&settings, &events, &writer_metrics))?;
        Ok(Self { queue, metrics })
    }

    /// Queues one event line (without its newline); drops it if the queue is full.
    pub fn send(&self, line: String) {
        self.metrics.audit_event();
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.audit_error("buffered"),
            Err(TrySendError::Disconnected(_)) => self.metrics.audit_error("log"),
        }
    }
}

/// The writer thread: until every sender is gone.
fn write_events(settings: &LogSettings, events: &Receiver<String>, metrics: &Metrics) {
    let mut out: Option<Output> = None;
    while let Ok(mut line) = events.recv() {
        line.push('\n');
        let output = match &mut out {
            Some(o) => o,
            None => match Output::open(settings) {
                Ok(o) => out.insert(o),
                Err(e) => {
                    tracing::error!(path = %settings.path.display(), error = %e, "cannot open the audit log");
                    metrics.audit_error("log");
                    continue;
                }
            },
        };
        if let Err(e) = output.write(line.as_bytes(), settings) {
            tracing::error!(path = %settings.path.display(), error = %e, "cannot write the audit log");
            metrics.audit_error("log");
            out = None;
        }
    }
}

enum Output {
    Stdout,
    File { file: File, size: u64 },
}

impl Output {
    fn open(settings: &LogSettings) -> std::io::Result<Self> {
        if settings.path.as_os_str() == "-" {
            return Ok(Output::Stdout);
        }
        let file = open_log(&settings.path)?;
        let size = file.metadata()?.len();
        Ok(Output::File { file, size })
    }

    fn write(&mut self, line: &[u8], settings: &LogSettings) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line)?;
                out.flush()
            }
            Output::File { file, size } => {
                let mb = if settings.max_size_mb == 0 { DEFAULT_MAX_SIZE_MB } else { settings.max_size_mb };
                let max = mb.saturating_mul(1 << 20);
                let line_len = line.len() as u64;
                if line_len > max {
                    return Err(std::io::Error::other(format!(
                        "write length {line_len} exceeds maximum file size {max}"
                    )));
                }
                // Only a regular file is rotated: a FIFO or a device is the reader's business.
                if *size + line_len > max && file.metadata()?.is_file() {
                    *file = rotate(&settings.path)?;
                    *size = 0;
                    remove_old_backups(&settings.path, settings.max_backups, settings.max_age_days);
                }
                file.write_all(line)?;
                *size += line_len;
                Ok(())
            }
        }
    }
}

/// Opens for appending, creating it (and its directory) private to the owner, as kube does.
fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// `audit.log` becomes `audit-2006-01-02T15-04-05.000.log` (UTC), and a new `audit.log`
/// is started. Two rotations within a millisecond would share a name, and lumberjack would
/// let the second overwrite the first; here the second takes the next free millisecond.
fn rotate(path: &Path) -> std::io::Result<File> {
    let mut at = SystemTime::now();
    let mut backup = backup_name(path, at);
    while backup.exists() {
        at += Duration::from_millis(1);
        backup = backup_name(path, at);
    }
    std::fs::rename(path, backup)?;
    open_log(path)
}

fn split_name(path: &Path) -> (String, String) {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    (stem, ext)
}

fn backup_name(path: &Path, at: SystemTime) -> PathBuf {
    let (stem, ext) = split_name(path);
    // `2006-01-02T15:04:05.000Z` with the colons made dashes and the zone dropped.
    let stamp = humantime::format_rfc3339_millis(at).to_string().replace(':', "-");
    let stamp = stamp.trim_end_matches('Z');
    path.with_file_name(format!("{stem}-{stamp}{ext}"))
}

/// The time a backup's name gives, if it is one of this log's backups.
fn backup_time(path: &Path, name: &str) -> Option<SystemTime> {
    let (stem, ext) = split_name(path);
    let stamp = name.strip_prefix(&format!("{stem}-"))?.strip_suffix(&ext)?;
    let (date, time) = stamp.split_once('T')?;
    humantime::parse_rfc3339(&format!("{date}T{}Z", time.replace('-', ":"))).ok()
}

/// Keeps the newest `max_backups` (0: all) and none older than `max_age_days` (0: any age).
fn remove_old_backups(path: &Path, max_backups: usize, max_age_days: u64) {
    if max_backups == 0 && max_age_days == 0 {
        return;
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut backups: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            backup_time(path, &name).map(|t| (t, e.path()))
        })
        .collect();
    backups.sort_by_key(|b| std::cmp::Reverse(b.0));
    let cutoff = SystemTime::now().checked_sub(Duration::from_secs(max_age_days.saturating_mul(86_400)));
    for (i, (time, file)) in backups.iter().enumerate() {
        let too_many = max_backups > 0 && i >= max_backups;
        let too_old = max_age_days > 0 && cutoff.is_some_and(|c| *time < c);
        if too_many || too_old {
            if let Err(e) = std::fs::remove_file(file) {
                tracing::warn!(file = %file.display(), error = %e, "cannot remove an old audit log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backups_are_named_as_lumberjack_names_them() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_679_336_560_880);
        let name = backup_name(Path::new("/var/log/audit.log"), at);
        assert_eq!(name, Path::new("/var/log/audit-2023-03-20T18-22-40.880.log"));
        assert_eq!(backup_time(Path::new("/var/log/audit.log"), "audit-2023-03-20T18-22-40.880.log"), Some(at));
        assert_eq!(backup_time(Path::new("/var/log/audit.log"), "audit.log"), None);
        assert_eq!(backup_time(Path::new("/var/log/audit.log"), "other-2023-03-20T18-22-40.880.log"), None);
    }

    #[test]
    fn the_log_rotates_at_its_size_and_keeps_max_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let settings =
            LogSettings { path: path.clone(), max_size_mb: 1, max_backups: 2, max_age_days: 0, buffer_size: 16 };
        let line = vec![b'x'; 300 * 1024];
        let mut out = Output::open(&settings).unwrap();
        for _ in 0..12 {
            out.write(&line, &settings).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains(&"audit.log".to_owned()));
        for name in &names {
            let len = std::fs::metadata(dir.path().join(name)).unwrap().len();
            assert!(len <= 1 << 20, "{name}: {len}");
        }
    }
}

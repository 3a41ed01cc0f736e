//! Standalone mode: APIServices from a directory of manifests, reloaded on change.
//!
//! Files are reloaded within a second of a change (filesystem events, debounced; a periodic
//! check catches what events miss). A file that fails to parse or validate keeps serving the
//! last good objects it had and its error is logged and shown on `/debug/apiservices`; other
//! files are unaffected. When two files define the same APIService, the first by path wins.
//!
//! Reading and parsing run on a thread of their own, never on the runtime that serves
//! requests: whatever lands in the directory costs that thread's time only. And it is bounded
//! before the parser sees it: a file larger than `--apiservices-max-file-size`, nested deeper
//! than [`DEFAULT_MAX_DEPTH`], with more aliases than [`DEFAULT_MAX_ALIASES`], not UTF-8, not a
//! regular file (a FIFO is never opened), unreadable (a symlink loop), or holding more than
//! `--apiservices-max-per-file` APIServices is rejected with its reason, like any bad file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::apiservice::manifest::{parse_documents, yaml_shape};
use crate::apiservice::{validate, ApiService};
use crate::metrics::Metrics;
use crate::routing::writer::Snapshot;
use crate::routing::ServiceResolver;
use crate::server::endpoints::{Rejection, SharedRejections};

/// Events arriving within this window are handled as one change.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// Safety net for changes the filesystem did not report (network mounts, missed events).
const RESCAN_INTERVAL: Duration = Duration::from_secs(2);

const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 20;
pub const DEFAULT_MAX_PER_FILE: usize = 1_000;
/// An APIService manifest nests five levels deep, a `List` of them seven; kube's own YAML
/// decoder gives up far below what an attacker would send.
pub const DEFAULT_MAX_DEPTH: usize = 64;
/// Aliases are expanded by the parser, each a copy of its anchor: a few nested ones can
/// expand exponentially, and manifests rarely need any.
pub const DEFAULT_MAX_ALIASES: usize = 16;

/// Bounds on what one manifest file may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestLimits {
    /// `--apiservices-max-file-size`, in bytes.
    pub max_file_size: u64,
    /// `--apiservices-max-per-file`
    pub max_per_file: usize,
    pub max_depth: usize,
    pub max_aliases: usize,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        Self {
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            max_per_file: DEFAULT_MAX_PER_FILE,
            max_depth: DEFAULT_MAX_DEPTH,
            max_aliases: DEFAULT_MAX_ALIASES,
        }
    }
}

/// Why a file's content is not used: the words for `/debug/apiservices` and the log, and a
/// bounded label for `aggregator_manifest_rejections_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileRejection {
    kind: &'static str,
    reason: String,
}

impl FileRejection {
    fn new(kind: &'static str, reason: impl Into<String>) -> Self {
        Self { kind, reason: reason.into() }
    }
}

#[derive(Debug, Default)]
struct FileState {
    /// Modification time and size at the last look; `None` when they could not be read.
    stamp: Option<(Option<SystemTime>, u64)>,
    looked: bool,
    /// Digest of the content last parsed, zero when the last look was refused before parsing.
    digest: [u8; 32],
    /// The last good objects of this file, shared with the snapshots and tables built from it.
    objects: Vec<Arc<ApiService>>,
    /// Why the current content is not used, if it is not.
    error: Option<FileRejection>,
}

pub struct FileSource {
    dir: PathBuf,
    resolver: Arc<dyn ServiceResolver>,
    limits: ManifestLimits,
    files: BTreeMap<PathBuf, FileState>,
    rejections: SharedRejections,
    metrics: Arc<Metrics>,
    dir_error: Option<String>,
    /// Each distinct caBundle once: thousands of APIServices usually trust a handful of CAs,
    /// and a shared `Arc` also makes the routing table's per-service comparison a pointer check.
    ca_bundles: HashSet<Arc<[u8]>>,
}

/// Whether a directory entry is meant as a manifest: by name only, so that what it is (a
/// FIFO, a loop of symlinks, a directory) is found out, and reported, when it is read.
fn is_manifest_name(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    let ext_ok = path.extension().and_then(|e| e.to_str()).is_some_and(|e| MANIFEST_EXTENSIONS.contains(&e));
    !hidden && ext_ok
}

/// Reads a manifest within its limits; the metadata is the one the caller already has.
fn read_manifest(
    path: &Path,
    meta: std::io::Result<std::fs::Metadata>,
    limits: &ManifestLimits,
) -> Result<String, FileRejection> {
    let meta = meta.map_err(|e| FileRejection::new("unreadable", format!("cannot be read: {e}")))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(FileRejection::new("not-a-regular-file", format!("is {what}, not a regular file")));
    }
    let too_large = |size: u64| {
        FileRejection::new(
            "too-large",
            format!("is {size} bytes, more than --apiservices-max-file-size ({} bytes)", limits.max_file_size),
        )
    };
    if meta.len() > limits.max_file_size {
        return Err(too_large(meta.len()));
    }
    let file =
        std::fs::File::open(path).map_err(|e| FileRejection::new("unreadable", format!("cannot be read: {e}")))?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // It may have grown since it was measured: never read more than the limit allows.
    file.take(limits.max_file_size + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileRejection::new("unreadable", format!("cannot be read: {e}")))?;
    if bytes.len() as u64 > limits.max_file_size {
        return Err(too_large(bytes.len() as u64));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        FileRejection::new("not-utf8", format!("is not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()))
    })?;
    let shape = yaml_shape(&text);
    if shape.depth > limits.max_depth {
        return Err(FileRejection::new(
            "too-deep",
            format!("nests at least {} levels deep, more than the limit of {}", shape.depth, limits.max_depth),
        ));
    }
    if shape.aliases > limits.max_aliases {
        return Err(FileRejection::new(
            "too-many-aliases",
            format!("has {} YAML aliases, more than the limit of {}", shape.aliases, limits.max_aliases),
        ));
    }
    Ok(text)
}

impl FileSource {
    pub fn new(
        dir: PathBuf,
        resolver: Arc<dyn ServiceResolver>,
        limits: ManifestLimits,
        rejections: SharedRejections,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            dir,
            resolver,
            limits,
            files: BTreeMap::new(),
            rejections,
            metrics,
            dir_error: None,
            ca_bundles: HashSet::new(),
        }
    }

    /// Re-reads the directory. With `force`, every file's content is compared; otherwise only
    /// files whose size or modification time changed are read. Returns whether anything
    /// changed. Blocking: call it off the runtime.
    pub fn scan(&mut self, force: bool) -> bool {
        let listing = match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                let mut paths: Vec<PathBuf> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest_name(p)).collect();
                paths.sort();
                self.dir_error = None;
                paths
            }
            Err(e) => {
                let message = format!("apiservices directory {}: {e}", self.dir.display());
                if self.dir_error.as_deref() != Some(&message) {
                    tracing::error!("{message}");
                }
                self.dir_error = Some(message);
                Vec::new()
            }
        };
        let before = self.files.len();
        self.files.retain(|p, _| listing.contains(p));
        let mut changed = self.files.len() != before;
        for path in listing {
            changed |= self.refresh(&path, force);
        }
        if changed {
            // Bundles no file uses any more: only this set holds them.
            self.ca_bundles.retain(|b| Arc::strong_count(b) > 1);
        }
        changed
    }

    fn refresh(&mut self, path: &Path, force: bool) -> bool {
        // `metadata` follows symlinks and never opens the file: a FIFO is found out here.
        let meta = std::fs::metadata(path);
        let stamp = meta.as_ref().ok().map(|m| (m.modified().ok(), m.len()));
        let state = self.files.entry(path.to_owned()).or_default();
        if !force && state.looked && state.stamp == stamp {
            return false;
        }
        state.looked = true;
        state.stamp = stamp;
        let text = match read_manifest(path, meta, &self.limits) {
            Ok(text) => text,
            Err(rejection) => {
                state.digest = [0; 32];
                return reject(state, rejection, path, &self.metrics);
            }
        };
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if digest == state.digest {
            return false;
        }
        state.digest = digest;
        match load_file(&text, &path.display().to_string(), self.limits.max_per_file) {
            Ok(objects) => {
                tracing::info!(file = %path.display(), apiservices = objects.len(), "loaded manifest");
                let ca_bundles = &mut self.ca_bundles;
                // A fresh vector, not one collected in place: that would keep the parsed
                // objects' buffer (about 200 bytes each, 2 MiB at 10,000) to hold pointers.
                let mut shared = Vec::with_capacity(objects.len());
                shared.extend(objects.into_iter().map(|a| Arc::new(share_ca_bundle(a, ca_bundles))));
                state.objects = shared;
                state.error = None;
                true
            }
            Err(rejection) => reject(state, rejection, path, &self.metrics),
        }
    }

    /// The union of every file's objects, and the rejections (bad files, duplicates).
    pub fn collect(&self) -> (Vec<Arc<ApiService>>, Vec<Rejection>) {
        let mut seen: HashMap<Arc<str>, &Path> = HashMap::new();
        let mut apiservices = Vec::new();
        let mut rejections = Vec::new();
        if let Some(e) = &self.dir_error {
            rejections.push(Rejection { source: self.dir.display().to_string(), name: None, reason: e.clone() });
        }
        for (path, state) in &self.files {
            if let Some(error) = &state.error {
                rejections.push(Rejection {
                    source: path.display().to_string(),
                    name: None,
                    reason: error.reason.clone(),
                });
            }
            for a in &state.objects {
                match seen.get(&a.name) {
                    Some(first) => rejections.push(Rejection {
                        source: path.display().to_string(),
                        name: Some(a.name.to_string()),
                        reason: format!("duplicate APIService {:?}: already defined in {}", a.name, first.display()),
                    }),
                    None => {
                        seen.insert(a.name.clone(), path);
                        apiservices.push(a.clone());
                    }
                }
            }
        }
        (apiservices, rejections)
    }

    fn publish(&self, tx: &watch::Sender<Option<Arc<Snapshot>>>) {
        let (apiservices, rejections) = self.collect();
        self.metrics.set_invalid_apiservices(rejections.len());
        self.rejections.store(Arc::new(rejections));
        tx.send_replace(Some(Arc::new(Snapshot { apiservices, resolver: self.resolver.clone() })));
    }

    /// Publishes the directory's APIServices now and after every change, until `tx` closes.
    /// The work runs on a thread of its own; this future only waits for it to end.
    pub async fn run(self, tx: watch::Sender<Option<Arc<Snapshot>>>) {
        let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new().name("apiservice-files".into()).spawn(move || {
            self.watch_blocking(&tx);
            let _ = done_tx.send(());
        });
        match spawned {
            Ok(_) => {
                let _ = done.await;
            }
            Err(e) => tracing::error!(error = %e, "cannot start the manifest reader thread"),
        }
    }

    fn watch_blocking(mut self, tx: &watch::Sender<Option<Arc<Snapshot>>>) {
        let (events_tx, events) = std_mpsc::channel::<()>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Access events (open, read, close without writing) are our own rescans reading
            // the files: reacting to them would rescan forever.
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = events_tx.send(());
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => match w.watch(&self.dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch directory; polling every {RESCAN_INTERVAL:?}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; polling every {RESCAN_INTERVAL:?}");
                None
            }
        };
        self.scan(true);
        self.publish(tx);
        loop {
            let force = match events.recv_timeout(RESCAN_INTERVAL) {
                Ok(()) => {
                    std::thread::sleep(DEBOUNCE);
                    while events.try_recv().is_ok() {}
                    true
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => false,
                // No watcher: poll.
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(RESCAN_INTERVAL);
                    false
                }
            };
            if tx.is_closed() {
                return;
            }
            if self.scan(force) {
                self.publish(tx);
            }
        }
    }
}

/// Records why `state`'s file is refused, keeping its last good objects; says so once per
/// distinct reason. Returns whether anything changed.
fn reject(state: &mut FileState, rejection: FileRejection, path: &Path, metrics: &Metrics) -> bool {
    let file = path.display().to_string();
    let rejection = if rejection.reason.starts_with(&file) {
        rejection
    } else {
        FileRejection { reason: format!("{file}: {}", rejection.reason), ..rejection }
    };
    if state.error.as_ref() == Some(&rejection) {
        return false;
    }
    metrics.manifest_rejected(rejection.kind);
    tracing::warn!(reason = %rejection.reason, kept = state.objects.len(), "manifest rejected; keeping its last good APIServices");
    state.error = Some(rejection);
    true
}

/// `a` with its caBundle replaced by the equal one already held, if any.
fn share_ca_bundle(mut a: ApiService, ca_bundles: &mut HashSet<Arc<[u8]>>) -> ApiService {
    if let Some(service) = a.service.as_mut() {
        match ca_bundles.get(&service.ca_bundle) {
            Some(shared) => service.ca_bundle = shared.clone(),
            None => {
                ca_bundles.insert(service.ca_bundle.clone());
            }
        }
    }
    a
}

/// Parses and validates one file; any problem rejects the whole file, with every reason.
fn load_file(text: &str, file: &str, max_per_file: usize) -> Result<Vec<ApiService>, FileRejection> {
    let objects = parse_documents(text, file).map_err(|e| FileRejection::new("parse", e.to_string()))?;
    if objects.len() > max_per_file {
        return Err(FileRejection::new(
            "too-many-objects",
            format!(
                "{file}: holds {} APIServices, more than --apiservices-max-per-file ({max_per_file})",
                objects.len()
            ),
        ));
    }
    let mut valid = Vec::new();
    let mut errors = Vec::new();
    for object in &objects {
        match validate(object) {
            Ok(a) => valid.push(a),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() {
        Ok(valid)
    } else {
        Err(FileRejection::new("invalid", format!("{file}: {}", errors.join("; "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::StaticResolver;

    fn manifest(name: &str, gpm: i32) -> String {
        let (version, group) = name.split_once('.').unwrap();
        format!(
            "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {{name: {name}}}\n\
             spec: {{group: {group}, version: {version}, groupPriorityMinimum: {gpm}, versionPriority: 1}}\n"
        )
    }

    fn source(dir: &Path) -> FileSource {
        FileSource::new(
            dir.to_owned(),
            Arc::new(StaticResolver::default()),
            ManifestLimits::default(),
            Default::default(),
            Arc::new(Metrics::new()),
        )
    }

    fn names(s: &FileSource) -> Vec<String> {
        s.collect().0.iter().map(|a| a.name.to_string()).collect()
    }

    #[test]
    fn a_bad_edit_keeps_the_files_last_good_objects_and_spares_the_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), manifest("v1.a.io", 10)).unwrap();
        std::fs::write(dir.path().join("b.yaml"), manifest("v1.b.io", 10)).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let mut s = source(dir.path());
        assert!(s.scan(true));
        assert_eq!(names(&s), ["v1.a.io", "v1.b.io"]);

        std::fs::write(dir.path().join("a.yaml"), manifest("v1.a.io", 0)).unwrap();
        assert!(s.scan(true));
        assert_eq!(names(&s), ["v1.a.io", "v1.b.io"]);
        let (_, rejections) = s.collect();
        assert_eq!(rejections.len(), 1);
        assert!(rejections[0].reason.contains("spec.groupPriorityMinimum"), "{:?}", rejections[0]);

        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert!(s.scan(false));
        assert_eq!(names(&s), ["v1.a.io"]);
        assert!(!s.scan(true), "nothing changed");
    }

    #[test]
    fn apiservices_trusting_the_same_ca_share_one_ca_bundle() {
        let remote = |name: &str| {
            let (version, group) = name.split_once('.').unwrap();
            format!(
                "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {{name: {name}}}\n\
                 spec: {{group: {group}, version: {version}, groupPriorityMinimum: 1, versionPriority: 1,\
                 caBundle: Zm9v, service: {{namespace: ns, name: backend}}}}\n"
            )
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), remote("v1.a.io")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), remote("v1.b.io")).unwrap();
        let mut s = source(dir.path());
        s.scan(true);
        let (apiservices, _) = s.collect();
        let bundles: Vec<_> = apiservices.iter().map(|a| a.service.as_ref().unwrap().ca_bundle.clone()).collect();
        assert_eq!(&*bundles[0], b"foo");
        assert!(Arc::ptr_eq(&bundles[0], &bundles[1]));
    }

    #[test]
    fn duplicates_across_files_are_rejected_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.yaml"), manifest("v1.a.io", 10)).unwrap();
        std::fs::write(dir.path().join("2.yaml"), manifest("v1.a.io", 20)).unwrap();
        let mut s = source(dir.path());
        s.scan(true);
        let (apiservices, rejections) = s.collect();
        assert_eq!(apiservices[0].group_priority_minimum, 10);
        assert!(rejections[0].reason.starts_with("duplicate APIService \"v1.a.io\""));
    }
}

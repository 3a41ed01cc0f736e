//! Standalone mode: APIServices from a directory of manifests, reloaded on change.
//!
//! Files are reloaded within a second of a change (filesystem events, debounced; a periodic
//! check catches what events miss). A file that fails to parse or validate keeps serving the
//! last good objects it had and its error is logged and shown on `/debug/apiservices`; other
//! files are unaffected. When two files define the same APIService, the first by path wins.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::apiservice::manifest::parse_documents;
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

#[derive(Debug, Default)]
struct FileState {
    modified: Option<SystemTime>,
    len: u64,
    digest: [u8; 32],
    /// The last good objects of this file, shared with the snapshots and tables built from it.
    objects: Vec<Arc<ApiService>>,
    /// Why the current content is not used, if it is not.
    error: Option<String>,
}

pub struct FileSource {
    dir: PathBuf,
    resolver: Arc<dyn ServiceResolver>,
    files: BTreeMap<PathBuf, FileState>,
    rejections: SharedRejections,
    metrics: Arc<Metrics>,
    dir_error: Option<String>,
    /// Each distinct caBundle once: thousands of APIServices usually trust a handful of CAs,
    /// and a shared `Arc` also makes the routing table's per-service comparison a pointer check.
    ca_bundles: HashSet<Arc<[u8]>>,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    let ext_ok = path.extension().and_then(|e| e.to_str()).is_some_and(|e| MANIFEST_EXTENSIONS.contains(&e));
    !hidden && ext_ok && path.is_file()
}

impl FileSource {
    pub fn new(
        dir: PathBuf,
        resolver: Arc<dyn ServiceResolver>,
        rejections: SharedRejections,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { dir, resolver, files: BTreeMap::new(), rejections, metrics, dir_error: None, ca_bundles: HashSet::new() }
    }

    /// Re-reads the directory. With `force`, every file's content is compared; otherwise only
    /// files whose size or modification time changed are read. Returns whether anything
    /// changed.
    pub fn scan(&mut self, force: bool) -> bool {
        let listing = match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                let mut paths: Vec<PathBuf> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest(p)).collect();
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
        let meta = std::fs::metadata(path).ok();
        let modified = meta.as_ref().and_then(|m| m.modified().ok());
        let len = meta.as_ref().map_or(0, |m| m.len());
        let state = self.files.entry(path.to_owned()).or_default();
        let is_new = state.modified.is_none() && state.digest == [0; 32];
        if !force && !is_new && state.modified == modified && state.len == len {
            return false;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                // Removed between listing and reading: the next scan drops it.
                tracing::debug!(file = %path.display(), error = %e, "unreadable manifest");
                return false;
            }
        };
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        state.modified = modified;
        state.len = len;
        if digest == state.digest {
            return false;
        }
        state.digest = digest;
        match load_file(&text, &path.display().to_string()) {
            Ok(objects) => {
                tracing::info!(file = %path.display(), apiservices = objects.len(), "loaded manifest");
                let ca_bundles = &mut self.ca_bundles;
                state.objects = objects.into_iter().map(|a| Arc::new(share_ca_bundle(a, ca_bundles))).collect();
                state.error = None;
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, kept = state.objects.len(), "manifest rejected; keeping its last good APIServices");
                state.error = Some(reason);
            }
        }
        true
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
            if let Some(reason) = &state.error {
                rejections.push(Rejection { source: path.display().to_string(), name: None, reason: reason.clone() });
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
    pub async fn run(mut self, tx: watch::Sender<Option<Arc<Snapshot>>>) {
        let (events_tx, mut events) = mpsc::unbounded_channel();
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
        self.publish(&tx);
        let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                event = events.recv() => {
                    if event.is_none() {
                        return;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    while events.try_recv().is_ok() {}
                    true
                }
                _ = rescan.tick() => false,
                () = tx.closed() => return,
            };
            if self.scan(force) {
                self.publish(&tx);
            }
        }
    }
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
fn load_file(text: &str, file: &str) -> Result<Vec<ApiService>, String> {
    let objects = parse_documents(text, file).map_err(|e| e.to_string())?;
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
        Err(format!("{file}: {}", errors.join("; ")))
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

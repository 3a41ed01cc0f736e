//! The Kubernetes binaries, built from the Go module proxy by `tests/e2e/k8s/build.sh`.
//!
//! build.sh is the single source of truth for versions and cache paths; it is run once per
//! test binary under an exclusive file lock in the cache directory, so test binaries that
//! start together wait for one build instead of building twice. A warm run does no Go work.

use std::collections::HashMap;
use std::env;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use fs4::fs_std::FileExt;

/// Paths of the built binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub metrics_server: PathBuf,
    pub sample_apiserver: PathBuf,
    /// `$KUBECTL`, else `kubectl` on PATH, else built from k8s.io/kubernetes like the rest.
    pub kubectl: PathBuf,
}

/// Builds (first use) or finds (afterwards) the binaries; the result is cached per process.
pub fn binaries() -> Result<&'static Binaries, String> {
    static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BINARIES.get_or_init(build).as_ref().map_err(Clone::clone)
}

fn build() -> Result<Binaries, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/k8s/build.sh");
    let cache = cache_dir();
    fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;

    let mut names = vec!["etcd", "kube-apiserver", "sample-apiserver", "metrics-server"];
    let installed_kubectl = env::var_os("KUBECTL").map(PathBuf::from).or_else(|| find_on_path("kubectl"));
    if installed_kubectl.is_none() {
        names.push("kubectl");
    }

    let lock_path = cache.join("build.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    lock.lock_exclusive().map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
    // build.sh's progress goes straight to the terminal (not captured by the test harness),
    // so a cold build of several minutes shows what it is doing.
    let output = Command::new("bash")
        .arg(&script)
        .args(&names)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    drop(lock);
    if !output.status.success() {
        return Err(format!("{} failed: {}", script.display(), output.status));
    }

    let stdout = String::from_utf8_lossy(&output.stdout);
    let built: HashMap<&str, PathBuf> = stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, path)| (name, PathBuf::from(path)))
        .collect();
    let path =
        |name: &str| built.get(name).cloned().ok_or_else(|| format!("build.sh printed no path for {name}:\n{stdout}"));
    Ok(Binaries {
        etcd: path("etcd")?,
        kube_apiserver: path("kube-apiserver")?,
        metrics_server: path("metrics-server")?,
        sample_apiserver: path("sample-apiserver")?,
        kubectl: match installed_kubectl {
            Some(kubectl) => kubectl,
            None => path("kubectl")?,
        },
    })
}

/// `$KAP_CACHE_DIR`, else `$XDG_CACHE_HOME/kube-aggregation-proxy`, else `~/.cache/...`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("KAP_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache"));
    base.join("kube-aggregation-proxy")
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|dir| dir.join(program)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

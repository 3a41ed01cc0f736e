//! The Kubernetes binaries, built from the Go module proxy by `tests/e2e/k8s/build.sh`.
//!
//! build.sh is the single source of truth for versions and cache paths; it is run once per
//! process under an exclusive file lock in the cache directory, so processes that start
//! together wait for one build instead of building twice. A warm run does no Go work.
//!
//! The script and the Go modules beside it are compiled into the crate ([`RECIPE`]) and written
//! to the cache directory before use, so a `kube-aggregation-proxy` binary copied away from
//! its source tree can still run `demo --cluster`.

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

/// build.sh and the Go modules it builds from, as files relative to the script.
const RECIPE: [(&str, &str); 8] = [
    ("build.sh", include_str!("../../tests/e2e/k8s/build.sh")),
    ("apiserver/go.mod", include_str!("../../tests/e2e/k8s/apiserver/go.mod")),
    ("apiserver/go.sum", include_str!("../../tests/e2e/k8s/apiserver/go.sum")),
    ("etcd/go.mod", include_str!("../../tests/e2e/k8s/etcd/go.mod")),
    ("etcd/go.sum", include_str!("../../tests/e2e/k8s/etcd/go.sum")),
    ("etcd/main.go", include_str!("../../tests/e2e/k8s/etcd/main.go")),
    ("metrics-server/go.mod", include_str!("../../tests/e2e/k8s/metrics-server/go.mod")),
    ("metrics-server/go.sum", include_str!("../../tests/e2e/k8s/metrics-server/go.sum")),
];

/// The recipe's files under `cache/recipe/<content hash>`, written once (to a temporary
/// directory renamed into place, so a concurrent writer never leaves half a recipe).
fn recipe_dir(cache: &Path) -> Result<PathBuf, String> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (name, text) in RECIPE {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update(text.as_bytes());
    }
    let digest: String = hash.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let dir = cache.join("recipe").join(digest);
    if dir.join("build.sh").is_file() {
        return Ok(dir);
    }
    let parent = cache.join("recipe");
    fs::create_dir_all(&parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(&parent)
        .map_err(|e| format!("creating a directory in {}: {e}", parent.display()))?;
    for (name, text) in RECIPE {
        let path = staging.path().join(name);
        if let Some(d) = path.parent() {
            fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    match fs::rename(staging.path(), &dir) {
        Ok(()) => Ok(dir),
        // Another process put the same recipe there first.
        Err(_) if dir.join("build.sh").is_file() => Ok(dir),
        Err(e) => Err(format!("writing the build recipe to {}: {e}", dir.display())),
    }
}

fn build() -> Result<Binaries, String> {
    let cache = cache_dir();
    fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let script = recipe_dir(&cache)?.join("build.sh");

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

//! Running the real kubectl: one-shot commands and long-running watches.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use super::process::Process;

/// Server-side deadline for one-shot commands, so a hung server cannot hang a test.
const REQUEST_TIMEOUT: &str = "--request-timeout=60s";

/// What a kubectl invocation printed and how it ended.
#[derive(Debug)]
pub struct KubectlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl KubectlOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Returns stdout, or panics with everything kubectl said.
    pub fn expect_success(self, what: &str) -> String {
        assert!(
            self.status.success(),
            "kubectl {what} failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// stdout parsed as JSON (for `-o json` and `get --raw`).
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.stdout).map_err(|e| format!("kubectl printed no JSON ({e}): {}", self.stdout))
    }
}

/// kubectl's discovery cache for `kubeconfig`, next to it: the default, `~/.kube/cache`, is
/// keyed by host and port, and a later proxy on a port an earlier one used would be answered
/// from that one's cached discovery.
fn cache_dir(kubeconfig: &Path) -> String {
    kubeconfig.with_extension("kubectl-cache").display().to_string()
}

/// Runs `kubectl --kubeconfig <kubeconfig> <args>`, feeding `stdin` if given.
pub fn run(kubectl: &Path, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Result<KubectlOutput, String> {
    let mut child = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache_dir(kubeconfig))
        .arg(REQUEST_TIMEOUT)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", kubectl.display()))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input.as_bytes()).map_err(|e| format!("writing kubectl's stdin: {e}"))?;
    }
    let output = child.wait_with_output().map_err(|e| format!("waiting for kubectl: {e}"))?;
    Ok(KubectlOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// A long-running kubectl (for example `get --watch`) whose stdout is read line by line.
///
/// The process is supervised like the cluster's own, so it ends with the test binary;
/// dropping the watch ends it too. Its stderr goes to a log file in the cluster directory.
pub struct KubectlWatch {
    lines: Receiver<String>,
    process: Process,
}

impl KubectlWatch {
    pub fn spawn(kubectl: &Path, kubeconfig: &Path, args: &[&str], log: &Path) -> Result<Self, String> {
        let mut full_args = vec![
            "--kubeconfig".to_owned(),
            kubeconfig.display().to_string(),
            "--cache-dir".to_owned(),
            cache_dir(kubeconfig),
        ];
        full_args.extend(args.iter().map(|a| a.to_string()));
        let (process, stdout) = Process::spawn_piped("kubectl-watch", kubectl, &full_args, log)
            .map_err(|e| format!("starting kubectl {args:?}: {e}"))?;
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(KubectlWatch { lines, process })
    }

    /// Waits up to `timeout` for a line satisfying `wanted`, skipping others.
    ///
    /// Fails on timeout or when kubectl ends first; the error names what was seen.
    pub fn wait_for_line(&mut self, timeout: Duration, wanted: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no matching line from kubectl within {timeout:?}; saw: {seen:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "kubectl ended ({:?}) before a matching line; saw: {seen:?}",
                        self.process.exit_status()
                    ))
                }
            }
        }
    }
}

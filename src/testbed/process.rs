//! Child processes that cannot outlive the test binary, each logging to its own file.
//!
//! Every process runs under a small bash watchdog whose standard input is a pipe held open
//! by this process (the write end is close-on-exec, so no other child inherits it). When the
//! pipe closes, because [`Process::stop`] dropped it or because the test binary exited in any
//! way, panic and SIGKILL included, the kernel delivers EOF and the watchdog sends SIGTERM to
//! its child, then SIGKILL after a grace period. Nothing here depends on which thread spawned
//! the process, unlike `PR_SET_PDEATHSIG`, and no unsafe code is needed.
//!
//! Each wrapper starts its own process group, so terminal signals reach the test binary only
//! and the watchdog decides when its child goes.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// The watchdog: runs "$@" with fd 3 as the lifeline. A `stop` line on it asks for a
/// graceful stop (SIGTERM, SIGKILL after ten seconds); EOF without one means this test
/// binary is gone or gave up on the process, so the child is killed at once.
const WATCHDOG: &str = r#"
exec 3<&0 0</dev/null
"$@" 3<&- &
child=$!
{
	line=
	while read -r -u 3 line; do
		[[ $line == stop ]] && break
	done
	if [[ $line == stop ]]; then
		kill -TERM "$child" 2>/dev/null
		for ((i = 0; i < 100; i++)); do
			kill -0 "$child" 2>/dev/null || exit 0
			sleep 0.1
		done
	fi
	kill -KILL "$child" 2>/dev/null
} &
watcher=$!
exec 3<&-
wait "$child"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"#;

/// Removes a directory once the lifeline closes, retrying while dying processes still write.
const JANITOR: &str = r#"
while read -r _; do :; done
for ((i = 0; i < 50; i++)); do
	rm -rf -- "$1" 2>/dev/null
	[[ -e "$1" ]] || exit 0
	sleep 0.2
done
"#;

/// How long [`Process::stop`] waits for the watchdog to report its child gone.
const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// Log files of every process started by this test binary, for [`print_log_tails`].
static LOG_FILES: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// A supervised child process; stopping or dropping it ends the process and waits for it.
pub struct Process {
    name: String,
    log: PathBuf,
    /// Length of the log when this process started: earlier lines belong to earlier runs.
    log_start: u64,
    wrapper: Child,
    lifeline: Option<ChildStdin>,
    exit: Option<ExitStatus>,
}

impl Process {
    /// Starts `program args...` under a watchdog, appending stdout and stderr to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> io::Result<Self> {
        let log_file = OpenOptions::new().create(true).append(true).open(log)?;
        let stdout = Stdio::from(log_file.try_clone()?);
        Self::spawn_with(name, program, args, log, stdout)
    }

    /// Like [`Process::spawn`], but hands stdout to the caller; stderr still goes to `log`.
    pub fn spawn_piped(name: &str, program: &Path, args: &[String], log: &Path) -> io::Result<(Self, ChildStdout)> {
        let mut process = Self::spawn_with(name, program, args, log, Stdio::piped())?;
        let stdout = process.wrapper.stdout.take().expect("stdout was piped");
        Ok((process, stdout))
    }

    fn spawn_with(name: &str, program: &Path, args: &[String], log: &Path, stdout: Stdio) -> io::Result<Self> {
        let log_file = OpenOptions::new().create(true).append(true).open(log)?;
        let log_start = log_file.metadata()?.len();
        let wrapper = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(format!("watchdog-{name}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {name}: {e}")))?;
        register_log(name, log);
        let mut process =
            Process { name: name.to_owned(), log: log.to_owned(), log_start, wrapper, lifeline: None, exit: None };
        process.lifeline = process.wrapper.stdin.take();
        Ok(process)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this run of the process logged a line containing `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        let Ok(mut file) = File::open(&self.log) else {
            return false;
        };
        if file.seek(SeekFrom::Start(self.log_start)).is_err() {
            return false;
        }
        BufReader::new(file).lines().map_while(Result::ok).any(|line| line.contains(needle))
    }

    /// The exit status if the process has ended (by itself or through [`Process::stop`]).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.wrapper.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Ends the process gracefully (SIGTERM, then SIGKILL after ten seconds) and waits.
    pub fn stop(&mut self) {
        if let Some(mut lifeline) = self.lifeline.take() {
            // A broken pipe means the watchdog is already gone; waiting below still reaps it.
            let _ = lifeline.write_all(b"stop\n");
        }
        self.wait_for_exit();
    }

    /// Kills the process at once (SIGKILL), as a crash would end it, and waits.
    pub fn kill(&mut self) {
        self.lifeline = None;
        self.wait_for_exit();
    }

    fn wait_for_exit(&mut self) {
        self.lifeline = None;
        let deadline = Instant::now() + STOP_DEADLINE;
        while self.exit_status().is_none() {
            if Instant::now() > deadline {
                // The watchdog itself is stuck: take the whole process group down.
                let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.wrapper.id())]).status();
                self.exit = self.wrapper.wait().ok();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    /// Test processes hold nothing worth a graceful shutdown: kill, for a fast teardown.
    fn drop(&mut self) {
        self.kill();
    }
}

/// Removes `dir` when this test binary exits (or the returned handle is dropped).
///
/// Used for directories owned by process-wide state that is never dropped.
pub fn remove_dir_on_exit(dir: &Path) -> io::Result<ChildStdin> {
    let mut janitor = Command::new("bash")
        .arg("-c")
        .arg(JANITOR)
        .arg("janitor")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let lifeline = janitor.stdin.take().expect("stdin was piped");
    // Reap the janitor if it ends while we still run; otherwise it outlives us by design
    // only as long as it takes to remove the directory.
    thread::spawn(move || janitor.wait());
    Ok(lifeline)
}

/// A free TCP port on 127.0.0.1 at the time of the call.
///
/// Another process may take it before ours binds; starters retry on "address already in use".
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
    let mut text = String::new();
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_ok() {
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn register_log(name: &str, path: &Path) {
    let mut logs = LOG_FILES.lock().unwrap_or_else(|e| e.into_inner());
    if !logs.iter().any(|(_, p)| p == path) {
        logs.push((name.to_owned(), path.to_owned()));
    }
}

/// Prints (to the test's captured stderr) the tail of every process log of this binary.
pub fn print_log_tails(lines: usize) {
    let logs = LOG_FILES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (name, path) in logs {
        if !path.exists() {
            continue;
        }
        eprintln!("----- last {lines} lines of {name} ({}) -----\n{}", path.display(), log_tail(&path, lines));
    }
}

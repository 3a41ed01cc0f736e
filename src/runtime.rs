//! Where requests are handled: one single-threaded runtime per core (the default), or tokio's
//! work-stealing runtime (`--runtime work-stealing`).
//!
//! Per core, each thread has its own `SO_REUSEPORT` listener (the kernel spreads new
//! connections over them) and runs every connection it accepts to the end, so a request is
//! accepted, authenticated, routed and forwarded without waking another thread. Backend
//! connection pools are kept per runtime ([`slot`]): a request's backend stream is driven by a
//! connection task on its own thread too. Background work (sources, discovery, availability)
//! stays on the main runtime, which is slot 0.
//!
//! Per core is the default because it measured better at every point of the load benchmark,
//! one busy HTTP/2 connection included (benches/RESULTS.md, "Per core by default").

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// `--runtime`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeModel {
    /// One multi-threaded runtime; any worker may run any connection's tasks.
    WorkStealing,
    /// One single-threaded runtime per core, each with its own listener and backend pools.
    #[default]
    PerCore,
}

/// The accept backlog of each per-core listener.
const LISTEN_BACKLOG: i32 = 1024;

thread_local! {
    /// This thread's slot: 1 + its index on a per-core runtime thread, 0 elsewhere.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Slots that per-runtime state (backend pools) is split into: 1 until per-core runtimes
/// start, then the cores plus the main runtime's slot 0.
static SLOTS: OnceLock<usize> = OnceLock::new();

pub fn slots() -> usize {
    SLOTS.get().copied().unwrap_or(1)
}

/// The slot of the runtime this thread belongs to; state made with fewer slots takes it modulo
/// its own count.
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// Splits per-runtime state for `model` from now on. Called before anything that keeps such
/// state (backend endpoints) is made, so every endpoint has a pool per runtime.
pub fn prepare(model: RuntimeModel) {
    if model == RuntimeModel::PerCore {
        let _ = SLOTS.set(cores() + 1);
    }
}

/// Per-core runtimes for this process: the cores it may use (std reads the cgroup quota and
/// the affinity mask).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `n` listeners on `addr` sharing its port through `SO_REUSEPORT` (port 0 picks one port for
/// all of them).
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(n);
    let mut bound = addr;
    for _ in 0..n.max(1) {
        let socket = socket2::Socket::new(socket2::Domain::for_address(bound), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&bound.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Runs `run(index)` on a thread of its own with a single-threaded runtime, as per-core
/// runtime `index` (slot `index + 1`; see [`prepare`]). The thread ends when the future does.
pub fn spawn_core<F, Fut>(index: usize, run: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    std::thread::Builder::new().name(format!("kap-core-{index}")).spawn(move || {
        SLOT.with(|s| s.set(index + 1));
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(run()),
            Err(error) => tracing::error!(%error, core = index, "starting a per-core runtime"),
        }
    })
}

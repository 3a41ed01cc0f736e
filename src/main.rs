//! `kube-aggregation-proxy`: parse flags, build the app, run. Bad configuration exits 64.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kube_aggregation_proxy::config::{Config, ConfigError, Settings};
#[cfg(feature = "testbed")]
use kube_aggregation_proxy::demo;
use kube_aggregation_proxy::{app, check, compare};

/// mimalloc rather than the system allocator: after a flood of connections ends, glibc's
/// malloc keeps the freed per-connection buffers in its arenas (RSS stayed at the peak),
/// while mimalloc hands free pages back to the OS (benches/hostile.py measures both). It is
/// built to commit arena memory on first use (`.cargo/config.toml`), which keeps 14 MiB less
/// resident at rest and 25 MiB less with 10,000 APIServices (benches/RESULTS.md, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EX_USAGE: the configuration is wrong, retrying will not help.
const EXIT_CONFIG: u8 = 64;

/// The Kubernetes API aggregation layer as a standalone proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy from a config file and/or flags.
    Serve {
        /// YAML config file; every key is also a flag, and flags win.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Check each APIService the way the proxy reaches it and say which step fails and why.
    /// Exits 0 when every APIService is available, 1 otherwise.
    Check {
        /// Only this APIService (e.g. v1beta1.metrics.k8s.io).
        #[arg(long)]
        apiservice: Option<String>,
        /// YAML config file, as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Start the sample extension server and the proxy on loopback with a throwaway PKI, and
    /// write DIR/kubeconfig for kubectl.
    Demo {
        /// Where to write the PKI, manifests, config and kubeconfig (default: a new temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The proxy's port (default: a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// A real control plane instead: etcd, kube-apiserver, metrics-server and
        /// sample-apiserver (built from the Go module proxy on first use), the proxy in
        /// cluster mode in front, DIR/direct.kubeconfig and DIR/proxy.kubeconfig.
        #[arg(long)]
        cluster: bool,
        /// With --cluster: the proxy's --runtime (work-stealing or per-core).
        #[arg(long, value_enum, default_value_t = kube_aggregation_proxy::runtime::RuntimeModel::default(), requires = "cluster")]
        runtime: kube_aggregation_proxy::runtime::RuntimeModel,
        /// With --cluster: the proxy's --backend-protocol (h2 or http1), the delegate's too.
        #[arg(long, value_enum, default_value_t = kube_aggregation_proxy::backend::BackendProtocol::H2, requires = "cluster")]
        backend_protocol: kube_aggregation_proxy::backend::BackendProtocol,
    },
    /// Send the same requests through two kubeconfigs (say kube-apiserver's own aggregator and
    /// this proxy) and print status codes, Status reasons, content types and discovery
    /// differences side by side. Exits 1 when anything differs, 2 on bad input.
    Compare {
        /// The first side's kubeconfig.
        left: PathBuf,
        /// The second side's kubeconfig.
        right: PathBuf,
        /// Another request, `METHOD /path?query [| Header: value]... [| body]`; repeatable.
        #[arg(long = "request", value_name = "LINE")]
        requests: Vec<String>,
        /// A file of such lines (`#` comments and blank lines skipped).
        #[arg(long)]
        requests_file: Option<PathBuf>,
        /// Leave out the built-in requests (discovery, aggregated reads and writes, a watch,
        /// errors, impersonation).
        #[arg(long)]
        no_builtin: bool,
    },
}

/// The config file (if any) overridden by flags, validated.
fn load(file: Option<PathBuf>, flags: &Settings) -> Result<Config, ConfigError> {
    let base = file.as_deref().map(Settings::from_file).transpose()?.unwrap_or_default();
    base.merged_with(flags)?.validate()
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

/// `demo`: the sample extension server and the proxy, or (`--cluster`) a real control plane
/// with the proxy in front; either runs until Ctrl-C.
#[cfg(feature = "testbed")]
async fn run_demo(dir: &std::path::Path, port: u16, cluster: bool, proxy: ProxyFlags) -> ExitCode {
    let started = if cluster {
        let options = demo::cluster::ProxyOptions { runtime: proxy.0, backend_protocol: proxy.1 };
        let started = demo::cluster::ClusterDemo::start(dir, options).await;
        started.map(|d| (d.instructions(), Box::pin(d.shutdown()) as Shutdown)).map_err(|e| e.to_string())
    } else {
        let started = demo::Demo::start(dir, port).await;
        started.map(|d| (d.instructions(), Box::pin(d.shutdown()) as Shutdown)).map_err(|e| e.to_string())
    };
    let (instructions, stop) = match started {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo{}: {e}", if cluster { " --cluster" } else { "" });
            return ExitCode::FAILURE;
        }
    };
    println!("{instructions}");
    shutdown_signal().await;
    stop.await;
    ExitCode::SUCCESS
}

/// `demo --cluster`'s `--runtime` and `--backend-protocol`.
type ProxyFlags = (kube_aggregation_proxy::runtime::RuntimeModel, kube_aggregation_proxy::backend::BackendProtocol);

#[cfg(feature = "testbed")]
type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

#[cfg(not(feature = "testbed"))]
async fn run_demo(_: &std::path::Path, _: u16, _: bool, _: ProxyFlags) -> ExitCode {
    eprintln!("demo: this binary was built without the `testbed` feature");
    ExitCode::FAILURE
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    match Cli::parse().command {
        Command::Check { apiservice, config, settings } => {
            let config = match load(config, &settings) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match check::run(&config, apiservice.as_deref()).await {
                Ok(outcome) => {
                    print!("{}", check::render(&outcome));
                    if outcome.all_available() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("check: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve { config, settings } => {
            let config = match load(config, &settings) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let running = match app::start(config).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await;
            ExitCode::SUCCESS
        }
        Command::Compare { left, right, requests, requests_file, no_builtin } => {
            let code = compare::command(left, right, requests, requests_file, !no_builtin).await;
            ExitCode::from(u8::try_from(code).unwrap_or(2))
        }
        Command::Demo { dir, port, cluster, runtime, backend_protocol } => {
            let dir = match dir {
                Some(d) => d,
                None => match tempfile::Builder::new().prefix("kube-aggregation-proxy-demo-").tempdir() {
                    Ok(t) => t.keep(),
                    Err(e) => {
                        eprintln!("creating a temp dir: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            run_demo(&dir, port, cluster, (runtime, backend_protocol)).await
        }
    }
}

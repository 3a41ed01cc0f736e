//! `sample-apiserver`: the sample extension API server on its own, with kube-style flags.
//!
//! Flags are checked completely before anything starts; every problem is reported, naming the
//! flag or file, and the process exits 64 (EX_USAGE). Without `--tls-cert-file` a self-signed
//! certificate for localhost is generated, as k8s.io/apiserver does. SIGINT and SIGTERM shut it
//! down gracefully.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kube_aggregation_proxy::auth::requestheader::RequestHeaderConfig;
use kube_aggregation_proxy::auth::x509::ChainVerifier;
use kube_aggregation_proxy::pki;
use kube_aggregation_proxy::testbed::sample::{SampleServer, SampleServerConfig};
use kube_aggregation_proxy::tls::CertifiedKey;

/// Exit code for bad flags or unreadable files (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// A sample Kubernetes extension API server: metrics.k8s.io NodeMetrics for this machine and an
/// echo API (echo.example.com/v1) that describes each request back.
#[derive(Debug, Parser)]
#[command(name = "sample-apiserver", version)]
struct Flags {
    /// The IP address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    bind_address: IpAddr,
    /// The port to serve HTTPS on (0 picks a free port).
    #[arg(long, default_value_t = 8444)]
    secure_port: u16,
    /// Serving certificate (PEM, leaf first). A self-signed one is generated when omitted.
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    /// Private key for --tls-cert-file (PEM).
    #[arg(long)]
    tls_private_key_file: Option<PathBuf>,
    /// CA bundle that verifies the aggregation proxy's client certificate.
    #[arg(long)]
    requestheader_client_ca_file: PathBuf,
    /// Common names allowed to assert identity in X-Remote-* headers (comma-separated); empty
    /// allows any certificate from the requestheader CA.
    #[arg(long, value_delimiter = ',')]
    requestheader_allowed_names: Vec<String>,
    /// The node name NodeMetrics reports (default: this machine's host name).
    #[arg(long)]
    node_name: Option<String>,
}

/// Turns flags into a server configuration, collecting every problem.
fn config(flags: Flags) -> Result<SampleServerConfig, Vec<String>> {
    let mut problems = Vec::new();
    let serving = match (&flags.tls_cert_file, &flags.tls_private_key_file) {
        (Some(cert), Some(key)) => CertifiedKey::load(cert, key)
            .map_err(|e| problems.push(format!("--tls-cert-file/--tls-private-key-file: {e}")))
            .ok(),
        (Some(_), None) => {
            problems.push("--tls-cert-file is set but --tls-private-key-file is not".to_owned());
            None
        }
        (None, Some(_)) => {
            problems.push("--tls-private-key-file is set but --tls-cert-file is not".to_owned());
            None
        }
        (None, None) => {
            tracing::info!("no --tls-cert-file given; generating a self-signed certificate for localhost");
            pki::self_signed_localhost()
                .map_err(|e| e.to_string())
                .and_then(|pair| pair.certified_key().map_err(|e| e.to_string()))
                .map_err(|e| problems.push(format!("generating a self-signed serving certificate: {e}")))
                .ok()
        }
    };
    let verifier = ChainVerifier::from_pem_file(&flags.requestheader_client_ca_file)
        .map_err(|e| problems.push(format!("--requestheader-client-ca-file: {e}")))
        .ok();
    let allowed_names: Vec<String> =
        flags.requestheader_allowed_names.into_iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect();
    if flags.node_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        problems.push("--node-name must not be empty".to_owned());
    }
    match (serving, verifier) {
        (Some(serving), Some(verifier)) if problems.is_empty() => Ok(SampleServerConfig {
            bind: SocketAddr::new(flags.bind_address, flags.secure_port),
            serving,
            requestheader: RequestHeaderConfig::with_default_headers(verifier, allowed_names),
            node_name: flags.node_name,
        }),
        _ => Err(problems),
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutdown signal received");
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = match Flags::try_parse() {
        Ok(flags) => flags,
        Err(error) => {
            // --help and --version are not errors.
            let code = if error.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = match config(flags) {
        Ok(config) => config,
        Err(problems) => {
            for problem in problems {
                eprintln!("error: {problem}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let server = match SampleServer::bind(config).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    server.run(shutdown_signal()).await;
    ExitCode::SUCCESS
}

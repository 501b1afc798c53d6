use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use signet_protocol::transport::Listener;
use signetd::config::{self, Config};
use signetd::daemon::Daemon;

/// Signet's host daemon: takes signing jobs from build VMs (vsock), host tools (unix
/// socket) and remote clients (TCP), and relays them to the agent in the signing VM.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example configuration: packaging/signetd.toml. Logs: set RUST_LOG=debug for more."
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = config::DEFAULT_PATH, env = "SIGNETD_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let cfg = Config::load(&cli.config)?;
    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    for ep in &cfg.listen {
        if let signet_protocol::Endpoint::Unix(path) = ep {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        let l = Listener::bind(ep).await?;
        let local = l.local_endpoint().context("local address")?;
        tracing::info!(endpoint = %local, "listening");
        bound.push(local.to_string());
        listeners.push(l);
    }
    tracing::info!(agent = %cfg.agent, default_profile = %cfg.default_profile, "relaying to the agent");
    let header_timeout = std::time::Duration::from_secs(cfg.limits.header_timeout_seconds);
    let daemon = Arc::new(Daemon::new(cfg));
    let app = signetd::server::router(daemon);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for l in listeners {
        let app = app.clone();
        let stop = stop_rx.clone();
        servers.spawn(signetd::serve::serve(l, app, header_timeout, stop));
    }
    let listening = format!("listening on {}", bound.join(" "));
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Status(&listening),
            sd_notify::NotifyState::Ready,
        ],
    );
    shutdown().await;
    let _ = stop_tx.send(true);
    while let Some(r) = servers.join_next().await {
        r.context("server task")?;
    }
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("stopping");
}

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use signet_agent::agent::Agent;
use signet_agent::config::{self, Config};
use signet_protocol::transport::{Listener, Peer};
use signet_protocol::wire::AgentState;

/// Signet's signing agent: runs in the signing VM, holds the token's PKCS#11 session
/// and signs the jobs the host daemon relays.
///
/// It listens on the endpoint in its configuration (default vsock:any:7711), logs in
/// to the token once with the PIN the host sends (or the configured PIN file), never
/// tries a PIN the token has refused again, and re-opens the token by itself when it
/// vanishes and returns.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example configuration: packaging/agent.toml. Logs: set RUST_LOG=debug for more."
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = config::DEFAULT_PATH, env = "SIGNET_AGENT_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = Config::load(&cli.config)?;
    let listen = cfg.listen.clone();
    let agent = Arc::new(Agent::new(cfg).await?);
    let listener = Listener::bind(&listen).await?;
    let health = agent.open_token().await;
    match health.state {
        AgentState::Ready => tracing::info!(detail = %health.detail, "token ready"),
        _ => {
            tracing::error!(state = ?health.state, detail = %health.detail, "token not ready; serving health and watching the token")
        }
    }
    tokio::spawn(agent.clone().watch());
    let local = listener.local_endpoint().context("local address")?;
    tracing::info!(endpoint = %local, "listening");
    let listening = format!("listening on {local}");
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Status(&listening),
            sd_notify::NotifyState::Ready,
        ],
    );
    let app = signet_agent::server::router(agent);
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown())
        .await
        .context("serving")?;
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

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use signet_protocol::transport::{Listener, Peer};
use signetd::audit;
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
    #[arg(long, short, default_value = config::DEFAULT_PATH, env = "SIGNETD_CONFIG", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The audit log in `state_dir/signet.db`.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, clap::Subcommand)]
enum AuditCommand {
    /// Walks the hash chain; names the first record that was changed, deleted or
    /// reordered, and exits 1 if there is one.
    Verify {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Writes the records as JSON lines to stdout.
    Export {
        /// Only records from this time on (RFC 3339, e.g. 2026-11-23T08:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
}

/// Runs an `audit` subcommand; answers the exit code.
fn audit_command(cfg: &Config, cmd: &AuditCommand) -> anyhow::Result<i32> {
    let db = cfg.state_dir.join(signetd::store::DB_FILE);
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| {
                format!(
                    "opening {}; is `state_dir` in {} right?",
                    db.display(),
                    cfg.path.display()
                )
            })?;
    match cmd {
        AuditCommand::Verify { json } => {
            let result = audit::verify(&conn);
            if let Err(e @ audit::AuditError::Db(_)) = &result {
                anyhow::bail!("{e}");
            }
            if *json {
                let v = match &result {
                    Ok(v) => serde_json::json!({"ok": true, "records": v.records, "head": v.head}),
                    Err(e) => {
                        serde_json::json!({"ok": false, "kind": e.kind(), "record": e.record(), "message": e.to_string()})
                    }
                };
                println!("{v}");
            } else {
                match &result {
                    Ok(v) => println!("audit log intact: {} records, head {}", v.records, v.head),
                    Err(e) => println!("audit log broken: {e}"),
                }
            }
            Ok(if result.is_ok() { 0 } else { 1 })
        }
        AuditCommand::Export { since } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            audit::export(&conn, since.as_deref(), &mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok(0)
        }
    }
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
    if let Some(Command::Audit(cmd)) = &cli.command {
        std::process::exit(audit_command(&cfg, cmd)?);
    }
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
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating the state directory {}", cfg.state_dir.display()))?;
    let daemon = Arc::new(Daemon::open(cfg)?);
    tokio::spawn(daemon.clone().run_worker());
    tokio::spawn(daemon.clone().run_janitor());
    let app = signetd::server::router(daemon);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for l in listeners {
        let app = app.clone();
        let mut stop = stop_rx.clone();
        servers.spawn(async move {
            axum::serve(l, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
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
        r.context("server task")?.context("serving")?;
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

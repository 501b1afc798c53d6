use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use signet_agent::agent::Agent;
use signet_agent::config::{self, Config};
use signet_agent::doctor;
use signet_api::wire::AgentState;
use signet_protocol::link;
use signet_protocol::transport::Listener;

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
    after_help = concat!(
        "Example configuration: packaging/agent.toml. Logs: set RUST_LOG=debug for more;
to the journal when started by systemd, else to stderr.

Exit codes of the commands that print to stdout also:
",
        signet_api::exit_codes_stdout!()
    )
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = config::DEFAULT_PATH, env = "SIGNET_AGENT_CONFIG")]
    config: PathBuf,
    /// Without a command, the agent runs.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks that this agent can sign, and says what to fix when it cannot.
    ///
    /// Checks the configuration, the PKCS#11 module (suggesting the known modules
    /// present when it does not load), the tokens present, the configured token and
    /// its PIN counter, the PIN file (present, not open to group or others),
    /// osslsigncode (2.5 or later for whole files, 2.8 or later for PowerShell and digest
    /// mode; the native backend uses it, 2.8 or later, for MSI, CAB, PowerShell and APPX/MSIX files)
    /// or signtool (signer.backend = "signtool", Windows) and the signing certificate.
    ///
    /// It never logs in to the token: no PIN try is spent, whatever state the token is
    /// in, and the PIN file's content is not read. Files are checked as the user running
    /// the doctor; run it as the agent's user. Exit status: 0 when every check passes,
    /// 1 otherwise.
    Doctor {
        /// One JSON object: every check with its status and fix, the tokens present.
        #[arg(long)]
        json: bool,
    },
    /// Lists the tokens the PKCS#11 module sees (label, serial, model, manufacturer,
    /// firmware, PIN counter flags), without logging in.
    Tokens {
        /// The PKCS#11 module; default: token.module from the configuration.
        #[arg(long)]
        module: Option<PathBuf>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Opens a pairing window: shows this agent's key and a one-time code for the host.
    ///
    /// The agent answers only the host it is paired with (TLS with pinned keys, on
    /// every transport). Pairing is done once, by the operator, as root on both sides:
    /// run this in the signing VM, then on the Proxmox host, within 10 minutes,
    /// `signetd pair CODE` with the code shown. The code works once: a wrong code
    /// closes the window (run this again). The agent need not be restarted, before or
    /// after. Pairing again (a reinstalled host, a new host) replaces the host's key.
    Pair {
        /// One JSON object: {"fingerprint", "code", "expires_unix"}.
        #[arg(long)]
        json: bool,
    },
    /// Shows this agent's key and the host key it is paired with, if any.
    Key {
        /// One JSON object: {"fingerprint", "host"}.
        #[arg(long)]
        json: bool,
    },
    /// Checks the configuration file without starting (nothing is bound, the token is
    /// not opened): its syntax and values, and the PIN file's owner and mode. Exit 0
    /// when it is good, 1 with the error and its fix. The unit runs it before the agent
    /// starts.
    CheckConfig,
    #[command(flatten)]
    Docs(signet_api::docs::DocsCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The spool and whatever else the agent writes are its own whatever the umask.
    signet_protocol::bootstrap::start_daemon();
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        std::process::exit(run_command(command, &cli.config)?);
    }
    let cfg = Config::load(&cli.config)?;
    if let Some(pin_file) = cfg.token.pin_file.as_deref().filter(|p| p.exists()) {
        signet_agent::token::check_pin_file(pin_file).map_err(|why| {
            anyhow::anyhow!(
                "the PIN file {}: {why}; signet-agent does not start with a PIN file others could read",
                pin_file.display()
            )
        })?;
    }
    let listen = cfg.listen.clone();
    let identity = link::Identity::load_or_create(&cfg.state_dir, "signet-agent")
        .context("the agent's link key")?;
    let acceptor = link::acceptor(&identity, &cfg.state_dir).context("the agent's link key")?;
    match link::read_pin(&cfg.state_dir.join(link::HOST_PIN_FILE)) {
        Ok(Some(host)) => {
            tracing::info!(key = %identity.fingerprint, %host, "link key; paired with the host")
        }
        Ok(None) => tracing::warn!(
            key = %identity.fingerprint,
            "not paired with a host yet: nothing is signed until the operator runs `signet-agent pair` here and `signetd pair CODE` on the host"
        ),
        Err(e) => tracing::error!(error = %e, "the paired host's key cannot be read"),
    }
    let gate = signet_agent::server::Gate {
        state_dir: cfg.state_dir.clone(),
        own: identity.fingerprint,
        max_input_size: cfg.limits.max_input_size,
        idle: std::time::Duration::from_secs(cfg.limits.idle_seconds),
    };
    let header_timeout = std::time::Duration::from_secs(cfg.limits.header_timeout_seconds);
    let max_connections = cfg.limits.max_connections;
    let agent = Arc::new(Agent::new(cfg).await?);
    let left = agent.clean_spool();
    if left > 0 {
        tracing::warn!(
            directories = left,
            "removed the job directories a previous run left (it stopped mid-job; they may have held signed copies without an audit record, and the host runs those jobs again)"
        );
    }
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
    // systemd's Type=notify; a Windows service has no such protocol.
    #[cfg(unix)]
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Status(&listening),
            sd_notify::NotifyState::Ready,
        ],
    );
    #[cfg(not(unix))]
    let _ = listening;
    let app = signet_agent::server::router(agent.clone(), gate);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let serving = signet_protocol::serve::serve(
        listener,
        app,
        header_timeout,
        max_connections,
        Some(acceptor),
        stop_rx.clone(),
    );
    tokio::spawn({
        let agent = agent.clone();
        async move {
            shutdown().await;
            agent.stop();
            stop_tx.send_replace(true);
        }
    });
    // A job in flight may end within the bound; a connection that stays open after it
    // (a host that does not close) does not hold the agent.
    tokio::select! {
        () = serving => {}
        _ = async {
            let _ = stop_rx.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_BOUND).await;
        } => tracing::info!("stopped with connections still open"),
    }
    tracing::info!("stopped");
    std::process::exit(0)
}

/// How long the agent waits for requests in flight once told to stop.
const STOP_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a one-shot command; returns the exit status.
fn run_command(command: Command, config_path: &std::path::Path) -> anyhow::Result<i32> {
    match command {
        Command::Docs(docs) => {
            docs.run(<Cli as clap::CommandFactory>::command())
                .context("writing the documentation")?;
            Ok(0)
        }
        Command::Pair { json } => {
            let cfg = Config::load(config_path)?;
            let identity = link::Identity::load_or_create(&cfg.state_dir, "signet-agent")
                .context("the agent's link key")?;
            let window = link::Window::open(&cfg.state_dir).with_context(|| {
                format!(
                    "cannot open a pairing window in {}: run this as the agent's user (root)",
                    cfg.state_dir.display()
                )
            })?;
            if json {
                signet_api::outln!(
                    "{}",
                    serde_json::json!({
                        "fingerprint": identity.fingerprint,
                        "code": window.code,
                        "expires_unix": window.expires_unix,
                    })
                );
            } else {
                signet_api::outln!("This agent's key: {}", identity.fingerprint);
                signet_api::outln!(
                    "Pairing code: {} (valid {} minutes, for one attempt)",
                    window.code,
                    link::PAIRING_WINDOW.as_secs() / 60
                );
                signet_api::outln!("On the Proxmox host, as root, run:");
                signet_api::outln!("  signetd pair {}", window.code);
                signet_api::outln!("and check that it names the key above.");
            }
            Ok(0)
        }
        Command::Key { json } => {
            let cfg = Config::load(config_path)?;
            let identity = link::Identity::load_or_create(&cfg.state_dir, "signet-agent")
                .context("the agent's link key")?;
            let host = link::read_pin(&cfg.state_dir.join(link::HOST_PIN_FILE))?;
            if json {
                signet_api::outln!(
                    "{}",
                    serde_json::json!({"fingerprint": identity.fingerprint, "host": host})
                );
            } else {
                signet_api::outln!("This agent's key: {}", identity.fingerprint);
                match host {
                    Some(h) => signet_api::outln!("Paired with the host key: {h}"),
                    None => signet_api::outln!("Not paired with a host: run `signet-agent pair`."),
                }
            }
            Ok(0)
        }
        Command::CheckConfig => {
            let checked = Config::load(config_path)
                .map_err(|e| e.to_string())
                .and_then(|cfg| match &cfg.token.pin_file {
                    Some(pin) => signet_protocol::pin_file::check_own(pin),
                    None => Ok(()),
                });
            Ok(match checked {
                Ok(()) => {
                    signet_api::outln!("{}: the configuration is valid", config_path.display());
                    0
                }
                Err(e) => {
                    eprintln!("signet-agent: {e}");
                    1
                }
            })
        }
        Command::Doctor { json } => {
            let report = doctor::run(config_path);
            if json {
                signet_api::outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                signet_api::out!("{}", report.render());
            }
            Ok(if report.ok { 0 } else { 1 })
        }
        Command::Tokens { module, json } => {
            let module = match module {
                Some(m) => m,
                None => match Config::load(config_path) {
                    Ok(cfg) => cfg.token.module,
                    Err(e) => doctor::lenient_module(config_path).ok_or(e).context(
                        "no module to list the tokens of: pass --module PATH or fix the configuration",
                    )?,
                },
            };
            match doctor::list_tokens(&module) {
                Ok(list) if json => signet_api::outln!("{}", serde_json::to_string_pretty(&list)?),
                Ok(list) => signet_api::out!("{}", list.render()),
                Err(check) => {
                    eprintln!("signet-agent: {}", check.summary);
                    for d in &check.details {
                        eprintln!("  - {d}");
                    }
                    if let Some(fix) = &check.fix {
                        eprintln!("  fix: {fix}");
                    }
                    return Ok(1);
                }
            }
            Ok(0)
        }
    }
}

/// Waits for SIGTERM (systemd's stop) or Ctrl-C; on Windows for Ctrl-C (or
/// Ctrl-Break) only.
async fn shutdown() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    }
    #[cfg(windows)]
    {
        let mut brk = tokio::signal::windows::ctrl_break().ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match brk.as_mut() { Some(b) => { b.recv().await; } None => std::future::pending().await } } => {}
        }
    }
    #[cfg(not(any(unix, windows)))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("stopping");
}

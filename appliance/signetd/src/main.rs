use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use signet_protocol::transport::Listener;
use signetd::adapters::audit;
use signetd::config::{self, Config};
use signetd::services::daemon::Daemon;
use signetd::services::supervise::Supervisor;

/// Signet's host daemon: takes signing jobs from build VMs (vsock), host tools (unix
/// socket) and remote clients (TCP), and relays them to the agent in the signing VM.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = concat!(
        "Example configuration: packaging/signetd.toml. Logs: set RUST_LOG=debug for more;
to the journal when started by systemd, else to stderr.

Exit codes of the commands that print to stdout also:
",
        signet_api::exit_codes_stdout!()
    )
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = config::DEFAULT_PATH, env = "SIGNETD_CONFIG", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Configure a Proxmox VM for Signet (runs `qm` as root; see docs/ENROLL.md).
    #[command(subcommand)]
    Enroll(Enroll),
    /// List the tokens plugged into this host, with what on the host would keep them
    /// from a VM and the fix.
    Tokens {
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Pairs this host with the signing VM's agent, with the one-time code that
    /// `signet-agent pair` showed there.
    ///
    /// signetd and signet-agent answer only each other: each holds a key (made at its
    /// first start, in its state directory) and pins the other's. Pairing sets the
    /// pins, once: in the signing VM, as root, run `signet-agent pair`; here, as root,
    /// within 10 minutes, `signetd pair CODE`. Both sides prove they know the code over
    /// the very connection that carries their keys, so nothing in between can pair
    /// instead. Check that the agent key printed here is the one the VM showed. A
    /// running signetd takes the new pairing at its next contact with the agent (no
    /// restart). Pair again after reinstalling either side.
    Pair {
        /// The code `signet-agent pair` showed (case, spaces and dashes do not matter).
        code: String,
        /// One JSON object: {"agent", "host", "endpoint"}.
        #[arg(long)]
        json: bool,
    },
    /// Remote clients that sign over TLS with a secret (HTTP Basic: name and secret).
    #[command(subcommand)]
    Client(ClientCommand),
    /// The audit log in `state_dir/signet.db`.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Forgets the audit head kept outside the database (state_dir/signet.head), so
    /// signetd starts on signet.db as it is — a new one when it is missing. For a
    /// database lost, emptied or replaced on purpose (an older backup): the audit
    /// history it lacks is gone. Then start signetd.
    ResetState,
    /// Check the configuration file without starting (nothing is bound, nobody is
    /// contacted): its syntax and values, and the PIN file's owner and mode. Exit 0
    /// when it is good, 1 with the error and its fix. The unit runs it before signetd
    /// starts.
    CheckConfig,
    /// Delivers one alert outside signetd's sandbox: the request on stdin, the verdict
    /// on stdout. signet-notify@.service runs it for each connection to
    /// /run/signet/notify.sock (docs/ALERTS.md); it is not meant to be run by hand.
    AlertRelay,
    #[command(flatten)]
    Docs(signet_api::docs::DocsCommand),
    /// TLS for remote clients.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// Makes a CA and a server certificate it issued in DIR (ca.pem, ca-key.pem,
    /// server.pem, server-key.pem; keys 0600), and prints the `[tls]` lines for
    /// signetd.toml and what clients pass to trust it.
    Init {
        /// The directory to write to (created 0700 if missing).
        dir: PathBuf,
        /// A DNS name or IP address clients connect to (repeat for more).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// The address `[tls] listen` gets.
        #[arg(long, default_value = "tcp:0.0.0.0:7443")]
        listen: String,
    },
}

fn tls_command(cmd: TlsCommand) -> anyhow::Result<()> {
    let TlsCommand::Init { dir, hosts, listen } = cmd;
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let made = signetd::adapters::tls::init(&dir, &hosts)?;
    let port = listen.rsplit(':').next().unwrap_or("7443");
    eprintln!(
        "wrote {} (the CA clients trust), {} (the CA's key, 0600: keep it safe, only needed to issue another certificate), {} and {} (0600)",
        made.ca.display(),
        made.ca_key.display(),
        made.cert.display(),
        made.key.display()
    );
    signet_api::outln!(
        "# signetd.toml:\n[tls]\nlisten = [\"{listen}\"]\ncert = \"{}\"\nkey = \"{}\"\n",
        made.cert.display(),
        made.key.display()
    );
    signet_api::outln!(
        "# clients: copy {} to them, then\n#   signet --endpoint tls:{}:{port} --tls-ca ca.pem --client NAME sign FILE   (SIGNET_SECRET from `signetd client add NAME`)\n#   curl --cacert ca.pem -u NAME:SECRET ...",
        made.ca.display(),
        hosts[0]
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
enum Enroll {
    /// The VM that holds the token: its USB port as usbN, the vsock device and Signet's
    /// monitor in args:.
    SigningVm {
        #[command(flatten)]
        vm: signet_api::args::SigningVmArgs,
        #[command(flatten)]
        pve: PveArgs,
        /// Directory of Signet's monitor sockets (QEMU creates vm-VMID.qmp in it);
        /// default: `[passthrough] monitor_dir` of signetd.toml, else /run/signet.
        #[arg(long)]
        monitor_dir: Option<PathBuf>,
    },
    /// A VM that asks for signatures: the vsock device in args:, and a grant for it in
    /// signetd.toml.
    BuildVm {
        #[command(flatten)]
        vm: signet_api::args::BuildVmArgs,
        /// Leave signetd.toml alone (grant the VM by hand).
        #[arg(long)]
        no_grant: bool,
        #[command(flatten)]
        pve: PveArgs,
    },
}

#[derive(Debug, clap::Args)]
struct PveArgs {
    /// Proxmox's qm program.
    #[arg(long, env = "SIGNETD_QM", default_value = "qm")]
    qm: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum ClientCommand {
    /// Adds a client and prints its secret, once: it is stored only as a hash.
    Add {
        name: String,
        /// A profile the client may use (repeat for more); grants may give it more.
        #[arg(long = "profile", short)]
        profiles: Vec<String>,
        /// How long the secret works: 90s, 30m, 4h, 7d, 2w.
        #[arg(long, value_parser = signetd::adapters::clients::parse_validity)]
        valid: std::time::Duration,
    },
    /// Lists the clients, their profiles and when their secrets expire.
    List,
    /// Removes a client; its secret stops working at once.
    Remove { name: String },
}

fn client_command(cfg: &Config, cmd: ClientCommand) -> anyhow::Result<()> {
    use signetd::adapters::clients;
    let conn = clients::open(&cfg.state_dir)?;
    match cmd {
        ClientCommand::Add {
            name,
            profiles,
            valid,
        } => {
            if let Some(p) = profiles.iter().find(|p| !cfg.profiles.contains_key(*p)) {
                anyhow::bail!(
                    "no profile is named {p:?}; profiles: {}",
                    cfg.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            let secret = clients::add(
                &conn,
                &name,
                &profiles,
                valid,
                signetd::adapters::store::unix_now(),
            )?;
            eprintln!(
                "client {name:?} added; its secret is shown only now. Give it to the client as SIGNET_SECRET (or curl -u {name}:SECRET):"
            );
            signet_api::outln!("{secret}");
        }
        ClientCommand::List => {
            let now = signetd::adapters::store::unix_now();
            for c in clients::list(&conn)? {
                let left = c.expires - now;
                let state = if left > 0 {
                    format!("expires in {}h{:02}m", left / 3600, (left % 3600) / 60)
                } else {
                    "expired".to_owned()
                };
                signet_api::outln!("{}\t{}\t{state}", c.name, c.profiles.join(","));
            }
        }
        ClientCommand::Remove { name } => {
            clients::remove(&conn, &name)?;
            eprintln!("client {name:?} removed");
        }
    }
    Ok(())
}

/// The known-token table: the built-in one plus `known_tokens` from the configuration,
/// when there is one (`signetd tokens` also runs before signetd is configured).
fn catalog(path: &std::path::Path) -> anyhow::Result<signetd::adapters::usb::Catalog> {
    Ok(match config_if_any(path)? {
        Some(cfg) => signetd::adapters::usb::Catalog::new(cfg.known_tokens),
        None => signetd::adapters::usb::Catalog::default(),
    })
}

fn tokens(json: bool, catalog: signetd::adapters::usb::Catalog) -> anyhow::Result<()> {
    use signetd::adapters::usb::{self, TokenKind, TokenSighting};
    let found: Vec<TokenSighting> = usb::udev::enumerate()?
        .into_iter()
        .filter_map(|d| TokenSighting::of(&catalog, d))
        .collect();
    let host = usb::host_program_conflict(&usb::running_programs());
    if json {
        let v = serde_json::json!({"tokens": found, "host_conflict": host});
        signet_api::outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if found.is_empty() {
        signet_api::outln!("no tokens plugged into this host");
    }
    for t in &found {
        let d = &t.device;
        let what = match &t.kind {
            TokenKind::Known { model } => model.clone(),
            TokenKind::Candidate => "unknown smart-card device (CCID): a candidate".to_owned(),
        };
        signet_api::outln!(
            "{serial}  {what}  {id} at {port} (device {devnum})",
            serial = d.serial.as_deref().unwrap_or("(no serial)"),
            id = d.id,
            port = d.host_port(),
            devnum = d.devnum,
        );
        for c in &t.conflicts {
            signet_api::outln!("  conflict: {c}");
        }
    }
    if let Some(h) = host {
        signet_api::outln!("conflict: {h}");
    }
    Ok(())
}

/// signetd.toml, or `None` when there is none yet (enrolling may come first).
fn config_if_any(path: &std::path::Path) -> anyhow::Result<Option<Config>> {
    match Config::load(path) {
        Ok(cfg) => Ok(Some(cfg)),
        Err(config::ConfigError::File(e)) if e.is_missing() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `signetd enroll`: the enroll use case the daemon runs for the web UI and D-Bus
/// ([`operate::enroll_change`]), the token found through udev, the change applied and
/// audited here with the uid that ran it.
fn enroll(cmd: Enroll, config: &std::path::Path) -> anyhow::Result<()> {
    use signetd::adapters::proxmox::Qm;
    use signetd::services::operate::{self, EnrollRequest, EnrollSite};
    let cfg = config_if_any(config)?;
    let (req, dry_run, pve, monitor_dir, grant, host_port) = match cmd {
        Enroll::SigningVm {
            vm:
                signet_api::args::SigningVmArgs {
                    vmid,
                    token,
                    dry_run,
                },
            pve,
            monitor_dir,
        } => {
            let devices = signetd::adapters::usb::udev::enumerate()?;
            let catalog = match &cfg {
                Some(c) => signetd::adapters::usb::Catalog::new(c.known_tokens.clone()),
                None => signetd::adapters::usb::Catalog::default(),
            };
            let found = signetd::adapters::usb::find_token(&catalog, &devices, &token)?;
            (
                EnrollRequest::SigningVm {
                    vmid,
                    serial: token,
                },
                dry_run,
                pve,
                monitor_dir,
                true,
                Some(found.device.host_port()),
            )
        }
        Enroll::BuildVm {
            vm:
                signet_api::args::BuildVmArgs {
                    vmid,
                    profiles,
                    dry_run,
                },
            no_grant,
            pve,
        } => (
            EnrollRequest::BuildVm { vmid, profiles },
            dry_run,
            pve,
            None,
            !no_grant,
            None,
        ),
    };
    let vmid = req.vmid();
    let monitor_dir = monitor_dir.unwrap_or_else(|| match &cfg {
        Some(c) => c.passthrough.monitor_dir.clone(),
        None => signetd::config::DEFAULT_MONITOR_DIR.into(),
    });
    let qm = Qm { program: pve.qm };
    let site = EnrollSite {
        cfg: cfg.as_ref(),
        path: config,
        qm: &qm,
        monitor_dir: &monitor_dir,
        grant,
    };
    let result = operate::enroll_change(&site, &req, host_port.as_deref(), !dry_run);
    // As the daemon's enroll: an applied (or refused) enrolment is audited, a dry run
    // is not.
    let audited = if dry_run {
        Ok(())
    } else {
        audit_enroll(cfg.as_ref(), &req, &result)
    };
    let done = result.map_err(|e| anyhow::anyhow!(signet_api::wire::ErrorBody::from(e).message))?;
    let (plan, stanza) = (&done.plan, &done.stanza);
    match (&req, &cfg) {
        (EnrollRequest::SigningVm { serial, .. }, None) => signet_api::outln!(
            "{} does not exist yet; give it this entry so signetd keeps the token in VM {vmid}:\n[[tokens]]\nserial = {serial:?}\nvm = {vmid}",
            config.display()
        ),
        (EnrollRequest::BuildVm { .. }, None) if grant => signet_api::outln!(
            "{} does not exist yet; give it this grant so VM {vmid} may sign:\n{}",
            config.display(),
            signetd::config::edit::stanza(vmid, &done.wanted)
        ),
        (EnrollRequest::BuildVm { .. }, Some(_)) if grant && stanza.is_none() => signet_api::outln!(
            "VM {vmid} may use {} already: no grant to add",
            done.wanted.join(", ")
        ),
        _ => {}
    }
    signet_api::out!("{plan}");
    if !plan.changes.is_empty() {
        let line = qm.shell_line(&Qm::set_args(plan));
        if dry_run {
            signet_api::outln!("would run: {line}");
        } else {
            signet_api::outln!("ran: {line}");
            if plan.changes.iter().any(|c| c.key == "args") {
                signet_api::outln!(
                    "args: takes effect when VM {vmid} next starts (qm stop {vmid} && qm start {vmid})"
                );
            }
        }
    }
    if let Some(stanza) = stanza {
        if dry_run {
            signet_api::outln!("would add to {}:\n{stanza}", config.display());
        } else if stanza.contains("[[tokens]]") {
            signet_api::outln!(
                "added to {}:\n{stanza}apply it with systemctl reload signetd: signetd then keeps the token in VM {vmid}; running and queued jobs are kept (the reload's log line names anything that waits for a restart)",
                config.display()
            );
        } else {
            signet_api::outln!(
                "added to {}:\n{stanza}apply it with systemctl reload signetd (running and queued jobs are kept)",
                config.display()
            );
        }
    }
    audited
}

/// Writes the audit record of `signetd enroll`'s change into the state directory of
/// `cfg`, as the daemon's enroll does, naming the uid that ran it.
fn audit_enroll<T>(
    cfg: Option<&Config>,
    req: &signetd::services::operate::EnrollRequest,
    result: &Result<T, signetd::services::errors::OperatorError>,
) -> anyhow::Result<()> {
    use signetd::services::operate::{self, Operator};
    let Some(cfg) = cfg else {
        eprintln!("signetd: not audited: there is no signetd.toml yet, so no state directory to keep the record in");
        return Ok(());
    };
    let why = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "the enrolment's audit record could not be written to {}: {e}; the change stands, so note it by hand",
            cfg.state_dir.join(signetd::adapters::store::DB_FILE).display()
        )
    };
    let store = audit_store(cfg).map_err(|e| why(&e))?;
    let op = Operator::cli(nix::unistd::getuid().as_raw());
    let recorded = operate::record(&store.conn(), &op, operate::enroll_action(req), result);
    recorded.map_err(|e| why(&e))
}

/// The job database of `cfg`'s state directory, for a command that audits from a
/// process of its own beside the daemon.
fn audit_store(cfg: &Config) -> anyhow::Result<signetd::adapters::store::Store> {
    // The same guard as at the daemon's start: a lost database is not started afresh.
    signetd::adapters::head::guard(&cfg.state_dir, false)?;
    Ok(signetd::adapters::store::Store::open(
        &cfg.state_dir,
        cfg.queue.spool_quota_mb.saturating_mul(1 << 20),
    )?)
}

/// Writes the audit record of a `signetd pair` attempt (`agent`: the key pinned, or
/// `None` when the pairing failed) under the uid that ran it
/// ([`signetd::services::operate::pair_action`]); a record that cannot be written is
/// an error, the pin stands.
fn audit_pair(
    cfg: &Config,
    agent: Option<&signet_protocol::link::Fingerprint>,
) -> anyhow::Result<()> {
    use signetd::services::operate::{self, Operator};
    let op = Operator::cli(nix::unistd::getuid().as_raw());
    let action = operate::pair_action(&op, &cfg.agent, agent);
    audit_store(cfg)
        .and_then(|store| Ok(signetd::adapters::audit::record_action(&store.conn(), &action)?))
        .map_err(|e| {
            anyhow::anyhow!(
                "the pairing's audit record could not be written to {}: {e}; the pairing stands ({}), so note it by hand",
                cfg.state_dir.join(signetd::adapters::store::DB_FILE).display(),
                if agent.is_some() { "the agent's key is pinned" } else { "nothing was pinned" }
            )
        })?;
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
enum AuditCommand {
    /// Walks the hash chain; names the first record that was changed, deleted or
    /// reordered, and exits 1 if there is one. Also holds the log against the head
    /// kept outside the database (state_dir/signet.head) and the edit count its
    /// trigger keeps, so newest records cut off are found too.
    Verify {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// A head exported earlier with `signetd audit head` (HASH:COUNT): the log
        /// must still hold that record with that hash.
        #[arg(long, value_name = "HASH:COUNT")]
        head: Option<String>,
    },
    /// Prints the chain's head as HASH:COUNT (after verifying it), to keep elsewhere
    /// and give back to `audit verify --head`.
    Head,
    /// Writes the records as JSON lines to stdout.
    Export {
        /// Only records from this time on (RFC 3339, e.g. 2026-11-23T08:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
}

/// Runs an `audit` subcommand; answers the exit code.
fn audit_command(cfg: &Config, cmd: &AuditCommand) -> anyhow::Result<i32> {
    let db = cfg.state_dir.join(signetd::adapters::store::DB_FILE);
    // Read-only, opened as the daemon's readers open it.
    let conn = signetd::adapters::store::Reader::open(&db).with_context(|| {
        format!(
            "opening {}; is `state_dir` in {} right?",
            db.display(),
            cfg.path.display()
        )
    })?;
    match cmd {
        AuditCommand::Verify { json, head } => {
            // The same AuditCheck the D-Bus and HTTP fronts answer, also held against
            // the head given, else the one kept in the state directory.
            let known = match head {
                Some(h) => Some(
                    audit::KnownHead::parse(h, "given with --head").map_err(anyhow::Error::msg)?,
                ),
                None => {
                    signetd::adapters::head::read(&cfg.state_dir)?.map(|h| h.known(&cfg.state_dir))
                }
            };
            let check = audit::check_with(&conn, known.as_ref())?;
            if *json {
                signet_api::outln!("{}", serde_json::to_string(&check)?);
            } else {
                signet_api::out!("{}", signet_api::operator::audit_check_text(&check));
            }
            Ok(if check.ok { 0 } else { 1 })
        }
        AuditCommand::Head => {
            let v = audit::verify(&conn)?;
            signet_api::outln!("{}:{}", v.head, v.records);
            Ok(0)
        }
        AuditCommand::Export { since } => {
            // A closed stdout (`| head`) ends signetd quietly (signet_api::output).
            let mut out = std::io::BufWriter::new(signet_api::output::Stdout);
            audit::export(&conn, since.as_deref(), &mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok(0)
        }
    }
}

/// `signetd check-config`: the exit status; the verdict on stdout, the error on stderr.
fn check_config(path: &std::path::Path) -> i32 {
    // The same check a reload (SIGHUP) makes before it applies anything.
    match signetd::config::reload::check(path) {
        Ok(_) => {
            signet_api::outln!("{}: the configuration is valid", path.display());
            0
        }
        Err(e) => {
            eprintln!("signetd: {e}");
            1
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // What signetd creates (database, spool, keys, exports) is its own whatever the
    // umask it was started with.
    signet_protocol::bootstrap::start_daemon();
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Enroll(cmd)) => return enroll(cmd, &cli.config),
        Some(Cmd::Tokens { json }) => return tokens(json, catalog(&cli.config)?),
        Some(Cmd::Client(cmd)) => return client_command(&Config::load(&cli.config)?, cmd),
        Some(Cmd::ResetState) => {
            let cfg = Config::load(&cli.config)?;
            let old = signetd::adapters::head::read(&cfg.state_dir).ok().flatten();
            signetd::adapters::head::guard(&cfg.state_dir, true)?;
            match old {
                Some(h) => eprintln!(
                    "forgot the audit head {}:{} of {}; signetd starts on {} as it is when it starts next",
                    h.hash,
                    h.records,
                    cfg.state_dir.display(),
                    cfg.state_dir.join(signetd::adapters::store::DB_FILE).display()
                ),
                None => eprintln!("no audit head was kept in {}; nothing to forget", cfg.state_dir.display()),
            }
            return Ok(());
        }
        Some(Cmd::Tls(cmd)) => return tls_command(cmd),
        Some(Cmd::Pair { code, json }) => {
            let cfg = Config::load(&cli.config)?;
            let link = signet_protocol::link::HostLink::open(&cfg.state_dir)
                .context("this host's link key")?;
            let paired = signet_protocol::pairing::pair(&link, &cfg.agent, &code).await;
            if let Err(e) = audit_pair(&cfg, paired.as_ref().ok()) {
                // A failed pairing's own error says more; its record's loss is told too.
                if paired.is_ok() {
                    return Err(e);
                }
                eprintln!("signetd: {e:#}");
            }
            let agent = paired?;
            if json {
                signet_api::outln!(
                    "{}",
                    serde_json::json!({"agent": agent, "host": link.fingerprint(), "endpoint": cfg.agent.to_string()})
                );
            } else {
                signet_api::outln!("Paired with the agent at {}.", cfg.agent);
                signet_api::outln!(
                    "  agent key: {agent}  (check: `signet-agent pair` showed this key)"
                );
                signet_api::outln!("  this host's key: {}", link.fingerprint());
                signet_api::outln!(
                    "signetd takes it at its next contact with the agent; no restart is needed."
                );
            }
            return Ok(());
        }
        Some(Cmd::CheckConfig) => std::process::exit(check_config(&cli.config)),
        Some(Cmd::AlertRelay) => {
            use signetd::adapters::alerts::relay;
            use std::os::fd::AsFd;
            // stdin and stdout: the connection (a socket), or pipes when run by hand.
            let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
            let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
            let ok = relay::serve(
                tokio::fs::File::from_std(stdin.into()),
                tokio::fs::File::from_std(stdout.into()),
                &relay::Programs::default(),
            )
            .await;
            std::process::exit(if ok { 0 } else { 1 });
        }
        Some(Cmd::Docs(docs)) => {
            return docs
                .run(<Cli as clap::CommandFactory>::command())
                .context("writing the documentation");
        }
        Some(Cmd::Audit(cmd)) => {
            let code = audit_command(&Config::load(&cli.config)?, &cmd)?;
            std::process::exit(code);
        }
        None => {}
    }
    let cfg = Config::load(&cli.config)?;
    if let Some(pin_file) = &cfg.pin_file {
        match std::fs::symlink_metadata(pin_file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => tracing::warn!(
                path = %pin_file.display(),
                "the PIN file does not exist yet; the agent waits for a PIN until it does"
            ),
            _ => signetd::services::agent_watch::check_pin_path(pin_file).map_err(|why| {
                anyhow::anyhow!(
                    "{why}; signetd does not start with a PIN file others could read or change"
                )
            })?,
        }
    }
    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    for ep in &cfg.listen {
        if let signet_protocol::Endpoint::Unix(path) = ep {
            if let Some(dir) = path.parent() {
                signetd::adapters::private::socket_dir(dir, &cfg.socket_group)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        let l = Listener::bind(ep).await?;
        if let signet_protocol::Endpoint::Unix(path) = ep {
            use signetd::adapters::private::SocketAccess;
            match signetd::adapters::private::open_socket(path, &cfg.socket_group)
                .with_context(|| format!("setting who may connect to {}", path.display()))?
            {
                SocketAccess::Group { name, .. } => {
                    tracing::info!(socket = %path.display(), group = %name, "root and the group may connect (0660)")
                }
                SocketAccess::OwnerOnly { missing_group } => tracing::warn!(
                    socket = %path.display(),
                    "this host has no group {missing_group:?}, so only root may connect (0600); create it (groupadd --system {missing_group}) or set socket_group in signetd.toml, then restart signetd"
                ),
            }
        }
        let local = l.local_endpoint().context("local address")?;
        tracing::info!(endpoint = %local, "listening");
        bound.push(local.to_string());
        listeners.push((l, None));
    }
    for ep in signetd::config::unprivileged_vsock(&cfg.listen) {
        tracing::warn!(
            endpoint = %ep,
            "this vsock port is above 1023: any user of this host can listen on it while signetd is down and pose as signetd to build VMs; use a port below 1024 (the default vsock:any:{})",
            signet_protocol::endpoint::DEFAULT_DAEMON_PORT
        );
    }
    signetd::adapters::private::secure_tree(&cfg.state_dir).with_context(|| {
        format!(
            "making the state directory {} private (0700, its files 0600)",
            cfg.state_dir.display()
        )
    })?;
    let head = signetd::adapters::head::guard(&cfg.state_dir, false)?;
    // Every request to the agent goes through the link: TLS with this host's key, to
    // the agent key pinned by `signetd pair` only.
    let host_link =
        signet_protocol::link::HostLink::open(&cfg.state_dir).context("this host's link key")?;
    match host_link.pinned() {
        Ok(Some(agent)) => {
            tracing::info!(key = %host_link.fingerprint(), %agent, "link key; paired with the agent")
        }
        Ok(None) => tracing::warn!(
            key = %host_link.fingerprint(),
            "not paired with the agent yet; {}",
            signet_protocol::link::PAIR_FIX
        ),
        Err(e) => tracing::error!(error = %e, "the paired agent's key cannot be read"),
    }
    signet_protocol::link::register(cfg.agent.clone(), Arc::new(host_link));
    let mut daemon = Daemon::open(cfg.clone())?;
    daemon.keep_head(head)?;
    if let Some(tls) = &cfg.tls {
        let acceptor = signetd::adapters::tls::acceptor(&tls.cert, &tls.key)?;
        for ep in &tls.listen {
            let l = Listener::bind(ep).await?;
            let local = l.local_endpoint().context("local address")?;
            tracing::info!(endpoint = %local, "listening with TLS");
            bound.push(local.to_string());
            listeners.push((l, Some(acceptor.clone())));
        }
        daemon = daemon.with_clients(signetd::adapters::clients::open(&cfg.state_dir)?);
    }
    // Every long-lived task is supervised: the first that panics, or ends while it
    // should run, stops signetd (exit status 1) for systemd to restart it.
    let mut tasks = Supervisor::new();
    // Tokens: followed through udev and kept in their VMs (or status says why not).
    daemon = daemon.with_tokens(signetd::services::tokens::start(&cfg, &mut tasks));
    tracing::info!(agent = %cfg.agent, default_profile = %cfg.default_profile, "relaying to the agent");
    let header_timeout = std::time::Duration::from_secs(cfg.limits.header_timeout_seconds);
    let max_connections = cfg.limits.max_connections;
    let bus = cfg.dbus.clone();
    let daemon = Arc::new(daemon);
    // `systemctl reload signetd`: the configuration applied in place, jobs kept
    // (handled before READY, so an early SIGHUP never ends the daemon).
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            let daemon = daemon.clone();
            tasks.spawn("reload on SIGHUP", async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // Logged by reload, with what changed or why nothing did.
                    let _ = daemon.reload();
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP is not handled, so `systemctl reload signetd` does nothing; restart signetd to apply a changed configuration")
        }
    }
    tasks.spawn(
        "the token's worker",
        daemon.job_service().clone().run_worker(),
    );
    tasks.spawn("result janitor", daemon.job_service().clone().run_janitor());
    tasks.spawn(
        "database checkpoints",
        daemon.job_service().clone().run_checkpointer(),
    );
    tasks.spawn(
        "refusal records",
        daemon.job_service().clone().run_refusal_flush(),
    );
    tasks.spawn("audit head keeper", daemon.clone().run_head_keeper());
    // The D-Bus front is for host tools; signing works without it.
    let _bus = match signetd::fronts::dbus::serve(daemon.clone(), &bus, &mut tasks).await {
        Ok(Some(conn)) => {
            tracing::info!(%bus, name = signetd::fronts::dbus::BUS_NAME, "serving on D-Bus");
            Some(conn)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(%bus, error = %e, "the D-Bus front is not available, so signetctl cannot reach this daemon; set dbus = \"none\" in the configuration to silence this");
            None
        }
    };
    // Operators are told: alerts raised once per incident and resolved once.
    tasks.spawn("alerts", signetd::services::alerts::run(daemon.clone()));
    // The agent: its events and health, the timeline, the PIN when it needs one.
    tasks.spawn(
        "agent watcher",
        signetd::services::agent_watch::run(daemon.clone()),
    );
    // Host shutdowns: a logind delay inhibitor, and a drain when one is announced.
    {
        let (daemon, shutdown) = (daemon.clone(), cfg.shutdown.clone());
        // Ends by itself without logind; only a panic is a failure.
        tasks.spawn_may_end("host-shutdown watcher", async move {
            if let Err(e) = signetd::services::shutdown::run(daemon, shutdown.logind, shutdown.grace).await {
                tracing::info!(error = %e, "host shutdowns are not delayed for the job at the token (queued jobs still survive them); set [shutdown] logind = \"none\" to silence this");
            }
        });
    }
    // The web UI is for people; signing works without it.
    let web = match &cfg.web {
        Some(web) => match signetd::fronts::web::start(daemon.clone(), web, &mut tasks).await {
            Ok(started) => Some(started),
            Err(e) => {
                tracing::error!(error = %e, "the web UI is not served; signing goes on without it");
                None
            }
        },
        None => None,
    };
    let app = signetd::fronts::http::router(daemon.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let web_ui = web.as_ref().map(|w| w.web.clone());
    if let Some(web) = web {
        for (l, local) in web.listeners {
            tracing::info!(endpoint = %local, "serving the web UI with TLS");
            let stop = stop_rx.clone();
            let tls = Some(web.acceptor.clone());
            tasks.spawn_until_stop(
                format!("web UI server on {local}"),
                signetd::serve::serve(
                    l,
                    web.app.clone(),
                    header_timeout,
                    max_connections,
                    tls,
                    stop,
                ),
            );
        }
    }
    // Metrics are for monitoring; signing works without them.
    signetd::fronts::metrics::start(
        daemon.clone(),
        &cfg.metrics,
        header_timeout,
        &stop_rx,
        &mut tasks,
    )
    .await;
    for ((l, tls), endpoint) in listeners.into_iter().zip(&bound) {
        let app = app.clone();
        let stop = stop_rx.clone();
        tasks.spawn_until_stop(
            format!("server on {endpoint}"),
            signetd::serve::serve(l, app, header_timeout, max_connections, tls, stop),
        );
    }
    let listening = format!("listening on {}", bound.join(" "));
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Status(&listening),
            sd_notify::NotifyState::Ready,
        ],
    );
    let mut failed = tasks.until(shutdown()).await;
    if let Some(f) = &failed {
        tracing::error!(task = f.task(), "{f}");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&f.to_string())]);
        tracing::info!("stopping: taking no new work");
    }
    // Bounded: new work is refused while the job at the token ends (or not), then
    // the servers close and whatever is still open is cut.
    let bound = cfg.shutdown.stop;
    let close = std::time::Duration::from_secs(1).min(bound / 2);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    daemon.job_service().stop(bound.saturating_sub(close)).await;
    daemon.job_service().flush_refusals();
    if let Some(web) = &web_ui {
        web.close();
    }
    let _ = stop_tx.send(true);
    match tasks.wind_down(close).await {
        Ok(true) => {}
        Ok(false) => tracing::info!("closing the connections still open"),
        Err(f) => {
            tracing::error!(task = f.task(), "{f}");
            failed.get_or_insert(f);
        }
    }
    // The runtime's threads (a request at the agent, udev) are not waited for.
    match failed {
        None => {
            tracing::info!("stopped");
            std::process::exit(0)
        }
        Some(f) => {
            tracing::error!(
                task = f.task(),
                "stopped after a task failed; exiting with status 1"
            );
            std::process::exit(1)
        }
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("stopping: taking no new work");
}

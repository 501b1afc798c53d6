//! `signetctl`: the host CLI. A thin client of `signetd`'s D-Bus front
//! (`org.signet.Signet1`): it calls a method, gets the daemon's result type as JSON and
//! renders it with the same code as `signet` (`signet_api::render`). The
//! operator's commands (`jobs`, `cancel`, `audit`, `doctor`) are in [`ops`]. The man
//! page and shell completions are generated from these definitions (`signetctl man`,
//! `signetctl completions SHELL`).

mod ops;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use signet_api::operator::{EnrollReport, JobList};
use signet_api::output::OutputArgs;
use signet_api::render;
use signet_api::wire::{DaemonStatus, ErrorBody, ErrorCode, HostToken, TokensReport};
use signet_api::{out, outln};
use signet_dbus::ManagerProxy;

/// Exit codes, for monitoring.
const EXIT_CODES: &str = concat!(
    "\
Exit codes:
  0  signing works (status) / all checks passed (doctor) / the command succeeded
  1  signing does not work right now (status), a check failed (doctor), the audit
     chain is broken (audit verify)
  2  usage: the command line is wrong
  3  the daemon cannot be reached on the bus, or the bus refused the call
  4  the daemon refused the command or could not carry it out: no such job or
     token, a job that can no longer be cancelled, a time that is not RFC 3339
",
    signet_api::exit_codes_stdout!(),
    "

--output-format json (or --json) prints the document the HTTP API answers on one
line; json-pretty indents it."
);

/// Status and control of a Signet appliance on this Proxmox host, over D-Bus.
///
/// Talks to signetd on the system bus (org.signet.Signet1). Root may use every
/// command; members of the `signet-admin` group every command but enroll; members of
/// the `signet` group status, tokens and their own jobs (docs/SECURITY.md).
#[derive(Debug, Parser)]
#[command(version, after_help = EXIT_CODES)]
struct Cli {
    /// The bus: "system" (default), "session", or a D-Bus address.
    #[arg(long, global = true, env = "SIGNET_DBUS", default_value = "system")]
    bus: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Is signing working, and if not, why? One screen; --output-format json (the
    /// document of GET /v1/status) for scripts.
    #[command(after_help = EXIT_CODES)]
    Status {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The host's tokens: serial, model, host port, where each one is and why (as JSON:
    /// the document of GET /v1/tokens).
    Tokens {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Put a token into its signing VM (Signet attaches a token only to the VM it is
    /// assigned to).
    Attach {
        /// The token's serial number (`signetctl tokens` lists them).
        serial: String,
        /// The VM you expect it to go to; refused when the token belongs to another.
        #[arg(long)]
        vm: Option<u32>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Take a token out of its VM and keep it on the host until `attach`.
    Detach {
        serial: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Detach a token from its VM and attach it again (e.g. when the guest lost it).
    Reattach {
        serial: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Every caller's jobs: running, queued (in the order they will run), recently
    /// ended. --watch follows them.
    #[command(after_help = EXIT_CODES)]
    Jobs(ops::JobsArgs),
    /// Cancel any caller's job that waits in the queue.
    #[command(after_help = EXIT_CODES)]
    Cancel(ops::CancelArgs),
    /// The hash-chained audit log: tail, verify, export.
    #[command(subcommand, after_help = EXIT_CODES)]
    Audit(ops::AuditCommand),
    /// Prepare a VM for Signet through Proxmox's qm: the signing VM that holds a token,
    /// or a build VM that asks for signatures. Shows the exact change; --dry-run
    /// changes nothing. Audited with your uid.
    #[command(subcommand, after_help = EXIT_CODES)]
    Enroll(EnrollCommand),
    /// Check this host for signing: vsock, the signing VM's configuration, the token,
    /// the agent, the PIN, the certificate, the spool, the clock; each failure with its
    /// fix.
    #[command(after_help = EXIT_CODES)]
    Doctor(ops::DoctorArgs),
    #[command(flatten)]
    Docs(signet_api::docs::DocsCommand),
}

#[derive(Debug, Subcommand)]
enum EnrollCommand {
    /// The VM that holds the token: its USB port as usbN, the vsock device and Signet's
    /// monitor in args:, and the token's [[tokens]] entry in signetd.toml.
    SigningVm {
        #[command(flatten)]
        vm: signet_api::args::SigningVmArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// A VM that asks for signatures: the vsock device in args:, and a grant for it in
    /// signetd.toml.
    BuildVm {
        #[command(flatten)]
        vm: signet_api::args::BuildVmArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("signetctl: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    ExitCode::from(rt.block_on(run(cli)))
}

async fn connect(bus: &str) -> zbus::Result<zbus::Connection> {
    match bus {
        "system" => zbus::Connection::system().await,
        "session" => zbus::Connection::session().await,
        address => zbus::connection::Builder::address(address).build().await,
    }
}

async fn run(cli: Cli) -> u8 {
    if let Command::Docs(docs) = &cli.command {
        return match docs.run(Cli::command()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("signetctl: {e}");
                3
            }
        };
    }
    let conn = match connect(&cli.bus).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("signetctl: cannot connect to the {} bus: {e}", cli.bus);
            return 3;
        }
    };
    let proxy = match ManagerProxy::new(&conn).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("signetctl: {e}");
            return 3;
        }
    };
    match cli.command {
        Command::Jobs(args) => ops::jobs(&proxy, &args).await,
        Command::Cancel(args) => ops::cancel(&proxy, &args).await,
        Command::Audit(cmd) => ops::audit(&proxy, &cmd).await,
        Command::Doctor(args) => ops::doctor(&proxy, &args).await,
        Command::Docs(_) => 0,
        Command::Status { output } => {
            let text = match proxy.status().await {
                Ok(t) => t,
                // signetd's own refusal (the caller's role): its message, exit 4.
                Err(zbus::Error::MethodError(name, message, _)) if signetd_error(name.as_str()) => {
                    eprintln!("signetctl: {}", message.as_deref().unwrap_or(name.as_str()));
                    return 4;
                }
                Err(e) => {
                    eprintln!("signetctl: {}", call_error(&e));
                    return 3;
                }
            };
            let status: DaemonStatus = match serde_json::from_str(&text) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("signetctl: signetd answered a status this signetctl cannot read ({e}); are both the same version?");
                    return 3;
                }
            };
            if output.is_json() {
                outln!("{}", output.to_json(&status));
            } else {
                let source = format!("{} bus", cli.bus);
                out!(
                    "{}",
                    render::status_text(&status, &source, std::io::stdout().is_terminal())
                );
                // The last jobs, for the one screen (the JSON stays the status alone).
                let jobs = proxy
                    .jobs(STATUS_RECENT_JOBS)
                    .await
                    .ok()
                    .and_then(|t| serde_json::from_str::<JobList>(&t).ok());
                if let Some(list) = jobs.filter(|l| {
                    !(l.running.is_empty() && l.queued.is_empty() && l.recent.is_empty())
                }) {
                    outln!("  jobs:");
                    for line in signet_api::operator::jobs_text(&list).lines() {
                        outln!("    {line}");
                    }
                }
            }
            if status.signing_works {
                0
            } else {
                1
            }
        }
        Command::Tokens { output } => {
            let report: TokensReport = match read(proxy.tokens().await, output) {
                Ok(r) => r,
                Err(code) => return code,
            };
            if output.is_json() {
                outln!("{}", output.to_json(&report));
            } else {
                out!("{}", render::tokens_text(&report));
            }
            0
        }
        Command::Attach { serial, vm, output } => token_done(
            read(proxy.attach(&serial, vm.unwrap_or(0)).await, output),
            output,
        ),
        Command::Detach { serial, output } => {
            token_done(read(proxy.detach(&serial).await, output), output)
        }
        Command::Reattach { serial, output } => {
            token_done(read(proxy.reattach(&serial).await, output), output)
        }
        Command::Enroll(cmd) => {
            let (role, vmid, serial, profiles, dry_run, output) = match cmd {
                EnrollCommand::SigningVm { vm, output } => (
                    "signing-vm",
                    vm.vmid,
                    vm.token,
                    Vec::new(),
                    vm.dry_run,
                    output,
                ),
                EnrollCommand::BuildVm { vm, output } => (
                    "build-vm",
                    vm.vmid,
                    String::new(),
                    vm.profiles,
                    vm.dry_run,
                    output,
                ),
            };
            let answer = proxy.enroll(role, vmid, &serial, profiles, !dry_run).await;
            match read::<EnrollReport>(answer, output) {
                Ok(r) if output.is_json() => {
                    outln!("{}", output.to_json(&r));
                    0
                }
                Ok(r) => {
                    out!("{}", signet_api::operator::enroll_text(&r));
                    0
                }
                Err(code) => code,
            }
        }
    }
}

/// How many ended jobs `signetctl status` shows.
const STATUS_RECENT_JOBS: u32 = 5;
/// A token command's answer: the token, as text or JSON.
fn token_done(r: Result<HostToken, u8>, output: OutputArgs) -> u8 {
    match r {
        Ok(t) if output.is_json() => {
            outln!("{}", output.to_json(&t));
            0
        }
        Ok(t) => {
            let report = TokensReport {
                watching: true,
                detail: None,
                tokens: vec![t],
            };
            out!("{}", render::tokens_text(&report));
            0
        }
        Err(code) => code,
    }
}

/// A method's JSON answer as `T`; on failure, says why (as JSON too with
/// `--output-format json`) and answers the exit code.
fn read<T: serde::de::DeserializeOwned>(
    answer: zbus::Result<String>,
    output: OutputArgs,
) -> Result<T, u8> {
    let text = match answer {
        Ok(t) => t,
        Err(zbus::Error::MethodError(name, desc, _)) if signetd_error(name.as_str()) => {
            let message = desc.unwrap_or_default();
            let code = signet_dbus::error_code(name.as_str()).unwrap_or(ErrorCode::Internal);
            if output.is_json() {
                let body = ErrorBody::new(code, message.clone());
                outln!("{}", output.to_json(&body));
            }
            eprintln!("signetctl: {message}");
            return Err(4);
        }
        Err(e) => {
            eprintln!("signetctl: {}", call_error(&e));
            return Err(3);
        }
    };
    serde_json::from_str(&text).map_err(|e| {
        eprintln!("signetctl: signetd answered something this signetctl cannot read ({e}); are both the same version?");
        3
    })
}

/// Whether a D-Bus error is one of signetd's own (`org.signet.Signet1.Error.<Code>`).
fn signetd_error(name: &str) -> bool {
    name.strip_prefix(signet_dbus::ERROR_PREFIX)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// A failed call in words, with the fix for the usual causes.
fn call_error(e: &zbus::Error) -> String {
    let text = e.to_string();
    if text.contains("ServiceUnknown") || text.contains("was not provided by any .service") {
        "signetd is not running on this bus (systemctl status signetd)".to_owned()
    } else if text.contains("AccessDenied") {
        format!("the bus refused the call: {text}; run as root, as a member of the signet-admin group for the operator's commands, or of the signet group for the status and your own jobs")
    } else {
        text
    }
}

//! `signet`: the client build VMs and host tools use to sign files.
//!
//! - `main`: the command line and exit codes.
//! - [`config`] — the optional `/etc/signet/signet.toml` (endpoint, profile).
//! - [`native`] — digest mode for PE files with the Authenticode engine, no osslsigncode.
//! - [`sign`] — one file: local checks, streamed upload with progress, atomic write of
//!   the signed result.
//! - [`collect`] — a job's idempotency key, and its result collected across a
//!   restarting appliance.
//! - [`cache`] — the profiles digest mode signs with, kept between runs and named as
//!   each upload's precondition.
//! - [`signtool`] — `signet signtool sign ...`: signtool's options held to the profile,
//!   then signed as `signet sign` signs.

mod cache;
mod collect;
mod config;
mod native;
mod sign;
mod signtool;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use signet_api::output::OutputArgs;
use signet_api::render;
use signet_api::wire::{exit, DaemonStatus, STATUS_PATH};
use signet_api::{out, outln};
use signet_protocol::client;
use signet_protocol::Endpoint;

const EXIT_CODES: &str = concat!(
    "\
Exit codes:
  0  signed (every file)
  2  usage: the command line is wrong
  3  refused by policy: unknown profile, or this caller may not use it
  4  bad input file: missing, empty, or not a format Signet signs
  5  signing failed on the appliance
  6  appliance unavailable: daemon, agent or token cannot be reached, or the PIN needs fixing
  130, 143  interrupted (SIGINT, SIGTERM): no file left half-written; a job already sent
     is signed, and the command run again for the files not yet written collects it
",
    signet_api::exit_codes_stdout!(),
    "

Endpoints: vsock:CID:PORT (default vsock:2:771, the Proxmox host), unix:PATH, tcp:HOST:PORT,
tls:HOST:PORT (a remote appliance: --client NAME with SIGNET_SECRET, --tls-ca)."
);

/// Sign Windows binaries with the code-signing token of a Signet appliance.
///
/// In a build VM on a Signet host nothing needs configuring: `signet sign app.exe`
/// reaches the host over vsock, signs app.exe with the default profile and replaces
/// it with the signed file.
#[derive(Debug, Parser)]
#[command(version, after_help = EXIT_CODES)]
struct Cli {
    /// Where the Signet daemon listens [default: from the config file, else vsock:2:771].
    #[arg(
        long,
        short,
        global = true,
        env = "SIGNET_ENDPOINT",
        value_name = "ENDPOINT"
    )]
    endpoint: Option<Endpoint>,
    /// Client configuration file (endpoint, profile).
    #[arg(long, global = true, env = "SIGNET_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// On a tls: endpoint, sign as this remote client; its secret is read from the
    /// environment variable SIGNET_SECRET, never from the command line.
    #[arg(long, global = true, env = "SIGNET_CLIENT", value_name = "NAME")]
    client: Option<String>,
    /// On a tls: endpoint, trust this CA certificate (PEM) for the server's certificate
    /// [default: the system's CA bundle].
    #[arg(long, global = true, env = "SIGNET_TLS_CA", value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sign files, replacing each with its signed version (or writing to --output).
    #[command(after_help = EXIT_CODES)]
    Sign(sign::SignArgs),
    /// signtool's `sign` command line, signed by the appliance: `signet signtool sign
    /// /fd sha256 /tr URL /d DESC app.exe` (options held to the profile).
    #[command(
        after_long_help = signtool::HELP,
        disable_help_flag = true,
        arg_required_else_help = true
    )]
    Signtool {
        /// `sign`, then signtool's options and the files (`signet signtool --help`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            num_args = 0..,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },
    /// Show whether the appliance can sign right now.
    #[command(after_help = "Exit code 0 when signing works, 6 when it does not.")]
    Status {
        /// As JSON: the document of GET /v1/status, also when the appliance cannot be
        /// reached ({"endpoint", "reachable": false, "signing_works": false, "error"}).
        #[command(flatten)]
        output: OutputArgs,
    },
    #[command(flatten)]
    Docs(signet_api::docs::DocsCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE as u8 } else { 0 });
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("signet: cannot start: {e}");
            return ExitCode::from(exit::UNAVAILABLE as u8);
        }
    };
    let signs = matches!(cli.command, Command::Sign(_) | Command::Signtool { .. });
    let code = rt.block_on(async {
        tokio::select! {
            code = run(cli) => code,
            signo = interrupted() => {
                // What was being received is dropped with the run (its files removed);
                // the runtime's blocking threads end their work before it ends.
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr().lock(),
                    if signs { INTERRUPTED_SIGNING } else { INTERRUPTED }.as_bytes(),
                );
                128 + signo
            }
        }
    });
    drop(rt);
    ExitCode::from(code as u8)
}

const INTERRUPTED: &str = "signet: interrupted\n";
const INTERRUPTED_SIGNING: &str = "signet: interrupted; no file is left half-written. A job already sent stays queued at the appliance and is signed: run the command again for the files not yet written to collect their jobs (the same files give the same jobs)\n";

/// The signal number of the first SIGINT (2) or SIGTERM (15); never, when they cannot
/// be watched.
async fn interrupted() -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => 2,
        _ = term.recv() => 15,
    }
}

async fn run(cli: Cli) -> i32 {
    if let Command::Docs(docs) = &cli.command {
        return match docs.run(<Cli as clap::CommandFactory>::command()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("signet: {e}");
                exit::UNAVAILABLE
            }
        };
    }
    let file_cfg = match config::ClientConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("signet: {e}");
            return exit::USAGE;
        }
    };
    let endpoint = cli
        .endpoint
        .or(file_cfg.endpoint.clone())
        .unwrap_or_else(Endpoint::default_client);
    let credentials = match cli.client {
        Some(name) => match std::env::var("SIGNET_SECRET") {
            Ok(secret) if !secret.is_empty() => Some((name, secret.into())),
            _ => {
                eprintln!("signet: --client {name} needs the client's secret in the environment variable SIGNET_SECRET");
                return exit::USAGE;
            }
        },
        None => None,
    };
    signet_protocol::tls::configure(cli.tls_ca, credentials);
    match cli.command {
        Command::Sign(args) => sign::run(&endpoint, args, &file_cfg).await,
        Command::Signtool { args } => signtool::run(&endpoint, &args, &file_cfg).await,
        Command::Status { output } => status(&endpoint, output).await,
        Command::Docs(_) => 0,
    }
}

async fn status(endpoint: &Endpoint, output: OutputArgs) -> i32 {
    // As JSON, a document whatever happened: scripts parse stdout, not stderr.
    let failed = |reachable: bool, error: serde_json::Value, message: &str, exit_code: i32| {
        if output.is_json() {
            let doc = serde_json::json!({
                "endpoint": endpoint.to_string(),
                "reachable": reachable,
                "signing_works": false,
                "error": error,
            });
            outln!("{}", output.to_json(&doc));
        }
        eprintln!("signet: {message}");
        exit_code
    };
    let status: DaemonStatus = match client::get_json(endpoint, STATUS_PATH).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let doc = serde_json::to_value(&e).unwrap_or_default();
            return failed(true, doc, &e.message, e.code.exit_code());
        }
        Err(e) => {
            let message = sign::unreachable_message(endpoint, &e);
            let doc = serde_json::json!({ "message": message });
            return failed(false, doc, &message, exit::UNAVAILABLE);
        }
    };
    if output.is_json() {
        outln!("{}", output.to_json(&status));
    } else {
        let color = std::io::stdout().is_terminal();
        out!(
            "{}",
            render::status_text(&status, &endpoint.to_string(), color)
        );
    }
    if status.signing_works {
        exit::SIGNED
    } else {
        exit::UNAVAILABLE
    }
}

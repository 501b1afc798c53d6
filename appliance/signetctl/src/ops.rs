//! The operator's commands: `jobs`, `cancel`, `audit`, `doctor`. Each calls one
//! method of `org.signet.Signet1.Manager`, reads the daemon's result type
//! ([`signet_api::operator`]) and prints it as text or JSON.

use futures_util::StreamExt;
use signet_api::operator::{self, AuditCheck, AuditRecord, DoctorReport, JobList};
use signet_api::output::OutputArgs;
use signet_api::wire::JobView;
use signet_api::{out, outln};
use signet_dbus::ManagerProxy;

/// A command's outcome: what it printed is done; the exit code says how it went.
pub type Code = u8;

/// The command succeeded.
pub const OK: Code = 0;
/// The answer is bad news: a check failed, the audit chain is broken.
pub const FAILED: Code = 1;
/// The daemon cannot be reached, or the bus refused the call.
pub const UNREACHABLE: Code = 3;
/// The daemon refused the command (no such job, a job that cannot be cancelled).
pub const REFUSED: Code = 4;

#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    /// Print the list again whenever a job ends, and every --interval seconds.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 2, requires = "watch")]
    pub interval: u64,
    /// How many ended jobs to show.
    #[arg(long, default_value_t = 20)]
    pub recent: u32,
    /// As JSON: the same document as GET /v1/operator/jobs, one per refresh with
    /// --watch.
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The job's id (as `signetctl jobs` shows it).
    pub job: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// The newest audit records.
    Tail {
        /// How many.
        #[arg(short, default_value_t = 20)]
        n: u32,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Walks the hash chain; names the first record changed, deleted or reordered.
    Verify {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Writes the records as JSON lines (as `signetd audit export` does).
    Export {
        /// Only records from this time on (RFC 3339, e.g. 2026-11-23T08:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A failed call: the daemon's own error (its message, exit 4) or the bus's (exit 3).
fn failed(e: &zbus::Error) -> Code {
    if let zbus::Error::MethodError(name, message, _) = e {
        if crate::signetd_error(name.as_str()) {
            eprintln!("signetctl: {}", message.as_deref().unwrap_or(name.as_str()));
            return REFUSED;
        }
    }
    eprintln!("signetctl: {}", crate::call_error(e));
    UNREACHABLE
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Code> {
    serde_json::from_str(text).map_err(|e| {
        eprintln!("signetctl: signetd answered something this signetctl cannot read ({e}); are both the same version?");
        UNREACHABLE
    })
}

macro_rules! call {
    ($e:expr) => {
        match $e.await {
            Ok(t) => t,
            Err(e) => return failed(&e),
        }
    };
}

macro_rules! read {
    ($t:ty, $text:expr) => {
        match parse::<$t>(&$text) {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

pub async fn jobs(proxy: &ManagerProxy<'_>, args: &JobsArgs) -> Code {
    let show = |list: &JobList, clear: bool| {
        if args.output.is_json() {
            outln!("{}", args.output.to_json(list));
        } else {
            if clear {
                out!("\x1b[H\x1b[2J");
            }
            out!("{}", operator::jobs_text(list));
        }
    };
    let text = call!(proxy.jobs(args.recent));
    let list = read!(JobList, text);
    if !args.watch {
        show(&list, false);
        return OK;
    }
    let clear = !args.output.is_json() && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut ended = match proxy.receive_job_finished().await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    show(&list, clear);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(args.interval.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            s = ended.next() => if s.is_none() { return UNREACHABLE },
            _ = tick.tick() => {}
        }
        let text = call!(proxy.jobs(args.recent));
        show(&read!(JobList, text), clear);
    }
}

pub async fn cancel(proxy: &ManagerProxy<'_>, args: &CancelArgs) -> Code {
    let text = call!(proxy.cancel(&args.job));
    let view = read!(JobView, text);
    if args.output.is_json() {
        outln!("{}", args.output.to_json(&view));
    } else {
        outln!("job {} is {}", view.id, view.state.as_str());
    }
    OK
}

pub async fn audit(proxy: &ManagerProxy<'_>, cmd: &AuditCommand) -> Code {
    match cmd {
        AuditCommand::Tail { n, output } => {
            let text = call!(proxy.audit_tail(*n));
            let records = read!(Vec<AuditRecord>, text);
            if output.is_json() {
                outln!("{}", output.to_json(&records));
            } else {
                out!("{}", operator::audit_text(&records));
            }
            OK
        }
        AuditCommand::Verify { output } => {
            let text = call!(proxy.audit_verify());
            let check = read!(AuditCheck, text);
            if output.is_json() {
                outln!("{}", output.to_json(&check));
            } else {
                out!("{}", operator::audit_check_text(&check));
            }
            if check.ok {
                OK
            } else {
                FAILED
            }
        }
        AuditCommand::Export { since } => {
            let text = call!(proxy.audit_export(since.as_deref().unwrap_or("")));
            let records = read!(Vec<AuditRecord>, text);
            for r in &records {
                outln!("{}", serde_json::to_string(r).unwrap_or_default());
            }
            OK
        }
    }
}

pub async fn doctor(proxy: &ManagerProxy<'_>, args: &DoctorArgs) -> Code {
    let text = call!(proxy.doctor());
    let report = read!(DoctorReport, text);
    if args.output.is_json() {
        outln!("{}", args.output.to_json(&report));
    } else {
        out!("{}", operator::doctor_text(&report));
    }
    if report.ok {
        OK
    } else {
        FAILED
    }
}

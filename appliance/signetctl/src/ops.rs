//! The operator's commands: `jobs`, `cancel`, `audit`, `doctor`. Each calls one
//! method of `org.signet.Signet1.Manager`, reads the daemon's result type
//! ([`signet_api::operator`]) and prints it as text or JSON.

use futures_util::StreamExt;
use signet_api::operator::{self, AuditCheck, AuditRecord, DoctorReport, JobList};
use signet_api::wire::JobView;
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
    /// Print JSON (the same document as GET /v1/operator/jobs); one line per refresh
    /// with --watch.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The job's id (as `signetctl jobs` shows it).
    pub job: String,
    /// Print the cancelled job as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// The newest audit records.
    Tail {
        /// How many.
        #[arg(short, default_value_t = 20)]
        n: u32,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Walks the hash chain; names the first record changed, deleted or reordered.
    Verify {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
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
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
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

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
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
        if args.json {
            println!("{}", serde_json::to_string(list).unwrap_or_default());
        } else {
            if clear {
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", operator::jobs_text(list));
        }
    };
    let text = call!(proxy.jobs(args.recent));
    let list = read!(JobList, text);
    if !args.watch {
        if args.json {
            println!("{}", pretty(&list));
        } else {
            show(&list, false);
        }
        return OK;
    }
    let clear = !args.json && std::io::IsTerminal::is_terminal(&std::io::stdout());
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
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

pub async fn cancel(proxy: &ManagerProxy<'_>, args: &CancelArgs) -> Code {
    let text = call!(proxy.cancel(&args.job));
    let view = read!(JobView, text);
    if args.json {
        println!("{}", pretty(&view));
    } else {
        println!("job {} is {}", view.id, view.state.as_str());
    }
    OK
}

pub async fn audit(proxy: &ManagerProxy<'_>, cmd: &AuditCommand) -> Code {
    match cmd {
        AuditCommand::Tail { n, json } => {
            let text = call!(proxy.audit_tail(*n));
            let records = read!(Vec<AuditRecord>, text);
            if *json {
                println!("{}", pretty(&records));
            } else {
                print!("{}", operator::audit_text(&records));
            }
            OK
        }
        AuditCommand::Verify { json } => {
            let text = call!(proxy.audit_verify());
            let check = read!(AuditCheck, text);
            if *json {
                println!("{}", pretty(&check));
            } else {
                print!("{}", operator::audit_check_text(&check));
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
                println!("{}", serde_json::to_string(r).unwrap_or_default());
            }
            OK
        }
    }
}

pub async fn doctor(proxy: &ManagerProxy<'_>, args: &DoctorArgs) -> Code {
    let text = call!(proxy.doctor());
    let report = read!(DoctorReport, text);
    if args.json {
        println!("{}", pretty(&report));
    } else {
        print!("{}", operator::doctor_text(&report));
    }
    if report.ok {
        OK
    } else {
        FAILED
    }
}

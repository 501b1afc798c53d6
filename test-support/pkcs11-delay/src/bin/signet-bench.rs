//! scripts/bench.sh's driver:
//!
//! - `interleave`: runs every way of signing once per round, the ways' order shuffled
//!   anew each round, so all of them see the same machine load and none always runs
//!   after the same other way (what one way leaves behind, e.g. unflushed writes or
//!   cold caches, falls on the others alike); a way can be a
//!   command or signing on a resident, logged-in PKCS#11 session in this process
//!   (raw `C_Sign`). Writes a markdown table with each way's median and its ratio to
//!   the reference way of its group (e.g. direct osslsigncode at the same file size).
//! - `throughput`: one command run by N concurrent callers until J jobs are done;
//!   jobs/s and failures, and each job as a `JOB` line in the shim's log.
//! - `raw-sign`: signatures on one resident, logged-in session, one after another.
//! - `report`: reads the shim's log (signet-pkcs11-delay): calls per process, token
//!   busy fraction, C_Sign rate, C_Login per job.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use signet_pkcs11_delay::log::{Call, Report};
use signet_pkcs11_delay::monotonic_ns;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Parser, Debug)]
#[command(about = "Signet's benchmark driver (scripts/bench.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// A resident PKCS#11 session to sign on.
#[derive(clap::Args, Debug, Clone)]
struct TokenArgs {
    /// The PKCS#11 module (SoftHSM, or the shim).
    #[arg(long)]
    module: Option<PathBuf>,
    /// The token's label.
    #[arg(long, default_value = "signet-demo")]
    label: String,
    /// The private key's label.
    #[arg(long, default_value = "signkey")]
    key: String,
    /// The file holding the user PIN.
    #[arg(long)]
    pin_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// All ways side by side, interleaved round by round.
    Interleave {
        /// Measured rounds.
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Rounds run first and not counted.
        #[arg(long, default_value_t = 2)]
        warmup: u32,
        /// A way: `GROUP::NAME::COMMAND ARGS...` (split on spaces; `{n}` becomes a
        /// number unique to the run, `{out}` a fresh output file removed afterwards).
        #[arg(short = 'c', long = "way")]
        ways: Vec<String>,
        /// The name of each group's reference way (its ratio is 1.00).
        #[arg(long = "ref")]
        reference: String,
        /// Also sign on a resident session in this process (group `any`), with these
        /// token settings (given when --module is).
        #[command(flatten)]
        raw: TokenArgs,
        /// Checks one output of each way that writes `{out}`: `{out}` in it is replaced.
        #[arg(long)]
        verify: Option<String>,
        /// Where the markdown table goes (also printed).
        #[arg(long)]
        md: Option<PathBuf>,
        /// Flushes the system's written data (`sync`) before each run, not timed: what
        /// one way wrote and did not flush (osslsigncode writes without an fsync) is
        /// not written back to the disk during the next way's run.
        #[arg(long)]
        settle: bool,
        /// The seed of the rounds' order (printed; the same seed gives the same order).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// One command, N concurrent callers, J jobs.
    Throughput {
        #[arg(long)]
        callers: u32,
        #[arg(long)]
        jobs: u64,
        /// The shim's log, to add a `JOB` line per job to.
        #[arg(long)]
        log: Option<PathBuf>,
        /// The command (`{n}` and `{out}` as in `interleave`).
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Signatures one after another on a resident, logged-in session.
    RawSign {
        #[command(flatten)]
        token: TokenArgs,
        #[arg(long, default_value_t = 20)]
        runs: u32,
    },
    /// Reads the shim's log.
    Report {
        log: PathBuf,
        /// One line of key=value words instead of the tables.
        #[arg(long)]
        fields: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Interleave {
            runs,
            warmup,
            ways,
            reference,
            raw,
            verify,
            md,
            settle,
            seed,
        } => interleave(
            runs,
            warmup,
            &ways,
            &reference,
            &raw,
            verify.as_deref(),
            md,
            settle,
            seed,
        ),
        Cmd::Throughput {
            callers,
            jobs,
            log,
            command,
        } => throughput(callers, jobs, log.as_deref(), &command),
        Cmd::RawSign { token, runs } => {
            let signer = RawSigner::open(&token)?;
            let mut ms = Vec::new();
            for _ in 0..runs {
                ms.push(signer.sign_ms()?);
            }
            let s = Stats::of(&ms, 0);
            writeln!(
                std::io::stdout(),
                "runs={runs} median_ms={:.2} mean_ms={:.2} min_ms={:.2} sign_per_s={:.2}",
                s.median,
                s.mean,
                s.min,
                1000.0 / s.mean
            )?;
            Ok(())
        }
        Cmd::Report { log, fields } => {
            let text = std::fs::read_to_string(&log).with_context(|| {
                format!(
                    "cannot read the shim's log {}; give the path SIGNET_SHIM_LOG named",
                    log.display()
                )
            })?;
            let r = Report::from_log(&text);
            if fields {
                writeln!(std::io::stdout(), "{}", r.fields())?;
            } else {
                write!(std::io::stdout(), "{}", r.text())?;
            }
            Ok(())
        }
    }
}

/// A logged-in session and the key, kept for the process's life.
struct RawSigner {
    _ctx: Pkcs11,
    session: Session,
    key: ObjectHandle,
}

impl RawSigner {
    fn open(t: &TokenArgs) -> Result<RawSigner> {
        let module = t
            .module
            .as_ref()
            .context("--module is required to sign on a resident session")?;
        let pin_file = t
            .pin_file
            .as_ref()
            .context("--pin-file is required to sign on a resident session")?;
        let ctx = Pkcs11::new(module)
            .with_context(|| format!("cannot load {}; give a PKCS#11 module", module.display()))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
        let slot = ctx
            .get_slots_with_token()?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|i| i.label().trim_end() == t.label)
                    .unwrap_or(false)
            })
            .with_context(|| format!("no token labelled {:?}; give its --label", t.label))?;
        let session = ctx.open_ro_session(slot)?;
        let pin = std::fs::read_to_string(pin_file)
            .with_context(|| format!("cannot read {}", pin_file.display()))?;
        session.login(
            UserType::User,
            Some(&AuthPin::from(pin.trim_end().to_owned())),
        )?;
        let key = *session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(t.key.as_bytes().to_vec()),
            ])?
            .first()
            .with_context(|| format!("no private key labelled {:?}; give its --key", t.key))?;
        Ok(RawSigner {
            _ctx: ctx,
            session,
            key,
        })
    }

    /// One RSA PKCS#1 v1.5 signature of a SHA-256 DigestInfo, as osslsigncode asks
    /// the token for; its time in ms.
    fn sign_ms(&self) -> Result<f64> {
        let mut digest_info = vec![
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ];
        digest_info.extend_from_slice(&monotonic_ns().to_le_bytes().repeat(4));
        let t = std::time::Instant::now();
        self.session
            .sign(&Mechanism::RsaPkcs, self.key, &digest_info)?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    }
}

/// Median, mean, σ, min of a way's times, and its failures.
#[derive(Debug, Clone, Copy)]
struct Stats {
    median: f64,
    mean: f64,
    sd: f64,
    min: f64,
    n: usize,
    failed: u32,
}

impl Stats {
    fn of(ms: &[f64], failed: u32) -> Stats {
        let mut v = ms.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Stats {
                median: f64::NAN,
                mean: f64::NAN,
                sd: f64::NAN,
                min: f64::NAN,
                n,
                failed,
            };
        }
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        Stats {
            median,
            mean,
            sd,
            min: v[0],
            n,
            failed,
        }
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Runs `argv` once with `{n}` and `{out}` filled in; whether it succeeded, its time
/// in ms, and the output file it was given.
fn run_once(argv: &[String], scratch: &Path) -> Result<(bool, f64, Option<PathBuf>)> {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let out = scratch.join(format!("out-{n}.exe"));
    let mut wrote = None;
    let args: Vec<String> = argv
        .iter()
        .map(|a| {
            if a.contains("{out}") {
                wrote = Some(out.clone());
            }
            a.replace("{n}", &format!("{}-{n}", std::process::id()))
                .replace("{out}", &out.display().to_string())
        })
        .collect();
    let t = std::time::Instant::now();
    let status = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !status.status.success() {
        eprintln!(
            "bench: failed ({}): {}\n{}",
            status.status,
            args.join(" "),
            String::from_utf8_lossy(&status.stderr).trim_end()
        );
    }
    Ok((status.status.success(), ms, wrote))
}

fn scratch_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("signet-bench-out.")
        .tempdir_in(std::env::var_os("TMPDIR").unwrap_or_else(|| "/tmp".into()))?)
}

struct Way {
    group: String,
    name: String,
    argv: Vec<String>,
    ms: Vec<f64>,
    failed: u32,
    verified: bool,
}

#[allow(clippy::too_many_arguments)]
fn interleave(
    runs: u32,
    warmup: u32,
    specs: &[String],
    reference: &str,
    raw: &TokenArgs,
    verify: Option<&str>,
    md: Option<PathBuf>,
    settle: bool,
    seed: Option<u64>,
) -> Result<()> {
    let scratch = scratch_dir()?;
    let mut ways = Vec::new();
    for s in specs {
        let mut parts = s.splitn(3, "::");
        let (Some(group), Some(name), Some(cmd)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("way {s:?} is not GROUP::NAME::COMMAND");
        };
        ways.push(Way {
            group: group.to_owned(),
            name: name.to_owned(),
            argv: cmd.split_whitespace().map(str::to_owned).collect(),
            ms: Vec::new(),
            failed: 0,
            verified: false,
        });
    }
    let signer = match raw.module {
        Some(_) => {
            ways.insert(
                0,
                Way {
                    group: "any".to_owned(),
                    name: "raw C_Sign, resident logged-in session".to_owned(),
                    argv: Vec::new(),
                    ms: Vec::new(),
                    failed: 0,
                    verified: true,
                },
            );
            Some(RawSigner::open(raw)?)
        }
        None => None,
    };
    let n = ways.len();
    // Shuffled, not rotated: a rotation keeps each way behind the same other way in
    // every round (measured: two pairs of the same binaries then differed by 0.3 ms).
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    eprintln!("bench: the ways' order is shuffled each round (--seed {seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for round in 0..warmup + runs {
        rng.shuffle(&mut order);
        for &i in &order {
            let w = &mut ways[i];
            if settle && !Command::new("sync").status()?.success() {
                bail!("sync failed");
            }
            let (ok, ms, out) = if w.argv.is_empty() {
                let signer = signer.as_ref().context("raw way without a session")?;
                match signer.sign_ms() {
                    Ok(ms) => (true, ms, None),
                    Err(e) => {
                        eprintln!("bench: raw C_Sign failed: {e}");
                        (false, 0.0, None)
                    }
                }
            } else {
                run_once(&w.argv, scratch.path())?
            };
            if round >= warmup {
                if ok {
                    w.ms.push(ms);
                } else {
                    w.failed += 1;
                }
            }
            if let Some(out) = out {
                if ok && !w.verified {
                    if let Some(v) = verify {
                        let argv: Vec<String> = v
                            .split_whitespace()
                            .map(|a| a.replace("{out}", &out.display().to_string()))
                            .collect();
                        let st = Command::new(&argv[0])
                            .args(&argv[1..])
                            .stdout(Stdio::null())
                            .status()?;
                        if !st.success() {
                            bail!("{}'s output does not verify: {}", w.name, argv.join(" "));
                        }
                    }
                    w.verified = true;
                }
                let _ = std::fs::remove_file(&out);
            }
        }
    }

    // One column pair per group, in the order groups first appear.
    let mut groups: Vec<String> = Vec::new();
    for w in &ways {
        if w.group != "any" && !groups.contains(&w.group) {
            groups.push(w.group.clone());
        }
    }
    let mut names: Vec<String> = Vec::new();
    for w in &ways {
        if !names.contains(&w.name) {
            names.push(w.name.clone());
        }
    }
    let find = |g: &str, name: &str| {
        ways.iter()
            .find(|w| w.name == name && (w.group == g || w.group == "any"))
    };
    let mut t = String::new();
    let _ = write!(t, "| way (median ms; × {reference}) |");
    for g in &groups {
        let _ = write!(t, " {g} | × |");
    }
    t.push('\n');
    t.push_str("|---|");
    for _ in &groups {
        t.push_str("---|---|");
    }
    t.push('\n');
    for name in &names {
        let _ = write!(t, "| {name} |");
        for g in &groups {
            let r = find(g, reference).map(|w| Stats::of(&w.ms, w.failed).median);
            match find(g, name) {
                Some(w) => {
                    let s = Stats::of(&w.ms, w.failed);
                    let ratio = r.map(|r| s.median / r).unwrap_or(f64::NAN);
                    let fail = if s.failed > 0 {
                        format!(" ({} failed)", s.failed)
                    } else {
                        String::new()
                    };
                    let _ = write!(t, " {:.1}{fail} | {:.2} |", s.median, ratio);
                }
                None => t.push_str(" — | — |"),
            }
        }
        t.push('\n');
    }
    t.push_str("\n| size | way | median | mean | σ | min | runs | failed |\n|---|---|---|---|---|---|---|---|\n");
    for w in &ways {
        let s = Stats::of(&w.ms, w.failed);
        let _ = writeln!(
            t,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            w.group, w.name, s.median, s.mean, s.sd, s.min, s.n, s.failed
        );
    }
    write!(std::io::stdout(), "{t}")?;
    if let Some(md) = md {
        std::fs::write(&md, &t).with_context(|| format!("cannot write {}", md.display()))?;
    }
    Ok(())
}

fn throughput(callers: u32, jobs: u64, log: Option<&Path>, argv: &[String]) -> Result<()> {
    let scratch = scratch_dir()?;
    let next = AtomicU64::new(0);
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let lines = Mutex::new(String::new());
    let t0 = monotonic_ns();
    std::thread::scope(|s| {
        for _ in 0..callers {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < jobs {
                    let start = monotonic_ns();
                    let (good, _, out) = match run_once(argv, scratch.path()) {
                        Ok(r) => r,
                        Err(e) => {
                            eprintln!("bench: {e:#}");
                            (false, 0.0, None)
                        }
                    };
                    let end = monotonic_ns();
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(out) = out {
                        let _ = std::fs::remove_file(out);
                    }
                    if let Ok(mut l) = lines.lock() {
                        l.push_str(
                            &Call {
                                name: "JOB".to_owned(),
                                pid: std::process::id(),
                                start,
                                busy: start,
                                end,
                                rv: u64::from(!good),
                                query: false,
                            }
                            .line(),
                        );
                    }
                }
            });
        }
    });
    let wall = (monotonic_ns() - t0) as f64 / 1e9;
    let ok = ok.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    writeln!(
        std::io::stdout(),
        "callers={callers} jobs={jobs} ok={ok} failed={failed} wall_s={wall:.3} jobs_per_s={:.2}",
        ok as f64 / wall
    )?;
    if let Some(log) = log {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot append to {}", log.display()))?;
        f.write_all(
            lines
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default()
                .as_bytes(),
        )?;
    }
    Ok(())
}

//! `signet sign`: one file at a time, streamed both ways.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{header, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use signet_protocol::client::{self, ClientError};
use signet_protocol::format;
use signet_protocol::wire::{exit, ErrorBody, ErrorCode, SignQuery, SIGN_PATH};
use signet_protocol::Endpoint;
use tokio::io::AsyncWriteExt;

use crate::config::ClientConfig;

/// How long an upload runs before a progress bar appears.
const PROGRESS_AFTER: Duration = Duration::from_millis(300);

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Signing profile [default: from the config file, else the appliance's default].
    #[arg(long, short)]
    profile: Option<String>,
    /// Write the signed file here instead of replacing the input (one input file only).
    #[arg(long, short, value_name = "PATH")]
    output: Option<PathBuf>,
    /// Description embedded in the signature (signtool /d).
    #[arg(long, short)]
    description: Option<String>,
    /// URL embedded in the signature (signtool /du).
    #[arg(long, short)]
    url: Option<String>,
    /// Print one JSON object per file on stdout instead of a line of text.
    #[arg(long)]
    json: bool,
    /// Files to sign: Windows PE files (EXE, DLL, SYS), MSI packages, CAB archives,
    /// security catalogs (CAT) and PowerShell scripts (.ps1, .psm1, .psd1, .ps1xml,
    /// .psc1, .cdxml). The format is told from the content; a script's name counts too.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// What happened to one file.
#[derive(Debug, serde::Serialize)]
struct Outcome {
    file: PathBuf,
    signed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
    seconds: f64,
    exit_code: i32,
}

pub async fn run(endpoint: &Endpoint, args: SignArgs, cfg: &ClientConfig) -> i32 {
    if args.output.is_some() && args.files.len() > 1 {
        eprintln!(
            "signet: --output takes one input file; sign several files in place, or one at a time"
        );
        return exit::USAGE;
    }
    let profile = args.profile.clone().or_else(|| cfg.profile.clone());
    let mut first_failure = exit::SIGNED;
    for file in &args.files {
        let target = args.output.clone().unwrap_or_else(|| file.clone());
        let outcome = sign_one(endpoint, file, &target, profile.as_deref(), &args).await;
        report(&outcome, args.json);
        if outcome.exit_code != exit::SIGNED {
            if first_failure == exit::SIGNED {
                first_failure = outcome.exit_code;
            }
            // The same refusal or outage would meet every other file too.
            if matches!(outcome.exit_code, exit::REFUSED | exit::UNAVAILABLE) {
                break;
            }
        }
    }
    first_failure
}

fn report(o: &Outcome, json: bool) {
    if json {
        println!("{}", serde_json::to_string(o).unwrap_or_default());
    } else if o.signed {
        let out = o.output.as_ref().filter(|p| **p != o.file);
        eprintln!(
            "signet: signed {}{} ({}, {:.2} s{})",
            o.file.display(),
            out.map(|p| format!(" -> {}", p.display()))
                .unwrap_or_default(),
            human(o.bytes_received),
            o.seconds,
            o.job
                .as_ref()
                .map(|j| format!(", job {j}"))
                .unwrap_or_default()
        );
    } else {
        eprintln!(
            "signet: {}: {}",
            o.file.display(),
            o.message.as_deref().unwrap_or("failed")
        );
    }
}

async fn sign_one(
    endpoint: &Endpoint,
    file: &Path,
    target: &Path,
    profile: Option<&str>,
    args: &SignArgs,
) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        file: file.to_owned(),
        signed: false,
        output: None,
        job: None,
        code: None,
        message: None,
        bytes_sent: 0,
        bytes_received: 0,
        seconds: 0.0,
        exit_code: exit::SIGNED,
    };
    let result = sign_inner(endpoint, file, target, profile, args, &mut outcome).await;
    outcome.seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            outcome.signed = true;
            outcome.output = Some(target.to_owned());
        }
        Err(Failure {
            code,
            exit_code,
            message,
        }) => {
            outcome.code = code;
            outcome.message = Some(message);
            outcome.exit_code = exit_code;
        }
    }
    outcome
}

struct Failure {
    code: Option<ErrorCode>,
    exit_code: i32,
    message: String,
}

impl From<ErrorBody> for Failure {
    fn from(e: ErrorBody) -> Self {
        Failure {
            code: Some(e.code),
            exit_code: e.code.exit_code(),
            message: e.message,
        }
    }
}

fn bad_input(message: String) -> Failure {
    Failure {
        code: None,
        exit_code: exit::BAD_INPUT,
        message,
    }
}

fn unavailable(message: String) -> Failure {
    Failure {
        code: None,
        exit_code: exit::UNAVAILABLE,
        message,
    }
}

async fn sign_inner(
    endpoint: &Endpoint,
    file: &Path,
    target: &Path,
    profile: Option<&str>,
    args: &SignArgs,
    outcome: &mut Outcome,
) -> Result<(), Failure> {
    // Local checks first: a bad file never costs an upload. The appliance checks the
    // same way, from the content (and for text, the name).
    let filename = file.file_name().map(|n| n.to_string_lossy().into_owned());
    let local = std::fs::File::open(file).map_err(|e| bad_input(format!("cannot open it: {e}")))?;
    let meta = local
        .metadata()
        .map_err(|e| bad_input(format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(bad_input("not a regular file".to_owned()));
    }
    let size = meta.len();
    format::detect(&local, filename.as_deref()).map_err(|e| bad_input(e.to_string()))?;
    // The body is the whole file from its first byte.
    let input = tokio::fs::File::from_std(local);

    let query = SignQuery {
        profile: profile.map(str::to_owned),
        filename,
        description: args.description.clone(),
        url: args.url.clone(),
    };
    let qs = serde_urlencoded::to_string(&query)
        .map_err(|e| unavailable(format!("cannot encode the request: {e}")))?;

    let progress = Progress::start(file, size);
    let counter = progress.bar.clone();
    let body = StreamBody::new(
        tokio_util::io::ReaderStream::with_capacity(input, 256 << 10).map_ok(
            move |chunk: Bytes| {
                counter.inc(chunk.len() as u64);
                if counter.position() >= counter.length().unwrap_or(u64::MAX) {
                    counter.set_message("signing on the token");
                }
                Frame::data(chunk)
            },
        ),
    );
    let req = Request::post(format!("{SIGN_PATH}?{qs}"))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .body(body)
        .map_err(|e| unavailable(format!("cannot build the request: {e}")))?;

    let resp = client::send(endpoint, req).await;
    outcome.bytes_sent = progress.bar.position();
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            progress.finish();
            return Err(unavailable(unreachable_message(endpoint, &e)));
        }
    };
    outcome.job = resp
        .headers()
        .get("x-signet-job")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if !resp.status().is_success() {
        progress.finish();
        return Err(client::error_body(endpoint, resp).await.into());
    }

    // Write next to the target and rename over it: a failure never leaves half a file.
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".signet-")
        .tempfile_in(&dir)
        .map_err(|e| bad_input(format!("cannot write next to {}: {e}", target.display())))?;
    let (std_file, tmp_path) = tmp.into_parts();
    let mut out = tokio::fs::File::from_std(std_file);
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            progress.finish();
            unavailable(format!(
                "the connection to {endpoint} broke while receiving the signed file: {e}"
            ))
        })?;
        if let Ok(data) = frame.into_data() {
            outcome.bytes_received += data.len() as u64;
            out.write_all(&data)
                .await
                .map_err(|e| bad_input(format!("cannot write the signed file: {e}")))?;
        }
    }
    progress.finish();
    out.sync_all()
        .await
        .map_err(|e| bad_input(format!("cannot write the signed file: {e}")))?;
    drop(out);
    let perms = tokio::fs::metadata(target)
        .await
        .map(|m| m.permissions())
        .unwrap_or(meta.permissions());
    let _ = tokio::fs::set_permissions(&tmp_path, perms).await;
    tmp_path
        .persist(target)
        .map_err(|e| bad_input(format!("cannot replace {}: {}", target.display(), e.error)))?;
    Ok(())
}

/// The message for a daemon that cannot be reached, with the fix.
pub fn unreachable_message(endpoint: &Endpoint, e: &ClientError) -> String {
    let hint = match endpoint {
        Endpoint::Vsock { .. } => "is signetd running on the host, and does this VM have a vsock device (args: -device vhost-vsock-pci,guest-cid=<VMID>)? Choose another endpoint with --endpoint or SIGNET_ENDPOINT",
        _ => "is signetd running there? Choose another endpoint with --endpoint or SIGNET_ENDPOINT",
    };
    format!("cannot reach the Signet daemon at {endpoint} ({e}); {hint}")
}

/// An upload progress bar that appears only on a terminal and only when the upload
/// takes more than a moment.
struct Progress {
    bar: ProgressBar,
    timer: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(file: &Path, size: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let timer = std::io::stderr().is_terminal().then(|| {
            let bar = bar.clone();
            tokio::spawn(async move {
                tokio::time::sleep(PROGRESS_AFTER).await;
                bar.set_draw_target(ProgressDrawTarget::stderr());
                bar.enable_steady_tick(Duration::from_millis(200));
            })
        });
        Progress { bar, timer }
    }

    fn finish(&self) {
        if let Some(t) = &self.timer {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

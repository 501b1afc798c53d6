//! `signet sign`: one file per request, or many in one batch request; streamed both
//! ways, results written next to their targets and renamed into place.

use signet_protocol::writeback::WriteBehind;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{header, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::Digest;
use signet_api::wire::{
    exit, osslsigncode, patch, DaemonStatus, ErrorBody, ErrorCode, ProfileOptions, ProfileQuery,
    SignMode, SignQuery, BATCH_PATH, INPUT_SHA256_HEADER, PROFILE_HEADER, PROFILE_PATH,
    RESULT_LENGTH_HEADER, SIGN_PATH, STATUS_PATH,
};
use signet_format as format;
use signet_protocol::batch;
use signet_protocol::client::{self, ClientError};
use signet_protocol::{Endpoint, IO_BLOCK};

use crate::cache;
use crate::collect;
use crate::config::ClientConfig;
use crate::native;

/// How long an upload runs before a progress bar appears; `SIGNET_PROGRESS_AFTER_MS`
/// changes it (0: at once).
const PROGRESS_AFTER: Duration = Duration::from_millis(300);

fn progress_after() -> Duration {
    env_ms("SIGNET_PROGRESS_AFTER_MS").unwrap_or(PROGRESS_AFTER)
}

/// How often the progress line asks the appliance what a sent job waits for;
/// `SIGNET_STATUS_EVERY_MS` changes it.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How long one of those questions may take.
const STATUS_LIMIT: Duration = Duration::from_secs(6);

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

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
    /// On stdout, one JSON object per file (json: one line each; json-pretty); the
    /// text goes to stderr.
    #[command(flatten)]
    format: signet_api::output::OutputArgs,
    /// Digest mode: send only the file's Authenticode data (a few hundred bytes,
    /// whatever the file's size) and attach the returned signature here, as the
    /// profile signs (hash, page hashes, nested). PE files need nothing more; MSI, CAB
    /// and PowerShell files need osslsigncode 2.8 or later on this machine; catalogs
    /// (CAT) are signed without it.
    #[arg(long)]
    digest: bool,
    /// CA certificate(s) the attached signature is verified against in digest mode: a
    /// signature that does not chain to them is not attached (exit 5). Without it the
    /// system's trusted roots are tried, and a signature that does not chain to them is
    /// attached with a warning that it was not verified here.
    #[arg(long, value_name = "PEM", requires = "digest")]
    ca_file: Option<PathBuf>,
    /// The osslsigncode program used in digest mode for MSI, CAB and PowerShell files
    /// (PE files are done here without it).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "osslsigncode",
        env = "SIGNET_OSSLSIGNCODE"
    )]
    osslsigncode: PathBuf,
    /// How long to wait for an appliance that went away (restarting) before giving up:
    /// the job stays queued there and is collected when it is back, and the request is
    /// sent again with the same idempotency key, never signed twice.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 600,
        env = "SIGNET_RECONNECT_FOR"
    )]
    reconnect_for: u64,
    /// Files to sign: Windows PE files (EXE, DLL, SYS), MSI packages, CAB archives,
    /// security catalogs (CAT), PowerShell scripts (.ps1, .psm1, .psd1, .ps1xml,
    /// .psc1, .cdxml) and APPX/MSIX packages and bundles. The format is told from the
    /// content; a script's name counts too.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

impl SignArgs {
    /// What `signet signtool sign` asks for, the rest as `signet sign` defaults it
    /// (the environment's SIGNET_OSSLSIGNCODE and SIGNET_RECONNECT_FOR included).
    pub fn from_signtool(
        files: Vec<PathBuf>,
        profile: Option<String>,
        description: Option<String>,
        url: Option<String>,
        digest: bool,
    ) -> Self {
        SignArgs {
            profile,
            output: None,
            description,
            url,
            format: signet_api::output::OutputArgs::default(),
            digest,
            ca_file: None,
            osslsigncode: std::env::var_os("SIGNET_OSSLSIGNCODE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("osslsigncode")),
            reconnect_for: std::env::var("SIGNET_RECONNECT_FOR")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(600),
            files,
        }
    }
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
    /// Signed, with something the user should know (digest mode: the signature could
    /// not be verified here).
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
    /// The signed file's size, as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    output_bytes: Option<u64>,
    seconds: f64,
    exit_code: i32,
    /// The SHA-256 of the profile's answer as the daemon said it with the result.
    #[serde(skip)]
    profile_sha256: Option<String>,
}

pub async fn run(endpoint: &Endpoint, args: SignArgs, cfg: &ClientConfig) -> i32 {
    if args.output.is_some() && args.files.len() > 1 {
        eprintln!(
            "signet: --output takes one input file; sign several files in place, or one at a time"
        );
        return exit::USAGE;
    }
    let profile = args.profile.clone().or_else(|| cfg.profile.clone());
    let started = Instant::now();
    let mut outcomes: Vec<Outcome> = args.files.iter().map(|f| Outcome::new(f)).collect();

    // Local work first: a bad file never costs an upload, and never stops the others.
    // Digest mode signs as the profile says on this side too: it asks how, once a file
    // has passed its checks. One file may sign with the answer kept from an earlier
    // run ([`cache`]); its upload names the answer it was made with, a precondition the
    // daemon checks before anything is signed.
    let mut options: Option<Result<ProfileOptions, Failure>> = None;
    let cache_dir = cache::dir();
    let single = args.files.len() == 1;
    // The answer one file's data is made with, when the daemon vouched for it.
    let mut used: Option<cache::Kept> = None;
    let mut ready = Vec::new();
    for (i, file) in args.files.iter().enumerate() {
        let target = match &args.output {
            Some(out) => out.clone(),
            None => in_place_target(file),
        };
        let checked = match check_input(file).await {
            Ok(c) => c,
            Err(f) => {
                outcomes[i].failed(f);
                continue;
            }
        };
        let how = if args.digest {
            if options.is_none() {
                used = cache_dir
                    .as_deref()
                    .filter(|_| single)
                    .and_then(|d| cache::load(d, endpoint, profile.as_deref()));
                options =
                    Some(match &used {
                        Some(k) => Ok(k.options.clone()),
                        None => fetch_profile(endpoint, profile.as_deref()).await.map(
                            |(now, vouched)| {
                                let options = now.options.clone();
                                used = vouched.then_some(now).filter(|_| single);
                                options
                            },
                        ),
                    });
            }
            match &options {
                Some(Ok(o)) => Some(o),
                Some(Err(f)) => {
                    outcomes[i].failed(f.clone());
                    continue;
                }
                None => None,
            }
        } else {
            None
        };
        match prepare(file, &target, checked, how, &args).await {
            Ok(p) => ready.push((i, p)),
            Err(f) => outcomes[i].failed(f),
        }
    }
    let mode = if args.digest {
        SignMode::Digest
    } else {
        SignMode::Whole
    };
    let query = |file: &Path| SignQuery {
        profile: profile.clone(),
        filename: file.file_name().map(|n| n.to_string_lossy().into_owned()),
        description: args.description.clone(),
        url: args.url.clone(),
        mode,
        ..SignQuery::default()
    };
    if args.files.len() == 1 {
        if let Some((i, mut p)) = ready.pop() {
            let o = &mut outcomes[i];
            let mut asked_again = false;
            let result = loop {
                let sent = exchange(
                    endpoint,
                    &p,
                    &query(&p.file),
                    o,
                    Duration::from_secs(args.reconnect_for),
                    used.as_ref().map(|u| u.sha256.as_str()),
                )
                .await;
                let forget = || {
                    if let Some(d) = &cache_dir {
                        cache::forget(d, endpoint, profile.as_deref());
                    }
                };
                // Refused at intake (`profile_changed`): nothing was queued or signed.
                // Forget the answer, ask again, make the data as it says and send once
                // more; a second refusal is the run's error.
                if let Err(f) = &sent {
                    if f.code == Some(ErrorCode::ProfileChanged) && !asked_again {
                        asked_again = true;
                        forget();
                        let again = async {
                            let (now, vouched) =
                                fetch_profile(endpoint, profile.as_deref()).await?;
                            let checked = check_input(&p.file).await?;
                            let again =
                                prepare(&p.file, &p.target, checked, Some(&now.options), &args)
                                    .await?;
                            Ok::<_, Failure>((again, vouched.then_some(now)))
                        };
                        match again.await {
                            Ok((again, now)) => {
                                p = again;
                                used = now;
                                continue;
                            }
                            Err(f) => break Err(f),
                        }
                    }
                }
                // Another body under the key: the file's identity named other content
                // before. Keyed by its content now, sent once more.
                if let Err(f) = &sent {
                    if f.code == Some(ErrorCode::IdempotencyKeyReused) && keyed_by_identity(&p) {
                        match content_sha256(&p.file).await {
                            Ok(sha) => {
                                let _ = std::io::Write::write_all(
                                    &mut std::io::stderr().lock(),
                                    rekeyed(&p.file).as_bytes(),
                                );
                                p.content = sha;
                                continue;
                            }
                            Err(f) => break Err(f),
                        }
                    }
                }
                // Past intake the job was signed as the profile said there, which the
                // precondition held to the answer the data was made with: the result is
                // attached as that answer says (nested or not), whatever the result's
                // header says. Another header can only mean a reload between intake and
                // result (or a key that named a job taken before, over the same data, or
                // a daemon that checks no precondition): the kept answer is forgotten so
                // that the next run asks, and nothing is signed again.
                if let Some(u) = &used {
                    if sent.is_err() || o.profile_sha256.as_deref() != Some(u.sha256.as_str()) {
                        forget();
                    }
                }
                break match sent {
                    Ok(got) => finish(&p, got, &args).await.map(|w| o.warning = w),
                    Err(f) => Err(f),
                };
            };
            o.done(result, &p.target);
        }
    } else if !ready.is_empty() {
        batch(
            endpoint,
            &query(Path::new("")),
            &ready,
            &mut outcomes,
            &args,
        )
        .await;
    }

    let mut first_failure = exit::SIGNED;
    for o in &mut outcomes {
        if o.seconds == 0.0 {
            o.seconds = started.elapsed().as_secs_f64();
        }
        report(o, args.format);
        if o.exit_code != exit::SIGNED && first_failure == exit::SIGNED {
            first_failure = o.exit_code;
        }
    }
    first_failure
}

impl Outcome {
    fn new(file: &Path) -> Self {
        Outcome {
            file: file.to_owned(),
            signed: false,
            output: None,
            job: None,
            code: None,
            message: None,
            warning: None,
            bytes_sent: 0,
            bytes_received: 0,
            output_bytes: None,
            seconds: 0.0,
            exit_code: exit::SIGNED,
            profile_sha256: None,
        }
    }

    fn failed(&mut self, f: Failure) {
        self.code = f.code;
        self.message = Some(f.message);
        self.exit_code = f.exit_code;
    }

    fn done(&mut self, result: Result<(), Failure>, target: &Path) {
        match result {
            Ok(()) => {
                self.signed = true;
                self.output = Some(target.to_owned());
                self.output_bytes = std::fs::metadata(target).ok().map(|m| m.len());
            }
            Err(f) => self.failed(f),
        }
    }
}

fn report(o: &Outcome, format: signet_api::output::OutputArgs) {
    if format.is_json() {
        signet_api::output::write_stdout_bytes(format!("{}\n", format.to_json(o)).as_bytes());
        return;
    }
    // Made whole first, then written at once: one write(2), not one per piece.
    let text = if o.signed {
        let out = o.output.as_ref().filter(|p| **p != o.file);
        let mut text = format!(
            "signet: signed {}{} ({}, {:.2} s{})\n",
            o.file.display(),
            out.map(|p| format!(" -> {}", p.display()))
                .unwrap_or_default(),
            human(o.output_bytes.unwrap_or(o.bytes_received)),
            o.seconds,
            o.job
                .as_ref()
                .map(|j| format!(", job {j}"))
                .unwrap_or_default()
        );
        if let Some(w) = &o.warning {
            text.push_str(&format!("signet: {}: {w}\n", o.file.display()));
        }
        text
    } else {
        format!(
            "signet: {}: {}\n",
            o.file.display(),
            o.message.as_deref().unwrap_or("failed")
        )
    };
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
}

/// Where signing `file` in place writes: the file itself, or for a symbolic link the
/// file it points to (the link stays a link).
fn in_place_target(file: &Path) -> PathBuf {
    match std::fs::symlink_metadata(file) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(file).unwrap_or_else(|_| file.to_owned())
        }
        _ => file.to_owned(),
    }
}

/// The message for an appliance that went away and did not come back in time.
fn gone_message(endpoint: &Endpoint, job: Option<&str>, e: &ClientError) -> String {
    match job {
        Some(id) => format!(
            "the Signet daemon at {endpoint} went away and did not come back in time ({e}); job {id} stays queued there: run the same command again to collect it (it is not signed twice), or wait longer with --reconnect-for SECONDS"
        ),
        None => unreachable_message(endpoint, e),
    }
}

/// Why one file was not signed, and the exit code that says so.
#[derive(Clone)]
pub(crate) struct Failure {
    code: Option<ErrorCode>,
    pub(crate) exit_code: i32,
    pub(crate) message: String,
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

/// A file checked and ready to go, and what is uploaded for it. Results are written
/// next to the target (so they are renamed into place on one filesystem).
struct Prepared {
    file: PathBuf,
    target: PathBuf,
    meta: std::fs::Metadata,
    format: format::Format,
    /// Digest mode: attach the signature beside the one the file has (`-nest`).
    nest: bool,
    /// The file itself, or its Authenticode data in digest mode (held in memory).
    upload: Upload,
    /// What the idempotency key names of the file's content, hex: digest mode, the
    /// SHA-256 of the data sent and of what it leaves out of the file.
    content: String,
    /// Digest mode through osslsigncode (formats other than PE): its work dir.
    work: Option<tempfile::TempDir>,
    /// Digest mode: the CAs the signature's chain is checked against (`--ca-file`),
    /// else this machine's roots.
    ca_file: Option<PathBuf>,
}

/// What is uploaded for a file.
enum Upload {
    /// The file, streamed from disk.
    File(PathBuf),
    /// Digest mode's data, small and bounded ([`native::MAX_BLOB`]).
    Data(Bytes),
}

/// What came back for a file.
enum Got {
    /// Digest mode: the signature, in memory (at most [`native::MAX_SIGNATURE`]).
    Signature(Vec<u8>),
    /// A whole signed file, written (fsync'd) next to its target.
    File(tempfile::NamedTempFile),
    /// Digest mode, a PE: the signature attached, the signed file checked and written
    /// (fsync'd) next to its target ([`attach_pe`]), with a warning when its chain is
    /// not trusted here.
    Attached(tempfile::NamedTempFile, Option<String>),
}

impl Prepared {
    /// The directory the result is written in: the target's.
    fn dir(&self) -> &Path {
        match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    fn digest(&self) -> bool {
        matches!(self.upload, Upload::Data(_))
    }

    /// A file next to the target a whole signed file is received into: private (0600)
    /// until its permissions are set, removed unless it is renamed over the target.
    fn receiver(&self) -> Result<tempfile::NamedTempFile, Failure> {
        tempfile::Builder::new()
            .prefix(".signet-")
            .tempfile_in(self.dir())
            .map_err(|e| {
                bad_input(format!(
                    "cannot write next to {}: {e}",
                    self.target.display()
                ))
            })
    }
}

/// How the profile signs (`GET /v1/profile`), which digest mode applies here.
pub(crate) async fn profile_options(
    endpoint: &Endpoint,
    profile: Option<&str>,
) -> Result<ProfileOptions, Failure> {
    fetch_profile(endpoint, profile)
        .await
        .map(|(k, _)| k.options)
}

/// `GET /v1/profile`, and whether the daemon vouched for the answer: said its SHA-256
/// (`x-signet-profile`), the same as that of the bytes received. Such an answer is kept
/// for the next runs ([`cache`]) and named as the precondition of an upload made with it.
async fn fetch_profile(
    endpoint: &Endpoint,
    profile: Option<&str>,
) -> Result<(cache::Kept, bool), Failure> {
    let query = ProfileQuery {
        profile: profile.map(str::to_owned),
    };
    let qs = serde_urlencoded::to_string(&query)
        .map_err(|e| unavailable(format!("cannot encode the request: {e}")))?;
    let got = async {
        let req = Request::get(format!("{PROFILE_PATH}?{qs}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| ClientError::Protocol {
                endpoint: endpoint.clone(),
                detail: e.to_string(),
            })?;
        let resp = client::send(endpoint, req).await?;
        if !resp.status().is_success() {
            return Ok(Err(client::error_body(endpoint, resp).await));
        }
        let said = resp
            .headers()
            .get(PROFILE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| ClientError::Protocol {
                endpoint: endpoint.clone(),
                detail: format!("reading the answer failed: {e}"),
            })?
            .to_bytes();
        let Some(kept) = cache::read(&body) else {
            return Err(ClientError::Protocol {
                endpoint: endpoint.clone(),
                detail: "undecodable JSON".to_owned(),
            });
        };
        let vouched = said.as_deref() == Some(&kept.sha256);
        if let Some(dir) = cache::dir() {
            if vouched {
                cache::store(&dir, endpoint, profile, &body);
            } else {
                cache::forget(&dir, endpoint, profile);
            }
        }
        Ok(Ok((kept, vouched)))
    };
    match got.await {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) if e.code == ErrorCode::BadRequest => Err(Failure {
            code: Some(e.code),
            exit_code: exit::USAGE,
            message: format!(
                "digest mode needs the profile's options from the appliance, and it answered: {}; a signetd older than this client lacks GET {PROFILE_PATH}: update signetd, or sign without --digest",
                e.message
            ),
        }),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(unavailable(unreachable_message(endpoint, &e))),
    }
}

/// The `osslsigncode extract-data` arguments that make the data `profile` signs, for
/// a file of `format` (page hashes exist in PE files only). Pure.
fn extract_args(profile: &ProfileOptions, format: format::Format) -> Vec<&'static str> {
    let mut a = vec!["extract-data", "-h", profile.hash.as_str()];
    if profile.page_hashes && format == format::Format::Pe {
        a.push("-ph");
    }
    a.push("-in");
    a
}

/// Makes a checked file ready to send: in digest mode, extracts its data as `profile`
/// signs, in memory.
async fn prepare(
    file: &Path,
    target: &Path,
    (meta, detected): (std::fs::Metadata, format::Format),
    profile: Option<&ProfileOptions>,
    args: &SignArgs,
) -> Result<Prepared, Failure> {
    let mut p = Prepared {
        file: file.to_owned(),
        target: target.to_owned(),
        meta,
        format: detected,
        nest: false,
        upload: Upload::File(file.to_owned()),
        content: String::new(),
        work: None,
        ca_file: args.ca_file.clone(),
    };
    let Some(profile) = profile else {
        // Whole: the key names the file's identity; nothing is read before the upload.
        p.content = match collect::file_identity(&p.meta) {
            Some(id) => id,
            None => content_sha256(file).await?,
        };
        return Ok(p);
    };
    if detected == format::Format::Cat {
        return Err(Failure {
            code: None,
            exit_code: exit::USAGE,
            message: "digest mode cannot sign a security catalog: osslsigncode extracts no Authenticode data from one. Sign it without --digest (catalogs are small)".to_owned(),
        });
    }
    let extracted = if detected == format::Format::Pe {
        // PE files: the engine, no osslsigncode; a small file here, a large one in
        // one trip to a blocking thread. The roots its signature is checked against
        // are read meanwhile.
        if args.ca_file.is_none() {
            native::preload_roots();
        }
        let (hash, ph) = (profile.hash.as_str(), profile.page_hashes);
        if p.meta.len() <= native::INLINE {
            native::extract(file, hash, ph)
        } else {
            let file = file.to_owned();
            tokio::task::spawn_blocking(move || native::extract(&file, hash, ph))
                .await
                .unwrap_or_else(|e| Err(format!("the extraction stopped: {e}")))
        }
        .map(|(blob, rest)| (blob, signet_api::hex::lower(&rest)))
    } else {
        // Other formats: osslsigncode writes the data to a file of a work dir next to
        // the target, where its attach-signature writes the signed file later; the key
        // covers the whole file (what the data leaves out of it is not known here).
        let work = tempfile::Builder::new()
            .prefix(".signet-")
            .tempdir_in(p.dir())
            .map_err(|e| bad_input(format!("cannot write next to {}: {e}", target.display())))?;
        let data = work.path().join("data.p7");
        p.work = Some(work);
        let whole = collect::file_sha256(file)
            .await
            .map_err(|e| bad_input(format!("cannot read it: {e}")))?;
        match osslsigncode(
            &args.osslsigncode,
            &extract_args(profile, detected),
            file,
            &data,
        )
        .await
        {
            Ok(()) => read_capped(&data, native::MAX_BLOB)
                .await
                .map(|blob| (blob, whole)),
            Err(e) => Err(e.summary),
        }
    };
    let (blob, rest) = extracted.map_err(|e| Failure {
        code: None,
        exit_code: exit::USAGE,
        message: format!("digest mode cannot extract the file's Authenticode data: {e}"),
    })?;
    p.content = format!(
        "{}+{rest}",
        signet_api::hex::lower(&sha2::Sha256::digest(&blob))
    );
    p.upload = Upload::Data(Bytes::from(blob));
    p.nest = profile.nested;
    Ok(p)
}

/// The SHA-256 (hex) of a file sent whole, for its key.
async fn content_sha256(file: &Path) -> Result<String, Failure> {
    collect::file_sha256(file)
        .await
        .map_err(|e| bad_input(format!("cannot read it: {e}")))
}

/// Whether `p` is keyed by its identity ([`collect::file_identity`]).
fn keyed_by_identity(p: &Prepared) -> bool {
    p.content.starts_with("id:")
}

/// The note for a request sent once more keyed by its content.
fn rekeyed(file: &Path) -> String {
    format!(
        "signet: {}: the appliance knows this file's identity key from other content (the file was rewritten within one tick of its clock); sending it again keyed by its content\n",
        file.display()
    )
}

/// Reads `path`, refused beyond `cap` bytes.
async fn read_capped(path: &Path, cap: usize) -> Result<Vec<u8>, String> {
    let len = tokio::fs::metadata(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if len > cap as u64 {
        return Err(format!(
            "the Authenticode data is {} MiB, more than digest mode sends ({} MiB); sign it without --digest",
            len >> 20,
            cap >> 20
        ));
    }
    tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Turns what came back into the signed target: attaches the signature in digest
/// mode, then renames the result over the target. Answers a warning for a file that is
/// signed but could not be verified here.
async fn finish(p: &Prepared, got: Got, args: &SignArgs) -> Result<Option<String>, Failure> {
    let signature = match got {
        Got::File(signed) => {
            // A whole signed file, received and fsync'd: it takes the target's place
            // with the target's permissions.
            let perms = std::fs::metadata(&p.target)
                .map(|m| m.permissions())
                .unwrap_or(p.meta.permissions());
            let _ = signed.as_file().set_permissions(perms);
            signed.persist(&p.target).map_err(|e| {
                bad_input(format!(
                    "cannot replace {}: {}",
                    p.target.display(),
                    e.error
                ))
            })?;
            return Ok(None);
        }
        Got::Attached(signed, untrusted) => {
            native::place(signed, &p.target).map_err(|e| attach_error(e, p))?;
            return Ok(untrusted);
        }
        Got::Signature(s) => s,
    };
    if p.format == format::Format::Pe {
        let (signed, untrusted) = attach_pe(p, signature).await?;
        native::place(signed, &p.target).map_err(|e| attach_error(e, p))?;
        return Ok(untrusted);
    }
    // Other formats through osslsigncode, in the work dir the data was extracted in.
    let Some(work) = &p.work else {
        return Err(bad_input("digest mode lost its work dir".to_owned()));
    };
    let mut warning = None;
    let received = work.path().join("received");
    tokio::fs::write(&received, &signature)
        .await
        .map_err(|e| bad_input(format!("cannot write the signature received: {e}")))?;
    // Named as the file is: osslsigncode knows a script's kind by its extension.
    let signed = work
        .path()
        .join(p.file.file_name().unwrap_or("signed".as_ref()));
    let attach = |nest: bool| {
        let mut a: Vec<&std::ffi::OsStr> = vec!["attach-signature".as_ref()];
        a.push("-sigin".as_ref());
        a.push(received.as_os_str());
        if let Some(ca) = &args.ca_file {
            a.push("-CAfile".as_ref());
            a.push(ca.as_os_str());
        }
        if nest {
            a.push("-nest".as_ref());
        }
        a.push("-in".as_ref());
        a
    };
    let mut run = osslsigncode(&args.osslsigncode, &attach(p.nest), &p.file, &signed).await;
    if p.nest
        && run
            .as_ref()
            .is_err_and(|e| e.output.contains("Unable to extract existing signature"))
    {
        // A file without a signature is signed plainly, as the agent does.
        let _ = tokio::fs::remove_file(&signed).await;
        run = osslsigncode(&args.osslsigncode, &attach(false), &p.file, &signed).await;
    }
    if let Err(e) = run {
        match attach_verdict(&e.output) {
            AttachVerdict::Untrusted(why)
                if args.ca_file.is_none() && tokio::fs::metadata(&signed).await.is_ok() =>
            {
                warning = Some(untrusted_warning(&why));
            }
            verdict => {
                return Err(Failure {
                    code: Some(ErrorCode::SigningFailed),
                    exit_code: exit::SIGNING_FAILED,
                    message: attach_failure(
                        &verdict,
                        args.ca_file.as_deref(),
                        &format!("osslsigncode: {}", e.summary),
                    ),
                })
            }
        }
    }
    let perms = tokio::fs::metadata(&p.target)
        .await
        .map(|m| m.permissions())
        .unwrap_or(p.meta.permissions());
    let cannot = |e: std::io::Error| bad_input(format!("cannot write the signed file: {e}"));
    let out = tokio::fs::File::open(&signed).await.map_err(cannot)?;
    out.set_permissions(perms).await.map_err(cannot)?;
    out.sync_all().await.map_err(cannot)?;
    tokio::fs::rename(&signed, &p.target)
        .await
        .map_err(|e| bad_input(format!("cannot replace {}: {e}", p.target.display())))?;
    Ok(warning)
}

/// Attaches digest mode's `signature` to the PE `p.file` ([`native::attach_beside`]): the
/// signed file checked, written next to the target with the target's permissions and
/// fsync'd, and a warning when its chain is not trusted here; a small file here, a large
/// one in one trip to a blocking thread. Its rename is left ([`native::place`]).
async fn attach_pe(
    p: &Prepared,
    signature: Vec<u8>,
) -> Result<(tempfile::NamedTempFile, Option<String>), Failure> {
    let (file, target, nest, ca_file) =
        (p.file.clone(), p.target.clone(), p.nest, p.ca_file.clone());
    let fallback = p.meta.permissions();
    let attach = move || {
        let permissions = std::fs::metadata(&target)
            .map(|m| m.permissions())
            .unwrap_or(fallback);
        native::attach_beside(
            &file,
            &signature,
            nest,
            native::Destination {
                target: &target,
                permissions,
            },
            ca_file.as_deref(),
        )
    };
    let attached = if p.meta.len() <= native::INLINE {
        attach()
    } else {
        tokio::task::spawn_blocking(attach)
            .await
            .unwrap_or_else(|e| {
                Err(native::AttachError::Other(format!(
                    "attaching stopped: {e}"
                )))
            })
    };
    match attached {
        Ok((signed, untrusted)) => Ok((signed, untrusted.map(|why| untrusted_warning(&why)))),
        Err(e) => Err(attach_error(e, p)),
    }
}

/// Why digest mode's signature was not attached, as the failure the user reads.
fn attach_error(e: native::AttachError, p: &Prepared) -> Failure {
    let (verdict, detail) = match e {
        native::AttachError::Mismatch(e) => (AttachVerdict::Mismatch, e),
        native::AttachError::Untrusted(why) => (AttachVerdict::Untrusted(why), String::new()),
        native::AttachError::Other(e) => (AttachVerdict::Other, e),
    };
    Failure {
        code: Some(ErrorCode::SigningFailed),
        exit_code: exit::SIGNING_FAILED,
        message: attach_failure(&verdict, p.ca_file.as_deref(), &detail),
    }
}

/// What `osslsigncode attach-signature` found when it verified the attached signature
/// and failed.
#[derive(Debug, PartialEq, Eq)]
enum AttachVerdict {
    /// The signature matches the file (every digest it checked is the one it
    /// calculated) and only its certificate chain did not verify: `why`.
    Untrusted(String),
    /// A digest differs: the signature is not the file's.
    Mismatch,
    /// Anything else.
    Other,
}

/// Reads attach-signature's output (pure). osslsigncode 2.9 prints, per signature,
/// "Current message digest" / "Calculated message digest" (MSI: "... DigitalSignature")
/// with "MISMATCH!!!" after a calculated one that differs, then the chain's
/// verification with "Error: <reason>".
fn attach_verdict(output: &str) -> AttachVerdict {
    let lines: Vec<&str> = output.lines().map(str::trim).collect();
    if lines.iter().any(|l| l.contains("MISMATCH")) {
        return AttachVerdict::Mismatch;
    }
    let compared = lines.iter().any(|l| l.starts_with("Current "))
        && lines.iter().any(|l| l.starts_with("Calculated "));
    let chain = lines
        .iter()
        .find_map(|l| l.strip_prefix("Error: "))
        .filter(|_| {
            lines
                .iter()
                .any(|l| l.contains("certificate chain") || l.contains("PKCS7_verify"))
        });
    match (compared, chain) {
        (true, Some(why)) => AttachVerdict::Untrusted(why.to_owned()),
        _ => AttachVerdict::Other,
    }
}

fn untrusted_warning(why: &str) -> String {
    format!(
        "signed, and the signature matches the file, but it was not verified here: its certificate does not chain to this machine's trusted roots ({why}). Pass the CA that issued it with --ca-file to check it here; Windows checks it against its own roots"
    )
}

/// The message for a signature that was not attached; `detail`: what the attaching
/// tool said, named (e.g. "osslsigncode: ...").
fn attach_failure(verdict: &AttachVerdict, ca_file: Option<&Path>, detail: &str) -> String {
    match (verdict, ca_file) {
        (AttachVerdict::Mismatch, _) => format!(
            "the appliance signed, but the signature it sent does not match this file, so it was not attached and the file is untouched; sign it again, or without --digest ({detail})"
        ),
        (AttachVerdict::Untrusted(why), Some(ca)) => format!(
            "the appliance signed, but the signature's certificate does not chain to the CA in {} ({why}), so it was not attached and the file is untouched; pass the CA that issued the signing certificate with --ca-file",
            ca.display()
        ),
        _ => format!(
            "the appliance signed, but attaching the signature failed and the file is untouched ({detail})"
        ),
    }
}

/// Sends every prepared file in one request; the appliance signs them in order under
/// one hold of the token and answers one part per file.
async fn batch(
    endpoint: &Endpoint,
    query: &SignQuery,
    ready: &[(usize, Prepared)],
    outcomes: &mut [Outcome],
    args: &SignArgs,
) {
    let started = Instant::now();
    let mut query = query.clone();
    query.filename = None;
    let fail_all = |outcomes: &mut [Outcome], f: &Failure| {
        for (i, _) in ready {
            if outcomes[*i].message.is_none() && !outcomes[*i].signed {
                outcomes[*i].failed(Failure {
                    code: f.code,
                    exit_code: f.exit_code,
                    message: f.message.clone(),
                });
            }
        }
    };
    let mut total = 0;
    let mut parts = Vec::new();
    for (i, p) in ready {
        let (size, body) = match &p.upload {
            Upload::File(path) => (
                tokio::fs::metadata(path)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0),
                batch::PartBody::File(path.clone()),
            ),
            Upload::Data(data) => (data.len() as u64, batch::PartBody::Bytes(data.clone())),
        };
        outcomes[*i].bytes_sent = size;
        total += size;
        parts.push(batch::Part {
            filename: p
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            headers: Vec::new(),
            content_type: "application/octet-stream",
            body,
        });
    }
    let qs = match serde_urlencoded::to_string(&query) {
        Ok(q) => q,
        Err(e) => {
            return fail_all(
                outcomes,
                &unavailable(format!("cannot encode the request: {e}")),
            )
        }
    };
    let names: Vec<String> = ready
        .iter()
        .map(|(_, p)| {
            p.file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let mut contents: Vec<String> = ready.iter().map(|(_, p)| p.content.clone()).collect();
    let label = format!("{} files", ready.len());
    let (answer, job, progress) = loop {
        let hashed: Vec<(String, String)> = names
            .iter()
            .cloned()
            .zip(contents.iter().cloned())
            .collect();
        let key = collect::idempotency_key("batch", &query, &hashed);
        // The body is the same bytes each time it is sent: the appliance binds the key
        // to the body's SHA-256.
        let boundary = format!("signet-{}", &key[key.len() - 32..]);
        let mut progress = Progress::start(Path::new(&label), total);
        progress.watch_waiting(endpoint);
        let counter = progress.bar.clone();
        let uri = format!("{BATCH_PATH}?{qs}");
        let parts = parts.clone();
        let make = move || {
            counter.set_position(0);
            let counter = counter.clone();
            let body = StreamBody::new(batch::body(boundary.clone(), parts.clone()).map_ok(
                move |chunk: Bytes| {
                    counter.inc(chunk.len() as u64);
                    Frame::data(chunk)
                },
            ));
            let mut req = Request::new(body);
            *req.method_mut() = http::Method::POST;
            *req.uri_mut() = uri.parse().unwrap_or_default();
            if let Ok(v) = header::HeaderValue::from_str(&batch::content_type(&boundary)) {
                req.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            req
        };
        let mut collector = collect::Collector::new(
            endpoint,
            key,
            label.clone(),
            progress.bar.clone(),
            Duration::from_secs(args.reconnect_for),
        );
        let answer = collector.run(make).await;
        // Another body under the key: a file's identity named other content before.
        // Keyed by the files' contents now, sent once more.
        let reused = matches!(&answer, Ok(collect::Answer::Error(e)) if e.code == ErrorCode::IdempotencyKeyReused);
        if reused && contents.iter().any(|c| c.starts_with("id:")) {
            progress.finish();
            for ((_, p), content) in ready.iter().zip(contents.iter_mut()) {
                if content.starts_with("id:") {
                    match content_sha256(&p.file).await {
                        Ok(sha) => *content = sha,
                        Err(f) => return fail_all(outcomes, &f),
                    }
                }
            }
            let _ = std::io::Write::write_all(
                &mut std::io::stderr().lock(),
                rekeyed(Path::new(&label)).as_bytes(),
            );
            continue;
        }
        break (answer, collector.job.clone(), progress);
    };
    let resp = match answer {
        Ok(collect::Answer::Result(r)) => r,
        Ok(collect::Answer::Error(e)) => {
            progress.finish();
            return fail_all(outcomes, &e.into());
        }
        Err(e) => {
            progress.finish();
            return fail_all(
                outcomes,
                &unavailable(gone_message(endpoint, job.as_deref(), &e)),
            );
        }
    };
    progress.bar.set_message("signing on the token");
    let boundary = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let Some(boundary) = boundary else {
        progress.finish();
        return fail_all(
            outcomes,
            &unavailable(format!("{endpoint} answered a batch without parts")),
        );
    };
    let mut answer = multer::Multipart::new(resp.into_body().into_data_stream(), boundary);
    for (i, p) in ready {
        let o = &mut outcomes[*i];
        o.job = job.clone();
        let result = receive_part(&mut answer, p, o, endpoint).await;
        let result = match result {
            Ok(got) => finish(p, got, args).await.map(|w| o.warning = w),
            Err(f) => Err(f),
        };
        o.seconds = started.elapsed().as_secs_f64();
        o.done(result, &p.target);
        if o.exit_code == exit::UNAVAILABLE && o.code.is_none() {
            // The connection is gone: the rest share this file's fate.
            let f = Failure {
                code: None,
                exit_code: exit::UNAVAILABLE,
                message: o.message.clone().unwrap_or_default(),
            };
            progress.finish();
            return fail_all(outcomes, &f);
        }
    }
    progress.finish();
}

/// Receives the next answer part for `p` ([`receive`]), or its error.
async fn receive_part(
    answer: &mut multer::Multipart<'static>,
    p: &Prepared,
    o: &mut Outcome,
    endpoint: &Endpoint,
) -> Result<Got, Failure> {
    let broke = |e: multer::Error| {
        unavailable(format!(
            "the connection to {endpoint} broke while receiving the signed files: {e}"
        ))
    };
    let Some(mut field) = answer.next_field().await.map_err(broke)? else {
        return Err(unavailable(format!(
            "{endpoint} answered fewer parts than files were sent"
        )));
    };
    if field
        .headers()
        .get(batch::RESULT_HEADER)
        .is_some_and(|v| v.as_bytes() == b"error")
    {
        let bytes = field.bytes().await.map_err(broke)?;
        let e = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
            ErrorBody::new(
                ErrorCode::Internal,
                "the appliance sent an unreadable error",
            )
        });
        return Err(e.into());
    }
    let mut sink = Sink::new(p)?;
    while let Some(chunk) = field.chunk().await.map_err(broke)? {
        o.bytes_received += chunk.len() as u64;
        sink.write(&chunk)?;
    }
    sink.finish()
}

/// Checks that `file` is a regular file in a format Signet signs. The appliance
/// checks the same way, from the content (and for text, the name).
async fn check_input(file: &Path) -> Result<(std::fs::Metadata, format::Format), Failure> {
    let filename = file.file_name().map(|n| n.to_string_lossy().into_owned());
    let local = std::fs::File::open(file).map_err(|e| bad_input(format!("cannot open it: {e}")))?;
    let meta = local
        .metadata()
        .map_err(|e| bad_input(format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(bad_input("not a regular file".to_owned()));
    }
    let detected =
        format::detect(&local, filename.as_deref()).map_err(|e| bad_input(e.to_string()))?;
    Ok((meta, detected.format))
}

/// Uploads what `p` sends and receives the answer: a whole signed file next to the
/// target (fsync'd), or digest mode's signature in memory. The job goes through a
/// [`collect::Collector`]: when the appliance restarts on the way, the job is collected
/// (or sent again with the same key) once it is back.
async fn exchange(
    endpoint: &Endpoint,
    p: &Prepared,
    query: &SignQuery,
    outcome: &mut Outcome,
    reconnect_for: Duration,
    if_profile: Option<&str>,
) -> Result<Got, Failure> {
    let size = match &p.upload {
        Upload::File(path) => std::fs::metadata(path)
            .map_err(|e| bad_input(format!("cannot read it: {e}")))?
            .len(),
        Upload::Data(data) => data.len() as u64,
    };
    let name = query.filename.clone().unwrap_or_default();
    let key = collect::idempotency_key("sign", query, &[(name, p.content.clone())]);
    let qs = serde_urlencoded::to_string(query)
        .map_err(|e| unavailable(format!("cannot encode the request: {e}")))?;

    let shown_as = &p.file;
    let mut progress = Progress::start(shown_as, size);
    progress.watch_waiting(endpoint);
    let counter = progress.bar.clone();
    let uri = format!("{SIGN_PATH}?{qs}");
    let upload = match &p.upload {
        Upload::File(path) => Upload::File(path.clone()),
        Upload::Data(data) => Upload::Data(data.clone()),
    };
    // A whole PE of more than `HELD_FROM` and at most `INLINE` bytes is held ([`hold`]):
    // every try sends it, and a signed file answered as a patch is made of it.
    let mut held = match &upload {
        Upload::File(path)
            if size > HELD_FROM && size <= native::INLINE && p.format == format::Format::Pe =>
        {
            hold(path).ok().map(|bytes| Held {
                bytes,
                dir: p.dir().to_owned(),
                written: None,
            })
        }
        _ => None,
    };
    let size = held.as_ref().map_or(size, |h| h.bytes.len() as u64);
    progress.bar.set_length(size);
    let held_bytes = held.as_ref().map(|h| h.bytes.clone());
    let if_profile = if_profile.and_then(|h| header::HeaderValue::from_str(h).ok());
    let make = move || {
        counter.set_position(0);
        let counter = counter.clone();
        let count = move |chunk: Bytes| {
            counter.inc(chunk.len() as u64);
            if counter.position() >= counter.length().unwrap_or(u64::MAX) {
                counter.set_message("signing on the token");
            }
            Frame::data(chunk)
        };
        // A small file is read here at once (one read, no trip to the blocking pool);
        // a larger one streams from disk.
        let small = match (&held_bytes, &upload) {
            (Some(bytes), _) => Some(Ok(bytes.clone())),
            (None, Upload::File(path)) if size <= native::INLINE => {
                Some(signet_protocol::whole::read(path).map(Bytes::from))
            }
            _ => None,
        };
        let body = match (&upload, small) {
            (_, Some(Ok(bytes))) => {
                StreamBody::new(futures_util::stream::once(std::future::ready(Ok::<
                    _,
                    std::io::Error,
                >(
                    count(bytes),
                ))))
                .boxed()
            }
            (_, Some(Err(e))) => StreamBody::new(futures_util::stream::once(async move {
                Err::<Frame<Bytes>, _>(e)
            }))
            .boxed(),
            (Upload::Data(data), None) => {
                StreamBody::new(futures_util::stream::once(std::future::ready(Ok::<
                    _,
                    std::io::Error,
                >(
                    count(data.clone()),
                ))))
                .boxed()
            }
            (Upload::File(path), None) => match std::fs::File::open(path) {
                Ok(f) => StreamBody::new(
                    tokio_util::io::ReaderStream::with_capacity(
                        tokio::fs::File::from_std(f),
                        IO_BLOCK,
                    )
                    .map_ok(count),
                )
                .boxed(),
                Err(e) => StreamBody::new(futures_util::stream::once(async move {
                    Err::<Frame<Bytes>, _>(e)
                }))
                .boxed(),
            },
        };
        let mut req = Request::new(body);
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri.parse().unwrap_or_default();
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/octet-stream"),
        );
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(size));
        if let Some(v) = &if_profile {
            req.headers_mut().insert(PROFILE_HEADER, v.clone());
        }
        req
    };
    let mut collector = collect::Collector::new(
        endpoint,
        key,
        shown_as.display().to_string(),
        progress.bar.clone(),
        reconnect_for,
    );
    // Digest mode's data, in memory: answered with the signature in one request.
    if matches!(p.upload, Upload::Data(_)) {
        collector = collector.answer_at_once();
    }
    // A held input: the signed file may come as a patch to it. Once the job is queued,
    // the input is written next to the target while the token signs, so that the patch
    // and the flush are all that is left when the answer comes.
    if let Some(h) = &mut held {
        collector = collector.accepting(patch::ACCEPT_PATCH);
        let (tell, queued) = tokio::sync::oneshot::channel();
        collector.on_queued = Some(tell);
        let (dir, bytes) = (h.dir.clone(), h.bytes.clone());
        h.written = Some(tokio::spawn(async move {
            queued.await.ok()?;
            Some(
                tokio::task::spawn_blocking(move || write_held(&dir, &bytes))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            )
        }));
    }
    let got = collect_result(
        endpoint,
        p,
        outcome,
        &mut progress,
        &mut collector,
        make,
        held.as_mut(),
    )
    .await;
    // A held input written for a patch that did not come: its file goes now, before
    // the process may end (a job never queued never writes it).
    collector.on_queued = None;
    if let Some(task) = held.and_then(|h| h.written) {
        drop(task.await);
    }
    got
}

/// Runs `collector` with the request `make` builds and receives the result (see
/// [`exchange`]), collecting it again when its download broke off.
async fn collect_result<B, F>(
    endpoint: &Endpoint,
    p: &Prepared,
    outcome: &mut Outcome,
    progress: &mut Progress,
    collector: &mut collect::Collector<'_>,
    make: F,
    mut held: Option<&mut Held>,
) -> Result<Got, Failure>
where
    F: Fn() -> Request<B>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut answer = collector.run(make).await;
    loop {
        outcome.bytes_sent = progress.bar.position();
        outcome.job = collector.job.clone();
        let resp = match answer {
            Ok(collect::Answer::Result(r)) => r,
            Ok(collect::Answer::Error(e)) => {
                progress.finish();
                return Err(e.into());
            }
            Err(e) => {
                progress.finish();
                return Err(unavailable(gone_message(
                    endpoint,
                    outcome.job.as_deref(),
                    &e,
                )));
            }
        };
        outcome.bytes_received = 0;
        match receive(resp, p, held.as_deref_mut(), outcome).await {
            Ok(got) => {
                progress.finish();
                return Ok(got);
            }
            Err(Received::Local(f)) => {
                progress.finish();
                return Err(f);
            }
            Err(Received::Broke(e)) => {
                let broke = ClientError::Protocol {
                    endpoint: endpoint.clone(),
                    detail: format!("the connection broke while receiving the signed file: {e}"),
                };
                if !collector.may_retry() {
                    progress.finish();
                    return Err(unavailable(format!(
                        "the connection to {endpoint} broke while receiving the signed file: {e}"
                    )));
                }
                answer = match collector.broke_off(&broke).await {
                    Ok(()) => collector.collect().await,
                    Err(e) => Err(e),
                };
            }
        }
    }
}

/// Why a result was not received.
enum Received {
    /// The connection broke: the result may be collected again.
    Broke(String),
    /// It cannot be written here.
    Local(Failure),
}

/// The size a PE must exceed to be held for a patch: signetd keeps the signed file of an
/// input of at most 64 KiB whole in its database (docs/API.md), never as a patch, and
/// writing such an input beside the target for nothing costs more than its answer does.
const HELD_FROM: u64 = 64 << 10;

/// A whole PE of more than [`HELD_FROM`] and at most [`native::INLINE`] bytes, read
/// once: what every try uploads, and what a signed file answered as a patch is made of.
struct Held {
    bytes: Bytes,
    /// Where the signed file is made: the target's directory.
    dir: PathBuf,
    /// The input written next to the target, started once the job is queued (`None`
    /// from it when the job was never answered as queued).
    written: Option<tokio::task::JoinHandle<Option<std::io::Result<tempfile::NamedTempFile>>>>,
}

/// A held input's bytes. On Linux the file is mapped ([`signet_protocol::whole::map`]):
/// they are copied on by the kernel, to the socket and into the file written beside the
/// target, and never filled into new pages of this process's own (for a megabyte that
/// was a quarter of a millisecond before the upload could start). The signed file's
/// input is then hashed as it was written ([`patch_held`]): a file changed meanwhile
/// is told, not signed. Elsewhere it is read whole.
fn hold(path: &Path) -> std::io::Result<Bytes> {
    #[cfg(target_os = "linux")]
    return signet_protocol::whole::map(path).map(Bytes::from_owner);
    #[cfg(not(target_os = "linux"))]
    return signet_protocol::whole::read(path).map(Bytes::from);
}

/// Writes `bytes` to a new private file in `dir` (see [`Prepared::receiver`]) and
/// starts its write-out.
fn write_held(dir: &Path, bytes: &[u8]) -> std::io::Result<tempfile::NamedTempFile> {
    use signet_protocol::writeback::OnDisk;
    let file = tempfile::Builder::new()
        .prefix(".signet-")
        .tempfile_in(dir)?;
    std::io::Write::write_all(&mut file.as_file(), bytes)?;
    file.as_file().start_writeback(0, bytes.len() as u64);
    Ok(file)
}

/// Receives a signed file answered as a patch to the input `held`: the patch (at most
/// [`patch::PATCH_MAX`]), checked against the input, made into the signed file next to
/// the target and fsync'd. The daemon names the input it patched by its SHA-256; a file
/// made of any other input is never written.
async fn receive_patch(
    resp: http::Response<hyper::body::Incoming>,
    held: &mut Held,
    outcome: &mut Outcome,
) -> Result<Got, Received> {
    let failed = |message: String| {
        Received::Local(Failure {
            code: None,
            exit_code: exit::SIGNING_FAILED,
            message,
        })
    };
    let declared = resp
        .headers()
        .get(INPUT_SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // The signed file is made and flushed as soon as the patch is whole, while the
    // daemon still commits the job; it counts only once the answer ends (the daemon
    // ends it after `signed` is committed). Broken off, the file made goes with it.
    // Whole is told by the JSON's closing brace ([`JsonEnd`]): the patch is read once,
    // however the answer is cut into frames.
    let mut json = Vec::new();
    let mut end = JsonEnd::default();
    let mut made = None;
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Received::Broke(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        outcome.bytes_received += data.len() as u64;
        if data.is_empty() {
            continue;
        }
        if made.is_some() && !data.iter().all(u8::is_ascii_whitespace) {
            return Err(failed(
                "the appliance sent more after its patch; nothing was written".to_owned(),
            ));
        }
        if json.len() + data.len() > patch::PATCH_MAX {
            return Err(failed(format!(
                "the appliance sent a patch longer than {} MiB",
                patch::PATCH_MAX >> 20
            )));
        }
        json.extend_from_slice(&data);
        if made.is_none() && end.feed(&data) {
            made = Some(make_signed(held, &json, declared.as_deref()).await?);
        }
    }
    match made {
        Some(file) => Ok(Got::File(file)),
        None => Ok(Got::File(
            make_signed(held, &json, declared.as_deref()).await?,
        )),
    }
}

/// Tells when the bytes of a JSON object, given in pieces, are whole: its closing
/// brace, found by counting braces and brackets outside strings, in one pass over the
/// bytes whatever the pieces. What the bytes hold is read afterwards, once.
#[derive(Debug, Default)]
struct JsonEnd {
    depth: usize,
    in_string: bool,
    escaped: bool,
    whole: bool,
}

impl JsonEnd {
    /// Takes the next bytes; answers whether the object is whole with them (a value
    /// that is not an object is whole at its first byte: reading it then says what
    /// it is).
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.whole {
                break;
            }
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.whole = self.depth == 0;
                }
                b if b.is_ascii_whitespace() => {}
                _ if self.depth == 0 => self.whole = true,
                _ => {}
            }
        }
        self.whole
    }
}

/// The signed file made of the input `held` (written beside the target once the job
/// was queued, or now) and the patch `json` ([`patch_held`]).
async fn make_signed(
    held: &mut Held,
    json: &[u8],
    declared: Option<&str>,
) -> Result<tempfile::NamedTempFile, Received> {
    let written = match held.written.take() {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    let local = |e: std::io::Error| {
        Received::Local(bad_input(format!("cannot write the signed file: {e}")))
    };
    let written = match written {
        Some(w) => w.map_err(local)?,
        // Never answered as queued, or a patch collected again: written now.
        None => {
            let (dir, bytes) = (held.dir.clone(), held.bytes.clone());
            tokio::task::spawn_blocking(move || write_held(&dir, &bytes))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(local)?
        }
    };
    patch_held(written, held.bytes.len() as u64, json, declared).map_err(|e| match e {
        PatchError::Io(e) => local(e),
        PatchError::Answer(message) => Received::Local(Failure {
            code: None,
            exit_code: exit::SIGNING_FAILED,
            message,
        }),
    })
}

/// Why a patch did not make the signed file.
#[derive(Debug)]
enum PatchError {
    /// The answer does not fit the input held (nothing was written).
    Answer(String),
    Io(std::io::Error),
}

/// How far into the input the edits of a patch may reach for the input's hash to be
/// made while they are written: a PE's are in its headers.
const EDITS_BEFORE: u64 = 64 << 10;

/// Makes the signed file of the input written beside the target as `file` (its first
/// `input_len` bytes) and the patch `json`, whose input the daemon named by its SHA-256
/// `declared`, and fsyncs it. An answer that does not fit that input, or names another,
/// leaves nothing: its file is removed. The input is hashed as it is in that file —
/// the bytes the signed file is made of, whatever became of the file they were read
/// from — while the file is patched and flushed when the edits keep to its first
/// [`EDITS_BEFORE`] bytes (read first) and nothing of it is cut, else before; the
/// answer is checked against it before the file is answered (and may take the
/// target's place).
fn patch_held(
    file: tempfile::NamedTempFile,
    input_len: u64,
    json: &[u8],
    declared: Option<&str>,
) -> Result<tempfile::NamedTempFile, PatchError> {
    use std::os::unix::fs::FileExt;
    let checked = serde_json::from_slice::<patch::Patch>(json)
        .map_err(|e| e.to_string())
        .and_then(|p| p.check(input_len))
        .map_err(|why| {
            PatchError::Answer(format!(
                "the appliance's answer cannot make the signed file: {why}"
            ))
        })?;
    let f = file.as_file();
    // The input's SHA-256 from `from` on, after `head` (its bytes before `from`).
    let hash = |head: &[u8], from: u64| -> std::io::Result<String> {
        let mut sha = sha2::Sha256::new();
        sha.update(head);
        let mut block = vec![0u8; IO_BLOCK];
        let mut at = from;
        while at < input_len {
            let n = usize::try_from(input_len - at).map_or(IO_BLOCK, |left| left.min(IO_BLOCK));
            f.read_exact_at(&mut block[..n], at)?;
            sha.update(&block[..n]);
            at += n as u64;
        }
        Ok(signet_api::hex::lower(&sha.finalize()))
    };
    let patch = || -> std::io::Result<()> {
        if checked.keep() < input_len {
            f.set_len(checked.keep())?;
        }
        for (at, bytes) in checked.edits() {
            f.write_all_at(bytes, *at)?;
        }
        f.write_all_at(checked.tail(), checked.keep())
    };
    let reach = checked
        .edits()
        .iter()
        .map(|(at, bytes)| at + bytes.len() as u64)
        .max()
        .unwrap_or(0);
    let (synced, sha256) = if checked.keep() == input_len && reach <= EDITS_BEFORE {
        // What the edits write over is read first; the rest is hashed beside them.
        let mut head = vec![0u8; reach as usize];
        f.read_exact_at(&mut head, 0).map_err(PatchError::Io)?;
        std::thread::scope(|s| {
            let hashing = s.spawn(|| hash(&head, reach));
            let synced = patch().and_then(|()| f.sync_all());
            let sha256 = hashing
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("hashing stopped")));
            (synced, sha256)
        })
    } else {
        let sha256 = hash(&[], 0);
        (patch().and_then(|()| f.sync_all()), sha256)
    };
    let sha256 = sha256.map_err(PatchError::Io)?;
    if declared != Some(sha256.as_str()) {
        return Err(PatchError::Answer(format!(
            "the appliance made the signed file of another input (SHA-256 {}) than the file written here (SHA-256 {sha256}; was it changed while it was signed?); nothing was written, sign it again",
            declared.unwrap_or("not named"),
        )));
    }
    synced.map_err(PatchError::Io)?;
    Ok(file)
}

/// Receives a result's body: digest mode's signature in memory (refused beyond
/// [`native::MAX_SIGNATURE`]), a whole signed file into a file next to the target,
/// fsync'd (it is renamed over the target as it is), or made of the input `held` when
/// it comes as a patch to it ([`receive_patch`]).
async fn receive(
    resp: http::Response<hyper::body::Incoming>,
    p: &Prepared,
    held: Option<&mut Held>,
    outcome: &mut Outcome,
) -> Result<Got, Received> {
    outcome.profile_sha256 = resp
        .headers()
        .get(PROFILE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let as_patch = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(patch::is_patch_type);
    if as_patch {
        let Some(held) = held else {
            return Err(Received::Local(Failure {
                code: None,
                exit_code: exit::SIGNING_FAILED,
                message: "the appliance answered a patch, which was not asked for".to_owned(),
            }));
        };
        return receive_patch(resp, held, outcome).await;
    }
    // A result sent before its end with its length (`Prefer: early-result`) is made as
    // soon as it is whole — flushed, or in digest mode attached, checked and flushed —
    // while the daemon commits the job; it counts only once the answer ends (the daemon
    // ends it once the job is `signed`). Broken off, what was made goes with it.
    let whole_at = resp
        .headers()
        .get(RESULT_LENGTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let longer = || {
        Received::Local(Failure {
            code: None,
            exit_code: exit::SIGNING_FAILED,
            message:
                "the appliance sent more than the result's length it gave; nothing was written"
                    .to_owned(),
        })
    };
    let mut sink = Some(Sink::new(p).map_err(Received::Local)?);
    let mut made = None;
    let mut received = 0u64;
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Received::Broke(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        outcome.bytes_received += data.len() as u64;
        if data.is_empty() {
            continue;
        }
        let Some(into) = sink.as_mut() else {
            return Err(longer());
        };
        into.write(&data).map_err(Received::Local)?;
        received += data.len() as u64;
        match whole_at {
            Some(n) if received > n => return Err(longer()),
            Some(n) if received == n => {
                if let Some(whole) = sink.take() {
                    made = Some(make(whole, p).await.map_err(Received::Local)?);
                }
            }
            _ => {}
        }
    }
    match (made, sink) {
        (Some(got), _) => Ok(got),
        (None, Some(whole)) => make(whole, p).await.map_err(Received::Local),
        (None, None) => Err(longer()),
    }
}

/// What a result received whole is made into: the signed file flushed, or digest mode's
/// signature, attached to a PE ([`attach_pe`]).
async fn make(sink: Sink, p: &Prepared) -> Result<Got, Failure> {
    match sink.finish()? {
        Got::Signature(signature) if p.format == format::Format::Pe => {
            let (signed, untrusted) = attach_pe(p, signature).await?;
            Ok(Got::Attached(signed, untrusted))
        }
        got => Ok(got),
    }
}

/// Where a result's body goes as it is received.
enum Sink {
    Memory(Vec<u8>),
    /// Written here, on the runtime's own thread: a block written to the page cache
    /// costs less than a trip to the blocking pool, and nothing else waits meanwhile.
    /// Sent to the disk as it is written: the fsync at its end waits for the tail only.
    File(std::io::BufWriter<WriteBehind<tempfile::NamedTempFile>>),
}

impl Sink {
    fn new(p: &Prepared) -> Result<Sink, Failure> {
        if p.digest() {
            return Ok(Sink::Memory(Vec::new()));
        }
        Ok(Sink::File(std::io::BufWriter::with_capacity(
            IO_BLOCK,
            WriteBehind::new(p.receiver()?),
        )))
    }

    fn write(&mut self, data: &[u8]) -> Result<(), Failure> {
        match self {
            Sink::Memory(v) => {
                if v.len() + data.len() > native::MAX_SIGNATURE {
                    return Err(Failure {
                        code: None,
                        exit_code: exit::SIGNING_FAILED,
                        message: format!(
                            "the appliance sent a signature longer than {} MiB; digest mode takes no more",
                            native::MAX_SIGNATURE >> 20
                        ),
                    });
                }
                v.extend_from_slice(data);
                Ok(())
            }
            Sink::File(out) => std::io::Write::write_all(out, data)
                .map_err(|e| bad_input(format!("cannot write the signed file: {e}"))),
        }
    }

    fn finish(self) -> Result<Got, Failure> {
        match self {
            Sink::Memory(v) => Ok(Got::Signature(v)),
            Sink::File(out) => {
                let local =
                    |e: std::io::Error| bad_input(format!("cannot write the signed file: {e}"));
                let file = out
                    .into_inner()
                    .map_err(|e| local(e.into_error()))?
                    .into_inner();
                file.as_file().sync_all().map_err(local)?;
                Ok(Got::File(file))
            }
        }
    }
}

/// How an osslsigncode run failed: its error lines, and all it printed.
#[derive(Debug)]
struct RunFailure {
    summary: String,
    output: String,
}

/// Runs `osslsigncode ARGS... INPUT -out OUTPUT`.
async fn osslsigncode<S: AsRef<std::ffi::OsStr>>(
    program: &Path,
    args: &[S],
    input: &Path,
    output: &Path,
) -> Result<(), RunFailure> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .arg(input)
        .arg("-out")
        .arg(output)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| RunFailure {
            summary: format!("cannot run {}: {e}; digest mode needs osslsigncode {} or later on this machine (--osslsigncode PATH)", program.display(), osslsigncode::shown(osslsigncode::DIGEST)),
            output: String::new(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && (l.contains("rror")
                    || l.contains("ailed")
                    || l.contains("nknown")
                    || l.contains("mismatch"))
        })
        .collect();
    let mut msg = lines.join("; ");
    if msg.is_empty() {
        msg = format!("{} exited with {}", program.display(), out.status);
    }
    if text.contains("Unknown command") || text.contains("extract-data") && text.contains("Usage") {
        msg.push_str(&format!(
            "; digest mode needs osslsigncode {} or later",
            osslsigncode::shown(osslsigncode::DIGEST)
        ));
    }
    Err(RunFailure {
        summary: msg,
        output: text,
    })
}

/// The message for a daemon that cannot be reached, with the fix.
pub fn unreachable_message(endpoint: &Endpoint, e: &ClientError) -> String {
    if let ClientError::Connect(t) = e {
        if t.io().kind() == std::io::ErrorKind::InvalidData {
            // The daemon answered; its certificate is the problem, and the error says how.
            return format!("cannot use the Signet daemon at {endpoint}: {}", t.io());
        }
        if t.io().kind() == std::io::ErrorKind::Unsupported {
            // This system has no such transport (vsock or unix sockets on Windows).
            return format!(
                "cannot reach the Signet daemon at {endpoint}: {}; choose it with --endpoint or SIGNET_ENDPOINT (or endpoint in the configuration file)",
                t.io()
            );
        }
    }
    let hint = match endpoint {
        Endpoint::Vsock { .. } => "is signetd running on the host, and does this VM have a vsock device (args: -device vhost-vsock-pci,guest-cid=<VMID>)? Choose another endpoint with --endpoint or SIGNET_ENDPOINT",
        Endpoint::VsockUds { .. } => "is the VM's hybrid-vsock backend (vhost-device-vsock, Firecracker, Cloud Hypervisor) running with that uds-path, and signetd listening on the port? Choose another endpoint with --endpoint or SIGNET_ENDPOINT",
        _ => "is signetd running there? Choose another endpoint with --endpoint or SIGNET_ENDPOINT",
    };
    format!("cannot reach the Signet daemon at {endpoint} ({e}); {hint}")
}

/// An upload progress bar that appears only on a terminal and only when the upload
/// takes more than a moment.
struct Progress {
    bar: ProgressBar,
    timer: Option<tokio::task::JoinHandle<()>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
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
        let show = |bar: &ProgressBar| {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar.tick();
        };
        let mut timer = None;
        if std::io::stderr().is_terminal() {
            let after = progress_after();
            if after.is_zero() {
                show(&bar);
            } else {
                let bar = bar.clone();
                timer = Some(tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    show(&bar);
                }));
            }
        }
        Progress {
            bar,
            timer,
            watcher: None,
        }
    }

    /// Once the upload is sent and while the bar is shown, asks the appliance now and
    /// then what the job waits for — the signing VM's agent, the token, its PIN — and
    /// says it on the bar instead of "signing on the token".
    fn watch_waiting(&mut self, endpoint: &Endpoint) {
        let bar = self.bar.clone();
        let endpoint = endpoint.clone();
        let every = env_ms("SIGNET_STATUS_EVERY_MS").unwrap_or(STATUS_EVERY);
        self.watcher = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if bar.is_hidden() || bar.position() < bar.length().unwrap_or(0) {
                    continue;
                }
                let asked = tokio::time::timeout(
                    STATUS_LIMIT,
                    client::get_json::<DaemonStatus>(&endpoint, STATUS_PATH),
                )
                .await;
                if let Ok(Ok(Ok(status))) = asked {
                    bar.set_message(
                        signet_api::render::waiting_for(&status)
                            .unwrap_or_else(|| "signing on the token".to_owned()),
                    );
                }
            }
        }));
    }

    fn finish(&self) {
        if let Some(t) = &self.timer {
            t.abort();
        }
        if let Some(t) = &self.watcher {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = &self.watcher {
            t.abort();
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use signet_api::wire::DigestAlgorithm;
    use signet_format::Format;

    #[test]
    fn a_patch_is_whole_at_its_closing_brace_however_it_is_cut() {
        let patch = patch::Patch::new(90, &[(3, &[0xaa, 0xbb]), (9, &[1, 2, 3, 4])], b"TAIL");
        let mut json = serde_json::to_vec(&patch).unwrap();
        // Strings that hold braces, brackets and escaped quotes count for nothing.
        json.pop();
        json.extend_from_slice(br#","note":"} ] { [ \" \\","n":[1,{"a":[]}]}"#);
        assert!(serde_json::from_slice::<serde_json::Value>(&json).is_ok());
        for piece in 1..=json.len() {
            let mut end = JsonEnd::default();
            let mut seen = 0;
            for chunk in json.chunks(piece) {
                let whole = end.feed(chunk);
                seen += chunk.len();
                assert_eq!(whole, seen == json.len(), "pieces of {piece}, {seen} bytes");
            }
        }
        // Not an object: whole at once, for the reading that refuses it.
        assert!(JsonEnd::default().feed(b" 12"));
        assert!(JsonEnd::default().feed(b"]"));
        assert!(!JsonEnd::default().feed(b" \n{\"keep\": 1"));
    }

    /// A result answered with its length before its end is made once it is whole, and
    /// counts only once the answer ends: broken off after all its bytes, or longer than
    /// it said, nothing of it is left.
    #[tokio::test]
    async fn a_result_sent_with_its_length_counts_only_once_its_answer_ends() {
        const HEAD: &str =
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-signet-result-length: 6\r\n\r\n";
        let answers: [(&'static str, Option<&[u8]>); 3] = [
            ("6\r\nsigned\r\n0\r\n\r\n", Some(b"signed")),
            // All its bytes, then the connection closes without the end.
            ("6\r\nsigned\r\n", None),
            ("6\r\nsigned\r\n1\r\n!\r\n0\r\n\r\n", None),
        ];
        for (rest, want) in answers {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("app.exe");
            std::fs::write(&file, b"MZ input").unwrap();
            let p = Prepared {
                file: file.clone(),
                target: file.clone(),
                meta: std::fs::metadata(&file).unwrap(),
                format: Format::Pe,
                nest: false,
                upload: Upload::File(file.clone()),
                content: String::new(),
                work: None,
                ca_file: None,
            };
            let answer: &'static str = Box::leak(format!("{HEAD}{rest}").into_boxed_str());
            let answers: &'static [&'static str] = Box::leak(Box::new([answer]));
            let (ep, server) = crate::collect::tests::appliance(dir.path(), answers);
            let mut conn = signet_protocol::client::Connection::new(&ep);
            let req = http::Request::get("/v1/jobs/1/result")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = conn.send(req).await.unwrap();
            let mut outcome = Outcome::new(&file);
            let got = receive(resp, &p, None, &mut outcome).await;
            server.join().unwrap();
            drop(conn);
            let left = || {
                let mut names: Vec<_> = std::fs::read_dir(dir.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|n| n != "signetd.sock")
                    .collect();
                names.sort();
                names
            };
            match (got, want) {
                (Ok(Got::File(made)), Some(want)) => {
                    assert_eq!(std::fs::read(made.path()).unwrap(), want);
                }
                (Err(Received::Broke(_)), None) if !rest.contains("!") => {
                    assert_eq!(left(), ["app.exe"], "nothing of a broken answer is left");
                }
                (Err(Received::Local(f)), None) => {
                    assert!(
                        f.message.contains("more than the result's length"),
                        "{}",
                        f.message
                    );
                    assert_eq!(left(), ["app.exe"], "nothing of a longer answer is left");
                }
                (Ok(_), _) => panic!("{rest:?}: kept"),
                (Err(Received::Broke(e)), _) => panic!("{rest:?}: broke: {e}"),
                (Err(Received::Local(f)), _) => panic!("{rest:?}: {}", f.message),
            }
            assert_eq!(
                std::fs::read(&file).unwrap(),
                b"MZ input",
                "the target is untouched"
            );
        }
    }

    #[test]
    fn a_held_input_and_its_patch_make_the_signed_file_only_when_the_input_is_the_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let input: Vec<u8> = (0..200u8).collect();
        let count = || std::fs::read_dir(dir.path()).unwrap().count();
        // The signed file keeps 150 bytes, two of them written over, then a new tail:
        // the signature it had (the last 50 bytes) replaced.
        let json = serde_json::to_vec(&patch::Patch::new(
            150,
            &[(4, b"ab".as_slice()), (100, b"c".as_slice())],
            b"TAIL",
        ))
        .unwrap();
        let sha = signet_api::hex::lower(&sha2::Sha256::digest(&input));
        let written = write_held(dir.path(), &input).unwrap();
        let made = patch_held(written, input.len() as u64, &json, Some(&sha)).unwrap();
        let mut want = input[..150].to_vec();
        want[4..6].copy_from_slice(b"ab");
        want[100] = b'c';
        want.extend_from_slice(b"TAIL");
        assert_eq!(std::fs::read(made.path()).unwrap(), want);
        drop(made);
        assert_eq!(count(), 0);

        // Another input named: nothing is written, the file made of this one goes.
        let other = signet_api::hex::lower(&sha2::Sha256::digest(b"another file"));
        let written = write_held(dir.path(), &input).unwrap();
        match patch_held(written, input.len() as u64, &json, Some(&other)) {
            Err(PatchError::Answer(why)) => {
                assert!(why.contains("another input"), "{why}");
                assert!(why.contains(&other) && why.contains(&sha), "{why}");
            }
            r => panic!("{r:?}"),
        }
        let written = write_held(dir.path(), &input).unwrap();
        assert!(matches!(
            patch_held(written, input.len() as u64, &json, None),
            Err(PatchError::Answer(_))
        ));
        // A patch that does not fit the input: it keeps more than there is.
        let long = serde_json::to_vec(&patch::Patch::new(201, &[], b"")).unwrap();
        let written = write_held(dir.path(), &input).unwrap();
        match patch_held(written, input.len() as u64, &long, Some(&sha)) {
            Err(PatchError::Answer(why)) => assert!(why.contains("keeps 201 bytes"), "{why}"),
            r => panic!("{r:?}"),
        }
        let written = write_held(dir.path(), &input).unwrap();
        assert!(matches!(
            patch_held(written, input.len() as u64, b"{not json", Some(&sha)),
            Err(PatchError::Answer(_))
        ));
        assert_eq!(count(), 0, "every refused answer's file was removed");
    }

    #[test]
    fn a_held_input_is_hashed_as_it_was_written_beside_its_edits_or_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let len = (EDITS_BEFORE as usize) * 2 + 123;
        let input: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let sha = signet_api::hex::lower(&sha2::Sha256::digest(&input));
        let expect = |edits: &[(u64, &[u8])], tail: &[u8]| {
            let mut want = input.clone();
            for (at, bytes) in edits {
                want[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
            }
            want.extend_from_slice(tail);
            want
        };
        // A PE's edits, in its headers, nothing cut: hashed while they are written.
        let head: [(u64, &[u8]); 2] = [(0xd8, b"CSUM"), (0x128, b"DIRENTRY")];
        // An edit past the first EDITS_BEFORE bytes: hashed before it is written.
        let far: [(u64, &[u8]); 2] = [(0xd8, b"CSUM"), (EDITS_BEFORE + 5, b"far")];
        for edits in [&head[..], &far[..]] {
            let json = serde_json::to_vec(&patch::Patch::new(len as u64, edits, b"SIG")).unwrap();
            let written = write_held(dir.path(), &input).unwrap();
            let made = patch_held(written, len as u64, &json, Some(&sha)).unwrap();
            assert_eq!(std::fs::read(made.path()).unwrap(), expect(edits, b"SIG"));
        }
        // The file written beside the target is not the input the appliance signed (the
        // file it was read from changed meanwhile): refused, and it goes.
        let json = serde_json::to_vec(&patch::Patch::new(len as u64, &head, b"SIG")).unwrap();
        let mut changed = input.clone();
        changed[len - 1] ^= 1;
        let written = write_held(dir.path(), &changed).unwrap();
        match patch_held(written, len as u64, &json, Some(&sha)) {
            Err(PatchError::Answer(why)) => {
                assert!(why.contains("changed while it was signed"), "{why}")
            }
            r => panic!("{r:?}"),
        }
        // Shorter than the input it should hold (cut short meanwhile): refused, as an
        // error reading it or as another input, never a signed file.
        let written = write_held(dir.path(), &input[..len - 10]).unwrap();
        assert!(patch_held(written, len as u64, &json, Some(&sha)).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_transport_this_system_lacks_is_named_with_the_way_to_choose_another() {
        let endpoint: Endpoint = "vsock:2:771".parse().unwrap();
        let e = ClientError::Connect(signet_protocol::transport::TransportError::Connect {
            endpoint: endpoint.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "vsock is available on Linux only; use a tcp:HOST:PORT endpoint",
            ),
        });
        let msg = unreachable_message(&endpoint, &e);
        assert!(
            msg.contains("Linux only")
                && msg.contains("--endpoint")
                && !msg.contains("vhost-vsock-pci"),
            "{msg}"
        );
    }

    #[test]
    fn a_signature_longer_than_digest_mode_takes_is_refused_with_its_limit() {
        let mut sink = Sink::Memory(Vec::new());
        let block = vec![0u8; 1 << 20];
        for _ in 0..(native::MAX_SIGNATURE >> 20) {
            assert!(sink.write(&block).is_ok());
        }
        let Err(f) = sink.write(&[0u8]) else {
            panic!("one byte past the limit is taken");
        };
        assert_eq!(f.exit_code, exit::SIGNING_FAILED);
        assert!(
            f.message.contains("longer than 33 MiB")
                && f.message.contains("digest mode takes no more"),
            "{}",
            f.message
        );
        let Sink::Memory(held) = sink else {
            panic!("not in memory");
        };
        assert_eq!(
            held.len(),
            native::MAX_SIGNATURE,
            "nothing past the limit is held"
        );
    }

    #[test]
    fn digest_data_is_extracted_as_the_profile_signs() {
        let mut p = ProfileOptions {
            name: "release".into(),
            hash: DigestAlgorithm::Sha512,
            page_hashes: true,
            nested: true,
            formats: vec![],
            timestamp: None,
            certificate: None,
        };
        assert_eq!(
            extract_args(&p, Format::Pe),
            ["extract-data", "-h", "sha512", "-ph", "-in"]
        );
        // Page hashes are for PE files only.
        assert_eq!(
            extract_args(&p, Format::PowerShell),
            ["extract-data", "-h", "sha512", "-in"]
        );
        p.hash = DigestAlgorithm::Sha384;
        p.page_hashes = false;
        assert_eq!(
            extract_args(&p, Format::Pe),
            ["extract-data", "-h", "sha384", "-in"]
        );
    }

    /// osslsigncode 2.9's attach-signature output, abridged, for a signature whose
    /// certificate is self-signed (no -CAfile).
    const UNTRUSTED: &str = "Signature Index: 0  (Primary Signature)\n\
        Message digest algorithm  : SHA256\n\
        Current message digest    : B602\n\
        Calculated message digest : B602\n\
        Signing certificate chain verified using:\n\
        \tError: self-signed certificate\n\
        PKCS7_verify error\n\
        Failed signing certificate chain retrieved from the signature:\n\
        Signature verification: failed\n\
        Failed\n\
        40A0ECCC277F0000:error:10800075:PKCS7 routines:PKCS7_verify:certificate verify error\n\
        Signature mismatch\n";

    #[test]
    fn an_untrusted_chain_is_told_apart_from_a_signature_that_does_not_match() {
        assert_eq!(
            attach_verdict(UNTRUSTED),
            AttachVerdict::Untrusted("self-signed certificate".into())
        );
        // MSI files name their digests "DigitalSignature".
        let msi = "Current DigitalSignature    : FF86\nCalculated DigitalSignature : FF86\n\
            Calculated message digest : E18D\n\tError: unable to get local issuer certificate\n\
            Failed signing certificate chain retrieved from the signature:\n";
        assert_eq!(
            attach_verdict(msi),
            AttachVerdict::Untrusted("unable to get local issuer certificate".into())
        );
        let mismatch = UNTRUSTED.replace(
            "Calculated message digest : B602",
            "Calculated message digest : 0000     MISMATCH!!!",
        );
        assert_eq!(attach_verdict(&mismatch), AttachVerdict::Mismatch);
        // No digest compared: nothing is known about the signature.
        assert_eq!(
            attach_verdict("Unable to extract existing signature\nFailed\n"),
            AttachVerdict::Other
        );
        let w = untrusted_warning("self-signed certificate");
        assert!(
            w.starts_with("signed, and the signature matches the file")
                && w.contains("--ca-file")
                && w.contains("(self-signed certificate)"),
            "{w}"
        );
        let m = attach_failure(
            &AttachVerdict::Untrusted("x".into()),
            Some(Path::new("/ca.pem")),
            "",
        );
        assert!(m.contains("does not chain to the CA in /ca.pem"), "{m}");
        let m = attach_failure(&AttachVerdict::Mismatch, None, "osslsigncode: raw");
        assert!(
            m.contains("does not match this file") && m.ends_with("(osslsigncode: raw)"),
            "{m}"
        );
    }
}

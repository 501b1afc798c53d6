//! The agent's core: one token, one job at a time, and the commands the HTTP front
//! calls (`sign`, `health`, `login`, `events`).
//!
//! [`Agent::watch`] runs beside the jobs: it checks the session between jobs and,
//! when the token is lost or missing, re-opens it with backoff (re-initialising the
//! module, finding the token by label and serial, logging in with the PIN in memory or
//! the PIN file). Everything that happens to the token and the jobs is published as
//! [`AgentEvent`]s on a broadcast channel ([`Agent::subscribe`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cryptoki::types::AuthPin;
/// The time now, RFC 3339 in UTC.
pub use signet_api::rfc3339::now as now_rfc3339;
use signet_api::wire::patch::Patch;
use signet_api::wire::{
    AgentEvent, AgentEventKind, AgentHealth, AgentSignQuery, AgentState, ErrorBody, ErrorCode,
    SignMode, SignResponse, SignerFeatures,
};
use signet_format as format;
use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;
use tracing::Instrument;

use crate::backend::{InMemory, SignError, SignSpec, Signer};
use crate::config::{self, Config};
use crate::job;
use crate::loss::{self, Backoff, Watch};
use crate::signer::Osslsigncode;
use crate::signtool::SigntoolBackend;
use crate::token::{Token, TokenError, TokenSession};

/// How often a ready session (or a token waiting for a person) is checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often the token is checked while a signer runs on it.
const RUN_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// First and longest wait between tries to re-open a lost or missing token.
const REOPEN_MIN: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(2);
/// Events kept for a subscriber that reads slowly; it is told how many it missed.
const EVENT_BUFFER: usize = 256;

/// Publishes events in order, numbered.
#[derive(Debug)]
struct EventBus {
    tx: broadcast::Sender<AgentEvent>,
    seq: Mutex<u64>,
}

impl EventBus {
    fn new() -> Self {
        EventBus {
            tx: broadcast::channel(EVENT_BUFFER).0,
            seq: Mutex::new(0),
        }
    }

    fn emit(&self, kind: AgentEventKind) {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        tracing::debug!(event = kind.name(), seq = *seq, "event");
        // Nobody listening is fine.
        let _ = self.tx.send(AgentEvent {
            seq: *seq,
            time: now_rfc3339(),
            kind,
        });
    }
}

fn token_error(e: TokenError) -> ErrorBody {
    ErrorBody::new(e.code(), e.to_string()).retryable(e.retryable())
}

/// A job's working directory: the spooled input and, once signed, the output.
/// Everything in it is deleted when it is dropped.
///
/// A small input ([`MEMORY_INPUT`] bytes at most) the signer signs in memory
/// ([`Signer::signs_in_memory`]) has no directory: the input is held in memory, its
/// checks read that buffer, and the signed result is kept in memory too. Such an
/// input of a format the signer does not sign in memory is written to a directory
/// once its format is known ([`Agent::sign_once`]), and goes on as any other.
#[derive(Debug)]
pub struct Spool {
    /// `None` while the input is held in memory.
    dir: Option<tempfile::TempDir>,
    /// The input, held in memory (no directory); kept once signed when the result is
    /// the input and [`Spool::patch`] (a PE signed in memory).
    memory: Option<bytes::Bytes>,
    /// The signed result, when it was made in memory.
    signed: Option<bytes::Bytes>,
    /// The input's digest and checksum's sum, when made as it was spooled.
    digested: Option<signet_authenticode::PeDigested>,
    /// The signed file as what signing changed in the input, when the signer told it.
    patch: Option<Patch>,
}

/// The largest input held in memory instead of a job directory: every digest-mode
/// input and whole files up to 1 MiB. Memory stays bounded: signetd has at most four
/// jobs at the agent, and at most [`KEPT_RESULTS`] results are kept.
pub const MEMORY_INPUT: u64 = 1 << 20;

impl Spool {
    /// The signed result when it was made in memory (`None`: it is the file at
    /// [`Spool::output`]): kept whole, or made here of the input it was signed from
    /// without a copy and the patch (for a host that does not take the patch).
    pub fn signed(&self) -> Option<bytes::Bytes> {
        if let Some(signed) = &self.signed {
            return Some(signed.clone());
        }
        let (input, patch) = (self.memory.as_ref()?, self.patch.as_ref()?);
        let checked = patch.check(input.len() as u64).ok()?;
        Some(bytes::Bytes::from(checked.signed_file(input)))
    }

    /// The signed file as what signing changed in the input, when the signer told it
    /// (the native engine's PE); the file at [`Spool::output`] is the same bytes.
    pub fn patch(&self) -> Option<&Patch> {
        self.patch.as_ref()
    }

    /// The directory's path (empty for an input held in memory, which has none and
    /// whose paths are never used).
    fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }

    /// Keeps what a [`signet_authenticode::PeDigester`] made of the input as it was
    /// spooled, for the native engine.
    pub fn set_digested(&mut self, digested: Option<signet_authenticode::PeDigested>) {
        self.digested = digested;
    }

    pub fn input(&self) -> PathBuf {
        self.path().join("input")
    }

    pub fn output(&self) -> PathBuf {
        self.path().join("signed")
    }

    /// The input's path once it carries the extension of its format.
    fn input_with_extension(&self, extension: &str) -> PathBuf {
        self.path().join(format!("input.{extension}"))
    }
}

/// What makes a job the same job when the host sends it again: the host's job id,
/// the request's options and the input's SHA-256. A job id alone is not enough (a
/// host whose state was reset numbers its jobs from 1 again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKey(String);

impl JobKey {
    pub fn new(job: &str, query: &str, input_sha256: [u8; 32]) -> Self {
        let hex: String = input_sha256.iter().map(|b| format!("{b:02x}")).collect();
        JobKey(format!("{job}\n{query}\n{hex}"))
    }

    /// The host's job id.
    fn job(&self) -> &str {
        self.0.split('\n').next().unwrap_or_default()
    }
}

/// How many signed results are kept for a host that asks again, how many bytes they
/// may take together (the newest is kept whatever its size), and for how long.
const KEPT_RESULTS: usize = 8;
const KEPT_BYTES: u64 = 2 << 30;
const KEPT_FOR: Duration = Duration::from_secs(600);

/// The newest signed results, each for the job that made it: a job the host sends
/// again (it restarted, or lost the connection, while the agent signed) gets its
/// result again instead of a second signature. Pure bookkeeping; the files live in
/// the kept spools and go with them.
#[derive(Debug)]
struct Kept<T> {
    results: std::collections::VecDeque<KeptResult<T>>,
}

#[derive(Debug)]
struct KeptResult<T> {
    key: JobKey,
    at: std::time::Instant,
    bytes: u64,
    result: T,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept {
            results: Default::default(),
        }
    }
}

impl<T: Clone> Kept<T> {
    /// The result kept for `key`, and those that expired (the caller drops them
    /// where dropping costs nothing: a kept spool's files go with it).
    fn find(&mut self, key: &JobKey, now: std::time::Instant) -> (Option<T>, Vec<T>) {
        let gone = self.expire(now);
        let found = self
            .results
            .iter()
            .find(|r| r.key == *key)
            .map(|r| r.result.clone());
        (found, gone)
    }

    /// Keeps `result` for `key`; answers the results it pushed out (see
    /// [`Kept::find`]).
    fn keep(&mut self, key: JobKey, result: T, bytes: u64, now: std::time::Instant) -> Vec<T> {
        let mut gone = self.expire(now);
        if let Some(at) = self.results.iter().position(|r| r.key == key) {
            gone.extend(self.results.remove(at).map(|r| r.result));
        }
        self.results.push_back(KeptResult {
            key,
            at: now,
            bytes,
            result,
        });
        while self.results.len() > KEPT_RESULTS
            || (self.results.len() > 1
                && self.results.iter().map(|r| r.bytes).sum::<u64>() > KEPT_BYTES)
        {
            gone.extend(self.results.pop_front().map(|r| r.result));
        }
        gone
    }

    fn expire(&mut self, now: std::time::Instant) -> Vec<T> {
        let (gone, kept): (std::collections::VecDeque<_>, _) = std::mem::take(&mut self.results)
            .into_iter()
            .partition(|r| now.saturating_duration_since(r.at) >= KEPT_FOR);
        self.results = kept;
        gone.into_iter().map(|r| r.result).collect()
    }
}

/// Drops results the kept list let go on a blocking thread: a spool's files are
/// removed as it is dropped, which for a large file takes milliseconds that would
/// otherwise be spent under the job lock, before the job's answer.
pub(crate) fn drop_elsewhere<T: Send + 'static>(gone: Vec<T>) {
    if !gone.is_empty() {
        tokio::task::spawn_blocking(move || drop(gone));
    }
}

/// The signer `[signer] backend` chooses, set up from the configuration.
pub fn signer_for(cfg: &Config) -> Box<dyn Signer> {
    match cfg.signer.backend {
        config::Backend::Osslsigncode => Box::new(Osslsigncode::from_config(cfg)),
        config::Backend::Signtool => Box::new(SigntoolBackend::from_config(cfg)),
        config::Backend::Native => Box::new(crate::native::Native::from_config(cfg)),
    }
}

/// The longest job id taken from the host.
const MAX_JOB_ID: usize = 64;

/// Whether `id`, sent by the host in [`signet_api::wire::JOB_HEADER`], may name a
/// job in the agent's log: 1 to 64 letters, digits and `-_.:`.
fn usable_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_JOB_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// A name for this agent process, different at every start: its pid and start time.
fn new_instance() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{:x}", std::process::id(), since.as_nanos())
}

/// The name of every job's working directory begins with this.
const JOB_DIR_PREFIX: &str = "signet-job-";

/// The running agent.
#[derive(Debug)]
pub struct Agent {
    token: Arc<Mutex<Box<dyn TokenSession>>>,
    /// One job at a time touches the token.
    jobs: tokio::sync::Mutex<()>,
    signer: Box<dyn Signer>,
    signer_version: String,
    /// What the signing backend can do (detected at start).
    signer_features: SignerFeatures,
    /// Names this process for the host (`instance` in health).
    instance: String,
    module: PathBuf,
    spool_dir: PathBuf,
    events: Arc<EventBus>,
    next_job: AtomicU64,
    /// Numbers the requests that come without a usable job id from the host.
    next_request: AtomicU64,
    /// Wakes the watcher at once (a job saw the token go).
    wake: tokio::sync::Notify,
    /// Run before a re-initialisation the host asks for (`token.reinit_command`).
    reinit_command: Option<Vec<String>>,
    /// Set when the agent stops: open event streams end.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Results kept for a host that asks for the same job again.
    kept: Mutex<Kept<Arc<Spool>>>,
    /// When a job last found the token's session ready (its own check, in
    /// `ensure_ready`): the watcher leaves the token to the jobs meanwhile.
    job_checked: Mutex<Option<std::time::Instant>>,
    /// How many times the job lock was taken ([`Agent::lock_jobs`]).
    turns: AtomicU64,
    /// The session found ready while a job's input arrived ([`Agent::ready_ahead`]).
    ahead: Mutex<Option<Ahead>>,
}

/// The token's session checked ready ahead of a job, under the job lock's turn
/// `turn`: it holds for the job that takes the lock next, for [`AHEAD_FOR`] at most.
#[derive(Debug)]
struct Ahead {
    turn: u64,
    at: std::time::Instant,
    ready: (crate::token::KeyRef, AuthPin),
}

/// How long a check made ahead of a job ([`Agent::ready_ahead`]) stands for the job's
/// own: a token pulled meanwhile fails the signature as a loss, retried as one.
const AHEAD_FOR: Duration = Duration::from_secs(2);

impl Agent {
    /// Builds the agent from its configuration. Checks the signer is runnable; the
    /// token is opened by [`Agent::open_token`], and its absence is a state, not an error.
    pub async fn new(cfg: Config) -> Result<Self, SignError> {
        let signer = signer_for(&cfg);
        let token: Box<dyn TokenSession> = Box::new(Token::new(cfg.token.clone()));
        let spool_dir = cfg.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
        Agent::with_parts(
            signer,
            token,
            cfg.token.module,
            spool_dir,
            cfg.token.reinit_command,
        )
        .await
    }

    /// Builds the agent around a signer and a token session; [`Agent::new`] gives it
    /// the configured ones. `module` is named in health; `reinit_command` runs before
    /// a re-initialisation the host asks for.
    pub async fn with_parts(
        mut signer: Box<dyn Signer>,
        token: Box<dyn TokenSession>,
        module: PathBuf,
        spool_dir: PathBuf,
        reinit_command: Option<Vec<String>>,
    ) -> Result<Self, SignError> {
        let (signer_version, signer_features) = signer.version().await?;
        let modes = signer_features
            .modes
            .iter()
            .map(|m| match m {
                SignMode::Whole => "whole file",
                SignMode::Digest => "digest",
            })
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(
            signer = %signer_version,
            program = %signer.program().display(),
            modes = %modes,
            extract_data = signer_features.extract_data,
            attach_signature = signer_features.attach_signature,
            powershell = signer_features.powershell,
            "signing backend detected; serving modes: {modes}"
        );
        let token: crate::backend::SharedToken = Arc::new(Mutex::new(token));
        signer.use_token(token.clone());
        Ok(Agent {
            reinit_command,
            module,
            token,
            jobs: tokio::sync::Mutex::new(()),
            signer,
            signer_version,
            signer_features,
            instance: new_instance(),
            spool_dir,
            events: Arc::new(EventBus::new()),
            next_job: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            wake: tokio::sync::Notify::new(),
            stopping: tokio::sync::watch::channel(false).0,
            kept: Mutex::new(Kept::default()),
            job_checked: Mutex::new(None),
            turns: AtomicU64::new(0),
            ahead: Mutex::new(None),
        })
    }

    /// The id a request's log lines carry: the host's job id (`x-signet-job`) when it
    /// sent a usable one, so one job reads as one trace on both sides; else the
    /// agent's own number, `agent-N`.
    pub fn job_id(&self, from_host: Option<&str>) -> String {
        match from_host {
            Some(id) if usable_job_id(id) => id.to_owned(),
            _ => format!(
                "agent-{}",
                self.next_request.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// The agent stops: event streams end (so a graceful stop does not wait for the
    /// host's stream, which never ends by itself).
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once [`Agent::stop`] was called.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Follows what happens to the token and the jobs from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.tx.subscribe()
    }

    /// Takes the token's PIN from the host and logs in with it (see
    /// [`TokenSession::login`]); answers the resulting health.
    pub async fn login(&self, pin: AuthPin) -> Result<AgentHealth, ErrorBody> {
        {
            let _job = self.lock_jobs().await.0;
            self.with_token(move |t| t.login(pin))
                .await
                .map_err(token_error)?;
        }
        self.wake.notify_one();
        Ok(self.health().await)
    }

    /// Watches the token for the agent's life: checks a ready session between jobs,
    /// re-opens a lost or missing token with backoff, and never logs in where that
    /// would spend a PIN try a person has not supplied.
    pub async fn watch(self: Arc<Self>) {
        let mut backoff = Backoff::new(REOPEN_MIN, REOPEN_MAX);
        let mut attempts = 0u32;
        loop {
            let plan = self.watch_plan().await;
            let delay = match plan {
                Watch::Reopen => backoff.next_delay(),
                Watch::Check | Watch::Wait => {
                    backoff.reset();
                    attempts = 0;
                    CHECK_INTERVAL
                }
            };
            let woken = tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                _ = self.wake.notified() => {
                    backoff.reset();
                    true
                }
            };
            let checked_ago = self
                .job_checked
                .lock()
                .ok()
                .and_then(|t| t.map(|t| t.elapsed()));
            if !watcher_checks(plan, woken, checked_ago) {
                continue;
            }
            let _job = self.lock_jobs().await.0;
            // A job may have changed the state while the watcher waited.
            match self.watch_plan().await {
                Watch::Check | Watch::Wait => {
                    self.with_token_quiet(|t| {
                        t.check();
                    })
                    .await
                }
                Watch::Reopen => {
                    attempts += 1;
                    let result = self.with_token(|t| t.ensure_ready().map(|_| ())).await;
                    match result {
                        Ok(()) => tracing::info!(attempts, "the token is ready again"),
                        Err(e) => {
                            tracing::debug!(attempts, error = %e, "the token is not back yet")
                        }
                    }
                }
            }
        }
    }

    async fn watch_plan(&self) -> Watch {
        let (state, worth) = self
            .with_token_quiet(|t| (t.state().0, t.retry_worth_it()))
            .await;
        loss::watch(state, worth)
    }

    /// Finalises the PKCS#11 module and opens the token anew now, logging in with the
    /// PIN it holds (the host's recovery ladder asks for this first when the token is
    /// lost); returns the resulting state. Waits for the job at the token.
    pub async fn reinit(&self) -> AgentHealth {
        {
            let _job = self.lock_jobs().await.0;
            tracing::info!("re-initialising PKCS#11, as the host asked");
            if let Some(cmd) = &self.reinit_command {
                run_reinit_command(cmd).await;
            }
            let _ = self
                .with_token(|t| {
                    t.close();
                    t.ensure_ready().map(|_| ())
                })
                .await;
        }
        self.wake.notify_one();
        self.health().await
    }

    /// Tries to open and log in to the token now; returns the resulting state.
    pub async fn open_token(&self) -> AgentHealth {
        {
            let _job = self.lock_jobs().await.0;
            let _ = self.with_token(|t| t.ensure_ready().map(|_| ())).await;
        }
        self.health().await
    }

    /// Removes the job directories a previous run of the agent left in the spool
    /// directory (it was killed mid-job: they may hold signed copies that no audit
    /// record covers; the host runs such a job again). Answers how many; call before
    /// serving.
    pub fn clean_spool(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.spool_dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let is_job = name.to_str().is_some_and(|n| n.starts_with(JOB_DIR_PREFIX));
            if is_job && e.file_type().is_ok_and(|t| t.is_dir()) {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => removed += 1,
                    Err(err) => {
                        tracing::warn!(dir = %e.path().display(), error = %err, "a job directory left by a previous run cannot be removed; remove it by hand")
                    }
                }
            }
        }
        removed
    }

    /// Whether an upload of `declared` bytes for a job of `mode` is held in memory:
    /// small enough, and the signer signs in memory what it will most likely be
    /// (digest mode's data; a PE file for a whole file).
    pub fn keeps_in_memory(&self, mode: SignMode, declared: Option<u64>) -> bool {
        let format = match mode {
            SignMode::Digest => None,
            SignMode::Whole => Some(format::Format::Pe),
        };
        declared.is_some_and(|n| n <= MEMORY_INPUT) && self.signer.signs_in_memory(format)
    }

    /// A job whose input is held in memory ([`Agent::keeps_in_memory`]).
    pub fn memory_spool(&self, input: bytes::Bytes) -> Spool {
        Spool {
            dir: None,
            memory: Some(input),
            signed: None,
            digested: None,
            patch: None,
        }
    }

    /// A fresh working directory for one job.
    pub fn spool(&self) -> Result<Spool, ErrorBody> {
        self.job_dir().map(|dir| Spool {
            dir: Some(dir),
            memory: None,
            signed: None,
            digested: None,
            patch: None,
        })
    }

    /// Writes an input held in memory to a job directory of its own, as `name`: its
    /// signer signs files only.
    async fn to_directory(&self, spool: &mut Spool, name: &str) -> Result<PathBuf, ErrorBody> {
        let dir = self.job_dir()?;
        let path = dir.path().join(name);
        let data = spool.memory.take().unwrap_or_default();
        spool.dir = Some(dir);
        tokio::fs::write(&path, &data).await.map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("the agent cannot write its spool: {e}"),
            )
        })?;
        Ok(path)
    }

    fn job_dir(&self) -> Result<tempfile::TempDir, ErrorBody> {
        tempfile::Builder::new()
            .prefix(JOB_DIR_PREFIX)
            .tempdir_in(&self.spool_dir)
            .map_err(|e| {
                ErrorBody::new(
                    ErrorCode::Internal,
                    format!(
                        "the agent cannot create a spool directory in {}: {e}; check spool_dir and free space",
                        self.spool_dir.display()
                    ),
                )
            })
    }

    /// Signs the spooled input once per job: a job the host sent before (same job id,
    /// options and input) whose result is still kept gets that result, and the token
    /// signs nothing. Answers the spool that holds the signed file.
    pub async fn sign_once(
        &self,
        key: Option<JobKey>,
        mut spool: Spool,
        query: &AgentSignQuery,
    ) -> Result<Arc<Spool>, ErrorBody> {
        let mut input = self.check_input(&spool, query).await?;
        if spool.memory.is_some() {
            // Signed in memory when the signer can, and the whole answer is wanted
            // (a signature alone is cut from a signed file by a program).
            let pkcs7 = query.response == SignResponse::Pkcs7 && input.format.is_some();
            if pkcs7 || !self.signer.signs_in_memory(input.format) {
                let name = match input.extension {
                    Some(ext) => format!("input.{ext}"),
                    None => "input".to_owned(),
                };
                input.input = self.to_directory(&mut spool, &name).await?;
            }
        }
        // Looked up under the token's lock: a second copy of a job that is signing now
        // waits for the first and then takes its result.
        let (_job, turn) = self.lock_jobs().await;
        if let Some(key) = &key {
            let (found, gone) = match self.kept.lock() {
                Ok(mut k) => k.find(key, std::time::Instant::now()),
                Err(_) => (None, Vec::new()),
            };
            drop_elsewhere(gone);
            if let Some(kept) = found {
                tracing::info!(
                    job = key.job(),
                    "the host sent job {} again; its kept result goes back and nothing is signed twice",
                    key.job()
                );
                drop_elsewhere(vec![spool]);
                return Ok(kept);
            }
        }
        (spool.signed, spool.patch) = self.sign_locked(&spool, &input, query, Some(turn)).await?;
        if spool.signed.is_some() {
            // Signed in memory: the result is all that is kept of it. (A PE signed
            // in memory is kept as its input and the patch: `signed` is `None`.)
            spool.memory = None;
        }
        let bytes = match (&spool.signed, &spool.memory) {
            (Some(b), _) | (None, Some(b)) => b.len() as u64,
            (None, None) => std::fs::metadata(spool.output()).map_or(0, |m| m.len()),
        };
        let spool = Arc::new(spool);
        if let (Some(key), Ok(mut kept)) = (key, self.kept.lock()) {
            drop_elsewhere(kept.keep(key, spool.clone(), bytes, std::time::Instant::now()));
        }
        Ok(spool)
    }

    /// Signs a batch in order under one hold of the token: no other job runs between
    /// its files. Each file gets its own result; a bad file does not stop the others.
    pub async fn sign_batch(
        &self,
        items: &[(Spool, AgentSignQuery)],
    ) -> Vec<Result<(), ErrorBody>> {
        let mut checked = Vec::with_capacity(items.len());
        for (spool, query) in items {
            checked.push(self.check_input(spool, query).await);
        }
        let _job = self.lock_jobs().await.0;
        let mut results = Vec::with_capacity(items.len());
        for ((spool, query), input) in items.iter().zip(checked) {
            results.push(match input {
                Ok(input) => self
                    .sign_locked(spool, &input, query, None)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Checks the spooled input is something this request may sign, and names it
    /// the way osslsigncode needs.
    async fn check_input(
        &self,
        spool: &Spool,
        query: &AgentSignQuery,
    ) -> Result<Checked, ErrorBody> {
        job::check_query(query)?;
        if let Some(why) =
            self.signer
                .refuses(&self.signer_features, query.mode, None, query.response)
        {
            return Err(ErrorBody::new(ErrorCode::UnsupportedFormat, why));
        }
        if let Some(data) = &spool.memory {
            return self.check_memory(data, query);
        }
        match query.mode {
            SignMode::Whole => {
                let detected =
                    self.admit_whole(query, detect(spool.input(), query.filename.clone()).await?)?;
                // osslsigncode may go by the extension (it does for PowerShell files).
                let input = spool.input_with_extension(detected.extension);
                tokio::fs::rename(spool.input(), &input)
                    .await
                    .map_err(|e| {
                        ErrorBody::new(
                            ErrorCode::Internal,
                            format!("the agent cannot rename its spooled input: {e}"),
                        )
                    })?;
                Ok(Checked {
                    input,
                    format: Some(detected.format),
                    extension: Some(detected.extension),
                })
            }
            SignMode::Digest => {
                let kind = digest_kind(query, &read_head(&spool.input()).await?)?;
                digest_accepted(query, kind, blob_options(spool.input()).await?)?;
                Ok(Checked {
                    input: spool.input(),
                    format: None,
                    extension: None,
                })
            }
        }
    }

    /// [`Agent::check_input`] for an input held in memory: the same checks, on the
    /// buffer.
    fn check_memory(&self, data: &[u8], query: &AgentSignQuery) -> Result<Checked, ErrorBody> {
        let (format, extension) = match query.mode {
            SignMode::Whole => {
                let detected =
                    self.admit_whole(query, format::detect(data, query.filename.as_deref()))?;
                (Some(detected.format), Some(detected.extension))
            }
            SignMode::Digest => {
                let kind = digest_kind(query, &data[..data.len().min(format::HEAD_LEN)])?;
                let options = format::digest_blob_options(data)
                    .map_err(|e| ErrorBody::new(ErrorCode::UnsupportedFormat, e.to_string()))?;
                digest_accepted(query, kind, options)?;
                (None, None)
            }
        };
        Ok(Checked {
            input: PathBuf::new(),
            format,
            extension,
        })
    }

    /// A whole file's checks once its format is detected (from its spool file or its
    /// buffer): the profile's formats, and what the signer serves.
    fn admit_whole(
        &self,
        query: &AgentSignQuery,
        detected: Result<format::Detected, format::FormatError>,
    ) -> Result<format::Detected, ErrorBody> {
        let detected = job::admit(query, detected)?;
        if let Some(why) = self.signer.refuses(
            &self.signer_features,
            query.mode,
            Some(detected.format),
            query.response,
        ) {
            return Err(ErrorBody::new(ErrorCode::UnsupportedFormat, why));
        }
        tracing::info!(format = %detected.format, profile = query.profile.as_deref().unwrap_or("-"), "input accepted");
        Ok(detected)
    }

    /// Takes the job lock; answers its guard and the turn it is.
    async fn lock_jobs(&self) -> (tokio::sync::MutexGuard<'_, ()>, u64) {
        let guard = self.jobs.lock().await;
        (guard, self.next_turn())
    }

    /// Counts one more hold of the job lock; answers its turn.
    fn next_turn(&self) -> u64 {
        self.turns.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Checks the token's session while a job's input arrives, when no job (and not
    /// the watcher) holds the token and the session is ready: the job that takes the
    /// lock next signs on that check instead of making its own, if it is that job's
    /// turn within [`AHEAD_FOR`] ([`Agent::sign_locked`]). The host holds a small job's
    /// last byte while it commits the job, so the check is made meanwhile. Nothing is
    /// held for long: the lock is only tried, and let go once the check is made.
    pub fn ready_ahead(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let agent = Arc::clone(self);
        tokio::spawn(
            async move {
                let Ok(_job) = agent.jobs.try_lock() else {
                    return;
                };
                let turn = agent.next_turn();
                // Only a session that is ready now: a token to be opened or logged in
                // again is left to the job, which tells the host what it found.
                let ready = agent
                    .with_token_quiet(|t| {
                        (t.state().0 == AgentState::Ready)
                            .then(|| t.ensure_ready().ok())
                            .flatten()
                    })
                    .await;
                if let Some(ready) = ready {
                    let at = std::time::Instant::now();
                    if let Ok(mut c) = agent.job_checked.lock() {
                        *c = Some(at);
                    }
                    if let Ok(mut a) = agent.ahead.lock() {
                        *a = Some(Ahead { turn, at, ready });
                    }
                }
            }
            .in_current_span(),
        )
    }

    /// The check made ahead of the job in lock turn `turn` ([`Agent::ready_ahead`]),
    /// if it was made in the turn just before and not too long ago.
    fn take_ahead(&self, turn: u64) -> Option<(crate::token::KeyRef, AuthPin)> {
        let ahead = self.ahead.lock().ok()?.take()?;
        (ahead.turn + 1 == turn && ahead.at.elapsed() < AHEAD_FOR).then_some(ahead.ready)
    }

    /// Signs one checked input; the caller holds the job lock (in turn `turn`, for a
    /// check made ahead of it). Answers the signed result when it was made in memory
    /// (an input held in memory), else `None`: it is the spool's output file; and what
    /// signing changed in the input, when the signer told it and the answer is the
    /// signed file.
    async fn sign_locked(
        &self,
        spool: &Spool,
        checked: &Checked,
        query: &AgentSignQuery,
        turn: Option<u64>,
    ) -> Result<(Option<bytes::Bytes>, Option<Patch>), ErrorBody> {
        let input = &checked.input;
        let ready = match turn.and_then(|t| self.take_ahead(t)) {
            Some(ready) => Ok(ready),
            None => self.with_token(|t| t.ensure_ready()).await,
        };
        if let Ok(mut at) = self.job_checked.lock() {
            *at = ready.is_ok().then(std::time::Instant::now);
        }
        let (key, pin) = ready.map_err(token_error)?;
        if self.signer.certificate_file().is_none() && !key.cert_on_token {
            return Err(ErrorBody::new(
                ErrorCode::SigningFailed,
                format!(
                    "the token \"{}\" holds no certificate with the key's id; write the certificate to the token or set signer.certificate in the agent's configuration",
                    key.token_label
                ),
            ));
        }
        let output = spool.output();
        let spec = SignSpec {
            input,
            output: &output,
            format: checked.format,
            hash: query.hash,
            description: query.description.as_deref(),
            url: query.url.as_deref(),
            page_hashes: query.page_hashes,
            nested: query.nested,
            timestamp: &query.timestamp,
            digested: spool.digested.as_ref(),
        };
        let job = self.next_job.fetch_add(1, Ordering::Relaxed);
        self.events.emit(AgentEventKind::SigningStarted {
            job,
            filename: query.filename.clone(),
        });
        let started = std::time::Instant::now();
        // The token is checked while the signer runs: a signer whose token went away
        // mid-run may wait on it until its time limit (osslsigncode through pcscd does
        // for a reader pulled mid-command), and every job behind it with it. A loss
        // stops the run (the signer's process is killed) and the job goes back to the
        // host as a token loss, at once.
        let mut in_memory = None;
        let mut patch = None;
        let run = async {
            match &spool.memory {
                Some(data) => {
                    match self
                        .signer
                        .sign_in_memory(&key, &pin, &spec, data.clone())
                        .await?
                    {
                        InMemory::Signed(signed) => in_memory = Some(bytes::Bytes::from(signed)),
                        // The input it was signed from is the rest of the result.
                        InMemory::Patched(p) => patch = Some(p),
                    }
                    Ok(())
                }
                None => {
                    patch = self.signer.sign(&key, &pin, &spec).await?.patch;
                    Ok(())
                }
            }
        };
        let mut result = tokio::select! {
            r = run => r,
            detail = self.token_left() => {
                tracing::warn!(token = %key.token_serial, detail = %detail, "the token went away while the signer ran; the signer is stopped");
                Err(SignError::TokenLost(detail))
            }
        };
        if result.is_ok()
            && query.response == SignResponse::Pkcs7
            && checked.format.is_some()
            && spool.memory.is_none()
        {
            // Only the new signature is answered: it replaces the signed file.
            let sig = spool.path().join("signature.p7");
            result = match self.signer.extract_signature(&output, &sig).await {
                Ok(()) => tokio::fs::rename(&sig, &output).await.map_err(|e| {
                    SignError::Failed(format!("cannot keep the extracted signature: {e}"))
                }),
                Err(e) => Err(e),
            };
        }
        let result = match result {
            Ok(()) => {
                tracing::info!(
                    file = query.filename.as_deref().unwrap_or("-"),
                    token = %key.token_serial,
                    ms = started.elapsed().as_millis() as u64,
                    "signed"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(token = %key.token_serial, error = %e, "signing failed");
                Err(self.signer_failed(e, pin, spool).await)
            }
        };
        self.events.emit(AgentEventKind::SigningFinished {
            job,
            ok: result.is_ok(),
            code: result.as_ref().err().map(|e| e.code),
            retryable: result.as_ref().is_err_and(|e| e.retryable),
            ms: started.elapsed().as_millis() as u64,
        });
        // A signature alone answered is not the signed file the patch tells.
        if query.response == SignResponse::Pkcs7 {
            patch = None;
        }
        result.map(|()| (in_memory, patch))
    }

    /// Resolves once a check of the token, every [`RUN_CHECK_INTERVAL`] while a signer
    /// runs, finds it lost; answers what the check saw. The check is the watcher's
    /// between jobs (the session and the key still valid, the module's slot events):
    /// no login and no PIN try.
    async fn token_left(&self) -> String {
        loop {
            tokio::time::sleep(RUN_CHECK_INTERVAL).await;
            let lost = self
                .with_token_quiet(|t| {
                    t.check();
                    let (state, detail) = t.state();
                    (state == AgentState::TokenLost).then_some(detail)
                })
                .await;
            if let Some(detail) = lost {
                return detail;
            }
        }
    }

    /// What a failed signer run means. A token that went away during the run makes
    /// the job retryable, whatever the signer's words were: the agent checks its own
    /// session before calling it a failed signature.
    async fn signer_failed(&self, e: SignError, pin: AuthPin, spool: &Spool) -> ErrorBody {
        let lost = match &e {
            SignError::PinRejected => {
                self.with_token_quiet(move |t| t.refused(&pin)).await;
                false
            }
            SignError::TokenLost(d) => {
                let d = d.clone();
                self.with_token_quiet(move |t| t.lost(d)).await;
                true
            }
            _ => {
                self.with_token_quiet(|t| {
                    t.check();
                    t.state().0 == AgentState::TokenLost
                })
                .await
            }
        };
        // The spool's paths mean nothing to the caller.
        let detail = match &spool.dir {
            Some(dir) => e
                .to_string()
                .replace(&*dir.path().to_string_lossy(), "<job>"),
            None => e.to_string(),
        };
        if lost {
            self.wake.notify_one();
            return ErrorBody::new(
                ErrorCode::TokenUnavailable,
                format!("the token was lost while signing; nothing was signed and the job may be sent again once the token is back ({detail})"),
            )
            .retryable(true);
        }
        ErrorBody::new(e.code(), detail)
    }

    /// The agent's health, without waiting for a running job. Between jobs the
    /// session is checked and the token's flags are read (no login, no PIN try);
    /// during a job the last known state is told.
    pub async fn health(&self) -> AgentHealth {
        let t = match self.jobs.try_lock() {
            Ok(_idle) => self.with_token_quiet(|t| t.health()).await,
            Err(_) => self.with_token_quiet(|t| t.known_health()).await,
        };
        AgentHealth {
            version: signet_api::VERSION.to_owned(),
            instance: Some(self.instance.clone()),
            state: t.state,
            detail: t.detail,
            module: self.module.display().to_string(),
            module_loaded: t.module_loaded,
            slot: t.slot,
            token_present: t.present,
            token: t.token,
            logged_in: t.logged_in,
            pin: t.pin,
            certificates: t.certificates,
            signer: self.signer_version.clone(),
            signer_features: Some(self.signer_features.clone()),
            windows: tokio::task::spawn_blocking(crate::rdp::probe)
                .await
                .ok()
                .flatten(),
        }
    }

    /// Runs blocking PKCS#11 work on the token off the async threads.
    async fn with_token<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn TokenSession) -> Result<T, TokenError> + Send + 'static,
    ) -> Result<T, TokenError> {
        self.with_token_quiet(f).await
    }

    /// As [`Agent::with_token`], for work that cannot fail. What the token work logs
    /// goes under the caller's span (the job's), on the caller's subscriber.
    async fn with_token_quiet<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn TokenSession) -> T + Send + 'static,
    ) -> T {
        let token = self.token.clone();
        let events = self.events.clone();
        let span = tracing::Span::current();
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        tokio::task::spawn_blocking(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                span.in_scope(|| {
                    let mut t = token.lock().unwrap_or_else(|p| p.into_inner());
                    let out = f(t.as_mut());
                    for e in t.take_events() {
                        events.emit(e);
                    }
                    out
                })
            })
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

/// Whether the watcher checks the token this round (taking the job lock, between two
/// jobs). Not while jobs come one after another: each job checks the session itself
/// (`ensure_ready`) before it signs, and the signer's run is watched
/// ([`RUN_CHECK_INTERVAL`]), so a check between them would only make the next job wait
/// for it. Always when it was woken (a job saw the token go), when the token is to be
/// re-opened, and once no job has checked within [`CHECK_INTERVAL`].
fn watcher_checks(plan: Watch, woken: bool, job_checked_ago: Option<Duration>) -> bool {
    woken || plan != Watch::Check || job_checked_ago.is_none_or(|ago| ago >= CHECK_INTERVAL)
}

/// Detects the spooled input's format from its content (and, for text, its name).
/// The kind of file digest mode's data came from, read from its `head`: the profile's
/// formats hold in digest mode too.
fn digest_kind(query: &AgentSignQuery, head: &[u8]) -> Result<Option<format::Format>, ErrorBody> {
    let kind = format::detect_digest_blob(head)
        .map_err(|e| ErrorBody::new(ErrorCode::UnsupportedFormat, e.to_string()))?;
    job::allowed(query, kind)?;
    Ok(kind)
}

/// Digest mode's data accepted when it was made with the profile's hash and page
/// hashes (`options`), as the whole file would be signed.
fn digest_accepted(
    query: &AgentSignQuery,
    kind: Option<format::Format>,
    options: format::BlobOptions,
) -> Result<(), ErrorBody> {
    job::digest_matches(query, kind, options)?;
    tracing::info!(
        profile = query.profile.as_deref().unwrap_or("-"),
        kind = kind.map_or("unknown".to_owned(), |k| k.to_string()),
        "digest-mode input accepted"
    );
    Ok(())
}

async fn detect(
    input: PathBuf,
    filename: Option<String>,
) -> Result<Result<format::Detected, format::FormatError>, ErrorBody> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&input).map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("the spooled input is gone: {e}"),
            )
        })?;
        Ok(format::detect(&file, filename.as_deref()))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// How the spooled Authenticode data was made (digest mode).
async fn blob_options(input: PathBuf) -> Result<format::BlobOptions, ErrorBody> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&input).map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("the spooled input is gone: {e}"),
            )
        })?;
        format::digest_blob_options(&file)
            .map_err(|e| ErrorBody::new(ErrorCode::UnsupportedFormat, e.to_string()))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Reads the first bytes of the spooled input.
async fn read_head(input: &Path) -> Result<Vec<u8>, ErrorBody> {
    let mut head = Vec::with_capacity(format::HEAD_LEN);
    let file = tokio::fs::File::open(input).await.map_err(|e| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the spooled input is gone: {e}"),
        )
    })?;
    file.take(format::HEAD_LEN as u64)
        .read_to_end(&mut head)
        .await
        .map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("cannot read the spooled input: {e}"),
            )
        })?;
    Ok(head)
}

/// A spooled input that passed its checks: where it is, and what it is (`None` for
/// digest mode's Authenticode data).
#[derive(Debug)]
pub struct Checked {
    input: PathBuf,
    format: Option<signet_format::Format>,
    /// The extension of the format's files (`None` for digest mode's data).
    extension: Option<&'static str>,
}

/// How long `token.reinit_command` may take.
const REINIT_COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Runs `token.reinit_command` (program and arguments), logging how it ended; a
/// failure is logged, not fatal: the re-initialisation goes on.
async fn run_reinit_command(cmd: &[String]) {
    let Some((program, args)) = cmd.split_first() else {
        return;
    };
    let mut c = tokio::process::Command::new(program);
    c.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(REINIT_COMMAND_LIMIT, c.output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(command = ?cmd, "token.reinit_command ran")
        }
        Ok(Ok(out)) => tracing::warn!(
            command = ?cmd,
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "token.reinit_command failed; re-initialising PKCS#11 anyway"
        ),
        Ok(Err(e)) => {
            tracing::warn!(command = ?cmd, error = %e, "token.reinit_command could not run; fix it in the agent's configuration")
        }
        Err(_) => {
            tracing::warn!(command = ?cmd, "token.reinit_command took longer than 60 s; stopped")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn cfg(extra: &str) -> Config {
        toml::from_str(&format!(
            "[token]\nmodule = \"C:/SoftHSM2/lib/softhsm2-x64.dll\"\nlabel = \"t\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn the_configuration_chooses_the_backend_and_its_settings() {
        let d = signer_for(&cfg(""));
        assert!(format!("{d:?}").starts_with("Native"), "the default: {d:?}");
        assert_eq!(d.program(), Path::new("osslsigncode"));
        assert_eq!(d.certificate_file(), None);
        let o = signer_for(&cfg("[signer]\nbackend = \"osslsigncode\"\n"));
        assert!(format!("{o:?}").starts_with("Osslsigncode"), "{o:?}");
        assert_eq!(o.program(), Path::new("osslsigncode"));
        assert_eq!(o.certificate_file(), None);

        let c = cfg(
            "[signer]\nbackend = \"signtool\"\nsigntool = \"C:/sdk/signtool.exe\"\ncertificate = \"C:/signet/cs.cer\"\ncontainer = \"te-1\"\nreader = \"AKS ifdh 0\"\ntimeout_seconds = 42\n",
        );
        let s = signer_for(&c);
        assert!(format!("{s:?}").starts_with("SigntoolBackend"), "{s:?}");
        assert_eq!(s.program(), Path::new("C:/sdk/signtool.exe"));
        assert_eq!(s.certificate_file(), Some(Path::new("C:/signet/cs.cer")));
        let n = signer_for(&cfg("[signer]\nbackend = \"native\"\n"));
        assert!(format!("{n:?}").starts_with("Native"), "{n:?}");
        assert_eq!(n.program(), Path::new("osslsigncode"));
        let st = SigntoolBackend::from_config(&c);
        assert_eq!(st.signtool.container, "te-1");
        assert_eq!(st.signtool.reader.as_deref(), Some("AKS ifdh 0"));
        assert_eq!(st.signtool.csp, crate::signtool::SAFENET_CSP);
        assert_eq!(st.timeout, Duration::from_secs(42));
    }

    // The sign, batch and loss paths with a stand-in token and signer.

    use crate::stand_in::{self, Outcome};

    const SCRIPT: &[u8] = b"Write-Host 'hello'\r\n";

    fn query(name: &str) -> AgentSignQuery {
        AgentSignQuery {
            filename: Some(name.into()),
            ..AgentSignQuery::default()
        }
    }

    fn spooled(agent: &Agent, content: &[u8]) -> Spool {
        let spool = agent.spool().unwrap();
        std::fs::write(spool.input(), content).unwrap();
        spool
    }

    /// The names of the events published so far.
    fn published(rx: &mut broadcast::Receiver<AgentEvent>) -> Vec<&'static str> {
        let mut names = Vec::new();
        while let Ok(e) = rx.try_recv() {
            names.push(e.kind.name());
        }
        names
    }

    fn signed(spool: &Spool) -> Vec<u8> {
        std::fs::read(spool.output()).unwrap()
    }

    #[tokio::test]
    async fn a_job_is_signed_with_the_session_and_told_to_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, signer) = stand_in::agent(dir.path()).await;
        let mut events = agent.subscribe();
        let spool = spooled(&agent, SCRIPT);
        let done = agent.sign_once(None, spool, &query("a.ps1")).await.unwrap();
        assert_eq!(signed(&done), b"Write-Host 'hello'\r\n+signed");
        assert_eq!(token.take_calls(), ["ensure_ready"]);
        assert_eq!(
            signer.lock().unwrap().signed,
            ["input.ps1"],
            "named with its format's extension"
        );
        assert_eq!(
            published(&mut events),
            [
                "token_appeared",
                "logged_in",
                "signing_started",
                "signing_finished"
            ]
        );
        assert_eq!(agent.health().await.state, AgentState::Ready);
        assert_eq!(agent.watch_plan().await, Watch::Check);

        // The same job again (same id, options and input) gets its kept result.
        let key = || Some(JobKey::new("7", "filename=a.ps1", [1; 32]));
        let first = agent
            .sign_once(key(), spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        let again = agent
            .sign_once(key(), spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(signer.lock().unwrap().signed.len(), 2, "signed once");
    }

    /// A check made while the input arrives is the job's own when the job takes the
    /// lock next; after anything else took it (the watcher, a login), when a job held
    /// the lock, or before the token was ever opened, the job checks itself.
    #[tokio::test]
    async fn a_check_made_ahead_of_a_job_is_its_own_only_in_the_next_turn() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, _signer) = stand_in::agent(dir.path()).await;
        let agent = Arc::new(agent);
        // Not ready yet (never opened): left to the job.
        agent.ready_ahead().await.unwrap();
        assert_eq!(token.take_calls(), Vec::<String>::new());
        agent.open_token().await;
        assert_eq!(token.take_calls(), ["ensure_ready"]);
        agent.ready_ahead().await.unwrap();
        assert_eq!(token.take_calls(), ["ensure_ready"]);
        let done = agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert_eq!(signed(&done), b"Write-Host 'hello'\r\n+signed");
        assert_eq!(
            token.take_calls(),
            Vec::<String>::new(),
            "no check of its own"
        );

        // Another turn between: the check ahead is stale.
        agent.ready_ahead().await.unwrap();
        agent.open_token().await;
        assert_eq!(token.take_calls(), ["ensure_ready", "ensure_ready"]);
        agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert_eq!(token.take_calls(), ["ensure_ready"]);

        // A job holds the lock: nothing is checked ahead, and the job checks itself.
        let held = agent.jobs.lock().await;
        agent.ready_ahead().await.unwrap();
        drop(held);
        assert_eq!(token.take_calls(), Vec::<String>::new());
        agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert_eq!(token.take_calls(), ["ensure_ready"]);
    }

    fn in_memory(agent: &Agent, content: &'static [u8]) -> Spool {
        agent.memory_spool(bytes::Bytes::from_static(content))
    }

    #[tokio::test]
    async fn a_small_input_is_signed_in_memory_without_a_job_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, signer) = stand_in::agent(dir.path()).await;
        signer.lock().unwrap().in_memory = vec![format::Format::PowerShell];
        let mut events = agent.subscribe();
        let done = agent
            .sign_once(None, in_memory(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert_eq!(
            done.signed().map(|b| b.to_vec()),
            Some(b"Write-Host 'hello'\r\n+signed".to_vec())
        );
        assert_eq!(signer.lock().unwrap().signed, ["<memory>"]);
        assert_eq!(token.take_calls(), ["ensure_ready"]);
        assert_eq!(
            published(&mut events),
            [
                "token_appeared",
                "logged_in",
                "signing_started",
                "signing_finished"
            ]
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no job directory was made"
        );

        // Its checks read the buffer as they read a file: an empty input is refused.
        let e = agent
            .sign_once(None, in_memory(&agent, b""), &query("e.ps1"))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::EmptyInput);

        // The same job again gets its kept result.
        let key = || Some(JobKey::new("8", "filename=a.ps1", [2; 32]));
        let first = agent
            .sign_once(key(), in_memory(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        let again = agent
            .sign_once(key(), in_memory(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(signer.lock().unwrap().signed.len(), 2, "signed once");
        token.take_calls();

        // A token lost while signing in memory: the same retryable answer, the token
        // marked lost, as for a spooled input.
        signer.lock().unwrap().outcome = Outcome::PullToken;
        let e = agent
            .sign_once(None, in_memory(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::TokenUnavailable);
        assert!(e.retryable, "{e:?}");
        assert_eq!(token.take_calls(), ["ensure_ready", "lost"]);
        assert_eq!(agent.health().await.state, AgentState::TokenLost);
    }

    #[tokio::test]
    async fn a_small_input_the_signer_signs_from_files_goes_to_a_job_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, _token, signer) = stand_in::agent(dir.path()).await;
        signer.lock().unwrap().in_memory = vec![format::Format::Pe];
        let done = agent
            .sign_once(None, in_memory(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert_eq!(done.signed(), None);
        assert_eq!(signed(&done), b"Write-Host 'hello'\r\n+signed");
        assert_eq!(
            signer.lock().unwrap().signed,
            ["input.ps1"],
            "written with its format's extension"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(done);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the directory goes with the job"
        );

        // Which uploads are held in memory: a declared length within the bound, of a
        // mode whose likely format the signer signs in memory.
        assert!(agent.keeps_in_memory(SignMode::Whole, Some(MEMORY_INPUT)));
        assert!(!agent.keeps_in_memory(SignMode::Whole, Some(MEMORY_INPUT + 1)));
        assert!(!agent.keeps_in_memory(SignMode::Whole, None));
        assert!(!agent.keeps_in_memory(SignMode::Digest, Some(100)));
        signer.lock().unwrap().in_memory.clear();
        assert!(!agent.keeps_in_memory(SignMode::Whole, Some(100)));
    }

    #[tokio::test]
    async fn a_batch_is_signed_in_order_and_a_bad_file_stops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, signer) = stand_in::agent(dir.path()).await;
        let items = vec![
            (spooled(&agent, b"# one\n"), query("one.ps1")),
            (spooled(&agent, b""), query("empty.ps1")),
            (spooled(&agent, b"# three\n"), query("three.psm1")),
        ];
        let results = agent.sign_batch(&items).await;
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert_eq!(results[1].as_ref().unwrap_err().code, ErrorCode::EmptyInput);
        assert!(results[2].is_ok(), "{:?}", results[2]);
        assert_eq!(signed(&items[0].0), b"# one\n+signed");
        assert_eq!(signed(&items[2].0), b"# three\n+signed");
        assert_eq!(
            signer.lock().unwrap().signed,
            ["input.ps1", "input.psm1"],
            "in the batch's order, the empty file not at all"
        );
        assert_eq!(token.take_calls(), ["ensure_ready", "ensure_ready"]);
    }

    #[tokio::test]
    async fn a_token_lost_mid_job_makes_the_job_retryable_and_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, signer) = stand_in::agent(dir.path()).await;
        let mut events = agent.subscribe();
        signer.lock().unwrap().outcome = Outcome::PullToken;
        let e = agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::TokenUnavailable);
        assert!(e.retryable, "{e:?}");
        assert!(
            e.message
                .contains("the token was lost while signing; nothing was signed"),
            "{}",
            e.message
        );
        assert_eq!(token.take_calls(), ["ensure_ready", "lost"]);
        let names = published(&mut events);
        assert!(
            names.ends_with(&["token_lost", "signing_finished"]),
            "{names:?}"
        );
        assert_eq!(agent.health().await.state, AgentState::TokenLost);
        assert_eq!(agent.watch_plan().await, Watch::Reopen);

        // While it is gone, a job is refused as retryable before the signer runs.
        let e = agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap_err();
        assert_eq!((e.code, e.retryable), (ErrorCode::TokenUnavailable, true));
        assert_eq!(signer.lock().unwrap().signed.len(), 1);

        // Back: the watcher's open finds it, logs in, and jobs are signed again.
        token.get().plugged = true;
        signer.lock().unwrap().outcome = Outcome::Sign;
        assert_eq!(agent.open_token().await.state, AgentState::Ready);
        assert_eq!(published(&mut events), ["token_appeared", "logged_in"]);
        let done = agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert_eq!(signed(&done), b"Write-Host 'hello'\r\n+signed");
    }

    #[tokio::test]
    async fn a_token_pulled_while_the_signer_hangs_stops_it_and_makes_the_job_retryable() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, signer) = stand_in::agent(dir.path()).await;
        let agent = Arc::new(agent);
        let mut events = agent.subscribe();
        // The signer never finishes by itself (it has no time limit here): only the
        // agent's check of the token during the run can end it.
        signer.lock().unwrap().outcome = Outcome::Hang;
        let running = {
            let agent = agent.clone();
            let spool = spooled(&agent, SCRIPT);
            tokio::spawn(async move { agent.sign_once(None, spool, &query("a.ps1")).await })
        };
        while events.recv().await.unwrap().kind.name() != "signing_started" {}
        token.get().plugged = false;
        // A guard against a hang only: the stand-in signer would wait forever.
        let e = tokio::time::timeout(Duration::from_secs(120), running)
            .await
            .expect("the run is stopped once the token is gone")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            (e.code, e.retryable),
            (ErrorCode::TokenUnavailable, true),
            "{e:?}"
        );
        assert!(
            e.message
                .contains("the token was lost while signing; nothing was signed"),
            "{}",
            e.message
        );
        assert_eq!(agent.health().await.state, AgentState::TokenLost);
        assert_eq!(agent.watch_plan().await, Watch::Reopen);

        // Back: the next job is signed.
        token.get().plugged = true;
        signer.lock().unwrap().outcome = Outcome::Sign;
        assert_eq!(agent.open_token().await.state, AgentState::Ready);
        let done = agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
        assert_eq!(signed(&done), b"Write-Host 'hello'\r\n+signed");
    }

    #[tokio::test]
    async fn a_pin_refused_while_signing_is_not_tried_again_until_the_host_sends_one() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, signer) = stand_in::agent(dir.path()).await;
        let mut events = agent.subscribe();
        signer.lock().unwrap().outcome = Outcome::RefusePin;
        let e = agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap_err();
        assert_eq!((e.code, e.retryable), (ErrorCode::PinRejected, false));
        assert_eq!(
            token.take_calls(),
            ["ensure_ready", "refused 1234"],
            "the session hears which PIN was refused"
        );
        assert!(published(&mut events).contains(&"pin_problem"));
        assert_eq!(agent.health().await.state, AgentState::PinRejected);
        assert_eq!(
            agent.watch_plan().await,
            Watch::Wait,
            "no PIN try is spent unattended"
        );

        // The next job does not reach the signer.
        signer.lock().unwrap().outcome = Outcome::Sign;
        let e = agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PinNeeded);
        assert_eq!(signer.lock().unwrap().signed.len(), 1);

        // A wrong PIN from the host is refused; the right one logs in.
        let e = agent.login(AuthPin::new("9999".into())).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PinRejected);
        let h = agent.login(AuthPin::new("1234".into())).await.unwrap();
        assert_eq!(h.state, AgentState::Ready);
        agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_failed_signature_is_not_a_token_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, signer) = stand_in::agent(dir.path()).await;
        signer.lock().unwrap().outcome = Outcome::Fail;
        let e = agent
            .sign_once(None, spooled(&agent, SCRIPT), &query("a.ps1"))
            .await
            .unwrap_err();
        assert_eq!((e.code, e.retryable), (ErrorCode::SigningFailed, false));
        assert_eq!(token.take_calls(), ["ensure_ready"]);
        assert_eq!(agent.health().await.state, AgentState::Ready);
    }

    #[tokio::test]
    async fn reinit_closes_the_session_and_module_and_logs_in_again() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token, _signer) = stand_in::agent(dir.path()).await;
        assert_eq!(agent.open_token().await.state, AgentState::Ready);
        token.take_calls();
        let mut events = agent.subscribe();
        let h = agent.reinit().await;
        assert_eq!(h.state, AgentState::Ready);
        assert_eq!(token.take_calls(), ["close", "ensure_ready"]);
        assert_eq!(
            published(&mut events),
            ["logged_in"],
            "a re-initialisation is not a loss"
        );

        // A token that is gone stays lost through a re-initialisation.
        token.get().plugged = false;
        let h = agent.reinit().await;
        assert_eq!(h.state, AgentState::TokenLost);
        assert!(h.detail.contains("no slot holds"), "{}", h.detail);
        assert_eq!(agent.watch_plan().await, Watch::Reopen);
    }

    #[test]
    fn the_watcher_leaves_the_token_to_jobs_that_check_it_themselves() {
        let just = Some(Duration::from_millis(200));
        // Jobs one after another, each checking the session: no check between them.
        assert!(!watcher_checks(Watch::Check, false, just));
        // No job lately (or none ever, or the last one's check failed): checked.
        assert!(watcher_checks(Watch::Check, false, Some(CHECK_INTERVAL)));
        assert!(watcher_checks(Watch::Check, false, None));
        // A job saw the token go (it woke the watcher), or the token is to be re-opened
        // or waited for: at once, whatever the jobs did.
        assert!(watcher_checks(Watch::Check, true, just));
        assert!(watcher_checks(Watch::Reopen, false, just));
        assert!(watcher_checks(Watch::Wait, false, just));
    }

    fn key(job: &str, query: &str, byte: u8) -> JobKey {
        JobKey::new(job, query, [byte; 32])
    }

    #[test]
    fn a_job_sent_again_finds_its_result_only_with_the_same_options_and_input() {
        let now = Instant::now();
        let mut kept = Kept::default();
        kept.keep(key("7", "profile=a", 1), "signed-7", 10, now);
        assert_eq!(
            kept.find(&key("7", "profile=a", 1), now).0,
            Some("signed-7")
        );
        assert_eq!(
            kept.find(&key("7", "profile=b", 1), now).0,
            None,
            "other options"
        );
        assert_eq!(
            kept.find(&key("7", "profile=a", 2), now).0,
            None,
            "other input"
        );
        assert_eq!(
            kept.find(&key("8", "profile=a", 1), now).0,
            None,
            "other job"
        );
        assert_eq!(key("7", "q", 1).job(), "7");
    }

    #[test]
    fn kept_results_are_bounded_by_count_bytes_and_age() {
        let now = Instant::now();
        let mut kept = Kept::default();
        let mut gone = Vec::new();
        for i in 0..KEPT_RESULTS + 2 {
            gone.extend(kept.keep(key(&i.to_string(), "", 0), i, 1, now));
        }
        assert_eq!(kept.results.len(), KEPT_RESULTS);
        assert_eq!(gone, [0, 1], "the oldest went first, to the caller");
        assert_eq!(kept.find(&key("0", "", 0), now), (None, vec![]));
        assert_eq!(kept.find(&key("9", "", 0), now).0, Some(9));

        // The same job kept again replaces its result, handed back.
        assert_eq!(kept.keep(key("9", "", 0), 90, 1, now), [9]);

        // One result over the byte budget is kept alone; the others make room.
        let gone = kept.keep(key("big", "", 0), 100, KEPT_BYTES + 1, now);
        assert_eq!(gone.len(), KEPT_RESULTS);
        assert_eq!(kept.results.len(), 1);
        assert_eq!(kept.find(&key("big", "", 0), now).0, Some(100));

        // And nothing outlives KEPT_FOR: it is handed back too.
        let later = now + KEPT_FOR;
        assert_eq!(kept.find(&key("big", "", 0), later), (None, vec![100]));
        assert!(kept.results.is_empty());
    }
}

//! The durable job path: a request is recorded, its input kept (in the database when
//! small, [`store::INLINE_MAX`], else spooled to a file), the job queued; one worker per
//! token takes the next job ([`crate::core::queue`]), streams the input to the agent,
//! keeps the result the same way and ends the job with its audit record; the request
//! that is waiting (or any later `GET /v1/jobs/{id}/result`) streams the result.
//!
//! [`JobService`] owns this use case; the fronts call it and render the results.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use futures_util::StreamExt;
use http::header;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use signet_api::wire::patch::{is_patch_type, Patch, PATCH_MAX};
use signet_api::wire::{
    AgentSignQuery, ErrorBody, ErrorCode, JobState, JobView, ProfileOptions, QueueStatus,
    SignQuery, AGENT_BATCH_PATH, AGENT_SIGN_PATH,
};
use signet_protocol::file_body::FileBody;
use signet_protocol::transport::Peer;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::adapters::agent::InputSha;
use crate::adapters::audit::{self, Entry, Outcome};
use crate::adapters::patched;
use crate::adapters::store::{self, Inserted, JobRow, Kind, NewJob, Store, StoreError};
use crate::config::{Config, Current, Profile};
use crate::core::policy::Caller;
use crate::core::queue::Queue;
use crate::core::time::rfc3339;
use crate::core::timeline::Seen;
use crate::services::agent::{client_view, AgentLink};
use crate::services::callers::Callers;
use crate::services::errors::{JobError, MAX_KEY_LEN};
use crate::services::timeline::Timeline;
use crate::services::tokens::Handle;

/// How long the worker waits before it sends a job back to a token that was lost.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How often expired results are removed, at most.
const JANITOR_PERIOD: Duration = Duration::from_secs(60);
/// How often the job database's WAL is copied into it ([`JobService::run_checkpointer`]).
const CHECKPOINT_PERIOD: Duration = Duration::from_secs(1);

/// The transport a request came over, as the audit log names it: `vsock`, `unix`,
/// `tcp`, or `tls` (TCP with TLS).
pub fn transport(peer: &Peer, over_tls: bool) -> &'static str {
    match peer {
        Peer::Vsock { .. } => "vsock",
        Peer::Unix { .. } => "unix",
        Peer::Tcp { .. } if over_tls => "tls",
        Peer::Tcp { .. } => "tcp",
    }
}

/// The queue's in-memory half (the durable half is the `jobs` table).
#[derive(Debug, Default)]
pub(crate) struct Sched {
    queue: Queue,
    /// The jobs at the agent, oldest first: the first is the one at the token, the
    /// second (if any) is being sent to the agent meanwhile.
    at_agent: Vec<AtAgent>,
    /// Jobs in the queue whose spooled input is being flushed (still `receiving`),
    /// until the worker takes them or they are queued.
    landing: HashMap<String, Landing>,
}

/// The largest spooled input sent on to the agent while its file is flushed
/// ([`Landing`]): what the agent holds in memory. A larger one the agent writes to its
/// own spool, and the flush here (ext4 commits the data of files written meanwhile
/// with it) would wait for the agent's writes: measured, 50 MiB jobs took longer so.
const LANDING_MAX: u64 = 1 << 20;

/// A job queued while its input's file is flushed and `queued` committed (or, a small
/// input, while it is committed with `queued` in one transaction): what the worker
/// sends the agent before the job's record says it, and whether it may end.
#[derive(Debug)]
struct Landing {
    /// The input's SHA-256 (hex), once made (a file's is made while the job is
    /// taken: it is known by the time the job is queued), and its length.
    sha: Arc<std::sync::OnceLock<String>>,
    n: u64,
    /// `Some(true)` once the input is durable and the job queued, `Some(false)` (or
    /// closed) when it will not be: then the job is the intake's to end, and its last
    /// byte never goes to the agent.
    durable: watch::Receiver<Option<bool>>,
    /// The input as it was written, whole (empty: read from its file): sent to the
    /// agent, and the signed file made of it, without reading the file or the database.
    input: Vec<bytes::Bytes>,
}

/// Runs `f`, which blocks (a commit waiting for its flush), without holding up the
/// tasks this thread woke: a task woken from a worker thread runs next on that thread
/// and is not taken by another, so on a multi-threaded runtime the worker's tasks go
/// on on another thread meanwhile ([`tokio::task::block_in_place`]). Measured: a small
/// job's way to the agent started ~0.4 ms late, after its `queued` commit.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Waits until it is known whether a [`Landing`] job is queued: false when it will not
/// be (or its intake is gone).
async fn queued(durable: &mut watch::Receiver<Option<bool>>) -> bool {
    matches!(
        durable.wait_for(Option::is_some).await.map(|v| *v),
        Ok(Some(true))
    )
}

/// A job the worker has sent to the agent.
#[derive(Debug)]
struct AtAgent {
    caller: String,
    id: String,
    /// Whether its input went to the agent whole ([`upload`]).
    gate: Arc<Gate>,
}

impl Sched {
    /// The job at the token, if any.
    fn running(&self) -> Option<&str> {
        self.at_agent.first().map(|a| a.id.as_str())
    }

    /// Takes the next job by the queue's turns among the callers with fewer than
    /// `per_caller` jobs at the agent, with its [`Landing`] when it is not queued
    /// durably yet; `gate` makes its gate (told whether it lands), and it counts at the
    /// agent.
    fn take(
        &mut self,
        per_caller: usize,
        gate: impl FnOnce(&str, bool) -> Arc<Gate>,
    ) -> Option<(String, String, Arc<Gate>, Option<Landing>)> {
        let at_agent = &self.at_agent;
        let (caller, id) = self
            .queue
            .take_where(|c| at_agent.iter().filter(|a| a.caller == c).count() < per_caller)?;
        let landing = self.landing.remove(&id);
        let gate = gate(&id, landing.is_some());
        self.at_agent.push(AtAgent {
            caller: caller.clone(),
            id: id.clone(),
            gate: Arc::clone(&gate),
        });
        Some((caller, id, gate, landing))
    }

    /// Job `id` is no longer at the agent.
    fn left(&mut self, id: &str) {
        self.at_agent.retain(|a| a.id != id);
    }

    /// Whether job `id` is the one sent behind the job at the token and still held
    /// (it is queued as far as callers see: not yet at the token).
    fn held(&self, id: &str) -> bool {
        self.at_agent
            .iter()
            .skip(1)
            .any(|a| a.id == id && a.gate.is_held())
    }

    /// Calls back job `id` if it is held behind the job at the token: it goes no
    /// further to the agent. False when it is not held (any more).
    fn call_back(&self, id: &str) -> bool {
        self.at_agent
            .iter()
            .skip(1)
            .any(|a| a.id == id && a.gate.send_back())
    }
}

/// The job engine's state inside [`JobService`].
#[derive(Debug)]
pub(crate) struct Engine {
    store: Arc<Store>,
    sched: Mutex<Sched>,
    wake: Notify,
    done: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// The results being spooled from the agent now, by job: what a waiting
    /// `GET /v1/jobs/{id}/result` streams before the job is signed ([`Live`]).
    live: Mutex<HashMap<String, Live>>,
    /// Changes whenever a result starts being spooled (wakes [`JobService::wait_result`]).
    live_news: watch::Sender<u64>,
    /// The token's serial and certificate fingerprint, from the agent's health.
    token: Mutex<Option<(Option<String>, Option<String>)>>,
    /// Set while the host shuts down: no new jobs, the worker starts none, and a job
    /// sent to the agent behind the one at the token goes back to the queue.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// signetd is stopping ([`JobService::stop`]): uploads are cut, waiting requests are
    /// told their job stays queued — all but the job at the token's until `Closing`.
    stopping: watch::Sender<Stopping>,
    /// Notified whenever the worker ends a job.
    idle: Notify,
    /// The id of every job that ends (signed, failed, cancelled), for D-Bus signals.
    finished: tokio::sync::broadcast::Sender<String>,
    /// Counts the agent's restarts seen ([`JobService::agent_restarted`]): a job at the
    /// agent when it changes will never be answered.
    agent_epoch: watch::Sender<u64>,
    /// Jobs that ended in the crash recovery at start (uploads cut short), before
    /// anything could listen to `finished`: the D-Bus front announces them first.
    ended_at_start: Vec<String>,
    /// The job database failed the last time it was written, and why (for the status).
    store_fault: Mutex<Option<String>>,
    /// What the metrics count as jobs end ([`crate::services::metrics`]).
    metrics: crate::services::metrics::JobMetrics,
}

/// Where signetd is in stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stopping {
    No,
    /// New work is refused; the job at the token may end.
    Draining,
    /// Every waiting request is answered; the process ends.
    Closing,
}

/// A finished job's result, ready to stream.
pub struct Delivery {
    pub id: String,
    pub kind: Kind,
    pub content_type: String,
    /// Its length; unknown for a result streamed while it is spooled (the answer
    /// is chunked, its end withheld until the job is signed).
    pub len: Option<u64>,
    /// Its length when it is streamed before its end and known (a small result, whole
    /// in memory): said in `x-signet-result-length`.
    pub whole_len: Option<u64>,
    /// The SHA-256 of its profile's `GET /v1/profile` answer as it is now
    /// ([`profile_answer`]), when the caller may still use the profile.
    pub profile_sha256: Option<String>,
    /// A result answered as a patch (`signet_api::wire::patch`): the SHA-256 (hex) of
    /// the input it changes, as signetd spooled it, for the caller to check its copy.
    pub input_sha256: Option<String>,
    /// Its spool file (read ahead by a [`FileBody`]), or its bytes from the database.
    pub body: Body,
}

impl Delivery {
    /// As answered to a request that asked for its result early (`Prefer:
    /// early-result`): a single file's length, when known, said as
    /// [`Self::whole_len`] too, also when the job ended before the request looked.
    pub fn asked_early(self, early: bool) -> Delivery {
        let said = self.len.filter(|_| early && self.kind == Kind::Sign);
        Delivery {
            whole_len: self.whole_len.or(said),
            ..self
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("content_type", &self.content_type)
            .field("len", &self.len)
            .field("whole_len", &self.whole_len)
            .field("profile_sha256", &self.profile_sha256)
            .field("input_sha256", &self.input_sha256)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Opens the store under the configured state directory and recovers what a crash
    /// left: uploads cut short fail, jobs queued or at the agent are queued again.
    pub(crate) fn open(state_dir: &Path, quota: u64) -> Result<Engine, StoreError> {
        let store = Arc::new(Store::open(state_dir, quota)?);
        let engine = Engine {
            store,
            sched: Mutex::default(),
            wake: Notify::new(),
            done: Mutex::default(),
            live: Mutex::default(),
            live_news: watch::channel(0).0,
            token: Mutex::default(),
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            stopping: watch::channel(Stopping::No).0,
            idle: Notify::new(),
            finished: tokio::sync::broadcast::channel(256).0,
            agent_epoch: watch::channel(0).0,
            ended_at_start: Vec::new(),
            store_fault: Mutex::default(),
            metrics: Default::default(),
        };
        let ended = engine.recover()?;
        Ok(Engine {
            ended_at_start: ended,
            ..engine
        })
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Whether the spooled input of `row` is the one its record names: its length and
    /// its SHA-256.
    fn input_whole(&self, row: &JobRow) -> bool {
        let Ok(data) = std::fs::read(self.store.input_path(&row.id)) else {
            return false;
        };
        row.input_bytes == Some(data.len() as u64)
            && row.input_sha256.as_deref() == Some(audit::hex(&Sha256::digest(&data)).as_str())
    }

    /// Ends `row`'s job failed as an upload cut short (`message` says why) and removes
    /// its spooled input.
    fn fail_cut_short(&self, row: &JobRow, message: &str) -> Result<(), StoreError> {
        let e = ErrorBody::new(ErrorCode::TruncatedInput, message);
        self.store.finish(
            &row.id,
            JobState::Failed,
            None,
            Some(&e),
            &entry(row, Outcome::Failed, Some(e.code)),
        )?;
        self.store.remove_spooled(&self.store.input_path(&row.id));
        Ok(())
    }

    /// Recovers what a crash left; the ids of the jobs that this ended.
    fn recover(&self) -> Result<Vec<String>, StoreError> {
        let mut ended = Vec::new();
        // A result kept as its input and a patch, committed before the input's file was
        // renamed to the result: renamed now (its readers find it under either name).
        let patched: std::collections::HashSet<String> =
            self.store.patched_jobs()?.into_iter().collect();
        for id in &patched {
            let (input, output) = (self.store.input_path(id), self.store.output_path(id));
            if input.exists() && !output.exists() {
                if let Err(e) = std::fs::rename(&input, &output) {
                    tracing::warn!(job = %id, error = %e, "the signed job's input cannot be renamed to its result; it is read where it is");
                }
            }
        }
        for row in self.store.in_state(JobState::Receiving)? {
            self.fail_cut_short(
                &row,
                "signetd restarted while this file was being uploaded; nothing was signed, send it again",
            )?;
            ended.push(row.id.clone());
        }
        let mut pending = self.store.in_state(JobState::Running)?;
        pending.extend(self.store.in_state(JobState::Queued)?);
        pending.sort_by_key(|r| r.id.parse::<u64>().unwrap_or(0));
        // An input of at most LANDING_MAX in its file was recorded queued while the file
        // was flushed: a crash between the two may have left it short or torn. It is
        // signed only when it is the input its record names.
        let mut kept = Vec::with_capacity(pending.len());
        for row in pending {
            let landed = row
                .input_bytes
                .is_some_and(|n| !store::kept_inline(n) && n <= LANDING_MAX);
            if landed && !self.input_whole(&row) {
                self.fail_cut_short(
                    &row,
                    "signetd stopped before this file's upload was on its disk whole; nothing was signed, send it again",
                )?;
                ended.push(row.id.clone());
                continue;
            }
            kept.push(row);
        }
        let pending = kept;
        let mut sched = lock(&self.sched);
        for row in &pending {
            if row.state == JobState::Running {
                tracing::info!(job = %row.id, "the job was at the agent when signetd stopped; it runs again");
                self.store.requeue(&row.id)?;
            }
            sched.queue.push(&row.caller, &row.id);
        }
        drop(sched);
        if !pending.is_empty() {
            tracing::info!(jobs = pending.len(), "queued jobs resumed");
        }
        // Spool files of no live job (a crash between the commit and the removal).
        let live = self.store.live_ids()?;
        let pending: std::collections::HashSet<&str> =
            pending.iter().map(|r| r.id.as_str()).collect();
        for e in std::fs::read_dir(self.store.spool_dir())? {
            let path = e?.path();
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let is_input = path.extension().is_some_and(|x| x == "in");
            if !live.contains(stem)
                || (is_input && !pending.contains(stem) && !patched.contains(stem))
            {
                self.store.remove_spooled(&path);
            }
        }
        Ok(ended)
    }

    /// Why the job database failed when last written, while it does.
    pub(crate) fn store_fault(&self) -> Option<String> {
        lock(&self.store_fault).clone()
    }

    /// Notes how the last write to the job database went.
    fn store_wrote(&self, result: Result<(), &StoreError>) {
        let mut fault = lock(&self.store_fault);
        match result {
            Ok(()) => {
                if fault.take().is_some() {
                    tracing::info!("the job database is written again");
                }
            }
            Err(e) => {
                let why = if e.disk_full() {
                    "the disk of the state directory is full, so jobs cannot be recorded; free space on it".to_owned()
                } else {
                    format!("jobs cannot be recorded: {e}")
                };
                *fault = Some(why);
            }
        }
    }

    /// The jobs the crash recovery at start ended.
    pub(crate) fn ended_at_start(&self) -> &[String] {
        &self.ended_at_start
    }

    /// The ids of jobs as they end.
    pub(crate) fn finished(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.finished.subscribe()
    }

    fn notify_done(&self, id: &str) {
        // Counted as recorded: a job whose end could not be written is not counted.
        match self.store.get(id) {
            Ok(Some(row)) => self.metrics.job_ended(&row),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = id, error = %e, "the job's end is not counted in the metrics")
            }
        }
        let _ = self.finished.send(id.to_owned());
        if let Some(tx) = lock(&self.done).remove(id) {
            tx.send_replace(true);
        }
    }
}

/// How profile `name` signs, as `GET /v1/profile` answers it.
fn options_of(name: String, profile: &Profile) -> ProfileOptions {
    ProfileOptions {
        name,
        hash: profile.hash,
        page_hashes: profile.page_hashes,
        nested: profile.nested,
        formats: profile.allowed_formats(),
        timestamp: Some(profile.timestamp.clone()),
        certificate: profile.certificate.clone(),
    }
}

/// The body of `GET /v1/profile` for `options`, and its SHA-256 (hex), which the
/// answer and each result of a job with that profile carry
/// ([`signet_api::wire::PROFILE_HEADER`]); a signing request may carry it as its
/// precondition ([`JobService::submit`]).
pub fn profile_answer(options: &ProfileOptions) -> (Vec<u8>, String) {
    let body = serde_json::to_vec(options).unwrap_or_default();
    let sha = audit::hex(&Sha256::digest(&body));
    (body, sha)
}

/// What an idempotency key is bound to besides the body: the SHA-256 (hex) of the
/// job's kind and the request as the caller asked it.
fn request_sha256(kind: &Kind, asked: &signet_api::wire::SignQuery) -> String {
    let kind = match kind {
        Kind::Sign => "sign",
        Kind::Batch => "batch",
    };
    let query = serde_urlencoded::to_string(asked).unwrap_or_default();
    audit::hex(&Sha256::digest(format!("{kind}?{query}").as_bytes()))
}

/// The audit entry of a job, as far as the row knows it.
fn entry(row: &JobRow, result: Outcome, error: Option<ErrorCode>) -> Entry {
    Entry {
        job: Some(row.id.clone()),
        caller: row.caller.clone(),
        transport: row.transport.clone(),
        profile: Some(row.profile.clone()),
        filename: row.filename.clone(),
        input_sha256: row.input_sha256.clone(),
        input_bytes: row.input_bytes,
        result: Some(result),
        error: error.map(|c| c.as_str().to_owned()),
        ..Entry::default()
    }
}

/// A signing request accepted against its profile, not yet recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub profile: String,
    pub caller: Caller,
    /// The largest input the profile takes, in bytes.
    pub max_input_size: u64,
    pub agent_query: AgentSignQuery,
    /// The request as the caller asked it, its profile resolved: what an
    /// idempotency key is bound to, with the body.
    pub asked: SignQuery,
    /// The SHA-256 of the profile's `GET /v1/profile` answer ([`profile_answer`]) as
    /// the job was accepted: what it is signed as.
    pub profile_sha256: String,
    /// The request's precondition (`x-signet-profile`): the SHA-256 of the answer the
    /// caller made its data with.
    pub if_profile: Option<String>,
}

/// A signing request as a front received it: who sent it over what, what it asks (or
/// why its query could not be read), and its body, not yet read.
#[derive(Debug)]
pub struct SubmitRequest {
    pub peer: Peer,
    /// Whether TLS carried it (then the caller proves who it is with credentials).
    pub over_tls: bool,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    pub query: Result<SignQuery, ErrorBody>,
    pub kind: Kind,
    /// A batch's multipart content type.
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
    pub idempotency_key: Option<String>,
    /// `x-signet-profile`: the SHA-256 of the profile answer the caller made its data
    /// with, a precondition of a new job ([`JobService::submit`]).
    pub if_profile: Option<String>,
    /// `Prefer: respond-async`: answer with the queued job, not its result.
    pub respond_async: bool,
    /// `Prefer: early-result` over HTTP/1.1: the result's bytes as soon as they are
    /// here, its end withheld until the job is signed ([`JobService::wait_result`]).
    pub early_result: bool,
    pub body: Body,
}

/// How a signing request ended for the caller.
#[derive(Debug)]
pub enum Signing {
    /// Refused from the headers, before the body was read (audited).
    Refused(JobError),
    /// Refused while the body came (too large, too slow, spool full, bad key, ...).
    Failed(JobError),
    /// Queued; the caller fetches the result later (`Prefer: respond-async`).
    Queued {
        id: String,
        job: Result<JobView, JobError>,
    },
    /// The job ended: its result (or its error).
    Ended {
        id: String,
        caller: Caller,
        result: Result<Delivery, JobError>,
        /// The caller asked for the signature alone (`response=pkcs7`).
        pkcs7: bool,
    },
}

/// How long the token's facts for an audit record may take to read from the agent.
const FACTS_LIMIT: Duration = Duration::from_secs(10);

/// The job path: records, the queue, the token's worker, results, refusals.
#[derive(Debug)]
pub struct JobService {
    engine: Engine,
    config: Arc<Current>,
    timeline: Arc<Timeline>,
    agent: AgentLink,
    /// Refusals waiting to be recorded with their count ([`crate::core::refusals`]).
    refusals: Mutex<crate::core::refusals::Coalescer>,
    /// The token refused the PIN in the host's `pin_file` (until another is given).
    host_pin_rejected: std::sync::atomic::AtomicBool,
    /// The token service's door (the token's facts for the audit log).
    tokens: Mutex<Handle>,
    /// Who is calling.
    callers: Arc<Callers>,
}

impl JobService {
    /// Opens the job database and spool under the configured `state_dir` and resumes
    /// what a previous run left queued.
    pub fn open(
        config: Arc<Current>,
        callers: Arc<Callers>,
        agent: AgentLink,
    ) -> Result<Self, StoreError> {
        let cfg = config.get();
        let quota = cfg.queue.spool_quota_mb.saturating_mul(1 << 20);
        let engine = Engine::open(&cfg.state_dir, quota)?;
        let timeline = Arc::new(Timeline::new(engine.store().clone()));
        let refusals = crate::core::refusals::Coalescer::new(Duration::from_secs(
            cfg.limits.refusal_interval_seconds,
        ));
        Ok(JobService {
            engine,
            agent,
            config,
            timeline,
            refusals: Mutex::new(refusals),
            host_pin_rejected: std::sync::atomic::AtomicBool::new(false),
            tokens: Mutex::new(Handle::off("signetd was started without the token service")),
            callers,
        })
    }

    /// Takes reloaded `[limits]`: the refusals' interval (the worker reads
    /// `max_jobs_per_caller` each time it takes a job).
    pub fn set_limits(&self, limits: &crate::config::Limits) {
        self.refusals()
            .set_interval(Duration::from_secs(limits.refusal_interval_seconds));
    }

    /// Reads the token's facts for audit records through `tokens` from now on.
    pub fn set_tokens(&self, tokens: Handle) {
        *lock(&self.tokens) = tokens;
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    /// The recovery timeline, kept in the job database.
    pub fn timeline(&self) -> &Arc<Timeline> {
        &self.timeline
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The job database, for modules that keep their own tables in it (and for the
    /// audit log: [`crate::adapters::audit::record_refusal`]).
    pub fn store(&self) -> &Arc<Store> {
        self.engine.store()
    }

    /// Whether the token refused the host's PIN (see [`crate::services::agent_watch`]).
    pub fn host_pin_rejected(&self) -> bool {
        self.host_pin_rejected
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn set_host_pin_rejected(&self, rejected: bool) {
        self.host_pin_rejected
            .store(rejected, std::sync::atomic::Ordering::SeqCst);
    }

    /// The coalescer of refusals ([`crate::core::refusals`]).
    pub(crate) fn refusals(&self) -> MutexGuard<'_, crate::core::refusals::Coalescer> {
        lock(&self.refusals)
    }

    /// What the metrics count as jobs end and requests are refused.
    pub fn metrics(&self) -> &crate::services::metrics::JobMetrics {
        &self.engine.metrics
    }

    /// Why the job database failed the last time it was written, if it did.
    pub fn store_fault(&self) -> Option<String> {
        self.engine.store_fault()
    }

    /// The profile `name` (`None`: the default) if it exists and the caller has a
    /// grant for it.
    fn profile(
        &self,
        name: Option<&str>,
        caller: &Caller,
    ) -> Result<(String, Profile, std::sync::Arc<Config>), JobError> {
        let cfg = self.config();
        let name = name.unwrap_or(&cfg.default_profile);
        let Some(profile) = cfg.profiles.get(name) else {
            return Err(JobError::UnknownProfile {
                name: name.to_owned(),
                known: cfg.profiles.keys().cloned().collect(),
                default: cfg.default_profile.clone(),
            });
        };
        if let Err(refusal) = cfg.policy.decide(caller, name) {
            tracing::warn!(caller = %refusal.caller, key = %caller.key(), profile = name, "refused: the caller has no grant for this profile");
            return Err(JobError::Forbidden(refusal));
        }
        let (name, profile) = (name.to_owned(), profile.clone());
        Ok((name, profile, cfg))
    }

    /// How profile `name` (`None`: the default) signs, for a caller that may use it:
    /// what digest mode applies on the client's side.
    pub fn profile_options(
        &self,
        name: Option<&str>,
        caller: &Caller,
    ) -> Result<ProfileOptions, JobError> {
        let (name, profile, _) = self.profile(name, caller)?;
        Ok(options_of(name, &profile))
    }

    /// Checks a signing request against the profiles and the grants and turns it into a
    /// job.
    pub fn accept(&self, query: &SignQuery, caller: &Caller) -> Result<Job, JobError> {
        let (name, profile, cfg) = self.profile(query.profile.as_deref(), caller)?;
        let name = name.as_str();
        let profile = &profile;
        let filename = match &query.filename {
            Some(f) if f.contains(['/', '\\', '\0']) || f.len() > 255 => {
                return Err(JobError::BadFilename)
            }
            f => f.clone(),
        };
        tracing::info!(%caller, profile = name, file = filename.as_deref().unwrap_or("-"), "request accepted");
        // From the same configuration as the job's agent query below: the answer the
        // job is signed as, whatever a reload does after.
        let (_, profile_sha256) = profile_answer(&options_of(name.to_owned(), profile));
        Ok(Job {
            profile_sha256,
            if_profile: None,
            asked: SignQuery {
                profile: Some(name.to_owned()),
                ..query.clone()
            },
            profile: name.to_owned(),
            caller: caller.clone(),
            max_input_size: cfg.max_input_size(profile),
            agent_query: AgentSignQuery {
                profile: Some(name.to_owned()),
                filename,
                description: query
                    .description
                    .clone()
                    .or_else(|| profile.description.clone()),
                url: query.url.clone().or_else(|| profile.url.clone()),
                hash: profile.hash,
                mode: query.mode,
                response: query.response,
                page_hashes: profile.page_hashes,
                nested: profile.nested,
                timestamp: profile.timestamp.clone(),
                formats: profile.allowed_formats(),
            },
        })
    }

    /// The signing use case, whole: who is calling, which profile and whether they may
    /// use it, the declared size, the refusal audited, the body limited as
    /// it streams, the job recorded and queued, then either the queued job or, once it
    /// ended, its result.
    pub async fn sign(&self, req: SubmitRequest) -> Signing {
        let transport = transport(&req.peer, req.over_tls);
        let kind = req.kind;
        let caller =
            self.callers
                .authenticate(&req.peer, req.over_tls, req.authorization.as_deref());
        let who = self.callers.audit_name(&caller, &req.peer);
        let (profile, filename) = req
            .query
            .as_ref()
            .map(|q| (q.profile.clone(), q.filename.clone()))
            .unwrap_or_default();
        let started = caller
            .map_err(JobError::from)
            .and_then(|caller| {
                req.query
                    .map_err(JobError::Request)
                    .and_then(|q| self.accept(&q, &caller))
            })
            .map(|job| Job {
                if_profile: req.if_profile,
                ..job
            })
            .and_then(|job| {
                if req.content_length.is_some_and(|n| n > job.max_input_size) {
                    return Err(JobError::TooLarge {
                        max: job.max_input_size,
                    });
                }
                Ok(job)
            });
        let job = match started {
            Ok(started) => started,
            Err(e) => {
                self.refuse(
                    &who,
                    transport,
                    profile.as_deref(),
                    filename.as_deref(),
                    &ErrorBody::from(&e),
                );
                return Signing::Refused(e);
            }
        };
        let idle = Duration::from_secs(self.config().limits.body_idle_timeout_seconds);
        let (body, tripped) = crate::limits::limit(req.body, job.max_input_size, idle);
        let content_type = match kind {
            Kind::Batch => req.content_type.unwrap_or_default(),
            Kind::Sign => "application/octet-stream".to_owned(),
        };
        let submitted = self
            .submit(
                &job,
                transport,
                kind,
                req.idempotency_key,
                &content_type,
                req.content_length,
                body,
            )
            .await;
        let id = match submitted {
            Ok(id) => id,
            Err(e) => {
                let e = tripped
                    .error(job.max_input_size, idle)
                    .map(JobError::Limit)
                    .unwrap_or(e);
                let told = ErrorBody::from(&e);
                tracing::info!(caller = %job.caller.key(), transport, profile = %job.profile, code = %told.code, "upload refused part-way: {}", told.message);
                return Signing::Failed(e);
            }
        };
        if req.respond_async {
            let view = self.job(&id, &job.caller);
            return Signing::Queued { id, job: view };
        }
        // Asked for early: streamed as `GET /v1/jobs/{id}/result` streams it.
        let live = match (req.early_result, kind) {
            (true, Kind::Sign) => self.wait_result(&id, true).await,
            _ => {
                self.wait(&id).await;
                None
            }
        };
        let result = match live {
            Some(live) => self.live_result(&id, &job.caller, live, false),
            None => self
                .result(&id, &job.caller)
                .await
                .map(|d| d.asked_early(req.early_result)),
        };
        Signing::Ended {
            id,
            result,
            pkcs7: kind == Kind::Sign
                && job.agent_query.response == signet_api::wire::SignResponse::Pkcs7,
            caller: job.caller,
        }
    }

    /// Records a request refused before it became a job (credentials, grant, unknown
    /// profile, bad name, limits). `caller` is the audit identity: the authenticated
    /// caller's [`Caller::key`], or what the transport saw when authentication failed.
    pub fn refuse(
        &self,
        caller: &str,
        transport: &str,
        profile: Option<&str>,
        filename: Option<&str>,
        e: &ErrorBody,
    ) {
        self.engine
            .metrics
            .refused(profile, self.config().profiles.keys(), e.code);
        let refused = crate::core::refusals::Refused {
            caller: caller.to_owned(),
            transport: transport.to_owned(),
            profile: profile.map(str::to_owned),
            filename: filename.map(str::to_owned),
            code: e.code.as_str().to_owned(),
        };
        let out = self.refusals().refused(refused, std::time::Instant::now());
        if out.is_empty() {
            // Counted; recorded with the others of this caller when the interval ends.
            tracing::debug!(%caller, transport, code = %e.code, "request refused again: {}", e.message);
            return;
        }
        tracing::info!(
            %caller,
            transport,
            profile = profile.unwrap_or("-"),
            file = filename.unwrap_or("-"),
            code = %e.code,
            "request refused: {}",
            e.message
        );
        self.record_refusals(out);
    }

    /// Writes coalesced refusals ([`crate::core::refusals`]) to the audit log.
    fn record_refusals(&self, out: Vec<crate::core::refusals::ToRecord>) {
        for t in out {
            let entry = Entry {
                caller: t.refused.caller,
                transport: t.refused.transport,
                profile: t.refused.profile,
                filename: t.refused.filename,
                error: Some(t.refused.code),
                count: t.count,
                ..Entry::default()
            };
            if let Some(n) = t.count {
                tracing::info!(caller = %entry.caller, code = entry.error.as_deref().unwrap_or("-"), count = n, "more requests were refused in the last interval");
            }
            if let Err(err) = audit::record_refusal(&self.engine().store.conn(), &entry) {
                tracing::error!(error = %err, "a refusal could not be recorded in the audit log");
            }
        }
    }

    /// Records the counts of refusals whose interval has passed, for the daemon's
    /// life (`[limits] refusal_interval_seconds`).
    pub async fn run_refusal_flush(self: Arc<Self>) {
        loop {
            // Read each time: a reload may change the interval.
            let interval = self.config().limits.refusal_interval_seconds.max(1);
            let period = Duration::from_secs(interval.div_ceil(4).clamp(1, 15));
            tokio::time::sleep(period).await;
            let due = self.refusals().due(std::time::Instant::now());
            self.record_refusals(due);
        }
    }

    /// Records every refusal still counted (at shutdown).
    pub fn flush_refusals(&self) {
        let all = self.refusals().drain();
        self.record_refusals(all);
    }

    /// Records the job and spools its input (`body`); answers the job's id once it is
    /// queued. A request with the idempotency key of one of the caller's jobs gets that
    /// job, and its body is not read. The job's lane in the queue and its owner is
    /// `job.caller` ([`Caller::key`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn submit(
        &self,
        job: &Job,
        transport: &str,
        kind: Kind,
        key: Option<String>,
        content_type: &str,
        content_length: Option<u64>,
        body: Body,
    ) -> Result<String, JobError> {
        let engine = self.engine();
        let store = &engine.store;
        let caller = job.caller.key();
        if let Some(k) = &key {
            if k.is_empty() || k.len() > MAX_KEY_LEN || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(JobError::BadIdempotencyKey);
            }
        }
        if kind == Kind::Batch && multer::parse_boundary(content_type).is_err() {
            return Err(JobError::BadBatch);
        }
        let full = |len: Option<u64>| {
            let (used, quota) = store.spool_usage();
            JobError::SpoolFull { len, used, quota }
        };
        let refused = |e: &JobError| {
            self.refuse(
                &caller,
                transport,
                Some(&job.profile),
                job.agent_query.filename.as_deref(),
                &ErrorBody::from(e),
            )
        };
        if engine.draining.load(std::sync::atomic::Ordering::SeqCst) {
            let e = JobError::ShuttingDown;
            refused(&e);
            return Err(e);
        }
        // The precondition (`x-signet-profile`, as HTTP's If-Match): data made with an
        // answer the profile no longer gives is refused here, before a record, a byte
        // of the body or the token, so nothing is signed that the caller would throw
        // away. It guards a new job only: a request whose key names a job already taken
        // (sent again across a restart) gets that job, which passed it at its own
        // intake; refusing it would have the caller send the file as a second job.
        if job
            .if_profile
            .as_deref()
            .is_some_and(|h| !h.eq_ignore_ascii_case(&job.profile_sha256))
        {
            let taken = match &key {
                Some(k) => store.keyed_job(&caller, k).ok().flatten().is_some(),
                None => false,
            };
            if !taken {
                let e = JobError::ProfileChanged {
                    name: job.profile.clone(),
                };
                refused(&e);
                return Err(e);
            }
        }
        let mut reserved = 0u64;
        if let Some(len) = content_length {
            if !store.reserve(len) {
                let e = full(Some(len));
                refused(&e);
                return Err(e);
            }
            reserved = len;
        }
        let agent_query = serde_urlencoded::to_string(&job.agent_query)
            .map_err(|e| JobError::internal("-", "encoding the agent query", &e))?;
        let request = request_sha256(&kind, &job.asked);
        let inserted = store.insert(&NewJob {
            caller: caller.clone(),
            transport: transport.to_owned(),
            idempotency_key: key.clone(),
            kind,
            profile: job.profile.clone(),
            filename: job.agent_query.filename.clone(),
            agent_query,
            content_type: content_type.to_owned(),
            request_sha256: Some(request.clone()),
        });
        engine.store_wrote(inserted.as_ref().map(|_| ()));
        let id = match inserted {
            Ok(Inserted::New(id)) => id,
            Ok(Inserted::Existing(id)) => {
                store.release(reserved);
                let same = self
                    .same_request(&id, key.as_deref().unwrap_or_default(), &request, body)
                    .await;
                if let Err(e) = &same {
                    refused(e);
                } else {
                    tracing::info!(job = %id, %caller, "idempotency key seen before, same request: same job");
                }
                return same;
            }
            Err(e) => {
                store.release(reserved);
                return Err(if e.disk_full() {
                    JobError::disk_full(&self.config().state_dir, "-", &e)
                } else {
                    JobError::internal("-", "recording the job", &e)
                });
            }
        };
        // Every line of the job from here on, under one span with its id.
        let span = tracing::info_span!("job", job = %id);
        async {
            tracing::info!(job = %id, %caller, profile = %job.profile, file = job.agent_query.filename.as_deref().unwrap_or("-"), "job accepted");
            let path = store.input_path(&id);
            let spooled = {
                let mut stop = engine.stopping.subscribe();
                tokio::select! {
                    s = spool(store, &path, body, &mut reserved) => s,
                    _ = stop.wait_for(|s| *s != Stopping::No) => Err(Spool::Stopped),
                }
            };
            store.release(reserved);
            // A job whose input was not kept ends failed, as the caller is told.
            let spool_failed = |fault: Spool| {
                store.remove_spooled(&path);
                let e = match fault {
                    Spool::Full => full(None),
                    Spool::Broken(e) => JobError::Truncated { why: e.to_string() },
                    Spool::Stopped => JobError::UploadCut,
                    Spool::Disk(e) if store::io_disk_full(&e) => {
                        JobError::disk_full(&self.config().state_dir, &id, &e)
                    }
                    Spool::Disk(e) => JobError::internal(&id, "spooling the input", &e),
                };
                // The job's record keeps the error as the caller is told it.
                let recorded = ErrorBody::from(&e);
                if let Ok(Some(row)) = store.get(&id) {
                    let _ = store.finish(
                        &id,
                        JobState::Failed,
                        None,
                        Some(&recorded),
                        &entry(&row, Outcome::Failed, Some(recorded.code)),
                    );
                }
                engine.notify_done(&id);
                e
            };
            let Received {
                n,
                sha: hashing,
                inline,
                flush,
                blocks,
            } = match spooled {
                Ok(done) => done,
                Err(fault) => return Err(spool_failed(fault)),
            };
            let queue_error = |e: StoreError| {
                if e.disk_full() {
                    JobError::disk_full(&self.config().state_dir, &id, &e)
                } else {
                    JobError::internal(&id, "queueing the job", &e)
                }
            };
            // A small input is kept with `queued` in one transaction: an empty one
            // before the job takes its place (it has no last byte to hold).
            let inline = inline.map(bytes::Bytes::from);
            if let Some(data) = inline.as_ref().filter(|d| d.is_empty()) {
                let sha = hashing
                    .made()
                    .await
                    .map_err(|e| spool_failed(Spool::Disk(e)))?;
                let queued = store.queued_inline(&id, &sha, data);
                engine.store_wrote(queued.as_ref().map(|_| ()));
                queued.map_err(queue_error)?;
                lock(&engine.sched).queue.push(&caller, &id);
                engine.wake.notify_one();
                return Ok(id);
            }
            // A larger one is in its file, whose flush is under way.
            if inline.is_none() && n > LANDING_MAX {
                let sha = hashing
                    .made()
                    .await
                    .map_err(|e| spool_failed(Spool::Disk(e)))?;
                if let Some(flush) = flush {
                    if let Err(e) = flush.done().await {
                        return Err(spool_failed(Spool::Disk(e)));
                    }
                }
                let queued = store.queued(&id, &sha, n);
                engine.store_wrote(queued.as_ref().map(|_| ()));
                queued.map_err(queue_error)?;
                lock(&engine.sched).queue.push(&caller, &id);
                engine.wake.notify_one();
                return Ok(id);
            }
            // Up to LANDING_MAX, the job takes its place in the queue now, and its
            // input goes on to the agent meanwhile all but its last byte, which waits
            // until the file is hashed and flushed and `queued` committed, or (a small
            // input) until the input and `queued` are committed in one transaction
            // ([`Landing`]); the SHA-256 of a file follows its input as a trailer.
            // Nothing is signed before the input is durable and the job queued; a crash
            // before leaves the job `receiving` (failed at the next start, as an upload
            // cut short) and the agent an upload that never ended.
            let sha = Arc::new(std::sync::OnceLock::new());
            if let Hashing::Made(made) = &hashing {
                let _ = sha.set(audit::hex(made));
            }
            let (durable_tx, durable) = watch::channel(None);
            {
                let mut s = lock(&engine.sched);
                s.landing.insert(
                    id.clone(),
                    Landing {
                        sha: Arc::clone(&sha),
                        n,
                        durable,
                        input: match &inline {
                            Some(data) => vec![data.clone()],
                            None => blocks.unwrap_or_default(),
                        },
                    },
                );
                s.queue.push(&caller, &id);
            }
            engine.wake.notify_one();
            let landed_off = |ok: bool| {
                {
                    let mut s = lock(&engine.sched);
                    if s.landing.remove(&id).is_some() && !ok {
                        // Not taken by the worker yet: it never will be.
                        s.queue.cancel(&id);
                    }
                }
                durable_tx.send_replace(Some(ok));
            };
            let made = match hashing.made().await {
                Ok(made) => made,
                Err(e) => {
                    landed_off(false);
                    return Err(spool_failed(Spool::Disk(e)));
                }
            };
            let _ = sha.set(made.clone());
            // The commit waits for its flush: the worker, woken above, takes the job and
            // starts its way to the agent meanwhile ([`blocking`]).
            let commit = |input: Option<&bytes::Bytes>| {
                blocking(|| match input {
                    Some(data) => store.queued_inline(&id, &made, data),
                    None => store.queued(&id, &made, n),
                })
            };
            if let Some(data) = &inline {
                let queued = commit(Some(data));
                if queued.is_err() {
                    store.release(n);
                }
                engine.store_wrote(queued.as_ref().map(|_| ()));
                landed_off(queued.is_ok());
                queued.map_err(queue_error)?;
                return Ok(id);
            }
            // `queued` is committed while the file is flushed, and counts (the last byte
            // goes to the agent, the caller is answered) only once both are done. A
            // crash between the two leaves a job recorded queued whose file may not be
            // whole: the next start checks it against its SHA-256 ([`Engine::recover`]).
            let queued = commit(None);
            engine.store_wrote(queued.as_ref().map(|_| ()));
            let flushed = match flush {
                Some(flush) => flush.done().await,
                None => Ok(()),
            };
            if let Err(e) = flushed {
                landed_off(false);
                return Err(spool_failed(Spool::Disk(e)));
            }
            landed_off(queued.is_ok());
            queued.map_err(queue_error)?;
            Ok(id)
        }
        .instrument(span)
        .await
    }

    /// Whether a request with job `id`'s idempotency key asks what that job was asked:
    /// the same request (kind, profile, options) and the same body, whose SHA-256 is
    /// taken as it is read. Answers `id` when it does, `idempotency_key_reused` when
    /// not: a key never hands out another request's result.
    async fn same_request(
        &self,
        id: &str,
        key: &str,
        request: &str,
        body: Body,
    ) -> Result<String, JobError> {
        let store = &self.engine().store;
        let reused = |what: &'static str| JobError::KeyReused {
            key: key.to_owned(),
            id: id.to_owned(),
            what,
        };
        let bound = store
            .request_sha256(id)
            .map_err(|e| JobError::internal(id, "reading the job", &e))?;
        if bound.is_some_and(|b| b != request) {
            return Err(reused("another profile or other options"));
        }
        let mut hasher = Sha256::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| JobError::TruncatedRepeat { why: e.to_string() })?;
            hasher.update(&chunk);
        }
        let sha = audit::hex(&hasher.finalize());
        let row = store
            .get(id)
            .map_err(|e| JobError::internal(id, "reading the job", &e))?;
        match row.and_then(|r| r.input_sha256) {
            Some(s) if s == sha => Ok(id.to_owned()),
            Some(_) => Err(reused("another file")),
            None => Err(JobError::StillUploading { id: id.to_owned() }),
        }
    }

    /// Waits until the job has ended.
    pub async fn wait(&self, id: &str) {
        let engine = self.engine();
        let mut rx = lock(&engine.done)
            .entry(id.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        let ended = |engine: &Engine| {
            engine
                .store
                .get(id)
                .ok()
                .flatten()
                .is_none_or(|r| r.state.is_final())
        };
        let mut stop = engine.stopping.subscribe();
        loop {
            if ended(engine) {
                lock(&engine.done).remove(id);
                return;
            }
            // Stopping: only the job at the token is waited for, and only while it
            // may still end.
            let at_token = lock(&engine.sched).at_agent.iter().any(|a| a.id == id);
            match *stop.borrow_and_update() {
                Stopping::No => {}
                Stopping::Draining if at_token => {}
                _ => return,
            }
            tokio::select! {
                r = rx.wait_for(|d| *d) => if r.is_err() { return },
                r = stop.changed() => if r.is_err() { return },
            }
        }
    }

    /// Waits until the job has ended, as [`Self::wait`] does, or until its signed file
    /// is being spooled from the agent: then answers it, to be streamed as it lands
    /// ([`Self::live_result`]). With `small`, also a result small enough to be kept in
    /// the database, once it is here whole (before the job is committed signed).
    pub async fn wait_result(&self, id: &str, small: bool) -> Option<Live> {
        let engine = self.engine();
        let mut rx = lock(&engine.done)
            .entry(id.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        let mut news = engine.live_news.subscribe();
        let mut stop = engine.stopping.subscribe();
        loop {
            news.mark_unchanged();
            if engine
                .store
                .get(id)
                .ok()
                .flatten()
                .is_none_or(|r| r.state.is_final())
            {
                lock(&engine.done).remove(id);
                return None;
            }
            let live = lock(&engine.live).get(id).cloned();
            if let Some(live) = live {
                let mut p = live.progress.clone();
                // Written to its file: streamed from there. Whole in memory (small,
                // kept in the database): streamed from there when asked for, else the
                // job's end says, as it does when it failed.
                let now = p.wait_for(|p| *p != Progress::Pending).await.map(|p| *p);
                if let Ok(Progress::Writing(_)) = now {
                    if small || live.whole.get().is_none() {
                        return Some(live);
                    }
                }
            }
            let at_token = lock(&engine.sched).at_agent.iter().any(|a| a.id == id);
            match *stop.borrow_and_update() {
                Stopping::No => {}
                Stopping::Draining if at_token => {}
                _ => return None,
            }
            tokio::select! {
                r = rx.wait_for(|d| *d) => if r.is_err() { return None },
                r = stop.changed() => if r.is_err() { return None },
                r = news.changed() => if r.is_err() { return None },
            }
        }
    }

    /// Job `id`'s result as it is spooled from the agent ([`Self::wait_result`]): its
    /// bytes are sent as they are written; the body ends only once the job is `signed`
    /// with its audit record, and breaks off (the client collects again) if the job
    /// does not end signed with these bytes. With `patch_ok`, a result kept as the
    /// input and a patch ([`Live::is_patch`]) is that patch, at once, with the input's
    /// SHA-256, for a caller that holds the input; its end likewise.
    pub fn live_result(
        &self,
        id: &str,
        caller: &Caller,
        live: Live,
        patch_ok: bool,
    ) -> Result<Delivery, JobError> {
        let row = self.caller_job(id, caller)?;
        let profile_sha256 = self.profile_sha256(&row, caller);
        let (content_type, input_sha256, whole_len, body) = if patch_ok && live.is_patch() {
            (
                signet_api::wire::patch::PATCH_MEDIA_TYPE.to_owned(),
                live.input_sha256.clone(),
                None,
                Body::from_stream(live.patch_answer()),
            )
        } else {
            (
                live.content_type.clone(),
                None,
                live.whole.get().map(|b| b.len() as u64),
                Body::from_stream(live.blocks()),
            )
        };
        Ok(Delivery {
            id: row.id,
            kind: row.kind,
            content_type,
            len: None,
            whole_len,
            profile_sha256,
            input_sha256,
            body,
        })
    }

    /// The SHA-256 of `row`'s profile's `GET /v1/profile` answer as it is now, when
    /// `caller` may still use the profile.
    fn profile_sha256(&self, row: &JobRow, caller: &Caller) -> Option<String> {
        self.profile_options(Some(&row.profile), caller)
            .ok()
            .map(|o| profile_answer(&o).1)
    }

    /// Job `id`, if `caller` sent it: a caller sees and acts on its own jobs only.
    fn caller_job(&self, id: &str, caller: &Caller) -> Result<JobRow, JobError> {
        match self.engine().store.get(id) {
            Ok(Some(row)) if row.caller == caller.key() => Ok(row),
            Ok(_) => Err(JobError::UnknownJob { id: id.to_owned() }),
            Err(e) => Err(JobError::internal(id, "reading the job", &e)),
        }
    }

    /// Job `id`'s result was streamed out whole: it stops counting against the spool
    /// quota (a copy stays for a retry while there is room, see [`crate::adapters::store`]).
    pub fn delivered(&self, id: &str) {
        if self.engine().store.delivered(id) {
            tracing::debug!(job = id, "result delivered");
        }
    }

    /// A job's state, its place in the queue and an estimate.
    pub fn job(&self, id: &str, caller: &Caller) -> Result<JobView, JobError> {
        let row = self.caller_job(id, caller)?;
        Ok(self.view(&row))
    }

    pub(crate) fn view(&self, row: &JobRow) -> JobView {
        let sched = lock(&self.engine().sched);
        // The job sent to the agent behind the one at the token is next, and runs
        // before every job in the queue.
        let behind = sched.at_agent.iter().filter(|a| a.gate.is_held()).count();
        let position = (row.state == JobState::Queued)
            .then(|| {
                if sched.held(&row.id) {
                    Some(0)
                } else {
                    sched.queue.position(&row.id).map(|p| p + behind)
                }
            })
            .flatten();
        let estimate = match row.state {
            JobState::Queued => sched
                .queue
                .estimate_ms(position.unwrap_or(0), sched.running().is_some()),
            JobState::Running => sched.queue.estimate_ms(0, false),
            _ => None,
        };
        JobView {
            id: row.id.clone(),
            state: row.state,
            profile: row.profile.clone(),
            filename: row.filename.clone(),
            created: rfc3339(row.created_ms),
            finished: row.finished_ms.map(rfc3339),
            position: position.map(|p| p as u64),
            estimate_seconds: estimate.map(|ms| ms.div_ceil(1000)),
            attempts: row.attempts,
            error: row.error.clone(),
            result_available: row.state == JobState::Signed && !row.result_gone,
        }
    }

    /// Cancels a job that waits for its turn.
    pub fn cancel(&self, id: &str, caller: &Caller) -> Result<JobView, JobError> {
        let row = self.caller_job(id, caller)?;
        self.cancel_row(row)
    }

    /// Cancels `row`'s job, whoever sent it: the front has checked who may.
    pub(crate) fn cancel_row(&self, row: JobRow) -> Result<JobView, JobError> {
        let engine = self.engine();
        let id = row.id.clone();
        let id = id.as_str();
        let removed = {
            let mut s = lock(&engine.sched);
            // Waiting in the queue, or held behind the job at the token; not while
            // its input is flushed (it is `receiving` until then).
            !s.landing.contains_key(id) && (s.queue.cancel(id) || s.call_back(id))
        };
        if removed {
            let e = ErrorBody::new(
                ErrorCode::Cancelled,
                format!("job {id} was cancelled before it was signed"),
            );
            engine
                .store
                .finish(
                    id,
                    JobState::Cancelled,
                    None,
                    Some(&e),
                    &entry(&row, Outcome::Cancelled, None),
                )
                .map_err(|e| JobError::internal(id, "cancelling the job", &e))?;
            engine.store.remove_spooled(&engine.store.input_path(id));
            engine.notify_done(id);
            tracing::info!(job = id, "cancelled");
        } else if !row.state.is_final() {
            return Err(JobError::NotCancellable {
                id: id.to_owned(),
                state: row.state,
            });
        }
        let row = match engine.store.get(id) {
            Ok(Some(row)) => row,
            Ok(None) => row,
            Err(e) => return Err(JobError::internal(id, "reading the job", &e)),
        };
        Ok(self.view(&row))
    }

    /// The result of an ended job: the signed file, or the job's error.
    pub async fn result(&self, id: &str, caller: &Caller) -> Result<Delivery, JobError> {
        self.result_as(id, caller, false).await
    }

    /// [`Self::result`]; with `patch_ok`, a signed file kept as its input and a patch is
    /// answered as that patch (of media type [`signet_api::wire::patch::PATCH_MEDIA_TYPE`],
    /// with the input's SHA-256 in [`Delivery::input_sha256`]), for a caller that holds
    /// the input it sent and makes the signed file itself.
    pub async fn result_as(
        &self,
        id: &str,
        caller: &Caller,
        patch_ok: bool,
    ) -> Result<Delivery, JobError> {
        let row = self.caller_job(id, caller)?;
        match row.state {
            JobState::Signed => {
                let ttl = self.config().queue.result_ttl_seconds;
                if row.result_gone {
                    return Err(JobError::ResultExpired {
                        id: id.to_owned(),
                        ttl,
                    });
                }
                let store = &self.engine().store;
                let gone = || JobError::DeliveredCopyGone {
                    id: id.to_owned(),
                    ttl,
                };
                let patch = store
                    .result_patch(id)
                    .map_err(|e| JobError::internal(id, "reading the result", &e))?;
                let profile_sha256 = self.profile_sha256(&row, caller);
                if let (true, Kind::Sign, Some(patch), Some(sha)) =
                    (patch_ok, row.kind, &patch, &row.input_sha256)
                {
                    let json = serde_json::to_vec(&patch.to_patch())
                        .map_err(|e| JobError::internal(id, "writing the patch", &e))?;
                    return Ok(Delivery {
                        id: row.id,
                        kind: row.kind,
                        content_type: signet_api::wire::patch::PATCH_MEDIA_TYPE.to_owned(),
                        len: Some(json.len() as u64),
                        whole_len: None,
                        profile_sha256,
                        input_sha256: Some(sha.clone()),
                        body: Body::from(json),
                    });
                }
                let body = match patch {
                    // Kept as the input and a patch: made as it is read.
                    Some(patch) => {
                        let mut opened = Err(gone());
                        for p in store.kept_paths(id) {
                            if let Ok(f) = open_spooled(p).await {
                                opened = Ok(f);
                                break;
                            }
                        }
                        let input = opened?.into_data_stream().boxed();
                        Body::from_stream(patched_blocks(input, patch))
                    }
                    None => match open_spooled(store.output_path(id)).await {
                        Ok(f) => Body::new(f),
                        // Kept in the database (delivered or not), or delivered once
                        // already: the copy kept for a retry, while it lasts.
                        Err(_) => match store
                            .inline_output(id)
                            .map_err(|e| JobError::internal(id, "reading the result", &e))?
                        {
                            Some(data) => Body::from(data),
                            None => Body::new(
                                open_spooled(store.delivered_path(id))
                                    .await
                                    .map_err(|_| gone())?,
                            ),
                        },
                    },
                };
                Ok(Delivery {
                    id: row.id,
                    kind: row.kind,
                    content_type: row
                        .output_type
                        .unwrap_or_else(|| "application/octet-stream".to_owned()),
                    len: Some(row.output_bytes.unwrap_or(0)),
                    whole_len: None,
                    profile_sha256,
                    input_sha256: None,
                    body,
                })
            }
            JobState::Failed | JobState::Cancelled => {
                Err(JobError::Failed(row.error.unwrap_or_else(|| {
                    ErrorBody::new(ErrorCode::Internal, format!("job {id} failed"))
                })))
            }
            JobState::Queued | JobState::Running if self.stopping() => {
                Err(JobError::StaysQueued { id: id.to_owned() })
            }
            state => Err(JobError::NoResultYet {
                id: id.to_owned(),
                state,
            }),
        }
    }

    /// The queue, for `GET /v1/status`.
    pub fn queue_status(&self) -> QueueStatus {
        let engine = self.engine();
        let sched = lock(&engine.sched);
        let (used, quota) = engine.store.spool_usage();
        QueueStatus {
            running: sched.running().map(str::to_owned),
            // The job being sent to the agent while another is at the token waits too.
            waiting: (sched.queue.len() + sched.at_agent.len().saturating_sub(1)) as u64,
            by_caller: sched
                .queue
                .by_caller()
                .into_iter()
                .map(|(c, n)| (c, n as u64))
                .collect(),
            recent_job_ms: sched.queue.estimate_ms(0, false),
            spool_used_bytes: used,
            spool_quota_bytes: quota,
        }
    }

    /// Stops taking jobs (new requests get `shutting_down`; queued jobs stay queued, on
    /// disk) and waits up to `grace` for the job at the agent, if any, to end. Answers
    /// whether no job is at the agent any more; one still there is run again after the
    /// restart, as after a crash.
    pub async fn drain(&self, grace: Duration) -> bool {
        let engine = self.engine();
        engine
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("taking no new jobs");
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let ended = engine.idle.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if lock(&engine.sched).at_agent.is_empty() {
                return true;
            }
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep_until(deadline) => return lock(&engine.sched).at_agent.is_empty(),
            }
        }
    }

    /// Stops signetd's work within `bound` (SIGTERM): new work is refused at once
    /// (`shutting_down`), uploads in progress are cut, requests waiting for a queued
    /// job are told it stays queued, the job at the token gets until `bound` to end;
    /// then every waiting request is answered. Queued jobs stay on disk and run after
    /// the restart; a job still at the agent runs again then. Answers whether the job
    /// at the token (if any) ended.
    pub async fn stop(&self, bound: Duration) -> bool {
        let engine = self.engine();
        engine.stopping.send_replace(Stopping::Draining);
        let ended = self.drain(bound).await;
        let running = lock(&engine.sched).running().map(str::to_owned);
        engine.stopping.send_replace(Stopping::Closing);
        let waiting = lock(&engine.sched).queue.len();
        match running {
            Some(id) if !ended => {
                tracing::warn!(job = %id, bound_seconds = bound.as_secs(), waiting, "stopping with a job still at the agent; it runs again after the restart, as do the queued jobs")
            }
            _ => tracing::info!(waiting, "stopping; the queued jobs run after the restart"),
        }
        ended
    }

    /// Whether signetd is stopping ([`JobService::stop`]).
    pub fn stopping(&self) -> bool {
        *self.engine().stopping.borrow() != Stopping::No
    }

    /// Takes jobs again after [`JobService::drain`] (a shutdown that was cancelled).
    pub fn resume(&self) {
        let engine = self.engine();
        engine
            .draining
            .store(false, std::sync::atomic::Ordering::SeqCst);
        engine.wake.notify_one();
    }

    /// Wakes the token's worker: the token or the agent may be back.
    pub fn wake_worker(&self) {
        self.engine().wake.notify_one();
    }

    /// The agent is another process than before (its VM was reset, it restarted): the
    /// job at it, if any, will never be answered — over a hybrid vsock a guest reset
    /// does not even close the host's side of the connection — so it goes back to the
    /// head of its lane and runs again (safe: its result was never delivered).
    pub fn agent_restarted(&self) {
        self.engine().agent_epoch.send_modify(|e| *e += 1);
        self.wake_worker();
    }

    /// Whether the daemon is draining for a host shutdown.
    pub fn draining(&self) -> bool {
        self.engine()
            .draining
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The token's worker: the next job by the queue's turns, each caller with at most
    /// `limits.max_jobs_per_caller` jobs at the agent. While one job is at the token
    /// the next one's input is sent to the agent ([`UNANSWERED`] jobs not yet answered
    /// at most), all but its last byte until the one before it is answered
    /// ([`upload`]): the agent gets the jobs whole, and reaches its job lock with them,
    /// in the queue's order, and the token has the next job as soon as it is free. A
    /// job that was answered spools its result meanwhile ([`AT_AGENT`] jobs in all at
    /// most). Runs for the daemon's life.
    pub async fn run_worker(self: Arc<Self>) {
        let mut flights: VecDeque<Flight> = VecDeque::new();
        loop {
            let engine = self.engine();
            // The next job starts once the last one's input is sent, and while fewer
            // than UNANSWERED wait for the token.
            let mut unanswered = 0;
            let mut last_sent = true;
            for f in flights.iter_mut() {
                let p = *f.phase.borrow_and_update();
                unanswered += usize::from(!p.answered());
                last_sent = p.sent();
            }
            if !self.draining() && flights.len() < AT_AGENT && unanswered < UNANSWERED && last_sent
            {
                let per_caller = self.config().limits.max_jobs_per_caller;
                // Behind a job at the agent, a job's last byte is held until it is
                // released, and it counts as running from then on.
                // So is a job's whose input is still being flushed ([`Landing`]).
                let held = !flights.is_empty();
                let next = lock(&engine.sched).take(per_caller, |id, landing| {
                    Arc::new(Gate::new(
                        (held || landing).then(|| (Arc::clone(engine.store()), id.to_owned())),
                    ))
                });
                if let Some((caller, id, gate, landing)) = next {
                    let prev = flights.back().map(|f| f.phase.clone());
                    let (tx, rx) = watch::channel(Phase::Sending);
                    let this = Arc::clone(&self);
                    let job = id.clone();
                    let task =
                        tokio::spawn(
                            async move { this.run_job(&job, prev, gate, landing, tx).await },
                        );
                    flights.push_back(Flight {
                        caller,
                        id,
                        phase: rx,
                        task,
                    });
                    continue;
                }
            }
            let mut phases: Vec<_> = flights.iter().map(|f| f.phase.clone()).collect();
            let Some(front) = flights.front_mut() else {
                engine.wake.notified().await;
                continue;
            };
            // Any job's next phase may let the next job start.
            let changed = futures_util::future::select_all(phases.iter_mut().map(|p| {
                Box::pin(async move {
                    // A phase that can no longer change wakes nothing.
                    if p.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                })
            }));
            let ended = tokio::select! {
                r = &mut front.task => Some(r),
                _ = changed => None,
                _ = engine.wake.notified() => None,
            };
            let Some(ended) = ended else { continue };
            let Some(done) = flights.pop_front() else {
                continue;
            };
            let again = ended.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            let mut back = Vec::new();
            if again {
                // The job after it was sent back with it (or runs to its end first):
                // both go back to the head of the queue in their order.
                back.push((done.caller, done.id.clone()));
                while let Some(f) = flights.pop_front() {
                    let a = f
                        .task
                        .await
                        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                    lock(&engine.sched).left(&f.id);
                    if a {
                        back.push((f.caller, f.id));
                    }
                }
            }
            {
                let mut s = lock(&engine.sched);
                s.left(&done.id);
                for (caller, id) in back.iter().rev() {
                    s.queue.push_front(caller, id);
                }
            }
            engine.idle.notify_waiters();
            if again {
                // Sooner when the agent watcher sees the token or the agent come back.
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    _ = engine.wake.notified() => {}
                }
            }
        }
    }

    /// Removes expired results now and then. Runs for the daemon's life.
    pub async fn run_janitor(self: Arc<Self>) {
        let ttl = self.config().queue.result_ttl_seconds;
        let period = JANITOR_PERIOD.min(Duration::from_secs(ttl.max(1)));
        loop {
            // Off the runtime's threads: unlinking large files takes milliseconds.
            let store = Arc::clone(&self.engine().store);
            tokio::task::spawn_blocking(move || {
                match store.expire(store::now_ms().saturating_sub(ttl * 1000)) {
                    Ok(ids) => {
                        for id in ids {
                            store.remove_spooled(&store.output_path(&id));
                            store.remove_spooled(&store.input_path(&id));
                            store.remove_spooled(&store.delivered_path(&id));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "expired results could not be removed"),
                }
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            tokio::time::sleep(period).await;
        }
    }

    /// Copies the job database's WAL into its file every [`CHECKPOINT_PERIOD`], off the
    /// runtime's threads and beside the writer ([`Store::checkpoint`]), so that no job's
    /// commit runs a checkpoint.
    pub async fn run_checkpointer(self: Arc<Self>) {
        let mut failing = false;
        loop {
            tokio::time::sleep(CHECKPOINT_PERIOD).await;
            let store = Arc::clone(&self.engine().store);
            let done = tokio::task::spawn_blocking(move || store.checkpoint())
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            match done {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("the job database's log is copied into it again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "the job database's log cannot be copied into it now; the writer does it itself once the log is large");
                }
                Err(_) => {}
            }
        }
    }

    async fn token_facts(&self) -> (Option<String>, Option<String>) {
        if let Some(f) = lock(&self.engine().token).clone() {
            return f;
        }
        // What the daemon already knows of the agent, else a read (which it then knows).
        let known = match self.agent.seen() {
            crate::services::agent::AgentSeen::Answered(h) if h.token.is_some() => Ok(*h),
            _ => self.agent.health(FACTS_LIMIT).await,
        };
        match known {
            Ok(h) if h.token.is_some() => {
                let f = (
                    h.token.map(|t| t.serial),
                    h.certificates.first().map(|c| c.sha256.clone()),
                );
                *lock(&self.engine().token) = Some(f.clone());
                f
            }
            _ => (None, None),
        }
    }

    /// Runs one job at the agent; true when it goes back to the head of its lane.
    /// `prev` is the phase of the job sent to the agent before it, if that one is
    /// still there; `phase` says this one's.
    async fn run_job(
        &self,
        id: &str,
        prev: Option<watch::Receiver<Phase>>,
        gate: Arc<Gate>,
        landing: Option<Landing>,
        phase: watch::Sender<Phase>,
    ) -> bool {
        let span = tracing::info_span!("job", job = %id);
        let phase = Arc::new(phase);
        let again = self
            .run_job_here(id, prev, gate, landing, &phase)
            .instrument(span)
            .await;
        phase.send_replace(Phase::Ended { again });
        again
    }

    /// [`Self::run_job`], inside the job's span.
    async fn run_job_here(
        &self,
        id: &str,
        prev: Option<watch::Receiver<Phase>>,
        gate: Arc<Gate>,
        mut landing: Option<Landing>,
        phase: &Arc<watch::Sender<Phase>>,
    ) -> bool {
        let engine = self.engine();
        let store = &engine.store;
        let mut row = match (store.get(id), &landing) {
            (Ok(Some(row)), _) if row.state == JobState::Queued => row,
            // Its record says `queued` once its input is durable: what it will say (its
            // SHA-256 once made, if it is not yet).
            (Ok(Some(mut row)), Some(l)) if row.state == JobState::Receiving => {
                row.input_sha256 = l.sha.get().cloned();
                row.input_bytes = Some(l.n);
                row
            }
            (Ok(_), _) => return false,
            (Err(e), _) => {
                tracing::error!(job = id, error = %e, "the job cannot be read");
                return false;
            }
        };
        let durable = landing.as_ref().map(|l| l.durable.clone());
        let landing_sha = landing.as_ref().map(|l| Arc::clone(&l.sha));
        // Its input as it was written, when it is held: not read from its file again.
        let held: Arc<Vec<bytes::Bytes>> = Arc::new(
            landing
                .as_mut()
                .map(|l| std::mem::take(&mut l.input))
                .unwrap_or_default(),
        );
        // A job held behind another (or until it is queued) is marked running once it
        // is released.
        let attempt = if gate.is_held() {
            row.attempts + 1
        } else {
            match store.running(id) {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(job = id, error = %e, "the job cannot be marked running");
                    return false;
                }
            }
        };
        let span = tracing::info_span!("attempt", profile = %row.profile, attempt);
        let started = Instant::now();
        let out_path = store.output_path(id);
        // From here on a new agent process abandons the job: the old one will never
        // answer what it was asked (its health for the token's facts, or the job).
        let mut epoch = self.engine().agent_epoch.subscribe();
        epoch.mark_unchanged();
        let mut facts: (Option<String>, Option<String>) = (None, None);
        // How the signed file came: whole from the agent, or made here of the input and
        // what the agent changed in it.
        let mut came = "whole";
        // Dropped before the job is committed signed, it breaks off what was streamed.
        let mut live: Option<LiveGuard<'_>> = None;
        let answer = async {
            facts = self.token_facts().await;
            let (token_serial, cert) = &facts;
            match self.config().profiles.get(&row.profile) {
                // The right token may be put in before the job's deadline: retryable.
                Some(p) => p
                    .check_token(&row.profile, token_serial.as_deref(), cert.as_deref())
                    .map_err(|why| {
                        tracing::warn!(job = id, "{why}");
                        ErrorBody::new(ErrorCode::TokenUnavailable, why).retryable(true)
                    })?,
                None => {
                    return Err(ErrorBody::new(
                        ErrorCode::UnknownProfile,
                        format!(
                            "profile {:?} was removed from the configuration while the job waited; nothing was signed",
                            row.profile
                        ),
                    ))
                }
            };
            let input = held_or_kept(store, id, &held).await?;
            // The input's SHA-256, made as it was spooled: the agent keys the result it
            // keeps for a job sent again on it without hashing the input again. One
            // still being made (an input sent on as it is hashed and flushed) follows
            // the input as a trailer.
            let sha = match (row.kind, row.input_sha256.as_deref(), &landing_sha) {
                (Kind::Batch, ..) => InputSha::None,
                (Kind::Sign, Some(sha), _) => InputSha::Header(sha),
                (Kind::Sign, None, Some(_)) => InputSha::Trailer,
                (Kind::Sign, None, None) => InputSha::None,
            };
            let trailer = matches!(sha, InputSha::Trailer)
                .then(|| landing_sha.clone())
                .flatten();
            let body = http_body_util::StreamBody::new(upload(
                input,
                row.input_bytes,
                prev.clone(),
                durable.clone(),
                trailer,
                Arc::clone(&gate),
                Arc::clone(phase),
                Arc::clone(&engine.draining),
            ));
            let path = match row.kind {
                Kind::Sign => AGENT_SIGN_PATH,
                Kind::Batch => AGENT_BATCH_PATH,
            };
            let resp = tokio::select! {
                r = self.agent.relay_to(id, path, &row.agent_query, &row.content_type, body, row.input_bytes, sha) => r?,
                _ = gate.wait_sent_back() => {
                    return Err(ErrorBody::new(ErrorCode::AgentUnavailable, "sent back to the queue").retryable(true))
                }
            };
            // Signed: the job after it may reach the token.
            phase.send_replace(Phase::Answered);
            let ct = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_owned();
            // The signed file as what signing changed (a PE signed natively): made
            // here from the input spooled, instead of streamed whole from the agent;
            // written over the spool file itself when what it overwrites is small
            // (after this block: it must not be dropped half done).
            let (answer, ct): (Blocks, String) = if is_patch_type(&ct) {
                let patch = read_patch(id, resp.into_body()).await?;
                // An input held as the intake received it is known without a look:
                // in its spool file beyond what the database keeps.
                let (spooled, len) = match row.input_bytes {
                    Some(n) if !held.is_empty() => (!store::kept_inline(n), n),
                    _ => input_kept(store, id).await?,
                };
                let patch = patch.check(len).map_err(|why| {
                    tracing::error!(job = id, "the agent's answer does not fit the input: {why}");
                    ErrorBody::new(ErrorCode::AgentUnavailable, "the signing VM's agent answered a signed file that does not fit the input; nothing was delivered; update signet-agent to signetd's version").retryable(false)
                })?;
                let ct = "application/octet-stream".to_owned();
                if spooled && patched::fits(&patch) {
                    // Kept as the input and the patch: whole already, a waiting client
                    // streams it now, while it is hashed and committed.
                    came = "patch kept";
                    let patch = Arc::new(patch);
                    let paths = store.kept_paths(id);
                    // Answered, the input went whole: a landing job is queued, its
                    // SHA-256 made.
                    let input_sha = row
                        .input_sha256
                        .clone()
                        .or_else(|| landing_sha.as_ref().and_then(|s| s.get().cloned()));
                    let guard = LiveGuard::start(
                        engine,
                        id,
                        paths,
                        Some((Arc::clone(&patch), Arc::clone(&held), input_sha)),
                        &ct,
                    );
                    guard.written(patch.len());
                    live = Some(guard);
                    return Ok((Answer::Kept(patch), ct));
                }
                came = "patch";
                let input = held_or_kept(store, id, &held).await?;
                (patched_blocks(input, patch), ct)
            } else {
                let answer = resp.into_body().into_data_stream().map(|r| r.map_err(std::io::Error::other));
                (answer.boxed(), ct)
            };
            // A signed file (not a batch's parts) may be streamed to a waiting
            // client as it lands.
            if row.kind == Kind::Sign {
                let paths = vec![out_path.clone(), store.delivered_path(id)];
                live = Some(LiveGuard::start(engine, id, paths, None, &ct));
            }
            let progress = live.as_ref().map(|l| Arc::clone(&l.progress));
            let landed = save(answer, &out_path, progress).await.map_err(|e| match e {
                Saved::Broken(e) => {
                    tracing::warn!(job = id, error = %e, "the agent's answer broke off");
                    ErrorBody::new(ErrorCode::AgentUnavailable, "the signing VM's agent stopped answering mid-job; nothing was delivered").retryable(true)
                }
                Saved::Disk(e) => JobError::internal(id, "spooling the result", &e).into(),
            })?;
            // A small result, whole in memory: a client that asked for it early has it
            // now, while the job is committed.
            if let (Some(live), Some(bytes)) = (&live, &landed.inline) {
                live.whole(bytes::Bytes::copy_from_slice(bytes));
                // Woken on this thread, where it runs only once this task yields: it
                // sends the result before the commit starts, not after it ends.
                tokio::task::yield_now().await;
            }
            Ok::<_, ErrorBody>((Answer::Landed(landed), ct))
        }
        .instrument(span);
        let answer = tokio::select! {
            a = answer => a,
            _ = epoch.changed() => {
                tracing::warn!(job = id, "the agent restarted while it had the job; the job runs again");
                Err(ErrorBody::new(
                    ErrorCode::AgentUnavailable,
                    "the signing VM's agent restarted mid-job; nothing was delivered",
                )
                .retryable(true))
            }
        };
        let (token_serial, cert) = facts;
        // The job before it ends first, so jobs end (and are audited) in the queue's order.
        if let Some(mut p) = prev {
            let _ = p.wait_for(|p| matches!(p, Phase::Ended { .. })).await;
        }
        // A job taken while its input was flushed is the intake's to end when it was
        // not queued (its last byte never went to the agent).
        if let Some(mut landing) = landing {
            if !queued(&mut landing.durable).await {
                tracing::info!(job = id, "its input was not kept; the intake ends the job");
                store.remove_spooled(&out_path);
                return false;
            }
            // Queued: its SHA-256 is made, for its audit record.
            if row.input_sha256.is_none() {
                row.input_sha256 = landing.sha.get().cloned();
            }
        }
        if gate.sent_back() {
            // Called back before it reached the agent whole (the agent drops the upload
            // unsigned): cancelled, or the job before it went back to the queue, or the
            // host shuts down; then it goes back to the head of its lane (behind that one).
            store.remove_spooled(&out_path);
            if matches!(store.get(id), Ok(Some(r)) if r.state.is_final()) {
                tracing::info!(job = id, "cancelled before it reached the agent whole");
                return false;
            }
            tracing::info!(
                job = id,
                "not sent whole to the agent; the job goes back to the head of its queue"
            );
            if let Err(err) = store.requeue(id) {
                tracing::error!(job = id, error = %err, "the job cannot be queued again");
            }
            return true;
        }
        // A result kept as a patch is hashed as it is read, while a waiting client
        // reads it too.
        let answer = match answer {
            Ok((Answer::Landed(landed), ct)) => Ok((landed, ct, None)),
            Ok((Answer::Kept(patch), ct)) => {
                let (input, p) = (store.input_path(id), Arc::clone(&patch));
                let held = Arc::clone(&held);
                let hashed = tokio::task::spawn_blocking(move || {
                    if held.is_empty() {
                        patched::sha256(&std::fs::File::open(input)?, &p)
                    } else {
                        patched::sha256_of_blocks(&held, &p)
                    }
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                match hashed {
                    Ok(sha) => Ok((
                        Landed {
                            sha: audit::hex(&sha),
                            n: patch.len(),
                            inline: None,
                        },
                        ct,
                        Some(patch),
                    )),
                    Err(e) => Err(JobError::internal(id, "reading the spooled input", &e).into()),
                }
            }
            Err(e) => Err(e),
        };
        let ms = gate.since(started).elapsed().as_millis() as u64;
        // The timeline counts an outage from the first contact that failed.
        match &answer {
            Err(e) if e.code == ErrorCode::AgentUnavailable => {
                self.timeline().saw(Seen::ContactFailed)
            }
            Err(_) => {}
            Ok(_) => self.timeline().saw(Seen::ContactOk),
        }
        match answer {
            Ok((Landed { sha, n, inline }, ct, kept)) => {
                // A small result is kept in the transaction that ends the job; one kept
                // as a patch is the input's file, counted already.
                if inline.is_none() && kept.is_none() {
                    store.charge(n);
                }
                let mut e = entry(&row, Outcome::Signed, None);
                e.token_serial = token_serial;
                e.cert_sha256 = cert;
                e.output_sha256 = Some(sha.clone());
                e.output_bytes = Some(n);
                e.duration_ms = Some(ms);
                // The commit waits for its flush: a request streaming the result (woken
                // on this thread, where no other thread takes it) sends it meanwhile
                // ([`blocking`]).
                let finished = blocking(|| match &kept {
                    Some(p) => {
                        let patch = serde_json::to_vec(&p.to_patch()).unwrap_or_default();
                        store.finish_patched(id, (&sha, n, &ct), &patch, &e)
                    }
                    None => store.finish_with(
                        id,
                        JobState::Signed,
                        Some((&sha, n, &ct)),
                        inline.as_deref(),
                        None,
                        &e,
                    ),
                });
                engine.store_wrote(finished.as_ref().map(|_| ()));
                match finished {
                    Ok(_) => {
                        // Signed: its end is recorded and told (the status, the log, the
                        // metrics, those waiting for it) before the answer's end, which
                        // its caller may act on at once.
                        {
                            let mut s = lock(&engine.sched);
                            s.left(id);
                            s.queue.record_duration(ms);
                        }
                        tracing::info!(job = id, ms, bytes = n, answer = came, "signed");
                        self.timeline().saw(Seen::JobSigned(id.to_owned()));
                        let input = store.input_path(id);
                        if kept.is_some() {
                            // The input's file is the result's: named so before the
                            // stream ends, which marks the result delivered. Not flushed:
                            // the next start renames what a crash left.
                            let (input, output) = (input.clone(), out_path.clone());
                            let renamed =
                                tokio::task::spawn_blocking(move || std::fs::rename(input, output))
                                    .await
                                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                            if let Err(e) = renamed {
                                tracing::warn!(job = id, error = %e, "the signed job's input cannot be renamed to its result; it is read where it is");
                            }
                        }
                        engine.notify_done(id);
                        if let Some(live) = &live {
                            live.signed(n);
                        }
                        // Off the runtime's threads: unlinking a large file takes
                        // milliseconds, which the jobs around this one need. An input
                        // kept as the result is its file now; one kept in the database
                        // has no file, and went with the transaction.
                        if kept.is_none() && !row.input_bytes.is_some_and(store::kept_inline) {
                            let store = Arc::clone(store);
                            let _ =
                                tokio::task::spawn_blocking(move || store.remove_spooled(&input))
                                    .await;
                        }
                    }
                    Err(err) => {
                        tracing::error!(job = id, error = %err, "the signed job could not be recorded; it runs again after a restart");
                        engine.notify_done(id);
                    }
                }
                false
            }
            Err(e) => {
                store.remove_spooled(&out_path);
                let deadline = row.created_ms + self.config().queue.job_deadline_seconds * 1000;
                *lock(&engine.token) = None;
                // A lost token and a restarting agent come back by themselves, and so
                // does a missing PIN when the host has one to give; a wrong PIN needs
                // the operator.
                let transient = match e.code {
                    ErrorCode::TokenUnavailable | ErrorCode::AgentUnavailable => e.retryable,
                    ErrorCode::PinNeeded => {
                        self.config().pin_file.is_some() && !self.host_pin_rejected()
                    }
                    _ => false,
                };
                // The agent has no PIN because the token refused the host's: say that.
                let e = if e.code == ErrorCode::PinNeeded && self.host_pin_rejected() {
                    client_view(
                        id,
                        ErrorBody::new(ErrorCode::PinRejected, "the host's PIN was refused"),
                    )
                } else {
                    e
                };
                if transient && store::now_ms() < deadline {
                    tracing::warn!(job = id, code = %e.code, "not signed now; the job goes back to the head of its queue");
                    if let Err(err) = store.requeue(id) {
                        tracing::error!(job = id, error = %err, "the job cannot be queued again");
                    }
                    return true;
                }
                let mut en = entry(&row, Outcome::Failed, Some(e.code));
                en.token_serial = token_serial;
                en.cert_sha256 = cert;
                en.duration_ms = Some(ms);
                if let Err(err) = store.finish(id, JobState::Failed, None, Some(&e), &en) {
                    tracing::error!(job = id, error = %err, "the failed job could not be recorded");
                }
                store.remove_spooled(&store.input_path(id));
                tracing::warn!(job = id, code = %e.code, "job failed");
                engine.notify_done(id);
                false
            }
        }
    }
}

/// How many jobs the worker has at the agent at once that it has not answered yet:
/// the one at the token and the next, whose input is sent meanwhile.
const UNANSWERED: usize = 2;
/// How many jobs the worker has at the agent at once in all: those not answered yet,
/// and those whose answer (the signed file) is still being spooled.
const AT_AGENT: usize = 4;
/// The longest the last byte of a job's input waits for the job before it to be
/// answered. By then that one is at the agent's job lock (its input was sent whole
/// before this one's began), and the lock is taken in turn; the hold stays well
/// inside the agent's `limits.idle_seconds` (60 by default).
const HOLD_MAX: Duration = Duration::from_secs(30);

/// Where a job sent to the agent is, as the worker and the job after it see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its input is being sent.
    Sending,
    /// Its input was handed to the connection whole (or it never went to the agent).
    Sent,
    /// The agent answered with its result: the token is free for the next job.
    Answered,
    /// Its end is recorded; `again`: it went back to the head of its lane.
    Ended { again: bool },
}

impl Phase {
    fn sent(self) -> bool {
        self != Phase::Sending
    }

    fn answered(self) -> bool {
        matches!(self, Phase::Answered | Phase::Ended { .. })
    }
}

/// A job the worker has at the agent.
#[derive(Debug)]
struct Flight {
    caller: String,
    id: String,
    phase: watch::Receiver<Phase>,
    task: tokio::task::JoinHandle<bool>,
}

/// Whether a job's last input byte went to the agent, and when.
#[derive(Debug)]
struct Gate {
    /// [`Gate::HELD`], [`Gate::RELEASED`] or [`Gate::SENT_BACK`].
    state: watch::Sender<u8>,
    released: Mutex<Option<Instant>>,
    /// For a held job: where it is marked running once released.
    mark: Option<(Arc<Store>, String)>,
}

impl Gate {
    const HELD: u8 = 0;
    const RELEASED: u8 = 1;
    const SENT_BACK: u8 = 2;

    /// A gate that holds job `mark.1` (marked running in `mark.0` once released), or,
    /// without `mark`, one already open.
    fn new(mark: Option<(Arc<Store>, String)>) -> Gate {
        let state = if mark.is_some() {
            Self::HELD
        } else {
            Self::RELEASED
        };
        Gate {
            state: watch::channel(state).0,
            released: Mutex::new(None),
            mark,
        }
    }

    /// Moves from held to `to`; false when it was not held any more.
    fn leave_hold(&self, to: u8) -> bool {
        self.state.send_if_modified(|s| {
            let held = *s == Self::HELD;
            if held {
                *s = to;
            }
            held
        })
    }

    /// Lets the last byte go: the job is at the token next, and running.
    fn release(&self) -> bool {
        if !self.leave_hold(Self::RELEASED) {
            return false;
        }
        *lock(&self.released) = Some(Instant::now());
        if let Some((store, id)) = &self.mark {
            if let Err(e) = store.running(id) {
                tracing::error!(job = %id, error = %e, "the job cannot be marked running");
            }
        }
        true
    }

    /// Calls the job back before its last byte went; false when it already went.
    fn send_back(&self) -> bool {
        self.leave_hold(Self::SENT_BACK)
    }

    fn is_held(&self) -> bool {
        *self.state.borrow() == Self::HELD
    }

    fn sent_back(&self) -> bool {
        *self.state.borrow() == Self::SENT_BACK
    }

    /// Waits until the job is sent back (it may never be).
    async fn wait_sent_back(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| *s == Self::SENT_BACK).await;
    }

    /// When the job had the token's attention: its start, or the release of its last
    /// byte when it waited for the job before it.
    fn since(&self, started: Instant) -> Instant {
        lock(&self.released).map_or(started, |r| r.max(started))
    }
}

/// Waits while the job before may still be ahead of this one at the agent: true when
/// this one goes on, false when it goes back to the queue, with that one or because
/// the host shuts down (`draining`: the shutdown waits for the job at the token only),
/// or was called back (cancelled) meanwhile.
async fn hold(
    prev: &mut watch::Receiver<Phase>,
    draining: &std::sync::atomic::AtomicBool,
    gate: &Gate,
) -> bool {
    let until = tokio::time::Instant::now() + HOLD_MAX;
    let go_on = loop {
        match *prev.borrow_and_update() {
            Phase::Answered | Phase::Ended { again: false } => break true,
            Phase::Ended { again: true } => break false,
            Phase::Sending | Phase::Sent => {}
        }
        tokio::select! {
            r = prev.changed() => if r.is_err() { break true },
            _ = gate.wait_sent_back() => break false,
            _ = tokio::time::sleep_until(until) => break true,
        }
    };
    go_on && !draining.load(std::sync::atomic::Ordering::SeqCst)
}

/// The blocks of a job's input or result as they are read.
type Blocks = futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;

/// A spool file, whole, as a body read ahead in blocks on a blocking thread
/// ([`FileBody`]).
async fn open_spooled(path: std::path::PathBuf) -> std::io::Result<FileBody> {
    let (file, len) = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok::<_, std::io::Error>((file, len))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    Ok(FileBody::new(file, len, ()))
}

/// A job's input (its spool file, read ahead by a [`FileBody`], or its bytes from the
/// database) as the body sent to the agent, in [`signet_protocol::IO_BLOCK`]s.
/// With a job before it at the agent (`prev`), its last byte waits for that one's
/// answer ([`hold`]): the agent takes a job to its lock only once it has it whole, so
/// this one cannot overtake it. When that one goes back to the queue instead, the
/// gate says so and the request is dropped unfinished: the agent drops this upload
/// unsigned. A job whose input is still being flushed (`durable`, [`Landing`]) holds
/// its last byte until it is queued, and is called back when it is not. `phase`
/// becomes [`Phase::Sent`] once the input is handed over whole.
#[allow(clippy::too_many_arguments)]
fn upload(
    input: Blocks,
    len: Option<u64>,
    prev: Option<watch::Receiver<Phase>>,
    durable: Option<watch::Receiver<Option<bool>>>,
    trailer: Option<Arc<std::sync::OnceLock<String>>>,
    gate: Arc<Gate>,
    phase: Arc<watch::Sender<Phase>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
) -> impl futures_util::Stream<Item = std::io::Result<hyper::body::Frame<bytes::Bytes>>> + Send + 'static
{
    let sent = move |phase: &watch::Sender<Phase>| {
        phase.send_if_modified(|p| {
            let was = *p == Phase::Sending;
            if was {
                *p = Phase::Sent;
            }
            was
        });
    };
    if len == Some(0) {
        sent(&phase);
    }
    let len = len.unwrap_or(u64::MAX);
    let blocks = input;
    use hyper::body::Frame;
    futures_util::stream::unfold(
        (blocks, 0u64, prev, None::<bytes::Bytes>, false, trailer),
        move |(mut blocks, mut n, mut prev, tail, done, mut trailer)| {
            let gate = Arc::clone(&gate);
            let phase = Arc::clone(&phase);
            let draining = Arc::clone(&draining);
            let mut durable = durable.clone();
            async move {
                if done {
                    return None;
                }
                if let Some(tail) = tail {
                    let is_queued = match durable.as_mut() {
                        Some(d) => queued(d).await,
                        None => true,
                    };
                    let go_on = is_queued
                        && match prev.as_mut() {
                            Some(p) => hold(p, &draining, &gate).await,
                            None => true,
                        };
                    if go_on && gate.release() {
                        sent(&phase);
                        return Some((
                            Ok(Frame::data(tail)),
                            (blocks, n, None, None, false, trailer),
                        ));
                    }
                    // The job's relay is dropped (and the agent drops the upload).
                    gate.send_back();
                    std::future::pending::<()>().await;
                    return None;
                }
                match blocks.next().await {
                    None => {
                        sent(&phase);
                        // The input's SHA-256 after it: made by now (the job is queued
                        // before its last byte goes).
                        let sha = trailer.take()?;
                        if sha.get().is_none() {
                            if let Some(d) = durable.as_mut() {
                                queued(d).await;
                            }
                        }
                        let header = sha
                            .get()
                            .and_then(|s| http::HeaderValue::from_str(s).ok())
                            .ok_or_else(|| {
                                std::io::Error::other("the input's SHA-256 was never made")
                            });
                        let frame = header.map(|v| {
                            let mut t = http::HeaderMap::new();
                            t.insert(signet_api::wire::INPUT_SHA256_HEADER, v);
                            Frame::trailers(t)
                        });
                        Some((frame, (blocks, n, None, None, true, None)))
                    }
                    Some(Err(e)) => Some((Err(e), (blocks, n, None, None, true, None))),
                    Some(Ok(mut chunk)) => {
                        n += chunk.len() as u64;
                        if n >= len {
                            // Held behind the job before it, or until it is queued.
                            if gate.is_held() && !chunk.is_empty() {
                                let last = chunk.split_off(chunk.len() - 1);
                                return Some((
                                    Ok(Frame::data(chunk)),
                                    (blocks, n, prev, Some(last), false, trailer),
                                ));
                            }
                            sent(&phase);
                        }
                        Some((
                            Ok(Frame::data(chunk)),
                            (blocks, n, prev, None, false, trailer),
                        ))
                    }
                }
            }
        },
    )
}

enum Spool {
    Full,
    Stopped,
    Broken(axum::Error),
    Disk(std::io::Error),
}

/// An input or a result as it was kept: its SHA-256 (hex), its length, and its bytes
/// when they are few enough for the database ([`store::INLINE_MAX`]); else they are in
/// the spool file, fsync'd with its directory.
#[derive(Debug)]
struct Landed {
    sha: String,
    n: u64,
    inline: Option<Vec<u8>>,
}

/// How far a result being spooled from the agent is ([`Live`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Not in a file (yet): a small result stays in memory.
    Pending,
    /// Its first `n` bytes can be read: from its spool file, or (a result kept as a
    /// patch) made of the input and the patch.
    Writing(u64),
    /// The job is `signed` with its audit record, its result `n` bytes long.
    Signed(u64),
    /// The job did not end signed with it (it failed, or runs again).
    Failed,
}

/// A result being spooled from the agent to `<id>.out` (or kept as the input and a
/// patch: whole at once), which a waiting `GET /v1/jobs/{id}/result` streams as it
/// lands ([`JobService::wait_result`]).
#[derive(Debug, Clone)]
pub struct Live {
    /// Where its file is: the first as it is written, the others where it may have
    /// been moved to meanwhile.
    paths: Vec<std::path::PathBuf>,
    /// The patch the result is made of, with the file (the input), when kept so.
    patch: Option<Arc<signet_api::wire::patch::Checked>>,
    /// The input as the intake wrote it, when it is held (a job taken while its input
    /// was flushed): the result kept as a patch is made of it, not read from the file.
    held: Arc<Vec<bytes::Bytes>>,
    /// The input's SHA-256 (hex), with a patch.
    input_sha256: Option<String>,
    /// A small result (kept in the database), once it is here whole: streamed from
    /// memory ([`LiveGuard::whole`]).
    whole: Arc<OnceLock<bytes::Bytes>>,
    content_type: String,
    progress: watch::Receiver<Progress>,
}

impl Live {
    /// Whether the result is kept as the input and a patch (it is whole at once).
    pub fn is_patch(&self) -> bool {
        self.patch.is_some() && self.input_sha256.is_some()
    }

    /// The patch as its JSON at once, then the end once the job is signed; breaks off
    /// once it is known it will not be (or signetd stops), as [`Self::blocks`] does.
    fn patch_answer(
        self,
    ) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        let json = self
            .patch
            .as_ref()
            .map(|p| serde_json::to_vec(&p.to_patch()).map_err(std::io::Error::other));
        let rx = self.progress;
        futures_util::stream::unfold((json, rx, false), |(json, mut rx, done)| async move {
            if done {
                return None;
            }
            if let Some(json) = json {
                return Some((json.map(bytes::Bytes::from), (None, rx, false)));
            }
            let broke = |why: &str| {
                std::io::Error::other(format!(
                    "{why}; nothing of it counts, collect the job's result again"
                ))
            };
            loop {
                let now = *rx.borrow_and_update();
                match now {
                    Progress::Signed(_) => return None,
                    Progress::Failed => {
                        let e = broke("the job did not end signed");
                        return Some((Err(e), (None, rx, true)));
                    }
                    Progress::Pending | Progress::Writing(_) => {}
                }
                if rx.changed().await.is_err() {
                    let e = broke("the job's result stopped being written");
                    return Some((Err(e), (None, rx, true)));
                }
            }
        })
    }

    /// The result's bytes as they are written; ends once the job is signed, breaks
    /// off once it is known it will not be (or signetd stops). The file is opened at
    /// the first read, under the first of its paths it has (a stream before this one
    /// may have delivered it whole meanwhile, which moved it).
    fn blocks(
        self,
    ) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        let broke = |why: &str| {
            std::io::Error::other(format!(
                "{why}; nothing of it counts, collect the job's result again"
            ))
        };
        let (paths, patch, rx) = (Arc::new(self.paths), self.patch, self.progress);
        let (held, whole) = (self.held, self.whole);
        futures_util::stream::unfold(
            (None::<Arc<std::fs::File>>, 0u64, rx, false),
            move |(mut file, sent, mut rx, done)| {
                let (paths, patch, held) = (Arc::clone(&paths), patch.clone(), Arc::clone(&held));
                let whole = Arc::clone(&whole);
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        let now = *rx.borrow_and_update();
                        let (ready, end) = match now {
                            Progress::Pending => (0, false),
                            Progress::Writing(n) => (n, false),
                            Progress::Signed(n) => (n, true),
                            Progress::Failed => {
                                let e = broke("the job did not end signed");
                                return Some((Err(e), (file, sent, rx, true)));
                            }
                        };
                        if ready > sent {
                            let want = (ready - sent).min(signet_protocol::IO_BLOCK as u64);
                            let read = match (whole.get(), &patch) {
                                // Whole in memory: at once.
                                (Some(b), _) => Ok(b.slice(sent as usize..ready as usize)),
                                // Of the input in memory: no trip to a blocking thread,
                                // no copy of what the patch leaves alone.
                                (None, Some(p)) if !held.is_empty() => {
                                    patched::slice_of_blocks(&held, p, sent, want as usize)
                                }
                                (None, _) => read_at(&mut file, paths, patch, sent, want).await,
                            };
                            return match read {
                                Ok(b) => {
                                    let n = b.len() as u64;
                                    Some((Ok(b), (file, sent + n, rx, false)))
                                }
                                Err(e) => Some((Err(e), (file, sent, rx, true))),
                            };
                        }
                        if end {
                            return None;
                        }
                        if rx.changed().await.is_err() {
                            let e = broke("the job's result stopped being written");
                            return Some((Err(e), (file, sent, rx, true)));
                        }
                    }
                }
            },
        )
    }
}

/// `want` bytes at `at` of a result (its file opened first if need be, under the
/// first of `paths` it has; made of it and `patch` when it is kept so), on a blocking
/// thread.
async fn read_at(
    file: &mut Option<Arc<std::fs::File>>,
    paths: Arc<Vec<std::path::PathBuf>>,
    patch: Option<Arc<signet_api::wire::patch::Checked>>,
    at: u64,
    want: u64,
) -> std::io::Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let f = file.clone();
    let (f, b) = tokio::task::spawn_blocking(move || {
        let f = match f {
            Some(f) => f,
            None => Arc::new(patched::open(&paths)?),
        };
        let b = match &patch {
            Some(p) => patched::read(&f, p, at, want as usize)?,
            None => {
                let mut b = vec![0u8; want as usize];
                f.read_exact_at(&mut b, at)?;
                b
            }
        };
        Ok::<_, std::io::Error>((f, b))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    *file = Some(f);
    Ok(bytes::Bytes::from(b))
}

/// A result kept as the input and a patch: the patch, the input's blocks when they are
/// held (else none: read from its file), the input's SHA-256 (hex).
type KeptPatch = (
    Arc<signet_api::wire::patch::Checked>,
    Arc<Vec<bytes::Bytes>>,
    Option<String>,
);

/// The worker's side of a [`Live`] result: registered while the answer is spooled,
/// it says `Signed` only once the job is committed signed; dropped before, it says
/// `Failed`. Either way it leaves the engine's map.
struct LiveGuard<'a> {
    engine: &'a Engine,
    id: &'a str,
    progress: Arc<watch::Sender<Progress>>,
    whole: Arc<OnceLock<bytes::Bytes>>,
}

impl<'a> LiveGuard<'a> {
    fn start(
        engine: &'a Engine,
        id: &'a str,
        paths: Vec<std::path::PathBuf>,
        patch: Option<KeptPatch>,
        content_type: &str,
    ) -> LiveGuard<'a> {
        let (tx, rx) = watch::channel(Progress::Pending);
        let whole = Arc::new(OnceLock::new());
        let (patch, held, input_sha256) = match patch {
            Some((p, held, sha)) => (Some(p), held, sha),
            None => (None, Arc::default(), None),
        };
        lock(&engine.live).insert(
            id.to_owned(),
            Live {
                paths,
                patch,
                held,
                input_sha256,
                whole: Arc::clone(&whole),
                content_type: content_type.to_owned(),
                progress: rx,
            },
        );
        engine.live_news.send_modify(|n| *n = n.wrapping_add(1));
        LiveGuard {
            engine,
            id,
            progress: Arc::new(tx),
            whole,
        }
    }

    /// A small result (kept in the database) is here whole: it can be read from
    /// memory, before the job is committed signed.
    fn whole(&self, bytes: bytes::Bytes) {
        let n = bytes.len() as u64;
        if self.whole.set(bytes).is_ok() {
            self.written(n);
        }
    }

    /// Its first `n` bytes can be read.
    fn written(&self, n: u64) {
        self.progress.send_replace(Progress::Writing(n));
    }

    fn signed(&self, n: u64) {
        self.progress.send_replace(Progress::Signed(n));
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        {
            let mut live = lock(&self.engine.live);
            let ours = self.progress.subscribe();
            if live
                .get(self.id)
                .is_some_and(|l| l.progress.same_channel(&ours))
            {
                live.remove(self.id);
            }
        }
        self.progress.send_if_modified(|p| {
            let open = matches!(p, Progress::Pending | Progress::Writing(_));
            if open {
                *p = Progress::Failed;
            }
            open
        });
    }
}

/// Where the bytes of an input or a result go: memory while they are at most
/// [`store::INLINE_MAX`], else (all of them) the spool file at `path`, written by a
/// [`SpoolWriter`] on a blocking thread.
struct Sink<'a> {
    path: &'a Path,
    buf: Vec<u8>,
    writer: Option<SpoolWriter>,
    n: u64,
    /// Told how many bytes are in the file as they are written.
    progress: Option<Arc<watch::Sender<Progress>>>,
}

impl<'a> Sink<'a> {
    fn new(path: &'a Path) -> Sink<'a> {
        Sink {
            path,
            buf: Vec::new(),
            writer: None,
            n: 0,
            progress: None,
        }
    }

    async fn write(&mut self, chunk: bytes::Bytes) -> std::io::Result<()> {
        self.n += chunk.len() as u64;
        if self.writer.is_none() {
            if store::kept_inline(self.n) {
                self.buf.extend_from_slice(&chunk);
                return Ok(());
            }
            let mut writer = SpoolWriter::create(self.path, self.progress.clone())?;
            writer
                .write(bytes::Bytes::from(std::mem::take(&mut self.buf)))
                .await?;
            self.writer = Some(writer);
        }
        match self.writer.as_mut() {
            Some(w) => w.write(chunk).await,
            None => Ok(()),
        }
    }

    /// The end: a file is flushed and fsync'd, with its directory.
    async fn end(self) -> std::io::Result<Landed> {
        let w = self.written().await?;
        if let Some(flush) = w.flush {
            flush.done().await?;
        }
        Ok(w.landed)
    }

    /// The end once every byte is written: a file's flush is under way.
    async fn written(self) -> std::io::Result<Written> {
        let r = self.received().await?;
        let sha = r.sha.made().await?;
        Ok(Written {
            landed: Landed {
                sha,
                n: r.n,
                inline: r.inline,
            },
            flush: r.flush,
        })
    }

    /// The end once every byte is handed to the file's writer: its SHA-256 and its
    /// flush under way.
    async fn received(self) -> std::io::Result<Received> {
        Ok(match self.writer {
            None => Received {
                n: self.n,
                sha: Hashing::Made(Sha256::digest(&self.buf).into()),
                inline: Some(self.buf),
                flush: None,
                blocks: None,
            },
            Some(w) => {
                let (hashing, flush, blocks) = w.received().await?;
                Received {
                    n: self.n,
                    sha: hashing,
                    inline: None,
                    flush: Some(flush),
                    blocks,
                }
            }
        })
    }
}

/// A body whose every byte is handed to its writer ([`Sink::received`]).
struct Received {
    n: u64,
    /// Its SHA-256, made or being made.
    sha: Hashing,
    /// Its bytes, when they are kept in the database.
    inline: Option<Vec<u8>>,
    /// A file's flush, under way.
    flush: Option<Flush>,
    /// A file's blocks, when it is [`LANDING_MAX`] bytes at most.
    blocks: Option<Vec<bytes::Bytes>>,
}

/// A body's SHA-256: made, or being made on its spool's hashing thread.
enum Hashing {
    Made([u8; 32]),
    Making(tokio::sync::oneshot::Receiver<[u8; 32]>),
}

impl Hashing {
    /// The SHA-256, hex, once made.
    async fn made(self) -> std::io::Result<String> {
        match self {
            Hashing::Made(sha) => Ok(audit::hex(&sha)),
            Hashing::Making(rx) => rx
                .await
                .map(|sha| audit::hex(&sha))
                .map_err(|_| std::io::Error::other("the spool's hashing thread ended early")),
        }
    }
}

/// A body whose every byte is written ([`Sink::written`]).
struct Written {
    landed: Landed,
    /// A file's flush, under way.
    flush: Option<Flush>,
}

/// What the spool's writer thread is given.
enum ToWrite {
    Block(bytes::Bytes),
    /// The last block was given: flush the file and its directory.
    End,
}

/// How many blocks of [`signet_protocol::IO_BLOCK`] may wait for the spool's writer.
const SPOOL_AHEAD: usize = 4;

/// A spool file written on one blocking thread and hashed on another, in blocks of
/// [`signet_protocol::IO_BLOCK`] gathered from the pieces the socket gives: the async
/// thread only receives, while the blocks before are written with std's I/O (no trip
/// to tokio's blocking pool per block, no copy into its buffer) and hashed. The file's
/// flush starts once its last block is written, while that block may still be hashed.
/// At most [`SPOOL_AHEAD`] blocks wait for either. Dropped before
/// [`SpoolWriter::received`], the writer stops without flushing; the caller removes the
/// file.
struct SpoolWriter {
    tx: tokio::sync::mpsc::Sender<ToWrite>,
    to_hash: tokio::sync::mpsc::Sender<bytes::Bytes>,
    block: bytes::BytesMut,
    /// The file's SHA-256, sent once every byte is hashed.
    hashed: tokio::sync::oneshot::Receiver<[u8; 32]>,
    thread: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The blocks written, while they are [`LANDING_MAX`] bytes at most: the input
    /// held for its way to the agent ([`Landing`]); `None` past that.
    kept: Option<Vec<bytes::Bytes>>,
    sent: u64,
}

/// A spool file's flush (the file and its directory fsync'd) under way on its
/// writer's thread, after every byte was written ([`SpoolWriter::written`]).
struct Flush(tokio::task::JoinHandle<std::io::Result<()>>);

impl Flush {
    async fn done(self) -> std::io::Result<()> {
        match self.0.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl SpoolWriter {
    /// Creates the file here (so that no thread creates it after the caller removed
    /// it) and starts its writer.
    /// `progress` is told how many bytes are in the file after each block (while it
    /// says the file is being written).
    fn create(
        path: &Path,
        progress: Option<Arc<watch::Sender<Progress>>>,
    ) -> std::io::Result<SpoolWriter> {
        use std::io::Write;
        // Sent to the disk as it is written: the closing fsync waits for the tail only.
        let mut file = signet_protocol::writeback::WriteBehind::new(std::fs::File::create(path)?);
        // The directory's entry for the file exists from here on: it is made durable
        // while the file is written, so that the file's own fsync is all its end waits
        // for (the directory's took 0.4-0.7 ms after it).
        let dir_synced = path.parent().map(Path::to_owned).map(|dir| {
            let (done, synced) = std::sync::mpsc::sync_channel(1);
            tokio::task::spawn_blocking(move || {
                let _ = done.send(store::sync_dir(&dir));
            });
            synced
        });
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ToWrite>(SPOOL_AHEAD);
        let (to_hash, mut blocks) = tokio::sync::mpsc::channel::<bytes::Bytes>(SPOOL_AHEAD);
        let (hashed_tx, hashed) = tokio::sync::oneshot::channel();
        // Its sender dropped early (the body broke off), it sends nothing.
        tokio::task::spawn_blocking(move || {
            let mut sha = Sha256::new();
            while let Some(b) = blocks.blocking_recv() {
                sha.update(&b);
            }
            let _ = hashed_tx.send(sha.finalize().into());
        });
        let thread = tokio::task::spawn_blocking(move || {
            let mut written = 0u64;
            loop {
                match rx.blocking_recv() {
                    Some(ToWrite::Block(b)) => {
                        file.write_all(&b)?;
                        written += b.len() as u64;
                        if let Some(p) = &progress {
                            p.send_if_modified(|p| {
                                let open = matches!(p, Progress::Pending | Progress::Writing(_));
                                if open {
                                    *p = Progress::Writing(written);
                                }
                                open
                            });
                        }
                    }
                    Some(ToWrite::End) => break,
                    None => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::Interrupted,
                            "the spool file was given up",
                        ))
                    }
                }
            }
            file.get_ref().sync_all()?;
            if let Some(synced) = dir_synced {
                synced.recv().map_err(|_| {
                    std::io::Error::other("the spool directory's flush ended without an answer")
                })??;
            }
            Ok(())
        });
        Ok(SpoolWriter {
            tx,
            to_hash,
            block: bytes::BytesMut::new(),
            hashed,
            thread,
            kept: Some(Vec::new()),
            sent: 0,
        })
    }

    /// The writer thread's error, once it stopped.
    async fn failed(&mut self) -> std::io::Error {
        match (&mut self.thread).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => std::io::Error::other("the spool's writer ended early"),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    async fn send(&mut self, b: bytes::Bytes) -> std::io::Result<()> {
        self.sent += b.len() as u64;
        if self.sent > LANDING_MAX {
            self.kept = None;
        } else if let Some(kept) = &mut self.kept {
            kept.push(b.clone());
        }
        if self.tx.send(ToWrite::Block(b.clone())).await.is_err() {
            return Err(self.failed().await);
        }
        if self.to_hash.send(b).await.is_err() {
            return Err(std::io::Error::other(
                "the spool's hashing thread ended early",
            ));
        }
        Ok(())
    }

    async fn write(&mut self, mut chunk: bytes::Bytes) -> std::io::Result<()> {
        const BLOCK: usize = signet_protocol::IO_BLOCK;
        if self.block.is_empty() && chunk.len() >= BLOCK {
            return self.send(chunk).await;
        }
        // Filled up to a block and no further: a block that grew past its capacity
        // would be copied whole into a larger one.
        while !chunk.is_empty() {
            if self.block.capacity() == 0 {
                self.block.reserve(BLOCK);
            }
            let take = (BLOCK - self.block.len()).min(chunk.len());
            self.block.extend_from_slice(&chunk.split_to(take));
            if self.block.len() >= BLOCK {
                let full = self.block.split().freeze();
                self.send(full).await?;
            }
        }
        Ok(())
    }

    /// Hands over what is left; answers its SHA-256 being made, the flush of the
    /// file and its directory, under way once every byte is written, and its blocks
    /// when it is [`LANDING_MAX`] bytes at most.
    async fn received(mut self) -> std::io::Result<(Hashing, Flush, Option<Vec<bytes::Bytes>>)> {
        if !self.block.is_empty() {
            let last = self.block.split().freeze();
            self.send(last).await?;
        }
        if self.tx.send(ToWrite::End).await.is_err() {
            return Err(self.failed().await);
        }
        // The hashing thread ends with the last block.
        drop(self.to_hash);
        Ok((Hashing::Making(self.hashed), Flush(self.thread), self.kept))
    }
}

/// Streams `body` into memory, or to `path` once it is more than
/// [`store::INLINE_MAX`], hashing as it goes; space beyond `reserved` is reserved chunk
/// by chunk. Answers once every byte is received: a file's SHA-256 may still be being
/// made, its flush (fsync'd, with its directory) is under way once it is written.
async fn spool(
    store: &Store,
    path: &Path,
    body: Body,
    reserved: &mut u64,
) -> Result<Received, Spool> {
    let mut sink = Sink::new(path);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Spool::Broken)?;
        let len = chunk.len() as u64;
        if sink.n + len > *reserved {
            let more = sink.n + len - *reserved;
            if !store.reserve(more) {
                return Err(Spool::Full);
            }
            *reserved += more;
        }
        sink.write(chunk).await.map_err(Spool::Disk)?;
    }
    let received = sink.received().await.map_err(Spool::Disk)?;
    // The input's bytes are counted from now on; the reservation is given back.
    store.charge(received.n);
    Ok(received)
}

/// What the agent's answer became: a signed file landed in the spool, or a patch the
/// result is kept as, with the spooled input ([`patched`]).
enum Answer {
    Landed(Landed),
    Kept(Arc<signet_api::wire::patch::Checked>),
}

enum Saved {
    /// The answer broke off (or the input it is made of could not be read).
    Broken(std::io::Error),
    Disk(std::io::Error),
}

/// Streams the signed file (the agent's answer, or made of the input and the agent's
/// patch) into memory, or to `path` (fsync'd, with its directory) once it is more than
/// [`store::INLINE_MAX`], hashing as it goes.
async fn save(
    mut answer: Blocks,
    path: &Path,
    progress: Option<Arc<watch::Sender<Progress>>>,
) -> Result<Landed, Saved> {
    let mut sink = Sink::new(path);
    sink.progress = progress;
    while let Some(block) = answer.next().await {
        let block = block.map_err(Saved::Broken)?;
        sink.write(block).await.map_err(Saved::Disk)?;
    }
    sink.end().await.map_err(Saved::Disk)
}

/// Whether a job's input is in its spool file (else in the database), and its length.
async fn input_kept(store: &Store, id: &str) -> Result<(bool, u64), ErrorBody> {
    match store.inline_input(id) {
        Ok(Some(data)) => Ok((false, data.len() as u64)),
        Ok(None) => {
            let path = store.input_path(id);
            let len = tokio::task::spawn_blocking(move || std::fs::metadata(path).map(|m| m.len()))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                .map_err(|e| {
                    ErrorBody::from(JobError::internal(id, "opening the spooled input", &e))
                })?;
            Ok((true, len))
        }
        Err(e) => Err(JobError::internal(id, "reading the input", &e).into()),
    }
}

/// A job's input as it was kept: its bytes from the database, or its spool file read
/// ahead by a [`FileBody`].
async fn input_blocks(store: &Store, id: &str) -> Result<Blocks, ErrorBody> {
    match store.inline_input(id) {
        Ok(Some(data)) if data.is_empty() => Ok(futures_util::stream::empty().boxed()),
        Ok(Some(data)) => Ok(futures_util::stream::once(std::future::ready(Ok(
            bytes::Bytes::from(data),
        )))
        .boxed()),
        Ok(None) => Ok(open_spooled(store.input_path(id))
            .await
            .map_err(|e| ErrorBody::from(JobError::internal(id, "opening the spooled input", &e)))?
            .into_data_stream()
            .boxed()),
        Err(e) => Err(JobError::internal(id, "reading the input", &e).into()),
    }
}

/// A job's input: its blocks as the intake received them when they are held
/// ([`Landing`]), else as it was kept ([`input_blocks`]).
async fn held_or_kept(store: &Store, id: &str, held: &[bytes::Bytes]) -> Result<Blocks, ErrorBody> {
    if held.is_empty() {
        return input_blocks(store, id).await;
    }
    let blocks: Vec<_> = held.iter().cloned().map(Ok).collect();
    Ok(futures_util::stream::iter(blocks).boxed())
}

/// Reads the agent's patch answer, at most [`PATCH_MAX`] bytes.
async fn read_patch(id: &str, body: hyper::body::Incoming) -> Result<Patch, ErrorBody> {
    let bytes = http_body_util::Limited::new(body, PATCH_MAX)
        .collect()
        .await
        .map_err(|e| {
            tracing::warn!(job = id, error = %e, "the agent's answer broke off or was too long");
            ErrorBody::new(
                ErrorCode::AgentUnavailable,
                "the signing VM's agent stopped answering mid-job; nothing was delivered",
            )
            .retryable(true)
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        tracing::error!(job = id, error = %e, "the agent's patch answer cannot be read");
        ErrorBody::new(ErrorCode::AgentUnavailable, "the signing VM's agent answered a signed file signetd cannot read; nothing was delivered; update signet-agent to signetd's version").retryable(false)
    })
}

/// The signed file a checked patch makes of the input: the input's first bytes, those
/// the patch edits written over, then the patch's tail.
fn patched_blocks(input: Blocks, patch: signet_api::wire::patch::Checked) -> Blocks {
    let patch = Arc::new(patch);
    let keep = patch.keep();
    let tail = bytes::Bytes::copy_from_slice(patch.tail());
    let kept = futures_util::stream::unfold((input, 0u64), move |(mut input, at)| {
        let patch = Arc::clone(&patch);
        async move {
            if at >= keep {
                return None;
            }
            let block = match input.next().await {
                Some(Ok(block)) => block,
                Some(Err(e)) => return Some((Err(e), (input, keep))),
                None => {
                    let short = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the spooled input ends at {at} bytes, before the {keep} the agent's answer keeps"),
                    );
                    return Some((Err(short), (input, keep)));
                }
            };
            let take = usize::try_from(keep - at).map_or(block.len(), |left| left.min(block.len()));
            let mut block = block.slice(..take);
            if patch.touches(at, take as u64) {
                let mut edited = bytes::BytesMut::from(&block[..]);
                patch.apply(at, &mut edited);
                block = edited.freeze();
            }
            Some((Ok(block), (input, at + take as u64)))
        }
    });
    kept.chain(futures_util::stream::once(std::future::ready(Ok(tail))))
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon with one profile (`release`, SHA-256), no worker running: what is
    /// queued stays queued.
    fn daemon(dir: &Path) -> Arc<crate::services::daemon::Daemon> {
        let path = dir.join("signetd.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\nagent = \"unix:/run/a.sock\"\nlisten = [\"unix:/run/s.sock\"]\ndefault_profile = \"release\"\n\n[profiles.release]\nhash = \"sha256\"\n",
                dir.join("state").display()
            ),
        )
        .unwrap();
        let cfg = crate::config::Config::load(&path).unwrap();
        Arc::new(crate::services::daemon::Daemon::open(cfg).unwrap())
    }

    fn request(if_profile: Option<&str>, key: Option<&str>) -> SubmitRequest {
        SubmitRequest {
            peer: Peer::Unix {
                uid: 0,
                gid: 0,
                pid: None,
                groups: Vec::new(),
            },
            over_tls: false,
            authorization: None,
            query: Ok(SignQuery {
                filename: Some("data.p7".into()),
                mode: signet_api::wire::SignMode::Digest,
                ..SignQuery::default()
            }),
            kind: Kind::Sign,
            content_type: None,
            content_length: Some(4),
            idempotency_key: key.map(str::to_owned),
            if_profile: if_profile.map(str::to_owned),
            respond_async: true,
            early_result: false,
            body: Body::from(&b"data"[..]),
        }
    }

    fn jobs(store: &Store) -> i64 {
        store
            .conn()
            .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn a_profile_changed_since_the_caller_asked_is_refused_before_a_job() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        let jobs_svc = daemon.job_service();
        let caller = root(&daemon);
        // The intake compares with exactly what GET /v1/profile says.
        let (_, now) = profile_answer(&jobs_svc.profile_options(None, &caller).unwrap());
        let stale = audit::hex(&Sha256::digest(b"an answer of before"));

        let Signing::Failed(e) = jobs_svc.sign(request(Some(&stale), None)).await else {
            panic!("a stale precondition is refused")
        };
        let told = ErrorBody::from(&e);
        assert_eq!(
            (told.code, told.code.http_status()),
            (ErrorCode::ProfileChanged, 412)
        );
        assert!(told.message.contains("ask again"), "{}", told.message);
        assert_eq!(jobs(jobs_svc.store()), 0, "no job record, nothing queued");
        assert_eq!(jobs_svc.queue_status().waiting, 0);
        let tail = daemon.reads().audit_tail(10).await.unwrap();
        assert!(
            tail.len() == 1 && tail[0].error.as_deref() == Some("profile_changed"),
            "the refusal is audited as the others before a job are: {tail:?}"
        );

        // The answer as it is now: queued. No precondition: as before.
        for (if_profile, key) in [(Some(now.as_str()), Some("k1")), (None, None)] {
            let Signing::Queued { job, .. } = jobs_svc.sign(request(if_profile, key)).await else {
                panic!("queued")
            };
            assert_eq!(job.unwrap().state, JobState::Queued);
        }
        assert_eq!(jobs(jobs_svc.store()), 2);

        // The same request sent again with its key (across a restart) gets its job
        // whatever the profile is now: refusing it would make the caller sign twice.
        let Signing::Queued { id, .. } = jobs_svc.sign(request(Some(&stale), Some("k1"))).await
        else {
            panic!("the key's job")
        };
        assert_eq!(id, "1");
        assert_eq!(jobs(jobs_svc.store()), 2);
    }

    /// The caller root is over the unix socket.
    fn root(daemon: &crate::services::daemon::Daemon) -> Caller {
        daemon
            .callers()
            .authenticate(
                &Peer::Unix {
                    uid: 0,
                    gid: 0,
                    pid: None,
                    groups: Vec::new(),
                },
                false,
                None,
            )
            .unwrap()
    }

    fn new_job() -> NewJob {
        NewJob {
            caller: "uid:0".into(),
            transport: "unix".into(),
            idempotency_key: None,
            kind: Kind::Sign,
            profile: "release".into(),
            filename: Some("app.exe".into()),
            agent_query: "profile=release".into(),
            content_type: "application/octet-stream".into(),
            request_sha256: None,
        }
    }

    /// A body over [`store::INLINE_MAX`] in pieces of every size lands whole in its
    /// spool file, with the SHA-256 of all of it; a small one stays in memory.
    #[tokio::test]
    async fn a_sink_spools_a_large_body_whole_on_its_writer_and_keeps_a_small_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.out");
        let bytes: Vec<u8> = (0..(3 * signet_protocol::IO_BLOCK + 70_001))
            .map(|i| (i % 253) as u8)
            .collect();
        let mut sink = Sink::new(&path);
        let mut at = 0;
        for (i, size) in [1usize, 17, 65_536, signet_protocol::IO_BLOCK + 5, 3]
            .into_iter()
            .cycle()
            .enumerate()
        {
            if at == bytes.len() || i > 1000 {
                break;
            }
            let end = (at + size).min(bytes.len());
            sink.write(bytes::Bytes::copy_from_slice(&bytes[at..end]))
                .await
                .unwrap();
            at = end;
        }
        let landed = sink.end().await.unwrap();
        assert!(landed.inline.is_none());
        assert_eq!(landed.n, bytes.len() as u64);
        assert_eq!(landed.sha, audit::hex(&Sha256::digest(&bytes)));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);

        let small = dir.path().join("2.out");
        let mut sink = Sink::new(&small);
        sink.write(bytes::Bytes::from_static(b"abc")).await.unwrap();
        let landed = sink.end().await.unwrap();
        assert_eq!(landed.inline.as_deref(), Some(&b"abc"[..]));
        assert_eq!(landed.sha, audit::hex(&Sha256::digest(b"abc")));
        assert!(!small.exists());
    }

    /// A result streamed as it is spooled gives its bytes as they are written, ends
    /// only once the job is signed, and breaks off when the attempt ends otherwise.
    #[tokio::test]
    async fn a_live_result_ends_only_once_signed_and_breaks_off_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 1 << 30).unwrap();
        let bytes: Vec<u8> = (0..(2 * signet_protocol::IO_BLOCK + 100_001))
            .map(|i| (i % 249) as u8)
            .collect();
        for signed in [true, false] {
            let path = dir.path().join(format!("{signed}.out"));
            let paths = vec![path.clone(), dir.path().join("none")];
            let guard = LiveGuard::start(&engine, "7", paths, None, "application/x-test");
            let live = lock(&engine.live).get("7").cloned().unwrap();
            assert_eq!(live.content_type, "application/x-test");
            let mut sink = Sink::new(&path);
            sink.progress = Some(Arc::clone(&guard.progress));
            sink.write(bytes::Bytes::from(bytes.clone())).await.unwrap();
            let landed = sink.end().await.unwrap();
            streamed_then_ended(&engine, live, &bytes, (guard, landed.n), signed).await;
        }
    }

    /// Reads a live result's stream until it has `want` (all of it there, and still the
    /// answer does not end), then ends the attempt: committed signed with its `n` bytes,
    /// the stream ends; not, it breaks off. Either way the result leaves the engine's map.
    async fn streamed_then_ended(
        engine: &Engine,
        live: Live,
        want: &[u8],
        (guard, n): (LiveGuard<'_>, u64),
        signed: bool,
    ) {
        use futures_util::FutureExt;
        let mut blocks = Box::pin(live.blocks());
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.extend_from_slice(&blocks.next().await.unwrap().unwrap());
        }
        assert_eq!(got, want);
        assert!(blocks.next().now_or_never().is_none());
        if signed {
            guard.signed(n);
            drop(guard);
            assert!(blocks.next().await.is_none());
        } else {
            drop(guard);
            assert!(blocks.next().await.unwrap().is_err());
            assert!(blocks.next().await.is_none());
        }
        assert!(lock(&engine.live).is_empty());
    }

    /// A small result, whole in memory before the job is committed, streams at once
    /// to a caller that asked for it early (with its length), and to no other; its end
    /// comes only once the job is signed, and it breaks off when the job is not.
    #[tokio::test]
    async fn a_small_result_streams_before_its_commit_only_when_asked_and_ends_once_signed() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        let svc = daemon.job_service();
        let engine = svc.engine();
        let signature: Vec<u8> = (0..3000).map(|i| (i % 251) as u8).collect();
        for signed in [true, false] {
            // A job at the agent: its result is awaited.
            let Inserted::New(id) = engine.store.insert(&new_job()).unwrap() else {
                panic!("a new job");
            };
            engine.store.queued_inline(&id, "q", b"abc").unwrap();
            engine.store.running(&id).unwrap();
            let out = dir.path().join(format!("{id}.out"));
            let paths = vec![out.clone(), dir.path().join("none")];
            let guard = LiveGuard::start(engine, &id, paths, None, "application/x-test");
            let mut sink = Sink::new(&out);
            sink.progress = Some(Arc::clone(&guard.progress));
            sink.write(bytes::Bytes::from(signature.clone()))
                .await
                .unwrap();
            let landed = sink.end().await.unwrap();
            let inline = landed
                .inline
                .clone()
                .expect("a small result stays in memory");
            // Not yet here whole: neither kind of caller has it.
            assert!(svc.wait_result(&id, true).now_or_never().is_none());
            guard.whole(bytes::Bytes::from(inline));
            // Asked for early: at once, with its length.
            let live = svc
                .wait_result(&id, true)
                .now_or_never()
                .expect("answered at once")
                .expect("a live result");
            assert_eq!(live.whole.get().map(|b| b.len()), Some(signature.len()));
            // Not asked for: the caller waits for the job's end.
            assert!(svc.wait_result(&id, false).now_or_never().is_none());
            streamed_then_ended(engine, live, &signature, (guard, landed.n), signed).await;
        }
    }

    /// What a `kill -9` leaves between the steps of jobs whose input is in the
    /// database: recovery queues again those queued or at the agent, with their input,
    /// fails the upload cut short, and leaves a signed job's result alone.
    #[test]
    fn recovery_after_a_crash_queues_inline_jobs_again_with_their_input() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let id = |i: Inserted| match i {
            Inserted::New(id) => id,
            Inserted::Existing(_) => panic!("a new job"),
        };
        let receiving = id(store.insert(&new_job()).unwrap());
        let queued = id(store.insert(&new_job()).unwrap());
        store.charge(3);
        store.queued_inline(&queued, "q", b"abc").unwrap();
        let running = id(store.insert(&new_job()).unwrap());
        store.charge(4);
        store.queued_inline(&running, "r", b"abcd").unwrap();
        store.running(&running).unwrap();
        let signed = id(store.insert(&new_job()).unwrap());
        store.charge(5);
        store.queued_inline(&signed, "s", b"abcde").unwrap();
        store.running(&signed).unwrap();
        store
            .finish_with(
                &signed,
                JobState::Signed,
                Some(("o", 2, "application/octet-stream")),
                Some(b"ok"),
                None,
                &Entry::default(),
            )
            .unwrap();
        drop(store);

        let engine = Engine::open(dir.path(), 1 << 20).unwrap();
        let store = engine.store();
        assert_eq!(engine.ended_at_start(), std::slice::from_ref(&receiving));
        assert_eq!(
            store.get(&receiving).unwrap().unwrap().state,
            JobState::Failed
        );
        for (job, input) in [(&queued, &b"abc"[..]), (&running, &b"abcd"[..])] {
            assert_eq!(store.get(job).unwrap().unwrap().state, JobState::Queued);
            assert_eq!(store.inline_input(job).unwrap().as_deref(), Some(input));
        }
        // In the order they were sent, once each.
        let sched = lock(&engine.sched);
        assert_eq!(sched.queue.position(&queued), Some(0));
        assert_eq!(sched.queue.position(&running), Some(1));
        assert_eq!(sched.queue.position(&signed), None);
        assert_eq!(sched.queue.len(), 2);
        drop(sched);
        assert_eq!(store.inline_input(&signed).unwrap(), None);
        assert_eq!(
            store.inline_output(&signed).unwrap().as_deref(),
            Some(&b"ok"[..])
        );
        // The two inputs and the undelivered result count against the quota.
        assert_eq!(store.spool_usage().0, 3 + 4 + 2);
    }

    /// A spooled input of at most `LANDING_MAX` is recorded queued while its file is
    /// flushed: after a crash, a job whose file is not the input its record names (cut
    /// short, torn, gone) fails as an upload cut short, and one whose file is goes back
    /// to the queue.
    #[test]
    fn recovery_fails_a_landed_job_whose_file_is_not_the_input_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let sha = audit::hex(&Sha256::digest(&data));
        let mut torn = data.clone();
        torn[70_000] ^= 1;
        let mut jobs = Vec::new();
        for file in [
            Some(&data[..]),
            Some(&data[..90_000]),
            Some(&torn[..]),
            None,
        ] {
            let Inserted::New(id) = store.insert(&new_job()).unwrap() else {
                panic!("a new job");
            };
            if let Some(file) = file {
                std::fs::write(store.input_path(&id), file).unwrap();
            }
            store.charge(data.len() as u64);
            store.queued(&id, &sha, data.len() as u64).unwrap();
            jobs.push(id);
        }
        store.running(&jobs[1]).unwrap();
        drop(store);

        let engine = Engine::open(dir.path(), 1 << 30).unwrap();
        let store = engine.store();
        assert_eq!(engine.ended_at_start(), &jobs[1..]);
        assert_eq!(
            store.get(&jobs[0]).unwrap().unwrap().state,
            JobState::Queued
        );
        assert_eq!(lock(&engine.sched).queue.position(&jobs[0]), Some(0));
        for id in &jobs[1..] {
            let row = store.get(id).unwrap().unwrap();
            assert_eq!(row.state, JobState::Failed, "{id}");
            assert_eq!(row.error.unwrap().code, ErrorCode::TruncatedInput, "{id}");
            assert!(!store.input_path(id).exists(), "{id}");
            assert_eq!(lock(&engine.sched).queue.position(id), None, "{id}");
        }
        assert_eq!(std::fs::read(store.input_path(&jobs[0])).unwrap(), data);
    }

    /// A result kept as its input and a patch goes to a caller that takes the patch as
    /// the patch at once, with the input's SHA-256; its end comes only once the job is
    /// signed, and it breaks off when the job does not end signed.
    #[tokio::test]
    async fn a_patch_goes_at_once_and_ends_only_once_signed() {
        use futures_util::FutureExt;
        use signet_api::wire::patch::Patch;
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 1 << 30).unwrap();
        let patch = Arc::new(
            Patch::new(900, &[(88, &[1, 2])], &[7; 50])
                .check(1000)
                .unwrap(),
        );
        let json = serde_json::to_vec(&patch.to_patch()).unwrap();
        for signed in [true, false] {
            let guard = LiveGuard::start(
                &engine,
                "7",
                vec![dir.path().join("7.in")],
                Some((Arc::clone(&patch), Arc::default(), Some("in".to_owned()))),
                "x/y",
            );
            guard.written(patch.len());
            let live = lock(&engine.live).get("7").cloned().unwrap();
            assert!(live.is_patch());
            assert_eq!(live.input_sha256.as_deref(), Some("in"));
            let mut body = Box::pin(live.patch_answer());
            assert_eq!(body.next().await.unwrap().unwrap(), json);
            assert!(body.next().now_or_never().is_none(), "no end before signed");
            if signed {
                guard.signed(patch.len());
                drop(guard);
                assert!(body.next().await.is_none());
            } else {
                drop(guard);
                let e = body.next().await.unwrap().unwrap_err();
                assert!(
                    e.to_string().contains("collect the job's result again"),
                    "{e}"
                );
                assert!(body.next().await.is_none());
            }
        }
        // Without the input's SHA-256 it is no patch to answer.
        let _guard = LiveGuard::start(
            &engine,
            "8",
            vec![dir.path().join("8.in")],
            Some((Arc::clone(&patch), Arc::default(), None)),
            "x/y",
        );
        assert!(!lock(&engine.live).get("8").unwrap().is_patch());
    }

    /// A result kept as its input and a patch is whole at once: a waiting client
    /// streams it as soon as the agent answered, from the input wherever it was moved
    /// to, and the stream ends only once the job is signed.
    #[tokio::test]
    async fn a_result_kept_as_a_patch_streams_at_once_from_its_input_wherever_it_is() {
        use signet_api::wire::patch::Patch;
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 1 << 30).unwrap();
        let input: Vec<u8> = (0..(signet_protocol::IO_BLOCK + 5000))
            .map(|i| (i % 241) as u8)
            .collect();
        let len = input.len() as u64;
        let patch = Arc::new(
            Patch::new(len - 1000, &[(88, &[1, 2, 3, 4])], &[7; 2500])
                .check(len)
                .unwrap(),
        );
        let mut want = input[..input.len() - 1000].to_vec();
        want[88..92].copy_from_slice(&[1, 2, 3, 4]);
        want.extend_from_slice(&[7; 2500]);
        let (input_path, out) = (dir.path().join("7.in"), dir.path().join("7.out"));
        std::fs::write(&input_path, &input).unwrap();
        // Streamed whole before the job is signed, its end only after: the file, or
        // the blocks held, read with the patch.
        let start = |id: &'static str, paths, held: Vec<bytes::Bytes>| {
            let guard = LiveGuard::start(
                &engine,
                id,
                paths,
                Some((Arc::clone(&patch), Arc::new(held), None)),
                "x/y",
            );
            guard.written(patch.len());
            guard
        };
        async fn read_whole(engine: &Engine, guard: LiveGuard<'_>, id: &str, want: &[u8]) {
            let live = lock(&engine.live).get(id).cloned().unwrap();
            streamed_then_ended(engine, live, want, (guard, want.len() as u64), true).await;
        }
        let guard = start("7", vec![input_path.clone(), out.clone()], Vec::new());
        // Renamed to the result (after the commit) before this client read a byte.
        std::fs::rename(&input_path, &out).unwrap();
        read_whole(&engine, guard, "7", &want).await;
        // Nothing of the input was written over.
        assert_eq!(std::fs::read(&out).unwrap(), input);
        // The input held in memory as the intake wrote it: the result is made of it,
        // whatever became of the file.
        std::fs::remove_file(&out).unwrap();
        let held = input
            .chunks(100_000)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        read_whole(&engine, start("8", vec![out.clone()], held), "8", &want).await;
    }

    /// What a crash leaves of a job whose result is kept as its input and a patch: none
    /// of its input written over, whatever the step. Committed signed, the input is
    /// renamed to the result at start and read with the patch; not committed, it is
    /// the input of a job that runs again.
    #[test]
    fn a_result_kept_as_a_patch_survives_a_crash_and_an_uncommitted_one_leaves_the_input() {
        use signet_api::wire::patch::Patch;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let id = |i: Inserted| match i {
            Inserted::New(id) => id,
            Inserted::Existing(_) => panic!("a new job"),
        };
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 249) as u8).collect();
        let patch = Patch::new(150_000, &[(88, &[1, 2, 3, 4])], &[7; 999])
            .check(200_000)
            .unwrap();
        // One at the agent when signetd stopped, one committed signed before its input
        // was renamed to the result.
        let sha = audit::hex(&Sha256::digest(&data));
        let mut jobs = Vec::new();
        for _ in 0..2 {
            let job = id(store.insert(&new_job()).unwrap());
            std::fs::write(store.input_path(&job), &data).unwrap();
            store.charge(200_000);
            store.queued(&job, &sha, 200_000).unwrap();
            store.running(&job).unwrap();
            jobs.push(job);
        }
        let (running, signed) = (&jobs[0], &jobs[1]);
        let json = serde_json::to_vec(&patch.to_patch()).unwrap();
        store
            .finish_patched(
                signed,
                ("o", patch.len(), "application/octet-stream"),
                &json,
                &Entry::default(),
            )
            .unwrap();
        drop(store);

        let engine = Engine::open(dir.path(), 1 << 30).unwrap();
        let store = engine.store();
        assert_eq!(store.get(running).unwrap().unwrap().state, JobState::Queued);
        assert_eq!(std::fs::read(store.input_path(running)).unwrap(), data);
        assert_eq!(store.result_patch(running).unwrap(), None);
        assert_eq!(lock(&engine.sched).queue.position(running), Some(0));
        // The signed one is its input, renamed, and the patch kept with it.
        assert_eq!(store.get(signed).unwrap().unwrap().state, JobState::Signed);
        assert!(!store.input_path(signed).exists());
        assert_eq!(std::fs::read(store.output_path(signed)).unwrap(), data);
        let kept = store.result_patch(signed).unwrap().unwrap();
        assert_eq!(kept, patch);
        let mut want = data[..150_000].to_vec();
        want[88..92].copy_from_slice(&[1, 2, 3, 4]);
        want.extend_from_slice(&[7; 999]);
        let file = std::fs::File::open(store.output_path(signed)).unwrap();
        assert_eq!(
            patched::read(&file, &kept, 0, 1 << 20).unwrap(),
            want,
            "the signed file, made of the input and the patch"
        );
        // Its result counts as the input's file did, until it is delivered.
        assert_eq!(store.spool_usage().0, 2 * 200_000);
        assert!(store.delivered(signed));
        assert_eq!(store.spool_usage().0, 200_000);
        // Gone with the result.
        assert_eq!(store.expire(u64::MAX).unwrap().len(), 1);
        assert_eq!(store.result_patch(signed).unwrap(), None);
    }

    /// A result kept as its input and a patch is collected the same wherever its file
    /// is in its life (`.in` until the worker renames it after the commit, `.out`,
    /// `.delivered` once streamed whole), and is gone only when none is left.
    #[tokio::test]
    async fn a_result_kept_as_a_patch_is_collected_under_each_name_of_its_file() {
        use http_body_util::BodyExt;
        use signet_api::wire::patch::Patch;
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        let svc = daemon.job_service();
        let store = svc.store();
        let caller = root(&daemon);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 239) as u8).collect();
        let patch = Patch::new(300_000, &[(152, &[5; 8])], &[3; 2048])
            .check(300_000)
            .unwrap();
        let mut want = data.clone();
        want[152..160].copy_from_slice(&[5; 8]);
        want.extend_from_slice(&[3; 2048]);
        let Inserted::New(id) = store.insert(&new_job()).unwrap() else {
            panic!("a new job")
        };
        std::fs::write(store.input_path(&id), &data).unwrap();
        store.charge(300_000);
        store.queued(&id, "in", 300_000).unwrap();
        store.running(&id).unwrap();
        let json = serde_json::to_vec(&patch.to_patch()).unwrap();
        let sha = audit::hex(&Sha256::digest(&want));
        store
            .finish_patched(
                &id,
                (&sha, patch.len(), "application/octet-stream"),
                &json,
                &Entry::default(),
            )
            .unwrap();
        let collect = || async {
            let d = svc.result(&id, &caller).await?;
            assert_eq!(d.len, Some(want.len() as u64));
            Ok::<_, JobError>(d.body.collect().await.unwrap().to_bytes().to_vec())
        };
        assert_eq!(collect().await.unwrap(), want, "from <id>.in");
        std::fs::rename(store.input_path(&id), store.output_path(&id)).unwrap();
        assert_eq!(collect().await.unwrap(), want, "from <id>.out");
        assert!(store.delivered(&id));
        assert_eq!(collect().await.unwrap(), want, "from <id>.delivered");
        // A caller that takes a patch gets the patch and the SHA-256 of the input it
        // changes, to make the signed file of its own copy.
        let as_patch = || async {
            let d = svc.result_as(&id, &caller, true).await?;
            assert_eq!(d.content_type, signet_api::wire::patch::PATCH_MEDIA_TYPE);
            assert_eq!(d.input_sha256.as_deref(), Some("in"));
            let body = d.body.collect().await.unwrap().to_bytes().to_vec();
            assert_eq!(d.len, Some(body.len() as u64));
            Ok::<_, JobError>(body)
        };
        assert_eq!(as_patch().await.unwrap(), json);
        std::fs::remove_file(store.delivered_path(&id)).unwrap();
        assert!(matches!(
            collect().await,
            Err(JobError::DeliveredCopyGone { .. })
        ));
        // The patch needs no copy of the input here.
        assert_eq!(as_patch().await.unwrap(), json);
        // Gone once the result expires, as the signed file is.
        assert_eq!(store.expire(u64::MAX).unwrap().len(), 1);
        assert!(matches!(
            svc.result_as(&id, &caller, true).await,
            Err(JobError::ResultExpired { .. })
        ));
    }

    /// `data` as blocks of the sizes in `sizes`, in turn.
    fn blocks_of(data: &[u8], sizes: &[usize]) -> Blocks {
        let mut out = Vec::new();
        let (mut at, mut i) = (0, 0);
        while at < data.len() {
            let n = sizes[i % sizes.len()].min(data.len() - at);
            out.push(Ok(bytes::Bytes::copy_from_slice(&data[at..at + n])));
            at += n;
            i += 1;
        }
        futures_util::stream::iter(out).boxed()
    }

    async fn collected(mut blocks: Blocks) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = blocks.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    /// An input sent on while it is flushed goes to the agent all but its last byte,
    /// which goes once the job is queued, marking it running; when it is not queued,
    /// the last byte never goes and the job is called back.
    #[tokio::test]
    async fn an_input_sent_while_it_is_flushed_ends_only_once_the_job_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 30).unwrap());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        for queued in [true, false] {
            let id = match store.insert(&new_job()).unwrap() {
                Inserted::New(id) => id,
                Inserted::Existing(id) => panic!("{id} again"),
            };
            let (durable_tx, durable) = watch::channel(None);
            let gate = Arc::new(Gate::new(Some((Arc::clone(&store), id.clone()))));
            let phase = Arc::new(watch::channel(Phase::Sending).0);
            // Its SHA-256 is made while it is sent, and follows it as a trailer.
            let sha = Arc::new(std::sync::OnceLock::new());
            let mut sent = Box::pin(upload(
                blocks_of(&data, &[65_536, 100_000]),
                Some(data.len() as u64),
                None,
                Some(durable),
                Some(Arc::clone(&sha)),
                Arc::clone(&gate),
                Arc::clone(&phase),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            ));
            let data_of = |frame: Option<std::io::Result<hyper::body::Frame<bytes::Bytes>>>| {
                frame.unwrap().unwrap().into_data().unwrap()
            };
            let mut got = Vec::new();
            while got.len() < data.len() - 1 {
                got.extend_from_slice(&data_of(sent.next().await));
            }
            assert!(got[..] == data[..data.len() - 1]);
            // Nothing more until it is known whether the job is queued.
            let waiting = tokio::time::timeout(Duration::from_millis(50), sent.next()).await;
            assert!(
                waiting.is_err(),
                "the last byte went before the job was queued"
            );
            assert!(gate.is_held() && *phase.borrow() == Phase::Sending);
            if queued {
                let hex = "ab".repeat(32);
                sha.set(hex.clone()).unwrap();
                store.queued(&id, &hex, data.len() as u64).unwrap();
                durable_tx.send_replace(Some(true));
                got.extend_from_slice(&data_of(sent.next().await));
                assert!(got == data);
                let trailers = sent.next().await.unwrap().unwrap().into_trailers().unwrap();
                assert_eq!(
                    trailers.get(signet_api::wire::INPUT_SHA256_HEADER).unwrap(),
                    hex.as_str()
                );
                assert!(sent.next().await.is_none());
                assert_eq!(*phase.borrow(), Phase::Sent);
                assert_eq!(store.get(&id).unwrap().unwrap().state, JobState::Running);
            } else {
                drop(durable_tx);
                let last = tokio::time::timeout(Duration::from_millis(200), sent.next()).await;
                assert!(last.is_err(), "the last byte of a job not queued went");
                assert!(gate.sent_back());
                assert_eq!(store.get(&id).unwrap().unwrap().state, JobState::Receiving);
            }
        }
    }

    #[tokio::test]
    async fn a_patch_answer_makes_the_signed_file_of_the_input_whatever_its_blocks() {
        use signet_api::wire::patch::Patch;
        let input: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        // A signature replaced: the content ends at 4000, before the old table.
        let patch = Patch::new(4000, &[(88, &[1, 2, 3, 4]), (152, &[9; 8])], &[7; 1234]);
        let mut want = input[..4000].to_vec();
        want[88..92].copy_from_slice(&[1, 2, 3, 4]);
        want[152..160].copy_from_slice(&[9; 8]);
        want.extend_from_slice(&[7; 1234]);
        for sizes in [
            &[5000][..],
            &[1],
            &[90, 3, 61, 7],
            &[152, 8, 3840, 1000],
            &[4000],
        ] {
            let made = patched_blocks(blocks_of(&input, sizes), patch.check(5000).unwrap());
            assert_eq!(collected(made).await.unwrap(), want, "blocks of {sizes:?}");
        }
        // An input shorter than the patch keeps (a spool file cut) is an error, not
        // a shorter file.
        let made = patched_blocks(
            blocks_of(&input[..3000], &[1000]),
            patch.check(5000).unwrap(),
        );
        let e = collected(made).await.unwrap_err();
        assert!(e.to_string().contains("ends at 3000 bytes"), "{e}");
        // A patch that reaches past the input is refused before anything is made.
        assert!(patch.check(3999).is_err());
    }

    #[test]
    fn transports_are_named_for_the_audit() {
        let tcp = Peer::Tcp {
            addr: "10.0.0.5:4000".parse().unwrap(),
        };
        assert_eq!(transport(&tcp, false), "tcp");
        assert_eq!(transport(&tcp, true), "tls");
        assert_eq!(
            transport(&Peer::Vsock { cid: 105, port: 1 }, false),
            "vsock"
        );
        let unix = Peer::Unix {
            uid: 1000,
            gid: 1000,
            pid: Some(4),
            groups: Vec::new(),
        };
        assert_eq!(transport(&unix, false), "unix");
    }
}

//! The daemon's core commands. Every front end (HTTP now; D-Bus and the CLI later)
//! calls these and renders their results.
//!
//! A job goes through the durable queue ([`crate::services::jobs`]): recorded, spooled, queued,
//! sent to the agent by the token's worker ([`Daemon::relay_to`]), its result spooled
//! and streamed to the caller.

use bytes::Bytes;
use http::{header, Request, Response};
use hyper::body::{Body, Incoming};
use signet_protocol::client::{self, ClientError};
use signet_protocol::transport::Peer;
use signet_protocol::wire::{
    AgentHealth, AgentReport, AgentSignQuery, AgentState, DaemonStatus, ErrorBody, ErrorCode,
    ProfileOptions, SignQuery, AGENT_HEALTH_PATH,
};

use crate::adapters::store::StoreError;
use crate::config::{Config, Profile};
use crate::core::policy::{self, Caller, Slot, Slots};
use crate::services::jobs::Engine;

/// How long the status waits for the agent's health: status must answer even when the
/// signing VM hangs.
const STATUS_AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many of the newest timeline entries the status carries.
const STATUS_TIMELINE_ENTRIES: usize = 10;

/// The running daemon.
#[derive(Debug)]
pub struct Daemon {
    /// The configuration in force: swapped whole by [`Daemon::reload`], read per
    /// request (a reader keeps the `Arc` it took for as long as it needs it).
    cfg: std::sync::RwLock<std::sync::Arc<Config>>,
    slots: std::sync::Arc<Slots>,
    /// The client database, when remote clients are served (`[tls]`).
    clients: Option<std::sync::Mutex<rusqlite::Connection>>,
    engine: Engine,
    timeline: crate::services::timeline::Timeline,
    /// The token refused the PIN in the host's `pin_file` (until another is given).
    host_pin_rejected: std::sync::atomic::AtomicBool,
    /// The token service's door ([`crate::services::tokens`]), or why it is not running.
    tokens: crate::services::tokens::Handle,
    /// Refusals waiting to be recorded with their count ([`crate::core::refusals`]).
    refusals: std::sync::Mutex<crate::core::refusals::Coalescer>,
    /// Wrong client secrets per source address.
    throttle: std::sync::Mutex<crate::core::refusals::Throttle>,
    /// The audit head kept outside the database, and the chain's check
    /// ([`crate::adapters::head`]); `None` until [`Daemon::keep_head`].
    head: std::sync::Mutex<Option<crate::adapters::head::Keeper>>,
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
}

impl Daemon {
    /// Opens the job database and spool under `state_dir` and resumes what a previous
    /// run left queued.
    pub fn open(cfg: Config) -> Result<Self, StoreError> {
        let quota = cfg.queue.spool_quota_mb.saturating_mul(1 << 20);
        let engine = Engine::open(&cfg.state_dir, quota)?;
        let timeline = crate::services::timeline::Timeline::new(engine.store().clone())?;
        let slots = Slots::new(cfg.limits.max_jobs_per_caller);
        let refusals = crate::core::refusals::Coalescer::new(std::time::Duration::from_secs(
            cfg.limits.refusal_interval_seconds,
        ));
        let throttle = crate::core::refusals::Throttle::new(cfg.limits.auth_failures_per_minute);
        Ok(Daemon {
            refusals: std::sync::Mutex::new(refusals),
            throttle: std::sync::Mutex::new(throttle),
            cfg: std::sync::RwLock::new(std::sync::Arc::new(cfg)),
            slots,
            clients: None,
            engine,
            timeline,
            host_pin_rejected: std::sync::atomic::AtomicBool::new(false),
            tokens: crate::services::tokens::Handle::off(
                "signetd was started without the token service",
            ),
            head: std::sync::Mutex::new(None),
        })
    }

    /// Holds the database against `head` (read by [`crate::adapters::head::guard`] before it was
    /// opened) and keeps the head from now on: refuses a database that lost its audit
    /// records; a broken chain is logged and reported by the status.
    pub fn keep_head(
        &self,
        head: Option<crate::adapters::head::Head>,
    ) -> Result<(), crate::adapters::head::HeadError> {
        let cfg = self.config();
        let dir = &cfg.state_dir;
        crate::adapters::head::check_opened(dir, &self.store().conn(), head.as_ref())?;
        let mut keeper = crate::adapters::head::Keeper::new(dir, head);
        if keeper.check(&self.store().conn()).is_none() {
            if let Some(h) = keeper.head().filter(|h| h.records > 0) {
                tracing::info!(records = h.records, head = %format!("{}:{}", h.hash, h.records), "audit chain checked at start");
            }
        }
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = Some(keeper);
        Ok(())
    }

    /// Checks the audit chain's newest records and keeps its head, every second, for
    /// the daemon's life.
    pub async fn run_head_keeper(self: std::sync::Arc<Self>) {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            self.check_head();
        }
    }

    /// One check of the chain from its last mark, and the head kept.
    pub fn check_head(&self) {
        let mut keeper = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = keeper.as_mut() {
            k.check(&self.store().conn());
        }
    }

    /// What is wrong with the appliance itself (its state database, its audit log),
    /// each with the fix.
    pub fn faults(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(f) = self.engine.store_fault() {
            out.push(f);
        }
        let keeper = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = keeper.as_ref().and_then(|k| k.broken.clone()) {
            out.push(why);
        }
        out
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
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

    /// The recovery timeline.
    pub fn timeline(&self) -> &crate::services::timeline::Timeline {
        &self.timeline
    }

    /// The job database, for modules that keep their own tables in it (and for the
    /// audit log: [`crate::adapters::audit::record_refusal`]).
    pub fn store(&self) -> &std::sync::Arc<crate::adapters::store::Store> {
        self.engine.store()
    }

    /// The daemon with remote clients checked against `conn` (see [`crate::adapters::clients`]).
    pub fn with_clients(mut self, conn: rusqlite::Connection) -> Self {
        self.clients = Some(std::sync::Mutex::new(conn));
        self
    }

    /// The daemon with the token service behind `handle` ([`crate::services::tokens::start`]).
    pub fn with_tokens(mut self, handle: crate::services::tokens::Handle) -> Self {
        self.tokens = handle;
        self
    }

    /// The token service's door, for the token commands ([`crate::services::tokens`]).
    pub fn token_service(&self) -> &crate::services::tokens::Handle {
        &self.tokens
    }

    /// Who is calling: over TLS the client named by HTTP Basic credentials
    /// (`authorization`), which must be valid; otherwise what the transport vouches
    /// for ([`Daemon::identify`]).
    pub fn authenticate(
        &self,
        peer: &Peer,
        over_tls: bool,
        authorization: Option<&str>,
    ) -> Result<Caller, ErrorBody> {
        if !over_tls {
            return Ok(self.identify(peer));
        }
        let refused = |why: &str| {
            ErrorBody::new(
                ErrorCode::Forbidden,
                format!("{why}; send the client's name and secret with HTTP Basic authentication (curl -u NAME:SECRET). The appliance's operator adds clients with `signetd client add`"),
            )
        };
        let Some((name, secret)) = authorization.and_then(crate::adapters::clients::parse_basic)
        else {
            return Err(refused("no client credentials were sent"));
        };
        let source = match peer {
            Peer::Tcp { addr } => Some(addr.ip()),
            _ => None,
        };
        if let Some(ip) = source {
            let now = std::time::Instant::now();
            let throttle = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(wait) = throttle.check(ip, now) {
                return Err(ErrorBody::new(
                    ErrorCode::TooManyAttempts,
                    format!(
                        "too many wrong client secrets came from {ip}; the next one is checked in {} s (Retry-After). Check the client's name and SIGNET_SECRET",
                        wait.as_secs().max(1)
                    ),
                )
                .retryable(true));
            }
        }
        let Some(db) = &self.clients else {
            return Err(refused("this appliance has no client database"));
        };
        let now = unix_now();
        let checked = {
            let conn = db.lock().unwrap_or_else(|e| e.into_inner());
            crate::adapters::clients::authenticate(&conn, &name, &secret, now)
        };
        match checked {
            Ok(Ok(granted)) => Ok(Caller::Client { name, granted }),
            Ok(Err(why)) => {
                if let Some(ip) = source {
                    self.throttle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .failed(ip, std::time::Instant::now());
                }
                // Which of unknown / wrong / expired it was is for the log only; the
                // front records the refusal in the audit log (`Daemon::refuse`).
                tracing::warn!(%peer, client = %name, reason = %why, "refused client credentials");
                Err(refused(&format!(
                    "the credentials of client {name:?} are not valid (unknown name, wrong secret, or an expired secret)"
                )))
            }
            Err(e) => {
                tracing::error!(error = %e, "client database");
                Err(ErrorBody::new(
                    ErrorCode::Internal,
                    "the appliance could not check client credentials; its operator sees why in signetd's log",
                ))
            }
        }
    }

    /// Who is calling, as far as the connection's transport vouches for it.
    pub fn identify(&self, peer: &Peer) -> Caller {
        match peer {
            Peer::Vsock { cid, .. } => Caller::of_vsock(&self.config().cid_to_vmid, *cid),
            Peer::Unix { uid, gid, pid } => Caller::Local {
                uid: *uid,
                gid: *gid,
                // The process may be gone already; then only its primary group counts.
                groups: pid
                    .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
                    .map(|s| policy::parse_proc_groups(&s))
                    .unwrap_or_default(),
            },
            Peer::Tcp { addr } => match &self.config().insecure_tcp_as {
                Some(name) => Caller::Client {
                    name: name.clone(),
                    granted: Vec::new(),
                },
                None => Caller::Anonymous {
                    addr: addr.to_string(),
                },
            },
        }
    }

    /// Takes one of the caller's job slots for as long as the [`Slot`] lives.
    pub fn start(&self, job: &Job) -> Result<Slot, ErrorBody> {
        self.slots.take(&job.caller.key()).ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::TooManyJobs,
                format!(
                    "{} already has {} jobs running, as many as one caller may; nothing was signed. Send this one again when one of them has ended",
                    job.caller,
                    self.slots.max()
                ),
            )
            .retryable(true)
        })
    }

    /// The configuration in force now.
    pub fn config(&self) -> std::sync::Arc<Config> {
        std::sync::Arc::clone(&self.cfg.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the configuration file again, checks it as `signetd check-config` does
    /// and, when it is valid, puts its grants, profiles, default profile, limits and
    /// token assignments in force at once ([`crate::config::reload::merge`]; the token service
    /// takes the new `[[tokens]]` up next: [`crate::services::tokens::Handle::reassign`]); the
    /// rest keeps its old values until a restart. A file that is not valid changes
    /// nothing. Jobs already accepted keep their agent query, queued and running jobs
    /// stay where they are. Logged either way.
    pub fn reload(&self) -> Result<crate::config::reload::Changes, String> {
        let path = self.config().path.clone();
        let new = crate::config::reload::check(&path).map_err(|e| {
            tracing::error!(config = %path.display(), error = %e, "the configuration was not reloaded: the file is not valid, so the configuration in force stays as it was; fix it (signetd check-config shows the error) and reload again");
            e
        })?;
        let (merged, changes) = {
            let mut cfg = self.cfg.write().unwrap_or_else(|e| e.into_inner());
            let (merged, changes) = crate::config::reload::merge(&cfg, new);
            if changes.applied.contains(&"tokens") {
                // The kept [passthrough] and [[known_tokens]] with the new assignments,
                // handed over under the lock so two reloads reach the service in order
                // (the hand-over takes only the watch channel's own lock).
                self.tokens
                    .reassign(crate::services::tokens::Setup::from_config(&merged));
            }
            let merged = std::sync::Arc::new(merged);
            *cfg = merged.clone();
            (merged, changes)
        };
        let limits = &merged.limits;
        // Outside the configuration's lock: no other lock is taken under it but the
        // token service's hand-over above.
        self.slots.set_max(limits.max_jobs_per_caller);
        self.refusals().set_interval(std::time::Duration::from_secs(
            limits.refusal_interval_seconds,
        ));
        self.throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_per_minute(limits.auth_failures_per_minute);
        tracing::info!(config = %path.display(), changes = %changes.summary(), "configuration reloaded");
        Ok(changes)
    }

    /// How long a throttled address waits at most for its next try, in seconds (the
    /// `Retry-After` of `too_many_attempts`).
    pub fn retry_after_seconds(&self) -> u64 {
        60_u64.div_ceil(u64::from(
            self.config().limits.auth_failures_per_minute.max(1),
        ))
    }

    /// The coalescer of refusals ([`crate::core::refusals`]), for the job path.
    pub(crate) fn refusals(&self) -> std::sync::MutexGuard<'_, crate::core::refusals::Coalescer> {
        self.refusals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The profile `name` (`None`: the default) if it exists and the caller has a
    /// grant for it.
    fn profile(
        &self,
        name: Option<&str>,
        caller: &Caller,
    ) -> Result<(String, Profile, std::sync::Arc<Config>), ErrorBody> {
        let cfg = self.config();
        let name = name.unwrap_or(&cfg.default_profile);
        let Some(profile) = cfg.profiles.get(name) else {
            return Err(ErrorBody::new(
                ErrorCode::UnknownProfile,
                format!(
                    "there is no signing profile {name:?}; profiles: {} (the default is {:?})",
                    cfg.profiles.keys().cloned().collect::<Vec<_>>().join(", "),
                    cfg.default_profile
                ),
            ));
        };
        if let Err(refusal) = cfg.policy.decide(caller, name) {
            tracing::warn!(caller = %refusal.caller, key = %caller.key(), profile = name, "refused: the caller has no grant for this profile");
            return Err(ErrorBody::new(ErrorCode::Forbidden, refusal.to_string()));
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
    ) -> Result<ProfileOptions, ErrorBody> {
        let (name, profile, _) = self.profile(name, caller)?;
        Ok(ProfileOptions {
            name,
            hash: profile.hash,
            page_hashes: profile.page_hashes,
            nested: profile.nested,
            formats: profile.allowed_formats(),
        })
    }

    /// Checks a signing request against the profiles and the grants and turns it into a
    /// job.
    pub fn accept(&self, query: &SignQuery, caller: &Caller) -> Result<Job, ErrorBody> {
        let (name, profile, cfg) = self.profile(query.profile.as_deref(), caller)?;
        let name = name.as_str();
        let profile = &profile;
        let filename = match &query.filename {
            Some(f) if f.contains(['/', '\\', '\0']) || f.len() > 255 => {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    "filename must be a bare file name of at most 255 bytes, without directories",
                ))
            }
            f => f.clone(),
        };
        tracing::info!(%caller, profile = name, file = filename.as_deref().unwrap_or("-"), "request accepted");
        Ok(Job {
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

    /// Sends job `id` to the agent at `path?query` with `body` as its body; answers the
    /// agent's streaming response, or the agent's error as the caller may see it.
    pub async fn relay_to<B>(
        &self,
        id: &str,
        path: &str,
        query: &str,
        content_type: &str,
        body: B,
        content_length: Option<u64>,
    ) -> Result<Response<Incoming>, ErrorBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut req = Request::post(format!("{path}?{query}"))
            .header(header::CONTENT_TYPE, content_type)
            .header("x-signet-job", id);
        if let Some(len) = content_length {
            req = req.header(header::CONTENT_LENGTH, len);
        }
        let req = req.body(body).map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("cannot build the agent request: {e}"),
            )
        })?;
        let cfg = self.config();
        let resp = client::send(&cfg.agent, req)
            .await
            .map_err(|e| self.agent_unreachable(&e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(client_view(id, client::error_body(&cfg.agent, resp).await))
        }
    }

    /// The appliance's status as the daemon sees it now.
    pub async fn status(&self) -> DaemonStatus {
        let cfg = self.config();
        let health = tokio::time::timeout(
            STATUS_AGENT_TIMEOUT,
            client::get_json::<AgentHealth>(&cfg.agent, AGENT_HEALTH_PATH),
        )
        .await
        .unwrap_or_else(|_| {
            Ok(Err(ErrorBody::new(
                ErrorCode::AgentUnavailable,
                format!(
                    "the signing agent did not answer within {} s; check that the signing VM is not hung (its console, `qm status VMID`) and see signet-agent's log",
                    STATUS_AGENT_TIMEOUT.as_secs()
                ),
            )))
        });
        let agent = match health {
            Ok(Ok(health)) => AgentReport::Reachable {
                endpoint: cfg.agent.to_string(),
                health: Box::new(health),
            },
            Ok(Err(error)) => AgentReport::Unreachable {
                endpoint: cfg.agent.to_string(),
                error,
            },
            Err(e) => AgentReport::Unreachable {
                endpoint: cfg.agent.to_string(),
                error: self.agent_unreachable(&e),
            },
        };
        // Any read of the health is a contact: the timeline dates an outage from the
        // first that failed.
        self.timeline.saw(match &agent {
            AgentReport::Unreachable { error, .. } if error.code == ErrorCode::AgentUnavailable => {
                crate::core::timeline::Seen::ContactFailed
            }
            _ => crate::core::timeline::Seen::ContactOk,
        });
        let signing_works = matches!(&agent, AgentReport::Reachable { health, .. } if health.state == AgentState::Ready)
            && self.engine.store_fault().is_none();
        DaemonStatus {
            version: signet_protocol::VERSION.to_owned(),
            signing_works,
            default_profile: Some(cfg.default_profile.clone()),
            profiles: cfg.profiles.keys().cloned().collect(),
            agent,
            queue: Some(self.queue_status()),
            recovery: self.timeline.recent(STATUS_TIMELINE_ENTRIES),
            tokens: Some(self.tokens()),
            faults: self.faults(),
        }
    }

    fn agent_unreachable(&self, e: &ClientError) -> ErrorBody {
        let cfg = self.config();
        let hint = match cfg.agent.vsock_cid() {
            Some(cid) => format!(
                "check that the signing VM (vsock CID {cid}) is running with signet-agent started, and that `agent` in {} names it",
                cfg.path.display()
            ),
            _ => format!(
                "check that signet-agent is running and that `agent` in {} names its endpoint",
                cfg.path.display()
            ),
        };
        tracing::warn!(agent = %cfg.agent, error = %e, "the signing agent is not reachable; {hint}");
        ErrorBody::new(
            ErrorCode::AgentUnavailable,
            "the signing VM's agent is not reachable (the signing VM is down or signet-agent is not running in it); nothing is signed until it is back. Why is in signetd's log on the Proxmox host (journalctl -u signetd)",
        )
        // A signing VM that reboots comes back: jobs wait for it until their deadline.
        .retryable(true)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What a caller is told about an agent-side error. Faults the caller can fix (its
/// input) pass through; the appliance's own faults are told without its internals
/// (paths, endpoints), which go to the log with the job id.
pub fn client_view(job: &str, e: ErrorBody) -> ErrorBody {
    let operator = format!("the appliance's operator finds the details in signetd's log on the Proxmox host (journalctl -u signetd, job {job})");
    let message = match e.code {
        ErrorCode::PinRejected => format!("the appliance's token refused its configured PIN, which will not be tried again; nothing was signed. {operator}"),
        ErrorCode::PinNeeded => format!("the appliance's signing agent has no token PIN yet; nothing was signed. {operator}"),
        ErrorCode::PinLocked => format!("the appliance's token PIN is locked or on its final try, so Signet does not log in; nothing was signed. {operator}"),
        ErrorCode::TokenUnavailable if e.retryable => format!("the appliance's token is not available (unplugged, not passed to the signing VM, or lost); nothing was signed and the job may be sent again once it is back. {operator}"),
        ErrorCode::TokenUnavailable => format!("the appliance's token is not available (unplugged, not passed to the signing VM, or lost); nothing was signed. {operator}"),
        ErrorCode::AgentUnavailable => format!("the signing VM's agent is not reachable; nothing was signed. {operator}"),
        ErrorCode::Internal => format!("the appliance failed internally; nothing was signed. {operator}"),
        _ => return e,
    };
    tracing::warn!(job, code = %e.code, detail = %e.message, "job failed on the agent");
    ErrorBody::new(e.code, message).retryable(e.retryable)
}

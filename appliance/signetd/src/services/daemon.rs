//! The daemon's core commands. Every front end (HTTP now; D-Bus and the CLI later)
//! calls these and renders their results.
//!
//! A job goes through the durable queue ([`crate::services::jobs`]): recorded, spooled, queued,
//! sent to the agent by the token's worker ([`Daemon::relay_to`]), its result spooled
//! and streamed to the caller.

use signet_protocol::transport::Peer;
use signet_protocol::wire::{
    AgentReport, AgentSignQuery, AgentState, DaemonStatus, ErrorBody, ErrorCode, ProfileOptions,
    SignQuery,
};

use crate::adapters::store::StoreError;
use crate::config::{Config, Profile};
use crate::core::policy::{self, Caller, Slot, Slots};
use std::sync::Arc;

use crate::config::Current;
use crate::services::agent::AgentLink;
use crate::services::jobs::{Job, JobService};
use crate::services::timeline::Timeline;
use crate::services::tokens::Handle;

/// How long the status waits for the agent's health: status must answer even when the
/// signing VM hangs.
const STATUS_AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many of the newest timeline entries the status carries.
const STATUS_TIMELINE_ENTRIES: usize = 10;

/// The running daemon: the services, composed. Fronts reach each use case through it.
#[derive(Debug)]
pub struct Daemon {
    /// The configuration in force, shared with the services.
    config: Arc<Current>,
    slots: Arc<Slots>,
    /// The client database, when remote clients are served (`[tls]`).
    clients: Option<std::sync::Mutex<rusqlite::Connection>>,
    jobs: Arc<JobService>,
    agent: AgentLink,
    timeline: Arc<Timeline>,
    /// The token service's door ([`crate::services::tokens`]), or why it is not running.
    tokens: Handle,
    /// Wrong client secrets per source address.
    throttle: std::sync::Mutex<crate::core::refusals::Throttle>,
    /// The audit head kept outside the database, and the chain's check
    /// ([`crate::adapters::head`]); `None` until [`Daemon::keep_head`].
    head: std::sync::Mutex<Option<crate::adapters::head::Keeper>>,
}

impl Daemon {
    /// Opens the job database and spool under `state_dir` and resumes what a previous
    /// run left queued.
    pub fn open(cfg: Config) -> Result<Self, StoreError> {
        let slots = Slots::new(cfg.limits.max_jobs_per_caller);
        let throttle = crate::core::refusals::Throttle::new(cfg.limits.auth_failures_per_minute);
        let config = Arc::new(Current::new(cfg));
        let jobs = JobService::open(config.clone())?;
        let timeline = jobs.timeline().clone();
        Ok(Daemon {
            throttle: std::sync::Mutex::new(throttle),
            agent: AgentLink::new(config.clone()),
            config,
            slots,
            clients: None,
            jobs: Arc::new(jobs),
            timeline,
            tokens: Handle::off("signetd was started without the token service"),
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
        if let Some(f) = self.jobs.store_fault() {
            out.push(f);
        }
        let keeper = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = keeper.as_ref().and_then(|k| k.broken.clone()) {
            out.push(why);
        }
        out
    }

    /// The job path ([`JobService`]).
    pub fn job_service(&self) -> &Arc<JobService> {
        &self.jobs
    }

    /// The recovery timeline.
    pub fn timeline(&self) -> &Arc<Timeline> {
        &self.timeline
    }

    /// The job database, for modules that keep their own tables in it (and for the
    /// audit log: [`crate::adapters::audit::record_refusal`]).
    pub fn store(&self) -> &Arc<crate::adapters::store::Store> {
        self.jobs.store()
    }

    /// The daemon with remote clients checked against `conn` (see [`crate::adapters::clients`]).
    pub fn with_clients(mut self, conn: rusqlite::Connection) -> Self {
        self.clients = Some(std::sync::Mutex::new(conn));
        self
    }

    /// The daemon with the token service behind `handle` ([`crate::services::tokens::start`]).
    pub fn with_tokens(mut self, handle: Handle) -> Self {
        self.jobs.set_tokens(handle.clone());
        self.tokens = handle;
        self
    }

    /// Every token the daemon knows and where it is.
    pub fn tokens(&self) -> signet_protocol::wire::TokensReport {
        self.tokens.report()
    }

    /// The token service's door, for the token commands ([`crate::services::tokens`]).
    pub fn token_service(&self) -> &Handle {
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
        self.config.get()
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
        let (merged, changes) = self.config.replace(|cfg| {
            let (merged, changes) = crate::config::reload::merge(cfg, new);
            if changes.applied.contains(&"tokens") {
                // The kept [passthrough] and [[known_tokens]] with the new assignments,
                // handed over under the lock so two reloads reach the service in order
                // (the hand-over takes only the watch channel's own lock).
                self.tokens
                    .reassign(crate::services::tokens::Setup::from_config(&merged));
            }
            (merged, changes)
        });
        let limits = &merged.limits;
        // Outside the configuration's lock: no other lock is taken under it but the
        // token service's hand-over above.
        self.slots.set_max(limits.max_jobs_per_caller);
        self.jobs
            .refusals()
            .set_interval(std::time::Duration::from_secs(
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

    /// The appliance's status as the daemon sees it now.
    pub async fn status(&self) -> DaemonStatus {
        let cfg = self.config();
        let agent = match self.agent.health(STATUS_AGENT_TIMEOUT).await {
            Ok(health) => AgentReport::Reachable {
                endpoint: cfg.agent.to_string(),
                health: Box::new(health),
            },
            Err(error) => AgentReport::Unreachable {
                endpoint: cfg.agent.to_string(),
                error,
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
            && self.jobs.store_fault().is_none();
        DaemonStatus {
            version: signet_protocol::VERSION.to_owned(),
            signing_works,
            default_profile: Some(cfg.default_profile.clone()),
            profiles: cfg.profiles.keys().cloned().collect(),
            agent,
            queue: Some(self.jobs.queue_status()),
            recovery: self.timeline.recent(STATUS_TIMELINE_ENTRIES),
            tokens: Some(self.tokens()),
            faults: self.faults(),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

//! The composition root: [`Daemon`] opens and holds the services (the job path, who is
//! calling, the agent link, the timeline, the token service, the audit head) and answers
//! the status. Fronts reach every use case through it; no service imports it.
//!
//! A job goes through the durable queue ([`crate::services::jobs`]): recorded, spooled,
//! queued, sent to the agent by the token's worker
//! ([`AgentLink::relay_to`](crate::services::agent::AgentLink::relay_to)), its result
//! spooled and streamed to the caller.

use signet_api::wire::{AgentReport, AgentState, DaemonStatus, ErrorBody, ErrorCode};

use crate::adapters::store::StoreError;
use crate::config::Config;
use std::sync::Arc;

use crate::config::Current;
use crate::services::agent::{AgentLink, AgentSeen};
use crate::services::callers::Callers;
use crate::services::jobs::JobService;
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
    callers: Arc<Callers>,
    jobs: Arc<JobService>,
    agent: AgentLink,
    timeline: Arc<Timeline>,
    /// The token service's door ([`crate::services::tokens`]), or why it is not running.
    tokens: Handle,
    /// The audit head kept outside the database, and the chain's check
    /// ([`crate::adapters::head`]); `None` until [`Daemon::keep_head`].
    head: std::sync::Mutex<Option<crate::adapters::head::Keeper>>,
}

impl Daemon {
    /// Opens the job database and spool under `state_dir` and resumes what a previous
    /// run left queued.
    pub fn open(cfg: Config) -> Result<Self, StoreError> {
        let config = Arc::new(Current::new(cfg));
        let callers = Arc::new(Callers::new(config.clone()));
        let agent = AgentLink::new(config.clone());
        let jobs = JobService::open(config.clone(), callers.clone(), agent.clone())?;
        let timeline = jobs.timeline().clone();
        Ok(Daemon {
            agent,
            config,
            callers,
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
    /// the daemon's life. Off the runtime's threads: a check reads the database and
    /// rewrites the head's file with two fsyncs (~3 ms), which the jobs' tasks on that
    /// thread would otherwise wait for.
    pub async fn run_head_keeper(self: std::sync::Arc<Self>) {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let this = std::sync::Arc::clone(&self);
            tokio::task::spawn_blocking(move || this.check_head())
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        }
    }

    /// One check of the chain from its last mark, and the head kept.
    pub fn check_head(&self) {
        let mut keeper = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = keeper.as_mut() {
            // A walk of many new records runs on a read-only connection: it never holds
            // up the job path's writes.
            let read = self
                .store()
                .reader()
                .read(|conn| Ok::<_, rusqlite::Error>(k.check(conn)));
            if let Err(e) = read {
                tracing::warn!(error = %e, "the audit chain could not be read for its check; trying again in a second");
            }
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
    pub fn with_clients(self, conn: rusqlite::Connection) -> Self {
        self.callers.use_clients(conn);
        self
    }

    /// The read model (jobs, audit log) the fronts call.
    pub fn reads(&self) -> crate::services::reads::Reads<'_> {
        crate::services::reads::Reads::new(&self.jobs)
    }

    /// The agent as the services reach it ([`AgentLink`]).
    pub fn agent(&self) -> &AgentLink {
        &self.agent
    }

    /// Who is calling ([`Callers`]).
    pub fn callers(&self) -> &Arc<Callers> {
        &self.callers
    }

    /// The daemon with the token service behind `handle` ([`crate::services::tokens::start`]).
    pub fn with_tokens(mut self, handle: Handle) -> Self {
        self.jobs.set_tokens(handle.clone());
        self.tokens = handle;
        self
    }

    /// Every token the daemon knows and where it is.
    pub fn tokens(&self) -> signet_api::wire::TokensReport {
        self.tokens.report()
    }

    /// The token service's door, for the token commands ([`crate::services::tokens`]).
    pub fn token_service(&self) -> &Handle {
        &self.tokens
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
        self.jobs.set_limits(limits);
        self.callers.set_per_minute(limits.auth_failures_per_minute);
        tracing::info!(config = %path.display(), changes = %changes.summary(), "configuration reloaded");
        Ok(changes)
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
        self.status_with(agent)
    }

    /// The status from what the daemon already knows of the agent ([`AgentLink::seen`]),
    /// without asking it: for readers that follow the appliance (the web's overview), not
    /// a contact.
    pub fn status_seen(&self) -> DaemonStatus {
        let endpoint = self.config().agent.to_string();
        let agent = match self.agent.seen() {
            AgentSeen::Answered(health) => AgentReport::Reachable { endpoint, health },
            AgentSeen::Unreachable(error) => AgentReport::Unreachable { endpoint, error },
            AgentSeen::NotYet => AgentReport::Unreachable {
                endpoint,
                error: ErrorBody::new(
                    ErrorCode::AgentUnavailable,
                    "signetd has not reached the signing agent yet; it keeps trying",
                )
                .retryable(true),
            },
        };
        self.status_with(agent)
    }

    fn status_with(&self, agent: AgentReport) -> DaemonStatus {
        let cfg = self.config();
        let signing_works = matches!(&agent, AgentReport::Reachable { health, .. } if health.state == AgentState::Ready)
            && self.jobs.store_fault().is_none();
        DaemonStatus {
            version: signet_api::VERSION.to_owned(),
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

//! The operator's commands: every caller's jobs, cancelling any job, the audit log
//! (tail, check, export) and the host checks. The fronts that carry them — D-Bus
//! ([`crate::fronts::dbus`], for root and the `signet-admin` group: [`crate::core::roles`]), HTTP
//! ([`crate::fronts::http::operator`], local root only) and `signetctl` — call these and render
//! their results ([`signet_protocol::operator`]).

use signet_protocol::operator::{AuditCheck, AuditRecord, DoctorReport, JobList, JobSummary};
use signet_protocol::wire::{AgentReport, ErrorBody, ErrorCode, JobState, JobView};

use crate::adapters::store::{self, JobRow};
use crate::core::policy::Caller;
use crate::services::daemon::Daemon;
use crate::services::doctor;

/// How many ended jobs the job list shows by default.
pub const RECENT_JOBS: u64 = 20;
/// How many audit records a tail shows by default.
pub const AUDIT_TAIL: u64 = 20;

fn internal(what: &str, e: &dyn std::fmt::Display) -> ErrorBody {
    tracing::error!(error = %e, "{what}");
    ErrorBody::new(
        ErrorCode::Internal,
        format!("signetd failed {what}; its log says why"),
    )
}

/// Whether `caller` may use the operator's commands over HTTP: root on the host's unix
/// socket. (On D-Bus: root and the `signet-admin` group, [`crate::core::roles`].)
pub fn check_operator(caller: &Caller) -> Result<(), ErrorBody> {
    match caller {
        Caller::Local { uid: 0, .. } => Ok(()),
        other => Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!("{other} may not use the operator's commands; over HTTP they are for root on the host's unix socket, and members of the signet-admin group use signetctl"),
        )),
    }
}

impl Daemon {
    fn summary(&self, row: &JobRow, view: &JobView, now_ms: u64) -> JobSummary {
        JobSummary {
            id: row.id.clone(),
            caller: row.caller.clone(),
            profile: row.profile.clone(),
            filename: row.filename.clone(),
            state: row.state,
            position: view.position,
            created: view.created.clone(),
            age_seconds: now_ms.saturating_sub(row.created_ms) / 1000,
            finished: view.finished.clone(),
            error: row.error.as_ref().map(|e| e.code),
        }
    }

    /// Every caller's jobs: the one at the agent, those waiting in the order they will
    /// run, and the `recent` that ended last.
    pub fn jobs(&self, recent: u64) -> Result<JobList, ErrorBody> {
        let store = self.store();
        let now = store::now_ms();
        let read = |e: store::StoreError| internal("reading the jobs", &e);
        let mut list = JobList::default();
        for state in [JobState::Receiving, JobState::Running] {
            for row in store.in_state(state).map_err(read)? {
                let view = self.job_service().view(&row);
                list.running.push(self.summary(&row, &view, now));
            }
        }
        let mut queued: Vec<JobSummary> = store
            .in_state(JobState::Queued)
            .map_err(read)?
            .iter()
            .map(|row| self.summary(row, &self.job_service().view(row), now))
            .collect();
        queued.sort_by_key(|j| {
            (
                j.position.unwrap_or(u64::MAX),
                j.id.parse::<u64>().unwrap_or(0),
            )
        });
        list.queued = queued;
        for row in store.ended(recent).map_err(read)? {
            let view = self.job_service().view(&row);
            list.recent.push(self.summary(&row, &view, now));
        }
        Ok(list)
    }

    /// Cancels any caller's job that waits for its turn (the operator's cancel).
    pub fn cancel_any(&self, id: &str) -> Result<JobView, ErrorBody> {
        match self.store().get(id) {
            Ok(Some(row)) => {
                let who = row.caller.clone();
                let view = self.job_service().cancel_row(row)?;
                tracing::info!(job = id, caller = %who, "cancelled by the operator");
                Ok(view)
            }
            Ok(None) => Err(ErrorBody::new(
                ErrorCode::UnknownJob,
                format!("there is no job {id:?}; `signetctl jobs` lists the jobs"),
            )),
            Err(e) => Err(internal("reading the job", &e)),
        }
    }

    /// The newest `n` audit records, oldest first.
    pub fn audit_tail(&self, n: u64) -> Result<Vec<AuditRecord>, ErrorBody> {
        crate::adapters::audit::tail(&self.store().conn(), n)
            .map_err(|e| internal("reading the audit log", &e))
    }

    /// The audit records since `since` (RFC 3339; all when `None`), oldest first.
    pub fn audit_since(&self, since: Option<&str>) -> Result<Vec<AuditRecord>, ErrorBody> {
        match crate::adapters::audit::since(&self.store().conn(), since) {
            Ok(r) => Ok(r),
            Err(e @ crate::adapters::audit::AuditError::BadTime(_)) => {
                Err(ErrorBody::new(ErrorCode::BadRequest, e.to_string()))
            }
            Err(e) => Err(internal("reading the audit log", &e)),
        }
    }

    /// Walks the audit chain.
    pub fn audit_verify(&self) -> Result<AuditCheck, ErrorBody> {
        let dir = &self.config().state_dir;
        let known = crate::adapters::head::read(dir)
            .ok()
            .flatten()
            .map(|h| h.known(dir));
        crate::adapters::audit::check_with(&self.store().conn(), known.as_ref())
            .map_err(|e| internal("reading the audit log", &e))
    }

    /// The host checks (`signetctl doctor`).
    pub async fn doctor(&self) -> DoctorReport {
        let cfg = self.config();
        let status = self.status().await;
        let agent_cid = cfg.agent.vsock_cid();
        let signing_vm = cfg
            .doctor
            .signing_vm
            .or_else(|| agent_cid.map(|c| crate::core::policy::vmid_for_cid(&cfg.cid_to_vmid, c)));
        let doctor_cfg = cfg.doctor.clone();
        let gathered = tokio::task::spawn_blocking(move || {
            let qm = crate::adapters::proxmox::Qm {
                program: doctor_cfg.qm.clone(),
            };
            doctor::gather(&doctor_cfg, &qm, signing_vm)
        })
        .await;
        let mut facts = gathered.unwrap_or_default();
        facts.agent_cid = agent_cid;
        facts.serial = match &status.agent {
            AgentReport::Reachable { health, .. } => {
                health.token.as_ref().map(|t| t.serial.clone())
            }
            AgentReport::Unreachable { .. } => None,
        }
        .or_else(|| cfg.profiles.values().find_map(|p| p.token.clone()))
        .or_else(|| {
            // The token that signed last, while the agent does not answer.
            self.store()
                .conn()
                .query_row(
                    "SELECT token_serial FROM audit WHERE token_serial IS NOT NULL ORDER BY id DESC LIMIT 1",
                    [],
                    |r| r.get::<_, String>(0),
                )
                .ok()
        });
        let (used, quota) = self.store().spool_usage();
        facts.spool = (used, quota, doctor::free_bytes(&cfg.state_dir));
        facts.now = crate::core::time::unix_now();
        facts.newest_audit = self
            .store()
            .conn()
            .query_row("SELECT time FROM audit ORDER BY id DESC LIMIT 1", [], |r| {
                r.get::<_, String>(0)
            })
            .ok()
            .and_then(|t| doctor::parse_time(&t));
        facts.status = Some(status);
        DoctorReport::new(doctor::judge(&facts))
    }

    /// The ids of jobs as they end (signed, failed, cancelled).
    pub fn job_finished(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.job_service().engine().finished()
    }

    /// The jobs that ended when signetd started (their uploads were cut short by its
    /// stop), before anyone could hear of them.
    pub fn jobs_ended_at_start(&self) -> Vec<String> {
        self.job_service().engine().ended_at_start().to_vec()
    }

    /// Job `id` as the operator sees it, for the job-finished signal.
    pub fn job_summary(&self, id: &str) -> Option<JobSummary> {
        let row = self.store().get(id).ok().flatten()?;
        let view = self.job_service().view(&row);
        Some(self.summary(&row, &view, store::now_ms()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_root_is_an_operator_over_http() {
        let root = Caller::Local {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        assert!(check_operator(&root).is_ok());
        for other in [
            Caller::Local {
                uid: 1000,
                gid: 0,
                groups: vec![0],
            },
            Caller::Vm { cid: 0, vmid: 0 },
            Caller::Client {
                name: "root".into(),
                granted: vec![],
            },
        ] {
            let e = check_operator(&other).unwrap_err();
            assert_eq!(e.code, ErrorCode::Forbidden);
            assert!(e.message.contains("signetctl"), "{}", e.message);
        }
    }
}

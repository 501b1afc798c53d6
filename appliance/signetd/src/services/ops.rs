//! The operator's commands: cancelling any job and the host checks; every caller's
//! jobs and the audit log (tail, check, export) are read through the read model
//! ([`crate::services::reads`]). The fronts that carry them — D-Bus
//! ([`crate::fronts::dbus`], for root and the `signet-admin` group: [`crate::core::roles`]), HTTP
//! ([`crate::fronts::http::operator`], local root only) and `signetctl` — call these and render
//! their results ([`signet_api::operator`]).

use signet_api::operator::DoctorReport;
use signet_api::wire::{AgentReport, JobView};

use crate::core::policy::Caller;
use crate::services::daemon::Daemon;
use crate::services::doctor;
use crate::services::errors::OperatorError;

/// How many ended jobs the job list shows by default.
pub const RECENT_JOBS: u64 = 20;
/// How many audit records a tail shows by default.
pub const AUDIT_TAIL: u64 = 20;

/// Whether `caller` may use the operator's commands over HTTP: root on the host's unix
/// socket. (On D-Bus: root and the `signet-admin` group, [`crate::core::roles`].)
pub fn check_operator(caller: &Caller) -> Result<(), OperatorError> {
    match caller {
        Caller::Local { uid: 0, .. } => Ok(()),
        other => Err(OperatorError::NotOperator {
            caller: other.to_string(),
        }),
    }
}

impl Daemon {
    /// Cancels any caller's job that waits for its turn (the operator's cancel).
    pub fn cancel_any(&self, id: &str) -> Result<JobView, OperatorError> {
        match self.store().get(id) {
            Ok(Some(row)) => {
                let who = row.caller.clone();
                let view = self.job_service().cancel_row(row)?;
                tracing::info!(job = id, caller = %who, "cancelled by the operator");
                Ok(view)
            }
            Ok(None) => Err(OperatorError::UnknownJob { id: id.to_owned() }),
            Err(e) => Err(OperatorError::internal("reading the job", &e)),
        }
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
        let (last_serial, newest) = self.reads().last_signature().await;
        facts.agent_cid = agent_cid;
        facts.serial = match &status.agent {
            AgentReport::Reachable { health, .. } => {
                health.token.as_ref().map(|t| t.serial.clone())
            }
            AgentReport::Unreachable { .. } => None,
        }
        .or_else(|| cfg.profiles.values().find_map(|p| p.token.clone()))
        // The token that signed last, while the agent does not answer.
        .or(last_serial);
        let (used, quota) = self.store().spool_usage();
        facts.spool = (used, quota, doctor::free_bytes(&cfg.state_dir));
        facts.now = crate::adapters::store::unix_now();
        facts.newest_audit = newest.and_then(|t| doctor::parse_time(&t));
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
            let e = signet_api::wire::ErrorBody::from(check_operator(&other).unwrap_err());
            assert_eq!(e.code, signet_api::wire::ErrorCode::Forbidden);
            assert!(e.message.contains("signetctl"), "{}", e.message);
        }
    }
}

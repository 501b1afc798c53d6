//! The operator's actions, audited: attach, detach and re-attach a token, cancel a
//! job, enroll a VM. Every front (the web UI, D-Bus and so `signetctl`, the operator's
//! HTTP routes) calls these, never the bare commands, so each action leaves one record
//! in the audit chain naming who did it ([`Operator`]) and, when it was refused or
//! failed, the error code ([`crate::adapters::audit::record_action`]).
//!
//! Enrolling is one use case, [`enroll_change`], for the running daemon
//! ([`Daemon::enroll`]: the web UI, D-Bus) and for `signetd enroll` on the host: the
//! VM's change is planned through the [`Proxmox`](crate::adapters::proxmox::Proxmox) port (the
//! `qm` of `[doctor] qm`), shown first (`apply: false`, a dry run that changes nothing
//! and is not audited), then applied; `signetd.toml` gets the build VM's grant or the
//! signing VM's `[[tokens]]` entry ([`crate::config::edit`]). Both write the same audit
//! record ([`enroll_action`], [`record`]); `signetd enroll`'s names the uid that ran it,
//! through `cli` ([`Operator::cli`]).

use std::path::Path;

use signet_api::wire::{ErrorBody, HostToken, JobView};

use crate::adapters::audit::Action;
use crate::adapters::proxmox::{self, EnrollFailure, Qm};
use crate::config::edit;
use crate::config::Config;
use crate::core::policy::Caller;
use crate::services::daemon::Daemon;
use crate::services::errors::OperatorError;

/// Who acts, and through which front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// `pve:USER@REALM` (web UI), `uid:N` (D-Bus, HTTP, `signetd enroll`).
    pub who: String,
    /// `web`, `dbus`, `unix`, `cli`.
    pub via: &'static str,
}

impl Operator {
    /// A PVE user, through the web UI.
    pub fn pve(user: &str) -> Self {
        Operator {
            who: format!("pve:{user}"),
            via: "web",
        }
    }

    /// A D-Bus caller, by the uid the bus reports (`None`: the bus did not say).
    pub fn dbus(uid: Option<u32>) -> Self {
        Operator {
            who: uid.map_or_else(|| "dbus:unknown".to_owned(), |u| format!("uid:{u}")),
            via: "dbus",
        }
    }

    /// A user of `signetd enroll` on the host, by its uid.
    pub fn cli(uid: u32) -> Self {
        Operator {
            who: format!("uid:{uid}"),
            via: "cli",
        }
    }

    /// A caller of the operator's HTTP routes (local root).
    pub fn local(caller: &Caller) -> Self {
        Operator {
            who: caller.key(),
            via: "unix",
        }
    }
}

/// What to enroll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollRequest {
    /// The VM that holds the token `serial` (plugged into this host now).
    SigningVm { vmid: u32, serial: String },
    /// A VM that asks for signatures with `profiles` (empty: the default profile).
    BuildVm { vmid: u32, profiles: Vec<String> },
}

impl EnrollRequest {
    pub fn vmid(&self) -> u32 {
        match self {
            EnrollRequest::SigningVm { vmid, .. } | EnrollRequest::BuildVm { vmid, .. } => *vmid,
        }
    }

    /// `signing VM` or `build VM`.
    pub fn role(&self) -> &'static str {
        match self {
            EnrollRequest::SigningVm { .. } => "signing VM",
            EnrollRequest::BuildVm { .. } => "build VM",
        }
    }
}

pub use signet_api::operator::{EnrollReport, KeyChange};

/// Writes, on `conn`, the audit record of `op`'s action that answered `result`.
pub fn record<T>(
    conn: &rusqlite::Connection,
    op: &Operator,
    mut action: Action,
    result: &Result<T, OperatorError>,
) -> Result<(), crate::adapters::audit::AuditError> {
    action.operator = op.who.clone();
    action.transport = op.via.to_owned();
    action.error = result
        .as_ref()
        .err()
        .map(|e| ErrorBody::from(e).code.as_str().to_owned());
    let rec = crate::adapters::audit::record_action(conn, &action)?;
    tracing::info!(
        action = action.action,
        operator = %op.who,
        seq = rec.seq,
        error = action.error,
        "operator's action audited"
    );
    Ok(())
}

/// The audit record of an enrolment (applied or refused; a dry run has none).
pub fn enroll_action(req: &EnrollRequest) -> Action {
    Action {
        action: "enroll",
        token_serial: match req {
            EnrollRequest::SigningVm { serial, .. } => Some(serial.clone()),
            EnrollRequest::BuildVm { .. } => None,
        },
        target: Some(format!("VM {} as {}", req.vmid(), req.role())),
        ..Action::default()
    }
}

/// The audit record of a `signetd pair` attempt by `op` with the agent at `agent`:
/// the key it pinned, or `None` when the pairing failed. Pinning a key decides who
/// may make signatures, so every attempt is recorded.
pub fn pair_action(
    op: &Operator,
    agent: &signet_protocol::Endpoint,
    pinned: Option<&signet_protocol::link::Fingerprint>,
) -> Action {
    Action {
        action: "pair",
        operator: op.who.clone(),
        transport: op.via.to_owned(),
        target: Some(match pinned {
            Some(key) => format!("agent {agent} key {key}"),
            None => format!("agent {agent}"),
        }),
        error: pinned.is_none().then(|| "pairing_failed".to_owned()),
        ..Action::default()
    }
}

fn check_vmid(vmid: u32) -> Result<(), OperatorError> {
    if vmid == 0 {
        return Err(OperatorError::NoVmid);
    }
    Ok(())
}

/// Where an enrolment is worked out: by the daemon, or by `signetd enroll` on the host.
#[derive(Debug, Clone, Copy)]
pub struct EnrollSite<'a> {
    /// `signetd.toml` as it is now; `None` when there is none yet (nothing is added to
    /// it).
    pub cfg: Option<&'a Config>,
    /// Where `signetd.toml` is.
    pub path: &'a Path,
    pub qm: &'a Qm,
    /// Where Signet's monitor sockets are (`[passthrough] monitor_dir`).
    pub monitor_dir: &'a Path,
    /// Whether a build VM's grant goes into `signetd.toml` (`--no-grant`: not).
    pub grant: bool,
}

/// The change an enrolment made (or, in a dry run, would make).
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// The change to the VM's configuration.
    pub plan: proxmox::Plan,
    /// What goes into `signetd.toml`, when anything does.
    pub stanza: Option<String>,
    /// The profiles a build VM asked for (the default profile when it named none).
    pub wanted: Vec<String>,
}

/// The enroll use case, up to its change: plans the VM's change (through `qm`) and
/// what goes into `signetd.toml`, refusing either before anything changes, and with
/// `apply` makes both. `host_port` is the USB port of a signing VM's token (the
/// daemon's token service, or udev, found it). It blocks (it runs `qm`).
pub fn enroll_change(
    site: &EnrollSite<'_>,
    req: &EnrollRequest,
    host_port: Option<&str>,
    apply: bool,
) -> Result<Enrolment, OperatorError> {
    let vmid = req.vmid();
    check_vmid(vmid)?;
    let (stanza, wanted) = match req {
        EnrollRequest::SigningVm { serial, .. } => {
            let stanza = match site.cfg {
                Some(c) => edit::assignment(c, serial, vmid)?,
                None => None,
            };
            (stanza, Vec::new())
        }
        EnrollRequest::BuildVm { profiles, .. } => {
            let wanted = match (profiles.is_empty(), site.cfg) {
                (false, _) => profiles.clone(),
                (true, Some(c)) => vec![c.default_profile.clone()],
                (true, None) => vec![crate::config::IMPLICIT_PROFILE.to_owned()],
            };
            let stanza = match site.cfg.filter(|_| site.grant) {
                Some(c) => {
                    let missing = edit::missing(c, vmid, &wanted)?;
                    (!missing.is_empty()).then(|| edit::stanza(vmid, &missing))
                }
                None => None,
            };
            (stanza, wanted)
        }
    };
    let monitor = proxmox::monitor_path(site.monitor_dir, vmid)
        .to_string_lossy()
        .into_owned();
    let plan = proxmox::enroll(
        site.qm,
        vmid,
        |c| match (req, host_port) {
            (EnrollRequest::SigningVm { .. }, Some(port)) => {
                proxmox::plan_signing_vm(vmid, c, port, &monitor)
            }
            _ => proxmox::plan_build_vm(vmid, c),
        },
        !apply,
    )
    .map_err(|e| match e {
        EnrollFailure::Refused(e) => OperatorError::EnrollRefused { why: e.to_string() },
        EnrollFailure::Pve(e) => OperatorError::Pve { why: e.to_string() },
    })?;
    if apply {
        if let Some(s) = &stanza {
            edit::append(site.path, s)?;
        }
    }
    Ok(Enrolment {
        plan,
        stanza,
        wanted,
    })
}

impl Daemon {
    /// Writes the audit record of an operator's action that answered `result`.
    fn record_action<T>(&self, op: &Operator, action: Action, result: &Result<T, OperatorError>) {
        let what = action.action;
        if let Err(e) = record(&self.store().conn(), op, action, result) {
            tracing::error!(
                action = what,
                operator = %op.who,
                error = %e,
                "an operator's action could not be audited"
            );
        }
    }

    fn token_action(name: &'static str, serial: &str) -> Action {
        Action {
            action: name,
            token_serial: Some(serial.to_owned()),
            ..Action::default()
        }
    }

    /// [`Handle::attach`](crate::services::tokens::Handle::attach), audited.
    pub async fn attach_by(
        &self,
        op: &Operator,
        serial: &str,
        vm: Option<u32>,
    ) -> Result<HostToken, OperatorError> {
        let r = self
            .token_service()
            .attach(serial, vm)
            .await
            .map_err(Into::into);
        let mut a = Self::token_action("attach", serial);
        a.target = vm.map(|v| format!("VM {v}"));
        self.record_action(op, a, &r);
        r
    }

    /// [`Handle::detach`](crate::services::tokens::Handle::detach), audited.
    pub async fn detach_by(&self, op: &Operator, serial: &str) -> Result<HostToken, OperatorError> {
        let r = self
            .token_service()
            .detach(serial)
            .await
            .map_err(Into::into);
        self.record_action(op, Self::token_action("detach", serial), &r);
        r
    }

    /// [`Handle::reattach`](crate::services::tokens::Handle::reattach), audited.
    pub async fn reattach_by(
        &self,
        op: &Operator,
        serial: &str,
    ) -> Result<HostToken, OperatorError> {
        let r = self
            .token_service()
            .reattach(serial)
            .await
            .map_err(Into::into);
        self.record_action(op, Self::token_action("reattach", serial), &r);
        r
    }

    /// [`Daemon::cancel_any`], audited (beside the job's own `cancelled` record, which
    /// names its caller).
    pub fn cancel_by(&self, op: &Operator, id: &str) -> Result<JobView, OperatorError> {
        let r = self.cancel_any(id);
        let a = Action {
            action: "cancel",
            job: Some(id.to_owned()),
            ..Action::default()
        };
        self.record_action(op, a, &r);
        r
    }

    /// Enrolls a VM: plans the change to its configuration (through `[doctor] qm`) and
    /// to `signetd.toml`, and with `apply` makes both (audited); without, changes
    /// nothing (the dry run shown for confirmation).
    pub async fn enroll(
        &self,
        op: &Operator,
        req: &EnrollRequest,
        apply: bool,
    ) -> Result<EnrollReport, OperatorError> {
        let r = self.enroll_inner(req, apply).await;
        if apply {
            self.record_action(op, enroll_action(req), &r);
        }
        r
    }

    async fn enroll_inner(
        &self,
        req: &EnrollRequest,
        apply: bool,
    ) -> Result<EnrollReport, OperatorError> {
        let vmid = req.vmid();
        check_vmid(vmid)?;
        let path = self.config().path.clone();
        // As the file is now: an earlier enrolment may have added to it.
        let cfg = crate::config::Config::load(&path)
            .map_err(|e| OperatorError::BadConfig { why: e.to_string() })?;
        let qm = Qm {
            program: cfg.doctor.qm.clone(),
        };
        let host_port = match req {
            EnrollRequest::SigningVm { serial, .. } => {
                let report = self.tokens();
                let port = report
                    .tokens
                    .iter()
                    .find(|t| &t.serial == serial)
                    .and_then(|t| t.host_port.clone())
                    .ok_or_else(|| OperatorError::NotPlugged {
                        serial: serial.clone(),
                        detail: report.detail.clone(),
                    })?;
                Some(port)
            }
            EnrollRequest::BuildVm { .. } => None,
        };
        let (req2, qm2, path2) = (req.clone(), qm.clone(), path.clone());
        let done = tokio::task::spawn_blocking(move || {
            let site = EnrollSite {
                cfg: Some(&cfg),
                path: &path2,
                qm: &qm2,
                monitor_dir: &cfg.passthrough.monitor_dir,
                grant: true,
            };
            enroll_change(&site, &req2, host_port.as_deref(), apply)
        })
        .await
        .map_err(|e| OperatorError::internal("running qm", &e))??;
        let (plan, stanza) = (done.plan, done.stanza);
        let mut notes = Vec::new();
        if apply {
            if stanza.is_some() {
                // Put in force at once, as `systemctl reload signetd` would.
                notes.push(match self.reload() {
                    Ok(changes) if changes.applied.contains(&"tokens") => {
                        let serial = match req {
                            EnrollRequest::SigningVm { serial, .. } => serial.as_str(),
                            EnrollRequest::BuildVm { .. } => "",
                        };
                        format!(
                            "{} changed and applied at once: signetd keeps token {serial} in VM {vmid} from now on, and its recovery ladder covers it (running and queued jobs are kept)",
                            path.display()
                        )
                    }
                    Ok(_) => format!("{} changed and applied at once", path.display()),
                    Err(e) => format!(
                        "{} changed but not applied: {e}; fix the file, then systemctl reload signetd",
                        path.display()
                    ),
                });
            }
            if plan.changes.iter().any(|c| c.key == "args") {
                notes.push(format!(
                    "args: takes effect when VM {vmid} next starts (qm stop {vmid} && qm start {vmid})"
                ));
            }
        }
        Ok(EnrollReport {
            vmid,
            role: req.role().to_owned(),
            qm_command: (!plan.changes.is_empty()).then(|| qm.shell_line(&Qm::set_args(&plan))),
            changes: plan
                .changes
                .into_iter()
                .map(|c| KeyChange {
                    key: c.key,
                    old: c.old,
                    new: c.new,
                })
                .collect(),
            config_stanza: stanza,
            config_path: path.display().to_string(),
            applied: apply,
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pairing_is_recorded_with_the_key_it_pinned_or_as_failed() {
        let op = super::Operator::cli(0);
        let agent = signet_protocol::Endpoint::Unix("/run/a.sock".into());
        let key = signet_protocol::link::Fingerprint([7; 32]);
        let done = super::pair_action(&op, &agent, Some(&key));
        assert_eq!(
            (done.action, done.operator.as_str(), done.transport.as_str()),
            ("pair", "uid:0", "cli")
        );
        assert_eq!(done.target, Some(format!("agent {agent} key {key}")));
        assert_eq!(done.error, None);
        let failed = super::pair_action(&op, &agent, None);
        assert_eq!(failed.target, Some(format!("agent {agent}")));
        assert_eq!(failed.error.as_deref(), Some("pairing_failed"));
    }

    use super::*;

    #[test]
    fn operators_are_named_by_their_front() {
        assert_eq!(Operator::pve("root@pam").who, "pve:root@pam");
        assert_eq!(Operator::dbus(Some(0)).who, "uid:0");
        assert_eq!(Operator::dbus(None).who, "dbus:unknown");
        let root = Caller::Local {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        assert_eq!(
            (
                Operator::local(&root).who.as_str(),
                Operator::local(&root).via
            ),
            ("uid:0", "unix")
        );
    }
}

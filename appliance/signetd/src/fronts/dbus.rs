//! The D-Bus front: the daemon's core commands on the system bus, for `signetctl` and
//! other host tools. Like the HTTP front it holds no logic: each method calls a
//! [`Daemon`] command and returns its result type as JSON, the same JSON the HTTP API
//! gives, so every front renders the same types.
//!
//! The operator's actions (`Cancel`, `Attach`, `Detach`, `Reattach`, `Enroll`) go through
//! [`crate::services::operate`] and are audited with the caller's uid as the bus reports it.
//!
//! The `JobFinished` signal follows every job that ends, `RecoveryStep` every entry of
//! the recovery timeline.
//!
//! Well-known name [`BUS_NAME`], object [`OBJECT_PATH`], interface [`INTERFACE`] (the
//! version is in the names), declared once in `signet-dbus`: this module implements its
//! [`Service`] and serves it through its [`Server`], the same declaration `signetctl`'s
//! proxy comes from. Who may call what is decided twice: by the bus's policy
//! (`packaging/dbus/org.signet.Signet1.conf`: the `signet` group reaches the signer's
//! methods, `signet-admin` and root every method) and here, per method, from the
//! caller's uid and groups ([`crate::core::roles`]): `Status`, `Tokens`, `Jobs` (its own)
//! and `Cancel` (its own jobs) for signers; `Jobs` (everyone's), `Cancel` (anyone's),
//! `Attach`, `Detach`, `Reattach`, `AuditTail`, `AuditExport`, `AuditVerify` and
//! `Doctor` for operators; `Enroll` for root alone. A refusal answers
//! `org.signet.Signet1.Error.Forbidden` and is audited like any refusal.
//!
//! A refused command answers a named error, `org.signet.Signet1.Error.<Code>` (the
//! `ErrorCode` in CamelCase, e.g. `...Error.UnknownToken`), whose message is the one the
//! HTTP API gives (`signet_dbus::Error`). `TokenChanged` carries a token's new state (the
//! JSON of one entry of `GET /v1/tokens`) whenever it changes.

use std::sync::Arc;

use signet_api::wire::{ErrorBody, ErrorCode};
use signet_dbus::{Call, Enroll, Server, Service};
use zbus::object_server::SignalEmitter;

pub use signet_dbus::{
    error_code, error_name, Error, BUS_NAME, ERROR_PREFIX, INTERFACE, OBJECT_PATH,
};

use crate::adapters::bus::builder;
use crate::config::Bus;
use crate::core::policy::Caller;
use crate::core::roles::{LocalUser, Role};
use crate::services::daemon::Daemon;
use crate::services::operate::Operator;

/// The daemon's side of the interface, served at [`OBJECT_PATH`] as `Server(Manager)`.
#[derive(Debug)]
pub struct Manager {
    daemon: Arc<Daemon>,
}

impl Service for Manager {
    /// The appliance's status as JSON: the `DaemonStatus` of `GET /v1/status`.
    async fn status(&self, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Signer, "read the status")
            .await?;
        Ok(serde_json::to_string(&self.daemon.status().await).unwrap_or_default())
    }

    /// The jobs as JSON: the `JobList` of `GET /v1/operator/jobs`, every caller's for
    /// an operator, a signer's own for a signer; `recent` ended jobs (0: the default).
    async fn jobs(&self, recent: u32, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        let (user, role) = self.allow(conn, header, Role::Signer, "list jobs").await?;
        let n = if recent == 0 {
            crate::services::ops::RECENT_JOBS
        } else {
            u64::from(recent)
        };
        let mut list = self.daemon.reads().jobs(n).await.map_err(ErrorBody::from)?;
        if role < Role::Operator {
            let own = format!("uid:{}", user.uid);
            for v in [&mut list.running, &mut list.queued, &mut list.recent] {
                v.retain(|j| j.caller == own);
            }
        }
        json(Ok::<_, ErrorBody>(list))
    }

    /// Cancels a queued job (an operator: anyone's; a signer: its own); answers its
    /// `JobView` as JSON. Audited with the caller's uid.
    async fn cancel(&self, id: &str, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        let (user, role) = self
            .allow(conn, header, Role::Signer, "cancel jobs")
            .await?;
        if role >= Role::Operator {
            let op = operator(conn, header).await;
            return json(self.daemon.cancel_by(&op, id));
        }
        // A signer's own job, as it would cancel it over the unix socket: another
        // caller's job is unknown to it.
        let caller = Caller::Local {
            uid: user.uid,
            gid: user.groups.first().copied().unwrap_or(u32::MAX),
            groups: user.groups.clone(),
        };
        json(
            self.daemon
                .job_service()
                .cancel(id, &caller)
                .map_err(ErrorBody::from),
        )
    }

    /// The newest `n` audit records (0: the default), a JSON array of `AuditRecord`.
    async fn audit_tail(&self, n: u32, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Operator, "read the audit log")
            .await?;
        let n = if n == 0 {
            crate::services::ops::AUDIT_TAIL
        } else {
            u64::from(n)
        };
        json(self.daemon.reads().audit_tail(n).await)
    }

    /// The audit records since an RFC 3339 time ("": all), a JSON array.
    async fn audit_export(&self, since: &str, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Operator, "export the audit log")
            .await?;
        json(
            self.daemon
                .reads()
                .audit_since((!since.is_empty()).then_some(since))
                .await,
        )
    }

    /// The audit chain's check, an `AuditCheck` as JSON.
    async fn audit_verify(&self, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Operator, "check the audit log")
            .await?;
        json(self.daemon.reads().audit_verify().await)
    }

    /// The host checks, a `DoctorReport` as JSON (it shows the host's devices, paths
    /// and processes: an operator's).
    async fn doctor(&self, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Operator, "run the host checks")
            .await?;
        Ok(serde_json::to_string(&self.daemon.doctor().await).unwrap_or_default())
    }

    /// Every token and where it is: the `TokensReport` of `GET /v1/tokens`.
    async fn tokens(&self, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Signer, "list the tokens")
            .await?;
        Ok(serde_json::to_string(&self.daemon.tokens()).unwrap_or_default())
    }

    /// Puts a token into its signing VM; `vmid` 0 means its assigned VM, another VM
    /// than the assigned one is refused. Answers the token (JSON).
    async fn attach(&self, serial: &str, vmid: u32, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Operator, "attach a token")
            .await?;
        let vm = (vmid != 0).then_some(vmid);
        let op = operator(conn, header).await;
        json(self.daemon.attach_by(&op, serial, vm).await)
    }

    /// Takes a token out of its VM and keeps it on the host until attached again.
    async fn detach(&self, serial: &str, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Operator, "detach a token")
            .await?;
        let op = operator(conn, header).await;
        json(self.daemon.detach_by(&op, serial).await)
    }

    /// Detaches a token from its VM and attaches it anew.
    async fn reattach(&self, serial: &str, call: Call<'_>) -> Result<String, Error> {
        let (conn, header) = (call.connection, call.header);
        self.allow(conn, header, Role::Operator, "re-attach a token")
            .await?;
        let op = operator(conn, header).await;
        json(self.daemon.reattach_by(&op, serial).await)
    }

    /// Enrolls a VM: `role` `build-vm` (with `profiles`; none: the default profile)
    /// or `signing-vm` (with the token `serial`, plugged into this host); without
    /// `apply` a dry run that changes nothing. Answers the change (`EnrollReport`,
    /// JSON); an applied enrolment is audited with the caller's uid.
    async fn enroll(&self, request: Enroll, call: Call<'_>) -> Result<String, Error> {
        let Enroll {
            role,
            vmid,
            serial,
            profiles,
            apply,
        } = request;
        let (conn, header) = (call.connection, call.header);
        let Some(user) = local_user(conn, header).await else {
            return Err(ErrorBody::new(
                ErrorCode::Forbidden,
                "the bus did not say who is calling, so signetd may not enroll a VM for it",
            )
            .into());
        };
        if let Err(e) = crate::core::roles::may_enroll(&user) {
            let e = ErrorBody::from(e);
            self.daemon
                .job_service()
                .refuse(&format!("uid:{}", user.uid), "dbus", None, None, &e);
            return Err(e.into());
        }
        let req = match role.as_str() {
            "build-vm" => crate::services::operate::EnrollRequest::BuildVm { vmid, profiles },
            "signing-vm" => crate::services::operate::EnrollRequest::SigningVm { vmid, serial },
            other => {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!("{other:?} is not a role: give \"build-vm\" or \"signing-vm\""),
                )
                .into())
            }
        };
        let op = operator(conn, header).await;
        json(self.daemon.enroll(&op, &req, apply).await)
    }
}

impl Manager {
    /// The caller and its role, when it has at least `needed`; otherwise the refusal
    /// (audited as a refusal of `uid:N` over `dbus`, coalesced like every refusal).
    async fn allow(
        &self,
        conn: &zbus::Connection,
        header: &zbus::message::Header<'_>,
        needed: Role,
        what: &str,
    ) -> Result<(LocalUser, Role), Error> {
        let cfg = self.daemon.config();
        let groups = cfg.role_groups();
        let Some(user) = local_user(conn, header).await else {
            let e = ErrorBody::new(
                ErrorCode::Forbidden,
                format!("the bus did not say who is calling, so signetd may not {what} for it"),
            );
            return Err(e.into());
        };
        let role = user.role(groups);
        match crate::core::roles::require(
            &user,
            groups,
            needed,
            what,
            (&cfg.admin_group, &cfg.socket_group),
        ) {
            Ok(()) => Ok((user, role)),
            Err(e) => {
                let e = ErrorBody::from(e);
                self.daemon.job_service().refuse(
                    &format!("uid:{}", user.uid),
                    "dbus",
                    None,
                    None,
                    &e,
                );
                Err(e.into())
            }
        }
    }
}

/// The caller as a local user: the uid the bus daemon reports for the message's sender,
/// and its groups, both those the bus saw on its connection (the kernel's record of
/// the process) and those the user database gives the uid.
async fn local_user(
    conn: &zbus::Connection,
    header: &zbus::message::Header<'_>,
) -> Option<LocalUser> {
    let sender = header.sender()?;
    let bus = zbus::fdo::DBusProxy::new(conn).await.ok()?;
    let (uid, mut groups) = match bus.get_connection_credentials(sender.clone().into()).await {
        Ok(c) => (
            c.unix_user_id()?,
            c.unix_group_ids().cloned().unwrap_or_default(),
        ),
        Err(_) => (
            bus.get_connection_unix_user(sender.clone().into())
                .await
                .ok()?,
            Vec::new(),
        ),
    };
    groups.extend(crate::core::roles::groups_of(uid));
    groups.sort_unstable();
    groups.dedup();
    Some(LocalUser { uid, groups })
}

/// Who called: the uid the bus daemon reports for the message's sender, for the
/// audit record of an operator's action.
async fn operator(conn: &zbus::Connection, header: &zbus::message::Header<'_>) -> Operator {
    let uid = match header.sender() {
        Some(sender) => match zbus::fdo::DBusProxy::new(conn).await {
            Ok(bus) => bus
                .get_connection_unix_user(sender.clone().into())
                .await
                .ok(),
            Err(_) => None,
        },
        None => None,
    };
    Operator::dbus(uid)
}

/// The answer: `r`'s value as JSON, or its error told as the wire's [`ErrorBody`].
fn json<T: serde::Serialize, E: Into<ErrorBody>>(r: Result<T, E>) -> Result<String, Error> {
    let v = r.map_err(Into::into)?;
    Ok(serde_json::to_string(&v).unwrap_or_default())
}

/// Emits `JobFinished` for every job that ends, for as long as `conn` is open: first
/// for those the crash recovery at start ended, then as they end.
async fn forward_job_finished(conn: zbus::Connection, daemon: Arc<Daemon>) {
    let mut ended = daemon.job_finished();
    let Ok(emitter) = zbus::object_server::SignalEmitter::new(&conn, OBJECT_PATH) else {
        return;
    };
    let mut at_start = daemon.jobs_ended_at_start().into_iter();
    loop {
        if let Some(id) = at_start.next() {
            announce_job(&emitter, &daemon, &id).await;
            continue;
        }
        let id = match ended.recv().await {
            Ok(id) => id,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "JobFinished signals were dropped: the bus was slower than the jobs"
                );
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        announce_job(&emitter, &daemon, &id).await;
    }
}

/// `JobFinished` for job `id`.
async fn announce_job(emitter: &zbus::object_server::SignalEmitter<'_>, daemon: &Daemon, id: &str) {
    let Some(job) = daemon.reads().job_summary(id).await else {
        return;
    };
    let text = serde_json::to_string(&job).unwrap_or_default();
    if let Err(e) = Server::<Manager>::job_finished(emitter, id, job.state.as_str(), &text).await {
        tracing::warn!(job = %id, error = %e, "the JobFinished signal could not be sent");
    }
}

/// Emits `RecoveryStep` for every timeline entry, for as long as `conn` is open.
async fn forward_recovery_steps(conn: zbus::Connection, daemon: Arc<Daemon>) {
    let mut steps = daemon.timeline().subscribe();
    let Ok(emitter) = zbus::object_server::SignalEmitter::new(&conn, OBJECT_PATH) else {
        return;
    };
    loop {
        let entry = match steps.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "RecoveryStep signals were dropped");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let text = serde_json::to_string(&entry).unwrap_or_default();
        if let Err(e) = Server::<Manager>::recovery_step(&emitter, &entry.event, &text).await {
            tracing::warn!(error = %e, "the RecoveryStep signal could not be sent");
        }
    }
}

/// Serves the daemon on `bus` under [`BUS_NAME`]; the connection lives as long as the
/// returned value. `Ok(None)` when the bus is [`Bus::None`].
pub async fn serve(
    daemon: Arc<Daemon>,
    bus: &Bus,
    tasks: &mut crate::services::supervise::Supervisor,
) -> zbus::Result<Option<zbus::Connection>> {
    let Some(builder) = builder(bus) else {
        return Ok(None);
    };
    let tokens = daemon.token_service().subscribe();
    let conn = builder
        .name(BUS_NAME)
        .serve_at(
            OBJECT_PATH,
            Server(Manager {
                daemon: daemon.clone(),
            }),
        )
        .build()
        .await?;
    // Each ends when its source closes, which happens only as signetd exits.
    tasks.spawn_may_end(
        "D-Bus JobFinished signals",
        forward_job_finished(conn.clone(), daemon.clone()),
    );
    tasks.spawn_may_end(
        "D-Bus RecoveryStep signals",
        forward_recovery_steps(conn.clone(), daemon),
    );
    if let Some(rx) = tokens {
        let emitter = SignalEmitter::new(&conn, OBJECT_PATH)?.into_owned();
        tasks.spawn_may_end("D-Bus TokenChanged signals", announce_tokens(rx, emitter));
    }
    Ok(Some(conn))
}

/// Sends `TokenChanged` for every token whose state changes, until the service ends.
async fn announce_tokens(
    mut rx: tokio::sync::watch::Receiver<crate::services::tokens::Status>,
    emitter: SignalEmitter<'static>,
) {
    let mut last = rx.borrow_and_update().clone();
    while rx.changed().await.is_ok() {
        let now = rx.borrow_and_update().clone();
        for t in crate::services::tokens::changed(&last, &now) {
            let json = serde_json::to_string(&t).unwrap_or_default();
            if let Err(e) = Server::<Manager>::token_changed(&emitter, &json).await {
                tracing::warn!(error = %e, "sending TokenChanged on D-Bus failed");
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_choices_parse_and_explain_themselves() {
        assert_eq!("system".parse::<Bus>(), Ok(Bus::System));
        assert_eq!("none".parse::<Bus>(), Ok(Bus::None));
        assert_eq!(
            "unix:path=/tmp/b.sock".parse::<Bus>(),
            Ok(Bus::Address("unix:path=/tmp/b.sock".into()))
        );
        let err = "sytem".parse::<Bus>().unwrap_err();
        assert!(err.contains("\"sytem\"") && err.contains("system"), "{err}");
    }
}

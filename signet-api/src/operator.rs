//! The operator's result types: the job list, the audit log and the host checks. The
//! daemon's operator commands answer them, and every front carries them unchanged:
//! HTTP (`/v1/operator/...`, local root), D-Bus (`org.signet.Signet1.Manager`) and
//! `signetctl`, which renders them as text here.

use serde::{Deserialize, Serialize};

use crate::wire::{ErrorCode, JobState};

/// `GET` the job list (running, queued, recently ended).
pub const JOBS_PATH: &str = "/v1/operator/jobs";
/// `DELETE` cancels any caller's job, with `{id}`.
pub const CANCEL_PATH: &str = "/v1/operator/jobs/{id}";
/// `GET` the newest audit records (`?n=`) or those since a time (`?since=`).
pub const AUDIT_PATH: &str = "/v1/operator/audit";
/// `GET` the audit chain's check.
pub const AUDIT_VERIFY_PATH: &str = "/v1/operator/audit/verify";
/// `GET` the host checks.
pub const DOCTOR_PATH: &str = "/v1/operator/doctor";

/// One job as the operator sees it: every caller's jobs, with who sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    /// The caller's audit identity (`vm:105`, `uid:0`, `client:ci`).
    pub caller: String,
    pub profile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    pub state: JobState,
    /// Jobs that run before this one (0: next); only while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// RFC 3339, UTC.
    pub created: String,
    /// Seconds since it was created.
    pub age_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// Why it failed, for failed and cancelled jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorCode>,
}

/// The jobs: those being uploaded or at the agent (`running`), those waiting in the
/// order they will run (`queued`) and the most recent that ended, newest first
/// (`recent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct JobList {
    pub running: Vec<JobSummary>,
    pub queued: Vec<JobSummary>,
    pub recent: Vec<JobSummary>,
}

/// One audit record, as `signetd audit export` writes it; field order is the order of
/// the record's canonical form (see `signetd`'s `audit` module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub time: String,
    pub job: Option<String>,
    pub caller: String,
    pub transport: String,
    pub profile: Option<String>,
    pub token_serial: Option<String>,
    pub cert_sha256: Option<String>,
    pub filename: Option<String>,
    pub input_sha256: Option<String>,
    pub input_bytes: Option<u64>,
    pub output_sha256: Option<String>,
    pub output_bytes: Option<u64>,
    pub duration_ms: Option<u64>,
    /// `signed`, `refused`, `failed` or `cancelled`.
    pub result: String,
    pub error: Option<String>,
    /// How many refusals of one caller for one reason the record stands for, when
    /// more than one (refusals are coalesced per interval); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    pub prev: String,
    pub hash: String,
}

/// The audit chain's check (`signetd audit verify --json` prints the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCheck {
    pub ok: bool,
    /// Records walked (when intact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    /// The newest record's hash (when intact): keep it elsewhere to notice the newest
    /// records being cut off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// `changed`, `deleted`, `reordered`, or `edited` (records changed or deleted by
    /// hand, as the table's trigger counts them) when broken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The first bad record's `seq` (when broken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Fail,
    /// Not checked: it depends on something not known or not configured.
    Skip,
}

/// One host check: what was found and, when it failed, what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorCheck {
    /// Stable name for scripts: `vhost_vsock`, `vsock_device`, `vm_config`,
    /// `usb_hotplug`, `token_present`, `host_conflict`, `agent`, `logged_in`, `pin`,
    /// `certificate`, `spool`, `clock`, and for a Windows signing VM `remote_desktop`.
    pub name: String,
    pub status: CheckStatus,
    pub summary: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// `signetctl doctor`: every check; `ok` when none failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    pub ok: bool,
    pub checks: Vec<DoctorCheck>,
}

impl DoctorReport {
    pub fn new(checks: Vec<DoctorCheck>) -> Self {
        DoctorReport {
            ok: checks.iter().all(|c| c.status != CheckStatus::Fail),
            checks,
        }
    }
}

/// `3m`, `2h05m`, `4d3h`: an age for people.
pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// The job list as a table.
pub fn jobs_text(list: &JobList) -> String {
    let mut out = String::new();
    let rows: Vec<&JobSummary> = list
        .running
        .iter()
        .chain(&list.queued)
        .chain(&list.recent)
        .collect();
    if rows.is_empty() {
        out.push_str("no jobs\n");
        return out;
    }
    out.push_str(&format!(
        "{:<8} {:<10} {:<4} {:<7} {:<14} {:<12} {}\n",
        "JOB", "STATE", "POS", "AGE", "CALLER", "PROFILE", "FILE"
    ));
    for j in rows {
        let state = match (j.state, j.error) {
            (JobState::Failed, Some(code)) => format!("failed:{}", code.as_str()),
            (s, _) => s.as_str().to_owned(),
        };
        out.push_str(&format!(
            "{:<8} {:<10} {:<4} {:<7} {:<14} {:<12} {}\n",
            j.id,
            state,
            j.position.map_or("-".to_owned(), |p| p.to_string()),
            age(j.age_seconds),
            j.caller,
            j.profile,
            j.filename.as_deref().unwrap_or("-"),
        ));
    }
    out
}

/// Audit records, one line each.
pub fn audit_text(records: &[AuditRecord]) -> String {
    let mut out = String::new();
    if records.is_empty() {
        out.push_str("no audit records\n");
    }
    for r in records {
        out.push_str(&format!(
            "#{} {} {} {} job {} {} {}{}\n",
            r.seq,
            r.time,
            r.result,
            r.caller,
            r.job.as_deref().unwrap_or("-"),
            r.profile.as_deref().unwrap_or("-"),
            r.filename.as_deref().unwrap_or("-"),
            r.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
        ));
    }
    out
}

/// The chain's check in one line.
pub fn audit_check_text(c: &AuditCheck) -> String {
    if c.ok {
        format!(
            "audit log intact: {} records, head {}\n",
            c.records.unwrap_or(0),
            c.head.as_deref().unwrap_or("-")
        )
    } else {
        format!(
            "audit log broken: {}\n",
            c.message.as_deref().unwrap_or("the chain does not verify")
        )
    }
}

/// The checks, one per line, each failure with its fix.
pub fn doctor_text(r: &DoctorReport) -> String {
    let mut out = String::new();
    for c in &r.checks {
        let label = match c.status {
            CheckStatus::Pass => "ok  ",
            CheckStatus::Fail => "FAIL",
            CheckStatus::Skip => "skip",
        };
        out.push_str(&format!("[{label}] {:<14} {}\n", c.name, c.summary));
        if let (CheckStatus::Fail, Some(fix)) = (c.status, &c.fix) {
            out.push_str(&format!("       fix: {fix}\n"));
        }
    }
    let failed = r
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail)
        .count();
    if failed == 0 {
        out.push_str("all checks passed\n");
    } else {
        out.push_str(&format!("{failed} check(s) failed\n"));
    }
    out
}

/// An enrolment's change (`signetd enroll`, D-Bus `Enroll`, the web UI): shown before
/// it is made, reported after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollReport {
    pub vmid: u32,
    /// `signing VM` or `build VM`.
    pub role: String,
    /// The VM's configuration change, key by key (`qm config` before and after).
    pub changes: Vec<KeyChange>,
    /// The `qm set` command that makes it; `None` when the VM has it already.
    pub qm_command: Option<String>,
    /// What goes into `signetd.toml`; `None` when it has it already.
    pub config_stanza: Option<String>,
    pub config_path: String,
    /// False for the dry run.
    pub applied: bool,
    /// What is left to do by hand (restart the VM or signetd).
    pub notes: Vec<String>,
}

/// One key of a VM's configuration, before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChange {
    pub key: String,
    pub old: Option<String>,
    pub new: String,
}

/// An enrolment as text: what changes (or changed), the `qm set` and the
/// `signetd.toml` stanza, and what is left to do by hand.
pub fn enroll_text(r: &EnrollReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let head = if r.applied {
        format!("VM {} enrolled as {}", r.vmid, r.role)
    } else {
        format!(
            "VM {} as {}: a dry run, nothing was changed",
            r.vmid, r.role
        )
    };
    let _ = writeln!(out, "{head}");
    if r.changes.is_empty() && r.config_stanza.is_none() {
        let _ = writeln!(
            out,
            "  nothing to change: the VM and signetd.toml have it already"
        );
    }
    for c in &r.changes {
        let _ = writeln!(
            out,
            "  {}: {} -> {}",
            c.key,
            c.old.as_deref().unwrap_or("(unset)"),
            c.new
        );
    }
    if let Some(qm) = &r.qm_command {
        let _ = writeln!(
            out,
            "  {}: {qm}",
            if r.applied { "ran" } else { "would run" }
        );
    }
    if let Some(stanza) = &r.config_stanza {
        let _ = writeln!(
            out,
            "  {} {}:",
            if r.applied {
                "added to"
            } else {
                "would add to"
            },
            r.config_path
        );
        for line in stanza.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
    for n in &r.notes {
        let _ = writeln!(out, "  then: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(125), "2m");
        assert_eq!(age(7500), "2h05m");
        assert_eq!(age(3 * 86_400 + 7200), "3d2h");
    }

    #[test]
    fn a_report_is_ok_only_without_failures() {
        let check = |status| DoctorCheck {
            name: "x".into(),
            status,
            summary: "s".into(),
            fix: Some("do this".into()),
        };
        assert!(DoctorReport::new(vec![check(CheckStatus::Pass), check(CheckStatus::Skip)]).ok);
        let bad = DoctorReport::new(vec![check(CheckStatus::Pass), check(CheckStatus::Fail)]);
        assert!(!bad.ok);
        let text = doctor_text(&bad);
        assert!(
            text.contains("[FAIL] x") && text.contains("fix: do this"),
            "{text}"
        );
        assert!(text.ends_with("1 check(s) failed\n"), "{text}");
    }

    #[test]
    fn failed_jobs_show_their_code() {
        let list = JobList {
            recent: vec![JobSummary {
                id: "7".into(),
                caller: "vm:104".into(),
                profile: "release".into(),
                filename: Some("a.exe".into()),
                state: JobState::Failed,
                position: None,
                created: "2026-11-23T10:00:00Z".into(),
                age_seconds: 61,
                finished: None,
                error: Some(ErrorCode::SigningFailed),
            }],
            ..JobList::default()
        };
        let text = jobs_text(&list);
        assert!(
            text.contains("failed:signing_failed") && text.contains("vm:104"),
            "{text}"
        );
    }

    #[test]
    fn an_enrolment_reads_as_what_changes_and_what_is_left() {
        let r = EnrollReport {
            vmid: 200,
            role: "build VM".into(),
            changes: vec![KeyChange {
                key: "args".into(),
                old: None,
                new: "-device vhost-vsock-pci,guest-cid=200".into(),
            }],
            qm_command: Some("qm set 200 --args '-device vhost-vsock-pci,guest-cid=200'".into()),
            config_stanza: Some("[[grants]]\ncallers = [\"vm:200\"]".into()),
            config_path: "/etc/signet/signetd.toml".into(),
            applied: false,
            notes: vec!["restart VM 200".into()],
        };
        assert_eq!(
            enroll_text(&r),
            "VM 200 as build VM: a dry run, nothing was changed
  args: (unset) -> -device vhost-vsock-pci,guest-cid=200
  would run: qm set 200 --args '-device vhost-vsock-pci,guest-cid=200'
  would add to /etc/signet/signetd.toml:
    [[grants]]
    callers = [\"vm:200\"]
  then: restart VM 200
"
        );
        let done = EnrollReport { applied: true, ..r };
        assert!(enroll_text(&done).starts_with("VM 200 enrolled as build VM\n"));
    }
}

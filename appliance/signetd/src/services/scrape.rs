//! What a scrape of the metrics reads, each from where the daemon already keeps it:
//! the jobs not ended and the recovery steps from `signet.db` (read-only, off the
//! runtime, through [`crate::services::reads`]), the agent, its token, the PIN and the
//! certificates from the one view of the agent ([`AgentSeen`]), the spool from the
//! store; the counters from the job path ([`crate::services::metrics::JobMetrics`]).

use signet_api::wire::JobState;

use crate::adapters::queries;
use crate::core::recovery::Step;
use crate::services::agent::AgentSeen;
use crate::services::daemon::Daemon;
use crate::services::metrics::{self, Snapshot};

/// The metrics' text now ([`metrics::render`]). A database that cannot be read leaves
/// its gauges out (and is logged); the rest is still served.
pub async fn exposition(daemon: &Daemon) -> String {
    let snap = snapshot(daemon).await;
    metrics::render(daemon.job_service().metrics(), &snap)
}

/// Everything the gauges show, read now.
pub async fn snapshot(daemon: &Daemon) -> Snapshot {
    let cfg = daemon.config();
    let seen = daemon.agent().seen();
    let health = match &seen {
        AgentSeen::Answered(h) => Some(h.as_ref()),
        AgentSeen::NotYet | AgentSeen::Unreachable(_) => None,
    };
    let mut snap = Snapshot::from_agent(
        health,
        cfg.tokens.iter().map(|t| t.serial.as_str()),
        cfg.profiles.iter(),
        daemon.job_service().host_pin_rejected(),
    );
    let counts = daemon
        .reads()
        .read(
            "reading the jobs and the timeline for the metrics",
            |conn| {
                Ok((
                    queries::live_jobs_by_state(conn)?,
                    queries::recovery_steps(conn)?,
                ))
            },
        )
        .await;
    match counts {
        Ok((live, steps)) => {
            snap.jobs = [JobState::Receiving, JobState::Queued, JobState::Running]
                .into_iter()
                .map(|s| {
                    let n = live
                        .iter()
                        .find(|(name, _)| name == s.as_str())
                        .map_or(0, |(_, n)| *n);
                    (s, n)
                })
                .collect();
            snap.recovery_steps = steps
                .into_iter()
                .filter_map(|(event, step, n)| {
                    let result = match event.as_str() {
                        "recovery_step" => "ran",
                        "recovery_step_skipped" => "skipped",
                        "recovery_step_failed" => "failed",
                        _ => return None,
                    };
                    Some((Step::from_name(&step)?.name(), result, n))
                })
                .collect();
        }
        Err(e) => {
            tracing::warn!(error = %e, "the metrics are served without the job and recovery counts");
        }
    }
    let (used, quota) = daemon.store().spool_usage();
    snap.spool_used_bytes = used;
    snap.spool_kept_bytes = daemon.store().spool_kept();
    snap.spool_quota_bytes = quota;
    snap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::store::{Kind, NewJob};

    #[tokio::test]
    async fn the_jobs_not_ended_and_the_recovery_steps_are_read_from_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::Config::parse(
            &dir.path().join("signetd.toml"),
            &format!(
                "agent = \"unix:{0}/agent.sock\"\nstate_dir = \"{0}/state\"\ndbus = \"none\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let daemon = Daemon::open(cfg).unwrap();
        let store = daemon.store();
        for _ in 0..2 {
            store
                .insert(&NewJob {
                    caller: "uid:0".into(),
                    transport: "unix".into(),
                    idempotency_key: None,
                    kind: Kind::Sign,
                    profile: "default".into(),
                    filename: Some("a.exe".into()),
                    agent_query: "profile=default".into(),
                    content_type: "application/octet-stream".into(),
                    request_sha256: None,
                })
                .unwrap();
        }
        store.queued("2", "abc", 10).unwrap();
        for (event, detail) in [
            (
                "recovery_step",
                "reattach: the host detaches and re-attaches",
            ),
            ("recovery_step", "reattach: again"),
            ("recovery_step_failed", "vm_reset: qm reset failed"),
            ("recovery_step_skipped", "usb_port_reset: skipped"),
            ("recovery_step", "no_such_step: not a step"),
            ("token_lost", "reattach: not a step's entry"),
        ] {
            store
                .conn()
                .execute(
                    "INSERT INTO timeline (time_ms, event, detail) VALUES (1, ?1, ?2)",
                    [event, detail],
                )
                .unwrap();
        }
        let snap = snapshot(&daemon).await;
        assert_eq!(
            snap.jobs,
            [
                (JobState::Receiving, 1),
                (JobState::Queued, 1),
                (JobState::Running, 0)
            ]
        );
        let mut steps = snap.recovery_steps.clone();
        steps.sort();
        assert_eq!(
            steps,
            [
                ("reattach", "ran", 2),
                ("usb_port_reset", "skipped", 1),
                ("vm_reset", "failed", 1)
            ]
        );
        assert!(!snap.agent_up, "the agent has not answered");
        assert_eq!(snap.spool_quota_bytes, 2048 << 20);
    }
}

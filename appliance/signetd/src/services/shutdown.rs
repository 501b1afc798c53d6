//! Host shutdown and reboot, through logind on the system bus: the daemon holds a
//! *delay* inhibitor for `shutdown`; when logind announces `PrepareForShutdown(true)`
//! it stops taking jobs ([`JobService::drain`](crate::services::jobs::JobService::drain)), gives the job at the agent up to the
//! grace time to end, and releases the inhibitor so the shutdown goes on. Queued jobs
//! stay in the durable queue and run after the boot; a job still at the agent runs
//! again then. `PrepareForShutdown(false)` (a cancelled shutdown) takes jobs again and
//! takes a new inhibitor.
//!
//! What to do with each signal is [`decide`] (pure); [`run`] does the D-Bus I/O.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::adapters::bus::builder;
use crate::config::Bus;
use crate::services::daemon::Daemon;

/// What the daemon tells logind it is waiting for.
const WHO: &str = "Signet";
const WHY: &str = "letting the signing job at the token end and keeping the job queue";

#[zbus::proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
trait Login1Manager {
    fn inhibit(&self, what: &str, who: &str, why: &str, mode: &str) -> zbus::Result<zbus::OwnedFd>;

    #[zbus(signal)]
    fn prepare_for_shutdown(&self, start: bool) -> zbus::Result<()>;
}

/// What the daemon does on a `PrepareForShutdown` signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Stop taking jobs, wait for the one at the agent, release the inhibitor.
    Drain,
    /// Take jobs again and a new inhibitor.
    Resume,
    /// Nothing: the signal repeats what is already being done.
    Nothing,
}

/// The step for signal `start` when the daemon is `draining` already or not.
pub fn decide(start: bool, draining: bool) -> Step {
    match (start, draining) {
        (true, false) => Step::Drain,
        (false, true) => Step::Resume,
        _ => Step::Nothing,
    }
}

/// Why the shutdown watch stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("cannot reach logind on the {bus}: {source}")]
    Bus {
        bus: Bus,
        #[source]
        source: zbus::Error,
    },
}

/// Follows logind on `bus` for the daemon's life. Without logind on the bus (no
/// systemd) it logs that host shutdowns are not delayed and returns.
pub async fn run(daemon: Arc<Daemon>, bus: Bus, grace: Duration) -> Result<(), ShutdownError> {
    let Some(b) = builder(&bus) else {
        return Ok(());
    };
    let err = |source| ShutdownError::Bus {
        bus: bus.clone(),
        source,
    };
    let conn = b.build().await.map_err(err)?;
    let logind = Login1ManagerProxy::new(&conn).await.map_err(err)?;
    // Subscribed before the inhibitor is taken: no announcement falls between.
    let mut signals = logind.receive_prepare_for_shutdown().await.map_err(err)?;
    let mut inhibitor = match logind.inhibit("shutdown", WHO, WHY, "delay").await {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::info!(error = %e, "logind is not reachable on the {bus}; host shutdowns are not delayed for the job at the token (queued jobs still survive them)");
            return Ok(());
        }
    };
    tracing::info!("holding a logind delay inhibitor for host shutdowns");
    while let Some(signal) = signals.next().await {
        let start = match signal.args() {
            Ok(a) => a.start,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable PrepareForShutdown signal");
                continue;
            }
        };
        match decide(start, daemon.job_service().draining()) {
            Step::Drain => {
                daemon
                    .timeline()
                    .saw(crate::core::timeline::Seen::ShutdownDrain);
                let job_ended = daemon.job_service().drain(grace).await;
                daemon
                    .timeline()
                    .saw(crate::core::timeline::Seen::ShutdownReleased { job_ended });
                drop(inhibitor.take());
                tracing::info!("logind inhibitor released");
            }
            Step::Resume => {
                tracing::info!("the host shutdown was cancelled: taking jobs again");
                daemon.job_service().resume();
                inhibitor = match logind.inhibit("shutdown", WHO, WHY, "delay").await {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        tracing::warn!(error = %e, "logind refused a new inhibitor; the next shutdown is not delayed");
                        None
                    }
                };
            }
            Step::Nothing => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_announcement_drains_or_resumes_once() {
        assert_eq!(decide(true, false), Step::Drain);
        assert_eq!(decide(true, true), Step::Nothing, "announced twice");
        assert_eq!(decide(false, true), Step::Resume);
        assert_eq!(
            decide(false, false),
            Step::Nothing,
            "a cancel without a shutdown"
        );
    }
}

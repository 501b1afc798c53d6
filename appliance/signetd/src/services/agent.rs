//! The agent as the services speak of it: a job relayed and its answer, the health read,
//! and what a caller is told when the agent fails or cannot be reached (the details go
//! to signetd's log, keyed by the job).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use signet_api::wire::{AgentHealth, ErrorBody, ErrorCode};
use signet_protocol::client::ClientError;

use crate::adapters::agent::{self, Health, Sent};
use crate::config::Current;

/// The agent at the configured endpoint.
#[derive(Debug, Clone)]
pub struct AgentLink {
    config: Arc<Current>,
}

impl AgentLink {
    pub fn new(config: Arc<Current>) -> Self {
        AgentLink { config }
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
    ) -> Result<http::Response<Incoming>, ErrorBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let cfg = self.config.get();
        let sent = agent::send_job(
            &cfg.agent,
            id,
            path,
            query,
            content_type,
            body,
            content_length,
        )
        .await
        .map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("cannot build the agent request: {e}"),
            )
        })?;
        match sent {
            Sent::Answer(resp) => Ok(resp),
            Sent::Refused(e) => Err(client_view(id, e)),
            Sent::Unreachable(e) => Err(self.unreachable(&e)),
        }
    }

    /// The agent's health, or why there is none, within `within`.
    pub async fn health(&self, within: Duration) -> Result<AgentHealth, ErrorBody> {
        match agent::health(&self.config.get().agent, within).await {
            Health::Answered(h) => Ok(*h),
            Health::Refused(e) => Err(e),
            Health::Unreachable(e) => Err(self.unreachable(&e)),
            Health::Silent(within) => Err(ErrorBody::new(
                ErrorCode::AgentUnavailable,
                format!(
                    "the signing agent did not answer within {} s; check that the signing VM is not hung (its console, `qm status VMID`) and see signet-agent's log",
                    within.as_secs()
                ),
            )),
        }
    }

    /// An agent that cannot be reached, as a caller is told it (why goes to the log).
    pub fn unreachable(&self, e: &ClientError) -> ErrorBody {
        let cfg = self.config.get();
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

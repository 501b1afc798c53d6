//! The agent as the services speak of it: a job relayed and its answer, the health read,
//! and what a caller is told when the agent fails or cannot be reached (the details go
//! to signetd's log, keyed by the job).
//!
//! [`AgentSeen`] is the one view of the agent: every health read (the agent watcher's
//! on its stream and after each of the agent's events, the status's own) feeds it, and
//! the worker (the token's facts for the audit) and the web's overview read it instead
//! of asking the agent again. The status still asks the agent itself: a status is a
//! contact, and an outage counts from the first contact that failed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use signet_api::wire::{AgentHealth, ErrorBody, ErrorCode};
use signet_protocol::client::ClientError;

use crate::adapters::agent::{self, Health, InputSha, Sent};
use crate::config::Current;

/// What the daemon last learnt of the agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum AgentSeen {
    /// Nothing yet (signetd just started).
    #[default]
    NotYet,
    /// The agent answered with its health.
    Answered(Box<AgentHealth>),
    /// The agent did not answer, or answered with an error (what a caller is told).
    Unreachable(ErrorBody),
}

/// The agent at the configured endpoint, and the view of it every health read feeds.
#[derive(Debug, Clone)]
pub struct AgentLink {
    config: Arc<Current>,
    view: Arc<tokio::sync::watch::Sender<AgentSeen>>,
}

impl AgentLink {
    pub fn new(config: Arc<Current>) -> Self {
        AgentLink {
            config,
            view: Arc::new(tokio::sync::watch::channel(AgentSeen::NotYet).0),
        }
    }

    /// What the daemon last learnt of the agent.
    pub fn seen(&self) -> AgentSeen {
        self.view.borrow().clone()
    }

    /// The view, to follow its changes.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<AgentSeen> {
        self.view.subscribe()
    }

    fn publish(&self, seen: AgentSeen) {
        self.view.send_if_modified(|cur| {
            if *cur == seen {
                false
            } else {
                *cur = seen;
                true
            }
        });
    }

    /// The agent's health within `within`, as the adapter found it; the view learns it.
    pub async fn read_health(&self, within: Duration) -> Health {
        let h = agent::health(&self.config.get().agent, within).await;
        match &h {
            Health::Answered(health) => self.publish(AgentSeen::Answered(health.clone())),
            Health::Refused(e) => self.publish(AgentSeen::Unreachable(e.clone())),
            Health::Unreachable(_) => self.publish(AgentSeen::Unreachable(unreachable_body())),
            Health::Silent(within) => self.publish(AgentSeen::Unreachable(silent(*within))),
        }
        h
    }

    /// Sends job `id` to the agent at `path?query` with `body` as its body (its length
    /// and SHA-256 in hex, when known); answers the agent's streaming response, or the
    /// agent's error as the caller may see it.
    #[allow(clippy::too_many_arguments)]
    pub async fn relay_to<B>(
        &self,
        id: &str,
        path: &str,
        query: &str,
        content_type: &str,
        body: B,
        content_length: Option<u64>,
        input_sha256: InputSha<'_>,
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
            input_sha256,
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

    /// The agent's health, or why there is none, within `within`; the view learns it.
    pub async fn health(&self, within: Duration) -> Result<AgentHealth, ErrorBody> {
        match self.read_health(within).await {
            Health::Answered(h) => Ok(*h),
            Health::Refused(e) => Err(e),
            Health::Unreachable(e) => Err(self.unreachable(&e)),
            Health::Silent(within) => Err(silent(within)),
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
        unreachable_body()
    }
}

/// What a caller is told of an agent that cannot be reached.
fn unreachable_body() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::AgentUnavailable,
        "the signing VM's agent is not reachable (the signing VM is down or signet-agent is not running in it); nothing is signed until it is back. Why is in signetd's log on the Proxmox host (journalctl -u signetd)",
    )
    // A signing VM that reboots comes back: jobs wait for it until their deadline.
    .retryable(true)
}

/// An agent that did not answer within `within`.
fn silent(within: Duration) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::AgentUnavailable,
        format!(
            "the signing agent did not answer within {} s; check that the signing VM is not hung (its console, `qm status VMID`) and see signet-agent's log",
            within.as_secs()
        ),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn link(dir: &std::path::Path, agent: &str) -> AgentLink {
        let path = dir.join("signetd.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\nagent = \"{agent}\"\nlisten = [\"unix:/run/s.sock\"]\n",
                dir.join("state").display()
            ),
        )
        .unwrap();
        let cfg = crate::config::Config::load(&path).unwrap();
        AgentLink::new(Arc::new(Current::new(cfg)))
    }

    #[tokio::test]
    async fn every_health_read_feeds_the_one_view_of_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        // An agent that answers its health on a unix socket.
        let sock = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let body = serde_json::json!({
            "version": "test", "instance": "one", "state": "ready", "detail": "",
            "module": "softhsm", "signer": "osslsigncode"
        })
        .to_string();
        let server = tokio::spawn(async move {
            let app = axum::Router::new().route(
                signet_api::wire::AGENT_HEALTH_PATH,
                axum::routing::get(move || {
                    let body = body.clone();
                    async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
                }),
            );
            axum::serve(listener, app).await.unwrap();
        });
        let up = link(dir.path(), &format!("unix:{}", sock.display()));
        let mut view = up.watch();
        assert_eq!(up.seen(), AgentSeen::NotYet);
        assert!(up.health(Duration::from_secs(10)).await.is_ok());
        assert!(
            view.has_changed().unwrap(),
            "a reader is told the view changed"
        );
        assert!(
            matches!(view.borrow_and_update().clone(), AgentSeen::Answered(h) if h.instance.as_deref() == Some("one"))
        );
        server.abort();

        // Nothing listens: the view learns that too.
        let down = link(
            dir.path(),
            &format!("unix:{}", dir.path().join("none.sock").display()),
        );
        let e = down.health(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::AgentUnavailable);
        assert_eq!(down.seen(), AgentSeen::Unreachable(e));
    }
}

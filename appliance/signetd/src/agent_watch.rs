//! The daemon follows the signing agent for its life: its event stream
//! (`GET /agent/v1/events`) and its health. It records in the [timeline] when the
//! agent becomes unreachable and comes back and when the token is lost and comes back,
//! and it gives the agent the token's PIN from the host's `pin_file` whenever the agent
//! needs one — after a signing-VM reboot or an agent restart — so no person types it.
//!
//! A PIN the token refused is never sent again (the agent would not present it either):
//! the timeline says "PIN rejected — operator action needed" and jobs fail with
//! `pin_rejected` until the PIN file holds another PIN.
//!
//! [`react`] (pure) decides what an agent event calls for; [`run`] does the I/O.
//!
//! [timeline]: crate::timeline

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use signet_protocol::client;
use signet_protocol::wire::{
    AgentEvent, AgentEventKind, AgentHealth, AgentLogin, AgentState, ErrorCode, AGENT_EVENTS_PATH,
    AGENT_HEALTH_PATH, AGENT_LOGIN_PATH,
};

use crate::daemon::Daemon;
use crate::timeline::Seen;

/// The shortest and longest wait before connecting to the agent again.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the health is read while the event stream is open: the agent may wait for
/// a PIN (the PIN file may have been fixed), or may be another process than the one
/// whose stream this is — a guest reset behind a hybrid-vsock backend leaves the old
/// stream open on the host's side, silent for ever.
const PIN_RECHECK: Duration = Duration::from_secs(10);
/// How long one of those health reads may take.
const HEALTH_LIMIT: Duration = Duration::from_secs(10);

/// What an agent event calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reaction {
    Record(Seen),
    /// Give the agent the host's PIN.
    DeliverPin,
    Nothing,
}

/// The reaction to `event`.
pub fn react(event: &AgentEventKind) -> Reaction {
    match event {
        AgentEventKind::TokenLost { detail, .. } => {
            Reaction::Record(Seen::TokenLost(detail.clone()))
        }
        AgentEventKind::TokenAppeared { .. } => Reaction::Record(Seen::TokenBack),
        AgentEventKind::LoggedIn { .. } => Reaction::Record(Seen::LoggedIn),
        AgentEventKind::PinProblem {
            state: AgentState::PinNeeded,
            ..
        } => Reaction::DeliverPin,
        _ => Reaction::Nothing,
    }
}

/// Why the PIN file cannot be used, with the fix.
pub fn check_pin_file(path: &Path, mode: u32, is_file: bool) -> Result<(), String> {
    if !is_file {
        return Err(format!(
            "{} is not a regular file; put the token's PIN in it (one line)",
            path.display()
        ));
    }
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} can be read by others (mode {:o}); `chmod 600 {}` so only root reads the PIN",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    Ok(())
}

/// The PIN in the file's text: its first line, without the line end.
pub fn pin_of(text: &str) -> Option<&str> {
    let pin = text.lines().next()?.trim_end_matches('\r');
    (!pin.is_empty()).then_some(pin)
}

/// The watcher's memory across connections.
#[derive(Debug, Default)]
struct PinMemory {
    /// SHA-256 of the last PIN the token refused: never sent again.
    rejected: Option<[u8; 32]>,
    /// The last complaint about the PIN file, so it is logged once.
    complaint: Option<String>,
}

/// Follows the agent for the daemon's life.
pub async fn run(daemon: Arc<Daemon>) {
    let mut pins = PinMemory::default();
    let mut wait = RECONNECT_MIN;
    let mut instance = None;
    loop {
        match follow(&daemon, &mut pins, &mut instance).await {
            Ok(()) => wait = RECONNECT_MIN,
            Err(why) => {
                daemon.timeline().saw(Seen::AgentDown(why));
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RECONNECT_MAX);
    }
}

/// One connection to the agent's event stream, until it ends. `Err` when the agent
/// could not be reached (why, for the timeline).
async fn follow(
    daemon: &Daemon,
    pins: &mut PinMemory,
    instance: &mut Option<String>,
) -> Result<(), String> {
    let agent = &daemon.config().agent;
    let req = http::Request::get(AGENT_EVENTS_PATH)
        .header(http::header::ACCEPT, "text/event-stream")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = client::send(agent, req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!(
            "the agent answered {} to its event stream",
            resp.status()
        ));
    }
    daemon.timeline().saw(Seen::AgentUp);
    daemon.wake_worker();
    if let Some(Ok(h)) = health(agent).await {
        seen_instance(daemon, instance, &h);
        if h.state == AgentState::PinNeeded {
            deliver_pin(daemon, pins).await;
        }
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    // The first check one period from now: the health was just read.
    let mut recheck =
        tokio::time::interval_at(tokio::time::Instant::now() + PIN_RECHECK, PIN_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = body.frame() => {
                let Some(Ok(frame)) = frame else {
                    return Err("the agent's event stream ended".to_owned());
                };
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                for event in take_events(&mut buf) {
                    match react(&event.kind) {
                        Reaction::Record(seen) => {
                            let back = matches!(seen, Seen::TokenBack | Seen::LoggedIn);
                            daemon.timeline().saw(seen);
                            if back {
                                daemon.wake_worker();
                            }
                        }
                        Reaction::DeliverPin => deliver_pin(daemon, pins).await,
                        Reaction::Nothing => {}
                    }
                }
            }
            _ = recheck.tick() => {
                // Not answering now: the stream (or the next check) tells more.
                if let Some(Ok(h)) = health(agent).await {
                    if seen_instance(daemon, instance, &h) {
                        return Err("the agent restarted; following its new event stream".to_owned());
                    }
                    if daemon.config().pin_file.is_some()
                        && matches!(h.state, AgentState::PinNeeded | AgentState::PinRejected)
                    {
                        deliver_pin(daemon, pins).await;
                    }
                }
            }
        }
    }
}

/// The agent's health within [`HEALTH_LIMIT`]: `None` when it did not answer.
async fn health(agent: &signet_protocol::Endpoint) -> Option<Result<AgentHealth, ()>> {
    match tokio::time::timeout(
        HEALTH_LIMIT,
        client::get_json::<AgentHealth>(agent, AGENT_HEALTH_PATH),
    )
    .await
    {
        Ok(Ok(Ok(h))) => Some(Ok(h)),
        Ok(Ok(Err(_))) => Some(Err(())),
        Ok(Err(_)) | Err(_) => None,
    }
}

/// Notes which agent process answered; true (and the job at the old one abandoned:
/// [`Daemon::agent_restarted`]) when it is another than before.
fn seen_instance(daemon: &Daemon, known: &mut Option<String>, h: &AgentHealth) -> bool {
    let Some(now) = &h.instance else {
        return false;
    };
    let changed = known.as_ref().is_some_and(|k| k != now);
    *known = Some(now.clone());
    if changed {
        tracing::info!(instance = %now, "the agent is a new process (its VM was reset, or it restarted)");
        daemon.agent_restarted();
    }
    changed
}

/// Takes the complete server-sent events out of `buf` (their `data:` lines as JSON).
fn take_events(buf: &mut Vec<u8>) -> Vec<AgentEvent> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let block: Vec<u8> = buf.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&block);
        let data: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim_start)
            .collect();
        if let Ok(e) = serde_json::from_str::<AgentEvent>(&data) {
            out.push(e);
        }
    }
    out
}

/// Gives the agent the PIN from the host's PIN file, unless there is none, it cannot
/// be used, or the token refused it before.
async fn deliver_pin(daemon: &Daemon, pins: &mut PinMemory) {
    let Some(path) = daemon.config().pin_file.clone() else {
        return;
    };
    let read = tokio::task::spawn_blocking({
        let path = path.clone();
        move || -> Result<String, String> {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(&path)
                .map_err(|e| format!("cannot read the PIN file {}: {e}", path.display()))?;
            check_pin_file(&path, meta.permissions().mode(), meta.is_file())?;
            std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read the PIN file {}: {e}", path.display()))
        }
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let text = match read {
        Ok(t) => t,
        Err(why) => {
            if pins.complaint.as_ref() != Some(&why) {
                tracing::error!("{why}; the agent waits for a PIN");
                pins.complaint = Some(why);
            }
            return;
        }
    };
    let Some(pin) = pin_of(&text) else {
        tracing::error!(path = %path.display(), "the PIN file is empty; put the token's PIN in it");
        return;
    };
    let hash: [u8; 32] = Sha256::digest(pin.as_bytes()).into();
    if pins.rejected == Some(hash) {
        return;
    }
    pins.complaint = None;
    let body = AgentLogin {
        pin: SecretString::from(pin.to_owned()),
    };
    let req = client::json_request(http::Method::POST, AGENT_LOGIN_PATH, &body);
    let agent = &daemon.config().agent;
    let answer = match client::send(agent, req).await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(Some(client::error_body(agent, resp).await)),
        Err(e) => {
            tracing::warn!(error = %e, "the PIN could not be given to the agent");
            Err(None)
        }
    };
    match answer {
        Ok(()) => {
            daemon.set_host_pin_rejected(false);
            daemon.timeline().saw(Seen::PinDelivered);
            daemon.wake_worker();
        }
        Err(Some(e)) if e.code == ErrorCode::PinRejected => {
            pins.rejected = Some(hash);
            daemon.set_host_pin_rejected(true);
            daemon.timeline().saw(Seen::PinRejected(format!(
                "PIN rejected — operator action needed: the token refused the PIN in {}; it is not tried again. Put the right PIN in that file (check the token's PIN counter with `signetctl status` first)",
                path.display()
            )));
        }
        Err(Some(e)) => {
            tracing::warn!(code = %e.code, detail = %e.message, "the agent did not take the PIN")
        }
        Err(None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_events_become_timeline_entries_or_a_pin() {
        let lost = AgentEventKind::TokenLost {
            serial: "a1".into(),
            detail: "CKR_DEVICE_REMOVED".into(),
        };
        assert_eq!(
            react(&lost),
            Reaction::Record(Seen::TokenLost("CKR_DEVICE_REMOVED".into()))
        );
        let back = AgentEventKind::TokenAppeared {
            label: "l".into(),
            serial: "a1".into(),
        };
        assert_eq!(react(&back), Reaction::Record(Seen::TokenBack));
        let needed = AgentEventKind::PinProblem {
            state: AgentState::PinNeeded,
            detail: String::new(),
        };
        assert_eq!(react(&needed), Reaction::DeliverPin);
        let rejected = AgentEventKind::PinProblem {
            state: AgentState::PinRejected,
            detail: String::new(),
        };
        assert_eq!(react(&rejected), Reaction::Nothing, "never on a rejection");
        let started = AgentEventKind::SigningStarted {
            job: 1,
            filename: None,
        };
        assert_eq!(react(&started), Reaction::Nothing);
    }

    #[test]
    fn the_pin_file_must_be_private_and_the_pin_is_its_first_line() {
        let p = Path::new("/etc/signet/token.pin");
        assert_eq!(check_pin_file(p, 0o100600, true), Ok(()));
        let e = check_pin_file(p, 0o100644, true).unwrap_err();
        assert!(e.contains("chmod 600 /etc/signet/token.pin"), "{e}");
        assert!(check_pin_file(p, 0o40700, false).is_err());
        assert_eq!(pin_of("1234\n"), Some("1234"));
        assert_eq!(pin_of("12 34\r\nnext"), Some("12 34"));
        assert_eq!(pin_of("\n"), None);
        assert_eq!(pin_of(""), None);
    }

    #[test]
    fn server_sent_events_are_taken_whole() {
        let mut buf = b"event: token_lost\ndata: {\"seq\":1,\"time\":\"t\",\"type\":\"token_lost\",\"details\":{\"serial\":\"a\",\"detail\":\"gone\"}}\n\nevent: logg".to_vec();
        let events = take_events(&mut buf);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].seq, 1);
        assert_eq!(buf, b"event: logg", "the partial event waits for its end");
        assert!(take_events(&mut b": keep-alive\n\n".to_vec()).is_empty());
    }
}

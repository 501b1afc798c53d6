//! The doors an alert leaves by, one per target: PVE's notification system
//! ([`pve`]: its `PVE::Notify` through a helper shipped with the package), a mail
//! ([`mail`]: a sendmail-compatible program) and a webhook ([`webhook`]: a JSON POST).
//! Each hands over one [`Message`] and says whether it was taken; none retries (the
//! caller does) and none holds anything else up. Under systemd the local doors (PVE's
//! helper, sendmail) go through [`relay`], which runs them outside signetd's sandbox.
//!
//! A message carries no secret: what happened, to what, since when and what to do.

pub mod mail;
pub mod pve;
pub mod relay;
pub mod state;
pub mod webhook;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long one delivery may take: a helper, sendmail or a webhook that hangs is given
/// up (and tried again later).
pub const DELIVERY_LIMIT: Duration = Duration::from_secs(30);

/// The most of a helper's error output kept for the log.
const MAX_STDERR: usize = 4096;

/// One notice as every door hands it over (and the helper and the webhook read it:
/// the JSON's field names are part of the interface).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// The kind's stable name (`token-lost`, `pin-rejected`, ...).
    pub kind: String,
    /// `raised` or `resolved`.
    pub state: String,
    /// `info`, `warning` or `error` (PVE's severities).
    pub severity: String,
    /// The alert's title, e.g. "the signing token is lost".
    pub title: String,
    /// What was seen and what to do.
    pub detail: String,
    /// What the alert is about within its kind (a certificate's SHA-256), else empty.
    pub subject: String,
    /// When the condition began, RFC 3339.
    pub since: String,
    /// When this notice was decided, RFC 3339.
    pub at: String,
    /// The host's name.
    pub hostname: String,
}

impl Message {
    /// The one-line summary: subjects of mails, the log.
    pub fn summary(&self) -> String {
        let what = match self.state.as_str() {
            "resolved" => format!("resolved: {}", self.title),
            _ => self.title.clone(),
        };
        format!("Signet on {}: {what}", self.hostname)
    }
}

/// Why a door did not take a message: each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{program} could not be started: {source}; check that it is installed and executable, or change [alerts] in signetd.toml")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {} s; it was stopped", DELIVERY_LIMIT.as_secs())]
    Hung { program: String },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("the webhook {url} could not be reached: {detail}; check the URL and that the receiver is up")]
    Unreachable { url: String, detail: String },
    #[error("the webhook {url} answered {status}; check the receiver's log")]
    Refused { url: String, status: u16 },
    #[error("the alert relay at {socket} could not be reached: {detail}; check `systemctl status signet-notify.socket`")]
    Relay { socket: String, detail: String },
    #[error(
        "{answer} (said by signet-notify@.service: `journalctl -u 'signet-notify@*'` has its log)"
    )]
    Relayed { answer: String },
    #[error("{0}")]
    Setup(String),
}

/// The host's name (the kernel's), or "localhost".
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Runs `program args` with `input` on its stdin, within [`DELIVERY_LIMIT`]; its
/// error output is kept for the error.
async fn run_with_stdin(
    program: &std::path::Path,
    args: &[&str],
    input: &[u8],
) -> Result<(), DeliveryError> {
    use tokio::io::AsyncWriteExt;
    let shown = program.display().to_string();
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DeliveryError::Start {
            program: shown.clone(),
            source,
        })?;
    let mut stdin = child.stdin.take();
    let run = async {
        if let Some(s) = stdin.as_mut() {
            // A program that exits without reading says why in its status.
            let _ = s.write_all(input).await;
        }
        drop(stdin.take());
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(DELIVERY_LIMIT, run)
        .await
        .map_err(|_| DeliveryError::Hung {
            program: shown.clone(),
        })?
        .map_err(|source| DeliveryError::Start {
            program: shown.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.len() > MAX_STDERR {
        let mut cut = MAX_STDERR;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
    }
    Err(DeliveryError::Failed {
        program: shown,
        status: out.status.to_string(),
        stderr,
    })
}

#[cfg(test)]
pub(crate) fn sample() -> Message {
    Message {
        kind: "token-lost".into(),
        state: "raised".into(),
        severity: "warning".into(),
        title: "the signing token is lost".into(),
        detail: "CKR_DEVICE_REMOVED; plug it in again".into(),
        subject: String::new(),
        since: "2026-12-02T22:00:00Z".into(),
        at: "2026-12-02T22:02:00Z".into(),
        hostname: "pve1".into(),
    }
}

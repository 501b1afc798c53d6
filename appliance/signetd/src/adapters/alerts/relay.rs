//! The relay that delivers local alerts outside signetd's sandbox: under systemd,
//! `signet-notify.socket` listens on [`SOCKET`] (root's, 0600) and starts one
//! `signet-notify@.service` per connection, which runs `signetd alert-relay` ([`serve`])
//! with the connection as its stdin and stdout. That unit runs root without
//! `NoNewPrivileges`, so Postfix's setgid `postdrop` works and the mail queue is
//! writable, which signetd's own sandbox forbids.
//!
//! The wire: signetd writes one [`Request`] as JSON (at most [`MAX_REQUEST`] bytes) and
//! shuts its side down; the relay checks it, runs one of two fixed programs
//! ([`Programs`]: the PVE helper, `sendmail -t -oi`) with no shell and no argument
//! from the request, and answers one line: `ok`, or `failed: ` and the door's error
//! (which names the fix). Only those two programs are reachable: a request cannot name
//! a program, and the mail's headers are composed here from checked fields.
//!
//! [`route`] says whether a target goes through the relay: when the socket is there and
//! the target's program is the one the relay runs; otherwise signetd runs the program
//! itself, as it does where no systemd unit starts it (tests, a run by hand).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{DeliveryError, Message, DELIVERY_LIMIT};
use crate::config::alerts::{mail_address_ok, DEFAULT_PVE_HELPER};

/// Where `signet-notify.socket` listens.
pub const SOCKET: &str = "/run/signet/notify.sock";
/// The sendmail the relay runs (Postfix's, Exim's and msmtp-mta's all live here).
pub const SENDMAIL: &str = "/usr/sbin/sendmail";
/// The most a request may hold.
pub const MAX_REQUEST: usize = 64 * 1024;
/// The most of an answer signetd reads.
const MAX_REPLY: usize = 8 * 1024;

/// One delivery asked of the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "door", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// To PVE's notification system, through the PVE helper.
    Pve { message: Message },
    /// A mail by sendmail to `to`, from `from` (else sendmail's default sender).
    Mail {
        message: Message,
        to: Vec<String>,
        #[serde(default)]
        from: Option<String>,
    },
}

impl Request {
    /// What is wrong with it, if anything: the relay refuses it then.
    pub fn check(&self) -> Result<(), String> {
        let (m, addresses) = match self {
            Request::Pve { message } => (message, Vec::new()),
            Request::Mail { message, to, from } => {
                if to.is_empty() || to.len() > 32 {
                    return Err(format!(
                        "a mail goes to 1 to 32 addresses, not {}",
                        to.len()
                    ));
                }
                (message, to.iter().chain(from).collect())
            }
        };
        if let Some(a) = addresses.iter().find(|a| !mail_address_ok(a)) {
            return Err(format!("{a:?} is not a mail address"));
        }
        let name = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        for (key, v) in [("kind", &m.kind), ("state", &m.state)] {
            if !name(v) {
                return Err(format!("'{key}' must be a lowercase name, not {v:?}"));
            }
        }
        if !["info", "notice", "warning", "error"].contains(&m.severity.as_str()) {
            return Err(format!(
                "severity {:?} is not one of info, notice, warning, error",
                m.severity
            ));
        }
        Ok(())
    }
}

/// The programs the relay runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programs {
    pub pve_helper: PathBuf,
    pub sendmail: PathBuf,
}

impl Default for Programs {
    fn default() -> Self {
        Programs {
            pve_helper: DEFAULT_PVE_HELPER.into(),
            sendmail: SENDMAIL.into(),
        }
    }
}

/// The relay's socket for a target run by `program`, when the relay is there (`socket`
/// exists) and runs that very program (`fixed`); else the target runs `program` itself.
pub fn route<'a>(socket: &'a Path, program: &Path, fixed: &Path) -> Option<&'a Path> {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket());
    (is_socket && program == fixed).then_some(socket)
}

/// Hands `req` to the relay at `socket` and reads its verdict.
pub async fn send(socket: &Path, req: &Request) -> Result<(), DeliveryError> {
    let shown = socket.display().to_string();
    let unreachable = |e: std::io::Error| DeliveryError::Relay {
        socket: shown.clone(),
        detail: e.to_string(),
    };
    let body = serde_json::to_vec(req).map_err(|e| DeliveryError::Setup(e.to_string()))?;
    let exchange = async {
        let mut conn = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(unreachable)?;
        conn.write_all(&body).await.map_err(unreachable)?;
        conn.shutdown().await.map_err(unreachable)?;
        let mut reply = Vec::new();
        (&mut conn)
            .take(MAX_REPLY as u64)
            .read_to_end(&mut reply)
            .await
            .map_err(unreachable)?;
        Ok(reply)
    };
    // The relay gives up its program after DELIVERY_LIMIT and says so: wait a little
    // longer for that answer.
    let wait = DELIVERY_LIMIT + std::time::Duration::from_secs(5);
    let reply =
        tokio::time::timeout(wait, exchange)
            .await
            .map_err(|_| DeliveryError::Relay {
                socket: shown.clone(),
                detail: format!("no verdict within {} s", wait.as_secs()),
            })??;
    let reply = String::from_utf8_lossy(&reply);
    let line = reply.lines().next().unwrap_or("").trim();
    match line {
        "ok" => Ok(()),
        _ => Err(DeliveryError::Relayed {
            answer: match line.strip_prefix("failed: ") {
                Some(why) => why.to_owned(),
                None if line.is_empty() => "no answer".to_owned(),
                None => format!("an answer that is not a verdict: {line:?}"),
            },
        }),
    }
}

/// Reads one request from `input`, delivers it with `programs` and writes the verdict
/// to `output`; returns whether it was delivered.
pub async fn serve(
    input: impl AsyncRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
    programs: &Programs,
) -> bool {
    let verdict = relay(input, programs).await;
    let line = match &verdict {
        Ok(()) => "ok\n".to_owned(),
        Err(e) => format!("failed: {}\n", e.replace(['\n', '\r'], " ")),
    };
    // signetd may be gone; the journal has the verdict anyway.
    let _ = output.write_all(line.as_bytes()).await;
    let _ = output.flush().await;
    verdict.is_ok()
}

async fn relay(input: impl AsyncRead + Unpin, programs: &Programs) -> Result<(), String> {
    let refused = |e: String| {
        tracing::warn!("alert relay request refused: {e}");
        e
    };
    let req = read_request(input).await.map_err(refused)?;
    req.check()
        .map_err(|e| refused(format!("the request was refused: {e}")))?;
    deliver(&req, programs).await
}

/// One request, read to the end of the input (at most [`MAX_REQUEST`] bytes).
async fn read_request(input: impl AsyncRead + Unpin) -> Result<Request, String> {
    let mut body = Vec::new();
    input
        .take(MAX_REQUEST as u64 + 1)
        .read_to_end(&mut body)
        .await
        .map_err(|e| format!("the request could not be read: {e}"))?;
    if body.len() > MAX_REQUEST {
        return Err(format!("the request is larger than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(&body)
        .map_err(|e| format!("the request is not an alert relay request: {e}"))
}

/// Delivers a checked request.
async fn deliver(req: &Request, programs: &Programs) -> Result<(), String> {
    let (door, message, done) = match req {
        Request::Pve { message } => (
            "PVE's notification system",
            message,
            super::pve::deliver(&programs.pve_helper, message).await,
        ),
        Request::Mail { message, to, from } => (
            "sendmail",
            message,
            super::mail::deliver(&programs.sendmail, to, from.as_deref(), message).await,
        ),
    };
    let (kind, state) = (&message.kind, &message.state);
    match &done {
        Ok(()) => tracing::info!(
            alert_kind = kind,
            alert_state = state,
            "alert handed to {door}"
        ),
        Err(e) => {
            tracing::warn!(alert_kind = kind, alert_state = state, error = %e, "alert not delivered by {door}")
        }
    }
    done.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in sendmail recording its arguments and stdin in `dir`, failing with
    /// `fail` on stderr when it is given.
    fn sendmail(dir: &Path, fail: Option<&str>) -> PathBuf {
        let p = dir.join("sendmail");
        let tail = match fail {
            Some(why) => format!("echo '{why}' >&2\nexit 75\n"),
            None => String::new(),
        };
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\necho \"$@\" > '{0}/args'\ncat > '{0}/mail'\n{tail}",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A listener on a temporary unix socket standing for `signet-notify.socket`: each
    /// connection is served as `signet-notify@.service` serves it.
    fn relay_at(dir: &Path, programs: Programs) -> PathBuf {
        let sock = dir.join("notify.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (r, w) = conn.into_split();
                serve(r, w, &programs).await;
            }
        });
        sock
    }

    fn mail(message: Message) -> Request {
        Request::Mail {
            message,
            to: vec!["root".into(), "ops@example.org".into()],
            from: Some("signet@pve1".into()),
        }
    }

    #[tokio::test]
    async fn alerts_relay_delivers_a_mail_and_says_ok() {
        let dir = tempfile::tempdir().unwrap();
        let programs = Programs {
            pve_helper: "/nonexistent/signet-notify".into(),
            sendmail: sendmail(dir.path(), None),
        };
        let sock = relay_at(dir.path(), programs.clone());
        let sm = programs.sendmail.as_path();
        assert_eq!(route(&sock, sm, sm), Some(sock.as_path()));
        send(&sock, &mail(crate::adapters::alerts::sample()))
            .await
            .unwrap();
        let got = std::fs::read_to_string(dir.path().join("mail")).unwrap();
        assert!(
            got.starts_with("From: signet@pve1\nTo: root, ops@example.org\nSubject: Signet on pve1: the signing token is lost\n"),
            "{got}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("args")).unwrap(),
            "-t -oi\n"
        );
    }

    #[tokio::test]
    async fn alerts_relay_failed_delivery_comes_back_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let programs = Programs {
            pve_helper: "/nonexistent/signet-notify".into(),
            sendmail: sendmail(
                dir.path(),
                Some("postdrop: unable to look up public/pickup"),
            ),
        };
        let sock = relay_at(dir.path(), programs);
        let e = send(&sock, &mail(crate::adapters::alerts::sample()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("postdrop: unable to look up public/pickup")
                && e.contains("75")
                && e.contains("signet-notify@"),
            "{e}"
        );
        // The PVE door's helper is missing: its error and fix come back.
        let e = send(
            &sock,
            &Request::Pve {
                message: crate::adapters::alerts::sample(),
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent/signet-notify could not be started"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn alerts_relay_refuses_what_is_not_a_checked_request() {
        let dir = tempfile::tempdir().unwrap();
        let programs = Programs {
            pve_helper: "/nonexistent/signet-notify".into(),
            sendmail: sendmail(dir.path(), None),
        };
        let ask = |body: Vec<u8>| {
            let programs = programs.clone();
            async move {
                let mut out = Vec::new();
                let ok = serve(body.as_slice(), &mut out, &programs).await;
                (ok, String::from_utf8(out).unwrap())
            }
        };
        let good = serde_json::to_value(mail(crate::adapters::alerts::sample())).unwrap();
        let with = |key: &str, v: serde_json::Value| {
            let mut r = good.clone();
            r[key] = v;
            serde_json::to_vec(&r).unwrap()
        };
        let mut bad_sev = good.clone();
        bad_sev["message"]["severity"] = "panic".into();
        let mut bad_kind = good.clone();
        bad_kind["message"]["kind"] = "token lost; rm -rf /".into();
        let mut extra = good.clone();
        extra["message"]["program"] = "/bin/sh".into();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "not an alert relay request"),
            (vec![b' '; MAX_REQUEST + 1], "larger than"),
            (with("door", "exec".into()), "not an alert relay request"),
            (
                with("sendmail", "/bin/sh".into()),
                "not an alert relay request",
            ),
            (
                serde_json::to_vec(&extra).unwrap(),
                "not an alert relay request",
            ),
            (with("to", serde_json::json!([])), "1 to 32 addresses"),
            (
                with("to", serde_json::json!(["root\nBcc: x@y"])),
                "is not a mail address",
            ),
            (with("from", "-oQ/tmp/evil".into()), ""),
            (serde_json::to_vec(&bad_sev).unwrap(), "severity \"panic\""),
            (serde_json::to_vec(&bad_kind).unwrap(), "lowercase name"),
        ];
        for (body, why) in cases {
            let (ok, out) = ask(body).await;
            if why.is_empty() {
                // An address is a header value here, never an argument: sendmail's
                // arguments stay -t -oi.
                assert!(ok, "{out}");
                assert_eq!(
                    std::fs::read_to_string(dir.path().join("args")).unwrap(),
                    "-t -oi\n"
                );
                continue;
            }
            assert!(!ok, "{why}: {out}");
            assert!(
                out.starts_with("failed: ") && out.contains(why),
                "{why}: {out}"
            );
            assert_eq!(out.lines().count(), 1, "{out}");
        }
        assert!(std::fs::read_to_string(dir.path().join("mail"))
            .unwrap()
            .contains("From: -oQ/tmp/evil\n"));
    }

    #[tokio::test]
    async fn alerts_relay_absent_or_mute_is_a_failed_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("notify.sock");
        // No socket: targets run their program themselves.
        let p = Path::new("/usr/sbin/sendmail");
        assert_eq!(route(&sock, p, p), None);
        let e = send(&sock, &mail(crate::adapters::alerts::sample()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("could not be reached") && e.contains("signet-notify.socket"),
            "{e}"
        );
        // A relay that closes without a verdict.
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut req = Vec::new();
                let _ = conn.read_to_end(&mut req).await;
            }
        });
        let e = send(&sock, &mail(crate::adapters::alerts::sample()))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no answer"), "{e}");
        // A program other than the relay's own is run by the target itself.
        assert_eq!(route(&sock, Path::new("/usr/bin/msmtp"), p), None);
        assert_eq!(route(&sock, p, p), Some(sock.as_path()));
    }
}

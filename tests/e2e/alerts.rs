//! Operators are told, with real processes: signetd, the agent and a SoftHSM token,
//! alerts delivered to a stand-in sendmail (a script in the test's directory that
//! appends its stdin to a file) and to a webhook receiver on 127.0.0.1:0. A PIN the
//! token refused, a token lost and an agent gone are each raised once and resolved
//! once, on both targets; a token that comes and goes inside the hold-down raises
//! nothing new.

use std::io::{Read, Write};
use std::sync::mpsc;

use serde_json::Value;

use super::*;

/// A webhook receiver on 127.0.0.1:0: every request's head and JSON body, in order.
struct Hook {
    port: u16,
    got: mpsc::Receiver<(String, Value)>,
    seen: Vec<(String, Value)>,
}

impl Hook {
    fn start() -> Hook {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, got) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len || n == 0 {
                            break (head.to_owned(), body.to_owned());
                        }
                    } else if n == 0 {
                        break (text, String::new());
                    }
                };
                let _ = s.write_all(
                    b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                let body = serde_json::from_str(&body).unwrap_or(Value::Null);
                if tx.send((head, body)).is_err() {
                    return;
                }
            }
        });
        Hook {
            port,
            got,
            seen: Vec::new(),
        }
    }

    /// Waits for the next notice of `kind` in `state` (keeping every notice received).
    fn wait(&mut self, kind: &str, state: &str) -> Value {
        loop {
            let (head, v) = self.got.recv_timeout(EVENT_TIMEOUT).unwrap_or_else(|_| {
                panic!("no {kind} {state} at the webhook; got {:#?}", self.seen)
            });
            self.seen.push((head, v.clone()));
            if v["kind"] == kind && v["state"] == state {
                return v;
            }
        }
    }

    /// How many notices of `kind` in `state` arrived so far.
    fn count(&self, kind: &str, state: &str) -> usize {
        self.seen
            .iter()
            .filter(|(_, v)| v["kind"] == kind && v["state"] == state)
            .count()
    }
}

/// A sendmail that appends each message to `mail.log`, and the file.
fn stand_in_sendmail(w: &World) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let log = w.path("mail.log");
    let program = w.path("sendmail");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = '-t -oi' ] || {{ echo \"unexpected arguments: $*\" >&2; exit 64; }}\n{{ cat; echo '=== end of message ==='; }} >> '{}'\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    (program, log)
}

/// The (kind, state) of every mail sent so far, in order.
fn mails(log: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.split("=== end of message ===\n")
        .filter(|m| !m.trim().is_empty())
        .map(|m| {
            let header = |name: &str| {
                m.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            };
            (header("X-Signet-Alert:"), header("X-Signet-State:"))
        })
        .collect()
}

fn count_mails(log: &std::path::Path, kind: &str, state: &str) -> usize {
    mails(log)
        .iter()
        .filter(|(k, s)| k == kind && s == state)
        .count()
}

/// The host's PIN file, as root keeps it.
fn host_pin(w: &World, pin: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = w.path("host-token.pin");
    std::fs::write(&path, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The webhook's bearer token, in a private file.
fn webhook_token(w: &World) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = w.path("webhook.token");
    std::fs::write(&path, "hook-s3cret-42\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The daemon's configuration around `[alerts]` with both targets.
fn config(
    w: &World,
    hook: &Hook,
    sendmail: &std::path::Path,
    pin_file: Option<&std::path::Path>,
    hold_down: u64,
) -> String {
    format!(
        "{}[profiles.release]\ndescription = \"Signet test\"\n\
         [alerts]\npve = \"off\"\nsendmail = \"{}\"\nmail_to = [\"root\"]\n\
         webhook = \"http://127.0.0.1:{}/signet/hook\"\nwebhook_token_file = \"{}\"\n\
         token_lost_seconds = 0\nagent_unreachable_seconds = 0\nhold_down_seconds = {hold_down}\n",
        pin_file
            .map(|p| format!("pin_file = \"{}\"\n", p.display()))
            .unwrap_or_default(),
        sendmail.display(),
        hook.port,
        webhook_token(w).display(),
    )
}

fn unix(w: &World, name: &str) -> String {
    format!("unix:{}", w.path(name).display())
}

/// How many timeline entries `event` the daemon has logged.
fn logged_events(w: &World, event: &str) -> usize {
    let log = w.log("signetd");
    log.matches(&format!("event=\"{event}\"")).count()
        + log.matches(&format!("event={event} ")).count()
}

#[test]
fn alerts_a_refused_pin_and_a_lost_token_are_told_once_and_resolved_once() {
    let mut w = World::new();
    let mut hook = Hook::start();
    let (sendmail, mail_log) = stand_in_sendmail(&w);
    // The agent has no PIN of its own: the host gives it one, wrong at first.
    let agent = w.start_agent_config(&unix(&w, "agent.sock"), SOFTHSM, None, &[], "");
    let pin_file = host_pin(&w, "000000");
    let cfg = config(&w, &hook, &sendmail, Some(&pin_file), 0);
    w.start_daemon_with(&[&unix(&w, "signetd.sock")], &agent, &cfg);

    let raised = hook.wait("pin-rejected", "raised");
    assert_eq!(raised["severity"], "error", "{raised}");
    assert!(
        raised["detail"].as_str().unwrap().contains("PIN rejected"),
        "{raised}"
    );
    let (head, _) = hook.seen.last().unwrap();
    assert!(
        head.starts_with("POST /signet/hook HTTP/1.1\r\n")
            && head
                .to_ascii_lowercase()
                .contains("authorization: bearer hook-s3cret-42"),
        "{head}"
    );
    // The operator fixes the PIN file: the agent logs in, the incident is over.
    host_pin(&w, PIN);
    let resolved = hook.wait("pin-rejected", "resolved");
    assert_eq!(resolved["severity"], "info", "{resolved}");
    assert_eq!(resolved["since"], raised["since"], "one incident");

    // The token goes, and comes back.
    let tokens = TokenDir::of(&w);
    tokens.vanish();
    let lost = hook.wait("token-lost", "raised");
    assert_eq!(lost["severity"], "warning", "{lost}");
    tokens.restore();
    hook.wait("token-lost", "resolved");

    // Each once at the webhook, and by mail (delivered in the same order).
    for (kind, state) in [
        ("pin-rejected", "raised"),
        ("pin-rejected", "resolved"),
        ("token-lost", "raised"),
        ("token-lost", "resolved"),
    ] {
        assert_eq!(
            hook.count(kind, state),
            1,
            "{kind} {state}: {:#?}",
            hook.seen
        );
    }
    wait_until("the token's resolved notice by mail", || {
        count_mails(&mail_log, "token-lost", "resolved") > 0
    });
    for (kind, state) in [
        ("pin-rejected", "raised"),
        ("pin-rejected", "resolved"),
        ("token-lost", "raised"),
        ("token-lost", "resolved"),
    ] {
        assert_eq!(
            count_mails(&mail_log, kind, state),
            1,
            "{kind} {state}: {:?}",
            mails(&mail_log)
        );
    }
    let mail = std::fs::read_to_string(&mail_log).unwrap();
    assert!(mail.contains("To: root\n"), "{mail}");
    let log = w.log("signetd");
    assert!(
        !log.contains("hook-s3cret-42"),
        "the webhook's token is never logged"
    );
    assert!(!log.contains("/signet/hook"), "nor the webhook's path");
    assert!(!log.contains("000000"), "nor the PIN");
}

#[test]
fn alerts_a_token_flapping_inside_the_hold_down_raises_nothing_new() {
    let mut w = World::new();
    let mut hook = Hook::start();
    let (sendmail, mail_log) = stand_in_sendmail(&w);
    let pin = w.path("pin");
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &pin, &[]);
    let mut events = Events::follow(&agent);
    w.start_daemon_with(
        &[&unix(&w, "signetd.sock")],
        &agent,
        &config(&w, &hook, &sendmail, None, 3600),
    );
    let tokens = TokenDir::of(&w);
    tokens.vanish();
    hook.wait("token-lost", "raised");
    // Back, gone again and back, all within the hour's hold-down; each seen by the
    // agent and on the daemon's timeline.
    tokens.restore();
    events.wait_for("logged_in");
    wait_until("the return on the timeline", || {
        logged_events(&w, "token_back") == 1
    });
    tokens.vanish();
    events.wait_for("token_lost");
    wait_until("the second loss on the timeline", || {
        logged_events(&w, "token_lost") == 2
    });
    tokens.restore();
    events.wait_for("logged_in");
    wait_until("the second return on the timeline", || {
        logged_events(&w, "token_back") == 2
    });

    // A reload without the hold-down: the incident, clear since the return, is
    // resolved. Notices go out in order, so anything the flapping raised came before.
    let cfg = std::fs::read_to_string(w.path("signetd.toml"))
        .unwrap()
        .replace("hold_down_seconds = 3600", "hold_down_seconds = 0");
    std::fs::write(w.path("signetd.toml"), cfg).unwrap();
    w.hangup("signetd");
    hook.wait("token-lost", "resolved");
    assert_eq!(hook.count("token-lost", "raised"), 1, "{:#?}", hook.seen);
    assert_eq!(hook.count("token-lost", "resolved"), 1, "{:#?}", hook.seen);
    wait_until("the resolved notice by mail", || {
        count_mails(&mail_log, "token-lost", "resolved") > 0
    });
    assert_eq!(
        count_mails(&mail_log, "token-lost", "raised"),
        1,
        "{:?}",
        mails(&mail_log)
    );
    assert_eq!(count_mails(&mail_log, "token-lost", "resolved"), 1);
}

#[test]
fn alerts_check_config_accepts_the_section_and_names_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    let hook = Hook::start();
    let (sendmail, _) = stand_in_sendmail(&w);
    let base = format!("agent = \"{}\"\ndbus = \"none\"\n", unix(&w, "agent.sock"));
    let good = format!("{base}{}", config(&w, &hook, &sendmail, None, 600));
    w.write_daemon_config(&good);
    let out = w.signetd(&["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The webhook's token open to others.
    std::fs::set_permissions(
        w.path("webhook.token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = w.signetd(&["check-config"]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("webhook_token_file") && stderr(&out).contains("chmod 0600"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("hook-s3cret-42"), "{}", stderr(&out));

    for (bad, key, fix) in [
        (
            "[alerts]\nwebhook = \"ftp://x/\"\n",
            "alerts.webhook",
            "https://",
        ),
        (
            "[alerts]\nsendmail = \"/usr/sbin/sendmail\"\n",
            "alerts.mail_to",
            "mail_to = [",
        ),
        (
            "[alerts]\nspool_percent = 101\n",
            "alerts.spool_percent",
            "1 to 100",
        ),
        (
            "[alerts]\nhold_down = 5\n",
            "hold_down",
            "hold_down_seconds",
        ),
    ] {
        w.write_daemon_config(&format!("{base}{bad}"));
        let out = w.signetd(&["check-config"]);
        assert_eq!(code(&out), 1, "{bad}");
        let e = stderr(&out);
        assert!(e.contains(key) && e.contains(fix), "{bad}: {e}");
    }
}

#[test]
fn alerts_an_unreachable_agent_is_told_once_and_resolved_once() {
    let mut w = World::new();
    let mut hook = Hook::start();
    let (sendmail, mail_log) = stand_in_sendmail(&w);
    let pin = w.path("pin");
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &pin, &[]);
    w.start_daemon_with(
        &[&unix(&w, "signetd.sock")],
        &agent,
        &config(&w, &hook, &sendmail, None, 0),
    );
    wait_until("signing works", || fetch_status_ready(&w));
    w.kill("signet-agent");
    let down = hook.wait("agent-unreachable", "raised");
    assert_eq!(down["severity"], "warning", "{down}");
    w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &pin, &[]);
    hook.wait("agent-unreachable", "resolved");
    assert_eq!(
        hook.count("agent-unreachable", "raised"),
        1,
        "{:#?}",
        hook.seen
    );
    wait_until("the resolved notice by mail", || {
        count_mails(&mail_log, "agent-unreachable", "resolved") > 0
    });
    assert_eq!(count_mails(&mail_log, "agent-unreachable", "raised"), 1);
}

/// Whether the daemon's status says signing works.
fn fetch_status_ready(w: &World) -> bool {
    let ep = Endpoint::Unix(w.path("signetd.sock"));
    let (_, s) = call_json(&ep, "GET", "/v1/status", None);
    s["signing_works"] == true
}

#[test]
fn alerts_an_incident_open_across_a_restart_is_not_raised_again_and_resolved_once() {
    let mut w = World::new();
    let mut hook = Hook::start();
    let (sendmail, _) = stand_in_sendmail(&w);
    let agent = w.start_agent_config(&unix(&w, "agent.sock"), SOFTHSM, None, &[], "");
    let pin_file = host_pin(&w, "000000");
    let cfg = config(&w, &hook, &sendmail, Some(&pin_file), 0);
    w.start_daemon_with(&[&unix(&w, "signetd.sock")], &agent, &cfg);
    hook.wait("pin-rejected", "raised");
    assert!(
        std::fs::read_to_string(w.path("state/alerts.json"))
            .unwrap()
            .contains("pin-rejected"),
        "the open incident is kept"
    );
    // signetd dies and comes back while the PIN is still the refused one.
    w.kill("signetd");
    w.restart_daemon();
    wait_until("the restarted daemon sees the refused PIN", || {
        let ep = Endpoint::Unix(w.path("signetd.sock"));
        let (_, s) = call_json(&ep, "GET", "/v1/status", None);
        s["agent"]["health"]["state"] == "pin_rejected"
    });
    host_pin(&w, PIN);
    hook.wait("pin-rejected", "resolved");
    assert_eq!(hook.count("pin-rejected", "raised"), 1, "{:#?}", hook.seen);
    assert_eq!(
        hook.count("pin-rejected", "resolved"),
        1,
        "{:#?}",
        hook.seen
    );
}

//! Text renderings of the wire types for people, shared by `signet` and `signetctl`
//! so every front says the same thing the same way.

use std::fmt::Write;

use crate::wire::{AgentReport, DaemonStatus, HostToken, PinFlags, TokenPlace, TokensReport};

/// `signet status` / `signetctl status` as text: a verdict line, then the profiles,
/// the agent, the token, its PIN counter and certificates. `source` names where the
/// status came from (an endpoint, a bus).
pub fn status_text(status: &DaemonStatus, source: &str, color: bool) -> String {
    let mut out = String::new();
    let verdict = if status.signing_works {
        "signing works"
    } else {
        "signing does NOT work"
    };
    let verdict = match (color, status.signing_works) {
        (true, true) => format!("\x1b[32m{verdict}\x1b[0m"),
        (true, false) => format!("\x1b[31m{verdict}\x1b[0m"),
        _ => verdict.to_owned(),
    };
    let _ = writeln!(out, "Signet {} at {source}: {verdict}", status.version);
    for f in &status.faults {
        let _ = writeln!(out, "  FAULT:    {f}");
    }
    let _ = writeln!(
        out,
        "  profiles: {} (default: {})",
        status.profiles.join(", "),
        status.default_profile.as_deref().unwrap_or("-")
    );
    if let Some(q) = &status.queue {
        let running = q
            .running
            .as_ref()
            .map(|j| format!(", job {j} at the token"))
            .unwrap_or_default();
        let _ = writeln!(out, "  queue:    {} waiting{running}", q.waiting);
    }
    match &status.agent {
        AgentReport::Reachable { endpoint, health } => {
            let state = serde_json::to_string(&health.state).unwrap_or_default();
            let _ = writeln!(
                out,
                "  agent:    {endpoint}, {}, {}",
                health.signer,
                state.trim_matches('"')
            );
            if let Some(t) = &health.token {
                let _ = writeln!(
                    out,
                    "  token:    \"{}\" serial {} ({} {})",
                    t.label, t.serial, t.manufacturer, t.model
                );
            }
            if let Some(pin) = &health.pin {
                let _ = writeln!(out, "  PIN:      {}", pin_flags_text(pin));
            }
            for c in &health.certificates {
                let left = match c.days_left {
                    d if d < 0 => format!("EXPIRED {} days ago", -d),
                    d => format!("in {d} days"),
                };
                let _ = writeln!(
                    out,
                    "  cert:     {} expires {} ({left})",
                    c.subject, c.not_after
                );
            }
            if let Some((why, fix)) = health.windows.as_ref().and_then(|w| w.problem()) {
                let _ = writeln!(out, "  RDP:      {why}");
                let _ = writeln!(out, "            fix: {fix}");
            }
            let _ = writeln!(out, "            {}", health.detail);
        }
        AgentReport::Unreachable { endpoint, error } => {
            let _ = writeln!(out, "  agent:    {endpoint} unreachable");
            let _ = writeln!(out, "            {}", error.message);
        }
    }
    if let Some(t) = &status.tokens {
        out.push_str(&passthrough_lines(t, "  usb:      "));
    }
    if let Some(e) = status.recovery.last() {
        let took = e
            .duration_ms
            .map(|ms| format!(" ({:.1} s)", ms as f64 / 1000.0))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  recovery: {} {}{took}: {}",
            e.time, e.event, e.detail
        );
    }
    out
}

/// `signetctl tokens` as text: one block per token (serial, model, host port, place,
/// the last change and why), or why tokens are not followed.
pub fn tokens_text(report: &TokensReport) -> String {
    passthrough_lines(report, "")
}

fn passthrough_lines(report: &TokensReport, lead: &str) -> String {
    let mut out = String::new();
    let pad = " ".repeat(lead.len());
    if !report.watching {
        let _ = writeln!(out, "{lead}tokens are not followed on this host");
    }
    if let Some(d) = &report.detail {
        let _ = writeln!(out, "{pad}{d}");
    }
    if report.watching && report.tokens.is_empty() {
        let _ = writeln!(out, "{lead}no tokens plugged in or configured");
    }
    for (i, t) in report.tokens.iter().enumerate() {
        let first = if i == 0 { lead } else { pad.as_str() };
        let _ = writeln!(out, "{first}{}", token_line(t));
        let _ = writeln!(
            out,
            "{pad}  since {}: {}",
            t.last_change.at, t.last_change.reason
        );
        if let TokenPlace::Conflict { conflicts } = &t.place {
            for c in conflicts {
                let _ = writeln!(out, "{pad}  conflict: {c}");
            }
        }
    }
    out
}

/// `SERIAL  MODEL  at BUS-PORT  PLACE  (assigned to VM N)`.
fn token_line(t: &HostToken) -> String {
    let mut line = t.serial.clone();
    if let Some(m) = &t.model {
        let _ = write!(line, "  {m}");
    } else if let Some(id) = &t.usb_id {
        let _ = write!(line, "  smart-card device {id} (not a known model)");
    }
    if let Some(p) = &t.host_port {
        let _ = write!(line, "  at {p}");
    }
    let _ = write!(line, "  {}", t.place.words());
    match t.assigned_vm {
        Some(vm) if !matches!(t.place, TokenPlace::Attached { vmid } | TokenPlace::Attaching { vmid, .. } if vmid == vm) =>
        {
            let _ = write!(line, " (belongs to VM {vm})");
        }
        Some(_) => {}
        None => line.push_str(" (not assigned to a VM)"),
    }
    line
}

/// The token's PIN counter flags in words: "ok", or each flag that is set.
pub fn pin_flags_text(f: &PinFlags) -> String {
    let set: Vec<&str> = [
        (f.locked, "LOCKED"),
        (
            f.final_try,
            "FINAL TRY (one more wrong PIN locks the token)",
        ),
        (f.count_low, "count low (a wrong PIN was entered)"),
        (f.to_be_changed, "to be changed"),
    ]
    .into_iter()
    .filter_map(|(on, text)| on.then_some(text))
    .collect();
    if set.is_empty() {
        "ok".to_owned()
    } else {
        set.join(", ")
    }
}

/// What a job sent now waits for, in a few words for a progress line (`signet sign`
/// while its answer is due): `None` when signing works.
pub fn waiting_for(status: &DaemonStatus) -> Option<String> {
    use crate::wire::AgentState;
    if status.signing_works {
        return None;
    }
    let why = match &status.agent {
        AgentReport::Unreachable { .. } => "the signing VM's agent does not answer".to_owned(),
        AgentReport::Reachable { health, .. } => match health.state {
            AgentState::TokenMissing | AgentState::TokenLost => {
                let away = status.tokens.as_ref().and_then(|t| {
                    t.tokens
                        .iter()
                        .find(|t| !matches!(t.place, TokenPlace::Attached { .. }))
                        .map(|t| format!("token {} is {}", t.serial, t.place.words()))
                });
                away.unwrap_or_else(|| "the signing VM's agent sees no token".to_owned())
            }
            AgentState::PinNeeded => "the token waits for its PIN".to_owned(),
            AgentState::PinRejected => {
                "the token refused the PIN; an operator must fix it".to_owned()
            }
            AgentState::PinLocked => "the token is locked; an operator must unlock it".to_owned(),
            AgentState::ModuleError => {
                "the agent cannot load its PKCS#11 module; an operator must fix it".to_owned()
            }
            // The agent is fine; the daemon is not (a drain, another token than the
            // profile pins): its status names it.
            AgentState::Ready => "the appliance; `signet status` says why".to_owned(),
        },
    };
    Some(format!("waiting: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentHealth, AgentState, ErrorBody, ErrorCode, TokenChange, TokenSummary};

    fn healthy() -> DaemonStatus {
        DaemonStatus {
            version: "0.1.0".into(),
            signing_works: true,
            default_profile: Some("release".into()),
            profiles: vec!["release".into(), "nightly".into()],
            agent: AgentReport::Reachable {
                endpoint: "vsock:105:7711".into(),
                health: Box::new(AgentHealth {
                    version: "0.1.0".into(),
                    instance: None,
                    state: AgentState::Ready,
                    detail: "logged in to the token; jobs are signed".into(),
                    module: "/usr/lib/libeTPkcs11.so".into(),
                    module_loaded: true,
                    slot: Some(0),
                    token_present: true,
                    token: Some(TokenSummary {
                        label: "Release".into(),
                        serial: "0123ABCD".into(),
                        model: "eToken".into(),
                        manufacturer: "SafeNet".into(),
                        firmware: "1.0".into(),
                    }),
                    logged_in: true,
                    pin: Some(PinFlags {
                        count_low: true,
                        ..Default::default()
                    }),
                    certificates: vec![],
                    signer: "osslsigncode 2.9".into(),
                    signer_features: None,
                    windows: None,
                }),
            },
            queue: None,
            recovery: vec![],
            tokens: None,
            faults: vec![],
        }
    }

    #[test]
    fn healthy_and_broken_status_read_as_expected() {
        let text = status_text(&healthy(), "unix:/run/signet/signetd.sock", false);
        assert_eq!(
            text,
            "Signet 0.1.0 at unix:/run/signet/signetd.sock: signing works
  profiles: release, nightly (default: release)
  agent:    vsock:105:7711, osslsigncode 2.9, ready
  token:    \"Release\" serial 0123ABCD (SafeNet eToken)
  PIN:      count low (a wrong PIN was entered)
            logged in to the token; jobs are signed
"
        );
        let broken = DaemonStatus {
            signing_works: false,
            agent: AgentReport::Unreachable {
                endpoint: "vsock:105:7711".into(),
                error: ErrorBody::new(ErrorCode::AgentUnavailable, "the agent is not reachable"),
            },
            ..healthy()
        };
        let text = status_text(&broken, "system bus", true);
        assert!(
            text.starts_with("Signet 0.1.0 at system bus: \x1b[31msigning does NOT work\x1b[0m\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "  agent:    vsock:105:7711 unreachable\n            the agent is not reachable\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_waiting_job_says_what_it_waits_for() {
        assert_eq!(waiting_for(&healthy()), None);
        let unreachable = DaemonStatus {
            signing_works: false,
            agent: AgentReport::Unreachable {
                endpoint: "vsock:105:7711".into(),
                error: ErrorBody::new(ErrorCode::AgentUnavailable, "refused"),
            },
            ..healthy()
        };
        assert_eq!(
            waiting_for(&unreachable).as_deref(),
            Some("waiting: the signing VM's agent does not answer")
        );
        let with_state = |state| {
            let mut s = healthy();
            s.signing_works = false;
            if let AgentReport::Reachable { health, .. } = &mut s.agent {
                health.state = state;
            }
            s
        };
        assert_eq!(
            waiting_for(&with_state(AgentState::PinNeeded)).as_deref(),
            Some("waiting: the token waits for its PIN")
        );
        assert_eq!(
            waiting_for(&with_state(AgentState::TokenLost)).as_deref(),
            Some("waiting: the signing VM's agent sees no token")
        );
        assert_eq!(
            waiting_for(&with_state(AgentState::Ready)).as_deref(),
            Some("waiting: the appliance; `signet status` says why")
        );
        assert!(waiting_for(&with_state(AgentState::PinRejected))
            .unwrap()
            .contains("an operator must fix it"));
    }

    #[test]
    fn the_appliances_own_faults_come_right_after_the_verdict() {
        let s = DaemonStatus {
            signing_works: false,
            faults: vec!["jobs cannot be recorded: disk I/O error".into()],
            ..healthy()
        };
        let text = status_text(&s, "system bus", false);
        assert!(
            text.starts_with("Signet 0.1.0 at system bus: signing does NOT work\n  FAULT:    jobs cannot be recorded: disk I/O error\n"),
            "{text}"
        );
    }

    #[test]
    fn the_last_recovery_step_is_shown_with_its_duration() {
        let s = DaemonStatus {
            recovery: vec![crate::wire::TimelineEntry {
                time: "2026-11-23T10:42:00Z".into(),
                event: "token_back".into(),
                detail: "the agent re-initialised PKCS#11 and found the token again".into(),
                duration_ms: Some(3_250),
            }],
            ..healthy()
        };
        assert!(status_text(&s, "x", false).ends_with(
            "  recovery: 2026-11-23T10:42:00Z token_back (3.2 s): the agent re-initialised PKCS#11 and found the token again\n"
        ));
    }

    #[test]
    fn remote_desktop_that_would_hide_the_token_is_shown_with_the_fix() {
        let with = |disabled: bool| {
            let mut s = healthy();
            if let AgentReport::Reachable { health, .. } = &mut s.agent {
                health.windows = Some(crate::wire::WindowsSessions {
                    remote_desktop_active: true,
                    smart_card_redirection_disabled: Some(disabled),
                });
            }
            status_text(&s, "system bus", false)
        };
        let text = with(false);
        assert!(
            text.contains("  RDP:      a Remote Desktop session is connected")
                && text.contains("fix: in the signing VM, turn smart-card redirection off"),
            "{text}"
        );
        assert!(!with(true).contains("RDP:"));
    }

    #[test]
    fn tokens_read_as_expected() {
        let change = |reason: &str| TokenChange {
            at: "2026-11-23T22:00:00Z".into(),
            reason: reason.into(),
        };
        let report = TokensReport {
            watching: true,
            detail: None,
            tokens: vec![
                HostToken {
                    serial: "0123ABCD".into(),
                    model: Some("SafeNet eToken 5110".into()),
                    usb_id: Some("0529:0620".into()),
                    host_port: Some("1-2".into()),
                    assigned_vm: Some(105),
                    place: TokenPlace::Attached { vmid: 105 },
                    last_change: change("attached to VM 105"),
                },
                HostToken {
                    serial: "0456CDEF".into(),
                    model: None,
                    usb_id: Some("1234:5678".into()),
                    host_port: Some("1-3".into()),
                    assigned_vm: None,
                    place: TokenPlace::Conflict {
                        conflicts: vec!["pcscd holds it; stop pcscd".into()],
                    },
                    last_change: change("held on the host"),
                },
                HostToken {
                    serial: "0789".into(),
                    model: None,
                    usb_id: None,
                    host_port: None,
                    assigned_vm: Some(106),
                    place: TokenPlace::Absent,
                    last_change: change("not seen on the host yet"),
                },
            ],
        };
        assert_eq!(
            tokens_text(&report),
            "0123ABCD  SafeNet eToken 5110  at 1-2  attached to VM 105
  since 2026-11-23T22:00:00Z: attached to VM 105
0456CDEF  smart-card device 1234:5678 (not a known model)  at 1-3  conflict (not assigned to a VM)
  since 2026-11-23T22:00:00Z: held on the host
  conflict: pcscd holds it; stop pcscd
0789  absent (belongs to VM 106)
  since 2026-11-23T22:00:00Z: not seen on the host yet
"
        );
        let status = DaemonStatus {
            tokens: Some(TokensReport {
                tokens: report.tokens[..1].to_vec(),
                ..report.clone()
            }),
            ..healthy()
        };
        let text = status_text(&status, "system bus", false);
        assert!(
            text.ends_with(
                "  usb:      0123ABCD  SafeNet eToken 5110  at 1-2  attached to VM 105
              since 2026-11-23T22:00:00Z: attached to VM 105
"
            ),
            "{text}"
        );
        let off = TokensReport {
            watching: false,
            detail: Some("udev is not available: run signetd on the Proxmox host".into()),
            tokens: vec![],
        };
        assert_eq!(
            tokens_text(&off),
            "tokens are not followed on this host\nudev is not available: run signetd on the Proxmox host\n"
        );
    }
}

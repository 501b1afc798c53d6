//! What the pages show, made from the daemon's status and the database: pure.
//!
//! [`verdict`] says in one line whether signing works and, when it does not, what to
//! do — from the agent's health and, when the token is not in the signing VM, from
//! where the host sees it (unplugged, held on the host, on its way in); [`Overview::of`]
//! puts the status into the shape the overview template reads, one line per token
//! ([`HostTokenLine`]: where it is on the host and in which VM, with the agent's view
//! of it when it is the agent's token).

use serde::Serialize;
use signet_api::render::pin_flags_text;
use signet_api::wire::{AgentReport, AgentState, DaemonStatus, HostToken, TokenPlace};

/// Days before a certificate's expiry from which the overview warns.
pub const CERT_WARN_DAYS: i64 = 30;

/// The overview's headline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// A stable name of the situation (`ready`, `token_missing`, `agent_unreachable`,
    /// ...): when it changes, the "since" time starts again.
    pub key: String,
    /// `ok`, `warn` or `bad`: the colour.
    pub level: &'static str,
    pub headline: String,
    /// What to do about it; empty when nothing needs doing.
    pub fix: String,
    /// When the situation began, when the host knows it (ms since the epoch): a
    /// token's last change of place. Otherwise the overview counts from when it saw it.
    pub since_ms: Option<u64>,
}

/// `text` with its first letter in upper case, to follow a full stop.
fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |c| {
        c.to_uppercase().chain(chars).collect::<String>()
    })
}

/// The verdict on `status`.
pub fn verdict(status: &DaemonStatus) -> Verdict {
    let v = |key: &str, level, headline: &str, fix: String| Verdict {
        key: key.to_owned(),
        level,
        headline: headline.to_owned(),
        fix,
        since_ms: None,
    };
    // The appliance's own faults (its database, its audit log) stop signing whatever
    // the token does; each carries its fix.
    if !status.faults.is_empty() {
        return v(
            "appliance_fault",
            "bad",
            "Signing does not work: the appliance has a fault",
            status.faults.join(" "),
        );
    }
    let health = match &status.agent {
        AgentReport::Unreachable { .. } => {
            return v(
                "agent_unreachable",
                "bad",
                "The signing VM's agent is not reachable",
                "Start the signing VM and check that signet-agent runs in it (systemctl status signet-agent); signetd's log says what failed.".into(),
            )
        }
        AgentReport::Reachable { health, .. } => health,
    };
    let detail = sentence(&health.detail);
    if matches!(
        health.state,
        AgentState::TokenMissing | AgentState::TokenLost
    ) {
        if let Some(host) = host_verdict(status) {
            return host;
        }
    }
    match health.state {
        AgentState::Ready => {
            let soonest = health.certificates.iter().map(|c| c.days_left).min();
            match soonest {
                Some(d) if d < 0 => v(
                    "cert_expired",
                    "bad",
                    "The signing certificate has expired",
                    "Signatures made now do not verify without a timestamp from before the expiry; put a renewed certificate on the token.".into(),
                ),
                Some(d) if d <= CERT_WARN_DAYS => v(
                    "cert_expiring",
                    "warn",
                    "Signing works",
                    format!("The signing certificate expires in {d} days; order its renewal now."),
                ),
                _ => v("ready", "ok", "Signing works", String::new()),
            }
        }
        AgentState::TokenMissing => v(
            "token_missing",
            "bad",
            "Token unplugged",
            format!("Plug the token in and pass it to the signing VM. {detail}"),
        ),
        AgentState::TokenLost => v(
            "token_lost",
            "bad",
            "Token lost",
            format!("Signet is waiting for the token to come back and logs in again by itself; jobs wait in the queue. {detail}"),
        ),
        AgentState::PinNeeded => v(
            "pin_needed",
            "bad",
            "No PIN yet",
            format!("Give the agent the token's PIN (its token.pin_file, or POST /agent/v1/login from the host). {detail}"),
        ),
        AgentState::PinRejected => v(
            "pin_rejected",
            "bad",
            "PIN rejected",
            format!("The token refused the configured PIN, and Signet will not try it again: set the right PIN in the agent's PIN file. {detail}"),
        ),
        AgentState::PinLocked => v(
            "pin_locked",
            "bad",
            "PIN locked",
            format!("The token's PIN is locked or on its final try; unlock it with the token's administration tool, then set the PIN again. {detail}"),
        ),
        AgentState::ModuleError => v(
            "module_error",
            "bad",
            "The token's PKCS#11 module does not load",
            format!("Check the agent's token.module setting and that the module is installed in the signing VM. {detail}"),
        ),
    }
}

/// The host token the agent sees in the signing VM: the one with the agent's token
/// serial, else — a token's USB serial need not be its PKCS#11 serial — the only one the
/// host has in a VM, when the agent sees a token at all.
pub fn agents_token(status: &DaemonStatus) -> Option<&HostToken> {
    let tokens = &status.tokens.as_ref()?.tokens;
    let AgentReport::Reachable { health, .. } = &status.agent else {
        return None;
    };
    let serial = &health.token.as_ref()?.serial;
    tokens.iter().find(|t| &t.serial == serial).or_else(|| {
        let mut in_vm = tokens.iter().filter(|t| {
            matches!(
                t.place,
                TokenPlace::Attached { .. } | TokenPlace::Attaching { .. }
            )
        });
        match (in_vm.next(), in_vm.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        }
    })
}

/// The token the verdict is about: the agent's, else the one assigned to a VM, else
/// the only one.
pub fn main_token(status: &DaemonStatus) -> Option<&HostToken> {
    let tokens = &status.tokens.as_ref()?.tokens;
    agents_token(status)
        .or_else(|| tokens.iter().find(|t| t.assigned_vm.is_some()))
        .or_else(|| (tokens.len() == 1).then(|| &tokens[0]))
}

/// An RFC 3339 time in ms since the epoch.
pub fn parse_ms(at: &str) -> Option<u64> {
    let t = signet_api::rfc3339::parse(at)?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The verdict when the signing VM has no token and the host says why: unplugged, held
/// on the host, or on its way in. `None` when the host has it in the VM (or does not
/// follow tokens): then the agent's own words stand.
fn host_verdict(status: &DaemonStatus) -> Option<Verdict> {
    let t = main_token(status)?;
    let since_ms = parse_ms(&t.last_change.at);
    let vm = t
        .assigned_vm
        .map_or_else(|| "its signing VM".to_owned(), |v| format!("VM {v}"));
    let serial = &t.serial;
    let (key, level, headline, fix) = match &t.place {
        TokenPlace::Absent => (
            "token_unplugged",
            "bad",
            "Token unplugged".to_owned(),
            format!("Plug token {serial} into the host; Signet passes it to {vm} by itself."),
        ),
        TokenPlace::Conflict { conflicts } => (
            "token_conflict",
            "bad",
            "Token held on the host".to_owned(),
            format!(
                "Something on the host keeps token {serial} from {vm}: {}",
                conflicts.join("; ")
            ),
        ),
        TokenPlace::OnHost => (
            "token_on_host",
            "bad",
            format!("Token on the host, not in {vm}"),
            format!(
                "{}. Attach it to {vm} (Attach below, or signetctl attach {serial}).",
                sentence(t.last_change.reason.trim_end_matches('.'))
            ),
        ),
        TokenPlace::Attaching { vmid, .. } => (
            "token_attaching",
            "warn",
            format!("Token on its way into VM {vmid}"),
            format!(
                "QEMU takes the device as soon as the host lets go of it; if this lasts, re-attach token {serial}. {}",
                sentence(&t.last_change.reason)
            ),
        ),
        TokenPlace::Attached { .. } => return None,
    };
    Some(Verdict {
        key: key.to_owned(),
        level,
        headline,
        fix,
        since_ms,
    })
}

/// One of the host's tokens as the overview lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostTokenLine {
    pub serial: String,
    /// The model, or what is known instead.
    pub model: String,
    /// `absent`, `on_host`, `attaching`, `attached`, `conflict`: the colour.
    pub state: &'static str,
    /// Where it is on the host: `port 1-2`, `not plugged in`.
    pub host: String,
    /// Which VM has it, and which one it belongs to.
    pub vm: String,
    pub conflicts: Vec<String>,
    /// The last change, `HH:MM UTC`, and why.
    pub changed: String,
    pub reason: String,
    /// What the signing VM's agent sees of it: `present` / `not present` / `—` (another
    /// token, or the agent does not answer).
    pub in_guest: String,
    pub logged_in: String,
    pub pin: String,
    /// The token's certificates, one line each, with their expiry.
    pub certificates: Vec<String>,
    /// Whether an operator's attach, detach or re-attach makes sense now.
    pub can_attach: bool,
    pub can_detach: bool,
    pub can_reattach: bool,
}

fn state_name(p: &TokenPlace) -> &'static str {
    match p {
        TokenPlace::Absent => "absent",
        TokenPlace::OnHost => "on_host",
        TokenPlace::Attaching { .. } => "attaching",
        TokenPlace::Attached { .. } => "attached",
        TokenPlace::Conflict { .. } => "conflict",
    }
}

impl HostTokenLine {
    /// The line for `t`, with `agent`'s view when `t` is the agent's token
    /// ([`agents_token`]).
    pub fn of(t: &HostToken, agent: Option<&signet_api::wire::AgentHealth>) -> Self {
        let agents = agent;
        let assigned = t.assigned_vm.map_or_else(
            || "assigned to no VM".to_owned(),
            |v| format!("belongs to VM {v}"),
        );
        let vm = match &t.place {
            TokenPlace::Attached { vmid } => format!("in VM {vmid} ({assigned})"),
            TokenPlace::Attaching { vmid, accepted } => format!(
                "attaching to VM {vmid}{} ({assigned})",
                if *accepted {
                    ", accepted, not claimed yet"
                } else {
                    ""
                }
            ),
            _ => format!("in no VM ({assigned})"),
        };
        let host = match (&t.place, &t.host_port) {
            (TokenPlace::Absent, _) => "not plugged in".to_owned(),
            (_, Some(port)) => format!(
                "port {port}{}",
                t.usb_id
                    .as_ref()
                    .map(|id| format!(" ({id})"))
                    .unwrap_or_default()
            ),
            (_, None) => "plugged in".to_owned(),
        };
        let changed = parse_ms(&t.last_change.at)
            .map(|ms| format!("{} UTC", time_ms(ms).get(0..16).unwrap_or_default()))
            .unwrap_or_else(|| t.last_change.at.clone());
        let plugged = !matches!(t.place, TokenPlace::Absent);
        let attached = matches!(
            t.place,
            TokenPlace::Attached { .. } | TokenPlace::Attaching { .. }
        );
        HostTokenLine {
            serial: t.serial.clone(),
            model: t.model.clone().unwrap_or_else(|| {
                if t.usb_id.is_some() {
                    "smart-card device (model not in the known-token table)".into()
                } else {
                    "not seen yet".into()
                }
            }),
            state: state_name(&t.place),
            host,
            vm,
            conflicts: match &t.place {
                TokenPlace::Conflict { conflicts } => conflicts.clone(),
                _ => Vec::new(),
            },
            changed,
            reason: t.last_change.reason.clone(),
            in_guest: match agents {
                Some(h) if h.token_present => "present".into(),
                Some(_) => "not present".into(),
                None => "—".into(),
            },
            logged_in: match agents {
                Some(h) if h.logged_in => "yes".into(),
                Some(_) => "no".into(),
                None => "—".into(),
            },
            pin: agents
                .and_then(|h| h.pin.as_ref())
                .map_or_else(|| "—".into(), pin_flags_text),
            certificates: agents
                .map(|h| {
                    h.certificates
                        .iter()
                        .map(|c| {
                            format!(
                                "{}, expires {} ({} days)",
                                c.subject, c.not_after, c.days_left
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            can_attach: plugged && !attached && t.assigned_vm.is_some(),
            can_detach: attached,
            can_reattach: plugged && t.assigned_vm.is_some(),
        }
    }
}

/// A certificate as the overview shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertLine {
    pub subject: String,
    pub issuer: String,
    pub not_after: String,
    pub days_left: i64,
    pub sha256: String,
    pub warn: bool,
}

/// The overview page's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overview {
    pub verdict: Verdict,
    /// When the verdict's situation began, as this daemon saw it (`HH:MM UTC`).
    pub since: Option<String>,
    pub version: String,
    pub agent_reachable: bool,
    pub agent_endpoint: String,
    /// The agent's state and its own words, or why it is unreachable.
    pub agent_state: String,
    pub agent_detail: String,
    pub signer: String,
    pub token: Option<TokenLine>,
    pub logged_in: bool,
    pub pin: String,
    pub certificates: Vec<CertLine>,
    pub running: Option<String>,
    pub waiting: u64,
    /// Jobs not ended: waiting plus the one at the agent.
    pub pending: u64,
    pub by_caller: Vec<(String, u64)>,
    pub spool: String,
    pub signed_last_hour: u64,
    pub default_profile: String,
    pub profiles: String,
    /// The host's tokens; empty when the daemon does not follow them (`tokens_note`
    /// says why).
    pub host_tokens: Vec<HostTokenLine>,
    pub tokens_note: Option<String>,
}

/// The token as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenLine {
    pub label: String,
    pub serial: String,
    pub model: String,
    pub manufacturer: String,
    pub present: bool,
}

impl Overview {
    /// The overview of `status`, with `signed_last_hour` from the audit log.
    pub fn of(status: &DaemonStatus, signed_last_hour: u64) -> Overview {
        let (reachable, endpoint, state, detail, signer, token, logged_in, pin, certs) =
            match &status.agent {
                AgentReport::Unreachable { endpoint, error } => (
                    false,
                    endpoint.clone(),
                    "unreachable".to_owned(),
                    error.message.clone(),
                    String::new(),
                    None,
                    false,
                    "unknown".to_owned(),
                    Vec::new(),
                ),
                AgentReport::Reachable { endpoint, health } => (
                    true,
                    endpoint.clone(),
                    serde_json::to_value(health.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    health.detail.clone(),
                    health.signer.clone(),
                    health.token.as_ref().map(|t| TokenLine {
                        label: t.label.clone(),
                        serial: t.serial.clone(),
                        model: t.model.clone(),
                        manufacturer: t.manufacturer.clone(),
                        present: health.token_present,
                    }),
                    health.logged_in,
                    health
                        .pin
                        .as_ref()
                        .map_or_else(|| "unknown (token absent)".to_owned(), pin_flags_text),
                    health
                        .certificates
                        .iter()
                        .map(|c| CertLine {
                            subject: c.subject.clone(),
                            issuer: c.issuer.clone(),
                            not_after: c.not_after.clone(),
                            days_left: c.days_left,
                            sha256: c.sha256.clone(),
                            warn: c.days_left <= CERT_WARN_DAYS,
                        })
                        .collect(),
                ),
            };
        let queue = status.queue.clone();
        let q = queue.as_ref();
        Overview {
            verdict: verdict(status),
            since: None,
            version: status.version.clone(),
            agent_reachable: reachable,
            agent_endpoint: endpoint,
            agent_state: state,
            agent_detail: detail,
            signer,
            token,
            logged_in,
            pin,
            certificates: certs,
            running: q.and_then(|q| q.running.clone()),
            waiting: q.map_or(0, |q| q.waiting),
            pending: q.map_or(0, |q| q.waiting + u64::from(q.running.is_some())),
            by_caller: q
                .map(|q| q.by_caller.clone().into_iter().collect())
                .unwrap_or_default(),
            spool: q.map_or_else(String::new, |q| {
                format!(
                    "{} of {} used",
                    bytes(q.spool_used_bytes),
                    bytes(q.spool_quota_bytes)
                )
            }),
            signed_last_hour,
            default_profile: status.default_profile.clone().unwrap_or_default(),
            profiles: status.profiles.join(", "),
            host_tokens: status.tokens.as_ref().map_or_else(Vec::new, |r| {
                let health = match &status.agent {
                    AgentReport::Reachable { health, .. } => Some(&**health),
                    AgentReport::Unreachable { .. } => None,
                };
                let agents = agents_token(status).map(|t| t.serial.as_str());
                r.tokens
                    .iter()
                    .map(|t| {
                        HostTokenLine::of(t, health.filter(|_| agents == Some(t.serial.as_str())))
                    })
                    .collect()
            }),
            tokens_note: match &status.tokens {
                None => Some("signetd does not report the host's tokens.".into()),
                Some(r) if !r.watching => Some(format!(
                    "signetd does not follow the host's tokens: {}",
                    r.detail.clone().unwrap_or_default()
                )),
                Some(r) => r.detail.clone(),
            },
        }
    }
}

/// `1 record`, `2 records`.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A byte count for people: `512 B`, `3.4 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn time_ms(ms: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return String::new();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// How long ago `then_ms` was, at `now_ms`: `42 s`, `5 min`, `3 h`, `2 d`.
pub fn age(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_api::wire::{
        AgentHealth, CertificateSummary, ErrorBody, ErrorCode, PinFlags, QueueStatus, TokenSummary,
    };

    fn health(state: AgentState, days_left: i64) -> AgentHealth {
        AgentHealth {
            version: "0.1.0".into(),
            instance: None,
            state,
            detail: "the agent's own words".into(),
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            module_loaded: true,
            slot: Some(0),
            token_present: state != AgentState::TokenMissing,
            token: Some(TokenSummary {
                label: "signet".into(),
                serial: "abc123".into(),
                model: "SoftHSM v2".into(),
                manufacturer: "SoftHSM project".into(),
                firmware: "2.6".into(),
            }),
            logged_in: state == AgentState::Ready,
            pin: Some(PinFlags {
                count_low: state == AgentState::PinRejected,
                ..PinFlags::default()
            }),
            certificates: vec![CertificateSummary {
                subject: "CN=Signet Demo Code Signing".into(),
                not_after: "2027-11-23T00:00:00Z".into(),
                days_left,
                ..CertificateSummary::default()
            }],
            signer: "osslsigncode 2.9".into(),
            signer_features: None,
            windows: None,
        }
    }

    fn status(agent: AgentReport) -> DaemonStatus {
        DaemonStatus {
            version: "0.1.0".into(),
            signing_works: false,
            default_profile: Some("release".into()),
            profiles: vec!["release".into(), "nightly".into()],
            agent,
            queue: Some(QueueStatus {
                running: Some("7".into()),
                waiting: 2,
                by_caller: [("vm:105".to_owned(), 2)].into(),
                recent_job_ms: None,
                spool_used_bytes: 3 << 20,
                spool_quota_bytes: 2 << 30,
            }),
            recovery: vec![],
            tokens: None,
            faults: vec![],
        }
    }

    fn reachable(state: AgentState, days_left: i64) -> DaemonStatus {
        status(AgentReport::Reachable {
            endpoint: "unix:/run/agent.sock".into(),
            health: Box::new(health(state, days_left)),
        })
    }

    #[test]
    fn every_agent_state_has_a_plain_verdict_with_a_fix() {
        let ready = verdict(&reachable(AgentState::Ready, 300));
        assert_eq!(
            (ready.key.as_str(), ready.level, ready.headline.as_str()),
            ("ready", "ok", "Signing works")
        );
        assert!(ready.fix.is_empty());
        let soon = verdict(&reachable(AgentState::Ready, 12));
        assert_eq!((soon.key.as_str(), soon.level), ("cert_expiring", "warn"));
        assert!(soon.fix.contains("12 days"), "{}", soon.fix);
        let gone = verdict(&reachable(AgentState::Ready, -1));
        assert_eq!((gone.key.as_str(), gone.level), ("cert_expired", "bad"));
        for (state, key, headline) in [
            (AgentState::TokenMissing, "token_missing", "Token unplugged"),
            (AgentState::TokenLost, "token_lost", "Token lost"),
            (AgentState::PinNeeded, "pin_needed", "No PIN yet"),
            (AgentState::PinRejected, "pin_rejected", "PIN rejected"),
            (AgentState::PinLocked, "pin_locked", "PIN locked"),
            (
                AgentState::ModuleError,
                "module_error",
                "The token's PKCS#11 module does not load",
            ),
        ] {
            let v = verdict(&reachable(state, 300));
            assert_eq!(
                (v.key.as_str(), v.level, v.headline.as_str()),
                (key, "bad", headline)
            );
            assert!(
                v.fix.ends_with(". The agent's own words"),
                "{state:?}: {}",
                v.fix
            );
        }
        let unreachable = verdict(&status(AgentReport::Unreachable {
            endpoint: "vsock:105:7711".into(),
            error: ErrorBody::new(ErrorCode::AgentUnavailable, "not reachable"),
        }));
        assert_eq!(unreachable.key, "agent_unreachable");
        assert!(unreachable.fix.contains("signing VM"));
        // The appliance's own fault comes first, even with a ready token.
        let mut faulty = reachable(AgentState::Ready, 300);
        faulty.faults = vec!["the disk under /var/lib/signet is full; free space".into()];
        let f = verdict(&faulty);
        assert_eq!((f.key.as_str(), f.level), ("appliance_fault", "bad"));
        assert!(f.headline.contains("does not work"), "{}", f.headline);
        assert!(
            f.fix.contains("disk under /var/lib/signet is full"),
            "{}",
            f.fix
        );
    }

    #[test]
    fn the_overview_carries_token_pin_certificate_and_queue() {
        let o = Overview::of(&reachable(AgentState::PinRejected, 20), 9);
        assert_eq!(o.token.as_ref().unwrap().serial, "abc123");
        assert!(!o.logged_in);
        assert!(o.pin.contains("count low"), "{}", o.pin);
        assert!(o.certificates[0].warn);
        assert_eq!(
            (o.running.as_deref(), o.waiting, o.pending),
            (Some("7"), 2, 3)
        );
        assert_eq!(o.by_caller, vec![("vm:105".to_owned(), 2)]);
        assert_eq!(o.spool, "3.0 MiB of 2.0 GiB used");
        assert_eq!(o.signed_last_hour, 9);
        assert_eq!(o.profiles, "release, nightly");
        let down = Overview::of(
            &status(AgentReport::Unreachable {
                endpoint: "vsock:105:7711".into(),
                error: ErrorBody::new(ErrorCode::AgentUnavailable, "not reachable"),
            }),
            0,
        );
        assert!(!down.agent_reachable && down.token.is_none());
        assert_eq!(down.agent_state, "unreachable");
    }

    #[test]
    fn times_ages_and_sizes_read_well() {
        assert_eq!(time_ms(0), "1970-01-01 00:00:00");
        assert_eq!(time_ms(1_795_392_000_000), "2026-11-23 00:00:00");
        assert_eq!(age(61_000, 0), "1 min");
        assert_eq!(age(5_000, 0), "5 s");
        assert_eq!(age(7_200_000, 0), "2 h");
        assert_eq!(age(0, 5_000), "0 s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(count(1, "record"), "1 record");
        assert_eq!(count(0, "record"), "0 records");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    fn with_host_token(state: AgentState, place: TokenPlace) -> DaemonStatus {
        let mut s = reachable(state, 300);
        s.tokens = Some(signet_api::wire::TokensReport {
            watching: true,
            detail: None,
            tokens: vec![HostToken {
                serial: "abc123".into(),
                model: Some("SafeNet eToken 5110".into()),
                usb_id: Some("0529:0620".into()),
                host_port: (place != TokenPlace::Absent).then(|| "1-2".to_owned()),
                assigned_vm: Some(105),
                place,
                last_change: signet_api::wire::TokenChange {
                    at: "2026-11-23T10:42:00Z".into(),
                    reason: "unplugged".into(),
                },
            }],
        });
        s
    }

    #[test]
    fn the_hosts_view_of_the_token_explains_a_missing_token_and_dates_it() {
        let v = verdict(&with_host_token(
            AgentState::TokenMissing,
            TokenPlace::Absent,
        ));
        assert_eq!(
            (v.key.as_str(), v.headline.as_str()),
            ("token_unplugged", "Token unplugged")
        );
        assert!(
            v.fix.contains("Plug token abc123 into the host"),
            "{}",
            v.fix
        );
        assert!(v.fix.contains("VM 105"), "{}", v.fix);
        assert_eq!(v.since_ms, Some(T0_10_42));
        let held = verdict(&with_host_token(
            AgentState::TokenLost,
            TokenPlace::Conflict {
                conflicts: vec!["interface 1-2:1.0 is held by pcscd; stop it".into()],
            },
        ));
        assert_eq!(held.key, "token_conflict");
        assert!(held.fix.ends_with("held by pcscd; stop it"), "{}", held.fix);
        let on_host = verdict(&with_host_token(
            AgentState::TokenMissing,
            TokenPlace::OnHost,
        ));
        assert_eq!(on_host.headline, "Token on the host, not in VM 105");
        assert!(
            on_host.fix.contains("signetctl attach abc123"),
            "{}",
            on_host.fix
        );
        let coming = verdict(&with_host_token(
            AgentState::TokenMissing,
            TokenPlace::Attaching {
                vmid: 105,
                accepted: true,
            },
        ));
        assert_eq!(
            (coming.key.as_str(), coming.level),
            ("token_attaching", "warn")
        );
        // In the VM, the agent's words stand; a ready agent is not second-guessed.
        let inside = verdict(&with_host_token(
            AgentState::TokenLost,
            TokenPlace::Attached { vmid: 105 },
        ));
        assert_eq!(inside.key, "token_lost");
        let ready = verdict(&with_host_token(AgentState::Ready, TokenPlace::OnHost));
        assert_eq!(ready.key, "ready");
    }

    const T0_10_42: u64 = 1_795_430_520_000;

    #[test]
    fn each_host_token_is_a_line_with_the_agents_view_when_it_is_the_agents() {
        let o = Overview::of(
            &with_host_token(AgentState::Ready, TokenPlace::Attached { vmid: 105 }),
            0,
        );
        let t = &o.host_tokens[0];
        assert_eq!(t.state, "attached");
        assert_eq!(t.host, "port 1-2 (0529:0620)");
        assert_eq!(t.vm, "in VM 105 (belongs to VM 105)");
        assert_eq!(
            (t.in_guest.as_str(), t.logged_in.as_str()),
            ("present", "yes")
        );
        assert_eq!(t.pin, "ok");
        assert!(t.certificates[0].starts_with("CN=Signet Demo Code Signing, expires 2027-11-23"));
        assert_eq!(t.changed, "2026-11-23 10:42 UTC");
        assert!(!t.can_attach && t.can_detach && t.can_reattach);
        assert_eq!(o.tokens_note, None);
        // Another token than the agent's: nothing from the agent.
        let mut s = with_host_token(AgentState::Ready, TokenPlace::Absent);
        if let Some(r) = s.tokens.as_mut() {
            r.tokens[0].serial = "other".into();
            r.watching = false;
            r.detail = Some("no udev".into());
        }
        let o = Overview::of(&s, 0);
        let t = &o.host_tokens[0];
        assert_eq!(
            (t.host.as_str(), t.in_guest.as_str()),
            ("not plugged in", "—")
        );
        assert!(!t.can_attach && !t.can_detach && !t.can_reattach);
        assert!(o.tokens_note.unwrap().ends_with("no udev"));
    }

    #[test]
    fn a_token_whose_usb_serial_is_not_its_pkcs11_serial_is_the_agents_when_it_is_the_only_one_in_a_vm(
    ) {
        let mut s = with_host_token(AgentState::Ready, TokenPlace::Attached { vmid: 105 });
        if let Some(r) = s.tokens.as_mut() {
            r.tokens[0].serial = "USB-0123".into();
        }
        let o = Overview::of(&s, 0);
        assert_eq!(o.host_tokens[0].logged_in, "yes");
        // With a second token in a VM, which one the agent sees is not known.
        if let Some(r) = s.tokens.as_mut() {
            let mut other = r.tokens[0].clone();
            other.serial = "USB-0456".into();
            r.tokens.push(other);
        }
        let o = Overview::of(&s, 0);
        assert!(o.host_tokens.iter().all(|t| t.logged_in == "—"));
        // A token on the host is not the one in the guest.
        let mut s = with_host_token(AgentState::Ready, TokenPlace::OnHost);
        if let Some(r) = s.tokens.as_mut() {
            r.tokens[0].serial = "USB-0123".into();
        }
        assert_eq!(Overview::of(&s, 0).host_tokens[0].in_guest, "—");
    }
}

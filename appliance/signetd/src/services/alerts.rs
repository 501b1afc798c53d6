//! Operators are told: the facts the daemon already has are observed, the alerts' rules
//! ([`crate::core::alerts`], pure) decide what to say, and the doors
//! ([`crate::adapters::alerts`]) say it.
//!
//! What is observed, and where from (nothing here asks the agent itself):
//! - the timeline's entries as they are written ([`crate::services::timeline`]): the
//!   token lost and back, the agent unreachable and back, a PIN the token refused, a
//!   login, the recovery ladder exhausted or recovered;
//! - the one view of the agent ([`AgentSeen`]): the certificates on its token (30 and
//!   7 days before their end) whenever it changes; and its first answer after a start
//!   (ready, token lost or missing, PIN refused or locked), which settles the
//!   incidents a previous run left open (until then, an agent that does not answer). After that the timeline alone says the
//!   token's, the PIN's and the agent's conditions: a health read answered just before
//!   an event would otherwise undo it;
//! - every second: the audit head's check ([`Daemon::faults`]) and the spool's use
//!   against its quota ([`crate::services::jobs::JobService::queue_status`]).
//!
//! Each notice is logged (a raised error at `alert = true`), the open incidents are
//! kept in `state_dir/alerts.json`, and the notice goes to an outbox that a task of its
//! own delivers to every target configured in `[alerts]` (PVE's notification system,
//! sendmail, a webhook), each tried a bounded number of times. The outbox is bounded
//! and never waited for: nothing here holds up signing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use signet_api::wire::{AgentHealth, AgentState};
use tokio::sync::mpsc;

use crate::adapters::alerts::{self as doors, relay, state::Kept, DeliveryError, Message};
use crate::config::alerts::{AlertsConfig, PveMode, PVE_NOTIFY_MODULE};
use crate::core::alerts::{Alerts, Key, Kind, Notice, Open, Severity, State};
use crate::services::agent::AgentSeen;
use crate::services::daemon::Daemon;

/// How often the audit head and the spool are looked at, and time passes for the rules.
const TICK: Duration = Duration::from_secs(1);
/// How many notices may wait for delivery; more are logged only.
const OUTBOX: usize = 256;
/// The waits between tries of one delivery: four tries in all, within about a minute.
const RETRY_WAITS: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(10),
    Duration::from_secs(45),
];

/// One observation: the condition, whether it is active, and the words for it.
type Seen = (Key, bool, String);

/// What a timeline entry (its event name and detail) says of the conditions.
pub fn from_entry(event: &str, detail: &str) -> Vec<Seen> {
    let on = |k: Kind| (Key::of(k), true, detail.to_owned());
    let off = |k: Kind| (Key::of(k), false, String::new());
    match event {
        "token_lost" => vec![on(Kind::TokenLost)],
        "token_back" | "recovered" => vec![off(Kind::TokenLost), off(Kind::OperatorNeeded)],
        "logged_in" => vec![
            off(Kind::TokenLost),
            off(Kind::PinRejected),
            off(Kind::OperatorNeeded),
        ],
        "pin_rejected" => vec![on(Kind::PinRejected)],
        "recovery_exhausted" => vec![on(Kind::OperatorNeeded)],
        "agent_unreachable" => vec![on(Kind::AgentUnreachable)],
        "agent_back" => vec![off(Kind::AgentUnreachable)],
        _ => Vec::new(),
    }
}

/// What the agent's health says of the conditions (certificates on a present token:
/// each one's two thresholds; `tracked` are the certificates followed now, cleared
/// when the token no longer holds them).
pub fn from_health(h: &AgentHealth, tracked: &[String]) -> Vec<Seen> {
    let on = |k: Kind| (Key::of(k), true, h.detail.clone());
    let off = |k: Kind| (Key::of(k), false, String::new());
    let mut out = vec![off(Kind::AgentUnreachable)];
    match h.state {
        AgentState::Ready => out.extend([
            off(Kind::TokenLost),
            off(Kind::PinRejected),
            off(Kind::OperatorNeeded),
        ]),
        AgentState::TokenLost | AgentState::TokenMissing => out.push(on(Kind::TokenLost)),
        AgentState::PinRejected | AgentState::PinLocked => out.push(on(Kind::PinRejected)),
        AgentState::PinNeeded | AgentState::ModuleError => {}
    }
    if h.token_present {
        for c in &h.certificates {
            let words = format!(
                "the certificate {} (SHA-256 {}) on the token expires on {}, in {} days: renew it and put the new certificate on the token",
                c.subject, c.sha256, c.not_after, c.days_left
            );
            for (kind, days) in [(Kind::CertExpires30, 30), (Kind::CertExpires7, 7)] {
                let key = Key {
                    kind,
                    subject: c.sha256.clone(),
                };
                out.push((key, c.days_left <= days, words.clone()));
            }
        }
        for sha in tracked {
            if !h.certificates.iter().any(|c| &c.sha256 == sha) {
                for kind in [Kind::CertExpires30, Kind::CertExpires7] {
                    out.push((
                        Key {
                            kind,
                            subject: sha.clone(),
                        },
                        false,
                        String::new(),
                    ));
                }
            }
        }
    }
    out
}

/// Whether the spool's use is at or over `percent` of its quota.
pub fn spool_nearly_full(used: u64, quota: u64, percent: u8) -> bool {
    quota > 0 && u128::from(used) * 100 >= u128::from(quota) * u128::from(percent)
}

/// The message a notice becomes.
pub fn message(n: &Notice, hostname: &str) -> Message {
    Message {
        kind: n.key.kind.name().to_owned(),
        state: n.state.name().to_owned(),
        severity: n.severity.name().to_owned(),
        title: n.key.kind.title().to_owned(),
        detail: match n.state {
            State::Raised => n.detail.clone(),
            State::Resolved => format!("it was: {}", n.detail),
        },
        subject: n.key.subject.clone(),
        since: crate::core::time::rfc3339(n.since_ms),
        at: crate::core::time::rfc3339(n.at_ms),
        hostname: hostname.to_owned(),
    }
}

/// Follows the facts for the daemon's life and tells whoever `[alerts]` names.
/// The timeline is listened to from this call on (before the agent's watcher starts, so
/// its first entries are heard).
pub fn run(daemon: Arc<Daemon>) -> impl std::future::Future<Output = ()> {
    let timeline = daemon.timeline().subscribe();
    async move {
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let mut delivery = tokio::spawn(deliver_all(daemon.clone(), rx));
        tokio::select! {
            ended = &mut delivery => {
                if let Err(e) = ended {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
            () = watch(&daemon, timeline, outbox) => {}
        }
        delivery.abort();
    }
}

async fn watch(
    daemon: &Arc<Daemon>,
    mut timeline: tokio::sync::broadcast::Receiver<signet_api::wire::TimelineEntry>,
    outbox: mpsc::Sender<Message>,
) {
    let mut cfg = daemon.config();
    let dir = cfg.state_dir.clone();
    let hostname = doors::hostname();
    let mut alerts = Alerts::new(cfg.alerts.rules());
    alerts.restore(doors::state::load(&dir).into_iter().filter_map(|k| {
        Some(Open {
            key: Key {
                kind: Kind::from_name(&k.kind)?,
                subject: k.subject,
            },
            since_ms: k.since_ms,
            detail: k.detail,
        })
    }));
    let mut seen = daemon.agent().watch();
    // Whether the agent's view has said its first word since the start.
    let mut settled = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        let now_cfg = daemon.config();
        if !Arc::ptr_eq(&now_cfg, &cfg) {
            cfg = now_cfg;
            alerts.set_rules(cfg.alerts.rules());
        }
        let observed: Vec<Seen> = tokio::select! {
            entry = timeline.recv() => match entry {
                Ok(e) => from_entry(&e.event, &e.detail),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // Entries were missed: the agent's view as it is now settles the
                    // conditions again.
                    tracing::warn!(missed = n, "the alerts missed timeline entries; they take the agent's last health read instead");
                    settled = false;
                    let now = seen.borrow_and_update().clone();
                    of_seen(&now, &alerts, &mut settled)
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            changed = seen.changed(), if !first => {
                if changed.is_err() {
                    return;
                }
                let now = seen.borrow_and_update().clone();
                of_seen(&now, &alerts, &mut settled)
            }
            _ = tick.tick() => {
                if first {
                    first = false;
                    let now = seen.borrow_and_update().clone();
                    let mut out = of_seen(&now, &alerts, &mut settled);
                    out.extend(appliance(daemon, &cfg.alerts));
                    out
                } else {
                    appliance(daemon, &cfg.alerts)
                }
            }
        };
        let now = crate::adapters::store::now_ms();
        let mut notices = Vec::new();
        for (key, active, detail) in observed {
            notices.extend(alerts.observe(key, active, &detail, now));
        }
        notices.extend(alerts.tick(now));
        if notices.is_empty() {
            continue;
        }
        let kept: Vec<Kept> = alerts
            .open()
            .into_iter()
            .map(|o| Kept {
                kind: o.key.kind.name().to_owned(),
                subject: o.key.subject,
                since_ms: o.since_ms,
                detail: o.detail,
            })
            .collect();
        if let Err(e) = doors::state::save(&dir, &kept) {
            tracing::warn!(state_dir = %dir.display(), error = %e, "the open alerts could not be kept; after a restart, alerts still open are raised again");
        }
        for n in &notices {
            let msg = message(n, &hostname);
            log(&msg, n);
            if !cfg.alerts.enabled {
                continue;
            }
            if outbox.try_send(msg).is_err() {
                tracing::warn!(alert_kind = n.key.kind.name(), "too many alerts wait for delivery; this one is in the log only: check that the alert targets in [alerts] answer");
            }
        }
    }
}

/// The conditions the agent's view says. Its first answer since the start settles
/// them all (`settled` then); until then an agent that does not answer is said so;
/// afterwards only the certificates are read from it.
fn of_seen(seen: &AgentSeen, alerts: &Alerts, settled: &mut bool) -> Vec<Seen> {
    match seen {
        AgentSeen::NotYet => Vec::new(),
        AgentSeen::Unreachable(_) if *settled => Vec::new(),
        AgentSeen::Unreachable(e) => {
            vec![(Key::of(Kind::AgentUnreachable), true, e.message.clone())]
        }
        AgentSeen::Answered(h) => {
            let all = from_health(h, &alerts.subjects(Kind::CertExpires30));
            if std::mem::replace(settled, true) {
                all.into_iter()
                    .filter(|(k, _, _)| matches!(k.kind, Kind::CertExpires30 | Kind::CertExpires7))
                    .collect()
            } else {
                all
            }
        }
    }
}

/// The appliance's own conditions: the audit chain and the spool.
fn appliance(daemon: &Daemon, cfg: &AlertsConfig) -> Vec<Seen> {
    let store = daemon.job_service().store_fault();
    let audit: Vec<String> = daemon
        .faults()
        .into_iter()
        .filter(|f| Some(f) != store.as_ref())
        .collect();
    let q = daemon.job_service().queue_status();
    let full = spool_nearly_full(q.spool_used_bytes, q.spool_quota_bytes, cfg.spool_percent);
    vec![
        (
            Key::of(Kind::AuditBroken),
            !audit.is_empty(),
            audit.join("; "),
        ),
        (
            Key::of(Kind::SpoolNearlyFull),
            full,
            format!(
                "the spool holds {} MiB of its {} MiB quota ({} % or more): fetch or cancel finished jobs, or raise queue.spool_quota_mb",
                q.spool_used_bytes >> 20,
                q.spool_quota_bytes >> 20,
                cfg.spool_percent
            ),
        ),
    ]
}

fn log(msg: &Message, n: &Notice) {
    let (kind, state) = (msg.kind.as_str(), msg.state.as_str());
    match (n.state, n.severity) {
        (State::Raised, Severity::Error) => {
            tracing::error!(
                alert = true,
                alert_kind = kind,
                alert_state = state,
                "alert: {}: {}",
                msg.title,
                msg.detail
            )
        }
        (State::Raised, _) => {
            tracing::warn!(
                alert_kind = kind,
                alert_state = state,
                "alert: {}: {}",
                msg.title,
                msg.detail
            )
        }
        (State::Resolved, _) => {
            tracing::info!(alert_kind = kind, alert_state = state, since = %msg.since, "alert resolved: {}", msg.title)
        }
    }
}

/// Where a message goes.
#[derive(Debug, Clone)]
enum Target {
    Pve(PathBuf),
    Mail {
        sendmail: PathBuf,
        to: Vec<String>,
        from: Option<String>,
    },
    Webhook {
        url: crate::config::alerts::WebhookUrl,
        token_file: Option<PathBuf>,
    },
}

impl Target {
    /// Its name in the log: never the webhook's path or query, which may hold a secret.
    fn name(&self) -> String {
        match self {
            Target::Pve(_) => "PVE's notification system".to_owned(),
            Target::Mail { sendmail, .. } => format!("sendmail ({})", sendmail.display()),
            Target::Webhook { url, .. } => format!(
                "the webhook {}://{}:{}/…",
                if url.tls { "https" } else { "http" },
                url.host,
                url.port
            ),
        }
    }

    async fn deliver(&self, msg: &Message) -> Result<(), DeliveryError> {
        // PVE's helper and sendmail run outside the sandbox, by signet-notify.socket,
        // when it is there and runs that program (docs/ALERTS.md).
        let relay = Path::new(relay::SOCKET);
        let fixed = relay::Programs::default();
        match self {
            Target::Pve(helper) => match relay::route(relay, helper, &fixed.pve_helper) {
                Some(sock) => {
                    let message = msg.clone();
                    relay::send(sock, &relay::Request::Pve { message }).await
                }
                None => doors::pve::deliver(helper, msg).await,
            },
            Target::Mail { sendmail, to, from } => {
                match relay::route(relay, sendmail, &fixed.sendmail) {
                    Some(sock) => {
                        let req = relay::Request::Mail {
                            message: msg.clone(),
                            to: to.clone(),
                            from: from.clone(),
                        };
                        relay::send(sock, &req).await
                    }
                    None => doors::mail::deliver(sendmail, to, from.as_deref(), msg).await,
                }
            }
            Target::Webhook { url, token_file } => {
                let token = match token_file {
                    Some(p) => Some(doors::webhook::read_token(p)?),
                    None => None,
                };
                doors::webhook::deliver(url, &self.name(), token.as_ref(), msg).await
            }
        }
    }
}

/// The targets `[alerts]` names now.
fn targets(cfg: &AlertsConfig) -> Vec<Target> {
    let mut out = Vec::new();
    let pve = match cfg.pve {
        PveMode::On => true,
        PveMode::Off => false,
        PveMode::Auto => doors::pve::available(std::path::Path::new(PVE_NOTIFY_MODULE)),
    };
    if pve {
        out.push(Target::Pve(cfg.pve_helper.clone()));
    }
    if let Some(sendmail) = &cfg.sendmail {
        out.push(Target::Mail {
            sendmail: sendmail.clone(),
            to: cfg.mail_to.clone(),
            from: cfg.mail_from.clone(),
        });
    }
    if let Some(url) = cfg.webhook_url() {
        out.push(Target::Webhook {
            url,
            token_file: cfg.webhook_token_file.clone(),
        });
    }
    out
}

/// Delivers the outbox in order: each message to every target at once, each target
/// tried up to four times.
async fn deliver_all(daemon: Arc<Daemon>, mut rx: mpsc::Receiver<Message>) {
    let mut said_none = false;
    while let Some(msg) = rx.recv().await {
        let targets = targets(&daemon.config().alerts);
        if targets.is_empty() {
            if !said_none {
                tracing::warn!("alerts go to the log only: no alert target is configured (set sendmail and mail_to, or webhook, in [alerts] of signetd.toml; on Proxmox VE 8.1 or later they go through its notification system)");
                said_none = true;
            }
            continue;
        }
        said_none = false;
        futures_util::future::join_all(targets.iter().map(|t| deliver_one(t, &msg))).await;
    }
}

async fn deliver_one(target: &Target, msg: &Message) {
    let mut waits = RETRY_WAITS.iter();
    loop {
        match target.deliver(msg).await {
            Ok(()) => {
                tracing::debug!(target = %target.name(), alert_kind = %msg.kind, alert_state = %msg.state, "alert delivered");
                return;
            }
            Err(e) => match waits.next() {
                Some(wait) => {
                    tracing::warn!(target = %target.name(), alert_kind = %msg.kind, error = %e, "an alert could not be delivered; trying again in {} s", wait.as_secs());
                    tokio::time::sleep(*wait).await;
                }
                None => {
                    tracing::warn!(target = %target.name(), alert_kind = %msg.kind, alert_state = %msg.state, error = %e, "an alert could not be delivered and is given up (it is in this log): fix the target in [alerts] of signetd.toml and reload");
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_api::wire::CertificateSummary;

    fn health(state: AgentState) -> AgentHealth {
        AgentHealth {
            version: "1".into(),
            instance: None,
            state,
            detail: "what the agent says".into(),
            module: "m".into(),
            module_loaded: true,
            slot: None,
            token_present: true,
            token: None,
            logged_in: state == AgentState::Ready,
            pin: None,
            certificates: Vec::new(),
            signer: "s".into(),
            signer_features: None,
            windows: None,
        }
    }

    fn active(seen: &[Seen]) -> Vec<(Kind, bool)> {
        seen.iter().map(|(k, a, _)| (k.kind, *a)).collect()
    }

    #[test]
    fn alerts_timeline_entries_become_conditions() {
        assert_eq!(
            active(&from_entry("token_lost", "x")),
            vec![(Kind::TokenLost, true)]
        );
        assert_eq!(from_entry("token_lost", "x")[0].2, "x");
        assert_eq!(
            active(&from_entry("logged_in", "")),
            vec![
                (Kind::TokenLost, false),
                (Kind::PinRejected, false),
                (Kind::OperatorNeeded, false)
            ]
        );
        assert_eq!(
            active(&from_entry("pin_rejected", "")),
            vec![(Kind::PinRejected, true)]
        );
        assert_eq!(
            active(&from_entry("recovery_exhausted", "")),
            vec![(Kind::OperatorNeeded, true)]
        );
        assert_eq!(
            active(&from_entry("agent_unreachable", "")),
            vec![(Kind::AgentUnreachable, true)]
        );
        assert_eq!(
            active(&from_entry("agent_back", "")),
            vec![(Kind::AgentUnreachable, false)]
        );
        assert!(from_entry("job_signed", "").is_empty());
    }

    #[test]
    fn alerts_health_says_token_pin_and_certificates() {
        assert_eq!(
            active(&from_health(&health(AgentState::Ready), &[])),
            vec![
                (Kind::AgentUnreachable, false),
                (Kind::TokenLost, false),
                (Kind::PinRejected, false),
                (Kind::OperatorNeeded, false)
            ]
        );
        assert_eq!(
            active(&from_health(&health(AgentState::TokenMissing), &[])),
            vec![(Kind::AgentUnreachable, false), (Kind::TokenLost, true)]
        );
        assert_eq!(
            active(&from_health(&health(AgentState::PinLocked), &[])),
            vec![(Kind::AgentUnreachable, false), (Kind::PinRejected, true)]
        );
        let mut h = health(AgentState::PinNeeded);
        h.certificates = vec![CertificateSummary {
            subject: "CN=Acme".into(),
            sha256: "aa".into(),
            not_after: "2027-01-01T00:00:00Z".into(),
            days_left: 20,
            ..CertificateSummary::default()
        }];
        let seen = from_health(&h, &["bb".into()]);
        let certs: Vec<_> = seen
            .iter()
            .skip(1)
            .map(|(k, a, _)| (k.kind, k.subject.as_str(), *a))
            .collect();
        assert_eq!(
            certs,
            vec![
                (Kind::CertExpires30, "aa", true),
                (Kind::CertExpires7, "aa", false),
                (Kind::CertExpires30, "bb", false),
                (Kind::CertExpires7, "bb", false),
            ]
        );
        assert!(seen[1].2.contains("CN=Acme") && seen[1].2.contains("in 20 days"));
        // An absent token says nothing of its certificates.
        h.token_present = false;
        assert_eq!(from_health(&h, &["bb".into()]).len(), 1);
    }

    #[test]
    fn alerts_the_agents_first_answer_settles_then_the_timeline_speaks() {
        let a = Alerts::new(crate::config::alerts::AlertsConfig::default().rules());
        let mut settled = false;
        assert!(of_seen(&AgentSeen::NotYet, &a, &mut settled).is_empty());
        let down = AgentSeen::Unreachable(signet_api::wire::ErrorBody::new(
            signet_api::wire::ErrorCode::AgentUnavailable,
            "no agent",
        ));
        assert_eq!(
            active(&of_seen(&down, &a, &mut settled)),
            vec![(Kind::AgentUnreachable, true)]
        );
        assert!(!settled, "no answer settles nothing");
        let lost = AgentSeen::Answered(Box::new(health(AgentState::TokenMissing)));
        assert_eq!(
            active(&of_seen(&lost, &a, &mut settled)),
            vec![(Kind::AgentUnreachable, false), (Kind::TokenLost, true)]
        );
        assert!(settled);
        // Afterwards a health read (maybe answered before an event the timeline has
        // already said) changes nothing but the certificates.
        let ready = AgentSeen::Answered(Box::new(health(AgentState::Ready)));
        assert!(of_seen(&ready, &a, &mut settled).is_empty());
        assert!(of_seen(&down, &a, &mut settled).is_empty());
        let mut h = health(AgentState::Ready);
        h.certificates = vec![CertificateSummary {
            sha256: "aa".into(),
            days_left: 3,
            ..CertificateSummary::default()
        }];
        assert_eq!(
            active(&of_seen(
                &AgentSeen::Answered(Box::new(h)),
                &a,
                &mut settled
            )),
            vec![(Kind::CertExpires30, true), (Kind::CertExpires7, true)]
        );
    }

    #[test]
    fn alerts_spool_threshold() {
        assert!(!spool_nearly_full(89, 100, 90));
        assert!(spool_nearly_full(90, 100, 90));
        assert!(spool_nearly_full(u64::MAX, u64::MAX, 100));
        assert!(!spool_nearly_full(0, 0, 1));
    }

    #[test]
    fn alerts_targets_follow_the_configuration() {
        let mut cfg = AlertsConfig {
            pve: PveMode::Off,
            ..AlertsConfig::default()
        };
        assert!(targets(&cfg).is_empty());
        cfg.pve = PveMode::On;
        cfg.sendmail = Some("/usr/sbin/sendmail".into());
        cfg.mail_to = vec!["root".into()];
        cfg.webhook = Some("https://h.example/secret-path?token=x".into());
        let names: Vec<String> = targets(&cfg).iter().map(Target::name).collect();
        assert_eq!(
            names,
            vec![
                "PVE's notification system",
                "sendmail (/usr/sbin/sendmail)",
                "the webhook https://h.example:443/…"
            ]
        );
        assert!(
            !names.concat().contains("secret"),
            "no path or query in the log"
        );
    }

    #[test]
    fn alerts_messages_carry_the_notice() {
        let n = Notice {
            key: Key::of(Kind::PinRejected),
            state: State::Resolved,
            severity: Severity::Info,
            detail: "fix the PIN file".into(),
            since_ms: 0,
            at_ms: 1_000,
        };
        let m = message(&n, "pve1");
        assert_eq!(
            (m.kind.as_str(), m.state.as_str(), m.severity.as_str()),
            ("pin-rejected", "resolved", "info")
        );
        assert_eq!(m.since, "1970-01-01T00:00:00Z");
        assert_eq!(m.detail, "it was: fix the PIN file");
        assert_eq!(
            m.summary(),
            "Signet on pve1: resolved: the token refused the PIN"
        );
    }
}

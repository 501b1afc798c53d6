//! When a person is told, and when they are told it is over: the alerts' rules.
//!
//! The daemon observes conditions (the token lost, the agent unreachable, a PIN the
//! token refused, the recovery ladder at its end, a certificate close to its end, the
//! audit chain broken, the spool nearly full) and says each time whether one is active
//! now ([`Alerts::observe`]); time passes ([`Alerts::tick`]). Out come [`Notice`]s:
//!
//! - **one alert per incident**: a condition is raised once, when it has been active
//!   for its delay (`token_lost_seconds`, `agent_unreachable_seconds`; at once for the
//!   others), whatever it does while raised;
//! - **one resolved notice per incident**: a raised condition is resolved once it has
//!   been clear for the hold-down (`hold_down_seconds`); coming back within the
//!   hold-down (a flapping condition) continues the same incident and says nothing new;
//! - a condition that clears before its delay was never an incident: nothing is said.
//!
//! Pure: the caller passes the time (milliseconds since the epoch). The incidents
//! raised are [`Alerts::open`] and [`Alerts::restore`]d after a restart, so a condition
//! still there is not raised again and one gone by then is resolved once.

use std::collections::BTreeMap;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The token has been lost (gone from its signing VM) for longer than the delay.
    TokenLost,
    /// The token refused the host's PIN.
    PinRejected,
    /// Only a person can bring signing back: the recovery ladder tried every step.
    OperatorNeeded,
    /// The signing agent has been unreachable for longer than the delay.
    AgentUnreachable,
    /// A certificate on the token expires within 30 days.
    CertExpires30,
    /// A certificate on the token expires within 7 days.
    CertExpires7,
    /// The audit log's hash chain is broken.
    AuditBroken,
    /// The spool is nearly full.
    SpoolNearlyFull,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 8] = [
        Kind::TokenLost,
        Kind::PinRejected,
        Kind::OperatorNeeded,
        Kind::AgentUnreachable,
        Kind::CertExpires30,
        Kind::CertExpires7,
        Kind::AuditBroken,
        Kind::SpoolNearlyFull,
    ];

    /// The kind's stable name: in notices, webhooks, PVE's `type`-matching fields and
    /// the state file.
    pub fn name(self) -> &'static str {
        match self {
            Kind::TokenLost => "token-lost",
            Kind::PinRejected => "pin-rejected",
            Kind::OperatorNeeded => "operator-needed",
            Kind::AgentUnreachable => "agent-unreachable",
            Kind::CertExpires30 => "certificate-expires-30d",
            Kind::CertExpires7 => "certificate-expires-7d",
            Kind::AuditBroken => "audit-chain-broken",
            Kind::SpoolNearlyFull => "spool-nearly-full",
        }
    }

    /// The kind of this name.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// How much a raised alert of this kind matters.
    pub fn severity(self) -> Severity {
        match self {
            Kind::TokenLost
            | Kind::AgentUnreachable
            | Kind::CertExpires30
            | Kind::SpoolNearlyFull => Severity::Warning,
            Kind::PinRejected | Kind::OperatorNeeded | Kind::CertExpires7 | Kind::AuditBroken => {
                Severity::Error
            }
        }
    }

    /// The alert's title.
    pub fn title(self) -> &'static str {
        match self {
            Kind::TokenLost => "the signing token is lost",
            Kind::PinRejected => "the token refused the PIN",
            Kind::OperatorNeeded => "signing needs an operator",
            Kind::AgentUnreachable => "the signing agent is unreachable",
            Kind::CertExpires30 => "a signing certificate expires within 30 days",
            Kind::CertExpires7 => "a signing certificate expires within 7 days",
            Kind::AuditBroken => "the audit chain is broken",
            Kind::SpoolNearlyFull => "the spool is nearly full",
        }
    }
}

/// How much a notice matters (PVE's notification severities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One condition: its kind and what it is about (a certificate's SHA-256; empty for
/// the appliance-wide kinds).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: Kind,
    pub subject: String,
}

impl Key {
    /// The appliance-wide condition of this kind.
    pub fn of(kind: Kind) -> Key {
        Key {
            kind,
            subject: String::new(),
        }
    }
}

/// The rules in force (`[alerts]`), in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// How long the token is lost before it is an alert.
    pub token_lost_ms: u64,
    /// How long the agent is unreachable before it is an alert.
    pub agent_unreachable_ms: u64,
    /// How long a raised condition stays clear before it is resolved.
    pub hold_down_ms: u64,
}

impl Rules {
    fn delay(&self, kind: Kind) -> u64 {
        match kind {
            Kind::TokenLost => self.token_lost_ms,
            Kind::AgentUnreachable => self.agent_unreachable_ms,
            _ => 0,
        }
    }
}

/// Whether a notice raises or resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Raised,
    Resolved,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Raised => "raised",
            State::Resolved => "resolved",
        }
    }
}

/// What a person is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub key: Key,
    pub state: State,
    /// `Info` for a resolved notice, else the kind's.
    pub severity: Severity,
    /// What was seen and what to do (the latest words seen for a resolved notice).
    pub detail: String,
    /// When the condition began (ms since the epoch).
    pub since_ms: u64,
    /// When this notice was decided.
    pub at_ms: u64,
}

/// An incident raised and not yet resolved: kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub key: Key,
    pub since_ms: u64,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Active, not yet for its delay.
    Pending { since: u64, detail: String },
    /// Raised; `clear_since` when it has been clear since then (inside the hold-down).
    Raised {
        since: u64,
        detail: String,
        clear_since: Option<u64>,
    },
}

/// The conditions followed and what was said of them.
#[derive(Debug, Clone)]
pub struct Alerts {
    rules: Rules,
    phases: BTreeMap<Key, Phase>,
}

impl Alerts {
    pub fn new(rules: Rules) -> Self {
        Alerts {
            rules,
            phases: BTreeMap::new(),
        }
    }

    /// New rules (a reload); the incidents keep their phase.
    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }

    /// Takes back the incidents a previous run raised: they are not raised again, and
    /// are resolved once seen clear for the hold-down.
    pub fn restore(&mut self, open: impl IntoIterator<Item = Open>) {
        for o in open {
            self.phases.insert(
                o.key,
                Phase::Raised {
                    since: o.since_ms,
                    detail: o.detail,
                    clear_since: None,
                },
            );
        }
    }

    /// The incidents raised and not resolved.
    pub fn open(&self) -> Vec<Open> {
        self.phases
            .iter()
            .filter_map(|(key, p)| match p {
                Phase::Raised { since, detail, .. } => Some(Open {
                    key: key.clone(),
                    since_ms: *since,
                    detail: detail.clone(),
                }),
                Phase::Pending { .. } => None,
            })
            .collect()
    }

    /// The conditions of `kind` followed now (pending or raised), by subject.
    pub fn subjects(&self, kind: Kind) -> Vec<String> {
        self.phases
            .keys()
            .filter(|k| k.kind == kind)
            .map(|k| k.subject.clone())
            .collect()
    }

    /// `key` is active (with these words) or clear at `now`.
    pub fn observe(&mut self, key: Key, active: bool, detail: &str, now: u64) -> Vec<Notice> {
        let phase = self.phases.get_mut(&key);
        match (phase, active) {
            (None, false) => {}
            (None, true) => {
                self.phases.insert(
                    key.clone(),
                    Phase::Pending {
                        since: now,
                        detail: detail.to_owned(),
                    },
                );
            }
            (Some(Phase::Pending { detail: d, .. }), true) => {
                detail.clone_into(d);
            }
            (Some(Phase::Pending { .. }), false) => {
                self.phases.remove(&key);
            }
            (
                Some(Phase::Raised {
                    clear_since,
                    detail: d,
                    ..
                }),
                true,
            ) => {
                *clear_since = None;
                if !detail.is_empty() {
                    detail.clone_into(d);
                }
            }
            (Some(Phase::Raised { clear_since, .. }), false) => {
                clear_since.get_or_insert(now);
            }
        }
        self.due(Some(&key), now)
    }

    /// Time passes: conditions active for their delay are raised, those clear for the
    /// hold-down resolved.
    pub fn tick(&mut self, now: u64) -> Vec<Notice> {
        self.due(None, now)
    }

    fn due(&mut self, only: Option<&Key>, now: u64) -> Vec<Notice> {
        let mut out = Vec::new();
        let mut resolved = Vec::new();
        for (key, phase) in self.phases.iter_mut() {
            if only.is_some_and(|k| k != key) {
                continue;
            }
            match phase {
                Phase::Pending { since, detail } => {
                    if now.saturating_sub(*since) >= self.rules.delay(key.kind) {
                        out.push(Notice {
                            key: key.clone(),
                            state: State::Raised,
                            severity: key.kind.severity(),
                            detail: detail.clone(),
                            since_ms: *since,
                            at_ms: now,
                        });
                        *phase = Phase::Raised {
                            since: *since,
                            detail: std::mem::take(detail),
                            clear_since: None,
                        };
                    }
                }
                Phase::Raised {
                    since,
                    detail,
                    clear_since: Some(clear),
                } => {
                    if now.saturating_sub(*clear) >= self.rules.hold_down_ms {
                        out.push(Notice {
                            key: key.clone(),
                            state: State::Resolved,
                            severity: Severity::Info,
                            detail: detail.clone(),
                            since_ms: *since,
                            at_ms: now,
                        });
                        resolved.push(key.clone());
                    }
                }
                Phase::Raised { .. } => {}
            }
        }
        for k in resolved {
            self.phases.remove(&k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        token_lost_ms: 60_000,
        agent_unreachable_ms: 30_000,
        hold_down_ms: 300_000,
    };

    fn states(n: &[Notice]) -> Vec<(Kind, State)> {
        n.iter().map(|n| (n.key.kind, n.state)).collect()
    }

    #[test]
    fn an_immediate_condition_is_raised_once_and_resolved_once() {
        let mut a = Alerts::new(RULES);
        let pin = Key::of(Kind::PinRejected);
        let n = a.observe(pin.clone(), true, "fix the PIN file", 1_000);
        assert_eq!(states(&n), vec![(Kind::PinRejected, State::Raised)]);
        assert_eq!(n[0].severity, Severity::Error);
        assert_eq!(n[0].detail, "fix the PIN file");
        assert_eq!(n[0].since_ms, 1_000);
        // Seen again and again while active: nothing new.
        for t in 2..50 {
            assert!(a.observe(pin.clone(), true, "fix", t * 1_000).is_empty());
            assert!(a.tick(t * 1_000 + 500).is_empty());
        }
        // Clear: resolved only after the hold-down.
        assert!(a.observe(pin.clone(), false, "", 100_000).is_empty());
        assert!(a.tick(399_999).is_empty());
        let n = a.tick(400_000);
        assert_eq!(states(&n), vec![(Kind::PinRejected, State::Resolved)]);
        assert_eq!(n[0].severity, Severity::Info);
        assert_eq!(n[0].since_ms, 1_000);
        assert!(a.tick(500_000).is_empty(), "resolved once");
        assert!(a.observe(pin, false, "", 600_000).is_empty());
        assert!(a.open().is_empty());
    }

    #[test]
    fn a_delayed_condition_is_raised_only_after_its_delay() {
        let mut a = Alerts::new(RULES);
        let lost = Key::of(Kind::TokenLost);
        assert!(a.observe(lost.clone(), true, "unplugged", 0).is_empty());
        assert!(a.tick(59_999).is_empty());
        let n = a.tick(60_000);
        assert_eq!(states(&n), vec![(Kind::TokenLost, State::Raised)]);
        assert_eq!(n[0].since_ms, 0, "dated from when it began");
        assert_eq!(n[0].severity, Severity::Warning);
        // Observing it active past the delay raises it too (no tick needed).
        let agent = Key::of(Kind::AgentUnreachable);
        assert!(a
            .observe(agent.clone(), true, "refused", 100_000)
            .is_empty());
        let n = a.observe(agent, true, "still refused", 130_000);
        assert_eq!(states(&n), vec![(Kind::AgentUnreachable, State::Raised)]);
        assert_eq!(n[0].detail, "still refused", "the newest words");
    }

    #[test]
    fn a_condition_gone_before_its_delay_says_nothing() {
        let mut a = Alerts::new(RULES);
        let lost = Key::of(Kind::TokenLost);
        // Lost and back, again and again, each shorter than the delay.
        for i in 0..10u64 {
            let t = i * 100_000;
            assert!(a.observe(lost.clone(), true, "gone", t).is_empty());
            assert!(a.tick(t + 59_000).is_empty());
            assert!(a.observe(lost.clone(), false, "", t + 59_500).is_empty());
            assert!(a.tick(t + 99_000).is_empty());
        }
        assert!(a.open().is_empty());
    }

    #[test]
    fn a_flapping_condition_inside_the_hold_down_raises_nothing_new() {
        let mut a = Alerts::new(Rules {
            token_lost_ms: 0,
            ..RULES
        });
        let lost = Key::of(Kind::TokenLost);
        let n = a.observe(lost.clone(), true, "gone", 0);
        assert_eq!(states(&n), vec![(Kind::TokenLost, State::Raised)]);
        // Back and gone every 10 s for an hour: each clear spell is shorter than the
        // hold-down.
        let mut t = 0;
        while t < 3_600_000 {
            t += 10_000;
            assert!(a.observe(lost.clone(), false, "", t).is_empty(), "at {t}");
            assert!(a.tick(t + 5_000).is_empty(), "at {t}");
            t += 10_000;
            assert!(
                a.observe(lost.clone(), true, "gone", t).is_empty(),
                "at {t}"
            );
        }
        // Back for good: one resolved notice, a hold-down later.
        assert!(a.observe(lost.clone(), false, "", t + 1).is_empty());
        assert!(a.tick(t + 300_000).is_empty());
        let n = a.tick(t + 300_001);
        assert_eq!(states(&n), vec![(Kind::TokenLost, State::Resolved)]);
        assert_eq!(n[0].since_ms, 0, "one incident from the first loss");
        // A new loss after that is a new incident.
        let n = a.observe(lost, true, "gone again", t + 400_000);
        assert_eq!(states(&n), vec![(Kind::TokenLost, State::Raised)]);
    }

    #[test]
    fn with_no_hold_down_a_clear_condition_is_resolved_at_once() {
        let mut a = Alerts::new(Rules {
            token_lost_ms: 0,
            agent_unreachable_ms: 0,
            hold_down_ms: 0,
        });
        let agent = Key::of(Kind::AgentUnreachable);
        assert_eq!(a.observe(agent.clone(), true, "x", 5).len(), 1);
        let n = a.observe(agent, false, "", 6);
        assert_eq!(states(&n), vec![(Kind::AgentUnreachable, State::Resolved)]);
    }

    #[test]
    fn conditions_are_apart_by_kind_and_subject() {
        let mut a = Alerts::new(RULES);
        let c1 = Key {
            kind: Kind::CertExpires30,
            subject: "aa".into(),
        };
        let c2 = Key {
            kind: Kind::CertExpires30,
            subject: "bb".into(),
        };
        let c1_7 = Key {
            kind: Kind::CertExpires7,
            subject: "aa".into(),
        };
        assert_eq!(a.observe(c1.clone(), true, "29 days", 0).len(), 1);
        assert_eq!(a.observe(c2.clone(), true, "20 days", 0).len(), 1);
        assert_eq!(a.observe(c1.clone(), true, "7 days", 1).len(), 0);
        let n = a.observe(c1_7.clone(), true, "7 days", 1);
        assert_eq!(states(&n), vec![(Kind::CertExpires7, State::Raised)]);
        assert_eq!(
            a.subjects(Kind::CertExpires30),
            vec!["aa".to_owned(), "bb".to_owned()]
        );
        // Replaced: both of its incidents resolve, the other certificate's stays.
        a.observe(c1.clone(), false, "", 10);
        a.observe(c1_7, false, "", 10);
        let n = a.tick(10 + 300_000);
        assert_eq!(
            states(&n),
            vec![
                (Kind::CertExpires30, State::Resolved),
                (Kind::CertExpires7, State::Resolved)
            ]
        );
        assert_eq!(a.open().len(), 1);
        assert_eq!(a.open()[0].key, c2);
    }

    #[test]
    fn incidents_survive_a_restart_without_being_raised_again() {
        let mut a = Alerts::new(RULES);
        let pin = Key::of(Kind::PinRejected);
        let audit = Key::of(Kind::AuditBroken);
        a.observe(pin.clone(), true, "refused", 1_000);
        a.observe(audit.clone(), true, "record 7 changed", 2_000);
        // Pending conditions are not kept: they start over.
        a.observe(Key::of(Kind::TokenLost), true, "gone", 3_000);
        let kept = a.open();
        assert_eq!(kept.len(), 2);

        let mut b = Alerts::new(RULES);
        b.restore(kept);
        // Still there after the restart: nothing said.
        assert!(b
            .observe(audit.clone(), true, "record 7 changed", 10_000)
            .is_empty());
        assert!(b.tick(1_000_000).is_empty());
        // Gone by then: resolved once, dated from the first run.
        b.observe(pin, false, "", 10_000);
        let n = b.tick(310_000);
        assert_eq!(states(&n), vec![(Kind::PinRejected, State::Resolved)]);
        assert_eq!(n[0].since_ms, 1_000);
        assert_eq!(n[0].detail, "refused");
        assert_eq!(b.open().len(), 1);
    }

    #[test]
    fn new_rules_apply_to_incidents_in_course() {
        let mut a = Alerts::new(RULES);
        let lost = Key::of(Kind::TokenLost);
        a.observe(lost.clone(), true, "gone", 0);
        assert!(a.tick(10_000).is_empty());
        a.set_rules(Rules {
            token_lost_ms: 5_000,
            ..RULES
        });
        assert_eq!(
            states(&a.tick(10_001)),
            vec![(Kind::TokenLost, State::Raised)]
        );
    }

    #[test]
    fn kinds_have_stable_names() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.name()), Some(k));
            assert!(!k.title().is_empty());
        }
        assert_eq!(Kind::from_name("nope"), None);
    }

    #[test]
    fn a_clock_going_back_does_not_raise_or_resolve_early() {
        let mut a = Alerts::new(RULES);
        let lost = Key::of(Kind::TokenLost);
        a.observe(lost.clone(), true, "gone", 100_000);
        assert!(a.tick(50_000).is_empty(), "the wall clock stepped back");
        assert_eq!(a.tick(160_000).len(), 1);
        a.observe(lost, false, "", 200_000);
        assert!(a.tick(150_000).is_empty());
    }
}

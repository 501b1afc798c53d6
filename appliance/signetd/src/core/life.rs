//! The token's life as the daemon follows it in its signing VM: what the agent says
//! (up or down, token lost or back, logged in, a PIN needed), where the host has the
//! token (in the VM, or not: unplugged, detached, in conflict), what the VM's QEMU
//! does (reset, shut down), time passing and the operator — and what to do about it:
//! record it in the timeline, give the agent the PIN, wake the queue, climb the
//! escalation ladder ([`recovery::Ladder`]) when the agent has lost a token the host
//! still has in the VM, alert a person when every step has been tried.
//!
//! Pure: [`Life::on`] takes an event and the time and returns [`Action`]s; the
//! daemon's adapters (`agent_watch`) carry them out. Events that arrive twice or out
//! of order do nothing twice.

use std::time::Instant;

use crate::core::recovery::{self, Ladder, LadderPolicy, Step};
use crate::core::timeline::Seen;

/// Where the host has the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// The host does not follow this token (no USB passthrough for it): only the agent
    /// can tell.
    NotFollowed,
    /// In its signing VM (attached, or accepted by QEMU).
    InVm,
    /// Not on the host at all, or kept from its VM by a conflict (why): recovering
    /// it in the VM makes no sense until it is back.
    Away(String),
    /// On the host but not (yet) in its VM: being attached or re-attached (by a step
    /// of the ladder, too), or held on the host by the operator (why). The ladder
    /// holds its breath until the token is in the VM again.
    Elsewhere(String),
}

/// What happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The agent answers (its event stream is open).
    AgentUp,
    /// The agent cannot be reached (why).
    AgentDown(String),
    /// The agent lost the token (its detail).
    TokenLost(String),
    /// The agent found the token again.
    TokenBack,
    /// The agent's session logged in.
    LoggedIn,
    /// The agent waits for a PIN.
    PinNeeded,
    /// Where the host has the token now.
    Host(Host),
    /// The signing VM's QEMU reset it (a reboot).
    VmReset,
    /// The signing VM shut down or its QEMU went away.
    VmDown,
    /// Time passes.
    Tick,
    /// An operator starts recovery over (after fixing something by hand).
    OperatorReset,
}

/// What the adapters are asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this in the timeline.
    Record(Seen),
    /// Run a step of the escalation ladder.
    Run(Step),
    /// Give the agent the PIN from the host's PIN file.
    DeliverPin,
    /// Signing may work again: wake the token's worker.
    ResumeQueue,
    /// Tell a person (the log, the status, the timeline already has it).
    Alert(String),
    /// The agent the daemon follows is gone with its VM's reset or shutdown: drop the
    /// connections to it (behind a hybrid vsock they would stay open, silent), give up
    /// the job it had, and follow the agent that comes next.
    Refollow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    Unknown,
    Present,
    Lost,
}

/// One token's life in its signing VM.
#[derive(Debug, Clone)]
pub struct Life {
    ladder: Ladder,
    /// `[recovery] enabled`: off, losses are recorded and waited for, never climbed.
    climb: bool,
    agent_up: Option<bool>,
    guest: Guest,
    host: Host,
}

impl Life {
    /// A token whose losses are recovered (`climb`) or only waited for, followed on
    /// the host (`followed`) or not, whose VM can be reset by Signet (`vm_reset`: its
    /// monitor is known) or not.
    pub fn new(policy: LadderPolicy, climb: bool, followed: bool, vm_reset: bool) -> Self {
        let mut ladder = Ladder::new(policy);
        let mut steps = vec![Step::AgentReinit];
        if followed {
            steps.extend([Step::Reattach, Step::UsbPortReset]);
        }
        if vm_reset {
            steps.push(Step::VmReset);
        }
        ladder.set_available(&steps);
        Life {
            ladder,
            climb,
            agent_up: None,
            guest: Guest::Unknown,
            host: if followed {
                Host::Away("not seen yet".into())
            } else {
                Host::NotFollowed
            },
        }
    }

    /// The token's scope changed (a reload gave the agent's VM other tokens): the
    /// host steps are available as for [`Life::new`]; a token newly followed is "not
    /// seen yet" until the host's view arrives, one no longer followed is forgotten.
    pub fn rescope(&mut self, followed: bool, vm_reset: bool) {
        let mut steps = vec![Step::AgentReinit];
        if followed {
            steps.extend([Step::Reattach, Step::UsbPortReset]);
        }
        if vm_reset {
            steps.push(Step::VmReset);
        }
        self.ladder.set_available(&steps);
        let was = !matches!(self.host, Host::NotFollowed);
        if followed != was {
            self.host = if followed {
                Host::Away("not seen yet".into())
            } else {
                Host::NotFollowed
            };
        }
    }

    /// That `step` ran at `at`, before a restart (its rate limit holds across one).
    pub fn remember(&mut self, step: Step, at: Instant) {
        self.ladder.remember(step, at);
    }

    /// True while the agent has lost the token and the ladder is climbing or spent.
    pub fn recovering(&self) -> bool {
        self.ladder.in_incident()
    }

    /// Feeds one event at `now`.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::AgentUp => {
                if self.agent_up != Some(true) {
                    self.agent_up = Some(true);
                    out.push(Action::Record(Seen::AgentUp));
                    out.push(Action::ResumeQueue);
                }
            }
            Event::AgentDown(why) => {
                if self.agent_up != Some(false) {
                    self.agent_up = Some(false);
                    self.guest = Guest::Unknown;
                    out.push(Action::Record(Seen::AgentDown(why)));
                }
            }
            Event::TokenLost(detail) => {
                if self.guest != Guest::Lost {
                    self.guest = Guest::Lost;
                    out.push(Action::Record(Seen::TokenLost(detail.clone())));
                }
                if self.ladder_applies() {
                    self.ladder(recovery::Event::TokenLost { reason: detail }, now, &mut out);
                }
            }
            Event::TokenBack | Event::LoggedIn => {
                let was_lost = self.guest == Guest::Lost;
                self.guest = Guest::Present;
                if was_lost {
                    out.push(Action::Record(Seen::TokenBack));
                }
                if event == Event::LoggedIn {
                    out.push(Action::Record(Seen::LoggedIn));
                }
                self.ladder(recovery::Event::TokenBack, now, &mut out);
                out.push(Action::ResumeQueue);
            }
            Event::PinNeeded => out.push(Action::DeliverPin),
            Event::Host(host) => {
                if host == self.host {
                    return out;
                }
                self.host = host.clone();
                match host {
                    Host::Away(why) if self.ladder.in_incident() => {
                        self.ladder(recovery::Event::Reset, now, &mut out);
                        out.push(Action::Record(Seen::RecoveryStopped(format!(
                            "the host no longer has the token in the signing VM ({why}): the ladder stops; it starts again once the token is back in the VM"
                        ))));
                    }
                    Host::InVm
                        if self.guest == Guest::Lost
                            && self.climb
                            && !self.ladder.in_incident() =>
                    {
                        // Back in the VM (re-plugged, re-attached) while the agent
                        // still misses it: the gentlest step first, as for any loss.
                        self.ladder(
                            recovery::Event::TokenLost {
                                reason:
                                    "the token is back in the VM but the agent has not found it yet"
                                        .into(),
                            },
                            now,
                            &mut out,
                        );
                    }
                    _ => {}
                }
            }
            Event::VmReset => out.extend([Action::Record(Seen::VmReset), Action::Refollow]),
            Event::VmDown => out.extend([Action::Record(Seen::VmDown), Action::Refollow]),
            // While the token is on its way into the VM the cool-downs wait.
            Event::Tick if self.ladder_applies() => {
                self.ladder(recovery::Event::Tick, now, &mut out)
            }
            Event::Tick => {}
            Event::OperatorReset => self.ladder(recovery::Event::Reset, now, &mut out),
        }
        out
    }

    /// The ladder is for a token the host has in the VM (or does not follow): one that
    /// is unplugged is waited for, not recovered.
    fn ladder_applies(&self) -> bool {
        self.climb && matches!(self.host, Host::InVm | Host::NotFollowed)
    }

    fn ladder(&mut self, event: recovery::Event, now: Instant, out: &mut Vec<Action>) {
        let (actions, entries) = self.ladder.on(event, now);
        for e in entries {
            out.push(Action::Record(Seen::Ladder(e.what)));
        }
        for a in actions {
            out.push(match a {
                recovery::Action::Run(step) => Action::Run(step),
                recovery::Action::Alert(why) => Action::Alert(why),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::recovery::{Record, StepPolicy};
    use std::time::Duration;

    fn policy() -> LadderPolicy {
        let s = |cooldown| StepPolicy {
            cooldown: Duration::from_secs(cooldown),
            min_interval: Duration::from_secs(0),
        };
        LadderPolicy {
            agent_reinit: s(10),
            reattach: s(10),
            usb_port_reset: s(10),
            vm_reset: s(60),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ran(actions: &[Action]) -> Vec<Step> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Run(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    fn records(actions: &[Action]) -> Vec<Seen> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Record(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// A followed token, in its VM, agent up and logged in.
    fn ready() -> (Life, Instant) {
        let mut l = Life::new(policy(), true, true, true);
        let t = Instant::now();
        l.on(Event::Host(Host::InVm), t);
        l.on(Event::AgentUp, t);
        l.on(Event::LoggedIn, t);
        (l, t)
    }

    #[test]
    fn a_token_lost_in_the_vm_climbs_the_ladder_until_it_is_back() {
        let (mut l, t) = ready();
        let a = l.on(Event::TokenLost("CKR_DEVICE_REMOVED".into()), t);
        assert_eq!(ran(&a), vec![Step::AgentReinit]);
        assert_eq!(records(&a)[0], Seen::TokenLost("CKR_DEVICE_REMOVED".into()));
        assert!(l.recovering());
        let a = l.on(Event::Tick, t + secs(10));
        assert_eq!(ran(&a), vec![Step::Reattach]);
        let a = l.on(Event::TokenBack, t + secs(12));
        assert!(ran(&a).is_empty());
        assert_eq!(
            records(&a),
            vec![
                Seen::TokenBack,
                Seen::Ladder(Record::Recovered {
                    after: secs(12),
                    step: Some(Step::Reattach)
                })
            ]
        );
        assert!(a.contains(&Action::ResumeQueue));
        assert!(!l.recovering());
        // Time passes: nothing more.
        assert!(ran(&l.on(Event::Tick, t + secs(100))).is_empty());
    }

    #[test]
    fn the_whole_ladder_then_one_alert_and_no_loop() {
        let (mut l, t) = ready();
        l.on(Event::TokenLost("gone".into()), t);
        let mut steps = vec![Step::AgentReinit];
        let mut alerts = 0;
        for k in 1..200 {
            let a = l.on(Event::Tick, t + secs(k * 5));
            steps.extend(ran(&a));
            alerts += a.iter().filter(|a| matches!(a, Action::Alert(_))).count();
        }
        assert_eq!(steps, Step::LADDER.to_vec());
        assert_eq!(alerts, 1);
    }

    #[test]
    fn an_unplugged_token_is_waited_for_not_recovered() {
        let (mut l, t) = ready();
        l.on(Event::Host(Host::Away("unplugged".into())), t);
        let a = l.on(Event::TokenLost("CKR_TOKEN_NOT_PRESENT".into()), t);
        assert!(ran(&a).is_empty(), "{a:?}");
        assert_eq!(
            records(&a),
            vec![Seen::TokenLost("CKR_TOKEN_NOT_PRESENT".into())]
        );
        assert!(!l.recovering());
        // Plugged in again and put back into the VM, the agent not yet seeing it: the
        // gentlest step.
        let a = l.on(Event::Host(Host::InVm), t + secs(30));
        assert_eq!(ran(&a), vec![Step::AgentReinit]);
        let a = l.on(Event::TokenBack, t + secs(31));
        assert!(a.contains(&Action::ResumeQueue));
        assert!(!l.recovering());
    }

    #[test]
    fn unplugging_during_recovery_stops_the_ladder() {
        let (mut l, t) = ready();
        l.on(Event::TokenLost("gone".into()), t);
        let a = l.on(Event::Host(Host::Away("unplugged".into())), t + secs(1));
        assert!(matches!(records(&a).last(), Some(Seen::RecoveryStopped(_))));
        assert!(!l.recovering());
        assert!(ran(&l.on(Event::Tick, t + secs(60))).is_empty());
    }

    #[test]
    fn a_token_on_its_way_into_the_vm_holds_the_ladder() {
        let (mut l, t) = ready();
        l.on(Event::TokenLost("gone".into()), t);
        let a = l.on(Event::Tick, t + secs(10));
        assert_eq!(ran(&a), vec![Step::Reattach]);
        // The re-attach takes the token out of the VM and back in: the same incident.
        let a = l.on(
            Event::Host(Host::Elsewhere("attaching".into())),
            t + secs(10),
        );
        assert!(a.is_empty(), "{a:?}");
        assert!(l.recovering());
        assert!(
            ran(&l.on(Event::Tick, t + secs(40))).is_empty(),
            "no step while it is on its way"
        );
        let a = l.on(Event::Host(Host::InVm), t + secs(41));
        assert!(ran(&a).is_empty(), "no new incident: {a:?}");
        let a = l.on(Event::Tick, t + secs(42));
        assert_eq!(ran(&a), vec![Step::UsbPortReset]);
    }

    #[test]
    fn a_reload_that_gives_the_agents_vm_its_token_opens_the_host_steps_and_back() {
        let mut l = Life::new(policy(), true, false, false);
        l.rescope(true, true);
        let t = Instant::now();
        l.on(Event::Host(Host::InVm), t);
        l.on(Event::AgentUp, t);
        l.on(Event::LoggedIn, t);
        let a = l.on(Event::TokenLost("gone".into()), t);
        assert_eq!(ran(&a), vec![Step::AgentReinit]);
        let a = l.on(Event::Tick, t + secs(10));
        assert_eq!(ran(&a), vec![Step::Reattach], "{a:?}");

        // The token taken from the agent's VM again: only the agent's own step.
        let (mut l, t) = ready();
        l.rescope(false, false);
        let a = l.on(Event::TokenLost("gone".into()), t);
        assert_eq!(ran(&a), vec![Step::AgentReinit]);
        assert!(ran(&l.on(Event::Tick, t + secs(10))).is_empty());
    }

    #[test]
    fn without_passthrough_only_the_agent_and_vm_steps_run() {
        let mut l = Life::new(policy(), true, false, false);
        let t = Instant::now();
        l.on(Event::AgentUp, t);
        let a = l.on(Event::TokenLost("gone".into()), t);
        assert_eq!(ran(&a), vec![Step::AgentReinit]);
        let a = l.on(Event::Tick, t + secs(10));
        assert!(ran(&a).is_empty());
        assert_eq!(
            a.iter().filter(|a| matches!(a, Action::Alert(_))).count(),
            1
        );
        let skipped = records(&a)
            .into_iter()
            .filter(|s| matches!(s, Seen::Ladder(Record::Unavailable(_))))
            .count();
        assert_eq!(skipped, 3, "{a:?}");
    }

    #[test]
    fn with_recovery_off_a_loss_is_recorded_and_waited_for() {
        let mut l = Life::new(policy(), false, true, true);
        let t = Instant::now();
        l.on(Event::Host(Host::InVm), t);
        let a = l.on(Event::TokenLost("gone".into()), t);
        assert_eq!(a, vec![Action::Record(Seen::TokenLost("gone".into()))]);
        assert!(ran(&l.on(Event::Tick, t + secs(600))).is_empty());
        assert!(l
            .on(Event::TokenBack, t + secs(700))
            .contains(&Action::ResumeQueue));
    }

    #[test]
    fn a_vm_reset_is_recorded_and_the_pin_follows_the_agent() {
        let (mut l, t) = ready();
        let a = l.on(Event::VmReset, t);
        assert_eq!(records(&a), vec![Seen::VmReset]);
        assert!(a.contains(&Action::Refollow), "{a:?}");
        let a = l.on(Event::AgentDown("connection refused".into()), t + secs(1));
        assert_eq!(
            records(&a),
            vec![Seen::AgentDown("connection refused".into())]
        );
        let a = l.on(Event::AgentUp, t + secs(8));
        assert_eq!(a, vec![Action::Record(Seen::AgentUp), Action::ResumeQueue]);
        assert_eq!(
            l.on(Event::PinNeeded, t + secs(8)),
            vec![Action::DeliverPin]
        );
        let a = l.on(Event::LoggedIn, t + secs(9));
        assert!(records(&a).contains(&Seen::LoggedIn));
        assert!(a.contains(&Action::ResumeQueue));
        assert!(!l.recovering(), "a reboot is not a loss");
    }

    #[test]
    fn a_vm_down_drops_the_agent_it_had() {
        let (mut l, t) = ready();
        let a = l.on(Event::VmDown, t);
        assert_eq!(records(&a), vec![Seen::VmDown]);
        assert!(a.contains(&Action::Refollow), "{a:?}");
        assert!(!l.recovering(), "a VM shut down is not a lost token");
    }

    #[test]
    fn events_twice_or_out_of_order_do_nothing_twice() {
        let (mut l, t) = ready();
        assert!(l.on(Event::AgentUp, t).is_empty(), "up twice");
        assert!(l.on(Event::Host(Host::InVm), t).is_empty(), "in VM twice");
        let back = l.on(Event::TokenBack, t);
        assert!(
            !records(&back).contains(&Seen::TokenBack),
            "back, never lost"
        );
        assert!(ran(&back).is_empty());
        let a = l.on(Event::TokenLost("x".into()), t);
        assert_eq!(ran(&a), vec![Step::AgentReinit]);
        let again = l.on(Event::TokenLost("x".into()), t + secs(1));
        assert!(again.is_empty(), "lost twice: {again:?}");
        l.on(Event::AgentDown("gone".into()), t + secs(2));
        assert!(
            l.on(Event::AgentDown("still gone".into()), t + secs(3))
                .is_empty(),
            "down twice"
        );
        // The operator starts over; the next loss climbs from the bottom.
        l.on(Event::OperatorReset, t + secs(4));
        assert!(!l.recovering());
        let a = l.on(Event::TokenLost("y".into()), t + secs(5));
        assert_eq!(ran(&a), vec![Step::AgentReinit]);
    }
}

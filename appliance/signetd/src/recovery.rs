//! The escalation ladder for a token the agent has lost while the host still sees it
//! attached (an RDP session grabbed it, a driver hung, the PKCS#11 module wedged).
//! Pure: events and the time go in, steps to carry out and timeline entries come out;
//! adapters do the I/O.
//!
//! The steps, gentlest first: the agent re-initialises PKCS#11 → the host re-attaches
//! the USB device (`device_del`/`device_add`) → the host resets the USB port → the
//! signing VM is reset. Each step gets a cool-down to work before the next is tried;
//! a step that ran recently (its rate limit) is skipped rather than repeated; the
//! ladder stops at the first step after which the token is back, and after the last
//! step it alerts once and waits — it never loops.

use std::time::{Duration, Instant};

/// One rung of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The agent finalises and re-initialises its PKCS#11 module.
    AgentReinit,
    /// The host detaches and re-attaches the token's USB device to the VM.
    Reattach,
    /// The host resets the token's USB port.
    UsbPortReset,
    /// The signing VM is reset.
    VmReset,
}

impl Step {
    /// The ladder, gentlest first.
    pub const LADDER: [Step; 4] = [
        Step::AgentReinit,
        Step::Reattach,
        Step::UsbPortReset,
        Step::VmReset,
    ];
}

/// How long each step gets, and how often it may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPolicy {
    /// How long the step gets to bring the token back before the next is tried.
    pub cooldown: Duration,
    /// The step runs at most once per this long, across incidents.
    pub min_interval: Duration,
}

/// The ladder's timing, per step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LadderPolicy {
    pub agent_reinit: StepPolicy,
    pub reattach: StepPolicy,
    pub usb_port_reset: StepPolicy,
    pub vm_reset: StepPolicy,
}

impl Default for LadderPolicy {
    fn default() -> Self {
        let s = |cooldown, min_interval| StepPolicy {
            cooldown: Duration::from_secs(cooldown),
            min_interval: Duration::from_secs(min_interval),
        };
        LadderPolicy {
            agent_reinit: s(10, 0),
            reattach: s(15, 60),
            usb_port_reset: s(20, 300),
            // A signing VM takes a while to boot and its agent to log in again.
            vm_reset: s(180, 1800),
        }
    }
}

impl LadderPolicy {
    fn of(&self, step: Step) -> &StepPolicy {
        match step {
            Step::AgentReinit => &self.agent_reinit,
            Step::Reattach => &self.reattach,
            Step::UsbPortReset => &self.usb_port_reset,
            Step::VmReset => &self.vm_reset,
        }
    }
}

/// What happens to the ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The agent reports the token lost while the host still sees it attached.
    TokenLost { reason: String },
    /// The agent reports the token back (logged in again).
    TokenBack,
    /// Time passes.
    Tick,
    /// An operator starts over (after fixing something by hand).
    Reset,
}

/// What the adapters are asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run(Step),
    /// Every step has been tried: tell a person (once per incident).
    Alert(String),
}

/// One line of the recovery timeline: what was seen or done, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub at: Instant,
    pub what: Record,
}

/// The kinds of timeline lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Lost {
        reason: String,
    },
    Ran(Step),
    Skipped {
        step: Step,
        ran_ago: Duration,
    },
    Exhausted,
    /// The token came back after `after` (`step`: the last step run, if any).
    Recovered {
        after: Duration,
        step: Option<Step>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Idle,
    /// Climbing: `next` is the index of the next step; the current one ran at `since`.
    Climbing {
        lost_at: Instant,
        current: Option<(Step, Instant)>,
        next: usize,
    },
    /// Every step tried; waiting for the token or an operator.
    Exhausted {
        lost_at: Instant,
        last: Option<Step>,
    },
}

/// The ladder for one token.
#[derive(Debug, Clone)]
pub struct Ladder {
    policy: LadderPolicy,
    state: State,
    last_run: Vec<(Step, Instant)>,
}

impl Ladder {
    pub fn new(policy: LadderPolicy) -> Self {
        Ladder {
            policy,
            state: State::Idle,
            last_run: Vec::new(),
        }
    }

    /// True while the token is lost (climbing or exhausted).
    pub fn in_incident(&self) -> bool {
        self.state != State::Idle
    }

    /// Feeds one event at time `now`; returns what to do and what to record.
    pub fn on(&mut self, event: Event, now: Instant) -> (Vec<Action>, Vec<Entry>) {
        let mut actions = Vec::new();
        let mut entries = Vec::new();
        let entry = |what| Entry { at: now, what };
        match (event, self.state.clone()) {
            (Event::TokenLost { reason }, State::Idle) => {
                entries.push(entry(Record::Lost { reason }));
                self.state = State::Climbing {
                    lost_at: now,
                    current: None,
                    next: 0,
                };
                self.climb(now, &mut actions, &mut entries);
            }
            // Told twice: the incident is already being handled.
            (Event::TokenLost { .. }, _) => {}
            (
                Event::TokenBack,
                State::Climbing {
                    lost_at, current, ..
                },
            ) => {
                entries.push(entry(Record::Recovered {
                    after: now.saturating_duration_since(lost_at),
                    step: current.map(|(s, _)| s),
                }));
                self.state = State::Idle;
            }
            (Event::TokenBack, State::Exhausted { lost_at, last }) => {
                entries.push(entry(Record::Recovered {
                    after: now.saturating_duration_since(lost_at),
                    step: last,
                }));
                self.state = State::Idle;
            }
            (Event::TokenBack, State::Idle) => {}
            (
                Event::Tick,
                State::Climbing {
                    current: Some((step, since)),
                    ..
                },
            ) => {
                if now.saturating_duration_since(since) >= self.policy.of(step).cooldown {
                    self.climb(now, &mut actions, &mut entries);
                }
            }
            (Event::Tick, _) => {}
            (Event::Reset, _) => self.state = State::Idle,
        }
        (actions, entries)
    }

    /// Runs the next step that its rate limit allows; after the last, alerts.
    fn climb(&mut self, now: Instant, actions: &mut Vec<Action>, entries: &mut Vec<Entry>) {
        let State::Climbing {
            lost_at,
            current,
            mut next,
        } = self.state.clone()
        else {
            return;
        };
        while let Some(&step) = Step::LADDER.get(next) {
            next += 1;
            let ran = self
                .last_run
                .iter()
                .find(|(s, _)| *s == step)
                .map(|(_, at)| *at);
            if let Some(at) = ran {
                let ago = now.saturating_duration_since(at);
                if ago < self.policy.of(step).min_interval {
                    entries.push(Entry {
                        at: now,
                        what: Record::Skipped { step, ran_ago: ago },
                    });
                    continue;
                }
            }
            self.last_run.retain(|(s, _)| *s != step);
            self.last_run.push((step, now));
            actions.push(Action::Run(step));
            entries.push(Entry {
                at: now,
                what: Record::Ran(step),
            });
            self.state = State::Climbing {
                lost_at,
                current: Some((step, now)),
                next,
            };
            return;
        }
        let last = current.map(|(s, _)| s);
        actions.push(Action::Alert(format!(
            "the token is still lost after every recovery step ({}); jobs wait until their deadline: look at the signing VM (RDP session holding the token? driver?) and unplug and replug the token",
            Step::LADDER.map(|s| format!("{s:?}")).join(", ")
        )));
        entries.push(Entry {
            at: now,
            what: Record::Exhausted,
        });
        self.state = State::Exhausted { lost_at, last };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ladder() -> (Ladder, Instant) {
        (Ladder::new(LadderPolicy::default()), Instant::now())
    }

    fn lost() -> Event {
        Event::TokenLost {
            reason: "CKR_DEVICE_REMOVED".into(),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_loss_starts_with_the_gentlest_step_and_recovery_ends_it() {
        let (mut l, t0) = ladder();
        let (a, e) = l.on(lost(), t0);
        assert_eq!(a, vec![Action::Run(Step::AgentReinit)]);
        assert!(matches!(e[0].what, Record::Lost { .. }));
        assert_eq!(e[1].what, Record::Ran(Step::AgentReinit));
        assert!(l.in_incident());
        let (a, e) = l.on(Event::TokenBack, t0 + secs(3));
        assert!(a.is_empty());
        assert_eq!(
            e[0].what,
            Record::Recovered {
                after: secs(3),
                step: Some(Step::AgentReinit)
            }
        );
        assert!(!l.in_incident());
    }

    #[test]
    fn each_step_gets_its_cooldown_then_the_next_runs_then_one_alert() {
        let (mut l, t0) = ladder();
        l.on(lost(), t0);
        // Before the cool-down, ticks do nothing.
        assert!(l.on(Event::Tick, t0 + secs(9)).0.is_empty());
        let mut t = t0;
        let mut ran = vec![Step::AgentReinit];
        for (step, wait) in [
            (Step::Reattach, 10),
            (Step::UsbPortReset, 15),
            (Step::VmReset, 20),
        ] {
            t += secs(wait);
            let (a, _) = l.on(Event::Tick, t);
            assert_eq!(a, vec![Action::Run(step)], "after {ran:?}");
            ran.push(step);
        }
        // The last step's cool-down passes: alert once, then nothing more, ever.
        t += secs(180);
        let (a, e) = l.on(Event::Tick, t);
        assert!(
            matches!(&a[..], [Action::Alert(m)] if m.contains("jobs wait")),
            "{a:?}"
        );
        assert_eq!(e[0].what, Record::Exhausted);
        for k in 1..20 {
            assert!(
                l.on(Event::Tick, t + secs(k * 600)).0.is_empty(),
                "never loops"
            );
        }
        let (_, e) = l.on(Event::TokenBack, t + secs(30));
        assert!(matches!(
            e[0].what,
            Record::Recovered {
                step: Some(Step::VmReset),
                ..
            }
        ));
    }

    #[test]
    fn duplicate_and_out_of_order_events_change_nothing() {
        let (mut l, t0) = ladder();
        assert_eq!(
            l.on(Event::TokenBack, t0),
            (vec![], vec![]),
            "back before lost"
        );
        assert_eq!(l.on(Event::Tick, t0), (vec![], vec![]));
        l.on(lost(), t0);
        assert_eq!(l.on(lost(), t0 + secs(1)), (vec![], vec![]), "lost twice");
        l.on(Event::TokenBack, t0 + secs(2));
        assert_eq!(
            l.on(Event::TokenBack, t0 + secs(3)),
            (vec![], vec![]),
            "back twice"
        );
    }

    #[test]
    fn a_step_that_ran_recently_is_skipped_not_repeated() {
        let (mut l, t0) = ladder();
        l.on(lost(), t0);
        let (a, _) = l.on(Event::Tick, t0 + secs(10));
        assert_eq!(a, vec![Action::Run(Step::Reattach)]);
        l.on(Event::TokenBack, t0 + secs(12));
        // A second incident 30 s later: re-attach ran 20 s ago (limit 60 s).
        let t1 = t0 + secs(40);
        let (a, _) = l.on(lost(), t1);
        assert_eq!(
            a,
            vec![Action::Run(Step::AgentReinit)],
            "re-init has no limit"
        );
        let (a, e) = l.on(Event::Tick, t1 + secs(10));
        assert_eq!(a, vec![Action::Run(Step::UsbPortReset)]);
        assert!(
            matches!(
                e[0].what,
                Record::Skipped {
                    step: Step::Reattach,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn an_operator_reset_starts_over() {
        let (mut l, t0) = ladder();
        l.on(lost(), t0);
        l.on(Event::Reset, t0 + secs(1));
        assert!(!l.in_incident());
        let (a, _) = l.on(lost(), t0 + secs(2));
        assert_eq!(a, vec![Action::Run(Step::AgentReinit)]);
    }
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
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
    /// The step's name in the timeline and in `[recovery]`.
    pub fn name(self) -> &'static str {
        match self {
            Step::AgentReinit => "agent_reinit",
            Step::Reattach => "reattach",
            Step::UsbPortReset => "usb_port_reset",
            Step::VmReset => "vm_reset",
        }
    }

    /// The step by its name.
    pub fn from_name(name: &str) -> Option<Step> {
        Step::LADDER.into_iter().find(|s| s.name() == name)
    }

    /// What the step does, in words.
    pub fn words(self) -> &'static str {
        match self {
            Step::AgentReinit => "the agent re-initialises PKCS#11",
            Step::Reattach => "the host re-attaches the token's USB device to the signing VM",
            Step::UsbPortReset => "the host resets the token's USB port",
            Step::VmReset => "the signing VM is reset",
        }
    }

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

/// One step's timing in `[recovery]` (`[recovery.reattach]` …); what is left out
/// keeps its default.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    pub cooldown_seconds: Option<f64>,
    pub min_interval_seconds: Option<f64>,
}

/// `[recovery]` in `signetd.toml`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Climb the ladder when the agent loses a token the host has in the VM (on by
    /// default; off, losses are only recorded and jobs wait).
    pub enabled: bool,
    /// The signing VM the agent runs in, when `agent` is not a vsock address (a vsock
    /// agent's VM is its CID); default: the one VM in `[[tokens]]`.
    pub agent_vm: Option<u32>,
    pub agent_reinit: StepConfig,
    pub reattach: StepConfig,
    pub usb_port_reset: StepConfig,
    pub vm_reset: StepConfig,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            enabled: true,
            agent_vm: None,
            agent_reinit: StepConfig::default(),
            reattach: StepConfig::default(),
            usb_port_reset: StepConfig::default(),
            vm_reset: StepConfig::default(),
        }
    }
}

impl RecoveryConfig {
    /// The ladder's timing: the defaults, with what the configuration changes.
    pub fn policy(&self) -> LadderPolicy {
        let d = LadderPolicy::default();
        let merge = |c: &StepConfig, d: &StepPolicy| StepPolicy {
            cooldown: c
                .cooldown_seconds
                .map(Duration::from_secs_f64)
                .unwrap_or(d.cooldown),
            min_interval: c
                .min_interval_seconds
                .map(Duration::from_secs_f64)
                .unwrap_or(d.min_interval),
        };
        LadderPolicy {
            agent_reinit: merge(&self.agent_reinit, &d.agent_reinit),
            reattach: merge(&self.reattach, &d.reattach),
            usb_port_reset: merge(&self.usb_port_reset, &d.usb_port_reset),
            vm_reset: merge(&self.vm_reset, &d.vm_reset),
        }
    }

    /// What is wrong, as (key, message).
    pub fn check(&self) -> Result<(), (String, String)> {
        for (name, c) in [
            ("agent_reinit", &self.agent_reinit),
            ("reattach", &self.reattach),
            ("usb_port_reset", &self.usb_port_reset),
            ("vm_reset", &self.vm_reset),
        ] {
            for (key, v) in [
                ("cooldown_seconds", c.cooldown_seconds),
                ("min_interval_seconds", c.min_interval_seconds),
            ] {
                if let Some(v) = v {
                    if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
                        return Err((
                            format!("recovery.{name}.{key}"),
                            "give a number of seconds from 0 to 86400".into(),
                        ));
                    }
                }
            }
        }
        if self.agent_vm == Some(0) {
            return Err((
                "recovery.agent_vm".into(),
                "give the signing VM's id, e.g. agent_vm = 105".into(),
            ));
        }
        Ok(())
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
    /// The step cannot run for this token (no USB passthrough, no monitor).
    Unavailable(Step),
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

impl Record {
    /// The timeline's event name and detail for this record.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            Record::Lost { reason } => (
                "recovery_started",
                format!("the token is lost in the signing VM while the host has it attached ({reason}); recovery starts"),
            ),
            Record::Ran(step) => ("recovery_step", format!("{}: {}", step.name(), step.words())),
            Record::Skipped { step, ran_ago } => (
                "recovery_step_skipped",
                format!(
                    "{}: skipped, it ran {} s ago (its rate limit)",
                    step.name(),
                    ran_ago.as_secs()
                ),
            ),
            Record::Unavailable(step) => (
                "recovery_step_skipped",
                format!("{}: skipped, not possible for this token (no USB passthrough or no monitor for its VM)", step.name()),
            ),
            Record::Exhausted => (
                "recovery_exhausted",
                "every recovery step was tried and the token is still lost; jobs wait until their deadline — operator action needed".to_owned(),
            ),
            Record::Recovered { step, .. } => (
                "recovered",
                match step {
                    Some(s) => format!("the token is back after {}", s.name()),
                    None => "the token is back".to_owned(),
                },
            ),
        }
    }
}

/// The ladder for one token.
#[derive(Debug, Clone)]
pub struct Ladder {
    policy: LadderPolicy,
    state: State,
    last_run: Vec<(Step, Instant)>,
    unavailable: Vec<Step>,
}

impl Ladder {
    pub fn new(policy: LadderPolicy) -> Self {
        Ladder {
            policy,
            state: State::Idle,
            last_run: Vec::new(),
            unavailable: Vec::new(),
        }
    }

    /// Which steps can run for this token (the host steps need USB passthrough and
    /// the VM's monitor); the others are skipped and say so.
    pub fn set_available(&mut self, available: &[Step]) {
        self.unavailable = Step::LADDER
            .into_iter()
            .filter(|s| !available.contains(s))
            .collect();
    }

    /// That `step` ran at `at` (before a restart: its rate limit holds across one).
    pub fn remember(&mut self, step: Step, at: Instant) {
        match self.last_run.iter_mut().find(|(s, _)| *s == step) {
            Some(run) if run.1 >= at => {}
            Some(run) => run.1 = at,
            None => self.last_run.push((step, at)),
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
            if self.unavailable.contains(&step) {
                entries.push(Entry {
                    at: now,
                    what: Record::Unavailable(step),
                });
                continue;
            }
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
    fn steps_that_cannot_run_are_skipped_and_said() {
        let (mut l, t0) = ladder();
        l.set_available(&[Step::AgentReinit, Step::VmReset]);
        l.on(lost(), t0);
        let (a, e) = l.on(Event::Tick, t0 + secs(10));
        assert_eq!(a, vec![Action::Run(Step::VmReset)]);
        assert_eq!(
            e.iter().map(|e| e.what.clone()).collect::<Vec<_>>(),
            vec![
                Record::Unavailable(Step::Reattach),
                Record::Unavailable(Step::UsbPortReset),
                Record::Ran(Step::VmReset)
            ]
        );
        assert_eq!(e[0].what.describe().0, "recovery_step_skipped");
        // Nothing available at all: the loss alerts at once.
        let (mut l, t0) = ladder();
        l.set_available(&[]);
        let (a, _) = l.on(lost(), t0);
        assert!(matches!(&a[..], [Action::Alert(_)]), "{a:?}");
    }

    #[test]
    fn a_step_remembered_from_before_a_restart_keeps_its_rate_limit() {
        let (mut l, t0) = ladder();
        let t1 = t0 + secs(1000);
        l.remember(Step::VmReset, t1 - secs(60));
        l.remember(Step::VmReset, t1 - secs(600));
        l.on(lost(), t1);
        let (a, _) = l.on(Event::Tick, t1 + secs(10));
        assert_eq!(a, vec![Action::Run(Step::Reattach)]);
        let (a, _) = l.on(Event::Tick, t1 + secs(25));
        assert_eq!(a, vec![Action::Run(Step::UsbPortReset)]);
        let (a, e) = l.on(Event::Tick, t1 + secs(45));
        assert!(matches!(&a[..], [Action::Alert(_)]), "{a:?}");
        assert!(
            matches!(
                e[0].what,
                Record::Skipped {
                    step: Step::VmReset,
                    ..
                }
            ),
            "the newest run counts: {e:?}"
        );
        for s in Step::LADDER {
            assert_eq!(Step::from_name(s.name()), Some(s));
        }
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

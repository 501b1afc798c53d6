//! The recovery timeline's clock: what the daemon saw happen to the agent and the token, what
//! it did about it, and how long signing was unavailable — kept in `state_dir/signet.db`
//! (table `timeline`) and shown by the status.
//!
//! [`Clock`] is pure: it turns what was seen into entries, pairing each loss with its
//! return (the time between is the entry's `duration_ms`) and the return with the first
//! job signed after it (the time to recover, from the field's point of view). Events
//! that arrive twice or out of order make no entry. An outage of the agent counts from
//! the first contact that failed (a health read, a job sent, the status) — not from
//! when the daemon gave up on the stream, which can be much later — to the return;
//! the `agent_unreachable` entry carries that first failure's time. The timeline
//! service (`services::timeline`) keeps the clock and writes its entries.

/// Something the daemon saw or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A contact with the agent failed (a health read or a job that got no answer):
    /// the outage, if one follows, counts from the first such failure.
    ContactFailed,
    /// The agent answered a contact: a failure before it was a blip.
    ContactOk,
    /// The agent cannot be reached (why).
    AgentDown(String),
    AgentUp,
    /// The agent reports the token gone (its detail).
    TokenLost(String),
    TokenBack,
    /// The agent's session logged in to the token.
    LoggedIn,
    /// The daemon gave the agent the PIN from its PIN file.
    PinDelivered,
    /// The token refused the host's PIN (what to do).
    PinRejected(String),
    /// A job was signed.
    JobSigned(String),
    /// A host shutdown was announced; the daemon drains.
    ShutdownDrain,
    /// The drain ended (whether the job at the token ended in time).
    ShutdownReleased {
        job_ended: bool,
    },
    /// A step of the escalation ladder for a token lost in the signing VM.
    Ladder(crate::core::recovery::Record),
    /// The ladder stopped without the token back (why).
    RecoveryStopped(String),
    /// A step of the ladder could not be carried out (which, why).
    StepFailed(String),
    /// The signing VM's QEMU reset it.
    VmReset,
    /// The signing VM shut down, or its QEMU went away.
    VmDown,
}

/// One entry before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub time_ms: u64,
    pub event: &'static str,
    pub detail: String,
    pub duration_ms: Option<u64>,
}

/// How much an entry matters to whoever reads the log: its level there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Signing works, or came back.
    Info,
    /// Signing stopped (the agent, the token or its VM went away, a step failed); jobs
    /// wait for it to come back.
    Warning,
    /// Only a person can bring it back (a PIN refused, the ladder gave up).
    Error,
}

impl Entry {
    /// How much this entry matters ([`Severity`]).
    pub fn severity(&self) -> Severity {
        match self.event {
            "agent_unreachable" | "token_lost" | "vm_down" | "recovery_step_failed" => {
                Severity::Warning
            }
            "pin_rejected" | "recovery_stopped" => Severity::Error,
            _ => Severity::Info,
        }
    }
}

/// The pairing state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Clock {
    agent_down_since: Option<u64>,
    /// The first failed contact since the agent last answered.
    first_failure: Option<u64>,
    token_lost_since: Option<u64>,
    /// When signing came back, waiting for the first job signed after it.
    back_at: Option<u64>,
}

impl Clock {
    /// The entry for `seen` at `now` (ms), if it makes one.
    pub fn on(&mut self, seen: Seen, now: u64) -> Option<Entry> {
        let entry = |event, detail: String, duration_ms| {
            Some(Entry {
                time_ms: now,
                event,
                detail,
                duration_ms,
            })
        };
        match seen {
            Seen::ContactFailed => {
                if self.agent_down_since.is_none() && self.first_failure.is_none() {
                    self.first_failure = Some(now);
                }
                None
            }
            Seen::ContactOk => {
                if self.agent_down_since.is_none() {
                    self.first_failure = None;
                }
                None
            }
            Seen::AgentDown(why) => {
                if self.agent_down_since.is_some() {
                    return None;
                }
                let since = self.first_failure.take().map_or(now, |f| f.min(now));
                self.agent_down_since = Some(since);
                self.back_at = None;
                Some(Entry {
                    time_ms: since,
                    event: "agent_unreachable",
                    detail: why,
                    duration_ms: None,
                })
            }
            Seen::AgentUp => {
                self.first_failure = None;
                let since = self.agent_down_since.take()?;
                self.back_at = Some(now);
                entry(
                    "agent_back",
                    "the signing agent answers again".to_owned(),
                    Some(now.saturating_sub(since)),
                )
            }
            Seen::TokenLost(detail) => {
                if self.token_lost_since.is_some() {
                    return None;
                }
                self.token_lost_since = Some(now);
                self.back_at = None;
                entry("token_lost", detail, None)
            }
            Seen::TokenBack => {
                let since = self.token_lost_since.take()?;
                self.back_at = Some(now);
                entry(
                    "token_back",
                    "the agent re-initialised PKCS#11 and found the token again".to_owned(),
                    Some(now.saturating_sub(since)),
                )
            }
            Seen::LoggedIn => entry(
                "logged_in",
                "the agent logged in to the token".to_owned(),
                None,
            ),
            Seen::PinDelivered => entry(
                "pin_delivered",
                "the host gave the agent the PIN from its PIN file".to_owned(),
                None,
            ),
            Seen::PinRejected(fix) => entry("pin_rejected", fix, None),
            Seen::JobSigned(job) => {
                let back = self.back_at.take()?;
                let ms = now.saturating_sub(back);
                entry(
                    "first_job_signed",
                    format!("job {job}, the first signed since signing came back"),
                    Some(ms),
                )
            }
            Seen::ShutdownDrain => entry(
                "shutdown_drain",
                "the host is shutting down: no new jobs, waiting for the job at the token"
                    .to_owned(),
                None,
            ),
            Seen::ShutdownReleased { job_ended } => entry(
                "shutdown_released",
                if job_ended {
                    "no job at the token; the shutdown goes on, queued jobs run after the boot"
                } else {
                    "the job at the token did not end in time; it runs again after the boot"
                }
                .to_owned(),
                None,
            ),
            Seen::Ladder(record) => {
                let (event, detail) = record.describe();
                let duration = match &record {
                    crate::core::recovery::Record::Recovered { after, .. } => {
                        Some(after.as_millis() as u64)
                    }
                    _ => None,
                };
                if matches!(record, crate::core::recovery::Record::Recovered { .. }) {
                    self.back_at = Some(now);
                }
                entry(event, detail, duration)
            }
            Seen::RecoveryStopped(why) => entry("recovery_stopped", why, None),
            Seen::StepFailed(why) => entry("recovery_step_failed", why, None),
            Seen::VmReset => entry(
                "vm_reset",
                "the signing VM was reset (a reboot): its agent comes back and gets the PIN from the host"
                    .to_owned(),
                None,
            ),
            Seen::VmDown => entry(
                "vm_down",
                "the signing VM shut down or its QEMU stopped; the token waits on the host"
                    .to_owned(),
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_a_warning_and_what_needs_a_person_an_error() {
        let mut clock = Clock::default();
        let down = clock.on(Seen::AgentDown("refused".into()), 1).unwrap();
        assert_eq!(down.severity(), Severity::Warning, "{down:?}");
        let up = clock.on(Seen::AgentUp, 2).unwrap();
        assert_eq!(up.severity(), Severity::Info, "{up:?}");
        let lost = clock.on(Seen::TokenLost("gone".into()), 3).unwrap();
        assert_eq!(lost.severity(), Severity::Warning);
        let pin = clock.on(Seen::PinRejected("fix it".into()), 4).unwrap();
        assert_eq!(pin.severity(), Severity::Error);
        let stopped = clock
            .on(Seen::RecoveryStopped("gave up".into()), 5)
            .unwrap();
        assert_eq!(stopped.severity(), Severity::Error);
        let vm = clock.on(Seen::VmDown, 6).unwrap();
        assert_eq!(vm.severity(), Severity::Warning);
    }

    #[test]
    fn an_agent_outage_counts_from_the_first_failed_contact() {
        let mut c = Clock::default();
        // A blip: one failure, then an answer.
        assert_eq!(c.on(Seen::ContactFailed, 500), None);
        assert_eq!(c.on(Seen::ContactOk, 600), None);
        // Killed at 1 s: jobs and health reads fail from then on, the silent stream is
        // given up only at 30.7 s, the agent is back at 31 s.
        assert_eq!(c.on(Seen::ContactFailed, 1_000), None);
        assert_eq!(c.on(Seen::ContactFailed, 11_000), None);
        let down = c.on(Seen::AgentDown("no answer".into()), 30_700).unwrap();
        assert_eq!((down.event, down.time_ms), ("agent_unreachable", 1_000));
        assert_eq!(c.on(Seen::ContactOk, 30_800), None, "not yet the return");
        let back = c.on(Seen::AgentUp, 31_000).unwrap();
        assert_eq!((back.event, back.duration_ms), ("agent_back", Some(30_000)));
        // The next outage starts from its own first failure, not the old one.
        assert_eq!(c.on(Seen::ContactFailed, 40_000), None);
        let down = c.on(Seen::AgentDown("gone".into()), 40_100).unwrap();
        assert_eq!(down.time_ms, 40_000);
        let back = c.on(Seen::AgentUp, 41_100).unwrap();
        assert_eq!(back.duration_ms, Some(1_100));
        // Without a failure before it, the outage starts when it is seen.
        let down = c.on(Seen::AgentDown("refused".into()), 50_000).unwrap();
        assert_eq!(down.time_ms, 50_000);
    }

    #[test]
    fn a_loss_is_paired_with_its_return_and_the_first_job_after_it() {
        let mut c = Clock::default();
        let lost = c
            .on(Seen::TokenLost("CKR_DEVICE_REMOVED".into()), 1_000)
            .unwrap();
        assert_eq!((lost.event, lost.duration_ms), ("token_lost", None));
        assert_eq!(c.on(Seen::TokenLost("again".into()), 1_500), None, "twice");
        let back = c.on(Seen::TokenBack, 4_000).unwrap();
        assert_eq!((back.event, back.duration_ms), ("token_back", Some(3_000)));
        let first = c.on(Seen::JobSigned("7".into()), 4_250).unwrap();
        assert_eq!(
            (first.event, first.duration_ms),
            ("first_job_signed", Some(250))
        );
        assert!(first.detail.contains("job 7"));
        assert_eq!(
            c.on(Seen::JobSigned("8".into()), 4_300),
            None,
            "only the first"
        );
    }

    #[test]
    fn ladder_steps_are_entries_and_a_recovery_waits_for_the_first_job() {
        use crate::core::recovery::{Record, Step};
        let mut c = Clock::default();
        let ran = c.on(Seen::Ladder(Record::Ran(Step::Reattach)), 10).unwrap();
        assert_eq!(ran.event, "recovery_step");
        assert!(ran.detail.starts_with("reattach: "), "{}", ran.detail);
        let back = c
            .on(
                Seen::Ladder(Record::Recovered {
                    after: std::time::Duration::from_millis(900),
                    step: Some(Step::Reattach),
                }),
                20,
            )
            .unwrap();
        assert_eq!((back.event, back.duration_ms), ("recovered", Some(900)));
        assert_eq!(
            c.on(Seen::JobSigned("3".into()), 70).unwrap().duration_ms,
            Some(50)
        );
        assert_eq!(c.on(Seen::VmReset, 80).unwrap().event, "vm_reset");
    }

    #[test]
    fn returns_without_a_loss_and_jobs_without_a_return_make_no_entry() {
        let mut c = Clock::default();
        assert_eq!(c.on(Seen::TokenBack, 10), None);
        assert_eq!(c.on(Seen::AgentUp, 10), None);
        assert_eq!(c.on(Seen::JobSigned("1".into()), 20), None);
        assert!(c.on(Seen::LoggedIn, 30).is_some());
    }

    #[test]
    fn an_agent_restart_is_timed_from_the_first_time_it_was_unreachable() {
        let mut c = Clock::default();
        assert!(c.on(Seen::AgentDown("refused".into()), 100).is_some());
        assert_eq!(c.on(Seen::AgentDown("refused".into()), 200), None);
        let up = c.on(Seen::AgentUp, 2_100).unwrap();
        assert_eq!(up.duration_ms, Some(2_000));
        // A loss after the return restarts the wait for the first job.
        c.on(Seen::TokenLost("gone".into()), 2_200);
        assert_eq!(c.on(Seen::JobSigned("1".into()), 2_300), None);
        c.on(Seen::TokenBack, 3_000);
        assert_eq!(
            c.on(Seen::JobSigned("2".into()), 3_100)
                .unwrap()
                .duration_ms,
            Some(100)
        );
    }
}

//! Prometheus metrics: what the job path counts as jobs end ([`JobMetrics`], fed by
//! [`crate::services::jobs`]), and the exposition of it together with the gauges read
//! at each scrape ([`Snapshot`], read by [`crate::services::scrape`]) in the OpenMetrics
//! text format ([`render`]).
//!
//! Names follow Prometheus' conventions: the `signet_` prefix, base units (seconds,
//! bytes) in the name, `_total` on counters. Labels are few and bounded: a configured
//! profile, a job's end, an error code, a step of the recovery ladder, a token's
//! serial, a certificate on the token. Never a job id, a caller or a file name; nothing
//! secret (no PIN, no caller secret) is ever a value or a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use signet_api::wire::{AgentHealth, AgentState, ErrorCode, JobState};

use crate::adapters::store::JobRow;
use crate::config::Profile;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A job's profile and how it ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    profile: String,
    result: String,
}

/// A profile and the error code a job ended with, or a request was refused with.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    profile: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileLabel {
    profile: String,
}

type Histograms = Family<ProfileLabel, Histogram, fn() -> Histogram>;

/// From a tenth of a second to about 40 minutes: a job's wait for its turn.
fn wait_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.5, 12))
}

/// From 50 ms to about 7 minutes: a job at the agent.
fn signing_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// The job path's counters and histograms, kept for the daemon's life (they start at
/// zero with each process, as Prometheus expects of counters). Cloning shares them.
#[derive(Debug, Clone)]
pub struct JobMetrics {
    jobs: Family<JobLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    refusals: Family<ErrorLabels, Counter>,
    wait: Histograms,
    signing: Histograms,
}

impl Default for JobMetrics {
    fn default() -> Self {
        JobMetrics {
            jobs: Family::default(),
            errors: Family::default(),
            refusals: Family::default(),
            wait: Family::new_with_constructor(wait_buckets),
            signing: Family::new_with_constructor(signing_buckets),
        }
    }
}

/// The result label of a job that ended in `state`; `None` while it has not ended.
fn result_of(state: JobState) -> Option<&'static str> {
    match state {
        JobState::Signed => Some("signed"),
        JobState::Failed => Some("failed"),
        JobState::Cancelled => Some("cancelled"),
        JobState::Receiving | JobState::Queued | JobState::Running => None,
    }
}

fn seconds(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

impl JobMetrics {
    /// Counts a job that has ended, as recorded (`row`): its end, its error's code,
    /// how long it waited from its record to the agent, and, signed, how long it was
    /// at the agent. A row that has not ended counts nothing.
    pub fn job_ended(&self, row: &JobRow) {
        let Some(result) = result_of(row.state) else {
            return;
        };
        let profile = row.profile.clone();
        self.jobs
            .get_or_create(&JobLabels {
                profile: profile.clone(),
                result: result.into(),
            })
            .inc();
        if row.state == JobState::Failed {
            if let Some(e) = &row.error {
                self.errors
                    .get_or_create(&ErrorLabels {
                        profile: profile.clone(),
                        code: e.code.as_str().into(),
                    })
                    .inc();
            }
        }
        let label = ProfileLabel { profile };
        if let Some(started) = row.started_ms {
            self.wait
                .get_or_create(&label)
                .observe(seconds(row.created_ms, started));
            if let (JobState::Signed, Some(finished)) = (row.state, row.finished_ms) {
                self.signing
                    .get_or_create(&label)
                    .observe(seconds(started, finished));
            }
        }
    }

    /// Counts a refused request: a signing request before it became a job, or an
    /// operator's (every refusal the audit log records). `profile` is taken only when
    /// it is configured (`profiles`), so that what callers send cannot make labels.
    pub fn refused<'p>(
        &self,
        profile: Option<&str>,
        mut profiles: impl Iterator<Item = &'p String>,
        code: ErrorCode,
    ) {
        let profile = profile
            .filter(|p| profiles.any(|known| known == p))
            .unwrap_or_default()
            .to_owned();
        self.refusals
            .get_or_create(&ErrorLabels {
                profile,
                code: code.as_str().into(),
            })
            .inc();
    }
}

/// The PIN's state as the metrics show it (one-hot: one state is 1, the others 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinState {
    /// Logged in; no wrong PIN since the last good login.
    Ok,
    /// The token is present and the agent has no PIN.
    Needed,
    /// A wrong PIN was entered since the last good login (`CKF_USER_PIN_COUNT_LOW`).
    CountLow,
    /// One more wrong PIN locks the token.
    FinalTry,
    /// The token's PIN is locked.
    Locked,
    /// The token refused the PIN given (the host's or the agent's own).
    Rejected,
    /// Not known: the agent has not answered, or no token is present.
    Unknown,
}

impl PinState {
    pub const ALL: [PinState; 7] = [
        PinState::Ok,
        PinState::Needed,
        PinState::CountLow,
        PinState::FinalTry,
        PinState::Locked,
        PinState::Rejected,
        PinState::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PinState::Ok => "ok",
            PinState::Needed => "needed",
            PinState::CountLow => "count_low",
            PinState::FinalTry => "final_try",
            PinState::Locked => "locked",
            PinState::Rejected => "rejected",
            PinState::Unknown => "unknown",
        }
    }

    /// The state from the agent's health (`None`: it has not answered) and whether the
    /// token refused the host's PIN; the worse of what they say.
    pub fn of(health: Option<&AgentHealth>, host_pin_rejected: bool) -> PinState {
        let Some(h) = health else {
            return if host_pin_rejected {
                PinState::Rejected
            } else {
                PinState::Unknown
            };
        };
        let flags = h.pin.unwrap_or_default();
        if flags.locked {
            PinState::Locked
        } else if host_pin_rejected || h.state == AgentState::PinRejected {
            PinState::Rejected
        } else if flags.final_try {
            PinState::FinalTry
        } else if h.state == AgentState::PinLocked {
            PinState::Locked
        } else if h.state == AgentState::PinNeeded {
            PinState::Needed
        } else if flags.count_low {
            PinState::CountLow
        } else if h.logged_in {
            PinState::Ok
        } else {
            PinState::Unknown
        }
    }
}

/// A token the metrics name by its serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLine {
    pub serial: String,
    pub present: bool,
    pub logged_in: bool,
}

/// A certificate on the agent's token and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertLine {
    pub serial: String,
    /// Its `CKA_LABEL`.
    pub label: String,
    /// Its SHA-256 fingerprint, lowercase hex (what a profile's `certificate` names).
    pub sha256: String,
    /// notAfter, seconds since the epoch.
    pub not_after: i64,
}

/// Everything the metrics read at a scrape, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Jobs that have not ended, by state (receiving, queued, running; all three given).
    pub jobs: Vec<(JobState, u64)>,
    /// The agent answered its last health read.
    pub agent_up: bool,
    /// Its state then.
    pub agent_state: Option<AgentState>,
    pub tokens: Vec<TokenLine>,
    pub pin: PinState,
    pub certificates: Vec<CertLine>,
    /// Each profile's certificate's notAfter (seconds since the epoch), where known.
    pub profile_certificates: Vec<(String, i64)>,
    /// (step, result: ran, skipped or failed, how often), over the stored timeline.
    pub recovery_steps: Vec<(&'static str, &'static str, u64)>,
    pub spool_used_bytes: u64,
    pub spool_kept_bytes: u64,
    pub spool_quota_bytes: u64,
}

impl Snapshot {
    /// What the agent's `health` (`None`: not answered) says of tokens, the PIN and
    /// certificates, with the `[[tokens]]` serials (`assigned`), the profiles and
    /// whether the token refused the host's PIN; the rest empty.
    pub fn from_agent<'a>(
        health: Option<&AgentHealth>,
        assigned: impl Iterator<Item = &'a str>,
        profiles: impl Iterator<Item = (&'a String, &'a Profile)>,
        host_pin_rejected: bool,
    ) -> Snapshot {
        let token = health.and_then(|h| h.token.as_ref());
        let serial = token.map(|t| t.serial.clone()).unwrap_or_default();
        let mut tokens = vec![TokenLine {
            serial: serial.clone(),
            present: health.is_some_and(|h| h.token_present),
            logged_in: health.is_some_and(|h| h.logged_in),
        }];
        for s in assigned {
            if !tokens.iter().any(|t| t.serial == s) {
                tokens.push(TokenLine {
                    serial: s.to_owned(),
                    present: false,
                    logged_in: false,
                });
            }
        }
        // The agent knows no token and [[tokens]] names some: those say it.
        if serial.is_empty() && tokens.len() > 1 {
            tokens.remove(0);
        }
        let certificates: Vec<CertLine> = health
            .map(|h| h.certificates.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| {
                Some(CertLine {
                    serial: serial.clone(),
                    label: c.label.clone(),
                    sha256: c.sha256.to_ascii_lowercase(),
                    not_after: signet_api::rfc3339::parse(&c.not_after)?.unix_timestamp(),
                })
            })
            .collect();
        let profile_certificates = profiles
            .filter_map(|(name, p)| {
                if p.token.as_ref().is_some_and(|t| *t != serial) {
                    return None;
                }
                let cert = match &p.certificate {
                    Some(fp) => {
                        let fp: String = fp
                            .chars()
                            .filter(|c| *c != ':')
                            .collect::<String>()
                            .to_ascii_lowercase();
                        certificates.iter().find(|c| c.sha256 == fp)?
                    }
                    None if certificates.len() == 1 => &certificates[0],
                    None => return None,
                };
                Some((name.clone(), cert.not_after))
            })
            .collect();
        Snapshot {
            jobs: Vec::new(),
            agent_up: health.is_some(),
            agent_state: health.map(|h| h.state),
            tokens,
            pin: PinState::of(health, host_pin_rejected),
            certificates,
            profile_certificates,
            recovery_steps: Vec::new(),
            spool_used_bytes: 0,
            spool_kept_bytes: 0,
            spool_quota_bytes: 0,
        }
    }
}

/// An agent state's name, as the wire writes it.
fn agent_state_name(s: AgentState) -> &'static str {
    match s {
        AgentState::Ready => "ready",
        AgentState::TokenMissing => "token_missing",
        AgentState::TokenLost => "token_lost",
        AgentState::PinNeeded => "pin_needed",
        AgentState::PinRejected => "pin_rejected",
        AgentState::PinLocked => "pin_locked",
        AgentState::ModuleError => "module_error",
    }
}

const AGENT_STATES: [AgentState; 7] = [
    AgentState::Ready,
    AgentState::TokenMissing,
    AgentState::TokenLost,
    AgentState::PinNeeded,
    AgentState::PinRejected,
    AgentState::PinLocked,
    AgentState::ModuleError,
];

type Labels = Vec<(&'static str, String)>;

/// What became of a recovery step.
pub const STEP_RESULTS: [&str; 3] = ["ran", "skipped", "failed"];

/// A gauge family filled with `lines`.
fn gauges(lines: impl IntoIterator<Item = (Labels, i64)>) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    for (labels, v) in lines {
        f.get_or_create(&labels).set(v);
    }
    f
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// The exposition: the job path's counters and histograms and `snap`'s gauges, in the
/// OpenMetrics text format ([`CONTENT_TYPE`]).
pub fn render(jobs: &JobMetrics, snap: &Snapshot) -> String {
    let mut r = Registry::default();
    r.register(
        "signet_jobs",
        "Jobs that ended, by profile and result (signed, failed, cancelled)",
        jobs.jobs.clone(),
    );
    r.register(
        "signet_job_errors",
        "Jobs that failed, by profile and error code",
        jobs.errors.clone(),
    );
    r.register(
        "signet_refusals",
        "Requests refused (signing requests before they became jobs, and operators'), by profile (empty unless a configured one) and error code",
        jobs.refusals.clone(),
    );
    r.register_with_unit(
        "signet_job_wait",
        "Time from a job's record (its upload included) to its last sending to the agent, of jobs that ended",
        Unit::Seconds,
        jobs.wait.clone(),
    );
    r.register_with_unit(
        "signet_job_signing",
        "Time a signed job spent at the agent (the token's work, timestamps included)",
        Unit::Seconds,
        jobs.signing.clone(),
    );
    r.register(
        "signet_jobs_live",
        "Jobs that have not ended, by state (receiving: uploading; queued: waiting; running: at the agent)",
        gauges(
            snap.jobs
                .iter()
                .map(|(s, n)| (vec![("state", s.as_str().to_owned())], *n as i64)),
        ),
    );
    r.register(
        "signet_agent_up",
        "1 when the signing VM's agent answered its last health read, else 0",
        gauge(i64::from(snap.agent_up)),
    );
    r.register(
        "signet_agent_state",
        "The agent's state at its last answer, one-hot (all 0 while it does not answer)",
        gauges(AGENT_STATES.iter().map(|s| {
            (
                vec![("state", agent_state_name(*s).to_owned())],
                i64::from(snap.agent_state == Some(*s)),
            )
        })),
    );
    r.register(
        "signet_token_present",
        "1 when the agent sees the token with this serial (the agent's token, and each of [[tokens]]), else 0",
        gauges(
            snap.tokens
                .iter()
                .map(|t| (vec![("serial", t.serial.clone())], i64::from(t.present))),
        ),
    );
    r.register(
        "signet_token_logged_in",
        "1 when the agent's session on the token with this serial is logged in, else 0",
        gauges(
            snap.tokens
                .iter()
                .map(|t| (vec![("serial", t.serial.clone())], i64::from(t.logged_in))),
        ),
    );
    r.register(
        "signet_pin_state",
        "The token's PIN, one-hot: ok, needed, count_low, final_try, locked, rejected or unknown",
        gauges(PinState::ALL.iter().map(|s| {
            (
                vec![("state", s.name().to_owned())],
                i64::from(snap.pin == *s),
            )
        })),
    );
    r.register_with_unit(
        "signet_certificate_expiry_timestamp",
        "notAfter of each certificate on the agent's token, seconds since the epoch",
        Unit::Seconds,
        gauges(snap.certificates.iter().map(|c| {
            (
                vec![
                    ("serial", c.serial.clone()),
                    ("label", c.label.clone()),
                    ("sha256", c.sha256.clone()),
                ],
                c.not_after,
            )
        })),
    );
    r.register_with_unit(
        "signet_profile_certificate_expiry_timestamp",
        "notAfter of the certificate each profile signs with (its pinned certificate, or the token's only one), seconds since the epoch",
        Unit::Seconds,
        gauges(
            snap.profile_certificates
                .iter()
                .map(|(p, t)| (vec![("profile", p.clone())], *t)),
        ),
    );
    let steps = Family::<Labels, Counter>::default();
    // Every step and result, at 0 until it happens.
    for step in crate::core::recovery::Step::LADDER {
        for result in STEP_RESULTS {
            steps
                .get_or_create(&vec![
                    ("step", step.name().to_owned()),
                    ("result", result.to_owned()),
                ])
                .inc_by(0);
        }
    }
    for (step, result, n) in &snap.recovery_steps {
        steps
            .get_or_create(&vec![
                ("step", (*step).to_owned()),
                ("result", (*result).to_owned()),
            ])
            .inc_by(*n);
    }
    r.register(
        "signet_recovery_steps",
        "Steps of the recovery ladder, by step and result (ran, skipped, failed), over the stored timeline",
        steps,
    );
    r.register_with_unit(
        "signet_spool_used",
        "Room the spooled inputs and the results not yet delivered take, counted against the quota",
        Unit::Bytes,
        gauge(snap.spool_used_bytes as i64),
    );
    r.register_with_unit(
        "signet_spool_kept",
        "Room the delivered results kept for a retry take (until result_ttl_seconds; dropped first when the spool needs room)",
        Unit::Bytes,
        gauge(snap.spool_kept_bytes as i64),
    );
    r.register_with_unit(
        "signet_spool_quota",
        "The spool's quota ([queue] spool_quota_mb)",
        Unit::Bytes,
        gauge(snap.spool_quota_bytes as i64),
    );
    r.register(
        "signet_build_info",
        "1, labelled with signetd's version",
        gauges([(vec![("version", signet_api::VERSION.to_owned())], 1)]),
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_api::wire::{CertificateSummary, ErrorBody, PinFlags, TokenSummary};

    fn row(profile: &str, state: JobState, times: (u64, Option<u64>, Option<u64>)) -> JobRow {
        JobRow {
            id: "42".into(),
            caller: "vm:105".into(),
            transport: "vsock".into(),
            idempotency_key: None,
            kind: crate::adapters::store::Kind::Sign,
            profile: profile.into(),
            filename: Some("secret-name.exe".into()),
            agent_query: String::new(),
            content_type: String::new(),
            state,
            created_ms: times.0,
            started_ms: times.1,
            finished_ms: times.2,
            attempts: 1,
            input_sha256: None,
            input_bytes: None,
            output_sha256: None,
            output_bytes: None,
            output_type: None,
            error: (state == JobState::Failed)
                .then(|| ErrorBody::new(ErrorCode::TokenUnavailable, "lost")),
            result_gone: false,
        }
    }

    fn health() -> AgentHealth {
        AgentHealth {
            version: "1".into(),
            instance: None,
            state: AgentState::Ready,
            detail: String::new(),
            module: String::new(),
            module_loaded: true,
            slot: None,
            token_present: true,
            token: Some(TokenSummary {
                label: "Signet".into(),
                serial: "0123ABCD".into(),
                ..TokenSummary::default()
            }),
            logged_in: true,
            pin: Some(PinFlags::default()),
            certificates: vec![CertificateSummary {
                label: "code signing".into(),
                sha256: "AB12".into(),
                not_after: "2030-01-02T03:04:05Z".into(),
                ..CertificateSummary::default()
            }],
            signer: String::new(),
            signer_features: None,
            windows: None,
        }
    }

    /// The sample lines of `text` (no comments), for exact comparison.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn ended_jobs_are_counted_by_profile_and_result_never_by_id_or_name() {
        let m = JobMetrics::default();
        m.job_ended(&row(
            "release",
            JobState::Signed,
            (1_000, Some(3_500), Some(4_000)),
        ));
        m.job_ended(&row("release", JobState::Signed, (0, Some(0), Some(100))));
        m.job_ended(&row("release", JobState::Failed, (0, Some(200), Some(300))));
        m.job_ended(&row("test", JobState::Cancelled, (0, None, Some(10))));
        m.job_ended(&row("test", JobState::Queued, (0, None, None)));
        let profiles = ["release".to_owned()];
        m.refused(Some("release"), profiles.iter(), ErrorCode::Forbidden);
        m.refused(
            Some("made-up-by-a-caller"),
            profiles.iter(),
            ErrorCode::UnknownProfile,
        );
        let text = render(
            &m,
            &Snapshot::from_agent(None, [].into_iter(), [].into_iter(), false),
        );
        let s = samples(&text);
        for want in [
            "signet_jobs_total{profile=\"release\",result=\"signed\"} 2",
            "signet_jobs_total{profile=\"release\",result=\"failed\"} 1",
            "signet_jobs_total{profile=\"test\",result=\"cancelled\"} 1",
            "signet_refusals_total{profile=\"release\",code=\"forbidden\"} 1",
            "signet_refusals_total{profile=\"\",code=\"unknown_profile\"} 1",
            "signet_job_errors_total{profile=\"release\",code=\"token_unavailable\"} 1",
            "signet_job_wait_seconds_count{profile=\"release\"} 3",
            "signet_job_wait_seconds_sum{profile=\"release\"} 2.7",
            "signet_job_signing_seconds_count{profile=\"release\"} 2",
            "signet_job_signing_seconds_sum{profile=\"release\"} 0.6",
            "signet_job_signing_seconds_bucket{le=\"0.1\",profile=\"release\"} 1",
        ] {
            assert!(s.contains(&want), "{want} in\n{text}");
        }
        assert!(!text.contains("secret-name") && !text.contains("42") && !text.contains("vm:105"));
        assert!(!text.contains("made-up"), "a caller's words make no label");
        assert!(
            !text.contains("signet_job_wait_seconds_count{profile=\"test\"}"),
            "a job that never reached the agent did not wait for it"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        for name in [
            "signet_jobs",
            "signet_job_errors",
            "signet_refusals",
            "signet_recovery_steps",
        ] {
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
        }
        assert!(text.contains(
            "# TYPE signet_job_wait_seconds histogram\n# UNIT signet_job_wait_seconds seconds\n"
        ));
    }

    #[test]
    fn the_pin_state_is_the_worst_that_is_known() {
        let h = health();
        assert_eq!(PinState::of(Some(&h), false), PinState::Ok);
        assert_eq!(PinState::of(None, false), PinState::Unknown);
        assert_eq!(PinState::of(None, true), PinState::Rejected);
        assert_eq!(PinState::of(Some(&h), true), PinState::Rejected);
        let with = |state, pin: PinFlags, logged_in| AgentHealth {
            state,
            pin: Some(pin),
            logged_in,
            ..health()
        };
        let flags = |count_low, final_try, locked| PinFlags {
            count_low,
            final_try,
            locked,
            to_be_changed: false,
        };
        for (h, want) in [
            (
                with(AgentState::PinNeeded, flags(false, false, false), false),
                PinState::Needed,
            ),
            (
                with(AgentState::Ready, flags(true, false, false), true),
                PinState::CountLow,
            ),
            (
                with(AgentState::PinLocked, flags(true, true, false), false),
                PinState::FinalTry,
            ),
            (
                with(AgentState::PinLocked, flags(false, false, true), false),
                PinState::Locked,
            ),
            (
                with(AgentState::PinRejected, flags(true, false, false), false),
                PinState::Rejected,
            ),
            (
                with(AgentState::TokenMissing, flags(false, false, false), false),
                PinState::Unknown,
            ),
        ] {
            assert_eq!(PinState::of(Some(&h), false), want, "{h:?}");
        }
        // One-hot: one state is 1.
        let text = render(
            &JobMetrics::default(),
            &Snapshot::from_agent(
                Some(&with(
                    AgentState::PinNeeded,
                    flags(false, false, false),
                    false,
                )),
                [].into_iter(),
                [].into_iter(),
                false,
            ),
        );
        let pin: Vec<&str> = samples(&text)
            .into_iter()
            .filter(|l| l.starts_with("signet_pin_state{"))
            .collect();
        assert_eq!(pin.len(), PinState::ALL.len(), "{text}");
        assert_eq!(
            pin.iter().filter(|l| l.ends_with(" 1")).collect::<Vec<_>>(),
            [&"signet_pin_state{state=\"needed\"} 1"]
        );
    }

    #[test]
    fn the_agent_tokens_and_certificates_are_gauges_read_at_the_scrape() {
        let h = health();
        let mut profiles = std::collections::BTreeMap::new();
        profiles.insert("release".to_owned(), Profile::default());
        profiles.insert(
            "pinned".to_owned(),
            Profile {
                certificate: Some("ab:12".into()),
                ..Profile::default()
            },
        );
        profiles.insert(
            "other-token".to_owned(),
            Profile {
                token: Some("FFFF".into()),
                ..Profile::default()
            },
        );
        let mut snap = Snapshot::from_agent(
            Some(&h),
            ["0123ABCD", "0456CDEF"].into_iter(),
            profiles.iter(),
            false,
        );
        snap.jobs = vec![
            (JobState::Receiving, 0),
            (JobState::Queued, 3),
            (JobState::Running, 1),
        ];
        snap.recovery_steps = vec![("reattach", "ran", 2), ("vm_reset", "failed", 1)];
        snap.spool_used_bytes = 4096;
        snap.spool_kept_bytes = 512;
        snap.spool_quota_bytes = 2 << 30;
        let text = render(&JobMetrics::default(), &snap);
        let s = samples(&text);
        let expiry = signet_api::rfc3339::parse("2030-01-02T03:04:05Z")
            .unwrap()
            .unix_timestamp();
        for want in [
            "signet_jobs_live{state=\"queued\"} 3".to_owned(),
            "signet_jobs_live{state=\"running\"} 1".to_owned(),
            "signet_jobs_live{state=\"receiving\"} 0".to_owned(),
            "signet_agent_up 1".to_owned(),
            "signet_agent_state{state=\"ready\"} 1".to_owned(),
            "signet_agent_state{state=\"token_lost\"} 0".to_owned(),
            "signet_token_present{serial=\"0123ABCD\"} 1".to_owned(),
            "signet_token_logged_in{serial=\"0123ABCD\"} 1".to_owned(),
            "signet_token_present{serial=\"0456CDEF\"} 0".to_owned(),
            format!("signet_certificate_expiry_timestamp_seconds{{serial=\"0123ABCD\",label=\"code signing\",sha256=\"ab12\"}} {expiry}"),
            format!("signet_profile_certificate_expiry_timestamp_seconds{{profile=\"release\"}} {expiry}"),
            format!("signet_profile_certificate_expiry_timestamp_seconds{{profile=\"pinned\"}} {expiry}"),
            "signet_recovery_steps_total{step=\"reattach\",result=\"ran\"} 2".to_owned(),
            "signet_recovery_steps_total{step=\"vm_reset\",result=\"failed\"} 1".to_owned(),
            "signet_recovery_steps_total{step=\"agent_reinit\",result=\"ran\"} 0".to_owned(),
            "signet_spool_used_bytes 4096".to_owned(),
            "signet_spool_kept_bytes 512".to_owned(),
            format!("signet_spool_quota_bytes {}", 2u64 << 30),
        ] {
            assert!(s.contains(&want.as_str()), "{want} in\n{text}");
        }
        assert!(
            !text.contains("other-token"),
            "a profile of another token has no expiry here"
        );
        assert_eq!(expiry, 1_893_553_445);
        // Without an answer from the agent: down, no certificates, the one unknown token.
        let down = render(
            &JobMetrics::default(),
            &Snapshot::from_agent(None, [].into_iter(), [].into_iter(), false),
        );
        let s = samples(&down);
        assert!(s.contains(&"signet_agent_up 0"), "{down}");
        assert!(s.contains(&"signet_token_present{serial=\"\"} 0"), "{down}");
        assert!(
            !down.contains("signet_certificate_expiry_timestamp_seconds{"),
            "{down}"
        );
        assert!(
            s.contains(&"signet_pin_state{state=\"unknown\"} 1"),
            "{down}"
        );
    }
}

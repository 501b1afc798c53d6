//! The shim's call log and what a benchmark reads from it.
//!
//! One line per call: `NAME pid=P start=NS busy=NS end=NS rv=RV query=0|1`, times in
//! nanoseconds on `CLOCK_MONOTONIC`. `start` is when the call came in, `busy` when it
//! had the token (after waiting for its turn), `end` when it returned; `query=1` marks
//! a `C_Sign`/`C_SignFinal` that only asked for the signature's length. The benchmark
//! driver adds `JOB` lines to the same log (one per job it ran, `rv=0` when the job
//! succeeded), so jobs and token calls are read on one clock.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub name: String,
    pub pid: u32,
    pub start: u64,
    pub busy: u64,
    pub end: u64,
    pub rv: u64,
    pub query: bool,
}

impl Call {
    /// The line as the log holds it, with its newline.
    pub fn line(&self) -> String {
        format!(
            "{} pid={} start={} busy={} end={} rv={} query={}\n",
            self.name,
            self.pid,
            self.start,
            self.busy,
            self.end,
            self.rv,
            u8::from(self.query)
        )
    }

    /// Reads one line; `None` for a line that is not one of the log's.
    pub fn parse(line: &str) -> Option<Call> {
        let mut words = line.split_whitespace();
        let name = words.next()?.to_owned();
        let mut field = |key: &str| -> Option<u64> {
            let w = words.next()?;
            w.strip_prefix(key)?.strip_prefix('=')?.parse().ok()
        };
        Some(Call {
            pid: u32::try_from(field("pid")?).ok()?,
            start: field("start")?,
            busy: field("busy")?,
            end: field("end")?,
            rv: field("rv")?,
            query: field("query")? == 1,
            name,
        })
    }

    /// Whether this call made a signature (not a length query, and it succeeded).
    pub fn is_signature(&self) -> bool {
        (self.name == "C_Sign" || self.name == "C_SignFinal") && !self.query && self.rv == 0
    }

    /// How long the call took, in milliseconds (from when it came in).
    pub fn ms(&self) -> f64 {
        self.end.saturating_sub(self.start) as f64 / 1e6
    }
}

/// The counted calls of one process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub initialize: u64,
    pub open_session: u64,
    pub login: u64,
    pub sign: u64,
}

impl Counts {
    fn add(&mut self, c: &Call) {
        match c.name.as_str() {
            "C_Initialize" => self.initialize += 1,
            "C_OpenSession" => self.open_session += 1,
            "C_Login" => self.login += 1,
            _ if c.is_signature() => self.sign += 1,
            _ => {}
        }
    }
}

/// What the log says.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub per_process: BTreeMap<u32, Counts>,
    pub total: Counts,
    pub jobs_ok: u64,
    pub jobs_failed: u64,
    /// From the first job's start to the last job's end (without `JOB` lines: the
    /// first call's start to the last call's end), in seconds.
    pub wall_s: f64,
    /// Union of the signatures' token time (`busy`..`end`) within the wall time,
    /// divided by the wall time.
    pub busy_fraction: f64,
    /// Signatures per second of wall time.
    pub sign_rate: f64,
    /// Mean token time of one signature, in milliseconds: 1000 / this is the most the
    /// token can sign per second.
    pub sign_ms_mean: f64,
    /// Successful jobs per second of wall time.
    pub jobs_rate: f64,
}

impl Report {
    /// Reads a whole log; lines that are not the log's are skipped.
    pub fn from_log(text: &str) -> Report {
        let calls: Vec<Call> = text.lines().filter_map(Call::parse).collect();
        let mut per_process: BTreeMap<u32, Counts> = BTreeMap::new();
        let mut total = Counts::default();
        let (mut jobs_ok, mut jobs_failed) = (0, 0);
        let (mut job_lo, mut job_hi) = (u64::MAX, 0);
        let (mut call_lo, mut call_hi) = (u64::MAX, 0);
        for c in &calls {
            if c.name == "JOB" {
                if c.rv == 0 {
                    jobs_ok += 1;
                } else {
                    jobs_failed += 1;
                }
                job_lo = job_lo.min(c.start);
                job_hi = job_hi.max(c.end);
                continue;
            }
            per_process.entry(c.pid).or_default().add(c);
            total.add(c);
            call_lo = call_lo.min(c.start);
            call_hi = call_hi.max(c.end);
        }
        let (lo, hi) = if job_hi > 0 {
            (job_lo, job_hi)
        } else {
            (call_lo, call_hi)
        };
        let wall_ns = hi.saturating_sub(lo);
        let mut spans: Vec<(u64, u64)> = calls
            .iter()
            .filter(|c| c.is_signature())
            .map(|c| (c.busy.max(lo), c.end.min(hi)))
            .filter(|(a, b)| a < b)
            .collect();
        spans.sort_unstable();
        let mut busy_ns = 0;
        let mut cur: Option<(u64, u64)> = None;
        for (a, b) in spans {
            match cur {
                Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    busy_ns += cb - ca;
                    cur = Some((a, b));
                }
                None => cur = Some((a, b)),
            }
        }
        if let Some((ca, cb)) = cur {
            busy_ns += cb - ca;
        }
        let signatures: Vec<&Call> = calls.iter().filter(|c| c.is_signature()).collect();
        let sign_ms_mean = if signatures.is_empty() {
            0.0
        } else {
            signatures
                .iter()
                .map(|c| c.end.saturating_sub(c.busy) as f64 / 1e6)
                .sum::<f64>()
                / signatures.len() as f64
        };
        let wall_s = wall_ns as f64 / 1e9;
        let per_s = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
        Report {
            per_process,
            total,
            jobs_ok,
            jobs_failed,
            wall_s,
            busy_fraction: if wall_ns > 0 {
                busy_ns as f64 / wall_ns as f64
            } else {
                0.0
            },
            sign_rate: per_s(total.sign),
            sign_ms_mean,
            jobs_rate: per_s(jobs_ok),
        }
    }

    /// Logins per successful job (per signature without `JOB` lines).
    pub fn logins_per_job(&self) -> f64 {
        let per = if self.jobs_ok > 0 {
            self.jobs_ok
        } else {
            self.total.sign
        };
        if per == 0 {
            0.0
        } else {
            self.total.login as f64 / per as f64
        }
    }

    /// C_Initialize calls per successful job (per signature without `JOB` lines): 1.00
    /// when every job loads the module again.
    pub fn initializes_per_job(&self) -> f64 {
        let per = if self.jobs_ok > 0 {
            self.jobs_ok
        } else {
            self.total.sign
        };
        if per == 0 {
            0.0
        } else {
            self.total.initialize as f64 / per as f64
        }
    }

    /// A table per process, then the totals.
    pub fn text(&self) -> String {
        let mut s = String::from("pid        C_Initialize C_OpenSession C_Login C_Sign\n");
        let mut row = |who: &str, c: &Counts| {
            let _ = writeln!(
                s,
                "{who:<10} {:>12} {:>13} {:>7} {:>6}",
                c.initialize, c.open_session, c.login, c.sign
            );
        };
        for (pid, c) in &self.per_process {
            row(&pid.to_string(), c);
        }
        row("all", &self.total);
        let _ = writeln!(
            s,
            "processes {}; jobs {} ok, {} failed; wall {:.3} s; jobs/s {:.2}; C_Sign/s {:.2} (token time per signature {:.1} ms, at most {:.2}/s); token busy {:.1}%; C_Login per job {:.2}",
            self.per_process.len(),
            self.jobs_ok,
            self.jobs_failed,
            self.wall_s,
            self.jobs_rate,
            self.sign_rate,
            self.sign_ms_mean,
            if self.sign_ms_mean > 0.0 { 1000.0 / self.sign_ms_mean } else { 0.0 },
            self.busy_fraction * 100.0,
            self.logins_per_job(),
        );
        s
    }

    /// One line of `key=value` words, for scripts.
    pub fn fields(&self) -> String {
        format!(
            "processes={} initialize={} open_session={} login={} sign={} jobs_ok={} jobs_failed={} wall_s={:.3} jobs_per_s={:.2} sign_per_s={:.2} sign_ms={:.1} busy_pct={:.1} logins_per_job={:.2} initializes_per_job={:.2}",
            self.per_process.len(),
            self.total.initialize,
            self.total.open_session,
            self.total.login,
            self.total.sign,
            self.jobs_ok,
            self.jobs_failed,
            self.wall_s,
            self.jobs_rate,
            self.sign_rate,
            self.sign_ms_mean,
            self.busy_fraction * 100.0,
            self.logins_per_job(),
            self.initializes_per_job(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, pid: u32, start: u64, end: u64) -> Call {
        Call {
            name: name.to_owned(),
            pid,
            start,
            busy: start,
            end,
            rv: 0,
            query: false,
        }
    }

    #[test]
    fn a_line_reads_back_as_written() {
        let c = Call {
            query: true,
            rv: 0x101,
            busy: 15,
            ..call("C_Sign", 42, 10, 20)
        };
        assert_eq!(Call::parse(&c.line()), Some(c));
        assert_eq!(Call::parse("garbage here"), None);
    }

    #[test]
    fn busy_is_the_union_of_signatures_within_the_jobs() {
        const MS: u64 = 1_000_000;
        let log: String = [
            call("JOB", 1, 0, 500 * MS),
            call("JOB", 1, 500 * MS, 1000 * MS),
            Call {
                rv: 1,
                ..call("JOB", 1, 900 * MS, 950 * MS)
            },
            call("C_Initialize", 10, 10 * MS, 11 * MS),
            call("C_Login", 10, 20 * MS, 220 * MS),
            call("C_Sign", 10, 300 * MS, 400 * MS),
            // overlaps the first signature: counted once
            call("C_Sign", 11, 350 * MS, 450 * MS),
            Call {
                query: true,
                ..call("C_Sign", 11, 340 * MS, 341 * MS)
            },
            call("C_SignFinal", 11, 700 * MS, 800 * MS),
        ]
        .iter()
        .map(Call::line)
        .collect();
        let r = Report::from_log(&log);
        assert_eq!((r.jobs_ok, r.jobs_failed), (2, 1));
        assert_eq!(r.total.sign, 3);
        assert_eq!(r.total.login, 1);
        assert_eq!(r.per_process.len(), 2);
        assert_eq!(r.per_process[&11].sign, 2);
        assert!((r.wall_s - 1.0).abs() < 1e-9);
        assert!((r.busy_fraction - 0.25).abs() < 1e-9, "{}", r.busy_fraction);
        assert!((r.sign_rate - 3.0).abs() < 1e-9);
        assert!((r.jobs_rate - 2.0).abs() < 1e-9);
        assert!((r.logins_per_job() - 0.5).abs() < 1e-9);
        assert!((r.initializes_per_job() - 0.5).abs() < 1e-9);
        assert!(r.fields().contains("busy_pct=25.0"));
    }
}

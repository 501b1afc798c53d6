//! Refusals that cannot flood: their audit records coalesced per caller and reason,
//! and wrong client secrets throttled per source address. Pure: the caller passes the
//! time and writes what these answer.
//!
//! [`Coalescer`]: the first refusal of a caller for one reason (error code) is recorded
//! at once; the ones that follow within the interval are only counted, and when the
//! interval has passed they become one record carrying their `count`
//! ([`Coalescer::due`], called by the daemon's janitor, or the next refusal of that
//! caller for that reason). So a caller refused ten thousand times a minute leaves
//! two records a minute, not ten thousand fsyncs. TCP peers are keyed by address
//! without their port, which changes with every connection.
//!
//! [`Throttle`]: a token bucket per source address holding `per_minute` wrong secrets,
//! refilled at that rate. An address whose bucket is empty is answered
//! `too_many_attempts` (429, `Retry-After`) without its secret being checked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The most callers followed at once; past it the oldest windows are closed early
/// (their counts recorded), so memory stays bounded whoever floods.
pub const MAX_WINDOWS: usize = 4096;
/// The most source addresses throttled at once; full buckets are forgotten first.
pub const MAX_BUCKETS: usize = 4096;

/// One refusal, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub caller: String,
    pub transport: String,
    pub profile: Option<String>,
    pub filename: Option<String>,
    /// The error code.
    pub code: String,
}

/// What to record: a refusal, with how many it stands for (`None`: one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToRecord {
    pub refused: Refused,
    pub count: Option<u64>,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    /// Refusals since the first, not recorded yet; the newest of them.
    held: u64,
    last: Refused,
}

/// Coalesces refusals per caller and reason over an interval.
#[derive(Debug)]
pub struct Coalescer {
    interval: Duration,
    windows: HashMap<(String, String), Window>,
}

/// The key a caller is coalesced under: a TCP peer by its address alone.
pub fn caller_key(caller: &str) -> String {
    match caller.strip_prefix("tcp:") {
        Some(addr) => match addr.parse::<std::net::SocketAddr>() {
            Ok(a) => format!("tcp:{}", a.ip()),
            Err(_) => caller.to_owned(),
        },
        None => caller.to_owned(),
    }
}

impl Coalescer {
    pub fn new(interval: Duration) -> Self {
        Coalescer {
            interval,
            windows: HashMap::new(),
        }
    }

    /// The interval of the windows opened from now on (a reload of `[limits]`).
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// A refusal at `now`: answers what to record now (nothing while its window is
    /// open; the refusal itself when it opens one, after the closed window's count).
    pub fn refused(&mut self, r: Refused, now: Instant) -> Vec<ToRecord> {
        let key = (caller_key(&r.caller), r.code.clone());
        let mut out = Vec::new();
        if let Some(w) = self.windows.get_mut(&key) {
            if now.saturating_duration_since(w.opened) < self.interval {
                w.held += 1;
                w.last = r;
                return out;
            }
            if let Some(w) = self.windows.remove(&key) {
                out.extend(summary(key.0.clone(), w));
            }
        }
        if self.windows.len() >= MAX_WINDOWS {
            // Close the oldest windows early: their counts are recorded now.
            let mut keys: Vec<_> = self
                .windows
                .iter()
                .map(|(k, w)| (w.opened, k.clone()))
                .collect();
            keys.sort();
            for (_, k) in keys.into_iter().take(MAX_WINDOWS / 4) {
                if let Some(w) = self.windows.remove(&k) {
                    out.extend(summary(k.0, w));
                }
            }
        }
        self.windows.insert(
            key,
            Window {
                opened: now,
                held: 0,
                last: r.clone(),
            },
        );
        out.push(ToRecord {
            refused: r,
            count: None,
        });
        out
    }

    /// The windows whose interval has passed by `now`, closed: one record each for
    /// the refusals they held (none for a window that held none).
    pub fn due(&mut self, now: Instant) -> Vec<ToRecord> {
        let interval = self.interval;
        let closed: Vec<_> = self
            .windows
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.opened) >= interval)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in closed {
            if let Some(w) = self.windows.remove(&k) {
                out.extend(summary(k.0, w));
            }
        }
        out
    }

    /// Every window closed now (at shutdown): the counts they held.
    pub fn drain(&mut self) -> Vec<ToRecord> {
        self.windows
            .drain()
            .filter_map(|(k, w)| summary(k.0, w))
            .collect()
    }
}

fn summary(caller: String, w: Window) -> Option<ToRecord> {
    if w.held == 0 {
        return None;
    }
    Some(ToRecord {
        refused: Refused { caller, ..w.last },
        count: Some(w.held),
    })
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Wrong secrets per source address, as token buckets.
#[derive(Debug)]
pub struct Throttle {
    per_minute: u32,
    buckets: HashMap<IpAddr, Bucket>,
}

impl Throttle {
    pub fn new(per_minute: u32) -> Self {
        Throttle {
            per_minute: per_minute.max(1),
            buckets: HashMap::new(),
        }
    }

    /// The rate from now on (a reload of `[limits]`).
    pub fn set_per_minute(&mut self, per_minute: u32) {
        self.per_minute = per_minute.max(1);
    }

    fn rate(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }

    fn level(&self, b: Bucket, now: Instant) -> f64 {
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.rate();
        (b.tokens + refill).min(f64::from(self.per_minute))
    }

    /// Whether `ip` may try a secret at `now`; otherwise how long until it may.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let Some(b) = self.buckets.get(&ip) else {
            return Ok(());
        };
        let level = self.level(*b, now);
        if level >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - level) / self.rate();
        Err(Duration::from_secs_f64(wait.max(0.0)).max(Duration::from_secs(1)))
    }

    /// `ip` sent a wrong secret at `now`: one token less.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&ip) {
            let full = f64::from(self.per_minute);
            let rate = self.rate();
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < full
            });
            if self.buckets.len() >= MAX_BUCKETS {
                // Every address is mid-flood: forget an arbitrary one.
                if let Some(k) = self.buckets.keys().next().copied() {
                    self.buckets.remove(&k);
                }
            }
        }
        let level = match self.buckets.get(&ip) {
            Some(b) => self.level(*b, now),
            None => f64::from(self.per_minute),
        };
        self.buckets.insert(
            ip,
            Bucket {
                tokens: (level - 1.0).max(0.0),
                at: now,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused(caller: &str, code: &str) -> Refused {
        Refused {
            caller: caller.into(),
            transport: "unix".into(),
            profile: None,
            filename: None,
            code: code.into(),
        }
    }

    #[test]
    fn a_flood_of_one_caller_is_one_record_and_one_count_per_interval() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(60));
        let first = c.refused(refused("uid:5", "forbidden"), t0);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].count, None);
        for i in 1..10_000u64 {
            let at = t0 + Duration::from_millis(i);
            assert!(c.refused(refused("uid:5", "forbidden"), at).is_empty());
        }
        // Another reason, another caller: their own windows.
        assert_eq!(c.refused(refused("uid:5", "unknown_profile"), t0).len(), 1);
        assert_eq!(c.refused(refused("uid:6", "forbidden"), t0).len(), 1);
        assert!(c.due(t0 + Duration::from_secs(59)).is_empty());
        let due = c.due(t0 + Duration::from_secs(60));
        assert_eq!(due.len(), 1, "windows that held nothing make no record");
        assert_eq!(due[0].count, Some(9_999));
        assert_eq!(due[0].refused.caller, "uid:5");
        assert!(c.due(t0 + Duration::from_secs(600)).is_empty());
    }

    #[test]
    fn the_next_refusal_after_the_interval_records_the_count_and_itself() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(10));
        c.refused(refused("vm:105", "forbidden"), t0);
        c.refused(refused("vm:105", "forbidden"), t0 + Duration::from_secs(1));
        let out = c.refused(refused("vm:105", "forbidden"), t0 + Duration::from_secs(11));
        assert_eq!(
            out.iter().map(|r| r.count).collect::<Vec<_>>(),
            [Some(1), None]
        );
        assert!(c.drain().is_empty());
    }

    #[test]
    fn tcp_peers_are_one_caller_whatever_their_port() {
        assert_eq!(caller_key("tcp:10.0.0.5:4711"), "tcp:10.0.0.5");
        assert_eq!(caller_key("tcp:[::1]:80"), "tcp:::1");
        assert_eq!(caller_key("client:ci"), "client:ci");
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(60));
        assert_eq!(
            c.refused(refused("tcp:10.0.0.5:1", "forbidden"), t0).len(),
            1
        );
        assert!(c
            .refused(refused("tcp:10.0.0.5:2", "forbidden"), t0)
            .is_empty());
        let d = c.drain();
        assert_eq!(d[0].refused.caller, "tcp:10.0.0.5");
        assert_eq!(d[0].count, Some(1));
    }

    #[test]
    fn memory_stays_bounded_under_many_callers() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(60));
        for i in 0..(MAX_WINDOWS * 3) {
            let caller = format!("uid:{i}");
            c.refused(refused(&caller, "forbidden"), t0);
            c.refused(refused(&caller, "forbidden"), t0);
        }
        assert!(c.windows.len() <= MAX_WINDOWS);
    }

    #[test]
    fn wrong_secrets_are_throttled_per_address_and_refill() {
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        let b: IpAddr = "10.0.0.6".parse().unwrap();
        let mut t = Throttle::new(6);
        for _ in 0..6 {
            assert!(t.check(a, t0).is_ok());
            t.failed(a, t0);
        }
        let wait = t.check(a, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10), "one token every 10 s");
        assert!(t.check(b, t0).is_ok(), "another address is not affected");
        assert!(t.check(a, t0 + Duration::from_secs(10)).is_ok());
        assert!(t.check(a, t0 + Duration::from_secs(5)).is_err());
    }
}

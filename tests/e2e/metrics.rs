//! Prometheus metrics from a real signetd, agent and SoftHSM token: jobs signed,
//! failed and refused are counted by profile; the queue, the agent, the token, the PIN,
//! the certificate's expiry and the spool are read at the scrape; a metrics port that
//! cannot be bound leaves signing working; `enabled = false` serves nothing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Instant;

use super::*;

/// One sample: its name and labels.
type Series = (String, BTreeMap<String, String>);

/// The samples of an exposition in the text format, by name and labels.
fn parse(text: &str) -> Vec<(Series, f64)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let mut labels = BTreeMap::new();
                let mut chars = rest.strip_suffix('}').unwrap().chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "{line}");
                    let mut v = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('n') => v.push('\n'),
                                Some(c) => v.push(c),
                                None => panic!("{line}"),
                            },
                            '"' => break,
                            c => v.push(c),
                        }
                    }
                    labels.insert(key, v);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                (name.to_owned(), labels)
            }
        };
        out.push(((name, labels), value));
    }
    out
}

/// The scraped metrics.
struct Scrape {
    content_type: String,
    text: String,
    samples: Vec<(Series, f64)>,
}

impl Scrape {
    /// The value of the one sample `name` with these labels (others may be there too).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} names one sample:\n{}",
            self.text
        );
        found.first().copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} in\n{}", self.text))
    }
}

/// `GET url` over plain HTTP/1.1, as Prometheus scrapes.
fn scrape(url: &str) -> Scrape {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Scrape {
        content_type,
        samples: parse(body),
        text: body.to_owned(),
    }
}

/// Scrapes `url` until `ready` holds of what it says (the agent's view is fed by its
/// health reads), within [`EVENT_TIMEOUT`].
fn scrape_until(url: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let start = Instant::now();
    loop {
        let s = scrape(url);
        if ready(&s) {
            return s;
        }
        assert!(
            start.elapsed() < EVENT_TIMEOUT,
            "the metrics did not get there:\n{}",
            s.text
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The test token's certificate: (notAfter in seconds since the epoch, SHA-256
/// fingerprint in lowercase hex), as openssl reads them.
fn certificate(w: &World) -> (i64, String) {
    let out = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-enddate",
            "-fingerprint",
            "-sha256",
            "-in",
        ])
        .arg(w.path("cert.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let end = text
        .lines()
        .find_map(|l| l.strip_prefix("notAfter="))
        .unwrap();
    let fp = text
        .lines()
        .find_map(|l| l.split_once("Fingerprint=").map(|(_, f)| f))
        .unwrap()
        .replace(':', "")
        .to_ascii_lowercase();
    let secs = std::process::Command::new("date")
        .args(["-u", "-d", end, "+%s"])
        .output()
        .unwrap();
    let secs = String::from_utf8(secs.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (secs, fp)
}

#[test]
fn metrics_count_the_jobs_and_read_the_agent_token_certificate_and_spool() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            "default_profile = \"release\"\n[profiles.release]\n[profiles.test]\n",
        )
        .remove(0);
    let url = w.metrics_url();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // Before any job: nothing counted, every result at its start.
    let first = scrape(&url);
    assert_eq!(
        first.get("signet_jobs_total", &[("result", "signed")]),
        None,
        "{}",
        first.text
    );

    for (name, profile) in [
        ("a.exe", "release"),
        ("b.exe", "release"),
        ("c.exe", "test"),
    ] {
        let file = w.pe(name);
        let out = signet(&ep, &["sign", "--profile", profile, file.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    // A file the agent will not sign: a job that fails.
    let (status, body) = super::post_sign(
        &ep,
        "profile=release&filename=x.exe",
        b"#!/bin/sh\n".to_vec(),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (415, Some("unsupported_format")),
        "{body}"
    );
    // A profile no one configured: refused before it is a job, and no label of it.
    let (status, body) = super::post_sign(
        &ep,
        "profile=made-up&filename=y.exe",
        std::fs::read(w.path("hello.exe")).unwrap(),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_profile")),
        "{body}"
    );

    // The agent's view is fed by its health reads; a result becomes a kept copy once
    // the daemon has streamed it whole, which the client may see end first.
    let m = scrape_until(&url, |s| {
        s.get("signet_agent_up", &[]) == Some(1.0)
            && s.get("signet_token_logged_in", &[]) == Some(1.0)
            && s.get("signet_spool_used_bytes", &[]) == Some(0.0)
    });
    assert_eq!(
        m.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(m.text.ends_with("# EOF\n"), "{}", m.text);

    let jobs = |profile: &str, result: &str| {
        m.get(
            "signet_jobs_total",
            &[("profile", profile), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(jobs("release", "signed"), 2.0, "{}", m.text);
    assert_eq!(jobs("test", "signed"), 1.0, "{}", m.text);
    assert_eq!(jobs("release", "failed"), 1.0, "{}", m.text);
    assert_eq!(jobs("test", "failed") + jobs("release", "cancelled"), 0.0);
    assert_eq!(
        m.value(
            "signet_job_errors_total",
            &[("profile", "release"), ("code", "unsupported_format")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "signet_refusals_total",
            &[("profile", ""), ("code", "unknown_profile")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "signet_job_signing_seconds_count",
            &[("profile", "release")]
        ),
        2.0
    );
    assert_eq!(
        m.value("signet_job_signing_seconds_count", &[("profile", "test")]),
        1.0
    );
    assert_eq!(
        m.value("signet_job_wait_seconds_count", &[("profile", "release")]),
        3.0,
        "the failed job reached the agent too"
    );
    assert!(m.value("signet_job_signing_seconds_sum", &[("profile", "release")]) > 0.0);
    for state in ["receiving", "queued", "running"] {
        assert_eq!(
            m.value("signet_jobs_live", &[("state", state)]),
            0.0,
            "{state}"
        );
    }

    // The agent, its token and its PIN, as the agent says.
    let serial = std::fs::read_to_string(w.path("token-serial")).unwrap();
    let serial = serial.trim();
    assert_eq!(m.value("signet_agent_state", &[("state", "ready")]), 1.0);
    assert_eq!(m.value("signet_token_present", &[("serial", serial)]), 1.0);
    assert_eq!(
        m.value("signet_token_logged_in", &[("serial", serial)]),
        1.0
    );
    assert_eq!(m.value("signet_pin_state", &[("state", "ok")]), 1.0);
    let pin_states: f64 = m
        .samples
        .iter()
        .filter(|((n, _), _)| n == "signet_pin_state")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(pin_states, 1.0, "one-hot");

    // The certificate's notAfter, to the second, as openssl reads it.
    let (not_after, sha256) = certificate(&w);
    assert_eq!(
        m.value(
            "signet_certificate_expiry_timestamp_seconds",
            &[("serial", serial), ("sha256", &sha256)]
        ),
        not_after as f64
    );
    assert_eq!(
        m.value(
            "signet_profile_certificate_expiry_timestamp_seconds",
            &[("profile", "release")]
        ),
        not_after as f64
    );

    // Every result was delivered: the spool keeps them for a retry, outside the quota,
    // as files or (small ones) in the database.
    let files: u64 = std::fs::read_dir(w.path("state/spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "delivered"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let inline: u64 = rusqlite::Connection::open_with_flags(
        w.path("state/signet.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
    .query_row(
        "SELECT COALESCE(SUM(length(data)), 0) FROM blobs WHERE part = 'out' AND kept = 1",
        [],
        |r| r.get(0),
    )
    .unwrap();
    let kept = files + inline;
    assert!(kept > 0);
    assert_eq!(
        m.value("signet_spool_kept_bytes", &[]),
        kept as f64,
        "{}",
        m.text
    );
    assert_eq!(m.value("signet_spool_used_bytes", &[]), 0.0, "{}", m.text);
    assert_eq!(
        m.value("signet_spool_quota_bytes", &[]),
        (2048u64 << 20) as f64
    );
    assert_eq!(
        m.value(
            "signet_recovery_steps_total",
            &[("step", "vm_reset"), ("result", "ran")]
        ),
        0.0
    );

    // No job id, caller, file name or PIN in any label.
    let pin = std::fs::read_to_string(&pin).unwrap();
    let words: Vec<&String> = m
        .samples
        .iter()
        .flat_map(|((_, l), _)| l.values())
        .collect();
    for secret in [
        "a.exe",
        "x.exe",
        "made-up",
        "uid:0",
        "client:loopback",
        pin.trim(),
    ] {
        assert!(
            !words.iter().any(|w| w.contains(secret)),
            "{secret} in\n{}",
            m.text
        );
    }
    assert!(
        !words.iter().any(|w| w.as_str() == "1" || w.as_str() == "2"),
        "no job id"
    );
}

#[test]
fn a_metrics_port_that_cannot_be_bound_leaves_signing_working() {
    let mut w = World::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            &format!("[profiles.release]\n[metrics]\nlisten = [\"tcp:127.0.0.1:{port}\"]\n"),
        )
        .remove(0);
    let log = w.log("signetd");
    assert!(
        log.contains("the metrics are not served there")
            && log.contains(&format!("127.0.0.1:{port}"))
            && log.contains("enabled = false"),
        "the log says what to fix: {log}"
    );
    let file = w.pe("app.exe");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);
    drop(taken);
}

#[test]
fn metrics_turned_off_are_not_served() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
        "[profiles.release]\n[metrics]\nenabled = false\nlisten = [\"tcp:127.0.0.1:0\"]\n",
    );
    let log = w.log("signetd");
    assert!(
        log.contains("metrics are not served ([metrics] enabled = false)"),
        "{log}"
    );
    assert!(!log.contains("serving metrics"), "{log}");
}

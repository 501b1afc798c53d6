//! signetd and signet-agent started as systemd starts them (`INVOCATION_ID` set) log
//! to the journal in its native protocol: each line with its priority and its fields.
//! tracing-journald writes to the fixed path /run/systemd/journal/socket, so each
//! daemon runs in a mount namespace of its own (`unshare --mount`, as root) whose /run
//! is the test's directory. There the journal is a datagram socket the test binds and
//! reads (the native protocol's fields as sent), or a private systemd-journald, read
//! back with `journalctl --directory` (what journald keeps of them).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use signet_test_support::*;

/// One journal entry: each field's values.
type Entry = HashMap<String, Vec<String>>;

/// Reads one datagram of the journal's native protocol: `KEY=value` lines, or `KEY`,
/// a little-endian u64 length, the value's bytes and a newline.
fn parse(mut data: &[u8]) -> Entry {
    let mut entry = Entry::new();
    while !data.is_empty() {
        let end = data.iter().position(|&b| b == b'\n').expect("a field ends");
        let line = &data[..end];
        data = &data[end + 1..];
        let (key, value) = match line.iter().position(|&b| b == b'=') {
            Some(eq) => (&line[..eq], line[eq + 1..].to_vec()),
            None => {
                let len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
                let value = data[8..8 + len].to_vec();
                assert_eq!(data[8 + len], b'\n');
                data = &data[8 + len + 1..];
                (line, value)
            }
        };
        entry
            .entry(String::from_utf8(key.to_vec()).unwrap())
            .or_default()
            .push(String::from_utf8(value).unwrap());
    }
    entry
}

fn field<'a>(e: &'a Entry, key: &str) -> Option<&'a str> {
    e.get(key).and_then(|v| v.first()).map(String::as_str)
}

/// The journal: a datagram socket bound at `run/systemd/journal/socket`, read on a
/// thread of its own as journald reads it (a daemon's send blocks once a few
/// datagrams wait unread).
struct Journal {
    rx: std::sync::mpsc::Receiver<Entry>,
    entries: Vec<Entry>,
}

/// How long a test waits for a line it expects.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

impl Journal {
    fn bind(run: &Path) -> Journal {
        std::fs::create_dir_all(run.join("systemd/journal")).unwrap();
        let socket = UnixDatagram::bind(run.join("systemd/journal/socket")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match socket.recv(&mut buf) {
                    // tracing-journald checks the socket with an empty datagram.
                    Ok(0) => {}
                    Ok(n) => {
                        if tx.send(parse(&buf[..n])).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        // A heartbeat, which fails once the test has ended
                        // (the receiver dropped): then stop reading.
                        if tx.send(Entry::new()).is_err() {
                            return;
                        }
                    }
                    Err(e) => panic!("journal socket: {e}"),
                }
            }
        });
        Journal {
            rx,
            entries: Vec::new(),
        }
    }

    /// Reads entries until one matches `want`; returns it.
    fn wait_for(&mut self, what: &str, want: impl Fn(&Entry) -> bool) -> Entry {
        let started = Instant::now();
        if let Some(e) = self.entries.iter().find(|e| want(e)) {
            return e.clone();
        }
        loop {
            let left = LINE_TIMEOUT.saturating_sub(started.elapsed());
            match self.rx.recv_timeout(left) {
                Ok(e) if e.is_empty() => {}
                Ok(e) => {
                    self.entries.push(e.clone());
                    if want(&e) {
                        return e;
                    }
                }
                Err(_) => panic!("no journal entry {what}; got: {:#?}", self.entries),
            }
        }
    }
}

/// A wrapper that runs its command in a mount namespace whose /run is `run`, as a
/// unit of systemd's (`INVOCATION_ID`).
fn under_systemd(run: &Path) -> Vec<&OsStr> {
    vec![
        "unshare".as_ref(),
        "--mount".as_ref(),
        "--propagation".as_ref(),
        "private".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        r#"mount --bind "$0" /run && exec env INVOCATION_ID=5f1e0c1d2b3a49e8a7f6e5d4c3b2a190 "$@""#
            .as_ref(),
        run.as_os_str(),
    ]
}

/// Starts signetd under systemd's ways ([`under_systemd`]).
fn daemon_under_systemd(w: &mut World, run: &Path, agent: &Endpoint) -> Endpoint {
    w.write_daemon_config(&format!(
        "listen = [\"unix:{}\"]\nagent = \"{agent}\"\ndbus = \"none\"\n\
         [shutdown]\nlogind = \"none\"\n\
         [profiles.release]\ndescription = \"Signet test\"\n\
         [[grants]]\ncallers = [\"uid:0\"]\nprofiles = [\"*\"]\n",
        w.path("signetd.sock").display()
    ));
    w.restart_daemon_under(&under_systemd(run)).remove(0)
}

#[test]
fn signetd_under_systemd_logs_to_the_journal_with_priorities_and_fields() {
    let mut w = World::new();
    let run = w.path("run");
    let mut journal = Journal::bind(&run);
    // No agent yet: unreachable at start is a warning.
    let nowhere: Endpoint = format!("unix:{}", w.path("agent.sock").display())
        .parse()
        .unwrap();
    let ep = daemon_under_systemd(&mut w, &run, &nowhere);

    let listening = journal.wait_for("listening", |e| field(e, "MESSAGE") == Some("listening"));
    assert_eq!(field(&listening, "PRIORITY"), Some("6"), "{listening:?}");
    assert_eq!(field(&listening, "SYSLOG_IDENTIFIER"), Some("signetd"));
    assert_eq!(field(&listening, "ENDPOINT"), Some(ep.to_string().as_str()));
    let unreachable = journal.wait_for("agent_unreachable", |e| {
        field(e, "EVENT") == Some("agent_unreachable")
    });
    assert_eq!(
        field(&unreachable, "PRIORITY"),
        Some("4"),
        "{unreachable:?}"
    );
    assert!(
        field(&unreachable, "MESSAGE").is_some_and(|m| m.contains("agent.sock")),
        "{unreachable:?}"
    );

    // A job: its lines carry its id (the job span's field) and the caller.
    let pe = std::fs::read(w.pe("a.exe")).unwrap();
    let job = sign_async(&ep, "a.exe", &pe);
    let accepted = journal.wait_for("job accepted", |e| {
        field(e, "MESSAGE") == Some("job accepted")
    });
    assert_eq!(field(&accepted, "JOB"), Some(job.as_str()), "{accepted:?}");
    assert_eq!(field(&accepted, "CALLER"), Some("uid:0"), "{accepted:?}");
    assert_eq!(field(&accepted, "SPAN_NAME"), Some("job"), "{accepted:?}");
    assert_eq!(field(&accepted, "PRIORITY"), Some("6"));

    // Nothing went to stderr as text.
    assert_eq!(w.log("signetd"), "", "signetd's stderr");
}

#[test]
fn signet_agent_under_systemd_logs_a_job_under_its_id() {
    let mut w = World::new();
    let run = w.path("run");
    let mut journal = Journal::bind(&run);
    let pin = w.path("pin");
    let agent = w.start_agent_under(
        &under_systemd(&run),
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        Some(&pin),
        &[],
        "",
    );
    let ep = daemon_under_systemd(&mut w, &run, &agent);
    let ready = journal.wait_for("token ready", |e| {
        field(e, "MESSAGE") == Some("token ready")
            && field(e, "SYSLOG_IDENTIFIER") == Some("signet-agent")
    });
    assert_eq!(field(&ready, "PRIORITY"), Some("6"), "{ready:?}");

    let pe = std::fs::read(w.pe("a.exe")).unwrap();
    let job = sign_async(&ep, "a.exe", &pe);
    // The agent's lines of the job carry the host's job id, from its job span.
    let signed = journal.wait_for("the agent's line of the job", |e| {
        field(e, "SYSLOG_IDENTIFIER") == Some("signet-agent") && field(e, "JOB") == Some(&job)
    });
    assert_eq!(field(&signed, "SPAN_NAME"), Some("job"), "{signed:?}");
    assert_eq!(w.log("signet-agent"), "", "signet-agent's stderr");
}

/// systemd-journald itself, private to the test: in a mount namespace whose /run is
/// the test's directory, so it listens at `run/systemd/journal/socket` and keeps its
/// files in `run/log/journal`; stopped on drop.
struct Journald {
    child: std::process::Child,
    run: std::path::PathBuf,
}

/// Where Debian installs journald.
const JOURNALD: &str = "/lib/systemd/systemd-journald";

impl Journald {
    fn start(w: &World) -> Journald {
        assert!(
            Path::new(JOURNALD).exists(),
            "{JOURNALD} is missing: apt-get install systemd"
        );
        let run = w.path("run");
        std::fs::create_dir_all(run.join("systemd/journal")).unwrap();
        let log = std::fs::File::create(w.path("journald.log")).unwrap();
        let child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /run && exec "$1""#)
            .arg(&run)
            .arg(JOURNALD)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let socket = run.join("systemd/journal/socket");
        wait_until("journald's socket", || socket.exists());
        Journald { child, run }
    }

    /// Every entry journald keeps, as `journalctl --output=json` gives them.
    fn entries(&self) -> Vec<serde_json::Value> {
        let out = std::process::Command::new("journalctl")
            .arg("--directory")
            .arg(
                self.run
                    .join("log/journal")
                    .read_dir()
                    .unwrap()
                    .next()
                    .unwrap()
                    .unwrap()
                    .path(),
            )
            .args(["--output=json", "--no-pager"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn a_private_journald_keeps_signetd_lines_with_their_priority_and_fields() {
    let mut w = World::new();
    let journald = Journald::start(&w);
    let run = w.path("run");
    let nowhere: Endpoint = format!("unix:{}", w.path("agent.sock").display())
        .parse()
        .unwrap();
    daemon_under_systemd(&mut w, &run, &nowhere);
    let from_signetd = |e: &serde_json::Value| e["SYSLOG_IDENTIFIER"] == "signetd";
    wait_until("journald keeps signetd's agent_unreachable", || {
        journald
            .entries()
            .iter()
            .any(|e| from_signetd(e) && e["EVENT"] == "agent_unreachable")
    });
    let entries = journald.entries();
    let unreachable = entries
        .iter()
        .find(|e| from_signetd(e) && e["EVENT"] == "agent_unreachable")
        .unwrap();
    assert_eq!(unreachable["PRIORITY"], "4", "{unreachable:#}");
    assert_eq!(unreachable["_TRANSPORT"], "journal", "{unreachable:#}");
    let listening = entries
        .iter()
        .find(|e| from_signetd(e) && e["MESSAGE"] == "listening")
        .unwrap_or_else(|| panic!("no listening line: {entries:#?}"));
    assert_eq!(listening["PRIORITY"], "6", "{listening:#}");
    assert!(
        listening["ENDPOINT"]
            .as_str()
            .is_some_and(|e| e.ends_with("signetd.sock")),
        "{listening:#}"
    );
    assert_eq!(w.log("signetd"), "", "signetd's stderr");
}

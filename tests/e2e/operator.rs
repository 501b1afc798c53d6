//! The operator's commands end to end: `signetctl jobs|cancel|audit|doctor` over a
//! private system-style `dbus-daemon` with Signet's real policy file (root and the
//! `signet-admin` group operate, the `signet` group reads its own, anyone else is
//! refused), the `JobFinished` signal, named D-Bus
//! errors with the HTTP messages, golden files for the CLI's text and JSON in healthy
//! and broken states, and the contract: each command answers the same result type over
//! HTTP (`/v1/operator/...`, `/v1/status`), D-Bus and the CLI.
//!
//! Golden files are in `tests/golden/signetctl/`; times, hashes, ages, the test's
//! directory and the token's serial are masked first. `SIGNET_BLESS=1` rewrites them.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use signet_api::operator::{AuditCheck, AuditRecord, DoctorReport, JobList};
use signet_api::wire::{DaemonStatus, JobView};

use super::dbus::{text, Bus};
use super::*;

/// How long a test waits for a state before it fails.
const STATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Who runs `signetctl`.
#[derive(Debug, Clone, Copy)]
enum As {
    Root,
    /// An unprivileged uid (nobody) in no group Signet knows.
    Nobody,
    /// Nobody, with the `signet` group as its group: a signer.
    SignetGroup,
    /// Nobody, with the `signet-admin` group as its group: an operator.
    Admin,
}

pub(crate) fn signet_gid() -> u32 {
    gid_of("signet")
}

pub(crate) fn admin_gid() -> u32 {
    gid_of("signet-admin")
}

fn gid_of(group: &str) -> u32 {
    let out = Command::new("getent")
        .args(["group", group])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or_else(|| panic!("the {group} group exists (scripts/install-deps.sh creates it)"))
}

fn ctl(bus: &Bus, who: As, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("signetctl"));
    cmd.env("SIGNET_DBUS", &bus.address)
        .args(args)
        .stdin(Stdio::null());
    match who {
        As::Root => {}
        As::Nobody => {
            cmd.uid(65534).gid(65534);
        }
        As::SignetGroup => {
            // std drops the supplementary groups when it switches from root.
            cmd.uid(65534).gid(signet_gid());
        }
        As::Admin => {
            cmd.uid(65534).gid(admin_gid());
        }
    }
    cmd.output().unwrap()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn json<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not the expected JSON ({e}): {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// The operator's HTTP call over the unix socket (root).
fn http<T: serde::de::DeserializeOwned>(ep: &Endpoint, method: &str, path: &str) -> (u16, T) {
    let (status, v) = call_json(ep, method, path, None);
    let t = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{path}: {e}: {v:#}"));
    (status, t)
}

/// A raw D-Bus call of `method` on Signet's interface with `body`: the reply's
/// string, or the error's name and message.
fn dbus_call<B>(bus: &Bus, method: &str, body: &B) -> Result<String, (String, String)>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .build()
            .await
            .unwrap();
        let reply = conn
            .call_method(
                Some("org.signet.Signet1"),
                "/org/signet/Signet1",
                Some("org.signet.Signet1.Manager"),
                method,
                body,
            )
            .await;
        match reply {
            Ok(m) => Ok(m.body().deserialize::<String>().unwrap()),
            Err(zbus::Error::MethodError(name, message, _)) => {
                Err((name.to_string(), message.unwrap_or_default()))
            }
            Err(e) => panic!("{method}: {e}"),
        }
    })
}

/// `text` with what changes from run to run masked: the test's directory, the token's
/// serial, RFC 3339 times, SHA-256 hashes, ages and day counts.
fn mask(text: &str, w: &World) -> String {
    let serial = std::fs::read_to_string(w.path("token-serial")).unwrap_or_default();
    let mut s = text.replace(w.dir.path().to_str().unwrap(), "<DIR>");
    // The private bus's address carries its GUID.
    while let Some(at) = s.find("guid=") {
        let end = s[at + 5..]
            .find(|c: char| !c.is_ascii_hexdigit())
            .map_or(s.len(), |e| at + 5 + e);
        s.replace_range(at..end, "<GUID>");
    }
    if !serial.trim().is_empty() {
        s = s.replace(serial.trim(), "<SERIAL>");
    }
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let digits = |from: usize, n: usize| {
        from + n <= b.len() && b[from..from + n].iter().all(u8::is_ascii_digit)
    };
    while i < b.len() {
        // 2026-11-23T10:00:00[.123]Z
        if digits(i, 4)
            && b.get(i + 4) == Some(&b'-')
            && digits(i + 5, 2)
            && b.get(i + 10) == Some(&b'T')
        {
            if let Some(z) = s[i..].find('Z').filter(|z| *z <= 30) {
                out.push_str("<TIME>");
                i += z + 1;
                continue;
            }
        }
        // 64 hex digits
        if i + 64 <= b.len()
            && b[i..i + 64]
                .iter()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            && (i == 0 || !b[i - 1].is_ascii_hexdigit())
        {
            out.push_str("<HASH>");
            i += 64;
            continue;
        }
        // an age in the job table: "12s   " (with the padding after it)
        if b[i].is_ascii_digit() && (i == 0 || b[i - 1] == b' ') {
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if b.get(j) == Some(&b's') && b.get(j + 1) == Some(&b' ') {
                let mut k = j + 1;
                while k < b.len() && b[k] == b' ' {
                    k += 1;
                }
                out.push_str("<AGE> ");
                i = k;
                continue;
            }
            for suffix in [" more days", " days"] {
                if s[j..].starts_with(suffix) {
                    out.push_str("<N>");
                    i = j;
                    break;
                }
            }
            if i == j {
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/signetctl")
}

/// Compares `actual` (masked) with the golden file `name`; `SIGNET_BLESS=1` writes it.
fn golden(name: &str, actual: &str, w: &World) {
    let actual = mask(actual, w);
    let path = golden_dir().join(name);
    if std::env::var_os("SIGNET_BLESS").is_some() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with SIGNET_BLESS=1 to write it",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "signetctl's output differs from {}; if the change is meant, run with SIGNET_BLESS=1",
        path.display()
    );
}

/// The JSON of `v` with every `age_seconds` set to 0 (ages move between two calls).
fn no_ages(mut list: JobList) -> JobList {
    for j in list
        .running
        .iter_mut()
        .chain(&mut list.queued)
        .chain(&mut list.recent)
    {
        j.age_seconds = 0;
    }
    list
}

/// Agent (with a signer that holds its first run) and daemon on unix sockets, the
/// daemon also on loopback TCP and on the private bus, with `extra` configuration.
fn appliance(w: &mut World, bus: &Bus, agent_config: &str, extra: &str) -> (Endpoint, Endpoint) {
    w.dbus = Some(bus.address.clone());
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        agent_config,
    );
    let mut eps = w.start_daemon_with(
        &[
            &format!("unix:{}", w.path("signetd.sock").display()),
            "tcp:127.0.0.1:0",
        ],
        &agent,
        &format!("[profiles.release]\ndescription = \"Signet test\"\n{extra}"),
    );
    let tcp = eps.remove(1);
    (eps.remove(0), tcp)
}

#[test]
fn jobs_and_cancel_over_dbus_follow_the_policy_and_signal_each_ended_job() {
    let mut w = World::new();
    let bus = Bus::start(&w);
    let signer = HeldSigner::new(&w);
    let (unix, tcp) = appliance(&mut w, &bus, &signer.agent_config(), "");
    let pe = std::fs::read(w.pe("a.exe")).unwrap();

    // Job 1 held at the agent, jobs 2 and 3 waiting behind it.
    let first = sign_async(&unix, "first.exe", &pe);
    wait_until("the first job at the agent", || signer.held.exists());
    let second = sign_async(&unix, "second.exe", &pe);
    let third = sign_async(&unix, "third.exe", &pe);

    // The list: the same JobList over D-Bus (signetctl) and HTTP; --json is one line,
    // --output-format json-pretty the same document indented.
    let out = ctl(&bus, As::Root, &["jobs", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out.stdout)
    );
    let over_dbus: JobList = json(&out);
    let pretty = ctl(&bus, As::Root, &["jobs", "--output-format", "json-pretty"]);
    assert!(text(&pretty.stdout).lines().count() > 1);
    assert_eq!(no_ages(json(&pretty)), no_ages(over_dbus.clone()));
    // Into a pipe whose reader has gone (`signetctl jobs --json | head -1`): quietly 141.
    let mut closed = Command::new(bin("signetctl"));
    closed
        .env("SIGNET_DBUS", &bus.address)
        .args(["jobs", "--json"]);
    let out = super::cli::with_closed_stdout(&mut closed);
    super::cli::assert_quiet_broken_pipe("signetctl jobs --json", &out);
    let (status, over_http): (u16, JobList) = http(&unix, "GET", "/v1/operator/jobs");
    assert_eq!(status, 200);
    assert_eq!(
        no_ages(over_dbus.clone()),
        no_ages(over_http),
        "one command, one result"
    );
    let ids =
        |v: &[signet_api::operator::JobSummary]| v.iter().map(|j| j.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&over_dbus.running), vec![first.clone()]);
    assert_eq!(ids(&over_dbus.queued), [second.clone(), third.clone()]);
    assert_eq!(over_dbus.queued[1].position, Some(1));
    assert_eq!(over_dbus.queued[0].caller, "uid:0");
    let out = ctl(&bus, As::Root, &["jobs"]);
    assert_eq!(code(&out), 0);
    golden("jobs-busy.txt", &text(&out.stdout), &w);
    // The one-screen status lists them too (its JSON stays the status alone).
    let out = ctl(&bus, As::Admin, &["status"]);
    let screen = text(&out.stdout);
    assert!(screen.contains("\n  jobs:\n    JOB "), "{screen}");
    for (id, state) in [(&first, "running"), (&second, "queued"), (&third, "queued")] {
        assert!(
            screen
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{id} ")) && l.contains(state)),
            "job {id} {state}: {screen}"
        );
    }

    // Everyone outside root and the signet group is refused by the bus, and nothing
    // happens to the job.
    for args in [
        &["jobs"][..],
        &["cancel", &third],
        &["audit", "verify"],
        &["doctor"],
    ] {
        let out = ctl(&bus, As::Nobody, args);
        assert_eq!(code(&out), 3, "{args:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("refused") && text(&out.stderr).contains("signet group"),
            "{}",
            text(&out.stderr)
        );
    }
    // Over HTTP the operator's commands are root's: a TCP client is refused.
    let (status, body) = call_json(&tcp, "GET", "/v1/operator/jobs", None);
    assert_eq!(
        (status, &body["code"]),
        (403, &"forbidden".into()),
        "{body}"
    );

    // A signer sees only its own jobs: none of root's.
    let out = ctl(&bus, As::SignetGroup, &["jobs", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let own: JobList = json(&out);
    assert!(
        own.running.is_empty() && own.queued.is_empty() && own.recent.is_empty(),
        "{own:?}"
    );

    // A member of the signet-admin group reads the list and follows it: `jobs --watch`
    // prints it again when a job ends (JobFinished; the refresh interval is an hour).
    let mut watch = Command::new(bin("signetctl"));
    let gid = admin_gid();
    watch
        .env("SIGNET_DBUS", &bus.address)
        .args(["jobs", "--watch", "--json", "--interval", "3600"])
        .uid(65534)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut watch = watch.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let line = rx
        .recv_timeout(STATE_TIMEOUT)
        .expect("the watch prints the list");
    let seen: JobList = serde_json::from_str(&line).unwrap();
    assert_eq!(ids(&seen.queued), [second.clone(), third.clone()]);

    // A signer may not cancel another caller's job: to it, the job does not exist.
    let out = ctl(&bus, As::SignetGroup, &["cancel", &third]);
    assert_eq!(code(&out), 4, "{}", text(&out.stderr));
    let (_, still): (u16, JobList) = http(&unix, "GET", "/v1/operator/jobs");
    assert_eq!(ids(&still.queued), [second.clone(), third.clone()]);
    // The admin group may cancel any caller's job.
    let out = ctl(&bus, As::Admin, &["cancel", &third]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("job {third} is cancelled\n"));
    let line = rx
        .recv_timeout(STATE_TIMEOUT)
        .expect("the watch prints the list again when the job ends");
    let seen: JobList = serde_json::from_str(&line).unwrap();
    assert_eq!(ids(&seen.queued), vec![second.clone()]);
    assert_eq!(seen.recent[0].id, third);
    assert_eq!(seen.recent[0].state.as_str(), "cancelled");

    // Root cancels over D-Bus: the same JobView as HTTP would give.
    let out = ctl(&bus, As::Root, &["cancel", &second, "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let view: JobView = json(&out);
    assert_eq!(
        (view.id.as_str(), view.state.as_str()),
        (second.as_str(), "cancelled")
    );
    let (status, again): (u16, JobView) =
        http(&unix, "DELETE", &format!("/v1/operator/jobs/{second}"));
    assert_eq!(
        (status, again),
        (200, view),
        "cancelling again answers the job as it is"
    );
    let line = rx.recv_timeout(STATE_TIMEOUT).unwrap();
    let seen: JobList = serde_json::from_str(&line).unwrap();
    assert!(seen.queued.is_empty(), "{seen:?}");
    let _ = watch.kill();
    let _ = watch.wait();

    // Errors: named after their code, with the message HTTP gives; exit code 4.
    let (status, body) = call_json(&unix, "DELETE", "/v1/operator/jobs/99", None);
    assert_eq!(status, 404);
    let (name, message) = dbus_call(&bus, "Cancel", &("99",)).unwrap_err();
    assert_eq!(name, "org.signet.Signet1.Error.UnknownJob");
    assert_eq!(message, body["message"].as_str().unwrap());
    let out = ctl(&bus, As::Root, &["cancel", "99"]);
    assert_eq!(code(&out), 4);
    golden("cancel-unknown.stderr", &text(&out.stderr), &w);
    let (status, body) = call_json(&unix, "DELETE", &format!("/v1/operator/jobs/{first}"), None);
    assert_eq!(status, 400);
    let (name, message) = dbus_call(&bus, "Cancel", &(first.as_str(),)).unwrap_err();
    assert_eq!(name, "org.signet.Signet1.Error.BadRequest");
    assert_eq!(message, body["message"].as_str().unwrap());
    assert!(message.contains("can no longer be cancelled"), "{message}");

    // Every cancel is in the audit log under who asked, through which front, refusals
    // with their code: the group member's uid and root's as the bus reports them.
    let out = w.signetd(&["audit", "export"]);
    let actions: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["result"] == "cancel")
        .collect();
    let took = |job: &str, caller: &str, via: &str, error: Option<&str>| {
        actions.iter().any(|r| {
            r["job"] == job
                && r["caller"] == caller
                && r["transport"] == via
                && r["error"].as_str() == error
        })
    };
    assert!(took(&third, "uid:65534", "dbus", None), "{actions:#?}");
    assert!(took(&second, "uid:0", "dbus", None), "{actions:#?}");
    assert!(took(&second, "uid:0", "unix", None), "{actions:#?}");
    assert!(
        took("99", "uid:0", "dbus", Some("unknown_job")),
        "{actions:#?}"
    );
    assert!(
        took(&first, "uid:0", "dbus", Some("bad_request")),
        "{actions:#?}"
    );

    signer.release();
    wait_until("the first job signed", || {
        let (_, l): (u16, JobList) = http(&unix, "GET", "/v1/operator/jobs");
        l.running.is_empty()
            && l.recent
                .iter()
                .any(|j| j.id == first && j.state.as_str() == "signed")
    });
    let out = ctl(&bus, As::Root, &["jobs"]);
    golden("jobs-ended.txt", &text(&out.stdout), &w);
}

#[test]
fn audit_over_dbus_is_the_log_signetd_exports_and_names_a_changed_record() {
    let mut w = World::new();
    let bus = Bus::start(&w);
    let (unix, _) = appliance(&mut w, &bus, "", "");
    for name in ["a.exe", "b.exe"] {
        let f = w.pe(name);
        let out = signet(&unix, &["sign", f.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    }
    let out = signet(
        &unix,
        &["sign", "--profile", "nope", w.pe("c.exe").to_str().unwrap()],
    );
    assert_eq!(code(&out), 3);

    // tail: the same records over D-Bus and HTTP.
    let out = ctl(&bus, As::Root, &["audit", "tail", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let tail: Vec<AuditRecord> = json(&out);
    let (_, over_http): (u16, Vec<AuditRecord>) = http(&unix, "GET", "/v1/operator/audit?n=20");
    assert_eq!(tail, over_http);
    assert_eq!(tail.len(), 3);
    assert_eq!(
        tail.iter().map(|r| r.result.as_str()).collect::<Vec<_>>(),
        ["signed", "signed", "refused"]
    );
    let out = ctl(&bus, As::Root, &["audit", "tail", "-n", "2"]);
    golden("audit-tail.txt", &text(&out.stdout), &w);

    // export: byte for byte what `signetd audit export` writes.
    let out = ctl(&bus, As::Root, &["audit", "export"]);
    assert_eq!(code(&out), 0);
    let local = w.signetd(&["audit", "export"]);
    assert_eq!(text(&out.stdout), text(&local.stdout));
    let since = tail[1].time.clone();
    let out = ctl(&bus, As::Root, &["audit", "export", "--since", &since]);
    assert_eq!(text(&out.stdout).lines().count(), 2);
    let out = ctl(&bus, As::Root, &["audit", "export", "--since", "yesterday"]);
    assert_eq!(code(&out), 4);
    assert!(
        text(&out.stderr).contains("RFC 3339"),
        "{}",
        text(&out.stderr)
    );

    // verify: intact, then a changed record is named; the same AuditCheck as signetd's.
    let out = ctl(&bus, As::Root, &["audit", "verify"]);
    assert_eq!(code(&out), 0);
    golden("audit-verify-intact.txt", &text(&out.stdout), &w);
    {
        let db = rusqlite::Connection::open(w.path("state/signet.db")).unwrap();
        db.execute("UPDATE audit SET caller = 'uid:1000' WHERE seq = 2", [])
            .unwrap();
    }
    let out = ctl(&bus, As::Root, &["audit", "verify"]);
    assert_eq!(code(&out), 1);
    golden("audit-verify-broken.txt", &text(&out.stdout), &w);
    let out = ctl(&bus, As::Root, &["audit", "verify", "--json"]);
    assert_eq!(code(&out), 1);
    let over_dbus: AuditCheck = json(&out);
    let local: AuditCheck = json(&w.signetd(&["audit", "verify", "--json"]));
    let (_, over_http): (u16, AuditCheck) = http(&unix, "GET", "/v1/operator/audit/verify");
    assert_eq!(over_dbus, local);
    assert_eq!(over_dbus, over_http);
    assert_eq!(
        (over_dbus.kind.as_deref(), over_dbus.record),
        (Some("changed"), Some(2))
    );
}

/// A host tree for `[doctor] host_root` where everything is right, and `qm` answering
/// for signing VM 105 (a wrapper around tests' fake-qm).
struct Host {
    root: PathBuf,
    qm_dir: PathBuf,
    qm: PathBuf,
}

impl Host {
    fn healthy(w: &World) -> Host {
        let root = w.path("host");
        let serial = std::fs::read_to_string(w.path("token-serial")).unwrap();
        let dev = root.join("sys/bus/usb/devices/1-2");
        let intf = root.join("sys/bus/usb/devices/1-2:1.0");
        let usbfs = root.join("sys/bus/usb/drivers/usbfs");
        for d in [&dev, &intf, &usbfs, &root.join("dev"), &root.join("proc/1")] {
            std::fs::create_dir_all(d).unwrap();
        }
        for (k, v) in [
            ("idVendor", "0529"),
            ("idProduct", "0620"),
            ("serial", serial.trim()),
            ("devnum", "4"),
            ("product", "eToken 5110"),
        ] {
            std::fs::write(dev.join(k), format!("{v}\n")).unwrap();
        }
        std::fs::write(intf.join("bInterfaceClass"), "0b\n").unwrap();
        // QEMU holds the token for its VM.
        std::os::unix::fs::symlink(&usbfs, intf.join("driver")).unwrap();
        std::fs::write(root.join("proc/1/comm"), "systemd\n").unwrap();
        std::fs::write(
            root.join("proc/modules"),
            "vhost_vsock 24576 0 - Live 0x0\nvhost 57344 1 vhost_vsock, Live 0x0\n",
        )
        .unwrap();
        std::fs::write(root.join("dev/vhost-vsock"), "").unwrap();
        let qm_dir = w.path("qm");
        std::fs::create_dir_all(&qm_dir).unwrap();
        std::fs::write(
            qm_dir.join("105.conf"),
            "machine: q35\nostype: l26\nusb0: host=1-2\nargs: -device vhost-vsock-pci,guest-cid=105 -chardev socket,id=signet,path=/run/signet/vm-105.qmp,server=on,wait=off -mon chardev=signet,mode=control\n",
        )
        .unwrap();
        let fake = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("appliance/signetd/tests/fixtures/fake-qm");
        let qm = w.path("qm.sh");
        std::fs::write(
            &qm,
            format!(
                "#!/bin/sh\nFAKE_QM_DIR='{}' exec '{}' \"$@\"\n",
                qm_dir.display(),
                fake.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&qm, std::fs::Permissions::from_mode(0o755)).unwrap();
        Host { root, qm_dir, qm }
    }

    fn config(&self) -> String {
        format!(
            "[queue]\nspool_quota_mb = 16\n[doctor]\nhost_root = \"{}\"\nqm = \"{}\"\nsigning_vm = 105\n",
            self.root.display(),
            self.qm.display()
        )
    }

    /// Breaks the host: no vsock module or device, pcscd running, the VM without
    /// Signet's monitor and with a pre-7.1 machine.
    fn break_it(&self) {
        std::fs::remove_file(self.root.join("dev/vhost-vsock")).unwrap();
        std::fs::write(self.root.join("proc/modules"), "kvm 1 0 - Live 0x0\n").unwrap();
        std::fs::create_dir_all(self.root.join("proc/77")).unwrap();
        std::fs::write(self.root.join("proc/77/comm"), "pcscd\n").unwrap();
        std::fs::write(
            self.qm_dir.join("105.conf"),
            "machine: pc-q35-6.0\nostype: l26\nusb0: host=1-2\nargs: -device vhost-vsock-pci,guest-cid=105\n",
        )
        .unwrap();
    }
}

#[test]
fn doctor_over_dbus_on_a_healthy_and_a_broken_host() {
    let mut w = World::new();
    let bus = Bus::start(&w);
    let host = Host::healthy(&w);
    let (unix, _) = appliance(&mut w, &bus, "", &host.config());
    let out = ctl(&bus, As::Root, &["status"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    golden("status-healthy.txt", &text(&out.stdout), &w);

    let out = ctl(&bus, As::Root, &["doctor"]);
    assert_eq!(code(&out), 0, "{}{}", text(&out.stdout), text(&out.stderr));
    golden("doctor-healthy.txt", &text(&out.stdout), &w);
    let out = ctl(
        &bus,
        As::Root,
        &["doctor", "--output-format", "json-pretty"],
    );
    assert_eq!(code(&out), 0);
    let over_dbus: DoctorReport = json(&out);
    let (_, over_http): (u16, DoctorReport) = http(&unix, "GET", "/v1/operator/doctor");
    assert_eq!(over_dbus, over_http, "one command, one result");
    golden("doctor-healthy.json", &text(&out.stdout), &w);

    host.break_it();
    w.stop("signet-agent");
    // The daemon has noticed (its timeline says so) before the broken state is read.
    wait_until("the daemon sees the agent gone", || {
        let (_, s) = call_json(&unix, "GET", "/v1/status", None);
        s["recovery"]
            .as_array()
            .is_some_and(|r| r.iter().any(|e| e["event"] == "agent_unreachable"))
    });
    // The host checks show the host's detail: an operator's, not a signer's.
    let out = ctl(&bus, As::SignetGroup, &["doctor"]);
    assert_eq!(code(&out), 3, "{}{}", text(&out.stdout), text(&out.stderr));
    let out = ctl(&bus, As::Admin, &["doctor"]);
    assert_eq!(code(&out), 1, "{}{}", text(&out.stdout), text(&out.stderr));
    golden("doctor-broken.txt", &text(&out.stdout), &w);
    let out = ctl(&bus, As::SignetGroup, &["status"]);
    assert_eq!(code(&out), 1);
    golden("status-broken.txt", &text(&out.stdout), &w);
    let out = ctl(&bus, As::SignetGroup, &["status", "--json"]);
    assert_eq!(code(&out), 1);
    let status: DaemonStatus = json(&out);
    assert!(!status.signing_works);
    let out = ctl(
        &bus,
        As::Root,
        &["doctor", "--output-format", "json-pretty"],
    );
    assert_eq!(code(&out), 1);
    let report: DoctorReport = json(&out);
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.status == signet_api::operator::CheckStatus::Fail)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        failed,
        [
            "vhost_vsock",
            "vsock_device",
            "vm_monitor",
            "usb_hotplug",
            "host_conflict",
            "agent"
        ]
    );
    golden("doctor-broken.json", &text(&out.stdout), &w);

    // Enrolling with signetctl (D-Bus `Enroll`), through the same `qm`: the dry run
    // changes nothing, then the change is made and audited under the caller's uid.
    std::fs::write(host.qm_dir.join("200.conf"), "ostype: l26\nmachine: q35\n").unwrap();
    let profiles: Vec<String> = Vec::new();
    let out = ctl(
        &bus,
        As::Root,
        &["enroll", "build-vm", "200", "--dry-run", "--json"],
    );
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let dry: signet_api::operator::EnrollReport = json(&out);
    assert!(!dry.applied);
    assert_eq!(dry.changes[0].key, "args", "{dry:?}");
    assert_eq!(
        dry.changes[0].new, "-device vhost-vsock-pci,guest-cid=200",
        "{dry:?}"
    );
    let conf = || std::fs::read_to_string(host.qm_dir.join("200.conf")).unwrap();
    assert!(!conf().contains("args:"), "the dry run changed nothing");
    // The same over raw D-Bus.
    let raw: signet_api::operator::EnrollReport = serde_json::from_str(
        &dbus_call(&bus, "Enroll", &("build-vm", 200u32, "", &profiles, false)).unwrap(),
    )
    .unwrap();
    assert_eq!(raw, dry);
    let out = ctl(&bus, As::Root, &["enroll", "build-vm", "200"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("VM 200 enrolled as build VM\n")
            && text(&out.stdout).contains("args: (unset) -> -device vhost-vsock-pci,guest-cid=200"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        conf().contains("args: -device vhost-vsock-pci,guest-cid=200"),
        "{}",
        conf()
    );
    // Only root may enroll (the bus refuses the others); a token that is not plugged
    // in is refused with the daemon's message.
    for who in [As::Nobody, As::SignetGroup, As::Admin] {
        let out = ctl(&bus, who, &["enroll", "build-vm", "200"]);
        assert_eq!(code(&out), 3, "{who:?}: {}", text(&out.stderr));
    }
    let out = ctl(
        &bus,
        As::Root,
        &[
            "enroll",
            "signing-vm",
            "201",
            "--token",
            "NOSUCHTOKEN",
            "--dry-run",
        ],
    );
    assert_eq!(code(&out), 4, "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stderr).starts_with("signetctl: "),
        "{}",
        text(&out.stderr)
    );
    let (name, _) =
        dbus_call(&bus, "Enroll", &("printer", 200u32, "", &profiles, false)).unwrap_err();
    assert_eq!(name, "org.signet.Signet1.Error.BadRequest");
    let out = w.signetd(&["audit", "export"]);
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.contains("\"result\":\"enroll\"")
                && l.contains("\"caller\":\"uid:0\"")
                && l.contains("\"transport\":\"dbus\"")
                && l.contains("\"filename\":\"VM 200 as build VM\"")),
        "{}",
        text(&out.stdout)
    );
}

/// Every core command answers the same result type through each front: HTTP, D-Bus
/// (raw) and the CLI's JSON.
#[test]
fn every_core_command_gives_one_result_type_over_http_dbus_and_the_cli() {
    let mut w = World::new();
    let bus = Bus::start(&w);
    let host = Host::healthy(&w);
    let (unix, _) = appliance(&mut w, &bus, "", &host.config());
    let out = signet(&unix, &["sign", w.pe("a.exe").to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));

    /// One command: its HTTP path, its raw D-Bus call, its CLI arguments; `same`
    /// takes out what moves between two calls (ages).
    fn check<T>(
        bus: &Bus,
        unix: &Endpoint,
        path: &str,
        raw: Result<String, (String, String)>,
        cli: &[&str],
        same: impl Fn(T) -> T,
    ) where
        T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let (status, over_http): (u16, T) = http(unix, "GET", path);
        assert_eq!(status, 200, "{path}");
        let raw = raw.unwrap_or_else(|e| panic!("{path} over D-Bus: {e:?}"));
        let over_dbus: T = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{path}: {e}"));
        let out = ctl(bus, As::Root, cli);
        assert!(code(&out) <= 1, "{cli:?}: {}", text(&out.stderr));
        let over_cli: T = json(&out);
        let over_http = same(over_http);
        assert_eq!(over_http, same(over_dbus), "{path} over HTTP and D-Bus");
        assert_eq!(over_http, same(over_cli), "{path} and signetctl {cli:?}");
    }
    let b = &bus;
    check::<DaemonStatus>(
        b,
        &unix,
        "/v1/status",
        dbus_call(b, "Status", &()),
        &["status", "--json"],
        |a| a,
    );
    check::<JobList>(
        b,
        &unix,
        "/v1/operator/jobs",
        dbus_call(b, "Jobs", &(0u32,)),
        &["jobs", "--json"],
        no_ages,
    );
    check::<Vec<AuditRecord>>(
        b,
        &unix,
        "/v1/operator/audit",
        dbus_call(b, "AuditTail", &(0u32,)),
        &["audit", "tail", "--json"],
        |a| a,
    );
    check::<Vec<AuditRecord>>(
        b,
        &unix,
        "/v1/operator/audit?since=2000-01-01T00:00:00Z",
        dbus_call(b, "AuditExport", &("2000-01-01T00:00:00Z",)),
        &["audit", "tail", "--json"],
        |a| a,
    );
    check::<AuditCheck>(
        b,
        &unix,
        "/v1/operator/audit/verify",
        dbus_call(b, "AuditVerify", &()),
        &["audit", "verify", "--json"],
        |a| a,
    );
    check::<DoctorReport>(
        b,
        &unix,
        "/v1/operator/doctor",
        dbus_call(b, "Doctor", &()),
        &["doctor", "--json"],
        |a| a,
    );
}

#[test]
fn the_man_pages_and_completions_come_from_the_clap_definitions() {
    let w = World::new();
    let dir = w.path("man");
    let out = Command::new(bin("signetctl"))
        .args(["man", "--dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    for page in [
        "signetctl.1",
        "signetctl-jobs.1",
        "signetctl-cancel.1",
        "signetctl-audit-verify.1",
        "signetctl-doctor.1",
        "signetctl-status.1",
    ] {
        let roff =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            roff.starts_with(".ie") && roff.contains(".TH"),
            "{page}: {roff}"
        );
    }
    let main = std::fs::read_to_string(dir.join("signetctl.1")).unwrap();
    for sub in ["jobs", "cancel", "audit", "doctor", "status"] {
        assert!(
            main.contains(&format!("signetctl\\-{sub}(1)")),
            "{sub}: {main}"
        );
    }
    assert!(main.contains("Exit codes"), "{main}");
    let doctor = std::fs::read_to_string(dir.join("signetctl-doctor.1")).unwrap();
    assert!(doctor.contains("\\-\\-json"), "{doctor}");

    for (shell, mark) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef signetctl"),
        ("fish", "complete -c signetctl"),
    ] {
        let out = Command::new(bin("signetctl"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{shell}");
        let script = text(&out.stdout);
        assert!(script.contains(mark), "{shell}: {script}");
        for sub in ["jobs", "cancel", "audit", "doctor", "verify", "--watch"] {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
}

/// The packages ship a man page and completions for every binary: signet, signetd and
/// signet-agent generate them like signetctl (the shared `signet_api::docs`).
#[test]
fn every_binary_writes_its_man_pages_and_completions() {
    let w = World::new();
    for (binary, sub) in [
        ("signet", "sign"),
        ("signetd", "enroll-signing-vm"),
        ("signet-agent", "doctor"),
    ] {
        let dir = w.path(&format!("man-{binary}"));
        let out = Command::new(bin(binary))
            .args(["man", "--dir", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{binary}: {}", text(&out.stderr));
        for page in [format!("{binary}.1"), format!("{binary}-{sub}.1")] {
            let roff =
                std::fs::read_to_string(dir.join(&page)).unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(roff.contains(".TH"), "{page}: {roff}");
        }
        let out = Command::new(bin(binary))
            .args(["completions", "bash"])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{binary}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains("complete -F"), "{binary}: {script}");
        assert!(
            script.contains(sub.split('-').next().unwrap()),
            "{binary}: {script}"
        );
        // Listed in --help (cli::every_binary_lists_man_and_completions_in_its_help).
        let help = Command::new(bin(binary)).arg("--help").output().unwrap();
        assert!(text(&help.stdout).contains("completions"), "{binary}");
    }
}

/// `check-config` (the units' ExecStartPre) validates without binding anything: the
/// PIN file's mode is caught with the fix, a good configuration passes, and the
/// listening socket is never created.
#[test]
fn check_config_validates_without_binding_and_catches_an_open_pin_file() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    let pin = w.path("pin");
    let sock = w.path("signetd.sock");
    std::fs::write(
        w.path("signetd.toml"),
        format!(
            "listen = [\"unix:{}\"]\nagent = \"unix:{}\"\npin_file = \"{}\"\n",
            sock.display(),
            w.path("agent.sock").display(),
            pin.display()
        ),
    )
    .unwrap();
    std::fs::write(
        w.path("agent.toml"),
        format!(
            "listen = \"unix:{}\"\n[token]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\nlabel = \"signet-demo\"\npin_file = \"{}\"\n",
            w.path("agent.sock").display(),
            pin.display()
        ),
    )
    .unwrap();
    let run = |binary: &str, config: &str| {
        Command::new(bin(binary))
            .args(["--config", w.path(config).to_str().unwrap(), "check-config"])
            .output()
            .unwrap()
    };
    for (binary, config) in [("signetd", "signetd.toml"), ("signet-agent", "agent.toml")] {
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = run(binary, config);
        assert_eq!(code(&out), 0, "{binary}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("is valid"), "{binary}");

        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = run(binary, config);
        assert_eq!(code(&out), 1, "{binary}");
        let err = text(&out.stderr);
        assert!(
            err.contains("mode 0644") && err.contains(&format!("chmod 600 {}", pin.display())),
            "{binary}: {err}"
        );
    }
    std::fs::write(
        w.path("signetd.toml"),
        "agent = \"unix:/a\"\nlisten = [unix:/x]\n",
    )
    .unwrap();
    let out = run("signetd", "signetd.toml");
    assert_eq!(code(&out), 1);
    assert!(
        text(&out.stderr).contains("line 2"),
        "{}",
        text(&out.stderr)
    );
    assert!(!sock.exists(), "check-config bound {}", sock.display());
}

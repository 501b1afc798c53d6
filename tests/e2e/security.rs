//! The trust boundary on the host, with real processes and real uids: roles over
//! D-Bus (checked by signetd itself, not only by the bus's policy), a granted
//! non-root uid signing over the unix socket, state private under umask 0022, refusals
//! that cannot flood the audit log, TLS peers without credentials learning nothing,
//! and PIN files that others could read refused at start.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::dbus::{text, Bus};
use super::operator::{admin_gid, signet_gid};
use super::*;

/// The unprivileged uid the tests run callers as.
const NOBODY: u32 = 65534;

/// Lets other uids reach sockets in the test's directory (a temp dir is 0700).
fn open_dir(w: &World) {
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
}

/// `signetctl ARGS` on `bus` as `uid` with `gid` as its only group.
fn ctl_as(bus: &Bus, uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new(bin("signetctl"))
        .env("SIGNET_DBUS", &bus.address)
        .args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Agent and daemon (unix socket, D-Bus on `bus`), with `extra` configuration.
fn appliance_on(w: &mut World, bus: &Bus, extra: &str) -> Endpoint {
    w.dbus = Some(bus.address.clone());
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
        &format!("[profiles.release]\ndescription = \"Signet test\"\n{extra}"),
    )
    .remove(0)
}

#[test]
fn a_signer_cannot_operate_cancel_others_jobs_or_enroll_over_dbus() {
    let mut w = World::new();
    let bus = Bus::start(&w);
    let signer = HeldSigner::new(&w);
    w.dbus = Some(bus.address.clone());
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        &signer.agent_config(),
    );
    let unix = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            "[profiles.release]\ndescription = \"Signet test\"\n",
        )
        .remove(0);
    let pe = std::fs::read(w.pe("a.exe")).unwrap();
    // Root's job held at the agent, another waiting behind it.
    let first = sign_async(&unix, "first.exe", &pe);
    wait_until("the first job at the agent", || signer.held.exists());
    let second = sign_async(&unix, "second.exe", &pe);
    let (sg, ag) = (signet_gid(), admin_gid());

    // A signer reads the status…
    let out = ctl_as(&bus, NOBODY, sg, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // …but cannot cancel root's job: to it, that job does not exist.
    let out = ctl_as(&bus, NOBODY, sg, &["cancel", &second]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let (_, job) = call_json(&unix, "GET", &format!("/v1/jobs/{second}"), None);
    assert_eq!(job["state"], "queued", "{job}");
    // The bus keeps it from the operator's methods and from Enroll.
    for args in [
        &["detach", "0123456789"][..],
        &["attach", "0123456789"],
        &["audit", "tail"],
        &["audit", "verify"],
        &["doctor"],
        &["enroll", "build-vm", "200", "--dry-run"],
    ] {
        let out = ctl_as(&bus, NOBODY, sg, args);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("refused"),
            "{}",
            text(&out.stderr)
        );
    }
    // An operator (signet-admin) passes the role check and meets the daemon's own
    // answer (no such token here), but may not enroll.
    let out = ctl_as(&bus, NOBODY, ag, &["detach", "0123456789"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("may not"),
        "{}",
        text(&out.stderr)
    );
    let out = ctl_as(
        &bus,
        NOBODY,
        ag,
        &["enroll", "build-vm", "200", "--dry-run"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    // And cancels root's job.
    let out = ctl_as(&bus, NOBODY, ag, &["cancel", &second]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    signer.release();
    let (status, _) = fetch(&unix, &format!("/v1/jobs/{first}/result"));
    assert_eq!(status, 200);
}

#[test]
fn signetd_checks_roles_itself_when_the_bus_lets_everyone_through() {
    let mut w = World::new();
    // A policy that lets anyone call anything: only signetd's own checks remain.
    let open = w.path("open-policy.conf");
    std::fs::write(
        &open,
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root"><allow own="org.signet.Signet1"/></policy>
  <policy context="default"><allow send_destination="org.signet.Signet1"/></policy>
</busconfig>
"#,
    )
    .unwrap();
    let bus = Bus::start_with_policy(&w, &open);
    appliance_on(&mut w, &bus, "");
    let (sg, ag) = (signet_gid(), admin_gid());

    let refused = |out: &Output, what: &str| {
        assert_eq!(out.status.code(), Some(4), "{what}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("uid {NOBODY} may not")),
            "{what}: {err}"
        );
        err
    };
    // Someone in neither group: not even the status.
    refused(&ctl_as(&bus, NOBODY, NOBODY, &["status"]), "status");
    // A signer: the status, not the operator's methods.
    let out = ctl_as(&bus, NOBODY, sg, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for args in [
        &["detach", "0123456789"][..],
        &["reattach", "0123456789"],
        &["audit", "tail"],
        &["audit", "export"],
        &["doctor"],
    ] {
        let err = refused(&ctl_as(&bus, NOBODY, sg, args), &format!("{args:?}"));
        assert!(err.contains("signet-admin"), "{err}");
    }
    // Enrolling is root's, even for an operator.
    for gid in [NOBODY, sg, ag] {
        let err = refused(
            &ctl_as(
                &bus,
                NOBODY,
                gid,
                &["enroll", "build-vm", "200", "--dry-run"],
            ),
            "enroll",
        );
        assert!(err.contains("root@pam"), "{err}");
    }
    // The operator's reads work for signet-admin.
    let out = ctl_as(&bus, NOBODY, ag, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // The refusals are in the audit log, coalesced per caller and reason.
    let records = w.audit_records();
    let mine: Vec<_> = records
        .iter()
        .filter(|r| r["caller"] == format!("uid:{NOBODY}") && r["transport"] == "dbus")
        .collect();
    assert!(!mine.is_empty(), "{records:?}");
    assert!(mine
        .iter()
        .all(|r| r["result"] == "refused" && r["error"] == "forbidden"));
    assert!(mine.len() < 8, "coalesced, not one per call: {mine:?}");
}

#[test]
fn a_granted_non_root_uid_signs_over_the_unix_socket_and_state_stays_private_under_umask_0022() {
    let mut w = World::new();
    open_dir(&w);
    // What an older version may have left: an open state directory and file.
    let state = w.path("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(state.join("old-export.json"), b"{}").unwrap();
    std::fs::set_permissions(
        state.join("old-export.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let sock = w.path("signetd.sock");
    w.write_daemon_config(&format!(
        "listen = [\"unix:{}\"]\nagent = \"{agent}\"\ndbus = \"none\"\n\
         [profiles.release]\ndescription = \"Signet test\"\n\
         [[grants]]\ncallers = [\"uid:0\", \"group:signet\"]\nprofiles = [\"release\"]\n",
        sock.display()
    ));
    let umask_022: [&std::ffi::OsStr; 3] = [
        "sh".as_ref(),
        "-c".as_ref(),
        "umask 022; exec \"$0\" \"$@\"".as_ref(),
    ];
    w.restart_daemon_under(&umask_022);

    // The socket: root and the signet group.
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, signet_gid()));

    // A member of the signet group, granted by group:signet, signs as itself.
    let work = w.path("nobody");
    std::fs::create_dir(&work).unwrap();
    std::fs::copy(w.path("hello.exe"), work.join("a.exe")).unwrap();
    for p in [work.clone(), work.join("a.exe")] {
        nix::unistd::chown(
            &p,
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            Some(nix::unistd::Gid::from_raw(NOBODY)),
        )
        .unwrap();
    }
    let sign_as = |gid: u32| {
        Command::new(bin("signet"))
            .env("SIGNET_ENDPOINT", format!("unix:{}", sock.display()))
            .env_remove("SIGNET_CONFIG")
            .env("HOME", &work)
            .args(["sign", work.join("a.exe").to_str().unwrap()])
            .uid(NOBODY)
            .gid(gid)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = sign_as(signet_gid());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(verify(&w, &work.join("a.exe")).0);
    let records = w.audit_records();
    assert!(
        records
            .iter()
            .any(|r| r["caller"] == format!("uid:{NOBODY}") && r["result"] == "signed"),
        "{records:?}"
    );
    // A member by a supplementary group (its primary group its own) is granted by
    // the groups the kernel recorded when it connected.
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            &format!("--groups={}", signet_gid()),
            "--",
        ])
        .arg(bin("signet"))
        .env("SIGNET_ENDPOINT", format!("unix:{}", sock.display()))
        .env_remove("SIGNET_CONFIG")
        .env("HOME", &work)
        .args([
            "sign",
            "--description",
            "by its group",
            work.join("a.exe").to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let signed_by_nobody = w
        .audit_records()
        .iter()
        .filter(|r| r["caller"] == format!("uid:{NOBODY}") && r["result"] == "signed")
        .count();
    assert_eq!(signed_by_nobody, 2);
    // Outside the group the socket is closed to it.
    let out = sign_as(NOBODY);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));

    // Every file under the state directory is 0600, every directory 0700.
    fn walk(p: &Path, seen: &mut Vec<(String, u32)>) {
        let meta = std::fs::symlink_metadata(p).unwrap();
        seen.push((p.display().to_string(), meta.mode() & 0o7777));
        if meta.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), seen);
            }
        }
    }
    let mut seen = Vec::new();
    walk(&state, &mut seen);
    assert!(
        seen.iter().any(|(p, _)| p.ends_with("signet.db")),
        "{seen:?}"
    );
    assert!(seen.len() > 3, "the database and the spool: {seen:?}");
    for (p, mode) in &seen {
        assert_eq!(mode & 0o077, 0, "{p} is {mode:o}");
    }
    assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
}

/// One refused request after another on one keep-alive connection: answers how many
/// were answered with `want`.
fn refuse_many(sock: &Path, query: &str, n: usize, want: u16) -> usize {
    let stream = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let request =
        format!("POST /v1/sign?{query} HTTP/1.1\r\nHost: signetd\r\nContent-Length: 0\r\n\r\n");
    let mut answered = 0;
    for _ in 0..n {
        writer.write_all(request.as_bytes()).unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let code: u16 = status.split(' ').nth(1).unwrap().parse().unwrap();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).unwrap();
        if code == want {
            answered += 1;
        }
    }
    answered
}

#[test]
fn ten_thousand_refused_requests_leave_a_few_audit_records_and_a_whole_chain() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let sock = w.path("signetd.sock");
    // Root may use "release" only: "other" is refused forbidden, "nope" does not exist.
    w.start_daemon_config(&format!(
        "listen = [\"unix:{}\"]\nagent = \"{agent}\"\ndbus = \"none\"\n\
         default_profile = \"release\"\n\
         [limits]\nrefusal_interval_seconds = 3600\n\
         [profiles.release]\n[profiles.other]\n\
         [[grants]]\ncallers = [\"uid:0\"]\nprofiles = [\"release\"]\n",
        sock.display()
    ));
    const THREADS: usize = 8;
    const EACH: usize = 1250;
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                if i % 2 == 0 {
                    refuse_many(&sock, "profile=other", EACH, 403)
                } else {
                    refuse_many(&sock, "profile=nope", EACH, 404)
                }
            })
        })
        .collect();
    let answered: usize = workers.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(answered, THREADS * EACH, "every request got its refusal");
    // Stopping records the counts still held.
    let stopped = w.sigterm("signetd", Duration::from_secs(60));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");

    let records = w.audit_records();
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["result"] == "refused")
        .collect();
    assert!(
        refused.len() <= 4,
        "one record and one count per caller and reason: {refused:#?}"
    );
    let stood_for: u64 = refused
        .iter()
        .map(|r| r["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(stood_for, (THREADS * EACH) as u64, "{refused:#?}");
    for code in ["forbidden", "unknown_profile"] {
        assert!(
            refused
                .iter()
                .any(|r| r["error"] == code && r["count"].as_u64() > Some(1)),
            "{code}: {refused:#?}"
        );
    }
    let out = w.signetd(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// curl against the TLS listener: the status, the headers and the body.
fn curl(ca: &Path, url: &str, user: Option<&str>) -> (u16, String, serde_json::Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-D", "-", "--cacert"])
        .arg(ca);
    if let Some(u) = user {
        cmd.args(["-u", u]);
    }
    let out = cmd.arg(url).output().unwrap();
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn over_tls_the_status_needs_credentials_and_wrong_secrets_are_throttled() {
    let mut w = World::new();
    let (ca, cert, key) = make_tls(&w.path(""));
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let eps = w.start_daemon_config(&format!(
        "listen = [\"unix:{}\"]\nagent = \"{agent}\"\ndbus = \"none\"\n\
         [limits]\nauth_failures_per_minute = 3\n\
         [tls]\nlisten = [\"tcp:127.0.0.1:0\"]\ncert = \"{}\"\nkey = \"{}\"\n\
         [profiles.release]\n",
        w.path("signetd.sock").display(),
        cert.display(),
        key.display()
    ));
    let Endpoint::Tcp { port, .. } = &eps[1] else {
        panic!("{eps:?}")
    };
    let base = format!("https://127.0.0.1:{port}");
    let out = w.signetd(&[
        "client",
        "add",
        "ci",
        "--profile",
        "release",
        "--valid",
        "1h",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // Without credentials: a refusal, and nothing about the appliance.
    for path in ["/v1/status", "/v1/tokens"] {
        let (status, _, body) = curl(&ca, &format!("{base}{path}"), None);
        assert_eq!(status, 403, "{path}: {body}");
        let keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["code", "message"], "{body}");
        let text = body.to_string();
        for detail in ["serial", "module", "release", "sha256", "signetd.sock"] {
            assert!(!text.contains(detail), "{path} shows {detail}: {text}");
        }
    }
    // With them: the status.
    let ci = format!("ci:{secret}");
    let (status, _, body) = curl(&ca, &format!("{base}/v1/status"), Some(&ci));
    assert_eq!(status, 200, "{body}");
    assert!(body.get("signing_works").is_some(), "{body}");

    // Wrong secrets: three are checked (and refused), then the address waits.
    let wrong = "ci:0000000000000000000000000000000000000000";
    for _ in 0..3 {
        let (status, _, body) = curl(&ca, &format!("{base}/v1/status"), Some(wrong));
        assert_eq!(status, 403, "{body}");
    }
    let (status, head, body) = curl(&ca, &format!("{base}/v1/status"), Some(wrong));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_attempts", "{body}");
    assert!(head.contains("\r\nretry-after: 20\r\n"), "{head}");
    // Not even the right secret is checked from there until then.
    let (status, _, _) = curl(&ca, &format!("{base}/v1/status"), Some(&ci));
    assert_eq!(status, 429);
    // Other transports are not affected.
    let (status, _) = call_json(
        &Endpoint::Unix(w.path("signetd.sock")),
        "GET",
        "/v1/status",
        None,
    );
    assert_eq!(status, 200);
}

/// Runs `program ARGS` bounded by `timeout`, so a check that lets it start fails the
/// test instead of hanging it.
fn run_bounded(program: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn pin_files_others_could_read_or_change_are_refused_at_start_with_the_fix() {
    let w = World::new();
    let pin = w.path("host.pin");
    std::fs::write(&pin, format!("{PIN}\n")).unwrap();
    let config = w.path("signetd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"unix:{}\"]\nagent = \"unix:{}\"\ndbus = \"none\"\nstate_dir = \"{}\"\npin_file = \"{}\"\n",
            w.path("signetd.sock").display(),
            w.path("agent.sock").display(),
            w.path("state").display(),
            pin.display()
        ),
    )
    .unwrap();
    let fix = format!("chown root:root {p} && chmod 600 {p}", p = pin.display());
    // Open to others.
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_bounded(&bin("signetd"), &["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&fix) && text(&out.stderr).contains("mode 0644"),
        "{}",
        text(&out.stderr)
    );
    // Private, but someone else's.
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(&pin, Some(nix::unistd::Uid::from_raw(NOBODY)), None).unwrap();
    let out = run_bounded(&bin("signetd"), &["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&fix) && text(&out.stderr).contains("uid 65534"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).contains(PIN), "the PIN is never shown");

    // The agent refuses a PIN file group or others may read.
    let agent_pin = w.path("agent.pin");
    std::fs::write(&agent_pin, PIN).unwrap();
    std::fs::set_permissions(&agent_pin, std::fs::Permissions::from_mode(0o640)).unwrap();
    let agent_config = w.path("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "listen = \"unix:{}\"\nspool_dir = \"{}\"\n[token]\nmodule = \"{SOFTHSM}\"\nlabel = \"{TOKEN_LABEL}\"\npin_file = \"{}\"\n",
            w.path("agent.sock").display(),
            w.dir.path().display(),
            agent_pin.display()
        ),
    )
    .unwrap();
    let out = run_bounded(
        &bin("signet-agent"),
        &["--config", agent_config.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("chmod 600 {}", agent_pin.display()))
            && text(&out.stderr).contains("mode 0640"),
        "{}",
        text(&out.stderr)
    );
}

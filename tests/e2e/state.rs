//! The appliance's own state under stress: the spool quota counts what waits, a full
//! disk is `spool_full`, stopping is bounded, the state database and the audit chain
//! are checked at start, a refused PIN stays refused across restarts, and the agent's
//! job directories do not outlive a crash.

use serde_json::Value;

use super::*;

/// Agent and daemon on unix sockets, with `extra` after the one profile.
fn appliance(w: &mut World, agent_config: &str, extra: &str) -> Endpoint {
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        agent_config,
    );
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
        &format!("[profiles.release]\ndescription = \"Signet test\"\n{extra}"),
    )
    .remove(0)
}

/// The fixture PE grown to `len` bytes (data after the image, which Authenticode covers).
fn pe_of(w: &World, len: usize) -> Vec<u8> {
    let mut pe = std::fs::read(w.path("hello.exe")).unwrap();
    pe.resize(len.max(pe.len()), 0);
    pe
}

/// `POST path` with `body`; answers the status, the job id and the whole answer.
fn post_file(ep: &Endpoint, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    use http_body_util::{BodyExt, Full};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let req = http::Request::post(path)
            .body(Full::new(bytes::Bytes::copy_from_slice(body)))
            .unwrap();
        let resp = signet_protocol::client::send(ep, req).await.unwrap();
        let status = resp.status().as_u16();
        let id = resp
            .headers()
            .get("x-signet-job")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, id, body.to_vec())
    })
}

#[test]
fn delivered_results_do_not_fill_the_spool() {
    let mut w = World::new();
    let ep = appliance(&mut w, "", "[queue]\nspool_quota_mb = 3\n");
    // Five in a row, each 0.9 MiB in and out: 9 MiB through a 3 MiB spool.
    let pe = pe_of(&w, 943_718);
    let mut ids = Vec::new();
    for i in 0..5 {
        let name = format!("big{i}.exe");
        let (status, id, signed) = post_file(&ep, &format!("/v1/sign?filename={name}"), &pe);
        assert_eq!(
            status,
            200,
            "job {i}: {}",
            String::from_utf8_lossy(&signed[..signed.len().min(400)])
        );
        let f = w.file(&name, &signed);
        assert!(verify(&w, &f).0, "job {i}");
        ids.push(id);
    }
    // The newest result is still there for a client that lost it.
    let last = ids.last().unwrap();
    let (status, again) = fetch(&ep, &format!("/v1/jobs/{last}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&again));
    // The oldest made room for the next ones, and says so.
    let first = &ids[0];
    let (_, view) = call_json(&ep, "GET", &format!("/v1/jobs/{first}"), None);
    assert_eq!(
        (&view["state"], &view["result_available"]),
        (&"signed".into(), &false.into()),
        "{view}"
    );
    let (status, body) = fetch(&ep, &format!("/v1/jobs/{first}/result"));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, &body["code"]),
        (410, &"result_expired".into()),
        "{body}"
    );
    let (_, st) = call_json(&ep, "GET", "/v1/status", None);
    assert_eq!(st["queue"]["spool_used_bytes"], 0, "{st:#}");
}

/// A small tmpfs mounted for one test, lazily unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` when this test does not run as root (mounting needs it).
    fn mount(at: &std::path::Path, size: &str) -> Option<SmallDisk> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("not root: no tmpfs to fill, the disk-full path is left to the unit tests");
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", stderr(&out));
        Some(SmallDisk(at.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Sends `body` with its `Content-Length` over a plain unix stream, writing on even
/// when the daemon answers early; answers the daemon's whole answer as text.
fn raw_post(ep: &Endpoint, path: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let Endpoint::Unix(sock) = ep else {
        panic!("{ep}")
    };
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: signet\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_ok() {
        for chunk in body.chunks(64 << 10) {
            if s.write_all(chunk).is_err() {
                break;
            }
        }
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_full_disk_is_spool_full_and_says_so() {
    let mut w = World::new();
    let state = w.path("state");
    let Some(_disk) = SmallDisk::mount(&state, "3m") else {
        return;
    };
    let ep = appliance(&mut w, "", "");
    // 6 MiB through a 3 MiB disk, with the quota far above it.
    let answer = raw_post(&ep, "/v1/sign?filename=big.exe", &pe_of(&w, 6 << 20));
    assert!(
        answer.starts_with("HTTP/1.1 507") && answer.contains("\"spool_full\""),
        "{answer}"
    );
    assert!(answer.contains("disk is full"), "{answer}");
    assert!(!answer.contains("database or disk"), "{answer}");
    assert!(
        w.log("signetd")
            .contains("the disk of the state directory is full"),
        "{}",
        w.log("signetd")
    );
    // A disk so full that jobs cannot be recorded: the status says signing does not
    // work, and why, until there is room again.
    let filler = state.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    let (status, body) = call(&ep, "POST", "/v1/sign?filename=x.exe", pe_of(&w, 4096));
    assert_eq!(
        (status, &body["code"]),
        (507, &"spool_full".into()),
        "{body}"
    );
    let (_, st) = call_json(&ep, "GET", "/v1/status", None);
    assert_eq!(st["signing_works"], false, "{st:#}");
    assert!(st["faults"].to_string().contains("disk"), "{st:#}");
    std::fs::remove_file(&filler).unwrap();

    // The room is given back: a file that fits signs.
    let f = w.pe("small.exe");
    let out = signet(&ep, &["sign", f.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &f).0);
    let (_, st) = call_json(&ep, "GET", "/v1/status", None);
    assert_eq!(st["signing_works"], true, "{st:#}");
    assert!(st.get("faults").is_none(), "{st:#}");
}

/// The agent's job directories in its spool directory (the test's directory).
fn job_dirs(w: &World) -> Vec<String> {
    std::fs::read_dir(w.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("signet-job-"))
        .collect()
}

#[test]
fn an_agent_killed_mid_job_leaves_no_job_directory_after_its_restart() {
    let mut w = World::new();
    let signer = HeldSigner::new(&w);
    let ep = appliance(&mut w, &signer.agent_config(), "");
    let pe = std::fs::read(w.pe("k.exe")).unwrap();
    let id = sign_async(&ep, "k.exe", &pe);
    wait_until("the job is at the signer", || signer.held.exists());
    let left = job_dirs(&w);
    assert_eq!(left.len(), 1, "the job's directory");
    w.kill("signet-agent");
    assert_eq!(job_dirs(&w), left, "left by the crash");

    signer.release();
    w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &w.path("pin"),
        &[],
        &signer.agent_config(),
    );
    assert!(
        w.log("signet-agent")
            .contains("removed the job directories a previous run left"),
        "{}",
        w.log("signet-agent")
    );
    assert!(
        job_dirs(&w).iter().all(|d| !left.contains(d)),
        "the crashed run's directory is gone"
    );
    // The host runs the job again, in a directory of its own that the agent keeps
    // only as the job's result (for a host that asks again), nothing else.
    let (status, body) = fetch(&ep, &format!("/v1/jobs/{id}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(verify(&w, &w.file("k-signed.exe", &body)).0);
    let now = job_dirs(&w);
    assert!(
        now.len() <= 1 && now.iter().all(|d| !left.contains(d)),
        "only the kept result of the job run again: {now:?} (left by the crash: {left:?})"
    );
}

/// A request sent on a thread of its own: the answer's status and body as text.
fn in_background(
    ep: &Endpoint,
    method: &'static str,
    path: String,
    body: Vec<u8>,
) -> std::thread::JoinHandle<(u16, String)> {
    let ep = ep.clone();
    std::thread::spawn(move || {
        let (status, v) = call(&ep, method, &path, body);
        (status, v.to_string())
    })
}

#[test]
fn sigterm_stops_signetd_within_its_bound_and_the_queue_survives() {
    let mut w = World::new();
    let signer = HeldSigner::new(&w);
    let ep = appliance(
        &mut w,
        &signer.agent_config(),
        "[shutdown]\nlogind = \"none\"\nstop_seconds = 3\n",
    );
    let pe = std::fs::read(w.pe("t.exe")).unwrap();
    // Job A at the token (held: it will not end before the bound), job B behind it
    // with its caller waiting, and a big upload that is still coming.
    let a = sign_async(&ep, "a.exe", &pe);
    wait_until("job A is at the signer", || signer.held.exists());
    let b = sign_async(&ep, "b.exe", &pe);
    let waiting = in_background(&ep, "GET", format!("/v1/jobs/{b}/result"), Vec::new());
    let Endpoint::Unix(sock) = &ep else { panic!() };
    let mut upload = std::os::unix::net::UnixStream::connect(sock).unwrap();
    {
        use std::io::Write;
        upload
            .write_all(b"POST /v1/sign?filename=huge.exe HTTP/1.1\r\nHost: signet\r\nContent-Length: 314572800\r\n\r\n")
            .unwrap();
        upload.write_all(&vec![b'M'; 1 << 20]).unwrap();
    }
    wait_until("the upload is being spooled", || {
        w.log("signetd").contains("huge.exe")
    });

    // Stopped while the token is busy and a client is mid-upload: within the bound.
    let status = w.sigterm("signetd", STOP_WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "signetd did not stop by itself ({status:?}); its log:\n{}",
        w.log("signetd")
    );
    let log = w.log("signetd");
    assert!(
        log.contains(&format!("job = {a}")) || log.contains(&format!("job={a}")),
        "{log}"
    );
    assert!(
        log.contains("stopping with a job still at the agent"),
        "{log}"
    );
    // The waiting caller was told its job stays queued; the upload got an answer.
    let (status, body) = waiting.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("shutting_down") && body.contains(&format!("job {b} stays queued")),
        "{body}"
    );
    let mut answer = String::new();
    {
        use std::io::Read;
        let _ = upload.read_to_string(&mut answer);
    }
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 503") && answer.contains("shutting_down"),
        "{answer}"
    );

    // After the restart both jobs are signed.
    let ep = w.restart_daemon().remove(0);
    signer.release();
    for id in [&a, &b] {
        let (status, body) = fetch(&ep, &format!("/v1/jobs/{id}/result"));
        assert_eq!(status, 200, "job {id}: {}", String::from_utf8_lossy(&body));
        assert!(
            verify(&w, &w.file(&format!("job-{id}.exe"), &body)).0,
            "job {id}"
        );
    }
}

#[test]
fn while_stopping_new_work_is_refused_at_once() {
    let mut w = World::new();
    let signer = HeldSigner::new(&w);
    let ep = appliance(
        &mut w,
        &signer.agent_config(),
        "[shutdown]\nlogind = \"none\"\nstop_seconds = 60\n",
    );
    let pe = std::fs::read(w.pe("t.exe")).unwrap();
    let a = sign_async(&ep, "a.exe", &pe);
    wait_until("job A is at the signer", || signer.held.exists());
    let pid = pid_of("signetd", &w.path("signetd.toml"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("signetd stops taking work", || {
        w.log("signetd").contains("taking no new jobs")
    });
    // signetd waits for job A (up to its bound) and meanwhile refuses new work.
    let (status, body) = call(&ep, "POST", "/v1/sign?filename=n.exe", pe.clone());
    assert_eq!(
        (status, &body["code"]),
        (503, &"shutting_down".into()),
        "{body}"
    );
    // Job A ends: signetd stops at once, its result kept.
    signer.release();
    let status = w.sigterm("signetd", STOP_WAIT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let ep = w.restart_daemon().remove(0);
    let (_, view) = call_json(&ep, "GET", &format!("/v1/jobs/{a}"), None);
    assert_eq!(view["state"], "signed", "{view}");
}

/// The longest a test waits for a process told to stop, before it fails: far above
/// any bound the tests set.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[test]
fn the_agent_stops_promptly_with_the_hosts_event_stream_open() {
    let mut w = World::new();
    let ep = appliance(&mut w, "", "");
    // signetd follows the agent's events; a test reader holds a second stream.
    let agent = Endpoint::Unix(w.path("agent.sock"));
    let _events = Events::follow(&agent);
    wait_until("signetd follows the agent", || {
        let (_, st) = call_json(&ep, "GET", "/v1/status", None);
        st["signing_works"] == true
    });
    let status = w.sigterm("signet-agent", STOP_WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent did not stop by itself ({status:?}); its log:\n{}",
        w.log("signet-agent")
    );
}

/// Starts signetd (no readiness expected) and waits for it to exit by itself:
/// answers its exit status and its log. Fails when it keeps running.
fn refused_start(w: &World, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(bin("signetd"))
        .arg("--config")
        .arg(w.path("signetd.toml"))
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + STOP_WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status, err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("signetd started where it must refuse to");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The head signetd keeps in the state directory, once it names `records` records.
fn wait_head(w: &World, records: u64) -> Value {
    let path = w.path("state/signet.head");
    wait_until("the audit head is kept", || {
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|h| h["records"].as_u64() >= Some(records))
    });
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Signs one file and waits until its audit record is in the head.
fn sign_one(w: &World, ep: &Endpoint, name: &str) {
    let f = w.pe(name);
    let out = signet(ep, &["sign", f.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// The database's WAL folded into the file, as after a clean close.
fn checkpoint(w: &World) {
    let db = rusqlite::Connection::open(w.path("state/signet.db")).unwrap();
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

fn remove_db(w: &World) {
    for f in ["signet.db", "signet.db-wal", "signet.db-shm"] {
        let _ = std::fs::remove_file(w.path("state").join(f));
    }
}

#[test]
fn a_lost_or_damaged_state_database_is_refused_until_the_operator_says_so() {
    let mut w = World::new();
    let ep = appliance(&mut w, "", "");
    sign_one(&w, &ep, "one.exe");
    sign_one(&w, &ep, "two.exe");
    wait_head(&w, 2);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(w.path("state/signet.head"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    w.stop("signetd");
    checkpoint(&w);
    let saved = std::fs::read(w.path("state/signet.db")).unwrap();

    // Deleted.
    remove_db(&w);
    let (status, err) = refused_start(&w, &[]);
    assert!(!status.success());
    assert!(
        err.contains("signet.db is missing") && err.contains("signetd reset-state"),
        "{err}"
    );
    assert!(!w.path("state/signet.db").exists(), "nothing was created");

    // Emptied.
    std::fs::write(w.path("state/signet.db"), b"").unwrap();
    let (status, err) = refused_start(&w, &[]);
    assert!(!status.success());
    assert!(err.contains("signet.db is empty"), "{err}");

    // Replaced by a new database.
    remove_db(&w);
    {
        let db = rusqlite::Connection::open(w.path("state/signet.db")).unwrap();
        db.execute_batch("CREATE TABLE t (x); DROP TABLE t;")
            .unwrap();
    }
    let (status, err) = refused_start(&w, &[]);
    assert!(!status.success());
    assert!(err.contains("without any audit record"), "{err}");

    // Damaged pages.
    remove_db(&w);
    let mut damaged = saved.clone();
    for b in &mut damaged[4096..3 * 4096] {
        *b = 0x55;
    }
    std::fs::write(w.path("state/signet.db"), &damaged).unwrap();
    let (status, err) = refused_start(&w, &[]);
    assert!(!status.success());
    assert!(
        err.contains("is damaged") && err.contains("backup"),
        "{err}"
    );

    // Restored from the copy: it starts and signs on.
    remove_db(&w);
    std::fs::write(w.path("state/signet.db"), &saved).unwrap();
    let ep = w.restart_daemon().remove(0);
    sign_one(&w, &ep, "three.exe");
    w.stop("signetd");

    // Lost again, and the operator starts afresh on purpose.
    remove_db(&w);
    let out = w.signetd(&["reset-state"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("forgot the audit head"),
        "{}",
        stderr(&out)
    );
    assert!(!w.path("state/signet.head").exists());
    let ep = w.restart_daemon().remove(0);
    sign_one(&w, &ep, "four.exe");
    let head = wait_head(&w, 1);
    assert_eq!(head["records"], 1, "a new chain: {head}");
}

#[test]
fn cutting_off_the_newest_audit_records_is_found() {
    let mut w = World::new();
    let ep = appliance(&mut w, "", "");
    for i in 0..3 {
        sign_one(&w, &ep, &format!("a{i}.exe"));
    }
    wait_head(&w, 3);
    let out = w.signetd(&["audit", "head"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exported = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(exported.ends_with(":3"), "{exported}");
    // A head that is not this log's.
    let wrong = format!("{}:3", "0".repeat(64));
    let out = w.signetd(&["audit", "verify", "--json", "--head", &wrong]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&v["kind"], &v["record"]),
        (&"changed".into(), &3.into()),
        "{v}"
    );

    w.stop("signetd");
    // The newest record goes, the trigger that counts edits with it.
    {
        let db = rusqlite::Connection::open(w.path("state/signet.db")).unwrap();
        db.execute_batch(
            "DROP TRIGGER audit_deleted; DELETE FROM audit WHERE seq = 3; UPDATE audit_edits SET n = 0;",
        )
        .unwrap();
    }
    // Against the head kept in the state directory, and against the exported one.
    for args in [
        vec!["audit", "verify", "--json"],
        vec!["audit", "verify", "--json", "--head", &exported],
    ] {
        let out = w.signetd(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (&v["ok"], &v["kind"], &v["record"]),
            (&false.into(), &"deleted".into(), &3.into()),
            "{args:?}: {v}"
        );
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("newest audit records were deleted"),
            "{v}"
        );
    }
    // signetd starts, says so in its log and its status, and keeps the old head.
    let ep = w.restart_daemon().remove(0);
    assert!(
        w.log("signetd").contains("the audit log is broken"),
        "{}",
        w.log("signetd")
    );
    let (_, st) = call_json(&ep, "GET", "/v1/status", None);
    let faults = st["faults"].to_string();
    assert!(
        faults.contains("newest audit records were deleted"),
        "{st:#}"
    );
    sign_one(&w, &ep, "after.exe");
    let head: Value =
        serde_json::from_slice(&std::fs::read(w.path("state/signet.head")).unwrap()).unwrap();
    assert_eq!(head["records"], 3, "the evidence stays: {head}");
}

#[test]
fn an_edit_by_hand_is_read_from_the_trigger_count() {
    let mut w = World::new();
    let ep = appliance(&mut w, "", "");
    sign_one(&w, &ep, "e.exe");
    wait_head(&w, 1);
    w.stop("signetd");
    // A record changed and changed back: the chain verifies, the count does not.
    {
        let db = rusqlite::Connection::open(w.path("state/signet.db")).unwrap();
        db.execute_batch(
            "UPDATE audit SET caller = 'uid:1000' WHERE seq = 1; UPDATE audit SET caller = 'uid:0' WHERE seq = 1;",
        )
        .unwrap();
    }
    let out = w.signetd(&["audit", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "edited", "{v}");
}

/// The host's PIN file, as root keeps it.
fn host_pin(w: &World, pin: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = w.path("host-token.pin");
    std::fs::write(&path, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The agent without a PIN of its own, its PKCS#11 calls logged to `spy`.
fn spied_agent(w: &mut World, spy: &std::path::Path) -> Endpoint {
    w.start_agent_config(
        &format!("unix:{}", w.path("agent.sock").display()),
        PKCS11_SPY,
        None,
        &[
            ("PKCS11SPY", SOFTHSM),
            ("PKCS11SPY_OUTPUT", spy.to_str().unwrap()),
        ],
        "",
    )
}

/// Waits until the status' timeline has `n` entries `event`.
fn wait_timeline_count(ep: &Endpoint, event: &str, n: usize) {
    wait_until(&format!("{n} {event} in the timeline"), || {
        let (_, s) = call_json(ep, "GET", "/v1/status", None);
        s["recovery"]
            .as_array()
            .is_some_and(|r| r.iter().filter(|e| e["event"] == event).count() >= n)
    });
}

#[test]
fn a_refused_pin_stays_refused_across_restarts_and_a_new_one_reaches_the_agent() {
    let mut w = World::new();
    let pin_file = host_pin(&w, "000000");
    let spy1 = w.path("spy1.log");
    let agent = spied_agent(&mut w, &spy1);
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            &format!(
                "pin_file = \"{}\"\n[profiles.release]\ndescription = \"Signet test\"\n",
                pin_file.display()
            ),
        )
        .remove(0);
    wait_timeline_count(&ep, "pin_rejected", 1);
    assert_eq!(count_logins(&spy1), 1, "one try with the wrong PIN");
    let refused = w.path("state/pin.refused");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&refused).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        !std::fs::read_to_string(&refused)
            .unwrap()
            .contains("000000"),
        "only a keyed hash is kept"
    );

    // Both restarted together, the wrong PIN still in the file: no further try.
    w.stop("signetd");
    w.stop("signet-agent");
    let spy2 = w.path("spy2.log");
    spied_agent(&mut w, &spy2);
    let ep = w.restart_daemon().remove(0);
    wait_until("signetd recognises the refused PIN", || {
        w.log("signetd").contains("is one the token refused before")
    });
    let f = w.pe("p.exe");
    let out = signet(&ep, &["sign", f.to_str().unwrap()]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused its configured PIN"),
        "{}",
        stderr(&out)
    );
    assert_eq!(count_logins(&spy2), 0, "the refused PIN was not sent again");

    // The operator puts the right PIN in the file: it reaches the waiting agent.
    host_pin(&w, PIN);
    wait_timeline_count(&ep, "pin_delivered", 1);
    let out = signet(&ep, &["sign", f.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &f).0);

    // And it reaches an agent restarted later, signetd running on.
    w.kill("signet-agent");
    let spy3 = w.path("spy3.log");
    spied_agent(&mut w, &spy3);
    wait_timeline_count(&ep, "pin_delivered", 2);
    let g = w.pe("q.exe");
    let out = signet(&ep, &["sign", g.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The agent's session with the right PIN, which the native engine signs on (no
    // login of its own).
    assert_eq!(count_logins(&spy3), 1);
}

/// The pid of the process started from `program` with `config` on its command line.
fn pid_of(program: &str, config: &std::path::Path) -> nix::unistd::Pid {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args
            .first()
            .is_some_and(|a| a.ends_with(program.as_bytes()))
            && args.contains(&config.as_os_str().as_encoded_bytes())
        {
            return nix::unistd::Pid::from_raw(e.file_name().to_str().unwrap().parse().unwrap());
        }
    }
    panic!("{program} is not running")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The newest timeline entry `event`, if any.
fn timeline_entry(ep: &Endpoint, event: &str) -> Option<Value> {
    let (_, s) = call_json(ep, "GET", "/v1/status", None);
    s["recovery"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["event"] == event)
        .cloned()
}

#[test]
fn an_agent_that_stops_answering_is_away_from_the_first_failed_contact() {
    use nix::sys::signal::{kill, Signal};
    let mut w = World::new();
    let ep = appliance(&mut w, "", "");
    wait_until("signing works", || {
        call_json(&ep, "GET", "/v1/status", None).1["signing_works"] == true
    });
    // Frozen: its connections stay open and silent, as behind a guest that hangs.
    let agent = pid_of("signet-agent", &w.path("agent.toml"));
    kill(agent, Signal::SIGSTOP).unwrap();
    // The status gets no answer from it: the first failed contact, known to be
    // before `failed_by`.
    let (_, st) = call_json(&ep, "GET", "/v1/status", None);
    let failed_by = now_ms();
    assert_eq!(st["signing_works"], false, "{st:#}");
    wait_until("the outage is on the timeline", || {
        timeline_entry(&ep, "agent_unreachable").is_some()
    });
    let down = timeline_entry(&ep, "agent_unreachable").unwrap();
    // Whole seconds: at or before the time itself.
    let down_ms = signetd::services::doctor::parse_time(down["time"].as_str().unwrap()).unwrap()
        as u64
        * 1000;
    assert!(
        down_ms <= failed_by,
        "the outage starts at the first failed contact: {down} (failed by {failed_by})"
    );
    let continued = now_ms();
    kill(agent, Signal::SIGCONT).unwrap();
    wait_until("the agent is back on the timeline", || {
        timeline_entry(&ep, "agent_back").is_some()
    });
    let back = timeline_entry(&ep, "agent_back").unwrap();
    let away = back["duration_ms"].as_u64().unwrap();
    assert!(
        away >= continued - failed_by,
        "away {away} ms, but it did not answer from {failed_by} to {continued}: {back}"
    );
}

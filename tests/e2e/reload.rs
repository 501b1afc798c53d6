//! `systemctl reload signetd` (SIGHUP): a grant added to signetd.toml takes effect
//! without a restart, jobs accepted before it are signed all the same, and a file
//! that is not valid changes nothing.

use super::*;

/// Profile "release" signing with `description`, and the listeners; local root may
/// use every profile. `extra` follows.
fn config(w: &World, agent: &Endpoint, description: &str, extra: &str) -> String {
    format!(
        "listen = [\"unix:{}\", \"tcp:127.0.0.1:0\"]\nagent = \"{agent}\"\ndbus = \"none\"\n\
         insecure_tcp_as = \"loopback\"\ndefault_profile = \"release\"\n\
         [profiles.release]\ndescription = \"{description}\"\n\
         [[grants]]\ncallers = [\"uid:0\"]\nprofiles = [\"*\"]\n{extra}",
        w.path("signetd.sock").display()
    )
}

/// How many times the daemon's log has `needle`.
fn count_in_log(w: &World, needle: &str) -> usize {
    w.log("signetd").matches(needle).count()
}

/// The result of job `id` is a signed file with the profile as it was when the job
/// was accepted ("Signet before"), not as the reload made it.
fn signed_as_before(w: &World, ep: &Endpoint, id: &str) {
    let (status, body) = fetch(ep, &format!("/v1/jobs/{id}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let out = w.path(&format!("{id}.exe"));
    std::fs::write(&out, body).unwrap();
    let (ok, text) = verify(w, &out);
    assert!(
        ok && text.contains("Signet before") && !text.contains("Signet after"),
        "job {id}: {text}"
    );
}

#[test]
fn sighup_applies_a_new_grant_and_keeps_the_jobs_an_invalid_file_changes_nothing() {
    let mut w = World::new();
    let signer = HeldSigner::new(&w);
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &w.path("pin"),
        &[],
        &signer.agent_config(),
    );
    let eps = w.start_daemon_config(&config(&w, &agent, "Signet before", ""));
    let (unix, tcp) = (eps[0].clone(), eps[1].clone());
    let file = w.pe("app.exe");

    // The TCP caller ("client:loopback") has no grant.
    let out = signet(&tcp, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("client:loopback"), "{}", stderr(&out));

    // Before the reload: one job at the signer (held), one queued behind it.
    let pe = std::fs::read(w.pe("q.exe")).unwrap();
    let running = sign_async(&unix, "running.exe", &pe);
    wait_until("the first job is at the signer", || signer.held.exists());
    let queued = sign_async(&unix, "queued.exe", &pe);

    // The grant is added, the profile's description changed, and signetd told to
    // reload.
    w.write_daemon_config(&config(
        &w,
        &agent,
        "Signet after",
        "[[grants]]\ncallers = [\"client:loopback\"]\nprofiles = [\"release\"]\n",
    ));
    w.hangup("signetd");
    wait_until("the reload is logged", || {
        count_in_log(&w, "configuration reloaded") == 1
    });
    assert!(
        w.log("signetd").contains("applied: grants, profiles"),
        "{}",
        w.log("signetd")
    );
    // The TCP caller may now use the profile (asked while the signer is still held).
    let (status, body) = call(&tcp, "GET", "/v1/profile?profile=release", vec![]);
    assert_eq!(status, 200, "{body}");

    // The jobs accepted before the reload are signed as they were asked, then the
    // new caller's with the new profile.
    signer.release();
    signed_as_before(&w, &unix, &running);
    signed_as_before(&w, &unix, &queued);
    let out = signet(&tcp, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &file);
    assert!(
        ok && text.contains("Signet after") && !text.contains("Signet before"),
        "{text}"
    );

    // A file that is not valid: refused with its error, the old configuration stays.
    std::fs::write(w.path("signetd.toml"), "agent = \n[[grants]\n").unwrap();
    w.hangup("signetd");
    wait_until("the refused reload is logged", || {
        count_in_log(&w, "the configuration was not reloaded") == 1
    });
    let log = w.log("signetd");
    let line = log
        .lines()
        .find(|l| l.contains("the configuration was not reloaded"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("signetd.toml"),
        "{line}"
    );
    assert_eq!(count_in_log(&w, "configuration reloaded"), 1, "{log}");
    let again = w.pe("again.exe");
    let out = signet(&tcp, &["sign", again.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &again).0);
}

/// The token `serial` in `/v1/status`, if listed.
fn status_token(ep: &Endpoint, serial: &str) -> Option<serde_json::Value> {
    let (status, s) = call(ep, "GET", "/v1/status", Vec::new());
    assert_eq!(status, 200, "{s}");
    s["tokens"]["tokens"]
        .as_array()?
        .iter()
        .find(|t| t["serial"] == serial)
        .cloned()
}

/// The host port QEMU holds for the token's device, asked on the VM's other monitor.
fn qemu_hostport(other: &std::path::Path, serial: &str) -> Option<String> {
    use signetd::adapters::qmp::{Monitor, MonitorEvent};
    use signetd::core::passthrough::device_id;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let timeout = std::time::Duration::from_secs(30);
        let mut m = Monitor::start(other.to_owned(), timeout);
        tokio::time::timeout(timeout, async {
            while m.next().await != Some(MonitorEvent::Connected) {}
        })
        .await
        .expect("QEMU's other monitor");
        let path = format!("/machine/peripheral/{}", device_id(serial));
        let args = serde_json::json!({"path": path, "property": "hostport"});
        m.qmp()?
            .execute("qom-get", Some(args))
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
    })
}

#[test]
fn sighup_puts_a_new_token_assignment_in_force_and_keeps_the_jobs() {
    use super::passthrough::{in_vm, Qemu, SERIAL, VM};
    let mut w = World::new();
    let signer = HeldSigner::new(&w);
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &w.path("pin"),
        &[],
        &signer.agent_config(),
    );
    // The signing VM's QEMU is up, with Signet's monitor where [passthrough] says;
    // signetd.toml assigns no token yet.
    let monitors = w.path("monitors");
    std::fs::create_dir(&monitors).unwrap();
    let other = w.path("qemu-server.qmp");
    let _qemu = Qemu::start(
        &signetd::adapters::proxmox::monitor_path(&monitors, VM),
        &other,
    );
    let passthrough = format!("[passthrough]\nmonitor_dir = \"{}\"\n", monitors.display());
    w.write_daemon_config(&config(&w, &agent, "Signet before", &passthrough));
    let (ep, mut testbed) = Testbed::start_daemon(&mut w);

    // Plugged in, not assigned: on the host, where it stays.
    testbed.ask(&format!("add 2 5 {SERIAL}"));
    wait_until("the token is seen on the host", || {
        status_token(&ep, SERIAL).is_some_and(|t| t["state"] == "on_host")
    });
    let t = status_token(&ep, SERIAL).unwrap();
    assert_eq!(t["assigned_vm"], serde_json::Value::Null, "{t}");
    assert_eq!(qemu_hostport(&other, SERIAL), None, "not in the VM");

    // One job at the signer (held), one queued behind it.
    let pe = std::fs::read(w.pe("q.exe")).unwrap();
    let running = sign_async(&ep, "running.exe", &pe);
    wait_until("the first job is at the signer", || signer.held.exists());
    let queued = sign_async(&ep, "queued.exe", &pe);

    // `signetd enroll signing-vm` appends this; then systemctl reload signetd.
    let assigned = format!("{passthrough}[[tokens]]\nserial = \"{SERIAL}\"\nvm = {VM}\n");
    w.write_daemon_config(&config(&w, &agent, "Signet before", &assigned));
    testbed.ask("hangup");
    wait_until("the reload is logged", || {
        count_in_log(&w, "configuration reloaded") == 1
    });
    let log = w.log("signetd");
    assert!(log.contains("applied: tokens"), "{log}");
    // The agent's VM is now VM 105 (the one VM in [[tokens]]): the recovery ladder
    // follows its token from now on, without a restart.
    assert!(!log.contains("kept until signetd restarts"), "{log}");
    wait_until("the recovery ladder follows the reloaded token", || {
        w.log("signetd")
            .contains("the recovery ladder follows the agent VM's tokens as reloaded")
    });

    // The token goes into its VM, without a restart: the same process (one start).
    let t = {
        wait_until("the token is in VM 105", || {
            status_token(&ep, SERIAL).is_some_and(|t| in_vm(&t))
        });
        status_token(&ep, SERIAL).unwrap()
    };
    assert_eq!(t["assigned_vm"], VM, "{t}");
    assert_eq!(qemu_hostport(&other, SERIAL).as_deref(), Some("2"));
    assert_eq!(
        count_in_log(&w, "relaying to the agent"),
        1,
        "signetd was not restarted"
    );

    // The jobs accepted before the reload are signed.
    signer.release();
    signed_as_before(&w, &ep, &running);
    signed_as_before(&w, &ep, &queued);

    // The entry removed and reloaded: the token is left in the VM (never yanked out
    // mid-job) and no longer assigned.
    w.write_daemon_config(&config(&w, &agent, "Signet before", &passthrough));
    testbed.ask("hangup");
    wait_until("the second reload is logged", || {
        count_in_log(&w, "configuration reloaded") == 2
    });
    wait_until("the token is no longer assigned", || {
        status_token(&ep, SERIAL).is_some_and(|t| t["assigned_vm"].is_null())
    });
    let t = status_token(&ep, SERIAL).unwrap();
    assert!(in_vm(&t), "left where it was: {t}");
    assert!(
        t["last_change"]["reason"]
            .as_str()
            .unwrap()
            .contains("no longer in [[tokens]]; left in VM 105"),
        "{t}"
    );
    assert_eq!(qemu_hostport(&other, SERIAL).as_deref(), Some("2"));
    assert!(w.log("signetd").contains("left in VM 105"));
}

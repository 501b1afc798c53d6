//! Recovery without a person, with real processes: the agent killed and restarted
//! mid-job (the daemon gives the restarted agent the PIN, the job is signed once), the
//! token vanishing mid-job inside the agent, and a wrong PIN in the host's
//! configuration (tried exactly once). Each is read back from the recovery timeline,
//! which also gives the time from the return to the first job signed.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(120);

/// The host's PIN file, as root keeps it.
fn host_pin(w: &World, pin: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = w.path("host-token.pin");
    std::fs::write(&path, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn agent_sock(w: &World) -> String {
    format!("unix:{}", w.path("agent.sock").display())
}

/// Waits until the status' timeline has an entry `event` (polled), and answers it.
fn wait_timeline(ep: &Endpoint, event: &str) -> Value {
    let started = Instant::now();
    loop {
        let (_, s) = call_json(ep, "GET", "/v1/status", None);
        if let Some(e) = s["recovery"]
            .as_array()
            .and_then(|r| r.iter().rev().find(|e| e["event"] == event))
        {
            return e.clone();
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "no {event} in the timeline; status: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn audit_of(w: &World, job: &str) -> Vec<Value> {
    let out = w.signetd(&["audit", "export"]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["job"] == job)
        .collect()
}

fn daemon_with_host_pin(w: &mut World, agent: &Endpoint, pin_file: &std::path::Path) -> Endpoint {
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        agent,
        &format!(
            "pin_file = \"{}\"\n[profiles.release]\ndescription = \"Signet test\"\n",
            pin_file.display()
        ),
    )
    .remove(0)
}

#[test]
fn an_agent_restarted_mid_job_gets_the_pin_from_the_host_and_the_job_is_signed_once() {
    let mut w = World::new();
    let signer = HeldSigner::new(&w);
    // The agent has no PIN of its own: the host gives it.
    let agent = w.start_agent_config(&agent_sock(&w), SOFTHSM, None, &[], &signer.agent_config());
    let pin_file = host_pin(&w, PIN);
    let ep = daemon_with_host_pin(&mut w, &agent, &pin_file);
    wait_timeline(&ep, "pin_delivered");

    let pe = std::fs::read(w.pe("r.exe")).unwrap();
    let id = sign_async(&ep, "s.exe", &pe);
    wait_until("the job reaches the signer", || signer.held.exists());
    // The signing VM's agent dies mid-job and comes back, without a PIN.
    w.kill("signet-agent");
    wait_timeline(&ep, "agent_unreachable");
    signer.release();
    w.start_agent_config(&agent_sock(&w), SOFTHSM, None, &[], &signer.agent_config());

    let (status, body) = fetch(&ep, &format!("/v1/jobs/{id}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let f = w.file("r-signed.exe", &body);
    assert!(verify(&w, &f).0);
    let records = audit_of(&w, &id);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["result"], "signed");

    let back = wait_timeline(&ep, "agent_back");
    let first = wait_timeline(&ep, "first_job_signed");
    assert!(back["duration_ms"].is_u64(), "{back}");
    assert!(
        first["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("job {id}")),
        "{first}"
    );
    let (_, s) = call_json(&ep, "GET", "/v1/status", None);
    let events: Vec<&str> = s["recovery"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let pos = |e: &str| events.iter().rposition(|x| *x == e).unwrap_or(usize::MAX);
    assert!(
        pos("agent_unreachable") < pos("agent_back")
            && pos("agent_back") < pos("pin_delivered")
            && pos("pin_delivered") < pos("first_job_signed"),
        "{events:?}"
    );
    eprintln!(
        "measure: agent restart: away {} ms, first job signed {} ms after it was back",
        back["duration_ms"], first["duration_ms"]
    );
}

#[test]
fn a_token_lost_mid_job_is_on_the_timeline_and_the_job_is_signed_once() {
    let mut w = World::new();
    let signer = HeldSigner::new(&w);
    let pin = w.path("pin");
    let agent = w.start_agent_with(&agent_sock(&w), SOFTHSM, &pin, &[], &signer.agent_config());
    let ep = w
        .start_daemon(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
        )
        .remove(0);
    let mut events = Events::follow(&agent);
    let pe = std::fs::read(w.pe("t.exe")).unwrap();
    let id = sign_async(&ep, "s.exe", &pe);
    events.wait_for("signing_started");
    // The token goes while osslsigncode holds the job; then the signer goes on.
    let tokens = TokenDir::of(&w);
    tokens.vanish();
    signer.release();
    wait_timeline(&ep, "token_lost");
    // No USB passthrough for this token: the ladder's first step, the agent's
    // re-initialisation, is all Signet can do.
    let step = wait_timeline(&ep, "recovery_step");
    assert!(
        step["detail"]
            .as_str()
            .unwrap()
            .starts_with("agent_reinit: "),
        "{step}"
    );
    tokens.restore();

    let (status, body) = fetch(&ep, &format!("/v1/jobs/{id}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(verify(&w, &w.file("t-signed.exe", &body)).0);
    assert_eq!(audit_of(&w, &id).len(), 1);
    let back = wait_timeline(&ep, "token_back");
    let recovered = wait_timeline(&ep, "recovered");
    assert!(recovered["duration_ms"].is_u64(), "{recovered}");
    let first = wait_timeline(&ep, "first_job_signed");
    eprintln!(
        "measure: token loss: away {} ms, first job signed {} ms after it was back",
        back["duration_ms"], first["duration_ms"]
    );
}

#[test]
fn a_wrong_pin_on_the_host_is_tried_once_and_jobs_say_so_until_it_is_fixed() {
    let mut w = World::new();
    let spy_log = w.path("spy.log");
    let agent = w.start_agent_config(
        &agent_sock(&w),
        PKCS11_SPY,
        None,
        &[
            ("PKCS11SPY", SOFTHSM),
            ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
        ],
        "",
    );
    let pin_file = host_pin(&w, "000000");
    let ep = daemon_with_host_pin(&mut w, &agent, &pin_file);
    let rejected = wait_timeline(&ep, "pin_rejected");
    assert!(
        rejected["detail"]
            .as_str()
            .unwrap()
            .starts_with("PIN rejected — operator action needed"),
        "{rejected}"
    );
    let file = w.pe("p.exe");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused its configured PIN"),
        "{}",
        stderr(&out)
    );
    let status = signet(&ep, &["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("PIN rejected — operator action needed"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    assert_eq!(
        count_logins(&spy_log),
        1,
        "exactly one try with the wrong PIN"
    );
    assert!(
        !w.log("signetd").contains("000000"),
        "the PIN is never logged"
    );

    // The operator fixes the file: the daemon notices, the agent logs in, jobs sign.
    host_pin(&w, PIN);
    wait_timeline(&ep, "pin_delivered");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);
    // The refused try and the agent's session with the right PIN, which the native
    // engine signs on (no login of its own).
    assert_eq!(count_logins(&spy_log), 2);
}

#[test]
fn recovery_steps_are_signalled_on_the_bus() {
    let mut w = World::new();
    let bus = super::dbus::Bus::start(&w);
    w.dbus = Some(bus.address.clone());
    let pin = w.path("pin");
    let agent = w.start_agent(&agent_sock(&w), SOFTHSM, &pin, &[]);
    w.start_daemon(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
    );
    let mut signals = super::dbus::Signals::follow(&bus.address, "RecoveryStep");
    // The signing VM's agent goes away.
    w.stop("signet-agent");
    let entry = signals.wait("a recovery step", |_| true);
    assert_eq!(entry["signal_arg0"], "agent_unreachable", "{entry}");
    assert_eq!(entry["event"], "agent_unreachable", "{entry}");
    assert!(entry["detail"].is_string(), "{entry}");
}

/// The signing VM's world for the ladder: a real QEMU with Signet's monitor and a
/// second one (qemu-server's, and whoever works behind Signet's back), a fake SafeNet
/// token in a umockdev testbed that `signetd` keeps in that QEMU, a SoftHSM-backed
/// agent without a PIN of its own, and the host's PIN file.
struct VmWorld {
    w: World,
    bus: super::dbus::Bus,
    other: std::path::PathBuf,
    qemu: Option<super::passthrough::Qemu>,
    testbed: Option<Testbed>,
    ep: Option<Endpoint>,
    tokens_signals: super::dbus::Signals,
}

impl VmWorld {
    fn start(recovery: &str) -> VmWorld {
        use super::passthrough::{Qemu, SERIAL, VM};
        let mut w = World::new();
        let bus = super::dbus::Bus::start(&w);
        let monitors = w.path("monitors");
        std::fs::create_dir(&monitors).unwrap();
        let signet_monitor = signetd::adapters::proxmox::monitor_path(&monitors, VM);
        let other = w.path("qemu-server.qmp");
        let qemu = Qemu::start(&signet_monitor, &other);
        w.start_agent_config(&agent_sock(&w), SOFTHSM, None, &[], "");
        let pin_file = host_pin(&w, PIN);
        w.write_daemon_config(&format!(
            "listen = [\"unix:{}\"]\nagent = \"{}\"\ndbus = \"{}\"\npin_file = \"{}\"\n\
             [profiles.release]\ndescription = \"Signet test\"\n\
             [[grants]]\ncallers = [\"uid:0\"]\nprofiles = [\"*\"]\n\
             [passthrough]\nmonitor_dir = \"{}\"\n[[tokens]]\nserial = \"{SERIAL}\"\nvm = {VM}\n{recovery}",
            w.path("signetd.sock").display(),
            agent_sock(&w),
            bus.address,
            pin_file.display(),
            monitors.display(),
        ));
        let tokens_signals = super::dbus::Signals::follow(&bus.address, "TokenChanged");
        let mut vm = VmWorld {
            w,
            bus,
            other,
            qemu: Some(qemu),
            testbed: None,
            ep: None,
            tokens_signals,
        };
        vm.start_daemon();
        vm
    }

    /// Starts `signetd` in its umockdev testbed (again: the token is plugged in anew).
    fn start_daemon(&mut self) {
        use super::passthrough::{in_vm, SERIAL};
        let (ep, mut testbed) = Testbed::start_daemon(&mut self.w);
        testbed.ask(&format!("add 2 5 {SERIAL}"));
        self.tokens_signals.wait_token(SERIAL, "in its VM", in_vm);
        self.testbed = Some(testbed);
        self.ep = Some(ep);
    }

    fn ep(&self) -> &Endpoint {
        self.ep.as_ref().unwrap()
    }

    /// The second monitor, for what happens behind Signet's back.
    fn other_monitor(&self, command: &str) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut m = signetd::adapters::qmp::Monitor::start(self.other.clone(), TIMEOUT);
            tokio::time::timeout(TIMEOUT, async {
                while m.next().await != Some(signetd::adapters::qmp::MonitorEvent::Connected) {}
            })
            .await
            .expect("QEMU's other monitor");
            m.qmp().unwrap().execute(command, None).await.unwrap();
        });
    }

    fn sign_and_verify(&self, name: &str) {
        let pe = std::fs::read(self.w.pe(name)).unwrap();
        let id = sign_async(self.ep(), name, &pe);
        let (status, body) = fetch(self.ep(), &format!("/v1/jobs/{id}/result"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(verify(&self.w, &self.w.file(&format!("signed-{name}"), &body)).0);
        assert_eq!(audit_of(&self.w, &id).len(), 1, "signed once");
    }
}

/// The timeline entries `event` from the status, newest last.
fn timeline_details(ep: &Endpoint, event: &str) -> Vec<String> {
    let (_, s) = call_json(ep, "GET", "/v1/status", None);
    s["recovery"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == event)
        .map(|e| e["detail"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_ladder_reattaches_a_token_the_agent_lost_while_the_host_has_it_in_the_vm() {
    use super::passthrough::{in_vm, SERIAL};
    // Short cool-downs: the agent gets half a second, the re-attach a minute (the
    // test brings the token back long before).
    let mut vm = VmWorld::start(
        "[recovery.agent_reinit]\ncooldown_seconds = 0.5\n[recovery.reattach]\ncooldown_seconds = 60\n",
    );
    let mut steps = super::dbus::Signals::follow(&vm.bus.address, "RecoveryStep");
    wait_timeline(vm.ep(), "pin_delivered");
    vm.sign_and_verify("before.exe");

    // The token goes in the guest (an RDP session took it, a driver hung) while QEMU
    // still holds the USB device.
    let (_, s) = call_json(vm.ep(), "GET", "/v1/status", None);
    let attached_at = s["tokens"]["tokens"][0]["last_change"]["at"].clone();
    let tokens = TokenDir::of(&vm.w);
    tokens.vanish();
    let lost = Instant::now();
    steps.wait("the loss", |e| e["event"] == "token_lost");
    let first = steps.wait("the first step", |e| e["event"] == "recovery_step");
    assert!(
        first["detail"]
            .as_str()
            .unwrap()
            .starts_with("agent_reinit: "),
        "{first}"
    );
    let second = steps.wait("the second step", |e| e["event"] == "recovery_step");
    assert!(
        second["detail"].as_str().unwrap().starts_with("reattach: "),
        "{second}"
    );
    // The re-attach took the device out of QEMU and put it back.
    vm.tokens_signals
        .wait_token(SERIAL, "back in the VM after the re-attach", |t| {
            in_vm(t) && t["last_change"]["at"] != attached_at
        });
    // A job sent now waits for the token.
    let pe = std::fs::read(vm.w.pe("during.exe")).unwrap();
    let id = sign_async(vm.ep(), "during.exe", &pe);
    tokens.restore();
    let recovered = steps.wait("the recovery", |e| e["event"] == "recovered");
    assert!(
        recovered["detail"].as_str().unwrap().contains("reattach"),
        "{recovered}"
    );
    let (status, body) = fetch(vm.ep(), &format!("/v1/jobs/{id}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(verify(&vm.w, &vm.w.file("signed-during.exe", &body)).0);
    assert_eq!(audit_of(&vm.w, &id).len(), 1, "signed once");
    let first_job = wait_timeline(vm.ep(), "first_job_signed");
    eprintln!(
        "measure: token lost in the guest, ladder to re-attach: back after {} ms, first job signed {} ms after that ({} ms in all)",
        recovered["duration_ms"],
        first_job["duration_ms"],
        lost.elapsed().as_millis()
    );
    assert!(
        timeline_details(vm.ep(), "recovery_exhausted").is_empty(),
        "no alert: the second step brought it back"
    );
}

#[test]
fn a_signing_vm_reset_gets_the_pin_again_and_the_queue_goes_on() {
    let mut vm = VmWorld::start("");
    let mut steps = super::dbus::Signals::follow(&vm.bus.address, "RecoveryStep");
    wait_timeline(vm.ep(), "pin_delivered");

    // The VM reboots: QEMU resets it, and the agent inside goes down with it and
    // comes back without a PIN.
    vm.other_monitor("system_reset");
    let reset = Instant::now();
    steps.wait("the reset", |e| e["event"] == "vm_reset");
    vm.w.kill("signet-agent");
    steps.wait("the agent gone", |e| e["event"] == "agent_unreachable");
    // A job sent while the VM boots waits for it.
    let pe = std::fs::read(vm.w.pe("boot.exe")).unwrap();
    let id = sign_async(vm.ep(), "boot.exe", &pe);
    vm.w.start_agent_config(&agent_sock(&vm.w), SOFTHSM, None, &[], "");
    steps.wait("the agent back", |e| e["event"] == "agent_back");
    steps.wait("the PIN given again", |e| e["event"] == "pin_delivered");
    let (status, body) = fetch(vm.ep(), &format!("/v1/jobs/{id}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(verify(&vm.w, &vm.w.file("signed-boot.exe", &body)).0);
    assert_eq!(audit_of(&vm.w, &id).len(), 1, "signed once");
    let first = wait_timeline(vm.ep(), "first_job_signed");
    eprintln!(
        "measure: signing VM reset: first job signed {} ms after the agent was back ({} ms after the reset)",
        first["duration_ms"],
        reset.elapsed().as_millis()
    );
    // The token stayed in the VM across the reset.
    let (_, s) = call_json(vm.ep(), "GET", "/v1/status", None);
    let t = &s["tokens"]["tokens"][0];
    assert!(super::passthrough::in_vm(t), "{s:#}");
}

#[test]
fn signetd_killed_mid_recovery_takes_it_up_again_after_its_restart() {
    // The ladder's second step waits a long time, so the daemon dies while climbing.
    let mut vm = VmWorld::start("[recovery.agent_reinit]\ncooldown_seconds = 600\n");
    wait_timeline(vm.ep(), "pin_delivered");
    let tokens = TokenDir::of(&vm.w);
    tokens.vanish();
    wait_timeline(vm.ep(), "recovery_step");
    let pe = std::fs::read(vm.w.pe("mid.exe")).unwrap();
    let id = sign_async(vm.ep(), "mid.exe", &pe);

    // kill -9 of signetd itself (inside its testbed), then of the testbed.
    vm.testbed.take().unwrap().ask("crash");
    vm.w.kill("signetd");
    // Back up: the agent still misses the token, so the ladder starts again — its
    // first step, whose rate limit (none by default) allows it.
    let mut steps = super::dbus::Signals::follow(&vm.bus.address, "RecoveryStep");
    let restarted = Instant::now();
    vm.start_daemon();
    let again = loop {
        let e = steps.wait("the ladder again", |e| {
            e["event"] == "recovery_started" || e["event"] == "recovery_step"
        });
        if e["event"] == "recovery_step" {
            break e;
        }
    };
    assert!(
        again["detail"]
            .as_str()
            .unwrap()
            .starts_with("agent_reinit: "),
        "{again}"
    );
    tokens.restore();
    steps.wait("the recovery", |e| e["event"] == "recovered");
    let (status, body) = fetch(vm.ep(), &format!("/v1/jobs/{id}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(verify(&vm.w, &vm.w.file("signed-mid.exe", &body)).0);
    assert_eq!(
        audit_of(&vm.w, &id).len(),
        1,
        "signed once, across the restart"
    );
    eprintln!(
        "measure: signetd killed mid-recovery: the job signed {} ms after the restart began",
        restarted.elapsed().as_millis()
    );
    let _ = vm.qemu.take();
}

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
    tokens.restore();

    let (status, body) = fetch(&ep, &format!("/v1/jobs/{id}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(verify(&w, &w.file("t-signed.exe", &body)).0);
    assert_eq!(audit_of(&w, &id).len(), 1);
    let back = wait_timeline(&ep, "token_back");
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
    // The refused try, the agent's session with the right PIN, the signer's own.
    assert_eq!(count_logins(&spy_log), 3);
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

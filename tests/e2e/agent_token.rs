//! The agent's token life with a real SoftHSM token: health, the PIN sent by the host,
//! the event stream, and a token that vanishes and returns while the agent runs.

use std::process::Command;

use serde_json::json;
use signet_test_support::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn unix(w: &World, name: &str) -> String {
    format!("unix:{}", w.path(name).display())
}

/// `openssl x509` facts about the fixture certificate, to compare with the agent's.
fn openssl_x509(w: &World, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout"])
        .args(args)
        .arg("-in")
        .arg(w.path("cert.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text.split_once('=')
        .map(|(_, v)| v.to_owned())
        .unwrap_or(text)
}

#[test]
fn health_reports_token_pin_flags_and_certificates_without_logging_in() {
    let mut w = World::new();
    let spy_log = w.path("spy.log");
    let agent = w.start_agent_config(
        &unix(&w, "agent.sock"),
        PKCS11_SPY,
        None,
        &[
            ("PKCS11SPY", SOFTHSM),
            ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
        ],
        "",
    );
    let (status, h) = call_json(&agent, "GET", "/agent/v1/health", None);
    assert_eq!(status, 200);
    assert_eq!(h["state"], "pin_needed", "{h:#}");
    assert_eq!(h["module_loaded"], true);
    assert_eq!(h["token_present"], true);
    assert_eq!(h["logged_in"], false);
    assert!(h["slot"].is_u64(), "{h:#}");
    let serial = std::fs::read_to_string(w.path("token-serial")).unwrap();
    assert_eq!(h["token"]["serial"], serial.trim());
    assert_eq!(h["token"]["label"], TOKEN_LABEL);
    assert_eq!(h["token"]["manufacturer"], "SoftHSM project");
    assert!(
        h["token"]["firmware"]
            .as_str()
            .is_some_and(|f| f.contains('.')),
        "{h:#}"
    );
    assert_eq!(
        h["pin"],
        json!({"count_low": false, "final_try": false, "locked": false, "to_be_changed": false})
    );
    let certs = h["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1, "{h:#}");
    let c = &certs[0];
    assert_eq!(c["subject"], "CN=Signet Demo Code Signing, O=Signet");
    assert_eq!(c["issuer"], c["subject"]);
    assert_eq!((&c["label"], &c["id"]), (&json!("signkey"), &json!("01")));
    let fingerprint = openssl_x509(&w, &["-fingerprint", "-sha256"])
        .replace(':', "")
        .to_lowercase();
    assert_eq!(c["sha256"], fingerprint);
    // The thumbprint Windows shows and signtool's /sha1 takes.
    let thumbprint = openssl_x509(&w, &["-fingerprint", "-sha1"])
        .replace(':', "")
        .to_lowercase();
    assert_eq!(c["sha1"], thumbprint);
    let days = c["days_left"].as_i64().unwrap();
    assert!((363..=365).contains(&days), "made for 365 days: {days}");
    assert!(
        c["not_after"].as_str().unwrap().ends_with('Z'),
        "RFC 3339 in UTC: {c}"
    );
    assert_eq!(count_logins(&spy_log), 0, "health spends no PIN try");
}

#[test]
fn the_host_sends_the_pin_and_a_refused_pin_costs_one_try() {
    let mut w = World::new();
    let spy_log = w.path("spy.log");
    let agent = w.start_agent_config(
        &unix(&w, "agent.sock"),
        PKCS11_SPY,
        None,
        &[
            ("PKCS11SPY", SOFTHSM),
            ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
        ],
        "",
    );
    let ep = w
        .start_daemon(&[&unix(&w, "signetd.sock")], &agent)
        .remove(0);
    let mut events = Events::follow(&agent);
    let file = w.pe("app.exe");

    // No PIN yet: nothing is signed, and the caller is told to come back.
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no token PIN yet"),
        "{}",
        stderr(&out)
    );

    // A wrong PIN: one C_Login, refused.
    let (status, body) = call_json(
        &agent,
        "POST",
        "/agent/v1/login",
        Some(json!({"pin": "000000"})),
    );
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("pin_rejected")),
        "{body}"
    );
    assert_eq!(count_logins(&spy_log), 1);
    let problem = events.wait_for("pin_problem");
    assert_eq!(problem["details"]["state"], "pin_rejected", "{problem}");
    let (_, h) = call_json(&agent, "GET", "/agent/v1/health", None);
    assert_eq!(h["state"], "pin_rejected", "{h:#}");
    assert_eq!(
        h["pin"]["count_low"], true,
        "the token counted the wrong PIN: {h:#}"
    );

    // The same wrong PIN again is refused before any call to the token.
    let (status, body) = call_json(
        &agent,
        "POST",
        "/agent/v1/login",
        Some(json!({"pin": "000000"})),
    );
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("pin_rejected")),
        "{body}"
    );
    assert_eq!(
        count_logins(&spy_log),
        1,
        "a refused PIN sent twice costs one try"
    );

    // Malformed bodies are refused without echoing them.
    let (status, body) = call(
        &agent,
        "POST",
        "/agent/v1/login",
        b"{\"pin\": 123456}".to_vec(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        !body["message"].as_str().unwrap().contains("123456"),
        "{body}"
    );

    // The right PIN logs in once; jobs are signed with it.
    let (status, h) = call_json(&agent, "POST", "/agent/v1/login", Some(json!({"pin": PIN})));
    assert_eq!(status, 200, "{h:#}");
    assert_eq!(
        (&h["state"], &h["logged_in"]),
        (&json!("ready"), &json!(true)),
        "{h:#}"
    );
    assert_eq!(
        h["pin"]["count_low"], false,
        "a good login resets the counter: {h:#}"
    );
    assert_eq!(count_logins(&spy_log), 2);
    let logged_in = events.wait_for("logged_in");
    assert_eq!(logged_in["details"]["label"], TOKEN_LABEL);

    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(verify(&w, &file).0);

    let log = w.log("signet-agent");
    assert!(
        !log.contains("000000") && !log.contains(PIN),
        "no PIN in the log:\n{log}"
    );
}

#[test]
fn the_event_stream_tells_signing_started_then_finished() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &pin, &[]);
    let ep = w
        .start_daemon(&[&unix(&w, "signetd.sock")], &agent)
        .remove(0);
    let mut events = Events::follow(&agent);
    for name in ["one.exe", "two.exe"] {
        let file = w.pe(name);
        let out = signet(&ep, &["sign", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let mut jobs = Vec::new();
    for name in ["one.exe", "two.exe"] {
        let started = events.next_event();
        assert_eq!(started["type"], "signing_started", "{:#?}", events.seen);
        assert_eq!(started["details"]["filename"], name);
        let finished = events.next_event();
        assert_eq!(finished["type"], "signing_finished", "{:#?}", events.seen);
        assert_eq!(finished["details"]["job"], started["details"]["job"]);
        assert_eq!(finished["details"]["ok"], true);
        assert!(finished["seq"].as_u64() > started["seq"].as_u64());
        assert!(
            started["time"].as_str().unwrap().ends_with('Z'),
            "{started}"
        );
        jobs.push(started["details"]["job"].as_u64().unwrap());
    }
    assert!(jobs[1] > jobs[0], "{jobs:?}");
}

#[test]
fn a_lost_token_is_recovered_by_the_agent_itself() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &pin, &[]);
    // No retries: the test sees the agent's own answer to a job while the token is away.
    let ep = w
        .start_daemon_with(
            &[&unix(&w, "signetd.sock")],
            &agent,
            "[queue]\njob_deadline_seconds = 0\n[profiles.release]\ndescription = \"Signet test\"\n",
        )
        .remove(0);
    let mut events = Events::follow(&agent);
    let tokens = TokenDir::of(&w);

    let before = w.pe("before.exe");
    let out = signet(&ep, &["sign", before.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Gone while the agent is idle: it notices by itself.
    tokens.vanish();
    let lost = events.wait_for("token_lost");
    assert_eq!(
        lost["details"]["serial"],
        std::fs::read_to_string(w.path("token-serial"))
            .unwrap()
            .trim()
    );
    let (_, h) = call_json(&agent, "GET", "/agent/v1/health", None);
    assert_eq!(h["state"], "token_lost", "{h:#}");
    assert_eq!(
        (&h["token_present"], &h["logged_in"]),
        (&json!(false), &json!(false))
    );

    // A job now is not signed, and is worth sending again later.
    let during = w.pe("during.exe");
    let out = signet(&ep, &["sign", during.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("token is not available"),
        "{}",
        stderr(&out)
    );
    assert!(!verify(&w, &during).0);

    // Back: the agent re-initialises the module, finds the token and logs in again.
    tokens.restore();
    events.wait_for("token_appeared");
    events.wait_for("logged_in");
    let (_, h) = call_json(&agent, "GET", "/agent/v1/health", None);
    assert_eq!(
        (&h["state"], &h["logged_in"]),
        (&json!("ready"), &json!(true)),
        "{h:#}"
    );
    let out = signet(&ep, &["sign", during.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (ok, text) = verify(&w, &during);
    assert!(ok, "{text}");
}

#[test]
fn a_job_in_flight_when_the_token_vanishes_is_reported_retryable() {
    let mut w = World::new();
    // osslsigncode behind a gate the test opens once the token is gone.
    let gate = w.path("gate");
    let wrapper = w.path("osslsigncode-gated");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = sign ] && [ -p '{g}' ]; then read _ < '{g}'; rm -f '{g}'; fi\nexec osslsigncode \"$@\"\n",
            g = gate.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &unix(&w, "agent.sock"),
        SOFTHSM,
        &pin,
        &[],
        // osslsigncode's run is what the gate holds (the native engine runs none).
        &format!(
            "[signer]\nbackend = \"osslsigncode\"\nosslsigncode = \"{}\"\n",
            wrapper.display()
        ),
    );
    // No retries: the test sees the agent's own answer to a job while the token is away.
    let ep = w
        .start_daemon_with(
            &[&unix(&w, "signetd.sock")],
            &agent,
            "[queue]\njob_deadline_seconds = 0\n[profiles.release]\ndescription = \"Signet test\"\n",
        )
        .remove(0);
    let mut events = Events::follow(&agent);
    let tokens = TokenDir::of(&w);

    let pe = std::fs::read(w.path("hello.exe")).unwrap();
    let job = {
        let ep = ep.clone();
        let pe = pe.clone();
        std::thread::spawn(move || call(&ep, "POST", "/v1/sign?filename=app.exe", pe))
    };
    let started = events.wait_for("signing_started");
    tokens.vanish();
    // Let the signer run, now that the token is gone.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&gate)
        .and_then(|mut g| std::io::Write::write_all(&mut g, b"go\n"))
        .unwrap();
    let (status, body) = job.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "token_unavailable", "{body}");
    assert_eq!(body["retryable"], true, "never a failed signature: {body}");
    let finished = events.wait_for("signing_finished");
    assert_eq!(finished["details"]["job"], started["details"]["job"]);
    assert_eq!(
        (
            &finished["details"]["ok"],
            &finished["details"]["code"],
            &finished["details"]["retryable"]
        ),
        (&json!(false), &json!("token_unavailable"), &json!(true)),
        "{finished}"
    );
    assert!(
        events.seen.iter().any(|e| e["type"] == "token_lost"),
        "the agent saw the loss itself: {:#?}",
        events.seen
    );

    tokens.restore();
    events.wait_for("logged_in");
    let file = w.pe("again.exe");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (ok, text) = verify(&w, &file);
    assert!(ok, "{text}");
}

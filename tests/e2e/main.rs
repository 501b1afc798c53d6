//! The whole path with real processes: `signet` → `signetd` → `signet-agent` →
//! osslsigncode → SoftHSM, over unix sockets and loopback TCP, verified with
//! `osslsigncode verify`.

#![allow(clippy::unwrap_used)]

use std::process::Output;

use signet_test_support::*;

mod alerts;
mod ci_kit;
mod cli;
mod dbus;
mod doctor;
mod exactly_once;
mod formats;
mod jobs_api;
mod journal;
mod link;
mod metrics;
mod native;
mod operator;
mod passthrough;
mod queue;
mod recovery;
mod reload;
mod shutdown;
mod state;
mod streaming;

mod agent_token;
mod plugin;
mod policy;
mod remote;
mod security;
mod web;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Agent and daemon on unix sockets, the common local layout.
fn unix_appliance(world: &mut World) -> Endpoint {
    let pin = world.path("pin");
    let agent = world.start_agent(
        &format!("unix:{}", world.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    world
        .start_daemon(
            &[&format!("unix:{}", world.path("signetd.sock").display())],
            &agent,
        )
        .remove(0)
}

#[test]
fn signs_a_pe_over_unix_sockets_and_it_verifies() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let file = w.pe("app.exe");
    let before = std::fs::read(&file).unwrap();
    let (ok, _) = verify(&w, &file);
    assert!(!ok, "the fixture starts unsigned");

    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("signed"), "{}", stderr(&out));
    let after = std::fs::read(&file).unwrap();
    assert!(after.len() > before.len(), "a signature was appended");
    let (ok, text) = verify(&w, &file);
    assert!(ok, "{text}");
    assert!(
        text.contains("Signet Demo Code Signing"),
        "signed with the token's certificate: {text}"
    );
    // The profile's description made it into the signature.
    assert!(text.contains("Signet test"), "{text}");
}

#[test]
fn signs_over_tcp_to_a_separate_output_with_json_report() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent("tcp:127.0.0.1:0", SOFTHSM, &pin, &[]);
    assert!(
        matches!(agent, Endpoint::Tcp { port, .. } if port != 0),
        "{agent}"
    );
    let ep = w.start_daemon(&["tcp:127.0.0.1:0"], &agent).remove(0);
    let file = w.pe("lib.dll");
    let out_path = w.path("lib-signed.dll");
    let out = signet(
        &ep,
        &[
            "sign",
            "--json",
            "-d",
            "My Library",
            "-o",
            out_path.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["signed"], true);
    assert_eq!(
        report["bytes_sent"],
        std::fs::metadata(&file).unwrap().len()
    );
    assert_eq!(
        report["bytes_received"],
        std::fs::metadata(&out_path).unwrap().len()
    );
    assert!(
        report["job"].as_str().is_some_and(|j| !j.is_empty()),
        "{report}"
    );
    let (ok, text) = verify(&w, &out_path);
    assert!(ok, "{text}");
    assert!(
        text.contains("My Library"),
        "the client's description wins: {text}"
    );
    assert!(!verify(&w, &file).0, "the input is untouched with --output");
}

#[test]
fn several_files_in_one_call_each_reported_and_bad_ones_do_not_stop_good_ones() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let a = w.pe("a.exe");
    let junk = w.path("notes.txt");
    std::fs::write(&junk, "not a program").unwrap();
    let b = w.pe("b.exe");
    let out = signet(
        &ep,
        &[
            "sign",
            "--json",
            a.to_str().unwrap(),
            junk.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert_eq!(
        code(&out),
        4,
        "the first failure decides the exit code: {}",
        stderr(&out)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["signed"], true);
    assert_eq!(lines[1]["signed"], false);
    assert_eq!(lines[1]["exit_code"], 4);
    assert_eq!(lines[2]["signed"], true);
    assert!(verify(&w, &a).0 && verify(&w, &b).0);
    assert_eq!(std::fs::read_to_string(&junk).unwrap(), "not a program");
}

#[test]
fn bad_input_files_are_refused_before_upload_with_exit_4() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let text = w.path("readme.exe");
    std::fs::write(&text, "MZ but not really a program").unwrap();
    let empty = w.path("empty.exe");
    std::fs::write(&empty, "").unwrap();
    let elf = std::env::current_exe().unwrap();
    for (file, want) in [
        (text.as_path(), "not a supported format"),
        (empty.as_path(), "the file is empty"),
        (elf.as_path(), "Linux ELF binary"),
        (w.path("missing.exe").as_path(), "cannot open it"),
        (w.dir.path(), "not a regular file"),
    ] {
        let out = signet(&ep, &["sign", file.to_str().unwrap()]);
        assert_eq!(code(&out), 4, "{}: {}", file.display(), stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "{}: {}",
            file.display(),
            stderr(&out)
        );
    }
    assert_eq!(
        std::fs::read(&text).unwrap(),
        b"MZ but not really a program",
        "refused files are untouched"
    );
    assert!(
        !w.log("signetd").contains("job accepted"),
        "nothing was uploaded:\n{}",
        w.log("signetd")
    );
}

#[test]
fn the_appliance_refuses_bad_input_that_reaches_it() {
    // A client that skips the local checks (curl, an old client) meets the same rules
    // on the appliance.
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    for (body, code_want, status) in [
        (b"#!/bin/sh\n".to_vec(), "unsupported_format", 415),
        (Vec::new(), "empty_input", 422),
    ] {
        let err = post_sign(&ep, "filename=x.exe", body);
        assert_eq!(err.0, status);
        assert_eq!(err.1["code"], code_want, "{}", err.1);
        assert!(
            err.1["message"].as_str().unwrap().contains("Signet signs")
                || code_want == "empty_input"
        );
    }
    let (status, body) = post_sign(
        &ep,
        "profile=release&filename=a/b.exe",
        std::fs::read(w.path("hello.exe")).unwrap(),
    );
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (400, "bad_request"),
        "{body}"
    );
    let (status, body) = post_sign(&ep, "profile=a&profile=b", Vec::new());
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (400, "bad_request"),
        "{body}"
    );
}

/// `POST /v1/sign?QUERY` with `body`, as a client that skips the local checks.
pub fn post_sign(ep: &Endpoint, query: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    call(ep, "POST", &format!("/v1/sign?{query}"), body)
}

#[test]
fn unknown_profile_is_refused_with_exit_3_and_names_the_profiles() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let file = w.pe("app.exe");
    let out = signet(
        &ep,
        &["sign", "--profile", "nightly", file.to_str().unwrap()],
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("\"nightly\"") && err.contains("release"),
        "{err}"
    );
    assert!(!verify(&w, &file).0);
}

#[test]
fn a_wrong_pin_is_tried_once_and_never_again_until_it_changes() {
    // The native engine (the default) signs on the agent's session; osslsigncode logs
    // in once more per job, with the PIN on its stdin.
    wrong_pin_tried_once("native", 0);
    wrong_pin_tried_once("osslsigncode", 1);
}

fn wrong_pin_tried_once(backend: &str, signer_logins: usize) {
    let mut w = World::new();
    let spy_log = w.path("spy.log");
    let pin = w.path("agent-pin");
    std::fs::write(&pin, "000000").unwrap();
    // The agent uses a PIN file only its own user may read.
    std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        PKCS11_SPY,
        &pin,
        &[
            ("PKCS11SPY", SOFTHSM),
            ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
        ],
        &format!("[signer]\nbackend = \"{backend}\"\n"),
    );
    let ep = w
        .start_daemon(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
        )
        .remove(0);
    assert_eq!(
        count_logins(&spy_log),
        1,
        "the agent tried the PIN once at start"
    );

    let file = w.pe("app.exe");
    for _ in 0..3 {
        let out = signet(&ep, &["sign", file.to_str().unwrap()]);
        assert_eq!(code(&out), 6, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("refused its configured PIN"),
            "{}",
            stderr(&out)
        );
    }
    let status = signet(&ep, &["status", "--json"]);
    assert_eq!(code(&status), 6);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["signing_works"], false);
    assert_eq!(
        status["agent"]["health"]["state"], "pin_rejected",
        "{status}"
    );
    assert_eq!(
        count_logins(&spy_log),
        1,
        "no job, no status call spent another try"
    );
    assert!(!verify(&w, &file).0);
    assert!(
        !w.log("signet-agent").contains("000000"),
        "the PIN is never logged"
    );

    // A person supplies the right PIN: the next job logs in once and signs.
    std::fs::write(&pin, PIN).unwrap();
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);
    let logins = count_logins(&spy_log);
    // One login by the agent's own session (plus one by an osslsigncode child).
    assert_eq!(
        logins,
        2 + signer_logins,
        "{backend}: exactly one new agent login and {signer_logins} signer login"
    );
}

#[test]
fn agent_not_running_gives_exit_6_with_the_reason() {
    let mut w = World::new();
    let nowhere = Endpoint::Unix(w.path("no-agent.sock"));
    // A job waits for an unreachable agent (a rebooting signing VM) until its
    // deadline, here a short one.
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &nowhere,
            "[profiles.release]\n[queue]\njob_deadline_seconds = 2\n",
        )
        .remove(0);
    let file = w.pe("app.exe");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("agent is not reachable")
            && stderr(&out).contains("signet-agent is not running")
            && stderr(&out).contains("signetd's log")
            && !stderr(&out).contains("signet status"),
        "says what is down and where to look: {}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("no-agent.sock"),
        "internals stay on the host: {}",
        stderr(&out)
    );
    assert!(
        w.log("signetd").contains("no-agent.sock"),
        "the operator's log has them"
    );
    let status = signet(&ep, &["status"]);
    assert_eq!(code(&status), 6);
    assert!(String::from_utf8_lossy(&status.stdout).contains("unreachable"));
}

#[test]
fn daemon_not_running_gives_exit_6_with_the_fix() {
    let w = World::new();
    let file = w.pe("app.exe");
    let ep = Endpoint::Unix(w.path("no-daemon.sock"));
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach the Signet daemon") && err.contains("--endpoint"),
        "{err}"
    );
    let out = signet(&ep, &["status"]);
    assert_eq!(code(&out), 6);
    // --json prints a document even then.
    let out = signet(&ep, &["status", "--json"]);
    assert_eq!(code(&out), 6);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&doc["reachable"], &doc["signing_works"]),
        (&false.into(), &false.into()),
        "{doc}"
    );
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach the Signet daemon"),
        "{doc}"
    );
}

#[test]
fn usage_errors_exit_2_and_help_documents_exit_codes() {
    let ep = Endpoint::Unix("/nonexistent".into());
    assert_eq!(code(&signet(&ep, &["sign"])), 2);
    assert_eq!(code(&signet(&ep, &["frobnicate"])), 2);
    assert_eq!(
        code(&signet(&ep, &["sign", "-o", "x", "a.exe", "b.exe"])),
        2
    );
    let bad = std::process::Command::new(bin("signet"))
        .args(["--endpoint", "vsock:two:7710", "status"])
        .output()
        .unwrap();
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("vsock:CID:PORT"), "{}", stderr(&bad));
    let help = signet(&ep, &["sign", "--help"]);
    assert_eq!(code(&help), 0);
    let text = String::from_utf8_lossy(&help.stdout);
    for line in [
        "0  signed",
        "3  refused by policy",
        "4  bad input file",
        "5  signing failed",
        "6  appliance unavailable",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
}

#[test]
fn status_reports_the_token_when_signing_works() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let out = signet(&ep, &["status", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["signing_works"], true);
    assert_eq!(s["default_profile"], "release");
    let serial = std::fs::read_to_string(w.path("token-serial")).unwrap();
    assert_eq!(s["agent"]["health"]["token"]["serial"], serial.trim());
    assert_eq!(s["agent"]["health"]["token"]["label"], TOKEN_LABEL);
    let human = signet(&ep, &["status"]);
    assert_eq!(code(&human), 0);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("signing works"), "{human}");
    assert!(human.contains("PIN:      ok"), "{human}");
    assert!(
        human.contains("cert:     CN=Signet Demo Code Signing, O=Signet expires 20"),
        "{human}"
    );
}

#[test]
fn the_certificate_may_come_from_a_file_instead_of_the_token() {
    // Both backends read signer.certificate: the native engine (the default) and
    // osslsigncode (given -certs), each failing in its own words once the file is gone.
    for (backend, gone) in [
        ("native", "cannot read the certificate file"),
        ("osslsigncode", "osslsigncode could not sign"),
    ] {
        let mut w = World::new();
        // A second certificate for the same key would be needed to tell the two apart;
        // instead, prove the file is used by pointing at it and removing it (the
        // token's copy is identical).
        let cert = w.path("cert.pem");
        let pin = w.path("pin");
        let agent = w.start_agent_with(
            &format!("unix:{}", w.path("agent.sock").display()),
            SOFTHSM,
            &pin,
            &[],
            &format!(
                "[signer]\nbackend = \"{backend}\"\ncertificate = \"{}\"\n",
                cert.display()
            ),
        );
        let ep = w
            .start_daemon(
                &[&format!("unix:{}", w.path("signetd.sock").display())],
                &agent,
            )
            .remove(0);
        let file = w.pe("app.exe");
        let out = signet(&ep, &["sign", file.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{backend}: {}", stderr(&out));
        assert!(verify(&w, &file).0, "{backend}");

        // With the file gone, signing fails on the file — so it was the file that was used.
        std::fs::remove_file(&cert).unwrap();
        let file2 = w.pe("app2.exe");
        let out = signet(&ep, &["sign", file2.to_str().unwrap()]);
        assert_eq!(code(&out), 5, "{backend}: {}", stderr(&out));
        assert!(stderr(&out).contains(gone), "{backend}: {}", stderr(&out));
    }
}

#[test]
fn digest_mode_moves_only_the_authenticode_data_and_the_result_verifies() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let big = w.path("big.exe");
    let made = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/make-pe.sh"))
        .arg(&big)
        .arg((4 << 20).to_string())
        .status()
        .unwrap();
    assert!(made.success());
    let whole = w.path("whole.exe");
    std::fs::copy(&big, &whole).unwrap();
    let size = std::fs::metadata(&big).unwrap().len();
    assert!(size >= 4 << 20);
    let ca = w.path("cert.pem");

    let out = signet(
        &ep,
        &[
            "sign",
            "--json",
            "--digest",
            "--ca-file",
            ca.to_str().unwrap(),
            big.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let digest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = signet(&ep, &["sign", "--json", whole.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let full: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let (ok, text) = verify(&w, &big);
    assert!(ok, "{text}");
    assert!(text.contains("Signet Demo Code Signing"), "{text}");
    assert!(verify(&w, &whole).0);
    let sent_digest = digest["bytes_sent"].as_u64().unwrap();
    let recv_digest = digest["bytes_received"].as_u64().unwrap();
    assert_eq!(full["bytes_sent"].as_u64().unwrap(), size);
    assert!(full["bytes_received"].as_u64().unwrap() > size);
    assert!(sent_digest < 4096, "digest mode sent {sent_digest} bytes");
    assert!(
        recv_digest < 16384,
        "digest mode received {recv_digest} bytes"
    );
    // Both ways put a signature over the same file content.
    assert_eq!(
        std::fs::metadata(&big).unwrap().len(),
        std::fs::metadata(&whole).unwrap().len(),
        "same signed size either way"
    );
}

#[test]
fn digest_mode_says_how_to_trust_a_private_ca() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    // Without --ca-file the demo certificate does not chain to the system's roots:
    // the file is signed, and the client says it could not check it here and how to.
    let file = w.pe("app.exe");
    let before = std::fs::read(&file).unwrap();
    let out = signet(&ep, &["sign", "--json", "--digest", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["signed"], true, "{report}");
    let warning = report["warning"].as_str().unwrap();
    assert!(
        warning.starts_with(
            "signed, and the signature matches the file, but it was not verified here"
        ) && warning.contains("--ca-file")
            && !warning.contains("PKCS7"),
        "{warning}"
    );
    assert!(verify(&w, &file).0, "signed and written");
    // On a terminal's stream: the signed line first, then what was not checked.
    let out = signet(&ep, &["sign", "--digest", w.pe("b.exe").to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stderr(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() == 2
            && lines[0].starts_with("signet: signed ")
            && lines[1].contains("not verified here")
            && lines[1].contains("Pass the CA that issued it with --ca-file"),
        "{text}"
    );

    // A --ca-file that is not the certificate's CA: nothing is attached.
    let other = w.path("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=Other",
            "-days",
            "1",
            "-keyout",
        ])
        .arg(w.path("other-key.pem"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let untouched = w.pe("c.exe");
    let out = signet(
        &ep,
        &[
            "sign",
            "--digest",
            "--ca-file",
            other.to_str().unwrap(),
            untouched.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not chain to the CA in") && stderr(&out).contains("--ca-file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&untouched).unwrap(),
        before,
        "the file is untouched"
    );
    let leftovers: Vec<_> = std::fs::read_dir(w.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".signet-"))
        .collect();
    assert!(leftovers.is_empty(), "no work files are left behind");

    // A digest-mode request whose body is not Authenticode data is refused by the appliance.
    let (status, body) = post_sign(&ep, "mode=digest", before);
    assert_eq!(status, 415, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("extract-data"),
        "{body}"
    );
}

#[test]
fn several_files_go_in_one_batch_request_signed_in_order() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let files: Vec<_> = ["one.exe", "two.dll", "three.sys"]
        .iter()
        .map(|n| w.pe(n))
        .collect();
    let mut args = vec!["sign", "--json"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    let out = signet(&ep, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, file) in lines.iter().zip(&files) {
        assert_eq!(line["signed"], true, "{line}");
        assert_eq!(line["file"], file.to_str().unwrap());
        assert!(verify(&w, file).0, "{}", file.display());
    }
    let daemon_log = w.log("signetd");
    assert_eq!(
        daemon_log.matches("job accepted").count(),
        1,
        "one request:\n{daemon_log}"
    );
    let agent_log = w.log("signet-agent");
    let order: Vec<usize> = ["one.exe", "two.dll", "three.sys"]
        .iter()
        .map(|n| {
            agent_log
                .find(&format!("file=\"{n}\""))
                .unwrap_or_else(|| panic!("{n} in\n{agent_log}"))
        })
        .collect();
    assert!(
        order.windows(2).all(|p| p[0] < p[1]),
        "signed in order:\n{agent_log}"
    );
}

#[test]
fn a_batch_in_digest_mode_signs_every_file() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let a = w.pe("a.exe");
    let b = w.pe("b.exe");
    let ca = w.path("cert.pem");
    let out = signet(
        &ep,
        &[
            "sign",
            "--digest",
            "--ca-file",
            ca.to_str().unwrap(),
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &a).0 && verify(&w, &b).0);
}

#[test]
fn the_appliance_answers_each_part_of_a_batch_on_its_own() {
    // A client that skips the local checks: the bad part gets its error, the good one
    // is signed, in the order sent.
    use futures_util::TryStreamExt;
    use signet_protocol::batch::{self, Part, PartBody};
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let good = w.pe("good.exe");
    let bad = w.path("bad.exe");
    std::fs::write(&bad, "echo not a program").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let parts: Vec<(String, String, Vec<u8>)> = rt.block_on(async {
        let boundary = batch::new_boundary();
        let parts = vec![
            Part {
                filename: "bad.exe".into(),
                headers: vec![],
                content_type: "application/octet-stream",
                body: PartBody::File(bad.clone()),
            },
            Part {
                filename: "good.exe".into(),
                headers: vec![],
                content_type: "application/octet-stream",
                body: PartBody::File(good.clone()),
            },
        ];
        let body = http_body_util::StreamBody::new(
            batch::body(boundary.clone(), parts).map_ok(hyper_frame),
        );
        let req = http::Request::post("/v1/batch")
            .header(http::header::CONTENT_TYPE, batch::content_type(&boundary))
            .body(body)
            .unwrap();
        let resp = signet_protocol::client::send(&ep, req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()[http::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let mut mp = multer::Multipart::new(
            http_body_util::BodyExt::into_data_stream(resp.into_body()),
            multer::parse_boundary(ct).unwrap(),
        );
        let mut got = Vec::new();
        while let Some(f) = mp.next_field().await.unwrap() {
            let name = f.file_name().unwrap().to_owned();
            let result = f.headers()[batch::RESULT_HEADER]
                .to_str()
                .unwrap()
                .to_owned();
            got.push((name, result, f.bytes().await.unwrap().to_vec()));
        }
        got
    });
    assert_eq!(parts.len(), 2);
    assert_eq!(
        (parts[0].0.as_str(), parts[0].1.as_str()),
        ("bad.exe", "error")
    );
    let err: serde_json::Value = serde_json::from_slice(&parts[0].2).unwrap();
    assert_eq!(err["code"], "unsupported_format", "{err}");
    assert_eq!(
        (parts[1].0.as_str(), parts[1].1.as_str()),
        ("good.exe", "signed")
    );
    let signed = w.path("good-signed.exe");
    std::fs::write(&signed, &parts[1].2).unwrap();
    assert!(verify(&w, &signed).0);

    // Not multipart at all: a clear refusal.
    let (status, body) = call_as(
        &ep,
        "POST",
        "/v1/batch",
        Some("application/octet-stream"),
        b"plain".to_vec(),
    );
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (400, "bad_request"),
        "{body}"
    );
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("multipart/form-data"));
}

fn hyper_frame(b: bytes::Bytes) -> hyper::body::Frame<bytes::Bytes> {
    hyper::body::Frame::data(b)
}

#[test]
fn progress_shows_on_a_terminal_and_nowhere_else() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let file = w.pe("app.exe");
    // Not a terminal: not a byte of progress.
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stderr(&out).contains("app.exe ["), "{}", stderr(&out));
    // A terminal (script(1) gives it a pty): the bar appears.
    let typescript = w.path("typescript");
    let cmd = format!("{} sign {}", bin("signet").display(), file.display());
    let status = std::process::Command::new("script")
        .args(["-qfec", &cmd])
        .arg(&typescript)
        .env("SIGNET_ENDPOINT", ep.to_string())
        .env("SIGNET_PROGRESS_AFTER_MS", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(screen.contains("app.exe ["), "a progress bar: {screen}");
    assert!(screen.contains("signed"), "{screen}");
    assert!(verify(&w, &file).0);
}

/// While a job waits — here for an agent that is not running — the progress line on a
/// terminal says what for, and the job is signed once the agent is back.
#[test]
fn a_waiting_job_says_on_the_terminal_what_it_waits_for() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    w.stop("signet-agent");
    let file = w.pe("app.exe");
    let mut client = OnTerminal::sign(&w, &ep, &file);
    wait_until("the wait said on the progress line", || {
        client
            .screen()
            .contains("waiting: the signing VM's agent does not answer")
    });
    let pin = w.path("pin");
    w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    assert!(client.success(), "{}", client.screen());
    assert!(client.screen().contains("signed"), "{}", client.screen());
    assert!(verify(&w, &file).0);
}

#[test]
fn digest_mode_keeps_the_profiles_format_list() {
    // The agent sees only Authenticode data in digest mode; that data says which kind
    // of file it came from, and the profile's formats hold.
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
            "default_profile = \"release\"\n[profiles.release]\n[profiles.installers]\nformats = [\"msi\"]\n",
        )
        .remove(0);
    let file = w.pe("app.exe");
    let ca = w.path("cert.pem");
    let out = signet(
        &ep,
        &[
            "sign",
            "--digest",
            "--ca-file",
            ca.to_str().unwrap(),
            "--profile",
            "installers",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("PE") && stderr(&out).contains("\"installers\" does not sign"),
        "{}",
        stderr(&out)
    );
    assert!(!verify(&w, &file).0);
    let out = signet(
        &ep,
        &[
            "sign",
            "--digest",
            "--ca-file",
            ca.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);
}

/// One job, one trace: the job's id travels to the agent, and every line either daemon
/// logs about the job is under a span that carries that id.
#[test]
fn every_log_line_of_a_job_in_either_daemon_carries_its_id() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let file = w.pe("traced.exe");
    let out = signet(&ep, &["sign", "--json", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = report["job"]
        .as_str()
        .expect("the report names the job")
        .to_owned();
    let span = format!("job{{job={id}");
    for (name, wanted) in [
        ("signetd", ["job accepted", "signed"].as_slice()),
        ("signet-agent", ["signed"].as_slice()),
    ] {
        let log = w.log(name);
        // A line names the job by a `job` field (`job=ID`, `job="ID"`) or by its span.
        let names_it = |l: &str| {
            l.contains(&span)
                || l.split_whitespace().any(|w| {
                    w.trim_end_matches(['}', ':', ','])
                        .strip_prefix("job=")
                        .is_some_and(|v| v.trim_matches('"') == id)
                })
        };
        let lines: Vec<&str> = log.lines().filter(|l| names_it(l)).collect();
        for want in wanted {
            assert!(
                lines.iter().any(|l| l.contains(want)),
                "{name} logged no {want:?} line for job {id}:\n{log}"
            );
        }
        for l in &lines {
            assert!(
                l.contains(&span),
                "{name} logged a line of job {id} outside its span: {l}\n{log}"
            );
        }
    }
}

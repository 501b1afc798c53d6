//! The whole path with real processes: `signet` → `signetd` → `signet-agent` →
//! osslsigncode → SoftHSM, over unix sockets and loopback TCP, verified with
//! `osslsigncode verify`.

#![allow(clippy::unwrap_used)]

use std::process::Output;

use signet_tests::*;

mod agent_token;

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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (body, code_want, status) in [
        (b"#!/bin/sh\n".to_vec(), "unsupported_format", 415),
        (Vec::new(), "empty_input", 422),
    ] {
        let err = rt.block_on(post_sign(&ep, "filename=x.exe", body));
        assert_eq!(err.0, status);
        assert_eq!(err.1["code"], code_want, "{}", err.1);
        assert!(
            err.1["message"].as_str().unwrap().contains("Signet signs")
                || code_want == "empty_input"
        );
    }
    let (status, body) = rt.block_on(post_sign(
        &ep,
        "profile=release&filename=a/b.exe",
        std::fs::read(w.path("hello.exe")).unwrap(),
    ));
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (400, "bad_request"),
        "{body}"
    );
    let (status, body) = rt.block_on(post_sign(&ep, "profile=a&profile=b", Vec::new()));
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (400, "bad_request"),
        "{body}"
    );
}

async fn post_sign(ep: &Endpoint, query: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    use http_body_util::{BodyExt, Full};
    let req = http::Request::post(format!("/v1/sign?{query}"))
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = signet_protocol::client::send(ep, req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
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
    let mut w = World::new();
    let spy_log = w.path("spy.log");
    let pin = w.path("agent-pin");
    std::fs::write(&pin, "000000").unwrap();
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        PKCS11_SPY,
        &pin,
        &[
            ("PKCS11SPY", SOFTHSM),
            ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
        ],
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
    // One login by the agent's own session plus one by the osslsigncode child.
    assert_eq!(
        logins, 3,
        "exactly one new agent login and one signer login"
    );
}

#[test]
fn agent_not_running_gives_exit_6_with_the_reason() {
    let mut w = World::new();
    let nowhere = Endpoint::Unix(w.path("no-agent.sock"));
    let ep = w
        .start_daemon(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &nowhere,
        )
        .remove(0);
    let file = w.pe("app.exe");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("agent is not reachable"),
        "{}",
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
    let mut w = World::new();
    // A second certificate for the same key would be needed to tell the two apart;
    // instead, prove the file is used by pointing at it and checking osslsigncode
    // was given -certs (the token's copy is identical).
    let cert = w.path("cert.pem");
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        &format!("[signer]\ncertificate = \"{}\"\n", cert.display()),
    );
    let ep = w
        .start_daemon(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
        )
        .remove(0);
    let file = w.pe("app.exe");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);

    // With the file gone, signing fails on the file — so it was the file that was used.
    std::fs::remove_file(&cert).unwrap();
    let file2 = w.pe("app2.exe");
    let out = signet(&ep, &["sign", file2.to_str().unwrap()]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("osslsigncode could not sign"),
        "{}",
        stderr(&out)
    );
}

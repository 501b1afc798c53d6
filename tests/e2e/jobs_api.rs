//! The job API end to end (`/v1/jobs/{id}`, its result and cancel) and the queue's
//! refusals: cancel by the caller that sent the job and no other, results that expire,
//! a spool that is full before and while an upload streams, and a daemon killed while
//! a file is being uploaded.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::*;

/// How long a test waits for the daemon to reach a state, before it fails.
const STATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Agent and daemon, the daemon on a unix socket (root: `uid:0`) and on loopback TCP
/// (client "loopback"), with `extra` configuration after the one profile.
fn appliance(w: &mut World, agent_config: &str, extra: &str) -> (Endpoint, Endpoint) {
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

/// Polls `GET /v1/jobs/{id}` until `cond` holds for the job, or fails.
fn wait_job(ep: &Endpoint, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (_, v) = call_json(ep, "GET", &format!("/v1/jobs/{id}"), None);
        if cond(&v) {
            return v;
        }
        assert!(
            started.elapsed() < STATE_TIMEOUT,
            "job {id} never reached: {what}; last: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

use serde_json::Value;

fn spool_files(w: &World) -> Vec<String> {
    std::fs::read_dir(w.path("state/spool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_queued_job_is_cancelled_by_its_caller_and_no_other() {
    let mut w = World::new();
    let signer = HeldSigner::new(&w);
    let (unix, tcp) = appliance(&mut w, &signer.agent_config(), "");
    let pe = std::fs::read(w.pe("c.exe")).unwrap();

    // Job 1 is held at the agent; job 2 waits behind it, its result awaited.
    let first = sign_async(&unix, "first.exe", &pe);
    wait_until("the first job runs", || signer.held.exists());
    let second = sign_async(&unix, "second.exe", &pe);
    let view = wait_job(&unix, &second, "queued", |v| v["state"] == "queued");
    assert_eq!(view["position"], 0, "{view:#}");
    let awaited = {
        let unix = unix.clone();
        let second = second.clone();
        std::thread::spawn(move || fetch(&unix, &format!("/v1/jobs/{second}/result")))
    };

    // Another caller does not see it, so cannot cancel it.
    let (status, body) = call_json(&tcp, "DELETE", &format!("/v1/jobs/{second}"), None);
    assert_eq!(
        (status, &body["code"]),
        (404, &"unknown_job".into()),
        "{body}"
    );
    // The job at the agent cannot be cancelled any more.
    let (status, body) = call_json(&unix, "DELETE", &format!("/v1/jobs/{first}"), None);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("can no longer be cancelled"),
        "{body}"
    );
    // Its own caller cancels the waiting one; whoever waits for it is told.
    let (status, body) = call_json(&unix, "DELETE", &format!("/v1/jobs/{second}"), None);
    assert_eq!(
        (status, &body["state"]),
        (200, &"cancelled".into()),
        "{body}"
    );
    let (status, body) = awaited.join().unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, &body["code"]),
        (409, &"cancelled".into()),
        "{body}"
    );
    // Cancelling again answers the job as it is.
    let (status, body) = call_json(&unix, "DELETE", &format!("/v1/jobs/{second}"), None);
    assert_eq!(
        (status, &body["state"]),
        (200, &"cancelled".into()),
        "{body}"
    );

    signer.release();
    let (status, signed) = fetch(&unix, &format!("/v1/jobs/{first}/result"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&signed));
    let f = w.file("first.exe", &signed);
    assert!(verify(&w, &f).0);

    let records = w.audit_records();
    let result_of = |id: &str| {
        records
            .iter()
            .find(|r| r["job"] == id)
            .map(|r| r["result"].clone())
    };
    assert_eq!(result_of(&first), Some("signed".into()), "{records:#?}");
    assert_eq!(result_of(&second), Some("cancelled".into()), "{records:#?}");
    assert!(
        !spool_files(&w).contains(&format!("{second}.in")),
        "a cancelled job's input is removed"
    );
}

#[test]
fn a_signed_result_is_kept_for_its_time_then_expires() {
    let mut w = World::new();
    let (unix, _) = appliance(&mut w, "", "[queue]\nresult_ttl_seconds = 1\n");
    let pe = std::fs::read(w.pe("e.exe")).unwrap();
    let id = sign_async(&unix, "e.exe", &pe);
    wait_job(&unix, &id, "signed", |v| v["state"] == "signed");
    wait_job(&unix, &id, "its result removed", |v| {
        v["result_available"] == false
    });
    let (status, body) = fetch(&unix, &format!("/v1/jobs/{id}/result"));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, &body["code"]),
        (410, &"result_expired".into()),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("sign the file again"),
        "{body}"
    );
    assert!(spool_files(&w).is_empty(), "{:?}", spool_files(&w));
}

#[test]
fn a_full_spool_refuses_uploads_before_they_start_and_while_they_stream() {
    let mut w = World::new();
    let (unix, tcp) = appliance(&mut w, "", "[queue]\nspool_quota_mb = 1\n");
    let big = vec![b'M'; 2 << 20];

    // With a Content-Length: refused before a byte is read.
    let (status, body) = call(&unix, "POST", "/v1/sign?filename=big.exe", big.clone());
    assert_eq!(
        (status, &body["code"]),
        (507, &"spool_full".into()),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("spool") && message.contains("send it again later"),
        "{message}"
    );

    // Chunked, no length: refused once the upload outgrows the room left.
    let mut s = std::net::TcpStream::connect(match &tcp {
        Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        other => panic!("{other}"),
    })
    .unwrap();
    s.set_read_timeout(Some(STATE_TIMEOUT)).unwrap();
    s.write_all(
        b"POST /v1/sign?filename=stream.exe HTTP/1.1\r\nHost: signet\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let chunk = vec![b'M'; 64 << 10];
    for _ in 0..24 {
        // The daemon may answer and close before all of it is sent.
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .and_then(|()| s.write_all(&chunk))
            .and_then(|()| s.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 507") && answer.contains("spool_full"),
        "{answer}"
    );

    // Nothing was kept, both refusals are in the audit log, and a file that fits signs.
    assert!(spool_files(&w).is_empty(), "{:?}", spool_files(&w));
    let records = w.audit_records();
    let full = records
        .iter()
        .filter(|r| r["result"] != "signed" && r["error"] == "spool_full")
        .count();
    assert_eq!(full, 2, "{records:#?}");
    let file = w.pe("fits.exe");
    let out = signet(&unix, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);
}

#[test]
fn a_daemon_killed_during_an_upload_fails_that_job_says_so_on_the_bus_and_signs_the_next() {
    let mut w = World::new();
    let bus = super::dbus::Bus::start(&w);
    w.dbus = Some(bus.address.clone());
    let (_, tcp) = appliance(&mut w, "", "");
    let pe = std::fs::read(w.pe("cut.exe")).unwrap();
    let mut s = std::net::TcpStream::connect(match &tcp {
        Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        other => panic!("{other}"),
    })
    .unwrap();
    s.write_all(
        format!(
            "POST /v1/sign?filename=cut.exe HTTP/1.1\r\nHost: signet\r\nContent-Length: {}\r\n\r\n",
            pe.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&pe[..pe.len() / 2]).unwrap();
    // Ids count up from 1 in a fresh state directory.
    wait_job(&tcp, "1", "receiving", |v| v["state"] == "receiving");
    w.kill("signetd");
    drop(s);

    // Whoever follows the jobs on the bus hears of the one the restart ended.
    let mut finished = super::dbus::Signals::follow(&bus.address, "JobFinished");
    let tcp = w.restart_daemon().remove(1);
    let signal = finished.wait("job 1 ended by the restart", |j| j["signal_arg0"] == "1");
    assert_eq!(signal["signal_arg1"], "failed", "{signal}");
    let view = wait_job(&tcp, "1", "failed", |v| v["state"] == "failed");
    assert_eq!(view["error"]["code"], "truncated_input", "{view:#}");
    assert!(
        view["error"]["message"]
            .as_str()
            .unwrap()
            .contains("restarted while this file was being uploaded"),
        "{view:#}"
    );
    assert!(spool_files(&w).is_empty(), "{:?}", spool_files(&w));
    let (status, signed) = call(&tcp, "POST", "/v1/sign?filename=next.exe", pe);
    assert_eq!(status, 200, "{signed}");
    let records = w.audit_records();
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(
        (&records[0]["job"], &records[0]["result"]),
        (&"1".into(), &"failed".into())
    );
    assert_eq!(records[1]["result"], "signed");
    assert_eq!(w.signetd(&["audit", "verify"]).status.code(), Some(0));
}

#[test]
fn a_profile_signs_only_with_the_token_and_certificate_it_names() {
    let mut w = World::new();
    let (unix, _) = appliance(&mut w, "", "");
    let (_, s) = call_json(&unix, "GET", "/v1/status", None);
    let health = &s["agent"]["health"];
    let serial = health["token"]["serial"].as_str().unwrap().to_owned();
    let fp = health["certificates"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    // As openssl prints it: upper case, colons.
    let openssl_fp = fp
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    w.stop("signetd");
    let agent = Endpoint::Unix(w.path("agent.sock"));
    let unix = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            &format!(
                "default_profile = \"pinned\"\n[profiles.pinned]\ntoken = \"{serial}\"\ncertificate = \"{openssl_fp}\"\n\
                 [profiles.elsewhere]\ntoken = \"not-this-one\"\n[queue]\njob_deadline_seconds = 1\n"
            ),
        )
        .remove(0);

    let file = w.pe("pinned.exe");
    let out = signet(&unix, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);

    let other = w.pe("elsewhere.exe");
    let out = signet(
        &unix,
        &["sign", "--profile", "elsewhere", other.to_str().unwrap()],
    );
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("token"), "{}", stderr(&out));
    assert!(!verify(&w, &other).0, "nothing was signed");
    assert!(
        w.log("signetd").contains(&format!(
            "signs only with token \"not-this-one\", and the signing VM has token \"{serial}\""
        )),
        "{}",
        w.log("signetd")
    );

    let records = w.audit_records();
    let signed = records.iter().find(|r| r["result"] == "signed").unwrap();
    assert_eq!(
        (&signed["token_serial"], &signed["cert_sha256"]),
        (&serial.clone().into(), &fp.clone().into()),
        "{signed}"
    );
    let failed = records
        .iter()
        .find(|r| r["profile"] == "elsewhere")
        .unwrap();
    assert_eq!(failed["error"], "token_unavailable", "{failed}");
}

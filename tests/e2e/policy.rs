//! Caller identity, grants and request limits, and bad input of every kind: each gets
//! a clear error, and the daemon goes on serving the next request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::*;

/// An appliance whose daemon listens on a unix socket and on loopback TCP with
/// `config` (grants, limits, profiles) after its `listen` and `agent` lines.
/// Answers the unix endpoint, the TCP endpoint and the world.
fn appliance(config: &str) -> (Endpoint, Endpoint, World) {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let mut eps = w.start_daemon_config(&format!(
        "listen = [\"unix:{}\", \"tcp:127.0.0.1:0\"]\nagent = \"{agent}\"\n{config}",
        w.path("signetd.sock").display()
    ));
    let tcp = eps.remove(1);
    (eps.remove(0), tcp, w)
}

fn tcp_addr(ep: &Endpoint) -> String {
    let Endpoint::Tcp { host, port } = ep else {
        panic!("{ep}")
    };
    format!("{host}:{port}")
}

/// Sends `head` (request line and headers, without the blank line) and `body` raw,
/// then `finish` decides what happens to the connection; answers what the daemon sent.
fn raw(ep: &Endpoint, head: &str, body: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(tcp_addr(ep)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(format!("{head}\r\nHost: signet\r\n\r\n").as_bytes())
        .unwrap();
    let _ = s.write_all(body);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The daemon still signs: the proof that a bad request did not hurt it.
fn still_signs(w: &World, ep: &Endpoint, profile: &str) {
    let file = w.pe(&format!("after-{}.exe", std::process::id()));
    let out = signet(ep, &["sign", "--profile", profile, file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(w, &file).0);
}

/// Waits until the daemon's log has `needle` (a condition, not a timer).
fn wait_for_log(w: &World, needle: &str) {
    let started = Instant::now();
    while !w.log("signetd").contains(needle) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no {needle:?} in the daemon's log:\n{}",
            w.log("signetd")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const PROFILES: &str = r#"default_profile = "open"
[profiles.open]
description = "Signet test"
[profiles.release]
description = "Signet test"
[profiles.small]
max_input_size = 1000
"#;

#[test]
fn refused_callers_are_told_who_they_are_and_which_profile() {
    let (unix, tcp, w) = appliance(&format!(
        "{PROFILES}[[grants]]\ncallers = [\"uid:0\"]\nprofiles = [\"open\", \"small\"]\n\
         [[grants]]\ncallers = [\"uid:4242\", \"vm:104\"]\nprofiles = [\"release\"]\n"
    ));
    let file = w.pe("app.exe");
    let before = std::fs::read(&file).unwrap();

    // Local root has no grant for "release".
    let out = signet(
        &unix,
        &["sign", "--profile", "release", file.to_str().unwrap()],
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("local uid 0") && err.contains("\"release\"") && err.contains("uid:0"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before, "nothing was written");
    // Digest mode asks for the profile's options first: refused the same way.
    let out = signet(
        &unix,
        &[
            "sign",
            "--digest",
            "--profile",
            "release",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("\"release\""), "{}", stderr(&out));
    let (status, body) = call(&unix, "GET", "/v1/profile?profile=release", vec![]);
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert!(
        w.log("signetd").contains("refused") && w.log("signetd").contains("key=uid:0"),
        "the refusal is recorded: {}",
        w.log("signetd")
    );

    // A plain TCP peer proves nothing and may use no profile.
    let (status, body) = call(&tcp, "POST", "/v1/sign?profile=open", b"MZ".to_vec());
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "forbidden");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("unauthenticated TCP peer 127.0.0.1:") && msg.contains("\"open\""),
        "{msg}"
    );

    // An unknown profile is not a refusal but a mistake, with the list of profiles.
    let out = signet(
        &unix,
        &["sign", "--profile", "relaese", file.to_str().unwrap()],
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("relaese") && stderr(&out).contains("open, release, small"),
        "{}",
        stderr(&out)
    );

    still_signs(&w, &unix, "open");
}

#[test]
fn oversize_inputs_are_refused_by_length_and_as_they_stream() {
    let (unix, tcp, w) = appliance(&format!(
        "insecure_tcp_as = \"loopback\"\n{PROFILES}[[grants]]\ncallers = [\"uid:0\", \"client:loopback\"]\nprofiles = [\"*\"]\n"
    ));
    // Content-Length above the profile's limit: refused before anything is relayed.
    let file = w.pe("big.exe");
    let out = signet(
        &unix,
        &["sign", "--profile", "small", file.to_str().unwrap()],
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("larger than this profile's limit of 1000 bytes"),
        "{}",
        stderr(&out)
    );

    // Chunked, without a length: cut off when the stream passes the limit.
    let chunk = format!("258\r\n{}\r\n", "A".repeat(0x258));
    let answer = raw(
        &tcp,
        "POST /v1/sign?profile=small HTTP/1.1\r\nTransfer-Encoding: chunked",
        format!("{chunk}{chunk}0\r\n\r\n").as_bytes(),
        false,
    );
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("input_too_large"),
        "{answer}"
    );
    still_signs(&w, &unix, "open");
}

#[test]
fn malformed_requests_and_unsupported_input_get_clear_errors() {
    let (unix, tcp, w) = appliance(&format!(
        "insecure_tcp_as = \"loopback\"\n{PROFILES}[[grants]]\ncallers = [\"uid:0\", \"client:loopback\"]\nprofiles = [\"*\"]\n"
    ));
    // Malformed query.
    let (status, body) = call(&tcp, "POST", "/v1/sign?mode=sideways", b"MZ".to_vec());
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "bad_request");
    assert!(body["message"].as_str().unwrap().contains("mode"), "{body}");
    // Not a format Signet signs (the content decides, not the name).
    let (status, body) = call(
        &tcp,
        "POST",
        "/v1/sign?filename=app.exe",
        b"just some text, not a program".to_vec(),
    );
    assert_eq!(status, 415, "{body}");
    assert_eq!(body["code"], "unsupported_format");
    // Wrong content type: a batch must be multipart.
    let answer = raw(
        &tcp,
        "POST /v1/batch HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2",
        b"MZ",
        false,
    );
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("multipart/form-data"),
        "{answer}"
    );
    // A single file's content type is not looked at: the content decides.
    let pe = std::fs::read(w.pe("typed.exe")).unwrap();
    let answer = raw(
        &tcp,
        &format!(
            "POST /v1/sign HTTP/1.1\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close",
            pe.len()
        ),
        &pe,
        false,
    );
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..200.min(answer.len())]
    );
    still_signs(&w, &unix, "open");
}

#[test]
fn truncated_and_abandoned_uploads_do_not_hurt_the_daemon() {
    let (unix, tcp, w) = appliance(&format!(
        "insecure_tcp_as = \"loopback\"\n{PROFILES}[[grants]]\ncallers = [\"uid:0\", \"client:loopback\"]\nprofiles = [\"*\"]\n"
    ));
    let pe = std::fs::read(w.pe("cut.exe")).unwrap();
    let head = format!("POST /v1/sign HTTP/1.1\r\nContent-Length: {}", pe.len());
    // Half the announced length, then the client says it is done sending.
    let answer = raw(&tcp, &head, &pe[..pe.len() / 2], true);
    assert!(
        answer.starts_with("HTTP/1.1 422") && answer.contains("truncated_input"),
        "{answer}"
    );
    // Half, then the connection is dropped outright.
    {
        let mut s = TcpStream::connect(tcp_addr(&tcp)).unwrap();
        s.write_all(format!("{head}\r\nHost: signet\r\n\r\n").as_bytes())
            .unwrap();
        s.write_all(&pe[..pe.len() / 2]).unwrap();
    }
    still_signs(&w, &unix, "open");
    assert!(
        !w.log("signetd").contains("panicked"),
        "{}",
        w.log("signetd")
    );
}

#[test]
fn slow_clients_are_cut_off_and_a_caller_at_its_job_limit_is_not_refused() {
    let (unix, tcp, w) = appliance(&format!(
        "insecure_tcp_as = \"loopback\"\n{PROFILES}[limits]\nheader_timeout_seconds = 1\nbody_idle_timeout_seconds = 1\nmax_jobs_per_caller = 1\n\
         [[grants]]\ncallers = [\"uid:0\", \"client:loopback\"]\nprofiles = [\"*\"]\n"
    ));
    // Headers that never end: the connection is closed.
    let mut s = TcpStream::connect(tcp_addr(&tcp)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(b"POST /v1/sign HTTP/1.1\r\nHost: signet\r\n")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 408"),
        "closed without serving: {out}"
    );

    // A body that stops coming: abandoned with an error that says so.
    let pe = std::fs::read(w.pe("slow.exe")).unwrap();
    let mut slow = TcpStream::connect(tcp_addr(&tcp)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    slow.write_all(
        format!(
            "POST /v1/sign HTTP/1.1\r\nHost: signet\r\nContent-Length: {}\r\n\r\n",
            pe.len()
        )
        .as_bytes(),
    )
    .unwrap();
    slow.write_all(&pe[..100]).unwrap();
    wait_for_log(&w, "job accepted");
    // While it uploads, the same caller sends another: queued and signed, not refused
    // (its limit bounds its jobs at the agent, not what it sends).
    let (status, body) = call(&tcp, "POST", "/v1/sign", pe.clone());
    assert_eq!(status, 200, "{body}");
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains("truncated_input") && answer.contains("sent nothing for 1 s"),
        "{answer}"
    );
    // Other callers were never affected.
    still_signs(&w, &unix, "open");
    let (status, _) = call(&tcp, "POST", "/v1/sign", pe);
    assert_eq!(status, 200);
}

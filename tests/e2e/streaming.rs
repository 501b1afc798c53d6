//! A signed file streamed to its waiting client while signetd spools it from the agent:
//! the answer's end is withheld until the job is `signed` with its audit record, and a
//! job whose result breaks off mid-stream leaves the client with no file (it collects
//! again: an error, or the result of the job run again), never a truncated one.
//!
//! A relay of the tests' own between signetd and the agent holds the agent's answer
//! at a given byte and then passes it on or cuts the connection there, so that the
//! tests reach each moment by its condition, not by time. The agent signs with
//! osslsigncode, whose signed file comes back whole (the native engine's PE comes back
//! as what signing changed, and signetd makes the file: `native`).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

use serde_json::Value;

use super::*;

/// What the relay does with the connection it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Nothing armed.
    Off,
    /// The next connection whose answer passes this many bytes is held there.
    At(u64),
    /// A connection is held.
    Held,
    /// Let it go on.
    Go,
    /// Cut it (both ways).
    Cut,
}

/// A unix-socket relay from `listen` to `upstream` (the agent), both ways, that can
/// hold one connection's upstream-to-client bytes at a given count.
struct Relay {
    state: Arc<(Mutex<Hold>, Condvar)>,
    listen: PathBuf,
}

impl Relay {
    fn start(listen: &Path, upstream: &Path) -> Relay {
        let listener = UnixListener::bind(listen).unwrap();
        let state = Arc::new((Mutex::new(Hold::Off), Condvar::new()));
        let st = Arc::clone(&state);
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(down) = conn else { return };
                let Ok(up) = UnixStream::connect(&upstream) else {
                    return;
                };
                let (down2, up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let (mut down, mut up) = (down2, up2);
                    let _ = std::io::copy(&mut down, &mut up);
                    let _ = up.shutdown(std::net::Shutdown::Both);
                });
                let st = Arc::clone(&st);
                std::thread::spawn(move || answer(up, down, &st));
            }
        });
        Relay {
            state,
            listen: listen.to_owned(),
        }
    }

    /// The next connection whose answer passes `at` bytes is held there.
    fn arm(&self, at: u64) {
        *self.state.0.lock().unwrap() = Hold::At(at);
    }

    /// Waits until a connection is held.
    fn wait_held(&self) {
        let (m, cv) = &*self.state;
        let (_g, timeout) = cv
            .wait_timeout_while(m.lock().unwrap(), WAIT_TIMEOUT, |h| *h != Hold::Held)
            .unwrap();
        assert!(!timeout.timed_out(), "no answer was ever held");
    }

    fn decide(&self, what: Hold) {
        let (m, cv) = &*self.state;
        *m.lock().unwrap() = what;
        cv.notify_all();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.decide(Hold::Cut);
        let _ = std::fs::remove_file(&self.listen);
    }
}

/// Copies the upstream's answer to the client, held as the relay says.
fn answer(mut up: UnixStream, mut down: UnixStream, st: &(Mutex<Hold>, Condvar)) {
    let mut buf = vec![0u8; 64 << 10];
    let mut passed = 0u64;
    loop {
        let n = match up.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut from = 0;
        let (m, cv) = st;
        let mut h = m.lock().unwrap();
        if let Hold::At(at) = *h {
            if passed + n as u64 > at {
                let first = (at - passed) as usize;
                if down.write_all(&buf[..first]).is_err() {
                    break;
                }
                from = first;
                *h = Hold::Held;
                cv.notify_all();
                h = cv.wait_while(h, |h| *h == Hold::Held).unwrap();
                if *h == Hold::Cut {
                    *h = Hold::Off;
                    let _ = up.shutdown(std::net::Shutdown::Both);
                    let _ = down.shutdown(std::net::Shutdown::Both);
                    return;
                }
                *h = Hold::Off;
            }
        }
        drop(h);
        if down.write_all(&buf[from..n]).is_err() {
            break;
        }
        passed += n as u64;
    }
    let _ = down.shutdown(std::net::Shutdown::Both);
}

/// Agent and daemon on unix sockets, the daemon reaching the agent through a
/// [`Relay`]; `queue` is the daemon's `[queue]` table's body.
fn appliance(w: &mut World, queue: &str) -> (Endpoint, Relay) {
    let pin = w.path("pin");
    let agent_sock = w.path("agent.sock");
    // osslsigncode's signed file comes back whole, which the relay holds; a PE the
    // native engine signs comes back as what signing changed, a few KiB.
    w.start_agent_with(
        &format!("unix:{}", agent_sock.display()),
        SOFTHSM,
        &pin,
        &[],
        "[signer]\nbackend = \"osslsigncode\"\n",
    );
    let relay = Relay::start(&w.path("relay.sock"), &agent_sock);
    let relayed: Endpoint = format!("unix:{}", w.path("relay.sock").display())
        .parse()
        .unwrap();
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &relayed,
            &format!("[profiles.release]\ndescription = \"Signet test\"\n[queue]\n{queue}\n"),
        )
        .remove(0);
    (ep, relay)
}

/// A PE of 6 MiB in its own directory (where `signet` keeps what it receives).
fn big_pe(w: &World) -> PathBuf {
    std::fs::create_dir_all(w.path("work")).unwrap();
    let pe = w.path("work/big.exe");
    let made = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/make-pe.sh"))
        .arg(&pe)
        .arg((6 << 20).to_string())
        .status()
        .unwrap();
    assert!(made.success());
    pe
}

/// `signet sign FILE` running; killed if the test ends before it.
struct Running(Option<Child>);

impl Running {
    fn start(ep: &Endpoint, file: &Path) -> Running {
        let child = Command::new(bin("signet"))
            .env("SIGNET_ENDPOINT", ep.to_string())
            .env_remove("SIGNET_CONFIG")
            .env("SIGNET_PROFILE_CACHE", "off")
            .args(["sign", file.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Running(Some(child))
    }

    fn finish(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many bytes of the result `signet` has written to its work file beside `file`.
fn received(file: &Path) -> u64 {
    let Ok(dir) = std::fs::read_dir(file.parent().unwrap()) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".signet-"))
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// The only job's view (`GET /v1/jobs/1`).
fn the_job(ep: &Endpoint) -> Value {
    let (status, v) = call_json(ep, "GET", "/v1/jobs/1", None);
    assert_eq!(status, 200, "{v:#}");
    v
}

/// Where the agent's answer is held: past the first MiB of the signed file.
const HOLD_AT: u64 = 3 << 20;

#[test]
fn a_result_streams_to_its_waiting_client_before_the_job_is_signed_and_verifies() {
    let mut w = World::new();
    let (ep, relay) = appliance(&mut w, "");
    let pe = big_pe(&w);
    relay.arm(HOLD_AT);
    let run = Running::start(&ep, &pe);
    relay.wait_held();
    // The client has the first of the signed file while the job is not signed yet.
    wait_until("the client receives the result as it is spooled", || {
        received(&pe) >= 1 << 20
    });
    let job = the_job(&ep);
    assert_eq!(job["state"], "running", "{job:#}");
    assert_eq!(job["filename"], "big.exe", "{job:#}");
    assert!(w.audit_records().iter().all(|r| r["result"] != "signed"));
    // An HTTP/1.0 caller, whose answer would end with the connection, waits for the
    // job's end and gets a length.
    let mut old = UnixStream::connect(w.path("signetd.sock")).unwrap();
    old.write_all(b"GET /v1/jobs/1/result HTTP/1.0\r\nHost: signetd\r\n\r\n")
        .unwrap();
    let old = std::thread::spawn(move || {
        let mut answer = Vec::new();
        old.read_to_end(&mut answer).unwrap();
        answer
    });
    relay.decide(Hold::Go);

    let out = run.finish();
    assert!(out.status.success(), "{}", stderr(&out));
    let (ok, text) = verify(&w, &pe);
    assert!(ok, "{text}");
    let answer = old.join().unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(!head.contains("chunked"), "{head}");
    let signed = std::fs::read(&pe).unwrap();
    assert!(
        head.contains(&format!("content-length: {}", signed.len())),
        "{head}"
    );
    assert!(answer[split + 4..] == signed[..]);
    // What the client kept is the job's result, as collected again.
    let (status, again) = fetch(&ep, "/v1/jobs/1/result");
    assert_eq!(status, 200);
    assert_eq!(std::fs::read(&pe).unwrap(), again);
    let signed: Vec<_> = w
        .audit_records()
        .into_iter()
        .filter(|r| r["result"] == "signed")
        .collect();
    assert_eq!(signed.len(), 1, "{signed:#?}");
    assert_eq!(signed[0]["job"], "1");
    assert_eq!(the_job(&ep)["attempts"], 1);
    // Nothing of the client's is left beside the file.
    let left: Vec<_> = std::fs::read_dir(pe.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["big.exe"]);
}

#[test]
fn a_job_that_fails_while_its_result_streams_leaves_its_client_no_file_and_an_error() {
    let mut w = World::new();
    // No time to wait for the agent: the job fails at the first break.
    let (ep, relay) = appliance(&mut w, "job_deadline_seconds = 0");
    let pe = big_pe(&w);
    let original = std::fs::read(&pe).unwrap();
    relay.arm(HOLD_AT);
    let run = Running::start(&ep, &pe);
    relay.wait_held();
    wait_until("the client receives the result as it is spooled", || {
        received(&pe) >= 1 << 20
    });
    relay.decide(Hold::Cut);

    let out = run.finish();
    assert!(!out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the signed file broke off; collecting job 1 again"),
        "{err}"
    );
    assert!(err.contains("nothing was delivered"), "{err}");
    assert!(err.contains("big.exe"), "{err}");
    // The file is as it was, and nothing of the broken answer is left beside it.
    assert_eq!(std::fs::read(&pe).unwrap(), original);
    let left: Vec<_> = std::fs::read_dir(pe.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["big.exe"]);
    let job = the_job(&ep);
    assert_eq!(job["state"], "failed", "{job:#}");
    assert!(w.audit_records().iter().all(|r| r["result"] != "signed"));
    let (status, body) = fetch(&ep, "/v1/jobs/1/result");
    assert_ne!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn a_result_broken_off_mid_stream_is_collected_again_from_the_job_run_again() {
    let mut w = World::new();
    let (ep, relay) = appliance(&mut w, "");
    let pe = big_pe(&w);
    relay.arm(HOLD_AT);
    let run = Running::start(&ep, &pe);
    relay.wait_held();
    wait_until("the client receives the result as it is spooled", || {
        received(&pe) >= 1 << 20
    });
    relay.decide(Hold::Cut);

    // The job goes back to its queue and runs again; the client collects that result.
    let out = run.finish();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the signed file broke off; collecting job 1 again"),
        "{}",
        stderr(&out)
    );
    let (ok, text) = verify(&w, &pe);
    assert!(ok, "{text}");
    let (status, again) = fetch(&ep, "/v1/jobs/1/result");
    assert_eq!(status, 200);
    assert_eq!(std::fs::read(&pe).unwrap(), again);
    let job = the_job(&ep);
    assert_eq!(
        (&job["state"], &job["attempts"]),
        (&"signed".into(), &2.into())
    );
    let signed = w
        .audit_records()
        .into_iter()
        .filter(|r| r["result"] == "signed")
        .count();
    assert_eq!(signed, 1);
    let left: Vec<_> = std::fs::read_dir(pe.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["big.exe"]);
}

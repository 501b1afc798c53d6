//! A host shutdown announced by logind: the daemon holds a delay inhibitor, stops
//! taking jobs when `PrepareForShutdown(true)` comes, lets the job at the token end,
//! releases the inhibitor, and after the "boot" the queued job is signed.
//!
//! There is no logind on these machines: `StandInLogind` serves the two parts of
//! `org.freedesktop.login1.Manager` the daemon uses (`Inhibit`, `PrepareForShutdown`)
//! on a private bus, and tells when an inhibitor's descriptor is closed, as logind does.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(120);

/// A private session-style bus, stopped on drop.
struct PrivateBus {
    address: String,
    pid: i32,
}

impl PrivateBus {
    fn start(w: &World) -> PrivateBus {
        let out = Command::new("dbus-daemon")
            .args([
                "--session",
                "--fork",
                "--print-address=1",
                "--print-pid=1",
                "--nopidfile",
            ])
            .arg(format!(
                "--address=unix:path={}",
                w.path("logind-bus.sock").display()
            ))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "dbus-daemon: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let address = lines.next().unwrap().to_owned();
        let pid = lines.next().unwrap().trim().parse().unwrap();
        PrivateBus { address, pid }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// One inhibitor handed out: its arguments, and a message when it is released.
struct Inhibitor {
    args: [String; 4],
    released: mpsc::Receiver<()>,
}

/// The stand-in for logind's manager object.
#[derive(Clone, Default)]
struct StandInLogind {
    inhibitors: Arc<Mutex<Vec<Inhibitor>>>,
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl StandInLogind {
    /// As logind: the caller gets one end of a pipe; its closing releases the lock.
    async fn inhibit(
        &self,
        what: String,
        who: String,
        why: String,
        mode: String,
    ) -> zbus::fdo::Result<zbus::OwnedFd> {
        let (r, w) = nix::unistd::pipe().map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        let (tx, released) = mpsc::channel();
        std::thread::spawn(move || {
            let mut f = std::fs::File::from(r);
            let mut b = [0u8; 16];
            while f.read(&mut b).is_ok_and(|n| n > 0) {}
            let _ = tx.send(());
        });
        self.inhibitors.lock().unwrap().push(Inhibitor {
            args: [what, who, why, mode],
            released,
        });
        Ok(zbus::OwnedFd::from(w))
    }
}

#[test]
fn a_host_shutdown_drains_the_token_then_releases_logind_and_the_queue_survives() {
    let mut w = World::new();
    let bus = PrivateBus::start(&w);
    let logind = StandInLogind::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let conn = rt
        .block_on(
            zbus::connection::Builder::address(bus.address.as_str())
                .name("org.freedesktop.login1")
                .serve_at("/org/freedesktop/login1", logind.clone())
                .build(),
        )
        .unwrap();

    let signer = HeldSigner::new(&w);
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        &signer.agent_config(),
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            &format!(
                "[profiles.release]\ndescription = \"Signet test\"\n[shutdown]\nlogind = \"{}\"\ngrace_seconds = 600\n",
                bus.address
            ),
        )
        .remove(0);
    let inhibitors = logind.inhibitors.clone();
    wait_until("the daemon takes an inhibitor", || {
        !inhibitors.lock().unwrap().is_empty()
    });
    {
        let taken = inhibitors.lock().unwrap();
        let [what, who, _, mode] = &taken[0].args;
        assert_eq!(
            (what.as_str(), who.as_str(), mode.as_str()),
            ("shutdown", "Signet", "delay")
        );
    }

    // Job 1 at the token (held), job 2 waiting behind it.
    let pe = std::fs::read(w.pe("s.exe")).unwrap();
    let first = sign_async(&ep, "s.exe", &pe);
    wait_until("the first job runs", || signer.held.exists());
    let second = sign_async(&ep, "s.exe", &pe);

    rt.block_on(conn.emit_signal(
        None::<()>,
        "/org/freedesktop/login1",
        "org.freedesktop.login1.Manager",
        "PrepareForShutdown",
        &(true,),
    ))
    .unwrap();
    wait_until("the daemon stops taking jobs", || {
        w.log("signetd").contains("taking no new jobs")
    });
    let (status, body) = call(&ep, "POST", "/v1/sign", pe.clone());
    assert_eq!(
        (status, &body["code"]),
        (503, &"shutting_down".into()),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("send it again"),
        "{body}"
    );
    // The shutdown waits for the job at the token.
    assert!(
        inhibitors.lock().unwrap()[0].released.try_recv().is_err(),
        "released while a job is at the token"
    );
    signer.release();
    inhibitors.lock().unwrap()[0]
        .released
        .recv_timeout(TIMEOUT)
        .expect("the inhibitor is released once the job has ended");
    let (status, _) = call_json(&ep, "GET", &format!("/v1/jobs/{first}"), None);
    assert_eq!(status, 200);
    let (_, view) = call_json(&ep, "GET", &format!("/v1/jobs/{second}"), None);
    assert_eq!(
        view["state"], "queued",
        "the next job waits for the boot: {view}"
    );

    // The host goes down and comes back: the queue resumes, a new inhibitor is held.
    w.kill("signetd");
    let ep = w.restart_daemon().remove(0);
    for id in [&first, &second] {
        let (status, body) = fetch(&ep, &format!("/v1/jobs/{id}/result"));
        assert_eq!(status, 200, "job {id}: {}", String::from_utf8_lossy(&body));
        let f = w.file(&format!("job-{id}.exe"), &body);
        assert!(verify(&w, &f).0, "job {id}");
    }
    wait_until("a new inhibitor after the boot", || {
        inhibitors.lock().unwrap().len() == 2
    });
    drop(conn);
    rt.shutdown_background();
}

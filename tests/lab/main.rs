//! The full-system lab (`make lab-test`): the real `signetd` on the host and the real
//! `signet-agent` in a signing VM — a Debian 12 guest under QEMU TCG
//! (`lab/build-image.sh`) — with no stand-in between them:
//!
//! - the guest's vsock is a `vhost-user-vsock-pci` device served by
//!   `vhost-device-vsock`; `signetd` reaches the agent through its unix socket
//!   (`vsock-uds:RUN/vm.vsock:7711,cid=105`, the hybrid-vsock handshake);
//! - the token is QEMU's emulated smart card (`usb-ccid` + `ccid-card-emulated` over an
//!   NSS database, `lab/mk-nssdb.sh`), which `signetd` hot-plugs through Signet's own
//!   monitor socket when its token service sees the token appear on the host. Host-side
//!   USB presence is the one stand-in: `signetd` runs inside a umockdev testbed
//!   (`tests/fixtures/umockdev-driver.py`) that plugs a fake SafeNet token when the
//!   test says — there is no USB token on these machines;
//! - the build VM is a host process: `signet sign` connects to `RUN/build.vsock_7710`,
//!   the socket on which `vhost-device-vsock` would deliver a guest's connections to
//!   the host's port 7710, and `signetd` takes it as the build VM with CID 106. A
//!   second TCG guest would double the CPU a lab run needs on CI's two cores for no
//!   additional path through Signet: the daemon's side of that socket is the same.
//!
//! The test also holds a second QMP monitor on the guest, standing for qemu-server's
//! and for whoever pulls the token from outside Signet. Each scenario prints its time
//! to recovery (`LAB-TIMING` lines; docs/BENCHMARKS.md). If QEMU, the image or
//! vhost-device-vsock cannot be had, the tests fail and say why.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use signet_test_support::*;
use signetd::adapters::qmp::{Monitor, MonitorEvent, Qmp};

/// The signing VM: its VMID and vsock CID (Signet's convention: CID = VMID).
const VM: u32 = 105;
/// The build VM's CID, as the stand-in's socket path claims it.
const BUILD_VM: u32 = 106;
/// The token's serial on the host (the umockdev device's).
const SERIAL: &str = "LAB0TOKEN1";
/// The emulated card's PIN (its NSS database's password).
const CARD_PIN: &str = "123456";
/// A guest boot, under TCG on a busy machine, with room to spare.
const BOOT: Duration = Duration::from_secs(240);
/// Anything else the lab waits for (an attach, a login, a queue to drain).
const LONG: Duration = Duration::from_secs(180);
/// How often the lab asks signetd how things are (each ask reaches into the guest).
const EVERY: Duration = Duration::from_millis(250);
/// The host's directory (in the VM's run directory) behind the guest's
/// `/var/lib/signet-agent`, the agent's `state_dir`.
const AGENT_STATE: &str = "agent-state";
/// The agent's state directory in the guest (its default `state_dir`).
const GUEST_STATE_DIR: &str = "/var/lib/signet-agent";
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The signing VM's image, built (or found in its cache) once per test process.
fn image() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("lab/build-image.sh"))
            .arg(bin("signet-agent"))
            .stdin(Stdio::null())
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "lab/build-image.sh failed; the lab needs its signing-VM image:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// `vhost-device-vsock`, built by `scripts/install-deps.sh`.
fn vhost_device_vsock() -> PathBuf {
    let p = repo().join("target/lab/vhost/bin/vhost-device-vsock");
    assert!(
        p.exists(),
        "{} is missing: the lab needs it for the guest's vsock; run scripts/install-deps.sh (make deps)",
        p.display()
    );
    p
}

/// A child process killed by its PID with SIGKILL on drop (QEMU may hang in a
/// `device_del`; nothing here waits on it politely).
struct Proc(Option<Child>);

impl Proc {
    fn none() -> Proc {
        Proc(None)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(Some(
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}")),
    ))
}

/// The signing VM: QEMU with the guest, its vsock backend, Signet's monitor in
/// `monitors/` and the test's own monitor.
struct Guest {
    qemu: Proc,
    vhost: Proc,
    run: PathBuf,
    signet_monitor: PathBuf,
    rt: tokio::runtime::Runtime,
    look: Monitor,
    qmp: Arc<Qmp>,
}

/// Starts `vhost-device-vsock` and QEMU for the guest in `run`; QEMU's console log,
/// agent log (its second serial port) and stderr go to `run`. The agent's state
/// directory in the guest is `run/agent-state`, shared over virtio-9p: it stays across
/// resets and restarts, as a signing VM's disk does.
fn launch(run: &Path, signet_monitor: &Path, test_monitor: &Path) -> (Proc, Proc) {
    let img = image().to_owned();
    let state = run.join(AGENT_STATE);
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let vhost_sock = run.join("vhost.sock");
    let vhost = spawn(
        "vhost-device-vsock",
        Command::new(vhost_device_vsock()).arg("--vm").arg(format!(
            "guest-cid={VM},socket={},uds-path={}",
            vhost_sock.display(),
            run.join("vm.vsock").display()
        )),
        &run.join("vhost.log"),
    );
    wait_until_within(
        "vhost-device-vsock's socket",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || vhost_sock.exists(),
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-name", "signet-lab", "-accel", "tcg,tb-size=64"])
        .args(["-machine", "q35", "-cpu", "max", "-smp", "1"])
        .args(["-nodefaults", "-nographic", "-display", "none"])
        .arg("-kernel")
        .arg(img.join("vmlinuz"))
        .arg("-initrd")
        .arg(img.join("initrd.cpio"))
        .args(["-append", "console=ttyS0 rdinit=/init panic=-1 loglevel=4"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=con,path={},server=on,wait=off,logfile={}",
            run.join("console.sock").display(),
            run.join("console.log").display()
        ))
        .args(["-serial", "chardev:con"])
        .arg("-chardev")
        .arg(format!(
            "file,id=agentlog,path={}",
            run.join("agent.log").display()
        ))
        .args(["-serial", "chardev:agentlog"])
        .args(["-device", "piix3-usb-uhci,id=uhci"])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=signetstate,security_model=none,id=agentstate",
            state.display()
        ))
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-m",
            "512M",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=vsk,path={}", vhost_sock.display()))
        .args(["-device", "vhost-user-vsock-pci,chardev=vsk"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=signet,path={},server=on,wait=off",
            signet_monitor.display()
        ))
        .args(["-mon", "chardev=signet,mode=control"])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            test_monitor.display()
        ));
    let qemu = spawn(
        "qemu-system-x86_64 (scripts/install-deps.sh installs it)",
        &mut cmd,
        &run.join("qemu.log"),
    );
    (qemu, vhost)
}

impl Guest {
    fn start(w: &World) -> Guest {
        let run = w.path("vm");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(w.path("monitors")).unwrap();
        let signet_monitor = signetd::adapters::proxmox::monitor_path(&w.path("monitors"), VM);
        let test_monitor = run.join("test.qmp");
        let (qemu, vhost) = launch(&run, &signet_monitor, &test_monitor);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (look, qmp) = rt.block_on(async {
            let mut m = Monitor::start(test_monitor, Duration::from_secs(10));
            tokio::time::timeout(Duration::from_secs(60), async {
                while m.next().await != Some(MonitorEvent::Connected) {}
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "QEMU's monitor never answered; qemu.log:\n{}",
                    std::fs::read_to_string(run.join("qemu.log")).unwrap_or_default()
                )
            });
            let q = m.qmp().unwrap();
            (m, q)
        });
        let mut guest = Guest {
            qemu,
            vhost,
            run,
            signet_monitor,
            rt,
            look,
            qmp,
        };
        guest.wait_console("GUEST-READY", 1);
        guest
    }

    /// Kills QEMU and its vsock backend (SIGKILL, as a crashed host process) and starts
    /// both again with the same sockets, as `qm stop` + `qm start` would; the emulated
    /// reader is gone with the old QEMU. Returns once the guest is up again.
    fn restart(&mut self) {
        drop(std::mem::replace(&mut self.qemu, Proc::none()));
        drop(std::mem::replace(&mut self.vhost, Proc::none()));
        for f in ["vhost.sock", "vm.vsock"] {
            let _ = std::fs::remove_file(self.run.join(f));
        }
        let (qemu, vhost) = launch(&self.run, &self.signet_monitor, &self.run.join("test.qmp"));
        self.qemu = qemu;
        self.vhost = vhost;
        // The test's monitor reconnects by itself; take its new connection.
        let look = &mut self.look;
        self.qmp = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    if look.next().await == Some(MonitorEvent::Connected) {
                        return look.qmp().unwrap();
                    }
                }
            })
            .await
            .expect("QEMU's monitor after the restart")
        });
        self.wait_console("GUEST-READY", 1);
    }

    /// Resets the guest through the test's own monitor (`system_reset`, as `qm reset`
    /// or a guest that crashed and rebooted would); the same QEMU, its devices — the
    /// emulated reader too — and its vsock backend stay. Returns once the guest is up
    /// again.
    fn reset(&mut self) {
        let booted = self.console().matches("GUEST-READY").count();
        self.rt
            .block_on(self.qmp.execute("system_reset", None))
            .expect("system_reset on the test's monitor");
        self.wait_console("GUEST-READY", booted + 1);
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.run.join("console.log")).unwrap_or_default()
    }

    /// Waits until `marker` has appeared `count` times on the guest's console.
    fn wait_console(&mut self, marker: &str, count: usize) -> Duration {
        let log = self.run.join("console.log");
        let qemu = &mut self.qemu;
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches(marker).count() >= count {
                return started.elapsed();
            }
            if let Some(status) = qemu.0.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "QEMU exited ({status}) before {marker}; console:\n{text}\nqemu.log:\n{}",
                    std::fs::read_to_string(self.run.join("qemu.log")).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < BOOT,
                "no {marker} on the guest's console within {BOOT:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the token's reader is in the VM, as QEMU says (`qom-get … attached`).
    fn reader_attached(&self) -> bool {
        let id = signetd::core::passthrough::device_id(SERIAL);
        self.rt
            .block_on(self.qmp.attached(&id))
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.run.join("agent.log")).unwrap_or_default()
    }

    /// Signatures the agent made (its log line for each).
    fn signatures(&self) -> usize {
        self.agent_log()
            .lines()
            .filter(|l| l.contains(": signed file="))
            .count()
    }

    /// Runs a shell command in the guest over its serial console; answers its output.
    fn shell(&self, command: &str) -> String {
        self.shell_status(command).1
    }

    /// Runs a shell command in the guest's root shell over its serial console; answers
    /// its exit status and what the console showed meanwhile (its output, stdout and
    /// stderr, after the console's echo of the command line).
    fn shell_status(&self, command: &str) -> (i32, String) {
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut s = UnixStream::connect(self.run.join("console.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("__END{}x{n}__", std::process::id());
        writeln!(s, "{command}\necho {tag}$?").unwrap();
        let mut r = BufReader::new(s);
        let mut out = String::new();
        loop {
            let mut line = String::new();
            assert_ne!(
                r.read_line(&mut line).unwrap(),
                0,
                "the guest's console closed during {command:?}"
            );
            // The console echoes the command line too (with `$?`, not a number).
            if let Some((_, status)) = line.split_once(&tag) {
                if !status.contains("$?") {
                    let status = status
                        .trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("no exit status after {command:?} in {line:?}"));
                    return (status, out);
                }
            }
            out.push_str(&line);
        }
    }

    /// Runs a shell command in the guest; answers its output, or panics with it if the
    /// command failed.
    fn shell_ok(&self, command: &str) -> String {
        let (status, out) = self.shell_status(command);
        assert_eq!(status, 0, "{command:?} in the guest failed:\n{out}");
        out
    }

    /// Writes a value of its own into the agent's state directory in the guest, checks
    /// it reached the host's side of the share and that the directory is the share,
    /// root's and 0700; answers the value for [`Guest::assert_state_kept`].
    fn mark_state(&self) -> String {
        let value = format!(
            "kept-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let out = self.shell_ok(&format!(
            "echo {value} >{GUEST_STATE_DIR}/lab-mark && sync && \
             grep ' {GUEST_STATE_DIR} 9p ' /proc/mounts && stat -c 'mode=%a owner=%U' {GUEST_STATE_DIR}"
        ));
        assert!(
            out.contains("mode=700 owner=root"),
            "{GUEST_STATE_DIR} in the guest is root's and 0700: {out}"
        );
        let host = self.run.join(AGENT_STATE).join("lab-mark");
        assert_eq!(
            std::fs::read_to_string(&host).unwrap_or_default().trim(),
            value,
            "the guest's {GUEST_STATE_DIR}/lab-mark is {} on the host",
            host.display()
        );
        value
    }

    /// The value [`Guest::mark_state`] wrote is still in the guest's state directory
    /// (after a reset or a restart).
    fn assert_state_kept(&self, value: &str) {
        let out = self.shell_ok(&format!(
            "cat {GUEST_STATE_DIR}/lab-mark; stat -c 'mode=%a owner=%U' {GUEST_STATE_DIR}"
        ));
        assert!(
            out.lines().any(|l| l.trim() == value),
            "{GUEST_STATE_DIR}/lab-mark kept its {value}: {out}"
        );
        assert!(
            out.contains("mode=700 owner=root"),
            "{GUEST_STATE_DIR} in the guest is root's and 0700: {out}"
        );
    }
}

/// The lab: one world, its signing VM, `signetd` in a testbed.
struct Lab {
    w: World,
    guest: Guest,
    /// `signetd`'s own unix socket (local root's view: status, jobs).
    daemon: Endpoint,
    /// The build VM's way in: the socket vhost-device-vsock would connect to.
    build: Endpoint,
    testbed: Option<Testbed>,
}

impl Lab {
    fn start() -> Lab {
        let w = World::new();
        let out = Command::new("bash")
            .arg(repo().join("lab/mk-nssdb.sh"))
            .arg(w.path("nssdb"))
            .arg(CARD_PIN)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lab/mk-nssdb.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(w.path("host.pin"), format!("{CARD_PIN}\n")).unwrap();
        std::fs::set_permissions(
            w.path("host.pin"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let guest = Guest::start(&w);
        let run = guest.run.clone();
        w.write_daemon_config(&format!(
            r#"listen = ["unix:{sock}", "vsock-uds:{build}:7710,cid={BUILD_VM}"]
agent = "vsock-uds:{vm}:7711,cid={VM}"
dbus = "none"
pin_file = "{pin}"
default_profile = "release"
[shutdown]
logind = "none"
[queue]
job_deadline_seconds = 600
# The guest is emulated (TCG): its PKCS#11 re-init and pcscd's start take ~1.5 s
# on an idle machine but took 36 s on a loaded one, past the default 10 s after
# which the ladder tries its next step. The ladder's test is about that first step.
[recovery.agent_reinit]
cooldown_seconds = 90
[profiles.release]
description = "Signet lab"
[[grants]]
callers = ["vm:{BUILD_VM}", "uid:0"]
profiles = ["release"]
[passthrough]
monitor_dir = "{monitors}"
usb_bus = "uhci.0"
[[tokens]]
serial = "{SERIAL}"
vm = {VM}
device = {{ kind = "emulated-ccid", db = "sql:{nssdb}", certs = ["lab-id", "lab-codesign", "lab-enc"] }}
"#,
            sock = w.path("signetd.sock").display(),
            build = run.join("build.vsock").display(),
            vm = run.join("vm.vsock").display(),
            pin = w.path("host.pin").display(),
            monitors = w.path("monitors").display(),
            nssdb = w.path("nssdb").display(),
        ));
        let build: Endpoint = format!("unix:{}", run.join("build.vsock_7710").display())
            .parse()
            .unwrap();
        let mut lab = Lab {
            daemon: format!("unix:{}", w.path("signetd.sock").display())
                .parse()
                .unwrap(),
            w,
            guest,
            build,
            testbed: None,
        };
        lab.start_daemon();
        pair(&lab);
        lab
    }

    /// A lab whose token is in the VM and whose agent is logged in.
    fn signing() -> Lab {
        let mut lab = Lab::start();
        lab.plug_token();
        lab.wait_signing_works("the token in the VM, logged in");
        lab
    }

    /// Sends `n` jobs and returns once one of them is at the agent (or done).
    fn queue_with_one_at_agent(&self, n: usize, tag: &str) -> Vec<String> {
        let ids = self.submit(n, tag);
        wait_until_within(
            "a job at the agent",
            LONG,
            Duration::from_millis(20),
            || {
                ids.iter()
                    .any(|id| matches!(self.job_state(id).as_str(), Some("running" | "signed")))
            },
        );
        ids
    }

    /// Starts `signetd` inside a fresh testbed (the host's token unplugged).
    fn start_daemon(&mut self) {
        let (_, testbed) = Testbed::start_daemon(&mut self.w);
        self.testbed = Some(testbed);
    }

    /// Plugs the token into the host (as udev would report it).
    fn plug_token(&mut self) {
        self.testbed
            .as_mut()
            .unwrap()
            .ask(&format!("add 2 5 {SERIAL}"));
    }

    fn status(&self) -> Value {
        let (code, s) = call_json(&self.daemon, "GET", "/v1/status", None);
        assert_eq!(code, 200, "{s:#}");
        s
    }

    /// Waits until a job sent now would be signed: token in the VM, agent logged in.
    fn wait_signing_works(&self, what: &str) -> Duration {
        wait_until_within(what, LONG, EVERY, || self.status()["signing_works"] == true)
    }

    /// A job's state, asked by its owner (the build VM).
    fn job_state(&self, id: &str) -> Value {
        call_json(&self.build, "GET", &format!("/v1/jobs/{id}"), None).1["state"].clone()
    }

    /// Sends `n` jobs from the build VM without waiting for them; their ids.
    fn submit(&self, n: usize, tag: &str) -> Vec<String> {
        let pe = std::fs::read(self.w.path("hello.exe")).unwrap();
        (0..n)
            .map(|i| sign_async(&self.build, &format!("{tag}-{i}.exe"), &pe))
            .collect()
    }

    /// Waits for every job to be signed, fetches each result and checks it with
    /// `osslsigncode verify` against the card's certificate.
    fn collect(&self, ids: &[String]) {
        let started = Instant::now();
        while !ids.iter().all(|id| self.job_state(id) == "signed") {
            assert!(
                started.elapsed() < LONG,
                "never happened within {LONG:?}: every job signed\n{}",
                self.jobs_report(ids)
            );
            std::thread::sleep(EVERY);
        }
        for id in ids {
            let (code, body) = fetch(&self.build, &format!("/v1/jobs/{id}/result"));
            assert_eq!(code, 200, "job {id}: {}", String::from_utf8_lossy(&body));
            let f = self.w.file(&format!("job-{id}.exe"), &body);
            let (ok, text) = verify_with(
                &self.w,
                &f,
                &[
                    "-CAfile",
                    self.w.path("nssdb/lab-codesign.pem").to_str().unwrap(),
                ],
            );
            assert!(ok, "job {id}: {text}");
        }
    }

    /// Each job's state and error as its owner sees them, the status's recovery
    /// timeline, and the last lines of the agent's and `signetd`'s logs: what a
    /// failed wait for the queue shows.
    fn jobs_report(&self, ids: &[String]) -> String {
        let mut out = String::new();
        for id in ids {
            let (code, job) = call_json(&self.build, "GET", &format!("/v1/jobs/{id}"), None);
            out.push_str(&format!(
                "job {id}: HTTP {code}, state {}, attempts {}, error {}\n",
                job["state"], job["attempts"], job["error"]
            ));
        }
        out.push_str(&format!("timeline: {:?}\n", self.timeline_events()));
        for (name, text) in [
            ("agent (guest)", self.guest.agent_log()),
            (
                "signetd",
                std::fs::read_to_string(self.w.path("signetd.log")).unwrap_or_default(),
            ),
        ] {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("the signing agent is not reachable"))
                .collect();
            out.push_str(&format!("--- {name}, last lines:\n"));
            for l in &lines[lines.len().saturating_sub(30)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// The audit log's records, by job: each job's results.
    fn audited(&self) -> HashMap<String, Vec<String>> {
        let out = self.w.signetd(&["audit", "export"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut by_job: HashMap<String, Vec<String>> = HashMap::new();
        for l in String::from_utf8(out.stdout).unwrap().lines() {
            let r: Value = serde_json::from_str(l).unwrap();
            by_job
                .entry(r["job"].as_str().unwrap_or("-").to_owned())
                .or_default()
                .push(r["result"].as_str().unwrap_or("-").to_owned());
        }
        by_job
    }

    /// Waits for every job of `ids` to be signed and verified (timed as `what`, from
    /// `since`), checks each is in the audit log once, and that the agent made at most
    /// one signature more than there are jobs — for the job a fault cut off — counting
    /// `earlier` ones from a log a restart wiped.
    fn drained(&self, ids: &[String], scenario: &str, what: &str, since: Instant, earlier: usize) {
        self.collect(ids);
        timing(scenario, what, since.elapsed());
        self.assert_signed_once(ids);
        let made = earlier + self.guest.signatures();
        assert!(
            (ids.len()..=ids.len() + 1).contains(&made),
            "{made} signatures for {} jobs (only one cut off by the fault may be made twice)",
            ids.len()
        );
    }

    /// The events of the recovery timeline's newest entries (in the status).
    fn timeline_events(&self) -> Vec<String> {
        self.status()["recovery"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["event"].as_str().map(str::to_owned))
            .collect()
    }

    /// The recovery timeline's events after the last `from` (the newest entries in
    /// the status), each of `then` among them. News from the agent may trail the
    /// jobs' results by a moment: it is waited for, up to `LONG`.
    fn assert_timeline_after(&self, from: &str, then: &[&str]) {
        let complete = |events: &[String]| {
            events
                .iter()
                .rposition(|e| e == from)
                .is_some_and(|start| then.iter().all(|e| events[start..].iter().any(|a| a == e)))
        };
        let started = Instant::now();
        let mut events = self.timeline_events();
        while !complete(&events) && started.elapsed() < LONG {
            std::thread::sleep(EVERY);
            events = self.timeline_events();
        }
        let start = events
            .iter()
            .rposition(|e| e == from)
            .unwrap_or_else(|| panic!("{from} in the timeline: {events:?}"));
        let after = &events[start..];
        for e in then {
            assert!(after.iter().any(|a| a == e), "{e} after {from}: {events:?}");
        }
    }

    /// Every job signed once, as the audit log tells it, and by the build VM.
    fn assert_signed_once(&self, ids: &[String]) {
        let audited = self.audited();
        for id in ids {
            assert_eq!(
                audited.get(id).map(Vec::as_slice),
                Some(&["signed".to_owned()][..]),
                "job {id} in the audit log: {audited:?}"
            );
        }
    }
}

impl Drop for Lab {
    /// A failed scenario shows the end of every log it made.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let run = &self.guest.run;
        for (name, path) in [
            ("agent (guest)", run.join("agent.log")),
            ("console (guest)", run.join("console.log")),
            ("qemu", run.join("qemu.log")),
            ("vhost-device-vsock", run.join("vhost.log")),
            ("signetd", self.w.path("signetd.log")),
        ] {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // The status polls' complaints would hide the rest.
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("the signing agent is not reachable"))
                .collect();
            eprintln!("--- {name}, last lines of {}:", path.display());
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// The operator's pairing step, once after the signing VM's first boot: in the guest,
/// as root, `signet-agent pair --json` opens a pairing window and shows its code; on
/// the host, `signetd pair CODE` (with the lab's configuration) reaches the agent at its
/// endpoint and completes it. The agent keeps its key and the paired host in its state
/// directory, on the share that outlives resets and restarts.
fn pair(lab: &Lab) {
    let started = Instant::now();
    wait_until_within("signet-agent listening in the guest", BOOT, EVERY, || {
        lab.guest.agent_log().contains("listening")
    });
    let (status, out) = lab
        .guest
        .shell_status("signet-agent --config /etc/signet/agent.toml pair --json");
    assert_eq!(status, 0, "signet-agent pair in the guest failed:\n{out}");
    let window = pairing_window(&out);
    let code = window["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code from signet-agent pair --json: {window:#}"));
    let groups: Vec<&str> = code.split('-').collect();
    assert!(
        groups.len() == 4 && groups.iter().all(|g| g.len() == 4),
        "a pairing code is XXXX-XXXX-XXXX-XXXX: {window:#}"
    );
    assert!(
        window["fingerprint"]
            .as_str()
            .is_some_and(|f| !f.is_empty()),
        "{window:#}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        window["expires_unix"].as_u64().is_some_and(|t| t > now),
        "the pairing window is open: {window:#}"
    );
    let host = lab.w.signetd(&["pair", code]);
    assert!(
        host.status.success(),
        "signetd pair {code} on the host failed ({}):\n{}{}\nagent:\n{}",
        host.status,
        String::from_utf8_lossy(&host.stdout),
        String::from_utf8_lossy(&host.stderr),
        lab.guest.agent_log()
    );
    // The agent keeps its key and the host it paired with on the share.
    let state = lab.guest.run.join(AGENT_STATE);
    for f in ["link.key", "link.crt", "host.pin"] {
        assert!(
            state.join(f).exists(),
            "the agent's {GUEST_STATE_DIR}/{f} is on the share ({})",
            state.display()
        );
    }
    timing("pairing", "agent up -> paired", started.elapsed());
}

/// The JSON document `signet-agent pair --json` printed, from what the console showed:
/// the echo of the command line first (wrapped at the terminal's width), then the
/// document, on one line or more.
fn pairing_window(console: &str) -> Value {
    let json = console
        .lines()
        .position(|l| l.trim_start().starts_with('{'))
        .map(|i| console.lines().skip(i).collect::<Vec<_>>().join("\n"))
        .unwrap_or_else(|| panic!("no JSON from signet-agent pair --json:\n{console}"));
    let json = &json[..json.rfind('}').map_or(json.len(), |i| i + 1)];
    serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("signet-agent pair --json: {e}:\n{console}"))
}

#[test]
fn the_pairing_window_is_read_from_the_console() {
    let one_line = "signet-agent --config /etc/signet/agent.toml pair --json\r\n\
        {\"fingerprint\": \"ab:cd\", \"code\": \"K7QX-2M9D-Z4TB-8HJW\", \"expires_unix\": 1790000000}\r\n\
        / # echo __END1x0__$?\r\n";
    assert_eq!(pairing_window(one_line)["code"], "K7QX-2M9D-Z4TB-8HJW");
    let pretty = "signet-agent --config /etc/signet/agent.toml pair --js\r\non\r\n{\r\n  \"code\": \"A-B\",\r\n  \"expires_unix\": 5\r\n}\r\n/ # ";
    assert_eq!(pairing_window(pretty)["expires_unix"], 5);
}

// A test's own output, read by its harness.
#[allow(clippy::disallowed_macros)]
fn timing(scenario: &str, what: &str, d: Duration) {
    println!("LAB-TIMING {scenario}: {what}: {:.1} s", d.as_secs_f64());
}

/// Scenario 1: the token is plugged after the VM booted; signetd puts it into the VM,
/// gives the agent the PIN, and a PE sent by the build VM is signed in the guest and
/// verifies on the host.
#[test]
fn cold_start_token_plugged_after_boot_signs_in_the_guest() {
    let started = Instant::now();
    let mut lab = Lab::start();
    timing(
        "1 cold start",
        "guest booted and signetd ready",
        started.elapsed(),
    );
    let s = lab.status();
    assert_eq!(s["signing_works"], false, "no token yet: {s:#}");
    assert!(!lab.guest.reader_attached());

    let plugged = Instant::now();
    lab.plug_token();
    wait_until_within("the reader in the VM", LONG, EVERY, || {
        lab.guest.reader_attached()
    });
    timing(
        "1 cold start",
        "token plugged -> reader in the VM",
        plugged.elapsed(),
    );
    lab.wait_signing_works("the agent logged in to the card");
    timing(
        "1 cold start",
        "token plugged -> signing works",
        plugged.elapsed(),
    );
    // The agent's news of the login can reach the status before the answer to the
    // PIN's delivery reaches signetd (the agent reads its health before answering):
    // both land in the timeline, in either order.
    for e in ["pin_delivered", "logged_in"] {
        wait_until_within(&format!("{e} in the timeline"), LONG, EVERY, || {
            lab.timeline_events().iter().any(|x| x == e)
        });
    }
    let s = lab.status();
    let health = &s["agent"]["health"];
    assert_eq!(health["token"]["serial"], "000058bd002c19b5", "{health:#}");
    assert!(
        health["signer_features"]["modes"].as_array().is_some(),
        "the agent says which modes its osslsigncode serves: {health:#}"
    );

    // `signet sign` from the build VM's side, through the whole path.
    let pe = lab.w.pe("app.exe");
    let t = Instant::now();
    let out = signet(&lab.build, &["sign", pe.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "signet sign: {}{}\nagent:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        lab.guest.agent_log()
    );
    timing(
        "1 cold start",
        "one signature (signet sign, 15 KiB PE)",
        t.elapsed(),
    );
    let (ok, text) = verify_with(
        &lab.w,
        &pe,
        &[
            "-CAfile",
            lab.w.path("nssdb/lab-codesign.pem").to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    timing(
        "1 cold start",
        "token plugged -> first file signed",
        plugged.elapsed(),
    );
    // One job, signed once; and the pairing, audited under the uid that ran it.
    let audited = lab.audited();
    assert_eq!(
        audited.get("1").map(Vec::as_slice),
        Some(&["signed".to_owned()][..]),
        "{audited:?}"
    );
    assert_eq!(
        audited.get("-").map(Vec::as_slice),
        Some(&["pair".to_owned()][..]),
        "{audited:?}"
    );
    assert_eq!(audited.len(), 2, "{audited:?}");
    assert_eq!(lab.guest.signatures(), 1);
}

/// Scenario 2: the reader is pulled from the VM by someone else (`device_del` on
/// another monitor) while jobs wait; signetd puts the token back, and each job is
/// signed exactly once.
#[test]
fn token_pulled_mid_queue_is_put_back_and_every_job_is_signed_once() {
    let lab = Lab::signing();
    // Pull it while the first job is at the agent or about to be.
    let ids = lab.queue_with_one_at_agent(4, "pull");
    let pulled = Instant::now();
    // device_del and QEMU's DEVICE_DELETED for it, on the test's monitor.
    let id = signetd::core::passthrough::device_id(SERIAL);
    lab.guest
        .rt
        .block_on(lab.guest.qmp.detach(&id))
        .expect("the reader removed");
    wait_until_within("the reader put back", LONG, EVERY, || {
        lab.guest.reader_attached()
    });
    timing(
        "2 token pulled",
        "device_del -> reader back in the VM",
        pulled.elapsed(),
    );
    lab.drained(
        &ids,
        "2 token pulled",
        "device_del -> 4 queued jobs signed",
        pulled,
        0,
    );
}

/// Scenario 2b: the reader is pulled while the signer hangs on the token (osslsigncode
/// waiting on a reader pulled mid-command does): the agent's check of the token during
/// the run sees the loss and stops the signer — the job goes back to the queue as a
/// token loss, without waiting for the signer's time limit — and every job is signed
/// once. The hanging signer is a script put in osslsigncode's place in the guest, the
/// real one put back once the reader is back. osslsigncode's own run is what hangs,
/// so the guest's agent is switched to the osslsigncode backend first (the image's
/// `agent.toml` leaves the native default) and restarted.
#[test]
fn token_pulled_while_the_signer_hangs_stops_it_and_every_job_is_signed_once() {
    let lab = Lab::signing();
    let starts = |log: &str| log.matches("LAB: starting signet-agent").count();
    let before = starts(&lab.guest.agent_log());
    lab.guest.shell_ok(
        "printf 'backend = \"osslsigncode\"\\n' >>/etc/signet/agent.toml && \
         kill $(pidof signet-agent)",
    );
    wait_until_within("the agent restarted on osslsigncode", LONG, EVERY, || {
        let log = lab.guest.agent_log();
        starts(&log) > before
            && log
                .rsplit("LAB: starting signet-agent")
                .next()
                .is_some_and(|run| run.contains("signer=osslsigncode"))
    });
    lab.wait_signing_works("the restarted agent logged in");
    lab.guest.shell_ok(
        "p=$(command -v osslsigncode) && echo $p >/tmp/osslsigncode.path && \
         cp $p /tmp/osslsigncode.real && printf '#!/bin/sh\\nexec sleep 3600\\n' >$p",
    );
    let ids = lab.submit(3, "hang");
    wait_until_within("the signer running", LONG, EVERY, || {
        lab.guest.agent_log().contains("input accepted")
    });
    let pulled = Instant::now();
    let id = signetd::core::passthrough::device_id(SERIAL);
    lab.guest
        .rt
        .block_on(lab.guest.qmp.detach(&id))
        .expect("the reader removed");
    wait_until_within("the reader put back", LONG, EVERY, || {
        lab.guest.reader_attached()
    });
    lab.guest
        .shell_ok("cp /tmp/osslsigncode.real $(cat /tmp/osslsigncode.path)");
    lab.drained(
        &ids,
        "2b token pulled, signer hung",
        "device_del -> 3 queued jobs signed",
        pulled,
        0,
    );
    let log = lab.guest.agent_log();
    assert!(
        log.contains("the token went away while the signer ran; the signer is stopped"),
        "the agent stopped the hung signer at the loss:\n{}",
        lab.jobs_report(&ids)
    );
    assert!(
        !log.contains("did not finish within"),
        "the signer was not left to its time limit:\n{}",
        lab.jobs_report(&ids)
    );
}

/// Scenario 4: the signing VM is reset (`system_reset`) with a job at the agent and
/// others queued: the guest reboots with the reader still attached, the agent comes
/// back as a new process, signetd notices (the old connections stay silent behind a
/// hybrid-vsock backend), runs the abandoned job again, gives the PIN again, and the
/// queue goes on without anyone; every job audited once.
#[test]
fn signing_vm_reset_agent_back_pin_redelivered_queue_resumes() {
    let mut lab = Lab::signing();
    let kept = lab.guest.mark_state();
    let ids = lab.queue_with_one_at_agent(3, "reset");
    let down = Instant::now();
    lab.guest.reset();
    timing(
        "4 VM reset",
        "system_reset -> guest ready again",
        down.elapsed(),
    );
    lab.wait_signing_works("the agent back and logged in after the reset");
    timing(
        "4 VM reset",
        "system_reset -> signing works",
        down.elapsed(),
    );
    assert!(
        lab.guest.reader_attached(),
        "the reader stays through a reset"
    );
    // The agent's log runs on across the reset (the same serial port).
    lab.drained(
        &ids,
        "4 VM reset",
        "system_reset -> 3 queued jobs signed",
        down,
        0,
    );
    lab.assert_timeline_after(
        "vm_reset",
        &["pin_delivered", "logged_in", "first_job_signed"],
    );
    // The agent's state directory outlived the reset (the initramfs did not).
    lab.guest.assert_state_kept(&kept);
}

/// Scenario 4b: the signing VM goes down and up again with jobs queued (QEMU and its
/// vsock backend killed and started again, as `qm stop` + `qm start` or a crashed
/// QEMU): signetd puts the token back into the new QEMU, the agent comes back with the
/// guest, the host gives it the PIN again, and the queue goes on without anyone.
#[test]
fn signing_vm_restarted_agent_back_pin_redelivered_queue_resumes() {
    let mut lab = Lab::signing();
    let kept = lab.guest.mark_state();
    let ids = lab.queue_with_one_at_agent(3, "restart");
    let before = lab.guest.signatures();
    let down = Instant::now();
    lab.guest.restart();
    timing(
        "4 VM restart",
        "QEMU killed -> guest ready again",
        down.elapsed(),
    );
    wait_until_within("the reader back in the new QEMU", LONG, EVERY, || {
        lab.guest.reader_attached()
    });
    timing(
        "4 VM restart",
        "QEMU killed -> token back in the VM",
        down.elapsed(),
    );
    lab.wait_signing_works("the agent back and logged in after the restart");
    timing(
        "4 VM restart",
        "QEMU killed -> signing works",
        down.elapsed(),
    );
    // The new QEMU writes a new agent log.
    lab.drained(
        &ids,
        "4 VM restart",
        "QEMU killed -> 3 queued jobs signed",
        down,
        before,
    );
    // In the timeline: the agent lost with its VM, back, given the PIN, logged in.
    lab.assert_timeline_after(
        "agent_unreachable",
        &[
            "agent_back",
            "pin_delivered",
            "logged_in",
            "first_job_signed",
        ],
    );
    // The agent's state directory outlived the QEMU process.
    lab.guest.assert_state_kept(&kept);
}

/// Scenario 5: `signetd` is killed with SIGKILL while a job is at the agent and
/// others wait, then started again: no job lost, none signed twice in the audit log.
#[test]
fn signetd_killed_mid_job_and_restarted_loses_and_repeats_nothing() {
    let mut lab = Lab::signing();
    let ids = lab.submit(4, "crash");
    wait_until_within(
        "a job at the agent",
        LONG,
        Duration::from_millis(20),
        || ids.iter().any(|id| lab.job_state(id) == "running"),
    );
    // SIGKILL to signetd itself (inside the testbed), as a crash would.
    let pid = signetd_pid(&lab.w.path("signetd.toml")).expect("signetd's pid");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    lab.w.kill("signetd"); // the testbed around it
    lab.start_daemon();
    lab.plug_token();
    lab.drained(
        &ids,
        "5 signetd kill -9",
        "kill -> 4 jobs signed after the restart",
        killed,
        0,
    );
    // The token stayed in its VM through the restart.
    assert!(lab.guest.reader_attached());
}

/// The PID of the `signetd` process started with `--config CONFIG` (this test's own).
fn signetd_pid(config: &Path) -> Option<i32> {
    let want = bin("signetd");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        (args.first() == Some(&want.as_os_str().as_encoded_bytes())
            && args.contains(&config.as_os_str().as_encoded_bytes()))
        .then_some(pid)
    })
}

/// Scenario 3 (pcscd killed in the guest, the token "lost" while still attached, the
/// way an RDP redirect or a driver hang looks): nothing notices until a job needs the
/// token; the job then finds it gone and waits instead of failing; `signetd` sees the
/// agent's loss while the token is in the VM and climbs its recovery ladder, whose first
/// step — the agent re-initialises PKCS#11, running its `token.reinit_command`, which in
/// the lab's image starts pcscd again — brings the token back; the jobs are signed once.
/// Nobody touches the guest after killing pcscd.
#[test]
fn token_lost_in_guest_is_brought_back_by_the_recovery_ladder() {
    let lab = Lab::signing();
    let lost = Instant::now();
    lab.guest.shell("killall pcscd");
    let ids = lab.submit(2, "lost");
    wait_until_within("the loss seen by the job", LONG, EVERY, || {
        lab.status()["recovery"]
            .as_array()
            .is_some_and(|r| r.iter().any(|e| e["event"] == "token_lost"))
    });
    timing(
        "3 lost in guest",
        "pcscd killed -> loss seen (by a job)",
        lost.elapsed(),
    );
    assert!(
        ids.iter().all(|id| lab.job_state(id) != "failed"),
        "a lost token is a wait, not a failure"
    );
    let back = Instant::now();
    lab.wait_signing_works("the token back through the ladder");
    timing(
        "3 lost in guest",
        "loss seen -> signing works (the ladder's agent re-init restarted pcscd)",
        back.elapsed(),
    );
    lab.drained(
        &ids,
        "3 lost in guest",
        "loss seen -> 2 waiting jobs signed",
        back,
        0,
    );
    let s = lab.status();
    let entries = s["recovery"].as_array().unwrap();
    let step = entries
        .iter()
        .find(|e| e["event"] == "recovery_step")
        .unwrap_or_else(|| panic!("no ladder step in {entries:#?}"));
    assert!(
        step["detail"]
            .as_str()
            .unwrap()
            .starts_with("agent_reinit: "),
        "{step}"
    );
    let recovered = entries
        .iter()
        .find(|e| e["event"] == "recovered")
        .unwrap_or_else(|| panic!("not recovered in {entries:#?}"));
    assert!(
        recovered["detail"]
            .as_str()
            .unwrap()
            .contains("agent_reinit"),
        "{recovered}"
    );
}

/// Debian 12's own osslsigncode (2.5, from the package the image build downloads) in
/// the agent: it serves whole files — a PE is signed and verifies — and refuses digest
/// mode with the fix, and its health says which modes it serves. No guest needed.
#[test]
fn an_agent_with_debian_osslsigncode_2_5_signs_whole_files_and_refuses_digest_mode() {
    image(); // downloads the packages, bookworm's osslsigncode among them
    let deb = std::fs::read_dir(repo().join("target/lab/debs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("osslsigncode_2.5"))
        })
        .expect("bookworm's osslsigncode 2.5 in target/lab/debs");
    let mut w = World::new();
    let x = w.path("ossl25");
    let out = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&x)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ossl = x.join("usr/bin/osslsigncode");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &w.path("pin"),
        &[],
        &format!(
            "[signer]\nbackend = \"osslsigncode\"\nosslsigncode = \"{}\"\n",
            ossl.display()
        ),
    );
    let (code, health) = call_json(&agent, "GET", "/agent/v1/health", None);
    assert_eq!(code, 200, "{health:#}");
    assert_eq!(health["signer"], "osslsigncode 2.5", "{health:#}");
    assert_eq!(
        health["signer_features"]["modes"],
        serde_json::json!(["whole"]),
        "{health:#}"
    );
    assert!(
        w.log("signet-agent").contains("serving modes: whole file"),
        "the agent says so at start"
    );
    let ep = w
        .start_daemon(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
        )
        .remove(0);

    let pe = w.pe("app.exe");
    let out = signet(&ep, &["sign", pe.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, text) = verify(&w, &pe);
    assert!(ok, "signed by osslsigncode 2.5: {text}");

    let other = w.pe("digest.exe");
    let before = std::fs::read(&other).unwrap();
    let out = signet(&ep, &["sign", "--digest", other.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(4),
        "bad input for this appliance: {err}"
    );
    assert!(
        err.contains("osslsigncode 2.5 cannot sign digest-mode data")
            && err.contains("send the whole file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&other).unwrap(),
        before,
        "the file is untouched"
    );
}

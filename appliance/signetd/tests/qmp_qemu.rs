//! The QMP client against a real QEMU (TCG, q35, a qemu-xhci controller, no guest),
//! with two monitors as on a Proxmox host: `qmp.sock` stands for qemu-server's own,
//! `signet.sock` is the one Signet adds to the VM's `args:` and holds. There is no USB
//! on these machines, so `usb-host` devices are accepted but never attached.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use std::time::SystemTime;

use signetd::adapters::qmp::{AttachError, Monitor, MonitorEvent, Qmp, QmpEvent};
use signetd::core::passthrough::device_id;
use signetd::core::passthrough::{Input, State, Token};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A QEMU started for one test, killed by its PID and reaped when dropped.
struct Qemu {
    child: Option<std::process::Child>,
}

impl Qemu {
    /// Starts QEMU; its monitors are there once a [`Monitor`] reports `Connected`.
    fn start(dir: &Path) -> Self {
        let _ = std::fs::remove_file(dir.join("signet.sock"));
        let _ = std::fs::remove_file(dir.join("qmp.sock"));
        let chardev = format!(
            "socket,id=signet,path={},server=on,wait=off",
            dir.join("signet.sock").display()
        );
        let qmp = format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display());
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-machine",
                "q35",
                "-nodefaults",
                "-nographic",
            ])
            .args(["-display", "none", "-S", "-device", "qemu-xhci,id=xhci"])
            .args(["-qmp", &qmp])
            .args(["-chardev", &chardev, "-mon", "chardev=signet,mode=control"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/install-deps.sh installs it)");
        Qemu { child: Some(child) }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A connection on qemu-server's socket, standing for anyone else on the host.
async fn other(dir: &Path) -> (Monitor, std::sync::Arc<Qmp>) {
    let mut m = Monitor::start(sock(dir, "qmp.sock"), TIMEOUT);
    let q = connected(&mut m).await;
    (m, q)
}

fn sock(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// The next monitor event that `want` accepts; others are skipped.
async fn expect(m: &mut Monitor, what: &str, want: impl Fn(&MonitorEvent) -> bool) -> MonitorEvent {
    // Bounds a hang only.
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let ev = m.next().await.expect("monitor task ended");
            if want(&ev) {
                return ev;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} from the monitor"))
}

async fn connected(m: &mut Monitor) -> std::sync::Arc<Qmp> {
    expect(m, "connection", |e| *e == MonitorEvent::Connected).await;
    m.qmp().expect("a live connection after Connected")
}

#[tokio::test]
async fn attach_detach_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let _qemu = Qemu::start(dir.path());
    let mut m = Monitor::start(sock(dir.path(), "signet.sock"), TIMEOUT);
    let q = connected(&mut m).await;
    let id = device_id("0123ABCD");

    assert_eq!(q.attached(&id).await.unwrap(), None, "not there yet");
    q.attach_usb_host(&id, "xhci.0", 1, "2").await.unwrap();
    // Accepted, but QEMU found no host device at 1-2: accepted is not attached.
    assert_eq!(q.attached(&id).await.unwrap(), Some(false));

    let dup = q.attach_usb_host(&id, "xhci.0", 1, "2").await.unwrap_err();
    assert!(matches!(dup, AttachError::DuplicateId { .. }), "{dup:?}");
    assert!(dup.to_string().contains(&id), "{dup}");

    let nobus = q
        .attach_usb_host("signet-other", "nosuchbus.0", 1, "3")
        .await
        .unwrap_err();
    assert!(matches!(nobus, AttachError::NoBus { .. }), "{nobus:?}");
    assert!(nobus.to_string().contains("qemu-xhci"), "{nobus}");

    q.detach(&id).await.unwrap();
    assert_eq!(q.attached(&id).await.unwrap(), None);
    let ev = expect(&mut m, "DEVICE_DELETED", |e| {
        matches!(e, MonitorEvent::Qmp(QmpEvent::DeviceDeleted { .. }))
    })
    .await;
    assert_eq!(
        ev,
        MonitorEvent::Qmp(QmpEvent::DeviceDeleted {
            device: Some(id.clone()),
            path: format!("/machine/peripheral/{id}"),
        })
    );
    // Detaching what is gone is not an error.
    q.detach(&id).await.unwrap();
    // A refused command carries QEMU's words.
    let e = q.execute("no-such-command", None).await.unwrap_err();
    assert!(e.to_string().contains("CommandNotFound"), "{e}");
}

#[tokio::test]
async fn reattach_after_device_del_behind_our_back() {
    let dir = tempfile::tempdir().unwrap();
    let _qemu = Qemu::start(dir.path());
    let mut m = Monitor::start(sock(dir.path(), "signet.sock"), TIMEOUT);
    let q = connected(&mut m).await;
    let id = device_id("0456CDEF");
    q.attach_usb_host(&id, "xhci.0", 1, "3").await.unwrap();

    // Someone else (qemu-server's monitor) removes it.
    let (_m2, other) = other(dir.path()).await;
    other
        .execute("device_del", Some(serde_json::json!({"id": id})))
        .await
        .unwrap();
    let ev = expect(&mut m, "DEVICE_DELETED", |e| {
        matches!(e, MonitorEvent::Qmp(QmpEvent::DeviceDeleted { .. }))
    })
    .await;
    let MonitorEvent::Qmp(QmpEvent::DeviceDeleted { device, .. }) = ev else {
        unreachable!()
    };
    assert_eq!(device.as_deref(), Some(id.as_str()));
    assert_eq!(q.attached(&id).await.unwrap(), None);

    q.attach_usb_host(&id, "xhci.0", 1, "3").await.unwrap();
    assert_eq!(q.attached(&id).await.unwrap(), Some(false));
}

#[tokio::test]
async fn reset_stop_resume_and_restart_are_observed() {
    let dir = tempfile::tempdir().unwrap();
    let mut qemu = Qemu::start(dir.path());
    let mut m = Monitor::start(sock(dir.path(), "signet.sock"), TIMEOUT);
    let q = connected(&mut m).await;
    let (_m2, other) = other(dir.path()).await;

    other.execute("system_reset", None).await.unwrap();
    let ev = expect(&mut m, "RESET", |e| {
        matches!(e, MonitorEvent::Qmp(QmpEvent::Reset { .. }))
    })
    .await;
    assert_eq!(
        ev,
        MonitorEvent::Qmp(QmpEvent::Reset {
            guest: false,
            reason: "host-qmp-system-reset".into()
        })
    );
    other.execute("cont", None).await.unwrap();
    expect(&mut m, "RESUME", |e| {
        *e == MonitorEvent::Qmp(QmpEvent::Resume)
    })
    .await;
    other.execute("stop", None).await.unwrap();
    expect(&mut m, "STOP", |e| *e == MonitorEvent::Qmp(QmpEvent::Stop)).await;

    // QEMU dies: the monitor says so, and commands on the old connection fail cleanly.
    qemu.kill();
    expect(&mut m, "disconnection", |e| {
        *e == MonitorEvent::Disconnected
    })
    .await;
    q.closed().await;
    let e = q.execute("query-status", None).await.unwrap_err();
    assert!(e.to_string().contains("closed"), "{e}");

    // QEMU comes back: the monitor reconnects by itself.
    let _qemu2 = Qemu::start(dir.path());
    let q2 = connected(&mut m).await;
    let status = q2.execute("query-status", None).await.unwrap();
    assert_eq!(status["status"], "prelaunch");
    let id = device_id("0123ABCD");
    q2.attach_usb_host(&id, "xhci.0", 1, "2").await.unwrap();
    assert_eq!(q2.attached(&id).await.unwrap(), Some(false));

    // The shutdown of a running QEMU is an event before the disconnection.
    q2.execute("quit", None).await.unwrap();
    expect(&mut m, "SHUTDOWN", |e| {
        matches!(e, MonitorEvent::Qmp(QmpEvent::Shutdown { .. }))
    })
    .await;
    expect(&mut m, "disconnection", |e| {
        *e == MonitorEvent::Disconnected
    })
    .await;
}

/// The token's state machine driven by a real QEMU: each action carried out over QMP,
/// each result and monitor event fed back, until nothing is left to do.
struct Driver {
    token: Token,
    monitor: Monitor,
}

const VMID: u32 = 105;

impl Driver {
    async fn feed(&mut self, input: Input) {
        let mut queue =
            std::collections::VecDeque::from(self.token.handle(input, SystemTime::now()));
        while let Some(action) = queue.pop_front() {
            let qmp = self.monitor.qmp().expect("QEMU up while acting");
            if let Some(result) = qmp
                .perform("xhci.0", &signetd::config::DeviceKind::UsbHost, &action)
                .await
            {
                queue.extend(self.token.handle(result, SystemTime::now()));
            }
        }
    }

    /// Feeds monitor events until one maps to `want`.
    async fn until(&mut self, want: Input) {
        let id = self.token.device_id();
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let ev = self.monitor.next().await.expect("monitor task ended");
                if let Some(input) = ev.to_input(VMID, &id) {
                    let done = input == want;
                    self.feed(input).await;
                    if done {
                        return;
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {want:?} from the monitor"));
    }
}

#[tokio::test]
async fn the_token_is_kept_in_its_vm_across_drops_resets_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut qemu = Qemu::start(dir.path());
    let mut d = Driver {
        token: Token::new("0123ABCD", Some(VMID), SystemTime::now()),
        monitor: Monitor::start(sock(dir.path(), "signet.sock"), TIMEOUT),
    };
    let id = d.token.device_id();
    d.feed(Input::Seen {
        bus: 1,
        port: "2".into(),
        conflicts: vec![],
    })
    .await;
    assert_eq!(d.token.state, State::OnHost);

    d.until(Input::VmUp(VMID)).await;
    // Accepted, and QEMU has no real device to claim here.
    let accepted = State::Attaching {
        vmid: VMID,
        accepted: true,
    };
    assert_eq!(d.token.state, accepted);
    let q = d.monitor.qmp().unwrap();
    assert_eq!(q.attached(&id).await.unwrap(), Some(false));

    // Removed behind our back: put back.
    let (_m2, other) = other(dir.path()).await;
    other
        .execute("device_del", Some(serde_json::json!({"id": id})))
        .await
        .unwrap();
    d.until(Input::Deleted(VMID)).await;
    assert_eq!(d.token.state, accepted);
    assert_eq!(q.attached(&id).await.unwrap(), Some(false));

    // A reset keeps it.
    other.execute("system_reset", None).await.unwrap();
    d.until(Input::VmReset(VMID)).await;
    assert_eq!(q.attached(&id).await.unwrap(), Some(false));

    // QEMU restarts: the new one gets the token too.
    qemu.kill();
    d.until(Input::VmDown(VMID)).await;
    assert_eq!(d.token.state, State::OnHost);
    let _qemu2 = Qemu::start(dir.path());
    d.until(Input::VmUp(VMID)).await;
    assert_eq!(d.token.state, accepted);
    let q2 = d.monitor.qmp().unwrap();
    assert_eq!(q2.attached(&id).await.unwrap(), Some(false));
}

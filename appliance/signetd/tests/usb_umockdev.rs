//! The udev adapter against a fake sysfs made by umockdev: each test runs itself again
//! inside a umockdev testbed (`umockdev-run` for fixed devices, `hotplug.py` for a
//! scenario of plug, unplug and re-plug) and asserts inside it.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::sync::watch;

use signet_api::wire::TokenPlace as State;
use signetd::adapters::qmp::{Monitor, MonitorEvent};
use signetd::adapters::usb::udev::UdevWatcher;
use signetd::adapters::usb::{Catalog, TokenKind, TokenSighting, TokenWatcher, UsbEvent};
use signetd::core::passthrough::device_id;
use signetd::services::tokens::{Setup, Status, TokenService};

/// Set in the copy of the test that runs inside the testbed.
const INSIDE: &str = "SIGNET_UMOCKDEV_INSIDE";
const PREFIX: &str = "signet-umockdev: ";

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/umockdev")
        .join(name)
}

fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// Runs `test` of this binary again under `wrapper`, and fails with its output if it
/// fails there.
fn rerun(test: &str, wrapper: &[&str]) {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (install umockdev): {e}", wrapper[0]));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "inside the testbed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the test did not run inside the testbed:\n{text}"
    );
}

// A test's own output, read by its harness.
#[allow(clippy::disallowed_macros)]
fn say(word: &str) {
    println!("{PREFIX}{word}");
}

async fn next(w: &mut UdevWatcher) -> UsbEvent {
    // Bounds a hang only; events arrive as soon as the testbed makes them.
    tokio::time::timeout(Duration::from_secs(60), w.next_event())
        .await
        .expect("no udev event")
        .expect("watcher stopped")
}

#[tokio::test]
async fn enumerates_two_identical_tokens_apart_by_serial() {
    if !inside() {
        let a = data("safenet-5110-a.umockdev");
        let b = data("safenet-5110-b.umockdev");
        rerun(
            "enumerates_two_identical_tokens_apart_by_serial",
            &[
                "umockdev-run",
                "--device",
                a.to_str().unwrap(),
                "--device",
                b.to_str().unwrap(),
                "--",
            ],
        );
        return;
    }
    let mut w = UdevWatcher::start().unwrap();
    let catalog = Catalog::default();
    let tokens: Vec<TokenSighting> = w
        .enumerate()
        .unwrap()
        .into_iter()
        .filter_map(|d| TokenSighting::of(&catalog, d))
        .collect();
    assert_eq!(tokens.len(), 2, "{tokens:#?}");
    let by = |serial: &str| {
        tokens
            .iter()
            .find(|t| t.device.serial.as_deref() == Some(serial))
            .unwrap_or_else(|| panic!("no token {serial} in {tokens:#?}"))
    };
    let a = by("0123ABCD");
    let b = by("0456CDEF");
    for t in [a, b] {
        assert_eq!(
            t.kind,
            TokenKind::Known {
                model: "SafeNet eToken 5110".into()
            }
        );
        assert_eq!(t.device.id.to_string(), "0529:0620");
        assert_eq!(t.device.product.as_deref(), Some("Token JC"));
        assert_eq!(t.device.interfaces[0].class, 0x0b);
    }
    assert_eq!((a.device.host_port().as_str(), a.device.devnum), ("1-2", 5));
    assert_eq!((b.device.host_port().as_str(), b.device.devnum), ("1-3", 7));
    // a's interfaces come from its descriptors (no interface device), unclaimed.
    assert!(a.conflicts.is_empty(), "{:?}", a.conflicts);
    // b's interface is claimed through usbfs: pcscd's doing, reported with the fix.
    assert_eq!(b.conflicts.len(), 1);
    assert_eq!(b.conflicts[0].driver, "usbfs");
    assert!(b.conflicts[0].to_string().contains("pcscd"));
}

#[tokio::test]
async fn follows_a_token_unplugged_and_replugged_and_a_second_one() {
    if !inside() {
        let script = data("hotplug.py");
        rerun(
            "follows_a_token_unplugged_and_replugged_and_a_second_one",
            &[
                "umockdev-wrapper",
                "/usr/bin/python3",
                script.to_str().unwrap(),
            ],
        );
        return;
    }
    let catalog = Catalog::default();
    let mut w = UdevWatcher::start().unwrap();
    let present = w.enumerate().unwrap();
    assert!(
        present.iter().all(|d| catalog.classify(d).is_none()),
        "{present:#?}"
    );
    say("ready");

    let UsbEvent::Added(a) = next(&mut w).await else {
        panic!("expected the token to appear")
    };
    assert_eq!(a.serial.as_deref(), Some("0123ABCD"));
    assert_eq!((a.host_port().as_str(), a.devnum), ("1-2", 5));
    assert!(matches!(
        catalog.classify(&a),
        Some(TokenKind::Known { .. })
    ));
    say("added");

    let UsbEvent::Removed(gone) = next(&mut w).await else {
        panic!("expected the token to disappear")
    };
    // Reported with what was known while it was present.
    assert_eq!(gone, a);
    say("removed");

    let UsbEvent::Added(again) = next(&mut w).await else {
        panic!("expected the token to re-appear")
    };
    assert_eq!(again.serial, a.serial);
    assert_eq!(again.devnum, 6, "re-enumerated at a new device number");
    assert_eq!(again.host_port(), "1-2");
    say("readded");

    let UsbEvent::Added(b) = next(&mut w).await else {
        panic!("expected a second token")
    };
    assert_eq!(b.id, a.id, "the same model");
    assert_eq!(b.serial.as_deref(), Some("0456CDEF"));
    assert_eq!(b.host_port(), "1-3");
    let now: Vec<_> = w
        .enumerate()
        .unwrap()
        .into_iter()
        .filter_map(|d| TokenSighting::of(&catalog, d))
        .filter_map(|t| t.device.serial)
        .collect();
    assert_eq!(now, ["0123ABCD", "0456CDEF"]);
    say("second");
}

/// A QEMU for the service test, outside the testbed (no fake sysfs for it), killed by
/// its PID and reaped when dropped.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn until(rx: &mut watch::Receiver<Status>, what: &str, want: impl Fn(&Status) -> bool) {
    // Bounds a hang only.
    let waited = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| want(s)))
        .await
        .map(|r| r.map(drop));
    match waited {
        Ok(r) => r.expect("service ended"),
        Err(_) => panic!(
            "token state never became: {what}; last: {:#?}",
            *rx.borrow()
        ),
    }
}

#[tokio::test]
async fn the_service_keeps_a_replugged_token_in_its_vm() {
    if !inside() {
        let script = data("hotplug.py");
        rerun(
            "the_service_keeps_a_replugged_token_in_its_vm",
            &[
                "umockdev-wrapper",
                "/usr/bin/python3",
                script.to_str().unwrap(),
            ],
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let signet = dir.path().join("signet.sock");
    let other = dir.path().join("qmp.sock");
    let _qemu = Qemu(
        std::process::Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-machine",
                "q35",
                "-nodefaults",
                "-nographic",
            ])
            .args(["-display", "none", "-S", "-device", "qemu-xhci,id=xhci"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", other.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=signet,path={},server=on,wait=off",
                signet.display()
            ))
            .args(["-mon", "chardev=signet,mode=control"])
            .env_remove("LD_PRELOAD")
            .env_remove("UMOCKDEV_DIR")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64"),
    );
    let setup = Setup {
        catalog: Catalog::default(),
        assignments: [("0123ABCD".to_owned(), 105)].into(),
        devices: Default::default(),
        monitors: vec![(105, signet)],
        usb_bus: "xhci.0".into(),
        qmp_timeout: Duration::from_secs(10),
        sysfs: "/sys".into(),
    };
    let (service, mut status) = TokenService::new(UdevWatcher::start().unwrap(), setup);
    let task = tokio::spawn(service.run());
    // Another monitor to look into the VM with.
    let mut look = Monitor::start(other, Duration::from_secs(10));
    while look.next().await != Some(MonitorEvent::Connected) {}
    let vm = look.qmp().unwrap();
    let id = device_id("0123ABCD");
    let in_vm = |s: &Status| {
        s.get("0123ABCD").map(|t| t.place.clone())
            == Some(State::Attaching {
                vmid: 105,
                accepted: true,
            })
    };
    say("ready");

    until(&mut status, "in VM 105", in_vm).await;
    // QEMU has the device (no real USB here, so it is not claimed).
    assert_eq!(vm.attached(&id).await.unwrap(), Some(false));
    say("added");

    until(&mut status, "absent", |s| {
        s.get("0123ABCD").map(|t| t.place.clone()) == Some(State::Absent)
    })
    .await;
    say("removed");

    // Back at a new device number: the old device goes, a new one comes.
    until(&mut status, "in VM 105 again", in_vm).await;
    assert_eq!(vm.attached(&id).await.unwrap(), Some(false));
    say("readded");

    // The same model, unassigned: stays on the host, never in the VM.
    until(&mut status, "second token on the host", |s| {
        s.get("0456CDEF").map(|t| t.place.clone()) == Some(State::OnHost)
    })
    .await;
    let reason = status.borrow()["0456CDEF"].last_change.reason.clone();
    assert!(reason.contains("not assigned"), "{reason}");
    assert_eq!(vm.attached(&device_id("0456CDEF")).await.unwrap(), None);
    assert!(in_vm(&status.borrow()));
    task.abort();
    say("second");
}

//! Token passthrough with the real `signetd` process: it runs inside a umockdev
//! testbed (`tests/fixtures/umockdev-driver.py` plugs and unplugs fake SafeNet tokens
//! when the test asks), keeps its token in a real QEMU through Signet's monitor socket,
//! and reports every change on `/v1/status`, over D-Bus (`TokenChanged`, `signetctl`)
//! on a private system-style bus. A second monitor on the same QEMU stands for
//! qemu-server's and for someone working behind the daemon's back.
//!
//! There is no USB on these machines: QEMU accepts a `usb-host` device for a host port
//! and keeps trying to claim it, so "in the VM" here is QEMU holding the device
//! (`attaching`, `accepted`), checked with `qom-get` on the second monitor.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use signet_test_support::*;
use signetd::adapters::qmp::{Monitor, MonitorEvent, Qmp};
use signetd::core::passthrough::device_id;

use super::dbus::{signetctl, Bus, Signals};

pub(crate) const SERIAL: &str = "0123ABCD";
const OTHER_SERIAL: &str = "0456CDEF";
pub(crate) const VM: u32 = 105;
/// Bounds a hang only: every wait below ends on an event.
const HANG: Duration = Duration::from_secs(60);

/// The signing VM's QEMU: Signet's monitor at `monitor_dir/vm-105.qmp` (where
/// `[passthrough] monitor_dir` says) and another monitor; killed by PID on drop.
pub(crate) struct Qemu(Child);

impl Qemu {
    pub(crate) fn start(signet: &std::path::Path, other: &std::path::Path) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-machine", "q35", "-nodefaults"])
            .args(["-nographic", "-display", "none", "-S"])
            .args(["-device", "qemu-xhci,id=xhci"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", other.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=signet,path={},server=on,wait=off",
                signet.display()
            ))
            .args(["-mon", "chardev=signet,mode=control"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/install-deps.sh installs it)");
        Qemu(child)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn in_vm(t: &Value) -> bool {
    t["state"] == "attaching" && t["vmid"] == VM && t["accepted"] == true
}

fn token<'a>(report: &'a Value, serial: &str) -> &'a Value {
    report["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["serial"] == serial)
        .unwrap_or_else(|| panic!("no token {serial} in {report:#}"))
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn signetd_keeps_its_token_in_its_vm_and_reports_it_everywhere() {
    let mut w = World::new();
    let bus = Bus::start(&w);
    let monitors = w.path("monitors");
    std::fs::create_dir(&monitors).unwrap();
    let other = w.path("qemu-server.qmp");
    let signet_monitor = signetd::adapters::proxmox::monitor_path(&monitors, VM);
    let qemu = Qemu::start(&signet_monitor, &other);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The second monitor, to look into the VM and act behind signetd's back.
    let (mut look, vm): (Monitor, Arc<Qmp>) = rt.block_on(async {
        let mut m = Monitor::start(other.clone(), Duration::from_secs(10));
        tokio::time::timeout(HANG, async {
            while m.next().await != Some(MonitorEvent::Connected) {}
        })
        .await
        .expect("QEMU's monitor");
        let q = m.qmp().unwrap();
        (m, q)
    });
    let id = device_id(SERIAL);
    let hostport = |vm: &Qmp| -> Option<String> {
        let args = serde_json::json!({"path": format!("/machine/peripheral/{id}"), "property": "hostport"});
        rt.block_on(vm.execute("qom-get", Some(args)))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
    };

    let http = w.path("signetd.sock");
    w.write_daemon_config(&format!(
        "listen = [\"unix:{}\"]\nagent = \"unix:{}\"\ndbus = \"{}\"\n\
         [passthrough]\nmonitor_dir = \"{}\"\n[[tokens]]\nserial = \"{SERIAL}\"\nvm = {VM}\n",
        http.display(),
        w.path("no-agent.sock").display(),
        bus.address,
        monitors.display(),
    ));
    let mut signals = Signals::follow(&bus.address, "TokenChanged");
    let (ep, mut testbed) = Testbed::start_daemon(&mut w);

    // Configured, not plugged in: listed as absent, with its VM.
    let (status, s) = call(&ep, "GET", "/v1/status", Vec::new());
    assert_eq!(status, 200);
    assert_eq!(s["tokens"]["watching"], true, "{s:#}");
    let t = token(&s["tokens"], SERIAL);
    assert_eq!(
        (t["state"].as_str(), t["assigned_vm"].as_u64()),
        (Some("absent"), Some(105))
    );

    // Plugged in: it goes to its VM by itself, at the port udev reported.
    testbed.ask(&format!("add 2 5 {SERIAL}"));
    let t = signals.wait_token(SERIAL, "in VM 105", in_vm);
    assert_eq!(t["host_port"], "1-2");
    assert_eq!(t["model"], "SafeNet eToken 5110");
    assert_eq!(t["usb_id"], "0529:0620");
    assert_eq!(
        hostport(&vm).as_deref(),
        Some("2"),
        "QEMU holds a usb-host for 1-2"
    );
    let (_, s) = call(&ep, "GET", "/v1/status", Vec::new());
    assert_eq!(
        token(&s["tokens"], SERIAL),
        &t,
        "status says what the signal said"
    );
    let out = signetctl(&bus, &["tokens", "--json"], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(token(&json(&out), SERIAL), &t, "one command, every front");
    let out = signetctl(&bus, &["status"], None);
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("usb:      0123ABCD  SafeNet eToken 5110  at 1-2  in VM 105"),
        "{screen}"
    );

    // Someone removes the device behind signetd's back: it is put back.
    let before = t["last_change"]["at"].clone();
    rt.block_on(vm.execute("device_del", Some(serde_json::json!({"id": id}))))
        .unwrap();
    let t = signals.wait_token(SERIAL, "back in VM 105", |t| {
        in_vm(t) && t["last_change"]["at"] != before
    });
    assert!(
        t["last_change"]["reason"]
            .as_str()
            .unwrap()
            .contains("accepted"),
        "{t}"
    );
    assert_eq!(hostport(&vm).as_deref(), Some("2"));

    // Unplugged, then back at another port with a new device number: re-attached
    // there.
    testbed.ask("remove 2");
    signals.wait_token(SERIAL, "absent", |t| t["state"] == "absent");
    testbed.ask(&format!("add 3 6 {SERIAL}"));
    let t = signals.wait_token(SERIAL, "in VM 105 at 1-3", in_vm);
    assert_eq!(t["host_port"], "1-3");
    assert_eq!(
        hostport(&vm).as_deref(),
        Some("3"),
        "the old device went, the new came"
    );

    // The operator: detach keeps it on the host; attach to another VM is refused;
    // attach and reattach put it back.
    let out = signetctl(&bus, &["detach", SERIAL, "--json"], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = json(&out);
    assert_eq!(t["state"], "on_host", "{t}");
    assert!(
        t["last_change"]["reason"]
            .as_str()
            .unwrap()
            .contains("signetctl attach"),
        "{t}"
    );
    assert_eq!(hostport(&vm), None, "no longer in the VM");

    let out = signetctl(&bus, &["attach", SERIAL, "--vm", "106", "--json"], None);
    assert_eq!(out.status.code(), Some(4));
    let err = json(&out);
    assert_eq!(err["code"], "forbidden", "{err}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("belongs to VM 105, not VM 106"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hostport(&vm), None);

    let out = signetctl(&bus, &["attach", SERIAL], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("0123ABCD  SafeNet eToken 5110  at 1-3  in VM 105"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(hostport(&vm).as_deref(), Some("3"));

    let out = signetctl(&bus, &["reattach", SERIAL, "--json"], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        in_vm(&json(&out)),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(json(&out)["last_change"]["reason"].as_str().is_some());
    assert_eq!(hostport(&vm).as_deref(), Some("3"));

    let out = signetctl(&bus, &["attach", "NOSUCH", "--json"], None);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(json(&out)["code"], "unknown_token");

    // The same model, not assigned: stays on the host, and cannot be attached.
    testbed.ask(&format!("add 4 7 {OTHER_SERIAL}"));
    let t = signals.wait_token(OTHER_SERIAL, "on the host", |t| t["state"] == "on_host");
    assert!(
        t["last_change"]["reason"]
            .as_str()
            .unwrap()
            .contains("not assigned"),
        "{t}"
    );
    let out = signetctl(&bus, &["attach", OTHER_SERIAL, "--vm", "105"], None);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[[tokens]]"),
        "the fix is named: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other_id = device_id(OTHER_SERIAL);
    assert_eq!(rt.block_on(vm.attached(&other_id)).unwrap(), None);
    assert_eq!(hostport(&vm).as_deref(), Some("3"), "ours is still there");

    // QEMU stops and a new one starts (`qm stop` / `qm start`, a crash): the token
    // waits on the host, then goes into the new QEMU by itself.
    drop(qemu);
    signals.wait_token(SERIAL, "on the host while the VM is down", |t| {
        t["state"] == "on_host"
    });
    let _qemu = Qemu::start(&signet_monitor, &other);
    let t = signals.wait_token(SERIAL, "in the new QEMU", in_vm);
    assert_eq!(t["host_port"], "1-3");
    let vm = rt.block_on(async {
        tokio::time::timeout(HANG, async {
            while look.next().await != Some(MonitorEvent::Connected) {}
        })
        .await
        .expect("the new QEMU's monitor");
        look.qmp().unwrap()
    });
    assert_eq!(
        hostport(&vm).as_deref(),
        Some("3"),
        "the new QEMU holds the token"
    );
}

#[test]
fn without_the_token_service_signetd_runs_and_says_why() {
    let mut w = World::new();
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &Endpoint::Unix(w.path("no-agent.sock")),
            "[passthrough]\nenabled = false\n",
        )
        .remove(0);
    let (status, report) = call(&ep, "GET", "/v1/tokens", Vec::new());
    assert_eq!(status, 200);
    assert_eq!(report["watching"], false);
    assert!(
        report["detail"]
            .as_str()
            .unwrap()
            .contains("enabled = false"),
        "{report}"
    );
    let out = signet(&ep, &["status"]);
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("usb:      tokens are not followed on this host"),
        "{screen}"
    );
}

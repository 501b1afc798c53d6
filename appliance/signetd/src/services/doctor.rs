//! `signetctl doctor`: is this host set up for signing, and if not, what to do. Each
//! check passes, fails (with the fix) or is skipped (when what it needs is unknown).
//!
//! [`gather`] reads the facts (I/O) under a host root directory (`[doctor] host_root`,
//! `/` on a real host; a fixture tree in tests): `/proc/modules`, `/dev/vhost-vsock`,
//! the USB devices in `/sys/bus/usb/devices`, the programs in `/proc/*/comm`, the
//! signing VM's configuration through the [`Proxmox`] port (`qm config`), the free
//! space under the state directory. [`judge`] turns facts into checks and is pure.

use std::path::Path;

use signet_api::operator::{CheckStatus, DoctorCheck};
use signet_api::wire::{AgentReport, AgentState, DaemonStatus};

use crate::adapters::proxmox::{self, Proxmox, VmConfig};
use crate::adapters::usb::{self, Interface, UsbDevice};
use crate::config::{DoctorConfig, VidPid};

/// How many days of certificate life left is too few.
pub const CERT_WARN_DAYS: i64 = 30;
/// The spool is too full at this share of its quota (percent).
pub const SPOOL_FULL_PERCENT: u64 = 90;
/// A clock before this (2025-01-01T00:00:00Z) is not set.
pub const CLOCK_FLOOR_UNIX: i64 = 1_735_689_600;
/// How far the audit log's newest record may be ahead of the clock, in seconds.
pub const CLOCK_SLACK_SECONDS: i64 = 60;

/// What [`judge`] looks at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// `/proc/modules`, if readable.
    pub modules: Option<String>,
    /// `/sys/module/vhost_vsock` exists (built in or loaded).
    pub vsock_module_dir: bool,
    pub vsock_device: bool,
    /// The signing VM and its configuration (or why it could not be read).
    pub vm: Option<(u32, Result<VmConfig, String>)>,
    /// The vsock CID the agent is reached at, when it is reached over vsock.
    pub agent_cid: Option<u32>,
    pub usb: Vec<UsbDevice>,
    pub programs: Vec<String>,
    /// The token's serial: the agent's, else the one a profile pins.
    pub serial: Option<String>,
    pub status: Option<DaemonStatus>,
    /// Spool bytes used and allowed; free bytes on the state directory's file system.
    pub spool: (u64, u64, Option<u64>),
    /// Now and the audit log's newest record, as Unix seconds.
    pub now: i64,
    pub newest_audit: Option<i64>,
}

fn check(name: &str, status: CheckStatus, summary: impl Into<String>) -> DoctorCheck {
    DoctorCheck {
        name: name.to_owned(),
        status,
        summary: summary.into(),
        fix: None,
    }
}

fn pass(name: &str, summary: impl Into<String>) -> DoctorCheck {
    check(name, CheckStatus::Pass, summary)
}

fn fail(name: &str, summary: impl Into<String>, fix: impl Into<String>) -> DoctorCheck {
    DoctorCheck {
        fix: Some(fix.into()),
        ..check(name, CheckStatus::Fail, summary)
    }
}

fn skip(name: &str, why: impl Into<String>) -> DoctorCheck {
    check(name, CheckStatus::Skip, why)
}

/// Every check, in order.
pub fn judge(f: &Facts) -> Vec<DoctorCheck> {
    let token = f
        .serial
        .as_deref()
        .and_then(|s| f.usb.iter().find(|d| d.serial.as_deref() == Some(s)));
    let mut out = vec![vhost_vsock(f), vsock_device(f)];
    out.extend(vm_checks(f, token));
    out.push(token_present(f, token));
    out.push(host_conflict(f, token));
    out.extend(agent_checks(f.status.as_ref()));
    out.push(spool(f.spool));
    out.push(clock(f.now, f.newest_audit));
    out.push(own_state(f.status.as_ref()));
    out
}

/// signetd's own state: its job database written, its audit log whole.
fn own_state(status: Option<&DaemonStatus>) -> DoctorCheck {
    match status.map(|s| s.faults.as_slice()) {
        None => skip("state", "the daemon's status is not known"),
        Some([]) => pass("state", "the job database is written and the audit log is whole"),
        Some(faults) => fail(
            "state",
            faults.join("; "),
            "see signetd's log; restore state_dir/signet.db from a backup when the audit log was cut or edited (`signetd audit verify` names the record)",
        ),
    }
}

fn vhost_vsock(f: &Facts) -> DoctorCheck {
    let loaded = f.vsock_module_dir
        || f.modules.as_deref().is_some_and(|m| {
            m.lines()
                .any(|l| l.split(' ').next() == Some("vhost_vsock"))
        });
    if loaded {
        pass("vhost_vsock", "the vhost_vsock module is loaded")
    } else {
        fail(
            "vhost_vsock",
            "the vhost_vsock module is not loaded: VMs get no vsock device, so build VMs cannot reach signetd",
            "modprobe vhost_vsock && echo vhost_vsock > /etc/modules-load.d/signet.conf",
        )
    }
}

fn vsock_device(f: &Facts) -> DoctorCheck {
    if f.vsock_device {
        pass("vsock_device", "/dev/vhost-vsock is present")
    } else {
        fail(
            "vsock_device",
            "/dev/vhost-vsock is missing",
            "load the module (modprobe vhost_vsock); if it is loaded, check that devtmpfs and udev run",
        )
    }
}

fn vm_checks(f: &Facts, token: Option<&UsbDevice>) -> Vec<DoctorCheck> {
    const NAMES: [&str; 4] = ["vm_vsock", "vm_monitor", "vm_usb", "usb_hotplug"];
    let Some((vmid, cfg)) = &f.vm else {
        return NAMES
            .iter()
            .map(|n| skip(n, "no signing VM is known: set [doctor] signing_vm in signetd.toml, or reach the agent over vsock:CID:7711"))
            .collect();
    };
    let vmid = *vmid;
    let cfg = match cfg {
        Ok(cfg) => cfg,
        Err(e) => {
            let mut v = vec![fail(
                "vm_vsock",
                format!("the configuration of signing VM {vmid} cannot be read: {e}"),
                format!("check that VM {vmid} exists on this node (qm list) and that signetd runs as root; or set [doctor] signing_vm"),
            )];
            v.extend(
                NAMES[1..]
                    .iter()
                    .map(|n| skip(n, format!("VM {vmid}'s configuration is not known"))),
            );
            return v;
        }
    };
    let enroll = |serial: Option<&str>| {
        format!(
            "signetd enroll signing-vm {vmid} --token {}",
            serial.unwrap_or("SERIAL")
        )
    };
    let args = cfg.get("args").unwrap_or("");
    let cid = f.agent_cid.unwrap_or(vmid);
    let vsock = args
        .split_whitespace()
        .find(|w| w.starts_with("vhost-vsock-pci"))
        .map(|dev| {
            dev.split(',')
                .find_map(|p| p.strip_prefix("guest-cid="))
                .unwrap_or("")
                .to_owned()
        });
    let mut out = Vec::new();
    out.push(match vsock {
        Some(c) if c == cid.to_string() => pass(
            "vm_vsock",
            format!("VM {vmid} has the vsock device (guest-cid={c})"),
        ),
        Some(c) => fail(
            "vm_vsock",
            format!("VM {vmid}'s vsock device has guest-cid={c}, but the agent is reached at CID {cid}"),
            format!("make them agree: `agent` in signetd.toml, or the guest-cid in VM {vmid}'s args: (qm config {vmid})"),
        ),
        None => fail(
            "vm_vsock",
            format!("VM {vmid} has no vsock device in args:"),
            enroll(f.serial.as_deref()),
        ),
    });
    let monitor = args.split_whitespace().any(|w| {
        w.split(',')
            .any(|p| p == format!("id={}", proxmox::MONITOR_ID))
    });
    out.push(if monitor {
        pass("vm_monitor", format!("VM {vmid} has Signet's monitor"))
    } else {
        fail(
            "vm_monitor",
            format!(
                "VM {vmid} has no Signet monitor in args:, so signetd cannot hot-plug the token"
            ),
            enroll(f.serial.as_deref()),
        )
    });
    out.push(vm_usb(vmid, cfg, f.serial.as_deref(), token, &enroll));
    out.push(match proxmox::check_usb_hotplug(vmid, cfg) {
        Ok(()) => pass(
            "usb_hotplug",
            format!("VM {vmid} can hot-plug USB (machine, ostype and hotplug allow it)"),
        ),
        Err(proxmox::EnrollError::NoUsbHotplug { why, .. }) => fail(
            "usb_hotplug",
            format!("VM {vmid} cannot hot-plug USB devices"),
            why,
        ),
        Err(e) => fail("usb_hotplug", e.to_string(), "see the message"),
    });
    out
}

fn vm_usb(
    vmid: u32,
    cfg: &VmConfig,
    serial: Option<&str>,
    token: Option<&UsbDevice>,
    enroll: &dyn Fn(Option<&str>) -> String,
) -> DoctorCheck {
    let usb: Vec<(String, String)> = (0..=proxmox::MAX_USB)
        .filter_map(|n| {
            let k = format!("usb{n}");
            cfg.get(&k).map(|v| (k, v.to_owned()))
        })
        .collect();
    let Some(dev) = token else {
        return match usb.first() {
            Some((k, v)) => skip(
                "vm_usb",
                format!("VM {vmid} has {k}: {v}; whether it is the token's is not known (the token is not on this host)"),
            ),
            None => fail(
                "vm_usb",
                format!("VM {vmid} has no usbN entry for a token"),
                enroll(serial),
            ),
        };
    };
    let port = format!("host={}", dev.host_port());
    let id = format!("host={:04x}:{:04x}", dev.id.vendor, dev.id.product);
    match usb
        .iter()
        .find(|(_, v)| v.split(',').next().is_some_and(|h| h == port || h == id))
    {
        Some((k, v)) => pass("vm_usb", format!("VM {vmid} has the token in {k}: {v}")),
        None => fail(
            "vm_usb",
            format!(
                "VM {vmid} has no usbN entry for the token at {}",
                dev.host_port()
            ),
            enroll(serial),
        ),
    }
}

fn token_present(f: &Facts, token: Option<&UsbDevice>) -> DoctorCheck {
    let Some(serial) = &f.serial else {
        return skip(
            "token_present",
            "the token's serial is not known: the agent has seen no token and no profile names one (profiles.NAME.token)",
        );
    };
    match token {
        Some(d) => pass(
            "token_present",
            format!(
                "token {serial} ({}) is plugged in at {}",
                d.product.as_deref().unwrap_or("USB device"),
                d.host_port()
            ),
        ),
        None => fail(
            "token_present",
            format!("token {serial} is not plugged into this host"),
            "plug it in; `signetd tokens` lists the tokens the host sees",
        ),
    }
}

fn host_conflict(f: &Facts, token: Option<&UsbDevice>) -> DoctorCheck {
    if let Some(why) = usb::host_program_conflict(&f.programs) {
        return fail(
            "host_conflict",
            "pcscd runs on the host and claims smart-card tokens",
            why,
        );
    }
    // usbfs on a token's interface is QEMU holding it for its VM (or a host program
    // through libusb, which pcscd above covers); any other driver keeps it on the host.
    if let Some(c) = token.and_then(|d| usb::conflicts(d).into_iter().find(|c| c.driver != "usbfs"))
    {
        return fail(
            "host_conflict",
            format!(
                "the host driver {} holds the token's interface {}",
                c.driver, c.interface
            ),
            c.fix,
        );
    }
    pass("host_conflict", "no host driver or pcscd holds the token")
}

fn agent_checks(status: Option<&DaemonStatus>) -> Vec<DoctorCheck> {
    const NAMES: [&str; 3] = ["logged_in", "pin", "certificate"];
    let health = match status.map(|s| &s.agent) {
        Some(AgentReport::Reachable { health, endpoint }) => {
            let mut v = vec![pass(
                "agent",
                format!("the agent at {endpoint} answers (signet-agent {})", health.version),
            )];
            v.extend(agent_state(health));
            return v;
        }
        Some(AgentReport::Unreachable { endpoint, error }) => fail(
            "agent",
            format!("the agent at {endpoint} does not answer ({})", error.code),
            "start the signing VM and signet-agent in it (qm start VMID; systemctl status signet-agent), and check `agent` in signetd.toml",
        ),
        None => fail("agent", "the daemon's status is not known", "systemctl status signetd"),
    };
    let mut v = vec![health];
    v.extend(NAMES.iter().map(|n| skip(n, "the agent does not answer")));
    v
}

fn agent_state(h: &signet_api::wire::AgentHealth) -> Vec<DoctorCheck> {
    let mut out = Vec::new();
    out.push(if h.logged_in {
        pass("logged_in", "the agent is logged in to the token")
    } else {
        let fix = match h.state {
            AgentState::TokenMissing | AgentState::TokenLost => {
                "pass the token to the signing VM (see vm_usb and token_present above), then check `signet-agent tokens` in the VM"
            }
            AgentState::ModuleError => "run `signet-agent doctor` in the signing VM: the PKCS#11 module does not load",
            _ => "see the pin check below",
        };
        fail(
            "logged_in",
            format!("the agent is not logged in: {}", h.detail),
            fix,
        )
    });
    let flags = h.pin.unwrap_or_default();
    out.push(match h.state {
        AgentState::PinNeeded => fail(
            "pin",
            "no PIN is configured",
            "set pin_file in signetd.toml (the host gives the agent the PIN whenever it needs one), or token.pin_file in the signing VM's agent.toml",
        ),
        AgentState::PinRejected => fail(
            "pin",
            "the token refused the configured PIN; it is not tried again",
            "put the right PIN in the PIN file (pin_file in signetd.toml, or token.pin_file in agent.toml); check the token's retry counter first",
        ),
        AgentState::PinLocked => fail(
            "pin",
            "the token's PIN is locked or on its final try; Signet does not log in",
            "unlock the token with its SO PIN (vendor tool) before anything else tries the PIN",
        ),
        _ if flags.locked || flags.final_try => fail(
            "pin",
            "the token's PIN is locked or on its final try",
            "unlock the token with its SO PIN (vendor tool)",
        ),
        _ if h.logged_in => pass("pin", "a PIN is configured and the token accepted it"),
        _ => skip("pin", "the token is not present, so the PIN cannot be checked"),
    });
    // Windows signing VMs: Remote Desktop would hide the token.
    if let Some(w) = &h.windows {
        out.push(match w.problem() {
            Some((why, fix)) => fail("remote_desktop", why, fix),
            None => pass(
                "remote_desktop",
                "smart-card redirection is off in the signing VM: Remote Desktop leaves the token with the agent",
            ),
        });
    }
    out.push(match h.certificates.iter().min_by_key(|c| c.days_left) {
        None => skip("certificate", "the agent sees no certificate on the token"),
        Some(c) if c.days_left < 0 => fail(
            "certificate",
            format!("the certificate {} expired on {}", c.subject, c.not_after),
            "renew it with your CA and import the new certificate to the token",
        ),
        Some(c) if c.days_left < CERT_WARN_DAYS => fail(
            "certificate",
            format!(
                "the certificate {} expires in {} days ({})",
                c.subject, c.days_left, c.not_after
            ),
            "renew it with your CA now and import the new certificate to the token",
        ),
        Some(c) => pass(
            "certificate",
            format!(
                "the certificate {} is valid for {} more days",
                c.subject, c.days_left
            ),
        ),
    });
    out
}

fn mib(b: u64) -> u64 {
    b >> 20
}

fn spool((used, quota, free): (u64, u64, Option<u64>)) -> DoctorCheck {
    if quota > 0 && used.saturating_mul(100) >= quota.saturating_mul(SPOOL_FULL_PERCENT) {
        return fail(
            "spool",
            format!("the spool is {} of {} MiB full", mib(used), mib(quota)),
            "fetch or let results expire (queue.result_ttl_seconds), or raise queue.spool_quota_mb",
        );
    }
    let room = quota.saturating_sub(used);
    match free {
        Some(free) if free < room => fail(
            "spool",
            format!(
                "the disk under state_dir has {} MiB free, less than the spool may still use ({} MiB)",
                mib(free),
                mib(room)
            ),
            "free disk space there, or lower queue.spool_quota_mb",
        ),
        _ => pass(
            "spool",
            format!("spool {} of {} MiB used", mib(used), mib(quota)),
        ),
    }
}

fn clock(now: i64, newest_audit: Option<i64>) -> DoctorCheck {
    let fix = "set the time and keep it synchronised: timedatectl set-ntp true (check `timedatectl status`)";
    if now < CLOCK_FLOOR_UNIX {
        return fail(
            "clock",
            format!("the clock says {}, before 2025", rfc3339(now)),
            fix,
        );
    }
    match newest_audit {
        Some(t) if t > now + CLOCK_SLACK_SECONDS => fail(
            "clock",
            format!(
                "the clock ({}) is behind the audit log's newest record ({})",
                rfc3339(now),
                rfc3339(t)
            ),
            fix,
        ),
        _ => pass("clock", "the clock is set and not behind the audit log"),
    }
}

use signet_api::rfc3339::from_unix_seconds as rfc3339;

/// An RFC 3339 time as Unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    signet_api::rfc3339::parse(s).map(|t| t.unix_timestamp())
}

/// The USB devices under `root/sys/bus/usb/devices`, as sysfs describes them.
pub fn read_usb(root: &Path) -> Vec<UsbDevice> {
    let dir = root.join("sys/bus/usb/devices");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let attr = |p: &Path, a: &str| {
        std::fs::read_to_string(p.join(a))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    names
        .iter()
        .filter_map(|name| {
            let (bus, port) = usb::parse_sysname(name)?;
            let path = dir.join(name);
            let hex = |a: &str| attr(&path, a).and_then(|v| u16::from_str_radix(&v, 16).ok());
            let interfaces = names
                .iter()
                .filter(|n| {
                    n.strip_prefix(name.as_str())
                        .is_some_and(|r| r.starts_with(':'))
                })
                .map(|n| {
                    let ip = dir.join(n);
                    Interface {
                        name: n.clone(),
                        class: attr(&ip, "bInterfaceClass")
                            .and_then(|c| u8::from_str_radix(&c, 16).ok())
                            .unwrap_or(0),
                        driver: std::fs::read_link(ip.join("driver"))
                            .ok()
                            .and_then(|l| l.file_name().map(|f| f.to_string_lossy().into_owned())),
                    }
                })
                .collect();
            Some(UsbDevice {
                syspath: path.clone(),
                id: VidPid {
                    vendor: hex("idVendor")?,
                    product: hex("idProduct")?,
                },
                bus,
                devnum: attr(&path, "devnum")
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(0),
                port,
                serial: attr(&path, "serial"),
                manufacturer: attr(&path, "manufacturer"),
                product: attr(&path, "product"),
                interfaces,
            })
        })
        .collect()
}

/// The names of the programs running, from `root/proc/*/comm`.
pub fn read_programs(root: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(root.join("proc")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|c| c.trim_end().to_owned())
        .collect()
}

/// Free bytes on the file system that holds `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available().saturating_mul(s.fragment_size()))
}

/// The host facts under `cfg.host_root` (the daemon's own facts — status, spool, audit —
/// are filled in by the caller).
pub fn gather(cfg: &DoctorConfig, pve: &dyn Proxmox, signing_vm: Option<u32>) -> Facts {
    let root = &cfg.host_root;
    Facts {
        modules: std::fs::read_to_string(root.join("proc/modules")).ok(),
        vsock_module_dir: root.join("sys/module/vhost_vsock").is_dir(),
        vsock_device: root.join("dev/vhost-vsock").exists(),
        vm: signing_vm.map(|vmid| (vmid, pve.config(vmid).map_err(|e| e.to_string()))),
        usb: read_usb(root),
        programs: read_programs(root),
        ..Facts::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_api::wire::{AgentHealth, CertificateSummary, ErrorBody, ErrorCode, PinFlags};

    fn find<'a>(checks: &'a [DoctorCheck], name: &str) -> &'a DoctorCheck {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
    }

    fn health(state: AgentState, logged_in: bool, days_left: i64) -> AgentHealth {
        AgentHealth {
            version: "0.1.0".into(),
            instance: None,
            state,
            detail: "d".into(),
            module: "m".into(),
            module_loaded: true,
            slot: Some(1),
            token_present: true,
            token: None,
            logged_in,
            pin: Some(PinFlags::default()),
            certificates: vec![CertificateSummary {
                label: "k".into(),
                id: "01".into(),
                subject: "CN=Test".into(),
                issuer: "CN=Test".into(),
                sha256: "ab".into(),
                sha1: String::new(),
                not_before: "2026-01-01T00:00:00Z".into(),
                not_after: "2027-01-01T00:00:00Z".into(),
                days_left,
            }],
            signer: "osslsigncode 2.9".into(),
            signer_features: None,
            windows: None,
        }
    }

    fn status(agent: AgentReport) -> DaemonStatus {
        DaemonStatus {
            version: "0.1.0".into(),
            signing_works: true,
            default_profile: None,
            profiles: vec![],
            agent,
            queue: None,
            recovery: vec![],
            tokens: None,
            faults: vec![],
        }
    }

    fn token() -> UsbDevice {
        UsbDevice {
            syspath: "/sys/devices/usb1/1-2".into(),
            id: VidPid {
                vendor: 0x0529,
                product: 0x0620,
            },
            bus: 1,
            devnum: 5,
            port: "2".into(),
            serial: Some("0123abcd".into()),
            manufacturer: None,
            product: Some("eToken".into()),
            interfaces: vec![Interface {
                name: "1-2:1.0".into(),
                class: 0x0b,
                driver: Some("usbfs".into()),
            }],
        }
    }

    /// A host where everything is right.
    fn healthy() -> Facts {
        Facts {
            modules: Some("vhost_vsock 24576 0 - Live 0x0\nvhost 57344 1 vhost_vsock, Live 0x0\n".into()),
            vsock_module_dir: false,
            vsock_device: true,
            vm: Some((
                105,
                Ok(VmConfig::parse(
                    "ostype: l26\nmachine: q35\nusb0: host=1-2\nargs: -device vhost-vsock-pci,guest-cid=105 -chardev socket,id=signet,path=/run/signet/vm-105.qmp,server=on,wait=off -mon chardev=signet,mode=control\n",
                )),
            )),
            agent_cid: Some(105),
            usb: vec![token()],
            programs: vec!["systemd".into(), "qemu-system-x86".into()],
            serial: Some("0123abcd".into()),
            status: Some(status(AgentReport::Reachable {
                endpoint: "vsock:105:7711".into(),
                health: Box::new(health(AgentState::Ready, true, 300)),
            })),
            spool: (10 << 20, 2048 << 20, Some(100 << 30)),
            now: 1_795_000_000,
            newest_audit: Some(1_794_999_990),
        }
    }

    #[test]
    fn the_appliances_own_faults_fail_the_state_check() {
        let mut f = healthy();
        if let Some(s) = f.status.as_mut() {
            s.faults = vec!["the audit log is broken: record 3 was deleted".into()];
        }
        let checks = judge(&f);
        let c = find(&checks, "state");
        assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
        assert!(c.summary.contains("record 3"), "{c:?}");
        assert!(c.fix.as_deref().unwrap_or("").contains("backup"), "{c:?}");
    }

    #[test]
    fn a_healthy_host_passes_every_check() {
        let checks = judge(&healthy());
        for c in &checks {
            assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        }
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "vhost_vsock",
                "vsock_device",
                "vm_vsock",
                "vm_monitor",
                "vm_usb",
                "usb_hotplug",
                "token_present",
                "host_conflict",
                "agent",
                "logged_in",
                "pin",
                "certificate",
                "spool",
                "clock",
                "state"
            ]
        );
    }

    /// Each broken fact fails its own check (with a fix) and only that one.
    #[test]
    fn each_fault_fails_its_check_with_a_fix() {
        type Break = fn(&mut Facts);
        let cases: Vec<(&str, Break, &str)> = vec![
            (
                "vhost_vsock",
                |f| f.modules = Some("kvm 1 0\n".into()),
                "modprobe vhost_vsock",
            ),
            ("vsock_device", |f| f.vsock_device = false, "modprobe"),
            (
                "vm_vsock",
                |f| {
                    set_vm(
                        f,
                        "ostype: l26\nusb0: host=1-2\nargs: -chardev socket,id=signet,path=/x",
                    )
                },
                "signetd enroll signing-vm 105 --token 0123abcd",
            ),
            ("vm_vsock", |f| f.agent_cid = Some(200), "guest-cid"),
            (
                "vm_monitor",
                |f| {
                    set_vm(
                        f,
                        "ostype: l26\nusb0: host=1-2\nargs: -device vhost-vsock-pci,guest-cid=105",
                    )
                },
                "signetd enroll",
            ),
            (
                "vm_usb",
                |f| {
                    set_vm(f, "ostype: l26\nusb0: host=3-1\nargs: -device vhost-vsock-pci,guest-cid=105 -chardev socket,id=signet,path=/x")
                },
                "signetd enroll",
            ),
            (
                "usb_hotplug",
                |f| {
                    set_vm(f, "ostype: win7\nusb0: host=1-2\nargs: -device vhost-vsock-pci,guest-cid=105 -chardev socket,id=signet,path=/x")
                },
                "ostype",
            ),
            (
                "usb_hotplug",
                |f| {
                    set_vm(f, "ostype: l26\nmachine: pc-q35-6.0\nusb0: host=1-2\nargs: -device vhost-vsock-pci,guest-cid=105 -chardev socket,id=signet,path=/x")
                },
                "machine",
            ),
            (
                "usb_hotplug",
                |f| {
                    set_vm(f, "ostype: l26\nhotplug: disk,network\nusb0: host=1-2\nargs: -device vhost-vsock-pci,guest-cid=105 -chardev socket,id=signet,path=/x")
                },
                "--hotplug",
            ),
            ("token_present", |f| f.usb.clear(), "signetd tokens"),
            (
                "host_conflict",
                |f| f.programs.push("pcscd".into()),
                "pcscd",
            ),
            (
                "host_conflict",
                |f| f.usb[0].interfaces[0].driver = Some("usbhid".into()),
                "unbind",
            ),
            ("agent", |f| set_agent_down(f), "signet-agent"),
            (
                "logged_in",
                |f| set_health(f, health(AgentState::TokenMissing, false, 300)),
                "pass the token",
            ),
            (
                "pin",
                |f| set_health(f, health(AgentState::PinNeeded, false, 300)),
                "pin_file",
            ),
            (
                "pin",
                |f| set_health(f, health(AgentState::PinRejected, false, 300)),
                "right PIN",
            ),
            (
                "pin",
                |f| set_health(f, health(AgentState::PinLocked, false, 300)),
                "SO PIN",
            ),
            (
                "certificate",
                |f| set_health(f, health(AgentState::Ready, true, 12)),
                "renew",
            ),
            (
                "certificate",
                |f| set_health(f, health(AgentState::Ready, true, -3)),
                "renew",
            ),
            (
                "spool",
                |f| f.spool = (1900 << 20, 2048 << 20, Some(100 << 30)),
                "spool_quota_mb",
            ),
            (
                "spool",
                |f| f.spool = (0, 2048 << 20, Some(5 << 20)),
                "free disk space",
            ),
            ("clock", |f| f.now = 1_000_000_000, "timedatectl"),
            (
                "clock",
                |f| f.newest_audit = Some(f.now + 3600),
                "timedatectl",
            ),
        ];
        for (name, breaks, fix) in cases {
            let mut f = healthy();
            breaks(&mut f);
            let checks = judge(&f);
            let c = find(&checks, name);
            assert_eq!(c.status, CheckStatus::Fail, "{name}: {c:?}");
            let got = c.fix.as_deref().unwrap_or("");
            assert!(got.contains(fix), "{name}: fix {got:?} should say {fix:?}");
        }
    }

    fn set_vm(f: &mut Facts, text: &str) {
        f.vm = Some((105, Ok(VmConfig::parse(text))));
    }

    fn set_health(f: &mut Facts, h: AgentHealth) {
        f.status = Some(status(AgentReport::Reachable {
            endpoint: "vsock:105:7711".into(),
            health: Box::new(h),
        }));
    }

    fn set_agent_down(f: &mut Facts) {
        f.status = Some(status(AgentReport::Unreachable {
            endpoint: "vsock:105:7711".into(),
            error: ErrorBody::new(ErrorCode::AgentUnavailable, "not reachable"),
        }));
    }

    #[test]
    fn what_cannot_be_known_is_skipped_not_failed() {
        let mut f = healthy();
        f.vm = None;
        f.serial = None;
        set_agent_down(&mut f);
        let checks = judge(&f);
        for n in [
            "vm_vsock",
            "vm_monitor",
            "vm_usb",
            "usb_hotplug",
            "token_present",
            "logged_in",
            "pin",
            "certificate",
        ] {
            assert_eq!(find(&checks, n).status, CheckStatus::Skip, "{n}");
        }
        let mut f = healthy();
        f.vm = Some((105, Err("no such VM".into())));
        let checks = judge(&f);
        assert_eq!(find(&checks, "vm_vsock").status, CheckStatus::Fail);
        assert_eq!(find(&checks, "usb_hotplug").status, CheckStatus::Skip);
    }

    #[test]
    fn the_doctor_section_is_read_from_signetd_toml() {
        let path = Path::new("signetd.toml");
        let cfg = crate::config::Config::parse(path, "agent = \"vsock:105:7711\"\n").unwrap();
        assert_eq!(cfg.doctor, DoctorConfig::default());
        assert_eq!(cfg.doctor.host_root, Path::new("/"));
        let cfg = crate::config::Config::parse(
            path,
            "agent = \"vsock:105:7711\"\n[doctor]\nhost_root = \"/tmp/host\"\nqm = \"/usr/local/bin/qm\"\nsigning_vm = 107\n",
        )
        .unwrap();
        assert_eq!(
            cfg.doctor,
            DoctorConfig {
                host_root: "/tmp/host".into(),
                qm: "/usr/local/bin/qm".into(),
                signing_vm: Some(107),
            }
        );
        let err = crate::config::Config::parse(
            path,
            "agent = \"vsock:105:7711\"\n[doctor]\nroot = \"/\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("root"), "{err}");
    }

    /// The readers against a fixture tree: a token with a driver on its interface,
    /// programs, the module list and the device node.
    #[test]
    fn host_facts_are_read_from_a_root_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let dev = r.join("sys/bus/usb/devices/1-2");
        let intf = r.join("sys/bus/usb/devices/1-2:1.0");
        let driver = r.join("sys/bus/usb/drivers/usbhid");
        for d in [
            &dev,
            &intf,
            &driver,
            &r.join("proc/42"),
            &r.join("dev"),
            &r.join("sys/bus/usb/devices/usb1"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        for (k, v) in [
            ("idVendor", "0529"),
            ("idProduct", "0620"),
            ("serial", "0123abcd"),
            ("devnum", "5"),
            ("product", "eToken"),
        ] {
            std::fs::write(dev.join(k), format!("{v}\n")).unwrap();
        }
        std::fs::write(intf.join("bInterfaceClass"), "0b\n").unwrap();
        std::os::unix::fs::symlink(&driver, intf.join("driver")).unwrap();
        std::fs::write(r.join("proc/42/comm"), "pcscd\n").unwrap();
        std::fs::write(r.join("proc/modules"), "vhost_vsock 1 0 - Live 0x0\n").unwrap();
        std::fs::write(r.join("dev/vhost-vsock"), "").unwrap();

        let usb = read_usb(r);
        assert_eq!(usb.len(), 1, "{usb:?}");
        assert_eq!(usb[0].serial.as_deref(), Some("0123abcd"));
        assert_eq!(usb[0].host_port(), "1-2");
        assert_eq!(usb[0].interfaces[0].class, 0x0b);
        assert_eq!(usb[0].interfaces[0].driver.as_deref(), Some("usbhid"));
        assert_eq!(read_programs(r), ["pcscd"]);

        struct NoVm;
        impl Proxmox for NoVm {
            fn config(&self, _: u32) -> Result<VmConfig, proxmox::PveError> {
                Err(proxmox::PveError::Failed {
                    command: "qm config 105".into(),
                    status: "exit status: 2".into(),
                    stderr: "does not exist".into(),
                })
            }
            fn apply(&self, _: &proxmox::Plan) -> Result<(), proxmox::PveError> {
                Ok(())
            }
        }
        let cfg = DoctorConfig {
            host_root: r.to_owned(),
            ..DoctorConfig::default()
        };
        let mut f = gather(&cfg, &NoVm, Some(105));
        f.serial = Some("0123abcd".into());
        f.now = 1_795_000_000;
        let checks = judge(&f);
        assert_eq!(find(&checks, "vhost_vsock").status, CheckStatus::Pass);
        assert_eq!(find(&checks, "vsock_device").status, CheckStatus::Pass);
        assert_eq!(find(&checks, "token_present").status, CheckStatus::Pass);
        assert_eq!(find(&checks, "host_conflict").status, CheckStatus::Fail);
        assert!(find(&checks, "vm_vsock").summary.contains("does not exist"));

        // The same tree, emptied: each fails.
        std::fs::remove_file(r.join("dev/vhost-vsock")).unwrap();
        std::fs::write(r.join("proc/modules"), "kvm 1 0 - Live 0x0\n").unwrap();
        std::fs::remove_dir_all(&dev).unwrap();
        let mut f = gather(&cfg, &NoVm, None);
        f.serial = Some("0123abcd".into());
        f.now = 1_795_000_000;
        let checks = judge(&f);
        for n in ["vhost_vsock", "vsock_device", "token_present"] {
            assert_eq!(find(&checks, n).status, CheckStatus::Fail, "{n}");
        }
        assert!(free_bytes(r).is_some());
    }

    #[test]
    fn remote_desktop_on_a_windows_signing_vm_is_checked_with_the_fix() {
        let mut h = health(AgentState::Ready, true, 200);
        assert!(
            agent_state(&h).iter().all(|c| c.name != "remote_desktop"),
            "not on Linux"
        );
        h.windows = Some(signet_api::wire::WindowsSessions {
            remote_desktop_active: true,
            smart_card_redirection_disabled: Some(false),
        });
        let checks = agent_state(&h);
        let c = checks.iter().find(|c| c.name == "remote_desktop").unwrap();
        assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
        assert!(
            c.fix.as_deref().unwrap().contains("fEnableSmartCard"),
            "{c:?}"
        );
        h.windows = Some(signet_api::wire::WindowsSessions {
            remote_desktop_active: true,
            smart_card_redirection_disabled: Some(true),
        });
        let checks = agent_state(&h);
        let c = checks.iter().find(|c| c.name == "remote_desktop").unwrap();
        assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
    }
}

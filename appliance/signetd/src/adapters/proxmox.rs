//! Persistent VM configuration through Proxmox: the [`Proxmox`] port and its real
//! adapter [`Qm`], which runs `qm config` / `qm set` as root (setting `usbN: host=` and
//! `args:` is root@pam only).
//!
//! The decisions are pure and unit-tested against recorded `qm config` outputs:
//! [`VmConfig::parse`], whether the VM can hot-plug USB ([`check_usb_hotplug`]), which
//! `usbN` is free, and how Signet's own arguments — the vsock device
//! (`-device vhost-vsock-pci,guest-cid=VMID`) and, for the signing VM, Signet's QMP
//! monitor (`-chardev socket,id=signet,… -mon chardev=signet,mode=control`) — are added
//! to `args:` without touching what the user had there ([`merge_args`]). A [`Plan`] is
//! the exact change; `--dry-run` prints it instead of applying it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::process::Command;

/// The chardev id of Signet's monitor in a VM's `args:`.
pub const MONITOR_ID: &str = "signet";
/// The highest `usbN` on machine ≥ 7.1 with a modern ostype.
pub const MAX_USB: u32 = 13;

/// A VM's configuration as `qm config` prints it: `key: value` lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmConfig {
    pub entries: BTreeMap<String, String>,
}

impl VmConfig {
    /// Parses `qm config` output; lines that are not `key: value` (comments) are skipped.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                let ok = !k.is_empty()
                    && k.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                    });
                ok.then(|| (k.to_owned(), v.trim().to_owned()))
            })
            .collect();
        VmConfig { entries }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }
}

/// Why a VM cannot be enrolled as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnrollError {
    #[error("VM {vmid} cannot hot-plug USB devices: {why}")]
    NoUsbHotplug { vmid: u32, why: String },
    #[error("VM {vmid} cannot reach Signet over virtio-vsock: {why}")]
    NoVsockGuest { vmid: u32, why: String },
    #[error("VM {vmid} has no free USB slot (usb0..usb{MAX_USB} are all set); remove one with `qm set {vmid} --delete usbN`")]
    NoFreeUsb { vmid: u32 },
    #[error("VM {vmid}'s args: already has a vhost-vsock-pci device with guest-cid={found}; Signet maps vsock CIDs to VMs one to one (guest-cid={vmid}): change it by hand or remove it")]
    OtherCid { vmid: u32, found: String },
    #[error("VM {vmid}'s args: already has a chardev with id={MONITOR_ID} on another path; remove it so Signet can add its own")]
    OtherMonitor { vmid: u32 },
    #[error("the monitor socket path {0:?} cannot go into QEMU's arguments (no commas, spaces or quotes)")]
    BadMonitorPath(String),
}

/// Whether qemu-server can hot-plug `usb-host` devices into this VM: a modern ostype
/// (`l26`, Windows 8 or newer), a machine version of 7.1 or newer (or an unversioned
/// machine, which starts as the newest), and `hotplug` including `usb`.
pub fn check_usb_hotplug(vmid: u32, cfg: &VmConfig) -> Result<(), EnrollError> {
    let refuse = |why: String| Err(EnrollError::NoUsbHotplug { vmid, why });
    let ostype = cfg.get("ostype").unwrap_or("other");
    if !matches!(ostype, "l26" | "win8" | "win10" | "win11") {
        return refuse(format!(
            "ostype {ostype} gets the old USB controller; set a modern one if the guest is one: `qm set {vmid} --ostype l26` (Linux) or win10/win11"
        ));
    }
    if let Some(machine) = cfg.get("machine") {
        let ty = machine
            .split(',')
            .find_map(|p| match p.split_once('=') {
                Some(("type", t)) => Some(t),
                Some(_) => None,
                None => Some(p),
            })
            .unwrap_or("");
        if let Some(version) = machine_version(ty) {
            if version < (7, 1) {
                return refuse(format!(
                    "machine {ty} is pinned below 7.1, which has no qemu-xhci controller; raise it (e.g. `qm set {vmid} --machine q35`) and restart the VM"
                ));
            }
        }
    }
    if let Some(hotplug) = cfg.get("hotplug") {
        let usb = hotplug == "1" || hotplug.split(',').any(|h| h == "usb");
        if !usb {
            return refuse(format!(
                "hotplug is {hotplug:?}; add usb: `qm set {vmid} --hotplug network,disk,usb`"
            ));
        }
    }
    Ok(())
}

/// `pc-q35-8.1+pve0` → (8, 1); unversioned (`q35`, `pc`) → `None`.
fn machine_version(ty: &str) -> Option<(u32, u32)> {
    let ty = ty.split('+').next()?;
    let v = ty
        .strip_prefix("pc-q35-")
        .or_else(|| ty.strip_prefix("pc-i440fx-"))?;
    let (major, minor) = v.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The `usbN` already set to `host=PORT`, else the first free one.
pub fn usb_slot(vmid: u32, cfg: &VmConfig, host_port: &str) -> Result<(String, bool), EnrollError> {
    let want = format!("host={host_port}");
    for n in 0..=MAX_USB {
        let key = format!("usb{n}");
        if cfg
            .get(&key)
            .is_some_and(|v| v.split(',').next() == Some(want.as_str()))
        {
            return Ok((key, true));
        }
    }
    (0..=MAX_USB)
        .map(|n| format!("usb{n}"))
        .find(|k| cfg.get(k).is_none())
        .map(|k| (k, false))
        .ok_or(EnrollError::NoFreeUsb { vmid })
}

/// `args:` with Signet's vsock device (and monitor, when given) added after what the
/// user had; `None` when nothing needs adding.
pub fn merge_args(
    vmid: u32,
    existing: Option<&str>,
    monitor: Option<&str>,
) -> Result<Option<String>, EnrollError> {
    let existing = existing.unwrap_or("").trim();
    let words: Vec<&str> = existing.split_whitespace().collect();
    let mut add: Vec<String> = Vec::new();
    match words.iter().find(|w| w.starts_with("vhost-vsock-pci")) {
        Some(dev) => {
            let cid = dev
                .split(',')
                .find_map(|p| p.strip_prefix("guest-cid="))
                .unwrap_or("");
            if cid != vmid.to_string() {
                return Err(EnrollError::OtherCid {
                    vmid,
                    found: cid.to_owned(),
                });
            }
        }
        None => add.push(format!("-device vhost-vsock-pci,guest-cid={vmid}")),
    }
    if let Some(path) = monitor {
        if path.is_empty()
            || path
                .chars()
                .any(|c| c == ',' || c.is_whitespace() || c == '"' || c == '\'')
        {
            return Err(EnrollError::BadMonitorPath(path.to_owned()));
        }
        let ours = words.iter().find(|w| {
            w.split(',')
                .any(|p| p == format!("id={MONITOR_ID}").as_str())
        });
        match ours {
            Some(chardev) => {
                if !chardev.split(',').any(|p| p == format!("path={path}")) {
                    return Err(EnrollError::OtherMonitor { vmid });
                }
            }
            None => add.push(format!(
                "-chardev socket,id={MONITOR_ID},path={path},server=on,wait=off -mon chardev={MONITOR_ID},mode=control"
            )),
        }
    }
    if add.is_empty() {
        return Ok(None);
    }
    let mut out = existing.to_owned();
    for a in add {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&a);
    }
    Ok(Some(out))
}

/// One key's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub old: Option<String>,
    pub new: String,
}

/// The exact configuration change for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub vmid: u32,
    pub changes: Vec<Change>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "VM {}: already enrolled, nothing to change", self.vmid);
        }
        writeln!(f, "VM {}:", self.vmid)?;
        for c in &self.changes {
            writeln!(
                f,
                "  - {}: {}",
                c.key,
                c.old.as_deref().unwrap_or("(unset)")
            )?;
            writeln!(f, "  + {}: {}", c.key, c.new)?;
        }
        Ok(())
    }
}

/// The signing VM's change: the token's port as `usbN: host=BUS-PORT`, and Signet's
/// vsock device and monitor in `args:`.
pub fn plan_signing_vm(
    vmid: u32,
    cfg: &VmConfig,
    host_port: &str,
    monitor: &str,
) -> Result<Plan, EnrollError> {
    check_usb_hotplug(vmid, cfg)?;
    let mut changes = Vec::new();
    let (key, present) = usb_slot(vmid, cfg, host_port)?;
    if !present {
        changes.push(Change {
            key,
            old: None,
            new: format!("host={host_port}"),
        });
    }
    if let Some(args) = merge_args(vmid, cfg.get("args"), Some(monitor))? {
        changes.push(Change {
            key: "args".into(),
            old: cfg.get("args").map(str::to_owned),
            new: args,
        });
    }
    Ok(Plan { vmid, changes })
}

/// Whether a build VM's guest can speak virtio-vsock to the host: Linux (`l26`, whose
/// kernels have the driver since 4.8) or Windows 10/11 and their servers (`win10`,
/// `win11`, the guests virtio-win's `viosock` driver supports). The machine version
/// does not matter: `vhost-vsock-pci` plugs into every PCI machine. An older or unknown
/// ostype is refused, because `signet sign` would find no way to the host.
pub fn check_vsock_guest(vmid: u32, cfg: &VmConfig) -> Result<(), EnrollError> {
    let ostype = cfg.get("ostype").unwrap_or("other");
    if matches!(ostype, "l26" | "win10" | "win11") {
        return Ok(());
    }
    Err(EnrollError::NoVsockGuest {
        vmid,
        why: format!(
            "ostype {ostype} has no virtio-vsock driver Signet knows of (Linux, or Windows 10/11 with virtio-win's viosock); if the guest is one, say so: `qm set {vmid} --ostype l26` (Linux) or win10/win11"
        ),
    })
}

/// A build VM's change: Signet's vsock device in `args:`.
pub fn plan_build_vm(vmid: u32, cfg: &VmConfig) -> Result<Plan, EnrollError> {
    check_vsock_guest(vmid, cfg)?;
    let mut changes = Vec::new();
    if let Some(args) = merge_args(vmid, cfg.get("args"), None)? {
        changes.push(Change {
            key: "args".into(),
            old: cfg.get("args").map(str::to_owned),
            new: args,
        });
    }
    Ok(Plan { vmid, changes })
}

/// Talking to Proxmox failed.
#[derive(Debug, thiserror::Error)]
pub enum PveError {
    #[error("cannot run {program}: {source}; signetd enroll runs on the Proxmox host, as root")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// The Proxmox port.
pub trait Proxmox {
    fn config(&self, vmid: u32) -> Result<VmConfig, PveError>;
    fn apply(&self, plan: &Plan) -> Result<(), PveError>;
}

/// The real adapter: Proxmox's `qm` (its path configurable, for a stand-in in tests).
#[derive(Debug, Clone)]
pub struct Qm {
    pub program: PathBuf,
}

impl Default for Qm {
    fn default() -> Self {
        Qm {
            program: "qm".into(),
        }
    }
}

impl Qm {
    /// `qm config VMID`.
    pub fn config_args(vmid: u32) -> Vec<OsString> {
        vec!["config".into(), vmid.to_string().into()]
    }

    /// `qm set VMID --key value …`: one call, so the change is made whole or not at all.
    pub fn set_args(plan: &Plan) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["set".into(), plan.vmid.to_string().into()];
        for c in &plan.changes {
            a.push(format!("--{}", c.key).into());
            a.push(c.new.clone().into());
        }
        a
    }

    /// The command as a shell line, for `--dry-run` and error messages.
    pub fn shell_line(&self, args: &[OsString]) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(args.iter().map(OsString::as_os_str))
            .map(|a| {
                let s = a.to_string_lossy();
                if !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_=.,:/+@".contains(c))
                {
                    s.into_owned()
                } else {
                    format!("'{}'", s.replace('\'', r"'\''"))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn run(&self, args: &[OsString]) -> Result<String, PveError> {
        let out = Command::new(&self.program)
            .args(args)
            .output()
            .map_err(|source| PveError::Spawn {
                program: self.program.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(PveError::Failed {
                command: self.shell_line(args),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Proxmox for Qm {
    fn config(&self, vmid: u32) -> Result<VmConfig, PveError> {
        Ok(VmConfig::parse(&self.run(&Self::config_args(vmid))?))
    }

    fn apply(&self, plan: &Plan) -> Result<(), PveError> {
        if plan.changes.is_empty() {
            return Ok(());
        }
        self.run(&Self::set_args(plan)).map(drop)
    }
}

/// Where the signing VM's QEMU puts Signet's monitor socket.
pub fn monitor_path(dir: &std::path::Path, vmid: u32) -> PathBuf {
    dir.join(format!("vm-{vmid}.qmp"))
}

/// Enrolling failed: refused for the VM's configuration, or Proxmox failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollFailure {
    #[error(transparent)]
    Refused(#[from] EnrollError),
    #[error(transparent)]
    Pve(#[from] PveError),
}

/// Reads the VM's configuration, plans the change with `plan`, and applies it unless
/// `dry_run`. Returns the plan either way.
pub fn enroll(
    pve: &dyn Proxmox,
    vmid: u32,
    plan: impl FnOnce(&VmConfig) -> Result<Plan, EnrollError>,
    dry_run: bool,
) -> Result<Plan, EnrollFailure> {
    let cfg = pve.config(vmid)?;
    let plan = plan(&cfg)?;
    if !dry_run {
        pve.apply(&plan)?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(name: &str) -> VmConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/qm-config")
            .join(name);
        VmConfig::parse(&std::fs::read_to_string(path).unwrap())
    }

    #[test]
    fn parses_recorded_configs() {
        let c = recorded("q35-win10.conf");
        assert_eq!(c.get("ostype"), Some("win10"));
        assert_eq!(c.get("machine"), Some("q35"));
        assert_eq!(
            c.get("efidisk0"),
            Some("local:100/vm-100-disk-1.qcow2,size=128K")
        );
        assert_eq!(c.entries.len(), 14, "{c:#?}");
        let a = recorded("with-args.conf");
        assert_eq!(
            a.get("args"),
            Some("-cpu host,+aes -smbios type=0,vendor=ACME")
        );
        assert_eq!(a.get("boot"), Some("order=scsi0;net0"));
    }

    #[test]
    fn usb_hotplug_needs_modern_machine_and_ostype() {
        for ok in [
            "q35-win10.conf",
            "q35-7.1-usb1.conf",
            "simple1.conf",
            "with-args.conf",
        ] {
            assert_eq!(check_usb_hotplug(105, &recorded(ok)), Ok(()), "{ok}");
        }
        let e = check_usb_hotplug(105, &recorded("q35-6.0-win7.conf")).unwrap_err();
        assert!(e.to_string().contains("ostype win7"), "{e}");
        let mut c = recorded("q35-6.0-win7.conf");
        c.entries.insert("ostype".into(), "win11".into());
        let e = check_usb_hotplug(105, &c).unwrap_err();
        assert!(
            e.to_string().contains("pc-q35-6.0 is pinned below 7.1"),
            "{e}"
        );
        c.entries
            .insert("machine".into(), "type=pc-i440fx-7.2,viommu=virtio".into());
        assert_eq!(check_usb_hotplug(105, &c), Ok(()));
        c.entries.insert("hotplug".into(), "disk,network".into());
        let e = check_usb_hotplug(105, &c).unwrap_err();
        assert!(e.to_string().contains("--hotplug network,disk,usb"), "{e}");
        c.entries.insert("hotplug".into(), "1".into());
        assert_eq!(check_usb_hotplug(105, &c), Ok(()));
        c.entries.remove("ostype");
        assert!(
            check_usb_hotplug(105, &c).is_err(),
            "ostype defaults to other"
        );
    }

    #[test]
    fn free_usb_slots() {
        assert_eq!(
            usb_slot(1, &recorded("q35-7.1-usb1.conf"), "1-2"),
            Ok(("usb0".into(), false))
        );
        assert_eq!(
            usb_slot(1, &recorded("with-args.conf"), "1-2"),
            Ok(("usb1".into(), false))
        );
        let mut c = VmConfig::default();
        c.entries.insert("usb3".into(), "host=1-2.4,usb3=1".into());
        assert_eq!(usb_slot(1, &c, "1-2.4"), Ok(("usb3".into(), true)));
        assert_eq!(usb_slot(1, &c, "1-2"), Ok(("usb0".into(), false)));
        for n in 0..=MAX_USB {
            c.entries.insert(format!("usb{n}"), "spice".into());
        }
        let e = usb_slot(7, &c, "1-2").unwrap_err();
        assert!(e.to_string().contains("qm set 7 --delete usbN"), "{e}");
    }

    #[test]
    fn args_keep_what_the_user_had() {
        let m = "/run/signet/vm-105.qmp";
        let merged = merge_args(
            105,
            Some("-cpu host,+aes -smbios type=0,vendor=ACME"),
            Some(m),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            merged,
            "-cpu host,+aes -smbios type=0,vendor=ACME -device vhost-vsock-pci,guest-cid=105 \
             -chardev socket,id=signet,path=/run/signet/vm-105.qmp,server=on,wait=off -mon chardev=signet,mode=control"
        );
        // Merging again adds nothing.
        assert_eq!(merge_args(105, Some(&merged), Some(m)), Ok(None));
        // A build VM: the vsock device only.
        assert_eq!(
            merge_args(200, None, None),
            Ok(Some("-device vhost-vsock-pci,guest-cid=200".into()))
        );
        assert_eq!(
            merge_args(200, Some("-device vhost-vsock-pci,guest-cid=200"), None),
            Ok(None)
        );
    }

    #[test]
    fn args_refuse_to_clobber() {
        let e = merge_args(105, Some("-device vhost-vsock-pci,guest-cid=7"), None).unwrap_err();
        assert_eq!(
            e,
            EnrollError::OtherCid {
                vmid: 105,
                found: "7".into()
            }
        );
        let e = merge_args(
            105,
            Some("-chardev socket,id=signet,path=/tmp/x,server=on,wait=off"),
            Some("/run/signet/vm-105.qmp"),
        )
        .unwrap_err();
        assert_eq!(e, EnrollError::OtherMonitor { vmid: 105 });
        for bad in ["/run/a b", "/run/a,b", ""] {
            assert!(matches!(
                merge_args(105, None, Some(bad)),
                Err(EnrollError::BadMonitorPath(_))
            ));
        }
    }

    #[test]
    fn plans_and_command_lines() {
        let cfg = recorded("with-args.conf");
        let plan = plan_signing_vm(105, &cfg, "1-2", "/run/signet/vm-105.qmp").unwrap();
        assert_eq!(plan.changes.len(), 2);
        assert_eq!(plan.changes[0].key, "usb1");
        assert_eq!(plan.changes[0].new, "host=1-2");
        let qm = Qm {
            program: "/usr/sbin/qm".into(),
        };
        let args = Qm::set_args(&plan);
        assert_eq!(
            args[..4],
            ["set", "105", "--usb1", "host=1-2"].map(OsString::from)
        );
        assert_eq!(args[4], "--args");
        assert!(args[5]
            .to_str()
            .unwrap()
            .starts_with("-cpu host,+aes -smbios"));
        let line = qm.shell_line(&args);
        assert!(
            line.starts_with("/usr/sbin/qm set 105 --usb1 host=1-2 --args '-cpu host,+aes -smbios type=0,vendor=ACME -device vhost-vsock-pci,guest-cid=105 -chardev"),
            "{line}"
        );
        assert_eq!(
            qm.shell_line(&Qm::config_args(105)),
            "/usr/sbin/qm config 105"
        );
        let shown = plan.to_string();
        assert!(
            shown.contains("  - usb1: (unset)\n  + usb1: host=1-2\n"),
            "{shown}"
        );
        assert!(
            shown.contains("  - args: -cpu host,+aes -smbios type=0,vendor=ACME\n"),
            "{shown}"
        );

        let refused = plan_signing_vm(105, &recorded("q35-6.0-win7.conf"), "1-2", "/run/x");
        assert!(matches!(refused, Err(EnrollError::NoUsbHotplug { .. })));
        let old = plan_build_vm(200, &recorded("q35-6.0-win7.conf")).unwrap_err();
        assert!(
            old.to_string()
                .contains("VM 200 cannot reach Signet over virtio-vsock: ostype win7"),
            "{old}"
        );
        let build = plan_build_vm(200, &recorded("q35-win10.conf")).unwrap();
        assert_eq!(build.changes.len(), 1);
        assert_eq!(
            Qm::set_args(&build),
            [
                "set",
                "200",
                "--args",
                "-device vhost-vsock-pci,guest-cid=200"
            ]
            .map(OsString::from)
        );
        let again = Plan {
            vmid: 200,
            changes: vec![],
        };
        assert!(again.to_string().contains("already enrolled"));
    }
}

//! Where the tokens are: USB devices on the host, which of them are code-signing
//! tokens, and what on the host would stand in the way of passing them to a VM.
//!
//! Everything here but [`udev`] is pure: a [`UsbDevice`] is what sysfs says about one
//! device, [`Catalog::classify`] says whether it is a token (known model by VID:PID, or an
//! unknown smart-card reader — interface class 0x0b, CCID — listed as a candidate), and
//! [`conflicts`] says which host drivers hold its interfaces and how to free them.
//! Tokens are told apart by serial number, never by bus or device number, which change
//! on every re-enumeration. The [`TokenWatcher`] trait is the narrow door to the host;
//! [`udev::UdevWatcher`] is its real adapter (enumerate at start, then follow udev).

pub mod strings;
pub mod udev;

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::config::{KnownToken, VidPid};

/// USB interface class of smart-card readers (CCID).
pub const CLASS_CCID: u8 = 0x0b;

/// One interface of a device: its class and the host driver bound to it, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// sysfs name, e.g. `1-2:1.0`.
    pub name: String,
    pub class: u8,
    pub driver: Option<String>,
}

/// What sysfs says about one USB device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsbDevice {
    /// `/sys/devices/.../1-2`: the key of a device while it stays plugged in.
    pub syspath: PathBuf,
    pub id: VidPid,
    pub bus: u8,
    /// Device number on the bus: changes on every re-enumeration.
    pub devnum: u16,
    /// Port chain below the root hub, e.g. `2` or `1.4`.
    pub port: String,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    /// Interface classes: from the interface devices when the kernel made them, else
    /// from the configuration descriptor.
    pub interfaces: Vec<Interface>,
}

impl UsbDevice {
    /// `BUS-PORT`, as Proxmox's `usbN: host=` and QEMU's `hostbus`/`hostport` name it.
    pub fn host_port(&self) -> String {
        format!("{}-{}", self.bus, self.port)
    }

    fn is_ccid(&self) -> bool {
        self.interfaces.iter().any(|i| i.class == CLASS_CCID)
    }
}

/// What a device is to Signet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenKind {
    /// A model in the table.
    Known { model: String },
    /// Not in the table, but a smart-card reader (CCID): maybe a token.
    Candidate,
}

/// The built-in table of code-signing tokens.
pub const BUILTIN: &[(u16, u16, &str)] = &[
    (0x0529, 0x0620, "SafeNet eToken 5110"),
    (0x0529, 0x0600, "SafeNet eToken Pro"),
    (0x0529, 0x0602, "SafeNet eToken 7300"),
    (0x08e6, 0x34cf, "SafeNet eToken 5110+ FIPS"),
    (0x08e6, 0x34cc, "SafeNet eToken 5300"),
    (0x08e6, 0x34ce, "SafeNet eToken 5300"),
    (0x08e6, 0x34d2, "SafeNet eToken Fusion"),
    (0x08e6, 0x3438, "Gemalto USB Shell Token"),
    (0x1050, 0x0404, "YubiKey 5 (CCID)"),
    (0x1050, 0x0405, "YubiKey 5 (OTP+CCID)"),
    (0x1050, 0x0406, "YubiKey 5 (FIDO+CCID)"),
    (0x1050, 0x0407, "YubiKey 5 (OTP+FIDO+CCID)"),
    (0x096e, 0x0807, "Feitian ePass2003"),
    (0x096e, 0x080a, "Feitian ePass2003"),
    (0x072f, 0x1204, "ACS ACR101 (Certum)"),
    (0x072f, 0xb100, "ACS ACR39U (Certum)"),
    (0x072f, 0x90db, "ACS CryptoMate64 (Certum)"),
];

/// The known-token table: the built-in entries plus those from the configuration
/// (which win on the same VID:PID).
#[derive(Debug, Clone)]
pub struct Catalog {
    entries: Vec<KnownToken>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Catalog {
    pub fn new(extra: Vec<KnownToken>) -> Self {
        let mut entries = extra;
        for &(vendor, product, model) in BUILTIN {
            let id = VidPid { vendor, product };
            if !entries.iter().any(|e| e.id == id) {
                entries.push(KnownToken {
                    id,
                    model: model.to_owned(),
                });
            }
        }
        Catalog { entries }
    }

    pub fn model(&self, id: VidPid) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.model.as_str())
    }

    /// Whether the device is a token: a known model, a CCID candidate, or neither.
    pub fn classify(&self, dev: &UsbDevice) -> Option<TokenKind> {
        if let Some(model) = self.model(dev.id) {
            return Some(TokenKind::Known {
                model: model.to_owned(),
            });
        }
        dev.is_ccid().then_some(TokenKind::Candidate)
    }
}

/// Something on the host holding a token's interface, which would keep QEMU from
/// claiming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub interface: String,
    pub driver: String,
    /// What to run on the host to free it.
    pub fix: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "interface {} is held by the host driver {}; {}",
            self.interface, self.driver, self.fix
        )
    }
}

/// Host drivers bound to the device's interfaces, each with its fix. `usbfs` means a
/// host program (usually `pcscd`) has claimed the interface through libusb.
pub fn conflicts(dev: &UsbDevice) -> Vec<Conflict> {
    dev.interfaces
        .iter()
        .filter_map(|i| {
            let driver = i.driver.as_deref()?;
            let fix = if driver == "usbfs" {
                "a host program (usually pcscd) has claimed it: stop it and keep it from coming back: `systemctl disable --now pcscd.socket pcscd.service`".to_owned()
            } else {
                format!(
                    "unbind it: `echo {name} > /sys/bus/usb/drivers/{driver}/unbind`, and keep the driver off the token (e.g. a modprobe.d blacklist for {driver})",
                    name = i.name
                )
            };
            Some(Conflict {
                interface: i.name.clone(),
                driver: driver.to_owned(),
                fix,
            })
        })
        .collect()
}

/// `1-2.4` (a USB device's sysfs name) → bus 1, port chain `2.4`. Interfaces
/// (`1-2:1.0`) and root hubs (`usb1`) are not devices with a port: `None`.
pub fn parse_sysname(sysname: &str) -> Option<(u8, String)> {
    if sysname.contains(':') {
        return None;
    }
    let (bus, port) = sysname.split_once('-')?;
    let bus = bus.parse().ok()?;
    let ok = !port.is_empty()
        && port
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| (bus, port.to_owned()))
}

/// The interface classes in a device's raw descriptors (sysfs `descriptors`: the device
/// descriptor, then the active configuration with its interfaces and endpoints).
pub fn interface_classes(descriptors: &[u8]) -> Vec<u8> {
    let mut classes = Vec::new();
    let mut at = 0;
    while at + 2 <= descriptors.len() {
        let len = descriptors[at] as usize;
        if len < 2 || at + len > descriptors.len() {
            break;
        }
        // bDescriptorType 4 = interface; bInterfaceClass at offset 5.
        if descriptors[at + 1] == 4 && len >= 9 && !classes.contains(&descriptors[at + 5]) {
            classes.push(descriptors[at + 5]);
        }
        at += len;
    }
    classes
}

/// Host programs that take smart-card readers for themselves: `pcscd` claims every
/// CCID device it sees (through libusb), so a token not yet in its VM is grabbed by the
/// host. Given the names of the running programs, the warning with its fix.
pub fn host_program_conflict<S: AsRef<str>>(running: &[S]) -> Option<String> {
    running.iter().any(|p| p.as_ref() == "pcscd").then(|| {
        "pcscd is running on the host and claims smart-card tokens before QEMU can; stop it and keep it from coming back: `systemctl disable --now pcscd.socket pcscd.service`".to_owned()
    })
}

/// The names of the programs running on this host (`/proc/*/comm`).
pub fn running_programs() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
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

/// Resets the USB device at `bus`-`port` the way the kernel offers to root: it is
/// de-authorised (the kernel disconnects it, and QEMU loses it) and authorised again
/// (the device enumerates anew, udev reports it, and the token service puts it back
/// into its VM). `sysfs` is `/sys` on a host.
pub fn reset_port(sysfs: &std::path::Path, bus: u8, port: &str) -> std::io::Result<()> {
    use std::io::Write;
    let path = sysfs
        .join("bus/usb/devices")
        .join(format!("{bus}-{port}"))
        .join("authorized");
    for value in [b"0", b"1"] {
        let mut f = std::fs::OpenOptions::new().write(true).open(&path)?;
        f.write_all(value)?;
    }
    Ok(())
}

/// A change seen on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbEvent {
    Added(UsbDevice),
    /// The device as it was last seen (a removed device's sysfs is gone).
    Removed(UsbDevice),
    Changed(UsbDevice),
}

/// A token on the host, as the rest of the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenSighting {
    pub device: UsbDevice,
    pub kind: TokenKind,
    pub conflicts: Vec<Conflict>,
}

impl TokenSighting {
    pub fn of(catalog: &Catalog, device: UsbDevice) -> Option<Self> {
        let kind = catalog.classify(&device)?;
        Some(TokenSighting {
            conflicts: conflicts(&device),
            kind,
            device,
        })
    }
}

/// The token with this serial among the devices, or an error listing those there are.
pub fn find_token(
    catalog: &Catalog,
    devices: &[UsbDevice],
    serial: &str,
) -> Result<TokenSighting, NotFound> {
    let tokens: Vec<TokenSighting> = devices
        .iter()
        .filter_map(|d| TokenSighting::of(catalog, d.clone()))
        .collect();
    if let Some(t) = tokens
        .iter()
        .find(|t| t.device.serial.as_deref() == Some(serial))
    {
        return Ok(t.clone());
    }
    let present = tokens
        .iter()
        .map(|t| {
            format!(
                "{} at {} ({})",
                t.device.serial.as_deref().unwrap_or("(no serial)"),
                t.device.host_port(),
                t.device.id
            )
        })
        .collect::<Vec<_>>();
    Err(NotFound {
        serial: serial.to_owned(),
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

/// No token with the asked serial is plugged in.
#[derive(Debug, thiserror::Error)]
#[error("no token with serial {serial} is plugged into this host (tokens seen: {present}); plug it in, or check the serial with lsusb -v")]
pub struct NotFound {
    pub serial: String,
    pub present: String,
}

/// Could not watch the host's USB devices.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot read the host's USB devices from udev: {0}; signetd needs /sys and the udev netlink socket (run it on the Proxmox host, as root)")]
    Udev(#[source] std::io::Error),
}

/// The host's USB devices: those present now, then their changes.
pub trait TokenWatcher: Send {
    /// Every USB device present now.
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, WatchError>;
    /// The next change; `None` when the watcher has stopped.
    fn next_event(&mut self) -> impl std::future::Future<Output = Option<UsbEvent>> + Send + '_;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_reset_deauthorises_then_authorises_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("bus/usb/devices/1-2.4");
        std::fs::create_dir_all(&dev).unwrap();
        let fifo = dev.join("authorized");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // The kernel's side, held open for reading and writing so that neither end
        // waits for the other: the values in the order written.
        let mut kernel = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        reset_port(dir.path(), 1, "2.4").unwrap();
        let mut written = [0u8; 2];
        std::io::Read::read_exact(&mut kernel, &mut written).unwrap();
        assert_eq!(&written, b"01");
        let e = reset_port(dir.path(), 1, "9").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    fn dev(vendor: u16, product: u16, classes: &[u8]) -> UsbDevice {
        UsbDevice {
            syspath: "/sys/devices/x/1-2".into(),
            id: VidPid { vendor, product },
            bus: 1,
            devnum: 5,
            port: "2".into(),
            serial: Some("S".into()),
            manufacturer: None,
            product: None,
            interfaces: classes
                .iter()
                .enumerate()
                .map(|(n, &class)| Interface {
                    name: format!("1-2:1.{n}"),
                    class,
                    driver: None,
                })
                .collect(),
        }
    }

    #[test]
    fn known_models_by_vid_pid() {
        let c = Catalog::default();
        assert_eq!(
            c.classify(&dev(0x0529, 0x0620, &[])),
            Some(TokenKind::Known {
                model: "SafeNet eToken 5110".into()
            })
        );
        for (v, p) in [
            (0x1050, 0x0404),
            (0x1050, 0x0407),
            (0x072f, 0x90db),
            (0x096e, 0x080a),
        ] {
            assert!(matches!(
                c.classify(&dev(v, p, &[3])),
                Some(TokenKind::Known { .. })
            ));
        }
        // A YubiKey id outside 0404..0407 is not in the table (0x0401 is OTP-only).
        assert_eq!(c.classify(&dev(0x1050, 0x0401, &[3])), None);
    }

    #[test]
    fn unknown_ccid_is_a_candidate_and_others_are_not_tokens() {
        let c = Catalog::default();
        assert_eq!(
            c.classify(&dev(0x1234, 0x5678, &[3, CLASS_CCID])),
            Some(TokenKind::Candidate)
        );
        assert_eq!(c.classify(&dev(0x1234, 0x5678, &[8])), None);
    }

    #[test]
    fn config_entries_add_and_override() {
        let c = Catalog::new(vec![
            KnownToken {
                id: "1234:5678".parse().unwrap(),
                model: "In-house token".into(),
            },
            KnownToken {
                id: "0529:0620".parse().unwrap(),
                model: "eToken (lab)".into(),
            },
        ]);
        assert_eq!(
            c.model("1234:5678".parse().unwrap()),
            Some("In-house token")
        );
        assert_eq!(c.model("0529:0620".parse().unwrap()), Some("eToken (lab)"));
        assert_eq!(
            c.model("0529:0600".parse().unwrap()),
            Some("SafeNet eToken Pro")
        );
    }

    #[test]
    fn vid_pid_syntax() {
        assert_eq!(
            "08E6:34cf".parse::<VidPid>().unwrap().to_string(),
            "08e6:34cf"
        );
        for bad in ["0529", "0529:", "x:1", "12345:1", "0529-0620"] {
            let e = bad.parse::<VidPid>().unwrap_err();
            assert!(e.contains("VID:PID"), "{e}");
        }
    }

    #[test]
    fn sysnames() {
        assert_eq!(parse_sysname("1-2"), Some((1, "2".into())));
        assert_eq!(parse_sysname("3-1.4.2"), Some((3, "1.4.2".into())));
        assert_eq!(parse_sysname("1-2:1.0"), None);
        assert_eq!(parse_sysname("usb1"), None);
        assert_eq!(parse_sysname("1-"), None);
        assert_eq!(parse_sysname("1-2..3"), None);
        let mut d = dev(1, 2, &[]);
        d.bus = 3;
        d.port = "1.4".into();
        assert_eq!(d.host_port(), "3-1.4");
    }

    #[test]
    fn descriptor_interface_classes() {
        // The SafeNet eToken 5110's descriptors (device, configuration, one CCID
        // interface, one endpoint), as recorded in the lab's umockdev file.
        let hex = "12010002000000082905200600010102030109021900010100803209040000010B0000000705810308000A";
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(interface_classes(&raw), vec![CLASS_CCID]);
        assert_eq!(interface_classes(&raw[..20]), Vec::<u8>::new());
        assert_eq!(interface_classes(&[0, 4, 1]), Vec::<u8>::new());
    }

    #[test]
    fn pcscd_on_the_host_is_a_conflict() {
        assert_eq!(host_program_conflict(&["sshd", "pvedaemon"]), None);
        let w = host_program_conflict(&["sshd", "pcscd"]).unwrap();
        assert!(w.contains("systemctl disable --now pcscd.socket"), "{w}");
        // This test's own process is among those running.
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(running_programs().contains(&me.trim_end().to_owned()));
    }

    #[test]
    fn conflicts_name_the_driver_and_the_fix() {
        let mut d = dev(0x1050, 0x0407, &[3, CLASS_CCID]);
        assert!(conflicts(&d).is_empty());
        d.interfaces[0].driver = Some("usbhid".into());
        d.interfaces[1].driver = Some("usbfs".into());
        let c = conflicts(&d);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].driver, "usbhid");
        assert!(
            c[0].fix.contains("/sys/bus/usb/drivers/usbhid/unbind"),
            "{}",
            c[0]
        );
        assert!(c[0].fix.contains("1-2:1.0"));
        assert!(c[1].fix.contains("pcscd"), "{}", c[1]);
        let s = TokenSighting::of(&Catalog::default(), d).unwrap();
        assert_eq!(s.conflicts.len(), 2);
    }
}

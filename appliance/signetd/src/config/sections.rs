//! The sections of `signetd.toml` that a service, an adapter or a front reads, owned

//! here so that the configuration imports nothing above it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use signet_protocol::endpoint::Endpoint;

// ---- [dbus], [shutdown] logind ----

/// Which bus the daemon serves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    System,
    Session,
    /// A D-Bus address, e.g. `unix:path=/run/test/bus.sock`.
    Address(String),
    None,
}

impl std::str::FromStr for Bus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "system" => Bus::System,
            "session" => Bus::Session,
            "none" | "" => Bus::None,
            a if a.contains(':') && a.contains('=') => Bus::Address(a.to_owned()),
            other => {
                return Err(format!(
                    "{other:?} is not a bus: write \"system\", \"session\", \"none\" or a D-Bus address such as \"unix:path=/run/dbus/system_bus_socket\""
                ))
            }
        })
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::System => f.write_str("system bus"),
            Bus::Session => f.write_str("session bus"),
            Bus::Address(a) => write!(f, "bus {a}"),
            Bus::None => f.write_str("no bus"),
        }
    }
}

// ---- [shutdown] ----

/// How long the job at the agent may take to end once a shutdown is announced, unless
/// configured: under logind's default `InhibitDelayMaxSec` (5 s), after which logind
/// goes on without us.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(4);

/// How long signetd may take to stop on SIGTERM, unless configured
/// (`[shutdown] stop_seconds`): well under systemd's 90 s before it kills.
pub const DEFAULT_STOP: Duration = Duration::from_secs(15);

// ---- [passthrough], [[tokens]] ----

/// Where Signet's monitor sockets are unless configured otherwise.
pub const DEFAULT_MONITOR_DIR: &str = "/run/signet";

/// How long any answer from QEMU may take unless configured otherwise.
pub const DEFAULT_QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which QEMU devices stand for a token in its VM (`[[tokens]] device` in
/// `signetd.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceKind {
    /// The host's USB device passed through (`usb-host`, by host bus and port).
    #[default]
    UsbHost,
    /// QEMU's emulated CAC smart card in an emulated CCID reader (`usb-ccid` +
    /// `ccid-card-emulated,backend=certificates`): the card holds the three
    /// certificates `certs` (NSS nicknames) and their keys from the NSS database `db`
    /// (`sql:DIR`); its PIN is that database's password. One database per QEMU process.
    /// The reader carries the token's id, so removing it takes the card along.
    EmulatedCcid { db: String, certs: [String; 3] },
}

/// `[passthrough]` in `signetd.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassthroughConfig {
    /// Follow the host's tokens and keep them in their VMs (on by default).
    pub enabled: bool,
    /// Where each signing VM's QEMU makes Signet's monitor socket, `vm-VMID.qmp`
    /// (`signetd enroll signing-vm --monitor-dir`).
    pub monitor_dir: PathBuf,
    /// The VMs' USB bus (`xhci.0` on Proxmox).
    pub usb_bus: String,
    /// How long QEMU may take to answer.
    pub qmp_timeout_seconds: u64,
    /// Where the host's sysfs is (`/sys`): a USB port reset writes the device's
    /// `authorized` there.
    pub sysfs: PathBuf,
}

impl Default for PassthroughConfig {
    fn default() -> Self {
        PassthroughConfig {
            enabled: true,
            monitor_dir: DEFAULT_MONITOR_DIR.into(),
            usb_bus: "xhci.0".into(),
            qmp_timeout_seconds: DEFAULT_QMP_TIMEOUT.as_secs(),
            sysfs: "/sys".into(),
        }
    }
}

/// `[[tokens]]` in `signetd.toml`: the token with this serial belongs to signing VM
/// `vm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub serial: String,
    pub vm: u32,
    /// Which devices stand for the token in the VM (`usb-host` unless a lab says
    /// `device = { kind = "emulated-ccid", … }`).
    #[serde(default)]
    pub device: DeviceKind,
}

/// What is wrong with `[passthrough]` and `[[tokens]]`: the key and the message.
pub fn check_config(p: &PassthroughConfig, tokens: &[Assignment]) -> Result<(), (String, String)> {
    if !p.monitor_dir.is_absolute() {
        return Err((
            "passthrough.monitor_dir".into(),
            format!("give an absolute path, e.g. monitor_dir = \"{DEFAULT_MONITOR_DIR}\""),
        ));
    }
    if p.usb_bus.is_empty() || p.qmp_timeout_seconds == 0 {
        return Err((
            "passthrough".into(),
            "usb_bus names the VMs' USB bus (e.g. \"xhci.0\") and qmp_timeout_seconds is at least 1".into(),
        ));
    }
    for (i, t) in tokens.iter().enumerate() {
        if t.serial.trim().is_empty() || t.vm == 0 {
            return Err((
                format!("tokens[{i}]"),
                "give the token's serial and its signing VM, e.g. serial = \"0123ABCD\" vm = 105 (signetd tokens lists the serials)".into(),
            ));
        }
        if let Some(j) = tokens[..i].iter().position(|o| o.serial == t.serial) {
            return Err((
                format!("tokens[{i}]"),
                format!(
                    "token {} is already assigned in tokens[{j}]; a token belongs to one VM",
                    t.serial
                ),
            ));
        }
    }
    Ok(())
}

// ---- [[known_tokens]] ----

/// A USB vendor and product id pair, written `VID:PID` in hex (`0529:0620`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VidPid {
    pub vendor: u16,
    pub product: u16,
}

impl fmt::Display for VidPid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.product)
    }
}

impl std::str::FromStr for VidPid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a USB id; write it as VID:PID in hex, e.g. 0529:0620");
        let (v, p) = s.split_once(':').ok_or_else(bad)?;
        let hex = |x: &str| {
            if x.is_empty() || x.len() > 4 {
                return Err(bad());
            }
            u16::from_str_radix(x, 16).map_err(|_| bad())
        };
        Ok(VidPid {
            vendor: hex(v)?,
            product: hex(p)?,
        })
    }
}

impl TryFrom<String> for VidPid {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<VidPid> for String {
    fn from(v: VidPid) -> String {
        v.to_string()
    }
}

/// A known token model (`[[known_tokens]]` in `signetd.toml`: `id = "VID:PID"`, `model`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownToken {
    pub id: VidPid,
    pub model: String,
}

// ---- [doctor] ----

/// `[doctor]` in `signetd.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DoctorConfig {
    /// Where the host's `/proc`, `/sys` and `/dev` are (`/`; a fixture tree in tests).
    pub host_root: PathBuf,
    /// Proxmox's `qm`, also for enrolling VMs from the web UI ([`crate::services::operate`]).
    pub qm: PathBuf,
    /// The signing VM; default: the agent's vsock CID, as a VMID.
    pub signing_vm: Option<u32>,
}

impl Default for DoctorConfig {
    fn default() -> Self {
        DoctorConfig {
            host_root: "/".into(),
            qm: "qm".into(),
            signing_vm: None,
        }
    }
}

// ---- [metrics] ----

/// The port Prometheus metrics are served on when `[metrics] listen` is not given.
pub const DEFAULT_METRICS_PORT: u16 = 7722;

fn default_metrics_listen() -> Vec<Endpoint> {
    vec![Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port: DEFAULT_METRICS_PORT,
    }]
}

fn default_true() -> bool {
    true
}

/// `[metrics]`: Prometheus metrics over plain HTTP (`GET /metrics`); on, on loopback,
/// unless `enabled = false`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve the metrics (on by default).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// TCP endpoints, served without TLS; default `tcp:127.0.0.1:7722`.
    #[serde(default = "default_metrics_listen")]
    pub listen: Vec<Endpoint>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: default_metrics_listen(),
        }
    }
}

impl MetricsConfig {
    /// Checks the section; the error names the key and the fix.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.enabled
            && (self.listen.is_empty()
                || self
                    .listen
                    .iter()
                    .any(|e| !matches!(e, Endpoint::Tcp { .. })))
        {
            return Err((
                "listen",
                format!("list TCP endpoints to serve the metrics on (plain HTTP), e.g. listen = [\"tcp:127.0.0.1:{DEFAULT_METRICS_PORT}\"], or set enabled = false"),
            ));
        }
        Ok(())
    }

    /// The endpoints that are not on loopback: anyone who reaches them reads the
    /// metrics.
    pub fn beyond_loopback(&self) -> Vec<&Endpoint> {
        self.listen
            .iter()
            .filter(|e| {
                matches!(e, Endpoint::Tcp { host, .. }
                    if !(host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())))
            })
            .collect()
    }
}

// ---- [web] ----

/// The web UI's port when `[web] listen` is not given.
pub const DEFAULT_PORT: u16 = 7720;

/// The local PVE API.
pub const DEFAULT_PVE_API: &str = "https://127.0.0.1:8006";

/// The node's directory in the PVE cluster file system.
pub const DEFAULT_PVE_LOCAL_DIR: &str = "/etc/pve/local";

/// How often the overview is read again while a browser watches it.
pub const DEFAULT_REFRESH_SECONDS: u64 = 3;

fn default_listen() -> Vec<Endpoint> {
    vec![Endpoint::Tcp {
        host: "0.0.0.0".into(),
        port: DEFAULT_PORT,
    }]
}

fn default_pve_api() -> String {
    DEFAULT_PVE_API.into()
}

fn default_pve_local_dir() -> PathBuf {
    DEFAULT_PVE_LOCAL_DIR.into()
}

fn default_refresh() -> u64 {
    DEFAULT_REFRESH_SECONDS
}

fn default_frame_ancestors() -> Vec<String> {
    vec![DEFAULT_FRAME_ANCESTOR.into()]
}

/// Who may frame the pages when `frame_ancestors` is not given: PVE's UI on any host.
pub const DEFAULT_FRAME_ANCESTOR: &str = "https://*:8006";

/// `[web]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// TCP endpoints, served with TLS; default `tcp:0.0.0.0:7720`.
    #[serde(default = "default_listen")]
    pub listen: Vec<Endpoint>,
    /// A certificate chain (PEM) to serve instead of the node's PVE certificate.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The PVE API that checks logins; default `https://127.0.0.1:8006`.
    #[serde(default = "default_pve_api")]
    pub pve_api: String,
    /// The certificate(s) the PVE API must present (PEM); default the node's
    /// `pveproxy-ssl.pem`, else `pve-ssl.pem`, in `pve_local_dir`.
    pub pve_api_cert: Option<PathBuf>,
    /// The PVE node name privileges are checked on (`/nodes/NODE`); default the host
    /// name, as PVE names the node.
    pub node: Option<String>,
    /// The node's directory with its PVE certificates; default `/etc/pve/local`.
    #[serde(default = "default_pve_local_dir")]
    pub pve_local_dir: PathBuf,
    /// How often the overview is read again while someone watches it.
    #[serde(default = "default_refresh")]
    pub refresh_seconds: u64,
    /// Origins that may show the pages in a frame (CSP `frame-ancestors`): PVE's UI
    /// on port 8006 by default; add the address of a reverse proxy in front of PVE.
    #[serde(default = "default_frame_ancestors")]
    pub frame_ancestors: Vec<String>,
}

impl WebConfig {
    /// Checks the section; the error names the key and the fix.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.listen.is_empty()
            || self
                .listen
                .iter()
                .any(|e| !matches!(e, Endpoint::Tcp { .. }))
        {
            return Err((
                "listen",
                format!("list TCP endpoints to serve the web UI on (with TLS), e.g. listen = [\"tcp:0.0.0.0:{DEFAULT_PORT}\"]"),
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err((
                "cert",
                "give both cert and key, or neither (then the node's PVE certificate is served)"
                    .into(),
            ));
        }
        let uri: http::Uri = self.pve_api.parse().map_err(|_| {
            (
                "pve_api",
                format!(
                    "{:?} is not a URL; write e.g. {DEFAULT_PVE_API}",
                    self.pve_api
                ),
            )
        })?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err((
                "pve_api",
                format!("the PVE API is spoken to over HTTPS: write e.g. {DEFAULT_PVE_API}"),
            ));
        }
        if let Some(node) = &self.node {
            if node.is_empty() || !node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err((
                    "node",
                    format!("{node:?} is not a PVE node name (letters, digits and '-')"),
                ));
            }
        }
        if let Some(bad) = self.frame_ancestors.iter().find(|a| {
            a.is_empty() || a.contains(|c: char| c.is_whitespace() || ";,'\"".contains(c))
        }) {
            return Err((
                "frame_ancestors",
                format!("{bad:?} is not a CSP source; write origins such as \"https://pve.example.com\" or \"{DEFAULT_FRAME_ANCESTOR}\""),
            ));
        }
        if self.refresh_seconds == 0 {
            return Err(("refresh_seconds", "give at least 1".into()));
        }
        Ok(())
    }

    /// The node name: configured, or the host's short name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .and_then(|h| h.trim().split('.').next().map(str::to_owned))
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Result<WebConfig, String> {
        let cfg: WebConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check().map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(cfg)
    }

    #[test]
    fn the_section_has_sane_defaults_and_names_bad_keys() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.listen, default_listen());
        assert_eq!(cfg.pve_api, "https://127.0.0.1:8006");
        assert_eq!(cfg.pve_local_dir, Path::new("/etc/pve/local"));
        assert!(parse("node = \"pve-1\"").is_ok());
        assert_eq!(cfg.frame_ancestors, ["https://*:8006"]);
        assert!(parse("frame_ancestors = [\"https://pve.example.com\"]").is_ok());
        for (text, key) in [
            ("listen = [\"unix:/run/x.sock\"]", "listen"),
            ("listen = []", "listen"),
            ("cert = \"/a.pem\"", "cert"),
            ("pve_api = \"http://127.0.0.1:8006\"", "pve_api"),
            ("pve_api = \"not a url\"", "pve_api"),
            ("node = \"a/b\"", "node"),
            ("refresh_seconds = 0", "refresh_seconds"),
            (
                "frame_ancestors = [\"https://a; script-src *\"]",
                "frame_ancestors",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(key), "{text}: {e}");
        }
        assert!(parse("colour = \"blue\"").is_err());
    }

    #[test]
    fn metrics_are_on_at_loopback_unless_turned_off_and_bad_keys_are_named() {
        let path = Path::new("/etc/signet/signetd.toml");
        let base = "agent = \"unix:/run/a.sock\"\ndbus = \"none\"\n";
        let cfg = crate::config::Config::parse(path, base).unwrap();
        assert!(cfg.metrics.enabled, "on without [metrics]");
        assert_eq!(
            cfg.metrics
                .listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["tcp:127.0.0.1:7722"]
        );
        assert!(cfg.metrics.beyond_loopback().is_empty());
        let off =
            crate::config::Config::parse(path, &format!("{base}[metrics]\nenabled = false\n"))
                .unwrap();
        assert!(!off.metrics.enabled);
        let wide = crate::config::Config::parse(
            path,
            &format!("{base}[metrics]\nlisten = [\"tcp:0.0.0.0:9000\", \"tcp:[::1]:9001\"]\n"),
        )
        .unwrap();
        assert_eq!(
            wide.metrics
                .beyond_loopback()
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>(),
            ["tcp:0.0.0.0:9000"]
        );
        let (_, changes) = crate::config::reload::merge(&cfg, wide);
        assert_eq!(
            changes.need_restart,
            ["metrics"],
            "the listeners are bound at start"
        );
        for (text, fix) in [
            ("listen = [\"unix:/run/m.sock\"]", "list TCP endpoints"),
            ("listen = []", "enabled = false"),
            ("port = 1", "port"),
        ] {
            let e = crate::config::Config::parse(path, &format!("{base}[metrics]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(fix), "{text}: {e}");
            assert!(fix == "port" || e.contains("key metrics.listen"), "{e}");
        }
    }

    #[test]
    fn signetd_toml_names_the_web_key_that_is_wrong() {
        let path = Path::new("/etc/signet/signetd.toml");
        let base = "agent = \"unix:/run/a.sock\"\ndbus = \"none\"\n";
        let cfg = crate::config::Config::parse(path, base).unwrap();
        assert!(cfg.web.is_none(), "off without [web]");
        let cfg = crate::config::Config::parse(path, &format!("{base}[web]\n")).unwrap();
        assert_eq!(cfg.web.unwrap().listen, default_listen());
        let e = crate::config::Config::parse(
            path,
            &format!("{base}[web]\nlisten = [\"vsock:any:7720\"]\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("key web.listen"), "{e}");
    }
}

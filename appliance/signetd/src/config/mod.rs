//! `signetd.toml`, and errors that name the file, the key and the fix.

pub mod alerts;
pub mod edit;
pub mod reload;
mod sections;

pub use sections::{
    check_config, Assignment, Bus, DeviceKind, DoctorConfig, KnownToken, PassthroughConfig, VidPid,
    WebConfig, DEFAULT_FRAME_ANCESTOR, DEFAULT_GRACE, DEFAULT_MONITOR_DIR, DEFAULT_PORT,
    DEFAULT_PVE_API, DEFAULT_PVE_LOCAL_DIR, DEFAULT_QMP_TIMEOUT, DEFAULT_REFRESH_SECONDS,
    DEFAULT_STOP,
};
pub use sections::{MetricsConfig, DEFAULT_METRICS_PORT};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::policy::{CallerPattern, Grant, NameKind, Policy};
use signet_api::wire::{check_timestamp_url, DigestAlgorithm, MAX_TIMESTAMP_SERVERS};
use signet_format::Format;
use signet_protocol::endpoint::{Endpoint, DEFAULT_DAEMON_PORT, VSOCK_CID_ANY};

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/signet/signetd.toml";
/// The unix socket host tools use by default.
pub const DEFAULT_UNIX_SOCKET: &str = "/run/signet/signetd.sock";
/// Where the daemon keeps its database and spool when `state_dir` is not set.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/signet";
/// The spool quota when `queue.spool_quota_mb` is not set.
pub const DEFAULT_SPOOL_QUOTA_MB: u64 = 2048;
/// How long results are kept when `queue.result_ttl_seconds` is not set.
pub const DEFAULT_RESULT_TTL_SECONDS: u64 = 3600;
/// How long a job may wait for a lost token when `queue.job_deadline_seconds` is not set.
pub const DEFAULT_JOB_DEADLINE_SECONDS: u64 = 600;
/// The profile that exists when none is configured.
pub const IMPLICIT_PROFILE: &str = "default";

/// The configuration in force: swapped whole by a reload, read per request (a reader
/// keeps the `Arc` it took for as long as it needs it). Shared by the services.
#[derive(Debug)]
pub struct Current(std::sync::RwLock<std::sync::Arc<Config>>);

impl Current {
    pub fn new(cfg: Config) -> Self {
        Current(std::sync::RwLock::new(std::sync::Arc::new(cfg)))
    }

    /// The configuration in force now.
    pub fn get(&self) -> std::sync::Arc<Config> {
        std::sync::Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Holds the configuration against other writers while `f` replaces it.
    pub fn replace<R>(
        &self,
        f: impl FnOnce(&Config) -> (Config, R),
    ) -> (std::sync::Arc<Config>, R) {
        let mut cfg = self.0.write().unwrap_or_else(|e| e.into_inner());
        let (new, r) = f(&cfg);
        let new = std::sync::Arc::new(new);
        *cfg = new.clone();
        (new, r)
    }
}

/// `signetd.toml`.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// Endpoints clients connect to.
    pub listen: Vec<Endpoint>,
    /// The signing VM's agent.
    pub agent: Endpoint,
    pub default_profile: String,
    pub profiles: BTreeMap<String, Profile>,
    /// The bus the D-Bus front serves on: `system` (default), `session`, `none`, or an
    /// address.
    pub dbus: crate::config::Bus,
    /// Token models beyond the built-in table (`[[known_tokens]]`).
    pub known_tokens: Vec<crate::config::KnownToken>,
    /// Who may use which profile (`[[grants]]`).
    pub policy: Policy,
    /// vsock CID → Proxmox VMID, for VMs whose CID is not their VMID.
    pub cid_to_vmid: BTreeMap<u32, u32>,
    /// The client name plain-TCP callers are taken for; only allowed when every TCP
    /// listener is on loopback (tests, a local reverse proxy).
    pub insecure_tcp_as: Option<String>,
    pub limits: Limits,
    /// Where the daemon keeps its state (`signet.db`).
    pub state_dir: PathBuf,
    /// TLS listeners for remote clients.
    pub tls: Option<TlsConfig>,
    pub queue: QueueConfig,
    /// `[shutdown]`: logind's bus and the grace for the job at the token.
    pub shutdown: Shutdown,
    /// The token's PIN, given to the agent whenever it needs one (after a signing-VM
    /// reboot or an agent restart). A file readable by root only.
    pub pin_file: Option<PathBuf>,
    /// `[doctor]`: where `signetctl doctor` looks at the host.
    pub doctor: crate::config::DoctorConfig,
    /// The web UI (`[web]`); off when the section is absent.
    pub web: Option<crate::config::WebConfig>,
    /// `[metrics]`: Prometheus metrics, on loopback unless configured otherwise.
    pub metrics: crate::config::MetricsConfig,
    /// `[passthrough]`: how the daemon keeps tokens in their signing VMs.
    pub passthrough: crate::config::PassthroughConfig,
    /// `[recovery]`: the escalation ladder for a token lost in its signing VM.
    pub recovery: crate::core::recovery::RecoveryConfig,
    /// `[[tokens]]`: which token (by serial) belongs to which signing VM.
    pub tokens: Vec<crate::config::Assignment>,
    /// The group of local signers (`socket_group`, default `signet`): owns the unix
    /// sockets (mode 0660) and reads the status over D-Bus ([`crate::core::roles`]).
    pub socket_group: String,
    /// The group of the appliance's operators (`admin_group`, default `signet-admin`).
    pub admin_group: String,
    /// `[alerts]`: when an operator is told, and where.
    pub alerts: crate::config::alerts::AlertsConfig,
}

impl Config {
    /// The ids of the role groups on this host (looked up now).
    pub fn role_groups(&self) -> crate::core::roles::RoleGroups {
        crate::core::roles::RoleGroups {
            admin: crate::core::roles::gid_of(&self.admin_group),
            signer: crate::core::roles::gid_of(&self.socket_group),
        }
    }
}

/// `[shutdown]`: host shutdowns and reboots, announced by logind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// The bus logind is on: `system` (default), `none`, or an address.
    pub logind: crate::config::Bus,
    /// How long the job at the token may take to end once a shutdown is announced.
    pub grace: std::time::Duration,
    /// How long signetd may take to stop on SIGTERM (`stop_seconds`): the job at the
    /// token gets most of it, then waiting clients are told their job stays queued.
    pub stop: std::time::Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    #[serde(default)]
    logind: Option<String>,
    #[serde(default)]
    grace_seconds: Option<u64>,
    #[serde(default)]
    stop_seconds: Option<u64>,
}

/// `[tls]`: endpoints served with TLS, for remote clients with a secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TCP endpoints, e.g. `tcp:0.0.0.0:7443`.
    pub listen: Vec<Endpoint>,
    /// The server's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

/// Request limits (`[limits]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Jobs of one caller the worker has at the agent at once; its other jobs wait in
    /// its lane (never refused for this).
    pub max_jobs_per_caller: usize,
    /// Largest input in bytes, unless the profile says otherwise.
    pub max_input_size: u64,
    /// A connection that has not sent a request's headers within this many seconds
    /// is closed.
    pub header_timeout_seconds: u64,
    /// An upload that sends nothing for this many seconds is abandoned.
    pub body_idle_timeout_seconds: u64,
    /// Connections one listener serves at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Refusals of one caller for one reason within this many seconds make one audit
    /// record, with their count.
    pub refusal_interval_seconds: u64,
    /// Wrong client secrets one source address may send per minute over TLS; more are
    /// answered 429 with Retry-After, without checking them.
    pub auth_failures_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_jobs_per_caller: 4,
            max_input_size: 4 << 30,
            header_timeout_seconds: 30,
            body_idle_timeout_seconds: 60,
            max_connections: 1024,
            refusal_interval_seconds: 60,
            auth_failures_per_minute: 10,
        }
    }
}

/// `[queue]`: the spool and the job queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Room for spooled inputs and results, in MiB; uploads that do not fit are refused.
    #[serde(default = "default_spool_quota_mb")]
    pub spool_quota_mb: u64,
    /// How long a finished job's result can be fetched again.
    #[serde(default = "default_result_ttl")]
    pub result_ttl_seconds: u64,
    /// How long after it was sent a job may still be retried when the token is lost
    /// (the agent answers retryable); past it the job fails. 0: never retried.
    #[serde(default = "default_job_deadline")]
    pub job_deadline_seconds: u64,
}

fn default_spool_quota_mb() -> u64 {
    DEFAULT_SPOOL_QUOTA_MB
}
fn default_result_ttl() -> u64 {
    DEFAULT_RESULT_TTL_SECONDS
}
fn default_job_deadline() -> u64 {
    DEFAULT_JOB_DEADLINE_SECONDS
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            spool_quota_mb: DEFAULT_SPOOL_QUOTA_MB,
            result_ttl_seconds: DEFAULT_RESULT_TTL_SECONDS,
            job_deadline_seconds: DEFAULT_JOB_DEADLINE_SECONDS,
        }
    }
}

/// A signing profile: how files signed under its name are signed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Digest algorithm; SHA-256 unless set.
    #[serde(default)]
    pub hash: DigestAlgorithm,
    /// Description put into signatures when the client gives none.
    #[serde(default)]
    pub description: Option<String>,
    /// URL put into signatures when the client gives none.
    #[serde(default)]
    pub url: Option<String>,
    /// Add page hashes to PE signatures (`-ph`); other formats are signed without.
    #[serde(default)]
    pub page_hashes: bool,
    /// Keep a signature the file already has and add this one beside it (`-nest`);
    /// otherwise an existing signature is replaced. Unsigned files are signed either way.
    #[serde(default)]
    pub nested: bool,
    /// RFC 3161 timestamp servers, tried in order until one answers; empty: no timestamp.
    #[serde(default)]
    pub timestamp: Vec<String>,
    /// The formats this profile signs; absent: all of them.
    #[serde(default)]
    pub formats: Option<Vec<Format>>,
    /// Largest input in bytes; absent: `limits.max_input_size`.
    #[serde(default)]
    pub max_input_size: Option<u64>,
    /// The serial number of the token this profile signs with; absent: the token the
    /// signing VM has.
    #[serde(default)]
    pub token: Option<String>,
    /// The SHA-256 fingerprint of the certificate this profile signs with, as
    /// `openssl x509 -noout -fingerprint -sha256` prints it (colons optional); absent:
    /// the token's.
    #[serde(default)]
    pub certificate: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    callers: Vec<String>,
    profiles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    listen: Option<Vec<Endpoint>>,
    agent: Option<Endpoint>,
    #[serde(default)]
    default_profile: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
    #[serde(default)]
    dbus: Option<String>,
    #[serde(default)]
    known_tokens: Vec<crate::config::KnownToken>,
    #[serde(default)]
    grants: Vec<RawGrant>,
    #[serde(default)]
    cid_to_vmid: BTreeMap<String, u32>,
    #[serde(default)]
    insecure_tcp_as: Option<String>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    tls: Option<TlsConfig>,
    #[serde(default)]
    queue: QueueConfig,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    pin_file: Option<PathBuf>,
    #[serde(default)]
    doctor: crate::config::DoctorConfig,
    web: Option<crate::config::WebConfig>,
    #[serde(default)]
    metrics: crate::config::MetricsConfig,
    #[serde(default)]
    passthrough: crate::config::PassthroughConfig,
    #[serde(default)]
    tokens: Vec<crate::config::Assignment>,
    #[serde(default)]
    recovery: crate::core::recovery::RecoveryConfig,
    #[serde(default)]
    socket_group: Option<String>,
    #[serde(default)]
    admin_group: Option<String>,
    #[serde(default)]
    alerts: crate::config::alerts::AlertsConfig,
}

/// A configuration that cannot be used.
/// How to give the configuration, when it cannot be read.
const HINT: &str = "pass the daemon's configuration with --config PATH (see packaging/signetd.toml for an example)";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] signet_protocol::bootstrap::FileError),
    #[error("{path}: key {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = signet_protocol::bootstrap::read(path, HINT)?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = signet_protocol::bootstrap::parse_toml(path, text)?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let agent = raw.agent.ok_or_else(|| {
            invalid(
                "agent",
                "say where the signing VM's agent listens, e.g. agent = \"vsock:105:7711\" (CID of the signing VM, port 7711)".to_owned(),
            )
        })?;
        let listen = raw.listen.unwrap_or_else(|| {
            vec![
                Endpoint::Unix(DEFAULT_UNIX_SOCKET.into()),
                Endpoint::Vsock {
                    cid: VSOCK_CID_ANY,
                    port: DEFAULT_DAEMON_PORT,
                },
            ]
        });
        if let Some(ep) = listen.iter().find(|e| matches!(e, Endpoint::Tls { .. })) {
            return Err(invalid(
                "listen",
                format!("{ep} is served with TLS, so it goes in [tls] listen with the certificate and key"),
            ));
        }
        if listen.is_empty() {
            return Err(invalid(
                "listen",
                "list at least one endpoint, e.g. listen = [\"unix:/run/signet/signetd.sock\", \"vsock:any:7710\"]".to_owned(),
            ));
        }
        let mut profiles = raw.profiles;
        if profiles.is_empty() {
            profiles.insert(IMPLICIT_PROFILE.to_owned(), Profile::default());
        }
        for (name, profile) in &profiles {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(
                    "profiles",
                    format!("profile name {name:?} may only use letters, digits, '-', '_' and '.'"),
                ));
            }
            check_profile(profile)
                .map_err(|(key, message)| invalid(&format!("profiles.{name}.{key}"), message))?;
        }
        let default_profile = match raw.default_profile {
            Some(p) if profiles.contains_key(&p) => p,
            Some(p) => {
                return Err(invalid(
                    "default_profile",
                    format!(
                        "no profile is named {p:?}; defined: {}",
                        profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
            None if profiles.len() == 1 => profiles.keys().next().cloned().unwrap_or_default(),
            None if profiles.contains_key(IMPLICIT_PROFILE) => IMPLICIT_PROFILE.to_owned(),
            None => {
                return Err(invalid(
                    "default_profile",
                    format!(
                    "several profiles are defined ({}); name the one clients get without --profile",
                    profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                ))
            }
        };
        let dbus = match raw.dbus.as_deref() {
            None => crate::config::Bus::System,
            Some(b) => b.parse().map_err(|m| invalid("dbus", m))?,
        };
        let mut grants = Vec::new();
        for (i, g) in raw.grants.iter().enumerate() {
            let key = format!("grants[{i}]");
            if g.callers.is_empty() || g.profiles.is_empty() {
                return Err(invalid(&key, "a grant lists callers and profiles, e.g. callers = [\"vm:104\", \"group:signet\"] profiles = [\"release\"]".to_owned()));
            }
            let callers = g
                .callers
                .iter()
                .map(|c| CallerPattern::parse(c, &resolve_name))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(&format!("{key}.callers"), e.to_string()))?;
            if let Some(p) = g
                .profiles
                .iter()
                .find(|p| *p != "*" && !profiles.contains_key(*p))
            {
                return Err(invalid(
                    &format!("{key}.profiles"),
                    format!(
                        "no profile is named {p:?}; defined: {} (\"*\" grants all of them)",
                        profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            grants.push(Grant {
                callers,
                profiles: g.profiles.clone(),
            });
        }
        let mut cid_to_vmid = BTreeMap::new();
        for (cid, vmid) in &raw.cid_to_vmid {
            let cid = cid.parse::<u32>().map_err(|_| {
                invalid(
                    "cid_to_vmid",
                    format!("{cid:?} is not a vsock CID; write CID = VMID, e.g. 1042 = 104"),
                )
            })?;
            cid_to_vmid.insert(cid, *vmid);
        }
        if let Some(name) = &raw.insecure_tcp_as {
            if let Some(ep) = listen.iter().find(|ep| {
                matches!(ep, Endpoint::Tcp { host, .. }
                    if !(host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())))
            }) {
                return Err(invalid(
                    "insecure_tcp_as",
                    format!("plain TCP callers are taken for client {name:?} only when every TCP listener is on loopback, and {ep} is not; remote clients use tls: with a client secret"),
                ));
            }
        }
        if let Some(tls) = &raw.tls {
            if tls.listen.is_empty()
                || tls
                    .listen
                    .iter()
                    .any(|e| !matches!(e, Endpoint::Tcp { .. } | Endpoint::Tls { .. }))
            {
                return Err(invalid(
                    "tls.listen",
                    "list the TCP endpoints to serve with TLS, e.g. listen = [\"tcp:0.0.0.0:7443\"]".to_owned(),
                ));
            }
        }
        if raw.limits.max_jobs_per_caller == 0
            || raw.limits.header_timeout_seconds == 0
            || raw.limits.body_idle_timeout_seconds == 0
        {
            return Err(invalid(
                "limits",
                "max_jobs_per_caller, header_timeout_seconds and body_idle_timeout_seconds must be at least 1".to_owned(),
            ));
        }
        let state_dir = raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        if !state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                format!("give an absolute path, e.g. state_dir = \"{DEFAULT_STATE_DIR}\""),
            ));
        }
        if raw.queue.spool_quota_mb == 0 {
            return Err(invalid(
                "queue.spool_quota_mb",
                "give the spool's room in MiB, at least the largest file you sign (e.g. 2048)"
                    .to_owned(),
            ));
        }
        let shutdown = Shutdown {
            logind: match raw.shutdown.logind.as_deref() {
                None => crate::config::Bus::System,
                Some(b) => b.parse().map_err(|m| invalid("shutdown.logind", m))?,
            },
            grace: std::time::Duration::from_secs(
                raw.shutdown
                    .grace_seconds
                    .unwrap_or(crate::config::DEFAULT_GRACE.as_secs()),
            ),
            stop: match raw.shutdown.stop_seconds {
                None => crate::config::DEFAULT_STOP,
                Some(s @ 1..=80) => std::time::Duration::from_secs(s),
                Some(_) => {
                    return Err(invalid(
                        "shutdown.stop_seconds",
                        "give 1 to 80 seconds, under systemd's 90 s before it kills signetd (default 15)".to_owned(),
                    ))
                }
            },
        };
        if let Some(p) = &raw.pin_file {
            if !p.is_absolute() {
                return Err(invalid(
                    "pin_file",
                    "give an absolute path, e.g. pin_file = \"/etc/signet/token.pin\" (mode 0600)"
                        .to_owned(),
                ));
            }
        }
        if let Some(web) = &raw.web {
            web.check()
                .map_err(|(key, message)| invalid(&format!("web.{key}"), message))?;
        }
        raw.metrics
            .check()
            .map_err(|(key, message)| invalid(&format!("metrics.{key}"), message))?;
        crate::config::check_config(&raw.passthrough, &raw.tokens)
            .map_err(|(key, message)| invalid(&key, message))?;
        raw.recovery
            .check()
            .map_err(|(key, message)| invalid(&key, message))?;
        raw.alerts
            .check()
            .map_err(|(key, message)| invalid(&format!("alerts.{key}"), message))?;
        Ok(Config {
            alerts: raw.alerts,
            web: raw.web,
            metrics: raw.metrics,
            pin_file: raw.pin_file,
            shutdown,
            doctor: raw.doctor,
            dbus,
            path: path.to_owned(),
            listen,
            agent,
            default_profile,
            profiles,
            known_tokens: raw.known_tokens,
            policy: Policy::new(grants),
            cid_to_vmid,
            insecure_tcp_as: raw.insecure_tcp_as,
            limits: raw.limits,
            state_dir,
            tls: raw.tls,
            queue: raw.queue,
            passthrough: raw.passthrough,
            tokens: raw.tokens,
            recovery: raw.recovery,
            socket_group: raw
                .socket_group
                .unwrap_or_else(|| crate::core::roles::DEFAULT_SIGNER_GROUP.to_owned()),
            admin_group: raw
                .admin_group
                .unwrap_or_else(|| crate::core::roles::DEFAULT_ADMIN_GROUP.to_owned()),
        })
    }

    /// The signing VM the agent runs in: a vsock agent's CID (through `cid_to_vmid`),
    /// else `[recovery] agent_vm`, else the one VM `[[tokens]]` names.
    pub fn agent_vm(&self) -> Option<u32> {
        if let Endpoint::Vsock { cid, .. } = &self.agent {
            return Some(self.cid_to_vmid.get(cid).copied().unwrap_or(*cid));
        }
        if let Some(vm) = self.recovery.agent_vm {
            return Some(vm);
        }
        let mut vms = self.tokens.iter().map(|t| t.vm);
        let first = vms.next()?;
        vms.all(|v| v == first).then_some(first)
    }

    /// The largest input `profile` takes.
    pub fn max_input_size(&self, profile: &Profile) -> u64 {
        profile.max_input_size.unwrap_or(self.limits.max_input_size)
    }
}

/// A user or group name on this host, as an id.
fn resolve_name(kind: NameKind, name: &str) -> Option<u32> {
    use nix::unistd::{Group, User};
    match kind {
        NameKind::User => User::from_name(name).ok().flatten().map(|u| u.uid.as_raw()),
        NameKind::Group => Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw()),
    }
}

/// What is wrong with a profile's options: the key and the message.
fn check_profile(p: &Profile) -> Result<(), (&'static str, String)> {
    if let Some(c) = &p.certificate {
        let f = fingerprint(c);
        if f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err((
                "certificate",
                format!("{c:?} is not a SHA-256 fingerprint; give the one `openssl x509 -noout -fingerprint -sha256 -in cert.pem` prints, or `signet status` shows"),
            ));
        }
    }
    if p.token.as_deref().is_some_and(str::is_empty) {
        return Err((
            "token",
            "give the token's serial number as `signet status` shows it, or leave the key out"
                .to_owned(),
        ));
    }
    if p.timestamp.len() > MAX_TIMESTAMP_SERVERS {
        return Err((
            "timestamp",
            format!(
                "list at most {MAX_TIMESTAMP_SERVERS} timestamp servers; {} are listed",
                p.timestamp.len()
            ),
        ));
    }
    for url in &p.timestamp {
        check_timestamp_url(url).map_err(|e| {
            (
                "timestamp",
                format!("{e}; give RFC 3161 servers as URLs, e.g. timestamp = [\"http://timestamp.digicert.com\"]"),
            )
        })?;
    }
    if let Some(formats) = &p.formats {
        if formats.is_empty() {
            return Err((
                "formats",
                format!(
                    "list the formats the profile signs ({}), or leave the key out to sign all of them",
                    Format::ALL.map(Format::name).join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// A SHA-256 fingerprint as the agent writes it: hex digits, lower case, no colons.
pub fn fingerprint(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl Profile {
    /// Whether the signing VM's token (`serial`) and certificate (`cert`, a SHA-256
    /// fingerprint) are the ones profile `name` signs with; why not, otherwise.
    pub fn check_token(
        &self,
        name: &str,
        serial: Option<&str>,
        cert: Option<&str>,
    ) -> Result<(), String> {
        if let Some(want) = &self.token {
            if serial != Some(want.as_str()) {
                return Err(format!(
                    "profile {name:?} signs only with token {want:?}, and the signing VM has {}; plug in that token, or change `token` of [profiles.{name}]",
                    serial.map_or("no token".to_owned(), |s| format!("token {s:?}"))
                ));
            }
        }
        if let Some(want) = &self.certificate {
            let want = fingerprint(want);
            if cert.map(fingerprint).as_deref() != Some(want.as_str()) {
                return Err(format!(
                    "profile {name:?} signs only with the certificate of SHA-256 fingerprint {want}, and the token's is {}; put that certificate's token in, or change `certificate` of [profiles.{name}]",
                    cert.unwrap_or("unknown")
                ));
            }
        }
        Ok(())
    }

    /// The formats this profile signs, each once, in the order they are listed to
    /// people; empty when it signs all of them.
    pub fn allowed_formats(&self) -> Vec<Format> {
        match &self.formats {
            Some(list) if !Format::ALL.iter().all(|f| list.contains(f)) => Format::ALL
                .into_iter()
                .filter(|f| list.contains(f))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// The vsock endpoints in `listen` whose port any user could bind (above 1023): on
/// a port below 1024 only a process with `CAP_NET_BIND_SERVICE` can listen, so a build
/// VM that reaches the host's port reaches root's signetd.
pub fn unprivileged_vsock(listen: &[Endpoint]) -> Vec<&Endpoint> {
    listen
        .iter()
        .filter(|e| matches!(e, Endpoint::Vsock { port, .. } if *port > 1023))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/signet/signetd.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_shipped_example_configuration_is_valid() {
        // The example grants group "signet", which the package creates; not this host.
        let text =
            include_str!("../../../../packaging/signetd.toml").replace("group:signet", "gid:0");
        let text = text.as_str();
        let c = parse(text).unwrap();
        assert!(c.profiles.contains_key("release"));
        // With its commented keys in force, too.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if [
                        "token = ",
                        "pin_file = ",
                        "socket_group = ",
                        "admin_group = ",
                    ]
                    .iter()
                    .any(|k| rest.starts_with(k)) =>
                {
                    rest.to_owned()
                }
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&uncommented).unwrap();
        assert_eq!(
            c.profiles["release"].token.as_deref(),
            Some("0123456789abcdef")
        );
        // pin_file is a top-level key: uncommented where it stands, it is signetd's.
        assert_eq!(
            c.pin_file.as_deref(),
            Some(Path::new("/etc/signet/token.pin"))
        );
        assert_eq!(
            (c.socket_group.as_str(), c.admin_group.as_str()),
            ("signet", "signet-admin")
        );
    }

    #[test]
    fn a_profile_pins_its_token_and_certificate() {
        let fp = "F5:38:A8:07:78:35:56:D9:34:FE:4F:38:7A:50:25:71:F3:AC:D6:33:B7:04:DA:BA:F0:63:CE:29:34:89:9F:99";
        let c = parse(&format!(
            "agent = \"unix:/a\"\n[profiles.release]\ntoken = \"a1b2\"\ncertificate = \"{fp}\"\n"
        ))
        .unwrap();
        let p = &c.profiles["release"];
        let agent_fp = "f538a807783556d934fe4f387a502571f3acd633b704dabaf063ce2934899f99";
        assert_eq!(
            p.check_token("release", Some("a1b2"), Some(agent_fp)),
            Ok(())
        );
        let e = p
            .check_token("release", Some("ffff"), Some(agent_fp))
            .unwrap_err();
        assert!(
            e.contains("only with token \"a1b2\"") && e.contains("token \"ffff\""),
            "{e}"
        );
        let e = p.check_token("release", None, None).unwrap_err();
        assert!(e.contains("has no token"), "{e}");
        let e = p
            .check_token("release", Some("a1b2"), Some("00"))
            .unwrap_err();
        assert!(
            e.contains("certificate of SHA-256 fingerprint f538a807"),
            "{e}"
        );
        let any = Profile::default();
        assert_eq!(any.check_token("x", None, None), Ok(()));
        let e = parse("agent = \"unix:/a\"\n[profiles.release]\ncertificate = \"abc\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("certificate") && e.contains("-fingerprint -sha256"),
            "{e}"
        );
    }

    #[test]
    fn extra_known_tokens() {
        let c = parse(
            "agent = \"unix:/a\"\n[[known_tokens]]\nid = \"1234:abcd\"\nmodel = \"In-house token\"\n",
        )
        .unwrap();
        assert_eq!(c.known_tokens.len(), 1);
        assert_eq!(c.known_tokens[0].id.to_string(), "1234:abcd");
        assert_eq!(c.known_tokens[0].model, "In-house token");
        let e = parse("agent = \"unix:/a\"\n[[known_tokens]]\nid = \"1234\"\nmodel = \"x\"\n")
            .unwrap_err();
        assert!(e.contains("write it as VID:PID"), "{e}");
        assert!(parse("agent = \"unix:/a\"")
            .unwrap()
            .known_tokens
            .is_empty());
    }

    #[test]
    fn tokens_and_passthrough() {
        let c = parse(
            "agent = \"unix:/a\"\n[passthrough]\nmonitor_dir = \"/tmp/m\"\n[[tokens]]\nserial = \"0123ABCD\"\nvm = 105\n[[tokens]]\nserial = \"0456CDEF\"\nvm = 106\n",
        )
        .unwrap();
        assert_eq!(c.tokens.len(), 2);
        assert_eq!(
            (c.tokens[1].serial.as_str(), c.tokens[1].vm),
            ("0456CDEF", 106)
        );
        assert_eq!(c.passthrough.monitor_dir, Path::new("/tmp/m"));
        assert_eq!(c.passthrough.usb_bus, "xhci.0");
        assert!(c.passthrough.enabled);
        let setup = crate::services::tokens::Setup::from_config(&c);
        assert_eq!(setup.monitors[0], (105, "/tmp/m/vm-105.qmp".into()));
        assert_eq!(setup.assignments["0123ABCD"], 105);
        let plain = parse("agent = \"unix:/a\"").unwrap();
        assert_eq!(plain.passthrough.monitor_dir, Path::new("/run/signet"));
        assert_eq!(plain.agent_vm(), None, "no tokens, no vsock agent");
        assert_eq!(c.agent_vm(), None, "two signing VMs: say which");
        let one = parse("agent = \"unix:/a\"\n[[tokens]]\nserial = \"A\"\nvm = 105\n").unwrap();
        assert_eq!(one.agent_vm(), Some(105));
        let vsock = parse("agent = \"vsock:107:7711\"\n[recovery]\nagent_vm = 105\n").unwrap();
        assert_eq!(vsock.agent_vm(), Some(107), "a vsock agent's CID is its VM");
        let named = parse(
            "agent = \"unix:/a\"\n[recovery]\nagent_vm = 106\n[recovery.reattach]\ncooldown_seconds = 0.5\n",
        )
        .unwrap();
        assert_eq!(named.agent_vm(), Some(106));
        let p = named.recovery.policy();
        assert_eq!(p.reattach.cooldown, std::time::Duration::from_millis(500));
        assert_eq!(
            p.reattach.min_interval,
            crate::core::recovery::LadderPolicy::default()
                .reattach
                .min_interval,
            "what is left out keeps its default"
        );
        let e =
            parse("agent = \"unix:/a\"\n[recovery.vm_reset]\ncooldown_seconds = -1\n").unwrap_err();
        assert!(e.contains("recovery.vm_reset.cooldown_seconds"), "{e}");
        assert!(plain.tokens.is_empty());
        let err = parse("agent = \"unix:/a\"\n[[tokens]]\nserial = \"A\"\nvm = 1\n[[tokens]]\nserial = \"A\"\nvm = 2\n").unwrap_err();
        assert!(
            err.contains("key tokens[1]") && err.contains("already assigned in tokens[0]"),
            "{err}"
        );
        let err = parse("agent = \"unix:/a\"\n[[tokens]]\nserial = \"\"\nvm = 1\n").unwrap_err();
        assert!(err.contains("key tokens[0]"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[passthrough]\nmonitor_dir = \"rel\"\n").unwrap_err();
        assert!(err.contains("key passthrough.monitor_dir"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[[tokens]]\nserial = \"A\"\nvmid = 1\n").unwrap_err();
        assert!(err.contains("vmid"), "{err}");
    }

    #[test]
    fn agent_alone_is_enough() {
        let c = parse("agent = \"vsock:105:7711\"").unwrap();
        assert_eq!(c.agent.to_string(), "vsock:105:7711");
        assert_eq!(
            c.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["unix:/run/signet/signetd.sock", "vsock:any:771"]
        );
        assert_eq!(c.default_profile, "default");
        assert_eq!(c.profiles["default"].hash, DigestAlgorithm::Sha256);
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(c.queue, QueueConfig::default());
    }

    #[test]
    fn state_dir_and_queue() {
        let c = parse(
            "agent = \"unix:/a\"\nstate_dir = \"/srv/signet\"\n[queue]\nspool_quota_mb = 10\nresult_ttl_seconds = 60\njob_deadline_seconds = 0\n",
        )
        .unwrap();
        assert_eq!(c.state_dir, Path::new("/srv/signet"));
        assert_eq!(
            (
                c.queue.spool_quota_mb,
                c.queue.result_ttl_seconds,
                c.queue.job_deadline_seconds
            ),
            (10, 60, 0)
        );
        let err = parse("agent = \"unix:/a\"\nstate_dir = \"rel\"").unwrap_err();
        assert!(err.contains("key state_dir"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[queue]\nspool_quota_mb = 0").unwrap_err();
        assert!(err.contains("key queue.spool_quota_mb"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[queue]\nspool = 1").unwrap_err();
        assert!(err.contains("spool"), "{err}");
    }

    #[test]
    fn profiles_and_the_default_one() {
        let c = parse(
            "agent = \"unix:/a\"\n[profiles.release]\nhash = \"sha384\"\ndescription = \"App\"\n",
        )
        .unwrap();
        assert_eq!(
            c.default_profile, "release",
            "a single profile is the default"
        );
        assert_eq!(c.profiles["release"].hash, DigestAlgorithm::Sha384);

        let two = "agent = \"unix:/a\"\n[profiles.a]\n[profiles.b]\n";
        let err = parse(two).unwrap_err();
        assert!(
            err.contains("key default_profile") && err.contains("a, b"),
            "{err}"
        );
        let c = parse(&format!("default_profile = \"b\"\n{two}")).unwrap();
        assert_eq!(c.default_profile, "b");
        let err = parse(&format!("default_profile = \"c\"\n{two}")).unwrap_err();
        assert!(err.contains("no profile is named \"c\""), "{err}");
    }

    #[test]
    fn profile_options() {
        let c = parse(
            r#"agent = "unix:/a"
default_profile = "release"
[profiles.release]
page_hashes = true
nested = true
timestamp = ["http://tsa1.example/", "https://tsa2.example:8443/ts"]
formats = ["msi", "pe", "msi"]
[profiles.plain]
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let r = &c.profiles["release"];
        assert!(r.page_hashes && r.nested);
        assert_eq!(r.timestamp.len(), 2);
        assert_eq!(r.allowed_formats(), [Format::Pe, Format::Msi]);
        let p = &c.profiles["plain"];
        assert!(!p.page_hashes && !p.nested && p.timestamp.is_empty());
        assert!(p.allowed_formats().is_empty(), "absent: every format");
        let all = parse(
            "agent = \"unix:/a\"\n[profiles.a]\nformats = [\"pe\", \"msi\", \"cab\", \"cat\", \"powershell\", \"appx\"]\n",
        )
        .unwrap();
        assert!(all.profiles["a"].allowed_formats().is_empty());
    }

    #[test]
    fn bad_profile_options_name_the_profile_and_key() {
        let err =
            parse("agent = \"unix:/a\"\n[profiles.r]\ntimestamp = [\"tsa.example\"]").unwrap_err();
        assert!(
            err.contains("key profiles.r.timestamp") && err.contains("http://"),
            "{err}"
        );
        let many = ["\"http://t/\""; MAX_TIMESTAMP_SERVERS + 1].join(", ");
        let err = parse(&format!(
            "agent = \"unix:/a\"\n[profiles.r]\ntimestamp = [{many}]"
        ))
        .unwrap_err();
        assert!(err.contains("at most 8"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[profiles.r]\nformats = []").unwrap_err();
        assert!(
            err.contains("key profiles.r.formats")
                && err.contains("pe, msi, cab, cat, powershell, appx"),
            "{err}"
        );
        let err = parse("agent = \"unix:/a\"\n[profiles.r]\nformats = [\"exe\"]").unwrap_err();
        assert!(err.contains("exe") && err.contains("powershell"), "{err}");
        let err =
            parse("agent = \"unix:/a\"\n[profiles.r]\ntimestamp = \"http://t/\"").unwrap_err();
        assert!(err.contains("timestamp"), "{err}");
    }

    #[test]
    fn role_groups_and_flood_limits_have_defaults_and_can_be_set() {
        let c = parse("agent = \"vsock:105:7711\"\n").unwrap();
        assert_eq!(
            (c.socket_group.as_str(), c.admin_group.as_str()),
            ("signet", "signet-admin")
        );
        assert_eq!(
            (
                c.limits.max_connections,
                c.limits.refusal_interval_seconds,
                c.limits.auth_failures_per_minute
            ),
            (1024, 60, 10)
        );
        let c = parse(
            "agent = \"vsock:105:7711\"\nsocket_group = \"builders\"\nadmin_group = \"wheel\"\n\
             [limits]\nmax_connections = 8\nrefusal_interval_seconds = 5\nauth_failures_per_minute = 2\n",
        )
        .unwrap();
        assert_eq!(
            (c.socket_group.as_str(), c.admin_group.as_str()),
            ("builders", "wheel")
        );
        assert_eq!(c.limits.max_connections, 8);
        assert_eq!(c.limits.refusal_interval_seconds, 5);
        assert_eq!(c.limits.auth_failures_per_minute, 2);
    }

    #[test]
    fn grants_limits_and_vm_ids() {
        let c = parse(
            r#"agent = "unix:/a"
listen = ["tcp:127.0.0.1:0", "unix:/s"]
insecure_tcp_as = "loopback"
default_profile = "release"
[cid_to_vmid]
1042 = 104
[limits]
max_jobs_per_caller = 2
[profiles.release]
max_input_size = 1000
[profiles.test]
[[grants]]
callers = ["vm:104", "uid:1000", "group:root"]
profiles = ["release"]
[[grants]]
callers = ["client:loopback"]
profiles = ["*"]
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        use crate::core::policy::Caller;
        assert_eq!(c.cid_to_vmid[&1042], 104);
        assert_eq!(c.limits.max_jobs_per_caller, 2);
        assert_eq!(
            c.limits.header_timeout_seconds, 30,
            "defaults fill the rest"
        );
        assert_eq!(c.max_input_size(&c.profiles["release"]), 1000);
        assert_eq!(c.max_input_size(&c.profiles["test"]), 4 << 30);
        let vm = Caller::Vm {
            cid: 1042,
            vmid: 104,
        };
        assert!(c.policy.decide(&vm, "release").is_ok());
        assert!(c.policy.decide(&vm, "test").is_err());
        let root_group = Caller::Local {
            uid: 5,
            gid: 7,
            groups: vec![0],
        };
        assert!(c.policy.decide(&root_group, "release").is_ok());
        let lo = Caller::Client {
            name: "loopback".into(),
            granted: vec![],
        };
        assert!(c.policy.decide(&lo, "test").is_ok());
    }

    #[test]
    fn bad_grants_and_limits_name_the_key() {
        let base = "agent = \"unix:/a\"\n[profiles.release]\n";
        let err = parse(&format!(
            "{base}[[grants]]\ncallers = [\"vm:x\"]\nprofiles = [\"release\"]"
        ))
        .unwrap_err();
        assert!(
            err.contains("key grants[0].callers") && err.contains("vm:VMID"),
            "{err}"
        );
        let err = parse(&format!(
            "{base}[[grants]]\ncallers = [\"vm:1\"]\nprofiles = [\"relaese\"]"
        ))
        .unwrap_err();
        assert!(
            err.contains("key grants[0].profiles")
                && err.contains("\"relaese\"")
                && err.contains("release"),
            "{err}"
        );
        let err = parse(&format!(
            "{base}[[grants]]\ncallers = []\nprofiles = [\"*\"]"
        ))
        .unwrap_err();
        assert!(err.contains("key grants[0]"), "{err}");
        let err = parse(&format!(
            "{base}[[grants]]\ncallers = [\"group:no-such-group-here\"]\nprofiles = [\"*\"]"
        ))
        .unwrap_err();
        assert!(err.contains("does not have"), "{err}");
        let err =
            parse("agent = \"unix:/a\"\nlisten = [\"tcp:0.0.0.0:7710\"]\ninsecure_tcp_as = \"x\"")
                .unwrap_err();
        assert!(
            err.contains("key insecure_tcp_as") && err.contains("tcp:0.0.0.0:7710"),
            "{err}"
        );
        let err = parse("agent = \"unix:/a\"\n[limits]\nmax_jobs_per_caller = 0").unwrap_err();
        assert!(err.contains("key limits"), "{err}");
        let err =
            parse("agent = \"unix:/a\"\n[tls]\nlisten = [\"unix:/x\"]\ncert = \"c\"\nkey = \"k\"")
                .unwrap_err();
        assert!(err.contains("key tls.listen"), "{err}");
        let c = parse("agent = \"unix:/a\"\nstate_dir = \"/tmp/s\"\n[tls]\nlisten = [\"tcp:0.0.0.0:7443\"]\ncert = \"c.pem\"\nkey = \"k.pem\"").unwrap();
        assert_eq!(c.tls.unwrap().listen[0].to_string(), "tcp:0.0.0.0:7443");
        assert_eq!(c.state_dir, Path::new("/tmp/s"));
        let err = parse("agent = \"unix:/a\"\n[cid_to_vmid]\nx = 1").unwrap_err();
        assert!(err.contains("key cid_to_vmid"), "{err}");
    }

    #[test]
    fn errors_name_the_file_key_and_fix() {
        let err = parse("").unwrap_err();
        assert!(
            err.starts_with("/etc/signet/signetd.toml: key agent: ")
                && err.contains("vsock:105:7711"),
            "{err}"
        );
        let err = parse("agent = \"vsock:x\"").unwrap_err();
        assert!(
            err.contains("agent") && err.contains("vsock:CID:PORT"),
            "{err}"
        );
        let err = parse("agent = \"unix:/a\"\nlisten = [\"tls:0.0.0.0:7443\"]").unwrap_err();
        assert!(err.contains("key listen") && err.contains("[tls]"), "{err}");
        let err = parse("agent = \"unix:/a\"\nlisten = []").unwrap_err();
        assert!(err.contains("key listen"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[profiles.release]\nhash = \"md5\"").unwrap_err();
        assert!(err.contains("md5") && err.contains("sha256"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[profiles.\"a b\"]").unwrap_err();
        assert!(err.contains("\"a b\""), "{err}");
        let err = parse("agnet = \"unix:/a\"").unwrap_err();
        assert!(err.contains("agnet"), "{err}");
    }

    #[test]
    fn vsock_ports_any_user_could_bind_are_named() {
        let eps: Vec<Endpoint> = [
            "vsock:any:771",
            "vsock:any:7710",
            "unix:/run/s.sock",
            "tcp:127.0.0.1:7710",
        ]
        .iter()
        .map(|e| e.parse().unwrap())
        .collect();
        let named: Vec<String> = unprivileged_vsock(&eps)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(named, ["vsock:any:7710"]);
        assert!(
            unprivileged_vsock(&parse("agent = \"vsock:105:7711\"").unwrap().listen).is_empty()
        );
    }
}

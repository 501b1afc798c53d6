//! `signetd.toml`, and errors that name the file, the key and the fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use signet_protocol::endpoint::{Endpoint, DEFAULT_DAEMON_PORT, VSOCK_CID_ANY};
use signet_protocol::format::Format;
use signet_protocol::wire::{check_timestamp_url, DigestAlgorithm, MAX_TIMESTAMP_SERVERS};

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
    /// The database (`signet.db`) and the spool live here.
    pub state_dir: PathBuf,
    pub queue: QueueConfig,
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
    state_dir: Option<PathBuf>,
    #[serde(default)]
    queue: QueueConfig,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}; pass the daemon's configuration with --config PATH (see packaging/signetd.toml for an example)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: key {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
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
        Ok(Config {
            path: path.to_owned(),
            listen,
            agent,
            default_profile,
            profiles,
            state_dir,
            queue: raw.queue,
        })
    }
}

/// What is wrong with a profile's options: the key and the message.
fn check_profile(p: &Profile) -> Result<(), (&'static str, String)> {
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

impl Profile {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/signet/signetd.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn agent_alone_is_enough() {
        let c = parse("agent = \"vsock:105:7711\"").unwrap();
        assert_eq!(c.agent.to_string(), "vsock:105:7711");
        assert_eq!(
            c.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["unix:/run/signet/signetd.sock", "vsock:any:7710"]
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
            "agent = \"unix:/a\"\n[profiles.a]\nformats = [\"pe\", \"msi\", \"cab\", \"cat\", \"powershell\"]\n",
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
            err.contains("key profiles.r.formats") && err.contains("pe, msi, cab, cat, powershell"),
            "{err}"
        );
        let err = parse("agent = \"unix:/a\"\n[profiles.r]\nformats = [\"exe\"]").unwrap_err();
        assert!(err.contains("exe") && err.contains("powershell"), "{err}");
        let err =
            parse("agent = \"unix:/a\"\n[profiles.r]\ntimestamp = \"http://t/\"").unwrap_err();
        assert!(err.contains("timestamp"), "{err}");
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
        let err = parse("agent = \"unix:/a\"\nlisten = []").unwrap_err();
        assert!(err.contains("key listen"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[profiles.release]\nhash = \"md5\"").unwrap_err();
        assert!(err.contains("md5") && err.contains("sha256"), "{err}");
        let err = parse("agent = \"unix:/a\"\n[profiles.\"a b\"]").unwrap_err();
        assert!(err.contains("\"a b\""), "{err}");
        let err = parse("agnet = \"unix:/a\"").unwrap_err();
        assert!(err.contains("agnet"), "{err}");
    }
}

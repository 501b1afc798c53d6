//! `signetd.toml`, and errors that name the file, the key and the fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use signet_protocol::endpoint::{Endpoint, DEFAULT_DAEMON_PORT, VSOCK_CID_ANY};
use signet_protocol::wire::DigestAlgorithm;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/signet/signetd.toml";
/// The unix socket host tools use by default.
pub const DEFAULT_UNIX_SOCKET: &str = "/run/signet/signetd.sock";
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
        key: &'static str,
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
        let invalid = |key, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
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
        for name in profiles.keys() {
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
        Ok(Config {
            path: path.to_owned(),
            listen,
            agent,
            default_profile,
            profiles,
        })
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

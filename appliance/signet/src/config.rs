//! The client's optional configuration file.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use signet_protocol::Endpoint;

/// Read when present; its absence is the common case.
#[cfg(not(windows))]
pub const DEFAULT_PATH: &str = "/etc/signet/signet.toml";
/// Read when present; its absence is the common case.
#[cfg(windows)]
pub const DEFAULT_PATH: &str = r"C:\ProgramData\Signet\signet.toml";

/// `signet.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The daemon's endpoint.
    pub endpoint: Option<Endpoint>,
    /// The profile used when `--profile` is not given.
    pub profile: Option<String>,
}

impl ClientConfig {
    /// Loads `path`; a missing file at the default path is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| format!("{}: {}", path.display(), e.to_string().trim_end())),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_PATH) =>
            {
                Ok(Self::default())
            }
            Err(e) => Err(format!(
                "cannot read {}: {e}; check --config / SIGNET_CONFIG",
                PathBuf::from(path).display()
            )),
        }
    }
}

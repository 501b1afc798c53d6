//! How both daemons start: their files private whatever the umask, logs on stderr
//! (journald keeps them) filtered by `RUST_LOG`, and their TOML configuration read
//! with errors that name the file, the line and the fix.

use std::path::{Path, PathBuf};

/// A configuration file that cannot be read or is not valid TOML for its type.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}; {hint}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
        /// Where the configuration is given, and an example of one.
        hint: &'static str,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl FileError {
    /// The file is not there (a first start may go on without it).
    pub fn is_missing(&self) -> bool {
        matches!(self, FileError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Makes what the process creates its own (umask 0077) and logs to stderr at `info`
/// unless `RUST_LOG` says otherwise, in colour only on a terminal.
pub fn start_daemon() {
    #[cfg(unix)]
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Reads the file at `path`; `hint` says how to give another.
pub fn read(path: &Path, hint: &'static str) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
        hint,
    })
}

/// `text` (from `path`) as `T`; a TOML error shows its line and what was expected.
pub fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, FileError> {
    toml::from_str(text).map_err(|e| FileError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Sample {
        port: u16,
    }

    #[test]
    fn errors_name_the_file_and_the_fix() {
        let missing = read(Path::new("/nonexistent/x.toml"), "pass --config PATH").unwrap_err();
        assert!(missing.is_missing());
        let text = missing.to_string();
        assert!(
            text.starts_with("cannot read /nonexistent/x.toml: "),
            "{text}"
        );
        assert!(text.ends_with("; pass --config PATH"), "{text}");
        let bad = parse_toml::<Sample>(Path::new("/etc/x.toml"), "port = \"high\"\n").unwrap_err();
        assert!(!bad.is_missing());
        let text = bad.to_string();
        assert!(text.starts_with("/etc/x.toml: "), "{text}");
        assert!(text.contains("line 1"), "{text}");
        assert_eq!(
            parse_toml::<Sample>(Path::new("x"), "port = 7")
                .unwrap()
                .port,
            7
        );
    }
}

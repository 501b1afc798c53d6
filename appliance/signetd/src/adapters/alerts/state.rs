//! The incidents raised and not yet resolved, kept in `state_dir/alerts.json` (0600)
//! so a restart neither raises them again nor forgets to resolve them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE: &str = "alerts.json";

/// One open incident as the file holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub kind: String,
    #[serde(default)]
    pub subject: String,
    pub since_ms: u64,
    #[serde(default)]
    pub detail: String,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The incidents kept under `dir` (none when there is no file; a damaged file is
/// logged and taken as none: an alert may be raised once more).
pub fn load(dir: &Path) -> Vec<Kept> {
    match std::fs::read(path(dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path(dir).display(), error = %e, "the open alerts could not be read; alerts still open are raised again when seen");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// Keeps `open` under `dir`, whole or not at all, readable by its owner only.
pub fn save(dir: &Path, open: &[Kept]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let target = path(dir);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(open).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_open_incidents_are_kept_privately() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_empty());
        let open = vec![Kept {
            kind: "pin-rejected".into(),
            subject: String::new(),
            since_ms: 7,
            detail: "fix".into(),
        }];
        save(dir.path(), &open).unwrap();
        assert_eq!(load(dir.path()), open);
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(FILE), "{not json").unwrap();
        assert!(load(dir.path()).is_empty());
    }
}

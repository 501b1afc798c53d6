//! The profiles `GET /v1/profile` answered, kept per endpoint and profile so that a run
//! in digest mode does not ask again each time: `$XDG_CACHE_HOME/signet/profiles/`
//! (else `~/.cache/signet/profiles/`; `%LOCALAPPDATA%\signet\profiles\` on Windows),
//! directories 0700, files 0600, each the answer's body as it came, for at most
//! [`VALID`]. `SIGNET_PROFILE_CACHE=off` turns it off.
//!
//! A kept answer is a guess, never trusted: the upload made with it names the SHA-256
//! of the body it used (`x-signet-profile`, computed here from the bytes, so a file
//! changed by hand cannot pass for the daemon's), and signetd refuses it at intake,
//! before anything is queued or signed, when the profile's answer is another one now
//! (`profile_changed`); the client then forgets it, asks again and sends once more
//! ([`crate::sign`]). A result whose header differs only forgets it. A file that is not
//! the user's own, or that others may write, is not read.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use signet_api::hex::lower as hex;
use signet_api::wire::ProfileOptions;
use signet_protocol::Endpoint;

/// How long a kept answer is used.
pub const VALID: Duration = Duration::from_secs(600);

/// A kept answer: the options, and the SHA-256 (hex) of the body they were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub options: ProfileOptions,
    pub sha256: String,
}

/// Reads the options from an answer's body and takes its SHA-256.
pub fn read(body: &[u8]) -> Option<Kept> {
    let options = serde_json::from_slice(body).ok()?;
    Some(Kept {
        options,
        sha256: hex(&Sha256::digest(body)),
    })
}

/// The directory of the kept answers, unless turned off or there is no home.
pub fn dir() -> Option<PathBuf> {
    if std::env::var_os("SIGNET_PROFILE_CACHE").is_some_and(|v| v == "off" || v == "0") {
        return None;
    }
    let base = if cfg!(windows) {
        std::env::var_os("LOCALAPPDATA").map(PathBuf::from)?
    } else {
        match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache")
            }
        }
    };
    Some(base.join("signet").join("profiles"))
}

/// The file of `profile` (`None`: the default) at `endpoint` in `dir`.
fn file(dir: &Path, endpoint: &Endpoint, profile: Option<&str>) -> PathBuf {
    let mut h = Sha256::new();
    h.update(endpoint.to_string().as_bytes());
    h.update(b"\n");
    match profile {
        Some(p) => {
            h.update(b"=");
            h.update(p.as_bytes());
        }
        None => h.update(b"default"),
    }
    dir.join(format!("{}.json", hex(&h.finalize())))
}

/// The kept answer for `profile` at `endpoint`, if there is one younger than [`VALID`].
pub fn load(dir: &Path, endpoint: &Endpoint, profile: Option<&str>) -> Option<Kept> {
    let path = file(dir, endpoint, profile);
    let meta = std::fs::metadata(&path).ok()?;
    if !private(&std::fs::metadata(dir).ok()?, &meta) {
        return None;
    }
    let age = SystemTime::now()
        .duration_since(meta.modified().ok()?)
        .unwrap_or(Duration::MAX);
    if age >= VALID {
        return None;
    }
    read(&std::fs::read(&path).ok()?)
}

/// Keeps `body`, the answer for `profile` at `endpoint`; a failure only means it is
/// asked for again next time.
pub fn store(dir: &Path, endpoint: &Endpoint, profile: Option<&str>, body: &[u8]) {
    let path = file(dir, endpoint, profile);
    let write = || -> std::io::Result<()> {
        make_dir(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut tmp, body)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    };
    let _ = write();
}

/// Forgets the kept answer for `profile` at `endpoint`.
pub fn forget(dir: &Path, endpoint: &Endpoint, profile: Option<&str>) {
    let _ = std::fs::remove_file(file(dir, endpoint, profile));
}

/// Makes `dir`, 0700, and the `signet` directory above it when it is the one [`dir`]
/// names (tempfile makes the files 0600). No other directory's mode is touched.
fn make_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let ours = dir.parent().filter(|p| {
            dir.file_name() == Some("profiles".as_ref()) && p.file_name() == Some("signet".as_ref())
        });
        for d in [Some(dir), ours].into_iter().flatten() {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Whether a kept file and its directory are only their owner's to write, and the
/// file is the directory's owner's (the directory is made 0700 in the user's home).
fn private(dir: &std::fs::Metadata, file: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        file.is_file()
            && dir.is_dir()
            && file.uid() == dir.uid()
            && file.mode() & 0o022 == 0
            && dir.mode() & 0o022 == 0
    }
    #[cfg(not(unix))]
    {
        dir.is_dir() && file.is_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(nested: bool) -> Vec<u8> {
        serde_json::to_vec(&ProfileOptions {
            name: "release".into(),
            hash: signet_api::wire::DigestAlgorithm::Sha256,
            page_hashes: false,
            nested,
            formats: Vec::new(),
            timestamp: None,
            certificate: None,
        })
        .unwrap()
    }

    #[test]
    fn an_answer_is_kept_per_endpoint_and_profile_privately() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("signet").join("profiles");
        let a: Endpoint = "unix:/run/a.sock".parse().unwrap();
        let b: Endpoint = "unix:/run/b.sock".parse().unwrap();
        assert_eq!(load(&dir, &a, None), None);
        store(&dir, &a, None, &options(true));
        store(&dir, &a, Some("release"), &options(false));
        let kept = load(&dir, &a, None).unwrap();
        assert!(kept.options.nested);
        assert_eq!(kept.sha256, hex(&Sha256::digest(options(true))));
        assert!(!load(&dir, &a, Some("release")).unwrap().options.nested);
        assert_eq!(load(&dir, &b, None), None, "another endpoint's is its own");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(dir.parent().unwrap()), 0o700);
            assert_eq!(mode(&file(&dir, &a, None)), 0o600);
            // One others may write is not read.
            std::fs::set_permissions(file(&dir, &a, None), std::fs::Permissions::from_mode(0o622))
                .unwrap();
            assert_eq!(load(&dir, &a, None), None);
        }
        forget(&dir, &a, Some("release"));
        assert_eq!(load(&dir, &a, Some("release")), None);
    }

    #[test]
    fn an_old_or_unreadable_answer_is_not_used() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("kept");
        let ep: Endpoint = "unix:/run/a.sock".parse().unwrap();
        store(&dir, &ep, None, &options(true));
        let f = std::fs::File::options()
            .write(true)
            .open(file(&dir, &ep, None))
            .unwrap();
        f.set_modified(SystemTime::now() - VALID - Duration::from_secs(1))
            .unwrap();
        assert_eq!(load(&dir, &ep, None), None, "too old");
        store(&dir, &ep, None, b"not json");
        assert_eq!(load(&dir, &ep, None), None, "not an answer");
    }

    #[cfg(unix)]
    #[test]
    fn no_directory_above_the_cache_changes_mode() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let above = home.path().join("shared");
        std::fs::create_dir(&above).unwrap();
        std::fs::set_permissions(&above, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let ep: Endpoint = "unix:/run/a.sock".parse().unwrap();
        store(&above.join("x"), &ep, None, &options(true));
        let mode = std::fs::metadata(&above).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o1777);
        assert!(load(&above.join("x"), &ep, None).is_some());
    }

    #[test]
    fn the_sha256_is_of_the_bytes_used() {
        // The same options written another way are another answer: the daemon's
        // SHA-256 is of its own bytes, so a kept file edited by hand never matches it.
        let body = options(true);
        let spaced = String::from_utf8(body.clone()).unwrap().replace(':', ": ");
        let (a, b) = (read(&body).unwrap(), read(spaced.as_bytes()).unwrap());
        assert_eq!(a.options, b.options);
        assert_ne!(a.sha256, b.sha256);
    }
}

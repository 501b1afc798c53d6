//! The PIN file's checks, shared by `signetd check-config` and `signet-agent
//! check-config` (run by their units' `ExecStartPre=`): it exists, is a regular file,
//! is not empty, belongs to the user checking (the one the program runs as) and is
//! open to no one else. Only its metadata is read, never the PIN.
//!
//! Owner and mode are unix notions: elsewhere (Windows) [`check_own`] checks that the
//! file exists, is a regular file and is not empty; its ACL is the operator's to set.

#[cfg(unix)]
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Checks the PIN file at `path` for the user running this program.
#[cfg(unix)]
pub fn check_own(path: &Path) -> Result<(), String> {
    check(path, nix::unistd::getuid().as_raw())
}

/// Checks the PIN file at `path`: it exists, is a regular file and is not empty.
/// Windows has no owner uid and mode bits to check: restrict the file's ACL to the
/// agent's account (`icacls FILE /inheritance:r /grant:r ACCOUNT:R`).
#[cfg(not(unix))]
pub fn check_own(path: &Path) -> Result<(), String> {
    present(path).map(|_| ())
}

/// The PIN file's metadata when it exists, is a regular file and is not empty.
fn present(path: &Path) -> Result<std::fs::Metadata, String> {
    let shown = path.display();
    let write = if cfg!(unix) {
        format!("write the token's user PIN into {shown}: (umask 077; cat > {shown}), as the user the program runs as")
    } else {
        format!("write the token's user PIN into {shown} and let only the account the program runs as read it (icacls {shown} /inheritance:r /grant:r ACCOUNT:R)")
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("pin_file {shown} does not exist; {write}"))
        }
        Err(e) => return Err(format!("pin_file {shown} cannot be read: {e}; {write}")),
    };
    if !meta.is_file() {
        return Err(format!("pin_file {shown} is not a regular file; {write}"));
    }
    if meta.len() == 0 {
        return Err(format!("pin_file {shown} is empty; {write}"));
    }
    Ok(meta)
}

/// Checks the PIN file at `path` for the user `uid`; the error says what is wrong and
/// the fix.
#[cfg(unix)]
pub fn check(path: &Path, uid: u32) -> Result<(), String> {
    let shown = path.display();
    let meta = present(path)?;
    // Root's PIN file (signetd's) is root:root; another reader's is its own.
    let owner = if uid == 0 {
        "root:root".to_owned()
    } else {
        uid.to_string()
    };
    let fix =
        format!("`chown {owner} {shown} && chmod 600 {shown}` so only uid {uid} reads the PIN");
    if meta.uid() != uid {
        return Err(format!(
            "pin_file {shown} belongs to uid {}, not to uid {uid} that reads it; {fix}",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "pin_file {shown} is open to group or others (mode {mode:04o}); {fix}"
        ));
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn uid() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    #[test]
    fn a_private_pin_file_of_its_reader_passes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "123456").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(check(&p, uid()), Ok(()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(check(&p, uid()), Ok(()));
    }

    #[test]
    fn missing_empty_open_or_foreign_pin_files_fail_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        let err = check(&p, uid()).unwrap_err();
        assert!(
            err.contains("does not exist") && err.contains("umask 077"),
            "{err}"
        );

        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = check(&p, uid()).unwrap_err();
        assert!(err.contains("is empty"), "{err}");

        std::fs::write(&p, "123456").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = check(&p, uid()).unwrap_err();
        assert!(
            err.contains("mode 0640") && err.contains("chmod 600"),
            "{err}"
        );

        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let other = uid() + 1;
        let err = check(&p, other).unwrap_err();
        assert!(
            err.contains(&format!("not to uid {other}")) && err.contains("chown"),
            "{err}"
        );

        let err = check(dir.path(), uid()).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn roots_pin_file_is_fixed_as_root_root_0600() {
        // signetd's: owned by another uid or open to others, the fix names both steps.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "123456").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = check(&p, 0).unwrap_err();
        let fix = format!("chown root:root {p} && chmod 600 {p}", p = p.display());
        assert!(err.contains(&fix), "{err}");
        let err = check(&p, 1000).unwrap_err();
        assert!(
            err.contains("uid 1000") && err.contains(&format!("chown 1000 {}", p.display())),
            "{err}"
        );
    }
}

#[cfg(test)]
mod tests_everywhere {
    use super::*;

    #[test]
    fn a_missing_or_empty_pin_file_fails_check_own_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        let err = check_own(&p).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::write(&p, "").unwrap();
        let err = check_own(&p).unwrap_err();
        assert!(err.contains("is empty"), "{err}");
        let err = check_own(dir.path()).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }
}

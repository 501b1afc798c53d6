//! State kept private whatever the umask: the state directory (database, spool) 0700
//! with its files 0600, and the unix sockets 0660 for root and the signer group.
//!
//! `signetd` sets its umask to 0077 at start, so what it creates is private; these
//! functions also put right what an older version, or a copy made with another umask,
//! left more open.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Makes `dir` (created if missing) and everything under it private: directories
/// 0700, files 0600 (the owner keeps read-only where it had it). Symlinks are left
/// alone and not followed.
pub fn secure_tree(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    secure(dir)
}

fn secure(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let mode = meta.mode() & 0o7777;
    if meta.is_dir() {
        if mode != 0o700 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        }
        for entry in std::fs::read_dir(path)? {
            secure(&entry?.path())?;
        }
    } else if meta.is_file() {
        let private = mode & 0o600;
        if mode != private {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))?;
        }
    }
    Ok(())
}

/// Who may connect to a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAccess {
    /// 0660, owned by the daemon's user and this group.
    Group { name: String, gid: u32 },
    /// 0600: the group does not exist, so only the daemon's user (root) connects.
    OwnerOnly { missing_group: String },
}

/// Opens the socket at `path` to `group` (0660, `root:group`), or, when this host has
/// no such group, to its owner alone (0600). Answers what was done.
pub fn open_socket(path: &Path, group: &str) -> std::io::Result<SocketAccess> {
    match crate::core::roles::gid_of(group) {
        Some(gid) => {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(std::io::Error::from)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
            Ok(SocketAccess::Group {
                name: group.to_owned(),
                gid,
            })
        }
        None => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            Ok(SocketAccess::OwnerOnly {
                missing_group: group.to_owned(),
            })
        }
    }
}

/// A socket's directory that signetd creates: `root:group` 0750 (0700 without the
/// group), so members of the group can reach the socket and nobody else sees in.
pub fn socket_dir(dir: &Path, group: &str) -> std::io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    match crate::core::roles::gid_of(group) {
        Some(gid) => {
            nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(std::io::Error::from)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        }
        None => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_state_dir_left_open_becomes_private() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        std::fs::create_dir_all(state.join("spool")).unwrap();
        std::fs::write(state.join("signet.db"), b"x").unwrap();
        std::fs::write(state.join("spool/1.in"), b"x").unwrap();
        std::fs::write(state.join("ro"), b"x").unwrap();
        for (p, m) in [
            (state.clone(), 0o755),
            (state.join("spool"), 0o777),
            (state.join("signet.db"), 0o644),
            (state.join("spool/1.in"), 0o666),
            (state.join("ro"), 0o444),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        std::os::unix::fs::symlink("/etc/hostname", state.join("link")).unwrap();
        secure_tree(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("spool")), 0o700);
        assert_eq!(mode(&state.join("signet.db")), 0o600);
        assert_eq!(mode(&state.join("spool/1.in")), 0o600);
        assert_eq!(mode(&state.join("ro")), 0o400);
        assert_ne!(mode(Path::new("/etc/hostname")) & 0o004, 0, "not followed");
        secure_tree(&t.path().join("new")).unwrap();
        assert_eq!(mode(&t.path().join("new")) & 0o077, 0);
    }

    #[test]
    fn a_socket_without_its_group_is_its_owners_alone() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let got = open_socket(&p, "no-such-group-here").unwrap();
        assert_eq!(
            got,
            SocketAccess::OwnerOnly {
                missing_group: "no-such-group-here".into()
            }
        );
        assert_eq!(mode(&p), 0o600);
        let got = open_socket(&p, "root").unwrap();
        assert_eq!(
            got,
            SocketAccess::Group {
                name: "root".into(),
                gid: 0
            }
        );
        assert_eq!(mode(&p), 0o660);
    }
}

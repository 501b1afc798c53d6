//! Who may call what on the host: the roles of local users, decided from a uid and its
//! groups. Pure, but for [`groups_of`], which asks the user database.
//!
//! - **Operator**: root, or a member of the admin group (`admin_group`, default
//!   `signet-admin`). Attaches, detaches and re-attaches tokens, cancels anyone's job,
//!   lists everyone's jobs, reads and checks the audit log, runs the host checks.
//! - **Signer**: a member of the signer group (`socket_group`, default `signet`). Reads
//!   the status and the tokens, lists and cancels its own jobs; signs over the unix
//!   socket when a grant names it.
//! - Enrolling a VM (a grant in `signetd.toml`, `qm set --args` as root) is root's
//!   alone: [`may_enroll`].
//!
//! The D-Bus front checks these per method ([`crate::fronts::dbus`]) beside the bus's policy
//! (`packaging/dbus/org.signet.Signet1.conf`), so a policy file that lets too much
//! through does not make a signer an operator.

/// The default group of the appliance's operators.
pub const DEFAULT_ADMIN_GROUP: &str = "signet-admin";
/// The default group of local signers (it also owns the unix socket).
pub const DEFAULT_SIGNER_GROUP: &str = "signet";

/// What a local user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Neither a signer nor an operator.
    None,
    /// Reads the status and its own jobs.
    Signer,
    /// Everything but enrolling (unless it is root).
    Operator,
}

/// The groups that carry the roles, as ids (`None`: the group does not exist here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleGroups {
    pub admin: Option<u32>,
    pub signer: Option<u32>,
}

/// A local user as the roles see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUser {
    pub uid: u32,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
}

impl LocalUser {
    /// The user's role.
    pub fn role(&self, g: RoleGroups) -> Role {
        let member = |gid: Option<u32>| gid.is_some_and(|g| self.groups.contains(&g));
        if self.uid == 0 || member(g.admin) {
            Role::Operator
        } else if member(g.signer) {
            Role::Signer
        } else {
            Role::None
        }
    }
}

/// Why a local user may not do something; each names what would allow it (a refusal,
/// `forbidden` on the wire: `services::errors` maps it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleRefusal {
    #[error("uid {uid} may not {what}: that is for root and the {admin} group (usermod -aG {admin} USER, then log in again); members of the {signer} group read the status and their own jobs")]
    NotOperator {
        uid: u32,
        what: String,
        admin: String,
        signer: String,
    },
    #[error("uid {uid} may not {what}: that is for root and the {signer} and {admin} groups (usermod -aG {signer} USER, then log in again)")]
    NotSigner {
        uid: u32,
        what: String,
        admin: String,
        signer: String,
    },
    #[error("uid {uid} may not enroll a VM: enrolling sets the VM's args (which Proxmox VE allows only root@pam) and adds grants, so it is root's alone; run it as root (sudo signetctl enroll ...)")]
    NotRoot { uid: u32 },
}

/// Whether `user` may do what needs `needed`; the refusal names the group to join.
pub fn require(
    user: &LocalUser,
    g: RoleGroups,
    needed: Role,
    what: &str,
    names: (&str, &str),
) -> Result<(), RoleRefusal> {
    if user.role(g) >= needed {
        return Ok(());
    }
    let (admin, signer) = names;
    let (uid, what, admin, signer) = (
        user.uid,
        what.to_owned(),
        admin.to_owned(),
        signer.to_owned(),
    );
    Err(match needed {
        Role::Operator => RoleRefusal::NotOperator {
            uid,
            what,
            admin,
            signer,
        },
        _ => RoleRefusal::NotSigner {
            uid,
            what,
            admin,
            signer,
        },
    })
}

/// Whether `user` may enroll a VM: root alone, since it changes the VM's `args`, which
/// Proxmox VE keeps for root@pam, and adds grants to `signetd.toml`.
pub fn may_enroll(user: &LocalUser) -> Result<(), RoleRefusal> {
    if user.uid == 0 {
        return Ok(());
    }
    Err(RoleRefusal::NotRoot { uid: user.uid })
}

/// The id of group `name` on this host, `None` when it does not exist.
pub fn gid_of(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// The groups of `uid` in the user database: its primary group and every group that
/// lists it (`getgrouplist`). Empty when the uid has no entry.
pub fn groups_of(uid: u32) -> Vec<u32> {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name.as_bytes()) else {
        return vec![user.gid.as_raw()];
    };
    match nix::unistd::getgrouplist(&name, user.gid) {
        Ok(g) => g.into_iter().map(|g| g.as_raw()).collect(),
        Err(_) => vec![user.gid.as_raw()],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const G: RoleGroups = RoleGroups {
        admin: Some(991),
        signer: Some(990),
    };
    const NAMES: (&str, &str) = ("signet-admin", "signet");

    fn user(uid: u32, groups: &[u32]) -> LocalUser {
        LocalUser {
            uid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_and_the_admin_group_operate_the_signet_group_signs() {
        assert_eq!(user(0, &[]).role(G), Role::Operator);
        assert_eq!(user(1000, &[100, 991]).role(G), Role::Operator);
        assert_eq!(user(1000, &[990]).role(G), Role::Signer);
        assert_eq!(user(1000, &[100]).role(G), Role::None);
        // A group missing on this host gives nobody its role.
        let none = RoleGroups::default();
        assert_eq!(user(1000, &[990, 991]).role(none), Role::None);
        assert_eq!(user(0, &[]).role(none), Role::Operator);
    }

    #[test]
    fn refusals_name_the_group_that_would_allow_it() {
        let signer = user(1000, &[990]);
        assert!(require(&signer, G, Role::Signer, "read the status", NAMES).is_ok());
        let e = require(&signer, G, Role::Operator, "detach a token", NAMES)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("uid 1000 may not detach a token")
                && e.contains("usermod -aG signet-admin"),
            "{e}"
        );
        let e = require(&user(5, &[]), G, Role::Signer, "read the status", NAMES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("usermod -aG signet USER"), "{e}");
        assert!(require(&user(7, &[991]), G, Role::Operator, "x", NAMES).is_ok());
    }

    #[test]
    fn only_root_enrolls() {
        assert!(may_enroll(&user(0, &[])).is_ok());
        let e = may_enroll(&user(1000, &[990, 991])).unwrap_err();
        assert_eq!(e, RoleRefusal::NotRoot { uid: 1000 });
        assert!(e.to_string().contains("root@pam"), "{e}");
    }

    #[test]
    fn the_user_database_gives_roots_groups() {
        assert!(groups_of(0).contains(&0));
        assert_eq!(gid_of("root"), Some(0));
        assert_eq!(gid_of("no-such-group-here"), None);
    }
}

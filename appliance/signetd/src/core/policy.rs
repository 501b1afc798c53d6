//! Who is calling, and may they use this profile. Pure: no I/O here.
//!
//! A [`Caller`] is what a transport can vouch for: the vsock CID of a VM (assigned by
//! the host, a guest cannot forge it; mapped to its VMID by `[cid_to_vmid]`), the
//! `SO_PEERCRED` uid/gid and supplementary groups of a local process, or the name of
//! a remote client that proved a secret over TLS. A plain TCP peer proves nothing and
//! is [`Caller::Anonymous`] unless the configuration names it (`insecure_tcp_as`, for
//! loopback tests).
//!
//! [`Policy::decide`] checks a caller against the `[[grants]]`; with none configured
//! only local root may sign (the safe default: VMs and clients need a grant).

use std::fmt;

use serde::Serialize;

/// A caller as identified by its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Caller {
    /// A VM over vsock.
    Vm { cid: u32, vmid: u32 },
    /// A local process over the unix socket.
    Local {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
    /// A remote client that authenticated with its secret; `granted` are the profiles
    /// it was added for (`signetd client add NAME --profile P`).
    Client {
        name: String,
        #[serde(skip)]
        granted: Vec<String>,
    },
    /// A TCP peer that proved nothing.
    Anonymous { addr: String },
    /// A vsock peer with a CID reserved for the host side (0 hypervisor, 1 local, 2
    /// host, see [`FIRST_GUEST_CID`]): any process on the host can connect from
    /// these, so it is not a VM and no grant matches it.
    HostVsock { cid: u32 },
}

/// The lowest vsock CID a guest can have; 0, 1 and 2 are the hypervisor, the local
/// loopback and the host.
pub const FIRST_GUEST_CID: u32 = 3;

impl Caller {
    /// The key its running jobs are counted under, and its audit identity.
    pub fn key(&self) -> String {
        match self {
            Caller::Vm { vmid, .. } => format!("vm:{vmid}"),
            Caller::Local { uid, .. } => format!("uid:{uid}"),
            Caller::Client { name, .. } => format!("client:{name}"),
            Caller::Anonymous { addr } => format!("tcp:{addr}"),
            Caller::HostVsock { cid } => format!("vsock-cid:{cid}"),
        }
    }

    /// The caller behind a vsock connection from `cid`: a VM (its VMID from `map`, else
    /// the CID itself), unless the CID is one of the host's.
    pub fn of_vsock(map: &std::collections::BTreeMap<u32, u32>, cid: u32) -> Caller {
        if cid < FIRST_GUEST_CID {
            return Caller::HostVsock { cid };
        }
        Caller::Vm {
            cid,
            vmid: vmid_for_cid(map, cid),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Vm { cid, vmid } if cid == vmid => write!(f, "VM {vmid}"),
            Caller::Vm { cid, vmid } => write!(f, "VM {vmid} (vsock CID {cid})"),
            Caller::Local { uid, gid, .. } => write!(f, "local uid {uid} (gid {gid})"),
            Caller::Client { name, .. } => write!(f, "client {name:?}"),
            Caller::Anonymous { addr } => write!(f, "unauthenticated TCP peer {addr}"),
            Caller::HostVsock { cid } => {
                write!(f, "vsock CID {cid} (the host's side, not a VM)")
            }
        }
    }
}

/// The VMID of a vsock CID: from the map, else the CID itself (Proxmox's convention).
pub fn vmid_for_cid(map: &std::collections::BTreeMap<u32, u32>, cid: u32) -> u32 {
    map.get(&cid).copied().unwrap_or(cid)
}

/// One entry of a grant's `callers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerPattern {
    /// `vm:VMID`, or `vm:*` (`None`) for every VM.
    Vm(Option<u32>),
    /// `uid:N` or `user:NAME`.
    Uid(u32),
    /// `gid:N` or `group:NAME`: the primary or a supplementary group.
    Gid(u32),
    /// `client:NAME`, or `client:*` (`None`) for every authenticated client.
    Client(Option<String>),
}

/// Why a `callers` entry was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("caller {0:?} is not understood; write vm:VMID, vm:*, uid:N, user:NAME, gid:N, group:NAME, client:NAME or client:*")]
    Syntax(String),
    #[error("caller {0:?} names a user or group this host does not have")]
    Unknown(String),
}

/// Which name a resolver is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    User,
    Group,
}

impl CallerPattern {
    /// Parses one pattern; `resolve` turns user and group names into ids.
    pub fn parse(
        s: &str,
        resolve: &dyn Fn(NameKind, &str) -> Option<u32>,
    ) -> Result<Self, PatternError> {
        let syntax = || PatternError::Syntax(s.to_owned());
        let (kind, rest) = s.split_once(':').ok_or_else(syntax)?;
        if rest.is_empty() {
            return Err(syntax());
        }
        let num = |r: &str| r.parse::<u32>().map_err(|_| syntax());
        Ok(match kind {
            "vm" if rest == "*" => CallerPattern::Vm(None),
            "vm" => CallerPattern::Vm(Some(num(rest)?)),
            "uid" => CallerPattern::Uid(num(rest)?),
            "gid" => CallerPattern::Gid(num(rest)?),
            "user" => CallerPattern::Uid(
                resolve(NameKind::User, rest).ok_or_else(|| PatternError::Unknown(s.to_owned()))?,
            ),
            "group" => CallerPattern::Gid(
                resolve(NameKind::Group, rest)
                    .ok_or_else(|| PatternError::Unknown(s.to_owned()))?,
            ),
            "client" if rest == "*" => CallerPattern::Client(None),
            "client" => CallerPattern::Client(Some(rest.to_owned())),
            _ => return Err(syntax()),
        })
    }

    /// Whether `caller` is one of the callers this pattern names.
    pub fn matches(&self, caller: &Caller) -> bool {
        match (self, caller) {
            (CallerPattern::Vm(want), Caller::Vm { cid, vmid }) => {
                *cid >= FIRST_GUEST_CID && want.is_none_or(|w| w == *vmid)
            }
            (CallerPattern::Uid(want), Caller::Local { uid, .. }) => want == uid,
            (CallerPattern::Gid(want), Caller::Local { gid, groups, .. }) => {
                want == gid || groups.contains(want)
            }
            (CallerPattern::Client(want), Caller::Client { name, .. }) => {
                want.as_deref().is_none_or(|w| w == name)
            }
            _ => false,
        }
    }
}

/// Callers and the profiles they may use (`"*"`: all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub callers: Vec<CallerPattern>,
    pub profiles: Vec<String>,
}

impl Grant {
    fn allows(&self, caller: &Caller, profile: &str) -> bool {
        self.callers.iter().any(|c| c.matches(caller))
            && self.profiles.iter().any(|p| p == "*" || p == profile)
    }
}

/// The grants in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    grants: Vec<Grant>,
}

/// A refusal: the caller may not use the profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{caller} may not sign with profile {profile:?}; the appliance's operator grants profiles to callers in signetd.toml ([[grants]] callers = [\"{key}\"] profiles = [\"{profile}\"])")]
pub struct Refusal {
    pub caller: Caller,
    pub key: String,
    pub profile: String,
}

impl Policy {
    /// The policy of `grants`; with none, local root may use every profile and nobody
    /// else any.
    pub fn new(grants: Vec<Grant>) -> Self {
        if grants.is_empty() {
            return Policy {
                grants: vec![Grant {
                    callers: vec![CallerPattern::Uid(0)],
                    profiles: vec!["*".to_owned()],
                }],
            };
        }
        Policy { grants }
    }

    /// Whether `caller` may sign with `profile`: a grant names both, or the caller is a
    /// client added for that profile.
    pub fn decide(&self, caller: &Caller, profile: &str) -> Result<(), Refusal> {
        let own = matches!(caller, Caller::Client { granted, .. } if granted.iter().any(|p| p == profile));
        if own || self.grants.iter().any(|g| g.allows(caller, profile)) {
            Ok(())
        } else {
            Err(Refusal {
                caller: caller.clone(),
                key: match caller {
                    // An anonymous peer cannot be granted anything; name what could.
                    Caller::Anonymous { .. } | Caller::HostVsock { .. } => "client:NAME".to_owned(),
                    c => c.key(),
                },
                profile: profile.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn resolve(kind: NameKind, name: &str) -> Option<u32> {
        match (kind, name) {
            (NameKind::User, "builder") => Some(1001),
            (NameKind::Group, "signet") => Some(990),
            _ => None,
        }
    }

    fn pat(s: &str) -> CallerPattern {
        CallerPattern::parse(s, &resolve).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn local(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller::Local {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn patterns_parse_and_name_the_syntax_when_wrong() {
        assert_eq!(pat("vm:104"), CallerPattern::Vm(Some(104)));
        assert_eq!(pat("vm:*"), CallerPattern::Vm(None));
        assert_eq!(pat("uid:0"), CallerPattern::Uid(0));
        assert_eq!(pat("user:builder"), CallerPattern::Uid(1001));
        assert_eq!(pat("gid:5"), CallerPattern::Gid(5));
        assert_eq!(pat("group:signet"), CallerPattern::Gid(990));
        assert_eq!(pat("client:ci"), CallerPattern::Client(Some("ci".into())));
        assert_eq!(pat("client:*"), CallerPattern::Client(None));
        for bad in ["vm", "vm:", "vm:x", "uid:-1", "host:1", "104", "gid:g"] {
            let e = CallerPattern::parse(bad, &resolve).unwrap_err();
            assert_eq!(e, PatternError::Syntax(bad.into()));
            assert!(e.to_string().contains("vm:VMID"), "{e}");
        }
        for unknown in ["user:nobody-here", "group:nope"] {
            let e = CallerPattern::parse(unknown, &resolve).unwrap_err();
            assert_eq!(e, PatternError::Unknown(unknown.into()));
        }
    }

    #[test]
    fn patterns_match_only_their_kind_of_caller() {
        let vm = Caller::Vm {
            cid: 104,
            vmid: 104,
        };
        let client = Caller::Client {
            name: "ci".into(),
            granted: vec![],
        };
        let anon = Caller::Anonymous {
            addr: "10.0.0.1:5000".into(),
        };
        assert!(pat("vm:104").matches(&vm));
        assert!(!pat("vm:105").matches(&vm));
        assert!(pat("vm:*").matches(&vm));
        assert!(!pat("uid:104").matches(&vm), "a CID is not a uid");
        assert!(pat("uid:1001").matches(&local(1001, 100, &[])));
        assert!(pat("group:signet").matches(&local(1001, 100, &[4, 990])));
        assert!(pat("gid:100").matches(&local(1001, 100, &[])), "primary");
        assert!(!pat("group:signet").matches(&local(1001, 100, &[4])));
        assert!(pat("client:ci").matches(&client));
        assert!(!pat("client:cd").matches(&client));
        assert!(pat("client:*").matches(&client));
        for p in ["vm:*", "client:*", "uid:0", "gid:0"] {
            assert!(
                !pat(p).matches(&anon),
                "{p} does not match an anonymous peer"
            );
        }
    }

    #[test]
    fn without_grants_only_local_root_signs() {
        let p = Policy::new(vec![]);
        assert!(p.decide(&local(0, 0, &[]), "release").is_ok());
        assert!(p.decide(&local(1000, 1000, &[0]), "release").is_err());
        let vm = Caller::Vm {
            cid: 104,
            vmid: 104,
        };
        let e = p.decide(&vm, "release").unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM 104 may not sign with profile \"release\"; the appliance's operator grants \
             profiles to callers in signetd.toml ([[grants]] callers = [\"vm:104\"] profiles = [\"release\"])"
        );
        let e = p
            .decide(
                &Caller::Anonymous {
                    addr: "1.2.3.4:9".into(),
                },
                "x",
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("unauthenticated TCP peer 1.2.3.4:9")
                && e.to_string().contains("client:NAME"),
            "{e}"
        );
    }

    #[test]
    fn grants_name_callers_and_profiles() {
        let p = Policy::new(vec![
            Grant {
                callers: vec![pat("vm:104"), pat("group:signet")],
                profiles: vec!["release".into()],
            },
            Grant {
                callers: vec![pat("client:ci")],
                profiles: vec!["*".into()],
            },
        ]);
        let vm = |vmid| Caller::Vm { cid: vmid, vmid };
        assert!(p.decide(&vm(104), "release").is_ok());
        assert!(p.decide(&vm(104), "test").is_err());
        assert!(p.decide(&vm(105), "release").is_err());
        assert!(p.decide(&local(1001, 100, &[990]), "release").is_ok());
        assert!(
            p.decide(&local(0, 0, &[]), "release").is_err(),
            "root is not implicit once grants are configured"
        );
        let ci = Caller::Client {
            name: "ci".into(),
            granted: vec![],
        };
        assert!(p.decide(&ci, "release").is_ok() && p.decide(&ci, "test").is_ok());
        let cd = Caller::Client {
            name: "cd".into(),
            granted: vec!["test".into()],
        };
        assert!(p.decide(&cd, "test").is_ok(), "added for it");
        assert!(p.decide(&cd, "release").is_err());
    }

    #[test]
    fn cids_map_to_vmids_or_are_their_own() {
        let map = [(1042, 104)].into_iter().collect();
        assert_eq!(vmid_for_cid(&map, 1042), 104);
        assert_eq!(vmid_for_cid(&map, 105), 105);
        let c = Caller::Vm {
            cid: 1042,
            vmid: 104,
        };
        assert_eq!(c.to_string(), "VM 104 (vsock CID 1042)");
        assert_eq!(c.key(), "vm:104");
    }

    #[test]
    fn host_cids_are_never_a_vm_and_no_grant_matches_them() {
        let map = [(1, 104), (2, 105)].into_iter().collect();
        let p = Policy::new(vec![Grant {
            callers: vec![pat("vm:*"), pat("vm:104"), pat("vm:105"), pat("vm:1")],
            profiles: vec!["*".into()],
        }]);
        for cid in 0..FIRST_GUEST_CID {
            let c = Caller::of_vsock(&map, cid);
            assert_eq!(
                c,
                Caller::HostVsock { cid },
                "even when [cid_to_vmid] maps it"
            );
            assert_eq!(c.key(), format!("vsock-cid:{cid}"));
            assert!(!pat("vm:*").matches(&c));
            let e = p.decide(&c, "release").unwrap_err();
            assert!(e.to_string().contains("not a VM"), "{e}");
            // Built by hand, a VM with a host CID is still not matched.
            let forged = Caller::Vm { cid, vmid: 104 };
            assert!(!pat("vm:*").matches(&forged) && !pat("vm:104").matches(&forged));
        }
        let vm = Caller::of_vsock(&map, 3);
        assert_eq!(vm, Caller::Vm { cid: 3, vmid: 3 });
        assert!(pat("vm:*").matches(&vm));
        assert!(p.decide(&Caller::of_vsock(&map, 104), "release").is_ok());
    }
}

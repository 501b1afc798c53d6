//! What `signetd enroll` adds to `signetd.toml`: for a build VM, a `[[grants]]` stanza
//! for `vm:VMID` with the profiles it may not use yet ([`missing`], [`stanza`]); for
//! a signing VM, the `[[tokens]]` entry saying the token belongs to it
//! ([`assignment`]).
//!
//! The decisions are pure; [`append`] writes the file whole or not at all
//! (a temp file beside it, checked by parsing it as the daemon would, then renamed
//! over), keeping everything that was there, comments included.

use std::io::Write;
use std::path::Path;

use crate::config::{Config, ConfigError};
use crate::core::policy::Caller;

/// Why `signetd.toml` cannot be changed as asked.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("no profile is named {name:?} in {path}; profiles: {known}")]
    UnknownProfile {
        name: String,
        path: String,
        known: String,
    },
    #[error("cannot write {path}: {source}; add the stanza by hand")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token {serial} is assigned to VM {assigned} in {path}, not VM {asked}; a token belongs to one VM: change or remove its [[tokens]] entry first")]
    OtherVm {
        serial: String,
        assigned: u32,
        asked: u32,
        path: String,
    },
    #[error("{path} would not be valid with the change ({source}); nothing was changed: add the stanza by hand")]
    Invalid {
        path: String,
        #[source]
        source: ConfigError,
    },
}

/// The profiles among `profiles` that VM `vmid` (vsock CID = VMID) may not use yet.
pub fn missing(cfg: &Config, vmid: u32, profiles: &[String]) -> Result<Vec<String>, EditError> {
    let caller = Caller::Vm { cid: vmid, vmid };
    let mut out = Vec::new();
    for p in profiles {
        if p != "*" && !cfg.profiles.contains_key(p) {
            return Err(EditError::UnknownProfile {
                name: p.clone(),
                path: cfg.path.display().to_string(),
                known: cfg.profiles.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let granted = if p == "*" {
            cfg.profiles
                .keys()
                .all(|name| cfg.policy.decide(&caller, name).is_ok())
        } else {
            cfg.policy.decide(&caller, p).is_ok()
        };
        if !granted && !out.contains(p) {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The `[[grants]]` stanza giving VM `vmid` `profiles`.
pub fn stanza(vmid: u32, profiles: &[String]) -> String {
    let list = profiles
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "# Added by `signetd enroll build-vm {vmid}`.\n[[grants]]\ncallers = [\"vm:{vmid}\"]\nprofiles = [{list}]\n"
    )
}

/// The `[[tokens]]` stanza assigning token `serial` to VM `vmid`, or `None` when the
/// configuration says so already.
pub fn assignment(cfg: &Config, serial: &str, vmid: u32) -> Result<Option<String>, EditError> {
    match cfg.tokens.iter().find(|t| t.serial == serial) {
        Some(t) if t.vm == vmid => Ok(None),
        Some(t) => Err(EditError::OtherVm {
            serial: serial.to_owned(),
            assigned: t.vm,
            asked: vmid,
            path: cfg.path.display().to_string(),
        }),
        None => Ok(Some(format!(
            "# Added by `signetd enroll signing-vm {vmid}`.\n[[tokens]]\nserial = {serial:?}\nvm = {vmid}\n"
        ))),
    }
}

/// Appends `stanza` to the configuration at `path`, whole or not at all.
pub fn append(path: &Path, stanza: &str) -> Result<(), EditError> {
    let shown = path.display().to_string();
    let write_err = |source| EditError::Write {
        path: shown.clone(),
        source,
    };
    let old = std::fs::read_to_string(path).map_err(write_err)?;
    let mut new = old.clone();
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push('\n');
    new.push_str(stanza);
    Config::parse(path, &new).map_err(|source| EditError::Invalid {
        path: shown.clone(),
        source,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.enroll-{}", std::process::id()));
    let perms = std::fs::metadata(path).map_err(write_err)?.permissions();
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(new.as_bytes())?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, perms)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(Path::new("/etc/signet/signetd.toml"), text).unwrap()
    }

    #[test]
    fn only_what_is_not_granted_yet() {
        let base = "agent = \"unix:/a\"\ndefault_profile = \"release\"\n[profiles.release]\n[profiles.test]\n";
        let c = cfg(base);
        let all = ["release".to_owned(), "test".to_owned()];
        assert_eq!(missing(&c, 104, &all).unwrap(), all);
        let with = cfg(&format!(
            "{base}[[grants]]\ncallers = [\"vm:104\"]\nprofiles = [\"release\"]\n"
        ));
        assert_eq!(missing(&with, 104, &all).unwrap(), ["test"]);
        assert_eq!(missing(&with, 105, &all[..1]).unwrap(), ["release"]);
        assert_eq!(missing(&with, 104, &["*".to_owned()]).unwrap(), ["*"]);
        let star = cfg(&format!(
            "{base}[[grants]]\ncallers = [\"vm:*\"]\nprofiles = [\"*\"]\n"
        ));
        assert!(missing(&star, 104, &["*".to_owned()]).unwrap().is_empty());
        let e = missing(&c, 104, &["relaese".to_owned()]).unwrap_err();
        assert!(
            e.to_string().contains("\"relaese\"") && e.to_string().contains("release, test"),
            "{e}"
        );
    }

    #[test]
    fn a_token_is_assigned_once_and_to_one_vm() {
        let c = cfg("agent = \"unix:/a\"\n[[tokens]]\nserial = \"A\"\nvm = 105\n");
        assert_eq!(assignment(&c, "A", 105).unwrap(), None);
        let e = assignment(&c, "A", 106).unwrap_err();
        assert!(
            e.to_string().contains("assigned to VM 105") && e.to_string().contains("not VM 106"),
            "{e}"
        );
        let s = assignment(&c, "B", 106).unwrap().unwrap();
        let both = cfg(&format!(
            "agent = \"unix:/a\"\n[[tokens]]\nserial = \"A\"\nvm = 105\n{s}"
        ));
        assert_eq!(both.tokens[1].serial, "B");
        assert_eq!(both.tokens[1].vm, 106);
    }

    #[test]
    fn the_stanza_is_valid_and_appending_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signetd.toml");
        let base = "# my comment\nagent = \"unix:/a\"\n[profiles.release]";
        std::fs::write(&path, base).unwrap();
        append(&path, &stanza(104, &["release".to_owned()])).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(base), "{text}");
        assert!(
            text.ends_with("[[grants]]\ncallers = [\"vm:104\"]\nprofiles = [\"release\"]\n"),
            "{text}"
        );
        let c = Config::parse(&path, &text).unwrap();
        assert!(missing(&c, 104, &["release".to_owned()])
            .unwrap()
            .is_empty());
        // A stanza that would break the file changes nothing.
        let e = append(
            &path,
            "[[grants]]\ncallers = [\"vm:x\"]\nprofiles = [\"release\"]\n",
        )
        .unwrap_err();
        assert!(matches!(e, EditError::Invalid { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}

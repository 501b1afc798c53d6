//! Reloading the configuration in place (`systemctl reload signetd`, SIGHUP, and
//! after an enroll through the daemon).
//!
//! [`check`] validates a file exactly as `signetd check-config` does; [`merge`] is
//! pure: it takes what may change while jobs run from the new file — the grants, the
//! profiles, the default profile, `[limits]` apart from the two the listeners were
//! started with, and the token assignments (`[[tokens]]`, which the daemon hands to
//! the token service: [`crate::services::tokens::Handle::reassign`]) — keeps everything else as
//! it was, and says what changed and what waits for a restart. Jobs already accepted
//! keep the agent query they were given; queued jobs are not tied to a token (the
//! daemon has one agent and one worker), so a changed `[[tokens]]` moves no job.
//!
//! What still waits for a restart: `[passthrough]` (the udev watcher, the monitor
//! directory, the VMs' USB bus, QMP's time limit and sysfs are taken at start),
//! `[[known_tokens]]` (the catalog the watcher sorts devices with). The recovery
//! ladder follows the agent VM's tokens as reloaded (the agent watcher reads them anew
//! when the configuration changes). `[alerts]` applies whole at once: its delays and
//! hold-down to the incidents in course, its targets to the next notice delivered.

use std::path::Path;

use crate::config::Config;

/// What a reload changed, and what changed in the file but waits for a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The settings now in force from the new file.
    pub applied: Vec<&'static str>,
    /// The settings that changed in the file but keep their old values until
    /// signetd restarts.
    pub need_restart: Vec<&'static str>,
}

impl Changes {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let applied = if self.applied.is_empty() {
            "nothing changed that applies live".to_owned()
        } else {
            format!("applied: {}", self.applied.join(", "))
        };
        if self.need_restart.is_empty() {
            applied
        } else {
            format!(
                "{applied}; changed but kept until signetd restarts (systemctl restart signetd): {}",
                self.need_restart.join(", ")
            )
        }
    }
}

/// The configuration in `path`, checked as `signetd check-config` checks it (its
/// syntax and values, and the owner and mode of the PIN file and of the webhook's
/// token file); the error says what is wrong and the fix.
pub fn check(path: &Path) -> Result<Config, String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    if let Some(pin) = &cfg.pin_file {
        signet_protocol::pin_file::check_own(pin)?;
    }
    if let Some(token) = &cfg.alerts.webhook_token_file {
        crate::config::alerts::check_token_file(token)?;
    }
    Ok(cfg)
}

/// `old` with the live settings of `new` in force, and what changed.
pub fn merge(old: &Config, new: Config) -> (Config, Changes) {
    let mut changes = Changes::default();
    let mut out = old.clone();
    if new.policy != old.policy {
        changes.applied.push("grants");
        out.policy = new.policy.clone();
    }
    if new.profiles != old.profiles {
        changes.applied.push("profiles");
        out.profiles = new.profiles.clone();
    }
    if new.default_profile != old.default_profile {
        changes.applied.push("default_profile");
        out.default_profile = new.default_profile.clone();
    }
    // The listeners were started with these two; the rest of [limits] is read per
    // request or per job.
    let mut limits = new.limits.clone();
    limits.header_timeout_seconds = old.limits.header_timeout_seconds;
    limits.max_connections = old.limits.max_connections;
    if limits != old.limits {
        changes.applied.push("limits");
        out.limits = limits;
    }
    if new.alerts != old.alerts {
        changes.applied.push("alerts");
        out.alerts = new.alerts.clone();
    }
    if new.tokens != old.tokens {
        changes.applied.push("tokens");
        out.tokens = new.tokens.clone();
    }
    if new.limits.header_timeout_seconds != old.limits.header_timeout_seconds {
        changes.need_restart.push("limits.header_timeout_seconds");
    }
    if new.limits.max_connections != old.limits.max_connections {
        changes.need_restart.push("limits.max_connections");
    }
    // Everything else was bound, opened or started with the daemon. Compared by
    // their debug form: not every section has an equality.
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let fixed: [(&'static str, bool); 18] = [
        ("listen", differs(&old.listen, &new.listen)),
        ("agent", differs(&old.agent, &new.agent)),
        ("dbus", differs(&old.dbus, &new.dbus)),
        (
            "known_tokens",
            differs(&old.known_tokens, &new.known_tokens),
        ),
        ("cid_to_vmid", differs(&old.cid_to_vmid, &new.cid_to_vmid)),
        (
            "insecure_tcp_as",
            differs(&old.insecure_tcp_as, &new.insecure_tcp_as),
        ),
        ("state_dir", differs(&old.state_dir, &new.state_dir)),
        ("tls", differs(&old.tls, &new.tls)),
        ("queue", differs(&old.queue, &new.queue)),
        ("shutdown", differs(&old.shutdown, &new.shutdown)),
        ("pin_file", differs(&old.pin_file, &new.pin_file)),
        ("doctor", differs(&old.doctor, &new.doctor)),
        ("web", differs(&old.web, &new.web)),
        ("metrics", differs(&old.metrics, &new.metrics)),
        ("passthrough", differs(&old.passthrough, &new.passthrough)),
        ("recovery", differs(&old.recovery, &new.recovery)),
        (
            "socket_group",
            differs(&old.socket_group, &new.socket_group),
        ),
        ("admin_group", differs(&old.admin_group, &new.admin_group)),
    ];
    changes.need_restart.extend(
        fixed
            .into_iter()
            .filter_map(|(name, changed)| changed.then_some(name)),
    );
    (out, changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(Path::new("/etc/signet/signetd.toml"), text).unwrap()
    }

    const BASE: &str = "agent = \"unix:/run/a.sock\"\nlisten = [\"unix:/run/s.sock\"]\ndefault_profile = \"release\"\n\n[profiles.release]\n\n[profiles.test]\n\n[[grants]]\ncallers = [\"vm:101\"]\nprofiles = [\"release\"]\n";

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let old = parse(BASE);
        let (out, changes) = merge(&old, parse(BASE));
        assert_eq!(changes, Changes::default());
        assert_eq!(format!("{out:?}"), format!("{old:?}"));
        assert_eq!(changes.summary(), "nothing changed that applies live");
    }

    #[test]
    fn grants_profiles_and_limits_apply_the_rest_waits() {
        let old = parse(BASE);
        let text = BASE
            .replace("unix:/run/a.sock", "unix:/run/b.sock")
            .replace("default_profile = \"release\"", "default_profile = \"test\"")
            + "\n[[grants]]\ncallers = [\"vm:102\"]\nprofiles = [\"test\"]\n\n[limits]\nmax_jobs_per_caller = 9\nmax_connections = 7\n";
        let new = parse(&text);
        let (out, changes) = merge(&old, new.clone());
        assert_eq!(changes.applied, vec!["grants", "default_profile", "limits"]);
        assert_eq!(
            changes.need_restart,
            vec!["limits.max_connections", "agent"]
        );
        assert_eq!(out.policy, new.policy);
        assert_eq!(out.default_profile, "test");
        assert_eq!(out.limits.max_jobs_per_caller, 9);
        // Kept: the listeners and the agent were started with the old values.
        assert_eq!(out.limits.max_connections, old.limits.max_connections);
        assert_eq!(out.agent, old.agent);
        let line = changes.summary();
        assert!(
            line.contains("applied: grants, default_profile, limits"),
            "{line}"
        );
        assert!(line.contains("signetd restarts"), "{line}");
        assert!(line.contains("limits.max_connections, agent"), "{line}");
    }

    #[test]
    fn a_new_profile_applies() {
        let old = parse(BASE);
        let (out, changes) = merge(&old, parse(&(BASE.to_owned() + "\n[profiles.extra]\n")));
        assert_eq!(changes.applied, vec!["profiles"]);
        assert!(changes.need_restart.is_empty());
        assert!(out.profiles.contains_key("extra"));
    }

    #[test]
    fn tokens_apply_at_once_ladder_included() {
        let old = parse(BASE);
        let one = BASE.to_owned() + "\n[[tokens]]\nserial = \"A\"\nvm = 105\n";
        let (out, changes) = merge(&old, parse(&one));
        assert_eq!(changes.applied, vec!["tokens"]);
        // The unix agent's VM is now the one VM [[tokens]] names: the ladder follows
        // it as reloaded, nothing waits.
        assert!(changes.need_restart.is_empty(), "{changes:?}");
        assert_eq!(out.tokens, parse(&one).tokens);

        // A token for another VM beside the agent's (named in [recovery]): applied,
        // nothing waits.
        let pinned = parse(&(one.clone() + "\n[recovery]\nagent_vm = 105\n"));
        let mut two = pinned.clone();
        two.tokens.push(crate::config::Assignment {
            serial: "B".into(),
            vm: 106,
            device: Default::default(),
        });
        let (_, changes) = merge(&pinned, two.clone());
        assert_eq!(changes.applied, vec!["tokens"]);
        assert!(changes.need_restart.is_empty(), "{changes:?}");
        // Moved from the agent's VM: the ladder's tokens change.
        let mut moved = two.clone();
        moved.tokens[0].vm = 107;
        let (_, changes) = merge(&two, moved);
        assert_eq!(changes.applied, vec!["tokens"]);
        assert!(changes.need_restart.is_empty(), "{changes:?}");

        // [passthrough] and [[known_tokens]] still wait for a restart.
        let other = BASE.to_owned() + "\n[passthrough]\nmonitor_dir = \"/srv/m\"\n[[known_tokens]]\nid = \"1234:abcd\"\nmodel = \"x\"\n";
        let (out, changes) = merge(&old, parse(&other));
        assert!(changes.applied.is_empty());
        assert_eq!(changes.need_restart, vec!["known_tokens", "passthrough"]);
        assert_eq!(out.passthrough, old.passthrough);
    }

    #[test]
    fn check_refuses_a_broken_file_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signetd.toml");
        std::fs::write(&path, "agent = \n").unwrap();
        let e = check(&path).unwrap_err();
        assert!(e.contains("signetd.toml"), "{e}");
        std::fs::write(&path, BASE).unwrap();
        assert_eq!(check(&path).unwrap().default_profile, "release");
    }

    #[test]
    fn the_daemon_puts_a_valid_file_in_force_and_keeps_its_configuration_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signetd.toml");
        let base = format!(
            "state_dir = \"{}\"\n{BASE}",
            dir.path().join("state").display()
        );
        std::fs::write(&path, &base).unwrap();
        let daemon = crate::services::daemon::Daemon::open(Config::load(&path).unwrap()).unwrap();
        let vm = crate::core::policy::Caller::of_vsock(&Default::default(), 102);
        assert!(daemon.config().policy.decide(&vm, "test").is_err());

        let more = base.clone()
            + "\n[[grants]]\ncallers = [\"vm:102\"]\nprofiles = [\"test\"]\n\n[limits]\nmax_jobs_per_caller = 1\n";
        std::fs::write(&path, &more).unwrap();
        let changes = daemon.reload().unwrap();
        assert_eq!(changes.applied, vec!["grants", "limits"]);
        assert!(daemon.config().policy.decide(&vm, "test").is_ok());
        assert_eq!(daemon.config().limits.max_jobs_per_caller, 1);

        std::fs::write(&path, "agent = \n").unwrap();
        assert!(daemon.reload().is_err());
        assert!(daemon.config().policy.decide(&vm, "test").is_ok());
        assert_eq!(daemon.config().limits.max_jobs_per_caller, 1);
    }
}

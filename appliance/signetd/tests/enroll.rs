//! `signetd enroll` as a process, against `tests/fixtures/fake-qm` (a stand-in for
//! Proxmox's `qm` keeping VM configurations in a temp dir) and, for the signing VM, a
//! token in a umockdev testbed; `signetd tokens` in a testbed with two tokens.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn manifest(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

struct Pve {
    dir: tempfile::TempDir,
}

impl Pve {
    fn with(vmid: u32, recorded: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            manifest("tests/data/qm-config").join(recorded),
            dir.path().join(format!("{vmid}.conf")),
        )
        .unwrap();
        Pve { dir }
    }

    fn config(&self, vmid: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{vmid}.conf"))).unwrap()
    }

    /// The daemon's configuration for this test (absent until a test writes it).
    fn signetd_toml(&self) -> PathBuf {
        self.dir.path().join("signetd.toml")
    }

    /// A state directory for the daemon's database, in this test's temp dir.
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The audit log in the state directory, as `signetd audit export` writes it, and
    /// whether its chain verifies.
    fn audit(&self) -> (Vec<serde_json::Value>, bool) {
        let run = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_signetd"))
                .arg("--config")
                .arg(self.signetd_toml())
                .arg("audit")
                .args(args)
                .output()
                .unwrap()
        };
        let export = run(&["export"]);
        assert!(export.status.success(), "{:?}", text(&export));
        let records = String::from_utf8(export.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (records, run(&["verify"]).status.success())
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default()
    }

    /// `signetd enroll ARGS`, optionally inside a umockdev testbed with `devices`.
    fn enroll(&self, args: &[&str], devices: &[&Path]) -> Output {
        let signetd = env!("CARGO_BIN_EXE_signetd");
        let mut cmd = if devices.is_empty() {
            Command::new(signetd)
        } else {
            let mut c = Command::new("umockdev-run");
            for d in devices {
                c.arg("--device").arg(d);
            }
            c.arg("--").arg(signetd);
            c
        };
        cmd.arg("enroll")
            .args(args)
            .env("SIGNETD_CONFIG", self.signetd_toml())
            .env("SIGNETD_QM", manifest("tests/fixtures/fake-qm"))
            .env("FAKE_QM_DIR", self.dir.path())
            .output()
            .unwrap()
    }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn build_vm_dry_run_then_apply_then_nothing_left() {
    let pve = Pve::with(200, "with-args.conf");
    let before = pve.config(200);

    let o = pve.enroll(&["build-vm", "200", "--dry-run"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("  - args: -cpu host,+aes -smbios type=0,vendor=ACME\n"),
        "{out}"
    );
    assert!(
        out.contains("  + args: -cpu host,+aes -smbios type=0,vendor=ACME -device vhost-vsock-pci,guest-cid=200\n"),
        "{out}"
    );
    assert!(out.contains("would run: "), "{out}");
    assert_eq!(pve.config(200), before, "a dry run changes nothing");
    assert!(!pve.calls().contains("set"), "{}", pve.calls());

    let o = pve.enroll(&["build-vm", "200"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let after = pve.config(200);
    assert!(
        after.contains("args: -cpu host,+aes -smbios type=0,vendor=ACME -device vhost-vsock-pci,guest-cid=200\n"),
        "{after}"
    );
    assert!(
        after.contains("usb0: host=046d:c52b\n"),
        "the rest is kept: {after}"
    );

    let o = pve.enroll(&["build-vm", "200"], &[]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(out.contains("already enrolled"), "{out}");
}

#[test]
fn signing_vm_gets_the_tokens_port_vsock_and_monitor() {
    let pve = Pve::with(105, "with-args.conf");
    let token = manifest("tests/data/umockdev/safenet-5110-a.umockdev");
    let o = pve.enroll(
        &[
            "signing-vm",
            "105",
            "--token",
            "0123ABCD",
            "--monitor-dir",
            "/run/signet",
        ],
        &[&token],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let cfg = pve.config(105);
    // usb0 is the user's; the token (at 1-2 in the testbed) takes usb1.
    assert!(cfg.contains("usb0: host=046d:c52b\n"), "{cfg}");
    assert!(cfg.contains("usb1: host=1-2\n"), "{cfg}");
    assert!(
        cfg.contains("args: -cpu host,+aes -smbios type=0,vendor=ACME -device vhost-vsock-pci,guest-cid=105 -chardev socket,id=signet,path=/run/signet/vm-105.qmp,server=on,wait=off -mon chardev=signet,mode=control\n"),
        "{cfg}"
    );
    assert!(
        out.contains("takes effect when VM 105 next starts"),
        "{out}"
    );
    // Enrolled already: a second run changes nothing.
    let o = pve.enroll(&["signing-vm", "105", "--token", "0123ABCD"], &[&token]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("already enrolled"), "{out}");
}

#[test]
fn build_vm_without_a_vsock_driver_is_refused_unchanged() {
    let pve = Pve::with(107, "q35-6.0-win7.conf");
    let before = pve.config(107);
    for args in [&["build-vm", "107"][..], &["build-vm", "107", "--dry-run"]] {
        let o = pve.enroll(args, &[]);
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{out}");
        assert!(
            err.contains("VM 107 cannot reach Signet over virtio-vsock: ostype win7")
                && err.contains("qm set 107 --ostype l26"),
            "{err}"
        );
    }
    assert_eq!(pve.config(107), before);
    assert!(!pve.calls().contains("set"), "{}", pve.calls());
}

#[test]
fn signing_vm_refusals_change_nothing() {
    let token = manifest("tests/data/umockdev/safenet-5110-a.umockdev");
    let pve = Pve::with(106, "q35-6.0-win7.conf");
    let before = pve.config(106);
    let o = pve.enroll(&["signing-vm", "106", "--token", "0123ABCD"], &[&token]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        err.contains("VM 106 cannot hot-plug USB devices: ostype win7"),
        "{err}"
    );
    assert_eq!(pve.config(106), before);

    let pve = Pve::with(105, "simple1.conf");
    let o = pve.enroll(&["signing-vm", "105", "--token", "FFFF0000"], &[&token]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("no token with serial FFFF0000")
            && err.contains("0123ABCD at 1-2 (0529:0620)"),
        "{err}"
    );
    assert!(!pve.calls().contains("set"));

    let o = pve.enroll(&["build-vm", "999"], &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("999.conf' does not exist"), "{err}");
}

#[test]
fn tokens_lists_identical_tokens_by_serial_with_conflicts() {
    let a = manifest("tests/data/umockdev/safenet-5110-a.umockdev");
    let b = manifest("tests/data/umockdev/safenet-5110-b.umockdev");
    let run = |json: bool| {
        let mut c = Command::new("umockdev-run");
        c.arg("--device").arg(&a).arg("--device").arg(&b);
        c.arg("--").arg(env!("CARGO_BIN_EXE_signetd")).arg("tokens");
        c.env("SIGNETD_CONFIG", "/nonexistent/signetd.toml");
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let o = run(false);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("0123ABCD  SafeNet eToken 5110  0529:0620 at 1-2 (device 5)\n"),
        "{out}"
    );
    assert!(
        out.contains("0456CDEF  SafeNet eToken 5110  0529:0620 at 1-3 (device 7)\n  conflict: interface 1-3:1.0 is held by the host driver usbfs; "),
        "{out}"
    );
    assert!(
        out.contains("systemctl disable --now pcscd.socket"),
        "{out}"
    );

    let o = run(true);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[0]["device"]["serial"], "0123ABCD");
    assert_eq!(tokens[0]["device"]["id"], "0529:0620");
    assert_eq!(tokens[0]["kind"]["kind"], "known");
    assert_eq!(tokens[1]["conflicts"][0]["driver"], "usbfs");
}

#[test]
fn build_vm_gets_its_grant_in_signetd_toml() {
    let pve = Pve::with(200, "simple1.conf");
    let toml = pve.signetd_toml();
    let base = format!("# the operator's file\nstate_dir = {:?}\nagent = \"vsock:105:7711\"\ndefault_profile = \"release\"\n[profiles.release]\n[profiles.nightly]\n", pve.state_dir());
    std::fs::write(&toml, &base).unwrap();

    let o = pve.enroll(&["build-vm", "200", "--dry-run"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("would add to")
            && out.contains("[[grants]]\ncallers = [\"vm:200\"]\nprofiles = [\"release\"]\n"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&toml).unwrap(),
        base,
        "a dry run changes nothing"
    );

    // An unknown profile: refused before anything changes, VM included.
    let o = pve.enroll(&["build-vm", "200", "--profile", "relaese"], &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("no profile is named \"relaese\"") && err.contains("nightly, release"),
        "{err}"
    );
    assert!(!pve.calls().contains("set"), "{}", pve.calls());

    let o = pve.enroll(&["build-vm", "200", "-p", "release", "-p", "nightly"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("systemctl reload signetd"), "{out}");
    let after = std::fs::read_to_string(&toml).unwrap();
    assert!(after.starts_with(&base), "{after}");
    assert!(
        after.ends_with(
            "[[grants]]\ncallers = [\"vm:200\"]\nprofiles = [\"release\", \"nightly\"]\n"
        ),
        "{after}"
    );
    assert!(pve.config(200).contains("vhost-vsock-pci,guest-cid=200"));
    // Audited as the daemon's enroll is, under the uid that ran it: the refusal with its
    // code, the change; the dry runs not at all.
    let (records, intact) = pve.audit();
    assert!(intact, "the chain verifies");
    let uid = nix::unistd::getuid().as_raw();
    let enrolls: Vec<(&str, &str, Option<&str>)> = records
        .iter()
        .filter(|r| r["result"] == "enroll")
        .map(|r| {
            assert_eq!(r["caller"], format!("uid:{uid}"), "{r}");
            (
                r["transport"].as_str().unwrap(),
                r["filename"].as_str().unwrap_or_default(),
                r["error"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        enrolls,
        [
            ("cli", "VM 200 as build VM", Some("unknown_profile")),
            ("cli", "VM 200 as build VM", None)
        ],
        "{records:#?}"
    );
    // Again, with the file as it is now: it parses, and nothing is left to add.
    let check = Command::new(env!("CARGO_BIN_EXE_signetd"))
        .args([
            "--config",
            toml.to_str().unwrap(),
            "enroll",
            "build-vm",
            "200",
            "--dry-run",
        ])
        .env("SIGNETD_QM", manifest("tests/fixtures/fake-qm"))
        .env("FAKE_QM_DIR", pve.dir.path())
        .output()
        .unwrap();
    let (out, err) = text(&check);
    assert!(check.status.success(), "{out}{err}");
    assert!(out.contains("VM 200 may use release already"), "{out}");
    assert!(out.contains("already enrolled"), "{out}");
}

#[test]
fn signing_vm_gets_its_token_assignment_in_signetd_toml() {
    let pve = Pve::with(105, "simple1.conf");
    let token = manifest("tests/data/umockdev/safenet-5110-a.umockdev");
    let toml = pve.signetd_toml();
    std::fs::write(
        &toml,
        format!(
            "state_dir = {:?}\nagent = \"vsock:105:7711\"\n[passthrough]\nmonitor_dir = \"/srv/signet-monitors\"\n",
            pve.state_dir()
        ),
    )
    .unwrap();
    let o = pve.enroll(&["signing-vm", "105", "--token", "0123ABCD"], &[&token]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let cfg = std::fs::read_to_string(&toml).unwrap();
    assert!(
        cfg.ends_with("[[tokens]]\nserial = \"0123ABCD\"\nvm = 105\n"),
        "{cfg}"
    );
    assert!(
        pve.config(105)
            .contains("path=/srv/signet-monitors/vm-105.qmp"),
        "the monitor goes where signetd looks for it: {}",
        pve.config(105)
    );
    // The same token for another VM: refused, nothing changes.
    let other = Pve::with(106, "simple1.conf");
    std::fs::copy(&toml, other.signetd_toml()).unwrap();
    let o = other.enroll(&["signing-vm", "106", "--token", "0123ABCD"], &[&token]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("assigned to VM 105") && err.contains("not VM 106"),
        "{err}"
    );
    assert!(!other.calls().contains("set"));
    assert_eq!(std::fs::read_to_string(other.signetd_toml()).unwrap(), cfg);
    // Both in the audit log: the token, the VM, the refusal's code.
    let (records, intact) = pve.audit();
    assert!(intact);
    let enrolls: Vec<_> = records
        .iter()
        .filter(|r| r["result"] == "enroll")
        .map(|r| {
            (
                r["token_serial"].as_str(),
                r["filename"].as_str(),
                r["error"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        enrolls,
        [
            (Some("0123ABCD"), Some("VM 105 as signing VM"), None),
            (
                Some("0123ABCD"),
                Some("VM 106 as signing VM"),
                Some("bad_request")
            )
        ],
        "{records:#?}"
    );
}

#[test]
fn tokens_uses_the_configured_known_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("signetd.toml");
    std::fs::write(
        &toml,
        "agent = \"vsock:105:7711\"\n[[known_tokens]]\nid = \"0529:0620\"\nmodel = \"Lab eToken\"\n",
    )
    .unwrap();
    let a = manifest("tests/data/umockdev/safenet-5110-a.umockdev");
    let o = Command::new("umockdev-run")
        .arg("--device")
        .arg(&a)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_signetd"))
        .arg("--config")
        .arg(&toml)
        .arg("tokens")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("0123ABCD  Lab eToken  0529:0620 at 1-2"),
        "{out}"
    );
}

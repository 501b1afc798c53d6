//! `signet-agent doctor` and `signet-agent tokens` against a real SoftHSM token: a
//! healthy configuration passes, each broken piece fails with its fix, and the doctor
//! never logs in (counted with pkcs11-spy).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use signet_test_support::*;

/// Writes an agent configuration for `module` and `label`, with the world's PIN file.
fn agent_config(w: &World, name: &str, module: &str, label: &str) -> PathBuf {
    let cfg = w.path(name);
    std::fs::write(
        &cfg,
        format!(
            "listen = \"unix:{}\"\n[token]\nmodule = \"{module}\"\nlabel = \"{label}\"\npin_file = \"{}\"\n",
            w.path("agent.sock").display(),
            w.path("pin").display()
        ),
    )
    .unwrap();
    cfg
}

/// Runs `signet-agent ARGS --config CFG` against the world's SoftHSM store.
fn agent(w: &World, cfg: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin("signet-agent"));
    cmd.args(args)
        .arg("--config")
        .arg(cfg)
        .env("SOFTHSM2_CONF", w.softhsm_conf())
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The line of the text report for check `name`, and the lines under it.
fn check_block(report: &str, name: &str) -> String {
    let mut lines = report
        .lines()
        .skip_while(|l| l.split_whitespace().nth(1) != Some(name) || l.starts_with(' '));
    let mut block = lines.next().unwrap_or_default().to_owned();
    for l in lines.take_while(|l| l.starts_with(' ')) {
        block.push('\n');
        block.push_str(l);
    }
    block
}

fn serial(w: &World) -> String {
    std::fs::read_to_string(w.path("token-serial"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn doctor_passes_a_healthy_configuration_and_never_logs_in() {
    let w = World::new();
    let spy_log = w.path("spy.log");
    let cfg = agent_config(&w, "agent.toml", PKCS11_SPY, TOKEN_LABEL);
    let spy = [
        ("PKCS11SPY", SOFTHSM),
        ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
    ];

    let out = agent(&w, &cfg, &["doctor"], &spy);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for name in [
        "config",
        "module",
        "tokens",
        "token",
        "pin_state",
        "pin_file",
        "osslsigncode",
        "certificate",
    ] {
        let block = check_block(&text, name);
        assert!(block.starts_with("ok "), "{name}: {block}\n{text}");
    }
    let serial = serial(&w);
    assert!(
        check_block(&text, "tokens").contains(&format!(
            "\"{TOKEN_LABEL}\" serial {serial}, model SoftHSM v2, manufacturer SoftHSM project"
        )),
        "{text}"
    );
    assert!(text.ends_with("All checks passed.\n"), "{text}");

    let out = agent(&w, &cfg, &["doctor", "--json"], &spy);
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 8, "{report}");
    assert!(checks.iter().all(|c| c["status"] == "ok"), "{report}");
    let token = report["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == TOKEN_LABEL)
        .unwrap();
    assert_eq!(token["serial"], serial.as_str());
    assert_eq!(token["pin_flags"]["locked"], false);

    let spied = std::fs::read_to_string(&spy_log).unwrap();
    assert!(
        spied.contains("C_GetTokenInfo"),
        "the spy saw the doctor's calls"
    );
    assert_eq!(count_logins(&spy_log), 0, "the doctor never logs in");

    let help = Command::new(bin("signet-agent"))
        .args(["doctor", "--help"])
        .output()
        .unwrap();
    assert!(stdout(&help).contains("never logs in"), "{}", stdout(&help));
}

#[test]
fn doctor_names_the_tokens_present_when_the_label_is_wrong() {
    let w = World::new();
    let cfg = agent_config(&w, "agent.toml", SOFTHSM, "no-such-token");
    let out = agent(&w, &cfg, &["doctor"], &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let block = check_block(&text, "token");
    assert!(block.starts_with("FAIL"), "{block}");
    assert!(
        block.contains(&format!(
            "no token matches label \"no-such-token\"; tokens present: \"{TOKEN_LABEL}\" (serial {})",
            serial(&w)
        )),
        "{block}"
    );
    assert!(block.contains("fix: set token.label"), "{block}");
    assert!(check_block(&text, "module").starts_with("ok "), "{text}");

    // `tokens` lists the same token, also from a configuration that names none yet.
    let unnamed = w.path("unnamed.toml");
    std::fs::write(
        &unnamed,
        format!("[token]\nmodule = \"{SOFTHSM}\"\npin_file = \"pin\"\n"),
    )
    .unwrap();
    let out = agent(&w, &unnamed, &["tokens", "--json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels: Vec<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["initialized"] == true)
        .map(|t| t["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, [TOKEN_LABEL]);
}

#[test]
fn doctor_suggests_softhsm_when_the_module_is_missing() {
    let w = World::new();
    let cfg = agent_config(
        &w,
        "agent.toml",
        "/usr/lib/libeTPkcs11-missing.so",
        TOKEN_LABEL,
    );
    let out = agent(&w, &cfg, &["doctor", "--json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let module = &report["checks"][1];
    assert_eq!(module["name"], "module");
    assert_eq!(module["status"], "fail", "{report}");
    assert!(
        module["summary"]
            .as_str()
            .unwrap()
            .contains("/usr/lib/libeTPkcs11-missing.so does not exist"),
        "{module}"
    );
    assert!(
        module["details"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d.as_str().unwrap().contains(SOFTHSM)),
        "SoftHSM's module, present here, is suggested: {module}"
    );
    assert!(
        report["modules_present"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["path"] == SOFTHSM && m["middleware"] == "SoftHSM2"),
        "{report}"
    );
    assert_eq!(report["checks"][2]["status"], "skip", "{report}");
}

#[test]
fn doctor_flags_a_pin_file_others_can_read() {
    let w = World::new();
    let cfg = agent_config(&w, "agent.toml", SOFTHSM, TOKEN_LABEL);
    let pin = w.path("pin");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent(&w, &cfg, &["doctor"], &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let block = check_block(&text, "pin_file");
    assert!(
        block.starts_with("FAIL") && block.contains("mode 0644"),
        "{block}"
    );
    assert!(
        block.contains(&format!("fix: chmod 600 {}", pin.display())),
        "{block}"
    );
    assert!(
        !text.contains(PIN),
        "the PIN is not shown (nor read): {text}"
    );
    assert!(text.ends_with("1 check failed, 0 not checked.\n"), "{text}");
}

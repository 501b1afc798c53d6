//! What the shipped binaries link, read from `cargo tree` (offline, from Cargo.lock):
//! `signetctl` speaks D-Bus only, so nothing of the HTTP stack, TLS or vsock may reach
//! it; and no shipped binary links the stand-ins of `signet-test-support` or the
//! PKCS#11 shim `signet-pkcs11-delay`.

use std::process::Command;

/// The packages `package` links in a normal build (no dev or build dependencies).
fn linked(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn signetctl_links_the_api_and_dbus_crates_and_no_http_tls_or_vsock() {
    let names = linked("signetctl");
    for needed in ["signet-api", "signet-dbus", "zbus"] {
        assert!(
            names.iter().any(|n| n == needed),
            "{needed} not in {names:?}"
        );
    }
    let heavy: Vec<&String> = names
        .iter()
        .filter(|n| {
            ["axum", "hyper", "rustls", "vsock", "signet-protocol"]
                .iter()
                .any(|h| n.contains(h))
        })
        .collect();
    assert!(
        heavy.is_empty(),
        "signetctl links {heavy:?}: it speaks D-Bus only; take what it needs from signet-api or signet-dbus"
    );
}

#[test]
fn no_shipped_binary_links_the_test_stand_ins() {
    for package in ["signetd", "signet-agent", "signet", "signetctl"] {
        let names = linked(package);
        assert!(
            names.iter().any(|n| n == "signet-api"),
            "{package}: {names:?}"
        );
        for stand_in in ["signet-test-support", "signet-pkcs11-delay"] {
            assert!(
                !names.iter().any(|n| n == stand_in),
                "{package} links {stand_in}: stand-ins belong in dev-dependencies only"
            );
        }
    }
}

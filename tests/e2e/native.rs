//! The native backend (`[signer] backend = "native"`) through the whole path, as
//! `formats` does it with osslsigncode: PE, MSI, CAB, PowerShell and APPX/MSIX files, page hashes,
//! nested signatures and digest mode, each verified with `osslsigncode verify`; and,
//! through OpenSC's PKCS#11 logger, the token sees one signature operation per
//! signature and no
//! other login, session or initialisation of the module than the agent's own.

use std::path::Path;

use signet_test_support::*;

use crate::{code, stderr};

const NATIVE: &str = "[signer]\nbackend = \"native\"\n";

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn signatures(verify_output: &str) -> usize {
    verify_output
        .lines()
        .filter(|l| l.starts_with("Signature Index: "))
        .count()
}

/// How often the module was called with `function` (the logger's "N: C_Xxx" lines).
fn calls(spy_log: &str, function: &str) -> usize {
    spy_log
        .lines()
        .filter(|l| {
            l.split_once(": ")
                .is_some_and(|(n, f)| n.chars().all(|c| c.is_ascii_digit()) && f.trim() == function)
        })
        .count()
}

#[test]
fn the_native_backend_signs_every_format_on_the_agents_session_one_c_sign_each() {
    let mut w = World::new();
    let spy_log = w.path("spy.log");
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        PKCS11_SPY,
        &pin,
        &[
            ("PKCS11SPY", SOFTHSM),
            ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
        ],
        NATIVE,
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n\
             [profiles.second]\nhash = \"sha512\"\nnested = true\n\
             [profiles.paged]\nhash = \"sha384\"\npage_hashes = true\n",
        )
        .remove(0);

    let exe = w.pe("app.exe");
    let msi = w.msi("setup.msi");
    let cab = w.cab("payload.cab");
    let ps1 = w.file("run.ps1", b"Write-Host \"Hello from Signet\"\r\n");
    let files = [&exe, &msi, &cab, &ps1];
    let mut args = vec!["sign"];
    args.extend(files.iter().map(|f| arg(f)));
    let out = signet(&ep, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in files {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{}: {text}", f.display());
        assert!(text.contains("Signet Demo Code Signing"), "{text}");
    }

    // Nested with another hash: the first signature stays.
    let out = signet(&ep, &["sign", "-p", "second", arg(&exe), arg(&ps1)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&exe, &ps1] {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{text}");
        assert_eq!(signatures(&text), 2, "{}: {text}", f.display());
        assert!(
            text.contains("SHA256") && text.contains("SHA512"),
            "both digests: {text}"
        );
    }

    // Page hashes, whole and in digest mode.
    let paged = w.pe("paged.exe");
    let digest = w.pe("digest.exe");
    let out = signet(&ep, &["sign", "-p", "paged", arg(&paged)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let ca = w.path("cert.pem");
    let out = signet(
        &ep,
        &[
            "sign",
            "--digest",
            "--ca-file",
            arg(&ca),
            "-p",
            "paged",
            arg(&digest),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&paged, &digest] {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{text}");
        assert!(
            text.contains("Message digest algorithm  : SHA384")
                && text.contains("Page hash algorithm  : SHA256")
                && text.contains("Calculated page hash"),
            "{}: {text}",
            f.display()
        );
    }

    // A catalog is refused with the fix, before the token is touched.
    let cat = w.cat("drivers.cat");
    let out = signet(&ep, &["sign", arg(&cat)]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("cannot sign catalogs") && stderr(&out).contains("osslsigncode"),
        "{}",
        stderr(&out)
    );

    // Eight signatures, one signature operation each (C_SignInit, then C_Sign asked
    // for the length and then for the signature); one login, one session, one
    // C_Initialize: the agent's own.
    let log = std::fs::read_to_string(&spy_log).unwrap();
    assert_eq!(calls(&log, "C_SignInit"), 8, "{log}");
    assert_eq!(calls(&log, "C_Sign"), 16, "{log}");
    assert_eq!(calls(&log, "C_Login"), 1, "{log}");
    assert_eq!(calls(&log, "C_Initialize"), 1, "{log}");
    assert_eq!(calls(&log, "C_OpenSession"), 1, "{log}");
    let health = w.log("signet-agent");
    assert!(health.contains("signet-authenticode"), "{health}");
}

#[test]
fn the_native_backend_signs_appx_packages_and_bundles_through_osslsigncodes_data() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        NATIVE,
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n",
        )
        .remove(0);
    let package = w.appx("app.msix", false);
    let bundle = w.appx("app.msixbundle", true);
    let out = signet(&ep, &["sign", arg(&package), arg(&bundle)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&package, &bundle] {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{}: {text}", f.display());
        assert!(text.contains("Signet Demo Code Signing"), "{text}");
        assert_eq!(signatures(&text), 1, "{text}");
    }
}

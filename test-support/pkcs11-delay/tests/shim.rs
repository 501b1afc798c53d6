//! The shim against a real SoftHSM token: loaded by cryptoki in this process and by
//! osslsigncode in two processes at once. The recorded durations are compared with the
//! configured delays: that checks the shim waits, it does not time the product.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use signet_pkcs11_delay::log::{Call, Report};
use std::path::{Path, PathBuf};
use std::process::Command;

const SIGN_MS: u64 = 60;
const LOGIN_MS: u64 = 40;

/// The shim cargo built beside this test.
fn shim() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let so = exe
        .parent()
        .expect("deps dir")
        .join("libsignet_pkcs11_delay.so");
    assert!(
        so.exists(),
        "{} missing: cargo builds it with the tests",
        so.display()
    );
    so
}

/// A SoftHSM token made by the tests' own script (tests/fixtures/make-token.sh).
fn token(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/make-token.sh");
    let tok = dir.join("token");
    let st = Command::new("bash")
        .arg(script)
        .arg(&tok)
        .status()
        .expect("run make-token.sh (needs softhsm2, opensc, libengine-pkcs11-openssl)");
    assert!(st.success(), "make-token.sh failed");
    tok
}

fn calls(log: &Path) -> Vec<Call> {
    std::fs::read_to_string(log)
        .expect("the shim's log")
        .lines()
        .map(|l| Call::parse(l).unwrap_or_else(|| panic!("not a log line: {l}")))
        .collect()
}

#[test]
fn cryptoki_signs_through_the_shim_which_delays_and_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = token(dir.path());
    let log = dir.path().join("calls.log");
    // This is the only test in this binary that loads a module in-process, so setting
    // the process's environment races with nothing.
    std::env::set_var("SOFTHSM2_CONF", tok.join("softhsm2.conf"));
    std::env::set_var("SIGNET_SHIM_SIGN_MS", SIGN_MS.to_string());
    std::env::set_var("SIGNET_SHIM_LOGIN_MS", LOGIN_MS.to_string());
    std::env::set_var("SIGNET_SHIM_LOG", &log);

    let ctx = Pkcs11::new(shim()).expect("load the shim");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label().trim_end() == "signet-demo")
                .unwrap_or(false)
        })
        .expect("the token");
    let session = ctx.open_ro_session(slot).expect("C_OpenSession");
    session
        .login(UserType::User, Some(&AuthPin::from("123456".to_owned())))
        .expect("C_Login");
    let key = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("keys")[0];
    // A SHA-256 DigestInfo, as osslsigncode has the token sign.
    let mut data = vec![
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    data.extend_from_slice(&[7u8; 32]);
    let sig = session
        .sign(&Mechanism::RsaPkcs, key, &data)
        .expect("C_Sign");
    session
        .sign(&Mechanism::RsaPkcs, key, &data)
        .expect("C_Sign again");

    // The signature is SoftHSM's, forwarded: the certificate's key recovers the data.
    std::fs::write(dir.path().join("sig"), &sig).expect("write sig");
    let pubkey = Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(tok.join("cert.pem"))
        .output()
        .expect("openssl x509");
    std::fs::write(dir.path().join("pub.pem"), &pubkey.stdout).expect("write pub");
    let recovered = Command::new("openssl")
        .args(["pkeyutl", "-verifyrecover", "-pubin", "-inkey"])
        .arg(dir.path().join("pub.pem"))
        .arg("-in")
        .arg(dir.path().join("sig"))
        .output()
        .expect("openssl pkeyutl");
    assert!(
        recovered.status.success(),
        "{}",
        String::from_utf8_lossy(&recovered.stderr)
    );
    assert_eq!(recovered.stdout, data);

    let calls = calls(&log);
    let named = |n: &str| calls.iter().filter(|c| c.name == n).collect::<Vec<_>>();
    assert_eq!(named("C_Initialize").len(), 1);
    assert_eq!(named("C_OpenSession").len(), 1);
    assert_eq!(named("C_SignInit").len(), 2);
    let logins = named("C_Login");
    assert_eq!(logins.len(), 1);
    assert!(
        logins[0].ms() >= LOGIN_MS as f64,
        "C_Login took {} ms",
        logins[0].ms()
    );
    let signs: Vec<_> = calls.iter().filter(|c| c.is_signature()).collect();
    assert_eq!(signs.len(), 2, "{calls:?}");
    for s in &signs {
        assert!(s.ms() >= SIGN_MS as f64, "C_Sign took {} ms", s.ms());
        assert_eq!(s.pid, std::process::id());
    }
    // cryptoki asks for the length first: logged as a query, not delayed, not counted.
    assert!(named("C_Sign").iter().any(|c| c.query));
    let r = Report::from_log(&std::fs::read_to_string(&log).expect("log"));
    assert_eq!((r.total.login, r.total.sign, r.total.initialize), (1, 2, 1));
}

#[test]
fn two_osslsigncode_processes_share_the_log_and_take_turns_at_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = token(dir.path());
    let log = dir.path().join("calls.log");
    let children: Vec<_> = (0..2)
        .map(|i| {
            Command::new("osslsigncode")
                .args(["sign", "-pkcs11module"])
                .arg(shim())
                .args([
                    "-key",
                    "pkcs11:token=signet-demo;object=signkey;type=private",
                    "-readpass",
                ])
                .arg(tok.join("pin"))
                .arg("-certs")
                .arg(tok.join("cert.pem"))
                .args(["-h", "sha256", "-in"])
                .arg(tok.join("hello.exe"))
                .arg("-out")
                .arg(dir.path().join(format!("signed-{i}.exe")))
                .env("SOFTHSM2_CONF", tok.join("softhsm2.conf"))
                .env("SIGNET_SHIM_SIGN_MS", SIGN_MS.to_string())
                .env("SIGNET_SHIM_LOGIN_MS", LOGIN_MS.to_string())
                .env("SIGNET_SHIM_LOG", &log)
                .spawn()
                .expect("osslsigncode")
        })
        .collect();
    for mut c in children {
        assert!(
            c.wait().expect("wait").success(),
            "osslsigncode through the shim failed"
        );
    }
    for i in 0..2 {
        let st = Command::new("osslsigncode")
            .args(["verify", "-CAfile"])
            .arg(tok.join("cert.pem"))
            .arg("-in")
            .arg(dir.path().join(format!("signed-{i}.exe")))
            .output()
            .expect("osslsigncode verify");
        assert!(st.status.success(), "signed-{i}.exe does not verify");
    }

    let calls = calls(&log);
    let r = Report::from_log(&std::fs::read_to_string(&log).expect("log"));
    assert_eq!(r.per_process.len(), 2, "{calls:?}");
    for counts in r.per_process.values() {
        assert_eq!(
            (counts.initialize, counts.login, counts.sign),
            (1, 1, 1),
            "{calls:?}"
        );
        assert!(counts.open_session >= 1);
    }
    // Token operations (signatures and logins) hold the token in turn: their token
    // times never overlap, and each lasted at least its delay.
    let mut held: Vec<_> = calls
        .iter()
        .filter(|c| c.is_signature() || c.name == "C_Login")
        .collect();
    held.sort_by_key(|c| c.busy);
    for pair in held.windows(2) {
        assert!(
            pair[0].end <= pair[1].busy,
            "overlapping token use: {pair:?}"
        );
    }
    for c in &held {
        let want = if c.name == "C_Login" {
            LOGIN_MS
        } else {
            SIGN_MS
        };
        assert!((c.end - c.busy) as f64 / 1e6 >= want as f64, "{c:?}");
    }
}
